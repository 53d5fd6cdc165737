"""The video half: motion predictor, transition UNet and pipeline, export, training losses, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli as invoke_cli
from helpers import world_story_folder
from PIL import Image

from storydiffusion.video import (
    SemanticMotionPredictor,
    TransitionPipeline,
    frame_encoder_states,
    interpolate_embeddings,
    keyframe_condition,
    read_video,
    write_video,
)
from storydiffusion.video.training import diffusion_loss, encode_clips, smp_loss
from storydiffusion.video.unet import KeyframeAttnProcessor, graft_image_unet, semantic_map
from storydiffusion.world.video import (
    MOTIONS,
    figure_position,
    fresh_tiny_transition_pipeline,
    sample_clip,
    trajectory_error,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


def small_predictor(text_dim=None, seed=0, num_tokens=1, map_channels=0):
    torch.manual_seed(seed)
    return SemanticMotionPredictor(
        embed_dim=8,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        max_frames=6,
        text_dim=text_dim,
        cross_attention_dim=12,
        condition_tokens=2,
        num_tokens=num_tokens,
        map_channels=map_channels,
    )


@pytest.fixture(scope="module")
def pipe():
    """The tiny design: a predictor on a 4 x 4 grid of patch embeddings, with an 8-channel map."""
    pipe = fresh_tiny_transition_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pooled_pipe():
    """The paper's design: one pooled CLIP image embedding a frame, no map."""
    pipe = fresh_tiny_transition_pipeline(seed=0, grid=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe_folder(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_transition")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def walk():
    return sample_clip(np.random.default_rng(3), 4, "walking")


# ------------------------------------------------------------------ predictor


def test_interpolation_runs_from_start_to_end():
    start, end = torch.zeros(2, 3), torch.ones(2, 3)
    path = interpolate_embeddings(start, end, 5)
    assert path.shape == (2, 5, 3)
    assert torch.equal(path[:, 0], start) and torch.equal(path[:, -1], end)
    assert torch.allclose(path[:, 2], torch.full((2, 3), 0.5))


def test_predictor_shapes_determinism_and_the_linear_start():
    predictor = small_predictor(text_dim=10)
    start, end, text = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 7, 10)
    out = predictor(start, end, 5, text_embeds=text)
    assert out.shape == (3, 5, 8)
    assert torch.allclose(out, interpolate_embeddings(start, end, 5), atol=1e-6)  # zero-initialised correction
    assert torch.equal(predictor(start, end, 5, text_embeds=text, bypass=True), interpolate_embeddings(start, end, 5))
    torch.nn.init.normal_(predictor.proj_out.weight)
    moved = predictor(start, end, 5, text_embeds=text)
    assert not torch.allclose(moved, interpolate_embeddings(start, end, 5))
    assert torch.equal(moved, predictor(start, end, 5, text_embeds=text))  # deterministic in eval
    assert not torch.allclose(moved, predictor(start, end, 5, text_embeds=text.flip(1)))  # it reads the prompt
    assert torch.equal(small_predictor(text_dim=10).frame_embeddings, small_predictor(text_dim=10).frame_embeddings)
    tokens = predictor.condition_tokens(moved)
    assert tokens.shape == (3, 5, 2, 12)


def test_a_grid_predictor_keeps_its_cells_apart():
    predictor = small_predictor(text_dim=10, num_tokens=4, map_channels=3)
    assert predictor.grid_size == 2
    start, end, text = torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 7, 10)
    assert torch.allclose(predictor(start, end, 5, text_embeds=text), interpolate_embeddings(start, end, 5), atol=1e-6)
    torch.nn.init.normal_(predictor.proj_out.weight)
    moved = predictor(start, end, 5, text_embeds=text)
    assert moved.shape == (2, 5, 4, 8)
    assert torch.equal(predictor(start, end, 5, bypass=True), interpolate_embeddings(start, end, 5))
    # The same embedding in every cell still comes out differently per cell: the cells know where they are.
    same = torch.randn(1, 1, 8).expand(1, 4, 8)
    out = predictor(same, same, 3, text_embeds=text[:1])
    assert not torch.allclose(out[0, 1, 0], out[0, 1, 3], atol=1e-4)
    assert predictor.condition_tokens(moved).shape == (2, 5, 4 * 2, 12)
    drawn = predictor.condition_map(moved)
    assert drawn.shape == (2, 3, 5, 2, 2)
    cell = predictor.to_map(moved[:, :, 1])  # cell 1 = row 0, column 1 (row-major)
    assert torch.allclose(drawn[:, :, :, 0, 1], cell.permute(0, 2, 1))
    assert small_predictor().condition_map(torch.randn(1, 3, 8)) is None


