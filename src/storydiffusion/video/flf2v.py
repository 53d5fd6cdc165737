"""The `flf2v` backend: a diffusers first/last-frame-to-video pipeline makes the transition between two keyframes.

Two pipeline classes of diffusers take a first and a last frame, each in its own way:

- `WanImageToVideoPipeline` (Wan2.1-FLF2V, Wan2.2-I2V): `pipe(image=start, last_image=end, ...)`; it makes
  4k+1 frames (its VAE packs 4 frames into each latent after the first), at sizes that are multiples of 16;
- `LTXConditionPipeline` (LTX-Video 0.9.5 on): `pipe(conditions=[LTXVideoCondition(image=start, frame_index=0),
  LTXVideoCondition(image=end, frame_index=num_frames - 1)], ...)`; 8k+1 frames, multiples of 32.

`FLF2VBackend` wraps one such pipeline — loaded by `from_pretrained`, or built — and checks what its class
would otherwise reject deep inside torch, or silently change (the frame count, the size); the pipeline does
all the work. The ends of the frames it returns are the keyframes themselves, so in a chained story video
every panel appears exactly as it was drawn (the model's own first and last frames are VAE reconstructions
of them, close but not the same pixels).
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from storydiffusion.errors import StoryDiffusionError


@dataclass(frozen=True)
class FLF2VFamily:
    """A diffusers pipeline class that conditions on a first and a last frame."""

    class_name: str  # as model_index.json's `_class_name` spells it
    since: str  # the first diffusers release whose class takes both frames
    fps: float  # the frame rate its models were trained at: the default of the video file
    size_multiple: int  # the class's own check_inputs insists on this, whatever the VAE
    # other classes a checkpoint's model_index.json may name whose components this class loads as they are
    loads_from: tuple[str, ...] = ()


WAN = FLF2VFamily("WanImageToVideoPipeline", since="0.34.0", fps=16.0, size_multiple=16)  # `last_image=` came in 0.34
# LTX-Video repositories may name LTXPipeline in their model_index.json; diffusers' own examples load them
# (0.9.5 on) as LTXConditionPipeline, which takes the same scheduler, VAE, text encoder, tokenizer and transformer
LTX = FLF2VFamily(
    "LTXConditionPipeline",
    since="0.33.0",
    fps=25.0,
    size_multiple=32,
    loads_from=("LTXPipeline", "LTXImageToVideoPipeline"),
)
FAMILIES = (WAN, LTX)
DEFAULT_STEPS = 25  # a transition's steps where none are given (the classes' own 50 take twice as long)
SUPPORTED = tuple(family.class_name for family in FAMILIES)


def family_named(class_name: str, checkpoint: bool = False) -> FLF2VFamily:
    """The supported family of a pipeline class name, or an error that names the supported ones.
    `checkpoint`: the name comes from a model_index.json, which may name a class the family loads from."""
    for family in FAMILIES:
        if family.class_name == class_name or (checkpoint and class_name in family.loads_from):
            return family
    hint = " (that is this project's own: use --backend smp)" if class_name == "TransitionPipeline" else ""
    raise StoryDiffusionError(f"--backend flf2v runs a {' or a '.join(SUPPORTED)}; this model is a {class_name}{hint}")


def pipeline_class(family: FLF2VFamily) -> type:
    """The installed diffusers' class of `family`, or an error that says which diffusers release has it."""
    import diffusers

    cls = getattr(diffusers, family.class_name, None)
    takes_both = cls is not None and (family is not WAN or "last_image" in inspect.signature(cls.__call__).parameters)
    if not takes_both:
        raise StoryDiffusionError(
            f"{family.class_name} with first- and last-frame conditioning needs diffusers >= {family.since} "
            f"(installed: {diffusers.__version__}): pip install -U 'diffusers>={family.since}'"
        )
    return cls


