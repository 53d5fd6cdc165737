"""`TransitionPipeline`: two keyframes and a prompt -> the frames of a transition video between them.

A diffusers `DiffusionPipeline` (loads and saves with `from_pretrained` / `save_pretrained`, moves
with `.to()`, takes `generator=` and `output_type=`), built from:

- `vae`, `text_encoder`, `tokenizer`, `scheduler`: those of the image model the video model grew from;
- `image_encoder` + `feature_extractor`: a CLIP vision tower with projection, for the keyframes'
  semantic embeddings (pooled, or a grid of patch embeddings when the predictor works on a grid);
- `motion_predictor`: the `SemanticMotionPredictor` (keyframe embeddings [+ prompt] -> P_1..P_L);
- `unet`: the transition `UNetMotionModel` (`storydiffusion.video.unet`); the pipeline gives its spatial
  attention layers keyframe attention (`use_keyframe_attention`), as in training.

`motion="smp"` uses the predictor, `motion="linear"` the straight path between the keyframes'
embeddings (the predictor's transformer bypassed: the paper's ablation). `interpolate_latents` is
the other baseline: no video model, a straight path between the keyframes' latents.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNetMotionModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from storydiffusion.pipelines.prompts import encode_long_prompts
from storydiffusion.video.recommended import (
    VideoRecommendedSettings,
    call_settings,
    read_video_recommended,
    write_video_recommended,
)
from storydiffusion.video.smp import SemanticMotionPredictor
from storydiffusion.video.unet import (
    KeyframeTokens,
    frame_encoder_states,
    is_transition_unet,
    keyframe_condition,
    keyframe_settings_problem,
    semantic_map,
    use_keyframe_attention,
)

MOTIONS = ("smp", "linear")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class TransitionPipelineOutput(BaseOutput):
    """`frames[b]`: clip b's frames — PIL images, or an array/tensor (F, H, W, 3) / (F, 3, H, W) in [0, 1]
    (`output_type` "np" / "pt"), or latents (C, F, h, w) for "latent". `frame_embeds`: (B, F, D), or
    (B, F, N, D) for a grid predictor, the semantic path the frames were conditioned on."""

    frames: list[list[Image.Image]] | np.ndarray | torch.Tensor
    frame_embeds: torch.Tensor


def _as_list(images: Image.Image | Sequence[Image.Image]) -> list[Image.Image]:
    return [images] if isinstance(images, Image.Image) else list(images)


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float in [-1, 1]."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def transition_condition(
    predictor: SemanticMotionPredictor, path: torch.Tensor, start_latents: torch.Tensor, end_latents: torch.Tensor
) -> torch.Tensor:
    """What joins the noisy latents at the UNet's input: both keyframes' latents and each frame's place
    between them (`keyframe_condition`), and the semantic map of the path P_1..P_L if the predictor
    draws one. -> (B, 2C + 1 [+ M], F, h, w)."""
    condition = keyframe_condition(start_latents, end_latents, path.shape[1])
    drawn = predictor.condition_map(path)
    if drawn is None:
        return condition
    return torch.cat([condition, semantic_map(drawn, tuple(start_latents.shape[-2:])).to(condition.dtype)], dim=1)


def clip_grid_embeddings(image_encoder: CLIPVisionModelWithProjection, pixels: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, grid*grid, D): the vision tower's patch tokens pooled to a grid x grid
    (row-major) and projected into the image-embedding space the way the class token is."""
    hidden = image_encoder.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]  # (B, P, W)
    side = int(round(hidden.shape[1] ** 0.5))
    patches = hidden.transpose(1, 2).reshape(hidden.shape[0], -1, side, side)  # (B, W, s, s)
    cells = torch.nn.functional.adaptive_avg_pool2d(patches, grid).flatten(2).transpose(1, 2)  # (B, g*g, W)
    return image_encoder.visual_projection(image_encoder.vision_model.post_layernorm(cells))


