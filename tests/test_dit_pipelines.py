"""StoryPipeline on DiT models (Flux.1, SD3): vanilla when off, banks that round-trip (in float32, bfloat16 and
float16), reads limited to each character's region, clear errors, the CLI."""

import json
import sys

import numpy as np
import pytest
import torch

from storydiffusion.app import cli
from storydiffusion.csa.attention import CSAConfig, CSASchedule
from storydiffusion.csa.bank import IdentityBank
from storydiffusion.csa.controller import select_layers
from storydiffusion.csa.masks import grid_masks
from storydiffusion.csa.subjects import SubjectMaps
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.pipelines.characters import CharacterRecipe
from storydiffusion.pipelines.frames import Frame
from storydiffusion.pipelines.inputs import t5_tokenizer
from storydiffusion.pipelines.story_pipeline import StoryPipeline
from storydiffusion.pipelines.tiny_random import tiny_flux_pipeline, tiny_sd3_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUILDERS = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}
CALL = dict(height=32, width=32, num_inference_steps=3, guidance_scale=3.5, output_type="np", progress=False)
CHARACTERS = {"Bob": "a man with red hair"}
FRAMES = ["[Bob] at home", "[Bob] on a bus", "[Bob] in a park"]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(params=sorted(BUILDERS), scope="module")
def dit_pipe(request):
    pipe = BUILDERS[request.param]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(params=[(kind, dtype) for kind in sorted(BUILDERS) for dtype in DTYPES], ids="-".join, scope="module")
def dit_pipe_in_dtype(request):
    """The tiny DiT pipelines in every dtype a real checkpoint runs in."""
    kind, dtype = request.param
    pipe = BUILDERS[kind]().to(DTYPES[dtype])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _vanilla(pipe, prompts, seeds):
    extra = {"negative_prompt": [""] * len(prompts)} if "StableDiffusion3" in type(pipe).__name__ else {}
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    settings = {k: v for k, v in CALL.items() if k != "progress"}
    return list(pipe(prompts, generator=generators, **extra, **settings).images)


def test_rate_zero_gives_exactly_the_vanilla_pipeline(dit_pipe):
    out = StoryPipeline(dit_pipe, CSAConfig(rate=0.0), bank_storage="memory")(CHARACTERS, FRAMES, id_length=2, **CALL)
    prompts = [f.replace("[Bob]", CHARACTERS["Bob"]) for f in FRAMES]
    expected = _vanilla(dit_pipe, prompts[:2], [0, 1]) + _vanilla(dit_pipe, prompts[2:], [2])  # same batches
    for ours, theirs in zip(out.images, expected):
        np.testing.assert_array_equal(ours, theirs)


def test_csa_changes_reference_and_bank_reading_frames(dit_pipe_in_dtype):
    pipe = dit_pipe_in_dtype
    plain = StoryPipeline(pipe, CSAConfig(rate=0.0), bank_storage="memory")(CHARACTERS, FRAMES, id_length=2, **CALL)
    story = StoryPipeline(pipe, CSAConfig(rate=0.5), bank_storage="memory")
    out = story(CHARACTERS, FRAMES, id_length=2, **CALL)
    for ours, theirs in zip(out.images, plain.images):
        assert np.abs(ours - theirs).max() > 1e-4
    bank = out.banks["Bob"]
    layers = {layer for _, layer in bank.keys()}
    assert layers == set(select_layers(story.denoiser, story.csa.config))
    assert bank.settings.guidance_halves == (2 if story.kind == "sd3" else 1)  # Flux is guidance-distilled


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_a_saved_bank_gives_the_same_frames(dit_pipe_in_dtype, storage, tmp_path):
    """The frame phase from a reloaded bank (Flux: with its tokens' rotary positions) equals the original run."""
    story = StoryPipeline(dit_pipe_in_dtype, CSAConfig(rate=0.5), bank_storage=storage)
    out = story(CHARACTERS, FRAMES, id_length=2, **CALL)
    path = out.banks["Bob"].save(tmp_path / "bob.safetensors")
    loaded = IdentityBank.load(path, storage=storage)
    if story.kind == "flux":
        step, layer = next(iter(loaded.keys()))
        assert torch.equal(loaded.get_positions(step, layer), out.banks["Bob"].get_positions(step, layer))
    again = story(CHARACTERS, FRAMES, id_length=2, banks={"Bob": loaded}, skip_frames=(0, 1), **CALL)
    np.testing.assert_array_equal(again.images[2], out.images[2])


