"""Subject masks inferred while generating: where each character's description tokens are looked at.

During the first steps of a frame that names several characters, a `SubjectMapRecorder` on every
cross-attention layer (`attn2`) adds, for each character, the head-mean attention of every image token
to that character's description tokens (the conditional guidance half only). `SubjectMaps` averages
these soft maps over layers (resized to the finest grid) and steps, and turns them into one boolean
mask per character (`csa.masks.mask_from_map`: normalised, Otsu threshold, dilated; overlaps go to the
stronger map). The controller refreshes the masks at every step until `CSAConfig.mask_until`, then
keeps them; until the first maps exist the frame reads no bank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from storydiffusion.csa.attention import ControlledWrappingProcessor, heads_first
from storydiffusion.csa.masks import exclusive, grid_shape, mask_from_map

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention


class SubjectMaps:
    """Soft subject maps of one call's images, summed over layers and steps: (image, character) -> map."""

    def __init__(self, subject_tokens: Sequence[Mapping[str, Sequence[int]]], frame_shape: tuple[int, int]) -> None:
        self.subject_tokens = [dict(tokens) for tokens in subject_tokens]  # per image: name -> token positions
        self.frame_shape = frame_shape
        self.sums: list[dict[str, torch.Tensor]] = [{} for _ in subject_tokens]  # at the finest grid so far
        self.grid: tuple[int, int] | None = None

    def add(self, probabilities: torch.Tensor) -> None:
        """(B, N, T) head-mean cross-attention probabilities of the call's conditional half."""
        size = grid_shape(probabilities.shape[1], self.frame_shape)
        if self.grid is None or size[0] > self.grid[0]:  # a finer grid: bring what was summed up to it
            for image in self.sums:
                for name, total in image.items():
                    image[name] = F.interpolate(total[None, None], size=size, mode="bilinear")[0, 0]
            self.grid = size
        for image, (tokens, probs) in enumerate(zip(self.subject_tokens, probabilities.float())):
            for name, positions in tokens.items():
                soft = probs[:, list(positions)].sum(-1).view(size).cpu()  # (h, w)
                if size != self.grid:
                    soft = F.interpolate(soft[None, None], size=self.grid, mode="bilinear")[0, 0]
                self.sums[image][name] = self.sums[image].get(name, 0) + soft

    def masks(self, dilation: int = 1) -> list[dict[str, torch.Tensor]]:
        """Per image, character -> boolean mask at the finest grid seen (empty until a map was recorded)."""
        out = []
        for image in self.sums:
            raw = {name: mask_from_map(soft, dilation) for name, soft in image.items()}
            out.append(exclusive(raw, image) if raw else {})
        return out


class SubjectMapRecorder(ControlledWrappingProcessor):
    """Cross-attention that also hands its attention to the subject tokens to the controller's maps."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        maps = self.controller.recording_maps()
        if maps is not None and encoder_hidden_states is not None and hidden_states.ndim == 3:
            text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
            maps.add(self.cond_probabilities(attn, hidden_states, text))
        return self.call_original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    def cond_probabilities(self, attn: Attention, hidden_states: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, N, T) head-mean attention probabilities of the conditional half's images over the text tokens."""
        images = self.controller.images_per_call
        hidden, text = hidden_states[-images:], text[-images:]  # diffusers stacks [uncond; cond]
        with torch.no_grad():
            query, key = heads_first(attn.to_q(hidden), attn.heads), heads_first(attn.to_k(text), attn.heads)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            return (query @ key.transpose(-1, -2) * attn.scale).softmax(-1).mean(1)  # (B, N, T)
