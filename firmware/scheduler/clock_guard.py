"""The clock guard: compare the board's clock with the ledger's and stop bidding and delivery
while the skew is beyond the configured bound (a signed message's time must be true).

Why these rules (issue 7 g):
- **One attempt's round trip.** The skew is the ledger's time minus the board's at the midpoint
  of ONE request (``RestLedger.server_time_sample``: no retry, no back-off inside), so its error
  is at most half that round trip; the old measurement spanned the adapter's retries and
  back-off and could be off by seconds. A round trip so long that half of it exceeds the bound
  measures nothing and counts as no answer; otherwise the clock is good only when the skew plus
  that error is within the bound.
- **Fail closed.** When the ledger's time has been unknown for longer than
  ``[ledger] clock_grace_seconds`` (no answer, or only useless ones, since the last good
  measurement or since start), the clock counts as bad: bidding stops and the deliveries module
  defers starts. A board may trust its own clock for a while, not forever.
- **Steps between checks.** The board's clock can step (an NTP step, a Pi without RTC) between
  two checks; jobs that act on time call :func:`check_step` first, which compares how far the
  board's clock and a monotonic clock moved since the last good check and fails closed on a
  difference beyond the bound, until the next check measures the skew again (sim finding F2:
  a step back between checks let the board bid after a gate had closed).
- Deferred deliveries are retried by the deliveries module when the clock is good again within
  their slot (scheduler/deliveries.py).
"""

from __future__ import annotations

import logging

from . import ledger_link
from .context import Context

log = logging.getLogger(__name__)


class ClockGuard:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self._started_ms = ctx.now_ms()

    def check(self) -> None:
        from ..ledger.base import LedgerUnavailable

        ctx = self.ctx
        try:
            server_ms, sent_ms, received_ms = self._sample()
        except LedgerUnavailable as exc:
            ledger_link.unavailable(ctx, exc, job="clock")
            self._unknown(f"ledger unreachable: {exc}")
            return
        ledger_link.answered(ctx, job="clock")
        bound = ctx.config.ledger.max_clock_skew_ms
        round_trip = received_ms - sent_ms
        if round_trip < 0 or round_trip // 2 > bound:
            self._unknown(f"a round trip of {round_trip} ms cannot measure a skew within {bound} ms")
            return
        skew = server_ms - (sent_ms + received_ms) // 2
        ok = abs(skew) + round_trip // 2 <= bound
        health = ctx.health
        was_ok = health.clock_ok
        with health.lock:
            health.clock_checked_at_ms = ctx.now_ms()
            health.clock_round_trip_ms = round_trip
            if ctx.monotonic is not None:
                health.clock_ref_ms = (ctx.now_ms(), int(ctx.monotonic() * 1000))
            health.clock_problem = None if ok else f"skew {skew} ms (round trip {round_trip} ms) beyond {bound} ms"
        if not ok:
            ctx.events.emit("alarm.clock", skew_ms=skew, round_trip_ms=round_trip, bound_ms=bound,
                            action="bidding and delivery stopped")
        elif not was_ok:
            ctx.events.emit("clock.ok", skew_ms=skew, round_trip_ms=round_trip)
        health.clock_ok, health.clock_skew_ms = ok, skew

    def _sample(self) -> tuple[int, int, int]:
        """(ledger ms, local ms before sending, local ms after the answer) of one attempt."""
        ctx = self.ctx
        sample = getattr(ctx.ledger, "server_time_sample", None)
        if sample is not None:
            s = sample()
            # The adapter stamps with its own clock; the board's clock is ctx's. On a board both are
            # the wall clock; a simulation's ledger client without the method takes the other path.
            return s.server_ms, s.sent_ms, s.received_ms
        sent = ctx.now_ms()
        server_ms = ctx.ledger.server_time_ms()
        return server_ms, sent, ctx.now_ms()

    def _unknown(self, why: str) -> None:
        """No usable measurement now: the last one stands until the grace runs out, then fail closed."""
        ctx = self.ctx
        health = ctx.health
        grace_s = ctx.config.ledger.clock_grace_seconds
        last_ms = health.clock_checked_at_ms if health.clock_checked_at_ms is not None else self._started_ms
        unknown_s = (ctx.now_ms() - last_ms) / 1000
        log.debug("clock check: %s", why)
        if unknown_s <= grace_s or not health.clock_ok:
            return
        with health.lock:
            health.clock_problem = f"the ledger's time unknown for {unknown_s:.0f} s (grace {grace_s} s): {why}"[:300]
        health.clock_ok = False
        ctx.events.emit("alarm.clock", reason="ledger time unknown", unknown_s=round(unknown_s), grace_s=grace_s,
                        detail=why, action="bidding and delivery stopped until the ledger's time is measured")


def check_step(ctx: Context) -> bool:
    """False (and the clock no longer trusted) when the board's clock stepped since the last good
    check by more than the bound, measured against ``ctx.monotonic``. Cheap: no I/O."""
    health = ctx.health
    if ctx.monotonic is None or health.clock_ref_ms is None or not health.clock_ok:
        return health.clock_ok
    wall_ms, mono_ms = health.clock_ref_ms
    drift = (ctx.now_ms() - wall_ms) - (int(ctx.monotonic() * 1000) - mono_ms)
    bound = ctx.config.ledger.max_clock_skew_ms
    if abs(drift) <= bound:
        return True
    with health.lock:
        health.clock_problem = f"the board's clock stepped {drift:+d} ms since the last check"
        health.clock_ref_ms = None
    health.clock_ok = False
    ctx.events.emit("alarm.clock", reason="clock stepped", step_ms=drift, bound_ms=bound,
                    action="bidding and delivery stopped until the next clock check")
    return False
