"""PNG plots of a community benchmark run (matplotlib, host extra only; imported on demand).

- ``day-HOUSE.png``: a day at a glance for each house: actual net and its next-market forecast,
  contracted sales and purchases, delivered and received energy, battery state of charge;
- ``month.png``: the community's run: trade prices against retail and feed-in, local energy
  traded per day, self-sufficiency per day with and without the market.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def write_plots(bench, directory: str | Path, day: int | None = None) -> list[Path]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    c, s = bench.c, bench.s
    per_day = bench.per_day
    first = s.start_day * per_day
    pick = (s.start_day + (s.days // 2 if day is None else day)) * per_day
    pick = min(max(pick, first), (s.start_day + s.days - 1) * per_day)
    slots = list(c.slot_starts[pick: pick + per_day])
    hours = [(t - slots[0]) / 3600 for t in slots]
    width = bench.slot_s / 3600 * 0.8
    by = {(r.house, r.slot_start): r for r in bench.market_records}
    paths = []
    for name in sorted(c.houses):
        recs = [by[(name, t)] for t in slots]
        fig, ax = plt.subplots(figsize=(10, 4.5))
        ax.plot(hours, [r.pv_wh - r.load_wh for r in recs], color="black", label="actual net (PV - load)")
        fc = [bench.next_forecast.get((name, t)) for t in slots]
        ax.plot([h for h, f in zip(hours, fc) if f is not None], [f for f in fc if f is not None], color="tab:orange",
                linestyle="--", label="forecast (next market)")
        ax.bar(hours, [r.sold_wh for r in recs], width, color="tab:green", alpha=0.35, label="contracted sale")
        ax.bar(hours, [-r.bought_wh for r in recs], width, color="tab:red", alpha=0.35, label="contracted purchase")
        ax.scatter(hours, [r.delivered_wh - r.received_wh for r in recs], s=10, color="tab:blue", zorder=3,
                   label="delivered (+) / received (-)")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xlabel("hour of the day (UTC)")
        ax.set_ylabel("Wh per slot")
        if c.houses[name].battery_wh and s.batteries:
            ax2 = ax.twinx()
            ax2.plot(hours, [100 * bench.soc_trace[(name, t)] / c.houses[name].battery_wh for t in slots],
                     color="tab:purple", linewidth=1, label="battery SOC")
            ax2.set_ylabel("battery state of charge, %")
            ax2.set_ylim(0, 100)
            ax2.legend(loc="upper right", fontsize=7)
        ax.set_title(f"{name}: a day at a glance (day {pick // per_day} of the community)")
        ax.legend(loc="upper left", fontsize=7)
        fig.tight_layout()
        path = out / f"day-{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    day0 = c.slot_starts[first]
    xs, ys = [], []
    for market, trades in sorted(bench.prices.items()):
        for price, _energy in trades:
            xs.append((market - day0) / 86400)
            ys.append(price / 100)
    axes[0].scatter(xs, ys, s=3, alpha=0.4, label="trade price")
    axes[0].axhline(s.tariffs.retail_per_kwh_minor / 100, color="tab:red", label="retail")
    axes[0].axhline(s.tariffs.feed_in_per_kwh_minor / 100, color="tab:green", label="feed-in")
    axes[0].set_ylabel("price per kWh")
    axes[0].legend(fontsize=7)
    days = list(range(s.days))
    traded, ss_m, ss_g = [], [], []
    for d in days:
        lo, hi = day0 + d * 86400, day0 + (d + 1) * 86400
        m = [r for r in bench.market_records if lo <= r.slot_start < hi]
        g = [r for r in bench.grid_records if lo <= r.slot_start < hi]
        traded.append(sum(r.delivered_wh for r in m) / 1000)
        load = sum(r.load_wh for r in m) or 1
        ss_m.append(100 * (1 - sum(r.grid_import_wh for r in m) / load))
        ss_g.append(100 * (1 - sum(r.grid_import_wh for r in g) / load))
    axes[1].bar(days, traded, color="tab:blue")
    axes[1].set_ylabel("local energy delivered, kWh/day")
    axes[2].plot(days, ss_m, label="with the market")
    axes[2].plot(days, ss_g, label="grid only")
    axes[2].set_ylabel("self-sufficiency, %")
    axes[2].set_xlabel("day of the run")
    axes[2].legend(fontsize=7)
    axes[0].set_title(f"community of {len(c.houses)} houses, {s.days} days from day {s.start_day}")
    fig.tight_layout()
    path = out / "month.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)
    return paths
