"""Meter faults on a real line: the emulator's fault injection against the real driver, the
plausibility rules and the daemon's measuring job.

Everything speaks Modbus RTU over a socat pty pair to the pymodbus server of the meter
emulator; faults are injected in the emulator (host_tools/emulators/meter_emulator.py), so the
driver sees exactly the bytes (or the silence) a misbehaving meter would put on the line.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from firmware.config import BusConfig, MeterConfig, parse_config
from firmware.drivers.meter import MeterBus, MeterReadError, MeterSet
from firmware.journal import Journal
from firmware.plausibility import (ACCEPTED, PENDING, REBASELINED, REJECTED, Limits, MeterState, Sample, check_reading,
                                   max_advance_wh)
from firmware.scheduler.controller import Controller
from firmware.scheduler.events import EventLog
from host_tools.emulators.meter_emulator import EmulatedMeter, MeterEmulator, MeterEmulatorError, MeterEmulatorThread
from host_tools.emulators.virtual_serial import VirtualSerialLine

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_MS = 200
IMPORT_RATE_WH_PER_S = 2.0  # 7.2 kW: a busy house, far below any bound used here


class LiveCounters:
    """A meter whose import counter grows with (monotonic) time, read by the emulator's thread."""

    def __init__(self, import_wh: float = 10_000.0, export_wh: float = 2_500.0):
        self._t0 = time.monotonic()
        self._import, self._export = import_wh, export_wh

    def __call__(self) -> dict[str, float]:
        elapsed = time.monotonic() - self._t0
        return {"import_energy_wh": self._import + IMPORT_RATE_WH_PER_S * elapsed, "export_energy_wh": self._export,
                "power_w": IMPORT_RATE_WH_PER_S * 3600, "voltage_mv": 230_000.0, "frequency_mhz": 50_000.0}


def board_config_text(tmp_path: Path, port: str | Path) -> str:
    """A whole board config on the meter bus at ``port`` (state in tmp_path; the router port is
    never opened)."""
    text = (REPO / "board_configs" / "sim.toml").read_text()
    text = re.sub(r'(?m)^state_dir = ".*"$', f'state_dir = "{tmp_path / "state"}"', text)
    text = re.sub(r'(?m)^key_file = ".*"$', f'key_file = "{tmp_path / "state" / "device.key"}"', text)
    text = re.sub(r'(?m)(^\[\[bus\]\]\n(?:.*\n)*?)port = ".*"$', rf'\g<1>port = "{port}"', text, count=1)
    text = re.sub(r'(?m)(^\[\[bus\]\]\n(?:.*\n)*?)timeout_ms = \d+$', rf'\g<1>timeout_ms = {TIMEOUT_MS}', text, count=1)
    text = re.sub(r'(?m)(^\[dgr\]\n(?:.*\n)*?)port = ".*"$', rf'\g<1>port = "{tmp_path / "dgr-not-opened"}"',
                  text, count=1)
    return text


class FaultBench:
    """The rig's meter bus (the hil_rig fixture) as these tests use it: unit 1 an SDM630 (house),
    unit 2 an SDM120 (interchange), counters growing with time, and the CPython emulator's
    line-level fault injection (features emulator-control, modbus-fault-injection)."""

    def __init__(self, hil_rig, tmp_path: Path):
        self.tmp_path = tmp_path
        self.bus = hil_rig.meter_bus()
        for unit_id, model in ((1, "sdm630"), (2, "sdm120")):
            if self.bus.find(unit_id=unit_id, model=model) is None:
                pytest.skip(f"{hil_rig.config.describe()}: these tests need unit {unit_id} = {model} on [meter_bus]")
        self.house, self.interchange = LiveCounters(), LiveCounters(import_wh=300.0, export_wh=1_500.0)
        self.bus.control.follow(1, self.house)
        self.bus.control.follow(2, self.interchange)
        self.emulator = self.bus.control.emulator  # the MeterEmulator: inject, requests, answers, faults_applied
        self.baudrate = self.bus.baudrate
        self.port = self.bus.device_end

    def bus_config(self, **overrides) -> BusConfig:
        values = dict(timeout_ms=TIMEOUT_MS, request_gap_ms=2)
        values.update(overrides)
        return self.bus.bus_config(**values)

    def meter_set(self, meters: tuple[MeterConfig, ...] | None = None, *, bus: BusConfig | None = None,
                  **options) -> MeterSet:
        meters = meters or (HOUSE, INTERCHANGE)
        return MeterSet({"rs485": MeterBus(bus or self.bus_config())}, meters, **options)

    def board_config_text(self, **meter_extra: str) -> str:
        return board_config_text(self.tmp_path, self.port)


