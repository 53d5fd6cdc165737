"""The identity bank: what a character's reference frames leave behind for its later frames.

During the reference phase, every Consistent Self-Attention layer samples tokens from each
reference image; the bank keeps exactly those sampled hidden states (before the key/value
projections, which halves the size compared with storing K and V) for the (step, layer) pairs
where the schedule ran CSA, and nothing for the pairs it left plain. Later frames read them back.

Storage is compact on purpose: by default int8 with one fp16 scale per token (the hidden states
entering self-attention come out of a LayerNorm, so per-token absmax quantisation loses ~0.4% of a
token's largest entry), kept on the CPU so the accelerator holds none of it between reads.
A bank saves to one safetensors file together with the settings it is valid for.

Where the entries live is `BankStorage`: in RAM, or on disk — written entry by entry while the
reference phase runs and read back one (step, layer) entry at a time, so a 6 GiB SDXL bank costs a few
MiB of RAM and reads back the very bytes an in-RAM bank would hold. What is kept can be cut further, at
a measured loss (`BankCompaction`: fewer tokens, one entry for neighbouring steps; `int4` storage).

The parts live beside it: `bank_settings` (what a bank is valid for, where and how it is kept), `quantize` (the
storage codecs), `bank_file` (the safetensors file written entry by entry), `bank_disk` (a disk bank's reads).
"""

from __future__ import annotations

import hashlib
import json
import re
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from storydiffusion.csa.bank_disk import DiskState
from storydiffusion.csa.bank_file import EntryFile, _as_bytes, save_tensors
from storydiffusion.csa.bank_settings import (
    STORAGE_MODES,
    BankCompaction,
    BankSettings,
    BankStorage,
    as_storage,
    check_bank_settings,
    probes_match,
)
from storydiffusion.csa.quantize import (
    STORAGE_DTYPES,
    dequantize_int4,
    dequantize_int8,
    encode_tokens,
    int4_group,
    keep_evenly,
    quantize_int4,
    quantize_int8,
)
from storydiffusion.errors import BankMismatchError, StoryDiffusionError

# 2: settings carry the scheduler config, CSA layers, adapters, weights probe; 3: shared-step aliases,
# compaction, content digest, the recipe, int4 storage
BANK_FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # a version-2 file is a version-3 one without the additions
# tensor names of the token positions (DiTs with rotary positions: Flux): each token's place among its image's
# tokens. Files that name them "positions/" hold places in the joint text + image sequence instead, which
# shift with the T5 text length the file does not record: they are refused (`_refuse_joint_positions`)
_POSITIONS_PREFIX = "image_positions"
_JOINT_POSITIONS_PREFIX = "positions"


def _entry_key(step: int, layer: str) -> str:
    return f"{step}/{layer}"


