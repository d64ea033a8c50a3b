"""Mixed-subject batches: throughput of one UNet batch serving 8 different subjects, vs one subject and vs peers.

All in one run, alternated and warmed (bench/_stats.py), on the same UNet weights and the same 16-row batch
(8 rows x classifier-free guidance):
- mixed: our slots gather each row's factors from a bank of 8 adapters (bmm path);
- single: our slots with one adapter active for all rows (the swap path): the cost of mixing;
- peft_subbatches (peer): the UNet with the 8 adapters loaded in PEFT (diffusers' `load_lora_adapter`), one UNet
  call per subject on its 2 rows after `set_adapters` (how a PEFT server serves 8 subjects);
- merged (peer): one subject's LoRA merged into a plain UNet's weights (no LoRA layers at all: the floor of any
  single-subject server).
Ratios are throughputs, ours / theirs (> 1: ours serves more rows per second). Shapes: the tiny test UNet and an
SD1.5-shaped random UNet (9 input channels, ~860M params) at 32x32 latents (256 px). `--quick`: tiny only.
Goal: mixed / single >= 0.85 (on the interval's lower bound). Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/mixed_batch.py` finds bench.swap

import torch  # noqa: E402

from bench._stats import alternate, finish, ratio_stats  # noqa: E402


def measure(unet, cross_dim, latent, rank, repeats, batch=8):
    from bench.swap import random_adapter, target_shapes

    from subjectpaint.slots import Adapter, Slots

    shapes = target_shapes(unet)
    state_dicts = [random_adapter(shapes, rank, s, dtype=torch.float32) for s in range(batch)]
    # the peers get their own copies of the weights before our slots wrap the projections
    peft_unet = copy.deepcopy(unet)
    for i, (sd, meta) in enumerate(state_dicts):
        peft_unet.load_lora_adapter(dict(sd), prefix="unet", adapter_name=f"s{i}",
                                    metadata=json.loads(meta["lora_adapter_metadata"]))
    merged_unet = copy.deepcopy(unet)
    with torch.no_grad():
        for name, out_f, in_f in shapes:  # alpha == rank: scale 1
            a, b = state_dicts[0][0][f"unet.{name}.lora_A.weight"], state_dicts[0][0][f"unet.{name}.lora_B.weight"]
            merged_unet.get_submodule(name).weight += b @ a
    adapters = [Adapter.from_state_dict(*sd_meta) for sd_meta in state_dicts]
    slots = Slots(unet, max_rank=16)
    flats = [slots.layout(a) for a in adapters]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, 9, latent, latent, generator=g)  # CFG doubles the batch: [uncond x8; cond x8]
    t = torch.full((2 * batch,), 500)
    c = torch.randn(2 * batch, 1, cross_dim, generator=g)

    def single():
        slots.activate(flats[0])
        unet(x, t, encoder_hidden_states=c)

    def mixed():
        with slots.mixed(flats, torch.arange(batch)):
            unet(x, t, encoder_hidden_states=c)

    def peft_subbatches():
        for i in range(batch):
            peft_unet.set_adapters([f"s{i}"])
            rows = torch.tensor([i, batch + i])
            peft_unet(x[rows], t[rows], encoder_hidden_states=c[rows])

    def merged():
        merged_unet(x, t, encoder_hidden_states=c)

    with torch.no_grad():
        times = alternate({"mixed": mixed, "single": single, "peft_subbatches": peft_subbatches, "merged": merged},
                          repeats=repeats, warmup=1)
    rows_per_s = {name: round(2 * batch / statistics.median(v), 2) for name, v in times.items()}
    return {"rows_per_s": rows_per_s,
            # throughput ratios = time ratios the other way round: theirs_s / ours_s, paired per round
            **ratio_stats(times["single"], times["mixed"], "throughput_ratio", 3),
            **ratio_stats(times["peft_subbatches"], times["mixed"], "vs_peft_subbatches", 3),
            **ratio_stats(times["merged"], times["mixed"], "vs_merged_single_lora", 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny UNet only (< 1 min)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 7 tiny, 5 SD1.5)")
    args = parser.parse_args()

    from subjectpaint.base import ExemplarInpainter

    result = {"bench": "mixed_batch", "quick": args.quick, "subjects": 8, "rank": args.rank}
    tiny = ExemplarInpainter.tiny(0).unet
    result["tiny"] = measure(tiny, 32, 16, args.rank, repeats=args.repeats or 7)
    print("tiny", result["tiny"], flush=True)
    if not args.quick:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=64, in_channels=9, out_channels=4, cross_attention_dim=768).eval()
        result["sd15_256px"] = measure(unet, 768, 32, args.rank, repeats=args.repeats or 5)
        print("sd15", result["sd15_256px"], flush=True)
    # the headline figures: the largest shape measured
    main_shape = result.get("sd15_256px", result["tiny"])
    result["shape"] = "sd15_256px" if "sd15_256px" in result else "tiny"
    for key in ("throughput_ratio", "vs_peft_subbatches", "vs_merged_single_lora"):
        for suffix in ("", "_lo", "_hi"):
            result[key + suffix] = main_shape[key + suffix]
    result["repeats"] = main_shape["repeats"]
    finish(result, {"throughput_ratio": ">= 0.85"})


if __name__ == "__main__":
    main()
