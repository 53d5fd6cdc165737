"""`StoryPipeline`: a story's frames from a diffusers SD1.5/SDXL pipeline, characters kept consistent.

It wraps a loaded `StableDiffusionPipeline` or `StableDiffusionXLPipeline` (never copies it) and
runs two phases with Consistent Self-Attention installed on its UNet:

1. reference phase — per character, its first `id_length` frames are generated together with
   mutual CSA, filling the character's identity bank;
2. frame phase — every other frame is generated alone (or in small batches) reading the banks of
   the characters it names; a frame naming nobody reads nothing.

The wrapped pipeline's own processors are back in place when a call returns.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from tqdm.auto import tqdm

from storydiffusion.csa.attention import CSAConfig
from storydiffusion.csa.bank import STORAGE_DTYPES, BankSettings, IdentityBank
from storydiffusion.csa.controller import ConsistentAttention, select_layers
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.pipelines.frames import Frame, parse_frame
from storydiffusion.pipelines.prompts import encode_long_prompts, needs_chunking

# arguments StoryPipeline sets itself on every call of the wrapped pipeline
_RESERVED_KWARGS = {
    "prompt", "negative_prompt", "generator", "callback_on_step_end", "num_images_per_prompt",
    "latents", "prompt_embeds", "negative_prompt_embeds", "height", "width", "num_inference_steps",
    "guidance_scale", "output_type", "timesteps", "sigmas", "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
}  # fmt: skip


@dataclass(frozen=True)
class FrameInfo:
    """What produced a frame: enough to reproduce or audit it."""

    index: int
    prompt: str
    negative_prompt: str
    seed: int
    characters: tuple[str, ...]
    role: Literal["reference", "frame"]


@dataclass
class StoryPipelineOutput:
    images: list[Any]  # PIL images (or arrays / tensors, per output_type), in frame order
    frames: list[FrameInfo]
    banks: dict[str, IdentityBank] = field(default_factory=dict)


def derived_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed for a sub-stream (e.g. one character's token sampling)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def frame_seed(seed: int, index: int, same_initial_noise: bool = False) -> int:
    """Seed of frame `index`'s initial noise."""
    return seed if same_initial_noise else seed + index


