"""Whether the demo's characters stay the same: the demo story drawn with a model (the shipped tiny one by default)
at some seeds, and per character the scored identity attributes the classifier reads in every panel it is in
(its solo panels, and its half of the two-character panel); prints one line per seed and, last, one JSON object.

    python benchmarks/demo_consistency.py --seeds 0,1,2

`all_same`: every scored attribute the same in all of the character's panels (what the instrument issue asks of
the demo); `agreement`: the share of scored attributes that are; `kinds`: the kind read in each panel.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from storydiffusion.app.runner import RunOptions, run_story
from storydiffusion.story.examples import DEMO_CHARACTERS, DEMO_FRAMES
from storydiffusion.story.format import Story, StorySettings
from storydiffusion.world.classifier import SCORED_IDENTITY_ATTRIBUTES, load_default_classifier
from storydiffusion.world.models import TINY
from storydiffusion.world.two_characters import figure_view

# the demo's panels: Mia alone in 0 and 1, Leo alone in 2 and 3, both in 4 (Mia left, Leo right)
VIEWS = {"Mia": ((0, None), (1, None), (4, 0)), "Leo": ((2, None), (3, None), (4, 1))}


def character_report(classifier, images: list[Image.Image]) -> dict:
    predictions = classifier.predict(images)
    attributes = [name for name in SCORED_IDENTITY_ATTRIBUTES if name != "kind"]  # the description names the kind
    same = {name: len({p.get(name) for p in predictions}) == 1 for name in attributes}
    return {
        "all_same": all(same.values()),
        "agreement": round(sum(same.values()) / len(same), 3),
        "differs": sorted(name for name, ok in same.items() if not ok),
        "kinds": [p.get("kind") for p in predictions],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY, help="'tiny' (shipped) or a pipeline folder")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    classifier = load_default_classifier()
    runs = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        settings = StorySettings(seed=seed, style="No style", model=args.model)
        story = Story.from_text(DEMO_CHARACTERS, DEMO_FRAMES, settings, given=["seed", "style", "model"])
        with tempfile.TemporaryDirectory() as folder:
            result = run_story(story, folder, RunOptions(device="cpu", progress=False, model=args.model))
            panels = [Image.open(Path(path)).convert("RGB") for path in result.panels]
        runs[seed] = {
            name: character_report(
                classifier, [panels[i] if half is None else figure_view(panels[i], half) for i, half in views]
            )
            for name, views in VIEWS.items()
        }
        print(seed, json.dumps(runs[seed]), flush=True)
    kept = {name: sum(run[name]["all_same"] for run in runs.values()) for name in VIEWS}
    print(json.dumps({"model": args.model, "seeds": list(runs), "seconds": round(time.perf_counter() - started, 1),
                      "all_same_runs": kept, "runs": runs}))  # fmt: skip


if __name__ == "__main__":
    main()
