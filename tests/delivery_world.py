"""A small in-process world for delivery tests: a virtual clock, a router and the two meters.

What is real: the Controller and its scheduler modules, the Journal on a temporary SQLite file,
the delivery state machine, message signing. What is simulated (outside the system under test,
as in the deterministic simulation): the router (DGR), the meters and the ledger. The router
integrates each transfer's energy exactly and feeds the interchange meter, which is gross
(separate import/export counters) or net-only (a real bidirectional meter), with float32 kWh
resolution like the SDM registers.

``Killed`` stands for SIGKILL: it is a BaseException, so no job's ``except Exception`` can
swallow it, and the test "restarts" by building a new Controller on the same journal file.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from pathlib import Path

import coincurve

from firmware.config import parse_config
from firmware.drivers.dgr import DgrLinkError, DgrNak, DgrProtocolError, DgrStatus, DgrTransfer
from firmware.drivers.meter import MeterReading, MeterReadError
from firmware.journal import Journal
from firmware.keystore import DeviceKey
from firmware.ledger.base import SubmitResult
from firmware.scheduler.controller import Controller
from firmware.scheduler.events import EventLog

SLOT_S = 60
T0 = 1_767_225_600  # a slot edge (divisible by SLOT_S)


class Killed(BaseException):
    """The process died here (SIGKILL): nothing after this point ran."""


def board_config(tmp_path: Path, *, net_only: bool = False, tolerance_wh: int = 2):
    from firmware.config import MeterConfig

    extra = ""
    if "net_only" in MeterConfig.__dataclass_fields__:  # (keys the old firmware did not have)
        extra = f"net_only = {'true' if net_only else 'false'}\ntolerance_wh = {tolerance_wh}\n"
    text = f"""
[board]
name = "house-a"

[ledger]
url = "http://127.0.0.1:1"
ledger_id = "dgc-test"

[market]
slot_seconds = {SLOT_S}
markets_ahead = 4
gate_closure_seconds = 10

[cadence]
bid_seconds = 60
review_seconds = 30
measure_seconds = 5
poll_trades_seconds = 2

[[bus]]
name = "rs485"
port = "ports/meter-bus"
baudrate = 9600

[[meter]]
name = "house"
bus = "rs485"
unit_id = 1
model = "sdm630"
role = "house"

