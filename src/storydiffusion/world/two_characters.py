"""Two characters in one frame, each keeping its own look: `storydiffusion eval --two-characters`.

A two-character story gives each character solo frames (its reference frames first) and then frames
showing both, written as the tiny world's two-figure captions: `[Bob], walking, and [Ann], running,
on a beach`. The world draws two figures side by side, the first named on the left (`world.sample_panel`),
so a joint frame's figures are matched to characters **by position**: the left half shows the character
named first. Each half is read by the attribute classifier through `figure_view`, which maps it onto the
framing of the one-figure panels the classifier was trained on.

Arms (same seeds, so the only difference is how the banks are read):

    baseline   CSA off
    unmasked   CSA on, masks off: every token of a joint frame reads both characters' banks
    masked     CSA on, subject masks inferred from the cross-attention of each character's tokens
    regions    CSA on, the masks given as boxes: left half for the first character, right half for the second
    regional_prompts  as regions, and each description read by the cross-attention only inside its box
    recommended_masked  the model's recommended settings (its storydiffusion.json: CSA, steps, guidance), masks
               inferred -- when the model has them

Scores per arm, over the joint frames (figures `f` of character `c`, solo frames `r` of `c` or of the other
character `o`, identity attributes `a` that the descriptions leave to the model):

- `own_identity_agreement`: mean over f, a and r of [f's a == r's a] with r among c's solo frames;
- `other_identity_agreement`: the same with r among o's solo frames;
- `swap_rate`: the share of figures that agree more with o's solo frames than with c's own;
- `prompt_alignment`: the share of frames (solo and joint) whose scene and every figure's pose are right;
  `joint_prompt_alignment` the same over joint frames only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from storydiffusion.csa.attention import CSAConfig
from storydiffusion.pipelines.frames import Frame
from storydiffusion.story.format import Story, StoryFormatError
from storydiffusion.world import render as world
from storydiffusion.world.eval import SCORED_IDENTITY, EvalSettings, parse_world_prompt

PAIR_ARMS: tuple[str, ...] = ("baseline", "unmasked", "masked", "regions", "regional_prompts")
PAIR_NAMES = ("Bob", "Ann")  # the characters of the built-in stories
HALF_BOXES = ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0))  # the regions arm's boxes: left, right

# Where a two-figure panel puts its figures and how big (`world._PLACEMENT_RANGES`) against a one-figure
# panel: centres near x = 0.28 / 0.72 at ~5/6 of the size, feet at the same height.
_VIEW_CENTRES = (0.28, 0.72)
_VIEW_SCALE = 1.2
_VIEW_FEET = 0.875


def figure_view(image: Image.Image, side: int) -> Image.Image:
    """One figure of a two-figure panel framed like a one-figure panel (same size as `image`).

    The half of the panel holding figure `side` (0 left, 1 right) is enlarged by 1.2 about the figure's
    centre and feet; what falls outside that half repeats the half's edge pixels (an arm or hair of the other
    figure that crosses the middle can still show). The classifier reads these views about as well as one-figure
    panels (measured: the docs' benchmarks page, measuring instrument).
    """
    if side not in (0, 1):
        raise ValueError(f"side={side} must be 0 (left figure) or 1 (right figure)")
    pixels = np.asarray(image.convert("RGB"))
    height, width, _ = pixels.shape
    half = pixels[:, : width // 2] if side == 0 else pixels[:, width // 2 :]
    centre = _VIEW_CENTRES[side] - 0.5 * side  # in fractions of the full width, from the half's left edge
    ys = _VIEW_FEET + ((np.arange(height) + 0.5) / height - _VIEW_FEET) / _VIEW_SCALE
    xs = centre + ((np.arange(width) + 0.5) / width - 0.5) / _VIEW_SCALE
    rows = np.clip((ys * height).astype(int), 0, height - 1)
    cols = np.clip((xs * width).astype(int), 0, half.shape[1] - 1)
    return Image.fromarray(np.ascontiguousarray(half[rows][:, cols]))


# ---------------------------------------------------------------------------------------------
# Stories
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairFrame:
    """What a frame of a two-character story asks for: who stands where, their poses, the scene."""

    characters: tuple[str, ...]  # one name (solo) or two, left to right
    poses: tuple[str, ...]  # one per character
    scene: str


@dataclass(frozen=True)
class PairStory:
    """A story to score: two characters, solo frames of each, frames showing both."""

    story: Story
    names: tuple[str, str]
    specified: Mapping[str, Mapping[str, str]]  # character -> identity attributes its description names
    truths: tuple[PairFrame, ...]

    @classmethod
    def from_story(cls, story: Story) -> PairStory:
        """Check that `story` can be scored and read its ground truth; raises StoryFormatError."""

        def fail(message: str, panel: Any = None, field: str = "frames") -> StoryFormatError:
            return StoryFormatError(message, story.source, panel.line if panel is not None else None, field)

        if len(story.characters) != 2:
            raise fail(
                f"a two-character eval story has exactly 2 characters, got {sorted(story.characters)}",
                None,
                "characters",
            )
        names = tuple(story.characters)
        truths = []
        for panel in story.panels:
            where = f"frame {panel.index + 1} ({panel.text!r})"
            if len(panel.characters) not in (1, 2):
                raise fail(f"{where} must show one character or both", panel)
            poses = tuple(world_poses(panel.prompt))
            scene = parse_world_prompt(panel.prompt).scene
            if len(poses) != len(panel.characters):
                raise fail(
                    f"{where} names {len(poses)} pose(s) of the tiny world for {len(panel.characters)} character(s); "
                    f"give each character one ({', '.join(world.POSES)}), e.g. '[Bob], walking, and [Ann], "
                    "running, on a beach'",
                    panel,
                )
            if scene is None:
                raise fail(
                    f"{where} names no scene of the tiny world ({', '.join(world.SCENE_PHRASES.values())})", panel
                )
            truths.append(PairFrame(panel.characters, poses, scene))
        # the story format already asks every character for id_length >= 1 solo frames (its references)
        if not any(len(t.characters) == 2 for t in truths):
            raise fail("no frame shows both characters: write e.g. '[Bob], walking, and [Ann], running, on a beach'")
        specified = {name: parse_world_prompt(story.characters[name].description).attributes for name in names}
        return cls(story, names, specified, tuple(truths))

    def unspecified(self, name: str) -> tuple[str, ...]:
        """The scored identity attributes character `name`'s description leaves to the model."""
        return tuple(a for a in SCORED_IDENTITY if a not in self.specified[name])


def world_poses(prompt: str) -> list[str]:
    """The tiny world's poses a prompt names, in order (the first figure's first)."""
    return re.findall(r"\b(" + "|".join(world.POSES) + r")\b", prompt.lower())


def default_pair_stories(count: int = 12, seed: int = 0, solo: int = 2, joint: int = 3) -> list[PairStory]:
    """`count` two-character stories drawn from `seed`: a boy or man and a girl or woman (kinds named, looks
    left to the model), `solo` frames of each alone (their reference frames), then `joint` frames of both."""
    rng = np.random.default_rng(seed)
    stories = []
    for _ in range(count):
        kinds = (str(rng.choice(("boy", "man"))), str(rng.choice(("girl", "woman"))))
        if rng.random() < 0.5:
            kinds = kinds[::-1]
        lines = []
        for name in PAIR_NAMES:
            for pose, scene in zip(rng.choice(world.POSES, solo, replace=False), rng.choice(world.SCENES, solo)):
                lines.append(f"[{name}], {pose} {world.SCENE_PHRASES[scene]}")
        for scene in rng.choice(world.SCENES, joint, replace=False):
            left, right = rng.choice(world.POSES, 2)
            first, second = PAIR_NAMES if rng.random() < 0.5 else PAIR_NAMES[::-1]
            lines.append(f"[{first}], {left}, and [{second}], {right}, {world.SCENE_PHRASES[scene]}")
        data = {
            "characters": {name: f"a {kind}" for name, kind in zip(PAIR_NAMES, kinds)},
            "frames": lines,
            "style": "No style",
            "id_length": solo,
        }
        source = f"<default two-character story {len(stories) + 1}>"
        stories.append(PairStory.from_story(Story.from_dict(data, source=source)))
    return stories


def load_pair_stories(path: str | Path) -> list[PairStory]:
    """Two-character stories from a file (one story, or `stories: [...]`), each checked by `PairStory`."""
    from storydiffusion.world.eval import read_stories_file

    return [PairStory.from_story(story) for story in read_stories_file(path)]


# ---------------------------------------------------------------------------------------------
# Scores (pure functions of predictions)
# ---------------------------------------------------------------------------------------------


def _agreement_with(figure: Mapping[str, str], others: Sequence[Mapping[str, str]], attributes: Sequence[str]) -> float:
    return float(np.mean([[figure.get(a) == other.get(a) for a in attributes] for other in others]))


def score_pairs(
    stories: Sequence[PairStory], predictions: Sequence[Sequence[Sequence[Mapping[str, str]]]]
) -> dict[str, float]:
    """The arm's scores (module doc) from its runs: `predictions[k][i]` holds one prediction per figure of
    frame i of run k (left to right), `stories[k]` is run k's story."""
    own, other, swaps, aligned, joint_aligned = [], [], [], [], []
    for story, frames in zip(stories, predictions):
        solo = {name: [p[0] for p, t in zip(frames, story.truths) if t.characters == (name,)] for name in story.names}
        for figures, truth in zip(frames, story.truths):
            right = all(f.get("scene") == truth.scene for f in figures) and all(
                f.get("pose") == pose for f, pose in zip(figures, truth.poses)
            )
            aligned.append(right)
            if len(truth.characters) < 2:
                continue
            joint_aligned.append(right)
            for figure, name in zip(figures, truth.characters):
                (partner,) = (n for n in story.names if n != name)
                attributes = [a for a in story.unspecified(name) if a in story.unspecified(partner)]
                if not attributes:
                    continue  # both descriptions name everything scored: nothing to keep
                mine = _agreement_with(figure, solo[name], attributes)
                theirs = _agreement_with(figure, solo[partner], attributes)
                own.append(mine)
                other.append(theirs)
                swaps.append(theirs > mine)
    nan = float("nan")
    return {
        "own_identity_agreement": float(np.mean(own)) if own else nan,
        "other_identity_agreement": float(np.mean(other)) if other else nan,
        "swap_rate": float(np.mean(swaps)) if swaps else nan,
        "prompt_alignment": float(np.mean(aligned)) if aligned else nan,
        "joint_prompt_alignment": float(np.mean(joint_aligned)) if joint_aligned else nan,
    }


def classify_frames(classifier: Any, images: Sequence[Image.Image], truths: Sequence[PairFrame]) -> list[list[dict]]:
    """One prediction per figure of each frame: the whole panel for a solo frame, `figure_view`s for a joint one."""
    views, owners = [], []
    for i, (image, truth) in enumerate(zip(images, truths)):
        sides = [image] if len(truth.characters) == 1 else [figure_view(image, s) for s in (0, 1)]
        views += sides
        owners += [i] * len(sides)
    predictions = classifier.predict(views)
    frames: list[list[dict]] = [[] for _ in images]
    for owner, prediction in zip(owners, predictions):
        frames[owner].append(prediction)
    return frames


# ---------------------------------------------------------------------------------------------
# Running the arms
# ---------------------------------------------------------------------------------------------


def pair_arm_settings(settings: EvalSettings) -> dict[str, tuple[CSAConfig, bool]]:
    """Arm name -> (CSA config, whether the joint frames carry the half-frame boxes as regions)."""
    csa = settings.csa
    return {
        "baseline": (CSAConfig(rate=0.0, layers=csa.layers, levels=csa.levels), False),
        "unmasked": (replace(csa, subject_masks="off"), False),
        "masked": (replace(csa, subject_masks="infer"), False),
        "regions": (replace(csa, subject_masks="infer"), True),
        "regional_prompts": (replace(csa, subject_masks="infer", regional_prompts=True), True),
        # the model's own settings (its storydiffusion.json, masks inferred), when it has them
        **(
            {"recommended_masked": (replace(settings.recommended.csa_config(), subject_masks="infer"), False)}
            if settings.recommended
            else {}
        ),
    }


def pair_frames(story: PairStory, regions: bool) -> list[Frame]:
    frames = story.story.to_frames()
    if not regions:
        return frames
    return [
        replace(frame, regions=dict(zip(truth.characters, HALF_BOXES))) if len(truth.characters) == 2 else frame
        for frame, truth in zip(frames, story.truths)
    ]


def evaluate_pairs(
    pipe: Any,
    stories: Sequence[PairStory],
    settings: EvalSettings,
    classifier: Any,
    on_story: Callable[[str, int, PairStory, list], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Generate every story with every seed in every arm (`PAIR_ARMS`, or `only`) and score them."""
    from storydiffusion.pipelines.story_pipeline import StoryPipeline

    arms = {name: arm for name, arm in pair_arm_settings(settings).items() if only is None or name in only}
    results: dict[str, Any] = {}
    total, done = len(arms) * len(stories) * len(settings.seeds), 0
    for arm, (config, regions) in arms.items():
        story_pipe = StoryPipeline(pipe, config)
        steps, guidance = settings.steps_and_guidance(arm == "recommended_masked")
        runs, predictions = [], []
        for seed in settings.seeds:
            for story in stories:
                out = story_pipe(
                    story.story.character_descriptions(),
                    pair_frames(story, regions),
                    id_length=story.story.settings.id_length,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    seed=seed,
                    progress=False,
                )
                runs.append(story)
                predictions.append(classify_frames(classifier, out.images, story.truths))
                if on_story is not None:
                    on_story(arm, seed, story, out.images)
                done += 1
                if progress is not None:
                    progress(done, total)
        results[arm] = score_pairs(runs, predictions)
    results["stories"] = len(stories)
    results["seeds"] = list(settings.seeds)
    results["matching"] = "by position: the left figure is the character a joint frame names first"
    return results
