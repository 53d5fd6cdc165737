"""A video model's recommended settings (`storydiffusion.json` in a TransitionPipeline's folder): what a call, the
`video` command and the web UI's video tab use where nothing is given; what is given always wins."""

import json

import numpy as np
import pytest
import torch
from helpers import run_cli as invoke_cli
from helpers import world_story_folder

from storydiffusion.app.video_runner import SMPBackend, TransitionSettings, load_transition_pipeline
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.pipelines.recommended import RECOMMENDED_FILE
from storydiffusion.video import TransitionPipeline
from storydiffusion.video.recommended import (
    CALL_DEFAULTS,
    VideoRecommendedSettings,
    read_video_recommended,
    write_video_recommended,
)
from storydiffusion.world.models import TINY_VIDEO_DIR
from storydiffusion.world.video import fresh_tiny_transition_pipeline, sample_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FILE_SETTINGS = {"keyframe_tokens": "finished", "keyframe_strength": 4.0, "num_frames": 3, "steps": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny transition model saved with recommended settings."""
    pipe = fresh_tiny_transition_pipeline(seed=0)
    pipe.recommended = VideoRecommendedSettings.from_dict(FILE_SETTINGS)
    path = tmp_path_factory.mktemp("video_model")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def keyframes():
    truth = sample_clip(np.random.default_rng(3), 4, "walking").render()
    return truth[0], truth[-1]


def frames(pipe, keyframes, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    made = pipe(*keyframes, "a girl walking", generator=generator, **kwargs).frames[0]
    return np.stack([np.asarray(frame) for frame in made])


def test_a_call_that_sets_nothing_takes_the_files_settings(folder, keyframes):
    pipe = TransitionPipeline.from_pretrained(folder)
    assert json.loads((folder / RECOMMENDED_FILE).read_text()) == FILE_SETTINGS  # save_pretrained kept it
    implied = frames(pipe, keyframes)
    explicit = frames(pipe, keyframes, **{"num_inference_steps": 2, "num_frames": 3, "keyframe_tokens": "finished",
                                          "keyframe_strength": 4.0})  # fmt: skip
    assert np.array_equal(implied, explicit)
    # without the file: the pipeline's own defaults, which draw other frames
    pipe.recommended = None
    plain = frames(pipe, keyframes, num_inference_steps=2, num_frames=3)
    assert not np.array_equal(implied, plain)


def test_what_the_caller_gives_wins_over_the_file(folder, keyframes):
    with_file = TransitionPipeline.from_pretrained(folder)
    without = TransitionPipeline.from_pretrained(folder)
    without.recommended = None
    given = {"num_inference_steps": 2, "num_frames": 3, "keyframe_tokens": "noisy", "keyframe_strength": 1.0}
    assert np.array_equal(frames(with_file, keyframes, **given), frames(without, keyframes, **given))


def test_the_shipped_video_model_reads_the_finished_keyframes():
    recommended = read_video_recommended(TINY_VIDEO_DIR)
    assert recommended is not None and recommended.keyframe_tokens == "finished"
    backend = SMPBackend(load_transition_pipeline("tiny", "cpu"), "tiny")
    done = backend.complete(TransitionSettings())
    assert (done.keyframe_tokens, done.keyframe_strength) == ("finished", recommended.keyframe_strength)
    assert done.steps == CALL_DEFAULTS["steps"]  # the file is silent on steps: the default
    given = backend.complete(TransitionSettings(keyframe_tokens="noisy", steps=3))
    assert (given.keyframe_tokens, given.keyframe_strength, given.steps) == ("noisy", recommended.keyframe_strength, 3)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"rate": 1.0}, "unknown key 'rate' for a video model"),
        ({"keyframe_tokens": "clean"}, "keyframe_tokens='clean' must be one of"),
        ({"keyframe_strength": 0}, "keyframe_strength=0 must be a positive number"),
        ({"guidance": -1}, "'guidance' must be a number >= 0"),
        ({"num_frames": 1}, "'num_frames' must be a whole number >= 2"),
        ({"steps": 2.5}, "'steps' must be a whole number >= 1"),
        ([1, 2], "a JSON object"),
    ],
)
def test_a_bad_file_is_one_error_naming_file_and_key(tmp_path, data, message):
    (tmp_path / RECOMMENDED_FILE).write_text(json.dumps(data))
    with pytest.raises(StoryDiffusionError, match=message) as caught:
        read_video_recommended(tmp_path)
    assert str(tmp_path / RECOMMENDED_FILE) in str(caught.value)


def test_written_settings_read_back(tmp_path):
    settings = VideoRecommendedSettings.from_dict(FILE_SETTINGS)
    write_video_recommended(tmp_path, settings, measured="a note")
    assert read_video_recommended(tmp_path).settings() == settings.settings() == FILE_SETTINGS
    assert read_video_recommended(tmp_path / "missing") is None


# ------------------------------------------------------------------ the command line


@pytest.fixture
def story(tmp_path):
    return world_story_folder(tmp_path, 2)


def test_video_story_uses_the_models_settings_and_the_options_win(monkeypatch, capsys, folder, story):
    args = ["video", "--story", story, "--model", folder, "--device", "cpu"]
    code, out, err = invoke_cli(monkeypatch, capsys, *args)
    assert code == 0, out + err
    record = json.loads((story / "video" / "transition_00" / "transition.json").read_text())["inputs"]
    assert {key: record[key] for key in ("keyframe_tokens", "keyframe_strength", "num_frames", "steps")} == {
        "keyframe_tokens": "finished", "keyframe_strength": 4.0, "num_frames": 3, "steps": 2}  # fmt: skip
    assert record["guidance"] == CALL_DEFAULTS["guidance"]

    code, out, err = invoke_cli(monkeypatch, capsys, *args, "--keyframe-tokens", "noisy", "--keyframe-strength", "2")
    assert code == 0, out + err
    assert "reused" not in out  # other settings: the transition is drawn again
    record = json.loads((story / "video" / "transition_00" / "transition.json").read_text())["inputs"]
    assert (record["keyframe_tokens"], record["keyframe_strength"], record["steps"]) == ("noisy", 2.0, 2)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--keyframe-tokens", "clean"], "keyframe_tokens='clean' must be one of 'noisy' or 'finished'"),
        (["--backend", "flf2v", "--model", "tiny-random-flf2v", "--keyframe-tokens", "finished"],
         "keyframe tokens is a setting of --backend smp"),
    ],
)  # fmt: skip
def test_bad_keyframe_options_are_one_line(monkeypatch, capsys, story, extra, message):
    code, out, err = invoke_cli(monkeypatch, capsys, "video", "--story", story, "--device", "cpu", *extra)
    assert code != 0 and message in out + err and "Traceback" not in out + err
