"""Training pieces for the transition model: clip sources, the two stages' losses.

Stage 1 (`smp_loss`): the Semantic Motion Predictor regresses the CLIP image embeddings of a clip's
true in-between frames from its two keyframes (and prompt). Stage 2 (`diffusion_loss`): the whole
model — predictor and video UNet — under the diffusion loss of the clip's latents, conditioned on the
keyframes and on `[text ; P_i]`. `scripts/train_video.py` runs them with accelerate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from storydiffusion.errors import StoryDiffusionError
from storydiffusion.video.export import read_video
from storydiffusion.video.pipeline import TransitionPipeline, images_to_tensor, transition_condition
from storydiffusion.video.unet import KeyframeTokens, frame_encoder_states

VIDEO_FILES = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")
FRAME_FILES = (".png", ".jpg", ".jpeg", ".webp")


class FolderClips:
    """Clips from a folder: video files (mp4, gif, ...) or sub-folders of numbered frames.

    A clip's caption is the text of a file beside it with the same name and `.txt` (empty if none).
    `sample` takes `num_frames` evenly spaced frames from a random window, resized to `size`.
    """

    def __init__(self, folder: str | Path, num_frames: int, size: int) -> None:
        self.folder, self.num_frames, self.size = Path(folder), num_frames, size
        if not self.folder.is_dir():
            raise StoryDiffusionError(f"clip folder {str(self.folder)!r} does not exist")
        self.items = sorted(
            p
            for p in self.folder.iterdir()
            if (p.is_file() and p.suffix.lower() in VIDEO_FILES) or (p.is_dir() and self._frame_files(p))
        )
        if not self.items:
            raise StoryDiffusionError(
                f"no clips in {str(self.folder)!r}: put video files ({', '.join(VIDEO_FILES)}) or frame folders there"
            )

    @staticmethod
    def _frame_files(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_FILES)

    def _frames(self, item: Path) -> list[Image.Image]:
        if item.is_dir():
            return [Image.open(p).convert("RGB") for p in self._frame_files(item)]
        return read_video(item)

    def sample(self, rng: np.random.Generator) -> tuple[list[Image.Image], str]:
        for _ in range(len(self.items)):
            item = self.items[int(rng.integers(len(self.items)))]
            frames = self._frames(item)
            if len(frames) >= self.num_frames:
                break
        else:
            raise StoryDiffusionError(f"no clip in {str(self.folder)!r} has {self.num_frames} frames or more")
        stride = int(rng.integers(1, max(1, (len(frames) - 1) // (self.num_frames - 1)) + 1))
        first = int(rng.integers(0, len(frames) - stride * (self.num_frames - 1)))
        chosen = [frames[first + i * stride].resize((self.size, self.size)) for i in range(self.num_frames)]
        caption_file = item.with_suffix(".txt") if item.is_file() else item.parent / f"{item.name}.txt"
        caption = caption_file.read_text().strip() if caption_file.is_file() else ""
        return chosen, caption


def clip_batches(
    sample, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[list[list[Image.Image]], list[str]]]:
    """Endless batches from `sample(rng) -> (frames, caption)`."""
    while True:
        clips = [sample(rng) for _ in range(batch_size)]
        yield [frames for frames, _ in clips], [caption for _, caption in clips]


@torch.no_grad()
def encode_clips(
    pipe: TransitionPipeline, clips: Sequence[Sequence[Image.Image]], captions: Sequence[str], latents: bool = True
) -> dict:
    """The frozen encoders' view of a batch: frame embeddings (B, F, [N,] D), text (B, T, C) and, with
    `latents`, the frames' VAE latents (B, C, F, h, w)."""
    batch, frames = len(clips), len(clips[0])
    flat = [image for clip in clips for image in clip]
    embeds = pipe.encode_images(flat)
    embeds = embeds.view(batch, frames, *embeds.shape[1:])
    encoded = {"frame_embeds": embeds.float()}
    if latents:
        pixels = images_to_tensor(flat).to(pipe.vae.device, pipe.vae.dtype)
        flat_latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor  # (B*F, C, h, w)
        shaped = flat_latents.view(batch, frames, *flat_latents.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C, F, h, w)
        encoded["latents"] = shaped.float()
    ids = pipe.tokenizer(
        list(captions),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(pipe.text_encoder.device)
    encoded["text"] = pipe.text_encoder(ids)[0].float()
    return encoded


def smp_loss(predictor, frame_embeds: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Stage 1: MSE between predicted and true embeddings of the in-between frames."""
    num_frames = frame_embeds.shape[1]
    predicted = predictor(
        frame_embeds[:, 0], frame_embeds[:, -1], num_frames, text_embeds=text if predictor.reads_text else None
    )
    return F.mse_loss(predicted[:, 1:-1], frame_embeds[:, 1:-1]) * frame_embeds.shape[-1]  # per-embedding sum


def diffusion_loss(
    unet,
    predictor,
    scheduler,
    batch: dict,
    generator: torch.Generator | None = None,
    caption_dropout: float = 0.1,
    bypass_probability: float = 0.0,
    teacher_probability: float = 0.0,
    finished_keyframes: bool = False,
) -> torch.Tensor:
    """Stage 2: the diffusion loss of the clips' latents, keyframes and `[text ; P_i]` as conditions.

    One timestep per clip (all its frames share it, as at sampling time). Text is dropped with
    probability `caption_dropout` (replaced by the empty prompt's states in `batch["empty_text"]`) so
    classifier-free guidance works; `bypass_probability` trains some steps on the linear path;
    `teacher_probability` gives some clips the true frames' embeddings as P_i, so the UNet learns to
    follow the semantic path it is given (the predictor still learns from the other clips).
    `finished_keyframes`: keyframe attention reads the clean keyframes' tokens (a pass over them without
    gradients, as `TransitionPipeline(keyframe_tokens="finished")` does at sampling time), not the same-step ones.
    """
    latents, text, embeds = batch["latents"], batch["text"], batch["frame_embeds"]
    clips, frames, device = latents.shape[0], latents.shape[2], latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clips,), generator=generator, device=device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    drop = torch.rand(clips, generator=generator, device=device) < caption_dropout
    text = torch.where(drop[:, None, None], batch["empty_text"].expand_as(text), text)
    bypass = bool(torch.rand((), generator=generator) < bypass_probability)
    path = predictor(
        embeds[:, 0], embeds[:, -1], frames, text_embeds=text if predictor.reads_text else None, bypass=bypass
    )  # (B, F, [N,] D)
    teach = torch.rand(clips, generator=generator, device=device) < teacher_probability
    path = torch.where(teach.view(-1, *[1] * (path.ndim - 1)), embeds.to(path.dtype), path)
    states = frame_encoder_states(text, predictor.condition_tokens(path))  # (B*F, T+K, C)
    condition = transition_condition(predictor, path, latents[:, :, 0], latents[:, :, -1])
    model_input = torch.cat([noisy, condition], dim=1)  # (B, 3C+1[+M], F, h, w)
    keyframes = _keyframe_tokens(unet) if finished_keyframes else None
    try:
        if keyframes is not None:
            record_finished_keyframes(unet, keyframes, latents, condition, states)
        prediction = unet(
            model_input, timesteps, encoder_hidden_states=states, cross_attention_kwargs={"num_frames": frames}
        ).sample
    finally:
        if keyframes is not None:
            keyframes.clear()
    return F.mse_loss(prediction[:, :, 1:-1].float(), target[:, :, 1:-1].float())  # the keyframes are given


def _keyframe_tokens(unet) -> KeyframeTokens:
    """The `KeyframeTokens` the UNet's keyframe attention reads through (`use_keyframe_attention(unet, ...)`)."""
    found = {id(p.keyframes): p.keyframes for p in unet.attn_processors.values() if getattr(p, "keyframes", None)}
    if len(found) != 1:
        raise ValueError(
            "finished keyframes need the UNet's keyframe attention installed with one KeyframeTokens: "
            "use_keyframe_attention(unet, KeyframeTokens())"
        )
    return next(iter(found.values()))


@torch.no_grad()
def record_finished_keyframes(
    unet, keyframes: KeyframeTokens, latents: torch.Tensor, condition: torch.Tensor, states: torch.Tensor
) -> None:
    """A two-frame pass over the clean first and last frames of each clip (timestep 0) that records their tokens
    for keyframe attention to read (`KeyframeTokens` mode "read" afterwards)."""
    clips, frames = latents.shape[0], latents.shape[2]
    ends = [0, frames - 1]
    clean = torch.cat([latents[:, :, ends], condition[:, :, ends]], dim=1)  # (B, 3C+1[+M], 2, h, w)
    end_states = states.view(clips, frames, *states.shape[1:])[:, ends].flatten(0, 1)
    timestep = torch.zeros(clips, dtype=torch.long, device=latents.device)
    keyframes.mode = "record"
    unet(clean, timestep, encoder_hidden_states=end_states, cross_attention_kwargs={"num_frames": 2})
    keyframes.mode = "read"


class TransitionTrainer(torch.nn.Module):
    """The trainable parts (video UNet, motion predictor) behind one `forward` that returns the loss, so
    that accelerate's wrapper (DDP on several GPUs) sees every forward and syncs the gradients.

    stage "smp": the predictor's regression loss alone; stage "video": the diffusion loss plus
    `smp_weight` times the regression loss.
    """

    def __init__(self, unet, predictor) -> None:
        super().__init__()
        self.unet, self.predictor = unet, predictor

    def forward(
        self,
        batch: dict,
        stage: str,
        scheduler=None,
        generator: torch.Generator | None = None,
        smp_weight: float = 1.0,
        **diffusion_options,
    ) -> torch.Tensor:
        regression = smp_loss(self.predictor, batch["frame_embeds"], batch["text"])
        if stage == "smp":
            return regression
        diffusion = diffusion_loss(self.unet, self.predictor, scheduler, batch, generator, **diffusion_options)
        return diffusion + smp_weight * regression
