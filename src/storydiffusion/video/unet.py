"""The transition video UNet: an image UNet plus AnimateDiff motion layers, conditioned on two keyframes.

The video model is diffusers' `UNetMotionModel` (an image `UNet2DConditionModel` with temporal
attention modules after every spatial block, the AnimateDiff layout), so AnimateDiff's
`MotionAdapter` weights load into it. Two things make it a *transition* model:

- keyframes in: its input holds, besides the noisy latents, both keyframes' latents on *every*
  frame and a channel saying where the frame lies between them (0 at the start, 1 at the end) — so
  each in-between frame sees what the character looks like at both ends without having to fetch it
  through the temporal layers (the layout of image-to-video models that concatenate the condition
  image to all frames; an earlier layout with the keyframes at the ends only lost the character's
  clothes in the middle). The extra input channels start at zero, so the converted model begins as
  the image model;
- per-frame semantics: every frame's cross-attention sees `[text tokens ; tokens of P_i]`
  (`frame_encoder_states`), P_i from the Semantic Motion Predictor; a predictor working on a grid of
  embeddings also lays P_i out as a map (`semantic_map`) that joins the input channels, each latent
  pixel beside the semantics of its cell — cross-attention alone let a small UNet ignore two tokens
  among 77 text tokens.

- keyframe attention: every spatial self-attention layer lets each frame attend to the two keyframes'
  tokens besides its own (`KeyframeAttnProcessor`, installed by `use_keyframe_attention`; the cross-
  frame attention of Tune-A-Video and Text2Video-Zero, StoryDiffusion's consistent self-attention
  applied to frames): the character's look at both ends is one attention hop from every frame. It
  adds no weights, so AnimateDiff / image-UNet weights still load. A frame reads the keyframes either at
  its own step's noise (how the model trains) or, finished, from one pass over the clean keyframes per
  clip (`KeyframeTokens`; `TransitionPipeline(..., keyframe_tokens="finished")`).

Batch layout everywhere: latents (B, C, F, H, W); per-frame tensors flattened frame-minor, row
b*F + f, which is how `UNetMotionModel` folds frames into the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn


def keyframe_channels(latent_channels: int, map_channels: int = 0) -> int:
    """Input channels of the transition UNet: noisy latents + start and end latents + the frame's place
    in time (+ the semantic map's channels)."""
    return 3 * latent_channels + 1 + map_channels


def keyframe_condition(start_latents: torch.Tensor, end_latents: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, C, H, W) start and end latents -> (B, 2C + 1, F, H, W): on every frame the start latents, the
    end latents and a constant channel, the frame's place between them (0 .. 1)."""
    batch, channels, height, width = start_latents.shape
    place = torch.linspace(0.0, 1.0, num_frames, device=start_latents.device, dtype=start_latents.dtype)
    return torch.cat(
        [
            start_latents[:, :, None].expand(batch, channels, num_frames, height, width),
            end_latents[:, :, None].expand(batch, channels, num_frames, height, width),
            place.view(1, 1, num_frames, 1, 1).expand(batch, 1, num_frames, height, width),
        ],
        dim=1,
    )


def semantic_map(condition_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, M, F, g, g) P_i map -> (B, M, F, h, w): stretched over the latents (bilinear)."""
    batch, channels, frames, grid, _ = condition_map.shape
    flat = condition_map.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B*F, M, g, g)
    stretched = F.interpolate(flat.float(), size=size, mode="bilinear", align_corners=False)
    return stretched.view(batch, frames, channels, *size).permute(0, 2, 1, 3, 4).to(condition_map.dtype)


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


def transition_unet(
    unet: UNet2DConditionModel, motion_adapter: MotionAdapter | None = None, map_channels: int = 0
) -> UNetMotionModel:
    """An image UNet (+ AnimateDiff motion adapter; a fresh one if None) -> the transition UNetMotionModel.

    The image UNet's weights are copied; its `conv_in` widens to take the keyframe condition (and a
    semantic map of `map_channels`), with the new input channels at zero, so the converted model
    starts as the image model.
    """
    adapter = motion_adapter if motion_adapter is not None else motion_adapter_for(unet)
    video = UNetMotionModel.from_unet2d(unet, adapter)
    return widen_conv_in(video, keyframe_channels(unet.config.in_channels, map_channels))


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


@torch.no_grad()
def graft_image_unet(video: UNetMotionModel, image: UNet2DConditionModel) -> int:
    """Put `image`'s weights in the image layers of a trained transition UNet, keeping its motion layers and
    the keyframe and map input channels of its `conv_in` (`UNetMotionModel` names its image layers as the
    image UNet does). For moving a trained video model onto a better image model. Returns the tensors replaced."""
    state = video.state_dict()
    replaced = {}
    for key, weight in image.state_dict().items():
        if key not in state:
            raise ValueError(f"the transition UNet has no layer {key!r}: not the image UNet it was grown from")
        target = state[key]
        if key == "conv_in.weight":
            weight = torch.cat([weight.to(target.dtype), target[:, weight.shape[1] :]], dim=1)
        if target.shape != weight.shape:
            raise ValueError(f"{key}: {tuple(weight.shape)} in the image UNet, {tuple(target.shape)} in the video UNet")
        replaced[key] = weight.to(target.dtype)
    video.load_state_dict(replaced, strict=False)
    return len(replaced)


def is_transition_unet(unet: nn.Module, map_channels: int = 0) -> bool:
    """Whether `unet` takes the keyframe condition and a `map_channels` semantic map (a UNetMotionModel
    with 3C + 1 + map_channels input channels)."""
    config = getattr(unet, "config", None)
    return (
        isinstance(unet, UNetMotionModel)
        and config is not None
        and config.in_channels == keyframe_channels(config.out_channels, map_channels)
    )


KEYFRAME_SOURCES = ("noisy", "finished")


def keyframe_settings_problem(tokens: Any = None, strength: Any = None) -> str | None:
    """What is wrong with a keyframe_tokens / keyframe_strength pair (None: unset, not checked), or None: the one
    check behind the pipeline's call, the video settings file and the command line."""
    if tokens is not None and tokens not in KEYFRAME_SOURCES:
        return f"keyframe_tokens={tokens!r} must be one of {' or '.join(map(repr, KEYFRAME_SOURCES))}"
    if strength is not None:
        number = not isinstance(strength, bool) and isinstance(strength, int | float)
        if not (number and 0 < strength < float("inf")):
            return f"keyframe_strength={strength!r} must be a positive number (1: unweighted)"
    return None