HOUSE = MeterConfig(name="house", bus="rs485", unit_id=1, model="sdm630", role="house")
INTERCHANGE = MeterConfig(name="interchange", bus="rs485", unit_id=2, model="sdm120", role="interchange")
GHOST = MeterConfig(name="ghost", bus="rs485", unit_id=9, model="sdm120", role="pv")


NEEDS_FAULTS = pytest.mark.rig_features("emulator-control", "modbus-fault-injection")


@pytest.fixture
def rig(hil_rig, tmp_path):
    """The tests' bench on the rig (its teardown checks that no emulator thread, socat process
    or link is left behind)."""
    return FaultBench(hil_rig, tmp_path)


def _sample(reading) -> Sample:
    return Sample(reading.taken_at_ms, reading.import_energy_wh, reading.export_energy_wh, reading.power_w)


def _baseline(meters: MeterSet, name: str, limits: Limits) -> MeterState:
    """A new meter's first baseline, as the rules require it: ``confirm_readings`` agreeing reads
    off the wire, all but the last PENDING (nothing stored), the last ACCEPTED."""
    state = MeterState()
    for i in range(limits.confirm_readings):
        verdict = check_reading(state, _sample(meters.read(name)), limits)
        expected = ACCEPTED if i == limits.confirm_readings - 1 else PENDING
        assert verdict.outcome == expected and (verdict.stored is None) == (expected == PENDING), verdict
        state = verdict.state
    return state


def _timed_read(meters: MeterSet, name: str):
    start = time.monotonic()
    try:
        return meters.read(name), time.monotonic() - start
    except MeterReadError as exc:
        return exc, time.monotonic() - start


# --- each fault kind -> the driver's MeterReadError ------------------------------------------------

@NEEDS_FAULTS
def test_no_reply_is_a_timeout_with_nothing_received(rig):
    rig.emulator.inject(1, "no_reply", count=1)
    with rig.meter_set() as meters:
        error, elapsed = _timed_read(meters, "house")
        assert isinstance(error, MeterReadError) and error.kind == "timeout" and error.bytes_received == 0
        assert "nothing received" in str(error) and f"within {TIMEOUT_MS} ms" in str(error)
        assert TIMEOUT_MS / 1000 * 0.9 <= elapsed <= TIMEOUT_MS / 1000 + 0.3
        assert rig.emulator.requests[1] == 1 and rig.emulator.answers[1] == 0
        assert meters.read("house").import_energy_wh >= 10_000  # the fault was used up
    assert rig.emulator.faults_applied[(1, "no_reply")] == 1


@NEEDS_FAULTS
def test_bad_crc_is_never_accepted(rig):
    """The meter answers, the frame is whole but its CRC is wrong: the driver rejects it and says
    that bytes came (noise), not silence."""
    rig.emulator.inject(2, "bad_crc", count=2)
    with rig.meter_set(backoff_step_s=0.0) as meters:
        for _ in range(2):
            error, elapsed = _timed_read(meters, "interchange")
            assert isinstance(error, MeterReadError) and error.kind == "timeout", error
            assert error.bytes_received == 5 + 2 * 14  # the whole 14-register answer arrived
            assert "timeout, CRC error or garbage on the line: 33 byte(s) received, no valid frame" in str(error)
            assert elapsed <= TIMEOUT_MS / 1000 + 0.3
        assert rig.emulator.answers[2] == 2  # answered twice, accepted never
        assert meters.read("interchange").export_energy_wh == 1_500
    assert rig.emulator.faults_applied[(2, "bad_crc")] == 2


