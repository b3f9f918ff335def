"""The bench house model: pure, deterministic, time-compressed; interchange counted exactly."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from host_tools.emulators.house_model import HouseModel, HouseParams, load_w, pv_w

BENCH_DAY_S = 30 * 48  # the sim board: 30-second slots, 48 a day
SIM_TOML = Path(__file__).resolve().parents[1] / "board_configs" / "sim.toml"


def _run(params: HouseParams, wall_s: float, calls: int = 1, start_s: float = 1000.0) -> HouseModel:
    model = HouseModel(params, start_s)
    for i in range(1, calls + 1):
        model.advance(start_s + wall_s * i / calls)
    return model


def _counters(m: HouseModel) -> tuple[float, ...]:
    return (m.house_import_wh, m.house_export_wh, m.pv_energy_wh, m.load_energy_wh, m.soc_percent)


def test_same_inputs_same_outputs():
    params = HouseParams(load_peak_w=1500, pv_peak_w=4000, battery_capacity_wh=5000, day_seconds=BENCH_DAY_S)
    assert _counters(_run(params, 700, calls=37)) == _counters(_run(params, 700, calls=37))


def test_a_bench_day_holds_the_energy_of_a_real_day():
    real = _run(HouseParams(load_peak_w=1200, pv_peak_w=3000), 86_400)
    bench = _run(HouseParams(load_peak_w=1200, pv_peak_w=3000, day_seconds=BENCH_DAY_S), BENCH_DAY_S)
    assert _counters(bench) == pytest.approx(_counters(real), rel=1e-9)
    assert bench.hour == pytest.approx(9.0)  # a whole day later, same time of day


def test_one_bench_slot_holds_a_real_half_hour():
    """A 30 s slot on the bench = 30 simulated minutes: energy = mean power x 0.5 h."""
    params = HouseParams(load_peak_w=1200, pv_peak_w=0, day_seconds=BENCH_DAY_S, start_hour=19.0)
    model = _run(params, 30)
    mean_load_w = sum(load_w(params, 19.0 + (i + 0.5) / 1000 * 0.5) for i in range(1000)) / 1000
    assert model.house_import_wh == pytest.approx(mean_load_w * 0.5, rel=1e-4)
    assert 550 < model.house_import_wh < 600  # ~1.15 kW for half an hour
    assert model.hour == pytest.approx(19.5)


def test_result_barely_depends_on_the_callers_rhythm():
    params = HouseParams(load_peak_w=1200, pv_peak_w=3000, day_seconds=BENCH_DAY_S)
    coarse, fine = _run(params, 600, calls=1), _run(params, 600, calls=600)
    assert coarse.house_export_wh == pytest.approx(fine.house_export_wh, rel=1e-3)
    assert coarse.house_import_wh == pytest.approx(fine.house_import_wh, rel=1e-3, abs=0.5)


def test_pv_house_has_a_surplus_right_away_at_the_default_start():
    params = HouseParams(load_peak_w=1200, pv_peak_w=3000, day_seconds=BENCH_DAY_S)
    model = HouseModel(params, 0.0)
    assert model.hour == 9.0
    assert model.house_power_w < -500  # exporting at 09:00
    model.advance(30.0)  # one bench slot
    assert model.house_import_wh == 0.0
    assert model.house_export_wh > 400


def test_load_curve_peaks():
    params = HouseParams(load_peak_w=1000)
    day = [load_w(params, h / 10) for h in range(240)]
    assert max(day) == pytest.approx(1000, rel=0.01)
    assert 18.5 <= day.index(max(day)) / 10 <= 19.5  # evening peak
    assert load_w(params, 7.5) > 2 * load_w(params, 3.0)  # morning peak over night base
    assert load_w(params, 7.5) < load_w(params, 19.0)
    assert load_w(params, 23.9) == pytest.approx(load_w(params, -0.1 % 24))  # wraps over midnight


def test_pv_bell_over_daylight_only():
    params = HouseParams(pv_peak_w=3000)
    assert pv_w(params, 12.0) == pytest.approx(3000)
    assert pv_w(params, 9.0) == pytest.approx(pv_w(params, 15.0))
    assert all(pv_w(params, h) == 0.0 for h in (0.0, 3.0, 6.0, 18.0, 21.0))
    assert pv_w(HouseParams(pv_peak_w=0), 12.0) == 0.0


def test_house_without_pv_only_imports():
    model = _run(HouseParams(load_peak_w=800, day_seconds=BENCH_DAY_S), BENCH_DAY_S, calls=48)
    assert model.house_export_wh == 0.0
    assert model.house_import_wh == pytest.approx(model.load_energy_wh)
    assert 5000 < model.house_import_wh < 10_000  # a modest house, 5-10 kWh a day


def test_energy_balance_with_battery():
    params = HouseParams(load_peak_w=1200, pv_peak_w=4000, battery_capacity_wh=6000, battery_soc_percent=50,
                         day_seconds=BENCH_DAY_S)
    model = _run(params, BENCH_DAY_S, calls=100)
    stored_wh = (model.soc_percent - 50) / 100 * 6000
    net = model.house_import_wh - model.house_export_wh
    assert net == pytest.approx(model.load_energy_wh - model.pv_energy_wh + stored_wh, abs=1e-6)


def test_battery_absorbs_surplus_and_covers_the_evening():
    base = dict(load_peak_w=1200, pv_peak_w=4000, day_seconds=BENCH_DAY_S)
    without = _run(HouseParams(**base), BENCH_DAY_S)
    with_battery = _run(HouseParams(**base, battery_capacity_wh=6000, battery_soc_percent=10), BENCH_DAY_S)
    assert with_battery.house_export_wh < without.house_export_wh - 4000
    assert with_battery.house_import_wh < without.house_import_wh - 3000
    assert 10 - 1e-9 <= with_battery.soc_percent <= 100


def test_battery_respects_its_limits():
    params = HouseParams(load_peak_w=1200, pv_peak_w=5000, battery_capacity_wh=2000, battery_power_w=500,
                         battery_soc_percent=90, battery_min_soc_percent=20, day_seconds=BENCH_DAY_S)
    model = HouseModel(params, 0.0)
    soc = []
    for t in range(1, BENCH_DAY_S + 1, 5):
        model.advance(float(t))
        assert -500 - 1e-9 <= model.battery_w <= 500 + 1e-9
        soc.append(model.soc_percent)
    assert max(soc) == pytest.approx(100.0)
    assert min(soc) >= 20 - 1e-9


def test_interchange_counts_exactly_what_the_router_reports():
    model = HouseModel(HouseParams(load_peak_w=1200, pv_peak_w=3000, day_seconds=BENCH_DAY_S), 0.0)
    before = (model.house_import_wh, model.house_export_wh)
    model.add_interchange("export", 100.0)
    model.add_interchange("export", 0.25)
    model.add_interchange("import", 42)
    model.set_interchange_power(-2000)
    assert model.interchange_export_wh == 100.25
    assert model.interchange_import_wh == 42
    model.advance(600.0)  # time passing does not touch the interchange counters...
    assert model.interchange_quantities()["export_energy_wh"] == 100.25
    assert model.interchange_quantities()["import_energy_wh"] == 42
    assert model.interchange_quantities()["power_w"] == -2000
    # ...and the interchange does not touch the house meter beyond its own time integration
    fresh = HouseModel(HouseParams(load_peak_w=1200, pv_peak_w=3000, day_seconds=BENCH_DAY_S), 0.0)
    fresh.advance(600.0)
    assert (model.house_import_wh, model.house_export_wh) == (fresh.house_import_wh, fresh.house_export_wh)
    assert before == (0.0, 0.0)


@pytest.mark.parametrize("direction, energy, message", [
    ("sideways", 1.0, "direction must be 'export' or 'import', found 'sideways'"),
    ("export", -1.0, "must be a finite number >= 0 Wh, found -1.0"),
    ("import", math.nan, "must be a finite number >= 0 Wh"),
])
def test_bad_interchange_reports_are_refused(direction, energy, message):
    model = HouseModel(HouseParams(), 0.0)
    with pytest.raises(ValueError, match=message):
        model.add_interchange(direction, energy)
    assert (model.interchange_import_wh, model.interchange_export_wh) == (0.0, 0.0)


def test_time_must_not_go_backwards():
    model = HouseModel(HouseParams(), 100.0)
    model.advance(110.0)
    with pytest.raises(ValueError, match="time went backwards: 105.0 s after 110.0 s"):
        model.advance(105.0)


def test_meter_quantities_are_in_firmware_units():
    model = HouseModel(HouseParams(load_peak_w=1200, pv_peak_w=3000, day_seconds=BENCH_DAY_S), 0.0)
    model.advance(60.0)
    q = model.house_quantities()
    assert set(q) == {"import_energy_wh", "export_energy_wh", "power_w", "voltage_mv", "frequency_mhz"}
    assert q["frequency_mhz"] == 50_000
    assert 225_000 < q["voltage_mv"] < 235_000
    assert q["power_w"] == model.house_power_w
    assert model.pv_quantities()["export_energy_wh"] == model.pv_energy_wh


def test_params_from_the_sim_board_config():
    sim = tomllib.loads(SIM_TOML.read_text())["sim"]
    params = HouseParams.from_sim({**sim, "dgr_fault": "none"}, slot_seconds=30)  # other emulators' keys ignored
    assert params.day_seconds == BENCH_DAY_S
    assert params.load_peak_w == sim["load_peak_w"] and params.pv_peak_w == sim["pv_peak_w"]
    assert params.speed == 60.0
    assert HouseParams.from_sim({"day_seconds": 600}, slot_seconds=30).day_seconds == 600


@pytest.mark.parametrize("sim, message", [
    ({"load_peak_w": "1200"}, "load_peak_w must be a finite number, found '1200'"),
    ({"pv_peak_w": -5}, "pv_peak_w must be >= 0, found -5"),
    ({"start_hour": 24}, r"start_hour must be in \[0, 24\), found 24"),
    ({"battery_soc_percent": 120}, "battery_soc_percent must be 0..100, found 120"),
])
def test_bad_sim_values_name_the_key(sim, message):
    with pytest.raises(ValueError, match=message):
        HouseParams.from_sim(sim)


def test_replays_a_fixture_house_slot_by_slot():
    """Issue 8: the bench house can replay fixture houses (real-looking days for the demo)."""
    from host_tools.community.loader import load_community

    community = load_community()
    day = 120
    params = HouseParams(replay_house="p03", replay_start_day=day, start_hour=0.0, day_seconds=BENCH_DAY_S,
                         pv_peak_w=0.0)
    model = HouseModel(params, 0.0)
    first = day * 48
    for slot in range(48):
        before_load, before_pv = model.load_energy_wh, model.pv_energy_wh
        model.advance((slot + 1) * 30.0)  # one bench slot = one fixture slot
        assert model.load_energy_wh - before_load == pytest.approx(community.load_wh["p03"][first + slot], abs=1e-6)
        assert model.pv_energy_wh - before_pv == pytest.approx(community.pv_wh["p03"][first + slot], abs=1e-6)
    assert model.pv_energy_wh > 5000  # a spring day on 5 kWp


def test_replay_refuses_an_unknown_house():
    with pytest.raises(ValueError, match="replay_house 'zz' is not in"):
        HouseModel(HouseParams(replay_house="zz"))
    with pytest.raises(ValueError, match="replay_start_day 999"):
        HouseModel(HouseParams(replay_house="c01", replay_start_day=999))
