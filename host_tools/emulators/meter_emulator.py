"""Meter emulator: a real Modbus RTU slave (pymodbus 3.16.1 server) on a serial path.

One emulator is one RS-485 bus: it answers for several unit ids, each a meter model from
``METER_MAPS`` whose registers are encoded, with the map's own types, scales and word order,
from a live source at the moment each request is answered. The firmware's driver therefore
reads exactly the bytes a real meter would put on the line, through its real code path.

Choices, checked against the installed pymodbus 3.16.1:

* Datastore: ``pymodbus.simulator.SimDevice``/``SimData`` (the legacy ``ModbusServerContext``
  logs a deprecation warning at every start). Each unit is one read-only block of registers
  covering its map's address span; gap registers read as 0 as on an Eastron meter, so the
  driver's merged block reads work, while addresses outside the span get exception 2
  (illegal data address) and writes are refused the same way.
* Live values: the device's ``action=`` coroutine runs before every answer is built and may
  rewrite the registers in place; it pulls the source then. If the source fails or lacks a
  quantity, the unit answers exception 4 (device failure), like a meter with a fault.
* Unknown unit ids: with SimDevice, pymodbus answers them with exception 4 and logs a
  traceback, which no real bus does (only the addressed meter may talk). The emulator's
  ``trace_pdu`` hook drops such requests before they are handled, so the master sees
  silence and times out, as on a real bus. The same hook counts requests per unit id, which
  tests use to check how many requests a meter read takes.

It is an asyncio component: ``await start()`` inside any running loop (the bench runs it next
to the DGR emulator), ``await stop()`` to release the port. :class:`MeterEmulatorThread` runs
one in a private loop on a thread for synchronous callers such as pytest fixtures.

Fault injection
---------------

A bench must show what the firmware does when a meter misbehaves, so every emulator takes
faults at run time, from any thread (a lock guards them; the emulator's loop applies them):

``emulator.inject(unit_id, kind, count=1, **params)`` or, for a control channel speaking JSON,
``emulator.command({"op": "inject", "unit_id": 1, "kind": "no_reply", "count": 2})``.
``unit_id`` None (JSON null) applies the fault to every unit of the bus. Kinds:

=================  ===========================================================================
``no_reply``       the next ``count`` requests to the unit get no answer (the master times out)
``bad_crc``        the next ``count`` answers go out with a corrupted CRC (noise on the line)
``exception``      the next ``count`` requests are answered with Modbus exception ``code``
                   (1 illegal function, 2 illegal address, 3 illegal value, 4 device failure
                   (default), also 5, 6, 8, 10, 11)
``slow_reply``     the next ``count`` answers are sent ``delay_ms`` late (past the master's
                   timeout or not). pymodbus 3.16.1's server keeps one "last request": a
                   request arriving while a slow answer is pending is answered after it, and
                   the late answer carries the newer request's unit id, which is how a late
                   answer confuses a real bus too; tests let the late answer land first.
``counter_spike``  the next ``count`` requests that cover an energy register show the import
                   counter + ``import_wh`` and the export counter + ``export_wh``, then normal
                   values again (the classic 180.1 -> 5000 -> 180.4 kWh spike)
``counter_reset``  at the next request the meter's counters restart from 0 and count on from
                   there (a meter reset or swap); lasts until ``clear(..., counters=True)``
``fail_ratio``     until cleared, each request fails with probability ``ratio`` in one of
                   ``kinds`` (default no_reply, bad_crc, exception, counter_spike; slow_reply
                   needs ``delay_ms``), chosen by a ``random.Random`` seeded with ``seed`` (and
                   the unit id) so a run can be repeated; ``exception_code`` (default 4) and
                   ``spike_wh`` (default 1000000, added to both counters) shape the failures
=================  ===========================================================================

Queued faults of one unit apply in the order they were injected; ``fail_ratio`` only rolls for
a request no queued fault claimed. ``clear(unit_id=None, counters=False)`` drops queued faults
and ratios (of one unit or all); a reset counter stays reset unless ``counters=True``, because
a meter that was reset does not un-reset. ``faults()`` describes what is active, as JSON-able
data, and ``faults_applied`` counts each fault as it hits a request, by (unit id, kind).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import math
import random
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from firmware.config import BoardConfig, ConfigError, load_config
from firmware.drivers.meter_maps import (
    METER_MAPS,
    MeterMap,
    check_map,
    covered_span,
    encode_raw,
    round_half_away,
)

from .house_model import HouseModel, HouseParams
from .virtual_serial import VirtualSerialLine

log = logging.getLogger(__name__)

MeterSource = Callable[[], Mapping[str, float]]
"""Returns the meter's present quantities in the firmware's units (import_energy_wh, power_w,
voltage_mv, ...), as floats: the emulator encodes them the way the meter model does."""


class MeterEmulatorError(RuntimeError):
    pass


@dataclass(frozen=True)
class EmulatedMeter:
    """One unit on the emulated bus: a meter model and where its values come from.
    ``register_map`` serves a board config's custom map (``config.meter_map(name)``)."""

    model: str
    source: MeterSource
    register_map: MeterMap | None = None

    def meter_map(self, maps: Mapping[str, MeterMap] = METER_MAPS) -> MeterMap:
        if self.register_map is not None:
            return self.register_map
        try:
            return maps[self.model]
        except KeyError:
            raise MeterEmulatorError(f"meter model {self.model!r}: expected one of {', '.join(sorted(maps))}") from None


