"""Market rules: slot alignment, open markets and the gate, whole lots, price band, money and power."""

from __future__ import annotations

import random

import pytest

from firmware.market import MarketRules, cost_milli_minor, transfer_power_w

DEFAULT = MarketRules()
SIM = MarketRules(slot_seconds=30, markets_ahead=8, lot_wh=100, gate_closure_seconds=10,
                  price_min_per_kwh_minor=1000, price_max_per_kwh_minor=4000)
T0 = 1767225600  # 2026-01-01T00:00:00Z: a multiple of 1800 (and of 30)


def test_defaults_are_the_primary_sources():
    assert (DEFAULT.slot_seconds, DEFAULT.markets_ahead, DEFAULT.lot_wh, DEFAULT.gate_closure_seconds) == (1800, 48, 100, 900)


# --- slots ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rules", [DEFAULT, SIM, MarketRules(slot_seconds=7)], ids=["1800", "30", "7"])
def test_slots_are_aligned_to_multiples_of_the_slot_length_since_the_epoch(rules):
    rng = random.Random(1)
    for now in [0, 1, T0 - 1, T0, T0 + 1] + [rng.randrange(0, 2**33) for _ in range(500)]:
        start = rules.slot_start(now)
        assert start % rules.slot_seconds == 0
        assert start <= now < start + rules.slot_seconds
        assert rules.next_slot_start(now) == start + rules.slot_seconds
        assert rules.slot_end(start) == start + rules.slot_seconds
        assert rules.is_market_id(start)


def test_slot_boundaries_exactly():
    assert DEFAULT.slot_start(T0) == T0  # a boundary belongs to the slot it starts
    assert DEFAULT.slot_start(T0 - 1) == T0 - 1800
    assert DEFAULT.slot_start(T0 + 1799) == T0
    assert DEFAULT.next_slot_start(T0) == T0 + 1800
    assert DEFAULT.next_slot_start(T0 - 1) == T0
    assert SIM.slot_start(T0 + 45) == T0 + 30


def test_market_ids():
    assert DEFAULT.is_market_id(T0) and DEFAULT.is_market_id(0)
    assert not DEFAULT.is_market_id(T0 + 1)
    assert not DEFAULT.is_market_id(T0 + 900)
    assert not DEFAULT.is_market_id(-1800)


# --- gate and open markets --------------------------------------------------------------------


def test_gate_is_open_only_while_more_than_gate_closure_remains():
    market = T0 + 1800
    assert DEFAULT.gate_open(market, market - 901)  # 901 s remain
    assert not DEFAULT.gate_open(market, market - 900)  # exactly 15 min: closed
    assert not DEFAULT.gate_open(market, market - 899)
    assert not DEFAULT.gate_open(market, market)  # delivery started
    assert not DEFAULT.gate_open(market, market + 10)
    assert DEFAULT.gate_open(market, market - 86_400)
    assert SIM.gate_open(T0 + 30, T0 + 19) and not SIM.gate_open(T0 + 30, T0 + 20)


def test_zero_gate_closes_at_the_slot_start():
    rules = MarketRules(gate_closure_seconds=0)
    assert rules.gate_open(T0, T0 - 1)
    assert not rules.gate_open(T0, T0)


@pytest.mark.parametrize("offset, count", [
    (0, 48),  # at a slot start, the next slot has 1800 s to go
    (1, 48),
    (899, 48),  # 901 s remain before the next slot: still open
    (900, 47),  # exactly 900 s remain: the next slot's gate has just closed
    (901, 47),
    (1799, 47),
])
def test_open_markets_count_and_gate_boundary(offset, count):
    now = T0 + offset
    markets = DEFAULT.open_markets(now)
    assert len(markets) == count
    nearest = T0 + 1800 if count == 48 else T0 + 3600
    assert markets[0] == nearest
    assert markets == [nearest + i * 1800 for i in range(count)]  # aligned, nearest first, contiguous
    assert markets[-1] == T0 + 48 * 1800  # never beyond markets_ahead slots
    assert all(DEFAULT.gate_open(m, now) and DEFAULT.is_market_id(m) for m in markets)
    assert not DEFAULT.gate_open(nearest - 1800, now)  # the one before is closed (or running)


