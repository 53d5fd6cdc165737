"""The story format (text boxes, YAML/JSON files) and the styles. Pure Python: no model is built."""

import json
import pickle

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storydiffusion.errors import StoryDiffusionError
from storydiffusion.story.format import Story, StoryFormatError, StorySettings
from storydiffusion.story.styles import (
    DEFAULT_STYLE,
    STYLES,
    Style,
    apply_style,
    combine_negatives,
    get_style,
    style_names,
)

CHARACTERS = """\
// the cast
[Bob] a man with red hair, black suit

[Ann] a woman with a green hat
"""
FRAMES = """\
[Bob] wakes up at home # Monday.
[Bob] on a bus
// a comment line

[Ann] reads a book
[Ann] in the rain #
[Bob] and [Ann] dance in the park
[NC] an empty street at night # Later...
"""
BOB = "a man with red hair, black suit"
ANN = "a woman with a green hat"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def story(characters=CHARACTERS, frames=FRAMES, **overrides):
    return Story.from_text(characters, frames, StorySettings(**({"id_length": 2} | overrides)))


def error_of(call, *args, **kwargs) -> StoryFormatError:
    with pytest.raises(StoryFormatError) as info:
        call(*args, **kwargs)
    return info.value


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Text boxes


def test_text_boxes_substitute_tags_and_read_captions():
    s = story()
    assert s.character_descriptions() == {"Bob": BOB, "Ann": ANN}
    assert [c.line for c in s.characters.values()] == [2, 4]  # comment and blank lines are counted
    assert [p.prompt for p in s.panels] == [
        f"{BOB} wakes up at home",
        f"{BOB} on a bus",
        f"{ANN} reads a book",
        f"{ANN} in the rain",
        f"{BOB} and {ANN} dance in the park",
        "an empty street at night",
    ]
    assert [p.caption for p in s.panels] == [
        "Monday.",  # after the last #
        "Bob on a bus",  # no #: the line with names for tags
        "Ann reads a book",
        "",  # '#' and nothing after it: no caption
        "Bob and Ann dance in the park",
        "Later...",
    ]
    assert [p.characters for p in s.panels] == [("Bob",), ("Bob",), ("Ann",), ("Ann",), ("Bob", "Ann"), ()]
    assert [p.line for p in s.panels] == [1, 2, 5, 6, 7, 8]
    assert [p.index for p in s.panels] == list(range(6))
    assert s.panels[0].text == "[Bob] wakes up at home # Monday."
    assert s.source == "<frames>"


def test_frame_details():
    s = story("[Bob] a man\n[Ann]   a   woman  ", "[Bob] at #1 home # The end\n[Bob][Bob] twice\n[Ann] a\n[Ann] b\n")
    assert s.characters["Ann"].description == "a woman"
    first, twice = s.panels[:2]
    assert (first.prompt, first.caption) == ("a man at #1 home", "The end")  # the last # splits
    assert twice.characters == ("Bob",) and twice.prompt == "a mana man twice"  # tags are replaced in place


def test_nc_tag_is_dropped_with_its_comma():
    s = story("", "[NC], a city at night\nrain [NC]")
    assert [p.prompt for p in s.panels] == ["a city at night", "rain"]
    assert [p.characters for p in s.panels] == [(), ()]


def test_any_number_of_characters():
    names = [f"Hero {i}" for i in range(6)]
    characters = "\n".join(f"[{n}] person number {i}" for i, n in enumerate(names))
    frames = "\n".join(f"[{n}] alone" for n in names) + "\n" + " and ".join(f"[{n}]" for n in names) + " together"
    s = Story.from_text(characters, frames, StorySettings(id_length=1))
    assert s.panels[-1].characters == tuple(names)
    assert s.panels[-1].prompt.startswith("person number 0 and person number 1")


