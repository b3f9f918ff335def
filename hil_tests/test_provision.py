"""`dgc-host provision` against a real sshd on 127.0.0.1, a board directory, and the bench ledger over HTTP.

The board's side runs the real `dgc` (keygen, identity, check-config) of this tree; the host
talks to it only through the system ssh client (or, for the SD-card case, on a local
directory). Nothing is mocked: the ledger is the bench ledger on loopback, its registrations
and revocations are real, and the orders signed with the provisioned key are real orders.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import requests
import tomli_w

from firmware.keystore import load_key_file
from firmware.market import MarketRules
from firmware.messages import new_fields, sign_message
from host_tools.bench_ledger.app import LedgerSettings
from host_tools.bench_ledger.server import running_ledger
from host_tools.provision import provision
from host_tools.target import SshOptions, SshTarget

from .board_rig import SshServer

REPO = Path(__file__).resolve().parents[1]
TOKEN = "operator-token-for-tests"
LEDGER_ID = "provision-test-ledger"
DGC = str(Path(sys.executable).parent / "dgc")  # the board's dgc: this tree's firmware
BOARD_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    with SshServer(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def ledger(tmp_path):
    settings = LedgerSettings(db_path=tmp_path / "ledger.sqlite3", ledger_id=LEDGER_ID, operator_token=TOKEN)
    with running_ledger(settings) as running:
        yield running


@pytest.fixture
def board(tmp_path) -> Path:
    """A board root with a config at /etc/dgc/board.toml (as the SD card or a first flash leaves it),
    every path in it inside the root, and a placeholder ledger the provisioning must replace."""
    root = tmp_path / "board"
    data = tomllib.loads((REPO / "board_configs" / "sim.toml").read_text())
    data["board"].update(name="house-9", state_dir=str(root / "var/lib/dgc"), key_file=str(root / "var/lib/dgc/device.key"))
    data["ledger"].update(url="https://ledger.example.invalid", ledger_id="placeholder")
    data["bus"][0]["port"] = str(root / "dev/rs485")
    data["dgr"]["port"] = str(root / "dev/dgr")
    (root / "etc/dgc").mkdir(parents=True)
    (root / "etc/dgc/board.toml").write_text(tomli_w.dumps(data))
    return root


def host_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "host_tools.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def provision_cli(sshd: SshServer, board: Path, ledger_url: str, *extra: str, verbose: bool = True) -> subprocess.CompletedProcess:
    return host_cli(*(["-v"] if verbose else []), "provision", sshd.destination, "--root", str(board), "--ledger", ledger_url,
                    "--dgc", DGC, "--board-python", BOARD_PYTHON, *sshd.ssh_args(), *extra)


def secret_of(key_file: Path) -> tuple[str, bytes]:
    header, secret = key_file.read_text().split()
    return secret, bytes.fromhex(secret)


def place_order(url: str, key_file: Path, nonce: int = 1) -> requests.Response:
    key = load_key_file(key_file)
    now = requests.get(url + "/v1/time", timeout=5).json()["time_ms"] // 1000
    market = MarketRules().open_markets(now)[0]
    fields = new_fields("order", ledger_id=LEDGER_ID, device_id=key.device_id, nonce=nonce, issued_at=now, ttl_s=120,
                        market_id=market, side="buy", energy_wh=500, price_per_kwh_minor=2000)
    return requests.post(url + "/v1/messages", json=sign_message(fields, key).to_wire(), timeout=10)


def test_provision_over_ssh_registers_a_device_whose_signed_orders_the_ledger_accepts(sshd, board, ledger):
    result = provision_cli(sshd, board, ledger.url, "--operator-token", TOKEN)
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
    assert identity["device_id"] == device_id and identity["ledger_id"] == LEDGER_ID
    assert identity["public_key"] == account["public_key"]

    answer = place_order(ledger.url, key_file)
    assert answer.status_code == 200 and answer.json()["status"] == "accepted", answer.text

    # The secret never reached the host: not in anything the host printed or logged at DEBUG
    # (which includes every command's output), and not at the ledger.
    secret_hex, secret_raw = secret_of(key_file)
    assert "DEBUG" in result.stderr and "dgc identity" in result.stderr  # the debug log really covers the board's answers
    assert secret_hex not in result.stdout + result.stderr
    assert TOKEN not in result.stdout + result.stderr
    ledger_db = b"".join(p.read_bytes() for p in board.parent.glob("ledger.sqlite3*"))
    assert secret_hex.encode() not in ledger_db and secret_raw not in ledger_db

    # Provisioning again is idempotent: same key, same device, "already registered".
    again = provision_cli(sshd, board, ledger.url, "--operator-token", TOKEN, verbose=False)
    assert again.returncode == 0, again.stderr
    assert f"device_id {device_id}" in again.stdout and "already registered" in again.stdout
    assert secret_of(key_file)[0] == secret_hex


def test_everything_the_host_receives_is_free_of_the_secret(sshd, board, ledger, caplog):
    """In-process: every byte of every ssh command's stdout and stderr (Target.received) and
    every log record at DEBUG, checked against the secret read from the board's key file."""
    caplog.set_level(logging.DEBUG)
    options = SshOptions(port=sshd.port, identity_file=str(sshd.client_key), known_hosts=str(sshd.known_hosts))
    with SshTarget(sshd.destination, root=str(board), python=BOARD_PYTHON, options=options) as target:
        result = provision(target, ledger.url, operator_token=TOKEN, dgc=DGC)
        received = b"".join(target.received)
    secret_hex, secret_raw = secret_of(board / "var/lib/dgc/device.key")
    assert result.device_id.encode() in received  # the board's answers are in there ...
    assert secret_hex.encode() not in received and secret_raw not in received  # ... its secret is not
    assert secret_hex.upper().encode() not in received
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "board_ops" in logged and result.device_id in logged
    assert secret_hex not in logged and TOKEN not in logged
    assert secret_hex not in repr(result)


