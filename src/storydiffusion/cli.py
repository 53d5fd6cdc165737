"""The `storydiffusion` command line.

One function per command; the work lives in the library, this module only parses, prints and
turns the project's errors into a one-line message with exit code 1 (set
STORYDIFFUSION_TRACEBACK=1 for the full traceback).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from .errors import StoryDiffusionError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Consistent characters across story panels.")

DEMO_CHARACTERS = {
    "Mia": "a girl with short red hair, yellow raincoat",
    "Tom": "an old man with a grey beard, blue coat",
}
DEMO_FRAMES = [
    "[Mia] walks to school in the rain",
    "[Mia] splashes in a puddle",
    "[Tom] feeds pigeons in the park",
    "[Tom] reads a newspaper on a bench",
    "[Mia] and [Tom] share an umbrella",
    "[NC] the sun comes out over the city",
]


@app.callback()
def _commands() -> None:
    """storydiffusion: consistent characters across story panels, on diffusers."""


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the panels, the page and the banks.")] = Path(
        "storydiffusion-demo"
    ),
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 8,
    seed: Annotated[int, typer.Option(help="Story seed.")] = 0,
) -> None:
    """Run a six-panel, two-character story offline on the CPU and write it to OUT.

    Until the project's trained tiny model ships, the story runs on a tiny randomly initialised
    SD1.5-layout pipeline: the panels are noise, but every stage of the real run happens.
    """
    import torch

    from .pipeline import StoryPipeline
    from .tiny_random import tiny_sd_pipeline

    started = time.perf_counter()
    torch.set_grad_enabled(False)
    story = StoryPipeline(tiny_sd_pipeline(seed=0))
    story.pipe.set_progress_bar_config(disable=True)
    result = story(DEMO_CHARACTERS, DEMO_FRAMES, id_length=2, num_inference_steps=steps, height=128, width=128,
                   seed=seed)  # fmt: skip

    out.mkdir(parents=True, exist_ok=True)
    paths = [
        save_panel(image, info, out / f"panel_{info.index:02d}.png")
        for image, info in zip(result.images, result.frames)
    ]
    page = grid_page(result.images, columns=3)
    page.save(out / "page.png")
    for name, bank in result.banks.items():
        bank.save(out / "banks" / f"{name}.safetensors")
    manifest = {
        "model": "tiny-random (untrained SD1.5 layout)",
        "characters": DEMO_CHARACTERS,
        "panels": [{"file": p.name, **frame_record(info)} for p, info in zip(paths, result.frames)],
        "banks": {
            name: {"file": f"banks/{name}.safetensors", "bytes": bank.nbytes} for name, bank in result.banks.items()
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    typer.echo(f"wrote {len(paths)} panels, page.png and {len(result.banks)} character banks to {out}/ "
               f"in {time.perf_counter() - started:.1f} s")  # fmt: skip


def frame_record(info) -> dict:
    return {
        "index": info.index,
        "prompt": info.prompt,
        "negative_prompt": info.negative_prompt,
        "seed": info.seed,
        "characters": list(info.characters),
        "role": info.role,
    }


def save_panel(image, info, path: Path) -> Path:
    """A panel as PNG with its prompt, seed and characters in text chunks."""
    from PIL.PngImagePlugin import PngInfo

    text = PngInfo()
    for key, value in frame_record(info).items():
        text.add_text(f"storydiffusion:{key}", json.dumps(value) if not isinstance(value, str) else value)
    image.save(path, pnginfo=text)
    return path


def grid_page(images, columns: int, gap: int = 8):
    """Panels on a white page, `columns` per row (a stand-in until the comic module exists)."""
    from PIL import Image

    width, height = images[0].size
    rows = -(-len(images) // columns)
    page = Image.new("RGB", (columns * width + (columns + 1) * gap, rows * height + (rows + 1) * gap), "white")
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        page.paste(image, (gap + column * (width + gap), gap + row * (height + gap)))
    return page


def main() -> None:
    """Entry point: known errors become one line on stderr and exit code 1."""
    try:
        app()
    except StoryDiffusionError as error:
        if os.environ.get("STORYDIFFUSION_TRACEBACK"):
            raise
        typer.echo(f"error: {error}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
