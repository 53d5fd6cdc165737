"""Tiny world attribute classifier: the measuring instrument for identity consistency and prompt alignment.

A small CNN reads a 64x64 panel of the tiny world (`storydiffusion.world.render`) holding one figure and
predicts the figure's identity attributes (kind, hair colour, hair style, skin tone, shirt colour,
trousers colour, accessory) and the panel's pose and scene, one linear head each. It is trained on
rendered ground truth only (`scripts/train_attribute_classifier.py`, data drawn on the fly by
`render_batch`), and it scores generated panels:

- identity consistency: `agreement(predictions)`, the fraction of image pairs whose predicted
  identity attributes agree, averaged over `SCORED_IDENTITY_ATTRIBUTES`;
- prompt alignment: the accuracy of the predicted pose and scene against the prompted ones.

Only attributes whose held-out accuracy reached 0.97 are scored (`SCORED_ATTRIBUTES`); the measured
numbers ship next to the weights in `assets/world_classifier/eval.json`.

Images are RGB in [0, 1] (a float tensor (B, 3, 64, 64), or PIL images that `predict` converts);
the model maps them to [-1, 1] itself.

The shipped weights (`load_default_classifier`, 680k parameters, fp32, 2.7 MB) were trained with::

    python scripts/train_attribute_classifier.py --steps 3000 --batch-size 64 --threads 1
    python scripts/train_attribute_classifier.py --init FIRST_RUN --vae src/storydiffusion/assets/tiny/vae \
        --vae-share 0.5 --steps 700 --batch-size 32 --lr 5e-4 --warmup 50 --threads 1

on 192,000 rendered panels, then fine-tuned with half of each batch passed through the tiny VAE, because
generated panels look like VAE reconstructions (soft faces and hair edges). Its held-out accuracy, clean and
through the VAE, is in `assets/world_classifier/eval.json` and the docs' benchmarks page (measuring instrument).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.resources import as_file, files
from itertools import combinations
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from PIL import Image
from torch import nn

from storydiffusion.world.render import POSES, SCENES, VOCABULARIES, Panel, render_panel, sample_panel

IGNORE_INDEX = -100  # cross-entropy's ignore_index: the target is invisible (a hidden hair colour)

IDENTITY_ATTRIBUTES: tuple[str, ...] = tuple(VOCABULARIES)  # kind, hair_colour, ..., accessory
PROMPT_ATTRIBUTES: tuple[str, ...] = ("pose", "scene")
ATTRIBUTES: Mapping[str, tuple[str, ...]] = MappingProxyType({**VOCABULARIES, "pose": POSES, "scene": SCENES})

# Attributes whose accuracy on 2,000 held-out renders reached 0.97 (assets/world_classifier/eval.json);
# hair_style (0.880) and hair_colour (0.956) did not.
SCORED_ATTRIBUTES: tuple[str, ...] = (
    "kind",
    "skin_tone",
    "shirt_colour",
    "trousers_colour",
    "accessory",
    "pose",
    "scene",
)
SCORED_IDENTITY_ATTRIBUTES = tuple(a for a in SCORED_ATTRIBUTES if a in IDENTITY_ATTRIBUTES)
SCORED_PROMPT_ATTRIBUTES = tuple(a for a in SCORED_ATTRIBUTES if a in PROMPT_ATTRIBUTES)

DEFAULT_WEIGHTS = files("storydiffusion") / "assets" / "world_classifier"


def hair_colour_visible(hair_style: str, accessory: str) -> bool:
    """Whether a 64x64 render shows the hair colour: not on a bald head, nor for short hair under a hat.

    `Identity.visible_attributes` hides only a bald head's hair colour, but a hat's brim also covers
    all but a 0.2-head-radius fringe of short hair (under a pixel at 64x64): in 70% of such renders
    not one pixel changes with the hair colour, so it is a guess and is neither trained nor scored.
    """
    return hair_style != "bald" and not (hair_style == "short" and accessory == "hat")


def visible_truth(panel: Panel) -> dict[str, str]:
    """What a 64x64 render of a one-figure panel shows: identity (see `hair_colour_visible`), pose, scene."""
    if len(panel.figures) != 1:
        raise ValueError(f"a panel with exactly 1 figure is needed, got {len(panel.figures)}")
    figure = panel.figures[0]
    truth = {**figure.identity.attributes(), "pose": figure.pose, "scene": panel.scene.kind}
    if not hair_colour_visible(figure.identity.hair_style, figure.identity.accessory):
        del truth["hair_colour"]
    return truth


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class ConvBlock(nn.Module):
    """`layers` x (3x3 conv, BatchNorm, ReLU) at one resolution."""

    def __init__(self, in_channels: int, out_channels: int, layers: int) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        for i in range(layers):
            modules += [
                nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AttributeClassifier(ModelMixin, ConfigMixin):
    """A small CNN with one linear head per attribute; self-describing through its config.

    Args:
        attribute_names: the heads, in order. None: the names of `ATTRIBUTES`.
        attribute_vocabularies: each head's classes, in order. None: the vocabularies of `ATTRIBUTES`.
            (Two parallel lists rather than one mapping: config.json sorts mapping keys.)
        sample_size: the image side the model was trained on; `predict` resizes PIL images to it.
        block_channels: channels of each conv block; every block but the last is followed by a 2x2 max pool.
        layers_per_block: 3x3 convs per block.
        dropout: before the heads, in training only.
    """

    @register_to_config
    def __init__(
        self,
        attribute_names: Sequence[str] | None = None,
        attribute_vocabularies: Sequence[Sequence[str]] | None = None,
        sample_size: int = 64,
        block_channels: Sequence[int] = (24, 48, 96, 192),
        layers_per_block: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        names = tuple(ATTRIBUTES) if attribute_names is None else tuple(attribute_names)
        vocabularies = tuple(ATTRIBUTES.values()) if attribute_vocabularies is None else attribute_vocabularies
        if len(names) != len(vocabularies) or len(set(names)) != len(names):
            raise ValueError(
                f"attribute_names={names!r} must be distinct and match attribute_vocabularies one to one "
                f"(got {len(vocabularies)} vocabularies)"
            )
        for name, vocabulary in zip(names, vocabularies):
            if len(vocabulary) < 2 or len(set(vocabulary)) != len(vocabulary):
                raise ValueError(f"the vocabulary of {name!r}, {vocabulary!r}, must hold at least 2 distinct values")
        if not block_channels:
            raise ValueError(f"block_channels={block_channels!r} must name at least one block")
        self.vocabularies = {name: tuple(vocabulary) for name, vocabulary in zip(names, vocabularies)}
        channels = [3, *block_channels]
        self.blocks = nn.ModuleList(
            ConvBlock(channels[i], channels[i + 1], layers_per_block) for i in range(len(block_channels))
        )
        self.head_dropout = nn.Dropout(dropout)
        features = 2 * block_channels[-1]  # global average and max pooling, concatenated
        self.heads = nn.ModuleDict({name: nn.Linear(features, len(v)) for name, v in self.vocabularies.items()})

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every conv block's output, before its pooling: [(B, C_k, H_k, W_k)], for images (B, 3, H, W) in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB in [0, 1], got shape {tuple(images.shape)}")
        x = 2.0 * images.to(self.dtype) - 1.0  # (B, 3, H, W) in [-1, 1]
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            outputs.append(x)
            if i < len(self.blocks) - 1:
                x = F.max_pool2d(x, 2)  # 64 -> 32 -> 16 -> 8
        return outputs

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute, each (B, classes), for images (B, 3, H, W) in [0, 1]."""
        x = self.features(images)[-1]
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)  # (B, 2C)
        pooled = self.head_dropout(pooled)
        return {name: head(pooled) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor | Sequence[Image.Image]) -> list[dict[str, str]]:
        """The most likely value of every attribute, one dict per image.

        A dict leaves out "hair_colour" when the predicted hair style and accessory hide it (a bald
        head, short hair under a hat: `hair_colour_visible`), as `visible_truth` does. `images`: a
        float tensor (B, 3, H, W) in [0, 1] or PIL images (resized to `sample_size` if needed). Runs in
        eval mode, then restores the mode.
        """
        batch = images if isinstance(images, torch.Tensor) else pil_to_tensor(images, self.config.sample_size)
        was_training = self.training
        self.eval()
        try:
            logits = self(batch.to(self.device))
        finally:
            self.train(was_training)
        indices = {name: values.argmax(dim=1).tolist() for name, values in logits.items()}
        predictions = []
        for b in range(batch.shape[0]):
            prediction = {name: self.vocabularies[name][indices[name][b]] for name in self.vocabularies}
            if not hair_colour_visible(prediction.get("hair_style", ""), prediction.get("accessory", "")):
                prediction.pop("hair_colour", None)
            predictions.append(prediction)
        return predictions


