"""Registry scale bench: ``get("name")`` latency with 1k rows vs 1M rows, same run.

Builds two SQLite registries (schema via the normal ``Registry`` open, rows bulk-inserted with core
``insert`` executemany in chunks, not ORM one by one), then times ``Registry.get(name)`` for random
names, alternating between the two databases in rounds so machine noise hits both alike.

    python bench/registry_scale.py            # 1k vs 1M rows (the 1M build takes a few minutes)
    python bench/registry_scale.py --quick    # 1k vs 20k rows, well under a minute

The last stdout line is one JSON object; the goal is ``p99_ratio_1M_vs_1k <= 2``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone

from sqlalchemy import insert

from adapters_store import Registry
from adapters_store.schema import AdapterVersion, Subject

VERSIONS_PER_SUBJECT = 2
CHUNK = 50_000


def build(path: str, rows: int) -> tuple[Registry, list[str], float]:
    """A registry with ``rows`` adapter rows (``rows / 2`` subjects x 2 versions)."""
    reg = Registry(f"sqlite:///{path}", os.path.join(os.path.dirname(path), "blobs"), cache_bytes=0)
    n_subjects = max(1, rows // VERSIONS_PER_SUBJECT)
    names = [f"product-{i:08d}-{random.getrandbits(32):08x}" for i in range(n_subjects)]
    created = datetime(2025, 1, 1, tzinfo=timezone.utc)
    rng = random.Random(rows)
    t0 = time.perf_counter()
    with reg.engine.begin() as conn:   # bench-only: straight to core, bypassing register()
        for start in range(0, n_subjects, CHUNK):
            conn.execute(insert(Subject), [
                {"id": i + 1, "name": names[i], "display": {}, "last_version": VERSIONS_PER_SUBJECT,
                 "created": created} for i in range(start, min(n_subjects, start + CHUNK))])
        pending = []
        for i in range(n_subjects):
            for v in range(1, VERSIONS_PER_SUBJECT + 1):
                pending.append({
                    "subject_id": i + 1, "version": v, "rank": 8, "alpha": 8.0,
                    "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "dtype": "float16",
                    "byte_size": 1 << 20, "sha256": f"{rng.getrandbits(256):064x}",
                    "base_fingerprint": "bench-base", "meta": {"i": i}, "training": {},
                    "metrics": {}, "created": created})
                if len(pending) == CHUNK:
                    conn.execute(insert(AdapterVersion), pending)
                    pending = []
        if pending:
            conn.execute(insert(AdapterVersion), pending)
    with reg.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
    return reg, names, time.perf_counter() - t0


def time_gets(reg: Registry, names: list[str], n: int, rng: random.Random) -> list[float]:
    out = []
    for _ in range(n):
        name = rng.choice(names)
        t0 = time.perf_counter_ns()
        rec = reg.get(name)
        out.append((time.perf_counter_ns() - t0) / 1000)
        assert rec.version == VERSIONS_PER_SUBJECT
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1k vs 20k rows, a few seconds")
    ap.add_argument("--small", type=int, default=1_000)
    ap.add_argument("--large", type=int, default=None, help="default 1,000,000 (20,000 with --quick)")
    ap.add_argument("--samples", type=int, default=None, help="gets timed per size")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--dir", default=None, help="where to build (default: a temp dir)")
    args = ap.parse_args(argv)
    large = args.large or (20_000 if args.quick else 1_000_000)
    samples = args.samples or (2_000 if args.quick else 10_000)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="registry-scale-") as tmp:
        os.makedirs(os.path.join(tmp, "small"))
        os.makedirs(os.path.join(tmp, "large"))
        small, small_names, small_s = build(os.path.join(tmp, "small", "r.db"), args.small)
        print(f"built {args.small} rows in {small_s:.1f}s", file=sys.stderr)
        big, big_names, big_s = build(os.path.join(tmp, "large", "r.db"), large)
        print(f"built {large} rows in {big_s:.1f}s", file=sys.stderr)
        assert small.count() == args.small and big.count() == large

        rng = random.Random(0)
        time_gets(small, small_names, 300, rng)   # warm both (connections, page cache)
        time_gets(big, big_names, 300, rng)
        t_small, t_big = [], []
        per_round = max(1, samples // args.rounds)
        gc.disable()
        try:
            for r in range(args.rounds):           # alternate, so drift hits both sides alike
                first, second = ((small, small_names, t_small), (big, big_names, t_big))[:: 1 if r % 2 else -1]
                for reg, names, out in (first, second):
                    out += time_gets(reg, names, per_round, rng)
        finally:
            gc.enable()
        small.close()
        big.close()

    result = {
        "bench": "registry_scale", "backend": "sqlite", "quick": args.quick,
        "rows_small": args.small, "rows_large": large, "samples_per_size": len(t_small),
        "build_s_large": round(big_s, 1), "rows_per_s_build": round(large / big_s),
        "get_p50_us_1k": round(statistics.median(t_small), 1),
        "get_p99_us_1k": round(pct(t_small, 0.99), 1),
        "get_p50_us_1M": round(statistics.median(t_big), 1),
        "get_p99_us_1M": round(pct(t_big, 0.99), 1),
    }
    result["p50_ratio_1M_vs_1k"] = round(result["get_p50_us_1M"] / result["get_p50_us_1k"], 3)
    result["p99_ratio_1M_vs_1k"] = round(result["get_p99_us_1M"] / result["get_p99_us_1k"], 3)
    result["goal_p99_ratio_le_2"] = result["p99_ratio_1M_vs_1k"] <= 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
