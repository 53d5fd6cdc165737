"""The story format: characters and frames, from the demo's two text boxes or from a YAML/JSON file.

Text boxes (compatible with the public StoryDiffusion demo)
-----------------------------------------------------------
Characters, one per line, `[Name] description`::

    [Bob] a man with red hair, black suit
    [Ann] a woman with short blue hair, yellow coat

Frames, one panel per line::

    [Bob] wakes up in his small flat # Monday.
    [Bob] and [Ann] meet at the bus stop
    [NC] a rainy city street at night # Later...

- `[Name]` is replaced by that character's description in the prompt; a frame may name several
  characters. `[NC]` marks a panel with no character (the tag is dropped).
- Text after the last `#` is the panel's caption and is not part of the prompt. Without a `#` the
  caption is the line with each tag replaced by the character's name ("Bob and Ann meet at the bus
  stop"); a `#` followed by nothing gives a panel without caption.
- In both boxes blank lines and lines starting with `//` are ignored.
- Names use letters, digits, spaces, `_` and `-`; `NC` is reserved.

Story files (.yaml, .yml, .json)
--------------------------------
A mapping with `frames` (required), `characters` and optional settings::

    characters:                 # name -> description
      Bob: a man with red hair, black suit
      Ann: a woman with short blue hair, yellow coat
      Mia:                      # or a mapping: description and pictures (paths relative to this file);
        description: a girl     # a character with pictures has its bank made from them, no reference frames
        images: [mia.png]
    frames:                     # frame lines, quoted: in YAML a line starting with `[` is a list
      - "[Bob] wakes up in his small flat # Monday."
      - prompt: "[Bob] and [Ann] meet at the bus stop"   # or a mapping: prompt (no #caption) and
        caption: They meet.                              # an optional caption
      - "[NC] a rainy city street at night"
      - prompt: "[Bob] and [Ann] dance"                 # regions: where each named character stands,
        regions: {Bob: [0, 0, 0.5, 1], Ann: [0.5, 0, 1, 1]}  # x0, y0, x1, y1 in fractions of the frame
    style: Comic book           # one of storydiffusion.story.styles.style_names() (case-insensitive)
    seed: 7                     # integer >= 0
    steps: 30                   # denoising steps
    guidance: 5.0               # classifier-free guidance scale, >= 0
    size: 1024x768              # "WxH" or [W, H], multiples of 8; or width: / height:
    id_length: 2                # reference frames per character (its first frames showing it alone)
    rate: 0.5                   # CSA sampling rate in [0, 1], or per resolution level: {2: 0.5, 4: 0.5}
    negative_prompt: blurry     # added once to the style's negative prompt
    model: stabilityai/stable-diffusion-xl-base-1.0
    same_initial_noise: false   # true: every frame starts from the same noise (the public code's prior)
    regional_prompts: false     # true: in frames with regions, each description is read only inside its box

`characters` may also be a list of `{name, description}` mappings or of `[Name] description`
strings, and `characters` / `frames` may each be one block of text-box text (`frames: |`). YAML
comments start with ` #`, so a frame line's `#caption` only survives inside quotes or a block.
Unknown keys are errors. Every mistake raises `StoryFormatError` naming the file, line and field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from storydiffusion.errors import StoryDiffusionError
from storydiffusion.pipelines.frames import NO_CHARACTER, Box, Frame, FrameSyntaxError, check_regions, parse_frame_body
from storydiffusion.pipelines.frames import show as _show
from storydiffusion.story.styles import DEFAULT_STYLE, apply_style, get_style

COMMENT_PREFIX = "//"  # text-box lines starting with this are ignored
STORY_SUFFIXES = (".yaml", ".yml", ".json")
SETTING_KEYS = (
    "style", "seed", "steps", "guidance", "width", "height", "size", "id_length", "rate", "negative_prompt", "model",
    "same_initial_noise", "regional_prompts",
)  # fmt: skip
TOP_LEVEL_KEYS = ("characters", "frames", *SETTING_KEYS)

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_CHARACTER_LINE = re.compile(r"\[([^\[\]]*)\](.*)", re.DOTALL)
_SIZE = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")
_MAX_SEED = 2**64


class StoryFormatError(StoryDiffusionError):
    """A mistake in a story: what is wrong and how to fix it, located by source, line and field.

    `source` is the file name (or "<characters>" / "<frames>" for the text boxes), `line` is 1-based
    (None when unknown), `field` is a path such as `frames[3]` or `characters.Bob` (None for text boxes).
    """

    def __init__(self, message: str, source: str | None = None, line: int | None = None, field: str | None = None):
        self.message = message
        self.source = source
        self.line = line
        self.field = field
        where = [str(source)] if source else []
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)

    def __reduce__(self):
        return type(self), (self.message, self.source, self.line, self.field)


@dataclass(frozen=True)
class _Where:
    """Where a piece of a story comes from; makes the errors that point at it."""

    source: str
    line: int | None = None
    field: str | None = None

    def error(self, message: str) -> StoryFormatError:
        return StoryFormatError(message, self.source, self.line, self.field)


# --------------------------------------------------------------------------------------------
# The story


@dataclass(frozen=True)
class Character:
    """A character: `[name]` in a frame stands for `description`."""

    name: str
    description: str
    line: int | None  # where it is defined (1-based), None when unknown
    source: str = "<characters>"
    field: str | None = None  # e.g. "characters.Bob" in a story file
    # pictures of the character (paths resolved against the story file's folder): its bank is made from them,
    # and it needs no reference frames
    images: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Panel:
    """One frame of the story, parsed: the prompt to draw, who is in it, and its caption."""

    index: int  # 0-based position in the story
    text: str  # the frame as written
    prompt: str  # tags replaced by descriptions, [NC] and the #caption removed
    characters: tuple[str, ...]  # the characters it names, in order of first mention
    caption: str  # "" for no caption
    line: int | None
    source: str = "<frames>"
    regions: Mapping[str, Box] | None = None  # character -> (x0, y0, x1, y1) in fractions of the frame

    def to_frame(self) -> Frame:
        """The unstyled pipeline frame (`Story.to_frames` applies the story's style)."""
        return Frame(prompt=self.prompt, characters=self.characters, regions=self.regions)


class _Invalid(Exception):
    """A bad setting value (message only); callers add where it came from."""


@dataclass(frozen=True)
class StorySettings:
    """How to render a story. Checked on construction; raises StoryFormatError naming the field."""

    style: str = DEFAULT_STYLE  # a name from styles.style_names(), stored in its canonical spelling
    seed: int = 0
    steps: int = 50  # denoising steps
    guidance: float = 5.0  # classifier-free guidance scale (1.0: no guidance)
    width: int | None = None  # None: the model's default size
    height: int | None = None
    id_length: int = 3  # reference frames per character: its first frames that show it alone
    rate: float | dict[int, float] = 0.5  # CSA sampling rate, or per resolution level (downsampling factor)
    negative_prompt: str = ""  # the user's negative, added once to the style's
    model: str | None = None  # model id or path; None: the caller's default
    same_initial_noise: bool = False  # every frame from the same initial noise (the public code's prior)
    regional_prompts: bool = False  # frames with regions: each description read only inside its box

    def __post_init__(self) -> None:
        for f in fields(self):
            try:
                value = _check_setting(f.name, getattr(self, f.name))
            except _Invalid as error:
                raise StoryFormatError(str(error), "<settings>", None, f.name) from None
            object.__setattr__(self, f.name, value)


def _whole(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _Invalid(f"{name} must be a whole number >= {minimum}, got {_show(value)}")
    if maximum is not None and value >= maximum:
        raise _Invalid(f"{name} must be below {maximum}, got {_show(value)}")
    return value


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise _Invalid(f"{name} must be a number from 0 to 1 (e.g. 0.5), got {_show(value)}")
    return float(value)


def _side(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 8:
        raise _Invalid(f"{name} must be a positive multiple of 8 (e.g. 1024), got {_show(value)}")
    return value


def _check_setting(name: str, value: Any) -> Any:
    """The normalised value of setting `name`, or _Invalid saying what is allowed."""
    if name == "style":
        if not isinstance(value, str):
            raise _Invalid(f"style must be a style name, got {_show(value)}")
        try:
            return get_style(value).name
        except StoryDiffusionError as error:
            raise _Invalid(str(error)) from None
    if name == "seed":
        return _whole(name, value, 0, _MAX_SEED)
    if name in ("steps", "id_length"):
        return _whole(name, value, 1)
    if name == "guidance":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise _Invalid(f"guidance must be a number >= 0 (e.g. 5.0; 1.0 turns guidance off), got {_show(value)}")
        return float(value)
    if name in ("width", "height"):
        return _side(name, value)
    if name == "rate":
        if not isinstance(value, Mapping):
            return _fraction(name, value)
        if not value:
            raise _Invalid("rate must be a number from 0 to 1 or a non-empty mapping level -> rate, got {}")
        rates = {}
        for level, rate in value.items():
            if isinstance(level, str) and level.strip().isdigit():
                level = int(level)
            rates[_whole("a rate level (downsampling factor)", level, 1)] = _fraction(f"rate[{level}]", rate)
        return dict(sorted(rates.items()))
    if name == "negative_prompt":
        if value is None:
            return ""
        if not isinstance(value, str):
            raise _Invalid(f"negative_prompt must be text, got {_show(value)}")
        return value
    if name == "model":
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise _Invalid(f"model must be a model id or path, got {_show(value)}")
        return value
    if name in ("same_initial_noise", "regional_prompts"):
        if not isinstance(value, bool):
            raise _Invalid(f"{name} must be true or false, got {_show(value)}")
        return value
    raise _Invalid(f"unknown setting {name!r}")


@dataclass
class Story:
    """Characters, panels in order, and the settings to render them with."""

    characters: dict[str, Character]
    panels: list[Panel]
    settings: StorySettings = field(default_factory=StorySettings)
    source: str = "<story>"  # the file, or the frames box for text-box stories
    # the settings the story's author set (a story file's keys, command-line options), each with where it was set
    # ("story.yaml line 4", "--steps"); None: not recorded, see `given_settings`
    given: Mapping[str, str] | None = None

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def from_text(
        cls,
        characters_text: str,
        frames_text: str,
        settings: StorySettings | None = None,
        characters_source: str = "<characters>",
        frames_source: str = "<frames>",
        banked: Collection[str] = (),
        given: Collection[str] | None = None,
        pictures: Mapping[str, Sequence[str | Path]] | None = None,
    ) -> Story:
        """A story from the demo's two text boxes: `[Name] description` lines and frame lines.

        In both texts blank lines and lines starting with `//` are ignored; see the module docstring
        for the frame syntax. The sources name the boxes in errors. `banked`: characters that come
        from saved banks (they need no reference frames). `given`: the settings of `settings` the user
        set (command-line options); None: those that differ from the defaults. `pictures`: name -> picture
        files given outside the texts (`--character-image`; see `with_pictures`). Raises StoryFormatError.
        """
        characters = _parse_characters_text(characters_text, _Where(characters_source), _same_line)
        panels = _parse_frames_text(frames_text, characters, _Where(frames_source), _same_line)
        settings = settings if settings is not None else StorySettings()
        story = cls(characters, panels, settings, frames_source, None if given is None else _override_sources(given))
        story = story.with_pictures(pictures)
        story._validate_parsed(banked)
        return story

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        overrides: Mapping[str, Any] | None = None,
        banked: Collection[str] = (),
        pictures: Mapping[str, Sequence[str | Path]] | None = None,
    ) -> Story:
        """A story from a .yaml / .yml / .json file (see the module docstring for the schema).

        `overrides` replace settings (e.g. from the command line) before the story is validated;
        `banked` names characters that come from saved banks (they need no reference frames); `pictures`:
        name -> picture files given outside the file (`--character-image`), which replace the file's `images:`
        of that character.
        """
        path = Path(path)
        source = str(path)
        if path.suffix.lower() not in STORY_SUFFIXES:
            raise StoryFormatError(f"a story file ends in {', '.join(STORY_SUFFIXES)}; got {path.name!r}", source)
        try:
            raw = path.read_bytes()
        except OSError as error:
            raise StoryFormatError(f"cannot read the story file: {error.strerror or error}", source) from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            line = raw[: error.start].count(b"\n") + 1
            raise StoryFormatError("the file is not UTF-8 text; save it as UTF-8", source, line) from None
        if path.suffix.lower() == ".json":
            data = _load_json(text, source)
            try:  # JSON is YAML: its nodes give line numbers for later errors
                node = _load_yaml(text, source)[1]
            except StoryFormatError:
                node = None
        else:
            data, node = _load_yaml(text, source)
        return cls._from_mapping(data, _Nodes(node, source), overrides, banked, pictures)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], source: str = "<dict>", overrides: Mapping[str, Any] | None = None
    ) -> Story:
        """A story from an already-loaded mapping with the story file's schema."""
        return cls._from_mapping(data, _Nodes(None, source), overrides)

    @classmethod
    def _from_mapping(
        cls,
        data: Any,
        nodes: _Nodes,
        overrides: Mapping[str, Any] | None = None,
        banked: Collection[str] = (),
        pictures: Mapping[str, Sequence[str | Path]] | None = None,
    ) -> Story:
        source = nodes.source
        if data is None:
            raise StoryFormatError("the story is empty; give at least `frames` (and usually `characters`)", source)
        if not isinstance(data, Mapping):
            raise StoryFormatError(
                f"a story is a mapping with `characters` and `frames`, got {type(data).__name__} {_show(data)}",
                source,
                nodes.top_line(),
            )
        for key in data:
            if not isinstance(key, str) or key not in TOP_LEVEL_KEYS:
                hint = _did_you_mean(str(key), TOP_LEVEL_KEYS)
                raise StoryFormatError(
                    f"unknown key {_show(key)}{hint}; keys are: {', '.join(TOP_LEVEL_KEYS)}",
                    source,
                    nodes.key_line(key),
                    str(key),
                )
        if "frames" not in data:
            raise StoryFormatError("missing `frames`: add a list of frame lines", source, nodes.top_line())
        settings = dataclasses.replace(_settings_from_mapping(data, nodes), **(overrides or {}))
        characters = _characters_from_value(data.get("characters"), nodes)
        panels = _panels_from_value(data["frames"], characters, nodes)
        given = {}
        for key in SETTING_KEYS:
            if key in data:
                line = nodes.key_line(key)
                where = f"{source} line {line}" if line is not None else f"{source} field {key!r}"
                given.update(dict.fromkeys(("width", "height") if key == "size" else (key,), where))
        story = cls(characters, panels, settings, source, {**given, **_override_sources(overrides or {})})
        story = story.with_pictures(pictures)
        story._validate_parsed(banked)
        return story

    def given_settings(self) -> dict[str, str]:
        """The settings the story's author set, each with where it was set. A story built without that record
        (`given` None) counts those that differ from `StorySettings`' defaults."""
        if self.given is not None:
            return dict(self.given)
        defaults = StorySettings()
        changed = [f.name for f in fields(StorySettings) if getattr(self.settings, f.name) != getattr(defaults, f.name)]
        return dict.fromkeys(changed, "given")

    # -- checks ------------------------------------------------------------------------------
    def validate(self, banked: Collection[str] = ()) -> None:
        """Raise StoryFormatError if the story cannot be rendered (no frames, too few reference frames)."""
        if not self.panels:
            raise StoryFormatError("the story has no frames; add one line per panel", self.source, None, None)
        self.validate_references(banked=banked)

    def _validate_parsed(self, banked: Collection[str]) -> None:
        """`validate` as a story is read. Where the settings its author set are recorded (a story file, the
        command line) and id_length is not among them, id_length is the model's to choose (its recommended
        settings; `runner.run_story` validates again with it), so only one solo frame is needed now."""
        if not self.panels:
            raise StoryFormatError("the story has no frames; add one line per panel", self.source, None, None)
        given = self.given is None or "id_length" in self.given
        self.validate_references(self.settings.id_length if given else 1, banked=banked)

    def validate_references(self, id_length: int | None = None, banked: Collection[str] = ()) -> None:
        """Every character named in a frame, unless `banked` (drawn from a saved bank), needs
        `id_length` frames that show it alone.

        The pipeline generates a character's first `id_length` solo frames together as its references.
        """
        if id_length is None:
            id_length = self.settings.id_length
        if isinstance(id_length, bool) or not isinstance(id_length, int) or id_length < 1:
            raise StoryFormatError(
                f"id_length must be a whole number >= 1, got {_show(id_length)}", self.source, None, "id_length"
            )
        for name in dict.fromkeys(n for panel in self.panels for n in panel.characters):
            if name in banked or (name in self.characters and self.characters[name].images):
                continue
            solo = [panel for panel in self.panels if panel.characters == (name,)]
            if len(solo) >= id_length:
                continue
            found = f"found {len(solo)}"
            if solo and all(panel.line is not None for panel in solo):
                lines = ", ".join(str(panel.line) for panel in solo)
                found += f" ({solo[0].source} line{'s' if len(solo) > 1 else ''} {lines})"
            elif solo:
                found += f" (frames {', '.join(str(panel.index) for panel in solo)})"
            character = self.characters.get(name)
            where = (
                _Where(self.source) if character is None else _Where(character.source, character.line, character.field)
            )
            raise where.error(
                f"character [{name}] needs id_length={id_length} frames that show only [{name}] (its reference "
                f"frames), {found}; add frames with [{name}] alone or lower id_length"
            )

    def with_pictures(
        self, pictures: Mapping[str, Sequence[str | Path]] | None, option: str = "--character-image"
    ) -> Story:
        """This story with `pictures` (name -> picture files, relative to the current folder) as its characters'
        images, replacing any the story gives them; `option` names where they came from in errors."""
        if not pictures:
            return self
        characters = dict(self.characters)
        for name, files in pictures.items():
            if name not in characters:
                known = ", ".join(characters) or "none"
                raise StoryFormatError(
                    f"{option} {name}=...: the story has no character [{name}] (its characters: {known}); "
                    f"write the name as the story does{_did_you_mean(name, tuple(characters))}",
                    self.source,
                )
            paths = []
            for file in files:
                path = Path(file).expanduser()
                if not path.is_file():
                    raise StoryFormatError(
                        f"{option} {name}={file}: picture of [{name}] does not exist (looked for {path.resolve()})",
                        self.source,
                    )
                paths.append(path)
            characters[name] = dataclasses.replace(characters[name], images=tuple(paths))
        return dataclasses.replace(self, characters=characters)

    # -- use ---------------------------------------------------------------------------------
    def character_descriptions(self) -> dict[str, str]:
        """Name -> description, as the pipeline takes them."""
        return {name: character.description for name, character in self.characters.items()}

    def character_images(self) -> dict[str, list[Path]]:
        """Name -> picture files, for the characters the story gives pictures of (the pipeline's character_images)."""
        return {name: list(c.images) for name, c in self.characters.items() if c.images}

    def styled_prompts(self) -> list[tuple[str, str]]:
        """(prompt, negative prompt) per panel, with the story's style and negative prompt applied."""
        return [apply_style(self.settings.style, p.prompt, self.settings.negative_prompt) for p in self.panels]

    def to_frames(self) -> list[Frame]:
        """The pipeline frames, styled, each carrying its negative prompt."""
        return [
            Frame(prompt=prompt, characters=panel.characters, negative_prompt=negative, regions=panel.regions)
            for panel, (prompt, negative) in zip(self.panels, self.styled_prompts())
        ]


