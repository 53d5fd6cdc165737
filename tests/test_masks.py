"""Subject masks from attention maps and boxes: pure functions on synthetic maps."""

import torch

from storydiffusion.csa import masks


def blob(centre: tuple[float, float], size: int = 32, width: float = 3.0) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    return torch.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * width**2))


def test_otsu_splits_a_bimodal_set_between_its_modes():
    values = torch.cat([torch.full((300,), 0.1), torch.full((100,), 0.8)]) + 0.02 * torch.randn(400)
    threshold = masks.otsu_threshold(values.clamp(0, 1))
    assert 0.15 < threshold < 0.75


def test_mask_from_map_covers_the_blob_and_nothing_far_away():
    torch.manual_seed(0)
    soft = blob((10, 20)) + 0.02 * torch.rand(32, 32)
    mask = masks.mask_from_map(soft, dilation=1)
    assert mask[10, 20] and mask[10, 17] and not mask[25, 5] and not mask[10, 31]
    undilated = masks.mask_from_map(soft, dilation=0)
    assert mask.sum() > undilated.sum() and (mask | undilated).equal(mask)  # dilation only grows it


def test_two_characters_get_their_own_blob_and_no_shared_token():
    left, right = blob((16, 8), width=5.0), blob((16, 24), width=5.0)
    raw = {"Bob": masks.mask_from_map(left, 2), "Ann": masks.mask_from_map(right, 2)}
    assert (raw["Bob"] & raw["Ann"]).any()  # wide blobs and dilation overlap in the middle
    apart = masks.exclusive(raw, {"Bob": left, "Ann": right})
    assert not (apart["Bob"] & apart["Ann"]).any()
    assert apart["Bob"][16, 8] and apart["Ann"][16, 24]
    assert apart["Bob"][16, 15] and apart["Ann"][16, 17]  # the shared middle goes to the nearer character
    assert (apart["Bob"] | apart["Ann"]).equal(raw["Bob"] | raw["Ann"])


def test_box_masks_and_resizing():
    mask = masks.box_mask((0.0, 0.5, 0.5, 1.0), (4, 4))  # the bottom-left quarter
    assert mask.tolist() == [[False] * 4, [False] * 4, [True, True, False, False], [True, True, False, False]]
    assert masks.box_mask((0.3, 0.3, 0.31, 0.31), (4, 4)).sum() == 1  # a sliver still marks its cell
    small = masks.resize_mask(masks.box_mask((0.0, 0.5, 0.5, 1.0), (8, 8)), (2, 2))
    assert small.tolist() == [[False, False], [True, False]]
    large = masks.resize_mask(mask, (8, 8))
    assert large.sum() == 16 and large[7, 0] and not large[0, 7]


def test_token_owner_flattens_in_row_major_order():
    a = masks.box_mask((0.0, 0.0, 0.5, 0.5), (2, 2))
    b = masks.box_mask((0.5, 0.5, 1.0, 1.0), (2, 2))
    assert masks.token_owner([a, b]).tolist() == [0, -1, -1, 1]
