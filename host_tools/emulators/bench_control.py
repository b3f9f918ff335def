"""The bench house's control channel: newline-delimited JSON over a Unix domain socket.

Why a Unix socket next to the serial ports rather than HTTP or signals: a bench house is one
process per house on the engineer's machine; a socket file in the house's own directory needs
no port allocation, cannot be reached from the network, is removed with the house, and file
permissions (0600) decide who may inject faults. One JSON object per line in each direction
keeps it usable with ``socat - UNIX-CONNECT:PATH`` by hand, and lets a fault description travel
unchanged from a test or the CLI to the emulator's ``inject(dict)``.

Protocol (docs/dgr-protocol.md, section 12): every request line is one JSON object and gets
exactly one answer line, ``{"ok": true, ...}`` or ``{"ok": false, "code": ..., "error": ...}``
where ``code`` is ``bad_command`` (the request is wrong: fix it), ``too_long``, ``busy``,
``starting`` or ``internal`` (the bench's own failure). Requests:

* ``{"target": "dgr", "fault": {"kind": ..., ...}}``
* ``{"target": "meter", "meter": NAME | "unit_id": N [, "bus": BUS], "fault": {...}}``
* ``{"cmd": "clear"}`` (optionally ``"target"``, and ``"kind"`` for the DGR, or a meter)
* ``{"cmd": "status"}``

This module holds the transport (server and client) only; what a command does is the bench
house's ``handle(dict) -> dict`` (``bench_house.BenchHouseControl``). The client side imports
nothing beyond the standard library, so ``dgc-host bench fault`` starts quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

CONTROL_SUFFIX = ".control"
MAX_LINE_BYTES = 64 * 1024  # one command; a fault description is a few dozen bytes
MAX_CLIENTS = 16
IDLE_TIMEOUT_S = 300.0  # a connected client that says nothing for this long is dropped
WRITE_TIMEOUT_S = 5.0
UNIX_SOCKET_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes on Linux, NUL included


class ControlError(RuntimeError):
    """The control channel could not be used (bad path, another bench on it, bad answer)."""


class BenchNotRunning(ControlError):
    """Nobody listens on the control socket: the bench house is not running (or elsewhere)."""


class BadCommand(ValueError):
    """A request the bench cannot carry out as asked; the message says what was expected."""


def control_path_for(dgr_port: str | Path) -> Path:
    """The default control socket of a bench house: next to its DGR port, ``<port>.control``."""
    port = Path(dgr_port)
    return port.with_name(port.name + CONTROL_SUFFIX)


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(str(path))) > UNIX_SOCKET_PATH_MAX:
        raise ControlError(f"control socket path {path} is {len(os.fsencode(str(path)))} bytes; Unix sockets allow "
                           f"at most {UNIX_SOCKET_PATH_MAX}: pass a shorter one with --control PATH")


# --- server ----------------------------------------------------------------------------------------

class ControlServer:
    """Serves ``handle`` on a Unix socket in the running event loop.

    ``handle`` runs on the loop, between the emulators' own callbacks, so it sees and changes
    their state without cross-thread hand-offs. Whatever arrives (bytes that are not UTF-8 or
    JSON, a line over 64 KiB, a handler that raises) costs one error answer, never the bench."""

    def __init__(self, path: str | Path, handle: Callable[[dict], dict] | None = None):
        """``handle`` may be set later (``server.handle = ...``): until then every command is
        answered "starting", so the socket can claim its path before the emulators exist."""
        self.path = Path(path)
        self.handle = handle
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task] = set()

    async def start(self) -> None:
        check_socket_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ControlError(f"control socket path {self.path} exists and is not a socket; expected a free path "
                                   "(remove the file or pass another --control PATH)")
            if _listening(self.path):
                raise ControlError(f"another bench house is already listening on {self.path}; stop it first "
                                   "or pass another --control PATH")
            self.path.unlink()  # left behind by a bench that was killed
        self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_LINE_BYTES)
        os.chmod(self.path, 0o600)  # whoever may inject faults into this house: its owner
        log.info("bench control listening on %s", self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            if self._clients:
                await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        try:
            if len(self._clients) >= MAX_CLIENTS:
                await self._answer(writer, _error("busy", f"{MAX_CLIENTS} control clients are connected already; "
                                                          "expected one command connection at a time"))
                return
            if task is not None:
                self._clients.add(task)
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT_S)
                except asyncio.TimeoutError:
                    return
                except (ValueError, asyncio.LimitOverrunError):
                    await self._answer(writer, _error("too_long", f"request line longer than {MAX_LINE_BYTES} bytes; "
                                                                  "expected one JSON object per line"))
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                await self._answer(writer, self.dispatch(line))
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, writer: asyncio.StreamWriter, answer: Mapping[str, Any]) -> None:
        writer.write(json.dumps(answer, separators=(",", ":"), default=str).encode() + b"\n")
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)

    def dispatch(self, line: bytes) -> dict:
        """One request line -> one answer object; never raises."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return _error("bad_command", f"request is not UTF-8 ({exc.reason} at byte {exc.start}); expected a JSON object")
        try:
            command = json.loads(text)
        except ValueError as exc:
            return _error("bad_command", f"request is not JSON ({exc}); expected one JSON object per line, "
                                         'e.g. {"cmd": "status"}')
        if not isinstance(command, dict):
            return _error("bad_command", f"request is a JSON {type(command).__name__}; expected an object, "
                                         'e.g. {"cmd": "status"}')
        if self.handle is None:
            return _error("starting", "the bench house is still starting; try again in a moment")
        try:
            answer = self.handle(command)
        except (BadCommand, ValueError) as exc:  # FaultSpecError is a ValueError
            return _error("bad_command", str(exc))
        except Exception as exc:  # a bench bug must not take the bench down
            log.exception("bench control: internal error on %r", text[:200])
            return _error("internal", f"internal error in the bench house: {type(exc).__name__}: {exc}")
        return {"ok": True, **answer}