def _override_sources(names: Collection[str]) -> dict[str, str]:
    """Where settings given as overrides come from: the command line's option for each (`--id-length`)."""
    return {name: "--" + name.replace("_", "-") for name in names}


def _did_you_mean(word: str, choices: Any) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


# --------------------------------------------------------------------------------------------
# Text-box syntax


def _same_line(number: int) -> int:
    return number


def _text_lines(text: Any, where: _Where) -> list[tuple[int, str]]:
    """(1-based line number, stripped line) of the lines that are neither blank nor `//` comments."""
    if not isinstance(text, str):
        raise where.error(f"expected text, got {type(text).__name__} {_show(text)}")
    lines = ((number, raw.strip()) for number, raw in enumerate(_LINE_BREAK.split(text), start=1))
    return [(number, line) for number, line in lines if line and not line.startswith(COMMENT_PREFIX)]


def _check_name(raw: str, where: _Where) -> str:
    name = " ".join(raw.split())
    if not name:
        raise where.error("the character name is empty; write `[Name] description`")
    if not all(c.isalnum() or c in " _-" for c in name):
        raise where.error(f"character name {name!r} may only use letters, digits, spaces, '_' and '-'")
    if name.upper() == NO_CHARACTER:
        raise where.error(f"[{name}] is reserved for frames without character; choose another name")
    return name


