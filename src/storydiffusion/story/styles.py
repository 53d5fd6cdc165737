"""Named styles: a prompt template and a negative prompt, after the nine styles of the public demo.

    apply_style("Comic book", "[Bob's description] at home", "blurry")
    -> ("comic [Bob's description] at home, graphic illustration, comic art, ...",
        "photograph, realistic, stock photo, deformed, glitch, noisy, blurry")

The templates are kept short so that style text plus a typical frame stays inside CLIP's 77 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from storydiffusion.errors import StoryDiffusionError

PROMPT_SLOT = "{prompt}"


@dataclass(frozen=True)
class Style:
    """A prompt template (containing `{prompt}`) and the negative prompt that goes with it."""

    name: str
    template: str
    negative: str = ""

    def __post_init__(self) -> None:
        if self.template.count(PROMPT_SLOT) != 1:
            raise StoryDiffusionError(
                f"style {self.name!r}: template {self.template!r} must contain {PROMPT_SLOT} exactly once"
            )

    def format(self, prompt: str) -> str:
        """The styled prompt (plain replacement: braces in `prompt` are kept as written)."""
        return self.template.replace(PROMPT_SLOT, prompt).strip()


DEFAULT_STYLE = "No style"

_STYLES = (
    Style(DEFAULT_STYLE, PROMPT_SLOT, ""),
    Style(
        "Japanese Anime",
        "anime artwork of {prompt}, made by a Japanese anime studio, expressive, best quality, high resolution",
        "low quality, low resolution, photo, realistic",
    ),
    Style(
        "Digital/Oil Painting",
        "{prompt}, detailed oil painting, visible brush strokes, rich colors, dramatic light, sharp focus",
        "anime, cartoon, photo, text, glitch, deformed, mutated, ugly, disfigured",
    ),
    Style(
        "Pixar/Disney Character",
        "3D animated movie still in Disney Pixar style, {prompt}, vibrant colors, warm light, sense of wonder",
        "lowres, bad anatomy, bad hands, missing fingers, extra digit, text, watermark, worst quality, "
        "low quality, jpeg artifacts, blurry, grayscale, photo",
    ),
    Style(
        "Photographic",
        "cinematic photo of {prompt}, 35mm film photography, realistic, detailed skin, soft light, high detail",
        "drawing, painting, crayon, sketch, graphite, cartoon, anime, deformed, ugly, lowres, bad anatomy, "
        "bad hands, worst quality, low quality, watermark, blurry",
    ),
    Style(
        "Comic book",
        "comic {prompt}, graphic illustration, comic art, graphic novel art, bold ink lines, vibrant",
        "photograph, realistic, stock photo, deformed, glitch, noisy",
    ),
    Style(
        "Line art",
        "line art drawing of {prompt}, clean lines, minimalist, sleek, professional, vector graphics",
        "photorealistic, realistic, photo, 35mm film, anime, shading, blurry, noisy, deformed, ugly, oil, acrylic",
    ),
    Style(
        "Film Noir",
        "film noir style, monochrome, high contrast, {prompt}, dramatic shadows, 1940s, mysterious, cinematic",
        "colorful, vibrant, low contrast, blurry, noisy, deformed, ugly, photorealistic",
    ),
    Style(
        "Isometric Rooms",
        "isometric style room {prompt}, cutaway view, tiny and cute, soft smooth light, soft colors, 3D render",
        "deformed, mutated, ugly, disfigured, blurry, noisy, realistic, photographic",
    ),
)

STYLES: MappingProxyType[str, Style] = MappingProxyType({style.name: style for style in _STYLES})
# other spellings accepted by get_style (lower case): the public demo's key for the plain style
_ALIASES = {"(no style)": DEFAULT_STYLE}


def style_names() -> list[str]:
    """The style names, in the demo's order."""
    return list(STYLES)


def get_style(name: str) -> Style:
    """The style called `name` (case-insensitive)."""
    if isinstance(name, str):
        if name in STYLES:
            return STYLES[name]
        key = " ".join(name.split()).lower()
        for known in STYLES:
            if known.lower() == key:
                return STYLES[known]
        if key in _ALIASES:
            return STYLES[_ALIASES[key]]
    choices = ", ".join(repr(n) for n in STYLES)
    raise StoryDiffusionError(f"unknown style {name!r}; choose one of: {choices}")


def combine_negatives(*parts: str) -> str:
    """Comma-separated phrases of `parts` joined with ", ", each phrase once (case-insensitive), empties skipped."""
    seen: set[str] = set()
    phrases: list[str] = []
    for part in parts:
        for phrase in (part or "").split(","):
            phrase = " ".join(phrase.split())
            if phrase and phrase.lower() not in seen:
                seen.add(phrase.lower())
                phrases.append(phrase)
    return ", ".join(phrases)


def apply_style(name: str, prompt: str, negative_prompt: str = "") -> tuple[str, str]:
    """(styled prompt, style negative + `negative_prompt`) for one frame.

    The user's negative prompt is added once, and phrases it shares with the style's negative are not
    repeated (the public demo appends it once per character).
    """
    style = get_style(name)
    return style.format(prompt), combine_negatives(style.negative, negative_prompt)
