"""The shipped tiny-world VAE (assets/tiny/vae) and the `world_training` helpers it was trained with."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

import storydiffusion
from storydiffusion.world import render as world
from storydiffusion.world import training as wt

VAE_DIR = Path(storydiffusion.__file__).parent / "assets" / "tiny" / "vae"

# Measured on the shipped weights (held-out seed 10_000, 64 panels / 8 strips: 27.6 dB, 27.9 dB,
# colour accuracy 0.89; the 16 panels of seed 123 below: 27.7 dB, 0.97); the thresholds sit below.
MIN_PANEL_PSNR = 25.0
MIN_STRIP_PSNR = 25.0
MIN_COLOUR_ACCURACY = 0.8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vae():
    return AutoencoderKL.from_pretrained(VAE_DIR).eval()


def test_shipped_folder_is_a_plain_diffusers_model_folder():
    assert sorted(p.name for p in VAE_DIR.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    size = (VAE_DIR / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size <= 8 * 2**20, f"shipped VAE weights are {size / 2**20:.1f} MiB, the budget is 8 MiB"


def test_vae_has_factor_4_and_4_latent_channels(vae):
    assert vae.config.latent_channels == 4
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 4
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert latents.shape == (1, 4, 16, 16)


def test_scaling_factor_makes_latents_unit_scale(vae):
    images = wt.render_vae_batch(np.random.default_rng(1), 16, "panel")
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    std = (latents * vae.config.scaling_factor).std().item()
    assert 0.5 < std < 2.0, f"scaled latent std {std:.3f} (scaling_factor={vae.config.scaling_factor})"


def test_reconstructs_held_out_panels(vae):
    images, panels = wt.held_out_panels(seed=123, count=16)
    metrics = wt.reconstruction_metrics(vae, images, panels)
    assert metrics["psnr"] > MIN_PANEL_PSNR, metrics
    assert metrics["colour_accuracy"] > MIN_COLOUR_ACCURACY, metrics


def test_reconstructs_a_2x2_strip_through_a_32x32_latent(vae):
    strips = wt.render_vae_batch(np.random.default_rng(7), 2, "strip")  # (2, 3, 128, 128)
    with torch.no_grad():
        latents = vae.encode(strips).latent_dist.mode()
        recon = vae.decode(latents).sample
    assert latents.shape == (2, 4, 32, 32)
    assert recon.shape == strips.shape
    psnr = wt.psnr(recon.clamp(-1, 1), strips).mean().item()
    assert psnr > MIN_STRIP_PSNR, f"strip PSNR {psnr:.2f} dB"


def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    vae = wt.tiny_vae(seed=0)
    images = wt.render_vae_batch(np.random.default_rng(0), 4, "panel", size=32)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)

    def loss() -> torch.Tensor:
        return wt.vae_loss(vae, images, generator=torch.Generator().manual_seed(0))[0]

    with torch.no_grad():
        before = loss().item()
    for _ in range(6):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.9 * before, f"loss {before:.4f} -> {after:.4f}"


# ---------------------------------------------------------------------------------------------
# world_training helpers
# ---------------------------------------------------------------------------------------------


def test_panel_tensor_shape_range_and_round_trip():
    image = world.render_panel(world.sample_panel(np.random.default_rng(0)), size=32)
    tensor = wt.panel_tensor(image)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    assert np.array_equal(np.asarray(wt.tensor_image(tensor)), np.asarray(image))


@pytest.mark.parametrize(
    ("kind", "shape"), [("panel", (3, 3, 32, 32)), ("mixed", (3, 3, 32, 32)), ("strip", (3, 3, 64, 64))]
)
def test_render_vae_batch_shapes_and_range(kind, shape):
    batch = wt.render_vae_batch(np.random.default_rng(0), 3, kind, size=32)
    assert batch.shape == shape
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    assert torch.equal(batch, wt.render_vae_batch(np.random.default_rng(0), 3, kind, size=32))  # seeded


def test_render_vae_batch_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind='video'"):
        wt.render_vae_batch(np.random.default_rng(0), 2, "video")


class _FakeVAE(torch.nn.Module):
    """Encodes to the image itself and decodes through `transform`: metrics with a known answer."""

    def __init__(self, transform):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.transform = transform

    def encode(self, images):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: images))

    def decode(self, latents):
        return SimpleNamespace(sample=self.transform(latents))


def test_reconstruction_metrics_on_perfect_and_wrong_reconstructions():
    images, panels = wt.held_out_panels(seed=5, count=6, size=64)
    perfect = wt.reconstruction_metrics(_FakeVAE(lambda x: x), images, panels)
    assert perfect["psnr"] > 60 and perfect["mae"] == 0.0
    assert perfect["colour_fidelity"] == 1.0 and perfect["colour_accuracy"] == 1.0
    inverted = wt.reconstruction_metrics(_FakeVAE(lambda x: -x), images, panels)  # a negative
    assert inverted["colour_fidelity"] < 0.1 and inverted["psnr"] < 20
    assert set(wt.reconstruction_metrics(_FakeVAE(lambda x: x), images)) == {"psnr", "mae"}


def test_colour_regions_find_the_attribute_colours():
    images, panels = wt.held_out_panels(seed=3, count=8)
    for image, panel in zip(images, panels):
        original = ((image + 1) / 2).permute(1, 2, 0).numpy()
        regions = wt.colour_regions(panel, original)
        assert "shirt" in regions
        for part, (mask, colour) in regions.items():
            target = np.asarray(world.COLOURS[colour]) / 255
            assert np.abs(original[mask] - target).max() < 0.06, part
    with pytest.raises(ValueError, match="exactly 1 figure"):
        wt.colour_regions(world.sample_panel(np.random.default_rng(0), num_figures=2), original)


def test_warmup_cosine_schedule():
    assert wt.warmup_cosine(0, 1e-3, 100, 1000) == pytest.approx(1e-5)  # warm-up starts low
    assert wt.warmup_cosine(99, 1e-3, 100, 1000) == pytest.approx(1e-3)  # ... and reaches the peak
    assert wt.warmup_cosine(550, 1e-3, 100, 1000) == pytest.approx(0.55e-3)  # half-way down the cosine
    assert wt.warmup_cosine(1000, 1e-3, 100, 1000) == pytest.approx(1e-4)  # the floor at the end
    assert wt.warmup_cosine(5000, 1e-3, 100, 1000) == pytest.approx(1e-4)  # and after it