@pytest.mark.parametrize("code, name", [(1, "illegal function"), (2, "illegal data address"),
                                        (3, "illegal data value"), (4, "device failure")])
@NEEDS_FAULTS
def test_exception_codes_reach_the_driver(rig, code, name):
    rig.emulator.inject(1, "exception", code=code)
    with rig.meter_set() as meters:
        error, elapsed = _timed_read(meters, "house")
        assert isinstance(error, MeterReadError) and error.kind == "exception" and error.exception_code == code
        assert f"Modbus exception {code} ({name}) reading 2 register(s) at 0x0000 (function 4)" in str(error)
        assert elapsed < TIMEOUT_MS / 1000  # an exception is an answer: no timeout spent
        assert meters.read("house").voltage_mv == 230_000


@NEEDS_FAULTS
def test_slow_reply_within_the_timeout_is_read_late_but_read(rig):
    rig.emulator.inject(2, "slow_reply", delay_ms=120)
    with rig.meter_set() as meters:
        reading, elapsed = _timed_read(meters, "interchange")
    assert not isinstance(reading, MeterReadError), reading
    assert reading.export_energy_wh == 1_500 and elapsed >= 0.120


@NEEDS_FAULTS
def test_slow_reply_beyond_the_timeout_is_a_timeout_and_its_late_answer_is_discarded(rig):
    rig.emulator.inject(2, "slow_reply", delay_ms=TIMEOUT_MS + 150)
    with rig.meter_set() as meters:
        error, elapsed = _timed_read(meters, "interchange")
        assert isinstance(error, MeterReadError) and error.kind == "timeout"
        assert elapsed <= TIMEOUT_MS / 1000 + 0.3
        time.sleep(0.3)  # the late answer lands in the port's input buffer now
        reading = meters.read("interchange")  # pymodbus flushes the stale bytes before sending
    assert reading.export_energy_wh == 1_500 and reading.voltage_mv == 230_000
    assert rig.emulator.answers[2] == 3  # the late one and the two of the good read


@NEEDS_FAULTS
def test_counter_spike_is_read_as_sent_and_rejected_by_plausibility(rig):
    limits = Limits(max_power_w=100_000)
    with rig.meter_set() as meters:
        state = _baseline(meters, "house", limits)
        rig.emulator.inject(1, "counter_spike", count=1, import_wh=5_000_000)
        spiked = meters.read("house")
        verdict = check_reading(state, _sample(spiked), limits)
        assert spiked.import_energy_wh > 5_000_000  # the driver reports what the meter said ...
        assert verdict.outcome == REJECTED and "more than" in verdict.reason  # ... and it is not stored
        after = check_reading(verdict.state, _sample(meters.read("house")), limits)
    assert after.outcome == ACCEPTED and after.stored.import_energy_wh < 11_000
    assert rig.emulator.faults_applied[(1, "counter_spike")] == 1  # counted once: the voltage block has no counter


@NEEDS_FAULTS
def test_counter_reset_restarts_from_zero_and_is_rebaselined(rig):
    limits = Limits(max_power_w=100_000)
    with rig.meter_set() as meters:
        state = _baseline(meters, "house", limits)
        last_good = state.last
        rig.emulator.inject(1, "counter_reset")
        verdicts = []
        raw = []
        for _ in range(3):
            time.sleep(0.05)
            reading = meters.read("house")
            raw.append(reading.import_energy_wh)
            verdict = check_reading(state, _sample(reading), limits)
            verdicts.append(verdict)
            state = verdict.state
    assert raw[0] < 10 and raw == sorted(raw)  # restarted from 0 and counting on
    assert [v.outcome for v in verdicts] == [REJECTED, REJECTED, REBASELINED]
    assert "restarted from zero" in verdicts[-1].reason
    assert verdicts[-1].stored.import_energy_wh == last_good.import_energy_wh + raw[-1]
    assert rig.emulator.faults_applied[(1, "counter_reset")] == 1


# --- a mix of everything ----------------------------------------------------------------------------

