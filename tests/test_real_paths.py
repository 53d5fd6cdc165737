"""The paths real checkpoints take: non-square sizes, banks that must refuse what they cannot serve,
resume across devices and dtypes, long prompts that do not depend on their neighbours, step tracking
that survives user callbacks and second-order schedulers, bfloat16, SDXL banks saved and reloaded."""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, HeunDiscreteScheduler

from storydiffusion import CSAConfig, CSASchedule, IdentityBank
from storydiffusion.app.runner import RunOptions, run_story
from storydiffusion.csa.bank import BankMismatchError
from storydiffusion.csa.controller import ConsistentAttention, denoising_timesteps
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.pipelines import prompts
from storydiffusion.pipelines.story_pipeline import StoryPipeline, weights_probe
from storydiffusion.story.comic import ComicLayout
from storydiffusion.story.format import Story

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALWAYS = CSAConfig(schedule=CSASchedule.always())
CHARACTERS = {"Bob": "a man with red hair"}
FRAMES = ["[Bob] at home", "[Bob] on a bus", "[Bob] at work", "[Bob] sleeps"]
RUN = dict(id_length=2, num_inference_steps=3, height=64, width=64, output_type="np", progress=False)
LONG = ", ".join(f"detail number {i} of the scene" for i in range(30))  # ~180 tokens: 3 chunks


def story_of(**settings) -> Story:
    data = {"characters": CHARACTERS, "frames": FRAMES, "steps": 2, "id_length": 2, "size": "64x64"} | settings
    return Story.from_dict(data, source="<test>")


def options(**kw) -> RunOptions:
    return RunOptions(device="cpu", progress=False, **kw)


# -- 1. non-square sizes: resume and bank reuse ----------------------------------------------------
def test_non_square_story_resumes_and_reuses_its_bank(sd_pipe, tmp_path):
    story = story_of(size="64x48")
    pipe = StoryPipeline(sd_pipe)
    first = run_story(story, tmp_path / "a", options(), pipeline=pipe)
    assert first.generated == [0, 1, 2, 3]
    (tmp_path / "a" / first.panels[3].name).unlink()
    again = run_story(story, tmp_path / "a", options(), pipeline=pipe)  # resume: the bank on disk is read
    assert again.generated == [3] and again.skipped == [0, 1, 2]
    reused = run_story(story, tmp_path / "b", options(), pipeline=pipe, bank_files=[first.banks["Bob"]])
    assert reused.generated == [0, 1, 2, 3]


def test_bank_settings_take_keywords_only(sd_pipe):
    with pytest.raises(TypeError):
        StoryPipeline(sd_pipe).bank_settings(3, 5.0, 64, 48)


# -- 3. banks refuse what they cannot serve --------------------------------------------------------
@pytest.fixture
def bob_bank(sd_pipe):
    out = StoryPipeline(sd_pipe, ALWAYS)(CHARACTERS, FRAMES[:2], **RUN)
    return out.banks["Bob"]


def _read_settings(pipe, config=ALWAYS):
    return StoryPipeline(pipe, config).bank_settings(num_inference_steps=3, guidance_scale=5.0, height=64, width=64)


def test_bank_read_under_other_csa_layers_is_refused(sd_pipe, bob_bank):
    with pytest.raises(BankMismatchError, match="layers"):
        bob_bank.check_compatible(_read_settings(sd_pipe, CSAConfig(layers=("down_blocks.*",))))
    bob_bank.check_compatible(_read_settings(sd_pipe, CSAConfig(layers=("*",))))  # a superset reads every layer


def test_bank_read_under_another_scheduler_config_is_refused(sd_pipe, bob_bank):
    sd_pipe.scheduler = type(sd_pipe.scheduler).from_config(sd_pipe.scheduler.config, timestep_spacing="trailing")
    with pytest.raises(BankMismatchError, match="scheduler_config.timestep_spacing"):
        bob_bank.check_compatible(_read_settings(sd_pipe))


