"""What every scheduler module shares: the board's config, its devices, the journal, the event
log, the injected clock, the health flags and the locks that order jobs against each other.

Why one small object: the job modules (metering, trading, outbox, trades, clock_guard,
deliveries, router_link) each own one decision, but they act on the same journal and devices.
Passing one context keeps their constructors short and makes the one rule that the simulation
depends on easy to audit: time comes only from ``clock`` (never ``time.time()`` directly).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from ..config import BoardConfig
from ..journal import Journal
from ..messages import new_fields
from .events import EventLog


@dataclass
class Health:
    clock_ok: bool = True
    clock_skew_ms: int | None = None
    ledger_reachable: bool | None = None
    meters_ok: dict[str, bool] = field(default_factory=dict)
    dgr_ok: bool | None = None
    last_reading_ms: dict[str, int] = field(default_factory=dict)
    # The ledger link (A2, scheduler/ledger_link.py): since when the ledger is unreachable and
    # why; a permanent refusal of this device (unregistered, revoked) and when to ask again.
    ledger_down_since_ms: int | None = None
    ledger_detail: str | None = None
    ledger_refusal: str | None = None
    ledger_retry_at_ms: int | None = None
    # The clock guard (A2): when the skew was last measured (ctx clock) and that attempt's round trip.
    clock_checked_at_ms: int | None = None
    clock_round_trip_ms: int | None = None
    clock_problem: str | None = None
    clock_ref_ms: tuple[int, int] | None = None  # (board clock, monotonic) at the last good check
    unpinned_told: bool = False  # A3 (trade_record.py): alarm.ledger_unpinned was emitted
    # One message's turn in the outbox (ms, a moving average on ctx.monotonic of answered, not
    # duplicate, sends; None: not measured since the start, or no monotonic clock): about a block
    # on a chain. The bid job sizes its queue by it (trading.py).
    outbox_send_ms: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


class Context:
    def __init__(self, config: BoardConfig, *, journal: Journal, key, meters, dgr, ledger, events: EventLog,
                 clock: Callable[[], float]):
        self.config = config
        self.rules = config.market
        self.journal = journal
        self.key = key
        self.meters = meters
        self.dgr = dgr
        self.ledger = ledger
        self.events = events
        self.clock = clock
        # A monotonic clock (seconds) beside ``clock``, for the clock guard to notice the board's
        # clock stepping between two checks (A2). None: not checked (the daemon sets time.monotonic;
        # a simulation sets its own virtual one).
        self.monotonic: Callable[[], float] | None = None
        self.health = Health()
        # The delivery lock orders the slot edge, the heartbeat and the router's events: a row
        # is selected and changed under it, so one job never undoes another's decision.
        self.delivery_lock = threading.RLock()

    def now(self) -> int:
        return int(self.clock())

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def fields(self, kind: str, nonce: int, ttl_s: int, **body) -> dict:
        return new_fields(
            kind,
            ledger_id=self.config.ledger.ledger_id,
            device_id=self.key.device_id,
            nonce=nonce,
            issued_at=self.now(),
            ttl_s=ttl_s,
            **body,
        )
