"""Measuring consistency exactly in the tiny world: `storydiffusion eval`.

Every story is generated with the same seeds in every arm, so CSA's own effect is isolated:

    baseline          CSA off, every panel from its own initial noise
    shared_noise      CSA off, every panel from the same initial noise (the public code's prior)
    csa               CSA on (reference phase + identity bank), own noise
    csa_shared_noise  CSA on, shared noise
    csa_finished      CSA on, the bank made from the finished references (`CSAConfig.bank_from="finished"`)
    csa_sequential    CSA on, the references drawn one after another, each reading the ones before it
                      (`bank_from="sequential"`); both read their references clean (`reference_noise=0.0`)
                      unless the csa settings give a fixed level
    recommended       the model's own recommended settings (its `storydiffusion.json`: CSA settings, steps,
                      guidance), when it has them

and once more as a *strip*: all of a story's panels generated together with full mutual
self-attention at every layer and step -- the multi-panel canvas the tiny model was trained on, which
shows whether the model has the mechanism CSA borrows (`within_strip_agreement`).

Scores per arm (the attribute classifier, `world_classifier`, reads every panel):

- identity agreement: for each identity attribute the story's description leaves unspecified,
  the fraction of panel pairs of a story whose classified values agree; averaged over stories per
  attribute (`per_attribute`), then over attributes. Attributes the description names count toward
  alignment instead: the model is told them, agreeing on them proves nothing.
- prompt alignment: the fraction of panels whose classified pose, scene and specified attributes
  all match the prompt (a hair colour the drawing hides -- bald, or short hair under a hat -- is not
  checked); `misaligned` splits the misses: shares of panels with the wrong pose, scene, named attribute.
- CLIP-I (mean pairwise image-embedding cosine within a story) and CLIP-T (image vs its prompt),
  with any CLIPModel (`ClipScorer`); the tiny world's own CLIP by default.

Stories are in the project's story format; their prompts must be in the tiny world's grammar
("a girl with red hair, jumping on a beach") so the ground truth can be read back from them
(`parse_world_prompt`). A built-in set (`default_stories`) is drawn from a seed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from storydiffusion.csa.attention import CSAConfig, CSASchedule
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.pipelines.recommended import RecommendedSettings
from storydiffusion.story.format import Story, StoryFormatError
from storydiffusion.world import render as world
from storydiffusion.world.classifier import SCORED_IDENTITY_ATTRIBUTES, agreement

ARMS: tuple[str, ...] = ("baseline", "shared_noise", "csa", "csa_shared_noise", "csa_finished", "csa_sequential")
# Identity attributes the classifier reads reliably enough to score (see world_classifier.SCORED_ATTRIBUTES).
SCORED_IDENTITY: tuple[str, ...] = SCORED_IDENTITY_ATTRIBUTES
HERO = "Hero"  # the character's name in the built-in stories


# ---------------------------------------------------------------------------------------------
# Reading the ground truth back from the world's grammar
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldPrompt:
    """What a prompt in the tiny world's grammar asks for (one character)."""

    attributes: Mapping[str, str]  # identity attributes the prompt names (kind always, when a character is named)
    pose: str | None
    scene: str | None


_COLOUR = "|".join(world.COLOURS)
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("kind", re.compile(r"\b(boy|girl|man|woman)\b")),
    ("hair_style", re.compile(r"\b(bald)\b|\b(short|long|curly)\b(?: (?:" + _COLOUR + r"))? hair\b|\b(ponytail)\b")),
    ("hair_colour", re.compile(r"\b(" + _COLOUR + r") (?:hair|ponytail)\b")),
    ("skin_tone", re.compile(r"\b(" + "|".join(world.SKIN_TONES) + r") skin\b")),
    ("shirt_colour", re.compile(r"\b(" + _COLOUR + r") shirt\b")),
    ("trousers_colour", re.compile(r"\b(" + _COLOUR + r") (?:trousers|skirt)\b")),
    ("accessory", re.compile(r"\b(glasses|hat|cap)\b")),
)
_POSE = re.compile(r"\b(" + "|".join(world.POSES) + r")\b")


