"""Dual-branch grounding on the demo base: the user's mask is the scene's loose box around the product; the
grounded mask must find the product inside it (must-show 2; the full 50-scene figure: bench/session_quality.py)."""

import statistics

import numpy as np
import pytest

from subjectpaint.base import DEMO_DIR
from subjectpaint.demo.scenes import EVAL_SEEDS, make_scene

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "unet").is_dir(), reason="demo weights not trained yet")

SEEDS = list(EVAL_SEEDS[:6])


def iou(a, b):
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def placed():
    from subjectpaint.studio import Studio

    studio = Studio.load()
    session = studio.dual_branch(seed=0)
    scenes = [make_scene(s, studio.base.resolution) for s in SEEDS]
    return scenes, [session.place(sc.exemplar, sc.room, sc.mask) for sc in scenes]


def test_grounded_mask_finds_the_product_inside_the_loose_box(placed):
    scenes, outs = placed
    grounded_iou, box_iou = [], []
    for scene, out in zip(scenes, outs):
        grounded = np.asarray(out.grounded_mask) > 127
        user = np.asarray(scene.mask) > 127
        silhouette = np.asarray(scene.silhouette) > 127
        assert not (grounded & ~user).any()
        grounded_iou.append(iou(grounded, silhouette))
        box_iou.append(iou(user, silhouette))
    # the goal is a mean IoU >= 0.6 (bench/session_quality.py at the defaults, interpolation at lambda 1.0: 0.619 +-
    # 0.144 on 14 scenes, 20 steps); the test holds the line a regression crosses
    assert statistics.mean(grounded_iou) >= 0.55, grounded_iou
    assert min(grounded_iou) >= 0.35, grounded_iou
    # grounding is not the box itself: it is much tighter than the user's loose box
    assert statistics.mean(grounded_iou) > statistics.mean(box_iou) + 0.1


def test_source_branch_reconstructs_the_room(placed):
    from subjectpaint.evaluate import masked_psnr

    scenes, outs = placed
    # inside the mask the source branch stays closer to the room than the target branch, which puts the product
    # there (measured on the shipped base: source 19.8-32.4 dB per scene, target 12.6-23.0 dB)
    source = [masked_psnr(out.source, sc.room, sc.mask) for sc, out in zip(scenes, outs)]
    target = [masked_psnr(out.image, sc.room, sc.mask) for sc, out in zip(scenes, outs)]
    assert min(source) > 17.0
    assert statistics.mean(source) > statistics.mean(target) + 2.0, (source, target)


def test_inversion_source_reconstructs_the_room():
    """source="inversion": the room's DDIM inversion (the inpainting UNet with its unmasked input) replayed by the
    source branch gives the room back: inside the mask (where the target places the product) above 18 dB, the whole
    image above 23 dB (measured on the shipped base at 10 steps: 27.5 / 21.7 / 20.0 dB inside the mask of the first
    three scenes, 30.0 / 27.1 / 24.8 dB over the whole image; the VAE alone caps it)."""
    from subjectpaint.evaluate import masked_psnr
    from subjectpaint.studio import Studio

    studio = Studio.load()
    session = studio.dual_branch(seed=0, steps=10, source="inversion")
    for seed in SEEDS[:2]:
        scene = make_scene(seed, studio.base.resolution)
        out = session.place(scene.exemplar, scene.room, scene.mask)
        everywhere = np.full((scene.room.height, scene.room.width), 255, np.uint8)
        assert masked_psnr(out.source, scene.room, scene.mask) > 18.0
        assert masked_psnr(out.source, scene.room, everywhere) > 23.0
        assert out.info["source"] == "inversion"
