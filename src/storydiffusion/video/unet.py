"""The transition video UNet: an image UNet plus AnimateDiff motion layers, conditioned on two keyframes.

The video model is diffusers' `UNetMotionModel` (an image `UNet2DConditionModel` with temporal
attention modules after every spatial block, the AnimateDiff layout), so AnimateDiff's
`MotionAdapter` weights load into it. Two things make it a *transition* model:

- keyframes in: its input holds, besides the noisy latents, the keyframe latents (start at frame 0,
  end at frame L-1, zero elsewhere) and a mask channel marking those frames — the image-to-video
  layout of SEINE / inpainting models. The extra input channels start at zero, so the converted
  model begins as the image model;
- per-frame semantics: every frame's cross-attention sees `[text tokens ; tokens of P_i]`
  (`frame_encoder_states`), P_i from the Semantic Motion Predictor.

Batch layout everywhere: latents (B, C, F, H, W); per-frame tensors flattened frame-minor, row
b*F + f, which is how `UNetMotionModel` folds frames into the batch.
"""

from __future__ import annotations

import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from torch import nn


def keyframe_channels(latent_channels: int) -> int:
    """Input channels of the transition UNet: noisy latents + keyframe latents + keyframe mask."""
    return 2 * latent_channels + 1


def keyframe_condition(start_latents: torch.Tensor, end_latents: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, C, H, W) start and end latents -> (B, C + 1, F, H, W): keyframe latents and the mask channel."""
    batch, channels, height, width = start_latents.shape
    condition = start_latents.new_zeros(batch, channels + 1, num_frames, height, width)
    condition[:, :channels, 0] = start_latents
    condition[:, :channels, -1] = end_latents
    condition[:, channels, 0] = 1.0
    condition[:, channels, -1] = 1.0
    return condition


def frame_encoder_states(text_states: torch.Tensor, condition_tokens: torch.Tensor) -> torch.Tensor:
    """Text (B, T, C) and per-frame tokens (B, F, K, C) -> (B*F, T + K, C), one row per frame."""
    batch, frames = condition_tokens.shape[:2]
    if text_states.shape[0] != batch or text_states.shape[-1] != condition_tokens.shape[-1]:
        raise ValueError(
            f"text states {tuple(text_states.shape)} and frame tokens {tuple(condition_tokens.shape)} must share "
            "batch size and width"
        )
    text = text_states.repeat_interleave(frames, dim=0)  # (B*F, T, C)
    tokens = condition_tokens.reshape(batch * frames, *condition_tokens.shape[2:])  # (B*F, K, C)
    return torch.cat([text, tokens.to(text.dtype)], dim=1)


def motion_adapter_for(unet: UNet2DConditionModel, **overrides) -> MotionAdapter:
    """A fresh `MotionAdapter` shaped for `unet` (one temporal module per spatial layer)."""
    config = unet.config
    groups = overrides.pop("motion_norm_num_groups", config.norm_num_groups)
    heads = overrides.pop("motion_num_attention_heads", 8)
    return MotionAdapter(
        block_out_channels=tuple(config.block_out_channels),
        motion_layers_per_block=config.layers_per_block,
        motion_norm_num_groups=groups,
        motion_num_attention_heads=heads,
        use_motion_mid_block=overrides.pop("use_motion_mid_block", False),
        **overrides,
    )


def transition_unet(unet: UNet2DConditionModel, motion_adapter: MotionAdapter | None = None) -> UNetMotionModel:
    """An image UNet (+ AnimateDiff motion adapter; a fresh one if None) -> the transition UNetMotionModel.

    The image UNet's weights are copied; its `conv_in` widens to take the keyframe condition, with
    the new input channels at zero, so the converted model starts as the image model.
    """
    adapter = motion_adapter if motion_adapter is not None else motion_adapter_for(unet)
    video = UNetMotionModel.from_unet2d(unet, adapter)
    return widen_conv_in(video, keyframe_channels(unet.config.in_channels))


def widen_conv_in(model: UNetMotionModel, in_channels: int) -> UNetMotionModel:
    """Give `model.conv_in` `in_channels` inputs: existing weights kept, new input channels zero."""
    old = model.conv_in
    if old.in_channels == in_channels:
        return model
    if old.in_channels > in_channels:
        raise ValueError(f"conv_in already takes {old.in_channels} channels; cannot narrow it to {in_channels}")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    model.conv_in = new
    model.register_to_config(in_channels=in_channels)
    return model


def is_transition_unet(unet: nn.Module) -> bool:
    """Whether `unet` takes the keyframe condition (a UNetMotionModel with 2C + 1 input channels)."""
    config = getattr(unet, "config", None)
    return (
        isinstance(unet, UNetMotionModel)
        and config is not None
        and config.in_channels == keyframe_channels(config.out_channels)
    )
