"""The procedural scene generator: determinism, ground-truth consistency, photo boxes, splits."""

import numpy as np
import PIL.Image
import pytest

from subjectpaint.demo import scenes as S
from subjectpaint.errors import InvalidArgument

SEEDS = [0, 1, 7, 123_456, S.EVAL_SEEDS[0], S.EVAL_SEEDS[-1]]


def _bytes(scene):
    return [scene.room.tobytes(), scene.composite.tobytes(), scene.mask.tobytes(), scene.silhouette.tobytes(),
            scene.exemplar.tobytes()]


@pytest.mark.parametrize("seed", SEEDS)
def test_scene_is_deterministic(seed):
    a, b = S.make_scene(seed), S.make_scene(seed)
    assert _bytes(a) == _bytes(b)
    assert a.box == b.box and a.product == b.product


def test_different_seeds_differ():
    scenes = [S.make_scene(s) for s in range(12)]
    assert len({sc.room.tobytes() for sc in scenes}) == 12
    assert len({sc.composite.tobytes() for sc in scenes}) == 12
    assert len({sc.product for sc in scenes}) == 12
    assert S.make_room(3).tobytes() != S.make_room(4).tobytes()


@pytest.mark.parametrize("seed", SEEDS + list(range(20, 40)))
@pytest.mark.parametrize("size", [64, 96])
def test_scene_ground_truth_is_consistent(seed, size):
    sc = S.make_scene(seed, size)
    room, comp = np.asarray(sc.room), np.asarray(sc.composite)
    mask, sil = np.asarray(sc.mask), np.asarray(sc.silhouette)
    assert room.shape == comp.shape == (size, size, 3) and mask.shape == sil.shape == (size, size)
    assert set(np.unique(mask)) <= {0, 255}
    outside = mask == 0
    assert np.array_equal(comp[outside], room[outside])  # composite == room outside the mask, exactly
    assert (mask[sil > 0] == 255).all()  # the product lies inside the mask
    # the box is the silhouette's tight box, and the mask is a rectangle around it
    ys, xs = np.nonzero(sil)
    assert sc.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    mys, mxs = np.nonzero(mask)
    mx0, my0, mx1, my1 = mxs.min(), mys.min(), mxs.max() + 1, mys.max() + 1
    assert (mx0, my0, mx1, my1) == sc.mask_box and (mask[my0:my1, mx0:mx1] == 255).all()
    # size: product height 25-55% of the frame (plus a pixel of antialiasing), inside the frame
    h = sc.box[3] - sc.box[1]
    assert 0.25 * size - 2 <= h <= 0.55 * size + 2
    # the product actually changed the masked region, and it is opaque in its core
    assert np.abs(comp.astype(int) - room.astype(int))[sil > 250].sum() > 0
    assert (sil == 255).sum() > 0.3 * (sil > 0).sum()
    assert sc.exemplar.size == (size, size) and sc.exemplar.mode == "RGB"


def test_exemplar_differs_from_composite_crop():
    for seed in range(6):
        sc = S.make_scene(seed)
        crop = np.asarray(sc.composite.crop(sc.box).resize(sc.exemplar.size, PIL.Image.BICUBIC), np.float32)
        ex = np.asarray(sc.exemplar, np.float32)
        assert np.abs(crop - ex).mean() > 5.0
        # ...but it shows the same product: the dominant product colour is present in the exemplar
        body = np.asarray(sc.composite)[np.asarray(sc.silhouette) == 255].astype(np.float32)
        assert np.abs(ex.reshape(-1, 3)[:, None] - body[None, ::7]).sum(-1).min() < 60


def test_scene_with_given_product_and_size_independent_layout():
    p = S.Product.from_seed(S.HELDOUT_PRODUCT_SEEDS[3])
    sc = S.make_scene(42, product=p)
    assert sc.product == p
    # same seed, bigger frame: same layout (relative box within a few percent)
    a, b = S.make_scene(42, 64), S.make_scene(42, 128)
    assert a.product == b.product
    assert np.allclose(np.array(a.box) / 64, np.array(b.box) / 128, atol=0.05)


def test_products_are_deterministic_and_varied():
    assert S.Product.from_seed(5) == S.Product.from_seed(5)
    products = [S.Product.from_seed(s) for s in range(300)]
    assert {p.shape for p in products} == set(S.SHAPES)
    assert {p.pattern for p in products} == set(S.PATTERNS)
    assert len({p.color for p in products}) > 250
    assert len(S.SHAPES) >= 6


