"""Per-slot forecast of the house's load and PV for the markets ahead, with quantiles.

WHY two models: a household's load and its PV fail in different ways. Load is noisy from day to
day (a kettle, a washing machine) but its distribution at a given time of day is stable over
weeks, so a *robust* statistic over many days beats any smoothing of the last few (measured on
the community fixture: see docs/community.md). PV follows the sun exactly and the weather
roughly, so it is a clear-sky curve computed on the board, scaled by how cloudy it has been.

Load (``load_samples``): the same slot of the day on each of the last ``history_days`` days (42
by default: on the community fixture 42 days beat 35 and 28, 0.305 / 0.302 / 0.298 skill), and
the slot either side of it (``pool_slots``: a habit at 07:10 one day is at 07:40 the next); with
``weekday_aware`` only days of the same kind (weekday or weekend) when at least
``MIN_SAME_KIND`` of them are there. The forecast is their median; quantiles come from the same
samples. Without any same-slot history, persistence (median of the latest complete slots).

PV (``pv_samples``): a clear-sky irradiance curve (solar position from Spencer's series,
Haurwitz's clear-sky model; accurate to a few percent, which the learnt scale absorbs) times a
per-slot-of-day scale ``k`` (a high quantile of PV / clear-sky over the history, so it learns
the roof's size, tilt, orientation and shading without being told) times a cloudiness factor:
the recent days' mean for tomorrow, pulled toward what today has shown so far, and, for the
next markets, toward the cloudiness of the latest complete slot. Without a site (latitude and
longitude) the PV forecast falls back to the same robust statistics as the load.

Any slot length: a "day" is ``day_seconds`` (86 400 s; a compressed bench day is shorter, e.g.
48 slots of 30 s) and must be a whole number of slots.

Pure: no I/O, no clock (the caller passes ``now_s``), no global mutable state. Integers in and
out (Wh); floats only inside the solar model.

``forecast_net_wh`` is the firmware's previous method (exponential smoothing of the same slot
over 7 days, a 48-slot day), kept as the ``baseline`` the benchmark compares against.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from functools import cached_property
from typing import Mapping, Sequence

DAY_SECONDS = 86_400
SLOTS_PER_DAY = 48  # the baseline's fixed day; the new forecast derives the day from day_seconds
PERSISTENCE_SLOTS = 4
MIN_SAME_KIND = 4  # fewer same-kind days than this: use every day
CLOUD_DAYS = 7  # days of cloudiness history behind tomorrow's PV
PV_HISTORY_DAYS = 28  # the roof's clear-slot scale is learnt over at most these days (the sun moves)
PV_SCALE_PERCENTILE = 90  # PV / clear-sky ratio that counts as "a clear slot" for this roof
MIN_CLEAR_SKY_W_M2 = 20.0  # below this the ratio is noise (dawn, dusk)
NEAR_HOURS = 2.0  # the latest slot's cloudiness matters this far ahead (e-folding, hours)
NEAR_SLOTS = 2  # the next market is two slots after the latest complete one
QUANTILE_POINTS = tuple(range(5, 100, 10))  # the PV error distribution, kept as 10 quantiles


# ---------------------------------------------------------------------------------------------
# Meter counters -> energy per slot


def _counter_at(times_ms: Sequence[int], values: Sequence[int | float], at_ms: int) -> float | None:
    """Linear interpolation of a counter at ``at_ms``; None unless readings bracket it."""
    i = bisect_left(times_ms, at_ms)
    if i < len(times_ms) and times_ms[i] == at_ms:
        return float(values[i])
    if i == 0 or i == len(times_ms):
        return None
    t0, t1 = times_ms[i - 1], times_ms[i]
    v0, v1 = values[i - 1], values[i]
    return v0 + (v1 - v0) * (at_ms - t0) / (t1 - t0)


def slot_net_energy(readings: Sequence[tuple[int, int, int]], slot_seconds: int) -> dict[int, int]:
    """Net energy (Wh, export minus import) of each complete slot covered by the readings.

    ``readings``: (taken_at_ms, import_energy_wh, export_energy_wh), oldest first. Counters are
    interpolated linearly at slot edges; only slots with readings on both sides of each edge
    count, because a gap in the data is not a zero-consumption slot.
    """
    if len(readings) < 2:
        return {}
    times = [r[0] for r in readings]
    imports = [r[1] for r in readings]
    exports = [r[2] for r in readings]
    slot_ms = slot_seconds * 1000
    edge = -(-times[0] // slot_ms) * slot_ms
    result: dict[int, int] = {}
    while edge + slot_ms <= times[-1]:
        i0, i1 = _counter_at(times, imports, edge), _counter_at(times, imports, edge + slot_ms)
        e0, e1 = _counter_at(times, exports, edge), _counter_at(times, exports, edge + slot_ms)
        if None not in (i0, i1, e0, e1):
            result[edge // 1000] = round((e1 - e0) - (i1 - i0))
        edge += slot_ms
    return result


def slots_per_day(slot_seconds: int, day_seconds: int = DAY_SECONDS) -> int:
    """How many slots a day holds; a day must be a whole number of slots."""
    if slot_seconds <= 0 or day_seconds <= 0 or day_seconds % slot_seconds:
        raise ValueError(f"a day of {day_seconds} s is not a whole number of {slot_seconds}-s slots")
    return day_seconds // slot_seconds


def history_seconds(history_days: int, day_seconds: int = DAY_SECONDS, slot_seconds: int = 0) -> int:
    """How far back the meter readings must reach for a forecast over ``history_days`` days
    (plus two slots, so that the oldest slot is complete)."""
    return history_days * day_seconds + 2 * slot_seconds


# ---------------------------------------------------------------------------------------------
# Solar model (pure Python, on the board)


@dataclass(frozen=True)
class Site:
    """Where the panels are; longitude east positive."""

    latitude_deg: float
    longitude_deg: float

    def __post_init__(self) -> None:
        if not (-90.0 <= self.latitude_deg <= 90.0 and -180.0 <= self.longitude_deg <= 180.0):
            raise ValueError(f"site: latitude -90..90 and longitude -180..180, found {self.latitude_deg}, {self.longitude_deg}")


def _day_and_hour(t_s: float, day_seconds: int) -> tuple[float, float]:
    """Day of the year (0-based, fractional years wrap) and UTC hour of a moment.

    On a compressed bench day (``day_seconds`` < 86 400) each day advances the calendar by one
    day and the hour is the position within the compressed day, so the bench sees a real year.
    """
    day_index, into = divmod(t_s, day_seconds)
    hour = into / day_seconds * 24.0
    if day_seconds == DAY_SECONDS:
        doy = (day_index - 10_957) % 365.2425  # days since 1 Jan 2000, modulo a Gregorian year
    else:
        doy = day_index % 365
    return doy, hour


def _sun_of_day(doy: float) -> tuple[float, float, float]:
    """Declination's sine and cosine and the equation of time (minutes) for a day of the year
    (Spencer 1971). They change slowly, so one evaluation per day serves all of its slots."""
    g = 2.0 * math.pi / 365.0 * doy
    eq_min = 229.18 * (0.000075 + 0.001868 * math.cos(g) - 0.032077 * math.sin(g)
                       - 0.014615 * math.cos(2 * g) - 0.040849 * math.sin(2 * g))
    decl = (0.006918 - 0.399912 * math.cos(g) + 0.070257 * math.sin(g) - 0.006758 * math.cos(2 * g)
            + 0.000907 * math.sin(2 * g) - 0.002697 * math.cos(3 * g) + 0.00148 * math.sin(3 * g))
    return math.sin(decl), math.cos(decl), eq_min


def cos_zenith(site: Site, t_s: float, day_seconds: int = DAY_SECONDS) -> float:
    """Cosine of the solar zenith angle at a moment."""
    doy, hour = _day_and_hour(t_s, day_seconds)
    sin_d, cos_d, eq_min = _sun_of_day(doy + 0.5)
    return _cos_zenith(site, hour, sin_d, cos_d, eq_min)


def _cos_zenith(site: Site, hour: float, sin_d: float, cos_d: float, eq_min: float) -> float:
    hour_angle = math.radians((hour * 60.0 + eq_min + 4.0 * site.longitude_deg) / 4.0 - 180.0)
    lat = math.radians(site.latitude_deg)
    return math.sin(lat) * sin_d + math.cos(lat) * cos_d * math.cos(hour_angle)


def _haurwitz(cz: float) -> float:
    return 1098.0 * cz * math.exp(-0.059 / cz) if cz > 0.01 else 0.0


def clear_sky_ghi_w_m2(site: Site, t_s: float, day_seconds: int = DAY_SECONDS) -> float:
    """Global horizontal irradiance under a clear sky (Haurwitz 1945), W/m2."""
    return _haurwitz(cos_zenith(site, t_s, day_seconds))


def clear_sky_slot_w_m2(site: Site, slot_start: int, slot_seconds: int, day_seconds: int = DAY_SECONDS,
                        samples: int = 3) -> float:
    """Mean clear-sky irradiance over a slot (midpoint rule over ``samples`` points)."""
    doy, hour = _day_and_hour(slot_start, day_seconds)
    sin_d, cos_d, eq_min = _sun_of_day(doy + 0.5)
    step_h = slot_seconds / day_seconds * 24.0 / samples
    return sum(_haurwitz(_cos_zenith(site, hour + (i + 0.5) * step_h, sin_d, cos_d, eq_min))
               for i in range(samples)) / samples


def clear_sky_table(site: Site, slots, slot_seconds: int, day_seconds: int = DAY_SECONDS,
                    samples: int = 3) -> dict[int, float]:
    """``clear_sky_slot_w_m2`` for many slots at once: the day's sun is computed once per day
    and the latitude's trigonometry once, which is what keeps a refresh within its budget."""
    sin_lat, cos_lat = math.sin(math.radians(site.latitude_deg)), math.cos(math.radians(site.latitude_deg))
    lon_min = 4.0 * site.longitude_deg
    step_h = slot_seconds / day_seconds * 24.0 / samples
    days: dict[int, tuple[float, float, float]] = {}
    out = {}
    for slot in slots:
        day_index = slot // day_seconds
        sun = days.get(day_index)
        if sun is None:
            doy, _ = _day_and_hour(day_index * day_seconds, day_seconds)
            sin_d, cos_d, eq_min = _sun_of_day(doy + 0.5)
            a, b = sin_lat * sin_d, cos_lat * cos_d
            # hour angles (degrees) where the sun is above cz = 0.01: beyond them a slot is night
            c = (0.01 - a) / b if b > 1e-9 else (-2.0 if a > 0.01 else 2.0)
            half_day = 180.0 if c <= -1 else (0.0 if c >= 1 else math.degrees(math.acos(c)))
            sun = days[day_index] = (a, b, eq_min + lon_min, half_day)
        a, b, shift, half_day = sun
        hour0 = (slot - day_index * day_seconds) / day_seconds * 24.0
        if half_day < 180.0:
            # hour angle of the slot's start and end (degrees), wrapped to -180..180 around noon
            ha0 = ((hour0 * 60.0 + shift) / 4.0 - 180.0 + 180.0) % 360.0 - 180.0
            ha1 = ha0 + step_h * samples * 15.0
            if half_day == 0.0 or (ha1 < -half_day or ha0 > half_day) and not (ha1 > 180.0 and ha1 - 360.0 > -half_day):
                out[slot] = 0.0
                continue
        total = 0.0
        for i in range(samples):
            cz = a + b * math.cos(math.radians(((hour0 + (i + 0.5) * step_h) * 60.0 + shift) / 4.0 - 180.0))
            if cz > 0.01:
                total += 1098.0 * cz * math.exp(-0.059 / cz)
        out[slot] = total / samples
    return out


