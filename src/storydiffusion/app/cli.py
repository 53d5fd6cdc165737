"""The `storydiffusion` command line.

One function per command; the work lives in `runner` and the library, this module only parses
options and prints. Known errors become one line on stderr and exit code 1 (set
STORYDIFFUSION_TRACEBACK=1 for the full traceback); bad options exit with click's code 2.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
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


# Options `story` and `batch` share, spelled once so the two commands cannot drift apart.
DtypeOption = Annotated[
    str,
    typer.Option(
        help="auto (fp32 on CPU; on GPU bf16 for FLUX/SD3 where supported, else fp16), float32, float16, bfloat16."
    ),
]
StepsOption = Annotated[int | None, typer.Option(min=1, help="Denoising steps (overrides the story's).")]
SeedOption = Annotated[int | None, typer.Option(min=0, help="Story seed (overrides the story's).")]
GuidanceOption = Annotated[float | None, typer.Option(min=0.0, help="Guidance scale (overrides the story's).")]
WidthOption = Annotated[int | None, typer.Option(min=8, help="Panel width in px, a multiple of 8.")]
HeightOption = Annotated[int | None, typer.Option(min=8, help="Panel height in px, a multiple of 8.")]
IdLengthOption = Annotated[int | None, typer.Option(min=1, help="Reference frames per character.")]
RateOption = Annotated[float | None, typer.Option(min=0.0, max=1.0, help="CSA sampling rate.")]
StyleOption = Annotated[str | None, typer.Option(help="Style name, e.g. 'Comic book'.")]
NegativePromptOption = Annotated[str | None, typer.Option(help="Negative prompt, added to the style's.")]
SameInitialNoiseOption = Annotated[
    bool | None,
    typer.Option(
        "--same-initial-noise/--own-initial-noise",
        help="Every frame from the same initial noise (the public code's consistency prior; overrides the story).",
    ),
]
RegionalPromptsOption = Annotated[
    bool | None,
    typer.Option(
        "--regional-prompts/--no-regional-prompts",
        help="In frames with regions, read each character's description only inside its box (UNet models).",
    ),
]
LayoutOption = Annotated[str, typer.Option(help="Comic layout: classic, grid or four.")]
RowsOption = Annotated[int, typer.Option(min=1, help="Grid layout: rows per page.")]
ColsOption = Annotated[int, typer.Option(min=1, help="Grid layout: panels per row.")]
CpuOffloadOption = Annotated[bool, typer.Option(help="diffusers model CPU offload (GPU only).")]
VaeSlicingOption = Annotated[bool, typer.Option(help="Decode images one at a time.")]
VaeTilingOption = Annotated[bool, typer.Option(help="Decode large images in tiles.")]
BankDtypeOption = Annotated[
    str, typer.Option(help="Identity bank storage: int8, float16, bfloat16, float32; int4 (lossy, half of int8).")
]
BankStorageOption = Annotated[
    str, typer.Option(help="Identity banks in RAM (memory), in a file read a step at a time (disk), or auto.")
]
BankCacheOption = Annotated[
    str, typer.Option(help="Write the full bank beside each character file: auto (up to 256 MiB), always, never.")
]


@app.callback()
def _commands() -> None:
    """storydiffusion: consistent characters across story panels, laid out as comics."""


def _given(**settings: object) -> dict[str, object]:
    """The story settings given on the command line (the rest stay the story's)."""
    return {name: value for name, value in settings.items() if value is not None}


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the panels, comic and banks.")] = Path("storydiffusion-demo"),
    steps: Annotated[
        int | None, typer.Option(min=1, help="Denoising steps; default: the model's recommended (tiny: 20).")
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Story seed.")] = 0,
    model: Annotated[str | None, typer.Option(help="'tiny' (default, shipped) or 'tiny-random'.")] = None,
) -> None:
    """Run a six-panel, two-character story offline on the CPU with the shipped tiny model and write
    the panels, the characters' identity banks, a comic page and its PDF to OUT."""
    from storydiffusion.app.runner import TINY_RANDOM, RunOptions, default_model, run_story
    from storydiffusion.story.comic import ComicLayout
    from storydiffusion.story.format import Story, StorySettings
    from storydiffusion.world.models import TINY

    model = model or default_model()
    if model not in (TINY, TINY_RANDOM):
        raise typer.BadParameter(f"--model {model!r}: the demo runs 'tiny' or 'tiny-random'; use `story` for others")
    given = {"seed": seed, "style": "No style", "model": model, **({"steps": steps} if steps else {})}
    if model == TINY:  # steps, guidance, size, id_length and CSA: the model's storydiffusion.json
        characters, frames = DEMO_CHARACTERS, DEMO_FRAMES
    else:
        characters, frames = RANDOM_DEMO_CHARACTERS, RANDOM_DEMO_FRAMES
        given.update(style="Comic book", steps=steps or 20, guidance=5.0, width=128, height=128, id_length=2, rate=0.5)
    settings = StorySettings(**given)
    story = Story.from_text(characters, frames, settings, given=list(given))
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
        str | None,
        typer.Option(
            help="Hub id or folder (SD1.5/SDXL, FLUX.1, SD3/3.5), 'tiny', or tiny-random[-sdxl|-flux|-sd3]; "
            "default: the story's model, else 'tiny'."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    dtype: DtypeOption = "auto",
    steps: StepsOption = None,
    seed: SeedOption = None,
    guidance: GuidanceOption = None,
    width: WidthOption = None,
    height: HeightOption = None,
    id_length: IdLengthOption = None,
    rate: RateOption = None,
    style: StyleOption = None,
    negative_prompt: NegativePromptOption = None,
    same_initial_noise: SameInitialNoiseOption = None,
    regional_prompts: RegionalPromptsOption = None,
    layout: LayoutOption = "classic",
    rows: RowsOption = 2,
    cols: ColsOption = 2,
    cpu_offload: CpuOffloadOption = False,
    vae_slicing: VaeSlicingOption = False,
    vae_tiling: VaeTilingOption = False,
    bank_dtype: BankDtypeOption = "int8",
    bank_storage: BankStorageOption = "auto",
    bank_cache: BankCacheOption = "auto",
    overwrite: Annotated[bool, typer.Option(help="Start over instead of resuming what OUT holds.")] = False,
    bank: Annotated[
        list[Path] | None,
        typer.Option(
            help="A saved character to reuse: banks/Name.character.json of an earlier run (regenerated exactly, or "
            "read from the Name.safetensors beside it), or a full bank Name.safetensors; repeatable. Its model, "
            "size, steps, guidance and rate are the run's unless given (a different value given is an error)."
        ),
    ] = None,
    character_image: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=PICTURE: draw character NAME from this picture (its bank is made from it; it needs no "
            "reference frames); repeatable, also for several pictures of one character. Replaces the story "
            "file's images: of NAME.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Generate a story's panels, its comic pages and PDF into OUT (resuming what OUT already holds)."""
    # the story is read and checked before torch and diffusers load: a mistake in it is said at once
    from storydiffusion.story.format import Story, StorySettings

    overrides = _given(
        steps=steps,
        seed=seed,
        guidance=guidance,
        width=width,
        height=height,
        id_length=id_length,
        rate=rate,
        style=style,
        negative_prompt=negative_prompt,
        model=model,
        same_initial_noise=same_initial_noise,
        regional_prompts=regional_prompts,
    )
    if (story_file is None) == (characters is None and frames is None):
        raise StoryDiffusionError("give either a STORY file or --characters and --frames, not both or neither")
    banked = []  # saved characters need no reference frames
    if bank:
        from storydiffusion.pipelines.characters import saved_character_name

        banked = [saved_character_name(path) for path in bank]
    pictures = _character_images(character_image or ())
    if story_file is not None:
        story = Story.from_file(story_file, overrides, banked=banked, pictures=pictures)
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
            given=overrides,  # the options given; a saved character's settings fill the rest (`run_story`)
            pictures=pictures,
        )
    settings = story.settings
    from storydiffusion.app.runner import RunOptions, run_story
    from storydiffusion.story.comic import ComicLayout

    options = RunOptions(
        device=device,
        dtype=dtype,
        cpu_offload=cpu_offload,
        vae_slicing=vae_slicing,
        vae_tiling=vae_tiling,
        bank_dtype=bank_dtype,
        bank_storage=bank_storage,
        bank_cache=bank_cache,
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
            "masked, regions, regional_prompts and, with the model's storydiffusion.json, recommended_masked "
            "(12 built-in stories; --quick: 4)."
        ),
    ] = False,
    pictures: Annotated[
        bool,
        typer.Option(
            help="Characters given by a picture: each story's character by a render of a held-out identity in "
            "a pose and scene of its own; arms no_picture, picture_step, picture_clean, picture_clean_w4."
        ),
    ] = False,
) -> None:
    """Score identity consistency and prompt alignment in six arms (baseline, shared_noise, csa,
    csa_shared_noise, csa_finished, csa_sequential) and within strips -- or, with --two-characters, how well
    each of two characters in one frame keeps its own look; with --pictures, how well frames keep the look of
    a character given by a picture. The last line printed is the JSON result."""
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
    if two_characters and pictures:
        raise typer.BadParameter("--two-characters and --pictures measure different things: give one of them")
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
        pictures=pictures,
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
        str, typer.Option(help="The video tab's smp backend, a TransitionPipeline: 'tiny' (shipped), folder, hub id.")
    ] = "tiny",
    flf2v_model: Annotated[
        str | None,
        typer.Option(
            help="Also offer the flf2v backend in the video tab: a WanImageToVideoPipeline or LTXConditionPipeline "
            "hub id or folder, or 'tiny-random-flf2v'."
        ),
    ] = None,
    video_backend: Annotated[
        str, typer.Option(help="The backend the video tab starts on: smp, or flf2v (needs --flf2v-model).")
    ] = "smp",
) -> None:
    """Serve the web UI (Gradio): write a story, generate its panels, comic pages, PDF and banks, animate it."""
    if video_backend not in ("smp", "flf2v"):
        raise typer.BadParameter(f"--video-backend {video_backend!r}: choose smp or flf2v")
    if video_backend == "flf2v" and flf2v_model is None:
        raise typer.BadParameter("--video-backend flf2v needs --flf2v-model (a Wan/LTX first/last-frame pipeline)")
    try:
        from storydiffusion.app.ui import serve
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "gradio":
            raise
        raise StoryDiffusionError("the web UI needs gradio: pip install 'storydiffusion[ui]'") from None
    from storydiffusion.app.runner import default_model

    serve(
        model or default_model(),
        host=host,
        port=port,
        video_model=video_model,
        flf2v_model=flf2v_model,
        video_backend=video_backend,
    )


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
    frames: Annotated[
        int | None,
        typer.Option(
            help="Frames per transition, both keyframes included (>= 2). Default: 8 for smp; for flf2v the "
            "model's own (Wan 81, LTX 161), and any count must be 4k+1 (Wan) or 8k+1 (LTX)."
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="Denoising steps. Default: the video model's recommended (smp), else 25."),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Guidance scale on the prompt (1 = off). Default: the video model's recommended, else 1, for smp; "
            "the model's own for flf2v (Wan 5, LTX 3)",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    motion: Annotated[
        str, typer.Option(help="smp backend: smp (motion predictor) or linear (its transformer bypassed).")
    ] = "smp",
    negative_prompt: Annotated[str, typer.Option(help="What the frames should not show (with guidance > 1).")] = "",
    keyframe_tokens: Annotated[
        str | None,
        typer.Option(
            help="smp: what each frame's keyframe attention reads: finished (the finished keyframes, one pass per "
            "transition) or noisy (their tokens at each step). Default: the video model's recommended, else noisy."
        ),
    ] = None,
    keyframe_strength: Annotated[
        float | None,
        typer.Option(
            help="smp: the keyframes' keys weighted this much in that attention (1: unweighted). Default: the "
            "video model's recommended, else 1.",
        ),
    ] = None,
    fps: Annotated[
        float | None,
        typer.Option(min=0.1, help="Frames per second of the video file. Default: 8 for smp; Wan 16, LTX 25."),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help="The transition step: smp (this project's TransitionPipeline) or flf2v (a diffusers "
            "first/last-frame pipeline: WanImageToVideoPipeline or LTXConditionPipeline)."
        ),
    ] = "smp",
    model: Annotated[
        str | None,
        typer.Option(
            help="smp: a TransitionPipeline, 'tiny' (shipped, the default), a folder or a hub id. flf2v (needed): "
            "a hub id or folder, e.g. Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers, or 'tiny-random-flf2v'."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (fp16 on a GPU, bf16 for flf2v; fp32 on CPU), float32, float16 or bfloat16.")
    ] = "auto",
    cpu_offload: Annotated[bool, typer.Option(help="diffusers model CPU offload (GPU only).")] = False,
    vae_tiling: Annotated[bool, typer.Option(help="Encode and decode large frames in tiles.")] = False,
) -> None:
    """Animate between two keyframes (START END --prompt ...), or between every pair of consecutive
    panels of a story run (--story OUT_DIR), and write an MP4 or GIF."""
    from tqdm.auto import tqdm

    from storydiffusion.app.video_runner import (
        BACKENDS,
        TransitionSettings,
        check_transition,
        check_transition_settings_for_flf2v,
        load_backend,
        run_story_video,
        run_transition,
    )

    if (story is None) == (start is None or end is None):
        raise typer.BadParameter("give either START and END images, or --story OUT_DIR (not both)")
    if motion not in ("smp", "linear"):
        raise typer.BadParameter(f"--motion {motion!r}: choose smp or linear")
    if backend not in BACKENDS:
        raise typer.BadParameter(f"--backend {backend!r}: choose {' or '.join(BACKENDS)}")
    if backend == "flf2v" and model is None:
        raise typer.BadParameter(
            "--backend flf2v needs --model: a WanImageToVideoPipeline or LTXConditionPipeline hub id or folder "
            "(e.g. Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers), or tiny-random-flf2v"
        )
    # checked before loading (minutes for a real model); the backend fills what was not given (for smp the video
    # model's recommended settings, `storydiffusion.json`)
    settings = TransitionSettings(
        num_frames=frames,
        steps=steps,
        guidance=guidance,
        seed=seed,
        motion=motion,
        negative_prompt=negative_prompt,
        keyframe_tokens=keyframe_tokens,
        keyframe_strength=keyframe_strength,
    )
    if backend == "flf2v":
        check_transition_settings_for_flf2v(settings)
    started = time.perf_counter()
    pipe = load_backend(backend, model, device, dtype, cpu_offload=cpu_offload, vae_tiling=vae_tiling)
    settings = check_transition(pipe, settings)
    if story is None:
        pipe.set_progress_bar_config(desc="frames" if backend == "smp" else "steps", leave=False)
        path = run_transition(pipe, start, end, prompt, out or Path("clip.mp4"), settings, fps)
        typer.echo(f"wrote {path} ({settings.num_frames} frames) in {time.perf_counter() - started:.1f} s")
        return
    if backend == "smp":
        pipe.set_progress_bar_config(disable=True)
    else:  # a real first/last-frame model takes seconds a step: show them under the transitions' bar
        pipe.set_progress_bar_config(desc="steps", leave=False)
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
    """Score transitions in six arms (smp; smp_finished and smp_finished_w4, reading the finished keyframes;
    linear_embedding and linear_finished_w4, the straight path; latent_interpolation): trajectory error,
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


def _character_images(values: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """`--character-image NAME=PICTURE` options -> name -> pictures, in the order given."""
    pictures: dict[str, list[str]] = {}
    for value in values:
        name, sep, picture = value.partition("=")
        name, picture = name.strip().strip("[]"), picture.strip()
        if not sep or not name or not picture:
            raise StoryDiffusionError(
                f"--character-image {value!r}: write NAME=PICTURE, e.g. --character-image Mia=mia.png"
            )
        pictures.setdefault(name, []).append(picture)
    return pictures


def _report(result, seconds: float) -> None:
    resumed = f", {len(result.skipped)} already there" if result.skipped else ""
    typer.echo(
        f"{len(result.generated)} panels generated{resumed}; {len(result.pages)} comic page(s) and "
        f"{result.pdf.name} in {result.out}/ ({seconds:.1f} s)"
    )


def _stop_cleanly_on_sigterm() -> None:
    """SIGTERM (what `accelerate launch`/torchrun send the other processes when one dies, and what `kill` and
    `docker stop` send) ends a command as Ctrl-C does: the file in flight is removed, not left half-written."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def _is_usage_error(error: Exception) -> bool:
    """Whether `error` is click's report of a bad command line (UsageError and its kin, such as BadParameter)."""
    return any(cls.__name__ == "UsageError" for cls in type(error).__mro__) and hasattr(error, "format_message")


