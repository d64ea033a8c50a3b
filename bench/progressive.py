"""Progressive session: K=4 subjects in one pass vs each placed alone, cost, and edit-map memory overhead.

    python bench/progressive.py            # the demo base, 4 held-out scenes tiled 2x2 into one room
    python bench/progressive.py --quick    # the tiny random base (< 1 min): checks the plumbing only

1. Fidelity: four held-out demo scenes are tiled 2x2 into one room (the truth is the tiled composites, each
   mask its scene's box in its quadrant). Each subject is placed alone (session.place) and all four in ONE
   pass (session.place_many); masked PSNR per region against the truth. Goal: |together - alone| <= 1 dB.
   Control: each subject placed in all four regions in one pass (the K=4 pass's edited area, one subject): the
   K=4 pass vs it isolates the per-region conditioning and LoRA from the effect of regenerating more of the room.
2. Cost: wall time of the K=4 pass / one single-subject pass on the same room, same run (median of --repeat).
   Goal <= 1.3.
3. Memory: peak live tensor bytes during plain inpainting (Studio.inpaint, binary mask) vs the session with a
   soft map of the same support. Accounting: a TorchDispatchMode sees every tensor an op returns and counts
   its storage bytes until the storage is freed (weakref finalizers), so the peak is the exact high-water
   mark of tensors allocated inside the call (activations, latents, maps); the model weights are counted
   apart. Goal: overhead <= 0.1 % of the inference memory (weights + peak activations, the paper's measure);
   the share of the activations alone is reported too (on a small base one latent is already ~0.2 % of them).

Subjects: each scene's exemplar, with a random rank-4 LoRA adapter (--adapters random, the default) so the
per-region LoRA path runs; no trained subject adapters ship with the demo base. Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import weakref
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

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
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats (median)")
    ap.add_argument("--adapters", choices=("random", "none"), default="random")
    ap.add_argument("--room", type=int, default=0, help="which 4 held-out scenes to tile (EVAL_SEEDS[4N:4N+4])")
    ap.add_argument("--grid", default="docs/progressive_subjects.png", help="3-subject room grid ('' to skip)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    if args.quick:
        studio = Studio(ExemplarInpainter.tiny(0, image_size=32), default_steps=args.steps or 3)
        size = 32
    else:
        studio = Studio.load(args.base)
        size = studio.base.resolution
    steps = args.steps or (studio.default_steps if args.base is None or args.quick else 25)
    seeds = list(EVAL_SEEDS[4 * args.room: 4 * args.room + 4])
    room, truth, masks, exemplars = tiled_room(size, seeds)
    subjects = [BenchSubject(ex, random_adapter(studio.base.unet, 100 + k) if args.adapters == "random" else None,
                             f"scene{seeds[k]}") for k, ex in enumerate(exemplars)]
    opts = dict(seed=args.seed, steps=steps, resolution=2 * size, progress=False)

    # 1. each alone, then all four in one pass (timed)
    alone, t_one = [], []
    for k, (s, m) in enumerate(zip(subjects, masks)):
        t0 = time.perf_counter()
        alone.append(studio.progressive(**opts).place(s, room, m))
        t_one.append(time.perf_counter() - t0)
    t_four = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        together = studio.progressive(**opts).place_many(list(zip(subjects, masks)), room)
        t_four.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        studio.progressive(**opts).place(subjects[0], room, masks[0])
        t_one.append(time.perf_counter() - t0)
    rows = []
    for k, m in enumerate(masks):
        a = masked_psnr(alone[k].image, truth, m)
        b = masked_psnr(together.image, truth, m)
        # control: subject k in all four regions, one pass (= subject k alone with the union map): the same
        # edited area as the K=4 pass, one subject; separates the regional machinery from the effect of
        # regenerating the other regions at all
        same = studio.progressive(**opts).place_many([(subjects[k], mm) for mm in masks], room)
        c = masked_psnr(same.image, truth, m)
        rows.append({"region": k, "alone_psnr": round(a, 3), "together_psnr": round(b, 3), "delta_db": round(b - a, 3),
                     "same_subject_everywhere_psnr": round(c, 3), "delta_vs_same_area_db": round(b - c, 3)})
        print(f"region {k}: alone {a:.2f} dB, in the K=4 pass {b:.2f} dB (delta {b - a:+.2f}); this subject in all "
              f"4 regions {c:.2f} dB (K=4 pass vs it {b - c:+.2f})")
    ratio = statistics.median(t_four) / statistics.median(t_one)
    print(f"time: one subject {statistics.median(t_one):.2f}s, K=4 one pass {statistics.median(t_four):.2f}s, "
          f"ratio {ratio:.3f} (4 sequential passes would be ~4)")

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

    deltas = [abs(r["delta_db"]) for r in rows]
    result = {
        "bench": "progressive", "quick": args.quick, "base": studio.base.name, "steps": steps, "room": 2 * size,
        "k": 4, "scene_seeds": seeds, "regions": rows, "max_abs_delta_db": round(max(deltas), 3),
        "within_1db": max(deltas) <= 1.0,
        "max_abs_delta_vs_same_area_db": round(max(abs(r["delta_vs_same_area_db"]) for r in rows), 3),
        "time_one_s": round(statistics.median(t_one), 3), "time_k4_s": round(statistics.median(t_four), 3),
        "cost_ratio_k4_vs_1": round(ratio, 3), "cost_goal_met": ratio <= 1.3,
        "peak_plain_bytes": plain, "peak_session_bytes": session, "weights_bytes": weights,
        "memory_overhead_pct": round(100 * overhead, 5), "memory_overhead_pct_incl_weights": round(100 * overhead_total, 5),
        "memory_goal_met": overhead_total <= 0.001,
        "memory_accounting": "TorchDispatchMode: peak live bytes of tensor storages created inside the call",
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
