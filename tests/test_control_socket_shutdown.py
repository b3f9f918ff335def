"""A daemon that stops right after it starts serving its control socket prints no traceback.

Why: `dgc run` binds the socket, starts the accept thread and may be told to stop at once (SIGTERM
during start-up, a start-up refusal). The accept thread used the server's socket attribute after
``close()`` had closed it, so the daemon's stderr ended with "Exception in thread control-socket
... OSError: [Errno 9] Bad file descriptor" (seen in tests/test_cli_basics.py under load). Users
read a traceback as a crash; tools that watch the log for "Traceback" alarm on it.
"""

from __future__ import annotations

import threading

from firmware.scheduler.control import ControlServer, request


def test_closing_right_after_serve_raises_nothing_in_the_accept_thread(tmp_path):
    failures: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: failures.append(args.exc_value)
    try:
        for n in range(120):  # the race is between the thread's start and close(): many tries (127 of 300 raised before)
            server = ControlServer(tmp_path / f"c{n % 7}.sock")
            server.bind()
            server.serve(lambda req: {"ok": True})
            server.close()
    finally:
        threading.excepthook = previous
    assert failures == [], f"{len(failures)} accept threads raised, first: {failures[0]!r}"


def test_a_served_socket_still_answers_and_closes_cleanly(tmp_path):
    path = tmp_path / "control.sock"
    server = ControlServer(path)
    server.bind()
    server.serve(lambda req: {"ok": True, "echo": req.get("cmd")})
    try:
        assert request(path, {"cmd": "status"}, timeout_s=5) == {"ok": True, "echo": "status"}
    finally:
        server.close()
    assert not path.exists()
