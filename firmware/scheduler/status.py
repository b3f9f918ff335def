"""What the running daemon says about itself: one place for the control socket, the serial
console, systemd's STATUS= line and the watchdog's health verdict.

Why one place: `dgc status` over the socket, `status` typed on the serial console and
`systemctl status` must tell the same story from the same journal and health state, and none of
them may ever show key material (only the device id, which is public, and counts, ids and
integers from the journal).

Healthy (the condition for ``WATCHDOG=1``) means the daemon can still do its job, not that the
world around it is well: a dead ledger or a silent meter is reported in the status but does not
make the daemon unhealthy, because a restart would not fix them. Unhealthy is:

- the ``measure`` job (default thread pool) has not finished a run for 3 measure periods + 30 s:
  the pool is stuck or exhausted;
- the ``slot_edge`` job (its own executor) did not start within ``EDGE_GRACE_SECONDS`` of the last
  slot edge, or has been running for more than half a slot: the job that starts deliveries is
  stuck, or the clock jumped under the scheduler (no RTC on a Pi: the first NTP sync can);
- the journal cannot commit a write (disk full, read-only remount, SD card gone).

A restart is then the right cure; it does not cut running transfers, which carry their own end
time and energy target.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

EDGE_GRACE_SECONDS = 10  # the slot-edge job must start within this after each slot start
MEASURE_OVERDUE_PERIODS = 3
MEASURE_OVERDUE_EXTRA_SECONDS = 30
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 500
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
COMMANDS = ("status", "orders", "trades", "deliveries", "meters", "safe", "resume", "log_level")


class RequestError(ValueError):
    """A request the daemon cannot answer as asked; the text says what was expected."""


@dataclass
class JobRecord:
    runs: int = 0
    errors: int = 0
    running_since: float | None = None  # wall clock
    last_start: float | None = None  # wall clock
    last_end_monotonic: float | None = None
    last_error: str | None = None
    recent_starts: deque = field(default_factory=lambda: deque(maxlen=64))  # wall clock; enough for 1-s slots


class JobMonitor:
    """Records when the scheduled jobs start and end, so liveness can be judged from outside them."""

    def __init__(self, clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self.jobs: dict[str, JobRecord] = {}
        self.started_at = clock()
        self.started_monotonic = monotonic()

    def wrap(self, job_id: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        record = self.jobs.setdefault(job_id, JobRecord())

        def run() -> Any:
            with self._lock:
                record.running_since = record.last_start = self._clock()
                record.recent_starts.append(record.last_start)
            try:
                return fn()
            except Exception as exc:
                with self._lock:
                    record.errors += 1
                    record.last_error = f"{type(exc).__name__}: {exc}"[:200]
                raise  # APScheduler logs it with the traceback; the next run starts afresh
            finally:
                with self._lock:
                    record.runs += 1
                    record.running_since = None
                    record.last_end_monotonic = self._monotonic()

        run.__name__ = getattr(fn, "__name__", job_id)
        return run

    def snapshot(self) -> dict[str, dict]:
        now = self._monotonic()
        with self._lock:
            return {
                name: {
                    "runs": r.runs,
                    "errors": r.errors,
                    "running": r.running_since is not None,
                    "last_start": int(r.last_start) if r.last_start else None,
                    "seconds_since_end": round(now - r.last_end_monotonic, 1) if r.last_end_monotonic is not None else None,
                    "last_error": r.last_error,
                }
                for name, r in self.jobs.items()
            }

    def problems(self, *, slot_seconds: int, measure_seconds: int) -> list[str]:
        """Why the daemon is not healthy (empty: healthy as far as its jobs go)."""
        problems = []
        now, mono = self._clock(), self._monotonic()
        with self._lock:
            measure = self.jobs.get("measure")
            edge = self.jobs.get("slot_edge")
            if measure is not None:
                last = measure.last_end_monotonic if measure.last_end_monotonic is not None else self.started_monotonic
                limit = MEASURE_OVERDUE_PERIODS * measure_seconds + MEASURE_OVERDUE_EXTRA_SECONDS
                if mono - last > limit:
                    problems.append(f"measure job overdue: no run finished for {mono - last:.0f} s (limit {limit} s)")
            if edge is not None:
                if edge.running_since is not None and now - edge.running_since > slot_seconds / 2:
                    problems.append(f"slot_edge job running for {now - edge.running_since:.0f} s (limit {slot_seconds / 2:.0f} s)")
                # The newest slot edge old enough to judge; edges before the scheduler ran are not the job's.
                last_edge = int(now - EDGE_GRACE_SECONDS) // slot_seconds * slot_seconds
                if last_edge > self.started_at:
                    for_edge = [t for t in edge.recent_starts if last_edge <= t < last_edge + slot_seconds]
                    if not for_edge:
                        problems.append(f"slot_edge job missed the slot edge at {last_edge}")
                    elif min(for_edge) - last_edge > EDGE_GRACE_SECONDS:
                        problems.append(f"slot_edge job started {min(for_edge) - last_edge:.1f} s after the slot edge "
                                        f"at {last_edge} (limit {EDGE_GRACE_SECONDS} s)")
        return problems


@dataclass
class HealthState:
    healthy: bool = True
    problems: list[str] = field(default_factory=list)
    checked_at: int | None = None


def redact_url(url: str) -> str:
    """A URL without user info or query: either may carry a credential."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("dgc-firmware")
    except Exception:  # not installed as a distribution (a bare checkout)
        return "unknown"


