"""Consistent Self-Attention on joint attention: DiT models (Flux.1's double- and single-stream blocks,
SD3/3.5's joint blocks).

A DiT block attends over one sequence per image, its text and image tokens together (`[text ; image]` in
Flux, `[image ; text]` in SD3). CSA lends *image* tokens only: in the reference phase each image's keys
and values are extended with a sampled share of the other reference images' image tokens; in the frame
phase with the character's bank (the sampled tokens' hidden states, projected at read time). Text tokens
are never borrowed. Two choices public methods make differently are options:

- `positions` (Flux's rotary embedding; SD3 has none): where a borrowed key sits. "source" keeps the
  rotation of the place it came from (the plain CSA reading; every image of one size shares one position
  grid, so this is also "the same place in the borrowing image"; a bank keeps each token's place among the
  image tokens, and a read rotates it as the image token at that place in the reading call, whatever its
  text length); "none" borrows the key before its rotation, so it matches by content alone (the public Flux
  ports that drop positions for borrowed tokens). CharaConsist's re-positioning to *matched* points needs
  point matching and is not built.
- `text_sees_borrowed`: whether text queries may attend to borrowed keys. False (CharaConsist's choice,
  the default) leaves every text token's attention exactly as without CSA: text queries then attend over
  their own sequence in a call of their own, so no mask is needed and every attention backend works.

Attention goes through diffusers' `dispatch_attention_fn` with the processor's backend and parallel config
(`set_attention_backend`, `enable_parallelism`), and never with a mask, which flash and sage backends refuse:
reads limited by character masks make one call per group of image queries that see the same bank tokens.
SD3.5's second, image-only attention (`attn2` of its dual-attention blocks) is left plain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from storydiffusion.csa.attention import (
    WrappingProcessor,
    borrow_from_others,
    gather_tokens,
    split_guidance,
)
from storydiffusion.errors import StoryDiffusionError

POSITIONS = ("source", "none")
LAYOUTS = ("flux", "sd3")  # text first (Flux) or image first (SD3) in the joint sequence


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """(B, S, H, D) attention through diffusers' dispatcher, without a mask (flash and sage backends refuse
    one), with the processor's backend (None: the active one) and parallel config."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(query, key, value, backend=dispatch.backend, parallel_config=dispatch.parallel_config)


@dataclass(frozen=True)
class Dispatch:
    """How a processor's attention calls go to `dispatch_attention_fn`: its backend and parallel config."""

    backend: Any = None
    parallel_config: Any = None


def image_span(sequence: int, text_tokens: int, text_first: bool = True) -> slice:
    """Where a joint sequence's image tokens are."""
    return slice(text_tokens, sequence) if text_first else slice(0, sequence - text_tokens)


def _extended_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    extra_key: torch.Tensor,
    extra_value: torch.Tensor,
    image: slice,
    text_sees_borrowed: bool,
    image_mask: torch.Tensor | None = None,
    dispatch: Dispatch = Dispatch(),
) -> torch.Tensor:
    """Joint attention whose image queries (and text queries, if allowed) also see `extra_*` (B, E, H, D).
    `image_mask` (images, N, E) bool, the same for every guidance half of the batch (B = halves * images):
    which extra keys each image query may see (None: all)."""
    full_key, full_value = torch.cat([key, extra_key], dim=1), torch.cat([value, extra_value], dim=1)
    if text_sees_borrowed and image_mask is None:
        return _attend(query, full_key, full_value, dispatch)
    sequence = key.shape[1]
    out = torch.empty_like(query)
    if image_mask is None:
        out[:, image] = _attend(query[:, image], full_key, full_value, dispatch)
    else:
        out[:, image] = _masked_image_attention(
            query[:, image], key, value, extra_key, extra_value, image_mask, dispatch
        )
    text = torch.ones(sequence, dtype=torch.bool, device=query.device)
    text[image] = False
    if text.any():
        keys, values = (full_key, full_value) if text_sees_borrowed else (key, value)
        out[:, text] = _attend(query[:, text], keys, values, dispatch)
    return out


