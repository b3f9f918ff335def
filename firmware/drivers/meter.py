"""Modbus RTU meters on RS-485 buses (pymodbus 3.16.1, synchronous serial client).

Why this shape:

* One :class:`MeterBus` owns one serial port (opened with an exclusive lock) and one client.
  Several meters share an RS-485 bus by unit id; two owners of one port would interleave
  frames and corrupt both. Every request runs under the bus's lock, because the daemon reads
  from several threads, and after a configurable silence (``request_gap_ms``): cheap meters
  miss a request that follows the previous answer too closely.
* Register maps are data (:mod:`.meter_maps`); the planner merges each map into as few block
  reads as pays off, so a whole SDM630 reading takes two requests.
* Every failure becomes a :class:`MeterReadError` with the meter, unit id and port in its
  message: a timeout, a Modbus exception, a CRC error or garbage (seen as a timeout, since
  the framer drops a frame with a bad CRC), an implausible value, or a port that cannot be
  opened. The daemon logs it and reads again at its next cadence; it never trades on a value
  it could not read.
* A meter that keeps failing is backed off (2 s more per failure, up to 5 min, as OpenEMS
  does) so one dead meter cannot stall the others on its bus with a timeout per cycle.
* The port is opened lazily at the first request and reopened after an I/O error, so a USB
  adapter that is re-plugged comes back without restarting the daemon.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from pymodbus import FramerType
from pymodbus.client import ModbusSerialClient
from pymodbus.exceptions import ConnectionException, ModbusException

from ..config import BoardConfig, BusConfig, MeterConfig
from .meter_maps import METER_MAPS, Block, DecodeError, MeterMap, decode_block, plan_blocks

log = logging.getLogger(__name__)

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


class MeterReadError(Exception):
    """A meter could not be read. ``kind`` lets callers count causes without parsing text:
    "port", "timeout", "exception", "decode", "backoff"."""

    def __init__(self, message: str, *, kind: str, meter: str | None = None, port: str | None = None,
                 exception_code: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.meter = meter
        self.port = port
        self.exception_code = exception_code


@dataclass(frozen=True)
class MeterReading:
    """One reading of one meter, in integer units; a quantity the meter's map lacks is None.

    ``power_w`` is positive when the metered side draws energy (import) and negative when it
    delivers (export). ``taken_at_ms`` is wall-clock epoch milliseconds at the middle of the
    read, the best single instant for values gathered over several requests.
    """

    meter: str
    unit_id: int
    taken_at_ms: int
    import_energy_wh: int | None = None
    export_energy_wh: int | None = None
    power_w: int | None = None
    voltage_mv: int | None = None
    frequency_mhz: int | None = None

    def as_dict(self) -> dict[str, int | str | None]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for a human on a console; integers stay integers (no rounding surprises)."""
        parts = []
        for label, value, unit in (
            ("import", self.import_energy_wh, "Wh"),
            ("export", self.export_energy_wh, "Wh"),
            ("power", self.power_w, "W"),
            ("voltage", self.voltage_mv, "mV"),
            ("frequency", self.frequency_mhz, "mHz"),
        ):
            if value is not None:
                parts.append(f"{label} {value} {unit}")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.taken_at_ms // 1000))
        return f"{self.meter} (unit {self.unit_id}): {', '.join(parts)} at {stamp}.{self.taken_at_ms % 1000:03d}Z"


