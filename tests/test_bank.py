"""Identity bank: storage formats, sizes, files, refusal of mismatched banks."""

import dataclasses

import pytest
import torch

from storydiffusion import BankMismatchError, BankSettings, IdentityBank, StoryDiffusionError
from storydiffusion.csa.bank import dequantize_int8, quantize_int8

SETTINGS = BankSettings(
    model="tiny", denoiser_fingerprint="abc", scheduler="EulerDiscreteScheduler", num_steps=4,
    height=64, width=64, guidance_halves=2, id_length=2,
)  # fmt: skip


def test_int8_quantisation_is_accurate_per_token():
    tokens = torch.nn.functional.layer_norm(torch.randn(2, 50, 64), (64,))
    values, scale = quantize_int8(tokens)
    assert values.dtype == torch.int8 and scale.shape == (2, 50, 1)
    error = (dequantize_int8(values, scale, torch.float32) - tokens).abs()
    assert error.max() <= tokens.abs().amax() / 127  # at most half a step of the largest token, with margin


@pytest.mark.parametrize("dtype", ["int8", "float16", "float32"])
def test_put_get_and_size(dtype):
    bank = IdentityBank("Bob", SETTINGS, storage_dtype=dtype)
    tokens = torch.randn(2, 10, 8)
    bank.put(1, "up.attn1", tokens)
    assert (1, "up.attn1") in bank and (2, "up.attn1") not in bank and len(bank) == 1
    both = bank.get(1, "up.attn1", torch.float32, torch.device("cpu"), guidance_halves=2)
    cond_only = bank.get(1, "up.attn1", torch.float32, torch.device("cpu"), guidance_halves=1)
    torch.testing.assert_close(both, tokens, atol=0.05, rtol=0.05)
    torch.testing.assert_close(cond_only, both[1:])
    assert bank.get(0, "up.attn1", torch.float32, torch.device("cpu"), 2) is None
    element = {"int8": 1, "float16": 2, "float32": 4}[dtype]
    expected = tokens.numel() * element + (2 * 10 * 2 if dtype == "int8" else 0)
    assert bank.nbytes == expected and bank.nbytes_by_device() == {"cpu": expected}


def test_save_load_roundtrip(tmp_path):
    bank = IdentityBank("Bob", SETTINGS)
    bank.put(0, "a.attn1", torch.randn(2, 4, 8))
    bank.put(3, "b.attn1", torch.randn(2, 4, 8))
    path = bank.save(tmp_path / "bob.safetensors")
    loaded = IdentityBank.load(path, expected=SETTINGS)
    assert loaded.character == "Bob" and loaded.settings == SETTINGS and sorted(loaded.keys()) == sorted(bank.keys())
    for step, layer in bank.keys():
        a = bank.get(step, layer, torch.float32, torch.device("cpu"), 2)
        assert torch.equal(a, loaded.get(step, layer, torch.float32, torch.device("cpu"), 2))
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    "change",
    [{"height": 128}, {"num_steps": 50}, {"denoiser_fingerprint": "zzz"}, {"model": "sdxl"}, {"scheduler": "DDIM"}],
)
def test_mismatched_bank_is_refused(tmp_path, change):
    path = IdentityBank("Bob", SETTINGS).save(tmp_path / "bob.safetensors")
    field = next(iter(change))
    with pytest.raises(BankMismatchError, match=field):
        IdentityBank.load(path, expected=dataclasses.replace(SETTINGS, **change))


def test_compatible_differences_are_accepted():
    bank = IdentityBank("Bob", SETTINGS)
    bank.check_compatible(dataclasses.replace(SETTINGS, id_length=4, guidance_halves=1, model=""))
    with pytest.raises(BankMismatchError, match="guidance_halves"):
        IdentityBank("Bob", dataclasses.replace(SETTINGS, guidance_halves=1)).check_compatible(SETTINGS)


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(StoryDiffusionError, match="does not exist"):
        IdentityBank.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(StoryDiffusionError, match="not a readable safetensors"):
        IdentityBank.load(junk)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(StoryDiffusionError, match="not a storydiffusion identity bank"):
        IdentityBank.load(tmp_path / "other.safetensors")


def test_unknown_storage_dtype_is_refused():
    with pytest.raises(StoryDiffusionError, match="bank_dtype"):
        IdentityBank("Bob", SETTINGS, storage_dtype="int3")