# ---------------------------------------------------------------------------------------------
# Forecast


def _quantile(sorted_values: Sequence[float], q_percent: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default definition)."""
    n = len(sorted_values)
    if n == 0:
        raise ValueError("quantile of no values")
    pos = (n - 1) * q_percent / 100.0
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _median(values: Sequence[float]) -> float:
    return _quantile(sorted(values), 50)


@dataclass(frozen=True)
class SlotForecast:
    """One market's forecast: point values (Wh) and the samples their quantiles come from.

    ``net`` is surplus (> 0) or shortage (< 0): PV minus load.
    """

    market_id: int
    load_wh: int
    pv_wh: int
    load_samples_wh: tuple[int, ...]  # sorted
    pv_samples_wh: tuple[int, ...]  # sorted

    @property
    def net_wh(self) -> int:
        return self.pv_wh - self.load_wh

    def load_quantile_wh(self, q_percent: float) -> int:
        return round(_quantile(self.load_samples_wh, q_percent))

    def pv_quantile_wh(self, q_percent: float) -> int:
        return round(_quantile(self.pv_samples_wh, q_percent))

    def net_quantile_wh(self, q_percent: float) -> int:
        """Quantile of PV minus load, treating the two as independent: the distribution of every
        difference of a PV sample and a load sample. The q-quantile of the net is what the
        house has at least with probability 1 - q: sell the 20% quantile of a surplus and it
        is there four times in five."""
        if len(self.pv_samples_wh) == 1:
            return self.pv_samples_wh[0] - round(_quantile(self.load_samples_wh, 100 - q_percent))
        return round(_quantile(self.net_samples_wh, q_percent))

    @cached_property
    def net_samples_wh(self) -> tuple[int, ...]:
        """The net's distribution, sorted: every difference of a PV sample and a load sample (PV
        and load independent). Computed once per forecast object (the policy asks at every review)."""
        return tuple(sorted(p - l for p in self.pv_samples_wh for l in self.load_samples_wh))


def _day_kind(t_s: int, day_seconds: int) -> bool:
    """True on a weekend day. 1 Jan 1970 (day 0) was a Thursday."""
    return (t_s // day_seconds + 3) % 7 >= 5


def load_samples(history: Mapping[int, int], target: int, *, day_seconds: int, history_days: int,
                 weekday_aware: bool, slot_seconds: int = 0, pool_slots: int = 0) -> list[int]:
    """The same slot of the day on each of the last ``history_days`` days (before ``target``),
    and, with ``pool_slots``, that many neighbouring slots on either side of it: a household's
    kettle at 07:10 one day is at 07:40 the next, so neighbours are samples of the same habit."""
    offsets = [j * slot_seconds for j in range(-pool_slots, pool_slots + 1)] if slot_seconds else [0]
    days = [target - d * day_seconds for d in range(1, history_days + 1)]
    if weekday_aware:
        kind = _day_kind(target, day_seconds)
        same_kind = [s for s in days if _day_kind(s, day_seconds) == kind]
        if sum(1 for s in same_kind if s in history) >= MIN_SAME_KIND:
            days = same_kind
    return [history[s + o] for s in days for o in offsets if s + o in history and s + o < target]


def _persistence(history: Mapping[int, int]) -> list[int]:
    return [history[s] for s in sorted(history)[-PERSISTENCE_SLOTS:]]


@dataclass(frozen=True)
class _PvModel:
    """What the PV history says about this roof and the recent weather."""

    scale: dict[int, float]  # slot of day -> Wh per (W/m2) on a clear slot
    default_scale: float
    cloud_days: tuple[float, ...]  # daily cloudiness ratios, oldest first (1 = clear)
    today_ratio: float | None  # cloudiness so far today
    today_weight: float  # 0..1: how much of today's clear-sky energy has been seen
    last_ratio: float | None  # cloudiness of the latest complete daylight slot
    last_slot: int | None
    # Empirical errors, as quantile functions (QUANTILE_POINTS values, lowest first): a slot's
    # cloudiness around the recent mean (far ahead), and its change over NEAR_SLOTS slots (next markets)
    far_errors: tuple[float, ...] = (0.0,)
    near_errors: tuple[float, ...] = (0.0,)


def _pv_model(pv: Mapping[int, int], *, site: Site, now_s: int, slot_seconds: int, day_seconds: int,
              history_days: int) -> _PvModel:
    per_day = day_seconds // slot_seconds
    today = now_s - now_s % day_seconds
    since = today - history_days * day_seconds
    cs_of = clear_sky_table(site, [s for s in pv if s >= since], slot_seconds, day_seconds)
    ratios: dict[int, list[float]] = {}
    for s, cs in cs_of.items():
        if cs >= MIN_CLEAR_SKY_W_M2:
            ratios.setdefault((s % day_seconds) // slot_seconds, []).append(max(0, pv[s]) / cs)
    every = sorted(r for rs in ratios.values() for r in rs)
    default = _quantile(every, PV_SCALE_PERCENTILE) if every else 0.0
    scale = {i: _quantile(sorted(rs), PV_SCALE_PERCENTILE) for i, rs in ratios.items() if len(rs) >= 3}
    days: dict[int, list[float]] = {}
    for s, cs in cs_of.items():
        if cs < MIN_CLEAR_SKY_W_M2:
            continue
        expected = scale.get((s % day_seconds) // slot_seconds, default) * cs
        day = days.setdefault(s - s % day_seconds, [0.0, 0.0])
        day[0] += max(0, pv[s])
        day[1] += expected
    cloud = tuple(min(1.5, a / e) for d, (a, e) in sorted(days.items()) if d < today and e > 0)[-CLOUD_DAYS:]
    today_ratio, weight = None, 0.0
    if today in days and days[today][1] > 0:
        seen = days[today][1]
        cs_today = clear_sky_table(site, [today + i * slot_seconds for i in range(per_day)], slot_seconds, day_seconds)
        whole = sum(scale.get(i, default) * cs_today[today + i * slot_seconds] for i in range(per_day))
        today_ratio = min(1.5, days[today][0] / seen)
        weight = seen / (seen + 0.25 * whole) if whole > 0 else 0.0
    last_ratio, last_slot = None, None
    daylight = [s for s, cs in cs_of.items() if cs >= MIN_CLEAR_SKY_W_M2 and s >= now_s - 2 * slot_seconds - slot_seconds]
    if daylight:
        last_slot = max(daylight)
        expected = scale.get((last_slot % day_seconds) // slot_seconds, default) * cs_of[last_slot]
        if expected > 0:
            last_ratio = min(1.5, max(0, pv[last_slot]) / expected)
    # slot-level cloudiness of the recent days: its spread around the mean, and its change over
    # NEAR_SLOTS slots, are the forecast's errors far ahead and for the next markets
    recent = today - CLOUD_DAYS * day_seconds
    slot_ratio = {}
    for s, cs in cs_of.items():
        if s >= recent and cs >= MIN_CLEAR_SKY_W_M2:
            expected = scale.get((s % day_seconds) // slot_seconds, default) * cs
            if expected > 0:
                slot_ratio[s] = min(1.5, max(0, pv[s]) / expected)
    far, near = (0.0,), (0.0,)
    if len(slot_ratio) >= 5:
        mean = sum(cloud) / len(cloud) if cloud else sum(slot_ratio.values()) / len(slot_ratio)
        far_all = sorted(r - mean for r in slot_ratio.values())
        far = tuple(_quantile(far_all, q) for q in QUANTILE_POINTS)
        steps = sorted(r - slot_ratio[s - NEAR_SLOTS * slot_seconds] for s, r in slot_ratio.items()
                       if s - NEAR_SLOTS * slot_seconds in slot_ratio)
        if steps:
            near = tuple(_quantile(steps, q) for q in QUANTILE_POINTS)
    return _PvModel(scale, default, cloud, today_ratio, weight, last_ratio, last_slot, far, near)


def _pv_forecast(model: _PvModel, target: int, cs: float, *, now_s: int, slot_seconds: int,
                 day_seconds: int) -> tuple[int, tuple[int, ...]]:
    k = model.scale.get((target % day_seconds) // slot_seconds, model.default_scale)
    clear_wh = k * cs
    if clear_wh <= 0:
        return 0, (0,)
    prior = sum(model.cloud_days) / len(model.cloud_days) if model.cloud_days else 0.7
    ratio = prior
    if target - target % day_seconds == now_s - now_s % day_seconds and model.today_ratio is not None:
        ratio = model.today_weight * model.today_ratio + (1 - model.today_weight) * prior
    a = 0.0
    if model.last_ratio is not None and model.last_slot is not None:
        hours_ahead = (target - model.last_slot) / day_seconds * 24.0
        a = math.exp(-hours_ahead / NEAR_HOURS)
        ratio = a * model.last_ratio + (1 - a) * ratio
    point = round(clear_wh * ratio)
    # the error distribution: near-term changes for the next markets, blended (quantile by
    # quantile) into the spread around the mean further ahead
    far, near = model.far_errors, model.near_errors
    if len(near) != len(far):
        near = (0.0,) * len(far)
    samples = tuple(sorted(max(0, round(clear_wh * max(0.0, ratio + a * n + (1 - a) * f))) for n, f in zip(near, far)))
    return point, samples


def forecast_slots(
    load_history: Mapping[int, int],
    pv_history: Mapping[int, int],
    targets: Sequence[int],
    *,
    now_s: int,
    slot_seconds: int,
    day_seconds: int = DAY_SECONDS,
    history_days: int = 42,
    weekday_aware: bool = True,
    pool_slots: int = 1,
    site: Site | None = None,
) -> dict[int, SlotForecast]:
    """Forecast load and PV (Wh) of each target slot (slot start, epoch s).

    ``load_history`` / ``pv_history``: energy of complete past slots, slot start -> Wh (load >= 0,
    PV >= 0; a house without PV passes an empty PV history). Empty result when there is no load
    history at all: with nothing measured the policy places no order.
    """
    slots_per_day(slot_seconds, day_seconds)  # validates the day
    if not load_history:
        return {}
    kw = dict(day_seconds=day_seconds, history_days=history_days, weekday_aware=weekday_aware,
              slot_seconds=slot_seconds, pool_slots=pool_slots)
    load_fallback = _persistence(load_history)
    pv_model = None
    if site is not None and pv_history:
        pv_model = _pv_model(pv_history, site=site, now_s=now_s, slot_seconds=slot_seconds,
                             day_seconds=day_seconds, history_days=min(history_days, PV_HISTORY_DAYS))
        cs_targets = clear_sky_table(site, targets, slot_seconds, day_seconds)
    pv_fallback = _persistence(pv_history) if pv_history else [0]
    result = {}
    for target in targets:
        loads = sorted(load_samples(load_history, target, **kw) or load_fallback)
        if pv_model is not None:
            pv_point, pvs = _pv_forecast(pv_model, target, cs_targets[target], now_s=now_s,
                                         slot_seconds=slot_seconds, day_seconds=day_seconds)
        elif pv_history:
            pvs = tuple(sorted(load_samples(pv_history, target, **kw) or pv_fallback))
            pv_point = round(_quantile(pvs, 50))
        else:
            pv_point, pvs = 0, (0,)
        result[target] = SlotForecast(target, round(_quantile(loads, 50)), pv_point, tuple(loads), tuple(pvs))
    return result


# ---------------------------------------------------------------------------------------------
# Baseline: the firmware's previous method, kept for comparison (``dgc-host bench community --baseline``)


def _smooth(values_newest_first: Sequence[int], weight_percent: int) -> float:
    """Exponential smoothing where the newest value has ``weight_percent`` of the weight."""
    alpha = weight_percent / 100
    weights = [alpha * (1 - alpha) ** i for i in range(len(values_newest_first))]
    return sum(w * v for w, v in zip(weights, values_newest_first)) / sum(weights)


def forecast_net_wh(
    history: dict[int, int],
    targets: Sequence[int],
    *,
    slot_seconds: int,
    history_days: int,
    smoothing_percent: int,
    day_seconds: int | None = None,
) -> dict[int, int]:
    """Baseline: net Wh per target slot from exponentially smoothed same-slot values.

    ``day_seconds`` defaults to the old fixed 48 slots (so that the baseline behaves as the
    board did); pass the real day to get a fair comparison at other slot lengths.
    """
    if not history:
        return {}
    day_s = day_seconds if day_seconds is not None else slot_seconds * SLOTS_PER_DAY
    recent = [history[s] for s in sorted(history, reverse=True)[:PERSISTENCE_SLOTS]]
    persistence = _smooth(recent, smoothing_percent)
    forecast = {}
    for target in targets:
        same_slot = [history[target - d * day_s] for d in range(1, history_days + 1) if (target - d * day_s) in history]
        value = _smooth(same_slot, smoothing_percent) if same_slot else persistence
        forecast[target] = round(value)
    return forecast
