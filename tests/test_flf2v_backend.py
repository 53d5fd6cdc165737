"""The flf2v transition backend: diffusers' first/last-frame pipelines (Wan, LTX) behind `storydiffusion video`,
on tiny random components built from configs — frames as diffusers makes them, keyframes at the ends, the
models' frame-count and size rules, loading by model_index.json, resume per backend, the CLI end to end."""

import functools
import json
import sys

import av
import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition
from helpers import run_cli as invoke_cli
from PIL import Image

from storydiffusion.app.video_runner import (
    SMPBackend,
    TransitionSettings,
    load_backend,
    load_transition_pipeline,
    run_story_video,
    transition_record,
)
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.video import read_video
from storydiffusion.video.flf2v import LTX, WAN, FLF2VBackend, pipeline_class
from storydiffusion.video.tiny_random_flf2v import (
    TINY_RANDOM_FLF2V,
    tiny_ltx_condition_pipeline,
    tiny_wan_flf2v_pipeline,
)
from storydiffusion.world.models import TINY_VIDEO_DIR

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = 32  # frame side: a multiple of Wan's 16 and LTX's 32
PROMPT = "a girl, jumping on a beach"


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def wan():
    return quiet(tiny_wan_flf2v_pipeline(seed=0))


@pytest.fixture(scope="module")
def ltx():
    return quiet(tiny_ltx_condition_pipeline(seed=0))


def noise_image(seed, size=SIZE):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def keyframes():
    return noise_image(1), noise_image(2), noise_image(3)  # start, end, another end


def make_story(folder, count=3, size=SIZE):
    """A story run's folder as `storydiffusion story` leaves it: panels and manifest.json."""
    panels = {}
    for i in range(count):
        noise_image(10 + i, size).save(folder / f"panel_{i:02d}.png")
        panels[str(i)] = {"index": i, "file": f"panel_{i:02d}.png", "prompt": f"{PROMPT} {i}", "caption": ""}
    (folder / "manifest.json").write_text(json.dumps({"format": "storydiffusion.run", "panels": panels}))
    return folder


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ the tiny builders


