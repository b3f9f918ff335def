"""The simulated peripherals of one house: meters, the router (DGR) and its serial client.

These are OUTSIDE the system under test. They implement the interfaces the firmware's
scheduler uses (``MeterSet``: read/names/read_order; ``DgrClient``: start_transfer,
stop_transfer, status, heartbeat, safe_state, resume, drain_events, transfer_end, ...) and
raise the drivers' own exceptions (``MeterReadError``, ``DgrNak``, ``DgrLinkError``,
``DgrStateError``), so the Controller cannot tell them from the real drivers. The router
follows docs/dgr-protocol.md as the bench emulator (host_tools/emulators/dgr_emulator.py)
does: sessions (HELLO leaves safe mode), transfers that stop by themselves at their energy
target or end time, the heartbeat watchdog, latched faults, reboot, and retries that resend the
same frame (a START whose answer was lost is not executed twice by one client).

Physics is continuous and exact enough (floats, no time steps): a transfer moves energy at its
commanded power from its start until its target or end time; the energy is attributed to the
slot in which it physically moved, which is what the invariants compare the reports against.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict, deque
from types import SimpleNamespace
from dataclasses import dataclass, field
from typing import Callable

from firmware.drivers import dgr_frames as frames
from firmware.drivers.dgr import (DgrError, DgrEvent, DgrLinkError, DgrNak, DgrStateError, DgrStatus,
                                  DgrTransfer, remember_stop_answer)
from firmware.drivers.meter import MeterReading, MeterReadError


class SimulatedKill(BaseException):
    """The process dies here. A BaseException so that no ``except Exception`` in the firmware
    can swallow it: like SIGKILL, it ends the process wherever it is."""


class KillHooks:
    """Counts one house's hooked operations (journal commits, router commands, ledger calls)
    and says where the seed's planned kills fall: ``"before"`` the operation (it never
    happens) or ``"after"`` it (it happened, the process dies before recording it)."""

    def __init__(self, plan: dict[int, str] | None = None):
        self.plan = dict(plan or {})
        self.ops = 0
        self.armed = True
        self.on_kill: Callable[[str, str], None] | None = None

    def point(self, what: str) -> str | None:
        self.ops += 1
        if not self.armed:
            return None
        phase = self.plan.get(self.ops)
        if phase is not None and self.on_kill is not None:
            self.on_kill(what, phase)
        return phase

    def before(self, what: str) -> str | None:
        """Call before an operation; raises for a 'before' kill, returns the phase otherwise."""
        phase = self.point(what)
        if phase == "before":
            raise SimulatedKill(f"killed before {what}")
        return phase


class KillableConnection:
    """Wraps the journal's sqlite3 connection: a planned kill at a COMMIT either comes before it
    (the transaction never commits: the process dies, SQLite rolls it back) or right after it."""

    def __init__(self, conn, hooks: KillHooks):
        self._conn = conn
        self._hooks = hooks

    def execute(self, sql, *args):
        if sql == "COMMIT":
            phase = self._hooks.before("journal commit")
            result = self._conn.execute(sql)
            if phase == "after":
                raise SimulatedKill("killed after a journal commit")
            return result
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


# --------------------------------------------------------------------------- meters


@dataclass
class MeterFaults:
    """Fault windows and one-shot faults of one meter, in true (virtual) seconds."""

    windows: list[tuple[float, float, str]] = field(default_factory=list)  # (from, to, kind)
    spikes: list[float] = field(default_factory=list)  # times; the first read after each returns a spike
    resets: list[float] = field(default_factory=list)  # times; the counters restart from 0


class SimMeter:
    """One meter's counters (float Wh) as a function of the world; reads are integers like the driver's."""

    def __init__(self, name: str, unit_id: int, counters: Callable[[], tuple[float, float, float]],
                 faults: MeterFaults):
        self.name, self.unit_id = name, unit_id
        self._counters = counters  # -> (import_wh, export_wh, power_w), true values
        self.faults = faults
        self._offset_import = 0.0
        self._offset_export = 0.0
        self.good_reads: list[float] = []  # true times of correct answers
        self.spike_ms: set[int] = set()  # board times of the spiked answers
        self.fault_reads = 0

    def last_good_before(self, t: float) -> float | None:
        i = bisect_right(self.good_reads, t)
        return self.good_reads[i - 1] if i else None

    def read(self, now_s: float, board_ms: int) -> MeterReading:
        f = self.faults
        while f.resets and f.resets[0] <= now_s:
            f.resets.pop(0)
            imp, exp, _ = self._counters()
            self._offset_import, self._offset_export = -imp, -exp
            self.fault_reads += 1
        for t0, t1, kind in f.windows:
            if t0 <= now_s < t1:
                self.fault_reads += 1
                if kind == "timeout":
                    raise MeterReadError(f"meter {self.name}: no answer (timeout)", kind="timeout", meter=self.name,
                                         bytes_received=0)
                if kind == "crc":
                    raise MeterReadError(f"meter {self.name}: answer with a bad CRC", kind="timeout", meter=self.name,
                                         bytes_received=9)
                raise MeterReadError(f"meter {self.name}: Modbus exception 4", kind="exception", meter=self.name,
                                     exception_code=4)
        imp, exp, power = self._counters()
        imp += self._offset_import
        exp += self._offset_export
        if f.spikes and f.spikes[0] <= now_s:
            f.spikes.pop(0)
            self.fault_reads += 1
            imp += 250_000.0
            self.spike_ms.add(board_ms)
        else:
            self.good_reads.append(now_s)
        return MeterReading(meter=self.name, unit_id=self.unit_id, taken_at_ms=board_ms,
                            import_energy_wh=int(imp), export_energy_wh=int(exp), power_w=int(power),
                            voltage_mv=230_000, frequency_mhz=50_000)


class SimMeterSet:
    """The MeterSet interface the scheduler uses: names, read_order(), read(name), close()."""

    def __init__(self, meters: dict[str, SimMeter], world_sync: Callable[[], float], board_ms: Callable[[], int]):
        self._meters = meters
        self._sync = world_sync
        self._board_ms = board_ms

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._meters)

    def read_order(self) -> tuple[str, ...]:
        return tuple(self._meters)

    def read(self, name: str) -> MeterReading:
        now = self._sync()
        return self._meters[name].read(now, self._board_ms())

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- router


@dataclass
class Transfer:
    trade_id: int
    direction: str
    power_w: int
    end_at: int
    energy_wh: int
    started_at: float
    moved_wh: float = 0.0


@dataclass
class RouterFaults:
    link_down: list[tuple[float, float]] = field(default_factory=list)  # no frame gets through either way
    drops: list[tuple[float, str, int]] = field(default_factory=list)  # (time, "request"|"reply", count)
    naks: list[tuple[float, str, int]] = field(default_factory=list)  # (time, verb, code): the next such request
    latch: list[float] = field(default_factory=list)  # a hardware fault latches (RESUME clears it)
    reboots: list[float] = field(default_factory=list)


class SimRouter:
    """The router's state and physics; shared by every incarnation of the house's process."""

    def __init__(self, name: str, *, heartbeat_timeout_s: float, max_power_w: int, max_transfers: int,
                 faults: RouterFaults, slot_seconds: int, observer):
        self.name = name
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_power_w = max_power_w
        self.max_transfers = max_transfers
        self.faults = faults
        self.slot_seconds = slot_seconds
        self.observer = observer  # invariants: told about every START and every watchdog check
        self.t = 0.0
        self.last_frame_at = 0.0
        self.session: str | None = None
        self.safe = False
        self.heartbeat_lost = False
        self.hard_faults: list[str] = []
        self.transfers: dict[int, Transfer] = {}
        self.ended: OrderedDict[int, tuple[str, float]] = OrderedDict()  # trade -> (reason, moved)
        self.export_wh = 0.0
        self.import_wh = 0.0
        self.moved_by_slot: dict[tuple[int, str], float] = {}
        self.moved_by_trade: dict[int, float] = {}
        self.outbox: list[tuple[str, dict]] = []  # events on the line, for whichever client reads next
        self.pending_drop_request = 0
        self.pending_drop_reply = 0
        self.pending_naks: list[tuple[str, int]] = []
        self.answers: dict[tuple[str, int], object] = {}  # (session, seq) -> executed answer (retry window)
        self.operator_safe = False
        self.safe_since: float | None = None  # when safe/fault mode began (None: not in it)

    # -- physics ----------------------------------------------------------------------

    def mode(self) -> str:
        if self.hard_faults:
            return "fault"
        if self.safe:
            return "safe"
        return "transfer" if self.transfers else "idle"

    def advance(self, t1: float) -> None:
        """Physics up to true time ``t1``: transfers move energy; latched faults, reboots and the
        heartbeat watchdog happen at their own instants within the interval."""
        f = self.faults
        hb = self.heartbeat_timeout_s
        while True:
            nxt = t1
            if f.latch and f.latch[0] < nxt:
                nxt = f.latch[0]
            if f.reboots and f.reboots[0] < nxt:
                nxt = f.reboots[0]
            if self.transfers and self.last_frame_at + hb < nxt:
                nxt = self.last_frame_at + hb
            self._move_until(max(nxt, self.t))
            if f.latch and f.latch[0] <= self.t:
                f.latch.pop(0)
                self._went_safe()
                self._stop_all("fault")
                if "overtemp" not in self.hard_faults:
                    self.hard_faults.append("overtemp")
                self.outbox.append(("FAULT", {"code": "overtemp", "mode": self.mode()}))
            elif f.reboots and f.reboots[0] <= self.t:
                f.reboots.pop(0)
                self.transfers.clear()
                self.session = None
                self.safe = self.heartbeat_lost = False
                self.safe_since = None
                self.hard_faults = []
                self.answers.clear()
                self.outbox.append(("BOOT", {"router": self.name, "fw": "sim", "proto": "1"}))
            elif self.transfers and self.t - self.last_frame_at >= hb:
                self._watchdog()
            elif self.t >= t1:
                break

    def _went_safe(self) -> None:
        if self.safe_since is None:
            self.safe_since = self.t

    def _watchdog(self) -> None:
        self._went_safe()
        self._stop_all("heartbeat")
        self.safe = True
        self.heartbeat_lost = True
        self.outbox.append(("FAULT", {"code": "heartbeat_lost", "mode": self.mode()}))

    def _move_until(self, t1: float) -> None:
        t0 = self.t
        if t1 <= t0:
            return
        for tr in list(self.transfers.values()):
            start = max(t0, tr.started_at)
            stop = min(t1, float(tr.end_at))
            remaining = tr.energy_wh - tr.moved_wh
            if tr.power_w > 0 and remaining > 0:
                stop = min(stop, start + remaining * 3600.0 / tr.power_w)
            if stop > start:
                self._credit(tr, start, stop)
            if tr.moved_wh >= tr.energy_wh - 1e-9:
                tr.moved_wh = float(tr.energy_wh)
                self._end(tr, "target")
            elif t1 >= tr.end_at:
                self._end(tr, "end_at")
        self.t = t1

    def _credit(self, tr: Transfer, start: float, stop: float) -> None:
        slot_s = self.slot_seconds
        a = start
        while a < stop:
            slot = int(a // slot_s) * slot_s
            b = min(stop, slot + slot_s)
            energy = tr.power_w * (b - a) / 3600.0
            energy = min(energy, tr.energy_wh - tr.moved_wh)
            if energy <= 0:
                break
            tr.moved_wh += energy
            key = (slot, tr.direction)
            self.moved_by_slot[key] = self.moved_by_slot.get(key, 0.0) + energy
            self.moved_by_trade[tr.trade_id] = self.moved_by_trade.get(tr.trade_id, 0.0) + energy
            if tr.direction == "export":
                self.export_wh += energy
            else:
                self.import_wh += energy
            a = b

    def _end(self, tr: Transfer, reason: str) -> None:
        self.transfers.pop(tr.trade_id, None)
        self.ended[tr.trade_id] = (reason, tr.moved_wh)
        while len(self.ended) > 32:
            self.ended.popitem(last=False)
        self.outbox.append(("END", {"trade_id": str(tr.trade_id), "reason": reason, "moved_wh": str(int(tr.moved_wh))}))

    def _stop_all(self, reason: str) -> int:
        transfers = list(self.transfers.values())
        for tr in transfers:
            self._end(tr, reason)
        return len(transfers)

    def link_restored_at(self, now: float) -> float:
        """The end of the latest link loss before ``now`` (0 if none)."""
        ends = [b for a, b in self.faults.link_down if b <= now]
        return max(ends, default=0.0)

    def link_up(self, now: float) -> bool:
        return not any(a <= now < b for a, b in self.faults.link_down)

    # -- requests (already through the link) -------------------------------------------

    def execute(self, verb: str, args: dict, now: float):
        """One request: an answer dict (the ACK's fields) or ('NAK', code, detail)."""
        if self.pending_naks:
            for i, (nak_verb, code) in enumerate(self.pending_naks):
                if nak_verb == verb:
                    del self.pending_naks[i]
                    return ("NAK", code, "injected")
        if verb == "HELLO":
            self.session = args["session"]
            if self.safe:
                self.safe = self.heartbeat_lost = False
                if not self.hard_faults:
                    self.safe_since = None
            return {"mode": self.mode(), "hb_timeout_ms": int(self.heartbeat_timeout_s * 1000)}
        if self.session != args.get("_session"):
            return ("NAK", 30, "no HELLO since the router started")
        if verb == "STATUS" or verb == "HEARTBEAT":
            return {"mode": self.mode()}
        if verb == "START":
            trade_id = args["trade_id"]
            mode = self.mode()
            if mode == "safe":  # a latched fault is resumed at START (NAK 32, then RESUME): not checked
                self.observer.start_refused(self, mode, now)
            if mode == "fault":
                return ("NAK", 32, "latched fault")
            if mode == "safe":
                return ("NAK", 31, "router is in safe mode; RESUME or HELLO first")
            if args["end_at"] <= now:
                return ("NAK", 33, "end_at is not after router time")
            if trade_id in self.transfers:
                return ("NAK", 34, "trade is already transferring")
            if len(self.transfers) >= self.max_transfers:
                return ("NAK", 35, "too many transfers")
            if sum(t.power_w for t in self.transfers.values()) + args["power_w"] > self.max_power_w:
                return ("NAK", 35, "total power above the rating")
            if args["power_w"] < 1 or args["power_w"] > self.max_power_w:
                return ("NAK", 22, "power_w out of range")
            tr = Transfer(trade_id, args["direction"], args["power_w"], args["end_at"], args["energy_wh"], now)
            self.transfers[trade_id] = tr
            self.ended.pop(trade_id, None)
            self.observer.transfer_started(self, tr, now)
            return {"trade_id": trade_id, "mode": self.mode()}
        if verb == "STOP":
            trade_id = args["trade_id"]
            tr = self.transfers.get(trade_id)
            if tr is not None:
                self._end(tr, "stop")
                return {"was": "active", "moved_wh": int(tr.moved_wh), "reason": "stop"}
            if trade_id in self.ended:  # docs/dgr-protocol.md section 5: what it moved, and why it ended
                reason, moved = self.ended[trade_id]
                return {"was": "ended", "moved_wh": int(moved), "reason": reason}
            return {"was": "unknown"}
        if verb == "SAFE":
            self._went_safe()
            self._stop_all("safe")
            self.safe = True
            return {"mode": self.mode()}
        if verb == "RESUME":
            self.safe = self.heartbeat_lost = False
            self.hard_faults = []
            self.safe_since = None
            return {"mode": self.mode()}
        return ("NAK", 20, "unknown verb")

    def status(self, now: float) -> DgrStatus:
        transfers = tuple(DgrTransfer(t.trade_id, t.direction, t.power_w, t.end_at, t.energy_wh, int(t.moved_wh))
                          for t in self.transfers.values())
        power = sum(t.power_w if t.direction == "export" else -t.power_w for t in self.transfers.values())
        faults = tuple(self.hard_faults) + (("heartbeat_lost",) if self.heartbeat_lost else ())
        return DgrStatus(mode=self.mode(), power_w=power, export_wh=int(self.export_wh), import_wh=int(self.import_wh),
                         soc_percent=50, faults=faults, transfers=transfers, router_time=int(now))


class SimDgrClient:
    """What one process's ``DgrClient`` does, in-process: sessions, retries of the same frame,
    best-effort SAFE when retries are exhausted, STATUS read-back, events and END memory."""

    def __init__(self, router: SimRouter, *, session: str, retries: int, timeout_s: float,
                 world_sync: Callable[[], float], world_delay: Callable[[float], None], hooks: KillHooks,
                 on_frame: Callable[[str], None] | None = None, board_clock: Callable[[], float] | None = None):
        self._router = router
        # The real driver stamps what it receives with the board's clock (time.time()).
        self._board_clock = board_clock or (lambda: router.t)
        self._session = session
        self._retries = retries
        self._sync = world_sync
        self._delay = world_delay
        self._timeout_s = timeout_s
        self._hooks = hooks
        self._session_ok = False
        self._seq = 0
        self._events: deque[DgrEvent] = deque(maxlen=1000)
        self._ends: OrderedDict[int, DgrEvent] = OrderedDict()
        self._unknown: OrderedDict[int, None] = OrderedDict()  # STOP answered was=unknown
        self._hello: SimpleNamespace | None = None  # heartbeat_timeout_ms, from the last HELLO
        self._first = True
        self._on_frame = on_frame

    # -- the line ------------------------------------------------------------------------

    def _collect(self) -> None:
        r = self._router
        if self._first:  # bytes that arrived before this process opened the port are stale
            r.outbox.clear()
            self._first = False
            return
        for kind, args in r.outbox:
            event = DgrEvent(0, kind, dict(args), self._board_clock())  # received now, as the real driver stamps it
            if kind == "BOOT":
                self._session_ok = False
            elif kind == "END" and args.get("trade_id", "").isdigit():
                self._ends[int(args["trade_id"])] = event
                while len(self._ends) > 64:
                    self._ends.popitem(last=False)
            self._events.append(event)
        r.outbox.clear()

    def _transact(self, verb: str, args: dict, *, attempts: int | None = None, fail_safe: bool = True):
        r = self._router
        self._seq += 1
        key = (self._session, self._seq)
        attempts = attempts if attempts is not None else self._retries + 1
        wire = dict(args, _session=self._session) if verb != "HELLO" else dict(args, session=self._session)
        for _ in range(attempts):
            now = self._sync()
            if not r.link_up(now):
                self._delay(self._timeout_s)  # the driver waits out its timeout for each attempt
                continue
            if r.pending_drop_request > 0:
                r.pending_drop_request -= 1
                self._delay(self._timeout_s)
                continue
            r.last_frame_at = now
            if key in r.answers:
                answer = r.answers[key]
            else:
                answer = r.execute(verb, wire, now)
                r.answers[key] = answer
                if len(r.answers) > 64:
                    r.answers.pop(next(iter(r.answers)))
            if r.pending_drop_reply > 0:
                r.pending_drop_reply -= 1
                self._delay(self._timeout_s)
                continue
            self._collect()
            if isinstance(answer, tuple):
                code, detail = answer[1], answer[2]
                raise DgrNak(code, frames.ERROR_CODES[code].name, detail, verb=verb, seq=self._seq)
            if verb == "HELLO":
                self._hello = SimpleNamespace(heartbeat_timeout_ms=answer.get("hb_timeout_ms", 0))
            return answer
        message = f"no valid answer from the simulated DGR to {verb} after {attempts} attempt(s)"
        safe_confirmed = None
        if fail_safe and verb != "SAFE":
            try:
                self._transact("SAFE", {}, attempts=1, fail_safe=False)
                safe_confirmed = True
            except DgrError:
                safe_confirmed = False
        raise DgrLinkError(message, safe_confirmed=safe_confirmed)

    def _exchange(self, verb: str, args: dict):
        if not self._session_ok and verb != "HELLO":
            self._transact("HELLO", {})
            self._session_ok = True
        try:
            return self._transact(verb, args)
        except DgrNak as nak:
            if nak.code != 30 or verb == "HELLO":
                raise
            self._session_ok = False
            self._transact("HELLO", {})
            self._session_ok = True
            return self._transact(verb, args)

    def _command(self, what: str, fn):
        phase = self._hooks.before(f"router {what}")
        if self._on_frame is not None:
            self._on_frame(what)
        result = fn()
        if phase == "after":
            raise SimulatedKill(f"killed after router {what}")
        return result

    def _status_now(self) -> DgrStatus:
        self._exchange("STATUS", {})
        return self._router.status(self._router.t)

    # -- the DgrClient interface ------------------------------------------------------------

    def hello(self):
        return self._command("HELLO", lambda: self._exchange("HELLO", {}))

    @property
    def last_hello(self):
        """The router's last HELLO answer, as the real driver keeps it (its watchdog)."""
        return self._hello

    def status(self) -> DgrStatus:
        return self._command("STATUS", self._status_now)

    def start_transfer(self, trade_id: int, direction: str, power_w: int, end_at: int, energy_wh: int) -> DgrStatus:
        def run():
            self._exchange("START", {"trade_id": trade_id, "direction": direction, "power_w": power_w,
                                     "end_at": end_at, "energy_wh": energy_wh})
            status = self._status_now()
            active = status.transfer(trade_id)
            if active is not None or trade_id in self._ends:
                return status
            try:
                self._transact("STOP", {"trade_id": trade_id}, attempts=1, fail_safe=False)
            except DgrError:
                pass
            raise DgrStateError(f"simulated DGR acknowledged START of trade {trade_id} but STATUS shows it not active")
        return self._command(f"START {trade_id}", run)

    def stop_transfer(self, trade_id: int) -> DgrStatus:
        def run():
            answer = self._exchange("STOP", {"trade_id": trade_id})
            remember_stop_answer(self._ends, self._unknown, trade_id, answer, self._board_clock())
            return self._status_now()
        return self._command(f"STOP {trade_id}", run)

    def safe_state(self) -> DgrStatus:
        def run():
            self._exchange("SAFE", {})
            return self._status_now()
        return self._command("SAFE", run)

    def resume(self) -> DgrStatus:
        def run():
            self._exchange("RESUME", {})
            return self._status_now()
        return self._command("RESUME", run)

    def heartbeat(self) -> str:
        return self._command("HEARTBEAT", lambda: self._exchange("HEARTBEAT", {})["mode"])

    def drain_events(self) -> list[DgrEvent]:
        events = list(self._events)
        self._events.clear()
        return events

    def transfer_end(self, trade_id: int) -> DgrEvent | None:
        return self._ends.get(trade_id)

    def transfer_unknown(self, trade_id: int) -> bool:
        return trade_id in self._unknown

    def open(self):
        return self

    def close(self) -> None:
        pass

    @property
    def session(self) -> str:
        return self._session
