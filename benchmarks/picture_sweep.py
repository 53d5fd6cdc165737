"""How a character given by a picture is read, on the tiny model: noise level, strength, rate and layers.

Runs `world.picture_eval.evaluate_pictures` with the arms below in place of the eval's own (each story's
character given by a render of a held-out identity, in a pose and scene none of its frames uses) and prints,
last, one JSON object: per arm, picture agreement, identity agreement, prompt alignment, CLIP-I and CLIP-T.

    python benchmarks/picture_sweep.py --count 12 --seeds 0 [--model FOLDER] [--layers '*']
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from storydiffusion.app.runner import RunOptions, load_story_pipeline
from storydiffusion.clip_score import ClipScorer
from storydiffusion.csa.attention import CSAConfig
from storydiffusion.world import picture_eval
from storydiffusion.world.classifier import load_default_classifier
from storydiffusion.world.eval import EvalSettings, default_stories
from storydiffusion.world.models import TINY, resolve_clip


def arms(layers: tuple[str, ...], rate: float) -> dict[str, CSAConfig]:
    """No picture, then the picture clean or nearly clean (t = 3% of the schedule), weighted 1, 4 or 8 times."""
    read = dict(rate=rate, layers=layers)
    return {
        "no_picture": CSAConfig(rate=0.0, layers=layers),
        "clean_w1": CSAConfig(**read, reference_noise=0.0),
        "n03_w1": CSAConfig(**read, reference_noise=0.03),
        "clean_w4": CSAConfig(**read, reference_noise=0.0, reference_strength=4.0),
        "n03_w4": CSAConfig(**read, reference_noise=0.03, reference_strength=4.0),
        "clean_w8": CSAConfig(**read, reference_noise=0.0, reference_strength=8.0),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY, help="'tiny' (shipped) or a pipeline folder")
    parser.add_argument("--count", type=int, default=12, help="built-in stories")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--rate", type=float, default=1.0, help="CSA rate of the picture arms (1: every token)")
    parser.add_argument("--layers", default="up_blocks.*", help="CSA layer patterns, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    layers = tuple(pattern.strip() for pattern in args.layers.split(",") if pattern.strip())
    chosen = arms(layers, args.rate)
    settings = EvalSettings(seeds=tuple(int(seed) for seed in args.seeds.split(",")))
    pipe = load_story_pipeline(args.model, RunOptions(device="cpu", progress=False), CSAConfig()).pipe
    classifier = load_default_classifier(pipe.device)
    clip = ClipScorer(resolve_clip(TINY), pipe.device)
    original = picture_eval.picture_arm_settings
    picture_eval.picture_arm_settings = lambda _settings: chosen  # this run's arms, restored below
    try:
        result = picture_eval.evaluate_pictures(pipe, default_stories(args.count), settings, classifier, clip)
    finally:
        picture_eval.picture_arm_settings = original
    table = {
        arm: {key: round(value, 4) for key, value in scores.items() if isinstance(value, float)}
        for arm, scores in result.items()
        if isinstance(scores, dict)
    }
    for arm, scores in table.items():
        print(f"{arm:>12}: " + ", ".join(f"{key} {value:.3f}" for key, value in scores.items()), flush=True)
    summary = {"model": args.model, "count": args.count, "seeds": list(settings.seeds), "rate": args.rate,
               "layers": list(layers), "threads": args.threads, "seconds": round(time.perf_counter() - started, 1),
               "arms": table}  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
