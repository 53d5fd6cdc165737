"""The tiny world in motion: clips with ground-truth trajectories, the instrument that measures them,
and the tiny transition model assembled from the tiny image model.

A clip is one character doing one thing through one scene — walking or running across, jumping,
waving — drawn by `world.animate`, so every frame's placement and gait phase is known. The
instrument finds the character in a frame by what differs from the empty scene (the scene is known
in a held-out clip), which reads generated frames and rendered ground truth alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from storydiffusion.pipelines.loading import dtype_kwargs
from storydiffusion.world import render as world
from storydiffusion.world.models import TINY_CLIP_DIR, TINY_DIR

MOTIONS = ("walking", "running", "jumping", "waving")
MISSING_FIGURE_ERROR = 0.5  # trajectory error of a frame whose figure cannot be found (frame fractions)


@dataclass(frozen=True)
class Clip:
    """One clip's ground truth: its frames' panels (scene, figure, placement, phase) and caption."""

    motion: str
    panels: tuple[world.Panel, ...]

    @property
    def caption(self) -> str:
        return self.panels[0].caption

    @property
    def identity(self) -> world.Identity:
        return self.panels[0].figures[0].identity

    def render(self, size: int = 64) -> list[Image.Image]:
        return [world.render_panel(panel, size) for panel in self.panels]

    def background(self, size: int = 64) -> Image.Image:
        """The clip's scene without its character."""
        return world.render_panel(world.Panel(self.panels[0].scene, (), "", frozenset()), size)


def sample_clip(
    rng: np.random.Generator, num_frames: int = 8, motion: str | None = None, omit_probability: float = 0.5
) -> Clip:
    """A random clip of `num_frames` frames: identity, scene, motion and path drawn from `rng`.

    walking/running: across the frame (left to right or back), a stride every ~8 frames; jumping: one
    whole jump (phase 0 -> 1: crouch, up, down, land), sometimes forward; waving: in place.
    """
    if num_frames < 2:
        raise ValueError(f"num_frames={num_frames} must be >= 2 (a start and an end frame)")
    motion = motion if motion is not None else str(rng.choice(MOTIONS))
    world._check_choice("motion", motion, MOTIONS)
    identity = world.Identity.random(rng)
    scene = world.Scene(str(rng.choice(world.SCENES)), int(rng.integers(0, 2**31)))
    y, scale = float(rng.uniform(0.82, 0.95)), float(rng.uniform(0.5, 0.68))
    direction = 1 if rng.random() < 0.5 else -1
    if motion in ("walking", "running"):
        distance = float(rng.uniform(0.3, 0.55))
        x0 = float(rng.uniform(0.5 - distance / 2 - 0.1, 0.5 - distance / 2 + 0.1))
        xs = (x0, x0 + distance) if direction == 1 else (1 - x0, 1 - x0 - distance)
        phase_step = (0.125 if motion == "walking" else 0.17) * 8 / num_frames
        start_phase = float(rng.random())
    elif motion == "jumping":
        x0, hop = float(rng.uniform(0.3, 0.7)), float(rng.choice([0.0, 0.15]))
        xs = (x0, x0 + direction * hop)
        phase_step, start_phase = 1.0 / (num_frames - 1), 0.0  # the last frame wraps to phase 0: landed
    else:
        x0 = float(rng.uniform(0.3, 0.7))
        xs, phase_step, start_phase = (x0, x0), 2.0 / num_frames, float(rng.random())
    start = world.Placement(xs[0], y, scale, direction)
    end = world.Placement(xs[1], y, scale, direction)
    panels = world.animate(
        identity,
        motion,
        scene,
        start,
        end,
        num_frames,
        phase_step=phase_step,
        start_phase=start_phase,
        rng=rng,
        omit_probability=omit_probability,
    )
    return Clip(motion, tuple(panels))


