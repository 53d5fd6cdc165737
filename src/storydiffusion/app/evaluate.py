"""`storydiffusion eval`: load the model, the classifier and the CLIP, run the tiny world's evaluation
(`storydiffusion.world.eval`, or `storydiffusion.world.two_characters` with `--two-characters`) and
optionally save every generated story as a strip."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from PIL import Image

from storydiffusion.app.runner import RunOptions, load_story_pipeline
from storydiffusion.world.eval import EvalSettings, EvalStory, default_stories, evaluate, load_eval_stories
from storydiffusion.world.two_characters import PairStory


def run_eval(
    model: str,
    settings: EvalSettings,
    stories: str | Path | None = None,
    count: int = 24,
    clip_model: str = "tiny",
    device: str = "auto",
    images_dir: str | Path | None = None,
    two_characters: bool = False,
    pictures: bool = False,
) -> dict[str, Any]:
    """`storydiffusion eval`: load everything, run `evaluate` (or, with `two_characters`, `evaluate_pairs` on
    two-character stories; with `pictures`, `evaluate_pictures`), optionally save every story as a strip."""
    from tqdm.auto import tqdm

    from storydiffusion.clip_score import ClipScorer
    from storydiffusion.world.classifier import load_default_classifier
    from storydiffusion.world.models import resolve_clip
    from storydiffusion.world.two_characters import default_pair_stories, evaluate_pairs, load_pair_stories

    if two_characters:
        eval_stories: list = load_pair_stories(stories) if stories is not None else default_pair_stories(count)
    else:
        eval_stories = load_eval_stories(stories) if stories is not None else default_stories(count)
    # The story command's loader (device, dtype, `tiny`, clear errors); each arm wraps the pipe in its own CSA.
    story_pipe = load_story_pipeline(model, RunOptions(device=device, progress=False), settings.csa)
    pipe = story_pipe.pipe
    if settings.recommended is None and story_pipe.recommended is not None:  # the `recommended` arm
        settings = dataclasses.replace(settings, recommended=story_pipe.recommended)
    classifier = load_default_classifier(pipe.device)

    on_story = None
    if images_dir is not None:
        folder = Path(images_dir)
        folder.mkdir(parents=True, exist_ok=True)
        index = {id(s): i for i, s in enumerate(eval_stories)}

        def on_story(arm: str, seed: int, story: EvalStory | PairStory, images: list) -> None:
            strip = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)))
            x = 0
            for image in images:
                strip.paste(image, (x, 0))
                x += image.width
            strip.save(folder / f"story{index[id(story)]:02d}_seed{seed}_{arm}.png")

    with tqdm(total=1, desc="story runs", unit="story") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        if two_characters:
            return evaluate_pairs(pipe, eval_stories, settings, classifier, on_story=on_story, progress=progress)
        clip = ClipScorer(resolve_clip(clip_model), pipe.device)
        if pictures:
            from storydiffusion.world.picture_eval import evaluate_pictures

            return evaluate_pictures(
                pipe, eval_stories, settings, classifier, clip, on_story=on_story, progress=progress
            )
        return evaluate(pipe, eval_stories, settings, classifier, clip, on_story=on_story, progress=progress)
