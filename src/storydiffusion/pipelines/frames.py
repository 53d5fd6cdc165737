"""Frames and the frame-line syntax shared by `StoryPipeline` and the story format.

A frame line names characters with `[Name]` tags (replaced by their descriptions), marks a panel with
no character with `[NC]`, and puts its caption after the last `#`. The story format
(`storydiffusion.story.format`) adds where a line came from (file, line, field) to these errors.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from storydiffusion.errors import StoryDiffusionError

NO_CHARACTER = "NC"  # the frame tag for a panel without character

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80
_short.maxlist = _short.maxdict = 4
_short.maxlevel = 2


def show(value: object) -> str:
    """A short repr of a user value, for error messages."""
    return _short.repr(value)


class FrameSyntaxError(StoryDiffusionError):
    """A frame line that breaks the syntax (message only; callers may add where it came from)."""


Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in fractions of the frame, y down


@dataclass(frozen=True)
class Frame:
    """One panel: the prompt sent to the text encoder and the characters it shows."""

    prompt: str
    characters: tuple[str, ...] = ()
    negative_prompt: str | None = None  # None: the call's negative prompt
    # where each named character stands: its bank is read only by the tokens of its box, the background
    # reads no bank (None: every token reads every named character's bank)
    regions: Mapping[str, Box] | None = None


def check_box(box: object) -> Box:
    """A region box as four floats 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1; raises FrameSyntaxError saying why."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise FrameSyntaxError(f"a region is [x0, y0, x1, y1] in fractions of the frame, got {show(box)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise FrameSyntaxError(f"a region's corners are numbers from 0 to 1, got {show(box)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise FrameSyntaxError(
            f"region {show(list(box))} is outside the frame or empty: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1"
        )
    return (x0, y0, x1, y1)


def check_regions(regions: Mapping[str, object], characters: tuple[str, ...]) -> dict[str, Box]:
    """A frame's regions: one valid box per character the frame names (every one of them, none other)."""
    unknown = [name for name in regions if name not in characters]
    if unknown:
        raise FrameSyntaxError(
            f"region for [{unknown[0]}], whom the frame does not name; the frame names "
            f"{', '.join(f'[{n}]' for n in characters) or 'no character'}"
        )
    missing = [name for name in characters if name not in regions]
    if missing:
        raise FrameSyntaxError(f"no region for [{missing[0]}]: give a box for every character the frame names, or none")
    return {name: check_box(box) for name, box in regions.items()}


@dataclass(frozen=True)
class ParsedFrame:
    """A frame line read: the prompt (tags replaced), the characters it names in order, its caption."""

    prompt: str
    characters: tuple[str, ...]
    caption: str  # "" for no caption

    def to_frame(self) -> Frame:
        return Frame(prompt=self.prompt, characters=self.characters)


def split_tags(text: str) -> list[tuple[bool, str]]:
    """`text` as (is_tag, content) pieces; raises on an unclosed `[` or a stray `]`."""
    pieces: list[tuple[bool, str]] = []
    pos = 0
    while True:
        start, close = text.find("[", pos), text.find("]", pos)
        if close != -1 and (start == -1 or close < start):
            raise FrameSyntaxError(f"stray ']' in frame {show(text)}; tags look like [Name]")
        if start == -1:
            pieces.append((False, text[pos:]))
            return pieces
        if close == -1 or "[" in text[start + 1 : close]:
            raise FrameSyntaxError(f"unclosed '[' in frame {show(text)}; tags look like [Name]")
        pieces += [(False, text[pos:start]), (True, text[start + 1 : close])]
        pos = close + 1


def tidy(text: str) -> str:
    """Whitespace collapsed, and commas left dangling at the ends by a removed tag dropped."""
    return " ".join(text.split()).strip(" ,")


def unknown_character_message(name: str, known: list[str]) -> str:
    if not known:
        return f"frame names unknown character [{name}]; no characters are defined: add `[{name}] description`"
    match = difflib.get_close_matches(name, [*known, NO_CHARACTER], n=1)
    hint = f" (did you mean [{match[0]}]?)" if match else ""
    return f"frame names unknown character [{name}]{hint}; known: {', '.join(f'[{n}]' for n in known)}"


def parse_frame_body(text: str, body: str, caption: str | None, descriptions: Mapping[str, str]) -> ParsedFrame:
    """A frame from its prompt text `body` (tags, no #caption) against name -> description; `text` is the
    line as written (for messages); caption None: made from the body with each tag replaced by the name."""
    prompt, names_text, named = [], [], []
    for is_tag, content in split_tags(body):
        if not is_tag:
            prompt.append(content)
            names_text.append(content)
            continue
        name = " ".join(content.split())
        if not name:
            raise FrameSyntaxError(f"empty tag [] in frame {show(text)}; write [Name] or [NC]")
        if name == NO_CHARACTER:
            continue
        if name not in descriptions:
            raise FrameSyntaxError(unknown_character_message(name, list(descriptions)))
        if name not in named:
            named.append(name)
        prompt.append(descriptions[name])
        names_text.append(name)
    prompt_text = tidy("".join(prompt))
    if not prompt_text:
        raise FrameSyntaxError(
            f"frame {show(text)} has no prompt text; describe the scene, e.g. '[NC] a city at night'"
        )
    caption = tidy("".join(names_text)) if caption is None else " ".join(caption.split())
    return ParsedFrame(prompt_text, tuple(named), caption)


def parse_frame_line(line: str, descriptions: Mapping[str, str]) -> ParsedFrame:
    """One frame line (`[Name]` tags, `[NC]`, `#caption`) against name -> description."""
    body, sep, caption = line.rpartition("#")
    return parse_frame_body(line, body if sep else line, caption if sep else None, descriptions)


def parse_frame(text: str, characters: Mapping[str, str]) -> Frame:
    """A frame line as the pipeline's `Frame` (the caption is dropped)."""
    return parse_frame_line(text, characters).to_frame()


@dataclass(frozen=True)
class FrameInfo:
    """What produced a frame: enough to reproduce or audit it."""

    index: int
    prompt: str
    negative_prompt: str
    seed: int
    characters: tuple[str, ...]
    role: Literal["reference", "frame"]
