"""`StoryPipeline`: a story's frames from a diffusers SD1.5/SDXL, Flux.1 or SD3 pipeline, characters kept
consistent.

It wraps a loaded `StableDiffusionPipeline` or `StableDiffusionXLPipeline`, or their ControlNet
versions, any of them with an IP-Adapter or LoRA loaded, or a `FluxPipeline` or
`StableDiffusion3Pipeline` (never copies it), and runs two phases with Consistent Self-Attention
installed on its denoiser (the UNet's self-attention, the transformer's joint attention):

1. reference phase — per character, its first `id_length` frames are generated together with
   mutual CSA, filling the character's identity bank;
2. frame phase — every other frame is generated alone (or in small batches) reading the banks of
   the characters it names; a frame naming nobody reads nothing.

The wrapped pipeline's own processors are back in place when a call returns.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
)
from tqdm.auto import tqdm

from storydiffusion.csa.attention import CSAConfig
from storydiffusion.csa.bank import STORAGE_DTYPES, BankCompaction, BankSettings, BankStorage, IdentityBank, as_storage
from storydiffusion.csa.controller import ConsistentAttention, denoising_timesteps, model_kind, select_layers
from storydiffusion.csa.masks import box_mask
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.pipelines.frames import Frame, FrameInfo, parse_frame
from storydiffusion.pipelines.inputs import check_story_inputs, t5_tokenizer
from storydiffusion.pipelines.pictures import (
    Picture,
    denoiser_input,
    encode_pictures,
    fit_character_pictures,
    fixed_level_timestep,
    images_as_pixels,
    noised,
    picture_pixels,
)
from storydiffusion.pipelines.prompts import (
    encode_frames,
    needs_own_encoding,
    phrase_positions,
    sequence_phrase_positions,
)
from storydiffusion.pipelines.recommended import PAPER_DEFAULTS, RecommendedSettings, read_recommended
from storydiffusion.pipelines.wrapped import (
    active_adapters,
    check_pipeline,
    denoiser_fingerprint,
    denoiser_of,
    is_controlnet_pipeline,
    public_config,
    weights_probe,
)

logger = logging.getLogger(__name__)


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
        bank_storage: BankStorage | str = "auto",
        bank_compaction: BankCompaction | None = None,
        recommended: RecommendedSettings | None = None,
    ) -> None:
        check_pipeline(pipe)
        if bank_dtype not in STORAGE_DTYPES:
            raise StoryDiffusionError(f"bank_dtype={bank_dtype!r} is not supported; use one of {STORAGE_DTYPES}")
        self.pipe = pipe
        # the model's `storydiffusion.json` (`from_pretrained` reads it): its CSA settings when none are given,
        # its steps / guidance / size / id_length for calls that set none
        self.recommended = recommended
        if csa_config is None and recommended is not None:
            csa_config = recommended.csa_config()
        self.csa = ConsistentAttention(csa_config)
        self.bank_dtype = bank_dtype
        self.bank_device = torch.device(bank_device)
        # where new banks live ("auto": RAM until 256 MiB, then a file read a step at a time) and what
        # they keep (lossy options; default: everything); see csa.bank
        self.bank_storage = as_storage(bank_storage)
        self.bank_compaction = bank_compaction or BankCompaction()
        self.kind = model_kind(self.denoiser)
        select_layers(self.denoiser, self.csa.config)  # fail now, not at the first call
        if self.kind != "unet" and self.csa.config.reference_strength != 1.0:
            raise StoryDiffusionError(
                f"CSAConfig(reference_strength={self.csa.config.reference_strength}) weighs borrowed keys in a UNet's "
                "self-attention; the joint attention of Flux and SD3 does not take it yet: leave it at 1"
            )

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        csa_config: CSAConfig | None = None,
        bank_dtype: str = "int8",
        bank_device: str | torch.device = "cpu",
        bank_storage: BankStorage | str = "auto",
        **kwargs: Any,
    ) -> StoryPipeline:
        """Load a checkpoint (hub id or folder) with `DiffusionPipeline.from_pretrained(model, **kwargs)`.

        A `storydiffusion.json` beside the model's files (`pipelines.recommended`) gives the CSA settings when
        `csa_config` is None and the call defaults (steps, guidance, size, id_length) a call does not set."""
        pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
        recommended = read_recommended(model)
        return cls(pipe, csa_config, bank_dtype, bank_device, bank_storage, recommended=recommended)

    def to(self, *args: Any, **kwargs: Any) -> StoryPipeline:
        self.pipe.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def denoiser(self) -> Any:
        """The model CSA runs on: `pipe.unet`, or `pipe.transformer` for Flux and SD3."""
        return denoiser_of(self.pipe)

    def __repr__(self) -> str:
        return f"StoryPipeline(pipe={type(self.pipe).__name__}, csa={self.csa})"

    # -- settings --------------------------------------------------------------------------
    def generation_defaults(self) -> dict[str, Any]:
        """steps, guidance and id_length for a call that sets none: the model's recommended settings (its
        `storydiffusion.json`), else the paper's (50, 5.0, 3)."""
        recommended = self.recommended.generation() if self.recommended is not None else {}
        return {key: recommended.get(key, value) for key, value in PAPER_DEFAULTS.items()}

    def default_size(self) -> tuple[int, int]:
        """(height, width) of a call that sets none: the model's recommended size, else its own sample size."""
        if self.recommended is not None and self.recommended.height and self.recommended.width:
            return self.recommended.height, self.recommended.width
        if self.kind == "unet":
            side = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        else:
            side = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return side, side

    def denoising_timesteps(
        self, num_inference_steps: int, height: int | None = None, width: int | None = None
    ) -> list[float]:
        """The distinct timesteps of the denoising loop; CSA's step i is the i-th of them. Flux (and SD3 with
        dynamic shifting) shift the schedule by the image's token count, computed here as their pipelines do."""
        if self.kind == "unet":
            return denoising_timesteps(self.pipe.scheduler, num_inference_steps)
        default_height, default_width = self.default_size()
        return denoising_timesteps(
            self.pipe.scheduler,
            num_inference_steps,
            **self._flow_schedule_kwargs(num_inference_steps, height or default_height, width or default_width),
        )

    def _flow_schedule_kwargs(self, num_inference_steps: int, height: int, width: int) -> dict[str, Any]:
        """The `set_timesteps` arguments FluxPipeline / StableDiffusion3Pipeline pass for this size."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config, factor = self.pipe.scheduler.config, self.pipe.vae_scale_factor
        kwargs: dict[str, Any] = {}
        if self.kind == "flux":
            tokens = (height // (factor * 2)) * (width // (factor * 2))
            if not config.get("use_flow_sigmas", False):
                kwargs["sigmas"] = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
            shift = (config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        else:
            if not config.get("use_dynamic_shifting", False):
                return kwargs
            patch = self.pipe.transformer.config.patch_size
            tokens = (height // factor // patch) * (width // factor // patch)
            shift = (config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        kwargs["mu"] = calculate_shift(
            tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096), *shift
        )
        return kwargs

    def bank_settings(
        self,
        *,
        num_inference_steps: int,
        guidance_scale: float,
        height: int | None = None,
        width: int | None = None,
        id_length: int = 0,
    ) -> BankSettings:
        """The settings a bank made (or read) by a call with these arguments carries (keyword-only: the
        sizes and counts are all integers, and a swapped pair would pass unnoticed)."""
        default_height, default_width = self.default_size()
        height, width = height or default_height, width or default_width
        if self.kind == "unet":
            guided = guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None
        else:  # Flux is guidance-distilled (one batch, guidance as an input); SD3 runs classifier-free guidance
            guided = self.kind == "sd3" and guidance_scale > 1
        text_encoders = {
            name: getattr(self.pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
        }
        denoiser = self.denoiser
        return BankSettings(
            model=self.pipe.name_or_path or "",
            denoiser_fingerprint=denoiser_fingerprint(denoiser),
            scheduler=type(self.pipe.scheduler).__name__,
            num_steps=len(self.denoising_timesteps(num_inference_steps, height, width)),
            height=height or default_height,
            width=width or default_width,
            guidance_halves=2 if guided else 1,
            id_length=id_length,
            scheduler_config=public_config(self.pipe.scheduler.config),
            layers=tuple(sorted(select_layers(denoiser, self.csa.config))),
            adapters=active_adapters(**{"unet" if self.kind == "unet" else "transformer": denoiser}, **text_encoders),
            weights_probe=weights_probe(denoiser),
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
        control_images: Sequence[Any] | None = None,
    ) -> None:
        """Refuse, saying what to change, a call this pipeline cannot draw as asked (`inputs.check_story_inputs`)."""
        check_story_inputs(
            self.pipe, self.kind, characters, frames, id_length, banks, frame_batch_size, pipeline_kwargs,
            control_images,
        )  # fmt: skip

    def _control_image_kwargs(self, control_images: Sequence[Any] | None, indices: Sequence[int]) -> dict[str, Any]:
        """`image=` for one pipeline call of frames `indices`: their control images, in the batch's order."""
        if control_images is None:
            return {}
        if getattr(self.pipe.controlnet, "nets", None) is not None:
            # MultiControlNet: diffusers reads a nested list as one list per image of the batch
            return {"image": [list(control_images[i]) for i in indices]}
        return {"image": [control_images[i] for i in indices]}

    @torch.no_grad()
    def __call__(
        self,
        characters: Mapping[str, str],
        frames: Sequence[str | Frame],
        *,
        id_length: int | None = None,
        negative_prompt: str = "",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
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
        control_images: Sequence[Any] | None = None,
        character_images: Mapping[str, Sequence[Any]] | None = None,
        **pipeline_kwargs: Any,
    ) -> StoryPipelineOutput:
        """Generate every frame of a story.

        Args:
            characters: name -> description, substituted for `[Name]` in string frames.
            frames: one entry per panel: a string with `[Name]` / `[NC]` tags, or a `Frame`.
            id_length: reference frames per character (its first frames naming only that character).
            id_length, num_inference_steps, guidance_scale, height, width: None -- the model's recommended
                settings (`storydiffusion.json`, `generation_defaults`, `default_size`), else the paper's.
            seed: frame i's initial noise comes from seed + i (or seed alone with `same_initial_noise`,
                the public code's consistency prior); token sampling from seeds derived from it.
            banks: saved characters to reuse (`IdentityBank.load`); they skip the reference phase.
            frame_batch_size: frames naming the same characters generated together in the frame phase.
            skip_frames: frames not to generate (e.g. already on disk when resuming); their images are
                None. A character's reference frames still run when a frame that is generated needs its bank.
            on_frame: called with (FrameInfo, image) as soon as each frame is done — write it out there. A
                character's reference frames come right after its `on_bank`, so a run killed in between finds no
                reference without its bank.
            on_bank: called with (name, bank) as soon as a character's reference phase is done.
            control_images: ControlNet pipelines only: one control image per frame (for MultiControlNet, a
                list per frame, one image per ControlNet). One image for every frame goes in `image=` instead.
            character_images: name -> pictures of that character (file paths, PIL images, arrays; at most 8):
                its bank is made from them (`CSAConfig.reference_noise`), and it has no reference frames.
            pipeline_kwargs: passed on to the wrapped pipeline (e.g. `guidance_rescale`; a ControlNet's `image=`
                and `controlnet_conditioning_scale=`; an IP-Adapter's `ip_adapter_image=`, used for every frame).
        """
        # 1. Check inputs
        defaults = self.generation_defaults()
        id_length = defaults["id_length"] if id_length is None else id_length
        num_inference_steps = defaults["steps"] if num_inference_steps is None else num_inference_steps
        guidance_scale = defaults["guidance"] if guidance_scale is None else guidance_scale
        banks = dict(banks or {})
        resolved = [f if isinstance(f, Frame) else parse_frame(f, characters) for f in frames]
        self.check_inputs(
            characters, resolved, id_length, banks, frame_batch_size, pipeline_kwargs, control_images=control_images
        )
        height, width = height or self.default_size()[0], width or self.default_size()[1]
        pictures = fit_character_pictures(character_images or {}, characters, height, width)
        for name in pictures:
            if name in banks:
                raise StoryDiffusionError(
                    f"{name!r} is given both as a saved character (banks) and by pictures; give one of them"
                )
        settings = self.bank_settings(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            id_length=id_length,
        )
        timesteps = self.denoising_timesteps(num_inference_steps, height, width)
        for bank in banks.values():
            bank.check_compatible(settings)

        # 2. Pick the reference frames of each character that a frame to generate needs
        todo = [i for i in range(len(resolved)) if i not in set(skip_frames)]
        needed = {name for i in todo for name in resolved[i].characters}
        references = {
            name: indices
            for name, indices in self.reference_frames(resolved, id_length, exclude={*banks, *pictures}).items()
            if name in needed
        }
        reference_of = {index: name for name, indices in references.items() for index in indices}
        infos = self.frame_infos(
            resolved, negative_prompt=negative_prompt, seed=seed, same_initial_noise=same_initial_noise
        )
        infos = [
            dataclasses.replace(info, role="reference" if info.index in reference_of else "frame") for info in infos
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
            self.csa.installed(self.denoiser),
            tqdm(total=len(resolved), desc="frames", unit="frame", disable=not progress) as bar,
        ):
            # 3. Characters given by pictures, then reference phases: each character's references together,
            # mutual CSA, bank written
            character_order = list(characters)
            latent_size = (height // self.pipe.vae_scale_factor, width // self.pipe.vae_scale_factor)
            for name in (name for name in pictures if name in needed):
                index = character_order.index(name)
                bank = self.picture_bank(
                    name, characters[name], pictures[name], settings, common, negative_prompt,
                    derived_seed(seed, 1, index), derived_seed(seed, 2, index), control_images,
                )  # fmt: skip
                banks[name] = bank
                if on_bank is not None:
                    on_bank(name, bank)
            for name, indices in references.items():
                sampler_seed = derived_seed(seed, 1, character_order.index(name))
                finished: list[tuple[FrameInfo, Any]] = []  # handed on once the bank is: a reference on disk
                bank = self.reference_phase(  # then always has its bank beside it (a killed run resumes from both)
                    name, characters[name], indices, infos, sampler_seed, settings, common, images,
                    lambda info, image, finished=finished: finished.append((info, image)), control_images,
                )  # fmt: skip
                banks[name] = bank
                if on_bank is not None:
                    on_bank(name, bank)
                for info, image in finished if on_frame is not None else ():
                    on_frame(info, image)
                bar.update(len(indices))

            # 4. Frame phase: the rest, reading the banks of the characters they name
            rest = [infos[i] for i in todo if i not in reference_of]
            for indices in self._frame_batches(rest, frame_batch_size, resolved):
                named = infos[indices[0]].characters
                masks = self.region_masks([resolved[i] for i in indices], latent_size)
                if masks is None:
                    subjects = self.subject_tokens([infos[i] for i in indices], characters)
                else:  # regional prompts read the descriptions' positions too
                    subjects = self.region_tokens([infos[i] for i in indices], characters)
                self.csa.begin_read(
                    timesteps, len(indices), [banks[name] for name in named], masks, subjects, latent_size
                )
                self._generate(indices, infos, images, common, on_frame, control_images)
                bar.update(len(indices))
            self.csa.reset()

        return StoryPipelineOutput(images=images, frames=infos, banks=banks)

    def reference_phase(
        self,
        name: str,
        description: str,
        indices: Sequence[int],
        infos: Sequence[FrameInfo],
        sampler_seed: int,
        settings: BankSettings,
        common: Mapping[str, Any],
        images: list,
        on_frame: Callable[[FrameInfo, Any], None] | None = None,
        control_images: Sequence[Any] | None = None,
    ) -> IdentityBank:
        """One character's reference frames `indices` (of `infos`) drawn together with mutual CSA (installed):
        their images land in `images`; returns the bank they wrote, carrying the recipe that regenerates it
        (`pipelines.characters`, which calls this again with the recorded inputs)."""
        from storydiffusion.pipelines.characters import character_recipe

        references = [infos[i] for i in indices]
        recipe = character_recipe(self, name, description, references, sampler_seed, settings, common, control_images)
        bank = IdentityBank(
            name, settings, self.bank_dtype, self.bank_device, self.bank_storage, self.bank_compaction, recipe
        )
        height, width = common["height"], common["width"]
        latent_size = (height // self.pipe.vae_scale_factor, width // self.pipe.vae_scale_factor)
        sampler = torch.Generator().manual_seed(sampler_seed)
        subjects = self.reference_subject_tokens(references, name, {name: description})
        timesteps = self.denoising_timesteps(common["num_inference_steps"], height, width)
        source = self.csa.config.bank_from
        if source == "steps":
            self.csa.begin_mutual(timesteps, len(indices), sampler, bank, subjects, latent_size)
            self._generate(indices, infos, images, dict(common), on_frame, control_images)
            return bank
        # the bank is made from the finished references, read as pictures: they must come out as images
        finish = {**common, "output_type": "pt" if common["output_type"] == "latent" else common["output_type"]}
        negative = references[0].negative_prompt
        if source == "finished":  # the paper's mutual phase, then its images
            self.csa.begin_mutual(timesteps, len(indices), sampler, None, subjects, latent_size)
            self._generate(indices, infos, images, finish, on_frame, control_images)
        else:  # sequential: the first alone, each later one reading the finished ones before it
            for k, index in enumerate(indices):
                earlier = []
                if k:
                    earlier_bank = IdentityBank(name, settings, self.bank_dtype, self.bank_device, "memory")
                    pixels = images_as_pixels([images[i] for i in indices[:k]])
                    self.record_pictures(
                        earlier_bank, pixels, description, negative, common, derived_seed(sampler_seed, 3, k),
                        derived_seed(sampler_seed, 4, k), control_images,
                    )  # fmt: skip
                    earlier = [earlier_bank]
                self.csa.begin_read(timesteps, 1, earlier)
                self._generate([index], infos, images, finish, on_frame, control_images)
        pixels = images_as_pixels([images[i] for i in indices])
        self.record_pictures(
            bank, pixels, description, negative, common, derived_seed(sampler_seed, 5), sampler_seed, control_images
        )
        return bank

    def picture_bank(
        self,
        name: str,
        description: str,
        pictures: Sequence[Picture],
        settings: BankSettings,
        common: Mapping[str, Any],
        negative_prompt: str,
        sampler_seed: int,
        noise_seed: int,
        control_images: Sequence[Any] | None = None,
    ) -> IdentityBank:
        """The bank of a character given by pictures (fitted to the story's size): what reference images with
        these latents would leave, at `CSAConfig.reference_noise` (see `record_pictures`)."""
        from storydiffusion.pipelines.characters import picture_recipe

        recipe = picture_recipe(
            self, name, description, pictures, negative_prompt, sampler_seed, noise_seed, settings, common,
            control_images,
        )  # fmt: skip
        bank = IdentityBank(
            name, settings, self.bank_dtype, self.bank_device, self.bank_storage, self.bank_compaction, recipe
        )
        bank.pictures = [picture.image for picture in pictures]
        self.record_pictures(
            bank, picture_pixels(pictures), description, negative_prompt, common, noise_seed, sampler_seed,
            control_images,
        )  # fmt: skip
        return bank

    def record_pictures(
        self,
        bank: IdentityBank,
        pixels: torch.Tensor,
        description: str,
        negative_prompt: str,
        common: Mapping[str, Any],
        noise_seed: int,
        sampler_seed: int,
        control_images: Sequence[Any] | None = None,
    ) -> None:
        """Fill `bank` from pictures (n, 3, H, W) in [-1, 1] at the story's size: each is encoded, noised (seeded)
        to `CSAConfig.reference_noise` -- each step's level in turn, one denoiser pass per step, or one fixed
        level, one pass whose tokens serve every step -- and run through the wrapped pipeline with the
        character's description while the CSA layers record what it lends (CSA installed)."""
        height, width = common["height"], common["width"]
        count = len(pixels)
        latents = encode_pictures(self.pipe.vae, pixels, self.pipe._execution_device)  # (n, C, h, w)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(noise_seed)).to(latents)
        flow = self.kind != "unet"
        loop = self.denoising_timesteps(common["num_inference_steps"], height, width)
        sampler = torch.Generator().manual_seed(sampler_seed)
        level = self.csa.config.reference_noise
        infos = [FrameInfo(i, description, negative_prompt, 0, (bank.character,), "reference") for i in range(count)]
        subjects = self.reference_subject_tokens(infos, bank.character, {bank.character: description})
        latent_size = (height // self.pipe.vae_scale_factor, width // self.pipe.vae_scale_factor)
        call = {**common, "num_inference_steps": 1, "output_type": "latent"}
        controls = None
        if is_controlnet_pipeline(self.pipe):  # the picture is the content: no control, at any image's shape
            call["controlnet_conditioning_scale"] = 0.0
            if control_images is not None:
                controls = [control_images[0]] * count

        def run(timestep: float) -> None:
            sample = noised(latents, noise, timestep, self.pipe.scheduler, flow)
            if self.kind == "flux":
                sample = self.pipe._pack_latents(sample, count, *sample.shape[1:])
            with denoiser_input(self.denoiser, sample, timestep, self.csa.timestep_scale):
                self._generate(list(range(count)), infos, [None] * count, call, None, controls)

        if level == "step":  # subject masks, if any, are inferred as the steps run (as a reference phase does)
            self.csa.begin_record(loop, count, sampler, bank, subject_tokens=subjects, frame_shape=latent_size)
            for timestep in loop:
                run(timestep)
            return
        timestep = fixed_level_timestep(float(level), self.pipe.scheduler, flow)
        masks = None
        if subjects is not None:  # one pass cannot lend from masks it is still inferring: a first pass finds them
            self.csa.begin_record([timestep], count, torch.Generator().manual_seed(sampler_seed), None,
                                  subject_tokens=subjects, frame_shape=latent_size)  # fmt: skip
            run(timestep)
            masks = self.whole_where_empty(self.csa.inferred_subject_masks(), bank.character, latent_size)
        self.csa.begin_record([timestep], count, sampler, bank, read_at_steps=len(loop), lend_masks=masks)
        run(timestep)

    @staticmethod
    def whole_where_empty(
        masks: Sequence[Mapping[str, torch.Tensor]], name: str, latent_size: tuple[int, int]
    ) -> list[dict[str, torch.Tensor]]:
        """Subject masks with an empty (or missing) one replaced by the whole picture, said in a warning: a
        picture whose subject was not found still lends, rather than leaving a bank that holds nothing."""
        out = []
        for index, image_masks in enumerate(masks):
            mask = image_masks.get(name)
            if mask is None or not bool(mask.any()):
                logger.warning(
                    "subject_only: no subject found in picture %d of %r (its description draws no attention); "
                    "it lends from the whole picture", index + 1, name,
                )  # fmt: skip
                mask = torch.ones(latent_size, dtype=torch.bool)
            out.append({name: mask})
        return out

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def frame_infos(
        frames: Sequence[Frame], *, negative_prompt: str = "", seed: int = 0, same_initial_noise: bool = False
    ) -> list[FrameInfo]:
        """What each frame of a call will be made from (prompt, negative prompt, seed, characters): the one
        place these are decided, so a resumed run can tell which panels on disk are still valid. Roles
        (reference or frame) depend on the banks and skipped frames of the call; "frame" here."""
        return [
            FrameInfo(
                index=i,
                prompt=frame.prompt,
                negative_prompt=negative_prompt if frame.negative_prompt is None else frame.negative_prompt,
                seed=frame_seed(seed, i, same_initial_noise),
                characters=frame.characters,
                role="frame",
            )
            for i, frame in enumerate(frames)
        ]

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
    def region_masks(frames: Sequence[Frame], latent_size: tuple[int, int]) -> list[dict[str, torch.Tensor]] | None:
        """Per frame, character -> boolean mask of its region at the latent grid; None when no frame has regions."""
        if all(frame.regions is None for frame in frames):
            return None
        return [{name: box_mask(box, latent_size) for name, box in (frame.regions or {}).items()} for frame in frames]

    def phrase_positions(self, prompt: str, phrase: str) -> list[int]:
        """Where `phrase`'s tokens sit in the text sequence the denoiser attends to: CLIP's (chunked) on a UNet,
        T5's on Flux, T5's after the 77 CLIP tokens on SD3 (T5 holds the whole prompt)."""
        if self.kind == "unet":
            return phrase_positions(self.pipe.tokenizer, prompt, phrase)
        offset = 0 if self.kind == "flux" else self.pipe.tokenizer_max_length
        return sequence_phrase_positions(t5_tokenizer(self.pipe, self.kind), prompt, phrase, offset)

    def reference_subject_tokens(
        self, infos: Sequence[FrameInfo], name: str, characters: Mapping[str, str]
    ) -> list[dict[str, list[int]]] | None:
        """With `CSAConfig.subject_only`: per reference frame, the character's description token positions."""
        if not self.csa.config.subject_only:
            return None
        tokens = [{name: self.phrase_positions(info.prompt, characters[name])} for info in infos]
        for info, positions in zip(infos, tokens):
            if not positions[name]:
                raise StoryDiffusionError(
                    f"CSAConfig(subject_only=True): frame {info.index} ({info.prompt!r}) does not contain "
                    f"{name!r}'s description {characters[name]!r}, so its subject cannot be found; write the "
                    f"frame with [{name}] or turn subject_only off"
                )
        return tokens

    def subject_tokens(
        self, infos: Sequence[FrameInfo], characters: Mapping[str, str]
    ) -> list[dict[str, list[int]]] | None:
        """For frames naming several characters (with `CSAConfig.subject_masks="infer"`): per frame, each
        character's description token positions, from which its subject mask is inferred. None when the
        frames name one character, or a description does not appear in a prompt (then reads are unmasked)."""
        if self.csa.config.subject_masks != "infer" or len(infos[0].characters) < 2:
            return None
        tokens = [
            {name: self.phrase_positions(info.prompt, characters.get(name, "")) for name in info.characters}
            for info in infos
        ]
        return tokens if all(all(positions.values()) for positions in tokens) else None

    def region_tokens(
        self, infos: Sequence[FrameInfo], characters: Mapping[str, str]
    ) -> list[dict[str, list[int]]] | None:
        """With `CSAConfig.regional_prompts`: per frame with regions, each named character's description token
        positions (a description the prompt lacks has none, and nothing of it is masked)."""
        if not self.csa.config.regional_prompts:
            return None
        if self.kind != "unet":
            logger.warning("CSAConfig(regional_prompts=True) masks cross-attention, which DiT models lack; ignored")
            return None
        return [{name: self.phrase_positions(info.prompt, characters.get(name, "")) for name in info.characters}
                for info in infos]  # fmt: skip

    @staticmethod
    def _frame_batches(infos: Sequence[FrameInfo], size: int, frames: Sequence[Frame]) -> list[list[int]]:
        """Frames grouped by the characters they name (and whether they carry regions), in chunks of `size`."""
        groups: dict[tuple[tuple[str, ...], bool], list[int]] = {}
        for info in infos:
            groups.setdefault((info.characters, frames[info.index].regions is not None), []).append(info.index)
        return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]

    def _generate(
        self,
        indices: Sequence[int],
        infos: Sequence[FrameInfo],
        images: list,
        common: dict,
        on_frame: Callable[[FrameInfo, Any], None] | None,
        control_images: Sequence[Any] | None = None,
    ) -> None:
        """One call of the wrapped pipeline for frames `indices`; images land in `images`."""
        prompts = [infos[i].prompt for i in indices]
        negatives = [infos[i].negative_prompt for i in indices]
        clip_skip = common.get("clip_skip")
        if self.kind == "flux":  # guidance-distilled: no negative prompt (checked and said in check_inputs)
            text: dict[str, Any] = {"prompt": prompts}
        elif self.kind == "sd3":  # T5 carries the whole prompt (lengths checked); "" and None encode alike
            text = {"prompt": prompts, "negative_prompt": negatives}
        elif needs_own_encoding(self.pipe, prompts, negatives, clip_skip):  # no silent cut, no neighbour effects
            lora_scale = (common.get("cross_attention_kwargs") or {}).get("scale")
            text = encode_frames(self.pipe, prompts, negatives, clip_skip, lora_scale)
        else:  # all negatives empty (None: SDXL's zeroed negative embedding) or all given
            text = {"prompt": prompts, "negative_prompt": negatives if any(negatives) else None}
        result = self.pipe(
            **text,
            generator=[torch.Generator().manual_seed(infos[i].seed) for i in indices],
            **self._control_image_kwargs(control_images, indices),  # ControlNet: these frames' control images
            **common,
        )
        for slot, image in zip(indices, result.images):
            images[slot] = image
            if on_frame is not None:
                on_frame(infos[slot], image)