def model_class_name(path: str) -> str:
    """The `_class_name` of a pipeline folder's or hub repository's model_index.json, read without weights."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(path)
    except (OSError, ValueError) as error:
        hint = "" if Path(path).exists() else " (no such folder; a hub id needs the network and HF_HUB_OFFLINE unset)"
        raise StoryDiffusionError(
            f"cannot read the model_index.json of {path!r}{hint}: {str(error).splitlines()[0]}"
        ) from error
    name = config.get("_class_name")
    if not isinstance(name, str):
        raise StoryDiffusionError(f"the model_index.json of {path!r} names no pipeline class (`_class_name`)")
    return name


def _signature_default(pipe: Any, name: str) -> Any:
    return inspect.signature(type(pipe).__call__).parameters[name].default


class FLF2VBackend:
    """A diffusers first/last-frame-to-video pipeline behind the story video's transition step.

    backend = FLF2VBackend.from_pretrained("Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers", dtype=torch.bfloat16)
    frames = backend(start, end, "she jumps", num_frames=33, num_inference_steps=30,
                     generator=torch.Generator().manual_seed(0))
    """

    name = "flf2v"

    def __init__(self, pipe: Any, model: str = "") -> None:
        self.family = family_named(type(pipe).__name__)
        self.pipe = pipe
        self.model = model  # what the user named it by (hub id, folder, short name): recorded with its frames
        self._check_pipeline()

    @classmethod
    def from_pretrained(cls, path: str, model: str | None = None, **kwargs: Any) -> FLF2VBackend:
        """Load a supported pipeline; the class is read from model_index.json first, so an unsupported
        model is refused before any weights are read. `kwargs` go to the class's `from_pretrained`."""
        family = family_named(model_class_name(path), checkpoint=True)
        try:
            pipe = pipeline_class(family).from_pretrained(path, **kwargs)
        except (OSError, ValueError) as error:
            first_line = str(error).splitlines()[0]
            raise StoryDiffusionError(f"cannot load {family.class_name} {path!r}: {first_line}") from error
        tokenizer = getattr(pipe, "tokenizer", None)
        if tokenizer is not None and len(tokenizer) < 2:
            raise StoryDiffusionError(f"{path!r}: its tokenizer loaded empty (offline without its files?)")
        return cls(pipe, model if model is not None else path)

    def _check_pipeline(self) -> None:
        """What the class would accept and then fail on deep in torch, or do with one keyframe only."""
        pipe, where = self.pipe, self.model or type(self.pipe).__name__
        if self.family is not WAN:
            return
        if "last_image" not in inspect.signature(type(pipe).__call__).parameters:
            pipeline_class(WAN)  # raises: this diffusers' Wan pipeline predates first/last-frame conditioning
        if getattr(pipe.config, "expand_timesteps", False):
            raise StoryDiffusionError(
                f"{where}: this Wan pipeline (expand_timesteps, as Wan2.2-TI2V-5B) conditions on the first frame "
                "only; use a first/last-frame checkpoint such as Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers"
            )
        transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
        config = transformer.config
        if config.image_dim is not None and config.pos_embed_seq_len is None:
            # Wan2.1-I2V reads the CLIP tokens of one image; given two it fails on a batch mismatch
            raise StoryDiffusionError(
                f"{where}: this Wan transformer reads one keyframe's image tokens (no pos_embed_seq_len: a Wan2.1-I2V "
                "checkpoint); use a first/last-frame one such as Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers"
            )
        if "ftfy" not in vars(sys.modules[type(pipe).__module__]):
            # diffusers' Wan pipelines clean every prompt with ftfy, imported only where installed
            raise StoryDiffusionError(
                "diffusers' Wan pipelines clean prompts with ftfy, not installed: pip install ftfy"
            )

    # -- what the model makes --------------------------------------------------------------------------
    @property
    def frame_step(self) -> int:
        """Frames the VAE packs into each latent after the first: a clip has frame_step * k + 1 frames."""
        if self.family is WAN:
            return int(self.pipe.vae_scale_factor_temporal)
        return int(self.pipe.vae_temporal_compression_ratio)

    @property
    def size_multiple(self) -> int:
        """Both sides of a keyframe must be a multiple of this (VAE factor x transformer patch, and the class's own)."""
        pipe = self.pipe
        if self.family is WAN:
            transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
            patch = max(transformer.config.patch_size[1:])
            return math.lcm(self.family.size_multiple, pipe.vae_scale_factor_spatial * patch)
        patch = pipe.transformer_spatial_patch_size
        return math.lcm(self.family.size_multiple, pipe.vae_spatial_compression_ratio * patch)

    @property
    def default_frames(self) -> int:
        """The class's own default clip length (Wan 81, LTX 161)."""
        return int(_signature_default(self.pipe, "num_frames"))

    @property
    def default_guidance(self) -> float:
        """The class's own default guidance scale (Wan 5, LTX 3)."""
        return float(_signature_default(self.pipe, "guidance_scale"))

    @property
    def default_fps(self) -> float:
        return self.family.fps

    def complete(self, settings: Any) -> Any:
        """A transition's settings (`app.video_runner.TransitionSettings`) with every None filled: the class's own
        clip length and guidance, and DEFAULT_STEPS."""
        return replace(
            settings,
            num_frames=self.default_frames if settings.num_frames is None else settings.num_frames,
            steps=DEFAULT_STEPS if settings.steps is None else settings.steps,
            guidance=self.default_guidance if settings.guidance is None else settings.guidance,
        )

    @property
    def dtype(self) -> Any:
        return self.pipe.dtype

    def valid_frame_counts(self, near: int) -> list[int]:
        """The counts this model makes next to `near`, below and above (never fewer than frame_step + 1)."""
        step = self.frame_step
        below = (near - 1) // step * step + 1
        return [n for n in (below, below + step) if n >= step + 1]

    def check_num_frames(self, num_frames: int) -> None:
        """Refuse a count the model cannot make (the pipeline would round it silently and the ends would move)."""
        step = self.frame_step
        if num_frames < step + 1 or (num_frames - 1) % step:
            nearest = " or ".join(str(n) for n in self.valid_frame_counts(num_frames))
            raise StoryDiffusionError(
                f"frames={num_frames}: {self.family.class_name} makes {step}k+1 frames (its VAE packs {step} frames "
                f"into each latent after the first), keyframes included; use {nearest}"
            )

    def check_keyframes(self, start: Image.Image, end: Image.Image, start_name: str, end_name: str) -> None:
        """Both keyframes the same size, a multiple of `size_multiple` on each side (the clip is made at it)."""
        if start.size != end.size:
            raise StoryDiffusionError(
                f"{start_name} is {start.size[0]}x{start.size[1]} but {end_name} is {end.size[0]}x{end.size[1]}: "
                "keyframes must have the same size"
            )
        multiple = self.size_multiple
        if start.size[0] % multiple or start.size[1] % multiple:
            raise StoryDiffusionError(
                f"{start_name}: size {start.size[0]}x{start.size[1]} must be a multiple of {multiple} on each side "
                f"for {self.family.class_name} (resize the panels, or draw them at such a size)"
            )

    def conditioning(self, start: Image.Image, end: Image.Image, num_frames: int) -> dict[str, Any]:
        """The keyword arguments that put `start` at the first frame and `end` at the last."""
        if self.family is WAN:
            return {"image": start, "last_image": end}
        from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

        first, last = (
            LTXVideoCondition(image=start, frame_index=0),
            LTXVideoCondition(image=end, frame_index=num_frames - 1),
        )
        return {"conditions": [first, last]}

    def __call__(
        self,
        start: Image.Image,
        end: Image.Image,
        prompt: str,
        *,
        num_frames: int,
        num_inference_steps: int,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        generator: Any = None,
        callback_on_step_end: Callable[..., dict] | None = None,
    ) -> list[Image.Image]:
        """The clip from `start` to `end`: `num_frames` images, the keyframes themselves at the two ends."""
        self.check_keyframes(start, end, "start keyframe", "end keyframe")
        self.check_num_frames(num_frames)
        width, height = start.size
        output = self.pipe(
            **self.conditioning(start, end, num_frames),
            prompt=prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=self.default_guidance if guidance_scale is None else guidance_scale,
            generator=generator,
            output_type="pil",
            callback_on_step_end=callback_on_step_end,
        )
        frames = list(output.frames[0])
        if len(frames) != num_frames:  # checked above; a pipeline that rounds anyway must not shift the ends
            raise StoryDiffusionError(f"{self.family.class_name} made {len(frames)} frames, not {num_frames}")
        return [start.convert("RGB"), *frames[1:-1], end.convert("RGB")]

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    def __repr__(self) -> str:
        return f"FLF2VBackend({self.family.class_name}, model={self.model!r}, frames={self.frame_step}k+1)"
