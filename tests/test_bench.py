"""`storydiffusion bench consistory+`: arms, scores, notes for what cannot be measured, and the offline smoke
run on the tiny model with the tiny CLIP (`--limit 3`)."""

import json
import sys

import pytest
from helpers import run_cli

from storydiffusion.app.bench import ARMS, PUBLISHED, BenchSettings, arm_setup, load_dreamsim, markdown_table
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
    scores = {"clip_t": 0.25, "clip_i": 0.5, "dreamsim": None, "s_per_image": 1.5, "peak_mem_bytes": 2**31}
    table = markdown_table({"csa": {**scores, "dreamsim_note": "DreamSim not measured: why"}}, "header")
    assert table.startswith("header\n")
    assert "| csa | 0.250 | 0.500 | n/a | 1.50 | 2.00 GiB | n/a |" in table
    assert all(name in table for name in PUBLISHED) and "- DreamSim not measured: why" in table


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
        assert -1.0 <= scores["clip_t"] <= 1.0 and -1.0 <= scores["clip_i"] <= 1.0
        assert scores["dreamsim"] is None and "not installed" in scores["dreamsim_note"]
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
