"""Adapter swap latency: our slots vs diffusers / PEFT, all in one run, alternated and warmed.

- warm (adapter already in RAM). Ours: `Slots.activate(laid_out)` (one copy of the adapter's rank rows).
  Peers on their own UNet copy: diffusers `unet.load_lora_adapter(state_dict, hotswap=True)` (the hot-swap API,
  from RAM); diffusers load + delete; and the floor: a plain in-place `copy_` of every factor into PEFT's
  `lora_A` / `lora_B` weights (what any hot-swap must at least do; the factors pre-converted to the UNet's dtype).
- cold: ours = registry lookup + blob read + sha256 verify + decode + layout + copy (RAM tier cleared first);
  peer = diffusers hot-swap from the safetensors file.
- flat: our warm swap through the Studio (registry lookup -> RAM tier hit -> slots) with N registered and M
  cached adapters vs with 1 registered and 1 cached, every adapter the same rank, the two studios timed in
  alternating rounds. Also the lookup alone (SQL + RAM-tier hit, no copy): the full swap's ratio includes the
  copy's source leaving the CPU cache (one cached adapter stays in the last-level cache, one of M is read from
  DRAM), which does not depend on the registry. Registered adapters beyond the M cached ones reuse their bytes
  (distinct names and rows, shared blobs): they are only looked up, never loaded.

Every figure is a median of paired per-round ratios with its 95 % interval (bench/_stats.py); a goal is met only
when the interval's bound meets it. Full run: SD1.5-shaped random UNet (9 input channels, ~860M params),
rank-8 adapters on to_q/k/v/out.0, 1,000 registered / 100 cached. `--quick`: the tiny test UNet, 50 / 10.
Goals: warm >= 20x faster than diffusers hot-swap, cold >= 3x, flat <= 1.1x. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench._stats import alternate, finish, ratio_stats  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def target_shapes(unet):
    return [(name, *m.weight.shape) for name, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS)]


def random_adapter(shapes, rank, seed, dtype=torch.float16):
    """A PEFT-format state dict (unet.<path>.lora_A/B.weight) with random factors, and its metadata."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, out_f, in_f in shapes:
        sd[f"unet.{name}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(dtype)
        sd[f"unet.{name}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).to(dtype)
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": rank, "unet.lora_alpha": rank,
                                                  "unet.target_modules": list(TARGETS)})}
    return sd, meta


def per_call(fn, n):
    """fn called n times in one timed unit (sub-millisecond calls); the unit's time is divided by n after."""
    def unit():
        for _ in range(n):
            fn()
    return unit


