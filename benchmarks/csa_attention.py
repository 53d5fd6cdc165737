"""Benchmark: one Consistent Self-Attention (CSA) layer against three baselines, at SDXL shapes.

What is measured
----------------
One self-attention layer call of the SDXL decoder's 640-channel level (`up_blocks.1`): at the default
768 px that is 48 x 48 = 2304 tokens x 640 channels, 10 heads of 64. Three reference images of one
character are denoised together under classifier-free guidance, so the layer sees hidden states of
shape (2 * 3, 2304, 640), halves [uncond; cond]. Sampling rate r = 0.5. Every variant is a whole
layer call, Q/K/V/out projections included, on the same diffusers `Attention` module (random weights):

- ``ours``: `storydiffusion.ConsistentSelfAttnProcessor` in mutual mode — each image's keys/values are
  its own 2304 tokens plus round(r * 2304) tokens sampled from each of the 2 other images of its guidance
  half, gathered by index, then fused `scaled_dot_product_attention` (no mask).
- ``vanilla``: diffusers' `AttnProcessor2_0`, plain self-attention (the floor; CSA's FLOP factor over it
  is the K/V factor 1 + r * (B - 1) = 2.0).
- ``dense_sdpa``: the dense-mask formulation of the public StoryDiffusion code on today's fused SDPA —
  per guidance half the 3 images are concatenated into one sequence of 3 * 2304 tokens, and a boolean
  (6912, 6912) mask lets image i see all of its own tokens plus the same sampled tokens of the others.
- ``official_math``: the same dense-mask formulation as the public code ran it under its pinned torch 2.0,
  whose SDPA took the math path for masked inputs: scores materialised, ``softmax(Q K^T / sqrt(d) + M) V``
  with an additive float mask M, written out with matmul + in-place add + softmax + matmul, as
  torch 2.0's `_scaled_dot_product_attention_math` did.

The masks are built from the very indices `ours` samples (same seeded generator), so `ours`,
`dense_sdpa` and `official_math` compute the same function; the script asserts that they agree to
float tolerance (printing the max abs difference) before it reports anything. Mask construction is
treated as input (the public code built it once per step for all layers), not timed.

How
---
- Time: all four variants in this process under `torch.no_grad()`, torch's default threads; untimed
  warm-up calls, then timed calls interleaved round-robin so drift hits every variant alike; the median is
  reported, and the last timed outputs feed the correctness check. Full run: 2 warm-up and 7 timed calls of
  each variant; --quick: 1 + 2, except ``official_math`` (seconds a call): 0 + 1, after the others warmed up.
  The ``time_vs_*`` ratios are medians of per-round ratios (ours over the baseline timed in the same round),
  which a load that comes and goes between rounds biases far less than a ratio of medians would.
- Peak memory above baseline: each variant in its own fresh subprocess (this script re-invoked with the
  hidden ``--_measure VARIANT`` flag), which builds the inputs, records its baseline, runs the variant
  once and reports the rise. The subprocesses run while this process warms up, never while it times;
  --quick measures only ``ours`` and ``official_math`` (the two the targets need): ``ours`` in a
  subprocess, and on a CPU with /proc ``official_math`` during its one timed call in this process (the
  high-water mark reset just before it; it agrees with the subprocess figure, 7.4-7.8 GB here, and spares
  a second ~15 s run of the math path).
  On CPU the peak is the resident-set high-water mark: Linux's VmHWM after resetting it through
  /proc/self/clear_refs (ru_maxrss cannot be reset, so it keeps the import-time peak and, on Linux, the
  spawning parent's), falling back to `resource.getrusage` ru_maxrss where that reset is unavailable. On
  CUDA it is `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus the allocated baseline.
- Identity-bank size per character and per reference denoising step, averaged over a 50-step run at the
  real SDXL decoder layout (up_blocks.0: 3 attentions x 10 layers, 1280 channels, (H/32)^2 tokens;
  up_blocks.1: 3 x 2 layers, 640 channels, (H/16)^2 tokens; 36 CSA layers), 3 reference images, r = 0.5,
  2 guidance halves. The public code's figure keeps fp16 sampled hidden states of every CSA layer at every
  step. Ours fills a real `IdentityBank` (default int8 storage on the CPU) with `put` for exactly the
  (step, layer) pairs that `CSAConfig()`'s default schedule gates on, drawn by `ConsistentAttention`'s own
  gate draw from a seeded generator, one layer at a time to keep memory low; --quick stores one entry per
  layer and counts it once per gated step (all entries of a layer have the same size: the same bytes).

Usage: ``python benchmarks/csa_attention.py [--quick] [--device cpu|cuda] [--height 768]``. Human-readable
lines go out as the run proceeds; the last line is one JSON object with every figure and the targets.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

try:
    import storydiffusion  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from storydiffusion.csa.attention import ConsistentSelfAttnProcessor, CSAConfig, CSASchedule, kv_factor
from storydiffusion.csa.bank import BankSettings, IdentityBank
from storydiffusion.csa.controller import ConsistentAttention

CHANNELS = 640  # SDXL up_blocks.1 (the 640-channel decoder level)
HEADS = 10
REFERENCE_IMAGES = 3
GUIDANCE_HALVES = 2
RATE = 0.5
NUM_STEPS = 50
SEED = 0
LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
VARIANTS = ("ours", "vanilla", "dense_sdpa", "official_math")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One layer call's inputs, shared by every variant."""

    attn: Attention
    hidden: torch.Tensor  # (halves * B, N, C), halves [uncond; cond]
    processor: ConsistentSelfAttnProcessor
    generator: torch.Generator  # the controller's; reseeded before each call so every call samples `indices`
    indices: torch.Tensor  # (B, k): what `ours` samples, and what the masks are built from
    bool_mask: torch.Tensor  # (B * N, B * N), True = may attend
    additive_mask: torch.Tensor  # (B * N, B * N), 0 where allowed, dtype's min elsewhere


