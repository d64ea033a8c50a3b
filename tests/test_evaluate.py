"""Metrics: masked PSNR/SSIM, background error, CLIP-I / DINO with tiny random encoders, FID, table."""

import math

import numpy as np
import PIL.Image
import pytest
import torch

from subjectpaint import evaluate as E
from subjectpaint.errors import InvalidImage, InvalidMask, WeightsNotFound


def _img(seed, h=32, w=32):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(h=32, w=32, box=(8, 8, 24, 20)):
    m = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    return m


# ------------------------------------------------------------------------------------------ inputs


def test_to_tensor01_layouts_agree():
    a = _img(0, 20, 24)
    ref = E.to_tensor01(PIL.Image.fromarray(a))
    assert ref.shape == (3, 20, 24) and ref.dtype == torch.float32
    assert 0 <= ref.min() and ref.max() <= 1
    for other in (a, a.astype(np.float32) / 255, torch.from_numpy(a), torch.from_numpy(a).permute(2, 0, 1),
                  torch.from_numpy(a).permute(2, 0, 1).float()[None] / 255):
        assert torch.allclose(E.to_tensor01(other), ref, atol=1e-6)
    with pytest.raises(InvalidImage):
        E.to_tensor01(np.full((4, 4, 3), 2.0, np.float32))
    with pytest.raises(InvalidImage):
        E.to_tensor01("not an image")


# ------------------------------------------------------------------------------------------- pixels


def test_masked_psnr_matches_hand_computation():
    a, b, m = _img(1), _img(2), _mask()
    sel = m > 0
    mse = ((a[sel].astype(np.float64) - b[sel].astype(np.float64)) / 255.0) ** 2
    expected = 10 * math.log10(1.0 / mse.mean())
    assert E.masked_psnr(a, b, m) == pytest.approx(expected, abs=1e-5)
    # a known constant error: every masked pixel off by 10 levels -> 20 log10(255 / 10)
    a = np.maximum(a, 10)
    c = a.copy()
    c[sel] -= 10
    assert E.masked_psnr(c, a, m) == pytest.approx(20 * math.log10(25.5), abs=1e-5)  # torchmetrics: float32 log(10)


def test_masked_psnr_identical_and_cap():
    a, m = _img(3), _mask()
    assert E.masked_psnr(a, a, m) == math.inf
    assert E.masked_psnr(a, a, m, cap=100.0) == 100.0
    b = a.copy()
    b[0, 0] ^= 1  # outside the mask
    assert E.masked_psnr(b, a, m) == math.inf


def test_outside_pixels_do_not_change_masked_scores():
    a, b, m = _img(4), _img(5), _mask()
    b2 = b.copy()
    b2[m == 0] = _img(6)[m == 0]
    assert E.masked_psnr(a, b, m) == E.masked_psnr(a, b2, m)
    # SSIM uses an 11x11 window, so only pixels far from the mask are irrelevant to it
    far = np.ones_like(m, bool)
    far[8 - 6: 20 + 6, 8 - 6: 24 + 6] = False
    b3 = b.copy()
    b3[far] = 0
    assert E.masked_ssim(a, b, m) == pytest.approx(E.masked_ssim(a, b3, m), abs=1e-12)


