"""The meter driver against meters over a real serial line, on the rig (hil_tests/rig.py).

Nothing is mocked: the driver (pymodbus client) and the meters exchange Modbus RTU frames over a
serial line, exactly as the board talks to meters on RS-485. On the default rig the meters are
the pymodbus emulator behind a socat pty pair; with ``--rig`` the same tests run against the
MicroPython bench-board emulators or a real bench. Tests that set the meters' values or read
the emulator's counters declare ``emulator-control``, those that make a meter misbehave
``fault-injection``; they are skipped on a rig without them. Faults are injected on the line
side: a unit id nobody answers, a register that does not exist, a meter that sends NaN, a device
that answers with a bad CRC, a port that is missing.

Tests that build their own lines and emulators (a noisy slave, a port that disappears, the bench
house, the timing of the pymodbus emulator) do not use the rig and run the same on every rig.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import serial

from firmware.config import BusConfig, MeterConfig, load_config
from firmware.drivers.meter import MeterBus, MeterReadError, MeterSet
from firmware.drivers.meter_maps import METER_MAPS, plan_blocks, round_half_away
from hil_tests.rig import LiveValues, Rig, RigError
from host_tools.emulators.meter_emulator import (
    EmulatedMeter,
    MeterEmulator,
    MeterEmulatorError,
    MeterEmulatorThread,
    house_model_for,
    run_meter_emulator,
)
from host_tools.emulators.virtual_serial import VirtualSerialLine

REPO = Path(__file__).resolve().parents[1]
SIM_TOML = REPO / "board_configs" / "sim.toml"
TIMEOUT_MS = 300


HOUSE_VALUES = dict(import_energy_wh=12_345.678, export_energy_wh=4_321.4, power_w=-1_234.6,
                    voltage_mv=231_456.0, frequency_mhz=49_987.0)
INTERCHANGE_VALUES = dict(import_energy_wh=200.0, export_energy_wh=1_500.4, power_w=-2_000.0,
                          voltage_mv=230_000.0, frequency_mhz=50_000.0)


class Bench:
    """One bus: a virtual line, the emulator serving unit 1 (SDM630) and unit 2 (SDM120)."""

    def __init__(self, tmp_path: Path, baudrate: int):
        self.house = LiveValues(HOUSE_VALUES)
        self.interchange = LiveValues(INTERCHANGE_VALUES)
        self.line = VirtualSerialLine(tmp_path / "meter-bus")
        self.baudrate = baudrate
        self.emulator: MeterEmulator | None = None
        self._thread: MeterEmulatorThread | None = None

    def __enter__(self) -> "Bench":
        self.line.start()
        try:
            self.emulator = MeterEmulator(self.line.emulator_end, self.baudrate, {
                1: EmulatedMeter("sdm630", self.house),
                2: EmulatedMeter("sdm120", self.interchange),
            })
            self._thread = MeterEmulatorThread(self.emulator).start()
        except BaseException:
            self.line.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._thread is not None:
                self._thread.stop()
        finally:
            self.line.stop()

    def bus_config(self, **overrides) -> BusConfig:
        values = dict(name="rs485", port=str(self.line.device_end), baudrate=self.baudrate,
                      timeout_ms=TIMEOUT_MS, request_gap_ms=5)
        values.update(overrides)
        return BusConfig(**values)

    def meter_set(self, extra_meters: tuple[MeterConfig, ...] = (), **bus_overrides) -> MeterSet:
        meters = (
            MeterConfig(name="house", bus="rs485", unit_id=1, model="sdm630", role="house"),
            MeterConfig(name="interchange", bus="rs485", unit_id=2, model="sdm120", role="interchange"),
        ) + extra_meters
        return MeterSet({"rs485": MeterBus(self.bus_config(**bus_overrides))}, meters)


class _NoEmulator:
    """Stands in for emulator control on a rig without it (a real bench): any use names the
    feature the test should have declared."""

    def __init__(self, rig: Rig, what: str):
        self._rig, self._what = rig, what

    def __getattr__(self, name: str):
        raise RigError(f"{self._rig.config.describe()}: {self._what}.{name} needs the rig feature emulator-control "
                       "(declare it with @pytest.mark.rig_features)")


class UnitValues:
    """``LiveValues``' interface (``set``/``remove``) for one unit of the rig's emulated bus."""

    def __init__(self, control, unit_id: int):
        self._control, self._unit_id = control, unit_id

    def set(self, **quantities: float) -> None:
        self._control.set(self._unit_id, **quantities)

    def remove(self, quantity: str) -> None:
        self._control.remove(self._unit_id, quantity)


class RigBench(Bench):
    """The suite's ``Bench`` on the rig's meter bus, which must have an SDM630 at unit 1 and an
    SDM120 at unit 2 (the test is skipped otherwise). On an emulated rig ``house`` and
    ``interchange`` set the emulator's values (the suite's HOUSE_VALUES and INTERCHANGE_VALUES
    to begin with) and ``emulator`` counts requests and answers per unit id; on a real bench
    they are unavailable. The rig starts and stops the line and the emulator."""

    def __init__(self, rig: Rig):
        bus = rig.meter_bus()
        if bus.find(model="sdm630", unit_id=1) is None or bus.find(model="sdm120", unit_id=2) is None:
            pytest.skip(f"{rig.config.describe()}: these tests need an sdm630 at unit 1 and an sdm120 at unit 2 "
                        "on [meter_bus]")
        self.rig, self.line, self.baudrate = rig, bus, bus.baudrate  # line.device_end: the port the driver opens
        if bus.control is None:
            self.house, self.interchange = _NoEmulator(rig, "bench.house"), _NoEmulator(rig, "bench.interchange")
            self.emulator = _NoEmulator(rig, "bench.emulator")
        else:
            self.house, self.interchange = UnitValues(bus.control, 1), UnitValues(bus.control, 2)
            self.emulator = bus.control
            self.house.set(**HOUSE_VALUES)
            self.interchange.set(**INTERCHANGE_VALUES)

    @property
    def controlled(self) -> bool:
        """True on an emulated rig: exact values and per-unit request counts can be checked too."""
        return self.line.control is not None

    def free_unit_id(self) -> int:
        """A unit id no meter of the rig answers to (9 unless the rig file names a meter there)."""
        taken = {m.unit_id for m in self.line.meters}
        return next(u for u in (9, *range(10, 248)) if u not in taken)

    def __enter__(self) -> "RigBench":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def bus_config(self, **overrides) -> BusConfig:
        """The suite's timing (TIMEOUT_MS, a 5 ms gap) with the rig's port and serial format."""
        settings = {k: v for k, v in self.line.spec.serial_settings().items() if k not in ("timeout_ms", "request_gap_ms")}
        return super().bus_config(**{**settings, **overrides})

    def meter_set(self, extra_meters: tuple[MeterConfig, ...] = (), **bus_overrides) -> MeterSet:
        meters = (
            MeterConfig(name="house", bus="rs485", unit_id=1, model="sdm630", role="house"),
            MeterConfig(name="interchange", bus="rs485", unit_id=2, model="sdm120", role="interchange"),
        ) + extra_meters
        bus = MeterBus(self.bus_config(**bus_overrides), frame_trace=self.rig.frame_recorder)
        return MeterSet({"rs485": bus}, meters)


@pytest.fixture
def bench(hil_rig):
    """The rig's meter bus as the suite's bench; the rig checks after the test that nothing was
    left behind (emulator thread or board process, socat, links)."""
    with RigBench(hil_rig) as b:
        yield b


def _board_config(tmp_path: Path, bus_port: str, baudrate: int = 115200) -> Path:
    """sim.toml with its state paths in tmp_path, the [[bus]] port at ``bus_port`` (at
    ``baudrate``) and the [dgr] port at a path nobody opens (``dgc meter read`` does not touch
    the router)."""
    text = SIM_TOML.read_text()
    text = re.sub(r'(?m)^state_dir = ".*"$', f'state_dir = "{tmp_path / "state"}"', text)
    text = re.sub(r'(?m)^key_file = ".*"$', f'key_file = "{tmp_path / "state" / "device.key"}"', text)
    text = re.sub(r'(?m)(^\[\[bus\]\]\n(?:.*\n)*?)port = ".*"$', rf'\g<1>port = "{bus_port}"', text, count=1)
    text = re.sub(r'(?m)(^\[\[bus\]\]\n(?:.*\n)*?)baudrate = \d+$', rf'\g<1>baudrate = {baudrate}', text, count=1)
    text = re.sub(r'(?m)(^\[dgr\]\n(?:.*\n)*?)port = ".*"$', rf'\g<1>port = "{tmp_path / "dgr-not-opened"}"', text, count=1)
    path = tmp_path / "board.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.buses[0].port == bus_port and config.dgr.port == str(tmp_path / "dgr-not-opened")
    assert config.buses[0].baudrate == baudrate
    return path


def _expected(values: dict[str, float]) -> dict[str, int]:
    """What the driver must report: the source's value rounded to the integer unit (the float32
    on the wire is exact to far better than 0.5 Wh at these magnitudes)."""
    return {k: round_half_away(v) for k, v in values.items()}


def _quantities(reading) -> dict[str, int]:
    return {k: v for k, v in reading.as_dict().items() if k in HOUSE_VALUES}


# --- reading ---------------------------------------------------------------------------------

@pytest.mark.rig_features("emulator-control")
def test_two_meters_on_one_bus_read_exact_values(bench, tmp_path):
    config = load_config(_board_config(tmp_path, str(bench.line.device_end), bench.baudrate))
    before_ms = time.time_ns() // 1_000_000
    with MeterSet.from_config(config) as meters:
        house = meters.read("house")
        interchange = meters.read("interchange")
    after_ms = time.time_ns() // 1_000_000
    assert (house.meter, house.unit_id) == ("house", 1)
    assert (interchange.meter, interchange.unit_id) == ("interchange", 2)
    assert _quantities(house) == _expected(HOUSE_VALUES) == {
        "import_energy_wh": 12_346, "export_energy_wh": 4_321, "power_w": -1_235,
        "voltage_mv": 231_456, "frequency_mhz": 49_987}
    assert _quantities(interchange) == _expected(INTERCHANGE_VALUES)
    assert before_ms <= house.taken_at_ms <= interchange.taken_at_ms <= after_ms
    assert "import 12346 Wh" in house.describe() and "power -1235 W" in house.describe()


@pytest.mark.rig_features("emulator-control")
def test_sdm630_read_takes_the_planned_number_of_requests(bench):
    planned = plan_blocks(METER_MAPS["sdm630"])
    assert len(planned) == 2
    with bench.meter_set() as meters:
        assert meters.blocks_of("house") == planned
        meters.read("house")
        meters.read("house")
        assert meters.bus_of("house").requests_sent == 4
    # counted on the server side, from the frames that actually arrived
    assert bench.emulator.requests[1] == 4 and bench.emulator.answers[1] == 4


@pytest.mark.rig_features("emulator-control")
def test_values_are_live(bench):
    with bench.meter_set() as meters:
        assert meters.read("interchange").export_energy_wh == 1_500
        bench.interchange.set(export_energy_wh=1_600.0, power_w=-2.5)  # 2.5 is exact in float32
        reading = meters.read("interchange")
    assert (reading.export_energy_wh, reading.power_w) == (1_600, -3)  # half away from zero


def test_read_all_returns_readings_and_errors_side_by_side(bench):
    """A meter nobody answers for (a unit id no meter of the rig has) fails alone: the others'
    readings come back beside its error (on an emulated rig, with the exact values set)."""
    ghost = MeterConfig(name="ghost", bus="rs485", unit_id=bench.free_unit_id(), model="sdm120", role="pv")
    with bench.meter_set((ghost,)) as meters:
        results = meters.read_all()
    assert set(results) == {"house", "interchange", "ghost"}
    assert not isinstance(results["house"], Exception) and not isinstance(results["interchange"], Exception), results
    if bench.controlled:
        assert _quantities(results["house"]) == _expected(HOUSE_VALUES)
        assert _quantities(results["interchange"]) == _expected(INTERCHANGE_VALUES)
    assert isinstance(results["ghost"], MeterReadError)


def test_concurrent_readers_share_the_bus_safely(bench):
    """The daemon reads from several threads: the bus lock keeps every read whole (exactly the
    planned requests went out; on an emulated rig the meters counted exactly as many)."""
    results: list[object] = []
    with bench.meter_set() as meters:
        def worker(name: str) -> None:
            for _ in range(5):
                try:
                    results.append(meters.read(name))
                except Exception as exc:  # collected, asserted below
                    results.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in ("house", "interchange") * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        sent = meters.bus_of("house").requests_sent
        planned = 10 * len(meters.blocks_of("house")) + 10 * len(meters.blocks_of("interchange"))
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    assert len(results) == 20
    assert sent == planned == 20 * 2
    if bench.controlled:
        assert sent == bench.emulator.requests[1] + bench.emulator.requests[2]


def test_request_gap_is_kept_between_requests(bench):
    with bench.meter_set(request_gap_ms=60) as meters:
        meters.read("house")  # opens the port
        start = time.monotonic()
        meters.read("house")  # two requests, each at least 60 ms after the previous answer
        elapsed = time.monotonic() - start
    assert elapsed >= 0.120


# --- any rig: the meters the rig file names, through the board config the rig writes ----------

PLAUSIBLE = {"voltage_mv": (100_000, 300_000), "frequency_mhz": (45_000, 65_000)}


def test_rig_meters_read_through_the_board_config(hil_rig):
    """Every meter the rig names answers through the firmware's own MeterSet, built from the
    board config the rig writes (port, serial format, unit ids, models): identity, timestamps,
    plausible values, counters that never go back, and exactly the planned requests. On an
    emulated rig the values are the rig file's ``values``, to the unit."""
    bus = hil_rig.meter_bus()
    assert bus.meters, f"{hil_rig.config.path}: [meter_bus] names no meter"
    before_ms = time.time_ns() // 1_000_000
    with hil_rig.meter_set() as meters:
        first, second = meters.read_all(), meters.read_all()
        sent = meters.bus_of(bus.meters[0].name).requests_sent
    after_ms = time.time_ns() // 1_000_000
    assert list(first) == list(second) == [m.name for m in bus.meters]
    for meter in bus.meters:
        old, new = first[meter.name], second[meter.name]
        for reading in (old, new):
            assert not isinstance(reading, Exception), f"{meter.name} (unit {meter.unit_id}): {reading}"
            assert (reading.meter, reading.unit_id) == (meter.name, meter.unit_id)
            assert before_ms <= reading.taken_at_ms <= after_ms
            for quantity, (low, high) in PLAUSIBLE.items():
                value = getattr(reading, quantity)
                assert value is None or low <= value <= high, f"{meter.name}: {quantity} {value}"
            assert reading.import_energy_wh >= 0 and reading.export_energy_wh >= 0
        assert new.import_energy_wh >= old.import_energy_wh and new.export_energy_wh >= old.export_energy_wh
        assert f"import {new.import_energy_wh} Wh" in new.describe()
        if bus.control is not None:  # an emulator: it serves exactly what the rig file says
            expected = {k: v for k, v in _expected(dict(meter.values)).items() if getattr(new, k) is not None}
            assert {k: getattr(new, k) for k in expected} == expected
    assert sent == 2 * sum(len(plan_blocks(METER_MAPS[m.model])) for m in bus.meters)


