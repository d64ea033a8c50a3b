"""The durable job queue (adapters_store.jobs) and idempotent replies, on SQLite and, when
SUBJECTPAINT_TEST_PG_URL is set, on a real Postgres: claim order, one claimant per job under concurrency
(threads on one engine and separate engines), leases, heartbeats, retries, attempts, release, cancel,
idempotency keys, and the blobs a job holds (kept by gc while active, removed when it ends)."""
from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from adapters_store import Registry
from adapters_store.jobs import IdempotencyMismatch, JobQueue, QueueFull
from adapters_store.replies import Replies


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBJECTPAINT_HOME", str(tmp_path / "home"))


def _pg_url():
    base = os.environ.get("SUBJECTPAINT_TEST_PG_URL")
    if not base:
        pytest.skip("SUBJECTPAINT_TEST_PG_URL is not set")
    schema = f"sp_jobs_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False), admin, schema


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/registry.db"
        return
    url, admin, schema = _pg_url()
    try:
        yield url
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def reg(url, tmp_path):
    with Registry(url, tmp_path / "blobs") as reg:
        reg.create_tenant("acme")
        reg.create_tenant("globex")
        yield reg


def blob_count(reg) -> int:
    return sum(1 for _ in reg.blobs.blobs())


def test_submit_get_is_tenant_scoped_and_photos_are_blobs(reg):
    q = JobQueue(reg)
    job, created = q.submit("acme", "mug", [b"photo-1", b"photo-2"], steps=5, recipe={"rank": 4})
    assert created and job.state == "queued" and job.steps == 5 and job.attempts == 0
    assert q.get("acme", job.id) == job
    assert q.get("globex", job.id) is None and q.get("acme", "nope") is None
    assert [q.read_blob(s) for s in job.photos] == [b"photo-1", b"photo-2"]
    assert q.pending("acme", "mug") and not q.pending("globex", "mug")
    assert q.counts()["queued"] == 1
    public = job.public()
    assert "tenant" not in public and "photos" not in public and public["progress"] == 0.0


def test_claim_oldest_first_then_none(reg):
    q = JobQueue(reg)
    ids = [q.submit("acme", f"s{i}", [b"x"], steps=3)[0].id for i in range(3)]
    got = [q.claim(f"w{i}", 30).id for i in range(3)]
    assert got == ids
    assert q.claim("w9", 30) is None
    job = q.get("acme", ids[0])
    assert job.state == "running" and job.attempts == 1 and job.lease_owner == "w0"


def test_concurrent_claims_take_each_job_once(reg, url, tmp_path):
    q = JobQueue(reg)
    for i in range(12):
        q.submit("acme", f"s{i}", [b"x"], steps=1)
    other = Registry(url, tmp_path / "blobs")   # a second engine, as another process would have
    claimed, lock = [], threading.Lock()

    def worker(queue, owner):
        while (job := queue.claim(owner, 60)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(queue, f"w{i}"))
               for i, queue in enumerate([q, q, JobQueue(other), JobQueue(other)])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert len(claimed) == len(set(claimed)) == 12


def test_expired_lease_is_claimed_again_and_the_old_owner_is_fenced(reg):
    q = JobQueue(reg)
    job, _ = q.submit("acme", "mug", [b"x"], steps=4)
    assert q.claim("a", 0.05).id == job.id
    assert q.heartbeat(job.id, "a", 0.05, step=2)
    assert q.claim("b", 30) is None            # lease still held
    time.sleep(0.1)
    again = q.claim("b", 30)
    assert again.id == job.id and again.attempts == 2 and again.lease_owner == "b" and again.step == 2
    assert not q.heartbeat(job.id, "a", 30)     # the dead worker, back: changes nothing
    assert not q.complete(job.id, "a", "mug@1")
    assert q.complete(job.id, "b", "mug@1", steps=4)
    done = q.get("acme", job.id)
    assert done.state == "done" and done.ref == "mug@1" and done.step == 4 and done.lease_owner is None