def test_bank_read_with_other_weights_or_a_lora_is_refused(sd_pipe, bob_bank):
    peft = pytest.importorskip("peft")
    same_in_half = weights_probe(sd_pipe.unet.to(torch.float16))
    sd_pipe.unet.to(torch.float32)
    bob_bank.check_compatible(_read_settings(sd_pipe))
    assert len(same_in_half) == len(bob_bank.settings.weights_probe)
    sd_pipe.unet.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"]), adapter_name="style")
    with pytest.raises(BankMismatchError, match="adapters"):
        bob_bank.check_compatible(_read_settings(sd_pipe))
    sd_pipe.unet.delete_adapters("style")
    with torch.no_grad():
        to_k = [p for n, p in sd_pipe.unet.named_parameters() if "attn1.to_k" in n and "lora" not in n]
        to_k[0].mul_(1.5)
    with pytest.raises(BankMismatchError, match="weights_probe"):
        bob_bank.check_compatible(_read_settings(sd_pipe))


def test_weights_probe_is_the_same_in_any_dtype(sd_pipe):
    full = weights_probe(sd_pipe.unet)
    for dtype in (torch.float16, torch.bfloat16):
        from storydiffusion.csa.bank import probes_match

        assert probes_match(full, weights_probe(sd_pipe.unet.to(dtype)))
    sd_pipe.unet.to(torch.float32)


# -- 4. resume records what was resolved -----------------------------------------------------------
def test_resume_in_another_dtype_is_reported(sd_pipe, tmp_path):
    story = story_of()
    run_story(story, tmp_path, options(dtype="auto"), pipeline=StoryPipeline(sd_pipe))
    manifest = (tmp_path / "manifest.json").read_text()
    assert '"dtype": "float32"' in manifest and '"device": "cpu"' in manifest
    with pytest.raises(StoryDiffusionError, match="dtype: 'float32' -> 'bfloat16'"):
        run_story(story, tmp_path, options(dtype="bfloat16"), pipeline=StoryPipeline(sd_pipe.to(torch.bfloat16)))


# -- 5. long prompts do not depend on their neighbours ---------------------------------------------
def test_same_prompt_and_seed_give_the_same_image_whatever_shares_the_call(any_pipe):
    """A frame batched with a long-prompt frame equals the same frame alone (it was 0.05 off with padding)."""
    story = StoryPipeline(any_pipe, ALWAYS)
    frames = ["[Bob] at home", "[Bob] on a bus", "[Bob] sleeps", f"[Bob] {LONG}"]
    batched = story(CHARACTERS, frames, frame_batch_size=2, **RUN).images[2]
    alone = story(CHARACTERS, frames[:3], **RUN).images[2]
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_reference_batch_with_a_long_prompt_leaves_the_short_one_alone(any_pipe):
    """Reference frames share one call; with CSA off, a short prompt's image does not depend on its fellow."""
    off = StoryPipeline(any_pipe, CSAConfig(rate=0.0))
    with_long = off(CHARACTERS, ["[Bob] at home", f"[Bob] {LONG}"], **RUN).images[0]
    with_short = off(CHARACTERS, ["[Bob] at home", "[Bob] on a bus"], **RUN).images[0]
    np.testing.assert_allclose(with_long, with_short, atol=1e-5)


