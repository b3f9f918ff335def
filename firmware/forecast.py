"""Per-slot forecast of the house's net energy (surplus > 0, shortage < 0) for the markets ahead.

Method (simple, explainable, and good enough for half-hour household profiles):

1. From the house meter's counter readings, compute the net energy of every *complete* past
   slot: (export delta) - (import delta), interpolating the counters linearly at slot edges.
   Only slots with readings on both sides of each edge count: a gap in the data is not a
   zero-consumption slot.
2. For a target slot, take the same slot of the day on each of the last ``history_days`` days
   and smooth them exponentially: the most recent day weighs ``smoothing_percent``, the rest
   shares the remainder the same way (simple exponential smoothing over days).
3. Without any same-slot history (a new board, or a bench day shorter than the demo), fall back
   to persistence: the exponentially smoothed net of the most recent complete slots.
4. With no complete slot at all, there is no forecast, and the policy places no order.

A "day" is ``SLOTS_PER_DAY`` slots (48 half-hours; on a bench with 30-s slots it is 24 min,
matching the emulated house whose day is compressed the same way). Pure: no I/O.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Sequence

SLOTS_PER_DAY = 48
PERSISTENCE_SLOTS = 4


def _counter_at(times_ms: Sequence[int], values: Sequence[int], at_ms: int) -> float | None:
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

    ``readings``: (taken_at_ms, import_energy_wh, export_energy_wh), oldest first.
    """
    if len(readings) < 2:
        return {}
    times = [r[0] for r in readings]
    imports = [r[1] for r in readings]
    exports = [r[2] for r in readings]
    slot_ms = slot_seconds * 1000
    first_edge = -(-times[0] // slot_ms) * slot_ms
    result: dict[int, int] = {}
    edge = first_edge
    while edge + slot_ms <= times[-1]:
        i0, i1 = _counter_at(times, imports, edge), _counter_at(times, imports, edge + slot_ms)
        e0, e1 = _counter_at(times, exports, edge), _counter_at(times, exports, edge + slot_ms)
        if None not in (i0, i1, e0, e1):
            result[edge // 1000] = round((e1 - e0) - (i1 - i0))
        edge += slot_ms
    return result


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
) -> dict[int, int]:
    """Forecast net Wh for each target slot (slot start, epoch s). Empty when there is no history."""
    if not history:
        return {}
    day_s = slot_seconds * SLOTS_PER_DAY
    recent = [history[s] for s in sorted(history, reverse=True)[:PERSISTENCE_SLOTS]]
    persistence = _smooth(recent, smoothing_percent)
    forecast = {}
    for target in targets:
        same_slot = [history[target - d * day_s] for d in range(1, history_days + 1) if (target - d * day_s) in history]
        value = _smooth(same_slot, smoothing_percent) if same_slot else persistence
        forecast[target] = round(value)
    return forecast
