"""Seams: soft edit maps (progressive session) vs binary inpainting on held-out demo scenes.

    python bench/seams.py              # 50 held-out demo scenes on the demo base
    python bench/seams.py --quick      # 4 scenes on the tiny random base (plumbing only)

Both placements share the scene, exemplar and seed. Binary: Studio.inpaint(room, mask, exemplar) with its
default paste-back (grown 2 px, feathered 4 px). Progressive: session.place(exemplar, room, edit_map) where the
edit map ramps over --blur px (default 4) inside the mask (`edit_map(mask, blur=4, inside=True)`: 1 from 4 px in,
falling towards the edge, nothing outside the mask changes), or with `--ramp outward` is the mask at 1, grown by
--grow px and ramped to 0 over --blur px outside it (the paper's grow-and-blur).

Seam figures, in a band of --band px on both sides of the mask edge (B = dilate(mask) - erode(mask)), with
image gradients g (forward differences, RGB in [0, 1]):
  seam_error   mean_B |g(pred) - g(truth)|^2      gradient-domain error across the seam (lower is better)
  seam_excess  mean_B |g(pred)|^2 - |g(truth)|^2   extra gradient energy at the seam (a visible edge > 0)
Also masked PSNR inside the mask, and the background error outside the edited support (must be 0 for both)
and outside the mask (the band each method is allowed to touch). Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._stats import finish  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from subjectpaint.base import ExemplarInpainter  # noqa: E402
from subjectpaint.demo.scenes import EVAL_SEEDS, make_scene  # noqa: E402
from subjectpaint.evaluate import masked_psnr  # noqa: E402
from subjectpaint.masks import PasteBack  # noqa: E402
from subjectpaint.result import image_grid, save_image  # noqa: E402
from subjectpaint.sessions.progressive import SCHEDULES, edit_map  # noqa: E402
from subjectpaint.studio import Studio  # noqa: E402


def to01(img: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def seam_band(mask: torch.Tensor, band: int) -> torch.Tensor:
    m = (mask > 0).float()[None, None]
    grown = F.max_pool2d(m, 2 * band + 1, stride=1, padding=band)
    eroded = 1 - F.max_pool2d(1 - m, 2 * band + 1, stride=1, padding=band)
    return (grown - eroded)[0, 0] > 0


def gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gx = torch.zeros_like(x)
    gy = torch.zeros_like(x)
    gx[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    gy[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    return gx, gy


def seam_figures(pred, truth, mask, band: int) -> dict:
    p, t = to01(pred), to01(truth)
    b = seam_band(mask, band)
    pgx, pgy = gradients(p)
    tgx, tgy = gradients(t)
    err = ((pgx - tgx) ** 2 + (pgy - tgy) ** 2).sum(0)
    energy_p = (pgx**2 + pgy**2).sum(0)
    energy_t = (tgx**2 + tgy**2).sum(0)
    return {"seam_error": float(err[b].mean()), "seam_excess": float((energy_p - energy_t)[b].mean())}


def background(pred, room, region: torch.Tensor) -> tuple[float, int]:
    """Mean and max |pred - room| (0..255) where `region` is False."""
    d = np.abs(np.asarray(pred, dtype=np.int16) - np.asarray(room, dtype=np.int16)).max(-1)
    outside = ~region.numpy()
    return float(d[outside].mean()), int(d[outside].max())


def mask_tensor(mask: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 scenes on the tiny random base")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--base", default=None, help="a Paint-by-Example directory (default: the demo base)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grow", type=int, default=1, help="outward ramp only: px the mask is grown first")
    ap.add_argument("--blur", type=int, default=4, help="ramp width, px")
    ap.add_argument("--band", type=int, default=3)
    ap.add_argument("--ramp", choices=("inside", "outward"), default="inside",
                    help="inside: edit_map(inside=True), nothing outside the mask changes; outward: the paper's "
                         "grow-and-blur (edit_map(grow, blur))")
    ap.add_argument("--schedule", default="linear", choices=list(SCHEDULES))
    ap.add_argument("--paste", choices=("support", "map"), default="support",
                    help="progressive paste-back: the map's support (hard) or blended by the map")
    ap.add_argument("--docs", default="docs", help="where the PNGs go ('' to skip)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    if args.quick:
        studio, n = Studio(ExemplarInpainter.tiny(0, image_size=32), default_steps=args.steps or 3), 4
    else:
        studio, n = Studio.load(args.base), args.n
    steps = args.steps or (studio.default_steps if args.base is None or args.quick else 25)
    size = studio.base.resolution
    scenes = [make_scene(s, size) for s in EVAL_SEEDS[:n]]
    rows, shown = [], []
    for scene in tqdm(scenes, desc="scenes"):
        mask = mask_tensor(scene.mask)
        soft = edit_map(scene.mask, grow=args.grow, blur=args.blur, inside=args.ramp == "inside")
        binary = studio.inpaint(scene.room, scene.mask, scene.exemplar, seed=args.seed, steps=steps, progress=False)
        prog = studio.progressive(seed=args.seed, steps=steps, schedule=args.schedule, progress=False,
                                  paste_back=True if args.paste == "support" else "map").place(
            scene.exemplar, scene.room, soft)
        binary_support = PasteBack().alpha(mask) > 0
        for method, out, support in (("binary", binary, binary_support), ("progressive", prog, soft > 0)):
            bg_mean, bg_max = background(out.image, scene.room, support)
            bg_mask_mean, _ = background(out.image, scene.room, mask > 0)
            rows.append({"scene": scene.seed, "method": method, "psnr": masked_psnr(out.image, scene.composite, mask),
                         **seam_figures(out.image, scene.composite, mask, args.band),
                         "bg_outside_support_mean": bg_mean, "bg_outside_support_max": bg_max,
                         "bg_outside_mask_mean": bg_mask_mean})
        if len(shown) < 6:
            shown.append((scene, soft, binary, prog))

    summary = {}
    for method in ("binary", "progressive"):
        sel = [r for r in rows if r["method"] == method]
        summary[method] = {k: round(statistics.mean(r[k] for r in sel), 5) for k in
                           ("psnr", "seam_error", "seam_excess", "bg_outside_support_mean", "bg_outside_mask_mean")}
        summary[method]["bg_outside_support_max"] = max(r["bg_outside_support_max"] for r in sel)
    b, p = summary["binary"], summary["progressive"]
    wins = sum(1 for i in range(0, len(rows), 2) if rows[i + 1]["seam_error"] < rows[i]["seam_error"])
    for method, s in summary.items():
        print(f"{method:12s} PSNR {s['psnr']:.2f} dB  seam error {s['seam_error']:.5f}  seam excess "
              f"{s['seam_excess']:+.5f}  bg outside support {s['bg_outside_support_mean']:.3f} (max "
              f"{s['bg_outside_support_max']})  bg outside mask {s['bg_outside_mask_mean']:.3f}")
    print(f"progressive has the lower seam error on {wins}/{n} scenes")

    if args.docs and not args.quick:
        grid = image_grid([[("room", sc.room), ("mask", sc.mask), ("edit map", _map_pil(soft)),
                            ("binary", bi.image), ("progressive", pr.image), ("truth", sc.composite)]
                           for sc, soft, bi, pr in shown], height=128)
        save_image(grid, Path(args.docs) / "progressive_seams.png")
        save_image(transition_grid(studio, scenes[0], steps, args.seed), Path(args.docs) / "progressive_transition.png")
        print(f"wrote {args.docs}/progressive_seams.png and {args.docs}/progressive_transition.png")

    result = {"bench": "seams", "quick": args.quick, "base": studio.base.name, "n": n, "steps": steps,
              "grow": args.grow, "blur": args.blur, "ramp": args.ramp, "band": args.band, "schedule": args.schedule,
              "paste": args.paste,
              "binary": b, "progressive": p, "seam_error_ratio": round(p["seam_error"] / b["seam_error"], 4),
              "progressive_better_seams": p["seam_error"] < b["seam_error"], "scene_wins": wins,
              "bg_outside_mask_progressive": p["bg_outside_mask_mean"]}
    finish(result, {"seam_error_ratio": "< 1", "bg_outside_mask_progressive": "== 0"})
    return 0


def _map_pil(m: torch.Tensor) -> PIL.Image.Image:
    return PIL.Image.fromarray((m.clamp(0, 1) * 255).round().byte().numpy(), "L")


def transition_grid(studio, scene, steps, seed) -> PIL.Image.Image:
    """A soft-map transition: a horizontal ramp over the room (0 keep at the left .. 1 regenerate at the right),
    one row per threshold schedule, and the binary half-map for contrast."""
    W, H = scene.room.size
    ramp = torch.linspace(0, 1, W).expand(H, W).clone()
    rows = []
    for schedule in SCHEDULES:
        out = studio.progressive(seed=seed, steps=steps, schedule=schedule, progress=False).place(
            scene.exemplar, scene.room, ramp)
        start = out.info["start_step"].float()
        start_img = PIL.Image.fromarray((255 * start / max(1.0, float(start.max()))).byte().numpy(), "L")
        rows.append([(f"{schedule}: map", _map_pil(ramp)), ("start step", start_img), ("exemplar", scene.exemplar),
                     (f"{schedule}: result", out.image)])
    half = (ramp >= 0.5).float()
    out = studio.progressive(seed=seed, steps=steps, progress=False).place(scene.exemplar, scene.room, half)
    rows.append([("binary: map", _map_pil(half)), ("room", scene.room), ("exemplar", scene.exemplar),
                 ("binary: result", out.image)])
    return image_grid(rows, height=128)


if __name__ == "__main__":
    sys.exit(main())
