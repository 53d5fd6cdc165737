"""Which dtype to load a model in, and the dtype keyword of `from_pretrained` spelled the way the installed
library wants it.

Diffusers from 0.40 and transformers from 4.56 take `dtype=` and warn about the older `torch_dtype=`; older
releases take only `torch_dtype=`: the installed version decides.
`from_pretrained(path, **dtype_kwargs(torch.float32))` loads in that dtype without a warning on either.
`auto_dtype` picks the dtype itself, by device and by the kind of denoiser (`checkpoint_kind`).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch

# the first releases whose `from_pretrained` take `dtype=` (and warn about `torch_dtype=`)
DIFFUSERS_DTYPE_SINCE = (0, 40)
TRANSFORMERS_DTYPE_SINCE = (4, 56)


def _release(version: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(version).release


@cache
def _diffusers_takes_dtype() -> bool:
    import diffusers

    return _release(diffusers.__version__) >= DIFFUSERS_DTYPE_SINCE


@cache
def _transformers_takes_dtype() -> bool:
    import transformers

    return _release(transformers.__version__) >= TRANSFORMERS_DTYPE_SINCE


def dtype_kwargs(dtype: Any, library: Literal["diffusers", "transformers"] = "diffusers") -> dict[str, Any]:
    """`{"dtype": dtype}` where `library`'s `from_pretrained` takes `dtype`, else `{"torch_dtype": dtype}`.

    `library` is the one whose `from_pretrained` is called: "diffusers" for pipelines and diffusers
    models (a pipeline hands the dtype on to its transformers parts itself), "transformers" for a
    `CLIPModel`, `CLIPTextModel`...
    """
    if library == "diffusers":
        new = _diffusers_takes_dtype()
    elif library == "transformers":
        new = _transformers_takes_dtype()
    else:
        raise ValueError(f"library={library!r}: give 'diffusers' or 'transformers'")
    return {"dtype" if new else "torch_dtype": dtype}


def checkpoint_kind(model: str) -> Literal["unet", "flux", "sd3"]:
    """Which denoiser a checkpoint (folder or hub id) holds, from its model_index.json alone (nothing is loaded):
    "flux" or "sd3" for a Flux / SD3 transformer, else "unet" (also when the index cannot be read: loading then
    reports why)."""
    from huggingface_hub import hf_hub_download

    try:
        path = Path(model) / "model_index.json" if Path(model).is_dir() else hf_hub_download(model, "model_index.json")
        index = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no such folder or repo, offline and not cached, not JSON
        return "unet"
    transformer = index.get("transformer") if isinstance(index, dict) else None
    name = transformer[1] if isinstance(transformer, list | tuple) and len(transformer) == 2 else ""
    if not isinstance(name, str):
        return "unet"
    return "flux" if name.startswith("Flux") else "sd3" if name.startswith("SD3") else "unet"


def supports_bfloat16(device: str | torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively (a CUDA GPU from Ampere on, Apple silicon on recent macOS)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:  # without emulation: before Ampere, bfloat16 runs emulated and slow
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.3 has no emulation to leave out
            return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device=device)
        except (RuntimeError, TypeError):
            return False
        return True
    return False


def auto_dtype(device: str | torch.device, kind: Literal["unet", "flux", "sd3"] = "unet") -> torch.dtype:
    """The dtype `--dtype auto` loads a model in: float32 on the CPU; on an accelerator float16 for a UNet and
    bfloat16 for a DiT (Flux, SD3) where the device has it — diffusers advises against float16 there, whose
    T5 activations overflow — else float16."""
    if torch.device(device).type == "cpu":
        return torch.float32
    if kind != "unet" and supports_bfloat16(device):
        return torch.bfloat16
    return torch.float16
