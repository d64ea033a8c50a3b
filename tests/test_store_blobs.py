"""Blob store: content addressing, atomic writes, fsspec URLs."""
from __future__ import annotations

import hashlib
import os
import uuid

import fsspec
import pytest

from adapters_store.blobs import BlobStore


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        yield BlobStore(tmp_path / "blobs")
    else:
        root = f"memory://blobs-{uuid.uuid4().hex}"
        yield BlobStore(root)
        fs = fsspec.filesystem("memory")
        if fs.exists(root.removeprefix("memory://")):
            fs.rm(root.removeprefix("memory://"), recursive=True)


def test_put_is_content_addressed_and_deduplicated(store):
    sha = store.put(b"adapter bytes")
    assert sha == hashlib.sha256(b"adapter bytes").hexdigest()
    assert store.put(b"adapter bytes") == sha
    assert [b.sha256 for b in store.blobs()] == [sha]
    assert store.read(sha) == b"adapter bytes" and store.verified(sha)
    assert list(store.temp_files()) == []                      # temp file renamed away
    other = store.put(b"other")
    assert {b.sha256 for b in store.blobs()} == {sha, other}


def test_missing_blob_and_bad_hash_names(store):
    missing = "0" * 64
    with pytest.raises(FileNotFoundError):
        store.read(missing)
    assert not store.exists(missing) and not store.verified(missing)
    for bad in ("../../etc/passwd", "ABC", "g" * 64):
        with pytest.raises(ValueError):
            store.path(bad)


def test_put_replaces_a_corrupt_copy(store):
    sha = store.put(b"good bytes")
    path = store.path(sha)
    if store.local:
        with open(path, "wb") as f:
            f.write(b"good byteZ")
    else:
        store.fs.pipe_file(path, b"good byteZ")
    assert not store.verified(sha)
    assert store.put(b"good bytes") == sha and store.verified(sha)


def test_local_layout_and_failed_write_leaves_no_temp(tmp_path, monkeypatch):
    store = BlobStore(str(tmp_path / "b"))
    sha = store.put(b"x" * 1000)
    assert store.path(sha) == str(tmp_path / "b" / "sha256" / sha[:2] / f"{sha}.safetensors")

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.put(b"y" * 1000)
    assert list(store.temp_files()) == []
    assert not store.exists(hashlib.sha256(b"y" * 1000).hexdigest())


def test_file_url_and_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert BlobStore("~/blobs").root == str(tmp_path / "blobs")
    url_store = BlobStore(f"file://{tmp_path}/viaurl")
    assert url_store.local and url_store.verified(url_store.put(b"abc"))
