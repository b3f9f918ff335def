"""The board's durable state in SQLite (WAL): readings, orders, outbox, trades, deliveries.

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
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .messages import SignedMessage, Signer, sign_message

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY,
    meter TEXT NOT NULL,
    taken_at_ms INTEGER NOT NULL,
    import_energy_wh INTEGER NOT NULL,
    export_energy_wh INTEGER NOT NULL,
    power_w INTEGER
);
CREATE INDEX IF NOT EXISTS readings_by_meter_time ON readings (meter, taken_at_ms);
CREATE TABLE IF NOT EXISTS outbox (
    nonce INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    signature TEXT NOT NULL,
    ref TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',      -- pending | acked | rejected
    attempts INTEGER NOT NULL DEFAULT 0,
    last_attempt_ms INTEGER,
    answer TEXT
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (state, nonce);
CREATE TABLE IF NOT EXISTS orders (
    nonce INTEGER PRIMARY KEY,
    market_id INTEGER NOT NULL,
    side TEXT NOT NULL,
    energy_wh INTEGER NOT NULL,
    price_per_kwh_minor INTEGER NOT NULL,
    state TEXT NOT NULL,                        -- sending | open | filled | cancelling | cancelled | rejected
    filled_wh INTEGER NOT NULL DEFAULT 0,
    created_at_ms INTEGER NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS orders_by_market ON orders (market_id, state);
CREATE TABLE IF NOT EXISTS trades (
    trade_id INTEGER PRIMARY KEY,
    market_id INTEGER NOT NULL,
    side TEXT NOT NULL,
    energy_wh INTEGER NOT NULL,
    price_per_kwh_minor INTEGER NOT NULL,
    order_nonce INTEGER NOT NULL,
    counterparty TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    trade_id INTEGER PRIMARY KEY REFERENCES trades (trade_id),
    market_id INTEGER NOT NULL,
    direction TEXT NOT NULL,                    -- export (we sell) | import (we buy)
    energy_wh INTEGER NOT NULL,
    state TEXT NOT NULL,                        -- scheduled | running | metered | reported
    start_meter_wh INTEGER,
    end_meter_wh INTEGER,
    delivered_wh INTEGER,
    outcome TEXT,                               -- delivered | failed
    detail TEXT,
    started_at_ms INTEGER,
    report_nonce INTEGER
);
CREATE INDEX IF NOT EXISTS deliveries_by_state ON deliveries (state, market_id);
"""


@dataclass(frozen=True)
class OutboxEntry:
    nonce: int
    kind: str
    message: SignedMessage
    ref: str
    expires_at: int
    attempts: int


@dataclass(frozen=True)
class OrderRow:
    nonce: int
    market_id: int
    side: str
    energy_wh: int
    price_per_kwh_minor: int
    state: str
    filled_wh: int

    @property
    def remaining_wh(self) -> int:
        return self.energy_wh - self.filled_wh


@dataclass(frozen=True)
class DeliveryRow:
    trade_id: int
    market_id: int
    direction: str
    energy_wh: int
    state: str
    start_meter_wh: int | None
    end_meter_wh: int | None
    delivered_wh: int | None
    outcome: str | None
    detail: str | None


