"""Regional cross-attention: in a frame with regions, each character's description is read only inside its box.

Two descriptions in one prompt leak into each other ("a man with red hair and a woman with a green hat"
gives red hats). With `CSAConfig(regional_prompts=True)` and user-given regions, a `RegionalCrossAttnProcessor`
on every cross-attention layer (`attn2`) of the UNet masks, for the conditional guidance half, the keys of
character X's description tokens for every query token outside X's region; the rest of the prompt (the
scene, the style) and every token of the unconditional half stay visible to all. It stands in for the
replaced processor only during such frames and hands the mask to it, as diffusers' `attention_mask`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from storydiffusion.csa.attention import ControlledWrappingProcessor
from storydiffusion.csa.masks import grid_masks

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention


def region_text_mask(
    regions: Mapping[str, torch.Tensor], tokens: Mapping[str, Sequence[int]], num_queries: int, num_keys: int
) -> torch.Tensor:
    """(N, T) bool: which text tokens each image token may read — character X's description tokens only
    inside X's region (`regions`: name -> (H, W) bool mask over the frame; `tokens`: name -> positions)."""
    allowed = torch.ones(num_queries, num_keys, dtype=torch.bool)
    grids = grid_masks(regions, num_queries)
    for name, positions in tokens.items():
        inside = grids.get(name)
        columns = [p for p in positions if p < num_keys]
        if inside is None or not columns:
            continue
        allowed[:, columns] = inside[:, None]
    return allowed


def regional_additive_mask(
    regions: tuple[Sequence[Mapping[str, torch.Tensor]], Sequence[Mapping[str, Sequence[int]]]],
    num_queries: int,
    num_keys: int,
    batch: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(batch, N, T) additive mask for a cross-attention call over the images of `regions` (per image: the
    region masks, the description token positions): 0 where allowed, the dtype's lowest value where not; the
    unconditional half (first, as diffusers stacks it) all 0."""
    masks, tokens = regions
    allowed = torch.stack([region_text_mask(m, t, num_queries, num_keys) for m, t in zip(masks, tokens)])
    halves = batch // len(masks)
    allowed = torch.cat([torch.ones_like(allowed)] * (halves - 1) + [allowed])  # (halves * images, N, T)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


class RegionalCrossAttnProcessor(ControlledWrappingProcessor):
    """Cross-attention whose conditional half reads each character's description only inside its region."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.controller.prompt_regions is not None and encoder_hidden_states is not None and attention_mask is None:
            text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
            num_queries = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states[0, 0].numel()
            attention_mask = self.controller.regional_mask(
                num_queries, text.shape[1], hidden_states.shape[0], hidden_states.dtype, hidden_states.device
            )
        return self.call_original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