class StatusService:
    """Answers the control socket's and the console's requests from the controller's state.

    ``console_state`` is a callable returning a small dict about the serial console (or None)."""

    def __init__(self, controller, monitor: JobMonitor, *, console_state: Callable[[], dict | None] = lambda: None):
        self.controller = controller
        self.monitor = monitor
        self.health = HealthState()
        self.console_state = console_state
        self._health_lock = threading.Lock()
        self.version = _package_version()
        self.install_prefix = os.path.realpath(sys.prefix)  # /opt/dgc/releases/<version>/venv on a board

    # -- health --------------------------------------------------------------------------

    def check_health(self) -> HealthState:
        """Judge liveness (see the module docstring); stores and returns the verdict."""
        config = self.controller.config
        problems = self.monitor.problems(slot_seconds=config.market.slot_seconds, measure_seconds=config.cadence.measure_seconds)
        try:
            self.controller.journal.check_writable()
        except Exception as exc:  # sqlite3.Error, OSError: either way the journal is not taking writes
            problems.append(f"journal not writable: {type(exc).__name__}: {exc}")
        with self._health_lock:
            self.health = HealthState(healthy=not problems, problems=problems, checked_at=int(time.time()))
            return self.health

    def mark_unhealthy(self, problem: str) -> HealthState:
        with self._health_lock:
            self.health = HealthState(healthy=False, problems=[*self.health.problems, problem], checked_at=int(time.time()))
            return self.health

    # -- queries -------------------------------------------------------------------------

    def status(self) -> dict:
        c = self.controller
        cfg = c.config
        health = c.health
        now = time.time()
        journal = c.journal
        orders = journal.order_counts()
        deliveries = journal.delivery_counts()
        meters = {}
        for meter in cfg.meters:
            last_ms = health.last_reading_ms.get(meter.name)
            meters[meter.name] = {
                "ok": health.meters_ok.get(meter.name),
                "role": meter.role,
                "last_reading_age_s": round(now - last_ms / 1000, 1) if last_ms else None,
            }
        with self._health_lock:
            verdict = self.health
        return {
            "board": cfg.board.name,
            "kind": cfg.board.kind,
            "device_id": c.key.device_id,
            "pid": os.getpid(),
            "version": self.version,
            "install_prefix": self.install_prefix,
            "started_at": int(self.monitor.started_at),
            "uptime_s": int(now - self.monitor.started_at),
            "healthy": verdict.healthy,
            "problems": list(verdict.problems),
            "health_checked_at": verdict.checked_at,
            "ledger": {
                "url": redact_url(cfg.ledger.url),
                "kind": cfg.ledger.kind,
                # a public key, pinned at provisioning: what a trade must be proven against (issue 10 part 4)
                "authority_public_key": cfg.ledger.authority_public_key or None,
                "reachable": health.ledger_reachable,
                # Why and since when it is unreachable, and a refusal of this device (issue 7 h, p).
                "down_since": _seconds(health.ledger_down_since_ms),
                "detail": health.ledger_detail,
                "refusal": health.ledger_refusal,
                "retry_at": _seconds(health.ledger_retry_at_ms),
            },
            "clock": {"ok": health.clock_ok, "skew_ms": health.clock_skew_ms, "bound_ms": cfg.ledger.max_clock_skew_ms,
                      "round_trip_ms": health.clock_round_trip_ms, "checked_at": _seconds(health.clock_checked_at_ms),
                      "problem": health.clock_problem},
            "meters": meters,
            "dgr": {"ok": health.dgr_ok, "port": cfg.dgr.port},
            "orders": {"open": sum(orders.get(s, 0) for s in ("sending", "open", "cancelling")), "by_state": orders},
            "deliveries": deliveries,
            "trades": journal.trade_count(),
            "outbox_pending": journal.pending_count(),
            "outbox": journal.outbox_counts(),
            "refused_trades": journal.refused_trade_count(),
            "next_nonce": journal.next_nonce(),
            "jobs": self.monitor.snapshot(),
            "log_level": logging.getLevelName(logging.getLogger().level),
            "console": self.console_state(),
        }

    def orders(self, limit: int = 100) -> list[dict]:
        return [
            {"nonce": o.nonce, "market_id": o.market_id, "side": o.side, "energy_wh": o.energy_wh,
             "price_per_kwh_minor": o.price_per_kwh_minor, "state": o.state, "filled_wh": o.filled_wh}
            for o in self.controller.journal.open_orders(limit)
        ]

    def trades(self, limit: int = DEFAULT_LIST_LIMIT) -> list[dict]:
        return self.controller.journal.recent_trades(limit)

    def deliveries(self, limit: int = DEFAULT_LIST_LIMIT) -> list[dict]:
        return [
            {"trade_id": d.trade_id, "market_id": d.market_id, "direction": d.direction, "energy_wh": d.energy_wh,
             "state": d.state, "delivered_wh": d.delivered_wh, "outcome": d.outcome, "detail": d.detail}
            for d in self.controller.journal.recent_deliveries(limit)
        ]

    def meters(self) -> list[dict]:
        c = self.controller
        now_ms = time.time() * 1000
        out = []
        for meter in c.config.meters:
            last = c.journal.last_reading(meter.name)
            out.append({
                "name": meter.name, "role": meter.role, "model": meter.model, "ok": c.health.meters_ok.get(meter.name),
                "taken_at_ms": last[0] if last else None,
                "age_s": round((now_ms - last[0]) / 1000, 1) if last else None,
                "import_energy_wh": last[1] if last else None,
                "export_energy_wh": last[2] if last else None,
            })
        return out

    def safe(self) -> dict:
        ok, detail = self.controller.operator_safe_state()
        return {"safe_state_confirmed": ok, "detail": detail}

    def resume(self) -> dict:
        """The operator lifts their SAFE (it persists across restarts until this)."""
        ok, detail = self.controller.operator_resume()
        return {"resumed": ok, "detail": detail}

    def set_log_level(self, level: Any) -> dict:
        if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
            raise RequestError(f"log level {str(level)[:40]!r}: expected one of {', '.join(LOG_LEVELS)}")
        logging.getLogger().setLevel(level.upper())
        return {"log_level": level.upper()}

    # -- one entry point for both the socket and the console ------------------------------

    def handle(self, request: Any) -> dict:
        """``{"cmd": ..., ...}`` -> ``{"ok": true, "cmd": ..., <result>}`` or ``{"ok": false, "error": ...}``."""
        try:
            if not isinstance(request, dict):
                raise RequestError(f"expected a JSON object such as {{\"cmd\": \"status\"}}, found {type(request).__name__}")
            cmd = request.get("cmd")
            if cmd not in COMMANDS:
                raise RequestError(f"cmd {str(cmd)[:40]!r}: expected one of {', '.join(COMMANDS)}")
            limit = request.get("limit", DEFAULT_LIST_LIMIT if cmd in ("trades", "deliveries") else 100)
            if type(limit) is not int or not 1 <= limit <= MAX_LIST_LIMIT:
                raise RequestError(f"limit {str(limit)[:20]!r}: expected an integer from 1 to {MAX_LIST_LIMIT}")
            if cmd == "status":
                result: dict = {"status": self.status()}
            elif cmd == "orders":
                result = {"orders": self.orders(limit)}
            elif cmd == "trades":
                result = {"trades": self.trades(limit)}
            elif cmd == "deliveries":
                result = {"deliveries": self.deliveries(limit)}
            elif cmd == "meters":
                result = {"meters": self.meters()}
            elif cmd == "safe":
                result = self.safe()
            elif cmd == "resume":
                result = self.resume()
            else:
                result = self.set_log_level(request.get("level"))
        except RequestError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a journal or driver error: answer it, never kill the server thread
            logging.getLogger(__name__).exception("control request %r failed", request)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        return {"ok": True, "cmd": cmd, **result}

    def status_line(self) -> str:
        """The one line for systemd's STATUS= (shown by `systemctl status dgc`)."""
        return status_line(self.status())


