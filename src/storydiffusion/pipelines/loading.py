"""The dtype keyword of `from_pretrained`, spelled the way the installed library wants it.

Recent diffusers (0.42 here; told apart by what its `from_pretrained` reads) and transformers (4.56 on)
take `dtype=` and warn about the older `torch_dtype=`; older releases take only `torch_dtype=`.
`from_pretrained(path, **dtype_kwargs(torch.float32))` loads in that dtype without a warning on either.
"""

from __future__ import annotations

import inspect
import re
from functools import cache
from typing import Any, Literal

_POPS_DTYPE = re.compile(r"""\.pop\(\s*["']dtype["']""")


def _takes_dtype(function: Any) -> bool:
    """Whether `function` takes a `dtype` keyword: a parameter of that name, or one it pops from **kwargs."""
    function = inspect.unwrap(getattr(function, "__func__", function))
    try:
        if "dtype" in inspect.signature(function).parameters:
            return True
        return bool(_POPS_DTYPE.search(inspect.getsource(function)))
    except (OSError, TypeError, ValueError):  # no source (a frozen install): the old spelling always works
        return False


@cache
def _diffusers_takes_dtype() -> bool:
    from diffusers import DiffusionPipeline, ModelMixin

    return _takes_dtype(DiffusionPipeline.from_pretrained) and _takes_dtype(ModelMixin.from_pretrained)


@cache
def _transformers_takes_dtype() -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__).release >= (4, 56)


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
