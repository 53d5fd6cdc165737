"""Reusing a saved character as a new user does (`story later.yaml --bank Mia.character.json`): the character's
model, size, steps, guidance and CSA rate are the run's defaults; a setting given that contradicts them is one
error naming both values; id_length counts only the characters drawn in this run."""

import json
import re
import sys

import numpy as np
import pytest
from _pytest.monkeypatch import MonkeyPatch
from helpers import run_cli
from PIL import Image

from storydiffusion.app import cli
from storydiffusion.app.runner import with_character_settings
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.pipelines.tiny_random import tiny_sd_pipeline
from storydiffusion.story.format import Story, StorySettings

FIRST = """\
characters:
  Mia: a girl with a red scarf
frames:
  - "[Mia] at home"
  - "[Mia] in the park"
seed: 5
steps: 3
guidance: 4.0
rate: 1.0
size: 64x64
id_length: 2
"""
LATER = """\
characters:
  Mia: a girl with a red scarf
frames:
  - "[Mia] at the beach"
  - "[NC] an empty street"
"""  # no settings at all; two frames, fewer than the default id_length (3)
CHARACTER_SETTINGS = {"steps": 3, "guidance": 4.0, "rate": 1.0, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def saved_character(tmp_path_factory):
    """A model folder and the character file of Mia, made there at 64x64, 3 steps, guidance 4, rate 1."""
    root = tmp_path_factory.mktemp("mia")
    model = root / "tiny-sd"
    tiny_sd_pipeline(seed=0).save_pretrained(model)
    (root / "first.yaml").write_text(FIRST)
    (root / "later.yaml").write_text(LATER)
    with MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["storydiffusion", "story", str(root / "first.yaml"), "--model", str(model),
                                    "--out", str(root / "first"), "--device", "cpu"])  # fmt: skip
        try:
            cli.main()
        except SystemExit as stop:
            assert not stop.code
    character = root / "first" / "banks" / "Mia.character.json"
    assert character.is_file()
    return root, model, character


def settings_used(out):
    return json.loads((out / "manifest.json").read_text())["settings"]


def pixels(out):
    return [np.asarray(Image.open(path)) for path in sorted(out.glob("panel_*.png"))]


def test_a_saved_characters_settings_are_the_defaults_of_a_run_that_sets_none(
    monkeypatch, capsys, tmp_path, saved_character
):
    root, model, character = saved_character
    out = tmp_path / "later"
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "story", root / "later.yaml", "--bank", character, "--out", out, "--device", "cpu"
    )
    assert code == 0, stderr
    used = settings_used(out)
    assert {key: used[key] for key in CHARACTER_SETTINGS} == CHARACTER_SETTINGS
    assert used["model"] == str(model)  # the model the character was made with, not the default one
    assert used["id_length"] == 3  # the default: only characters drawn in this run need reference frames

    # the same run with every setting given: the same frames
    explicit = tmp_path / "explicit"
    options = ["--steps", "3", "--guidance", "4", "--rate", "1", "--width", "64", "--height", "64"]
    code, _, stderr = run_cli(
        monkeypatch, capsys, "story", root / "later.yaml", "--bank", character, "--out", explicit,
        "--model", model, "--device", "cpu", *options,
    )  # fmt: skip
    assert code == 0, stderr
    assert settings_used(explicit) == used
    assert len(pixels(out)) == 2 and all(np.array_equal(a, b) for a, b in zip(pixels(out), pixels(explicit)))


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["--steps", "50"], "steps=3, but this run sets steps=50 (--steps)"),
        (["--guidance", "5"], "guidance=4.0, but this run sets guidance=5.0 (--guidance)"),
        (["--rate", "0.5"], "rate=1.0, but this run sets rate=0.5 (--rate)"),
        (["--width", "128"], "width=64, but this run sets width=128 (--width)"),
    ],
)
def test_a_setting_given_against_the_character_is_one_error_naming_both_values(
    monkeypatch, capsys, tmp_path, saved_character, given, message
):
    root, _, character = saved_character
    code, _, stderr = run_cli(
        monkeypatch, capsys, "story", root / "later.yaml", "--bank", character, "--out", tmp_path / "x",
        "--device", "cpu", *given,
    )  # fmt: skip
    assert code == 1 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert "'Mia'" in stderr and str(character) in stderr and message in stderr
    assert "leave it out (or give the character's value)" in stderr
    assert not (tmp_path / "x" / "manifest.json").exists()  # refused before anything was drawn


def test_a_story_file_setting_against_the_character_names_its_line(tmp_path, saved_character):
    root, _, character = saved_character
    path = tmp_path / "story.yaml"
    path.write_text(LATER + "guidance: 7\n")
    story = Story.from_file(path, banked=["Mia"])
    with pytest.raises(
        StoryDiffusionError, match=re.escape(f"guidance=4.0, but this run sets guidance=7.0 ({path} line 6)")
    ):
        with_character_settings(story, [character], default_model="tiny")


def test_settings_left_unset_come_from_the_character_and_the_rest_stay(tmp_path, saved_character):
    root, model, character = saved_character
    story = Story.from_file(root / "later.yaml", {"seed": 9, "steps": 3}, banked=["Mia"])
    resolved = with_character_settings(story, [character], default_model="tiny")
    assert resolved.settings == StorySettings(seed=9, model=str(model), **CHARACTER_SETTINGS)
    assert with_character_settings(story, [], default_model="tiny") is story
    # a story built in code records no given settings: those that differ from the defaults count as given
    built = Story(story.characters, story.panels, StorySettings(guidance=4.0, rate=0.25))
    with pytest.raises(StoryDiffusionError, match=r"rate=1.0, but this run sets rate=0.25 \(given\)"):
        with_character_settings(built, [character], default_model="tiny")