def test_windows_line_endings_and_name_characters():
    s = Story.from_text(
        "[Mary-Jane_2] x\r\n[Big Bob] y\r\n",
        "[Mary-Jane_2] a\r\n[Big Bob] b\r\n[ Big  Bob ] c",
        StorySettings(id_length=1),
    )
    assert list(s.characters) == ["Mary-Jane_2", "Big Bob"]
    assert s.panels[2].characters == ("Big Bob",) and s.panels[2].line == 3
    with pytest.raises(StoryFormatError):  # default id_length=3: Mary-Jane_2 has one solo frame
        Story.from_text("[A] x", "[A] y")


def test_panels_match_the_pipelines_own_parser():
    pipeline = pytest.importorskip("storydiffusion.pipelines.story_pipeline")
    s = story()
    for panel in s.panels:
        if "#" not in panel.text:
            assert panel.to_frame() == pipeline.parse_frame(panel.text, s.character_descriptions())
    frames = story(style="Comic book", negative_prompt="blurry").to_frames()
    assert frames[0].prompt.startswith(f"comic {BOB} wakes up at home")
    assert frames[0].negative_prompt.endswith("blurry") and frames[4].characters == ("Bob", "Ann")


@pytest.mark.parametrize(
    ("characters", "frames", "source", "line", "needle"),
    [
        ("[Bob] x\n[Bob] y", "[NC] a", "<characters>", 2, "[Bob] is defined twice (line 1)"),
        ("[NC] nobody", "[NC] a", "<characters>", 1, "reserved"),
        ("[nc] nobody", "[NC] a", "<characters>", 1, "reserved"),
        ("\nBob a man", "[NC] a", "<characters>", 2, "`[Name] description`"),
        ("[Bob]", "[NC] a", "<characters>", 1, "needs a description"),
        ("[] a man", "[NC] a", "<characters>", 1, "name is empty"),
        ("[Bob!] a man", "[NC] a", "<characters>", 1, "letters, digits"),
        ("[Bob] x\n[Ann] y", "[NC] a\n[Eve] waves", "<frames>", 2, "unknown character [Eve]; known: [Bob], [Ann]"),
        ("[Bob] x", "[bob] waves", "<frames>", 1, "did you mean [Bob]?"),
        ("", "[Bob] waves", "<frames>", 1, "no characters are defined"),
        ("[Bob] x", "[NC] a\n\n[NC]  # caption only", "<frames>", 3, "no prompt text"),
        ("[Bob] x", "[NC] , # caption", "<frames>", 1, "no prompt text"),
        ("[Bob] x", "[Bob waves", "<frames>", 1, "unclosed '['"),
        ("[Bob] x", "[Bob [Bob] waves", "<frames>", 1, "unclosed '['"),
        ("[Bob] x", "Bob] waves", "<frames>", 1, "stray ']'"),
        ("[Bob] x", "[ ] waves", "<frames>", 1, "empty tag"),
        ("[Bob] x", "// only a comment\n\n", "<frames>", None, "no frames"),
    ],
)
def test_text_box_errors_name_source_and_line(characters, frames, source, line, needle):
    error = error_of(Story.from_text, characters, frames, StorySettings(id_length=1))
    assert (error.source, error.line) == (source, line)
    assert needle in str(error)
    assert str(error).startswith(source + (f", line {line}: " if line else ": "))
    assert isinstance(error, StoryDiffusionError) and isinstance(error, ValueError)


def test_error_sources_can_be_renamed():
    error = error_of(Story.from_text, "[Bob] x", "[Eve] y", None, "cast.txt", "story.txt")
    assert str(error).startswith("story.txt, line 1: ")


def test_error_message_format_and_pickling():
    error = StoryFormatError("frame names unknown character [Eve]", "story.yaml", 12, "frames[3]")
    assert str(error) == "story.yaml, line 12, field 'frames[3]': frame names unknown character [Eve]"
    again = pickle.loads(pickle.dumps(error))
    assert (str(again), again.line, again.field) == (str(error), 12, "frames[3]")
    assert str(StoryFormatError("plain")) == "plain"


# --------------------------------------------------------------------------------------------
# Reference frames


