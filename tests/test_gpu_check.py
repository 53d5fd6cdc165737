"""benchmarks/gpu_check.py: its --tiny run end to end, its full-size configs against the published parameter counts,
its section guard and time budget."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionXLPipeline

from storydiffusion.csa.attention import CSAConfig
from storydiffusion.csa.controller import select_layers
from storydiffusion.pipelines.story_pipeline import StoryPipeline

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
_SCRIPT = _BENCHMARKS / "gpu_check.py"
SECTIONS = ["csa_layer", "sdxl", "flux"]


@pytest.fixture(scope="module")
def check():
    # gpu_check imports csa_attention by name, as it does when run as a script (its folder first on sys.path)
    sys.path.insert(0, str(_BENCHMARKS))
    had_layer_bench = "csa_attention" in sys.modules
    spec = importlib.util.spec_from_file_location("gpu_check_benchmark", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        if not had_layer_bench:
            sys.modules.pop("csa_attention", None)
        sys.path.remove(str(_BENCHMARKS))


def test_tiny_run_measures_every_section():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(_SCRIPT), "--tiny"], env=env, capture_output=True, text=True, timeout=480, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["mode"] == "tiny" and report["sections"] == SECTIONS
    assert report["errors"] == {}
    assert all(report[name]["error"] is None for name in SECTIONS)

    sdxl = report["sdxl"]
    for run in ("csa", "vanilla"):  # both measured, frame by frame as the story makes them
        assert sdxl[run]["images"] == 6
        assert sdxl[run]["seconds_per_image"] > 0 and sdxl[run]["frame_seconds_per_image"] > 0
        assert sdxl[run]["peak_bytes"] is None  # CPU: no CUDA memory counter
    ratio = sdxl["csa"]["seconds_per_image"] / sdxl["vanilla"]["seconds_per_image"]
    assert sdxl["csa_vs_vanilla_seconds_per_image"] == pytest.approx(ratio)
    assert sdxl["csa_vs_vanilla_mean_abs_pixel_diff"] > 0  # CSA was on in one run and off in the other
    bank = sdxl["bank"]
    assert bank["bank_bytes"] > 0 and bank["bank_entries"] > 0
    for where in ("memory", "disk_cold", "disk_warm"):
        assert bank[where]["seconds_per_frame"] > 0
        assert bank[where]["entries_read"] == bank[where]["entries"] == bank["bank_entries"]

    flux = report["flux"]
    for run in ("on_device", "offload"):
        assert flux[run]["images"] == 10 and flux[run]["seconds_per_image"] > 0
    assert flux["offload_vs_on_device_mean_abs_pixel_diff"] == 0.0  # offloading moves models, never changes pixels

    for arch in ("unet", "flux"):
        layer = report["csa_layer"][arch]
        for name in ("time_vs_vanilla", "time_vs_dense", "time_vs_official", "bank_vs_official"):
            assert math.isfinite(layer[name]) and layer[name] > 0
        assert max(layer["max_abs_diff"].values()) < 1e-4
        assert layer["peak_mem_vs_official"] is None

    assert set(report["targets"]) == {
        "sdxl_peak_le_16GiB",
        "csa_seconds_per_image_le_1.25x_vanilla",
        "flux_on_gpu_peak_le_40GiB",
        "flux_offload_peak_le_24GiB",
    }
    assert report["targets"]["csa_seconds_per_image_le_1.25x_vanilla"] == (ratio <= 1.25)
    assert report["targets"]["sdxl_peak_le_16GiB"] is None and report["memory_note"]
    assert report["within_budget"]


def test_full_configs_have_the_published_parameter_counts(check):
    sdxl = check.sdxl_components("meta", torch.float16)
    counts = {name: check.parameter_count(sdxl[name]) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    assert counts == {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    }
    assert sdxl["unet"].dtype == torch.float16
    story = StoryPipeline(StableDiffusionXLPipeline(**sdxl, add_watermarker=False))
    assert story.default_size() == (1024, 1024)
    # the 36 decoder layers the layer benchmark's SDXL bank figures count
    assert set(select_layers(story.denoiser, CSAConfig())) == set(check.layer_bench.sdxl_decoder_csa_layers(1024))

    flux = check.flux_components("meta", torch.bfloat16)
    counts = {
        name: check.parameter_count(flux[name]) for name in ("transformer", "text_encoder_2", "text_encoder", "vae")
    }
    t5_vocabulary_widened = (49408 - 32128) * 4096  # CLIP's tokenizer stands in for T5's
    assert counts == {
        "transformer": 11_901_408_320,
        "text_encoder_2": 4_762_310_656 + t5_vocabulary_widened,
        "text_encoder": 123_060_480,
        "vae": 83_819_683,
    }
    assert flux["transformer"].dtype == torch.bfloat16
    story = StoryPipeline(FluxPipeline(**flux))
    assert story.default_size() == (1024, 1024)
    assert select_layers(story.denoiser, CSAConfig()) == check.layer_bench.flux_csa_layers()


def tiny_run(check, seconds_left: float, tiny: bool = True):
    return check.Run(
        tiny=tiny, device=torch.device("cpu"), sdxl_steps=1, flux_steps=1, deadline=time.monotonic() + seconds_left
    )


def test_a_failing_section_keeps_what_it_measured_and_the_next_still_runs(check):
    def broken(run, result):
        result["measured_before"] = 1.5
        raise RuntimeError("CUDA out of memory (simulated)")

    def fine(run, result):
        result["value"] = 2

    results = check.run_sections(["sdxl", "flux"], {"sdxl": broken, "flux": fine}, tiny_run(check, 60))
    assert results["sdxl"]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert results["sdxl"]["measured_before"] == 1.5
    assert "simulated" in results["sdxl"]["traceback"]
    assert results["flux"]["value"] == 2 and results["flux"]["error"] is None
    assert check.targets(results)["sdxl_peak_le_16GiB"] is None  # not measured: neither true nor false


def test_a_section_the_budget_cannot_hold_is_skipped(check):
    ran = []

    def runner(run, result):
        ran.append(True)

    # a full run with 30 s left: the layer benchmark (20 s at least) runs, SDXL (60 s at least) does not
    results = check.run_sections(
        ["csa_layer", "sdxl"], {"csa_layer": runner, "sdxl": runner}, tiny_run(check, 30, False)
    )
    assert ran == [True]
    assert results["csa_layer"]["error"] is None
    assert results["sdxl"]["error"].startswith("SkippedForBudget: skipped: it needs at least 60 s")


def test_targets_read_the_measured_figures(check):
    gib = 2**30
    results = {
        "sdxl": {"csa": {"peak_bytes": 17 * gib}, "csa_vs_vanilla_seconds_per_image": 1.2},
        "flux": {"on_device": {"peak_bytes": 39 * gib}, "offload": {"peak_bytes": 25 * gib}},
    }
    assert check.targets(results) == {
        "sdxl_peak_le_16GiB": False,
        "csa_seconds_per_image_le_1.25x_vanilla": True,
        "flux_on_gpu_peak_le_40GiB": True,
        "flux_offload_peak_le_24GiB": False,
    }


def test_sections_option_and_device_errors(check, monkeypatch, capsys):
    assert check.parse_args(["--tiny", "--sections", "flux,sdxl"]).sections == ["sdxl", "flux"]  # the planned order
    with pytest.raises(SystemExit):
        check.parse_args(["--tiny", "--sections", "sdxl,bogus"])
    assert "'sdxl,bogus': sections are a comma-separated subset of csa_layer,sdxl,flux" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        check.parse_args([])
    assert "torch sees no CUDA device; use --tiny" in capsys.readouterr().err


def test_report_is_strict_json(check):
    report = check.json_ready({"a": float("nan"), "b": [1.5, float("inf")], "c": torch.device("cpu"), "d": None})
    assert report == {"a": None, "b": [1.5, None], "c": "cpu", "d": None}
    json.loads(json.dumps(report, allow_nan=False))
