"""The rig file: which devices the HIL tests talk to, where, and what the rig can do.

A rig file (TOML) names the resources — the meter bus (port, serial format, which meter is at
which unit id), the DGR link, the ledger — what the rig can do (its *features*), how a real
bench's devices are powered (``[power.<resource>]``, rig/power.py) and which bench place it is
(``[place]``, rig/place.py). :func:`load_rig` reads and checks it; every error names the file,
the table and the key, and what was expected. The format is in docs/bench.md.
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from firmware.drivers.meter_maps import METER_MAPS, QUANTITIES

from .power import POWER_RESOURCES, PowerDriver, power_driver

REPO = Path(__file__).resolve().parents[2]
RIGS_DIR = REPO / "hil_tests" / "rigs"
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
                   "process killed with SIGKILL and booted again, or a bench's [power.<resource>] driver)",
    "rs485-timing": "real RS-485 wire timing on the meter bus (baud rate, half duplex, driver enable); a pty has none",
    "house-emulator": "whole emulated houses on this host (dgc-host bench house: the house model driving meters and "
                      "a router), as many as a test needs: the multi-house daemon tests (trading between houses, "
                      "SIGKILL, faults through the bench control socket)",
}
KIND_FEATURES = {
    "cpython": {"emulator-control", "fault-injection", "modbus-fault-injection", "power-cycle", "house-emulator"},
    # The bench-board firmware has console commands for values, DGR link faults, reboots and
    # raw bytes, but no line-level Modbus faults; a pty has no wire timing.
    "micropython": {"emulator-control", "fault-injection", "power-cycle"},
    # A real bench: no emulator to control; power-cycle needs a [power.<resource>] driver.
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
    power: Mapping[str, PowerDriver] = field(default_factory=dict)  # resource -> its power driver (kind "none")
    place: str | None = None  # the bench place this rig is (locked for a run, rig/place.py); None: no lock
    lock_dir: Path | None = None
    text: str = ""

    @property
    def emulated(self) -> bool:
        return self.emulators != "none"

    def describe(self) -> str:
        return (f"rig {self.name!r} ({self.path}): emulators {self.emulators}, "
                f"features {', '.join(sorted(self.features)) or 'none'}")


def missing_reason(config: RigConfig, missing) -> str:
    return (f"rig {config.name!r} ({config.path}) lacks feature(s) {', '.join(missing)} "
            f"(it has: {', '.join(sorted(config.features)) or 'none'})")


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
    top = _Table(path, "top level", data, ("rig", "emulators", "meter_bus", "dgr", "ledger", "power", "place"))
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
    power: dict[str, PowerDriver] = {}
    if "power" in data:
        t = _Table(path, "power", data["power"], (*POWER_RESOURCES, "settle_s"))
        settle_s = float(t.get("settle_s", (int, float), "seconds to wait after power returns (every device)",
                               default=2.0, check=lambda v: 0 <= v <= 120))
        for resource in POWER_RESOURCES:
            if resource in t.data:
                try:
                    power[resource] = power_driver(path, resource, t.data[resource], settle_s)
                except ValueError as exc:
                    raise RigError(f"{path}: {exc}") from None
        if kind != "none" and power:
            raise RigError(f"{path}: [power]: power drivers are for a real bench (emulators none); "
                           f"emulators of kind {kind!r} are power-cycled by the rig itself")
    if kind == "none" and "power-cycle" in features and not power:
        raise RigError(f"{path}: [rig] features: power-cycle on a real bench needs a [power.meter_bus] and/or "
                       "[power.dgr] table naming a power driver")
    place = lock_dir = None
    if "place" in data:
        t = _Table(path, "place", data["place"], ("name", "lock_dir"))
        place = t.get("name", str, "the bench's name (letters, digits, - and _)",
                      check=lambda v: bool(v) and all(c.isalnum() or c in "-_" for c in v))
        lock_dir = Path(t.get("lock_dir", str, "a directory every engineer on the bench host can write",
                              default="/tmp/dgc-bench-locks", check=bool))
    return RigConfig(path=path, name=name, features=frozenset(features), emulators=kind, meter_bus=meter_bus, dgr=dgr,
                     ledger_url=ledger_url, ledger_id=ledger_id, power=power, place=place, lock_dir=lock_dir,
                     text=text)


