"""`storydiffusion bench consistory+`: arms, scores, notes for what cannot be measured, and the offline smoke
run on the tiny model with the tiny CLIP (`--limit 3`)."""

import json
import sys

import numpy as np
import pytest
import torch
from helpers import run_cli
from PIL import Image

from storydiffusion.app.batch import collect_stories
from storydiffusion.app.bench import (
    ARMS,
    PUBLISHED,
    BenchSettings,
    arm_setup,
    load_dreamsim,
    markdown_table,
    score_arm,
)
from storydiffusion.errors import StoryDiffusionError


def test_arms_differ_only_in_csa_settings_and_initial_noise():
    settings = BenchSettings(rate=0.4)
    configs = {arm: arm_setup(arm, settings) for arm in ARMS}
    assert configs["vanilla"][0].rate == 0.0 and configs["vanilla"][1] == {"rate": 0.0, "same_initial_noise": False}
    assert configs["csa"][0].rate == 0.4 and not configs["csa"][0].subject_only
    assert configs["csa_shared_noise"][1]["same_initial_noise"] is True
    assert configs["csa_masked"][0].subject_only and configs["csa_masked"][0].rate == 0.4
    assert all(config.subject_masks == "infer" for config, _ in configs.values())
    with pytest.raises(StoryDiffusionError, match="choose among"):
        BenchSettings(arms=("csa", "ip_adapter"))


def test_dreamsim_is_reported_missing_never_replaced(monkeypatch):
    monkeypatch.setitem(sys.modules, "dreamsim", None)  # as if not installed
    scorer, note = load_dreamsim("cpu")
    assert scorer is None and "dreamsim package is not installed" in note


def test_markdown_table_lists_arms_the_published_rows_and_notes():
    scores = {
        "clip_t_clipscore": 0.75, "clip_t_cosine": 0.3, "clip_i_cosine": 0.5, "dreamsim_distance": None,
        "s_per_image": 1.5, "peak_mem_bytes": 2**31,
    }  # fmt: skip
    table = markdown_table({"csa": {**scores, "dreamsim_note": "DreamSim not measured: why"}}, "header")
    assert table.startswith("header\n")
    header = table.splitlines()[2]
    assert "CLIP-T, CLIPScore 2.5·max(cos, 0)" in header and "CLIP-T, cosine" in header  # each column's scale
    assert "CLIP-I, cosine" in header and "DreamSim distance" in header
    assert "| csa | 0.750 | 0.300 | 0.500 | n/a | 1.50 | 2.00 GiB | n/a |" in table
    assert "| *published: 1Prompt1Story* | 0.894 | — | 0.912 | 0.199 |" in table  # on the CLIPScore column
    assert all(name in table for name in PUBLISHED) and "- DreamSim not measured: why" in table


class StandInClip:
    """Embeddings chosen by hand: an image's by its colour, a prompt's by its text (unit norm, as CLIP's)."""

    def __init__(self, images: dict, texts: dict) -> None:
        self.images = {colour: torch.nn.functional.normalize(torch.tensor(v), dim=0) for colour, v in images.items()}
        self.texts = {text: torch.nn.functional.normalize(torch.tensor(v), dim=0) for text, v in texts.items()}

    def image_embeddings(self, images):
        return torch.stack([self.images[image.getpixel((0, 0))] for image in images])

    def text_embeddings(self, texts):
        return torch.stack([self.texts[text] for text in texts])