def test_validate_references_names_the_character_and_its_line():
    error = error_of(story, id_length=3)
    assert (error.source, error.line) == ("<characters>", 2)
    assert "[Bob] needs id_length=3" in str(error) and "found 2 (<frames> lines 1, 2)" in str(error)


def test_frames_with_several_characters_are_not_references():
    error = error_of(
        Story.from_text, "[Bob] x\n[Ann] y", "[Bob] a\n[Bob] b\n[Bob] and [Ann]", StorySettings(id_length=1)
    )
    assert error.line == 2 and "[Ann]" in str(error) and "found 0" in str(error)


def test_validate_references_takes_an_id_length():
    s = story()
    s.validate_references(1)
    s.validate_references(2)
    with pytest.raises(StoryFormatError, match="id_length=3"):
        s.validate_references(3)
    with pytest.raises(StoryFormatError, match="id_length"):
        s.validate_references(0)
    unused = Story.from_text("[Bob] x\n[Ann] y", "[NC] a city")  # characters never named need nothing
    assert unused.panels[0].characters == ()


# --------------------------------------------------------------------------------------------
# Settings


def test_settings_defaults_and_normalisation():
    s = StorySettings()
    assert (s.style, s.seed, s.steps, s.guidance, s.id_length, s.rate, s.negative_prompt, s.model) == (
        "No style", 0, 50, 5.0, 3, 0.5, "", None
    )  # fmt: skip
    s = StorySettings(style="film noir", guidance=1, rate={"4": 1, 2: 0.25}, negative_prompt=None, width=512)
    assert (s.style, s.guidance, s.rate, s.negative_prompt, s.width) == ("Film Noir", 1.0, {2: 0.25, 4: 1.0}, "", 512)
    assert isinstance(s.guidance, float)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("style", "Watercolor"),
        ("style", 3),
        ("seed", -1),
        ("seed", 1.5),
        ("seed", True),
        ("steps", 0),
        ("steps", "many"),
        ("guidance", -0.5),
        ("guidance", float("nan")),
        ("width", 500),
        ("height", 0),
        ("id_length", 0),
        ("rate", 1.5),
        ("rate", {2: -0.1}),
        ("rate", {"x": 0.5}),
        ("rate", {}),
        ("negative_prompt", 3),
        ("model", ""),
    ],
)
def test_bad_settings_name_the_field(name, value):
    error = error_of(StorySettings, **{name: value})
    assert error.field == name and error.source == "<settings>"
    assert "got" in str(error) or "choose one of" in str(error)


# --------------------------------------------------------------------------------------------
# Story files

STORY_YAML = """\
# a story file
characters:
  Bob: a man with red hair, black suit
  Ann: a woman with a green hat
frames:
  - "[Bob] wakes up at home # Monday."
  - "[Bob] on a bus"
  - prompt: "[Ann] reads a book"
    caption: Quiet.
  - prompt: "[Ann] in the # rain"
  - "[Bob] and [Ann] dance"
style: comic book
seed: 7
steps: 30
guidance: 7.5
size: 1024x768
id_length: 2
rate: {2: 0.5, 4: 0.25}
negative_prompt: blurry, photograph
model: stabilityai/stable-diffusion-xl-base-1.0
"""


def test_yaml_file_reads_frames_and_settings(tmp_path):
    s = Story.from_file(write(tmp_path, "story.yaml", STORY_YAML))
    assert s.source.endswith("story.yaml")
    assert s.character_descriptions() == {"Bob": BOB, "Ann": ANN}
    assert [c.line for c in s.characters.values()] == [3, 4]
    assert [p.line for p in s.panels] == [6, 7, 8, 10, 11]
    assert [p.caption for p in s.panels] == [
        "Monday.",
        "Bob on a bus",
        "Quiet.",
        "Ann in the # rain",
        "Bob and Ann dance",
    ]
    assert s.panels[3].prompt == f"{ANN} in the # rain"  # a mapping's prompt has no #caption part
    assert s.settings == StorySettings(
        style="Comic book",
        seed=7,
        steps=30,
        guidance=7.5,
        width=1024,
        height=768,
        id_length=2,
        rate={2: 0.5, 4: 0.25},
        negative_prompt="blurry, photograph",
        model="stabilityai/stable-diffusion-xl-base-1.0",
    )
    prompt, negative = s.styled_prompts()[1]
    assert prompt.startswith(f"comic {BOB} on a bus")
    assert negative.count("photograph") == 1 and negative.endswith("blurry")