# -- text forms (shared by the console and `dgc status`; pure functions of the JSON answers) ----


def _seconds(ms: int | None) -> int | None:
    return None if ms is None else int(ms // 1000)


def _clock_time(epoch_s: int) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(epoch_s)) + " UTC"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _duration(seconds: int) -> str:
    d, rem = divmod(int(seconds), 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}d" if d else "") + (f"{h}h" if d or h else "") + f"{m}m{s:02d}s"


def _ok(value: bool | None, good: str = "ok", bad: str = "failing") -> str:
    return "unknown" if value is None else (good if value else bad)


def trading_line(s: dict) -> str:
    running = s["deliveries"].get("running", 0)
    clock = s["clock"]
    if clock["ok"]:
        clock_text = "clock ok"
    elif clock.get("problem"):
        clock_text = f"clock NOT trusted: {clock['problem']}"
    else:
        clock_text = f"clock skew {clock['skew_ms']} ms beyond {clock['bound_ms']} ms"
    led = s["ledger"]
    reachable = led["reachable"]
    if reachable is None and clock["skew_ms"] is not None:
        reachable = True  # no message sent yet, but the ledger answered the clock check
    ledger = _ok(reachable, "ok", "unreachable")
    if reachable is False and led.get("down_since"):
        ledger = f"unreachable since {_clock_time(led['down_since'])}"
    if led.get("refusal"):
        ledger = f"REFUSES THIS DEVICE ({led['refusal']})"
    deliveries = f"{running} {'delivery' if running == 1 else 'deliveries'} running"
    return f"trading: {_plural(s['orders']['open'], 'open order')}, {deliveries}, ledger {ledger}, {clock_text}"


