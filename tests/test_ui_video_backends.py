"""The web UI's video tab with several backends: the dropdown lists what the server was started with, and
choosing flf2v runs the first/last-frame pipeline (the tiny random Wan one, on a story folder made here)."""

import json

import gradio as gr
import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

from storydiffusion.app.ui import StoryApp
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.video import read_video
from storydiffusion.video.tiny_random_flf2v import TINY_RANDOM_FLF2V

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VIDEO = dict(whole_story=False, start=1, end=2, frames=5, steps=2, seed=0, motion="smp")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app = StoryApp("tiny-random", root=tmp_path_factory.mktemp("ui-video"), flf2v_model=TINY_RANDOM_FLF2V)
    yield app
    app.close()


@pytest.fixture
def session(tmp_path):
    """A session whose last run is a three-panel story of 32x32 panels (Wan takes multiples of 16)."""
    out = tmp_path / "story"
    out.mkdir()
    rng = np.random.default_rng(0)
    panels = {}
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out / f"panel_{i:02d}.png")
        panels[str(i)] = {"index": i, "file": f"panel_{i:02d}.png", "prompt": f"a girl, waving {i}", "caption": ""}
    (out / "manifest.json").write_text(json.dumps({"format": "storydiffusion.run", "panels": panels}))
    return {"out": str(out), "panels": [], "banks": []}


def dropdown(demo, label):
    [block] = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == label]
    return block


def test_the_backend_dropdown_lists_what_the_server_loads(app, tmp_path):
    backends = dropdown(app.build(), "Backend")
    assert [choice[0] for choice in backends.choices] == ["smp", "flf2v"] and backends.value == "smp"
    only_smp = StoryApp("tiny-random", root=tmp_path / "a")
    assert [choice[0] for choice in dropdown(only_smp.build(), "Backend").choices] == ["smp"]
    started_on = StoryApp("tiny-random", root=tmp_path / "b", flf2v_model=TINY_RANDOM_FLF2V, video_backend="flf2v")
    assert dropdown(started_on.build(), "Backend").value == "flf2v"
    with pytest.raises(StoryDiffusionError, match="flf2v needs a model"):
        StoryApp("tiny-random", root=tmp_path / "c", video_backend="flf2v")


def test_choosing_flf2v_runs_it(app, session):
    message, video = app.on_video(session, **VIDEO, backend="flf2v")
    assert video is not None and video.endswith("_flf2v.mp4") and len(read_video(video)) == 5, message
    message, video = app.on_video(session, **{**VIDEO, "whole_story": True}, backend="flf2v")
    assert len(read_video(video)) == 9, message  # 3 panels: 5 + 4 frames, shared keyframes once
    inputs = json.loads((app._last_run(session) / "video" / "transition_00" / "transition.json").read_text())["inputs"]
    assert (inputs["backend"], inputs["model"], inputs["guidance"]) == ("flf2v", TINY_RANDOM_FLF2V, 5.0)


def test_smp_stays_the_default_backend(app, session):
    message, video = app.on_video(session, **{**VIDEO, "frames": 3, "steps": 1})
    assert video is not None and video.endswith("transition_1_2_seed0.mp4") and len(read_video(video)) == 3, message
    message, video = app.on_video(session, **{**VIDEO, "frames": 3, "steps": 1, "whole_story": True})
    assert video.endswith("story.mp4") and len(read_video(video)) == 5, message
    inputs = json.loads((app._last_run(session) / "video" / "transition_01" / "transition.json").read_text())["inputs"]
    assert (inputs["backend"], inputs["model"], inputs["guidance"], inputs["motion"]) == ("smp", "tiny", 1.0, "smp")


def test_flf2v_mistakes_are_messages(app, session, tmp_path):
    message, video = app.on_video(session, **{**VIDEO, "frames": 8}, backend="flf2v")
    assert video is None and message.startswith("**Error:**") and "4k+1" in message and "use 5 or 9" in message
    only_smp = StoryApp("tiny-random", root=tmp_path / "runs")
    message, video = only_smp.on_video(session, **VIDEO, backend="flf2v")
    assert video is None and "not served here" in message


def test_choosing_a_backend_moves_the_frames_slider_to_a_count_it_makes(app):
    assert app.on_video_backend("flf2v")["value"] == 9  # 4k+1 (Wan) and 8k+1 (LTX)
    assert app.on_video_backend("smp")["value"] == 8


def test_ui_command_passes_the_video_backends(monkeypatch, capsys):
    from storydiffusion.app import ui

    calls = []
    monkeypatch.setattr(ui, "serve", lambda *args, **kwargs: calls.append(kwargs))
    args = ["ui", "--flf2v-model", TINY_RANDOM_FLF2V, "--video-backend", "flf2v"]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    assert calls[-1]["flf2v_model"] == TINY_RANDOM_FLF2V and calls[-1]["video_backend"] == "flf2v"
    code, _, stderr = run_cli(monkeypatch, capsys, "ui", "--video-backend", "flf2v")
    assert code == 2 and "--flf2v-model" in stderr
