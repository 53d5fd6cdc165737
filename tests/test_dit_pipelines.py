"""StoryPipeline on DiT models (Flux.1, SD3): vanilla when off, banks that round-trip, clear errors, the CLI."""

import json
import sys

import numpy as np
import pytest
import torch

from storydiffusion.app import cli
from storydiffusion.csa.attention import CSAConfig
from storydiffusion.csa.bank import IdentityBank
from storydiffusion.csa.controller import select_layers
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.pipelines.frames import Frame
from storydiffusion.pipelines.story_pipeline import StoryPipeline
from storydiffusion.pipelines.tiny_random import tiny_flux_pipeline, tiny_sd3_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUILDERS = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}
CALL = dict(height=32, width=32, num_inference_steps=3, guidance_scale=3.5, output_type="np", progress=False)
CHARACTERS = {"Bob": "a man with red hair"}
FRAMES = ["[Bob] at home", "[Bob] on a bus", "[Bob] in a park"]


@pytest.fixture(params=sorted(BUILDERS), scope="module")
def dit_pipe(request):
    pipe = BUILDERS[request.param]()
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


def test_csa_changes_reference_and_bank_reading_frames(dit_pipe):
    plain = StoryPipeline(dit_pipe, CSAConfig(rate=0.0), bank_storage="memory")(CHARACTERS, FRAMES, id_length=2, **CALL)
    story = StoryPipeline(dit_pipe, CSAConfig(rate=0.5), bank_storage="memory")
    out = story(CHARACTERS, FRAMES, id_length=2, **CALL)
    for ours, theirs in zip(out.images, plain.images):
        assert np.abs(ours - theirs).max() > 1e-4
    bank = out.banks["Bob"]
    layers = {layer for _, layer in bank.keys()}
    assert layers == set(select_layers(story.denoiser, story.csa.config))
    assert bank.settings.guidance_halves == (2 if story.kind == "sd3" else 1)  # Flux is guidance-distilled


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_a_saved_bank_gives_the_same_frames(dit_pipe, storage, tmp_path):
    """The frame phase from a reloaded bank (Flux: with its tokens' rotary positions) equals the original run."""
    story = StoryPipeline(dit_pipe, CSAConfig(rate=0.5), bank_storage=storage)
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


def test_regions_keep_two_characters_reading_their_own_banks(dit_pipe):
    characters = {"Bob": "a man with red hair", "Ann": "a woman with a green hat"}
    frames = ["[Bob] at home", "[Ann] at home", "[Bob] and [Ann] in a park"]
    regions = {"Bob": (0.0, 0.0, 0.5, 1.0), "Ann": (0.5, 0.0, 1.0, 1.0)}
    story = StoryPipeline(dit_pipe, CSAConfig(rate=0.5), bank_storage="memory")
    boxed = [
        *frames[:2],
        Frame("a man with red hair and a woman with a green hat in a park", ("Bob", "Ann"), None, regions),
    ]
    masked = story(characters, boxed, id_length=1, **CALL).images[2]
    unmasked = story(characters, frames, id_length=1, **CALL).images[2]
    assert np.abs(masked - unmasked).max() > 1e-5  # the read mask changes what each region borrows


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


def test_inferred_masks_from_the_joint_attention(dit_pipe):
    """Without regions, each character's mask comes from its description tokens' share of the image-to-text
    attention: masked reads differ from unmasked ones, and subject-only sharing keeps a smaller bank."""
    characters = {"Bob": "a man with red hair", "Ann": "a woman with a green hat"}
    frames = ["[Bob] at home", "[Ann] at home", "[Bob] and [Ann] in a park"]
    inferred = StoryPipeline(dit_pipe, CSAConfig(rate=0.5), bank_storage="memory")
    off = StoryPipeline(dit_pipe, CSAConfig(rate=0.5, subject_masks="off"), bank_storage="memory")
    masked = inferred(characters, frames, id_length=1, **CALL).images[2]
    unmasked = off(characters, frames, id_length=1, **CALL).images[2]
    assert np.abs(masked - unmasked).max() > 1e-5
    larger = {**CALL, "height": 64, "width": 64}  # an 8x8 token grid: room for a mask smaller than the frame
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
    tokenizer = story._t5_tokenizer()
    ids = tokenizer(prompt, add_special_tokens=True).input_ids
    offset = 0 if story.kind == "flux" else 77
    assert tokenizer.decode([ids[p - offset] for p in positions]).strip() == "red hair"


def test_a_character_file_regenerates_the_same_bank(dit_pipe, tmp_path):
    """The small character file (recipe) rebuilds the bank bit for bit on a DiT too (Flux: positions included)."""
    from storydiffusion.pipelines.characters import CharacterRecipe

    story = StoryPipeline(dit_pipe, CSAConfig(rate=0.5), bank_storage="memory")
    bank = story(CHARACTERS, FRAMES, id_length=2, **CALL).banks["Bob"]
    path = tmp_path / "Bob.character.json"
    CharacterRecipe.from_bank(bank).save(path)
    again = CharacterRecipe.load(path).regenerate(story).bank
    assert again.digest == bank.digest and len(again) == len(bank)
