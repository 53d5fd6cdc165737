"""The web UI's functions, called directly on the shipped tiny model: form parsing, messages instead of
tracebacks, panels as they finish, the run's files, separate runs, banks saved and reused."""

import json
import sys
import threading
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

from storydiffusion.app.ui import EXAMPLES, StoryApp, make_story, parse_rate, parse_size
from storydiffusion.story.format import Story, StoryFormatError
from storydiffusion.world.models import TINY, tiny_model_available

pytestmark = pytest.mark.skipif(not tiny_model_available(), reason="the shipped tiny model's files are missing")

CHARACTERS = "[Mia] a girl with curly red hair\n"
FRAMES = """\
[Mia], walking in the city #Mia goes out.
[Mia], running on a beach
// a comment line
[NC] a forest at night #The end.
"""
FAST = {"steps": 4, "size": "64x64", "id_length": 2}


def form(characters=CHARACTERS, frames=FRAMES, *, style="No style", model=TINY, id_length=2, rate="0.5", steps=4,
         guidance=4.0, size="64x64", seed=0, banks=None):  # fmt: skip
    """The on_generate arguments in the page's input order."""
    return characters, frames, style, model, id_length, rate, steps, guidance, size, seed, banks


@pytest.fixture(scope="module")
def app(tmp_path_factory, one_torch_thread):
    app = StoryApp(TINY, root=tmp_path_factory.mktemp("ui-runs"))
    app.preload()
    yield app
    app.close()


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_form_values_become_a_story():
    story = make_story(CHARACTERS, FRAMES, rate="2: 0.5, 4: 0.25", steps=8.0, id_length=2.0, size="64", seed=5.0)
    s = story.settings
    assert (s.rate, s.steps, s.id_length, s.seed, s.width, s.height) == ({2: 0.5, 4: 0.25}, 8, 2, 5, 64, 64)
    assert [p.caption for p in story.panels] == ["Mia goes out.", "Mia, running on a beach", "The end."]
    assert parse_size("") == (None, None) and parse_size("128 x 64") == (128, 64)
    assert parse_rate("0.3") == 0.3 and parse_rate(0.7) == 0.7
    with pytest.raises(StoryFormatError, match="Settings, field 'size'"):
        parse_size("big")


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"frames": "[Mia], walking\n[Bob], running\n"}, "Frames, line 2: frame names unknown character \\[Bob\\]"),
        ({"frames": "[Mia], walking in the city\n"}, "Characters, line 1: character \\[Mia\\] needs id\\_length=2"),
        ({"characters": "Mia a girl\n"}, "Characters, line 1: a character line is"),
        ({"rate": "half"}, "Settings, field 'rate'"),
        ({"rate": "1.5"}, "Settings, field 'rate': rate must be a number from 0 to 1"),
        ({"size": "60x60"}, "Settings, field 'width': width must be a positive multiple of 8"),
        ({"seed": None}, "Settings, field 'seed'"),
        ({"style": "Oil"}, "Settings, field 'style'"),
        ({"model": "/somewhere/else"}, "model '/somewhere/else' is not served here"),
    ],
)
def test_mistakes_are_messages_in_the_page_not_tracebacks(app, changes, expected):
    updates = list(app.on_generate(*form(**changes)))
    assert len(updates) == 1
    message, *others = updates[0]
    assert message.startswith("**Error:** ") and expected in message
    assert "Traceback" not in message
    assert all(other == gr.update() for other in others)  # the page keeps what it showed


def test_generate_fills_the_gallery_and_writes_the_run(app):
    updates = list(app.on_generate(*form(seed=1)))
    message, panels, pages, pdf, archive, banks, session = updates[-1]
    assert message.startswith("3 panels, 1 comic page(s)")
    # first the cleared page, then one update per finished panel (the two references land together)
    counts = [len(update[1]) for update in updates]
    assert counts[0] == 0 and counts[-1] == 3 and counts == sorted(counts) and len(updates) >= 4
    assert [caption for _, caption in panels] == ["Mia goes out.", "Mia, running on a beach", "The end."]
    for path, _ in panels:
        image = Image.open(path)
        assert image.format == "PNG" and image.size == (64, 64)
    assert open(pdf, "rb").read(4) == b"%PDF" and len(pages) == 1
    assert [p.rsplit("/", 1)[-1] for p in banks] == ["Mia.character.json"]  # the small file, not the bank
    assert session == {"out": session["out"], "panels": panels, "banks": banks}
    assert Path(session["out"]).parent.parent == app.root  # its own run folder

    with zipfile.ZipFile(archive) as zipped:
        names = set(zipped.namelist())
        story_text = zipped.read("story/story.yaml").decode()
        manifest = json.loads(zipped.read("story/manifest.json"))
    assert {"story/panel_000.png", "story/panel_002.png", "story/comic.pdf", "story/page_01.png"} <= names
    assert {"story/banks/Mia.character.json", "story/manifest.json"} <= names
    assert "story/banks/Mia.safetensors" not in names  # the full bank is a cache the character file regenerates
    assert manifest["settings"]["seed"] == 1 and manifest["settings"]["model"] == TINY
    # the zipped story file repeats the run: `storydiffusion story story.yaml`
    story_file = app.root / "again.yaml"
    story_file.write_text(story_text)
    again = Story.from_file(story_file)
    assert again.styled_prompts() == make_story(CHARACTERS, FRAMES, **FAST, seed=1).styled_prompts()
    assert again.settings == make_story(CHARACTERS, FRAMES, **FAST, seed=1, model=TINY).settings


