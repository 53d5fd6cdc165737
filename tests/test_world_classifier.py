"""The tiny world's attribute classifier: shipped weights, held-out accuracy, agreement score, training, saving."""

import json
from dataclasses import replace
from importlib.resources import files

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from storydiffusion.world import classifier as wc
from storydiffusion.world import render as w

HELD_OUT_SEED = 20_250_101  # neither the training seed (0) nor the evaluation seeds (1_000_003, 1_000_004)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def classifier() -> wc.AttributeClassifier:
    return wc.load_default_classifier()


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, dict[str, torch.Tensor], list[w.Panel]]:
    return wc.render_batch(np.random.default_rng(HELD_OUT_SEED), 200)


def tiny_model(seed: int = 0) -> wc.AttributeClassifier:
    torch.manual_seed(seed)
    return wc.AttributeClassifier(block_channels=(8, 16), layers_per_block=1)


# --- the shipped classifier ------------------------------------------------------------------


def test_shipped_classifier_loads_offline_with_a_head_per_attribute(classifier):
    assert not classifier.training
    assert classifier.vocabularies == dict(wc.ATTRIBUTES)
    assert tuple(classifier.vocabularies) == tuple(wc.ATTRIBUTES)  # in order: kind first, scene last
    for name, vocabulary in wc.ATTRIBUTES.items():
        assert classifier.heads[name].out_features == len(vocabulary)
    assert classifier.config.sample_size == 64
    params = sum(p.numel() for p in classifier.parameters())
    assert 300_000 <= params <= 1_500_000, params


def test_scored_attributes_are_those_that_reached_the_threshold_in_eval_json():
    report = json.loads((files("storydiffusion") / "assets" / "world_classifier" / "eval.json").read_text())
    assert tuple(report["scored_attributes"]) == wc.SCORED_ATTRIBUTES
    for name in wc.ATTRIBUTES:
        assert (report["accuracy"][name] >= 0.97) == (name in wc.SCORED_ATTRIBUTES), (name, report["accuracy"])
    assert set(wc.SCORED_IDENTITY_ATTRIBUTES) | set(wc.SCORED_PROMPT_ATTRIBUTES) == set(wc.SCORED_ATTRIBUTES)


def test_held_out_accuracy_of_every_scored_attribute(classifier, held_out):
    images, _, panels = held_out
    accuracy = wc.accuracy(classifier.predict(images), panels)
    low = {name: accuracy[name] for name in wc.SCORED_ATTRIBUTES if accuracy[name] < 0.95}
    assert not low, f"scored attributes below 0.95 on 200 held-out panels: {low} (all: {accuracy})"


def test_predict_takes_pil_images_or_a_tensor(classifier, held_out):
    images, _, panels = held_out
    pil = [w.render_panel(panel) for panel in panels[:8]]
    assert classifier.predict(pil) == classifier.predict(images[:8])


def test_agreement_is_high_for_one_identity_and_low_for_strangers(classifier):
    rng = np.random.default_rng(HELD_OUT_SEED + 1)
    identity = w.Identity("woman", "red", "long", "tan", "green", "blue", "glasses")
    same = [w.sample_panel(rng, identity, pose=p, scene=s) for p, s in zip(w.POSES, w.SCENES)]
    predictions = classifier.predict([w.render_panel(panel) for panel in same])
    # One misread attribute of one panel (the instrument is ~99% right per attribute) costs 1/15 here.
    assert wc.agreement(predictions) >= 0.93, predictions
    strangers = [w.sample_panel(rng, pose=p, scene=s) for p, s in zip(w.POSES, w.SCENES)]
    assert wc.agreement(classifier.predict([w.render_panel(panel) for panel in strangers])) < 0.5


# --- pure helpers ----------------------------------------------------------------------------


def test_agreement_counts_agreeing_pairs_per_attribute():
    predictions = [{"kind": "man", "shirt_colour": "red"}, {"kind": "man", "shirt_colour": "red"}, {"kind": "boy"}]
    # kind: 1 of 3 pairs agree; shirt colour: 1 of 3 (the missing value agrees with nothing here).
    assert wc.agreement(predictions, ["kind", "shirt_colour"]) == pytest.approx(1 / 3)
    bald = [{"hair_style": "bald"}, {"hair_style": "bald"}]  # no hair colour on either: they agree
    assert wc.agreement(bald, ["hair_style", "hair_colour"]) == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        wc.agreement(predictions[:1])


