"""Emulator backends: what runs behind a resource on an emulated rig.

* ``cpython``: the pymodbus meter emulator (MeterEmulatorThread) and the DGR emulator, each in
  the test process on its own loop thread;
* ``micropython``: the bench-board code under the MicroPython Unix port, one board process per
  resource, driven over its console (the channel an engineer uses on a real board).

Each backend has the same surface for tests: meter values and counters (:class:`MeterControl`),
the router's control (the DgrEmulator surface, or :class:`BoardRouterControl`), ``power_cycle``,
``stop`` (what did not stop cleanly) and ``console`` (what it printed).
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from .rigfile import MeterBusSpec, RigError

# --- meter bus backends -----------------------------------------------------------------------------


class LiveValues:
    """A meter's live values, set from the test's thread and pulled by the emulator's."""

    def __init__(self, values: Mapping[str, float]):
        self._lock = threading.Lock()
        self._values = dict(values)
        self._source: Callable[[], Mapping[str, float]] | None = None

    def follow(self, source: Callable[[], Mapping[str, float]] | None) -> None:
        """Serve what ``source()`` returns on each read (counters that grow with time, say);
        values set afterwards override it. None: back to the set values."""
        with self._lock:
            self._source, self._values = source, ({} if source is not None else self._values)

    def set(self, **quantities: float) -> None:
        with self._lock:
            self._values.update(quantities)

    def remove(self, quantity: str) -> None:
        with self._lock:
            self._values.pop(quantity, None)

    def __call__(self) -> dict[str, float]:
        with self._lock:
            source, values = self._source, dict(self._values)
        return {**source(), **values} if source is not None else values


class MeterControl:
    """Emulator control of a meter bus (feature ``emulator-control``): live values by unit id,
    and requests/answers per unit id as counted by the emulator (from the frames that arrived)."""

    def set(self, unit_id: int, **quantities: float) -> None:
        raise NotImplementedError

    def remove(self, unit_id: int, quantity: str) -> None:
        raise NotImplementedError

    @property
    def requests(self) -> collections.Counter:
        raise NotImplementedError

    @property
    def answers(self) -> collections.Counter:
        raise NotImplementedError

    def inject(self, unit_id: int | None, kind: str, count: int = 1, **params: Any) -> None:
        """Line-level Modbus faults (feature ``modbus-fault-injection``)."""
        raise RigError(f"{type(self).__name__}: no line-level Modbus fault injection on this rig")

    def follow(self, unit_id: int, source: Callable[[], Mapping[str, float]]) -> None:
        """The meter serves ``source()`` on every read (a counter growing with time)."""
        raise RigError(f"{type(self).__name__}: the meters' values are set, not computed per read, on this rig")

    def power_cycle(self) -> None:
        raise NotImplementedError

    def stop(self) -> list[str]:
        """Stop the emulator; returns what did not stop cleanly."""
        raise NotImplementedError

    def console(self) -> list[str]:
        return []


class _CpythonMeters(MeterControl):
    """The pymodbus meter emulator on its own loop thread (MeterEmulatorThread)."""

    def __init__(self, spec: MeterBusSpec, emulator_end: str):
        self.spec, self.emulator_end = spec, emulator_end
        self.values = {m.unit_id: LiveValues(m.values) for m in spec.meters}
        self.emulator = None
        self._thread = None
        self._start()

    def _start(self) -> None:
        from host_tools.emulators.meter_emulator import EmulatedMeter, MeterEmulator, MeterEmulatorThread

        self.emulator = MeterEmulator(self.emulator_end, self.spec.baudrate,
                                      {m.unit_id: EmulatedMeter(m.model, self.values[m.unit_id]) for m in self.spec.meters},
                                      parity=self.spec.parity, stopbits=self.spec.stopbits, bytesize=self.spec.bytesize)
        self._thread = MeterEmulatorThread(self.emulator).start()

    def set(self, unit_id: int, **quantities: float) -> None:
        self.values[unit_id].set(**quantities)

    def remove(self, unit_id: int, quantity: str) -> None:
        self.values[unit_id].remove(quantity)

    @property
    def requests(self) -> collections.Counter:
        return self.emulator.requests

    @property
    def answers(self) -> collections.Counter:
        return self.emulator.answers

    def inject(self, unit_id: int | None, kind: str, count: int = 1, **params: Any) -> None:
        self.emulator.inject(unit_id, kind, count, **params)

    def follow(self, unit_id: int, source: Callable[[], Mapping[str, float]]) -> None:
        self.values[unit_id].follow(source)

    def power_cycle(self) -> None:
        """The emulator goes away and a new one starts (fresh request counters and faults; the
        values, like a meter's non-volatile counters, stay)."""
        self._thread.stop()
        self._start()

    def stop(self) -> list[str]:
        problems = []
        if self._thread is not None:
            try:
                self._thread.stop()
            except Exception as exc:  # noqa: BLE001 - reported as a teardown problem
                problems.append(f"meter emulator: {exc}")
            self._thread = None
        if any(t.name.startswith("meter-emulator") and t.name.endswith(self.emulator_end) for t in threading.enumerate()):
            problems.append(f"meter emulator thread for {self.emulator_end} still running")
        return problems


