"""storydiffusion: consistent characters across story panels, on diffusers."""

from importlib import import_module
from typing import Any

from .errors import BankMismatchError, StoryDiffusionError

# Everything that needs torch loads on first use, so `import storydiffusion` (and the command line checking a
# story file) stays quick.
_LAZY = {
    "ConsistentSelfAttnProcessor": "csa.attention",
    "CSAConfig": "csa.attention",
    "CSASchedule": "csa.attention",
    "BankSettings": "csa.bank",
    "IdentityBank": "csa.bank",
    "ConsistentAttention": "csa.controller",
    "FluxConsistentAttnProcessor": "csa.joint",
    "JointConsistentAttnProcessor": "csa.joint",
    "SD3ConsistentAttnProcessor": "csa.joint",
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


def __dir__() -> list[str]:
    return sorted(__all__)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'storydiffusion' has no attribute {name!r}")


__all__ = ["BankMismatchError", "StoryDiffusionError", *_LAZY]
__version__ = "0.1.0"
