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
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

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
    """One unit on the emulated bus: a meter model and where its values come from."""

    model: str
    source: MeterSource

    def meter_map(self, maps: Mapping[str, MeterMap] = METER_MAPS) -> MeterMap:
        try:
            return maps[self.model]
        except KeyError:
            raise MeterEmulatorError(f"meter model {self.model!r}: expected one of {', '.join(sorted(maps))}") from None


def encode_quantities(meter_map: MeterMap, quantities: Mapping[str, float]) -> dict[int, int]:
    """{register address: 16-bit word} for every register of the map, from quantities in the
    firmware's units (the inverse of the driver's decoding). NaN/inf pass through for float
    registers, so a fault-injecting source can send them; a missing quantity is a KeyError."""
    words: dict[int, int] = {}
    for reg in meter_map.registers:
        value = quantities[reg.quantity] / reg.scale
        if reg.data_type != "float32":
            value = round_half_away(value)
        for offset, word in enumerate(encode_raw(reg, value)):
            words[reg.address + offset] = word
    return words


class MeterEmulator:
    """A bus of emulated meters served on ``port`` (the emulator end of a virtual line, or a
    real RS-485 adapter on a bench PC)."""

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

    def _device(self, unit_id: int) -> SimDevice:
        meter_map = self._maps[unit_id]
        first, end = covered_span(meter_map.registers)
        function_codes = {r.function_code for r in meter_map.registers}
        source = self.units[unit_id].source

        async def refresh(function_code: int, start_address: int, address: int, count: int,
                          registers: list[int], set_values) -> ExcCodes | None:
            """Runs before each answer: pull the source, rewrite this unit's registers."""
            if function_code not in function_codes:
                return ExcCodes.ILLEGAL_FUNCTION
            try:
                words = encode_quantities(meter_map, source())
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
        """Count traffic; drop requests for unit ids this bus does not have (silence, as on RS-485)."""
        if sending:
            self.answers[pdu.dev_id] += 1
            return pdu
        self.requests[pdu.dev_id] += 1
        if pdu.dev_id not in self.units:
            log.debug("request for unit %d: not on this bus, no answer", pdu.dev_id)
            return None
        return pdu

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
        units = {m.unit_id: EmulatedMeter(m.model, sources[m.role]) for m in config.meters if m.bus == bus.name}
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
