"""The CSA controller: installs Consistent Self-Attention on a UNet and owns all of its run state.

One controller per pipeline, owned by the caller — nothing lives at module level, so two
pipelines (or two UI sessions) in one process never see each other's state. The pipeline tells
the controller what phase it is in (`begin_mutual` / `begin_read`) and, through the denoising
loop's `callback_on_step_end`, which step it is on; the processors only ask.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch

from storydiffusion.csa.attention import ConsistentSelfAttnProcessor, CSAConfig, layer_level, sample_token_indices
from storydiffusion.csa.bank import IdentityBank
from storydiffusion.errors import StoryDiffusionError

Mode = Literal["off", "mutual", "read"]


def self_attention_layers(unet: Any) -> list[str]:
    """Names of a UNet's self-attention modules (`...attn1`), in processor order."""
    names = [key.removesuffix(".processor") for key in unet.attn_processors]
    return [name for name in names if name.endswith(".attn1")]


def select_layers(unet: Any, config: CSAConfig) -> dict[str, int]:
    """CSA layers chosen by `config` on `unet`, mapped to their resolution level; raises if none match."""
    num_down_blocks = len(unet.config.down_block_types)
    available = {name: layer_level(name, num_down_blocks) for name in self_attention_layers(unet)}
    chosen = {
        name: level
        for name, level in available.items()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in config.layers)
        and (config.levels is None or level in config.levels)
    }
    if not chosen:
        levels = sorted(set(available.values()))
        example = next(iter(available), "none")
        raise StoryDiffusionError(
            f"CSAConfig(layers={list(config.layers)}, levels={config.levels}) matches no self-attention layer "
            f"of this UNet ({len(available)} self-attention layers, e.g. {example!r}; levels present: {levels}). "
            "Widen the patterns or the levels."
        )
    return chosen


