"""Helpers for tests that need this board's own orders in a real journal (issue 7 a, i).

A trade only schedules a delivery when it matches one of the board's orders
(firmware/trade_matching.py), so a test that injects trades places the matching order first.
"""

from __future__ import annotations

import dataclasses

import coincurve

from firmware.journal import Journal
from firmware.keystore import DeviceKey
from firmware.ledger.base import TradeRecord
from firmware.messages import SignedMessage, new_fields

LEDGER_ID = "dgc-test"


def device_key(seed: int = 1) -> DeviceKey:
    return DeviceKey(coincurve.PrivateKey(bytes([seed]) * 32))


def place_order(journal: Journal, key: DeviceKey, *, market_id: int, side: str, energy_wh: int,
                price_per_kwh_minor: int, issued_at: int = 1_000_000, ttl_s: int = 600,
                ledger_id: str = LEDGER_ID) -> SignedMessage:
    """Sign and journal an order, as the trading job does."""
    def build(nonce: int) -> dict:
        return new_fields("order", ledger_id=ledger_id, device_id=key.device_id, nonce=nonce, issued_at=issued_at,
                          ttl_s=ttl_s, market_id=market_id, side=side, energy_wh=energy_wh,
                          price_per_kwh_minor=price_per_kwh_minor)

    return journal.enqueue_order(build, key)


def with_own_order(journal: Journal, key: DeviceKey, trade: TradeRecord, *, limit: int | None = None) -> TradeRecord:
    """Place an order this trade matches (same market, side, the trade's quantity and price) and
    return the trade pointing at that order's nonce."""
    message = place_order(journal, key, market_id=trade.market_id, side=trade.side, energy_wh=trade.energy_wh,
                          price_per_kwh_minor=limit if limit is not None else trade.price_per_kwh_minor)
    return dataclasses.replace(trade, order_nonce=message.fields["nonce"])


def ack(journal: Journal, message: SignedMessage, *, filled_wh: int = 0) -> None:
    """The ledger accepted the order, with ``filled_wh`` traded at once."""
    entry = next(e for e in journal.pending_outbox(limit=10_000) if e.nonce == message.fields["nonce"])
    journal.settle_outbox(entry, accepted=True, answer={"status": "accepted", "duplicate": False, "code": None,
                                                        "detail": "", "result": {"filled_wh": filled_wh}})