def test_rig_dgc_meter_read_json(hil_rig):
    """`dgc meter read --json` on the rig's board config: one JSON line per meter, in order."""
    bus = hil_rig.meter_bus()
    result = subprocess.run([_dgc(), "meter", "read", str(hil_rig.board_config()), "--json"], capture_output=True,
                            text=True, timeout=30, env={**os.environ, "DGC_CONFIG": ""})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["meter"], r["unit_id"]) for r in lines] == [(m.name, m.unit_id) for m in bus.meters]
    for line in lines:
        assert line["voltage_mv"] is None or 100_000 <= line["voltage_mv"] <= 300_000


@pytest.mark.rig_features("emulator-control", "modbus-fault-injection")
def test_line_faults_on_the_rig_bus_are_read_errors_and_the_bus_recovers(bench):
    """Faults injected at the emulator's end of the rig's line: silence, a corrupted CRC and a
    busy meter each fail one read with the right kind, and the very next read is whole again."""
    faults = [("no_reply", {}, r"no answer|timeout", "timeout"),
              ("bad_crc", {}, "timeout, CRC error or garbage", "timeout"),
              ("exception", {"code": 6}, r"Modbus exception 6 \(device busy\)", "exception")]
    with bench.meter_set() as meters:
        for kind, params, message, error_kind in faults:
            bench.emulator.inject(2, kind, **params)
            with pytest.raises(MeterReadError, match=message) as info:
                meters.read("interchange")
            assert info.value.kind == error_kind, kind
            assert _quantities(meters.read("interchange")) == _expected(INTERCHANGE_VALUES), f"after {kind}"
        assert _quantities(meters.read("house")) == _expected(HOUSE_VALUES)  # the other meter was never disturbed
    blocks = len(plan_blocks(METER_MAPS["sdm120"]))
    # each failed read stopped at its first request; only the silent one went unanswered
    assert bench.emulator.requests[2] == 3 * (1 + blocks) and bench.emulator.answers[2] == 3 * (1 + blocks) - 1


