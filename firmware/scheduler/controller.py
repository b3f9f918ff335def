"""The daemon's jobs, as one facade over the scheduler's modules of one responsibility.

Each public method is one scheduled job. Every job catches what the outside world can throw
at it (a silent meter, a router that NAKs, a ledger that is down or answers garbage), logs an
event, and returns: a failing job never stops the scheduler, and the next run starts from the
journal, not from memory.

Who owns which decision (see each module's docstring):
- ``metering``: meter reads, plausibility state, stored readings, house-data freshness;
- ``trading``: forecast -> policy -> signed orders and cancels;
- ``outbox``: sending signed messages and settling the ledger's answers;
- ``trades``: polling the ledger for this board's trades;
- ``clock_guard``: the board's clock against the ledger's;
- ``deliveries``: start, stop, meter and report each trade's transfer;
- ``router_link``: heartbeat, safe state, resume and the router's events.

The facade keeps the constructor and the job methods that daemon.py, status.py, the tests and
the simulation drive. Every module takes time only from the injected ``clock``.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from ..config import BoardConfig
from ..journal import Journal
from .. import delivery_states as ds
from .clock_guard import ClockGuard, check_step
from .context import Context, Health
from .deliveries import Deliveries
from .events import EventLog
from .metering import STALE_READINGS_FACTOR, Metering
from .outbox import Outbox
from .router_link import RouterLink
from .trades import TradePoller
from .trading import Trading

log = logging.getLogger(__name__)

__all__ = ["Controller", "Health", "STALE_READINGS_FACTOR"]


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
        self.ctx = ctx = Context(config, journal=journal, key=key, meters=meters, dgr=dgr, ledger=ledger,
                                 events=events, clock=clock)
        self.metering = Metering(ctx)
        self.router = RouterLink(ctx)
        self.deliveries = Deliveries(ctx, self.metering, self.router, flush_outbox=self.flush_outbox)
        self.outbox = Outbox(ctx, resign_report=self.deliveries.resign_report)
        self.trading = Trading(ctx, self.metering, flush_outbox=self.flush_outbox)
        self.trades = TradePoller(ctx)
        self.clock_guard = ClockGuard(ctx)
        self._greeted = False

    # The shared state, as attributes for status.py, the console and the tests.
    config = property(lambda self: self.ctx.config)
    rules = property(lambda self: self.ctx.rules)
    journal = property(lambda self: self.ctx.journal)
    key = property(lambda self: self.ctx.key)
    meters = property(lambda self: self.ctx.meters)
    dgr = property(lambda self: self.ctx.dgr)
    ledger = property(lambda self: self.ctx.ledger)
    events = property(lambda self: self.ctx.events)
    clock = property(lambda self: self.ctx.clock)
    health = property(lambda self: self.ctx.health)

    def close(self) -> None:
        ctx = self.ctx
        for closer in (ctx.meters.close, ctx.dgr.close, ctx.journal.close):
            try:
                closer()
            except Exception:  # closing must not mask the reason we are stopping
                log.exception("error while closing")

    # -- start-up -----------------------------------------------------------------------

    def greet_router(self) -> None:
        """Talk to the router before anything else after a (re)start (issue 7 o), so the
        router's watchdog never cuts a transfer across a restart. The daemon calls it first;
        the first job of a new process calls it too if nobody did (once per process)."""
        if not self._greeted:
            self._greeted = True
            self.router.greet()

    def recover(self) -> None:
        """Rebuild from the journal: nonce floor from the ledger, finish deliveries. The outbox is
        resent by its own job, which the daemon runs at once after this: a long outbox on a slow
        ledger (one message per block on a chain) must not hold back the slot-edge deliveries."""
        from .ledger_link import sync_account

        self.greet_router()
        ctx = self.ctx
        journal = ctx.journal
        # Never raises for what the ledger says: a refused device alarms once and the jobs retry
        # slowly (issue 7 h), an outage is announced once (p).
        sync_account(ctx)
        pending = journal.pending_outbox(limit=10_000)
        running = journal.deliveries(states=(*ds.OPEN, ds.METERED))
        ctx.events.emit("recovered", outbox_pending=len(pending), deliveries_open=len(running), next_nonce=journal.next_nonce())
        self.check_clock()
        check_step(ctx)
        self.deliveries.tick(flush_outbox=False)

    # -- jobs ---------------------------------------------------------------------------
    # Every job that acts on the board's clock first asks clock_guard.check_step: a wall-clock
    # step since the last good clock check (beyond the skew bound, against ctx.monotonic) makes
    # the clock bad at once, so no job acts on the stepped time until the next check measures
    # it again (sim findings F2: a START 400 s early; F5: a running slot metered and STOPped;
    # F3b: readings stamped in the future). No I/O; a no-op without ctx.monotonic.

    def measure(self) -> None:
        self.greet_router()
        check_step(self.ctx)
        self.metering.measure()

    def bid(self) -> None:
        check_step(self.ctx)
        self.trading.bid()

    def review(self) -> None:
        check_step(self.ctx)
        self.trading.review()

    def flush_outbox(self) -> None:
        check_step(self.ctx)
        self.outbox.flush()

    def poll_trades(self) -> None:
        check_step(self.ctx)
        self.trades.poll()

    def check_clock(self) -> None:
        self.clock_guard.check()

    def slot_edge(self) -> None:
        """Runs at each slot boundary: start this slot's transfers first, then meter and report."""
        check_step(self.ctx)
        self.deliveries.tick()

    def deliveries_tick(self) -> None:
        check_step(self.ctx)
        self.deliveries.tick()

    def heartbeat(self) -> None:
        check_step(self.ctx)
        self.router.heartbeat()

    def operator_safe_state(self) -> tuple[bool, str]:
        return self.router.operator_safe_state()

    def operator_resume(self) -> tuple[bool, str]:
        return self.router.operator_resume()

    # -- metering views the HIL tests inspect ------------------------------------------------

    def _read_plausible(self, name: str):
        return self.metering.read_plausible(name)

    def _meter_state(self, name: str):
        return self.metering.state(name)

    def _meter_limits(self, name: str):
        return self.metering.limits(name)

    def _house_data_problem(self) -> str | None:
        return self.metering.house_data_problem()

    def _fresh_house_data(self) -> bool:
        return self.metering.fresh_house_data()
