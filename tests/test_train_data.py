"""SubjectDataModule: deterministic per sample, masks cover the product, composites vary, sampler splits ranks."""

import numpy as np
import PIL.Image
import pytest
import torch

from subjectpaint.demo.scenes import HELDOUT_PRODUCT_SEEDS, Product, make_room, product_photos
from trainers.annotate import foreground_box
from trainers.data import (StepSampler, SubjectData, SubjectDataModule, prepare, signed_target, to_uint8, to_unit,
                           upright_angle)


@pytest.fixture(scope="module")
def data():
    photos = [p.image for p in product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[2]), 3)]
    notes = [foreground_box(p) for p in photos]
    rooms = [make_room(s, 64) for s in range(6)]
    return SubjectDataModule(photos, notes, size=64, reference_size=64, backgrounds=rooms, batch_size=4, seed=3)


def test_sample_is_a_pure_function_of_seed_and_index(data):
    a, b, c = data.dataset[17], data.dataset[17], data.dataset[18]
    for key in ("target", "mask", "reference"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["reference"], c["reference"]) or not torch.equal(a["target"], c["target"])
    other = SubjectData(data.cutouts, None, size=64, seed=4)
    assert not torch.equal(other[17]["reference"], a["reference"])


def test_shapes_ranges_and_mask_covers_the_product(data):
    ds = data.dataset
    composites = 0
    for i in range(40):
        item = ds[i]
        assert item["target"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
        assert item["target"].dtype == item["mask"].dtype == torch.uint8  # a quarter of float32's bytes
        signed = signed_target(item["target"])
        assert signed.dtype == torch.float32 and signed.min() >= -1 and signed.max() <= 1
        assert set(item["mask"].unique().tolist()) <= {0, 1}
        frac = item["mask"].float().mean().item()
        assert 0.02 < frac < 0.9
        # the product (pixels unlike the photo backdrop) lies inside the mask
        rgb = item["target"].float()
        backdrop = torch.tensor(ds.cutouts[0].backdrop, dtype=torch.float32)[:, None, None]
        if (rgb[:, :2, :] - backdrop).abs().max() > 40:  # a composite: a room behind the product
            composites += 1
    assert 10 < composites < 35  # both kinds of target occur (composite_p = 0.6)


def test_reference_augmentation_varies_but_shows_the_product(data):
    refs = torch.stack([data.dataset[i]["reference"] for i in range(12)])
    assert refs.std(0).mean() > 0.05  # flips/rotations/blur differ between samples
    assert refs.shape[1:] == (3, 64, 64)


def test_prepare_squares_a_non_square_photo():
    photo = product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[4]), 1, size=64)[0]
    wide = photo.image.resize((96, 64))
    note = foreground_box(wide)
    cut = prepare(wide, note, 32)
    assert cut.image.size == (32, 32) and cut.matte.shape == (32, 32)
    x0, y0, x1, y1 = cut.box
    assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
    assert cut.matte[y0:y1, x0:x1].mean() > 0.3


def test_step_sampler_splits_ranks_and_resumes_at_a_step():
    def take(s, n):
        it = iter(s)
        return [next(it) for _ in range(n)]

    r0, r1 = take(StepSampler(4, 0, 2), 12), take(StepSampler(4, 1, 2), 12)
    assert not set(r0) & set(r1) and sorted(r0 + r1) == list(range(24))
    assert take(StepSampler(4, 0, 1, start_step=3), 4) == take(StepSampler(4, 0, 1), 16)[12:]


def test_upright_angle_undoes_a_known_tilt():
    import PIL.Image

    bar = np.zeros((64, 64), np.float32)
    bar[12:52, 24:40] = 1.0  # an upright 16 x 40 product
    assert upright_angle(bar) == 0.0
    tilted = np.asarray(PIL.Image.fromarray(bar).rotate(12, PIL.Image.BILINEAR))
    assert abs(upright_angle(tilted) + 12) <= 1  # rotating back by -12 degrees stands it up
    yy, xx = np.mgrid[0:64, 0:64]
    disc = (((yy - 32) ** 2 + (xx - 32) ** 2) < 20**2).astype(np.float32)
    assert upright_angle(disc) == 0.0  # nothing to straighten: no rotation


