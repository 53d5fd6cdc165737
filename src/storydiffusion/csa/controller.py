"""The CSA controller: installs Consistent Self-Attention on a denoiser (a UNet, or a Flux / SD3 transformer)
and owns all of its run state.

One controller per pipeline, owned by the caller — nothing lives at module level, so two
pipelines (or two UI sessions) in one process never see each other's state. The pipeline tells
the controller what phase it is in (`begin_mutual` / `begin_read`) and which timesteps its
denoising loop runs; a forward pre-hook on the denoiser reads the timestep of each call and looks
up its step there, so the step is never counted: the user's `callback_on_step_end`, `denoising_end`,
second-order schedulers (which call the denoiser twice per step) and pipelines that call it more
than once a step all see the same step for the same timestep. The processors only ask.

In the reference and frame phases the first call at a step is the step's own; a later call at the same
step (a second-order scheduler's correction, SD3's skip-layer guidance pass on the conditional half) writes
nothing to the bank and lends the tokens the first call drew at each layer, so it changes neither what is
stored nor the phase's random stream; it reads the bank as its batch's guidance halves do (a
conditional-only batch: the conditional half).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch

from storydiffusion.csa.attention import (
    ConsistentSelfAttnProcessor,
    CSAConfig,
    bank_read_mask,
    layer_level,
    num_sampled_tokens,
    sample_token_indices,
)
from storydiffusion.csa.bank import IdentityBank
from storydiffusion.csa.joint import JointConsistentAttnProcessor
from storydiffusion.csa.masks import grid_masks, token_owner
from storydiffusion.csa.regions import RegionalCrossAttnProcessor, regional_additive_mask
from storydiffusion.csa.subjects import SubjectMapRecorder, SubjectMaps
from storydiffusion.errors import StoryDiffusionError

Mode = Literal["off", "mutual", "read", "record"]


def denoising_timesteps(scheduler: Any, num_inference_steps: int, **set_timesteps_kwargs: Any) -> list[float]:
    """The distinct timesteps, in loop order, that `scheduler` runs for `num_inference_steps` (on a copy:
    the pipeline's scheduler is untouched). A second-order scheduler's repeated timesteps count once.
    `set_timesteps_kwargs` (e.g. a flow-matching schedule's `sigmas=` and `mu=`) go to `set_timesteps`."""
    scheduler = copy.deepcopy(scheduler)
    if set_timesteps_kwargs:
        scheduler.set_timesteps(**set_timesteps_kwargs)
    else:
        scheduler.set_timesteps(num_inference_steps)
    timesteps = torch.as_tensor(scheduler.timesteps).double().cpu()
    return torch.unique_consecutive(timesteps).tolist()


ModelKind = Literal["unet", "flux", "sd3"]

# CSA layers when `CSAConfig.layers` is None, per denoiser: the public code's decoder self-attention on a
# UNet; on a DiT every other joint-attention block of the later stage (Flux's single-stream blocks) or of
# all blocks (SD3), which keeps the bank at half the size of every block for most of the effect
DEFAULT_LAYERS: Mapping[str, tuple[str, ...]] = {
    "unet": ("up_blocks.*",),
    "flux": ("single_transformer_blocks.*[02468].attn",),
    "sd3": ("transformer_blocks.*[02468].attn",),
}


def model_kind(model: Any) -> ModelKind:
    """Which denoiser CSA is installed on: a UNet2DConditionModel, a Flux or an SD3 transformer."""
    if hasattr(model.config, "down_block_types"):
        return "unet"
    name = type(model).__name__
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("SD3"):
        return "sd3"
    raise StoryDiffusionError(
        f"Consistent Self-Attention runs on a UNet2DConditionModel, FluxTransformer2DModel or "
        f"SD3Transformer2DModel, got a {name}"
    )


def self_attention_layers(model: Any) -> list[str]:
    """Names of the attention modules CSA can run on, in processor order: a UNet's self-attention
    (`...attn1`), a DiT's joint attention (`...attn`)."""
    names = [key.removesuffix(".processor") for key in model.attn_processors]
    suffix = ".attn1" if model_kind(model) == "unet" else ".attn"
    return [name for name in names if name.endswith(suffix)]


def select_layers(model: Any, config: CSAConfig) -> dict[str, int]:
    """CSA layers chosen by `config` on `model` (a UNet or a DiT), mapped to their resolution level (a DiT's
    blocks all work at one grid: level 1); raises if none match."""
    kind = model_kind(model)
    names = self_attention_layers(model)
    if kind == "unet":
        num_down_blocks = len(model.config.down_block_types)
        available = {name: layer_level(name, num_down_blocks) for name in names}
    else:
        available = dict.fromkeys(names, 1)
    patterns = DEFAULT_LAYERS[kind] if config.layers is None else config.layers
    chosen = {
        name: level
        for name, level in available.items()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        and (config.levels is None or level in config.levels)
    }
    if not chosen:
        levels = sorted(set(available.values()))
        example = next(iter(available), "none")
        raise StoryDiffusionError(
            f"CSAConfig(layers={list(patterns)}, levels={config.levels}) matches no attention layer CSA can run on "
            f"in this {type(model).__name__} ({len(available)} layers, e.g. {example!r}; levels present: {levels}). "
            "Widen the patterns or the levels."
        )
    return chosen


class ConsistentAttention:
    """Consistent Self-Attention for one denoiser (UNet or DiT): the install/uninstall pair and the run state.

    >>> csa = ConsistentAttention(CSAConfig(rate=0.5))
    >>> with csa.installed(pipe.unet):
    ...     timesteps = denoising_timesteps(pipe.scheduler, 50)
    ...     csa.begin_mutual(timesteps, images_per_call=3, generator=torch.Generator().manual_seed(0))
    ...     images = pipe(prompts, num_inference_steps=50, ...).images
    """

    def __init__(self, config: CSAConfig | None = None) -> None:
        self.config = config or CSAConfig()
        self.layers: dict[str, int] = {}  # installed CSA layer -> resolution level
        self._unet: Any = None
        self._originals: dict[str, Any] | None = None
        self._hook: Any = None
        self._cross_originals: dict[str, Any] = {}  # attn2 processors the subject-map recorders stand in for
        self.kind: ModelKind = "unet"
        self._timestep_scale = 1.0
        self.reset()

    def reset(self) -> None:
        """Back to plain attention with no phase state (the installation is kept)."""
        self.mode: Mode = "off"
        self.step = 0
        self.num_steps = 0
        self.timesteps: torch.Tensor | None = None  # (num_steps,) float64; None: the caller sets the step
        self.images_per_call = 0
        self.text_tokens = 0  # text tokens of the current DiT call's joint sequence
        self.generator: torch.Generator | None = None
        self.gates: dict[str, list[bool]] = {}
        self.write_bank: IdentityBank | None = None
        # record phase at a fixed noise level: per layer, the loop steps its one entry serves
        self.shared_steps: dict[str, list[int]] | None = None
        self.read_banks: tuple[IdentityBank, ...] = ()
        # per image of the call: character -> boolean (H, W) subject mask over the frame; None: unmasked reads
        self.read_masks: tuple[Mapping[str, torch.Tensor], ...] | None = None
        self._owner_cache: dict[int, torch.Tensor] = {}
        self.subject_maps: SubjectMaps | None = None  # inferring the read masks (`csa.subjects`)
        self.lend_inside_masks = False  # a record phase given its subject masks: lend only inside `read_masks`
        # regional cross-attention (`csa.regions`): per image, the region masks and description token positions
        self.prompt_regions: (
            tuple[tuple[Mapping[str, torch.Tensor], ...], tuple[Mapping[str, Sequence[int]], ...]] | None
        )
        self.prompt_regions = None
        self._region_mask_cache: dict[tuple, torch.Tensor] = {}
        # per dtype a denoiser call got its timestep in: the schedule rounded as the call's was, and how far
        # from each entry a call may land (`step_of`)
        self._called_schedules: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self.repeated_call = False  # a later call at the step of the previous one (see the module docstring)
        self._called_step: int | None = None
        # the step's first call's token draws per layer, lent again by repeated calls; the layer is the one that
        # asked `wants_csa` last, as every processor asks right before it draws
        self._asking_layer: str | None = None
        self._step_draws: dict[str, torch.Tensor | None] = {}
        self._remove_recorders()

    def __repr__(self) -> str:
        where = "installed" if self.is_installed else "not installed"
        return (
            f"ConsistentAttention({where}, layers={len(self.layers)}, mode={self.mode!r}, "
            f"step={self.step}/{self.num_steps}, config={self.config})"
        )

    # -- installation ----------------------------------------------------------------------
    @property
    def timestep_scale(self) -> float:
        """What the installed denoiser's timestep is multiplied by to give the scheduler's (Flux's: 1000)."""
        return self._timestep_scale

    @property
    def is_installed(self) -> bool:
        return self._unet is not None

    def install(self, denoiser: Any) -> None:
        """Put CSA processors on the selected self-attention layers of `denoiser` (a UNet or a DiT), remembering
        the originals."""
        if self.is_installed:
            raise StoryDiffusionError("this ConsistentAttention is already installed; call uninstall() first")
        originals = denoiser.attn_processors
        if any(isinstance(p, ConsistentSelfAttnProcessor | JointConsistentAttnProcessor) for p in originals.values()):
            raise StoryDiffusionError(
                f"this {type(denoiser).__name__} already runs Consistent Self-Attention from another controller; "
                "uninstall that one first"
            )
        self.kind = model_kind(denoiser)
        self.layers = select_layers(denoiser, self.config)
        processors = dict(originals)
        for name, level in self.layers.items():
            key = f"{name}.processor"
            rate = self.config.rate_for(level)
            if self.kind == "unet":
                processors[key] = ConsistentSelfAttnProcessor(name, level, rate, self, originals[key])
            else:
                processors[key] = JointConsistentAttnProcessor(
                    name, rate, self, originals[key], self.config.positions, self.config.text_sees_borrowed, self.kind
                )
        denoiser.set_attn_processor(processors)
        # Flux's pipeline calls its transformer with the timestep / 1000 (the transformer multiplies it back)
        self._timestep_scale = 1000.0 if self.kind == "flux" else 1.0
        self._hook = denoiser.register_forward_pre_hook(self._on_denoiser_call, with_kwargs=True)
        self._unet, self._originals = denoiser, originals

    def uninstall(self) -> None:
        """Restore exactly the processors that were there before `install`."""
        if not self.is_installed:
            return
        self._hook.remove()
        self._cross_originals = {}  # the originals below hold the cross-attention processors too
        self._unet.set_attn_processor(dict(self._originals))
        self._unet, self._originals, self._hook = None, None, None
        self.reset()

    @contextmanager
    def installed(self, denoiser: Any) -> Iterator[ConsistentAttention]:
        self.install(denoiser)
        try:
            yield self
        finally:
            self.uninstall()

    # -- phases (called by the pipeline) -----------------------------------------------------
    def begin_mutual(
        self,
        timesteps: Sequence[float] | int,
        images_per_call: int,
        generator: torch.Generator,
        bank: IdentityBank | None = None,
        subject_tokens: Sequence[Mapping[str, Sequence[int]]] | None = None,
        frame_shape: tuple[int, int] | None = None,
    ) -> None:
        """Reference phase: the `images_per_call` images of each call share tokens; optionally fill `bank`.

        `timesteps`: the loop's distinct timesteps (`denoising_timesteps`); each denoiser call's step is the
        position of its timestep there. A number of steps instead leaves the step to `set_step`.
        With `config.subject_only`, `subject_tokens` (per image, the character's description token
        positions) and the latent `frame_shape`: only tokens inside each image's inferred subject mask are
        lent and stored; nothing is lent until the first maps exist.
        """
        self._begin("mutual", timesteps, images_per_call)
        self.generator = generator
        self.write_bank = bank
        self.gates = self.draw_gates(self.num_steps, generator)
        if self.config.subject_only:
            if subject_tokens is None or frame_shape is None or len(subject_tokens) != images_per_call:
                raise StoryDiffusionError(
                    "CSAConfig(subject_only=True) needs subject_tokens (one mapping per image) and the frame_shape"
                )
            self._start_subject_maps(subject_tokens, frame_shape)

    def begin_record(
        self,
        timesteps: Sequence[float],
        images_per_call: int,
        generator: torch.Generator,
        bank: IdentityBank | None,
        read_at_steps: int | None = None,
        subject_tokens: Sequence[Mapping[str, Sequence[int]]] | None = None,
        frame_shape: tuple[int, int] | None = None,
        lend_masks: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        """Picture phase: each denoiser call's images (pictures of one character, noised) lend `rate` of their
        tokens to `bank`, as reference images would, while their own attention stays plain (no picture reads
        another).

        `timesteps`: the timesteps the calls are made at. With `read_at_steps` (a fixed noise level: one call at
        one timestep), every layer records once and the entry serves each (step, layer) of a loop of that many
        steps where the CSA schedule runs (gates drawn as a reference phase draws them); without, the calls run
        the loop's own timesteps and record where the schedule's gates say, a step bank as a reference phase
        writes.

        Subject-only pictures (`config.subject_only`) lend only tokens inside their subject masks: either
        `lend_masks` (per image, character -> boolean mask, e.g. `inferred_subject_masks` of a first pass at a fixed
        level, where one pass has no maps before its layers lend), or `subject_tokens` and `frame_shape`, from
        which the masks are inferred as the calls run (each step's level in turn; nothing is lent until the
        first maps exist). With `bank=None` nothing is recorded: a pass that only infers the masks."""
        self._begin("record", timesteps, images_per_call)
        self.generator = generator
        self.write_bank = bank
        if read_at_steps is None:
            self.gates = self.draw_gates(self.num_steps, generator)
            self.shared_steps = None
        else:
            loop_gates = self.draw_gates(read_at_steps, generator)
            self.gates = {name: [True] * self.num_steps for name in self.layers}
            self.shared_steps = {name: [s for s, on in enumerate(row) if on] for name, row in loop_gates.items()}
        if lend_masks is not None:
            if len(lend_masks) != images_per_call:
                raise StoryDiffusionError(
                    f"got lend_masks for {len(lend_masks)} images, the call holds {images_per_call}"
                )
            self.read_masks, self.lend_inside_masks = tuple(lend_masks), True
        elif subject_tokens is not None:
            if frame_shape is None or len(subject_tokens) != images_per_call:
                raise StoryDiffusionError("subject_tokens needs one mapping per image and the frame_shape")
            self._start_subject_maps(subject_tokens, frame_shape)

    def inferred_subject_masks(self) -> list[dict[str, torch.Tensor]]:
        """The subject masks inferred so far in this phase (per image, character -> boolean mask at the finest
        grid seen); empty mappings where no map was recorded."""
        if self.subject_maps is None:
            raise StoryDiffusionError("no subject maps are being inferred in this phase (begin it with subject_tokens)")
        return self.subject_maps.masks(self.config.mask_dilation)

    def begin_read(
        self,
        timesteps: Sequence[float] | int,
        images_per_call: int,
        banks: Sequence[IdentityBank],
        masks: Sequence[Mapping[str, torch.Tensor]] | None = None,
        subject_tokens: Sequence[Mapping[str, Sequence[int]]] | None = None,
        frame_shape: tuple[int, int] | None = None,
    ) -> None:
        """Frame phase: each image attends to its own tokens plus every bank in `banks` (none: plain).

        `masks`, one mapping per image (character -> boolean (H, W) mask over the frame): a query token
        reads only the bank of the character whose mask holds it (overlaps go to the first character,
        `csa.masks.exclusive`), and background tokens read none. None: every token reads every bank.

        With masks and `config.regional_prompts`, `subject_tokens` (the same mappings as below) make every
        cross-attention layer read each character's description only inside its mask (`csa.regions`).

        `subject_tokens` instead of masks, one mapping per image (character -> positions of its description
        tokens in the text encoder's sequence), with the latent `frame_shape` (h, w): the masks are inferred
        from the cross-attention to those tokens (`csa.subjects`), refreshed every step until
        `config.mask_until` of the loop, then kept."""
        self._begin("read" if banks else "off", timesteps, images_per_call)
        self.read_banks = tuple(banks)
        if masks is not None:
            if len(masks) != images_per_call:
                raise StoryDiffusionError(f"got masks for {len(masks)} images, the call holds {images_per_call}")
            names = {bank.character for bank in banks}
            for image_masks in masks:
                unknown = sorted(set(image_masks) - names)
                if unknown:
                    raise StoryDiffusionError(f"masks for {unknown}, whose banks are not read; read: {sorted(names)}")
            self.read_masks = tuple(masks)
            if self.config.regional_prompts and subject_tokens is not None and self.kind == "unet":
                if len(subject_tokens) != images_per_call:
                    raise StoryDiffusionError("subject_tokens needs one mapping per image")
                self.prompt_regions = (tuple(masks), tuple(subject_tokens))
                self._install_cross_processors(RegionalCrossAttnProcessor)
        elif subject_tokens is not None and banks:
            if len(subject_tokens) != images_per_call or frame_shape is None:
                raise StoryDiffusionError("subject_tokens needs one mapping per image and the frame_shape")
            self._start_subject_maps(subject_tokens, frame_shape)

    def _begin(self, mode: Mode, timesteps: Sequence[float] | int, images_per_call: int) -> None:
        if not self.is_installed:
            raise StoryDiffusionError("install ConsistentAttention on a denoiser before starting a phase")
        self.reset()
        if isinstance(timesteps, int):
            num_steps = timesteps
        else:
            self.timesteps = torch.tensor(list(timesteps), dtype=torch.float64)
            num_steps = len(self.timesteps)
        if num_steps < 1:
            raise StoryDiffusionError(f"a phase needs at least one denoising step, got {timesteps!r}")
        self.mode, self.num_steps, self.images_per_call = mode, num_steps, images_per_call

    def draw_gates(self, num_steps: int, generator: torch.Generator) -> dict[str, list[bool]]:
        """Per (step, layer): run CSA or not, drawn once per phase from the phase's generator."""
        probabilities = torch.tensor([self.config.schedule.probability(s, num_steps) for s in range(num_steps)])
        draws = torch.rand(len(self.layers), num_steps, generator=generator, device=generator.device)
        gates = draws.cpu() < probabilities  # (layers, steps)
        return {name: row.tolist() for name, row in zip(self.layers, gates)}

    def set_step(self, step: int) -> None:
        """Set the step by hand (a phase begun with a number of steps instead of timesteps)."""
        self.step = step

    def step_of(self, timestep: torch.Tensor | float) -> int:
        """The step of a denoiser call at `timestep`, given as the denoiser got it (Flux's transformer: the
        scheduler's timestep / 1000). A tensor's dtype says how the pipeline rounded it (FluxPipeline casts the
        timestep to the latents' dtype before dividing: 761.5 arrives as 761.7 in bfloat16): the call matches
        the phase's timestep nearest to it, rounded the same way, within what rounding in that dtype could move
        it and never past half the gap to its neighbours; a call farther from every timestep is refused."""
        called = torch.as_tensor(timestep).flatten()[0]
        schedule, tolerance = self._schedule_as_called(called.dtype)
        value = float(called) * self._timestep_scale
        distances = (schedule - value).abs()
        step = int(distances.argmin())
        if distances[step] > tolerance[step]:
            raise StoryDiffusionError(
                f"the denoiser was called at timestep {value:g}, which is not among this phase's "
                f"{self.num_steps} timesteps ({self.timesteps[0].item():g} ... {self.timesteps[-1].item():g}); "
                "begin the phase with the timesteps the pipeline's scheduler runs (denoising_timesteps)"
            )
        return step

    def _schedule_as_called(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The phase's timesteps as a call in `dtype` gets them (the scheduler's float32 cast to `dtype`, then
        scaled as the pipeline scales them), on the scheduler's scale; and per step how far a call may land
        from it: a relative 1e-3, or `dtype`'s rounding if coarser (a pipeline that rounds in another order), at
        most half the gap to its nearest neighbour. Raises when `dtype` rounds two steps together."""
        if dtype not in self._called_schedules:
            schedule = self.timesteps
            if dtype.is_floating_point and dtype != torch.float64:
                schedule = (schedule.float().to(dtype) / self._timestep_scale).double() * self._timestep_scale
            gaps = schedule.diff().abs()
            if len(gaps) and not bool(gaps.min() > 0):
                step = int(gaps.argmin())
                raise StoryDiffusionError(
                    f"at {self.num_steps} steps the denoiser's {str(dtype).removeprefix('torch.')} timesteps cannot "
                    f"tell steps {step} and {step + 1} apart ({self.timesteps[step].item():g} and "
                    f"{self.timesteps[step + 1].item():g} both arrive as {schedule[step].item():g}); run fewer steps "
                    "or the model in float32"
                )
            rounding = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
            tolerance = torch.maximum(1e-3 * schedule.abs().clamp_min(1.0), rounding * schedule.abs())
            if len(gaps):
                half_gaps = torch.minimum(torch.cat([gaps[:1], gaps]), torch.cat([gaps, gaps[-1:]])) / 2
                tolerance = torch.minimum(tolerance, half_gaps)
            self._called_schedules[dtype] = (schedule, tolerance)
        return self._called_schedules[dtype]

    def _on_denoiser_call(self, denoiser: Any, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: the step of this denoiser call, from the timestep it is called with, and whether
        the previous call was at that step; while masks are inferred, the masks from the maps recorded so far."""
        if self.mode == "off" or self.timesteps is None:
            return None
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1] if len(args) > 1 else None
        if timestep is not None:
            self.step = self.step_of(timestep)
            self.repeated_call = self.mode in ("mutual", "read") and self.step == self._called_step
            if not self.repeated_call:
                self._called_step, self._step_draws = self.step, {}
        text = kwargs.get("encoder_hidden_states")
        if text is not None:  # a single-stream DiT block sees [text ; image] as one sequence
            self.text_tokens = text.shape[1]
        refresh = self.subject_maps is not None and self.subject_maps.grid is not None and self._refreshing_masks()
        if refresh and not self.repeated_call:  # a repeated call reads with its step's masks
            self.read_masks = tuple(self.subject_maps.masks(self.config.mask_dilation))
            self._owner_cache.clear()
        return None

    def _start_subject_maps(self, subject_tokens: Sequence[Mapping[str, Sequence[int]]], frame_shape) -> None:
        self.subject_maps = SubjectMaps(subject_tokens, frame_shape)
        self.read_masks = tuple({} for _ in subject_tokens)  # no maps yet: nothing is read or lent
        self._install_recorders()

    def mutual_indices(self, num_images: int, num_tokens: int, rate: float) -> torch.Tensor | None:
        """(B, k) tokens each image lends at this call: `rate` of its tokens, or with `config.subject_only`
        `rate` of the smallest subject mask's tokens, drawn inside each image's mask; None: nothing lent.
        A repeated call at a step lends what the step's first call drew at the layer (nothing new is drawn)."""
        layer = self._asking_layer
        if self.repeated_call and layer in self._step_draws:
            drawn = self._step_draws[layer]
            if drawn is None or drawn.shape[0] == num_images:
                return drawn
        indices = self._draw_indices(num_images, num_tokens, rate)
        if not self.repeated_call and layer is not None:
            self._step_draws[layer] = indices
        return indices

    def _draw_indices(self, num_images: int, num_tokens: int, rate: float) -> torch.Tensor | None:
        if self.subject_maps is None and not self.lend_inside_masks:
            num_samples = num_sampled_tokens(num_tokens, rate)
            return self.sample_indices(num_images, num_tokens, num_samples) if num_samples else None
        inside = torch.zeros(num_images, num_tokens, dtype=torch.bool)  # (B, N): in the image's subject mask
        for image, image_masks in enumerate(self.read_masks):
            for mask in grid_masks(image_masks, num_tokens).values():
                inside[image] |= mask
        num_samples = num_sampled_tokens(int(inside.sum(1).min()), rate)
        if num_samples == 0:
            return None
        scores = torch.rand(num_images, num_tokens, generator=self.generator, device=self.generator.device)
        scores = scores.cpu().masked_fill(~inside, -1.0)  # tokens outside the mask are never drawn
        return scores.topk(num_samples, dim=1).indices.sort(dim=1).values

    def _refreshing_masks(self) -> bool:
        """Whether this step still records subject maps (the first `config.mask_until` of the loop, at least one)."""
        return self.step <= max(1, round(self.config.mask_until * self.num_steps))

    def recording_maps(self) -> SubjectMaps | None:
        """The maps the cross-attention recorders add to at this step, or None when they should not (a repeated
        call at a step adds nothing: the step's maps come from its first call)."""
        if self.mode == "off" or self.subject_maps is None or self.repeated_call or not self._refreshing_masks():
            return None
        return self.subject_maps

    def _install_recorders(self) -> None:
        self._install_cross_processors(SubjectMapRecorder)

    def _install_cross_processors(self, kind: type) -> None:
        """Stand `kind(name, controller, original)` in for every cross-attention processor for this phase."""
        current = self._unet.attn_processors
        self._cross_originals = {key: p for key, p in current.items() if key.endswith("attn2.processor")}
        wrappers = {key: kind(key, self, p) for key, p in self._cross_originals.items()}
        self._unet.set_attn_processor({**current, **wrappers})

    def _remove_recorders(self) -> None:
        if getattr(self, "_cross_originals", None) and self._unet is not None:
            self._unet.set_attn_processor({**self._unet.attn_processors, **self._cross_originals})
        self._cross_originals = {}

    # -- queries (called by the processors) --------------------------------------------------
    def guidance_halves(self, batch: int) -> int:
        """How many guidance halves (1 or 2) a layer call's batch of `batch` holds."""
        halves, remainder = divmod(batch, self.images_per_call)
        if remainder or halves not in (1, 2):
            raise StoryDiffusionError(
                f"a CSA layer saw a batch of {batch} but the phase declared {self.images_per_call} images per call; "
                "pass images_per_call = number of prompts in the pipeline call (num_images_per_prompt=1)"
            )
        return halves

    def wants_csa(self, layer: str) -> bool:
        self._asking_layer = layer
        if self.mode in ("mutual", "record"):
            return self.gates[layer][self.step] if self.step < self.num_steps else False
        if self.mode == "read":
            return any((self.step, layer) in bank for bank in self.read_banks)
        return False

    def sample_indices(self, num_images: int, num_tokens: int, num_samples: int) -> torch.Tensor:
        return sample_token_indices(num_images, num_tokens, num_samples, self.generator)

    @property
    def writes(self) -> bool:
        """Whether this phase fills a bank (processors skip gathering bank tokens otherwise)."""
        return self.write_bank is not None

    def write(self, layer: str, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Store this step's sampled tokens (halves, M, C) of `layer`; `positions` (M,): where each token sat
        in its joint sequence (a DiT with rotary positions needs them to rotate the keys at read time).
        A repeated call at a step stores nothing: the entry is the step's first call's (every guidance half)."""
        if self.write_bank is None or self.repeated_call:
            return
        if self.shared_steps is not None:  # one entry for the whole loop (a picture at a fixed noise level)
            self.write_bank.put_shared(layer, tokens, self.shared_steps[layer], positions)
            return
        self.write_bank.put(self.step, layer, tokens)
        if positions is not None:
            self.write_bank.put_positions(self.step, layer, positions)

    def read_mask(self, layer: str, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """(B, N, M) which of this (step, layer)'s bank tokens (in `read` order) each query token may read;
        None for unmasked reads."""
        if self.read_masks is None:
            return None
        if num_tokens not in self._owner_cache:  # query owners per token grid: the same at every step
            self._owner_cache[num_tokens] = torch.stack(
                [self._query_owner(image_masks, num_tokens) for image_masks in self.read_masks]
            )
        counts = [bank.entry_tokens(self.step, layer) for bank in self.read_banks]
        bank_owner = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(counts)])
        return bank_read_mask(self._owner_cache[num_tokens], bank_owner).to(device)

    def regional_mask(
        self, num_queries: int, num_keys: int, batch: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """The (batch, N, T) additive regional-prompt mask of this frame (`csa.regions`) for a cross-attention
        call of that shape: built once per shape and kept for the phase (the same at every step and layer)."""
        key = (num_queries, num_keys, batch, dtype, device)
        if key not in self._region_mask_cache:
            mask = regional_additive_mask(self.prompt_regions, num_queries, num_keys, batch, dtype)
            self._region_mask_cache[key] = mask.to(device)
        return self._region_mask_cache[key]

    def _query_owner(self, image_masks: Mapping[str, torch.Tensor], num_tokens: int) -> torch.Tensor:
        """(N,) index into `read_banks` of the character whose mask holds each token (-1: background)."""
        grid = grid_masks(image_masks, num_tokens)
        nobody = torch.zeros(num_tokens, dtype=torch.bool)
        return token_owner([grid.get(bank.character, nobody) for bank in self.read_banks])

    def read_positions(self, layer: str) -> torch.Tensor | None:
        """Every read bank's token positions for this (step, layer), concatenated as `read` orders them: (M,)."""
        parts = [bank.get_positions(self.step, layer) for bank in self.read_banks if (self.step, layer) in bank]
        if any(p is None for p in parts) or not parts:
            return None
        return torch.cat(parts)

    def read(self, layer: str, halves: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """Every read bank's tokens for this (step, layer), concatenated: (halves, M, C), or None."""
        parts = [bank.get(self.step, layer, dtype, device, halves) for bank in self.read_banks]
        parts = [p for p in parts if p is not None]
        return torch.cat(parts, dim=1) if parts else None
