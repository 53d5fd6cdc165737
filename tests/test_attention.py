"""CSA math: the pure token functions and the processor against a dense-mask reference."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from storydiffusion import CSAConfig, CSASchedule, StoryDiffusionError
from storydiffusion.csa.attention import (
    ConsistentSelfAttnProcessor,
    borrow_from_others,
    consistent_attention,
    gather_tokens,
    kv_factor,
    num_sampled_tokens,
    other_images_index,
    sample_token_indices,
)

HEADS, HEAD_DIM = 4, 8
CHANNELS = HEADS * HEAD_DIM


def make_attention(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(query_dim=CHANNELS, heads=HEADS, dim_head=HEAD_DIM)
    attn.set_processor(AttnProcessor2_0())
    return attn.eval()


def dense_mask_reference(attn: Attention, tokens: torch.Tensor, halves: int, indices: torch.Tensor) -> torch.Tensor:
    """The public code's formulation: per guidance half, all images' tokens as keys, a boolean mask
    letting image i see its own tokens plus the sampled tokens of the other images; math attention."""
    batch, num_tokens, _ = tokens.shape
    num_images = batch // halves
    allowed = torch.zeros(num_images * num_tokens, num_images * num_tokens, dtype=torch.bool)
    for i in range(num_images):
        rows = slice(i * num_tokens, (i + 1) * num_tokens)
        for j in range(num_images):
            if j == i:
                allowed[rows, j * num_tokens : (j + 1) * num_tokens] = True
            else:
                allowed[rows, j * num_tokens + indices[j]] = True
    outputs = []
    for half in tokens.view(halves, num_images * num_tokens, -1):
        q, k, v = (proj(half).view(-1, HEADS, HEAD_DIM).transpose(0, 1) for proj in (attn.to_q, attn.to_k, attn.to_v))
        scores = q @ k.transpose(-1, -2) / HEAD_DIM**0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(num_images * num_tokens, CHANNELS)
        outputs.append(attn.to_out[0](out).view(num_images, num_tokens, CHANNELS))
    return torch.cat(outputs)


class FakeController:
    """Stands in for ConsistentAttention: fixed indices, records what the processor writes."""

    def __init__(self, mode, images_per_call, indices=None, bank_tokens=None):
        self.mode, self.images_per_call, self.indices, self.bank_tokens = mode, images_per_call, indices, bank_tokens
        self.written = []
        self.writes = True
        self.config = CSAConfig()

    def guidance_halves(self, batch):
        return batch // self.images_per_call

    def wants_csa(self, layer):
        return True

    def sample_indices(self, num_images, num_tokens, num_samples):
        assert self.indices.shape == (num_images, num_samples), (self.indices.shape, num_images, num_samples)
        return self.indices

    def mutual_indices(self, num_images, num_tokens, rate):
        num_samples = num_sampled_tokens(num_tokens, rate)
        return self.sample_indices(num_images, num_tokens, num_samples) if num_samples else None

    def read_mask(self, layer, num_tokens, device):
        return None  # unmasked reads

    def write(self, layer, tokens):
        self.written.append(tokens)

    def read(self, layer, halves, dtype, device):
        return self.bank_tokens[-halves:]


def test_sampled_indices_are_distinct_sorted_and_seeded():
    a = sample_token_indices(3, 64, 20, torch.Generator().manual_seed(1))
    b = sample_token_indices(3, 64, 20, torch.Generator().manual_seed(1))
    c = sample_token_indices(3, 64, 20, torch.Generator().manual_seed(2))
    assert a.shape == (3, 20)
    assert torch.equal(a, b) and not torch.equal(a, c)
    for row in a:
        assert len(set(row.tolist())) == 20 and torch.equal(row, row.sort().values)
        assert 0 <= row.min() and row.max() < 64


def test_other_images_index_and_borrowing():
    assert other_images_index(3).tolist() == [[1, 2], [0, 2], [0, 1]]
    sampled = torch.arange(3)[:, None, None].expand(3, 2, 1).float()  # image j's tokens all equal j
    borrowed = borrow_from_others(sampled)
    assert borrowed.shape == (3, 4, 1)
    assert borrowed[0].flatten().tolist() == [1, 1, 2, 2] and borrowed[2].flatten().tolist() == [0, 0, 1, 1]
    assert borrow_from_others(sampled[:1]).shape == (1, 0, 1)


def test_gather_tokens_picks_rows_per_image():
    tokens = torch.arange(2 * 5).view(2, 5, 1).float()
    picked = gather_tokens(tokens, torch.tensor([[0, 4], [1, 2]]))
    assert picked.flatten().tolist() == [0, 4, 6, 7]


def test_num_sampled_and_kv_factor():
    assert num_sampled_tokens(2304, 0.5) == 1152 and num_sampled_tokens(2304, 0.0) == 0
    assert kv_factor(0.5, 3) == 2.0


@pytest.mark.parametrize("halves", [1, 2])
def test_processor_matches_dense_mask_reference(halves):
    attn = make_attention()
    num_images, num_tokens = 3, 16
    tokens = torch.randn(halves * num_images, num_tokens, CHANNELS, generator=torch.Generator().manual_seed(0))
    indices = sample_token_indices(num_images, num_tokens, 6, torch.Generator().manual_seed(3))
    controller = FakeController("mutual", num_images, indices)
    rate = 6 / num_tokens
    processor = ConsistentSelfAttnProcessor("layer", 1, rate, controller, AttnProcessor2_0())
    with torch.no_grad():
        ours = processor(attn, tokens)
        reference = dense_mask_reference(attn, tokens, halves, indices)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    # the bank receives exactly the sampled tokens of every image, per guidance half
    (written,) = controller.written
    assert written.shape == (halves, num_images * 6, CHANNELS)
    torch.testing.assert_close(written[-1, :6], tokens[(halves - 1) * num_images][indices[0]])


def test_read_mode_matches_explicit_concatenation():
    attn = make_attention()
    tokens = torch.randn(2 * 2, 16, CHANNELS)  # CFG, two frames
    bank_tokens = torch.randn(2, 10, CHANNELS)
    with torch.no_grad():
        ours = consistent_attention(attn, tokens, None, bank_tokens)
        for image in range(4):
            half = image // 2
            context = torch.cat([tokens[image], bank_tokens[half]])
            q = attn.to_q(tokens[image]).view(16, HEADS, HEAD_DIM).transpose(0, 1)
            k, v = (p(context).view(26, HEADS, HEAD_DIM).transpose(0, 1) for p in (attn.to_k, attn.to_v))
            expected = ((q @ k.transpose(-1, -2) / HEAD_DIM**0.5).softmax(-1) @ v).transpose(0, 1).reshape(16, -1)
            torch.testing.assert_close(ours[image], attn.to_out[0](expected), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
def test_reference_strength_equals_repeating_each_borrowed_token(masked):
    """Strength w on a bank read is the same attention as the bank's tokens appearing w times (with a read mask
    too: a hidden bank token stays hidden however it is weighted)."""
    attn = make_attention()
    tokens = torch.randn(2 * 2, 16, CHANNELS)
    bank_tokens = torch.randn(2, 10, CHANNELS)
    read_mask = torch.rand(2, 16, 10) < 0.6 if masked else None
    repeated_mask = read_mask.repeat(1, 1, 3) if masked else None
    with torch.no_grad():
        weighted = consistent_attention(attn, tokens, None, bank_tokens, read_mask, strength=3.0)
        repeated = consistent_attention(attn, tokens, None, bank_tokens.repeat(1, 3, 1), repeated_mask)
        plain = consistent_attention(attn, tokens, None, bank_tokens, read_mask)
    torch.testing.assert_close(weighted, repeated, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(weighted, plain, atol=1e-4)


def test_reference_strength_must_be_positive():
    with pytest.raises(StoryDiffusionError, match="reference_strength"):
        CSAConfig(reference_strength=0.0)


def test_guidance_halves_never_mix():
    attn = make_attention()
    tokens = torch.randn(2 * 3, 16, CHANNELS)
    indices = sample_token_indices(3, 16, 8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = consistent_attention(attn, tokens, indices, None)
        changed_uncond = tokens.clone()
        changed_uncond[:3] += 5.0
        out_uncond = consistent_attention(attn, changed_uncond, indices, None)
        changed_cond = tokens.clone()
        changed_cond[3:] -= 5.0
        out_cond = consistent_attention(attn, changed_cond, indices, None)
    assert torch.equal(out_uncond[3:], base[3:]) and not torch.allclose(out_uncond[:3], base[:3])
    assert torch.equal(out_cond[:3], base[:3]) and not torch.allclose(out_cond[3:], base[3:])


def test_other_images_change_the_output_but_not_with_rate_zero():
    attn = make_attention()
    tokens = torch.randn(3, 16, CHANNELS)
    indices = sample_token_indices(3, 16, 8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = consistent_attention(attn, tokens, indices, None)
        other = tokens.clone()
        other[2] += 1.0
        changed = consistent_attention(attn, other, indices, None)
        assert not torch.allclose(changed[0], base[0])  # image 0 borrows from image 2
        controller = FakeController("mutual", 3, indices[:, :0])
        processor = ConsistentSelfAttnProcessor("layer", 1, 0.0, controller, AttnProcessor2_0())
        assert torch.equal(processor(attn, tokens), AttnProcessor2_0()(attn, tokens))


def test_schedule_is_expressed_in_fractions():
    schedule = CSASchedule()
    for steps in (25, 50):
        probabilities = [schedule.probability(s, steps) for s in range(steps)]
        assert probabilities[0] == 0.0
        assert probabilities[1] == 0.7
        assert probabilities[int(0.4 * steps) - 1] == 0.7 and probabilities[int(0.4 * steps)] == 0.9
        assert probabilities[-1] == 0.9
    assert all(CSASchedule.always().probability(s, 10) == 1.0 for s in range(10))


@pytest.mark.parametrize("rate", [-0.1, 1.5, {2: 2.0}])
def test_rates_outside_unit_interval_are_refused(rate):
    with pytest.raises(StoryDiffusionError, match="outside \\[0, 1\\]"):
        CSAConfig(rate=rate)


def test_bad_schedule_is_refused():
    with pytest.raises(StoryDiffusionError, match="plain_fraction"):
        CSASchedule(plain_fraction=2.0)
    with pytest.raises(StoryDiffusionError, match="stages"):
        CSASchedule(stages=((0.5, 1.5),))
