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
* A bus may put a UART into the kernel's RS-485 mode (``[[bus]] rs485 = true``): pyserial's
  ``RS485Settings`` on the port object pymodbus opened (``client.socket``), i.e. the
  ``TIOCSRS485`` ioctl. A port that refuses it (a pty, most USB adapters) is logged as a
  warning and used as it is: a bench must not fail for lack of a driver-enable pin.
* Every request can be observed as a :class:`FrameExchange` (the request and answer frames in
  hex, with timings), through pymodbus's ``trace_packet`` hook: ``dgc meter read --raw``.
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
from serial.rs485 import RS485Settings

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
    "port", "timeout", "exception", "decode", "backoff" (and "implausible", raised by the
    daemon for a reading firmware.plausibility rejected). ``bytes_received`` tells a silent
    meter (0) from a garbled answer (a bad CRC or noise: bytes came, no valid frame) on a
    "timeout"."""

    def __init__(self, message: str, *, kind: str, meter: str | None = None, port: str | None = None,
                 exception_code: int | None = None, bytes_received: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.meter = meter
        self.port = port
        self.exception_code = exception_code
        self.bytes_received = bytes_received


def rs485_settings(config: BusConfig) -> RS485Settings | None:
    """The kernel RS-485 settings a bus asks for, or None when it does not use RS-485 mode.

    pyserial maps ``rts_level_for_tx``/``rts_level_for_rx`` to SER_RS485_RTS_ON_SEND /
    SER_RS485_RTS_AFTER_SEND and takes the delays in seconds (it writes whole milliseconds to
    the kernel, which is why the config keys are in ms). Loopback (receiving our own frame) is
    off: the Modbus client must not read its request back as an answer.
    """
    if not config.rs485:
        return None
    active_high = config.rs485_rts_active_high
    return RS485Settings(
        rts_level_for_tx=active_high,
        rts_level_for_rx=not active_high,
        loopback=False,
        delay_before_tx=config.rs485_delay_before_tx_ms / 1000,
        delay_before_rx=config.rs485_delay_after_tx_ms / 1000,
    )


@dataclass(frozen=True)
class FrameExchange:
    """One request on the wire and what came back, for ``dgc meter read --raw``.

    ``request``/``response`` are the raw RTU frames (address, PDU, CRC) as sent and as
    received (every byte the client read, even a frame it then rejected); times are ms on a
    monotonic clock: ``started_ms`` since the bus's first traced request, ``reply_ms`` from
    the request leaving to the last byte of the answer (None without an answer),
    ``elapsed_ms`` for the whole request including pymodbus's frame checks.
    """

    meter: str | None
    unit_id: int
    function_code: int
    address: int
    count: int
    request: bytes
    response: bytes
    started_ms: float
    reply_ms: float | None
    elapsed_ms: float
    outcome: str  # "ok", or the MeterReadError kind

    def as_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["request"], values["response"] = self.request.hex(" "), self.response.hex(" ")
        return values

    def describe(self) -> list[str]:
        """Two lines a human can compare with a datasheet or a logic analyser trace."""
        who = f"{self.meter} " if self.meter else ""
        what = f"unit {self.unit_id} fc {self.function_code} 0x{self.address:04X}+{self.count}"
        tx = f"[{self.started_ms:9.1f} ms] {who}{what} > {self.request.hex(' ').upper()}"
        if self.response:
            timing = f"reply after {self.reply_ms:.1f} ms" if self.reply_ms is not None else "reply"
            rx = (f"[{self.started_ms + self.elapsed_ms:9.1f} ms] {who}{what} < {self.response.hex(' ').upper()}"
                  f"  ({len(self.response)} bytes, {timing}, {self.outcome})")
        else:
            rx = f"[{self.started_ms + self.elapsed_ms:9.1f} ms] {who}{what} < (nothing)  (no answer within {self.elapsed_ms:.1f} ms, {self.outcome})"
        return [tx, rx]


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
    # The energy counters at the register's own resolution (mWh), when the map has them.
    import_energy_mwh: int | None = None
    export_energy_mwh: int | None = None

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

    def __init__(self, config: BusConfig, *, retries: int = 0,
                 frame_trace: Callable[[FrameExchange], None] | None = None):
        self.config = config
        self._retries = retries
        self._lock = threading.Lock()
        self._client: ModbusSerialClient | None = None
        self._last_request_end = 0.0  # monotonic seconds
        self._requests = 0
        self._frame_trace = frame_trace
        self._trace_origin: float | None = None  # perf_counter of the first traced request
        # The request in flight, as seen by pymodbus's trace_packet hook (under the bus lock).
        self._tx = b""
        self._tx_at: float | None = None
        self._rx = bytearray()
        self._rx_buffer = b""
        self._rx_at: float | None = None
        self.rs485_active: bool | None = None  # None: not asked for; False: the port refused it
        self._rs485_warned = False

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
            trace_packet=self._trace_packet,
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
        settings = rs485_settings(cfg)
        if settings is not None:
            self._apply_rs485(client, settings)
        return client

    def _apply_rs485(self, client: ModbusSerialClient, settings: RS485Settings) -> None:
        """Put the freshly opened port into the kernel's RS-485 mode, or say loudly why not.

        pymodbus 3.16.1 keeps the pyserial object it opened as ``client.socket``; assigning
        ``rs485_mode`` there reconfigures the open port with the TIOCSRS485 ioctl. A port whose
        driver lacks RS-485 support (a pty, a USB adapter) raises; the setting is then removed
        again (pyserial would otherwise retry it on every reconfiguration) and the port is used
        as a plain serial line, with one warning per bus.
        """
        port = client.socket
        cfg = self.config
        try:
            port.rs485_mode = settings
        except (ValueError, OSError, NotImplementedError) as exc:
            try:
                port.rs485_mode = None
            except (ValueError, OSError):  # the plain settings were applied before; keep them
                log.debug("bus %s: clearing the refused RS-485 mode failed", cfg.name, exc_info=True)
            self.rs485_active = False
            level = logging.DEBUG if self._rs485_warned else logging.WARNING
            self._rs485_warned = True
            log.log(level, "bus %s: %s refused the kernel's RS-485 mode (%s); using it as a plain serial port, "
                    "so the transceiver's driver-enable must be switched by the adapter itself", cfg.name, cfg.port, exc)
            return
        self.rs485_active = True
        log.info("bus %s: kernel RS-485 mode on %s (RTS %s while sending, %d ms before, %d ms after)", cfg.name,
                 cfg.port, "high" if cfg.rs485_rts_active_high else "low", cfg.rs485_delay_before_tx_ms,
                 cfg.rs485_delay_after_tx_ms)

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        """pymodbus's trace_packet hook: remember the frame sent and every byte received.

        On receiving, pymodbus passes its whole receive buffer (what is left of earlier bytes
        plus the new ones). Its RTU framer (3.16.1) either keeps that buffer whole (frame not
        complete yet) or consumes all of it (a frame, good or with a bad CRC), so the new bytes
        are what extends the previous buffer, or the whole buffer after a consumption. The
        data is returned unchanged: this hook only watches.
        """
        now = time.perf_counter()
        if sending:
            self._tx, self._tx_at = bytes(data), now
        else:
            previous = self._rx_buffer
            self._rx += data[len(previous):] if data.startswith(previous) else data
            self._rx_buffer, self._rx_at = bytes(data), now
        return data

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def read_registers(self, unit_id: int, function_code: int, address: int, count: int) -> list[int]:
        """One request on the wire; raises MeterReadError for anything but a good answer."""
        with self._lock:
            return self._request(unit_id, function_code, address, count)

    def _request(self, unit_id: int, function_code: int, address: int, count: int, meter: str | None = None) -> list[int]:
        client = self._open()
        wait = self._last_request_end + self.config.request_gap_ms / 1000 - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._tx, self._tx_at, self._rx, self._rx_buffer, self._rx_at = b"", None, bytearray(), b"", None
        started = time.perf_counter()
        outcome = "ok"
        try:
            return self._exchange(client, unit_id, function_code, address, count)
        except MeterReadError as exc:
            outcome = exc.kind
            raise
        finally:
            self._last_request_end = time.monotonic()
            if self._frame_trace is not None:
                self._report_exchange(meter, unit_id, function_code, address, count, started, outcome)

    def _report_exchange(self, meter: str | None, unit_id: int, function_code: int, address: int, count: int,
                         started: float, outcome: str) -> None:
        finished = time.perf_counter()
        if self._trace_origin is None:
            self._trace_origin = started
        reply_ms = None
        if self._rx and self._rx_at is not None and self._tx_at is not None:
            reply_ms = (self._rx_at - self._tx_at) * 1000
        exchange = FrameExchange(meter=meter, unit_id=unit_id, function_code=function_code, address=address,
                                 count=count, request=self._tx, response=bytes(self._rx),
                                 started_ms=(started - self._trace_origin) * 1000, reply_ms=reply_ms,
                                 elapsed_ms=(finished - started) * 1000, outcome=outcome)
        try:
            self._frame_trace(exchange)
        except Exception:  # a broken observer must not break the bus
            log.exception("bus %s: frame trace callback failed", self.name)

    def _exchange(self, client: ModbusSerialClient, unit_id: int, function_code: int, address: int, count: int) -> list[int]:
        where = f"unit {unit_id} on {self.port}"
        what = f"{count} register(s) at 0x{address:04X} (function {function_code})"
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
            # listening, so all of these end as "no response" when the timeout expires. The
            # bytes seen on the line tell a silent meter from a garbled answer.
            received = len(self._rx)
            seen = (f"{received} byte(s) received, no valid frame" if received else "nothing received")
            raise MeterReadError(
                f"{where}: no valid answer to a read of {what} within {self.config.timeout_ms} ms "
                f"(timeout, CRC error or garbage on the line: {seen})",
                kind="timeout", port=self.port, bytes_received=received,
            ) from None
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
                    words = self._request(unit_id, block.function_code, block.address, block.count, meter=name)
                    values.update(decode_block(block, words, fine=True))
            except DecodeError as exc:
                raise MeterReadError(f"meter {name} (unit {unit_id} on {self.port}): implausible value: {exc}",
                                     kind="decode", meter=name, port=self.port) from None
            except MeterReadError as exc:
                raise MeterReadError(f"meter {name}: {exc}", kind=exc.kind, meter=name, port=self.port,
                                     exception_code=exc.exception_code, bytes_received=exc.bytes_received) from None
            finished_ns = time.time_ns()
        return MeterReading(meter=name, unit_id=unit_id, taken_at_ms=(started_ns + finished_ns) // 2_000_000, **values)


@dataclass
class _Backoff:
    failures: int = 0
    not_before: float = 0.0  # monotonic seconds


class MeterSet:
    """All meters of a board, by name, on their buses. A context manager: closing releases the ports.

    ``meter_maps`` (by meter name: a board config's custom maps and request limits) take
    precedence over ``maps`` (by model name).
    """

    def __init__(self, buses: Mapping[str, MeterBus], meters: Iterable[MeterConfig], *,
                 maps: Mapping[str, MeterMap] = METER_MAPS, meter_maps: Mapping[str, MeterMap] | None = None,
                 backoff_step_s: float = 2.0, backoff_max_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        self._buses = dict(buses)
        self._meters: dict[str, MeterConfig] = {}
        self._blocks: dict[str, tuple[Block, ...]] = {}
        for meter in meters:
            if meter.bus not in self._buses:
                raise ValueError(f"meter {meter.name}: bus {meter.bus!r} is not one of {', '.join(self._buses)}")
            meter_map = (meter_maps or {}).get(meter.name) or maps.get(meter.model)
            if meter_map is None:
                raise ValueError(f"meter {meter.name}: model {meter.model!r} is not one of {', '.join(sorted(maps))}"
                                 " and no map was given for it")
            self._meters[meter.name] = meter
            self._blocks[meter.name] = plan_blocks(meter_map)
        self._backoff_step_s = backoff_step_s
        self._backoff_max_s = backoff_max_s
        self._clock = clock
        self._backoff: dict[str, _Backoff] = {name: _Backoff() for name in self._meters}
        self._backoff_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: BoardConfig, *, frame_trace: Callable[[FrameExchange], None] | None = None,
                    **options) -> "MeterSet":
        """No port is opened here: a missing port is reported by the read that needs it.
        ``frame_trace`` sees every request on every bus (``dgc meter read --raw``)."""
        buses = {bus.name: MeterBus(bus, frame_trace=frame_trace) for bus in config.buses}
        return cls(buses, config.meters, meter_maps=config.meter_maps, **options)

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

    def failures(self, name: str) -> int:
        """Failed reads of this meter in a row (0 after a good read)."""
        self._meter(name)
        with self._backoff_lock:
            return self._backoff[name].failures

    def read_order(self) -> tuple[str, ...]:
        """The meters in the order a cycle should read them: those that answered last time
        first (in config order), then the failing ones, so a dead meter's timeout, when it is
        tried again, never delays a live meter's reading within the cycle."""
        with self._backoff_lock:
            return tuple(sorted(self._meters, key=lambda name: self._backoff[name].failures > 0))

    def read_all(self) -> dict[str, MeterReading | MeterReadError]:
        """Every meter once (healthy ones first); a failure is returned in place of its
        reading, never raised."""
        results: dict[str, MeterReading | MeterReadError] = {}
        for name in self.read_order():
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