def _character(name: Any, description: Any, where: _Where) -> Character:
    if not isinstance(name, str):
        raise where.error(f"a character name is text, got {_show(name)}; quote it")
    name = _check_name(name, where)
    if not isinstance(description, str) or not description.strip():
        raise where.error(f"character [{name}] needs a description (text such as 'a man with red hair')")
    return Character(name, " ".join(description.split()), where.line, where.source, where.field)


def _parse_character_line(line: str, where: _Where) -> Character:
    match = _CHARACTER_LINE.fullmatch(line)
    if match is None:
        raise where.error(f"a character line is `[Name] description`, got {_show(line)}")
    return _character(match.group(1), match.group(2), where)


def _add_character(characters: dict[str, Character], character: Character, where: _Where) -> None:
    if character.name in characters:
        first = characters[character.name]
        at = f" (line {first.line})" if first.line is not None else ""
        raise where.error(f"character [{character.name}] is defined twice{at}; give each character one line")
    characters[character.name] = character


def _parse_characters_text(text: Any, where: _Where, line_of: Callable[[int], int | None]) -> dict[str, Character]:
    characters: dict[str, Character] = {}
    for number, line in _text_lines(text, where):
        at = _Where(where.source, line_of(number), where.field)
        _add_character(characters, _parse_character_line(line, at), at)
    return characters