@pytest.mark.rig_features("rs485-timing")
def test_rig_sdm630_read_takes_at_least_its_time_on_the_wire(hil_rig, record_property):
    """On a real RS-485 bus every bit takes 1/baud seconds: an SDM630 read (its planned requests
    and answers) cannot be faster than its bytes on the wire. A pty has no such time, which is
    why this needs rs485-timing; a read that is faster means the rig is not the wire it names."""
    bus = hil_rig.meter_bus()
    meter = bus.find(model="sdm630")
    if meter is None:
        pytest.skip(f"{hil_rig.config.describe()}: no sdm630 on [meter_bus]")
    spec = bus.spec
    bits_per_byte = 1 + spec.bytesize + (spec.parity != "N") + spec.stopbits
    wire_bytes = sum(8 + 5 + 2 * block.count for block in plan_blocks(METER_MAPS["sdm630"]))
    wire_s = wire_bytes * bits_per_byte / spec.baudrate
    with hil_rig.meter_set() as meters:  # the request gap only adds to the time: the bound holds
        meters.read(meter.name)  # opens the port
        samples = []
        for _ in range(10):
            start = time.perf_counter()
            meters.read(meter.name)
            samples.append(time.perf_counter() - start)
    record_property("sdm630_wire_ms", round(wire_s * 1000, 2))
    record_property("sdm630_read_ms_median", round(statistics.median(samples) * 1000, 2))
    assert min(samples) >= wire_s, f"fastest read {min(samples) * 1000:.1f} ms < {wire_s * 1000:.1f} ms on the wire"


