"""Pieces shared by the tiny-world trainers (VAE, CLIP, UNet): images as tensors, batches rendered on
the fly, the tiny models' architectures and losses, and reconstruction metrics.

Images travel as float tensors in [-1, 1], channels first (the diffusers convention). Every random
draw comes from the `numpy.random.Generator` (rendering) or `torch.Generator` (posterior noise)
handed in.

Colour fidelity (`reconstruction_metrics` with panels): on single-figure panels, the pixels of a
part that show the figure's attribute colour — inside the part's box from `world.part_boxes`
(torso -> shirt, legs -> trousers or skirt, the head box widened -> hair) and within
`ATTRIBUTE_PIXEL_TOLERANCE` of the palette colour in the original render — are checked in the
reconstruction. A pixel keeps its colour when it lies within `COLOUR_TOLERANCE` (Euclidean RGB
distance in [0, 1] units) of the original: half the distance between the two closest palette
colours (blond and yellow, 0.20 apart), so a kept pixel is still nearer its own colour name than any
other. `colour_accuracy` asks the reader's question per region: does the mean reconstructed colour
of the region name the right attribute (nearest colour in that attribute's vocabulary)?
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from storydiffusion.csa.attention import (
    borrow_from_others,
    consistent_attention,
    gather_tokens,
    heads_first,
    num_sampled_tokens,
    sample_token_indices,
)
from storydiffusion.world import render as world

# The tiny VAE: downsampling factor 4 (two downsamples over three blocks), 4 latent channels, so a
# 64x64 panel is a 16x16 latent and a 2x2 grid strip (128x128) a 32x32 one. No attention in the mid
# block: the encoder stays local (a panel's latent does not depend on the other panels of its
# strip) and the model works at any canvas size. ~2.6 M parameters, ~5 MB in fp16.
TINY_VAE_CONFIG = MappingProxyType(
    {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (32, 64, 128),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 16,
        "sample_size": 64,
        "mid_block_add_attention": False,
    }
)

PANEL_SIZE = 64
# How many figures a training panel holds (0, 1, 2): mostly one, as in the UNet's strips.
FIGURE_COUNT_PROBABILITIES = (0.1, 0.7, 0.2)

ATTRIBUTE_PIXEL_TOLERANCE = 0.05  # an original pixel this close to the palette colour shows the attribute
COLOUR_TOLERANCE = 0.1  # a reconstructed pixel this close to the original keeps its colour (see module doc)
COLOUR_PARTS = ("hair", "shirt", "trousers")


def warmup_cosine(step: int, peak: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Learning rate at `step`: linear warm-up to `peak` over `warmup` steps, then cosine decay to
    `floor` x `peak` at `total` (the schedule of every tiny-world trainer)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A freshly initialised tiny VAE (`TINY_VAE_CONFIG`), weights drawn from `seed`."""
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE_CONFIG)


