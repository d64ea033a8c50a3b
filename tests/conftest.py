import os

# No model hub is reachable from tests: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import pytest

from subjectpaint.base import ExemplarInpainter


@pytest.fixture(scope="session")
def tiny_base():
    return ExemplarInpainter.tiny(0)


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def box_mask_image(width, height, box):
    m = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    return PIL.Image.fromarray(m, mode="L")


@pytest.fixture
def scene():
    """A non-square room, a box mask and an exemplar, all valid."""
    return random_image(48, 32, 1), box_mask_image(48, 32, (10, 8, 30, 24)), random_image(40, 40, 2)