# --- faults ----------------------------------------------------------------------------------

def test_unit_that_does_not_exist_times_out_and_the_bus_recovers(bench):
    """A unit id nobody answers for times out once (no retries), backs off after two failures,
    and the real meters on the same bus go on reading."""
    unit = bench.free_unit_id()
    ghost = MeterConfig(name="ghost", bus="rs485", unit_id=unit, model="sdm120", role="pv")
    with bench.meter_set((ghost,)) as meters:
        start = time.monotonic()
        with pytest.raises(MeterReadError) as info:
            meters.read("ghost")
        elapsed = time.monotonic() - start
        assert info.value.kind == "timeout" and info.value.meter == "ghost"
        message = str(info.value)
        assert "meter ghost" in message and f"unit {unit}" in message and str(bench.line.device_end) in message
        assert f"within {TIMEOUT_MS} ms" in message
        assert TIMEOUT_MS / 1000 * 0.9 <= elapsed <= TIMEOUT_MS / 1000 + 0.3  # one timeout, no retries
        if bench.controlled:  # the emulator saw the request and, like a real bus, nobody answered it
            assert bench.emulator.requests[unit] == 1 and bench.emulator.answers[unit] == 0
        # the other meters on the bus still read fine
        house, interchange = meters.read("house"), meters.read("interchange")
        if bench.controlled:
            assert _quantities(house) == _expected(HOUSE_VALUES)
            assert _quantities(interchange) == _expected(INTERCHANGE_VALUES)

        # a second failure in a row backs the dead meter off: no more timeouts stalling the bus
        with pytest.raises(MeterReadError):
            meters.read("ghost")
        start = time.monotonic()
        with pytest.raises(MeterReadError, match=r"skipped after 2 failed read\(s\) in a row") as info:
            meters.read("ghost")
        assert info.value.kind == "backoff"
        assert time.monotonic() - start < 0.05
        # two ghost requests (a read stops at its first timeout), one read of each real meter, and
        # nothing for the backed-off read
        assert meters.bus_of("ghost").requests_sent == 2 + len(meters.blocks_of("house")) + len(
            meters.blocks_of("interchange"))
        if bench.controlled:
            assert bench.emulator.requests[unit] == 2