def _query_groups(mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The queries of one image that see the same extra keys, as (query indices, extra key indices) per group;
    `mask` (N, E) bool. A pass over the rows left per group: a frame's few characters make few groups, where
    sorting the rows (`torch.unique(dim=0)`) would cost a sort of all N rows of E keys at every call."""
    groups = []
    left = torch.arange(mask.shape[0], device=mask.device)
    while left.numel():
        pattern = mask[left[0]]
        same = (mask[left] == pattern).all(dim=1)
        groups.append((left[same], pattern.nonzero().squeeze(1)))
        left = left[~same]
    return groups


def _masked_image_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    extra_key: torch.Tensor,
    extra_value: torch.Tensor,
    image_mask: torch.Tensor,
    dispatch: Dispatch,
) -> torch.Tensor:
    """Image queries (B, N, H, D) over their own sequence's keys (B, S, H, D) and the extra keys (B, E, H, D)
    `image_mask` (images, N, E) lets each see: one unmasked call per image and group of its queries seeing the
    same extra keys (one group per character's region and one for the background, which sees none), batched
    over the guidance halves. Equal to the masked softmax, on every backend."""
    images = image_mask.shape[0]
    halves = query.shape[0] // images
    out = torch.empty_like(query)
    for image in range(images):
        rows = torch.arange(halves, device=query.device) * images + image  # this image in every guidance half
        for queries, seen in _query_groups(image_mask[image]):
            keys = torch.cat([key[rows], extra_key[rows][:, seen]], dim=1)
            values = torch.cat([value[rows], extra_value[rows][:, seen]], dim=1)
            out[rows[:, None], queries] = _attend(query[rows][:, queries], keys, values, dispatch)
    return out


def joint_consistent_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    text_tokens: int,
    indices: torch.Tensor,
    halves: int = 1,
    unrotated_key: torch.Tensor | None = None,
    text_sees_borrowed: bool = False,
    text_first: bool = True,
    dispatch: Dispatch = Dispatch(),
) -> torch.Tensor:
    """Mutual-phase joint attention: query/key/value (halves*B, S, H, D), S = text_tokens + N image tokens,
    rotary already applied; indices (B, k) image-token positions each image lends to the others of its
    guidance half. `unrotated_key` (halves*B, S, H, D): borrow keys without their rotation ("none").
    Returns (halves*B, S, H, D)."""
    image = image_span(key.shape[1], text_tokens, text_first)
    lent_key = (key if unrotated_key is None else unrotated_key)[:, image]  # (halves*B, N, H, D)
    heads, dim = key.shape[2], key.shape[3]
    borrowed_key, borrowed_value = (
        borrow_from_others(gather_tokens(split_guidance(t.flatten(2), halves), indices))
        .flatten(0, 1)
        .unflatten(-1, (heads, dim))
        for t in (lent_key, value[:, image])
    )  # (halves*B, (B-1)*k, H, D) each
    return _extended_attention(
        query, key, value, borrowed_key, borrowed_value, image, text_sees_borrowed, dispatch=dispatch
    )


def joint_bank_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    text_tokens: int,
    bank_key: torch.Tensor,
    bank_value: torch.Tensor,
    read_mask: torch.Tensor | None = None,
    text_sees_borrowed: bool = False,
    text_first: bool = True,
    dispatch: Dispatch = Dispatch(),
) -> torch.Tensor:
    """Frame-phase joint attention: every image of a guidance half also sees the bank's keys/values of that
    half, bank_key/bank_value (halves, M, H, D); `read_mask` (B, N, M) bool limits which bank tokens each
    image query reads (each character's inside its mask, `bank_read_mask`). Returns (halves*B, S, H, D)."""
    halves = bank_key.shape[0]
    images = query.shape[0] // halves
    extra_key, extra_value = (t.repeat_interleave(images, dim=0) for t in (bank_key, bank_value))
    image = image_span(key.shape[1], text_tokens, text_first)
    return _extended_attention(
        query, key, value, extra_key, extra_value, image, text_sees_borrowed, read_mask, dispatch
    )


class _ForwardedSetting:
    """A processor attribute diffusers sets on every attention processor (`_attention_backend` by
    `set_attention_backend`, `_parallel_config` by `enable_parallelism`), passed on to the replaced processor so
    its plain calls follow it too; kept here when the replaced processor has no such attribute."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, processor: Any, owner: type | None = None) -> Any:
        if processor is None:
            return self
        if hasattr(processor.original, self.name):
            return getattr(processor.original, self.name)
        return processor.__dict__.get(self.name)

    def __set__(self, processor: Any, value: Any) -> None:
        if hasattr(processor.original, self.name):
            setattr(processor.original, self.name, value)
        else:
            processor.__dict__[self.name] = value


def rotate_at(key: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """Keys (..., M, H, D) rotated as the joint sequence's tokens at `positions` (M,) are (Flux's RoPE)."""
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = rotary
    index = positions.to(cos.device)
    return apply_rotary_emb(key, (cos[index], sin[index]), sequence_dim=1)


class JointConsistentAttnProcessor(WrappingProcessor):
    """CSA for one joint-attention module: `FluxAttention` (double- or single-stream block) or SD3's
    `Attention` with `JointAttnProcessor2_0`.

    Settings only, like `ConsistentSelfAttnProcessor`: the controller says whether this call runs CSA,
    how many guidance halves the batch holds, draws the token indices and holds the banks; the text length
    of a single-stream block's joint sequence comes from the controller (`text_tokens`), since the block
    hands the processor `[text ; image]` as one sequence. Every other call goes to the replaced processor.
    """

    default_layout = "flux"  # without `layout=`
    _attention_backend = _ForwardedSetting()
    _parallel_config = _ForwardedSetting()

    def __init__(
        self,
        name: str,
        rate: float,
        controller: Any,
        original: Any,
        positions: str = "source",
        text_sees_borrowed: bool = False,
        layout: str | None = None,
    ) -> None:
        super().__init__(original)
        layout = layout or self.default_layout
        if positions not in POSITIONS:
            raise StoryDiffusionError(f"positions={positions!r} is not one of {POSITIONS}")
        if layout not in LAYOUTS:
            raise StoryDiffusionError(f"layout={layout!r} is not one of {LAYOUTS}")
        self.name, self.rate, self.controller = name, rate, controller
        self.positions, self.text_sees_borrowed, self.layout = positions, text_sees_borrowed, layout

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, rate={self.rate}, layout={self.layout!r}, "
            f"positions={self.positions!r})"
        )

    def _original(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, **kwargs):
        if self.layout == "flux":
            kwargs["image_rotary_emb"] = rotary
        return self.call_original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        **kwargs: Any,
    ) -> Any:
        ctrl = self.controller
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        double = encoder_hidden_states is not None
        if not double and self.layout == "sd3":
            return self._original(*args, **kwargs)  # SD3.5's image-only attn2: left plain
        text_first = self.layout == "flux"
        text_tokens = encoder_hidden_states.shape[1] if double else ctrl.text_tokens
        # subject masks being inferred: the maps come from the image-to-text attention of the conditional half
        maps = ctrl.recording_maps() if attention_mask is None else None
        if attention_mask is not None or ctrl.mode not in ("mutual", "read", "record") or not ctrl.wants_csa(self.name):
            return self._plain(args, kwargs, maps, text_tokens)
        batch, sequence = hidden_states.shape[0], hidden_states.shape[1] + (text_tokens if double else 0)
        halves = ctrl.guidance_halves(batch)
        images, num_image_tokens = batch // halves, sequence - text_tokens
        image = image_span(sequence, text_tokens, text_first)
        dispatch = Dispatch(self._attention_backend, self._parallel_config)

        if ctrl.mode in ("mutual", "record"):  # record: a picture lends its tokens and reads nobody's
            own = hidden_states if double else hidden_states[:, image]  # (halves*B, N, C) entering attention
            indices = ctrl.mutual_indices(images, num_image_tokens, self.rate)
            if indices is None:
                return self._plain(args, kwargs, maps, text_tokens)
            indices = indices.to(hidden_states.device)
            if ctrl.writes:
                per_half = split_guidance(own, halves)
                # Flux rotates keys by position: the bank keeps each stored token's place among the image tokens
                positions = None if image_rotary_emb is None else indices.flatten().to(torch.int32)
                ctrl.write(self.name, gather_tokens(per_half, indices).flatten(1, 2), positions=positions)
            if images < 2 or ctrl.mode == "record":
                return self._plain(args, kwargs, maps, text_tokens)
            query, key, value, unrotated = self._projections(
                attn, hidden_states, encoder_hidden_states, image_rotary_emb
            )
            out = joint_consistent_attention(
                query, key, value, text_tokens, indices, halves, unrotated, self.text_sees_borrowed, text_first,
                dispatch,
            )  # fmt: skip
        else:
            bank_tokens = ctrl.read(self.name, halves, hidden_states.dtype, hidden_states.device)  # (halves, M, C)
            if bank_tokens is None:
                return self._plain(args, kwargs, maps, text_tokens)
            bank_positions = ctrl.read_positions(self.name) if image_rotary_emb is not None else None
            query, key, value, _ = self._projections(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
            bank_key, bank_value = self._bank_projections(
                attn, bank_tokens, bank_positions, image_rotary_emb, num_image_tokens, text_tokens if text_first else 0
            )
            read_mask = ctrl.read_mask(self.name, num_image_tokens, hidden_states.device)
            out = joint_bank_attention(
                query, key, value, text_tokens, bank_key, bank_value, read_mask, self.text_sees_borrowed, text_first,
                dispatch,
            )  # fmt: skip
        if maps is not None:  # from the projections just made (the conditional half is the last `images` rows)
            self._record_maps(maps, query[-ctrl.images_per_call :], key[-ctrl.images_per_call :], text_tokens)
        out = out.flatten(2).to(query.dtype)  # (halves*B, S, H*D)
        if not double:
            return out
        text_part = out[:, :text_tokens] if text_first else out[:, sequence - text_tokens :]
        image_out = attn.to_out[1](attn.to_out[0](out[:, image].contiguous()))
        if getattr(attn, "context_pre_only", False) and self.layout == "sd3":
            return image_out, text_part  # SD3's last block drops the text stream
        return image_out, attn.to_add_out(text_part.contiguous())

    def _plain(self, args: tuple, kwargs: dict, maps: Any, text_tokens: int) -> Any:
        """The replaced processor's call; while subject maps are recorded, the conditional half's query and key
        are projected here for them (the replaced processor keeps its own)."""
        if maps is not None:
            attn, hidden_states, encoder_hidden_states, _, rotary = args
            images = self.controller.images_per_call
            text = encoder_hidden_states[-images:] if encoder_hidden_states is not None else None
            with torch.no_grad():
                query, key, _, _ = self._projections(attn, hidden_states[-images:], text, rotary)
            self._record_maps(maps, query, key, text_tokens)
        return self._original(*args, **kwargs)

    @torch.no_grad()
    def _record_maps(self, maps: Any, query: torch.Tensor, key: torch.Tensor, text_tokens: int) -> None:
        """Hand the subject maps (`csa.subjects.SubjectMaps`) each conditional image's head-mean attention of its
        image queries over the text keys, softmax over the text alone: (B, N, T), as a UNet's cross-attention.
        `query`, `key`: the conditional images' joint sequences (B, S, H, D), normalised and rotated."""
        sequence = key.shape[1]
        text_first = self.layout == "flux"
        image = image_span(sequence, text_tokens, text_first)
        words = slice(0, text_tokens) if text_first else slice(sequence - text_tokens, sequence)
        queries, keys = query[:, image].transpose(1, 2), key[:, words].transpose(1, 2)  # (B, H, N | T, D)
        scale = queries.shape[-1] ** -0.5
        probabilities = sum(
            (queries[:, h] @ keys[:, h].transpose(-1, -2) * scale).float().softmax(-1) for h in range(queries.shape[1])
        )  # head by head: one (B, N, T) map at a time, not (B, H, N, T)
        maps.add(probabilities / queries.shape[1])

    def _projections(self, attn: Any, hidden_states, encoder_hidden_states, rotary):
        """Query, key, value of the joint sequence as (B, S, H, D), normalised and rotated as diffusers does;
        plus the keys before rotation when borrowed keys go unrotated."""
        if getattr(attn, "fused_projections", False):
            raise StoryDiffusionError("CSA on joint attention does not support fused QKV projections; call "
                                      "unfuse_qkv_projections()")  # fmt: skip
        heads = attn.heads
        query, key, value = (p(hidden_states).unflatten(-1, (heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None and getattr(attn, "add_q_proj", None) is not None:
            text_query, text_key, text_value = (
                p(encoder_hidden_states).unflatten(-1, (heads, -1))
                for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if getattr(attn, "norm_added_q", None) is not None:
                text_query = attn.norm_added_q(text_query)
            if getattr(attn, "norm_added_k", None) is not None:
                text_key = attn.norm_added_k(text_key)
            pairs = ((text_query, query), (text_key, key), (text_value, value))
            if self.layout == "sd3":
                pairs = tuple(p[::-1] for p in pairs)
            query, key, value = (torch.cat(p, dim=1) for p in pairs)
        unrotated = key if self.positions == "none" else None
        if rotary is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query = apply_rotary_emb(query, rotary, sequence_dim=1)
            key = apply_rotary_emb(key, rotary, sequence_dim=1)
        return query, key, value, unrotated

    def _bank_projections(
        self,
        attn: Any,
        tokens: torch.Tensor,
        positions: torch.Tensor | None,
        rotary: Any,
        num_image_tokens: int,
        image_start: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A bank entry's hidden states (halves, M, C) as keys and values (halves, M, H, D), keys rotated as
        the image tokens they were sampled from ("source"; `positions` (M,): their places among the image
        tokens, which start at `image_start` in this call's joint sequence) or left unrotated ("none")."""
        key = attn.to_k(tokens).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(tokens).unflatten(-1, (attn.heads, -1))
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if rotary is not None and self.positions == "source":
            if positions is None:
                raise StoryDiffusionError(
                    f"layer {self.name}: the bank holds no token positions, which positions='source' needs to "
                    "rotate its keys; regenerate the character"
                )
            furthest = int(positions.max()) if positions.numel() else -1
            if furthest >= num_image_tokens:
                raise StoryDiffusionError(
                    f"layer {self.name}: the bank holds tokens from image token {furthest}, this call has "
                    f"{num_image_tokens} image tokens; read the bank at the size it was made at"
                )
            key = rotate_at(key, rotary, positions.long() + image_start)
        return key, value


class FluxConsistentAttnProcessor(JointConsistentAttnProcessor):
    """`JointConsistentAttnProcessor` for Flux's joint attention (`[text ; image]`, rotary positions)."""

    default_layout = "flux"


class SD3ConsistentAttnProcessor(JointConsistentAttnProcessor):
    """`JointConsistentAttnProcessor` for SD3/3.5's joint attention (`[image ; text]`, no rotary)."""

    default_layout = "sd3"