def test_panel_targets_are_indices_and_mask_a_hidden_hair_colour():
    figure = w.Figure(
        w.Identity("boy", "blue", "bald", "dark", "yellow", "grey", "cap"), "waving", w.Placement(0.5, 0.9, 0.6)
    )
    panel = w.Panel(w.Scene("night", 3), (figure,), "", frozenset())
    targets = wc.panel_targets(panel)
    assert targets["hair_colour"] == wc.IGNORE_INDEX == -100
    assert targets["hair_style"] == w.HAIR_STYLES.index("bald")
    assert targets["kind"] == w.KINDS.index("boy") and targets["accessory"] == w.ACCESSORIES.index("cap")
    assert targets["pose"] == w.POSES.index("waving") and targets["scene"] == w.SCENES.index("night")
    haired = replace(figure, identity=replace(figure.identity, hair_style="curly"))
    assert wc.panel_targets(replace(panel, figures=(haired,)))["hair_colour"] == w.HAIR_COLOURS.index("blue")
    hatted = replace(figure, identity=replace(figure.identity, hair_style="short", accessory="hat"))
    assert wc.panel_targets(replace(panel, figures=(hatted,)))["hair_colour"] == wc.IGNORE_INDEX  # under the brim
    with pytest.raises(ValueError, match="exactly 1 figure"):
        wc.panel_targets(w.sample_panel(np.random.default_rng(0), num_figures=2))


def test_render_batch_gives_images_in_range_and_targets_of_its_panels():
    images, targets, panels = wc.render_batch(np.random.default_rng(5), 6)
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert all(len(panel.figures) == 1 for panel in panels)
    for i, panel in enumerate(panels):
        assert {name: int(t[i]) for name, t in targets.items()} == wc.panel_targets(panel)
    again, _, _ = wc.render_batch(np.random.default_rng(5), 6)
    assert torch.equal(images, again)


def test_predict_leaves_out_hair_colour_when_it_sees_a_bald_head():
    model = tiny_model()
    with torch.no_grad():
        model.heads["hair_style"].bias[w.HAIR_STYLES.index("bald")] = 1e4
    images, _, _ = wc.render_batch(np.random.default_rng(1), 2)
    for prediction in model.predict(images):
        assert prediction["hair_style"] == "bald" and "hair_colour" not in prediction
        assert set(prediction) == set(wc.ATTRIBUTES) - {"hair_colour"}


# --- training and saving ---------------------------------------------------------------------


def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch():
    model = tiny_model()
    images, targets, _ = wc.render_batch(np.random.default_rng(2), 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        logits = model(images)
        return sum(F.cross_entropy(logits[n], targets[n], ignore_index=wc.IGNORE_INDEX) for n in logits)

    before = loss().item()
    for _ in range(15):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    after = loss().item()
    assert after < 0.7 * before, (before, after)


def test_save_pretrained_and_from_pretrained_give_identical_outputs(tmp_path):
    model = tiny_model()
    model(wc.render_batch(np.random.default_rng(3), 8)[0])  # move BatchNorm's running statistics off their init
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = wc.AttributeClassifier.from_pretrained(tmp_path).eval()
    assert list(loaded.vocabularies.items()) == list(model.vocabularies.items())
    images = wc.render_batch(np.random.default_rng(4), 4)[0]
    with torch.no_grad():
        a, b = model(images), loaded(images)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_bad_inputs_are_refused_with_the_value():
    with pytest.raises(ValueError, match="at least 2 distinct"):
        wc.AttributeClassifier(attribute_names=["kind"], attribute_vocabularies=[["boy"]])
    with pytest.raises(ValueError, match="one to one"):
        wc.AttributeClassifier(attribute_names=["kind", "pose"], attribute_vocabularies=[["boy", "girl"]])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_model()(torch.zeros(1, 64, 64))
