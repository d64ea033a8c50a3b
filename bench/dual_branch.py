"""Dual-branch cost: `studio.dual_branch().place` vs plain `Studio.inpaint`, same weights, inputs, steps, run.

Full run: the demo base (64 px, 25 DDIM steps) on a demo scene, every ViMAEdit part on (injection, grounding,
adaptive variance, embedding guidance); `--model sd15` uses an SD1.5-shaped random base at `--size` px instead.
`--quick`: the tiny test model at 32x48, 4 steps (well under a minute).
Both are warmed, then alternate (plain dual, dual plain, ...; bench/_stats.py); `ratio` = dual / plain is the
median of the paired ratios with its 95 % interval (goal <= 2.1 on the upper bound). Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._stats import alternate, finish, ratio_stats  # noqa: E402


def setup(args):
    from subjectpaint.base import ExemplarInpainter
    from subjectpaint.studio import Studio

    if args.quick:
        from tests.conftest import box_mask_image, random_image

        studio = Studio(ExemplarInpainter.tiny(0))
        job = (random_image(48, 32, 1), box_mask_image(48, 32, (10, 8, 30, 24)), random_image(40, 40, 2))
        return studio, job, dict(steps=4, resolution=48), "tiny-0"
    if args.model == "sd15":
        from bench.sampler_overhead import inputs, sd15_base

        studio = Studio(sd15_base("cpu", torch.float32))
        return studio, inputs(args.size, args.size), dict(steps=args.steps, resolution=args.size), "sd15-shaped-random"
    from subjectpaint.demo.scenes import EVAL_SEEDS, make_scene

    studio = Studio.load(args.base)
    scene = make_scene(EVAL_SEEDS[0], studio.base.resolution)
    return studio, (scene.room, scene.mask, scene.exemplar), dict(steps=args.steps), studio.base.name


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 32x48, 4 steps (< 1 min)")
    parser.add_argument("--model", choices=("demo", "sd15"), default="demo")
    parser.add_argument("--size", type=int, default=256, help="image side for --model sd15")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--base", default=None, help="a diffusers Paint-by-Example directory (default: the demo base)")
    parser.add_argument("--repeats", type=int, default=7, help="alternating rounds (5 with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 5)
    torch.manual_seed(0)
    studio, (room, mask, exemplar), kw, model = setup(args)
    session = studio.dual_branch(seed=0, **kw)

    def plain():
        studio.inpaint(room, mask, exemplar, scheduler="ddim", seed=0, progress=False, **kw)

    def dual():
        session.place(exemplar, room, mask)

    times = alternate({"plain": plain, "dual": dual}, repeats=args.repeats, warmup=1)
    p, d = statistics.median(times["plain"]), statistics.median(times["dual"])
    result = {"bench": "dual_branch", "model": model, "quick": args.quick, "steps": kw["steps"],
              "threads": torch.get_num_threads(), "plain_s": round(p, 4), "dual_s": round(d, 4),
              **ratio_stats(times["dual"], times["plain"], digits=3)}
    print(f"{model}: plain {p * 1000:.0f} ms, dual-branch {d * 1000:.0f} ms (median of {args.repeats}), "
          f"ratio {result['ratio']} [{result['ratio_lo']}, {result['ratio_hi']}]")
    finish(result, {"ratio": "<= 2.1"})


if __name__ == "__main__":
    main()