def parse_world_prompt(prompt: str) -> WorldPrompt:
    """The attributes, pose and scene a prompt in the tiny world's grammar names.

    >>> parse_world_prompt("a girl with curly red hair, wearing a cap, jumping on a beach").attributes
    {'kind': 'girl', 'hair_style': 'curly', 'hair_colour': 'red', 'accessory': 'cap'}
    """
    text = prompt.lower()
    attributes: dict[str, str] = {}
    for name, pattern in _PATTERNS:
        match = pattern.search(text)
        if match:
            attributes[name] = next(group for group in match.groups() if group)
    pose = _POSE.search(text)
    scene = next((kind for kind, phrase in world.SCENE_PHRASES.items() if phrase in text), None)
    return WorldPrompt(attributes, pose.group(1) if pose else None, scene)


@dataclass(frozen=True)
class EvalStory:
    """A story to score: one character in every panel, with what each panel's prompt asks for."""

    story: Story
    specified: Mapping[str, str]  # identity attributes the character's description names
    truths: tuple[WorldPrompt, ...]  # per panel

    @classmethod
    def from_story(cls, story: Story) -> EvalStory:
        """Check that `story` can be scored (one character, named alone in every panel, every prompt in the
        world's grammar with a pose and a scene) and read its ground truth; raises StoryFormatError."""
        if len(story.characters) != 1:
            raise StoryFormatError(
                f"an eval story has exactly one character (identity is scored per character), got "
                f"{len(story.characters)}: {sorted(story.characters)}",
                story.source,
                None,
                "characters",
            )
        (character,) = story.characters.values()
        truths = []
        for panel in story.panels:
            if panel.characters != (character.name,):
                raise StoryFormatError(
                    f"frame {panel.index + 1} ({panel.text!r}) must show [{character.name}] alone to be scored",
                    panel.source,
                    panel.line,
                    "frames",
                )
            truth = parse_world_prompt(panel.prompt)
            if truth.pose is None or truth.scene is None:
                raise StoryFormatError(
                    f"frame {panel.index + 1} ({panel.prompt!r}) names no {'pose' if truth.pose is None else 'scene'} "
                    f"of the tiny world (poses: {', '.join(world.POSES)}; scenes: "
                    f"{', '.join(world.SCENE_PHRASES.values())})",
                    panel.source,
                    panel.line,
                    "frames",
                )
            truths.append(truth)
        if len(truths) < 2:
            raise StoryFormatError("an eval story needs at least 2 frames to compare", story.source, None, "frames")
        specified = parse_world_prompt(character.description).attributes
        return cls(story, dict(specified), tuple(truths))

    @property
    def unspecified(self) -> tuple[str, ...]:
        """The scored identity attributes the model has to invent (and keep)."""
        return tuple(name for name in SCORED_IDENTITY if name not in self.specified)


def default_stories(count: int = 24, seed: int = 0, frames: int = 4, id_length: int = 2) -> list[EvalStory]:
    """`count` one-character stories in the world's grammar, drawn from `seed`.

    Each description names the kind only ("[Hero] a girl"), as the tiny model's training captions do:
    every scored identity attribute is the model's to invent, and to keep across the panels. Each of the
    `frames` panels has its own pose and scene.
    """
    rng = np.random.default_rng(seed)
    stories = []
    for _ in range(count):
        identity = world.Identity.random(rng)
        description = world.describe(identity, frozenset({"kind"}))
        poses = rng.choice(world.POSES, size=frames, replace=False)
        scenes = rng.choice(world.SCENES, size=frames, replace=False)
        lines = [f"[{HERO}], {pose} {world.SCENE_PHRASES[scene]}" for pose, scene in zip(poses, scenes)]
        data = {
            "characters": {HERO: description},
            "frames": lines,
            "style": "No style",
            "id_length": id_length,
        }
        stories.append(EvalStory.from_story(Story.from_dict(data, source=f"<default story {len(stories) + 1}>")))
    return stories


# ---------------------------------------------------------------------------------------------
# Scores (pure functions of predictions)
# ---------------------------------------------------------------------------------------------


def story_agreement(predictions: Sequence[Mapping[str, str]], attribute: str) -> float:
    """Fraction of panel pairs whose predicted `attribute` agrees (a hidden value is a value of its own)."""
    return agreement(predictions, (attribute,))


