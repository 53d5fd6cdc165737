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

# The demo speaks the tiny world's grammar (`storydiffusion.world`): what a description leaves out
# (Mia's hair, Leo's shirt...) the model invents, and CSA keeps it the same from panel to panel.
DEMO_CHARACTERS = """\
[Mia] a girl with a ponytail and a yellow shirt
[Leo] a boy wearing a cap
"""
DEMO_FRAMES = """\
[Mia], walking in the city #Mia walks to the park.
[Mia], jumping in a forest #She jumps over a log.
[Leo], running on a beach #Leo runs by the sea.
[Leo], waving in the snow #Leo waves from the hill.
[Mia], waving, and [Leo], waving, in a room #They meet at home.
[NC] a park at night #Good night.
"""
# The same story for the untrained `tiny-random` model (its panels are noise either way).
RANDOM_DEMO_CHARACTERS = """\
[Mia] a girl with short red hair, yellow raincoat
[Tom] an old man with a grey beard, blue coat
"""
RANDOM_DEMO_FRAMES = """\
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
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 20,
    seed: Annotated[int, typer.Option(min=0, help="Story seed.")] = 0,
    model: Annotated[str | None, typer.Option(help="'tiny' (default, shipped) or 'tiny-random'.")] = None,
) -> None:
    """Run a six-panel, two-character story offline on the CPU with the shipped tiny model and write
    the panels, the characters' identity banks, a comic page and its PDF to OUT."""
    from .comic import ComicLayout
    from .runner import TINY_RANDOM, RunOptions, default_model, run_story
    from .story import Story, StorySettings
    from .tiny import TINY, TINY_SIZE

    model = model or default_model()
    if model not in (TINY, TINY_RANDOM):
        raise typer.BadParameter(f"--model {model!r}: the demo runs 'tiny' or 'tiny-random'; use `story` for others")
    if model == TINY:
        characters, frames, size, style, guidance = DEMO_CHARACTERS, DEMO_FRAMES, TINY_SIZE, "No style", 4.0
    else:
        characters, frames, size, style, guidance = RANDOM_DEMO_CHARACTERS, RANDOM_DEMO_FRAMES, 128, "Comic book", 5.0
    settings = StorySettings(
        seed=seed, steps=steps, guidance=guidance, width=size, height=size, id_length=2, style=style, model=model
    )
    story = Story.from_text(characters, frames, settings)
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
        str | None, typer.Option(help="Hub id, folder or 'tiny'; default: the story's model, else 'tiny'.")
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


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Option(help="Pipeline to evaluate: 'tiny' (shipped), a hub id or a folder.")] = "tiny",
    stories: Annotated[
        Path | None,
        typer.Option(
            help="Story file(s) to score instead of the built-in set: .yaml/.json, one story "
            "or a list under `stories:`; prompts in the tiny world's grammar."
        ),
    ] = None,
    count: Annotated[int, typer.Option(min=1, help="Built-in stories to use.")] = 24,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; every story runs with each.")] = "0,1,2",
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 20,
    guidance: Annotated[float, typer.Option(min=0.0, help="Guidance scale.")] = 4.0,
    rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="CSA sampling rate of the csa arms.")] = 0.5,
    layers: Annotated[str, typer.Option(help="CSA layer patterns of the csa arms, comma-separated.")] = "up_blocks.*",
    clip_model: Annotated[str, typer.Option(help="CLIPModel for CLIP-I/T: 'tiny', a hub id or a folder.")] = "tiny",
    quick: Annotated[bool, typer.Option(help="6 built-in stories, seed 0: a check in under 2 minutes.")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the numbers to this JSON file.")] = None,
    images: Annotated[Path | None, typer.Option(help="Save every generated story as a PNG strip here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
) -> None:
    """Score identity consistency and prompt alignment in four arms (baseline, shared_noise, csa,
    csa_shared_noise) and within strips; the last line printed is the JSON result."""
    import json

    from .attention import CSAConfig
    from .world_eval import EvalSettings, run_eval

    try:
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(f"--seeds {seeds!r}: give whole numbers separated by commas, e.g. 0,1,2") from None
    if not seed_list:
        raise typer.BadParameter("--seeds is empty: give at least one seed")
    if quick:
        count, seed_list = min(count, 6), seed_list[:1]
    csa = CSAConfig(rate=rate, layers=tuple(p.strip() for p in layers.split(",") if p.strip()))
    settings = EvalSettings(steps=steps, guidance=guidance, csa=csa, seeds=seed_list)
    started = time.perf_counter()
    result = run_eval(
        model, settings, stories=stories, count=count, clip_model=clip_model, device=device, images_dir=images
    )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    typer.echo(
        f"evaluated {result['stories']} stories x {len(result['seeds'])} seeds in "
        f"{time.perf_counter() - started:.0f} s",
        err=True,
    )
    typer.echo(json.dumps(result))


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
