"""The daemon's jobs: the only place where drivers, journal, ledger and decisions meet.

Each public method is one scheduled job. Every job catches what the outside world can throw
at it (a silent meter, a router that NAKs, a ledger that is down or answers garbage), logs an
event, and returns: a failing job never stops the scheduler, and the next run starts from the
journal, not from memory.

Delivery accounting: at each slot edge the controller (1) starts the new slot's transfers, then
(2) takes ONE reading of the certified interchange meter, which is both the end reading of the
slot that just ended and the start reading of the one that began. The router stops each
transfer by itself at its energy target or end time, so a reading a few milliseconds after the
edge attributes at most those milliseconds to the wrong side of the edge, and energy is
conserved across slots.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..config import BoardConfig
from ..forecast import SLOTS_PER_DAY, forecast_net_wh, slot_net_energy
from ..journal import DeliveryRow, Journal, OutboxEntry
from ..market import transfer_power_w
from ..messages import new_fields
from ..policy import CancelOrder, PlaceOrder, allocate_delivered, desired_orders, reconcile_market
from .events import EventLog

log = logging.getLogger(__name__)

REPORT_TTL_SECONDS = 86_400  # a report may wait out a long network outage; expired ones are re-signed
STALE_READINGS_FACTOR = 3  # a house reading older than 3 measure periods is not fresh enough to bid on
MIN_START_SECONDS = 2  # a late start with less than this left in the slot is not attempted
TRADE_ACTIVE = 34  # DGR protocol v1 NAK: a transfer with this trade id is already active
DELIVERY_MARGIN_PERCENT = 5  # transfers are sized to finish in the first 95% of the slot


@dataclass
class Health:
    clock_ok: bool = True
    clock_skew_ms: int | None = None
    ledger_reachable: bool | None = None
    meters_ok: dict[str, bool] = field(default_factory=dict)
    dgr_ok: bool | None = None
    last_reading_ms: dict[str, int] = field(default_factory=dict)


class Controller:
    def __init__(
        self,
        config: BoardConfig,
        *,
        journal: Journal,
        key,
        meters,
        dgr,
        ledger,
        events: EventLog,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config
        self.rules = config.market
        self.journal = journal
        self.key = key
        self.meters = meters
        self.dgr = dgr
        self.ledger = ledger
        self.events = events
        self.clock = clock
        self.health = Health()
        self._flush_lock = threading.Lock()
        self._decide_lock = threading.Lock()
        self._delivery_lock = threading.RLock()
        self._house = config.meter_by_role("house").name
        self._interchange = config.meter_by_role("interchange").name
        # Per-meter plausibility state and the lock that keeps a read and its judgement together.
        self._plausibility_states: dict = {}
        self._plausibility_locks = {m.name: threading.Lock() for m in config.meters}

    # -- helpers ------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock())

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _fields(self, kind: str, nonce: int, ttl_s: int, **body) -> dict:
        return new_fields(
            kind,
            ledger_id=self.config.ledger.ledger_id,
            device_id=self.key.device_id,
            nonce=nonce,
            issued_at=self._now(),
            ttl_s=ttl_s,
            **body,
        )

    def close(self) -> None:
        for closer in (self.meters.close, self.dgr.close, self.journal.close):
            try:
                closer()
            except Exception:  # closing must not mask the reason we are stopping
                log.exception("error while closing")

    # -- start-up -----------------------------------------------------------------------

    def recover(self) -> None:
        """Rebuild from the journal: nonce floor from the ledger, resend the outbox, finish deliveries."""
        from ..ledger.base import LedgerUnavailable

        try:
            account = self.ledger.device_account(self.key.device_id)
            if self.journal.raise_nonce_floor(int(account.get("max_nonce", 0)) + 1):
                self.events.emit("nonce.raised", next_nonce=self.journal.next_nonce())
        except LedgerUnavailable as exc:
            self.events.emit("ledger.unavailable", detail=str(exc))
        pending = self.journal.pending_outbox(limit=10_000)
        running = self.journal.deliveries(states=("scheduled", "running", "metered"))
        self.events.emit("recovered", outbox_pending=len(pending), deliveries_open=len(running), next_nonce=self.journal.next_nonce())
        self.check_clock()
        self.flush_outbox()
        self.deliveries_tick()

    # -- measuring ----------------------------------------------------------------------

    def measure(self) -> None:
        """Read every meter once (those that answered last time first), judge each reading with
        firmware.plausibility and journal only what it accepts, in continuous (re-baselined)
        counter units. Events: alarm.meter (first failure of a run), alarm.meter_implausible
        (each rejected reading), alarm.meter_reset (a reset or swap, re-baselined),
        meter.unavailable (max_failures reached: no order from this meter), meter.back."""
        from ..drivers.meter import MeterReadError

        names = self.meters.read_order() if hasattr(self.meters, "read_order") else self.meters.names
        for name in names:
            try:
                stored = self._read_plausible(name)
            except MeterReadError as exc:
                if exc.kind in ("implausible", "pending"):
                    continue  # alarm.meter_implausible already emitted, or nothing wrong yet
                if self.health.meters_ok.get(name, True):
                    self.events.emit("alarm.meter", meter=name, detail=str(exc))
                self.health.meters_ok[name] = False
                continue
            if not self.health.meters_ok.get(name, True):
                self.events.emit("meter.back", meter=name)
            self.health.meters_ok[name] = True
            self.health.last_reading_ms[name] = stored.taken_at_ms
            self.journal.add_reading(name, stored.taken_at_ms, stored.import_energy_wh, stored.export_energy_wh, stored.power_w)

    def _read_plausible(self, name: str):
        """Read one meter and judge the reading: the reading as it may be stored (re-baselined
        counters), or MeterReadError — the driver's, or kind "implausible" for a rejected value.

        For every reader of a meter (the measure job, delivery metering), so that all of them
        share one plausibility state and one counter scale: a start counter taken from the
        journal and an end counter read here are then in the same units. A per-meter lock keeps
        a read and its judgement together, so two jobs never judge readings out of order.
        """
        from ..drivers.meter import MeterReadError
        from ..plausibility import record_failure

        with self._meter_lock(name):
            try:
                reading = self.meters.read(name)
            except MeterReadError as exc:
                self._judged(name, record_failure(self._meter_state(name), self._meter_limits(name), str(exc)))
                raise
            stored = self._plausible(name, reading)
        if stored is None:
            if self._meter_state(name).last is None:
                raise MeterReadError(f"meter {name}: first baseline not confirmed yet (agreeing readings needed)",
                                     kind="pending", meter=name)
            raise MeterReadError(f"meter {name}: implausible reading rejected (see alarm.meter_implausible)",
                                 kind="implausible", meter=name)
        return stored

    def _meter_lock(self, name: str) -> threading.Lock:
        return self._plausibility_locks[name]

    def _plausible(self, name: str, reading):
        """The reading as it may be stored (counters re-baselined after a meter reset or swap),
        or None when it is implausible: a counter that went backwards, a jump beyond the
        meter's max_power_w over the elapsed time, an impossible power. Rejected readings are
        never stored; see firmware/plausibility.py for the rules."""
        from dataclasses import replace

        from ..plausibility import ACCEPTED, PENDING, REBASELINED, Sample, check_reading

        sample = Sample(reading.taken_at_ms, reading.import_energy_wh, reading.export_energy_wh, reading.power_w)
        verdict = check_reading(self._meter_state(name), sample, self._meter_limits(name))
        self._judged(name, verdict)
        if verdict.outcome == PENDING:
            return None  # nothing judged wrong yet: the first baseline is being confirmed
        if verdict.outcome == REBASELINED:
            self.events.emit("alarm.meter_reset", meter=name, detail=verdict.reason,
                             import_wh=verdict.stored.import_energy_wh, export_wh=verdict.stored.export_energy_wh)
        elif verdict.outcome != ACCEPTED:
            self.events.emit("alarm.meter_implausible", meter=name, detail=verdict.reason)
            return None
        stored = verdict.stored
        return replace(reading, taken_at_ms=stored.taken_at_ms, import_energy_wh=stored.import_energy_wh,
                       export_energy_wh=stored.export_energy_wh)

    def _judged(self, name: str, verdict) -> None:
        """Keep a meter's new plausibility state; announce availability transitions once."""
        self._meter_states()[name] = verdict.state
        if verdict.became_unavailable:
            self.events.emit("meter.unavailable", meter=name, failures=verdict.state.failures,
                             detail=verdict.reason)
        elif verdict.became_available:
            self.events.emit("meter.available", meter=name)

    def _meter_states(self) -> dict:
        """Per-meter plausibility state. Written under the meter's lock (_read_plausible); read
        by the bid jobs, which only ever see a whole, immutable state."""
        return self._plausibility_states

    def _meter_state(self, name: str):
        """A meter's state, seeded from the journal's last stored reading after a restart so
        the first reading of a new run is judged against it."""
        from ..plausibility import Sample, seed

        states = self._meter_states()
        state = states.get(name)
        if state is None:
            last = self.journal.last_reading(name)
            # setdefault: a state another thread stored meanwhile is newer than the journal's
            state = states.setdefault(name, seed(Sample(*last) if last is not None else None))
        return state

    def _meter_limits(self, name: str):
        from ..plausibility import Limits

        meter = next(m for m in self.config.meters if m.name == name)
        return Limits(max_power_w=meter.power_limit_w, max_failures=meter.max_failures)

    def _house_data_problem(self) -> str | None:
        """Why the house meter's data must not be bid on now (unavailable after repeated
        failures, no good reading yet, or too old), or None when it is fresh."""
        from ..plausibility import unavailable_reason

        limit_ms = STALE_READINGS_FACTOR * self.config.cadence.measure_seconds * 1000
        reason = unavailable_reason(self._meter_state(self._house), self._meter_limits(self._house), self._now_ms(), limit_ms)
        return None if reason is None else f"house meter {self._house} unavailable: {reason}"

    def _fresh_house_data(self) -> bool:
        """True only when the house meter's last stored reading is fresh and the meter has not
        failed max_failures times since: never a stale value passed off as fresh."""
        return self._house_data_problem() is None

    # -- bidding ------------------------------------------------------------------------

    def bid(self) -> None:
        """Forecast every open market and bring the house's orders in line (every slot)."""
        self._decide(self.rules.open_markets(self._now()), "bid")

    def review(self) -> None:
        """Review the near markets more often than the full bid, cancelling what no longer fits."""
        now = self._now()
        near = [m for m in self.rules.open_markets(now) if m - now <= self.config.cadence.review_horizon_seconds]
        if near:
            self._decide(near, "review")

    def _decide(self, markets: list[int], why: str) -> None:
        if not self.health.clock_ok:
            self.events.emit("bid.skipped", reason="clock skew beyond bound", skew_ms=self.health.clock_skew_ms)
            return
        problem = self._house_data_problem()
        if problem is not None:
            self.events.emit("bid.skipped", reason=problem)
            return
        if not markets:
            return
        with self._decide_lock:
            slot_s = self.rules.slot_seconds
            since_ms = (self._now() - (self.config.forecast.history_days * SLOTS_PER_DAY + 2) * slot_s) * 1000
            history = slot_net_energy(self.journal.readings(self._house, since_ms), slot_s)
            forecast = forecast_net_wh(
                history, markets, slot_seconds=slot_s,
                history_days=self.config.forecast.history_days, smoothing_percent=self.config.forecast.smoothing_percent,
            )
            if not forecast:
                self.events.emit("bid.skipped", reason="no complete slot of meter history yet")
                return
            desired = desired_orders(forecast, self.rules, self.config.policy, self._battery_soc())
            placed = cancelled = 0
            now = self._now()
            for market_id in markets:
                if not self.rules.gate_open(market_id, now):
                    continue
                traded = {side: self.journal.traded_wh(market_id, side) for side in ("buy", "sell")}
                actions = reconcile_market(
                    market_id, desired.get(market_id), self.journal.orders_in_market(market_id), traded, self.rules.lot_wh
                )
                for action in actions:
                    if isinstance(action, PlaceOrder):
                        self._place(action)
                        placed += 1
                    elif isinstance(action, CancelOrder):
                        self._cancel(action)
                        cancelled += 1
            if placed or cancelled:
                self.events.emit(f"{why}.done", markets=len(markets), placed=placed, cancelled=cancelled)
        self.flush_outbox()

    def _battery_soc(self) -> int | None:
        if self.config.policy.battery_capacity_wh <= 0:
            return None
        from ..drivers.dgr import DgrError

        try:
            return self.dgr.status().soc_percent
        except DgrError as exc:
            self.events.emit("alarm.dgr", detail=f"no state of charge: {exc}")
            return None

    def _place(self, action: PlaceOrder) -> None:
        ttl = self.config.ledger.message_ttl_seconds

        def build(nonce: int) -> dict:
            return self._fields("order", nonce, ttl, market_id=action.market_id, side=action.side,
                                energy_wh=action.energy_wh, price_per_kwh_minor=action.price_per_kwh_minor)

        message = self.journal.enqueue_order(build, self.key)
        f = message.fields
        self.events.emit("order.signed", nonce=f["nonce"], market=f["market_id"], side=f["side"],
                         energy_wh=f["energy_wh"], price=f["price_per_kwh_minor"])

    def _cancel(self, action: CancelOrder) -> None:
        ttl = self.config.ledger.message_ttl_seconds

        def build(nonce: int) -> dict:
            return self._fields("cancel", nonce, ttl, market_id=action.market_id, order_nonce=action.order_nonce)

        message = self.journal.enqueue_cancel(action.order_nonce, build, self.key)
        self.events.emit("cancel.signed", nonce=message.fields["nonce"], order=action.order_nonce,
                         market=action.market_id, reason=action.reason)

    # -- outbox -------------------------------------------------------------------------

    def flush_outbox(self) -> None:
        """Send pending messages oldest first until the ledger stops answering."""
        from ..ledger.base import LedgerUnavailable

        if not self._flush_lock.acquire(blocking=False):
            return  # another thread is flushing; it will see our message
        try:
            while True:
                batch = self.journal.pending_outbox(limit=50)
                if not batch:
                    return
                for entry in batch:
                    self.journal.note_attempt(entry.nonce)
                    try:
                        answer = self.ledger.submit(entry.message)
                    except LedgerUnavailable as exc:
                        if self.health.ledger_reachable is not False:
                            self.events.emit("ledger.unavailable", detail=str(exc), outbox_pending=self.journal.pending_count())
                        self.health.ledger_reachable = False
                        return
                    if self.health.ledger_reachable is False:
                        self.events.emit("ledger.back")
                    self.health.ledger_reachable = True
                    self._settle(entry, answer)
        finally:
            self._flush_lock.release()

    def _settle(self, entry: OutboxEntry, answer) -> None:
        accepted = answer.status == "accepted"
        record = {"status": answer.status, "duplicate": answer.duplicate, "code": answer.code,
                  "detail": answer.detail, "result": answer.result}
        self.journal.settle_outbox(entry, accepted=accepted, answer=record)
        if accepted:
            self.events.emit(f"{entry.kind}.acked", nonce=entry.nonce, duplicate=answer.duplicate,
                             filled_wh=(answer.result or {}).get("filled_wh", "-") if entry.kind == "order" else "-")
            return
        self.events.emit(f"{entry.kind}.rejected", nonce=entry.nonce, code=answer.code, detail=answer.detail)
        if entry.kind == "delivery_report" and answer.code == "expired":
            trade_id = entry.message.fields["trade_id"]
            row = next((d for d in self.journal.deliveries(states=("reported",)) if d.trade_id == trade_id), None)
            if row is not None:
                self._report(row)

    # -- trades -------------------------------------------------------------------------

    def poll_trades(self) -> None:
        from ..ledger.base import LedgerUnavailable

        try:
            trades, cursor = self.ledger.trades_since(self.key.device_id, self.journal.trade_cursor())
        except LedgerUnavailable as exc:
            self.health.ledger_reachable = False
            log.debug("trade poll failed: %s", exc)
            return
        new_ids = self.journal.record_trades(trades, cursor)
        for trade in trades:
            if trade.trade_id in new_ids:
                self.events.emit("trade.contracted", trade=trade.trade_id, market=trade.market_id, side=trade.side,
                                 energy_wh=trade.energy_wh, price=trade.price_per_kwh_minor, counterparty=trade.counterparty[:12])

    # -- clock guard ----------------------------------------------------------------------

    def check_clock(self) -> None:
        from ..ledger.base import LedgerUnavailable

        try:
            before = self._now_ms()
            server_ms = self.ledger.server_time_ms()
            after = self._now_ms()
        except LedgerUnavailable as exc:
            log.debug("clock check failed: %s", exc)
            return
        skew = server_ms - (before + after) // 2
        ok = abs(skew) <= self.config.ledger.max_clock_skew_ms
        if not ok:
            self.events.emit("alarm.clock", skew_ms=skew, bound_ms=self.config.ledger.max_clock_skew_ms,
                             action="bidding and delivery stopped")
        elif not self.health.clock_ok:
            self.events.emit("clock.ok", skew_ms=skew)
        self.health.clock_ok, self.health.clock_skew_ms = ok, skew

    # -- delivery -----------------------------------------------------------------------

    def slot_edge(self) -> None:
        """Runs at each slot boundary: start this slot's transfers first, then meter and report."""
        self.deliveries_tick()

    def deliveries_tick(self) -> None:
        with self._delivery_lock:
            now = self._now()
            current = self.rules.slot_start(now)
            started = self._start_due(current, now)
            self._stop_ended(current)
            open_rows = self.journal.deliveries(states=("running",))
            needs_meter = [d for d in open_rows if d.start_meter_wh is None or d.market_id < current]
            if started or needs_meter:
                self._meter_deliveries(current)
            for row in self.journal.deliveries(states=("metered",)):
                self._report(row)
        self.flush_outbox()

    def _start_due(self, current: int, now: int) -> int:
        """START the transfers of the slot that began; fail those that can no longer start.

        A router with a latched hardware fault refuses with NAK 32: it is sent RESUME once — the
        router acknowledges only faults whose cause has gone, so a persisting one refuses again —
        and the START once more. Safe mode (NAK 31) is not lifted here: the DGC's own link-loss
        handling lifts it when the link is back (``heartbeat``), and one an operator commanded
        must stay until the operator resumes. A lost link fails the row it
        happened on (the driver has already sent its best-effort SAFE; if that was lost, the
        router's watchdog makes it safe) and ends this round: the other rows stay scheduled and
        the next tick, two seconds on, tries them again instead of waiting out the retries of a
        dead line for each of them now.
        """
        from ..drivers.dgr import DgrError, DgrLinkError, DgrNak

        started = 0
        for row in self.journal.deliveries(states=("scheduled",), before_market=current + 1):
            end_at = self.rules.slot_end(row.market_id)
            if row.market_id < current or end_at - now < MIN_START_SECONDS:
                self.journal.mark_failed_start(row.trade_id, "slot passed before the transfer could start")
                self.events.emit("delivery.missed", trade=row.trade_id, market=row.market_id)
                continue
            if not self.health.clock_ok:
                self.journal.mark_failed_start(row.trade_id, "clock skew beyond bound: delivery not started")
                self.events.emit("delivery.refused", trade=row.trade_id, reason="clock skew")
                continue
            # Aim to finish a little before the slot ends: the router stops at the energy target,
            # so the contracted energy is delivered in full even if the start was a few ms late.
            usable_s = max(1, int((end_at - self.clock()) * (100 - DELIVERY_MARGIN_PERCENT) / 100))
            power_w = transfer_power_w(row.energy_wh, usable_s)
            try:
                try:
                    self.dgr.start_transfer(row.trade_id, row.direction, power_w, end_at, row.energy_wh)
                except DgrNak as refused:
                    if refused.name != "FAULT":
                        raise
                    status = self.dgr.resume()
                    self.events.emit("dgr.resumed", trade=row.trade_id, was=refused.name, mode=status.mode,
                                     faults=",".join(status.faults) or "-")
                    if status.mode in ("safe", "fault"):
                        raise
                    self.dgr.start_transfer(row.trade_id, row.direction, power_w, end_at, row.energy_wh)
            except DgrNak as exc:
                if exc.code == TRADE_ACTIVE:
                    # Started before a crash that came between the router's ACK and our journal.
                    self.journal.mark_running(row.trade_id, None, "already running at the router after a restart")
                    self.events.emit("delivery.resumed", trade=row.trade_id, market=row.market_id)
                    started += 1
                    continue
                self.journal.mark_failed_start(row.trade_id, f"router: {exc}")
                self.events.emit("delivery.failed", trade=row.trade_id, detail=str(exc))
                continue
            except DgrLinkError as exc:
                self.journal.mark_failed_start(row.trade_id, f"router link lost: {exc}")
                self.events.emit("delivery.failed", trade=row.trade_id, detail="router link lost",
                                 safe_confirmed=exc.safe_confirmed)
                break
            except DgrError as exc:
                self.journal.mark_failed_start(row.trade_id, f"router: {exc}")
                self.events.emit("delivery.failed", trade=row.trade_id, detail=str(exc))
                self._safe_state()
                continue
            self.journal.mark_running(row.trade_id, None)
            started += 1
            self.events.emit("delivery.started", trade=row.trade_id, market=row.market_id, direction=row.direction,
                             power_w=power_w, energy_wh=row.energy_wh, lateness_ms=self._now_ms() - row.market_id * 1000)
        return started

    def _stop_ended(self, current: int) -> None:
        """STOP the transfers of slots that have ended. The router stops each one by itself at its
        energy target or end time; the explicit STOP (harmless when it already ended) makes sure,
        and the read-back confirms the router agrees before the slot is metered."""
        from ..drivers.dgr import DgrError

        for row in self.journal.deliveries(states=("running",), before_market=current):
            if row.outcome == "failed" or row.end_meter_wh is not None:
                continue
            try:
                self.dgr.stop_transfer(row.trade_id)
            except DgrError as exc:
                self.events.emit("alarm.dgr", detail=f"stop of trade {row.trade_id} not confirmed: {exc}")

    def _meter_deliveries(self, current: int) -> None:
        from ..drivers.meter import MeterReadError

        try:
            reading = self._read_plausible(self._interchange)
        except MeterReadError as exc:
            self.events.emit("alarm.meter", meter=self._interchange, detail=f"delivery metering postponed: {exc}")
            return
        counters = {"export": reading.export_energy_wh, "import": reading.import_energy_wh}
        running = self.journal.deliveries(states=("running",))
        for row in running:
            if row.start_meter_wh is None and row.outcome != "failed":
                self.journal.set_start_meter(row.trade_id, self._start_counter(row, reading, counters[row.direction]))
        ended = [d for d in self.journal.deliveries(states=("running",)) if d.market_id < current]
        groups: dict[tuple[int, str], list[DeliveryRow]] = {}
        for row in ended:
            groups.setdefault((row.market_id, row.direction), []).append(row)
        for (market_id, direction), rows in groups.items():
            flowing = [r for r in rows if r.outcome != "failed" or r.start_meter_wh is not None]
            start = min((r.start_meter_wh for r in flowing if r.start_meter_wh is not None), default=counters[direction])
            total = counters[direction] - start
            shares = allocate_delivered(total, [r.energy_wh for r in rows])
            for row, share in zip(rows, shares):
                outcome = "delivered" if share >= row.energy_wh and row.outcome != "failed" else "failed"
                self.journal.mark_metered(row.trade_id, counters[direction], share, outcome, None)
                self.events.emit("delivery.metered", trade=row.trade_id, market=market_id, direction=direction,
                                 contracted_wh=row.energy_wh, delivered_wh=share, outcome=outcome)

    def _start_counter(self, row: DeliveryRow, reading, counter_now: int) -> int:
        """The interchange counter at the start of a delivery.

        Normally the reading taken right after the edge's START commands. After a restart in the
        middle of a slot that reading is late, so the last reading the measure job journalled
        at or before the slot's start is used instead: transfers are sized to finish within the
        first 95 % of their slot, so nothing flows between that reading and the edge unless the
        measure period is longer than that margin.
        """
        late_ms = reading.taken_at_ms - row.market_id * 1000
        if late_ms <= 1000:
            return counter_now
        history = self.journal.readings(self._interchange, (row.market_id - self.rules.slot_seconds) * 1000)
        before = [r for r in history if r[0] <= row.market_id * 1000]
        if not before:
            return counter_now
        _, import_wh, export_wh = before[-1]
        return export_wh if row.direction == "export" else import_wh

    def _report(self, row: DeliveryRow) -> None:
        delivered = row.delivered_wh or 0
        status = "delivered" if row.outcome == "delivered" else "failed"

        def build(nonce: int) -> dict:
            return self._fields("delivery_report", nonce, REPORT_TTL_SECONDS, trade_id=row.trade_id, market_id=row.market_id,
                                role="seller" if row.direction == "export" else "buyer", energy_wh=delivered, status=status)

        message = self.journal.enqueue_report(row.trade_id, build, self.key)
        self.events.emit("report.signed", nonce=message.fields["nonce"], trade=row.trade_id, energy_wh=delivered, status=status)

    def heartbeat(self) -> None:
        """Feed the router's watchdog from the scheduler's own cycle (a hung scheduler lets the
        router go safe by itself), and act on what the answer, or its absence, says.

        Lost link (the driver's retries are exhausted and it has sent one best-effort SAFE; if
        even that was lost, the router's watchdog makes it safe within its timeout): every
        delivery of this slot still expected to flow is marked failed, so the slot-end metering
        reports it as failed with whatever did flow — except one the router had already reported
        ended at its energy target, which the meter will show delivered. Rows are selected and
        marked under the delivery lock, so a slot edge metering them meanwhile is never undone.

        Link back: the router may still run a transfer that no healthy delivery owns (a START
        whose read-back was lost on the failing line); it is stopped, so nothing flows that the
        journal does not expect. The safe mode the lost link caused (the driver's SAFE or the
        watchdog) is then lifted with RESUME, or every later delivery would be refused. Until
        both succeed the link counts as down and the next heartbeat tries again.
        """
        from ..drivers.dgr import DgrError, DgrLinkError

        try:
            self.dgr.heartbeat()
        except DgrError as exc:
            if self.health.dgr_ok is not False:
                self.events.emit("alarm.dgr", detail=str(exc))
            self.health.dgr_ok = False
            current = self.rules.slot_start(self._now())
            failed = []
            with self._delivery_lock:
                for row in self.journal.deliveries(states=("running",), market_id=current):
                    end = self.dgr.transfer_end(row.trade_id)
                    if row.outcome == "failed" or (end is not None and end.args.get("reason") == "target"):
                        continue
                    self.journal.mark_failed_start(row.trade_id, f"router link lost: {exc}")
                    self.events.emit("delivery.failed", trade=row.trade_id, detail="router link lost")
                    failed.append(row.trade_id)
            if failed and not (isinstance(exc, DgrLinkError) and exc.safe_confirmed):
                self._safe_state()
            return
        if self.health.dgr_ok is False:
            with self._delivery_lock:
                expected = {d.trade_id for d in self.journal.deliveries(states=("scheduled", "running"))
                            if d.outcome != "failed"}
                try:
                    status = self.dgr.status()
                    orphans = [t.trade_id for t in status.transfers if t.trade_id not in expected]
                    for trade_id in orphans:
                        status = self.dgr.stop_transfer(trade_id)
                    if status.mode == "safe":
                        status = self.dgr.resume()
                except DgrError as exc:
                    self.events.emit("alarm.dgr", detail=f"link back but the router's transfers not checked: {exc}")
                    return
            self.events.emit("dgr.back", mode=status.mode, faults=",".join(status.faults) or "-",
                             stopped=",".join(map(str, orphans)) or "-")
        self.health.dgr_ok = True
        self._router_events()

    def _router_events(self) -> None:
        """Turn the router's unsolicited events into status lines (faults as alarms).

        An END before the target for a reason of the router's own (safe mode, a latched fault,
        its heartbeat watchdog) fails that delivery at once, with the reason in the log; the
        slot-end metering then reports it as failed with what did flow. Only a row still running
        is marked, under the delivery lock, so a slot edge that metered it is never undone.
        A watchdog trip seen while the link works (the scheduler stalled longer than the
        router's timeout) is lifted with RESUME: the DGC is demonstrably alive again."""
        from ..drivers.dgr import DgrError

        for event in self.dgr.drain_events():
            args = {k: v for k, v in event.args.items() if k in ("trade_id", "reason", "moved_wh", "code", "mode", "was")}
            if event.kind == "FAULT":
                self.events.emit("alarm.dgr_fault", **args)
                if event.args.get("code") == "heartbeat_lost":
                    try:
                        status = self.dgr.resume()
                        self.events.emit("dgr.resumed", was="heartbeat_lost", mode=status.mode,
                                         faults=",".join(status.faults) or "-")
                    except DgrError as exc:
                        self.events.emit("alarm.dgr", detail=f"RESUME after the watchdog trip failed: {exc}")
            elif event.kind == "END":
                self.events.emit("dgr.transfer_ended", **args)
                reason, trade = event.args.get("reason"), event.args.get("trade_id", "")
                if reason in ("safe", "fault", "heartbeat") and trade.isdigit():
                    with self._delivery_lock:
                        row = next((d for d in self.journal.deliveries(states=("running",))
                                    if d.trade_id == int(trade) and d.outcome != "failed"), None)
                        if row is not None:
                            self.journal.mark_failed_start(row.trade_id, f"router ended the transfer: {reason}")
                            self.events.emit("delivery.failed", trade=row.trade_id, detail=f"router ended the transfer: {reason}")
            elif event.kind == "BOOT":
                self.events.emit("dgr.rebooted")

    def _safe_state(self) -> None:
        from ..drivers.dgr import DgrError

        try:
            status = self.dgr.safe_state()
            self.events.emit("dgr.safe_state", mode=status.mode)
        except DgrError as exc:
            self.events.emit("alarm.dgr", detail=f"safe state not confirmed: {exc}")

    def operator_safe_state(self) -> tuple[bool, str]:
        """The operator's `safe` (serial console or control socket): send the DGR to its safe state now.

        Returns (confirmed, detail) instead of raising, because the caller is a person at a
        terminal who needs the answer in words. Running deliveries are not marked failed here:
        the next metering at the slot edge records what the interchange meter saw, and the
        router refuses new transfers until RESUME or a new HELLO (docs/dgr-protocol.md).
        """
        from ..drivers.dgr import DgrError

        self.events.emit("dgr.safe_requested", by="operator")
        try:
            status = self.dgr.safe_state()
        except DgrError as exc:
            self.events.emit("alarm.dgr", detail=f"safe state not confirmed: {exc}")
            return False, str(exc)
        self.events.emit("dgr.safe_state", mode=status.mode)
        return True, f"router mode {status.mode}, {len(status.transfers)} transfers active"
