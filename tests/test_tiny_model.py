"""The shipped tiny model family: loads offline with plain `from_pretrained`, generates, scores; `eval` end to end."""

import json
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import run_cli
from transformers import CLIPModel

from storydiffusion.app import cli
from storydiffusion.app.runner import default_model
from storydiffusion.clip_score import ClipScorer
from storydiffusion.pipelines.loading import dtype_kwargs
from storydiffusion.world import render as world
from storydiffusion.world.models import TINY_CLIP_DIR, TINY_DIR, TINY_VIDEO_DIR, resolve_model

WEIGHT_BUDGET = 40 * 2**20  # bytes of shipped weights per family: the image models, the video model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    pipe = StableDiffusionPipeline.from_pretrained(str(TINY_DIR), **dtype_kwargs(torch.float32))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_is_the_default_model_and_a_short_name():
    assert default_model() == "tiny"
    assert resolve_model("tiny") == str(TINY_DIR)
    assert resolve_model("some/hub-id") == "some/hub-id"


def test_shipped_weights_fit_the_budget():
    assets = TINY_DIR.parent
    weights = list(assets.rglob("*.safetensors"))
    video = sum(p.stat().st_size for p in weights if TINY_VIDEO_DIR in p.parents)
    image = sum(p.stat().st_size for p in weights) - video
    assert 0 < image <= WEIGHT_BUDGET, f"{image / 2**20:.1f} MiB of image-model weights ship; the budget is 40 MiB"
    assert 0 < video <= WEIGHT_BUDGET, f"{video / 2**20:.1f} MiB of video-model weights ship; the budget is 40 MiB"


def test_pipeline_folder_loads_offline_and_generates(pipe):
    assert len(pipe.tokenizer) == 49408  # an offline load can silently give an empty vocabulary
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    kwargs = dict(num_inference_steps=4, guidance_scale=4.0, output_type="np")
    first = pipe("a girl with red hair, jumping on a beach", generator=torch.Generator().manual_seed(0), **kwargs)
    again = pipe("a girl with red hair, jumping on a beach", generator=torch.Generator().manual_seed(0), **kwargs)
    image = first.images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert np.array_equal(image, again.images[0])
    assert image.std() > 0.05  # a picture, not a flat colour


def test_tiny_clip_loads_and_matches_scenes_to_their_names():
    clip = CLIPModel.from_pretrained(str(TINY_CLIP_DIR))
    assert clip.config.vision_config.image_size == 64
    scorer = ClipScorer(TINY_CLIP_DIR)
    rng = np.random.default_rng(0)
    images = [world.render_panel(world.sample_panel(rng, num_figures=0, scene=scene)) for scene in world.SCENES]
    texts = [world.SCENE_NOUNS[scene] for scene in world.SCENES]
    similarity = scorer.image_embeddings(images) @ scorer.text_embeddings(texts).T  # (6, 6)
    assert (similarity.argmax(1) == torch.arange(6)).float().mean() >= 5 / 6
    assert scorer.clip_i(images[:1] * 2) == pytest.approx(1.0, abs=1e-4)


def test_eval_end_to_end_on_a_reduced_set(monkeypatch, capsys, tmp_path):
    out = tmp_path / "eval.json"
    argv = ["storydiffusion", "eval", "--count", "2", "--seeds", "0", "--steps", "3", "--json", str(out)]
    argv += ["--device", "cpu", "--images", str(tmp_path / "images")]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        cli.main()
    except SystemExit as stop:
        assert not stop.code
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    arms = ("baseline", "shared_noise", "csa", "csa_shared_noise", "csa_finished", "csa_sequential", "recommended")
    for arm in arms:  # recommended: the shipped model's storydiffusion.json
        scores = printed[arm]
        keys = {"identity_agreement", "prompt_alignment", "clip_i", "clip_t", "per_attribute", "misaligned"}
        assert set(scores) == keys
        assert 0.0 <= scores["identity_agreement"] <= 1.0 and 0.0 <= scores["prompt_alignment"] <= 1.0
        missed, parts = 1.0 - scores["prompt_alignment"], scores["misaligned"].values()
        assert max(parts) - 1e-9 <= missed <= sum(parts) + 1e-9  # a misaligned panel misses at least one part
        assert -1.0 <= scores["clip_t"] <= 1.0
    assert 0.0 <= printed["within_strip_agreement"] <= 1.0
    assert printed["stories"] == 2 and printed["seeds"] == [0]
    assert len(list((tmp_path / "images").glob("*.png"))) == 2 * 8  # 2 stories x (7 arms + strip)


def test_eval_pictures_end_to_end(monkeypatch, capsys, tmp_path):
    """Frames that read a clean picture of the character show its look far more often than frames without."""
    out = tmp_path / "eval.json"
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "eval", "--pictures", "--count", "3", "--seeds", "0", "--json", out,
        "--device", "cpu", "--images", tmp_path / "images",
    )  # fmt: skip
    assert code == 0, stderr
    printed = json.loads(stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    arms = {"no_picture", "picture_step", "picture_clean", "picture_clean_w4", "picture_recommended"}
    assert set(printed) == {*arms, "stories", "seeds"}  # recommended: the shipped model's storydiffusion.json
    for scores in (printed[arm] for arm in arms):
        assert {"picture_agreement", "identity_agreement", "prompt_alignment", "clip_i", "clip_t"} <= set(scores)
    assert printed["picture_clean"]["picture_agreement"] >= printed["no_picture"]["picture_agreement"] + 0.2
    assert len(list((tmp_path / "images").glob("*.png"))) == 3 * 5
