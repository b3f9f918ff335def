"""A whole bench house in one process: house model, Modbus meters and the DGR, on virtual lines.

Why one process and one event loop: the interchange meter must count *exactly* the energy the
router moves, so the DGR emulator's energy increments feed the same house model object that
the meter emulator encodes into registers — no inter-process drift, no locking.

The virtual serial lines are linked at the ports the board config names, so the board's own
`dgc run` / `dgc meter read` open them exactly as they would open real devices.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from contextlib import AsyncExitStack
from pathlib import Path

from firmware.config import BoardConfig, load_config

from .dgr_emulator import DgrEmulator
from .house_model import HouseModel
from .meter_emulator import build_meter_emulators, house_model_for
from .virtual_serial import VirtualSerialLine

log = logging.getLogger(__name__)

# The bench compresses a day into 48 slots, so router power scales with it: a real 10 kW
# router moving a half hour's energy in a 30-s bench slot must deliver 600 kW "bench watts".
REAL_ROUTER_MAX_POWER_W = 10_000


def router_max_power_w(config: BoardConfig) -> int:
    speed = max(1.0, 1800 / config.market.slot_seconds)
    return int(REAL_ROUTER_MAX_POWER_W * speed)


async def run_bench_house(config_path: str | Path, *, stop: asyncio.Event | None = None, status_every_s: float | None = None) -> None:
    config = load_config(config_path)
    clock = time.monotonic
    model: HouseModel = house_model_for(config, clock())
    stop = stop or asyncio.Event()
    async with AsyncExitStack() as stack:
        for bus in config.buses:
            stack.enter_context(VirtualSerialLine(bus.port))
        dgr_line = stack.enter_context(VirtualSerialLine(config.dgr.port))
        for emulator in build_meter_emulators(config, model, clock=clock):
            await emulator.start()
            stack.push_async_callback(emulator.stop)

        def count_energy(direction: str, energy_wh: float) -> None:
            model.advance(clock())
            model.add_interchange(direction, energy_wh)

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
        print(
            f"bench house ready house={config.board.name} meter_bus={config.buses[0].port} dgr={config.dgr.port} "
            f"pv_peak_w={model.params.pv_peak_w:g} battery_wh={model.params.battery_capacity_wh:g}",
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


def serve_forever(config_path: str | Path) -> int:
    """Run until SIGTERM/SIGINT; the virtual lines are removed on the way out."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await run_bench_house(config_path, stop=stop)

    asyncio.run(main())
    return 0
