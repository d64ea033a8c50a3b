"""Load test of `subjectpaint serve` on loopback: C concurrent clients, S subjects, R placements, with LitServe's
dynamic batching on (mixed-subject batches) and off (max_batch_size=1), measured in the same run on the same
registry. Tiny random base (bounded on CPU). Prints p50/p99 latency and throughput per mode; last line JSON.

    python bench/serve_load.py            # 32 clients, 8 subjects, 400 requests per mode
    python bench/serve_load.py --quick    # 8 clients, 4 subjects, 40 requests per mode
"""
import argparse
import asyncio
import base64
import io
import json
import os
import random
import tempfile
import time

import httpx
import numpy as np

from adapters_store import Registry
from subjectpaint import Studio, Subject
from subjectpaint.base import ExemplarInpainter
from subjectpaint.demo.scenes import EVAL_SEEDS, HELDOUT_PRODUCT_SEEDS, Product, make_scene, product_photos
from subjectpaint.serve.local import local_server


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


async def load(url: str, key: str, clients: int, requests: int, subjects: int, steps: int, seed: int):
    scenes = [make_scene(EVAL_SEEDS[i % len(EVAL_SEEDS)], 32) for i in range(4)]
    rng = random.Random(seed)
    bodies = [{"subject": f"product-{rng.randrange(subjects)}", "room": png64(s.room), "mask": png64(s.mask),
               "steps": steps, "seed": rng.randrange(1000)} for s in (rng.choice(scenes) for _ in range(requests))]
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies, statuses, rows = [], [], []

    async def client():
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=300) as http:
            while not queue.empty():
                body = queue.get_nowait()
                t = time.perf_counter()
                try:
                    r = await http.post("/v1/place", json=body)
                    statuses.append(r.status_code)
                    rows.append(int(r.headers.get("x-batch-rows", 0)))
                except httpx.HTTPError:
                    statuses.append(-1)
                latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    ok = sum(s == 200 for s in statuses)
    return {"requests": requests, "ok": ok, "failed": len(statuses) - ok, "lost": requests - len(statuses),
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1),
            "throughput_rps": round(ok / wall, 2), "mean_batch_rows": round(float(np.mean(rows)), 2) if rows else 0}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--clients", type=int, default=None)
    p.add_argument("--subjects", type=int, default=None)
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--steps", type=int, default=2, help="denoising steps per placement")
    p.add_argument("--port", type=int, default=8790)
    args = p.parse_args()
    clients = args.clients or (8 if args.quick else 32)
    subjects = args.subjects or (4 if args.quick else 8)
    requests = args.requests or (40 if args.quick else 400)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    scratch = tempfile.TemporaryDirectory(prefix="subjectpaint-load-")  # removed when the run ends
    home = scratch.name
    url, blobs, key = prepare(home, subjects)
    results = {}
    for n, (mode, batch) in enumerate((("batched", 8), ("unbatched", 1))):
        options = ["--base", "tiny", "--registry", url, "--blobs", blobs, "--max-batch-size", str(batch),
                   "--batch-timeout", "0.02", "--steps", str(args.steps)]
        with local_server(*options, port=args.port + n) as base:
            asyncio.run(load(base, key, min(clients, 4), 8, subjects, args.steps, seed=99))  # warm-up (adapters, JIT)
            results[mode] = asyncio.run(load(base, key, clients, requests, subjects, args.steps, seed=0))
        r = results[mode]
        print(f"{mode:9s}: {r['ok']}/{r['requests']} ok, {r['failed']} failed, {r['lost']} lost; "
              f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, {r['throughput_rps']} req/s, "
              f"mean batch {r['mean_batch_rows']} rows")
    summary = {"bench": "serve_load", "clients": clients, "subjects": subjects, "requests": requests,
               "steps": args.steps, **results,
               "throughput_ratio_batched_vs_unbatched": round(results["batched"]["throughput_rps"]
                                                              / max(results["unbatched"]["throughput_rps"], 1e-9), 2)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
