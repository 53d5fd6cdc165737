"""Prompts longer than CLIP's 77-token window, encoded in chunks instead of silently cut.

diffusers' SD/SDXL pipelines truncate a prompt at the text encoder's window (77 tokens, 75 of
text). Style templates plus character descriptions pass that easily. A long text is encoded as
consecutive 75-token chunks, each wrapped in its own start/end tokens and encoded separately, and the
concatenated embeddings go to the pipeline (`prompt_embeds=`), as long-prompt-weighting pipelines do;
cross-attention takes any sequence length. SDXL's pooled embedding comes from the first chunk.

A frame's embedding never depends on which frames share its pipeline call:

- each frame (its prompt and negative prompt) is encoded on its own: by the pipeline's own
  `encode_prompt` when both fit the window, by chunks otherwise;
- a call's frames must stack to one length, so every embedding is *tiled* (repeated whole) to the least
  common multiple of the call's chunk counts. Attention over keys repeated n times is the same
  attention (each copy gets 1/n of the weight), so tiling changes no frame, where padding with empty
  chunks would.

Calls whose prompts all fit (and whose negatives are all empty or all given) are left to the
pipeline's own encoder, so they stay bit-identical to plain diffusers. `clip_skip` and the LoRA
text-encoder scale (`cross_attention_kwargs={"scale": ...}`) are honoured on both paths, as the
pipeline's `encode_prompt` honours them (clip_skip on the prompt, not on the negative).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def text_window(tokenizer: Any) -> int:
    """Text tokens per chunk: the model's window minus the start and end tokens."""
    return tokenizer.model_max_length - 2


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """The text's token ids, without special tokens and without truncation."""
    return tokenizer(text, add_special_tokens=False, truncation=False).input_ids


