"""Mixed-subject batches: throughput of one UNet batch serving 8 different subjects vs 8 rows of one subject.

Both run through the same slots on the same UNet in the same run: "single" activates one adapter (swap path),
"mixed" gathers each row's factors from a bank of 8 adapters (bmm path). Shapes: the tiny test UNet and an
SD1.5-shaped random UNet (9 input channels, ~860M params) at 32x32 latents (256 px), classifier-free guidance
batch (16 rows). `--quick`: tiny only. Goal: mixed / single throughput >= 0.85. Last stdout line: one JSON object.
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/mixed_batch.py` finds bench.swap

import torch  # noqa: E402


def measure(unet, cross_dim, latent, rank, repeats, batch=8):
    from bench.swap import random_adapter, target_shapes

    from subjectpaint.slots import Adapter, Slots

    shapes = target_shapes(unet)
    adapters = [Adapter.from_state_dict(*random_adapter(shapes, rank, s, dtype=torch.float32)) for s in range(batch)]
    slots = Slots(unet, max_rank=16)
    flats = [slots.layout(a) for a in adapters]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, 9, latent, latent, generator=g)  # CFG doubles the batch
    t = torch.full((2 * batch,), 500)
    c = torch.randn(2 * batch, 1, cross_dim, generator=g)

    @torch.no_grad()
    def single():
        slots.activate(flats[0])
        unet(x, t, encoder_hidden_states=c)

    @torch.no_grad()
    def mixed():
        with slots.mixed(flats, torch.arange(batch)):
            unet(x, t, encoder_hidden_states=c)

    single(), mixed()
    times = {"single": [], "mixed": []}
    for r in range(repeats):
        for name, fn in ((("single", single), ("mixed", mixed)) if r % 2 == 0 else (("mixed", mixed), ("single", single))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    s, m = statistics.median(times["single"]), statistics.median(times["mixed"])
    return {"single_rows_per_s": round(2 * batch / s, 2), "mixed_rows_per_s": round(2 * batch / m, 2),
            "throughput_ratio": round(s / m, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny UNet only (< 1 min)")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    from subjectpaint.base import ExemplarInpainter

    result = {"bench": "mixed_batch", "subjects": 8, "rank": args.rank}
    tiny = ExemplarInpainter.tiny(0).unet
    result["tiny"] = measure(tiny, 32, 16, args.rank, repeats=20)
    print("tiny", result["tiny"], flush=True)
    if not args.quick:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=64, in_channels=9, out_channels=4, cross_attention_dim=768).eval()
        result["sd15_256px"] = measure(unet, 768, 32, args.rank, repeats=3)
        print("sd15", result["sd15_256px"], flush=True)
    result["min_ratio"] = min(v["throughput_ratio"] for k, v in result.items() if isinstance(v, dict))
    result["goal"] = ">= 0.85"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
