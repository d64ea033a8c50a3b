"""Real concurrency and crash safety: many processes registering at once (SQLite and Postgres), and
registering processes killed with SIGKILL at random points."""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
import uuid
from collections import defaultdict

import pytest
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from adapters_store import Registry

PROCS, PER_PROC, SHARED = 8, 50, 3
# forkserver, not fork: a child forked from a process whose OpenMP pool already ran (any earlier
# torch op in the pytest process) hangs in its first parallel op. The server preloads the imports,
# so starting a worker stays cheap.
CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(["torch", "adapters_store", __name__])


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBJECTPAINT_HOME", str(tmp_path / "home"))


@pytest.fixture
def pg_url():
    base = os.environ.get("SUBJECTPAINT_TEST_PG_URL")
    if not base:
        pytest.skip("SUBJECTPAINT_TEST_PG_URL is not set")
    schema = f"sp_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def adapter(seed: int, rows: int = 4, cols: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"unet.mid.attn1.to_q.lora_A.weight": torch.randn(rows, cols, generator=g),
            "unet.mid.attn1.to_q.lora_B.weight": torch.randn(cols, rows, generator=g)}


def _register_many(url, blobs, worker, start, out):
    start.wait()
    reg = Registry(url, blobs, cache_bytes=0)      # every process opens (and migrates) at once
    done, errors = [], []
    for i in range(PER_PROC):
        name = f"shared-{i % SHARED}" if i % 2 == 0 else f"w{worker}-item-{i}"
        seed = worker * 1000 + i if i % 5 else i    # every 5th adapter is the same in all workers
        try:
            rec = reg.register(name, adapter(seed), {"seed": seed})
            done.append((rec.name, rec.version, rec.sha256, seed))
        except Exception as exc:  # noqa: BLE001 - the test counts anything surfacing to callers
            errors.append(repr(exc))
    out.put((worker, done, errors, reg.retries))
    reg.close()


def run_concurrent(url: str, blobs: str):
    start, out = CTX.Event(), CTX.Queue()
    procs = [CTX.Process(target=_register_many, args=(url, blobs, w, start, out))
             for w in range(PROCS)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    done = [d for _, ds, _, _ in results for d in ds]
    errors = [e for _, _, es, _ in results for e in es]
    retries = sum(r for *_, r in results)
    assert errors == [], errors[:3]
    assert len(done) == PROCS * PER_PROC

    with Registry(url, blobs) as reg:
        records = []
        after = None
        while page := reg.list(limit=150, after=after):
            records += page
            after = page[-1].ref
        assert len(records) == PROCS * PER_PROC
        versions = defaultdict(list)
        for r in records:
            versions[r.name].append(r.version)
        for name, vs in versions.items():                 # unique and gap-free per subject
            assert vs == list(range(1, len(vs) + 1)), name
        assert all(len(versions[f"shared-{k}"]) > PER_PROC for k in range(SHARED))
        by_ref = {r.ref: r for r in records}              # what callers got is what is stored
        for name, version, sha, seed in done:
            assert by_ref[f"{name}@{version}"].sha256 == sha
        sample = random.Random(0).sample(done, 40)
        for name, version, sha, seed in sample:
            got = reg.load(f"{name}@{version}")
            assert all(torch.equal(got[k], v) for k, v in adapter(seed).items())
        assert reg.verify() == []
        distinct = {sha for _, _, sha, _ in done}
        assert len(list(reg.blobs.blobs())) == len(distinct) < len(done)   # shared seeds deduped
    print(f"\n{url.split(':')[0]}: {len(done)} registrations by {PROCS} processes, "
          f"{retries} transaction retries, 0 errors")


def test_concurrent_registration_sqlite(tmp_path):
    run_concurrent(f"sqlite:///{tmp_path}/race.db", str(tmp_path / "blobs"))


@pytest.mark.postgres
def test_concurrent_registration_postgres(tmp_path, pg_url):
    run_concurrent(pg_url, str(tmp_path / "blobs"))


# -- crash safety ----------------------------------------------------------------------------------
def _register_until_killed(url, blobs, seed, ready):
    reg = Registry(url, blobs, cache_bytes=0)
    ready.set()
    i = 0
    while True:  # 1 MiB adapters, so kills land inside blob writes and between blob and row
        reg.register(f"crash-{i % 3}", adapter(seed * 100_000 + i, rows=8, cols=16384))
        i += 1


@pytest.mark.slow
def test_sigkill_at_random_points_never_corrupts(tmp_path):
    url, blobs = f"sqlite:///{tmp_path}/crash.db", str(tmp_path / "blobs")
    Registry(url, blobs).close()
    rng = random.Random(1234)
    trial, orphans_seen, temps_seen, rows_before = 0, 0, 0, 0
    # >= 24 trials; more (up to 80) until a kill has landed between a blob write and its row, so
    # the gc assertions below are never vacuous
    while trial < 24 or (orphans_seen + temps_seen == 0 and trial < 80):
        trial += 1
        ready = CTX.Event()
        proc = CTX.Process(target=_register_until_killed, args=(url, blobs, trial, ready))
        proc.start()
        assert ready.wait(60)
        time.sleep(rng.uniform(0.0, 0.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL

        with Registry(url, blobs, cache_bytes=0) as reg:   # the database opens after the kill
            records = reg._all()
            assert len(records) >= rows_before
            rows_before = len(records)
            for rec in records:                           # no row points at a missing/partial blob
                reg.load(rec)
            versions = defaultdict(list)
            for rec in records:
                versions[rec.name].append(rec.version)
            assert all(v == list(range(1, len(v) + 1)) for v in versions.values())
            referenced = {r.sha256 for r in records}
            orphans = sum(b.sha256 not in referenced for b in reg.blobs.blobs())
            temps = len(list(reg.blobs.temp_files()))
            orphans_seen, temps_seen = orphans, temps

    with Registry(url, blobs) as reg:
        retry = reg.register("crash-0", adapter(999, rows=8, cols=16384))   # a retry succeeds
        assert reg.get("crash-0") == retry
        report = reg.gc(grace_seconds=0)
        referenced = {r.sha256 for r in reg._all()}
        assert {b.sha256 for b in reg.blobs.blobs()} == referenced   # gc removed every orphan
        assert list(reg.blobs.temp_files()) == []
        assert reg.verify() == []
        assert orphans_seen + temps_seen > 0
        assert (report.removed_blobs, report.removed_temp) == (orphans_seen, temps_seen)
        print(f"\n{trial} SIGKILL trials: {len(referenced)} adapters intact, "
              f"gc removed {report.removed_blobs} orphan blobs + {report.removed_temp} temp files")