def panel_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) float32 tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_image(tensor: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [-1, 1] as an RGB image (values outside are clipped)."""
    array = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def render_tensors(panels: Sequence[world.Panel], size: int = PANEL_SIZE) -> torch.Tensor:
    """The panels' renders as one (B, 3, size, size) tensor in [-1, 1]."""
    return torch.stack([panel_tensor(world.render_panel(panel, size)) for panel in panels])


def sample_training_panel(rng: np.random.Generator) -> world.Panel:
    """A random panel with 0, 1 or 2 figures (`FIGURE_COUNT_PROBABILITIES`)."""
    return world.sample_panel(rng, num_figures=int(rng.choice(3, p=FIGURE_COUNT_PROBABILITIES)))


def _strip_crop(rng: np.random.Generator, size: int) -> Image.Image:
    """A size x size window of a random row (2-4 panels) or 2x2 grid strip, so seams are seen."""
    strip, _ = world.sample_strip(rng, layout="grid" if rng.random() < 0.5 else "row", size=size)
    left, top = int(rng.integers(0, strip.width - size + 1)), int(rng.integers(0, strip.height - size + 1))
    return strip.crop((left, top, left + size, top + size))


def render_vae_batch(
    rng: np.random.Generator, batch_size: int, kind: str = "mixed", size: int = PANEL_SIZE
) -> torch.Tensor:
    """A batch of fresh renders in [-1, 1].

    kind "panel": (B, 3, size, size) panels with 0-2 figures; "strip": (B, 3, 2*size, 2*size) 2x2
    grid strips of one character; "mixed": (B, 3, size, size), each a panel or, half the time, a
    size x size window of a row or grid strip (crossing panel borders).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if kind == "panel":
        images = [world.render_panel(sample_training_panel(rng), size) for _ in range(batch_size)]
    elif kind == "strip":
        images = [world.sample_strip(rng, layout="grid", size=size)[0] for _ in range(batch_size)]
    elif kind == "mixed":
        images = [
            _strip_crop(rng, size) if rng.random() < 0.5 else world.render_panel(sample_training_panel(rng), size)
            for _ in range(batch_size)
        ]
    else:
        raise ValueError(f"kind={kind!r} is not one of ('panel', 'strip', 'mixed')")
    return torch.stack([panel_tensor(image) for image in images])


def detail_mask(images: torch.Tensor, threshold: float = 0.1, radius: int = 2) -> torch.Tensor:
    """(B, 1, H, W) 1.0 within `radius` px of an edge (summed |dx| + |dy| over RGB above `threshold`), else 0.

    Figures, faces and props are where the edges are; flat sky and ground are not.
    """
    gradient = F.pad(images.diff(dim=-1).abs(), (0, 1)) + F.pad(images.diff(dim=-2).abs(), (0, 0, 0, 1))
    edges = (gradient.sum(1, keepdim=True) > threshold).float()  # (B, 1, H, W)
    return F.max_pool2d(edges, 2 * radius + 1, stride=1, padding=radius)


def vae_loss(
    vae: AutoencoderKL,
    images: torch.Tensor,
    kl_weight: float = 1e-4,
    edge_weight: float = 0.25,
    detail_weight: float = 4.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Detail-weighted L1 + `edge_weight` x L1 of the image gradients + `kl_weight` x KL per latent element.

    The L1 weighs pixels near edges (`detail_mask`) 1 + `detail_weight` times as much as flat ones, so
    the small figure is not drowned by the background; the edge term (finite differences along x and
    y) keeps 1-2 px details sharp (eyes, glasses, hair fringes). Returns the loss and its parts.
    """
    posterior = vae.encode(images).latent_dist
    latents = posterior.sample(generator=generator)  # (B, 4, H/4, W/4)
    recon = vae.decode(latents).sample  # (B, 3, H, W)
    error = (recon - images).abs()  # (B, 3, H, W)
    weight = 1.0 + detail_weight * detail_mask(images)  # (B, 1, H, W)
    rec = (weight * error).mean() / weight.mean()
    edge = F.l1_loss(recon.diff(dim=-1), images.diff(dim=-1)) + F.l1_loss(recon.diff(dim=-2), images.diff(dim=-2))
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    loss = rec + edge_weight * edge + kl_weight * kl
    parts = {"loss": loss.item(), "rec": rec.item(), "l1": error.mean().item(), "edge": edge.item(), "kl": kl.item()}
    return loss, parts


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Encode (posterior mode) and decode, in the VAE's dtype; returns float32 clamped to [-1, 1]."""
    param = next(vae.parameters())
    latents = vae.encode(images.to(param.device, param.dtype)).latent_dist.mode()
    return vae.decode(latents).sample.float().clamp(-1, 1).cpu()


def psnr(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for tensors in [-1, 1] (peak = the [0, 1] range)."""
    mse = ((recon.float() - images.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _box_slice(box: world.Box, height: int, width: int) -> tuple[slice, slice]:
    left, top, right, bottom = box
    rows = slice(max(0, int(np.floor(top))), min(height, int(np.ceil(bottom))))
    cols = slice(max(0, int(np.floor(left))), min(width, int(np.ceil(right))))
    return rows, cols


def _hair_box(head: world.Box) -> world.Box:
    """The head box widened to where hair reaches (fringe above, long hair and ponytail beside and below)."""
    left, top, right, bottom = head
    w = right - left
    return (left - 0.25 * w, top - 0.3 * w, right + 0.25 * w, bottom + 0.4 * w)


def colour_regions(panel: world.Panel, image: np.ndarray) -> dict[str, tuple[np.ndarray, str]]:
    """For a one-figure panel and its render (H, W, 3) in [0, 1]: part -> (pixel mask, attribute colour name).

    A part is left out when the figure does not show it (a bald head) or no pixel of it shows the colour.
    """
    if len(panel.figures) != 1:
        raise ValueError(f"colour regions need a panel with exactly 1 figure, got {len(panel.figures)}")
    figure = panel.figures[0]
    identity = figure.identity
    height, width = image.shape[:2]
    boxes = world.part_boxes(figure, height)
    wanted = {"shirt": (boxes["torso"], identity.shirt_colour), "trousers": (boxes["legs"], identity.trousers_colour)}
    if identity.hair_style != "bald":
        wanted["hair"] = (_hair_box(boxes["head"]), identity.hair_colour)
    regions = {}
    for part, (box, colour) in wanted.items():
        rows, cols = _box_slice(box, height, width)
        target = np.asarray(world.COLOURS[colour], dtype=np.float32) / 255
        mask = np.zeros((height, width), dtype=bool)
        mask[rows, cols] = np.linalg.norm(image[rows, cols] - target, axis=-1) <= ATTRIBUTE_PIXEL_TOLERANCE
        if mask.any():
            regions[part] = (mask, colour)
    return regions


_PART_VOCABULARIES = MappingProxyType(
    {"hair": world.HAIR_COLOURS, "shirt": world.SHIRT_COLOURS, "trousers": world.TROUSERS_COLOURS}
)


def _nearest_colour(rgb: np.ndarray, names: Sequence[str]) -> str:
    palette = np.asarray([world.COLOURS[name] for name in names], dtype=np.float32) / 255
    return names[int(np.linalg.norm(palette - rgb, axis=-1).argmin())]


def reconstruction_metrics(
    vae: AutoencoderKL, images: torch.Tensor, panels: Sequence[world.Panel] | None = None
) -> dict[str, float]:
    """PSNR (dB, mean over images), mean absolute error ([0, 1] units) and, given the images' panels
    (one figure each), colour fidelity per part and overall, and colour accuracy (see module doc).
    """
    if panels is not None and len(panels) != len(images):
        raise ValueError(f"got {len(panels)} panels for {len(images)} images; pass one panel per image")
    recon = reconstruct(vae, images)
    metrics = {"psnr": psnr(recon, images).mean().item(), "mae": ((recon - images).abs() / 2).mean().item()}
    if panels is None:
        return metrics
    originals = ((images.float() + 1) / 2).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3) in [0, 1]
    recons = ((recon + 1) / 2).permute(0, 2, 3, 1).numpy()
    kept = dict.fromkeys(COLOUR_PARTS, 0)
    total = dict.fromkeys(COLOUR_PARTS, 0)
    named, regions_seen = 0, 0
    for panel, original, reconstruction in zip(panels, originals, recons):
        for part, (mask, colour) in colour_regions(panel, original).items():
            distance = np.linalg.norm(reconstruction[mask] - original[mask], axis=-1)  # (pixels,)
            kept[part] += int((distance <= COLOUR_TOLERANCE).sum())
            total[part] += int(mask.sum())
            named += _nearest_colour(reconstruction[mask].mean(0), _PART_VOCABULARIES[part]) == colour
            regions_seen += 1
    for part in COLOUR_PARTS:
        metrics[f"{part}_fidelity"] = kept[part] / max(1, total[part])
    metrics["colour_fidelity"] = sum(kept.values()) / max(1, sum(total.values()))
    metrics["colour_accuracy"] = named / max(1, regions_seen)
    return metrics


def held_out_panels(seed: int, count: int, size: int = PANEL_SIZE) -> tuple[torch.Tensor, list[world.Panel]]:
    """`count` one-figure panels from their own seed (never drawn in training) and their (B, 3, size, size) renders."""
    rng = np.random.default_rng(seed)
    panels = [world.sample_panel(rng, num_figures=1) for _ in range(count)]
    return render_tensors(panels, size), panels


# ---------------------------------------------------------------------------------------------
# Tiny CLIP
# ---------------------------------------------------------------------------------------------

# Text tower: the real CLIP BPE vocabulary (49,408 tokens) at width 64, so its embedding table stays
# ~6 MB in fp16 (it ships twice: in the CLIP folder and as the diffusion pipeline's text encoder).
# Vision tower: a ViT with 8x8 patches on 64x64 panels (64 tokens + class token).
TINY_CLIP_TEXT_CONFIG = MappingProxyType(
    {
        "vocab_size": 49408,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
)
TINY_CLIP_VISION_CONFIG = MappingProxyType(
    {
        "image_size": PANEL_SIZE,
        "patch_size": 8,
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
    }
)
TINY_CLIP_PROJECTION_DIM = 64
# CLIPModel pixel normalisation: the world's mean/std are close enough to these round values.
CLIP_IMAGE_MEAN = (0.5, 0.5, 0.5)
CLIP_IMAGE_STD = (0.25, 0.25, 0.25)
# Panels a CLIP batch holds: mostly one figure, some scenes alone and some pairs, as in stories.
CLIP_FIGURE_COUNT_PROBABILITIES = (0.1, 0.75, 0.15)


def tiny_clip(seed: int = 0) -> CLIPModel:
    """A freshly initialised tiny CLIP (text + vision towers above), weights drawn from `seed`."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=CLIPTextConfig(**TINY_CLIP_TEXT_CONFIG).to_dict(),
        vision_config=CLIPVisionConfig(**TINY_CLIP_VISION_CONFIG).to_dict(),
        projection_dim=TINY_CLIP_PROJECTION_DIM,
    )
    return CLIPModel(config)


def clip_image_processor() -> CLIPImageProcessor:
    """The image processor saved with the tiny CLIP: 64x64 panels, the normalisation above."""
    return CLIPImageProcessor(
        size={"shortest_edge": PANEL_SIZE},
        crop_size={"height": PANEL_SIZE, "width": PANEL_SIZE},
        image_mean=list(CLIP_IMAGE_MEAN),
        image_std=list(CLIP_IMAGE_STD),
        do_convert_rgb=True,
    )


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, 64, 64) as the tiny CLIP's pixel_values (what `clip_image_processor` makes)."""
    mean = torch.tensor(CLIP_IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_IMAGE_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean.to(images)) / std.to(images)


