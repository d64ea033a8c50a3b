"""End to end with real processes: two `subjectpaint serve --no-worker` and two `subjectpaint worker` on one registry
and one blob store (Postgres and S3 when SUBJECTPAINT_TEST_PG_URL / SUBJECTPAINT_TEST_S3_URL are set, as in CI;
else SQLite and a directory). Registers through A, polls through B, places through B; kills -9 the worker
training the job (the other finishes it, one version, no orphan blobs after gc); idempotent and concurrent
retries; tenant isolation across processes; then every process is restarted and a queued job survives and runs."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

pytest.importorskip("litserve")
import httpx  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from adapters_store import Registry  # noqa: E402
from adapters_store.jobs import JobQueue  # noqa: E402
from subjectpaint.serve.local import wait_healthy  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 24


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def store(tmp_path):
    """(registry URL, blob URL): Postgres + S3 when the CI servers are there, SQLite + a directory otherwise."""
    pg, s3 = os.environ.get("SUBJECTPAINT_TEST_PG_URL"), os.environ.get("SUBJECTPAINT_TEST_S3_URL")
    url, admin, schema = f"sqlite:///{tmp_path}/registry.db", None, None
    if pg:
        schema = f"sp_cluster_{uuid.uuid4().hex[:12]}"
        admin = create_engine(pg)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(pg).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(False)
    blobs = str(tmp_path / "blobs")
    if s3:
        import fsspec

        fs, bucket = fsspec.core.url_to_fs(s3)
        bucket = bucket.split("/")[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        blobs = f"s3://{bucket}/{uuid.uuid4().hex}"
    yield url, blobs
    if admin is not None:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


class Cluster:
    def __init__(self, url, blobs, tmp_path):
        self.url, self.blobs = url, blobs
        self.env = {**os.environ, "SUBJECTPAINT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, *args) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "subjectpaint.cli", *args, "--base", "tiny", "--registry", self.url,
               "--blobs", self.blobs]
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def worker(self) -> subprocess.Popen:
        return self._spawn("worker", "-q", "--lease", "3", "--poll", "0.2", "--checkpoint-every", "2",
                           "--batch-size", "2", "--threads", "1")

    def serve(self) -> str:
        port = _port()
        proc = self._spawn("serve", "--no-worker", "--port", str(port), "--train-steps", str(STEPS), "--steps", "2",
                           "--max-batch-size", "1")
        return proc, f"http://127.0.0.1:{port}"

    def kill_all(self) -> None:
        """kill -9 every process group (serve processes keep nothing; workers' jobs come back by their leases)."""
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        self.procs.clear()


@pytest.fixture
def cluster(store, tmp_path):
    c = Cluster(*store, tmp_path)
    yield c
    c.kill_all()


def _register(base_url, key, name, photos, idem=None, steps=STEPS):
    files = [("photos", (f"p{i}.png", p, "image/png")) for i, p in enumerate(photos)]
    headers = {"X-API-Key": key, **({"Idempotency-Key": idem} if idem else {})}
    return httpx.post(f"{base_url}/v1/subjects", data={"name": name, "steps": str(steps)}, files=files,
                      headers=headers, timeout=60)


def _wait(base_url, key, job_id, until=("done", "failed", "cancelled"), timeout=240, check=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = httpx.get(f"{base_url}/v1/jobs/{job_id}", headers={"X-API-Key": key}, timeout=30).json()
        if job["state"] in until or (check is not None and check(job)):
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} still {job}")


def test_two_serves_two_workers_kill_idempotency_isolation_restart(cluster, tmp_path):
    from subjectpaint.demo.scenes import EVAL_SEEDS, HELDOUT_PRODUCT_SEEDS, Product, make_scene, product_photos

    reg = Registry(cluster.url, cluster.blobs)
    keys = {}
    for tenant in ("acme", "globex"):
        reg.create_tenant(tenant)
        keys[tenant] = reg.issue_key(tenant)
    acme, globex = keys["acme"], keys["globex"]
    photos = [_png(p.image.resize((32, 32))) for p in product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[0]), 2)]
    workers = [cluster.worker(), cluster.worker()]
    (proc_a, a), (proc_b, b) = cluster.serve(), cluster.serve()
    wait_healthy(a, 180, proc_a)
    wait_healthy(b, 180, proc_b)

    # 1. register through A, the same request four times at once through A and B: one job
    answers, lock = [], threading.Lock()

    def post(url):
        r = _register(url, acme, "mug", photos, idem="mug-1")
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=post, args=(u,)) for u in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 202 for r in answers), [r.text for r in answers]
    job_id = answers[0].json()["id"]
    assert {r.json()["id"] for r in answers} == {job_id}

    # 2. kill -9 the worker that trains it, once it has a checkpoint in the blob store
    queue = JobQueue(reg)
    end = time.monotonic() + 180
    while (job := queue.get("acme", job_id)).checkpoint is None:
        assert time.monotonic() < end and job.state in ("queued", "running"), job
        time.sleep(0.1)
    victim = int(job.lease_owner.split(":")[1])
    assert victim in {w.pid for w in workers}
    os.kill(victim, signal.SIGKILL)

    # 3. poll through B: the other worker finishes it; a retry after it ended still gets the same job
    done = _wait(b, acme, job_id)
    assert done["state"] == "done" and done["ref"] == "mug@1" and done["attempts"] == 2, done
    assert _register(a, acme, "mug", photos, idem="mug-1").json()["id"] == job_id
    assert [r.ref for r in reg.for_tenant("acme").list()] == ["mug@1"]
    reg.gc(grace_seconds=0)
    assert {x.sha256 for x in reg.blobs.blobs()} == {reg.for_tenant("acme").get("mug").sha256}

    # 4. place through B, twice with one Idempotency-Key: the same answer
    scene = make_scene(EVAL_SEEDS[0], 64)
    body = {"subject": "mug", "room": base64.b64encode(_png(scene.room)).decode(),
            "mask": base64.b64encode(_png(scene.mask)).decode(), "steps": 2}
    placed = [httpx.post(f"{b}/v1/place", json=body, headers={"X-API-Key": acme, "Idempotency-Key": "p-1"},
                         timeout=120) for _ in range(2)]
    assert [r.status_code for r in placed] == [200, 200] and placed[0].content == placed[1].content
    assert placed[0].headers["x-subject"] == "mug@1"

    # 5. tenant isolation across processes: globex sees neither acme's job nor its subject, on A and B
    for url in (a, b):
        h = {"X-API-Key": globex}
        assert httpx.get(f"{url}/v1/jobs/{job_id}", headers=h).status_code == 404
        assert httpx.delete(f"{url}/v1/jobs/{job_id}", headers=h).status_code == 404
        assert httpx.get(f"{url}/v1/subjects/mug", headers=h).status_code == 404
        assert httpx.post(f"{url}/v1/place", json=body, headers=h, timeout=60).status_code == 404

    # 6. restart every process: a job queued while the workers are down survives and runs
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)   # idle: it exits at once
            assert w.wait(60) == 0
    queued = _register(a, acme, "lamp", photos, steps=4).json()
    assert queued["state"] == "queued"
    dropped = _register(a, acme, "vase", photos, steps=4).json()   # cancelled through B before anyone trains it
    assert httpx.delete(f"{b}/v1/jobs/{dropped['id']}", headers={"X-API-Key": acme}).json()["state"] == "cancelled"
    cluster.kill_all()
    cluster.worker()
    proc_c, c = cluster.serve()
    wait_healthy(c, 180, proc_c)
    assert _wait(c, acme, queued["id"])["state"] == "done"
    assert httpx.get(f"{c}/v1/jobs/{dropped['id']}", headers={"X-API-Key": acme}).json()["state"] == "cancelled"
    assert [r.ref for r in reg.for_tenant("acme").list()] == ["lamp@1", "mug@1"]
    reg.close()
