"""A whole bench house in one process: house model, Modbus meters and the DGR, on virtual lines.

Why one process and one event loop: the interchange meter must count *exactly* the energy the
router moves, so the DGR emulator's energy increments feed the same house model object that
the meter emulator encodes into registers — no inter-process drift, no locking.

The virtual serial lines are linked at the ports the board config names, so the board's own
`dgc run` / `dgc meter read` open them exactly as they would open real devices.

Faults are injected by hand or by tests through the house's control socket
(``bench_control``, default ``<dgr port>.control``): ``BenchHouseControl`` turns each JSON
command into a call of the emulators' own fault APIs, on this same loop, so a fault takes
effect between two frames, never in the middle of one.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from firmware.config import BoardConfig, MeterConfig, load_config

from .bench_control import BadCommand, ControlServer, control_path_for
from .dgr_emulator import FAULT_KINDS, DgrEmulator
from .house_model import HouseModel
from .meter_emulator import MeterEmulator, MeterEmulatorError, build_meter_emulators, emulator_port_for, house_model_for
from .virtual_serial import VirtualSerialLine

log = logging.getLogger(__name__)

# The bench compresses a day into 48 slots, so router power scales with it: a real 10 kW
# router moving a half hour's energy in a 30-s bench slot must deliver 600 kW "bench watts".
REAL_ROUTER_MAX_POWER_W = 10_000


def router_max_power_w(config: BoardConfig) -> int:
    speed = max(1.0, 1800 / config.market.slot_seconds)
    return int(REAL_ROUTER_MAX_POWER_W * speed)


class NetInterchange:
    """The interchange meter as a real bidirectional meter sees it: only the net flow.

    ``[[meter]] net_only = true`` on the interchange meter (docs/board-config.md). The DGR
    emulator feeds every transfer's energy of one integration step in one call of the loop
    (``_feed_sinks``); the increments of one loop turn are summed and only the net goes to the
    house model's interchange counters, so an export and an import running at the same time
    cancel on the meter, as they do on the wire. Exact: the increments are dyadic fractions of
    a Wh (docs/dgr-protocol.md section 10).
    """

    def __init__(self, model: HouseModel, clock, loop: asyncio.AbstractEventLoop):
        self.model, self.clock, self.loop = model, clock, loop
        self.pending_wh = 0.0
        self._scheduled = False

    def add(self, direction: str, energy_wh: float) -> None:
        self.pending_wh += energy_wh if direction == "export" else -energy_wh
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        net, self.pending_wh = self.pending_wh, 0.0
        self.model.advance(self.clock())
        if net > 0:
            self.model.add_interchange("export", net)
        elif net < 0:
            self.model.add_interchange("import", -net)


class BenchHouseControl:
    """What the control channel's commands do to one bench house (runs on the bench's loop).

    Commands are plain dicts (decoded JSON); answers are dicts the channel sends back as one
    JSON line. BadCommand / ValueError name what was wrong and what was expected."""

    def __init__(self, config: BoardConfig, model: HouseModel, dgr: DgrEmulator, meters: list[MeterEmulator],
                 clock=time.monotonic):
        self.config = config
        self.model = model
        self.dgr = dgr
        self.clock = clock
        self.started_at = clock()
        by_port = {m.port: m for m in meters}
        # (meter config, the emulator serving its bus) for every configured meter that is served
        self.meters: list[tuple[MeterConfig, MeterEmulator]] = []
        for meter in config.meters:
            emulator = by_port.get(emulator_port_for(config.bus(meter.bus).port))
            if emulator is not None:
                self.meters.append((meter, emulator))

    def handle(self, command: dict) -> dict:
        if "cmd" in command:
            cmd = command["cmd"]
            if cmd == "status":
                _only(command, ("cmd",))
                return self.status()
            if cmd == "clear":
                return self.clear(command)
            raise BadCommand(f"cmd: expected status or clear, found {cmd!r}")
        if "target" not in command:
            raise BadCommand('expected {"target": "dgr" | "meter", "fault": {...}} or {"cmd": "status" | "clear"}, '
                             f"found keys {', '.join(sorted(command)) or 'none'}")
        target = command["target"]
        if target == "dgr":
            _only(command, ("target", "fault"))
            active = self.dgr.inject(_fault_of(command))
            return {"target": "dgr", "injected": command["fault"].get("kind"), "active": active}
        if target == "meter":
            _only(command, ("target", "fault", "meter", "unit_id", "bus"))
            meter, emulator = self._meter(command)
            fault = _fault_of(command)
            for key in ("op", "unit_id"):
                if key in fault:
                    raise BadCommand(f"fault: {key!r} is not a fault key; name the meter beside the fault "
                                     '("meter": NAME or "unit_id": N)')
            try:
                result = emulator.command({"op": "inject", "unit_id": meter.unit_id, **fault})
            except MeterEmulatorError as exc:
                raise BadCommand(str(exc)) from None
            return {"target": "meter", "meter": meter.name, "unit_id": meter.unit_id, "bus": meter.bus,
                    "injected": fault.get("kind"), "active": _jsonable(result["faults"].get(str(meter.unit_id)))}
        raise BadCommand(f"target: expected dgr or meter, found {target!r}")

    def clear(self, command: dict) -> dict:
        """Clear injected causes. ``counters: true`` also undoes a meter's counter_reset (a
        reset meter does not un-reset by itself, so by default its counters stay restarted)."""
        _only(command, ("cmd", "target", "kind", "meter", "unit_id", "bus", "counters"))
        counters = command.get("counters", False)
        if not isinstance(counters, bool):
            raise BadCommand(f"counters: expected true or false, found {counters!r}")
        target = command.get("target")
        if target not in (None, "dgr", "meter"):
            raise BadCommand(f"target: expected dgr, meter or none (both), found {target!r}")
        kind = command.get("kind")
        names_meter = any(k in command for k in ("meter", "unit_id", "bus"))
        if names_meter and target == "dgr":
            raise BadCommand('meter, unit_id, bus: only with "target": "meter" (or no target)')
        if names_meter:
            target = "meter"
        if kind is not None and target != "dgr":
            raise BadCommand(f'kind: only with "target": "dgr" (one of {", ".join(FAULT_KINDS)}); '
                             "meter faults are cleared per meter or all at once")
        answer: dict[str, Any] = {"cleared": []}
        if target in (None, "dgr"):
            answer["dgr_active"] = self.dgr.clear(kind)
            answer["cleared"].append("dgr" if kind is None else f"dgr:{kind}")
        if target in (None, "meter"):
            if any(k in command for k in ("meter", "unit_id", "bus")):
                chosen = [self._meter(command)]
            else:
                chosen = self.meters
            for meter, emulator in chosen:
                emulator.clear(meter.unit_id, counters=counters)
                answer["cleared"].append(f"meter:{meter.name}")
        return answer

    def _meter(self, command: dict) -> tuple[MeterConfig, MeterEmulator]:
        name, unit_id, bus = command.get("meter"), command.get("unit_id"), command.get("bus")
        if name is None and unit_id is None:
            raise BadCommand('meter: expected "meter": NAME or "unit_id": N, found neither')
        candidates = [(m, e) for m, e in self.meters
                      if (name is None or m.name == name) and (unit_id is None or m.unit_id == unit_id)
                      and (bus is None or m.bus == bus)]
        if len(candidates) == 1:
            return candidates[0]
        known = ", ".join(f"{m.name} (unit {m.unit_id} on {m.bus})" for m, _ in self.meters)
        asked = ", ".join(f"{k}={v!r}" for k, v in (("meter", name), ("unit_id", unit_id), ("bus", bus)) if v is not None)
        if not candidates:
            raise BadCommand(f"no meter matches {asked}; expected one of {known}")
        raise BadCommand(f"{asked} matches {len(candidates)} meters; add \"bus\" to choose one of {known}")

    def status(self) -> dict:
        state = self.dgr.snapshot()
        model = self.model
        meters = []
        for meter, emulator in self.meters:
            entry: dict[str, Any] = {
                "name": meter.name, "role": meter.role, "model": meter.model, "bus": meter.bus, "unit_id": meter.unit_id,
                "requests": emulator.requests.get(meter.unit_id, 0), "answers": emulator.answers.get(meter.unit_id, 0),
            }
            entry["faults"] = _jsonable(emulator.faults().get(str(meter.unit_id)))
            entry["faults_applied"] = {kind: n for (unit, kind), n in sorted(emulator.faults_applied.items())
                                       if unit == meter.unit_id}
            meters.append(entry)
        return {
            "house": self.config.board.name,
            "uptime_s": round(self.clock() - self.started_at, 3),
            "dgr": {
                "port": self.config.dgr.port,
                "mode": state.mode,
                "session": state.session,
                "link_cut": state.link_cut,
                "hb_timeout_ms": int(self.dgr.heartbeat_timeout_s * 1000),
                "faults": list(state.faults),
                "transfers": [
                    {"trade_id": t.trade_id, "direction": t.direction, "power_w": t.power_w, "end_at": t.end_at,
                     "energy_wh": t.energy_wh, "moved_wh": t.moved_wh}
                    for t in state.transfers
                ],
                "ended": [
                    {"trade_id": e.trade_id, "direction": e.direction, "energy_wh": e.energy_wh,
                     "moved_wh": e.moved_wh, "reason": e.reason, "ended_at": e.ended_at}
                    for e in state.ended[-8:]
                ],
                "export_wh": state.export_wh,
                "import_wh": state.import_wh,
                "soc_percent": state.soc_percent,
                "injected": list(state.injected),
                "counters": {**state.fault_counters, "commands": len(state.commands), "replays": state.replays,
                             "bad_lines": state.bad_lines, "events_sent": len(state.events_sent)},
                "last_commands": [f"{c.seq} {c.verb} {c.answer}" for c in state.commands[-5:]],
            },
            "meters": meters,
            "model": {
                "hour": round(model.hour, 3),
                "house_power_w": round(model.house_power_w, 1),
                "soc_percent": round(model.soc_percent, 1),
                "interchange_export_wh": model.interchange_export_wh,
                "interchange_import_wh": model.interchange_import_wh,
            },
        }


def _only(command: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(k for k in command if k not in allowed)
    if unknown:
        raise BadCommand(f"unknown key {unknown[0]!r} in this command; expected only {', '.join(allowed)}")


def _fault_of(command: dict) -> dict:
    fault = command.get("fault")
    if not isinstance(fault, dict):
        raise BadCommand(f'fault: expected an object like {{"kind": "link_cut"}}, found {fault!r}')
    return fault


def _jsonable(value):
    """Answers travel as JSON: sets and tuples become lists, other objects their str()."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


