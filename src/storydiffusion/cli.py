"""The `storydiffusion` command line.

One function per command; the work lives in `runner` and the library, this module only parses
options and prints. Known errors become one line on stderr and exit code 1 (set
STORYDIFFUSION_TRACEBACK=1 for the full traceback); bad options exit with click's code 2.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from .errors import StoryDiffusionError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Consistent characters across story panels, laid out as comics.",
)

DEMO_CHARACTERS = """\
[Mia] a girl with short red hair, yellow raincoat
[Tom] an old man with a grey beard, blue coat
"""
DEMO_FRAMES = """\
[Mia] walks to school in the rain #Mia walks to school.
[Mia] splashes in a puddle #Splash!
[Tom] feeds pigeons in the park #Tom feeds the pigeons.
[Tom] reads a newspaper on a bench #Same bench, every day.
[Mia] and [Tom] share an umbrella #Mia shares her umbrella with Tom.
[NC] the sun comes out over the city #The sun comes out.
"""


@app.callback()
def _commands() -> None:
    """storydiffusion: consistent characters across story panels, laid out as comics."""


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the panels, comic and banks.")] = Path("storydiffusion-demo"),
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 8,
    seed: Annotated[int, typer.Option(min=0, help="Story seed.")] = 0,
) -> None:
    """Run a six-panel, two-character story offline on the CPU and write it to OUT.

    Until the project's trained tiny model ships, the story runs on a tiny randomly initialised
    SD1.5-layout pipeline: the panels are noise, but every stage of a real run happens.
    """
    from .comic import ComicLayout
    from .runner import RunOptions, run_story
    from .story import Story, StorySettings

    story = Story.from_text(
        DEMO_CHARACTERS,
        DEMO_FRAMES,
        StorySettings(seed=seed, steps=steps, width=128, height=128, id_length=2, style="Comic book"),
    )
    started = time.perf_counter()
    options = RunOptions(device="cpu", layout=ComicLayout(kind="grid", rows=3, cols=2), overwrite=True)
    result = run_story(story, out, options)
    _report(result, time.perf_counter() - started)


@app.command("story")
def story_command(
    story_file: Annotated[
        Path | None, typer.Argument(help="Story file (.yaml/.yml/.json); or use --characters and --frames.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder; re-running into it resumes.")] = Path("story-out"),
    characters: Annotated[Path | None, typer.Option(help="Text file: one '[Name] description' per line.")] = None,
    frames: Annotated[
        Path | None, typer.Option(help="Text file: one frame per line, [Name]/[NC] tags, #caption.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Hub id or folder; default: the story's model, else 'tiny-random'.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (fp16 on GPU, fp32 on CPU), float32, float16, bfloat16.")] = "auto",
    steps: Annotated[int | None, typer.Option(min=1, help="Denoising steps (overrides the story).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Story seed (overrides the story).")] = None,
    guidance: Annotated[float | None, typer.Option(min=0.0, help="Guidance scale (overrides the story).")] = None,
    width: Annotated[int | None, typer.Option(min=8, help="Panel width in px, a multiple of 8.")] = None,
    height: Annotated[int | None, typer.Option(min=8, help="Panel height in px, a multiple of 8.")] = None,
    id_length: Annotated[int | None, typer.Option(min=1, help="Reference frames per character.")] = None,
    rate: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="CSA sampling rate.")] = None,
    style: Annotated[str | None, typer.Option(help="Style name, e.g. 'Comic book'.")] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt, added to the style's.")] = None,
    layout: Annotated[str, typer.Option(help="Comic layout: classic, grid or four.")] = "classic",
    rows: Annotated[int, typer.Option(min=1, help="Grid layout: rows per page.")] = 2,
    cols: Annotated[int, typer.Option(min=1, help="Grid layout: panels per row.")] = 2,
    cpu_offload: Annotated[bool, typer.Option(help="diffusers model CPU offload (GPU only).")] = False,
    vae_slicing: Annotated[bool, typer.Option(help="Decode images one at a time.")] = False,
    vae_tiling: Annotated[bool, typer.Option(help="Decode large images in tiles.")] = False,
    bank_dtype: Annotated[str, typer.Option(help="Identity bank storage: int8, float16, bfloat16, float32.")] = "int8",
    overwrite: Annotated[bool, typer.Option(help="Start over instead of resuming what OUT holds.")] = False,
) -> None:
    """Generate a story's panels, its comic pages and PDF into OUT (resuming what OUT already holds)."""
    from .comic import ComicLayout
    from .runner import RunOptions, run_story
    from .story import Story, StorySettings

    overrides = {
        "steps": steps,
        "seed": seed,
        "guidance": guidance,
        "width": width,
        "height": height,
        "id_length": id_length,
        "rate": rate,
        "style": style,
        "negative_prompt": negative_prompt,
        "model": model,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if (story_file is None) == (characters is None and frames is None):
        raise StoryDiffusionError("give either a STORY file or --characters and --frames, not both or neither")
    if story_file is not None:
        story = Story.from_file(story_file, overrides)
    else:
        if frames is None:
            raise StoryDiffusionError("--characters needs --frames: the file with one frame per line")
        story = Story.from_text(
            _read_text(characters) if characters else "",
            _read_text(frames),
            StorySettings(**overrides),
            characters_source=str(characters or "<characters>"),
            frames_source=str(frames),
        )
    settings = story.settings
    options = RunOptions(
        device=device,
        dtype=dtype,
        cpu_offload=cpu_offload,
        vae_slicing=vae_slicing,
        vae_tiling=vae_tiling,
        bank_dtype=bank_dtype,
        layout=ComicLayout(kind=layout, rows=rows, cols=cols, seed=settings.seed),
        overwrite=overwrite,
    )
    started = time.perf_counter()
    result = run_story(story, out, options)
    _report(result, time.perf_counter() - started)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise StoryDiffusionError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None


def _report(result, seconds: float) -> None:
    resumed = f", {len(result.skipped)} already there" if result.skipped else ""
    typer.echo(
        f"{len(result.generated)} panels generated{resumed}; {len(result.pages)} comic page(s) and "
        f"{result.pdf.name} in {result.out}/ ({seconds:.1f} s)"
    )


def main() -> None:
    """Entry point: the project's errors become one line on stderr and exit code 1."""
    # transformers warns at import about optional image backends the command never uses
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app()
    except StoryDiffusionError as error:
        if os.environ.get("STORYDIFFUSION_TRACEBACK"):
            raise
        typer.echo(f"error: {error}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