@dataclass
class KeyframeTokens:
    """What keyframe attention reads, owned by one `TransitionPipeline` (no module state).

    mode "off": each frame reads its clip's own first and last frame at the same step (how the model trains);
    "record": a pass over the two finished keyframes stores, per spatial layer, the keyframes' tokens
    (`tokens[layer]`: (clips, 2 * T, W)); "read": every frame reads those instead, at every step.
    `strength`: the keyframes' keys weighted w in the softmax (a log-w logit bias; 1: unweighted)."""

    mode: str = "off"
    strength: float = 1.0
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.mode, self.strength, self.tokens = "off", 1.0, {}


class KeyframeAttnProcessor:
    """Spatial self-attention in which every frame also attends to its clip's first and last frame.

    Takes `num_frames` through the UNet's `cross_attention_kwargs` (rows are clips major, frames
    minor); without it, or for cross-attention, it is plain scaled-dot-product attention. Without
    `keyframes` it is stateless (one instance serves every layer); with them (`KeyframeTokens`, one
    processor per layer, named `layer`) it can record the finished keyframes' tokens and read them instead.
    """

    def __init__(self, keyframes: KeyframeTokens | None = None, layer: str | None = None) -> None:
        self.attention = AttnProcessor2_0()
        self.keyframes, self.layer = keyframes, layer

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        num_frames: int | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None and num_frames is not None and num_frames >= 2:
            if hidden_states.ndim != 3:
                raise ValueError(f"expected hidden states (batch, tokens, channels), got {tuple(hidden_states.shape)}")
            rows, tokens, width = hidden_states.shape
            if rows % num_frames:
                raise ValueError(f"{rows} rows do not split into clips of num_frames={num_frames}")
            frames = hidden_states.view(rows // num_frames, num_frames, tokens, width)
            ends = torch.cat([frames[:, :1], frames[:, -1:]], dim=2)  # (B, 1, 2T, W): the clip's own ends
            mode = self.keyframes.mode if self.keyframes is not None else "off"
            if mode == "record":
                self.keyframes.tokens[self.layer] = ends[:, 0].detach()
            elif mode == "read":
                ends = self.keyframes.tokens[self.layer][:, None].to(hidden_states.dtype)
                if ends.shape[0] != frames.shape[0] or ends.shape[2:] != (2 * tokens, width):
                    raise ValueError(
                        f"{self.layer}: the recorded keyframe tokens {tuple(ends.shape)} do not fit this call's "
                        f"{frames.shape[0]} clips of {tokens} tokens"
                    )
            ends = ends.expand(-1, num_frames, -1, -1)  # (B, F, 2T, W)
            encoder_hidden_states = torch.cat([frames, ends], dim=2).reshape(rows, 3 * tokens, width)
            strength = self.keyframes.strength if self.keyframes is not None else 1.0
            if strength != 1.0:  # the keyframes' keys weighted: log(w) on their logits, 0 on the frame's own
                bias = torch.zeros(rows, 1, 3 * tokens, device=hidden_states.device, dtype=hidden_states.dtype)
                bias[..., tokens:] = math.log(strength)
                attention_mask = bias
        # Self-attention layers have no cross-attention norm, so attending to the widened context
        # through diffusers' processor is exactly self-attention over [own ; first ; last] tokens.
        return self.attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def use_keyframe_attention(unet: UNetMotionModel, keyframes: KeyframeTokens | None = None) -> UNetMotionModel:
    """Give every spatial attention layer of `unet` a `KeyframeAttnProcessor` (the motion modules keep
    theirs: they attend across frames already), reading through `keyframes` when given. Call it with
    `cross_attention_kwargs={"num_frames": F}`."""
    processors = {}
    for name, processor in unet.attn_processors.items():
        layer = name.removesuffix(".processor")
        processors[name] = processor if "motion_modules" in name else KeyframeAttnProcessor(keyframes, layer)
    unet.set_attn_processor(processors)
    return unet
