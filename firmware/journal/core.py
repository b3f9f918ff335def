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

import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .schema import SCHEMA, SCHEMA_VERSION


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
        self._db.executescript(SCHEMA)
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('next_nonce', 1)")
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('trade_cursor', 0)")

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