def _panel(
    index: int, text: str, body: str, caption: str | None, characters: Mapping[str, Character], where: _Where
) -> Panel:
    """A panel from the frame's prompt text `body` (tags, no #caption); caption None: made from the body."""
    try:
        parsed = parse_frame_body(text, body, caption, {name: c.description for name, c in characters.items()})
    except FrameSyntaxError as error:
        raise where.error(str(error)) from None
    return Panel(index, text, parsed.prompt, parsed.characters, parsed.caption, where.line, where.source)


def _regions(value: Any, panel: Panel, source: str, nodes: Any, index: int) -> dict[str, Box]:
    """A frame's `regions:` mapping (character -> [x0, y0, x1, y1]), checked against the characters it names."""
    where = _Where(source, nodes.item_line("frames", index), f"frames[{index}].regions")
    if not isinstance(value, Mapping) or not value:
        raise where.error(f"regions must map each character the frame names to [x0, y0, x1, y1], got {_show(value)}")
    try:
        return check_regions({str(name): box for name, box in value.items()}, panel.characters)
    except FrameSyntaxError as error:
        raise where.error(f"frame {index + 1}: {error}") from None


def _parse_frame_line(index: int, line: str, characters: Mapping[str, Character], where: _Where) -> Panel:
    body, sep, caption = line.rpartition("#")
    if not sep:
        return _panel(index, line, line, None, characters, where)
    return _panel(index, line, body, caption, characters, where)


