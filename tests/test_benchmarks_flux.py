"""The Flux mode of benchmarks/csa_attention.py at tiny shapes: its baselines compute what ours does."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "csa_attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("csa_attention_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def tiny(bench):
    return bench.FluxShape(height=64, text_tokens=6, heads=3)  # 4 x 4 patches, 3 heads of 128


def test_joint_mask_keeps_text_queries_on_their_own_sequence(bench):
    text, image = 2, 4
    indices = torch.tensor([[0, 3], [1, 2], [2, 3]])
    mask = bench.joint_allowed_keys_mask(indices, text, image).view(3, text + image, 3, text + image)
    assert mask[0, :, 0].all()  # image 0 sees its whole sequence
    assert not mask[0, :text, 1:].any()  # its text queries nothing of the others
    # its image queries: the image tokens the others lend (image 1: its 1 and 2; image 2: its 2 and 3)
    assert mask[0, text:, 1].tolist() == [[False, False, False, True, True, False]] * image
    assert mask[0, text:, 2].tolist() == [[False, False, False, False, True, True]] * image


def test_ours_dense_sdpa_and_the_math_path_agree(bench):
    shape = tiny(bench)
    case = bench.build_flux_case(shape, torch.device("cpu"), torch.float32, math_heads=2)
    with torch.no_grad():
        outputs = {name: run(case) for name, run in bench.FLUX_RUNNERS.items()}
        twice = bench.run_flux_ours(case)
    assert outputs["ours"].shape == (3, shape.sequence, shape.channels)
    assert outputs["official_math"].shape == (3, shape.sequence, 2 * shape.head_dim)  # the first two heads
    assert torch.equal(twice, outputs["ours"])  # every call samples the same tokens
    diffs = bench.check_agreement(outputs, torch.float32)
    assert max(diffs.values()) < 1e-5
    # text queries never see borrowed keys: their output is plain attention's
    text = slice(0, shape.text_tokens)
    torch.testing.assert_close(outputs["ours"][:, text], outputs["vanilla"][:, text], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(outputs["ours"][:, shape.text_tokens :], outputs["vanilla"][:, shape.text_tokens :])


def test_first_heads_are_the_same_function(bench):
    shape = tiny(bench)
    case = bench.build_flux_case(shape, torch.device("cpu"), torch.float32, math_heads=1)
    with torch.no_grad():
        full = bench.FluxAttnProcessor()(case.attn, case.hidden, image_rotary_emb=case.rotary)
        part = bench.FluxAttnProcessor()(case.math_attn, case.hidden, image_rotary_emb=case.rotary)
    torch.testing.assert_close(part, full[..., : shape.head_dim])


def test_kv_factors_and_the_memory_line(bench):
    shape = bench.FluxShape()  # FLUX.1 [dev] at 1024 px: 512 + 4096 tokens
    assert (shape.text_tokens, shape.image_tokens, shape.channels) == (512, 4096, 3072)
    assert bench.joint_kv_factor(shape, 0.5, 3) == pytest.approx((512 * 4608 + 4096 * 8704) / 4608**2)
    assert bench.extrapolate_to_heads({2: 30.0, 4: 50.0}, 24) == pytest.approx(250.0)


def test_the_default_flux_layers_are_every_other_single_stream_block(bench):
    layers = bench.flux_csa_layers()
    assert list(layers) == [f"single_transformer_blocks.{i}.attn" for i in range(0, 38, 2)]
    assert set(layers.values()) == {bench.FLUX_LEVEL}


def test_bank_counts_every_gated_layer_step(bench):
    shape = tiny(bench)
    quick = bench.flux_bank_figures(shape, torch.device("cpu"), quick=True)
    full = bench.flux_bank_figures(shape, torch.device("cpu"), quick=False)
    assert quick == full
    assert full.layers == 19 and 0 < full.entries < 19 * 28
    stored = 3 * 8  # 3 images x half of 16 image tokens
    per_entry = stored * shape.channels + stored * 2 + stored * 4  # int8 values, fp16 scales, int32 positions
    assert full.bytes_per_character == full.entries * per_entry
    assert full.position_bytes_per_character == full.entries * stored * 4
    assert full.official_bytes_per_character == 19 * 28 * (stored * shape.channels * 2 + stored * 4)
