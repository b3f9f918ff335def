"""The neighbourhood's ledger on a chain (`dgc-host demo --ledger evm`, hil_tests/test_daemon_evm.py).

What runs: anvil (started by its binary path on 127.0.0.1, stopped by pid), the DgcMarket contract
deployed with the board template's market rules, and `dgc-host relay serve` as its own process
with its own funded key file. This object is the market's operator: it registers and credits
each house's address, and it reads the outcome (trades, reports, settlements) from the chain's
logs - the same figures the bench ledger's /v1/stats gives, so the demo's summary line is the
same.

Why interval mining (1-s blocks by default) and not automine: the board's clock guard compares
its clock with the latest block's timestamp; on an idle automine chain that timestamp stands
still. One-second blocks keep the chain's clock within a block period of the wall clock, and the
houses' configs get a clock tolerance wider than that period (docs/ledger-evm.md).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable

import coincurve

from firmware import eip712
from firmware.keystore import DeviceKey, generate_key_file, load_key_file

from .anvil import AnvilNode, start_anvil
from .market import Market, MarketRules, funded_account, topic_address

RELAY_LISTENING = re.compile(r"relay listening on (http://127\.0\.0\.1:\d+)")
DEFAULT_CREDIT_MILLI_MINOR = 10**12  # ample for a demo day: a buyer's payment is locked at order time


def rules_from_market_table(market: dict) -> MarketRules:
    """The contract's rules from a board config's [market] table (the board and the chain must agree)."""
    d = MarketRules()
    return MarketRules(
        slot_seconds=int(market.get("slot_seconds", 1800)),
        gate_closure_seconds=int(market.get("gate_closure_seconds", 900)),
        markets_ahead=int(market.get("markets_ahead", 48)),
        lot_wh=int(market.get("lot_wh", d.lot_wh)),
        price_min_per_kwh_minor=int(market.get("price_min_per_kwh_minor", d.price_min_per_kwh_minor)),
        price_max_per_kwh_minor=int(market.get("price_max_per_kwh_minor", d.price_max_per_kwh_minor)),
        # reports are due within a few slots (at least a minute): settlement happens inside the run
        report_deadline_seconds=max(60, 10 * int(market.get("slot_seconds", 1800))),
    )


class ChainLedger:
    """anvil + DgcMarket + a relay process; ``process_factory(name, argv, log_path)`` starts the
    relay as the neighbourhood starts its other processes (a ManagedProcess)."""

    def __init__(self, workdir: Path, rules: MarketRules, *, block_time_s: int = 1, last_market_id: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.rules = rules
        self.block_time_s = block_time_s
        self.last_market_id = last_market_id
        self.node: AnvilNode | None = None
        self.market: Market | None = None
        self.operator = None
        self.relay = None  # the relay's ManagedProcess
        self.relay_url = ""
        self.from_block = 0

    def start(self, process_factory: Callable[[str, list[str], Path], object]) -> "ChainLedger":
        self.node = start_anvil(block_time_s=self.block_time_s or None)
        rpc = self.node.rpc()
        # the operator's key lives only in this process (a throwaway chain); the relay's in a 0600 file
        self.operator = funded_account(rpc, DeviceKey(coincurve.PrivateKey(os.urandom(32))))
        self.market, receipt = Market.deploy(rpc, self.operator, self.rules)
        self.from_block = int(receipt.raw["blockNumber"], 16)
        relay_key = self.workdir / "relay.key"
        if relay_key.exists():
            relay_key.unlink()
        funded_account(rpc, generate_key_file(relay_key))
        argv = [sys.executable, "-m", "host_tools.cli", "relay", "serve", "--rpc", self.node.url, "--key-file", str(relay_key),
                "--contract", self.market.address_hex, "--host", "127.0.0.1", "--port", "0",
                "--from-block", str(self.from_block)]
        if self.last_market_id is not None:
            argv += ["--last-market", str(self.last_market_id)]
        self.relay = process_factory("relay", argv, self.workdir / "relay.log")
        self.relay_url = self.relay.wait_for_line(RELAY_LISTENING, timeout_s=120).group(1)
        return self

    def board_ledger_table(self, *, max_clock_skew_ms: int) -> dict:
        """The [ledger] keys of a house on this chain."""
        return {
            "kind": "evm", "url": self.relay_url, "rpc_url": self.node.url, "chain_id": self.market.chain_id,
            "contract": self.market.address_hex, "from_block": self.from_block, "confirmations": 0,
            "ledger_id": f"evm:{self.market.chain_id}:{self.market.address_hex}",
            # block timestamps move in block-period steps (whole seconds): wider than one period
            "max_clock_skew_ms": max(max_clock_skew_ms, 2000 * max(1, self.block_time_s) + 2000),
        }

    def register(self, key_file: Path, *, credit_milli_minor: int = DEFAULT_CREDIT_MILLI_MINOR) -> str:
        address = eip712.address_from_public_key(load_key_file(Path(key_file)).public_key)
        self.market.transact(self.operator, "registerDevice", address)
        if credit_milli_minor:
            self.market.transact(self.operator, "credit", address, credit_milli_minor)
        return eip712.checksum_address(address)

    def revoke(self, address: str) -> None:
        self.market.transact(self.operator, "revokeDevice", eip712.address_bytes(address))

    def stats(self) -> dict:
        """The bench ledger's /v1/stats figures, from the chain's logs (what anyone can check)."""
        m, start = self.market, self.from_block
        trades = {lg.args["tradeId"]: lg.args for lg in m.logs("TradeMade", from_block=start) if not lg.removed}
        reports: dict[int, set] = {}
        failed = set()
        for lg in m.logs("DeliveryReported", from_block=start):
            if lg.removed:
                continue
            reports.setdefault(lg.args["tradeId"], set()).add(lg.args["device"])
            if lg.args["status"] == eip712.STATUS_FAILED:
                failed.add(lg.args["tradeId"])
        settled = {lg.args["tradeId"]: lg.args for lg in m.logs("TradeSettled", from_block=start) if not lg.removed}
        failed |= {t for t, a in settled.items() if a["shortfallWh"] > 0}
        return {
            "orders": len([lg for lg in m.logs("OrderPlaced", from_block=start) if not lg.removed]),
            "trades": len(trades),
            "traded_wh": sum(a["energyWh"] for a in trades.values()),
            "reported_trades": sum(1 for t in trades if len(reports.get(t, ())) == 2),
            "settled_trades": sum(1 for t in trades if t in settled),
            "delivered_wh": sum(a["settledWh"] for a in settled.values()),
            "shortfall_wh": sum(a["shortfallWh"] for a in settled.values()),
            "failed_trades": len(failed & set(trades)),
            "delivered_markets": len({trades[t]["marketId"] for t, a in settled.items() if t in trades and a["settledWh"] > 0}),
        }

    def device_trades(self, address: str) -> list[dict]:
        """A device's trades from the logs (both sides), oldest first."""
        topic = topic_address(eip712.address_bytes(address))
        logs = self.market.logs("TradeMade", None, topic, from_block=self.from_block) + \
            self.market.logs("TradeMade", None, None, topic, from_block=self.from_block)
        return sorted((lg.args for lg in logs if not lg.removed), key=lambda a: a["tradeId"])

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        if self.node is not None:
            self.node.stop()
            self.node = None
