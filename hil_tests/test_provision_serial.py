"""`dgc-host provision serial:PORT` against a real shell on a pseudo-terminal standing for the board's serial console.

The board's console is ``bash --norc -i`` on a pty, joined by ``socat`` to a second pty (raw,
no echo) that the host opens with pyserial as it would /dev/ttyUSB0: the shell echoes, prompts
and translates line ends as a real console's login shell does. Its PATH starts with this venv's
bin, so the board's ``dgc`` is this tree's firmware; the board's root is a tmp directory exactly
as in test_provision.py, and the ledger is the bench ledger on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import requests

from firmware.keystore import load_key_file
from host_tools.provision import provision
from host_tools.target import SerialTarget, TargetError

from .test_provision import BOARD_PYTHON, LEDGER_ID, REPO, TOKEN, board, host_cli, ledger, place_order, secret_of  # noqa: F401

VENV_BIN = str(Path(sys.executable).parent)
pytestmark = pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed")


@pytest.fixture
def console(tmp_path):
    """The host's end of the board's serial console: a pty path, with a logged-in bash behind it."""
    link = tmp_path / "console"
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "PS1": "pi@house-9:~$ ",
           "TERM": "vt100", "HOME": str(tmp_path)}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.Popen(["socat", f"PTY,raw,echo=0,link={link}", 'EXEC:"bash --norc -i",pty,stderr,setsid,sigint,sane'],
                            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "socat.log", "wb"))
    deadline = time.monotonic() + 10
    while not link.exists():
        assert proc.poll() is None, (tmp_path / "socat.log").read_text()
        assert time.monotonic() < deadline, "socat did not create the console pty"
        time.sleep(0.02)
    yield str(link)
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_provision_over_the_serial_console_registers_a_device_whose_signed_orders_the_ledger_accepts(console, board, ledger):
    result = host_cli("-v", "provision", f"serial:{console}@115200", "--root", str(board), "--ledger", ledger.url,
                      "--dgc", "dgc", "--board-python", BOARD_PYTHON, env={"DGC_LEDGER_OPERATOR_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    key_file = board / "var/lib/dgc/device.key"
    device_id = load_key_file(key_file).device_id
    assert f"device_id {device_id}" in result.stdout
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"

    account = requests.get(f"{ledger.url}/v1/devices/{device_id}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).json()
    assert account["name"] == "house-9" and account["revoked_ms"] is None
    config = tomllib.loads((board / "etc/dgc/board.toml").read_text())
    assert config["ledger"]["url"] == ledger.url and config["ledger"]["ledger_id"] == LEDGER_ID
    identity = tomllib.loads((board / "etc/dgc/identity.toml").read_text())["identity"]
    assert identity["device_id"] == device_id and identity["public_key"] == account["public_key"]

    answer = place_order(ledger.url, key_file)
    assert answer.status_code == 200 and answer.json()["status"] == "accepted", answer.text

    secret_hex, _ = secret_of(key_file)
    assert "DEBUG" in result.stderr and "dgc identity" in result.stderr
    assert secret_hex not in result.stdout + result.stderr and secret_hex.upper() not in result.stdout + result.stderr
    assert TOKEN not in result.stdout + result.stderr

    # Again over the same console: the shell was handed back usable, the key is reused.
    again = host_cli("provision", f"serial:{console}", "--root", str(board), "--ledger", ledger.url, "--dgc", "dgc",
                     "--board-python", BOARD_PYTHON, env={"DGC_LEDGER_OPERATOR_TOKEN": TOKEN})
    assert again.returncode == 0, again.stderr
    assert f"device_id {device_id}" in again.stdout and "already registered" in again.stdout


def test_everything_received_over_the_console_is_free_of_the_secret(console, board, ledger, caplog):
    """In-process: the raw console transcript and every decoded result (Target.received), and
    every log record at DEBUG, checked against the secret read from the board's key file."""
    caplog.set_level(logging.DEBUG)
    with SerialTarget(console, root=str(board), python=BOARD_PYTHON) as target:
        result = provision(target, ledger.url, operator_token=TOKEN, dgc="dgc")
        # the console survives a failing command and a missing file, and carries binary data intact
        assert target.run(["sh", "-c", "echo oops >&2; exit 7"], check=False).returncode == 7
        assert target.read_file(target.board_path("/etc/dgc/none.toml")) is None
        blob = bytes(range(256)) * 8 + b"\r\n\x1b[0m\x03\x04"
        target.write_file(target.board_path("/tmp/blob.bin"), blob, mode=0o600)
        assert target.read_file(target.board_path("/tmp/blob.bin")) == blob
        with pytest.raises(TargetError, match="serial console.*SSH"):
            target.upload_tree(board, target.board_path("/opt/dgc/releases/x"))
        received = b"".join(target.received)
    secret_hex, secret_raw = secret_of(board / "var/lib/dgc/device.key")
    assert result.device_id.encode() in received
    assert secret_hex.encode() not in received and secret_raw not in received
    assert secret_hex.upper().encode() not in received
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "board_ops" in logged and result.device_id in logged
    assert secret_hex not in logged and TOKEN not in logged
    assert requests.get(f"{ledger.url}/v1/devices/{result.device_id}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).status_code == 200


def test_a_missing_or_dead_serial_port_fails_with_one_clear_line(board, ledger, tmp_path):
    r = host_cli("provision", f"serial:{tmp_path}/no-such-tty", "--root", str(board), "--ledger", ledger.url)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such serial device" in r.stderr, r.stderr

    r = host_cli("provision", "serial:ttyUSB0", "--ledger", ledger.url)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "expected serial:/dev/DEVICE" in r.stderr, r.stderr

    r = host_cli("provision", f"serial:{tmp_path}/x@12345", "--ledger", ledger.url)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "baud rate" in r.stderr, r.stderr

    # A port that opens but where no shell answers (nothing on the other end of the pty).
    link = tmp_path / "dead"
    proc = subprocess.Popen(["socat", f"PTY,raw,echo=0,link={link}", "PTY,raw,echo=0"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not link.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        started = time.monotonic()
        r = host_cli("provision", f"serial:{link}", "--root", str(board), "--ledger", ledger.url, "--dgc", "dgc")
        assert time.monotonic() - started < 30
        last = r.stderr.strip().splitlines()[-1]  # (an INFO line about the ledger may come first)
        assert r.returncode == 1 and last.startswith("dgc-host provision: "), r.stderr
        assert str(link) in last and "no shell answered" in last and "Traceback" not in r.stderr, r.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=5)
    assert not (board / "var/lib/dgc/device.key").exists()
