"""Orders, the outbox of signed messages, and trades.

A nonce is taken, the message signed, stored in the outbox and its local effect recorded in ONE
transaction (see core.py). A trade is journalled with its delivery scheduled in the same
transaction, so polling is idempotent and no trade is ever without its delivery.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Callable

from ..messages import SignedMessage, Signer, sign_message


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


class OrdersMixin:
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

    # -- trades -------------------------------------------------------------------------

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
                self._schedule_delivery(db, t.trade_id, t.market_id, "export" if t.side == "sell" else "import", t.energy_wh)
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