def num_chunks(tokenizer: Any, text: str) -> int:
    return max(1, -(-len(token_ids(tokenizer, text)) // text_window(tokenizer)))


def chunk_input_ids(tokenizer: Any, text: str, chunks: int) -> torch.Tensor:
    """(chunks, model_max_length) ids: [start] 75 text tokens [end] [pad...], empty chunks padded."""
    ids, window = token_ids(tokenizer, text), text_window(tokenizer)
    rows = []
    for c in range(chunks):
        piece = [tokenizer.bos_token_id, *ids[c * window : (c + 1) * window], tokenizer.eos_token_id]
        rows.append(piece + [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(piece)))
    return torch.tensor(rows)


def phrase_positions(tokenizer: Any, text: str, phrase: str) -> list[int]:
    """Where `phrase`'s tokens sit in `text`'s encoder sequence (after the start token; a chunked text's
    windows each start with their own), for reading cross-attention to them; [] when `text` lacks it."""
    at = text.find(phrase) if phrase else -1
    if at < 0:
        return []
    before, count = len(token_ids(tokenizer, text[:at])), len(token_ids(tokenizer, phrase))
    window, width = text_window(tokenizer), tokenizer.model_max_length
    return [(p // window) * width + 1 + p % window for p in range(before, before + count)]


def sequence_phrase_positions(tokenizer: Any, text: str, phrase: str, offset: int = 0) -> list[int]:
    """Where `phrase`'s tokens sit in `text`'s one-window encoder sequence (a T5 prompt of Flux or SD3, which
    takes the whole prompt), shifted by `offset` (SD3's T5 tokens follow its 77 CLIP tokens); [] when absent."""
    at = text.find(phrase) if phrase else -1
    if at < 0:
        return []
    lead = 0  # start tokens the tokenizer puts before the text (T5: none; a CLIP tokenizer standing in: one)
    full = tokenizer(text, add_special_tokens=True).input_ids
    while lead < len(full) and full[lead] in set(tokenizer.all_special_ids):
        lead += 1
    before, count = len(token_ids(tokenizer, text[:at])), len(token_ids(tokenizer, phrase))
    return [offset + lead + p for p in range(before, before + count)]


def _tokenizers(pipe: Any) -> list[Any]:
    return [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]


def _is_sdxl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def text_chunks(pipe: Any, text: str) -> int:
    """Chunks `text` needs: the most any of the pipeline's tokenizers needs."""
    return max(num_chunks(tok, text) for tok in _tokenizers(pipe)) if text else 1


def needs_chunking(pipe: Any, texts: Sequence[str]) -> bool:
    """True if any text is longer than the window of any of the pipeline's tokenizers."""
    return any(text_chunks(pipe, text) > 1 for text in texts if text)


def needs_own_encoding(
    pipe: Any, prompts: Sequence[str], negatives: Sequence[str], clip_skip: int | None = None
) -> bool:
    """Whether a call must be encoded frame by frame (`encode_frames`) so that no frame depends on the others:
    a text longer than the window, or some frames with a negative prompt and some without (SDXL zeroes an
    absent negative, which the pipeline can only do for the whole call), or a clip_skip the pipeline's own
    encoder cannot apply."""
    mixed_negatives = len({bool(n) for n in negatives}) > 1
    return needs_chunking(pipe, [*prompts, *negatives]) or mixed_negatives or not _pipeline_encodes(pipe, clip_skip)


def tile(embeds: torch.Tensor, length: int) -> torch.Tensor:
    """(1, T, D) -> (1, length, D) by repeating the whole sequence (length a multiple of T): the same attention."""
    repeats, rest = divmod(length, embeds.shape[1])
    if rest:
        raise ValueError(f"cannot tile {embeds.shape[1]} tokens to {length}")
    return embeds.repeat(1, repeats, 1)


def _final_layer_norm(encoder: Any) -> Any:
    """The text encoder's final layer norm (transformers 5 flattened `CLIPTextModel.text_model` away)."""
    return getattr(encoder, "text_model", encoder).final_layer_norm


def _pipeline_encodes(pipe: Any, clip_skip: int | None) -> bool:
    """Whether the pipeline's own `encode_prompt` can encode a fitting frame: it exists, and its SD1.5 clip_skip
    path (which reads `text_encoder.text_model`, gone in transformers 5) works with this text encoder."""
    if not hasattr(pipe, "encode_prompt"):
        return False
    return clip_skip is None or _is_sdxl(pipe) or hasattr(pipe.text_encoder, "text_model")


def _encode_chunks(
    encoder: Any, ids: torch.Tensor, sdxl: bool, clip_skip: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunks (k, 77) -> embeddings (1, k*77, D) and the first chunk's pooled output (1, P) if any; the
    hidden layer the pipeline's `encode_prompt` takes (SDXL: penultimate, or clip_skip + 2 from the end;
    SD: the last after the final layer norm, or clip_skip + 1 from the end through it)."""
    if sdxl:
        output = encoder(ids.to(device), output_hidden_states=True)
        hidden = output.hidden_states[-(clip_skip + 2) if clip_skip is not None else -2]
    elif clip_skip is None:
        output = encoder(ids.to(device))
        hidden = output[0]
    else:
        output = encoder(ids.to(device), output_hidden_states=True)
        hidden = _final_layer_norm(encoder)(output.hidden_states[-(clip_skip + 1)])
    pooled = output[0][:1] if output[0].ndim == 2 else None  # CLIPTextModelWithProjection's text_embeds
    return hidden.reshape(1, -1, hidden.shape[-1]), pooled  # (1, k*77, D)


def _chunked(pipe: Any, text: str, chunks: int, clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One text's chunked embeddings (1, chunks*77, D) and pooled embedding (SDXL)."""
    device, sdxl = pipe._execution_device, _is_sdxl(pipe)
    pairs = [(pipe.tokenizer, pipe.text_encoder)] if pipe.text_encoder is not None else []
    if sdxl:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    per_encoder = [
        _encode_chunks(enc, chunk_input_ids(tok, text, chunks), sdxl, clip_skip, device) for tok, enc in pairs
    ]
    embeds = torch.cat([e for e, _ in per_encoder], dim=-1)  # SDXL: 768 + 1280 features
    return embeds, per_encoder[-1][1]


def _encode_frame(
    pipe: Any, prompt: str, negative: str, clip_skip: int | None, lora_scale: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled) of one frame, each (1, ...)."""
    sdxl = _is_sdxl(pipe)
    device = pipe._execution_device
    fits = text_chunks(pipe, prompt) == 1 and text_chunks(pipe, negative) == 1
    if fits and _pipeline_encodes(pipe, clip_skip):  # the pipeline's own encoding
        if sdxl:
            return pipe.encode_prompt(
                prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                negative_prompt=negative or None, lora_scale=lora_scale, clip_skip=clip_skip,
            )  # fmt: skip
        embeds, negative_embeds = pipe.encode_prompt(
            prompt, device, 1, True, negative_prompt=negative or None, lora_scale=lora_scale, clip_skip=clip_skip
        )
        return embeds, negative_embeds, None, None
    from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

    encoders = [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e]
    scaled = lora_scale is not None and USE_PEFT_BACKEND
    for encoder in encoders if scaled else ():
        scale_lora_layers(encoder, lora_scale)
    try:
        embeds, pooled = _chunked(pipe, prompt, text_chunks(pipe, prompt), clip_skip)
        if not negative and sdxl and pipe.config.force_zeros_for_empty_prompt:
            negative_embeds, negative_pooled = torch.zeros_like(embeds[:, :77]), torch.zeros_like(pooled)
        else:  # the pipeline applies clip_skip to the prompt only
            negative_embeds, negative_pooled = _chunked(pipe, negative, text_chunks(pipe, negative), None)
    finally:
        for encoder in encoders if scaled else ():
            unscale_lora_layers(encoder, lora_scale)
    return embeds, negative_embeds, pooled, negative_pooled


@torch.no_grad()
def encode_frames(
    pipe: Any,
    prompts: Sequence[str],
    negative_prompts: Sequence[str],
    clip_skip: int | None = None,
    lora_scale: float | None = None,
) -> dict[str, torch.Tensor]:
    """The embeddings of one call of an SD/SDXL pipeline, as its `*_embeds` keyword arguments: every frame
    encoded on its own (`_encode_frame`), then tiled to one length (see the module doc)."""
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts and {len(negative_prompts)} negative prompts")
    frames = [_encode_frame(pipe, p, n, clip_skip, lora_scale) for p, n in zip(prompts, negative_prompts)]
    length = math.lcm(*(e.shape[1] for frame in frames for e in frame[:2]))
    dtype = (pipe.text_encoder_2 if _is_sdxl(pipe) else pipe.text_encoder).dtype
    kwargs = {
        "prompt_embeds": torch.cat([tile(f[0], length) for f in frames]).to(dtype),
        "negative_prompt_embeds": torch.cat([tile(f[1], length) for f in frames]).to(dtype),
    }
    if _is_sdxl(pipe):
        kwargs["pooled_prompt_embeds"] = torch.cat([f[2] for f in frames]).to(dtype)
        kwargs["negative_pooled_prompt_embeds"] = torch.cat([f[3] for f in frames]).to(dtype)
    return kwargs


def encode_long_prompts(
    pipe: Any, prompts: Sequence[str], negative_prompts: Sequence[str] | None
) -> dict[str, torch.Tensor]:
    """`encode_frames` with negatives optional (None: every negative empty)."""
    return encode_frames(pipe, prompts, negative_prompts or [""] * len(prompts))
