"""Opening the registry database: engine settings, and upgrade to the Alembic head.

SQLite gets WAL, ``busy_timeout``, ``synchronous=FULL`` and foreign keys on every connection, and
writers start with ``BEGIN IMMEDIATE`` (so two writers queue on the lock instead of failing on a
read->write upgrade). Upgrades run under a lock (a file lock for SQLite, an advisory lock for
Postgres) so processes opening a new database at once migrate it once; an SQLite file that already
holds a schema is copied to ``<db>.bak-<rev>-<time>`` before an upgrade actually runs.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

from .errors import StoreError

MIGRATIONS = str(Path(__file__).with_name("migrations"))
BUSY_TIMEOUT_MS = 30_000
WRITE = {"adapters_store_write": True}  # engine execution option: begin with BEGIN IMMEDIATE


def normalize_url(url: str | URL) -> URL:
    """Expand ``~`` in SQLite paths and create the parent directory."""
    url = make_url(url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        path = os.path.abspath(os.path.expanduser(url.database))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        url = url.set(database=path)
    return url


def make_engine(url: str | URL) -> Engine:
    url = normalize_url(url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    in_memory = url.database in (None, "", ":memory:")
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000,
                                              "check_same_thread": False},
                           **({"poolclass": StaticPool} if in_memory else {}))

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _on_begin)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if not in_memory:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        write = conn.get_execution_options().get("adapters_store_write")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def alembic_config(connection=None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS)
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextlib.contextmanager
def _sqlite_file_lock(db_path: str):
    with open(db_path + ".migrate-lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def backup_sqlite(db_path: str, revision: str | None) -> str:
    """Consistent copy (sqlite backup API, WAL included) next to the database; returns its path."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    dest = f"{db_path}.bak-{revision or 'none'}-{stamp}"
    n = 1
    while os.path.exists(dest):
        dest = f"{db_path}.bak-{revision or 'none'}-{stamp}-{n}"
        n += 1
    src, dst = sqlite3.connect(db_path), sqlite3.connect(dest)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    return dest


def upgrade(engine: Engine, revision: str = "head", backup: bool = True) -> str | None:
    """Bring the database to ``revision`` (head by default). Returns the backup path if one was made."""
    target = head_revision() if revision == "head" else revision
    current = current_revision(engine)
    if current == target:
        return None
    known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current is not None and current not in known:
        raise StoreError(f"the registry database is at schema revision {current!r}, which this "
                         f"adapters_store does not know (newer release?); expected {target!r}")
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        with _sqlite_file_lock(url.database):
            current = current_revision(engine)
            if current == target:
                return None
            with engine.connect() as conn:
                has_tables = bool(inspect(conn).get_table_names())
            path = backup_sqlite(url.database, current) if backup and has_tables else None
            _run_upgrade(engine, revision)
            return path
    _run_upgrade(engine, revision)
    return None


def _run_upgrade(engine: Engine, revision: str) -> None:
    if engine.dialect.name == "sqlite":
        _run_sqlite_upgrade(engine, revision)
        return
    with engine.execution_options(**WRITE).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7468392015)"))
            if MigrationContext.configure(conn).get_current_revision() == (
                    head_revision() if revision == "head" else revision):
                return
        command.upgrade(alembic_config(conn), revision)


def _run_sqlite_upgrade(engine: Engine, revision: str) -> None:
    """SQLite's own recipe for schema changes: foreign keys off (only possible outside a transaction),
    migrate in one transaction, ``PRAGMA foreign_key_check`` before the commit, foreign keys back on.
    Without it, rebuilding a table (Alembic batch mode) drops the old one, and that DROP would cascade
    ``ON DELETE`` into the tables that reference it."""
    with engine.execution_options(**WRITE).connect() as conn:
        raw = conn.connection.dbapi_connection
        raw.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                command.upgrade(alembic_config(conn), revision)
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise StoreError(f"schema upgrade would break foreign keys: {broken[:5]}")
        finally:
            raw.execute("PRAGMA foreign_keys=ON")
