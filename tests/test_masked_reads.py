"""Several characters in one frame: each character's bank is read only inside its own region."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from storydiffusion import CSAConfig, CSASchedule, IdentityBank
from storydiffusion.csa.attention import ConsistentSelfAttnProcessor, bank_read_mask, consistent_attention
from storydiffusion.csa.bank import BankSettings
from storydiffusion.csa.controller import ConsistentAttention
from storydiffusion.csa.masks import box_mask, grid_shape
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.pipelines.story_pipeline import Frame, StoryPipeline
from storydiffusion.story.format import Story, StoryFormatError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALWAYS = CSAConfig(schedule=CSASchedule.always())
RUN = dict(num_inference_steps=3, height=64, width=64, output_type="np", progress=False)
LAYER = "layer"


def dense_reference(attn, tokens, bank, allowed):
    """Attention written out: every query over its own image's tokens and the bank tokens `allowed` lets it see."""
    halves, images = bank.shape[0], tokens.shape[0] // bank.shape[0]
    out = []
    for h in range(halves):
        for b in range(images):
            x = tokens[h * images + b]  # (N, C)
            keys = torch.cat([x, bank[h]])  # (N + M, C)
            q, k, v = attn.to_q(x), attn.to_k(keys), attn.to_v(keys)
            heads = attn.heads
            q, k, v = (t.unflatten(-1, (heads, -1)).transpose(0, 1) for t in (q, k, v))  # (h, T, d)
            scores = q @ k.transpose(-1, -2) * attn.scale  # (h, N, N + M)
            visible = torch.cat([torch.ones(x.shape[0], x.shape[0], dtype=torch.bool), allowed[b]], dim=-1)
            weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            out.append(attn.to_out[0]((weights @ v).transpose(0, 1).flatten(1)))
    return torch.stack(out)


def test_masked_read_equals_the_dense_formulation():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    tokens, bank = torch.randn(2 * 3, 16, 32), torch.randn(2, 10, 32)  # 2 guidance halves, 3 images
    query_owner = torch.randint(-1, 2, (3, 16))
    bank_owner = torch.tensor([0] * 6 + [1] * 4)
    allowed = bank_read_mask(query_owner, bank_owner)
    with torch.no_grad():
        ours = consistent_attention(attn, tokens, None, bank, allowed)
        torch.testing.assert_close(ours, dense_reference(attn, tokens, bank, allowed), atol=1e-5, rtol=1e-5)
        everything = consistent_attention(attn, tokens, None, bank, torch.ones(3, 16, 10, dtype=torch.bool))
        torch.testing.assert_close(everything, consistent_attention(attn, tokens, None, bank), atol=1e-6, rtol=1e-5)


def test_grid_shape_follows_the_frame_aspect():
    assert grid_shape(64, (8, 8)) == (8, 8)
    assert grid_shape(48, (64, 48)) == (8, 6)
    assert grid_shape(12, (16, 64)) == (2, 6)


def _bank(name: str, seed: int, tokens: int = 8, channels: int = 32) -> IdentityBank:
    settings = BankSettings("", "", "", 1, 64, 64, 1, 1)
    bank = IdentityBank(name, settings, "float32")
    bank.put(0, LAYER, torch.randn(1, tokens, channels, generator=torch.Generator().manual_seed(seed)))
    return bank


def test_each_region_reads_its_own_bank_and_the_background_reads_none():
    """Three characters in one frame: changing Ann's bank changes only the tokens of Ann's region."""
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    hidden = torch.randn(1, 16, 32)  # one image, unguided, a 4x4 token grid
    regions = {"Bob": (0.0, 0.0, 0.5, 0.5), "Ann": (0.5, 0.0, 1.0, 0.5), "Cid": (0.0, 0.5, 0.5, 1.0)}
    masks = [{name: box_mask(box, (4, 4)) for name, box in regions.items()}]

    def run(ann_seed: int) -> torch.Tensor:
        controller = ConsistentAttention(ALWAYS)
        controller._unet = object()  # stand-alone layer: no UNet to install on
        controller.begin_read(1, 1, [_bank("Bob", 1), _bank("Ann", ann_seed), _bank("Cid", 3)], masks)
        processor = ConsistentSelfAttnProcessor(LAYER, 1, 0.5, controller, AttnProcessor2_0())
        with torch.no_grad():
            return processor(attn, hidden)[0]

    first, other = run(2), run(20)
    ann = masks[0]["Ann"].flatten()
    background = ~torch.stack([m.flatten() for m in masks[0].values()]).any(0)
    assert not torch.allclose(first[ann], other[ann])
    torch.testing.assert_close(first[~ann], other[~ann])
    with torch.no_grad():
        plain = AttnProcessor2_0()(attn, hidden)[0]
    torch.testing.assert_close(first[background], plain[background], atol=1e-6, rtol=1e-5)


