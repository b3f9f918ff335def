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
from ..trade_matching import ListedTrade, OwnOrder, trade_refusal


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
class TradeBatch:
    """What one trade poll changed: the trades newly recorded (each with its delivery scheduled)
    and those newly refused, with the reason (firmware/trade_matching.py), to alarm once each."""

    new_ids: list[int]
    refused: list[tuple[object, str]]


class OrdersMixin:
    # How a message is signed into the bytes the outbox stores and resends: the REST encoding by
    # default; the daemon sets the EVM backend's (EIP-712) from [ledger] kind (G2, issue 9).
    encode_message: Callable[..., SignedMessage] = staticmethod(sign_message)

    # -- outbox -------------------------------------------------------------------------

    def _enqueue(self, db: sqlite3.Connection, build: Callable[[int], dict], signer: Signer, ref: str) -> SignedMessage:
        nonce = self._meta(db, "next_nonce")
        fields = build(nonce)
        message = self.encode_message(fields, signer)
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

    def pending_outbox(self, limit: int = 100, *, due_ms: int | None = None, after_nonce: int = 0,
                       never_sent: bool = False, kinds: tuple[str, ...] | None = None) -> list[OutboxEntry]:
        """Pending messages, oldest first. ``due_ms``: only those whose back-off (next_attempt_ms)
        has passed; ``after_nonce``: only nonces above it (a flush walks past the ones it skips);
        ``never_sent``: only those not tried yet (the queue the outbox has not reached);
        ``kinds``: only these kinds of message."""
        query = ("SELECT nonce, kind, payload, signature, ref, expires_at, attempts FROM outbox "
                 "WHERE state = 'pending' AND nonce > ?")
        params: list = [after_nonce]
        if kinds:
            query += f" AND kind IN ({', '.join('?' * len(kinds))})"
            params += list(kinds)
        if never_sent:
            query += " AND attempts = 0"
        if due_ms is not None:
            query += " AND (next_attempt_ms IS NULL OR next_attempt_ms <= ?)"
            params.append(due_ms)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY nonce LIMIT ?", (*params, limit)).fetchall()
        return [
            OutboxEntry(n, k, SignedMessage(payload=p.encode("ascii"), signature=bytes.fromhex(s)), r, e, a)
            for n, k, p, s, r, e, a in rows
        ]

    def pending_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()[0]

    def unsent_count(self) -> int:
        """Pending messages not tried yet: the queue ahead of the outbox."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending' AND attempts = 0").fetchone()[0]

    def note_attempt(self, nonce: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1, last_attempt_ms = ? WHERE nonce = ?", (self._clock_ms(), nonce))

    def defer_outbox(self, nonce: int, until_ms: int) -> None:
        """Do not send this pending message again before ``until_ms`` (its own back-off, issue 7 j)."""
        with self._transaction() as db:
            db.execute("UPDATE outbox SET next_attempt_ms = ? WHERE nonce = ? AND state = 'pending'", (until_ms, nonce))

    def clear_outbox_backoff(self) -> int:
        """After a whole-ledger outage every message failed alike: let them all go at once again."""
        with self._transaction() as db:
            return db.execute("UPDATE outbox SET next_attempt_ms = NULL WHERE state = 'pending' AND next_attempt_ms IS NOT NULL").rowcount

    def outbox_state(self, nonce: int) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM outbox WHERE nonce = ?", (nonce,)).fetchone()
        return row[0] if row else None

    def expire_outbox(self, entry: OutboxEntry) -> None:
        """A pending message's own expiry passed: the ledger would refuse it now, so it is dropped
        and recorded as 'expired' (issue 7 j), with what that means locally. An expired order may
        still have reached the ledger (an answer lost), so it becomes 'expired', not 'rejected':
        a trade the ledger lists for it still matches (firmware/trade_matching.py)."""
        with self._transaction() as db:
            db.execute("UPDATE outbox SET state = 'expired', answer = ? WHERE nonce = ? AND state = 'pending'",
                       (json.dumps({"status": "expired", "attempts": entry.attempts}, sort_keys=True), entry.nonce))
            if entry.kind == "order":
                db.execute("UPDATE orders SET state = 'expired', detail = 'not acknowledged before it expired' "
                           "WHERE nonce = ? AND state = 'sending'", (entry.nonce,))
            elif entry.kind == "cancel":
                db.execute("UPDATE orders SET state = CASE WHEN filled_wh >= energy_wh THEN 'filled' ELSE 'open' END "
                           "WHERE nonce = ? AND state = 'cancelling'", (entry.message.fields["order_nonce"],))

    def report_signatures(self, trade_id: int) -> int:
        """How many reports were signed for this trade (the first and every re-signing)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox WHERE ref = ?", (f"report:{trade_id}",)).fetchone()[0]

    def latest_report_nonce(self, trade_id: int) -> int | None:
        with self._lock:
            return self._db.execute("SELECT MAX(nonce) FROM outbox WHERE ref = ?", (f"report:{trade_id}",)).fetchone()[0]

    def outbox_counts(self) -> dict[str, int]:
        """Outbox messages per state (pending, acked, rejected, expired)."""
        with self._lock:
            return dict(self._db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())

    def settle_outbox(self, entry: OutboxEntry, *, accepted: bool, answer: dict) -> None:
        """Record the ledger's final answer for a message, and what it means for the local state."""
        state = "acked" if accepted else "rejected"
        with self._transaction() as db:
            db.execute("UPDATE outbox SET state = ?, answer = ? WHERE nonce = ?", (state, json.dumps(answer, sort_keys=True), entry.nonce))
            if entry.kind == "order":
                if accepted:
                    # The immediate fill the ledger reports here is the same energy as the trades
                    # the poll will list (issue 7 a): filled_wh is the larger of the two, never
                    # their sum. The trades alone say what the board may deliver.
                    result = answer.get("result") or {}
                    filled = result.get("filled_wh") if type(result.get("filled_wh")) is int else 0
                    db.execute(
                        "UPDATE orders SET state = CASE WHEN state IN ('cancelling', 'cancelled') THEN state "
                        "WHEN MAX(filled_wh, ?) >= energy_wh THEN 'filled' ELSE 'open' END, "
                        "filled_wh = MIN(energy_wh, MAX(filled_wh, ?)) WHERE nonce = ?",
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
        """:meth:`record_trades_checked`, returning only the ids of the trades newly recorded."""
        return self.record_trades_checked(trades, cursor).new_ids

    def unknown_trades(self, trades: list) -> list:
        """The trades of ``trades`` neither recorded nor refused yet (the ones still to confirm)."""
        with self._lock:
            return [t for t in trades if not self._db.execute(
                "SELECT 1 FROM trades WHERE trade_id = ? UNION ALL SELECT 1 FROM refused_trades WHERE trade_id = ?",
                (t.trade_id, t.trade_id)).fetchone()]

    def record_trades_checked(self, trades: list, cursor: int, refusals: dict | None = None) -> TradeBatch:
        """Store newly contracted trades, schedule their deliveries and advance the cursor atomically.

        A trade is recorded only when it matches one of this board's orders (issue 7 i, the rule
        in firmware/trade_matching.py, judged here inside the transaction so two polls cannot
        both fit into one order's remaining quantity); otherwise it goes to ``refused_trades``
        with the reason and never gets a delivery. A trade seen twice (recorded or refused) is
        ignored, so polling is idempotent and each refusal is reported once. ``refusals`` maps a
        trade id to a reason found before (the ledger's signed record does not hold it,
        scheduler/trade_record.py): that trade is refused with it whatever the orders say.
        """
        refusals = refusals or {}
        new_ids: list[int] = []
        refused: list[tuple[object, str]] = []
        with self._transaction() as db:
            for t in trades:
                known = db.execute("SELECT 1 FROM trades WHERE trade_id = ? UNION ALL "
                                   "SELECT 1 FROM refused_trades WHERE trade_id = ?", (t.trade_id, t.trade_id)).fetchone()
                if known:
                    continue
                order = self._own_order(db, t.order_nonce)
                reason = refusals.get(t.trade_id) or trade_refusal(
                    ListedTrade(t.market_id, t.side, t.energy_wh, t.price_per_kwh_minor, t.order_nonce), order)
                if reason is not None:
                    db.execute(
                        "INSERT INTO refused_trades (trade_id, market_id, side, energy_wh, price_per_kwh_minor, order_nonce, "
                        "counterparty, reason, received_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (t.trade_id, t.market_id, str(t.side), t.energy_wh, t.price_per_kwh_minor, t.order_nonce,
                         str(t.counterparty), reason, self._clock_ms()),
                    )
                    refused.append((t, reason))
                    continue
                db.execute(
                    "INSERT INTO trades (trade_id, market_id, side, energy_wh, price_per_kwh_minor, order_nonce, counterparty, received_at_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (t.trade_id, t.market_id, t.side, t.energy_wh, t.price_per_kwh_minor, t.order_nonce, t.counterparty, self._clock_ms()),
                )
                new_ids.append(t.trade_id)
                self._schedule_delivery(db, t.trade_id, t.market_id, "export" if t.side == "sell" else "import", t.energy_wh)
                matched = order.matched_wh + t.energy_wh
                db.execute(
                    "UPDATE orders SET filled_wh = MAX(filled_wh, ?), "
                    "state = CASE WHEN MAX(filled_wh, ?) >= energy_wh THEN 'filled' ELSE state END WHERE nonce = ?",
                    (matched, matched, t.order_nonce),
                )
            if cursor > self._meta(db, "trade_cursor"):
                self._set_meta(db, "trade_cursor", cursor)
        return TradeBatch(new_ids, refused)

    def _own_order(self, db: sqlite3.Connection, nonce: int) -> OwnOrder | None:
        row = db.execute("SELECT nonce, market_id, side, energy_wh, price_per_kwh_minor, state FROM orders WHERE nonce = ?",
                         (nonce,)).fetchone()
        if row is None:
            return None
        matched = db.execute("SELECT COALESCE(SUM(energy_wh), 0) FROM trades WHERE order_nonce = ?", (nonce,)).fetchone()[0]
        return OwnOrder(*row, matched_wh=matched)

    def refused_trades(self, limit: int = 100) -> list[dict]:
        """Trades the ledger listed that matched no order of this board, newest first."""
        keys = ("trade_id", "market_id", "side", "energy_wh", "price_per_kwh_minor", "order_nonce", "counterparty", "reason",
                "received_at_ms")
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(keys)} FROM refused_trades ORDER BY trade_id DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [dict(zip(keys, r)) for r in rows]

    def refused_trade_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM refused_trades").fetchone()[0]

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