@pytest.mark.parametrize("shape", S.SHAPES)
@pytest.mark.parametrize("pattern", ["solid", "stripes_d", "dots", "checks"])
def test_product_render(shape, pattern):
    p = S.Product(shape, (200, 40, 40), pattern, (20, 20, 220), (60, 60, 60), 0.1, 0.3, 1.0, seed=0)
    img = p.render(64, rotation=10, lighting=1.1)
    assert img.mode == "RGBA" and img.size == (64, 64)
    a = np.asarray(img)[..., 3]
    assert a[0].max() == 0 and a[-1].max() == 0 and a[:, 0].max() == 0 and a[:, -1].max() == 0  # fits
    assert 0.08 < (a > 127).mean() < 0.6
    assert 0 < ((a > 0) & (a < 255)).sum() < (a == 255).sum()  # antialiased edge, solid core
    rgb = np.asarray(img)[..., :3][a == 255].astype(int)
    if pattern != "solid":  # both pattern colours appear
        assert (rgb[:, 2] > rgb[:, 0] + 30).any() and (rgb[:, 0] > rgb[:, 2] + 30).any()
    assert p.render(64, 10, 1.1).tobytes() == img.tobytes()
    assert np.asarray(p.render(64, lighting=0.6))[..., :3].mean() < np.asarray(p.render(64))[..., :3].mean()


def test_product_validation():
    with pytest.raises(InvalidArgument):
        S.Product("spaceship", (0, 0, 0), "solid", (0, 0, 0), (0, 0, 0), 0.1, 0.0, 1.0, 0)
    with pytest.raises(InvalidArgument):
        S.Product("mug", (0, 0, 0), "plaid", (0, 0, 0), (0, 0, 0), 0.1, 0.0, 1.0, 0)
    with pytest.raises(InvalidArgument):
        S.Product.from_seed(-1)


def test_product_photos_boxes_are_tight():
    p = S.Product.from_seed(11)
    photos = S.product_photos(p, 8, size=64, seed=3)
    assert len(photos) == 8
    for ph in photos:
        a = np.asarray(ph.alpha)
        ys, xs = np.nonzero(a)
        assert ph.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        x0, y0, x1, y1 = ph.box
        assert 0.4 * 64 - 3 <= max(x1 - x0, y1 - y0) <= 0.8 * 64 + 1
        img = np.asarray(ph.image).astype(int)
        # a light, near-uniform background away from the product
        bg = img[a == 0]
        assert bg.mean() > 170 and bg.std() < 20
        assert min(ph.background) > 190
    # deterministic, prefix-stable, and the photos differ from one another
    again = S.product_photos(p, 3, size=64, seed=3)
    assert [x.image.tobytes() for x in again] == [x.image.tobytes() for x in photos[:3]]
    assert len({x.image.tobytes() for x in photos}) == 8
    assert S.product_photos(p, 1, seed=4)[0].image.tobytes() != photos[0].image.tobytes()


def test_room_is_a_room():
    for seed in range(10):
        room = np.asarray(S.make_room(seed, 64)).astype(np.float32)
        assert room.shape == (64, 64, 3)
        assert room.std() > 5  # not flat
    assert S.make_room(5).tobytes() == S.make_room(5).tobytes()


def test_splits():
    assert S.scene_split(0) == "train" and S.scene_split(999_999) == "train"
    assert S.scene_split(10_000_000) == "eval" and S.scene_split(10_000_999) == "eval"
    for bad in (1_000_000, 9_999_999, 10_001_000, -1):
        with pytest.raises(InvalidArgument):
            S.scene_split(bad)
    with pytest.raises(InvalidArgument):
        S.make_scene(5_000_000)
    assert not set(S.TRAIN_PRODUCT_SEEDS) & set(S.HELDOUT_PRODUCT_SEEDS)
    assert not set(S.TRAIN_SEEDS) & set(S.EVAL_SEEDS)
    # training scenes use training products, evaluation scenes held-out products
    assert all(S.product_split(S.make_scene(s).product.seed) == "train" for s in range(10))
    evals = [S.make_scene(s) for s in S.EVAL_SEEDS[:5]]
    assert all(S.product_split(sc.product.seed) == "heldout" for sc in evals)
    assert evals[0].split == "eval"
    seeds = S.heldout_scene_seeds(S.HELDOUT_PRODUCT_SEEDS[7])
    assert len(seeds) == 10 and all(S.scene_split(s) == "eval" for s in seeds)
    assert {S.make_scene(s).product.seed for s in seeds[:3]} == {S.HELDOUT_PRODUCT_SEEDS[7]}
    with pytest.raises(InvalidArgument):
        S.heldout_scene_seeds(3)


def test_preview_writes_a_grid(tmp_path):
    path = S.preview(tmp_path / "p.png", n=4, size=32, scale=2)
    img = PIL.Image.open(path)
    assert img.width > img.height > 0 and img.mode == "RGB"