def test_contact_shadow_lies_under_the_product_and_inside_the_mask():
    import PIL.Image

    photos = [p.image for p in product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[2]), 2)]
    cutouts = [prepare(p, foreground_box(p), 64) for p in photos]
    grey = [PIL.Image.new("RGB", (64, 64), (150, 150, 150))]  # any darkening of it is the shadow
    for shadow_p in (1.0, 0.0):
        ds = SubjectData(cutouts, grey, size=64, composite_p=1.0, upright=True, shadow_p=shadow_p)
        for i in range(6):
            rng = np.random.default_rng([5, i])
            image, box, extent = ds.composite(cutouts[0], rng)
            rgb = np.asarray(image, dtype=np.float32)
            below = rgb[box[3]:, box[0]:box[2]]  # under the product's box: only room (and shadow)
            if shadow_p:
                assert below.size and below.min() < 150 - 20  # a visible shadow under the product
                dark = (rgb < 150 - 2).any(-1)
                dark[box[1]:box[3], box[0]:box[2]] = False
                mask = ds.mask(box, rng, extent).numpy() > 0.5
                assert dark.any() and mask[dark].all()  # every shadow pixel is to be painted
            else:
                assert extent == box and (below.size == 0 or below.min() >= 149)


def test_cutouts_carry_no_backdrop_into_their_edges():
    # a red product on a white backdrop, its matte soft at the edge: scaled and rotated with premultiplied
    # alpha, no pixel of the cut-out turns pinkish (backdrop bleeding in), however small or tilted
    from trainers.data import _resample, _rotate_cutout

    product = np.ones((20, 12, 3), np.float32)  # white around the product...
    product[2:18, 2:10] = (0.9, 0.05, 0.05)  # ...a red body
    matte = np.zeros((20, 12), np.float32)
    matte[2:18, 2:10] = 1.0
    matte[2:18, 1], matte[2:18, 10] = 0.4, 0.4  # soft sides (colour there: the backdrop's white)
    product[2:18, 1] = product[2:18, 10] = (0.9, 0.05, 0.05)  # decontaminated: the product's own colour
    for rgb, m in (_resample(product, matte, lambda im: im.resize((5, 8), __import__("PIL").Image.BICUBIC)),
                   _rotate_cutout(product, matte, 13.0)):
        seen = m > 0.02
        assert seen.any() and rgb[seen][:, 1].max() < 0.2 and rgb[seen][:, 2].max() < 0.2


@pytest.mark.parametrize("photo_size", [64, 128])  # 128: the photo is scaled down to the training size
def test_prepared_cutout_colours_lose_the_halo_of_the_backdrop(photo_size):
    photo = product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[0]), 1, size=photo_size)[0]
    cut = prepare(photo.image, foreground_box(photo.image), 64)
    colors, matte = cut.crop
    raw = np.asarray(cut.image, dtype=np.float32)[cut.box[1]:cut.box[3], cut.box[0]:cut.box[2]] / 255
    edge = (matte > 0.05) & (matte < 0.95)
    assert edge.sum() >= 10
    backdrop = np.array(cut.backdrop, np.float32) / 255
    # unmixed edge pixels sit further from the backdrop's colour than the photo's own (mixed) pixels
    far = np.linalg.norm(colors[edge] - backdrop, axis=-1).mean()
    near = np.linalg.norm(raw[edge] - backdrop, axis=-1).mean()
    assert far > near + 0.05


def test_exposure_scales_the_composited_product():
    import PIL.Image

    photos = [p.image for p in product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[2]), 1)]
    cut = prepare(photos[0], foreground_box(photos[0]), 64)
    black = [PIL.Image.new("RGB", (64, 64), (0, 0, 0))]
    means = []
    for exposure in ((0.5, 0.5), (1.0, 1.0)):
        ds = SubjectData([cut], black, size=64, composite_p=1.0, exposure=exposure)
        image, box, _ = ds.composite(cut, np.random.default_rng(0))  # same draws: same size, place and flip
        means.append(np.asarray(image, dtype=np.float32)[box[1]:box[3], box[0]:box[2]].mean())
    assert means[0] == pytest.approx(means[1] / 2, rel=0.02)
    with pytest.raises(ValueError):
        SubjectData([cut], black, size=64, exposure=(0.0, 1.0))


