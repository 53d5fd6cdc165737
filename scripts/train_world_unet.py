"""Train the tiny world's UNet and assemble the tiny pipeline folder (`storydiffusion.assets/tiny`).

A diffusers `UNet2DConditionModel` (`world_training.TINY_UNET_CONFIG`, 16x16 latents of 64x64
panels) conditioned on the tiny CLIP's text encoder (frozen, captions padded to 77 tokens as the
pipelines do), trained with v-prediction on a cosine schedule, min-SNR-5 loss weights, 10% caption
dropout for classifier-free guidance and an EMA of the weights.

Design (the instrument issue): cross-image attention is the *only* way to keep a character.
- Captions name only the kind, pose and scene (`world_training.IDENTITY_FREE`), never hair, skin, shirt,
  trousers or hats: a lone panel's look is the model's free draw.
- Each step is 16 single panels (a quarter scenes alone or pairs) or 16 // P groups of P = 2-4 panels of
  one character, whose self-attention layers see a random share (0.5-1) of each other's tokens
  (`world_training.JointPanelAttnProcessor`); convolutions never cross panels. In `--clean-sibling` of
  the group steps one panel per group is nearly clean (t < 100), the clearest thing to copy from.
- The joint attention is supervised with the renderer's part maps (`--part-weight`,
  `world_training.part_matching_loss`): a labelled query's head-mean attention over the other panels'
  tokens is pulled onto tokens of the same part (hair, face, shirt, trousers/skirt, ...).
- Figure pixels weigh 1 + `--figure-weight` in the diffusion loss, and `--part-colour-weight` adds the
  error of each part's *mean* predicted clean latent (`world_training.part_mean_loss`): the colour a
  panel can only get right at high noise by looking at its siblings.
- Every `--signal-every` steps the EMA model denoises the same held-out groups at fixed noise and
  timesteps with the other panels visible and alone; `siblings.gain` is the relative v-MSE drop on the
  figures' own pixels (what the siblings give).

Data: latent shards with part labels made by `scripts/render_world_latents.py` (run it beside this
script; new shards are picked up as they appear).

    python scripts/render_world_latents.py --shards 120 --threads 1 &
    python scripts/train_world_unet.py --init src/storydiffusion/assets/tiny/unet --steps 12000 --lr 5e-4 --warmup 100
    python scripts/train_world_unet.py --resume ...                       # continue from --checkpoint
    python scripts/train_world_unet.py --export                           # checkpoint -> pipeline folder

Export writes `--out` (default src/storydiffusion/assets/tiny) as a `StableDiffusionPipeline` folder:
unet/ (EMA weights, fp16), text_encoder/ + tokenizer/ (from the tiny CLIP), vae/ (the tiny VAE),
scheduler/ (DPM-Solver++ on the training schedule) and model_index.json.

Shipped run (src/storydiffusion/assets/tiny, the 2026-12-01 run): 120 shards (69,120 panels, 18 min on the other
core), then from the previous shipped UNet (git 082b2d6, trained with identity captions) with
`--steps 12000 --lr 5e-4 --warmup 100` on one thread: steps 0-3,000 with `--clean-sibling 0.25
--part-weight 0.05 --part-colour-weight 0`, 3,000-5,000 with `--clean-sibling 0.5 --part-weight 0.1`,
5,000-9,200 adding `--part-colour-weight 0.5` (the defaults below), stopped at 9,200 for the export:
135 min of wall time, ~0.75-0.85 s a step. Held-out sibling gain 0.033 -> 0.074 (step 5,000) -> 0.089.
Then (the 2026-12-02 (a) run) from that UNet, the shards re-rendered the same way (15 min), `--init
src/storydiffusion/assets/tiny/unet --steps 9000 --lr 5e-4 --warmup 100`: steps 0-3,100 with
`--part-colour-weight 2.0` (strip 0.45 -> 0.49, but the single-panel alignment fell to 0.21), then `--resume`
with `--part-colour-weight 0.5 --single-share 0.35` to step 8,200 (stopped there for the export): 130 min of
wall time on one thread, ~0.65-1.4 s a step (the other core busy). Held-out sibling gain 0.073 -> 0.100.
Then (the 2026-12-02 (b) run) from that UNet, with the shards re-rendered beside it on the other core (28 min, picked up
as they appeared), `--init src/storydiffusion/assets/tiny/unet --steps 4000 --lr 3e-4 --warmup 100
--part-colour-weight 1.0 --single-share 0.35`: 62 min of wall time on one thread, ~0.65-1.05 s a step;
held-out sibling gain 0.087 (step 250, the EMA settling) -> 0.108. Exported at step 4,000.
5.8 M parameters, 11.5 MB fp16. Not at the instrument's gate (README, "The tiny world"), with the 6-hour
CPU budget spent; the next step is an architecture change on a GPU, see the README.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTokenizer

from storydiffusion.files import write_atomically
from storydiffusion.pipelines.loading import dtype_kwargs
from storydiffusion.world import training as wt
from storydiffusion.world.classifier import SCORED_IDENTITY_ATTRIBUTES, load_default_classifier, visible_truth

ASSETS = Path(__file__).resolve().parents[1] / "src" / "storydiffusion" / "assets" / "tiny"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6000, help="optimiser steps in all (a resumed run continues to it)")
    p.add_argument("--panels", type=int, default=16, help="panels per step")
    p.add_argument("--single-share", type=float, default=0.25, help="share of steps on single panels")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (warm-up, then cosine to 10%%)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (warmed up as (1+n)/(10+n))")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (then raise --panels)")
    p.add_argument("--data", default="/tmp/world_latents_idfree", help="folder of latent shards (with part labels)")
    p.add_argument(
        "--part-weight", type=float, default=0.1, help="weight of the part-matching loss on the joint attention"
    )
    p.add_argument(
        "--figure-weight", type=float, default=4.0, help="latent pixels on a figure weigh 1 + this in the loss"
    )
    p.add_argument(
        "--part-colour-weight",
        type=float,
        default=0.5,
        help="weight of the loss on each figure part's mean predicted clean latent (wt.part_mean_loss)",
    )
    p.add_argument(
        "--clean-sibling",
        type=float,
        default=0.5,
        help="share of group steps in which one panel per group is nearly clean (timestep < 100)",
    )
    p.add_argument(
        "--copy-share",
        type=float,
        default=1.0,
        help="share of group steps that are copy groups: the first panel a nearly clean source "
        "(timestep < --source-max-t) the others read, at their own random noise (wt.copy_attention); "
        "the rest are consensus groups (all panels read each other at one timestep)",
    )
    p.add_argument("--source-max-t", type=int, default=50, help="a copy group's source panel has t below this")
    p.add_argument(
        "--copy-strength",
        default="1",
        help="comma-separated strengths a copy group's readers weight the source's tokens by, one drawn per step "
        "(as `CSAConfig.reference_strength` reads a bank); the picture signal reads at the largest",
    )
    p.add_argument(
        "--drawn-sources",
        type=float,
        default=0.0,
        help="share of copy groups whose source is a drawn panel, not a render: the EMA model's clean prediction "
        "from the source noised to t in [150, 400) (as a story's references are drawn, with their slips)",
    )
    p.add_argument(
        "--encoder-attention",
        action="store_true",
        help="attention in the 16x16 encoder block too (wt.ENCODER_ATTENTION_BLOCKS); grown from --init",
    )
    p.add_argument("--signal-every", type=int, default=250, help="steps between held-out sibling-gain checks")
    p.add_argument(
        "--picture-count", type=int, default=16, help="held-out identities of the picture_clean signal (2 frames each)"
    )
    p.add_argument("--clip", default=str(ASSETS / "clip"), help="the tiny CLIP folder (its text encoder is used)")
    p.add_argument("--vae", default=str(ASSETS / "vae"))
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--checkpoint", default="/tmp/world_unet_ckpt/checkpoint.pt")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint (weights, EMA, optimiser, RNG)")
    p.add_argument(
        "--init",
        default=None,
        help="start the weights (and EMA) from a saved unet folder, e.g. the shipped one, when no checkpoint is left",
    )
    p.add_argument("--export", action="store_true", help="only write the pipeline folder from the checkpoint")
    p.add_argument("--out", default=str(ASSETS))
    return p.parse_args()


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to --lr, then cosine decay to 10% of it at --steps."""
    return wt.warmup_cosine(step, args.lr, args.warmup, args.steps)


