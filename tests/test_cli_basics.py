"""The real `dgc` command as a subprocess: check-config, keygen, pubkey, and exit status 2 with one stderr line."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import coincurve
import pytest

REPO = Path(__file__).resolve().parents[1]
SIM = REPO / "board_configs" / "sim.toml"
_SCRIPT = Path(sys.executable).parent / "dgc"
DGC = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "firmware.cli"]


def dgc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DGC_CONFIG"}
    return subprocess.run([*DGC, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def board(tmp_path: Path) -> Path:
    """sim.toml copied into tmp_path with every path of the board (state, key, ports) under tmp_path/state."""
    text = SIM.read_text()
    assert text.count('"../var/sim/sim-house-1') == 4
    text = text.replace('"../var/sim/sim-house-1', '"state')
    path = tmp_path / "board.toml"
    path.write_text(text)
    return path


def key_path(board: Path) -> Path:
    return board.parent / "state" / "device.key"


def secret_of(path: Path) -> str:
    header, secret = path.read_text().split()
    return secret


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dgc: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_check_config_ok_on_the_shipped_sim_config(tmp_path):
    result = dgc("check-config", SIM, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"{SIM}: ok (board sim-house-1, kind sim; slots 30s x 8;")
    assert "interchange=sdm120@rs485:2" in result.stdout


def test_check_config_ok_on_a_copy(board, tmp_path):
    result = dgc("check-config", board, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ": ok (" in result.stdout


@pytest.mark.parametrize("old, new, table_key", [
    ("timeout_ms = 2000", 'timeout_ms = "fast"', "[ledger] timeout_ms: expected an integer from 1 to 60000"),
    ("lot_wh = 100", "lot_wh = 100\nlot_kwh = 0.1", "[market] lot_kwh: expected one of the keys"),
    ('model = "sdm120"', 'model = "sdm121"', "[meter.1] model: expected one of sdm120, sdm630"),
])
def test_broken_config_exits_2_with_one_line_naming_the_key(board, tmp_path, old, new, table_key):
    text = board.read_text()
    assert old in text
    board.write_text(text.replace(old, new, 1))
    for command in ("check-config", "pubkey", "keygen"):
        result = dgc(command, board, cwd=tmp_path)
        assert_one_error_line(result, str(board), table_key)
    assert not key_path(board).exists()  # keygen did nothing with a broken config


def test_missing_config_file_exits_2(tmp_path):
    result = dgc("check-config", tmp_path / "nope.toml", cwd=tmp_path)
    assert_one_error_line(result, str(tmp_path / "nope.toml"), "[file]")


def test_keygen_pubkey_and_the_secret_never_printed(board, tmp_path):
    created = dgc("keygen", board, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    path = key_path(board)
    assert path.stat().st_mode & 0o777 == 0o600
    secret = secret_of(path)
    public = coincurve.PrivateKey(bytes.fromhex(secret)).public_key.format(compressed=True).hex()
    device_id = hashlib.sha256(bytes.fromhex(public)).hexdigest()[:40]
    assert created.stdout.splitlines() == [f"created {path} (mode 0600)", f"public_key {public}", f"device_id {device_id}"]

    shown = dgc("pubkey", board, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [f"public_key {public}", f"device_id {device_id}"]

    as_json = dgc("pubkey", board, "--json", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {"public_key": public, "device_id": device_id}

    again = dgc("keygen", board, cwd=tmp_path)
    assert_one_error_line(again, str(path), "already exists")
    assert secret_of(path) == secret  # untouched

    path.chmod(0o644)
    refused = dgc("pubkey", board, cwd=tmp_path)
    assert_one_error_line(refused, str(path), "mode 0644", "expected 0600")

    for result in (created, shown, as_json, again, refused):
        for stream in (result.stdout, result.stderr):
            assert secret not in stream.lower()
            assert secret[:16] not in stream.lower() and secret[-16:] not in stream.lower()


def test_key_file_option_overrides_the_config(board, tmp_path):
    other = tmp_path / "elsewhere" / "other.key"
    created = dgc("keygen", board, "--key-file", other, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert other.exists() and not key_path(board).exists()
    shown = dgc("pubkey", board, "--key-file", other, "--json", cwd=tmp_path)
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["public_key"] in created.stdout
    missing = dgc("pubkey", board, cwd=tmp_path)  # the config's key_file was never created
    assert_one_error_line(missing, str(key_path(board)), "no key file", "dgc keygen")


def test_keygen_into_an_unusable_directory_exits_2(board, tmp_path):
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    result = dgc("keygen", board, cwd=tmp_path)
    assert_one_error_line(result, str(key_path(board)), "cannot create the key file")


def test_malformed_key_file_exits_2_without_echoing_it(board, tmp_path):
    path = key_path(board)
    path.parent.mkdir()
    secret = hashlib.sha256(b"cli malformed").hexdigest()
    path.write_text(f"dgc-secp256k1-v1\n{secret}\nextra-line-{secret[:8]}\n")
    path.chmod(0o600)
    result = dgc("pubkey", board, cwd=tmp_path)
    line = assert_one_error_line(result, str(path), "not a DGC key file")
    assert not re.search(secret[:12], line) and "extra-line" not in line


# --- what check-config accepts, run accepts: exit 2 with one line, never a traceback (issue 7 q) --


def _edited(board: Path, old: str, new: str) -> Path:
    text = board.read_text()
    assert old in text, old
    board.write_text(text.replace(old, new, 1))
    return board


@pytest.mark.parametrize("old, new, table_key", [
    ('state_dir = "state"', 'state_dir = "/proc/dgc-test/state"', "[board] state_dir: expected a writable directory"),
    ('state_dir = "state"', 'state_dir = "blocker/state"', "[board] state_dir: expected a writable directory"),
    ("heartbeat_seconds = 2", "heartbeat_seconds = 1000000000000000", "[dgr] heartbeat_seconds: expected an integer from 1 to 60"),
    ("timeout_ms = 2000", "timeout_ms = 1000000000000000000000000000000", "[ledger] timeout_ms: expected an integer from 1 to 60000"),
    ("slot_seconds = 30", "slot_seconds = 1000000000000000", "[market] slot_seconds: expected an integer from 1 to 86400"),
], ids=["state_dir under /proc", "state_dir below a file", "heartbeat 10**15", "timeout 10**30", "slot 10**15"])
def test_what_check_config_refuses_run_refuses_with_one_line(board, tmp_path, old, new, table_key):
    created = dgc("keygen", board, "--key-file", tmp_path / "keys" / "device.key", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    (tmp_path / "blocker").write_text("a file, not a directory")
    _edited(board, old, new)
    checked = dgc("check-config", board, cwd=tmp_path)
    assert_one_error_line(checked, str(board), table_key)
    ran = dgc("run", board, "--key-file", tmp_path / "keys" / "device.key", cwd=tmp_path)
    assert_one_error_line(ran, str(board), table_key)


def test_run_accepts_the_largest_values_check_config_accepts(board, tmp_path):
    """The bounds are not just numbers: a daemon configured at them starts, runs and stops on SIGTERM.

    No emulators: the meters and router are absent (the daemon alarms and carries on) and the
    ledger's port is held by a socket that never listens (connections are refused at once)."""
    import signal
    import socket
    import time

    from firmware import config as config_module
    from firmware.config import CadenceConfig, DgrConfig, LedgerConfig
    from firmware.market import MarketRules

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        _edited(board, "http://127.0.0.1:8750", f"http://127.0.0.1:{port}")
        _edited(board, "heartbeat_seconds = 2", f"heartbeat_seconds = {config_module.int_bounds(DgrConfig, 'heartbeat_seconds')[1]}")
        _edited(board, "timeout_ms = 2000", f"timeout_ms = {config_module.int_bounds(LedgerConfig, 'timeout_ms')[1]}")
        _edited(board, "slot_seconds = 30", f"slot_seconds = {config_module.int_bounds(MarketRules, 'slot_seconds')[1]}")
        _edited(board, "day_seconds = 1440", "day_seconds = 0")  # a day is whole slots: one 86400-s slot
        for key in ("measure_seconds", "bid_seconds", "review_seconds", "poll_trades_seconds", "outbox_seconds",
                    "clock_check_seconds"):
            text = board.read_text()
            line = next(ln for ln in text.splitlines() if ln.startswith(f"{key} = "))
            _edited(board, line, f"{key} = {config_module.int_bounds(CadenceConfig, key)[1]}")
        assert dgc("keygen", board, cwd=tmp_path).returncode == 0
        checked = dgc("check-config", board, cwd=tmp_path)
        assert checked.returncode == 0, checked.stderr
        env = {k: v for k, v in os.environ.items() if k != "DGC_CONFIG"}
        daemon = subprocess.Popen([*DGC, "run", str(board)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            seen = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                line = daemon.stdout.readline()
                if not line:
                    break
                seen.append(line)
                if " running jobs=" in line:
                    break
            assert any(" running jobs=" in ln for ln in seen), "".join(seen) + daemon.stderr.read() if daemon.poll() is not None else "".join(seen)
            daemon.send_signal(signal.SIGTERM)
            out, err = daemon.communicate(timeout=30)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    assert daemon.returncode == 0, err
    assert "Traceback" not in err, err
    assert " stopped" in out


def test_run_refuses_a_journal_of_a_newer_release_with_one_line(board, tmp_path):
    """An A/B rollback shares one journal: a release must not open one a newer release wrote."""
    import sqlite3

    assert dgc("keygen", board, cwd=tmp_path).returncode == 0
    journal = tmp_path / "state" / "journal.sqlite3"
    db = sqlite3.connect(journal)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema_version', 99)")
    db.commit()
    db.close()
    ran = dgc("run", board, cwd=tmp_path)
    assert ran.returncode == 2, ran.stderr
    lines = [ln for ln in ran.stderr.splitlines() if ln.startswith("dgc: ")]
    assert len(lines) == 1 and "99" in lines[0] and "Traceback" not in ran.stderr, ran.stderr
