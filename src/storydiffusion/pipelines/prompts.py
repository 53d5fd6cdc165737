"""Prompts longer than CLIP's 77-token window, encoded in chunks instead of silently cut.

diffusers' SD/SDXL pipelines truncate a prompt at the text encoder's window (77 tokens, 75 of
text). Style templates plus character descriptions pass that easily. When any prompt of a
pipeline call is longer, we encode every prompt of the call as consecutive 75-token chunks, each
wrapped in its own start/end tokens and encoded separately, and hand the concatenated embeddings
to the pipeline (`prompt_embeds=`), as long-prompt-weighting pipelines do. Cross-attention takes
any sequence length. SDXL's pooled embedding comes from the first chunk. Calls whose prompts all
fit are left to the pipeline's own encoder, so they stay bit-identical to plain diffusers.
"""

from __future__ import annotations

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


def _encode(
    encoder: Any, ids: torch.Tensor, penultimate: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunks (k, 77) -> embeddings (1, k*77, D) and the first chunk's pooled output (1, P) if any."""
    output = encoder(ids.to(device), output_hidden_states=penultimate)
    hidden = output.hidden_states[-2] if penultimate else output[0]  # (k, 77, D)
    pooled = output[0][:1] if output[0].ndim == 2 else None  # CLIPTextModelWithProjection's text_embeds
    return hidden.reshape(1, -1, hidden.shape[-1]), pooled


def needs_chunking(pipe: Any, texts: Sequence[str]) -> bool:
    """True if any text is longer than the window of any of the pipeline's tokenizers."""
    tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]
    return any(num_chunks(tok, text) > 1 for tok in tokenizers for text in texts if text)


@torch.no_grad()
def encode_long_prompts(
    pipe: Any, prompts: Sequence[str], negative_prompts: Sequence[str] | None
) -> dict[str, torch.Tensor]:
    """Chunked embeddings for one call of an SD/SDXL pipeline, as its `*_embeds` keyword arguments.

    Every prompt and negative prompt gets the same number of chunks (the longest text's), so the
    batch stacks. A missing negative on SDXL with `force_zeros_for_empty_prompt` becomes zeros, as
    the pipeline itself would do.
    """
    device = pipe._execution_device
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    pairs = [(pipe.tokenizer, pipe.text_encoder)] if pipe.text_encoder is not None else []
    if sdxl:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    texts = [*prompts, *(negative_prompts or [])]
    chunks = max(num_chunks(tok, text) for tok, _ in pairs for text in texts)

    def encode_all(batch: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds, pooled = [], []
        for text in batch:
            per_encoder = [_encode(enc, chunk_input_ids(tok, text, chunks), sdxl, device) for tok, enc in pairs]
            embeds.append(torch.cat([e for e, _ in per_encoder], dim=-1))  # SDXL: 768 + 1280 features
            pooled.append(per_encoder[-1][1])
        return torch.cat(embeds), (torch.cat(pooled) if sdxl else None)

    dtype = (pipe.text_encoder_2 if sdxl else pipe.text_encoder).dtype
    prompt_embeds, pooled = encode_all(prompts)
    kwargs = {"prompt_embeds": prompt_embeds.to(dtype)}
    if negative_prompts is None and sdxl and pipe.config.force_zeros_for_empty_prompt:
        negative_embeds, negative_pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
    else:
        negative_embeds, negative_pooled = encode_all(negative_prompts or [""] * len(prompts))
    kwargs["negative_prompt_embeds"] = negative_embeds.to(dtype)
    if sdxl:
        kwargs["pooled_prompt_embeds"] = pooled.to(dtype)
        kwargs["negative_pooled_prompt_embeds"] = negative_pooled.to(dtype)
    return kwargs
