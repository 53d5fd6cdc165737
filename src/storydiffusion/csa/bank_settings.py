"""What a bank is valid for and how it is kept: `BankSettings` (everything its tokens depend on, and the check
that a run matches them), `BankStorage` (RAM, disk or both) and `BankCompaction` (lossy size cuts)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from storydiffusion.errors import BankMismatchError, StoryDiffusionError

STORAGE_MODES = ("memory", "disk", "auto")


@dataclass(frozen=True)
class BankStorage:
    """Where a bank's entries live. Every mode reads back exactly the bytes that were stored."""

    # "memory": in RAM (or on the bank's device). "disk": in a file, written entry by entry during the
    # reference phase and read back one (step, layer) entry at a time, so RAM holds a few entries, not the
    # bank. "auto": in RAM until the bank passes `memory_limit` bytes, then moved to disk.
    mode: str = "memory"
    directory: str | None = None  # folder for disk banks' files; None: tempfile's default ($TMPDIR)
    memory_limit: int = 256 << 20  # "auto": bytes a bank may hold in RAM before it moves to disk
    # disk, reads bound for a GPU: entries read ahead, in (step, layer) order, on a background thread while
    # the GPU computes. Reads for CPU compute stay in line: there a second thread only competes with the
    # compute for the cores (measured: reads 1.2-1.5x slower with read-ahead on 2 busy cores)
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.mode not in STORAGE_MODES:
            raise StoryDiffusionError(f"bank_storage={self.mode!r} is not supported; use one of {STORAGE_MODES}")
        if self.memory_limit < 0 or self.prefetch < 0:
            raise StoryDiffusionError(
                f"BankStorage(memory_limit={self.memory_limit}, prefetch={self.prefetch}): both must be >= 0"
            )


def as_storage(value: BankStorage | str) -> BankStorage:
    """A `BankStorage` from itself or its mode's name ("memory", "disk", "auto")."""
    return value if isinstance(value, BankStorage) else BankStorage(mode=value)


@dataclass(frozen=True)
class BankCompaction:
    """Lossy ways to make a bank smaller; the defaults keep everything (the exact bank)."""

    keep_tokens: float = 1.0  # share of each entry's sampled tokens kept, evenly spaced over them
    # neighbouring steps sharing one entry: a step reads the first entry written in its group of
    # `share_steps` (s // share_steps equal), at the (step, layer) pairs the schedule ran CSA at
    share_steps: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_tokens <= 1.0:
            raise StoryDiffusionError(f"BankCompaction.keep_tokens={self.keep_tokens} must be in (0, 1]")
        if not isinstance(self.share_steps, int) or self.share_steps < 1:
            raise StoryDiffusionError(f"BankCompaction.share_steps={self.share_steps!r} must be an integer >= 1")

    @property
    def exact(self) -> bool:
        return self.keep_tokens == 1.0 and self.share_steps == 1


@dataclass(frozen=True)
class BankSettings:
    """Everything a bank's tokens depend on; a bank is only valid for a run with equal settings."""

    model: str  # checkpoint name or folder the reference frames came from ("" when unknown)
    denoiser_fingerprint: str  # hash of the UNet's or transformer's config: same architecture and layer names
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
    adapters: str = ""  # the LoRA/PEFT adapters active on the denoiser and text encoders, with their scales
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
                        "weights_probe: the denoiser's weights differ from the bank's (another checkpoint, fine-tune "
                        "or fused LoRA of the same architecture)"
                    )
                continue
            if mine != theirs:
                problems.append(f"{f.name}: bank={mine!r} run={theirs!r}")
        return problems

    @classmethod
    def from_json(cls, text: str) -> BankSettings:
        data = json.loads(text)
        if "unet_fingerprint" in data:  # written before the field's rename
            data["denoiser_fingerprint"] = data.pop("unet_fingerprint")
        for name in ("layers", "weights_probe"):
            data[name] = tuple(data.get(name, ()))
        return cls(**data)


def probes_match(a: tuple[float, ...], b: tuple[float, ...], rtol: float = 1e-3) -> bool:
    """Whether two weight probes come from the same weights (any storage dtype: fp32, fp16, bf16)."""
    if len(a) != len(b):
        return False
    return all(abs(x - y) <= rtol * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b))


def check_bank_settings(character: str, bank: BankSettings, run: BankSettings, source: str | None = None) -> None:
    """Raise `BankMismatchError` if a bank of `character` made under `bank` settings cannot serve `run`."""
    problems = bank.mismatches(run)
    if problems:
        where = f" ({source})" if source else ""
        raise BankMismatchError(
            f"identity bank of {character!r}{where} was made for other settings — "
            + "; ".join(problems)
            + ". Use the bank's settings for this run or regenerate the character's reference frames."
        )