async def run_bench_house(config_path: str | Path, *, stop: asyncio.Event | None = None, status_every_s: float | None = None,
                          control_path: str | Path | None = None) -> None:
    """Serve the house until ``stop`` is set. ``control_path`` is the control socket; by default
    ``<dgr port>.control`` (next to the ports, removed on the way out)."""
    config = load_config(config_path)
    control_path = Path(control_path) if control_path else control_path_for(config.dgr.port)
    clock = time.monotonic
    model: HouseModel = house_model_for(config, clock())
    stop = stop or asyncio.Event()
    async with AsyncExitStack() as stack:
        # The control socket first: if another bench house serves this config, it says so before
        # this one relinks (and so breaks) that house's serial lines.
        control = ControlServer(control_path)
        await control.start()
        stack.push_async_callback(control.stop)
        for bus in config.buses:
            stack.enter_context(VirtualSerialLine(bus.port))
        dgr_line = stack.enter_context(VirtualSerialLine(config.dgr.port))
        meter_emulators = build_meter_emulators(config, model, clock=clock)
        for emulator in meter_emulators:
            await emulator.start()
            stack.push_async_callback(emulator.stop)

        def count_energy(direction: str, energy_wh: float) -> None:
            model.advance(clock())
            model.add_interchange(direction, energy_wh)

        interchange = config.meter_by_role("interchange")
        if getattr(interchange, "net_only", False):
            count_energy = NetInterchange(model, clock, asyncio.get_running_loop()).add

        dgr = DgrEmulator(
            str(dgr_line.emulator_end),
            energy_sink=count_energy,
            heartbeat_timeout_s=max(5.0, 3.0 * config.dgr.heartbeat_seconds),
            baudrate=config.dgr.baudrate,
            max_power_w=router_max_power_w(config),
            soc_percent=round(model.soc_percent),
            router_id=f"dgr-{config.board.name}"[:32],
        )
        await dgr.start()
        stack.push_async_callback(dgr.stop)
        control.handle = BenchHouseControl(config, model, dgr, meter_emulators, clock).handle
        print(
            f"bench house ready house={config.board.name} meter_bus={config.buses[0].port} dgr={config.dgr.port} "
            f"control={control_path} pv_peak_w={model.params.pv_peak_w:g} battery_wh={model.params.battery_capacity_wh:g} "
            f"interchange={'net' if getattr(interchange, 'net_only', False) else 'gross'}",
            flush=True,
        )
        interval = status_every_s or config.market.slot_seconds
        next_status = clock() + interval
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
            model.advance(clock())
            dgr.soc_percent = round(model.soc_percent)
            if clock() >= next_status:
                next_status += interval
                state = dgr.snapshot()
                print(
                    f"bench {config.board.name} hour={model.hour:05.2f} house_power_w={model.house_power_w:.0f} "
                    f"soc={model.soc_percent:.0f}% router={state.mode} interchange_export_wh={model.interchange_export_wh:.1f} "
                    f"interchange_import_wh={model.interchange_import_wh:.1f}",
                    flush=True,
                )


def serve_forever(config_path: str | Path, *, control_path: str | Path | None = None) -> int:
    """Run until SIGTERM/SIGINT; the virtual lines and the control socket are removed on the way out."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await run_bench_house(config_path, stop=stop, control_path=control_path)

    asyncio.run(main())
    return 0