def load_default_classifier(device: str | torch.device = "cpu") -> AttributeClassifier:
    """The classifier shipped in the package (`assets/world_classifier/`), in eval mode."""
    with as_file(DEFAULT_WEIGHTS) as path:
        model = AttributeClassifier.from_pretrained(str(path))
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Data: rendered panels and their targets
# ---------------------------------------------------------------------------------------------


def pil_to_tensor(images: Sequence[Image.Image], size: int = 64) -> torch.Tensor:
    """PIL images as a float tensor (B, 3, size, size) in [0, 1] (resized with LANCZOS if needed)."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.LANCZOS)
        arrays.append(np.asarray(image, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)  # (B, 3, size, size)


def panel_targets(panel: Panel, attributes: Mapping[str, Sequence[str]] = ATTRIBUTES) -> dict[str, int]:
    """Class indices of the panel's single figure and its scene; a hidden hair colour is `IGNORE_INDEX`.

    The hair colour is hidden on a bald head and under a hat on short hair (`hair_colour_visible`).
    """
    if len(panel.figures) != 1:
        raise ValueError(f"panel_targets needs a panel with exactly 1 figure, got {len(panel.figures)}")
    truth = visible_truth(panel)
    return {
        name: list(vocabulary).index(truth[name]) if name in truth else IGNORE_INDEX
        for name, vocabulary in attributes.items()
    }


def render_batch(
    rng: np.random.Generator, batch_size: int, size: int = 64
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[Panel]]:
    """`batch_size` random single-figure panels: images (B, 3, size, size) in [0, 1], targets (B,) each, panels.

    Panels come from `sample_panel(rng, num_figures=1)`: any identity, pose, scene, placement and scale.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    panels = [sample_panel(rng, num_figures=1) for _ in range(batch_size)]
    images = pil_to_tensor([render_panel(panel, size) for panel in panels], size)
    per_panel = [panel_targets(panel) for panel in panels]
    targets = {name: torch.tensor([t[name] for t in per_panel], dtype=torch.long) for name in ATTRIBUTES}
    return images, targets, panels


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def agreement(
    predictions: Sequence[Mapping[str, str]], attributes: Sequence[str] = SCORED_IDENTITY_ATTRIBUTES
) -> float:
    """Mean over `attributes` and over image pairs of [both images have the same predicted value].

    The identity-consistency score: 1.0 when every image shows the same character. A value missing
    from a prediction (a hidden hair colour) counts as a value of its own, so two bald heads agree
    on hair colour.
    """
    if len(predictions) < 2:
        raise ValueError(f"agreement needs at least 2 predictions, got {len(predictions)}")
    if not attributes:
        raise ValueError("attributes is empty: name at least one attribute to compare")
    pairs = list(combinations(predictions, 2))
    per_attribute = [sum(a.get(name) == b.get(name) for a, b in pairs) / len(pairs) for name in attributes]
    return sum(per_attribute) / len(per_attribute)


def accuracy(predictions: Sequence[Mapping[str, str]], panels: Sequence[Panel]) -> dict[str, float]:
    """Per-attribute accuracy of `predict`'s output against the panels' `visible_truth` (hair colour: when visible)."""
    if len(predictions) != len(panels):
        raise ValueError(f"got {len(predictions)} predictions for {len(panels)} panels; pass one per panel")
    hits: dict[str, list[bool]] = {name: [] for name in ATTRIBUTES}
    for prediction, panel in zip(predictions, panels):
        truth = visible_truth(panel)
        for name in ATTRIBUTES:
            if name in truth:
                hits[name].append(prediction.get(name) == truth[name])
    return {name: sum(h) / len(h) for name, h in hits.items() if h}
