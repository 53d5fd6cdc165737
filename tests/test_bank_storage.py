"""Banks at scale (#15): disk-backed banks read back bit for bit, character files regenerate banks exactly,
lossy compaction deviates by a bounded, measured amount, and a disk bank's RAM is counted, not timed."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention
from helpers import run_cli
from PIL import Image
from safetensors import safe_open

from storydiffusion import BankMismatchError, BankSettings, CSAConfig, CSASchedule, IdentityBank, StoryDiffusionError
from storydiffusion.csa.attention import consistent_attention
from storydiffusion.csa.bank import BankCompaction, BankStorage, dequantize_int4, quantize_int4
from storydiffusion.csa.bank_file import EntryFile
from storydiffusion.pipelines.characters import CharacterRecipe, cache_beside, saved_character_name
from storydiffusion.pipelines.story_pipeline import StoryPipeline
from storydiffusion.pipelines.tiny_random import tiny_sd_pipeline

SETTINGS = BankSettings(
    model="tiny", denoiser_fingerprint="abc", scheduler="EulerDiscreteScheduler", num_steps=6,
    height=64, width=64, guidance_halves=2, id_length=2,
)  # fmt: skip
# two layer names whose numbers sort differently as text and as numbers (10 > 0)
LAYERS = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
    "up_blocks.1.attentions.10.transformer_blocks.0.attn1",
)
CHARACTERS = {"Bob": "a man with red hair, black suit", "Ann": "a woman with a green hat"}
STORY = ["[Bob] at home", "[Bob] on a bus", "[Ann] reads a book", "[Ann] in the rain", "[Bob] and [Ann] dance",
         "[Bob] sleeps"]  # fmt: skip
RUN = dict(id_length=2, num_inference_steps=3, height=64, width=64, output_type="np", progress=False)
ALWAYS = CSAConfig(schedule=CSASchedule.always())  # every step and layer: the strongest effect for tests
CPU = torch.device("cpu")


def fill(bank, steps=6, tokens=10, channels=16, seed=0):
    """Distinct random entries at every (step, layer), the way a reference phase writes them (LayerNorm'd)."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for layer in LAYERS:
            hidden = torch.randn(2, tokens, channels, generator=generator)
            bank.put(step, layer, torch.nn.functional.layer_norm(hidden, (channels,)))
    return bank


def same_reads(a, b, dtype=torch.float32):
    assert sorted(a.keys()) == sorted(b.keys()) and len(a) == len(b)
    for step, layer in a.keys():
        assert a.entry_tokens(step, layer) == b.entry_tokens(step, layer)
        for halves in (2, 1):
            x, y = a.get(step, layer, dtype, CPU, halves), b.get(step, layer, dtype, CPU, halves)
            assert x.dtype == y.dtype == dtype and torch.equal(x, y), (step, layer, halves)


# -- 1. disk banks read back the in-RAM bank's bytes --------------------------------------------------
@pytest.mark.parametrize("dtype", ["int8", "float16", "bfloat16", "float32", "int4"])
def test_disk_bank_reads_back_the_in_ram_bank_bitwise(dtype, tmp_path):
    memory = fill(IdentityBank("Bob", SETTINGS, dtype, storage="memory"))
    disk = fill(IdentityBank("Bob", SETTINGS, dtype, storage=BankStorage("disk", directory=str(tmp_path))))
    assert disk.on_disk and not memory.on_disk
    assert disk.nbytes_by_device() == {} and disk.nbytes_on_disk == memory.nbytes == disk.nbytes
    same_reads(memory, disk)
    same_reads(memory, disk, torch.float16)
    assert memory.digest == disk.digest
    assert list(tmp_path.iterdir()) == []  # the disk bank's file is unlinked from the start: nothing to clean up


def test_auto_storage_moves_to_disk_past_its_memory_limit():
    small = fill(IdentityBank("Bob", SETTINGS, storage="auto"))  # a few KiB: stays in RAM
    assert not small.on_disk
    auto = fill(IdentityBank("Bob", SETTINGS, storage=BankStorage("auto", memory_limit=4096)))
    assert auto.on_disk and auto.nbytes_by_device() == {}
    same_reads(small, auto)


def test_a_disk_bank_holds_a_few_entries_in_ram_not_the_bank():
    """The RAM bound, by counting the tensor bytes held (not by timing): in-RAM holds all; disk nothing but
    the entry a read returns, and for GPU-bound reads `prefetch` entries read ahead."""
    memory = fill(IdentityBank("Bob", SETTINGS, storage="memory"), steps=20, tokens=64, channels=64)
    disk = fill(IdentityBank("Bob", SETTINGS, storage="disk"), steps=20, tokens=64, channels=64)
    entry = memory.nbytes // memory.stored_entries
    assert memory.resident_bytes == memory.nbytes == disk.nbytes == 40 * entry
    assert disk.resident_bytes == 0  # written straight to the file during the "reference phase"
    held = []
    for step in range(20):  # one frame's reads, in the loop's order (CPU compute: read in line)
        for layer in LAYERS:
            disk.get(step, layer, torch.float32, CPU, 2)
            held.append(disk.resident_bytes)
    assert max(held) == 0
    # the read-ahead GPU-bound reads use, driven on the CPU: the next `prefetch` entries, wrapping round
    state, (order, position) = disk._disk, disk._read_order()
    for stored in order:
        parts = state.read(stored, 0, False, order, position, ahead=True)
        assert torch.equal(parts[0], memory._values[stored])
        held.append(disk.resident_bytes)
        assert set(state.ahead) == {(order[(position[stored] + j) % len(order)], 0, False) for j in (1, 2)}
    assert max(held) <= disk.storage.prefetch * entry <= memory.nbytes / 10
    disk.close()
    with pytest.raises(StoryDiffusionError, match="closed"):  # and its file is gone
        disk.get(0, LAYERS[0], torch.float32, CPU, 2)


def test_disk_bank_saves_a_standard_safetensors_file_and_reloads_either_way(tmp_path):
    memory = fill(IdentityBank("Bob", SETTINGS, storage="memory"))
    disk = fill(IdentityBank("Bob", SETTINGS, storage="disk"))
    saved = disk.save(tmp_path / "bob.safetensors")
    assert disk.on_disk and disk._disk.file.path == saved  # the temporary file went: reads come from the saved one
    same_reads(memory, disk)
    with safe_open(str(saved), framework="pt") as handle:  # any safetensors reader opens it
        names = set(handle.keys())
        assert names == {f"{kind}/{step}/{layer}" for kind in ("values", "scales") for step, layer in memory.keys()}
        assert torch.equal(handle.get_tensor(f"values/3/{LAYERS[1]}"), memory._values[f"3/{LAYERS[1]}"])
    for storage in ("memory", "disk", BankStorage("auto", memory_limit=1)):
        loaded = IdentityBank.load(saved, expected=SETTINGS, storage=storage)
        assert loaded.on_disk == (storage != "memory") and loaded.digest == memory.digest
        same_reads(memory, loaded)
    memory_saved = IdentityBank.load(memory.save(tmp_path / "m.safetensors"), storage="disk")  # save_file's layout
    same_reads(memory, memory_saved)
    assert not list(tmp_path.glob("*.partial"))


def test_a_full_disk_is_an_error_naming_the_folder_and_the_fix(tmp_path, monkeypatch):
    def full(self, offset, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(EntryFile, "_write_at", full)
    bank = IdentityBank("Bob", SETTINGS, storage=BankStorage("disk", directory=str(tmp_path)))
    with pytest.raises(StoryDiffusionError, match="temporary file in .*No space left on device.*BankStorage"):
        fill(bank)


def test_compaction_and_int4_survive_files(tmp_path):
    compact = BankCompaction(keep_tokens=0.5, share_steps=2)
    bank = fill(IdentityBank("Bob", SETTINGS, "int4", storage="disk", compaction=compact))
    assert len(bank) == 12 and bank.stored_entries == 6  # steps 1, 3, 5 read steps 0, 2, 4
    assert bank.entry_tokens(1, LAYERS[0]) == 5
    assert torch.equal(bank.get(1, LAYERS[0], torch.float32, CPU, 2), bank.get(0, LAYERS[0], torch.float32, CPU, 2))
    loaded = IdentityBank.load(bank.save(tmp_path / "bob.safetensors"))
    assert loaded.compaction == compact and loaded.storage_dtype == "int4"
    same_reads(bank, loaded)


def test_int4_quantisation_is_bounded_per_group():
    tokens = torch.nn.functional.layer_norm(torch.randn(2, 30, 128), (128,))
    packed, scale = quantize_int4(tokens)
    assert packed.shape == (2, 30, 64) and packed.dtype == torch.uint8 and scale.shape == (2, 30, 2)
    error = (dequantize_int4(packed, scale, torch.float32) - tokens).abs().unflatten(-1, (2, 64))
    group_max = tokens.abs().unflatten(-1, (2, 64)).amax(-1, keepdim=True)
    assert (error <= group_max / 14 * 1.01 + 1e-3).all()  # half a step of 7 levels, fp16 scale rounding aside


# -- 2. the tiny pipeline: same frames from a disk bank as from today's in-RAM bank -------------------
def test_disk_bank_story_frames_equal_in_ram_frames(sd_pipe, one_torch_thread):
    memory = StoryPipeline(sd_pipe, ALWAYS, bank_storage="memory")(CHARACTERS, STORY, seed=3, **RUN)
    disk = StoryPipeline(sd_pipe, ALWAYS, bank_storage="disk")(CHARACTERS, STORY, seed=3, **RUN)
    assert disk.banks["Bob"].on_disk and not memory.banks["Bob"].on_disk
    for name in CHARACTERS:
        assert disk.banks[name].digest == memory.banks[name].digest
    for a, b in zip(memory.images, disk.images):
        assert a.dtype == np.float32 and np.array_equal(a, b)  # float pixels, bit for bit
    # and different when the bank is different: the comparison can fail
    other = StoryPipeline(sd_pipe, ALWAYS, bank_dtype="float16", bank_storage="disk")(CHARACTERS, STORY, seed=3, **RUN)
    assert not np.array_equal(other.images[5], memory.images[5])


# -- 3. character files -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def original():
    """A run whose Bob is saved as a character file, and a later frame drawn from his bank."""
    pipe = tiny_sd_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    story = StoryPipeline(pipe, ALWAYS)
    out = story(CHARACTERS, STORY, seed=5, **RUN)
    bob = {"Bob": out.banks["Bob"]}
    later = story(CHARACTERS, ["[Bob] at the beach"], seed=11, banks=bob, **(RUN | {"id_length": 1}))
    return pipe, out, later.images[0]


def test_character_file_regenerates_the_bank_and_the_frames_exactly(original, tmp_path, one_torch_thread):
    pipe, out, later = original
    bob = out.banks["Bob"]
    path = CharacterRecipe.from_bank(bob).save(tmp_path / "Bob.character.json")
    assert path.stat().st_size < 20_000 and saved_character_name(path) == "Bob"

    story = StoryPipeline(pipe)  # default settings: the recipe's CSA settings are used for the regeneration
    again = CharacterRecipe.load(path).regenerate(story, output_type="np")
    assert again.exact is True and again.bank.digest == bob.digest
    same_reads(bob, again.bank)
    for image, index in zip(again.images, (0, 1)):  # the reference frames again, bit for bit
        assert np.array_equal(image, out.images[index])
    frame = story(CHARACTERS, ["[Bob] at the beach"], seed=11, banks={"Bob": again.bank}, **(RUN | {"id_length": 1}))
    assert np.array_equal(frame.images[0], later)


def test_character_file_refuses_another_model_naming_the_field(original, tmp_path):
    pipe, out, _ = original
    recipe = CharacterRecipe.from_bank(out.banks["Bob"])
    other_weights = tiny_sd_pipeline(seed=1)
    with pytest.raises(BankMismatchError, match="weights_probe"):
        recipe.regenerate(StoryPipeline(other_weights))
    ddim = tiny_sd_pipeline(seed=0)
    ddim.scheduler = DDIMScheduler.from_config(ddim.scheduler.config)
    with pytest.raises(BankMismatchError, match="scheduler: recipe='EulerDiscreteScheduler' run='DDIMScheduler'"):
        recipe.regenerate(StoryPipeline(ddim))
    changed = dataclasses.replace(recipe, settings=dataclasses.replace(recipe.settings, denoiser_fingerprint="0" * 16))
    with pytest.raises(BankMismatchError, match="denoiser_fingerprint"):
        changed.regenerate(StoryPipeline(pipe))
    path = recipe.save(tmp_path / "Bob.character.json")
    data = json.loads(path.read_text())
    del data["sampler_seed"]
    path.write_text(json.dumps(data))
    with pytest.raises(StoryDiffusionError, match="Bob.character.json: missing field 'sampler_seed'"):
        CharacterRecipe.load(path)
    unrecorded = dataclasses.replace(recipe, unrecorded=("image",))
    with pytest.raises(StoryDiffusionError, match="cannot hold \\(image\\)"):
        unrecorded.regenerate(StoryPipeline(pipe))


def test_cli_reuses_a_character_file_with_or_without_its_cache(monkeypatch, capsys, tmp_path):
    model = tmp_path / "tiny-sd"
    tiny_sd_pipeline(seed=0).save_pretrained(model)
    (tmp_path / "chars.txt").write_text("[Bob] a man with red hair\n")
    (tmp_path / "first.txt").write_text("[Bob] at home\n[Bob] on a bus\n")
    (tmp_path / "later.txt").write_text("[Bob] at the beach\n[NC] a street\n")
    common = ["--characters", tmp_path / "chars.txt", "--model", model, "--steps", "2", "--width", "64",
              "--height", "64", "--id-length", "2", "--device", "cpu"]  # fmt: skip
    first = tmp_path / "first"
    assert run_cli(monkeypatch, capsys, "story", "--frames", tmp_path / "first.txt", "--out", first, *common)[0] == 0
    character = first / "banks" / "Bob.character.json"
    assert character.is_file() and cache_beside(character).is_file()  # a tiny bank: the cache is written too

    def later(out, *extra):
        code, _, stderr = run_cli(monkeypatch, capsys, "story", "--frames", tmp_path / "later.txt", "--out", out,
                                  *extra, *common)  # fmt: skip
        assert code == 0, stderr
        return [np.asarray(Image.open(p)) for p in sorted(out.glob("panel_*.png"))]

    from_bank = later(tmp_path / "a", "--bank", first / "banks" / "Bob.safetensors")
    from_cache = later(tmp_path / "b", "--bank", character)
    cache_beside(character).unlink()
    regenerated = later(tmp_path / "c", "--bank", character, "--bank-storage", "disk")
    for a, b, c in zip(from_bank, from_cache, regenerated):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["panels"]["0"]["role"] == "frame"  # Bob came from the character file, no new references

    never = tmp_path / "never"
    args = ["story", "--frames", tmp_path / "first.txt", "--out", never, "--bank-cache", "never", *common]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    assert (never / "banks" / "Bob.character.json").is_file() and not (never / "banks" / "Bob.safetensors").exists()


# -- 4. lossy compaction: a bounded, nonzero deviation; the exact default none ------------------------
def layer_deviation(attn, tokens, exact, lossy, halves=2):
    """A CSA layer's output with the lossy bank's tokens against the exact bank's, relative to what the exact
    bank changes in the output (1 = as far off as reading no bank at all)."""
    with torch.no_grad():
        plain = consistent_attention(attn, tokens, None, exact[:, :0])
        reference = consistent_attention(attn, tokens, None, exact)
        out = consistent_attention(attn, tokens, None, lossy)
    return float((out - reference).norm() / (reference - plain).norm())


def test_lossy_options_deviate_boundedly_and_the_exact_default_not_at_all(sd_pipe, one_torch_thread):
    def bank(config=ALWAYS, **options):
        story = StoryPipeline(sd_pipe, config, **options)
        return story({"Bob": CHARACTERS["Bob"]}, STORY[:2], seed=7, **RUN).banks["Bob"]

    exact = bank(bank_storage="memory")
    variants = {
        "default_disk": bank(bank_storage="disk"),
        "keep_tokens_0.5": bank(bank_compaction=BankCompaction(keep_tokens=0.5)),
        "share_steps_2": bank(bank_compaction=BankCompaction(share_steps=2)),
        "int4": bank(bank_dtype="int4"),
        "subject_only": bank(CSAConfig(schedule=CSASchedule.always(), subject_only=True)),
    }
    attention = dict(sd_pipe.unet.named_modules())
    generator = torch.Generator().manual_seed(0)
    deviations = {}
    for name, lossy in variants.items():
        squares = []
        for step, layer in exact.keys():
            attn: Attention = attention[layer]
            channels = attn.to_q.in_features
            tokens = torch.nn.functional.layer_norm(torch.randn(2, 16, channels, generator=generator), (channels,))
            reference = exact.get(step, layer, torch.float32, CPU, 2)
            other = lossy.get(step, layer, torch.float32, CPU, 2)
            squares.append(layer_deviation(attn, tokens, reference, other) ** 2 if other is not None else 1.0)
        deviations[name] = float(np.sqrt(np.mean(squares)))
    assert deviations["default_disk"] == 0.0
    for name in ("keep_tokens_0.5", "share_steps_2", "int4", "subject_only"):
        assert 0.0 < deviations[name] < 1.0, deviations  # closer to the exact bank than reading none
    assert deviations["int4"] < deviations["keep_tokens_0.5"], deviations
    assert variants["int4"].nbytes < 0.6 * exact.nbytes and variants["keep_tokens_0.5"].nbytes < 0.55 * exact.nbytes
    assert variants["share_steps_2"].stored_entries < exact.stored_entries
