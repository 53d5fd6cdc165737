"""Characters given by pictures, and banks made from finished references (`CSAConfig.bank_from`,
`reference_noise`, `reference_strength`), on tiny random pipelines."""

import logging
from functools import partial

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from storydiffusion import CSAConfig, CSASchedule, StoryDiffusionError
from storydiffusion.csa.bank import BankMismatchError
from storydiffusion.csa.masks import grid_masks
from storydiffusion.pipelines.characters import CharacterRecipe, load_character
from storydiffusion.pipelines.pictures import MAX_PICTURES, images_as_pixels
from storydiffusion.pipelines.story_pipeline import StoryPipeline, derived_seed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHARACTERS = {"Mia": "a girl with a red scarf", "Tom": "a boy with a blue cap"}
STORY = ["[Mia] at home", "[Mia] on a bus", "[Tom] in the park", "[Tom] reads", "[Mia] sleeps"]
RUN = dict(id_length=2, num_inference_steps=3, height=64, width=64, output_type="np", progress=False, seed=5)
ALWAYS = CSASchedule.always()


def picture(seed: int = 0, size: int = 64, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return image.convert(mode)


def story(pipe, **config) -> StoryPipeline:
    return StoryPipeline(pipe, CSAConfig(**{"schedule": ALWAYS, **config}), bank_dtype="float32")


def test_picture_bank_holds_the_tokens_a_reference_with_that_latent_would_leave(sd_pipe):
    """At a fixed level the bank holds, for every CSA layer, the self-attention input of the picture's latent
    noised to that level (the scheduler's own add_noise), denoised once with the description -- both guidance
    halves -- and that one entry serves every step."""
    level = 0.3
    pipe = story(sd_pipe, rate=1.0, reference_noise=level)
    out = pipe(CHARACTERS, STORY, character_images={"Mia": [picture()]}, **RUN)
    bank = out.banks["Mia"]
    layers = {layer for _, layer in bank.keys()}
    assert bank.stored_entries == len(layers) and len(bank) == 3 * len(layers)  # one entry per layer, all steps

    seen = _picture_layer_inputs(sd_pipe, layers, level, derived_seed(5, 2, 0))
    for layer in layers:
        stored = bank.get(1, layer, torch.float32, torch.device("cpu"), 2)  # (halves, N, C)
        torch.testing.assert_close(stored, seen[layer], atol=1e-4, rtol=1e-4)


def test_frames_read_the_pictures_and_the_character_has_no_reference_frames(sd_pipe):
    pipe = story(sd_pipe, reference_noise=0.0)
    given = pipe(CHARACTERS, STORY, character_images={"Mia": [picture(1)]}, **RUN)
    other = pipe(CHARACTERS, STORY, character_images={"Mia": [picture(2)]}, **RUN)
    assert [f.role for f in given.frames if "Mia" in f.characters] == ["frame"] * 3
    assert [f.role for f in given.frames if "Tom" in f.characters] == ["reference"] * 2
    for index in (0, 1, 4):  # every Mia frame reads her pictures: other pictures, other frames
        assert not np.allclose(given.images[index], other.images[index], atol=1e-3)
    for index in (2, 3):  # Tom's frames do not
        np.testing.assert_array_equal(given.images[index], other.images[index])


def test_step_level_pictures_make_a_step_bank(sd_pipe):
    out = story(sd_pipe, reference_noise="step")(CHARACTERS, STORY, character_images={"Mia": [picture()]}, **RUN)
    bank = out.banks["Mia"]
    assert bank.stored_entries == len(bank)  # one entry per (step, layer)
    layers = {layer for _, layer in bank.keys()}
    first, last = (bank.get(s, min(layers), torch.float32, torch.device("cpu"), 2) for s in (0, 2))
    assert not torch.allclose(first, last)  # each step's own noise level


def test_reference_strength_changes_the_frames_that_read(sd_pipe):
    plain = story(sd_pipe, reference_noise=0.0)(CHARACTERS, STORY, character_images={"Mia": [picture()]}, **RUN)
    strong = story(sd_pipe, reference_noise=0.0, reference_strength=4.0)(
        CHARACTERS, STORY, character_images={"Mia": [picture()]}, **RUN
    )
    assert not np.allclose(plain.images[0], strong.images[0], atol=1e-4)


def test_finished_bank_is_made_from_the_paper_references_as_pictures(sd_pipe):
    steps = story(sd_pipe, rate=1.0)(CHARACTERS, STORY, **RUN)
    finished_pipe = story(sd_pipe, rate=1.0, bank_from="finished", reference_noise=0.05)
    finished = finished_pipe(CHARACTERS, STORY, **RUN)
    for index in (0, 1, 2, 3):  # the references are the paper's: the same mutual phase
        np.testing.assert_array_equal(finished.images[index], steps.images[index])
    bank = finished.banks["Mia"]
    assert bank.stored_entries == len({layer for _, layer in bank.keys()})
    # the same references given as pictures, with the seeds the reference phase derives, give the same bank
    sampler_seed = derived_seed(5, 1, 0)
    again = StoryPipeline(sd_pipe, finished_pipe.csa.config, bank_dtype="float32")
    rebuilt = type(bank)("Mia", bank.settings, "float32")
    common = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64, output_type="np")
    with again.csa.installed(again.denoiser):
        again.record_pictures(
            rebuilt, images_as_pixels([steps.images[0], steps.images[1]]), CHARACTERS["Mia"], "", common,
            derived_seed(sampler_seed, 5), sampler_seed,
        )  # fmt: skip
    assert rebuilt.digest == bank.digest


