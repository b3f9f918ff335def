"""The market contract on a real EVM node (anvil, automine): Table 1, cancel, self-trade,
settlement, money locks, match cap, bulk cancel, and tampered messages refused."""

from __future__ import annotations

import pytest

from firmware import eip712
from host_tools.evm.market import CLOSE_REASONS, REJECTION_CODES, TxFailed

from .evm_helpers import TABLE1_ASKS, TABLE1_BIDS, Chain, block_time, next_market, start_chain

FUNDS = 10**12  # milli-minor units


@pytest.fixture(scope="module")
def chain():
    c = start_chain()
    yield c
    c.node.stop()


def submit(chain: Chain, message: eip712.TypedMessage):
    return chain.market.submit(chain.relay, message)


def book(chain: Chain, market_id: int, side: str) -> list[tuple[int, int]]:
    """(remaining Wh, price) of the resting orders in priority order."""
    ids = chain.market.call("bookOrders", market_id, eip712.SIDES[side])[0]
    out = []
    for order_id in ids:
        o = chain.market.call("orders", order_id)
        out.append((o[7], o[6]))
    return out


def trades(receipt) -> list[tuple[int, int, bytes, bytes]]:
    return [(t["energyWh"], t["pricePerKwhMinor"], t["seller"], t["buyer"]) for t in receipt.events("TradeMade")]


def account(chain: Chain, device) -> tuple[int, int]:
    return chain.market.call("balanceOf", device.address)[0], chain.market.call("lockedOf", device.address)[0]


def test_table1_and_both_worked_orders(chain):
    market_id = next_market(chain)
    sellers, buyers, newcomer = chain.device(), chain.device(credit=FUNDS), chain.device(credit=FUNDS)
    for kwh, price in TABLE1_ASKS:
        receipt = submit(chain, sellers.order(market_id, "sell", kwh * 1000, price))
        assert receipt.events("Accepted") and not receipt.events("TradeMade")
    for kwh, price in TABLE1_BIDS:
        receipt = submit(chain, buyers.order(market_id, "buy", kwh * 1000, price))
        assert receipt.events("Accepted") and not receipt.events("TradeMade")
    assert book(chain, market_id, "sell") == sorted(((k * 1000, p) for k, p in TABLE1_ASKS), key=lambda x: x[1])
    assert book(chain, market_id, "buy") == sorted(((k * 1000, p) for k, p in TABLE1_BIDS), key=lambda x: -x[1])

    # worked order 1: a sell of 5 kWh at 19.5 trades 5 kWh at 19.9; the 19.9 bid drops to 35 kWh
    receipt = submit(chain, newcomer.order(market_id, "sell", 5000, 1950))
    assert trades(receipt) == [(5000, 1990, newcomer.address, buyers.address)]
    assert book(chain, market_id, "buy")[0] == (35000, 1990)
    assert receipt.events("OrderPlaced")[0]["restingWh"] == 0

    # worked order 2: a buy of 26 kWh at 20.3 trades 20 kWh at 20.1 and 6 kWh at 20.2; 4 kWh stay at 20.2
    balance_before, _ = account(chain, newcomer)
    receipt = submit(chain, newcomer.order(market_id, "buy", 26000, 2030))
    assert trades(receipt) == [(20000, 2010, sellers.address, newcomer.address), (6000, 2020, sellers.address, newcomer.address)]
    assert book(chain, market_id, "sell")[:2] == [(4000, 2020), (20000, 2040)]
    # the buyer locked 26 kWh x 20.3 and got the price improvement back at once
    balance, locked = account(chain, newcomer)
    assert balance_before - balance == 20000 * 2010 + 6000 * 2020
    assert locked == 20000 * 2010 + 6000 * 2020


def test_time_priority_partial_fill_keeps_place_and_remainder_rests(chain):
    market_id = next_market(chain)
    a, b, c = chain.device(), chain.device(), chain.device(credit=FUNDS)
    submit(chain, a.order(market_id, "sell", 300, 2000))
    submit(chain, b.order(market_id, "sell", 300, 2000))
    receipt = submit(chain, c.order(market_id, "buy", 400, 2000))
    assert [(t[0], t[2]) for t in trades(receipt)] == [(300, a.address), (100, b.address)]
    assert book(chain, market_id, "sell") == [(200, 2000)]
    receipt = submit(chain, c.order(market_id, "buy", 500, 2100))
    assert [(t[0], t[1]) for t in trades(receipt)] == [(200, 2000)]
    assert book(chain, market_id, "buy") == [(300, 2100)]
    assert book(chain, market_id, "sell") == []


def test_self_trade_is_skipped_and_own_order_keeps_its_place(chain):
    market_id = next_market(chain)
    me, other = chain.device(credit=FUNDS), chain.device()
    own = me.order(market_id, "sell", 200, 1900)
    submit(chain, own)
    submit(chain, other.order(market_id, "sell", 200, 2000))
    receipt = submit(chain, me.order(market_id, "buy", 300, 2100))
    assert trades(receipt) == [(200, 2000, other.address, me.address)]
    assert book(chain, market_id, "sell") == [(200, 1900)]
    assert book(chain, market_id, "buy") == [(100, 2100)]  # rests crossed with its own ask; never trades