def mutual_controller(rate: float, num_images: int, generator: torch.Generator) -> ConsistentAttention:
    """A controller in mutual mode for one stand-alone layer with CSA gated on and no bank.

    This is the state `ConsistentAttention.begin_mutual` sets up, minus installing on a UNet.
    """
    controller = ConsistentAttention(CSAConfig(rate=rate, schedule=CSASchedule.always()))
    controller.mode, controller.num_steps, controller.images_per_call = "mutual", 1, num_images
    controller.generator = generator
    controller.gates = {LAYER: [True]}
    return controller


def allowed_keys_mask(indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Dense CSA mask (B * N, B * N): image i sees all of its own tokens and the sampled tokens of every image."""
    num_images = indices.shape[0]
    sampled = torch.zeros(num_images, num_tokens, dtype=torch.bool, device=indices.device)
    sampled.scatter_(1, indices, True)  # (owner, token)
    visible = sampled.unsqueeze(0).repeat(num_images, 1, 1)  # (viewer, owner, token)
    own = torch.arange(num_images, device=indices.device)
    visible[own, own] = True
    return visible.flatten(1).repeat_interleave(num_tokens, dim=0)  # one row per query token


def build_case(height: int, device: torch.device, dtype: torch.dtype) -> Case:
    num_tokens = (height // 16) ** 2
    torch.manual_seed(SEED)
    attn = Attention(query_dim=CHANNELS, heads=HEADS, dim_head=CHANNELS // HEADS).to(device, dtype).eval()
    hidden = torch.randn(GUIDANCE_HALVES * REFERENCE_IMAGES, num_tokens, CHANNELS, device=device, dtype=dtype)

    generator = torch.Generator(device).manual_seed(SEED)
    controller = mutual_controller(RATE, REFERENCE_IMAGES, generator)
    processor = ConsistentSelfAttnProcessor(LAYER, 2, RATE, controller, AttnProcessor2_0())
    num_samples = round(RATE * num_tokens)
    indices = controller.sample_indices(REFERENCE_IMAGES, num_tokens, num_samples)  # what every call draws
    generator.manual_seed(SEED)

    bool_mask = allowed_keys_mask(indices.to(device), num_tokens)
    additive_mask = torch.zeros(bool_mask.shape, device=device, dtype=dtype)
    additive_mask.masked_fill_(~bool_mask, torch.finfo(dtype).min)
    return Case(attn, hidden, processor, generator, indices, bool_mask, additive_mask)


# --------------------------------------------------------------------------------------------
# The four layer calls
# --------------------------------------------------------------------------------------------
def run_ours(case: Case) -> torch.Tensor:
    case.generator.manual_seed(SEED)  # same sampled tokens at every call, equal to `case.indices`
    return case.processor(case.attn, case.hidden)


def run_vanilla(case: Case) -> torch.Tensor:
    return AttnProcessor2_0()(case.attn, case.hidden)


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (batch, T, h * d) -> (batch, h, T, d)


def _dense_qkv(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each guidance half's images as one sequence, projected: 3 x (halves, h, B * N, d)."""
    attn = case.attn
    x = case.hidden.reshape(GUIDANCE_HALVES, -1, case.hidden.shape[-1])  # (halves, B * N, C)
    return tuple(_heads_first(proj(x), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))


def _dense_out(case: Case, out: torch.Tensor) -> torch.Tensor:
    out = out.transpose(1, 2).flatten(2)  # (halves, B * N, h * d)
    out = case.attn.to_out[1](case.attn.to_out[0](out))
    return out.reshape(case.hidden.shape)  # (halves * B, N, C)


def run_dense_sdpa(case: Case) -> torch.Tensor:
    query, key, value = _dense_qkv(case)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=case.bool_mask, scale=case.attn.scale)
    return _dense_out(case, out)


