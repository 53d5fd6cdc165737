"""`storydiffusion eval-video`: transitions between held-out tiny-world keyframes, scored in six arms.

Arms, all from the same two keyframes and prompt of each held-out clip:
- `smp`: the transition model with its Semantic Motion Predictor, each frame's keyframe attention reading
  the keyframes at its own step's noise (as trained);
- `smp_finished`, `smp_finished_w4`: the same reading the finished keyframes' tokens (one pass per clip,
  `keyframe_tokens="finished"`), unweighted and weighted 4x (`keyframe_strength`);
- `linear_embedding`: the same model, the predictor's transformer bypassed (a straight path between
  the keyframes' CLIP embeddings — the paper's ablation); `linear_finished_w4`: the same, reading the finished
  keyframes at 4x (the straight path for `smp_finished_w4`: only the motion differs);
- `latent_interpolation`: no video model, a straight path between the keyframes' VAE latents.

Metrics per arm, averaged over clips:
- `trajectory_error`: distance (frame fractions) between the character's position in each in-between
  frame and in the true frame (`world_video.trajectory_error`); generated frames are compared with
  the VAE's reconstruction of the empty scene, the truth with the rendered one;
- `identity_agreement`: pairwise agreement of the attribute classifier's identity attributes across a
  clip's frames (`world_classifier.agreement`);
- `feature_distance_first` / `feature_distance_frames`: a perceptual distance of every frame to the
  first / of consecutive frames — not LPIPS: the `lpips` package needs ImageNet weights fetched at run
  time, so this is LPIPS's recipe on the tiny world's own CNN: the attribute classifier's conv features
  at every scale, unit-normalised over channels, squared differences averaged over positions and scales
  (no learned per-channel weights). Its values are not comparable with published LPIPS figures;
- `clipsim_first` / `clipsim_frames`: CLIP image-embedding cosine similarity, same pairs, tiny CLIP
  by default (any CLIPModel through `clip_model`).
`ground_truth` scores the true frames the same way, for scale.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from storydiffusion.clip_score import ClipScorer
from storydiffusion.world.classifier import AttributeClassifier, agreement, load_default_classifier, pil_to_tensor
from storydiffusion.world.models import TINY_CLIP_DIR
from storydiffusion.world.video import held_out_clips, trajectory_error

ARMS = ("smp", "smp_finished", "smp_finished_w4", "linear_embedding", "linear_finished_w4", "latent_interpolation")
# the video model's arms: (motion, keyframe tokens, keyframe strength)
MODEL_ARMS = {
    "smp": ("smp", "noisy", 1.0),
    "smp_finished": ("smp", "finished", 1.0),
    "smp_finished_w4": ("smp", "finished", 4.0),
    "linear_embedding": ("linear", "noisy", 1.0),
    "linear_finished_w4": ("linear", "finished", 4.0),
}
METRICS = (
    "trajectory_error",
    "identity_agreement",
    "feature_distance_first",
    "feature_distance_frames",
    "clipsim_first",
    "clipsim_frames",
)


@dataclass(frozen=True)
class VideoEvalSettings:
    clips: int = 24
    num_frames: int = 8
    steps: int = 20
    guidance: float = 1.0
    seed: int = 0


@torch.no_grad()
def perceptual_features(classifier: AttributeClassifier, images: Sequence[Image.Image]) -> list[torch.Tensor]:
    """The classifier's conv features at every scale, unit-normalised over channels: [(N, C_k, H_k, W_k)]."""
    pixels = pil_to_tensor(images, classifier.config.sample_size).to(classifier.device)
    return [F.normalize(x.float(), dim=1) for x in classifier.features(pixels)]


def perceptual_distance(features: list[torch.Tensor], i: int, j: int) -> float:
    """Feature distance (LPIPS's recipe, the world classifier's features) of images i and j of one batch."""
    return float(np.mean([((f[i] - f[j]) ** 2).sum(0).mean().item() for f in features]))


def clip_metrics(
    frames: Sequence[Image.Image],
    truth: Sequence[Image.Image],
    background: Image.Image,
    classifier: AttributeClassifier,
    scorer: ClipScorer,
    frames_background: Image.Image | None = None,
) -> dict[str, float]:
    """All metrics of one clip's frames against its true frames and empty scene; `frames_background`:
    the empty scene as the frames' decoder shows it (see `world_video.trajectory_error`)."""
    features = perceptual_features(classifier, frames)
    embeds = scorer.image_embeddings(frames)  # (F, D) unit norm
    count = len(frames)
    return {
        "trajectory_error": trajectory_error(frames, truth, background, frames_background),
        "identity_agreement": agreement(classifier.predict(list(frames))),
        "feature_distance_first": float(np.mean([perceptual_distance(features, 0, k) for k in range(1, count)])),
        "feature_distance_frames": float(np.mean([perceptual_distance(features, k, k + 1) for k in range(count - 1)])),
        "clipsim_first": float((embeds[1:] @ embeds[0]).mean()),
        "clipsim_frames": float((embeds[1:] * embeds[:-1]).sum(-1).mean()),
    }


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {name: round(float(np.mean([row[name] for row in rows])), 4) for name in METRICS}


def evaluate_video(
    pipe,
    settings: VideoEvalSettings,
    classifier: AttributeClassifier | None = None,
    scorer: ClipScorer | None = None,
    images_dir: Path | None = None,
    progress: Callable[[Sequence], Sequence] = lambda items: tqdm(items, desc="clips"),
) -> dict:
    """Generate every held-out transition in each arm and score it; returns the JSON-ready result."""
    classifier = classifier if classifier is not None else load_default_classifier()
    scorer = scorer if scorer is not None else ClipScorer(TINY_CLIP_DIR)
    clips = held_out_clips(settings.clips, settings.num_frames)
    rows: dict[str, list[dict[str, float]]] = {arm: [] for arm in (*ARMS, "ground_truth")}
    for index, clip in enumerate(progress(clips)):
        truth = clip.render()
        made = {}
        for arm, (motion, keyframe_tokens, strength) in MODEL_ARMS.items():
            generator = torch.Generator(device="cpu").manual_seed(settings.seed + index)
            made[arm] = pipe(
                truth[0],
                truth[-1],
                clip.caption,
                num_frames=settings.num_frames,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                motion=motion,
                keyframe_tokens=keyframe_tokens,
                keyframe_strength=strength,
                generator=generator,
            ).frames[0]
        made["latent_interpolation"] = pipe.interpolate_latents(truth[0], truth[-1], settings.num_frames)
        made["ground_truth"] = truth
        background = clip.background()
        decoded_background = pipe.interpolate_latents(background, background, 2)[0]  # the VAE's view of it
        for arm, frames in made.items():
            seen = background if arm == "ground_truth" else decoded_background
            rows[arm].append(clip_metrics(frames, truth, background, classifier, scorer, seen))
        if images_dir is not None:
            save_clip_strips(images_dir / f"clip_{index:03d}_{clip.motion}.png", made)
    result = {arm: _mean(rows[arm]) for arm in rows}
    result.update(clips=len(clips), frames=settings.num_frames, seed=settings.seed)
    return result


def save_clip_strips(path: Path, made: dict[str, Sequence[Image.Image]]) -> None:
    """One PNG: a row of frames per arm (ground truth last)."""
    rows = list(made.values())
    width, height = rows[0][0].size
    sheet = Image.new("RGB", (width * len(rows[0]), height * len(rows)))
    for r, frames in enumerate(rows):
        for c, frame in enumerate(frames):
            sheet.paste(frame, (c * width, r * height))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def write_result(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
