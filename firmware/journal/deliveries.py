"""Deliveries: one row per trade, from scheduled to reported."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Callable

from ..messages import SignedMessage, Signer

_DELIVERY_COLUMNS = "trade_id, market_id, direction, energy_wh, state, start_meter_wh, end_meter_wh, delivered_wh, outcome, detail"


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


class DeliveriesMixin:
    def _schedule_delivery(self, db: sqlite3.Connection, trade_id: int, market_id: int, direction: str, energy_wh: int) -> None:
        """A new trade's delivery, inside the transaction that records the trade."""
        db.execute(
            "INSERT INTO deliveries (trade_id, market_id, direction, energy_wh, state) VALUES (?, ?, ?, ?, 'scheduled')",
            (trade_id, market_id, direction, energy_wh),
        )

    def enqueue_report(self, trade_id: int, build: Callable[[int], dict], signer: Signer) -> SignedMessage:
        """Sign the delivery report and mark the delivery reported, in one transaction."""
        with self._transaction() as db:
            message = self._enqueue(db, build, signer, ref=f"report:{trade_id}")
            db.execute("UPDATE deliveries SET state = 'reported', report_nonce = ? WHERE trade_id = ?", (message.fields["nonce"], trade_id))
            return message

    def deliveries(self, *, states: tuple[str, ...], market_id: int | None = None, before_market: int | None = None) -> list[DeliveryRow]:
        query = f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE state IN ({','.join('?' * len(states))})"
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
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries ORDER BY market_id DESC, trade_id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [DeliveryRow(*r) for r in rows]
