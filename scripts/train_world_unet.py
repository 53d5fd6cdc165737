"""Train the tiny world's UNet and assemble the tiny pipeline folder (`storydiffusion.assets/tiny`).

A diffusers `UNet2DConditionModel` (`world_training.TINY_UNET_CONFIG`, 16x16 latents of 64x64
panels) conditioned on the tiny CLIP's text encoder (frozen, captions padded to 77 tokens as the
pipelines do), trained with v-prediction on a cosine schedule, min-SNR-5 loss weights, 10% caption
dropout for classifier-free guidance and an EMA of the weights.

Data: latent shards made by `scripts/render_world_latents.py` (run it beside this script; new shards
are picked up as they appear). Each step is either 16 single panels (a quarter of them scenes alone
or pairs of characters) or 16 // P groups of P = 2, 3 or 4 panels of one character, with one timestep
per group. During group steps every self-attention layer lets each panel see a random share (0.5-1)
of the other panels' tokens (`world_training.JointPanelAttnProcessor`) -- what a multi-panel comic
canvas teaches a real model, with panel-local convolutions so that keeping the character has to go
through self-attention. Captions leave identity attributes out independently per panel, so a panel
often has to take them from the others.

    python scripts/train_world_unet.py --steps 6000 --threads 1            # --resume to continue
    python scripts/train_world_unet.py --export                            # checkpoint -> pipeline folder
    python scripts/train_world_unet.py --init src/storydiffusion/assets/tiny/unet    # on from the shipped weights

Export writes `--out` (default src/storydiffusion/assets/tiny) as a `StableDiffusionPipeline` folder:
unet/ (EMA weights, fp16), text_encoder/ + tokenizer/ (from the tiny CLIP), vae/ (the tiny VAE),
scheduler/ (DPM-Solver++ on the training schedule) and model_index.json.

Shipped run (src/storydiffusion/assets/tiny): 68 latent shards (22 min on one thread), then 4,500
steps (`--steps 5000`, stopped and resumed with `--threads 2 --steps 4500` at step 1,600) and 3,000 more
(`--steps 10000 --resume`, stopped at 7,500 for the export): 88 min of wall time in all on a 2-core
CPU shared with the CLIP/classifier trainers, ~0.55 s a step on 2 threads, ~0.85 s on one. 5.8 M
parameters, 11.5 MB fp16. Final training loss (v-MSE) ~0.22. It is undertrained: scenes come out
right, figures are rough and the model has not yet learned to keep a character across the panels of
a group (README, "The tiny world"); go on with `--init src/storydiffusion/assets/tiny/unet`.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from storydiffusion.files import write_atomically
from storydiffusion.world import training as wt

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
    p.add_argument("--data", default="/tmp/world_latents", help="folder of latent shards")
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


class ShardPool:
    """Every latent shard in a folder, loaded as it appears; batches drawn from a seeded `random.Random`."""

    def __init__(self, folder: str, rng: random.Random) -> None:
        self.folder = Path(folder)
        self.rng = rng
        self.loaded: set[str] = set()
        self.groups: list[tuple[torch.Tensor, list[str]]] = []  # (4, 4, 16, 16), 4 captions
        self.extras: list[tuple[torch.Tensor, str]] = []

    def refresh(self) -> None:
        for path in sorted(self.folder.glob("shard_*.pt")):
            if path.name in self.loaded:
                continue
            shard = torch.load(path, weights_only=False)
            self.groups += list(zip(shard["group_latents"], shard["group_captions"]))
            self.extras += list(zip(shard["extra_latents"], shard["extra_captions"]))
            self.loaded.add(path.name)

    def wait_for_data(self) -> None:
        while True:
            self.refresh()
            if self.groups:
                return
            print(f"waiting for latent shards in {self.folder} ...", flush=True)
            time.sleep(10)

    def batch(self, panels: int, per_group: int) -> tuple[torch.Tensor, list[str]]:
        """(panels // per_group * per_group, 4, 16, 16) latents, group-major, and their captions."""
        latents, captions = [], []
        if per_group == 1:
            for _ in range(panels):
                if self.extras and self.rng.random() < 0.25:
                    latent, caption = self.rng.choice(self.extras)
                else:
                    group, group_captions = self.rng.choice(self.groups)
                    i = self.rng.randrange(len(group_captions))
                    latent, caption = group[i], group_captions[i]
                latents.append(latent)
                captions.append(caption)
        else:
            for _ in range(panels // per_group):
                group, group_captions = self.rng.choice(self.groups)
                for i in self.rng.sample(range(len(group_captions)), per_group):
                    latents.append(group[i])
                    captions.append(group_captions[i])
        return torch.stack(latents).float(), captions


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
    text_encoder = CLIPTextModel.from_pretrained(clip_dir, torch_dtype=torch.float32).eval().requires_grad_(False)
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


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    unet = wt.tiny_unet(args.seed)
    if args.init is not None:
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(args.init, torch_dtype=torch.float32).state_dict())
    unet.to(args.device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    checkpoint = Path(args.checkpoint)
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
    for processor in joint:
        processor.generator = generator
    pool = ShardPool(args.data, rng)
    pool.wait_for_data()

    t0 = time.time() - elapsed
    unet.train()
    running: dict[int, list[float]] = {}
    while step < args.steps:
        if step % 50 == 0:
            pool.refresh()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        per_group = 1 if rng.random() < args.single_share else rng.choice((2, 3, 4))
        latents, captions = pool.batch(args.panels, per_group)  # (B, 4, 16, 16)
        captions = ["" if rng.random() < args.caption_dropout else c for c in captions]
        text = encode_text(tokenizer, text_encoder, captions)
        num_groups = len(captions) // per_group
        timesteps = torch.randint(0, 1000, (num_groups,), generator=generator).repeat_interleave(per_group)
        noise = torch.randn(latents.shape, generator=generator)  # drawn on the CPU: the same run on any device
        latents, timesteps, noise = latents.to(args.device), timesteps.to(args.device), noise.to(args.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        rate = rng.choice((0.5, 0.75, 1.0))
        for processor in joint:
            processor.panels, processor.rate = per_group, rate
        prediction = unet(noisy, timesteps, text).sample
        target = noise_scheduler.get_velocity(latents, noise, timesteps)  # v-prediction target
        per_panel = F.mse_loss(prediction, target, reduction="none").mean((1, 2, 3))
        loss = (wt.min_snr_weights(noise_scheduler, timesteps) * per_panel).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        running.setdefault(per_group, []).append(per_panel.mean().item())
        if step % args.log_every == 0:
            log = {"step": step, "lr": round(learning_rate(step - 1, args), 6), "s": round(time.time() - t0, 1)}
            log["mse"] = {p: round(sum(v) / len(v), 4) for p, v in sorted(running.items())}
            log["shards"] = len(pool.loaded)
            running.clear()
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
            }
            write_atomically(checkpoint, partial(torch.save, state))  # never half-written
    print(json.dumps({"steps": step, "wall_s": round(time.time() - t0), "threads": args.threads}))
    print(f"exported to {export(ema, args)}")


if __name__ == "__main__":
    main()
