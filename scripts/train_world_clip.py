"""Train the tiny world's CLIP: a `transformers.CLIPModel` (text + vision) trained contrastively on renders.

Batches of fresh panels (0-2 figures, `world_training.render_clip_batch`) and their captions, drawn
on the fly; symmetric InfoNCE where captions identical to the true one are not counted as negatives
(`world_training.clip_loss`). The text tower uses the CLIP BPE tokenizer shipped with the package.

At the end, retrieval accuracy on 512 held-out panels (another seed) is measured and the model is
saved with fp16 weights (`save_pretrained`: config.json + model.safetensors) together with its
tokenizer and image processor, so `CLIPModel.from_pretrained(out)` and
`CLIPProcessor.from_pretrained(out)` load it offline. A JSON summary is printed last.

    python scripts/train_world_clip.py --steps 1000 --threads 2      # resume with --resume

Shipped run (src/storydiffusion/assets/tiny/clip): 600 steps of 128 panels (76,800 panels, each seen
once), 4.2 M parameters, 15 min on a 2-core x86_64 CPU beside another job (steps 0-100 with
`--threads 2`, then `--steps 600 --threads 1 --resume`: ~1.4 s a step). Held-out top-1 retrieval among
512 panels (an identical caption counts as right): text->image 0.295, image->text 0.293, the same
with the fp16 weights. Captions leave most attributes out, so many panels fit a caption equally
well; 1/512 would be chance. 8.4 MB of weights (fp16).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel

from storydiffusion.files import write_atomically
from storydiffusion.pipelines.loading import dtype_kwargs
from storydiffusion.pipelines.tiny_random import clip_tokenizer
from storydiffusion.world import training as wt

EVAL_SEED = 20_000  # held-out panels come from their own seed


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps in all (a resumed run continues to it)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (warm-up, then cosine to 10%%)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--checkpoint", default="/tmp/world_clip_ckpt/checkpoint.pt")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--out", default="src/storydiffusion/assets/tiny/clip", help="transformers model folder to write")
    return p.parse_args()


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to --lr, then cosine decay to 10% of it at --steps."""
    return wt.warmup_cosine(step, args.lr, args.warmup, args.steps)


def tokenize(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    # Padded to the longest caption, not to 77: the text tower is causal, so the hidden states up to
    # the end token are the same either way, and training is ~2x faster.
    batch = tokenizer(captions, padding="longest", return_tensors="pt")
    return batch.input_ids, batch.attention_mask


@torch.no_grad()
def retrieval(clip: CLIPModel, tokenizer, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Top-1 text->image and image->text retrieval among the held-out panels (an identical caption counts as right)."""
    clip.eval()
    ids, mask = tokenize(tokenizer, captions)
    text = clip.get_text_features(input_ids=ids, attention_mask=mask)
    image = clip.get_image_features(pixel_values=wt.clip_pixels(images))
    text, image = (getattr(t, "pooler_output", t) for t in (text, image))
    sims = torch.nn.functional.normalize(text, dim=-1) @ torch.nn.functional.normalize(image, dim=-1).T
    same = (ids[:, None, :] == ids[None, :, :]).all(-1)
    rows = torch.arange(len(captions))
    t2i = same[rows, sims.argmax(1)].float().mean().item()
    i2t = same[sims.argmax(0), rows].float().mean().item()
    clip.train()
    return {"text_to_image": round(t2i, 4), "image_to_text": round(i2t, 4)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    tokenizer = clip_tokenizer()
    clip = wt.tiny_clip(args.seed)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.05)
    checkpoint = Path(args.checkpoint)
    step, elapsed = 0, 0.0
    if args.resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        clip.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed from {checkpoint} at step {step}")
    print(f"tiny CLIP: {sum(p.numel() for p in clip.parameters()) / 1e6:.2f} M parameters")
    eval_images, eval_captions = wt.render_clip_batch(np.random.default_rng(EVAL_SEED), 512)

    t0 = time.time() - elapsed
    clip.train()
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        images, captions = wt.render_clip_batch(rng, args.batch_size)
        ids, mask = tokenize(tokenizer, captions)
        loss, parts = wt.clip_loss(clip, ids, mask, wt.clip_pixels(images))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        step += 1
        if step % args.log_every == 0:
            log = {"step": step, "lr": round(learning_rate(step - 1, args), 6), "s": round(time.time() - t0, 1)}
            print(json.dumps(log | {k: round(v, 4) for k, v in parts.items()}), flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            print(
                json.dumps({"step": step, "eval": retrieval(clip, tokenizer, eval_images, eval_captions)}), flush=True
            )
        if step % args.ckpt_every == 0 or step == args.steps:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            state = {
                "model": clip.state_dict(),
                "optimizer": optimizer.state_dict(),
                "numpy_rng": rng.bit_generator.state,
                "step": step,
                "elapsed": time.time() - t0,
            }
            write_atomically(checkpoint, partial(torch.save, state))  # never half-written
    wall = time.time() - t0

    fp32 = retrieval(clip, tokenizer, eval_images, eval_captions)
    clip.half()
    out = Path(args.out)
    clip.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    wt.clip_image_processor().save_pretrained(out)
    # fp16 on disk, float32 when loaded (transformers follows the config's dtype), as the pipeline's parts
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    fp16 = retrieval(
        CLIPModel.from_pretrained(out, **dtype_kwargs(torch.float32, "transformers")),
        tokenizer,
        eval_images,
        eval_captions,
    )
    summary = {
        "steps": step,
        "batch_size": args.batch_size,
        "wall_s": round(wall),
        "threads": args.threads,
        "parameters": sum(p.numel() for p in clip.parameters()),
        "retrieval_fp32": fp32,
        "retrieval_fp16_weights": fp16,
        "eval_panels": len(eval_captions),
        "file_bytes": sum(f.stat().st_size for f in out.iterdir()),
        "out": str(out),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
