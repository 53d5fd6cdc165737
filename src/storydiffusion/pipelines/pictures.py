"""Characters given by pictures: a user's drawing or photo, or a finished reference image, as an identity bank.

A picture becomes a bank the way a reference image does, except that its latent is known: it is encoded with
the pipeline's VAE at the story's size, noised to a level (`CSAConfig.reference_noise`: each step's own level,
or one fixed level for the whole loop), and the denoiser runs on it once per level with the character's
description, while the CSA layers record the tokens it lends (`ConsistentAttention.begin_record`). The
pipeline's own call does the text encoding, guidance batching and conditioning (IP-Adapter, LoRA...); only the
denoiser's input and timestep are swapped for the noised picture's (`denoiser_input`).

This module holds the pure parts: reading and fitting pictures, encoding, noising and the input swap.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from storydiffusion.errors import StoryDiffusionError

logger = logging.getLogger(__name__)

# More pictures add tokens to every frame's attention (each lends rate x its tokens) for little more identity;
# eight is already more than the references a story draws.
MAX_PICTURES = 8


@dataclass(frozen=True)
class Picture:
    """One picture of a character, fitted to the story's size."""

    image: Image.Image  # RGB, exactly the story's width x height
    digest: str  # sha256 of its RGB pixels and size: what a character file checks
    source: str  # where it came from, for messages


def pixels_digest(image: Image.Image) -> str:
    return hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()


def _as_image(item: Any, where: str) -> Image.Image:
    """A PIL image from a path, a PIL image, an (H, W, 3) array or a (3, H, W) tensor in [0, 1]."""
    if isinstance(item, str | Path):
        path = Path(item)
        if not path.is_file():
            raise StoryDiffusionError(f"{where}: picture file {path} does not exist")
        try:
            with Image.open(path) as opened:
                opened.load()
                return opened.copy()
        except (UnidentifiedImageError, OSError) as error:
            raise StoryDiffusionError(f"{where}: cannot read picture {path} as an image ({error})") from None
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, torch.Tensor):
        item = item.detach().float().cpu().numpy()
        if item.ndim == 3 and item.shape[0] in (1, 3, 4):
            item = item.transpose(1, 2, 0)
    if isinstance(item, np.ndarray):
        array = item
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        try:
            return Image.fromarray(array)
        except TypeError as error:
            raise StoryDiffusionError(f"{where}: an array of shape {item.shape} is not an image ({error})") from None
    raise StoryDiffusionError(
        f"{where}: a picture must be a file path, a PIL image, an (H, W, 3) array or a (3, H, W) tensor, "
        f"got a {type(item).__name__}"
    )


def fit_picture(item: Any, height: int, width: int, where: str) -> tuple[Picture, list[str]]:
    """The picture as RGB at width x height (resized to cover, then centre-cropped) and notes on what was changed."""
    image = _as_image(item, where)
    notes = []
    mode = image.mode
    if mode != "RGB":
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
            notes.append(f"{where}: converted from {mode} to RGB, transparent parts on white")
        else:
            notes.append(f"{where}: converted from {mode} to RGB")
            image = image.convert("RGB")
    if image.size != (width, height):
        notes.append(f"{where}: {image.width}x{image.height} resized to cover {width}x{height} and centre-cropped")
        image = ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    source = str(item) if isinstance(item, str | Path) else where
    return Picture(image, pixels_digest(image), source), notes


def fit_character_pictures(
    character_images: Mapping[str, Sequence[Any]], characters: Mapping[str, str], height: int, width: int
) -> dict[str, list[Picture]]:
    """Every character's pictures fitted to the story's size, checked; what was converted is logged."""
    fitted: dict[str, list[Picture]] = {}
    for name, items in character_images.items():
        if name not in characters:
            raise StoryDiffusionError(
                f"pictures are given for {name!r}, who is not among the characters ({sorted(characters)}); "
                "name a defined character or add it"
            )
        if isinstance(items, str | Path | Image.Image | np.ndarray | torch.Tensor):
            items = [items]
        if not items:
            raise StoryDiffusionError(f"character {name!r}: an empty list of pictures; give at least one or none")
        if len(items) > MAX_PICTURES:
            raise StoryDiffusionError(
                f"character {name!r} has {len(items)} pictures; at most {MAX_PICTURES} are read (each lends its "
                "tokens to every frame, so more cost memory and time for little more likeness): pick the clearest"
            )
        fitted[name] = []
        for index, item in enumerate(items):
            picture, notes = fit_picture(item, height, width, f"picture {index + 1} of {name!r}")
            for note in notes:
                logger.warning(note)
            fitted[name].append(picture)
    return fitted


