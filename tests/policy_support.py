"""Shared by the policy tests: the default market, policy and tariffs, a stand-in for the
journal's order rows (what ``reconcile_market`` reads), and a clock set relative to the gate."""

from __future__ import annotations

from dataclasses import dataclass

from firmware.config import PolicyConfig
from firmware.market import MarketRules
from firmware.policy import Tariffs

RULES = MarketRules()
POLICY = PolicyConfig()
TARIFFS = Tariffs()
MARKET = 1_000 * 1800


@dataclass
class Order:
    nonce: int
    side: str
    price_per_kwh_minor: int
    state: str
    energy_wh: int
    filled_wh: int = 0

    @property
    def remaining_wh(self) -> int:
        return self.energy_wh - self.filled_wh


def at(seconds_to_gate: int, market: int = MARKET) -> int:
    return market - RULES.gate_closure_seconds - seconds_to_gate
