"""Make the docs' picture -> story example with the shipped tiny model (seeded; ~1 minute on a 2-core CPU).

Writes `docs/examples/picture-story/` (a picture of a character from the tiny world, `mia.png`, and a story
file whose character is given by it: run it yourself with
`storydiffusion story docs/examples/picture-story/story.yaml --out mia-story`) and
`docs/images/picture_story.png`: the picture, then the story's frames drawn reading it, and below them the
same frames drawn from the text alone (CSA off).

    python scripts/make_picture_example.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from storydiffusion.app.runner import RunOptions, run_story
from storydiffusion.story.format import Story
from storydiffusion.world import render as world

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "picture-story"
FIGURE = ROOT / "docs" / "images" / "picture_story.png"
SEED = 3
FRAMES = ["[Mia], jumping on a beach", "[Mia], walking in a city street", "[Mia], sitting in a forest",
          "[Mia], waving in a snowy field"]  # fmt: skip
STORY = """\
# Mia is given by a picture: her look comes from mia.png, the text only says what she is and does.
characters:
  Mia:
    description: a girl
    images: [mia.png]
frames:
{frames}
seed: 0
"""
SCALE = 3  # 64 px panels drawn 192 px wide in the figure


def picture() -> Image.Image:
    """A girl of the tiny world, standing in a room: a pose and a scene no frame of the story uses."""
    rng = np.random.default_rng(SEED)
    identity = world.Identity.random(rng)
    identity = type(identity)(**{**identity.__dict__, "kind": "girl"})
    panel = world.sample_panel(rng, identity, 1, omit_probability=1.0, pose="standing", scene="room")
    return world.render_panel(panel)


def draw(story_text: str, folder: Path, out: Path) -> list[Image.Image]:
    (folder / "story.yaml").write_text(story_text)
    result = run_story(Story.from_file(folder / "story.yaml"), out, RunOptions(device="cpu", progress=False))
    return [Image.open(path).convert("RGB") for path in result.panels]


def figure(source: Image.Image, read: list[Image.Image], alone: list[Image.Image]) -> Image.Image:
    side, gap, label = 64 * SCALE, 8, 18
    width = (len(read) + 1) * (side + gap) - gap
    canvas = Image.new("RGB", (width, 2 * (side + label) + gap), "white")
    pen = ImageDraw.Draw(canvas)
    rows = (("the picture / frames reading it", [source, *read]), ("frames from the text alone", [None, *alone]))
    for row, (title, images) in enumerate(rows):
        top = row * (side + label + gap)
        pen.text((4, top + 2), title, fill="black")
        for column, image in enumerate(images):
            if image is not None:
                canvas.paste(image.resize((side, side), Image.NEAREST), (column * (side + gap), top + label))
    return canvas


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    EXAMPLE.mkdir(parents=True, exist_ok=True)
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    source = picture()
    source.save(EXAMPLE / "mia.png")
    frames = "\n".join(f"  - '{line}'" for line in FRAMES)
    story_text = STORY.format(frames=frames)
    (EXAMPLE / "story.yaml").write_text(story_text)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        source.save(scratch / "mia.png")
        read = draw(story_text, scratch, scratch / "read")
        text_only = story_text.replace("    images: [mia.png]\n", "") + "rate: 0.0\nid_length: 1\n"
        alone = draw(text_only, scratch, scratch / "alone")
    figure(source, read, alone).save(FIGURE, optimize=True)
    print(f"wrote {EXAMPLE / 'story.yaml'}, {EXAMPLE / 'mia.png'} and {FIGURE}")


if __name__ == "__main__":
    main()