def test_a_story_records_which_settings_its_author_gave_and_where(tmp_path):
    """What a saved character's settings may fill in (`runner.with_character_settings`): only settings not given."""
    path = write(tmp_path, "story.yaml", STORY_YAML)
    s = Story.from_file(path, {"steps": 50, "same_initial_noise": False})  # both equal to the defaults, yet given
    where = s.given_settings()
    assert where["seed"] == f"{path} line 13" and where["width"] == where["height"] == f"{path} line 16"
    assert where["steps"] == "--steps" and where["same_initial_noise"] == "--same-initial-noise"
    assert "regional_prompts" not in where
    unset = Story.from_file(write(tmp_path, "bare.yaml", "frames:\n  - '[NC] a street'\n"))
    assert unset.given_settings() == {}
    boxes = Story.from_text(CHARACTERS, FRAMES, StorySettings(id_length=2, steps=50), given=["id_length", "steps"])
    assert boxes.given_settings() == {"id_length": "--id-length", "steps": "--steps"}
    # built without the record: the settings that differ from the defaults count as given
    assert story(guidance=5.0, rate=0.25).given_settings() == {"id_length": "given", "rate": "given"}


def test_json_file_is_the_same_story(tmp_path):
    data = {
        "characters": {"Bob": BOB},
        "frames": ["[Bob] a", "[Bob] b", "[NC] c"],
        "size": [512, 768],
        "seed": 3,
        "id_length": 2,
    }
    path = write(tmp_path, "story.json", json.dumps(data, indent=2))
    s = Story.from_file(path)
    assert (s.settings.width, s.settings.height, s.settings.seed) == (512, 768, 3)
    assert s.panels[2].line == 8
    data["frames"][1] = "[Eve] b"
    error = error_of(Story.from_file, write(tmp_path, "bad.json", json.dumps(data, indent=2)))
    assert (error.line, error.field) == (7, "frames[1]")
    error = error_of(Story.from_file, write(tmp_path, "broken.json", '{"frames": ["[NC] a",]}'))
    assert error.line == 1 and "JSON syntax error" in str(error)


def test_text_blocks_and_list_forms_in_yaml(tmp_path):
    text = """\
characters: |
  [Bob] a man

  [Ann] a woman
frames: |
  [Bob] a
  // not a frame
  [Bob] b
  [Ann] c
  [Ann] d
id_length: 2
"""
    s = Story.from_file(write(tmp_path, "blocks.yml", text))
    assert [c.line for c in s.characters.values()] == [2, 4]
    assert [p.line for p in s.panels] == [6, 8, 9, 10]
    error = error_of(Story.from_file, write(tmp_path, "blocks2.yml", text.replace("[Ann] d", "[Ann] [Zed]")))
    assert (error.line, error.field) == (10, "frames") and "[Zed]" in str(error)
    listed = "characters:\n  - {name: Bob, description: a man}\n  - '[Ann] a woman'\nframes: ['[Bob] x', '[Ann] y']\n"
    s = Story.from_file(write(tmp_path, "list.yaml", listed + "id_length: 1\n"))
    assert s.character_descriptions() == {"Bob": "a man", "Ann": "a woman"}