def panel_aligned(
    prediction: Mapping[str, str],
    truth: WorldPrompt,
    specified: Mapping[str, str],
    scored: Sequence[str] = SCORED_IDENTITY,
) -> bool:
    """Whether a panel shows the prompted pose and scene and every specified attribute among `scored`."""
    if prediction.get("pose") != truth.pose or prediction.get("scene") != truth.scene:
        return False
    for name, value in specified.items():
        if name not in scored:
            continue
        if name == "hair_colour" and "hair_colour" not in prediction:
            continue  # the drawing hides the hair: nothing to check
        if prediction.get(name) != value:
            return False
    return True


def score_arm(stories: Sequence[EvalStory], predictions: Sequence[Sequence[Mapping[str, str]]]) -> dict[str, Any]:
    """Identity agreement (mean and per attribute) and prompt alignment over story runs.

    One entry per run: `stories[k]` is the story of run k (a story run with several seeds appears
    once per seed) and `predictions[k]` its classified panels, in frame order. `misaligned` says what the
    panels got wrong: the share of panels with the wrong pose, the wrong scene, a wrong named attribute.
    """
    per_attribute: dict[str, list[float]] = {name: [] for name in SCORED_IDENTITY}
    aligned: list[bool] = []
    wrong: dict[str, list[bool]] = {"pose": [], "scene": [], "attributes": []}
    for story, panels in zip(stories, predictions):
        for name in story.unspecified:
            per_attribute[name].append(story_agreement(panels, name))
        for prediction, truth in zip(panels, story.truths):
            aligned.append(panel_aligned(prediction, truth, story.specified))
            wrong["pose"].append(prediction.get("pose") != truth.pose)
            wrong["scene"].append(prediction.get("scene") != truth.scene)
            right_attributes = panel_aligned({**prediction, "pose": truth.pose, "scene": truth.scene}, truth,
                                             story.specified)  # fmt: skip
            wrong["attributes"].append(not right_attributes)
    means = {name: float(np.mean(values)) for name, values in per_attribute.items() if values}
    return {
        "identity_agreement": float(np.mean(list(means.values()))) if means else float("nan"),
        "prompt_alignment": float(np.mean(aligned)) if aligned else float("nan"),
        "per_attribute": means,
        "misaligned": {part: float(np.mean(values)) if values else float("nan") for part, values in wrong.items()},
    }


