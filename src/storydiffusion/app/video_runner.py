"""The work behind `storydiffusion video`: one transition between two images, or a whole story's panels
chained into one long video.

The transition step has two backends: `smp`, this project's TransitionPipeline (Semantic Motion Predictor
and transition UNet; the shipped tiny model by default), and `flf2v`, a diffusers first/last-frame-to-video
pipeline (`video.flf2v`: Wan2.1-FLF2V, LTX-Video). `load_backend` loads either; every function here takes
either one (or a bare TransitionPipeline, which is the smp backend).

A story video keeps every transition's frames as PNGs in `OUT_DIR/video/` with the settings that made
them (the backend and model among them), so an interrupted run resumes where it stopped, a finished one
is remade from disk in seconds, and a run with another backend, model or setting never reuses them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from storydiffusion.app.runner import MANIFEST, pick_device, pick_dtype
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.files import write_atomically
from storydiffusion.pipelines.loading import dtype_kwargs
from storydiffusion.video.export import write_frames, write_video
from storydiffusion.video.flf2v import FLF2VBackend
from storydiffusion.video.pipeline import TransitionPipeline
from storydiffusion.video.recommended import call_settings
from storydiffusion.video.tiny_random_flf2v import TINY_RANDOM_FLF2V
from storydiffusion.video.unet import keyframe_settings_problem
from storydiffusion.world.models import TINY, resolve_video_model

BACKENDS = ("smp", "flf2v")  # the transition step: our TransitionPipeline, or a diffusers first/last-frame one


@dataclass(frozen=True)
class TransitionSettings:
    """How each transition is made. None: the backend's default -- for smp the video model's recommended
    settings (`storydiffusion.json`), else `video.recommended.CALL_DEFAULTS`; for flf2v the model's own."""

    num_frames: int | None = None  # per transition, both keyframes included
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    motion: str = "smp"  # or "linear": the predictor's transformer bypassed
    negative_prompt: str = ""
    keyframe_tokens: str | None = None  # smp: "noisy" or "finished" (what keyframe attention reads)
    keyframe_strength: float | None = None  # smp: the keyframes' keys weighted w

    def __post_init__(self) -> None:
        if self.num_frames is not None and self.num_frames < 2:
            raise StoryDiffusionError(f"frames={self.num_frames}: a transition needs at least 2 frames (start and end)")
        if self.steps is not None and self.steps < 1:
            raise StoryDiffusionError(f"steps={self.steps} must be >= 1")
        problem = keyframe_settings_problem(self.keyframe_tokens, self.keyframe_strength)
        if problem:
            raise StoryDiffusionError(problem)


def load_transition_pipeline(model: str = "tiny", device: str = "auto", dtype: str = "auto") -> TransitionPipeline:
    """A TransitionPipeline from 'tiny' (shipped), a folder or a hub id, on the chosen device."""
    device = pick_device(device)
    return _transition_pipeline(model, pick_dtype(dtype, device)).to(device)


def _transition_pipeline(model: str, torch_dtype: Any) -> TransitionPipeline:
    path = resolve_video_model(model)
    try:
        pipe = TransitionPipeline.from_pretrained(path, **dtype_kwargs(torch_dtype))
    except (OSError, ValueError) as error:
        raise StoryDiffusionError(
            f"cannot load video model {model!r}: {str(error).splitlines()[0]}; give 'tiny', a TransitionPipeline "
            "folder or hub id"
        ) from error
    if len(pipe.tokenizer) < 2:
        raise StoryDiffusionError(f"video model {model!r}: its tokenizer loaded empty (offline without its files?)")
    return pipe


@dataclass
class SMPBackend:
    """This project's TransitionPipeline behind the transition step (the `smp` backend)."""

    pipe: TransitionPipeline
    model: str = ""  # what the user named it by ('tiny', a folder, a hub id): recorded with its frames
    name = "smp"
    default_fps = 8.0

    @property
    def dtype(self) -> Any:
        return self.pipe.dtype

    def check_keyframes(self, start: Image.Image, end: Image.Image, start_name: str, end_name: str) -> None:
        check_pair(start, end, start_name, end_name, self.pipe)

    def complete(self, settings: TransitionSettings) -> TransitionSettings:
        """`settings` with every None filled: the video model's recommended settings, else the defaults."""
        chosen = call_settings(
            self.pipe.recommended,
            num_frames=settings.num_frames,
            steps=settings.steps,
            guidance=settings.guidance,
            keyframe_tokens=settings.keyframe_tokens,
            keyframe_strength=settings.keyframe_strength,
        )
        return replace(settings, **chosen)

    def check_num_frames(self, num_frames: int) -> None:
        """Any count of 2 or more (TransitionSettings checks that)."""

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.pipe.set_progress_bar_config(**kwargs)