def render_clip_batch(rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, list[str]]:
    """`batch_size` fresh panels (0-2 figures) in [-1, 1] (B, 3, 64, 64) and their captions."""
    panels = [
        world.sample_panel(rng, num_figures=int(rng.choice(3, p=CLIP_FIGURE_COUNT_PROBABILITIES)))
        for _ in range(batch_size)
    ]
    images = render_tensors(panels)
    return images, [panel.caption for panel in panels]


def clip_loss(clip: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor):
    """Symmetric InfoNCE over the batch. Captions that say the same words are not negatives of each other:
    targets spread over every caption identical to the true one (the world's captions repeat often)."""
    output = clip(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    logits = output.logits_per_text  # (B, B)
    same = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1).float()  # (B, B) identical captions
    targets = same / same.sum(1, keepdim=True)
    loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T))
    accuracy = (logits.argmax(1) == torch.arange(len(logits))).float().mean().item()
    return loss, {"loss": loss.item(), "acc": accuracy, "scale": clip.logit_scale.exp().item()}


# ---------------------------------------------------------------------------------------------
# UNet data: groups of panels of one character, as VAE latents
# ---------------------------------------------------------------------------------------------

GROUP_SIZE = 4  # panels of one character per group (distinct poses and scenes); a step uses 1-4 of them
# Latent token grids the part labels are pooled to: the tiny UNet's 16x16 and 8x8 attention levels.
PART_GRIDS = (16, 8)
PART_MAP_SIZE = 256  # part maps are drawn at the renderer's supersampled size, then pooled per token
IDENTITY_FREE = 1.0  # omit_probability that leaves every identity attribute out of a caption


