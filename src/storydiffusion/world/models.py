"""The tiny world's model family shipped inside the package, and its short names.

`assets/tiny/` is a `StableDiffusionPipeline` folder (unet/, vae/, text_encoder/, tokenizer/,
scheduler/, model_index.json) trained on the tiny world (`storydiffusion.world.render`) by the scripts in
`scripts/`; `assets/tiny/clip/` holds the tiny CLIP (`CLIPModel` + processor) whose text tower is the
pipeline's text encoder. Both load offline with the usual `from_pretrained`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

TINY = "tiny"  # short name of the shipped model, wherever a model id or folder is taken
TINY_DIR = Path(str(files("storydiffusion") / "assets" / "tiny"))
TINY_CLIP_DIR = TINY_DIR / "clip"
TINY_VIDEO_DIR = TINY_DIR.parent / "tiny_video"  # the shipped tiny TransitionPipeline
TINY_SIZE = 64  # the panel size the tiny model was trained on


def tiny_model_available() -> bool:
    """Whether the shipped tiny pipeline's files are in the package."""
    return (TINY_DIR / "model_index.json").is_file() and (TINY_DIR / "unet" / "config.json").is_file()


def resolve_model(model: str) -> str:
    """`tiny` -> the shipped pipeline folder; anything else (hub id, folder) unchanged."""
    return str(TINY_DIR) if model == TINY else model


def resolve_clip(model: str) -> str:
    """`tiny` -> the shipped tiny CLIP folder; anything else (hub id, folder) unchanged."""
    return str(TINY_CLIP_DIR) if model == TINY else model


def resolve_video_model(model: str) -> str:
    """`tiny` -> the shipped tiny transition (video) pipeline folder; anything else unchanged."""
    return str(TINY_VIDEO_DIR) if model == TINY else model
