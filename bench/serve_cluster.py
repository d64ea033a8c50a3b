"""Cluster soak on loopback: 2 `subjectpaint serve --no-worker` + 1 `subjectpaint worker` on one registry and blob
store, a registration stream and a placement stream at once (alternating between the two serve processes), and the
worker killed with SIGKILL mid-run while it trains (a fresh worker is started after it, as a supervisor would).
Counts what a client sees: jobs that end done / failed / never (lost), placements answered 200 / anything else
(non-2xx, timeouts, exceptions), placement latency p50/p99. Tiny random base. Last line JSON.

    python bench/serve_cluster.py                 # 6 jobs x 24 steps, 60 s of placements, 4 clients
    python bench/serve_cluster.py --quick         # 2 jobs x 8 steps, placements until they end, 2 clients
    python bench/serve_cluster.py --registry postgresql+psycopg://... --blobs s3://bucket/prefix

Goals: jobs_lost == 0 and placements_failed == 0 (a killed worker must cost nothing but time).
"""
import argparse
import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import PIL.Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_store import Registry  # noqa: E402
from adapters_store.jobs import JobQueue  # noqa: E402
from subjectpaint import Studio, Subject  # noqa: E402
from subjectpaint.base import ExemplarInpainter  # noqa: E402
from subjectpaint.demo.scenes import (EVAL_SEEDS, HELDOUT_PRODUCT_SEEDS, Product, make_scene,  # noqa: E402
                                      product_photos)
from subjectpaint.serve.local import wait_healthy  # noqa: E402

from bench._stats import finish  # noqa: E402


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _photos(i: int) -> list[bytes]:
    product = Product.from_seed(HELDOUT_PRODUCT_SEEDS[i % len(HELDOUT_PRODUCT_SEEDS)])
    return [_png(p.image.resize((32, 32))) for p in product_photos(product, 2)]


