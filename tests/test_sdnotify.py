"""firmware.sdnotify against real AF_UNIX datagram sockets bound by the test, as systemd binds
$NOTIFY_SOCKET: a filesystem path and an abstract-namespace name. (The daemon's own READY=1 /
WATCHDOG=1 / STATUS= / STOPPING=1 are checked on a real `dgc run` in hil_tests/test_console.py.)
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path

import pytest

from firmware.sdnotify import Notifier


def receiver(address) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


def test_no_notify_socket_means_no_op():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready("x") is False and notifier.watchdog() is False and notifier.stopping() is False
    assert notifier.watchdog_interval_s is None


def test_path_socket_gets_each_message_as_one_datagram(tmp_path: Path):
    path = tmp_path / "notify.sock"
    with receiver(str(path)) as sock:
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        assert notifier.enabled
        assert notifier.ready("trading: 0 open orders")
        assert sock.recv(4096) == b"READY=1\nSTATUS=trading: 0 open orders"
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert notifier.status("line one\nREADY=1 injected")
        # A newline in a status must not become an assignment of its own.
        assert sock.recv(4096) == b"STATUS=line one READY=1 injected"
        assert notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
        notifier.close()


def test_abstract_namespace_socket_written_with_an_at_sign():
    name = f"dgc-test-{uuid.uuid4().hex}"
    with receiver(b"\0" + name.encode()) as sock:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.watchdog("ok")
        assert sock.recv(4096) == b"WATCHDOG=1\nSTATUS=ok"


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid_only():
    assert Notifier({"WATCHDOG_USEC": "60000000"}).watchdog_interval_s == 30.0
    assert Notifier({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 30.0
    # systemd meant another process (we were started by a wrapper): not ours to ping.
    assert Notifier({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "banana"}).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval_s is None


def test_a_vanished_socket_is_reported_once_and_never_raises(tmp_path: Path, caplog):
    path = tmp_path / "gone.sock"
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    with caplog.at_level(logging.WARNING, logger="firmware.sdnotify"):
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False
    warnings = [r for r in caplog.records if "sd_notify" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    with receiver(str(path)) as sock:  # systemd back (e.g. after daemon-reexec): sending works again
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize("value", ["relative/notify.sock", "@", "vsock:2:1234"])
def test_unusable_addresses_are_ignored_with_a_warning(value, caplog):
    with caplog.at_level(logging.WARNING, logger="firmware.sdnotify"):
        notifier = Notifier({"NOTIFY_SOCKET": value})
    assert not notifier.enabled and notifier.ready() is False
    assert any("expected an absolute path" in r.getMessage() for r in caplog.records)
