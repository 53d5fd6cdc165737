"""Train the transition video model: the Semantic Motion Predictor (stage 1), then the whole model (stage 2).

Runs under accelerate: `python scripts/train_video.py ...` is one process here; the same script runs
multi-GPU / multi-node unchanged with `accelerate launch scripts/train_video.py ...` (each process
draws its own clips from a seed offset by its rank; gradients are averaged by accelerate).

- stage `smp`: only the predictor, regressing the CLIP image embeddings of each clip's true in-between
  frames from its keyframes (and prompt). The frozen encoders' outputs for `--cache` clips are
  computed once and minibatches drawn from them (the predictor alone is cheap); a held-out tenth
  measures the predictor against the straight path at the end;
- stage `video`: the video UNet (motion layers, widened conv_in and the image layers) and the predictor
  under the diffusion loss, plus the stage-1 loss (`--smp-weight`) so P_i stays a semantic path. A
  share of the clips (`--teacher`) is conditioned on the true frames' embeddings instead of the
  predictor's, so the UNet learns to follow the path it is given.

Data: `--data world` renders tiny-world clips on the fly (`storydiffusion.world.video.sample_clip`);
`--data FOLDER` reads video files or frame folders (`video.training.FolderClips`). The model starts
from `--init` (a TransitionPipeline folder) or, by default, fresh motion layers and predictor on the
shipped tiny image model. Checkpoints (`accelerator.save_state`: weights, EMA, optimiser, RNG, step)
go to `--out/checkpoint` every `--ckpt-every` steps; `--resume` continues from there. `--export`
writes the EMA weights as a TransitionPipeline folder (fp16 safetensors).

    python scripts/train_video.py --stage smp --steps 600 --out /tmp/video_run
    python scripts/train_video.py --stage video --steps 3000 --out /tmp/video_run --resume-from-stage smp
    python scripts/train_video.py --stage video --out /tmp/video_run --export src/storydiffusion/assets/tiny_video
    python scripts/train_video.py --stage video --init DIR --image-unet UNET --out /tmp/video_graft  # onto UNET

Shipped run (src/storydiffusion/assets/tiny_video, 2-core CPU, seed 0, the defaults: a predictor on a 4 x 4
grid with an 8-channel map): `--stage smp --steps 500 --batch 32 --warmup 50 --cache 4096` (11 min: 4 of
encoding the cache, 7 of steps; held-out in-between embedding error 0.0337 vs 0.0425 for the straight
path), then `--stage video --steps 2150 --resume-from-stage smp` (108 min, ~2.5 s a step; its first
1,100 steps ran before keyframe attention existed and it was resumed with it from that checkpoint) and
`--export` from the last checkpoint. See the README ("Video") for what it does and does not do.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel

from storydiffusion.pipelines.loading import dtype_kwargs
from storydiffusion.video.pipeline import TransitionPipeline
from storydiffusion.video.training import FolderClips, TransitionTrainer, clip_batches, encode_clips
from storydiffusion.video.unet import graft_image_unet
from storydiffusion.world.models import TINY_VIDEO_DIR
from storydiffusion.world.training import warmup_cosine
from storydiffusion.world.video import fresh_tiny_transition_pipeline, sample_clip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=("smp", "video"), required=True)
    p.add_argument("--steps", type=int, default=1000, help="steps of this stage (a resumed run goes on to it)")
    p.add_argument("--batch", type=int, default=None, help="clips per step and process (default: 64 smp, 4 video)")
    p.add_argument("--cache", type=int, default=4096, help="stage smp: clips encoded once, then sampled")
    p.add_argument("--frames", type=int, default=8, help="frames per clip, keyframes included")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default: 1e-3 smp, 3e-4 video)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--smp-weight", type=float, default=1.0, help="stage video: weight of the stage-1 loss")
    p.add_argument("--bypass", type=float, default=0.0, help="stage video: share of steps on the linear path")
    p.add_argument("--teacher", type=float, default=0.5, help="stage video: share of clips given the true P_i")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument(
        "--finished-keyframes",
        action="store_true",
        help="stage video: keyframe attention reads the clean keyframes' tokens, as keyframe_tokens='finished' does",
    )
    p.add_argument("--no-text", action="store_true", help="a predictor that does not read the prompt (fresh init only)")
    p.add_argument("--dropout", type=float, default=0.1, help="the predictor's dropout (fresh init only)")
    p.add_argument(
        "--grid",
        type=int,
        default=4,
        help="a fresh predictor on a GRID x GRID of patch embeddings per frame; 0: the pooled embedding",
    )
    p.add_argument("--map-channels", type=int, default=8, help="the semantic map's channels (fresh grid init only)")
    p.add_argument("--data", default="world", help="'world' (rendered on the fly) or a folder of clips")
    p.add_argument("--init", default=None, help="a TransitionPipeline folder to start from (default: fresh tiny)")
    p.add_argument(
        "--image-unet",
        default=None,
        help="with --init: put this image UNet folder's weights in the image layers (motion layers kept)",
    )
    p.add_argument("--out", default="/tmp/video_run", help="checkpoints and the stage's last weights")
    p.add_argument("--resume", action="store_true", help="continue this stage from --out/checkpoint-STAGE")
    p.add_argument("--resume-from-stage", default=None, help="start from another stage's last weights in --out")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--export", default=None, help=f"write the EMA weights as a pipeline folder (e.g. {TINY_VIDEO_DIR})")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class Progress:
    """The step counter, checkpointed with the rest through `accelerator.register_for_checkpointing`."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def load_pipeline(args: argparse.Namespace) -> TransitionPipeline:
    if args.resume_from_stage:
        folder = Path(args.out) / f"weights-{args.resume_from_stage}"
        return TransitionPipeline.from_pretrained(folder, **dtype_kwargs(torch.float32))
    if args.init:
        pipe = TransitionPipeline.from_pretrained(args.init, **dtype_kwargs(torch.float32))
        if args.image_unet:
            image_unet = UNet2DConditionModel.from_pretrained(args.image_unet, **dtype_kwargs(torch.float32))
            print(f"grafted {graft_image_unet(pipe.unet, image_unet)} image-layer tensors from {args.image_unet}")
        return pipe
    if args.image_unet:
        raise SystemExit("--image-unet needs --init (a fresh model takes the shipped image model's UNet anyway)")
    return fresh_tiny_transition_pipeline(
        text=not args.no_text, seed=args.seed, dropout=args.dropout, grid=args.grid, map_channels=args.map_channels
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    accelerator = Accelerator()
    set_seed(args.seed + accelerator.process_index)
    pipe = load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    for frozen in (pipe.vae, pipe.text_encoder, pipe.image_encoder):
        frozen.requires_grad_(False).to(accelerator.device)
    unet, predictor = pipe.unet, pipe.motion_predictor
    training_unet = args.stage == "video"
    unet.requires_grad_(training_unet)
    predictor.requires_grad_(True)
    modules = TransitionTrainer(unet, predictor)
    lr = args.lr if args.lr is not None else (1e-3 if args.stage == "smp" else 3e-4)
    optimizer = torch.optim.AdamW([p for p in modules.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, 1.0, args.warmup, args.steps)
    )
    ema = EMAModel(modules.parameters(), decay=args.ema)
    progress = Progress()
    modules, optimizer, schedule = accelerator.prepare(modules, optimizer, schedule)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema, progress)
    out = Path(args.out)
    checkpoint = out / f"checkpoint-{args.stage}"
    if args.resume or args.export:
        if not checkpoint.is_dir():
            raise SystemExit(f"no checkpoint at {checkpoint}: train this stage first (without --resume)")
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed {args.stage} at step {progress.step}")

    if args.export is None and args.stage == "smp":
        train_predictor(args, accelerator, pipe, modules, optimizer, schedule, ema, progress, checkpoint)
    elif args.export is None:
        train(args, accelerator, pipe, modules, optimizer, schedule, ema, progress, checkpoint)
    if accelerator.is_main_process:
        ema.store(accelerator.unwrap_model(modules).parameters())
        ema.copy_to(accelerator.unwrap_model(modules).parameters())
        pipe.save_pretrained(out / f"weights-{args.stage}")
        if args.export:
            export(pipe, Path(args.export))
        ema.restore(accelerator.unwrap_model(modules).parameters())


