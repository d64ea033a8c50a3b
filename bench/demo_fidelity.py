"""Demo fidelity: does the shipped demo base place the exemplar it is given?

On n held-out demo scenes (seeds never used in training, products never seen in training) each scene is placed
three ways with the same seed: its own exemplar, another product's exemplar, and no exemplar (the learned
unconditional vector). Masked PSNR/SSIM against the true composite; background error outside the mask.
Goal: right >= mismatched + 3 dB, and right > uncond. `--grid PATH` writes a picture of 8 scenes (the README's is
`--grid docs/demo_fidelity.png`); nothing is written without it. `--quick`: 8 scenes, 10 steps. Last stdout
line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._stats import finish  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 scenes, 10 steps (under a minute)")
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default=None, help="a base directory (default: the shipped demo base)")
    parser.add_argument("--grid", default=None, help="write the 8-scene picture here (e.g. docs/demo_fidelity.png)")
    args = parser.parse_args()
    if args.quick:
        args.scenes, args.steps = 8, 10

    from subjectpaint import Studio
    from subjectpaint.demo.benchmark import fidelity_grid, run_fidelity, summarize
    from subjectpaint.evaluate import format_table
    from subjectpaint.result import save_image

    studio = Studio.load(args.base)
    t0 = time.perf_counter()
    rows, placements, scenes = run_fidelity(studio, n=args.scenes, steps=args.steps, seed=args.seed, progress=False)
    seconds = time.perf_counter() - t0
    summary = summarize(rows)
    print(format_table(summary))
    if args.grid:
        save_image(fidelity_grid(placements, scenes), args.grid)
        print(f"wrote {args.grid}")
    by = {s["variant"]: s for s in summary}
    result = {
        "bench": "demo_fidelity",
        "quick": args.quick,
        "scenes": args.scenes,
        "steps": args.steps,
        "psnr_right": round(by["right"]["psnr"], 3),
        "psnr_mismatched": round(by["mismatched"]["psnr"], 3),
        "psnr_uncond": round(by["uncond"]["psnr"], 3),
        "gain_vs_mismatched_db": round(by["right"]["psnr"] - by["mismatched"]["psnr"], 3),
        "gain_vs_uncond_db": round(by["right"]["psnr"] - by["uncond"]["psnr"], 3),
        "ssim_right": round(by["right"]["ssim"], 4),
        "bg_max": max(s["bg_max"] for s in summary),
        "seconds": round(seconds, 1),
    }
    finish(result, {"gain_vs_mismatched_db": ">= 3", "gain_vs_uncond_db": "> 0"})


if __name__ == "__main__":
    main()
