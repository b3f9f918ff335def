"""DGR driver: the board's side of DGR serial protocol v1 (``docs/dgr-protocol.md``).

Why it is shaped this way:

* One exchange at a time, under a lock. Several scheduler threads (delivery, heartbeat, status
  page) share one serial port; a request and its answer must never interleave with another's.
* Retries resend the *same* frame (same sequence number, same bytes). The router keeps its
  last answers per sequence number, so a START whose answer was lost is answered again, not
  executed twice. A NAK is an answer, so it is raised at once, never retried — except codes
  10/11 (the router could not read the frame, nothing ran), which resend the same frame.
* Sessions. Each ``DgrClient`` draws a random session id and a random first sequence number.
  Its first request on the line is HELLO carrying the session; a router that sees a *new*
  session clears its answer window, so a sequence number reused after the DGC process restarted
  is never mistaken for a retry. Reconnecting the port keeps session and sequence numbers (the
  router's window stays valid and no HELLO is needed). A router that rebooted answers
  NAK 30 NO_SESSION (or announces BOOT); the driver then says HELLO and sends the request again
  with a new sequence number — safe, because a NAK means nothing was executed.
* Read-back. START, STOP and SAFE are confirmed with STATUS: an ACK says the router accepted
  the command, STATUS says the power electronics are actually doing it.
* Fail-safe. When retries are exhausted the driver makes one attempt to send SAFE (the design's
  "a lost link sends the router to its safe state"); if even that is lost the router goes safe
  by itself when its heartbeat watchdog expires. ``DgrLinkError.safe_confirmed`` says which.
* Heartbeats are *not* sent by a background thread here: the scheduler calls ``heartbeat()``
  from its own cycle, so a hung scheduler stops the heartbeat and the router goes safe — a
  free-running thread would keep a dead controller looking alive.
* Garbage on the line (noise, a terminal echo, stale answers of an earlier attempt) is skipped
  and logged at debug; unsolicited events (``!`` lines) are collected for ``drain_events()``.

Imports are only pyserial and the standard library: this runs on the board.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Mapping

import serial

from ..config import DgrConfig
from . import dgr_frames as f
from .dgr_frames import DIRECTIONS, TransferInfo as DgrTransfer

log = logging.getLogger(__name__)

__all__ = [
    "DgrClient", "DgrHello", "DgrStatus", "DgrTransfer", "DgrEvent",
    "DgrError", "DgrLinkError", "DgrNak", "DgrProtocolError", "DgrStateError", "DgrArgumentError",
]

READ_POLL_S = 0.05  # granularity of the read loop; answers are taken as soon as their newline arrives
MAX_EVENTS_KEPT = 1000
ENDS_REMEMBERED = 64  # END events kept per trade for transfer_end(): several slots' worth of transfers
CLOCK_SKEW_WARN_S = 2


class DgrError(Exception):
    """Base of every error this driver raises."""


class DgrLinkError(DgrError):
    """No valid answer after all retries, or the port cannot be used.

    ``safe_confirmed`` is True when the driver's follow-up SAFE got through (the router is
    safe now), False when it did not (the router goes safe by its heartbeat watchdog), None
    when no SAFE was attempted."""

    def __init__(self, message: str, *, safe_confirmed: bool | None = None):
        super().__init__(message)
        self.safe_confirmed = safe_confirmed


class DgrNak(DgrError):
    """The router refused a request; nothing was executed."""

    def __init__(self, code: int, name: str, detail: str, *, verb: str = "", seq: int = 0):
        known = f.ERROR_CODES.get(code)
        meaning = f" ({known.meaning})" if known else ""
        super().__init__(f"DGR refused {verb or 'request'} (seq {seq}): NAK {code} {name}: {detail or 'no detail'}{meaning}")
        self.code, self.name, self.detail, self.verb, self.seq = code, name, detail, verb, seq


class DgrProtocolError(DgrError):
    """An answer with a valid checksum that does not make sense (missing field, wrong session)."""


class DgrStateError(DgrError):
    """The router acknowledged a command but STATUS shows a different state."""


class DgrArgumentError(DgrError, ValueError):
    """A caller passed a value that cannot be put on the wire."""


@dataclass(frozen=True)
class DgrHello:
    protocol: int
    router_id: str
    firmware: str
    router_time: int  # router clock, UTC epoch seconds
    clock_offset_s: float  # router_time minus the board's clock when the answer arrived
    heartbeat_timeout_ms: int  # the router goes safe after this long without a frame while transferring
    max_power_w: int
    max_transfers: int
    mode: str
    session: str


@dataclass(frozen=True)
class DgrStatus:
    mode: str  # idle, transfer, safe, fault
    power_w: int  # net power now: positive exports, negative imports
    export_wh: int  # energy the router has moved out of the house, ever
    import_wh: int  # energy the router has moved into the house, ever
    soc_percent: int
    faults: tuple[str, ...]
    transfers: tuple[DgrTransfer, ...]
    router_time: int

    def transfer(self, trade_id: int) -> DgrTransfer | None:
        return next((t for t in self.transfers if t.trade_id == trade_id), None)


@dataclass(frozen=True)
class DgrEvent:
    seq: int
    kind: str  # BOOT, END, FAULT, MODE (others are kept as they come)
    args: Mapping[str, str] = field(default_factory=dict)
    received_at: float = 0.0  # board clock, epoch seconds


def remember_stop_answer(ends: OrderedDict[int, DgrEvent], unknown: OrderedDict[int, None], trade_id: int,
                         args: Mapping[str, object], now: float) -> None:
    """Keep what a STOP answer says (DgrClient, and the simulation's driver, which must behave
    alike): ``was=unknown`` is remembered, unless an END was heard; ``was=active|ended`` with a
    ``moved_wh`` stands for the END when none was heard, its time known only when this STOP
    ended it (was=active; else received_at 0). Both memories keep the last ENDS_REMEMBERED."""
    was, moved = args.get("was"), str(args.get("moved_wh", ""))
    if was == "unknown" and trade_id not in ends:
        unknown[trade_id] = None
        while len(unknown) > ENDS_REMEMBERED:
            unknown.popitem(last=False)
        return
    if trade_id in ends or was not in ("active", "ended") or not moved.isdigit():
        return
    ends[trade_id] = DgrEvent(0, "END", {"trade_id": str(trade_id), "moved_wh": moved,
                                         "reason": str(args.get("reason", "stop")), "from": "stop"},
                              now if was == "active" else 0.0)
    while len(ends) > ENDS_REMEMBERED:
        ends.popitem(last=False)


class DgrClient:
    """Thread-safe client of one DGR on one serial port.

    The port opens on first use (or ``open()``/``with``) and is reopened by the next attempt
    after an I/O error, so a daemon that starts before the router's USB adapter appears, or
    survives it re-enumerating, needs no special handling; ``close()`` releases the port."""

    def __init__(self, config: DgrConfig, *, first_seq: int | None = None):
        """``first_seq`` pins the first sequence number (tests, reproducible bench logs); by
        default it is random, which makes a stale answer from an earlier process unlikely to
        match (docs/dgr-protocol.md, section 4)."""
        if first_seq is not None and (type(first_seq) is not int or not f.SEQ_MIN <= first_seq <= f.SEQ_MAX):
            raise DgrArgumentError(f"first_seq: expected an integer from {f.SEQ_MIN} to {f.SEQ_MAX}, found {first_seq!r}")
        self._config = config
        self._timeout_s = config.timeout_ms / 1000.0
        self._lock = threading.RLock()
        self._serial: serial.Serial | None = None
        self._splitter = f.LineSplitter()
        self._backlog: deque[bytes] = deque()
        self._session = secrets.token_hex(4)
        first = first_seq if first_seq is not None else random.SystemRandom().randrange(f.SEQ_MIN, f.SEQ_MAX + 1)
        self._seq = first - 1 if first > f.SEQ_MIN else f.SEQ_MAX  # the last one used; the next is `first`
        self._session_ok = False
        self._hello: DgrHello | None = None
        self._events: deque[tuple[int, DgrEvent]] = deque(maxlen=MAX_EVENTS_KEPT)
        self._events_received = 0
        self._last_event_seq: int | None = None
        self._ends: OrderedDict[int, DgrEvent] = OrderedDict()
        self._unknown: OrderedDict[int, None] = OrderedDict()  # trades whose STOP answered was=unknown

    # --- lifecycle --------------------------------------------------------------------------

    def open(self) -> "DgrClient":
        with self._lock:
            if self._serial is None:
                self._open_port()
            return self

    def close(self) -> None:
        with self._lock:
            self._close_port()

    def __enter__(self) -> "DgrClient":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def session(self) -> str:
        return self._session

    @property
    def last_hello(self) -> DgrHello | None:
        return self._hello

    def _open_port(self) -> None:
        try:
            port = serial.Serial(self._config.port, baudrate=self._config.baudrate, timeout=READ_POLL_S,
                                 write_timeout=self._timeout_s, exclusive=True)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DgrLinkError(f"cannot open the DGR serial port {self._config.port} ({exc}); "
                               "expected the router's serial device (check [dgr] port in the board config)") from None
        # bytes that arrived before we opened belong to an earlier owner (stale answers)
        port.reset_input_buffer()
        self._serial = port
        self._splitter.clear()
        self._backlog.clear()
        log.debug("DGR port %s open (session %s, next seq %d)", self._config.port, self._session, self._seq % f.SEQ_MAX + 1)

    def _close_port(self) -> None:
        if self._serial is not None:
            try:
                self._serial.close()
            except (serial.SerialException, OSError):
                pass
            self._serial = None

    # --- public commands --------------------------------------------------------------------

    def hello(self) -> DgrHello:
        """Open the session (clears the router's answer window if the session is new, and
        leaves safe mode) and learn the router's identity, clock and limits."""
        with self._lock:
            return self._hello_locked()

    def status(self) -> DgrStatus:
        with self._lock:
            return self._status_locked()

    def start_transfer(self, trade_id: int, direction: str, power_w: int, end_at: int, energy_wh: int) -> DgrStatus:
        """START a transfer and confirm it with STATUS.

        The router stops it by itself when ``energy_wh`` has moved or at ``end_at`` (UTC epoch
        seconds), whichever first, so a dead DGC cannot leave it running. Raises DgrNak if the
        router refuses, DgrStateError if STATUS does not show what was commanded (after a
        best-effort STOP), DgrLinkError if the link is lost."""
        for name, value in (("trade_id", trade_id), ("power_w", power_w), ("end_at", end_at), ("energy_wh", energy_wh)):
            if type(value) is not int:
                raise DgrArgumentError(f"{name}: expected an integer, found {value!r}")
        if direction not in DIRECTIONS:
            raise DgrArgumentError(f"direction: expected one of {', '.join(DIRECTIONS)}, found {direction!r}")
        with self._lock:
            marker = self._events_received
            self._exchange("START", {"trade_id": trade_id, "direction": direction, "power_w": power_w,
                                     "end_at": end_at, "energy_wh": energy_wh})
            status = self._status_locked()
            active = status.transfer(trade_id)
            expected = (direction, power_w, end_at, energy_wh)
            if active is not None and (active.direction, active.power_w, active.end_at, active.energy_wh) == expected:
                log.info("DGR transfer of trade %d started: %s %d W until %d or %d Wh",
                         trade_id, direction, power_w, end_at, energy_wh)
                return status
            if active is None and self._ended_since(marker, trade_id):
                log.info("DGR transfer of trade %d already ended before its read-back", trade_id)
                return status
            found = "not active" if active is None else (
                f"active as {active.direction} {active.power_w} W until {active.end_at} or {active.energy_wh} Wh")
            self._best_effort("STOP", {"trade_id": trade_id})
            raise DgrStateError(
                f"DGR acknowledged START of trade {trade_id} but STATUS shows it {found} (mode {status.mode}); "
                f"expected an active {direction} transfer of {power_w} W until {end_at} or {energy_wh} Wh; STOP sent")

    def stop_transfer(self, trade_id: int) -> DgrStatus:
        """STOP one transfer (stopping one that already ended is not an error) and confirm it
        with STATUS; if the router still shows it active, SAFE is sent and DgrStateError raised."""
        if type(trade_id) is not int:
            raise DgrArgumentError(f"trade_id: expected an integer, found {trade_id!r}")
        with self._lock:
            ack = self._exchange("STOP", {"trade_id": trade_id})
            status = self._status_locked()
            if status.transfer(trade_id) is not None:
                # a router that says "stopped" but keeps moving energy cannot be trusted with a STOP
                confirmed = self._best_effort("SAFE", {})
                raise DgrStateError(f"DGR acknowledged STOP of trade {trade_id} (was {ack.args.get('was')}) but STATUS "
                                    f"still shows it active; expected it stopped; SAFE sent "
                                    f"({'acknowledged' if confirmed else 'not acknowledged'})")
            log.info("DGR transfer of trade %d stopped (was %s, %s Wh moved)", trade_id,
                     ack.args.get("was", "?"), ack.args.get("moved_wh", "?"))
            self._remember_stop_answer(trade_id, ack.args)
            return status

    def _remember_stop_answer(self, trade_id: int, args: Mapping[str, str]) -> None:
        """A STOP answer that names what the transfer moved counts as its END for
        transfer_end() when no END event was heard (a new process's driver has heard none of
        its predecessor's): the daemon shares a slot's metered energy by these counts. The end
        time is known only when this STOP ended it (was=active); else received_at stays 0."""
        remember_stop_answer(self._ends, self._unknown, trade_id, args, time.time())

    def safe_state(self) -> DgrStatus:
        """Stop every transfer and keep the router safe until RESUME or HELLO; confirmed."""
        with self._lock:
            self._exchange("SAFE", {})
            status = self._status_locked()
            if status.mode not in ("safe", "fault") or status.transfers:
                raise DgrStateError(f"DGR acknowledged SAFE but STATUS shows mode {status.mode} with "
                                    f"{len(status.transfers)} transfers; expected mode safe with none")
            log.warning("DGR in safe state")
            return status

    def resume(self) -> DgrStatus:
        """Leave safe mode and acknowledge latched faults; confirmed with STATUS."""
        with self._lock:
            self._exchange("RESUME", {})
            return self._status_locked()

    def heartbeat(self) -> str:
        """Tell the router the DGC is alive; returns the router's mode. Any request counts as
        a heartbeat, this one is for the quiet periods."""
        with self._lock:
            ack = self._exchange("HEARTBEAT", {})
            return self._arg(ack, f.get_choice, "mode", f.MODES)

    def drain_events(self) -> list[DgrEvent]:
        """Events received so far (oldest first); they are removed from the client."""
        with self._lock:
            events = [event for _, event in self._events]
            self._events.clear()
            return events

    def transfer_end(self, trade_id: int) -> DgrEvent | None:
        """The END event the router sent for this trade's transfer, if one arrived (the last
        ``ENDS_REMEMBERED`` are kept, drained or not). Why: after the link is lost the caller must
        tell a transfer the router had already finished at its target from one cut short, and the
        router cannot be asked any more."""
        with self._lock:
            return self._ends.get(trade_id)

    def transfer_unknown(self, trade_id: int) -> bool:
        """Whether the router answered a STOP of this trade with ``was=unknown``: it has no
        transfer of that id, active or among the ended ones it remembers (its last 32). Why: a
        START whose intent was journalled but whose frame never reached the router (the process
        died in between) must get none of the slot's metered energy; the daemon takes this
        answer as that proof only while the router still knows the slot's other transfers (a
        rebooted router knows none of them)."""
        with self._lock:
            return trade_id in self._unknown

    # --- exchanges ----------------------------------------------------------------------------

    def _hello_locked(self) -> DgrHello:
        ack = self._exchange("HELLO", {"proto": f.PROTOCOL_VERSION, "session": self._session})
        a = ack.args
        if a.get("session") != self._session:
            raise DgrProtocolError(f"DGR answered HELLO for session {a.get('session')!r}; expected {self._session!r}")
        router_time = self._arg(ack, f.get_int, "time", 0, 2**40)
        hello = DgrHello(
            protocol=self._arg(ack, f.get_int, "proto", 1, 999),
            router_id=self._arg(ack, f.get_str, "router"),
            firmware=self._arg(ack, f.get_str, "fw"),
            router_time=router_time,
            clock_offset_s=round(router_time - time.time(), 3),
            heartbeat_timeout_ms=self._arg(ack, f.get_int, "hb_timeout_ms", 1, 10**9),
            max_power_w=self._arg(ack, f.get_int, "max_power_w", 1, 10**9),
            max_transfers=self._arg(ack, f.get_int, "max_xfers", 1, 10**6),
            mode=self._arg(ack, f.get_choice, "mode", f.MODES),
            session=self._session,
        )
        if hello.protocol != f.PROTOCOL_VERSION:
            raise DgrProtocolError(f"DGR speaks protocol {hello.protocol}; expected {f.PROTOCOL_VERSION}")
        if abs(hello.clock_offset_s) > CLOCK_SKEW_WARN_S:
            log.warning("DGR clock is %+.0f s from the board's: end_at times are judged by the router's clock",
                        hello.clock_offset_s)
        if self._config.heartbeat_seconds * 2000 > hello.heartbeat_timeout_ms:
            log.warning("DGR heartbeat every %d s leaves less than half of the router's %d ms watchdog as margin",
                        self._config.heartbeat_seconds, hello.heartbeat_timeout_ms)
        self._session_ok = True
        self._hello = hello
        log.info("DGR %s (fw %s, protocol %d) session %s, mode %s", hello.router_id, hello.firmware,
                 hello.protocol, self._session, hello.mode)
        return hello

    def _status_locked(self) -> DgrStatus:
        ack = self._exchange("STATUS", {})
        return DgrStatus(
            mode=self._arg(ack, f.get_choice, "mode", f.MODES),
            power_w=self._arg(ack, f.get_int, "power_w", -(10**9), 10**9),
            export_wh=self._arg(ack, f.get_int, "export_wh", 0, 10**15),
            import_wh=self._arg(ack, f.get_int, "import_wh", 0, 10**15),
            soc_percent=self._arg(ack, f.get_int, "soc_percent", 0, 100),
            faults=self._arg(ack, f.parse_list, "faults"),
            transfers=self._arg(ack, f.parse_transfers, "xfers"),
            router_time=self._arg(ack, f.get_int, "time", 0, 2**40),
        )

    @staticmethod
    def _arg(ack: f.Ack, getter, *args):
        try:
            return getter(ack.args, *args)
        except f.ArgError as exc:
            raise DgrProtocolError(f"DGR answered {ack.verb} (seq {ack.seq}) with an invalid field: {exc}") from None

    def _exchange(self, verb: str, args: Mapping[str, object]) -> f.Ack:
        """One request -> its ACK, with session handling; caller holds the lock."""
        if not self._session_ok and verb != "HELLO":
            self._hello_locked()
        try:
            return self._transact(verb, args)
        except DgrNak as nak:
            if nak.code != 30 or verb == "HELLO":
                raise
            log.warning("DGR has no session (router restarted?): HELLO, then %s again with a new seq", verb)
            self._session_ok = False
            self._hello_locked()
            return self._transact(verb, args)

    def _transact(self, verb: str, args: Mapping[str, object], *, attempts: int | None = None,
                  fail_safe: bool = True) -> f.Ack:
        self._seq = self._seq % f.SEQ_MAX + 1
        seq = self._seq
        frame = f.encode_request(seq, verb, args)
        attempts = attempts if attempts is not None else self._config.retries + 1
        problems: list[str] = []
        for attempt in range(1, attempts + 1):
            outcome = self._attempt(frame, seq, verb)
            if isinstance(outcome, f.Ack):
                if attempt > 1:
                    log.info("DGR %s seq %d answered on attempt %d/%d", verb, seq, attempt, attempts)
                return outcome
            if isinstance(outcome, f.Nak):
                if not outcome.retry_same_seq:
                    raise DgrNak(outcome.code, outcome.name, outcome.detail, verb=verb, seq=seq)
                outcome = f"NAK {outcome.code} {outcome.name} ({outcome.detail})"
            problems.append(outcome)
            log.info("DGR %s seq %d attempt %d/%d: %s", verb, seq, attempt, attempts, outcome)
        message = (f"no valid answer from the DGR on {self._config.port} to {verb} (seq {seq}) after {attempts} "
                   f"attempt(s): {'; '.join(problems)}; expected '${seq} ACK {verb} ...' within "
                   f"{self._config.timeout_ms} ms")
        safe_confirmed = None
        if fail_safe and verb != "SAFE":
            safe_confirmed = self._best_effort("SAFE", {})
            message += ("; SAFE sent and acknowledged" if safe_confirmed else
                        "; SAFE not acknowledged either: the router goes safe by its heartbeat watchdog")
        log.error("%s", message)
        raise DgrLinkError(message, safe_confirmed=safe_confirmed)

    def _best_effort(self, verb: str, args: Mapping[str, object]) -> bool:
        """One attempt, no retries, no exception: used on the way out of a failure."""
        try:
            self._transact(verb, args, attempts=1, fail_safe=False)
            return True
        except DgrError as exc:
            log.warning("DGR best-effort %s failed: %s", verb, exc)
            return False

    def _attempt(self, frame: bytes, seq: int, verb: str) -> "f.Ack | f.Nak | str":
        """Send the frame once and wait for its answer: the Ack/Nak, or why there was none."""
        if self._serial is None:
            try:
                self._open_port()
            except DgrLinkError as exc:
                time.sleep(self._timeout_s)  # the port is gone; do not spin through the retries
                return str(exc)
        assert self._serial is not None
        try:
            self._serial.write(frame)
            self._serial.flush()
        except (serial.SerialException, OSError) as exc:
            self._close_port()
            return f"write failed ({exc})"
        log.debug("DGR -> %r", frame)
        deadline = time.monotonic() + self._timeout_s
        while True:
            while self._backlog:
                outcome = self._handle_line(self._backlog.popleft(), seq, verb)
                if outcome is not None:
                    return outcome
            if time.monotonic() >= deadline:
                return f"no answer within {self._config.timeout_ms} ms"
            try:
                data = self._serial.read(1)
                if data and self._serial.in_waiting:
                    data += self._serial.read(self._serial.in_waiting)
            except (serial.SerialException, OSError) as exc:
                self._close_port()
                return f"read failed ({exc})"
            if data:
                self._backlog.extend(self._splitter.feed(data))

    def _handle_line(self, line: bytes, seq: int, verb: str) -> "f.Ack | f.Nak | str | None":
        noise, candidate = f.resync(line)
        if noise:
            log.debug("DGR line noise dropped: %r", noise[:80])
        try:
            frame = f.parse_frame(candidate)
        except f.ChecksumError as exc:
            log.debug("DGR line with bad checksum %r: %s", candidate[:80], exc)
            if candidate.startswith(b"$") and exc.seq in (None, seq):
                return f"answer with a bad checksum ({exc})"  # resend now rather than wait out the timeout
            return None
        except f.FrameError as exc:
            log.debug("DGR skipping unparseable line %r: %s", candidate[:80], exc)
            return None
        if isinstance(frame, f.Event):
            self._collect_event(frame)
            return None
        if isinstance(frame, f.Request):
            log.debug("DGR ignoring a request on the line (echo?): %r", candidate[:80])
            return None
        if frame.seq != seq or (isinstance(frame, f.Ack) and frame.verb != verb):
            log.debug("DGR ignoring stale answer %r while waiting for %s seq %d", candidate[:80], verb, seq)
            return None
        log.debug("DGR <- %r", candidate)
        return frame

    def _collect_event(self, event: f.Event) -> None:
        if self._last_event_seq is not None and event.kind != "BOOT":
            expected = self._last_event_seq % f.SEQ_MAX + 1
            if event.seq != expected:
                log.warning("DGR events lost: expected event %d, got %d", expected, event.seq)
        self._last_event_seq = event.seq
        if event.kind == "BOOT":
            log.warning("DGR announced a restart (%s): the next request says HELLO first", dict(event.args))
            self._session_ok = False
        elif event.kind == "FAULT":
            log.warning("DGR fault event: %s", dict(event.args))
        elif event.kind == "END" and event.args.get("trade_id", "").isdigit():
            log.info("DGR event %s %s", event.kind, dict(event.args))
            trade_id = int(event.args["trade_id"])
            self._ends[trade_id] = DgrEvent(event.seq, event.kind, dict(event.args), time.time())
            self._ends.move_to_end(trade_id)
            while len(self._ends) > ENDS_REMEMBERED:
                self._ends.popitem(last=False)
        else:
            log.info("DGR event %s %s", event.kind, dict(event.args))
        if len(self._events) == self._events.maxlen:
            log.warning("DGR event buffer full (%d): dropping the oldest; call drain_events()", MAX_EVENTS_KEPT)
        self._events_received += 1
        self._events.append((self._events_received, DgrEvent(event.seq, event.kind, dict(event.args), time.time())))

    def _ended_since(self, marker: int, trade_id: int) -> bool:
        return any(index > marker and event.kind == "END" and event.args.get("trade_id") == str(trade_id)
                   for index, event in self._events)