def sample_group(rng: np.random.Generator, size: int = GROUP_SIZE, omit_probability: float = 0.5) -> list[world.Panel]:
    """`size` single-figure panels of one random character, each with its own pose, scene and caption
    (each caption leaves out attributes independently with `omit_probability`; `IDENTITY_FREE` says
    only the kind, pose and scene)."""
    identity = world.Identity.random(rng)
    poses = rng.choice(world.POSES, size=size, replace=False)
    scenes = rng.choice(world.SCENES, size=size, replace=False)
    return [
        world.sample_panel(rng, identity, 1, omit_probability, pose=str(p), scene=str(s)) for p, s in zip(poses, scenes)
    ]


def sample_extra_panel(rng: np.random.Generator, omit_probability: float = 0.5) -> world.Panel:
    """A panel groups never show: a scene alone (a third of the time) or two characters."""
    return world.sample_panel(rng, num_figures=0 if rng.random() < 1 / 3 else 2, omit_probability=omit_probability)


def token_part_labels(part_map: np.ndarray, grid: int, min_share: float = 0.3) -> np.ndarray:
    """(grid, grid) int8 label per latent token: the figure part (`world.FIGURE_PARTS` index) covering the
    most of the token's pixels when it covers at least `min_share` of them, else -1 (background, edges)."""
    size = part_map.shape[0]
    if size % grid:
        raise ValueError(f"a {size}x{size} part map does not split into a {grid}x{grid} grid")
    cell = size // grid
    blocks = part_map.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid, grid, cell * cell)
    counts = np.stack([(blocks == i).sum(-1) for i in range(1, len(world.FIGURE_PARTS))], -1)  # (g, g, parts)
    best, share = counts.argmax(-1) + 1, counts.max(-1) / (cell * cell)
    return np.where(share >= min_share, best, -1).astype(np.int8)