def _parse_frames_text(
    text: Any, characters: Mapping[str, Character], where: _Where, line_of: Callable[[int], int | None]
) -> list[Panel]:
    return [
        _parse_frame_line(i, line, characters, _Where(where.source, line_of(number), where.field))
        for i, (number, line) in enumerate(_text_lines(text, where))
    ]


# --------------------------------------------------------------------------------------------
# Story files


def _load_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise StoryFormatError(f"JSON syntax error: {error.msg} (column {error.colno})", source, error.lineno) from None
    except (ValueError, RecursionError) as error:
        raise StoryFormatError(f"cannot read the JSON: {error}", source) from None


def _load_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """(data, root node) of a YAML document; the nodes carry line numbers."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else None
        message = f"YAML syntax error: {error.problem or error.context}"
        if error.problem and error.context:
            message += f" ({error.context})"
        marks = [m for m in (error.problem_mark, error.context_mark) if m is not None]
        lines = _LINE_BREAK.split(text)
        if any(m.line < len(lines) and re.match(r"\s*-\s*\[", lines[m.line]) for m in marks):
            message += '; quote frame lines that start with a tag: - "[Bob] at home"'
        raise StoryFormatError(message, source, line) from None
    except yaml.reader.ReaderError as error:
        line = text[: error.position].count("\n") + 1 if isinstance(error.position, int) else None
        raise StoryFormatError(
            f"the file holds a character YAML does not allow ({error.reason})", source, line
        ) from None
    except Exception as error:  # e.g. `!!int abc`, nesting too deep: any YAML the reader chokes on
        raise StoryFormatError(f"cannot read the YAML: {type(error).__name__}: {error}", source) from None
    finally:
        if loader is not None:
            loader.dispose()


class _Nodes:
    """Line numbers of a story file's parts, from its YAML nodes (None everywhere for `from_dict`)."""

    def __init__(self, root: yaml.Node | None, source: str) -> None:
        self.source = source
        self.root = root
        self.keys: dict[Any, tuple[yaml.Node, yaml.Node]] = {}
        if isinstance(root, yaml.MappingNode):
            self.keys = self._pairs(root, "")

    def _pairs(self, node: yaml.MappingNode, prefix: str) -> dict[Any, tuple[yaml.Node, yaml.Node]]:
        """Scalar key -> (key node, value node); a key given twice is an error (YAML would keep the last)."""
        pairs: dict[Any, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            if key.value in pairs:
                first = pairs[key.value][0].start_mark.line + 1
                raise StoryFormatError(
                    f"{key.value!r} is given twice (first on line {first}); keep one",
                    self.source,
                    key.start_mark.line + 1,
                    prefix + str(key.value),
                )
            pairs[key.value] = (key, value)
        return pairs

    def top_line(self) -> int | None:
        return self.root.start_mark.line + 1 if self.root is not None else None

    def key_line(self, key: Any) -> int | None:
        pair = self.keys.get(str(key))
        return pair[0].start_mark.line + 1 if pair else None

    def value(self, key: str) -> yaml.Node | None:
        pair = self.keys.get(key)
        return pair[1] if pair else None

    def item_line(self, key: str, index: int) -> int | None:
        node = self.value(key)
        if isinstance(node, yaml.SequenceNode) and index < len(node.value):
            return node.value[index].start_mark.line + 1
        return self.key_line(key)

    def subkey_line(self, key: str, subkey: str) -> int | None:
        node = self.value(key)
        if isinstance(node, yaml.MappingNode):
            pair = self._pairs(node, f"{key}.").get(subkey)
            if pair:
                return pair[0].start_mark.line + 1
        return self.key_line(key)

    def text_line_of(self, key: str) -> Callable[[int], int | None]:
        """Line of the k-th line of a text value: exact for a `|` block, else the value's first line."""
        node = self.value(key)
        if node is None:
            return lambda number: None
        first = node.start_mark.line + 1
        if isinstance(node, yaml.ScalarNode) and node.style == "|":
            return lambda number: first + number
        return lambda number: first


def _settings_from_mapping(data: Mapping[str, Any], nodes: _Nodes) -> StorySettings:
    values: dict[str, Any] = {}
    for key in SETTING_KEYS:
        if key not in data or key == "size":
            continue
        try:
            values[key] = _check_setting(key, data[key])
        except _Invalid as error:
            raise StoryFormatError(str(error), nodes.source, nodes.key_line(key), key) from None
    if "size" in data:
        where = _Where(nodes.source, nodes.key_line("size"), "size")
        if "width" in data or "height" in data:
            raise where.error("give either size or width/height, not both")
        values["width"], values["height"] = _size(data["size"], where)
    return StorySettings(**values)


def _size(value: Any, where: _Where) -> tuple[int, int]:
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match:
        value = [int(match.group(1)), int(match.group(2))]
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise where.error(f"size is 'WxH' (e.g. 1024x768) or [W, H], got {_show(value)}")
    try:
        return _side("width", value[0]), _side("height", value[1])
    except _Invalid as error:
        raise where.error(f"size {_show(value)}: {error}") from None


def _characters_from_value(value: Any, nodes: _Nodes) -> dict[str, Character]:
    source = nodes.source
    if value is None:
        return {}
    if isinstance(value, str):
        return _parse_characters_text(
            value, _Where(source, nodes.key_line("characters"), "characters"), nodes.text_line_of("characters")
        )
    characters: dict[str, Character] = {}
    if isinstance(value, Mapping):
        for name, description in value.items():
            where = _Where(source, nodes.subkey_line("characters", str(name)), f"characters.{name}")
            if isinstance(description, Mapping):  # {description: ..., images: [...]}
                _check_keys(description, ("description", "images"), ("description",), where)
                character = _character(name, description["description"], where)
                character = _with_images(character, description.get("images"), source, where)
            else:
                character = _character(name, description, where)
            _add_character(characters, character, where)
        return characters
    if isinstance(value, list):
        for i, item in enumerate(value):
            where = _Where(source, nodes.item_line("characters", i), f"characters[{i}]")
            if isinstance(item, str):
                character = _parse_character_line(item.strip(), where)
            elif isinstance(item, Mapping):
                _check_keys(item, ("name", "description", "images"), ("name", "description"), where)
                character = _character(item["name"], item["description"], where)
                character = _with_images(character, item.get("images"), source, where)
            else:
                raise where.error(f"a character is `name: ..., description: ...`, got {_show(item)}")
            _add_character(characters, character, where)
        return characters
    raise StoryFormatError(
        f"characters is a mapping name -> description, got {type(value).__name__} {_show(value)}",
        source,
        nodes.key_line("characters"),
        "characters",
    )


def _with_images(character: Character, value: Any, source: str, where: _Where) -> Character:
    """The character with its `images:` (a path or a list of paths, relative to the story file), each checked."""
    if value is None:
        return character
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(item, str) and item.strip() for item in items):
        raise where.error(f"images is a picture file or a list of them (e.g. [mia.png]), got {_show(value)}")
    folder = Path(source).parent if Path(source).suffix.lower() in STORY_SUFFIXES else Path.cwd()
    paths = []
    for item in items:
        path = (folder / item).expanduser()
        if not path.is_file():
            raise where.error(f"picture {item!r} of [{character.name}] does not exist (looked for {path})")
        paths.append(path)
    return dataclasses.replace(character, images=tuple(paths))