class _BoardCounters:
    """Requests and answers per unit id from a MicroPython board's ``@meter req`` trace lines;
    the board prints a request's line before writing its answer, and reading syncs first."""

    def __init__(self):
        self.requests: collections.Counter = collections.Counter()
        self.answers: collections.Counter = collections.Counter()

    def on_line(self, line: str) -> None:
        parts = line.split()
        if parts[:2] == ["@meter", "req"] and len(parts) >= 7:
            unit = int(parts[2])
            self.requests[unit] += 1
            if parts[6] != "silent":
                self.answers[unit] += 1


class _BoardSet:
    """One MicroPython board process per resource, and the ones it replaced (power cycles)."""

    def __init__(self, build, config: dict, workdir: Path, name: str, listeners: list[Callable[[str], None]]):
        from host_tools.emulators import mpy_build as mb

        self._mb, self.build, self.config, self.workdir, self.name = mb, build, config, workdir, name
        self.listeners = listeners
        self.previous: list = []
        self.board = self._boot(name)

    def _boot(self, name: str):
        board = self._mb.BoardProcess(self.build, self.config, self.workdir, name=name)
        for listener in self.listeners:
            board.on_trace(listener)
        return board.start()

    def command(self, text: str, timeout_s: float = 5.0) -> str:
        return self.board.command(text, timeout_s=timeout_s)

    def power_cycle(self) -> None:
        """SIGKILL (no goodbye, ports not closed by the board), then boot a new process."""
        self.board.kill()
        self.previous.append(self.board)
        self.board = self._boot(f"{self.name}-{len(self.previous) + 1}")

    def stop(self) -> list[str]:
        status = self.board.stop()
        if status != 0:
            return [f"{self.board.name} did not quit cleanly (status {status}):\n{self.board.log_tail(20)}"]
        return []

    def console(self) -> list[str]:
        lines = []
        for board in (*self.previous, self.board):
            lines.extend(f"[{board.name}] {line}" for line in board.log)
        return lines


class _OnBoards:
    """A backend served by a MicroPython board process (``self.boards``): power cycle, stop and
    console are the board's."""

    boards: _BoardSet

    def power_cycle(self) -> None:
        self.boards.power_cycle()

    def stop(self) -> list[str]:
        return self.boards.stop()

    def console(self) -> list[str]:
        return self.boards.console()


class _MicroPythonMeters(_OnBoards, MeterControl):
    """The bench board's Modbus slave under the MicroPython Unix port, driven over its console."""

    def __init__(self, spec: MeterBusSpec, emulator_end: str, build, workdir: Path):
        from host_tools.emulators import mpy_build as mb

        self._counters = _BoardCounters()
        units = [mb.meter_unit(m.unit_id, m.model, m.values) for m in spec.meters]
        config = {"meter": mb.meter_service(port=emulator_end, baudrate=spec.baudrate, units=units, parity=spec.parity,
                                            stopbits=spec.stopbits, bytesize=spec.bytesize, trace=True)}
        self.boards = _BoardSet(build, config, workdir, "meter-board", [self._counters.on_line])

    def set(self, unit_id: int, **quantities: float) -> None:
        pairs = " ".join(f"{key}={float(value)!r}" for key, value in quantities.items())
        self.boards.command(f"meter set {unit_id} {pairs}")

    def remove(self, unit_id: int, quantity: str) -> None:
        self.boards.command(f"meter remove {unit_id} {quantity}")

    @property
    def requests(self) -> collections.Counter:
        self.boards.command("ping")
        return collections.Counter(self._counters.requests)

    @property
    def answers(self) -> collections.Counter:
        self.boards.command("ping")
        return collections.Counter(self._counters.answers)