@NEEDS_FAULTS
def test_fail_ratio_over_200_reads_no_exception_escapes_and_every_stored_value_is_plausible(rig):
    """20 % of requests fail in assorted ways (seeded): no exception but MeterReadError comes out
    of the driver, CRC-damaged answers are never decoded, spikes are read but never stored, and
    the stored series is monotonic and physically possible."""
    limits = Limits(max_power_w=36_000)
    rig.emulator.inject(None, "fail_ratio", ratio=0.2, seed=7, spike_wh=1_000_000)
    kinds: dict[str, int] = {}
    stored: dict[str, list[Sample]] = {"house": [], "interchange": []}
    states = {"house": MeterState(), "interchange": MeterState()}
    bus = rig.bus_config(timeout_ms=100)
    with rig.meter_set(bus=bus, backoff_step_s=0.0) as meters:  # every read goes on the wire
        for i in range(200):
            name = ("house", "interchange")[i % 2]
            try:
                reading = meters.read(name)
            except MeterReadError as exc:
                kinds[exc.kind] = kinds.get(exc.kind, 0) + 1
                continue
            verdict = check_reading(states[name], _sample(reading), limits)
            states[name] = verdict.state
            kinds[verdict.outcome] = kinds.get(verdict.outcome, 0) + 1
            if verdict.stored is not None:
                stored[name].append(verdict.stored)
    applied = {kind: n for (unit, kind), n in rig.emulator.faults_applied.items()}
    assert set(applied) == {"no_reply", "bad_crc", "exception", "counter_spike"}, applied
    assert kinds.get("timeout", 0) >= 10 and kinds.get("exception", 0) >= 5 and kinds.get(REJECTED, 0) >= 3, kinds
    assert kinds[ACCEPTED] >= 100
    assert kinds.get(PENDING, 0) >= 2 * (limits.confirm_readings - 1)  # both new meters confirmed a first baseline
    for name, series in stored.items():
        for before, after in zip(series, series[1:]):
            d_import = after.import_energy_wh - before.import_energy_wh
            d_export = after.export_energy_wh - before.export_energy_wh
            assert d_import >= 0 and d_export >= 0, (name, before, after)
            assert d_import + d_export <= max_advance_wh(limits, after.taken_at_ms - before.taken_at_ms)
        assert all(s.import_energy_wh < 20_000 for s in series)  # no 1 000 000 Wh spike got through


# --- one owner per bus, back-off, order --------------------------------------------------------------

@NEEDS_FAULTS
def test_a_dead_meter_does_not_delay_the_live_ones_after_its_first_failures(rig):
    """The dead meter is configured first. Cycle 1 pays its timeout before the live reads; from
    cycle 2 on the live meters are read first, and from cycle 3 on it is backed off, so a cycle
    takes only the live reads' time."""
    with rig.meter_set((GHOST, HOUSE, INTERCHANGE)) as meters:
        cycles = []
        for _ in range(8):
            start = time.monotonic()
            order, live_done = [], None
            for name in meters.read_order():
                result, _ = _timed_read(meters, name)
                order.append((name, type(result).__name__))
                if name == "interchange":
                    live_done = time.monotonic() - start
            cycles.append((time.monotonic() - start, live_done, order))
        ghost_requests = rig.emulator.requests[9]
    first, second = cycles[0], cycles[1]
    assert first[2][0] == ("ghost", "MeterReadError") and first[1] >= TIMEOUT_MS / 1000 * 0.9
    assert [n for n, _ in second[2]] == ["house", "interchange", "ghost"]
    assert second[1] < TIMEOUT_MS / 1000 * 0.8  # live meters read before the dead one's timeout
    for total, live, order in cycles[2:]:
        assert total < TIMEOUT_MS / 1000 * 0.8, cycles  # no timeout in the cycle at all
        assert ("ghost", "MeterReadError") in order and ("house", "MeterReading") in order
    assert ghost_requests == 2  # tried twice, then left alone for the back-off period


