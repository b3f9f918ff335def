"""Deliveries: start each trade's transfer at its slot, stop the ended ones, meter the slot on
the certified interchange meter, and sign the delivery report.

Delivery accounting: at each slot edge the job (1) starts the new slot's transfers, then
(2) takes ONE reading of the certified interchange meter, which is both the end reading of the
slot that just ended and the start reading of the one that began. The router stops each
transfer by itself at its energy target or end time, so a reading a few milliseconds after the
edge attributes at most those milliseconds to the wrong side of the edge, and energy is
conserved across slots.
"""

from __future__ import annotations

from typing import Callable

from ..journal import DeliveryRow
from ..market import transfer_power_w
from ..policy import allocate_delivered
from .context import Context
from .metering import Metering
from .router_link import RouterLink

REPORT_TTL_SECONDS = 86_400  # a report may wait out a long network outage; expired ones are re-signed
MIN_START_SECONDS = 2  # a late start with less than this left in the slot is not attempted
TRADE_ACTIVE = 34  # DGR protocol v1 NAK: a transfer with this trade id is already active
DELIVERY_MARGIN_PERCENT = 5  # transfers are sized to finish in the first 95% of the slot


class Deliveries:
    def __init__(self, ctx: Context, metering: Metering, router: RouterLink, *, flush_outbox: Callable[[], None]):
        self.ctx = ctx
        self.metering = metering
        self.router = router
        self._flush_outbox = flush_outbox

    def tick(self) -> None:
        ctx = self.ctx
        journal = ctx.journal
        with ctx.delivery_lock:
            now = ctx.now()
            current = ctx.rules.slot_start(now)
            started = self._start_due(current, now)
            self._stop_ended(current)
            open_rows = journal.deliveries(states=("running",))
            needs_meter = [d for d in open_rows if d.start_meter_wh is None or d.market_id < current]
            if started or needs_meter:
                self._meter_deliveries(current)
            for row in journal.deliveries(states=("metered",)):
                self.report(row)
        self._flush_outbox()

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

        ctx = self.ctx
        journal, dgr, events = ctx.journal, ctx.dgr, ctx.events
        started = 0
        for row in journal.deliveries(states=("scheduled",), before_market=current + 1):
            end_at = ctx.rules.slot_end(row.market_id)
            if row.market_id < current or end_at - now < MIN_START_SECONDS:
                journal.mark_failed_start(row.trade_id, "slot passed before the transfer could start")
                events.emit("delivery.missed", trade=row.trade_id, market=row.market_id)
                continue
            if not ctx.health.clock_ok:
                journal.mark_failed_start(row.trade_id, "clock skew beyond bound: delivery not started")
                events.emit("delivery.refused", trade=row.trade_id, reason="clock skew")
                continue
            # Aim to finish a little before the slot ends: the router stops at the energy target,
            # so the contracted energy is delivered in full even if the start was a few ms late.
            usable_s = max(1, int((end_at - ctx.clock()) * (100 - DELIVERY_MARGIN_PERCENT) / 100))
            power_w = transfer_power_w(row.energy_wh, usable_s)
            try:
                try:
                    dgr.start_transfer(row.trade_id, row.direction, power_w, end_at, row.energy_wh)
                except DgrNak as refused:
                    if refused.name != "FAULT":
                        raise
                    status = dgr.resume()
                    events.emit("dgr.resumed", trade=row.trade_id, was=refused.name, mode=status.mode,
                                faults=",".join(status.faults) or "-")
                    if status.mode in ("safe", "fault"):
                        raise
                    dgr.start_transfer(row.trade_id, row.direction, power_w, end_at, row.energy_wh)
            except DgrNak as exc:
                if exc.code == TRADE_ACTIVE:
                    # Started before a crash that came between the router's ACK and our journal.
                    journal.mark_running(row.trade_id, None, "already running at the router after a restart")
                    events.emit("delivery.resumed", trade=row.trade_id, market=row.market_id)
                    started += 1
                    continue
                journal.mark_failed_start(row.trade_id, f"router: {exc}")
                events.emit("delivery.failed", trade=row.trade_id, detail=str(exc))
                continue
            except DgrLinkError as exc:
                journal.mark_failed_start(row.trade_id, f"router link lost: {exc}")
                events.emit("delivery.failed", trade=row.trade_id, detail="router link lost",
                            safe_confirmed=exc.safe_confirmed)
                break
            except DgrError as exc:
                journal.mark_failed_start(row.trade_id, f"router: {exc}")
                events.emit("delivery.failed", trade=row.trade_id, detail=str(exc))
                self.router.safe_state()
                continue
            journal.mark_running(row.trade_id, None)
            started += 1
            events.emit("delivery.started", trade=row.trade_id, market=row.market_id, direction=row.direction,
                        power_w=power_w, energy_wh=row.energy_wh, lateness_ms=ctx.now_ms() - row.market_id * 1000)
        return started

    def _stop_ended(self, current: int) -> None:
        """STOP the transfers of slots that have ended. The router stops each one by itself at its
        energy target or end time; the explicit STOP (harmless when it already ended) makes sure,
        and the read-back confirms the router agrees before the slot is metered."""
        from ..drivers.dgr import DgrError

        ctx = self.ctx
        for row in ctx.journal.deliveries(states=("running",), before_market=current):
            if row.outcome == "failed" or row.end_meter_wh is not None:
                continue
            try:
                ctx.dgr.stop_transfer(row.trade_id)
            except DgrError as exc:
                ctx.events.emit("alarm.dgr", detail=f"stop of trade {row.trade_id} not confirmed: {exc}")

    def _meter_deliveries(self, current: int) -> None:
        from ..drivers.meter import MeterReadError

        ctx = self.ctx
        journal, events = ctx.journal, ctx.events
        interchange = self.metering.interchange
        try:
            reading = self.metering.read_plausible(interchange)
        except MeterReadError as exc:
            events.emit("alarm.meter", meter=interchange, detail=f"delivery metering postponed: {exc}")
            return
        counters = {"export": reading.export_energy_wh, "import": reading.import_energy_wh}
        running = journal.deliveries(states=("running",))
        for row in running:
            if row.start_meter_wh is None and row.outcome != "failed":
                journal.set_start_meter(row.trade_id, self._start_counter(row, reading, counters[row.direction]))
        ended = [d for d in journal.deliveries(states=("running",)) if d.market_id < current]
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
                journal.mark_metered(row.trade_id, counters[direction], share, outcome, None)
                events.emit("delivery.metered", trade=row.trade_id, market=market_id, direction=direction,
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
        history = self.ctx.journal.readings(self.metering.interchange, (row.market_id - self.ctx.rules.slot_seconds) * 1000)
        before = [r for r in history if r[0] <= row.market_id * 1000]
        if not before:
            return counter_now
        _, import_wh, export_wh = before[-1]
        return export_wh if row.direction == "export" else import_wh

    def report(self, row: DeliveryRow) -> None:
        """Sign the delivery report and mark the delivery reported (one journal transaction)."""
        ctx = self.ctx
        delivered = row.delivered_wh or 0
        status = "delivered" if row.outcome == "delivered" else "failed"

        def build(nonce: int) -> dict:
            return ctx.fields("delivery_report", nonce, REPORT_TTL_SECONDS, trade_id=row.trade_id, market_id=row.market_id,
                              role="seller" if row.direction == "export" else "buyer", energy_wh=delivered, status=status)

        message = ctx.journal.enqueue_report(row.trade_id, build, ctx.key)
        ctx.events.emit("report.signed", nonce=message.fields["nonce"], trade=row.trade_id, energy_wh=delivered, status=status)

    def resign_report(self, trade_id: int) -> None:
        """The ledger rejected a report as expired: sign it again, if the delivery is still reported."""
        row = next((d for d in self.ctx.journal.deliveries(states=("reported",)) if d.trade_id == trade_id), None)
        if row is not None:
            self.report(row)
