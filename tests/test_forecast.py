"""Unit and property tests of firmware/forecast.py: counters to slots, the robust load
statistics, the clear-sky PV model, quantiles, any slot length, and the kept baseline."""

from __future__ import annotations

import math

from hypothesis import given, settings, strategies as st

from firmware.forecast import (
    DAY_SECONDS, Site, SlotForecast, clear_sky_slot_w_m2, clear_sky_table, cos_zenith, forecast_net_wh,
    forecast_slots, history_seconds, load_samples, slot_net_energy, slots_per_day,
)

ESSEN = Site(51.4, 6.97)
DAY0 = 20_454 * DAY_SECONDS  # 2026-01-01 00:00 UTC, a Thursday


def test_slot_net_energy_interpolates_edges_and_skips_gaps():
    # 1 Wh/s import from t=0 to t=100 s, readings every 25 s; slot 50 s
    readings = [(t * 1000, t, 0) for t in range(0, 101, 25)]
    assert slot_net_energy(readings, 50) == {0: -50, 50: -50}
    gap = [(0, 0, 0), (10_000, 10, 0), (200_000, 200, 0)]  # readings bracket the edges: interpolated
    assert slot_net_energy(gap, 50)[50] == -50
    assert slot_net_energy([(0, 0, 0)], 50) == {}


def test_slots_per_day_and_history_window():
    assert slots_per_day(1800) == 48 and slots_per_day(900) == 96 and slots_per_day(30, 1440) == 48
    for bad in (0, 7000, -1800):
        try:
            slots_per_day(bad)
        except ValueError as exc:
            assert "whole number" in str(exc)
        else:
            raise AssertionError(bad)
    assert history_seconds(28, DAY_SECONDS, 1800) == 28 * 86400 + 3600