def test_attempts_run_out_with_the_last_error(reg):
    q = JobQueue(reg, max_attempts=2)
    job, _ = q.submit("acme", "mug", [b"x"], steps=1)
    q.claim("a", 30)
    assert q.fail(job.id, "a", "RuntimeError: out of memory", retry=True) == "queued"
    q.claim("b", 0.01)                          # second attempt; its worker dies
    time.sleep(0.05)
    assert q.claim("c", 30) is None             # out of attempts: failed, not claimed
    failed = q.get("acme", job.id)
    assert failed.state == "failed" and failed.error.startswith("RuntimeError: out of memory")
    assert "stopped heartbeating" in failed.error and failed.photos == ()


def test_release_requeues_without_counting_the_attempt(reg):
    q = JobQueue(reg)
    job, _ = q.submit("acme", "mug", [b"x"], steps=1)
    q.claim("a", 30)
    assert q.save_checkpoint(job.id, "a", b"ckpt-at-1", step=1)
    assert q.release(job.id, "a")
    back = q.get("acme", job.id)
    assert back.state == "queued" and back.attempts == 0 and back.step == 1
    assert q.read_blob(back.checkpoint) == b"ckpt-at-1"
    assert q.claim("b", 30).checkpoint == back.checkpoint


def test_checkpoints_replace_each_other_and_blobs_go_when_the_job_ends(reg):
    q = JobQueue(reg)
    job, _ = q.submit("acme", "mug", [b"p1", b"p2"], steps=2)
    q.claim("a", 30)
    q.save_checkpoint(job.id, "a", b"ckpt-1")
    q.save_checkpoint(job.id, "a", b"ckpt-2")
    assert blob_count(reg) == 3                 # two photos + the latest checkpoint
    assert reg.gc(grace_seconds=0).removed_blobs == 0   # an active job's blobs are kept
    assert q.fail(job.id, "a", "InvalidImage: photo 0: no product found") == "failed"
    assert blob_count(reg) == 0


def test_cancel(reg):
    q = JobQueue(reg)
    queued, _ = q.submit("acme", "a", [b"p1"], steps=1)
    running, _ = q.submit("acme", "b", [b"p2"], steps=1)
    assert q.cancel("globex", queued.id) is None
    assert q.cancel("acme", queued.id).state == "cancelled"
    assert q.claim("w", 30).id == running.id    # the cancelled one is never claimed
    assert q.cancel("acme", running.id).state == "cancelled"
    assert not q.heartbeat(running.id, "w", 30)  # its worker stops at the next heartbeat
    q.discard(running.id)
    assert blob_count(reg) == 0
    q.complete(running.id, "w", "b@1")
    assert q.get("acme", running.id).state == "cancelled"


def test_idempotency_key_returns_the_first_job(reg):
    q = JobQueue(reg)
    first, created = q.submit("acme", "mug", [b"x"], steps=2, idempotency_key="k1", request_hash="h")
    again, created_again = q.submit("acme", "mug", [b"x"], steps=2, idempotency_key="k1", request_hash="h")
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyMismatch):
        q.submit("acme", "mug", [b"y"], steps=2, idempotency_key="k1", request_hash="other")
    theirs, created = q.submit("globex", "mug", [b"x"], steps=2, idempotency_key="k1", request_hash="h")
    assert created and theirs.id != first.id    # keys are per tenant


def test_concurrent_idempotent_submits_make_one_job(reg, url, tmp_path):
    others = [Registry(url, tmp_path / "blobs") for _ in range(3)]
    queues = [JobQueue(reg)] + [JobQueue(r) for r in others]
    out, start = [], threading.Barrier(len(queues))

    def submit(q):
        start.wait()
        out.append(q.submit("acme", "mug", [b"x"], steps=2, idempotency_key="same", request_hash="h"))

    threads = [threading.Thread(target=submit, args=(q,)) for q in queues]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in others:
        r.close()
    assert len(out) == 4 and len({job.id for job, _ in out}) == 1
    assert sum(created for _, created in out) == 1
    assert JobQueue(reg).counts()["queued"] == 1