[[meter]]
name = "interchange"
bus = "rs485"
unit_id = 2
model = "sdm120"
role = "interchange"
{extra}
[dgr]
port = "ports/dgr"
"""
    return parse_config(text, tmp_path / "board.toml")


def half_up(value: float) -> int:
    import math

    return int(math.floor(value + 0.5))


def float32(value: float) -> float:
    return struct.unpack(">f", struct.pack(">f", value))[0]


@dataclass
class Xfer:
    trade_id: int
    direction: str
    power_w: int
    end_at: int
    energy_wh: int
    started_at: float
    moved_wh: float = 0.0


@dataclass
class Router:
    """The DGR as the driver presents it (same methods, same exceptions)."""

    clock: list
    mode: str = "idle"
    active: dict = field(default_factory=dict)
    ended: dict = field(default_factory=dict)  # trade_id -> (reason, moved_wh)
    starts: list = field(default_factory=list)  # every START the router executed
    start_naks: list = field(default_factory=list)  # exceptions for the next STARTs (not executed)
    answer_error_next_start: bool = False  # execute the next START, then answer garbage
    kill_after_start: bool = False  # execute the next START, then the DGC process dies
    kill_before_start: int | None = None  # the DGC process dies sending START of this trade: never executed
    link_down: bool = False
    power_cap_w: int | None = None  # the router cannot run a transfer faster than this
    export_wh: float = 0.0
    import_wh: float = 0.0
    net_export_wh: float = 0.0  # what a net-only meter shows
    net_import_wh: float = 0.0
    events: list = field(default_factory=list)
    frames: list = field(default_factory=list)  # verbs in order, for "who spoke first"
    # What the driver of the running process knows of ended transfers: the END events it
    # received and the STOP answers (was=ended/active, moved_wh) it got; a restart forgets them
    # (World.restart), as a new process's driver starts empty.
    known_ends: dict = field(default_factory=dict)
    known_unknown: set = field(default_factory=set)  # STOP answered was=unknown (this process's driver)
    # What its HELLO announced: the heartbeat watchdog (this world's router has no watchdog of
    # its own: with the link down a transfer runs on to its target, as within a long watchdog).
    heartbeat_timeout_ms: int = 6_000
    # ENDs the router sent that the driver has not read yet: like the real driver, it reads
    # events with its next frame's answer, so that is when an END is "received".
    unheard_ends: dict = field(default_factory=dict)
    _t: float | None = None

    def advance(self) -> None:
        """Integrate every active transfer up to the clock's time, in 1-s steps."""
        now = self.clock[0]
        t = self._t if self._t is not None else now
        while t < now:
            step = min(1.0, now - t)
            net = 0.0
            for x in list(self.active.values()):
                if t >= x.end_at:
                    self._end(x, "end_at")
                    continue
                dt = min(step, x.end_at - t)
                power = x.power_w if self.power_cap_w is None else min(x.power_w, self.power_cap_w)
                wh = min(power * dt / 3600.0, x.energy_wh - x.moved_wh)
                x.moved_wh += wh
                if x.direction == "export":
                    self.export_wh += wh
                    net += wh
                else:
                    self.import_wh += wh
                    net -= wh
                if x.moved_wh >= x.energy_wh - 1e-9:
                    x.moved_wh = float(x.energy_wh)
                    self._end(x, "target")
            if net > 0:
                self.net_export_wh += net
            else:
                self.net_import_wh -= net
            t += step
        self._t = now

    def _end(self, x: Xfer, reason: str) -> None:
        self.active.pop(x.trade_id, None)
        self.ended[x.trade_id] = (reason, x.moved_wh)
        self.unheard_ends[x.trade_id] = (reason, x.moved_wh)
        self.events.append(("END", {"trade_id": str(x.trade_id), "reason": reason, "moved_wh": str(int(x.moved_wh))}))

    def _frame(self, verb: str) -> None:
        self.frames.append(verb)
        if self.link_down:
            raise DgrLinkError(f"no answer to {verb} after 4 attempts", safe_confirmed=False)
        self.advance()
        self.hear_ends()

    def hear_ends(self) -> None:
        """The driver reads the ENDs the router sent since its last frame (now)."""
        for trade_id, (reason, moved) in self.unheard_ends.items():
            self.known_ends[trade_id] = (reason, moved, self.clock[0])
        self.unheard_ends.clear()

    def status(self) -> DgrStatus:
        self._frame("STATUS")
        return self._status()

    def _status(self) -> DgrStatus:
        transfers = tuple(DgrTransfer(x.trade_id, x.direction, x.power_w, x.end_at, x.energy_wh, int(x.moved_wh))
                          for x in self.active.values())
        return DgrStatus(self.mode, 0, int(self.export_wh), int(self.import_wh), 50, (), transfers, int(self.clock[0]))

    def heartbeat(self) -> str:
        self._frame("HEARTBEAT")
        return self.mode

    def start_transfer(self, trade_id, direction, power_w, end_at, energy_wh) -> DgrStatus:
        if self.kill_before_start == trade_id:
            self.kill_before_start = None
            raise Killed("killed after journalling the intent, before the START frame went out")
        self._frame("START")
        if self.start_naks:
            raise self.start_naks.pop(0)
        if self.mode == "safe":
            raise DgrNak(31, "SAFE_MODE", "the router is in safe mode", verb="START")
        if trade_id in self.active:
            raise DgrNak(34, "TRADE_ACTIVE", "a transfer with this trade_id is already active", verb="START")
        self.active[trade_id] = Xfer(trade_id, direction, power_w, end_at, energy_wh, self.clock[0])
        self.starts.append(trade_id)
        self.mode = "transfer"
        if self.kill_after_start:
            self.kill_after_start = False
            raise Killed("killed between the router's ACK and the journal")
        if self.answer_error_next_start:
            self.answer_error_next_start = False
            raise DgrProtocolError("DGR answered START (seq 7) with an invalid field: started_at: expected an integer")
        return self._status()

    def stop_transfer(self, trade_id) -> DgrStatus:
        self._frame("STOP")
        x = self.active.get(trade_id)
        if x is not None:
            self._end(x, "stop")
            self.hear_ends()  # the STOP's own answer carries it
        elif trade_id in self.ended and trade_id not in self.known_ends:
            reason, moved = self.ended[trade_id]  # ACK STOP was=ended moved_wh reason: when unknown
            self.known_ends[trade_id] = (reason, moved, 0.0)
        elif trade_id not in self.ended:
            self.known_unknown.add(trade_id)  # ACK STOP was=unknown: the router never ran it
        if not self.active and self.mode == "transfer":
            self.mode = "idle"
        return self._status()

    def safe_state(self) -> DgrStatus:
        self._frame("SAFE")
        for x in list(self.active.values()):
            self._end(x, "safe")
        self.mode = "safe"
        return self._status()

    def resume(self) -> DgrStatus:
        self._frame("RESUME")
        if self.mode == "safe":
            self.mode = "idle"
        return self._status()

    def drain_events(self):
        from firmware.drivers.dgr import DgrEvent

        out = [DgrEvent(i, kind, args) for i, (kind, args) in enumerate(self.events)]
        self.events.clear()
        return out

    def transfer_end(self, trade_id):
        from firmware.drivers.dgr import DgrEvent

        if trade_id in self.known_ends:
            reason, moved, at = self.known_ends[trade_id]
            return DgrEvent(0, "END", {"trade_id": str(trade_id), "reason": reason, "moved_wh": str(int(moved))}, at)
        return None

    @property
    def last_hello(self):
        from types import SimpleNamespace

        return SimpleNamespace(heartbeat_timeout_ms=self.heartbeat_timeout_ms)

    def transfer_unknown(self, trade_id) -> bool:
        return trade_id in self.known_unknown

    def reboot(self) -> None:
        """A power cycle: the active transfers are lost (no END; what they moved stays moved),
        the ended ones it remembers stay, and it announces BOOT."""
        self.advance()
        self.active.clear()
        self.mode = "idle"
        self.events.append(("BOOT", {"router": "world", "fw": "1", "proto": "1"}))

    def end_now(self, trade_id: int, reason: str = "fault") -> None:
        """The router ends a transfer by itself (a local fault, an overcurrent trip)."""
        self.advance()
        self._end(self.active[trade_id], reason)
        if not self.active and self.mode == "transfer":
            self.mode = "idle"

    def close(self) -> None:
        pass