@NEEDS_FAULTS
def test_back_off_grows_two_seconds_per_failure_up_to_the_cap(rig):
    """A dead meter (real timeouts on the real bus; only the back-off's clock is ours): the first
    failure is not backed off, then each failure adds 2 s, up to the cap (5 s here, 5 min by
    default)."""
    now = [1000.0]
    events = []
    with rig.meter_set((GHOST,), bus=rig.bus_config(timeout_ms=50), backoff_max_s=5.0, clock=lambda: now[0]) as meters:
        for _ in range(9):
            error, _ = _timed_read(meters, "ghost")
            if error.kind == "backoff":
                wait = float(re.search(r"next attempt in ([\d.]+) s", str(error)).group(1))
                events.append(wait)
                now[0] += wait + 0.01
            else:
                assert error.kind == "timeout"
                events.append("wire")
        assert meters.failures("ghost") == 5
    assert events == ["wire", "wire", 2.0, "wire", 4.0, "wire", 5.0, "wire", 5.0]
    assert rig.emulator.requests[9] == 5


# --- the daemon's measuring job ----------------------------------------------------------------------

class _Board:
    def __init__(self, rig: FaultBench, **meter_keys: int):
        text = rig.board_config_text()
        for key, value in meter_keys.items():
            text = text.replace('role = "house"\nmax_power_w = 2000000', f'role = "house"\nmax_power_w = 2000000\n{key} = {value}')
        self.config = parse_config(text, rig.tmp_path / "board.toml")
        self.stream = io.StringIO()
        self.journal = Journal(rig.tmp_path / "state" / "journal.sqlite3")
        self.meters = MeterSet.from_config(self.config, backoff_step_s=0.1)  # back-off as configured, but short
        # measure() and the freshness check use only the config, the journal, the meters and
        # the event log; the router, ledger and key are not touched. (A new process's first job
        # greets the router first, issue 7 o: there is no router here, so that greeting counts
        # as done.)
        self.controller = Controller(self.config, journal=self.journal, key=None, meters=self.meters, dgr=None,
                                     ledger=None, events=EventLog("test-board", self.stream))
        self.controller._greeted = True

    def events(self, name: str) -> list[str]:
        return [line for line in self.stream.getvalue().splitlines() if f" {name} " in line + " "]

    def quiet(self) -> bool:
        """No meter alarm and no availability event so far (a first baseline is not a fault)."""
        return not any(self.events(name) for name in ("alarm.meter", "alarm.meter_implausible", "alarm.meter_reset",
                                                       "meter.unavailable", "meter.available"))

    def establish_baseline(self) -> None:
        """A new board (empty journal): measure until the house meter has its first baseline,
        ``confirm_readings`` agreeing readings. Until the last of them nothing is journalled,
        nothing is alarmed and the house data is not yet available (no good reading yet)."""
        c = self.controller
        for _ in range(c._meter_limits("house").confirm_readings - 1):
            c.measure()
            assert not c._fresh_house_data() and "no good reading yet" in c._house_data_problem()
            assert c._meter_state("house").failures == 0
        assert self.quiet() and self.journal.last_reading("house") is None
        c.measure()
        assert c._fresh_house_data() and self.journal.last_reading("house") is not None

    def close(self) -> None:
        self.meters.close()
        self.journal.close()


@NEEDS_FAULTS
def test_daemon_measure_stores_only_plausible_readings_and_goes_unavailable(rig):
    board = _Board(rig)
    try:
        c = board.controller
        assert not c._fresh_house_data() and "no good reading yet" in c._house_data_problem()
        board.establish_baseline()
        assert c._fresh_house_data()
        rig.emulator.inject(1, "counter_spike", import_wh=5_000_000)
        c.measure()
        assert len(board.events("alarm.meter_implausible")) == 1 and "meter=house" in board.events("alarm.meter_implausible")[0]
        assert c._fresh_house_data()  # one rejected reading: the last good one is still fresh
        rig.emulator.inject(1, "no_reply", count=2)
        c.measure()
        c.measure()  # three failures in a row with the spike: unavailable, announced once
        assert len(board.events("meter.unavailable")) == 1
        assert not c._fresh_house_data()
        assert c._house_data_problem() == "house meter house unavailable: 3 failed or implausible reads in a row"
        c.bid()  # the bid job places nothing from unavailable data
        skipped = board.events("bid.skipped")
        assert len(skipped) == 1 and "house meter" in skipped[0] and not board.events("order.signed")
        time.sleep(0.15)  # past the driver's back-off (0.1 s per failure after the first)
        c.measure()
        assert c._fresh_house_data() and len(board.events("meter.available")) == 1
        c.bid()  # fresh again: the job gets past the meter check (and stops for lack of history)
        assert "no complete slot of meter history yet" in board.events("bid.skipped")[-1]
        stored = board.journal.readings("house", 0)
        assert len(stored) == 2 and all(imp < 20_000 for _, imp, _ in stored)
        assert stored[1][1] >= stored[0][1]
    finally:
        board.close()


