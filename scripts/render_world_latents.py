"""Render the UNet's training data: shards of tiny-world panels encoded by the shipped tiny VAE.

Shard i holds `--groups` groups of 4 panels of one character (`world_training.sample_group`) and
`--extras` panels with no character or two (`world_training.sample_extra_panel`), as latents (the
VAE's posterior mean times its scaling factor, float16) with their captions. It is drawn from the
seed (`--seed`, i), so shards are reproducible, can be made by several processes at once
(`--start`, `--step`) and an interrupted run resumes by skipping the shards already on disk. Data
stays out of the repository (default /tmp/world_latents).

    python scripts/render_world_latents.py --shards 400 --threads 1 &     # runs beside the trainer

One shard (128 groups + 64 extras = 576 panels) takes ~20 s on one CPU thread and 0.6 MB.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from storydiffusion.files import write_atomically
from storydiffusion.pipelines.loading import dtype_kwargs
from storydiffusion.world import training as wt

VAE_DIR = Path(__file__).resolve().parents[1] / "src" / "storydiffusion" / "assets" / "tiny" / "vae"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/world_latents_idfree")
    p.add_argument(
        "--omit-probability",
        type=float,
        default=wt.IDENTITY_FREE,
        help="chance a caption leaves out each identity attribute (1: kind, pose and scene only)",
    )
    p.add_argument("--shards", type=int, default=400, help="shard indices 0 .. N-1")
    p.add_argument("--start", type=int, default=0, help="first shard index this process makes")
    p.add_argument("--step", type=int, default=1, help="make every N-th shard (for several processes)")
    p.add_argument("--groups", type=int, default=128)
    p.add_argument("--extras", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vae", default=str(VAE_DIR))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    vae = AutoencoderKL.from_pretrained(args.vae, **dtype_kwargs(torch.float32)).eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for index in range(args.start, args.shards, args.step):
        path = out / f"shard_{index:05d}.pt"
        if path.exists():
            continue
        t0 = time.time()
        shard = wt.latent_shard(
            np.random.default_rng([args.seed, index]), vae, args.groups, args.extras, args.omit_probability
        )
        write_atomically(path, partial(torch.save, shard))  # a reader never sees half a shard
        print(f"{path.name}: {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