def test_cancel_only_by_owner_releases_the_lock(chain):
    market_id = next_market(chain)
    me, other = chain.device(credit=FUNDS), chain.device(credit=FUNDS)
    order = me.order(market_id, "buy", 1000, 2000)
    submit(chain, order)
    assert account(chain, me) == (FUNDS - 1000 * 2000, 1000 * 2000)
    # another device naming the same order nonce can only ever name its own (absent) order
    receipt = submit(chain, other.sign("cancel", market_id=market_id, order_nonce=order.nonce))
    assert REJECTION_CODES[receipt.events("Rejected")[0]["code"]] == "unknown_order"
    assert book(chain, market_id, "buy") == [(1000, 2000)]
    receipt = submit(chain, me.sign("cancel", market_id=market_id, order_nonce=order.nonce))
    closed = receipt.events("OrderClosed")[0]
    assert (closed["closedWh"], CLOSE_REASONS[closed["reason"]]) == (1000, "cancelled")
    assert account(chain, me) == (FUNDS, 0)
    assert book(chain, market_id, "buy") == []
    receipt = submit(chain, me.sign("cancel", market_id=market_id, order_nonce=order.nonce))
    assert REJECTION_CODES[receipt.events("Rejected")[0]["code"]] == "order_closed"


def test_order_rules_are_rejected_with_codes_and_nonce_consumed(chain):
    market_id = next_market(chain)
    me = chain.device(credit=10)
    current_slot = block_time(chain.market) // 1800 * 1800
    cases = [
        (me.order(market_id + 1, "sell", 100, 2000), "unknown_market"),
        (me.order(current_slot + 1800 * 49, "sell", 100, 2000), "unknown_market"),  # 48 markets ahead
        (me.order(current_slot, "sell", 100, 2000), "gate_closed"),
        (me.order(market_id, "sell", 100, 999), "price_out_of_band"),
        (me.order(market_id, "sell", 150, 2000), "not_whole_lots"),
        (me.order(market_id, "buy", 100, 2000), "insufficient_funds"),
    ]
    for message, code in cases:
        receipt = submit(chain, message)
        assert REJECTION_CODES[receipt.events("Rejected")[0]["code"]] == code
        assert chain.market.call("isNonceUsed", me.address, message.nonce) == [True]
        with pytest.raises(TxFailed, match="NonceUsed"):
            submit(chain, message)  # a resend is refused before the rules: nothing applied twice


def test_tampered_and_foreign_messages_are_refused(chain):
    market_id = next_market(chain)
    me = chain.device()
    good = me.order(market_id, "sell", 500, 2000)
    tampered = eip712.TypedMessage("order", {**good.fields, "price_per_kwh_minor": 3900}, good.signature)
    with pytest.raises(TxFailed, match="UnknownDevice"):
        submit(chain, tampered)  # recovers some other, unregistered address
    flipped = good.signature[:5] + bytes([good.signature[5] ^ 1]) + good.signature[6:]
    with pytest.raises(TxFailed, match="UnknownDevice|BadSignature"):
        submit(chain, eip712.TypedMessage("order", good.fields, flipped))
    high_s = eip712.SECP256K1_ORDER // 2 + 1  # s above n/2: the malleable twin of a signature is refused
    with pytest.raises(TxFailed, match="BadSignature"):
        submit(chain, eip712.TypedMessage("order", good.fields, good.signature[:32] + high_s.to_bytes(32, "big")))
    # nothing of the above consumed the nonce: the genuine message still lands
    receipt = submit(chain, good)
    assert receipt.events("Accepted")[0]["digest"] == good.digest(chain.market.domain())
    assert receipt.events("OrderPlaced")[0]["pricePerKwhMinor"] == 2000
    stranger = chain.device()
    chain.market.transact(chain.operator, "revokeDevice", stranger.address)
    with pytest.raises(TxFailed, match="DeviceRevoked"):
        submit(chain, stranger.order(market_id, "sell", 100, 2000))
    expired = me.sign("order", ttl_s=60, issued_at=0, market_id=market_id, side=2, energy_wh=100, price_per_kwh_minor=2000)
    with pytest.raises(TxFailed, match="MessageExpired"):
        submit(chain, expired)
    with pytest.raises(TxFailed, match="NotOperator"):
        chain.market.transact(chain.relay, "credit", me.address, 10**9)


def test_match_cap_cancels_the_remainder_and_releases_its_lock(chain):
    market_id = next_market(chain)
    maker, taker = chain.device(), chain.device(credit=FUNDS)
    for _ in range(25):
        submit(chain, maker.order(market_id, "sell", 100, 2000))
    receipt = submit(chain, taker.order(market_id, "buy", 2500, 2000))
    assert len(trades(receipt)) == 20  # MAX_MATCH_STEPS
    closed = receipt.events("OrderClosed")[0]
    assert (closed["closedWh"], CLOSE_REASONS[closed["reason"]]) == (500, "match_cap")
    assert account(chain, taker) == (FUNDS - 2000 * 2000, 2000 * 2000)
    assert book(chain, market_id, "sell") == [(100, 2000)] * 5
    assert book(chain, market_id, "buy") == []