def panel_part_labels(panels: Sequence[world.Panel], grid: int) -> torch.Tensor:
    """(B, grid, grid) int8 token part labels of the panels' figures (`token_part_labels`)."""
    maps = [token_part_labels(world.render_part_map(p, PART_MAP_SIZE), grid) for p in panels]
    return torch.from_numpy(np.stack(maps))


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, panels: Sequence[world.Panel], batch_size: int = 64) -> torch.Tensor:
    """Posterior means of the panels' renders, times the VAE's scaling factor: (B, 4, 16, 16) float16."""
    out = []
    for start in range(0, len(panels), batch_size):
        images = render_tensors(panels[start : start + batch_size])
        out.append(vae.encode(images).latent_dist.mode() * vae.config.scaling_factor)
    return torch.cat(out).half()


def latent_shard(
    rng: np.random.Generator, vae: AutoencoderKL, groups: int, extras: int, omit_probability: float = 0.5
) -> dict:
    """One shard of UNet training data: `groups` groups (G, 4, 4, 16, 16) with captions (G, 4), and
    `extras` panels (E, 4, 16, 16) with captions (scenes alone and pairs of characters); the figures'
    token part labels per grid of `PART_GRIDS` (`parts_16`: (G, 4, 16, 16) and (E, 16, 16), ...)."""
    group_panels = [sample_group(rng, omit_probability=omit_probability) for _ in range(groups)]
    extra_panels = [sample_extra_panel(rng, omit_probability) for _ in range(extras)]
    flat = [p for group in group_panels for p in group]
    latents = encode_latents(vae, flat + extra_panels)
    shard = {
        "group_latents": latents[: len(flat)].view(groups, GROUP_SIZE, *latents.shape[1:]),
        "group_captions": [[p.caption for p in group] for group in group_panels],
        "extra_latents": latents[len(flat) :],
        "extra_captions": [p.caption for p in extra_panels],
        "omit_probability": omit_probability,
    }
    for grid in PART_GRIDS:
        labels = panel_part_labels(flat + extra_panels, grid)
        shard[f"group_parts_{grid}"] = labels[: len(flat)].view(groups, GROUP_SIZE, grid, grid)
        shard[f"extra_parts_{grid}"] = labels[len(flat) :]
    return shard


