"""A board as the host tools see it: run a command there, read and write files atomically, switch a symlink.

Why one small abstraction: provisioning and flashing do the same few things to a board, and
they must behave identically on a Raspberry Pi reached over SSH (root ``/``), on a test board
that is a directory under /tmp reached over a real sshd on loopback (root ``/tmp/.../board``),
and on a directory on this machine (a test, or an SD card's root file system mounted here).
So there are exactly two transports - ``LocalTarget`` runs argv with subprocess, ``SshTarget``
runs it through the system OpenSSH client (BatchMode, host keys checked) - and everything
else, including every file operation, is the same code: ``host_tools/board_ops.py`` run with
the board's ``python3``.

Paths: methods take paths *on the target machine*. ``board_path("/etc/dgc/board.toml")`` maps
a path of the board layout under the target's root; paths the board itself reports (its key
file, from its config) are used as they are.

Audit: every byte received from the board (stdout and stderr of every command) is appended
to ``received``, and logged at DEBUG, so a test can assert that no secret ever reached the host.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import posixpath
import re
import secrets
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

BOARD_OPS_SOURCE = (Path(__file__).with_name("board_ops.py")).read_text(encoding="utf-8")
SSH_DESTINATION = re.compile(r"^(ssh://)?[A-Za-z0-9._][A-Za-z0-9._-]*@[A-Za-z0-9._:\[\]-]+$")
LOG_OUTPUT_CHARS = 4000
DEFAULT_TIMEOUT_S = 600.0


class TargetError(Exception):
    """A command or file operation on the board failed; one line saying what and where."""


class TargetUnreachable(TargetError):
    """The board could not be reached at all (SSH connection, authentication, host key)."""


class BadTarget(TargetError):
    """The target was named wrongly (bad input: exit status 2)."""


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    def last_lines(self, n: int = 5) -> str:
        lines = (self.stderr or self.stdout).decode("utf-8", "replace").strip().splitlines()
        return " | ".join(lines[-n:]) if lines else "(no output)"


@dataclass(frozen=True)
class BoardLayout:
    """Where things live on a board, as absolute board paths (before the target's root is applied).

    /etc/dgc/board.toml         the board config: a symlink to opt/dgc/current/board.toml once a release is installed
    /etc/dgc/identity.toml      written by provisioning: device id, public key, ledger
    /etc/dgc/release-pubkey.hex the release key whose bundles this board accepts (pinned by `dgc-host flash trust`)
    /opt/dgc/releases/<version> one installed release: the bundle's files (manifest, wheels/, systemd/,
                                docs/), venv/, board.toml, installed.json
    /opt/dgc/current            symlink to releases/<version>: what runs
    /opt/dgc/state.json         current, previous, failed: shared with `dgc rollback` on the board
    /opt/dgc/pending.json       present only between switching to a release and committing it
    """

    config: str = "/etc/dgc/board.toml"
    identity: str = "/etc/dgc/identity.toml"
    release_pubkey: str = "/etc/dgc/release-pubkey.hex"
    opt: str = "/opt/dgc"

    @property
    def releases(self) -> str:
        return f"{self.opt}/releases"

    @property
    def current(self) -> str:
        return f"{self.opt}/current"

    @property
    def pending(self) -> str:
        return f"{self.opt}/pending.json"

    @property
    def state(self) -> str:
        """{"current", "previous", "failed": [...]}: shared with the board's `dgc rollback`."""
        return f"{self.opt}/state.json"

    def release(self, version: str) -> str:
        return f"{self.releases}/{version}"

    @property
    def dgc(self) -> str:
        """The installed firmware's `dgc` command, through the `current` link."""
        return f"{self.current}/venv/bin/dgc"