@NEEDS_FAULTS
def test_daemon_rebaselines_a_reset_meter_with_an_alarm_and_keeps_the_journal_continuous(rig):
    board = _Board(rig)
    try:
        c = board.controller
        board.establish_baseline()
        before = board.journal.last_reading("house")
        rig.emulator.inject(1, "counter_reset")
        for _ in range(3):
            time.sleep(0.05)
            c.measure()
        resets = board.events("alarm.meter_reset")
        assert len(resets) == 1 and "restarted from zero" in resets[0]
        assert len(board.events("alarm.meter_implausible")) == 2
        series = [imp for _, imp, _ in board.journal.readings("house", 0)]
        assert len(series) == 2 and series[1] >= before[1]  # continuous, nothing backwards
        c.measure()
        assert len(board.journal.readings("house", 0)) == 3 and c._fresh_house_data()
        # another reader (delivery metering) gets the same re-baselined units as the journal
        direct = c._read_plausible("house")
        assert direct.import_energy_wh >= board.journal.last_reading("house")[1] >= before[1]
    finally:
        board.close()


@NEEDS_FAULTS
def test_daemon_freshness_honours_max_failures_from_the_config(rig):
    board = _Board(rig, max_failures=1)
    try:
        c = board.controller
        board.establish_baseline()
        rig.emulator.inject(1, "exception", code=4)
        c.measure()
        assert c._house_data_problem() == "house meter house unavailable: 1 failed or implausible reads in a row"
    finally:
        board.close()


# --- maps from the board config, over the wire ---------------------------------------------------------

CUSTOM_HOUSE = """\
[[meter]]
name = "house"
bus = "rs485"
unit_id = 1
model = "custom"
role = "house"
max_power_w = 2000000

[[meter.register]]
quantity = "import_energy_wh"
address = 0x0100
function_code = 3
type = "int32"
word_order = "little"
unit = "Wh"

[[meter.register]]
quantity = "export_energy_wh"
address = 0x0102
function_code = 3
type = "uint32"
unit = "kWh"
scale_divisor = 100

[[meter.register]]
quantity = "power_w"
address = 0x0110
function_code = 3
type = "int32"
unit = "W"
scale_divisor = 10

[[meter.register]]
quantity = "voltage_mv"
address = 0x0000
function_code = 4
type = "uint16"
unit = "V"
scale_divisor = 10
"""