def _error(code: str, message: str) -> dict:
    return {"ok": False, "code": code, "error": message}


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


# --- client ----------------------------------------------------------------------------------------

def request(path: str | Path, command: Mapping[str, Any], *, timeout_s: float = 5.0) -> dict:
    """Send one command, return the answer object (``ok`` true or false).

    Raises BenchNotRunning if nothing listens at ``path``, ControlError if the answer does not
    come within ``timeout_s`` or is not one JSON object."""
    path = Path(path)
    check_socket_path(path)
    line = json.dumps(command, separators=(",", ":")).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise BenchNotRunning(f"no bench house is listening on {path} ({exc.strerror}); start it with "
                                  "`dgc-host bench house FILE` (or pass the --control PATH it uses)") from None
        except OSError as exc:
            if exc.errno in (errno.ENOTSOCK, errno.ENOTDIR):
                raise BenchNotRunning(f"{path} is not a bench control socket ({exc.strerror})") from None
            raise ControlError(f"cannot connect to the bench control socket {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(line)
            data = bytearray()
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > 16 * MAX_LINE_BYTES:
                    raise ControlError(f"answer from {path} longer than {16 * MAX_LINE_BYTES} bytes; expected one JSON line")
        except socket.timeout:
            raise ControlError(f"no answer from the bench house on {path} within {timeout_s} s") from None
        except OSError as exc:
            raise ControlError(f"bench control socket {path} failed: {exc.strerror or exc}") from None
    try:
        answer = json.loads(data.decode("utf-8"))
    except ValueError:
        raise ControlError(f"bench house on {path} answered {bytes(data[:200])!r}; expected one JSON object line") from None
    if not isinstance(answer, dict) or "ok" not in answer:
        raise ControlError(f"bench house on {path} answered {answer!r:.200}; expected an object with 'ok'")
    return answer
