"""The demo base shipped inside the package: it loads, it is the one trained, and it places what it is shown."""

import json
import statistics

import PIL.Image
import pytest

from subjectpaint import Studio, cli
from subjectpaint.base import DEMO_DIR, ExemplarInpainter
from subjectpaint.demo.benchmark import run_fidelity


@pytest.fixture(scope="module")
def studio():
    return Studio.load()


def test_shipped_weights_are_small_safetensors_and_load(studio):
    files = [p for p in DEMO_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert studio.base.name == "subjectpaint-demo" and studio.base.resolution == 64
    assert studio.base.unet.config.in_channels == 9


def test_fingerprint_is_the_trained_one_and_stable(studio):
    recorded = json.loads((DEMO_DIR / "training.json").read_text())["fingerprint"]
    assert studio.base.fingerprint() == recorded
    assert ExemplarInpainter.demo().fingerprint() == recorded


def test_demo_command_writes_a_png(tmp_path):
    assert cli.main(["demo", "-o", str(tmp_path), "--steps", "8", "-q"]) == 0
    grid = PIL.Image.open(tmp_path / "demo_grid.png")
    grid.verify()
    placed = PIL.Image.open(tmp_path / "demo_placed.png")
    assert placed.size == (64, 64)


def test_the_right_exemplar_beats_a_wrong_one_and_no_exemplar(studio):
    rows, _, _ = run_fidelity(studio, n=8, steps=10, seed=0, batch=8, progress=False)
    mean = {v: statistics.mean(r["psnr"] for r in rows if r["variant"] == v) for v in ("right", "mismatched", "uncond")}
    # the shipped base on these 8 scenes at 10 steps: right 15.14, mismatched 12.78, uncond 14.83 dB
    assert mean["right"] > mean["mismatched"] + 1.5, mean
    assert mean["right"] > mean["uncond"], mean  # the exemplar adds more than a plain unconditional fill
    assert max(r["bg_max"] for r in rows) == 0  # paste-back: the room outside the mask is untouched


def test_every_scheduler_samples_the_v_prediction_base(studio):
    """The demo base predicts v (its scheduler config says so): every named scheduler must read that, and DDIM must
    not clip the predicted latents to [-1, 1] (its default for pixel models; PNDM configs do not carry the key)."""
    from subjectpaint.demo.scenes import EVAL_SEEDS, make_scene
    from subjectpaint.evaluate import masked_psnr
    from subjectpaint.sampler import make_scheduler

    assert make_scheduler("ddim", studio.base.scheduler.config).config.clip_sample is False
    assert make_scheduler("ddim", {**studio.base.scheduler.config, "clip_sample": True}).config.clip_sample is True
    scenes = [make_scene(s, 64) for s in EVAL_SEEDS[:4]]
    psnr = {}
    for name in ("pndm", "ddim", "dpm++", "euler"):
        placed = studio.inpaint_many([(s.room, s.mask, s.exemplar) for s in scenes], steps=20, scheduler=name, seed=0,
                                     progress=False)
        psnr[name] = statistics.mean(masked_psnr(p.image, s.composite, s.mask) for p, s in zip(placed, scenes))
    assert max(psnr.values()) - min(psnr.values()) < 1.5, psnr  # DDIM with clipping was ~5 dB below the others