class ConsistentAttention:
    """Consistent Self-Attention for one UNet: the install/uninstall pair and the run state.

    >>> csa = ConsistentAttention(CSAConfig(rate=0.5))
    >>> with csa.installed(pipe.unet):
    ...     csa.begin_mutual(num_steps=50, images_per_call=3, generator=torch.Generator().manual_seed(0))
    ...     images = pipe(prompts, callback_on_step_end=csa.step_callback, ...).images
    """

    def __init__(self, config: CSAConfig | None = None) -> None:
        self.config = config or CSAConfig()
        self.layers: dict[str, int] = {}  # installed CSA layer -> resolution level
        self._unet: Any = None
        self._originals: dict[str, Any] | None = None
        self.reset()

    def reset(self) -> None:
        """Back to plain attention with no phase state (the installation is kept)."""
        self.mode: Mode = "off"
        self.step = 0
        self.num_steps = 0
        self.images_per_call = 0
        self.generator: torch.Generator | None = None
        self.gates: dict[str, list[bool]] = {}
        self.write_bank: IdentityBank | None = None
        self.read_banks: tuple[IdentityBank, ...] = ()

    def __repr__(self) -> str:
        where = "installed" if self.is_installed else "not installed"
        return (
            f"ConsistentAttention({where}, layers={len(self.layers)}, mode={self.mode!r}, "
            f"step={self.step}/{self.num_steps}, config={self.config})"
        )

    # -- installation ----------------------------------------------------------------------
    @property
    def is_installed(self) -> bool:
        return self._unet is not None

    def install(self, unet: Any) -> None:
        """Put CSA processors on the selected self-attention layers, remembering the originals."""
        if self.is_installed:
            raise StoryDiffusionError("this ConsistentAttention is already installed; call uninstall() first")
        originals = unet.attn_processors
        if any(isinstance(p, ConsistentSelfAttnProcessor) for p in originals.values()):
            raise StoryDiffusionError(
                "this UNet already runs Consistent Self-Attention from another controller; uninstall that one first"
            )
        self.layers = select_layers(unet, self.config)
        processors = dict(originals)
        for name, level in self.layers.items():
            key = f"{name}.processor"
            processors[key] = ConsistentSelfAttnProcessor(
                name, level, self.config.rate_for(level), self, originals[key]
            )
        unet.set_attn_processor(processors)
        self._unet, self._originals = unet, originals

    def uninstall(self) -> None:
        """Restore exactly the processors that were there before `install`."""
        if not self.is_installed:
            return
        self._unet.set_attn_processor(dict(self._originals))
        self._unet, self._originals = None, None
        self.reset()

    @contextmanager
    def installed(self, unet: Any) -> Iterator[ConsistentAttention]:
        self.install(unet)
        try:
            yield self
        finally:
            self.uninstall()

    # -- phases (called by the pipeline) -----------------------------------------------------
    def begin_mutual(
        self,
        num_steps: int,
        images_per_call: int,
        generator: torch.Generator,
        bank: IdentityBank | None = None,
    ) -> None:
        """Reference phase: the `images_per_call` images of each call share tokens; optionally fill `bank`."""
        self._begin("mutual", num_steps, images_per_call)
        self.generator = generator
        self.write_bank = bank
        self.gates = self.draw_gates(num_steps, generator)

    def begin_read(self, num_steps: int, images_per_call: int, banks: Sequence[IdentityBank]) -> None:
        """Frame phase: each image attends to its own tokens plus every bank in `banks` (none: plain)."""
        self._begin("read" if banks else "off", num_steps, images_per_call)
        self.read_banks = tuple(banks)

    def _begin(self, mode: Mode, num_steps: int, images_per_call: int) -> None:
        if not self.is_installed:
            raise StoryDiffusionError("install ConsistentAttention on a UNet before starting a phase")
        self.reset()
        self.mode, self.num_steps, self.images_per_call = mode, num_steps, images_per_call

    def draw_gates(self, num_steps: int, generator: torch.Generator) -> dict[str, list[bool]]:
        """Per (step, layer): run CSA or not, drawn once per phase from the phase's generator."""
        probabilities = torch.tensor([self.config.schedule.probability(s, num_steps) for s in range(num_steps)])
        draws = torch.rand(len(self.layers), num_steps, generator=generator, device=generator.device)
        gates = draws.cpu() < probabilities  # (layers, steps)
        return {name: row.tolist() for name, row in zip(self.layers, gates)}

    def set_step(self, step: int) -> None:
        self.step = step

    def step_callback(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """`callback_on_step_end` for diffusers pipelines: the loop has finished `step`."""
        self.set_step(step + 1)
        return {}

    def end(self) -> None:
        self.reset()

    # -- queries (called by the processors) --------------------------------------------------
    def guidance_halves(self, batch: int) -> int:
        """How many guidance halves (1 or 2) a layer call's batch of `batch` holds."""
        halves, remainder = divmod(batch, self.images_per_call)
        if remainder or halves not in (1, 2):
            raise StoryDiffusionError(
                f"a CSA layer saw a batch of {batch} but the phase declared {self.images_per_call} images per call; "
                "pass images_per_call = number of prompts in the pipeline call (num_images_per_prompt=1)"
            )
        return halves

    def wants_csa(self, layer: str) -> bool:
        if self.mode == "mutual":
            return self.gates[layer][self.step] if self.step < self.num_steps else False
        if self.mode == "read":
            return any((self.step, layer) in bank for bank in self.read_banks)
        return False

    def sample_indices(self, num_images: int, num_tokens: int, num_samples: int) -> torch.Tensor:
        return sample_token_indices(num_images, num_tokens, num_samples, self.generator)

    @property
    def writes(self) -> bool:
        """Whether this phase fills a bank (processors skip gathering bank tokens otherwise)."""
        return self.write_bank is not None

    def write(self, layer: str, tokens: torch.Tensor) -> None:
        if self.write_bank is not None:
            self.write_bank.put(self.step, layer, tokens)

    def read(self, layer: str, halves: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """Every read bank's tokens for this (step, layer), concatenated: (halves, M, C), or None."""
        parts = [bank.get(self.step, layer, dtype, device, halves) for bank in self.read_banks]
        parts = [p for p in parts if p is not None]
        return torch.cat(parts, dim=1) if parts else None
