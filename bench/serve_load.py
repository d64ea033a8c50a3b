"""Load test of `subjectpaint serve` on loopback: C concurrent clients, S subjects, R placements, with LitServe's
dynamic batching on (mixed-subject batches) and off (max_batch_size=1), measured in the same run on the same
registry. Tiny random base (bounded on CPU). Prints p50/p99 latency and throughput per mode; last line JSON.

    python bench/serve_load.py            # 32 clients, 8 subjects, 400 requests per mode in 8 rounds
    python bench/serve_load.py --quick    # 4 clients, 2 subjects, 24 requests per mode in 4 rounds

Both servers run at once and the modes alternate round by round (each round's throughput ratio is one paired
sample of `throughput_ratio_batched_vs_unbatched`). Every request has one outcome: ok (2xx) or failed (a non-2xx
answer, a timeout, a dropped connection, any exception); `lost` counts the failed ones the server accepted and
never answered. `--inject-failures N` adds N requests per mode for an unknown subject (each must come back 404).
Goals: 0 lost, 0 failed beyond the injected ones.
"""
import argparse
import asyncio
import base64
import io
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from adapters_store import Registry
from subjectpaint import Studio, Subject
from subjectpaint.base import ExemplarInpainter
from subjectpaint.demo.scenes import EVAL_SEEDS, HELDOUT_PRODUCT_SEEDS, Product, make_scene, product_photos
from subjectpaint.serve.local import local_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._stats import finish, ratio_stats  # noqa: E402


def png64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def prepare(home: str, subjects: int):
    url, blobs = f"sqlite:///{home}/registry.db", f"{home}/blobs"
    with Registry(url, blobs) as registry:
        registry.create_tenant("bench")
        key = registry.issue_key("bench")
        view = registry.for_tenant("bench")
        studio = Studio(ExemplarInpainter.tiny(0), registry=view)
        for i in range(subjects):
            photos = [p.image.resize((32, 32)) for p in
                      product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[i % len(HELDOUT_PRODUCT_SEEDS)]), 2)]
            Subject.train(photos, f"product-{i}", studio, registry=view, steps=1, batch_size=2, detector=None,
                          progress=False, seed=i)
    return url, blobs, key


def place_bodies(requests: int, subjects: int, steps: int, seed: int, unknown: int = 0) -> list[dict]:
    """`requests` placement bodies over `subjects` subjects; the first `unknown` name a subject that does not
    exist (a request the server must answer 404: an injected failure)."""
    scenes = [make_scene(EVAL_SEEDS[i % len(EVAL_SEEDS)], 32) for i in range(4)]
    rng = random.Random(seed)
    bodies = [{"subject": f"product-{rng.randrange(subjects)}", "room": png64(s.room), "mask": png64(s.mask),
               "steps": steps, "seed": rng.randrange(1000)} for s in (rng.choice(scenes) for _ in range(requests))]
    for body in bodies[:unknown]:
        body["subject"] = "no-such-product"
    return bodies


async def drive(url: str, key: str, bodies: list[dict], clients: int, timeout: float = 300.0,
                deadline: float | None = None, transport=None) -> dict:
    """Send every body to POST /v1/place from `clients` concurrent clients; count every outcome.

    ok: a 2xx answer. failed: everything else: a non-2xx answer, a timeout, a dropped connection, any exception
    (the run goes on), and a request still unanswered at `deadline` seconds or never sent. lost (a subset of
    failed): accepted but never answered: sent, and then no HTTP answer came (timeout, connection dropped after
    the request went out, cancelled at the deadline). ok + failed == requests, always."""
    queue: asyncio.Queue = asyncio.Queue()
    for i, body in enumerate(bodies):
        queue.put_nowait((i, body))
    outcome: dict[int, str] = {}      # request index -> "ok" | "http <status>" | "lost: <why>" | "error: <why>"
    in_flight: set[int] = set()
    latencies, rows = [], []

    async def client():
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=timeout,
                                     transport=transport) as http:
            while True:
                try:
                    i, body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                in_flight.add(i)
                t = time.perf_counter()
                try:
                    r = await http.post("/v1/place", json=body)
                except (httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ReadError) as e:
                    outcome[i] = f"lost: {type(e).__name__}"  # the server had the request and never answered
                except Exception as e:  # noqa: BLE001 - a load test counts every failure and goes on
                    outcome[i] = f"error: {type(e).__name__}: {e}"
                else:
                    outcome[i] = "ok" if 200 <= r.status_code < 300 else f"http {r.status_code}"
                    if outcome[i] == "ok":
                        latencies.append(time.perf_counter() - t)
                        rows.append(int(r.headers.get("x-batch-rows", 0)))
                in_flight.discard(i)  # (a request cancelled at the deadline stays in flight: lost)

    start = time.perf_counter()
    tasks = [asyncio.ensure_future(client()) for _ in range(clients)]
    _, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - start
    for i in range(len(bodies)):
        if i not in outcome:
            outcome[i] = "lost: unanswered at the deadline" if i in in_flight else "error: never sent"
    ok = sum(v == "ok" for v in outcome.values())
    lost = sum(v.startswith("lost") for v in outcome.values())
    kinds: dict[str, int] = {}
    for v in outcome.values():
        if v != "ok":
            kinds[v] = kinds.get(v, 0) + 1
    return {"requests": len(bodies), "ok": ok, "failed": len(bodies) - ok, "lost": lost, "failures": kinds,
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1) if latencies else None,
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1) if latencies else None,
            "wall_s": round(wall, 3), "throughput_rps": round(ok / wall, 2),
            "mean_batch_rows": round(float(np.mean(rows)), 2) if rows else 0, "latencies_s": latencies}