def held_out_clips(count: int, num_frames: int = 8, seed: int = 10_000) -> list[Clip]:
    """A fixed evaluation set (its seed is never used for training), the motions in turn."""
    rng = np.random.default_rng(seed)
    return [sample_clip(rng, num_frames, MOTIONS[i % len(MOTIONS)]) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# The trajectory instrument
# ---------------------------------------------------------------------------------------------


def figure_mass(image: Image.Image, background: Image.Image, threshold: float = 0.12) -> np.ndarray | None:
    """Where the frame differs from the empty scene, as weights (H, W) summing to 1; None if nowhere.

    A pixel counts when its mean absolute RGB difference exceeds `threshold` (in [0, 1]), weighed by
    that difference, so faint fringes count for little.
    """
    frame = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    empty = np.asarray(background.convert("RGB").resize(image.size), dtype=np.float32) / 255.0
    difference = np.abs(frame - empty).mean(axis=2)  # (H, W)
    weights = np.where(difference > threshold, difference, 0.0)
    total = weights.sum()
    return None if total <= 0 else weights / total


def figure_position(image: Image.Image, background: Image.Image, threshold: float = 0.12) -> tuple[float, float] | None:
    """Centre (x, y), in frame fractions, of the character's mass (`figure_mass`); None if not found."""
    mass = figure_mass(image, background, threshold)
    if mass is None:
        return None
    height, width = mass.shape
    x = float(mass.sum(0) @ (np.arange(width) + 0.5)) / width
    return x, float(mass.sum(1) @ (np.arange(height) + 0.5)) / height


def _wasserstein_1d(a: np.ndarray, b: np.ndarray) -> float:
    """W1 between two distributions on the same evenly spaced grid over [0, 1]."""
    return float(np.abs(np.cumsum(a) - np.cumsum(b)).sum() / len(a))


def position_distance(mass: np.ndarray, true_mass: np.ndarray) -> float:
    """How far the character's mass lies from where it should (frame fractions): the earth mover's
    distances of the column and of the row profiles, combined as a 2-D length.

    For one compact figure this is the distance between the two centres; unlike the centres, it also
    counts a figure smeared along its path or split in two (a cross-fade puts half a figure at each
    end, whose centre would sit exactly at the true midpoint).
    """
    across = _wasserstein_1d(mass.sum(0), true_mass.sum(0))  # column profiles: left-right
    down = _wasserstein_1d(mass.sum(1), true_mass.sum(1))  # row profiles: up-down
    return float(np.hypot(across, down))


def trajectory_error(
    frames: Sequence[Image.Image],
    truth: Sequence[Image.Image],
    background: Image.Image,
    frames_background: Image.Image | None = None,
) -> float:
    """Mean `position_distance` between the character in `frames` and in the ground-truth `truth`, over
    the in-between frames (the keyframes are given, not generated).

    `frames_background` is the empty scene as `frames` would show it — for frames decoded by a VAE,
    the VAE's reconstruction of `background`, so that its colour shifts are not taken for a figure.
    """
    if len(frames) != len(truth) or len(frames) < 3:
        raise ValueError(f"need >= 3 frames and as many truth frames; got {len(frames)} and {len(truth)}")
    frames_background = background if frames_background is None else frames_background
    errors = []
    for frame, true_frame in zip(frames[1:-1], truth[1:-1]):
        mass, true_mass = figure_mass(frame, frames_background), figure_mass(true_frame, background)
        if true_mass is None:
            continue  # the character has left the frame in truth: nothing to compare
        errors.append(MISSING_FIGURE_ERROR if mass is None else position_distance(mass, true_mass))
    return float(np.mean(errors)) if errors else 0.0


# ---------------------------------------------------------------------------------------------
# The tiny transition model, assembled from the tiny image model
# ---------------------------------------------------------------------------------------------


def tiny_image_encoder():
    """The tiny CLIP's vision tower with its projection, as a `CLIPVisionModelWithProjection`."""
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    clip = CLIPModel.from_pretrained(TINY_CLIP_DIR, **dtype_kwargs(torch.float32, "transformers"))
    config = clip.config.vision_config
    config.projection_dim = clip.config.projection_dim  # the vision sub-config keeps a default of its own
    encoder = CLIPVisionModelWithProjection(config)
    weights = {k: v for k, v in clip.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    encoder.load_state_dict(weights, strict=True)
    return encoder.eval()


def tiny_motion_predictor(text: bool = True, seed: int = 0, dropout: float = 0.0, grid: int = 4, map_channels: int = 8):
    """A fresh tiny Semantic Motion Predictor for the tiny CLIP (64-d embeddings) and UNet (64-d context):
    on a `grid` x `grid` of patch embeddings a frame (one cross-attention token a cell, and a
    `map_channels` map), or with `grid=0` on the pooled embedding (the paper's; 2 tokens a frame)."""
    from storydiffusion.video.smp import SemanticMotionPredictor

    torch.manual_seed(seed)
    cells = 1 if grid == 0 else grid * grid
    map_channels = 0 if grid == 0 else map_channels
    return SemanticMotionPredictor(
        embed_dim=64,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        max_frames=16,
        text_dim=64 if text else None,
        cross_attention_dim=64,
        condition_tokens=2 if cells == 1 else 1,
        num_tokens=cells,
        map_channels=map_channels,
        dropout=dropout,
    )


def fresh_tiny_transition_pipeline(
    image_model: str | Path = TINY_DIR,
    text: bool = True,
    seed: int = 0,
    dropout: float = 0.0,
    grid: int = 4,
    map_channels: int = 8,
):
    """An untrained tiny TransitionPipeline: the tiny image model's parts, fresh motion layers and
    predictor (on a `grid` with a `map_channels` map, or pooled with `grid=0`: see `tiny_motion_predictor`)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

    from storydiffusion.video.pipeline import TransitionPipeline
    from storydiffusion.video.unet import motion_adapter_for, transition_unet

    folder = Path(image_model)
    torch.manual_seed(seed)
    image_unet = UNet2DConditionModel.from_pretrained(folder / "unet", **dtype_kwargs(torch.float32))
    adapter = motion_adapter_for(image_unet, motion_num_attention_heads=4, motion_max_seq_length=16)
    pipe = TransitionPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae", **dtype_kwargs(torch.float32)),
        text_encoder=CLIPTextModel.from_pretrained(
            folder / "text_encoder", **dtype_kwargs(torch.float32, "transformers")
        ),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=transition_unet(image_unet, adapter, map_channels if grid else 0),
        scheduler=DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler"),
        image_encoder=tiny_image_encoder(),
        feature_extractor=CLIPImageProcessor.from_pretrained(TINY_CLIP_DIR),
        motion_predictor=tiny_motion_predictor(text, seed, dropout, grid, map_channels),
    )
    return pipe
