"""A bench house: load, PV and battery over a (compressed) day, and the meters that see them.

Pure and deterministic: no clock, no I/O. The caller passes the time (any monotonic seconds)
to :meth:`HouseModel.advance`; the same sequence of calls always gives the same counters, so a
test can assert exact energies and a bench run can be replayed.

Time compression: a simulated day lasts ``day_seconds`` wall seconds (a bench with 30-second
slots uses 30 x 48 = 1440 s), and every wall second advances the simulated clock by
``86400 / day_seconds`` seconds. Power values stay real-world watts; energy is power times
*simulated* time, so one bench slot holds the energy a real half hour would and the market's
lot sizes keep their meaning.

Load and PV come from analytic daily curves, or (``replay_house`` in [sim]) from a house of a
community directory (docs/community.md, the committed fixture by default), so the bench and the
demo show real-looking days: a household's own spikes and a cloudy afternoon.

Two meters, two different clocks:

* the **house meter** measures the house's own net flow, ``load - pv +/- battery`` (positive =
  import), integrated over simulated time;
* the **interchange meter** counts only what the router moved, exactly as reported through
  :meth:`HouseModel.add_interchange` (no time scaling: the DGR emulator already reports the
  energy of the trade it carried out), so settlement tests can assert it to the Wh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

SECONDS_PER_DAY = 86_400.0
SLOTS_PER_DAY = 48
# Integration step in simulated seconds: small against the curves' widths (hours) so the
# midpoint rule is accurate to well under 0.1 % whatever the caller's advance() rhythm is.
MAX_STEP_SIM_S = 60.0


@dataclass(frozen=True)
class HouseParams:
    """The house, in real-world units. ``battery_power_w`` defaults to a C/2 battery."""

    load_peak_w: float = 1200.0
    pv_peak_w: float = 0.0
    battery_capacity_wh: float = 0.0
    battery_power_w: float | None = None
    battery_soc_percent: float = 50.0
    battery_min_soc_percent: float = 10.0
    day_seconds: float = SECONDS_PER_DAY
    start_hour: float = 9.0
    voltage_v: float = 230.0
    frequency_hz: float = 50.0
    # Replay a community house (docs/community.md) instead of the analytic curves: its load and
    # PV of each slot, starting at ``replay_start_day`` (0 = the community's first day) at
    # ``start_hour``. "" = the analytic house. ``replay_dir`` "" = the committed fixture.
    replay_house: str = ""
    replay_dir: str = ""
    replay_start_day: int = 0

    def __post_init__(self) -> None:
        for name in ("replay_house", "replay_dir"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"house model: {name} must be a string, found {getattr(self, name)!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in ("replay_house", "replay_dir"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"house model: {f.name} must be a finite number, found {value!r}")
            if value < 0:
                raise ValueError(f"house model: {f.name} must be >= 0, found {value!r}")
        if self.day_seconds <= 0:
            raise ValueError(f"house model: day_seconds must be > 0, found {self.day_seconds!r}")
        if not 0 <= self.start_hour < 24:
            raise ValueError(f"house model: start_hour must be in [0, 24), found {self.start_hour!r}")
        for name in ("battery_soc_percent", "battery_min_soc_percent"):
            if getattr(self, name) > 100:
                raise ValueError(f"house model: {name} must be 0..100, found {getattr(self, name)!r}")

    @classmethod
    def from_sim(cls, sim: Mapping[str, Any], slot_seconds: int = 1800) -> "HouseParams":
        """From a board config's [sim] table. The day lasts ``slot_seconds x 48`` unless
        ``day_seconds`` is given. Keys this model does not know are left alone: [sim] is shared
        with the other emulators (router, fault injection)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in sim.items() if k in known}
        values.setdefault("day_seconds", float(slot_seconds * SLOTS_PER_DAY))
        return cls(**values)

    @property
    def speed(self) -> float:
        """Simulated seconds per wall second."""
        return SECONDS_PER_DAY / self.day_seconds


def _bump(hour: float, centre: float, width_h: float) -> float:
    """A Gaussian bump on the 24-hour circle (an evening peak spills past midnight correctly)."""
    distance = (hour - centre + 12.0) % 24.0 - 12.0
    return math.exp(-0.5 * (distance / width_h) ** 2)


