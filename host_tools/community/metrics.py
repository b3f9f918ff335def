"""What the trading benchmark reports, computed from per-house, per-slot records. Pure.

Definitions (gsy-e's and Quartierstrom's, as issue 8 asks):

- **Grid flows.** In each slot a house's balance is ``pv + discharge + received - load - charge
  - delivered``: a shortage is imported from the grid at retail, a surplus exported at feed-in.
  ``received``/``delivered`` are the trades' *metered* local energy.
- **Ideal per-slot netting.** With no market friction, in each slot the community's surpluses
  meet its shortages: ideal local energy = min(sum of surpluses, sum of shortages), taken on
  the houses' grid-only balances (each battery run for its own house). The ideal saving is that
  energy times (retail - feed-in): a local kWh spares its buyer retail and earns its seller
  more than feed-in, and between them they gain exactly the spread.
- **Delivered % of ideal** = local energy delivered / ideal local energy. It can pass 100%:
  a battery may sell to a neighbour what the grid-only run kept for its own house, and a buyer
  that over-contracts passes energy on to the grid; **used % of ideal** counts only what the
  buyers used (received within their own shortage).
- **Seller shortfall** = contracted sales not delivered / contracted sales.
- **Buyer over-contract** = local energy received beyond the buyer's own shortage (it flows
  on to the grid at feed-in) / local energy received.
- **Self-sufficiency** = 1 - grid import / load (community); **PV self-consumption** = 1 -
  grid export / PV. **With an ex-post pool** (a what-if, not a market rule): the same, had each
  slot's over-contracted energy (received beyond the buyer's own shortage) gone to the houses
  still importing in that slot, as a community settled on metered energy would count it; exact
  without batteries (with them the battery flows are kept as they were).
- **Bills** = grid import x retail - grid export x feed-in + paid for trades - earned from
  trades (minor units); **savings** = grid-only bills - market bills, as % of the ideal saving;
  a household whose market bill exceeds its grid-only bill is **worse off**.
- **Forecast skill** = 1 - MAE(forecast) / MAE(same slot yesterday), pooled over houses and slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class SlotRecord:
    """One house in one slot. Energies in Wh (>= 0); money in milli-minor units (Wh x minor/kWh)."""

    house: str
    slot_start: int
    load_wh: int
    pv_wh: int
    charge_wh: int = 0  # into the battery, at the house side
    discharge_wh: int = 0  # out of the battery, at the house side
    sold_wh: int = 0  # contracted
    bought_wh: int = 0  # contracted
    delivered_wh: int = 0  # metered, out of this house to its buyers
    received_wh: int = 0  # metered, into this house from its sellers
    paid_milli: int = 0  # to sellers, for metered energy
    earned_milli: int = 0  # from buyers, for metered energy

    @property
    def balance_wh(self) -> int:
        return self.pv_wh + self.discharge_wh + self.received_wh - self.load_wh - self.charge_wh - self.delivered_wh

    @property
    def grid_import_wh(self) -> int:
        return max(0, -self.balance_wh)

    @property
    def grid_export_wh(self) -> int:
        return max(0, self.balance_wh)

    @property
    def own_shortage_wh(self) -> int:
        """Shortage before any trade: what a buyer could usefully receive."""
        return max(0, self.load_wh + self.charge_wh - self.pv_wh - self.discharge_wh)


@dataclass(frozen=True)
class Tariff:
    retail_per_kwh_minor: int
    feed_in_per_kwh_minor: int


def bill_milli(records: Iterable[SlotRecord], tariff: Tariff) -> int:
    """A household's bill over the records (milli-minor units; negative = it earned money)."""
    total = 0
    for r in records:
        total += r.grid_import_wh * tariff.retail_per_kwh_minor - r.grid_export_wh * tariff.feed_in_per_kwh_minor
        total += r.paid_milli - r.earned_milli
    return total


def ideal_local_wh(grid_only: Sequence[SlotRecord]) -> int:
    """Sum over slots of min(community surplus, community shortage), on grid-only balances."""
    per_slot: dict[int, list[int]] = {}
    for r in grid_only:
        s = per_slot.setdefault(r.slot_start, [0, 0])
        s[0] += r.grid_export_wh
        s[1] += r.grid_import_wh
    return sum(min(a, b) for a, b in per_slot.values())


def self_sufficiency_pct(records: Sequence[SlotRecord]) -> float:
    load = sum(r.load_wh for r in records)
    return 100.0 * (1 - sum(r.grid_import_wh for r in records) / load) if load else 0.0