def ms(values):
    return round(statistics.median(values) * 1000, 4)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny UNet, 50 registered adapters (< 1 min)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="alternating rounds per comparison")
    parser.add_argument("--registered", type=int, default=None, help="default 1000 (50 with --quick)")
    parser.add_argument("--cached", type=int, default=None, help="default 100 (10 with --quick)")
    args = parser.parse_args()

    from adapters_store.registry import Registry

    from subjectpaint.base import ExemplarInpainter
    from subjectpaint.slots import Adapter
    from subjectpaint.studio import Studio

    base = ExemplarInpainter.tiny(0)
    if args.quick:
        n_registered, n_cached, repeats, inner = 50, 10, args.repeats or 8, 20
    else:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=64, in_channels=9, out_channels=4, cross_attention_dim=768)
        base.unet = unet.eval().requires_grad_(False)
        n_registered, n_cached, repeats, inner = 1000, 100, args.repeats or 15, 10
    n_registered, n_cached = args.registered or n_registered, args.cached or n_cached
    unet = base.unet
    print(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M params", flush=True)
    scratch = tempfile.TemporaryDirectory(prefix="swap-bench-")  # removed when the run ends, even on error
    work = Path(scratch.name)
    shapes = target_shapes(unet)
    adapters = [random_adapter(shapes, args.rank, s) for s in range(max(3, n_cached))]
    files = []
    for i, (sd, meta) in enumerate(adapters[:3]):
        files.append(work / f"a{i}.safetensors")
        save_file(sd, str(files[-1]), metadata=meta)
    metas = [json.loads(meta["lora_adapter_metadata"]) for _, meta in adapters]
    k = iter(range(10**9))

    # ---------------------------------------------------------------- diffusers / PEFT (peers), own UNet copy
    peer = copy.deepcopy(unet)
    peer.load_lora_adapter(dict(adapters[0][0]), prefix="unet", adapter_name="slot", metadata=metas[0])

    def hotswap_ram():
        i = next(k) % 2 + 1
        peer.load_lora_adapter(dict(adapters[i][0]), prefix="unet", adapter_name="slot", hotswap=True,
                               metadata=metas[i])

    def hotswap_file():
        i = next(k) % 2 + 1
        peer.load_lora_adapter(str(files[i]), prefix="unet", adapter_name="slot", hotswap=True,
                               use_safetensors=True)

    def load_delete():
        i = next(k) % 2 + 1
        peer.delete_adapters("slot")
        peer.load_lora_adapter(dict(adapters[i][0]), prefix="unet", adapter_name="slot", metadata=metas[i])

    def peft_pairs(i):
        """(PEFT's lora weight, adapter i's factor in the weight's dtype) for every wrapped module."""
        sd = adapters[i][0]
        pairs = []
        for name, module in peer.named_modules():
            if hasattr(module, "lora_A") and "slot" in module.lora_A:
                for part in ("lora_A", "lora_B"):
                    w = getattr(module, part)["slot"].weight
                    pairs.append((w, sd[f"unet.{name}.{part}.weight"].to(w.dtype)))
        return pairs

    def inplace_copy():  # the floor: every factor copied in place, nothing checked, nothing looked up
        for w, src in copy_sources[next(k) % 2]:
            w.copy_(src)

    # ---------------------------------------------------------------- ours
    registry = Registry(f"sqlite:///{work / 'registry.db'}", work / "blobs")
    studio = Studio(base, registry=registry, cache_bytes=64 << 30)
    for i, (sd, meta) in enumerate(adapters[:3]):
        registry.register(f"subject-{i}", sd, meta, base.fingerprint())
    flats = [studio.slots.layout(Adapter.from_state_dict(sd, meta)) for sd, meta in adapters[:3]]

    def warm():
        studio.slots.activate(flats[next(k) % 3])

    def cold():
        i = next(k) % 3
        studio.adapter_cache.clear()
        registry.cache.clear()
        studio.activate(SimpleNamespace(name=f"subject-{i}", record=registry.get(f"subject-{i}@1"), exemplar=None))

    with torch.no_grad():
        # (reload the peer after slots were injected into `unet`: the peer is its own deepcopy, untouched)
        copy_sources = [peft_pairs(1), peft_pairs(2)]
        # warm: ours vs hot-swap vs load+delete vs the in-place floor, one round each in rotating order
        heavy = 1 if not args.quick else 2  # peers' calls are 100x ours: fewer per timed unit
        t = alternate({"ours": per_call(warm, inner), "hotswap": per_call(hotswap_ram, heavy),
                       "load_delete": per_call(load_delete, heavy), "inplace": per_call(inplace_copy, inner)},
                      repeats=repeats, warmup=1)
        t = {"ours": [x / inner for x in t["ours"]], "hotswap": [x / heavy for x in t["hotswap"]],
             "load_delete": [x / heavy for x in t["load_delete"]], "inplace": [x / inner for x in t["inplace"]]}
        print(f"warm: ours {ms(t['ours'])} ms, diffusers hot-swap {ms(t['hotswap'])} ms, load+delete "
              f"{ms(t['load_delete'])} ms, in-place copy into PEFT {ms(t['inplace'])} ms", flush=True)
        c = alternate({"ours": cold, "hotswap_file": hotswap_file}, repeats=repeats, warmup=1)
        print(f"cold: ours {ms(c['ours'])} ms, diffusers hot-swap from file {ms(c['hotswap_file'])} ms", flush=True)
    peer = copy_sources = None  # frees the peer's UNet copy before the flat part

    # ---------------------------------------------------------------- flat: 1 registered/cached vs N/M
    def studio_with(n_reg, n_cache, tag):
        reg = Registry(f"sqlite:///{work / f'flat-{tag}.db'}", work / "blobs")
        st = Studio(base, registry=reg, cache_bytes=64 << 30)
        st._slots = studio.slots  # same slots, own registry + RAM tier
        recs = []
        for i in range(n_reg):
            sd, meta = adapters[i % len(adapters)]  # all at --rank; beyond the cached ones, shared bytes
            recs.append(reg.register(f"s{i}", sd, meta, base.fingerprint()))
            if n_reg > 50 and i % 200 == 0:
                print(f"  registered {i}/{n_reg}", flush=True)
        subjects = [SimpleNamespace(name=r.name, record=r, exemplar=None) for r in recs[:n_cache]]
        for s in subjects:
            st.activate(s)  # fills the RAM tier
        rng = random.Random(0)

        def swap():
            s = subjects[rng.randrange(len(subjects))]
            st.activate(SimpleNamespace(name=s.name, record=reg.get(s.name), exemplar=None))  # lookup + RAM + copy

        def lookup():  # the part that could grow with the registry: SQL lookup + RAM-tier hit, no copy
            s = subjects[rng.randrange(len(subjects))]
            st.laid_out(SimpleNamespace(name=s.name, record=reg.get(s.name), exemplar=None))

        return swap, lookup, st

    swap_1, lookup_1, _ = studio_with(1, 1, "one")
    swap_n, lookup_n, st_n = studio_with(n_registered, n_cached, "many")
    with torch.no_grad():
        f = alternate({"one": per_call(swap_1, inner), "many": per_call(swap_n, inner)}, repeats=repeats, warmup=2)
        lk = alternate({"one": per_call(lookup_1, inner), "many": per_call(lookup_n, inner)}, repeats=repeats,
                       warmup=2)
    f = {n: [x / inner for x in v] for n, v in f.items()}
    lk = {n: [x / inner for x in v] for n, v in lk.items()}
    tag = f"{n_registered}_registered_{n_cached}_cached"
    print(f"studio swap (lookup + RAM hit + copy): 1/1 {ms(f['one'])} ms, {n_registered}/{n_cached} "
          f"{ms(f['many'])} ms; lookup alone {ms(lk['one'])} vs {ms(lk['many'])} ms; cache "
          f"{st_n.adapter_cache.stats()}", flush=True)

    result = {
        "bench": "swap", "shape": "tiny" if args.quick else "sd15", "rank": args.rank, "quick": args.quick,
        "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6),
        "ours_warm_ms": ms(t["ours"]), "diffusers_hotswap_ram_ms": ms(t["hotswap"]),
        "diffusers_load_delete_ms": ms(t["load_delete"]), "peft_inplace_copy_ms": ms(t["inplace"]),
        **ratio_stats(t["hotswap"], t["ours"], "warm_speedup_vs_hotswap", 2),
        **ratio_stats(t["load_delete"], t["ours"], "warm_speedup_vs_load_delete", 2),
        # ours / the floor: < 1 is faster than copying PEFT's weights in place (one copy of the rank rows
        # instead of one per factor)
        **ratio_stats(t["ours"], t["inplace"], "warm_vs_inplace_copy", 3),
        "ours_cold_ms": ms(c["ours"]), "diffusers_hotswap_file_ms": ms(c["hotswap_file"]),
        **ratio_stats(c["hotswap_file"], c["ours"], "cold_speedup_vs_hotswap_file", 2),
        "studio_swap_1_registered_1_cached_ms": ms(f["one"]), f"studio_swap_{tag}_ms": ms(f["many"]),
        **ratio_stats(f["many"], f["one"], "flat_ratio", 3),
        "lookup_1_registered_1_cached_ms": ms(lk["one"]), f"lookup_{tag}_ms": ms(lk["many"]),
        **ratio_stats(lk["many"], lk["one"], "lookup_flat_ratio", 3),
        "flat_is": f"{n_registered} registered / {n_cached} cached vs 1 / 1, all rank {args.rank}",
        "repeats": repeats,
    }
    finish(result, {"warm_speedup_vs_hotswap": ">= 20", "cold_speedup_vs_hotswap_file": ">= 3",
                    "flat_ratio": "<= 1.1"})


if __name__ == "__main__":
    main()