def test_sequential_references_read_the_finished_ones_before_them(sd_pipe):
    vanilla = story(sd_pipe, rate=0.0)(CHARACTERS, STORY, **RUN)
    sequential = story(sd_pipe, bank_from="sequential", reference_noise=0.0)(CHARACTERS, STORY, **RUN)
    np.testing.assert_allclose(sequential.images[0], vanilla.images[0], atol=1e-5)  # the first drawn alone
    assert not np.allclose(sequential.images[1], vanilla.images[1], atol=1e-3)  # the second reads the first
    assert sequential.banks["Mia"].stored_entries == len({layer for _, layer in sequential.banks["Mia"].keys()})


def _picture_layer_inputs(sd_pipe, layers, level: float, noise_seed: int) -> dict[str, torch.Tensor]:
    """Each CSA layer's self-attention input for `picture()` noised to `level` and denoised once with Mia's
    description, both guidance halves: what a picture lends, written out with the scheduler's own add_noise."""
    pixels = images_as_pixels([picture()])
    latents = sd_pipe.vae.encode(pixels).latent_dist.mode() * sd_pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(noise_seed))
    timestep = torch.tensor([round(level * 999)])
    noisy = DDPMScheduler.from_config(sd_pipe.scheduler.config).add_noise(latents, noise, timestep)
    text, negative = sd_pipe.encode_prompt(CHARACTERS["Mia"], "cpu", 1, True, "")
    seen = {}

    def keep(name, module, args, kwargs):
        seen[name] = args[0]

    modules = dict(sd_pipe.unet.named_modules())
    hooks = [modules[name].register_forward_pre_hook(partial(keep, name), with_kwargs=True) for name in layers]
    try:
        with torch.no_grad():
            sd_pipe.unet(torch.cat([noisy] * 2), timestep, encoder_hidden_states=torch.cat([negative, text]))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_subject_only_picture_at_a_fixed_level_lends_exactly_its_subject_tokens(sd_pipe):
    """A first pass infers the picture's subject mask; the bank then holds, per layer, the picture's tokens
    inside that mask (rate 1: all of them) and no others -- fewer than the whole picture lends."""
    pipe = story(sd_pipe, rate=1.0, reference_noise=0.0, subject_only=True)
    inferred = []
    infer = pipe.csa.inferred_subject_masks
    pipe.csa.inferred_subject_masks = lambda: inferred.append(infer()) or inferred[-1]
    bank = pipe(CHARACTERS, STORY, character_images={"Mia": [picture()]}, **RUN).banks["Mia"]
    (masks,) = inferred  # one maps pass, for the one picture character
    mask = masks[0]["Mia"]
    assert 0 < int(mask.sum()) < mask.numel()
    layers = {layer for _, layer in bank.keys()}
    seen = _picture_layer_inputs(sd_pipe, layers, 0.0, derived_seed(5, 2, 0))
    for layer in layers:
        inside = grid_masks({"Mia": mask}, seen[layer].shape[1])["Mia"]
        stored = bank.get(1, layer, torch.float32, torch.device("cpu"), 2)
        torch.testing.assert_close(stored, seen[layer][:, inside], atol=1e-4, rtol=1e-4)
    whole = story(sd_pipe, rate=1.0, reference_noise=0.0)(
        CHARACTERS, STORY, character_images={"Mia": [picture()]}, **RUN
    )
    assert bank.nbytes < whole.banks["Mia"].nbytes


