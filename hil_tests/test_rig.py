"""The HIL rig plugin itself (hil_tests/rig.py): rig files, features and skips, the report
properties, the board config it writes, and a real-bench rig (emulators "none") run end to end
against devices the rig did not start.

The plugin's behaviour is checked the way a user meets it: ``pytest`` run in a subprocess with
``--rig``/``DGC_RIG``, its exit status, its summary and its ``--junitxml`` file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from firmware.config import load_config
from firmware.ledger.rest import RestLedger
from hil_tests.rig import DEFAULT_RIG, RIGS_DIR, Rig, RigError, load_rig
from host_tools.emulators.dgr_emulator import DgrEmulator
from host_tools.emulators.meter_emulator import EmulatedMeter, MeterEmulator, MeterEmulatorThread
from host_tools.emulators.virtual_serial import VirtualSerialLine

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def run_pytest(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """A pytest of its own, with the rig plugin (given with -p or by hil_tests/conftest.py) and
    pytest's built-in plugins only: the installed third-party ones (hypothesis, schemathesis,
    anyio, xdist) play no part in what these runs check, and importing them costs each start
    about 3 CPU-seconds (0.4 s without them)."""
    environment = {k: v for k, v in os.environ.items() if k != "DGC_RIG"}
    environment.update(PYTHONPATH=str(REPO), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=environment)


def junit_cases(path: Path) -> dict[str, dict]:
    """{test name: {"outcome": passed|skipped|failed, "message": ..., "properties": {...}}}"""
    cases = {}
    for case in ET.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("skipped", "failure", "error"):
            element = case.find(tag)
            if element is not None:
                outcome, message = tag, element.get("message", "")
        cases[case.get("name")] = {"outcome": outcome, "message": message,
                                   "properties": {p.get("name"): p.get("value") for p in case.iter("property")}}
    return cases


# --- rig files ------------------------------------------------------------------------------------


def test_the_rig_files_in_the_repository_load_and_say_what_they_are():
    default = load_rig(DEFAULT_RIG)
    assert (default.name, default.emulators, default.path) == ("default", "cpython", DEFAULT_RIG.resolve())
    assert default.features == {"emulator-control", "fault-injection", "modbus-fault-injection", "power-cycle",
                                "house-emulator"}
    assert [(m.name, m.unit_id, m.model, m.role) for m in default.meter_bus.meters] == [
        ("house", 1, "sdm630", "house"), ("interchange", 2, "sdm120", "interchange")]
    assert default.meter_bus.meters[0].values["voltage_mv"] == 230_000.0 and default.ledger_url == "start"
    micropython = load_rig(RIGS_DIR / "micropython.toml")
    assert micropython.emulators == "micropython"
    assert micropython.features == default.features - {"modbus-fault-injection", "house-emulator"}  # declared honestly
    assert micropython.meter_bus == default.meter_bus and micropython.dgr == default.dgr
    bench = load_rig(RIGS_DIR / "bench-example.toml")
    assert (bench.emulators, bench.features) == ("none", {"rs485-timing", "power-cycle"})
    assert bench.meter_bus.port.startswith("/dev/serial/by-id/") and bench.dgr.port.startswith("/dev/serial/by-id/")
    assert (bench.meter_bus.baudrate, bench.meter_bus.parity) == (9600, "N") and set(bench.power) == {"dgr", "meter_bus"}
    assert bench.place == "bench-example"


GOOD = """
    [rig]
    name = "t"
    features = []
    [emulators]
    kind = "cpython"
    [meter_bus]
    port = "bus"
    [[meter_bus.meter]]
    name = "house"
    unit_id = 1
    model = "sdm630"
    [[meter_bus.meter]]
    name = "interchange"
    unit_id = 2
    model = "sdm120"
