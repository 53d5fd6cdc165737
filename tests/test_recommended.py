"""Recommended settings that travel with a model (`storydiffusion.json` in its folder): applied by
`StoryPipeline.from_pretrained` and the command line wherever the user set nothing; the user's settings win."""

import json

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

from storydiffusion import CSAConfig, StoryDiffusionError
from storydiffusion.pipelines.recommended import (
    RECOMMENDED_FILE,
    RecommendedSettings,
    csa_fields,
    read_recommended,
    write_recommended,
)
from storydiffusion.pipelines.story_pipeline import StoryPipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHARACTERS = {"Mia": "a girl with a red scarf"}
FRAMES = ["[Mia] at home", "[Mia] on a bus", "[Mia] sleeps"]
CSA = CSAConfig(rate=1.0, bank_from="finished", reference_noise=0.0)
RECOMMENDED = RecommendedSettings(csa=csa_fields(CSA), steps=3, guidance=2.0, width=64, height=64, id_length=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from storydiffusion.pipelines.tiny_random import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("model") / "tiny-sd"
    tiny_sd_pipeline(seed=0).save_pretrained(path)
    write_recommended(path, RECOMMENDED, measured="a test")
    return path


def test_the_file_round_trips_and_is_found_in_the_folder(model_dir):
    read = read_recommended(model_dir)
    assert read.to_dict() == RECOMMENDED.to_dict() and read.csa_config() == CSA
    assert read_recommended(model_dir.parent) is None  # a folder without the file: the paper's defaults


def test_from_pretrained_applies_it_where_the_call_sets_nothing(model_dir):
    """Frames drawn with the model's recommended settings equal frames drawn with the same settings given."""
    loaded = StoryPipeline.from_pretrained(str(model_dir))
    loaded.pipe.set_progress_bar_config(disable=True)
    assert loaded.csa.config == CSA
    implied = loaded(CHARACTERS, FRAMES, seed=4, output_type="np", progress=False)
    assert [f.role for f in implied.frames] == ["reference", "frame", "frame"]  # id_length 1
    assert implied.images[0].shape == (64, 64, 3)

    plain = StoryPipeline(loaded.pipe, CSA)  # no recommended settings: everything given
    given = plain(CHARACTERS, FRAMES, seed=4, output_type="np", progress=False, id_length=1, num_inference_steps=3,
                  guidance_scale=2.0, height=64, width=64)  # fmt: skip
    for a, b in zip(implied.images, given.images, strict=True):
        np.testing.assert_array_equal(a, b)

    # what the user gives wins: their CSA config and their steps
    theirs = StoryPipeline.from_pretrained(str(model_dir), csa_config=CSAConfig(rate=0.5))
    theirs.pipe.set_progress_bar_config(disable=True)
    assert theirs.csa.config == CSAConfig(rate=0.5)
    two_steps = theirs(CHARACTERS, FRAMES, seed=4, output_type="np", progress=False, num_inference_steps=2)
    explicit = StoryPipeline(theirs.pipe, CSAConfig(rate=0.5))(
        CHARACTERS, FRAMES, seed=4, output_type="np", progress=False, id_length=1, num_inference_steps=2,
        guidance_scale=2.0, height=64, width=64,
    )  # fmt: skip
    np.testing.assert_array_equal(two_steps.images[2], explicit.images[2])


def test_the_command_line_applies_it_and_a_story_file_overrides_it(monkeypatch, capsys, tmp_path, model_dir):
    """A first story file with one solo frame per character runs on a model whose id_length is 1, with the
    model's steps, guidance, size and CSA settings recorded; the story file's own setting wins."""
    story = tmp_path / "story.yaml"
    story.write_text("characters:\n  Mia: a girl with a red scarf\nframes:\n  - '[Mia] at home'\n  - '[Mia] sleeps'\n")
    code, _, stderr = run_cli(monkeypatch, capsys, "story", story, "--model", model_dir, "--out", tmp_path / "a",
                              "--device", "cpu")  # fmt: skip
    assert code == 0, stderr
    settings = json.loads((tmp_path / "a" / "manifest.json").read_text())["settings"]
    assert (settings["steps"], settings["guidance"], settings["id_length"], settings["width"]) == (3, 2.0, 1, 64)
    assert settings["rate"] == 1.0 and settings["csa"] == {"bank_from": "finished", "reference_noise": 0.0}
    assert Image.open(tmp_path / "a" / "panel_000.png").size == (64, 64)

    story.write_text(story.read_text() + "steps: 2\n")
    code, _, stderr = run_cli(monkeypatch, capsys, "story", story, "--model", model_dir, "--out", tmp_path / "b",
                              "--device", "cpu", "--guidance", "3")  # fmt: skip
    assert code == 0, stderr
    settings = json.loads((tmp_path / "b" / "manifest.json").read_text())["settings"]
    assert (settings["steps"], settings["guidance"], settings["id_length"]) == (2, 3.0, 1)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"stepz": 20}, "unknown key 'stepz'"),
        ({"csa": {"rte": 1.0}}, "unknown key 'csa.rte'"),
        ({"steps": 0}, "'steps' must be a positive whole number"),
        ({"csa": {"bank_from": "later"}}, "'csa': CSAConfig.bank_from"),
    ],
)
def test_a_bad_file_is_one_error_naming_the_file_and_key(tmp_path, data, expected):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / RECOMMENDED_FILE).write_text(json.dumps(data))
    with pytest.raises(StoryDiffusionError, match=expected) as raised:
        read_recommended(folder)
    assert str(folder / RECOMMENDED_FILE) in str(raised.value)


def test_the_web_ui_form_starts_from_the_models_settings(model_dir):
    from storydiffusion.app.ui import StoryApp

    values = StoryApp.model_defaults(str(model_dir))
    assert (values["steps"], values["guidance"], values["id_length"], values["size"], values["rate"]) == (
        3, 2.0, 1, "64x64", "1.0",
    )  # fmt: skip
