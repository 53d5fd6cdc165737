"""StoryPipeline end to end on tiny SD1.5- and SDXL-layout pipelines (random weights, 3 steps)."""

import threading

import numpy as np
import pytest
import torch

from storydiffusion import CSAConfig, CSASchedule, IdentityBank, StoryDiffusionError
from storydiffusion.csa.bank import BankMismatchError
from storydiffusion.pipelines import story_pipeline
from storydiffusion.pipelines.story_pipeline import Frame, StoryPipeline, parse_frame

CHARACTERS = {"Bob": "a man with red hair, black suit", "Ann": "a woman with a green hat"}
STORY = ["[Bob] at home", "[Bob] on a bus", "[Ann] reads a book", "[Ann] in the rain", "[Bob] and [Ann] dance",
         "[NC] an empty street", "[Bob] sleeps"]  # fmt: skip
RUN = dict(id_length=2, num_inference_steps=3, height=64, width=64, output_type="np", progress=False)
ALWAYS = CSAConfig(schedule=CSASchedule.always())  # every step and layer: the strongest effect for tests


def vanilla(pipe, prompts, seeds):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        prompts, num_inference_steps=3, guidance_scale=5.0, height=64, width=64, generator=generators, output_type="np"
    ).images


def run(pipe, config=ALWAYS, **overrides):
    return StoryPipeline(pipe, config)(CHARACTERS, STORY, **(RUN | overrides))


@pytest.mark.parametrize(
    "config", [CSAConfig(rate=0.0), CSAConfig(schedule=CSASchedule(plain_fraction=1.0))], ids=["rate0", "never"]
)
def test_csa_off_gives_exactly_the_vanilla_images(any_pipe, config):
    out = run(any_pipe, config, seed=7)
    references = [f for f in out.frames if f.role == "reference"]
    bob_refs = [f for f in references if f.characters == ("Bob",)]
    expected = vanilla(any_pipe, [f.prompt for f in bob_refs], [f.seed for f in bob_refs])
    for frame, image in zip(bob_refs, expected):
        assert np.array_equal(out.images[frame.index], image)
    dance = out.frames[4]
    assert np.array_equal(out.images[4], vanilla(any_pipe, [dance.prompt], [dance.seed])[0])
    assert all(len(bank) == 0 for bank in out.banks.values())


def test_csa_changes_reference_and_bank_frames(any_pipe):
    out = run(any_pipe, seed=7)
    first = out.frames[0]
    assert not np.array_equal(out.images[0], vanilla(any_pipe, [first.prompt, out.frames[1].prompt], [7, 8])[0])
    assert not np.array_equal(out.images[6], vanilla(any_pipe, [out.frames[6].prompt], [13])[0])


def test_frame_metadata_and_roles(sd_pipe):
    out = run(sd_pipe, seed=3, negative_prompt="blurry")
    assert [f.role for f in out.frames] == ["reference"] * 4 + ["frame"] * 3
    assert out.frames[4].characters == ("Bob", "Ann") and out.frames[5].characters == ()
    assert out.frames[0].prompt == "a man with red hair, black suit at home"
    assert out.frames[5].prompt == "an empty street"
    assert [f.seed for f in out.frames] == list(range(3, 10))
    assert all(f.negative_prompt == "blurry" for f in out.frames)
    assert len(out.images) == 7 and out.images[0].shape == (64, 64, 3)
    pil = StoryPipeline(sd_pipe)(CHARACTERS, STORY[:2], id_length=2, num_inference_steps=2, height=64, width=64,
                                 progress=False)  # fmt: skip
    assert pil.images[0].size == (64, 64)