def test_queue_full(reg):
    q = JobQueue(reg)
    q.submit("acme", "a", [b"x"], steps=1, max_active=1)
    with pytest.raises(QueueFull):
        q.submit("globex", "b", [b"x"], steps=1, max_active=1)


def test_submit_admission_sees_the_tenants_own_jobs_and_a_refusal_adds_none(reg):
    from subjectpaint.errors import QuotaExceeded
    from subjectpaint.serve import ServeConfig

    q, seen = JobQueue(reg), []
    config = ServeConfig(max_jobs=3, max_jobs_per_tenant=2)

    def admit(tenant):
        def check(mine, total):
            seen.append((tenant, dict(mine), total))
            config.check_job_quota(tenant, mine, total)
        return check

    first, _ = q.submit("acme", "a", [b"x"], steps=1, admit=admit("acme"))
    assert q.claim("w", 30).id == first.id   # running
    q.submit("acme", "b", [b"x"], steps=1, admit=admit("acme"))
    with pytest.raises(QuotaExceeded, match="acme"):   # acme at its own limit (1 running + 1 queued)...
        q.submit("acme", "c", [b"x"], steps=1, admit=admit("acme"))
    q.submit("globex", "d", [b"x"], steps=1, admit=admit("globex"))   # ...globex is not
    with pytest.raises(QuotaExceeded, match="capacity"):   # the server is full: 3 active of 3
        q.submit("globex", "e", [b"x"], steps=1, admit=admit("globex"))
    assert seen == [("acme", {"queued": 0, "running": 0}, 0), ("acme", {"queued": 0, "running": 1}, 1),
                    ("acme", {"queued": 1, "running": 1}, 2), ("globex", {"queued": 0, "running": 0}, 2),
                    ("globex", {"queued": 1, "running": 0}, 3)]
    assert q.counts()["queued"] + q.counts()["running"] == 3 and not q.pending("acme", "c")


def test_replies_first_answer_wins(reg):
    replies = Replies(reg)
    assert replies.get("acme", "k", "h") is None
    first = replies.put("acme", "k", "h", 200, "image/png", b"png-1", {"X-Subject": "mug@1"})
    second = replies.put("acme", "k", "h", 200, "image/png", b"png-2")
    assert second == first and replies.get("acme", "k", "h").body == b"png-1"
    assert replies.get("globex", "k", "h") is None
    with pytest.raises(IdempotencyMismatch):
        replies.get("acme", "k", "other")


# -- the training worker (subjectpaint.serve.jobs) on the tiny base, SQLite ------------------------------------

def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def product_pngs():
    from subjectpaint.demo.scenes import HELDOUT_PRODUCT_SEEDS, Product, product_photos

    return [_png(p.image.resize((32, 32))) for p in product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[0]), 2)]


@pytest.fixture
def worker_env(tmp_path, tiny_base):
    from subjectpaint.serve import ServeConfig

    reg = Registry(f"sqlite:///{tmp_path}/registry.db", tmp_path / "blobs")
    reg.create_tenant("acme")
    config = ServeConfig(base="tiny", train_batch_size=2, checkpoint_every=2, lease_seconds=5, poll_seconds=0.05)
    yield reg, config, tiny_base
    reg.close()


def _worker(env, **kw):
    from subjectpaint.serve.jobs import TrainingWorker

    reg, config, base = env
    return TrainingWorker(config, registry=reg, base=base, **kw)