def main() -> None:
    """Entry point: every error is one line on stderr starting `error:` -- the project's with exit code 1, a bad
    option or argument with click's 2."""
    # transformers warns at import about optional image backends the command never uses
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _stop_cleanly_on_sigterm()
    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # Ctrl-C at a prompt
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except StoryDiffusionError as error:
        if os.environ.get("STORYDIFFUSION_TRACEBACK"):
            raise
        typer.echo(f"error: {error}", err=True)
        sys.exit(1)
    except Exception as error:
        if not _is_usage_error(error):
            raise
        # a bad option or argument (click's exceptions, vendored by recent typer): its exit code, our first words
        name = getattr(getattr(error, "ctx", None), "command_path", None) or "storydiffusion"
        typer.echo(f"error: {error.format_message()} (see `{name} --help`)", err=True)
        sys.exit(error.exit_code)
    if isinstance(code, int) and code:  # --help and friends return their exit code
        sys.exit(code)


@app.command("batch")
def batch_command(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Story files, folders of them, or prompt sets (a file such as ConsiStory+'s, or 'consistory+').",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output folder: one subfolder per story, batch.json; re-running resumes.")],
    model: Annotated[
        str | None,
        typer.Option(help="Hub id, folder, 'tiny' or tiny-random[-sdxl|-flux|-sd3]; default: each story's, else tiny."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps (each process its own GPU).")] = "auto",
    dtype: DtypeOption = "auto",
    steps: StepsOption = None,
    seed: SeedOption = None,
    guidance: GuidanceOption = None,
    width: WidthOption = None,
    height: HeightOption = None,
    id_length: IdLengthOption = None,
    rate: RateOption = None,
    style: StyleOption = None,
    negative_prompt: NegativePromptOption = None,
    same_initial_noise: SameInitialNoiseOption = None,
    regional_prompts: RegionalPromptsOption = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N stories of the inputs.")] = None,
    layout: LayoutOption = "classic",
    rows: RowsOption = 2,
    cols: ColsOption = 2,
    cpu_offload: CpuOffloadOption = False,
    vae_slicing: VaeSlicingOption = False,
    vae_tiling: VaeTilingOption = False,
    bank_dtype: BankDtypeOption = "int8",
    bank_storage: BankStorageOption = "auto",
    bank_cache: BankCacheOption = "auto",
    overwrite: Annotated[bool, typer.Option(help="Start every story over instead of resuming.")] = False,
) -> None:
    """Draw many stories into OUT/NAME/ through the resumable story runner; under `accelerate launch
    --num_processes N` the stories are split across the processes (one merged OUT/batch.json)."""
    from storydiffusion.app.batch import BATCH_MANIFEST, batch_state, collect_stories, run_batch
    from storydiffusion.app.runner import RunOptions, default_model
    from storydiffusion.story.comic import ComicLayout

    overrides = _given(
        steps=steps,
        seed=seed,
        guidance=guidance,
        width=width,
        height=height,
        id_length=id_length,
        rate=rate,
        style=style,
        negative_prompt=negative_prompt,
        model=model,
        same_initial_noise=same_initial_noise,
        regional_prompts=regional_prompts,
    )
    stories = collect_stories(inputs, overrides, limit)
    options = RunOptions(
        model=default_model(),
        device=device,
        dtype=dtype,
        cpu_offload=cpu_offload,
        vae_slicing=vae_slicing,
        vae_tiling=vae_tiling,
        bank_dtype=bank_dtype,
        bank_storage=bank_storage,
        bank_cache=bank_cache,
        layout=ComicLayout(kind=layout, rows=rows, cols=cols, seed=seed or 0),
        overwrite=overwrite,
    )
    state = batch_state(device)
    started = time.perf_counter()
    result = run_batch(stories, out, options, state=state)
    resumed = f", {result.skipped} already there" if result.skipped else ""
    typer.echo(
        f"process {result.process_index}/{result.num_processes}: {len(result.stories)} stories, "
        f"{result.generated} panels generated{resumed} ({time.perf_counter() - started:.1f} s)",
        err=True,
    )
    if result.manifest is not None:
        manifest = result.manifest
        state_text = "complete" if manifest["complete"] else "incomplete: re-run the same command to finish"
        typer.echo(
            f"{len(manifest['stories'])} stories, {manifest['done']}/{manifest['panels']} panels in {out}/ "
            f"({BATCH_MANIFEST}: {state_text})"
        )


@app.command("bench")
def bench_command(
    prompt_set: Annotated[
        str, typer.Argument(help="'consistory+' (the shipped ConsiStory+ prompt set) or a prompt-set file.")
    ],
    out: Annotated[Path, typer.Option(help="Output folder: one batch per arm; re-running resumes.")],
    model: Annotated[str | None, typer.Option(help="Hub id, folder or 'tiny' (default, shipped).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N subjects (a smoke run).")] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the result here, and the table beside it (.md).")
    ] = None,
    arms: Annotated[str, typer.Option(help="Comma-separated arms.")] = "vanilla,csa,csa_shared_noise,csa_masked",
    clip_model: Annotated[
        str, typer.Option(help="CLIPModel for CLIP-T/CLIP-I: hub id, folder, 'tiny'; auto: tiny for tiny models.")
    ] = "auto",
    dreamsim_cache: Annotated[
        Path | None, typer.Option(help="Folder holding (or to receive) DreamSim's weights.")
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 50,
    guidance: Annotated[float, typer.Option(min=0.0, help="Guidance scale.")] = 5.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed of every subject (1Prompt1Story's script: 42).")] = 42,
    id_length: Annotated[int, typer.Option(min=1, help="Reference frames per subject.")] = 3,
    rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="CSA sampling rate of the csa arms.")] = 0.5,
    width: Annotated[int | None, typer.Option(min=8, help="Panel width (default: the model's).")] = None,
    height: Annotated[int | None, typer.Option(min=8, help="Panel height (default: the model's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    dtype: DtypeOption = "auto",
    cpu_offload: Annotated[bool, typer.Option(help="diffusers model CPU offload (GPU only).")] = False,
    vae_slicing: Annotated[bool, typer.Option(help="Decode images one at a time.")] = False,
) -> None:
    """Run a prompt set (ConsiStory+) in arms vanilla, csa, csa_shared_noise, csa_masked and score CLIP-T, CLIP-I,
    DreamSim, seconds per image and peak memory; prints a markdown table, the last line is the JSON result."""
    import json

    from storydiffusion.app.batch import batch_state
    from storydiffusion.app.bench import BENCH_JSON, BenchSettings, default_clip, run_bench, write_result
    from storydiffusion.app.runner import RunOptions, default_model

    settings = BenchSettings(
        steps=steps,
        guidance=guidance,
        seed=seed,
        id_length=id_length,
        rate=rate,
        width=width,
        height=height,
        limit=limit,
        arms=tuple(arm.strip() for arm in arms.split(",") if arm.strip()),
    )
    options = RunOptions(
        model=model or default_model(),
        device=device,
        dtype=dtype,
        cpu_offload=cpu_offload,
        vae_slicing=vae_slicing,
    )
    state = batch_state(device)
    started = time.perf_counter()
    result = run_bench(prompt_set, out, settings, options, clip_model, dreamsim_cache, state=state)
    if result is None:  # another process than 0: its share is drawn, process 0 scores
        return
    clip = default_clip(options.model) if clip_model == "auto" else clip_model
    subjects = next(iter(result.values()))["subjects"]
    frames = next(iter(result.values()))["frames"]
    header = (
        f"{prompt_set}: {subjects} subjects, {frames} frames per arm; model {options.model}, {steps} steps, "
        f"guidance {guidance}, seed {seed}, id_length {id_length}, rate {rate}, CLIP {clip}, "
        f"{state.num_processes} process(es)"
    )
    paths = [write_result(result, out / BENCH_JSON, header)]
    if json_path is not None:
        paths.append(write_result(result, json_path, header))
    typer.echo(paths[-1][1].read_text())
    typer.echo(f"scored {len(result)} arms in {time.perf_counter() - started:.0f} s", err=True)
    typer.echo(json.dumps(result))


if __name__ == "__main__":
    main()
