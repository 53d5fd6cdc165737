"""The identity bank: what a character's reference frames leave behind for its later frames.

During the reference phase, every Consistent Self-Attention layer samples tokens from each
reference image; the bank keeps exactly those sampled hidden states (before the key/value
projections, which halves the size compared with storing K and V) for the (step, layer) pairs
where the schedule ran CSA, and nothing for the pairs it left plain. Later frames read them back.

Storage is compact on purpose: by default int8 with one fp16 scale per token (the hidden states
entering self-attention come out of a LayerNorm, so per-token absmax quantisation loses ~0.4% of a
token's largest entry), kept on the CPU so the accelerator holds none of it between reads.
A bank saves to one safetensors file together with the settings it is valid for.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from storydiffusion.errors import BankMismatchError, StoryDiffusionError

BANK_FORMAT_VERSION = 2  # 2: settings carry the scheduler config, CSA layers, adapters, weights probe
STORAGE_DTYPES = ("int8", "float16", "bfloat16", "float32")
_INT8_MAX = 127.0


@dataclass(frozen=True)
class BankSettings:
    """Everything a bank's tokens depend on; a bank is only valid for a run with equal settings."""

    model: str  # checkpoint name or folder the reference frames came from ("" when unknown)
    unet_fingerprint: str  # hash of the UNet's config: same architecture and layer names
    scheduler: str  # scheduler class: its timesteps decide what "step i" means
    num_steps: int  # denoising loop length; banks are keyed by loop index
    height: int
    width: int
    guidance_halves: int  # 2 with classifier-free guidance (uncond + cond tokens), else 1
    id_length: int  # reference frames the tokens were sampled from
    # the scheduler's config (timestep spacing, Karras sigmas, prediction type ...): the same step index
    # means the same noise level only under the same config
    scheduler_config: Mapping[str, Any] = field(default_factory=dict)
    layers: tuple[str, ...] = ()  # the CSA layers the bank was written at: a run must read at all of them
    adapters: str = ""  # the LoRA/PEFT adapters active on the UNet and text encoders, with their scales
    weights_probe: tuple[float, ...] = ()  # mean |w| of probe tensors: catches other weights of one architecture

    def mismatches(self, other: BankSettings) -> list[str]:
        """Fields whose values differ, as 'field: bank=... run=...' strings (model only when both are known)."""
        problems = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "id_length" or (f.name == "model" and not (mine and theirs)):
                continue  # any id_length reads fine; an unnamed model is checked by its fingerprint
            if f.name == "guidance_halves" and mine >= theirs:
                continue  # a guided bank serves unguided frames (its cond half)
            if f.name == "layers":
                missing = [layer for layer in mine if layer not in set(theirs)]
                if missing:
                    problems.append(
                        f"layers: the bank holds {len(missing)} CSA layer(s) the run does not install (e.g. "
                        f"{missing[0]!r}); read it with the CSAConfig layers/levels it was made with"
                    )
                continue
            if f.name == "scheduler_config":
                keys = sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k))
                problems += [f"scheduler_config.{k}: bank={mine.get(k)!r} run={theirs.get(k)!r}" for k in keys]
                continue
            if f.name == "weights_probe":
                if not probes_match(mine, theirs):
                    problems.append(
                        "weights_probe: the UNet's weights differ from the bank's (another checkpoint, fine-tune "
                        "or fused LoRA of the same architecture)"
                    )
                continue
            if mine != theirs:
                problems.append(f"{f.name}: bank={mine!r} run={theirs!r}")
        return problems

    @classmethod
    def from_json(cls, text: str) -> BankSettings:
        data = json.loads(text)
        for name in ("layers", "weights_probe"):
            data[name] = tuple(data.get(name, ()))
        return cls(**data)


def probes_match(a: tuple[float, ...], b: tuple[float, ...], rtol: float = 1e-3) -> bool:
    """Whether two weight probes come from the same weights (any storage dtype: fp32, fp16, bf16)."""
    if len(a) != len(b):
        return False
    return all(abs(x - y) <= rtol * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b))


