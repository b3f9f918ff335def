"""Deliveries: start each trade's transfer at its slot, stop the ended ones, meter each slot on
the certified interchange meter, and sign the delivery reports.

Every step is a transition of the lifecycle declared in firmware/delivery_states.py, each one
journal transaction; an illegal one is logged and alarmed (``alarm.delivery_transition``) and
changes nothing. The rules of metering (one counter value per slot edge, late edge readings,
allocation, net-only meters) are pure, in firmware/slot_metering.py; docs/delivery.md tells the
whole story.

At each slot edge the job (1) STARTs the new slot's transfers, then (2) reads the interchange
meter once: that reading is the edge between the slot that ended and the one that began, and
(3) meters every ended slot in ONE transaction. The intent to START is journalled before the
command goes out (``starting``), so after a kill between the router's acknowledgement and the
journal the router is asked about the trade, and the transfer is never started twice.
"""

from __future__ import annotations

import logging
from typing import Callable

from .. import delivery_states as ds
from ..journal import DeliveryRow
from ..journal.deliveries import EdgeValue, MeteredDelivery
from ..market import transfer_power_w
from ..slot_metering import Counters, Edge, SlotRow, allocate_slot, edge_value
from .context import Context
from .metering import Metering
from .router_link import LINK_LOST, MIN_ROUTER_WATCHDOG_S, RouterLink

log = logging.getLogger(__name__)

REPORT_TTL_SECONDS = 86_400  # a report may wait out a long network outage; expired ones are re-signed
MIN_START_SECONDS = 2  # a late start with less than this left in the slot is not attempted
TRADE_ACTIVE = 34  # DGR protocol v1 NAK: a transfer with this trade id is already active
DELIVERY_MARGIN_PERCENT = 5  # transfers are sized to finish in the first 95% of the slot
# The details an unconfirmed START leaves on its delivery (after a restart; at the slot's metering)
UNCONFIRMED_START_DETAILS = ("start not confirmed", "start never confirmed")


def _link_lost(detail: str | None) -> bool:
    """Whether the delivery was interrupted by a lost link: the router's watchdog, not an END
    we heard, ended whatever ran, so it may have flowed for that long after."""
    return LINK_LOST in (detail or "")