def _check_keys(item: Mapping[Any, Any], allowed: tuple[str, ...], required: tuple[str, ...], where: _Where) -> None:
    for key in item:
        if key not in allowed:
            hint = _did_you_mean(str(key), allowed)
            raise where.error(f"unknown key {_show(key)}{hint}; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in item:
            raise where.error(f"missing {key!r}")


def _panels_from_value(value: Any, characters: Mapping[str, Character], nodes: _Nodes) -> list[Panel]:
    source = nodes.source
    if isinstance(value, str):
        where = _Where(source, nodes.key_line("frames"), "frames")
        return _parse_frames_text(value, characters, where, nodes.text_line_of("frames"))
    if not isinstance(value, list):
        raise StoryFormatError(
            f"frames is a list of frame lines, got {type(value).__name__} {_show(value)}",
            source,
            nodes.key_line("frames"),
            "frames",
        )
    panels = []
    for i, item in enumerate(value):
        where = _Where(source, nodes.item_line("frames", i), f"frames[{i}]")
        if isinstance(item, str):
            line = item.strip()
            if not line or line.startswith(COMMENT_PREFIX):
                raise where.error("the frame is empty (or a // comment); remove it or use a YAML # comment")
            panels.append(_parse_frame_line(i, line, characters, where))
        elif isinstance(item, Mapping):
            _check_keys(item, ("prompt", "caption", "regions"), ("prompt",), where)
            prompt, caption = item["prompt"], item.get("caption")
            if not isinstance(prompt, str):
                raise where.error(f"prompt must be text, got {_show(prompt)}")
            if caption is not None and not isinstance(caption, str):
                raise where.error(f"caption must be text, got {_show(caption)}")
            panel = _panel(i, prompt.strip(), prompt, caption, characters, where)
            if "regions" in item:
                panel = dataclasses.replace(panel, regions=_regions(item["regions"], panel, source, nodes, i))
            panels.append(panel)
        else:
            hint = '; quote lines that start with a tag: - "[Bob] at home"' if isinstance(item, list) else ""
            raise where.error(f"a frame is a frame line or {{prompt, caption}}, got {_show(item)}{hint}")
    return panels