def _public(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


def encode_quantities(meter_map: MeterMap, quantities: Mapping[str, float]) -> dict[int, int]:
    """{register address: 16-bit word} for every register of the map, from quantities in the
    firmware's units (the inverse of the driver's decoding). NaN/inf pass through for float
    registers, so a fault-injecting source can send them; a missing quantity is a KeyError."""
    words: dict[int, int] = {}
    for reg in meter_map.registers:
        value = quantities[reg.quantity] * reg.scale_divisor / reg.scale
        if reg.data_type != "float32":
            value = round_half_away(value)
        for offset, word in enumerate(encode_raw(reg, value)):
            words[reg.address + offset] = word
    return words


FAULT_KINDS = ("no_reply", "bad_crc", "exception", "slow_reply", "counter_spike", "counter_reset", "fail_ratio")
REQUEST_FAULTS = ("no_reply", "bad_crc", "exception", "slow_reply")  # claim whole requests, in order
RATIO_KINDS = ("no_reply", "bad_crc", "exception", "slow_reply", "counter_spike")
DEFAULT_RATIO_KINDS = ("no_reply", "bad_crc", "exception", "counter_spike")
EXCEPTION_CODES = tuple(int(code) for code in ExcCodes)
ENERGY_QUANTITIES = ("import_energy_wh", "export_energy_wh")
_PARAMS = {
    "no_reply": {},
    "bad_crc": {},
    "exception": {"code": 4},
    "slow_reply": {"delay_ms": None},
    "counter_spike": {"import_wh": 0, "export_wh": 0},
    "counter_reset": {},
    "fail_ratio": {"ratio": None, "seed": 0, "kinds": DEFAULT_RATIO_KINDS, "exception_code": 4,
                   "delay_ms": None, "spike_wh": 1_000_000},
}


@dataclass
class _Queued:
    kind: str
    remaining: int
    params: dict[str, Any]


@dataclass
class _Ratio:
    ratio: float
    rng: random.Random
    kinds: tuple[str, ...]
    params: dict[str, Any]


@dataclass
class _UnitFaults:
    """One unit's faults; touched only under MeterEmulator._fault_lock."""

    queue: list[_Queued] = field(default_factory=list)  # request faults (REQUEST_FAULTS)
    spikes: list[_Queued] = field(default_factory=list)  # counter_spike, counted per covering request
    ratio: _Ratio | None = None
    reset_pending: bool = False
    import_offset_wh: float = 0.0  # counter_reset: added to the source's counters from then on
    export_offset_wh: float = 0.0
    pending: tuple[str, dict[str, Any]] | None = None  # the fault claimed by the request in flight


def _number(kind: str, name: str, value: Any, *, minimum: float, integer: bool = False) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not ok or value < minimum:
        what = "an integer" if integer else "a number"
        raise MeterEmulatorError(f"fault {kind}: {name} must be {what} >= {minimum}, found {value!r}")
    return value


def _fault_params(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check one injection's parameters; errors name the kind, the parameter and what is valid."""
    if kind not in FAULT_KINDS:
        raise MeterEmulatorError(f"fault kind must be one of {', '.join(FAULT_KINDS)}, found {kind!r}")
    allowed = _PARAMS[kind]
    for name in params:
        if name not in allowed:
            raise MeterEmulatorError(f"fault {kind}: unknown parameter {name!r}; expected "
                                     f"{', '.join(allowed) if allowed else 'none'}")
    values = {**allowed, **params}
    if kind == "exception":
        if values["code"] not in EXCEPTION_CODES or isinstance(values["code"], bool):
            raise MeterEmulatorError(f"fault exception: code must be one of {EXCEPTION_CODES}, found {values['code']!r}")
    elif kind == "slow_reply":
        if values["delay_ms"] is None:
            raise MeterEmulatorError("fault slow_reply: delay_ms is required (an integer >= 0)")
        _number(kind, "delay_ms", values["delay_ms"], minimum=0, integer=True)
    elif kind == "counter_spike":
        _number(kind, "import_wh", values["import_wh"], minimum=0)
        _number(kind, "export_wh", values["export_wh"], minimum=0)
        if not (values["import_wh"] or values["export_wh"]):
            raise MeterEmulatorError("fault counter_spike: expected import_wh or export_wh > 0, found neither")
    elif kind == "fail_ratio":
        ratio = values["ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise MeterEmulatorError(f"fault fail_ratio: ratio must be a number in (0, 1], found {ratio!r}")
        _number(kind, "seed", values["seed"], minimum=-(2 ** 63), integer=True)
        kinds = values["kinds"]
        if isinstance(kinds, str) or not kinds or any(k not in RATIO_KINDS for k in kinds):
            raise MeterEmulatorError(f"fault fail_ratio: kinds must be a non-empty list of {', '.join(RATIO_KINDS)}, "
                                     f"found {kinds!r}")
        values["kinds"] = tuple(kinds)
        if values["exception_code"] not in EXCEPTION_CODES:
            raise MeterEmulatorError(f"fault fail_ratio: exception_code must be one of {EXCEPTION_CODES}, "
                                     f"found {values['exception_code']!r}")
        if "slow_reply" in values["kinds"]:
            if values["delay_ms"] is None:
                raise MeterEmulatorError("fault fail_ratio: delay_ms is required when kinds include slow_reply")
            _number(kind, "delay_ms", values["delay_ms"], minimum=0, integer=True)
        _number(kind, "spike_wh", values["spike_wh"], minimum=1)
    return values


def _covers_energy(meter_map: MeterMap, address: int, count: int) -> bool:
    return any(r.quantity in ENERGY_QUANTITIES and r.address < address + count and address < r.address + r.words
               for r in meter_map.registers)


class MeterEmulator:
    """A bus of emulated meters served on ``port`` (the emulator end of a virtual line, or a
    real RS-485 adapter on a bench PC). Faults: see the module docstring."""

    def __init__(self, port: str | Path, baudrate: int, units: Mapping[int, EmulatedMeter], *,
                 parity: str = "N", stopbits: int = 1, bytesize: int = 8,
                 maps: Mapping[str, MeterMap] = METER_MAPS):
        if not units:
            raise MeterEmulatorError(f"meter emulator on {port}: expected at least one unit, found none")
        for unit_id in units:
            if not 1 <= unit_id <= 247:
                raise MeterEmulatorError(f"meter emulator on {port}: unit id must be 1..247, found {unit_id}")
        self.port = str(port)
        self.baudrate = baudrate
        self.units = dict(units)
        self._serial = {"parity": parity, "stopbits": stopbits, "bytesize": bytesize}
        self._maps = {unit_id: meter.meter_map(maps) for unit_id, meter in self.units.items()}
        for meter_map in self._maps.values():
            check_map(meter_map)
        self._server: ModbusSerialServer | None = None
        self._stopped: asyncio.Event | None = None
        # Requests received per unit id (unknown ones included) and answers sent per unit id.
        self.requests = collections.Counter()
        self.answers = collections.Counter()
        self._fault_lock = threading.Lock()
        self._faults = {unit_id: _UnitFaults() for unit_id in self.units}
        self._corrupt: set[int] = set()  # units whose answer in flight gets a bad CRC
        self.faults_applied: collections.Counter = collections.Counter()  # (unit id, kind) -> hits

    # -- fault injection (thread-safe; see the module docstring) ---------------------------------

    def _targets(self, unit_id: int | None) -> list[int]:
        if unit_id is None:
            return sorted(self.units)
        if isinstance(unit_id, bool) or unit_id not in self.units:
            raise MeterEmulatorError(f"meter emulator on {self.port}: unit id must be one of "
                                     f"{', '.join(map(str, sorted(self.units)))} or None (all), found {unit_id!r}")
        return [unit_id]

    def inject(self, unit_id: int | None, kind: str, count: int = 1, **params: Any) -> None:
        """Inject a fault into the unit's next ``count`` requests (or, for fail_ratio and
        counter_reset, from the next request on). Raises MeterEmulatorError for a bad kind,
        count or parameter, naming it."""
        values = _fault_params(kind, params)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise MeterEmulatorError(f"fault {kind}: count must be an integer >= 1, found {count!r}")
        targets = self._targets(unit_id)
        with self._fault_lock:
            for unit in targets:
                faults = self._faults[unit]
                if kind in REQUEST_FAULTS:
                    faults.queue.append(_Queued(kind, count, values))
                elif kind == "counter_spike":
                    faults.spikes.append(_Queued(kind, count, values))
                elif kind == "counter_reset":
                    faults.reset_pending = True
                else:  # fail_ratio
                    rng = random.Random(f"{values['seed']}/{unit}")
                    faults.ratio = _Ratio(float(values["ratio"]), rng, values["kinds"], values)
        log.info("meter emulator on %s: fault %s x%d on unit(s) %s %s", self.port, kind, count,
                 ", ".join(map(str, targets)), {k: v for k, v in values.items() if k in params} or "")

    def clear(self, unit_id: int | None = None, *, counters: bool = False) -> None:
        """Drop queued faults and fail ratios (of one unit, or all); ``counters=True`` also
        undoes a counter_reset (the counters jump back to the source's values)."""
        targets = self._targets(unit_id)
        with self._fault_lock:
            for unit in targets:
                old = self._faults[unit]
                kept = _UnitFaults() if counters else _UnitFaults(import_offset_wh=old.import_offset_wh,
                                                                  export_offset_wh=old.export_offset_wh)
                self._faults[unit] = kept
                self._corrupt.discard(unit)

    def faults(self) -> dict[str, Any]:
        """What is active, by unit id (as a string: JSON object keys), JSON-able."""
        with self._fault_lock:
            out: dict[str, Any] = {}
            for unit, f in sorted(self._faults.items()):
                entry: dict[str, Any] = {
                    "queued": [{"kind": q.kind, "remaining": q.remaining, **_public(q.params)} for q in f.queue + f.spikes],
                    "fail_ratio": None if f.ratio is None else {"ratio": f.ratio.ratio, "kinds": list(f.ratio.kinds)},
                    "counter_reset_pending": f.reset_pending,
                    "counter_offset_wh": {"import": f.import_offset_wh, "export": f.export_offset_wh},
                }
                out[str(unit)] = entry
            return out

    def command(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """One JSON command: {"op": "inject", "unit_id": 1 | null, "kind": ..., "count": 1, ...params},
        {"op": "clear", "unit_id": 1 | null, "counters": false} or {"op": "status"}. Returns
        {"ok": true, "faults": ...}; a bad command raises MeterEmulatorError (its message says
        what was wrong) and changes nothing."""
        if not isinstance(spec, Mapping):
            raise MeterEmulatorError(f"fault command must be an object, found {spec!r}")
        args = dict(spec)
        op = args.pop("op", "inject")
        if op == "inject":
            if "kind" not in args:
                raise MeterEmulatorError(f"fault command inject: expected a kind ({', '.join(FAULT_KINDS)})")
            self.inject(args.pop("unit_id", None), args.pop("kind"), args.pop("count", 1), **args)
        elif op == "clear":
            unknown = set(args) - {"unit_id", "counters"}
            if unknown:
                raise MeterEmulatorError(f"fault command clear: unknown key(s) {', '.join(sorted(unknown))}; "
                                         "expected unit_id, counters")
            counters = args.get("counters", False)
            if not isinstance(counters, bool):
                raise MeterEmulatorError(f"fault command clear: counters must be true or false, found {counters!r}")
            self.clear(args.get("unit_id"), counters=counters)
        elif op != "status":
            raise MeterEmulatorError(f"fault command op must be inject, clear or status, found {op!r}")
        return {"ok": True, "faults": self.faults()}

    def _claim(self, unit_id: int) -> tuple[str, dict[str, Any]] | None:
        """The fault the request just received meets (caller holds the lock)."""
        faults = self._faults[unit_id]
        if faults.queue:
            head = faults.queue[0]
            head.remaining -= 1
            if head.remaining <= 0:
                faults.queue.pop(0)
            return head.kind, head.params
        ratio = faults.ratio
        if ratio is not None and ratio.rng.random() < ratio.ratio:
            kind = ratio.rng.choice(ratio.kinds)
            p = ratio.params
            params = {"code": p["exception_code"], "delay_ms": p["delay_ms"],
                      "import_wh": p["spike_wh"], "export_wh": p["spike_wh"]}
            return kind, params
        return None

    def _counters(self, unit_id: int, meter_map: MeterMap, quantities: dict[str, float], address: int, count: int,
                  fault: tuple[str, dict[str, Any]] | None) -> dict[str, float]:
        """Apply a counter reset and spikes to the source's values (in the emulator's loop)."""
        if not all(q in quantities for q in ENERGY_QUANTITIES):
            return quantities
        with self._fault_lock:
            faults = self._faults[unit_id]
            if faults.reset_pending:
                faults.reset_pending = False
                faults.import_offset_wh = -quantities["import_energy_wh"]
                faults.export_offset_wh = -quantities["export_energy_wh"]
                self.faults_applied[(unit_id, "counter_reset")] += 1
            quantities["import_energy_wh"] = max(0.0, quantities["import_energy_wh"] + faults.import_offset_wh)
            quantities["export_energy_wh"] = max(0.0, quantities["export_energy_wh"] + faults.export_offset_wh)
            if not _covers_energy(meter_map, address, count):
                return quantities
            spike = None
            if fault is not None and fault[0] == "counter_spike":
                spike = fault[1]
            elif faults.spikes:
                head = faults.spikes[0]
                head.remaining -= 1
                if head.remaining <= 0:
                    faults.spikes.pop(0)
                spike = head.params
            if spike is not None:
                quantities["import_energy_wh"] += spike["import_wh"]
                quantities["export_energy_wh"] += spike["export_wh"]
                self.faults_applied[(unit_id, "counter_spike")] += 1
        return quantities

    def _device(self, unit_id: int) -> SimDevice:
        meter_map = self._maps[unit_id]
        first, end = covered_span(meter_map.registers)
        function_codes = {r.function_code for r in meter_map.registers}
        source = self.units[unit_id].source

        async def refresh(function_code: int, start_address: int, address: int, count: int,
                          registers: list[int], set_values) -> ExcCodes | None:
            """Runs before each answer: apply the request's fault, pull the source, rewrite
            this unit's registers."""
            with self._fault_lock:
                fault, self._faults[unit_id].pending = self._faults[unit_id].pending, None
            if fault is not None and fault[0] == "exception":
                return ExcCodes(fault[1]["code"])
            if fault is not None and fault[0] == "slow_reply":
                await asyncio.sleep(fault[1]["delay_ms"] / 1000)
            if function_code not in function_codes:
                return ExcCodes.ILLEGAL_FUNCTION
            try:
                words = encode_quantities(meter_map, self._counters(unit_id, meter_map, dict(source()), address, count, fault))
            except KeyError as exc:
                log.error("unit %d (%s): source lacks quantity %s: answering device failure",
                          unit_id, meter_map.model, exc)
                return ExcCodes.DEVICE_FAILURE
            except (ArithmeticError, ValueError, TypeError, struct.error) as exc:
                log.error("unit %d (%s): cannot encode source values (%s): answering device failure",
                          unit_id, meter_map.model, exc)
                return ExcCodes.DEVICE_FAILURE
            for reg_address, word in words.items():
                registers[reg_address - start_address] = word
            return None

        block = SimData(address=first, count=end - first, values=0, datatype=DataType.REGISTERS, readonly=True)
        return SimDevice(id=unit_id, simdata=[block], action=refresh)

    def _trace_pdu(self, sending: bool, pdu):
        """Count traffic; drop requests for unit ids this bus does not have (silence, as on
        RS-485); claim the request's fault: no_reply drops it here, bad_crc marks its answer,
        the others are applied by the unit's action."""
        if sending:
            self.answers[pdu.dev_id] += 1
            return pdu
        self.requests[pdu.dev_id] += 1
        if pdu.dev_id not in self.units:
            log.debug("request for unit %d: not on this bus, no answer", pdu.dev_id)
            return None
        with self._fault_lock:
            fault = self._claim(pdu.dev_id)
            if fault is not None and fault[0] != "counter_spike":
                self.faults_applied[(pdu.dev_id, fault[0])] += 1
            if fault is not None and fault[0] == "no_reply":
                return None
            if fault is not None and fault[0] == "bad_crc":
                self._corrupt.add(pdu.dev_id)
                fault = None
            self._faults[pdu.dev_id].pending = fault
        return pdu

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        """Corrupt the CRC of an answer marked by a bad_crc fault (the frame is otherwise intact)."""
        if sending and data:
            with self._fault_lock:
                if data[0] in self._corrupt:
                    self._corrupt.discard(data[0])
                    return data[:-1] + bytes([data[-1] ^ 0xFF])
        return data

    async def start(self) -> None:
        """Open the port and answer requests from now on; returns once listening."""
        if self._server is not None:
            raise MeterEmulatorError(f"meter emulator on {self.port}: already started")
        devices = [self._device(unit_id) for unit_id in sorted(self.units)]
        server = ModbusSerialServer(
            devices,
            framer=FramerType.RTU,
            port=self.port,
            baudrate=self.baudrate,
            trace_pdu=self._trace_pdu,
            trace_packet=self._trace_packet,
            **self._serial,
        )
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            raise MeterEmulatorError(f"meter emulator: cannot serve on serial port {self.port}: {exc}") from None
        self._server = server
        self._stopped = asyncio.Event()
        summary = ", ".join(f"{u}={m.model}" for u, m in sorted(self.units.items()))
        log.info("meter emulator on %s at %d baud: units %s", self.port, self.baudrate, summary)

    async def serve(self) -> None:
        """Start (if needed) and run until :meth:`stop` is awaited or the task is cancelled."""
        if self._server is None:
            await self.start()
        assert self._stopped is not None
        try:
            await self._stopped.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Release the port; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()
            log.info("meter emulator on %s stopped", self.port)
        if self._stopped is not None:
            self._stopped.set()


class MeterEmulatorThread:
    """Runs a :class:`MeterEmulator` in its own event loop on a daemon-less thread, for
    synchronous code (pytest fixtures, a bench script). Use as a context manager: the port is
    open when ``__enter__`` returns and released, and the thread joined, on exit."""

    def __init__(self, emulator: MeterEmulator, *, start_timeout_s: float = 5.0):
        self.emulator = emulator
        self._start_timeout_s = start_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        try:
            await self.emulator.start()
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self.emulator.serve()

    def start(self) -> "MeterEmulatorThread":
        self._thread = threading.Thread(target=self._run, name=f"meter-emulator {self.emulator.port}")
        self._thread.start()
        if not self._ready.wait(self._start_timeout_s):
            self.stop()
            raise MeterEmulatorError(f"meter emulator on {self.emulator.port} did not start within {self._start_timeout_s} s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self.emulator.stop(), self._loop)
            try:
                future.result(timeout=5)
            except Exception:  # noqa: BLE001 - stopping must not mask the caller's error
                log.exception("meter emulator on %s did not stop cleanly", self.emulator.port)
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            raise MeterEmulatorError(f"meter emulator thread for {self.emulator.port} did not exit")
        self._thread = None

    def __enter__(self) -> "MeterEmulatorThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- wiring a bench house from a board config -------------------------------------------------

def house_model_for(config: BoardConfig, start_s: float) -> HouseModel:
    """The bench house described by the config's [sim] table, its day lasting 48 slots."""
    return HouseModel(HouseParams.from_sim(config.sim, config.market.slot_seconds), start_s)


def house_sources(model: HouseModel, clock: Callable[[], float] = time.monotonic) -> dict[str, MeterSource]:
    """Live sources by meter role: each pull advances the house to ``clock()`` first, so values
    are as fresh as the request that asks for them."""

    def pull(quantities: Callable[[], dict[str, float]]) -> MeterSource:
        def source() -> Mapping[str, float]:
            model.advance(clock())
            return quantities()

        return source

    return {
        "house": pull(model.house_quantities),
        "interchange": pull(model.interchange_quantities),
        "pv": pull(model.pv_quantities),
    }


def emulator_port_for(bus_port: str) -> str:
    """Where the emulator serves for a bus whose device end is ``bus_port``: the emulator end
    of the :class:`VirtualSerialLine` the bench links at that port."""
    return str(VirtualSerialLine(bus_port).emulator_end)


def build_meter_emulators(config: BoardConfig, model: HouseModel, *, clock: Callable[[], float] = time.monotonic,
                          ports: Mapping[str, str] | None = None) -> list[MeterEmulator]:
    """One emulator per [[bus]], each unit fed by the house model according to its role.
    ``ports`` maps bus names to serial paths; by default the emulator end of the bus's line."""
    sources = house_sources(model, clock)
    emulators = []
    for bus in config.buses:
        units = {m.unit_id: EmulatedMeter(m.model, sources[m.role], config.meter_maps.get(m.name))
                 for m in config.meters if m.bus == bus.name}
        if not units:
            continue
        port = (ports or {}).get(bus.name) or emulator_port_for(bus.port)
        emulators.append(MeterEmulator(port, bus.baudrate, units, parity=bus.parity,
                                       stopbits=bus.stopbits, bytesize=bus.bytesize))
    return emulators


async def run_meter_emulator(config_path: str | Path, *, model: HouseModel | None = None,
                             ports: Mapping[str, str] | None = None, create_lines: bool = False,
                             clock: Callable[[], float] = time.monotonic,
                             stop: asyncio.Event | None = None,
                             on_ready: Callable[[list[MeterEmulator]], None] | None = None) -> None:
    """Serve the meters of a board config until ``stop`` is set or the task is cancelled.

    For ``dgc-host bench``: pass the shared ``model`` so the DGR emulator's
    ``model.add_interchange(...)`` shows on the interchange meter. ``create_lines=True`` also
    creates the virtual serial lines, linking each bus's configured port (the device end);
    leave it False when the caller owns the lines. ``on_ready`` is called with the emulators
    once all of them answer.
    """
    config = load_config(config_path)
    model = model if model is not None else house_model_for(config, clock())
    async with AsyncExitStack() as stack:
        if create_lines:
            for bus in config.buses:
                line = VirtualSerialLine(bus.port)
                stack.enter_context(line)
        emulators = build_meter_emulators(config, model, clock=clock, ports=ports)
        for emulator in emulators:
            await emulator.start()
            stack.push_async_callback(emulator.stop)
        if on_ready is not None:
            on_ready(emulators)
        if stop is None:
            stop = asyncio.Event()
        await stop.wait()


async def _serve_until_signalled(config_path: str, create_lines: bool) -> None:
    """SIGINT and SIGTERM end the run through the normal path, so the virtual lines' socat
    processes are stopped and their links removed (an unhandled SIGTERM would leak them)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run_meter_emulator(config_path, create_lines=create_lines, stop=stop)


def main(argv: list[str] | None = None) -> int:
    """``python -m host_tools.emulators.meter_emulator BOARD.toml``: a standalone bench bus."""
    parser = argparse.ArgumentParser(description="Serve a board config's meters as Modbus RTU emulators.")
    parser.add_argument("config", help="board config (TOML); its [sim] table describes the house")
    parser.add_argument("--no-lines", action="store_true",
                        help="do not create virtual serial lines (serve on <port>.emu, created by someone else)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve_until_signalled(args.config, create_lines=not args.no_lines))
    except ConfigError as exc:
        print(f"meter emulator: {exc}", file=sys.stderr)
        return 2
    except MeterEmulatorError as exc:
        print(f"meter emulator: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
