"""`dgc run`: wire the controller's jobs to APScheduler and run until SIGTERM.

Why APScheduler 3.x with the memory job store: the journal is the source of truth, so jobs are
rebuilt at every start and need no persistence of their own (the SQLAlchemy store would add
~13 MB and ~35 ms lateness for nothing). The slot-edge job has its own single-thread executor
so a slow ledger call in another job can never delay a DGR start command.

Shutdown leaves running transfers alone: each carries its own end time and energy target, so a
restart (an update, a crash) in the middle of a slot does not cut a delivery short.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from ..config import BoardConfig
from .events import EventLog

log = logging.getLogger(__name__)


def build_controller(config: BoardConfig, key_path: Path, events: EventLog):
    from ..drivers.dgr import DgrClient
    from ..drivers.meter import MeterSet
    from ..journal import Journal
    from ..keystore import load_key_file
    from ..ledger.rest import RestLedger
    from .controller import Controller

    key = load_key_file(key_path)
    ledger_cfg = config.ledger
    ledger = RestLedger(
        ledger_cfg.url,
        timeout_ms=ledger_cfg.timeout_ms,
        retries=ledger_cfg.retries,
        backoff_ms=ledger_cfg.backoff_ms,
        verify_tls=ledger_cfg.verify_tls,
    )
    journal = Journal(config.journal_path)
    meters = MeterSet.from_config(config)
    dgr = DgrClient(config.dgr)
    return Controller(config, journal=journal, key=key, meters=meters, dgr=dgr, ledger=ledger, events=events)


def run_daemon(config: BoardConfig, *, key_path: Path, stop_event: threading.Event | None = None) -> int:
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    events = EventLog(config.board.name)
    controller = build_controller(config, key_path, events)
    stop = stop_event or threading.Event()

    def _on_signal(signum, _frame):
        events.emit("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    events.emit("starting", device=controller.key.device_id, ledger=config.ledger.url,
                slot_s=config.market.slot_seconds, markets_ahead=config.market.markets_ahead)
    controller.measure()
    controller.recover()

    cadence = config.cadence
    slot_s = config.market.slot_seconds
    now = time.time()
    next_edge = datetime.fromtimestamp(config.market.next_slot_start(int(now)), tz=timezone.utc)
    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(4), "edge": ThreadPoolExecutor(1)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": max(1, slot_s // 2)},
        timezone=timezone.utc,
    )

    def every(seconds: int, **kw) -> IntervalTrigger:
        return IntervalTrigger(seconds=seconds, timezone=timezone.utc, **kw)

    scheduler.add_job(controller.slot_edge, every(slot_s, start_date=next_edge), id="slot_edge", executor="edge")
    scheduler.add_job(controller.measure, every(cadence.measure_seconds), id="measure")
    scheduler.add_job(controller.bid, every(cadence.bid_seconds), id="bid", next_run_time=datetime.now(timezone.utc))
    scheduler.add_job(controller.review, every(cadence.review_seconds), id="review")
    scheduler.add_job(controller.poll_trades, every(cadence.poll_trades_seconds), id="poll_trades")
    scheduler.add_job(controller.flush_outbox, every(cadence.outbox_seconds), id="outbox")
    scheduler.add_job(controller.deliveries_tick, every(max(1, cadence.poll_trades_seconds)), id="deliveries")
    scheduler.add_job(controller.heartbeat, every(max(1, config.dgr.heartbeat_seconds)), id="dgr_heartbeat")
    scheduler.add_job(controller.check_clock, every(cadence.clock_check_seconds), id="clock")
    scheduler.start()
    events.emit("running", jobs=len(scheduler.get_jobs()))
    try:
        while not stop.wait(1.0):
            pass
    finally:
        scheduler.shutdown(wait=True)
        controller.close()
        events.emit("stopped")
    return 0