def test_two_sessions_at_once_get_their_own_runs(app, tmp_path):
    stories = [make_story(CHARACTERS, FRAMES, **FAST, seed=seed) for seed in (2, 3)]
    results = [None, None]

    def run(slot):
        results[slot] = list(app.generate(stories[slot]))[-1]

    threads = [threading.Thread(target=run, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    first, second = results
    assert first.run_dir != second.run_dir and first.run_dir.parent == second.run_dir.parent == app.root
    assert first.zip != second.zip
    for (a, _), (b, _) in zip(first.panels, second.panels):
        assert a.parent != b.parent
    manifests = [json.loads((r.result.out / "manifest.json").read_text()) for r in results]
    assert [m["settings"]["seed"] for m in manifests] == [2, 3]
    # each session got exactly what its story gives when run alone, in an app that never ran anything else
    for slot, story in enumerate(stories):
        alone_app = StoryApp(TINY, root=tmp_path / f"alone-{slot}")
        try:
            alone = list(alone_app.generate(story))[-1]
        finally:
            alone_app.close()
        assert len(alone.panels) == len(results[slot].panels) == 3
        for (together, _), (by_itself, _) in zip(results[slot].panels, alone.panels):
            assert np.array_equal(pixels(together), pixels(by_itself))


def test_a_saved_character_is_reused(app):
    *_, session = list(app.on_generate(*form(seed=4)))[-1]
    banks, message = app.on_reuse(session)
    assert banks == session["banks"] and "reuses Mia" in message
    assert app.on_reuse(None)[1].startswith("Generate a story")

    frames = "[Mia], waving in the snow #Mia is back.\n[Mia], jumping in a forest\n"
    message, panels, *_, new_banks, session = list(app.on_generate(*form(frames=frames, seed=9, banks=banks)))[-1]
    assert message.startswith("2 panels") and len(panels) == 2
    assert new_banks is None  # Mia came from the file: no reference frames, no new bank
    manifest = json.loads((Path(session["out"]) / "manifest.json").read_text())
    assert [manifest["panels"][i]["role"] for i in ("0", "1")] == ["frame", "frame"]
    assert len(manifest["settings"]["banks"]) == 1  # a resumed run must be given the same bank

    # a setting other than the character's is refused with a message naming both values
    message, *_ = list(app.on_generate(*form(frames=frames, steps=5, banks=banks)))[-1]
    assert message.startswith("**Error:** saved character 'Mia'") and "steps=4, but this run sets steps=5" in message


def test_the_page_has_the_story_boxes_examples_and_outputs(app):
    demo = app.build()
    labels = {getattr(block, "label", None) for block in demo.blocks.values()}
    assert {"Characters", "Frames", "Style", "Model", "CSA rate", "Steps", "Guidance", "Size", "Seed"} <= labels
    assert {"Panels", "Comic pages", "Comic (PDF)", "Run (zip)", "Characters (character files)"} <= labels
    assert any(isinstance(block, gr.Dataset) for block in demo.blocks.values())  # gr.Examples' table
    for characters, frames in EXAMPLES:
        assert make_story(characters, frames, **FAST).panels  # every example is a valid story


def test_ui_command_serves_the_app(monkeypatch, capsys):
    from storydiffusion.app import ui

    calls = []
    monkeypatch.setattr(ui, "serve", lambda *args, **kwargs: calls.append((*args, *kwargs.values())))
    assert run_cli(monkeypatch, capsys, "ui")[0] == 0
    args = ["--host", "0.0.0.0", "--port", "8000", "--model", "tiny-random", "--video-model", "./my-video"]
    assert run_cli(monkeypatch, capsys, "ui", *args)[0] == 0
    # the last two: no flf2v model, the video tab starting on smp (tests/test_ui_video_backends.py sets them)
    assert calls == [
        (TINY, "127.0.0.1", 7860, TINY, None, "smp"),
        ("tiny-random", "0.0.0.0", 8000, "./my-video", None, "smp"),
    ]


def test_ui_command_without_gradio_says_how_to_install(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "storydiffusion.app.ui")
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as if not installed
    code, _, stderr = run_cli(monkeypatch, capsys, "ui")
    assert code == 1 and "pip install 'storydiffusion[ui]'" in stderr


def test_video_tab_animates_the_last_run(app):
    from storydiffusion.video import read_video

    video_args = dict(whole_story=False, start=1, end=2, frames=3, steps=1, seed=0, motion="smp")
    message, video = app.on_video(None, **video_args)
    assert message.startswith("**Error:**") and "generate a story first" in message and video is None
    session = list(app.on_generate(*form(seed=4)))[-1][-1]
    message, video = app.on_video(session, **video_args)
    assert video.endswith(".mp4") and len(read_video(video)) == 3, message
    assert Path(video).parent.parent == Path(session["out"]).parent  # inside this session's run folder
    message, video = app.on_video(session, **{**video_args, "end": 9})
    assert "To panel is 9" in message and video is None
    message, video = app.on_video(session, **{**video_args, "whole_story": True})
    assert len(read_video(video)) == 5, message  # 3 panels: 3 + 2 frames, shared keyframes once


@pytest.mark.parametrize("model", ["tiny-random-flux", "tiny-random-sd3"])
def test_the_page_serves_a_dit_model(model, tmp_path, one_torch_thread):
    """A server started on a Flux or SD3 model draws the story with it, through the same runner."""
    dit = StoryApp(model, root=tmp_path / "runs")
    try:
        assert model in dit.models and dit.defaults["size"] == "64x64"  # the tiny random models' small size
        updates = list(dit.on_generate(*form(model=model, steps=2, size="32x32")))
        message, panels, _, _, _, banks, session = updates[-1]
        assert message.startswith("3 panels") and len(panels) == 3
        manifest = json.loads((Path(session["out"]) / "manifest.json").read_text())
        assert manifest["settings"]["model"] == model
        assert [p.rsplit("/", 1)[-1] for p in banks] == ["Mia.character.json"]
    finally:
        dit.close()


def test_the_upload_boxes_follow_the_names_the_characters_box_defines():
    from storydiffusion.app.ui import character_names

    text = "[ Big  Bob ] a man\n[Mia] a girl\nnot a character line\n[Mia] again"
    assert character_names(text) == ["Big Bob", "Mia"]  # spaces as the story parser reads them
    story = make_story("[ Big  Bob ] a man\n[Mia] a girl", "[Big Bob] waves\n[Mia] runs", **{**FAST, "id_length": 1})
    assert list(story.characters) == ["Big Bob", "Mia"]


def test_a_character_from_uploaded_pictures(app, monkeypatch, capsys, tmp_path):
    """Pictures uploaded for [Mia] make her bank (no reference frames); the run's story file keeps a copy of
    them, and `storydiffusion story` on it draws the same panels; an upload for a name the box no longer
    defines is ignored, a cleared upload forgets the pictures."""
    rng = np.random.default_rng(0)
    upload = tmp_path / "upload" / "mia photo.png"
    upload.parent.mkdir()
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(upload)
    pictures = app.on_pictures("Mia", [str(upload)], {})
    pictures = app.on_pictures("Zed", [str(upload)], pictures)  # a character since removed from the box
    assert pictures == {"Mia": [str(upload)], "Zed": [str(upload)]}
    assert app.on_pictures("Zed", None, pictures) == {"Mia": [str(upload)]}

    message, panels, *_, session = list(app.on_generate(*form(seed=5), pictures))[-1]
    assert "Drawn from pictures: Mia from 1 picture" in message, message
    out = Path(session["out"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [manifest["panels"][i]["role"] for i in ("0", "1")] == ["frame", "frame"]  # no reference frames
    assert manifest["settings"]["pictures"]
    upload.unlink()  # Gradio's upload copies are temporary: the run keeps its own

    code, _, stderr = run_cli(monkeypatch, capsys, "story", out / "story.yaml", "--out", tmp_path / "again")
    assert code == 0, stderr
    for index, (path, _) in enumerate(panels):
        assert np.array_equal(pixels(path), pixels(tmp_path / "again" / f"panel_{index:03d}.png")), index