# ---------------------------------------------------------------------------------------------
# Tiny UNet
# ---------------------------------------------------------------------------------------------

# A 16x16 latent (one 64x64 panel). Self- and cross-attention in the decoder at 16x16 and 8x8, the
# encoder at 8x8 and the 4x4 mid block (the encoder's 16x16 block is plain convolutions: it is the
# costliest place for attention and CSA's default layers are the decoder's). Convolutions never cross
# from one panel to another: in training, panels of one character are separate images whose
# self-attention layers see each other's tokens (`JointPanelAttnProcessor`), so the only way to keep
# a character across panels is content-based self-attention -- the mechanism CSA lends at inference.
TINY_UNET_CONFIG = MappingProxyType(
    {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (64, 128, 128),
        "layers_per_block": 1,
        "cross_attention_dim": TINY_CLIP_TEXT_CONFIG["hidden_size"],
        "attention_head_dim": (2, 4, 4),  # diffusers' legacy name: the number of heads (head width 32)
        "norm_num_groups": 16,
    }
)
# Cosine noise schedule (a 16x16 latent needs more noise than SD's schedule for 64x64 latents) with
# v-prediction; the pipeline samples with DPM-Solver++ (2nd order) from the last timestep.
TINY_NOISE_SCHEDULE = MappingProxyType(
    {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}
)


# The copying design's option: self- and cross-attention in the encoder's 16x16 block too, so a colour copied
# from a source panel at full resolution does not have to survive the decoder alone.
ENCODER_ATTENTION_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")


def tiny_unet(seed: int = 0, encoder_attention: bool = False) -> UNet2DConditionModel:
    """A freshly initialised tiny UNet (`TINY_UNET_CONFIG`, with `encoder_attention` the 16x16 encoder block
    attends too), weights drawn from `seed`."""
    torch.manual_seed(seed)
    config = dict(TINY_UNET_CONFIG)
    if encoder_attention:
        config["down_block_types"] = ENCODER_ATTENTION_BLOCKS
    return UNet2DConditionModel(**config)


