"""Prompt sets: benchmark files of subjects and their frames (ConsiStory+), read as stories.

A prompt set is a YAML mapping category -> list of entries, each one subject with its frames::

    animals:
    - concept_token: phoenix
      subject: A phoenix with bright orange feathers
      style: A fiery and majestic illustration of
      settings:
      - rising from a fiery ashes
      - soaring through a glowing sky

A frame's prompt is `"{style} {subject} {setting}"` (the public benchmark's recipe). Each entry becomes
one `Story`: the subject is its one character (named after `concept_token`, described by `subject`), every
setting a frame `"{style} [token] {setting}"` captioned with the setting, in the project's "No style" so
the prompt is exactly the benchmark's. The story's first `id_length` frames are the character's reference
frames, as for any story; the benchmark file fixes no id_length, so it is the caller's setting.

The ConsiStory+ set ships in the package (`assets/benchmarks/consistory_plus.yaml`, MIT licence, the
notice beside it): `read_prompt_set(CONSISTORY_PLUS)` or the path.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from storydiffusion.story.format import Story, StoryFormatError, StorySettings

CONSISTORY_PLUS = "consistory+"  # short name of the shipped ConsiStory+ prompt set, wherever an input is taken
BENCHMARKS_DIR = Path(str(files("storydiffusion") / "assets" / "benchmarks"))
PROMPT_SETS = {CONSISTORY_PLUS: BENCHMARKS_DIR / "consistory_plus.yaml"}
ENTRY_KEYS = ("concept_token", "subject", "style", "settings")
_NOT_A_NAME = re.compile(r"[^A-Za-z0-9 _-]+")


@dataclass(frozen=True)
class PromptSetEntry:
    """One subject of a prompt set and its frames."""

    category: str  # e.g. "animals"
    index: int  # position within its category (0-based)
    concept_token: str  # the subject's short name, e.g. "phoenix"
    subject: str  # the description, e.g. "A phoenix with bright orange feathers"
    style: str  # the words before the subject, e.g. "A fiery and majestic illustration of"
    settings: tuple[str, ...]  # one per frame, e.g. "rising from a fiery ashes"
    source: str = "<prompt set>"  # the file
    line: int | None = None  # where the entry starts (1-based)

    @property
    def name(self) -> str:
        """A folder name unique within the set and stable across runs: `animals_000_phoenix`."""
        token = "-".join(_NOT_A_NAME.sub(" ", self.concept_token).split()) or "subject"
        return f"{self.category}_{self.index:03d}_{token}"

    @property
    def character(self) -> str:
        """The story's character name: the concept token, kept to the letters a name may use."""
        return " ".join(_NOT_A_NAME.sub(" ", self.concept_token).split()) or "subject"

    def prompts(self) -> list[str]:
        """The benchmark's prompt of every frame: `"{style} {subject} {setting}"`."""
        return [" ".join(f"{self.style} {self.subject} {setting}".split()) for setting in self.settings]

    def to_story(self, settings: StorySettings | None = None) -> Story:
        """This subject as a one-character story (see the module docstring); raises StoryFormatError."""
        settings = settings or StorySettings()
        data = {
            "characters": {self.character: self.subject},
            "frames": [
                {"prompt": f"{self.style} [{self.character}] {setting}", "caption": setting}
                for setting in self.settings
            ],
        }
        source = f"{self.source} ({self.category}[{self.index}], line {self.line})" if self.line else self.source
        return Story.from_dict(data, source, overrides=dataclasses.asdict(settings))


def is_prompt_set(data: Any) -> bool:
    """Whether loaded YAML/JSON looks like a prompt set (category -> entries with `subject` and `settings`)
    rather than a story (which has `frames`)."""
    if not isinstance(data, Mapping) or not data or "frames" in data:
        return False
    return all(
        isinstance(entries, list)
        and bool(entries)
        and all(isinstance(entry, Mapping) and "subject" in entry and "settings" in entry for entry in entries)
        for entries in data.values()
    )


def resolve_prompt_set(name_or_path: str | Path) -> Path:
    """`consistory+` -> the shipped file; anything else is a path."""
    return PROMPT_SETS.get(str(name_or_path), Path(name_or_path))


def read_prompt_set(path: str | Path) -> list[PromptSetEntry]:
    """Every entry of a prompt set file, in file order; raises StoryFormatError naming file, line and field."""
    path = resolve_prompt_set(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise StoryFormatError(f"cannot read the prompt set: {reason}", source) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise StoryFormatError(f"YAML syntax error: {getattr(error, 'problem', error)}", source, line) from None
    return parse_prompt_set(data, source, root)


def parse_prompt_set(data: Any, source: str = "<prompt set>", root: yaml.Node | None = None) -> list[PromptSetEntry]:
    """The entries of an already-loaded prompt set; `root` (its YAML node) gives line numbers for errors."""
    if not isinstance(data, Mapping) or not data:
        raise StoryFormatError("a prompt set is a mapping category -> list of subjects; got something else", source, 1)
    lines = _entry_lines(root)
    entries = []
    for category, items in data.items():
        if not isinstance(items, list) or not items:
            raise StoryFormatError(
                "a category holds a list of subjects (concept_token, subject, style, settings)",
                source,
                lines.get((str(category), None)),
                str(category),
            )
        for index, item in enumerate(items):
            line = lines.get((str(category), index))
            entries.append(_entry(str(category), index, item, source, line))
    return entries


def _entry(category: str, index: int, item: Any, source: str, line: int | None) -> PromptSetEntry:
    where = f"{category}[{index}]"
    if not isinstance(item, Mapping):
        raise StoryFormatError(f"a subject is a mapping with {', '.join(ENTRY_KEYS)}", source, line, where)
    for key in ENTRY_KEYS:
        if key not in item:
            raise StoryFormatError(f"missing {key!r}", source, line, where)
    unknown = sorted(str(key) for key in item if key not in ENTRY_KEYS)
    if unknown:
        raise StoryFormatError(f"unknown key(s) {unknown}; allowed: {', '.join(ENTRY_KEYS)}", source, line, where)
    for key in ("concept_token", "subject"):
        if not isinstance(item[key], str) or not item[key].strip():
            raise StoryFormatError(f"{key} must be non-empty text", source, line, f"{where}.{key}")
    if not isinstance(item["style"], str):
        raise StoryFormatError("style must be text (it may be empty)", source, line, f"{where}.style")
    settings = item["settings"]
    if not isinstance(settings, list) or not settings or not all(isinstance(s, str) and s.strip() for s in settings):
        raise StoryFormatError("settings must be a list of frame texts", source, line, f"{where}.settings")
    return PromptSetEntry(
        category=category,
        index=index,
        concept_token=" ".join(item["concept_token"].split()),
        subject=" ".join(item["subject"].split()),
        style=" ".join(item["style"].split()),
        settings=tuple(" ".join(s.split()) for s in settings),
        source=source,
        line=line,
    )


def _entry_lines(root: yaml.Node | None) -> dict[tuple[str, int | None], int]:
    """(category, index) -> the line an entry starts on; (category, None) -> the category's line."""
    lines: dict[tuple[str, int | None], int] = {}
    if not isinstance(root, yaml.MappingNode):
        return lines
    for key, value in root.value:
        if not isinstance(key, yaml.ScalarNode):
            continue
        lines[(key.value, None)] = key.start_mark.line + 1
        if isinstance(value, yaml.SequenceNode):
            for index, item in enumerate(value.value):
                lines[(key.value, index)] = item.start_mark.line + 1
    return lines
