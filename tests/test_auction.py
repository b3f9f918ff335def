"""Pure tests of the continuous double auction (host_tools.bench_ledger.auction)."""

from __future__ import annotations

import itertools

import pytest

from host_tools.bench_ledger.auction import AuctionError, BookOrder, OrderBook

# Table 1 of the primary source: (kWh, yen/kWh) -> (Wh, minor units = 1/100 yen per kWh).
# "Over" and "UNDER" are modelled as far prices (4000 and 1000).
TABLE1_ASKS = [(16, 4000), (3, 2100), (30, 2080), (15, 2070), (12, 2060), (10, 2050), (20, 2040), (10, 2020), (20, 2010)]
TABLE1_BIDS = [(40, 1990), (5, 1980), (10, 1970), (50, 1960), (20, 1950), (9, 1940), (4, 1930), (12, 1910), (18, 1000)]


class Seq:
    """Hands out increasing time-priority numbers."""

    def __init__(self) -> None:
        self._it = itertools.count(1)

    def __call__(self) -> int:
        return next(self._it)


def order(device: str, nonce: int, side: str, wh: int, price: int, seq: int) -> BookOrder:
    return BookOrder(device_id=device, order_nonce=nonce, side=side, price_per_kwh_minor=price, remaining_wh=wh, seq=seq)


def table1_book() -> tuple[OrderBook, Seq]:
    seq = Seq()
    resting = [order(f"seller{i}", 1, "sell", kwh * 1000, price, seq()) for i, (kwh, price) in enumerate(TABLE1_ASKS)]
    resting += [order(f"buyer{i}", 1, "buy", kwh * 1000, price, seq()) for i, (kwh, price) in enumerate(TABLE1_BIDS)]
    return OrderBook(resting), seq


def levels(orders: list[BookOrder]) -> list[tuple[int, int]]:
    return [(o.remaining_wh, o.price_per_kwh_minor) for o in orders]


def test_table1_no_trade_while_spread_is_open():
    book, _ = table1_book()
    assert levels(book.asks())[0] == (20000, 2010)
    assert levels(book.bids())[0] == (40000, 1990)
    assert [p for _, p in levels(book.asks())] == sorted(p for _, p in TABLE1_ASKS)
    assert [p for _, p in levels(book.bids())] == sorted((p for _, p in TABLE1_BIDS), reverse=True)


def test_table1_sell_5kwh_at_19_5_trades_at_19_9():
    book, seq = table1_book()
    result = book.submit(order("taker", 1, "sell", 5000, 1950, seq()))
    assert [(f.energy_wh, f.price_per_kwh_minor, f.maker.device_id) for f in result.fills] == [(5000, 1990, "buyer0")]
    assert result.filled_wh == 5000 and result.remaining_wh == 0 and result.rested is None
    assert levels(book.bids())[0] == (35000, 1990)
    assert levels(book.asks()) == levels(table1_book()[0].asks())


def test_table1_buy_26kwh_at_20_3_walks_two_levels():
    book, seq = table1_book()
    result = book.submit(order("taker", 1, "buy", 26000, 2030, seq()))
    assert [(f.energy_wh, f.price_per_kwh_minor) for f in result.fills] == [(20000, 2010), (6000, 2020)]
    assert result.remaining_wh == 0
    assert levels(book.asks())[:2] == [(4000, 2020), (20000, 2040)]
    assert levels(book.bids()) == levels(table1_book()[0].bids())


def test_time_priority_at_equal_price_and_partial_maker_keeps_place():
    seq = Seq()
    book = OrderBook([order("a", 1, "sell", 300, 2000, seq()), order("b", 1, "sell", 300, 2000, seq())])
    result = book.submit(order("c", 1, "buy", 400, 2000, seq()))
    assert [(f.maker.device_id, f.energy_wh) for f in result.fills] == [("a", 300), ("b", 100)]
    assert [(o.device_id, o.remaining_wh, o.seq) for o in book.asks()] == [("b", 200, 2)]


def test_price_priority_beats_time_priority():
    seq = Seq()
    book = OrderBook([order("early", 1, "buy", 100, 1900, seq()), order("late", 1, "buy", 100, 2000, seq())])
    result = book.submit(order("s", 1, "sell", 100, 1800, seq()))
    assert result.fills[0].maker.device_id == "late"
    assert result.fills[0].price_per_kwh_minor == 2000  # the resting order's price, not the seller's 1800


