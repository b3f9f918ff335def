"""The pieces of the serial console and the control socket that need no daemon: the line
discipline against hostile bytes, the command parser, the [console] config table, the control
socket's transport on real Unix sockets, and the watchdog's job-liveness rules. The whole path
(a real daemon, a pty, `dgc-host console`, `dgc status`) is in hil_tests/test_console.py.
"""

from __future__ import annotations

import io
import json
import socket
import stat
import threading
from pathlib import Path

import pytest

from firmware.config import ConfigError, load_config
from firmware.console import MAX_LINE_CHARS, ConsoleTee, LineEditor, run_command
from firmware.scheduler.control import ControlServer, ControlSocketInUse, ControlUnavailable, request
from firmware.scheduler.status import EDGE_GRACE_SECONDS, JobMonitor, redact_url, status_line

REPO = Path(__file__).resolve().parents[1]


# --- line discipline ----------------------------------------------------------------------------


def test_line_editor_keeps_printable_ascii_and_drops_everything_else():
    editor = LineEditor()
    hostile = bytes(range(0x00, 0x20)).replace(b"\r", b"").replace(b"\n", b"").replace(b"\x08", b"")
    hostile = hostile.replace(b"\x03", b"").replace(b"\x15", b"") + bytes(range(0x80, 0x100))
    assert editor.feed(b"st" + hostile + b"a\x1b[2Jtus\r") == ["sta[2Jtus"]
    assert editor.ignored_bytes == len(hostile) + 1  # the ESC as well; '[2J' is printable and stays
    assert editor.feed(b"\x00\xff\r\n\r\n") == []  # empty lines are not commands


def test_line_editor_edits_and_clears():
    editor = LineEditor()
    assert editor.feed(b"statuz\x7fs\r") == ["status"]
    assert editor.feed(b"safe\x03meters\n") == ["meters"]  # Ctrl-C dropped "safe"
    assert editor.feed(b"sa") == [] and editor.feed(b"fe\x15help\r\n") == ["help"]  # Ctrl-U, split reads


def test_overlong_lines_are_refused_not_truncated():
    editor = LineEditor()
    assert editor.feed(b"x" * (MAX_LINE_CHARS + 50) + b"\rstatus\r") == [None, "status"]
    assert editor.feed(b"y" * MAX_LINE_CHARS + b"\n") == ["y" * MAX_LINE_CHARS]


class Recorder:
    """Records the control requests a typed line becomes, and answers like the status service refuses."""

    def __init__(self):
        self.requests: list[dict] = []

    def __call__(self, request: dict) -> dict:
        self.requests.append(request)
        return {"ok": False, "error": "recorded"}


@pytest.mark.parametrize("typed, expected", [
    ("status", {"cmd": "status"}),
    ("  STATUS  ", {"cmd": "status"}),
    ("orders", {"cmd": "orders"}),
    ("trades 50", {"cmd": "trades", "limit": 50}),
    ("deliveries 3", {"cmd": "deliveries", "limit": 3}),
    ("meters", {"cmd": "meters"}),
    ("safe", {"cmd": "safe"}),
    ("resume", {"cmd": "resume"}),
    ("log debug", {"cmd": "log_level", "level": "debug"}),
])
def test_typed_commands_become_control_requests(typed, expected):
    handle = Recorder()
    assert run_command(typed, handle) == ["error: recorded"]
    assert handle.requests == [expected]


@pytest.mark.parametrize("typed, fragment", [
    ("reboot", "unknown command 'reboot'"),
    ("safe now", "unknown command 'safe now'"),
    ("resume all", "unknown command 'resume all'"),
    ("log", "unknown command 'log'"),
    ("trades many", "expected a number of rows"),
])
def test_other_lines_get_one_error_line_and_send_nothing(typed, fragment):
    handle = Recorder()
    answer = run_command(typed, handle)
    assert len(answer) == 1 and answer[0].startswith("error: ") and fragment in answer[0]
    assert handle.requests == []


def test_help_lists_every_command():
    text = "\n".join(run_command("help", Recorder()))
    for cmd in ("status", "orders", "trades", "deliveries", "meters", "safe", "resume", "log <level>", "help"):
        assert cmd in text


def test_tee_passes_everything_through_and_queues_whole_lines_only_when_enabled():
    out = io.StringIO()
    tee = ConsoleTee(out, maxlen=3)
    tee.write("before\n")
    assert tee.take() == []  # no console: nothing queued
    tee.enabled = True
    tee.write("one\ntw")
    tee.write("o\n")
    assert tee.take() == ["one", "two"]
    for n in range(5):
        tee.write(f"line {n}\n")
    assert tee.take() == ["line 2", "line 3", "line 4"]  # bounded: the oldest go first
    assert out.getvalue().startswith("before\none\ntwo\nline 0\n")


# --- [console] config -----------------------------------------------------------------------------


