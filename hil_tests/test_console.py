"""The daemon's serial console, control socket and systemd notifications, on a real `dgc run`.

The rig's board (``hil_rig_module``: its meters, router and bench ledger — emulators on socat
virtual serial lines on the default rig, the real devices on a bench) brought to "trading" by its
strategy: one real daemon process for the whole module. The daemon's `[console] tty` is the device end of a
VirtualSerialLine (a pty pair, as a USB-serial adapter would be on a bench); the tests talk to
the emulator end with the real `dgc-host console` command and with pyserial. NOTIFY_SOCKET points
at an AF_UNIX datagram socket bound by the test, as systemd's would be, with WATCHDOG_USEC set
as systemd sets it for WatchdogSec=2s. Tests run in file order: the last one stops the daemon.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import serial

from firmware.scheduler.control import request
from host_tools.emulators.virtual_serial import VirtualSerialLine
from hil_tests.rig import Rig
from hil_tests.rig.strategies import BoardStrategy
from host_tools.neighbourhood import REPO_ROOT

pytestmark = pytest.mark.daemon

BIN = Path(sys.executable).parent
DGC = [str(BIN / "dgc")] if (BIN / "dgc").exists() else [sys.executable, "-m", "firmware.cli"]
DGC_HOST = [str(BIN / "dgc-host")] if (BIN / "dgc-host").exists() else [sys.executable, "-m", "host_tools.cli"]
WATCHDOG_USEC = 2_000_000  # systemd's WatchdogSec=2s: the daemon checks its health and pings every 1 s
EVENT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z house \S+")


SLOT_SECONDS = 20  # the freeze test needs a slot longer than its 14-s freeze (see there)


@dataclass
class ConsoleSession:
    """The module's one board (the rig's, brought to "trading" by its strategy), its console
    pty and the systemd notifications."""

    rig: Rig
    board: BoardStrategy
    tty: Path
    tty_emu: Path
    line: VirtualSerialLine | None = None
    notifications: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time received, datagram)
    slot_seconds: int = SLOT_SECONDS

    @property
    def daemon(self):
        return self.board.daemon

    @property
    def device_id(self) -> str:
        return self.board.device_id

    @property
    def config_path(self) -> Path:
        return self.board.config_path

    @property
    def workdir(self) -> Path:
        return self.rig.workdir

    @property
    def control_socket(self) -> Path:
        return Path(self.board._board_value("state_dir")) / "control.sock"

    def secrets(self) -> list[str]:
        """Every long token of the key file: none may ever appear in an answer or a line."""
        return [t for t in Path(self.board._board_value("key_file")).read_text().split() if len(t) >= 32]


@pytest.fixture(scope="module")
def rig(hil_rig_module, tmp_path_factory):
    base = tmp_path_factory.mktemp("console")
    notify_path = base / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify_path))
    receiver.settimeout(0.5)
    tty, tty_emu = base / "console-tty", base / "console-tty.emu"
    # 20-s slots: the freeze test below needs a slot longer than its 14-s freeze (2 s before an
    # edge to 12 s after, beyond the edge job's 10-s grace) so that the next edge runs on time.
    hil_rig_module.configure(market={"slot_seconds": SLOT_SECONDS}, cadence={"bid_seconds": SLOT_SECONDS},
                             console={"tty": str(tty), "baudrate": 115200})
    board = hil_rig_module.board("house", env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    session = ConsoleSession(rig=hil_rig_module, board=board, tty=tty, tty_emu=tty_emu)
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                data = receiver.recv(4096)
            except socket.timeout:
                continue
            session.notifications.append((time.monotonic(), data.decode("utf-8", "replace")))

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    try:
        # The tty does not exist yet: the daemon must start anyway and retry it.
        board.transition("trading")
        yield session
    finally:
        board.close()
        if session.line:
            session.line.stop()
        stop.set()
        thread.join(timeout=2)
        receiver.close()


def console_lines(port: serial.Serial, until: re.Pattern, timeout_s: float = 10.0) -> list[str]:
    """Lines read from the emulator end until one matches ``until``."""
    lines, buffer = [], b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        buffer += port.read(4096)
        *complete, buffer = re.split(rb"\r\n|\n", buffer)
        for raw in complete:
            line = raw.decode("ascii", "replace")
            lines.append(line)
            if until.search(line):
                return lines
    raise AssertionError(f"no console line matched {until.pattern!r} within {timeout_s} s; got:\n" + "\n".join(lines[-30:]))


def send(port: serial.Serial, data: bytes) -> None:
    port.write(data)
    port.flush()


# --- the serial console ---------------------------------------------------------------------------


def test_a_missing_tty_is_one_warning_and_the_console_connects_when_it_appears(rig):
    daemon = rig.daemon
    daemon.wait_for_line(r" running jobs=\d+ control_socket=\S+ console=\S+console-tty watchdog_s=1\.0", timeout_s=5)
    time.sleep(6)  # more than one retry period (5 s) without the tty
    warnings = [line for line in daemon.lines if "serial console" in line and "unavailable" in line]
    assert len(warnings) == 1, warnings
    assert str(rig.tty) in warnings[0] and "retrying every 5 s" in warnings[0]
    rig.line = VirtualSerialLine(rig.tty, rig.tty_emu).start()
    daemon.wait_for_line(rf"serial console {re.escape(str(rig.tty))} connected", timeout_s=12)
    assert daemon.running


def test_dgc_host_console_gets_the_status_answer_over_the_pty(rig):
    device_id = rig.device_id
    result = subprocess.run(
        [*DGC_HOST, "console", "--port", str(rig.tty_emu), "--send", "status",
         "--expect", rf"^board house \(sim\) device {device_id} pid \d+ ", "--timeout", "10",
         "--log", str(rig.workdir / "console.log")],
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    # Every line carries the host's timestamp; the matching line is the status answer's first.
    last = result.stdout.strip().splitlines()[-1]
    assert re.match(rf"^\d\d:\d\d:\d\d\.\d{{3}} board house \(sim\) device {device_id} ", last), last
    logged = (rig.workdir / "console.log").read_text()
    assert ">> status" in logged and f"device {device_id}" in logged


def test_dgc_host_console_exits_1_when_nothing_matches(rig):
    result = subprocess.run(
        [*DGC_HOST, "console", "--port", str(rig.tty_emu), "--send", "status", "--expect", "^no such line$",
         "--timeout", "2"],
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert "no line matched '^no such line$' within 2 s" in result.stderr
    assert "trading: " in result.stdout  # what was seen is printed


def test_console_commands_status_lines_and_hostile_bytes(rig):
    with serial.Serial(str(rig.tty_emu), 115200, timeout=0.2) as port:
        # The daemon's event lines stream to the console. A lone house that has placed its orders
        # is quiet until the next market enters its horizon (one per 20-s slot) and it bids
        # there, so wait a whole slot and a bit: earlier tests may have used up the noisy start.
        streamed = console_lines(port, EVENT_LINE, timeout_s=40)
        assert any(EVENT_LINE.match(line) for line in streamed)
        # Noise, control characters and high bytes around a command: the command still works.
        send(port, b"\x00\xff\xfe\x1b\x07 he\x00lp \x9b\r\n")
        help_lines = console_lines(port, re.compile(r"^  help "))
        assert "commands:" in help_lines
        send(port, b"reboot\r")
        assert console_lines(port, re.compile(r"^error: unknown command 'reboot': expected status"))
        send(port, b"A" * 5000 + b"\r")
        assert console_lines(port, re.compile(r"^error: line longer than 200 characters"))
        send(port, b"meters\r")
        meters = console_lines(port, re.compile(r"^meter interchange \(interchange, sdm120\) ok: import \d+ Wh export \d+ Wh"))
        assert any(re.match(r"^meter house \(house, sdm630\) ok: import \d+ Wh export \d+ Wh, \d+ s ago$", m) for m in meters)
        send(port, b"log debug\r")
        assert console_lines(port, re.compile(r"^log level DEBUG$"))
        send(port, b"log verbose\r")
        assert console_lines(port, re.compile(r"^error: log level 'verbose': expected one of DEBUG, INFO"))
        send(port, b"log info\r")
        assert console_lines(port, re.compile(r"^log level INFO$"))
        send(port, b"orders 5\rtrades\rdeliveries\r")
        rest = console_lines(port, re.compile(r"^\d+ most recent deliveries$"))
        assert any(re.match(r"^\d+ open orders$", line) for line in rest)
        assert any(re.match(r"^\d+ most recent trades$", line) for line in rest)
    assert rig.daemon.running
    for secret in rig.secrets():
        assert not any(secret in line for line in rig.daemon.lines)


# --- dgc status and the control socket ------------------------------------------------------------


def test_dgc_status_json_and_text_through_the_control_socket(rig):
    config = rig.config_path
    result = subprocess.run([*DGC, "status", str(config), "--json"], capture_output=True, text=True, timeout=30,
                            cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["board"] == "house" and status["device_id"] == rig.device_id
    assert status["pid"] == rig.daemon.process.pid
    assert status["healthy"] is True and status["problems"] == []
    assert status["clock"]["ok"] is True
    assert status["console"]["connected"] is True and status["console"]["tty"] == str(rig.tty)
    assert status["console"]["ignored_bytes"] >= 5  # the hostile bytes of the test above
    assert set(status["meters"]) == {"house", "interchange"}
    assert all(m["ok"] is True and m["last_reading_age_s"] < 10 for m in status["meters"].values())
    assert status["jobs"]["measure"]["runs"] > 0 and status["jobs"]["measure"]["errors"] == 0
    text = subprocess.run([*DGC, "status", str(config)], capture_output=True, text=True, timeout=30,
                          cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"board house (sim) device {rig.device_id} pid {rig.daemon.process.pid} up ")
    assert lines[1] == "health: ok"
    assert re.match(r"^trading: \d+ open orders?, \d+ deliver(y|ies) running, ledger ok, clock ok$", lines[2]), lines[2]
    meters = subprocess.run([*DGC, "status", str(config), "--show", "meters", "--json"], capture_output=True, text=True,
                            timeout=30, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    assert [m["name"] for m in json.loads(meters.stdout)] == ["house", "interchange"]
    for secret in rig.secrets():
        assert secret not in result.stdout + text.stdout + meters.stdout


def test_control_socket_requests_and_refusals(rig):
    path = rig.control_socket
    assert oct(path.stat().st_mode & 0o777) == "0o660"
    orders = request(path, {"cmd": "orders"})
    assert orders["ok"] is True and isinstance(orders["orders"], list)
    assert all(o["state"] in ("sending", "open", "cancelling") for o in orders["orders"])
    assert request(path, {"cmd": "trades", "limit": 3})["ok"] is True
    assert request(path, {"cmd": "deliveries"})["ok"] is True
    unknown = request(path, {"cmd": "reboot"})
    assert unknown == {"ok": False, "error": "cmd 'reboot': expected one of status, orders, trades, deliveries, meters, "
                                             "safe, resume, log_level"}
    assert "expected an integer from 1 to 500" in request(path, {"cmd": "trades", "limit": 0})["error"]
    assert request(path, {"cmd": "log_level", "level": "warning"}) == {"ok": True, "cmd": "log_level", "log_level": "WARNING"}
    assert request(path, {"cmd": "status"})["status"]["log_level"] == "WARNING"
    assert request(path, {"cmd": "log_level", "level": "INFO"})["ok"] is True


def test_a_second_daemon_on_the_same_board_refuses_to_start(rig):
    result = subprocess.run([*DGC, "run", str(rig.config_path)], capture_output=True, text=True, timeout=60,
                            cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert "another dgc daemon is already answering on" in result.stderr
    assert " starting " not in result.stdout  # it stopped before opening the journal or the router's line
    assert rig.daemon.running
    assert request(rig.control_socket, {"cmd": "status"})["ok"] is True


def test_safe_typed_on_the_console_sends_the_router_to_its_safe_state(rig):
    with serial.Serial(str(rig.tty_emu), 115200, timeout=0.2) as port:
        port.reset_input_buffer()
        send(port, b"safe\r")
        answer = console_lines(port, re.compile(r"^DGR safe state"))
    assert answer[-1].startswith("DGR safe state confirmed: router mode safe, 0 transfers active"), answer[-1]
    rig.daemon.wait_for_line(r" dgr\.safe_requested by=operator", timeout_s=5)
    rig.daemon.wait_for_line(r" dgr\.safe_state mode=safe", timeout_s=5)


def test_resume_typed_on_the_console_lifts_the_operators_safe_state(rig):
    with serial.Serial(str(rig.tty_emu), 115200, timeout=0.2) as port:
        port.reset_input_buffer()
        send(port, b"safe\r")
        console_lines(port, re.compile(r"^DGR safe state"))
        assert request(rig.control_socket, {"cmd": "status"})["ok"] is True
        send(port, b"resume\r")
        answer = console_lines(port, re.compile(r"^DGR resume"))
    assert answer[-1] == "DGR resumed: router mode idle", answer[-1]
    rig.daemon.wait_for_line(r" dgr\.resume_requested by=operator", timeout_s=5)
    rig.daemon.wait_for_line(r" dgr\.resumed was=operator_safe mode=idle", timeout_s=5)


def test_resume_over_the_control_socket_lifts_the_operators_safe_state(rig):
    path = rig.control_socket
    safe = request(path, {"cmd": "safe"})
    assert safe["ok"] is True and safe["safe_state_confirmed"] is True, safe
    resumed = request(path, {"cmd": "resume"})
    assert resumed == {"ok": True, "cmd": "resume", "resumed": True, "detail": "router mode idle"}, resumed
    again = request(path, {"cmd": "resume"})  # nothing to lift: still fine, the router stays idle
    assert again["ok"] is True and again["resumed"] is True, again


# --- systemd notifications and the watchdog -------------------------------------------------------


def test_ready_then_watchdog_pings_with_status_lines(rig):
    messages = [text for _, text in rig.notifications]
    ready = [i for i, text in enumerate(messages) if text.startswith("READY=1")]
    assert len(ready) == 1, messages[:5]
    assert re.search(r"^STATUS=trading: \d+ open orders?, ", messages[ready[0]], re.M)
    pings = [text for text in messages if text.startswith("WATCHDOG=1")]
    assert not any(text.startswith("WATCHDOG=1") for text in messages[:ready[0]]), "WATCHDOG=1 before READY=1"
    assert len(pings) >= 10  # one a second since the start, the tests above took longer than that
    assert all(re.search(r"^STATUS=trading: .*ledger ok, clock ok$", text, re.M) for text in pings[-3:]), pings[-3:]


def test_no_watchdog_ping_while_the_slot_edge_job_is_late(rig):
    """Freeze the daemon (SIGSTOP) from 2 s before a slot edge to 12 s after it: the edge job then
    runs 12 s late (beyond the 10-s grace). While that is the verdict the daemon sends STATUS=
    UNHEALTHY... and no WATCHDOG=1 (systemd would kill and restart it); after the next edge runs on
    time it is healthy and pings again."""
    slot = rig.slot_seconds
    now = time.time()
    edge = (int(now) // slot + 1) * slot
    if edge - now < 3:
        edge += slot
    time.sleep(edge - 2 - time.time())
    rig.daemon.signal(signal.SIGSTOP)
    try:
        time.sleep(edge + 12 - time.time())
    finally:
        rig.daemon.signal(signal.SIGCONT)
    resumed = time.monotonic()
    rig.daemon.wait_for_line(r" alarm\.unhealthy detail=\"slot_edge job (started 1\d\.\d s after|missed) the slot edge", timeout_s=5)
    rig.daemon.wait_for_line(r" health\.ok", timeout_s=slot + 20)
    healthy_again = time.monotonic()
    during = [text for t, text in rig.notifications if resumed + 0.5 < t < healthy_again - 0.5]
    assert len(during) >= 10, during  # the health job kept running and saying why
    assert all(not text.startswith("WATCHDOG=1") for text in during), during
    assert all(text.startswith("STATUS=UNHEALTHY (slot_edge job ") for text in during), during
    time.sleep(2.5)
    after = [text for t, text in rig.notifications if t > healthy_again]
    assert any(text.startswith("WATCHDOG=1\nSTATUS=trading: ") for text in after), after
    status = request(rig.control_socket, {"cmd": "status"})["status"]
    assert status["healthy"] is True


def test_sigterm_sends_stopping_and_removes_the_socket(rig):
    assert rig.daemon.stop() == 0
    assert any(text.startswith("STOPPING=1") for _, text in rig.notifications[-3:]), rig.notifications[-3:]
    assert not (rig.control_socket).exists()
    result = subprocess.run([*DGC, "status", str(rig.config_path)], capture_output=True, text=True, timeout=30,
                            cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == f"dgc: the daemon is not running: no control socket at {rig.control_socket}"