def test_tiny_builders_are_seeded_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, other = tiny_wan_flf2v_pipeline(seed=0), tiny_wan_flf2v_pipeline(seed=0), tiny_wan_flf2v_pipeline(seed=1)
    tiny_ltx_condition_pipeline(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    weights = [p.transformer.patch_embedding.weight for p in (a, b, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert len(a.tokenizer) > 1  # the packaged CLIP vocabulary stands in for UMT5's
    assert not any(m.training for m in (a.transformer, a.vae, a.text_encoder, a.image_encoder))
    assert a.transformer.config.image_dim is not None and a.transformer.config.pos_embed_seq_len is not None


# ------------------------------------------------------------------ the backend's frames


def test_wan_frames_are_the_pipelines_with_the_keyframes_at_the_ends(wan, keyframes):
    start, end, other = keyframes
    backend = FLF2VBackend(wan, TINY_RANDOM_FLF2V)
    call = dict(num_frames=5, num_inference_steps=2, guidance_scale=5.0)
    frames = backend(start, end, PROMPT, **call, generator=seeded())
    size = dict(height=SIZE, width=SIZE)
    direct = wan(image=start, last_image=end, prompt=PROMPT, **size, **call, generator=seeded(), output_type="pil")
    direct = direct.frames[0]
    assert len(frames) == len(direct) == 5 and frames[2].size == (SIZE, SIZE)
    for ours, theirs in zip(frames[1:-1], direct[1:-1]):
        assert np.array_equal(pixels(ours), pixels(theirs))
    # the ends are the keyframes themselves, not the model's reconstructions of them
    assert np.array_equal(pixels(frames[0]), pixels(start)) and np.array_equal(pixels(frames[-1]), pixels(end))
    assert not np.array_equal(pixels(direct[-1]), pixels(end))
    # the last keyframe reaches the model: another end, other in-between frames (a little: random weights)
    moved = backend(start, other, PROMPT, **call, generator=seeded())
    assert not np.array_equal(pixels(moved[3]), pixels(frames[3]))


def test_ltx_conditions_on_the_first_and_the_last_frame(ltx, keyframes):
    start, end, other = keyframes
    backend = FLF2VBackend(ltx, "tiny-ltx")
    call = dict(num_frames=9, num_inference_steps=2, guidance_scale=3.0)
    frames = backend(start, end, PROMPT, **call, generator=seeded())
    conditions = [LTXVideoCondition(image=start, frame_index=0), LTXVideoCondition(image=end, frame_index=8)]
    direct = ltx(conditions=conditions, prompt=PROMPT, height=SIZE, width=SIZE, **call, generator=seeded()).frames[0]
    assert len(frames) == 9
    for ours, theirs in zip(frames[1:-1], direct[1:-1]):
        assert np.array_equal(pixels(ours), pixels(theirs))
    assert np.array_equal(pixels(frames[0]), pixels(start)) and np.array_equal(pixels(frames[-1]), pixels(end))
    moved = backend(start, other, PROMPT, **call, generator=seeded())
    assert not np.array_equal(pixels(moved[7]), pixels(frames[7]))


def test_the_defaults_are_the_models_own(wan, ltx):
    w, x = FLF2VBackend(wan), FLF2VBackend(ltx)
    assert (w.default_frames, w.default_guidance, w.default_fps) == (81, 5.0, 16.0)
    assert (x.default_frames, x.default_guidance, x.default_fps) == (161, 3.0, 25.0)


@pytest.mark.parametrize(
    "which, frames, message",
    [
        ("wan", 8, "makes 4k+1 frames (its VAE packs 4 frames into each latent after the first), keyframes included; "
                   "use 5 or 9"),
        ("wan", 3, "use 5"),
        ("ltx", 5, "makes 8k+1 frames"),
        ("ltx", 12, "use 9 or 17"),
    ],
)  # fmt: skip
def test_frame_counts_follow_each_models_rule(wan, ltx, keyframes, which, frames, message):
    backend = FLF2VBackend(wan if which == "wan" else ltx)
    with pytest.raises(StoryDiffusionError, match="frames=") as caught:
        backend(*keyframes[:2], PROMPT, num_frames=frames, num_inference_steps=1)
    assert message in str(caught.value)
    backend.check_num_frames(9)  # 9 = 4*2+1 = 8*1+1: both make it
    backend.check_num_frames(17)


@pytest.mark.parametrize("which, side, multiple", [("wan", 40, 16), ("ltx", 48, 32)])
def test_keyframe_sizes_follow_each_models_rule(wan, ltx, which, side, multiple):
    backend = FLF2VBackend(wan if which == "wan" else ltx)
    with pytest.raises(StoryDiffusionError, match=f"must be a multiple of {multiple} on each side"):
        backend.check_keyframes(noise_image(0, side), noise_image(1, side), "a.png", "b.png")
    with pytest.raises(StoryDiffusionError, match="same size"):
        backend.check_keyframes(noise_image(0), noise_image(1, 64), "a.png", "b.png")


# ------------------------------------------------------------------ which pipelines


def test_loading_picks_the_class_from_model_index(tmp_path, wan, ltx, keyframes):
    for name, pipe, frames in (("wan", wan, 5), ("ltx", ltx, 9)):
        pipe.save_pretrained(tmp_path / name)
        loaded = load_backend("flf2v", str(tmp_path / name), device="cpu")
        assert type(loaded.pipe) is type(pipe) and len(loaded.pipe.tokenizer) > 1
        loaded.set_progress_bar_config(disable=True)
        call = dict(num_frames=frames, num_inference_steps=1, guidance_scale=1.0)
        ours = loaded(*keyframes[:2], PROMPT, **call, generator=seeded())
        theirs = FLF2VBackend(pipe)(*keyframes[:2], PROMPT, **call, generator=seeded())
        assert np.array_equal(pixels(ours[1]), pixels(theirs[1]))  # the weights made the round trip
    # LTX-Video repositories name LTXPipeline; their components load as the condition pipeline
    index = json.loads((tmp_path / "ltx" / "model_index.json").read_text())
    (tmp_path / "ltx" / "model_index.json").write_text(json.dumps({**index, "_class_name": "LTXPipeline"}))
    assert type(load_backend("flf2v", str(tmp_path / "ltx"), device="cpu").pipe) is type(ltx)
    with pytest.raises(StoryDiffusionError, match="this model is a LTXPipeline"):
        FLF2VBackend(diffusers.LTXPipeline(**ltx.components))  # built by hand: it would ignore the last frame


def test_an_unsupported_pipeline_class_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(StoryDiffusionError, match="runs a WanImageToVideoPipeline or a LTXConditionPipeline; this "
                                                  "model is a StableDiffusionPipeline"):  # fmt: skip
        load_backend("flf2v", str(tmp_path), device="cpu")
    with pytest.raises(StoryDiffusionError, match="TransitionPipeline .that is this project's own: use --backend smp"):
        load_backend("flf2v", str(TINY_VIDEO_DIR), device="cpu")
    with pytest.raises(StoryDiffusionError, match="cannot read the model_index.json of .* .no such folder"):
        load_backend("flf2v", str(tmp_path / "missing"), device="cpu")


def test_a_diffusers_without_the_class_says_which_release_has_it(monkeypatch):
    monkeypatch.setattr(diffusers, "LTXConditionPipeline", None)
    with pytest.raises(StoryDiffusionError, match=r"LTXConditionPipeline .* needs diffusers >= 0\.33\.0 \(installed"):
        pipeline_class(LTX)

    class WanBeforeFLF2V:  # diffusers 0.33's Wan image-to-video pipeline took no last frame
        def __call__(self, image, prompt=None, num_frames=81):
            pass

    monkeypatch.setattr(diffusers, "WanImageToVideoPipeline", WanBeforeFLF2V)
    with pytest.raises(StoryDiffusionError, match=r"needs diffusers >= 0\.34\.0.*pip install -U"):
        pipeline_class(WAN)


def test_wan_pipelines_that_cannot_take_two_keyframes_are_refused():
    with pytest.raises(StoryDiffusionError, match="reads one keyframe's image tokens .no pos_embed_seq_len"):
        FLF2VBackend(tiny_wan_flf2v_pipeline(first_last_frame=False), "wan-i2v")
    first_frame_only = tiny_wan_flf2v_pipeline()
    first_frame_only.register_to_config(expand_timesteps=True)
    with pytest.raises(StoryDiffusionError, match="conditions on the first frame only"):
        FLF2VBackend(first_frame_only)


def test_wan_without_ftfy_says_how_to_install_it(monkeypatch, wan):
    monkeypatch.delattr(sys.modules[type(wan).__module__], "ftfy")  # as where ftfy was never installed
    with pytest.raises(StoryDiffusionError, match="pip install ftfy"):
        FLF2VBackend(wan)


def test_memory_options(wan):
    with pytest.raises(StoryDiffusionError, match="needs --device cuda"):
        load_backend("flf2v", TINY_RANDOM_FLF2V, device="cpu", cpu_offload=True)
    tiled = load_backend("flf2v", TINY_RANDOM_FLF2V, device="cpu", vae_tiling=True)
    assert tiled.pipe.vae.use_tiling
    settings = TransitionSettings(num_frames=5)
    plain = transition_record(FLF2VBackend(wan, TINY_RANDOM_FLF2V), settings)
    assert transition_record(tiled, settings) == {**plain, "vae_tiling": True}  # tiles blend: not the same frames


# ------------------------------------------------------------------ story videos: resume per backend


@pytest.fixture
def counted(monkeypatch, wan):
    """Every call of the tiny Wan pipeline, counted (the signature kept: the backend reads its defaults)."""
    calls = []
    original = type(wan).__call__

    @functools.wraps(original)
    def counting(self, *args, **kwargs):
        calls.append(kwargs["num_frames"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(wan), "__call__", counting)
    return calls


def test_story_video_resumes_and_never_reuses_another_backends_frames(tmp_path, wan, counted):
    story = make_story(tmp_path)
    backend = FLF2VBackend(wan, TINY_RANDOM_FLF2V)
    settings = TransitionSettings(num_frames=5, steps=2, guidance=5.0)
    path, reused = run_story_video(backend, story, None, settings)
    assert reused == [] and counted == [5, 5]
    assert len(read_video(path)) == 9  # 5 + 4: the shared keyframe once
    folder = story / "video" / "transition_00"
    made = sorted(folder.glob("frame_*.png"))
    assert len(made) == 5
    assert np.array_equal(pixels(Image.open(made[0])), pixels(Image.open(story / "panel_00.png")))
    assert np.array_equal(pixels(Image.open(made[-1])), pixels(Image.open(story / "panel_01.png")))
    inputs = json.loads((folder / "transition.json").read_text())["inputs"]
    assert inputs["backend"] == "flf2v" and inputs["model"] == TINY_RANDOM_FLF2V and "motion" not in inputs
    assert inputs["pipeline"] == "WanImageToVideoPipeline"

    assert run_story_video(backend, story, None, settings)[1] == [0, 1] and len(counted) == 2  # no call on a rerun
    assert run_story_video(backend, story, None, TransitionSettings(num_frames=5, steps=3))[1] == []
    assert run_story_video(FLF2VBackend(wan, "another-model"), story, None, settings)[1] == []
    assert len(counted) == 6

    # the smp backend into the same folder makes its own frames, and flf2v does not take them afterwards
    smp = SMPBackend(quiet(load_transition_pipeline("tiny", "cpu")), "tiny")
    assert run_story_video(smp, story, None, TransitionSettings(num_frames=5, steps=1))[1] == []
    assert json.loads((folder / "transition.json").read_text())["inputs"]["backend"] == "smp"
    assert run_story_video(backend, story, None, settings)[1] == [] and len(counted) == 8


def test_flf2v_refuses_the_smp_motion_switch(tmp_path, wan):
    with pytest.raises(StoryDiffusionError, match="flf2v has none"):
        settings = TransitionSettings(num_frames=5, motion="linear")
        run_story_video(FLF2VBackend(wan), make_story(tmp_path), None, settings)


def test_the_smp_backend_makes_todays_frames(tmp_path):
    """`--backend smp` is the TransitionPipeline call the story video made before backends existed."""
    story = make_story(tmp_path, count=2, size=64)
    pipe = quiet(load_transition_pipeline("tiny", "cpu"))
    settings = TransitionSettings(num_frames=3, steps=2)
    run_story_video(SMPBackend(pipe, "tiny"), story, None, settings)
    made = [Image.open(p) for p in sorted((story / "video" / "transition_00").glob("frame_*.png"))]
    start, end = (Image.open(story / f"panel_0{i}.png").convert("RGB") for i in (0, 1))
    before = pipe(
        start,
        end,
        f"{PROMPT} 1",
        num_frames=3,
        num_inference_steps=2,
        guidance_scale=1.0,
        negative_prompt=None,
        motion="smp",
        generator=torch.Generator(device="cpu").manual_seed(0),
    ).frames[0]
    assert len(made) == 3
    for ours, theirs in zip(made, before):
        assert np.array_equal(pixels(ours), pixels(theirs))


# ------------------------------------------------------------------ command line


@pytest.fixture
def run_cli(monkeypatch, capsys):
    def run(*args):
        code, out, err = invoke_cli(monkeypatch, capsys, *args)
        return code, out + err

    return run


FLF2V = ["--backend", "flf2v", "--model", TINY_RANDOM_FLF2V, "--device", "cpu"]


def test_video_command_chains_a_story_with_flf2v_end_to_end(run_cli, tmp_path):
    story = make_story(tmp_path)
    code, printed = run_cli("video", "--story", story, *FLF2V, "--frames", 5, "--steps", 2)
    assert code == 0, printed
    assert len(read_video(story / "story.mp4")) == 9
    inputs = json.loads((story / "video" / "transition_01" / "transition.json").read_text())["inputs"]
    assert (inputs["backend"], inputs["num_frames"], inputs["guidance"]) == ("flf2v", 5, 5.0)  # Wan's own guidance
    assert inputs["prompt"] == f"{PROMPT} 2"  # transition i follows panel i+1's prompt
    with av.open(str(story / "story.mp4")) as container:
        assert container.streams.video[0].average_rate == 16  # Wan's frame rate
    code, printed = run_cli("video", "--story", story, *FLF2V, "--frames", 5, "--steps", 2)
    assert code == 0 and "2 transition(s) reused" in printed


def test_video_command_makes_one_flf2v_transition(run_cli, tmp_path):
    noise_image(1).save(tmp_path / "a.png")
    noise_image(2).save(tmp_path / "b.png")
    out = tmp_path / "clip.gif"
    args = ["video", tmp_path / "a.png", tmp_path / "b.png", "--prompt", PROMPT, "--out", out]
    code, printed = run_cli(*args, *FLF2V, "--frames", 9, "--steps", 1, "--fps", 4)
    assert code == 0 and "(9 frames)" in printed, printed
    assert len(read_video(out)) == 9
    assert Image.open(out).info["duration"] == 250  # --fps 4 over Wan's 16


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--backend", "flf2v"], 2, "--backend flf2v needs --model"),
        (["--backend", "animatediff"], 2, "choose smp or flf2v"),
        ([*FLF2V, "--frames", 8], 1, "frames=8: WanImageToVideoPipeline makes 4k+1 frames"),
        ([*FLF2V, "--cpu-offload"], 1, "needs --device cuda"),
        ([*FLF2V, "--frames", 5, "--motion", "linear"], 1, "flf2v has none"),
        (["--backend", "flf2v", "--model", "tiny", "--device", "cpu"], 1, "use --backend smp"),
    ],
)
def test_video_command_flf2v_errors(run_cli, tmp_path, extra, code, message):
    got, printed = run_cli("video", "--story", make_story(tmp_path), "--steps", 1, *extra)
    assert got == code and message in printed and "Traceback" not in printed, printed


def test_video_command_refuses_panels_the_model_cannot_size(run_cli, tmp_path):
    story = make_story(tmp_path, size=40)
    code, printed = run_cli("video", "--story", story, *FLF2V, "--frames", 5, "--steps", 1)
    assert code == 1 and "must be a multiple of 16 on each side" in printed and "Traceback" not in printed
