"""Paste-back: outside the grown mask the output is the input, bit for bit."""

import numpy as np
import pytest
import torch

from subjectpaint.masks import PasteBack
from subjectpaint.studio import Studio
from tests.conftest import box_mask_image, random_image


def grown(mask: np.ndarray, radius: int) -> np.ndarray:
    """Chebyshev dilation written plainly: True where a mask pixel lies within `radius`."""
    h, w = mask.shape
    out = np.zeros_like(mask, dtype=bool)
    for y, x in zip(*np.nonzero(mask)):
        out[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1] = True
    return out


@pytest.mark.parametrize(
    "size,box,paste",
    [
        ((48, 32), (10, 8, 30, 24), PasteBack()),  # work size = input size
        ((45, 37), (3, 5, 20, 30), PasteBack(dilate=1, feather=6)),  # not a multiple of 8: padded and cropped
        ((70, 50), (30, 10, 60, 45), PasteBack(dilate=3, feather=2)),  # larger than the base: scaled down and up
    ],
)
def test_every_pixel_outside_the_grown_mask_is_the_input(tiny_base, size, box, paste):
    room, mask = random_image(*size, seed=4), box_mask_image(*size, box)
    placed = Studio(tiny_base).inpaint(room, mask, random_image(30, 30, 5), steps=3, seed=0, paste_back=paste, progress=False)
    out, inp = np.asarray(placed.image), np.asarray(room)
    assert out.shape == inp.shape  # size restored
    outside = ~grown(np.asarray(mask) > 127, sum(paste.resolved(size)))
    assert outside.any()
    assert np.array_equal(out[outside], inp[outside])
    # and the mask itself is the generated image, not the input
    inside = np.asarray(mask) > 127
    assert np.array_equal(out[inside], np.asarray(placed.generated)[inside])
    assert not np.array_equal(out[inside], inp[inside])


def test_without_paste_back_the_background_shifts(tiny_base):
    # the complaint paste-back fixes: the raw decoder output changes pixels outside the mask
    room, mask = random_image(48, 32, 4), box_mask_image(48, 32, (10, 8, 30, 24))
    placed = Studio(tiny_base).inpaint(room, mask, random_image(30, 30, 5), steps=3, seed=0, paste_back=False, progress=False)
    outside = ~grown(np.asarray(mask) > 127, 6)
    assert not np.array_equal(np.asarray(placed.image)[outside], np.asarray(room)[outside])


def test_default_seam_scales_with_the_image():
    assert PasteBack().resolved((512, 384)) == (2, 4)
    assert PasteBack().resolved((64, 64)) == (1, 2)
    assert PasteBack().resolved((2048, 1024)) == (8, 16)


def test_alpha_is_one_near_the_mask_zero_far_and_monotone_between():
    mask = torch.zeros(40, 40)
    mask[15:25, 15:25] = 1
    paste = PasteBack(dilate=2, feather=6)
    alpha = paste.alpha(mask)
    assert torch.all(alpha[13:27, 13:27] == 1)  # within dilate
    far = ~torch.from_numpy(grown(mask.numpy() > 0, 8))
    assert torch.all(alpha[far] == 0)
    row = alpha[20, 25:]  # moving away from the mask edge the weight never increases
    assert torch.all(row[1:] <= row[:-1])
    assert 0 < alpha[20, 29] < 1  # a real ramp, not a hard edge