def pooled_self_sufficiency_pct(records: Sequence[SlotRecord]) -> float:
    """Self-sufficiency had each slot's over-contracted local energy (received beyond the buyer's
    own shortage, which flows on to the grid) gone to the community's houses still importing in
    that slot: how much an ex-post pool on metered energy would add to the forecast-sized trades."""
    per_slot: dict[int, list[int]] = {}
    for r in records:
        s = per_slot.setdefault(r.slot_start, [0, 0])
        s[0] += max(0, r.received_wh - r.own_shortage_wh)
        s[1] += r.grid_import_wh
    load = sum(r.load_wh for r in records)
    pooled = sum(min(a, b) for a, b in per_slot.values())
    return 100.0 * (1 - (sum(r.grid_import_wh for r in records) - pooled) / load) if load else 0.0


def self_consumption_pct(records: Sequence[SlotRecord]) -> float:
    pv = sum(r.pv_wh for r in records)
    return 100.0 * (1 - sum(r.grid_export_wh for r in records) / pv) if pv else 0.0


@dataclass
class SkillCounter:
    """Pooled absolute errors of a forecast and of the same-slot-yesterday reference."""

    forecast_abs: float = 0.0
    reference_abs: float = 0.0
    count: int = 0

    def add(self, actual: float, forecast: float, same_slot_yesterday: float) -> None:
        self.forecast_abs += abs(actual - forecast)
        self.reference_abs += abs(actual - same_slot_yesterday)
        self.count += 1

    @property
    def skill(self) -> float:
        return 1.0 - self.forecast_abs / self.reference_abs if self.reference_abs else 0.0


@dataclass
class Report:
    days: int
    houses: int
    skill_load: float
    skill_net: float
    skill_net_next_market: float
    ideal_local_wh: int
    delivered_wh: int
    contracted_sell_wh: int
    traded_wh: int
    delivered_pct_of_ideal: float
    used_pct_of_ideal: float  # delivered and used by its buyer (not passed on to the grid)
    traded_pct_of_ideal: float
    shortfall_pct: float
    over_contract_pct: float
    self_sufficiency_pct: float
    self_sufficiency_grid_only_pct: float
    self_consumption_pct: float
    self_consumption_grid_only_pct: float
    avg_buyer_price_per_kwh_minor: float
    avg_seller_price_per_kwh_minor: float
    retail_per_kwh_minor: int
    feed_in_per_kwh_minor: int
    savings_milli: int
    ideal_savings_milli: int
    savings_pct_of_ideal: float
    worse_off: int
    bills: dict[str, tuple[int, int]] = field(default_factory=dict)  # house -> (market, grid-only), milli-minor
    forecast_ms_median: float = 0.0
    forecast_ms_max: float = 0.0
    forecast_peak_kib: int = 0
    pooled_self_sufficiency_pct: float = 0.0  # what-if: over-contracted energy pooled to importers (above)

    def final_line(self) -> str:
        return (f"community: days={self.days} houses={self.houses} skill_load={self.skill_load:.3f} "
                f"skill_net={self.skill_net:.3f} delivered_pct_of_ideal={self.delivered_pct_of_ideal:.1f} "
                f"shortfall_pct={self.shortfall_pct:.1f} self_sufficiency_pct={self.self_sufficiency_pct:.1f} "
                f"savings_pct_of_ideal={self.savings_pct_of_ideal:.1f} worse_off={self.worse_off}")


def _pct(a: float, b: float) -> float:
    return 100.0 * a / b if b else 0.0