class Journal:
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
        self._db.executescript(_SCHEMA)
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

    # -- outbox -------------------------------------------------------------------------

    def _enqueue(self, db: sqlite3.Connection, build: Callable[[int], dict], signer: Signer, ref: str) -> SignedMessage:
        nonce = self._meta(db, "next_nonce")
        fields = build(nonce)
        message = sign_message(fields, signer)
        db.execute(
            "INSERT INTO outbox (nonce, kind, payload, signature, ref, created_at_ms, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (nonce, fields["type"], message.payload.decode("ascii"), message.signature.hex(), ref, self._clock_ms(), fields["expires_at"]),
        )
        self._set_meta(db, "next_nonce", nonce + 1)
        return message

    def enqueue_order(self, build: Callable[[int], dict], signer: Signer) -> SignedMessage:
        """Take a nonce, sign the order, store it in the outbox and as an order — one transaction."""
        with self._transaction() as db:
            message = self._enqueue(db, build, signer, ref="order")
            f = message.fields
            db.execute(
                "INSERT INTO orders (nonce, market_id, side, energy_wh, price_per_kwh_minor, state, created_at_ms) "
                "VALUES (?, ?, ?, ?, ?, 'sending', ?)",
                (f["nonce"], f["market_id"], f["side"], f["energy_wh"], f["price_per_kwh_minor"], self._clock_ms()),
            )
            return message

    def enqueue_cancel(self, order_nonce: int, build: Callable[[int], dict], signer: Signer) -> SignedMessage:
        with self._transaction() as db:
            message = self._enqueue(db, build, signer, ref=f"cancel:{order_nonce}")
            db.execute("UPDATE orders SET state = 'cancelling' WHERE nonce = ? AND state IN ('sending', 'open')", (order_nonce,))
            return message

    def enqueue_report(self, trade_id: int, build: Callable[[int], dict], signer: Signer) -> SignedMessage:
        """Sign the delivery report and mark the delivery reported, in one transaction."""
        with self._transaction() as db:
            message = self._enqueue(db, build, signer, ref=f"report:{trade_id}")
            db.execute("UPDATE deliveries SET state = 'reported', report_nonce = ? WHERE trade_id = ?", (message.fields["nonce"], trade_id))
            return message

    def pending_outbox(self, limit: int = 100) -> list[OutboxEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT nonce, kind, payload, signature, ref, expires_at, attempts FROM outbox WHERE state = 'pending' ORDER BY nonce LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            OutboxEntry(n, k, SignedMessage(payload=p.encode("ascii"), signature=bytes.fromhex(s)), r, e, a)
            for n, k, p, s, r, e, a in rows
        ]

    def pending_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()[0]

    def note_attempt(self, nonce: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1, last_attempt_ms = ? WHERE nonce = ?", (self._clock_ms(), nonce))

    def settle_outbox(self, entry: OutboxEntry, *, accepted: bool, answer: dict) -> None:
        """Record the ledger's final answer for a message, and what it means for the local state."""
        state = "acked" if accepted else "rejected"
        with self._transaction() as db:
            db.execute("UPDATE outbox SET state = ?, answer = ? WHERE nonce = ?", (state, json.dumps(answer, sort_keys=True), entry.nonce))
            if entry.kind == "order":
                if accepted:
                    result = answer.get("result") or {}
                    filled = result.get("filled_wh") if isinstance(result.get("filled_wh"), int) else 0
                    db.execute(
                        "UPDATE orders SET state = CASE WHEN state = 'cancelling' THEN state WHEN ? >= energy_wh THEN 'filled' ELSE 'open' END, "
                        "filled_wh = MAX(filled_wh, ?) WHERE nonce = ?",
                        (filled, filled, entry.nonce),
                    )
                else:
                    db.execute("UPDATE orders SET state = 'rejected', detail = ? WHERE nonce = ?", (answer.get("code"), entry.nonce))
            elif entry.kind == "cancel":
                order_nonce = entry.message.fields["order_nonce"]
                if accepted:
                    db.execute("UPDATE orders SET state = 'cancelled' WHERE nonce = ? AND state != 'filled'", (order_nonce,))
                else:
                    # Usually 'order_closed': it filled before the cancel arrived; trades will tell.
                    db.execute("UPDATE orders SET state = CASE WHEN filled_wh >= energy_wh THEN 'filled' ELSE 'open' END "
                               "WHERE nonce = ? AND state = 'cancelling'", (order_nonce,))

    # -- readings -----------------------------------------------------------------------

    def add_reading(self, meter: str, taken_at_ms: int, import_energy_wh: int, export_energy_wh: int, power_w: int | None) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO readings (meter, taken_at_ms, import_energy_wh, export_energy_wh, power_w) VALUES (?, ?, ?, ?, ?)",
                (meter, taken_at_ms, import_energy_wh, export_energy_wh, power_w),
            )

    def readings(self, meter: str, since_ms: int) -> list[tuple[int, int, int]]:
        """(taken_at_ms, import_energy_wh, export_energy_wh), oldest first."""
        with self._lock:
            return self._db.execute(
                "SELECT taken_at_ms, import_energy_wh, export_energy_wh FROM readings WHERE meter = ? AND taken_at_ms >= ? ORDER BY taken_at_ms",
                (meter, since_ms),
            ).fetchall()

    def last_reading(self, meter: str) -> tuple[int, int, int] | None:
        with self._lock:
            return self._db.execute(
                "SELECT taken_at_ms, import_energy_wh, export_energy_wh FROM readings WHERE meter = ? ORDER BY taken_at_ms DESC LIMIT 1",
                (meter,),
            ).fetchone()

    def prune_readings(self, before_ms: int) -> int:
        with self._transaction() as db:
            return db.execute("DELETE FROM readings WHERE taken_at_ms < ?", (before_ms,)).rowcount

    # -- orders -------------------------------------------------------------------------

    def orders_in_market(self, market_id: int) -> list[OrderRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT nonce, market_id, side, energy_wh, price_per_kwh_minor, state, filled_wh FROM orders WHERE market_id = ? ORDER BY nonce",
                (market_id,),
            ).fetchall()
        return [OrderRow(*r) for r in rows]

    def order_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM orders WHERE state != 'rejected'").fetchone()[0]

    # -- trades and deliveries ------------------------------------------------------------

    def trade_cursor(self) -> int:
        with self._lock:
            return self._meta(self._db, "trade_cursor")

    def record_trades(self, trades: list, cursor: int) -> list[int]:
        """Store newly contracted trades, schedule their deliveries and advance the cursor atomically.

        Returns the ids that were new (a trade seen twice is ignored, so polling is idempotent).
        """
        new_ids = []
        with self._transaction() as db:
            for t in trades:
                inserted = db.execute(
                    "INSERT OR IGNORE INTO trades (trade_id, market_id, side, energy_wh, price_per_kwh_minor, order_nonce, counterparty, received_at_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (t.trade_id, t.market_id, t.side, t.energy_wh, t.price_per_kwh_minor, t.order_nonce, t.counterparty, self._clock_ms()),
                ).rowcount
                if not inserted:
                    continue
                new_ids.append(t.trade_id)
                db.execute(
                    "INSERT INTO deliveries (trade_id, market_id, direction, energy_wh, state) VALUES (?, ?, ?, ?, 'scheduled')",
                    (t.trade_id, t.market_id, "export" if t.side == "sell" else "import", t.energy_wh),
                )
                db.execute(
                    "UPDATE orders SET filled_wh = MIN(energy_wh, filled_wh + ?), "
                    "state = CASE WHEN filled_wh + ? >= energy_wh THEN 'filled' ELSE state END WHERE nonce = ?",
                    (t.energy_wh, t.energy_wh, t.order_nonce),
                )
            if cursor > self._meta(db, "trade_cursor"):
                self._set_meta(db, "trade_cursor", cursor)
        return new_ids

    def traded_wh(self, market_id: int, side: str) -> int:
        with self._lock:
            return self._db.execute(
                "SELECT COALESCE(SUM(energy_wh), 0) FROM trades WHERE market_id = ? AND side = ?", (market_id, side)
            ).fetchone()[0]

    def deliveries(self, *, states: tuple[str, ...], market_id: int | None = None, before_market: int | None = None) -> list[DeliveryRow]:
        query = (
            "SELECT trade_id, market_id, direction, energy_wh, state, start_meter_wh, end_meter_wh, delivered_wh, outcome, detail "
            f"FROM deliveries WHERE state IN ({','.join('?' * len(states))})"
        )
        params: list = list(states)
        if market_id is not None:
            query += " AND market_id = ?"
            params.append(market_id)
        if before_market is not None:
            query += " AND market_id < ?"
            params.append(before_market)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY market_id, trade_id", params).fetchall()
        return [DeliveryRow(*r) for r in rows]

    def mark_running(self, trade_id: int, start_meter_wh: int | None, detail: str | None = None) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = 'running', start_meter_wh = ?, started_at_ms = ?, detail = ? WHERE trade_id = ?",
                (start_meter_wh, self._clock_ms(), detail, trade_id),
            )

    def set_start_meter(self, trade_id: int, start_meter_wh: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE deliveries SET start_meter_wh = ? WHERE trade_id = ? AND start_meter_wh IS NULL", (start_meter_wh, trade_id))

    def mark_failed_start(self, trade_id: int, detail: str) -> None:
        """The router refused or could not be reached: nothing flows, the delivery will report 0 Wh."""
        with self._transaction() as db:
            db.execute("UPDATE deliveries SET state = 'running', outcome = 'failed', detail = ? WHERE trade_id = ?", (detail, trade_id))

    def mark_metered(self, trade_id: int, end_meter_wh: int | None, delivered_wh: int, outcome: str, detail: str | None) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = 'metered', end_meter_wh = ?, delivered_wh = ?, outcome = ?, "
                "detail = COALESCE(?, detail) WHERE trade_id = ?",
                (end_meter_wh, delivered_wh, outcome, detail, trade_id),
            )

    def delivery_totals(self) -> dict[str, int]:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(delivered_wh), 0), "
                "SUM(CASE WHEN state = 'reported' THEN 1 ELSE 0 END), SUM(CASE WHEN outcome = 'failed' THEN 1 ELSE 0 END) FROM deliveries"
            ).fetchone()
        return {"trades": row[0], "delivered_wh": row[1], "reported": row[2] or 0, "failed": row[3] or 0}

    # -- read-only views for `dgc status`, the control socket and the serial console ------

    def order_counts(self) -> dict[str, int]:
        """Orders per state (sending, open, cancelling, filled, cancelled, rejected)."""
        with self._lock:
            return dict(self._db.execute("SELECT state, COUNT(*) FROM orders GROUP BY state").fetchall())

    def open_orders(self, limit: int = 100) -> list[OrderRow]:
        """Orders that may still trade: being sent, resting at the ledger, or being cancelled; oldest market first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT nonce, market_id, side, energy_wh, price_per_kwh_minor, state, filled_wh FROM orders "
                "WHERE state IN ('sending', 'open', 'cancelling') ORDER BY market_id, nonce LIMIT ?",
                (limit,),
            ).fetchall()
        return [OrderRow(*r) for r in rows]

    def recent_trades(self, limit: int = 20) -> list[dict]:
        """The newest trades first, as plain dicts (trade_id, market_id, side, energy_wh, price, order_nonce, counterparty)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT trade_id, market_id, side, energy_wh, price_per_kwh_minor, order_nonce, counterparty, received_at_ms "
                "FROM trades ORDER BY trade_id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        keys = ("trade_id", "market_id", "side", "energy_wh", "price_per_kwh_minor", "order_nonce", "counterparty", "received_at_ms")
        return [dict(zip(keys, r)) for r in rows]

    def trade_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM trades").fetchone()[0]

    def delivery_counts(self) -> dict[str, int]:
        """Deliveries per state (scheduled, running, metered, reported), plus 'failed' for failed outcomes."""
        with self._lock:
            counts = dict(self._db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall())
            counts["failed"] = self._db.execute("SELECT COUNT(*) FROM deliveries WHERE outcome = 'failed'").fetchone()[0]
        return counts

    def recent_deliveries(self, limit: int = 20) -> list[DeliveryRow]:
        """The newest deliveries first (by market, then trade)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT trade_id, market_id, direction, energy_wh, state, start_meter_wh, end_meter_wh, delivered_wh, outcome, detail "
                "FROM deliveries ORDER BY market_id DESC, trade_id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [DeliveryRow(*r) for r in rows]

    def check_writable(self, now_ms: int | None = None) -> None:
        """Commit one tiny write (meta 'health_probe_ms'); raises sqlite3.Error or OSError if the journal
        cannot take writes (disk full, read-only remount, lost SD card). Used by the daemon's health
        check so that a board that can no longer record what it signs stops telling systemd it is well."""
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('health_probe_ms', ?)",
                       (self._clock_ms() if now_ms is None else now_ms,))
