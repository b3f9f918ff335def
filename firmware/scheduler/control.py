"""The daemon's control socket: newline-delimited JSON over a Unix stream socket.

Why a Unix socket: `dgc status` must work from a login on the serial console with no network
and no HTTP stack, and file permissions (mode 0660: the daemon's user and group) are the whole
access control. One request per line, one answer per line::

    {"cmd": "status"}                       -> {"ok": true, "cmd": "status", "status": {...}}
    {"cmd": "orders"} / "trades" / "deliveries" / "meters" (optional "limit")
    {"cmd": "safe"}                         -> the DGR is commanded to its safe state
    {"cmd": "resume"}                       -> the operator's safe state is lifted (RESUME)
    {"cmd": "log_level", "level": "DEBUG"}  -> the root logger's level
    anything else                           -> {"ok": false, "error": "... expected ..."}

The socket file also guards the journal: a second `dgc run` on the same config finds a live
socket and refuses to start (:class:`ControlSocketInUse`), while a stale file left by a crash
is replaced. The file is bound under a temporary name, chmod-ed, then renamed into place, so it
never exists with the umask's mode.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
UNIX_SOCKET_PATH_MAX = 107  # bytes (sun_path is 108 on Linux, NUL included)
MAX_REQUEST_BYTES = 16 * 1024
CLIENT_IDLE_TIMEOUT_S = 30.0
MAX_CLIENTS = 8


class ControlSocketInUse(RuntimeError):
    """Another daemon answers on this socket: two daemons must never share a journal."""


class ControlUnavailable(RuntimeError):
    """`dgc status` found no daemon to ask (not running, or not ours to ask); the text says which."""


def _alive(path: Path, timeout_s: float = 1.0) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout_s)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class ControlServer:
    """``bind()`` early (so a second daemon stops before touching anything), ``serve(handler)``
    once the controller exists, ``close()`` on shutdown."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._handler: Callable[[Any], dict] | None = None

    def bind(self) -> None:
        size = len(os.fsencode(str(self.path)))
        if size > UNIX_SOCKET_PATH_MAX:
            raise OSError(f"{self.path}: {size} bytes, longer than a Unix socket path may be ({UNIX_SOCKET_PATH_MAX}); "
                          "expected a shorter [console] control_socket")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise OSError(f"{self.path} exists and is not a socket: expected the daemon's control socket or nothing")
            if _alive(self.path):
                raise ControlSocketInUse(f"another dgc daemon is already answering on {self.path}; "
                                         "expected no daemon running for this board config")
            self.path.unlink()  # stale: left by a daemon that died without cleaning up
        tmp = self.path.with_name(f".{os.getpid()}.tmp")
        if len(os.fsencode(str(tmp))) > UNIX_SOCKET_PATH_MAX:
            tmp = self.path  # no room for a temporary name: bind in place, chmod right after
        tmp.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, SOCKET_MODE)
            sock.listen(MAX_CLIENTS)
            if tmp != self.path:
                os.replace(tmp, self.path)
        except BaseException:
            sock.close()
            if tmp != self.path:
                tmp.unlink(missing_ok=True)
            raise
        st = self.path.lstat()
        self._inode = (st.st_dev, st.st_ino)
        self._sock = sock

    def serve(self, handler: Callable[[Any], dict]) -> None:
        if self._sock is None:
            raise RuntimeError("ControlServer.serve() before bind() or after close()")
        self._handler = handler
        self._sock.settimeout(0.5)
        # The thread gets the socket object itself: close() may run before the thread's first
        # line (a daemon told to stop during start-up), and must not pull it from under it.
        self._thread = threading.Thread(target=self._accept_loop, args=(self._sock,), name="control-socket",
                                        daemon=True)
        self._thread.start()

    def _accept_loop(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("control socket accept failed")
                self._stop.wait(1.0)
                continue
            if self._stop.is_set():  # close()'s own wake-up call, or a client racing the shutdown
                conn.close()
                return
            if not self._slots.acquire(blocking=False):
                _send(conn, {"ok": False, "error": f"busy: more than {MAX_CLIENTS} clients; try again"})
                conn.close()
                continue
            threading.Thread(target=self._client, args=(conn,), name="control-client", daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(CLIENT_IDLE_TIMEOUT_S)
            buffer = b""
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(4096)
                except (socket.timeout, OSError):
                    return
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip() and not _send(conn, self._answer(line)):
                        return
                if len(buffer) > MAX_REQUEST_BYTES:
                    _send(conn, {"ok": False, "error": f"request longer than {MAX_REQUEST_BYTES} bytes: expected one JSON object per line"})
                    return
        finally:
            conn.close()
            self._slots.release()

    def _answer(self, line: bytes) -> dict:
        try:
            request = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return {"ok": False, "error": f"not a JSON line ({exc}): expected e.g. {{\"cmd\": \"status\"}}"}
        assert self._handler is not None
        return self._handler(request)

    def close(self) -> None:
        self._stop.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            # A connection of our own wakes an accept() blocked in the thread (shutdown() does not,
            # on a Unix socket); the descriptor is closed only after the thread has left, so the
            # thread never runs on a closed (or reused) descriptor.
            try:
                st = self.path.lstat()
                if (st.st_dev, st.st_ino) == self._inode:  # never call a successor daemon's socket
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as waker:
                        waker.settimeout(0.2)
                        waker.connect(str(self.path))
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=2)
        if sock is not None:
            sock.close()
        try:  # remove the file only if it is still ours (not a successor's)
            st = self.path.lstat()
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass


def _send(conn: socket.socket, answer: dict) -> bool:
    try:
        conn.sendall(json.dumps(answer, sort_keys=True, separators=(",", ":")).encode("utf-8") + b"\n")
        return True
    except OSError:
        return False


def request(path: Path, payload: dict, *, timeout_s: float = 10.0) -> dict:
    """One request to a running daemon; raises ControlUnavailable (in words) when nobody answers."""
    path = Path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlUnavailable(f"the daemon is not running: no control socket at {path}") from None
        except ConnectionRefusedError:
            raise ControlUnavailable(f"the daemon is not running: nothing listens on {path} (a stale socket file)") from None
        except PermissionError:
            raise ControlUnavailable(f"permission denied on {path}: run as the daemon's user or a member of its group "
                                   "(the socket is mode 0660)") from None
        sock.sendall(json.dumps(payload).encode("utf-8") + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise ControlUnavailable(f"the daemon did not answer on {path} within {timeout_s:.0f} s") from None
    except OSError as exc:
        raise ControlUnavailable(f"the daemon's control socket {path} failed: {exc}") from None
    finally:
        sock.close()
    if not data:
        raise ControlUnavailable(f"the daemon closed {path} without an answer")
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise ControlUnavailable(f"the daemon's answer on {path} is not JSON: {exc}") from None