def test_rotation_revokes_the_old_device_only_after_the_new_one_is_registered(sshd, board, ledger):
    assert provision_cli(sshd, board, ledger.url, "--operator-token", TOKEN, verbose=False).returncode == 0
    key_file = board / "var/lib/dgc/device.key"
    old_secret, _ = secret_of(key_file)
    old = load_key_file(key_file)
    assert place_order(ledger.url, key_file, nonce=1).json()["status"] == "accepted"  # an open buy order

    refused = provision_cli(sshd, board, ledger.url, "--operator-token", TOKEN, "--rotate", verbose=False)
    assert refused.returncode == 1
    assert "1 open order(s)" in refused.stderr and "--force" in refused.stderr
    assert secret_of(key_file)[0] == old_secret and not (board / "var/lib/dgc/device.key.new").exists()

    # Without the token the new key cannot be registered, so the old one must stay untouched.
    no_token = provision_cli(sshd, board, ledger.url, "--rotate", "--force", verbose=False)
    assert no_token.returncode == 1 and "unauthorized" in no_token.stderr
    assert secret_of(key_file)[0] == old_secret
    waiting = board / "var/lib/dgc/device.key.new"
    assert waiting.exists()  # the new key waits for the next attempt
    waiting_id = load_key_file(waiting).device_id
    assert requests.get(f"{ledger.url}/v1/devices/{old.device_id}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).json()["revoked_ms"] is None

    rotated = provision_cli(sshd, board, ledger.url, "--operator-token", TOKEN, "--rotate", "--force", verbose=False)
    assert rotated.returncode == 0, rotated.stderr
    new = load_key_file(key_file)
    assert new.device_id == waiting_id != old.device_id  # the interrupted rotation was resumed, not restarted
    assert not waiting.exists() and secret_of(key_file)[0] != old_secret
    assert f"revoked {old.device_id} (1 open order(s) cancelled)" in rotated.stdout
    old_account = requests.get(f"{ledger.url}/v1/devices/{old.device_id}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).json()
    assert old_account["revoked_ms"] is not None and old_account["locked_milli_minor"] == 0
    identity = tomllib.loads((board / "etc/dgc/identity.toml").read_text())["identity"]
    assert identity["device_id"] == new.device_id and identity["revoked_device_ids"] == [old.device_id]

    # The old key is refused from now on; the new one trades.
    old_key_copy = board / "old.key"
    old_key_copy.write_text(f"dgc-secp256k1-v1\n{old_secret}\n")
    old_key_copy.chmod(0o600)
    stale = place_order(ledger.url, old_key_copy, nonce=2)
    assert stale.status_code == 403 and stale.json()["code"] == "revoked", stale.text
    assert place_order(ledger.url, key_file, nonce=1).json()["status"] == "accepted"


def test_a_local_directory_target_stands_for_an_sd_card_or_a_bench_board(board, ledger):
    result = host_cli("provision", str(board), "--ledger", ledger.url, "--dgc", DGC, "--board-python", BOARD_PYTHON,
                      env={"DGC_LEDGER_OPERATOR_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    device_id = load_key_file(board / "var/lib/dgc/device.key").device_id
    assert requests.get(f"{ledger.url}/v1/devices/{device_id}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).status_code == 200
    identity = tomllib.loads((board / "etc/dgc/identity.toml").read_text())["identity"]  # the record's key is pinned
    assert identity["ledger_authority_public_key"] == requests.get(f"{ledger.url}/v1/info", timeout=5).json()["authority_public_key"]
    config = next(p for p in board.rglob("*.toml") if "[ledger]" in p.read_text() and p.name != "identity.toml")
    assert tomllib.loads(config.read_text())["ledger"]["authority_public_key"] == identity["ledger_authority_public_key"]


def test_bad_input_and_unreachable_boards_fail_with_one_clear_line(sshd, board, ledger, tmp_path):
    r = host_cli("provision", "no-such-board-dir", "--ledger", ledger.url)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "expected an SSH destination user@host or an existing directory" in r.stderr

    r = host_cli("provision", str(tmp_path), "--ledger", ledger.url, "--dgc", DGC)  # a directory without a config
    assert r.returncode == 2 and "no board config at" in r.stderr.strip().splitlines()[-1]

    r = host_cli("provision", str(board), "--ledger", "ftp://x")
    assert r.returncode == 2 and "expected an http:// or https:// URL" in r.stderr

    wrong_hosts = tmp_path / "known_hosts"
    wrong_hosts.write_text(f"[127.0.0.1]:{sshd.port} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDKUHqoO9VMC6X8TFFvUZr1xfx1kRZ+oTqB6JMc8WRRe\n")
    r = host_cli("provision", sshd.destination, "--root", str(board), "--ledger", ledger.url, "--dgc", DGC,
                 "--ssh-port", str(sshd.port), "--ssh-key", str(sshd.client_key), "--known-hosts", str(wrong_hosts))
    assert r.returncode == 1 and "host key" in r.stderr, r.stderr
    assert not (board / "var/lib/dgc/device.key").exists()  # nothing happened on the board

    r = host_cli("provision", str(board), "--ledger", ledger.url, "--dgc", DGC, "--operator-token", "wrong-token")
    assert r.returncode == 1 and "unauthorized" in r.stderr and "wrong-token" not in r.stderr


def test_ledger_revoke_endpoint(ledger, tmp_path):
    from firmware.keystore import generate_key_file

    key_file = tmp_path / "k.key"
    key = generate_key_file(key_file)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = requests.post(f"{ledger.url}/v1/devices", json={"public_key": key.public_key.hex(), "name": "k"}, headers=auth, timeout=5)
    assert r.status_code == 200
    accepted = place_order(ledger.url, key_file, nonce=1)
    assert accepted.json()["status"] == "accepted"
    locked = requests.get(f"{ledger.url}/v1/devices/{key.device_id}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).json()["locked_milli_minor"]
    assert locked > 0

    r = requests.post(f"{ledger.url}/v1/devices/{key.device_id}/revoke", timeout=5)
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    r = requests.post(f"{ledger.url}/v1/devices/{'0' * 40}/revoke", headers=auth, timeout=5)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = requests.post(f"{ledger.url}/v1/devices/{key.device_id}/revoke", headers=auth, timeout=5)
    body = r.json()
    assert r.status_code == 200 and body["already_revoked"] is False and body["cancelled_orders"] == 1
    assert body["locked_milli_minor"] == 0 and body["revoked_ms"] > 0
    again = requests.post(f"{ledger.url}/v1/devices/{key.device_id}/revoke", headers=auth, timeout=5).json()
    assert again["already_revoked"] is True and again["revoked_ms"] == body["revoked_ms"] and again["cancelled_orders"] == 0

    stats_before = requests.get(f"{ledger.url}/v1/stats", timeout=5).json()["messages"]
    refused = place_order(ledger.url, key_file, nonce=2)
    assert refused.status_code == 403 and refused.json()["code"] == "revoked" and "revoked" in refused.json()["detail"]
    assert requests.get(f"{ledger.url}/v1/stats", timeout=5).json()["messages"] == stats_before  # not stored
    # A resend of a message stored before the revocation still gets its stored answer (exactly once).
    resend = requests.post(f"{ledger.url}/v1/messages", json=json.loads(accepted.request.body), timeout=5).json()
    assert resend["status"] == "accepted" and resend["duplicate"] is True
    r = requests.post(f"{ledger.url}/v1/devices", json={"public_key": key.public_key.hex(), "name": "k"}, headers=auth, timeout=5)
    assert r.status_code == 403 and r.json()["code"] == "revoked"