def load_grown(unet: UNet2DConditionModel, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Load `state` (from a smaller UNet of the same family) into `unet`; the modules it lacks start as
    identities (the new attention blocks' output projections zeroed, so the residual passes through).
    Returns the names of the new parameters."""
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"the saved weights hold parameters this UNet lacks: {unexpected[:5]} ...")
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if name in missing and ".proj_out." in name:
                parameter.zero_()
    return list(missing)


class JointPanelAttnProcessor:
    """Training-time self-attention over the panels of a group: every panel's keys and values are its
    own tokens plus a random share (`rate`) of every other panel's tokens of its group -- CSA's own
    math (`attention.consistent_attention`), with the batch laid out group-major, (G * P, N, C).

    `panels` = P (1 turns it into plain self-attention), `rate` and `generator` are set per step.
    With `part_labels` set ({tokens per panel: (G * P, N) labels, -1 for none}) a layer of that size
    computes its attention explicitly and appends to `part_losses` how far each labelled query's
    head-mean attention over the other panels' tokens strays from tokens of the same figure part
    (`part_matching_loss`): the supervision that teaches the group's panels to find each other.
    """

    def __init__(self, original) -> None:
        self.original = original
        self.panels = 1
        self.rate = 1.0
        self.copy = False
        self.strength = 1.0  # copy groups: the source's tokens weighted this much in the readers' softmax
        self.generator: torch.Generator | None = None
        self.part_labels: dict[int, torch.Tensor] | None = None
        self.part_losses: list[torch.Tensor] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.panels < 2 or encoder_hidden_states is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        num_tokens = hidden_states.shape[1]
        num_samples = max(1, num_sampled_tokens(num_tokens, self.rate))
        labels = self.part_labels.get(num_tokens) if self.part_labels else None
        if self.copy:
            indices = sample_token_indices(1, num_tokens, num_samples, self.generator).to(hidden_states.device)
            out, loss = copy_attention(attn, hidden_states, self.panels, indices[0], labels, self.strength)
            if loss is not None:
                self.part_losses.append(loss)
            return out
        indices = sample_token_indices(self.panels, num_tokens, num_samples, self.generator)  # (P, k)
        indices = indices.to(hidden_states.device)
        if labels is None:
            return consistent_attention(attn, hidden_states, indices, None)
        out, loss = attention_with_part_loss(attn, hidden_states, indices, labels)
        if loss is not None:
            self.part_losses.append(loss)
        return out


def as_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(G * P, ...) -> (G, P, ...): each training group's panels together, so the CSA core's gather and borrow
    work within a group as they work within a guidance half in a pipeline."""
    return x.unflatten(0, (groups, -1))


def from_groups(x: torch.Tensor) -> torch.Tensor:
    """(G, P, ...) -> (G * P, ...)."""
    return x.flatten(0, 1)


def attention_with_part_loss(
    attn, tokens: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`consistent_attention` in mutual mode with the probabilities made explicit, and `part_matching_loss`
    over them. tokens (G * P, N, C), indices (P, k), labels (G * P, N); returns (out, loss or None)."""
    panels = indices.shape[0]
    groups = tokens.shape[0] // panels
    query, key, value = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
    key_ext, value_ext = (
        borrow_from_others(gather_tokens(as_groups(t, groups), indices)) for t in (key, value)
    )  # (G, P, E, C)
    label_ext = borrow_from_others(gather_tokens(as_groups(labels, groups)[..., None], indices))[..., 0]
    key = from_groups(torch.cat([as_groups(key, groups), key_ext], dim=2))  # (G*P, N + E, C)
    value = from_groups(torch.cat([as_groups(value, groups), value_ext], dim=2))
    heads = attn.heads
    q, k, v = heads_first(query, heads), heads_first(key, heads), heads_first(value, heads)  # (G*P, h, T, d)
    probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (G*P, h, N, N + E)
    out = (probs @ v).transpose(1, 2).flatten(2)  # (G*P, N, h*d)
    out = attn.to_out[1](attn.to_out[0](out))
    borrowed = probs[..., tokens.shape[1] :].mean(1)  # (G*P, N, E) head mean over the other panels' tokens
    loss = part_matching_loss(borrowed, labels, from_groups(label_ext))
    return out, loss


def copy_attention(
    attn,
    tokens: torch.Tensor,
    panels: int,
    indices: torch.Tensor,
    labels: torch.Tensor | None = None,
    strength: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Self-attention in which each group's first panel is a *source* the others copy from: tokens
    (G * P, N, C), group-major; indices (k,) the source tokens lent. The source attends to itself only (plain
    self-attention, as a picture's tokens are recorded alone); every other panel attends to its own tokens plus
    the source's tokens at `indices` (never to its siblings: at use each frame reads a bank, not the others).

    `strength` weights the source's tokens in the readers' softmax (a log-strength logit bias), as a pipeline
    reads a bank with `CSAConfig.reference_strength`: training at the strength the model is read at.

    With `labels` (G * P, N) part labels the probabilities are explicit and the part-matching loss of the
    readers' attention over the source tokens is returned too (`part_matching_loss`); else (out, None).
    """
    batch, num_tokens, _ = tokens.shape
    groups = batch // panels
    query, key, value = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)

    def with_source(t: torch.Tensor) -> torch.Tensor:  # (G*P, N, C) -> (G*P, N + k, C)
        grouped = t.view(groups, panels, num_tokens, -1)
        lent = grouped[:, :1, indices].expand(-1, panels, -1, -1)  # (G, P, k, C)
        return torch.cat([grouped, lent], dim=2).flatten(0, 1)

    key, value = with_source(key), with_source(value)
    reader = torch.ones(groups, panels, dtype=torch.bool, device=tokens.device)
    reader[:, 0] = False
    visible = torch.ones(batch, 1, 1, num_tokens + len(indices), dtype=torch.bool, device=tokens.device)
    visible[:, 0, 0, num_tokens:] = reader.flatten()[:, None]  # a source never sees its own lent copy
    bias = torch.zeros(visible.shape, dtype=query.dtype, device=tokens.device)
    bias[..., num_tokens:] = math.log(strength)
    bias = bias.masked_fill(~visible, float("-inf"))
    heads = attn.heads
    q, k, v = heads_first(query, heads), heads_first(key, heads), heads_first(value, heads)
    if labels is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
        loss = None
    else:
        logits = q @ k.transpose(-1, -2) * attn.scale + bias
        probs = logits.softmax(-1)  # (G*P, h, N, N + k)
        out = probs @ v
        readers = reader.flatten()
        source_labels = labels.view(groups, panels, num_tokens)[:, :1, indices].expand(-1, panels, -1).flatten(0, 1)
        borrowed = probs[readers][..., num_tokens:].mean(1)  # (readers, N, k) head mean over the source's tokens
        loss = part_matching_loss(borrowed, labels[readers], source_labels[readers])
    out = out.transpose(1, 2).flatten(2)
    return attn.to_out[1](attn.to_out[0](out)), loss


def part_matching_loss(
    borrowed: torch.Tensor, query_labels: torch.Tensor, key_labels: torch.Tensor
) -> torch.Tensor | None:
    """Mean over labelled queries of -log(share of their attention over borrowed keys that lands on keys of
    the same part). borrowed (B, N, E) attention weights, query_labels (B, N), key_labels (B, E); queries
    whose part no borrowed key shows are skipped; None when no query counts."""
    same = (query_labels[:, :, None] == key_labels[:, None, :]) & (query_labels >= 0)[:, :, None]  # (B, N, E)
    counted = same.any(-1)  # (B, N)
    if not counted.any():
        return None
    share = (borrowed * same).sum(-1) / borrowed.sum(-1).clamp_min(1e-12)  # (B, N)
    return -share[counted].clamp_min(1e-6).log().mean()


def install_joint_attention(unet: UNet2DConditionModel) -> list[JointPanelAttnProcessor]:
    """Put a `JointPanelAttnProcessor` on every self-attention layer (attn1); returns them."""
    processors = {}
    joint = []
    for name, processor in unet.attn_processors.items():
        if name.endswith("attn1.processor"):
            processor = JointPanelAttnProcessor(processor)
            joint.append(processor)
        processors[name] = processor
    unet.set_attn_processor(processors)
    return joint


def clean_from_velocity(
    scheduler, noisy: torch.Tensor, velocity: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The clean latents a v-prediction implies: x0 = sqrt(a) x_t - sqrt(1 - a) v."""
    alphas = scheduler.alphas_cumprod.to(noisy.device)[timesteps].view(-1, 1, 1, 1)
    return alphas.sqrt() * noisy - (1 - alphas).sqrt() * velocity


def part_mean_loss(predicted: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Squared error of each figure part's mean latent (predicted vs true clean latents), averaged over the
    parts each panel shows. predicted, clean (B, C, H, W); labels (B, H*W) part per token, -1 none.

    A part's mean colour is what identity consistency is about, and at high noise a panel can only predict it
    from the other panels of its group: the per-token loss buries that signal under unpredictable detail."""
    num_parts = len(world.FIGURE_PARTS)
    onehot = F.one_hot(labels.clamp_min(0), num_parts).float() * (labels >= 0).float()[..., None]  # (B, N, P)
    counts = onehot.sum(1)  # (B, P)
    flat_pred, flat_clean = predicted.flatten(2), clean.flatten(2)  # (B, C, N)
    mean_pred = flat_pred @ onehot / counts.clamp_min(1)[:, None]  # (B, C, P)
    mean_clean = flat_clean @ onehot / counts.clamp_min(1)[:, None]
    present = (counts > 0).float()  # (B, P)
    error = (mean_pred - mean_clean).pow(2).mean(1)  # (B, P)
    return (error * present).sum() / present.sum().clamp_min(1)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights for v-prediction: min(SNR, gamma) / (SNR + 1)."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    return snr.clamp(max=gamma) / (snr + 1)