def picture_pixels(pictures: Sequence[Picture]) -> torch.Tensor:
    """(n, 3, H, W) float32 in [-1, 1]."""
    arrays = np.stack([np.asarray(p.image, dtype=np.float32) for p in pictures]) / 127.5 - 1.0
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def encode_pictures(vae: Any, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The pictures' latents as the denoiser sees clean ones: the posterior mode, shifted and scaled as the
    pipelines scale theirs. A VAE that asks for float32 (`force_upcast`, SDXL's) encodes in float32."""
    dtype = vae.dtype
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode()
    finally:
        if upcast:
            vae.to(dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents.float() - shift) * vae.config.scaling_factor).to(dtype)


def noised(latents: torch.Tensor, noise: torch.Tensor, timestep: float, scheduler: Any, flow: bool) -> torch.Tensor:
    """Clean latents at `timestep`: flow matching (Flux, SD3) `(1 - s) x0 + s e` with s = t / T; else the
    variance-preserving `sqrt(a) x0 + sqrt(1 - a) e` every UNet takes (whatever form its scheduler steps in)."""
    total = scheduler.config.num_train_timesteps
    if flow:
        s = float(timestep) / total
        return ((1 - s) * latents.float() + s * noise.float()).to(latents.dtype)
    alphas = scheduler.alphas_cumprod
    a = float(alphas[min(len(alphas) - 1, max(0, round(float(timestep))))])
    return (a**0.5 * latents.float() + (1 - a) ** 0.5 * noise.float()).to(latents.dtype)


def fixed_level_timestep(level: float, scheduler: Any, flow: bool) -> float:
    """The timestep of a fixed noise level (0 clean ... 1 pure noise) on the denoiser's scale."""
    total = scheduler.config.num_train_timesteps
    return level * total if flow else float(round(level * (total - 1)))


@contextmanager
def denoiser_input(denoiser: Any, sample: torch.Tensor, timestep: float, timestep_scale: float) -> Iterator[None]:
    """While active, every call of `denoiser` runs on `sample` (repeated over the call's guidance halves) at
    `timestep` (divided by `timestep_scale`: Flux's transformer takes t / 1000) instead of what the pipeline
    passes. The hook runs before CSA's, which then finds the step from this timestep."""

    def swap(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        name = "sample" if "sample" in kwargs or not hasattr(module.config, "patch_size") else "hidden_states"
        current = args[0] if args else kwargs[name]
        halves = current.shape[0] // sample.shape[0]
        replaced = sample.to(current.device, current.dtype).repeat(halves, *[1] * (sample.ndim - 1))
        given = args[1] if len(args) > 1 else kwargs["timestep"]
        given = torch.as_tensor(given, device=current.device)
        value = timestep / timestep_scale
        new_timestep = torch.full_like(given, round(value) if not given.is_floating_point() else value)
        if args:
            args = (replaced, *args[1:])
        else:
            kwargs[name] = replaced
        if len(args) > 1:
            args = (args[0], new_timestep, *args[2:])
        else:
            kwargs["timestep"] = new_timestep
        return args, kwargs

    handle = denoiser.register_forward_pre_hook(swap, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()


def images_as_pixels(images: Sequence[Any]) -> torch.Tensor:
    """Finished images (PIL, (H, W, 3) arrays or (3, H, W) tensors in [0, 1]) as (n, 3, H, W) in [-1, 1], through
    8-bit RGB whatever their type, so a bank made from them is the same for every output_type."""
    arrays = []
    for image in images:
        if isinstance(image, torch.Tensor):
            image = image.detach().float().cpu().permute(1, 2, 0).numpy()
        if isinstance(image, np.ndarray):
            array = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        else:
            array = np.asarray(image.convert("RGB"))
        arrays.append(array.astype(np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