STORY = {"Bob": "a man with red hair", "Ann": "a woman with a green hat", "Cid": "a boy with a cap"}
SOLO = ["[Bob] at home", "[Bob] on a bus", "[Ann] reads", "[Ann] in the rain", "[Cid] runs", "[Cid] jumps"]


def _frames(last: Frame) -> list:
    return [*SOLO, last]


def test_three_characters_in_one_frame_with_regions(any_pipe):
    story = StoryPipeline(any_pipe, ALWAYS)
    prompt = "a man with red hair, a woman with a green hat and a boy with a cap dance"
    names = ("Bob", "Ann", "Cid")
    thirds = {"Bob": (0.0, 0.0, 1 / 3, 1.0), "Ann": (1 / 3, 0.0, 2 / 3, 1.0), "Cid": (2 / 3, 0.0, 1.0, 1.0)}
    masked = story(STORY, _frames(Frame(prompt, names, regions=thirds)), id_length=2, **RUN)
    unmasked = story(STORY, _frames(Frame(prompt, names)), id_length=2, **RUN)
    off = StoryPipeline(any_pipe, CSAConfig(rate=0.0))(STORY, _frames(Frame(prompt, names)), id_length=2, **RUN)
    assert np.isfinite(masked.images[6]).all()
    assert not np.allclose(masked.images[6], unmasked.images[6])
    assert not np.allclose(masked.images[6], off.images[6])  # the banks are still read, inside the regions
    for i in range(6):  # the reference frames are not touched by a later frame's regions
        np.testing.assert_array_equal(masked.images[i], unmasked.images[i])


def test_a_region_over_the_whole_frame_reads_like_no_region(sd_pipe):
    story = StoryPipeline(sd_pipe, ALWAYS)
    frames = ["[Bob] at home", "[Bob] on a bus"]
    whole = story(STORY, [*frames, Frame("a man with red hair sleeps", ("Bob",), regions={"Bob": (0, 0, 1, 1)})],
                  id_length=2, **RUN)  # fmt: skip
    none = story(STORY, [*frames, Frame("a man with red hair sleeps", ("Bob",))], id_length=2, **RUN)
    np.testing.assert_allclose(whole.images[2], none.images[2], atol=1e-5)


def test_regions_are_checked_in_the_api(sd_pipe):
    story = StoryPipeline(sd_pipe)
    bad = Frame("a man dances", ("Bob",), regions={"Bob": (0.5, 0, 0.2, 1)})
    with pytest.raises(StoryDiffusionError, match="frame 2 .*outside the frame or empty"):
        story(STORY, ["[Bob] at home", "[Bob] on a bus", bad], id_length=2, **RUN)


def _story_with(regions) -> dict:
    return {
        "characters": {"Bob": "a man", "Ann": "a woman"},
        "frames": [*SOLO[:4], {"prompt": "[Bob] and [Ann] dance", "regions": regions}],
        "id_length": 2,
    }


def test_regions_in_the_story_file():
    story = Story.from_dict(_story_with({"Bob": [0, 0, 0.5, 1], "Ann": [0.5, 0, 1, 1]}), source="s.yaml")
    frame = story.to_frames()[4]
    assert frame.regions == {"Bob": (0.0, 0.0, 0.5, 1.0), "Ann": (0.5, 0.0, 1.0, 1.0)}
    assert story.to_frames()[0].regions is None


@pytest.mark.parametrize(
    "regions, message",
    [
        ({"Bob": [0, 0, 1.5, 1], "Ann": [0.5, 0, 1, 1]}, "outside the frame"),
        ({"Bob": [0, 0, 0.5], "Ann": [0.5, 0, 1, 1]}, r"\[x0, y0, x1, y1\]"),
        ({"Bob": [0, 0, 0.5, 1], "Zed": [0.5, 0, 1, 1]}, r"region for \[Zed\], whom the frame does not name"),
        ({"Bob": [0, 0, 0.5, 1]}, r"no region for \[Ann\]"),
        ([0, 0, 1, 1], "regions must map"),
    ],
)
def test_bad_regions_name_the_frame_and_field(regions, message):
    with pytest.raises(StoryFormatError, match=message) as caught:
        Story.from_dict(_story_with(regions), source="s.yaml")
    assert caught.value.field == "frames[4].regions" and caught.value.source == "s.yaml"


