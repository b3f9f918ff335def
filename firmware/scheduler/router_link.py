"""The link to the DGR (router): heartbeat, safe state, resume, and the router's own events.

The router distrusts silence: without a heartbeat within its watchdog timeout it goes safe by
itself. This module feeds that watchdog from the scheduler's own cycle, turns a lost link into
failed deliveries, lifts the safe mode a lost link caused once the link is back, and turns the
router's unsolicited events into status lines.
"""

from __future__ import annotations

from .. import delivery_states as ds
from .context import Context

LINK_LOST = "router link lost:"  # in the detail of a delivery cut by a lost link (or whose START was lost with it)

# The restart rule (issue 7 o; docs/delivery.md): a transfer running across a daemon restart is
# not cut short only if the router hears from the new process before its heartbeat watchdog
# trips: RestartSec + FIRST_FRAME_BOUND_S + HEARTBEAT_MARGIN_S <= the router's hb_timeout.
MIN_ROUTER_WATCHDOG_S = 6  # the smallest router heartbeat watchdog the firmware supports
FIRST_FRAME_BOUND_S = 2  # process start -> first DGR frame (greet_router is the daemon's first act)
HEARTBEAT_MARGIN_S = 1  # one lost frame's retry time on the line


class RouterLink:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        # Safe mode the daemon itself commanded (an answer that contradicted a START): lifted
        # by the next heartbeat that finds the link sane, so one bad answer does not leave the
        # router safe for the rest of the day. An operator's SAFE is persisted in the journal
        # instead and is never lifted by the daemon.
        self._daemon_safe = False

    def greet(self) -> None:
        """The first thing a (re)started daemon does: talk to the router, so its heartbeat
        watchdog sees the new process at once and a transfer running across the restart is
        not cut short (issue 7 o; docs/delivery.md has the watchdog vs RestartSec rule). An
        operator's SAFE from before the restart is commanded again: it survives restarts."""
        from ..drivers.dgr import DgrError

        ctx = self.ctx
        try:
            ctx.dgr.heartbeat()
            ctx.health.dgr_ok = True
        except DgrError as exc:
            ctx.health.dgr_ok = False
            ctx.events.emit("alarm.dgr", detail=f"router not answering at start: {exc}")
            return
        if ctx.journal.operator_safe():
            try:
                status = ctx.dgr.safe_state()
                ctx.events.emit("dgr.safe_state", mode=status.mode, by="operator", detail="kept across the restart")
            except DgrError as exc:
                ctx.events.emit("alarm.dgr", detail=f"operator's safe state not confirmed after the restart: {exc}")

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
        watchdog) is then lifted with RESUME, or every later delivery would be refused — but
        never an operator's SAFE (persisted in the journal). Until both succeed the link counts
        as down and the next heartbeat tries again.
        """
        from ..drivers.dgr import DgrError, DgrLinkError

        ctx = self.ctx
        dgr, journal, events, health = ctx.dgr, ctx.journal, ctx.events, ctx.health
        try:
            dgr.heartbeat()
        except DgrError as exc:
            if health.dgr_ok is not False:
                events.emit("alarm.dgr", detail=str(exc))
            health.dgr_ok = False
            current = ctx.rules.slot_start(ctx.now())
            failed = []
            with ctx.delivery_lock:
                for row in journal.deliveries(states=(ds.RUNNING,), market_id=current):
                    end = dgr.transfer_end(row.trade_id)
                    if end is not None and end.args.get("reason") == "target":
                        continue
                    if self._interrupt(row.trade_id, f"{LINK_LOST} {exc}"):
                        events.emit("delivery.failed", trade=row.trade_id, detail="router link lost")
                        failed.append(row.trade_id)
            if failed and not (isinstance(exc, DgrLinkError) and exc.safe_confirmed):
                self.safe_state(cause="link")
            return
        if health.dgr_ok is False:
            with ctx.delivery_lock:
                expected = {d.trade_id for d in journal.deliveries(states=(ds.SCHEDULED, ds.STARTING, ds.RUNNING))}
                try:
                    status = dgr.status()
                    orphans = [t.trade_id for t in status.transfers if t.trade_id not in expected]
                    for trade_id in orphans:
                        status = dgr.stop_transfer(trade_id)
                    if status.mode == "safe" and not journal.operator_safe():
                        status = dgr.resume()
                        self._daemon_safe = False
                except DgrError as exc:
                    events.emit("alarm.dgr", detail=f"link back but the router's transfers not checked: {exc}")
                    return
            events.emit("dgr.back", mode=status.mode, faults=",".join(status.faults) or "-",
                        stopped=",".join(map(str, orphans)) or "-")
        health.dgr_ok = True
        if self._daemon_safe:
            self._lift_daemon_safe()
        self.router_events()

    def _lift_daemon_safe(self) -> None:
        """The link answers sanely again after a safe state the daemon commanded: RESUME,
        unless an operator has commanded SAFE meanwhile (that one stays)."""
        from ..drivers.dgr import DgrError

        ctx = self.ctx
        if ctx.journal.operator_safe():
            self._daemon_safe = False
            return
        try:
            status = ctx.dgr.status()
            if status.mode == "safe":
                status = ctx.dgr.resume()
            self._daemon_safe = False
            ctx.events.emit("dgr.resumed", was="daemon_safe", mode=status.mode, faults=",".join(status.faults) or "-")
        except DgrError as exc:
            ctx.events.emit("alarm.dgr", detail=f"RESUME after the daemon's safe state failed: {exc}")

    def _interrupt(self, trade_id: int, detail: str) -> bool:
        """running -> interrupted (one journal transaction); an illegal one alarmed, not applied."""
        from ..delivery_states import IllegalTransition

        try:
            self.ctx.journal.transition(trade_id, ds.INTERRUPTED, detail)
            return True
        except IllegalTransition as exc:
            self.ctx.events.emit("alarm.delivery_transition", trade=trade_id, wanted=ds.INTERRUPTED, detail=str(exc))
            return False

    def router_events(self) -> None:
        """Turn the router's unsolicited events into status lines (faults as alarms).

        An END before the target for a reason of the router's own (safe mode, a latched fault,
        its heartbeat watchdog) fails that delivery at once, with the reason in the log; the
        slot-end metering then reports it as failed with what did flow. Only a row still running
        is marked, under the delivery lock, so a slot edge that metered it is never undone.
        A watchdog trip seen while the link works (the scheduler stalled longer than the
        router's timeout) is lifted with RESUME: the DGC is demonstrably alive again."""
        from ..drivers.dgr import DgrError

        ctx = self.ctx
        dgr, journal, events = ctx.dgr, ctx.journal, ctx.events
        for event in dgr.drain_events():
            args = {k: v for k, v in event.args.items() if k in ("trade_id", "reason", "moved_wh", "code", "mode", "was")}
            if event.kind == "FAULT":
                events.emit("alarm.dgr_fault", **args)
                if event.args.get("code") == "heartbeat_lost" and not journal.operator_safe():
                    try:
                        status = dgr.resume()
                        events.emit("dgr.resumed", was="heartbeat_lost", mode=status.mode,
                                    faults=",".join(status.faults) or "-")
                    except DgrError as exc:
                        events.emit("alarm.dgr", detail=f"RESUME after the watchdog trip failed: {exc}")
            elif event.kind == "END":
                events.emit("dgr.transfer_ended", **args)
                reason, trade = event.args.get("reason"), event.args.get("trade_id", "")
                if reason in ("safe", "fault", "heartbeat") and trade.isdigit():
                    with ctx.delivery_lock:
                        row = journal.delivery(int(trade))
                        if row is not None and row.state == ds.RUNNING:
                            if self._interrupt(row.trade_id, f"router ended the transfer: {reason}"):
                                events.emit("delivery.failed", trade=row.trade_id, detail=f"router ended the transfer: {reason}")
            elif event.kind == "BOOT":
                events.emit("dgr.rebooted")
                # A reboot loses every transfer (docs/dgr-protocol.md, section 11): what was
                # running is interrupted now, so metering knows it moved nothing after this.
                with ctx.delivery_lock:
                    for row in journal.deliveries(states=(ds.RUNNING,)):
                        if self._interrupt(row.trade_id, "router rebooted: transfer lost"):
                            events.emit("delivery.failed", trade=row.trade_id, detail="router rebooted")

    def safe_state(self, *, cause: str) -> None:
        """Command SAFE for the daemon's own reason: ``daemon`` (an answer that contradicted a
        command: lifted by the next sane heartbeat) or ``link`` (lifted when the link is back)."""
        from ..drivers.dgr import DgrError

        ctx = self.ctx
        if cause == "daemon":
            self._daemon_safe = True
        try:
            status = ctx.dgr.safe_state()
            ctx.events.emit("dgr.safe_state", mode=status.mode)
        except DgrError as exc:
            ctx.events.emit("alarm.dgr", detail=f"safe state not confirmed: {exc}")

    def operator_safe_state(self) -> tuple[bool, str]:
        """The operator's `safe` (serial console or control socket): send the DGR to its safe state now.

        Returns (confirmed, detail) instead of raising, because the caller is a person at a
        terminal who needs the answer in words. Running deliveries are not marked failed here:
        the next metering at the slot edge records what the interchange meter saw, and the
        router refuses new transfers until RESUME or a new HELLO (docs/dgr-protocol.md).
        """
        from ..drivers.dgr import DgrError

        ctx = self.ctx
        ctx.events.emit("dgr.safe_requested", by="operator")
        ctx.journal.set_operator_safe(True)  # first: a restart right now must keep it safe
        try:
            status = ctx.dgr.safe_state()
        except DgrError as exc:
            ctx.events.emit("alarm.dgr", detail=f"safe state not confirmed: {exc}")
            return False, str(exc)
        ctx.events.emit("dgr.safe_state", mode=status.mode)
        return True, f"router mode {status.mode}, {len(status.transfers)} transfers active"

    def operator_resume(self) -> tuple[bool, str]:
        """The operator lifts their SAFE: the persisted flag is cleared and the router RESUMEd."""
        from ..drivers.dgr import DgrError

        ctx = self.ctx
        ctx.events.emit("dgr.resume_requested", by="operator")
        ctx.journal.set_operator_safe(False)
        try:
            status = ctx.dgr.resume()
        except DgrError as exc:
            ctx.events.emit("alarm.dgr", detail=f"resume not confirmed: {exc}")
            return False, str(exc)
        ctx.events.emit("dgr.resumed", was="operator_safe", mode=status.mode, faults=",".join(status.faults) or "-")
        return True, f"router mode {status.mode}"