# ---------------------------------------------------------------------------------------------
# Running the arms
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalSettings:
    steps: int = 20
    guidance: float = 4.0
    csa: CSAConfig = field(default_factory=CSAConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    # the model's storydiffusion.json: with it, the `recommended` arm (its CSA settings, steps and guidance)
    recommended: RecommendedSettings | None = None

    def steps_and_guidance(self, recommended_arm: bool = False) -> tuple[int, float]:
        """The steps and guidance of an arm: the eval's own, or the model's where a `recommended` arm sets them."""
        if not recommended_arm or self.recommended is None:
            return self.steps, self.guidance
        return self.recommended.steps or self.steps, self.recommended.guidance or self.guidance


@dataclass
class ArmRuns:
    """The story runs of one arm as they come, classified and CLIP-scored; `result()` is the arm's JSON entry."""

    classifier: Any
    clip: Any
    runs: list[EvalStory] = field(default_factory=list)
    predictions: list[list[dict[str, str]]] = field(default_factory=list)
    clip_i: list[float] = field(default_factory=list)
    clip_t: list[float] = field(default_factory=list)

    def add(self, story: EvalStory, images: Sequence[Any], prompts: Sequence[str]) -> list[dict[str, str]]:
        """Score one run's images (frame order); returns their classified attributes."""
        predicted = self.classifier.predict(images)
        self.runs.append(story)
        self.predictions.append(predicted)
        self.clip_i.append(self.clip.clip_i(images))
        self.clip_t.append(self.clip.clip_t(images, list(prompts)))
        return predicted

    def result(self) -> dict[str, Any]:
        scores = score_arm(self.runs, self.predictions)
        return {
            "identity_agreement": scores["identity_agreement"],
            "prompt_alignment": scores["prompt_alignment"],
            "clip_i": float(np.mean(self.clip_i)),
            "clip_t": float(np.mean(self.clip_t)),
            "per_attribute": scores["per_attribute"],
            "misaligned": scores["misaligned"],
        }


def strip_config() -> CSAConfig:
    """Full mutual self-attention on every layer at every step: the model's own multi-panel canvas."""
    return CSAConfig(rate=1.0, layers=("*",), schedule=CSASchedule.always())


def arm_settings(settings: EvalSettings) -> dict[str, tuple[CSAConfig, bool]]:
    """Arm name -> (CSA config, shared initial noise); `strip` is the within-strip measurement."""
    off = CSAConfig(rate=0.0, layers=settings.csa.layers, levels=settings.csa.levels)
    noise = 0.0 if settings.csa.reference_noise == "step" else settings.csa.reference_noise
    return {
        "baseline": (off, False),
        "shared_noise": (off, True),
        "csa": (settings.csa, False),
        "csa_shared_noise": (settings.csa, True),
        "csa_finished": (replace(settings.csa, bank_from="finished", reference_noise=noise), False),
        "csa_sequential": (replace(settings.csa, bank_from="sequential", reference_noise=noise), False),
        **({"recommended": (settings.recommended.csa_config(), False)} if settings.recommended else {}),
        "strip": (strip_config(), False),
    }


def evaluate(
    pipe: Any,
    stories: Sequence[EvalStory],
    settings: EvalSettings,
    classifier: Any,
    clip: Any,
    on_story: Callable[[str, int, EvalStory, list], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Generate every story with every seed in every arm (and as a strip) and score them.

    `pipe` is a diffusers StableDiffusion(XL)Pipeline; `classifier` an `AttributeClassifier`;
    `clip` a `ClipScorer`. `on_story(arm, seed, story, images)` sees every generated story (to save
    it); `progress(done, total)` counts story runs; `only` restricts the arms (names of `ARMS` and
    "strip"). Returns the JSON-ready result (see module doc).
    """
    from storydiffusion.pipelines.story_pipeline import StoryPipeline

    arms = {name: arm for name, arm in arm_settings(settings).items() if only is None or name in only}
    results: dict[str, Any] = {}
    total, done = len(arms) * len(stories) * len(settings.seeds), 0
    for arm, (config, shared_noise) in arms.items():
        story_pipe = StoryPipeline(pipe, config)
        steps, guidance = settings.steps_and_guidance(arm == "recommended")
        scored = ArmRuns(classifier, clip)
        for seed in settings.seeds:
            for story in stories:
                frames = story.story.to_frames()
                id_length = len(frames) if arm == "strip" else story.story.settings.id_length
                out = story_pipe(
                    story.story.character_descriptions(),
                    frames,
                    id_length=id_length,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    seed=seed,
                    same_initial_noise=shared_noise,
                    progress=False,
                )
                scored.add(story, out.images, [f.prompt for f in frames])
                if on_story is not None:
                    on_story(arm, seed, story, out.images)
                done += 1
                if progress is not None:
                    progress(done, total)
        results[arm] = scored.result()
    if "strip" in results:
        strip = results.pop("strip")
        results["within_strip_agreement"] = strip["identity_agreement"]
        results["within_strip"] = strip
    results["stories"] = len(stories)
    results["seeds"] = list(settings.seeds)
    return results


def check_stories(stories: Sequence[Story]) -> list[EvalStory]:
    """Eval stories from parsed stories; the first that cannot be scored raises StoryFormatError."""
    if not stories:
        raise StoryDiffusionError("no stories to evaluate")
    return [EvalStory.from_story(story) for story in stories]


def read_stories_file(path: str | Path) -> list[Story]:
    """Stories from a file: one story (the story file schema) or `stories: [story, ...]`."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise StoryFormatError(f"cannot read the stories file: {error}", str(path)) from None
    if isinstance(data, Mapping) and "stories" in data:
        entries = data["stories"]
        if not isinstance(entries, list) or not entries:
            raise StoryFormatError("`stories` must be a non-empty list of stories", str(path), None, "stories")
        return [Story.from_dict(entry, source=f"{path} (story {i + 1})") for i, entry in enumerate(entries)]
    return [Story.from_file(path)]


def load_eval_stories(path: str | Path) -> list[EvalStory]:
    """One-character eval stories from a file (`read_stories_file`), each checked by `EvalStory`."""
    return check_stories(read_stories_file(path))
