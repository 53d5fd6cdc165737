"""How a bank stores tokens: per-token int8 (the default), grouped int4, or a float dtype; and keeping an evenly
spaced share of an entry's tokens (`BankCompaction.keep_tokens`)."""

from __future__ import annotations

import math

import torch

from storydiffusion.errors import StoryDiffusionError

STORAGE_DTYPES = ("int8", "float16", "bfloat16", "float32", "int4")  # int4 is lossy beyond int8
_INT8_MAX = 127.0
_INT4_MAX = 7.0
_INT4_GROUP = 64  # channels per int4 scale: one scale per token (as int8 has) loses too much at 4 bits


def quantize_int8(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8: (..., C) -> int8 values (..., C) and fp16 scales (..., 1)."""
    low, high = tokens.aminmax(dim=-1, keepdim=True)  # avoids a full-size abs() temporary
    scale = torch.maximum(-low, high).float().clamp_min_(1e-8) / _INT8_MAX
    values = (tokens.float() / scale).round_().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return values, scale.to(torch.float16)


def dequantize_int8(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_int8`, in the compute dtype."""
    return (values.float() * scale.float()).to(dtype)


def int4_group(channels: int) -> int:
    """Channels per int4 scale: `_INT4_GROUP`, or the largest power of two dividing `channels` below it."""
    return math.gcd(channels, _INT4_GROUP)


def quantize_int4(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per group of channels: (..., C) -> two values a byte (..., C/2) uint8, fp16 scales
    (..., C/group). Values -7..7 are stored offset by 8, the low nibble first."""
    channels = tokens.shape[-1]
    if channels % 2:
        raise StoryDiffusionError(f"int4 bank storage packs two channels a byte; these tokens have {channels}")
    grouped = tokens.float().unflatten(-1, (-1, int4_group(channels)))  # (..., groups, group)
    low, high = grouped.aminmax(dim=-1, keepdim=True)
    scale = torch.maximum(-low, high).clamp_min_(1e-8) / _INT4_MAX
    levels = (grouped / scale).round_().clamp_(-_INT4_MAX, _INT4_MAX).add_(8).to(torch.uint8).flatten(-2)
    packed = levels[..., 0::2] | (levels[..., 1::2] << 4)
    return packed, scale.squeeze(-1).to(torch.float16)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_int4`, in the compute dtype."""
    levels = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)  # (..., C)
    grouped = (levels.float() - 8).unflatten(-1, (scale.shape[-1], -1))  # (..., groups, group)
    return (grouped * scale.float().unsqueeze(-1)).flatten(-2).to(dtype)


def keep_evenly(tokens: torch.Tensor, fraction: float) -> torch.Tensor:
    """`fraction` of an entry's tokens (halves, M, C), evenly spaced over M (at least one)."""
    if fraction >= 1.0:
        return tokens
    count = tokens.shape[1]
    kept = max(1, round(count * fraction))
    index = torch.arange(kept, device=tokens.device) * count // kept
    return tokens.index_select(1, index)


def encode_tokens(tokens: torch.Tensor, storage_dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens in a storage dtype: (values, scales), scales None for the float storages."""
    if storage_dtype == "int8":
        return quantize_int8(tokens)
    if storage_dtype == "int4":
        return quantize_int4(tokens)
    return tokens.to(getattr(torch, storage_dtype)), None