def test_custom_and_sdm72dm_maps_from_the_config_are_read_over_the_wire(tmp_path):
    """The emulator serves the maps the board config declares (a custom holding-register meter
    and an SDM72D-M); the driver plans, reads and decodes them to the exact integers."""
    line = VirtualSerialLine(tmp_path / "meter-bus")  # its own line and emulator: other meters than the rig's
    text = board_config_text(tmp_path, line.device_end)
    text = re.sub(r'(?ms)^\[\[meter\]\]\nname = "house".*?max_power_w = 2000000\n', CUSTOM_HOUSE, text, count=1)
    text = text.replace('model = "sdm120"', 'model = "sdm72dm"')
    config = parse_config(text, tmp_path / "board.toml")
    values = {"import_energy_wh": 987_654.0, "export_energy_wh": 43_210.0, "power_w": -1234.5,
              "voltage_mv": 231_400.0, "frequency_mhz": 50_010.0}
    with line:
        emulator = MeterEmulator(line.emulator_end, 115200, {
            1: EmulatedMeter("custom", lambda: values, config.meter_map("house")),
            2: EmulatedMeter("sdm72dm", lambda: values, config.meter_map("interchange"))})
        with MeterEmulatorThread(emulator), MeterSet.from_config(config) as meters:
            house, interchange = meters.read("house"), meters.read("interchange")
            assert [(b.function_code, b.address, b.count) for b in meters.blocks_of("house")] == \
                [(3, 0x0100, 18), (4, 0x0000, 1)]
        assert emulator.requests[1] == 2 and emulator.requests[2] == 2
    assert (house.import_energy_wh, house.export_energy_wh, house.power_w, house.voltage_mv, house.frequency_mhz) == \
        (987_654, 43_210, -1235, 231_400, None)
    assert (interchange.import_energy_wh, interchange.export_energy_wh, interchange.power_w, interchange.voltage_mv,
            interchange.frequency_mhz) == (987_654, 43_210, -1235, 231_400, 50_010)


# --- RS-485 mode on a pty -----------------------------------------------------------------------------

@NEEDS_FAULTS
def test_rs485_mode_on_a_pty_warns_once_and_the_bus_still_works(rig, caplog):
    bus = MeterBus(rig.bus_config(rs485=True, rs485_delay_before_tx_ms=1, rs485_delay_after_tx_ms=1))
    try:
        with caplog.at_level(logging.WARNING, logger="firmware.drivers.meter"):
            meters = MeterSet({"rs485": bus}, (HOUSE,))
            assert meters.read("house").voltage_mv == 230_000
            bus.close()  # reopened at the next read: the warning is not repeated
            assert meters.read("house").voltage_mv == 230_000
        assert bus.rs485_active is False
        warnings = [r for r in caplog.records if "RS-485 mode" in r.getMessage()]
        assert len(warnings) == 1
        assert str(rig.port) in warnings[0].getMessage() and "plain serial port" in warnings[0].getMessage()
    finally:
        bus.close()


# --- the emulator's fault API -------------------------------------------------------------------------

@NEEDS_FAULTS
def test_fault_commands_are_json_and_checked(rig):
    emulator = rig.emulator
    answer = emulator.command(json.loads('{"op": "inject", "unit_id": 2, "kind": "no_reply", "count": 3}'))
    assert answer["ok"] and answer["faults"]["2"]["queued"] == [{"kind": "no_reply", "remaining": 3}]
    json.dumps(emulator.command({"op": "inject", "unit_id": None, "kind": "fail_ratio", "ratio": 0.5}))
    assert emulator.faults()["1"]["fail_ratio"] == {"ratio": 0.5, "kinds": ["no_reply", "bad_crc", "exception", "counter_spike"]}
    for bad, message in [
        ({"kind": "melt"}, "fault kind must be one of no_reply, bad_crc, exception, slow_reply"),
        ({"kind": "exception", "code": 9}, "fault exception: code must be one of"),
        ({"kind": "slow_reply"}, "fault slow_reply: delay_ms is required"),
        ({"kind": "counter_spike"}, "fault counter_spike: expected import_wh or export_wh > 0"),
        ({"kind": "fail_ratio", "ratio": 1.5}, r"fault fail_ratio: ratio must be a number in \(0, 1\]"),
        ({"kind": "fail_ratio", "ratio": 0.1, "kinds": ["slow_reply"]}, "delay_ms is required when kinds include slow_reply"),
        ({"kind": "no_reply", "count": 0}, "fault no_reply: count must be an integer >= 1"),
        ({"kind": "no_reply", "unit_id": 7}, "unit id must be one of 1, 2 or None"),
        ({"kind": "no_reply", "delay_ms": 5}, "fault no_reply: unknown parameter 'delay_ms'; expected none"),
        ({"op": "explode"}, "op must be inject, clear or status"),
    ]:
        with pytest.raises(MeterEmulatorError, match=message):
            emulator.command(bad)
    emulator.command({"op": "clear"})
    assert all(not f["queued"] and f["fail_ratio"] is None for f in emulator.faults().values())
    with rig.meter_set() as meters:
        assert meters.read("interchange").export_energy_wh == 1_500  # cleared: no fault left


