"""Input handling: every accepted form converts right; every bad input is a typed error and writes nothing."""

import io

import numpy as np
import PIL.Image
import pytest
import torch

from subjectpaint import cli
from subjectpaint.errors import InvalidImage, InvalidMask
from subjectpaint.images import MASK_THRESHOLD, load_exemplar, load_image, load_mask
from subjectpaint.studio import Studio
from tests.conftest import box_mask_image, random_image


# ---------------------------------------------------------------- conversions


def test_exif_orientation_is_applied(tmp_path):
    img = PIL.Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    top = np.asarray(loaded)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue stripe is now on top


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "I;16", "L", "1", "F"])
def test_modes_convert_to_8bit_rgb(mode):
    base = random_image(16, 12, 3)
    if mode == "I;16":
        arr = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        img = PIL.Image.fromarray(arr)
        assert img.mode.startswith("I;16")
    elif mode == "F":
        img = PIL.Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32) / 255.0)
    else:
        img = base.convert(mode)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (16, 12)
    if mode in ("I;16", "L", "F"):
        assert np.abs(np.asarray(out)[..., 0].astype(int) - np.asarray(base.convert("L"), dtype=int)).max() <= 1


def test_transparent_pixels_become_white():
    img = PIL.Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    img.putpixel((0, 0), (10, 20, 30, 255))
    out = np.asarray(load_image(img))
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[4, 4]) == (255, 255, 255)


def test_load_cutout_keeps_the_alpha_of_a_transparent_image_only():
    from subjectpaint.images import load_cutout

    img = PIL.Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    img.putpixel((1, 2), (10, 20, 30, 128))
    rgb, alpha = load_cutout(img)
    assert np.array_equal(np.asarray(rgb), np.asarray(load_image(img)))  # the same RGB as load_image
    assert alpha.shape == (8, 8) and alpha[2, 1] == pytest.approx(128 / 255) and alpha.sum() == alpha[2, 1]
    assert load_cutout(PIL.Image.new("RGBA", (8, 8), (1, 2, 3, 255)))[1] is None  # opaque: a photo
    assert load_cutout(PIL.Image.new("RGB", (8, 8)))[1] is None


def test_numpy_tensor_path_and_bytes_inputs_agree(tmp_path):
    img = random_image(24, 16, 7)
    arr = np.array(img)
    path = tmp_path / "room.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    tensor = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
    for source in (arr, arr.astype(np.float32) / 255.0, (arr.astype(np.uint16) * 257), tensor, path, str(path), buf.getvalue()):
        assert np.array_equal(np.asarray(load_image(source)), arr)


def test_mask_threshold_and_scale_only_resize():
    values = np.array([[0, 127, 128, 255]], dtype=np.uint8).repeat(4, axis=0)
    mask = load_mask(PIL.Image.fromarray(values, mode="L"), (4, 4))
    assert mask[0].tolist() == [0.0, 0.0, 1.0, 1.0]  # edit where value > 0.5 of full scale
    assert MASK_THRESHOLD == 0.5
    big = box_mask_image(96, 64, (20, 16, 60, 48))
    small = load_mask(big, (48, 32))  # same aspect, half size
    assert small.shape == (32, 48) and small[8:24, 10:30].all() and small.sum() == 20 * 16


def test_non_multiple_of_8_size_is_restored(tiny_base):
    room, mask = random_image(45, 29, 1), box_mask_image(45, 29, (5, 5, 25, 20))
    placed = Studio(tiny_base).inpaint(room, mask, random_image(20, 20, 2), steps=2, seed=0, progress=False)
    assert placed.image.size == (45, 29) and placed.generated.size == (45, 29)


# ---------------------------------------------------------------- bad input: typed error, nothing written


def _write(tmp_path, name, image):
    path = tmp_path / name
    image.save(path)
    return path


@pytest.fixture
def files(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    good = io.BytesIO()
    random_image(48, 32).save(good, format="PNG")
    corrupt.write_bytes(good.getvalue()[:60])  # truncated PNG
    return {
        "room": _write(tmp_path, "room.png", random_image(48, 32, 1)),
        "mask": _write(tmp_path, "mask.png", box_mask_image(48, 32, (10, 8, 30, 24))),
        "exemplar": _write(tmp_path, "exemplar.png", random_image(30, 30, 2)),
        "corrupt": corrupt,
        "text": _write_text(tmp_path / "notes.png", "not an image"),
        "empty_mask": _write(tmp_path, "empty.png", PIL.Image.new("L", (48, 32), 0)),
        "black": _write(tmp_path, "black.png", PIL.Image.new("RGB", (30, 30), (0, 0, 0))),
        "square_mask": _write(tmp_path, "square.png", box_mask_image(32, 32, (4, 4, 20, 20))),
        "missing": tmp_path / "nope.png",
    }


def _write_text(path, text):
    path.write_text(text)
    return path


BAD_CASES = [
    ("room", "corrupt", InvalidImage, "not a readable image"),
    ("room", "text", InvalidImage, "not a readable image"),
    ("room", "missing", InvalidImage, "not found"),
    ("mask", "empty_mask", InvalidMask, "empty"),
    ("mask", "square_mask", InvalidMask, "aspect ratio"),
    ("mask", "corrupt", InvalidMask, "not a readable image"),
    ("exemplar", "black", InvalidImage, "all zero"),
    ("exemplar", "corrupt", InvalidImage, "not a readable image"),
]


@pytest.mark.parametrize("slot,bad,error,message", BAD_CASES)
def test_bad_input_raises_typed_error_in_the_sdk(tiny_base, files, slot, bad, error, message):
    args = {k: files[k] for k in ("room", "mask", "exemplar")}
    args[slot] = files[bad]
    with pytest.raises(error, match=message):
        Studio(tiny_base).inpaint(args["room"], args["mask"], args["exemplar"], steps=2, progress=False)


@pytest.mark.parametrize("slot,bad,error,message", BAD_CASES)
def test_bad_input_in_the_cli_writes_nothing(tmp_path, files, capsys, slot, bad, error, message):
    args = {k: str(files[k]) for k in ("room", "mask", "exemplar")}
    args[slot] = str(files[bad])
    out_dir = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = cli.main(
        ["inpaint", args["room"], args["mask"], args["exemplar"], "-o", str(out_dir / "placed.png"),
         "--grid", str(out_dir / "grid.png"), "--base", "tiny", "-q"]
    )
    assert code == 1
    assert error.__name__ in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no output, no directory, no temp file


def test_uniform_exemplar_and_wrong_types():
    with pytest.raises(InvalidImage, match="uniform"):
        load_exemplar(PIL.Image.new("RGB", (8, 8), (200, 10, 10)))
    with pytest.raises(InvalidImage, match="must be a PIL image"):
        load_image(12345)
    with pytest.raises(InvalidImage, match=r"\[0, 1\]"):
        load_image(np.full((4, 4, 3), 2.0, dtype=np.float32))
    with pytest.raises(InvalidMask, match=r"\[0, 1\]"):
        load_mask(torch.full((4, 4), -1.0), (4, 4))
    with pytest.raises(InvalidImage, match="zero size"):
        load_image(np.zeros((0, 4, 3), dtype=np.uint8))
