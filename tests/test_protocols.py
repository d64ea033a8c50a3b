"""The papers' evaluation protocols: each runs end to end through the CLI on generated demo-scene datasets with
tiny random encoders, and the metric math equals a hand computation."""

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch

from subjectpaint import protocols as pr
from subjectpaint.cli import main
from subjectpaint.demo.datasets import write_demo_dataset
from subjectpaint.errors import InvalidArgument


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16)
    path = tmp_path_factory.mktemp("clip")
    CLIPVisionModelWithProjection(cfg).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("dino") / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def encoders(clip_dir, dino_file):
    return pr.Encoders.load(clip_dir, dino_file, "vit_tiny_patch16_224", lpips=False)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    return {p: write_demo_dataset(p, root / p, n=2, size=64) for p in pr.PROTOCOLS}


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("protocol", pr.PROTOCOLS)
def test_each_protocol_runs_end_to_end_and_prints_table_and_json(protocol, datasets, clip_dir, dino_file, capsys):
    rc = main(["eval", protocol, str(datasets[protocol]), "--base", "tiny", "--steps", "2", "--clip", str(clip_dir),
               "--dino", str(dino_file), "--dino-arch", "vit_tiny_patch16_224"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["protocol"] == protocol and summary["session"] == pr.SESSIONS[protocol]
    assert out[0].split()[0] == "sample" and out[1].startswith("---")  # the table
    expected = {
        "cocoee": ["fid", "clip_score"], "pixels": ["fid", "clip_i"], "lora": ["fid", "clip_i", "dino"],
        "pie": ["clip_whole", "clip_edited", "bg_psnr", "bg_mse_e4", "bg_ssim_e2", "structure_e3", "iou"],
    }[protocol]
    for key in expected:
        assert summary[key] is not None and math.isfinite(summary[key]), key
    assert summary["samples"] == (4 if protocol == "lora" else 2)  # lora: 2 objects x 2 backgrounds
    assert summary["clip_encoder"] == "clip"
    if protocol == "cocoee":
        assert summary["qs"] is None and summary["fid_features"] == "clip"


def test_dataset_layout_errors_are_typed(tmp_path):
    with pytest.raises(InvalidArgument):
        pr.samples("pie", tmp_path)  # no source/
    write_demo_dataset("pie", tmp_path, n=1)
    (tmp_path / "reference" / "scene0.png").unlink()
    with pytest.raises(InvalidArgument, match="reference"):
        pr.samples("pie", tmp_path)
    with pytest.raises(InvalidArgument):
        pr.samples("coco", tmp_path)
    assert main(["eval", "pie", str(tmp_path / "missing"), "--base", "tiny", "-q"]) == 1


# ------------------------------------------------------------------------------------------ metric math


def test_rows_are_the_papers_formulas_by_hand(datasets, encoders, monkeypatch):
    """With the placement replaced by a known image (the truth composite), every row equals its formula."""
    from subjectpaint.evaluate import clip_embed, dino_embed, to_tensor01
    from subjectpaint.studio import Studio

    studio = Studio.load("tiny")
    root = datasets["pie"]
    rng = np.random.default_rng(0)

    def noisy(path):  # the truth composite, changed a little everywhere (so the background differs too)
        a = np.asarray(PIL.Image.open(path).convert("RGB"), np.int16) + rng.integers(-20, 21, (64, 64, 3))
        return PIL.Image.fromarray(a.clip(0, 255).astype(np.uint8))

    truth = {p.stem: noisy(p) for p in sorted((root / "real").iterdir())}
    monkeypatch.setattr(pr, "place", lambda studio, session, sample, *a, **k: {
        "image": truth[sample["name"]], "grounded": sample["silhouette"]})
    rows, summary = pr.run_protocol("pie", root, studio, encoders, progress=False)
    sample = pr.samples("pie", root)[0]
    image, room, mask, ref = truth[sample["name"]], sample["room"], sample["mask"], sample["exemplar"]
    m = np.asarray(mask) > 0
    ys, xs = np.nonzero(m)

    def cos100(a, b):
        a, b = a.double()[0], b.double()[0]
        return float(100 * (a @ b) / (a.norm() * b.norm()))

    x = to_tensor01(image)
    assert rows[0]["clip_whole"] == pytest.approx(cos100(clip_embed([x], encoders.clip), clip_embed([ref], encoders.clip)), abs=1e-4)
    black = x * torch.from_numpy(m).float()
    assert rows[0]["clip_edited"] == pytest.approx(cos100(clip_embed([black], encoders.clip), clip_embed([ref], encoders.clip)), abs=1e-4)
    # background: the edit blacked out in both, MSE over the whole image (PIE-Bench's code), PSNR from it
    a, b = np.asarray(image, np.float64) / 255, np.asarray(room, np.float64) / 255
    mse = (((a - b) * ~m[..., None]) ** 2).mean()
    assert rows[0]["bg_mse_e4"] == pytest.approx(mse * 1e4, rel=1e-6)
    assert rows[0]["bg_psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)
    assert rows[0]["iou"] == 1.0  # the grounded mask handed back is the silhouette itself
    # structure distance: the keys computed by hand from the last block's LayerNorm input and its qkv weights
    model = encoders.dino
    captured = {}
    h = model.blocks[-1].norm1.register_forward_hook(lambda mod, i, o: captured.__setitem__("x", o))

    def self_sim(img):
        dino_embed([img], model)
        dim = model.embed_dim
        w, bias = model.blocks[-1].attn.qkv.weight[dim: 2 * dim], model.blocks[-1].attn.qkv.bias[dim: 2 * dim]
        k = captured["x"][0].double() @ w.double().T + bias.double()
        k = k / k.norm(dim=-1, keepdim=True)
        return k @ k.T

    with torch.no_grad():
        d = float(((self_sim(image) - self_sim(room)) ** 2).mean())
    h.remove()
    assert rows[0]["structure_e3"] == pytest.approx(1000 * d, rel=1e-5)
    assert pr.structure_distance(room, room, model) == 0.0
    # the summary is the mean of the rows
    assert summary["bg_psnr"] == pytest.approx(np.mean([r["bg_psnr"] for r in rows]))
    # the edited region of the other protocols: the mask's bounding box
    crop = pr.edited_region(image, mask)
    assert torch.equal(crop, x[:, ys.min(): ys.max() + 1, xs.min(): xs.max() + 1])


def test_lora_scores_are_pairwise_over_the_objects_photos(encoders):
    """DINO / CLIP of the LoRA paper: the mean cosine (x 100) of the generated region against each photo."""
    from subjectpaint.evaluate import dino_embed

    g = torch.Generator().manual_seed(0)
    region, photos = torch.rand(3, 20, 20, generator=g), [torch.rand(3, 24, 24, generator=g) for _ in range(3)]
    got = float(pr.cosine100(dino_embed([region] * 3, encoders.dino), dino_embed(photos, encoders.dino)).mean())
    e, refs = dino_embed([region], encoders.dino)[0].double(), dino_embed(photos, encoders.dino).double()
    hand = np.mean([float(100 * (e @ r) / (e.norm() * r.norm())) for r in refs])
    assert got == pytest.approx(hand, abs=1e-4)


def test_fid_on_encoder_features_is_the_frechet_formula(encoders):
    """FID with a feature module (CLIP features, as Paint by Example computes it) is
    |mu_r - mu_f|^2 + tr(C_r + C_f - 2 sqrt(C_r C_f)) of the features, by numpy."""
    from subjectpaint.evaluate import fid

    g = torch.Generator().manual_seed(1)
    real = [torch.rand(3, 32, 32, generator=g) for _ in range(24)]
    fake = [(torch.rand(3, 32, 32, generator=g) * 0.6 + 0.2) for _ in range(24)]
    feat = pr._Features(encoders, None)
    got = fid(real, fake, feature=feat, size=32)
    with torch.no_grad():
        fr, ff = (feat(torch.stack(x)).numpy() for x in (real, fake))
    mu_r, mu_f = fr.mean(0), ff.mean(0)
    c_r, c_f = np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
    # tr sqrt(C_r C_f) = the sum of the square roots of the eigenvalues of C_r C_f (real, >= 0: a PSD product)
    tr_sqrt = np.sqrt(np.abs(np.linalg.eigvals(c_r @ c_f).real)).sum()
    hand = float(((mu_r - mu_f) ** 2).sum() + np.trace(c_r + c_f) - 2 * tr_sqrt)
    assert got == pytest.approx(hand, rel=1e-3, abs=1e-4)


def test_background_metrics_blank_out_the_edit(encoders):
    a = np.zeros((16, 16, 3), np.uint8)
    b = a.copy()
    b[4:8, 4:8] = 255  # differs only inside the mask
    mask = np.zeros((16, 16), np.uint8)
    mask[2:10, 2:10] = 255
    out = pr.background_metrics(b, a, mask)
    assert out["bg_mse_e4"] == 0.0 and out["bg_psnr"] == math.inf and out["bg_ssim_e2"] == pytest.approx(100.0)
    b[12, 12] = 255  # one background pixel, all channels: MSE over the whole (blacked-out) image = 1 / 256
    out = pr.background_metrics(b, a, mask)
    assert out["bg_mse_e4"] == pytest.approx(1e4 / 256)
    assert out["bg_psnr"] == pytest.approx(10 * math.log10(256))