def test_masked_ssim():
    a, m = _img(7, 48, 48), _mask(48, 48, (10, 10, 30, 40))
    assert E.masked_ssim(a, a, m) == pytest.approx(1.0, abs=1e-9)
    assert E.masked_ssim(a, a, m, region="box") == pytest.approx(1.0, abs=1e-9)
    noisy = np.clip(a.astype(int) + np.random.default_rng(0).normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    worse = np.clip(a.astype(int) + np.random.default_rng(0).normal(0, 90, a.shape), 0, 255).astype(np.uint8)
    s1, s2 = E.masked_ssim(noisy, a, m), E.masked_ssim(worse, a, m)
    assert 0 < s2 < s1 < 1
    with pytest.raises(InvalidMask):
        E.masked_ssim(a, a, np.zeros((48, 48)))


def test_background_error():
    a, m = _img(8), _mask()
    b = a.copy()
    b[m > 0] = 0  # only the edited region differs
    assert tuple(E.background_error(b, a, m)) == (0.0, 0.0)
    c = a.copy().astype(int)
    c[0, 0, 0] = (c[0, 0, 0] + 100) % 256
    err = E.background_error(c.astype(np.uint8), a, m)
    outside = int((m == 0).sum()) * 3
    delta = abs(int(c[0, 0, 0]) - int(a[0, 0, 0]))
    assert err.max == pytest.approx(delta, abs=1e-9) and err.mean == pytest.approx(delta / outside)
    with pytest.raises(InvalidMask):
        E.background_error(a, a, np.full((32, 32), 255, np.uint8))
    with pytest.raises(InvalidMask):
        E.background_error(a, a, np.zeros((16, 16)))  # wrong size


def test_pixel_metrics_on_a_scene():
    from subjectpaint.demo.scenes import make_scene

    sc = make_scene(3)
    row = E.pixel_metrics(sc.room, sc.composite, sc.mask)  # "prediction" = the empty room
    assert row["bg_mean"] == 0.0 and row["bg_max"] == 0.0
    assert 5 < row["psnr"] < 40 and row["ssim"] < 0.95
    perfect = E.pixel_metrics(sc.composite, sc.composite, sc.mask, cap=99.0)
    assert perfect["psnr"] == 99.0 and perfect["ssim"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------- encoders


@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=16)
    return CLIPVisionModelWithProjection(cfg).eval()


@pytest.fixture(scope="module")
def tiny_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0).eval()


def test_clip_i(tiny_clip):
    a = [PIL.Image.fromarray(_img(i, 40, 40)) for i in range(3)]
    b = [PIL.Image.fromarray(_img(10 + i, 40, 40)) for i in range(3)]
    assert E.clip_i(a, a, tiny_clip) == pytest.approx(1.0, abs=1e-6)
    ab, ba = E.clip_i(a, b, tiny_clip, reduction="none"), E.clip_i(b, a, tiny_clip, reduction="none")
    assert ab.shape == (3,) and torch.equal(ab, ba)
    assert float(ab.max()) < 1.0 - 1e-6
    assert E.clip_i(a[0], b[0], tiny_clip) == pytest.approx(float(ab[0]), abs=1e-6)  # single image
    with pytest.raises(Exception):
        E.clip_i(a, b[:2], tiny_clip)


def test_dino(tiny_vit):
    a = [_img(i, 48, 48) for i in range(2)]
    b = [_img(20 + i, 48, 48) for i in range(2)]
    assert E.dino(a, a, tiny_vit) == pytest.approx(1.0, abs=1e-6)
    assert E.dino(a, b, tiny_vit) == E.dino(b, a, tiny_vit)
    assert E.dino(a, b, tiny_vit) < 1.0 - 1e-6
    assert E.dino_embed(a, tiny_vit).shape == (2, 32)


def test_exemplar_i_uses_the_bases_own_exemplar_encoder():
    from subjectpaint.base import ExemplarInpainter

    base = ExemplarInpainter.tiny(0)
    side = base.image_encoder.config.image_size
    a = [torch.from_numpy(_img(i, side, side)).permute(2, 0, 1).float() / 255 for i in range(3)]
    b = [torch.from_numpy(_img(10 + i, side, side)).permute(2, 0, 1).float() / 255 for i in range(3)]
    # at the encoder's size, the embedding is the one the base conditions on (its normalisation, its encoder)
    fe = base.feature_extractor
    pixels = (torch.stack(a) - torch.tensor(fe.image_mean).view(1, 3, 1, 1)) / torch.tensor(fe.image_std).view(1, 3, 1, 1)
    torch.testing.assert_close(E.exemplar_embed(a, base), base.encode_exemplar(pixels)[0][:, 0], rtol=0, atol=1e-5)
    assert E.exemplar_i(a, a, base) == pytest.approx(1.0, abs=1e-6)
    ab = E.exemplar_i(a, b, base, reduction="none")
    assert ab.shape == (3,) and torch.equal(ab, E.exemplar_i(b, a, base, reduction="none"))
    assert float(ab.max()) < 1.0 - 1e-6
    with pytest.raises(E.InvalidArgument):
        E.exemplar_i(a, b[:2], base)