class Deliveries:
    def __init__(self, ctx: Context, metering: Metering, router: RouterLink, *, flush_outbox: Callable[[], None]):
        self.ctx = ctx
        self.metering = metering
        self.router = router
        self._flush_outbox = flush_outbox
        meter = next(m for m in ctx.config.meters if m.name == metering.interchange)
        self.net_only = bool(getattr(meter, "net_only", False))
        self.tolerance_wh = int(getattr(meter, "tolerance_wh", 0))
        self._deferred: set[int] = set()  # trades whose start the clock guard deferred (announced once)
        self._asked: set[int] = set()  # trades whose moved energy this process asked the router for

    # -- the job ------------------------------------------------------------------------------

    def tick(self, *, flush_outbox: bool = True) -> None:
        """Resolve, start, stop, meter and report what is due, then send the reports (unless
        ``flush_outbox`` is False: the recovery leaves sending to the outbox job)."""
        ctx = self.ctx
        with ctx.delivery_lock:
            now = ctx.now()
            current = ctx.rules.slot_start(now)
            self._resolve_starting(current)
            started = self._start_due(current, now)
            if ctx.health.clock_ok:
                self._slot_ends(current, now, started)
        if flush_outbox:
            self._flush_outbox()

    def _slot_ends(self, current: int, now: int, started: int) -> None:
        """STOP, meter and report the ended slots. Only with a good clock: by a wrong one a
        running slot could look ended (the router stops each transfer by itself at its end
        time anyway; sim finding F5)."""
        ctx = self.ctx
        journal = ctx.journal
        self._stop_ended(current)
        ended = journal.deliveries(states=ds.OPEN, before_market=current)
        if started or ended:
            self._read_edge()
        for market_id in sorted({row.market_id for row in ended}):
            self._meter_slot(market_id)
        # A report goes out only once its slot has ended on the ledger's clock too: a board
        # clock ahead by less than the skew bound would otherwise send it "too early", and
        # the ledger's refusal is final.
        report_after_s = -(-ctx.config.ledger.max_clock_skew_ms // 1000) + 1
        for row in journal.deliveries(states=(ds.METERED,)):
            if now >= ctx.rules.slot_end(row.market_id) + report_after_s:
                self.report(row)

    # -- transitions --------------------------------------------------------------------------

    def _move(self, row: DeliveryRow, to_state: str, detail: str | None = None) -> bool:
        """One transition (one journal transaction). An illegal one is logged and alarmed,
        and nothing changes: the journal stays the truth, never silently rewritten."""
        from ..delivery_states import IllegalTransition

        try:
            self.ctx.journal.transition(row.trade_id, to_state, detail)
            return True
        except IllegalTransition as exc:
            log.error("%s", exc)
            self.ctx.events.emit("alarm.delivery_transition", trade=row.trade_id, wanted=to_state, detail=str(exc))
            return False

    # -- starting -----------------------------------------------------------------------------

    def _resolve_starting(self, current: int) -> None:
        """Deliveries left ``starting`` (the process died between journalling the intent and
        the router's answer, or the answer never came): ask the router about each trade first.
        Active there: running. Unknown to it (asked at once: ``_never_heard_of``): refused, it
        never ran. Otherwise it may have run and ended, so it is never started a second time;
        it is metered like an interrupted transfer (the meter says what flowed).
        A router that cannot be asked now is asked again at the next tick."""
        from ..drivers.dgr import DgrError

        rows = self.ctx.journal.deliveries(states=(ds.STARTING,), before_market=current + 1)
        if not rows:
            return
        try:
            status = self.ctx.dgr.status()
        except DgrError as exc:
            self.ctx.events.emit("alarm.dgr", detail=f"transfers being started not confirmed: {exc}")
            return
        active = {t.trade_id for t in status.transfers}
        for row in rows:
            if row.trade_id in active:
                if self._move(row, ds.RUNNING, "running at the router after a restart"):
                    self.ctx.events.emit("delivery.resumed", trade=row.trade_id, market=row.market_id)
            elif self._never_heard_of(row.trade_id):
                if self._move(row, ds.REFUSED, "start not confirmed; the router never heard of it (STOP: was=unknown): "
                                               "not started again"):
                    self.ctx.events.emit("delivery.failed", trade=row.trade_id,
                                         detail="start never reached the router; not started again")
            elif self._move(row, ds.INTERRUPTED, f"{UNCONFIRMED_START_DETAILS[0]} and not active at the router: not started again"):
                self.ctx.events.emit("delivery.failed", trade=row.trade_id, detail="start not confirmed; not started again")

    def _never_heard_of(self, trade_id: int) -> bool:
        """Ask the router (a harmless STOP) whether it ever had this trade's transfer, seconds
        after the unconfirmed START: ``was=unknown`` now means the frame never reached it (or was
        refused). Asked at once, not at metering: a router that reboots later in the slot knows
        none of the slot's transfers, and its answer then proves nothing (sim seed 5494). A STOP
        answering ``was=ended`` tells what it moved instead; no answer leaves the doubt."""
        from ..drivers.dgr import DgrError

        unknown = getattr(self.ctx.dgr, "transfer_unknown", None)
        if unknown is None:
            return False
        try:
            self.ctx.dgr.stop_transfer(trade_id)
        except DgrError as exc:  # asked again at metering (_router_counts)
            log.info("asking the router about unconfirmed trade %d: %s", trade_id, exc)
            return False
        self._asked.add(trade_id)
        return unknown(trade_id)

    def _start_due(self, current: int, now: int) -> int:
        """START the transfers of the slot that began; refuse those that can no longer start.

        A router with a latched hardware fault refuses with NAK 32: it is sent RESUME once — the
        router acknowledges only faults whose cause has gone, so a persisting one refuses again —
        and the START once more. Safe mode (NAK 31) is not lifted here (router_link decides
        when safe mode may be lifted; an operator's never). A lost link interrupts the row it
        happened on (the driver has already sent its best-effort SAFE; if that was lost, the
        router's watchdog makes it safe) and ends this round: the other rows stay scheduled and
        the next tick tries them again, with the power recomputed for the time left. While the
        clock guard says the clock is bad a start is deferred, not refused: it is tried again
        when the clock is good, as long as its slot leaves time for it.
        """
        from ..drivers.dgr import DgrError, DgrLinkError, DgrNak

        ctx = self.ctx
        journal, dgr, events = ctx.journal, ctx.dgr, ctx.events
        started = 0
        for row in journal.deliveries(states=(ds.SCHEDULED,), before_market=current + 1):
            if not ctx.health.clock_ok:  # by a wrong clock even "the slot passed" may be wrong
                if row.trade_id not in self._deferred:
                    self._deferred.add(row.trade_id)
                    events.emit("delivery.deferred", trade=row.trade_id, reason="clock skew")
                continue
            end_at = ctx.rules.slot_end(row.market_id)
            if row.market_id < current or end_at - now < MIN_START_SECONDS:
                reason = "slot passed before the transfer could start"
                if row.trade_id in self._deferred:
                    reason += " (deferred by the clock guard)"
                if self._move(row, ds.REFUSED, reason):
                    events.emit("delivery.missed", trade=row.trade_id, market=row.market_id)
                self._deferred.discard(row.trade_id)
                continue
            self._deferred.discard(row.trade_id)
            # Aim to finish a little before the slot ends: the router stops at the energy target,
            # so the contracted energy is delivered in full even if the start was a few ms late.
            usable_s = max(1, int((end_at - ctx.clock()) * (100 - DELIVERY_MARGIN_PERCENT) / 100))
            power_w = transfer_power_w(row.energy_wh, usable_s)
            if not self._move(row, ds.STARTING):  # the intent, journalled before the command
                continue
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
                    if self._move(row, ds.RUNNING, "already running at the router after a restart"):
                        events.emit("delivery.resumed", trade=row.trade_id, market=row.market_id)
                        started += 1
                    continue
                if self._move(row, ds.REFUSED, f"router: {exc}"):
                    events.emit("delivery.failed", trade=row.trade_id, detail=str(exc))
                continue
            except DgrLinkError as exc:
                # The link counts as down: the next good heartbeat checks the router's transfers
                # and lifts the safe mode the driver's SAFE (or the watchdog) caused (sim F6).
                ctx.health.dgr_ok = False
                # An unconfirmed START: it may have run (until the router's watchdog), or the
                # router never heard it - its STOP answer tells at metering (_never_ran).
                if self._move(row, ds.INTERRUPTED, f"{UNCONFIRMED_START_DETAILS[0]}: {LINK_LOST} {exc}"):
                    events.emit("delivery.failed", trade=row.trade_id, detail="router link lost",
                                safe_confirmed=exc.safe_confirmed)
                break
            except DgrError as exc:
                # An answer that contradicts the START (or a malformed one): it may be running.
                if self._move(row, ds.INTERRUPTED, f"router: {exc}"):
                    events.emit("delivery.failed", trade=row.trade_id, detail=str(exc))
                self.router.safe_state(cause="daemon")
                continue
            if self._move(row, ds.RUNNING):
                started += 1
                events.emit("delivery.started", trade=row.trade_id, market=row.market_id, direction=row.direction,
                            power_w=power_w, energy_wh=row.energy_wh, lateness_ms=ctx.now_ms() - row.market_id * 1000)
        return started

    def _stop_ended(self, current: int) -> None:
        """STOP the transfers of slots that have ended. The router stops each one by itself at its
        energy target or end time; the explicit STOP (harmless when it already ended) makes sure,
        and the read-back confirms the router agrees before the slot is metered."""
        from ..drivers.dgr import DgrError, DgrLinkError

        ctx = self.ctx
        for row in ctx.journal.deliveries(states=(ds.RUNNING,), before_market=current):
            try:
                ctx.dgr.stop_transfer(row.trade_id)
            except DgrError as exc:
                if isinstance(exc, DgrLinkError):
                    ctx.health.dgr_ok = False  # the next good heartbeat takes the link-back path
                ctx.events.emit("alarm.dgr", detail=f"stop of trade {row.trade_id} not confirmed: {exc}")

    # -- metering -------------------------------------------------------------------------------

    def _read_edge(self) -> None:
        """Read the interchange meter once and journal the reading (the slot edges are taken
        from journalled readings). A failed read postpones metering: the next tick reads again
        and the late reading is bracketed (slot_metering.edge_value), never used as the edge."""
        from ..drivers.meter import MeterReadError

        try:
            self.metering.read_interchange()
        except MeterReadError as exc:
            self.ctx.events.emit("alarm.meter", meter=self.metering.interchange, detail=f"delivery metering postponed: {exc}")

    def _flowing_in(self, market_id: int, from_ms: int, to_ms: int) -> dict[str, int]:
        """Per direction: for how many ms between ``from_ms`` and ``to_ms`` a transfer of this
        slot could have moved energy. A transfer flows from its START (journalled as the intent)
        until the router ended it: an END or a reboot the router told us about ends it then, a
        lost link leaves it to the router's watchdog; the slot's own bounds cap both. The
        energy in a gap of readings is split by these windows (slot_metering.edge_value)."""
        rules = self.ctx.rules
        flowing = {"export": 0, "import": 0}
        transfer_end = getattr(self.ctx.dgr, "transfer_end", None)
        for row in self.ctx.journal.deliveries(states=ds.STATES, market_id=market_id):
            ran = row.state in (ds.STARTING, *ds.FLOWING) or (
                row.state in (ds.METERED, ds.REPORTED) and bool(row.delivered_mwh or row.delivered_wh))
            if not ran:
                continue
            times = self.ctx.journal.delivery_times(row.trade_id)
            start = max(from_ms, row.market_id * 1000, times.started_at_ms or 0)
            end = min(to_ms, rules.slot_end(row.market_id) * 1000)
            if row.state == ds.INTERRUPTED and times.updated_at_ms is not None:
                margin_ms = self._watchdog_margin_ms() if _link_lost(row.detail) else 0
                end = min(end, times.updated_at_ms + margin_ms)
            ended = transfer_end(row.trade_id) if transfer_end is not None else None
            received_at = getattr(ended, "received_at", 0.0) if ended is not None else 0.0
            if received_at:
                end = min(end, int(received_at * 1000))
            flowing[row.direction] = max(flowing[row.direction], end - start)
        return flowing

    def _watchdog_margin_ms(self) -> int:
        """How long a transfer may run on after the router last heard from us: its heartbeat
        watchdog as its HELLO announced it, never less than the smallest the firmware supports.
        (The smallest alone under-counted a router with a longer watchdog: sim seed 5243, where
        the slot's cut transfers ran on for minutes and their energy went to the next slot.)"""
        hello = getattr(self.ctx.dgr, "last_hello", None)
        announced = getattr(hello, "heartbeat_timeout_ms", 0)
        return max(MIN_ROUTER_WATCHDOG_S * 1000, announced if isinstance(announced, int) else 0)

    def _edge(self, edge_s: int, start_before: Edge | None = None) -> tuple[Edge | None, bool]:
        """The counters at a slot edge: the stored value, else computed from the journalled
        readings that bracket it. (edge, newly computed)."""
        journal = self.ctx.journal
        stored = journal.meter_edge(edge_s)
        if stored is not None:
            return Edge(stored.edge_s, stored.import_energy_mwh, stored.export_energy_mwh, stored.method, stored.detail), False
        name = self.metering.interchange
        before = journal.reading_before(name, edge_s * 1000)
        after = journal.reading_after(name, edge_s * 1000)
        # A stored edge is a known value at its instant: bracket with it when it is closer.
        prior, later = journal.meter_edge_near(edge_s)
        if prior is not None and (before is None or prior.edge_s * 1000 >= before[0]):
            before = (prior.edge_s * 1000, prior.import_energy_mwh, prior.export_energy_mwh)
        if later is not None and after is not None and later.edge_s * 1000 <= after[0]:
            after = (later.edge_s * 1000, later.import_energy_mwh, later.export_energy_mwh)
        slot_s = self.ctx.rules.slot_seconds
        edge_ms = edge_s * 1000
        t0 = before[0] if before else edge_ms
        t1 = after[0] if after else edge_ms
        room, counted = self._room(edge_s - slot_s, before, start_before)
        edge = edge_value(edge_s, Counters(*before) if before else None, Counters(*after) if after else None,
                          active_before=self._flowing_in(edge_s - slot_s, t0, edge_ms),
                          active_after=self._flowing_in(edge_s, edge_ms, t1),
                          room_before=room, counted_before=counted)
        return edge, True

    def _room(self, market_id: int, before, start: Edge | None) -> tuple[dict[str, int] | None, frozenset[str]]:
        """Per direction, how much more (mWh) the slot's transfers could have moved after the
        reading ``before``: their contracts minus what the meter shows since the slot began —
        or, where the router has told us what every one of them moved (END or STOP answer;
        0 for one it never ran), those counts instead: then it is what they DID move after it
        (second value: those directions). None when the slot's start edge is not known (then
        the gap is split by time)."""
        if before is None:
            return None, frozenset()
        if start is None:
            stored = self.ctx.journal.meter_edge(market_id)
            if stored is None:
                return None, frozenset()
            start = Edge(stored.edge_s, stored.import_energy_mwh, stored.export_energy_mwh, stored.method)
        room, counted = {}, set()
        rows = self.ctx.journal.deliveries(states=ds.STATES, market_id=market_id)
        for d, index in (("import", 1), ("export", 2)):
            ran = [r for r in rows if r.direction == d and r.state not in (ds.SCHEDULED, ds.REFUSED)]
            moved = self._router_counts(ran) if self.ctx.rules.slot_end(market_id) <= self.ctx.now() else {}
            # A START the router never heard of moved 0 - trusted, as in _weights, only while
            # the router counts another of them (a rebooted one knows none). Without it the
            # edge was split by time and the slot before got some of the next one's energy
            # (stop 14's CI: tests/test_delivery_sequences.py, "never_ran_leaves_the_edge").
            never_ran = self._never_ran(ran) if moved else set()
            start_mwh = start.get(d)
            if ran and all(r.trade_id in moved or r.trade_id in never_ran for r in ran):
                room[d] = sum(moved.get(r.trade_id, 0) for r in ran) * 1000 - (before[index] - start_mwh)
                counted.add(d)
            else:
                room[d] = sum(r.energy_wh for r in ran) * 1000 - (before[index] - start_mwh)
        return room, frozenset(counted)

    def _router_counts(self, rows: list[DeliveryRow]) -> dict[int, int]:
        """trade -> Wh the router says the transfer moved (its END event, or its answer to a
        STOP), for the transfers of ENDED slots it tells us of. Why ask: a restarted process's
        driver has heard none of the ENDs its predecessor got, and a STOP of an ended transfer is
        harmless and answers ``was=ended moved_wh`` (docs/dgr-protocol.md section 5; the router
        remembers its last 32). Only rows that may have run are asked, once each per process."""
        from ..drivers.dgr import DgrError, DgrLinkError

        transfer_end = getattr(self.ctx.dgr, "transfer_end", None)
        if transfer_end is None:
            return {}
        out = {}
        for row in rows:
            if row.state in (ds.SCHEDULED, ds.REFUSED):
                continue
            ended = transfer_end(row.trade_id)
            if ended is None and row.trade_id not in self._asked and self.ctx.health.dgr_ok is not False:
                self._asked.add(row.trade_id)
                try:
                    self.ctx.dgr.stop_transfer(row.trade_id)
                except DgrLinkError as exc:
                    self.ctx.health.dgr_ok = False  # the next good heartbeat takes the link-back path
                    log.info("asking the router what trade %d moved: %s", row.trade_id, exc)
                except DgrError as exc:
                    log.info("asking the router what trade %d moved: %s", row.trade_id, exc)
                ended = transfer_end(row.trade_id)
            moved = (getattr(ended, "args", None) or {}).get("moved_wh") if ended is not None else None
            if isinstance(moved, (int, str)) and str(moved).isdigit():
                out[row.trade_id] = int(moved)
        return out

    def _never_ran(self, rows: list[DeliveryRow]) -> set[int]:
        """Trades whose START was never confirmed and of which the router knows nothing (its STOP
        answered ``was=unknown``, asked by ``_router_counts``): the frame never reached it."""
        unknown = getattr(self.ctx.dgr, "transfer_unknown", None)
        if unknown is None:
            return set()
        return {row.trade_id for row in rows
                if row.state == ds.INTERRUPTED and (row.detail or "").startswith(UNCONFIRMED_START_DETAILS)
                and unknown(row.trade_id)}

    def _weights(self, rows: list[DeliveryRow]) -> dict[int, int]:
        """What each transfer of a slot moved, for sharing the certified total (Wh, not certified):
        the router's count when it told us (its END event, kept by the driver) for every transfer
        of that direction, else an estimate for all of them: transfers are sized to move their
        contract in the first 95 % of the time left at their START, so a transfer moved about
        contract x (time it could flow / that time) — a cut one less, one that ran to the end all."""
        counted = self._router_counts(rows)
        estimated: dict[int, int] = {}
        for row in rows:
            times = self.ctx.journal.delivery_times(row.trade_id)
            end_ms = self.ctx.rules.slot_end(row.market_id) * 1000
            start_ms = max(row.market_id * 1000, times.started_at_ms or row.market_id * 1000)
            usable_ms = max(1, (end_ms - start_ms) * (100 - DELIVERY_MARGIN_PERCENT) // 100)
            flow_end = end_ms
            if row.state == ds.INTERRUPTED and times.updated_at_ms is not None:
                margin = self._watchdog_margin_ms() if _link_lost(row.detail) else 0
                flow_end = min(flow_end, times.updated_at_ms + margin)
            estimated[row.trade_id] = row.energy_wh * min(usable_ms, max(0, flow_end - start_ms)) // usable_ms
        never_ran = self._never_ran(rows)
        weights = {}
        for d in ("export", "import"):
            mine = [r.trade_id for r in rows if r.direction == d and r.state in ds.FLOWING]
            # A trade the router never ran counts 0 - but only while the router still counts the
            # others: a rebooted router knows none of them, and then every trade is estimated.
            known = {t: counted[t] for t in mine if t in counted}
            if known and all(t in known or t in never_ran for t in mine):
                weights.update({t: known.get(t, 0) for t in mine})
            else:
                source = counted if all(t in counted for t in mine) else estimated
                weights.update({t: source[t] for t in mine})
        return weights

    def _meter_slot(self, market_id: int) -> None:
        """Meter one ended slot: every delivery of it, and the edge values used, in ONE journal
        transaction. Rows that never got going are first resolved (scheduled -> refused;
        starting -> interrupted: it may have run)."""
        ctx = self.ctx
        journal, events = ctx.journal, ctx.events
        rows = journal.deliveries(states=ds.OPEN, market_id=market_id)
        for row in rows:
            if row.state == ds.SCHEDULED:
                if self._move(row, ds.REFUSED, "slot passed before the transfer could start"):
                    events.emit("delivery.missed", trade=row.trade_id, market=row.market_id)
            elif row.state == ds.STARTING:
                self._move(row, ds.INTERRUPTED, f"{UNCONFIRMED_START_DETAILS[1]} by the router")
        rows = journal.deliveries(states=ds.METERABLE, market_id=market_id)
        if not rows:
            return
        slot_end = ctx.rules.slot_end(market_id)
        start, start_new = self._edge(market_id)
        end, end_new = self._edge(slot_end, start_before=start)
        if start is None or end is None:
            return  # no reading at or after an edge yet: metered at a later tick
        delta = {d: max(0, end.get(d) - start.get(d)) for d in ("export", "import")}
        shares = allocate_slot([SlotRow(r.trade_id, r.direction, r.energy_wh, r.state) for r in rows],
                               delta["export"], delta["import"], net_only=self.net_only, tolerance_wh=self.tolerance_wh,
                               weights_wh=self._weights(rows))
        estimated = next((e for e in (start, end) if e.method == "interpolated"), None)
        verdicts = [
            MeteredDelivery(s.trade_id, s.delivered_wh, s.delivered_mwh, s.outcome,
                            detail=(f"slot edge interpolated: {estimated.detail}" if estimated else None),
                            start_meter_mwh=start.get(r.direction), end_meter_mwh=end.get(r.direction))
            for r, s in zip(rows, shares)
        ]
        new_edges = [EdgeValue(e.edge_s, e.import_mwh, e.export_mwh, e.method, e.detail)
                     for e, new in ((start, start_new), (end, end_new)) if new]
        from ..delivery_states import IllegalTransition

        try:
            journal.meter_slot(verdicts, new_edges)
        except IllegalTransition as exc:
            log.error("%s", exc)
            events.emit("alarm.delivery_transition", market=market_id, wanted=ds.METERED, detail=str(exc))
            return
        for row, share in zip(rows, shares):
            events.emit("delivery.metered", trade=row.trade_id, market=market_id, direction=row.direction,
                        contracted_wh=row.energy_wh, delivered_wh=share.delivered_wh, outcome=share.outcome,
                        edges=f"{start.method},{end.method}")

    # -- reports --------------------------------------------------------------------------------

    def report(self, row: DeliveryRow) -> None:
        """Sign the delivery report and mark the delivery reported (one journal transaction)."""
        from ..delivery_states import IllegalTransition

        ctx = self.ctx
        delivered = row.delivered_wh or 0
        status = "delivered" if row.outcome == ds.DELIVERED else "failed"

        def build(nonce: int) -> dict:
            return ctx.fields("delivery_report", nonce, REPORT_TTL_SECONDS, trade_id=row.trade_id, market_id=row.market_id,
                              role="seller" if row.direction == "export" else "buyer", energy_wh=delivered, status=status)

        try:
            message = ctx.journal.enqueue_report(row.trade_id, build, ctx.key)
        except IllegalTransition as exc:
            log.error("%s", exc)
            ctx.events.emit("alarm.delivery_transition", trade=row.trade_id, wanted=ds.REPORTED, detail=str(exc))
            return
        ctx.events.emit("report.signed", nonce=message.fields["nonce"], trade=row.trade_id, energy_wh=delivered, status=status)

    def resign_report(self, trade_id: int) -> None:
        """The ledger rejected a report as expired: sign it again, if the delivery is still reported."""
        row = self.ctx.journal.delivery(trade_id)
        if row is not None and row.state == ds.REPORTED:
            self.report(row)
