"""CSA on joint attention (Flux, SD3): against dense masked formulations, and exactly plain when off."""

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.embeddings import apply_rotary_emb

from storydiffusion.csa.attention import sample_token_indices
from storydiffusion.csa.joint import FluxConsistentAttnProcessor, SD3ConsistentAttnProcessor
from storydiffusion.errors import StoryDiffusionError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT, SIDE, IMAGES = 5, 4, 3  # text tokens, image tokens per side (16), reference images


class Controller:
    """The part of `ConsistentAttention` a processor asks: mutual mode, every call gated on."""

    mode = "mutual"
    text_tokens = TEXT

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def wants_csa(self, name: str) -> bool:
        return True

    def guidance_halves(self, batch: int) -> int:
        return batch // IMAGES

    def sample_indices(self, images: int, tokens: int, samples: int) -> torch.Tensor:
        return sample_token_indices(images, tokens, samples, self.generator)

    writes = False

    def mutual_indices(self, images: int, tokens: int, rate: float) -> torch.Tensor | None:
        samples = round(tokens * rate)
        return self.sample_indices(images, tokens, samples) if samples else None

    def recording_maps(self):
        return None  # no subject masks being inferred


@pytest.fixture
def flux():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    return model.eval()


def inputs(generator_seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(generator_seed)
    ids = torch.stack(torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij"), -1).flatten(0, 1)
    return {
        "hidden_states": torch.randn(IMAGES, SIDE * SIDE, 4, generator=g),
        "encoder_hidden_states": torch.randn(IMAGES, TEXT, 16, generator=g),
        "pooled_projections": torch.randn(IMAGES, 8, generator=g),
        "timestep": torch.full((IMAGES,), 0.5),
        "img_ids": torch.cat([torch.zeros(SIDE * SIDE, 1), ids.float()], -1),
        "txt_ids": torch.zeros(TEXT, 3),
    }


def install(model, rate: float, **options) -> Controller:
    controller = Controller()
    model.set_attn_processor(
        {
            name: FluxConsistentAttnProcessor(name, rate, controller, processor, **options)
            for name, processor in model.attn_processors.items()
        }
    )
    return controller


def test_rate_zero_is_exactly_the_plain_transformer(flux):
    with torch.no_grad():
        plain = flux(**inputs()).sample
        install(flux, 0.0)
        assert torch.equal(flux(**inputs()).sample, plain)
        install(flux, 0.5)
        assert not torch.allclose(flux(**inputs()).sample, plain)


def _attention_inputs(flux, text_tokens: int = TEXT):
    """A double-stream block's attention module with its inputs, as the block hands them over."""
    block, data = flux.transformer_blocks[0], inputs()
    attn = block.attn
    hidden = torch.randn(IMAGES, SIDE * SIDE, attn.query_dim)
    text = torch.randn(IMAGES, text_tokens, attn.query_dim)
    rotary = flux.pos_embed(torch.cat([torch.zeros(text_tokens, 3), data["img_ids"]], 0))
    return attn, hidden, text, rotary


def image_rotation(flux, places: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary rows of the image tokens at `places` (indices among the image tokens), from the image ids
    alone: Flux's text ids are all zero, so where an image token sits does not depend on the text."""
    cos, sin = flux.pos_embed(inputs()["img_ids"])
    return cos[places], sin[places]


def dense_reference(attn, hidden, text, rotary, indices, positions, text_sees_borrowed):
    """For each image: keys of every image's joint sequence side by side, a mask picking its own sequence and
    the other images' sampled image tokens (for its image queries, and its text queries if allowed)."""
    q, k, v, _, _, _ = _plain_qkv(attn, hidden, text)
    qr, kr = (apply_rotary_emb(t, rotary, sequence_dim=1) for t in (q, k))
    lent = k if positions == "none" else kr
    seq, out = TEXT + SIDE * SIDE, []
    for i in range(IMAGES):
        keys = torch.cat([kr[i] if j == i else lent[j] for j in range(IMAGES)])  # (IMAGES*S, H, D)
        values = torch.cat([v[j] for j in range(IMAGES)])
        mask = torch.zeros(seq, IMAGES * seq, dtype=torch.bool)
        mask[:, i * seq : (i + 1) * seq] = True
        for j in range(IMAGES):
            if j != i:
                mask[TEXT if not text_sees_borrowed else 0 :, j * seq + TEXT + indices[j]] = True
        scores = torch.einsum("shd,thd->hst", qr[i], keys) * attn.head_dim**-0.5
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out.append(torch.einsum("hst,thd->shd", weights, values))
    return torch.stack(out).flatten(2)  # (B, S, H*D)


def _plain_qkv(attn, hidden, text):
    unflat = (-1, attn.head_dim)
    q = attn.norm_q(attn.to_q(hidden).unflatten(-1, unflat))
    k = attn.norm_k(attn.to_k(hidden).unflatten(-1, unflat))
    v = attn.to_v(hidden).unflatten(-1, unflat)
    tq = attn.norm_added_q(attn.add_q_proj(text).unflatten(-1, unflat))
    tk = attn.norm_added_k(attn.add_k_proj(text).unflatten(-1, unflat))
    tv = attn.add_v_proj(text).unflatten(-1, unflat)
    return torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1), tq, tk, tv


@pytest.mark.parametrize("positions", ["source", "none"])
@pytest.mark.parametrize("text_sees_borrowed", [False, True])
def test_double_stream_csa_equals_the_dense_formulation(flux, positions, text_sees_borrowed):
    attn, hidden, text, rotary = _attention_inputs(flux)
    processor = FluxConsistentAttnProcessor("b0", 0.5, Controller(), attn.processor, positions, text_sees_borrowed)
    indices = sample_token_indices(IMAGES, SIDE * SIDE, 8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        image_out, text_out = processor(attn, hidden, text, image_rotary_emb=rotary)
        joint = dense_reference(attn, hidden, text, rotary, indices, positions, text_sees_borrowed)
        torch.testing.assert_close(image_out, attn.to_out[1](attn.to_out[0](joint[:, TEXT:])), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(text_out, attn.to_add_out(joint[:, :TEXT]), atol=1e-5, rtol=1e-4)


def test_text_tokens_are_untouched_unless_they_may_see_borrowed_keys(flux):
    attn, hidden, text, rotary = _attention_inputs(flux)
    with torch.no_grad():
        _, plain_text = attn.processor(attn, hidden, text, image_rotary_emb=rotary)
        _, masked_text = FluxConsistentAttnProcessor("b0", 0.5, Controller(), attn.processor)(
            attn, hidden, text, image_rotary_emb=rotary
        )
        _, open_text = FluxConsistentAttnProcessor("b0", 0.5, Controller(), attn.processor, text_sees_borrowed=True)(
            attn, hidden, text, image_rotary_emb=rotary
        )
    torch.testing.assert_close(masked_text, plain_text, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(open_text, plain_text)


def test_single_stream_block_borrows_only_image_tokens(flux):
    """A single-stream block gets [text ; image] as one sequence; the text length comes from the controller."""
    attn = flux.single_transformer_blocks[0].attn
    data = inputs()
    rotary = flux.pos_embed(torch.cat([data["txt_ids"], data["img_ids"]], 0))
    joint = torch.randn(IMAGES, TEXT + SIDE * SIDE, attn.query_dim)
    with torch.no_grad():
        plain = attn.processor(attn, joint, image_rotary_emb=rotary)
        ours = FluxConsistentAttnProcessor("s0", 0.5, Controller(), attn.processor)(
            attn, joint, image_rotary_emb=rotary
        )
    assert ours.shape == plain.shape
    torch.testing.assert_close(ours[:, :TEXT], plain[:, :TEXT], atol=1e-6, rtol=1e-5)  # text queries unchanged
    assert not torch.allclose(ours[:, TEXT:], plain[:, TEXT:])


def test_the_two_position_choices_differ(flux):
    attn, hidden, text, rotary = _attention_inputs(flux)
    with torch.no_grad():
        source, _ = FluxConsistentAttnProcessor("b0", 0.5, Controller(), attn.processor, "source")(
            attn, hidden, text, image_rotary_emb=rotary
        )
        none, _ = FluxConsistentAttnProcessor("b0", 0.5, Controller(), attn.processor, "none")(
            attn, hidden, text, image_rotary_emb=rotary
        )
    assert not torch.allclose(source, none)


class WritingController(Controller):
    """A reference phase that fills a bank: keeps what the processor writes."""

    writes = True

    def write(self, name, tokens, positions=None) -> None:
        self.written = tokens, positions


class ReadController(Controller):
    """The read-mode part of `ConsistentAttention`: one bank entry, its positions, an optional read mask."""

    mode = "read"

    def __init__(self, tokens, positions=None, mask=None) -> None:
        super().__init__()
        self.tokens, self.positions, self.mask = tokens, positions, mask

    def read(self, name, halves, dtype, device):
        return self.tokens[-halves:]

    def read_positions(self, name):
        return self.positions

    def read_mask(self, name, num_tokens, device):
        return self.mask


def dense_bank_reference(attn, hidden, text, rotary, bank, bank_rotary, mask, text_sees_borrowed=False):
    """Per image: its own joint sequence plus the bank's tokens as keys (rotated by `bank_rotary`, their
    image tokens' rotary rows; None: unrotated), image queries limited by `mask` (B, N, M), text queries
    seeing their own sequence only (unless `text_sees_borrowed`: every bank token)."""
    q, k, v, _, _, _ = _plain_qkv(attn, hidden, text)
    qr, kr = (apply_rotary_emb(t, rotary, sequence_dim=1) for t in (q, k))
    unflat = (-1, attn.head_dim)
    bank_key = attn.norm_k(attn.to_k(bank).unflatten(-1, unflat))[0]  # (M, H, D)
    bank_value = attn.to_v(bank).unflatten(-1, unflat)[0]
    if bank_rotary is not None:
        bank_key = apply_rotary_emb(bank_key[None], bank_rotary, sequence_dim=1)[0]
    text_tokens = text.shape[1]
    seq, out = text_tokens + SIDE * SIDE, []
    for i in range(IMAGES):
        keys, values = torch.cat([kr[i], bank_key]), torch.cat([v[i], bank_value])
        allowed = torch.ones(seq, seq + bank.shape[1], dtype=torch.bool)
        allowed[:text_tokens, seq:] = text_sees_borrowed
        if mask is not None:
            allowed[text_tokens:, seq:] = mask[i]
        scores = torch.einsum("shd,thd->hst", qr[i], keys) * attn.head_dim**-0.5
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out.append(torch.einsum("hst,thd->shd", weights, values))
    return torch.stack(out).flatten(2)


@pytest.mark.parametrize("masked", [False, True])
def test_bank_read_equals_the_dense_formulation(flux, masked):
    """Frame phase: every image also sees the bank's tokens, keys rotated to where they were sampled."""
    attn, hidden, text, rotary = _attention_inputs(flux)
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(1, 10, attn.query_dim, generator=g)
    positions = torch.randint(0, SIDE * SIDE, (10,), generator=g)  # places among the image tokens
    mask = torch.rand(IMAGES, SIDE * SIDE, 10, generator=g) > 0.5 if masked else None
    processor = FluxConsistentAttnProcessor("b0", 0.5, ReadController(bank, positions, mask), attn.processor)
    with torch.no_grad():
        image_out, text_out = processor(attn, hidden, text, image_rotary_emb=rotary)
        joint = dense_bank_reference(attn, hidden, text, rotary, bank, image_rotation(flux, positions), mask)
        _, plain_text = attn.processor(attn, hidden, text, image_rotary_emb=rotary)
    torch.testing.assert_close(image_out, attn.to_out[1](attn.to_out[0](joint[:, TEXT:])), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text_out, plain_text, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("read_text", [3, 8])
def test_a_bank_read_at_another_text_length_rotates_keys_as_their_image_tokens(flux, read_text):
    """A bank written in calls with TEXT text tokens, read in a call with `read_text`: each bank key is rotated
    as the image token it was sampled from, as the dense formulation places it from the image ids alone. Fewer
    text tokens at the read indexed past the rotary table; more rotated keys as other tokens."""
    attn, hidden, text, rotary = _attention_inputs(flux)
    writer = WritingController()
    with torch.no_grad():
        FluxConsistentAttnProcessor("b0", 0.5, writer, attn.processor)(attn, hidden, text, image_rotary_emb=rotary)
    tokens, positions = writer.written
    sampled = sample_token_indices(IMAGES, SIDE * SIDE, 8, torch.Generator().manual_seed(0))  # the writer's draw
    torch.testing.assert_close(tokens[0], hidden[torch.arange(IMAGES)[:, None], sampled].flatten(0, 1))
    _, frame, frame_text, frame_rotary = _attention_inputs(flux, read_text)
    reader = FluxConsistentAttnProcessor("b0", 0.5, ReadController(tokens, positions), attn.processor)
    with torch.no_grad():
        image_out, _ = reader(attn, frame, frame_text, image_rotary_emb=frame_rotary)
        bank_rotary = image_rotation(flux, sampled.flatten())
        joint = dense_bank_reference(attn, frame, frame_text, frame_rotary, tokens, bank_rotary, None)
    expected = attn.to_out[1](attn.to_out[0](joint[:, read_text:]))
    torch.testing.assert_close(image_out, expected, atol=1e-5, rtol=1e-4)


def _owner_mask(seed: int, bank_tokens: int) -> torch.Tensor:
    """(IMAGES, N, M) read mask of a frame naming two characters: each query reads its owner's bank tokens."""
    from storydiffusion.csa.attention import bank_read_mask

    owner = torch.randint(-1, 2, (IMAGES, SIDE * SIDE), generator=torch.Generator().manual_seed(seed))
    return bank_read_mask(owner, torch.arange(bank_tokens) % 2)


@pytest.mark.parametrize("text_sees_borrowed", [False, True])
def test_masked_reads_run_on_a_backend_that_refuses_masks(flux, text_sees_borrowed):
    """Frames naming several characters read their banks through a mask; flash and sage backends refuse
    masks, as `_native_flash` (torch's flash kernel, which runs on the CPU too) does: the read still equals the
    masked dense formulation."""
    attn, hidden, text, rotary = _attention_inputs(flux)
    g = torch.Generator().manual_seed(3)
    bank, positions = torch.randn(1, 10, attn.query_dim, generator=g), torch.randint(0, SIDE * SIDE, (10,), generator=g)
    mask = _owner_mask(4, 10)
    attn.processor._attention_backend = "_native_flash"  # what flux.set_attention_backend sets
    controller = ReadController(bank, positions, mask)
    processor = FluxConsistentAttnProcessor(
        "b0", 0.5, controller, attn.processor, text_sees_borrowed=text_sees_borrowed
    )
    with torch.no_grad():
        image_out, text_out = processor(attn, hidden, text, image_rotary_emb=rotary)
        bank_rotary = image_rotation(flux, positions)
        joint = dense_bank_reference(attn, hidden, text, rotary, bank, bank_rotary, mask, text_sees_borrowed)
    torch.testing.assert_close(image_out, attn.to_out[1](attn.to_out[0](joint[:, TEXT:])), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text_out, attn.to_add_out(joint[:, :TEXT]), atol=1e-5, rtol=1e-4)


def test_every_csa_attention_call_gets_the_parallel_config_and_no_mask(flux, monkeypatch):
    """As diffusers' own Flux and SD3 processors do, CSA's calls pass the processor's `_parallel_config` (set by
    `enable_parallelism`) to `dispatch_attention_fn`, in the reference phase and in masked reads alike."""
    from diffusers.models import attention_dispatch

    calls, dispatch = [], attention_dispatch.dispatch_attention_fn

    def refusing_masks(query, key, value, attn_mask=None, parallel_config=None, **kwargs):
        assert attn_mask is None, "a mask reached the attention backend"
        calls.append(parallel_config)
        return dispatch(query, key, value, **kwargs)

    monkeypatch.setattr(attention_dispatch, "dispatch_attention_fn", refusing_masks)
    attn, hidden, text, rotary = _attention_inputs(flux)
    config = object()  # a ParallelConfig stand-in: only passed on
    attn.processor._parallel_config = config
    bank = torch.randn(1, 10, attn.query_dim)
    with torch.no_grad():
        FluxConsistentAttnProcessor("b0", 0.5, Controller(), attn.processor)(
            attn, hidden, text, image_rotary_emb=rotary
        )
        reader = ReadController(bank, torch.arange(10), _owner_mask(5, 10))
        FluxConsistentAttnProcessor("b0", 0.5, reader, attn.processor)(attn, hidden, text, image_rotary_emb=rotary)
    assert calls and all(passed is config for passed in calls)


@pytest.fixture
def active_attention_backend():
    """`set_attention_backend` also sets the process-wide active backend: put it back afterwards."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active, _ = _AttentionBackendRegistry.get_active_backend()
    yield
    _AttentionBackendRegistry.set_active_backend(active)


def test_set_attention_backend_reaches_the_csa_processors(flux, active_attention_backend):
    """Called after CSA is installed, `set_attention_backend` sets the backend CSA's calls and the replaced
    processors' plain calls use; a masked read then runs on it (`_native_flash` refuses masks)."""
    install(flux, 0.5)
    flux.set_attention_backend("_native_flash")
    for processor in flux.attn_processors.values():
        assert processor._attention_backend == "_native_flash" == processor.original._attention_backend
    attn, hidden, text, rotary = _attention_inputs(flux)
    bank, positions, mask = torch.randn(1, 10, attn.query_dim), torch.arange(10), _owner_mask(6, 10)
    attn.processor.controller = ReadController(bank, positions, mask)
    with torch.no_grad():
        image_out, _ = attn.processor(attn, hidden, text, image_rotary_emb=rotary)
        joint = dense_bank_reference(attn, hidden, text, rotary, bank, image_rotation(flux, positions), mask)
    torch.testing.assert_close(image_out, attn.to_out[1](attn.to_out[0](joint[:, TEXT:])), atol=1e-5, rtol=1e-4)


class Maps:
    def __init__(self) -> None:
        self.added: list[torch.Tensor] = []

    def add(self, probabilities: torch.Tensor) -> None:
        self.added.append(probabilities)


class RecordingController(ReadController):
    """A frame phase that infers subject masks: the processor hands over the image-to-text attention."""

    images_per_call = IMAGES

    def __init__(self, tokens, positions, gated_on: bool) -> None:
        super().__init__(tokens, positions)
        self.maps, self.gated_on = Maps(), gated_on

    def recording_maps(self):
        return self.maps

    def wants_csa(self, name: str) -> bool:
        return self.gated_on


@pytest.mark.parametrize("gated_on", [True, False])
def test_subject_maps_are_the_image_to_text_attention_with_one_projection(flux, gated_on):
    """Recorded maps equal the head-mean softmax of image queries over the text keys, written out, whether the
    layer runs CSA or not; a CSA call projects the queries once (the maps reuse the attention's projections)."""
    attn, hidden, text, rotary = _attention_inputs(flux)
    g = torch.Generator().manual_seed(3)
    bank, positions = torch.randn(1, 6, attn.query_dim, generator=g), torch.arange(6)
    controller = RecordingController(bank, positions, gated_on)
    processor = FluxConsistentAttnProcessor("b0", 0.5, controller, attn.processor)
    calls = []
    hook = attn.to_q.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        processor(attn, hidden, text, image_rotary_emb=rotary)
    hook.remove()
    q, k, _, _, _, _ = _plain_qkv(attn, hidden, text)
    qr, kr = (apply_rotary_emb(t, rotary, sequence_dim=1) for t in (q, k))
    scores = torch.einsum("bnhd,bthd->bhnt", qr[:, TEXT:], kr[:, :TEXT]) * attn.head_dim**-0.5
    (maps,) = controller.maps.added
    torch.testing.assert_close(maps, scores.softmax(-1).mean(1), atol=1e-5, rtol=1e-4)
    assert len(calls) == (1 if gated_on else 2)  # gated off: once for the maps, once in the replaced processor


def test_bank_read_without_positions_is_refused_for_source_positions(flux):
    attn, hidden, text, rotary = _attention_inputs(flux)
    bank = torch.randn(1, 4, attn.query_dim)
    processor = FluxConsistentAttnProcessor("b0", 0.5, ReadController(bank), attn.processor)
    with torch.no_grad(), pytest.raises(StoryDiffusionError, match="positions"):
        processor(attn, hidden, text, image_rotary_emb=rotary)
    unrotated = FluxConsistentAttnProcessor("b0", 0.5, ReadController(bank), attn.processor, positions="none")
    with torch.no_grad():
        image_out, _ = unrotated(attn, hidden, text, image_rotary_emb=rotary)
        joint = dense_bank_reference(attn, hidden, text, rotary, bank, None, None)
    torch.testing.assert_close(image_out, attn.to_out[1](attn.to_out[0](joint[:, TEXT:])), atol=1e-5, rtol=1e-4)


# -- SD3: [image ; text], no rotary, classifier-free guidance halves ---------------------------------------
@pytest.fixture
def sd3():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=8, qk_norm="rms_norm",
    )  # fmt: skip
    return model.eval()


def sd3_inputs(batch: int = 2 * IMAGES) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, TEXT, 16, generator=g),
        "pooled_projections": torch.randn(batch, 8, generator=g),
        "timestep": torch.full((batch,), 500.0),
    }


def test_sd3_rate_zero_is_exactly_the_plain_transformer(sd3):
    controller = Controller()
    with torch.no_grad():
        plain = sd3(**sd3_inputs()).sample
        sd3.set_attn_processor(
            {n: SD3ConsistentAttnProcessor(n, 0.0, controller, p) for n, p in sd3.attn_processors.items()}
        )
        assert torch.equal(sd3(**sd3_inputs()).sample, plain)
        sd3.set_attn_processor(
            {n: SD3ConsistentAttnProcessor(n, 0.5, controller, p) for n, p in sd3.attn_processors.items()}
        )
        assert not torch.allclose(sd3(**sd3_inputs()).sample, plain)


def test_sd3_joint_csa_equals_the_dense_formulation(sd3):
    """Per guidance half, image i's image queries also see the other images' sampled image tokens; the
    joint sequence is [image ; text]; text queries see their own sequence only."""
    attn = sd3.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(2)
    tokens = 16
    hidden = torch.randn(2 * IMAGES, tokens, attn.query_dim, generator=g)
    text = torch.randn(2 * IMAGES, TEXT, attn.query_dim, generator=g)
    processor = SD3ConsistentAttnProcessor("t0", 0.5, Controller(), attn.processor)
    indices = sample_token_indices(IMAGES, tokens, 8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        image_out, text_out = processor(attn, hidden, text)
        heads = attn.heads

        def split(x):
            return x.unflatten(-1, (heads, -1))

        q = torch.cat([attn.norm_q(split(attn.to_q(hidden))), attn.norm_added_q(split(attn.add_q_proj(text)))], 1)
        k = torch.cat([attn.norm_k(split(attn.to_k(hidden))), attn.norm_added_k(split(attn.add_k_proj(text)))], 1)
        v = torch.cat([split(attn.to_v(hidden)), split(attn.add_v_proj(text))], 1)
        seq, outputs = tokens + TEXT, []
        for half in range(2):
            for i in range(IMAGES):
                row = half * IMAGES + i
                others = [half * IMAGES + j for j in range(IMAGES) if j != i]
                extra = [indices[j] for j in range(IMAGES) if j != i]
                keys = torch.cat([k[row]] + [k[o][e] for o, e in zip(others, extra)])
                values = torch.cat([v[row]] + [v[o][e] for o, e in zip(others, extra)])
                allowed = torch.ones(seq, keys.shape[0], dtype=torch.bool)
                allowed[tokens:, seq:] = False  # text queries (after the image) see their own sequence only
                scores = torch.einsum("shd,thd->hst", q[row], keys) * attn.scale
                weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
                outputs.append(torch.einsum("hst,thd->shd", weights, values).flatten(1))
        joint = torch.stack(outputs)
    torch.testing.assert_close(image_out, attn.to_out[1](attn.to_out[0](joint[:, :tokens])), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text_out, attn.to_add_out(joint[:, tokens:]), atol=1e-5, rtol=1e-4)


def test_sd3_masked_bank_read_equals_the_dense_formulation_without_a_mask_reaching_the_backend(sd3, monkeypatch):
    """SD3 ([image ; text], two guidance halves, each with its half of the bank): a masked read through a
    dispatcher that refuses masks, as flash and sage backends do, equals the masked dense formulation."""
    from diffusers.models import attention_dispatch

    dispatch = attention_dispatch.dispatch_attention_fn

    def refusing_masks(query, key, value, attn_mask=None, **kwargs):
        if attn_mask is not None:
            raise ValueError("`attn_mask` is not supported by this backend")
        return dispatch(query, key, value, **kwargs)

    monkeypatch.setattr(attention_dispatch, "dispatch_attention_fn", refusing_masks)
    attn = sd3.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(2)
    tokens = SIDE * SIDE
    hidden = torch.randn(2 * IMAGES, tokens, attn.query_dim, generator=g)
    text = torch.randn(2 * IMAGES, TEXT, attn.query_dim, generator=g)
    bank = torch.randn(2, 10, attn.query_dim, generator=g)
    mask = _owner_mask(7, 10)
    processor = SD3ConsistentAttnProcessor("t0", 0.5, ReadController(bank, mask=mask), attn.processor)
    with torch.no_grad():
        image_out, text_out = processor(attn, hidden, text)

        def split(x):
            return x.unflatten(-1, (attn.heads, -1))

        q = torch.cat([attn.norm_q(split(attn.to_q(hidden))), attn.norm_added_q(split(attn.add_q_proj(text)))], 1)
        k = torch.cat([attn.norm_k(split(attn.to_k(hidden))), attn.norm_added_k(split(attn.add_k_proj(text)))], 1)
        v = torch.cat([split(attn.to_v(hidden)), split(attn.add_v_proj(text))], 1)
        bank_k, bank_v = attn.norm_k(split(attn.to_k(bank))), split(attn.to_v(bank))
        seq, outputs = tokens + TEXT, []
        for half in range(2):
            for i in range(IMAGES):
                row = half * IMAGES + i
                keys, values = torch.cat([k[row], bank_k[half]]), torch.cat([v[row], bank_v[half]])
                allowed = torch.ones(seq, seq + 10, dtype=torch.bool)
                allowed[:tokens, seq:] = mask[i]
                allowed[tokens:, seq:] = False  # text queries (after the image) see their own sequence only
                scores = torch.einsum("shd,thd->hst", q[row], keys) * attn.scale
                weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
                outputs.append(torch.einsum("hst,thd->shd", weights, values).flatten(1))
        joint = torch.stack(outputs)
    torch.testing.assert_close(image_out, attn.to_out[1](attn.to_out[0](joint[:, :tokens])), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text_out, attn.to_add_out(joint[:, tokens:]), atol=1e-5, rtol=1e-4)
