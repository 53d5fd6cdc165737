"""Prompt sets (ConsiStory+) read as stories: the shipped copy, the conversion, and errors naming file and line."""

from pathlib import Path

import pytest

from storydiffusion.story.format import StoryFormatError, StorySettings
from storydiffusion.story.prompt_sets import (
    BENCHMARKS_DIR,
    CONSISTORY_PLUS,
    PROMPT_SETS,
    is_prompt_set,
    parse_prompt_set,
    read_prompt_set,
)

SHARED_COPY = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "consistory_plus.yaml"

SMALL_SET = """\
animals:
- concept_token: phoenix
  settings:
  - rising from the ashes
  - soaring through a glowing sky
  - perching on a peak
  style: A fiery illustration of
  subject: A phoenix with bright orange feathers
humans:
- concept_token: chef
  settings:
  - in a kitchen
  style: A photo of
"""


def test_the_shipped_consistory_plus_set_is_complete_and_licensed():
    entries = read_prompt_set(CONSISTORY_PLUS)
    assert len(entries) == 192 and sum(len(e.settings) for e in entries) == 1100
    assert len({e.category for e in entries}) == 8
    assert len({e.name for e in entries}) == 192  # one folder per subject
    first = entries[0]
    assert first.name == "animals_000_phoenix" and first.line == 2
    assert (
        first.prompts()[0]
        == "A fiery and majestic illustration of A phoenix with bright orange feathers rising from a fiery ashes"
    )
    notice = (BENCHMARKS_DIR / "consistory_plus-LICENSE.txt").read_text()
    assert "MIT License" in notice and "Copyright (c) 2024 FoundationVision" in notice and "1Prompt1Story" in notice
    if SHARED_COPY.is_file():  # the copy in the package is the published file, unchanged
        assert PROMPT_SETS[CONSISTORY_PLUS].read_bytes() == SHARED_COPY.read_bytes()


def test_an_entry_becomes_a_one_character_story_with_the_benchmark_prompts(tmp_path):
    path = tmp_path / "set.yaml"
    path.write_text(SMALL_SET.replace("  style: A photo of\n", "  style: A photo of\n  subject: A chef\n"))
    entries = read_prompt_set(path)
    story = entries[0].to_story(StorySettings(id_length=2, steps=3, seed=42))
    assert list(story.characters) == ["phoenix"]
    assert story.characters["phoenix"].description == "A phoenix with bright orange feathers"
    assert [p.prompt for p in story.panels] == entries[0].prompts()
    assert (
        story.panels[1].prompt
        == "A fiery illustration of A phoenix with bright orange feathers soaring through a glowing sky"
    )
    assert [p.caption for p in story.panels] == list(entries[0].settings)
    assert all(p.characters == ("phoenix",) for p in story.panels)
    assert story.settings.id_length == 2 and story.settings.steps == 3 and story.settings.style == "No style"
    # its frames are styled as written: "No style" leaves the benchmark's prompt alone
    assert [f.prompt for f in story.to_frames()] == entries[0].prompts()
    with pytest.raises(StoryFormatError, match="needs id_length=2 frames"):
        entries[1].to_story(StorySettings(id_length=2))  # one frame cannot hold two references


def test_is_prompt_set_tells_a_prompt_set_from_a_story():
    assert is_prompt_set({"animals": [{"subject": "a dog", "settings": ["running"]}]})
    assert not is_prompt_set({"characters": {"Bob": "a man"}, "frames": ["[Bob] at home"]})
    assert not is_prompt_set({"animals": []}) and not is_prompt_set([1, 2]) and not is_prompt_set({})


def test_a_bad_entry_is_an_error_naming_file_line_and_field(tmp_path):
    path = tmp_path / "set.yaml"
    path.write_text(SMALL_SET)  # the chef has no subject
    with pytest.raises(StoryFormatError) as error:
        read_prompt_set(path)
    assert error.value.source == str(path) and error.value.line == 10 and error.value.field == "humans[0]"
    assert "missing 'subject'" in str(error.value)
    with pytest.raises(StoryFormatError, match="settings must be a list"):
        parse_prompt_set({"animals": [{"concept_token": "dog", "subject": "a dog", "style": "", "settings": "x"}]})
    with pytest.raises(StoryFormatError, match="unknown key"):
        parse_prompt_set(
            {"animals": [{"concept_token": "dog", "subject": "a dog", "style": "", "settings": ["x"], "seed": 1}]}
        )