@pytest.mark.rig_features("emulator-control")
def test_register_that_does_not_exist_is_a_modbus_exception(bench):
    bus = MeterBus(bench.bus_config())
    try:
        with pytest.raises(MeterReadError, match=r"unit 1 on .*: Modbus exception 2 \(illegal data address\) "
                                                 r"reading 2 register\(s\) at 0x0100 \(function 4\)") as info:
            bus.read_registers(1, 4, 0x0100, 2)
        assert info.value.kind == "exception" and info.value.exception_code == 2
        with pytest.raises(MeterReadError, match=r"Modbus exception 1 \(illegal function\)"):
            bus.read_registers(1, 3, 0x0000, 2)  # Eastron values are input registers only
        assert len(bus.read_registers(1, 4, 0x0000, 0x4C)) == 0x4C  # the whole span, gaps included
    finally:
        bus.close()


@pytest.mark.rig_features("emulator-control", "fault-injection")
def test_nan_from_the_meter_is_a_read_error_naming_the_quantity(bench):
    bench.house.set(voltage_mv=float("nan"))
    with bench.meter_set() as meters:
        with pytest.raises(MeterReadError, match=r"meter house \(unit 1 on .*\): implausible value: "
                                                 r"voltage_mv at 0x0000 \(float32\): decoded nan, expected a finite number") as info:
            meters.read("house")
        assert info.value.kind == "decode"
        bench.house.set(voltage_mv=230_000.0)
        assert meters.read("house").voltage_mv == 230_000


