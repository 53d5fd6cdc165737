"""Long prompts: chunked encoding instead of a silent cut at CLIP's 77-token window."""

import numpy as np
import torch

from storydiffusion.pipelines.prompts import chunk_input_ids, encode_long_prompts, needs_chunking, num_chunks
from storydiffusion.pipelines.story_pipeline import StoryPipeline

SHORT = "a man with red hair reads a book"
LONG = ", ".join(f"detail number {i} of the scene" for i in range(40))  # ~240 tokens


def test_chunks_wrap_every_75_tokens(sd_pipe):
    tokenizer = sd_pipe.tokenizer
    assert num_chunks(tokenizer, SHORT) == 1 and num_chunks(tokenizer, LONG) >= 3
    ids = chunk_input_ids(tokenizer, LONG, num_chunks(tokenizer, LONG))
    assert ids.shape == (num_chunks(tokenizer, LONG), 77)
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    text_ids = [i for row in ids for i in row[1:].tolist() if i not in (tokenizer.eos_token_id, tokenizer.pad_token_id)]
    assert text_ids == tokenizer(LONG, add_special_tokens=False).input_ids  # nothing dropped, order kept
    assert not needs_chunking(sd_pipe, [SHORT]) and needs_chunking(sd_pipe, [SHORT, LONG])


def test_one_chunk_equals_the_pipelines_own_encoding(any_pipe):
    ours = encode_long_prompts(any_pipe, [SHORT], ["blurry"])
    if hasattr(any_pipe, "text_encoder_2"):
        theirs = any_pipe.encode_prompt(SHORT, device="cpu", negative_prompt="blurry")
        names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    else:
        theirs = any_pipe.encode_prompt(SHORT, "cpu", 1, True, negative_prompt="blurry")
        names = ["prompt_embeds", "negative_prompt_embeds"]
    for name, expected in zip(names, theirs):
        torch.testing.assert_close(ours[name], expected)


def test_long_prompt_text_past_77_tokens_changes_the_image(any_pipe):
    story = StoryPipeline(any_pipe)
    run = dict(id_length=1, num_inference_steps=2, height=64, width=64, output_type="np", progress=False)
    base = LONG + ", wearing a red hat"
    other = LONG + ", wearing a blue scarf"
    a = story({}, [base], **run).images[0]
    b = story({}, [other], **run).images[0]
    assert not np.array_equal(a, b)  # the ending, past token 77, reaches the model
    embeds = encode_long_prompts(any_pipe, [base], None)
    assert embeds["prompt_embeds"].shape[1] == 77 * num_chunks(any_pipe.tokenizer, base)