def test_same_seed_same_images_other_seed_other_images(sd_pipe):
    a, b, c = run(sd_pipe, seed=1), run(sd_pipe, seed=1), run(sd_pipe, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    assert not any(np.array_equal(x, y) for x, y in zip(a.images, c.images))


def test_token_sampling_follows_the_seed(sd_pipe, monkeypatch):
    # Every frame of every run starts from one initial noise whatever the seed (same_initial_noise alone
    # would still draw it from the seed), and ALWAYS runs CSA on every step and layer (no gate draws): the
    # seed's only effect left is which tokens CSA samples (rate 0.5).
    monkeypatch.setattr(story_pipeline, "frame_seed", lambda seed, index, same_initial_noise=False: 0)
    a, again, other = run(sd_pipe, seed=1), run(sd_pipe, seed=1), run(sd_pipe, seed=2)
    assert {f.seed for f in a.frames + other.frames} == {0}
    assert all(np.array_equal(x, y) for x, y in zip(a.images, again.images))  # same sampling seed: same images
    street = a.frames[5]
    assert street.characters == ()  # no CSA: the same noise gives the same panel under both seeds
    assert np.array_equal(a.images[5], other.images[5])
    changed = [i for i, f in enumerate(a.frames) if f.characters]  # references, and frames reading their banks
    assert not any(np.array_equal(a.images[i], other.images[i]) for i in changed)


def test_no_character_frames_read_no_bank(any_pipe):
    out = run(any_pipe, seed=5)
    street = out.frames[5]
    assert np.array_equal(out.images[5], vanilla(any_pipe, [street.prompt], [street.seed])[0])


def test_two_character_frames_read_both_banks(sd_pipe):
    story = StoryPipeline(sd_pipe, ALWAYS)
    out = story(CHARACTERS, STORY, seed=5, **RUN)
    other = story(CHARACTERS, STORY, seed=6, **RUN)  # banks from other reference frames
    dance_only = [STORY[4]]
    kwargs = RUN | {"id_length": 1}
    with_both = story(CHARACTERS, dance_only, seed=9, banks=out.banks, **kwargs).images[0]
    bob_swapped = story(CHARACTERS, dance_only, seed=9, banks={**out.banks, "Bob": other.banks["Bob"]}, **kwargs)
    ann_swapped = story(CHARACTERS, dance_only, seed=9, banks={**out.banks, "Ann": other.banks["Ann"]}, **kwargs)
    assert np.array_equal(with_both, out.images[4])  # frame 4 had seed 5 + 4 = 9
    assert not np.array_equal(with_both, bob_swapped.images[0])
    assert not np.array_equal(with_both, ann_swapped.images[0])
    assert not np.array_equal(bob_swapped.images[0], ann_swapped.images[0])


def test_bank_save_load_gives_the_same_frame(sd_pipe, tmp_path):
    story = StoryPipeline(sd_pipe, ALWAYS)
    out = story(CHARACTERS, STORY, seed=4, **RUN)
    bank_file = out.banks["Bob"].save(tmp_path / "bob.safetensors")
    settings = story.bank_settings(num_inference_steps=3, guidance_scale=5.0, height=64, width=64)
    loaded = IdentityBank.load(bank_file, expected=settings)
    again = story(
        {"Bob": CHARACTERS["Bob"]}, ["[Bob] sleeps"], seed=10, banks={"Bob": loaded}, **(RUN | {"id_length": 1})
    )
    assert np.array_equal(again.images[0], out.images[6])  # frame 6 had seed 4 + 6 = 10
    assert again.frames[0].role == "frame" and set(again.banks) == {"Bob"}


def test_bank_for_other_settings_is_refused(sd_pipe, tmp_path):
    story = StoryPipeline(sd_pipe, ALWAYS)
    out = story(CHARACTERS, STORY[:2], seed=4, **RUN)
    with pytest.raises(BankMismatchError, match="num_steps"):
        story(CHARACTERS, ["[Bob] sleeps"], banks=out.banks, **(RUN | {"id_length": 1, "num_inference_steps": 4}))
    with pytest.raises(BankMismatchError, match="height"):
        story(CHARACTERS, ["[Bob] sleeps"], banks=out.banks, **(RUN | {"id_length": 1, "height": 32}))


def test_bank_dtype_and_device_are_configurable(sd_pipe):
    int8 = StoryPipeline(sd_pipe, ALWAYS)(CHARACTERS, STORY[:2], seed=4, **RUN).banks["Bob"]
    fp16 = StoryPipeline(sd_pipe, ALWAYS, bank_dtype="float16")(CHARACTERS, STORY[:2], seed=4, **RUN).banks["Bob"]
    assert int8.storage_dtype == "int8" and fp16.storage_dtype == "float16"
    assert sorted(int8.keys()) == sorted(fp16.keys()) and len(int8) > 0
    assert int8.nbytes < 0.6 * fp16.nbytes and set(int8.nbytes_by_device()) == {"cpu"}


def test_two_story_pipelines_in_one_process_do_not_interfere(sd_pipe):
    from storydiffusion.pipelines.tiny_random import tiny_sd_pipeline

    other_pipe = tiny_sd_pipeline(seed=1)
    other_pipe.set_progress_bar_config(disable=True)
    first, second = StoryPipeline(sd_pipe, ALWAYS), StoryPipeline(other_pipe, CSAConfig(rate=0.25))
    alone = [first(CHARACTERS, STORY, seed=1, **RUN).images, second(CHARACTERS, STORY, seed=2, **RUN).images]
    together: list = [None, None]

    def work(slot, story, seed):
        together[slot] = story(CHARACTERS, STORY, seed=seed, **RUN).images

    threads = [threading.Thread(target=work, args=(0, first, 1)), threading.Thread(target=work, args=(1, second, 2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for solo, concurrent in zip(alone, together):
        assert all(np.array_equal(a, b) for a, b in zip(solo, concurrent))
    assert first.csa.mode == "off" and not first.csa.is_installed


def test_parse_frame_tags():
    frame = parse_frame("[Bob] meets [Ann] and [Bob] again", CHARACTERS)
    assert frame.characters == ("Bob", "Ann")
    assert frame.prompt.startswith("a man with red hair, black suit meets a woman with a green hat")
    assert parse_frame("[NC] a quiet lake", CHARACTERS) == Frame("a quiet lake", ())
    with pytest.raises(StoryDiffusionError, match=r"unknown character \[Eve\]"):
        parse_frame("[Eve] waves", CHARACTERS)
    with pytest.raises(StoryDiffusionError, match="no prompt text"):
        parse_frame("[NC]", CHARACTERS)


@pytest.mark.parametrize(
    ("frames", "overrides", "message"),
    [
        (STORY, {"id_length": 0}, "id_length=0"),
        (STORY[:2], {"id_length": 3}, "id_length=3"),
        (STORY, {"id_length": 3}, "needs id_length=3 reference frames"),
        ([Frame("someone", ("Eve",))], {"id_length": 1}, "unknown character 'Eve'"),
        ([], {}, "frames is empty"),
        (STORY, {"latents": None}, "set by StoryPipeline"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(sd_pipe, frames, overrides, message):
    with pytest.raises(StoryDiffusionError, match=message):
        StoryPipeline(sd_pipe)(CHARACTERS, frames, **(RUN | overrides))


def test_wrapping_something_else_is_refused(sd_pipe):
    with pytest.raises(StoryDiffusionError, match="StableDiffusionPipeline"):
        StoryPipeline(sd_pipe.unet)
    with pytest.raises(StoryDiffusionError, match="matches no attention layer"):
        StoryPipeline(sd_pipe, CSAConfig(layers=("nothing.*",)))


def test_from_pretrained_loads_a_saved_folder(sd_pipe, tmp_path):
    sd_pipe.save_pretrained(tmp_path / "tiny")
    story = StoryPipeline.from_pretrained(str(tmp_path / "tiny"), csa_config=ALWAYS)
    story.pipe.set_progress_bar_config(disable=True)
    reloaded = story(CHARACTERS, STORY, seed=1, **RUN)
    direct = run(sd_pipe, seed=1)
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(reloaded.images, direct.images))
    assert reloaded.banks["Bob"].settings.model == str(tmp_path / "tiny")


def test_skip_frames_and_callbacks_support_resuming(sd_pipe):
    story = StoryPipeline(sd_pipe, ALWAYS)
    full = story(CHARACTERS, STORY, seed=2, **RUN)
    seen_frames, seen_banks = [], []
    partial = story(
        CHARACTERS,
        STORY,
        seed=2,
        skip_frames={0, 1, 2, 3, 5},
        on_frame=lambda info, image: seen_frames.append(info.index),
        on_bank=lambda name, bank: seen_banks.append(name),
        **RUN,
    )
    # frames 4 (Bob and Ann) and 6 (Bob) need both banks: both reference phases rerun, identically
    assert sorted(seen_frames) == [0, 1, 2, 3, 4, 6] and seen_banks == ["Bob", "Ann"]
    assert partial.images[5] is None
    assert all(np.array_equal(partial.images[i], full.images[i]) for i in (0, 1, 2, 3, 4, 6))
    only_street = story(CHARACTERS, STORY, seed=2, skip_frames={0, 1, 2, 3, 4, 6}, **RUN)
    assert only_street.banks == {} and np.array_equal(only_street.images[5], full.images[5])


@pytest.mark.parametrize("bank_from", ["steps", "finished", "sequential"])
def test_a_characters_reference_frames_are_handed_on_after_its_bank(sd_pipe, bank_from):
    """A run killed between the two never leaves a reference panel on disk without its bank."""
    from storydiffusion import CSAConfig, StoryPipeline

    events = []
    config = CSAConfig(bank_from=bank_from, reference_noise=0.0 if bank_from != "steps" else "step")
    StoryPipeline(sd_pipe, config)(
        {"Bob": "a man", "Ann": "a woman"},
        ["[Bob] at home", "[Bob] on a bus", "[Ann] reads", "[Ann] runs", "[Bob] sleeps"],
        id_length=2, num_inference_steps=2, height=64, width=64, output_type="np", progress=False,
        on_bank=lambda name, bank: events.append(("bank", name)),
        on_frame=lambda info, image: events.append((info.role, info.index)),
    )  # fmt: skip
    assert events == [("bank", "Bob"), ("reference", 0), ("reference", 1), ("bank", "Ann"), ("reference", 2),
                      ("reference", 3), ("frame", 4)]  # fmt: skip
