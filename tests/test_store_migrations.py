"""Schema migrations: fresh databases land at head, older ones are upgraded (after a backup)."""
from __future__ import annotations

import os
import sqlite3
import uuid

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from adapters_store import Registry, StoreError
from adapters_store.database import alembic_config, head_revision, make_engine, upgrade
from adapters_store.schema import Base


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBJECTPAINT_HOME", str(tmp_path / "home"))


def backups(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if ".bak-" in p.name)


def revision_of(path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def test_fresh_database_is_at_head_without_backup(tmp_path):
    with Registry(f"sqlite:///{tmp_path}/r.db", tmp_path / "b") as reg:
        assert reg.backup_path is None
        assert set(inspect(reg.engine).get_table_names()) >= {"subjects", "adapters", "base_models",
                                                             "alembic_version"}
        with reg.engine.connect() as conn:   # models and migrations describe the same schema
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    assert revision_of(tmp_path / "r.db") == head_revision() == "0005"
    assert backups(tmp_path) == []
    Registry(f"sqlite:///{tmp_path}/r.db", tmp_path / "b").close()   # reopening: nothing to do
    assert backups(tmp_path) == []


def test_old_revision_is_backed_up_then_upgraded(tmp_path):
    db = tmp_path / "old.db"
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine, "0001")
    with engine.begin() as conn:   # data written by the old schema
        conn.execute(text("INSERT INTO subjects (id, name, display, last_version, created) "
                          "VALUES (1, 'mug', '{}', 1, '2024-01-01 00:00:00')"))
        conn.execute(text(
            "INSERT INTO adapters (subject_id, version, rank, alpha, target_modules, dtype, "
            "byte_size, sha256, base_fingerprint, meta, training, metrics, created) VALUES "
            "(1, 1, 4, 4.0, '[\"to_q\"]', 'float16', 10, :sha, 'fp', '{}', '{}', '{}', "
            "'2024-01-01 00:00:00')"), {"sha": "ab" * 32})
    engine.dispose()
    assert revision_of(db) == "0001"
    assert "ix_adapters_sha256" not in {i["name"] for i in inspect(create_engine(f"sqlite:///{db}"))
                                        .get_indexes("adapters")}

    with Registry(f"sqlite:///{db}", tmp_path / "b") as reg:
        assert reg.backup_path is not None and os.path.exists(reg.backup_path)
        rec = reg.get("mug")
        assert (rec.version, rec.rank, rec.sha256) == (1, 4, "ab" * 32)
        assert reg.register("mug", {"w": __import__("torch").ones(2)}).version == 2
        assert {"ix_adapters_sha256", "ix_adapters_base_fingerprint"} <= {
            i["name"] for i in inspect(reg.engine).get_indexes("adapters")}
    assert revision_of(db) == head_revision()
    assert backups(tmp_path) == [os.path.basename(reg.backup_path)]
    assert revision_of(reg.backup_path) == "0001"                 # the backup is the old database
    with sqlite3.connect(reg.backup_path) as conn:
        assert conn.execute("SELECT name FROM subjects").fetchall() == [("mug",)]


def test_database_made_by_alembic_upgrade_base_to_head_opens(tmp_path):
    db = tmp_path / "a.db"
    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")
        command.downgrade(alembic_config(conn), "base")           # downgrades work too
        command.upgrade(alembic_config(conn), "head")
    engine.dispose()
    with Registry(f"sqlite:///{db}", tmp_path / "b") as reg:
        assert reg.backup_path is None and reg.list() == []


@pytest.mark.postgres
def test_postgres_schema_upgrades_to_head(tmp_path):
    base = os.environ.get("SUBJECTPAINT_TEST_PG_URL")
    if not base:
        pytest.skip("SUBJECTPAINT_TEST_PG_URL is not set")
    schema = f"sp_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        engine = make_engine(url)
        upgrade(engine, "0001")
        engine.dispose()
        with Registry(url.render_as_string(hide_password=False), tmp_path / "b") as reg:
            assert reg.backup_path is None                          # backups are SQLite-only
            with reg.engine.connect() as conn:
                assert MigrationContext.configure(conn).get_current_revision() == head_revision()
                assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            rec = reg.register("mug", {"w": __import__("torch").ones(3)}, {"k": "v"}, "fp")
            assert reg.get("mug@1") == rec and reg.list(base_fingerprint="fp") == [rec]
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_unknown_newer_revision_is_refused_clearly(tmp_path):
    db = tmp_path / "future.db"
    Registry(f"sqlite:///{db}", tmp_path / "b").close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(StoreError, match="9999"):
        Registry(f"sqlite:///{db}", tmp_path / "b")
    assert backups(tmp_path) == []


def test_in_memory_sqlite_is_shared_across_threads(tmp_path):
    import threading
    import torch
    with Registry("sqlite://", tmp_path / "b") as reg:
        rec = reg.register("mug", {"w": torch.ones(2)})
        seen = []
        t = threading.Thread(target=lambda: seen.append(reg.get("mug")))
        t.start()
        t.join()
        assert seen == [rec]
