"""Registry behaviour: register/get/load/list/delete/gc/export/import, names, dedupe, integrity."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from adapters_store import (AdapterCorrupt, AdapterNotFound, AdapterRecord, InvalidAdapter,
                            InvalidName, Registry, StoreError)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBJECTPAINT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SUBJECTPAINT_REGISTRY_URL", raising=False)
    monkeypatch.delenv("SUBJECTPAINT_BLOBS", raising=False)


def _pg_schema_url():
    """A fresh Postgres schema (dropped afterwards), or a skip if no server is configured."""
    base = os.environ.get("SUBJECTPAINT_TEST_PG_URL")
    if not base:
        pytest.skip("SUBJECTPAINT_TEST_PG_URL is not set")
    schema = f"sp_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})

    def drop():
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    return url.render_as_string(hide_password=False), drop


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def reg(request, tmp_path):
    """Tests that take ``reg`` run on SQLite and, when configured, on a real Postgres."""
    drop = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/reg.db"
    else:
        url, drop = _pg_schema_url()
    try:
        with Registry(url, tmp_path / "blobs") as r:
            yield r
    finally:
        if drop:
            drop()


@pytest.fixture
def sqlite_reg(tmp_path):
    with Registry(f"sqlite:///{tmp_path}/reg.db", tmp_path / "blobs") as r:
        yield r


def lora(seed: int, rank: int = 4, dim: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for mod in ("to_q", "to_k", "to_v", "to_out.0"):
        key = f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.{mod}"
        out[f"{key}.lora_A.weight"] = torch.randn(rank, dim, generator=g).half()
        out[f"{key}.lora_B.weight"] = torch.randn(dim, rank, generator=g).half()
    return out


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "sha256").rglob("*") if p.is_file())


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- register / get / load --------------------------------------------------------------------
def test_register_get_load_roundtrip(reg):
    t = lora(0)
    rec = reg.register("blue-mug", t, {"alpha": 8, "trainer_version": "0.1", "steps": [1, 2]},
                       "fp-base", training={"steps": 300}, metrics={"psnr": 31.5})
    assert isinstance(rec, AdapterRecord) and rec.ref == "blue-mug@1"
    assert (rec.rank, rec.alpha, rec.dtype, rec.base_fingerprint) == (4, 8.0, "float16", "fp-base")
    assert rec.target_modules == ("to_k", "to_out.0", "to_q", "to_v")
    assert rec.metadata["steps"] == [1, 2] and rec.training == {"steps": 300}
    assert rec.created.tzinfo is not None
    rec2 = reg.register("blue-mug", lora(1))
    assert rec2.version == 2
    assert reg.get("blue-mug") == rec2 and reg.get("blue-mug@latest") == rec2
    assert reg.get("blue-mug@1") == rec
    assert same(reg.load(rec), t) and same(reg.load("blue-mug@2"), lora(1))
    # metadata also lives in the blob's safetensors header, as strings
    with safe_open(str(reg.blobs.path(rec.sha256)), "pt") as f:
        meta = f.metadata()
    assert meta["alpha"] == "8" and meta["steps"] == "[1,2]" and meta["base_fingerprint"] == "fp-base"
    assert meta["rank"] == "4" and json.loads(meta["target_modules"]) == list(rec.target_modules)
    with pytest.raises(AdapterNotFound):
        reg.get("blue-mug@3")
    with pytest.raises(AdapterNotFound):
        reg.get("red-mug")


def test_record_is_frozen_and_load_returns_copies(sqlite_reg):
    rec = sqlite_reg.register("mug", lora(0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.version = 7
    a = sqlite_reg.load(rec)
    next(iter(a.values())).zero_()          # a caller scribbling on its copy...
    assert same(sqlite_reg.load(rec), lora(0))     # ...does not reach the cache
    assert sqlite_reg.cache.stats().hits >= 1


def test_register_from_file_reads_its_metadata(sqlite_reg, tmp_path):
    path = tmp_path / "a.safetensors"
    save_file(lora(3, rank=8), str(path), metadata={"alpha": "16", "base_fingerprint": "fpX",
                                                    "subject": "ignored", "created": "x"})
    rec = sqlite_reg.register("lamp", path)
    assert (rec.rank, rec.alpha, rec.base_fingerprint) == (8, 16.0, "fpX")
    assert "subject" not in rec.metadata and same(sqlite_reg.load(rec), lora(3, rank=8))


@pytest.mark.parametrize("bad", ["", "a/b", "a\\b", "..", "x..y", "mug@2", "a\x00b", "a\nb",
                                 "a\x7fb", "x" * 129, " mug", "mug ", None, 42])
def test_bad_names_raise_and_write_nothing(sqlite_reg, tmp_path, bad):
    with pytest.raises(InvalidName):
        sqlite_reg.register(bad, lora(0))
    assert sqlite_reg.count() == 0 and blob_files(tmp_path / "blobs") == []


@pytest.mark.parametrize("good", ["blue-mug", "Tasse bleue", "a.b", "商品-1", "x" * 128, "50% off_"])
def test_good_names(sqlite_reg, good):
    assert sqlite_reg.register(good, lora(0)).name == good
    assert sqlite_reg.get(good).name == good and sqlite_reg.get(f"{good}@1").version == 1


@pytest.mark.parametrize("ref", ["mug@0", "mug@-1", "mug@x", "mug@1.5", "mug@", "@1", "a/b@1"])
def test_bad_refs(sqlite_reg, ref):
    with pytest.raises(InvalidName):
        sqlite_reg.get(ref)


def test_bad_inputs_write_nothing(reg, tmp_path):
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"x": 1}))
    nan = lora(0)
    next(iter(nan.values()))[0, 0] = float("nan")
    cases = [
        ({}, None), ({"w": [1, 2]}, None), ({1: torch.ones(2)}, None), (nan, None),
        (lora(0), {"when": object()}), (lora(0), {"x": float("inf")}), (lora(0), {"rank": "four"}),
        (lora(0), {"target_modules": 5}), (tmp_path / "missing.safetensors", None), (evil, None),
    ]
    for tensors, meta in cases:
        with pytest.raises(InvalidAdapter):
            reg.register("mug", tensors, meta)
    with pytest.raises(InvalidAdapter):
        reg.register("mug", lora(0), base_fingerprint="f" * 129)
    assert reg.count() == 0 and reg.list() == []
    assert blob_files(tmp_path / "blobs") == [] and list((tmp_path / "blobs" / "tmp").iterdir()) == []
    assert issubclass(InvalidAdapter, StoreError) and issubclass(InvalidName, StoreError)


# -- dedupe -------------------------------------------------------------------------------------
def test_identical_tensors_are_stored_once(reg, tmp_path):
    a = reg.register("mug", lora(0), {"alpha": 4})
    b = reg.register("mug", lora(0), {"alpha": 4})          # second version, same bytes
    c = reg.register("cup", lora(0), {"alpha": 4})          # another name, same bytes
    d = reg.register("cup", lora(1), {"alpha": 4})
    assert a.sha256 == b.sha256 == c.sha256 != d.sha256
    assert (a.version, b.version, c.version) == (1, 2, 1)
    assert len(blob_files(tmp_path / "blobs")) == 2
    # entry-specific metadata (subject, version, created) stays out of the blob, so it still dedupes
    e = reg.register("lamp", lora(0), {"alpha": 4, "subject": "lamp", "created": "2025-01-01"})
    assert e.sha256 == a.sha256 and e.metadata["subject"] == "lamp"
    assert len(blob_files(tmp_path / "blobs")) == 2
    # a deleted row does not take the shared blob with it
    reg.delete("mug")
    assert reg.gc(grace_seconds=0).removed_blobs == 0
    assert same(reg.load("cup@1"), lora(0))


# -- integrity ----------------------------------------------------------------------------------
def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["data", "header"])
def test_flipped_byte_raises_corrupt_naming_adapter(reg, where):
    rec = reg.register("blue-mug", lora(0))
    reg.register("blue-mug", lora(1))
    flip_byte(Path(reg.blobs.path(rec.sha256)), None if where == "data" else 20)
    with pytest.raises(AdapterCorrupt) as info:
        reg.load("blue-mug@1")
    assert "blue-mug@1" in str(info.value) and rec.sha256 in str(info.value)
    assert rec.sha256 not in reg.cache                        # never cached
    with pytest.raises(AdapterCorrupt):                       # still refused the second time
        reg.load(rec)
    with pytest.raises(AdapterCorrupt):
        reg.export("blue-mug@1", "/dev/null")
    assert same(reg.load("blue-mug@2"), lora(1))              # the other version is unaffected
    assert reg.verify() == ["blue-mug@1"]


def test_verifying_lets_nothing_made_from_corrupt_bytes_escape(sqlite_reg):
    rec = sqlite_reg.register("mug", lora(0))
    with sqlite_reg.verifying(rec) as tensors:              # a good blob: the decoded tensors, uncached
        assert same(tensors, lora(0))
    assert rec.sha256 not in sqlite_reg.cache
    flip_byte(Path(sqlite_reg.blobs.path(rec.sha256)))      # data bytes: still parses, hash differs
    made = []
    with pytest.raises(AdapterCorrupt, match="mug@1.*does not verify"):
        with sqlite_reg.verifying(rec) as tensors:
            made.append({k: v * 2 for k, v in tensors.items()})  # the block runs ...
    assert len(made) == 1                                    # ... but its exit raises
    with pytest.raises(AdapterCorrupt, match="mug@1"):      # a block that trips on the bytes reports the
        with sqlite_reg.verifying(rec):                      # corruption, not its own error
            raise ValueError("shapes do not fit")
    sqlite_reg.create_tenant("someone-else")
    other = sqlite_reg.for_tenant("someone-else")
    with pytest.raises(AdapterNotFound):                     # another tenant's record is not there
        with other.verifying(rec):
            pass


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_verified_load_works_in_a_forked_child(sqlite_reg):
    """The background hasher's thread does not survive fork(); a child must get its own, not wait forever."""
    rec = sqlite_reg.register("mug", lora(0))
    sqlite_reg.load(rec)  # the parent's hasher thread now exists
    sqlite_reg.cache.clear()
    pid = os.fork()
    if pid == 0:  # child: a cold, verified load, then report through the exit code
        import signal
        signal.alarm(20)  # a hang becomes a failure, not a stuck test run
        try:
            ok = same(sqlite_reg.load(rec), lora(0))
        except BaseException:  # noqa: BLE001
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_corruption_after_caching_is_found_by_verify_and_evicted(sqlite_reg):
    rec = sqlite_reg.register("mug", lora(0))
    sqlite_reg.load(rec)                                              # verified, now cached
    flip_byte(Path(sqlite_reg.blobs.path(rec.sha256)))
    assert sqlite_reg.verify("mug") == ["mug@1"]
    assert rec.sha256 not in sqlite_reg.cache
    with pytest.raises(AdapterCorrupt, match="mug@1"):
        sqlite_reg.load(rec)


