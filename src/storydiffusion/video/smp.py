"""The Semantic Motion Predictor: two keyframes' image embeddings -> one semantic embedding per frame.

StoryDiffusion (§3.2) encodes the start and end keyframes with a CLIP image encoder, linearly
interpolates the two embeddings to L frames, and refines that path with a transformer into per-frame
embeddings P_1..P_L that condition a video diffusion model through cross-attention. Two keyframes
alone cannot say whether the character walked or jumped between them, so the predictor may also
read the prompt (`text_dim`): its layers then cross-attend to the text encoder's hidden states.

The transformer predicts a *correction* to the linear path (its output projection starts at zero),
so an untrained predictor is exactly linear interpolation, and `bypass=True` gives that baseline
with the same weights. `condition_tokens` projects P_i to the video UNet's cross-attention width.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def interpolate_embeddings(start: torch.Tensor, end: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, D), (B, D) -> (B, L, D): the straight path, frame 0 at `start`, frame L-1 at `end`."""
    weights = torch.linspace(0.0, 1.0, num_frames, device=start.device, dtype=start.dtype)  # (L,)
    return start[:, None] + weights[None, :, None] * (end - start)[:, None]


class SemanticMotionPredictor(ModelMixin, ConfigMixin):
    """Start/end image embeddings (and optionally the prompt) -> per-frame semantic embeddings.

    Args:
        embed_dim: size of the image embeddings (the CLIP image encoder's projection).
        hidden_size: the transformer's width. Paper: 1024 (with 12 heads, which does not divide 1024;
            the default takes 16).
        num_layers: transformer layers (paper: 8).
        num_heads: attention heads; must divide `hidden_size`.
        max_frames: the longest clip; one learned embedding per frame position.
        text_dim: width of the text encoder's hidden states to cross-attend to; None reads no text.
        cross_attention_dim: width of the video UNet's cross-attention (for `condition_tokens`).
        condition_tokens: how many cross-attention tokens each P_i becomes.
        dropout: inside the transformer, in training only.
    """

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 1024,
        hidden_size: int = 1024,
        num_layers: int = 8,
        num_heads: int = 16,
        max_frames: int = 32,
        text_dim: int | None = None,
        cross_attention_dim: int = 768,
        condition_tokens: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
        if max_frames < 2:
            raise ValueError(f"max_frames={max_frames} must be >= 2 (a start and an end frame)")
        if condition_tokens < 1:
            raise ValueError(f"condition_tokens={condition_tokens} must be >= 1")
        self.proj_in = nn.Linear(embed_dim, hidden_size)
        self.frame_embeddings = nn.Parameter(torch.zeros(max_frames, hidden_size))
        # The two keyframes themselves, tagged start/end, ride along as two extra tokens: the path's
        # frames see both ends directly, not only through the interpolated values.
        self.keyframe_embeddings = nn.Parameter(torch.zeros(2, hidden_size))
        self.text_proj = nn.Linear(text_dim, hidden_size) if text_dim else None
        layer_kwargs = dict(
            d_model=hidden_size,
            nhead=num_heads,
            dim_feedforward=4 * hidden_size,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        if text_dim:
            self.layers = nn.ModuleList(nn.TransformerDecoderLayer(**layer_kwargs) for _ in range(num_layers))
        else:
            self.layers = nn.ModuleList(nn.TransformerEncoderLayer(**layer_kwargs) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(hidden_size)
        self.proj_out = nn.Linear(hidden_size, embed_dim)
        nn.init.zeros_(self.proj_out.weight)  # starts as linear interpolation
        nn.init.zeros_(self.proj_out.bias)
        nn.init.normal_(self.frame_embeddings, std=0.02)
        nn.init.normal_(self.keyframe_embeddings, std=0.02)
        self.to_condition = nn.Linear(embed_dim, condition_tokens * cross_attention_dim)

    @property
    def reads_text(self) -> bool:
        return self.text_proj is not None

    def forward(
        self,
        start_embeds: torch.Tensor,
        end_embeds: torch.Tensor,
        num_frames: int,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        bypass: bool = False,
    ) -> torch.Tensor:
        """(B, D) start and end embeddings -> (B, L, D) per-frame embeddings P_1..P_L.

        `text_embeds` (B, T, text_dim) with `text_mask` (B, T; 1 = a real token) is read when the
        predictor was built with `text_dim`. `bypass=True` returns the linear path (the baseline).
        """
        self._check(start_embeds, end_embeds, num_frames, None if bypass else text_embeds, needs_text=not bypass)
        path = interpolate_embeddings(start_embeds, end_embeds, num_frames)  # (B, L, D)
        if bypass:
            return path
        frames = self.proj_in(path) + self.frame_embeddings[:num_frames]  # (B, L, H)
        ends = self.proj_in(torch.stack([start_embeds, end_embeds], dim=1)) + self.keyframe_embeddings  # (B, 2, H)
        x = torch.cat([frames, ends], dim=1)  # (B, L + 2, H)
        if self.text_proj is not None:
            memory = self.text_proj(text_embeds.to(x.dtype))  # (B, T, H)
            padding = None if text_mask is None else ~text_mask.bool()
            for layer in self.layers:
                x = layer(x, memory, memory_key_padding_mask=padding)
        else:
            for layer in self.layers:
                x = layer(x)
        return path + self.proj_out(self.norm_out(x[:, :num_frames]))

    def condition_tokens(self, frame_embeds: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, tokens, cross_attention_dim): what each frame's cross-attention appends."""
        batch, frames, _ = frame_embeds.shape
        tokens = self.to_condition(frame_embeds)  # (B, L, tokens * C)
        return tokens.view(batch, frames, self.config.condition_tokens, self.config.cross_attention_dim)

    def _check(
        self, start: torch.Tensor, end: torch.Tensor, num_frames: int, text_embeds: torch.Tensor | None,
        needs_text: bool,
    ) -> None:
        dim = self.config.embed_dim
        if start.ndim != 2 or start.shape != end.shape or start.shape[1] != dim:
            raise ValueError(
                f"start_embeds {tuple(start.shape)} and end_embeds {tuple(end.shape)} must both be (B, {dim})"
            )
        if not 2 <= num_frames <= self.config.max_frames:
            raise ValueError(f"num_frames={num_frames} must be in [2, {self.config.max_frames}] (config.max_frames)")
        if needs_text and self.text_proj is not None and text_embeds is None:
            raise ValueError("this predictor reads the prompt (config.text_dim is set): pass text_embeds")
        if text_embeds is not None and self.text_proj is not None:
            if text_embeds.ndim != 3 or text_embeds.shape[0] != start.shape[0]:
                raise ValueError(
                    f"text_embeds must be (B={start.shape[0]}, T, {self.config.text_dim}), "
                    f"got {tuple(text_embeds.shape)}"
                )
