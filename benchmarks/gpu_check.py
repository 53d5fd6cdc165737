"""The one prepared GPU check (issue #21): full-size SDXL and FLUX.1 stories and the CSA layer benchmark.

Random weights, one CUDA GPU (H200-class), under 8 minutes; the last line of stdout is one JSON object.

What is measured
----------------
- ``sdxl``: stabilityai/stable-diffusion-xl-base-1.0's architecture (UNet, VAE, CLIP ViT-L and OpenCLIP bigG text
  encoders, Euler scheduler: configs written out below, random weights), float16, 1024 px, 30 steps. A one-character
  story, 3 reference frames (id_length 3) then 3 frames, through `StoryPipeline` (CSA on, default settings and bank
  storage), and the same frames with CSA off: the wrapped diffusers pipeline called alone, with the same prompts,
  seeds and batches (the 3 references in one call, then each frame alone). For each: peak
  `torch.cuda.max_memory_allocated` (weights included; reference and frame phases apart too) and seconds per image;
  their ratio. Then the character's bank: its bytes, and one frame's reads (every entry, in call order, dequantised
  onto the GPU) timed from a bank held in RAM and from the same bank on disk (`BankStorage` "memory" and "disk",
  both loaded from the one saved file): page cache cold, then warm.
- ``flux``: FLUX.1 [dev]'s architecture (transformer, VAE, CLIP-L, T5-XXL encoder), random weights, bfloat16, 1024 px,
  28 steps. A four-character story (id_length 2 each, then 2 frames naming two characters each), everything on the
  GPU, then again with `enable_model_cpu_offload()`: peak memory and seconds per image of each.
- ``csa_layer``: benchmarks/csa_attention.py's layer benchmark, through its own functions, at its SDXL shape
  (768 px decoder layer) and its Flux shape (1024 px single-stream attention): time and peak-memory ratios of ours
  against vanilla / dense-mask SDPA / the public code's math path, the bank against the public code's, and the
  targets that benchmark checks.

Targets (GiB = 2**30 bytes): SDXL story peak <= 16 GiB; CSA seconds per image <= 1.25 x vanilla; Flux story
<= 40 GiB on the GPU and <= 24 GiB with model offload.

Random weights: the images are noise, and in float16 they may hold inf/NaN; the figures are time and memory, which
do not depend on the values. Models are built on the GPU (torch's own initialisation runs there, in seconds) in
float32 and cast one at a time. There is no hub: the CLIP tokenizer shipped with the package stands in for every
tokenizer, so the T5 encoder's vocabulary is CLIP's 49,408 tokens (32,128 in the real one: +71M parameters).
Disk: the banks go where the default storage puts them ($TMPDIR past 256 MiB): about 3.7 GiB for the SDXL character
(plus its saved copy while its reads are timed) and about 5 GiB per Flux character, ~20 GiB per Flux run.

``--tiny`` runs the same code at tiny shapes on the CPU (the tiny random SDXL and Flux pipelines of
`storydiffusion.pipelines.tiny_random`, float32, 64 px, 3 steps; the layer benchmark's tiny shapes) so the script is
known to work before a GPU is there; memory figures are then null, with a note. Each section runs guarded: a failure
is recorded as its ``error`` (and a traceback tail) and the other sections still run. ``--budget-s`` is the time
budget: a section (or the Flux offload run) that would not fit in what is left is skipped and says so.

Usage: ``python benchmarks/gpu_check.py [--tiny] [--sections csa_layer,sdxl,flux] [--budget-s 480]``
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

try:
    import storydiffusion  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import csa_attention as layer_bench  # benchmarks/ is on sys.path when this runs as a script
import diffusers
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from storydiffusion.csa.bank import IdentityBank
from storydiffusion.pipelines.frames import parse_frame
from storydiffusion.pipelines.story_pipeline import StoryPipeline, frame_seed
from storydiffusion.pipelines.tiny_random import clip_tokenizer, tiny_flux_pipeline, tiny_sdxl_pipeline

SECTIONS = ("csa_layer", "sdxl", "flux")  # run in this order: the longest (flux) last, where the budget is checked
GIB = 2**30
DEFAULT_BUDGET_S = {"full": 480.0, "tiny": 300.0}
SEED = 1
# seconds a section needs at least (full run on an H200-class GPU); one that would not fit is skipped
SECTION_MINIMUM_S = {"csa_layer": 20.0, "sdxl": 60.0, "flux": 150.0}
OFFLOAD_OVER_DEVICE = 1.5  # the offload run takes at most this times the all-on-GPU run's seconds + OFFLOAD_EXTRA_S
OFFLOAD_EXTRA_S = 30.0
BANK_READ_LIMIT_S = 20.0  # a frame's bank reads stop after this and are scaled up (a slow disk stays in budget)
TARGETS = {
    "sdxl_peak_le_16GiB": 16 * GIB,
    "csa_seconds_per_image_le_1.25x_vanilla": 1.25,
    "flux_on_gpu_peak_le_40GiB": 40 * GIB,
    "flux_offload_peak_le_24GiB": 24 * GIB,
}

SDXL_CHARACTERS = {"Mia": "a young woman with short red hair and a green raincoat"}
SDXL_FRAMES = [
    "[Mia] reading a book in a cafe",
    "[Mia] walking through the rain",
    "[Mia] riding a bicycle along a canal",
    "[Mia] waiting at a train station",
    "[Mia] cooking dinner in a small kitchen",
    "[Mia] looking at the stars from a rooftop",
]
SDXL_ID_LENGTH = 3
FLUX_CHARACTERS = {
    "Ava": "a tall woman with silver braids and a blue coat",
    "Ben": "a bearded man in a yellow sweater",
    "Cleo": "a girl with curly black hair and a red scarf",
    "Dan": "an old man with a white moustache and a green hat",
}
FLUX_FRAMES = [
    *(f"[{name}] {scene}" for name in FLUX_CHARACTERS for scene in ("in a library", "walking in a park")),
    "[Ava] and [Ben] play chess in a garden",
    "[Cleo] and [Dan] dance at a wedding",
]
FLUX_ID_LENGTH = 2

Module = TypeVar("Module", bound=torch.nn.Module)


@dataclass(frozen=True)
class Run:
    """What one invocation runs: the mode's sizes, the device, and the deadline of its time budget."""

    tiny: bool
    device: torch.device
    sdxl_steps: int
    flux_steps: int
    deadline: float  # time.monotonic() by which everything should be done

    @property
    def height(self) -> int:
        return 64 if self.tiny else 1024

    @property
    def sdxl_dtype(self) -> torch.dtype:
        return torch.float32 if self.tiny else torch.float16

    @property
    def flux_dtype(self) -> torch.dtype:
        return torch.float32 if self.tiny else torch.bfloat16

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