@pytest.mark.parametrize(
    ("size", "expected"),
    [("512x768", (512, 768)), ("'1024 X 1024'", (1024, 1024)), ("[640, 448]", (640, 448))],
)
def test_size_forms(tmp_path, size, expected):
    s = Story.from_file(write(tmp_path, "s.yaml", f"frames: ['[NC] a']\nsize: {size}\n"))
    assert (s.settings.width, s.settings.height) == expected
    s = Story.from_dict({"frames": ["[NC] a"], "width": 256, "height": 128})
    assert (s.settings.width, s.settings.height) == (256, 128)


BAD_FILES = [
    ("characters:\n  Bob: x\nframes:\n  - '[NC] a'\n  - '[Eve] b'\n", 5, "frames[1]", "unknown character [Eve]"),
    ("frames:\n  - '[NC] a'\n  - ''\n", 3, "frames[1]", "frame is empty"),
    ("frames:\n  - '[NC] a'\n  - '[NC]'\n", 3, "frames[1]", "no prompt text"),
    ("frames: ['[NC] a']\nsteps: many\n", 2, "steps", "steps must be a whole number >= 1, got 'many'"),
    ("frames: ['[NC] a']\n\nguidance: -1\n", 3, "guidance", "got -1"),
    ("frames: ['[NC] a']\nstyle: Watercolour\n", 2, "style", "'Japanese Anime'"),
    ("frames: ['[NC] a']\nsize: big\n", 2, "size", "'WxH'"),
    ("frames: ['[NC] a']\nsize: 100x100\n", 2, "size", "multiple of 8"),
    ("frames: ['[NC] a']\nsize: 64x64\nwidth: 64\n", 2, "size", "not both"),
    ("frames: ['[NC] a']\nrate: {2: 2}\n", 2, "rate", "from 0 to 1"),
    ("frames: ['[NC] a']\nstepz: 3\n", 2, "stepz", "did you mean 'steps'?"),
    ("frames: ['[NC] a']\nsteps: 3\nsteps: 4\n", 3, "steps", "given twice"),
    ("frames: 3\n", 1, "frames", "frames is a list"),
    ("frames:\n  - [Bob]\n", 2, "frames[0]", "quote lines"),
    ("frames:\n  - {prompt: '[NC] a', captoin: x}\n", 2, "frames[0]", "did you mean 'caption'?"),
    ("characters: [1, 2]\nframes: ['[NC] a']\n", 1, "characters[0]", "a character is"),
    ("characters:\n  Bob: x\n  Bob: y\nframes: ['[NC] a']\n", 3, "characters.Bob", "given twice"),
    ("characters:\n  Bob:\nframes: ['[NC] a']\n", 2, "characters.Bob", "needs a description"),
    ("characters:\n  Bob: x\nframes: ['[Bob] a']\nid_length: 3\n", 2, "characters.Bob", "needs id_length=3"),
    ("characters: {Bob: x}\n", 1, None, "missing `frames`"),
]


@pytest.mark.parametrize(("text", "line", "field", "needle"), BAD_FILES)
def test_file_errors_name_file_line_and_field(tmp_path, text, line, field, needle):
    error = error_of(Story.from_file, write(tmp_path, "story.yaml", text))
    assert error.source.endswith("story.yaml")
    assert (error.line, error.field) == (line, field), str(error)
    assert needle in str(error)


def test_yaml_syntax_errors(tmp_path):
    error = error_of(Story.from_file, write(tmp_path, "a.yaml", "frames:\n  - [Bob] at home\n"))
    assert error.line == 2 and "YAML syntax error" in str(error) and "quote frame lines" in str(error)
    error = error_of(Story.from_file, write(tmp_path, "b.yaml", "frames: ['[NC] a'\nseed: 1\n"))
    assert error.line is not None and "YAML syntax error" in str(error)
    for text in ("frames: !!int abc\n", "frames: !!python/object:os.system x\n", "a: \x01\n", "---\na: 1\n---\nb: 2\n"):
        assert error_of(Story.from_file, write(tmp_path, "c.yaml", text)).source.endswith("c.yaml")