def test_placement_box_grows_the_box_by_the_margin_and_the_shadow_room():
    from subjectpaint.masks import placement_box

    assert placement_box((64, 64), (20, 10, 40, 50)) == (17, 7, 43, 56)  # 3 px margin; shadow ceil(0.7 * 4) = 3
    assert placement_box((128, 128), (20, 10, 40, 20)) == (15, 5, 45, 27)  # 5 px margin; shadow ceil(0.7 * 1.5) = 2
    assert placement_box((64, 64), (0, 30, 64, 62)) == (0, 27, 64, 64)  # clipped to the image
    assert placement_box((64, 64), (20, 10, 40, 50), margin=0.0)[0] == 19  # never less than 1 px


def test_contact_shadow_is_dark_under_the_base_line_and_inside_the_placement_box_and_its_extent():
    from subjectpaint.masks import contact_shadow, placement_box, shadow_extent

    rng = np.random.default_rng(0)
    for size in (64, 128):
        for _ in range(200):
            w, h = int(rng.integers(2, size // 2)), int(rng.integers(2, size // 2))
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = (x, y, x + w, y + h)
            full = contact_shadow(box, size, (0, 0, size, size))
            assert full.dtype == np.float32 and 0 <= full.min() and full.max() <= 1
            if y + h < size:  # the row just under the product's centre is in shadow
                assert full[y + h, x + w // 2] > 0.2
            x0, y0, x1, y1 = placement_box((size, size), box)
            outside = full.copy()
            outside[y0:y1, x0:x1] = 0
            assert not outside.any()  # the placement mask leaves room for all of it
            ex0, ey0, ex1, ey1 = shadow_extent(box, size, size)
            outside = full.copy()
            outside[ey0:ey1, ex0:ex1] = 0
            assert not outside.any() and ex0 <= box[0] and ex1 >= box[2]  # so does the extent augmented masks cover
            window = (x0, y0, x1, y1)  # a window gives the same values as the full frame
            np.testing.assert_array_equal(contact_shadow(box, size, window), full[y0:y1, x0:x1])


def test_placement_masks_are_the_products_placement_box_and_cover_its_shadow():
    import PIL.Image

    from subjectpaint.masks import box_mask, mask_box, placement_box

    photos = [p.image for p in product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[2]), 2)]
    cutouts = [prepare(p, foreground_box(p), 64) for p in photos]
    grey = [PIL.Image.new("RGB", (64, 64), (150, 150, 150))]
    ds = SubjectData(cutouts, grey, size=64, composite_p=1.0, upright=True, shadow_p=1.0, placement_p=1.0)
    for i in range(8):
        rng = np.random.default_rng([7, i])
        image, box, extent = ds.composite(cutouts[0], rng)
        mask = ds.mask(box, rng, extent)
        assert torch.equal(mask, box_mask((64, 64), placement_box((64, 64), box)))
        dark = (np.asarray(image, dtype=np.float32) < 150 - 2).any(-1)  # product and shadow
        assert dark.any() and (mask.numpy() > 0.5)[dark].all()  # all of it is to be painted
    # the paper's augmented masks otherwise: random margins, some of them Bezier outlines
    ds.placement_p = 0.0
    masks = [ds.mask((20, 20, 40, 50), np.random.default_rng([8, i]), None) for i in range(12)]
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 6
    assert any(not torch.equal(m, box_mask((64, 64), mask_box(m))) for m in masks)  # not a rectangle


def test_signed_target_is_exactly_the_float_form_of_the_image(data):
    """uint8 samples change no training input: their float form is bit-equal to `to_unit(image) * 2 - 1`."""
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))

    assert torch.equal(signed_target(to_uint8(image)), to_unit(image) * 2 - 1)
    signed = to_unit(image) * 2 - 1
    again = signed_target(signed)  # a float target is copied (the trainer masks its copy in place)
    assert torch.equal(again, signed) and again.data_ptr() != signed.data_ptr()
