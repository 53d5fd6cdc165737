"""Consistent Self-Attention (CSA) as a diffusers attention processor.

Each image's keys and values are its own tokens plus tokens sampled (rate r) from the *other*
images of the same character; queries stay its own. Sampled tokens are gathered by index — no
(B*N)^2 mask — so `scaled_dot_product_attention` keeps its fused kernels, and the extra cost is
the K/V factor `1 + r * (B - 1)`.

This module holds the math (small pure functions) and the processor, which keeps settings only.
All state — mode, step, random generator, banks — lives in the controller that the processor is
handed (`storydiffusion.csa.controller.ConsistentAttention`).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from storydiffusion.errors import StoryDiffusionError

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

    from storydiffusion.csa.controller import ConsistentAttention

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CSASchedule:
    """When CSA runs, as fractions of the denoising loop so 25- and 50-step runs behave alike.

    Default = the public StoryDiffusion code at its 50 steps: step 0 plain, then each layer call
    runs CSA with probability 0.7 until step 20 and 0.9 after.
    """

    plain_fraction: float = 0.02  # steps with step/num_steps < this run plain attention (1 of 50)
    stages: tuple[tuple[float, float], ...] = ((0.4, 0.7), (1.0, 0.9))  # (until fraction, P(CSA))

    def __post_init__(self) -> None:
        if not 0.0 <= self.plain_fraction <= 1.0:
            raise StoryDiffusionError(f"CSASchedule.plain_fraction={self.plain_fraction} must be in [0, 1]")
        for until, probability in self.stages:
            if not (0.0 <= until <= 1.0 and 0.0 <= probability <= 1.0):
                raise StoryDiffusionError(
                    f"CSASchedule.stages entry ({until}, {probability}) must be "
                    "(until fraction in [0, 1], probability in [0, 1])"
                )

    def probability(self, step: int, num_steps: int) -> float:
        """Probability that a layer runs CSA at `step` of `num_steps`."""
        fraction = step / max(num_steps, 1)
        if fraction < self.plain_fraction:
            return 0.0
        for until, probability in self.stages:
            if fraction < until:
                return probability
        return self.stages[-1][1] if self.stages else 1.0

    @classmethod
    def always(cls) -> CSASchedule:
        """CSA at every step and layer (no plain warm-up, no gating)."""
        return cls(plain_fraction=0.0, stages=((1.0, 1.0),))


BANK_SOURCES = ("steps", "finished", "sequential")


@dataclass(frozen=True)
class CSAConfig:
    """Which self-attention layers run CSA, and how many tokens they borrow."""

    # Sampling rate per resolution level, keyed by the level's downsampling factor relative to the
    # latent (1 = full latent grid, 2 = half, ...); a float applies to every level. The public
    # code's sa32/sa64 at 1024 px are the SDXL levels 4 and 2.
    rate: float | Mapping[int, float] = 0.5
    # Glob patterns over the attention module names: a UNet's self-attention
    # (`up_blocks.0.attentions.1.transformer_blocks.0.attn1`), a DiT's joint attention
    # (`single_transformer_blocks.3.attn`). None: the denoiser's default (`controller.DEFAULT_LAYERS`): on a
    # UNet the public code's choice, decoder self-attention only; on a DiT every other block.
    layers: Sequence[str] | None = None
    # Restrict to these resolution levels (downsampling factors); None keeps every matched level.
    levels: Sequence[int] | None = None
    schedule: CSASchedule = field(default_factory=CSASchedule)
    # Frames naming several characters without regions: "infer" their subject masks from the cross-attention
    # to each character's description tokens (`csa.subjects`) so each figure reads only its own bank;
    # "off": every token reads every named character's bank (the public code's blend).
    subject_masks: str = "infer"
    mask_until: float = 0.3  # fraction of the loop during which the inferred masks are refreshed, then kept
    mask_dilation: int = 1  # tokens the thresholded masks grow by
    # Reference phase: lend (and store in the bank) only tokens inside each reference image's subject mask,
    # inferred like the frame masks: a smaller bank, and backgrounds and layouts left free (ConsiStory).
    subject_only: bool = False
    # Frames with user-given regions: each character's description tokens are read by the cross-attention only
    # inside its region (`csa.regions`, UNet pipelines), against attributes leaking between two descriptions.
    regional_prompts: bool = False
    # DiT joint attention only (`csa.joint`): where borrowed keys sit for the rotary embedding ("source":
    # their own positions; "none": unrotated), and whether text queries may see borrowed keys
    positions: str = "source"
    text_sees_borrowed: bool = False
    # Weight w of every borrowed key (another image's, a bank's, a picture's) in the softmax: a log(w) bias on
    # the borrowed logits, the same as each borrowed token appearing w times. 1: the paper's attention.
    reference_strength: float = 1.0
    # What a character's bank holds. "steps": the tokens its reference images leave at every step of the mutual
    # reference phase (the paper). "finished": after that phase, tokens of its finished reference images, read
    # as pictures. "sequential": the references drawn one after another, each reading the finished ones before
    # it; the bank then holds them all as pictures.
    bank_from: str = "steps"
    # The noise a picture (a user's, or a finished reference) is read at: "step" -- each step's own level, one
    # denoiser pass per step -- or a fixed fraction of the schedule (0.0 clean ... 1.0), one pass for the loop.
    reference_noise: float | str = "step"

    def __post_init__(self) -> None:
        if self.bank_from not in BANK_SOURCES:
            raise StoryDiffusionError(f"CSAConfig.bank_from={self.bank_from!r} must be one of {BANK_SOURCES}")
        noise = self.reference_noise
        if noise != "step" and not (isinstance(noise, int | float) and 0.0 <= noise <= 1.0):
            raise StoryDiffusionError(
                f"CSAConfig.reference_noise={noise!r} must be 'step' (each step's own noise level) or a fraction "
                "of the schedule from 0.0 (clean) to 1.0"
            )
        strength = self.reference_strength
        if not (isinstance(strength, int | float) and 0.0 < strength < float("inf")):
            raise StoryDiffusionError(
                f"CSAConfig.reference_strength={strength!r} must be a positive number (1: unweighted, 4: each "
                "borrowed token counts four times)"
            )
        if self.positions not in ("source", "none"):
            raise StoryDiffusionError(f"CSAConfig.positions={self.positions!r} must be 'source' or 'none'")
        if self.subject_masks not in ("infer", "off"):
            raise StoryDiffusionError(f"CSAConfig.subject_masks={self.subject_masks!r} must be 'infer' or 'off'")
        if not 0.0 <= self.mask_until <= 1.0:
            raise StoryDiffusionError(f"CSAConfig.mask_until={self.mask_until} must be a fraction in [0, 1]")
        rates = self.rate.values() if isinstance(self.rate, Mapping) else [self.rate]
        for rate in rates:
            if not (isinstance(rate, int | float) and 0.0 <= rate <= 1.0):
                raise StoryDiffusionError(f"CSA rate {rate!r} is outside [0, 1]; use a fraction such as 0.5")
        if isinstance(self.layers, str):
            object.__setattr__(self, "layers", (self.layers,))

    def rate_for(self, level: int) -> float:
        if isinstance(self.rate, Mapping):
            return float(self.rate.get(level, 0.0))
        return float(self.rate)


# --------------------------------------------------------------------------------------------
# Token math: pure functions, testable without a UNet
# --------------------------------------------------------------------------------------------
def num_sampled_tokens(num_tokens: int, rate: float) -> int:
    """Tokens each image lends to the others at sampling `rate`."""
    return int(round(num_tokens * rate))


def sample_token_indices(
    num_images: int, num_tokens: int, num_samples: int, generator: torch.Generator | None
) -> torch.Tensor:
    """For each image, `num_samples` distinct token positions, sorted: (num_images, num_samples)."""
    device = generator.device if generator is not None else torch.device("cpu")
    scores = torch.rand(num_images, num_tokens, generator=generator, device=device)
    return scores.topk(num_samples, dim=1).indices.sort(dim=1).values


def other_images_index(num_images: int) -> torch.Tensor:
    """Row i lists every image but i: (num_images, num_images - 1)."""
    everyone = torch.arange(num_images).expand(num_images, num_images)
    return everyone[~torch.eye(num_images, dtype=torch.bool)].view(num_images, num_images - 1)


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Pick tokens per image: (..., B, N, C) with indices (B, k) -> (..., B, k, C)."""
    index = indices.to(tokens.device)[..., None].expand(*tokens.shape[:-2], -1, tokens.shape[-1])
    return tokens.gather(-2, index)


