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

from storydiffusion.errors import StoryDiffusionError
from storydiffusion.story.examples import DEMO_CHARACTERS, DEMO_FRAMES, RANDOM_DEMO_CHARACTERS, RANDOM_DEMO_FRAMES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Consistent characters across story panels, laid out as comics.",
)


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
    from storydiffusion.app.runner import TINY_RANDOM, RunOptions, default_model, run_story
    from storydiffusion.story.comic import ComicLayout
    from storydiffusion.story.format import Story, StorySettings
    from storydiffusion.world.models import TINY, TINY_SIZE

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
    same_initial_noise: Annotated[
        bool | None,
        typer.Option(
            "--same-initial-noise/--own-initial-noise",
            help="Every frame from the same initial noise (the public code's consistency prior; overrides the story).",
        ),
    ] = None,
    layout: Annotated[str, typer.Option(help="Comic layout: classic, grid or four.")] = "classic",
    rows: Annotated[int, typer.Option(min=1, help="Grid layout: rows per page.")] = 2,
    cols: Annotated[int, typer.Option(min=1, help="Grid layout: panels per row.")] = 2,
    cpu_offload: Annotated[bool, typer.Option(help="diffusers model CPU offload (GPU only).")] = False,
    vae_slicing: Annotated[bool, typer.Option(help="Decode images one at a time.")] = False,
    vae_tiling: Annotated[bool, typer.Option(help="Decode large images in tiles.")] = False,
    bank_dtype: Annotated[str, typer.Option(help="Identity bank storage: int8, float16, bfloat16, float32.")] = "int8",
    overwrite: Annotated[bool, typer.Option(help="Start over instead of resuming what OUT holds.")] = False,
    bank: Annotated[
        list[Path] | None,
        typer.Option(help="A saved character (banks/Name.safetensors of an earlier run) to reuse; repeatable."),
    ] = None,
) -> None:
    """Generate a story's panels, its comic pages and PDF into OUT (resuming what OUT already holds)."""
    from storydiffusion.app.runner import RunOptions, run_story
    from storydiffusion.story.comic import ComicLayout
    from storydiffusion.story.format import Story, StorySettings

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
        "same_initial_noise": same_initial_noise,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if (story_file is None) == (characters is None and frames is None):
        raise StoryDiffusionError("give either a STORY file or --characters and --frames, not both or neither")
    from storydiffusion.csa.bank import IdentityBank

    banked = [IdentityBank.character_in(path) for path in bank or ()]  # they need no reference frames
    if story_file is not None:
        story = Story.from_file(story_file, overrides, banked=banked)
    else:
        if frames is None:
            raise StoryDiffusionError("--characters needs --frames: the file with one frame per line")
        story = Story.from_text(
            _read_text(characters) if characters else "",
            _read_text(frames),
            StorySettings(**overrides),
            characters_source=str(characters or "<characters>"),
            frames_source=str(frames),
            banked=banked,
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
    result = run_story(story, out, options, bank_files=bank or ())
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
    count: Annotated[
        int | None, typer.Option(min=1, help="Built-in stories to use (24; 12 with --two-characters).")
    ] = None,
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
    two_characters: Annotated[
        bool,
        typer.Option(
            help="Two characters per frame: own-identity agreement and swap rate in arms baseline, unmasked, "
            "masked and regions (12 built-in stories; --quick: 4)."
        ),
    ] = False,
) -> None:
    """Score identity consistency and prompt alignment in four arms (baseline, shared_noise, csa,
    csa_shared_noise) and within strips -- or, with --two-characters, how well each of two characters in
    one frame keeps its own look; the last line printed is the JSON result."""
    import json

    from storydiffusion.app.evaluate import run_eval
    from storydiffusion.csa.attention import CSAConfig
    from storydiffusion.world.eval import EvalSettings

    try:
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(f"--seeds {seeds!r}: give whole numbers separated by commas, e.g. 0,1,2") from None
    if not seed_list:
        raise typer.BadParameter("--seeds is empty: give at least one seed")
    if count is None:
        count = 12 if two_characters else 24  # two-character stories are longer
    if quick:
        count, seed_list = min(count, 4 if two_characters else 6), seed_list[:1]
    csa = CSAConfig(rate=rate, layers=tuple(p.strip() for p in layers.split(",") if p.strip()))
    settings = EvalSettings(steps=steps, guidance=guidance, csa=csa, seeds=seed_list)
    started = time.perf_counter()
    result = run_eval(
        model,
        settings,
        stories=stories,
        count=count,
        clip_model=clip_model,
        device=device,
        images_dir=images,
        two_characters=two_characters,
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


@app.command("ui")
def ui_command(
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 serves the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 7860,
    model: Annotated[
        str | None, typer.Option(help="Hub id, folder, 'tiny' (default, shipped) or 'tiny-random'.")
    ] = None,
    video_model: Annotated[
        str, typer.Option(help="The video tab's TransitionPipeline: 'tiny' (shipped), a folder or a hub id.")
    ] = "tiny",
) -> None:
    """Serve the web UI (Gradio): write a story, generate its panels, comic pages, PDF and banks, animate it."""
    try:
        from storydiffusion.app.ui import serve
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "gradio":
            raise
        raise StoryDiffusionError("the web UI needs gradio: pip install 'storydiffusion[ui]'") from None
    from storydiffusion.app.runner import default_model

    serve(model or default_model(), host=host, port=port, video_model=video_model)


@app.command("video")
def video_command(
    start: Annotated[Path | None, typer.Argument(help="Start keyframe (PNG/JPEG...).", show_default=False)] = None,
    end: Annotated[Path | None, typer.Argument(help="End keyframe, same size as START.", show_default=False)] = None,
    prompt: Annotated[str, typer.Option(help="What happens between the keyframes.")] = "",
    story: Annotated[
        Path | None,
        typer.Option(help="A `storydiffusion story` output folder: chain all its panels into one video."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Video file (.mp4 or .gif). Default: clip.mp4, or STORY/story.mp4.")
    ] = None,
    frames: Annotated[int, typer.Option(help="Frames per transition, both keyframes included (>= 2).")] = 8,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 25,
    guidance: Annotated[float, typer.Option(min=0.0, help="Guidance scale on the prompt (1 = off).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    motion: Annotated[str, typer.Option(help="smp (motion predictor) or linear (its transformer bypassed).")] = "smp",
    fps: Annotated[float, typer.Option(min=0.1, help="Frames per second of the video file.")] = 8.0,
    model: Annotated[str, typer.Option(help="TransitionPipeline: 'tiny' (shipped), a folder or a hub id.")] = "tiny",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, float16 or bfloat16.")] = "auto",
) -> None:
    """Animate between two keyframes (START END --prompt ...), or between every pair of consecutive
    panels of a story run (--story OUT_DIR), and write an MP4 or GIF."""
    from tqdm.auto import tqdm

    from storydiffusion.app.video_runner import (
        TransitionSettings,
        load_transition_pipeline,
        run_story_video,
        run_transition,
    )

    if (story is None) == (start is None or end is None):
        raise typer.BadParameter("give either START and END images, or --story OUT_DIR (not both)")
    if motion not in ("smp", "linear"):
        raise typer.BadParameter(f"--motion {motion!r}: choose smp or linear")
    settings = TransitionSettings(num_frames=frames, steps=steps, guidance=guidance, seed=seed, motion=motion)
    started = time.perf_counter()
    pipe = load_transition_pipeline(model, device, dtype)
    if story is None:
        pipe.set_progress_bar_config(desc="frames", leave=False)
        path = run_transition(pipe, start, end, prompt, out or Path("clip.mp4"), settings, fps)
        typer.echo(f"wrote {path} ({frames} frames) in {time.perf_counter() - started:.1f} s")
        return
    pipe.set_progress_bar_config(disable=True)
    with tqdm(desc="transitions", unit="transition") as bar:

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        path, reused = run_story_video(pipe, story, out, settings, fps, on_transition=advance)
    again = f", {len(reused)} transition(s) reused" if reused else ""
    typer.echo(f"wrote {path}{again} in {time.perf_counter() - started:.1f} s")


@app.command("eval-video")
def eval_video_command(
    model: Annotated[str, typer.Option(help="TransitionPipeline: 'tiny' (shipped), a folder or a hub id.")] = "tiny",
    clips: Annotated[int, typer.Option(min=1, help="Held-out tiny-world transitions to score.")] = 24,
    frames: Annotated[int, typer.Option(min=3, help="Frames per transition, keyframes included.")] = 8,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 20,
    guidance: Annotated[float, typer.Option(min=0.0, help="Guidance scale (1 = off).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of clip i's noise is seed + i.")] = 0,
    clip_model: Annotated[str, typer.Option(help="CLIPModel for CLIPSIM: 'tiny', a hub id or a folder.")] = "tiny",
    quick: Annotated[bool, typer.Option(help="8 clips, 10 steps: a check in under 3 minutes.")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the numbers to this JSON file.")] = None,
    images: Annotated[Path | None, typer.Option(help="Save each clip's frames, one row per arm, here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
) -> None:
    """Score transitions in three arms (smp, linear_embedding, latent_interpolation): trajectory error,
    identity agreement, feature distance (LPIPS's recipe on the world classifier's features) and CLIPSIM
    first/frames; the last line printed is the JSON result."""
    import json

    from storydiffusion.app.video_runner import load_transition_pipeline
    from storydiffusion.clip_score import ClipScorer
    from storydiffusion.world.classifier import load_default_classifier
    from storydiffusion.world.models import resolve_clip
    from storydiffusion.world.video_eval import VideoEvalSettings, evaluate_video, write_result

    if quick:
        clips, steps = min(clips, 8), min(steps, 10)
    started = time.perf_counter()
    pipe = load_transition_pipeline(model, device)
    pipe.set_progress_bar_config(disable=True)
    settings = VideoEvalSettings(clips=clips, num_frames=frames, steps=steps, guidance=guidance, seed=seed)
    result = evaluate_video(
        pipe,
        settings,
        load_default_classifier(pipe.device),
        ClipScorer(resolve_clip(clip_model), pipe.device),
        images_dir=images,
    )
    if json_path is not None:
        write_result(result, json_path)
    typer.echo(f"evaluated {result['clips']} transitions in {time.perf_counter() - started:.0f} s", err=True)
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