def test_clip_t_is_reported_on_the_published_clipscore_scale_beside_the_raw_cosine(tmp_path):
    """The published ConsiStory+ CLIP-T (~0.89) is CLIPScore, 2.5 * max(cos, 0) per image (Hessel et al. 2021),
    where a raw image-text cosine reads 0.2-0.4. Computed here independently, per frame, from the stand-in's
    vectors: a frame whose cosine is negative scores 0, so the clipping is per image, not on the mean."""
    stories = collect_stories([write_prompt_set(tmp_path / "set.yaml")], {"id_length": 1})
    colours = {(200, 0, 0): [1.0, 0.2, 0.0], (0, 200, 0): [0.8, 0.6, 0.0], (0, 0, 200): [-0.5, 1.0, 0.3]}
    images = {"dog": list(colours)[:2], "cat": [list(colours)[2], list(colours)[0]]}
    texts = {}
    for item, vector in zip(stories, ([0.6, 0.8, 0.0], [0.3, -0.5, 1.0])):
        for panel in item.story.panels:
            texts[panel.prompt] = vector
    for item in stories:
        folder = tmp_path / "arm" / item.name
        folder.mkdir(parents=True)
        panels = {}
        for index, colour in enumerate(images[item.name.split("_")[-1]]):
            Image.new("RGB", (8, 8), colour).save(folder / f"panel_{index:03d}.png")
            panels[str(index)] = {"file": f"panel_{index:03d}.png"}
        (folder / "manifest.json").write_text(json.dumps({"panels": panels}))

    scores = score_arm(tmp_path / "arm", stories, StandInClip(colours, texts), None, "no DreamSim here")

    unit = {key: np.asarray(value) / np.linalg.norm(value) for key, value in {**colours, **texts}.items()}
    cosines = [
        float(unit[colour] @ unit[panel.prompt])
        for item in stories
        for colour, panel in zip(images[item.name.split("_")[-1]], item.story.panels)
    ]
    assert min(cosines) < 0 < max(cosines)  # the case where clipping per frame and on the mean differ
    assert scores["clip_t_clipscore"] == pytest.approx(np.mean([2.5 * max(c, 0.0) for c in cosines]), abs=1e-6)
    assert scores["clip_t_cosine"] == pytest.approx(np.mean(cosines), abs=1e-6)
    per_subject = [float(unit[a] @ unit[b]) for a, b in (images["dog"], images["cat"])]  # two frames each
    assert scores["clip_i_cosine"] == pytest.approx(np.mean(per_subject), abs=1e-6)
    assert scores["dreamsim_distance"] is None and scores["dreamsim_note"] == "no DreamSim here"
    assert not {"clip_t", "clip_i", "dreamsim"} & set(scores)  # no figure without its scale in its name
    table = markdown_table({"csa": scores})
    assert f"| csa | {scores['clip_t_clipscore']:.3f} | {scores['clip_t_cosine']:.3f} |" in table


def write_prompt_set(path):
    path.write_text(
        "animals:\n"
        "- {concept_token: dog, subject: a dog, style: A photo of, settings: [running, sleeping]}\n"
        "- {concept_token: cat, subject: a cat, style: A photo of, settings: [eating, jumping]}\n"
    )
    return path


def test_bench_consistory_plus_smoke_run_on_the_tiny_model(monkeypatch, capsys, tmp_path):
    """~20 s: 3 subjects (15 frames) in 4 arms at 2 steps, scored with the tiny CLIP."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setitem(sys.modules, "dreamsim", None)  # the same result whether or not it is installed here
    out, json_path = tmp_path / "bench", tmp_path / "result.json"
    args = ["bench", "consistory+", "--model", "tiny", "--out", out, "--limit", "3", "--steps", "2"]
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args, "--json", json_path, "--device", "cpu")
    assert code == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result == json.loads(json_path.read_text()) == json.loads((out / "bench.json").read_text())
    assert list(result) == list(ARMS)
    for arm, scores in result.items():
        assert scores["subjects"] == 3 and scores["frames"] == 15 and scores["images_timed"] == 15
        assert -1.0 <= scores["clip_t_cosine"] <= 1.0 and -1.0 <= scores["clip_i_cosine"] <= 1.0
        assert 0.0 <= scores["clip_t_clipscore"] <= 2.5
        assert scores["dreamsim_distance"] is None and "not installed" in scores["dreamsim_note"]
        assert scores["s_per_image"] > 0
        assert scores["peak_mem_bytes"] is None and "CUDA" in scores["peak_mem_note"]  # a CPU run
        assert scores["peak_rss_bytes"] > 0
        assert len(list((out / arm).glob("*/panel_*.png"))) == 15
        assert json.loads((out / arm / "batch.json").read_text())["complete"]
    table = json_path.with_suffix(".md").read_text()
    assert "| csa_masked |" in table and "published: 1Prompt1Story" in table and table in stdout
    # each arm ran with its own settings: the shared-noise arm draws every frame of a subject from one seed,
    # the csa arm one seed per frame, vanilla borrows nothing
    for arm, shared in (("csa_shared_noise", True), ("csa", False)):
        for manifest_path in (out / arm).glob("*/manifest.json"):
            seeds = [panel["seed"] for panel in json.loads(manifest_path.read_text())["panels"].values()]
            assert (len(set(seeds)) == 1) == shared, (arm, seeds)
    rates = {json.loads(m.read_text())["settings"]["rate"] for m in (out / "vanilla").glob("*/manifest.json")}
    assert rates == {0.0}