class Target:
    """Base class: subclasses only say how an argv is executed on the board."""

    def __init__(self, root: str = "/", *, python: str = "python3", sudo: bool = False, board_user: str | None = None) -> None:
        """``sudo``: run every command through ``sudo -n`` (a login user that is not root, e.g.
        pi). ``board_user``: the account the daemon runs as (e.g. dgc); commands marked
        ``as_board_user`` (the board's own `dgc`) run as it with ``sudo -n -u``, so the key
        they create belongs to the daemon, not to the login user."""
        if not root.startswith("/"):
            raise ValueError(f"root: expected an absolute path on the board, got {root!r}")
        if board_user is not None and not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", board_user):
            raise BadTarget(f"--board-user {board_user!r}: expected a Unix user name")
        self.root = posixpath.normpath(root)
        self.python = python
        self.sudo = sudo
        self.board_user = board_user
        self.received: list[bytes] = []

    # -- to implement -----------------------------------------------------------------------

    def _command(self, argv: Sequence[str]) -> list[str]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Release the transport (an SSH master connection)."""

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- paths ------------------------------------------------------------------------------

    def board_path(self, path: str) -> str:
        """A path of the board layout (e.g. /etc/dgc/board.toml) under this target's root."""
        if not path.startswith("/"):
            raise ValueError(f"expected an absolute board path, got {path!r}")
        return posixpath.normpath(posixpath.join(self.root, path.lstrip("/")))

    # -- commands ---------------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, input: bytes | Iterable[bytes] | None = None, check: bool = True,
            timeout: float = DEFAULT_TIMEOUT_S, what: str = "", on_input: Callable[[int], None] | None = None,
            as_board_user: bool = False) -> CommandResult:
        """Run ``argv`` on the board. ``input`` is bytes or an iterable of chunks (streamed, with
        ``on_input(bytes_so_far)`` after each). With ``check``, a non-zero exit raises TargetError."""
        what = what or shlex.join(argv)
        argv = self._wrap(argv, as_board_user)
        command = self._command(argv)
        log.debug("%s> %s", self.describe(), what)
        try:
            proc = subprocess.Popen(command, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            raise TargetError(f"{what}: cannot start {command[0]!r} ({exc.strerror}); expected it on this machine's PATH") from None
        out_chunks: list[bytes] = []
        err_chunks: list[bytes] = []
        readers = [threading.Thread(target=_drain, args=(proc.stdout, out_chunks), daemon=True),
                   threading.Thread(target=_drain, args=(proc.stderr, err_chunks), daemon=True)]
        for reader in readers:
            reader.start()
        try:
            if input is not None:
                chunks = [input] if isinstance(input, (bytes, bytearray)) else input
                sent = 0
                try:
                    for chunk in chunks:
                        proc.stdin.write(chunk)
                        sent += len(chunk)
                        if on_input:
                            on_input(sent)
                    proc.stdin.close()
                except BrokenPipeError:
                    pass  # the command exited early; its status and stderr say why
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise TargetError(f"{what}: no result within {timeout:.0f} s on {self.describe()}") from None
        finally:
            for reader in readers:
                reader.join(timeout=10)
        result = CommandResult(tuple(argv), proc.returncode, b"".join(out_chunks), b"".join(err_chunks))
        self.received.extend((result.stdout, result.stderr))
        log.debug("%s< %s: exit %d%s%s", self.describe(), what, result.returncode,
                  _shown("stdout", result.stdout), _shown("stderr", result.stderr))
        self._check_transport(result, what)
        if check and result.returncode != 0:
            raise TargetError(f"{what} failed on {self.describe()} (exit {result.returncode}): {result.last_lines()}")
        return result

    def _wrap(self, argv: Sequence[str], as_board_user: bool) -> list[str]:
        """``argv`` behind ``sudo -n`` (or ``sudo -n -u BOARD_USER`` for the board's own commands) as configured."""
        if as_board_user and self.board_user:
            return ["sudo", "-n", "-u", self.board_user, "--", *argv]
        if self.sudo:
            return ["sudo", "-n", "--", *argv]
        return list(argv)

    def _check_transport(self, result: CommandResult, what: str) -> None:
        """Raise TargetUnreachable when the transport itself failed (SSH's exit 255)."""

    # -- file operations (board_ops.py on the board) ---------------------------------------

    def _op(self, op: str, *args: str, input: bytes | Iterable[bytes] | None = None, check: bool = True,
            on_input: Callable[[int], None] | None = None) -> CommandResult:
        return self.run([self.python, "-c", BOARD_OPS_SOURCE, op, *args], input=input, check=check,
                        what=f"board_ops {op} {' '.join(args)}", on_input=on_input)

    def read_file(self, path: str) -> bytes | None:
        """The file's bytes, or None when there is no such file."""
        result = self._op("read", path, check=False)
        if result.returncode == 3:
            return None
        if result.returncode != 0:
            raise TargetError(f"cannot read {path} on {self.describe()}: {result.last_lines()}")
        return result.stdout

    def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Replace ``path`` atomically (temporary file, fsync, rename, directory fsync)."""
        self._op("write", path, f"{mode:o}", input=data)

    def symlink(self, path: str, value: str) -> None:
        """Point the symlink ``path`` at ``value`` atomically (new link renamed over the old)."""
        self._op("symlink", path, value)

    def replace(self, src: str, dst: str) -> None:
        self._op("replace", src, dst)

    def stat(self, *paths: str) -> dict[str, dict]:
        """{path: {"type": None|"file"|"dir"|"link"|"other", "link": ..., "realpath": ...}} (symlinks not followed)."""
        return json.loads(self._op("stat", *paths).stdout)

    def probe(self, *paths: str) -> dict[str, dict]:
        """Like stat, plus ``content``: the bytes of each path that is (or links to) a regular file
        of at most 1 MiB, else None. One round trip for many small facts."""
        import base64

        answer = json.loads(self._op("probe", *paths).stdout)
        for info in answer.values():
            if info.get("content") is not None:
                info["content"] = base64.b64decode(info["content"])
        return answer

    def exists(self, path: str) -> bool:
        return self.stat(path)[path]["type"] is not None

    def readlink(self, path: str) -> str | None:
        info = self.stat(path)[path]
        return info.get("link") if info["type"] == "link" else None

    def listdir(self, path: str) -> dict[str, dict] | None:
        """Entries of a directory with their stat, or None when it does not exist."""
        return json.loads(self._op("list", path).stdout)

    def remove_tree(self, path: str) -> None:
        self._op("rmtree", path)

    def sync(self) -> None:
        self._op("sync")

    def sha256_files(self, directory: str, names: Sequence[str]) -> dict[str, dict | None]:
        return json.loads(self._op("sha256", directory, input=json.dumps(list(names)).encode()).stdout)

    def upload_tree(self, local_dir: Path, dest: str, *, on_progress: Callable[[int, int], None] | None = None) -> int:
        """Copy the regular files under ``local_dir`` to the new directory ``dest`` on the board (a
        tar stream to board_ops untar). Returns the bytes of file data sent."""
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file() and not p.is_symlink())
        total = sum(p.stat().st_size for p in files)
        stream = _tar_stream(Path(local_dir), files)
        sent_data = [0]

        def progress(sent: int) -> None:
            sent_data[0] = min(sent, total)
            if on_progress:
                on_progress(sent_data[0], total)

        self._op("untar", dest, input=stream, on_input=progress)
        if on_progress:
            on_progress(total, total)
        return total


def _drain(stream, chunks: list[bytes]) -> None:
    for chunk in iter(lambda: stream.read(65536), b""):
        chunks.append(chunk)
    stream.close()


def _shown(name: str, data: bytes) -> str:
    if not data:
        return ""
    text = data.decode("utf-8", "replace")
    if len(text) > LOG_OUTPUT_CHARS:
        text = text[:LOG_OUTPUT_CHARS] + f"... ({len(data)} bytes in all)"
    return f"\n  {name}: " + text.rstrip().replace("\n", "\n  ")


def _tar_stream(base: Path, files: list[Path], chunk: int = 256 * 1024) -> Iterator[bytes]:
    """A tar archive of ``files`` (relative to ``base``) produced in chunks, so a large bundle is
    streamed with progress instead of being built in memory first."""
    buffer = io.BytesIO()
    archive = tarfile.open(fileobj=buffer, mode="w|", format=tarfile.PAX_FORMAT)
    for path in files:
        info = tarfile.TarInfo(path.relative_to(base).as_posix())
        info.size = path.stat().st_size
        info.mode = 0o644
        with open(path, "rb") as handle:
            archive.addfile(info, handle)
        if buffer.tell() >= chunk:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    archive.close()
    yield buffer.getvalue()


class LocalTarget(Target):
    """A board root on this machine: a test board, or an SD card's root file system mounted here.

    Commands run here, with this machine's python3; for an SD card that means only file
    operations make sense (the card's own programs are for another CPU)."""

    def __init__(self, root: str, *, python: str = "python3", sudo: bool = False, board_user: str | None = None) -> None:
        root_path = Path(root)
        if not root_path.is_dir():
            raise BadTarget(f"{root}: no such directory; expected a board's root directory (or user@host for SSH)")
        super().__init__(str(root_path.resolve()), python=python, sudo=sudo, board_user=board_user)

    def _command(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def describe(self) -> str:
        return f"local:{self.root}"


@dataclass(frozen=True)
class SshOptions:
    port: int | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    strict_host_key_checking: str = "yes"
    connect_timeout_s: int = 15
    extra: tuple[str, ...] = ()  # further -o KEY=VALUE options


class SshTarget(Target):
    """A board reached with the system OpenSSH client.

    BatchMode=yes (never a password prompt: an unattended tool must fail, not hang), host keys
    checked as configured, one master connection reused for all commands of a run
    (ControlMaster) so a flash over Wi-Fi does not pay a handshake per file operation."""

    def __init__(self, destination: str, *, root: str = "/", python: str = "python3", options: SshOptions = SshOptions(),
                 ssh: str = "ssh", sudo: bool = False, board_user: str | None = None) -> None:
        if not SSH_DESTINATION.match(destination):
            raise BadTarget(f"{destination!r}: expected an SSH destination user@host (or ssh://user@host)")
        super().__init__(root, python=python, sudo=sudo, board_user=board_user)
        self.destination = destination.removeprefix("ssh://")
        self.options = options
        self.ssh = ssh
        self._control_dir = tempfile.mkdtemp(prefix="dgc-ssh-")
        self._control_path = os.path.join(self._control_dir, "cm")
        self._master_started = False

    def _base(self) -> list[str]:
        o = self.options
        argv = [self.ssh, "-o", "BatchMode=yes", "-o", f"StrictHostKeyChecking={o.strict_host_key_checking}",
                "-o", f"ConnectTimeout={o.connect_timeout_s}", "-o", "ServerAliveInterval=15", "-o", "LogLevel=ERROR",
                "-o", f"ControlPath={self._control_path}"]
        if o.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={o.known_hosts}"]
        if o.identity_file:
            argv += ["-i", o.identity_file, "-o", "IdentitiesOnly=yes"]
        if o.port:
            argv += ["-p", str(o.port)]
        for extra in o.extra:
            argv += ["-o", extra]
        return argv

    def _start_master(self) -> None:
        """One background master connection (``ssh -N -f``, ControlMaster=yes) that later commands reuse.

        Started explicitly, with its output going to a file rather than to a command's pipes: a
        master forked by ``ControlMaster=auto`` would keep the first command's stderr pipe open
        and make reading it hang. If it cannot start, its message is the clearest diagnosis."""
        self._master_started = True
        errors = os.path.join(self._control_dir, "master.err")
        try:
            with open(errors, "wb") as err:
                # ControlMaster=yes, not -M as well: both together mean "ask", which BatchMode refuses.
                result = subprocess.run([*self._base(), "-o", "ControlMaster=yes", "-o", "ControlPersist=300", "-N", "-f",
                                         self.destination], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                        timeout=self.options.connect_timeout_s + 30)
        except OSError as exc:
            raise TargetUnreachable(f"cannot start {self.ssh!r} ({exc.strerror}); expected the OpenSSH client "
                                    "(Debian package openssh-client)") from None
        except subprocess.TimeoutExpired:
            raise TargetUnreachable(f"cannot reach {self.describe()} over SSH: no connection within "
                                    f"{self.options.connect_timeout_s + 30} s") from None
        with open(errors, "rb") as err:
            message = err.read()
        self.received.append(message)
        if result.returncode != 0:
            self._check_transport(CommandResult(("ssh",), 255, b"", message), "connecting")
        log.debug("%s: SSH master connection up", self.describe())

    def run(self, argv: Sequence[str], **kwargs) -> CommandResult:
        if not self._master_started:
            self._start_master()
        return super().run(argv, **kwargs)

    def _command(self, argv: Sequence[str]) -> list[str]:
        # ssh hands the remote shell one string: quote every word so the board runs exactly argv.
        return [*self._base(), "-o", "ControlMaster=no", self.destination, shlex.join(argv)]

    def _check_transport(self, result: CommandResult, what: str) -> None:
        if result.returncode == 255:
            message = result.stderr.decode("utf-8", "replace").strip().splitlines()
            detail = message[-1] if message else "no message"
            hint = ""
            if "Host key verification failed" in detail or "REMOTE HOST IDENTIFICATION" in result.stderr.decode("utf-8", "replace"):
                hint = "; the board's host key is not in known_hosts or has changed (check it, then add it)"
            elif "Permission denied" in detail:
                hint = "; the SSH key was refused (is its public half in the board's authorized_keys?)"
            raise TargetUnreachable(f"cannot reach {self.describe()} over SSH for {what}: {detail}{hint}")

    def describe(self) -> str:
        port = f":{self.options.port}" if self.options.port else ""
        root = "" if self.root == "/" else f" (root {self.root})"
        return f"{self.destination}{port}{root}"

    def close(self) -> None:
        if os.path.exists(self._control_path):
            subprocess.run([*self._base(), "-O", "exit", self.destination], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        shutil.rmtree(self._control_dir, ignore_errors=True)


# --------------------------------------------------------------------------- serial console

SERIAL_SPEC = re.compile(r"^serial:(?P<port>/[^@\s]+)(?:@(?P<baud>\d+))?$")
SERIAL_BAUDRATES = (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
SERIAL_SYNC_TIMEOUT_S = 10.0
SERIAL_COMMAND_TIMEOUT_S = 120.0
SERIAL_MAX_INPUT = 1 << 20  # file data sent through the console (base64 at 115200 baud: ~11 KB/s)
SERIAL_MAX_LINE = 1000      # a command line; the tty's canonical line buffer holds 4096
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>]")
_BASE64_LINE = re.compile(rb"^[A-Za-z0-9+/=]*$")


class SerialTarget(Target):
    """A board reached through its serial console, where a shell is logged in (pyserial).

    Each command is one line written to that shell; its stdout and stderr go to temporary files
    on the board and come back base64-encoded between markers the host made up for this session
    (``__DGC_BEGIN_<nonce>`` ... ``__DGC_DONE_<nonce>_<exit status>``), so console echo, CR/LF
    translation, prompts, ANSI sequences and kernel messages on the console cannot corrupt a
    result. The markers are written split by quotes (``"__DGC_""DONE_..."``), so the echo of the
    command line never contains them. Command input (file data) is sent as a base64 here-document.
    File operations are the same ``board_ops.py`` as over SSH, copied once per session to a
    temporary file on the board. Flashing is refused: a bundle is megabytes, a console carries
    ~11 KB/s; use SSH or the SD card."""

    def __init__(self, port: str, *, baud: int = 115200, root: str = "/", python: str = "python3", sudo: bool = False,
                 board_user: str | None = None, sync_timeout_s: float = SERIAL_SYNC_TIMEOUT_S,
                 command_timeout_s: float = SERIAL_COMMAND_TIMEOUT_S) -> None:
        if baud not in SERIAL_BAUDRATES:
            raise BadTarget(f"serial:{port}@{baud}: baud rate {baud}: expected one of {', '.join(map(str, SERIAL_BAUDRATES))}")
        super().__init__(root, python=python, sudo=sudo, board_user=board_user)
        self.port_name = port
        self.baud = baud
        self.sync_timeout_s = sync_timeout_s
        self.command_timeout_s = command_timeout_s
        self._nonce = secrets.token_hex(6)
        self._serial = None
        self._pending = b""
        self._in_sync = False
        self._ops_dir: str | None = None
        if not os.path.exists(port):
            raise BadTarget(f"{port}: no such serial device; expected the board's console adapter, e.g. "
                            "serial:/dev/ttyUSB0@115200 (is it plugged in?)")
        try:
            import serial
        except ImportError:
            raise TargetError("the serial transport needs pyserial (pip install pyserial)") from None
        try:
            self._serial = serial.Serial(port, baud, timeout=0.1, write_timeout=5.0)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise TargetUnreachable(f"cannot open {port}: {_one_line(exc)}; expected a serial device you may use "
                                    "(are you in group dialout?)") from None

    def describe(self) -> str:
        root = "" if self.root == "/" else f" (root {self.root})"
        return f"serial:{self.port_name}@{self.baud}{root}"

    # -- the console ------------------------------------------------------------------------

    def _marker(self, kind: str) -> tuple[str, bytes]:
        """(shell text that prints the marker, the marker as it appears in the output)."""
        return f'"__DGC_""{kind}_{self._nonce}"', f"__DGC_{kind}_{self._nonce}".encode()

    def _write(self, text: str) -> None:
        try:
            self._serial.write(text.encode("utf-8"))
            self._serial.flush()
        except Exception as exc:  # serial.SerialException, OSError: the adapter went away
            raise TargetUnreachable(f"cannot write to {self.port_name}: {_one_line(exc)}") from None

    def _read_until(self, pattern: re.Pattern, timeout: float, what: str, expected: str) -> re.Match:
        """Read the console until ``pattern`` matches (ANSI sequences removed); keep what follows."""
        deadline = time.monotonic() + timeout
        buffer = self._pending
        while True:
            clean = _ANSI.sub(b"", buffer)
            match = pattern.search(clean)
            if match:
                self._pending = clean[match.end():]
                return match
            if time.monotonic() > deadline:
                self._pending = b""
                self._in_sync = False
                tail = clean.decode("utf-8", "replace").strip().splitlines()[-1:] or ["nothing"]
                hint = ""
                if re.search(r"(login|password):\s*$", clean.decode("utf-8", "replace"), re.I):
                    hint = " - the console asks for a login: log in first with dgc-host console"
                raise TargetUnreachable(f"{what}: {expected} on {self.port_name} within {timeout:.0f} s; "
                                        f"last seen: {tail[0][:120]!r}{hint}")
            try:
                chunk = self._serial.read(4096)
            except Exception as exc:
                raise TargetUnreachable(f"{what}: cannot read {self.port_name}: {_one_line(exc)}") from None
            if chunk:
                self.received.append(chunk)  # the raw transcript, for audit
                buffer += chunk

    def _sync(self) -> None:
        """Get the console's shell to a known state: quiet (no echo, no prompts), and answering."""
        if self._in_sync:
            return
        self._nonce = secrets.token_hex(6)
        self._pending = b""
        try:
            self._serial.reset_input_buffer()
        except Exception:
            pass
        # Ctrl-U and Ctrl-C abandon a half-typed line or a stuck command; then silence the shell.
        self._write("\x15\x03")  # Ctrl-U, Ctrl-C
        time.sleep(0.2)
        self._write("\n")
        shown, seen = self._marker("SYNC")
        self._write("stty -echo 2>/dev/null; __dgc_ps1=${__dgc_ps1-$PS1} __dgc_ps2=${__dgc_ps2-$PS2}; "
                    f"PS1=; PS2=; unset PROMPT_COMMAND; set +o history 2>/dev/null; echo {shown}\n")
        self._read_until(re.compile(re.escape(seen) + rb"\r?\n"), self.sync_timeout_s, "connecting",
                         "no shell answered (expected a logged-in shell prompt on the console)")
        self._in_sync = True
        log.debug("%s: shell on the serial console answered", self.describe())

    def _shell(self, command: str, *, input: bytes | None, timeout: float, what: str) -> CommandResult:
        self._sync()
        if "\n" in command or "\r" in command or len(command) > SERIAL_MAX_LINE:
            raise TargetError(f"{what}: command too long or multi-line for the serial console ({len(command)} chars)")
        begin_shown, begin = self._marker("BEGIN")
        sep_shown, sep = self._marker("SEP")
        done_shown, done = self._marker("DONE")
        lines = ['__dgc_o=$(mktemp) && __dgc_e=$(mktemp) && __dgc_i=$(mktemp) || echo ' + done_shown + '_125']
        stdin = "/dev/null"
        if input is not None:
            eof = f"__DGC_EOF_{self._nonce}"
            lines.append(f"base64 -d > \"$__dgc_i\" <<'{eof}'")
            lines.extend(base64.encodebytes(input).decode("ascii").splitlines())
            lines.append(eof)
            stdin = '"$__dgc_i"'
        lines.append(f'{command} < {stdin} > "$__dgc_o" 2> "$__dgc_e"; __dgc_s=$?; echo {begin_shown}; base64 "$__dgc_o"; '
                     f'echo {sep_shown}; base64 "$__dgc_e"; rm -f "$__dgc_o" "$__dgc_e" "$__dgc_i"; echo {done_shown}_$__dgc_s')
        self._write("\n".join(lines) + "\n")
        try:
            self._read_until(re.compile(re.escape(begin) + rb"\r?\n|" + re.escape(done) + rb"_125\r?\n"), timeout, what,
                             "no output marker from the shell (expected the command to finish)")
            match = self._read_until(re.compile(re.escape(done) + rb"_(\d+)\r?\n"), timeout, what,
                                     "no end marker from the shell (expected the command to finish)")
        except TargetUnreachable:
            self._write("\x03\n")  # stop what may still run; the next command syncs afresh
            raise
        body = _ANSI.sub(b"", match.string[:match.start()])
        if sep not in body:
            raise TargetError(f"{what}: the shell on {self.port_name} could not run it (mktemp or base64 missing on the board?)")
        out_part, err_part = body.split(sep, 1)
        stdout, stderr = _unbase64(out_part), _unbase64(err_part)
        return CommandResult((), int(match.group(1)), stdout, stderr)

    # -- Target -----------------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, input: bytes | Iterable[bytes] | None = None, check: bool = True,
            timeout: float = DEFAULT_TIMEOUT_S, what: str = "", on_input: Callable[[int], None] | None = None,
            as_board_user: bool = False) -> CommandResult:
        what = what or shlex.join(argv)
        argv = self._wrap(argv, as_board_user)
        data = None
        if input is not None:
            data = bytes(input) if isinstance(input, (bytes, bytearray)) else b"".join(input)
            if len(data) > SERIAL_MAX_INPUT:
                raise TargetError(f"{what}: {len(data)} bytes are too much for the serial console {self.port_name}; "
                                  "use SSH or the SD card")
        log.debug("%s> %s", self.describe(), what)
        result = self._shell(shlex.join(argv), input=data, timeout=min(timeout, self.command_timeout_s), what=what)
        if on_input and data is not None:
            on_input(len(data))
        result = CommandResult(tuple(argv), result.returncode, result.stdout, result.stderr)
        self.received.extend((result.stdout, result.stderr))
        log.debug("%s< %s: exit %d%s%s", self.describe(), what, result.returncode,
                  _shown("stdout", result.stdout), _shown("stderr", result.stderr))
        if check and result.returncode != 0:
            raise TargetError(f"{what} failed on {self.describe()} (exit {result.returncode}): {result.last_lines()}")
        return result

    def _op(self, op: str, *args: str, input: bytes | Iterable[bytes] | None = None, check: bool = True,
            on_input: Callable[[int], None] | None = None) -> CommandResult:
        if self._ops_dir is None:
            # board_ops.py once per session into a private directory (mktemp -d: mode 0700).
            made = self.run(["mktemp", "-d"], what="mktemp -d (for board_ops.py)")
            ops_dir = made.text.strip()
            if not ops_dir.startswith("/"):
                raise TargetError(f"mktemp -d on {self.describe()} answered {ops_dir!r}; expected a directory")
            self.run(["sh", "-c", 'cat > "$1/board_ops.py" && chmod 755 "$1"', "sh", ops_dir],
                     input=BOARD_OPS_SOURCE.encode("utf-8"), what="copy board_ops.py")
            self._ops_dir = ops_dir
        return self.run([self.python, f"{self._ops_dir}/board_ops.py", op, *args], input=input, check=check,
                        what=f"board_ops {op} {' '.join(args)}", on_input=on_input)

    def upload_tree(self, local_dir: Path, dest: str, *, on_progress: Callable[[int, int], None] | None = None) -> int:
        raise TargetError(f"flashing over the serial console ({self.describe()}) is not supported: a release bundle is "
                          "too large for it; flash over SSH (user@host) or write the SD card (its mounted root directory)")

    def close(self) -> None:
        if self._serial is None:
            return
        try:
            if self._in_sync:
                if self._ops_dir:
                    with contextlib.suppress(TargetError):
                        self.run(["rm", "-rf", self._ops_dir], what="remove board_ops.py", timeout=15)
                # Give the engineer's shell back as it was: prompts, echo, history.
                self._write('PS1=$__dgc_ps1; PS2=$__dgc_ps2; unset __dgc_ps1 __dgc_ps2 __dgc_o __dgc_e __dgc_i __dgc_s; '
                            'set -o history 2>/dev/null; stty echo 2>/dev/null\n')
                self._serial.flush()
        except TargetError:
            pass
        finally:
            with contextlib.suppress(Exception):
                self._serial.close()
            self._serial = None


def _unbase64(part: bytes) -> bytes:
    """The base64 lines of one section; anything else on the console (kernel messages) is ignored."""
    lines = [line.strip() for line in part.replace(b"\r", b"\n").split(b"\n")]
    return base64.b64decode(b"".join(line for line in lines if line and _BASE64_LINE.match(line)))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def parse_serial_spec(spec: str) -> tuple[str, int]:
    match = SERIAL_SPEC.match(spec)
    if not match:
        raise BadTarget(f"{spec!r}: expected serial:/dev/DEVICE or serial:/dev/DEVICE@BAUD, e.g. serial:/dev/ttyUSB0@115200")
    return match.group("port"), int(match.group("baud") or 115200)


def open_target(spec: str, *, root: str | None = None, python: str = "python3", ssh_options: SshOptions = SshOptions(),
                sudo: bool = False, board_user: str | None = None) -> Target:
    """``user@host`` or ``ssh://user@host`` -> SshTarget (root default /); an existing directory ->
    LocalTarget (the directory is the root); ``serial:/dev/DEVICE[@BAUD]`` -> SerialTarget (a logged-in
    shell on the board's serial console; root default /). Anything else is an error naming the forms."""
    if spec.startswith("serial:"):
        port, baud = parse_serial_spec(spec)
        return SerialTarget(port, baud=baud, root=root or "/", python=python, sudo=sudo, board_user=board_user)
    if "@" in spec:
        return SshTarget(spec, root=root or "/", python=python, options=ssh_options, sudo=sudo, board_user=board_user)
    if root not in (None, "/"):
        raise BadTarget("--root applies to SSH and serial targets only; for a local board give its root directory as TARGET")
    if not Path(spec).is_dir():
        raise BadTarget(f"{spec!r}: expected an SSH destination user@host or an existing directory standing for the board's root "
                        "(or serial:/dev/DEVICE[@BAUD] for a shell on its serial console)")
    return LocalTarget(spec, python=python, sudo=sudo, board_user=board_user)


# --------------------------------------------------------------------------- command line

def add_target_arguments(parser) -> None:
    """The options every board-facing dgc-host command shares (provision, flash)."""
    parser.add_argument("--root", help="the board's root directory on an SSH target (default /; a test board lives under /tmp)")
    parser.add_argument("--ssh-port", type=int, help="SSH port (default: the ssh client's, normally 22)")
    parser.add_argument("--ssh-key", help="SSH private key file to log in with (default: the ssh client's keys and agent)")
    parser.add_argument("--known-hosts", help="known_hosts file to check the board's host key against (default: ~/.ssh/known_hosts)")
    parser.add_argument("--strict-host-key-checking", choices=("yes", "accept-new"), default="yes",
                        help="'yes' (default): the board's host key must already be known; 'accept-new': trust a first key")
    parser.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE",
                        help="further ssh -o option (repeatable)")
    parser.add_argument("--board-python", default="python3",
                        help="the board's system Python 3 (runs file operations and creates release venvs; default python3)")
    parser.add_argument("--sudo", action="store_true", help="run board commands through 'sudo -n' (log in as pi, act as root)")
    parser.add_argument("--board-user", metavar="USER",
                        help="run the board's own dgc commands as this user via 'sudo -n -u' (the daemon's user, e.g. dgc)")


def target_from_args(spec: str, args) -> Target:
    for option in args.ssh_option:
        if "=" not in option or option.startswith("-"):
            raise BadTarget(f"--ssh-option {option!r}: expected KEY=VALUE")
    options = SshOptions(port=args.ssh_port, identity_file=args.ssh_key, known_hosts=args.known_hosts,
                         strict_host_key_checking=args.strict_host_key_checking, extra=tuple(args.ssh_option))
    return open_target(spec, root=args.root, python=args.board_python, ssh_options=options, sudo=args.sudo,
                       board_user=args.board_user)