def pooled(rounds: list[dict]) -> dict:
    """One mode's rounds added up: counts summed, latency percentiles over every answer, throughput = ok / wall."""
    latencies = sum((r["latencies_s"] for r in rounds), [])
    failures: dict[str, int] = {}
    for r in rounds:
        for kind, n in r["failures"].items():
            failures[kind] = failures.get(kind, 0) + n
    ok, wall = sum(r["ok"] for r in rounds), sum(r["wall_s"] for r in rounds)
    return {"requests": sum(r["requests"] for r in rounds), "ok": ok, "failed": sum(r["failed"] for r in rounds),
            "lost": sum(r["lost"] for r in rounds), "failures": failures,
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1) if latencies else None,
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1) if latencies else None,
            "throughput_rps": round(ok / wall, 2) if wall else 0.0,
            "mean_batch_rows": round(float(np.mean([r["mean_batch_rows"] for r in rounds])), 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--clients", type=int, default=None)
    p.add_argument("--subjects", type=int, default=None)
    p.add_argument("--requests", type=int, default=None, help="per mode, split over --rounds")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds per mode (default 8; 4 with --quick)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps per placement")
    p.add_argument("--timeout", type=float, default=300.0, help="per request, seconds (then: failed and lost)")
    p.add_argument("--inject-failures", type=int, default=0,
                   help="per mode, requests for a subject that does not exist (each must come back 404)")
    p.add_argument("--port", type=int, default=8790)
    args = p.parse_args()
    clients = args.clients or (4 if args.quick else 32)
    subjects = args.subjects or (2 if args.quick else 8)
    requests = args.requests or (24 if args.quick else 400)
    rounds = args.rounds or (4 if args.quick else 8)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    scratch = tempfile.TemporaryDirectory(prefix="subjectpaint-load-")  # removed when the run ends
    home = scratch.name
    t0 = time.perf_counter()
    url, blobs, key = prepare(home, subjects)
    print(f"trained {subjects} subjects in {time.perf_counter() - t0:.1f} s", flush=True)
    modes = {"batched": 8, "unbatched": 1}
    per_round = [requests // rounds + (r < requests % rounds) for r in range(rounds)]
    # both servers start (and stop) at once: each takes tens of seconds to import and spawn its workers
    servers = {mode: local_server("--base", "tiny", "--registry", url, "--blobs", blobs, "--max-batch-size",
                                  str(batch), "--batch-timeout", "0.02", "--steps", str(args.steps), port=args.port + n)
               for n, (mode, batch) in enumerate(modes.items())}
    with ThreadPoolExecutor(len(servers)) as pool:
        urls = dict(zip(servers, pool.map(lambda cm: cm.__enter__(), servers.values())))
    try:
        print(f"servers up at {time.perf_counter() - t0:.1f} s", flush=True)
        for mode, base in urls.items():  # warm-up (adapters, JIT)
            asyncio.run(drive(base, key, place_bodies(8, subjects, args.steps, 99), min(clients, 4), args.timeout))
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for r in range(rounds):  # alternate the modes round by round, the order flipped each round
            for mode in list(modes)[:: 1 if r % 2 == 0 else -1]:
                bodies = place_bodies(per_round[r], subjects, args.steps, seed=r,
                                      unknown=args.inject_failures if r == 0 else 0)
                runs[mode].append(asyncio.run(drive(urls[mode], key, bodies, clients, args.timeout)))
    finally:
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda cm: cm.__exit__(None, None, None), servers.values()))
    print(f"servers down at {time.perf_counter() - t0:.1f} s", flush=True)
    results = {mode: pooled(rs) for mode, rs in runs.items()}
    for mode, r in results.items():
        print(f"{mode:9s}: {r['ok']}/{r['requests']} ok, {r['failed']} failed, {r['lost']} lost {r['failures']}; "
              f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, {r['throughput_rps']} req/s, "
              f"mean batch {r['mean_batch_rows']} rows")
    injected_404 = sum(min(args.inject_failures, r["failures"].get("http 404", 0)) for r in results.values())
    summary = {"bench": "serve_load", "quick": args.quick, "clients": clients, "subjects": subjects,
               "requests_per_mode": requests, "rounds": rounds, "steps": args.steps,
               "injected_failures_per_mode": args.inject_failures, **results,
               "lost": sum(r["lost"] for r in results.values()),
               "failed": sum(r["failed"] for r in results.values()),
               "failed_unexpected": sum(r["failed"] for r in results.values()) - injected_404,
               **ratio_stats([r["throughput_rps"] for r in runs["batched"]],
                             [max(r["throughput_rps"], 1e-9) for r in runs["unbatched"]],
                             "throughput_ratio_batched_vs_unbatched", 3)}
    finish(summary, {"lost": "== 0", "failed_unexpected": "== 0"})


if __name__ == "__main__":
    main()
