"""The two-character evaluation: figure views the classifier reads, the scores, the story checks, the CLI."""

import json
import sys
from dataclasses import replace

import numpy as np
import pytest

from storydiffusion.app import cli
from storydiffusion.pipelines.recommended import RecommendedSettings
from storydiffusion.story.format import Story, StoryFormatError
from storydiffusion.world import render as world
from storydiffusion.world.classifier import load_default_classifier
from storydiffusion.world.eval import EvalSettings
from storydiffusion.world.two_characters import (
    HALF_BOXES,
    PairFrame,
    PairStory,
    default_pair_stories,
    figure_view,
    pair_arm_settings,
    pair_frames,
    score_pairs,
    world_poses,
)


def test_figure_views_are_read_like_one_figure_panels():
    """Each half of a rendered two-figure panel, framed by `figure_view`, is classified as that figure."""
    classifier = load_default_classifier()
    rng = np.random.default_rng(11)
    panels = [world.sample_panel(rng, num_figures=2) for _ in range(48)]
    images = [world.render_panel(panel) for panel in panels]
    hits: dict[str, list[bool]] = {}
    for side in (0, 1):
        predictions = classifier.predict([figure_view(image, side) for image in images])
        for prediction, panel in zip(predictions, panels):
            figure = panel.figures[side]
            truth = {**figure.identity.attributes(), "pose": figure.pose, "scene": panel.scene.kind}
            for name in ("kind", "skin_tone", "shirt_colour", "trousers_colour", "pose", "scene"):
                hits.setdefault(name, []).append(prediction[name] == truth[name])
    accuracy = {name: float(np.mean(h)) for name, h in hits.items()}
    assert min(accuracy.values()) >= 0.9, accuracy
    with pytest.raises(ValueError, match="side"):
        figure_view(images[0], 2)


def _story(frames, characters=None):
    data = {"characters": characters or {"Bob": "a boy", "Ann": "a girl"}, "frames": frames, "id_length": 1}
    return Story.from_dict(data)


def test_pair_story_reads_who_stands_where_and_their_poses():
    story = PairStory.from_story(
        _story(
            [
                "[Bob], walking in a forest",
                "[Ann], sitting on a beach",
                "[Ann], running, and [Bob], waving, in the snow",
            ]
        )
    )
    assert story.truths[2] == PairFrame(("Ann", "Bob"), ("running", "waving"), "snow")
    assert story.unspecified("Bob") == ("skin_tone", "shirt_colour", "trousers_colour", "accessory")
    assert world_poses("a boy, jumping, and a girl, sitting, in a room") == ["jumping", "sitting"]


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (["[Bob], walking in a forest", "[Ann], walking, and [Bob], waving, in a room"], r"show only \[Ann\]"),
        (["[Bob], walking in a forest", "[Ann], sitting on a beach"], "no frame shows both"),
        (["[Bob], walking in a forest", "[Ann], sitting on a beach", "[Ann] and [Bob], waving, in a room"], "1 pose"),
        (["[Bob], walking", "[Ann], sitting on a beach", "[Ann], waving, and [Bob], waving, in a room"], "no scene"),
    ],
)
def test_unscorable_pair_stories_are_refused_with_the_reason(frames, message):
    with pytest.raises(StoryFormatError, match=message):
        PairStory.from_story(_story(frames))
    with pytest.raises(StoryFormatError, match="exactly 2 characters"):
        PairStory.from_story(_story(["[A], walking in a forest"], {"A": "a boy"}))


def _looks(skin, shirt, trousers, accessory, pose="walking", scene="forest"):
    return {
        "skin_tone": skin,
        "shirt_colour": shirt,
        "trousers_colour": trousers,
        "accessory": accessory,
        "pose": pose,
        "scene": scene,
    }


def test_scores_tell_kept_identities_from_swapped_ones():
    story = PairStory.from_story(
        _story(
            [
                "[Bob], walking in a forest",
                "[Ann], walking in a forest",
                "[Bob], walking, and [Ann], sitting, in a forest",
            ]
        )
    )
    bob, ann = _looks("light", "red", "blue", "hat"), _looks("dark", "green", "black", "none")
    kept = [[bob], [ann], [bob, {**ann, "pose": "sitting"}]]
    swapped = [[bob], [ann], [{**ann, "pose": "walking"}, {**bob, "pose": "sitting"}]]
    scores = score_pairs([story], [kept])
    assert scores["own_identity_agreement"] == 1.0 and scores["other_identity_agreement"] == 0.0
    assert scores["swap_rate"] == 0.0
    assert scores["prompt_alignment"] == 1.0 and scores["joint_prompt_alignment"] == 1.0
    scores = score_pairs([story], [swapped])
    assert scores["own_identity_agreement"] == 0.0 and scores["swap_rate"] == 1.0
    blended = [[bob], [ann], [{**bob, "shirt_colour": "green"}, {**ann, "pose": "walking"}]]
    scores = score_pairs([story], [blended])
    assert scores["own_identity_agreement"] == pytest.approx((3 / 4 + 1) / 2)
    assert scores["joint_prompt_alignment"] == 0.0  # Ann should be sitting
    assert scores["prompt_alignment"] == pytest.approx(2 / 3)


def test_default_pair_stories_are_seeded_and_scorable():
    first, again = default_pair_stories(3, seed=4), default_pair_stories(3, seed=4)
    assert [s.story.panels[-1].prompt for s in first] == [s.story.panels[-1].prompt for s in again]
    for story in first:
        joint = [t for t in story.truths if len(t.characters) == 2]
        assert len(joint) == 3 and all(len(set(t.characters)) == 2 for t in joint)
        assert story.specified["Bob"].keys() == {"kind"} and story.story.settings.id_length == 2
        frames = pair_frames(story, regions=True)
        for frame, truth in zip(frames, story.truths):
            expected = dict(zip(truth.characters, HALF_BOXES)) if len(truth.characters) == 2 else None
            assert frame.regions == expected


def test_eval_two_characters_end_to_end(monkeypatch, capsys, tmp_path):
    out = tmp_path / "pairs.json"
    argv = ["storydiffusion", "eval", "--two-characters", "--count", "1", "--seeds", "0", "--steps", "2"]
    argv += ["--device", "cpu", "--json", str(out), "--images", str(tmp_path / "images")]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        cli.main()
    except SystemExit as stop:
        assert not stop.code
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    for arm in ("baseline", "unmasked", "masked", "regions", "regional_prompts", "recommended_masked"):
        assert set(printed[arm]) == {
            "own_identity_agreement",
            "other_identity_agreement",
            "swap_rate",
            "prompt_alignment",
            "joint_prompt_alignment",
        }
        assert 0.0 <= printed[arm]["own_identity_agreement"] <= 1.0
    assert printed["stories"] == 1 and "by position" in printed["matching"]
    assert len(list((tmp_path / "images").glob("*.png"))) == 6


def test_the_recommended_arm_reads_the_models_settings_with_masks():
    recommended = RecommendedSettings.from_dict(
        {"csa": {"rate": 1.0, "bank_from": "sequential", "reference_noise": 0.0, "subject_masks": "off"}, "steps": 7}
    )
    arms = pair_arm_settings(EvalSettings(recommended=recommended))
    config, regions = arms["recommended_masked"]
    assert config == replace(recommended.csa_config(), subject_masks="infer") and not regions
    assert EvalSettings(recommended=recommended).steps_and_guidance(True) == (7, 4.0)
    assert "recommended_masked" not in pair_arm_settings(EvalSettings())