def borrow_from_others(sampled: torch.Tensor) -> torch.Tensor:
    """What each image borrows: (..., B, k, C) sampled tokens -> (..., B, (B-1)*k, C), image i gets all j != i."""
    num_images = sampled.shape[-3]
    borrowed = sampled[..., other_images_index(num_images).to(sampled.device), :, :]  # (..., B, B-1, k, C)
    return borrowed.flatten(-3, -2) if num_images > 1 else sampled[..., :0, :]


def split_guidance(x: torch.Tensor, guidance_halves: int) -> torch.Tensor:
    """(halves * B, ...) -> (halves, B, ...): diffusers stacks [uncond; cond] along the batch."""
    return x.view(guidance_halves, x.shape[0] // guidance_halves, *x.shape[1:])


def merge_guidance(x: torch.Tensor) -> torch.Tensor:
    """(halves, B, ...) -> (halves * B, ...)."""
    return x.flatten(0, 1)


def heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, heads * d) -> (batch, heads, tokens, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------
def layer_level(name: str, num_down_blocks: int) -> int:
    """Downsampling factor of the attention layer `name` in a UNet2DConditionModel (1, 2, 4, ...)."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return 2 ** int(parts[1])
    if parts[0] == "up_blocks":
        return 2 ** (num_down_blocks - 1 - int(parts[1]))
    if parts[0] == "mid_block":
        return 2 ** (num_down_blocks - 1)
    raise StoryDiffusionError(f"cannot tell the resolution level of attention layer {name!r}")


# keyword arguments `Attention.forward` drops without a warning when a processor does not take them
_QUIET_KWARGS = frozenset({"ip_adapter_masks", "ip_hidden_states"})


def processor_parameters(processor: Any) -> frozenset[str]:
    """The parameter names of `processor.__call__`: what `Attention.forward` lets through to it.

    diffusers passes a processor only the `cross_attention_kwargs` its `__call__` names — even one
    with `**kwargs` gets no others — so this set is the whole filter.
    """
    return frozenset(inspect.signature(processor.__call__).parameters)


class WrappingProcessor:
    """A processor that stands in for another and calls it, exactly as `Attention.forward` would call it,
    whenever it has nothing of its own to do (sliced, LoRA'd, IP-Adapter or custom processors alike)."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self._original_parameters = processor_parameters(original)  # once: signatures cost per layer call

    def call_original(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The replaced processor, called as `Attention.forward` calls one: hidden_states positional, the
        encoder states and mask by keyword, then only the extra keywords its `__call__` names (`temb` only
        when given: processors such as `SlicedAttnProcessor` take none)."""
        if temb is not None:
            kwargs["temb"] = temb
        accepted = self._original_parameters
        unused = [key for key in kwargs if key not in accepted and key not in _QUIET_KWARGS]
        if unused:  # diffusers' own warning, which CSA's catch-all signature would otherwise hide
            logger.warning(
                f"cross_attention_kwargs {unused} are not expected by {type(self.original).__name__} "
                "and will be ignored."
            )
        kwargs = {key: value for key, value in kwargs.items() if key in accepted}
        return self.original(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )


class ControlledWrappingProcessor(WrappingProcessor):
    """A `WrappingProcessor` for one named layer that asks a controller what to do (settings only)."""

    def __init__(self, name: str, controller: Any, original: Any) -> None:
        super().__init__(original)
        self.name = name
        self.controller = controller

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class ConsistentSelfAttnProcessor(WrappingProcessor):
    """Self-attention whose keys/values are extended with other images' tokens.

    Holds settings only (layer name, resolution level, rate) plus the processor it replaced, which
    runs every call that is not CSA — called exactly as `Attention.forward` would call it, so CSA off,
    or gated off, is exactly the original computation (sliced, LoRA'd, IP-Adapter or custom processors alike).
    """

    def __init__(self, name: str, level: int, rate: float, controller: ConsistentAttention, original: Any) -> None:
        super().__init__(original)
        self.name = name
        self.level = level
        self.rate = rate
        self.controller = controller

    def __repr__(self) -> str:
        return f"ConsistentSelfAttnProcessor(name={self.name!r}, level={self.level}, rate={self.rate})"

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or not self.controller.wants_csa(self.name):
            return self.call_original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if attention_mask is not None:
            raise StoryDiffusionError(
                f"layer {self.name}: Consistent Self-Attention does not take a self-attention mask; "
                "drop the attention_mask argument or exclude this layer from CSAConfig.layers"
            )

        tokens = hidden_states
        if attn.spatial_norm is not None:
            tokens = attn.spatial_norm(tokens, temb)
        if tokens.ndim == 4:
            batch, channels, height, width = tokens.shape
            tokens = tokens.view(batch, channels, height * width).transpose(1, 2)  # (batch, N, C)
        if attn.group_norm is not None:
            tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)

        extension = self._extension(tokens)
        if extension is None:  # nothing to borrow at this call: the original computation
            return self.call_original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        strength = self.controller.config.reference_strength
        out = consistent_attention(attn, tokens, *extension, strength=strength)  # (batch, N, C)

        if hidden_states.ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _extension(self, tokens: torch.Tensor) -> tuple[torch.Tensor | None, ...] | None:
        """What this call borrows, as `consistent_attention`'s (indices, bank_tokens[, read_mask]); None for
        nothing."""
        ctrl = self.controller
        halves = ctrl.guidance_halves(tokens.shape[0])
        per_half = split_guidance(tokens, halves)  # (halves, B, N, C)
        num_images, num_tokens = per_half.shape[1], per_half.shape[2]
        if ctrl.mode in ("mutual", "record"):
            indices = ctrl.mutual_indices(num_images, num_tokens, self.rate)  # (B, k) or None
            if indices is None:
                return None
            if ctrl.writes:
                ctrl.write(self.name, gather_tokens(per_half, indices).flatten(1, 2))  # (halves, B*k, C)
            if num_images < 2 or ctrl.mode == "record":  # a picture lends, it never reads
                return None
            return indices, None
        bank_tokens = ctrl.read(self.name, halves, tokens.dtype, tokens.device)  # (halves, M, C)
        if bank_tokens is None:
            return None
        return None, bank_tokens, ctrl.read_mask(self.name, num_tokens, tokens.device)


def bank_read_mask(query_owner: torch.Tensor, bank_owner: torch.Tensor) -> torch.Tensor:
    """Which bank tokens each query may read: (B, N) query owners (the character index whose mask holds the
    token, -1 for background) and (M,) bank token owners -> (B, N, M) bool, True where the owners agree."""
    return (query_owner[:, :, None] == bank_owner[None, None, :]) & (query_owner[:, :, None] >= 0)


def borrowed_bias(
    num_own: int, visible: torch.Tensor | None, strength: float, num_borrowed: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """The attention mask that weighs borrowed keys: own keys first (always visible), then `num_borrowed`
    borrowed ones, each weighted `strength` (a log-strength logit bias) and hidden where `visible` (B, N, M)
    is False. Boolean when no weighting is needed (every fused kernel takes it), additive otherwise; None when
    neither hides nor weighs anything."""
    if strength == 1.0:
        if visible is None:
            return None
        own = visible.new_ones(*visible.shape[:2], num_own)
        return torch.cat([own, visible], dim=-1)[:, None]  # (B, 1, N, N + M)
    shape = (1, 1, num_own + num_borrowed) if visible is None else (*visible.shape[:2], num_own + num_borrowed)
    bias = torch.zeros(shape, dtype=dtype, device=visible.device if visible is not None else None)
    bias[..., num_own:] = math.log(strength)
    if visible is not None:
        bias[..., num_own:] = bias[..., num_own:].masked_fill(~visible, float("-inf"))
    return bias[:, None]  # (B or 1, 1, N or 1, N + M)


def consistent_attention(
    attn: Attention,
    tokens: torch.Tensor,
    indices: torch.Tensor | None,
    bank_tokens: torch.Tensor | None,
    read_mask: torch.Tensor | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """CSA for one layer call: `tokens` (halves*B, N, C) -> (halves*B, N, C), before the output's reshape.

    Either `indices` (B, k) — mutual mode: image i also sees the tokens at `indices[j]` of every
    other image j in its guidance half — or `bank_tokens` (halves, M, C) — read mode: every image
    also sees the bank's tokens of its guidance half; with `read_mask` (B, N, M) a query sees only the
    bank tokens its row allows (`bank_read_mask`: each character's tokens from inside its own mask), and
    always all of its own image's tokens. Keys and values are projected once per token, then gathered,
    so borrowed tokens cost no extra projection. `strength` weighs every borrowed key (`borrowed_bias`).
    """
    query = attn.to_q(tokens)
    key = attn.to_k(tokens)
    value = attn.to_v(tokens)
    if indices is not None:
        halves = tokens.shape[0] // indices.shape[0]
        key_ext, value_ext = (
            borrow_from_others(gather_tokens(split_guidance(t, halves), indices)) for t in (key, value)
        )  # (halves, B, (B-1)*k, C)
    else:
        halves = bank_tokens.shape[0]
        num_images = tokens.shape[0] // halves
        key_ext, value_ext = (
            t.unsqueeze(1).expand(-1, num_images, -1, -1) for t in (attn.to_k(bank_tokens), attn.to_v(bank_tokens))
        )  # (halves, B, M, C)
    key = torch.cat([split_guidance(key, halves), key_ext], dim=2)  # (halves, B, N + E, C)
    value = torch.cat([split_guidance(value, halves), value_ext], dim=2)

    heads = attn.heads
    query = heads_first(query, heads)  # (halves*B, h, N, d)
    key = heads_first(merge_guidance(key), heads)  # (halves*B, h, N + E, d)
    value = heads_first(merge_guidance(value), heads)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    # own tokens always visible; borrowed ones where the read mask allows, weighted by `strength`
    mask = borrowed_bias(tokens.shape[1], read_mask, strength, key.shape[2] - tokens.shape[1], query.dtype)
    if mask is not None and read_mask is not None:
        mask = mask.repeat(halves, 1, 1, 1)  # (halves*B, 1, N, N + M)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=attn.scale
    )
    out = out.transpose(1, 2).flatten(2).to(query.dtype)  # (halves*B, N, h*d)
    out = attn.to_out[0](out)
    return attn.to_out[1](out)


def kv_factor(rate: float, num_images: int) -> float:
    """FLOP factor of CSA's K/V extension over plain attention: 1 + r * (B - 1)."""
    return 1.0 + rate * (num_images - 1)