# --- dgc meter read --raw -----------------------------------------------------------------------------

def _crc16(data: bytes) -> bytes:
    """Modbus CRC-16 (poly 0xA001, init 0xFFFF), low byte first: independent of pymodbus."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")


def _hex(frame: bytes) -> str:
    return frame.hex(" ").upper()


@NEEDS_FAULTS
def test_dgc_meter_read_raw_shows_frames_in_hex_with_timings(rig):
    board = rig.tmp_path / "board.toml"
    board.write_text(rig.board_config_text())
    rig.emulator.inject(2, "bad_crc")
    dgc = Path(sys.executable).with_name("dgc")
    argv = [str(dgc)] if dgc.exists() else [shutil.which("dgc") or pytest.skip("dgc not installed")]
    result = subprocess.run(argv + ["meter", "read", str(board), "--raw"], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "DGC_CONFIG": ""})
    assert result.returncode == 1, result.stderr  # the interchange meter's answer was damaged
    lines = result.stdout.splitlines()
    voltage_request = bytes([1, 4, 0, 0, 0, 2])
    voltage_answer = bytes([1, 4, 4]) + struct.pack(">f", 230.0)
    assert re.fullmatch(r"\[\s+0\.0 ms\] house unit 1 fc 4 0x0000\+2 > " + _hex(voltage_request + _crc16(voltage_request)),
                        lines[0]), lines[0]
    match = re.fullmatch(r"\[\s*([\d.]+) ms\] house unit 1 fc 4 0x0000\+2 < " + _hex(voltage_answer + _crc16(voltage_answer))
                         + r"  \(9 bytes, reply after ([\d.]+) ms, ok\)", lines[1])
    assert match, lines[1]
    assert 0 < float(match.group(2)) <= float(match.group(1)) < 100
    energy_request = bytes([1, 4, 0, 0x34, 0, 24])
    assert lines[2].endswith("house unit 1 fc 4 0x0034+24 > " + _hex(energy_request + _crc16(energy_request)))
    assert "(53 bytes, reply after" in lines[3]
    assert lines[4].startswith("house (unit 1): import 10") and "voltage 230000 mV" in lines[4]
    # the damaged answer is shown byte for byte, marked as not accepted
    request = bytes([2, 4, 0, 0, 0, 14])
    assert lines[5].endswith("interchange unit 2 fc 4 0x0000+14 > " + _hex(request + _crc16(request)))
    assert re.search(r"interchange unit 2 fc 4 0x0000\+14 < 02 04 1C .* \(33 bytes, reply after [\d.]+ ms, timeout\)$", lines[6])
    body = bytes.fromhex(lines[6].split(" < ")[1].split("  (")[0])
    assert body[-2:] != _crc16(body[:-2])  # the CRC on the wire really was wrong
    assert "interchange: unavailable" in result.stderr and "33 byte(s) received, no valid frame" in result.stderr


@NEEDS_FAULTS
def test_dgc_meter_read_raw_json_frames(rig):
    board = rig.tmp_path / "board.toml"
    board.write_text(rig.board_config_text())
    result = subprocess.run([sys.executable, "-m", "firmware.cli", "meter", "read", str(board), "--raw", "--json",
                             "--meter", "interchange"], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    frames = [o["frame"] for o in objects if "frame" in o]
    assert [(f["unit_id"], f["address"], f["count"], f["outcome"]) for f in frames] == [(2, 0, 14, "ok"), (2, 0x46, 6, "ok")]
    assert frames[0]["request"] == (bytes([2, 4, 0, 0, 0, 14]) + _crc16(bytes([2, 4, 0, 0, 0, 14]))).hex(" ")
    assert all(f["reply_ms"] is not None and f["elapsed_ms"] >= f["reply_ms"] for f in frames)
    assert objects[-1]["meter"] == "interchange" and objects[-1]["export_energy_wh"] == 1_500