"""


@pytest.mark.parametrize("text, message", [
    ("[rig]\nname = 't'\n[meterbus]\nport = 'x'\n", r"\[top level\] unknown key 'meterbus'"),
    ("[emulators]\nkind = 'cpython'\n", r"\[top level\] rig: missing"),
    ("[rig]\nname = ''\n", r"\[rig\] name: expected a non-empty string, found ''"),
    ("[rig]\nname = 't'\nfeatures = ['fault-injecton']\n", r"\[rig\] features: expected feature names from .*found 'fault-injecton'"),
    ("[rig]\nname = 't'\n[emulators]\nkind = 'qemu'\n", r"\[emulators\] kind: expected one of cpython, micropython, none, found 'qemu'"),
    ("[rig]\nname = 't'\nfeatures = ['modbus-fault-injection']\n[emulators]\nkind = 'micropython'\n",
     r"modbus-fault-injection cannot be provided by emulators of kind 'micropython'"),
    ("[rig]\nname = 't'\nfeatures = ['rs485-timing']\n", r"rs485-timing cannot be provided by emulators of kind 'cpython'"),
    ("[rig]\nname = 't'\n[meter_bus]\nport = 'b'\nbaud = 9600\n", r"\[meter_bus\] unknown key 'baud'"),
    ("[rig]\nname = 't'\n[meter_bus]\nport = 'b'\nbaudrate = 1234\n", r"\[meter_bus\] baudrate: expected one of 1200, .*found 1234"),
    ("[rig]\nname = 't'\n[meter_bus]\nport = 'b'\n[[meter_bus.meter]]\nname = 'm'\nunit_id = 300\nmodel = 'sdm120'\n",
     r"\[meter_bus.meter #1\] unit_id: expected a Modbus unit id from 1 to 247, found 300"),
    ("[rig]\nname = 't'\n[meter_bus]\nport = 'b'\n[[meter_bus.meter]]\nname = 'm'\nunit_id = 1\nmodel = 'sdm999'\n",
     r"\[meter_bus.meter #1\] model: expected one of .*sdm120.*found 'sdm999'"),
    ("[rig]\nname = 't'\n[meter_bus]\nport = 'b'\n[[meter_bus.meter]]\nname = 'a'\nunit_id = 1\nmodel = 'sdm120'\n"
     "[[meter_bus.meter]]\nname = 'b'\nunit_id = 1\nmodel = 'sdm120'\n", r"\[\[meter_bus.meter\]\] unit_id 1 appears twice"),
    ("[rig]\nname = 't'\n[meter_bus]\nport = 'b'\n[[meter_bus.meter]]\nname = 'a'\nunit_id = 1\nmodel = 'sdm120'\n"
     "values = { watts = 5 }\n", r"\[meter_bus.meter #1\] values: expected quantities from import_energy_wh"),
    ("[rig]\nname = 't'\n[ledger]\nurl = 'ftp://x'\n", r"\[ledger\] url: expected \"start\" .*found 'ftp://x'"),
    ("[rig]\nname = 't'\nfeatures = ['power-cycle']\n[emulators]\nkind = 'none'\n",
     r"power-cycle on a real bench needs a \[power.meter_bus\] and/or \[power.dgr\] table"),
    ("[rig]\nname = 't'\n[power.dgr]\ndriver = 'uhubctl'\nlocation = '1-1'\nports = 3\n",
     r"\[power\]: power drivers are for a real bench"),
    ("[rig]\nname = 't'\n[emulators]\nkind = 'none'\n[power]\ndgr = 'uhubctl -a cycle'\n",
     r"\[power.dgr\]: expected a table with driver = 'uhubctl' or 'command', found 'uhubctl -a cycle' \(a shell string"),
    ("[rig]\nname = 't'\n[emulators]\nkind = 'none'\n[power.dgr]\ndriver = 'relay'\n",
     r"\[power.dgr\] driver: expected one of uhubctl, command, found 'relay'"),
    ("[rig]\nname = 't'\n[emulators]\nkind = 'none'\n[power.dgr]\ndriver = 'command'\noff = 'rly 0'\non = ['rly', '1']\n",
     r"\[power.dgr\] off: expected a program and its arguments as a list of strings"),
    ("[rig]\nname = 't'\n[emulators]\nkind = 'none'\n[power.dgr]\ndriver = 'uhubctl'\nlocation = '1-1'\nports = 'x'\n",
     r"\[power.dgr\] ports: expected a port number"),
    ("[rig]\nname = 't'\n[place]\nname = 'bench 2'\n", r"\[place\] name: expected the bench's name"),
    ("[rig]\nname = 't'\n[meter_bus]\nport = 'b'\n[[meter_bus.meter]]\nname = 'house'\nunit_id = 1\nmodel = 'sdm120'\n",
     r"role: expected exactly one meter with role = 'interchange', found 0"),
    ("[rig\nname = 't'\n", r"not valid TOML"),
])
def test_a_bad_rig_file_is_refused_naming_the_file_the_table_and_the_key(tmp_path, text, message):
    path = tmp_path / "rig.toml"
    path.write_text(text)
    with pytest.raises(RigError, match=message) as info:
        load_rig(path)
    assert str(info.value).startswith(str(path))
    assert load_rig(write(tmp_path / "good.toml", GOOD)).meter_bus.meters[0].values["frequency_mhz"] == 50_000.0


def test_the_board_config_for_a_bench_rig_carries_its_ports_format_meters_and_ledger(tmp_path):
    rig_file = write(tmp_path / "bench.toml", """
        [rig]
        name = "paper-bench"
        features = ["power-cycle"]
        [emulators]
        kind = "none"
        [meter_bus]
        port = "ttyUSB-rs485"        # relative on a bench: relative to the rig file
        baudrate = 9600
        parity = "E"
        stopbits = 1
        timeout_ms = 700
        request_gap_ms = 40
        rs485 = true                 # a Pi UART whose transceiver's DE pin is on RTS
        rs485_delay_after_tx_ms = 1
        [[meter_bus.meter]]
        name = "pv"
        unit_id = 5
        model = "sdm120"
        [[meter_bus.meter]]
        name = "grid"
        unit_id = 7
        model = "sdm630"
        role = "house"
        [[meter_bus.meter]]
        name = "interchange"
        unit_id = 9
        model = "sdm120"
        [dgr]
        port = "/dev/ttyAMA0"
        baudrate = 57600
        timeout_ms = 900
        retries = 1
        heartbeat_seconds = 3
        [ledger]
        url = "http://192.0.2.10:8750"
        ledger_id = "field-trial"
        [power]
        settle_s = 0
        [power.dgr]
        driver = "command"
        off = ["touch", "{cycled}.off"]
        on = ["touch", "{cycled}.on"]
        off_s = 0
    """.replace("{cycled}", str(tmp_path / "cycled")))
    rig = Rig(load_rig(rig_file), tmp_path / "work")
    config = load_config(rig.board_config())
    (bus,) = config.buses
    assert (bus.port, bus.baudrate, bus.parity, bus.timeout_ms, bus.request_gap_ms) == (
        str(tmp_path / "ttyUSB-rs485"), 9600, "E", 700, 40)
    assert (bus.rs485, bus.rs485_delay_after_tx_ms, bus.rs485_delay_before_tx_ms) == (True, 1, 0)
    assert [(m.name, m.bus, m.unit_id, m.model, m.role) for m in config.meters] == [
        ("pv", bus.name, 5, "sdm120", "pv"), ("grid", bus.name, 7, "sdm630", "house"),
        ("interchange", bus.name, 9, "sdm120", "interchange")]
    assert (config.dgr.port, config.dgr.baudrate, config.dgr.timeout_ms, config.dgr.retries,
            config.dgr.heartbeat_seconds) == ("/dev/ttyAMA0", 57600, 900, 1, 3)
    assert (config.ledger.url, config.ledger.ledger_id) == ("http://192.0.2.10:8750", "field-trial")
    # nothing is started on a bench: the resources are only where the devices are
    bus_resource = rig.meter_bus()
    assert bus_resource.control is None and bus_resource.port == str(tmp_path / "ttyUSB-rs485")
    assert rig.dgr().control is None and rig.ledger_url() == "http://192.0.2.10:8750"
    with pytest.raises(RigError, match="needs the feature emulator-control"):
        Rig(load_rig(rig_file), tmp_path / "work2").dgr(heartbeat_timeout_s=0.4)
    rig.power_cycle("dgr")  # the bench's [power.dgr] driver: off, then on
    assert (tmp_path / "cycled.off").stat().st_mtime_ns <= (tmp_path / "cycled.on").stat().st_mtime_ns
    with pytest.raises(RigError, match=r"no \[power.meter_bus\] driver"):
        rig.power_cycle("meter_bus")
    assert rig.close() == []
    assert rig.console_log().startswith("not captured on this rig")
    assert rig.frame_trace().startswith("not captured on this rig")


# --- the plugin, as pytest users meet it ---------------------------------------------------------------

PLUGIN_TESTS = """
    import pytest

    @pytest.mark.rig_features("fault-injection")
    def test_needs_faults():
        pass

    @pytest.mark.rig_features("rs485-timing", "fault-injection")
    def test_needs_the_wire():
        pass

    def test_uses_the_rig(hil_rig):
        with hil_rig.meter_set() as meters:
            assert not any(isinstance(r, Exception) for r in meters.read_all().values())

    def test_plain():
        pass
