"""What real checkpoints on a GPU run into, on the tiny models: Flux in bfloat16 (its rounded timesteps),
`--dtype auto` for DiTs, sequential CPU offload (weights on the meta device), SD3's skip-layer guidance
(a third denoiser call per step)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import run_cli

from storydiffusion import ConsistentAttention, CSAConfig, StoryDiffusionError
from storydiffusion.app.runner import pick_dtype
from storydiffusion.csa.bank import BankSettings
from storydiffusion.pipelines.story_pipeline import StoryPipeline, weights_probe
from storydiffusion.pipelines.tiny_random import tiny_flux_pipeline, tiny_sd3_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHARACTERS = {"Bob": "a man with red hair"}
FRAMES = ["[Bob] at home", "[Bob] on a bus", "[Bob] in a park"]
CALL = dict(height=32, width=32, guidance_scale=3.5, output_type="np", progress=False)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- Flux in bfloat16 --------------------------------------------------------------------------
def _flux_call_timestep(timestep: float, dtype: torch.dtype) -> torch.Tensor:
    """What FluxPipeline hands its transformer: the scheduler's timestep cast to the latents' dtype, / 1000."""
    return torch.tensor([timestep], dtype=torch.float32).to(dtype) / 1000


def test_step_lookup_takes_the_timesteps_a_bfloat16_flux_call_gets():
    """At 50 steps with FLUX.1's shift for a 1024x1024 image (4096 tokens: 512x512 on the tiny model) the
    timesteps near 1000 lie closer than bfloat16 rounds them; every call still finds its own step, and a call
    between two steps is still refused."""
    pipe = tiny_flux_pipeline()
    timesteps = StoryPipeline(pipe).denoising_timesteps(50, 512, 512)
    csa = ConsistentAttention()
    with csa.installed(pipe.transformer):
        csa.begin_mutual(timesteps, 1, torch.Generator().manual_seed(0))
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            seen = [csa.step_of(_flux_call_timestep(t, dtype)) for t in timesteps]
            assert seen == list(range(len(timesteps))), dtype
        between = (timesteps[10] + timesteps[11]) / 2
        with pytest.raises(StoryDiffusionError, match="denoiser was called at timestep"):
            csa.step_of(torch.tensor([between / 1000]))


def test_steps_a_dtype_cannot_tell_apart_are_refused_clearly():
    pipe = tiny_flux_pipeline()
    timesteps = StoryPipeline(pipe).denoising_timesteps(400, 512, 512)  # closer than bfloat16 resolves
    csa = ConsistentAttention()
    with csa.installed(pipe.transformer):
        csa.begin_mutual(timesteps, 1, torch.Generator().manual_seed(0))
        with pytest.raises(StoryDiffusionError, match="bfloat16.*fewer steps"):
            csa.step_of(_flux_call_timestep(timesteps[0], torch.bfloat16))


def test_flux_story_in_bfloat16_writes_the_steps_float32_writes():
    """The whole story runs in bfloat16, and its bank holds the same (step, layer) entries as in float32:
    every call found its own step (the gates are drawn from the same seed in both)."""
    steps = dict(num_inference_steps=8, **CALL)
    full = StoryPipeline(_quiet(tiny_flux_pipeline()), CSAConfig(rate=0.5), bank_storage="memory")
    half = StoryPipeline(_quiet(tiny_flux_pipeline()).to(dtype=torch.bfloat16), CSAConfig(rate=0.5))
    expected = full(CHARACTERS, FRAMES, id_length=2, **steps).banks["Bob"]
    out = half(CHARACTERS, FRAMES, id_length=2, **steps)
    assert sorted(out.banks["Bob"].keys()) == sorted(expected.keys())
    assert all(np.isfinite(image).all() for image in out.images)


def test_story_command_runs_flux_in_bfloat16(monkeypatch, capsys, tmp_path):
    (tmp_path / "chars.txt").write_text("[Bob] a man with red hair\n")
    (tmp_path / "frames.txt").write_text("[Bob] at home\n[Bob] on a bus\n[Bob] in a park\n")
    out = tmp_path / "out"
    code, _, err = run_cli(
        monkeypatch, capsys, "story", "--model", "tiny-random-flux", "--characters", tmp_path / "chars.txt",
        "--frames", tmp_path / "frames.txt", "--steps", "8", "--width", "32", "--height", "32",
        "--id-length", "2", "--device", "cpu", "--dtype", "bfloat16", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["dtype"] == "bfloat16" and len(manifest["panels"]) == 3


def test_auto_dtype_is_bfloat16_for_a_dit_where_the_device_has_it(monkeypatch, tmp_path):
    from storydiffusion.pipelines.loading import auto_dtype, checkpoint_kind

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert auto_dtype("cpu", "flux") == torch.float32
    assert auto_dtype("cuda", "flux") == auto_dtype("cuda", "sd3") == torch.bfloat16
    assert auto_dtype("cuda", "unet") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert auto_dtype("cuda", "flux") == torch.float16  # a GPU without bfloat16 (before Ampere)
    # the kind comes from the checkpoint's model_index.json, before anything is loaded
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]})
    )
    assert checkpoint_kind(str(tmp_path)) == "flux" and checkpoint_kind(str(tmp_path / "nothing")) == "unet"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert pick_dtype("auto", "cuda", str(tmp_path)) == torch.bfloat16
    assert pick_dtype("auto", "cuda", "tiny-random-sd3") == torch.bfloat16
    assert pick_dtype("auto", "cuda", "tiny-random") == pick_dtype("auto", "cuda") == torch.float16
    assert pick_dtype("auto", "cpu", str(tmp_path)) == torch.float32
    assert pick_dtype("float16", "cuda", str(tmp_path)) == torch.float16  # asked for: kept


# -- sequential CPU offload ----------------------------------------------------------------------
def test_sequential_cpu_offload_runs_the_same_story():
    """Sequential CPU offload keeps the denoiser's weights on the meta device between calls (accelerate's
    `cpu_offload`, which `enable_sequential_cpu_offload` puts on every model; here with the CPU executing, given
    its own copy of the weights as a GPU run's offloaded copy is). The weights probe reads them through the
    offload hooks: the same bank settings, bank and frames as without offload."""
    from accelerate import cpu_offload

    steps = dict(num_inference_steps=3, **CALL)
    plain = StoryPipeline(_quiet(tiny_flux_pipeline()), CSAConfig(rate=0.5), bank_storage="memory")
    expected = plain(CHARACTERS, FRAMES, id_length=2, **steps)
    pipe = _quiet(tiny_flux_pipeline())
    offloaded = {name: weight.clone() for name, weight in pipe.transformer.state_dict().items()}
    cpu_offload(pipe.transformer, execution_device=torch.device("cpu"), state_dict=offloaded)
    assert {p.device.type for p in pipe.transformer.parameters()} == {"meta"}  # as on a GPU
    assert weights_probe(pipe.transformer) == expected.banks["Bob"].settings.weights_probe
    out = StoryPipeline(pipe, CSAConfig(rate=0.5), bank_storage="memory")(CHARACTERS, FRAMES, id_length=2, **steps)
    assert out.banks["Bob"].digest == expected.banks["Bob"].digest
    for ours, theirs in zip(out.images, expected.images):
        np.testing.assert_array_equal(ours, theirs)


def test_weights_on_the_meta_device_without_an_offload_hook_are_refused_clearly():
    pipe = tiny_flux_pipeline()
    pipe.transformer.to("meta")
    with pytest.raises(StoryDiffusionError, match="meta device and no accelerate offload hook"):
        weights_probe(pipe.transformer)


# -- SD3 skip-layer guidance ---------------------------------------------------------------------
SKIP = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)


def test_sd3_skip_layer_calls_leave_the_bank_as_it_was():
    """The skip-layer pass (a third, conditional-only call per step) neither writes the bank nor draws
    from the phase's generator: at skip_layer_guidance_scale=0 (the pass runs, its term is zero) the bank
    and every frame equal the run without it."""
    story = StoryPipeline(_quiet(tiny_sd3_pipeline()), CSAConfig(rate=0.5), bank_storage="memory")
    steps = dict(num_inference_steps=4, **CALL)
    expected = story(CHARACTERS, FRAMES, id_length=2, **steps)
    out = story(CHARACTERS, FRAMES, id_length=2, skip_layer_guidance_scale=0.0, **SKIP, **steps)
    assert out.banks["Bob"].digest == expected.banks["Bob"].digest
    for ours, theirs in zip(out.images, expected.images):
        np.testing.assert_array_equal(ours, theirs)


def test_sd3_skip_layer_guidance_keeps_both_guidance_halves_in_the_bank():
    story = StoryPipeline(_quiet(tiny_sd3_pipeline()), CSAConfig(rate=0.5), bank_storage="memory")
    steps = dict(num_inference_steps=4, **CALL)
    plain = story(CHARACTERS, FRAMES, id_length=2, **steps)
    out = story(CHARACTERS, FRAMES, id_length=2, skip_layer_guidance_scale=2.8, **SKIP, **steps)
    bank = out.banks["Bob"]
    assert bank.settings.guidance_halves == 2 and len(bank) == len(plain.banks["Bob"])
    for step, layer in bank.keys():
        assert bank.get(step, layer, torch.float32, torch.device("cpu"), 2).shape[0] == 2  # uncond and cond
    assert np.abs(out.images[2] - plain.images[2]).max() > 1e-4  # the guidance term is applied
    assert all(np.isfinite(image).all() for image in out.images)


# -- names ---------------------------------------------------------------------------------------
def test_bank_settings_written_before_the_rename_still_read():
    settings = BankSettings("m", "abc", "EulerDiscreteScheduler", 4, 64, 64, 2, 2)
    old = json.loads(json.dumps(dataclasses.asdict(settings)))
    old["unet_fingerprint"] = old.pop("denoiser_fingerprint")
    assert BankSettings.from_json(json.dumps(old)) == settings


def test_errors_a_flux_user_reads_say_denoiser():
    pipe = tiny_flux_pipeline()
    csa = ConsistentAttention()
    with pytest.raises(StoryDiffusionError, match="on a denoiser"):
        csa.begin_mutual(3, 1, torch.Generator())
    with csa.installed(pipe.transformer):
        csa.begin_mutual([1000.0, 500.0], 1, torch.Generator())
        with pytest.raises(StoryDiffusionError, match="denoiser was called at timestep 12.5"):
            csa.step_of(torch.tensor([0.0125]))
