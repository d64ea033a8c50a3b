"""Progressive session: K=4 subjects in one pass vs each placed alone, cost, and edit-map memory overhead.

    python bench/progressive.py            # the demo base, 4 held-out scenes tiled 2x2 into one room
    python bench/progressive.py --quick    # the tiny random base (< 1 min): checks the plumbing only

1. Fidelity: four held-out demo scenes are tiled 2x2 into one room (the truth is the tiled composites, each
   mask its scene's box in its quadrant). Each subject is placed alone (session.place) and all four in ONE
   pass (session.place_many); masked PSNR per region against the truth, over --rooms rooms (4 x 4 regions by
   default). Goal: |together - alone| <= 1 dB.
   Control: each subject alone with the union of the four masks (the single-subject path on the K=4 pass's
   edited area): alone vs the control is what regenerating more of the room changes in the base's output
   (through the UNet's GroupNorm statistics, which the K=4 pass takes per region; `--no-regional-norm` takes
   them over the whole map, and the K=4 pass then follows the control). Seed floor: the alone placement again
   with the next seed (how far one region's PSNR moves when only the noise changes).
2. Cost: wall time of the K=4 pass / one single-subject pass on the same room, both warmed, then alternated
   (bench/_stats.py): the median of --repeat paired ratios with its 95 % interval. Goal <= 1.3 (upper bound).
3. Memory: peak live tensor bytes during plain inpainting (Studio.inpaint, binary mask) vs the session with a
   soft map of the same support. Accounting: a TorchDispatchMode sees every tensor an op returns and counts
   its storage bytes until the storage is freed (weakref finalizers), so the peak is the exact high-water
   mark of tensors allocated inside the call (activations, latents, maps); the model weights are counted
   apart. Both denominators are reported: `memory_overhead_pct_incl_weights` (of weights + peak activations, the
   paper's measure; goal <= 0.1 %) and `memory_overhead_pct` (of the peak activations alone, which on a small base
   one latent already makes ~0.2 % of).

Subjects: each scene's exemplar, with a random rank-4 LoRA adapter (--adapters random, the default) so the
per-region LoRA path runs; no trained subject adapters ship with the demo base. Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import weakref
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench._stats import alternate, finish, ratio_stats  # noqa: E402
from subjectpaint.base import ExemplarInpainter  # noqa: E402
from subjectpaint.demo.scenes import EVAL_SEEDS, make_scene  # noqa: E402
from subjectpaint.evaluate import masked_psnr  # noqa: E402
from subjectpaint.result import image_grid, save_image  # noqa: E402
from subjectpaint.sessions.progressive import edit_map  # noqa: E402
from subjectpaint.slots import Adapter  # noqa: E402
from subjectpaint.studio import Studio  # noqa: E402


class BenchSubject:
    """Duck-typed Subject: exemplar, name, adapter (None: exemplar only)."""

    def __init__(self, exemplar, adapter, name):
        self.exemplar, self.adapter, self.name = exemplar, adapter, name


def random_adapter(unet, seed: int, rank: int = 4, std: float = 0.02) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name.endswith(t) for t in ("to_q", "to_k", "to_v", "to_out.0")):
            out_f, in_f = mod.weight.shape
            factors[name] = (torch.randn(rank, in_f, generator=g) * std, torch.randn(out_f, rank, generator=g) * std, 1.0)
    return Adapter(factors, name=f"random-{seed}")


def tiled_room(size: int, seeds):
    """Four scenes tiled 2x2: (room, truth, [mask per scene in its quadrant], [exemplar])."""
    scenes = [make_scene(s, size) for s in seeds]
    room = PIL.Image.new("RGB", (2 * size, 2 * size))
    truth = PIL.Image.new("RGB", (2 * size, 2 * size))
    masks, exemplars = [], []
    for k, sc in enumerate(scenes):
        x, y = (k % 2) * size, (k // 2) * size
        room.paste(sc.room, (x, y))
        truth.paste(sc.composite, (x, y))
        m = PIL.Image.new("L", (2 * size, 2 * size), 0)
        m.paste(sc.mask, (x, y))
        masks.append(m)
        exemplars.append(sc.exemplar)
    return room, truth, masks, exemplars


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive (exact torch-level accounting)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list] = {}  # storage ptr -> [bytes, refs]
        self.current = self.peak = 0

    def _track(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [nbytes, 0]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr):
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            self._track(t)
        return out


def peak_bytes(fn) -> int:
    with LiveBytes() as mode:
        fn()
    return mode.peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random base, few steps (< 1 min)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--base", default=None, help="a Paint-by-Example directory (default: the demo base)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=7, help="alternating timing rounds (5 with --quick)")
    ap.add_argument("--adapters", choices=("random", "none"), default="random")
    ap.add_argument("--room", type=int, default=0, help="first room: 4 held-out scenes tiled (EVAL_SEEDS[4N:4N+4])")
    ap.add_argument("--rooms", type=int, default=None, help="how many rooms (--room, --room + 1, ...): default 4 "
                    "(1 with --quick)")
    ap.add_argument("--no-regional-norm", action="store_true",
                    help="K=4 pass with the UNet's GroupNorm statistics over the whole map (as before regional norm)")
    ap.add_argument("--grid", default="docs/progressive_subjects.png", help="3-subject room grid ('' to skip)")
    ap.add_argument("--area-grid", default="docs/progressive_area.png",
                    help="the region with the largest K=4-vs-alone difference: alone, on all masks, K=4 ('' to skip)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    if args.rooms is None:
        args.rooms = 1 if args.quick else 4
    if args.quick:
        args.repeat = min(args.repeat, 5)
        studio = Studio(ExemplarInpainter.tiny(0, image_size=32), default_steps=args.steps or 3)
        size = 32
    else:
        studio = Studio.load(args.base)
        size = studio.base.resolution
    steps = args.steps or (studio.default_steps if args.base is None or args.quick else 25)
    opts = dict(seed=args.seed, steps=steps, resolution=2 * size, progress=False,
                regional_norm=not args.no_regional_norm)

    # region k's adapter is the same in every room; built before the first placement injects the slots
    adapters = [random_adapter(studio.base.unet, 100 + k) if args.adapters == "random" else None for k in range(4)]

    def subjects_of(exemplars, seeds):
        return [BenchSubject(ex, adapters[k], f"scene{seeds[k]}") for k, ex in enumerate(exemplars)]

    # 1. per room: each alone, all four in one pass, the control, and the seed floor
    rows, worst = [], None
    for n in range(args.room, args.room + args.rooms):
        seeds = list(EVAL_SEEDS[4 * n: 4 * n + 4])
        room, truth, masks, exemplars = tiled_room(size, seeds)
        subjects = subjects_of(exemplars, seeds)
        alone = [studio.progressive(**opts).place(s, room, m) for s, m in zip(subjects, masks)]
        together = studio.progressive(**opts).place_many(list(zip(subjects, masks)), room)
        union = PIL.Image.fromarray(np.maximum.reduce([np.asarray(m) for m in masks]), "L")
        if n == args.room:
            first = (room, truth, masks, exemplars, subjects, alone)
        for k, m in enumerate(masks):
            a = masked_psnr(alone[k].image, truth, m)
            b = masked_psnr(together.image, truth, m)
            # control: subject k alone with the union of the four masks (the single-subject path, one exemplar,
            # one adapter): the K=4 pass's edited area without the regional machinery. K=4 vs it is what the
            # regional cross-attention and LoRA do; alone vs it is what editing more of the room does to the base
            same = studio.progressive(**opts).place(subjects[k], room, union)
            c = masked_psnr(same.image, truth, m)
            # seed floor: the same single placement with the next seed; how much one region's PSNR moves when
            # nothing but the noise changes
            other = studio.progressive(**{**opts, "seed": args.seed + 1}).place(subjects[k], room, m)
            f = masked_psnr(other.image, truth, m)
            if worst is None or abs(b - a) > worst[0]:
                worst = (abs(b - a), n, k, room, truth, m, exemplars[k], alone[k].image, same.image, together.image)
            rows.append({"room": n, "region": k, "alone_psnr": round(a, 3), "together_psnr": round(b, 3),
                         "delta_db": round(b - a, 3), "alone_union_mask_psnr": round(c, 3),
                         "delta_vs_same_area_db": round(b - c, 3), "alone_next_seed_psnr": round(f, 3),
                         "seed_delta_db": round(f - a, 3)})
            print(f"room {n} region {k}: alone {a:.2f} dB, in the K=4 pass {b:.2f} dB (delta {b - a:+.2f}); this "
                  f"subject alone on all 4 masks {c:.2f} dB (K=4 vs it {b - c:+.2f}); alone, next seed {f:.2f} dB "
                  f"({f - a:+.2f})", flush=True)
    room, truth, masks, exemplars, subjects, alone = first  # for the timing, the memory and the 3-subject grid
    if args.area_grid and not args.quick:  # the region where the K=4 pass and alone differ most, and why
        _, n, k, room_n, truth_n, m, ex, a_img, u_img, t_img = worst
        save_image(image_grid([[("room", room_n), (f"room {n}, region {k}", m), ("exemplar", ex), ("truth", truth_n)],
                               [("alone", a_img), ("alone, all 4 masks", u_img), ("K=4 pass", t_img)]], height=192),
                   args.area_grid)
        print(f"wrote {args.area_grid}")
    deltas = np.array([r["delta_db"] for r in rows])
    floor = np.array([r["seed_delta_db"] for r in rows])
    sem = float(deltas.std(ddof=1) / np.sqrt(len(deltas))) if len(deltas) > 1 else float("nan")
    print(f"K=4 vs alone over {len(rows)} regions: mean {deltas.mean():+.2f} dB (+- {sem:.2f} s.e.), mean |delta| "
          f"{np.abs(deltas).mean():.2f}, max |delta| {np.abs(deltas).max():.2f}, {int((np.abs(deltas) <= 1).sum())}/"
          f"{len(rows)} within 1 dB; seed floor (alone, next seed vs alone): mean |delta| {np.abs(floor).mean():.2f}, "
          f"{int((np.abs(floor) <= 1).sum())}/{len(rows)} within 1 dB")
    # timing on the first room: the K=4 pass vs one subject, warmed, alternated
    times = alternate({"k4": lambda: studio.progressive(**opts).place_many(list(zip(subjects, masks)), room),
                       "one": lambda: studio.progressive(**opts).place(subjects[0], room, masks[0])},
                      repeats=args.repeat, warmup=1)
    cost = ratio_stats(times["k4"], times["one"], "cost_ratio_k4_vs_1", 3)
    t_one, t_four = statistics.median(times["one"]), statistics.median(times["k4"])
    print(f"time: one subject {t_one:.2f}s, K=4 one pass {t_four:.2f}s, ratio {cost['cost_ratio_k4_vs_1']} "
          f"[{cost['cost_ratio_k4_vs_1_lo']}, {cost['cost_ratio_k4_vs_1_hi']}] (4 sequential passes would be ~4)")

    # 2. memory: plain inpainting vs the session with a soft map of the same support
    soft = edit_map(masks[0], grow=2, blur=4)
    support = (soft > 0).float()
    plain = peak_bytes(lambda: studio.inpaint(room, support, subjects[0], seed=args.seed, steps=steps,
                                              resolution=2 * size, progress=False))
    session = peak_bytes(lambda: studio.progressive(**opts).place(subjects[0], room, soft))
    weights = sum(p.numel() * p.element_size() for p in studio.base.unet.parameters())
    weights += sum(p.numel() * p.element_size() for p in studio.base.vae.parameters())
    weights += sum(p.numel() * p.element_size() for p in studio.base.image_encoder.parameters())
    overhead = (session - plain) / plain
    overhead_total = (session - plain) / (plain + weights)
    print(f"memory: peak live tensors plain {plain / 2**20:.3f} MiB, session {session / 2**20:.3f} MiB "
          f"(overhead {100 * overhead:.4f} % of activations, {100 * overhead_total:.4f} % incl. weights "
          f"{weights / 2**20:.1f} MiB)")

    # 3. a 3-subject room for the docs
    if args.grid and not args.quick:
        three = studio.progressive(**opts).place_many(list(zip(subjects[:3], masks[:3])), room)
        union = PIL.Image.fromarray(np.maximum.reduce([np.asarray(m) for m in masks[:3]]), "L")
        grid = image_grid([
            [("room", room), ("regions", union)] + [(f"subject {k + 1}", exemplars[k]) for k in range(3)],
            [("surgery", three.surgical), ("one pass, 3 subjects", three.image), ("truth", truth)]
            + [(f"alone {k + 1}", alone[k].image) for k in range(2)],
        ], height=192)
        save_image(grid, args.grid)
        print(f"wrote {args.grid}")

    vs_same = np.array([r["delta_vs_same_area_db"] for r in rows])
    result = {
        "bench": "progressive", "quick": args.quick, "base": studio.base.name, "steps": steps, "room": 2 * size,
        "k": 4, "regional_norm": not args.no_regional_norm, "rooms": list(range(args.room, args.room + args.rooms)),
        "regions": rows,
        "mean_delta_db": round(float(deltas.mean()), 3), "mean_delta_sem_db": round(sem, 3),
        "mean_abs_delta_db": round(float(np.abs(deltas).mean()), 3), "max_abs_delta_db": round(float(np.abs(deltas).max()), 3),
        "regions_within_1db": int((np.abs(deltas) <= 1).sum()), "within_1db": bool(np.abs(deltas).max() <= 1.0),
        "seed_floor_mean_abs_db": round(float(np.abs(floor).mean()), 3),
        "seed_floor_regions_within_1db": int((np.abs(floor) <= 1).sum()),
        "mean_delta_vs_same_area_db": round(float(vs_same.mean()), 3),
        "max_abs_delta_vs_same_area_db": round(float(np.abs(vs_same).max()), 3),
        "time_one_s": round(t_one, 3), "time_k4_s": round(t_four, 3), **cost,
        "peak_plain_bytes": plain, "peak_session_bytes": session, "weights_bytes": weights,
        "memory_overhead_pct": round(100 * overhead, 5), "memory_overhead_pct_incl_weights": round(100 * overhead_total, 5),
        "memory_overhead_denominators": {"memory_overhead_pct": "peak activations of plain inpainting",
                                         "memory_overhead_pct_incl_weights": "weights + peak activations"},
        "memory_accounting": "TorchDispatchMode: peak live bytes of tensor storages created inside the call",
    }
    finish(result, {"cost_ratio_k4_vs_1": "<= 1.3", "memory_overhead_pct_incl_weights": "<= 0.1",
                    "max_abs_delta_db": "<= 1"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
