"""Session quality on held-out demo scenes: plain inpainting vs progressive vs dual-branch (ViMAEdit).

For each of `--n` evaluation scenes (64 px, the demo base, the scene's own exemplar, seed 0, DDIM, 25 steps):

- psnr: masked PSNR inside the scene's mask against the true composite;
- bg: background error outside the mask (mean abs, uint8 levels) against the truth;
- structure: room-structure preservation = SSIM of the Sobel edge maps of result and truth inside the mask's box;
- for the dual-branch session also the grounding: IoU of the grounded mask with the product's silhouette
  (alpha > 0.5) and with its box, next to the IoU the user's loose box itself has with the silhouette.

`--grid PATH` writes a figure (room | exemplar | source | grounded mask | dual result | plain | truth) for the first
scenes. `--quick`: 4 scenes, 10 steps. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
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

from subjectpaint.evaluate import background_error, format_table, masked_psnr, masked_ssim  # noqa: E402

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--base", default=None, help="a diffusers Paint-by-Example directory (default: the demo base)")
    parser.add_argument("--quick", action="store_true", help="4 scenes, 10 steps")
    parser.add_argument("--grid", type=Path, default=None, help="write a figure of the first --grid-scenes scenes")
    parser.add_argument("--grid-scenes", type=int, default=6)
    parser.add_argument("--dual", nargs="*", default=[], metavar="NAME=VALUE",
                        help="dual-branch settings other than the defaults, e.g. embedding_lambda=1.0 inject=false")
    args = parser.parse_args()
    dual_settings = {k: (v.lower() == "true") if v.lower() in ("true", "false") else float(v)
                     for k, v in (item.split("=", 1) for item in args.dual)}
    if args.quick:
        args.n, args.steps = min(args.n, 4), 10

    from subjectpaint.demo.scenes import EVAL_SEEDS, make_scene
    from subjectpaint.result import image_grid
    from subjectpaint.studio import Studio

    studio = Studio.load(args.base)
    size = studio.base.resolution
    sessions = {"dual_branch": studio.dual_branch(steps=args.steps, seed=0, **dual_settings)}  # DDIM by default
    try:
        sessions["progressive"] = studio.progressive(steps=args.steps, seed=0, scheduler="ddim", progress=False)
    except Exception as exc:  # noqa: BLE001 -- the progressive session is another issue's; report it pending
        print(f"progressive session unavailable ({type(exc).__name__}: {exc}); column pending", file=sys.stderr)

    rows = {m: [] for m in METHODS}
    grounding = []
    figure = []
    started = time.time()
    for k, seed in enumerate(EVAL_SEEDS[: args.n]):
        scene = make_scene(seed, size)
        results = {"plain": studio.inpaint(scene.room, scene.mask, scene.exemplar, steps=args.steps, scheduler="ddim",
                                           seed=0, progress=False)}
        dual = sessions["dual_branch"].place(scene.exemplar, scene.room, scene.mask)
        results["dual_branch"] = dual
        if "progressive" in sessions:
            try:
                results["progressive"] = sessions["progressive"].place(scene.exemplar, scene.room, scene.mask)
            except Exception as exc:  # noqa: BLE001
                print(f"progressive failed on scene {seed}: {type(exc).__name__}: {exc}", file=sys.stderr)
                sessions.pop("progressive")
        for method, result in results.items():
            rows[method].append({
                "psnr": masked_psnr(result.image, scene.composite, scene.mask),
                "bg": background_error(result.image, scene.composite, scene.mask).mean,
                "structure": structure(result.image, scene.composite, scene.mask),
            })
        grounded = np.asarray(dual.grounded_mask) > 127
        silhouette = np.asarray(scene.silhouette) > 127
        box = np.zeros_like(silhouette)
        x0, y0, x1, y1 = scene.box
        box[y0:y1, x0:x1] = True
        user = np.asarray(scene.mask) > 127
        grounding.append({"silhouette": iou(grounded, silhouette), "box": iou(grounded, box),
                          "user_box": iou(user, silhouette)})
        if k < args.grid_scenes:
            figure.append([("room", scene.room), ("exemplar", scene.exemplar), ("source", dual.source),
                           ("grounded", dual.grounded_mask), ("dual-branch", dual.image),
                           ("plain", results["plain"].image), ("truth", scene.composite)])
        print(f"scene {seed}: " + "  ".join(f"{m} {rows[m][-1]['structure']:.3f}" for m in results)
              + f"  iou {grounding[-1]['silhouette']:.2f}", file=sys.stderr, flush=True)

    table, summary = [], {}
    for method in METHODS:
        if not rows[method] or len(rows[method]) < args.n:
            table.append({"method": method, "n": len(rows[method]), "psnr": None})
            summary[method] = "pending"
            continue
        entry = {"method": method, "n": len(rows[method])}
        for key in ("psnr", "bg", "structure"):
            mean, sd = stats(r[key] for r in rows[method])
            entry[key], entry[key + "_sd"] = mean, sd
        table.append(entry)
        summary[method] = {k: round(v, 4) for k, v in entry.items() if k not in ("method", "n")}
    print(format_table(table, ["method", "n", "psnr", "psnr_sd", "bg", "bg_sd", "structure", "structure_sd"]))
    g = {key: stats(r[key] for r in grounding) for key in ("silhouette", "box", "user_box")}
    print(f"grounded-mask IoU with the silhouette {g['silhouette'][0]:.3f} +- {g['silhouette'][1]:.3f} "
          f"(min {min(r['silhouette'] for r in grounding):.3f}), with the product box {g['box'][0]:.3f} +- "
          f"{g['box'][1]:.3f}; the user's box alone: {g['user_box'][0]:.3f} +- {g['user_box'][1]:.3f}")
    if args.grid and figure:
        image_grid(figure, height=128).save(args.grid)
        print(f"wrote {args.grid}")
    dual_s, plain_s = summary["dual_branch"], summary["plain"]
    print(json.dumps({
        "bench": "session_quality", "n": args.n, "steps": args.steps, "model": studio.base.name, "dual": dual_settings,
        "seconds": round(time.time() - started, 1), **{m: summary[m] for m in METHODS},
        "grounding_iou": {k: {"mean": round(v[0], 4), "sd": round(v[1], 4)} for k, v in g.items()},
        "dual_preserves_structure_better": isinstance(dual_s, dict) and dual_s["structure"] > plain_s["structure"],
    }))


if __name__ == "__main__":
    main()
