"""The Semantic Motion Predictor: two keyframes' image embeddings -> one semantic embedding per frame.

StoryDiffusion (§3.2) encodes the start and end keyframes with a CLIP image encoder, linearly
interpolates the two embeddings to L frames, and refines that path with a transformer into per-frame
embeddings P_1..P_L that condition a video diffusion model through cross-attention. Two keyframes
alone cannot say whether the character walked or jumped between them, so the predictor may also
read the prompt (`text_dim`): its layers then cross-attend to the text encoder's hidden states.

An image embedding may be one vector per frame (the CLIP image embedding, as in the paper;
`num_tokens=1`) or a g x g grid of them (`num_tokens=g*g`: the encoder's patch tokens pooled to g x g
and projected into the same space). A pooled CLIP embedding says what is in a frame but hardly where
(on the tiny world, a linear read-out of the character's x position from it explains nothing of its
variance; from a 4 x 4 grid, 82%), so only a grid lets the predicted path say where the character
goes. The grid's tokens keep their place: a learned embedding per frame and per cell.

The transformer predicts a *correction* to the linear path (its output projection starts at zero),
so an untrained predictor is exactly linear interpolation, and `bypass=True` gives that baseline
with the same weights. `condition_tokens` projects P_i to the video UNet's cross-attention width;
with a grid, `condition_map` also lays P_i out as a small spatial map (`map_channels`) that the UNet
takes beside its input latents, cell over cell.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def interpolate_embeddings(start: torch.Tensor, end: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, *S), (B, *S) -> (B, L, *S): the straight path, frame 0 at `start`, frame L-1 at `end`."""
    weights = torch.linspace(0.0, 1.0, num_frames, device=start.device, dtype=start.dtype)  # (L,)
    weights = weights.view(1, num_frames, *([1] * (start.ndim - 1)))
    return start[:, None] + weights * (end - start)[:, None]


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
        condition_tokens: how many cross-attention tokens each embedding of P_i becomes (with a grid,
            each cell's embedding: `num_tokens * condition_tokens` tokens per frame).
        num_tokens: embeddings per frame: 1 (the pooled image embedding) or g*g (a g x g grid).
        map_channels: channels of `condition_map` (0: none; needs a grid).
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
        num_tokens: int = 1,
        map_channels: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
        if max_frames < 2:
            raise ValueError(f"max_frames={max_frames} must be >= 2 (a start and an end frame)")
        if condition_tokens < 1:
            raise ValueError(f"condition_tokens={condition_tokens} must be >= 1")
        if num_tokens < 1 or math.isqrt(num_tokens) ** 2 != num_tokens:
            raise ValueError(f"num_tokens={num_tokens} must be 1 or a square (a g x g grid)")
        if map_channels and num_tokens == 1:
            raise ValueError("map_channels needs a grid of embeddings per frame (num_tokens = g*g > 1)")
        self.proj_in = nn.Linear(embed_dim, hidden_size)
        self.frame_embeddings = nn.Parameter(torch.zeros(max_frames, hidden_size))
        # The two keyframes themselves, tagged start/end, ride along as two extra tokens: the path's
        # frames see both ends directly, not only through the interpolated values.
        self.keyframe_embeddings = nn.Parameter(torch.zeros(2, hidden_size))
        # With a grid, every cell's tokens carry where they are.
        self.cell_embeddings = nn.Parameter(torch.zeros(num_tokens, hidden_size)) if num_tokens > 1 else None
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
        if self.cell_embeddings is not None:
            nn.init.normal_(self.cell_embeddings, std=0.02)
        self.to_condition = nn.Linear(embed_dim, condition_tokens * cross_attention_dim)
        self.to_map = nn.Linear(embed_dim, map_channels) if map_channels else None

    @property
    def grid_size(self) -> int:
        """g: each frame's embeddings form a g x g grid (1 for a pooled embedding)."""
        return math.isqrt(self.config.num_tokens)

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
        """Start and end embeddings -> per-frame embeddings P_1..P_L.

        Shapes: (B, D) -> (B, L, D) for a pooled predictor (`num_tokens=1`); (B, N, D) -> (B, L, N, D)
        for a grid of N = g*g cells (row-major). `text_embeds` (B, T, text_dim) with `text_mask`
        (B, T; 1 = a real token) is read when the predictor was built with `text_dim`.
        `bypass=True` returns the linear path (the baseline).
        """
        self._check(start_embeds, end_embeds, num_frames, None if bypass else text_embeds, needs_text=not bypass)
        path = interpolate_embeddings(start_embeds, end_embeds, num_frames)  # (B, L, [N,] D)
        if bypass:
            return path
        batch, cells = start_embeds.shape[0], self.config.num_tokens
        grid_path = path.view(batch, num_frames, cells, -1)  # (B, L, N, D)
        where = 0 if self.cell_embeddings is None else self.cell_embeddings  # (N, H)
        frames = self.proj_in(grid_path) + self.frame_embeddings[:num_frames, None] + where  # (B, L, N, H)
        keyframes = torch.stack([start_embeds, end_embeds], dim=1).view(batch, 2, cells, -1)
        ends = self.proj_in(keyframes) + self.keyframe_embeddings[:, None] + where  # (B, 2, N, H)
        x = torch.cat([frames.flatten(1, 2), ends.flatten(1, 2)], dim=1)  # (B, (L + 2) N, H)
        if self.text_proj is not None:
            memory = self.text_proj(text_embeds.to(x.dtype))  # (B, T, H)
            padding = None if text_mask is None else ~text_mask.bool()
            for layer in self.layers:
                x = layer(x, memory, memory_key_padding_mask=padding)
        else:
            for layer in self.layers:
                x = layer(x)
        correction = self.proj_out(self.norm_out(x[:, : num_frames * cells]))  # (B, L N, D)
        return path + correction.view(path.shape)

    def condition_tokens(self, frame_embeds: torch.Tensor) -> torch.Tensor:
        """(B, L, [N,] D) -> (B, L, N * tokens, cross_attention_dim): what each frame's cross-attention appends."""
        batch, frames = frame_embeds.shape[:2]
        tokens = self.to_condition(frame_embeds)  # (B, L, [N,] tokens * C)
        return tokens.view(batch, frames, -1, self.config.cross_attention_dim)

    def condition_map(self, frame_embeds: torch.Tensor) -> torch.Tensor | None:
        """(B, L, N, D) -> (B, map_channels, L, g, g): P_i laid out on its grid (None without `map_channels`)."""
        if self.to_map is None:
            return None
        batch, frames, cells, _ = frame_embeds.shape
        grid = self.grid_size
        cells_map = self.to_map(frame_embeds)  # (B, L, N, M)
        return cells_map.view(batch, frames, grid, grid, -1).permute(0, 4, 1, 2, 3)

    def _check(
        self,
        start: torch.Tensor,
        end: torch.Tensor,
        num_frames: int,
        text_embeds: torch.Tensor | None,
        needs_text: bool,
    ) -> None:
        dim, cells = self.config.embed_dim, self.config.num_tokens
        shape = (dim,) if cells == 1 else (cells, dim)
        if start.shape[1:] != shape or start.shape != end.shape:
            expected = "(B, " + ", ".join(map(str, shape)) + ")"
            raise ValueError(
                f"start_embeds {tuple(start.shape)} and end_embeds {tuple(end.shape)} must both be {expected}"
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