def load_w(params: HouseParams, hour: float) -> float:
    """Household demand: a base load, a morning peak around 07:30, an evening peak around 19:00
    that reaches ``load_peak_w``."""
    shape = 0.2 + 0.5 * _bump(hour, 7.5, 1.0) + 0.8 * _bump(hour, 19.0, 1.5)
    return params.load_peak_w * min(shape, 1.0)


def pv_w(params: HouseParams, hour: float) -> float:
    """PV output: sin^2 bell from 06:00 to 18:00, ``pv_peak_w`` at noon, 0 at night."""
    if not 6.0 < hour < 18.0:
        return 0.0
    return params.pv_peak_w * math.sin(math.pi * (hour - 6.0) / 12.0) ** 2


class _Replay:
    """A community house's slots, as powers: what the fixture says the house used and made."""

    def __init__(self, params: HouseParams):
        from host_tools.community.loader import load_community

        community = load_community(params.replay_dir or None)
        if params.replay_house not in community.houses:
            raise ValueError(f"house model: replay_house {params.replay_house!r} is not in {community.path} "
                             f"(houses: {', '.join(sorted(community.houses))})")
        if params.replay_start_day >= community.days:
            raise ValueError(f"house model: replay_start_day {params.replay_start_day} is beyond the community's "
                             f"{community.days} days")
        self.slot_s = community.slot_seconds
        to_w = 3600.0 / self.slot_s
        self.load_w = [wh * to_w for wh in community.load_wh[params.replay_house]]
        self.pv_w = [wh * to_w for wh in community.pv_wh[params.replay_house]]
        self.origin_s = params.replay_start_day * SECONDS_PER_DAY

    def powers(self, sim_s: float) -> tuple[float, float]:
        """(load, PV) in W at ``sim_s`` simulated seconds since the community's first midnight."""
        i = int((self.origin_s + sim_s) // self.slot_s) % len(self.load_w)
        return self.load_w[i], self.pv_w[i]


class HouseModel:
    """The state of one bench house; see the module docstring for the two meters' semantics."""

    def __init__(self, params: HouseParams, start_s: float = 0.0):
        self.params = params
        self._replay = _Replay(params) if params.replay_house else None
        self._start_s = start_s
        self._last_s = start_s
        self.sim_elapsed_s = 0.0
        self.house_import_wh = 0.0
        self.house_export_wh = 0.0
        self.interchange_import_wh = 0.0
        self.interchange_export_wh = 0.0
        self.interchange_power_w = 0.0
        self.soc_percent = params.battery_soc_percent if params.battery_capacity_wh > 0 else 0.0
        self.load_w = 0.0
        self.pv_w = 0.0
        self.battery_w = 0.0  # positive = charging (drawn from the house), negative = discharging
        self.pv_energy_wh = 0.0  # generated, for a PV meter and for energy-balance checks
        self.load_energy_wh = 0.0  # consumed, for energy-balance checks
        self._refresh_instant()

    @property
    def hour(self) -> float:
        """Simulated time of day in hours, [0, 24)."""
        return (self.params.start_hour + self.sim_elapsed_s / 3600.0) % 24.0

    @property
    def house_power_w(self) -> float:
        """Net flow at the house meter: positive = import, negative = export."""
        return self.load_w - self.pv_w + self.battery_w

    def _battery_power(self, surplus_w: float, dt_h: float) -> float:
        """Greedy self-consumption: store any surplus, cover any shortage, within the battery's
        power and state-of-charge limits. Returns the battery power (positive = charging)."""
        p = self.params
        if p.battery_capacity_wh <= 0:
            return 0.0
        max_power = p.battery_power_w if p.battery_power_w is not None else p.battery_capacity_wh / 2.0
        if surplus_w > 0:  # charge
            room_wh = (100.0 - self.soc_percent) / 100.0 * p.battery_capacity_wh
            return min(surplus_w, max_power, room_wh / dt_h)
        available_wh = max(self.soc_percent - p.battery_min_soc_percent, 0.0) / 100.0 * p.battery_capacity_wh
        return -min(-surplus_w, max_power, available_wh / dt_h)

    def _set_instant(self, hour: float, dt_h: float, elapsed_s: float) -> None:
        if self._replay is not None:
            self.load_w, self.pv_w = self._replay.powers(self.params.start_hour * 3600.0 + elapsed_s)
        else:
            self.load_w = load_w(self.params, hour)
            self.pv_w = pv_w(self.params, hour)
        self.battery_w = self._battery_power(self.pv_w - self.load_w, dt_h)

    def _refresh_instant(self) -> None:
        """Instantaneous powers at the present simulated hour (what the meter's power register
        shows between advances); the battery's limit is judged over one integration step."""
        self._set_instant(self.hour, MAX_STEP_SIM_S / 3600.0, self.sim_elapsed_s)

    def advance(self, now_s: float) -> None:
        """Run the house up to wall time ``now_s`` (same clock as ``start_s``).

        Integrates in steps of at most MAX_STEP_SIM_S simulated seconds with the midpoint rule;
        the house meter's import or export counter takes the step's net energy.
        """
        if now_s < self._last_s:
            raise ValueError(f"house model: time went backwards: {now_s} s after {self._last_s} s")
        sim_dt = (now_s - self._last_s) * self.params.speed
        self._last_s = now_s
        steps = max(1, math.ceil(sim_dt / MAX_STEP_SIM_S)) if sim_dt > 0 else 0
        for _ in range(steps):
            step = sim_dt / steps
            mid_hour = (self.params.start_hour + (self.sim_elapsed_s + step / 2) / 3600.0) % 24.0
            dt_h = step / 3600.0
            self._set_instant(mid_hour, dt_h, self.sim_elapsed_s + step / 2)
            net_wh = self.house_power_w * dt_h
            self.pv_energy_wh += self.pv_w * dt_h
            self.load_energy_wh += self.load_w * dt_h
            if net_wh >= 0:
                self.house_import_wh += net_wh
            else:
                self.house_export_wh -= net_wh
            if self.params.battery_capacity_wh > 0:
                self.soc_percent += self.battery_w * dt_h / self.params.battery_capacity_wh * 100.0
                self.soc_percent = min(max(self.soc_percent, 0.0), 100.0)
            self.sim_elapsed_s += step
        if steps:
            self._refresh_instant()

    def add_interchange(self, direction: str, energy_wh: float) -> None:
        """Count energy the router moved: "export" = from this house to the line, "import" = into it."""
        if not (isinstance(energy_wh, (int, float)) and math.isfinite(energy_wh) and energy_wh >= 0):
            raise ValueError(f"interchange energy must be a finite number >= 0 Wh, found {energy_wh!r}")
        if direction == "export":
            self.interchange_export_wh += energy_wh
        elif direction == "import":
            self.interchange_import_wh += energy_wh
        else:
            raise ValueError(f"interchange direction must be 'export' or 'import', found {direction!r}")

    def set_interchange_power(self, power_w: float) -> None:
        """The router's present power: positive = import into the house, negative = export."""
        if not math.isfinite(power_w):
            raise ValueError(f"interchange power must be finite, found {power_w!r}")
        self.interchange_power_w = float(power_w)

    def _voltage_mv(self, power_w: float) -> float:
        # A weak feeder: 1 V drop per kW drawn, 1 V rise per kW fed in.
        return (self.params.voltage_v - power_w / 1000.0) * 1000.0

    def house_quantities(self) -> dict[str, float]:
        """What the house meter shows, in the firmware's units (floats: the meter encodes them)."""
        return {
            "import_energy_wh": self.house_import_wh,
            "export_energy_wh": self.house_export_wh,
            "power_w": self.house_power_w,
            "voltage_mv": self._voltage_mv(self.house_power_w),
            "frequency_mhz": self.params.frequency_hz * 1000.0,
        }

    def interchange_quantities(self) -> dict[str, float]:
        """What the interchange meter shows: exactly the energy reported by the router."""
        return {
            "import_energy_wh": self.interchange_import_wh,
            "export_energy_wh": self.interchange_export_wh,
            "power_w": self.interchange_power_w,
            "voltage_mv": self._voltage_mv(self.interchange_power_w),
            "frequency_mhz": self.params.frequency_hz * 1000.0,
        }

    def pv_quantities(self) -> dict[str, float]:
        """A PV generation meter (role "pv"): generation counts as export; no import."""
        return {
            "import_energy_wh": 0.0,
            "export_energy_wh": self.pv_energy_wh,
            "power_w": -self.pv_w,
            "voltage_mv": self._voltage_mv(-self.pv_w),
            "frequency_mhz": self.params.frequency_hz * 1000.0,
        }