def test_open_markets_on_the_sim_bench():
    assert SIM.open_markets(T0) == [T0 + 30 * i for i in range(1, 9)]
    assert SIM.open_markets(T0 + 19) == [T0 + 30 * i for i in range(1, 9)]  # 11 s remain > 10
    assert SIM.open_markets(T0 + 20) == [T0 + 30 * i for i in range(2, 9)]  # 10 s remain: closed


def test_a_gate_longer_than_a_slot_closes_several_markets():
    rules = MarketRules(slot_seconds=60, markets_ahead=10, gate_closure_seconds=150)
    # now = T0: next slots are T0+60 (60 s away), +120, +180 ... only those more than 150 s away are open
    assert rules.open_markets(T0) == [T0 + 60 * i for i in range(3, 11)]


# --- lots and prices --------------------------------------------------------------------------


@pytest.mark.parametrize("energy, lots", [
    (0, 0), (1, 0), (99, 0), (100, 100), (101, 100), (199, 100), (200, 200), (250, 200), (9_999, 9_900),
    (-1, 0), (-250, 0),
])
def test_whole_lots_round_down(energy, lots):
    assert DEFAULT.whole_lots_wh(energy) == lots


def test_whole_lots_with_another_lot_size():
    rules = MarketRules(lot_wh=250)
    assert [rules.whole_lots_wh(e) for e in (249, 250, 499, 500, 740, 760)] == [0, 250, 250, 500, 500, 750]
    assert rules.is_whole_lots(750) and not rules.is_whole_lots(760)


def test_is_whole_lots():
    assert DEFAULT.is_whole_lots(100) and DEFAULT.is_whole_lots(3000)
    assert not DEFAULT.is_whole_lots(0)  # an order of nothing is not an order
    assert not DEFAULT.is_whole_lots(150)
    assert not DEFAULT.is_whole_lots(-100)


def test_price_band_inclusive_and_clamp():
    assert SIM.price_in_band(1000) and SIM.price_in_band(4000) and SIM.price_in_band(2450)
    assert not SIM.price_in_band(999) and not SIM.price_in_band(4001) and not SIM.price_in_band(0)
    assert [SIM.clamp_price(p) for p in (0, 999, 1000, 2450, 4000, 4001, 10**9)] == [1000, 1000, 1000, 2450, 4000, 4000, 4000]
    assert DEFAULT.price_in_band(1) and DEFAULT.price_in_band(100_000) and not DEFAULT.price_in_band(100_001)


# --- money and power --------------------------------------------------------------------------


def test_cost_is_exact_in_milli_minor_units():
    # 0.3 kWh at 24.50 yen/kWh (2450 hundredths of a yen) = 7.35 yen = 735 hundredths = 735000 milli
    assert cost_milli_minor(300, 2450) == 735_000
    assert cost_milli_minor(100, 1) == 100  # 0.1 kWh at 1 minor/kWh = 0.1 minor
    assert cost_milli_minor(0, 4000) == 0
    assert cost_milli_minor(10**12, 10**6) == 10**18  # no float rounding anywhere
    assert isinstance(cost_milli_minor(123, 457), int)


@pytest.mark.parametrize("energy, duration, power", [
    (100, 3600, 100),
    (100, 1800, 200),
    (300, 1800, 600),
    (100, 30, 12_000),  # a sim slot: 0.1 kWh in 30 s
    (1, 7, 515),  # 3600/7 = 514.28... rounded up
    (1, 3600, 1),
    (1, 3601, 1),  # 0.9997 W rounded up
    (0, 1800, 0),
])
def test_transfer_power_rounds_up(energy, duration, power):
    assert transfer_power_w(energy, duration) == power


def test_transfer_power_always_covers_the_energy_with_the_least_whole_watt():
    rng = random.Random(7)
    for _ in range(2000):
        energy, duration = rng.randrange(1, 50_000), rng.randrange(1, 7200)
        power = transfer_power_w(energy, duration)
        assert power * duration >= energy * 3600  # enough
        assert (power - 1) * duration < energy * 3600  # and one watt less would not be


@pytest.mark.parametrize("duration", [0, -1, -1800])
def test_transfer_power_needs_a_positive_duration(duration):
    with pytest.raises(ValueError, match="duration_s must be positive"):
        transfer_power_w(100, duration)