@pytest.mark.parametrize(
    "kwargs, message", [(dict(num_tokens=5), "num_tokens=5"), (dict(map_channels=2), "map_channels needs a grid")]
)
def test_predictor_rejects_a_bad_grid(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_predictor(**kwargs)


def test_predictor_saves_and_loads(tmp_path):
    predictor = small_predictor()
    torch.nn.init.normal_(predictor.proj_out.weight)
    predictor.save_pretrained(tmp_path)
    again = SemanticMotionPredictor.from_pretrained(tmp_path)
    start, end = torch.randn(1, 8), torch.randn(1, 8)
    assert torch.allclose(predictor(start, end, 4), again(start, end, 4))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p(torch.randn(1, 8), torch.randn(1, 8), 1), "num_frames=1"),
        (lambda p: p(torch.randn(1, 8), torch.randn(1, 8), 7), "num_frames=7"),
        (lambda p: p(torch.randn(1, 9), torch.randn(1, 9), 4), "(B, 8)"),
        (lambda p: p(torch.randn(2, 8), torch.randn(1, 8), 4), "must both be"),
        (lambda p: p(torch.randn(1, 4, 8), torch.randn(1, 4, 8), 4), "(B, 8)"),
    ],
)
def test_predictor_rejects_bad_input(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(small_predictor())


def test_a_text_reading_predictor_needs_the_text():
    predictor, start, end = small_predictor(text_dim=10), torch.randn(1, 8), torch.randn(1, 8)
    with pytest.raises(ValueError, match="pass text_embeds"):
        predictor(start, end, 4)
    assert torch.equal(predictor(start, end, 4, bypass=True), interpolate_embeddings(start, end, 4))


# ------------------------------------------------------------------ conditioning layout


def test_keyframe_condition_gives_every_frame_both_keyframes_and_its_place():
    start, end = torch.full((2, 4, 3, 3), 1.0), torch.full((2, 4, 3, 3), 2.0)
    condition = keyframe_condition(start, end, 5)  # (B, 2C+1, F, h, w)
    assert condition.shape == (2, 9, 5, 3, 3)
    for frame in range(5):
        assert torch.equal(condition[:, :4, frame], start) and torch.equal(condition[:, 4:8, frame], end)
    assert condition[:, 8, :, 0, 0].tolist() == [[0, 0.25, 0.5, 0.75, 1]] * 2
    assert (condition[:, 8] == condition[:, 8, :, :1, :1]).all()  # the same over the frame


def test_the_semantic_map_puts_each_cell_over_its_part_of_the_latents():
    drawn = torch.zeros(1, 2, 3, 2, 2)  # (B, M, F, g, g)
    drawn[0, 1, 2, 1, 0] = 1.0  # channel 1, frame 2, bottom-left cell
    stretched = semantic_map(drawn, (8, 8))
    assert stretched.shape == (1, 2, 3, 8, 8)
    hot = stretched[0, 1, 2]
    assert hot[4:, :4].sum() > 10 * hot[:4, 4:].sum()  # mass at the bottom left, not the top right
    assert stretched[0, 0].abs().sum() == 0 and stretched[0, 1, :2].abs().sum() == 0


def test_frame_encoder_states_give_each_frame_its_own_tokens():
    text = torch.arange(2.0)[:, None, None].expand(2, 3, 4)  # clip b's text is all b
    tokens = (10 + torch.arange(5.0))[None, :, None, None].expand(2, 5, 2, 4)  # frame f's tokens are 10 + f
    states = frame_encoder_states(text, tokens)
    assert states.shape == (10, 5, 4)
    for b in range(2):
        for f in range(5):
            row = states[b * 5 + f]  # clips major, frames minor, as UNetMotionModel folds them
            assert (row[:3] == b).all() and (row[3:] == 10 + f).all()


def test_transition_unet_takes_the_keyframe_channels(pipe, pooled_pipe):
    for model, map_channels in ((pipe, 8), (pooled_pipe, 0)):
        unet = model.unet
        assert unet.config.in_channels == 13 + map_channels and unet.conv_in.in_channels == 13 + map_channels
        image_unet_channels = unet.config.out_channels
        assert unet.conv_in.weight[:, image_unet_channels:].abs().sum() == 0  # new inputs start silent


def test_grafting_an_image_unet_replaces_the_image_layers_only():
    """A trained video model moved onto another image UNet: its image layers become that UNet's weights; motion
    layers and conv_in's keyframe and map inputs stay."""
    from storydiffusion.world.training import tiny_unet

    video = fresh_tiny_transition_pipeline(seed=0).unet
    image = tiny_unet(seed=1)  # the tiny image model's architecture, other weights
    before = {k: v.clone() for k, v in video.state_dict().items()}
    assert graft_image_unet(video, image) == len(image.state_dict())
    after = video.state_dict()
    for key, weight in image.state_dict().items():
        expected = weight if key != "conv_in.weight" else torch.cat([weight, before[key][:, 4:]], 1)
        assert torch.equal(after[key], expected), key
    motion = [k for k in after if "motion_modules" in k]
    assert motion and all(torch.equal(after[k], before[k]) for k in motion)
    assert not torch.equal(after["conv_in.weight"][:, :4], before["conv_in.weight"][:, :4])  # it did change


def test_keyframe_attention_lets_each_frame_see_both_ends_and_nothing_else():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    x = torch.randn(2 * 5, 6, 8)  # 2 clips x 5 frames, 6 tokens each
    processor = KeyframeAttnProcessor()
    out = processor(attn, x, num_frames=5)
    assert out.shape == x.shape
    assert torch.allclose(processor(attn, x), AttnProcessor2_0()(attn, x), atol=1e-6)  # no frames: plain
    frames = out.view(2, 5, 6, 8)

    def after(frame, clip=0):
        changed = x.clone().view(2, 5, 6, 8)
        changed[clip, frame] += 1.0
        return processor(attn, changed.view(10, 6, 8), num_frames=5).view(2, 5, 6, 8)

    assert not torch.allclose(after(0)[0, 2], frames[0, 2])  # frame 2 reads the start keyframe
    assert not torch.allclose(after(4)[0, 2], frames[0, 2])  # ... and the end keyframe
    assert torch.allclose(after(3)[0, 2], frames[0, 2], atol=1e-6)  # not another in-between frame
    assert torch.allclose(after(0, clip=1)[0], frames[0], atol=1e-6)  # nor another clip
    context = torch.randn(10, 3, 8)
    cross = Attention(query_dim=8, cross_attention_dim=8, heads=2, dim_head=4)
    assert torch.allclose(
        processor(cross, x, context, num_frames=5), AttnProcessor2_0()(cross, x, context), atol=1e-6
    )  # cross-attention is untouched


def test_finished_keyframe_tokens_are_read_in_place_of_the_clips_own_and_weighted():
    """Recorded from a two-frame pass, the keyframes' tokens replace each clip's own first and last frame in
    every frame's attention; a strength w equals those tokens appearing w times (the reference formulation)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from storydiffusion.video.unet import KeyframeTokens

    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    keyframes = KeyframeTokens()
    processor = KeyframeAttnProcessor(keyframes, "layer")
    finished = torch.randn(2 * 2, 6, 8)  # 2 clips x their 2 finished keyframes
    keyframes.mode = "record"
    processor(attn, finished, num_frames=2)
    assert keyframes.tokens["layer"].shape == (2, 12, 8)

    x = torch.randn(2 * 5, 6, 8)  # 2 clips x 5 noisy frames
    keyframes.mode = "read"
    read = processor(attn, x, num_frames=5)
    ends = finished.view(2, 1, 12, 8).expand(2, 5, 12, 8).reshape(10, 12, 8)
    expected = AttnProcessor2_0()(attn, x, torch.cat([x, ends], dim=1))
    torch.testing.assert_close(read, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(read, KeyframeAttnProcessor()(attn, x, num_frames=5), atol=1e-4)  # not the own ends

    keyframes.strength = 2.0
    weighted = processor(attn, x, num_frames=5)
    repeated = AttnProcessor2_0()(attn, x, torch.cat([x, ends, ends], dim=1))
    torch.testing.assert_close(weighted, repeated, atol=1e-5, rtol=1e-5)


def test_the_pipeline_reads_finished_keyframes_recorded_once_per_clip(pipe, walk):
    """keyframe_tokens="finished": one pass over the clean keyframes, whatever the frames' noise -- the same
    tokens under two seeds -- read at every step; other frames than "noisy" gives, and nothing kept after."""
    truth = walk.render()
    seen = []

    def snapshot(pipeline, step, t, tensors):
        seen.append({layer: tokens.clone() for layer, tokens in pipeline.keyframes.tokens.items()})
        return tensors

    kwargs = dict(num_frames=4, num_inference_steps=2, output_type="latent", callback_on_step_end=snapshot)
    finished = [
        pipe(truth[0], truth[-1], walk.caption, generator=torch.Generator().manual_seed(seed),
             keyframe_tokens="finished", **kwargs).frames
        for seed in (0, 1)
    ]  # fmt: skip
    assert len(seen) == 4 and seen[0] and all(tokens.keys() == seen[0].keys() for tokens in seen)
    for layer, tokens in seen[0].items():
        assert all(torch.equal(tokens, other[layer]) for other in seen[1:]), layer
    assert not pipe.keyframes.tokens and pipe.keyframes.mode == "off"
    seen.clear()
    noisy = pipe(truth[0], truth[-1], walk.caption, generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert seen == [{}, {}]  # the clip's own same-step ends: nothing recorded
    assert not torch.allclose(noisy[:, :, 1:-1], finished[0][:, :, 1:-1])
    with pytest.raises(ValueError, match="keyframe_tokens"):
        pipe(truth[0], truth[-1], walk.caption, keyframe_tokens="clean", num_frames=4, num_inference_steps=1)


def test_the_pipeline_gives_spatial_layers_keyframe_attention(pipe):
    processors = pipe.unet.attn_processors
    spatial = [p for name, p in processors.items() if "motion_modules" not in name]
    motion = [p for name, p in processors.items() if "motion_modules" in name]
    assert spatial and motion
    assert all(isinstance(p, KeyframeAttnProcessor) for p in spatial)
    assert not any(isinstance(p, KeyframeAttnProcessor) for p in motion)


def test_a_pipeline_refuses_a_unet_without_room_for_the_map(pipe, pooled_pipe):
    parts = dict(pipe.components, unet=pooled_pipe.unet)
    with pytest.raises(ValueError, match="3C\\+1\\+8 input channels"):
        TransitionPipeline(**parts)


# ------------------------------------------------------------------ pipeline


def test_pipeline_makes_frames_anchored_at_the_keyframes(pipe, walk):
    truth = walk.render()
    kwargs = dict(num_frames=4, num_inference_steps=2, output_type="np")
    out = pipe(truth[0], truth[-1], walk.caption, generator=torch.Generator().manual_seed(0), **kwargs)
    again = pipe(truth[0], truth[-1], walk.caption, generator=torch.Generator().manual_seed(0), **kwargs)
    frames = out.frames[0]
    assert frames.shape == (4, 64, 64, 3) and np.isfinite(frames).all()
    assert np.array_equal(frames, again.frames[0])
    # the ends are the keyframes' own latents, put there after the denoising loop (so decoded, they are
    # as close to the keyframes as the VAE makes them); nothing else is touched by that
    start, end = (np.asarray(image, dtype=np.float32) / 255 for image in (truth[0], truth[-1]))
    assert np.abs(frames[0] - start).mean() < 0.06 < np.abs(frames[0] - end).mean()
    assert np.abs(frames[-1] - end).mean() < 0.06 < np.abs(frames[-1] - start).mean()
    latent = dict(kwargs, output_type="latent")
    anchored = pipe(truth[0], truth[-1], walk.caption, generator=torch.Generator().manual_seed(0), **latent).frames
    free = pipe(truth[0], truth[-1], walk.caption, generator=torch.Generator().manual_seed(0), anchor_keyframes=False,
                **latent).frames  # fmt: skip
    keyframes = pipe.encode_latents([truth[0], truth[-1]])
    assert torch.equal(anchored[0, :, 0], keyframes[0]) and torch.equal(anchored[0, :, -1], keyframes[1])
    assert torch.equal(anchored[:, :, 1:-1], free[:, :, 1:-1])
    assert not torch.equal(anchored[:, :, 0], free[:, :, 0]) and not torch.equal(anchored[:, :, -1], free[:, :, -1])
    assert out.frame_embeds.shape == (1, 4, 16, 64)  # 4 x 4 cells of 64-d embeddings per frame
    pil = pipe(truth[0], truth[-1], walk.caption, num_frames=4, num_inference_steps=1, guidance_scale=2.0)
    assert len(pil.frames[0]) == 4 and pil.frames[0][0].size == (64, 64)


def test_the_in_between_frames_depend_on_both_keyframes(pipe, walk):
    truth, other = walk.render(), sample_clip(np.random.default_rng(5), 4, "jumping").render()

    def middle(start, end):
        generator = torch.Generator().manual_seed(0)  # the same initial noise for every pair of keyframes
        kwargs = dict(num_frames=4, num_inference_steps=2, output_type="latent", anchor_keyframes=False)
        return pipe(start, end, walk.caption, generator=generator, **kwargs).frames[:, :, 1:-1]

    base = middle(truth[0], truth[-1])
    assert torch.equal(base, middle(truth[0], truth[-1]))
    assert not torch.allclose(base, middle(other[0], truth[-1]), atol=1e-4)  # another start keyframe
    assert not torch.allclose(base, middle(truth[0], other[-1]), atol=1e-4)  # another end keyframe


def test_the_pooled_design_makes_frames_too(pooled_pipe, walk):
    truth = walk.render()
    out = pooled_pipe(
        truth[0],
        truth[-1],
        walk.caption,
        num_frames=4,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.frames.shape == (1, 4, 64, 64, 3) and out.frame_embeds.shape == (1, 4, 64)


def test_the_unet_reads_the_semantic_map(walk):
    model = fresh_tiny_transition_pipeline(seed=0)  # a copy: its weights get changed
    model.set_progress_bar_config(disable=True)
    truth = walk.render()
    with torch.no_grad():
        torch.nn.init.normal_(model.unet.conv_in.weight[:, 13:], std=0.5)  # let the map's channels through

    def frames():
        return model(
            truth[0],
            truth[-1],
            "x",
            num_frames=4,
            num_inference_steps=2,
            output_type="np",
            anchor_keyframes=False,
            generator=torch.Generator().manual_seed(0),
        ).frames

    before = frames()
    with torch.no_grad():
        model.motion_predictor.to_map.weight.mul_(-1.0)
    assert np.abs(frames() - before).mean() > 1e-3


def test_linear_motion_differs_from_the_predictor_once_trained(pipe, walk):
    truth = walk.render()
    predictor = pipe.motion_predictor
    saved = predictor.proj_out.weight.detach().clone()
    try:
        torch.nn.init.normal_(predictor.proj_out.weight, std=0.5)
        runs = {
            motion: pipe(
                truth[0],
                truth[-1],
                walk.caption,
                num_frames=4,
                num_inference_steps=1,
                motion=motion,
                output_type="np",
                generator=torch.Generator().manual_seed(0),
            ).frame_embeds
            for motion in ("smp", "linear")
        }
    finally:
        with torch.no_grad():
            predictor.proj_out.weight.copy_(saved)
    assert not torch.allclose(runs["smp"], runs["linear"])


def test_latent_interpolation_baseline(pipe, walk):
    truth = walk.render()
    frames = pipe.interpolate_latents(truth[0], truth[-1], 5)
    assert len(frames) == 5 and frames[2].size == (64, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_frames=1), "num_frames=1"),
        (dict(end_image=Image.new("RGB", (32, 32))), "share one size"),
        (dict(motion="zigzag"), "motion='zigzag'"),
        (dict(output_type="gif"), "output_type='gif'"),
    ],
)
def test_pipeline_rejects_bad_input(pipe, walk, kwargs, message):
    truth = walk.render()
    call = dict(start_image=truth[0], end_image=truth[-1], prompt="x", num_frames=4, num_inference_steps=1)
    call.update(kwargs)
    with pytest.raises(ValueError, match=message):
        pipe(**call)


def test_pipeline_folder_round_trips_through_from_pretrained(pipe, pipe_folder, walk):
    index = json.loads((pipe_folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNetMotionModel"]
    assert index["motion_predictor"][1] == "SemanticMotionPredictor"
    again = TransitionPipeline.from_pretrained(pipe_folder)
    again.set_progress_bar_config(disable=True)
    truth = walk.render()
    kwargs = dict(num_frames=3, num_inference_steps=1, output_type="np")
    a = pipe(truth[0], truth[-1], "x", generator=torch.Generator().manual_seed(1), **kwargs).frames
    b = again(truth[0], truth[-1], "x", generator=torch.Generator().manual_seed(1), **kwargs).frames
    assert np.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_exported_videos_open_with_their_frames(tmp_path, suffix):
    frames = [Image.new("RGB", (64, 64), (40 * i, 100, 200 - 30 * i)) for i in range(5)]
    path = write_video(frames, tmp_path / f"clip{suffix}", fps=4)
    back = read_video(path)
    assert len(back) == 5 and back[0].size == (64, 64)
    assert np.abs(np.asarray(back[3], dtype=float) - np.asarray(frames[3], dtype=float)).mean() < 8
    assert not list(tmp_path.glob(".*partial"))


def test_odd_sized_frames_still_make_an_mp4(tmp_path):
    frames = [Image.new("RGB", (33, 17), (i * 50, 0, 0)) for i in range(3)]
    assert len(read_video(write_video(frames, tmp_path / "odd.mp4"))) == 3


def test_export_refuses_unknown_suffixes(tmp_path):
    from storydiffusion.errors import StoryDiffusionError

    with pytest.raises(StoryDiffusionError, match=r"\.mp4 or \.gif"):
        write_video([Image.new("RGB", (8, 8))], tmp_path / "clip.avi")


# ------------------------------------------------------------------ tiny world clips and the instrument


def test_clips_are_deterministic_and_cover_the_motions():
    a = sample_clip(np.random.default_rng(5), 6)
    b = sample_clip(np.random.default_rng(5), 6)
    assert a == b and len(a.panels) == 6
    motions = {sample_clip(np.random.default_rng(s), 4).motion for s in range(40)}
    assert motions == set(MOTIONS)
    jump = sample_clip(np.random.default_rng(1), 8, "jumping")
    phases = [p.figures[0].phase for p in jump.panels]
    assert phases[0] == 0.0 and phases[-1] == 0.0 and max(phases) > 0.8  # one whole jump, landed


def test_the_instrument_finds_the_character_where_it_was_drawn(walk):
    frames, background = walk.render(), walk.background()
    for panel, frame in zip(walk.panels, frames):
        x, _ = figure_position(frame, background)
        assert abs(x - panel.figures[0].placement.x) < 0.08
    assert figure_position(background, background) is None
    assert trajectory_error(frames, frames, background) == 0.0
    frozen = [frames[0]] * (len(frames) - 1) + [frames[-1]]  # the character never moves
    assert trajectory_error(frozen, frames, background) > 0.05


def test_a_cross_fade_is_not_a_walk():
    clip = sample_clip(np.random.default_rng(3), 8, "walking")
    frames, background = clip.render(), clip.background()
    fade = [Image.blend(frames[0], frames[-1], t) for t in np.linspace(0, 1, 8)]
    # Its centre of mass does travel (two half figures), yet half the character is at each end.
    fade_x, _ = figure_position(fade[4], background)
    true_x, _ = figure_position(frames[4], background)
    assert abs(fade_x - true_x) < 0.1
    assert trajectory_error(fade, frames, background) > 0.1


# ------------------------------------------------------------------ training


def test_the_predictor_learns_a_fixed_batch(pipe):
    rng = np.random.default_rng(0)
    clips = [sample_clip(rng, 5) for _ in range(2)]
    batch = encode_clips(pipe, [c.render() for c in clips], [c.caption for c in clips], latents=False)
    predictor = SemanticMotionPredictor(
        embed_dim=64,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        max_frames=8,
        text_dim=64,
        cross_attention_dim=64,
        num_tokens=16,  # the fixture's 4 x 4 grid
    )
    assert batch["frame_embeds"].shape == (2, 5, 16, 64)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = smp_loss(predictor, batch["frame_embeds"], batch["text"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_the_diffusion_loss_falls_on_a_fixed_batch(pipe):
    from diffusers import DDPMScheduler

    rng = np.random.default_rng(1)
    clips = [sample_clip(rng, 4) for _ in range(2)]
    batch = encode_clips(pipe, [c.render() for c in clips], [c.caption for c in clips])
    batch["empty_text"] = encode_clips(pipe, [clips[0].render()[:2]], [""], latents=False)["text"]
    assert batch["latents"].shape == (2, 4, 4, 16, 16)
    unet = fresh_tiny_transition_pipeline(seed=0).unet  # a copy: the module fixture stays untouched
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    params = [*unet.parameters(), *pipe.motion_predictor.parameters()]
    saved = [p.detach().clone() for p in pipe.motion_predictor.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    losses = []
    try:
        for _ in range(16):
            generator = torch.Generator().manual_seed(0)  # the same noise and timesteps: a fixed objective
            loss = diffusion_loss(unet, pipe.motion_predictor, schedule, batch, generator, caption_dropout=0.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        with torch.no_grad():
            for p, s in zip(pipe.motion_predictor.parameters(), saved):
                p.copy_(s)
    assert losses[-1] < 0.8 * losses[0]


def test_the_diffusion_loss_can_read_the_finished_keyframes(pipe):
    """`finished_keyframes=True`: keyframe attention reads the clean keyframes' tokens (a pass without gradients)
    -- another loss than the same-step keyframes give, gradients still reach the UNet, nothing kept after; a UNet
    whose keyframe attention has no KeyframeTokens is refused with the way out."""
    from diffusers import DDPMScheduler

    from storydiffusion.video.unet import use_keyframe_attention

    rng = np.random.default_rng(2)
    clips = [sample_clip(rng, 4) for _ in range(2)]
    batch = encode_clips(pipe, [c.render() for c in clips], [c.caption for c in clips])
    batch["empty_text"] = encode_clips(pipe, [clips[0].render()[:2]], [""], latents=False)["text"]
    fresh = fresh_tiny_transition_pipeline(seed=0)
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)

    def loss(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return diffusion_loss(fresh.unet, fresh.motion_predictor, schedule, batch, generator, caption_dropout=0.0,
                              **kwargs)  # fmt: skip

    noisy, finished = loss(), loss(finished_keyframes=True)
    assert abs(noisy.item() - finished.item()) > 1e-6
    finished.backward()
    assert all(p.grad is not None for p in fresh.unet.conv_in.parameters())
    assert fresh.keyframes.mode == "off" and not fresh.keyframes.tokens
    use_keyframe_attention(fresh.unet)  # stateless processors: nothing to record into
    with pytest.raises(ValueError, match="KeyframeTokens"):
        loss(finished_keyframes=True)


def test_training_script_checkpoints_and_resumes(tmp_path):
    base = [sys.executable, str(REPO / "scripts" / "train_video.py"), "--stage", "smp", "--batch", "1", "--frames", "4"]
    base += ["--out", str(tmp_path), "--log-every", "1", "--ckpt-every", "1", "--threads", "1", "--cache", "8"]
    first = subprocess.run([*base, "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "checkpoint-smp").is_dir() and (tmp_path / "weights-smp" / "model_index.json").is_file()
    second = subprocess.run([*base, "--steps", "3", "--resume"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed smp at step 2" in second.stdout
    records = [json.loads(line) for line in second.stdout.splitlines() if line.startswith("{")]
    assert [r["step"] for r in records if "step" in r] == [3]
    assert set(records[-1]["embedding_mse"]) == {"predictor", "straight_path"}  # the held-out check


# ------------------------------------------------------------------ command line


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """The real entry point; returns (exit code, everything printed)."""

    def run(*args):
        code, out, err = invoke_cli(monkeypatch, capsys, *args)
        return code, out + err

    return run


@pytest.fixture(scope="module")
def keyframes(tmp_path_factory, walk):
    folder = tmp_path_factory.mktemp("keyframes")
    truth = walk.render()
    truth[0].save(folder / "start.png")
    truth[-1].save(folder / "end.png")
    truth[0].resize((32, 32)).save(folder / "small.png")
    (folder / "notes.png").write_text("not an image")
    return folder


def test_video_command_writes_a_clip(run_cli, keyframes, pipe_folder, tmp_path):
    out = tmp_path / "clip.mp4"
    code, printed = run_cli(
        "video",
        keyframes / "start.png",
        keyframes / "end.png",
        "--prompt",
        "a boy walking on a beach",
        "--out",
        out,
        "--frames",
        4,
        "--steps",
        2,
        "--model",
        pipe_folder,
        "--device",
        "cpu",
    )
    assert code == 0, printed
    assert len(read_video(out)) == 4


@pytest.mark.parametrize(
    "end, extra, message",
    [
        ("notes.png", [], "cannot read keyframe"),
        ("missing.png", [], "does not exist"),
        ("small.png", [], "same size"),
        ("end.png", ["--frames", "1"], "at least 2 frames"),
    ],
)
def test_video_command_errors(run_cli, keyframes, pipe_folder, end, extra, message):
    code, printed = run_cli(
        "video", keyframes / "start.png", keyframes / end, "--model", pipe_folder, "--device", "cpu", *extra
    )
    assert code == 1
    assert message in printed and "Traceback" not in printed


def test_video_command_needs_images_or_a_story(run_cli, pipe_folder):
    code, printed = run_cli("video", "--model", pipe_folder)
    assert code == 2 and "--story" in printed


def test_story_video_chains_the_panels_and_resumes(run_cli, pipe_folder, tmp_path):
    world_story_folder(tmp_path, 3)
    args = ["video", "--story", tmp_path, "--frames", 3, "--steps", 1, "--model", pipe_folder, "--device", "cpu"]
    code, printed = run_cli(*args)
    assert code == 0, printed
    assert len(read_video(tmp_path / "story.mp4")) == 5  # 3 + 3 frames, the shared keyframe once
    assert sorted(p.name for p in (tmp_path / "video").iterdir()) == ["transition_00", "transition_01"]
    code, printed = run_cli(*args)
    assert code == 0 and "2 transition(s) reused" in printed


def test_story_video_needs_a_story_folder(run_cli, pipe_folder, tmp_path):
    code, printed = run_cli("video", "--story", tmp_path, "--model", pipe_folder, "--device", "cpu")
    assert code == 1 and "manifest.json" in printed


# ------------------------------------------------------------------ the shipped tiny video model


def test_shipped_tiny_video_model_loads_offline_and_animates(walk):
    from storydiffusion.world.models import TINY_VIDEO_DIR, resolve_video_model

    assert resolve_video_model("tiny") == str(TINY_VIDEO_DIR)
    shipped = TransitionPipeline.from_pretrained(TINY_VIDEO_DIR)
    shipped.set_progress_bar_config(disable=True)
    assert len(shipped.tokenizer) == 49408  # an offline load can silently give an empty vocabulary
    assert shipped.unet.dtype == torch.float32 and shipped.motion_predictor.reads_text
    truth = walk.render()
    out = shipped(
        truth[0],
        truth[-1],
        walk.caption,
        num_frames=4,
        num_inference_steps=4,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    frames = out.frames[0]
    assert frames.shape == (4, 64, 64, 3) and frames[1:-1].std() > 0.05  # pictures, not a flat colour
    start = np.asarray(truth[0], dtype=np.float32) / 255
    assert np.abs(frames[0] - start).mean() < 0.06


def test_eval_video_end_to_end_on_a_reduced_set(monkeypatch, capsys, tmp_path):
    out = tmp_path / "eval.json"
    code, stdout, stderr = invoke_cli(
        monkeypatch,
        capsys,
        "eval-video",
        "--clips",
        1,
        "--frames",
        4,
        "--steps",
        2,
        "--json",
        out,
        "--images",
        tmp_path / "images",
        "--device",
        "cpu",
    )
    assert code == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])  # the last line printed is the JSON
    assert result == json.loads(out.read_text())
    metrics = {
        "trajectory_error",
        "identity_agreement",
        "feature_distance_first",
        "feature_distance_frames",
        "clipsim_first",
        "clipsim_frames",
    }
    arms = ("smp", "smp_finished", "smp_finished_w4", "linear_embedding", "linear_finished_w4", "latent_interpolation")
    arms += ("ground_truth",)
    for arm in arms:
        assert set(result[arm]) == metrics
        assert 0.0 <= result[arm]["identity_agreement"] <= 1.0 and -1.0 <= result[arm]["clipsim_first"] <= 1.0
    assert result["ground_truth"]["trajectory_error"] == 0.0 and result["clips"] == 1
    assert len(list((tmp_path / "images").glob("clip_*.png"))) == 1