def status_line(s: dict) -> str:
    line = trading_line(s)
    if not s["healthy"]:
        line = "UNHEALTHY (" + "; ".join(s["problems"]) + ") " + line
    return line


def record_line(s: dict) -> str:
    """What a trade is checked against before it may move energy (scheduler/trade_record.py).

    Why on the status page: an operator who provisioned a board must see at a glance that the
    ledger authority's key was pinned; without it a field board refuses every trade and signs
    no order, which would otherwise look like a quiet market."""
    led = s["ledger"]
    if led.get("kind") == "evm":
        return "record: the chain; trades are read from the node's logs at the confirmation depth"
    key = led.get("authority_public_key")
    if key:
        return f"record authority pinned: {key[:10]}...{key[-6:]} (a trade moves energy only once proven in its signed record)"
    if s.get("kind") == "sim":
        return "record authority NOT pinned: this sim board trades without checking the record ([ledger] authority_public_key)"
    return ("record authority NOT pinned: every trade is refused and no order is signed until it is "
            "([ledger] authority_public_key; dgc-host provision pins it)")


def format_status(s: dict) -> list[str]:
    meters = ", ".join(
        f"{name} {_ok(m['ok'])}" + (f" ({m['last_reading_age_s']:.0f} s ago)" if m["last_reading_age_s"] is not None else "")
        for name, m in s["meters"].items()
    )
    d = s["deliveries"]
    lines = [
        f"board {s['board']} ({s['kind']}) device {s['device_id']} pid {s['pid']} up {_duration(s['uptime_s'])} version {s['version']}",
        "health: ok" if s["healthy"] else "health: UNHEALTHY: " + "; ".join(s["problems"]),
        trading_line(s),
        f"meters: {meters}; dgr {_ok(s['dgr']['ok'])}",
        f"deliveries: {d.get('scheduled', 0)} scheduled, {d.get('running', 0)} running, {d.get('metered', 0)} metered, "
        f"{d.get('reported', 0)} reported ({d.get('failed', 0)} failed); trades {s['trades']}; "
        f"outbox {s['outbox_pending']} pending; next nonce {s['next_nonce']}",
        f"ledger {s['ledger']['url']}; log level {s['log_level']}; installed at {s['install_prefix']}",
        record_line(s),
    ]
    led = s["ledger"]
    if led.get("reachable") is False and led.get("detail"):
        lines.append(f"ledger unreachable since {_clock_time(led['down_since'])}: {led['detail']}"
                     if led.get("down_since") else f"ledger unreachable: {led['detail']}")
    if led.get("refusal"):
        retry = f"; asking again at {_clock_time(led['retry_at'])}" if led.get("retry_at") else ""
        lines.append(f"ledger refuses this device: {led['refusal']}{retry} (register or re-provision the board)")
    if s.get("refused_trades"):
        lines.append(f"{_plural(s['refused_trades'], 'trade')} refused: they match no order of this board "
                     "(see alarm.trade_refused in the log)")
    expired = (s.get("outbox") or {}).get("expired", 0)
    if expired:
        lines.append(f"outbox: {_plural(expired, 'message')} expired unsent and dropped")
    return lines


