"""The blob store behaves the same on a directory and on S3 (through s3fs, against the S3-compatible server
`.ci/s3.sh` starts on loopback; skipped without SUBJECTPAINT_TEST_S3_URL): atomic content-addressed writes,
sha256 verification on read, gc, and two stores (as two processes have) seeing each other's writes at once."""
from __future__ import annotations

import os
import uuid

import pytest
import torch

from adapters_store import AdapterCorrupt, BlobStore, Registry


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBJECTPAINT_HOME", str(tmp_path / "home"))


def s3_root() -> str:
    base = os.environ.get("SUBJECTPAINT_TEST_S3_URL")
    if not base:
        pytest.skip("SUBJECTPAINT_TEST_S3_URL is not set (source .ci/s3.sh)")
    pytest.importorskip("s3fs")
    import fsspec

    fs, bucket = fsspec.core.url_to_fs(base)
    bucket = bucket.split("/")[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    return f"s3://{bucket}/{uuid.uuid4().hex}"


@pytest.fixture(params=["dir", "s3"])
def root(request, tmp_path):
    return str(tmp_path / "blobs") if request.param == "dir" else s3_root()


def fresh(root: str) -> BlobStore:
    """A store with its own filesystem instance: what another process would have."""
    store = BlobStore(root)
    if not store.local:
        store.fs = type(store.fs)(**{**store.fs.storage_options, "skip_instance_cache": True})
    return store


def adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"unet.mid.attn1.to_q.lora_A.weight": torch.randn(4, 32, generator=g),
            "unet.mid.attn1.to_q.lora_B.weight": torch.randn(32, 4, generator=g)}


def test_put_read_verify_dedupe(root):
    store = BlobStore(root)
    sha = store.put(b"adapter bytes")
    assert store.put(b"adapter bytes") == sha and store.read(sha) == b"adapter bytes" and store.verified(sha)
    assert [b.sha256 for b in store.blobs()] == [sha] and list(store.temp_files()) == []
    with pytest.raises(FileNotFoundError):
        store.read("0" * 64)


def test_another_process_sees_writes_and_removals_at_once(root):
    a, b = fresh(root), fresh(root)
    first = a.put(b"one")
    assert {x.sha256 for x in b.blobs()} == {first}      # b has listed the store now
    second = a.put(b"two")
    assert b.exists(second) and b.read(second) == b"two"  # not hidden by a cached listing
    for item in list(a.blobs()):
        a.remove(item)
    assert not b.exists(first) and list(b.blobs()) == []


def test_corrupt_blob_is_refused_and_replaced_on_put(root, tmp_path):
    with Registry(f"sqlite:///{tmp_path}/r.db", root) as reg:
        rec = reg.register("mug", adapter(0))
        path = reg.blobs.path(rec.sha256)
        data = reg.blobs.read(rec.sha256)
        bad = data[:-8] + b"\0" * 8
        if reg.blobs.local:
            with open(path, "wb") as f:
                f.write(bad)
        else:
            reg.blobs.fs.pipe_file(path, bad)
        assert not reg.blobs.verified(rec.sha256) and reg.verify() == ["mug@1"]
        with pytest.raises(AdapterCorrupt):
            reg.load(rec)
        assert reg.blobs.put(data) == rec.sha256 and reg.blobs.verified(rec.sha256)   # a good copy replaces it
        assert torch.equal(reg.load(rec)["unet.mid.attn1.to_q.lora_A.weight"],
                           adapter(0)["unet.mid.attn1.to_q.lora_A.weight"])


def test_gc_removes_unreferenced_and_temp_files_only(root, tmp_path):
    with Registry(f"sqlite:///{tmp_path}/r.db", root) as reg:
        kept = reg.register("mug", adapter(1))
        gone = reg.register("lamp", adapter(2))
        reg.delete("lamp")
        orphan = reg.blobs.put(b"written by a crashed register")
        tmp = reg.blobs._join(reg.blobs._tmp_dir, "dead.tmp")
        if reg.blobs.local:
            with open(tmp, "wb") as f:
                f.write(b"partial")
        else:
            reg.blobs.fs.pipe_file(tmp, b"partial")
        assert reg.gc(grace_seconds=3600).removed_blobs == 0     # young: protected by the grace period
        report = reg.gc(grace_seconds=0)
        assert (report.removed_blobs, report.removed_temp) == (2, 1)
        assert {b.sha256 for b in fresh(root).blobs()} == {kept.sha256}
        assert gone.sha256 != kept.sha256 and orphan not in {kept.sha256}
        assert reg.load("mug")   # still verifies