def test_remainder_rests_at_own_limit_behind_existing_orders():
    seq = Seq()
    book = OrderBook([order("a", 1, "sell", 100, 2000, seq())])
    book.submit(order("x", 1, "buy", 100, 1900, seq()))
    result = book.submit(order("y", 1, "buy", 300, 2000, seq()))
    assert result.filled_wh == 100 and result.remaining_wh == 200
    assert result.rested is not None and result.rested.price_per_kwh_minor == 2000
    assert [(o.device_id, o.remaining_wh, o.price_per_kwh_minor) for o in book.bids()] == [("y", 200, 2000), ("x", 100, 1900)]
    assert book.asks() == []


def test_limit_stops_matching():
    seq = Seq()
    book = OrderBook([order("a", 1, "sell", 100, 2000, seq()), order("b", 1, "sell", 100, 2200, seq())])
    result = book.submit(order("c", 1, "buy", 500, 2100, seq()))
    assert [(f.maker.device_id, f.energy_wh) for f in result.fills] == [("a", 100)]
    assert levels(book.asks()) == [(100, 2200)]
    assert levels(book.bids()) == [(400, 2100)]


def test_self_trade_is_skipped_and_own_order_keeps_its_place():
    seq = Seq()
    own = order("me", 1, "sell", 200, 1900, seq())
    other = order("other", 1, "sell", 200, 2000, seq())
    book = OrderBook([own, other])
    result = book.submit(order("me", 2, "buy", 300, 2100, seq()))
    # skipped its own cheaper ask, traded with the other device's ask behind it
    assert [(f.maker.device_id, f.energy_wh, f.price_per_kwh_minor) for f in result.fills] == [("other", 200, 2000)]
    assert book.asks() == [own]  # untouched, same seq
    assert levels(book.bids()) == [(100, 2100)]  # remainder rests, crossed with its own ask; never trades


def test_several_orders_per_device_and_cancel():
    seq = Seq()
    book = OrderBook()
    book.submit(order("me", 1, "buy", 100, 1900, seq()))
    book.submit(order("me", 2, "buy", 200, 1950, seq()))
    assert [o.order_nonce for o in book.bids()] == [2, 1]
    removed = book.cancel("me", 2)
    assert removed is not None and removed.remaining_wh == 200
    assert book.cancel("me", 2) is None
    assert book.cancel("nobody", 1) is None
    assert [o.order_nonce for o in book.bids()] == [1]


def test_fill_after_cancel_uses_next_order():
    seq = Seq()
    book = OrderBook([order("a", 1, "buy", 100, 2000, seq()), order("b", 1, "buy", 100, 1990, seq())])
    book.cancel("a", 1)
    result = book.submit(order("s", 1, "sell", 100, 1000, seq()))
    assert result.fills[0].maker.device_id == "b" and result.fills[0].price_per_kwh_minor == 1990


def test_quantities_are_conserved_over_random_flow():
    """Every Wh that leaves the book as a fill left both sides equally; nothing appears from nowhere."""
    import random

    rng = random.Random(7)
    seq = Seq()
    book = OrderBook()
    submitted = {"buy": 0, "sell": 0}
    filled = 0
    for n in range(400):
        side = rng.choice(("buy", "sell"))
        wh = rng.randint(1, 20) * 100
        price = rng.randint(1900, 2100)
        submitted[side] += wh
        device = f"d{rng.randint(0, 5)}"
        result = book.submit(order(device, n + 1, side, wh, price, seq()))
        filled += result.filled_wh
        for fill in result.fills:
            assert fill.maker.side != side
            assert (fill.price_per_kwh_minor <= price) if side == "buy" else (fill.price_per_kwh_minor >= price)
            assert fill.maker.device_id != device  # never a self-trade
    resting = {s: sum(o.remaining_wh for o in (book.bids() if s == "buy" else book.asks())) for s in ("buy", "sell")}
    assert submitted["buy"] - resting["buy"] == filled == submitted["sell"] - resting["sell"]
    # the book never rests crossed between different devices
    for bid in book.bids():
        for ask in book.asks():
            if ask.price_per_kwh_minor <= bid.price_per_kwh_minor:
                assert ask.device_id == bid.device_id


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"side": "hold"}, "side"),
        ({"remaining_wh": 0}, "remaining_wh"),
        ({"remaining_wh": 1.5}, "remaining_wh"),
        ({"price_per_kwh_minor": -1}, "price_per_kwh_minor"),
        ({"seq": "1"}, "seq"),
    ],
)
def test_bad_orders_name_the_field(kwargs, field):
    base = {"device_id": "a", "order_nonce": 1, "side": "buy", "price_per_kwh_minor": 2000, "remaining_wh": 100, "seq": 1}
    with pytest.raises(AuctionError, match=field):
        BookOrder(**{**base, **kwargs})


