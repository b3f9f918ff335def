"""The clock guard: compare the board's clock with the ledger's and stop bidding and delivery
while the skew is beyond the configured bound (a signed message's time must be true)."""

from __future__ import annotations

import logging

from .context import Context

log = logging.getLogger(__name__)


class ClockGuard:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def check(self) -> None:
        from ..ledger.base import LedgerUnavailable

        ctx = self.ctx
        try:
            before = ctx.now_ms()
            server_ms = ctx.ledger.server_time_ms()
            after = ctx.now_ms()
        except LedgerUnavailable as exc:
            log.debug("clock check failed: %s", exc)
            return
        skew = server_ms - (before + after) // 2
        bound = ctx.config.ledger.max_clock_skew_ms
        ok = abs(skew) <= bound
        if not ok:
            ctx.events.emit("alarm.clock", skew_ms=skew, bound_ms=bound, action="bidding and delivery stopped")
        elif not ctx.health.clock_ok:
            ctx.events.emit("clock.ok", skew_ms=skew)
        ctx.health.clock_ok, ctx.health.clock_skew_ms = ok, skew
