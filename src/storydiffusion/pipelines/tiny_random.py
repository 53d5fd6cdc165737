"""Tiny randomly initialised SD1.5-, SDXL-, Flux.1- and SD3-layout pipelines, built from configs (no download).

They have the real architectures' layouts (down/mid/up blocks, self- and cross-attention,
classifier-free guidance, SDXL's two text encoders and added time ids; Flux's double- and single-stream
blocks with rotary positions and guidance embedding, SD3's joint blocks, their CLIP + T5 text encoders and
flow-matching schedulers) at toy sizes, so tests and the offline demo exercise the same code paths as real
checkpoints. Their images are noise: the weights are random. The tokenizer is the real CLIP vocabulary
shipped with the package; it also stands in for T5's (a T5 encoder with CLIP's vocabulary size).

Building one never touches torch's global random state: the seeded initialisation runs on a forked
generator, so a test or a run that builds a tiny model keeps its own random stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

TOKENIZER_DIR = files("storydiffusion") / "assets" / "clip_tokenizer"


def clip_tokenizer() -> CLIPTokenizer:
    """The CLIP BPE tokenizer (49,408 tokens) shipped inside the package."""
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    if len(tokenizer) != 49408:  # offline loading can silently give an empty vocabulary
        raise RuntimeError(f"the packaged CLIP tokenizer at {TOKENIZER_DIR} loaded {len(tokenizer)} tokens, not 49408")
    return tokenizer


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's global CPU generator seeded with `seed` inside, and back to its state before outside."""
    # the tiny models are built on the CPU: only its generator is seeded (torch.manual_seed would also
    # reseed every GPU's) and restored
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _text_config(hidden_size: int, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _vae(**flow_options: float) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(16, 32, 32),  # 3 blocks: 4x downsampling (real SD VAEs: 8x)
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        **flow_options,  # Flux's and SD3's VAEs shift their latents too
    )


def tiny_t5(
    d_model: int = 32, *, d_kv: int = 8, d_ff: int | None = None, buckets: int = 32, umt5: bool = False
) -> T5EncoderModel:
    """A 2-layer T5 (or UMT5: Wan's) encoder over CLIP's vocabulary (the packaged CLIP tokenizer stands in for
    T5's), without dropout and in eval mode (a module built from a config starts in training mode)."""
    options = dict(
        vocab_size=49408, d_model=d_model, d_kv=d_kv, d_ff=d_ff or 2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=buckets, pad_token_id=49407, eos_token_id=49407,
        decoder_start_token_id=49407, dropout_rate=0.0,
    )  # fmt: skip
    if umt5:
        from transformers import UMT5Config, UMT5EncoderModel

        return UMT5EncoderModel(UMT5Config(**options)).eval()
    return T5EncoderModel(T5Config(**options)).eval()


def _flow_scheduler(**options: float | bool) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**options)


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD1.5 layout: CrossAttn down blocks at levels 1 and 2, cross-attention mid block, 32-dim text."""
    with seeded(seed):  # weight init only; never used for sampling
        return StableDiffusionPipeline(**_sd_components())


def _sd_components() -> dict:
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return dict(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(32)),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL layout: two text encoders, text_time added conditioning, no attention at the full level."""
    with seeded(seed):
        return StableDiffusionXLPipeline(**_sdxl_components())


def _sdxl_components() -> dict:
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + 32 pooled text
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    tokenizer = clip_tokenizer()
    return dict(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(32)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(32, projection_dim=32)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading"
        ),
        force_zeros_for_empty_prompt=True,
    )


def tiny_controlnet(unet: UNet2DConditionModel, seed: int = 0) -> ControlNetModel:
    """A ControlNet for `unet` (its layout, its encoder weights) whose zero-initialised convolutions are random.

    A real ControlNet starts with zeroed convolutions (the conditioning encoder's last, every residual's)
    and learns them; left at zero, a random one would add nothing, and no test could see the control
    image. Its conditioning encoder downsamples 4x, like the tiny VAE.
    """
    with seeded(seed):
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16))
        # the control image's path gets the larger weights: it is what the tests look for
        cond_out = controlnet.controlnet_cond_embedding.conv_out
        torch.nn.init.normal_(cond_out.weight, std=1.0)
        torch.nn.init.zeros_(cond_out.bias)
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=0.1)
            torch.nn.init.normal_(conv.bias, std=0.01)
    return controlnet


def tiny_sd_controlnet_pipeline(seed: int = 0) -> StableDiffusionControlNetPipeline:
    """`tiny_sd_pipeline(seed)`'s components (the same weights) plus a `tiny_controlnet` of its UNet."""
    with seeded(seed):
        components = _sd_components()
    return StableDiffusionControlNetPipeline(**components, controlnet=tiny_controlnet(components["unet"], seed))


def tiny_sdxl_controlnet_pipeline(seed: int = 0) -> StableDiffusionXLControlNetPipeline:
    """`tiny_sdxl_pipeline(seed)`'s components (the same weights) plus a `tiny_controlnet` of its UNet."""
    with seeded(seed):
        components = _sdxl_components()
    controlnet = tiny_controlnet(components["unet"], seed)
    return StableDiffusionXLControlNetPipeline(**components, controlnet=controlnet, add_watermarker=False)


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """FLUX.1-dev layout: one double-stream and two single-stream blocks with rotary positions and guidance
    embedding, CLIP (pooled) + T5 text encoders, a flow-matching scheduler with resolution-dependent shift."""
    with seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4),
        )  # fmt: skip
        tokenizer = clip_tokenizer()
        return FluxPipeline(
            scheduler=_flow_scheduler(
                shift=3.0,
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=1.15,
                base_image_seq_len=256,
                max_image_seq_len=4096,
            ),  # fmt: skip
            vae=_vae(scaling_factor=0.3611, shift_factor=0.1159),
            text_encoder=CLIPTextModel(_text_config(32)),
            tokenizer=tokenizer,
            text_encoder_2=tiny_t5(32),
            tokenizer_2=tokenizer,
            transformer=transformer,
        )


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3 layout: two joint-attention blocks over [image ; text], two CLIP text encoders with projections
    plus T5, classifier-free guidance, a flow-matching scheduler."""
    with seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=64,
            pos_embed_max_size=32,
        )  # fmt: skip
        tokenizer = clip_tokenizer()
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=_flow_scheduler(shift=3.0),
            vae=_vae(scaling_factor=1.5305, shift_factor=0.0609),
            text_encoder=CLIPTextModelWithProjection(_text_config(16, projection_dim=32)),
            tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(_text_config(16, projection_dim=32)),
            tokenizer_2=tokenizer,
            text_encoder_3=tiny_t5(32),
            tokenizer_3=tokenizer,
        )
