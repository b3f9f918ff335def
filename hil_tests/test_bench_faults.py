"""DGR fault injection and the bench house's control channel, end to end.

Two layers, nothing mocked:

* the DGR emulator's ``inject(dict)`` API, seen through the real driver over a socat pty pair
  (what each fault does to the protocol, and that the driver copes as docs/dgr-protocol.md says);
* a real ``dgc-host bench house`` process and its Unix control socket, driven by the real
  ``dgc-host bench fault|clear|status`` commands and by raw bytes on the socket.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from firmware.config import load_config
from firmware.drivers.dgr import DgrClient, DgrLinkError, DgrNak
from firmware.drivers.meter import MeterReadError, MeterSet
from host_tools.emulators.bench_control import MAX_LINE_BYTES, control_path_for
from host_tools.emulators.dgr_emulator import FaultSpecError, parse_fault

from .test_dgr_driver import Bench, in_seconds, wait_until

REPO = Path(__file__).resolve().parents[1]
SIM = REPO / "board_configs" / "sim.toml"


@pytest.fixture
def bench(tmp_path):
    b = Bench(tmp_path)
    yield b
    b.close()


@pytest.fixture
def fast_watchdog_bench(tmp_path):
    b = Bench(tmp_path, heartbeat_timeout_s=0.4)
    yield b
    b.close()


# --- the fault vocabulary ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ({"kind": "fire"}, "fault kind: expected one of dropped_frame, delay, bad_checksum, error_reply, fault, "
                       "stuck_in_fault, reboot, link_cut, found 'fire'"),
    ({}, "fault kind: expected one of"),
    ([1], "fault: expected an object"),
    ({"kind": "reboot", "count": 1}, "reboot fault: unknown key 'count'; expected no other key"),
    ({"kind": "bad_checksum", "count": 0}, "bad_checksum fault: count: expected an integer from 1 to 1000000, found 0"),
    ({"kind": "bad_checksum", "count": True}, "count: expected an integer from 1 to 1000000, found True"),
    ({"kind": "delay"}, "delay fault: missing key 'delay_ms'"),
    ({"kind": "delay", "delay_ms": 1.5}, "delay_ms: expected an integer from 0 to 60000, found 1.5"),
    ({"kind": "error_reply", "code": 99}, "error_reply fault: code: expected a protocol error code (10 BAD_CRC"),
    ({"kind": "error_reply", "code": 35, "verb": "FLY"}, "verb: expected one of HELLO, STATUS, START"),
    ({"kind": "dropped_frame", "which": "both"}, "which: expected 'request'"),
    ({"kind": "stuck_in_fault", "code": "Over Temp"}, "code: expected a lower-case hardware fault name"),
    ({"kind": "fault", "code": "heartbeat_lost"}, "not heartbeat_lost"),
    ({"kind": "link_cut", "duration_ms": -1}, "link_cut fault: duration_ms: expected an integer from 1 to"),
])
def test_bad_fault_descriptions_are_refused_naming_what_was_expected(spec, message):
    with pytest.raises(FaultSpecError) as refused:
        parse_fault(spec)
    assert message in str(refused.value)


def test_fault_descriptions_are_normalized_with_their_defaults():
    assert parse_fault({"kind": "dropped_frame"}) == {"kind": "dropped_frame", "count": 1, "which": "answer"}
    assert parse_fault({"kind": "error_reply", "code": "CAPACITY"}) == {"kind": "error_reply", "code": 35, "count": 1,
                                                                         "verb": None}
    assert parse_fault({"kind": "link_cut"}) == {"kind": "link_cut", "duration_ms": None}
    assert parse_fault(json.loads('{"kind": "delay", "delay_ms": 200}')) == {"kind": "delay", "delay_ms": 200,
                                                                            "count": None}


# --- each fault, through the real driver --------------------------------------------------------------


def test_error_reply_refuses_the_next_requests_of_a_verb_without_executing_them(bench):
    with bench.client() as dgr:
        dgr.hello()
        bench.emu.inject({"kind": "error_reply", "code": 35, "verb": "START", "count": 2})
        assert dgr.heartbeat() == "idle"  # another verb is not affected
        for trade_id in (1, 2):
            with pytest.raises(DgrNak) as refused:
                dgr.start_transfer(trade_id, "export", 1000, in_seconds(600), 100)
            assert (refused.value.code, refused.value.name) == (35, "CAPACITY")
            assert "injected by the bench" in refused.value.detail
        assert dgr.start_transfer(3, "export", 1000, in_seconds(600), 100).transfer(3) is not None
    state = bench.emu.snapshot()
    assert [t.trade_id for t in state.transfers] == [3]  # the refused ones never ran
    assert [c.answer for c in state.executed("START")] == ["NAK 35 CAPACITY", "NAK 35 CAPACITY", "ACK"]
    assert state.fault_counters["naks_injected"] == 2 and state.injected == ()


def test_an_injected_bad_crc_nak_makes_the_driver_resend_the_same_frame(bench):
    with bench.client() as dgr:
        dgr.hello()
        bench.emu.inject({"kind": "error_reply", "code": 10})
        assert dgr.status().mode == "idle"  # NAK 10 -> same frame again -> answered
    state = bench.emu.snapshot()
    assert state.fault_counters["naks_injected"] == 1
    assert len(state.executed("STATUS")) == 1 and state.replays == 0  # a NAK 10 is never stored


def test_a_dropped_request_is_not_executed_and_its_retry_runs_once(bench):
    with bench.client() as dgr:
        dgr.hello()
        bench.emu.inject({"kind": "dropped_frame", "which": "request"})
        dgr.start_transfer(11, "export", 1000, in_seconds(600), 100)
    state = bench.emu.snapshot()
    assert len(state.executed("START")) == 1 and state.replays == 0  # the first copy never arrived
    assert state.fault_counters["requests_dropped"] == 1


def test_bad_checksums_and_a_counted_delay_cost_retries_not_results(bench):
    with bench.client() as dgr:
        dgr.hello()
        bench.emu.inject({"kind": "bad_checksum", "count": 2})
        assert dgr.status().mode == "idle"  # 3 attempts: two corrupted answers, then the replay
        bench.emu.inject({"kind": "delay", "delay_ms": 50, "count": 1})
        t0 = time.monotonic()
        assert dgr.heartbeat() == "idle"
        assert 0.05 <= time.monotonic() - t0 < 0.15  # late, but within the 150 ms timeout
        t0 = time.monotonic()
        dgr.heartbeat()
        assert time.monotonic() - t0 < 0.05  # the delay applied to one answer only
    counters = bench.emu.fault_counters()
    assert (counters["answers_corrupted"], counters["answers_delayed"]) == (2, 1)
    assert bench.emu.snapshot().replays == 2


def test_a_stuck_fault_survives_resume_and_reboot_until_the_bench_clears_it(bench):
    with bench.client() as dgr:
        dgr.start_transfer(21, "export", 1000, in_seconds(600), 1000)
        bench.emu.inject({"kind": "stuck_in_fault", "code": "overtemp"})
        wait_until(lambda: bench.emu.mode == "fault", what="the fault to latch")
        assert dgr.resume().mode == "fault"  # its cause is still there
        with pytest.raises(DgrNak, match="NAK 32 FAULT"):
            dgr.start_transfer(22, "export", 1000, in_seconds(600), 1000)
        bench.emu.reboot()
        wait_until(lambda: bench.emu.snapshot().session is None, what="the reboot")
        status = dgr.status()  # BOOT seen: HELLO, then STATUS
        assert (status.mode, status.faults) == ("fault", ("overtemp",))  # latched again at boot
        bench.emu.clear()
        assert dgr.status().faults == ("overtemp",)  # clearing the cause does not un-latch it
        assert dgr.resume().mode == "idle"  # now RESUME acknowledges it
        assert dgr.start_transfer(23, "export", 1000, in_seconds(600), 1000).transfer(23) is not None
        kinds = [e.kind for e in dgr.drain_events()]
    assert kinds.count("FAULT") == 2 and "BOOT" in kinds
    assert {e.trade_id: e.reason for e in bench.emu.snapshot().ended}[21] == "fault"


def test_a_cut_link_loses_everything_both_ways_and_the_watchdog_makes_the_router_safe(fast_watchdog_bench):
    bench = fast_watchdog_bench
    with bench.client() as dgr:
        dgr.start_transfer(31, "export", 1000, in_seconds(600), 1000)
        bench.emu.inject({"kind": "link_cut"})
        t0 = time.monotonic()
        wait_until(lambda: bench.emu.mode == "safe", 2, "the watchdog")
        assert time.monotonic() - t0 < 0.4 + 0.2  # the watchdog's 0.4 s from the last frame, plus a tick
        with pytest.raises(DgrLinkError) as lost:
            dgr.heartbeat()
        assert lost.value.safe_confirmed is False  # the driver's SAFE could not get through either
        state = bench.emu.snapshot()
        assert state.link_cut and state.executed("HEARTBEAT") == [] and state.executed("SAFE") == []
        assert state.fault_counters["bytes_lost_in_cut"] > 0 and state.fault_counters["frames_lost_in_cut"] >= 2
        bench.emu.clear("link_cut")
        status = dgr.status()
        assert (status.mode, status.faults, status.transfers) == ("safe", ("heartbeat_lost",), ())
    assert bench.emu.snapshot().ended[0].reason == "heartbeat"


def test_a_timed_link_cut_restores_itself(bench):
    with bench.client() as dgr:
        dgr.hello()
        bench.emu.inject({"kind": "link_cut", "duration_ms": 300})
        assert bench.emu.active_faults()[0]["kind"] == "link_cut"
        wait_until(lambda: not bench.emu.snapshot().link_cut, 2, "the link to come back")
        assert dgr.status().mode == "idle"
    assert bench.emu.fault_counters()["link_cuts"] == 1


def test_inject_is_safe_from_many_threads_at_once(bench):
    """Counted faults injected from 8 threads while the driver runs add up exactly."""
    errors: list[BaseException] = []

    def injector():
        try:
            for _ in range(50):
                bench.emu.inject({"kind": "dropped_frame", "which": "request", "count": 1000})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with bench.client() as dgr:
        dgr.hello()
        threads = [threading.Thread(target=injector) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert errors == []
        (active,) = bench.emu.active_faults()
        assert active == {"kind": "dropped_frame", "which": "request", "remaining": 8 * 50 * 1000}
        bench.emu.clear()
        assert bench.emu.active_faults() == [] and dgr.status().mode == "idle"


# --- the bench house and its control channel -----------------------------------------------------------


def _board(tmp_path: Path) -> Path:
    text = SIM.read_text().replace('"../var/sim/sim-house-1', f'"{tmp_path / "house"}')
    path = tmp_path / "board.toml"
    path.write_text(text)
    return path


def dgc_host(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "host_tools.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL)


def one_error_line(result: subprocess.CompletedProcess, status: int, *fragments: str) -> str:
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def bench_house(tmp_path):
    board = _board(tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "host_tools.cli", "bench", "house", str(board)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "bench house ready" in line or time.monotonic() > deadline:
            break
    assert "bench house ready" in lines[-1], "".join(lines)
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()  # keep the pipe drained
    yield board, process, lines[-1]
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(10)


def test_fault_commands_report_a_bench_that_is_not_running(tmp_path):
    board = _board(tmp_path)
    line = one_error_line(dgc_host("bench", "status", board), 1, "no bench house is listening on",
                          str(tmp_path / "house" / "dgr.control"), "dgc-host bench house FILE")
    assert line.startswith("dgc-host bench status: ")
    one_error_line(dgc_host("bench", "fault", board, "--dgr", "link_cut"), 1, "no bench house is listening")


@pytest.mark.parametrize("args, fragments", [
    (["fault", "{board}", "--dgr", "fire"], ["argument --dgr: invalid choice: 'fire'"]),
    (["fault", "{board}"], ["one of the arguments --dgr --meter is required"]),
    (["fault", "{board}", "--dgr", "reboot", "--count", "2"], ["reboot fault: unknown key 'count'"]),
    (["fault", "{board}", "--dgr", "delay"], ["delay fault: missing key 'delay_ms'"]),
    (["fault", "{board}", "--dgr", "link_cut", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["fault", "{board}", "--dgr", "bad_checksum", "--count", "x"], ["--count: expected a whole number, found 'x'"]),
    (["status", "{missing}"], ["expected an existing board config file"]),
])
def test_bad_input_is_exit_2_with_one_line(tmp_path, args, fragments):
    board = _board(tmp_path)
    argv = [a.format(board=board, missing=tmp_path / "missing.toml") for a in args]
    one_error_line(dgc_host("bench", *argv), 2, *fragments)


def test_the_control_channel_drives_a_running_bench_house(bench_house, tmp_path):
    board, process, ready = bench_house
    path = control_path_for(tmp_path / "house" / "dgr")
    assert f"control={path}" in ready
    assert stat.S_ISSOCK(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o600

    result = dgc_host("bench", "fault", board, "--dgr", "error_reply", "--code", "CAPACITY", "--verb", "START",
                      "--count", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "dgr: injected error_reply; active: error_reply(code=35,name=CAPACITY,verb=START,remaining=2)"
    config = load_config(board)
    with DgrClient(config.dgr) as dgr:
        with pytest.raises(DgrNak, match="NAK 35 CAPACITY"):
            dgr.start_transfer(41, "export", 1000, in_seconds(60), 100)
        assert dgr.status().mode == "idle"

    # The meter emulator's faults, by the meter's name in the board config.
    result = dgc_host("bench", "fault", board, "--meter", "interchange", "exception", "--code", "2", "--count", "1")
    assert result.returncode == 0, result.stderr
    with MeterSet.from_config(config) as meters:
        with pytest.raises(MeterReadError, match="exception 2"):
            meters.read("interchange")
        assert meters.read("interchange").export_energy_wh == 0
    one_error_line(dgc_host("bench", "fault", board, "--meter", "pv", "no_reply"), 2,
                   "no meter matches meter='pv'; expected one of house (unit 1 on rs485), interchange (unit 2 on rs485)")

    result = dgc_host("bench", "fault", board, "--dgr", "link_cut", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["active"][-1]["kind"] == "link_cut"
    status = json.loads(dgc_host("bench", "status", board, "--json").stdout)
    assert status["dgr"]["link_cut"] is True and status["dgr"]["mode"] == "idle"
    assert status["dgr"]["counters"]["naks_injected"] == 1
    assert any(c.split()[1:] == ["START", "NAK", "35", "CAPACITY"] for c in status["dgr"]["last_commands"])
    (interchange,) = [m for m in status["meters"] if m["name"] == "interchange"]
    assert interchange["faults_applied"] == {"exception": 1} and interchange["requests"] >= 2
    text = dgc_host("bench", "status", board).stdout
    assert re.search(r"^dgr +mode=idle link=CUT ", text, re.M), text

    cleared = dgc_host("bench", "clear", board)
    assert cleared.returncode == 0 and cleared.stdout.startswith("cleared: dgr, meter:house, meter:interchange")
    status = json.loads(dgc_host("bench", "status", board, "--json").stdout)
    assert status["dgr"]["link_cut"] is False and status["dgr"]["injected"] == []
    with DgrClient(config.dgr) as dgr:
        assert dgr.status().mode == "idle"  # the link is back


def test_hostile_bytes_on_the_control_socket_cost_an_error_line_never_the_bench(bench_house, tmp_path):
    board, process, _ = bench_house
    path = str(control_path_for(tmp_path / "house" / "dgr"))

    def exchange(payload: bytes) -> list[dict]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return [json.loads(line) for line in data.decode().splitlines()]

    answers = exchange(b'not json\n\xff\xfe\x00\n[1, 2]\n{"cmd": "explode"}\n{"target": "dgr"}\n'
                       b'{"target": "dgr", "fault": {"kind": "reboot", "extra": 1}}\n\n{"cmd": "status", "x": 1}\n'
                       b'{"target": "meter", "unit_id": 9, "fault": {"kind": "no_reply"}}\n{"cmd": "status"}\n')
    assert [a["ok"] for a in answers] == [False] * 8 + [True]
    assert all(a["code"] == "bad_command" for a in answers[:8])
    assert "request is not JSON" in answers[0]["error"] and "not UTF-8" in answers[1]["error"]
    assert "expected an object" in answers[2]["error"] and "cmd: expected status or clear" in answers[3]["error"]
    assert "fault: expected an object" in answers[4]["error"] and "unknown key 'extra'" in answers[5]["error"]
    assert "unknown key 'x'" in answers[6]["error"] and "no meter matches unit_id=9" in answers[7]["error"]
    (too_long,) = exchange(b"{" + b" " * (MAX_LINE_BYTES + 10) + b"}\n")
    assert too_long["code"] == "too_long"
    assert process.poll() is None
    assert exchange(b'{"cmd": "status"}\n')[0]["dgr"]["mode"] == "idle"


def test_a_second_bench_house_on_the_same_config_refuses_to_start(bench_house):
    board, process, _ = bench_house
    result = dgc_host("bench", "house", board)
    one_error_line(result, 1, "another bench house is already listening on")
    assert process.poll() is None and json.loads(dgc_host("bench", "status", board, "--json").stdout)["ok"]


def test_the_control_socket_is_removed_when_the_bench_house_stops(bench_house, tmp_path):
    board, process, _ = bench_house
    path = control_path_for(tmp_path / "house" / "dgr")
    assert path.exists()
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert not path.exists() and not (tmp_path / "house" / "dgr").exists()
