"""`subjectpaint serve` as a real process: SIGTERM with 8 placements and a registration in flight answers every
request (2xx or 503), checkpoints the running registration and gives it back (queued again, resumable by any
worker), ends the whole process group and frees the port within a bound; a restart on the same port works at once
and takes the job up again from its checkpoint; a busy port is refused in one line."""

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

import pytest

pytest.importorskip("litserve")
import httpx  # noqa: E402

from adapters_store import Registry  # noqa: E402
from adapters_store.jobs import JobQueue  # noqa: E402
from subjectpaint import Studio, Subject  # noqa: E402
from subjectpaint.base import ExemplarInpainter  # noqa: E402
from subjectpaint.demo.scenes import EVAL_SEEDS, HELDOUT_PRODUCT_SEEDS, Product, make_scene, product_photos  # noqa: E402
from subjectpaint.serve.local import wait_healthy  # noqa: E402

pytestmark = pytest.mark.slow

STOP_BOUND_S = 45.0  # drain (10 s) + the job's next step + workers (5 s) + interpreter exit, on a loaded 2-core box


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    url, blobs = f"sqlite:///{tmp}/registry.db", str(tmp / "blobs")
    reg = Registry(url, blobs)
    for tenant in ("acme", "admin"):
        reg.create_tenant(tenant)
    keys = {t: reg.issue_key(t) for t in ("acme", "admin")}
    view = reg.for_tenant("acme")
    photos = [p.image.resize((32, 32)) for p in product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[1]), 2)]
    Subject.train(photos, "mug", Studio(ExemplarInpainter.tiny(0), registry=view), registry=view, steps=2,
                  batch_size=2, detector=None, progress=False)
    reg.close()
    scene = make_scene(EVAL_SEEDS[0], 32)
    return dict(url=url, blobs=blobs, keys=keys, photos=photos, scene=scene,
                env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


def start(env, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "subjectpaint.cli", "serve", "--base", "tiny", "--port", str(port), "--registry",
           env["url"], "--blobs", env["blobs"], "--train-steps", "100000", "--max-batch-size", "8", *extra]
    return subprocess.Popen(cmd, env=env["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def stop_group(proc: subprocess.Popen) -> None:
    if group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigterm_answers_everything_in_flight_and_frees_the_port(env):
    port = free_port()
    proc = start(env, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, 240, proc)
        acme, admin = {"X-API-Key": env["keys"]["acme"]}, {"X-API-Key": env["keys"]["admin"]}
        files = [("photos", (f"p{i}.png", png(p), "image/png")) for i, p in enumerate(env["photos"])]
        job = httpx.post(f"{base}/v1/subjects", data={"name": "cup", "steps": "100000"}, files=files, headers=acme,
                         timeout=30).json()
        for _ in range(600):
            job = httpx.get(f"{base}/v1/jobs/{job['id']}", headers=acme).json()
            if job["state"] == "running" and job["step"] > 0:
                break
            time.sleep(0.1)
        assert job["state"] == "running", job

        scene = env["scene"]
        body = {"subject": "mug", "room": base64.b64encode(png(scene.room)).decode(),
                "mask": base64.b64encode(png(scene.mask)).decode(), "steps": 100}
        answers: dict = {}

        def send(i):
            try:
                answers[i] = httpx.post(f"{base}/v1/place", json={**body, "seed": i}, headers=acme, timeout=120)
            except httpx.HTTPError as exc:  # no answer at all: the failure this test is about
                answers[i] = exc

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        [t.start() for t in threads]
        for _ in range(300):  # all 8 accepted and waiting on the worker
            if "subjectpaint_queue_depth 8" in httpx.get(f"{base}/metrics", headers=admin).text:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the 8 placements never were in flight together")

        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        [t.join(120) for t in threads]
        assert sorted(getattr(a, "status_code", repr(a)) in (200, 503) for a in answers.values()) == [True] * 8, \
            {i: getattr(a, "status_code", a) for i, a in answers.items()}
        assert proc.wait(STOP_BOUND_S) == 0
        while group_alive(proc.pid) and time.monotonic() - stopped < STOP_BOUND_S:
            time.sleep(0.1)
        assert not group_alive(proc.pid), "a worker or the manager outlived the server"
        assert port_is_free(port)
        err = proc.stderr.read()
        assert "Traceback" not in err and "terminate" not in err, err
        with Registry(env["url"], env["blobs"]) as reg:  # the job is resumable: queued, with its checkpoint
            stopped_job = JobQueue(reg).get("acme", job["id"])
        assert stopped_job.state == "queued" and stopped_job.error is None, stopped_job
        assert stopped_job.checkpoint is not None and stopped_job.step > 0 and stopped_job.attempts == 0, stopped_job

        again = start(env, port)  # at once, on the same port
        try:
            wait_healthy(base, 240, again)
            assert httpx.get(f"{base}/v1/subjects/mug", headers=acme).status_code == 200
            resumed = httpx.get(f"{base}/v1/jobs/{job['id']}", headers=acme).json()  # taken up again, not restarted
            assert resumed["state"] in ("queued", "running") and resumed["step"] >= stopped_job.step, resumed
            busy = subprocess.run([sys.executable, "-m", "subjectpaint.cli", "serve", "--base", "tiny", "--port",
                                   str(port)], env=env["env"], capture_output=True, text=True, timeout=120)
            assert busy.returncode == 1 and busy.stdout == ""
            assert busy.stderr.count("\n") == 1 and "already in use" in busy.stderr, busy.stderr
            again.send_signal(signal.SIGINT)  # Ctrl-C stops it the same way
            assert again.wait(STOP_BOUND_S) == 0
        finally:
            stop_group(again)
    finally:
        stop_group(proc)


def test_sigkill_of_the_server_leaves_no_child_holding_the_port(env):
    port = free_port()
    proc = start(env, port)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 240, proc)
        children = subprocess.run(["ps", "-o", "pid=", "-g", str(proc.pid)], capture_output=True, text=True)
        assert len(children.stdout.split()) >= 3  # the server, LitServe's queue manager, the inference worker
        proc.kill()  # the main process only, as an OOM killer would
        proc.wait()
        killed = time.monotonic()
        while group_alive(proc.pid) and time.monotonic() - killed < 20:
            time.sleep(0.1)
        assert not group_alive(proc.pid), "an orphaned worker outlived the killed server"
        assert port_is_free(port)
    finally:
        stop_group(proc)