def _natural_key(key: str) -> tuple[str | int, ...]:
    """'12/up_blocks.0.attentions.10...' sorts after '12/up_blocks.0.attentions.9...': a UNet's call order."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key))


def _tensor_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def _refuse_joint_positions(path: Path) -> None:
    """Raise `BankMismatchError` for a bank file whose token positions count from the start of the joint text +
    image sequence (written before positions were kept among the image tokens): they depend on the T5 text
    length, which such a file does not record, so no reading call can place its keys."""
    with safe_open(str(path), framework="pt") as handle:
        joint = [name for name in handle.keys() if name.startswith(f"{_JOINT_POSITIONS_PREFIX}/")]
    if joint:
        raise BankMismatchError(
            f"bank file {path} stores its tokens' positions as places in the joint text + image sequence "
            f"('{_JOINT_POSITIONS_PREFIX}/...' tensors, {len(joint)} of them), which shift with the T5 text length "
            "(max_sequence_length) the file does not record; this storydiffusion keeps each token's place among "
            f"the image tokens ('{_POSITIONS_PREFIX}/...'). Regenerate the character: delete this file and load "
            "its character file (.character.json) if it has one, or run its reference frames again"
        )


class IdentityBank:
    """Sampled reference tokens of one character, keyed by (denoising step, CSA layer name).

    Each entry holds `(guidance_halves, tokens, channels)`: for every guidance half, the tokens
    sampled from all of the character's reference images at that step and layer.

    `storage` says where entries live (`BankStorage`; "memory" by default here, `StoryPipeline` picks
    "auto"); `compaction` what is kept of them (`BankCompaction`; everything by default). `recipe` is what
    regenerates the bank (`pipelines.characters.CharacterRecipe`, as JSON); the bank only carries it.
    """

    def __init__(
        self,
        character: str,
        settings: BankSettings,
        storage_dtype: str = "int8",
        device: str | torch.device = "cpu",
        storage: BankStorage | str = "memory",
        compaction: BankCompaction | None = None,
        recipe: Mapping[str, Any] | None = None,
    ) -> None:
        if storage_dtype not in STORAGE_DTYPES:
            raise StoryDiffusionError(f"bank_dtype={storage_dtype!r} is not supported; use one of {STORAGE_DTYPES}")
        self.character = character
        self.settings = settings
        self.storage_dtype = storage_dtype
        self.device = torch.device(device)
        self.storage = as_storage(storage)
        self.compaction = compaction or BankCompaction()
        self.recipe = dict(recipe) if recipe is not None else None
        # a character given by pictures: the pictures, fitted to the story's size (a character file saves them)
        self.pictures: list[Any] = []
        if self.storage.mode == "disk" and self.device.type != "cpu":
            raise StoryDiffusionError(
                f"bank_storage='disk' keeps the bank in a file and bank_device={str(self.device)!r} asks for it on "
                "an accelerator; use bank_device='cpu' (reads go to the GPU through pinned memory) or 'memory'"
            )
        # every (step, layer) the bank answers -> the stored entry it reads (itself, or with
        # `compaction.share_steps` the entry of an earlier step of its group)
        self._present: dict[str, str] = {}
        self._values: dict[str, torch.Tensor] = {}  # in-memory entries
        self._scales: dict[str, torch.Tensor] = {}  # int8/int4 storage only
        # per stored entry, each token's place among its image's tokens (DiTs with rotary positions: Flux; a
        # read adds its own text length); int32, always in RAM (4 bytes a token against the entry's C), saved
        self._positions: dict[str, torch.Tensor] = {}
        self._memory_bytes = 0
        self._disk: DiskState | None = None  # entries on disk (all of them: a bank is in one place)
        self._close_disk: weakref.finalize | None = None
        self._order: tuple[list[str], dict[str, int]] | None = None  # stored entries in UNet call order
        self._digest = hashlib.sha256()  # of everything put, in order: a regenerated bank must match it
        self._saved_digest: str | None = None  # a loaded bank's, as its file recorded it

    def __repr__(self) -> str:
        where = "disk" if self._disk is not None else str(self.device)
        return (
            f"IdentityBank(character={self.character!r}, entries={len(self)}, dtype={self.storage_dtype}, "
            f"storage={self.storage.mode}, on={where}, bytes={self.nbytes:,})"
        )

    def __len__(self) -> int:
        return len(self._present)

    def __contains__(self, key: tuple[int, str]) -> bool:
        return _entry_key(*key) in self._present

    def keys(self) -> Iterator[tuple[int, str]]:
        for key in self._present:
            step, layer = key.split("/", 1)
            yield int(step), layer

    def reset(self) -> None:
        self._present.clear()
        self._values.clear()
        self._scales.clear()
        self._positions.clear()
        self._memory_bytes = 0
        self.close()
        self._order = None
        self._digest = hashlib.sha256()
        self._saved_digest = None

    def close(self) -> None:
        """Close a disk bank's file (a temporary one is deleted); its entries can no longer be read."""
        if self._close_disk is not None:
            self._close_disk()  # runs `DiskState.close` once, now instead of when the bank is collected
        self._disk, self._close_disk = None, None

    @property
    def on_disk(self) -> bool:
        return self._disk is not None

    @property
    def digest(self) -> str:
        """sha256 over every entry put, in order ("" for a loaded file that recorded none)."""
        return self._saved_digest if self._saved_digest is not None else self._digest.hexdigest()

    # -- writing and reading -------------------------------------------------------------
    def put(self, step: int, layer: str, tokens: torch.Tensor) -> None:
        """Store `tokens` (guidance_halves, num_tokens, channels) for (step, layer)."""
        key = _entry_key(step, layer)
        shared = self._shared_entry(step, layer)
        if shared is not None:  # compaction.share_steps: an earlier step of the group stands in (lossy)
            self._present[key] = shared
            self._digest.update(f"{key}->{shared};".encode())
            return
        values, scale = encode_tokens(keep_evenly(tokens.detach(), self.compaction.keep_tokens), self.storage_dtype)
        # quantised on the compute device, then moved: a blocking copy, since an asynchronous
        # device-to-host copy into pageable memory could be read before it lands
        values = values.to(self.device)
        scale = None if scale is None else scale.to(self.device)
        self._digest.update(key.encode())
        for part in (values, scale):
            if part is not None:
                self._digest.update(f"{part.dtype}{tuple(part.shape)}".encode())
                self._digest.update(_as_bytes(part.cpu()))
        self._store(key, values, scale)
        self._present[key] = key
        self._order = None
        if (
            self.storage.mode == "auto"
            and self._disk is None
            and self.device.type == "cpu"
            and self._memory_bytes > self.storage.memory_limit
        ):
            self._spill()

    def put_positions(self, step: int, layer: str, positions: torch.Tensor) -> None:
        """Store where the tokens `put` for (step, layer) sat in their image: (num_tokens,) indices among the
        image tokens (not in the joint text + image sequence, whose text length a reading call may change), in
        the entry's token order (kept through `compaction.keep_tokens` as the tokens are)."""
        key = _entry_key(step, layer)
        stored = self._present.get(key)
        if stored is None:
            raise StoryDiffusionError(f"put_positions({step}, {layer!r}) before put: store the tokens first")
        if stored != key:
            return  # a step sharing an earlier step's entry reads that entry's positions
        kept = keep_evenly(positions.detach()[None, :, None], self.compaction.keep_tokens)[0, :, 0]
        kept = kept.to(device="cpu", dtype=torch.int32)
        self._digest.update(f"{_POSITIONS_PREFIX}/{key}".encode())
        self._digest.update(_as_bytes(kept))
        self._positions[key] = kept

    def put_shared(
        self, layer: str, tokens: torch.Tensor, steps: list[int], positions: torch.Tensor | None = None
    ) -> None:
        """Store one entry for `layer` that every step of `steps` reads: tokens recorded once, at a fixed noise
        level (a picture's), serve the whole loop. Stored under the first step; the others are aliases (saved
        and loaded as compaction's shared steps are)."""
        if not steps:
            return
        first = _entry_key(steps[0], layer)
        self.put(steps[0], layer, tokens)
        if positions is not None:
            self.put_positions(steps[0], layer, positions)
        stored = self._present[first]
        for step in steps[1:]:
            key = _entry_key(step, layer)
            self._present[key] = stored
            self._digest.update(f"{key}->{stored};".encode())

    def get_positions(self, step: int, layer: str) -> torch.Tensor | None:
        """The positions stored for (step, layer)'s entry (`put_positions`), or None."""
        stored = self._present.get(_entry_key(step, layer))
        return None if stored is None else self._positions.get(stored)

    def _shared_entry(self, step: int, layer: str) -> str | None:
        """With `compaction.share_steps`: the stored entry of an earlier step of this step's group, if any."""
        share = self.compaction.share_steps
        for earlier in range(step - step % share, step) if share > 1 else ():
            stored = self._present.get(_entry_key(earlier, layer))
            if stored is not None:
                return stored
        return None

    def _store(self, key: str, values: torch.Tensor, scale: torch.Tensor | None) -> None:
        if self._disk is None and self.storage.mode == "disk":
            self._open_disk(EntryFile.temporary(self.storage.directory))
        if self._disk is not None:
            self._disk.file.append(f"values/{key}", values)
            if scale is not None:
                self._disk.file.append(f"scales/{key}", scale)
            return
        self._memory_bytes -= _tensor_bytes(self._values.get(key)) + _tensor_bytes(self._scales.get(key))
        self._values[key] = values
        if scale is not None:
            self._scales[key] = scale
        self._memory_bytes += _tensor_bytes(values) + _tensor_bytes(scale)

    def _open_disk(self, file: EntryFile) -> DiskState:
        state = DiskState(file, self.storage.prefetch)
        self._disk = state
        self._close_disk = weakref.finalize(self, state.close)  # the file goes with the bank, even uncollected
        return state

    def _spill(self) -> None:
        """Move every in-memory entry to a disk file ("auto" storage past its memory limit)."""
        disk = self._open_disk(EntryFile.temporary(self.storage.directory))
        for key, values in self._values.items():
            disk.file.append(f"values/{key}", values)
            if key in self._scales:
                disk.file.append(f"scales/{key}", self._scales[key])
        self._values.clear()
        self._scales.clear()
        self._memory_bytes = 0

    def _read_order(self) -> tuple[list[str], dict[str, int]]:
        """The stored entries in the order a frame reads them (step, then the UNet's layer order)."""
        if self._order is None:
            order = sorted(set(self._present.values()), key=_natural_key)
            self._order = order, {key: i for i, key in enumerate(order)}
        return self._order

    def entry_tokens(self, step: int, layer: str) -> int:
        """How many tokens the entry (step, layer) holds per guidance half (0 when none)."""
        stored = self._present.get(_entry_key(step, layer))
        if stored is None:
            return 0
        if stored in self._values:
            return self._values[stored].shape[1]
        return self._disk.file.locations[f"values/{stored}"].shape[1]

    def get(
        self, step: int, layer: str, dtype: torch.dtype, device: torch.device, guidance_halves: int
    ) -> torch.Tensor | None:
        """Tokens for (step, layer) as (guidance_halves, num_tokens, channels), or None if not stored."""
        stored = self._present.get(_entry_key(step, layer))
        if stored is None:
            return None
        device = torch.device(device)
        if stored in self._values:
            values = self._values[stored][-guidance_halves:]  # the cond half is last, as in diffusers' CFG batches
            scale = self._scales.get(stored)
            scale = None if scale is None else scale[-guidance_halves:]
        else:  # from the file, only the halves asked for; page-locked when bound for a GPU
            if self._disk is None:
                raise StoryDiffusionError(
                    f"the identity bank of {self.character!r} was closed, and its entries with it; load it again"
                )
            rows = self._disk.file.locations[f"values/{stored}"].shape[0]
            pin = device.type == "cuda"
            ahead = device.type != "cpu"  # see BankStorage.prefetch
            values, scale = self._disk.read(stored, max(0, rows - guidance_halves), pin, *self._read_order(), ahead)
        if self.storage_dtype == "int8":
            return dequantize_int8(values.to(device, non_blocking=True), scale.to(device, non_blocking=True), dtype)
        if self.storage_dtype == "int4":
            return dequantize_int4(values.to(device, non_blocking=True), scale.to(device, non_blocking=True), dtype)
        return values.to(device=device, dtype=dtype, non_blocking=True)

    # -- size ----------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """The bank's size: bytes of its stored entries, wherever they are (RAM, devices, disk)."""
        return sum(self.nbytes_by_device().values()) + self.nbytes_on_disk

    def nbytes_by_device(self) -> dict[str, int]:
        """Bytes of the entries held in memory, per device (a disk bank's entries are not among them)."""
        sizes: dict[str, int] = {}
        for tensor in [*self._values.values(), *self._scales.values(), *self._positions.values()]:
            device = str(tensor.device)
            sizes[device] = sizes.get(device, 0) + tensor.numel() * tensor.element_size()
        return sizes

    @property
    def nbytes_on_disk(self) -> int:
        return 0 if self._disk is None else self._disk.file.nbytes

    @property
    def resident_bytes(self) -> int:
        """Tensor bytes the bank holds in memory now: in-memory entries plus a disk bank's reads ahead."""
        held = 0 if self._disk is None else self._disk.held_bytes()
        return sum(self.nbytes_by_device().values()) + held

    @property
    def stored_entries(self) -> int:
        """Entries stored (fewer than `len(bank)` when neighbouring steps share one)."""
        return len(set(self._present.values()))

    # -- files ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the bank and its settings to one safetensors file.

        A disk bank streams its file's entries into it (a few MiB of RAM at a time) and reads from the saved
        file from then on, so its temporary file goes and the disk holds one copy."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": "storydiffusion.identity_bank",
            "version": str(BANK_FORMAT_VERSION),
            "character": self.character,
            "storage_dtype": self.storage_dtype,
            "settings": json.dumps(asdict(self.settings)),
            "compaction": json.dumps(asdict(self.compaction)),
            "aliases": json.dumps({key: stored for key, stored in self._present.items() if key != stored}),
            "digest": self.digest,
        }
        if self.recipe is not None:
            metadata["recipe"] = json.dumps(self.recipe)
        if self._disk is not None:
            for key, positions in self._positions.items():
                if f"{_POSITIONS_PREFIX}/{key}" not in self._disk.file.locations:
                    self._disk.file.append(f"{_POSITIONS_PREFIX}/{key}", positions)
            self._disk.swap(self._disk.file.save_safetensors(path, metadata))
            return path
        tensors = {f"values/{k}": v.contiguous().cpu() for k, v in self._values.items()}
        tensors |= {f"scales/{k}": s.contiguous().cpu() for k, s in self._scales.items()}
        tensors |= {f"{_POSITIONS_PREFIX}/{k}": p.contiguous() for k, p in self._positions.items()}
        save_tensors(path, tensors, metadata)  # atomic: a failed save leaves no half-written bank behind
        return path

    @staticmethod
    def read_metadata(path: str | Path) -> Mapping[str, str]:
        """A bank file's metadata (character, settings...) without reading its tensors."""
        path = Path(path)
        if not path.is_file():
            raise StoryDiffusionError(f"bank file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata: Mapping[str, str] = handle.metadata() or {}
        except Exception as error:  # safetensors raises several types for a damaged file
            raise StoryDiffusionError(f"bank file {path} is not a readable safetensors file: {error}") from error
        if metadata.get("format") != "storydiffusion.identity_bank":
            raise StoryDiffusionError(f"{path} is not a storydiffusion identity bank (no bank metadata)")
        return metadata

    @classmethod
    def character_in(cls, path: str | Path) -> str:
        """The name of the character a bank file holds."""
        return cls.read_metadata(path)["character"]

    @classmethod
    def load(
        cls,
        path: str | Path,
        expected: BankSettings | None = None,
        device: str | torch.device = "cpu",
        storage: BankStorage | str = "memory",
    ) -> IdentityBank:
        """Read a bank file; with `expected`, refuse one made under other settings.

        `storage` "disk" indexes the file and reads each entry when it is asked for (the file must stay
        where it is while the bank is used); "auto" does so for files larger than its memory limit."""
        path = Path(path)
        storage = as_storage(storage)
        metadata = cls.read_metadata(path)
        version = metadata.get("version", "0")
        if not version.isdigit() or int(version) not in READABLE_VERSIONS:
            raise StoryDiffusionError(
                f"{path} uses bank format version {version}; this storydiffusion reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}: regenerate the character"
            )
        _refuse_joint_positions(path)
        settings = BankSettings.from_json(metadata["settings"])
        compaction = BankCompaction(**json.loads(metadata.get("compaction", "{}")))
        recipe = json.loads(metadata["recipe"]) if "recipe" in metadata else None
        bank = cls(metadata["character"], settings, metadata["storage_dtype"], device, storage, compaction, recipe)
        lazily = storage.mode == "disk" or (
            storage.mode == "auto" and bank.device.type == "cpu" and path.stat().st_size > storage.memory_limit
        )
        if lazily:
            names = list(bank._open_disk(EntryFile.open_safetensors(path)[0]).file.locations)
            if any(name.startswith(f"{_POSITIONS_PREFIX}/") for name in names):
                with safe_open(str(path), framework="pt") as handle:
                    for name in names:
                        if name.startswith(f"{_POSITIONS_PREFIX}/"):
                            bank._positions[name.split("/", 1)[1]] = handle.get_tensor(name)
        else:
            try:
                tensors = load_file(str(path), device=str(device))
            except Exception as error:  # safetensors raises several types for a damaged file
                raise StoryDiffusionError(f"bank file {path} is not a readable safetensors file: {error}") from error
            for name, tensor in tensors.items():
                kind, key = name.split("/", 1)
                if kind == _POSITIONS_PREFIX:
                    bank._positions[key] = tensor.cpu()
                    continue
                (bank._values if kind == "values" else bank._scales)[key] = tensor
                bank._memory_bytes += _tensor_bytes(tensor)
            names = list(tensors)
        for name in names:
            kind, key = name.split("/", 1)
            if kind == "values":
                bank._present[key] = key
        bank._present.update(json.loads(metadata.get("aliases", "{}")))
        bank._saved_digest = metadata.get("digest", "")
        if expected is not None:
            bank.check_compatible(expected, source=str(path))
        return bank

    def check_compatible(self, run: BankSettings, source: str | None = None) -> None:
        """Raise `BankMismatchError` if this bank cannot serve a run with settings `run`."""
        check_bank_settings(self.character, self.settings, run, source)


# the bank and its parts (settings, storage, codecs: csa.bank_settings, csa.quantize), importable from here
__all__ = [
    "BANK_FORMAT_VERSION",
    "READABLE_VERSIONS",
    "STORAGE_DTYPES",
    "STORAGE_MODES",
    "BankCompaction",
    "BankSettings",
    "BankStorage",
    "IdentityBank",
    "as_storage",
    "check_bank_settings",
    "dequantize_int4",
    "dequantize_int8",
    "encode_tokens",
    "int4_group",
    "keep_evenly",
    "probes_match",
    "quantize_int4",
    "quantize_int8",
]