class Procs:
    def __init__(self, url, blobs, env):
        self.url, self.blobs, self.env, self.all = url, blobs, env, []

    def spawn(self, *args):
        cmd = [sys.executable, "-m", "subjectpaint.cli", *args, "--base", "tiny", "--registry", self.url,
               "--blobs", self.blobs]
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.all.append(proc)
        return proc

    def worker(self):
        return self.spawn("worker", "-q", "--lease", "4", "--poll", "0.2", "--checkpoint-every", "4",
                          "--batch-size", "2", "--threads", "1")

    def serve(self, train_steps):
        port = _port()
        proc = self.spawn("serve", "--no-worker", "--port", str(port), "--train-steps", str(train_steps),
                          "--steps", "2", "--max-batch-size", "4",  # durability, not fairness: no tenant limits
                          "--max-jobs-per-tenant", "16", "--place-rate", "1000")
        return proc, f"http://127.0.0.1:{port}"

    def kill_all(self):
        for proc in self.all:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None, help="placement stream length (at least until jobs end)")
    p.add_argument("--clients", type=int, default=None)
    p.add_argument("--registry", default=None, help="registry URL (default: SQLite in a temp dir)")
    p.add_argument("--blobs", default=None, help="blob store URL (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up on unfinished jobs after this (lost)")
    args = p.parse_args()
    jobs_n = args.jobs or (2 if args.quick else 6)
    steps = args.train_steps or (8 if args.quick else 24)
    seconds = args.seconds if args.seconds is not None else (0.0 if args.quick else 60.0)
    clients = args.clients or (2 if args.quick else 4)

    home = tempfile.mkdtemp(prefix="subjectpaint-cluster-")
    url, blobs = args.registry or f"sqlite:///{home}/registry.db", args.blobs or f"{home}/blobs"
    registry = Registry(url, blobs)
    tenant = f"bench-{uuid.uuid4().hex[:8]}"   # a tenant of its own: a given registry can be reused
    registry.create_tenant(tenant)
    key = registry.issue_key(tenant)
    view = registry.for_tenant(tenant)
    Subject.train([PIL.Image.open(io.BytesIO(b)) for b in _photos(0)], "placed", Studio(ExemplarInpainter.tiny(0),
                  registry=view), registry=view, steps=1, batch_size=2, detector=None, progress=False)
    scene = make_scene(EVAL_SEEDS[0], 32)
    place_body = {"subject": "placed", "room": base64.b64encode(_png(scene.room)).decode(),
                  "mask": base64.b64encode(_png(scene.mask)).decode(), "steps": 2}

    procs = Procs(url, blobs, {**os.environ, "SUBJECTPAINT_HOME": home, "OMP_NUM_THREADS": "1"})
    started = time.monotonic()
    try:
        worker = procs.worker()
        serves = [procs.serve(steps), procs.serve(steps)]
        for proc, base_url in serves:
            wait_healthy(base_url, 300, proc)
        urls = [u for _, u in serves]
        startup_s = time.monotonic() - started
        stop = threading.Event()
        lat, place_ok, place_failed, lock = [], [0], [0], threading.Lock()

        def placer(i):
            with httpx.Client(headers={"X-API-Key": key}, timeout=60) as http:
                n = i
                while not stop.is_set():
                    n += 1
                    t0 = time.perf_counter()
                    try:
                        ok = http.post(f"{urls[n % 2]}/v1/place", json={**place_body, "seed": n}).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    with lock:
                        if ok:
                            place_ok[0] += 1
                            lat.append(time.perf_counter() - t0)
                        else:
                            place_failed[0] += 1

        queue, killed, current = JobQueue(registry), [0], [worker]
        submitted, submit_retries = [], 0

        def killer():   # kill -9 the worker while it trains (after its first checkpoint), then start a fresh one
            while not stop.is_set() and not killed[0]:
                jobs = [queue.get(tenant, job_id) for job_id in list(submitted)]
                if any(j.state == "running" and j.checkpoint for j in jobs):
                    os.kill(current[0].pid, signal.SIGKILL)
                    current[0].wait()
                    killed[0] = 1
                    time.sleep(1.0)
                    current[0] = procs.worker()
                time.sleep(0.1)

        threads = [threading.Thread(target=placer, args=(i,), daemon=True) for i in range(clients)]
        threads.append(threading.Thread(target=killer, daemon=True))
        for t in threads:
            t.start()
        with httpx.Client(headers={"X-API-Key": key}, timeout=60) as http:
            for i in range(jobs_n):   # the registration stream: one every second, alternating serves
                files = [("photos", (f"p{k}.png", b, "image/png")) for k, b in enumerate(_photos(i + 1))]
                give_up = time.monotonic() + args.timeout
                while time.monotonic() < give_up:   # 429 (queue full), 5xx, timeouts: retry, same key
                    try:
                        r = http.post(f"{urls[(i + submit_retries) % 2]}/v1/subjects", files=files,
                                      data={"name": f"product-{i}", "steps": str(steps)},
                                      headers={"Idempotency-Key": f"product-{i}"})
                        if r.status_code == 202:
                            submitted.append(r.json()["id"])
                            break
                    except httpx.HTTPError:
                        pass
                    submit_retries += 1
                    time.sleep(1.0)
                time.sleep(1.0)
            states, end = {}, time.monotonic() + args.timeout
            while time.monotonic() < end:   # poll through the serve processes, as a client would
                for n, job_id in enumerate(submitted):
                    if states.get(job_id) in ("done", "failed", "cancelled"):
                        continue
                    try:
                        states[job_id] = http.get(f"{urls[n % 2]}/v1/jobs/{job_id}").json()["state"]
                    except (httpx.HTTPError, KeyError, ValueError):
                        pass
                if all(states.get(j) in ("done", "failed", "cancelled") for j in submitted) and \
                        time.monotonic() - started - startup_s >= seconds:
                    break
                time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(120)
        versions = {r.name: r.version for r in view.list(limit=None)}
    finally:
        procs.kill_all()
    done = sum(s == "done" for s in states.values())
    failed = sum(s == "failed" for s in states.values())
    lost = jobs_n - done - failed   # never accepted, or accepted and never ended
    ms = np.array(lat) * 1000 if lat else np.array([float("nan")])
    summary = {"bench": "serve_cluster", "date": time.strftime("%Y-%m-%d", time.gmtime()), "quick": args.quick,
               "registry": url.split(":")[0], "blobs": blobs.split("://")[0] if "://" in blobs else "dir",
               "serve_processes": 2, "workers": 1, "worker_kills": killed[0], "train_steps": steps,
               "jobs_submitted": jobs_n, "jobs_accepted": len(submitted), "submit_retries": submit_retries,
               "jobs_done": done, "jobs_failed": failed,
               "jobs_lost": lost, "extra_versions": sum(v - 1 for v in versions.values()),
               "placements_ok": place_ok[0], "placements_failed": place_failed[0],
               "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
               "startup_s": round(startup_s, 1), "wall_s": round(time.monotonic() - started, 1)}
    print(f"{done}/{jobs_n} jobs done ({failed} failed, {lost} lost) with {killed[0]} worker kill; "
          f"{place_ok[0]} placements ok, {place_failed[0]} failed, p50 {summary['p50_ms']} ms, "
          f"p99 {summary['p99_ms']} ms")
    registry.close()
    finish(summary, {"jobs_lost": "== 0", "jobs_failed": "== 0", "placements_failed": "== 0",
                     "extra_versions": "== 0"})  # goals, goal_met, the JSON line (last)
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