TransitionBackend = SMPBackend | FLF2VBackend


def as_backend(pipe: TransitionPipeline | TransitionBackend) -> TransitionBackend:
    """A backend as it is; a bare TransitionPipeline as the smp backend, named by the folder it came from."""
    if isinstance(pipe, SMPBackend | FLF2VBackend):
        return pipe
    return SMPBackend(pipe, model=pipe.name_or_path or "")


def _flf2v_dtype(dtype: str, device: str) -> Any:
    # Wan and LTX are published in bfloat16 (their fp16 activations can overflow); fp32 on the CPU
    if dtype == "auto" and device == "cuda":
        return torch.bfloat16
    return pick_dtype(dtype, device)


def load_backend(
    backend: str = "smp",
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    cpu_offload: bool = False,
    vae_tiling: bool = False,
) -> TransitionBackend:
    """The transition step, loaded: `smp` (model: 'tiny' by default, a TransitionPipeline folder or hub id) or
    `flf2v` (model: a WanImageToVideoPipeline / LTXConditionPipeline folder or hub id, or 'tiny-random-flf2v').

    `cpu_offload` (GPU only): diffusers' model CPU offload, one component on the GPU at a time.
    `vae_tiling`: the VAE decodes (and encodes) in tiles, for large frames.
    """
    if backend not in BACKENDS:
        raise StoryDiffusionError(f"--backend {backend!r} is not one of {BACKENDS}")
    device = pick_device(device)
    if cpu_offload and device != "cuda":  # checked before minutes of loading, not after
        raise StoryDiffusionError("--cpu-offload moves models between a GPU and the CPU; it needs --device cuda")
    if backend == "smp":
        model = model or TINY
        loaded: TransitionBackend = SMPBackend(_transition_pipeline(model, pick_dtype(dtype, device)), model)
    elif model is None:
        raise StoryDiffusionError(
            "--backend flf2v needs --model: a WanImageToVideoPipeline or LTXConditionPipeline hub id or folder "
            f"(e.g. Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers), or {TINY_RANDOM_FLF2V!r}"
        )
    elif model == TINY_RANDOM_FLF2V:
        from storydiffusion.video.tiny_random_flf2v import tiny_wan_flf2v_pipeline

        pipe = tiny_wan_flf2v_pipeline(seed=0)
        torch_dtype = _flf2v_dtype(dtype, device)
        loaded = FLF2VBackend(pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype), model)
    else:
        loaded = FLF2VBackend.from_pretrained(
            resolve_video_model(model), model=model, **dtype_kwargs(_flf2v_dtype(dtype, device))
        )
    if cpu_offload:
        loaded.pipe.enable_model_cpu_offload(device=device)
    else:
        loaded.pipe.to(device)
    if vae_tiling:
        vae = getattr(loaded.pipe, "vae", None)
        if not hasattr(vae, "enable_tiling"):
            raise StoryDiffusionError(f"--vae-tiling: the VAE of {model!r} ({type(vae).__name__}) cannot work in tiles")
        vae.enable_tiling()
    return loaded


def transition_record(backend: TransitionBackend, settings: TransitionSettings) -> dict[str, Any]:
    """Everything besides the keyframes and the prompt that made a transition's frames: a rerun reuses
    them only when all of it matches."""
    record: dict[str, Any] = {
        "backend": backend.name,
        "model": backend.model,
        "dtype": str(backend.dtype).removeprefix("torch."),
        "vae_tiling": bool(getattr(getattr(backend.pipe, "vae", None), "use_tiling", False)),  # tiles blend seams
        **asdict(settings),
    }
    if isinstance(backend, FLF2VBackend):
        record["pipeline"] = backend.family.class_name
        for key in ("motion", "keyframe_tokens", "keyframe_strength"):  # the SMP's switches, unused by flf2v
            del record[key]
    return record