def board_config(tmp_path: Path, console: str = "", state_dir: str = "state") -> Path:
    text = (REPO / "board_configs" / "sim.toml").read_text().replace('"../var/sim/sim-house-1', '"state')
    text = text.replace('state_dir = "state"', f'state_dir = "{state_dir}"')
    path = tmp_path / "board.toml"
    path.write_text(text + ("\n[console]\n" + console if console else ""))
    return path


def test_console_defaults_off_with_the_socket_in_the_state_dir(tmp_path):
    config = load_config(board_config(tmp_path))
    assert config.console.tty == "" and config.console.baudrate == 115200
    assert config.control_socket_path == tmp_path / "state" / "control.sock"


def test_console_paths_resolve_against_the_config_directory(tmp_path):
    config = load_config(board_config(tmp_path, 'tty = "ports/console"\ncontrol_socket = "run/dgc.sock"\nbaudrate = 57600'))
    assert config.console.tty == str(tmp_path / "ports" / "console")
    assert config.control_socket_path == tmp_path / "run" / "dgc.sock"
    assert config.console.baudrate == 57600


@pytest.mark.parametrize("console, key, fragment", [
    ('tty = "state/dgr"', "tty", "a serial device not used by [dgr] or a [[bus]]"),
    ('tty = "state/meter-bus"', "tty", "not used by [dgr] or a [[bus]]"),
    ("baudrate = 1234", "baudrate", "one of 9600, 19200"),
    ("tty = 5", "tty", "a serial device path such as /dev/ttyS0"),
    ('ttyy = "/dev/ttyS0"', "ttyy", "unknown key 'ttyy'"),
    ('control_socket = "' + "s" * 120 + '"', "control_socket", "at most 107 bytes"),
])
def test_broken_console_table_names_the_key(tmp_path, console, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(board_config(tmp_path, console))
    assert (info.value.table, info.value.key) == ("console", key)
    assert fragment in str(info.value), str(info.value)


def test_a_default_socket_path_too_long_is_left_to_the_daemon(tmp_path):
    """Only `dgc run` needs the socket: the config loads, and binding says what is wrong (the daemon
    then runs without `dgc status`, with an alarm line)."""
    config = load_config(board_config(tmp_path, state_dir="d" * 110))
    with pytest.raises(OSError, match=r"control\.sock: \d+ bytes, longer than a Unix socket path may be \(107\)"):
        ControlServer(config.control_socket_path).bind()
    assert not (tmp_path / ("d" * 110)).exists()  # nothing created


# --- control socket transport ---------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    seen: list = []

    def handler(req):
        seen.append(req)
        return {"ok": True, "echo": req}

    srv = ControlServer(tmp_path / "state" / "control.sock")
    srv.bind()
    srv.serve(handler)
    srv.seen = seen
    yield srv
    srv.close()


def raw_exchange(path: Path, data: bytes) -> list[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return [json.loads(line) for line in received.splitlines()]


def test_socket_is_0660_and_answers_one_line_per_request(server):
    assert stat.S_ISSOCK(server.path.lstat().st_mode)
    assert stat.S_IMODE(server.path.lstat().st_mode) == 0o660
    assert request(server.path, {"cmd": "status"}) == {"ok": True, "echo": {"cmd": "status"}}
    answers = raw_exchange(server.path, b'{"cmd": "orders"}\n\n{"cmd": "trades", "limit": 5}\n')
    assert [a["echo"] for a in answers] == [{"cmd": "orders"}, {"cmd": "trades", "limit": 5}]


def test_garbage_gets_an_error_answer_and_the_server_keeps_serving(server):
    answers = raw_exchange(server.path, b"\xff\xfe not json\n{\"cmd\": \n")
    assert [a["ok"] for a in answers] == [False, False]
    assert all("expected e.g. {\"cmd\": \"status\"}" in a["error"] for a in answers)
    huge = raw_exchange(server.path, b"x" * (20 * 1024))
    assert huge[0]["ok"] is False and "longer than" in huge[0]["error"]
    assert request(server.path, {"cmd": "meters"})["ok"] is True


def test_a_second_server_on_a_live_socket_is_refused(server):
    with pytest.raises(ControlSocketInUse, match="already answering"):
        ControlServer(server.path).bind()
    assert request(server.path, {"cmd": "status"})["ok"] is True  # the first one is untouched


def test_a_stale_socket_file_is_replaced_and_removed_on_close(tmp_path):
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a SIGKILL leaves behind
    srv = ControlServer(path)
    srv.bind()
    srv.serve(lambda req: {"ok": True})
    assert request(path, {"cmd": "status"}) == {"ok": True}
    srv.close()
    assert not path.exists()


def test_a_plain_file_in_the_way_is_not_deleted(tmp_path):
    path = tmp_path / "control.sock"
    path.write_text("someone's notes")
    with pytest.raises(OSError, match="is not a socket"):
        ControlServer(path).bind()
    assert path.read_text() == "someone's notes"


def test_request_says_in_words_when_no_daemon_answers(tmp_path):
    with pytest.raises(ControlUnavailable, match="the daemon is not running: no control socket at"):
        request(tmp_path / "none.sock", {"cmd": "status"})
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    with pytest.raises(ControlUnavailable, match="nothing listens"):
        request(tmp_path / "stale.sock", {"cmd": "status"})


# --- health rules ---------------------------------------------------------------------------------


class Clocks:
    def __init__(self, wall: float):
        self.wall, self.mono = wall, 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def monitor_at(wall: float) -> tuple[JobMonitor, Clocks]:
    clocks = Clocks(wall)
    return JobMonitor(clock=lambda: clocks.wall, monotonic=lambda: clocks.mono), clocks


def test_measure_overdue_after_three_periods_and_thirty_seconds():
    monitor, clocks = monitor_at(1_000_000.0)
    measure = monitor.wrap("measure", lambda: None)
    measure()
    clocks.advance(3 * 60 + 29)
    assert monitor.problems(slot_seconds=1800, measure_seconds=60) == []
    clocks.advance(2)
    problems = monitor.problems(slot_seconds=1800, measure_seconds=60)
    assert len(problems) == 1 and "measure job overdue" in problems[0] and "limit 210 s" in problems[0]
    measure()
    assert monitor.problems(slot_seconds=1800, measure_seconds=60) == []


def test_slot_edge_must_start_within_the_grace_of_each_edge():
    slot = 30
    monitor, clocks = monitor_at(1_000_005.0)  # started 5 s into a slot (1_000_000 is not an edge; 999_990 is)
    edge = monitor.wrap("slot_edge", lambda: None)
    first_edge = 1_000_020
    clocks.wall = first_edge + 0.05
    edge()  # on time
    clocks.wall = first_edge + EDGE_GRACE_SECONDS + 1
    assert monitor.problems(slot_seconds=slot, measure_seconds=2) == []
    clocks.wall = first_edge + slot + EDGE_GRACE_SECONDS + 1  # the next edge passed without a run
    problems = monitor.problems(slot_seconds=slot, measure_seconds=2)
    assert problems == [f"slot_edge job missed the slot edge at {first_edge + slot}"]
    edge()  # ran late (11 s after its edge)
    problems = monitor.problems(slot_seconds=slot, measure_seconds=2)
    assert len(problems) == 1 and "started 11.0 s after the slot edge" in problems[0]
    clocks.wall = first_edge + 2 * slot + 0.1
    edge()
    clocks.wall = first_edge + 2 * slot + EDGE_GRACE_SECONDS + 1
    assert monitor.problems(slot_seconds=slot, measure_seconds=2) == []  # healthy again at the next good edge


def test_a_hung_slot_edge_run_is_unhealthy_after_half_a_slot():
    monitor, clocks = monitor_at(1_000_005.0)
    release = threading.Event()
    started = threading.Event()

    def hang():
        started.set()
        release.wait(5)

    edge = monitor.wrap("slot_edge", hang)
    clocks.wall = 1_000_020.0
    worker = threading.Thread(target=edge)
    worker.start()
    started.wait(5)
    clocks.wall += 16
    problems = monitor.problems(slot_seconds=30, measure_seconds=2)
    assert any("slot_edge job running for 16 s (limit 15 s)" in p for p in problems)
    release.set()
    worker.join()


def test_edges_before_the_start_are_not_judged():
    monitor, clocks = monitor_at(1_000_005.0)
    monitor.wrap("slot_edge", lambda: None)
    clocks.wall = 1_000_019.0  # the edge at 990 s is before the start; the one at 1_000_020 is not due yet
    assert monitor.problems(slot_seconds=30, measure_seconds=2) == []


def test_status_texts_never_carry_url_credentials():
    assert redact_url("https://user:secret@ledger.example:8443/api?token=abc") == "https://ledger.example:8443/api"
    line = status_line({"healthy": False, "problems": ["journal not writable: disk I/O error"],
                        "orders": {"open": 1}, "deliveries": {"running": 1},
                        "ledger": {"reachable": None}, "clock": {"ok": True, "skew_ms": 3, "bound_ms": 2000}})
    assert line == ("UNHEALTHY (journal not writable: disk I/O error) trading: 1 open order, 1 delivery running, "
                    "ledger ok, clock ok")


def test_one_second_slots_keep_enough_history_to_judge_the_edge():
    monitor, clocks = monitor_at(1_000_000.5)
    edge = monitor.wrap("slot_edge", lambda: None)
    for second in range(1, 20):
        clocks.wall = 1_000_000 + second + 0.01
        edge()
    clocks.wall += 0.5
    assert monitor.problems(slot_seconds=1, measure_seconds=2) == []