def test_tiled_embeddings_give_the_same_attention():
    torch.manual_seed(0)
    query, keys, values = torch.randn(1, 4, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    once = torch.nn.functional.scaled_dot_product_attention(query, keys, values)
    thrice = torch.nn.functional.scaled_dot_product_attention(query, prompts.tile(keys, 15), prompts.tile(values, 15))
    torch.testing.assert_close(once, thrice)


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_chunked_path_honours_clip_skip(any_pipe, clip_skip):
    """One chunk through the chunked encoder equals the pipeline's own encode_prompt with the same clip_skip."""
    ours, _ = prompts._chunked(any_pipe, "a man with red hair", 1, clip_skip)
    if hasattr(any_pipe, "text_encoder_2"):
        theirs = any_pipe.encode_prompt("a man with red hair", device="cpu", clip_skip=clip_skip)[0]
    elif clip_skip is None:
        theirs = any_pipe.encode_prompt("a man with red hair", "cpu", 1, True)[0]
    else:  # diffusers' own SD clip_skip path reads text_encoder.text_model, which transformers 5 removed
        ids = any_pipe.tokenizer("a man with red hair", padding="max_length", return_tensors="pt").input_ids
        hidden = any_pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        theirs = prompts._final_layer_norm(any_pipe.text_encoder)(hidden)
    torch.testing.assert_close(ours, theirs)
    long_default, _ = prompts._chunked(any_pipe, LONG, 3, None)
    long_skipped, _ = prompts._chunked(any_pipe, LONG, 3, 1)
    assert not torch.allclose(long_default, long_skipped)


def test_long_prompt_story_honours_clip_skip(sd_pipe):
    story = StoryPipeline(sd_pipe, CSAConfig(rate=0.0))
    plain = story({}, [LONG], **(RUN | {"id_length": 1})).images[0]
    skipped = story({}, [LONG], clip_skip=1, **(RUN | {"id_length": 1})).images[0]
    assert not np.allclose(plain, skipped)


# -- 6. a caption that cannot fit fails before any panel is drawn ----------------------------------
def test_caption_that_cannot_fit_fails_before_generating(sd_pipe, tmp_path):
    frames = [*FRAMES[:3], "[Bob] sleeps # " + "a very long caption " * 200]
    story = Story.from_dict({"characters": CHARACTERS, "frames": frames, "steps": 2, "id_length": 2}, source="<t>")
    layout = ComicLayout(kind="grid", rows=2, cols=2, page_size=(400, 400))
    with pytest.raises(StoryDiffusionError, match="frame 4: caption"):
        run_story(story, tmp_path, options(layout=layout), pipeline=StoryPipeline(sd_pipe))
    assert not list(tmp_path.glob("panel_*.png"))


# -- 7. step tracking: user callbacks, second-order schedulers, repeated UNet calls ----------------
def test_user_callback_runs_and_changes_nothing(sd_pipe):
    seen = []

    def callback(pipe, step, timestep, kwargs):
        seen.append(step)
        return {}

    story = StoryPipeline(sd_pipe, ALWAYS)
    with_callback = story(CHARACTERS, FRAMES[:3], callback_on_step_end=callback, **RUN).images
    without = story(CHARACTERS, FRAMES[:3], **RUN).images
    assert seen == [0, 1, 2] * 2  # the reference call and the frame call
    for a, b in zip(with_callback, without):
        np.testing.assert_array_equal(a, b)


def test_step_follows_the_timestep_not_the_number_of_unet_calls(sd_pipe):
    timesteps = denoising_timesteps(sd_pipe.scheduler, 3)
    csa = ConsistentAttention(ALWAYS)
    latents = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 77, sd_pipe.unet.config.cross_attention_dim)
    with csa.installed(sd_pipe.unet):
        csa.begin_mutual(timesteps, 2, torch.Generator().manual_seed(0))
        for _ in range(2):  # a pipeline that calls the UNet twice at one timestep
            sd_pipe.unet(latents, timesteps[1], text)
            assert csa.step == 1
        sd_pipe.unet(latents, torch.tensor([timesteps[2]] * 2), text)
        assert csa.step == 2
        with pytest.raises(StoryDiffusionError, match="not among this phase's"):
            sd_pipe.unet(latents, 12.5, text)


def test_second_order_scheduler_story(sd_pipe):
    sd_pipe.scheduler = HeunDiscreteScheduler.from_config(sd_pipe.scheduler.config)
    on = StoryPipeline(sd_pipe, ALWAYS)(CHARACTERS, FRAMES[:3], **RUN)
    off = StoryPipeline(sd_pipe, CSAConfig(rate=0.0))(CHARACTERS, FRAMES[:3], **RUN)
    assert {step for step, _ in on.banks["Bob"].keys()} == {0, 1, 2}  # one entry per step, not per UNet call
    assert not np.allclose(on.images[2], off.images[2])


def test_sdxl_denoising_end_story(sdxl_pipe):
    out = StoryPipeline(sdxl_pipe, ALWAYS)(CHARACTERS, FRAMES[:3], denoising_end=0.7, **RUN)
    assert len(out.images) == 3 and all(np.isfinite(image).all() for image in out.images)


# -- 8. batches, bfloat16, SDXL banks saved and reloaded -------------------------------------------
def test_frame_batches_equal_frames_alone(sd_pipe):
    story = StoryPipeline(sd_pipe, ALWAYS)
    batched = story(CHARACTERS, FRAMES, frame_batch_size=2, **RUN).images
    alone = story(CHARACTERS, FRAMES, frame_batch_size=1, **RUN).images
    for a, b in zip(batched[2:], alone[2:]):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_bfloat16_story_on_the_cpu(sd_pipe):
    sd_pipe.to(torch.bfloat16)
    on = StoryPipeline(sd_pipe, ALWAYS)(CHARACTERS, FRAMES[:3], **RUN)
    off = StoryPipeline(sd_pipe, CSAConfig(rate=0.0))(CHARACTERS, FRAMES[:3], **RUN)
    assert all(np.isfinite(image).all() for image in on.images)
    assert len(on.banks["Bob"]) > 0 and not np.array_equal(on.images[2], off.images[2])


