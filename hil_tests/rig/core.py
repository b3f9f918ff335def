"""The rig as one test sees it: :class:`Rig`, the ``hil_rig`` fixture's object.

Resources start on first use (a meter test starts no router) and stop after the test; teardown
fails the test if a socat process, a link, an emulator thread or a board process is left. The
rig writes the board config the firmware's own drivers and the daemon use (:meth:`Rig.board_config`),
starts a bench ledger when the rig file says ``url = "start"``, and brings the board to a state
with its strategy (:meth:`Rig.board`, rig/strategies.py).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest

from firmware.config import load_config

from .backends import _CpythonDgr, _CpythonMeters, _MicroPythonDgr, _MicroPythonMeters
from .power import PowerError
from .report import REPORT_CHARS, _LoggerTap, _LogLines, tail
from .resources import DgrResource, MeterBusResource, _Backend
from .rigfile import BUS_NAME, REPO, SIM_TOML, RigConfig, RigError, missing_reason

if TYPE_CHECKING:
    from .strategies import BoardStrategy

class Rig:
    """The rig as one test sees it (the ``hil_rig`` fixture). Resources start on first use —
    a meter test starts no router — and everything started is stopped after the test; teardown
    fails the test if a socat process, a link, an emulator thread or a board process is left."""

    def __init__(self, config: RigConfig, workdir: Path, mpy_build: Callable[[], Any] | None = None):
        self.config = config
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._mpy_build = mpy_build
        self._meter_bus: MeterBusResource | None = None
        self._dgr: DgrResource | None = None
        self._backends: dict[str, _Backend] = {}
        self._ledger: subprocess.Popen | None = None
        self._ledger_url: str | None = None
        self._ledger_log: Path | None = None
        self._driver_frames: collections.deque[str] = collections.deque(maxlen=2000)
        self._console = _LogLines()
        self._dgr_frames = _LogLines(prefix="dgr ")
        self._taps: list[_LoggerTap] = []
        if config.emulated:
            # What the CPython emulators "print" is their log; pymodbus's server only when it complains.
            self._taps.append(_LoggerTap("host_tools.emulators", logging.INFO, self._console))
            self._taps.append(_LoggerTap("pymodbus", logging.WARNING, self._console))
        else:
            # A real bench: the frames as the DGR driver logs them (meter frames come through
            # MeterBus's frame_trace, see frame_recorder).
            self._taps.append(_LoggerTap("firmware.drivers.dgr", logging.DEBUG, self._dgr_frames))
        self._closed = False
        self._tables: dict[str, dict] = {}  # board-config tables a test sets (configure)
        self._ledger_args: list[str] = []
        self._token: str | None = None
        self._boards: dict[str, "BoardStrategy"] = {}

    # -- what the rig is ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def features(self) -> frozenset[str]:
        return self.config.features

    def has(self, *features: str) -> bool:
        return set(features) <= self.config.features

    def require(self, *features: str) -> None:
        missing = sorted(set(features) - self.config.features)
        if missing:
            pytest.skip(missing_reason(self.config, missing))

    # -- resources ---------------------------------------------------------------------------

    def _resolve(self, port: str) -> str:
        return port if os.path.isabs(port) else str(self.workdir / port)

    def _line(self, name: str, port: str):
        from host_tools.emulators.virtual_serial import VirtualSerialLine

        return VirtualSerialLine(port, trace_path=self.workdir / f"{name}.trace").start()

    def meter_bus(self) -> MeterBusResource:
        """The meter bus; on an emulated rig its emulator is running when this returns."""
        if self._meter_bus is not None:
            return self._meter_bus
        spec = self.config.meter_bus
        if spec is None:
            pytest.skip(f"{self.config.describe()}: no [meter_bus]")
        port = self._resolve(spec.port)
        control = None
        if self.config.emulated:
            if not spec.meters:
                raise RigError(f"{self.config.path}: [meter_bus] an emulated bus needs [[meter_bus.meter]] entries")
            line = self._line("meter_bus", port)
            try:
                if self.config.emulators == "cpython":
                    control = _CpythonMeters(spec, str(line.emulator_end))
                else:
                    control = _MicroPythonMeters(spec, str(line.emulator_end), self._mpy_build(), self.workdir)
            except BaseException:
                line.stop()
                raise
            self._backends["meter_bus"] = _Backend("meter_bus", line, control, text_trace=False)
        self._meter_bus = MeterBusResource(spec, port, control)
        return self._meter_bus

    def dgr(self, **emulator_settings: Any) -> DgrResource:
        """The DGR link; on an emulated rig the router is running when this returns.
        ``emulator_settings`` (e.g. ``heartbeat_timeout_s=0.4``) configure an emulated router;
        the first call decides them for the test."""
        if self._dgr is not None:
            if emulator_settings and emulator_settings != self._dgr.settings:
                raise RigError(f"the rig's router already runs with {self._dgr.settings}, not {emulator_settings}")
            return self._dgr
        spec = self.config.dgr
        if spec is None:
            pytest.skip(f"{self.config.describe()}: no [dgr]")
        port = self._resolve(spec.port)
        backend = None
        if self.config.emulated:
            settings = {"heartbeat_timeout_s": 10.0, **emulator_settings}
            unknown = sorted(set(settings) - {"heartbeat_timeout_s"})
            if unknown:
                raise RigError(f"unknown router setting {unknown[0]!r}; the rig sets heartbeat_timeout_s")
            line = self._line("dgr", port)
            sink: list = []
            try:
                if self.config.emulators == "cpython":
                    backend = _CpythonDgr(str(line.emulator_end), settings, sink)
                else:
                    backend = _MicroPythonDgr(str(line.emulator_end), settings, sink, self._mpy_build(), self.workdir)
            except BaseException:
                line.stop()
                raise
            self._backends["dgr"] = _Backend("dgr", line, backend, text_trace=True)
        elif emulator_settings:
            raise RigError(f"{self.config.describe()}: a real router's settings are its own; a test that sets "
                           f"{', '.join(emulator_settings)} needs the feature emulator-control")
        else:
            settings = {}
        self._dgr = DgrResource(spec, port, backend, settings if backend is not None else {})
        return self._dgr

    def configure(self, *, ledger_args: list[str] | None = None, **tables: dict) -> None:
        """Settings for the board config and the bench ledger of this test, before either is
        used: board-config tables merged in (``market={"slot_seconds": 12}``, ``cadence=...``;
        the ledger the rig starts gets the same market rules) and ``ledger_args`` for a bench
        ledger the rig starts (``["--clock-offset-ms", "10000"]``). A test that needs ledger
        arguments on a rig whose ledger is a URL is skipped: a shared ledger is not the test's."""
        if self._ledger is not None or self._boards:
            raise RigError("configure() must come before the ledger or the board is started")
        for table, values in tables.items():
            self._tables.setdefault(table, {}).update(values)
        if ledger_args:
            if self.config.ledger_url != "start":
                pytest.skip(f"{self.config.describe()}: the test sets the bench ledger ({' '.join(ledger_args)}); "
                            "this rig's [ledger] is not one the rig starts (url = \"start\")")
            self._ledger_args = list(ledger_args)

    def operator_token(self) -> str:
        """The ledger operator's token (device registration): the rig's own for a ledger it
        started; for a ledger URL, $DGC_LEDGER_OPERATOR_TOKEN, or the test is skipped."""
        if self.config.ledger_url == "start":
            self.ledger_url()
            assert self._token is not None
            return self._token
        token = os.environ.get("DGC_LEDGER_OPERATOR_TOKEN")
        if not token:
            pytest.skip(f"{self.config.describe()}: registering the board at {self.config.ledger_url} needs the "
                        "operator token in $DGC_LEDGER_OPERATOR_TOKEN")
        return token

    def board(self, name: str = "rig-board", *, env: dict[str, str] | None = None) -> "BoardStrategy":
        """The DGC board of this rig as a strategy (rig/strategies.py): ``.transition("trading")``
        brings it up against the rig's devices and ledger; teardown brings it ``off``."""
        from .strategies import BoardStrategy

        if name not in self._boards:
            self._boards[name] = BoardStrategy(self, name, env=env)
        return self._boards[name]

    def ledger_url(self) -> str:
        """The ledger's base URL; with ``url = "start"`` a bench ledger is started on
        127.0.0.1 (a free port, a fresh database, market rules from the rig's board config)."""
        url = self.config.ledger_url
        if url is None:
            pytest.skip(f"{self.config.describe()}: no [ledger]")
        if url != "start":
            return url
        if self._ledger_url is None:
            self._start_ledger()
        assert self._ledger_url is not None
        return self._ledger_url

    def _start_ledger(self) -> None:
        import secrets

        board = self.board_config()
        self._token = secrets.token_hex(16)
        self._ledger_log = self.workdir / "ledger.log"
        with open(self._ledger_log, "wb") as stderr:
            self._ledger = subprocess.Popen(
                [sys.executable, "-m", "host_tools.bench_ledger.cli", "ledger", "serve", "--config", str(board),
                 "--db", str(self.workdir / "ledger.sqlite3"), "--host", "127.0.0.1", "--port", "0",
                 "--operator-token", self._token, *self._ledger_args],
                stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True, cwd=REPO)
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(self._ledger.stdout.readline()), daemon=True)
        reader.start()
        reader.join(30)
        line = ready[0] if ready else ""
        match = re.match(r"ledger listening on (http://\S+)", line)
        if match is None:
            self._stop_ledger()
            raise RigError(f"the bench ledger did not start within 30 s: {line!r}\n{self._ledger_log.read_text()[-2000:]}")
        self._ledger_url = match.group(1)

    def _stop_ledger(self) -> list[str]:
        proc, self._ledger = self._ledger, None
        if proc is None:
            return []
        problems = []
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                problems.append("the bench ledger did not stop on SIGTERM within 10 s")
        if proc.stdout is not None:
            proc.stdout.close()
        return problems

    def board_config(self, name: str | None = None) -> Path:
        """A board config for the rig: board_configs/sim.toml with the rig's meter bus (port,
        serial format, timing), meters and DGR link, the tables set with :meth:`configure`, and
        its state in the test's directory (``name``: a board of that name, with its own state).
        The [ledger] url is the rig's when it is a URL or a started bench ledger."""
        import tomli_w

        data = tomllib.loads(SIM_TOML.read_text())
        for table, values in self._tables.items():
            data.setdefault(table, {}).update(values)
        state = self.workdir / (f"{name}-state" if name else "state")
        if name:
            data["board"]["name"] = name
        data["board"]["state_dir"] = str(state)
        data["board"]["key_file"] = str(state / "device.key")
        if self.config.ledger_id is not None:
            data["ledger"]["ledger_id"] = self.config.ledger_id
        if self.config.ledger_url not in (None, "start"):
            data["ledger"]["url"] = self.config.ledger_url
        elif self._ledger_url is not None:
            data["ledger"]["url"] = self._ledger_url
        bus = data["bus"][0]
        bus["name"] = BUS_NAME
        spec = self.config.meter_bus
        if spec is not None:
            bus.update(port=self._resolve(spec.port), **spec.serial_settings())
            max_power = {m["role"]: m.get("max_power_w", 0) for m in data["meter"]}
            data["meter"] = [{"name": m.name, "bus": BUS_NAME, "unit_id": m.unit_id, "model": m.model, "role": m.role,
                              "max_power_w": max_power.get(m.role, 0)} for m in spec.meters]
        else:
            bus["port"] = str(self.workdir / "no-meter-bus-on-this-rig")
            for meter in data["meter"]:
                meter["bus"] = BUS_NAME
        data["bus"] = [bus]
        if self.config.dgr is not None:
            d = self.config.dgr
            data["dgr"].update(port=self._resolve(d.port), baudrate=d.baudrate, timeout_ms=d.timeout_ms,
                               retries=d.retries, heartbeat_seconds=d.heartbeat_seconds)
        else:
            data["dgr"]["port"] = str(self.workdir / "no-dgr-on-this-rig")
        path = self.workdir / (f"{name}.toml" if name else "board.toml")
        path.write_text(f"# Written by hil_tests/rig.py for {self.config.describe()}\n" + tomli_w.dumps(data))
        load_config(path)  # the firmware must accept it
        return path

    def frame_recorder(self, exchange) -> None:
        """A MeterBus ``frame_trace`` callback: on a real bench, the drivers' view of the frames
        goes into the report's frame_trace."""
        for line in exchange.describe():
            self._driver_frames.append(f"meter {line}")

    def meter_set(self, **options):
        """The firmware's MeterSet built from :meth:`board_config` (after :meth:`meter_bus`)."""
        from firmware.drivers.meter import MeterSet

        self.meter_bus()
        return MeterSet.from_config(load_config(self.board_config()), frame_trace=self.frame_recorder, **options)

    def dgr_client(self, **options):
        """The firmware's DgrClient built from :meth:`board_config` (after :meth:`dgr`)."""
        from firmware.drivers.dgr import DgrClient

        self.dgr()
        return DgrClient(load_config(self.board_config()).dgr, **options)

    def power_cycle(self, resource: str) -> None:
        """Cut a device's power and restore it (feature ``power-cycle``): ``"dgr"`` or
        ``"meter_bus"``. Emulators are stopped hard and started afresh; a bench switches the
        device off and on with its ``[power.<resource>]`` driver and waits ``settle_s``."""
        if "power-cycle" not in self.config.features:
            raise RigError(f"{self.config.describe()}: no power-cycle feature")
        if resource not in ("dgr", "meter_bus"):
            raise ValueError(f"resource: expected 'dgr' or 'meter_bus', found {resource!r}")
        if self.config.emulated:
            (self.dgr if resource == "dgr" else self.meter_bus)()
            self._backends[resource].emulator.power_cycle()
            return
        driver = self.config.power.get(resource)
        if driver is None:
            raise RigError(f"{self.config.path}: no [power.{resource}] driver")
        try:
            driver.cycle()
        except PowerError as exc:
            raise RigError(f"{self.config.path}: {exc}") from None

    # -- teardown and the report ---------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop everything this test started; returns what was left behind (empty when clean)."""
        if self._closed:
            return []
        self._closed = True
        problems: list[str] = []
        for board in self._boards.values():  # the daemons first: they hold the devices' ports
            problems.extend(board.close())
        for backend in self._backends.values():
            try:
                problems.extend(backend.emulator.stop())
            except Exception as exc:  # noqa: BLE001 - the other resources must still be stopped
                problems.append(f"{backend.name} emulator did not stop: {exc!r}")
            finally:
                self._console.lines.extend(backend.emulator.console())
                pid = backend.line.pid
                backend.line.stop()
                if pid is not None and _alive(pid):
                    problems.append(f"socat (pid {pid}) of the {backend.name} line still running")
                for end in (backend.line.device_end, backend.line.emulator_end):
                    if end.is_symlink() or end.exists():
                        problems.append(f"{end} still exists after the {backend.name} line stopped")
        problems.extend(self._stop_ledger())
        for tap in self._taps:
            tap.remove()
        return problems

    def console_log(self, max_chars: int = REPORT_CHARS) -> str:
        if not self.config.emulated:
            return ("not captured on this rig: emulators = none (a real bench); "
                    "the devices' own consoles are not read by the rig")
        if not self._backends and not self._console.lines:
            return "(no emulator was started by this test)"
        return tail("\n".join(self._console.lines), max_chars) or "(the emulators printed nothing)"

    def frame_trace(self, max_chars: int = REPORT_CHARS) -> str:
        if not self.config.emulated:
            lines = list(self._driver_frames) + list(self._dgr_frames.lines)
            if not lines:
                return ("not captured on this rig: emulators = none, and the test used no rig-built driver "
                        "(Rig.meter_set / MeterBus frame_trace, or the DGR driver's log)")
            return tail("driver's view (no line tap on a real bench):\n" + "\n".join(lines), max_chars)
        if not self._backends:
            return "(no serial line was started by this test)"
        budget = max_chars // len(self._backends)
        parts = []
        for backend in self._backends.values():
            line = backend.line
            parts.append(f"== {backend.name} {line.device_end} (dgc>dev: written by the DGC's driver, "
                         f"dev>dgc: by the {'router' if backend.name == 'dgr' else 'meters'}) ==\n"
                         + (line.read_trace(budget, text=backend.text_trace) or "(no traffic)"))
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
