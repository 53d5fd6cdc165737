"""Regional cross-attention: each character's description is read only inside its region."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from storydiffusion import CSAConfig
from storydiffusion.csa import controller as controller_module
from storydiffusion.csa.masks import box_mask
from storydiffusion.csa.regions import RegionalCrossAttnProcessor, region_text_mask, regional_additive_mask
from storydiffusion.pipelines.story_pipeline import Frame, StoryPipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = dict(num_inference_steps=3, height=64, width=64, output_type="np", progress=False)
CHARACTERS = {"Bob": "a man with red hair", "Ann": "a woman with a green hat"}
REGIONS = {"Bob": (0.0, 0.0, 0.5, 1.0), "Ann": (0.5, 0.0, 1.0, 1.0)}


def test_region_text_mask_hides_a_description_outside_its_region():
    regions = {"Bob": box_mask(REGIONS["Bob"], (4, 4)), "Ann": box_mask(REGIONS["Ann"], (4, 4))}
    allowed = region_text_mask(regions, {"Bob": [1, 2], "Ann": [4]}, num_queries=16, num_keys=8)
    left = box_mask(REGIONS["Bob"], (4, 4)).flatten()
    assert torch.equal(allowed[:, 1], left) and torch.equal(allowed[:, 2], left)
    assert torch.equal(allowed[:, 4], ~left)
    assert allowed[:, [0, 3, 5, 6, 7]].all()  # the rest of the prompt is read everywhere


class Controller:
    def __init__(self, regions) -> None:
        self.prompt_regions = regions

    def regional_mask(self, num_queries, num_keys, batch, dtype, device):
        return regional_additive_mask(self.prompt_regions, num_queries, num_keys, batch, dtype).to(device)


def test_the_processor_equals_masked_cross_attention_written_out():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    attn.set_processor(AttnProcessor2_0())
    hidden, text = torch.randn(4, 16, 16), torch.randn(4, 6, 8)  # [uncond x2; cond x2], 4x4 grid, 6 text tokens
    masks = tuple({"Bob": box_mask(REGIONS["Bob"], (4, 4)), "Ann": box_mask(REGIONS["Ann"], (4, 4))} for _ in "ab")
    tokens = ({"Bob": [1], "Ann": [3, 4]}, {"Bob": [2], "Ann": [5]})
    processor = RegionalCrossAttnProcessor("attn2", Controller((masks, tokens)), attn.processor)
    with torch.no_grad():
        ours = processor(attn, hidden, text)
        expected = []
        for row in range(4):
            q = attn.to_q(hidden[row]).unflatten(-1, (2, -1)).transpose(0, 1)
            k = attn.to_k(text[row]).unflatten(-1, (2, -1)).transpose(0, 1)
            v = attn.to_v(text[row]).unflatten(-1, (2, -1)).transpose(0, 1)
            allowed = torch.ones(16, 6, dtype=torch.bool)
            if row >= 2:  # the conditional half
                allowed = region_text_mask(masks[row - 2], tokens[row - 2], 16, 6)
            weights = (q @ k.transpose(-1, -2) * attn.scale).masked_fill(~allowed, float("-inf")).softmax(-1)
            expected.append(attn.to_out[0]((weights @ v).transpose(0, 1).flatten(1)))
    torch.testing.assert_close(ours, torch.stack(expected), atol=1e-5, rtol=1e-4)
    assert torch.equal(ours[:2], attn.processor(attn, hidden, text)[:2])  # the unconditional half: untouched


def test_regional_prompts_change_only_frames_with_regions(sd_pipe, monkeypatch):
    built = []  # the regional mask of a frame is built once per attention shape, not at every call

    def counting(regions, num_queries, num_keys, batch, dtype):
        built.append((id(regions), num_queries, num_keys, batch))
        return regional_additive_mask(regions, num_queries, num_keys, batch, dtype)

    monkeypatch.setattr(controller_module, "regional_additive_mask", counting)
    joint = "a man with red hair and a woman with a green hat dance"
    frames = ["[Bob] at home", "[Ann] at home", Frame(joint, ("Bob", "Ann"), None, REGIONS), "[Bob] on a bus"]
    plain = StoryPipeline(sd_pipe, CSAConfig(rate=0.5))(CHARACTERS, frames, id_length=1, **RUN).images
    regional = StoryPipeline(sd_pipe, CSAConfig(rate=0.5, regional_prompts=True))(
        CHARACTERS, frames, id_length=1, **RUN
    ).images
    for i in (0, 1, 3):
        np.testing.assert_array_equal(regional[i], plain[i])
    assert np.abs(regional[2] - plain[2]).max() > 1e-4
    assert built and len(built) == len(set(built)) < RUN["num_inference_steps"] * 2
    assert not any("Regional" in type(p).__name__ for p in sd_pipe.unet.attn_processors.values())  # removed after
