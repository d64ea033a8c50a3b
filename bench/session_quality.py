"""Session quality on held-out demo scenes: plain inpainting vs progressive (PIXELS) vs dual-branch (ViMAEdit) variants.

For each of `--n` evaluation scenes (64 px, the demo base, the scene's own exemplar, seed 0, DDIM, 20 steps):

- psnr: masked PSNR inside the scene's mask against the true composite;
- bg: background error outside the mask (mean abs, uint8 levels) against the truth;
- structure: room-structure preservation = SSIM of the Sobel edge maps of result and truth inside the mask's box;
- iou (dual-branch): the grounded mask's IoU with the product's silhouette;
- subject: is the product there, 100 x the cosine of the base's exemplar-encoder embeddings of the placed product's
  box crop and the exemplar (masked PSNR alone rewards a faint product: a room-coloured blur is close to the truth);
- seconds per placement.

Variants: plain; progressive with Algorithm 1's start (init="surgical") and the pure-noise one (init="noise");
dual-branch with both image-embedding guidance forms (the added attention path, eq. 8, and the interpolated
condition token) at several lambdas, and both source forms (empty-mask inpainting, DDIM inversion). Each variant's
PSNR difference against the session defaults is given with its paired 95 % interval (t, n - 1 df); `goal_met`:
no variant of a session is better than its default beyond that interval.

`--grid PATH` writes a figure for the first scenes. `--quick`: 1 scene, 3 steps, 2 dual variants (plumbing only).
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from subjectpaint.evaluate import (  # noqa: E402
    background_error, box_crop, exemplar_i, format_table, masked_psnr, masked_ssim)

METHODS = ("plain", "progressive", "dual_branch")


def edges(image) -> torch.Tensor:
    """Sobel gradient magnitude of the grey image, (3, H, W) in [0, 1] (grey repeated, for masked_ssim)."""
    grey = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)[None, None]
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])[None, None] / 4
    gx = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kx)
    gy = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kx.transpose(-1, -2))
    return (gx**2 + gy**2).sqrt().clamp(0, 1)[0].repeat(3, 1, 1)


def structure(pred, truth, mask) -> float:
    return masked_ssim(edges(pred), edges(truth), mask, region="box")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def stats(values) -> tuple[float, float]:
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 11: 2.20,
        12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 19: 2.09, 24: 2.06, 29: 2.05, 49: 2.01}


def paired_interval(a, b) -> tuple[float, float, float]:
    """Mean of a - b and its 95 % interval (Student t, paired)."""
    d = [x - y for x, y in zip(a, b)]
    mean, sd = stats(d)
    n = len(d)
    t = T975.get(n - 1, T975[max(k for k in T975 if k <= max(1, n - 1))]) if n > 1 else math.inf
    half = t * sd / math.sqrt(n) if n > 1 else math.inf
    return mean, mean - half, mean + half


DUAL_VARIANTS = [  # name -> settings (the one equal to the session defaults is the reference)
    ("dual attention 1.0", dict(guidance="attention", embedding_lambda=1.0)),
    ("dual attention 0.4", dict(guidance="attention", embedding_lambda=0.4)),
    ("dual attention 2.0", dict(guidance="attention", embedding_lambda=2.0)),
    ("dual interpolate 0.4", dict(guidance="interpolate", embedding_lambda=0.4)),
    ("dual interpolate 1.0", dict(guidance="interpolate", embedding_lambda=1.0)),
    ("dual attention 1.0 inversion", dict(guidance="attention", embedding_lambda=1.0, source="inversion")),
    ("dual attention 0.4 inversion", dict(guidance="attention", embedding_lambda=0.4, source="inversion")),
    ("dual interpolate 0.4 inversion", dict(guidance="interpolate", embedding_lambda=0.4, source="inversion")),
    ("dual interpolate 1.0 inversion", dict(guidance="interpolate", embedding_lambda=1.0, source="inversion")),
]
QUICK_DUAL = ("dual interpolate 1.0", "dual attention 1.0 inversion")


def _value(v: str):
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    try:
        return float(v)
    except ValueError:
        return v


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=0, help="start at the evaluation scene with this index")
    parser.add_argument("--base", default=None, help="a diffusers Paint-by-Example directory (default: the demo base)")
    parser.add_argument("--quick", action="store_true", help="1 scene, 3 steps, 2 dual variants")
    parser.add_argument("--grid", type=Path, default=None, help="write a figure of the first --grid-scenes scenes")
    parser.add_argument("--grid-scenes", type=int, default=4)
    parser.add_argument("--dual", nargs="*", default=[], metavar="NAME=VALUE",
                        help="one more dual-branch variant, e.g. embedding_lambda=1.5 inject=false source=inversion")
    parser.add_argument("--only", nargs="*", default=None, metavar="METHOD",
                        help="run only these methods (names as in the table), plus the defaults they are compared to")
    args = parser.parse_args()
    variants = list(DUAL_VARIANTS)
    if args.dual:
        kw = {k: _value(v) for k, v in (item.split("=", 1) for item in args.dual)}
        variants.append(("dual " + " ".join(args.dual), kw))
    if args.quick:
        args.n, args.steps = min(args.n, 1), 3
        variants = [v for v in variants if v[0] in QUICK_DUAL or v in variants[len(DUAL_VARIANTS):]]

    from subjectpaint.demo.scenes import EVAL_SEEDS, make_scene
    from subjectpaint.result import image_grid
    from subjectpaint.sessions.dual_branch import DualBranchSettings
    from subjectpaint.studio import Studio

    studio = Studio.load(args.base)
    size = studio.base.resolution
    defaults = DualBranchSettings()
    def key(kw):
        return tuple(kw.get(k, getattr(defaults, k)) for k in ("guidance", "embedding_lambda", "source"))

    match = [name for name, kw in variants if key(kw) == key({})]
    if not match:
        variants.insert(0, ("dual defaults", {}))
    default_dual = match[0] if match else "dual defaults"
    methods = {
        "plain": lambda sc: studio.inpaint(sc.room, sc.mask, sc.exemplar, steps=args.steps, scheduler="ddim", seed=0,
                                           progress=False),
        "progressive": lambda sc: studio.progressive(steps=args.steps, seed=0, scheduler="ddim", progress=False)
        .place(sc.exemplar, sc.room, sc.mask),
        "progressive init=noise": lambda sc: studio.progressive(steps=args.steps, seed=0, scheduler="ddim",
                                                                progress=False, init="noise")
        .place(sc.exemplar, sc.room, sc.mask),
    }
    for name, kw in variants:
        methods[name] = (lambda kw: lambda sc: studio.dual_branch(steps=args.steps, seed=0, **kw)
                         .place(sc.exemplar, sc.room, sc.mask))(kw)

    if args.only:
        keep = set(args.only) | {"progressive", default_dual}
        methods = {m: run for m, run in methods.items() if m in keep}
    rows = {m: [] for m in methods}
    figure = []
    started = time.time()
    for k, seed in enumerate(EVAL_SEEDS[args.skip: args.skip + args.n]):
        scene = make_scene(seed, size)
        silhouette = np.asarray(scene.silhouette) > 127
        results = {}
        for method, run in methods.items():  # alternated: every method on a scene before the next scene
            t0 = time.perf_counter()
            result = results[method] = run(scene)
            row = {
                "psnr": masked_psnr(result.image, scene.composite, scene.mask),
                "bg": background_error(result.image, scene.composite, scene.mask).mean,
                "structure": structure(result.image, scene.composite, scene.mask),
                "seconds": time.perf_counter() - t0,
                # is the product there: the base's exemplar encoder, placed box crop vs the exemplar (x 100)
                "subject": 100 * exemplar_i(box_crop(result.image, scene.box), scene.exemplar, studio.base),
            }
            if getattr(result, "grounded_mask", None) is not None:
                row["iou"] = iou(np.asarray(result.grounded_mask) > 127, silhouette)
            rows[method].append(row)
        if k < args.grid_scenes:
            dual = results[default_dual]
            figure.append([("room", scene.room), ("exemplar", scene.exemplar), ("plain", results["plain"].image),
                           ("progressive", results["progressive"].image), ("dual source", dual.source),
                           ("grounded", dual.grounded_mask), ("dual", dual.image), ("truth", scene.composite)])
        print(f"scene {seed}: " + json.dumps({m: {k: round(v, 4) for k, v in rows[m][-1].items()} for m in methods}),
              file=sys.stderr, flush=True)

    table, summary = [], {}
    for method in methods:
        entry = {"method": method, "n": len(rows[method])}
        for key in ("psnr", "bg", "structure", "iou", "subject", "seconds"):
            values = [r[key] for r in rows[method] if key in r]
            if values:
                entry[key], entry[key + "_sd"] = stats(values)
        ref = "progressive" if method.startswith("progressive") else default_dual if method.startswith("dual") else None
        if ref is not None and ref != method and len(rows[method]) > 1:  # an interval needs two scenes
            d = paired_interval([r["psnr"] for r in rows[method]], [r["psnr"] for r in rows[ref]])
            entry["dpsnr_vs_default"], entry["dpsnr_lo"], entry["dpsnr_hi"] = d
        table.append(entry)
        summary[method] = {k: round(v, 4) for k, v in entry.items() if k not in ("method",)}
    print(format_table(table, ["method", "n", "psnr", "psnr_sd", "bg", "structure", "iou", "subject", "seconds",
                               "dpsnr_vs_default", "dpsnr_lo", "dpsnr_hi"]))
    if args.grid and figure:
        image_grid(figure, height=128).save(args.grid)
        print(f"wrote {args.grid}")
    # the defaults are the best measured: no variant beats its session's default beyond the 95 % interval
    beaten = [e["method"] for e in table if e.get("dpsnr_lo", -1) > 0]
    print(json.dumps({
        "bench": "session_quality", "quick": args.quick, "n": args.n, "skip": args.skip, "steps": args.steps,
        "model": studio.base.name,
        "default_dual": default_dual, "seconds": round(time.time() - started, 1), "methods": summary,
        "goals": {"defaults_best_measured": "no variant's PSNR above its session default's beyond the paired 95% CI"},
        "beaten_defaults_by": beaten, "goal_met": not beaten,
    }))


if __name__ == "__main__":
    main()
