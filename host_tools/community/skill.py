"""Forecast skill on a community: the new forecast against the baseline and simple references.

skill = 1 - MAE(method) / MAE(same slot yesterday), pooled over houses and slots (gsy-e /
Quartierstrom definition, as in issue 8). Two horizons:

* day-ahead: issued at midnight for the day's slots, from complete slots before midnight;
* next market: issued half a slot before the gate of each slot (the last complete slot is then
  two slots before the target), as the 5-min review sees it.

Host side, stdlib only; run ``python -m host_tools.community.skill [--community DIR]``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

from firmware.forecast import Site, forecast_net_wh, forecast_slots, _median

from .loader import Community, load_community

FIXTURE_SITE = Site(51.4, 6.97)  # the fixture's weather station (docs/community.md)


@dataclass
class _Errors:
    abs_sum: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, err: float) -> None:
        self.abs_sum[name] = self.abs_sum.get(name, 0.0) + abs(err)

    def skill(self, name: str, ref: str = "same_slot_yesterday") -> float:
        return 1.0 - self.abs_sum[name] / self.abs_sum[ref]


def measure(community: Community, *, first_day: int = 28, days: int | None = None, site: Site = FIXTURE_SITE,
            next_market_every: int = 7, variants: dict | None = None) -> dict:
    sd = community.slots_per_day
    slot_s = community.slot_seconds
    day_s = sd * slot_s
    last_day = community.days if days is None else min(community.days, first_day + days)
    load_err, net_err, next_err = _Errors(), _Errors(), _Errors()
    refresh_ms = []
    variants = variants or {"new": {}}
    for name in community.houses:
        starts = community.slot_starts
        load = dict(zip(starts, community.load_wh[name]))
        pv = dict(zip(starts, community.pv_wh[name])) if community.houses[name].has_pv else {}
        net = {s: pv.get(s, 0) - load[s] for s in starts}
        for day in range(first_day, last_day):
            now = starts[day * sd]
            lo = max(0, (day - 43) * sd)
            window = starts[lo: day * sd]
            lh = {s: load[s] for s in window}
            ph = {s: pv[s] for s in window} if pv else {}
            nh = {s: net[s] for s in window}
            targets = list(starts[day * sd: (day + 1) * sd])
            fcs = {}
            for vname, kw in variants.items():
                t0 = time.perf_counter()
                fcs[vname] = forecast_slots(lh, ph, targets, now_s=now, slot_seconds=slot_s, day_seconds=day_s,
                                            site=site, **kw)
                refresh_ms.append((time.perf_counter() - t0) * 1000)
            base = forecast_net_wh(nh, targets, slot_seconds=slot_s, history_days=7, smoothing_percent=50)
            base_load = forecast_net_wh(lh, targets, slot_seconds=slot_s, history_days=7, smoothing_percent=50)
            for t in targets:
                y_l, y_n = load[t], net[t]
                ssy_l, ssy_n = load[t - day_s], net[t - day_s]
                load_err.add("same_slot_yesterday", y_l - ssy_l)
                net_err.add("same_slot_yesterday", y_n - ssy_n)
                load_err.add("baseline", y_l - base_load[t])
                net_err.add("baseline", y_n - base[t])
                med28 = _median([load[t - d * day_s] for d in range(1, 29)])
                load_err.add("median28", y_l - med28)
                for vname, fc in fcs.items():
                    load_err.add(vname, y_l - fc[t].load_wh)
                    net_err.add(vname, y_n - fc[t].net_wh)
            if next_market_every and day % next_market_every == 0:
                for i, t in enumerate(targets):
                    now_nm = t - slot_s // 2 - slot_s // 2  # gate half a slot ahead, reviewed just before it
                    cut = day * sd + i - 1  # slots before index cut are complete at now_nm
                    window = starts[max(0, cut - 43 * sd): cut]
                    lh = {s: load[s] for s in window}
                    ph = {s: pv[s] for s in window} if pv else {}
                    nh = {s: net[s] for s in window}
                    y_n = net[t]
                    next_err.add("same_slot_yesterday", y_n - net[t - day_s])
                    next_err.add("persistence", y_n - net[starts[cut - 1]])
                    next_err.add("baseline", y_n - forecast_net_wh(nh, [t], slot_seconds=slot_s, history_days=7,
                                                                    smoothing_percent=50)[t])
                    for vname, kw in variants.items():
                        fc = forecast_slots(lh, ph, [t], now_s=now_nm, slot_seconds=slot_s, day_seconds=day_s,
                                            site=site, **kw)
                        next_err.add(vname, y_n - fc[t].net_wh)
    result = {"houses": len(community.houses), "days": last_day - first_day,
              "load": {k: round(load_err.skill(k), 3) for k in load_err.abs_sum},
              "net": {k: round(net_err.skill(k), 3) for k in net_err.abs_sum}}
    if next_err.abs_sum:
        result["next_market_net"] = {k: round(next_err.skill(k), 3) for k in next_err.abs_sum}
    refresh_ms.sort()
    result["refresh_ms_median"] = round(refresh_ms[len(refresh_ms) // 2], 2)
    result["refresh_ms_max"] = round(refresh_ms[-1], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="forecast skill on a community")
    parser.add_argument("--community", default=None)
    parser.add_argument("--days", type=int, default=None)
    parser.add_argument("--next-market-every", type=int, default=7)
    args = parser.parse_args(argv)
    result = measure(load_community(args.community), days=args.days, next_market_every=args.next_market_every)
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