def report(market: Sequence[SlotRecord], grid_only: Sequence[SlotRecord], tariff: Tariff, *, days: int,
           skill_load: SkillCounter, skill_net: SkillCounter, skill_next: SkillCounter | None = None,
           forecast_ms: Sequence[float] = (), forecast_peak_kib: int = 0) -> Report:
    """The benchmark's figures. ``grid_only``: the same houses, slots and batteries without a market."""
    houses = sorted({r.house for r in market})
    ideal = ideal_local_wh(grid_only)
    delivered = sum(r.delivered_wh for r in market)
    received = sum(r.received_wh for r in market)
    sold = sum(r.sold_wh for r in market)
    over = sum(max(0, r.received_wh - r.own_shortage_wh) for r in market)
    bills: dict[str, tuple[int, int]] = {}
    by_house_m: dict[str, list[SlotRecord]] = {}
    by_house_g: dict[str, list[SlotRecord]] = {}
    for r in market:
        by_house_m.setdefault(r.house, []).append(r)
    for r in grid_only:
        by_house_g.setdefault(r.house, []).append(r)
    for h in houses:
        bills[h] = (bill_milli(by_house_m.get(h, []), tariff), bill_milli(by_house_g.get(h, []), tariff))
    savings = sum(g - m for m, g in bills.values())
    ideal_savings = ideal * (tariff.retail_per_kwh_minor - tariff.feed_in_per_kwh_minor)
    paid = sum(r.paid_milli for r in market)
    earned = sum(r.earned_milli for r in market)
    ms = sorted(forecast_ms)
    return Report(
        days=days, houses=len(houses),
        skill_load=skill_load.skill, skill_net=skill_net.skill,
        skill_net_next_market=skill_next.skill if skill_next else 0.0,
        ideal_local_wh=ideal, delivered_wh=delivered, contracted_sell_wh=sold,
        traded_wh=sum(r.bought_wh for r in market),
        delivered_pct_of_ideal=_pct(delivered, ideal), used_pct_of_ideal=_pct(received - over, ideal),
        traded_pct_of_ideal=_pct(sold, ideal),
        shortfall_pct=_pct(sold - delivered, sold), over_contract_pct=_pct(over, received),
        self_sufficiency_pct=self_sufficiency_pct(market), self_sufficiency_grid_only_pct=self_sufficiency_pct(grid_only),
        self_consumption_pct=self_consumption_pct(market), self_consumption_grid_only_pct=self_consumption_pct(grid_only),
        avg_buyer_price_per_kwh_minor=paid / received if received else 0.0,
        avg_seller_price_per_kwh_minor=earned / delivered if delivered else 0.0,
        retail_per_kwh_minor=tariff.retail_per_kwh_minor, feed_in_per_kwh_minor=tariff.feed_in_per_kwh_minor,
        savings_milli=savings, ideal_savings_milli=ideal_savings, savings_pct_of_ideal=_pct(savings, ideal_savings),
        worse_off=sum(1 for m, g in bills.values() if m > g), bills=bills,
        forecast_ms_median=ms[len(ms) // 2] if ms else 0.0, forecast_ms_max=ms[-1] if ms else 0.0,
        forecast_peak_kib=forecast_peak_kib, pooled_self_sufficiency_pct=pooled_self_sufficiency_pct(market),
    )


def table(rep: Report, label: str = "") -> list[str]:
    """Human-readable lines (the final line is separate: ``Report.final_line``)."""
    kwh = lambda wh: f"{wh / 1000:,.1f} kWh"  # noqa: E731
    yen = lambda milli: f"{milli / 100_000:,.0f}"  # noqa: E731  milli-minor -> major (minor = 1/100)
    lines = [
        f"community benchmark{(' (' + label + ')') if label else ''}: {rep.houses} houses, {rep.days} days",
        f"  forecast skill vs same slot yesterday: load {rep.skill_load:.3f}, net {rep.skill_net:.3f} (day-ahead), "
        f"net {rep.skill_net_next_market:.3f} (next market)",
        f"  forecast refresh: median {rep.forecast_ms_median:.2f} ms, max {rep.forecast_ms_max:.2f} ms, "
        f"peak {rep.forecast_peak_kib} KiB (this machine)",
        f"  ideal per-slot netting {kwh(rep.ideal_local_wh)}; contracted {kwh(rep.contracted_sell_wh)} "
        f"({rep.traded_pct_of_ideal:.1f}%), delivered {kwh(rep.delivered_wh)} ({rep.delivered_pct_of_ideal:.1f}% of ideal; "
        f"{rep.used_pct_of_ideal:.1f}% used by its buyers, the rest passed on to the grid)",
        f"  seller shortfall {rep.shortfall_pct:.1f}% of contracted; buyer over-contract {rep.over_contract_pct:.1f}% of received",
        f"  self-sufficiency {rep.self_sufficiency_pct:.1f}% (grid only {rep.self_sufficiency_grid_only_pct:.1f}%); "
        f"PV self-consumption {rep.self_consumption_pct:.1f}% (grid only {rep.self_consumption_grid_only_pct:.1f}%)",
        f"  average buyer price {rep.avg_buyer_price_per_kwh_minor / 100:.2f}/kWh (retail {rep.retail_per_kwh_minor / 100:.2f}); "
        f"seller {rep.avg_seller_price_per_kwh_minor / 100:.2f}/kWh (feed-in {rep.feed_in_per_kwh_minor / 100:.2f})",
        f"  savings {yen(rep.savings_milli)} of an ideal {yen(rep.ideal_savings_milli)} ({rep.savings_pct_of_ideal:.1f}%); "
        f"worse off than grid-only: {rep.worse_off}",
        "  bills (market / grid only): " + ", ".join(f"{h} {yen(m)}/{yen(g)}" for h, (m, g) in sorted(rep.bills.items())),
    ]
    return lines


def bills_by_house(records: Iterable[SlotRecord], tariff: Tariff) -> Mapping[str, int]:
    out: dict[str, list[SlotRecord]] = {}
    for r in records:
        out.setdefault(r.house, []).append(r)
    return {h: bill_milli(rs, tariff) for h, rs in out.items()}
