"""Candidates for the tiny model's recommended settings (`storydiffusion.json`): where its bank comes from and
how strongly it is read, each run as `storydiffusion eval`'s `recommended` arm (the file's rate, layers, steps
and guidance, with one change each); prints one line per candidate and, last, one JSON object.

    python benchmarks/tiny_recommended_sweep.py --count 12 --seeds 0
    python benchmarks/tiny_recommended_sweep.py --count 24 --seeds 0,1,2 --pictures --only finished_w4

`--pictures` runs each candidate with the character given by a picture instead (`eval --pictures`'
`picture_recommended` arm: a render of the character in a pose and scene no frame uses).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from storydiffusion.app.runner import RunOptions, load_story_pipeline
from storydiffusion.clip_score import ClipScorer
from storydiffusion.csa.attention import CSAConfig
from storydiffusion.pipelines.recommended import read_recommended
from storydiffusion.world.classifier import load_default_classifier
from storydiffusion.world.eval import EvalSettings, default_stories, evaluate
from storydiffusion.world.models import TINY, resolve_clip, resolve_model
from storydiffusion.world.picture_eval import evaluate_pictures

CANDIDATES = {  # changes to the file's CSA settings (and its generation defaults: "guidance", "steps")
    "steps_w1": {"bank_from": "steps", "reference_strength": 1.0},
    "steps_w4": {"bank_from": "steps", "reference_strength": 4.0},
    "sequential_w4": {"bank_from": "sequential", "reference_noise": 0.0, "reference_strength": 4.0},
    "finished_w4": {"bank_from": "finished", "reference_noise": 0.0, "reference_strength": 4.0},
    # the same bank, left unread for the first part of the loop, where a copying model would take the pose and
    # scene of the reference along with its look
    "sequential_w4_late20": {
        "bank_from": "sequential",
        "reference_noise": 0.0,
        "reference_strength": 4.0,
        "schedule": {"plain_fraction": 0.2, "stages": [[0.4, 0.7], [1.0, 0.9]]},
    },
    "sequential_w4_late35": {
        "bank_from": "sequential",
        "reference_noise": 0.0,
        "reference_strength": 4.0,
        "schedule": {"plain_fraction": 0.35, "stages": [[1.0, 0.9]]},
    },
    "sequential_w4_late10": {
        "bank_from": "sequential",
        "reference_noise": 0.0,
        "reference_strength": 4.0,
        "schedule": {"plain_fraction": 0.1, "stages": [[0.4, 0.7], [1.0, 0.9]]},
    },
    # weaker or sparser reads of the same bank
    "sequential_w2": {"bank_from": "sequential", "reference_noise": 0.0, "reference_strength": 2.0},
    "sequential_w4_rate05": {"bank_from": "sequential", "reference_noise": 0.0, "reference_strength": 4.0, "rate": 0.5},
    "sequential_w4_decoder": {
        "bank_from": "sequential",
        "reference_noise": 0.0,
        "reference_strength": 4.0,
        "layers": ["up_blocks.*"],
    },
    # the references read partly noised: less of their drawn detail (and its slips) to copy
    "sequential_w4_noise10": {"bank_from": "sequential", "reference_noise": 0.1, "reference_strength": 4.0},
    "sequential_w4_noise25": {"bank_from": "sequential", "reference_noise": 0.25, "reference_strength": 4.0},
    # a stronger prompt against the pull of the references
    "sequential_w4_g6": {"bank_from": "sequential", "reference_noise": 0.0, "reference_strength": 4.0, "guidance": 6.0},
    "sequential_w4_g8": {"bank_from": "sequential", "reference_noise": 0.0, "reference_strength": 4.0, "guidance": 8.0},
    "sequential_w4_no_mid": {
        "bank_from": "sequential",
        "reference_noise": 0.0,
        "reference_strength": 4.0,
        "layers": ["down_blocks.*", "up_blocks.*"],
    },
    "sequential_w4_16px": {
        "bank_from": "sequential",
        "reference_noise": 0.0,
        "reference_strength": 4.0,
        "layers": ["up_blocks.2.*"],
    },
    # the references' and pictures' scene left out of the bank: only their inferred subject masks lend
    "sequential_w4_subject": {
        "bank_from": "sequential",
        "reference_noise": 0.0,
        "reference_strength": 4.0,
        "subject_only": True,
    },
    "sequential_w4_subject_d0": {
        "bank_from": "sequential",
        "reference_noise": 0.0,
        "reference_strength": 4.0,
        "subject_only": True,
        "mask_dilation": 0,
    },
    "sequential_w8_late35": {
        "bank_from": "sequential",
        "reference_noise": 0.0,
        "reference_strength": 8.0,
        "schedule": {"plain_fraction": 0.35, "stages": [[1.0, 0.9]]},
    },
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY, help="'tiny' (shipped) or a pipeline folder with the file")
    parser.add_argument("--count", type=int, default=12, help="built-in stories")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--only", default=None, help="comma-separated candidate names (default: all)")
    parser.add_argument(
        "--pictures",
        action="store_true",
        help="run each candidate as `eval --pictures`' picture_recommended arm (the character given by a picture)",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    recommended = read_recommended(resolve_model(args.model))
    if recommended is None:
        parser.error(f"{args.model} has no storydiffusion.json to start from")
    pipe = load_story_pipeline(args.model, RunOptions(device="cpu", progress=False), CSAConfig()).pipe
    classifier, clip = load_default_classifier(pipe.device), ClipScorer(resolve_clip(TINY), pipe.device)
    seeds = tuple(int(seed) for seed in args.seeds.split(","))
    table = {}
    names = args.only.split(",") if args.only else list(CANDIDATES)
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        parser.error(f"unknown candidates {unknown}; choose from {sorted(CANDIDATES)}")
    for name in names:
        change = dict(CANDIDATES[name])
        generation = {key: change.pop(key) for key in ("guidance", "steps") if key in change}
        candidate = dataclasses.replace(recommended, csa={**recommended.csa, **change}, **generation)
        settings = EvalSettings(seeds=seeds, recommended=candidate)
        stories = default_stories(args.count)
        if args.pictures:
            arm = "picture_recommended"
            scores = evaluate_pictures(pipe, stories, settings, classifier, clip, only=[arm])
        else:
            arm = "recommended"
            scores = evaluate(pipe, stories, settings, classifier, clip, only=[arm])
        table[name] = {key: round(value, 4) for key, value in scores[arm].items() if isinstance(value, float)}
        shown = "picture_agreement" if args.pictures else "identity_agreement"
        print(f"{name:>14}: {shown} {table[name][shown]:.3f}, "
              f"alignment {table[name]['prompt_alignment']:.3f}", flush=True)  # fmt: skip
    print(json.dumps({"model": args.model, "count": args.count, "pictures": args.pictures, "seeds": list(seeds),
                      "threads": args.threads,
                      "seconds": round(time.perf_counter() - started, 1), "candidates": table}))  # fmt: skip


if __name__ == "__main__":
    main()
