"""Place locking: two engineers, one bench.

labgrid reserves a *place* through its coordinator; a DGC bench is one host with the USB adapters
on it, so a lock file on that host is enough. A rig file with ``[place] name = "lab-bench-2"``
makes every pytest run take ``<lock_dir>/lab-bench-2.lock`` with ``flock(LOCK_EX)`` for the
whole session. A second run on the same place waits up to ``--place-wait`` seconds (default 0)
and then stops with a usage error naming who holds the place, since when, and the command they
ran — never two test runs driving one router at once. The kernel drops the lock when the holder
exits, even on SIGKILL, so a crashed run leaves no stale lock behind.

By hand: ``python -m hil_tests.rig.place status RIG_FILE`` says who holds it;
``python -m hil_tests.rig.place hold RIG_FILE -- COMMAND...`` runs a command (a debugging
session, ``mpremote``) while holding the place.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


class PlaceBusy(Exception):
    """The place is held by someone else; the message says who."""


class PlaceLock:
    """An exclusive lock on one bench place (``acquire``/``release``, or a context manager)."""

    def __init__(self, place: str, lock_dir: Path):
        self.place, self.lock_dir = place, Path(lock_dir)
        self.path = self.lock_dir / f"{place}.lock"
        self._fd: int | None = None

    def holder(self) -> dict | None:
        """Who holds the place (user, host, pid, since, command), or None when it is free."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                try:
                    return json.loads(text)
                except ValueError:
                    return {"user": "?", "host": "?", "pid": "?", "since": "?", "command": text.strip()[:200]}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def acquire(self, wait_s: float = 0.0, poll_s: float = 0.5) -> "PlaceLock":
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
                    os.close(fd)
                    raise PlaceBusy(
                        f"bench place {self.place!r} ({self.path}) is held by {holder.get('user', '?')}@"
                        f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since {holder.get('since', '?')} "
                        f"running {holder.get('command', '?')!r}; wait for it, or pass --place-wait SECONDS"
                    ) from None
                time.sleep(poll_s)
        me = {"user": getpass.getuser(), "host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "PlaceLock":
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_for(config) -> PlaceLock | None:
    """The place lock a rig file asks for (``[place]``), or None."""
    if config.place is None:
        return None
    return PlaceLock(config.place, config.lock_dir)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .rigfile import RigError, load_rig

    parser = argparse.ArgumentParser(prog="python -m hil_tests.rig.place", description="bench place locks")
    sub = parser.add_subparsers(dest="cmd", required=True)
    status = sub.add_parser("status", help="say who holds the rig's place")
    status.add_argument("rig")
    hold = sub.add_parser("hold", help="run a command while holding the rig's place")
    hold.add_argument("rig")
    hold.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the place (default 0)")
    hold.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        lock = lock_for(load_rig(args.rig))
    except RigError as exc:
        print(f"place: {exc}", file=sys.stderr)
        return 2
    if lock is None:
        print(f"place: {args.rig} has no [place] table: nothing to lock", file=sys.stderr)
        return 2
    if args.cmd == "status":
        holder = lock.holder()
        print(f"{lock.place}: free" if holder is None else
              f"{lock.place}: held by {holder['user']}@{holder['host']} pid {holder['pid']} since {holder['since']}: "
              f"{holder['command']}")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("place: hold needs a command after --", file=sys.stderr)
        return 2
    try:
        lock.acquire(args.wait)
    except PlaceBusy as exc:
        print(f"place: {exc}", file=sys.stderr)
        return 1
    try:
        return subprocess.call(command)
    finally:
        lock.release()


if __name__ == "__main__":
    raise SystemExit(main())