@pytest.mark.slow
def test_worker_trains_and_fails_bad_input_with_the_typed_message_then_goes_on(worker_env, product_pngs):
    import PIL.Image

    reg = worker_env[0]
    q = JobQueue(reg)
    blank = _png(PIL.Image.new("RGB", (32, 32), (200, 200, 200)))
    no_product, _ = q.submit("acme", "blank", [blank], steps=3)
    out_of_range, _ = q.submit("acme", "wild", product_pngs, steps=3, recipe={"strength": 5.0})
    unknown, _ = q.submit("acme", "odd", product_pngs, steps=3, recipe={"colour": "blue"})
    good, _ = q.submit("acme", "mug", product_pngs, steps=3)
    worker = _worker(worker_env)
    ended = [worker.run_one() for _ in range(4)]
    assert [j.state for j in ended] == ["failed", "failed", "failed", "done"]
    assert ended[0].error.startswith("InvalidImage: photo 0: no product found")
    assert ended[1].error == "InvalidArgument: strength must be a number in (0, 2], got 5.0"
    assert ended[2].error.startswith("InvalidArgument:") and "colour" in ended[2].error
    assert ended[3].ref == "mug@1" and ended[3].step == 3 and ended[3].attempts == 1
    assert worker.run_one() is None
    assert {b.sha256 for b in reg.blobs.blobs()} == {reg.for_tenant("acme").get("mug").sha256}  # photos, ckpts gone


@pytest.mark.slow
def test_stopped_worker_checkpoints_and_gives_back_then_another_resumes(worker_env, product_pngs):
    reg = worker_env[0]
    q = JobQueue(reg)
    job, _ = q.submit("acme", "mug", product_pngs, steps=8)
    first = _worker(worker_env)
    runner = threading.Thread(target=first.run_one)
    runner.start()
    deadline = time.time() + 120
    while q.get("acme", job.id).checkpoint is None and time.time() < deadline:
        time.sleep(0.05)
    first.stop()   # what SIGTERM does in `subjectpaint worker`
    runner.join()
    back = q.get("acme", job.id)
    assert back.state == "queued" and back.attempts == 0 and 2 <= back.step < 8 and back.checkpoint
    second = _worker(worker_env)
    done = second.run_one()
    assert done.state == "done" and done.ref == "mug@1"
    assert second.started_at_step == back.step   # resumed from the checkpoint, not from step 0
    assert [r.ref for r in reg.for_tenant("acme").list()] == ["mug@1"]


def test_a_retry_after_registering_adopts_the_version_instead_of_training_again(worker_env, product_pngs):
    reg = worker_env[0]
    q = JobQueue(reg)
    job, _ = q.submit("acme", "mug", product_pngs, steps=3)
    q.claim("dead-worker", 0.01)
    g = __import__("torch").Generator().manual_seed(0)
    tensors = {"unet.mid.attn1.to_q.lora_A.weight": __import__("torch").randn(4, 32, generator=g),
               "unet.mid.attn1.to_q.lora_B.weight": __import__("torch").randn(32, 4, generator=g)}
    reg.for_tenant("acme").register("mug", tensors)   # it registered, then died before marking the job done
    time.sleep(0.05)
    done = _worker(worker_env).run_one()
    assert done.state == "done" and done.ref == "mug@1" and done.attempts == 2
    assert [r.ref for r in reg.for_tenant("acme").list()] == ["mug@1"]


@pytest.mark.slow
def test_sigterm_to_a_worker_process_checkpoints_and_gives_the_job_back(tmp_path, product_pngs):
    import signal
    import subprocess
    import sys

    url, blobs = f"sqlite:///{tmp_path}/registry.db", str(tmp_path / "blobs")
    with Registry(url, blobs) as reg:
        reg.create_tenant("acme")
        q = JobQueue(reg)
        job, _ = q.submit("acme", "mug", product_pngs, steps=200)
        env = {**os.environ, "SUBJECTPAINT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "subjectpaint.cli", "worker", "-q", "--base", "tiny",
                                 "--registry", url, "--blobs", blobs, "--checkpoint-every", "2", "--batch-size", "2",
                                 "--threads", "1", "--poll", "0.1"], env=env, start_new_session=True)
        try:
            deadline = time.time() + 180
            while q.get("acme", job.id).checkpoint is None:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(120) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        back = q.get("acme", job.id)
        assert back.state == "queued" and back.attempts == 0 and back.lease_owner is None
        assert 2 <= back.step < 200 and back.checkpoint and q.read_blob(back.checkpoint)