def unet_fingerprint(unet: Any) -> str:
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StoryPipeline:
    """Consistent characters across a story's frames, on any SD1.5/SD2.x/SDXL diffusers pipeline.

    >>> story = StoryPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16)
    >>> out = story({"Bob": "a man with red hair, black suit"}, ["[Bob] at home", "[Bob] on a bus", "[NC] a city"],
    ...             id_length=2, seed=1)
    >>> out.images[0].save("panel0.png"); out.banks["Bob"].save("bob.safetensors")
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        csa_config: CSAConfig | None = None,
        bank_dtype: str = "int8",
        bank_device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(pipe, StableDiffusionPipeline | StableDiffusionXLPipeline):
            raise StoryDiffusionError(
                f"StoryPipeline wraps a StableDiffusionPipeline or StableDiffusionXLPipeline, got {type(pipe).__name__}"
            )
        if bank_dtype not in STORAGE_DTYPES:
            raise StoryDiffusionError(f"bank_dtype={bank_dtype!r} is not supported; use one of {STORAGE_DTYPES}")
        self.pipe = pipe
        self.csa = ConsistentAttention(csa_config)
        self.bank_dtype = bank_dtype
        self.bank_device = torch.device(bank_device)
        select_layers(pipe.unet, self.csa.config)  # fail now, not at the first call

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        csa_config: CSAConfig | None = None,
        bank_dtype: str = "int8",
        bank_device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> StoryPipeline:
        """Load a checkpoint (hub id or folder) with `DiffusionPipeline.from_pretrained(model, **kwargs)`."""
        return cls(DiffusionPipeline.from_pretrained(model, **kwargs), csa_config, bank_dtype, bank_device)

    def to(self, *args: Any, **kwargs: Any) -> StoryPipeline:
        self.pipe.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def __repr__(self) -> str:
        return f"StoryPipeline(pipe={type(self.pipe).__name__}, csa={self.csa})"

    # -- settings --------------------------------------------------------------------------
    def default_size(self) -> tuple[int, int]:
        side = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return side, side

    def num_denoising_steps(self, num_inference_steps: int) -> int:
        """Length of the denoising loop (a second-order scheduler calls the UNet more than once per step)."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(num_inference_steps)
        return len(scheduler.timesteps)

    def bank_settings(
        self,
        num_inference_steps: int,
        guidance_scale: float,
        height: int | None = None,
        width: int | None = None,
        id_length: int = 0,
    ) -> BankSettings:
        """The settings a bank made (or read) by a call with these arguments carries."""
        default_height, default_width = self.default_size()
        guided = guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None
        return BankSettings(
            model=self.pipe.name_or_path or "",
            unet_fingerprint=unet_fingerprint(self.pipe.unet),
            scheduler=type(self.pipe.scheduler).__name__,
            num_steps=self.num_denoising_steps(num_inference_steps),
            height=height or default_height,
            width=width or default_width,
            guidance_halves=2 if guided else 1,
            id_length=id_length,
        )

    # -- the call ----------------------------------------------------------------------------
    def check_inputs(
        self,
        characters: Mapping[str, str],
        frames: Sequence[Frame],
        id_length: int,
        banks: Mapping[str, IdentityBank],
        frame_batch_size: int,
        pipeline_kwargs: Mapping[str, Any],
    ) -> None:
        if not frames:
            raise StoryDiffusionError("frames is empty: give at least one frame")
        if not isinstance(id_length, int) or not 1 <= id_length <= len(frames):
            raise StoryDiffusionError(
                f"id_length={id_length!r} must be an integer from 1 to the number of frames ({len(frames)})"
            )
        if frame_batch_size < 1:
            raise StoryDiffusionError(f"frame_batch_size={frame_batch_size} must be at least 1")
        for index, frame in enumerate(frames):
            if not frame.prompt.strip():
                raise StoryDiffusionError(f"frame {index} has an empty prompt")
            for name in frame.characters:
                if name not in characters and name not in banks:
                    raise StoryDiffusionError(
                        f"frame {index} ({frame.prompt!r}) names unknown character {name!r}; "
                        f"known: {sorted({*characters, *banks})}"
                    )
        for name in banks:
            if name not in characters:
                raise StoryDiffusionError(f"a bank is given for {name!r}, who is not among the characters")
        reserved = sorted(_RESERVED_KWARGS & set(pipeline_kwargs))
        if reserved:
            raise StoryDiffusionError(f"{reserved} are set by StoryPipeline itself; pass them as its own arguments")

    @torch.no_grad()
    def __call__(
        self,
        characters: Mapping[str, str],
        frames: Sequence[str | Frame],
        *,
        id_length: int = 3,
        negative_prompt: str = "",
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        height: int | None = None,
        width: int | None = None,
        seed: int = 0,
        same_initial_noise: bool = False,
        banks: Mapping[str, IdentityBank] | None = None,
        frame_batch_size: int = 1,
        output_type: str = "pil",
        progress: bool = True,
        skip_frames: Collection[int] = (),
        on_frame: Callable[[FrameInfo, Any], None] | None = None,
        on_bank: Callable[[str, IdentityBank], None] | None = None,
        **pipeline_kwargs: Any,
    ) -> StoryPipelineOutput:
        """Generate every frame of a story.

        Args:
            characters: name -> description, substituted for `[Name]` in string frames.
            frames: one entry per panel: a string with `[Name]` / `[NC]` tags, or a `Frame`.
            id_length: reference frames per character (its first frames naming only that character).
            seed: frame i's initial noise comes from seed + i (or seed alone with `same_initial_noise`,
                the public code's consistency prior); token sampling from seeds derived from it.
            banks: saved characters to reuse (`IdentityBank.load`); they skip the reference phase.
            frame_batch_size: frames naming the same characters generated together in the frame phase.
            skip_frames: frames not to generate (e.g. already on disk when resuming); their images are
                None. A character's reference frames still run when a frame that is generated needs its bank.
            on_frame: called with (FrameInfo, image) as soon as each frame is done — write it out there.
            on_bank: called with (name, bank) as soon as a character's reference phase is done.
            pipeline_kwargs: passed on to the wrapped pipeline (e.g. `guidance_rescale`).
        """
        # 1. Check inputs
        banks = dict(banks or {})
        resolved = [f if isinstance(f, Frame) else parse_frame(f, characters) for f in frames]
        self.check_inputs(characters, resolved, id_length, banks, frame_batch_size, pipeline_kwargs)
        height, width = height or self.default_size()[0], width or self.default_size()[1]
        settings = self.bank_settings(num_inference_steps, guidance_scale, height, width, id_length)
        for bank in banks.values():
            bank.check_compatible(settings)

        # 2. Pick the reference frames of each character that a frame to generate needs
        todo = [i for i in range(len(resolved)) if i not in set(skip_frames)]
        needed = {name for i in todo for name in resolved[i].characters}
        references = {
            name: indices
            for name, indices in self.reference_frames(resolved, id_length, exclude=set(banks)).items()
            if name in needed
        }
        reference_of = {index: name for name, indices in references.items() for index in indices}
        infos = [
            FrameInfo(
                index=i,
                prompt=frame.prompt,
                negative_prompt=negative_prompt if frame.negative_prompt is None else frame.negative_prompt,
                seed=frame_seed(seed, i, same_initial_noise),
                characters=frame.characters,
                role="reference" if i in reference_of else "frame",
            )
            for i, frame in enumerate(resolved)
        ]
        images: list[Any] = [None] * len(resolved)
        common = dict(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            output_type=output_type,
            **pipeline_kwargs,
        )

        with (
            self.csa.installed(self.pipe.unet),
            tqdm(total=len(resolved), desc="frames", unit="frame", disable=not progress) as bar,
        ):
            # 3. Reference phase: each character's references together, mutual CSA, bank written
            character_order = list(characters)
            for name, indices in references.items():
                bank = IdentityBank(name, settings, self.bank_dtype, self.bank_device)
                sampler = torch.Generator().manual_seed(derived_seed(seed, 1, character_order.index(name)))
                self.csa.begin_mutual(settings.num_steps, len(indices), sampler, bank)
                self._generate(indices, infos, images, common, on_frame)
                banks[name] = bank
                if on_bank is not None:
                    on_bank(name, bank)
                bar.update(len(indices))

            # 4. Frame phase: the rest, reading the banks of the characters they name
            rest = [infos[i] for i in todo if i not in reference_of]
            for indices in self._frame_batches(rest, frame_batch_size):
                named = infos[indices[0]].characters
                self.csa.begin_read(settings.num_steps, len(indices), [banks[name] for name in named])
                self._generate(indices, infos, images, common, on_frame)
                bar.update(len(indices))
            self.csa.end()

        return StoryPipelineOutput(images=images, frames=infos, banks=banks)

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def reference_frames(frames: Sequence[Frame], id_length: int, exclude: set[str]) -> dict[str, list[int]]:
        """Per named character (not in `exclude`), its first `id_length` frames that show it alone."""
        references: dict[str, list[int]] = {}
        for name in dict.fromkeys(n for f in frames for n in f.characters):
            if name in exclude:
                continue
            solo = [i for i, f in enumerate(frames) if f.characters == (name,)][:id_length]
            if len(solo) < id_length:
                raise StoryDiffusionError(
                    f"character {name!r} needs id_length={id_length} reference frames that show only them, "
                    f"found {len(solo)} (frames {solo}); add solo frames of {name!r} or lower id_length"
                )
            references[name] = solo
        return references

    @staticmethod
    def _frame_batches(infos: Sequence[FrameInfo], size: int) -> list[list[int]]:
        """Frames grouped by the characters they name, in chunks of `size`."""
        groups: dict[tuple[str, ...], list[int]] = {}
        for info in infos:
            groups.setdefault(info.characters, []).append(info.index)
        return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]

    def _generate(
        self,
        indices: Sequence[int],
        infos: Sequence[FrameInfo],
        images: list,
        common: dict,
        on_frame: Callable[[FrameInfo, Any], None] | None,
    ) -> None:
        """One call of the wrapped pipeline for frames `indices`; images land in `images`."""
        prompts = [infos[i].prompt for i in indices]
        negatives = [infos[i].negative_prompt for i in indices]
        negatives = negatives if any(negatives) else None  # None: SDXL's zeroed negative embedding
        if needs_chunking(self.pipe, [*prompts, *(negatives or [])]):
            text = encode_long_prompts(self.pipe, prompts, negatives)  # no silent cut at 77 tokens
        else:
            text = {"prompt": prompts, "negative_prompt": negatives}
        result = self.pipe(
            **text,
            generator=[torch.Generator().manual_seed(infos[i].seed) for i in indices],
            callback_on_step_end=self.csa.step_callback,
            **common,
        )
        for slot, image in zip(indices, result.images):
            images[slot] = image
            if on_frame is not None:
                on_frame(infos[slot], image)