def check_transition_settings_for_flf2v(settings: TransitionSettings) -> None:
    """The smp backend's own switches, refused for flf2v (before a model loads)."""
    if settings.motion != "smp":
        raise StoryDiffusionError(
            f"motion={settings.motion!r} switches the Semantic Motion Predictor of --backend smp; flf2v has none"
        )
    for name in ("keyframe_tokens", "keyframe_strength"):
        if getattr(settings, name) is not None:
            raise StoryDiffusionError(
                f"{name.replace('_', ' ')} is a setting of --backend smp (its keyframe attention); flf2v has none"
            )


def check_transition(backend: TransitionBackend, settings: TransitionSettings) -> TransitionSettings:
    """Settings the backend cannot make, refused before any keyframe is read; returns them completed (every
    None filled by the backend: what makes the frames, and what a rerun must match to reuse them)."""
    if isinstance(backend, FLF2VBackend):
        check_transition_settings_for_flf2v(settings)
    settings = backend.complete(settings)
    backend.check_num_frames(settings.num_frames)
    return settings


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
    pipe: TransitionPipeline | TransitionBackend,
    start: Image.Image,
    end: Image.Image,
    prompt: str,
    settings: TransitionSettings,
) -> list[Image.Image]:
    """One transition's frames, seeded by `settings.seed`."""
    backend = as_backend(pipe)
    settings = backend.complete(settings)
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    common = dict(
        num_frames=settings.num_frames,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        negative_prompt=settings.negative_prompt or None,
        generator=generator,
    )
    if isinstance(backend, FLF2VBackend):
        return backend(start, end, prompt, **common)
    keyframes = dict(keyframe_tokens=settings.keyframe_tokens, keyframe_strength=settings.keyframe_strength)
    output = backend.pipe(start, end, prompt, motion=settings.motion, **keyframes, **common)
    return output.frames[0]


def run_transition(
    pipe: TransitionPipeline | TransitionBackend,
    start_path: Path,
    end_path: Path,
    prompt: str,
    out: Path,
    settings: TransitionSettings,
    fps: float | None = None,
) -> Path:
    """START + END images -> a video file (MP4 or GIF, by `out`'s suffix); `fps` defaults to the backend's
    (8 for smp, the model's own for flf2v)."""
    backend = as_backend(pipe)
    settings = check_transition(backend, settings)
    start, end = read_keyframe(start_path), read_keyframe(end_path)
    backend.check_keyframes(start, end, str(start_path), str(end_path))
    frames = transition(backend, start, end, prompt, settings)
    return write_video(frames, out, backend.default_fps if fps is None else fps)


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
    pipe: TransitionPipeline | TransitionBackend,
    story_dir: Path,
    out: Path | None,
    settings: TransitionSettings,
    fps: float | None = None,
    on_transition: Callable[[int, int], None] | None = None,
) -> tuple[Path, list[int]]:
    """Chain every pair of consecutive panels of a story run into one video; returns (file, reused pairs).

    Transition i (panel i -> panel i+1) follows panel i+1's prompt. Each one's frames are kept in
    `story_dir/video/transition_NN/`; on a rerun with the same backend, model and settings they are reused.
    `fps` defaults to the backend's (8 for smp, the model's own for flf2v).
    """
    backend = as_backend(pipe)
    settings = check_transition(backend, settings)
    panels = story_panels(story_dir)
    images = [read_keyframe(path) for path, _ in panels]
    for (path, _), image in zip(panels[1:], images[1:]):
        backend.check_keyframes(images[0], image, str(panels[0][0]), str(path))
    frames: list[Image.Image] = []
    reused: list[int] = []
    for i in range(len(panels) - 1):
        folder = Path(story_dir) / "video" / f"transition_{i:02d}"
        prompt = panels[i + 1][1]
        record = {
            "start": panels[i][0].name,
            "end": panels[i + 1][0].name,
            "prompt": prompt,
            **transition_record(backend, settings),
        }
        paths = _transition_done(folder, record)
        if paths is None:
            clip = transition(backend, images[i], images[i + 1], prompt, settings)
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
    return write_video(frames, target, backend.default_fps if fps is None else fps), reused