@dataclass
class Meters:
    """The house and interchange meters, as the MeterSet presents them."""

    clock: list
    router: Router
    net_only: bool = False
    fail_interchange: int = 0  # the next N interchange reads fail (CRC error)
    house_wh: float = 1_000.0
    gain: float = 1.0  # the class-1 interchange meter reads this fraction of what the router counts
    export_base_wh: float = 80_000.0
    import_base_wh: float = 50_000.0

    names = ("house", "interchange")

    def read_order(self):
        return self.names

    def read(self, name: str) -> MeterReading:
        self.router.advance()
        ms = int(self.clock[0] * 1000)
        if name == "house":
            self.house_wh += 1.0
            return MeterReading("house", 1, ms, int(self.house_wh), 0, 0)
        if self.fail_interchange:
            self.fail_interchange -= 1
            raise MeterReadError("meter interchange: CRC error in the answer", kind="crc", meter=name)
        if self.net_only:
            imp, exp = self.router.net_import_wh, self.router.net_export_wh
        else:
            imp, exp = self.router.import_wh, self.router.export_wh
        # float32 kWh, as an SDM register holds it, decoded as the driver does (half away from zero)
        imp_kwh = float32((self.import_base_wh + imp * self.gain) / 1000)
        exp_kwh = float32((self.export_base_wh + exp * self.gain) / 1000)
        fine = {}
        if "import_energy_mwh" in MeterReading.__dataclass_fields__:  # (the old firmware had whole Wh only)
            fine = {"import_energy_mwh": half_up(imp_kwh * 1_000_000), "export_energy_mwh": half_up(exp_kwh * 1_000_000)}
        return MeterReading("interchange", 2, ms, half_up(imp_kwh * 1000), half_up(exp_kwh * 1000), 0, **fine)

    def close(self) -> None:
        pass