def test_file_level_errors(tmp_path):
    assert "ends in .yaml" in str(error_of(Story.from_file, write(tmp_path, "story.txt", "frames: []")))
    assert "cannot read" in str(error_of(Story.from_file, tmp_path / "missing.yaml"))
    (tmp_path / "latin1.yaml").write_bytes(b"frames:\n  - caf\xe9\n")
    error = error_of(Story.from_file, tmp_path / "latin1.yaml")
    assert error.line == 2 and "UTF-8" in str(error)
    assert "empty" in str(error_of(Story.from_file, write(tmp_path, "empty.yaml", "# nothing\n")))
    assert "mapping" in str(error_of(Story.from_file, write(tmp_path, "list.yaml", "- a\n- b\n")))
    assert "no frames" in str(error_of(Story.from_file, write(tmp_path, "none.yaml", "frames: []\n")))


def test_from_dict_has_fields_but_no_lines():
    s = Story.from_dict({"characters": {"Bob": "x"}, "frames": ["[Bob] a"], "id_length": 1}, source="api")
    assert s.source == "api" and s.panels[0].line is None
    error = error_of(Story.from_dict, {"characters": {"Bob": "x"}, "frames": ["[Bob] a", "[Al] b"], "id_length": 1})
    assert (error.source, error.line, error.field) == ("<dict>", None, "frames[1]")
    unset = Story.from_dict({"characters": {"Bob": "x"}, "frames": ["[Bob] a"]})  # id_length: the model's
    assert "frames 0" in str(error_of(unset.validate))


# --------------------------------------------------------------------------------------------
# Styles

NINE = [
    "No style", "Japanese Anime", "Digital/Oil Painting", "Pixar/Disney Character", "Photographic", "Comic book",
    "Line art", "Film Noir", "Isometric Rooms",
]  # fmt: skip


def test_the_nine_styles():
    assert style_names() == NINE == list(STYLES) and DEFAULT_STYLE == "No style"
    with pytest.raises(TypeError):
        STYLES["Mine"] = Style("Mine", "{prompt}")  # read-only
    for style in STYLES.values():
        assert style.template.count("{prompt}") == 1
        assert len(style.template.replace("{prompt}", "").split()) <= 20  # leaves CLIP room for the frame
    assert apply_style("No style", "a cat", "") == ("a cat", "")


def test_apply_style_inserts_the_prompt():
    for name in NINE:
        prompt, negative = apply_style(name, "a man {with} braces", "smudged")
        assert "a man {with} braces" in prompt and negative.endswith("smudged")
    assert apply_style("Photographic", "a cat")[0].startswith("cinematic photo of a cat")
    assert "drawing" in apply_style("Photographic", "a cat")[1]


def test_negatives_are_combined_once():
    style_negative = STYLES["Comic book"].negative
    _, negative = apply_style("Comic book", "x", "Photograph,  blurry , deformed,, blurry")
    assert negative == style_negative + ", blurry"
    assert combine_negatives("", "a, b", "", "B, c") == "a, b, c"
    assert apply_style("Line art", "x", "")[1] == STYLES["Line art"].negative


def test_unknown_style_lists_valid_names_and_matching_ignores_case():
    assert get_style("comic BOOK").name == "Comic book"
    assert get_style("  isometric   rooms ").name == "Isometric Rooms"
    assert get_style("(No style)").name == "No style"  # the public demo's key
    with pytest.raises(StoryDiffusionError) as info:
        get_style("Watercolour")
    assert all(repr(name) in str(info.value) for name in NINE)
    with pytest.raises(StoryDiffusionError):
        Style("Bad", "no slot")


# --------------------------------------------------------------------------------------------
# Fuzz: any input parses or raises StoryFormatError, nothing else