def test_default_layers_are_every_other_later_block(dit_pipe):
    story = StoryPipeline(dit_pipe)
    chosen = sorted(select_layers(story.denoiser, story.csa.config))
    if story.kind == "flux":
        assert chosen == ["single_transformer_blocks.0.attn"]  # of single-stream blocks 0 and 1
    else:
        assert chosen == ["transformer_blocks.0.attn"]  # of joint blocks 0 and 1


TWO = {"Bob": "a man with red hair", "Ann": "a woman with a green hat"}
TOGETHER = ["[Bob] at home", "[Ann] at home", "[Bob] and [Ann] in a park"]


def _last_layer_only(pipe) -> CSAConfig:
    """CSA at the last joint attention only, every step: after it each image token's output goes through
    per-token layers alone, so a latent token changes only where that layer's attention output did."""
    last = "single_transformer_blocks.1.attn" if "Flux" in type(pipe).__name__ else "transformer_blocks.1.attn"
    return CSAConfig(rate=0.5, layers=(last,), schedule=CSASchedule.always())


def _latent_tokens(latent: torch.Tensor) -> torch.Tensor:
    """A frame's latent as (tokens of the 4x4 grid, values): Flux's is packed already, SD3's has 2x2 patches."""
    if latent.ndim == 2:
        return latent.float()
    channels, height, width = latent.shape
    patches = latent.float().reshape(channels, height // 2, 2, width // 2, 2)
    return patches.permute(1, 3, 0, 2, 4).flatten(0, 1).flatten(1)


def _with_another_ann(story, frames, **call) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame 2's latent tokens read with the story's own banks, and again with Ann's bank from other reference
    noise (Bob's bank and everything else as before)."""
    first = story(TWO, frames, id_length=1, **call)
    other_ann = story(TWO, frames, id_length=1, seed=5, skip_frames=(0, 2), **call).banks["Ann"]
    banks = {"Bob": first.banks["Bob"], "Ann": other_ann}
    again = story(TWO, frames, id_length=1, banks=banks, skip_frames=(0, 1), **call)
    return _latent_tokens(first.images[2]), _latent_tokens(again.images[2])


def test_regions_keep_two_characters_reading_their_own_banks(dit_pipe_in_dtype):
    """Bob boxed on the left, Ann on the top right, background at the bottom right: changing Ann's bank changes
    the frame's tokens in Ann's box only, and background tokens read no bank (as with CSA off). One denoising
    step, CSA at the last joint layer (`_last_layer_only`): nothing mixes tokens after the read."""
    pipe = dit_pipe_in_dtype
    regions = {"Bob": (0.0, 0.0, 0.5, 1.0), "Ann": (0.5, 0.0, 1.0, 0.5)}
    boxed = [
        *TOGETHER[:2],
        Frame("a man with red hair and a woman with a green hat in a park", ("Bob", "Ann"), None, regions),
    ]
    call = {**CALL, "num_inference_steps": 1, "output_type": "latent"}
    story = StoryPipeline(pipe, _last_layer_only(pipe), bank_storage="memory")
    first, again = _with_another_ann(story, boxed, **call)
    columns = torch.arange(16) % 4
    ann = (columns >= 2) & (torch.arange(16) < 8)  # the 4x4 token grid's top-right quarter
    background = (columns >= 2) & ~ann
    assert (first[ann] != again[ann]).any()  # Ann's box reads her bank
    torch.testing.assert_close(first[~ann], again[~ann], atol=0, rtol=0)
    plain = StoryPipeline(pipe, CSAConfig(rate=0.0), bank_storage="memory")(TWO, boxed, id_length=1, **call).images[2]
    tolerance = 1e-5 if pipe.transformer.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(first[background], _latent_tokens(plain)[background], atol=tolerance, rtol=tolerance)


def test_errors_name_the_dit_limits(dit_pipe):
    story = StoryPipeline(dit_pipe, bank_storage="memory")
    long_frame = "[Bob] " + "walks far " * 300
    with pytest.raises(StoryDiffusionError, match="T5 tokens"):
        story(CHARACTERS, [*FRAMES, long_frame], id_length=2, **CALL)
    if story.kind == "flux":
        with pytest.raises(StoryDiffusionError, match="true_cfg_scale"):
            story(CHARACTERS, FRAMES, id_length=2, true_cfg_scale=4.0, **CALL)


@pytest.mark.parametrize("model", ["tiny-random-flux", "tiny-random-sd3"])
def test_story_command_runs_a_dit_model(model, monkeypatch, capsys, tmp_path):
    (tmp_path / "chars.txt").write_text("[Bob] a man with red hair\n")
    (tmp_path / "frames.txt").write_text("[Bob] at home\n[Bob] on a bus\n[Bob] in a park #the end\n")
    out = tmp_path / "out"
    argv = ["storydiffusion", "story", "--model", model, "--characters", str(tmp_path / "chars.txt")]
    argv += ["--frames", str(tmp_path / "frames.txt"), "--steps", "2", "--width", "32", "--height", "32"]
    argv += ["--id-length", "2", "--device", "cpu", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        cli.main()
    except SystemExit as stop:
        assert not stop.code
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["panels"]) == 3 and (out / "comic.pdf").is_file()
    assert sorted(p.name for p in (out / "banks").iterdir() if p.suffix == ".safetensors")


def test_inferred_masks_from_the_joint_attention(dit_pipe_in_dtype, monkeypatch):
    """Without regions, each character's mask comes from its description tokens' share of the image-to-text
    attention: changing Ann's bank changes the frame's tokens inside Ann's inferred mask only.

    Two steps, CSA at the last joint layer (`_last_layer_only`): step 0 has no maps yet and reads no bank, so
    it and the masks inferred from it are the same whichever bank Ann has; step 1 reads inside those masks."""
    pipe = dit_pipe_in_dtype
    inferred = []  # the masks of each call of SubjectMaps.masks, per image
    infer = SubjectMaps.masks

    def recording(maps, *args):
        inferred.append(infer(maps, *args))
        return inferred[-1]

    monkeypatch.setattr(SubjectMaps, "masks", recording)
    call = {**CALL, "num_inference_steps": 2, "output_type": "latent"}
    story = StoryPipeline(pipe, _last_layer_only(pipe), bank_storage="memory")
    first, again = _with_another_ann(story, TOGETHER, **call)
    ann_mask = inferred[-1][0]["Ann"]  # the last frame's, at step 1 (step 0 has no maps yet)
    ann = grid_masks({"Ann": ann_mask}, 16)["Ann"]
    changed = (first - again).abs().amax(-1) > 0
    assert 0 < ann.sum() < len(ann)  # a mask that leaves some of the frame out
    assert changed.any() and not changed[~ann].any()  # Ann's bank is read inside her mask, and only there


def test_subject_only_sharing_keeps_a_smaller_bank(dit_pipe):
    """Subject-only sharing lends and stores only the tokens inside each reference's inferred subject mask."""
    larger = {**CALL, "height": 64, "width": 64}  # an 8x8 token grid: room for a mask smaller than the frame
    off = StoryPipeline(dit_pipe, CSAConfig(rate=0.5, subject_masks="off"), bank_storage="memory")
    whole = off(CHARACTERS, FRAMES, id_length=2, **larger).banks["Bob"]
    config = CSAConfig(rate=0.5, subject_only=True, mask_dilation=0)
    part = StoryPipeline(dit_pipe, config, bank_storage="memory")(CHARACTERS, FRAMES, id_length=2, **larger).banks[
        "Bob"
    ]
    assert 0 < part.nbytes < whole.nbytes


def test_phrase_positions_point_at_the_description_in_the_t5_sequence(dit_pipe):
    story = StoryPipeline(dit_pipe)
    prompt = "a man with red hair at home"
    positions = story.phrase_positions(prompt, "red hair")
    tokenizer = t5_tokenizer(story.pipe, story.kind)
    ids = tokenizer(prompt, add_special_tokens=True).input_ids
    offset = 0 if story.kind == "flux" else 77
    assert tokenizer.decode([ids[p - offset] for p in positions]).strip() == "red hair"


def test_a_character_file_regenerates_the_same_bank(dit_pipe_in_dtype, tmp_path):
    """The small character file (recipe) rebuilds the bank bit for bit on a DiT too (Flux: positions included)."""
    story = StoryPipeline(dit_pipe_in_dtype, CSAConfig(rate=0.5), bank_storage="memory")
    bank = story(CHARACTERS, FRAMES, id_length=2, **CALL).banks["Bob"]
    path = tmp_path / "Bob.character.json"
    CharacterRecipe.from_bank(bank).save(path)
    again = CharacterRecipe.load(path).regenerate(story).bank
    assert again.digest == bank.digest and len(again) == len(bank)


@pytest.mark.parametrize("written, read", [(48, 24), (24, 48)])
def test_a_character_made_at_one_text_length_reads_at_another(dit_pipe, written, read, tmp_path):
    """Bob's bank is made with the T5 prompts padded to `written` tokens (max_sequence_length) and read by a
    frame padded to `read`; the bank passes the settings check either way.

    What must that frame be? The padding changes the text tokens themselves (T5 attends over the pads), so the
    bank's tokens rightly depend on `written`: the frame is the one a fresh run gives whose reference phase ran
    at `written` and whose frame phase runs at `read`. What must not carry `written` over is where a bank key
    sits: Flux rotates keys by position, and a stored token keeps the place of the image token it came from,
    whatever text comes before the image in either call. So the reference frame reads, from memory, a bank of
    the tokens written at `written` with the positions a reference phase at `read` writes (it draws the same
    image tokens: the sampler sees image tokens only). The saved bank file and the character file (whose recipe
    regenerates the bank at `written`) must give that frame exactly. SD3 has no positions: there the reference
    is the written bank itself."""
    story = StoryPipeline(dit_pipe, CSAConfig(rate=0.5), bank_storage="memory", bank_dtype="float32")
    made = story(CHARACTERS, FRAMES, id_length=2, max_sequence_length=written, skip_frames=(2,), **CALL).banks["Bob"]
    at_read = story(CHARACTERS, FRAMES, id_length=2, max_sequence_length=read, skip_frames=(2,), **CALL).banks["Bob"]
    assert sorted(at_read.keys()) == sorted(made.keys())
    reference = IdentityBank("Bob", made.settings, "float32")
    for step, layer in made.keys():
        reference.put(step, layer, made.get(step, layer, torch.float32, "cpu", made.settings.guidance_halves))
        if story.kind == "flux":
            reference.put_positions(step, layer, at_read.get_positions(step, layer))

    def frame(bank: IdentityBank) -> np.ndarray:
        reading = dict(banks={"Bob": bank}, skip_frames=(0, 1), max_sequence_length=read)
        return story(CHARACTERS, FRAMES, id_length=2, **reading, **CALL).images[2]

    expected = frame(reference)
    np.testing.assert_array_equal(frame(IdentityBank.load(made.save(tmp_path / "Bob.safetensors"))), expected)
    CharacterRecipe.from_bank(made).save(tmp_path / "Bob.character.json")
    regenerated = CharacterRecipe.load(tmp_path / "Bob.character.json").regenerate(story)
    assert regenerated.exact
    np.testing.assert_array_equal(frame(regenerated.bank), expected)
