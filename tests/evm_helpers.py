"""Shared set-up for the EVM tests: a real anvil node, a deployed market, devices that sign."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import coincurve

from firmware import eip712
from firmware.keystore import DeviceKey
from host_tools.evm.anvil import AnvilNode, start_anvil
from host_tools.evm.market import Account, Market, MarketRules, funded_account

TABLE1_ASKS = [(16, 4000), (3, 2100), (30, 2080), (15, 2070), (12, 2060), (10, 2050), (20, 2040), (10, 2020), (20, 2010)]
TABLE1_BIDS = [(40, 1990), (5, 1980), (10, 1970), (50, 1960), (20, 1950), (9, 1940), (4, 1930), (12, 1910), (18, 1000)]


@dataclass
class Device:
    """A board's key and its message counter (what the firmware's outbox would hold)."""

    market: Market
    key: DeviceKey = field(default_factory=lambda: DeviceKey(coincurve.PrivateKey(os.urandom(32))))
    nonces: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def address(self) -> bytes:
        return eip712.address_from_public_key(self.key.public_key)

    def sign(self, kind: str, *, ttl_s: int = 600, issued_at: int | None = None, **body: int) -> eip712.TypedMessage:
        now = issued_at if issued_at is not None else block_time(self.market)
        fields = eip712.new_fields(kind, nonce=next(self.nonces), issued_at=now, ttl_s=ttl_s, **body)
        return eip712.sign_typed(self.market.domain(), kind, fields, self.key)

    def order(self, market_id: int, side: str, energy_wh: int, price: int) -> eip712.TypedMessage:
        return self.sign("order", market_id=market_id, side=eip712.SIDES[side], energy_wh=energy_wh, price_per_kwh_minor=price)


@dataclass
class Chain:
    node: AnvilNode
    market: Market
    operator: Account
    relay: Account

    def device(self, *, credit: int = 0) -> Device:
        device = Device(self.market)
        self.market.transact(self.operator, "registerDevice", device.address)
        if credit:
            self.market.transact(self.operator, "credit", device.address, credit)
        return device

    def advance_to(self, timestamp: int) -> None:
        """Mine a block at ``timestamp`` or later (past gates and deadlines)."""
        now = block_time(self.market)
        if timestamp > now:
            self.advance(timestamp - now)

    def advance(self, seconds: int) -> None:
        rpc = self.market.rpc
        rpc.call("evm_increaseTime", seconds)
        rpc.call("evm_mine")


def block_time(market: Market) -> int:
    return int(market.rpc.call("eth_getBlockByNumber", "latest", False)["timestamp"], 16)


def start_chain(rules: MarketRules = MarketRules(), **anvil_kwargs) -> Chain:
    node = start_anvil(**anvil_kwargs)
    try:
        rpc = node.rpc()
        operator = funded_account(rpc, coincurve.PrivateKey(os.urandom(32)))
        relay = funded_account(rpc, coincurve.PrivateKey(os.urandom(32)))
        market, _ = Market.deploy(rpc, operator, rules)
        return Chain(node=node, market=market, operator=operator, relay=relay)
    except BaseException:
        node.stop()
        raise


_AHEAD = itertools.cycle(range(2, 40))


def next_market(chain: Chain) -> int:
    """A market with its gate open, different from the ones handed out before on this chain.

    Both the block time and the offset only grow, so tests sharing one chain never share a book.
    """
    slot = 1800
    return (block_time(chain.market) // slot + next(_AHEAD)) * slot