TRICKY = st.lists(st.sampled_from([*"[]#/\n\r\t ,-_:|{}'\"", "Bob", "Ann", "NC", "x", "é", "\x00"])).map("".join)
WORDS = st.text(alphabet=" ab,#/-", max_size=8)
NAMES = st.sampled_from(["Bob", "Ann", "Bob", "Ann", "NC", "nc", "Eve", "", " Bob ", "B-2", "a#b", "[x"])
CHARACTER_LINES = st.lists(
    st.builds("[{}] {}".format, NAMES, WORDS) | st.builds("[{}] a{}".format, NAMES, WORDS) | TRICKY, max_size=5
).map("\n".join)
FRAME_LINE = st.builds("{}[{}]{}{}".format, WORDS, NAMES, WORDS, st.sampled_from(["", "#", "# cap", "]"]))
FRAME_LINES = st.lists(FRAME_LINE | TRICKY, max_size=6).map("\n".join)


def check_story(s: Story) -> None:
    assert s.panels
    for panel in s.panels:
        assert panel.prompt and set(panel.characters) <= set(s.characters)
    for prompt, _ in s.styled_prompts():
        assert prompt


@FUZZ
@given(
    st.one_of(st.text(), TRICKY, CHARACTER_LINES, st.just(CHARACTERS)),
    st.one_of(st.text(), TRICKY, FRAME_LINES),
    st.integers(1, 3),
)
def test_fuzz_text_boxes(characters, frames, id_length):
    try:
        s = Story.from_text(characters, frames, StorySettings(id_length=id_length))
    except StoryFormatError as error:
        assert str(error)
    else:
        check_story(s)


YAMLISH = st.lists(
    st.sampled_from(
        [*":-[]{}#'\"|>&*!%@`,?\n \t", "frames", "characters", "Bob", "NC", "seed", "size", "1", "!!int", "x"]
    )
).map("".join)
SCALARS = st.none() | st.booleans() | st.integers(-10, 2000) | st.floats(-1, 2) | WORDS | NAMES
VALUES = SCALARS | st.lists(SCALARS, max_size=3) | st.dictionaries(NAMES, SCALARS, max_size=3)


def mostly(valid):
    """`valid` nine times in ten, else any value (a wrong type, most likely)."""
    return st.integers(0, 9).flatmap(lambda n: VALUES if n == 0 else valid)


STORY_DATA = st.fixed_dictionaries(
    {"frames": mostly(st.lists(FRAME_LINE, min_size=1, max_size=6) | FRAME_LINES)},
    optional={
        "characters": mostly(st.just({"Bob": "a man", "Ann": "a woman"}) | st.dictionaries(NAMES, WORDS, max_size=3)),
        "id_length": mostly(st.integers(1, 2)),
        "seed": mostly(st.integers(0, 10)),
        "size": mostly(st.sampled_from(["64x64", "64 x 32", [8, 16], "1x1"])),
        "rate": mostly(st.floats(0, 1) | st.dictionaries(st.integers(1, 8), st.floats(0, 1), min_size=1, max_size=2)),
        "style": mostly(st.sampled_from(style_names() + ["line ART", "Watercolour"])),
    },
)
YAML_TEXT = st.one_of(
    st.text(),
    YAMLISH,
    YAMLISH.map("characters: {Bob: a}\nid_length: 1\nframes:\n".__add__),
    STORY_DATA.map(yaml.safe_dump),
    STORY_DATA.map(json.dumps),
)


@FUZZ
@given(YAML_TEXT)
def test_fuzz_story_files(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # lone surrogates: invalid UTF-8, also an error
    try:
        s = Story.from_file(path)
    except StoryFormatError as error:
        assert error.source == str(path)
    else:
        check_story(s)


def test_an_id_length_the_file_does_not_set_is_checked_when_the_story_runs(tmp_path):
    """Without `id_length:` the model chooses it (its recommended settings): the file is read, and
    `validate` (what `run_story` calls once the id_length is known) names the file, line and field."""
    story = Story.from_file(write(tmp_path, "story.yaml", "characters:\n  Bob: x\nframes: ['[Bob] a']\n"))
    error = error_of(story.validate)
    assert error.line == 2 and error.field == "characters.Bob" and "needs id_length=3" in str(error)