# -- inferred masks --------------------------------------------------------------------------------
def test_subject_maps_split_the_frame_where_each_description_is_looked_at():
    from storydiffusion.csa.subjects import SubjectMaps

    maps = SubjectMaps([{"Bob": [1, 2], "Ann": [3]}], frame_shape=(8, 8))
    left = torch.zeros(8, 8)
    left[:, :4] = 1.0
    probs = torch.full((1, 64, 6), 0.05)
    probs[0, :, 1] += 0.4 * left.flatten()  # Bob's tokens looked at from the left half
    probs[0, :, 3] += 0.4 * (1 - left).flatten()  # Ann's from the right half
    maps.add(probs[:, ::4][:, :16])  # a coarser layer (4x4) first, then the fine one
    maps.add(probs)
    masks = maps.masks(dilation=0)[0]
    assert masks["Bob"][:, :3].all() and not masks["Bob"][:, 5:].any()
    assert masks["Ann"][:, 5:].all() and not (masks["Bob"] & masks["Ann"]).any()


def test_phrase_positions_point_at_the_description_tokens(sd_pipe):
    from storydiffusion.pipelines.prompts import phrase_positions

    tokenizer = sd_pipe.tokenizer
    text = "a man with red hair and a woman with a green hat dance"
    ids = tokenizer(text).input_ids
    for phrase in ("a man with red hair", "a woman with a green hat"):
        positions = phrase_positions(tokenizer, text, phrase)
        assert tokenizer.decode([ids[p] for p in positions]) == phrase
    assert phrase_positions(tokenizer, text, "a dragon") == []


def test_two_character_frame_infers_its_masks(any_pipe):
    processors = dict(any_pipe.unet.attn_processors)
    chars = {"Bob": "a man with red hair", "Ann": "a woman with a green hat"}
    frames = [*SOLO[:4], "[Bob] and [Ann] dance"]
    infer = StoryPipeline(any_pipe, ALWAYS)(chars, frames, id_length=2, **RUN)
    off = StoryPipeline(any_pipe, CSAConfig(schedule=CSASchedule.always(), subject_masks="off"))
    blended = off(chars, frames, id_length=2, **RUN)
    plain = StoryPipeline(any_pipe, CSAConfig(rate=0.0))(chars, frames, id_length=2, **RUN)
    assert not np.allclose(infer.images[4], blended.images[4])
    assert not np.allclose(infer.images[4], plain.images[4])  # the masks let some tokens read their bank
    for i in range(4):
        np.testing.assert_array_equal(infer.images[i], blended.images[i])
    assert {k: type(p) for k, p in any_pipe.unet.attn_processors.items()} == {
        k: type(p) for k, p in processors.items()
    }  # the recorders are gone after the call


# -- subject-only sharing --------------------------------------------------------------------------
def test_subject_only_lends_tokens_from_inside_the_masks():
    controller = ConsistentAttention(CSAConfig(subject_only=True))
    controller.mode, controller.num_steps, controller.images_per_call = "mutual", 4, 2
    controller.generator = torch.Generator().manual_seed(0)
    controller.subject_maps = object()  # masks are set by hand below instead of inferred
    controller.read_masks = ({}, {})  # as `_start_subject_maps` leaves them: no maps yet
    assert controller.mutual_indices(2, 16, 0.5) is None  # no mask yet: nothing is lent
    left = {"Bob": box_mask((0.0, 0.0, 0.5, 1.0), (4, 4))}
    top = {"Bob": box_mask((0.0, 0.0, 1.0, 0.25), (4, 4))}
    controller.read_masks = (left, top)
    indices = controller.mutual_indices(2, 16, 0.5)
    assert indices.shape == (2, 2)  # half of the smaller mask (4 tokens)
    assert all(left["Bob"].flatten()[i] for i in indices[0]) and all(top["Bob"].flatten()[i] for i in indices[1])


def test_subject_only_story_keeps_a_smaller_bank(sd_pipe):
    frames = ["[Bob] at home", "[Bob] on a bus", "[Bob] sleeps"]
    chars = {"Bob": "a man with red hair"}
    everything = StoryPipeline(sd_pipe, ALWAYS)(chars, frames, id_length=2, **RUN)
    subject = StoryPipeline(sd_pipe, CSAConfig(schedule=CSASchedule.always(), subject_only=True))
    only = subject(chars, frames, id_length=2, **RUN)
    plain = StoryPipeline(sd_pipe, CSAConfig(rate=0.0))(chars, frames, id_length=2, **RUN)
    assert 0 < only.banks["Bob"].nbytes < everything.banks["Bob"].nbytes
    assert not np.allclose(only.images[2], plain.images[2])  # its frames still read the (smaller) bank
    with pytest.raises(StoryDiffusionError, match="does not contain"):
        subject(chars, [Frame("someone at home", ("Bob",)), *frames[1:]], id_length=2, **RUN)