def test_subject_only_picture_whose_subject_is_not_found_lends_the_whole_picture(sd_pipe, caplog, monkeypatch):
    monkeypatch.setattr("storydiffusion.csa.subjects.SubjectMaps.masks", lambda self, dilation=1: [{}])
    pipe = story(sd_pipe, rate=1.0, reference_noise=0.0, subject_only=True)
    with caplog.at_level(logging.WARNING):
        bank = pipe(CHARACTERS, STORY, character_images={"Mia": [picture()]}, **RUN).banks["Mia"]
    assert "no subject found in picture 1 of 'Mia'" in caplog.text
    whole = story(sd_pipe, rate=1.0, reference_noise=0.0)(
        CHARACTERS, STORY, character_images={"Mia": [picture()]}, **RUN
    )
    assert bank.nbytes == whole.banks["Mia"].nbytes and len(bank) == len(whole.banks["Mia"])


def test_subject_only_step_level_picture_lends_once_its_mask_is_found(sd_pipe):
    """Each step's level in turn, as a reference phase: nothing is lent before the first maps exist (step 0),
    then only tokens inside the mask."""
    subject = story(sd_pipe, rate=1.0, reference_noise="step", subject_only=True)
    whole = story(sd_pipe, rate=1.0, reference_noise="step")
    bank = subject(CHARACTERS, STORY, character_images={"Mia": [picture()]}, **RUN).banks["Mia"]
    full = whole(CHARACTERS, STORY, character_images={"Mia": [picture()]}, **RUN).banks["Mia"]
    assert {step for step, _ in bank.keys()} == {1, 2} and {step for step, _ in full.keys()} == {0, 1, 2}
    sizes = {
        layer: (b.get(1, layer, torch.float32, torch.device("cpu"), 2).shape[1] for b in (bank, full))
        for _, layer in bank.keys()
    }
    lent, all_tokens = (sum(n) for n in zip(*(tuple(pair) for pair in sizes.values())))
    assert 0 < lent < all_tokens


def test_picture_character_file_regenerates_its_bank_and_refuses_a_changed_picture(sd_pipe, tmp_path):
    pipe = story(sd_pipe, reference_noise=0.1)
    out = pipe(CHARACTERS, STORY, character_images={"Mia": [picture(3, size=80)]}, **RUN)
    path = CharacterRecipe.from_bank(out.banks["Mia"]).save(tmp_path / "Mia.character.json")
    assert (tmp_path / "Mia.picture-1.png").is_file()
    settings = out.banks["Mia"].settings
    bank = load_character(path, pipe, settings)
    assert bank.digest == out.banks["Mia"].digest
    reread = pipe(CHARACTERS, STORY, banks={"Mia": bank}, **RUN)
    for index in (0, 1, 4):
        np.testing.assert_array_equal(reread.images[index], out.images[index])
    picture(4).save(tmp_path / "Mia.picture-1.png")
    with pytest.raises(BankMismatchError, match=r"pictures\[0\]"):
        load_character(path, pipe, settings)


