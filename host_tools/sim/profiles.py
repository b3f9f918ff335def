"""Load and PV of the simulated houses: the energy each house uses and makes in each slot.

A ``Profile`` answers ``slot_energy(house, slot_start) -> (load_wh, pv_wh)``. The default is a
simple deterministic per-seed profile (a morning and an evening load bump, a PV sine with
per-slot cloudiness); ``CommunityProfile`` replays a community directory (``slots.csv`` with
``slot_start,house,load_wh,pv_wh``, docs/community.md, issue 8) so the trading benchmark can
drive the same simulation with realistic households.
"""

from __future__ import annotations

import csv
import math
import random
from functools import lru_cache
from pathlib import Path
from typing import Protocol


class Profile(Protocol):
    def slot_energy(self, house: str, slot_start: int) -> tuple[float, float]: ...

    def has_pv(self, house: str) -> bool: ...


class SyntheticProfile:
    def __init__(self, rng: random.Random, houses: list[str], slot_seconds: int = 1800):
        self.slot_s = slot_seconds
        self.params = {}
        pv_houses = set(rng.sample(houses, rng.randint(1, max(1, len(houses) - 1))))
        for name in houses:
            self.params[name] = {
                "base_w": rng.uniform(150, 500),
                "peak_w": rng.uniform(300, 1500),
                "pv_w": rng.uniform(2500, 6000) if name in pv_houses else 0.0,
                "seed": rng.getrandbits(32),
            }
        self._cache: dict[tuple[str, int], tuple[float, float]] = {}

    def has_pv(self, house: str) -> bool:
        return self.params[house]["pv_w"] > 0

    def slot_energy(self, house: str, slot_start: int) -> tuple[float, float]:
        key = (house, slot_start)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        p = self.params[house]
        r = random.Random(p["seed"] * 1_000_003 + slot_start)
        hour = (slot_start % 86_400) / 3600 + self.slot_s / 7200
        bumps = math.exp(-((hour - 7.5) / 1.5) ** 2) + 1.3 * math.exp(-((hour - 19.5) / 2.0) ** 2)
        load_w = (p["base_w"] + p["peak_w"] * bumps) * r.uniform(0.7, 1.3)
        sun = max(0.0, math.sin(math.pi * (hour - 6.0) / 13.0)) if 6.0 < hour < 19.0 else 0.0
        pv_w = p["pv_w"] * sun * r.uniform(0.5, 1.0)
        value = (load_w * self.slot_s / 3600, pv_w * self.slot_s / 3600)
        self._cache[key] = value
        return value


@lru_cache(maxsize=2)
def _load_slots(path: str) -> dict[str, dict[int, tuple[float, float]]]:
    """slots.csv of a community directory, parsed once per process (a year of 15 houses is ~260k rows)."""
    rows: dict[str, dict[int, tuple[float, float]]] = {}
    with open(Path(path) / "slots.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            rows.setdefault(row["house"], {})[int(row["slot_start"])] = (float(row["load_wh"]), float(row["pv_wh"]))
    return rows


class CommunityProfile:
    """Replays a community directory's ``slots.csv`` (docs/community.md). The seed picks which of
    the community's houses the simulated ones are, and the simulated time maps onto the same
    day of the year and time of day in the fixture."""

    def __init__(self, directory: Path, sim_t0: int, houses: list[str], rng: random.Random | None = None,
                 slot_seconds: int = 1800):
        rows = _load_slots(str(directory))
        names = sorted(rows)
        if len(names) < len(houses):
            raise ValueError(f"{directory}: {len(names)} houses, the simulation needs {len(houses)}")
        chosen = (rng or random.Random(0)).sample(names, len(houses))
        self.map = dict(zip(houses, chosen))
        self.rows = rows
        self.slot_s = slot_seconds
        first = min(min(v) for v in rows.values())
        last = max(max(v) for v in rows.values())
        span = (last - first) // 86_400 * 86_400 or 86_400
        self.shift = first + (sim_t0 - first) % span - sim_t0  # fixture time = sim time + shift

    def has_pv(self, house: str) -> bool:
        return any(pv > 0 for _, pv in self.rows[self.map[house]].values())

    def slot_energy(self, house: str, slot_start: int) -> tuple[float, float]:
        return self.rows[self.map[house]].get(slot_start + self.shift, (0.0, 0.0))
