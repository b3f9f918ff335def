"""DGR (digital grid router) emulator: the router's side of DGR serial protocol v1.

Why an asyncio component rather than a thread or a process: the bench runs it in the same
event loop as the Modbus meter emulator, and the interchange meter must count exactly the
energy this router moves (``energy_sink``) — one loop, no cross-thread hand-off, no drift.

What it models: framing and checksum (shared codec ``firmware.drivers.dgr_frames``), the
answer window that makes retries idempotent, sessions (HELLO), modes idle/transfer/safe/fault,
transfers that stop by themselves at their energy target or their end time, the heartbeat
watchdog, unsolicited events, and fault injection (``inject``/``clear``, below). What it does
not model: power ramps, losses, the battery (``soc_percent`` is just a settable number).

Energy is integrated in exact units of 1/1024 Wh. Why: every increment handed to
``energy_sink`` is then a dyadic float, so any consumer that sums them in any order gets the
router's own total exactly (no float drift), and a transfer capped at its target has moved
exactly ``energy_wh`` — what settlement on the certified meter expects.

Fault injection is one API taking a plain dict, so a fault can travel as JSON from a test, the
bench's control socket (``dgc-host bench fault``) or a script alike: ``inject({"kind": ...})``,
``clear()``, ``active_faults()``; the kinds are in ``FAULT_KINDS`` and docs/dgr-protocol.md,
section 11. Why a dict rather than one method per fault: the bench house runs in another
process, and one validated vocabulary serves every caller with the same error messages.

Threading: all protocol work happens on the loop. Any thread may read state with
``snapshot()`` and call ``inject``/``clear``/``inject_raw``/``reboot``: fault counters live
under the same lock as the router state, and actions that touch the line are handed to the
loop with ``call_soon_threadsafe``. The older attributes (``drop_next_requests``,
``drop_next_replies``, ``corrupt_next_checksums``, ``reply_delay_s``) remain as properties
over the same state.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import serial

from firmware.drivers import dgr_frames as f

log = logging.getLogger(__name__)

ENERGY_QUANTUM_PER_WH = 1024  # internal unit: 1/1024 Wh (see module docstring)
_SESSION_RE = re.compile(r"[0-9a-f]{8}\Z")
_FAULT_RE = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")
MAX_TRADE_ID = 2**63 - 1
MAX_ENERGY_WH = 10**9
MAX_DURATION_S = 86_400  # a START may not reach further than a day: a typo must not run for weeks
ENDED_MEMORY = 32  # ended transfers remembered for STOP answers
MAX_OUTPUT_BYTES = 64 * 1024  # like a UART TX FIFO: beyond this, output is dropped, the loop never blocks
COMMAND_LOG_LENGTH = 1000

# --- fault injection vocabulary ------------------------------------------------------------------

FAULT_KINDS = ("dropped_frame", "delay", "bad_checksum", "error_reply", "fault", "stuck_in_fault", "reboot", "link_cut")
MAX_FAULT_COUNT = 1_000_000
MAX_DELAY_MS = 60_000
MAX_LINK_CUT_MS = 86_400_000
_FAULT_KEYS: dict[str, dict[str, bool]] = {  # kind -> {key: required}
    "dropped_frame": {"count": False, "which": False},
    "delay": {"delay_ms": True, "count": False},
    "bad_checksum": {"count": False},
    "error_reply": {"code": True, "count": False, "verb": False},
    "fault": {"code": True},
    "stuck_in_fault": {"code": True},
    "reboot": {},
    "link_cut": {"duration_ms": False},
}


class FaultSpecError(ValueError):
    """A fault description that cannot be applied; the message names the key and what was expected."""


def _spec_int(spec: Mapping[str, Any], key: str, low: int, high: int, default: int | None = None) -> int | None:
    value = spec.get(key, default)
    if value is None:
        return None
    if type(value) is not int or not low <= value <= high:
        raise FaultSpecError(f"{spec.get('kind')} fault: {key}: expected an integer from {low} to {high}, found {value!r}")
    return value


def parse_fault(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a fault description (a dict, e.g. decoded JSON) and return it normalized, with
    defaults filled in. Raises FaultSpecError naming what was wrong and what was expected.

    Unknown keys are refused for the same reason the protocol refuses them: a misspelt
    ``count`` silently ignored would run a different experiment than the one asked for."""
    if not isinstance(spec, Mapping):
        raise FaultSpecError(f"fault: expected an object like {{\"kind\": \"link_cut\"}}, found {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in _FAULT_KEYS:
        raise FaultSpecError(f"fault kind: expected one of {', '.join(FAULT_KINDS)}, found {kind!r}")
    allowed = _FAULT_KEYS[kind]
    unknown = sorted(k for k in spec if k != "kind" and k not in allowed)
    if unknown:
        expected = ", ".join(allowed) or "no other key"
        raise FaultSpecError(f"{kind} fault: unknown key {unknown[0]!r}; expected {expected}")
    missing = [k for k, required in allowed.items() if required and k not in spec]
    if missing:
        raise FaultSpecError(f"{kind} fault: missing key {missing[0]!r}")
    out: dict[str, Any] = {"kind": kind}
    if kind == "dropped_frame":
        out["count"] = _spec_int(spec, "count", 1, MAX_FAULT_COUNT, 1)
        which = spec.get("which", "answer")
        if which not in ("request", "answer"):
            raise FaultSpecError(f"dropped_frame fault: which: expected 'request' (lost on its way to the router, "
                                 f"not executed) or 'answer' (executed, answer lost), found {which!r}")
        out["which"] = which
    elif kind == "delay":
        out["delay_ms"] = _spec_int(spec, "delay_ms", 0, MAX_DELAY_MS)
        out["count"] = _spec_int(spec, "count", 1, MAX_FAULT_COUNT)  # None: every answer until cleared
    elif kind == "bad_checksum":
        out["count"] = _spec_int(spec, "count", 1, MAX_FAULT_COUNT, 1)
    elif kind == "error_reply":
        code = spec["code"]
        if isinstance(code, str) and code in f.ERROR_NAMES:
            code = f.ERROR_NAMES[code]
        if type(code) is not int or code not in f.ERROR_CODES:
            names = ", ".join(f"{c} {e.name}" for c, e in f.ERROR_CODES.items())
            raise FaultSpecError(f"error_reply fault: code: expected a protocol error code ({names}), found {spec['code']!r}")
        out["code"] = code
        out["count"] = _spec_int(spec, "count", 1, MAX_FAULT_COUNT, 1)
        verb = spec.get("verb")
        if verb is not None and verb not in f.REQUEST_VERBS:
            raise FaultSpecError(f"error_reply fault: verb: expected one of {', '.join(f.REQUEST_VERBS)}, found {verb!r}")
        out["verb"] = verb
    elif kind in ("fault", "stuck_in_fault"):
        code = spec["code"]
        if not isinstance(code, str) or not _FAULT_RE.match(code) or code == "heartbeat_lost":
            raise FaultSpecError(f"{kind} fault: code: expected a lower-case hardware fault name like overtemp "
                                 f"(a-z, 0-9, _; not heartbeat_lost, which the watchdog owns), found {code!r}")
        out["code"] = code
    elif kind == "link_cut":
        out["duration_ms"] = _spec_int(spec, "duration_ms", 1, MAX_LINK_CUT_MS)  # None: until cleared
    return out


@dataclass
class _FaultPlan:
    """What is still to be injected; mutated only under the emulator's lock."""

    drop_requests: int = 0
    drop_answers: int = 0
    corrupt_answers: int = 0
    delay_s: float = 0.0
    delay_count: int | None = None  # None with delay_s > 0: every answer until cleared
    nak_code: int = 0
    nak_count: int = 0
    nak_verb: str | None = None
    link_cut: bool = False
    link_cut_until: float | None = None  # time.monotonic(); None: until cleared
    stuck: set[str] = field(default_factory=set)  # causes that keep their fault latched through RESUME

    def active(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.drop_requests:
            out.append({"kind": "dropped_frame", "which": "request", "remaining": self.drop_requests})
        if self.drop_answers:
            out.append({"kind": "dropped_frame", "which": "answer", "remaining": self.drop_answers})
        if self.delay_s > 0:
            out.append({"kind": "delay", "delay_ms": round(self.delay_s * 1000), "remaining": self.delay_count})
        if self.corrupt_answers:
            out.append({"kind": "bad_checksum", "remaining": self.corrupt_answers})
        if self.nak_count:
            out.append({"kind": "error_reply", "code": self.nak_code, "name": f.ERROR_CODES[self.nak_code].name,
                        "verb": self.nak_verb, "remaining": self.nak_count})
        for code in sorted(self.stuck):
            out.append({"kind": "stuck_in_fault", "code": code})
        if self.link_cut:
            left = None if self.link_cut_until is None else max(0, round((self.link_cut_until - time.monotonic()) * 1000))
            out.append({"kind": "link_cut", "remaining_ms": left})
        return out


@dataclass(frozen=True)
class EmulatedTransfer:
    trade_id: int
    direction: str
    power_w: int
    end_at: int
    energy_wh: int
    started_at: float
    moved_wh: float


@dataclass(frozen=True)
class EndedTransfer:
    trade_id: int
    direction: str
    energy_wh: int
    moved_wh: float
    reason: str
    ended_at: float


@dataclass(frozen=True)
class CommandRecord:
    """A request the router processed and answered from scratch, with ACK or a stored NAK.
    Replays of a retried seq are not processed again and not logged; neither are frames refused
    before processing (NAK 10/11/23/30) or dropped by fault injection."""

    seq: int
    verb: str
    args: dict
    at: float
    answer: str  # "ACK" or e.g. "NAK 33 END_PAST"


@dataclass(frozen=True)
class DgrEmulatorState:
    mode: str
    session: str | None
    transfers: tuple[EmulatedTransfer, ...]
    ended: tuple[EndedTransfer, ...]
    export_wh: float
    import_wh: float
    soc_percent: int
    faults: tuple[str, ...]
    commands: tuple[CommandRecord, ...]
    replays: int  # answers sent again from the window for a retried seq
    bad_lines: int  # lines that were not valid frames
    events_sent: tuple[str, ...]  # event lines as sent (without CRC/LF), oldest first
    injected: tuple[dict, ...] = ()  # fault injection still pending or in force (see active_faults())
    fault_counters: dict = field(default_factory=dict)  # what fault injection did so far, by effect
    link_cut: bool = False

    def executed(self, verb: str) -> list[CommandRecord]:
        return [c for c in self.commands if c.verb == verb]


class _Transfer:
    __slots__ = ("trade_id", "direction", "power_w", "end_at", "energy_wh", "started_at", "moved_q")

    def __init__(self, trade_id: int, direction: str, power_w: int, end_at: int, energy_wh: int, started_at: float):
        self.trade_id, self.direction, self.power_w = trade_id, direction, power_w
        self.end_at, self.energy_wh, self.started_at = end_at, energy_wh, started_at
        self.moved_q = 0

    @property
    def target_q(self) -> int:
        return self.energy_wh * ENERGY_QUANTUM_PER_WH

    def frozen(self) -> EmulatedTransfer:
        return EmulatedTransfer(self.trade_id, self.direction, self.power_w, self.end_at, self.energy_wh,
                                self.started_at, self.moved_q / ENERGY_QUANTUM_PER_WH)


class DgrEmulator:
    """The router behind ``port_path`` (e.g. ``VirtualSerialLine.emulator_end``).

    ``energy_sink(direction, energy_wh)`` is called on the loop with every increment of energy
    moved ("export" or "import"); an exception in it is logged, never fatal. ``clock`` (UTC
    epoch seconds) drives end_at, the energy integration and the heartbeat watchdog alike, so
    they can never disagree; a clock that steps back moves no energy backwards.
    """

    def __init__(
        self,
        port_path: str,
        *,
        energy_sink: Callable[[str, float], None] | None = None,
        heartbeat_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        router_id: str = "dgr-emu",
        firmware: str = "emu-1.0",
        max_power_w: int = 10_000,
        max_transfers: int = 8,
        answer_window: int = 16,
        tick_s: float = 0.05,
        soc_percent: int = 50,
        baudrate: int = 115200,
    ):
        f.encode_value(router_id)  # refuse an id that would break framing, at construction
        f.encode_value(firmware)
        self.port_path = str(port_path)
        self.energy_sink = energy_sink
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.clock = clock
        self.router_id = router_id
        self.firmware = firmware
        self.max_power_w = max_power_w
        self.max_transfers = max_transfers
        self.answer_window = answer_window
        self.tick_s = tick_s
        self.soc_percent = soc_percent
        self.baudrate = baudrate
        self._lock = threading.Lock()
        self._plan = _FaultPlan()  # fault injection still to act (under _lock)
        self._fault_counts: Counter[str] = Counter()  # what fault injection did (under _lock)
        self._transfers: dict[int, _Transfer] = {}
        self._ended: OrderedDict[int, EndedTransfer] = OrderedDict()
        self._export_q = 0
        self._import_q = 0
        self._safe = False
        self._heartbeat_lost = False
        self._hard_faults: list[str] = []
        self._session: str | None = None
        self._window: OrderedDict[int, tuple[bytes, bytes]] = OrderedDict()
        self._event_seq = 0
        self._last_frame_at = clock()
        self._commands: deque[CommandRecord] = deque(maxlen=COMMAND_LOG_LENGTH)
        self._events_sent: deque[str] = deque(maxlen=COMMAND_LOG_LENGTH)
        self._replays = 0
        self._bad_lines = 0
        self._splitter = f.LineSplitter()

        self._loop: asyncio.AbstractEventLoop | None = None
        self._serial: serial.Serial | None = None
        self._fd: int | None = None
        self._out = bytearray()
        self._writer_armed = False
        self._tick_task: asyncio.Task | None = None
        self._reopen_handle: asyncio.TimerHandle | None = None
        self._stopped: asyncio.Event | None = None
        self._running = False

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the port and begin serving; returns at once (the work runs on the loop)."""
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._open_port()  # raises serial.SerialException naming the path if it cannot open
        self._running = True
        self._last_frame_at = self.clock()
        self._tick_task = self._loop.create_task(self._ticker(), name=f"dgr-emulator-tick:{self.port_path}")
        with self._lock:
            out = [self._event("BOOT", {"router": self.router_id, "fw": self.firmware, "proto": f.PROTOCOL_VERSION})]
        self._send_all(out)
        log.info("DGR emulator %s serving on %s", self.router_id, self.port_path)

    async def serve(self) -> None:
        """Serve until ``stop()``."""
        await self.start()
        assert self._stopped is not None
        await self._stopped.wait()

    async def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        if self._tick_task:
            self._tick_task.cancel()
            try:
                await self._tick_task
            except asyncio.CancelledError:
                pass
            self._tick_task = None
        if self._reopen_handle:
            self._reopen_handle.cancel()
        self._close_port()
        assert self._stopped is not None
        self._stopped.set()
        log.info("DGR emulator %s stopped", self.router_id)

    # --- state for tests and the bench --------------------------------------------------

    def snapshot(self) -> DgrEmulatorState:
        with self._lock:
            return DgrEmulatorState(
                mode=self._mode(),
                session=self._session,
                transfers=tuple(t.frozen() for t in self._transfers.values()),
                ended=tuple(self._ended.values()),
                export_wh=self._export_q / ENERGY_QUANTUM_PER_WH,
                import_wh=self._import_q / ENERGY_QUANTUM_PER_WH,
                soc_percent=self.soc_percent,
                faults=tuple(self._faults()),
                commands=tuple(self._commands),
                replays=self._replays,
                bad_lines=self._bad_lines,
                events_sent=tuple(self._events_sent),
                injected=tuple(self._plan.active()),
                fault_counters=dict(self._fault_counts),
                link_cut=self._plan.link_cut,
            )

    @property
    def mode(self) -> str:
        with self._lock:
            return self._mode()

    def inject_raw(self, data: bytes) -> None:
        """Write raw bytes onto the line (noise, hostile frames), from any thread."""
        self._call_on_loop(self._write, bytes(data))

    def inject_fault(self, code: str) -> None:
        """Latch a hardware fault (e.g. "overtemp"): transfers stop, mode becomes fault; RESUME
        acknowledges it. Same as ``inject({"kind": "fault", "code": code})``."""
        self.inject({"kind": "fault", "code": code})

    def reboot(self) -> None:
        """Power-cycle the router: transfers, session and answer window are lost (counters are
        kept, like a meter's), and it announces itself with a BOOT event."""
        self.inject({"kind": "reboot"})

    # --- fault injection ----------------------------------------------------------------------

    def inject(self, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Apply one fault described by a dict (``parse_fault`` documents the keys); from any
        thread. Returns the faults in force afterwards (``active_faults()``). Counted faults add
        up: two ``{"kind": "bad_checksum", "count": 2}`` corrupt the next four answers.

        * ``dropped_frame`` ``count`` (1) ``which`` (``answer``): the next answers are lost after
          the request ran, or (``request``) the next requests are lost before it (not executed).
        * ``delay`` ``delay_ms`` [``count``]: answers go out that much later (all until cleared).
        * ``bad_checksum`` ``count`` (1): answers go out with a wrong CRC.
        * ``error_reply`` ``code`` [``count`` (1), ``verb``]: the next requests (of that verb) are
          answered ``NAK code`` and not executed.
        * ``fault`` ``code``: latch a hardware fault now; RESUME acknowledges it.
        * ``stuck_in_fault`` ``code``: latch a fault whose cause stays until ``clear()``: RESUME
          leaves it latched (and a reboot re-latches it).
        * ``reboot``: power-cycle (see ``reboot()``).
        * ``link_cut`` [``duration_ms``]: like a cut cable, nothing arrives and nothing leaves
          until ``clear()`` (or the duration ends); bytes sent meanwhile are lost both ways, so the
          watchdog runs out as it would on a real cut.
        """
        fault = parse_fault(spec)
        kind = fault["kind"]
        if kind in ("fault", "stuck_in_fault", "reboot") and (self._loop is None or not self._running):
            raise RuntimeError("the DGR emulator is not running: await start() or serve() first")
        with self._lock:
            plan = self._plan
            if kind == "dropped_frame":
                if fault["which"] == "request":
                    plan.drop_requests += fault["count"]
                else:
                    plan.drop_answers += fault["count"]
            elif kind == "delay":
                plan.delay_s = fault["delay_ms"] / 1000.0
                plan.delay_count = fault["count"]
            elif kind == "bad_checksum":
                plan.corrupt_answers += fault["count"]
            elif kind == "error_reply":
                if plan.nak_count and (plan.nak_code, plan.nak_verb) != (fault["code"], fault["verb"]):
                    plan.nak_count = 0  # a different refusal replaces the pending one
                plan.nak_code, plan.nak_verb = fault["code"], fault["verb"]
                plan.nak_count += fault["count"]
            elif kind == "stuck_in_fault":
                plan.stuck.add(fault["code"])
            elif kind == "link_cut":
                plan.link_cut = True
                plan.link_cut_until = (None if fault["duration_ms"] is None
                                       else time.monotonic() + fault["duration_ms"] / 1000.0)
        log.warning("DGR emulator %s: fault injected: %s", self.router_id, fault)
        if kind in ("fault", "stuck_in_fault"):
            self._call_on_loop(self._do_fault, fault["code"])
        elif kind == "reboot":
            self._call_on_loop(self._do_reboot)
        return self.active_faults()

    def clear(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Remove injected causes (all, or one kind); returns the faults still in force.

        What the router *latched* because of them stays, as on real hardware: safe mode until
        RESUME or HELLO, a latched fault until RESUME acknowledges it (which now succeeds for a
        ``stuck_in_fault`` whose cause was cleared). A cut link is restored."""
        if kind is not None and kind not in FAULT_KINDS:
            raise FaultSpecError(f"clear: kind: expected one of {', '.join(FAULT_KINDS)} or none for all, found {kind!r}")
        with self._lock:
            plan = self._plan
            if kind in (None, "dropped_frame"):
                plan.drop_requests = plan.drop_answers = 0
            if kind in (None, "delay"):
                plan.delay_s, plan.delay_count = 0.0, None
            if kind in (None, "bad_checksum"):
                plan.corrupt_answers = 0
            if kind in (None, "error_reply"):
                plan.nak_count, plan.nak_code, plan.nak_verb = 0, 0, None
            if kind in (None, "stuck_in_fault"):
                plan.stuck.clear()
            restore = plan.link_cut and kind in (None, "link_cut")
        if restore:
            self._restore_link("cleared")
        log.info("DGR emulator %s: injected faults cleared (%s)", self.router_id, kind or "all")
        return self.active_faults()

    def active_faults(self) -> list[dict[str, Any]]:
        """Injected faults still to act or in force, as JSON-ready dicts with what remains."""
        with self._lock:
            return self._plan.active()

    def fault_counters(self) -> dict[str, int]:
        """What fault injection did so far: requests_dropped, answers_dropped, answers_corrupted,
        answers_delayed, naks_injected, bytes_lost_in_cut, frames_lost_in_cut, faults_latched,
        reboots, link_cuts."""
        with self._lock:
            return dict(self._fault_counts)

    def _restore_link(self, why: str) -> None:
        with self._lock:
            if not self._plan.link_cut:
                return
            self._plan.link_cut, self._plan.link_cut_until = False, None
            self._fault_counts["link_cuts"] += 1
        if self._loop is not None and self._running:
            self._loop.call_soon_threadsafe(self._splitter.clear)  # half a line from before the cut is noise
        log.warning("DGR emulator %s: link restored (%s)", self.router_id, why)

    def _take(self, attr: str, counter: str) -> bool:
        """Count down one pending fault of a kind; True if it applies now. Caller holds no lock."""
        with self._lock:
            if getattr(self._plan, attr) > 0:
                setattr(self._plan, attr, getattr(self._plan, attr) - 1)
                self._fault_counts[counter] += 1
                return True
            return False

    # The attributes of the first fault-injection surface, kept for existing tests and scripts.

    @property
    def drop_next_requests(self) -> int:
        with self._lock:
            return self._plan.drop_requests

    @drop_next_requests.setter
    def drop_next_requests(self, n: int) -> None:
        with self._lock:
            self._plan.drop_requests = max(0, int(n))

    @property
    def drop_next_replies(self) -> int:
        with self._lock:
            return self._plan.drop_answers

    @drop_next_replies.setter
    def drop_next_replies(self, n: int) -> None:
        with self._lock:
            self._plan.drop_answers = max(0, int(n))

    @property
    def corrupt_next_checksums(self) -> int:
        with self._lock:
            return self._plan.corrupt_answers

    @corrupt_next_checksums.setter
    def corrupt_next_checksums(self, n: int) -> None:
        with self._lock:
            self._plan.corrupt_answers = max(0, int(n))

    @property
    def reply_delay_s(self) -> float:
        with self._lock:
            return self._plan.delay_s

    @reply_delay_s.setter
    def reply_delay_s(self, seconds: float) -> None:
        with self._lock:
            self._plan.delay_s, self._plan.delay_count = max(0.0, float(seconds)), None

    # --- serial I/O -----------------------------------------------------------------------

    def _call_on_loop(self, fn: Callable, *args) -> None:
        if self._loop is None or not self._running:
            raise RuntimeError("the DGR emulator is not running: await start() or serve() first")
        self._loop.call_soon_threadsafe(fn, *args)

    def _open_port(self) -> None:
        self._serial = serial.Serial(self.port_path, baudrate=self.baudrate, timeout=0, write_timeout=0)
        self._fd = self._serial.fileno()
        os.set_blocking(self._fd, False)
        self._splitter.clear()
        assert self._loop is not None
        self._loop.add_reader(self._fd, self._on_readable)

    def _close_port(self) -> None:
        if self._loop and self._fd is not None:
            self._loop.remove_reader(self._fd)
            if self._writer_armed:
                self._loop.remove_writer(self._fd)
                self._writer_armed = False
        if self._serial is not None:
            try:
                self._serial.close()
            except (OSError, serial.SerialException):
                pass
        self._serial, self._fd = None, None
        self._out.clear()

    def _port_failed(self, why: str) -> None:
        """The line went away (e.g. socat stopped): close and try again every half second,
        like a router whose cable was pulled — never spin on a dead fd, never die."""
        log.warning("DGR emulator %s: serial port %s failed (%s); reopening", self.router_id, self.port_path, why)
        self._close_port()
        self._schedule_reopen()

    def _schedule_reopen(self) -> None:
        if self._running and self._loop:
            self._reopen_handle = self._loop.call_later(0.5, self._try_reopen)

    def _try_reopen(self) -> None:
        if not self._running or self._serial is not None:
            return
        try:
            self._open_port()
            log.info("DGR emulator %s: reopened %s", self.router_id, self.port_path)
        except (OSError, serial.SerialException) as exc:
            log.debug("DGR emulator reopen of %s failed: %s", self.port_path, exc)
            self._schedule_reopen()

    def _on_readable(self) -> None:
        if self._fd is None:
            return
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._port_failed(str(exc))
            return
        if not data:
            self._port_failed("end of file")
            return
        with self._lock:
            cut = self._plan.link_cut
            if cut:
                self._fault_counts["bytes_lost_in_cut"] += len(data)
        if cut:  # the cable is cut: what the DGC sends never arrives
            return
        for line in self._splitter.feed(data):
            self._handle_line(line)

    def _write(self, data: bytes) -> None:
        with self._lock:
            cut = self._plan.link_cut
            if cut:
                self._fault_counts["frames_lost_in_cut"] += 1
        if cut:
            log.debug("DGR emulator: link cut, %r lost", data[:60])
            return
        if self._fd is None:
            log.debug("DGR emulator: port closed, dropping %r", data[:60])
            return
        if len(self._out) + len(data) > MAX_OUTPUT_BYTES:
            log.warning("DGR emulator: nobody reads %s; dropping %d bytes of output", self.port_path, len(data))
            return
        self._out += data
        self._flush()

    def _flush(self) -> None:
        if self._fd is None:
            return
        try:
            while self._out:
                written = os.write(self._fd, self._out)
                del self._out[:written]
        except BlockingIOError:
            pass
        except OSError as exc:
            self._port_failed(str(exc))
            return
        assert self._loop is not None
        if self._out and not self._writer_armed:
            self._loop.add_writer(self._fd, self._flush)
            self._writer_armed = True
        elif not self._out and self._writer_armed:
            self._loop.remove_writer(self._fd)
            self._writer_armed = False

    def _send_all(self, frames: list[bytes]) -> None:
        for frame in frames:
            self._write(frame)

    def _send_answer(self, answer: bytes) -> None:
        if self._take("drop_answers", "answers_dropped"):
            log.info("DGR emulator: fault injection drops answer %r", answer.rstrip())
            return
        if self._take("corrupt_answers", "answers_corrupted"):
            star = answer.rfind(b"*")
            crc = int(answer[star + 1: star + 5], 16) ^ 0x5A5A
            answer = answer[: star + 1] + b"%04X\r\n" % crc
            log.info("DGR emulator: fault injection corrupts checksum of %r", answer.rstrip())
        with self._lock:
            delay_s = self._plan.delay_s
            if delay_s > 0:
                self._fault_counts["answers_delayed"] += 1
                if self._plan.delay_count is not None:
                    self._plan.delay_count -= 1
                    if self._plan.delay_count <= 0:
                        self._plan.delay_s, self._plan.delay_count = 0.0, None
        if delay_s > 0 and self._loop is not None:
            self._loop.call_later(delay_s, self._write, answer)
        else:
            self._write(answer)

    # --- protocol -------------------------------------------------------------------------

    def _handle_line(self, line: bytes) -> None:
        """Never raises: whatever arrives, the router keeps serving."""
        sinks: list[tuple[str, float]] = []
        out: list[bytes] = []
        answer: bytes | None = None
        try:
            noise, candidate = f.resync(line)
            if noise:
                log.debug("DGR emulator: dropping line noise %r", noise[:80])
            try:
                frame = f.parse_frame(candidate)
            except f.FrameError as exc:
                with self._lock:
                    self._bad_lines += 1
                log.debug("DGR emulator: bad line %r: %s", candidate[:80], exc)
                if exc.seq is not None and candidate.startswith(b"$"):
                    answer = f.encode_nak(exc.seq, exc.code, str(exc))
            else:
                if not isinstance(frame, f.Request):
                    log.debug("DGR emulator: ignoring non-request frame %r", candidate[:80])
                elif self._take("drop_requests", "requests_dropped"):
                    log.info("DGR emulator: fault injection drops request %r", candidate[:80])
                else:
                    with self._lock:
                        answer = self._process(frame, out, sinks)
        except Exception:  # a router bug must not take the router down
            log.exception("DGR emulator: internal error on line %r", line[:80])
            seq = f.guess_seq(line)
            answer = f.encode_nak(seq, 50, "internal error") if seq else None
        if answer is not None:
            self._send_answer(answer)
        self._send_all(out)
        self._feed_sinks(sinks)

    def _process(self, req: f.Request, out: list[bytes], sinks: list) -> bytes:
        now = self.clock()
        self._last_frame_at = now
        self._advance(now, out, sinks)
        new_session = (
            req.verb == "HELLO"
            and _SESSION_RE.match(req.args.get("session", ""))
            and req.args["session"] != self._session
        )
        if not new_session:
            stored = self._window.get(req.seq)
            if stored is not None:
                body, answer = stored
                if body == req.body:
                    self._replays += 1
                    log.info("DGR emulator: seq %d retried; answering again without executing", req.seq)
                    return answer
                return f.encode_nak(req.seq, 23, f"seq {req.seq} already answered a different request in this session; "
                                                 "expected a retry to repeat the request byte for byte")
            if self._session is None and req.verb != "HELLO":
                return f.encode_nak(req.seq, 30, "no session since router start; send HELLO first")
        plan = self._plan
        if plan.nak_count > 0 and plan.nak_verb in (None, req.verb):
            plan.nak_count -= 1
            self._fault_counts["naks_injected"] += 1
            code = plan.nak_code
            answer = f.encode_nak(req.seq, code, f"injected by the bench: {f.ERROR_CODES[code].meaning}")
            log.info("DGR emulator: fault injection answers %s seq %d with NAK %d", req.verb, req.seq, code)
            if code in (10, 11, 23, 30):
                return answer  # these are never stored: "nothing could be read" / "not in this session"
            return self._remember(req, answer, now)
        handler = getattr(self, f"_do_{req.verb.lower()}", None)
        if req.verb not in f.REQUEST_VERBS or handler is None:
            answer = f.encode_nak(req.seq, 20, f"unknown verb {req.verb}; expected one of {' '.join(f.REQUEST_VERBS)}")
        else:
            try:
                answer = handler(req, now, out)
            except f.ArgError as exc:
                answer = f.encode_nak(req.seq, exc.code, f"{req.verb} {exc}")
        if new_session and answer.split(b" ", 2)[1] == b"ACK":
            self._window.clear()
        return self._remember(req, answer, now)

    def _remember(self, req: f.Request, answer: bytes, now: float) -> bytes:
        """Store an answer in the window (so a retry gets it again) and in the command log."""
        self._window[req.seq] = (req.body, answer)
        self._window.move_to_end(req.seq)
        while len(self._window) > self.answer_window:
            self._window.popitem(last=False)
        parts = answer.split(b"*")[0].split(b" ")
        verdict = "ACK" if parts[1] == b"ACK" else b" ".join(parts[1:4]).decode()
        self._commands.append(CommandRecord(req.seq, req.verb, dict(req.args), now, verdict))
        return answer

    def _mode(self) -> str:
        if self._hard_faults:
            return "fault"
        if self._safe:
            return "safe"
        return "transfer" if self._transfers else "idle"

    def _faults(self) -> list[str]:
        return list(self._hard_faults) + (["heartbeat_lost"] if self._heartbeat_lost else [])

    def _event(self, kind: str, args: dict) -> bytes:
        self._event_seq = self._event_seq % f.SEQ_MAX + 1
        frame = f.encode_event(self._event_seq, kind, args)
        self._events_sent.append(frame.split(b"*")[0].decode())
        return frame

    def _set_mode_event(self, out: list[bytes], before: str, reason: str) -> None:
        if self._mode() != before:
            out.append(self._event("MODE", {"mode": self._mode(), "was": before, "reason": reason}))

    # --- energy -----------------------------------------------------------------------------

    def _advance(self, now: float, out: list[bytes], sinks: list) -> None:
        """Integrate every active transfer up to ``now`` and end those that are done."""
        for transfer in list(self._transfers.values()):
            effective = min(now, float(transfer.end_at))
            elapsed = max(0.0, effective - transfer.started_at)
            q = math.floor(transfer.power_w * elapsed * ENERGY_QUANTUM_PER_WH / 3600.0)
            q = max(transfer.moved_q, min(q, transfer.target_q))
            self._move(transfer, q - transfer.moved_q, sinks)
            if transfer.moved_q >= transfer.target_q:
                self._end(transfer, "target", now, out)
            elif now >= transfer.end_at:
                self._end(transfer, "end_at", now, out)

    def _move(self, transfer: _Transfer, quanta: int, sinks: list) -> None:
        if quanta <= 0:
            return
        transfer.moved_q += quanta
        if transfer.direction == "export":
            self._export_q += quanta
        else:
            self._import_q += quanta
        sinks.append((transfer.direction, quanta / ENERGY_QUANTUM_PER_WH))

    def _end(self, transfer: _Transfer, reason: str, now: float, out: list[bytes]) -> None:
        before = self._mode()
        del self._transfers[transfer.trade_id]
        ended = EndedTransfer(transfer.trade_id, transfer.direction, transfer.energy_wh,
                              transfer.moved_q / ENERGY_QUANTUM_PER_WH, reason, now)
        self._ended[transfer.trade_id] = ended
        self._ended.move_to_end(transfer.trade_id)
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)
        log.info("DGR emulator: transfer of trade %d ended (%s) after %.3f Wh", transfer.trade_id, reason, ended.moved_wh)
        out.append(self._event("END", {"trade_id": transfer.trade_id, "reason": reason,
                                        "moved_wh": transfer.moved_q // ENERGY_QUANTUM_PER_WH}))
        if reason in ("target", "end_at", "stop"):
            self._set_mode_event(out, before, reason)

    def _stop_all(self, reason: str, now: float, out: list[bytes]) -> int:
        transfers = list(self._transfers.values())
        for transfer in transfers:
            self._end(transfer, reason, now, out)
        return len(transfers)

    def _feed_sinks(self, sinks: list[tuple[str, float]]) -> None:
        if self.energy_sink is None:
            return
        for direction, energy_wh in sinks:
            try:
                self.energy_sink(direction, energy_wh)
            except Exception:
                log.exception("DGR emulator: energy_sink failed for %s %.6f Wh", direction, energy_wh)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            with self._lock:
                until = self._plan.link_cut_until
            if until is not None and time.monotonic() >= until:
                self._restore_link("duration over")
            out: list[bytes] = []
            sinks: list[tuple[str, float]] = []
            try:
                with self._lock:
                    now = self.clock()
                    self._advance(now, out, sinks)
                    if self._transfers and now - self._last_frame_at > self.heartbeat_timeout_s:
                        self._heartbeat_timeout(now, out)
            except Exception:
                log.exception("DGR emulator: internal error in the tick")
            self._send_all(out)
            self._feed_sinks(sinks)

    def _heartbeat_timeout(self, now: float, out: list[bytes]) -> None:
        before = self._mode()
        log.warning("DGR emulator: no frame for %.1f s with transfers active; going to safe state",
                    now - self._last_frame_at)
        self._stop_all("heartbeat", now, out)
        self._safe = True
        self._heartbeat_lost = True
        out.append(self._event("FAULT", {"code": "heartbeat_lost", "mode": self._mode()}))
        self._set_mode_event(out, before, "heartbeat")

    def _do_fault(self, code: str) -> None:
        out: list[bytes] = []
        sinks: list = []
        with self._lock:
            now = self.clock()
            self._advance(now, out, sinks)
            before = self._mode()
            self._stop_all("fault", now, out)
            if code not in self._hard_faults:
                self._hard_faults.append(code)
            self._fault_counts["faults_latched"] += 1
            out.append(self._event("FAULT", {"code": code, "mode": self._mode()}))
            self._set_mode_event(out, before, "fault")
        self._send_all(out)
        self._feed_sinks(sinks)

    def _do_reboot(self) -> None:
        out: list[bytes] = []
        with self._lock:
            self._transfers.clear()
            self._window.clear()
            self._session = None
            self._safe = self._heartbeat_lost = False
            self._hard_faults = sorted(self._plan.stuck)  # a cause that is still there latches again
            self._event_seq = 0
            self._splitter.clear()
            self._fault_counts["reboots"] += 1
            out.append(self._event("BOOT", {"router": self.router_id, "fw": self.firmware, "proto": f.PROTOCOL_VERSION}))
            for code in self._hard_faults:
                out.append(self._event("FAULT", {"code": code, "mode": self._mode()}))
        log.info("DGR emulator %s rebooted", self.router_id)
        self._send_all(out)

    # --- request handlers (called under the lock; return the answer frame) ------------------

    def _do_hello(self, req: f.Request, now: float, out: list[bytes]) -> bytes:
        f.check_keys(req.args, ("proto", "session"))
        proto = f.get_int(req.args, "proto", 1, 999)
        session = f.get_str(req.args, "session")
        if not _SESSION_RE.match(session):
            raise f.ArgError("session", "8 lower-case hex digits", session)
        if proto != f.PROTOCOL_VERSION:
            return f.encode_nak(req.seq, 40, f"router speaks protocol {f.PROTOCOL_VERSION}, HELLO asked for {proto}")
        if session != self._session:
            log.info("DGR emulator: new session %s (was %s); answer window cleared", session, self._session)
        self._session = session
        before = self._mode()
        if self._safe:
            self._safe = self._heartbeat_lost = False
            self._set_mode_event(out, before, "hello")
        return f.encode_ack(req.seq, "HELLO", {
            "proto": f.PROTOCOL_VERSION, "router": self.router_id, "fw": self.firmware, "time": int(now),
            "hb_timeout_ms": int(self.heartbeat_timeout_s * 1000), "max_power_w": self.max_power_w,
            "max_xfers": self.max_transfers, "session": session, "mode": self._mode(),
        })

    def _do_status(self, req: f.Request, now: float, out: list[bytes]) -> bytes:
        f.check_keys(req.args, ())
        power_w = sum(t.power_w if t.direction == "export" else -t.power_w for t in self._transfers.values())
        transfers = [
            f.TransferInfo(t.trade_id, t.direction, t.power_w, t.end_at, t.energy_wh, t.moved_q // ENERGY_QUANTUM_PER_WH)
            for t in self._transfers.values()
        ]
        return f.encode_ack(req.seq, "STATUS", {
            "mode": self._mode(), "power_w": power_w,
            "export_wh": self._export_q // ENERGY_QUANTUM_PER_WH, "import_wh": self._import_q // ENERGY_QUANTUM_PER_WH,
            "soc_percent": int(self.soc_percent), "faults": f.encode_list(self._faults()),
            "xfers": f.encode_transfers(transfers), "time": int(now),
        })

    def _do_start(self, req: f.Request, now: float, out: list[bytes]) -> bytes:
        f.check_keys(req.args, ("trade_id", "direction", "power_w", "end_at", "energy_wh"))
        trade_id = f.get_int(req.args, "trade_id", 1, MAX_TRADE_ID)
        direction = f.get_choice(req.args, "direction", f.DIRECTIONS)
        power_w = f.get_int(req.args, "power_w", 1, self.max_power_w)
        end_at = f.get_int(req.args, "end_at", 0, 2**40)
        energy_wh = f.get_int(req.args, "energy_wh", 1, MAX_ENERGY_WH)
        mode = self._mode()
        if mode == "fault":
            return f.encode_nak(req.seq, 32, f"latched faults {','.join(self._faults())}; RESUME to acknowledge")
        if mode == "safe":
            return f.encode_nak(req.seq, 31, "router is in safe mode; RESUME or HELLO first")
        if end_at <= now:
            return f.encode_nak(req.seq, 33, f"end_at {end_at} is not after router time {int(now)}")
        if end_at - now > MAX_DURATION_S:
            return f.encode_nak(req.seq, 22, f"end_at {end_at} is more than {MAX_DURATION_S} s after router time {int(now)}")
        if trade_id in self._transfers:
            return f.encode_nak(req.seq, 34, f"trade_id {trade_id} is already transferring")
        if len(self._transfers) >= self.max_transfers:
            return f.encode_nak(req.seq, 35, f"{len(self._transfers)} transfers active; the router runs at most {self.max_transfers}")
        total_w = sum(t.power_w for t in self._transfers.values()) + power_w
        if total_w > self.max_power_w:
            return f.encode_nak(req.seq, 35, f"total power {total_w} W would exceed the rating of {self.max_power_w} W")
        before = mode
        self._transfers[trade_id] = _Transfer(trade_id, direction, power_w, end_at, energy_wh, now)
        self._ended.pop(trade_id, None)
        log.info("DGR emulator: START trade %d %s %d W until %d or %d Wh", trade_id, direction, power_w, end_at, energy_wh)
        self._set_mode_event(out, before, "start")
        return f.encode_ack(req.seq, "START", {"trade_id": trade_id, "started_at": int(now), "mode": self._mode()})

    def _do_stop(self, req: f.Request, now: float, out: list[bytes]) -> bytes:
        f.check_keys(req.args, ("trade_id",))
        trade_id = f.get_int(req.args, "trade_id", 1, MAX_TRADE_ID)
        transfer = self._transfers.get(trade_id)
        if transfer is not None:
            self._end(transfer, "stop", now, out)
            ended = self._ended[trade_id]
            return f.encode_ack(req.seq, "STOP", {"trade_id": trade_id, "was": "active",
                                                  "moved_wh": int(ended.moved_wh), "reason": "stop"})
        if trade_id in self._ended:
            ended = self._ended[trade_id]
            return f.encode_ack(req.seq, "STOP", {"trade_id": trade_id, "was": "ended",
                                                  "moved_wh": int(ended.moved_wh), "reason": ended.reason})
        return f.encode_ack(req.seq, "STOP", {"trade_id": trade_id, "was": "unknown"})

    def _do_safe(self, req: f.Request, now: float, out: list[bytes]) -> bytes:
        f.check_keys(req.args, ())
        before = self._mode()
        stopped = self._stop_all("safe", now, out)
        self._safe = True
        self._set_mode_event(out, before, "command")
        return f.encode_ack(req.seq, "SAFE", {"stopped": stopped, "mode": self._mode()})

    def _do_resume(self, req: f.Request, now: float, out: list[bytes]) -> bytes:
        f.check_keys(req.args, ())
        before = self._mode()
        self._safe = self._heartbeat_lost = False
        # faults whose cause has gone are acknowledged; a stuck cause keeps its fault latched
        self._hard_faults = [code for code in self._hard_faults if code in self._plan.stuck]
        self._set_mode_event(out, before, "resume")
        return f.encode_ack(req.seq, "RESUME", {"mode": self._mode()})

    def _do_heartbeat(self, req: f.Request, now: float, out: list[bytes]) -> bytes:
        f.check_keys(req.args, ())
        return f.encode_ack(req.seq, "HEARTBEAT", {"mode": self._mode(), "time": int(now)})