@dataclass
class Batch:
    latents: torch.Tensor  # (B, 4, 16, 16), group-major
    captions: list[str]
    parts: dict[int, torch.Tensor]  # tokens per panel -> (B, N) part labels (-1 none)


class ShardPool:
    """Every latent shard in a folder, loaded as it appears; batches drawn from a seeded `random.Random`."""

    def __init__(self, folder: str, rng: random.Random) -> None:
        self.folder = Path(folder)
        self.rng = rng
        self.loaded: set[str] = set()
        # (latents (4, 4, 16, 16), captions, {grid: labels (4, g, g)}) per group; the same per extra panel
        self.groups: list[tuple[torch.Tensor, list[str], dict[int, torch.Tensor]]] = []
        self.extras: list[tuple[torch.Tensor, str, dict[int, torch.Tensor]]] = []

    def refresh(self) -> None:
        for path in sorted(self.folder.glob("shard_*.pt")):
            if path.name in self.loaded:
                continue
            shard = torch.load(path, weights_only=False)
            if f"group_parts_{wt.PART_GRIDS[0]}" not in shard:
                raise SystemExit(f"{path}: no part labels; render shards with scripts/render_world_latents.py")
            for i, (latents, captions) in enumerate(zip(shard["group_latents"], shard["group_captions"])):
                self.groups.append((latents, captions, {g: shard[f"group_parts_{g}"][i] for g in wt.PART_GRIDS}))
            for i, (latent, caption) in enumerate(zip(shard["extra_latents"], shard["extra_captions"])):
                self.extras.append((latent, caption, {g: shard[f"extra_parts_{g}"][i] for g in wt.PART_GRIDS}))
            self.loaded.add(path.name)

    def wait_for_data(self) -> None:
        while True:
            self.refresh()
            if self.groups:
                return
            print(f"waiting for latent shards in {self.folder} ...", flush=True)
            time.sleep(10)

    def batch(self, panels: int, per_group: int) -> Batch:
        """panels // per_group * per_group panels, group-major, with their captions and part labels."""
        picked: list[tuple[torch.Tensor, str, dict[int, torch.Tensor]]] = []
        if per_group == 1:
            for _ in range(panels):
                if self.extras and self.rng.random() < 0.25:
                    picked.append(self.rng.choice(self.extras))
                else:
                    latents, captions, parts = self.rng.choice(self.groups)
                    i = self.rng.randrange(len(captions))
                    picked.append((latents[i], captions[i], {g: p[i] for g, p in parts.items()}))
        else:
            for _ in range(panels // per_group):
                latents, captions, parts = self.rng.choice(self.groups)
                for i in self.rng.sample(range(len(captions)), per_group):
                    picked.append((latents[i], captions[i], {g: p[i] for g, p in parts.items()}))
        return Batch(
            latents=torch.stack([latent for latent, _, _ in picked]).float(),
            captions=[caption for _, caption, _ in picked],
            parts={g * g: torch.stack([p[g] for _, _, p in picked]).flatten(1).long() for g in wt.PART_GRIDS},
        )


def figure_weights(parts16: torch.Tensor, figure_weight: float) -> torch.Tensor:
    """(B, 1, 16, 16) loss weights: 1 + figure_weight on latent pixels within one pixel of a labelled part."""
    on_figure = (parts16.view(-1, 1, 16, 16) >= 0).float()
    return 1.0 + figure_weight * F.max_pool2d(on_figure, 3, stride=1, padding=1)


def copy_timesteps(num_groups: int, per_group: int, source_max_t: int, generator: torch.Generator) -> torch.Tensor:
    """A copy group's timesteps: its first panel (the source) nearly clean, every other panel its own noise."""
    timesteps = torch.randint(0, 1000, (num_groups * per_group,), generator=generator)
    timesteps[::per_group] = torch.randint(0, source_max_t, (num_groups,), generator=generator)
    return timesteps


@torch.no_grad()
def drawn_sources(ema, ema_joint, scheduler, latents, text, per_group: int, generator) -> torch.Tensor:
    """`latents` with each group's first panel (a copy group's source) replaced by what the EMA model draws back
    from it noised to t in [150, 400): a panel as a story's reference is, drawn, not rendered."""
    sources = latents[::per_group]
    timesteps = torch.randint(150, 400, (len(sources),), generator=generator).to(latents.device)
    noise = torch.randn(sources.shape, generator=generator).to(latents.device)
    noisy = scheduler.add_noise(sources, noise, timesteps)
    for processor in ema_joint:
        processor.panels, processor.copy, processor.part_labels = 1, False, None
    velocity = ema(noisy, timesteps, text[::per_group]).sample
    out = latents.clone()
    out[::per_group] = wt.clean_from_velocity(scheduler, noisy, velocity, timesteps)
    return out


def group_timesteps(num_groups: int, per_group: int, clean_sibling: bool, generator: torch.Generator) -> torch.Tensor:
    """One timestep per group, repeated per panel; with `clean_sibling` each group's first panel gets t < 100."""
    timesteps = torch.randint(0, 1000, (num_groups,), generator=generator).repeat_interleave(per_group)
    if clean_sibling and per_group > 1:
        timesteps[::per_group] = torch.randint(0, 100, (num_groups,), generator=generator)
    return timesteps


@torch.no_grad()
def encode_text(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device)).last_hidden_state  # (B, 77, 64)


