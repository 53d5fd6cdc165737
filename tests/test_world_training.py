"""The tiny UNet's training pieces: identity-free captions, part maps, token part labels and the
part-matching loss on the joint attention."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from storydiffusion.csa.attention import consistent_attention
from storydiffusion.world import render as world
from storydiffusion.world import training as wt
from storydiffusion.world.eval import parse_world_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _one_figure_panel(seed: int = 3) -> world.Panel:
    return world.sample_panel(np.random.default_rng(seed), num_figures=1)


def test_identity_free_group_captions_name_only_kind_pose_and_scene():
    group = wt.sample_group(np.random.default_rng(0), omit_probability=wt.IDENTITY_FREE)
    identity = group[0].figures[0].identity
    for panel in group:
        assert panel.figures[0].identity == identity
        said = parse_world_prompt(panel.caption)
        assert said.attributes == {"kind": identity.kind}, panel.caption
        assert (said.pose, said.scene) == (panel.figures[0].pose, panel.scene.kind)


def test_identity_free_captions_draw_the_same_pixels():
    """The caption grammar never changes what is drawn (same random draws whatever is said)."""
    full = wt.sample_group(np.random.default_rng(5), omit_probability=0.0)
    free = wt.sample_group(np.random.default_rng(5), omit_probability=wt.IDENTITY_FREE)
    assert [p.figures for p in full] == [p.figures for p in free]
    assert full[0].caption != free[0].caption


def test_part_map_lies_on_the_drawn_parts():
    """Where the part map says shirt / lower garment, the render (same size, no anti-aliasing) shows
    the identity's colour; an empty scene has no parts."""
    panel = _one_figure_panel()
    identity = panel.figures[0].identity
    parts = world.render_part_map(panel, 256)
    image = np.asarray(world.render_panel(panel, 256, supersample=1)).astype(int)
    for name, colour in (
        ("shirt", world.COLOURS[identity.shirt_colour]),
        ("lower", world.COLOURS[identity.trousers_colour]),
    ):
        mask = parts == world.FIGURE_PARTS.index(name)
        assert mask.sum() > 100, name
        assert (np.abs(image[mask] - np.array(colour)).sum(-1) == 0).mean() > 0.98, name
    scene_only = world.sample_panel(np.random.default_rng(1), num_figures=0)
    assert not world.render_part_map(scene_only, 256).any()


def test_token_part_labels_take_the_majority_part_of_each_cell():
    part_map = np.zeros((8, 8), dtype=np.uint8)
    part_map[:4, :4] = 3  # cell (0, 0) all shirt
    part_map[:3, 4:] = 1  # cell (0, 1): hair on 12 of 16 pixels
    part_map[4:, 4:5] = 2  # cell (1, 1): 4 of 16 pixels, below min_share 0.3
    labels = wt.token_part_labels(part_map, 2)
    assert labels.tolist() == [[3, 1], [-1, -1]]
    with pytest.raises(ValueError, match="does not split"):
        wt.token_part_labels(part_map, 3)


def test_part_matching_loss_is_small_when_attention_finds_the_same_part():
    query_labels = torch.tensor([[1, 2, -1]])
    key_labels = torch.tensor([[1, 2, 2, 3]])
    matched = torch.tensor([[[0.97, 0.01, 0.01, 0.01], [0.0, 0.5, 0.49, 0.01], [0.25] * 4]])
    uniform = torch.full((1, 3, 4), 0.25)
    assert wt.part_matching_loss(matched, query_labels, key_labels) < 0.03
    # uniform: -log(1/4) for the hair query, -log(2/4) for the skin one; the unlabelled query does not count
    expected = -(np.log(0.25) + np.log(0.5)) / 2
    assert wt.part_matching_loss(uniform, query_labels, key_labels).item() == pytest.approx(expected, rel=1e-5)
    assert wt.part_matching_loss(uniform, torch.tensor([[4, 4, -1]]), key_labels) is None


def test_supervised_joint_attention_computes_csa_itself():
    """The explicit attention that exposes the probabilities gives the same output as CSA's fused one."""
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    groups, panels, tokens = 2, 3, 16
    hidden = torch.randn(groups * panels, tokens, 32)
    indices = torch.stack([torch.randperm(tokens)[:6].sort().values for _ in range(panels)])
    labels = torch.randint(-1, 4, (groups * panels, tokens))
    with torch.no_grad():
        out, loss = wt.attention_with_part_loss(attn, hidden, indices, labels)
        reference = consistent_attention(attn, hidden, indices, None)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert loss is not None and loss.item() > 0


def test_latent_shard_holds_part_labels_aligned_with_its_panels():
    vae = wt.tiny_vae(0).eval()
    shard = wt.latent_shard(np.random.default_rng(7), vae, groups=2, extras=2, omit_probability=wt.IDENTITY_FREE)
    assert shard["group_latents"].shape == (2, wt.GROUP_SIZE, 4, 16, 16)
    assert shard["group_parts_16"].shape == (2, wt.GROUP_SIZE, 16, 16)
    assert shard["group_parts_8"].shape == (2, wt.GROUP_SIZE, 8, 8)
    assert shard["extra_parts_16"].shape == (2, 16, 16)
    # every one-figure panel of a group has a labelled figure, and the same panels drawn again agree
    assert (shard["group_parts_16"] >= 0).flatten(2).any(-1).all()
    again = wt.sample_group(np.random.default_rng(7), omit_probability=wt.IDENTITY_FREE)
    assert torch.equal(shard["group_parts_16"][0], wt.panel_part_labels(again, 16))


