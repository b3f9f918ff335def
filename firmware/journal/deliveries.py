"""Deliveries: one row per trade, moved through the lifecycle of firmware/delivery_states.py.

Every change of state is one transaction that checks the transition against the declared
table first (``IllegalTransition`` otherwise, and nothing changes) and appends it to
``delivery_transitions``. Metering a slot changes all of its deliveries and stores the slot's
edge counters in ONE transaction, so a kill can never leave half a slot metered.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Callable, Iterable

from .. import delivery_states as ds
from ..messages import SignedMessage, Signer

_DELIVERY_COLUMNS = ("trade_id, market_id, direction, energy_wh, state, start_meter_wh, end_meter_wh, delivered_wh, "
                     "outcome, detail, start_meter_mwh, end_meter_mwh, delivered_mwh")


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
    start_meter_mwh: int | None = None
    end_meter_mwh: int | None = None
    delivered_mwh: int | None = None


@dataclass(frozen=True)
class MeteredDelivery:
    """One delivery's verdict in a slot's metering (see ``meter_slot``)."""

    trade_id: int
    delivered_wh: int
    delivered_mwh: int
    outcome: str
    detail: str | None = None
    start_meter_mwh: int | None = None
    end_meter_mwh: int | None = None


@dataclass(frozen=True)
class DeliveryTimes:
    started_at_ms: int | None
    updated_at_ms: int | None


@dataclass(frozen=True)
class EdgeValue:
    """The interchange counters at one slot edge (end of the slot before, start of the next)."""

    edge_s: int
    import_energy_mwh: int
    export_energy_mwh: int
    method: str  # reading | bracket | interpolated | first
    detail: str | None = None


class DeliveriesMixin:
    # -- transitions --------------------------------------------------------------------------

    def _state_of(self, db: sqlite3.Connection, trade_id: int) -> str | None:
        row = db.execute("SELECT state FROM deliveries WHERE trade_id = ?", (trade_id,)).fetchone()
        return None if row is None else row[0]

    def _move(self, db: sqlite3.Connection, trade_id: int, to_state: str, detail: str | None, **columns) -> str:
        """Check and apply one transition inside the caller's transaction; returns the old state."""
        current = self._state_of(db, trade_id)
        ds.check_transition(trade_id, current, to_state)
        sets = ", ".join(f"{name} = ?" for name in columns)
        db.execute(
            f"UPDATE deliveries SET state = ?, updated_at_ms = ?, detail = COALESCE(?, detail){', ' + sets if sets else ''} "
            "WHERE trade_id = ?",
            (to_state, self._clock_ms(), detail, *columns.values(), trade_id),
        )
        db.execute("INSERT INTO delivery_transitions (trade_id, from_state, to_state, at_ms, detail) VALUES (?, ?, ?, ?, ?)",
                   (trade_id, current, to_state, self._clock_ms(), detail))
        return current

    def transition(self, trade_id: int, to_state: str, detail: str | None = None) -> str:
        """Move one delivery to ``to_state`` (one transaction); returns the state it left.
        Raises IllegalTransition (nothing changed) when the lifecycle does not allow it."""
        extra = {"started_at_ms": self._clock_ms()} if to_state == ds.STARTING else {}
        with self._transaction() as db:
            return self._move(db, trade_id, to_state, detail, **extra)

    def _schedule_delivery(self, db: sqlite3.Connection, trade_id: int, market_id: int, direction: str, energy_wh: int) -> None:
        """A new trade's delivery, inside the transaction that records the trade."""
        db.execute(
            "INSERT INTO deliveries (trade_id, market_id, direction, energy_wh, state, updated_at_ms) VALUES (?, ?, ?, ?, ?, ?)",
            (trade_id, market_id, direction, energy_wh, ds.SCHEDULED, self._clock_ms()),
        )
        db.execute("INSERT INTO delivery_transitions (trade_id, from_state, to_state, at_ms, detail) VALUES (?, NULL, ?, ?, NULL)",
                   (trade_id, ds.SCHEDULED, self._clock_ms()))

    def delivery_history(self, trade_id: int) -> list[tuple[str | None, str, int, str | None]]:
        """(from_state, to_state, at_ms, detail) of one delivery, oldest first."""
        with self._lock:
            return self._db.execute(
                "SELECT from_state, to_state, at_ms, detail FROM delivery_transitions WHERE trade_id = ? ORDER BY id",
                (trade_id,)).fetchall()

    # -- metering a slot ------------------------------------------------------------------------

    def meter_slot(self, verdicts: Iterable[MeteredDelivery], edges: Iterable[EdgeValue]) -> None:
        """Mark every delivery of a slot metered and keep the edge counters used, in ONE
        transaction: all of it or none of it (a kill between two trades meters nothing)."""
        with self._transaction() as db:
            for edge in edges:
                db.execute(
                    "INSERT OR IGNORE INTO meter_edges (edge_s, import_energy_mwh, export_energy_mwh, method, detail) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (edge.edge_s, edge.import_energy_mwh, edge.export_energy_mwh, edge.method, edge.detail))
            for v in verdicts:
                wh = (lambda mwh: None if mwh is None else (mwh + 500) // 1000)
                self._move(db, v.trade_id, ds.METERED, v.detail, delivered_wh=v.delivered_wh,
                           delivered_mwh=v.delivered_mwh, outcome=v.outcome,
                           start_meter_mwh=v.start_meter_mwh, end_meter_mwh=v.end_meter_mwh,
                           start_meter_wh=wh(v.start_meter_mwh), end_meter_wh=wh(v.end_meter_mwh))

    def meter_edge(self, edge_s: int) -> EdgeValue | None:
        with self._lock:
            row = self._db.execute(
                "SELECT edge_s, import_energy_mwh, export_energy_mwh, method, detail FROM meter_edges WHERE edge_s = ?",
                (edge_s,)).fetchone()
        return None if row is None else EdgeValue(*row)

    def meter_edge_near(self, edge_s: int) -> tuple[EdgeValue | None, EdgeValue | None]:
        """The stored edges closest before and after ``edge_s`` (each None when there is none)."""
        cols = "edge_s, import_energy_mwh, export_energy_mwh, method, detail"
        with self._lock:
            before = self._db.execute(f"SELECT {cols} FROM meter_edges WHERE edge_s < ? ORDER BY edge_s DESC LIMIT 1",
                                      (edge_s,)).fetchone()
            after = self._db.execute(f"SELECT {cols} FROM meter_edges WHERE edge_s > ? ORDER BY edge_s LIMIT 1",
                                     (edge_s,)).fetchone()
        return (None if before is None else EdgeValue(*before)), (None if after is None else EdgeValue(*after))

    # -- reports --------------------------------------------------------------------------------

    def enqueue_report(self, trade_id: int, build: Callable[[int], dict], signer: Signer) -> SignedMessage:
        """Sign the delivery report and mark the delivery reported, in one transaction
        (metered -> reported, or reported -> reported when an expired report is signed again)."""
        with self._transaction() as db:
            message = self._enqueue(db, build, signer, ref=f"report:{trade_id}")
            self._move(db, trade_id, ds.REPORTED, None, report_nonce=message.fields["nonce"])
            return message

    # -- views ----------------------------------------------------------------------------------

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

    def delivery_times(self, trade_id: int) -> "DeliveryTimes":
        """When the delivery's START was journalled and when it last changed state (journal clock, ms)."""
        with self._lock:
            row = self._db.execute("SELECT started_at_ms, updated_at_ms FROM deliveries WHERE trade_id = ?",
                                   (trade_id,)).fetchone()
        return DeliveryTimes(*(row or (None, None)))

    def delivery(self, trade_id: int) -> DeliveryRow | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE trade_id = ?", (trade_id,)).fetchone()
        return None if row is None else DeliveryRow(*row)

    def delivery_totals(self) -> dict[str, int]:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(delivered_wh), 0), "
                "SUM(CASE WHEN state = 'reported' THEN 1 ELSE 0 END), SUM(CASE WHEN outcome = 'failed' THEN 1 ELSE 0 END) FROM deliveries"
            ).fetchone()
        return {"trades": row[0], "delivered_wh": row[1], "reported": row[2] or 0, "failed": row[3] or 0}

    def delivery_counts(self) -> dict[str, int]:
        """Deliveries per state (see firmware/delivery_states.py), plus 'failed' for failed outcomes."""
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
