"""The journal's core: the SQLite connection, transactions, meta values, nonces and the schema.

Why it is built this way:
- **Exactly-once effect.** A nonce is taken, the message signed and stored in the outbox, and
  its local effect (an order row, a delivery marked reported) recorded in ONE transaction.
  Killing the process at any instant leaves either nothing or a signed message that the outbox
  resends until the ledger acknowledges it; the ledger deduplicates on (device, nonce).
- **The journal is the source of truth.** Deliveries are rebuilt from it at start, never from
  memory; the scheduler's own jobs are derived state.
- ``synchronous=FULL``: a power cut after a commit must not lose it (the signed bytes may already
  be on their way to the ledger).
- One connection guarded by a lock: the scheduler's threads share it, and the Pi has no use for
  a connection pool.
- Time comes only from the injected ``clock_ms`` (the simulation runs on a virtual clock).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .schema import BASE_SCHEMA, MIGRATIONS, SCHEMA_VERSION, split_statements

log = logging.getLogger(__name__)


class JournalSchemaError(Exception):
    """The journal cannot be opened by this firmware (written by a newer release, or not a journal)."""


def read_schema_version(path: Path) -> int | None:
    """The schema version of the journal at ``path``, read-only and cheap (no migration, no
    lock held longer than one SELECT): None when there is no journal file yet.

    For the flashing tools: before switching to a release, check that it can read this
    journal (its SCHEMA_VERSION >= this value). Raises JournalSchemaError when the file is not
    a readable journal."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as exc:
        raise JournalSchemaError(f"journal {path}: cannot open read-only ({exc})") from None
    try:
        return _stored_version(db, path)
    finally:
        db.close()


def _stored_version(db: sqlite3.Connection, path: Path) -> int | None:
    """meta.schema_version, or None for an empty database (a journal about to be created)."""
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "meta" not in tables:
            if tables:
                raise JournalSchemaError(f"journal {path}: not a DGC journal (tables {', '.join(sorted(tables))}, no meta)")
            return None
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as exc:
        raise JournalSchemaError(f"journal {path}: schema version unreadable ({exc})") from None
    if row is None or not isinstance(row[0], int):
        raise JournalSchemaError(f"journal {path}: meta has no integer schema_version (found {row!r})")
    return row[0]


class JournalCore:
    def __init__(self, path: Path, *, clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._clock_ms = clock_ms
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        try:
            self._open_schema()
        except BaseException:
            self._db.close()
            raise

    def _open_schema(self) -> None:
        """Create, migrate or refuse (schema.py says why), in one transaction."""
        with self._transaction() as db:
            found = _stored_version(db, self.path)
            if found is not None and found > SCHEMA_VERSION:
                raise JournalSchemaError(
                    f"journal {self.path} has schema version {found}, newer than this firmware's {SCHEMA_VERSION}: "
                    f"it was written by a later release; run that release (or one that reads version {found}), "
                    "this one will not touch it")
            created = found is None
            if created:
                for statement in split_statements(BASE_SCHEMA):
                    db.execute(statement)
                db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', 1)")
                db.execute("INSERT INTO meta (key, value) VALUES ('next_nonce', 1)")
                db.execute("INSERT INTO meta (key, value) VALUES ('trade_cursor', 0)")
                found = 1
            start = found
            for version in range(found + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    db.execute(statement)
                self._set_meta(db, "schema_version", version)
        # The version this journal was migrated from (None: created now, or already current).
        self.migrated_from = None if created or start == SCHEMA_VERSION else start
        if self.migrated_from is not None:
            log.info("journal %s: migrated from schema version %s to %s", self.path, start, SCHEMA_VERSION)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _meta(self, db: sqlite3.Connection, key: str) -> int:
        return db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    def _set_meta(self, db: sqlite3.Connection, key: str, value: int) -> None:
        db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    def schema_version(self) -> int:
        with self._lock:
            return self._meta(self._db, "schema_version")

    # -- the operator's SAFE (issue 7 f: it survives a daemon restart) ---------------------

    def operator_safe(self) -> bool:
        with self._lock:
            return bool(self._meta(self._db, "operator_safe"))

    def set_operator_safe(self, on: bool) -> None:
        with self._transaction() as db:
            self._set_meta(db, "operator_safe", 1 if on else 0)

    # -- nonces -------------------------------------------------------------------------

    def next_nonce(self) -> int:
        with self._lock:
            return self._meta(self._db, "next_nonce")

    def raise_nonce_floor(self, at_least: int) -> bool:
        """After a journal loss the ledger may know higher nonces; never reuse one. True if raised."""
        with self._transaction() as db:
            if self._meta(db, "next_nonce") < at_least:
                self._set_meta(db, "next_nonce", at_least)
                return True
            return False

    def check_writable(self, now_ms: int | None = None) -> None:
        """Commit one tiny write (meta 'health_probe_ms'); raises sqlite3.Error or OSError if the journal
        cannot take writes (disk full, read-only remount, lost SD card). Used by the daemon's health
        check so that a board that can no longer record what it signs stops telling systemd it is well."""
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('health_probe_ms', ?)",
                       (self._clock_ms() if now_ms is None else now_ms,))
