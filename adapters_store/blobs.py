"""Content-addressed blob store: ``<root>/sha256/ab/<sha256>.safetensors``.

A blob's name is the sha256 of its bytes, so identical adapters are stored once. Writes are atomic:
temp file in ``<root>/tmp/``, fsync, rename into place, fsync the directory. A crash leaves at most a
temp file or an unreferenced blob, which :meth:`BlobStore.remove` (driven by ``Registry.gc``)
collects. ``root`` is a local directory or any fsspec URL (``memory://``, ``s3://``...); local
directories get real fsyncs, other filesystems the best their ``mv`` offers.
"""
from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import fsspec

SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_sha(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


@dataclass(frozen=True)
class StoredFile:
    """A blob or temp file as seen by ``gc``: its path, sha256 (None for temp files) and age."""
    path: str
    sha256: str | None
    mtime: float


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: str | os.PathLike):
        root = os.fspath(root)
        self.url = root
        # Object stores: no listing cache, so a blob another process wrote (or removed) is seen at once.
        options = {"use_listings_cache": False} if root.split("://", 1)[0] in ("s3", "s3a", "gs", "gcs") else {}
        self.fs, path = fsspec.core.url_to_fs(os.path.expanduser(root), **options)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                                else (self.fs.protocol,))
        self.root = os.path.abspath(path) if self.local else path.rstrip("/")
        self._blob_dir = self._join(self.root, "sha256")
        self._tmp_dir = self._join(self.root, "tmp")
        if self.local:
            os.makedirs(self._blob_dir, exist_ok=True)
            os.makedirs(self._tmp_dir, exist_ok=True)

    def __repr__(self) -> str:
        return f"BlobStore({self.url!r})"

    def _join(self, *parts: str) -> str:
        return os.path.join(*parts) if self.local else "/".join(parts)

    def path(self, sha256: str) -> str:
        if not _is_sha(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self._join(self._blob_dir, sha256[:2], sha256 + SUFFIX)

    # -- read ------------------------------------------------------------------------------
    def read(self, sha256: str) -> bytes:
        """The stored bytes (not verified here). Raises ``FileNotFoundError`` if absent."""
        path = self.path(sha256)
        if self.local:
            with open(path, "rb") as f:
                return f.read()
        try:
            return self.fs.cat_file(path)
        except (FileNotFoundError, KeyError):
            raise FileNotFoundError(path) from None

    def exists(self, sha256: str) -> bool:
        return os.path.exists(self.path(sha256)) if self.local else self.fs.exists(self.path(sha256))

    def verified(self, sha256: str) -> bool:
        """True if the blob exists and its bytes hash to its name."""
        try:
            return sha256_hex(self.read(sha256)) == sha256
        except FileNotFoundError:
            return False

    # -- write -----------------------------------------------------------------------------
    def put(self, data: bytes) -> str:
        """Store ``data`` under its sha256 and return it. An existing good copy is reused (and its
        mtime refreshed so a concurrent ``gc`` grace period protects it); a bad copy is replaced."""
        sha = sha256_hex(data)
        final = self.path(sha)
        if self.verified(sha):
            if not self._touch(final) and not self.local:
                self.fs.pipe_file(final, data)  # no touch on S3: rewrite (one PUT, atomic) to refresh its age
            return sha
        tmp = self._join(self._tmp_dir, f"{uuid.uuid4().hex}{TMP_SUFFIX}")
        if self.local:
            self._put_local(data, tmp, final)
        else:
            self.fs.makedirs(self._tmp_dir, exist_ok=True)
            self.fs.pipe_file(tmp, data)
            self.fs.makedirs(self._join(self._blob_dir, sha[:2]), exist_ok=True)
            self.fs.mv(tmp, final)
        return sha

    def _put_local(self, data: bytes, tmp: str, final: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            shard = os.path.dirname(final)
            if not os.path.isdir(shard):
                os.makedirs(shard, exist_ok=True)
                _fsync_dir(self._blob_dir)
            os.replace(tmp, final)
            _fsync_dir(shard)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def _touch(self, path: str) -> bool:
        """Refresh the file's mtime (so a concurrent ``gc`` grace protects it); False if the filesystem can't."""
        if self.local:
            try:
                os.utime(path)
            except FileNotFoundError:
                pass
            return True
        try:
            self.fs.touch(path, truncate=False)
            return True
        except (NotImplementedError, TypeError, ValueError, AttributeError):
            return False

    # -- listing and removal (for gc) ------------------------------------------------------
    def _mtime(self, info: dict) -> float:
        for key in ("mtime", "created", "LastModified", "last_modified"):
            value = info.get(key)
            if isinstance(value, (int, float)):
                return float(value)
            if hasattr(value, "timestamp"):
                return float(value.timestamp())
        return time.time()  # unknown age: treat as new, so a grace period protects it

    def _walk(self, top: str) -> Iterator[tuple[str, float]]:
        if self.local:
            for dirpath, _dirs, files in os.walk(top):
                for name in files:
                    path = os.path.join(dirpath, name)
                    try:
                        yield path, os.stat(path).st_mtime
                    except FileNotFoundError:
                        continue
        elif self.fs.exists(top):
            for path, info in self.fs.find(top, detail=True).items():
                yield path, self._mtime(info)

    def blobs(self) -> Iterator[StoredFile]:
        """Every stored blob (files whose name is not a sha256 are reported as temp files)."""
        for path, mtime in self._walk(self._blob_dir):
            name = path.rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1]
            sha = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else ""
            yield StoredFile(path, sha if _is_sha(sha) else None, mtime)

    def temp_files(self) -> Iterator[StoredFile]:
        for path, mtime in self._walk(self._tmp_dir):
            yield StoredFile(path, None, mtime)

    def remove(self, item: StoredFile) -> None:
        try:
            if self.local:
                os.unlink(item.path)
            else:
                self.fs.rm_file(item.path)
        except FileNotFoundError:
            pass
