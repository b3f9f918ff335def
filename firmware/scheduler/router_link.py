"""The link to the DGR (router): heartbeat, safe state, resume, and the router's own events.

The router distrusts silence: without a heartbeat within its watchdog timeout it goes safe by
itself. This module feeds that watchdog from the scheduler's own cycle, turns a lost link into
failed deliveries, lifts the safe mode a lost link caused once the link is back, and turns the
router's unsolicited events into status lines.
"""

from __future__ import annotations

from .context import Context


class RouterLink:
    def __init__(self, ctx: Context):
        self.ctx = ctx

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
                for row in journal.deliveries(states=("running",), market_id=current):
                    end = dgr.transfer_end(row.trade_id)
                    if row.outcome == "failed" or (end is not None and end.args.get("reason") == "target"):
                        continue
                    journal.mark_failed_start(row.trade_id, f"router link lost: {exc}")
                    events.emit("delivery.failed", trade=row.trade_id, detail="router link lost")
                    failed.append(row.trade_id)
            if failed and not (isinstance(exc, DgrLinkError) and exc.safe_confirmed):
                self.safe_state()
            return
        if health.dgr_ok is False:
            with ctx.delivery_lock:
                expected = {d.trade_id for d in journal.deliveries(states=("scheduled", "running"))
                            if d.outcome != "failed"}
                try:
                    status = dgr.status()
                    orphans = [t.trade_id for t in status.transfers if t.trade_id not in expected]
                    for trade_id in orphans:
                        status = dgr.stop_transfer(trade_id)
                    if status.mode == "safe":
                        status = dgr.resume()
                except DgrError as exc:
                    events.emit("alarm.dgr", detail=f"link back but the router's transfers not checked: {exc}")
                    return
            events.emit("dgr.back", mode=status.mode, faults=",".join(status.faults) or "-",
                        stopped=",".join(map(str, orphans)) or "-")
        health.dgr_ok = True
        self.router_events()

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
                if event.args.get("code") == "heartbeat_lost":
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
                        row = next((d for d in journal.deliveries(states=("running",))
                                    if d.trade_id == int(trade) and d.outcome != "failed"), None)
                        if row is not None:
                            journal.mark_failed_start(row.trade_id, f"router ended the transfer: {reason}")
                            events.emit("delivery.failed", trade=row.trade_id, detail=f"router ended the transfer: {reason}")
            elif event.kind == "BOOT":
                events.emit("dgr.rebooted")

    def safe_state(self) -> None:
        from ..drivers.dgr import DgrError

        ctx = self.ctx
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
        try:
            status = ctx.dgr.safe_state()
        except DgrError as exc:
            ctx.events.emit("alarm.dgr", detail=f"safe state not confirmed: {exc}")
            return False, str(exc)
        ctx.events.emit("dgr.safe_state", mode=status.mode)
        return True, f"router mode {status.mode}, {len(status.transfers)} transfers active"
