"""Market rules shared by the board and the bench ledger: slots, lots, gate closure, price band.

Pure functions over integers. A market is identified by its slot's start time (UTC epoch
seconds); slots are aligned to multiples of ``slot_seconds`` since the epoch, so every board
and the ledger agree on market ids without talking to each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MarketRules:
    """Defaults are the primary source's: 30-min slots, 48 a day, 0.1 kWh lots, gate 15 min before delivery."""

    slot_seconds: int = 1800
    markets_ahead: int = 48
    lot_wh: int = 100
    gate_closure_seconds: int = 900
    price_min_per_kwh_minor: int = 1
    price_max_per_kwh_minor: int = 100_000

    def slot_start(self, now_s: int) -> int:
        return now_s - now_s % self.slot_seconds

    def next_slot_start(self, now_s: int) -> int:
        return self.slot_start(now_s) + self.slot_seconds

    def slot_end(self, market_id: int) -> int:
        return market_id + self.slot_seconds

    def is_market_id(self, market_id: int) -> bool:
        return market_id >= 0 and market_id % self.slot_seconds == 0

    def gate_open(self, market_id: int, now_s: int) -> bool:
        """Orders are accepted while more than ``gate_closure_seconds`` remain before delivery starts."""
        return market_id - now_s > self.gate_closure_seconds

    def open_markets(self, now_s: int) -> list[int]:
        """The markets ahead whose gate is still open, nearest first (at most ``markets_ahead``)."""
        first = self.next_slot_start(now_s)
        candidates = (first + i * self.slot_seconds for i in range(self.markets_ahead))
        return [m for m in candidates if self.gate_open(m, now_s)]

    def whole_lots_wh(self, energy_wh: int) -> int:
        """Round down to whole lots: never offer or ask for energy the forecast does not cover."""
        return max(0, energy_wh) // self.lot_wh * self.lot_wh

    def is_whole_lots(self, energy_wh: int) -> bool:
        return energy_wh > 0 and energy_wh % self.lot_wh == 0

    def price_in_band(self, price_per_kwh_minor: int) -> bool:
        return self.price_min_per_kwh_minor <= price_per_kwh_minor <= self.price_max_per_kwh_minor

    def clamp_price(self, price_per_kwh_minor: int) -> int:
        return min(self.price_max_per_kwh_minor, max(self.price_min_per_kwh_minor, price_per_kwh_minor))


def cost_milli_minor(energy_wh: int, price_per_kwh_minor: int) -> int:
    """Money for an amount of energy, exact in integers: Wh x (minor/kWh) = 1/1000 minor unit."""
    return energy_wh * price_per_kwh_minor


def transfer_power_w(energy_wh: int, duration_s: int) -> int:
    """Constant power (rounded up) that moves ``energy_wh`` within ``duration_s``."""
    if duration_s <= 0:
        raise ValueError("duration_s must be positive")
    return -(-energy_wh * 3600 // duration_s)