def quantize_int8(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8: (..., C) -> int8 values (..., C) and fp16 scales (..., 1)."""
    low, high = tokens.aminmax(dim=-1, keepdim=True)  # avoids a full-size abs() temporary
    scale = torch.maximum(-low, high).float().clamp_min_(1e-8) / _INT8_MAX
    values = (tokens.float() / scale).round_().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return values, scale.to(torch.float16)


def dequantize_int8(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_int8`, in the compute dtype."""
    return (values.float() * scale.float()).to(dtype)


def _entry_key(step: int, layer: str) -> str:
    return f"{step}/{layer}"


class IdentityBank:
    """Sampled reference tokens of one character, keyed by (denoising step, CSA layer name).

    Each entry holds `(guidance_halves, tokens, channels)`: for every guidance half, the tokens
    sampled from all of the character's reference images at that step and layer.
    """

    def __init__(
        self,
        character: str,
        settings: BankSettings,
        storage_dtype: str = "int8",
        device: str | torch.device = "cpu",
    ) -> None:
        if storage_dtype not in STORAGE_DTYPES:
            raise StoryDiffusionError(f"bank_dtype={storage_dtype!r} is not supported; use one of {STORAGE_DTYPES}")
        self.character = character
        self.settings = settings
        self.storage_dtype = storage_dtype
        self.device = torch.device(device)
        self._values: dict[str, torch.Tensor] = {}
        self._scales: dict[str, torch.Tensor] = {}  # int8 storage only

    def __repr__(self) -> str:
        return (
            f"IdentityBank(character={self.character!r}, entries={len(self)}, dtype={self.storage_dtype}, "
            f"device={self.device}, bytes={self.nbytes:,})"
        )

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: tuple[int, str]) -> bool:
        return _entry_key(*key) in self._values

    def keys(self) -> Iterator[tuple[int, str]]:
        for key in self._values:
            step, layer = key.split("/", 1)
            yield int(step), layer

    def reset(self) -> None:
        self._values.clear()
        self._scales.clear()

    # -- writing and reading -------------------------------------------------------------
    def put(self, step: int, layer: str, tokens: torch.Tensor) -> None:
        """Store `tokens` (guidance_halves, num_tokens, channels) for (step, layer)."""
        key = _entry_key(step, layer)
        if self.storage_dtype == "int8":
            values, scale = quantize_int8(tokens.detach())
            self._scales[key] = scale.to(self.device)
        else:
            values = tokens.detach().to(getattr(torch, self.storage_dtype))
        # quantised on the compute device, then moved: a blocking copy, since an asynchronous
        # device-to-host copy into pageable memory could be read before it lands
        self._values[key] = values.to(self.device)

    def entry_tokens(self, step: int, layer: str) -> int:
        """How many tokens the entry (step, layer) holds per guidance half (0 when none)."""
        values = self._values.get(_entry_key(step, layer))
        return 0 if values is None else values.shape[1]

    def get(
        self, step: int, layer: str, dtype: torch.dtype, device: torch.device, guidance_halves: int
    ) -> torch.Tensor | None:
        """Tokens for (step, layer) as (guidance_halves, num_tokens, channels), or None if not stored."""
        key = _entry_key(step, layer)
        values = self._values.get(key)
        if values is None:
            return None
        values = values[-guidance_halves:]  # the cond half is last, as in diffusers' CFG batches
        if self.storage_dtype == "int8":
            scale = self._scales[key][-guidance_halves:]
            return dequantize_int8(values.to(device, non_blocking=True), scale.to(device, non_blocking=True), dtype)
        return values.to(device=device, dtype=dtype, non_blocking=True)

    # -- size ----------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Total bytes held, all devices."""
        return sum(self.nbytes_by_device().values())

    def nbytes_by_device(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for tensor in [*self._values.values(), *self._scales.values()]:
            device = str(tensor.device)
            sizes[device] = sizes.get(device, 0) + tensor.numel() * tensor.element_size()
        return sizes

    # -- files ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the bank and its settings to one safetensors file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"values/{k}": v.contiguous().cpu() for k, v in self._values.items()}
        tensors |= {f"scales/{k}": s.contiguous().cpu() for k, s in self._scales.items()}
        metadata = {
            "format": "storydiffusion.identity_bank",
            "version": str(BANK_FORMAT_VERSION),
            "character": self.character,
            "storage_dtype": self.storage_dtype,
            "settings": json.dumps(asdict(self.settings)),
        }
        tmp = path.with_name(path.name + ".partial")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)  # an interrupted save never leaves a half-written bank behind
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
        cls, path: str | Path, expected: BankSettings | None = None, device: str | torch.device = "cpu"
    ) -> IdentityBank:
        """Read a bank file; with `expected`, refuse one made under other settings."""
        path = Path(path)
        metadata = cls.read_metadata(path)
        try:
            tensors = load_file(str(path), device=str(device))
        except Exception as error:  # safetensors raises several types for a damaged file
            raise StoryDiffusionError(f"bank file {path} is not a readable safetensors file: {error}") from error
        if metadata.get("format") != "storydiffusion.identity_bank":
            raise StoryDiffusionError(f"{path} is not a storydiffusion identity bank (no bank metadata)")
        if int(metadata.get("version", "0")) != BANK_FORMAT_VERSION:
            raise StoryDiffusionError(
                f"{path} uses bank format version {metadata.get('version')}; this storydiffusion reads "
                f"version {BANK_FORMAT_VERSION}: regenerate the character"
            )
        settings = BankSettings.from_json(metadata["settings"])
        bank = cls(metadata["character"], settings, metadata["storage_dtype"], device)
        for name, tensor in tensors.items():
            kind, key = name.split("/", 1)
            (bank._values if kind == "values" else bank._scales)[key] = tensor
        if expected is not None:
            bank.check_compatible(expected, source=str(path))
        return bank

    def check_compatible(self, run: BankSettings, source: str | None = None) -> None:
        """Raise `BankMismatchError` if this bank cannot serve a run with settings `run`."""
        problems = self.settings.mismatches(run)
        if problems:
            where = f" ({source})" if source else ""
            raise BankMismatchError(
                f"identity bank of {self.character!r}{where} was made for other settings — "
                + "; ".join(problems)
                + ". Use the bank's settings for this run or regenerate the character's reference frames."
            )