def run_official_math(case: Case) -> torch.Tensor:
    query, key, value = _dense_qkv(case)
    root_scale = math.sqrt(case.attn.scale)  # torch 2.0's math path scales q and k by sqrt(scale) each
    scores = (query * root_scale) @ (key.transpose(-2, -1) * root_scale)  # (halves, h, B*N, B*N) materialised
    scores.add_(case.additive_mask)
    scores = scores.softmax(dim=-1)
    return _dense_out(case, scores @ value)


RUNNERS: dict[str, Callable[[Case], torch.Tensor]] = {
    "ours": run_ours,
    "vanilla": run_vanilla,
    "dense_sdpa": run_dense_sdpa,
    "official_math": run_official_math,
}


# --------------------------------------------------------------------------------------------
# Correctness guard and timing
# --------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(case: Case, device: torch.device, calls: dict[str, int]) -> None:
    """Untimed calls, round-robin: `calls[name]` of each variant."""
    with torch.no_grad():
        for round_ in range(max(calls.values())):
            for name in VARIANTS:
                if round_ < calls[name]:
                    RUNNERS[name](case)
        synchronize(device)


def time_variants(
    case: Case, device: torch.device, repeats: dict[str, int], track_peak: str | None = None
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor], int | None]:
    """ms of each timed call per variant, repeats interleaved round-robin; each variant's last output; and,
    with `track_peak` (CPU), that variant's first call's peak memory above the resident set before it."""
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    outputs: dict[str, torch.Tensor] = {}
    peak = None
    with torch.no_grad():
        for round_ in range(max(repeats.values())):
            due = [name for name in VARIANTS if round_ < repeats[name]]
            for name in due:
                outputs.pop(name, None)  # let the previous output go before the call, as a caller would
                gc.collect()
                tracked = name == track_peak and peak is None
                if tracked:
                    _release_free_memory()
                    Path("/proc/self/clear_refs").write_text("5")  # high-water mark := now
                    baseline_kib = _proc_status_kib("VmRSS")
                start = time.perf_counter()
                outputs[name] = RUNNERS[name](case)
                synchronize(device)
                samples[name].append((time.perf_counter() - start) * 1e3)
                if tracked:
                    peak = (_proc_status_kib("VmHWM") - baseline_kib) * 1024
            print(f"  round {round_ + 1}: " + ", ".join(f"{n} {samples[n][-1]:.0f} ms" for n in due), flush=True)
    return samples, outputs, peak


def check_agreement(outputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, float]:
    """Assert that dense_sdpa and official_math reproduce ours (same sampled indices); return max abs diffs."""
    ours = outputs["ours"].float()
    diffs = {name: (outputs[name].float() - ours).abs().max().item() for name in ("dense_sdpa", "official_math")}
    tolerance = (1e-4 if dtype == torch.float32 else 1e-2) * max(1.0, ours.abs().max().item())
    for name, diff in diffs.items():
        print(f"check: max |ours - {name}| = {diff:.3g} (tolerance {tolerance:.3g})", flush=True)
        assert diff <= tolerance, f"ours and {name} disagree: max abs diff {diff:.3g} > {tolerance:.3g}"
    return diffs