def test_bulk_cancel_closes_lower_nonces_and_refuses_them_later(chain):
    market_id = next_market(chain)
    me = chain.device(credit=FUNDS)
    first, second = me.order(market_id, "buy", 100, 2000), me.order(market_id, "buy", 200, 2000)
    in_flight = me.order(market_id, "buy", 300, 2000)  # signed, but held back (by a relay, say)
    submit(chain, first)
    submit(chain, second)
    receipt = submit(chain, me.sign("bulk_cancel", min_nonce=in_flight.nonce + 1))
    assert sorted(e["closedWh"] for e in receipt.events("OrderClosed")) == [100, 200]
    assert account(chain, me) == (FUNDS, 0)
    with pytest.raises(TxFailed, match="NonceBelowMinimum"):
        submit(chain, in_flight)


def report(device, trade_id: int, market_id: int, role: str, energy_wh: int, status: str = "delivered"):
    return device.sign("delivery_report", trade_id=trade_id, market_id=market_id, role=eip712.ROLES[role],
                       energy_wh=energy_wh, status=eip712.STATUSES[status])


def test_settlement_on_metered_energy_and_shortfall(chain):
    market_id = next_market(chain)
    seller, buyer = chain.device(), chain.device(credit=FUNDS)
    submit(chain, seller.order(market_id, "sell", 1000, 2000))
    receipt = submit(chain, buyer.order(market_id, "buy", 1000, 2100))
    trade_id = receipt.events("TradeMade")[0]["tradeId"]
    assert account(chain, buyer) == (FUNDS - 1000 * 2000, 1000 * 2000)
    chain.advance_to(market_id + 1800)  # the slot has been delivered
    intruder = chain.device()
    assert REJECTION_CODES[submit(chain, report(intruder, trade_id, market_id, "seller", 1000)).events("Rejected")[0]["code"]] == "not_a_party"
    assert REJECTION_CODES[submit(chain, report(buyer, trade_id, market_id, "seller", 1000)).events("Rejected")[0]["code"]] == "wrong_role"
    receipt = submit(chain, report(seller, trade_id, market_id, "seller", 900))
    assert receipt.events("DeliveryReported") and not receipt.events("TradeSettled")
    receipt = submit(chain, report(buyer, trade_id, market_id, "buyer", 800))
    settled = receipt.events("TradeSettled")[0]
    assert (settled["settledWh"], settled["shortfallWh"], settled["shortfallDevice"]) == (800, 200, buyer.address)
    assert account(chain, buyer) == (FUNDS - 800 * 2000, 0)
    assert account(chain, seller) == (800 * 2000, 0)
    assert chain.market.call("shortfallWhOf", buyer.address) == [200]
    late = submit(chain, report(seller, trade_id, market_id, "seller", 1000))
    assert REJECTION_CODES[late.events("Rejected")[0]["code"]] == "trade_settled"


def test_settle_after_deadline_by_anyone_charges_the_silent_party(chain):
    market_id = next_market(chain)
    seller, buyer = chain.device(), chain.device(credit=FUNDS)
    submit(chain, seller.order(market_id, "sell", 500, 2000))
    trade_id = submit(chain, buyer.order(market_id, "buy", 500, 2000)).events("TradeMade")[0]["tradeId"]
    chain.advance_to(market_id + 1800)
    submit(chain, report(buyer, trade_id, market_id, "buyer", 500))
    with pytest.raises(TxFailed, match="TooEarly"):
        chain.market.transact(chain.relay, "settleAfterDeadline", trade_id)
    chain.advance_to(market_id + 1800 + 3600)
    receipt = chain.market.transact(chain.relay, "settleAfterDeadline", trade_id)
    settled = receipt.events("TradeSettled")[0]
    assert (settled["settledWh"], settled["shortfallWh"], settled["shortfallDevice"]) == (0, 500, seller.address)
    assert account(chain, buyer) == (FUNDS, 0)


def test_expire_after_gate_releases_unfilled_locks(chain):
    market_id = next_market(chain)
    me = chain.device(credit=FUNDS)
    receipt = submit(chain, me.order(market_id, "buy", 700, 2500))
    order_id = receipt.events("OrderPlaced")[0]["orderId"]
    assert chain.market.transact(chain.relay, "expire", [order_id]).events("OrderClosed") == []  # gate still open
    chain.advance_to(market_id - 900)
    closed = chain.market.transact(chain.relay, "expire", [order_id]).events("OrderClosed")[0]
    assert (closed["closedWh"], CLOSE_REASONS[closed["reason"]]) == (700, "expired")
    assert account(chain, me) == (FUNDS, 0)
