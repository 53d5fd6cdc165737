"""Token positions in a bank (Flux): kept as places among the image tokens; files that kept places in the joint
text + image sequence, which shift with the T5 text length, are refused with an error naming the field."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from storydiffusion.csa.bank import BankSettings, IdentityBank
from storydiffusion.errors import BankMismatchError

SETTINGS = BankSettings("", "", "", 1, 32, 32, 1, 1)


def _flux_like_bank() -> IdentityBank:
    bank = IdentityBank("Bob", SETTINGS, "float32")
    bank.put(0, "layer", torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0)))
    bank.put_positions(0, "layer", torch.tensor([0, 3, 5, 15]))
    return bank


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_positions_round_trip_as_places_among_the_image_tokens(storage, tmp_path):
    path = _flux_like_bank().save(tmp_path / "bob.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["image_positions/0/layer", "values/0/layer"]
    loaded = IdentityBank.load(path, storage=storage)
    assert torch.equal(loaded.get_positions(0, "layer"), torch.tensor([0, 3, 5, 15], dtype=torch.int32))


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_a_file_with_joint_sequence_positions_is_refused(storage, tmp_path):
    """A file written before positions were image-token places holds `positions/...`: text length + place. The
    file does not record that text length, so no read can place the keys: one clear error naming the field."""
    path = _flux_like_bank().save(tmp_path / "bob.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    old = tmp_path / "old.safetensors"
    joint = {"positions/0/layer": tensors.pop("image_positions/0/layer") + 512}  # T5 padded to 512 tokens
    save_file({**tensors, **joint}, str(old), metadata=metadata)
    with pytest.raises(BankMismatchError, match=r"'positions/\.\.\.' tensors.*max_sequence_length.*Regenerate"):
        IdentityBank.load(old, storage=storage)