class SkippedForBudget(RuntimeError):
    """A section (or a run in one) that the time left would not hold."""


SectionRunner = Callable[[Run, dict[str, Any]], None]  # fills its section's figures in as they are measured


# --------------------------------------------------------------------------------------------
# Full-size models: the published configs, written out (no hub here)
# --------------------------------------------------------------------------------------------
def sdxl_unet_config() -> dict[str, Any]:
    """stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2,567,463,684 parameters)."""
    return dict(
        sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=False, block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1,
        mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048,
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        resnet_time_scale_shift="default", time_embedding_type="positional", conv_in_kernel=3, conv_out_kernel=3,
    )  # fmt: skip


def sdxl_vae_config() -> dict[str, Any]:
    """stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (83,653,863 parameters)."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=1024, act_fn="silu",
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, scaling_factor=0.13025,
        force_upcast=True,
    )  # fmt: skip


def flux_vae_config() -> dict[str, Any]:
    """black-forest-labs/FLUX.1-dev vae/config.json (83,819,683 parameters): 16 latent channels, shifted."""
    return dict(
        sdxl_vae_config(), latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=True,
    )  # fmt: skip


def clip_l_config() -> CLIPTextConfig:
    """OpenAI CLIP ViT-L/14's text tower: SDXL's text_encoder and FLUX.1's (123,060,480 parameters)."""
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip


def clip_big_g_config() -> CLIPTextConfig:
    """OpenCLIP ViT-bigG/14's text tower with its projection: SDXL's text_encoder_2 (694,659,840 parameters)."""
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip


def t5_xxl_config() -> T5Config:
    """google/t5-v1_1-xxl's encoder (FLUX.1's text_encoder_2), its vocabulary widened to CLIP's 49,408 tokens: the
    packaged CLIP tokenizer stands in for T5's (4,762,310,656 parameters with T5's own 32,128)."""
    return T5Config(
        vocab_size=49408, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=False, pad_token_id=49407,
        eos_token_id=49407, decoder_start_token_id=49407,
    )  # fmt: skip