def test_clean_latents_from_the_velocity_target():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**wt.TINY_NOISE_SCHEDULE)
    clean, noise = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    timesteps = torch.tensor([10, 500, 990])
    noisy = scheduler.add_noise(clean, noise, timesteps)
    velocity = scheduler.get_velocity(clean, noise, timesteps)
    torch.testing.assert_close(wt.clean_from_velocity(scheduler, noisy, velocity, timesteps), clean, atol=1e-4, rtol=0)


def test_part_mean_loss_sees_a_part_colour_and_not_its_detail():
    torch.manual_seed(0)
    clean = torch.randn(2, 4, 4, 4)
    labels = torch.full((2, 16), -1)
    labels[:, :4] = 4  # the shirt: the first row of tokens
    labels[:, 4:6] = 1  # the hair
    assert wt.part_mean_loss(clean, clean, labels) == 0
    detail = clean.clone()
    detail[:, :, 0, :2] += 1.0
    detail[:, :, 0, 2:] -= 1.0  # the shirt's tokens change, its mean does not
    assert wt.part_mean_loss(detail, clean, labels) < 1e-10
    recoloured = clean.clone()
    recoloured[:, 0, 0, :] += 1.0  # the whole shirt shifts in one channel
    assert wt.part_mean_loss(recoloured, clean, labels).item() == pytest.approx(1.0 / 4 / 2)  # 1 of 4 ch, 1 of 2 parts
    background = clean.clone()
    background[:, :, 3, :] += 5.0  # unlabelled tokens do not count
    assert wt.part_mean_loss(background, clean, labels) < 1e-10


def _plain_attention(attn: Attention, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out: queries (N, C) over keys/values projected from `keys` (M, C)."""
    q, k, v = attn.to_q(queries), attn.to_k(keys), attn.to_v(keys)
    heads = attn.heads
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(0, 1) for t in (q, k, v))  # (h, T, d)
    out = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1) @ v
    return attn.to_out[0](out.transpose(0, 1).flatten(1))


@pytest.mark.parametrize("with_labels", [False, True])
def test_copy_attention_sources_attend_alone_and_readers_read_only_the_source(with_labels):
    """Each group's first panel is plain self-attention; every other panel sees its own tokens plus the
    source's lent tokens -- never a sibling's -- with or without the explicit (part-loss) path."""
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    groups, panels, tokens = 2, 3, 6
    hidden = torch.randn(groups * panels, tokens, 8)
    indices = torch.tensor([0, 2, 5])
    labels = torch.randint(-1, 3, (groups * panels, tokens)) if with_labels else None
    with torch.no_grad():
        out, loss = wt.copy_attention(attn, hidden, panels, indices, labels)
        for g in range(groups):
            source = hidden[g * panels]
            torch.testing.assert_close(out[g * panels], _plain_attention(attn, source, source))
            for p in range(1, panels):
                own = hidden[g * panels + p]
                expected = _plain_attention(attn, own, torch.cat([own, source[indices]]))
                torch.testing.assert_close(out[g * panels + p], expected)
    assert (loss is not None) == with_labels


@pytest.mark.parametrize("with_labels", [False, True])
def test_copy_attention_strength_equals_repeating_the_source_tokens(with_labels):
    """Strength 3 weights the lent tokens as if each were there three times; the source itself is unchanged."""
    torch.manual_seed(1)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    panels, tokens = 2, 5
    hidden = torch.randn(panels, tokens, 8)
    indices = torch.tensor([1, 3])
    labels = torch.randint(-1, 3, (panels, tokens)) if with_labels else None
    with torch.no_grad():
        out, _ = wt.copy_attention(attn, hidden, panels, indices, labels, strength=3.0)
        plain, _ = wt.copy_attention(attn, hidden, panels, indices, labels)
        source, own = hidden[0], hidden[1]
        repeated = _plain_attention(attn, own, torch.cat([own, source[indices].repeat(3, 1)]))
    torch.testing.assert_close(out[1], repeated)
    torch.testing.assert_close(out[0], plain[0])
    assert not torch.allclose(out[1], plain[1])


def test_grown_unet_starts_as_the_unet_it_grew_from():
    """Encoder attention added to a trained UNet starts as an identity: the same predictions."""
    small = wt.tiny_unet(0).eval()
    grown = wt.tiny_unet(1, encoder_attention=True).eval()
    new = wt.load_grown(grown, small.state_dict())
    assert new and all(name.startswith("down_blocks.0.attentions.") for name in new)
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 5, wt.TINY_UNET_CONFIG["cross_attention_dim"])
    with torch.no_grad():
        torch.testing.assert_close(grown(sample, 500, text).sample, small(sample, 500, text).sample)
