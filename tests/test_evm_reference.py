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