def flux_transformer_config() -> dict[str, Any]:
    """black-forest-labs/FLUX.1-dev transformer/config.json (11,901,408,320 parameters)."""
    return dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )  # fmt: skip


def built_on(device: torch.device | str, dtype: torch.dtype, factory: Callable[[], Module]) -> Module:
    """`factory()`'s module created on `device` (its initialisation runs there), cast to `dtype`, in eval mode."""
    with torch.device(device):
        module = factory()
    module = module.to(dtype=dtype).eval()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the float32 originals' blocks: the next model may need them in one piece
    return module


def sdxl_components(device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """SDXL base 1.0's components with random weights, one model at a time on `device` ("meta": shapes only)."""
    tokenizer = clip_tokenizer()
    return dict(
        unet=built_on(device, dtype, lambda: UNet2DConditionModel(**sdxl_unet_config())),
        vae=built_on(device, dtype, lambda: AutoencoderKL(**sdxl_vae_config())),
        text_encoder=built_on(device, dtype, lambda: CLIPTextModel(clip_l_config())),
        text_encoder_2=built_on(device, dtype, lambda: CLIPTextModelWithProjection(clip_big_g_config())),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
            steps_offset=1,
            timestep_spacing="leading",
            interpolation_type="linear",
            use_karras_sigmas=False,
        ),
    )


