"""storydiffusion: consistent characters across story panels, on diffusers."""

from importlib import import_module
from typing import Any

from .csa.attention import ConsistentSelfAttnProcessor, CSAConfig, CSASchedule
from .csa.bank import BankSettings, IdentityBank
from .csa.controller import ConsistentAttention
from .csa.joint import FluxConsistentAttnProcessor, JointConsistentAttnProcessor, SD3ConsistentAttnProcessor
from .errors import BankMismatchError, StoryDiffusionError

# Heavier pieces load on first use, so `import storydiffusion` stays quick for the command line.
_LAZY = {
    "StoryPipeline": "pipelines.story_pipeline",
    "StoryPipelineOutput": "pipelines.story_pipeline",
    "Frame": "pipelines.story_pipeline",
    "FrameInfo": "pipelines.story_pipeline",
    "Story": "story.format",
    "StorySettings": "story.format",
    "StoryFormatError": "story.format",
    "ComicLayout": "story.comic",
    "make_comic": "story.comic",
    "save_comic": "story.comic",
    "apply_style": "story.styles",
    "style_names": "story.styles",
    "SemanticMotionPredictor": "video.smp",
    "TransitionPipeline": "video.pipeline",
    "FLF2VBackend": "video.flf2v",
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
    "FluxConsistentAttnProcessor",
    "IdentityBank",
    "JointConsistentAttnProcessor",
    "SD3ConsistentAttnProcessor",
    "StoryDiffusionError",
    *_LAZY,
]
__version__ = "0.1.0"
