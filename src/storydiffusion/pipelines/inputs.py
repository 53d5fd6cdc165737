"""The checks of a `StoryPipeline` call's inputs, before any drawing: the frames and characters, arguments the
story pipeline sets itself, prompts T5 would cut, and the ControlNet / IP-Adapter inputs the wrapped pipeline
needs."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from storydiffusion.csa.bank import IdentityBank
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.pipelines.frames import Frame, FrameSyntaxError, check_regions
from storydiffusion.pipelines.wrapped import _RESERVED_KWARGS, T5_WINDOW, has_ip_adapter, is_controlnet_pipeline

logger = logging.getLogger("storydiffusion.pipelines.story_pipeline")  # where these warnings always came from


def check_story_inputs(
    pipe: Any,
    kind: str,
    characters: Mapping[str, str],
    frames: Sequence[Frame],
    id_length: int,
    banks: Mapping[str, IdentityBank],
    frame_batch_size: int,
    pipeline_kwargs: Mapping[str, Any],
    control_images: Sequence[Any] | None = None,
) -> None:
    """Refuse, saying what to change, a call `StoryPipeline` cannot draw as asked (`kind`: its denoiser's)."""
    if not frames:
        raise StoryDiffusionError("frames is empty: give at least one frame")
    # only characters drawn here need id_length solo frames (`reference_frames` says which are missing); one
    # whose every character comes from a bank or pictures has no reference frames at all
    if isinstance(id_length, bool) or not isinstance(id_length, int) or id_length < 1:
        raise StoryDiffusionError(f"id_length={id_length!r} must be a whole number of at least 1")
    if frame_batch_size < 1:
        raise StoryDiffusionError(f"frame_batch_size={frame_batch_size} must be at least 1")
    for index, frame in enumerate(frames):
        if not frame.prompt.strip():
            raise StoryDiffusionError(f"frame {index} has an empty prompt")
        if frame.regions is not None:
            try:
                check_regions(frame.regions, frame.characters)
            except FrameSyntaxError as error:
                raise StoryDiffusionError(f"frame {index} ({frame.prompt!r}): {error}") from None
        for name in frame.characters:
            if name not in characters and name not in banks:
                raise StoryDiffusionError(
                    f"frame {index} ({frame.prompt!r}) names unknown character {name!r}; "
                    f"known: {sorted({*characters, *banks})}"
                )
    for name in banks:
        if name not in characters:
            raise StoryDiffusionError(f"a bank is given for {name!r}, who is not among the characters")
    reserved = sorted(_RESERVED_KWARGS & set(pipeline_kwargs))
    if reserved:
        raise StoryDiffusionError(f"{reserved} are set by StoryPipeline itself; pass them as its own arguments")
    if kind == "flux" and pipeline_kwargs.get("true_cfg_scale", 1.0) > 1:
        raise StoryDiffusionError(
            "true_cfg_scale > 1 runs Flux's transformer twice per step (with and without the negative prompt), "
            "which CSA's banks do not tell apart yet; use Flux's guidance_scale instead"
        )
    if kind != "unet":
        check_t5_lengths(pipe, kind, frames, pipeline_kwargs)
    if kind == "flux" and any(frame.negative_prompt for frame in frames):
        logger.warning(
            "Flux is guidance-distilled and takes no negative prompt: the frames' negative prompts (a style's, "
            "or the story's) are not used"
        )
    check_conditioning(pipe, len(frames), pipeline_kwargs, control_images)


def t5_tokenizer(pipe: Any, kind: str) -> Any:
    return pipe.tokenizer_2 if kind == "flux" else getattr(pipe, "tokenizer_3", None)


def check_t5_lengths(pipe: Any, kind: str, frames: Sequence[Frame], pipeline_kwargs: Mapping[str, Any]) -> None:
    """No prompt is cut silently: T5 must take every frame's whole prompt (CLIP's pooled embedding keeps its
    77-token window, as these pipelines always do)."""
    tokenizer = t5_tokenizer(pipe, kind)
    if tokenizer is None:
        return
    limit = pipeline_kwargs.get("max_sequence_length", T5_WINDOW if kind == "flux" else 256)
    for index, frame in enumerate(frames):
        for text in (frame.prompt, frame.negative_prompt or ""):
            count = len(tokenizer(text, truncation=False).input_ids)
            if count > limit:
                raise StoryDiffusionError(
                    f"frame {index} ({frame.prompt[:60]!r}...) is {count} T5 tokens long, more than "
                    f"max_sequence_length={limit}; pass a larger max_sequence_length (up to {T5_WINDOW}) "
                    "or shorten it"
                )


def check_conditioning(
    pipe: Any, num_frames: int, pipeline_kwargs: Mapping[str, Any], control_images: Sequence[Any] | None
) -> None:
    """ControlNet and IP-Adapter inputs: present where the wrapped pipeline needs them, absent elsewhere."""
    name = type(pipe).__name__
    if not is_controlnet_pipeline(pipe):
        if control_images is not None or "image" in pipeline_kwargs:
            given = "control_images" if control_images is not None else "image"
            raise StoryDiffusionError(
                f"{given}= is a ControlNet's control image, but {name} has no controlnet; drop it or wrap a "
                "StableDiffusionControlNetPipeline / StableDiffusionXLControlNetPipeline"
            )
    elif control_images is not None:
        if "image" in pipeline_kwargs:
            raise StoryDiffusionError(
                "both image= (one control image for every frame) and control_images= (one per frame) are given; "
                "pass one of them"
            )
        if isinstance(control_images, str) or not isinstance(control_images, Sequence):
            raise StoryDiffusionError(
                f"control_images must be a sequence with one control image per frame, got a "
                f"{type(control_images).__name__}; for one image shared by all frames pass image= instead"
            )
        if len(control_images) != num_frames:
            raise StoryDiffusionError(
                f"control_images has {len(control_images)} images for {num_frames} frames; give one per frame "
                "(or image= for one shared by all)"
            )
        nets = getattr(pipe.controlnet, "nets", None)  # a MultiControlNetModel
        for index, images in enumerate(control_images):
            if images is None:
                raise StoryDiffusionError(f"control_images[{index}] is None; give every frame a control image")
            if nets is not None and (not isinstance(images, Sequence) or len(images) != len(nets)):
                raise StoryDiffusionError(
                    f"control_images[{index}] must be a list of {len(nets)} images, one per ControlNet of "
                    f"{name}'s MultiControlNetModel"
                )
    elif pipeline_kwargs.get("image") is None:
        raise StoryDiffusionError(
            f"{name} needs a control image: pass image= (one for every frame) or control_images= (one per frame)"
        )
    if has_ip_adapter(pipe) and all(
        pipeline_kwargs.get(key) is None for key in ("ip_adapter_image", "ip_adapter_image_embeds")
    ):
        raise StoryDiffusionError(
            f"{name} has an IP-Adapter loaded, which needs ip_adapter_image= (or ip_adapter_image_embeds=) "
            "on every call; pass one, or pipe.unload_ip_adapter() first"
        )