def test_sdxl_bank_saved_and_loaded_gives_the_same_frame(sdxl_pipe, tmp_path):
    story = StoryPipeline(sdxl_pipe, ALWAYS)
    first = story(CHARACTERS, FRAMES[:3], **RUN)
    path = first.banks["Bob"].save(tmp_path / "bob.safetensors")
    expected = story.bank_settings(num_inference_steps=3, guidance_scale=5.0, height=64, width=64)
    bob = IdentityBank.load(path, expected=expected)
    again = story(CHARACTERS, FRAMES[:3], banks={"Bob": bob}, skip_frames={0, 1}, **RUN)
    np.testing.assert_array_equal(again.images[2], first.images[2])


def test_memory_options_are_wired(tmp_path):
    from storydiffusion.app.runner import load_story_pipeline

    with pytest.raises(StoryDiffusionError, match="--cpu-offload .* needs --device cuda"):
        load_story_pipeline("tiny-random", options(cpu_offload=True), CSAConfig())
    story = load_story_pipeline("tiny-random", options(vae_tiling=True, vae_slicing=True), CSAConfig())
    assert story.pipe.vae.use_tiling and story.pipe.vae.use_slicing


# -- 9. the story command can ask for the same initial noise ---------------------------------------
def test_same_initial_noise_from_the_story_settings(sd_pipe, tmp_path):
    import json

    run_story(story_of(same_initial_noise=True, seed=5), tmp_path, options(), pipeline=StoryPipeline(sd_pipe))
    panels = json.loads((tmp_path / "manifest.json").read_text())["panels"]
    assert {p["seed"] for p in panels.values()} == {5}


def test_multistep_scheduler_timesteps_are_the_bank_steps(sd_pipe):
    sd_pipe.scheduler = DPMSolverMultistepScheduler.from_config(sd_pipe.scheduler.config)
    out = StoryPipeline(sd_pipe, ALWAYS)(CHARACTERS, FRAMES[:2], **RUN)
    assert {step for step, _ in out.banks["Bob"].keys()} == {0, 1, 2}


def test_chunked_path_honours_the_lora_text_encoder_scale(sd_pipe):
    peft = pytest.importorskip("peft")
    base = prompts.encode_frames(sd_pipe, [LONG], [""])["prompt_embeds"]
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.inject_adapter_in_model(config, sd_pipe.text_encoder, adapter_name="style")
    full = prompts.encode_frames(sd_pipe, [LONG], [""])["prompt_embeds"]
    zero = prompts.encode_frames(sd_pipe, [LONG], [""], lora_scale=0.0)["prompt_embeds"]
    assert not torch.allclose(full, base)  # the adapter reaches the chunked encoding
    torch.testing.assert_close(zero, base)  # and its scale is applied: 0 switches it off
    again = prompts.encode_frames(sd_pipe, [LONG], [""])["prompt_embeds"]
    torch.testing.assert_close(again, full)  # the scale is undone after the call


def test_the_dtype_keyword_follows_the_installed_versions(monkeypatch):
    """`dtype=` from diffusers 0.40 and transformers 4.56 on, `torch_dtype=` before: read from the versions."""
    import diffusers
    import transformers

    from storydiffusion.pipelines import loading

    for library, module, old, new in (("diffusers", diffusers, "0.39.1", "0.40.0"),
                                      ("transformers", transformers, "4.55.4", "4.56.0")):  # fmt: skip
        for version, keyword in ((old, "torch_dtype"), (new, "dtype")):
            monkeypatch.setattr(module, "__version__", version)
            loading._diffusers_takes_dtype.cache_clear()
            loading._transformers_takes_dtype.cache_clear()
            assert loading.dtype_kwargs(torch.float16, library) == {keyword: torch.float16}
    loading._diffusers_takes_dtype.cache_clear()
    loading._transformers_takes_dtype.cache_clear()
