"""SIGTERM ends the real `dgc run` within a few seconds whatever the outbox is doing (issue 7 n).

The ledger is a small HTTP double on 127.0.0.1 (outside the system under test): every GET is
answered 503 at once (the daemon starts and runs, the ledger "down"), and a POST of a signed
message is held open without an answer — the outbox job is then stuck in a call whose timeout
is the largest the config allows (60 s, with retries). No emulators: the meters and the router
are absent and the daemon alarms and carries on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from firmware.journal import Journal
from firmware.keystore import load_key_file
from tests.trading_helpers import place_order

REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).parent / "dgc"
DGC = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "firmware.cli"]


class HangingLedger:
    def __init__(self, hang_reads: bool = False):
        self.posted = threading.Event()
        self.read = threading.Event()
        self.release = threading.Event()
        ledger = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                ledger.read.set()
                if hang_reads:
                    ledger.release.wait(120)
                    return
                body = b'{"status": "rejected", "code": "unavailable", "detail": "down for the test"}'
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # noqa: N802
                ledger.posted.set()
                ledger.release.wait(120)  # never answers while the test runs

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _board(tmp_path: Path, url: str) -> Path:
    text = (REPO / "board_configs" / "sim.toml").read_text().replace('"../var/sim/sim-house-1', '"state')
    text = text.replace("http://127.0.0.1:8750", url).replace("timeout_ms = 2000", "timeout_ms = 60000")
    path = tmp_path / "board.toml"
    path.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "DGC_CONFIG"}
    subprocess.run([*DGC, "keygen", str(path)], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=60)
    return path


def _start(board: Path) -> tuple[subprocess.Popen, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "DGC_CONFIG"}
    daemon = subprocess.Popen([*DGC, "run", str(board)], cwd=board.parent, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(daemon.stdout.readline, "")), daemon=True).start()
    return daemon, lines


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _stop_within(daemon: subprocess.Popen, seconds: float) -> float:
    started = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(timeout=30)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
        raise AssertionError("the daemon ignored SIGTERM for 30 s")
    took = time.monotonic() - started
    assert took < seconds, f"SIGTERM took {took:.1f} s"
    return took


def test_sigterm_ends_the_daemon_while_the_outbox_waits_on_the_ledger(tmp_path):
    ledger = HangingLedger()
    daemon = None
    try:
        board = _board(tmp_path, ledger.url)
        daemon, lines = _start(board)
        assert _wait(lambda: any(" running jobs=" in ln for ln in lines), 60), "".join(lines[-20:])
        # A signed order appears in the journal (as the bid job would put it there); the outbox
        # job picks it up within its 2-s cadence and is then stuck in the ledger's POST.
        key = load_key_file(board.parent / "state" / "device.key")
        journal = Journal(board.parent / "state" / "journal.sqlite3")
        place_order(journal, key, market_id=int(time.time()) // 30 * 30 + 120, side="buy", energy_wh=100,
                    price_per_kwh_minor=2000, issued_at=int(time.time()), ttl_s=60, ledger_id="dgc-bench")
        journal.close()
        assert ledger.posted.wait(30), "the outbox never sent the order"
        time.sleep(0.5)
        _stop_within(daemon, 8.0)
        assert daemon.returncode == 0
        assert _wait(lambda: any(" stopped" in ln for ln in lines), 5)
        assert not any("Traceback" in ln for ln in lines), "".join(lines)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        ledger.close()


def test_sigterm_ends_the_daemon_while_it_is_still_starting(tmp_path):
    """Start-up asks the ledger for the device's account; a ledger that never answers must not
    keep SIGTERM waiting for the call's timeout."""
    ledger = HangingLedger(hang_reads=True)
    daemon = None
    try:
        board = _board(tmp_path, ledger.url)
        daemon, lines = _start(board)
        assert _wait(lambda: any(" starting " in ln for ln in lines), 60), "".join(lines[-20:])
        assert ledger.read.wait(30)
        time.sleep(0.5)
        _stop_within(daemon, 8.0)
        assert daemon.returncode == 0
        assert not any("Traceback" in ln for ln in lines), "".join(lines)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        ledger.close()
