"""The HIL rig: one file says which devices the hardware-in-the-loop tests talk to, and where.

labgrid's idea at this project's scale: a *rig file* (TOML) names the resources — the meter
bus (port, serial format, which meter is at which unit id), the DGR link, the ledger — and what
the rig can do (its *features*). ``pytest --rig FILE`` (or ``DGC_RIG=FILE``) chooses it; the
default is ``hil_tests/rigs/default.toml``. The same tests then run against:

* ``[emulators] kind = "cpython"``: the pymodbus meter emulator and the DGR emulator, each
  behind a socat pty pair created for the test (the default rig);
* ``kind = "micropython"``: the bench-board emulators (``host_tools/emulators/micropython``),
  compiled with mpy-cross and run under the MicroPython Unix port on the same kind of ptys
  (``host_tools/emulators/mpy_build.py``);
* ``kind = "none"``: a real bench. Nothing is started; the ports are real devices.

Resources vs drivers: the rig says *where*; tests build the firmware's own drivers
(``MeterSet``, ``DgrClient``) from a board config the rig writes (``board_configs/sim.toml``
with the rig's ports, serial format and meters): :meth:`Rig.board_config`.

Features (``FEATURES``): a test declares what it needs with
``@pytest.mark.rig_features("emulator-control", ...)`` and is skipped, with a reason naming
the rig and the missing features, on a rig without them. A rig file may only declare what its
kind can provide (``KIND_FEATURES``): the MicroPython boards, for instance, have no line-level
Modbus fault injection, and a pty has no RS-485 timing.

Report: every test that uses the rig (the ``hil_rig`` fixture) gets the JUnit XML properties
``rig_file``, ``rig_name``, ``rig_features``, ``console_log`` (what the emulators printed
during the test) and ``frame_trace`` (the bytes on the serial lines during the test, in hex,
from socat; on a real bench what the drivers saw), each bounded to the newest 8 KiB.

Markers: ``rig_features(*names)``; ``rig_portable`` is added to every test that uses the rig,
so ``-m rig_portable`` selects the device tests that run on any rig (the second pass of
``make test``). See docs/bench.md for the file format with a real bench.

The package, one concern per module:

* ``rigfile``: the rig file (parsing, checking, features);
* ``power``: power drivers of a real bench (argument lists, never a shell string);
* ``place``: place locking (two engineers, one bench);
* ``backends``: the emulators behind the resources (CPython, MicroPython boards);
* ``resources``: what tests get (ports, serial formats, the emulators' control);
* ``report``: bounded text and captured logs for the JUnit report;
* ``core``: :class:`Rig`, the one rig type every HIL test uses;
* ``strategies``: labgrid-style state machines that bring the board to "flashed",
  "provisioned" and "trading";
* ``plugin``: the pytest plugin (``--rig``, markers, the ``hil_rig`` fixture).
"""

from __future__ import annotations

from .backends import BoardRouterControl, LiveValues, MeterControl
from .core import Rig
from .place import PlaceBusy, PlaceLock
from .power import PowerDriver, PowerError
from .resources import DgrResource, MeterBusResource
from .rigfile import (
    BUS_NAME,
    DEFAULT_RIG,
    FEATURES,
    KIND_FEATURES,
    REPO,
    RIG_ENV,
    RIGS_DIR,
    DgrSpec,
    MeterBusSpec,
    RigConfig,
    RigError,
    RigMeter,
    load_rig,
    missing_reason,
)

__all__ = [
    "BUS_NAME", "DEFAULT_RIG", "FEATURES", "KIND_FEATURES", "REPO", "RIG_ENV", "RIGS_DIR",
    "BoardRouterControl", "DgrResource", "DgrSpec", "LiveValues", "MeterBusResource", "MeterBusSpec", "MeterControl",
    "PlaceBusy", "PlaceLock", "PowerDriver", "PowerError", "Rig", "RigConfig", "RigError", "RigMeter",
    "load_rig", "missing_reason",
]