# --- DGR backends -----------------------------------------------------------------------------------


class _CpythonDgr:
    """The CPython DGR emulator in its own asyncio loop thread; ``control`` is the emulator."""

    def __init__(self, emulator_end: str, settings: Mapping[str, Any], sink: list):
        self.emulator_end, self.settings, self.sink = emulator_end, dict(settings), sink
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"rig-dgr-loop {emulator_end}", daemon=True)
        self.thread.start()
        self.control = None
        try:
            self._start()
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(5)

    def _start(self) -> None:
        from host_tools.emulators.dgr_emulator import DgrEmulator

        emulator = DgrEmulator(self.emulator_end, energy_sink=lambda d, e: self.sink.append((d, e)), **self.settings)
        self._run(emulator.start())
        self.control = emulator

    def power_cycle(self) -> None:
        """A new router on the same line: session, transfers, answer window and counters are
        gone, and it says BOOT, as after a real power cut."""
        self._run(self.control.stop())
        self._start()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()

    def stop(self) -> list[str]:
        problems = []
        try:
            self._run(self.control.stop())
        except Exception as exc:  # noqa: BLE001 - reported as a teardown problem
            problems.append(f"DGR emulator: {exc!r}")
        finally:
            self._stop_loop()
        if self.thread.is_alive():
            problems.append(f"DGR emulator loop thread for {self.emulator_end} still running")
        return problems

    def console(self) -> list[str]:
        return []


class BoardRouterControl:
    """The DgrEmulator surface the DGR tests use (``snapshot()``, ``mode``, ``reboot()``,
    ``inject_raw()``, the ``drop_next_*``/``corrupt_next_checksums``/``reply_delay_s``
    settings), over a MicroPython board's console."""

    def __init__(self, boards: _BoardSet):
        self._boards = boards

    def _set(command: str, scale: float = 1):  # noqa: N805 - a property factory
        def setter(self, value) -> None:
            self._boards.command(f"dgr {command} {round(value * scale)}")
        return property(None, setter)

    drop_next_requests = _set("drop_requests")
    drop_next_replies = _set("drop_replies")
    corrupt_next_checksums = _set("corrupt")
    reply_delay_s = _set("delay_ms", 1000)
    del _set

    def snapshot(self):
        from host_tools.emulators.mpy_build import dgr_state_from_board

        return dgr_state_from_board(json.loads(self._boards.command("dgr snapshot")))

    @property
    def mode(self) -> str:
        return self._boards.command("dgr mode")

    def reboot(self) -> None:
        self._boards.command("dgr reboot")

    def inject_raw(self, data: bytes) -> None:
        self._boards.command("dgr inject " + bytes(data).hex(), timeout_s=10)

    def inject_fault(self, code: str) -> None:
        self._boards.command(f"dgr fault {code}")


class _MicroPythonDgr(_OnBoards):
    """The bench board's router under the MicroPython Unix port; ``sink`` from ``@dgr sink``."""

    def __init__(self, emulator_end: str, settings: Mapping[str, Any], sink: list, build, workdir: Path):
        from host_tools.emulators import mpy_build as mb
        from host_tools.emulators.dgr_emulator import ENERGY_QUANTUM_PER_WH

        def on_line(line: str) -> None:
            parts = line.split()
            if parts[:2] == ["@dgr", "sink"] and len(parts) >= 4:
                sink.append((parts[2], int(parts[3]) / ENERGY_QUANTUM_PER_WH))

        hb_ms = round(settings.get("heartbeat_timeout_s", 10.0) * 1000)
        config = {"dgr": mb.dgr_service(port=emulator_end, heartbeat_timeout_ms=hb_ms, command_log=300, trace=True)}
        self.boards = _BoardSet(build, config, workdir, "dgr-board", [on_line])
        self.control = BoardRouterControl(self.boards)
        self.sink = sink



