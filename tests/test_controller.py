"""Installing and uninstalling CSA, layer selection, phase state."""

import pytest
import torch

from storydiffusion import ConsistentAttention, ConsistentSelfAttnProcessor, CSAConfig, StoryDiffusionError
from storydiffusion.csa.controller import select_layers


def test_install_then_uninstall_restores_the_very_same_processors(any_pipe):
    before = any_pipe.unet.attn_processors
    csa = ConsistentAttention()
    csa.install(any_pipe.unet)
    during = any_pipe.unet.attn_processors
    replaced = {k for k in during if isinstance(during[k], ConsistentSelfAttnProcessor)}
    assert replaced and all(k.startswith("up_blocks.") and k.endswith("attn1.processor") for k in replaced)
    assert all(during[k] is before[k] for k in before if k not in replaced)
    assert all(during[k].original is before[k] for k in replaced)
    csa.uninstall()
    after = any_pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_context_manager_restores_even_after_an_error(sd_pipe):
    before = sd_pipe.unet.attn_processors
    csa = ConsistentAttention()
    with pytest.raises(RuntimeError):
        with csa.installed(sd_pipe.unet):
            raise RuntimeError("boom")
    assert all(sd_pipe.unet.attn_processors[k] is v for k, v in before.items())


def test_layer_selection_by_name_and_level(sd_pipe):
    unet = sd_pipe.unet
    default = select_layers(unet, CSAConfig())
    assert set(default.values()) == {1, 2}  # up_blocks.1 at the full latent grid, up_blocks.0 at half
    down = select_layers(unet, CSAConfig(layers=("down_blocks.*",)))
    assert all(name.startswith("down_blocks.") and name.endswith("attn1") for name in down)
    half = select_layers(unet, CSAConfig(layers=("*",), levels=(2,)))
    assert set(half.values()) == {2} and any(n.startswith("down_blocks.1") for n in half)


def test_rates_per_level_reach_the_processors(sd_pipe):
    csa = ConsistentAttention(CSAConfig(rate={1: 0.25, 2: 0.75}))
    with csa.installed(sd_pipe.unet):
        processors = [p for p in sd_pipe.unet.attn_processors.values() if isinstance(p, ConsistentSelfAttnProcessor)]
        assert {(p.level, p.rate) for p in processors} == {(1, 0.25), (2, 0.75)}


def test_selection_matching_nothing_is_refused(sdxl_pipe):
    with pytest.raises(StoryDiffusionError, match="matches no attention layer"):
        ConsistentAttention(CSAConfig(levels=(8,))).install(sdxl_pipe.unet)
    with pytest.raises(StoryDiffusionError, match="matches no attention layer"):
        ConsistentAttention(CSAConfig(layers=("decoder.*",))).install(sdxl_pipe.unet)


def test_double_installation_is_refused(sd_pipe):
    first = ConsistentAttention()
    with first.installed(sd_pipe.unet):
        with pytest.raises(StoryDiffusionError, match="another controller"):
            ConsistentAttention().install(sd_pipe.unet)
        with pytest.raises(StoryDiffusionError, match="already installed"):
            first.install(sd_pipe.unet)


def test_gates_follow_the_schedule_and_the_seed(sd_pipe):
    csa = ConsistentAttention()
    with csa.installed(sd_pipe.unet):
        csa.begin_mutual(50, 2, torch.Generator().manual_seed(0))
        gates = dict(csa.gates)
        assert all(not row[0] for row in gates.values())  # step 0 plain
        share = sum(sum(row[1:]) for row in gates.values()) / (len(gates) * 49)
        assert 0.6 < share < 0.95
        csa.begin_mutual(50, 2, torch.Generator().manual_seed(0))
        assert csa.gates == gates
        csa.begin_mutual(50, 2, torch.Generator().manual_seed(1))
        assert csa.gates != gates


def test_batch_not_matching_the_phase_is_reported(sd_pipe):
    csa = ConsistentAttention()
    with csa.installed(sd_pipe.unet):
        csa.begin_mutual(4, 3, torch.Generator().manual_seed(0))
        with pytest.raises(StoryDiffusionError, match="images per call"):
            csa.guidance_halves(4)