class MeterBus:
    """The one owner of a serial port with meters on it.

    ``retries`` is 0 by default: a missing answer already costs ``timeout_ms``, and retrying at
    the Modbus level would multiply the time the bus is blocked for every other meter; the
    daemon reads again at its next cadence instead.
    """

    def __init__(self, config: BusConfig, *, retries: int = 0):
        self.config = config
        self._retries = retries
        self._lock = threading.Lock()
        self._client: ModbusSerialClient | None = None
        self._last_request_end = 0.0  # monotonic seconds
        self._requests = 0

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def port(self) -> str:
        return self.config.port

    @property
    def requests_sent(self) -> int:
        """Requests put on the wire since this bus was created (diagnostics and tests)."""
        return self._requests

    def _open(self) -> ModbusSerialClient:
        """Open the port (caller holds the lock); errors name the port and the likely cause."""
        if self._client is not None and self._client.connected:
            return self._client
        cfg = self.config
        client = ModbusSerialClient(
            cfg.port,
            framer=FramerType.RTU,
            baudrate=cfg.baudrate,
            bytesize=cfg.bytesize,
            parity=cfg.parity,
            stopbits=cfg.stopbits,
            timeout=cfg.timeout_ms / 1000,
            retries=self._retries,
            name=f"bus-{cfg.name}",
        )
        if not client.connect():
            if not os.path.exists(cfg.port):
                reason = "no such device (is the adapter plugged in, or the emulator running?)"
            elif not os.access(cfg.port, os.R_OK | os.W_OK):
                reason = "permission denied (is the user in the dialout group?)"
            else:
                reason = "open failed (is another process using the port?)"
            raise MeterReadError(f"bus {cfg.name}: cannot open serial port {cfg.port}: {reason}",
                                 kind="port", port=cfg.port)
        self._client = client
        log.debug("bus %s: opened %s at %d baud", cfg.name, cfg.port, cfg.baudrate)
        return client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def read_registers(self, unit_id: int, function_code: int, address: int, count: int) -> list[int]:
        """One request on the wire; raises MeterReadError for anything but a good answer."""
        with self._lock:
            return self._request(unit_id, function_code, address, count)

    def _request(self, unit_id: int, function_code: int, address: int, count: int) -> list[int]:
        client = self._open()
        where = f"unit {unit_id} on {self.port}"
        what = f"{count} register(s) at 0x{address:04X} (function {function_code})"
        wait = self._last_request_end + self.config.request_gap_ms / 1000 - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        read = client.read_input_registers if function_code == 4 else client.read_holding_registers
        self._requests += 1
        try:
            response = read(address, count=count, device_id=unit_id)
        except ConnectionException:
            # An I/O error on the port (adapter unplugged): pymodbus closed it; reopen next time.
            self._client = None
            client.close()
            raise MeterReadError(f"{where}: lost the serial port (I/O error) while reading {what}",
                                 kind="port", port=self.port) from None
        except ModbusException:
            # pymodbus's framer drops frames with a bad CRC or from another unit and keeps
            # listening, so all of these end as "no response" when the timeout expires.
            raise MeterReadError(
                f"{where}: no valid answer to a read of {what} within {self.config.timeout_ms} ms "
                f"(timeout, CRC error or garbage on the line)",
                kind="timeout", port=self.port,
            ) from None
        finally:
            self._last_request_end = time.monotonic()
        if response.isError():
            code = getattr(response, "exception_code", None)
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            raise MeterReadError(f"{where}: Modbus exception {code} ({name}) reading {what}",
                                 kind="exception", port=self.port, exception_code=code)
        registers = list(response.registers)
        if len(registers) != count:
            raise MeterReadError(f"{where}: asked for {what}, got {len(registers)} register(s)",
                                 kind="decode", port=self.port)
        return registers

    def read_meter(self, name: str, unit_id: int, plan: MeterMap | Iterable[Block]) -> MeterReading:
        """One meter: all blocks of its plan (or of its map, planned here) back to back under
        one lock hold, so no other thread's request lands between them and the values belong
        to the same moment."""
        blocks = plan_blocks(plan) if isinstance(plan, MeterMap) else tuple(plan)
        values: dict[str, int] = {}
        with self._lock:
            started_ns = time.time_ns()
            try:
                for block in blocks:
                    words = self._request(unit_id, block.function_code, block.address, block.count)
                    values.update(decode_block(block, words))
            except DecodeError as exc:
                raise MeterReadError(f"meter {name} (unit {unit_id} on {self.port}): implausible value: {exc}",
                                     kind="decode", meter=name, port=self.port) from None
            except MeterReadError as exc:
                raise MeterReadError(f"meter {name}: {exc}", kind=exc.kind, meter=name, port=self.port,
                                     exception_code=exc.exception_code) from None
            finished_ns = time.time_ns()
        return MeterReading(meter=name, unit_id=unit_id, taken_at_ms=(started_ns + finished_ns) // 2_000_000, **values)


@dataclass
class _Backoff:
    failures: int = 0
    not_before: float = 0.0  # monotonic seconds


class MeterSet:
    """All meters of a board, by name, on their buses. A context manager: closing releases the ports."""

    def __init__(self, buses: Mapping[str, MeterBus], meters: Iterable[MeterConfig], *,
                 maps: Mapping[str, MeterMap] = METER_MAPS, backoff_step_s: float = 2.0,
                 backoff_max_s: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self._buses = dict(buses)
        self._meters: dict[str, MeterConfig] = {}
        self._blocks: dict[str, tuple[Block, ...]] = {}
        for meter in meters:
            if meter.bus not in self._buses:
                raise ValueError(f"meter {meter.name}: bus {meter.bus!r} is not one of {', '.join(self._buses)}")
            if meter.model not in maps:
                raise ValueError(f"meter {meter.name}: model {meter.model!r} is not one of {', '.join(sorted(maps))}")
            self._meters[meter.name] = meter
            self._blocks[meter.name] = plan_blocks(maps[meter.model])
        self._backoff_step_s = backoff_step_s
        self._backoff_max_s = backoff_max_s
        self._clock = clock
        self._backoff: dict[str, _Backoff] = {name: _Backoff() for name in self._meters}
        self._backoff_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: BoardConfig, **options) -> "MeterSet":
        """No port is opened here: a missing port is reported by the read that needs it."""
        buses = {bus.name: MeterBus(bus) for bus in config.buses}
        return cls(buses, config.meters, **options)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._meters)

    def bus_of(self, name: str) -> MeterBus:
        return self._buses[self._meter(name).bus]

    def blocks_of(self, name: str) -> tuple[Block, ...]:
        """The planned requests for one meter read (len() is the number of requests)."""
        self._meter(name)
        return self._blocks[name]

    def _meter(self, name: str) -> MeterConfig:
        try:
            return self._meters[name]
        except KeyError:
            raise ValueError(f"no meter named {name!r}; expected one of {', '.join(self._meters)}") from None

    def read(self, name: str) -> MeterReading:
        meter = self._meter(name)
        bus = self._buses[meter.bus]
        state = self._backoff[name]
        with self._backoff_lock:
            remaining = state.not_before - self._clock()
            if remaining > 0:
                raise MeterReadError(
                    f"meter {name} (unit {meter.unit_id} on {bus.port}): skipped after {state.failures} "
                    f"failed read(s) in a row; next attempt in {remaining:.1f} s",
                    kind="backoff", meter=name, port=bus.port)
        try:
            reading = bus.read_meter(name, meter.unit_id, self._blocks[name])
        except MeterReadError as exc:
            with self._backoff_lock:
                state.failures += 1
                # The first failure is not backed off (one lost frame must not cost a cycle);
                # after that each failure adds backoff_step_s, up to backoff_max_s.
                delay = min(self._backoff_step_s * (state.failures - 1), self._backoff_max_s)
                state.not_before = self._clock() + delay
            raise  # the caller logs it once, with its own context
        with self._backoff_lock:
            state.failures, state.not_before = 0, 0.0
        return reading

    def read_all(self) -> dict[str, MeterReading | MeterReadError]:
        """Every meter once; a failure is returned in place of its reading, never raised."""
        results: dict[str, MeterReading | MeterReadError] = {}
        for name in self._meters:
            try:
                results[name] = self.read(name)
            except MeterReadError as exc:
                results[name] = exc
        return results

    def close(self) -> None:
        for bus in self._buses.values():
            bus.close()

    def __enter__(self) -> "MeterSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
