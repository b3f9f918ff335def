"""The relay's logic: pre-flight, submit, classify, answer; and the board's trades from logs.

Why it is built this way:
- **Pre-flight with eth_call** against the latest state: a message the contract would refuse
  before its rules (bad signature, unknown or revoked device, expired, nonce used) costs the relay
  no gas and gets the same HTTP answer the bench ledger gives (401/403/409/422).
- **One account nonce, counted locally under a lock**, read from the node's *pending* count at
  start: a restart picks up after the relay's own transactions still in the mempool, so it never
  reuses a nonce (which would replace a message in flight) nor leaves a gap (which would stall
  every later transaction).
- **In-flight map** (device, nonce) -> transaction: a board that resends while the first copy is
  still waiting for a block waits for the same receipt instead of paying for a second transaction.
- **Answers come from the receipt's events** (Accepted / Rejected / OrderPlaced / TradeMade ...),
  never from the pre-flight: the block decides. A resend of a message already on chain is found
  by its (device, nonce) topics and answered with the stored outcome and ``duplicate: true``; the
  same nonce with another digest is ``nonce_conflict``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from firmware.eip712 import TypedMessage, checksum_address
from firmware.ledger.evm_abi import message_calldata
from firmware.messages import MessageError
from host_tools.evm.market import (
    CLOSE_REASONS,
    REJECTION_CODES,
    Account,
    Log,
    Market,
    Receipt,
    TxFailed,
    topic_address,
    topic_uint,
)
from host_tools.evm.rpc import RpcError

log = logging.getLogger(__name__)

KIND_NAMES = {1: "order", 2: "cancel", 3: "bulk_cancel", 4: "delivery_report"}
# contract errors raised before the rules -> (HTTP status, bench-ledger code)
PRE_RULE_ERRORS = {
    "UnknownDevice": (401, "unknown_device"),
    "BadSignature": (401, "bad_signature"),
    "DeviceRevokedError": (403, "revoked"),
    "MessageExpired": (422, "expired"),
    "NotYetValid": (422, "not_yet_valid"),
    "NonceBelowMinimum": (422, "nonce_cancelled"),
    "NonceOutOfRange": (400, "malformed"),
}
LOG_PAGE_BLOCKS = 1000  # Besu's default --rpc-max-logs-range
MAX_TRADES_PER_ANSWER = 500


class RelayUnavailable(Exception):
    """The chain could not be reached or did not confirm in time: the board should retry later."""


@dataclass(frozen=True)
class Answer:
    """An HTTP status and the JSON body, in the bench ledger's shapes (docs/ledger-api.json)."""

    http_status: int
    body: dict


def _rejected(http_status: int, code: str, detail: str, nonce: int | None, *, duplicate: bool = False) -> Answer:
    return Answer(http_status, {"status": "rejected", "code": code, "detail": detail, "duplicate": duplicate, "nonce": nonce})


