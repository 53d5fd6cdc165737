"""CSA settings on the shipped tiny model: which rate / layers / schedule / id_length keep a character.

Runs `world_eval.evaluate` once for the baseline and the strip (the model's own multi-panel
consistency), then only the `csa` arm for each setting, on the same built-in stories and seeds, and
prints one line per setting and, last, one JSON object with every figure.

    python benchmarks/tiny_csa_sweep.py --count 12 --seeds 0,1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from diffusers import StableDiffusionPipeline

from storydiffusion.clip_score import ClipScorer
from storydiffusion.csa.attention import CSAConfig, CSASchedule
from storydiffusion.pipelines.loading import dtype_kwargs
from storydiffusion.world.classifier import load_default_classifier
from storydiffusion.world.eval import EvalSettings, default_stories, evaluate
from storydiffusion.world.models import TINY_CLIP_DIR, TINY_DIR

ALL_LAYERS = ("*",)
SETTINGS = {
    "default (r=0.5, decoder, public schedule, id_length=2)": (CSAConfig(), 2),
    "r=0.3": (CSAConfig(rate=0.3), 2),
    "r=1.0": (CSAConfig(rate=1.0), 2),
    "always (no plain start, no gating)": (CSAConfig(schedule=CSASchedule.always()), 2),
    "decoder 16x16 only": (CSAConfig(layers=("up_blocks.2.*",)), 2),
    "all self-attention layers": (CSAConfig(layers=ALL_LAYERS), 2),
    "r=1.0, all layers, always": (CSAConfig(rate=1.0, layers=ALL_LAYERS, schedule=CSASchedule.always()), 2),
    "default, id_length=1": (CSAConfig(), 1),
    "default, id_length=3": (CSAConfig(), 3),
    # banks of finished references (the pictures issue), read clean
    "finished references, read clean": (CSAConfig(bank_from="finished", reference_noise=0.0), 2),
    "sequential references, read clean": (CSAConfig(bank_from="sequential", reference_noise=0.0), 2),
    "sequential, clean, 4x, r=1.0, all layers (the tiny model's storydiffusion.json)": (
        CSAConfig(rate=1.0, layers=ALL_LAYERS, bank_from="sequential", reference_noise=0.0, reference_strength=4.0),
        2,
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default=str(TINY_DIR), help="a StableDiffusionPipeline folder (default: the shipped tiny)"
    )
    p.add_argument("--count", type=int, default=12, help="built-in stories")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    pipe = StableDiffusionPipeline.from_pretrained(args.model, **dtype_kwargs(torch.float32))
    pipe.set_progress_bar_config(disable=True)
    classifier, clip = load_default_classifier(), ClipScorer(TINY_CLIP_DIR)
    base = EvalSettings(steps=args.steps, guidance=args.guidance, seeds=seeds)
    stories = default_stories(args.count)
    started = time.perf_counter()
    reference = evaluate(pipe, stories, base, classifier, clip, only=("baseline", "strip"))
    figures = {"baseline": reference["baseline"], "within_strip": reference["within_strip"], "csa": {}}
    print(
        f"baseline: identity {reference['baseline']['identity_agreement']:.3f}, "
        f"alignment {reference['baseline']['prompt_alignment']:.3f}; "
        f"within strip: identity {reference['within_strip_agreement']:.3f}",
        flush=True,
    )
    for name, (config, id_length) in SETTINGS.items():
        runs = [dataclasses.replace(s, story=_with_id_length(s.story, id_length)) for s in stories]
        result = evaluate(pipe, runs, dataclasses.replace(base, csa=config), classifier, clip, only=("csa",))["csa"]
        figures["csa"][name] = result
        print(
            f"{name}: identity {result['identity_agreement']:.3f}, alignment {result['prompt_alignment']:.3f}, "
            f"CLIP-I {result['clip_i']:.3f}, CLIP-T {result['clip_t']:.3f}",
            flush=True,
        )
    figures |= {"stories": args.count, "seeds": list(seeds), "wall_s": round(time.perf_counter() - started)}
    print(json.dumps(figures))


def _with_id_length(story, id_length: int):
    return dataclasses.replace(story, settings=dataclasses.replace(story.settings, id_length=id_length))


if __name__ == "__main__":
    main()
