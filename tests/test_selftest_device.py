"""`dgc selftest` says why the ledger refuses the device (issue 7 h): over real HTTP to a small
ledger double on 127.0.0.1 that answers the device read as an unregistered or revoked device
would be answered (the ledger is outside the system under test)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from firmware.config import load_config
from firmware.selftest import Check, _check_device
from tests.trading_helpers import device_key

REPO = Path(__file__).resolve().parents[1]


def serve(code: str, status: int, detail: str):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps({"status": "rejected", "code": code, "detail": detail}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("code, status, detail, expected", [
    ("unknown_device", 401, "X-DGC-Read.device_id: no device is registered", "is not registered at"),
    ("revoked", 403, "X-DGC-Read.device_id: device was revoked by the operator", "was revoked at the ledger"),
])
def test_the_device_check_says_why_the_ledger_refuses_the_device(tmp_path, code, status, detail, expected):
    server = serve(code, status, detail)
    try:
        text = (REPO / "board_configs" / "sim.toml").read_text().replace("http://127.0.0.1:8750",
                                                                          f"http://127.0.0.1:{server.server_port}")
        path = tmp_path / "board.toml"
        path.write_text(text.replace('"../var/sim/sim-house-1', '"state'))
        config = load_config(path)
        key = device_key(5)
        check = _check_device(object(), key, Check("key", True, ""), config)
    finally:
        server.shutdown()
    assert not check.ok
    assert expected in check.detail and key.device_id in check.detail and code in check.detail, check.detail