def test_bad_pictures_are_refused_naming_the_file_and_character(sd_pipe, tmp_path, caplog):
    pipe = story(sd_pipe)
    with pytest.raises(StoryDiffusionError, match=r"missing\.png.*|picture 1 of 'Mia'.*missing\.png"):
        pipe(CHARACTERS, STORY, character_images={"Mia": [tmp_path / "missing.png"]}, **RUN)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(StoryDiffusionError, match=r"picture 1 of 'Mia'.*notes\.png"):
        pipe(CHARACTERS, STORY, character_images={"Mia": [tmp_path / "notes.png"]}, **RUN)
    with pytest.raises(StoryDiffusionError, match="'Zed', who is not among the characters"):
        pipe(CHARACTERS, STORY, character_images={"Zed": [picture()]}, **RUN)
    with pytest.raises(StoryDiffusionError, match=f"at most {MAX_PICTURES}"):
        pipe(CHARACTERS, STORY, character_images={"Mia": [picture(i) for i in range(MAX_PICTURES + 1)]}, **RUN)
    with caplog.at_level(logging.WARNING):
        pipe(CHARACTERS, STORY[:2], character_images={"Mia": [picture(mode="RGBA"), picture(mode="L")]}, **RUN)
    said = caplog.text
    assert "converted from RGBA to RGB" in said and "converted from L to RGB" in said


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["sd", "sdxl", "flux", "sd3"])
def test_pictures_on_every_model_family_and_dtype(kind, dtype):
    """The same code on tiny-random SD1.5, SDXL, Flux and SD3: the pictures fill a bank the frames read, and
    in bfloat16 the frames are the float32 frames up to rounding."""
    from storydiffusion.pipelines import tiny_random

    make = {"sd": "tiny_sd_pipeline", "sdxl": "tiny_sdxl_pipeline", "flux": "tiny_flux_pipeline"}
    pipe = getattr(tiny_random, make.get(kind, "tiny_sd3_pipeline"))(seed=0)
    pipe.set_progress_bar_config(disable=True)
    size = 64 if kind in ("sd", "sdxl") else 32
    run = dict(RUN, height=size, width=size, num_inference_steps=2)

    def draw(image):
        story_pipe = StoryPipeline(pipe, CSAConfig(schedule=ALWAYS, reference_noise=0.0), bank_dtype="float32")
        return story_pipe(CHARACTERS, STORY[:2], character_images={"Mia": [image]}, **run)

    reference = draw(picture(1))  # float32
    pipe.to(dtype=dtype)
    given, other = draw(picture(1)), draw(picture(2))
    bank = given.banks["Mia"]
    assert bank.stored_entries > 0 and len(bank) >= bank.stored_entries
    assert [f.role for f in given.frames] == ["frame", "frame"]
    assert not np.array_equal(given.images[0], other.images[0])  # the frames read the pictures
    assert all(np.isfinite(image).all() for image in given.images)
    tolerance = 0.0 if dtype == torch.float32 else 0.05
    for ours, float32 in zip(given.images, reference.images):
        assert float(np.abs(ours - float32).mean()) <= tolerance


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_subject_only_pictures_on_dits(kind):
    """A DiT's joint blocks find a picture's subject from its text tokens too: the bank lends fewer tokens than
    the whole picture, and the frames read it."""
    from storydiffusion.pipelines import tiny_random

    pipe = getattr(tiny_random, f"tiny_{kind}_pipeline")(seed=0)
    pipe.set_progress_bar_config(disable=True)
    run = dict(RUN, height=32, width=32, num_inference_steps=2)

    def draw(image, **config):
        story_pipe = StoryPipeline(
            pipe, CSAConfig(schedule=ALWAYS, reference_noise=0.0, **config), bank_dtype="float32"
        )
        return story_pipe(CHARACTERS, STORY[:2], character_images={"Mia": [image]}, **run)

    subject, whole, other = draw(picture(1), subject_only=True), draw(picture(1)), draw(picture(2), subject_only=True)
    assert 0 < subject.banks["Mia"].nbytes < whole.banks["Mia"].nbytes
    assert not np.array_equal(subject.images[0], other.images[0])


def test_dits_refuse_a_reference_strength():
    from storydiffusion.pipelines.tiny_random import tiny_flux_pipeline

    with pytest.raises(StoryDiffusionError, match="reference_strength"):
        StoryPipeline(tiny_flux_pipeline(seed=0), CSAConfig(reference_strength=2.0))


def test_id_length_binds_only_characters_drawn_here(sd_pipe):
    """A story whose every character comes from pictures has no reference frames: the default id_length (3)
    is no reason to refuse its one frame; a character drawn here still needs its solo frames."""
    pipe = story(sd_pipe, reference_noise=0.0)
    run = {key: value for key, value in RUN.items() if key != "id_length"}
    out = pipe(CHARACTERS, ["[Mia] waves"], character_images={"Mia": [picture()]}, **run)
    assert [f.role for f in out.frames] == ["frame"]
    with pytest.raises(StoryDiffusionError, match="needs id_length=3 reference frames"):
        pipe(CHARACTERS, ["[Mia] waves", "[Tom] runs"], character_images={"Mia": [picture()]}, **run)