def load_text_encoder(clip_dir: str) -> tuple[CLIPTokenizer, CLIPTextModel]:
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    if len(tokenizer) != 49408:
        raise RuntimeError(f"{clip_dir}: tokenizer loaded {len(tokenizer)} tokens, not 49408")
    text_encoder = (
        CLIPTextModel.from_pretrained(clip_dir, **dtype_kwargs(torch.float32, "transformers"))
        .eval()
        .requires_grad_(False)
    )
    return tokenizer, text_encoder


def export(unet, args: argparse.Namespace) -> Path:
    tokenizer, text_encoder = load_text_encoder(args.clip)
    vae = AutoencoderKL.from_pretrained(args.vae)
    scheduler = DPMSolverMultistepScheduler(**wt.TINY_NOISE_SCHEDULE, timestep_spacing="trailing", steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae.half(),
        text_encoder=text_encoder.half(),
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet).cpu().half(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(args.out)
    pipe.save_pretrained(out, safe_serialization=True)
    load_as_float32(out / "text_encoder" / "config.json")
    return out


def load_as_float32(config_path: Path) -> None:
    """Weights stay fp16 on disk (size budget), but a plain `from_pretrained` should give float32 like the
    diffusers components do -- transformers loads in the config's `dtype` -- so a CPU run never mixes dtypes."""
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class SiblingSignal:
    """What the joint attention gives while training: the same held-out groups at fixed noise and timesteps,
    denoised with the other panels visible (rate 1) and alone; the v-MSE on the figures' own latent pixels
    of both and their relative difference (`gain` > 0: the siblings help)."""

    TIMESTEPS = (200, 400, 600, 800)

    def __init__(self, vae: AutoencoderKL, tokenizer, text_encoder, seed: int, groups: int = 16) -> None:
        shard = wt.latent_shard(np.random.default_rng([seed, 1_000_003]), vae, groups, 0, wt.IDENTITY_FREE)
        self.latents = shard["group_latents"].flatten(0, 1).float()  # (G*4, 4, 16, 16)
        self.on_figure = (shard["group_parts_16"].flatten(0, 1) >= 0).float()[:, None]  # (G*4, 1, 16, 16)
        self.text = encode_text(tokenizer, text_encoder, [c for group in shard["group_captions"] for c in group])
        self.noise = torch.randn(self.latents.shape, generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def measure(self, unet, joint, scheduler, device) -> dict[str, float]:
        losses = {}
        for panels in (wt.GROUP_SIZE, 1):
            for processor in joint:
                processor.panels, processor.rate, processor.part_labels = panels, 1.0, None
            total = 0.0
            for t in self.TIMESTEPS:
                timesteps = torch.full((len(self.latents),), t, device=device)
                latents, noise = self.latents.to(device), self.noise.to(device)
                prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, self.text.to(device))
                error = (prediction.sample - scheduler.get_velocity(latents, noise, timesteps)).pow(2).mean(1, True)
                mask = self.on_figure.to(device)
                total += ((error * mask).sum() / mask.sum()).item() / len(self.TIMESTEPS)
            losses["joint" if panels > 1 else "alone"] = total
        losses["gain"] = (losses["alone"] - losses["joint"]) / losses["alone"]
        return {k: round(v, 4) for k, v in losses.items()}


class PictureSignal:
    """The `picture_clean` measure while training: held-out identities, each given by a clean render (the
    picture) in a pose and scene of its own, and two new panels of it drawn from noise (20 DPM-Solver++ steps,
    guidance 4, identity-free captions) whose self-attention reads the picture's tokens at timestep 0 in every
    layer (`wt.copy_attention`). `picture_agreement`: the share of the scored identity attributes the prompt
    does not name that the classifier reads off the new panels as the picture's truth; `no_picture` the same
    drawn without it (chance ~0.2); `alignment`: panels showing the prompted pose and scene."""

    STEPS, GUIDANCE = 20, 4.0

    def __init__(self, vae, tokenizer, text_encoder, seed: int, count: int, strength: float = 1.0) -> None:
        self.strength = strength
        rng = np.random.default_rng([seed, 2_000_003])
        groups = [wt.sample_group(rng, size=3, omit_probability=wt.IDENTITY_FREE) for _ in range(count)]
        self.pictures = [group[0] for group in groups]
        self.frames = [panel for group in groups for panel in group[1:]]
        self.vae = vae
        self.source = wt.encode_latents(vae, self.pictures).float().repeat_interleave(2, 0)  # (F, 4, 16, 16)
        self.text = encode_text(tokenizer, text_encoder, [p.caption for p in self.frames])
        self.source_text = encode_text(tokenizer, text_encoder, [p.caption for p in self.pictures]).repeat_interleave(
            2, 0
        )
        self.empty = encode_text(tokenizer, text_encoder, [""])
        self.noise = torch.randn(self.source.shape, generator=torch.Generator().manual_seed(seed + 7))
        self.classifier = load_default_classifier()
        self.attributes = [a for a in SCORED_IDENTITY_ATTRIBUTES if a != "kind"]  # the captions name the kind
        self.truths = [visible_truth(picture) for picture in self.pictures for _ in range(2)]
        self.prompts = [(panel.figures[0].pose, panel.scene.kind) for panel in self.frames]

    @torch.no_grad()
    def sample(self, unet, joint, device, with_picture: bool) -> torch.Tensor:
        scheduler = DPMSolverMultistepScheduler(**wt.TINY_NOISE_SCHEDULE, timestep_spacing="trailing", steps_offset=1)
        scheduler.set_timesteps(self.STEPS)
        frames = len(self.frames)
        latents = self.noise.to(device)
        empty = self.empty.to(device).expand(frames, -1, -1)
        text, source_text, source = self.text.to(device), self.source_text.to(device), self.source.to(device)
        for processor in joint:
            processor.panels, processor.rate, processor.copy = (2 if with_picture else 1), 1.0, True
            processor.part_labels, processor.strength = None, self.strength
        for t in scheduler.timesteps:
            if with_picture:  # groups [picture, frame], uncond groups first
                inputs = torch.stack([source, latents], 1).flatten(0, 1).repeat(2, 1, 1, 1)
                states = torch.cat([torch.stack([empty, empty], 1), torch.stack([source_text, text], 1)])
                states = states.flatten(0, 1)
                steps = torch.tensor([0, int(t)], device=device).repeat(2 * frames)
                v = unet(inputs, steps, states).sample.view(2, frames, 2, *latents.shape[1:])[:, :, 1]
            else:
                steps = torch.full((2 * frames,), int(t), device=device)
                v = unet(latents.repeat(2, 1, 1, 1), steps, torch.cat([empty, text])).sample.view(2, frames, -1, 16, 16)
            guided = v[0] + self.GUIDANCE * (v[1] - v[0])
            latents = scheduler.step(guided, t, latents).prev_sample
        for processor in joint:
            processor.copy = False
        images = self.vae.decode(latents.cpu() / self.vae.config.scaling_factor).sample
        return ((images.clamp(-1, 1) + 1) / 2).float()

    def measure(self, unet, joint, device, with_picture: bool = True) -> dict[str, float]:
        predictions = self.classifier.predict(self.sample(unet, joint, device, with_picture))
        hits = [p.get(a) == truth.get(a) for p, truth in zip(predictions, self.truths) for a in self.attributes]
        aligned = [(p["pose"], p["scene"]) == prompt for p, prompt in zip(predictions, self.prompts)]
        return {"agreement": round(float(np.mean(hits)), 4), "alignment": round(float(np.mean(aligned)), 4)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    checkpoint = Path(args.checkpoint)
    if (args.resume or args.export) and checkpoint.exists():  # the checkpoint says which architecture it is
        args.encoder_attention = torch.load(checkpoint, map_location="cpu", weights_only=False).get(
            "encoder_attention", False
        )
    unet = wt.tiny_unet(args.seed, encoder_attention=args.encoder_attention)
    if args.init is not None:
        grown = wt.load_grown(
            unet, UNet2DConditionModel.from_pretrained(args.init, **dtype_kwargs(torch.float32)).state_dict()
        )
        print(f"init from {args.init}; {len(grown)} new parameter tensors start as identities", flush=True)
    unet.to(args.device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    step, elapsed = 0, 0.0
    if (args.resume or args.export) and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["python_rng"])
        generator.set_state(state["torch_rng"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed from {checkpoint} at step {step}", flush=True)
    if args.export:
        print(f"exported step {step} to {export(ema, args)}")
        return

    print(f"tiny UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters", flush=True)
    tokenizer, text_encoder = load_text_encoder(args.clip)
    text_encoder.to(args.device)
    noise_scheduler = DDPMScheduler(**wt.TINY_NOISE_SCHEDULE)
    joint = wt.install_joint_attention(unet)
    ema_joint = wt.install_joint_attention(ema)  # for the held-out signal; a fixed generator of its own
    for processor in joint:
        processor.generator = generator
    for processor in ema_joint:
        processor.generator = torch.Generator().manual_seed(args.seed)
    pool = ShardPool(args.data, rng)
    pool.wait_for_data()
    vae = AutoencoderKL.from_pretrained(args.vae)
    signal = SiblingSignal(vae, tokenizer, text_encoder, args.seed)
    strengths = [float(w) for w in args.copy_strength.split(",")]
    pictures = PictureSignal(vae, tokenizer, text_encoder, args.seed, args.picture_count, max(strengths))
    if step == 0:
        ema.train(False)
        start = {"no_picture": pictures.measure(ema, ema_joint, args.device, with_picture=False)}
        start["picture_clean"] = pictures.measure(ema, ema_joint, args.device)
        print(json.dumps({"step": 0, "pictures": start}), flush=True)

    t0 = time.time() - elapsed
    unet.train()
    running: dict[int | str, list[float]] = {}
    while step < args.steps:
        if step % 50 == 0:
            pool.refresh()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        per_group = 1 if rng.random() < args.single_share else rng.choice((2, 3, 4))
        batch = pool.batch(args.panels, per_group)
        captions = ["" if rng.random() < args.caption_dropout else c for c in batch.captions]
        text = encode_text(tokenizer, text_encoder, captions)
        num_groups = len(captions) // per_group
        copy_group = per_group > 1 and rng.random() < args.copy_share
        if copy_group:
            timesteps = copy_timesteps(num_groups, per_group, args.source_max_t, generator)
        else:
            timesteps = group_timesteps(num_groups, per_group, rng.random() < args.clean_sibling, generator)
        noise = torch.randn(batch.latents.shape, generator=generator)  # drawn on the CPU: the same run on any device
        latents, timesteps, noise = (t.to(args.device) for t in (batch.latents, timesteps, noise))
        if copy_group and args.drawn_sources > 0 and rng.random() < args.drawn_sources:
            latents = drawn_sources(ema, ema_joint, noise_scheduler, latents, text, per_group, generator)
        parts = {n: labels.to(args.device) for n, labels in batch.parts.items()}
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        rate = rng.choice((0.5, 0.75, 1.0))
        strength = rng.choice(strengths) if len(strengths) > 1 else strengths[0]  # one value: the RNG as before
        for processor in joint:
            processor.panels, processor.rate, processor.copy = per_group, rate, copy_group
            processor.strength = strength
            processor.part_labels, processor.part_losses = (parts if args.part_weight > 0 else None), []
        prediction = unet(noisy, timesteps, text).sample
        target = noise_scheduler.get_velocity(latents, noise, timesteps)  # v-prediction target
        weights = figure_weights(parts[256], args.figure_weight)  # (B, 1, 16, 16)
        error = F.mse_loss(prediction, target, reduction="none").mean(1, keepdim=True)  # (B, 1, 16, 16)
        per_panel = (weights * error).flatten(1).sum(1) / weights.flatten(1).sum(1)
        loss = (wt.min_snr_weights(noise_scheduler, timesteps) * per_panel).mean()
        if args.part_colour_weight > 0:
            predicted_clean = wt.clean_from_velocity(noise_scheduler, noisy, prediction, timesteps)
            part_colour = wt.part_mean_loss(predicted_clean, latents, parts[256])
            loss = loss + args.part_colour_weight * part_colour
            running.setdefault("colour", []).append(part_colour.item())
        part_losses = [loss for processor in joint for loss in processor.part_losses]
        if part_losses:
            part_loss = torch.stack(part_losses).mean()
            loss = loss + args.part_weight * part_loss
            running.setdefault("part", []).append(part_loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        running.setdefault(f"{per_group}{'c' if copy_group else ''}", []).append(per_panel.mean().item())
        if step % args.log_every == 0:
            log = {"step": step, "lr": round(learning_rate(step - 1, args), 6), "s": round(time.time() - t0, 1)}
            log["mse"] = {p: round(sum(v) / len(v), 4) for p, v in sorted(running.items(), key=str)}
            log["shards"] = len(pool.loaded)
            running.clear()
            if step % args.signal_every == 0:
                ema.train(False)
                log["siblings"] = signal.measure(ema, ema_joint, noise_scheduler, args.device)
                log["picture_clean"] = pictures.measure(ema, ema_joint, args.device)
            print(json.dumps(log), flush=True)
        if step % args.ckpt_every == 0 or step == args.steps:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            state = {
                "model": unet.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "python_rng": rng.getstate(),
                "torch_rng": generator.get_state(),
                "step": step,
                "elapsed": time.time() - t0,
                "encoder_attention": args.encoder_attention,
            }
            write_atomically(checkpoint, partial(torch.save, state))  # never half-written
    print(json.dumps({"steps": step, "wall_s": round(time.time() - t0), "threads": args.threads}))
    ema.set_attn_processor(AttnProcessor2_0())  # the joint-attention processors are training machinery
    print(f"exported to {export(ema, args)}")


if __name__ == "__main__":
    main()
