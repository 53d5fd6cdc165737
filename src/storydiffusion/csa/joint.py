"""Consistent Self-Attention on joint attention (DiT models: Flux.1's double- and single-stream blocks).

A DiT block attends over one sequence `[text ; image]` per image. CSA lends *image* tokens only: each
image's keys and values are extended with a sampled share of the other reference images' image
tokens; text tokens are never borrowed. Two choices public methods make differently are options:

- `positions`: where a borrowed key sits for the rotary embedding. "source" keeps the rotation of the
  place it came from (the plain CSA reading; every image shares one position grid, so this is also
  "the same place in the borrowing image"); "none" borrows the key before its rotation, so it matches
  by content alone (the public Flux ports that drop positions for borrowed tokens). CharaConsist's
  re-positioning to *matched* points needs point matching and is not built.
- `text_sees_borrowed`: whether text queries may attend to borrowed keys. False (CharaConsist's
  choice, the default) leaves every text token's output exactly as without CSA.

Status (issue #14): the mutual phase on `FluxTransformer2DModel`, tested against a dense masked
formulation. Still to build: the bank (read mode), SD3's joint blocks, the selection by block kind
and the Flux/SD3 `StoryPipeline`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from storydiffusion.csa.attention import (
    WrappingProcessor,
    borrow_from_others,
    gather_tokens,
    num_sampled_tokens,
    split_guidance,
)
from storydiffusion.errors import StoryDiffusionError

POSITIONS = ("source", "none")


def joint_consistent_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    text_tokens: int,
    indices: torch.Tensor,
    halves: int = 1,
    unrotated_key: torch.Tensor | None = None,
    text_sees_borrowed: bool = False,
) -> torch.Tensor:
    """Joint attention with CSA: query/key/value (halves*B, S, H, D), S = text_tokens + N image tokens,
    rotary already applied; indices (B, k) image-token positions each image lends to the others of its
    guidance half. `unrotated_key` (halves*B, S, H, D): borrow keys without their rotation ("none").
    Returns (halves*B, S, H, D)."""
    images = indices.shape[0]
    lent_key = (key if unrotated_key is None else unrotated_key)[:, text_tokens:]  # (halves*B, N, H, D)
    lent_value = value[:, text_tokens:]
    borrowed = [
        borrow_from_others(gather_tokens(split_guidance(t.flatten(2), halves), indices)).flatten(0, 1)
        for t in (lent_key, lent_value)
    ]  # (halves*B, (B-1)*k, H*D) each
    heads, dim = key.shape[2], key.shape[3]
    key = torch.cat([key, borrowed[0].unflatten(-1, (heads, dim))], dim=1)  # (halves*B, S + E, H, D)
    value = torch.cat([value, borrowed[1].unflatten(-1, (heads, dim))], dim=1)
    mask = None
    if not text_sees_borrowed and images > 1:
        extra = key.shape[1] - query.shape[1]
        mask = torch.ones(query.shape[1], key.shape[1], dtype=torch.bool, device=query.device)
        mask[:text_tokens, key.shape[1] - extra :] = False  # text queries never see borrowed keys
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
    )  # (halves*B, H, S, D)
    return out.transpose(1, 2)


class FluxConsistentAttnProcessor(WrappingProcessor):
    """CSA for one `FluxAttention` (double- or single-stream block) in the mutual (reference) phase.

    Settings only, like `ConsistentSelfAttnProcessor`: the controller says whether this call runs CSA,
    how many guidance halves the batch holds and draws the token indices; the text length of a
    single-stream block's joint sequence comes from the controller (`text_tokens`), since the block hands
    the processor `[text ; image]` as one sequence. Every other call goes to the replaced processor.
    """

    def __init__(
        self,
        name: str,
        rate: float,
        controller: Any,
        original: Any,
        positions: str = "source",
        text_sees_borrowed: bool = False,
    ) -> None:
        super().__init__(original)
        if positions not in POSITIONS:
            raise StoryDiffusionError(f"positions={positions!r} is not one of {POSITIONS}")
        self.name, self.rate, self.controller = name, rate, controller
        self.positions, self.text_sees_borrowed = positions, text_sees_borrowed

    def __repr__(self) -> str:
        return f"FluxConsistentAttnProcessor(name={self.name!r}, rate={self.rate}, positions={self.positions!r})"

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        **kwargs: Any,
    ) -> Any:
        ctrl = self.controller
        if attention_mask is not None or ctrl.mode != "mutual" or not ctrl.wants_csa(self.name):
            return self.call_original(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=image_rotary_emb, **kwargs
            )
        from diffusers.models.embeddings import apply_rotary_emb

        double = encoder_hidden_states is not None
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1) if double else hidden_states
        text_tokens = encoder_hidden_states.shape[1] if double else ctrl.text_tokens
        halves = ctrl.guidance_halves(joint.shape[0])
        images, num_image_tokens = joint.shape[0] // halves, joint.shape[1] - text_tokens
        num_samples = num_sampled_tokens(num_image_tokens, self.rate)
        if num_samples == 0 or images < 2:
            return self.call_original(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=image_rotary_emb, **kwargs
            )
        query, key, value = self._projections(attn, hidden_states, encoder_hidden_states)  # (halves*B, S, H, D)
        unrotated = key if self.positions == "none" else None
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        indices = ctrl.sample_indices(images, num_image_tokens, num_samples).to(joint.device)
        out = (
            joint_consistent_attention(
                query, key, value, text_tokens, indices, halves, unrotated, self.text_sees_borrowed
            )
            .flatten(2)
            .to(query.dtype)
        )  # (halves*B, S, H*D)
        if not double:
            return out
        text_out, image_out = out[:, :text_tokens], out[:, text_tokens:]
        return attn.to_out[1](attn.to_out[0](image_out.contiguous())), attn.to_add_out(text_out.contiguous())

    @staticmethod
    def _projections(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
        """Query, key, value of the joint sequence [text ; image] as (B, S, H, D), normalised as diffusers does."""
        if getattr(attn, "fused_projections", False):
            raise StoryDiffusionError(
                "CSA on Flux does not support fused QKV projections; call unfuse_qkv_projections()"
            )
        unflat = (-1, attn.head_dim)
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, unflat))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, unflat))
        value = attn.to_v(hidden_states).unflatten(-1, unflat)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            text_query = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, unflat))
            text_key = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, unflat))
            text_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, unflat)
            query, key, value = (
                torch.cat(p, dim=1) for p in ((text_query, query), (text_key, key), (text_value, value))
            )
        return query, key, value