"""


def test_features_skip_with_a_reason_and_the_report_carries_the_rig(tmp_path):
    tests = write(tmp_path / "test_plugin.py", PLUGIN_TESTS)
    report = tmp_path / "report.xml"
    result = run_pytest("-p", "hil_tests.rig.plugin", "--rootdir", str(tmp_path), str(tests), "-rs", "--junitxml",
                        str(report), "--rig", str(DEFAULT_RIG), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"rig 'default' ({DEFAULT_RIG.resolve()}): emulators cpython" in result.stdout  # the report header
    cases = junit_cases(report)
    assert {name: c["outcome"] for name, c in cases.items()} == {
        "test_needs_faults": "passed", "test_needs_the_wire": "skipped", "test_uses_the_rig": "passed",
        "test_plain": "passed"}
    assert cases["test_needs_the_wire"]["message"].startswith(
        f"rig 'default' ({DEFAULT_RIG.resolve()}) lacks feature(s) rs485-timing (it has: emulator-control,")
    assert "lacks feature(s) rs485-timing" in result.stdout  # -rs shows the reason too
    used = cases["test_uses_the_rig"]["properties"]
    assert (used["rig_file"], used["rig_name"]) == (str(DEFAULT_RIG.resolve()), "default")
    assert "meter emulator on" in used["console_log"] and "units 1=sdm630, 2=sdm120" in used["console_log"]
    assert "dgc>dev    8 B: 01 04 00 00" in used["frame_trace"] and "dev>dgc" in used["frame_trace"]
    assert len(used["frame_trace"]) <= 8192 + 100 and len(used["console_log"]) <= 8192 + 100
    assert cases["test_needs_the_wire"]["properties"]["rig_name"] == "default"  # a skipped test says where
    assert cases["test_plain"]["properties"] == {}  # no rig involved, no rig properties
    suite = ET.parse(report).getroot().find("testsuite").find("properties")
    assert {p.get("name") for p in suite} == {"rig_file", "rig_name", "rig_config"}

    # -m rig_portable selects the tests that take their devices from the rig
    result = run_pytest("-p", "hil_tests.rig.plugin", "--rootdir", str(tmp_path), str(tests), "-m", "rig_portable", "-q",
                        cwd=tmp_path)
    assert result.returncode == 0 and "1 passed, 3 deselected" in result.stdout, result.stdout


def test_the_rig_comes_from_dgc_rig_unless_rig_is_given_and_mistakes_are_usage_errors(tmp_path):
    tests = write(tmp_path / "test_plugin.py", PLUGIN_TESTS)
    bare = write(tmp_path / "bare.toml", '[rig]\nname = "bare"\nfeatures = ["fault-injection"]\n')
    result = run_pytest("-p", "hil_tests.rig.plugin", "--rootdir", str(tmp_path), str(tests), "-q", "-rs",
                        "-k", "needs", cwd=tmp_path, env={"DGC_RIG": str(bare)})
    assert result.returncode == 0 and "1 passed, 1 skipped" in result.stdout, result.stdout
    assert "rig 'bare'" in result.stdout and "lacks feature(s) rs485-timing" in result.stdout
    result = run_pytest("-p", "hil_tests.rig.plugin", "--rootdir", str(tmp_path), str(tests), "-q", "-rs", "-k", "needs",
                        "--rig", str(RIGS_DIR / "bench-example.toml"), cwd=tmp_path, env={"DGC_RIG": str(bare)})
    assert result.returncode == 0 and "2 skipped" in result.stdout, result.stdout  # --rig wins over DGC_RIG
    assert "rig 'bench-example'" in result.stdout and "lacks feature(s) fault-injection" in result.stdout

    result = run_pytest("-p", "hil_tests.rig.plugin", "--rootdir", str(tmp_path), str(tests), "-q",
                        "--rig", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert result.returncode == 4 and f"cannot read rig file {tmp_path / 'missing.toml'}" in result.stderr
    typo = write(tmp_path / "test_typo.py", """
        import pytest

        @pytest.mark.rig_features("fault-injecton")
        def test_typo():
            pass
    """)
    result = run_pytest("-p", "hil_tests.rig.plugin", "--rootdir", str(tmp_path), str(typo), "-q", cwd=tmp_path)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "test_typo.py::test_typo: rig_features('fault-injecton'): expected feature names from" in result.stderr


# --- a real bench: devices the rig did not start ---------------------------------------------------------


class PaperBench:
    """Devices that exist before the test run, as on a real bench: the meters and the router
    are emulators this test starts on virtual lines, and the rig file (emulators "none") only
    names the device ends. The rig must start nothing and control nothing."""

    def __init__(self, tmp_path: Path):
        self.bus = VirtualSerialLine(tmp_path / "ttyUSB0").start()
        self.link = VirtualSerialLine(tmp_path / "ttyAMA0").start()
        values = dict(import_energy_wh=1_000.0, export_energy_wh=20.0, power_w=300.0, voltage_mv=229_500.0,
                      frequency_mhz=49_990.0)
        self.meters = MeterEmulatorThread(MeterEmulator(self.bus.emulator_end, 9600, {
            1: EmulatedMeter("sdm630", lambda: values), 2: EmulatedMeter("sdm120", lambda: values)})).start()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="paper-bench-dgr", daemon=True)
        self.thread.start()
        self.router = DgrEmulator(str(self.link.emulator_end))
        asyncio.run_coroutine_threadsafe(self.router.start(), self.loop).result(5)

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.router.stop(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.meters.stop()
        finally:
            self.bus.stop()
            self.link.stop()


def test_a_bench_rig_runs_the_portable_driver_tests_on_devices_it_did_not_start(tmp_path):
    bench = PaperBench(tmp_path)
    try:
        rig_file = write(tmp_path / "paper-bench.toml", f"""
            [rig]
            name = "paper-bench"
            features = []
            [emulators]
            kind = "none"
            [meter_bus]
            port = "{bench.bus.device_end}"
            baudrate = 9600
            timeout_ms = 500
            [[meter_bus.meter]]
            name = "house"
            unit_id = 1
            model = "sdm630"
            [[meter_bus.meter]]
            name = "interchange"
            unit_id = 2
            model = "sdm120"
            [dgr]
            port = "{bench.link.device_end}"
        """)
        report = tmp_path / "report.xml"
        result = run_pytest("hil_tests/test_meter_driver.py", "hil_tests/test_dgr_driver.py", "-m", "rig_portable",
                            "-q", "--rig", str(rig_file), "--junitxml", str(report))
        router = bench.router.snapshot()
    finally:
        bench.close()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    cases = junit_cases(report)
    passed = {name for name, c in cases.items() if c["outcome"] == "passed"}
    assert {"test_rig_meters_read_through_the_board_config", "test_rig_dgc_meter_read_json",
            "test_request_gap_is_kept_between_requests", "test_unknown_meter_name_is_a_usage_error",
            "test_status_round_trip_time_over_the_pty", "test_rig_router_handshake_status_and_a_short_transfer"} <= passed
    skipped = {name: c["message"] for name, c in cases.items() if c["outcome"] == "skipped"}
    assert "test_two_meters_on_one_bus_read_exact_values" in skipped and "test_a_corrupted_answer_is_retried_at_once" in skipped
    assert all("rig 'paper-bench'" in reason and "lacks feature(s)" in reason for reason in skipped.values())
    assert passed | set(skipped) == set(cases)
    meters = cases["test_rig_meters_read_through_the_board_config"]["properties"]
    assert meters["console_log"].startswith("not captured on this rig: emulators = none")
    assert meters["frame_trace"].startswith("driver's view") and "> 01 04 00 00" in meters["frame_trace"]
    router_trace = cases["test_rig_router_handshake_status_and_a_short_transfer"]["properties"]["frame_trace"]
    assert "DGR -> b'$" in router_trace and "HELLO" in router_trace and "DGR <- " in router_trace
    assert [c.verb for c in router.commands if c.verb in ("START", "STOP")] == ["START", "START", "STOP"]


# --- the ledger resource ----------------------------------------------------------------------------------


def test_rig_ledger_answers_the_firmware_adapter_with_a_sane_clock_and_its_id(hil_rig):
    """The rig's ledger (a bench ledger started for the test, or the URL the rig names) through
    the firmware's own REST adapter, built from the rig's board config."""
    url = hil_rig.ledger_url()
    config = load_config(hil_rig.board_config())
    assert config.ledger.url == url
    ledger = RestLedger.from_config(config.ledger)
    before = time.time() * 1000
    server_ms = ledger.server_time_ms()
    after = time.time() * 1000
    assert before - config.ledger.max_clock_skew_ms <= server_ms <= after + config.ledger.max_clock_skew_ms
    assert ledger.info()["ledger_id"] == config.ledger.ledger_id


# --- power drivers and place locking ------------------------------------------------------------------


def test_the_example_bench_powers_its_board_with_uhubctl_argument_lists_never_a_shell(tmp_path):
    """The uhubctl driver's off/on are argument lists (a rig file cannot smuggle a second command
    through a shell), a cycle is off, off_s, on, settle_s, and a failing switch says which program
    failed, how and what it printed."""
    from hil_tests.rig import PowerError

    bench = load_rig(RIGS_DIR / "bench-example.toml")
    driver = bench.power["dgr"]
    calls, sleeps = [], []

    def run(argv, timeout_s):
        calls.append(list(argv))
        return subprocess.CompletedProcess(argv, 0, "", "")

    driver.cycle(run=run, sleep=sleeps.append)
    assert calls == [["uhubctl", "--location", "1-1", "--ports", "3", "--action", "off"],
                     ["uhubctl", "--location", "1-1", "--ports", "3", "--action", "on"]]
    assert sleeps == [2.0, 3.0]  # off_s, then the [power] settle_s

    def failing(argv, timeout_s):
        calls.append(list(argv))
        return subprocess.CompletedProcess(argv, 1, "", "No compatible devices detected!\n")

    calls.clear()
    with pytest.raises(PowerError, match=r"power off of dgr: uhubctl .* exited 1: No compatible devices detected!"):
        driver.cycle(run=failing, sleep=sleeps.append)
    rig_file = write(tmp_path / "rig.toml", """
        [rig]
        name = "t"
        features = ["power-cycle"]
        [emulators]
        kind = "none"
        [power.dgr]
        driver = "command"
        off = ["/nonexistent/relay-tool; rm -rf /", "0"]
        on = ["true"]
        off_s = 0
    """)
    with pytest.raises(RigError, match=r"'/nonexistent/relay-tool; rm -rf /' not found"):
        Rig(load_rig(rig_file), tmp_path / "work").power_cycle("dgr")


def test_a_bench_place_is_held_by_one_run_and_a_second_run_is_told_who_holds_it(tmp_path):
    """Two engineers, one bench: a pytest run on a rig with [place] holds the place's lock for the
    whole session; a second run stops at once with a usage error naming the holder, or waits for
    the place with --place-wait. The kernel's flock goes with the holder, even on SIGKILL."""
    from hil_tests.rig import PlaceBusy, PlaceLock

    rig_file = write(tmp_path / "rig.toml", f"""
        [rig]
        name = "shared-bench"
        [emulators]
        kind = "none"
        [place]
        name = "lab-bench-2"
        lock_dir = "{tmp_path / 'locks'}"
    """)
    config = load_rig(rig_file)
    assert (config.place, config.lock_dir) == ("lab-bench-2", tmp_path / "locks")
    holder = PlaceLock(config.place, config.lock_dir)
    assert holder.holder() is None
    with holder:
        seen = PlaceLock(config.place, config.lock_dir).holder()
        assert seen["pid"] == os.getpid() and seen["user"]
        with pytest.raises(PlaceBusy, match=rf"bench place 'lab-bench-2' .* is held by .*pid {os.getpid()} since "):
            PlaceLock(config.place, config.lock_dir).acquire(wait_s=0.3, poll_s=0.1)
        (tmp_path / "t").mkdir()
        tests = write(tmp_path / "t" / "test_one.py", "def test_one():\n    pass\n")
        result = run_pytest("-p", "hil_tests.rig.plugin", "--rootdir", str(tmp_path / "t"), str(tests), "-q",
                            "--rig", str(rig_file), cwd=tmp_path)
        assert result.returncode == 4, result.stdout + result.stderr  # a usage error: nothing ran
        assert "bench place 'lab-bench-2'" in result.stderr and f"pid {os.getpid()}" in result.stderr
    # Free again: a run takes the place, and a holder killed with SIGKILL leaves no stale lock.
    result = run_pytest("-p", "hil_tests.rig.plugin", "--rootdir", str(tmp_path / "t"), str(tests), "-q",
                        "--rig", str(rig_file), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    child = subprocess.Popen([sys.executable, "-m", "hil_tests.rig.place", "hold", str(rig_file), "--", "sleep", "30"],
                             cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while holder.holder() is None:
            assert time.monotonic() < deadline, "the hold command never took the place"
            time.sleep(0.1)
        status = subprocess.run([sys.executable, "-m", "hil_tests.rig.place", "status", str(rig_file)], cwd=REPO,
                                capture_output=True, text=True, timeout=30)
        assert status.stdout.startswith("lab-bench-2: held by ") and f"pid {child.pid} " in status.stdout, status.stdout
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # its own group: the `sleep` it started goes too
        except ProcessLookupError:
            pass
        child.wait()
    with PlaceLock(config.place, config.lock_dir).acquire(wait_s=5):
        pass
