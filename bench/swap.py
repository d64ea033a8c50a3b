"""Adapter swap latency: our slots vs diffusers, all in one run.

- warm: adapter already in RAM. Ours: `Slots.activate(laid_out)` (one copy). Peers: diffusers
  `unet.load_lora_adapter(state_dict, hotswap=True)` (in-place hot-swap from RAM) and diffusers load + delete.
- cold: ours = registry lookup + blob read + sha256 verify + decode + layout + copy (RAM tier cleared first);
  peer = diffusers hot-swap from the safetensors file.
- flat: our warm swap through the Studio (registry record -> RAM tier hit -> slots) with 1,000 registered and 100
  cached adapters vs with 1 registered and 1 cached. Also the lookup alone (SQL + RAM-tier hit, no copy): the full
  swap's ratio includes the copy's source leaving the CPU cache (one cached adapter stays in the last-level cache,
  one of 100 is read from DRAM), which does not depend on the registry.

Full run: SD1.5-shaped random UNet (9 input channels, ~860M params), rank-8 adapters on to_q/k/v/out.0.
`--quick`: the tiny test UNet. Goals: warm >= 20x faster than diffusers hot-swap, cold >= 3x, flat <= 1.1x.
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

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


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def ms(values):
    return round(statistics.median(values) * 1000, 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny UNet, 50 registered adapters (< 1 min)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()

    from adapters_store.registry import Registry

    from subjectpaint.base import ExemplarInpainter
    from subjectpaint.slots import Adapter
    from subjectpaint.studio import Studio

    if args.quick:
        base = ExemplarInpainter.tiny(0)
        n_registered, n_cached, repeats = 50, 10, args.repeats or 30
    else:
        from diffusers import UNet2DConditionModel


        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=64, in_channels=9, out_channels=4, cross_attention_dim=768)
        base = ExemplarInpainter.tiny(0)
        base.unet = unet.eval().requires_grad_(False)
        n_registered, n_cached, repeats = 1000, 100, args.repeats or 10
    unet = base.unet
    print(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M params", flush=True)
    scratch = tempfile.TemporaryDirectory(prefix="swap-bench-")  # removed when the run ends, even on error
    work = Path(scratch.name)
    shapes = target_shapes(unet)
    adapters = [random_adapter(shapes, args.rank, s) for s in range(3)]
    files = []
    for i, (sd, meta) in enumerate(adapters):
        files.append(work / f"a{i}.safetensors")
        save_file(sd, str(files[-1]), metadata=meta)

    # ---------------------------------------------------------------- diffusers (peer), its own UNet copy
    import copy

    peer = copy.deepcopy(unet)
    peer.load_lora_adapter(dict(adapters[0][0]), prefix="unet", adapter_name="slot", metadata=json.loads(
        adapters[0][1]["lora_adapter_metadata"]))
    k = iter(range(10**9))

    def hotswap_ram():
        i = next(k) % 2 + 1
        peer.load_lora_adapter(dict(adapters[i][0]), prefix="unet", adapter_name="slot", hotswap=True,
                               metadata=json.loads(adapters[i][1]["lora_adapter_metadata"]))

    def hotswap_file():
        i = next(k) % 2 + 1
        peer.load_lora_adapter(str(files[i]), prefix="unet", adapter_name="slot", hotswap=True,
                               use_safetensors=True)

    def load_delete():
        i = next(k) % 2 + 1
        peer.delete_adapters("slot")
        peer.load_lora_adapter(dict(adapters[i][0]), prefix="unet", adapter_name="slot",
                               metadata=json.loads(adapters[i][1]["lora_adapter_metadata"]))

    hotswap_ram(), hotswap_file(), load_delete()  # warm-up
    t_hot_ram = timed(hotswap_ram, repeats)
    t_hot_file = timed(hotswap_file, repeats)
    t_load_delete = timed(load_delete, repeats)
    print(f"diffusers hotswap from RAM {ms(t_hot_ram)} ms, from file {ms(t_hot_file)} ms, "
          f"load+delete {ms(t_load_delete)} ms", flush=True)
    del peer

    # ---------------------------------------------------------------- ours
    registry = Registry(f"sqlite:///{work / 'registry.db'}", work / "blobs")
    studio = Studio(base, registry=registry, cache_bytes=64 << 30)
    records = [registry.register(f"subject-{i}", sd, meta, base.fingerprint()) for i, (sd, meta) in enumerate(adapters)]
    flats = [studio.slots.layout(Adapter.from_state_dict(sd, meta)) for sd, meta in adapters]

    def warm():
        studio.slots.activate(flats[next(k) % 3])

    def cold():
        i = next(k) % 3
        studio.adapter_cache.clear()
        registry.cache.clear()
        studio.activate(SimpleNamespace(name=f"subject-{i}", record=registry.get(f"subject-{i}@1"), exemplar=None))

    warm(), cold()
    t_warm, t_cold = timed(warm, repeats * 10), timed(cold, repeats)
    print(f"ours warm {ms(t_warm)} ms, cold {ms(t_cold)} ms", flush=True)

    # ---------------------------------------------------------------- flat: 1 registered/cached vs N/M
    def studio_swap_latency(n_reg, n_cache, tag):
        reg = Registry(f"sqlite:///{work / f'flat-{tag}.db'}", work / "blobs")
        st = Studio(base, registry=reg, cache_bytes=64 << 30)
        st._slots = studio.slots  # same slots, own registry + RAM tier
        recs = []
        for i in range(n_reg):
            sd, meta = random_adapter(shapes, 4, 1000 + i) if i >= 3 else adapters[i % 3]
            recs.append(reg.register(f"s{i}", sd, meta, base.fingerprint()))
            if n_reg > 50 and i % 100 == 0:
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

        swap(), lookup()
        return timed(swap, repeats * 5), timed(lookup, repeats * 5), st.adapter_cache.stats()

    t_flat_1, t_look_1, _ = studio_swap_latency(1, 1, "one")
    t_flat_n, t_look_n, stats = studio_swap_latency(n_registered, n_cached, "many")
    print(f"studio swap (lookup + RAM hit + copy): 1/1 {ms(t_flat_1)} ms, {n_registered}/{n_cached} "
          f"{ms(t_flat_n)} ms; lookup alone {ms(t_look_1)} vs {ms(t_look_n)} ms; cache {stats}", flush=True)

    result = {
        "bench": "swap",
        "shape": "tiny" if args.quick else "sd15",
        "rank": args.rank,
        "ours_warm_ms": ms(t_warm),
        "diffusers_hotswap_ram_ms": ms(t_hot_ram),
        "diffusers_load_delete_ms": ms(t_load_delete),
        "warm_speedup_vs_hotswap": round(statistics.median(t_hot_ram) / statistics.median(t_warm), 1),
        "warm_speedup_vs_load_delete": round(statistics.median(t_load_delete) / statistics.median(t_warm), 1),
        "ours_cold_ms": ms(t_cold),
        "diffusers_hotswap_file_ms": ms(t_hot_file),
        "cold_speedup_vs_hotswap_file": round(statistics.median(t_hot_file) / statistics.median(t_cold), 2),
        "studio_swap_1_ms": ms(t_flat_1),
        f"studio_swap_{n_registered}_registered_{n_cached}_cached_ms": ms(t_flat_n),
        "flat_ratio": round(statistics.median(t_flat_n) / statistics.median(t_flat_1), 3),
        "lookup_1_ms": ms(t_look_1),
        f"lookup_{n_registered}_registered_{n_cached}_cached_ms": ms(t_look_n),
        "lookup_flat_ratio": round(statistics.median(t_look_n) / statistics.median(t_look_1), 3),
        "goals": {"warm_speedup_vs_hotswap": ">= 20", "cold_speedup_vs_hotswap_file": ">= 3", "flat_ratio": "<= 1.1"},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
