"""`dgc run`: wire the controller's jobs to APScheduler and run until SIGTERM.

Why APScheduler 3.x with the memory job store: the journal is the source of truth, so jobs are
rebuilt at every start and need no persistence of their own (the SQLAlchemy store would add
~13 MB and ~35 ms lateness for nothing). The slot-edge job has its own single-thread executor
so a slow ledger call in another job can never delay a DGR start command.

Shutdown leaves running transfers alone: each carries its own end time and energy target, so a
restart (an update, a crash) in the middle of a slot does not cut a delivery short.

Under systemd (`systemd/dgc.service`, Type=notify) the daemon says READY=1 once recovery is done
and the scheduler runs, STATUS= with a one-line summary, STOPPING=1 on shutdown, and WATCHDOG=1
from a scheduler job of its own ONLY while the health check passes (status.py says what healthy
means), so a stuck or sick daemon is restarted by systemd. The control socket (`dgc status`) and
the serial console answer from the same status service.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from .. import jitter
from ..config import BoardConfig
from ..console import ConsoleTee, SerialConsole
from ..sdnotify import Notifier
from .control import ControlServer, ControlSocketInUse
from .events import EventLog
from .status import JobMonitor, StatusService, redact_url

log = logging.getLogger(__name__)

HEALTH_CHECK_SECONDS = 15.0  # without a systemd watchdog; with one, half of WatchdogSec=
# SIGTERM ends the daemon within this, whatever a job is doing (issue 7 n): a job still running
# then (a ledger call that trickles, a flush of thousands of messages) is abandoned as a kill
# would abandon it — every journal transaction is atomic and every step is safe to redo.
STOP_GRACE_SECONDS = 4.0


class _StopDuringStart(BaseException):
    """SIGTERM while the daemon was still starting (recovery may wait on a ledger call)."""


def build_controller(config: BoardConfig, key_path: Path, events: EventLog):
    from ..drivers.dgr import DgrClient
    from ..drivers.meter import MeterSet
    from ..journal import Journal
    from ..keystore import load_key_file
    from .controller import Controller

    key = load_key_file(key_path)
    ledger_cfg = config.ledger
    journal = Journal(config.journal_path)
    if ledger_cfg.kind == "evm":  # issue 9 (G2): the market contract, messages signed as EIP-712
        from ..ledger.evm import EvmLedger

        ledger = EvmLedger.from_config(ledger_cfg, signer=key)
        journal.encode_message = ledger.sign_message  # the outbox stores and resends these bytes
    else:
        from ..ledger.rest import RestLedger

        ledger = RestLedger(
            ledger_cfg.url,
            timeout_ms=ledger_cfg.timeout_ms,
            retries=ledger_cfg.retries,
            backoff_ms=ledger_cfg.backoff_ms,
            verify_tls=ledger_cfg.verify_tls,
            signer=key,  # reads of the device's own account and trades are signed (the ledger shows them to nobody else)
            ledger_id=ledger_cfg.ledger_id,
        )
    meters = MeterSet.from_config(config)
    dgr = DgrClient(config.dgr)
    return Controller(config, journal=journal, key=key, meters=meters, dgr=dgr, ledger=ledger, events=events)


def run_daemon(config: BoardConfig, *, key_path: Path, stop_event: threading.Event | None = None) -> int:
    # systemd's watchdog kills with SIGABRT: dump every thread's stack to stderr (the journal) first,
    # so a hang says where it hung.
    faulthandler.enable()
    tee = ConsoleTee(sys.stdout)
    events = EventLog(config.board.name, stream=tee)
    notifier = Notifier()
    # The control socket first: a second daemon on the same board must stop before it opens the
    # journal or the router's line.
    control: ControlServer | None = ControlServer(config.control_socket_path)
    try:
        control.bind()
    except ControlSocketInUse as exc:
        events.emit("alarm.already_running", detail=str(exc))
        print(f"dgc: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        events.emit("alarm.control_socket", socket=str(config.control_socket_path), detail=str(exc),
                    action="running without dgc status")
        control = None
    try:
        return _run(config, key_path, stop_event, events, tee, notifier, control)
    finally:
        if control is not None:
            control.close()
        notifier.close()


def _run(config: BoardConfig, key_path: Path, stop_event: threading.Event | None, events: EventLog, tee: ConsoleTee,
         notifier: Notifier, control: ControlServer | None) -> int:
    controller = build_controller(config, key_path, events)
    # The router first (issue 7 o): a restarted process's first frame reaches the router's
    # watchdog before anything slow (imports, meters, the ledger), so a transfer running across
    # the restart is not cut short; an operator's SAFE from before the restart is commanded again.
    controller.greet_router()
    controller.ctx.monotonic = time.monotonic  # the clock guard notices clock steps between checks

    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.interval import IntervalTrigger
    stop = stop_event or threading.Event()
    starting = threading.Event()
    starting.set()

    received: list[str] = []

    def _on_signal(signum, _frame):
        # No lock may be taken here: the handler runs in the main thread between two bytecodes,
        # perhaps inside events.emit holding its lock (a deadlock seen in a test). Set flags only.
        received.append(signal.Signals(signum).name)
        stop.set()
        controller.outbox.stop_requested.set()
        if starting.is_set():
            starting.clear()
            raise _StopDuringStart()  # out of whatever start-up call is waiting (runs in the main thread)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    events.emit("starting", device=controller.key.device_id, ledger=redact_url(config.ledger.url),
                slot_s=config.market.slot_seconds, markets_ahead=config.market.markets_ahead)
    cadence = config.cadence
    slot_s = config.market.slot_seconds
    scheduler = BackgroundScheduler(
        # Threads are what the jobs need (issue 7 part 7), each lane so that nothing slow blocks what
        # must not wait: "edge" starts deliveries at the slot edge; "devices" feeds the router's
        # watchdog and reads the meters, never waiting on the ledger; "default" (2 workers) runs
        # the jobs that talk to the ledger. The health check runs in the main thread (below).
        executors={"default": ThreadPoolExecutor(2), "devices": ThreadPoolExecutor(1), "edge": ThreadPoolExecutor(1)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": max(1, slot_s // 2)},
        timezone=timezone.utc,
    )
    monitor = JobMonitor()

    def every(seconds: float, **kw) -> IntervalTrigger:
        return IntervalTrigger(seconds=seconds, timezone=timezone.utc, **kw)

    def add(fn, trigger, job_id: str, **kw) -> None:
        scheduler.add_job(monitor.wrap(job_id, fn), trigger, id=job_id, **kw)

    # The router's heartbeat runs from before the recovery on: start-up waits on the ledger (the
    # account's nonce floor, the clock), and a hung ledger would otherwise leave the router's
    # watchdog unfed for several ledger timeouts and cut a transfer running across the restart
    # (hil_tests/test_daemon_restart.py). The other jobs are added once the journal is recovered.
    add(controller.heartbeat, every(max(1, config.dgr.heartbeat_seconds)), "dgr_heartbeat", executor="devices")
    scheduler.start()
    notifier.status("recovering from the journal")
    try:
        controller.measure()
        controller.recover()
        starting.clear()
    except _StopDuringStart:
        events.emit("stopping", signal=received[0] if received else "-", during="start-up")
        notifier.stopping("stopping during start-up")
        scheduler.shutdown(wait=False)
        _wait_for_jobs(monitor, STOP_GRACE_SECONDS)
        controller.close()
        events.emit("stopped", during="start-up")
        return 0

    now = time.time()
    next_edge = datetime.fromtimestamp(config.market.next_slot_start(int(now)), tz=timezone.utc)
    console: SerialConsole | None = None
    status = StatusService(controller, monitor, console_state=lambda: console.state() if console else None)

    add(controller.slot_edge, every(slot_s, start_date=next_edge), "slot_edge", executor="edge")
    add(controller.measure, every(cadence.measure_seconds), "measure", executor="devices")
    # Per-device bid jitter (issue 10 part 5, firmware/jitter.py): the grid k*bid_seconds + offset,
    # the first bid offset after the start.
    bid_offset_ms = jitter.bid_offset_ms(controller.ctx.key.device_id, cadence.bid_seconds, cadence.bid_jitter_seconds)
    now_s = time.time()
    add(controller.bid, every(cadence.bid_seconds,
                              start_date=datetime.fromtimestamp(jitter.bid_anchor_s(now_s, cadence.bid_seconds, bid_offset_ms),
                                                                timezone.utc)),
        "bid", next_run_time=datetime.fromtimestamp(now_s + bid_offset_ms / 1000, timezone.utc))
    add(controller.review, every(cadence.review_seconds), "review")
    add(controller.poll_trades, every(cadence.poll_trades_seconds), "poll_trades")
    add(controller.flush_outbox, every(cadence.outbox_seconds), "outbox", next_run_time=datetime.now(timezone.utc))
    add(controller.deliveries_tick, every(max(1, cadence.poll_trades_seconds)), "deliveries")
    add(controller.check_clock, every(cadence.clock_check_seconds), "clock")

    health_state = {"healthy": True}

    def health_job() -> None:
        """The watchdog's heartbeat: it runs in the main thread (no job can starve it), judges the
        scheduler's jobs from outside (status.py), and pings systemd only when the check passes."""
        verdict = status.check_health()
        line = _safe_status_line(status)
        if line.startswith("status unavailable"):  # the journal cannot even be read: do not ping
            verdict = status.mark_unhealthy(line)
            line = f"UNHEALTHY ({line})"
        if verdict.healthy:
            notifier.watchdog(line)
        else:
            notifier.status(line)
        if verdict.healthy != health_state["healthy"]:
            health_state["healthy"] = verdict.healthy
            if verdict.healthy:
                events.emit("health.ok")
            else:
                events.emit("alarm.unhealthy", detail="; ".join(verdict.problems) or line,
                            action="watchdog pings stopped" if notifier.watchdog_interval_s else "none (no watchdog)")

    health_s = notifier.watchdog_interval_s or HEALTH_CHECK_SECONDS
    if control is not None:
        control.serve(status.handle)
    if config.console.tty:
        console = SerialConsole(config.console.tty, config.console.baudrate, status.handle, tee,
                                board_name=config.board.name).start()
    events.emit("running", jobs=len(scheduler.get_jobs()), control_socket=control.path if control else "-",
                console=config.console.tty or "-", watchdog_s=health_s if notifier.watchdog_interval_s else "-")
    notifier.ready(_safe_status_line(status))
    try:
        # First health check one interval after the start: READY=1 (above) comes before any WATCHDOG=1.
        next_health = time.monotonic() + health_s
        while not stop.wait(max(0.05, min(1.0, next_health - time.monotonic()))):
            if time.monotonic() >= next_health:
                next_health += health_s
                health_job()
    finally:
        events.emit("stopping", signal=received[0] if received else "-")
        notifier.stopping("stopping: finishing the running jobs")
        controller.outbox.stop_requested.set()
        if control is not None:
            control.close()
        scheduler.shutdown(wait=False)
        busy = _wait_for_jobs(monitor, STOP_GRACE_SECONDS)
        if console is not None:
            console.stop()
        if busy:
            # A job is stuck in a call that will not end soon: leave it, as a kill would.
            events.emit("stopped", abandoned=",".join(busy))
            sys.stdout.flush()
            sys.stderr.flush()
            if control is not None:
                control.close()
            notifier.close()
            os._exit(0)
        controller.close()
        events.emit("stopped")
    return 0


def _wait_for_jobs(monitor: JobMonitor, grace_s: float) -> list[str]:
    """Wait up to ``grace_s`` for the running jobs to end; the ones still running then."""
    deadline = time.monotonic() + grace_s
    while True:
        busy = sorted(name for name, job in monitor.snapshot().items() if job["running"])
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(0.05)


def _safe_status_line(status: StatusService) -> str:
    try:
        return status.status_line()
    except Exception as exc:
        return f"status unavailable: {type(exc).__name__}: {exc}"
