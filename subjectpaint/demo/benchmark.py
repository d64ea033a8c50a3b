"""The demo fidelity benchmark: place held-out products into held-out rooms and score against the truth.

For every held-out scene three placements share one seed: the scene's own exemplar ("right"), the exemplar of
a different held-out product ("mismatched"), and no exemplar at all (the learned unconditional vector:
"uncond"). Masked PSNR/SSIM are measured inside the scene's mask against the true composite; the background
error outside the region paste-back may touch (so it must be 0).
"""

from __future__ import annotations

import statistics

from ..evaluate import background_error, masked_psnr, masked_ssim
from ..images import load_mask
from ..masks import PasteBack
from ..result import image_grid
from .scenes import EVAL_SEEDS, make_scene

VARIANTS = ("right", "mismatched", "uncond")


def eval_scenes(n: int = 50, size: int = 64):
    """n held-out scenes (seeds never used in training) and, for each, a scene of a different product."""
    seeds = list(EVAL_SEEDS[:n])
    scenes = [make_scene(s, size) for s in seeds]
    others = []
    for i, scene in enumerate(scenes):
        j = (i + max(1, n // 2)) % n
        while scenes[j].product == scene.product and j != i:
            j = (j + 1) % n
        others.append(scenes[j])
    return scenes, others


def run_fidelity(studio, n: int = 50, steps: int = 25, seed: int = 0, batch: int = 16, progress: bool = True):
    """Rows (one per scene and variant) with psnr, ssim, bg_mean, bg_max; plus the placements for grids."""
    scenes, others = eval_scenes(n, studio.base.resolution)
    rows, placements = [], {v: [] for v in VARIANTS}
    for start in range(0, n, batch):
        chunk = range(start, min(n, start + batch))
        for variant in VARIANTS:
            jobs = []
            for i in chunk:
                s = scenes[i]
                exemplar = {"right": s.exemplar, "mismatched": others[i].exemplar, "uncond": None}[variant]
                jobs.append((s.room, s.mask, exemplar))
            placed = studio.inpaint_many(jobs, steps=steps, seed=seed, progress=progress)
            for i, p in zip(chunk, placed):
                rows.append({"scene": scenes[i].seed, "variant": variant, **scene_metrics(p.image, scenes[i])})
                placements[variant].append(p)
    return rows, placements, scenes


def scene_metrics(image, scene) -> dict:
    """PSNR/SSIM inside the scene's mask against the truth; background error outside the region paste-back
    may touch (the mask grown by the default dilate + feather), which must be 0."""
    mask = load_mask(scene.mask, scene.mask.size)
    grown = (PasteBack().alpha(mask) > 0).float()
    bg = background_error(image, scene.composite, grown)
    return {"psnr": masked_psnr(image, scene.composite, mask), "ssim": masked_ssim(image, scene.composite, mask),
            "bg_mean": bg.mean, "bg_max": bg.max}


def summarize(rows) -> list[dict]:
    out = []
    for variant in VARIANTS:
        sel = [r for r in rows if r["variant"] == variant]
        psnr = [r["psnr"] for r in sel]
        out.append({
            "variant": variant,
            "n": len(sel),
            "psnr": statistics.mean(psnr),
            "psnr_sd": statistics.stdev(psnr) if len(psnr) > 1 else 0.0,
            "ssim": statistics.mean(r["ssim"] for r in sel),
            "bg_mean": statistics.mean(r["bg_mean"] for r in sel),
            "bg_max": max(r["bg_max"] for r in sel),
        })
    return out


def fidelity_grid(placements, scenes, k: int = 8, height: int = 128):
    """k scenes: room | mask | exemplar | placed (right exemplar) | truth | mismatched | uncond."""
    rows = []
    for i in range(min(k, len(scenes))):
        right = placements["right"][i]
        rows.append([
            ("room", right.room), ("mask", right.mask), ("exemplar", right.exemplar), ("placed", right.image),
            ("truth", scenes[i].composite), ("other exemplar", placements["mismatched"][i].image),
            ("uncond", placements["uncond"][i].image),
        ])
    return image_grid(rows, height=height)
