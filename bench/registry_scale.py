"""Registry scale bench: ``get("name")`` latency with 1k rows vs 1M rows, same run.

Builds two SQLite registries (schema via the normal ``Registry`` open, so every migration, tenants included,
has run; rows bulk-inserted with core ``insert`` executemany in chunks, not ORM one by one), then times
``Registry.get(name)`` for random names, alternating between the two databases in rounds so machine noise hits
both alike. The subjects belong to ``--tenants`` tenants (the registry view that is timed is the first, the
migration's ``default``; the others hold the same share of rows, as on a shared server).

    python bench/registry_scale.py            # 1,000 vs 1,000,000 adapter rows (the 1M build takes minutes)
    python bench/registry_scale.py --quick    # 1,000 vs 20,000 rows, well under a minute

Keys name the row counts they were measured at (``get_p99_us_20000_rows``, ...). The p99 ratio's interval comes
from the rounds: each round's p99 on both sizes, paired (bench/_stats.py). The last stdout line is one JSON
object; the goal is ``p99_ratio <= 2`` (large vs small) on the interval's upper bound.
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone

from sqlalchemy import func, insert, select

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_store import Registry  # noqa: E402
from adapters_store.schema import AdapterVersion, Subject, Tenant  # noqa: E402
from bench._stats import finish, ratio_stats  # noqa: E402

VERSIONS_PER_SUBJECT = 2
CHUNK = 50_000


def build(path: str, rows: int, tenants: int) -> tuple[Registry, list[str], float]:
    """A registry with ``rows`` adapter rows (``rows / 2`` subjects x 2 versions) over ``tenants`` tenants,
    and the names of the default tenant's subjects (the view ``get`` is timed on)."""
    reg = Registry(f"sqlite:///{path}", os.path.join(os.path.dirname(path), "blobs"), cache_bytes=0)
    n_subjects = max(1, rows // VERSIONS_PER_SUBJECT)
    names = [f"product-{i:08d}-{random.getrandbits(32):08x}" for i in range(n_subjects)]
    created = datetime(2025, 1, 1, tzinfo=timezone.utc)
    rng = random.Random(rows)
    t0 = time.perf_counter()
    with reg.engine.begin() as conn:   # bench-only: straight to core, bypassing register()
        default_id = conn.scalar(select(Tenant.id).where(Tenant.name == reg.tenant))
        tenant_ids = [default_id] + [conn.execute(insert(Tenant).values(name=f"tenant-{t}", created=created))
                                     .inserted_primary_key[0] for t in range(1, tenants)]
        for start in range(0, n_subjects, CHUNK):
            conn.execute(insert(Subject), [
                {"id": i + 1, "tenant_id": tenant_ids[i % tenants], "name": names[i], "display": {},
                 "last_version": VERSIONS_PER_SUBJECT, "created": created}
                for i in range(start, min(n_subjects, start + CHUNK))])
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
    return reg, names[::tenants], time.perf_counter() - t0


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
    ap.add_argument("--quick", action="store_true", help="1,000 vs 20,000 rows, a few seconds")
    ap.add_argument("--small", type=int, default=1_000, help="adapter rows in the small registry")
    ap.add_argument("--large", type=int, default=None, help="adapter rows in the large one: default 1,000,000 "
                    "(20,000 with --quick)")
    ap.add_argument("--tenants", type=int, default=1, help="tenants the subjects are spread over (the timed view "
                    "is the first: it sees rows / tenants of them)")
    ap.add_argument("--samples", type=int, default=None, help="gets timed per size")
    ap.add_argument("--rounds", type=int, default=20, help="alternating rounds (each gives one paired p99 ratio)")
    ap.add_argument("--dir", default=None, help="where to build (default: a temp dir)")
    args = ap.parse_args(argv)
    large = args.large or (20_000 if args.quick else 1_000_000)
    samples = args.samples or (4_000 if args.quick else 20_000)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="registry-scale-") as tmp:
        os.makedirs(os.path.join(tmp, "small"))
        os.makedirs(os.path.join(tmp, "large"))
        small, small_names, small_s = build(os.path.join(tmp, "small", "r.db"), args.small, args.tenants)
        print(f"built {args.small} rows in {small_s:.1f}s", file=sys.stderr)
        big, big_names, big_s = build(os.path.join(tmp, "large", "r.db"), large, args.tenants)
        print(f"built {large} rows in {big_s:.1f}s", file=sys.stderr)
        for reg, rows in ((small, args.small), (big, large)):
            with reg.engine.connect() as conn:
                assert conn.scalar(select(func.count()).select_from(AdapterVersion)) == rows

        rng = random.Random(0)
        time_gets(small, small_names, 300, rng)   # warm both (connections, page cache)
        time_gets(big, big_names, 300, rng)
        rounds_small, rounds_big = [], []
        per_round = max(1, samples // args.rounds)
        gc.disable()
        try:
            for r in range(args.rounds):           # alternate, so drift hits both sides alike
                sides = ((small, small_names, rounds_small), (big, big_names, rounds_big))
                for reg, names, out in sides[:: 1 if r % 2 else -1]:
                    out.append(time_gets(reg, names, per_round, rng))
        finally:
            gc.enable()
        small.close()
        big.close()

    t_small, t_big = sum(rounds_small, []), sum(rounds_big, [])
    s, b = f"{args.small}_rows", f"{large}_rows"
    result = {
        "bench": "registry_scale", "backend": "sqlite", "quick": args.quick, "tenants": args.tenants,
        "rows_small": args.small, "rows_large": large, "rows_in_timed_tenant_large": large // args.tenants,
        "samples_per_size": len(t_small), "rounds": args.rounds,
        "build_s_large": round(big_s, 1), "rows_per_s_build": round(large / big_s),
        f"get_p50_us_{s}": round(statistics.median(t_small), 1),
        f"get_p99_us_{s}": round(pct(t_small, 0.99), 1),
        f"get_p50_us_{b}": round(statistics.median(t_big), 1),
        f"get_p99_us_{b}": round(pct(t_big, 0.99), 1),
    }
    # the ratios: median over rounds of the paired per-round percentiles, with the order-statistics interval
    result.update(ratio_stats([statistics.median(x) for x in rounds_big], [statistics.median(x) for x in rounds_small],
                              prefix="p50_ratio", digits=3))
    result.update(ratio_stats([pct(x, 0.99) for x in rounds_big], [pct(x, 0.99) for x in rounds_small],
                              prefix="p99_ratio", digits=3))
    result["p99_ratio_pooled"] = round(result[f"get_p99_us_{b}"] / result[f"get_p99_us_{s}"], 3)
    result["ratio_is"] = f"{large} rows / {args.small} rows"
    finish(result, {"p99_ratio": "<= 2"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