def test_missing_or_truncated_blob_is_corrupt(sqlite_reg):
    a, b = sqlite_reg.register("a", lora(0)), sqlite_reg.register("b", lora(1))
    os.unlink(sqlite_reg.blobs.path(a.sha256))
    with pytest.raises(AdapterCorrupt, match="a@1.*missing"):
        sqlite_reg.load(a)
    p = Path(sqlite_reg.blobs.path(b.sha256))
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(AdapterCorrupt, match="b@1"):
        sqlite_reg.load(b)


def test_registering_same_bytes_repairs_a_corrupt_blob(sqlite_reg):
    rec = sqlite_reg.register("mug", lora(0))
    flip_byte(Path(sqlite_reg.blobs.path(rec.sha256)))
    again = sqlite_reg.register("mug", lora(0))
    assert again.sha256 == rec.sha256
    assert same(sqlite_reg.load(rec), lora(0)) and sqlite_reg.verify() == []


# -- list / delete / gc ---------------------------------------------------------------------------
def test_list_filters_and_pagination(reg):
    names = ["mug", "mug-blue", "Mug-red", "mu_g", "mu%", "lamp", "lamp-2"]
    for i, n in enumerate(names):
        reg.register(n, lora(i), base_fingerprint="A" if n.startswith("l") else "B")
    reg.register("mug", lora(99), base_fingerprint="B")
    refs = [r.ref for r in reg.list()]
    assert len(refs) == 8 and len(set(refs)) == 8
    assert {r.ref for r in reg.list(prefix="mug")} == {"mug@1", "mug@2", "mug-blue@1"}  # case, _ and %
    assert {r.ref for r in reg.list(prefix="mu_")} == {"mu_g@1"}
    assert {r.ref for r in reg.list(prefix="mu%")} == {"mu%@1"}
    assert {r.name for r in reg.list(base_fingerprint="A")} == {"lamp", "lamp-2"}
    assert [r.ref for r in reg.list(prefix="mug", latest_only=True)] == ["mug@2", "mug-blue@1"]
    assert [r.ref for r in reg.list(limit=3, offset=2)] == refs[2:5]
    walked, after = [], None
    while page := reg.list(limit=3, after=after):
        walked += [r.ref for r in page]
        after = page[-1].ref
    assert walked == refs
    with pytest.raises(InvalidName):
        reg.list(after="mug")


