"""The contract's book against the bench ledger's pure auction (an independent reference): a random
stream of orders and cancels gives the same trades, in the same order, and the same resting book.
Money is checked too: every device's balance + lock only moves by settlement (none here)."""

from __future__ import annotations

import itertools
import random

import pytest

from firmware import eip712
from host_tools.bench_ledger.auction import BookOrder, OrderBook

from .evm_helpers import next_market, start_chain

FUNDS = 10**12


@pytest.fixture(scope="module")
def chain():
    c = start_chain()
    yield c
    c.node.stop()


@pytest.mark.parametrize("seed", [3, 11])
def test_random_flow_matches_reference_auction(chain, seed):
    rng = random.Random(seed)
    market_id = next_market(chain)
    devices = [chain.device(credit=FUNDS) for _ in range(4)]
    name = {d.address: f"d{i}" for i, d in enumerate(devices)}
    reference = OrderBook()
    seq = itertools.count(1)
    resting: list[tuple[object, int]] = []
    contracted: dict[bytes, int] = {d.address: 0 for d in devices}  # buyer's payments held for settlement
    for _ in range(70):
        if resting and rng.random() < 0.15:
            device, order_nonce = resting.pop(rng.randrange(len(resting)))
            expected = reference.cancel(name[device.address], order_nonce)
            receipt = chain.market.submit(chain.relay, device.sign("cancel", market_id=market_id, order_nonce=order_nonce))
            if expected is None:
                assert receipt.events("Rejected")
            else:
                assert [e["closedWh"] for e in receipt.events("OrderClosed")] == [expected.remaining_wh]
            continue
        device = rng.choice(devices)
        side = rng.choice(("buy", "sell"))
        wh = rng.randint(1, 8) * 100
        price = rng.randint(1950, 2050)
        message = device.order(market_id, side, wh, price)
        result = reference.submit(BookOrder(device_id=name[device.address], order_nonce=message.nonce, side=side,
                                            price_per_kwh_minor=price, remaining_wh=wh, seq=next(seq)))
        receipt = chain.market.submit(chain.relay, message)
        assert not receipt.events("OrderClosed"), "match cap reached: the stream is meant to stay under it"
        got = [(t["energyWh"], t["pricePerKwhMinor"], t["sellerNonce"] if side == "buy" else t["buyerNonce"],
                name[t["seller"] if side == "buy" else t["buyer"]]) for t in receipt.events("TradeMade")]
        want = [(f.energy_wh, f.price_per_kwh_minor, f.maker.order_nonce, f.maker.device_id) for f in result.fills]
        assert got == want
        for t in receipt.events("TradeMade"):
            contracted[t["buyer"]] += t["energyWh"] * t["pricePerKwhMinor"]
        if result.rested is not None:
            resting.append((device, message.nonce))
    for side, ref in (("sell", reference.asks()), ("buy", reference.bids())):
        ids = chain.market.call("bookOrders", market_id, eip712.SIDES[side])[0]
        on_chain = [chain.market.call("orders", i) for i in ids]
        assert [(name[o[0]], o[1], o[7], o[6]) for o in on_chain] == [(r.device_id, r.order_nonce, r.remaining_wh, r.price_per_kwh_minor) for r in ref]
    for device in devices:
        balance, locked = chain.market.call("balanceOf", device.address)[0], chain.market.call("lockedOf", device.address)[0]
        assert balance + locked == FUNDS
        # what stays locked is exactly the open buys at their limits plus the contracted trades' payments
        open_buys = sum(r.remaining_wh * r.price_per_kwh_minor for r in reference.bids() if r.device_id == name[device.address])
        assert locked == open_buys + contracted[device.address]


def test_money_is_conserved_through_reports_settlement_and_expiry(chain):
    """Random trades, random (or missing) reports, deadline settlement and expiry: in the end every
    trade is settled, nothing stays locked, and the devices' money adds up to what was credited;
    each trade's payment is min(contracted, reports) x price and its shortfall is charged as documented."""
    rng = random.Random(23)
    market_id = next_market(chain)
    devices = [chain.device(credit=FUNDS) for _ in range(4)]
    trades = []
    for _ in range(30):
        device = rng.choice(devices)
        side = rng.choice(("buy", "sell"))
        receipt = chain.market.submit(chain.relay, device.order(market_id, side, rng.randint(1, 6) * 100, rng.randint(1980, 2020)))
        trades += receipt.events("TradeMade")
    assert trades, "the stream is meant to trade"
    chain.advance_to(market_id + 1800)
    by_address = {d.address: d for d in devices}
    expected_paid = {}
    for t in trades:
        reports = {}
        for role, party in (("seller", t["seller"]), ("buyer", t["buyer"])):
            if rng.random() < 0.8:  # sometimes a party stays silent
                wh = rng.randint(0, t["energyWh"] // 100 + 1) * 100
                reports[role] = wh
                chain.market.submit(chain.relay, by_address[party].sign(
                    "delivery_report", trade_id=t["tradeId"], market_id=market_id, role=eip712.ROLES[role], energy_wh=wh, status=1))
        settled = min([t["energyWh"], reports.get("seller", 0), reports.get("buyer", 0)])
        if settled == t["energyWh"]:
            party = bytes(20)
        elif len(reports) == 1:
            party = t["buyer"] if "seller" in reports else t["seller"]  # the silent one
        else:
            party = t["buyer"] if reports.get("buyer", 0) < reports.get("seller", 0) else t["seller"]  # lower; seller on a tie
        expected_paid[t["tradeId"]] = (settled * t["pricePerKwhMinor"], t["energyWh"] - settled, party)
    chain.advance_to(market_id + 1800 + 3600)
    for t in trades:
        if chain.market.call("trades", t["tradeId"])[3] & 4 == 0:
            chain.market.transact(chain.relay, "settleAfterDeadline", t["tradeId"])
    for t in trades:
        assert chain.market.call("trades", t["tradeId"])[3] & 4, "every trade is settled"
    logged = {lg.args["tradeId"]: lg.args for lg in chain.market.logs("TradeSettled")}
    for t in trades:
        event = logged[t["tradeId"]]
        assert (event["paidMilliMinor"], event["shortfallWh"], event["shortfallDevice"]) == expected_paid[t["tradeId"]]
    open_ids = [i for d in devices for i in chain.market.call("openOrdersOf", d.address)[0]]
    chain.market.transact(chain.relay, "expire", open_ids)
    total = 0
    for device in devices:
        balance, locked = chain.market.call("balanceOf", device.address)[0], chain.market.call("lockedOf", device.address)[0]
        assert locked == 0
        total += balance
    assert total == FUNDS * len(devices)
