"""The tiny-world evaluation: reading ground truth back from prompts, the scores, the story checks."""

import numpy as np
import pytest
import yaml

from storydiffusion.story.format import Story, StoryFormatError
from storydiffusion.world import render as world
from storydiffusion.world.eval import (
    SCORED_IDENTITY,
    EvalStory,
    WorldPrompt,
    default_stories,
    load_eval_stories,
    panel_aligned,
    parse_world_prompt,
    score_arm,
    story_agreement,
)


def test_parse_world_prompt_reads_back_every_caption_the_world_writes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        panel = world.sample_panel(rng, num_figures=1)
        parsed = parse_world_prompt(panel.caption)
        identity = panel.figures[0].identity
        said = {key for key in panel.mentioned if key not in ("scene", "pose")}
        expected = {name: getattr(identity, name) for name in world.VOCABULARIES if world.mention_key(name, 0) in said}
        assert parsed.attributes == expected, panel.caption
        assert parsed.pose == panel.figures[0].pose and parsed.scene == panel.scene.kind, panel.caption


def test_parse_world_prompt_without_pose_or_scene():
    parsed = parse_world_prompt("a man with glasses")
    assert parsed.attributes == {"kind": "man", "accessory": "glasses"}
    assert parsed.pose is None and parsed.scene is None


def test_default_stories_are_seeded_and_leave_attributes_to_invent():
    stories = default_stories(24, seed=0)
    again = default_stories(24, seed=0)
    other = default_stories(24, seed=1)
    assert len(stories) == 24
    descriptions = [s.story.characters["Hero"].description for s in stories]
    assert descriptions == [s.story.characters["Hero"].description for s in again]
    assert descriptions != [s.story.characters["Hero"].description for s in other]
    for story in stories:
        assert len(story.truths) == 4
        assert len({t.pose for t in story.truths}) == 4 and len({t.scene for t in story.truths}) == 4
        assert story.specified.keys() == {"kind"}  # the kind only: every scored attribute is invented
        assert set(story.unspecified) == {"skin_tone", "shirt_colour", "trousers_colour", "accessory"}


def test_story_agreement_counts_pairs():
    panels = [{"shirt_colour": "red"}, {"shirt_colour": "red"}, {"shirt_colour": "blue"}]
    assert story_agreement(panels, "shirt_colour") == pytest.approx(1 / 3)
    assert story_agreement([{}, {}], "hair_colour") == 1.0  # two hidden hair colours agree


def _story(description: str, frames: list[str]) -> EvalStory:
    return EvalStory.from_story(
        Story.from_dict({"characters": {"Hero": description}, "frames": frames, "id_length": 1})
    )


def test_panel_aligned_checks_pose_scene_and_specified_attributes():
    truth = WorldPrompt({"kind": "boy", "shirt_colour": "red"}, "jumping", "beach")
    right = {"kind": "boy", "shirt_colour": "red", "pose": "jumping", "scene": "beach", "hair_colour": "blue"}
    assert panel_aligned(right, truth, truth.attributes)
    assert not panel_aligned({**right, "pose": "sitting"}, truth, truth.attributes)
    assert not panel_aligned({**right, "scene": "snow"}, truth, truth.attributes)
    assert not panel_aligned({**right, "shirt_colour": "blue"}, truth, truth.attributes)
    hair = {"kind": "boy", "hair_colour": "red"}
    with_hair = ("kind", "hair_colour")
    assert panel_aligned({**right, "hair_colour": "red"}, truth, hair, with_hair)
    assert not panel_aligned({**right, "hair_colour": "pink"}, truth, hair, with_hair)
    hidden = {k: v for k, v in right.items() if k != "hair_colour"}
    assert panel_aligned(hidden, truth, hair, with_hair)  # a hidden hair colour is not checked
    assert panel_aligned({**right, "hair_colour": "pink"}, truth, hair, ("kind",))  # not scored: not checked


def test_score_arm_scores_only_unspecified_attributes_for_identity():
    story = _story("a boy with a red shirt", ["[Hero], jumping on a beach", "[Hero], sitting in the snow"])
    assert "shirt_colour" not in story.unspecified and "kind" not in story.unspecified
    same = {"kind": "boy", "skin_tone": "tan", "trousers_colour": "blue", "accessory": "none"}
    panels = [
        {**same, "shirt_colour": "red", "pose": "jumping", "scene": "beach"},
        {**same, "shirt_colour": "green", "pose": "sitting", "scene": "snow"},
    ]
    scores = score_arm([story], [panels])
    assert scores["identity_agreement"] == 1.0  # the shirt differs, but it was specified
    assert scores["prompt_alignment"] == 0.5  # ... and wrong in the second panel
    assert scores["misaligned"] == {"pose": 0.0, "scene": 0.0, "attributes": 0.5}
    panels[0]["pose"] = "sitting"
    assert score_arm([story], [panels])["misaligned"] == {"pose": 0.5, "scene": 0.0, "attributes": 0.5}
    panels[0]["pose"] = "jumping"
    assert set(scores["per_attribute"]) == set(story.unspecified)
    panels[1]["skin_tone"] = "dark"
    assert score_arm([story], [panels])["per_attribute"]["skin_tone"] == 0.0
    assert set(SCORED_IDENTITY) >= set(story.unspecified)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"characters": {"A": "a boy", "B": "a girl"}, "frames": ["[A], jumping on a beach"]}, "exactly one character"),
        ({"characters": {"A": "a boy"}, "frames": ["[A] on a beach", "[A], sitting in a room"]}, "names no pose"),
        ({"characters": {"A": "a boy"}, "frames": ["[A], jumping", "[A], sitting in a room"]}, "names no scene"),
        ({"characters": {"A": "a boy"}, "frames": ["[A], jumping on a beach", "[NC] a beach"]}, "alone"),
        ({"characters": {"A": "a boy"}, "frames": ["[A], jumping on a beach"]}, "at least 2 frames"),
    ],
)
def test_unscorable_stories_are_refused_with_the_reason(data, message):
    with pytest.raises(StoryFormatError, match=message):
        EvalStory.from_story(Story.from_dict({**data, "id_length": 1}))


def test_load_eval_stories_reads_one_story_or_a_list(tmp_path):
    story = {
        "characters": {"Kid": "a girl with pink hair"},
        "frames": ["[Kid], waving at night", "[Kid], running in a forest"],
    }
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({**story, "id_length": 1}))
    (loaded,) = load_eval_stories(one)
    assert loaded.specified == {"kind": "girl", "hair_colour": "pink"}
    many = tmp_path / "many.yaml"
    many.write_text(yaml.safe_dump({"stories": [{**story, "id_length": 1}] * 3}))
    assert len(load_eval_stories(many)) == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stories": [{**story, "frames": ["[Kid] somewhere", "[Kid] elsewhere"]}]}))
    with pytest.raises(StoryFormatError, match="bad.yaml"):
        load_eval_stories(bad)
