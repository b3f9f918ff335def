"""The bench house's net-only interchange meter (issue 7 m): increments of one DGR integration
step are netted, as on a real bidirectional meter; the gross meter keeps both directions."""

from __future__ import annotations

import asyncio

from host_tools.emulators.bench_house import NetInterchange
from host_tools.emulators.house_model import HouseModel, HouseParams


def _run(feed) -> HouseModel:
    model = HouseModel(HouseParams(), 0.0)

    async def main():
        net = NetInterchange(model, lambda: 0.0, asyncio.get_running_loop())
        for step in feed:
            for direction, wh in step:  # one step's increments arrive in one loop turn
                net.add(direction, wh)
            await asyncio.sleep(0)  # the next turn: the step is flushed
        await asyncio.sleep(0)

    asyncio.run(main())
    return model


def test_simultaneous_export_and_import_cancel_on_a_net_meter():
    model = _run([[("export", 1.0), ("import", 0.25)]] * 8)
    q = model.interchange_quantities()
    assert q["export_energy_wh"] == 6.0 and q["import_energy_wh"] == 0.0


def test_one_direction_at_a_time_is_counted_in_full():
    model = _run([[("export", 0.5)]] * 4 + [[("import", 0.125)]] * 8)
    q = model.interchange_quantities()
    assert q["export_energy_wh"] == 2.0 and q["import_energy_wh"] == 1.0
