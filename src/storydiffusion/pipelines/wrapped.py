"""The diffusers pipeline a `StoryPipeline` wraps: which ones it can drive, their denoiser, and fingerprints of
what decides a bank's tokens (the denoiser's config and weights, active LoRA adapters)."""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from storydiffusion.errors import StoryDiffusionError

# arguments StoryPipeline sets itself on every call of the wrapped pipeline
_RESERVED_KWARGS = {
    "prompt", "negative_prompt", "generator", "num_images_per_prompt",
    "latents", "prompt_embeds", "negative_prompt_embeds", "height", "width", "num_inference_steps",
    "guidance_scale", "output_type", "timesteps", "sigmas", "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
}  # fmt: skip

# pipelines whose text-to-image loop StoryPipeline drives (subclasses too): the SD/SDXL UNet and loop,
# ControlNet on top, and any of them with an IP-Adapter or LoRA loaded; Flux.1 and SD3/3.5
UNET_PIPELINES = (
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
)
DIT_PIPELINES = (FluxPipeline, StableDiffusion3Pipeline)
SUPPORTED_PIPELINES = UNET_PIPELINES + DIT_PIPELINES
T5_WINDOW = 512  # the longest T5 sequence Flux and SD3 take (their pipelines refuse more)


def check_pipeline(pipe: Any) -> None:
    """Raise a StoryDiffusionError saying why, unless StoryPipeline can drive `pipe`."""
    if isinstance(pipe, SUPPORTED_PIPELINES):
        if isinstance(pipe, DIT_PIPELINES) and getattr(pipe, "transformer", None) is None:
            raise StoryDiffusionError(f"{type(pipe).__name__} has no transformer loaded (`pipe.transformer` is None)")
        return
    name = type(pipe).__name__
    accepted = ", ".join(cls.__name__ for cls in SUPPORTED_PIPELINES)
    if not isinstance(pipe, DiffusionPipeline):
        raise StoryDiffusionError(f"StoryPipeline wraps a diffusers pipeline ({accepted}), got a {name}")
    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        raise StoryDiffusionError(
            f"{name} has no UNet2DConditionModel at `pipe.unet`, and Consistent Self-Attention runs in the "
            f"self-attention layers of one; StoryPipeline wraps {accepted}"
        )
    parameters = inspect.signature(pipe.__call__).parameters
    if "strength" in parameters or "mask_image" in parameters:
        raise StoryDiffusionError(
            f"{name} denoises from an input image (image-to-image / inpainting), but a story's frames start "
            "from noise and their identity banks hold every step of the full loop; wrap the text-to-image "
            f"pipeline on the same components instead: AutoPipelineForText2Image.from_pipe(pipe) ({accepted})"
        )
    raise StoryDiffusionError(
        f"StoryPipeline wraps {accepted} (or a subclass), got {name}; load the checkpoint with one of those"
    )


def is_controlnet_pipeline(pipe: Any) -> bool:
    return getattr(pipe, "controlnet", None) is not None


def has_ip_adapter(pipe: Any) -> bool:
    """Whether an IP-Adapter is loaded (`load_ip_adapter`): the UNet then needs image embeddings every call."""
    unet = getattr(pipe, "unet", None)
    return unet is not None and getattr(unet.config, "encoder_hid_dim_type", None) == "ip_image_proj"


def denoiser_of(pipe: Any) -> Any:
    """The model CSA is installed on: the pipeline's UNet, or its transformer (Flux, SD3)."""
    return pipe.transformer if isinstance(pipe, DIT_PIPELINES) else pipe.unet


def denoiser_fingerprint(denoiser: Any) -> str:
    """A short hash of the denoiser's (UNet's or transformer's) public config: same architecture and layer names."""
    return hashlib.sha256(json.dumps(public_config(denoiser.config), sort_keys=True).encode()).hexdigest()[:16]


def public_config(config: Any) -> dict[str, Any]:
    """A config's public entries, JSON-ready (lists for tuples), for comparing and storing."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, default=str))


@torch.no_grad()
def weights_probe(denoiser: Any, count: int = 64) -> tuple[float, ...]:
    """Mean |w| of `count` weight tensors spread over the denoiser plus every attention projection: equal for
    the same weights in any dtype, different for another fine-tune, or a LoRA fused into the weights."""
    # PEFT wraps a LoRA'd layer's own weight as `base_layer`: the same tensor under the same name
    named = sorted((n.replace(".base_layer", ""), n) for n, _ in denoiser.named_parameters() if "lora_" not in n)
    spread = {n for n, _ in named[:: max(1, len(named) // count)]}
    attention = {n for n, _ in named if n.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))}
    chosen = [name for n, name in named if n in spread | attention]
    means = [_mean_abs_weight(denoiser, name) for name in chosen]  # offloaded ones on the CPU, others in place
    means = torch.stack([m.to(means[0].device) for m in means]).cpu()  # one device sync
    return tuple(float(f"{m:.7g}") for m in means.tolist())


def _mean_abs_weight(model: Any, name: str) -> torch.Tensor:
    """Mean |w| of parameter `name` of `model`. Sequential CPU offload (accelerate) keeps weights on the meta
    device between calls: those are read where the module's offload hook keeps them (its `weights_map`)."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    weight = getattr(module, attribute)
    if weight.device.type == "meta":
        hook = getattr(module, "_hf_hook", None)
        maps = [getattr(h, "weights_map", None) for h in getattr(hook, "hooks", (hook,))]  # a SequentialHook's too
        maps = [m for m in maps if m is not None]
        if not maps:
            raise StoryDiffusionError(
                f"the denoiser's weight {name} is on the meta device and no accelerate offload hook holds it, so the "
                "bank's weights probe cannot read it; load the model's weights (or offload it with diffusers' "
                "enable_sequential_cpu_offload / enable_model_cpu_offload)"
            )
        weight = maps[0][attribute]
    return weight.detach().float().abs().mean()


def active_adapters(**models: Any) -> str:
    """The PEFT (LoRA) adapters active in each model and their scales, e.g. 'unet: pixel=0.8'; '' for none."""
    described = []
    for role, model in models.items():
        if model is None:
            continue
        scales: dict[str, set[float]] = {}
        for module in model.modules():
            scaling = getattr(module, "scaling", None)
            active = getattr(module, "active_adapters", None)
            if isinstance(scaling, dict) and active is not None and not getattr(module, "disable_adapters", False):
                for name in active:
                    if name in scaling:
                        scales.setdefault(name, set()).add(round(float(scaling[name]), 6))
        if scales:
            parts = ", ".join(f"{name}={'/'.join(f'{v:g}' for v in sorted(v))}" for name, v in sorted(scales.items()))
            described.append(f"{role}: {parts}")
    return "; ".join(described)