def clip_sampler(args: argparse.Namespace):
    """`sample(rng) -> (frames, caption)` for --data."""
    if args.data == "world":
        return lambda r: (lambda c: (c.render(args.size), c.caption))(sample_clip(r, args.frames))
    return FolderClips(args.data, args.frames, args.size).sample


def log(accelerator, step: int, losses: list[float], schedule, start: float, every: int) -> None:
    rate = (time.time() - start) / len(losses)
    record = {"step": step, "loss": round(float(np.mean(losses[-every:])), 5), "lr": schedule.get_last_lr()[0]}
    accelerator.print(json.dumps({**record, "s_per_step": round(rate, 3)}), flush=True)


def take_step(args, accelerator, loss, modules, optimizer, schedule, ema, progress, checkpoint) -> None:
    """Backward, clip, step, EMA; a checkpoint every --ckpt-every steps and at the last."""
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(modules.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()
    ema.step(accelerator.unwrap_model(modules).parameters())
    progress.step += 1
    if progress.step % args.ckpt_every == 0 or progress.step == args.steps:
        accelerator.save_state(str(checkpoint))


def train_predictor(args, accelerator, pipe, modules, optimizer, schedule, ema, progress, checkpoint) -> None:
    """Stage 1 on a cache of encoded clips: the same clips every run (seeded), minibatches drawn per step."""
    rng = np.random.default_rng(args.seed * 1000 + accelerator.process_index)
    chunks = clip_batches(clip_sampler(args), 64, rng)
    parts = []
    while sum(len(p["text"]) for p in parts) < args.cache:
        clips, captions = next(chunks)
        parts.append(encode_clips(pipe, clips, captions, latents=False))
    cache = {key: torch.cat([p[key] for p in parts])[: args.cache] for key in parts[0]}
    held_out = max(1, args.cache // 10)
    train_rows = torch.arange(held_out, args.cache)
    generator = torch.Generator().manual_seed(args.seed + progress.step)
    batch_size = args.batch or 64
    predictor = accelerator.unwrap_model(modules).predictor
    start, losses = time.time(), []
    modules.train()
    while progress.step < args.steps:
        rows = train_rows[torch.randint(len(train_rows), (batch_size,), generator=generator)]
        loss = modules({"frame_embeds": cache["frame_embeds"][rows], "text": cache["text"][rows]}, "smp")
        take_step(args, accelerator, loss, modules, optimizer, schedule, ema, progress, checkpoint)
        losses.append(loss.item())
        if progress.step % args.log_every == 0:
            log(accelerator, progress.step, losses, schedule, start, args.log_every)
    embeds, text = cache["frame_embeds"][:held_out], cache["text"][:held_out]
    with torch.no_grad():
        ema.store(modules.parameters())
        ema.copy_to(modules.parameters())
        predictor.eval()
        frames = embeds.shape[1]
        predicted = predictor(embeds[:, 0], embeds[:, -1], frames, text_embeds=text if predictor.reads_text else None)
        straight = predictor(embeds[:, 0], embeds[:, -1], frames, bypass=True)
        ema.restore(modules.parameters())
    error = {
        name: ((path[:, 1:-1] - embeds[:, 1:-1]) ** 2).sum(-1).mean().item()
        for name, path in (("predictor", predicted), ("straight_path", straight))
    }
    accelerator.print(json.dumps({"held_out_clips": held_out, "embedding_mse": error}), flush=True)


def train(args, accelerator, pipe, modules, optimizer, schedule, ema, progress, checkpoint) -> None:
    rng = np.random.default_rng(args.seed * 1000 + accelerator.process_index + progress.step)
    batches = clip_batches(clip_sampler(args), args.batch or 4, rng)
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator(accelerator.device).manual_seed(args.seed + 7919 * accelerator.process_index)
    empty = encode_clips(pipe, [[_blank(args.size)] * 2], [""], latents=False)["text"]  # (1, T, C): the dropped caption
    start, losses = time.time(), []
    modules.train()
    while progress.step < args.steps:
        clips, captions = next(batches)
        batch = encode_clips(pipe, clips, captions)
        batch["empty_text"] = empty
        loss = modules(
            batch,
            "video",
            noise_schedule,
            generator,
            args.smp_weight,
            caption_dropout=args.caption_dropout,
            bypass_probability=args.bypass,
            teacher_probability=args.teacher,
            finished_keyframes=args.finished_keyframes,
        )
        take_step(args, accelerator, loss, modules, optimizer, schedule, ema, progress, checkpoint)
        losses.append(loss.item())
        if progress.step % args.log_every == 0:
            log(accelerator, progress.step, losses, schedule, start, args.log_every)


def _blank(size: int):
    from PIL import Image

    return Image.new("RGB", (size, size))


def export(pipe: TransitionPipeline, folder: Path) -> None:
    """The pipeline as fp16 safetensors; configs say float32 so that it loads as float32 on a CPU."""
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    for name in ("text_encoder", "image_encoder"):
        config_file = folder / name / "config.json"
        config = json.loads(config_file.read_text())
        config["dtype"] = "float32"
        config.pop("torch_dtype", None)
        config_file.write_text(json.dumps(config, indent=2) + "\n")
    # Without torchvision, transformers 5 picks its PIL image processor and records that class; the
    # generic name loads everywhere (and takes the fast one where torchvision is installed).
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index.pop("_name_or_path", None)
    index_file.write_text(json.dumps(index, indent=2) + "\n")
    print(f"exported {folder}")


if __name__ == "__main__":
    main()
