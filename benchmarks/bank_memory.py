"""Benchmark: identity banks at SDXL 1024 px — RAM per character and seconds per frame, today's in-RAM bank
against the default storage (in RAM up to 256 MiB, then on disk); bitwise-identical outputs; the size of a
character file; and the lossy compaction options, each measured.

What is measured
----------------
1. RAM per character, SDXL 1024 px shapes with random hidden states, default settings (int8, `CSAConfig()`:
   the public schedule, rate 0.5; id_length 3; 50 steps; classifier-free guidance). A real `IdentityBank` is
   filled through `put` at exactly the (step, layer) pairs the default schedule gates on (the controller's own
   seeded draw), with LayerNorm'd random tokens of the shapes the 36 SDXL decoder CSA layers sample
   (up_blocks.0: 3 x 512 of 1024 tokens x 1280 channels; up_blocks.1: 3 x 2048 of 4096 x 640; both guidance
   halves), as a reference phase writes them. Then one frame's reads: every entry, in the loop's order,
   dequantised to float32 on the CPU — what a frame asks of the bank. Each storage mode runs in a fresh
   subprocess (this script with the hidden ``--_measure MODE``): resident set (VmRSS) above its baseline after
   the fill and the frame, with freed heap given back first (malloc_trim), and its high-water mark (VmHWM,
   reset through /proc/self/clear_refs after the inputs are built), beside the bytes the bank counts as held.
   The disk bank's file lives in $TMPDIR; its pages sit in the kernel's page cache, not in the process.
2. Seconds per frame: that frame's reads timed, in RAM and from disk — first right after the fill (the
   file's pages still being written back), then twice once they are (fsync; the faster of the two counts),
   then cold (posix_fadvise DONTNEED on the file: the reads hit the disk). `seconds_per_frame_vs_in_ram` is
   the disk bank's time over the in-RAM bank's for that work once written back (the bank's share of a
   frame; the UNet's share is the same in both); the other two are reported beside it. Reads for CPU
   compute run in line (no read-ahead thread: see `BankStorage.prefetch`). On the tiny random pipeline,
   whole frames are also timed reading each kind of bank.
3. `identical_output`: the tiny random SD pipeline draws the same story with today's in-RAM bank and with the
   default storage forced onto disk (memory limit 0), and with a pure disk bank: every frame equal bit for bit
   (float32 pixels), and the bank digests equal; at SDXL shapes, the two subprocesses' bank digests and a
   digest of the first gated step's reads (float32 bytes) must agree too.
4. `saved_character_bytes`: the character file of an SDXL 1024 px character (its settings built from the real
   SDXL UNet config on the meta device: fingerprint, 36 CSA layer names, a weights probe of the right length,
   the SDXL scheduler config; 3 styled reference prompts). The tiny run's real file is reported beside it, and
   regenerating a character from its file must give the same bank digest and the same later frame.
5. `fixed_level_bank_bytes_per_character`: the same character's bank recorded at one fixed noise level (a
   picture character, or `bank_from="finished"`/`"sequential"` with a fractional `reference_noise`): one entry
   per layer that every gated step reads (`IdentityBank.put_shared`), counted from a real bank.
6. Lossy options, each a row: bank bytes at SDXL 1024 px (counted from real `put`s, one entry per layer times
   its stored count), and on the shipped tiny model (trained weights, real hidden states, 20 steps) the CSA
   layers' output deviation against the exact bank — teacher-forced: the inputs of every CSA layer call of a
   frame read with the exact bank are recorded, and each layer's output with the lossy bank's tokens is
   compared with its output with the exact bank's, ||out_lossy - out_exact|| / ||out_exact - out_no_bank||
   over all calls (0: exact; 1: as far off as reading no bank) — and the frame's mean absolute pixel
   difference. For int4 and fewer tokens also the deviation at SDXL 1024 shapes with random weights (256
   sampled queries against the full keys); step sharing and subject-only need real hidden states (None).
   Identity agreement waits for a tiny world that keeps characters.

--quick fills the first 8 of the 50 steps (7 gated steps: 14% of the bank, past the 256 MiB spill) and scales
the counted bytes and read seconds to the whole bank (each entry of a layer has the same size); the full run
fills all 50. Usage: ``python benchmarks/bank_memory.py [--quick]``; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

try:
    import storydiffusion  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from csa_attention import sdxl_decoder_csa_layers  # the same SDXL layout as the CSA benchmark's bank figures
from diffusers.models.attention_processor import Attention

from storydiffusion.csa.attention import CSAConfig, consistent_attention
from storydiffusion.csa.bank import (
    BankCompaction,
    BankSettings,
    BankStorage,
    IdentityBank,
    dequantize_int4,
    dequantize_int8,
    keep_evenly,
    quantize_int4,
    quantize_int8,
)
from storydiffusion.csa.controller import ConsistentAttention

HEIGHT = 1024
NUM_STEPS = 50
REFERENCE_IMAGES = 3
GUIDANCE_HALVES = 2
SEED = 0
QUICK_STEPS = 8
MODES = ("memory", "auto")  # today's in-RAM bank; the default (RAM up to 256 MiB, then disk)
LOSSY = {  # name -> (bank dtype, compaction, subject_only)
    "exact (int8, default)": ("int8", BankCompaction(), False),
    "keep_tokens=0.5": ("int8", BankCompaction(keep_tokens=0.5), False),
    "keep_tokens=0.25": ("int8", BankCompaction(keep_tokens=0.25), False),
    "share_steps=2": ("int8", BankCompaction(share_steps=2), False),
    "share_steps=5": ("int8", BankCompaction(share_steps=5), False),
    "int4": ("int4", BankCompaction(), False),
    "subject_only": ("int8", BankCompaction(), True),
}


# --------------------------------------------------------------------------------------------
# Memory readings
# --------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _mmap_threshold(size: int) -> None:
    """glibc: allocations of `size` bytes and up are mapped on their own and unmapped when freed.

    The fill runs with 1 MiB: the CPU-side quantisation's float temporaries (on a GPU run they live on the GPU)
    would otherwise stay in a fragmented heap between the bank's entries, and the resident set would measure
    the allocator (here: ~4x an in-RAM bank's size) instead of the bank. The timed reads then run with a large
    threshold, so each read reuses the heap instead of faulting fresh pages in."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, size)
    libc.mallopt(m_trim_threshold, max(size, 128 << 10) * 2)


def _give_back_free_memory() -> None:
    """Freed heap pages back to the OS, so the resident set is what is still held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------------------------
# 1-2. The SDXL-shaped bank, one storage mode per subprocess
# --------------------------------------------------------------------------------------------
def sdxl_settings() -> BankSettings:
    return BankSettings(
        model="",
        denoiser_fingerprint="benchmark",
        scheduler="EulerDiscreteScheduler",
        num_steps=NUM_STEPS,
        height=HEIGHT,
        width=HEIGHT,
        guidance_halves=GUIDANCE_HALVES,
        id_length=REFERENCE_IMAGES,
    )


def sdxl_gates() -> dict[str, list[bool]]:
    """Per CSA layer, the steps the default schedule runs CSA at (the controller's own seeded draw)."""
    controller = ConsistentAttention(CSAConfig())
    controller.layers = {name: level for name, (level, _, _) in sdxl_decoder_csa_layers(HEIGHT).items()}
    return controller.draw_gates(NUM_STEPS, torch.Generator().manual_seed(SEED))


def sdxl_entries(steps: int, config: CSAConfig | None = None) -> list[tuple[int, str, tuple[int, int, int]]]:
    """(step, layer, entry shape) a reference phase writes over the first `steps` steps, in loop order."""
    config = config or CSAConfig()
    layers, gates = sdxl_decoder_csa_layers(HEIGHT), sdxl_gates()
    entries = []
    for step in range(steps):
        for name, (level, tokens, channels) in layers.items():
            if gates[name][step]:
                sampled = REFERENCE_IMAGES * round(config.rate_for(level) * tokens)
                entries.append((step, name, (GUIDANCE_HALVES, sampled, channels)))
    return entries


def measure_mode(mode: str, steps: int) -> dict[str, Any]:
    """Fill a bank of `mode` storage over `steps` steps, read one frame from it; memory and time figures."""
    torch.manual_seed(SEED)
    entries = sdxl_entries(steps)
    # one random base per shape (the values change no byte of the size); rolled per step so entries differ
    bases = {}
    for _, _, shape in entries:
        if shape not in bases:
            bases[shape] = F.layer_norm(torch.randn(shape), shape[-1:])
    storage = BankStorage(mode)
    _mmap_threshold(1 << 20)
    _give_back_free_memory()
    Path("/proc/self/clear_refs").write_text("5")  # high-water mark := now
    baseline = _status_kib("VmRSS") * 1024

    started = time.perf_counter()
    bank = IdentityBank("benchmark", sdxl_settings(), "int8", storage=storage)
    for step, layer, shape in entries:
        bank.put(step, layer, bases[shape].roll(step, dims=1))
    fill_s = time.perf_counter() - started
    _give_back_free_memory()
    after_fill = _status_kib("VmRSS") * 1024 - baseline
    peak_fill = _status_kib("VmHWM") * 1024 - baseline

    _mmap_threshold(256 << 20)

    def read_frame() -> float:
        started = time.perf_counter()
        for step, layer, _ in entries:  # one frame's reads, in the loop's order
            bank.get(step, layer, torch.float32, torch.device("cpu"), GUIDANCE_HALVES)
        return time.perf_counter() - started

    frame_s = read_frame()  # right after the fill: a disk bank's pages are still being written back
    held_after_frame = bank.resident_bytes
    writeback_s = None
    if bank.on_disk:
        started = time.perf_counter()
        os.fsync(bank._disk.file.file.fileno())
        writeback_s = time.perf_counter() - started
    # written back: the page cache as later frames find it; the faster of two frames (a shared CPU's load
    # comes and goes between them)
    settled_s = min(read_frame(), read_frame())
    _give_back_free_memory()
    after_frame = _status_kib("VmRSS") * 1024 - baseline
    peak = _status_kib("VmHWM") * 1024 - baseline

    reads = hashlib.sha256()  # the first gated step's reads, bit for bit: compared across modes
    first = entries[0][0]
    for step, layer, _ in entries:
        if step == first:
            tokens = bank.get(step, layer, torch.float32, torch.device("cpu"), GUIDANCE_HALVES)
            reads.update(tokens.numpy().tobytes())

    cold_s = None
    if bank.on_disk:  # drop the file's pages from the page cache: the next reads hit the disk
        os.posix_fadvise(bank._disk.file.file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        cold_s = read_frame()
    return {
        "mode": mode,
        "steps_filled": steps,
        "entries": len(bank),
        "bank_bytes": bank.nbytes,
        "on_disk": bank.on_disk,
        "rss_after_fill_bytes": after_fill,
        "rss_after_frame_bytes": after_frame,
        "peak_rss_bytes": peak,
        "peak_rss_fill_bytes": peak_fill,
        "counted_resident_bytes_after_frame": held_after_frame,
        "fill_s": fill_s,
        "frame_read_s": frame_s,
        "frame_read_settled_s": settled_s,
        "frame_read_cold_s": cold_s,
        "writeback_s": writeback_s,
        "bank_digest": bank.digest,
        "reads_digest": reads.hexdigest(),
    }


def measure_in_subprocess(mode: str, steps: int) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--_measure", mode, "--_steps", str(steps)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"measuring the {mode} bank failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def sdxl_bank_bytes(dtype: str = "int8", compaction: BankCompaction | None = None) -> int:
    """Bytes of a whole 50-step SDXL 1024 px bank: one real `put` per layer, times the entries it stores."""
    compaction = compaction or BankCompaction()
    layers, gates = sdxl_decoder_csa_layers(HEIGHT), sdxl_gates()
    total = 0
    for step, name, shape in sdxl_entries(NUM_STEPS):
        if step != next(s for s, on in enumerate(gates[name]) if on):
            continue  # one entry per layer: every entry of a layer has the same size
        bank = IdentityBank("bytes", sdxl_settings(), dtype, compaction=compaction)
        bank.put(step, name, torch.zeros(shape))
        on_steps = [s for s, on in enumerate(gates[name]) if on]
        stored = len({s // compaction.share_steps for s in on_steps})  # groups with a gated step
        total += bank.nbytes * stored
    assert len(layers) == 36
    return total


def sdxl_fixed_level_bank_bytes() -> int:
    """Bytes of a whole 50-step SDXL 1024 px bank recorded at one fixed noise level (a picture character, or
    `bank_from="finished"` / `"sequential"` with a fractional `reference_noise`): one real bank filled through
    `put_shared` -- one entry per layer, which every gated step of that layer reads."""
    gates = sdxl_gates()
    bank = IdentityBank("fixed level", sdxl_settings(), "int8")
    for step, name, shape in sdxl_entries(NUM_STEPS):
        on_steps = [s for s, on in enumerate(gates[name]) if on]
        if step == on_steps[0]:
            bank.put_shared(name, torch.zeros(shape), on_steps)
    assert bank.stored_entries == len(sdxl_decoder_csa_layers(HEIGHT))
    return bank.nbytes


# --------------------------------------------------------------------------------------------
# 3-4. Tiny pipelines: identical output, character files, whole frames
# --------------------------------------------------------------------------------------------
CHARACTERS = {"Bob": "a man with red hair, black suit", "Ann": "a woman with a green hat"}
STORY = ["[Bob] at home", "[Bob] on a bus", "[Bob] at work", "[Ann] reads a book", "[Ann] in the rain",
         "[Ann] at the beach", "[Bob] and [Ann] dance", "[Bob] sleeps", "[Ann] runs"]  # fmt: skip
TINY_RUN = dict(id_length=3, num_inference_steps=10, height=64, width=64, output_type="np", progress=False)


def tiny_identity(quick: bool) -> dict[str, Any]:
    """Same frames from today's in-RAM bank and the default storage on disk; a character file regenerates."""
    import tempfile

    from storydiffusion.pipelines.characters import CharacterRecipe
    from storydiffusion.pipelines.story_pipeline import StoryPipeline
    from storydiffusion.pipelines.tiny_random import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    runs = {
        "memory": StoryPipeline(pipe, bank_storage="memory"),  # today's in-RAM bank
        "default_on_disk": StoryPipeline(pipe, bank_storage=BankStorage("auto", memory_limit=0)),
        "disk": StoryPipeline(pipe, bank_storage="disk"),
    }
    outs = {name: story(CHARACTERS, STORY, seed=1, **TINY_RUN) for name, story in runs.items()}
    base = outs["memory"]
    frames_equal = all(all(np.array_equal(a, b) for a, b in zip(base.images, out.images)) for out in outs.values())
    digests_equal = all(out.banks[n].digest == base.banks[n].digest for out in outs.values() for n in CHARACTERS)
    on_disk = all(out.banks["Bob"].on_disk for name, out in outs.items() if name != "memory")

    with tempfile.TemporaryDirectory() as folder:
        path = CharacterRecipe.from_bank(base.banks["Bob"]).save(Path(folder) / "Bob.character.json")
        file_bytes = path.stat().st_size
        again = CharacterRecipe.load(path).regenerate(runs["memory"])
    later = dict(TINY_RUN, id_length=1)
    frame = ["[Bob] on the moon"]
    original = runs["memory"](CHARACTERS, frame, seed=4, banks={"Bob": base.banks["Bob"]}, **later).images[0]
    regenerated = runs["memory"](CHARACTERS, frame, seed=4, banks={"Bob": again.bank}, **later).images[0]

    # whole frames reading each kind of bank (the same bank bytes), rounds interleaved
    with tempfile.TemporaryDirectory() as folder:
        saved = base.banks["Bob"].save(Path(folder) / "Bob.safetensors")
        banks = {mode: IdentityBank.load(saved, storage=mode) for mode in ("memory", "disk")}
        frames = ["[Bob] at the beach", "[Bob] in a car", "[Bob] reads", "[Bob] cooks"]
        seconds: dict[str, list[float]] = {mode: [] for mode in banks}
        for _ in range(2 if quick else 4):
            for mode, bank in banks.items():
                started = time.perf_counter()
                runs["memory"](CHARACTERS, frames, seed=9, banks={"Bob": bank}, **later)
                seconds[mode].append((time.perf_counter() - started) / len(frames))
        for bank in banks.values():
            bank.close()
    per_frame = {mode: float(np.median(values)) for mode, values in seconds.items()}
    return {
        "tiny_frames_equal": frames_equal,
        "tiny_bank_digests_equal": digests_equal,
        "tiny_default_went_to_disk": on_disk,
        "recipe_regenerates_exactly": bool(again.exact) and bool(np.array_equal(original, regenerated)),
        "saved_character_bytes_tiny": file_bytes,
        "tiny_bank_bytes": base.banks["Bob"].nbytes,
        "tiny_seconds_per_frame": per_frame,
        "tiny_seconds_per_frame_vs_in_ram": per_frame["disk"] / per_frame["memory"],
    }


SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (the entries that differ)
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip
SDXL_SCHEDULER = dict(  # its scheduler/scheduler_config.json
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    prediction_type="epsilon", sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True,
    steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
)  # fmt: skip


def probe_length(unet: Any, count: int = 64) -> int:
    """How many values `weights_probe` gives for `unet`: its selection, without reading any weight (meta)."""
    named = sorted(n.replace(".base_layer", "") for n, _ in unet.named_parameters() if "lora_" not in n)
    spread = set(named[:: max(1, len(named) // count)])
    attention = {n for n in named if n.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))}
    return len(spread | attention)


def sdxl_character_file_bytes() -> int:
    """The character file of one SDXL 1024 px character with the default settings."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    from storydiffusion.pipelines.characters import CharacterRecipe, ReferenceFrame, csa_config_to_json
    from storydiffusion.pipelines.story_pipeline import denoiser_fingerprint, public_config, weights_probe
    from storydiffusion.pipelines.tiny_random import tiny_sdxl_pipeline
    from storydiffusion.story.styles import apply_style

    tiny = tiny_sdxl_pipeline(seed=0).unet
    assert probe_length(tiny) == len(weights_probe(tiny)), "probe_length no longer follows weights_probe"
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)  # drops the keys Euler does not take
    generator = torch.Generator().manual_seed(SEED)
    settings = dataclasses.replace(
        sdxl_settings(),
        model="stabilityai/stable-diffusion-xl-base-1.0",
        denoiser_fingerprint=denoiser_fingerprint(unet),
        scheduler_config=public_config(scheduler.config),
        layers=tuple(sorted(sdxl_decoder_csa_layers(HEIGHT))),
        weights_probe=tuple(float(f"{v:.7g}") for v in torch.rand(probe_length(unet), generator=generator).tolist()),
    )
    prompts = ["at home, making coffee", "on a bus, looking out of the window", "at work, at his desk"]
    references = []
    for index, scene in enumerate(prompts):
        prompt, negative = apply_style("Comic book", f"a man with red hair, black suit, {scene}")
        references.append(ReferenceFrame(prompt, negative, SEED + index))
    recipe = CharacterRecipe(
        character="Bob",
        description="a man with red hair, black suit",
        references=tuple(references),
        sampler_seed=2**62 + 12345,
        num_inference_steps=NUM_STEPS,
        guidance_scale=5.0,
        height=HEIGHT,
        width=HEIGHT,
        csa=csa_config_to_json(CSAConfig()),
        bank_dtype="int8",
        settings=settings,
        compaction=dataclasses.asdict(BankCompaction()),
        bank_digest="0" * 64,
        software={"torch": torch.__version__, "diffusers": "0.0.0", "device": "cuda", "dtype": "float16"},
    )
    return len((json.dumps(recipe.to_dict(), indent=1, ensure_ascii=False) + "\n").encode())


# --------------------------------------------------------------------------------------------
# 5. Lossy options
# --------------------------------------------------------------------------------------------
def load_tiny_model() -> tuple[Any, str]:
    """The shipped tiny model (trained weights: real hidden states), or the random one if it is missing."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # the loading bars would bury the figures

    from storydiffusion.pipelines.tiny_random import tiny_sd_pipeline
    from storydiffusion.world.models import TINY, resolve_model, tiny_model_available

    if tiny_model_available():
        pipe, name = DiffusionPipeline.from_pretrained(resolve_model(TINY)), TINY
    else:
        pipe, name = tiny_sd_pipeline(seed=0), "tiny-random"
    pipe.set_progress_bar_config(disable=True)
    return pipe, name


def tiny_lossy(pipe: Any) -> dict[str, dict[str, float]]:
    """Per lossy option on the tiny model: bank bytes, teacher-forced CSA layer deviation, frame deviation."""
    from storydiffusion.pipelines.story_pipeline import StoryPipeline

    characters = {"Mia": "a girl"}
    references = ["[Mia], walking in the city", "[Mia], jumping in a forest"]
    frame = ["[Mia], waving in the snow"]
    run = dict(num_inference_steps=20, guidance_scale=4.0, height=64, width=64, output_type="np", progress=False)

    def bank_of(dtype: str, compaction: BankCompaction, subject_only: bool) -> IdentityBank:
        story = StoryPipeline(pipe, CSAConfig(subject_only=subject_only), dtype, bank_compaction=compaction)
        return story(characters, references, id_length=2, seed=3, **run).banks["Mia"]

    reader = StoryPipeline(pipe, CSAConfig())
    exact = bank_of("int8", BankCompaction(), False)
    # the exact bank's frame read, recording every CSA layer call's input (teacher forcing)
    modules = dict(pipe.unet.named_modules())
    calls: list[tuple[int, str, torch.Tensor]] = []

    def recorder(name: str):
        def hook(module, args, kwargs):
            csa = reader.csa
            if csa.mode == "read" and kwargs.get("encoder_hidden_states") is None and csa.wants_csa(name):
                hidden = args[0] if args else kwargs["hidden_states"]
                calls.append((csa.step, name, hidden.detach().clone()))

        return hook

    names = sorted({layer for _, layer in exact.keys()})
    handles = [modules[name].register_forward_pre_hook(recorder(name), with_kwargs=True) for name in names]
    try:
        exact_frame = reader(characters, frame, id_length=1, seed=8, banks={"Mia": exact}, **run).images[0]
    finally:
        for handle in handles:
            handle.remove()
    plain_frame = reader(characters, ["[NC] a girl, waving in the snow"], id_length=1, seed=8, **run).images[0]

    rows = {}
    for name, (dtype, compaction, subject_only) in LOSSY.items():
        lossy = bank_of(dtype, compaction, subject_only)
        changed = missing = 0.0
        with torch.no_grad():
            for step, layer, tokens in calls:
                attn = modules[layer]
                exact_tokens = exact.get(step, layer, tokens.dtype, tokens.device, 2)
                out_exact = consistent_attention(attn, tokens, None, exact_tokens)
                out_plain = consistent_attention(attn, tokens, None, exact_tokens[:, :0])
                lossy_tokens = lossy.get(step, layer, tokens.dtype, tokens.device, 2)
                out = out_plain if lossy_tokens is None else consistent_attention(attn, tokens, None, lossy_tokens)
                changed += float((out - out_exact).pow(2).sum())
                missing += float((out_exact - out_plain).pow(2).sum())
        image = reader(characters, frame, id_length=1, seed=8, banks={"Mia": lossy}, **run).images[0]
        rows[name] = {
            "tiny_bank_bytes": lossy.nbytes,
            "tiny_vs_exact_bytes": lossy.nbytes / exact.nbytes,
            "tiny_layer_deviation": (changed / missing) ** 0.5,
            "tiny_frame_mean_abs_diff": float(np.abs(image - exact_frame).mean()),
        }
    rows["no bank (reference)"] = {
        "tiny_layer_deviation": 1.0,
        "tiny_frame_mean_abs_diff": float(np.abs(plain_frame - exact_frame).mean()),
    }
    return rows


def sdxl_random_deviation(dtype: str, compaction: BankCompaction, queries: int = 256) -> float:
    """CSA layer output deviation at SDXL 1024 px shapes (random weights, LayerNorm'd random tokens), one
    layer per level: `queries` sampled queries against the frame's full keys plus the bank's."""
    generator = torch.Generator().manual_seed(SEED)
    changed = missing = 0.0
    for level, tokens, channels in sorted(set(sdxl_decoder_csa_layers(HEIGHT).values())):
        torch.manual_seed(SEED + level)
        attn = Attention(query_dim=channels, heads=channels // 64, dim_head=64).eval()
        frame = F.layer_norm(torch.randn(GUIDANCE_HALVES, tokens, channels, generator=generator), (channels,))
        sampled = REFERENCE_IMAGES * round(0.5 * tokens)
        bank = F.layer_norm(torch.randn(GUIDANCE_HALVES, sampled, channels, generator=generator), (channels,))
        exact = dequantize_int8(*quantize_int8(bank), torch.float32)
        kept = keep_evenly(bank, compaction.keep_tokens)
        lossy = dequantize_int4(*quantize_int4(kept), torch.float32) if dtype == "int4" else None
        lossy = dequantize_int8(*quantize_int8(kept), torch.float32) if lossy is None else lossy
        rows = torch.randperm(tokens, generator=generator)[:queries]
        with torch.no_grad():
            outs = [_attend(attn, frame, rows, extra) for extra in (exact, lossy, exact[:, :0])]
        changed += float((outs[1] - outs[0]).pow(2).sum())
        missing += float((outs[0] - outs[2]).pow(2).sum())
    return (changed / missing) ** 0.5


def _attend(attn: Attention, frame: torch.Tensor, rows: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Read-mode CSA for the query tokens `rows` of `frame` (halves, N, C): keys/values = frame + bank."""
    context = torch.cat([frame, bank], dim=1)  # (halves, N + M, C)
    query, key, value = attn.to_q(frame[:, rows]), attn.to_k(context), attn.to_v(context)
    split = [x.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for x in (query, key, value)]  # (halves, h, T, d)
    out = F.scaled_dot_product_attention(*split, scale=attn.scale).transpose(1, 2).flatten(2)
    return attn.to_out[0](out)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"fill {QUICK_STEPS} of the {NUM_STEPS} steps")
    parser.add_argument("--_measure", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--_steps", type=int, default=NUM_STEPS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._measure:
        print(json.dumps(measure_mode(args._measure, args._steps)))
        return
    began = time.perf_counter()
    load = os.getloadavg()[0]
    steps = QUICK_STEPS if args.quick else NUM_STEPS
    full_bytes = sdxl_bank_bytes()
    print(f"SDXL {HEIGHT} px bank, default settings: {full_bytes / 2**30:.2f} GiB per character (int8)", flush=True)
    fixed_bytes = sdxl_fixed_level_bank_bytes()
    print(
        f"  at one fixed noise level (pictures, finished references): {fixed_bytes / 2**20:.1f} MiB "
        f"(1/{full_bytes / fixed_bytes:.0f})",
        flush=True,
    )

    measured = {}
    for mode in MODES:  # one after the other: never two banks' RAM or I/O at once
        measured[mode] = figures = measure_in_subprocess(mode, steps)
        print(
            f"{mode:>6}: {figures['entries']} entries, {figures['bank_bytes'] / 2**20:.0f} MiB "
            f"({'disk' if figures['on_disk'] else 'RAM'}); RSS +{figures['rss_after_frame_bytes'] / 2**20:.0f} MiB, "
            f"peak +{figures['peak_rss_bytes'] / 2**20:.0f} MiB; fill {figures['fill_s']:.1f} s, "
            f"frame reads {figures['frame_read_s']:.2f} s, then {figures['frame_read_settled_s']:.2f} s"
            + (f" (cold {figures['frame_read_cold_s']:.2f} s)" if figures["frame_read_cold_s"] else "")
            + f" [{time.perf_counter() - began:.0f} s]",
            flush=True,
        )
    memory, default = measured["memory"], measured["auto"]
    cold = default["frame_read_cold_s"]  # None unless the default bank went to disk
    scale = full_bytes / memory["bank_bytes"]  # quick: the part filled stands for the whole bank
    sdxl_identical = (
        memory["bank_digest"] == default["bank_digest"] and memory["reads_digest"] == default["reads_digest"]
    )

    tiny = tiny_identity(args.quick)
    print(
        f"tiny: frames equal {tiny['tiny_frames_equal']}, recipe exact {tiny['recipe_regenerates_exactly']}, "
        f"character file {tiny['saved_character_bytes_tiny']} B [{time.perf_counter() - began:.0f} s]",
        flush=True,
    )
    character_bytes = sdxl_character_file_bytes()

    pipe, tiny_model = load_tiny_model()
    lossy = tiny_lossy(pipe)
    table = []
    for name, row in lossy.items():
        entry: dict[str, Any] = {"option": name, **row}
        if name in LOSSY:
            dtype, compaction, subject_only = LOSSY[name]
            if subject_only:  # needs real masks: the tiny model's measured ratio, applied to the SDXL bank
                entry["sdxl_bytes_per_character"] = round(full_bytes * row["tiny_vs_exact_bytes"])
                entry["sdxl_bytes_estimated"] = True
            else:
                entry["sdxl_bytes_per_character"] = sdxl_bank_bytes(dtype, compaction)
            entry["sdxl_vs_exact_bytes"] = entry["sdxl_bytes_per_character"] / full_bytes
            random_ok = compaction.share_steps == 1 and not subject_only
            entry["sdxl_random_layer_deviation"] = sdxl_random_deviation(dtype, compaction) if random_ok else None
        table.append(entry)
        print(
            f"  {name:>22}: tiny layer deviation {row['tiny_layer_deviation']:.4f}, frame |diff| "
            f"{row['tiny_frame_mean_abs_diff']:.4f}"
            + (
                f", SDXL {entry['sdxl_bytes_per_character'] / 2**30:.2f} GiB"
                if "sdxl_bytes_per_character" in entry
                else ""
            ),
            flush=True,
        )

    result: dict[str, Any] = {
        "quick": args.quick,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_at_start": round(load, 2),
        "height": HEIGHT,
        "steps": NUM_STEPS,
        "steps_filled": steps,
        "reference_images": REFERENCE_IMAGES,
        "bank_bytes_per_character": full_bytes,
        # a picture's or finished references' bank (`reference_noise` a fraction): one entry per layer
        "fixed_level_bank_bytes_per_character": fixed_bytes,
        "fixed_level_vs_step_bank": fixed_bytes / full_bytes,
        "ram_bytes_per_character": default["rss_after_frame_bytes"],
        "peak_ram_bytes_per_character": default["peak_rss_bytes"],
        "counted_resident_bytes_per_character": default["counted_resident_bytes_after_frame"],
        "in_ram_ram_bytes_per_character": round(memory["rss_after_frame_bytes"] * scale),
        "in_ram_peak_ram_bytes_per_character": round(memory["peak_rss_bytes"] * scale),
        "default_storage": "auto (RAM up to 256 MiB, then disk)",
        "default_on_disk": default["on_disk"],
        "identical_output": tiny["tiny_frames_equal"] and tiny["tiny_bank_digests_equal"] and sdxl_identical,
        "identical_output_detail": {
            "tiny_frames_equal": tiny["tiny_frames_equal"],
            "tiny_bank_digests_equal": tiny["tiny_bank_digests_equal"],
            "tiny_default_went_to_disk": tiny["tiny_default_went_to_disk"],
            "sdxl_bank_digests_equal": memory["bank_digest"] == default["bank_digest"],
            "sdxl_first_step_reads_equal": memory["reads_digest"] == default["reads_digest"],
        },
        "saved_character_bytes": character_bytes,
        "saved_character_bytes_tiny": tiny["saved_character_bytes_tiny"],
        "recipe_regenerates_exactly": tiny["recipe_regenerates_exactly"],
        # the bank's share of a frame (its reads, dequantised): the page cache warm, as frames after the first find it
        "seconds_per_frame_vs_in_ram": default["frame_read_settled_s"] / memory["frame_read_settled_s"],
        "seconds_per_frame_vs_in_ram_first": default["frame_read_s"] / memory["frame_read_s"],
        "seconds_per_frame_vs_in_ram_cold": cold and cold / memory["frame_read_settled_s"],
        "bank_seconds_per_frame": {
            "in_ram": memory["frame_read_settled_s"] * scale,
            "disk": default["frame_read_settled_s"] * scale,
            "in_ram_first": memory["frame_read_s"] * scale,
            "disk_first": default["frame_read_s"] * scale,  # while the fill's pages are still being written back
            "disk_cold": cold and cold * scale,  # nothing in the page cache: read from the disk itself
        },
        "bank_writeback_seconds": default["writeback_s"] and default["writeback_s"] * scale,
        "bank_fill_seconds": {"in_ram": memory["fill_s"] * scale, "default": default["fill_s"] * scale},
        "tiny_seconds_per_frame": tiny["tiny_seconds_per_frame"],
        "tiny_seconds_per_frame_vs_in_ram": tiny["tiny_seconds_per_frame_vs_in_ram"],
        "lossy_model": tiny_model,
        "lossy": table,
    }
    result["targets"] = {
        "ram_per_character_le_1GiB": result["ram_bytes_per_character"] <= 2**30
        and result["peak_ram_bytes_per_character"] <= 2**30,
        "identical_output": result["identical_output"],
        "recipe_regenerates_exactly": result["recipe_regenerates_exactly"],
        "fixed_level_bank_le_1_30th": result["fixed_level_vs_step_bank"] <= 1 / 30,
    }
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