def _daily_load(slot_seconds: int, days: int, f) -> dict[int, int]:
    return {DAY0 + i * slot_seconds: f(i * slot_seconds % DAY_SECONDS, i * slot_seconds // DAY_SECONDS)
            for i in range(days * DAY_SECONDS // slot_seconds)}


def test_15_minute_slots_forecast_midnight_from_midnight():
    """Issue 8: with SLOTS_PER_DAY = 48 a 15-min market forecast midnight from noon."""
    def load(sec_of_day, _day):
        return 1000 if 43_200 <= sec_of_day < 46_800 else 100  # noon peak
    hist = _daily_load(900, 10, load)
    midnight, noon = DAY0 + 10 * DAY_SECONDS, DAY0 + 10 * DAY_SECONDS + 43_200
    fc = forecast_slots(hist, {}, [midnight, noon], now_s=midnight - 1, slot_seconds=900)
    assert fc[midnight].load_wh == 100 and fc[noon].load_wh == 1000
    assert fc[midnight].net_wh == -100 and fc[midnight].pv_wh == 0


def test_median_ignores_an_outlier_day_and_weekends_are_their_own_kind():
    def load(sec_of_day, day):
        if day == 20:
            return 5000  # one party
        weekend = (DAY0 // DAY_SECONDS + day + 3) % 7 >= 5
        return 600 if weekend else 200
    hist = _daily_load(1800, 28, load)
    target_weekday = DAY0 + 28 * DAY_SECONDS + 36_000  # 2026-01-29 is a Thursday
    target_saturday = DAY0 + 30 * DAY_SECONDS + 36_000
    fc = forecast_slots(hist, {}, [target_weekday, target_saturday], now_s=DAY0 + 28 * DAY_SECONDS, slot_seconds=1800)
    assert fc[target_weekday].load_wh == 200
    assert fc[target_saturday].load_wh == 600
    plain = forecast_slots(hist, {}, [target_saturday], now_s=DAY0 + 28 * DAY_SECONDS, slot_seconds=1800,
                           weekday_aware=False)
    assert plain[target_saturday].load_wh == 200  # 20 weekdays outvote 8 weekend days


def test_load_samples_pool_neighbours_but_never_the_future():
    hist = {DAY0 + i * 1800: i for i in range(48 * 3)}
    target = DAY0 + 2 * DAY_SECONDS  # midnight of day 2
    samples = load_samples(hist, target, day_seconds=DAY_SECONDS, history_days=2, weekday_aware=False,
                           slot_seconds=1800, pool_slots=1)
    assert sorted(samples) == [0, 1, 47, 48, 49]  # day 1: 47, 48, 49; day 0: its slot -1 is not in the history
    assert all(s < 96 for s in samples)


def test_persistence_without_same_slot_history_and_empty_without_any():
    hist = {DAY0 + i * 1800: 300 + i for i in range(6)}
    fc = forecast_slots(hist, {}, [DAY0 + 10 * 1800], now_s=DAY0 + 6 * 1800, slot_seconds=1800)
    assert fc[DAY0 + 10 * 1800].load_wh == round((302 + 303 + 304 + 305) / 4)
    assert forecast_slots({}, {}, [DAY0], now_s=DAY0, slot_seconds=1800) == {}


def test_solar_model_geometry():
    # Essen, 21 June, local solar noon (~11:32 UTC): elevation 90 - 51.4 + 23.44 = 62.0 deg
    june21_noon = 20_625 * DAY_SECONDS + 11 * 3600 + 32 * 60
    elevation = math.degrees(math.asin(cos_zenith(ESSEN, june21_noon)))
    assert abs(elevation - 62.0) < 0.5
    assert cos_zenith(ESSEN, june21_noon - 12 * 3600) < 0  # midnight
    # equator at the March equinox, noon at longitude 0: sun nearly overhead
    equinox_noon = 20_532 * DAY_SECONDS + 12 * 3600
    assert cos_zenith(Site(0.0, 0.0), equinox_noon) > 0.99
    cs = clear_sky_slot_w_m2(ESSEN, june21_noon - 900, 1800)
    assert 800 < cs < 1000  # Haurwitz at 62 deg elevation: ~910 W/m2
    slots = [DAY0 + 150 * DAY_SECONDS + i * 1800 for i in range(48)]
    table = clear_sky_table(ESSEN, slots, 1800)
    assert all(abs(table[s] - clear_sky_slot_w_m2(ESSEN, s, 1800)) < 1e-6 for s in slots)


def _clear_sky_pv(days: int, ratio_of_day, kwp_scale: float = 0.4) -> dict[int, int]:
    slots = [DAY0 + 150 * DAY_SECONDS + i * 1800 for i in range(days * 48)]
    table = clear_sky_table(ESSEN, slots, 1800)
    return {s: round(kwp_scale * table[s] * ratio_of_day((s - slots[0]) // DAY_SECONDS, s)) for s in slots}


def test_pv_follows_the_clear_sky_scaled_by_recent_cloudiness():
    start = DAY0 + 150 * DAY_SECONDS
    pv = _clear_sky_pv(14, lambda day, s: 1.0 if day % 2 else 0.5)  # alternating clear and half-cloudy days
    load = {s: 200 for s in pv}
    tomorrow = start + 14 * DAY_SECONDS
    targets = [tomorrow + i * 1800 for i in range(48)]
    fc = forecast_slots(load, pv, targets, now_s=tomorrow, slot_seconds=1800, site=ESSEN)
    table = clear_sky_table(ESSEN, targets, 1800)
    noon = tomorrow + 23 * 1800
    clear = 0.4 * table[noon]
    # the roof's clear-slot scale is learnt (90th percentile ~ clear days); cloudiness ~ 0.75 on average
    assert 0.6 * clear < fc[noon].pv_wh < 0.9 * clear
    assert fc[tomorrow].pv_wh == 0 and fc[tomorrow].pv_samples_wh == (0,)  # midnight
    assert fc[noon].pv_quantile_wh(10) < fc[noon].pv_wh < fc[noon].pv_quantile_wh(90)


def test_a_cloudy_morning_lowers_the_afternoon():
    start = DAY0 + 150 * DAY_SECONDS
    base = _clear_sky_pv(15, lambda day, s: 1.0)
    today = start + 14 * DAY_SECONDS
    now = today + 12 * 3600
    afternoon = today + 30 * 1800
    seen = {s: v for s, v in base.items() if s < now}
    cloudy = {s: (round(v * 0.3) if s >= today else v) for s, v in seen.items()}
    load = {s: 200 for s in seen}
    clear_fc = forecast_slots(load, seen, [afternoon], now_s=now, slot_seconds=1800, site=ESSEN)[afternoon]
    cloudy_fc = forecast_slots(load, cloudy, [afternoon], now_s=now, slot_seconds=1800, site=ESSEN)[afternoon]
    assert cloudy_fc.pv_wh < 0.5 * clear_fc.pv_wh
    assert abs(clear_fc.pv_wh - base[afternoon]) <= 0.15 * base[afternoon]


@settings(max_examples=60, deadline=None)
@given(
    slot_seconds=st.sampled_from([300, 600, 900, 1800, 3600]),
    days=st.integers(1, 10),
    seed=st.integers(0, 10_000),
    with_pv=st.booleans(),
)
def test_any_slot_length_gives_integer_non_negative_forecasts(slot_seconds, days, seed, with_pv):
    import random

    rng = random.Random(seed)
    n = days * DAY_SECONDS // slot_seconds
    start = DAY0 + 100 * DAY_SECONDS
    load = {start + i * slot_seconds: rng.randint(0, 3000) for i in range(n)}
    pv = {s: rng.randint(0, 2000) for s in load} if with_pv else {}
    now = start + n * slot_seconds
    targets = [now + (i + 1) * slot_seconds for i in range(DAY_SECONDS // slot_seconds)]
    fc = forecast_slots(load, pv, targets, now_s=now, slot_seconds=slot_seconds, site=ESSEN)
    assert sorted(fc) == targets
    for f in fc.values():
        assert isinstance(f.load_wh, int) and isinstance(f.pv_wh, int) and f.load_wh >= 0 and f.pv_wh >= 0
        assert list(f.load_samples_wh) == sorted(f.load_samples_wh)


@settings(max_examples=100, deadline=None)
@given(
    loads=st.lists(st.integers(0, 5000), min_size=1, max_size=30),
    pvs=st.lists(st.integers(0, 5000), min_size=1, max_size=14),
    q1=st.integers(0, 100), q2=st.integers(0, 100),
)
def test_quantiles_are_monotonic_and_bounded(loads, pvs, q1, q2):
    f = SlotForecast(0, 0, 0, tuple(sorted(loads)), tuple(sorted(pvs)))
    lo, hi = min(q1, q2), max(q1, q2)
    assert f.net_quantile_wh(lo) <= f.net_quantile_wh(hi)
    assert f.load_quantile_wh(lo) <= f.load_quantile_wh(hi)
    assert min(pvs) - max(loads) <= f.net_quantile_wh(lo) <= max(pvs) - min(loads)
    assert min(loads) <= f.load_quantile_wh(lo) <= max(loads)


def test_baseline_is_the_old_method():
    """The previous firmware forecast (7 days, 50% smoothing, 48-slot day) stays available."""
    day = 48 * 30
    hist = {1000 * day + d * day: v for d, v in enumerate([100, 200, 400])}
    target = 1000 * day + 3 * day
    # newest 400 weighs 50%, 200 25%, 100 12.5% (renormalised)
    assert forecast_net_wh(hist, [target], slot_seconds=30, history_days=7, smoothing_percent=50) == {
        target: round((0.5 * 400 + 0.25 * 200 + 0.125 * 100) / 0.875)}
    assert forecast_net_wh({}, [target], slot_seconds=30, history_days=7, smoothing_percent=50) == {}


@settings(max_examples=60, deadline=None)
@given(lat=st.floats(-89.0, 89.0), lon=st.floats(-180.0, 180.0), day=st.integers(0, 20_000),
       slot_seconds=st.sampled_from([300, 900, 1800, 3600]))
def test_clear_sky_table_matches_the_slot_by_slot_model_everywhere(lat, lon, day, slot_seconds):
    """The table skips night slots by the sunrise hour angle: it must agree with the plain model."""
    site = Site(lat, lon)
    slots = [day * DAY_SECONDS + i * slot_seconds for i in range(2 * DAY_SECONDS // slot_seconds)]
    table = clear_sky_table(site, slots, slot_seconds)
    assert all(abs(table[s] - clear_sky_slot_w_m2(site, s, slot_seconds)) < 1e-6 for s in slots)
