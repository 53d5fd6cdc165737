"""The tiny world renderer: determinism, every attribute visible, captions' grammar and ground truth."""

import math
import re
from dataclasses import replace
from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storydiffusion.world import render as w

BASE = w.Identity("man", "red", "short", "tan", "blue", "black", "none")
CENTRE = w.Placement(0.5, 0.92, 0.8, 1)


def panel_of(*figures: w.Figure, scene: str = "snow", seed: int = 1) -> w.Panel:
    return w.Panel(w.Scene(scene, seed), tuple(figures), "", frozenset())


def pixels(panel: w.Panel, size: int = 64) -> np.ndarray:
    return np.asarray(w.render_panel(panel, size), dtype=np.int16)


def median_colour(image: np.ndarray, box: tuple[float, float, float, float], keep: float = 0.5) -> np.ndarray:
    """Median RGB of the central `keep` fraction of a pixel box."""
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * (1 - keep) / 2, (y1 - y0) * (1 - keep) / 2
    region = image[round(y0 + my) : round(y1 - my) + 1, round(x0 + mx) : round(x1 - mx) + 1]
    return np.median(region.reshape(-1, 3), axis=0)


def captions(n: int, seed: int = 0, **kwargs) -> list[tuple[w.Figure, str, frozenset[str]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        figure = w.Figure(w.Identity.random(rng), str(rng.choice(w.POSES)), CENTRE)
        scene = w.Scene(str(rng.choice(w.SCENES)), 0)
        out.append((figure, *w.caption_for([figure], scene, rng, **kwargs)))
    return out


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_same_pixels_different_seed_different_pixels():
    def draw(seed: int) -> bytes:
        panel = w.sample_panel(np.random.default_rng(seed), num_figures=2)
        return w.render_panel(panel).tobytes()

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    strip_a, panels_a = w.sample_strip(np.random.default_rng(3))
    strip_b, panels_b = w.sample_strip(np.random.default_rng(3))
    assert strip_a.tobytes() == strip_b.tobytes() and panels_a == panels_b


def test_scene_props_follow_the_scene_seed():
    assert pixels(panel_of(scene="forest", seed=1)).tolist() == pixels(panel_of(scene="forest", seed=1)).tolist()
    assert not np.array_equal(pixels(panel_of(scene="forest", seed=1)), pixels(panel_of(scene="forest", seed=2)))


# --- every attribute, pose and scene is drawn ----------------------------------------------


@pytest.mark.parametrize("attribute", list(w.VOCABULARIES))
def test_every_value_of_every_attribute_renders_differently(attribute):
    images = [
        pixels(panel_of(w.Figure(replace(BASE, **{attribute: value}), "standing", CENTRE)))
        for value in w.VOCABULARIES[attribute]
    ]
    for (i, a), (j, b) in combinations(enumerate(images), 2):
        assert not np.array_equal(a, b), f"{attribute}: {w.VOCABULARIES[attribute][i]} looks like ...[{j}]"


def test_hair_colour_of_a_bald_head_is_not_drawn():
    bald = replace(BASE, hair_style="bald")
    a = pixels(panel_of(w.Figure(bald, "standing", CENTRE)))
    b = pixels(panel_of(w.Figure(replace(bald, hair_colour="blue"), "standing", CENTRE)))
    assert np.array_equal(a, b)
    assert "hair_colour" not in bald.visible_attributes() and "hair_colour" in BASE.visible_attributes()


@pytest.mark.parametrize("colour", w.SHIRT_COLOURS)
def test_shirt_colour_fills_the_torso(colour):
    figure = w.Figure(replace(BASE, shirt_colour=colour), "standing", CENTRE)
    found = median_colour(pixels(panel_of(figure)), w.part_boxes(figure)["torso"])
    assert np.abs(found - w.COLOURS[colour]).max() <= 6, (colour, found)


@pytest.mark.parametrize("colour", w.HAIR_COLOURS)
def test_hair_colour_covers_the_top_of_the_head(colour):
    figure = w.Figure(replace(BASE, hair_colour=colour), "standing", CENTRE)
    x0, y0, x1, y1 = w.part_boxes(figure)["head"]
    r = (x1 - x0) / 2
    crown = (x0 + 0.6 * r, y0 + 0.05 * r, x1 - 0.6 * r, y0 + 0.55 * r)
    found = median_colour(pixels(panel_of(figure)), crown, keep=1.0)
    assert np.abs(found - w.COLOURS[colour]).max() <= 10, (colour, found)


@pytest.mark.parametrize("colour", w.TROUSERS_COLOURS)
@pytest.mark.parametrize("kind", ["man", "woman"])
def test_trousers_or_skirt_colour_below_the_hips(colour, kind):
    figure = w.Figure(replace(BASE, kind=kind, trousers_colour=colour), "standing", CENTRE)
    x0, y0, x1, y1 = w.part_boxes(figure)["legs"]
    upper_legs = (x0, y0, x1, y0 + 0.35 * (y1 - y0))  # thighs, or the skirt
    found = median_colour(pixels(panel_of(figure)), upper_legs)
    assert np.abs(found - w.COLOURS[colour]).max() <= 10, (colour, kind, found)


def test_every_pose_renders_and_poses_differ():
    images = [pixels(panel_of(w.Figure(BASE, pose, CENTRE, 0.25))) for pose in w.POSES]
    for a, b in combinations(images, 2):
        assert np.abs(a - b).sum() > 1000


def test_every_scene_renders_and_scenes_differ():
    images = [pixels(panel_of(scene=kind)) for kind in w.SCENES]
    means = [im.reshape(-1, 3).mean(axis=0) for im in images]
    for a, b in combinations(means, 2):
        assert np.abs(a - b).max() > 5


def test_pose_is_smooth_across_the_phase_wrap():
    for pose in w.POSES:
        a, b = w.pose_angles(pose, 0.0), w.pose_angles(pose, 1.0 - 1e-9)
        flat = lambda p: np.array([*np.ravel(p.legs), *np.ravel(p.arms), p.lift])  # noqa: E731
        assert np.allclose(flat(a), flat(b), atol=1e-5), pose


def test_jumping_lifts_the_figure_and_facing_mirrors_it():
    ground = w.part_boxes(w.Figure(BASE, "jumping", CENTRE, 0.0))["legs"]
    air = w.part_boxes(w.Figure(BASE, "jumping", CENTRE, 0.5))["legs"]
    assert air[3] < ground[3] - 5
    right = pixels(panel_of(w.Figure(BASE, "walking", CENTRE, 0.25), scene="snow"))
    left = pixels(panel_of(w.Figure(BASE, "walking", replace(CENTRE, facing=-1), 0.25), scene="snow"))
    assert not np.array_equal(right, left)


# --- captions ------------------------------------------------------------------------------


def said_attributes(identity: w.Identity, caption: str) -> set[str]:
    """Which identity attributes a caption states, read back from its words."""
    said = set()
    style, colour = identity.hair_style, identity.hair_colour
    if re.search(rf"\b{colour} (hair|ponytail)\b", caption):
        said.add("hair_colour")
    if re.search(rf"\b{style}\b", caption):
        said.add("hair_style")
    if " skin" in caption:
        said.add("skin_tone")
    if re.search(rf"\b{identity.shirt_colour} shirt\b", caption):
        said.add("shirt_colour")
    if re.search(rf"\b{identity.trousers_colour} (trousers|skirt)\b", caption):
        said.add("trousers_colour")
    if re.search(r"\b(hat|cap|glasses)\b", caption):
        said.add("accessory")
    return said


def test_captions_say_exactly_what_they_mention_and_always_pose_and_scene():
    for figure, caption, mentioned in captions(600):
        identity = figure.identity
        assert said_attributes(identity, caption) == set(mentioned) - {"kind", "pose", "scene"}, caption
        assert {"kind", "pose", "scene"} <= mentioned
        assert caption.endswith(f"{figure.pose} {w.SCENE_PHRASES[caption_scene(caption)]}"), caption
        assert re.match(rf"an? (bald )?{identity.kind}\b", caption), caption
        if "shirt_colour" not in mentioned:
            assert "shirt" not in caption
        if "trousers_colour" not in mentioned:
            assert "trousers" not in caption and "skirt" not in caption


def caption_scene(caption: str) -> str:
    return next(kind for kind, phrase in w.SCENE_PHRASES.items() if caption.endswith(phrase))


def test_caption_grammar():
    texts = [caption for _, caption, _ in captions(600, seed=1, omit_probability=0.3)]
    for text in texts:
        assert not re.search(r"\ba [aeiou]", text), text
        assert not re.search(r"\ban [^aeiou]", text), text
        assert "  " not in text and not text.endswith(",") and ", ," not in text, text
    assert any("an orange shirt" in t for t in texts)
    assert any(" with " in t and ", wearing " in t for t in texts)
    for figure, caption, mentioned in captions(300, seed=2, omit_probability=0.0, omit_all_probability=0.0):
        if figure.identity.hair_style == "bald":
            assert "hair" not in caption and "hair_colour" not in mentioned and "bald" in caption, caption


def test_examples_from_the_grammar():
    boy = w.Identity("boy", "red", "short", "pale", "blue", "grey", "none")
    full = frozenset(w.OMITTABLE_ATTRIBUTES)
    assert w.describe(boy, frozenset({"hair_style", "hair_colour", "shirt_colour"})) == (
        "a boy with short red hair and a blue shirt"
    )
    assert w.describe(boy, frozenset()) == "a boy"
    girl = w.Identity("girl", "blond", "ponytail", "dark", "orange", "green", "hat")
    assert w.describe(girl, w.mentionable(girl, full), shirt_with=False) == (
        "a girl with a blond ponytail and dark skin, wearing an orange shirt, a green skirt and a hat"
    )
    man = w.Identity("man", "grey", "bald", "tan", "white", "black", "glasses")
    assert w.describe(man, w.mentionable(man, full)) == (
        "a bald man with tan skin, glasses and a white shirt, wearing black trousers"
    )


def test_all_attributes_are_omitted_at_the_expected_rate():
    n = 2000
    results = captions(n, seed=3, omit_probability=0.0)
    bare = sum(mentioned == {"kind", "pose", "scene"} for _, _, mentioned in results) / n
    assert abs(bare - 0.15) < 0.03, bare
    assert all(m == {"kind", "pose", "scene"} for _, _, m in captions(50, omit_probability=1.0))
    # each attribute on its own: said with probability (1 - 0.15) * (1 - 0.5)
    shirt = sum("shirt_colour" in m for _, _, m in captions(n, seed=4)) / n
    assert abs(shirt - 0.425) < 0.04, shirt


# --- two characters ------------------------------------------------------------------------


def test_two_characters_in_one_panel():
    red = replace(BASE, shirt_colour="red")
    green = w.Identity("woman", "black", "long", "dark", "green", "blue", "hat")
    left = w.Figure(red, "standing", w.Placement(0.3, 0.9, 0.55, 1))
    right = w.Figure(green, "waving", w.Placement(0.7, 0.9, 0.55, -1))
    image = pixels(panel_of(left, right))
    for colour in ("red", "green"):
        close = np.abs(image - w.COLOURS[colour]).max(axis=-1) <= 8
        assert close.sum() > 20, colour
    caption, mentioned = w.caption_for([left, right], w.Scene("beach"), np.random.default_rng(0), 0.0, 0.0)
    assert caption.startswith("a man with short red hair and tan skin") and caption.endswith(", waving, on a beach")
    assert ", standing, and a woman with long black hair and dark skin" in caption
    assert "a red shirt" in caption and "a green shirt" in caption and "a blue skirt and a hat" in caption
    panel = w.Panel(w.Scene("beach"), (left, right), caption, mentioned)
    assert panel.mentioned_for(1) == {"kind", "pose", *w.OMITTABLE_ATTRIBUTES}
    assert "hair_colour.1" in mentioned and w.mention_key("hair_colour", 1) == "hair_colour.1"


def test_sample_panel_with_two_figures_and_with_none():
    panel = w.sample_panel(np.random.default_rng(5), num_figures=2, omit_probability=0.0)
    assert len(panel.figures) == 2 and panel.figures[0].placement.x < panel.figures[1].placement.x
    assert {"pose", "pose.1", "scene"} <= panel.mentioned
    empty = w.sample_panel(np.random.default_rng(5), num_figures=0)
    assert empty.figures == () and empty.caption == w.SCENE_NOUNS[empty.scene.kind]
    assert w.render_panel(empty).size == (64, 64)


# --- strips ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "layout", "shape"), [(2, "row", (128, 64)), (3, "row", (192, 64)), (4, "grid", (128, 128))]
)
def test_strip_layouts(count, layout, shape):
    identity = w.Identity.random(np.random.default_rng(0))
    image, panels = w.sample_strip(np.random.default_rng(count), identity, panels=count, layout=layout)
    assert image.size == shape and len(panels) == count
    assert all(p.figures[0].identity == identity for p in panels)
    assert len({p.figures[0].pose for p in panels}) == count and len({p.scene.kind for p in panels}) == count
    assert w.strip_caption(panels) == " | ".join(p.caption for p in panels)
    last = np.asarray(image)[-64:, -64:]
    assert np.array_equal(last, np.asarray(w.render_panel(panels[-1])))


def test_strip_panel_count_is_drawn_from_two_to_four():
    counts = {len(w.sample_strip(np.random.default_rng(s), size=16)[1]) for s in range(12)}
    assert counts == {2, 3, 4}


def test_bad_strips_and_inputs_are_refused():
    with pytest.raises(ValueError, match="grid"):
        w.sample_strip(np.random.default_rng(0), panels=3, layout="grid")
    with pytest.raises(ValueError, match="layout"):
        w.strip_shape(2, "column")
    with pytest.raises(ValueError, match="pose"):
        w.Figure(BASE, "dancing", CENTRE)
    with pytest.raises(ValueError, match="hair_colour"):
        replace(BASE, hair_colour="green")
    with pytest.raises(ValueError, match="phase"):
        w.Figure(BASE, "walking", CENTRE, 1.0)
    with pytest.raises(ValueError, match="facing"):
        w.Placement(0.5, 0.9, 0.5, 0)


# --- animation ---------------------------------------------------------------------------------


def test_animate_walks_from_start_to_end_with_the_gait_advancing():
    start, end = w.Placement(0.15, 0.9, 0.5, 1), w.Placement(0.85, 0.85, 0.6, 1)
    frames = w.animate(BASE, "walking", w.Scene("city", 2), start, end, num_frames=8)
    assert len(frames) == 8
    placements = [f.figures[0].placement for f in frames]
    assert placements[0] == start and math.isclose(placements[-1].x, end.x) and math.isclose(placements[-1].y, end.y)
    xs = [p.x for p in placements]
    assert np.allclose(np.diff(xs), (end.x - start.x) / 7)
    phases = [f.figures[0].phase for f in frames]
    assert np.allclose(phases, np.arange(8) * 0.125)
    assert len({f.caption for f in frames}) == 1 and "walking in the city" in frames[0].caption
    images = [pixels(f) for f in frames]
    assert all(not np.array_equal(a, b) for a, b in zip(images, images[1:]))


def test_animate_jumps_in_place():
    spot = w.Placement(0.5, 0.9, 0.6, -1)
    frames = w.animate(BASE, "jumping", w.Scene("beach"), spot, spot, 5, phase_step=0.2, rng=np.random.default_rng(0))
    assert all(f.figures[0].placement == spot for f in frames)
    feet = [w.part_boxes(f.figures[0])["legs"][3] for f in frames]
    assert feet[2] < feet[1] < feet[0]  # up in the air at mid-jump (pixel y grows downwards)
    assert feet[1] == pytest.approx(feet[4]) and feet[2] == pytest.approx(feet[3])


# --- identities --------------------------------------------------------------------------------


def test_random_identities_rarely_collide():
    sizes = [len(v) for v in w.VOCABULARIES.values()]
    assert w.IDENTITY_COLLISION_PROBABILITY == pytest.approx(1 / math.prod(sizes)) and math.prod(sizes) == 122_880
    assert w.IDENTITY_COLLISION_PROBABILITY < 0.01
    rng = np.random.default_rng(0)
    pairs = 3000
    same = sum(w.Identity.random(rng) == w.Identity.random(rng) for _ in range(pairs))
    assert same / pairs < 0.01


# --- property ----------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_figures=st.integers(1, 2))
def test_any_sampled_panel_renders_with_a_caption_naming_pose_and_scene(seed, num_figures):
    panel = w.sample_panel(np.random.default_rng(seed), num_figures=num_figures)
    image = np.asarray(w.render_panel(panel))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert panel.caption and w.SCENE_PHRASES[panel.scene.kind] in panel.caption
    assert all(re.search(rf"\b{f.pose}\b", panel.caption) for f in panel.figures)