def flux_components(device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """FLUX.1 [dev]'s components with random weights, one model at a time on `device` ("meta": shapes only)."""
    tokenizer = clip_tokenizer()
    return dict(
        transformer=built_on(device, dtype, lambda: FluxTransformer2DModel(**flux_transformer_config())),
        text_encoder_2=built_on(device, dtype, lambda: T5EncoderModel(t5_xxl_config())),
        text_encoder=built_on(device, dtype, lambda: CLIPTextModel(clip_l_config())),
        vae=built_on(device, dtype, lambda: AutoencoderKL(**flux_vae_config())),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
    )


def sdxl_pipeline(run: Run) -> StableDiffusionXLPipeline:
    if run.tiny:
        pipe = tiny_sdxl_pipeline(seed=0).to(run.device)
    else:
        pipe = StableDiffusionXLPipeline(**sdxl_components(run.device, run.sdxl_dtype), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline(run: Run) -> FluxPipeline:
    if run.tiny:
        pipe = tiny_flux_pipeline(seed=0).to(run.device)
    else:
        pipe = FluxPipeline(**flux_components(run.device, run.flux_dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# Measuring: memory, time, one story
# --------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """`torch.cuda.max_memory_allocated` since the last `reset_peak`; None off CUDA."""
    if device.type != "cuda":
        return None
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def finite_or_none(value: float | None) -> float | None:
    """A float JSON can carry (NaN and inf are not JSON): None in their place."""
    return None if value is None or not math.isfinite(value) else float(value)


def image_stats(images: Sequence[np.ndarray]) -> dict[str, Any]:
    stacked = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return {"shape": list(stacked.shape), "finite_fraction": float(np.isfinite(stacked).mean())}


def mean_abs_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float | None:
    diff = np.abs(np.stack(a).astype(np.float32) - np.stack(b).astype(np.float32))
    return finite_or_none(float(np.nanmean(diff)) if np.isfinite(diff).any() else math.nan)


class PhaseClock:
    """Seconds and peak memory of a story's reference phase (until the last character's bank is done) and frame
    phase; `mark` is handed to `StoryPipeline` as `on_bank`, or called after a plain pipeline's reference calls."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        reset_peak(device)
        self.started = time.perf_counter()
        self.references_done = self.started
        self.reference_peak: int | None = None

    def mark(self, *_: Any) -> None:
        peak = peak_bytes(self.device)
        if peak is not None:
            self.reference_peak = max(self.reference_peak or 0, peak)
        reset_peak(self.device)  # the frame phase (or the next character's references) from here
        self.references_done = time.perf_counter()

    def figures(self, reference_images: int, frame_images: int) -> dict[str, Any]:
        frame_peak = peak_bytes(self.device)
        ended = time.perf_counter()
        peaks = [p for p in (self.reference_peak, frame_peak) if p is not None]
        reference_s, frame_s = self.references_done - self.started, ended - self.references_done
        return {
            "images": reference_images + frame_images,
            "seconds": ended - self.started,
            "seconds_per_image": (ended - self.started) / (reference_images + frame_images),
            "reference_seconds_per_image": reference_s / reference_images,
            "frame_seconds_per_image": frame_s / frame_images if frame_images else None,
            "peak_bytes": max(peaks) if peaks else None,
            "reference_peak_bytes": self.reference_peak,
            "frame_peak_bytes": frame_peak,
        }


def story_layout(
    characters: Mapping[str, str], frames: Sequence[str], id_length: int
) -> tuple[list[list[int]], list[int]]:
    """The calls a story makes: each character's reference frames (one call each), then the other frames (one
    call each: StoryPipeline's default frame_batch_size of 1)."""
    resolved = [parse_frame(frame, characters) for frame in frames]
    references = list(StoryPipeline.reference_frames(resolved, id_length, exclude=set()).values())
    taken = {index for indices in references for index in indices}
    return references, [index for index in range(len(frames)) if index not in taken]


def run_story(
    story: StoryPipeline,
    characters: Mapping[str, str],
    frames: Sequence[str],
    id_length: int,
    common: Mapping[str, Any],
    device: torch.device,
) -> tuple[dict[str, Any], Any]:
    """One `StoryPipeline` call: its figures (`PhaseClock` on `device`) and its output."""
    references, rest = story_layout(characters, frames, id_length)
    clock = PhaseClock(device)
    out = story(characters, frames, id_length=id_length, seed=SEED, progress=False, on_bank=clock.mark, **common)
    figures = clock.figures(sum(map(len, references)), len(rest))
    return figures, out


def run_vanilla(
    pipe: Any,
    characters: Mapping[str, str],
    frames: Sequence[str],
    id_length: int,
    common: Mapping[str, Any],
    device: torch.device,
) -> tuple[dict[str, Any], list[Any]]:
    """The same story's frames from the plain pipeline (CSA off): the same prompts, seeds and batches."""
    references, rest = story_layout(characters, frames, id_length)
    prompts = [parse_frame(frame, characters).prompt for frame in frames]
    images: list[Any] = [None] * len(frames)

    def generate(indices: Sequence[int]) -> None:
        generators = [torch.Generator().manual_seed(frame_seed(SEED, index)) for index in indices]  # as the story's
        result = pipe(prompt=[prompts[index] for index in indices], generator=generators, **common)
        for index, image in zip(indices, result.images):
            images[index] = image

    clock = PhaseClock(device)
    for indices in references:
        generate(indices)
    clock.mark()
    for index in rest:
        generate([index])
    return clock.figures(sum(map(len, references)), len(rest)), images


def warm_up(pipe: Any, height: int) -> None:
    """One short untimed call at the story's size: kernels chosen and loaded before anything is timed."""
    pipe(prompt="a warm-up", num_inference_steps=2, height=height, width=height, output_type="np")


# --------------------------------------------------------------------------------------------
# Bank reads: RAM against disk
# --------------------------------------------------------------------------------------------
def call_order(keys: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    """(step, layer) keys in the order a frame reads them: by step, then layer names with their numbers compared as
    numbers (`attentions.10` after `attentions.9`), the order a disk bank reads ahead in."""

    def natural(key: tuple[int, str]) -> tuple[Any, ...]:
        return (key[0], *(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key[1])))

    return sorted(keys, key=natural)


def drop_page_cache(path: Path) -> bool:
    """Ask the kernel to forget `path`'s cached pages (written back first), so the next reads hit the disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def time_frame_reads(
    bank: IdentityBank, keys: Sequence[tuple[int, str]], device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """Seconds to read every entry once onto `device`, as a frame asks for them; past BANK_READ_LIMIT_S the reads
    stop and the time is scaled to all entries."""
    halves = bank.settings.guidance_halves
    started, read = time.perf_counter(), 0
    for step, layer in keys:
        bank.get(step, layer, dtype, device, halves)
        read += 1
        if time.perf_counter() - started > BANK_READ_LIMIT_S:
            break
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"seconds_per_frame": seconds * len(keys) / read, "entries_read": read, "entries": len(keys)}


def bank_read_figures(bank: IdentityBank, device: torch.device, dtype: torch.dtype, folder: Path) -> dict[str, Any]:
    """The story's bank saved to one file, loaded in RAM and on disk; one frame's reads timed from each."""
    on_disk_during_story = bank.on_disk
    keys = call_order(list(bank.keys()))
    path = bank.save(folder / "character.safetensors")
    figures: dict[str, Any] = {
        "bank_bytes": bank.nbytes,
        "bank_entries": len(keys),
        "bank_on_disk_during_story": on_disk_during_story,
        "file_bytes": path.stat().st_size,
        "read_to": str(device),
    }
    in_ram = IdentityBank.load(path, storage="memory")
    time_frame_reads(in_ram, keys[:1], device, dtype)  # the first read's one-off set-up (allocator, kernels)
    figures["memory"] = time_frame_reads(in_ram, keys, device, dtype)
    in_ram.close()
    del in_ram
    on_disk = IdentityBank.load(path, storage="disk")
    figures["cold_cache_dropped"] = drop_page_cache(path)
    figures["disk_cold"] = time_frame_reads(on_disk, keys, device, dtype)
    figures["disk_warm"] = time_frame_reads(on_disk, keys, device, dtype)  # its pages now in the page cache
    on_disk.close()
    memory_s = figures["memory"]["seconds_per_frame"]
    figures["disk_warm_vs_memory"] = figures["disk_warm"]["seconds_per_frame"] / memory_s
    figures["disk_cold_vs_memory"] = figures["disk_cold"]["seconds_per_frame"] / memory_s
    return figures


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
def sdxl_section(run: Run, result: dict[str, Any]) -> None:
    """SDXL: the one-character story with CSA and without; the bank's size and reads."""
    began = time.perf_counter()
    pipe = sdxl_pipeline(run)
    result.update(
        dtype=str(run.sdxl_dtype).removeprefix("torch."),
        height=run.height,
        steps=run.sdxl_steps,
        unet_parameters=parameter_count(pipe.unet),
        build_seconds=time.perf_counter() - began,
    )
    print(f"sdxl: built in {result['build_seconds']:.0f} s, UNet {result['unet_parameters']:,} parameters", flush=True)
    common = dict(
        num_inference_steps=run.sdxl_steps, guidance_scale=5.0, height=run.height, width=run.height, output_type="np"
    )
    warm_up(pipe, run.height)
    vanilla, vanilla_images = run_vanilla(pipe, SDXL_CHARACTERS, SDXL_FRAMES, SDXL_ID_LENGTH, common, run.device)
    result["vanilla"] = vanilla
    print(f"sdxl: CSA off {vanilla['seconds_per_image']:.2f} s/image, peak {gib(vanilla['peak_bytes'])}", flush=True)
    story = StoryPipeline(pipe)
    csa, out = run_story(story, SDXL_CHARACTERS, SDXL_FRAMES, SDXL_ID_LENGTH, common, run.device)
    print(f"sdxl: CSA on  {csa['seconds_per_image']:.2f} s/image, peak {gib(csa['peak_bytes'])}", flush=True)
    result.update(
        csa=csa,
        csa_vs_vanilla_seconds_per_image=csa["seconds_per_image"] / vanilla["seconds_per_image"],
        csa_vs_vanilla_reference_seconds=csa["reference_seconds_per_image"] / vanilla["reference_seconds_per_image"],
        csa_vs_vanilla_frame_seconds=csa["frame_seconds_per_image"] / vanilla["frame_seconds_per_image"],
        csa_images=image_stats(out.images),
        csa_vs_vanilla_mean_abs_pixel_diff=mean_abs_diff(out.images, vanilla_images),
    )
    del vanilla_images
    bank = out.banks[next(iter(SDXL_CHARACTERS))]
    del out
    with tempfile.TemporaryDirectory(prefix="gpu_check_bank_") as folder:
        try:
            result["bank"] = reads = bank_read_figures(bank, run.device, run.sdxl_dtype, Path(folder))
        finally:
            bank.close()  # its file goes before the folder does
    print(
        f"sdxl: bank {reads['bank_bytes'] / GIB:.2f} GiB; a frame's reads {reads['memory']['seconds_per_frame']:.2f} s "
        f"from RAM, {reads['disk_cold']['seconds_per_frame']:.2f} s from disk (cold), "
        f"{reads['disk_warm']['seconds_per_frame']:.2f} s (warm)",
        flush=True,
    )


def flux_section(run: Run, result: dict[str, Any]) -> None:
    """Flux: the four-character story on the GPU, then with model CPU offload."""
    began = time.perf_counter()
    pipe = flux_pipeline(run)
    result.update(
        dtype=str(run.flux_dtype).removeprefix("torch."),
        height=run.height,
        steps=run.flux_steps,
        transformer_parameters=parameter_count(pipe.transformer),
        text_encoder_2_parameters=parameter_count(pipe.text_encoder_2),
        build_seconds=time.perf_counter() - began,
    )
    print(
        f"flux: built in {result['build_seconds']:.0f} s, transformer {result['transformer_parameters']:,} "
        f"parameters, T5 {result['text_encoder_2_parameters']:,}",
        flush=True,
    )
    common = dict(
        num_inference_steps=run.flux_steps, guidance_scale=3.5, height=run.height, width=run.height, output_type="np"
    )
    warm_up(pipe, run.height)
    story = StoryPipeline(pipe)
    on_device, out = run_story(story, FLUX_CHARACTERS, FLUX_FRAMES, FLUX_ID_LENGTH, common, run.device)
    result.update(on_device=on_device, on_device_images=image_stats(out.images))
    device_images = out.images
    del out
    print(
        f"flux: all on {run.device.type} {on_device['seconds_per_image']:.2f} s/image, "
        f"peak {gib(on_device['peak_bytes'])}",
        flush=True,
    )

    needed = OFFLOAD_OVER_DEVICE * on_device["seconds"] + OFFLOAD_EXTRA_S
    if run.seconds_left() < needed:
        raise SkippedForBudget(
            f"the model-offload run was skipped: it needs ~{needed:.0f} s and {run.seconds_left():.0f} s of the "
            "budget are left (the run with every model on the device is in this section)"
        )
    pipe.enable_model_cpu_offload(device=run.device)  # every model to the CPU; each comes over when it runs
    release_memory(run.device)
    try:
        offload, out = run_story(story, FLUX_CHARACTERS, FLUX_FRAMES, FLUX_ID_LENGTH, common, run.device)
    finally:
        pipe.remove_all_hooks()
    result.update(offload=offload, offload_vs_on_device_mean_abs_pixel_diff=mean_abs_diff(out.images, device_images))
    print(f"flux: offloaded {offload['seconds_per_image']:.2f} s/image, peak {gib(offload['peak_bytes'])}", flush=True)


def layer_figures(arch: str, run: Run) -> dict[str, Any]:
    """csa_attention.py's layer benchmark at its SDXL ("unet") or Flux shape, through its functions: agreement check,
    interleaved timing, paired ratios, peak memory (CUDA only) and bank figures, and the targets it checks."""
    lb = layer_bench
    device = run.device
    if arch == "unet":
        height = 64 if run.tiny else 768  # the benchmark's default SDXL decoder layer shape
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        case, runners = lb.build_case(height, device, dtype), lb.RUNNERS
        factor, math_scale = lb.kv_factor(lb.RATE, lb.REFERENCE_IMAGES), 1.0
    else:
        shape = lb.FluxShape(height=64, text_tokens=6, heads=3) if run.tiny else lb.FluxShape()
        height = shape.height
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        case, runners = lb.build_flux_case(shape, device, dtype, lb.FLUX_MATH_TIME_HEADS), lb.FLUX_RUNNERS
        factor = lb.joint_kv_factor(shape, lb.RATE, lb.REFERENCE_IMAGES)
        math_scale = shape.heads / lb.FLUX_MATH_TIME_HEADS  # official_math runs on its first heads (see there)
    warmups = dict.fromkeys(lb.VARIANTS, 1 if run.tiny else 2)
    repeats = dict.fromkeys(lb.VARIANTS, 2 if run.tiny else 7)
    lb.warm_up(case, device, warmups, runners)
    samples, outputs, _ = lb.time_variants(case, device, repeats, (), runners)
    diffs = lb.check_agreement(outputs, dtype)
    del outputs, case
    release_memory(device)
    samples["official_math"] = [ms * math_scale for ms in samples["official_math"]]
    figures: dict[str, Any] = {
        "height": height,
        "dtype": str(dtype).removeprefix("torch."),
        "kv_factor": factor,
        "ms": {name: statistics.median(values) for name, values in samples.items()},
        "time_vs_vanilla": lb.paired_ratio(samples, "ours", "vanilla"),
        "time_vs_dense": lb.paired_ratio(samples, "ours", "dense_sdpa"),
        "time_vs_official": lb.paired_ratio(samples, "ours", "official_math"),
        "max_abs_diff": diffs,
    }
    if device.type == "cuda":  # in this process: CUDA's peak counter resets cleanly, unlike a CPU's resident set
        ours = lb.measure_peak("ours", height, device, dtype, arch)["peak_bytes"]
        if arch == "unet":
            official = lb.measure_peak("official_math", height, device, dtype, arch)["peak_bytes"]
        else:  # its 24-head scores are extrapolated from its first heads, as the benchmark does
            measured = {
                heads: lb.measure_peak("official_math", height, device, dtype, arch, heads)["peak_bytes"]
                for heads in lb.FLUX_MATH_MEMORY_HEADS
            }
            official = lb.extrapolate_to_heads(measured, lb.FluxShape(height).heads)
        figures.update(peak_mem_ours_bytes=ours, peak_mem_official_bytes=official)
        figures["peak_mem_vs_official"] = ours / official
    else:
        figures.update(peak_mem_ours_bytes=None, peak_mem_official_bytes=None, peak_mem_vs_official=None)
    if arch == "unet":
        bank = lb.bank_figures(height, device, quick=True)
        figures["bank_vs_official"] = bank.bytes_per_ref_step / bank.official_bytes_per_ref_step
    else:
        bank = lb.flux_bank_figures(shape, device, quick=True)
        figures["bank_vs_official"] = bank.bytes_per_character / bank.official_bytes_per_character
    memory_ratio = figures["peak_mem_vs_official"]
    figures["targets"] = {  # the ones csa_attention.py checks
        "time_vs_vanilla": figures["time_vs_vanilla"] <= 1.10 * factor,
        "time_vs_dense": figures["time_vs_dense"] <= 0.75,
        "peak_mem_vs_official": None if memory_ratio is None else memory_ratio <= 0.1,
        "bank_vs_official": figures["bank_vs_official"] <= 0.5,
    }
    print(
        f"csa_layer {arch}: ours / vanilla {figures['time_vs_vanilla']:.2f}, / dense {figures['time_vs_dense']:.2f}, "
        f"/ official {figures['time_vs_official']:.3f}",
        flush=True,
    )
    return figures


def csa_layer_section(run: Run, result: dict[str, Any]) -> None:
    for arch in ("unet", "flux"):
        result[arch] = layer_figures(arch, run)


SECTION_RUNNERS: dict[str, SectionRunner] = {
    "csa_layer": csa_layer_section,
    "sdxl": sdxl_section,
    "flux": flux_section,
}


def run_sections(names: Sequence[str], runners: Mapping[str, SectionRunner], run: Run) -> dict[str, dict[str, Any]]:
    """Each section in `names`, guarded: a failure (or a skip for the budget) becomes its `error`, with a traceback
    tail, beside whatever it had measured, and the next section still runs. Every section's entry has `error`
    (None when it ran through) and `seconds`."""
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        began = time.perf_counter()
        minimum = 0.0 if run.tiny else SECTION_MINIMUM_S.get(name, 0.0)
        results[name] = result = {}
        try:
            if run.seconds_left() < minimum:
                raise SkippedForBudget(
                    f"skipped: it needs at least {minimum:.0f} s and {max(run.seconds_left(), 0):.0f} s of the "
                    "budget are left"
                )
            print(f"== {name} ({run.seconds_left():.0f} s of the budget left)", flush=True)
            runners[name](run, result)
            result["error"] = None
        except Exception as error:  # one section's failure must not stop the others
            print(f"{name} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            if not isinstance(error, SkippedForBudget):
                result["traceback"] = traceback.format_exc()[-3000:]
                traceback.print_exc()
            result["error"] = f"{type(error).__name__}: {error}"
        finally:
            release_memory(run.device)
        result["seconds"] = time.perf_counter() - began
    return results


def targets(results: Mapping[str, Mapping[str, Any]]) -> dict[str, bool | None]:
    """The issue's targets: True / False where measured, None where not (a section not run, failed, or on a CPU)."""

    def at_most(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit

    sdxl, flux = results.get("sdxl", {}), results.get("flux", {})
    sdxl_peak = (sdxl.get("csa") or {}).get("peak_bytes")
    return {
        "sdxl_peak_le_16GiB": at_most(sdxl_peak, TARGETS["sdxl_peak_le_16GiB"]),
        "csa_seconds_per_image_le_1.25x_vanilla": at_most(
            sdxl.get("csa_vs_vanilla_seconds_per_image"), TARGETS["csa_seconds_per_image_le_1.25x_vanilla"]
        ),
        "flux_on_gpu_peak_le_40GiB": at_most(
            (flux.get("on_device") or {}).get("peak_bytes"), TARGETS["flux_on_gpu_peak_le_40GiB"]
        ),
        "flux_offload_peak_le_24GiB": at_most(
            (flux.get("offload") or {}).get("peak_bytes"), TARGETS["flux_offload_peak_le_24GiB"]
        ),
    }


def json_ready(value: Any) -> Any:
    """`value` with NaN and inf (not JSON) as None, and anything else JSON lacks as its string."""
    if isinstance(value, Mapping):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    if isinstance(value, float):
        return finite_or_none(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def gib(size: int | None) -> str:
    return "n/a (not CUDA)" if size is None else f"{size / GIB:.2f} GiB"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_sections(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: sections are a comma-separated subset of {','.join(SECTIONS)}")
    return [name for name in SECTIONS if name in names]  # always in the planned order


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the same code at tiny shapes, on the CPU by default")
    parser.add_argument(
        "--sections",
        type=parse_sections,
        default=list(SECTIONS),
        help=f"comma-separated (default {','.join(SECTIONS)})",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda, or cpu with --tiny")
    budgets = DEFAULT_BUDGET_S
    parser.add_argument(
        "--budget-s", type=float, help=f"seconds (default {budgets['full']:.0f}; --tiny {budgets['tiny']:.0f})"
    )
    parser.add_argument("--sdxl-steps", type=int, help="SDXL denoising steps (default 30; --tiny 3)")
    parser.add_argument("--flux-steps", type=int, help="Flux denoising steps (default 28; --tiny 3)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device; use --tiny to run at tiny shapes on the CPU")
    if args.device == "cpu" and not args.tiny:
        parser.error("the full-size models need a CUDA GPU; add --tiny to run at tiny shapes on the CPU")
    args.budget_s = DEFAULT_BUDGET_S["tiny" if args.tiny else "full"] if args.budget_s is None else args.budget_s
    args.sdxl_steps = args.sdxl_steps or (3 if args.tiny else 30)
    args.flux_steps = args.flux_steps or (3 if args.tiny else 28)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.monotonic()
    run = Run(
        tiny=args.tiny,
        device=torch.device(args.device),
        sdxl_steps=args.sdxl_steps,
        flux_steps=args.flux_steps,
        deadline=started + args.budget_s,
    )
    cuda = run.device.type == "cuda"
    if run.tiny and not cuda:
        torch.set_num_threads(1)  # tiny models' small ops: a thread pool only waits at its barriers (as the tests do)
    print(
        f"GPU check ({'tiny' if run.tiny else 'full'}) on {torch.cuda.get_device_name(run.device) if cuda else 'cpu'}: "
        f"{', '.join(args.sections)}; budget {args.budget_s:.0f} s",
        flush=True,
    )
    results = run_sections(args.sections, SECTION_RUNNERS, run)
    elapsed = time.monotonic() - started
    report: dict[str, Any] = {
        "mode": "tiny" if run.tiny else "full",
        "device": torch.cuda.get_device_name(run.device) if cuda else "cpu",
        "gpu_memory_bytes": torch.cuda.get_device_properties(run.device).total_memory if cuda else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "sections": list(args.sections),
        **results,
        "errors": {name: section["error"] for name, section in results.items() if section["error"]},
        "targets": targets(results),
        "memory_note": None if cuda else "memory figures are torch.cuda.max_memory_allocated: null on the CPU",
        "elapsed_s": round(elapsed, 1),
        "budget_s": args.budget_s,
        "within_budget": elapsed <= args.budget_s,
    }
    print(json.dumps(json_ready(report)))
    return report


if __name__ == "__main__":
    main()