@pytest.mark.rig_features("emulator-control", "fault-injection")
def test_meter_fault_answers_device_failure(bench):
    bench.interchange.remove("frequency_mhz")  # the emulated meter cannot produce a value
    with bench.meter_set() as meters:
        with pytest.raises(MeterReadError, match=r"Modbus exception 4 \(device failure\)"):
            meters.read("interchange")
        assert _quantities(meters.read("house")) == _expected(HOUSE_VALUES)


def _crc16(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def test_bad_crc_on_the_line_is_a_read_error(tmp_path):
    """A device that answers with a corrupted CRC (noise on the line): the driver must not
    accept the frame and must say so, within its timeout."""
    with VirtualSerialLine(tmp_path / "noisy-bus") as line:
        stop, ready = threading.Event(), threading.Event()
        answered = []

        def noisy_slave() -> None:
            with serial.Serial(str(line.emulator_end), 115200, timeout=0.05) as port:
                ready.set()
                request = b""
                while not stop.is_set():
                    request += port.read(8 - len(request))
                    if len(request) < 8:
                        continue
                    unit, count = request[0], int.from_bytes(request[4:6], "big")
                    request = b""
                    body = bytes([unit, 4, 2 * count]) + b"\x43\x66" * count
                    crc = _crc16(body) ^ 0x0101  # corrupted
                    port.write(body + crc.to_bytes(2, "little"))
                    answered.append(unit)

        slave = threading.Thread(target=noisy_slave, name="noisy-slave")
        slave.start()
        assert ready.wait(5)
        try:
            bus_config = BusConfig(name="noisy", port=str(line.device_end), baudrate=115200, timeout_ms=TIMEOUT_MS)
            bus = MeterBus(bus_config)
            try:
                start = time.monotonic()
                with pytest.raises(MeterReadError, match="timeout, CRC error or garbage") as info:
                    bus.read_registers(1, 4, 0, 2)
                assert info.value.kind == "timeout"
                assert time.monotonic() - start <= TIMEOUT_MS / 1000 + 0.3
                assert answered == [1]  # the device did answer: the frame was rejected, not lost
            finally:
                bus.close()
        finally:
            stop.set()
            slave.join(timeout=5)


def test_missing_port_is_a_read_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-adapter"
    meters = MeterSet({"rs485": MeterBus(BusConfig(name="rs485", port=str(missing), baudrate=9600))},
                      [MeterConfig(name="house", bus="rs485", unit_id=1, model="sdm630", role="house")])
    with meters:
        with pytest.raises(MeterReadError) as info:
            meters.read("house")
    assert info.value.kind == "port" and info.value.port == str(missing)
    assert str(info.value) == (f"meter house: bus rs485: cannot open serial port {missing}: "
                               "no such device (is the adapter plugged in, or the emulator running?)")


def test_port_that_disappears_comes_back(tmp_path):
    """A USB adapter unplugged and plugged back: reads fail naming the port, then recover
    without restarting anything (the bus reopens the port by itself)."""
    device_end = tmp_path / "usb-bus"
    bus = MeterBus(BusConfig(name="rs485", port=str(device_end), baudrate=115200, timeout_ms=TIMEOUT_MS))
    meters = MeterSet({"rs485": bus}, [MeterConfig(name="house", bus="rs485", unit_id=1, model="sdm630", role="house")],
                      backoff_step_s=0)

    def plugged() -> tuple[VirtualSerialLine, MeterEmulatorThread]:
        line = VirtualSerialLine(device_end).start()
        emulator = MeterEmulator(line.emulator_end, 115200, {1: EmulatedMeter("sdm630", LiveValues(HOUSE_VALUES))})
        return line, MeterEmulatorThread(emulator).start()

    with meters:
        line, thread = plugged()
        try:
            assert _quantities(meters.read("house")) == _expected(HOUSE_VALUES)
        finally:
            thread.stop()
            line.stop()
        with pytest.raises(MeterReadError, match=f"lost the serial port .*|cannot open serial port {device_end}") as info:
            meters.read("house")
        assert info.value.kind == "port" and str(device_end) in str(info.value)
        with pytest.raises(MeterReadError, match=f"cannot open serial port {device_end}: no such device"):
            meters.read("house")
        line, thread = plugged()
        try:
            assert _quantities(meters.read("house")) == _expected(HOUSE_VALUES)
        finally:
            thread.stop()
            line.stop()


def test_emulator_on_a_missing_port_says_which(tmp_path):
    emulator = MeterEmulator(tmp_path / "absent", 9600, {1: EmulatedMeter("sdm120", LiveValues(INTERCHANGE_VALUES))})
    with pytest.raises(MeterEmulatorError, match=f"cannot serve on serial port {tmp_path / 'absent'}"):
        MeterEmulatorThread(emulator).start()
    assert not any(t.name.startswith("meter-emulator") for t in threading.enumerate())


def test_unknown_meter_name_is_a_usage_error(bench):
    with bench.meter_set() as meters:
        with pytest.raises(ValueError, match="no meter named 'pv'; expected one of house, interchange"):
            meters.read("pv")


# --- the bench house ---------------------------------------------------------------------------

def test_bench_house_from_a_board_config(tmp_path):
    """run_meter_emulator as the bench runs it: in an event loop it shares with the DGR
    emulator, creating the virtual line itself, fed by the house model; the interchange meter
    shows exactly the energy the router reported, to the Wh."""
    board = _board_config(tmp_path, str(tmp_path / "meter-bus"))
    config = load_config(board)
    model = house_model_for(config, time.monotonic())
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()
    emulators: list[MeterEmulator] = []

    def on_ready(started: list[MeterEmulator]) -> None:
        emulators.extend(started)
        ready.set()

    runner = threading.Thread(target=loop.run_until_complete, name="meter-emulator bench", args=(
        run_meter_emulator(board, model=model, create_lines=True, stop=stop, on_ready=on_ready),))
    runner.start()
    try:
        assert ready.wait(5), "the bench's meter emulator did not start"
        assert [e.port for e in emulators] == [str(tmp_path / "meter-bus.emu")]

        def router_moved(direction: str, energy_wh: float) -> None:  # what the DGR emulator does, in the loop
            asyncio.run_coroutine_threadsafe(_call(model.add_interchange, direction, energy_wh), loop).result(5)

        with MeterSet.from_config(config) as meters:
            house = meters.read("house")
            assert house.power_w < 0 and house.import_energy_wh == 0  # 09:00 with 3 kW of PV: a surplus
            router_moved("export", 123.4)
            router_moved("export", 100.2)
            router_moved("import", 0.6)
            interchange = meters.read("interchange")
        assert (interchange.export_energy_wh, interchange.import_energy_wh) == (224, 1)
    finally:
        loop.call_soon_threadsafe(stop.set)
        runner.join(timeout=5)
        loop.close()
    assert not runner.is_alive()
    assert not (tmp_path / "meter-bus").exists()  # the line it created is gone


async def _call(function, *args):
    return function(*args)


# --- the `dgc` command ------------------------------------------------------------------------

def _dgc() -> str:
    path = Path(sys.executable).with_name("dgc")
    return str(path) if path.exists() else shutil.which("dgc") or pytest.skip("dgc console script not installed")


@pytest.mark.rig_features("emulator-control")
def test_dgc_meter_read_json(bench, tmp_path):
    board = _board_config(tmp_path, str(bench.line.device_end), bench.baudrate)
    result = subprocess.run([_dgc(), "meter", "read", str(board), "--json"], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "DGC_CONFIG": ""})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["meter"], r["unit_id"]) for r in lines] == [("house", 1), ("interchange", 2)]
    assert {k: lines[0][k] for k in HOUSE_VALUES} == _expected(HOUSE_VALUES)
    assert {k: lines[1][k] for k in INTERCHANGE_VALUES} == _expected(INTERCHANGE_VALUES)
    assert bench.emulator.requests[1] == 2 and bench.emulator.requests[2] == 2