@dataclass
class Trade:
    trade_id: int
    market_id: int
    side: str
    energy_wh: int
    price_per_kwh_minor: int = 20
    order_nonce: int = 1
    counterparty: str = "ab" * 20


class Ledger:
    """Accepts every message (the outbox is not under test here); keeps what it got."""

    def __init__(self, clock: list):
        self.clock = clock
        self.messages = []

    def submit(self, message):
        self.messages.append(message)
        return SubmitResult("accepted", False, None, "")

    def reports(self) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        for m in self.messages:
            if m.fields.get("type") == "delivery_report":
                out.setdefault(m.fields["trade_id"], []).append(m.fields)
        return out

    def device_account(self, device_id):
        return {"max_nonce": 0}

    def server_time_ms(self):
        return int(self.clock[0] * 1000)

    def server_time_sample(self):
        from firmware.ledger.rest import TimeSample

        now = int(self.clock[0] * 1000)
        return TimeSample(now, now, now)

    def trades_since(self, device_id, cursor):
        return [], cursor


class World:
    """One board and its devices; ``restart()`` is a new process on the same journal."""

    def __init__(self, tmp_path: Path, *, net_only: bool = False, tolerance_wh: int = 2, start: float = T0 - 30):
        self.tmp_path = tmp_path
        self.clock = [float(start)]
        self.config = board_config(tmp_path, net_only=net_only, tolerance_wh=tolerance_wh)
        self.router = Router(self.clock)
        self.meters = Meters(self.clock, self.router, net_only=net_only)
        self.ledger = Ledger(self.clock)
        self.key = DeviceKey(coincurve.PrivateKey(b"\x01" * 32))
        self.log = io.StringIO()
        self.kill_on_event: str | None = None
        self.controller = self._build()

    def _build(self) -> Controller:
        world = self

        class Stream(io.StringIO):
            def write(self, line):
                world.log.write(line)
                if world.kill_on_event and f" {world.kill_on_event} " in line:
                    world.kill_on_event = None
                    raise Killed(f"killed after {line.strip()}")
                return len(line)

        journal = Journal(self.tmp_path / "journal.sqlite3", clock_ms=lambda: int(self.clock[0] * 1000))
        return Controller(self.config, journal=journal, key=self.key, meters=self.meters, dgr=self.router,
                          ledger=self.ledger, events=EventLog("house-a", Stream()), clock=lambda: self.clock[0])

    @property
    def journal(self) -> Journal:
        return self.controller.journal

    def restart(self) -> Controller:
        try:
            self.controller.journal.close()
        except Exception:
            pass
        self.router.known_ends.clear()  # the new process's driver has heard no END yet
        self.router.unheard_ends.clear()  # (and the ENDs sent to the dead one are lost with it)
        self.router.known_unknown.clear()
        self.controller = self._build()
        return self.controller

    def trades(self, *trades: Trade) -> None:
        """Journal contracted trades, each matching an order of this board's (a trade the board
        did not make never schedules a delivery, issue 7 i)."""
        if hasattr(self.journal, "record_trades_checked"):  # (the old firmware took any trade)
            from tests.trading_helpers import with_own_order

            trades = tuple(with_own_order(self.journal, self.key, t) for t in trades)
        self.journal.record_trades(list(trades), cursor=max(t.trade_id for t in trades))

    def at(self, t: float) -> None:
        self.clock[0] = float(t)
        self.router.advance()

    def tick(self) -> None:
        self.controller.deliveries_tick()

    def run_until(self, t_end: float, step: float = 2.0, measure_every: float = 5.0) -> None:
        """The daemon's cadence: deliveries every 2 s, measure every 5 s, heartbeat every 5 s."""
        t = self.clock[0]
        next_measure = t
        while t < t_end:
            t = min(t_end, t + step)
            self.at(t)
            if t >= next_measure:
                self.controller.measure()
                self.controller.heartbeat()
                next_measure = t + measure_every
            self.tick()

    def events(self, name: str) -> list[str]:
        return [line for line in self.log.getvalue().splitlines() if f" {name} " in line + " "]
