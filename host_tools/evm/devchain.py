"""A throwaway development chain: anvil + a deployed market + devices that sign (tests, bench, demo).

Devices here hold fresh random keys in memory; the operator and the relay are funded with
``anvil_setBalance``, which only a development node offers.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import coincurve

from firmware import eip712
from firmware.keystore import DeviceKey
from host_tools.evm.anvil import AnvilNode, start_anvil
from host_tools.evm.market import Account, Market, MarketRules, funded_account


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
    deploy_gas: int = 0
    # offsets for next_market(): both the block time and the offset only grow, so tests that
    # share one chain never share a book
    market_offsets: itertools.cycle = field(default_factory=lambda: itertools.cycle(range(2, 40)), repr=False)

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
        operator = funded_account(rpc, DeviceKey(coincurve.PrivateKey(os.urandom(32))))
        relay = funded_account(rpc, DeviceKey(coincurve.PrivateKey(os.urandom(32))))
        market, receipt = Market.deploy(rpc, operator, rules)
        return Chain(node=node, market=market, operator=operator, relay=relay, deploy_gas=receipt.gas_used)
    except BaseException:
        node.stop()
        raise


def next_market(chain: Chain) -> int:
    """A market with its gate open, different from the ones handed out before on this chain."""
    slot = chain.market.call("slotSeconds")[0]
    return (block_time(chain.market) // slot + next(chain.market_offsets)) * slot