def test_dgc_meter_read_reports_a_missing_port(tmp_path):
    missing = tmp_path / "unplugged"
    board = _board_config(tmp_path, str(missing))
    result = subprocess.run([_dgc(), "meter", "read", str(board), "--meter", "house"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1
    assert f"house: unavailable: meter house: bus rs485: cannot open serial port {missing}" in result.stderr
    assert "Traceback" not in result.stderr


# --- timing (reported, loosely bounded) -----------------------------------------------------------

@pytest.mark.parametrize("baudrate", [115200, 9600])
def test_time_per_sdm630_read(tmp_path, baudrate, record_property):
    """Measured, not modelled: a pty has no baud timing of its own, but pymodbus paces RTU
    frames by the configured baud rate. The bus's request gap is set to 0 to time the protocol."""
    with Bench(tmp_path, baudrate) as b:
        with b.meter_set(request_gap_ms=0) as meters:
            meters.read("house")  # open the port
            samples = []
            for _ in range(30):
                start = time.perf_counter()
                meters.read("house")
                samples.append(time.perf_counter() - start)
    median_ms = statistics.median(samples) * 1000
    record_property(f"sdm630_read_ms_at_{baudrate}", round(median_ms, 2))
    logging.getLogger(__name__).warning("SDM630 read (2 requests) at %d baud: median %.1f ms, max %.1f ms",
                                        baudrate, median_ms, max(samples) * 1000)
    assert median_ms < 100
