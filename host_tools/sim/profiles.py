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


class CommunityProfile:
    """Replays a community directory's ``slots.csv``; simulated slots map onto the fixture's
    slots in order from ``first_slot`` (the fixture's time axis, UTC epoch seconds)."""

    def __init__(self, directory: Path, sim_t0: int, houses: list[str], first_slot: int | None = None,
                 slot_seconds: int = 1800):
        rows: dict[str, dict[int, tuple[float, float]]] = {}
        with open(Path(directory) / "slots.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                rows.setdefault(row["house"], {})[int(row["slot_start"])] = (float(row["load_wh"]), float(row["pv_wh"]))
        names = sorted(rows)
        if len(names) < len(houses):
            raise ValueError(f"{directory}: {len(names)} houses, the simulation needs {len(houses)}")
        self.map = dict(zip(houses, names))
        self.rows = rows
        self.slot_s = slot_seconds
        self.first = first_slot if first_slot is not None else min(min(v) for v in rows.values())
        self.sim_t0 = sim_t0

    def has_pv(self, house: str) -> bool:
        return any(pv > 0 for _, pv in self.rows[self.map[house]].values())

    def slot_energy(self, house: str, slot_start: int) -> tuple[float, float]:
        at = self.first + (slot_start - self.sim_t0) // self.slot_s * self.slot_s
        return self.rows[self.map[house]].get(at, (0.0, 0.0))