def paired_ratio(samples: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of ms[name] / ms[baseline] within the same round: robust to load that drifts."""
    rounds = zip(samples[name], samples[baseline])
    return statistics.median(mine / theirs for mine, theirs in rounds)


# --------------------------------------------------------------------------------------------
# Peak memory, one fresh subprocess per variant
# --------------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _keep_freed_memory_for_reuse() -> None:
    """Have glibc keep freed buffers (up to 256 MiB each) for reuse instead of unmapping them.

    Only speeds up the bank fill's ~1,400 same-sized temporaries where page faults are slow (VMs);
    called after all timing, in this process only, and it changes no byte the bank counts.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 256 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)


def _release_free_memory() -> None:
    """Give freed heap pages back to the OS so the baseline is what the inputs really hold."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _can_reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _proc_status_kib("VmHWM")
    except OSError:
        return False
    return True


def measure_peak(variant: str, height: int, device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    """Build the inputs, run `variant` once, and return its peak memory above the post-input baseline."""
    case = build_case(height, device, dtype)
    with torch.no_grad():
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
            RUNNERS[variant](case)
            synchronize(device)
            return {"peak_bytes": torch.cuda.max_memory_allocated(device) - baseline, "method": "cuda_max_allocated"}
        _release_free_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the resident-set high-water mark to now
            baseline_kib, method = _proc_status_kib("VmRSS"), "VmHWM"
        except OSError:
            baseline_kib, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
        RUNNERS[variant](case)
        if method == "VmHWM":
            peak_kib = _proc_status_kib("VmHWM")
        else:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_bytes": (peak_kib - baseline_kib) * 1024, "method": method}


def peak_in_subprocess(variant: str, height: int, device: str) -> dict[str, object]:
    command = [sys.executable, str(Path(__file__).resolve()), "--_measure", variant, "--height", str(height)]
    command += ["--device", device]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {variant} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Identity-bank size
# --------------------------------------------------------------------------------------------
def sdxl_decoder_csa_layers(height: int) -> dict[str, tuple[int, int, int]]:
    """CSA layers of SDXL's decoder at `height`: name -> (level, tokens, channels), in UNet order."""
    layers = {}
    for block, (attentions, depth, channels, level) in enumerate([(3, 10, 1280, 4), (3, 2, 640, 2)]):
        tokens = (height // (8 * level)) ** 2
        for a in range(attentions):
            for t in range(depth):
                layers[f"up_blocks.{block}.attentions.{a}.transformer_blocks.{t}.attn1"] = (level, tokens, channels)
    return layers


@dataclass
class BankFigures:
    bytes_per_ref_step: float  # ours: a default IdentityBank's bytes over the run / steps
    official_bytes_per_ref_step: int  # the public code: fp16, every CSA layer at every step
    accelerator_bytes_per_ref_step: float  # the part of ours held on a non-CPU device
    entries: int  # (step, layer) pairs the schedule gated on
    entry_fraction: float  # entries / (layers * steps)
    storage: str
    device: str


def bank_figures(height: int, device: torch.device, quick: bool = False) -> BankFigures:
    """Bytes per character per reference step: ours (a real default IdentityBank) and the public code's.

    `quick` stores one entry per layer and counts it once per gated step: every entry of a layer has
    the same shape and storage, so the bytes are the same as the full fill's (~1,400 quantisations)."""
    layers = sdxl_decoder_csa_layers(height)
    fp16_bytes = 2
    official = sum(
        GUIDANCE_HALVES * REFERENCE_IMAGES * round(RATE * tokens) * channels * fp16_bytes
        for _, tokens, channels in layers.values()
    )

    config = CSAConfig()  # defaults: rate 0.5, decoder layers, default schedule
    controller = ConsistentAttention(config)
    controller.layers = {name: level for name, (level, _, _) in layers.items()}
    gates = controller.draw_gates(NUM_STEPS, torch.Generator().manual_seed(SEED))  # the controller's own draw

    settings = BankSettings(
        model="",
        unet_fingerprint="benchmark",
        scheduler="EulerDiscreteScheduler",
        num_steps=NUM_STEPS,
        height=height,
        width=height,
        guidance_halves=GUIDANCE_HALVES,
        id_length=REFERENCE_IMAGES,
    )
    bank = IdentityBank("benchmark", settings)  # default storage "int8", device cpu
    total, by_device, entries = 0, {}, 0
    random_tokens: dict[tuple[int, ...], torch.Tensor] = {}  # one per shape: the values change no byte
    for name, (level, tokens, channels) in layers.items():
        num_samples = round(config.rate_for(level) * tokens)
        shape = (GUIDANCE_HALVES, REFERENCE_IMAGES * num_samples, channels)
        if shape not in random_tokens:
            random_tokens[shape] = torch.randn(shape, device=device)
        sampled = random_tokens[shape]
        on_steps = [step for step, gated_on in enumerate(gates[name]) if gated_on]
        for step in on_steps[:1] if quick else on_steps:
            bank.put(step, name, sampled)
        copies = len(on_steps) if quick else 1  # quick: the one stored entry stands for each gated step
        entries += len(bank) * copies
        total += bank.nbytes * copies
        for where, size in bank.nbytes_by_device().items():
            by_device[where] = by_device.get(where, 0) + size * copies
        bank.reset()  # one layer at a time keeps memory low
    accelerator = sum(size for where, size in by_device.items() if not where.startswith("cpu"))
    return BankFigures(
        bytes_per_ref_step=total / NUM_STEPS,
        official_bytes_per_ref_step=official,  # every layer at every step, so already per step
        accelerator_bytes_per_ref_step=accelerator / NUM_STEPS,
        entries=entries,
        entry_fraction=entries / (len(layers) * NUM_STEPS),
        storage=bank.storage_dtype,
        device=str(bank.device),
    )


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (same shapes); about a minute on 2 cores")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--height", type=int, default=768, help="image side in pixels (multiple of 32)")
    parser.add_argument("--_measure", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.height <= 0 or args.height % 32:
        parser.error(f"--height {args.height} must be a positive multiple of 32")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    return args


def describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args._measure:
        print(json.dumps({"variant": args._measure, **measure_peak(args._measure, args.height, device, dtype)}))
        return

    began = time.perf_counter()
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: 1-minute load average is {load:.1f} before starting; timings may be noisy", flush=True)
    # Untimed warm-up calls, then timed calls, per variant. --quick gives official_math (several seconds a
    # call on a 2-core CPU) one timed call and no warm-up call of its own, after the other variants have
    # warmed torch's kernels and thread pool: a rougher figure for the one baseline that has no target.
    warmups = {name: 1 if args.quick else 2 for name in VARIANTS}
    repeats = {name: 2 if args.quick else 7 for name in VARIANTS}
    if args.quick:
        warmups["official_math"], repeats["official_math"] = 0, 1
    num_tokens, factor = (args.height // 16) ** 2, kv_factor(RATE, REFERENCE_IMAGES)
    print(
        f"CSA layer benchmark on {device} ({dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads): "
        f"{args.height} px -> hidden states ({GUIDANCE_HALVES * REFERENCE_IMAGES}, {num_tokens}, {CHANNELS}), "
        f"{HEADS} heads, r={RATE}, K/V factor {factor}",
        flush=True,
    )

    # Memory: one fresh subprocess per variant, run in the background while this process warms up (which
    # is untimed); --quick runs the subprocesses side by side, the full run one at a time to spare RAM.
    # --quick on a CPU with /proc: official_math's peak comes from its one timed call in this process (the
    # high-water mark reset just before it), which spares a second ~15 s run of the math path.
    in_process = args.quick and device.type == "cpu" and _can_reset_high_water_mark()
    measured = ("ours",) if in_process else ("ours", "official_math") if args.quick else VARIANTS
    with ThreadPoolExecutor(max_workers=len(measured) if args.quick else 1) as pool:
        reports = {name: pool.submit(peak_in_subprocess, name, args.height, args.device) for name in measured}
        case = build_case(args.height, device, dtype)
        print(f"warm-up calls: {describe(warmups)} [{time.perf_counter() - began:.0f} s]", flush=True)
        warm_up(case, device, warmups)
        peaks: dict[str, int] = {}
        for name, report in reports.items():
            peaks[name], method = int(report.result()["peak_bytes"]), str(report.result()["method"])
            print(f"peak memory {name:>13}: {peaks[name] / 2**20:9.1f} MiB above baseline ({method})", flush=True)

    print(f"timed calls, interleaved: {describe(repeats)} [{time.perf_counter() - began:.0f} s]", flush=True)
    samples, outputs, official_peak = time_variants(case, device, repeats, "official_math" if in_process else None)
    if official_peak is not None:
        peaks["official_math"], method = official_peak, "VmHWM"
        print(f"peak memory official_math: {official_peak / 2**20:9.1f} MiB above baseline (VmHWM, in-process)")
    diffs = check_agreement(outputs, dtype)
    del outputs
    ms = {name: statistics.median(values) for name, values in samples.items()}
    for name in VARIANTS:
        print(f"time {name:>13}: {ms[name]:9.1f} ms (median)", flush=True)
    del case
    _release_free_memory()

    elapsed = time.perf_counter() - began
    print(f"bank: filling a default IdentityBank over {NUM_STEPS} steps [{elapsed:.0f} s]", flush=True)
    # The fill is ~1,400 small quantisations, not a timed figure: speed it up, its bytes stay the same.
    _keep_freed_memory_for_reuse()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared CPU otherwise wait at a thread-pool barrier each
    bank = bank_figures(args.height, device, quick=args.quick)
    torch.set_num_threads(threads)
    print(
        f"bank per character per reference step: ours {bank.bytes_per_ref_step / 2**20:.1f} MiB "
        f"({bank.storage} on {bank.device}, {bank.entries} entries = {bank.entry_fraction:.0%} of layer-steps), "
        f"public code {bank.official_bytes_per_ref_step / 2**20:.1f} MiB (fp16, every layer-step)",
        flush=True,
    )

    result: dict[str, Any] = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_at_start": round(load, 2),
        "height": args.height,
        "tokens": num_tokens,
        "channels": CHANNELS,
        "heads": HEADS,
        "reference_images": REFERENCE_IMAGES,
        "rate": RATE,
        "kv_factor": factor,
        "warmup": warmups,
        "repeats": repeats,
        "ms_ours": ms["ours"],
        "ms_vanilla": ms["vanilla"],
        "ms_dense_sdpa": ms["dense_sdpa"],
        "ms_official_math": ms["official_math"],
        "time_vs_vanilla": paired_ratio(samples, "ours", "vanilla"),
        "time_vs_dense": paired_ratio(samples, "ours", "dense_sdpa"),
        "time_vs_official": paired_ratio(samples, "ours", "official_math"),
        "max_abs_diff_dense_sdpa": diffs["dense_sdpa"],
        "max_abs_diff_official_math": diffs["official_math"],
        "peak_mem_ours_bytes": peaks["ours"],
        "peak_mem_vanilla_bytes": peaks.get("vanilla"),
        "peak_mem_dense_sdpa_bytes": peaks.get("dense_sdpa"),
        "peak_mem_official_bytes": peaks["official_math"],
        "peak_mem_vs_official": peaks["ours"] / peaks["official_math"],
        "peak_mem_method": method,
        "bank_bytes_per_ref_step": bank.bytes_per_ref_step,
        "official_bank_bytes_per_ref_step": bank.official_bytes_per_ref_step,
        "bank_vs_official": bank.bytes_per_ref_step / bank.official_bytes_per_ref_step,
        "bank_accelerator_bytes_per_ref_step": bank.accelerator_bytes_per_ref_step,
        "bank_entry_fraction": bank.entry_fraction,
        "quick": args.quick,
    }
    result["targets"] = {
        "time_vs_vanilla": result["time_vs_vanilla"] <= 1.10 * factor,
        "time_vs_dense": result["time_vs_dense"] <= 0.75,
        "peak_mem_vs_official": result["peak_mem_vs_official"] <= 0.1,
        "bank_vs_official": result["bank_vs_official"] <= 0.5,
    }
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