def test_delete_versions_and_names(reg, tmp_path):
    for i in range(3):
        reg.register("mug", lora(i))
    assert reg.delete("mug@3") == 1
    assert reg.get("mug").version == 2
    assert reg.register("mug", lora(5)).version == 4          # version numbers are never reused
    with pytest.raises(AdapterNotFound):
        reg.delete("mug@3")
    with pytest.raises(AdapterNotFound):
        reg.delete("nope")
    assert len(blob_files(tmp_path / "blobs")) == 4
    assert reg.delete("mug") == 3
    with pytest.raises(AdapterNotFound):
        reg.get("mug")
    assert reg.gc(grace_seconds=3600).removed_blobs == 0      # young blobs survive the grace
    report = reg.gc(grace_seconds=0)
    assert report.removed_blobs == 4 and report.kept_blobs == 0
    assert blob_files(tmp_path / "blobs") == []
    assert reg.register("mug", lora(0)).version == 1          # a removed name starts over


def test_gc_removes_orphans_and_stale_temp_files(sqlite_reg, tmp_path):
    keep = sqlite_reg.register("mug", lora(0))
    orphan = sqlite_reg.blobs.put(b"not referenced by any row")      # a crash between blob and row
    (tmp_path / "blobs" / "tmp" / "dead.tmp").write_bytes(b"half a blob")
    report = sqlite_reg.gc(grace_seconds=0)
    assert (report.removed_blobs, report.removed_temp, report.kept_blobs) == (1, 1, 1)
    assert not sqlite_reg.blobs.exists(orphan) and sqlite_reg.blobs.verified(keep.sha256)


