"""Resources: what a test gets from the rig — where a device is (its port), its serial format,
and on an emulated rig the emulator's control. The firmware's own config objects are built from
them (``bus_config``, ``meter_configs``, ``dgr_config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from firmware.config import BusConfig, DgrConfig, MeterConfig

from .backends import MeterControl
from .rigfile import BUS_NAME, DgrSpec, MeterBusSpec, RigMeter

# --- resources (what tests get) -----------------------------------------------------------------------


class _Port:
    """Where a resource is: ``port`` (``device_end``, the path the driver opens) and its baud rate."""

    port: str
    spec: Any

    @property
    def device_end(self) -> Path:
        return Path(self.port)

    @property
    def baudrate(self) -> int:
        return self.spec.baudrate


class MeterBusResource(_Port):
    """The rig's meter bus: where it is (``port``), its serial format and meters, and on an
    emulated rig the emulator's ``control`` (None on a real bench)."""

    def __init__(self, spec: MeterBusSpec, port: str, control: MeterControl | None):
        self.spec, self.port, self.control = spec, port, control


    @property
    def meters(self) -> tuple[RigMeter, ...]:
        return self.spec.meters

    def find(self, *, model: str | None = None, unit_id: int | None = None, role: str | None = None) -> RigMeter | None:
        for meter in self.spec.meters:
            if (model in (None, meter.model) and unit_id in (None, meter.unit_id) and role in (None, meter.role)):
                return meter
        return None

    def bus_config(self, **overrides) -> BusConfig:
        values = dict(name=BUS_NAME, port=self.port, **self.spec.serial_settings())
        values.update(overrides)
        return BusConfig(**values)

    def meter_configs(self) -> tuple[MeterConfig, ...]:
        return tuple(MeterConfig(name=m.name, bus=BUS_NAME, unit_id=m.unit_id, model=m.model, role=m.role)
                     for m in self.spec.meters)


class DgrResource(_Port):
    """The rig's DGR link: ``port``, and on an emulated rig the router's ``control`` (a
    DgrEmulator, or its MicroPython counterpart) and ``sink``: every energy increment the
    router reported moving, as (direction, Wh)."""

    def __init__(self, spec: DgrSpec, port: str, backend, settings: Mapping[str, Any]):
        self.spec, self.port, self._backend, self.settings = spec, port, backend, dict(settings)
        self.sink: list[tuple[str, float]] = backend.sink if backend is not None else []


    @property
    def control(self):
        return self._backend.control if self._backend is not None else None

    def dgr_config(self, **overrides) -> DgrConfig:
        values = dict(port=self.port, baudrate=self.spec.baudrate, timeout_ms=self.spec.timeout_ms,
                      retries=self.spec.retries, heartbeat_seconds=self.spec.heartbeat_seconds)
        values.update(overrides)
        return DgrConfig(**values)


class _Backend:
    """A started emulator and its line, for teardown and the report."""

    def __init__(self, name: str, line, emulator, text_trace: bool):
        self.name, self.line, self.emulator, self.text_trace = name, line, emulator, text_trace


