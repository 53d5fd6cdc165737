"""storydiffusion: consistent characters across story panels, on diffusers."""

from importlib import import_module
from typing import Any

from .attention import ConsistentSelfAttnProcessor, CSAConfig, CSASchedule
from .bank import BankSettings, IdentityBank
from .controller import ConsistentAttention
from .errors import BankMismatchError, StoryDiffusionError

# Heavier pieces load on first use, so `import storydiffusion` stays quick for the command line.
_LAZY = {
    "StoryPipeline": "pipeline",
    "StoryPipelineOutput": "pipeline",
    "Frame": "pipeline",
    "FrameInfo": "pipeline",
    "Story": "story",
    "StorySettings": "story",
    "StoryFormatError": "story",
    "ComicLayout": "comic",
    "make_comic": "comic",
    "save_comic": "comic",
    "apply_style": "styles",
    "style_names": "styles",
    "SemanticMotionPredictor": "video.smp",
    "TransitionPipeline": "video.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'storydiffusion' has no attribute {name!r}")


__all__ = [
    "BankMismatchError",
    "BankSettings",
    "CSAConfig",
    "CSASchedule",
    "ConsistentAttention",
    "ConsistentSelfAttnProcessor",
    "IdentityBank",
    "StoryDiffusionError",
    *_LAZY,
]
__version__ = "0.1.0"
