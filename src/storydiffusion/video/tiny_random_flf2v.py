"""Tiny randomly initialised first/last-frame-to-video pipelines, built from configs (no download).

`tiny_wan_flf2v_pipeline()` is a `WanImageToVideoPipeline` in the layout of Wan2.1-FLF2V (a Wan
transformer that reads the CLIP image tokens of both keyframes, `image_dim` and `pos_embed_seq_len` set;
a causal 3D VAE that packs 4 frames into a latent after the first, 8x spatially; a UMT5 text encoder) and
`tiny_ltx_condition_pipeline()` an `LTXConditionPipeline` in LTX-Video's (a VAE that packs 8 frames, 32x
spatially; a T5 text encoder), both at toy sizes: 32x32 frames, a few thousand weights per layer. They
exercise the `flf2v` backend's real code paths offline (`--model tiny-random-flf2v` is the Wan one); their
frames are noise, the weights being random. The text encoders read the CLIP vocabulary shipped with the
package (a stand-in for the T5 tokenizers: the pipelines only need token ids and a mask).

As in `pipelines.tiny_random`, building one never touches torch's global random state, and every module
is put in eval mode (a model built from a config starts in training mode: T5's dropout would make two
calls with the same seed differ).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from storydiffusion.pipelines.tiny_random import clip_tokenizer, seeded, tiny_t5

TINY_RANDOM_FLF2V = "tiny-random-flf2v"  # short name of the tiny Wan FLF2V pipeline, wherever --model is read
TINY_FRAME_SIZE = 32  # the frame side the tiny pipelines are sized for (a multiple of both VAEs' factors)
_VISION_PATCH = 8  # the tiny CLIP vision tower's patch: (32 / 8)^2 + 1 class token = 17 tokens per keyframe


def _eval(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.eval()


def tiny_wan_flf2v_pipeline(seed: int = 0, first_last_frame: bool = True):
    """A tiny `WanImageToVideoPipeline` that conditions on a first and a last frame.

    `first_last_frame=False` leaves out the transformer's positional embedding over the two keyframes'
    image tokens (`pos_embed_seq_len`): the layout of Wan2.1-I2V, which reads one keyframe only.
    """
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    z_dim, text_dim, vision_dim = 4, 16, 16
    image_tokens = (TINY_FRAME_SIZE // _VISION_PATCH) ** 2 + 1
    with seeded(seed):  # weight init only; never used for sampling
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=z_dim,
            dim_mult=[1, 1, 1, 1],  # 3 downsamplings: 8x spatially, like the real VAE
            num_res_blocks=1,
            temperal_downsample=[False, True, True],  # 4 frames per latent after the first
            latents_mean=[0.0] * z_dim,
            latents_std=[1.0] * z_dim,
        )
        text_encoder = tiny_t5(text_dim, d_kv=4, d_ff=32, buckets=8, umt5=True)
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=vision_dim,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=TINY_FRAME_SIZE,
                patch_size=_VISION_PATCH,
                projection_dim=vision_dim,
            )
        )
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=2 * z_dim + 4,  # noisy latents + keyframe latents + the 4-frame keyframe mask
            out_channels=z_dim,
            text_dim=text_dim,
            freq_dim=16,
            ffn_dim=32,
            num_layers=2,
            image_dim=vision_dim,  # the CLIP image tokens of the keyframes, as in Wan2.1-I2V/FLF2V
            added_kv_proj_dim=16,  # = heads * head_dim: the image tokens' own keys and values
            rope_max_seq_len=32,
            pos_embed_seq_len=2 * image_tokens if first_last_frame else None,  # both keyframes' tokens: FLF2V
        )
    _eval(vae, text_encoder, image_encoder, transformer)
    side = {"shortest_edge": TINY_FRAME_SIZE}
    processor = CLIPImageProcessor(size=side, crop_size={"height": TINY_FRAME_SIZE, "width": TINY_FRAME_SIZE})
    return WanImageToVideoPipeline(
        tokenizer=clip_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_processor=processor,
        image_encoder=image_encoder,
        transformer=transformer,
    )


def tiny_ltx_condition_pipeline(seed: int = 0):
    """A tiny `LTXConditionPipeline`: LTX-Video's VAE factors (8 frames per latent, 32x spatially) at toy width."""
    from diffusers import AutoencoderKLLTXVideo, LTXConditionPipeline, LTXVideoTransformer3DModel

    latent_channels, text_dim = 8, 16
    with seeded(seed):
        vae = AutoencoderKLLTXVideo(
            latent_channels=latent_channels,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            # patch 4 x three space-time halvings: 32x spatially and 8x in time, as the real VAE
            spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            decoder_inject_noise=(False,) * 5,
            upsample_residual=(False,) * 4,
            upsample_factor=(1,) * 4,
            patch_size=4,
        )
        text_encoder = tiny_t5(text_dim, d_kv=4, d_ff=32, buckets=8)
        transformer = LTXVideoTransformer3DModel(
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=2,
            caption_channels=text_dim,
        )
    _eval(vae, text_encoder, transformer)
    return LTXConditionPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        transformer=transformer,
    )
