"""Tenants: scoping of every registry operation, hashed API keys, and the 0002 -> 0003 upgrade."""
from __future__ import annotations

import hashlib
import sqlite3

import pytest
import torch
from sqlalchemy import text

from adapters_store import AdapterNotFound, InvalidKey, InvalidName, Registry, TenantNotFound
from adapters_store.blobs import sha256_hex
from adapters_store.database import head_revision, make_engine, upgrade


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBJECTPAINT_HOME", str(tmp_path / "home"))


def lora(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    return {f"{key}.lora_A.weight": torch.randn(4, 16, generator=g).half(),
            f"{key}.lora_B.weight": torch.randn(16, 4, generator=g).half()}


@pytest.fixture
def reg(tmp_path):
    with Registry(f"sqlite:///{tmp_path}/r.db", tmp_path / "blobs") as r:
        for name in ("acme", "globex"):
            r.create_tenant(name)
        yield r


def test_tenants_cannot_see_use_overwrite_or_delete_each_other(reg):
    acme, globex = reg.for_tenant("acme"), reg.for_tenant("globex")
    mine = acme.register("mug", lora(1))
    assert mine.tenant == "acme" and mine.ref == "mug@1"
    # globex: the name is free for it, and its own "mug" starts at version 1 (no leak of acme's counter)
    for ref in ("mug", "mug@1", "mug@latest"):
        with pytest.raises(AdapterNotFound) as foreign:
            globex.get(ref)
        with pytest.raises(AdapterNotFound) as unknown:
            globex.get(ref.replace("mug", "cup"))
        assert str(foreign.value).replace("mug", "cup") == str(unknown.value)   # look the same
        with pytest.raises(AdapterNotFound):
            globex.delete(ref)
        assert not globex.exists(ref)
    with pytest.raises(AdapterNotFound):
        globex.load(mine)                                  # a record of another tenant's view
    assert globex.list() == [] and globex.count() == 0
    theirs = globex.register("mug", lora(2))
    assert theirs.version == 1 and theirs.sha256 != mine.sha256
    # acme is untouched by all of that
    assert acme.get("mug") == mine and acme.count() == 1 and reg.count() == 0
    assert torch.equal(acme.load("mug")[next(iter(lora(1)))], lora(1)[next(iter(lora(1)))])
    assert acme.delete("mug") == 1
    assert globex.get("mug") == theirs                    # deleting acme's mug left globex's


def test_same_bytes_in_two_tenants_share_a_blob_but_not_rows(reg, tmp_path):
    a = reg.for_tenant("acme").register("mug", lora(1))
    b = reg.for_tenant("globex").register("mug", lora(1))
    assert a.sha256 == b.sha256
    reg.for_tenant("acme").delete("mug")
    assert reg.gc(grace_seconds=0).removed_blobs == 0       # globex still references the blob
    assert torch.equal(reg.for_tenant("globex").load("mug")[next(iter(lora(1)))],
                       lora(1)[next(iter(lora(1)))])


def test_unknown_tenant_is_refused(reg):
    with pytest.raises(TenantNotFound):
        reg.for_tenant("initech")
    with pytest.raises(TenantNotFound):
        reg.issue_key("initech")


def test_api_keys_are_hashed_and_bound_to_one_tenant(reg, tmp_path):
    key = reg.issue_key("acme", label="ci")
    other = reg.issue_key("globex")
    assert reg.tenant_for_key(key) == "acme" and reg.tenant_for_key(other) == "globex"
    with sqlite3.connect(tmp_path / "r.db") as conn:
        stored = [row[0] for row in conn.execute("SELECT key_hash FROM api_keys")]
        dump = "\n".join(conn.iterdump())
    assert hashlib.sha256(key.encode()).hexdigest() in stored
    assert key not in dump and key[3:] not in dump          # the raw key is nowhere in the database
    for bad in (None, "", key[:-1], key + "x", key[:-1] + ("A" if key[-1] != "A" else "B"),
                "Bearer " + key, 42):
        with pytest.raises(InvalidKey, match="^invalid API key$"):
            reg.tenant_for_key(bad)
    assert reg.revoke_key(key) is True
    with pytest.raises(InvalidKey):
        reg.tenant_for_key(key)
    assert reg.tenant_for_key(other) == "globex"


def test_database_at_0002_upgrades_with_every_adapter_intact(tmp_path):
    """A registry made by the previous schema (rows + blobs written by the old code path) upgrades:
    every subject lands in tenant 'default', every adapter row and blob verifies, versions go on."""
    db, blobs = tmp_path / "old.db", tmp_path / "blobs"
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine, "0002")
    from adapters_store.blobs import BlobStore
    from adapters_store import adapter_file
    store, expected = BlobStore(str(blobs)), {}
    with engine.begin() as conn:
        for i, name in enumerate(["mug", "lamp", "chair"]):
            conn.execute(text("INSERT INTO subjects (id, name, display, last_version, created) "
                              "VALUES (:i, :n, '{}', 2, '2024-01-01 00:00:00')"), {"i": i + 1, "n": name})
            for version in (1, 2):
                data = adapter_file.encode(lora(10 * i + version), {"rank": "4"})
                sha = store.put(data)
                expected[f"{name}@{version}"] = sha
                conn.execute(text(
                    "INSERT INTO adapters (subject_id, version, rank, alpha, target_modules, dtype, "
                    "byte_size, sha256, base_fingerprint, meta, training, metrics, created) VALUES "
                    "(:s, :v, 4, 4.0, '[\"to_q\"]', 'float16', :n, :sha, 'fp', '{}', '{}', '{}', "
                    "'2024-01-01 00:00:00')"), {"s": i + 1, "v": version, "n": len(data), "sha": sha})
    engine.dispose()

    with Registry(f"sqlite:///{db}", blobs) as reg:
        assert reg.backup_path is not None
        assert reg.tenants() == ["default"]
        records = reg.list(limit=None)
        assert {r.ref: r.sha256 for r in records} == expected           # every row, same blob
        assert all(r.tenant == "default" for r in records)
        assert reg.verify() == []                                         # every blob hashes right
        for ref, sha in expected.items():
            loaded = reg.load(ref)
            name, version = ref.split("@")
            i = ["mug", "lamp", "chair"].index(name)
            assert all(torch.equal(loaded[k], v) for k, v in lora(10 * i + int(version)).items())
            assert sha256_hex(reg.blobs.read(sha)) == sha
        assert reg.register("mug", lora(99)).version == 3                 # counters survived
        reg.create_tenant("acme")
        assert reg.for_tenant("acme").register("mug", lora(5)).version == 1   # per-tenant names now
        with pytest.raises(AdapterNotFound):
            reg.for_tenant("acme").get("lamp")
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == head_revision()
        assert conn.execute("SELECT count(*) FROM adapters").fetchone()[0] == 8


def test_concurrent_same_name_in_one_tenant_still_never_collides(reg):
    acme = reg.for_tenant("acme")
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        versions = sorted(pool.map(lambda i: acme.register("mug", lora(i)).version, range(8)))
    assert versions == list(range(1, 9))
    with pytest.raises(InvalidName):
        reg.for_tenant("../etc")