def test_threads_share_one_registry(sqlite_reg):
    recs = [sqlite_reg.register(f"s{i}", lora(i)) for i in range(8)]

    def work(i):
        rec = sqlite_reg.get(f"s{i % 8}")
        return same(sqlite_reg.load(rec), lora(i % 8)) and rec == recs[i % 8]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(64)))


# -- export / import ------------------------------------------------------------------------------
def test_export_import_interchange(reg, tmp_path):
    diffusers_meta = {"r": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_k"]}
    rec = reg.register("blue-mug", lora(0), {"alpha": 8, "trainer_version": "0.3",
                                             "lora_adapter_metadata": json.dumps(diffusers_meta)},
                       "fp-base")
    out = tmp_path / "blue-mug.safetensors"
    reg.export("blue-mug", out)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(lora(0))                  # keys as given (unet.-prefixed PEFT)
    assert meta["subject"] == "blue-mug" and meta["version"] == "1"
    assert meta["rank"] == "4" and meta["alpha"] == "8" and meta["base_fingerprint"] == "fp-base"
    assert json.loads(meta["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    assert meta["trainer_version"] == "0.3" and meta["created"] == rec.created.isoformat()
    assert json.loads(meta["lora_adapter_metadata"]) == diffusers_meta
    with Registry(f"sqlite:///{tmp_path}/other.db", tmp_path / "other-blobs") as other:
        imported = other.import_(out)
        assert (imported.ref, imported.rank, imported.alpha, imported.base_fingerprint) == \
            ("blue-mug@1", 4, 8.0, "fp-base")
        assert imported.sha256 == rec.sha256                  # same content, same blob
        assert same(other.load(imported), lora(0))
    again = reg.import_(out)                                  # into the same registry: v2, deduped
    assert again.ref == "blue-mug@2" and again.sha256 == rec.sha256
    bare = tmp_path / "bare.safetensors"
    save_file(lora(1), str(bare))
    with pytest.raises(InvalidName):
        reg.import_(bare)
    assert reg.import_(bare, name="lamp").ref == "lamp@1"


# -- configuration ---------------------------------------------------------------------------------
def test_defaults_follow_env_and_never_touch_real_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    with Registry() as r:
        r.register("mug", lora(0))
        assert r.url.database == str(home / "registry.db") and r.blobs.root == str(home / "blobs")
    assert (home / "registry.db").exists() and blob_files(home / "blobs")
    monkeypatch.setenv("SUBJECTPAINT_REGISTRY_URL", f"sqlite:///{tmp_path}/env.db")
    monkeypatch.setenv("SUBJECTPAINT_BLOBS", str(tmp_path / "env-blobs"))
    with Registry() as r:
        assert r.list() == [] and r.url.database == str(tmp_path / "env.db")
    with Registry() as r:  # sqlite pragmas are on for every connection
        with r.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_memory_fsspec_blobs(tmp_path):
    import fsspec
    url = f"memory://sp-test-{os.getpid()}-{id(tmp_path)}"
    with Registry(f"sqlite:///{tmp_path}/m.db", url) as r:
        a = r.register("mug", lora(0))
        b = r.register("cup", lora(0))
        r.register("lamp", lora(1))
        fs = fsspec.filesystem("memory")
        assert a.sha256 == b.sha256 and len(list(r.blobs.blobs())) == 2
        assert same(r.load(a), lora(0))
        r.delete("lamp")
        assert r.gc(grace_seconds=0).removed_blobs == 1
        path = r.blobs.path(a.sha256)
        data = bytearray(fs.cat_file(path))
        data[100] ^= 0xFF
        fs.pipe_file(path, bytes(data))
        r.cache.clear()
        with pytest.raises(AdapterCorrupt, match="mug@1"):
            r.load(a)
        fs.rm(url.removeprefix("memory://"), recursive=True)


def test_base_models(sqlite_reg):
    sqlite_reg.add_base("fp1", "paint-by-example", {"size": 512})
    sqlite_reg.add_base("fp1", "again")                               # idempotent
    assert sqlite_reg.bases() == [{"fingerprint": "fp1", "name": "paint-by-example", "config": {"size": 512}}]


def test_adapters_store_imports_no_diffusion_code():
    code = ("import sys, adapters_store, adapters_store.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('subjectpaint', 'trainers', "
            "'diffusers', 'peft')]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_register_racing_delete_of_the_same_name(reg):
    errors, stop = [], []

    def registrar():
        for i in range(30):
            try:
                reg.register("mug", lora(i % 3))
            except Exception as exc:  # noqa: BLE001 - any error surfacing is a failure
                errors.append(repr(exc))
        stop.append(1)

    def remover():
        while not stop:
            try:
                reg.delete("mug")
            except AdapterNotFound:
                pass
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda f: f(), [registrar, remover]))
    assert errors == []
    versions = [r.version for r in reg.list(prefix="mug")]
    assert versions == sorted(set(versions))
    assert reg.verify() == []
    for rec in reg.list(prefix="mug"):
        assert any(same(reg.load(rec), lora(k)) for k in range(3))