def test_box_crop_is_square_centred_on_the_box_and_black_outside_the_image():
    img = torch.arange(3 * 20 * 30, dtype=torch.float32).reshape(3, 20, 30) / (3 * 20 * 30)
    crop = E.box_crop(img, (10, 5, 20, 15), pad=0.0)  # a 10 x 10 box: the box itself
    torch.testing.assert_close(crop, img[:, 5:15, 10:20])
    crop = E.box_crop(img, (10, 5, 14, 15), pad=0.1)  # 4 x 10 box: side 12, centred on (12, 10)
    assert crop.shape == (3, 12, 12)
    torch.testing.assert_close(crop, img[:, 4:16, 6:18])
    corner = E.box_crop(img, (0, 0, 4, 4), pad=0.5)  # side 8 centred on (2, 2): 2 px off the image on each side
    assert corner.shape == (3, 8, 8) and corner[:, :2].abs().sum() == 0 and corner[:, :, :2].abs().sum() == 0
    torch.testing.assert_close(corner[:, 2:, 2:], img[:, :6, :6])
    with pytest.raises(E.InvalidArgument):
        E.box_crop(img, (5, 5, 5, 9))


class TinyFeatures(torch.nn.Module):
    """A random conv feature extractor: float images in [0, 1] -> (N, 8)."""

    num_features = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=2)

    def forward(self, x):
        return torch.tanh(self.conv(x.float() * 2 - 1)).mean((2, 3)) * 10


def test_fid():
    feat = TinyFeatures()
    rng = np.random.default_rng(0)
    real = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(40)]
    other = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(40)]
    dark = [(im // 3).astype(np.uint8) for im in other]
    same = E.fid(real, real, feature=feat)
    assert abs(same) < 1e-6
    near = E.fid(real, other, feature=feat)
    far = E.fid(real, dark, feature=feat)
    assert far > near > same and far > 1.0
    with pytest.raises(Exception):
        E.fid(real[:1], other, feature=feat)


# ------------------------------------------------------------------------------------ real loaders


def test_load_clip_from_dir_and_offline_errors(tiny_clip, tmp_path):
    tiny_clip.save_pretrained(tmp_path / "clip", safe_serialization=True)
    loaded = E.load_clip(tmp_path / "clip")
    x = [_img(1, 32, 32)]
    assert torch.allclose(E.clip_embed(x, loaded), E.clip_embed(x, tiny_clip), atol=1e-6)
    with pytest.raises(WeightsNotFound, match="not found"):
        E.load_clip(tmp_path / "missing")
    with pytest.raises(WeightsNotFound, match="subjectpaint-test/not-a-model"):
        E.load_clip("subjectpaint-test/not-a-model", local_files_only=True)  # no download attempted


def test_load_dino_errors_are_clear(monkeypatch, tmp_path):
    import timm

    calls = []

    def offline(name, pretrained=False, **kw):
        calls.append(pretrained)
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real_create(name, pretrained=False, **kw)

    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsNotFound, match="vit_small_patch16_224.dino"):
        E.load_dino()
    assert calls == [True]
    with pytest.raises(WeightsNotFound, match="safetensors"):
        E.load_dino(weights=tmp_path / "dino.pth")


# ------------------------------------------------------------------------------------------- table


def test_format_table():
    rows = [{"name": "progressive", "psnr": 23.456, "ssim": 0.81234},
            {"name": "dual", "psnr": math.inf, "ssim": 0.5, "clip_i": None},
            {"name": "x", "psnr": 3, "steps": 20}]
    text = E.format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 5
    assert lines[0].split() == ["name", "psnr", "ssim", "clip_i", "steps"]
    assert "23.456" in lines[2] and "0.812" in lines[2] and "inf" in lines[3] and "-" in lines[3]
    # aligned: every numeric column ends at the same offset on every line
    end = lines[0].index("psnr") + len("psnr")
    assert all(line[:end].rstrip().endswith(v) for line, v in zip(lines[2:], ["23.456", "inf", "3"]))
    assert lines[2].startswith("progressive") and lines[3].startswith("dual ")
    assert E.format_table([]) == ""
    assert E.format_table(rows, columns=["psnr"], floatfmt=".1f").splitlines()[2].strip() == "23.5"