class Relay:
    """Submits typed messages to one market contract with one funded account."""

    def __init__(self, market: Market, account: Account, *, receipt_timeout_s: float = 60.0, from_block: int = 0,
                 last_market_id: int | None = None) -> None:
        self.market = market
        # The service provider's market day (a bounded demo day, like the bench ledger's --last-market):
        # orders for a later market are not carried, and /v1/info says so (the board then signs none).
        self.last_market_id = last_market_id
        self.account = account
        self.receipt_timeout_s = receipt_timeout_s
        self.from_block = from_block
        self.domain = market.domain()
        self._send_lock = threading.Lock()
        self._inflight_lock = threading.Lock()
        self._inflight: dict[tuple[bytes, int], tuple[bytes, str]] = {}
        account.sync_nonce()
        log.info("relay %s for market %s on chain %d, account nonce %d", checksum_address(account.address),
                 market.address_hex, market.chain_id, account.nonce)

    # ---------------------------------------------------------------- messages

    def handle_wire(self, envelope: Any) -> Answer:
        try:
            message = TypedMessage.from_wire(envelope)
        except MessageError as exc:
            return _rejected(400, "malformed", str(exc), None)
        try:
            return self.submit(message)
        except RelayUnavailable as exc:
            return _rejected(503, "unavailable", str(exc), message.nonce)

    def submit(self, message: TypedMessage) -> Answer:
        device = message.signer(self.domain)  # who the contract will see; a tampered message names someone else
        digest = message.digest(self.domain)
        key = (device, message.nonce)
        with self._inflight_lock:
            pending = self._inflight.get(key)
        if pending is not None:
            pending_digest, tx_hash = pending
            if pending_digest != digest:
                return _rejected(409, "nonce_conflict", f"nonce {message.nonce} is already used for another message in flight", message.nonce)
            return self._answer_from_tx(tx_hash, device, message, duplicate=True)
        if self.last_market_id is not None and message.kind == "order" and message.fields["market_id"] > self.last_market_id:
            return _rejected(422, "not_carried", f"this relay carries no order for a market after {self.last_market_id}", message.nonce)
        data = message_calldata(message)
        refusal = self._preflight(data, device, message, digest)
        if refusal is not None:
            return refusal
        with self._inflight_lock:
            if key in self._inflight:  # a concurrent resend got here first
                return self._answer_from_tx(self._inflight[key][1], device, message, duplicate=True)
            self._inflight[key] = (digest, "")
        try:
            tx_hash = self._send(data)
            with self._inflight_lock:
                self._inflight[key] = (digest, tx_hash)
            return self._answer_from_tx(tx_hash, device, message, duplicate=False)
        finally:
            with self._inflight_lock:
                self._inflight.pop(key, None)

    def _preflight(self, data: bytes, device: bytes, message: TypedMessage, digest: bytes) -> Answer | None:
        try:
            self.market.eth_call(data, sender=self.account.address)
            return None
        except TxFailed as exc:
            reason = exc.reason or ""
        name = reason.split("(", 1)[0]
        if name == "NonceUsed":
            return self._stored_outcome(device, message, digest)
        if name in PRE_RULE_ERRORS:
            status, code = PRE_RULE_ERRORS[name]
            detail = {
                "unknown_device": f"the signature recovers {checksum_address(device)}, which is not a registered device "
                                  f"(a message changed after signing recovers another address)",
                "bad_signature": "signature: not a valid low-S secp256k1 signature",
            }.get(code, reason)
            return _rejected(status, code, detail, message.nonce)
        raise RelayUnavailable(f"pre-flight eth_call failed: {reason or 'no revert reason'}")

    def _send(self, data: bytes) -> str:
        with self._send_lock:
            # a reorg (or a node restart) can drop transactions we sent: then the node's pending
            # count is below ours and every later transaction would wait behind the gap forever
            pending = self.account.rpc.call_int("eth_getTransactionCount", "0x" + self.account.address.hex(), "pending")
            if self.account.nonce is None or pending < self.account.nonce:
                log.warning("relay account: node's pending nonce %d is below ours (%s); transactions were dropped, re-reading",
                            pending, self.account.nonce)
                self.account.nonce = pending
            for attempt in (1, 2):
                try:
                    return self.account.send(self.market.address, data)
                except RpcError as exc:
                    text = str(exc).lower()
                    if attempt == 1 and "nonce" in text:
                        log.warning("relay account nonce out of step (%s); re-reading it from the node", exc)
                        self.account.sync_nonce()
                        continue
                    if exc.data is not None and self.market.abi.revert_reason(exc.data):
                        raise RelayUnavailable(f"estimate refused: {self.market.abi.revert_reason(exc.data)}") from None
                    raise RelayUnavailable(f"could not send the transaction: {exc}") from None
        raise RelayUnavailable("could not send the transaction")

    def _answer_from_tx(self, tx_hash: str, device: bytes, message: TypedMessage, *, duplicate: bool) -> Answer:
        if not tx_hash:
            raise RelayUnavailable("the same message is being sent right now; retry")
        raw = self._wait_receipt(tx_hash)
        receipt = Receipt(raw=raw, logs=[lg for lg in (self.market.abi.decode_log(r) for r in raw.get("logs", [])) if lg])
        if not receipt.ok:
            # the state moved between pre-flight and block (e.g. another relay landed it first)
            digest = message.digest(self.domain)
            refusal = self._preflight(message_calldata(message), device, message, digest)
            if refusal is not None:
                return refusal
            raise RelayUnavailable(f"transaction {tx_hash} reverted")
        return self._outcome(receipt, device, message.nonce, duplicate=duplicate)

    def _wait_receipt(self, tx_hash: str) -> dict:
        """Wait for the receipt; give up early if the node no longer knows the transaction (dropped)."""
        deadline = time.monotonic() + self.receipt_timeout_s
        next_check = time.monotonic() + 2.0
        try:
            while time.monotonic() < deadline:
                raw = self.market.rpc.call("eth_getTransactionReceipt", tx_hash)
                if raw is not None:
                    return raw
                if time.monotonic() > next_check:
                    next_check = time.monotonic() + 2.0
                    if self.market.rpc.call("eth_getTransactionByHash", tx_hash) is None:
                        raise RelayUnavailable(f"transaction {tx_hash} was dropped by the node; send the message again")
                time.sleep(0.05)
        except RpcError as exc:
            raise RelayUnavailable(f"no receipt yet for {tx_hash}: {exc}") from None
        raise RelayUnavailable(f"no receipt for {tx_hash} within {self.receipt_timeout_s} s")

    def _outcome(self, receipt: Receipt, device: bytes, nonce: int, *, duplicate: bool) -> Answer:
        mine = [lg for lg in receipt.logs if lg.args.get("device") == device and lg.args.get("nonce") == nonce]
        for lg in mine:
            kind = KIND_NAMES.get(lg.args.get("kind", 0), "unknown")
            if lg.name == "Rejected":
                code = REJECTION_CODES.get(lg.args["code"], f"code_{lg.args['code']}")
                return _rejected(422, code, f"{kind}: refused by the market contract's rules ({code})", nonce, duplicate=duplicate)
            if lg.name == "Accepted":
                return Answer(200, {"status": "accepted", "duplicate": duplicate, "nonce": nonce, "type": kind,
                                    "result": self._result(receipt, device, nonce, kind)})
        raise RelayUnavailable(f"receipt {receipt.raw.get('transactionHash')} has no outcome for nonce {nonce}")

    def _result(self, receipt: Receipt, device: bytes, nonce: int, kind: str) -> dict:
        out: dict[str, Any] = {"tx_hash": receipt.raw["transactionHash"], "block_number": int(receipt.raw["blockNumber"], 16)}
        accepted = receipt.events("Accepted")
        out["digest"] = "0x" + next(a["digest"] for a in accepted if a["device"] == device and a["nonce"] == nonce).hex()
        if kind == "order":
            placed = next(p for p in receipt.events("OrderPlaced") if p["device"] == device and p["nonce"] == nonce)
            fills = [{"trade_id": t["tradeId"], "energy_wh": t["energyWh"], "price_per_kwh_minor": t["pricePerKwhMinor"],
                      "counterparty": checksum_address(t["buyer"] if t["seller"] == device else t["seller"])}
                     for t in receipt.events("TradeMade")]
            out.update(order_id=placed["orderId"], filled_wh=sum(f["energy_wh"] for f in fills), resting_wh=placed["restingWh"],
                       fills=fills)
        closed = [c for c in receipt.events("OrderClosed") if c["device"] == device]
        if closed:
            out["closed"] = [{"order_nonce": c["nonce"], "closed_wh": c["closedWh"], "reason": CLOSE_REASONS.get(c["reason"], "?")}
                             for c in closed]
        if kind == "delivery_report":
            out["already_reported"] = not receipt.events("DeliveryReported")
            settled = receipt.events("TradeSettled")
            if settled:
                s = settled[0]
                out["settlement"] = {"settled_wh": s["settledWh"], "shortfall_wh": s["shortfallWh"],
                                     "shortfall_device": checksum_address(s["shortfallDevice"]) if s["shortfallWh"] else None,
                                     "paid_milli_minor": s["paidMilliMinor"]}
        return out

    def _stored_outcome(self, device: bytes, message: TypedMessage, digest: bytes) -> Answer:
        topics = (topic_address(device), topic_uint(message.nonce))
        found: list[Log] = []
        for event in ("Accepted", "Rejected"):
            found += self.logs(event, *topics)
        if not found:
            raise RelayUnavailable(f"nonce {message.nonce} is used but its message is not in the logs yet")
        stored = found[0]
        if stored.args["digest"] != digest:
            return _rejected(409, "nonce_conflict", f"nonce {message.nonce} was already used for a different message", message.nonce)
        raw = self.market.rpc.call("eth_getTransactionReceipt", stored.tx_hash)
        receipt = Receipt(raw=raw, logs=[lg for lg in (self.market.abi.decode_log(r) for r in raw.get("logs", [])) if lg])
        return self._outcome(receipt, device, message.nonce, duplicate=True)

    # ---------------------------------------------------------------- reads

    def logs(self, event: str, *topics: str | None) -> list[Log]:
        """eth_getLogs in pages of LOG_PAGE_BLOCKS (Besu refuses wider ranges by default)."""
        head = self.market.rpc.call_int("eth_blockNumber")
        out: list[Log] = []
        start = self.from_block
        while start <= head:
            end = min(head, start + LOG_PAGE_BLOCKS - 1)
            out += self.market.logs(event, *topics, from_block=start, to_block=end)
            start = end + 1
        return out

    def time_ms(self) -> int:
        block = self.market.rpc.call("eth_getBlockByNumber", "latest", False)
        return int(block["timestamp"], 16) * 1000

    def info(self) -> dict:
        slot, gate, ahead, lot, pmin, pmax, deadline = self.market.call("rules")
        return {
            "ledger_id": f"evm:{self.market.chain_id}:{self.market.address_hex}",
            "chain_id": self.market.chain_id, "contract": self.market.address_hex,
            "relay_account": checksum_address(self.account.address),
            "slot_seconds": slot, "gate_closure_seconds": gate, "markets_ahead": ahead, "lot_wh": lot,
            "price_min_per_kwh_minor": pmin, "price_max_per_kwh_minor": pmax, "report_deadline_seconds": deadline,
            **({"last_market_id": self.last_market_id} if self.last_market_id is not None else {}),
        }

    def device_account(self, device: bytes) -> dict:
        status, min_nonce = self.market.call("devices", device)
        return {
            "device_id": checksum_address(device),
            "registered": status == 1, "revoked": status == 2, "min_nonce": min_nonce,
            "balance_milli_minor": self.market.call("balanceOf", device)[0],
            "locked_milli_minor": self.market.call("lockedOf", device)[0],
            "shortfall_wh": self.market.call("shortfallWhOf", device)[0],
        }

    def trades_since(self, device: bytes, after: int) -> dict:
        """The device's trades with trade_id > after, oldest first, from TradeMade logs."""
        logs = self.logs("TradeMade", None, topic_address(device)) + self.logs("TradeMade", None, None, topic_address(device))
        trades = {}
        for lg in logs:
            a = lg.args
            if a["tradeId"] <= after or lg.removed:
                continue
            selling = a["seller"] == device
            flags = self.market.call("trades", a["tradeId"])[3]
            state = "settled" if flags & 4 else "reported" if flags & 3 else "contracted"
            trades[a["tradeId"]] = {
                "trade_id": a["tradeId"], "market_id": a["marketId"], "side": "sell" if selling else "buy",
                "energy_wh": a["energyWh"], "price_per_kwh_minor": a["pricePerKwhMinor"],
                "order_nonce": a["sellerNonce"] if selling else a["buyerNonce"],
                "counterparty": checksum_address(a["buyer"] if selling else a["seller"]), "state": state,
                "block_number": lg.block_number,
            }
        ordered = [trades[k] for k in sorted(trades)][:MAX_TRADES_PER_ANSWER]
        return {"trades": ordered, "cursor": ordered[-1]["trade_id"] if ordered else after}

