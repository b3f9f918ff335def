"""Power drivers: how a real bench cuts a device's power and restores it (feature ``power-cycle``).

labgrid's PowerProtocol at this project's scale: a driver has ``off()``, ``on()`` and ``cycle()``,
and the rig file's ``[power.<resource>]`` table says which driver and with what settings. Every
driver runs a program with an argument list — never a shell string — so a path with a space, a
quote or a ``;`` in a rig file cannot turn into another command, and each failure names the
program, its exit status and what it printed.

Drivers:

* ``uhubctl``: per-port power switching of a USB hub (``uhubctl --location 1-1 --ports 3
  --action off``); what the example bench uses for an RP2040 bench board powered from the hub;
* ``command``: any programs for ``off`` and ``on`` (argument lists), e.g. a relay board's tool.

The emulated rigs have no driver: the rig replaces the emulator itself (rig/backends.py).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

DRIVERS = ("uhubctl", "command")
POWER_RESOURCES = ("meter_bus", "dgr")


class PowerError(Exception):
    """A power switch that could not be driven: names the program, its status and its output."""


Runner = Callable[[Sequence[str], float], subprocess.CompletedProcess]


def _run(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


@dataclass(frozen=True)
class PowerDriver:
    """One device's power switch: ``off`` and ``on`` argument lists, ``off_s`` seconds off in a
    cycle, ``settle_s`` seconds after power returns for the device to boot and open its ports."""

    resource: str
    driver: str
    off_argv: tuple[str, ...]
    on_argv: tuple[str, ...]
    off_s: float = 2.0
    settle_s: float = 2.0
    timeout_s: float = 60.0

    def _do(self, what: str, argv: tuple[str, ...], run: Runner) -> None:
        try:
            result = run(argv, self.timeout_s)
        except FileNotFoundError:
            raise PowerError(f"power {what} of {self.resource}: {argv[0]!r} not found (install it or fix "
                             f"[power.{self.resource}])") from None
        except subprocess.TimeoutExpired:
            raise PowerError(f"power {what} of {self.resource}: {argv[0]} did not finish within {self.timeout_s} s") from None
        if result.returncode != 0:
            output = (result.stderr or result.stdout or "").strip()[-500:]
            raise PowerError(f"power {what} of {self.resource}: {' '.join(argv)} exited {result.returncode}: {output}")

    def off(self, run: Runner = _run) -> None:
        self._do("off", self.off_argv, run)

    def on(self, run: Runner = _run, sleep: Callable[[float], None] = time.sleep) -> None:
        self._do("on", self.on_argv, run)
        sleep(self.settle_s)

    def cycle(self, run: Runner = _run, sleep: Callable[[float], None] = time.sleep) -> None:
        """Off, ``off_s`` seconds, on, ``settle_s`` seconds. Power is switched back on even when
        the wait is interrupted, so a failed test never leaves a device unpowered."""
        self.off(run)
        try:
            sleep(self.off_s)
        finally:
            self.on(run, sleep)


def power_driver(path: Path, resource: str, table: dict[str, Any], settle_s: float) -> PowerDriver:
    """A driver from a rig file's ``[power.<resource>]`` table; ValueError says what was wrong
    (the rig file parser turns it into a RigError naming the file)."""
    where = f"[power.{resource}]"
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table with driver = {' or '.join(map(repr, DRIVERS))}, found {table!r} "
                         "(a shell string is no longer accepted: see docs/bench.md, Power)")
    driver = table.get("driver")
    allowed = {"uhubctl": ("driver", "location", "ports", "off_s", "settle_s"),
               "command": ("driver", "off", "on", "off_s", "settle_s")}
    if driver not in allowed:
        raise ValueError(f"{where} driver: expected one of {', '.join(DRIVERS)}, found {driver!r}")
    unknown = sorted(set(table) - set(allowed[driver]))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} for driver {driver!r}; expected {', '.join(allowed[driver])}")

    def seconds(key: str, default: float) -> float:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 120:
            raise ValueError(f"{where} {key}: expected seconds from 0 to 120, found {value!r}")
        return float(value)

    if driver == "uhubctl":
        location, ports = table.get("location"), table.get("ports")
        if not isinstance(location, str) or not location:
            raise ValueError(f"{where} location: expected the hub's location as uhubctl lists it (e.g. \"1-1\"), "
                             f"found {location!r}")
        if isinstance(ports, int) and not isinstance(ports, bool):
            ports = str(ports)
        if not isinstance(ports, str) or not all(p.isdigit() for p in ports.split(",")):
            raise ValueError(f"{where} ports: expected a port number or a list such as \"3\" or \"2,3\", found {ports!r}")
        base = ("uhubctl", "--location", location, "--ports", ports, "--action")
        off_argv, on_argv = base + ("off",), base + ("on",)
    else:
        def argv(key: str) -> tuple[str, ...]:
            value = table.get(key)
            if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
                raise ValueError(f"{where} {key}: expected a program and its arguments as a list of strings "
                                 f"(e.g. [\"usbrelay\", \"BITFT_1=0\"]), found {value!r}")
            return tuple(value)
        off_argv, on_argv = argv("off"), argv("on")
    return PowerDriver(resource=resource, driver=driver, off_argv=off_argv, on_argv=on_argv,
                       off_s=seconds("off_s", 2.0), settle_s=seconds("settle_s", settle_s))
