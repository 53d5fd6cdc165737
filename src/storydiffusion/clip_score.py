"""CLIP-I and CLIP-T: image-image and image-text agreement measured with any `transformers.CLIPModel`.

CLIP-I of a set of images is the mean cosine similarity of their image embeddings over all pairs
(identity consistency); CLIP-T of (image, prompt) pairs is the mean cosine similarity of each image's
embedding with its prompt's (prompt following). The model is a hub id or a folder holding a
`CLIPModel` and its processor (`openai/clip-vit-large-patch14` on a GPU machine; the tiny world's
own CLIP, `world.models.TINY_CLIP_DIR`, offline).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import torch
from PIL import Image

from storydiffusion.errors import StoryDiffusionError
from storydiffusion.pipelines.loading import dtype_kwargs


class ClipScorer:
    """Embeds images and texts with one CLIP model and scores them (CLIP-I, CLIP-T)."""

    def __init__(self, model: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        path = str(model)  # the tiny world's CLIP: storydiffusion.world.models.resolve_clip("tiny")
        try:
            self.model = CLIPModel.from_pretrained(path, **dtype_kwargs(torch.float32, "transformers"))
            self.model = self.model.to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise StoryDiffusionError(
                f"cannot load CLIP model {model!r}: {str(error).splitlines()[0]}; give a CLIPModel hub id or folder"
            ) from error
        if len(self.processor.tokenizer) < 2:
            raise StoryDiffusionError(f"CLIP model {model!r}: its tokenizer loaded empty (offline without files?)")
        self.device = torch.device(device)
        self.name = str(model)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, D) unit-norm image embeddings."""
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        features = self.model.get_image_features(pixel_values=inputs.pixel_values.to(self.device))
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, D) unit-norm text embeddings. CLIP reads at most its window (77 tokens); longer texts are
        cut there, as every CLIP-T in the literature does."""
        inputs = self.processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        features = self.model.get_text_features(
            input_ids=inputs.input_ids.to(self.device), attention_mask=inputs.attention_mask.to(self.device)
        )
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    def clip_i(self, images: Sequence[Image.Image]) -> float:
        """Mean pairwise cosine similarity of the images' embeddings (needs at least 2 images)."""
        if len(images) < 2:
            raise StoryDiffusionError(f"CLIP-I compares images pairwise; got {len(images)} image(s)")
        embeddings = self.image_embeddings(images)
        pairs = list(combinations(range(len(images)), 2))
        return sum(float(embeddings[i] @ embeddings[j]) for i, j in pairs) / len(pairs)

    def clip_t(self, images: Sequence[Image.Image], texts: Sequence[str]) -> float:
        """Mean cosine similarity of each image with its text."""
        if len(images) != len(texts) or not images:
            raise StoryDiffusionError(f"CLIP-T needs one text per image; got {len(images)} images, {len(texts)} texts")
        return float((self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1).mean())