def tensor_to_images(tensor: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [0, 1] -> PIL images."""
    array = (tensor.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(frame) for frame in array]


class TransitionPipeline(DiffusionPipeline):
    """Start keyframe + end keyframe + prompt -> `num_frames` frames, the first and last being the keyframes."""

    model_cpu_offload_seq = "text_encoder->image_encoder->motion_predictor->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNetMotionModel,
        scheduler,
        image_encoder: CLIPVisionModelWithProjection,
        feature_extractor: CLIPImageProcessor,
        motion_predictor: SemanticMotionPredictor,
    ) -> None:
        super().__init__()
        map_channels = motion_predictor.config.map_channels
        if not is_transition_unet(unet, map_channels):
            raise ValueError(
                f"unet must be a transition UNetMotionModel taking 3C+1+{map_channels} input channels (latents, both "
                f"keyframes, the frame's place, the predictor's {map_channels}-channel map); got "
                f"{type(unet).__name__} with in_channels={getattr(unet.config, 'in_channels', '?')}. Build one with "
                f"storydiffusion.video.transition_unet(image_unet, map_channels={map_channels})"
            )
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            motion_predictor=motion_predictor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # what this pipeline's keyframe attention reads (its own, never shared with another pipeline)
        self.keyframes = KeyframeTokens()
        use_keyframe_attention(self.unet, self.keyframes)
        # the model folder's storydiffusion.json: a call's settings where the caller gives none
        self.recommended: VideoRecommendedSettings | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> TransitionPipeline:
        """diffusers' `from_pretrained`, plus the folder's recommended settings (`storydiffusion.json`) when it
        has them (`video.recommended`): the defaults of every call that does not set them."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe.recommended = read_video_recommended(pretrained_model_name_or_path)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """diffusers' `save_pretrained`, keeping the recommended settings beside the weights."""
        super().save_pretrained(save_directory, **kwargs)
        if self.recommended is not None:
            write_video_recommended(save_directory, self.recommended)

    # ------------------------------------------------------------------ encoders

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-norm CLIP image embeddings, the semantic space the motion predictor works in: (B, D)
        pooled, or (B, g*g, D) patch embeddings on the predictor's g x g grid."""
        pixels = self.feature_extractor(images=[i.convert("RGB") for i in images], return_tensors="pt").pixel_values
        pixels = pixels.to(self._execution_device, self.image_encoder.dtype)
        if self.motion_predictor.config.num_tokens == 1:
            embeds = self.image_encoder(pixel_values=pixels).image_embeds
        else:
            embeds = clip_grid_embeddings(self.image_encoder, pixels, self.motion_predictor.grid_size)
        return torch.nn.functional.normalize(embeds.float(), dim=-1)

    @torch.no_grad()
    def encode_latents(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, C, h, w) scaled VAE latents (the posterior mean) of the keyframes."""
        pixels = images_to_tensor(images).to(self._execution_device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mean
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, F, h, w) -> (B, F, 3, H, W) in [0, 1], one frame at a time through the VAE."""
        batch, _, frames = latents.shape[:3]
        flat = latents.permute(0, 2, 1, 3, 4).flatten(0, 1) / self.vae.config.scaling_factor  # (B*F, C, h, w)
        pixels = torch.cat([self.vae.decode(x.to(self.vae.dtype)).sample for x in flat.split(16)])
        return ((pixels.float() + 1.0) / 2.0).clamp(0, 1).view(batch, frames, *pixels.shape[1:])

    # ------------------------------------------------------------------ checks

    def check_inputs(
        self,
        starts: list[Image.Image],
        ends: list[Image.Image],
        prompts: list[str],
        num_frames: int,
        motion: str,
        output_type: str,
    ) -> None:
        if not starts or len(starts) != len(ends):
            raise ValueError(f"give as many start images as end images (got {len(starts)} and {len(ends)})")
        if len(prompts) != len(starts):
            raise ValueError(f"give one prompt per clip or one for all (got {len(prompts)} for {len(starts)} clips)")
        sizes = {image.size for image in [*starts, *ends]}
        if len(sizes) != 1:
            raise ValueError(f"start and end images must share one size, got {sorted(sizes)}; resize them first")
        width, height = sizes.pop()
        if width % self.vae_scale_factor or height % self.vae_scale_factor:
            raise ValueError(
                f"image size {width}x{height} must be a multiple of {self.vae_scale_factor} (the VAE's downsampling)"
            )
        max_frames = self.motion_predictor.config.max_frames
        if not 2 <= num_frames <= max_frames:
            raise ValueError(f"num_frames={num_frames} must be in [2, {max_frames}] (the motion predictor's limit)")
        if motion not in MOTIONS:
            raise ValueError(f"motion={motion!r} must be one of {MOTIONS}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} must be one of {OUTPUT_TYPES}")

    # ------------------------------------------------------------------ the call

    @torch.no_grad()
    def __call__(
        self,
        start_image: Image.Image | Sequence[Image.Image],
        end_image: Image.Image | Sequence[Image.Image],
        prompt: str | Sequence[str] = "",
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        motion: str = "smp",
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        anchor_keyframes: bool = True,
        keyframe_tokens: str | None = None,
        keyframe_strength: float | None = None,
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
    ) -> TransitionPipelineOutput | tuple:
        """Frames of a transition from `start_image` to `end_image` following `prompt`.

        Args:
            start_image, end_image: the keyframes (one each, or lists for a batch of clips), one size.
            prompt: what happens (one for all clips, or one per clip). Read by the cross-attention of
                every frame and, if the predictor reads text, by the motion predictor.
            num_frames: frames per clip, keyframes included (2 .. the predictor's max_frames).
            guidance_scale: classifier-free guidance on the prompt; 1 turns it off.
            motion: "smp" (the predictor) or "linear" (straight embedding path; the ablation).
            anchor_keyframes: put the keyframes' own latents at the first and last frame of the result.
            keyframe_tokens: what every frame's keyframe attention reads: "noisy", the keyframes' tokens at the
                frame's own step (how the model is trained), or "finished", the finished keyframes' tokens from
                one pass over them at the schedule's lowest noise level, read at every step.
            keyframe_strength: the keyframes' keys weighted w in that attention's softmax (1: unweighted).
            callback_on_step_end: called as `fn(pipe, step, timestep, {"latents": ...})`; may return
                {"latents": ...} to replace them.

        num_frames, num_inference_steps, guidance_scale, keyframe_tokens and keyframe_strength left None come
        from the model's recommended settings (`self.recommended`), else 8, 25, 1.0, "noisy" and 1.0.
        """
        chosen = call_settings(
            self.recommended,
            num_frames=num_frames,
            steps=num_inference_steps,
            guidance=guidance_scale,
            keyframe_tokens=keyframe_tokens,
            keyframe_strength=keyframe_strength,
        )
        num_frames, num_inference_steps, guidance_scale = chosen["num_frames"], chosen["steps"], chosen["guidance"]
        keyframe_tokens, keyframe_strength = chosen["keyframe_tokens"], chosen["keyframe_strength"]
        # 1. Check inputs
        starts, ends = _as_list(start_image), _as_list(end_image)
        prompts = [prompt] * len(starts) if isinstance(prompt, str) else list(prompt)
        self.check_inputs(starts, ends, prompts, num_frames, motion, output_type)
        problem = keyframe_settings_problem(keyframe_tokens, keyframe_strength)
        if problem:
            raise ValueError(problem)
        batch, device = len(starts), self._execution_device
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * batch
        else:
            negatives = list(negative_prompt)
            if len(negatives) != batch:
                raise ValueError(f"give one negative prompt per clip or one for all (got {len(negatives)} for {batch})")
        guided = guidance_scale > 1.0

        # 2. Prompt embeddings (long prompts in chunks, never silently cut)
        embeds = encode_long_prompts(self, prompts, negatives)
        text_states, negative_states = embeds["prompt_embeds"], embeds["negative_prompt_embeds"]  # (B, T, C)

        # 3. The semantic path P_1..P_L and its cross-attention tokens
        start_embeds, end_embeds = self.encode_images([*starts, *ends]).split(batch)  # (B, [N,] D) each
        predictor = self.motion_predictor
        path = predictor(
            start_embeds.to(predictor.dtype),
            end_embeds.to(predictor.dtype),
            num_frames,
            text_embeds=text_states.to(predictor.dtype) if predictor.reads_text else None,
            bypass=motion == "linear",
        )  # (B, F, [N,] D)
        tokens = predictor.condition_tokens(path).to(text_states.dtype)  # (B, F, K, C)
        encoder_states = frame_encoder_states(text_states, tokens)  # (B*F, T+K, C)
        if guided:  # the unconditional half keeps the motion tokens: guidance is on the prompt only
            encoder_states = torch.cat([frame_encoder_states(negative_states, tokens), encoder_states])

        # 4. Keyframe condition (+ the path's semantic map)
        start_latents, end_latents = self.encode_latents([*starts, *ends]).split(batch)  # (B, C, h, w) each
        condition = transition_condition(predictor, path, start_latents.to(path.dtype), end_latents.to(path.dtype))

        # 5. Initial noise
        channels, (height, width) = start_latents.shape[1], start_latents.shape[-2:]
        shape = (batch, channels, num_frames, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (B, C, F, h, w), got {tuple(latents.shape)}")
        latents = latents.to(device, torch.float32) * self.scheduler.init_noise_sigma

        # 6. Denoising loop; keyframe attention reads the finished keyframes (one pass), or each step's own
        processors = self.unet.attn_processors.values()
        if any(getattr(p, "keyframes", self.keyframes) is not self.keyframes for p in processors):
            use_keyframe_attention(self.unet, self.keyframes)  # the UNet went into another pipeline meanwhile
        self.keyframes.clear()
        self.keyframes.strength = float(keyframe_strength)
        try:
            if keyframe_tokens == "finished":
                self._record_keyframes(start_latents, end_latents, condition, encoder_states, num_inference_steps)
            latents = self._denoise(latents, condition, encoder_states, num_frames, num_inference_steps,
                                    guidance_scale, callback_on_step_end)  # fmt: skip
        finally:
            self.keyframes.clear()

        # 7. Keyframes at the ends, then decode
        if anchor_keyframes:
            latents[:, :, 0], latents[:, :, -1] = start_latents.float(), end_latents.float()
        frames = self._output(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return frames, path
        return TransitionPipelineOutput(frames=frames, frame_embeds=path)

    @torch.no_grad()
    def _record_keyframes(
        self,
        start_latents: torch.Tensor,
        end_latents: torch.Tensor,
        condition: torch.Tensor,
        encoder_states: torch.Tensor,
        num_inference_steps: int,
    ) -> None:
        """One UNet pass over the two finished keyframes (a two-frame clip at the schedule's lowest noise level,
        with their condition and frame tokens) that records each spatial layer's keyframe tokens; the loop's
        frames then read those (`KeyframeTokens` mode "read")."""
        batch, frames = start_latents.shape[0], condition.shape[2]
        self.scheduler.set_timesteps(num_inference_steps, device=start_latents.device)
        lowest = self.scheduler.timesteps[-1]
        ends = [0, frames - 1]
        clean = torch.stack([start_latents, end_latents], dim=2).float()  # (B, C, 2, h, w)
        model_input = torch.cat([clean, condition[:, :, ends].float()], dim=1)
        model_input = self.scheduler.scale_model_input(model_input, lowest)
        halves = encoder_states.shape[0] // (batch * frames)  # 2 with guidance
        states = encoder_states.view(halves, batch, frames, *encoder_states.shape[1:])[:, :, ends].flatten(0, 2)
        model_input = torch.cat([model_input] * halves)
        self.keyframes.mode = "record"
        self.unet(model_input.to(self.unet.dtype), lowest, encoder_hidden_states=states,
                  cross_attention_kwargs={"num_frames": 2})  # fmt: skip
        self.keyframes.mode = "read"

    def _denoise(
        self,
        latents: torch.Tensor,
        condition: torch.Tensor,
        encoder_states: torch.Tensor,
        num_frames: int,
        num_inference_steps: int,
        guidance_scale: float,
        callback_on_step_end: Callable | None,
    ) -> torch.Tensor:
        guided = guidance_scale > 1.0
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)  # anew: a record pass used it
        for step, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents, condition.float()], dim=1)  # (B, 3C+1[+M], F, h, w)
            model_input = self.scheduler.scale_model_input(model_input, t)
            if guided:
                model_input = torch.cat([model_input, model_input])  # unconditional half first
            output = self.unet(
                model_input.to(self.unet.dtype),
                t,
                encoder_hidden_states=encoder_states,
                cross_attention_kwargs={"num_frames": num_frames},
            ).sample
            if guided:
                uncond, cond = output.float().chunk(2)
                output = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(output.float(), t, latents).prev_sample
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, step, t, {"latents": latents}).get("latents", latents)
        return latents

    def _output(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        pixels = self.decode_latents(latents)  # (B, F, 3, H, W)
        if output_type == "pt":
            return pixels
        if output_type == "np":
            return pixels.permute(0, 1, 3, 4, 2).cpu().numpy()
        return [tensor_to_images(clip) for clip in pixels]

    # ------------------------------------------------------------------ the latent baseline

    @torch.no_grad()
    def interpolate_latents(
        self, start_image: Image.Image, end_image: Image.Image, num_frames: int
    ) -> list[Image.Image]:
        """The no-video-model baseline: decode a straight path between the keyframes' latents."""
        self.check_inputs([start_image], [end_image], [""], num_frames, "linear", "pil")
        start, end = self.encode_latents([start_image, end_image]).float()
        weights = torch.linspace(0, 1, num_frames, device=start.device)[:, None, None, None]
        path = (start[None] + weights * (end - start)[None]).permute(1, 0, 2, 3)[None]  # (1, C, F, h, w)
        return tensor_to_images(self.decode_latents(path)[0])