def test_duplicate_and_out_of_order_submissions_are_refused():
    book = OrderBook([order("a", 1, "buy", 100, 2000, 5)])
    with pytest.raises(AuctionError, match="already in the book"):
        book.submit(order("a", 1, "buy", 100, 2000, 6))
    with pytest.raises(AuctionError, match="seq"):
        book.submit(order("b", 1, "sell", 100, 2100, 3))
    with pytest.raises(AuctionError, match="already in the book"):
        OrderBook([order("a", 1, "buy", 100, 2000, 1), order("a", 1, "sell", 100, 2000, 2)])


class ReferenceBook:
    """An independent, deliberately naive auction (sort everything, walk it) to check the ledger's
    levelled in-memory book against: same rules, written the obvious way."""

    def __init__(self) -> None:
        self.orders: dict[tuple[str, int], list] = {}  # key -> [side, price, remaining, seq]

    def submit(self, device: str, nonce: int, side: str, wh: int, price: int, seq: int) -> list[tuple]:
        opposite = sorted(((k, v) for k, v in self.orders.items() if v[0] != side),
                          key=lambda kv: ((kv[1][1] if side == "buy" else -kv[1][1]), kv[1][3]))
        fills = []
        for key, v in opposite:
            if wh == 0 or (side == "buy" and v[1] > price) or (side == "sell" and v[1] < price):
                break
            if key[0] == device:
                continue
            q = min(wh, v[2])
            fills.append((key, q, v[1]))
            wh -= q
            v[2] -= q
            if v[2] == 0:
                del self.orders[key]
        if wh:
            self.orders[(device, nonce)] = [side, price, wh, seq]
        return fills

    def side(self, side: str) -> list[tuple]:
        rows = sorted(((k, v) for k, v in self.orders.items() if v[0] == side),
                      key=lambda kv: ((kv[1][1] if side == "sell" else -kv[1][1]), kv[1][3]))
        return [(k, v[1], v[2]) for k, v in rows]


def test_the_levelled_book_matches_a_naive_reference_over_random_flows_with_cancels():
    from hypothesis import given, settings, strategies as st

    step = st.tuples(st.sampled_from(["buy", "sell", "cancel"]), st.integers(0, 4), st.integers(1, 5),
                     st.integers(1950, 2050), st.integers(0, 10**6))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(step, min_size=1, max_size=80))
    def check(steps):
        book, ref, seq = OrderBook(), ReferenceBook(), Seq()
        nonce = 0
        for kind, dev, lots, price, pick in steps:
            device = f"d{dev}"
            if kind == "cancel":
                if ref.orders:
                    key = sorted(ref.orders)[pick % len(ref.orders)]
                    del ref.orders[key]
                    assert book.cancel(*key) is not None
                continue
            nonce += 1
            s = seq()
            result = book.submit(order(device, nonce, kind, lots * 100, price, s))
            expected = ref.submit(device, nonce, kind, lots * 100, price, s)
            assert [(f.maker.key, f.energy_wh, f.price_per_kwh_minor) for f in result.fills] == expected
        assert [(o.key, o.price_per_kwh_minor, o.remaining_wh) for o in book.asks()] == ref.side("sell")
        assert [(o.key, o.price_per_kwh_minor, o.remaining_wh) for o in book.bids()] == ref.side("buy")
        # rebuilding from the resting orders (as the ledger does at start) gives the same book
        again = OrderBook(book.asks() + book.bids())
        assert again.asks() == book.asks() and again.bids() == book.bids()

    check()


def test_per_device_counters_follow_the_book():
    """The ledger's caps read these counters instead of SQL: they must equal a recount."""
    import random

    rng = random.Random(3)
    book, seq = OrderBook(), Seq()
    for n in range(600):
        device = f"d{rng.randint(0, 4)}"
        if rng.random() < 0.2 and len(book.asks() + book.bids()):
            victim = rng.choice(book.asks() + book.bids())
            book.cancel(victim.device_id, victim.order_nonce)
        else:
            book.submit(order(device, n + 1, rng.choice(("buy", "sell")), rng.randint(1, 5) * 100, rng.randint(1950, 2050), seq()))
        for d in (f"d{i}" for i in range(5)):
            mine = [o for o in book.asks() + book.bids() if o.device_id == d]
            assert book.open_orders_of(d) == len(mine)
            assert book.offered_wh_of(d) == sum(o.remaining_wh for o in mine if o.side == "sell")
