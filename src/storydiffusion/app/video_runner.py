"""The work behind `storydiffusion video`: one transition between two images, or a whole story's panels
chained into one long video.

A story video keeps every transition's frames as PNGs in `OUT_DIR/video/` with the settings that made
them, so an interrupted run resumes where it stopped and a finished one is remade from disk in seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from storydiffusion.app.runner import MANIFEST, pick_device, pick_dtype
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.files import write_atomically
from storydiffusion.pipelines.loading import dtype_kwargs
from storydiffusion.video.export import write_frames, write_video
from storydiffusion.video.pipeline import TransitionPipeline
from storydiffusion.world.models import resolve_video_model


@dataclass(frozen=True)
class TransitionSettings:
    """How each transition is made."""

    num_frames: int = 8  # per transition, both keyframes included
    steps: int = 25
    guidance: float = 1.0
    seed: int = 0
    motion: str = "smp"  # or "linear": the predictor's transformer bypassed
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        if self.num_frames < 2:
            raise StoryDiffusionError(f"frames={self.num_frames}: a transition needs at least 2 frames (start and end)")
        if self.steps < 1:
            raise StoryDiffusionError(f"steps={self.steps} must be >= 1")


def load_transition_pipeline(model: str = "tiny", device: str = "auto", dtype: str = "auto") -> TransitionPipeline:
    """A TransitionPipeline from 'tiny' (shipped), a folder or a hub id, on the chosen device."""
    device = pick_device(device)
    path = resolve_video_model(model)
    try:
        pipe = TransitionPipeline.from_pretrained(path, **dtype_kwargs(pick_dtype(dtype, device)))
    except (OSError, ValueError) as error:
        raise StoryDiffusionError(
            f"cannot load video model {model!r}: {str(error).splitlines()[0]}; give 'tiny', a TransitionPipeline "
            "folder or hub id"
        ) from error
    if len(pipe.tokenizer) < 2:
        raise StoryDiffusionError(f"video model {model!r}: its tokenizer loaded empty (offline without its files?)")
    return pipe.to(device)


def read_keyframe(path: str | Path) -> Image.Image:
    """An image file as RGB, or a clear error naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise StoryDiffusionError(f"keyframe {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise StoryDiffusionError(f"cannot read keyframe {str(path)!r} as an image: {error}") from None


def check_pair(start: Image.Image, end: Image.Image, start_name: str, end_name: str, pipe: TransitionPipeline) -> None:
    if start.size != end.size:
        raise StoryDiffusionError(
            f"{start_name} is {start.size[0]}x{start.size[1]} but {end_name} is {end.size[0]}x{end.size[1]}: "
            "keyframes must have the same size"
        )
    factor = pipe.vae_scale_factor
    if start.size[0] % factor or start.size[1] % factor:
        raise StoryDiffusionError(f"{start_name}: size {start.size} must be a multiple of {factor} on each side")


def transition(
    pipe: TransitionPipeline, start: Image.Image, end: Image.Image, prompt: str, settings: TransitionSettings
) -> list[Image.Image]:
    """One transition's frames, seeded by `settings.seed`."""
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    output = pipe(
        start,
        end,
        prompt,
        num_frames=settings.num_frames,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        negative_prompt=settings.negative_prompt or None,
        motion=settings.motion,
        generator=generator,
    )
    return output.frames[0]


def run_transition(
    pipe: TransitionPipeline,
    start_path: Path,
    end_path: Path,
    prompt: str,
    out: Path,
    settings: TransitionSettings,
    fps: float = 8.0,
) -> Path:
    """START + END images -> a video file (MP4 or GIF, by `out`'s suffix)."""
    start, end = read_keyframe(start_path), read_keyframe(end_path)
    check_pair(start, end, str(start_path), str(end_path), pipe)
    return write_video(transition(pipe, start, end, prompt, settings), out, fps)


def story_panels(story_dir: Path) -> list[tuple[Path, str]]:
    """(panel file, prompt) of a generated story folder, in story order, from its manifest."""
    manifest_path = Path(story_dir) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise StoryDiffusionError(
            f"{str(story_dir)!r} holds no {MANIFEST}: give the folder a `storydiffusion story` run wrote"
        ) from None
    except (OSError, json.JSONDecodeError) as error:
        raise StoryDiffusionError(f"cannot read {manifest_path}: {error}") from None
    records = sorted(manifest.get("panels", {}).values(), key=lambda r: int(r["index"]))
    if len(records) < 2:
        raise StoryDiffusionError(f"{manifest_path} lists {len(records)} panel(s); a story video needs 2 or more")
    return [(Path(story_dir) / r["file"], r.get("prompt", "")) for r in records]


def _transition_done(folder: Path, record: dict) -> list[Path] | None:
    """The frames of a finished transition made with exactly `record`'s inputs, else None."""
    try:
        done = json.loads((folder / "transition.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    frames = [folder / name for name in done.get("frames", [])]
    return frames if done.get("inputs") == record and frames and all(p.is_file() for p in frames) else None


def run_story_video(
    pipe: TransitionPipeline,
    story_dir: Path,
    out: Path | None,
    settings: TransitionSettings,
    fps: float = 8.0,
    on_transition: Callable[[int, int], None] | None = None,
) -> tuple[Path, list[int]]:
    """Chain every pair of consecutive panels of a story run into one video; returns (file, reused pairs).

    Transition i (panel i -> panel i+1) follows panel i+1's prompt. Each one's frames are kept in
    `story_dir/video/transition_NN/`; on a rerun with the same settings they are reused.
    """
    panels = story_panels(story_dir)
    images = [read_keyframe(path) for path, _ in panels]
    for (path, _), image in zip(panels[1:], images[1:]):
        check_pair(images[0], image, str(panels[0][0]), str(path), pipe)
    frames: list[Image.Image] = []
    reused: list[int] = []
    for i in range(len(panels) - 1):
        folder = Path(story_dir) / "video" / f"transition_{i:02d}"
        prompt = panels[i + 1][1]
        record = {"start": panels[i][0].name, "end": panels[i + 1][0].name, "prompt": prompt, **asdict(settings)}
        paths = _transition_done(folder, record)
        if paths is None:
            clip = transition(pipe, images[i], images[i + 1], prompt, settings)
            paths = write_frames(clip, folder)
            summary = json.dumps({"inputs": record, "frames": [p.name for p in paths]}, indent=1)
            write_atomically(folder / "transition.json", lambda target, text=summary: target.write_text(text))
        else:
            reused.append(i)
        clip = [read_keyframe(p) for p in paths]
        frames.extend(clip if i == 0 else clip[1:])  # a shared keyframe appears once
        if on_transition is not None:
            on_transition(i + 1, len(panels) - 1)
    target = out if out is not None else Path(story_dir) / "story.mp4"
    return write_video(frames, target, fps), reused
