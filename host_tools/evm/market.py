"""Deploy and drive the DgcMarket contract from the host: transactions, calls, logs, revert reasons.

Used by the tests, the gas bench and the relay. One ``Account`` per private key keeps its own
account nonce (read from the node at start, then counted locally) so that a burst of
transactions never reuses a nonce.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from firmware.eip712 import Domain, TypedMessage, checksum_address
from firmware.messages import Signer
from firmware.ledger.evm_abi import (
    AbiError,
    decode_args,
    encode_args,
    encode_call,
    event_topic,
    hex_bytes,
    message_calldata,
    selector,
)
from host_tools.evm.rpc import RpcClient, RpcError
from host_tools.evm.solc import Artefact, compile_market
from host_tools.evm.tx import Eip1559Tx, contract_address, key_address

GAS_HEADROOM_PERCENT = 25


@dataclass(frozen=True)
class MarketRules:
    slot_seconds: int = 1800
    gate_closure_seconds: int = 900
    markets_ahead: int = 48
    lot_wh: int = 100
    price_min_per_kwh_minor: int = 1000
    price_max_per_kwh_minor: int = 4000
    report_deadline_seconds: int = 3600

    def args(self) -> list[int]:
        return [self.slot_seconds, self.gate_closure_seconds, self.markets_ahead, self.lot_wh,
                self.price_min_per_kwh_minor, self.price_max_per_kwh_minor, self.report_deadline_seconds]


class TxFailed(Exception):
    """A transaction was mined but reverted, or could not be sent; ``reason`` names the contract error."""

    def __init__(self, message: str, *, reason: str | None = None, receipt: dict | None = None) -> None:
        super().__init__(message)
        self.reason, self.receipt = reason, receipt


@dataclass
class Log:
    name: str
    args: dict
    block_number: int
    log_index: int
    tx_hash: str
    removed: bool = False


@dataclass
class Receipt:
    raw: dict
    logs: list[Log]

    @property
    def gas_used(self) -> int:
        return int(self.raw["gasUsed"], 16)

    @property
    def ok(self) -> bool:
        return self.raw.get("status") == "0x1"

    def events(self, name: str) -> list[dict]:
        return [log.args for log in self.logs if log.name == name]


class Abi:
    """Functions, events and errors of a compiled contract, from its JSON ABI."""

    def __init__(self, abi: list) -> None:
        self.functions: dict[str, tuple[str, list[str], list[str]]] = {}
        self.events: dict[str, tuple[str, list[dict]]] = {}
        self.errors: dict[bytes, tuple[str, list[str]]] = {}
        for item in abi:
            types = [i["type"] for i in item.get("inputs", [])]
            sig = f"{item.get('name')}({','.join(types)})"
            if item["type"] == "function":
                self.functions[item["name"]] = (sig, types, [o["type"] for o in item.get("outputs", [])])
            elif item["type"] == "event":
                self.events[event_topic(sig)] = (item["name"], item["inputs"])
            elif item["type"] == "error":
                self.errors[selector(sig)] = (item["name"], types)
        self.topics = {name: topic for topic, (name, _) in self.events.items()}

    def decode_log(self, raw: dict) -> Log | None:
        topics = raw.get("topics") or []
        if not topics or topics[0] not in self.events:
            return None
        name, inputs = self.events[topics[0]]
        indexed = [i for i in inputs if i["indexed"]]
        plain = [i for i in inputs if not i["indexed"]]
        values = decode_args([i["type"] for i in plain], hex_bytes(raw["data"]))
        args = {i["name"]: v for i, v in zip(plain, values)}
        for i, topic in zip(indexed, topics[1:]):
            args[i["name"]] = decode_args([i["type"]], hex_bytes(topic))[0]
        return Log(name=name, args=args, block_number=int(raw["blockNumber"], 16), log_index=int(raw["logIndex"], 16),
                   tx_hash=raw["transactionHash"], removed=bool(raw.get("removed", False)))

    def revert_reason(self, data: Any) -> str | None:
        """``Name(arg, ...)`` of a custom error from revert data, or None."""
        if not isinstance(data, str) or not data.startswith("0x") or len(data) < 10:
            return None
        try:
            raw = hex_bytes(data)
        except AbiError:
            return None
        known = self.errors.get(raw[:4])
        if known is None:
            return None
        name, types = known
        try:
            values = decode_args(types, raw[4:])
        except AbiError:
            return name
        shown = [("0x" + v.hex()) if isinstance(v, bytes) else str(v) for v in values]
        return f"{name}({', '.join(shown)})"


@dataclass
class Account:
    """A funded externally owned account that signs its own EIP-1559 transactions."""

    rpc: RpcClient
    key: Signer = field(repr=False)  # e.g. keystore.DeviceKey: signs digests, never shows the secret
    chain_id: int
    nonce: int | None = None

    @property
    def address(self) -> bytes:
        return key_address(self.key)

    def sync_nonce(self) -> int:
        self.nonce = self.rpc.call_int("eth_getTransactionCount", "0x" + self.address.hex(), "pending")
        return self.nonce

    def fees(self) -> tuple[int, int]:
        block = self.rpc.call("eth_getBlockByNumber", "latest", False)
        base = int(block.get("baseFeePerGas") or "0x0", 16)
        tip = 10**9 if base else 0
        return tip, 2 * base + tip

    def send(self, to: bytes | None, data: bytes, *, gas: int | None = None, value: int = 0) -> str:
        """Sign and send; returns the transaction hash. Estimates gas (with headroom) unless given."""
        if self.nonce is None:
            self.sync_nonce()
        call = {"from": "0x" + self.address.hex(), "data": "0x" + data.hex(), "value": hex(value)}
        if to is not None:
            call["to"] = "0x" + to.hex()
        if gas is None:
            gas = self.rpc.call_int("eth_estimateGas", call) * (100 + GAS_HEADROOM_PERCENT) // 100
        tip, max_fee = self.fees()
        tx = Eip1559Tx(chain_id=self.chain_id, nonce=self.nonce, max_priority_fee_per_gas=tip, max_fee_per_gas=max_fee,
                       gas=gas, to=to, value=value, data=data)
        tx_hash = self.rpc.call("eth_sendRawTransaction", "0x" + tx.sign(self.key).hex())
        self.nonce += 1
        return tx_hash


def wait_receipt(rpc: RpcClient, tx_hash: str, *, timeout_s: float = 60.0, poll_s: float = 0.05) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        receipt = rpc.call("eth_getTransactionReceipt", tx_hash)
        if receipt is not None:
            return receipt
        time.sleep(poll_s)
    raise TxFailed(f"no receipt for {tx_hash} within {timeout_s} s")


class Market:
    """A deployed DgcMarket: calls, transactions and decoded logs."""

    def __init__(self, rpc: RpcClient, address: bytes, artefact: Artefact, chain_id: int) -> None:
        self.rpc, self.address, self.artefact, self.chain_id = rpc, address, artefact, chain_id
        self.abi = Abi(artefact.abi)

    @property
    def address_hex(self) -> str:
        return checksum_address(self.address)

    def domain(self) -> Domain:
        return Domain(chain_id=self.chain_id, verifying_contract=self.address)

    @classmethod
    def deploy(cls, rpc: RpcClient, deployer: Account, rules: MarketRules = MarketRules()) -> tuple["Market", Receipt]:
        artefact = compile_market()
        if deployer.nonce is None:
            deployer.sync_nonce()
        address = contract_address(deployer.address, deployer.nonce)
        data = artefact.bytecode + encode_args(["uint256"] * 7, rules.args())
        market = cls(rpc, address, artefact, deployer.chain_id)
        receipt = market._receipt(deployer.send(None, data))
        if not receipt.ok or receipt.raw.get("contractAddress", "").lower() != "0x" + address.hex():
            raise TxFailed("deployment failed", receipt=receipt.raw)
        return market, receipt

    def _receipt(self, tx_hash: str, timeout_s: float = 60.0) -> Receipt:
        raw = wait_receipt(self.rpc, tx_hash, timeout_s=timeout_s)
        logs = [log for log in (self.abi.decode_log(r) for r in raw.get("logs", [])
                                if r.get("address", "").lower() == "0x" + self.address.hex()) if log is not None]
        return Receipt(raw=raw, logs=logs)

    def calldata(self, function: str, *args: object) -> bytes:
        sig, _, _ = self.abi.functions[function]
        return encode_call(sig, list(args))

    def call(self, function: str, *args: object, sender: bytes | None = None, block: str = "latest") -> list:
        sig, _, outputs = self.abi.functions[function]
        result = self.eth_call(encode_call(sig, list(args)), sender=sender, block=block)
        return decode_args(outputs, hex_bytes(result))

    def eth_call(self, data: bytes, *, sender: bytes | None = None, block: str = "latest") -> str:
        call = {"to": "0x" + self.address.hex(), "data": "0x" + data.hex()}
        if sender is not None:
            call["from"] = "0x" + sender.hex()
        try:
            return self.rpc.call("eth_call", call, block)
        except RpcError as exc:
            raise TxFailed(f"eth_call reverted: {self.abi.revert_reason(exc.data) or exc}", reason=self.abi.revert_reason(exc.data)) from None

    def transact(self, account: Account, function: str, *args: object, gas: int | None = None) -> Receipt:
        return self.send_data(account, self.calldata(function, *args), gas=gas)

    def send_data(self, account: Account, data: bytes, *, gas: int | None = None) -> Receipt:
        try:
            tx_hash = account.send(self.address, data, gas=gas)
        except RpcError as exc:
            reason = self.abi.revert_reason(exc.data)
            if reason is not None:
                account.nonce = None  # the node refused before sending: re-read the nonce next time
            raise TxFailed(f"transaction refused: {reason or exc}", reason=reason) from None
        receipt = self._receipt(tx_hash)
        if not receipt.ok:
            raise TxFailed(f"transaction {tx_hash} reverted", receipt=receipt.raw)
        return receipt

    def submit(self, account: Account, message: TypedMessage, *, gas: int | None = None) -> Receipt:
        return self.send_data(account, message_calldata(message), gas=gas)

    def logs(self, event: str, *topics: str | None, from_block: int = 0, to_block: str | int = "latest") -> list[Log]:
        query = {"address": "0x" + self.address.hex(), "fromBlock": hex(from_block),
                 "toBlock": to_block if isinstance(to_block, str) else hex(to_block),
                 "topics": [self.abi.topics[event], *topics]}
        return [log for log in (self.abi.decode_log(r) for r in self.rpc.call("eth_getLogs", query)) if log is not None]


def topic_address(address: bytes) -> str:
    return "0x" + (bytes(12) + address).hex()


def topic_uint(value: int) -> str:
    return "0x" + value.to_bytes(32, "big").hex()


def funded_account(rpc: RpcClient, key: Signer, *, wei: int = 10**21) -> Account:
    """An account funded with anvil_setBalance (test nodes only)."""
    chain_id = rpc.call_int("eth_chainId")
    account = Account(rpc=rpc, key=key, chain_id=chain_id)
    rpc.call("anvil_setBalance", "0x" + account.address.hex(), hex(wei))
    return account


# Rejected.code -> the bench ledger's code strings (docs/ledger.md), so the board sees one vocabulary.
REJECTION_CODES = {
    1: "unknown_market", 2: "gate_closed", 3: "price_out_of_band", 4: "not_whole_lots", 5: "energy_too_large",
    6: "insufficient_funds", 7: "too_many_open_orders", 8: "unknown_order", 9: "order_closed", 10: "unknown_trade",
    11: "not_a_party", 12: "wrong_role", 13: "trade_settled", 14: "malformed",
}
CLOSE_REASONS = {1: "cancelled", 2: "expired", 3: "match_cap", 4: "bulk_cancel", 5: "revoked"}