def format_answer(answer: dict) -> list[str]:
    """Human lines for any answer of :meth:`StatusService.handle`."""
    if not answer.get("ok"):
        return [f"error: {answer.get('error')}"]
    cmd = answer.get("cmd")
    if cmd == "status":
        return format_status(answer["status"])
    if cmd == "orders":
        rows = answer["orders"]
        return [f"{len(rows)} open orders"] + [
            f"order nonce={o['nonce']} market={o['market_id']} {o['side']} {o['energy_wh']} Wh at {o['price_per_kwh_minor']}/kWh "
            f"state={o['state']} filled={o['filled_wh']} Wh" for o in rows]
    if cmd == "trades":
        rows = answer["trades"]
        return [f"{len(rows)} most recent trades"] + [
            f"trade {t['trade_id']} market={t['market_id']} {t['side']} {t['energy_wh']} Wh at {t['price_per_kwh_minor']}/kWh "
            f"order={t['order_nonce']} counterparty={t['counterparty'][:12]}" for t in rows]
    if cmd == "deliveries":
        rows = answer["deliveries"]
        return [f"{len(rows)} most recent deliveries"] + [
            f"delivery trade={d['trade_id']} market={d['market_id']} {d['direction']} {d['energy_wh']} Wh state={d['state']} "
            f"delivered={d['delivered_wh'] if d['delivered_wh'] is not None else '-'} Wh outcome={d['outcome'] or '-'}"
            + (f" ({d['detail']})" if d["detail"] else "") for d in rows]
    if cmd == "meters":
        return [
            f"meter {m['name']} ({m['role']}, {m['model']}) {_ok(m['ok'])}: "
            + (f"import {m['import_energy_wh']} Wh export {m['export_energy_wh']} Wh, {m['age_s']:.0f} s ago"
               if m["taken_at_ms"] is not None else "no reading yet")
            for m in answer["meters"]]
    if cmd == "safe":
        return [("DGR safe state confirmed" if answer["safe_state_confirmed"] else "DGR safe state NOT confirmed")
                + f": {answer['detail']}"]
    if cmd == "resume":
        return [("DGR resumed" if answer["resumed"] else "DGR resume NOT confirmed") + f": {answer['detail']}"]
    if cmd == "log_level":
        return [f"log level {answer['log_level']}"]
    return [str(answer)]
