"""Characters given by a picture, measured exactly in the tiny world: `storydiffusion eval --pictures`.

Each one-character story's character is given by a ground-truth render of a held-out identity (its kind
and whatever its description names; every other attribute drawn from the story's own seed), in a pose and
a scene none of the story's frames uses; every frame is drawn reading it. Arms:

    no_picture        CSA off, no picture: what the prompts alone give (chance on the unnamed attributes)
    picture_step      the picture read at each step's own noise level (reference_noise="step")
    picture_clean     the picture read clean (reference_noise=0.0)
    picture_clean_w4  the same with its tokens weighted 4x (reference_strength=4)
    picture_recommended  the model's recommended CSA settings (its storydiffusion.json), when it has them

Scores per arm: `picture_agreement` -- over frames and the scored identity attributes the description does
not name, the share the classifier reads as the picture's ground truth --, `identity_agreement` among the
frames and `prompt_alignment` (`world.eval.score_arm`), CLIP-I and CLIP-T.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from storydiffusion.csa.attention import CSAConfig
from storydiffusion.world import render as world
from storydiffusion.world.classifier import visible_truth
from storydiffusion.world.eval import ArmRuns, EvalSettings, EvalStory

PICTURE_ARMS: tuple[str, ...] = ("no_picture", "picture_step", "picture_clean", "picture_clean_w4")
PICTURE_SIZE = 64  # the tiny world's panel size; the pipeline fits pictures to the story's size anyway


def picture_panel(story: EvalStory, rng: np.random.Generator) -> world.Panel:
    """A one-figure panel of a random identity with the attributes the story's description names, in a pose
    and a scene none of its frames uses (any, when the frames use them all)."""
    identity = dataclasses.replace(world.Identity.random(rng), **dict(story.specified))
    used_poses = {truth.pose for truth in story.truths}
    used_scenes = {truth.scene for truth in story.truths}
    poses = [pose for pose in world.POSES if pose not in used_poses] or list(world.POSES)
    scenes = [scene for scene in world.SCENES if scene not in used_scenes] or list(world.SCENES)
    pose, scene = str(rng.choice(poses)), str(rng.choice(scenes))
    return world.sample_panel(rng, identity, 1, omit_probability=1.0, pose=pose, scene=scene)


def picture_agreement(
    predictions: Sequence[Mapping[str, str]], truth: Mapping[str, str], attributes: Sequence[str]
) -> float:
    """Share of (frame, attribute) pairs whose predicted value is the picture's (a hidden hair colour: a value)."""
    hits = [prediction.get(name) == truth.get(name) for prediction in predictions for name in attributes]
    return float(np.mean(hits)) if hits else float("nan")


def picture_arm_settings(settings: EvalSettings) -> dict[str, CSAConfig]:
    """Arm name -> CSA config (`no_picture` runs with CSA off and no picture)."""
    base = settings.csa
    return {
        "no_picture": CSAConfig(rate=0.0, layers=base.layers, levels=base.levels),
        "picture_step": dataclasses.replace(base, reference_noise="step"),
        "picture_clean": dataclasses.replace(base, reference_noise=0.0),
        "picture_clean_w4": dataclasses.replace(base, reference_noise=0.0, reference_strength=4.0),
        # the model's own settings (its storydiffusion.json), when it has them
        **({"picture_recommended": settings.recommended.csa_config()} if settings.recommended else {}),
    }


def evaluate_pictures(
    pipe: Any,
    stories: Sequence[EvalStory],
    settings: EvalSettings,
    classifier: Any,
    clip: Any,
    on_story: Callable[[str, int, EvalStory, list], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    only: Sequence[str] | None = None,
    picture_seed: int = 0,
) -> dict[str, Any]:
    """Generate every story with every seed in every picture arm and score them (see the module doc).

    Story k's picture is drawn from (`picture_seed`, k): the same in every arm and seed. `on_story(arm, seed,
    story, images)` sees each run's images, the picture first (to save them)."""
    from storydiffusion.pipelines.story_pipeline import StoryPipeline

    panels = [picture_panel(story, np.random.default_rng([picture_seed, k])) for k, story in enumerate(stories)]
    pictures = [world.render_panel(panel, PICTURE_SIZE) for panel in panels]
    arms = {name: config for name, config in picture_arm_settings(settings).items() if only is None or name in only}
    results: dict[str, Any] = {}
    total, done = len(arms) * len(stories) * len(settings.seeds), 0
    for arm, config in arms.items():
        story_pipe = StoryPipeline(pipe, config)
        steps, guidance = settings.steps_and_guidance(arm == "picture_recommended")
        scored, agreements = ArmRuns(classifier, clip), []
        for seed in settings.seeds:
            for story, panel, picture in zip(stories, panels, pictures):
                frames = story.story.to_frames()
                (name,) = story.story.characters
                given = {} if arm == "no_picture" else {name: [picture]}
                out = story_pipe(
                    story.story.character_descriptions(),
                    frames,
                    id_length=min(story.story.settings.id_length, len(frames)),
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    seed=seed,
                    character_images=given,
                    progress=False,
                )
                images: list[Image.Image] = out.images
                classified = scored.add(story, images, [f.prompt for f in frames])
                agreements.append(picture_agreement(classified, visible_truth(panel), story.unspecified))
                if on_story is not None:
                    on_story(arm, seed, story, [picture, *images])
                done += 1
                if progress is not None:
                    progress(done, total)
        results[arm] = {"picture_agreement": float(np.mean(agreements)), **scored.result()}
    results["stories"] = len(stories)
    results["seeds"] = list(settings.seeds)
    return results
