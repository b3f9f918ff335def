"""EVM backend of the ledger interface: the board reads the chain itself, submits through a relay.

Why this shape:
- **The board trusts the chain, not the relay.** It reads an observer node over JSON-RPC (plain
  HTTP POSTs with the standard library's http.client: ``eth_chainId``, ``eth_blockNumber``, ``eth_getBlockByNumber``,
  ``eth_call``, ``eth_getLogs``). The relay only carries signed messages; after it answers, the
  board checks on chain that its message *landed* with the digest it signed (the contract
  computes that digest from the fields it was given, so equal digests mean equal fields), and
  that the outcome the relay reported is the one in the logs. A relay that lies is
  ``LedgerUnavailable``: the signed message stays in the outbox and is sent again (the contract
  deduplicates on (device, nonce)).
- **Landing to the same depth.** An answer counts only once the block holding the message is
  ``confirmations`` deep; before that ``submit`` says LedgerUnavailable, the outbox resends,
  and the resend is answered from the chain (or lands the message again after a reorg).
- **Trades up to a confirmation depth.** ``trades_since`` reads ``TradeMade`` logs only in blocks
  at least ``confirmations`` below the head, skips logs marked ``removed``, and its cursor
  (block << 32 | log index) never passes that confirmed head. On a PoA chain with immediate
  finality (Besu QBFT) ``confirmations = 0`` is right; on Aura (Energy Web Chain) forks happen and
  a few blocks of depth are needed. If the block under the cursor changes its hash (a reorg deeper
  than the depth), the adapter refuses to go on (``LedgerUnavailable``) rather than silently
  dropping or inventing trades.
- **Block-timestamp clock.** ``server_time_ms`` is the latest block's timestamp: the contract
  checks gates and expiry against it. It moves in steps of one block period, so the clock guard's
  tolerance must be wider than one period (docs/ledger-evm.md).
- **Strict answers.** Every JSON-RPC answer is size-capped and type-checked; hex quantities are
  parsed strictly; nothing a node says becomes a KeyError deep in the daemon.
- ``eth_getLogs`` is paged (Besu refuses ranges over 1000 blocks by default).
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import threading
import time
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from firmware import eip712
from firmware.ledger.evm_abi import AbiError, decode_args, encode_call, event_topic, hex_bytes, message_calldata, selector
from firmware.ledger.evm_tx import Eip1559Tx

from firmware.messages import SignedMessage, canonical_bytes

from .base import LedgerRejected, LedgerUnavailable, Refusal, SubmitResult, TradeRecord

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 4 * 1024 * 1024
LOG_PAGE_BLOCKS = 1000

EVENTS = {
    "Accepted": ("Accepted(address,uint256,uint256,bytes32)", ["uint256", "bytes32"]),
    "Rejected": ("Rejected(address,uint256,uint256,bytes32,uint256)", ["uint256", "bytes32", "uint256"]),
    "OrderPlaced": ("OrderPlaced(address,uint256,uint256,uint256,uint256,uint256,uint256,uint256)", ["uint256"] * 6),
    "TradeMade": ("TradeMade(uint256,address,address,uint256,uint256,uint256,uint256,uint256)", ["uint256"] * 5),
}
TOPICS = {name: event_topic(sig) for name, (sig, _) in EVENTS.items()}
VIEWS = {
    "rules": ("rules()", ["uint256"] * 7),
    "balanceOf": ("balanceOf(address)", ["uint256"]),
    "lockedOf": ("lockedOf(address)", ["uint256"]),
    "devices": ("devices(address)", ["uint8", "uint64"]),
    "shortfallWhOf": ("shortfallWhOf(address)", ["uint256"]),
    "bookOrders": ("bookOrders(uint256,uint256)", ["uint256[]"]),
    "orders": ("orders(uint256)", ["address", "uint64", "uint8", "uint8", "uint16", "uint40", "uint32", "uint64", "uint56", "uint56"]),
    "trades": ("trades(uint256)", ["address", "uint40", "uint32", "uint8", "address", "uint64", "uint64", "uint64"]),
}
DIRECT_RECEIPT_TIMEOUT_S = 60.0
# custom errors raised before the rules -> the bench ledger's codes (NonceUsed is a duplicate: see landed())
PRE_RULE_ERRORS = {
    "UnknownDevice(address)": "unknown_device",
    "BadSignature()": "bad_signature",
    "DeviceRevokedError(address)": "revoked",
    "MessageExpired(uint256,uint256)": "expired",
    "NotYetValid(uint256,uint256)": "not_yet_valid",
    "NonceBelowMinimum(address,uint256,uint256)": "nonce_cancelled",
    "NonceOutOfRange(uint256)": "malformed",
}
PRE_RULE_SELECTORS = {selector(sig).hex(): code for sig, code in PRE_RULE_ERRORS.items()}
REJECTION_CODES = {
    1: "unknown_market", 2: "gate_closed", 3: "price_out_of_band", 4: "not_whole_lots", 5: "energy_too_large",
    6: "insufficient_funds", 7: "too_many_open_orders", 8: "unknown_order", 9: "order_closed", 10: "unknown_trade",
    11: "not_a_party", 12: "wrong_role", 13: "trade_settled", 14: "malformed",
}
# What the contract's and the relay's refusals (as the code strings above and the relay's own:
# nonce_conflict, not_carried, not_found, too_large, ...) mean to the board
# (firmware.ledger.base.Refusal). Only this adapter knows them; any other code is REFUSED.
REFUSALS: dict[str, Refusal] = {
    "expired": Refusal.RESIGN,  # MessageExpired: the block time is past the message's expiry
    "not_yet_valid": Refusal.RESIGN,  # NotYetValid: the block time is before its issue time
    "unknown_device": Refusal.DEVICE_UNKNOWN,
    "revoked": Refusal.DEVICE_REVOKED,
    "unauthorized": Refusal.DEVICE_UNAUTHORISED,  # a relay that wants the device's credentials
    "order_closed": Refusal.ORDER_CLOSED,
    "not_found": Refusal.NOT_FOUND,
}


def refusal_for(code: str) -> Refusal:
    """What a chain or relay rejection ``code`` means to the board."""
    return REFUSALS.get(code, Refusal.REFUSED)


class _Transient(Exception):
    pass


class JsonHttp:
    """One keep-alive HTTP(S) connection that exchanges JSON bodies, with a size cap and a deadline.

    Why not ``requests``: it and urllib3 cost about 7 MB of RSS on the board; http.client is
    already loaded by the standard library's own modules. Redirects are never followed.
    One exchange at a time (a lock): the daemon's jobs run on several threads and an
    http.client connection carries one request at a time ("CannotSendRequest: Request-sent").
    """

    def __init__(self, url: str, *, timeout_s: float, max_bytes: int = MAX_RESPONSE_BYTES) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url: expected an http:// or https:// URL, got {url!r}")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout_s, self.max_bytes = timeout_s, max_bytes
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self.host, self.port, timeout=self.timeout_s)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def exchange(self, method: str, body: Any = None, path: str | None = None) -> tuple[int, Any]:
        """(HTTP status, parsed JSON or None when the body is not JSON). Transport trouble is _Transient."""
        with self._lock:
            return self._exchange(method, body, path)

    def _exchange(self, method: str, body: Any, path: str | None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        started = time.monotonic()
        try:
            conn = self._connection()
            conn.request(method, path or self.path, body=data, headers=headers)
            response = conn.getresponse()
            declared = response.getheader("Content-Length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise _Transient(f"answer of {declared} bytes is larger than {self.max_bytes}")
            chunks, size = [], 0
            while True:
                chunk = response.read(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_bytes:
                    raise _Transient(f"answer larger than {self.max_bytes} bytes")
                if time.monotonic() - started > 2 * self.timeout_s:
                    raise _Transient(f"answer took longer than {2 * self.timeout_s:.1f} s")
                chunks.append(chunk)
            status = response.status
            if response.will_close:
                self.close()
        except _Transient:
            self.close()
            raise
        except (http.client.HTTPException, OSError) as exc:
            self.close()
            raise _Transient(f"no answer ({type(exc).__name__}: {str(exc)[:120]})") from None

        def no_float(value: str) -> Any:
            raise ValueError("non-integer number")

        try:
            return status, json.loads(b"".join(chunks), parse_float=no_float, parse_constant=no_float)
        except (ValueError, RecursionError):
            return status, None


class RelayClient:
    """Submits typed messages to ``dgc-host relay`` (the bench ledger's ``POST /v1/messages``).

    As in the REST adapter: a 4xx *with* the ledger's rejection body is a permanent answer; any
    other failure (no answer, 5xx, a proxy's page, a malformed answer) is LedgerUnavailable, so
    the outbox keeps the signed message and resends it.
    """

    TRANSIENT_4XX = (408, 425, 429)

    def __init__(self, url: str, *, timeout_ms: int = 30000) -> None:
        self.url = url.rstrip("/")
        self._http = JsonHttp(self.url + "/v1/messages", timeout_s=timeout_ms / 1000)

    def __repr__(self) -> str:
        return f"RelayClient({self.url!r})"

    def info(self) -> dict:
        """The relay's ``GET /v1/info`` (only ``last_market_id`` is used: the service provider's
        market day, e.g. a bounded demo day); {} when it does not answer usefully."""
        try:
            status, obj = JsonHttp(self.url + "/v1/info", timeout_s=self._http.timeout_s).exchange("GET")
        except _Transient:
            return {}
        return obj if status == 200 and isinstance(obj, dict) else {}

    def submit(self, message: eip712.TypedMessage) -> SubmitResult:
        try:
            status, obj = self._http.exchange("POST", message.to_wire())
        except _Transient as exc:
            raise LedgerUnavailable(f"relay {self.url}: {exc}") from None
        if not isinstance(obj, dict) or status >= 500 or status in self.TRANSIENT_4XX:
            raise LedgerUnavailable(f"relay {self.url}: HTTP {status} without a usable answer")
        if 400 <= status < 500:
            code, detail = obj.get("code"), obj.get("detail")
            if obj.get("status") != "rejected" or type(code) is not str or type(detail) is not str:
                raise LedgerUnavailable(f"relay {self.url}: HTTP {status} without a rejection body")
            return SubmitResult(status="rejected", duplicate=obj.get("duplicate") is True, code=code[:100],
                                detail=detail[:1000], result={}, refusal=refusal_for(code[:100]))
        if status != 200 or obj.get("status") != "accepted" or obj.get("nonce") != message.nonce \
                or type(obj.get("duplicate")) is not bool or not isinstance(obj.get("result"), dict):
            raise LedgerUnavailable(f"relay {self.url}: malformed answer (HTTP {status})")
        return SubmitResult(status="accepted", duplicate=obj["duplicate"], code=None, detail="", result=dict(obj["result"]))


def _quantity(value: Any, what: str) -> int:
    """A JSON-RPC hex quantity ("0x1a"), strictly."""
    if not isinstance(value, str) or not value.startswith("0x") or not 3 <= len(value) <= 66:
        raise _Transient(f"{what}: expected a hex quantity, got {str(value)[:40]!r}")
    try:
        return int(value[2:], 16)
    except ValueError:
        raise _Transient(f"{what}: expected a hex quantity, got {value[:40]!r}") from None


def _topic_address(address: bytes) -> str:
    return "0x" + (bytes(12) + address).hex()


def _topic_uint(value: int) -> str:
    return "0x" + value.to_bytes(32, "big").hex()


def encode_cursor(block: int, log_index: int) -> int:
    return (block << 32) | log_index


def decode_cursor(cursor: int) -> tuple[int, int]:
    return cursor >> 32, cursor & 0xFFFFFFFF


class EvmLedger:
    """The ledger interface over an EVM market contract: reads from an observer node, submits via a relay.

    ``submit`` takes a ``firmware.eip712.TypedMessage``; ``relay`` is anything with
    ``submit(message) -> SubmitResult`` (a ``RestLedger`` pointed at ``dgc-host relay`` works: the
    relay speaks the bench ledger's ``POST /v1/messages``).
    """

    def __init__(
        self,
        rpc_url: str,
        *,
        chain_id: int,
        contract: str,
        relay: Any = None,
        gas_signer: Any = None,
        confirmations: int = 0,
        from_block: int = 0,
        timeout_ms: int = 5000,
        retries: int = 2,
        backoff_ms: int = 200,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if confirmations < 0 or from_block < 0 or timeout_ms <= 0 or retries < 0 or backoff_ms < 0:
            raise ValueError("confirmations, from_block, retries, backoff_ms must be >= 0 and timeout_ms > 0")
        self.rpc_url = rpc_url
        self.domain = eip712.Domain(chain_id=chain_id, verifying_contract=eip712.address_bytes(contract))
        self.contract = "0x" + self.domain.verifying_contract.hex()
        self.relay = relay
        self.gas_signer = gas_signer  # direct submission: the device key signs and pays for its own transactions
        self.confirmations = confirmations
        self.from_block = from_block
        self.timeout_s = timeout_ms / 1000
        self.retries = retries
        self.backoff_s = backoff_ms / 1000
        self._http = JsonHttp(rpc_url, timeout_s=self.timeout_s)
        self._sleep = sleep
        self._ids = itertools.count(1)
        self._chain_checked = False
        self._cursor_hashes: dict[int, str] = {}  # block number of a returned cursor -> its hash
        # The board's own device: the daemon names it by its sha256 device id (messages.py); on
        # chain it is the Ethereum address of the same key. (device_id, address) or None.
        self._own: tuple[str, bytes] | None = None

    def own_device(self, device_id: str, public_key: bytes) -> "EvmLedger":
        """Let ``trades_since``/``device_account`` take the board's own sha256 device id (what the
        controller passes, whatever the backend) and read its Ethereum address instead."""
        self._own = (device_id, eip712.address_from_public_key(public_key))
        return self

    def _address(self, device_id: str) -> bytes:
        if self._own is not None and device_id == self._own[0]:
            return self._own[1]
        return eip712.address_bytes(device_id)

    @classmethod
    def from_config(cls, config: Any, *, signer: Any = None, gas_signer: Any = None) -> "EvmLedger":
        """Build from a board config's [ledger] table with ``kind = "evm"`` (docs/board-config.md):
        ``url`` is the relay (the same submit call as the bench ledger's), ``rpc_url`` the observer
        node, ``chain_id`` and ``contract`` the domain, ``confirmations``, ``from_block``,
        ``timeout_ms``, ``retries``, ``backoff_ms``. ``relay_url`` (an older spelling) wins over
        ``url`` when present; an empty relay, or ``evm_submit = "direct"``, means direct submission
        with ``gas_signer`` (by default the device key itself).
        ``signer``: the device key, so the daemon's own device id reads this key's address."""
        relay_url = getattr(config, "relay_url", None)
        if relay_url is None:
            relay_url = getattr(config, "url", "") or ""
        if getattr(config, "evm_submit", "relay") == "direct":
            relay_url, gas_signer = "", gas_signer if gas_signer is not None else signer
        timeout_ms = int(getattr(config, "timeout_ms", 5000))
        ledger = cls(
            config.rpc_url, chain_id=int(config.chain_id), contract=config.contract,
            relay=RelayClient(relay_url, timeout_ms=max(timeout_ms, 30000)) if relay_url else None,
            gas_signer=None if relay_url else gas_signer,
            confirmations=int(getattr(config, "confirmations", 0)), from_block=int(getattr(config, "from_block", 0)),
            timeout_ms=timeout_ms, retries=int(getattr(config, "retries", 2)), backoff_ms=int(getattr(config, "backoff_ms", 200)),
        )
        if signer is not None:
            ledger.own_device(signer.device_id, signer.public_key)
        return ledger

    def __repr__(self) -> str:
        return f"EvmLedger({self.rpc_url!r}, chain_id={self.domain.chain_id}, contract={self.contract})"

    # ------------------------------------------------------------------ JSON-RPC

    def _once(self, method: str, params: list) -> Any:
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        status, answer = self._http.exchange("POST", body)
        if status != 200:
            raise _Transient(f"HTTP {status}")
        if not isinstance(answer, dict) or answer.get("id") != body["id"]:
            raise _Transient("answer is not a JSON-RPC response to this request")
        if answer.get("error") is not None:
            err = answer["error"]
            message = err.get("message") if isinstance(err, dict) else str(err)
            data = err.get("data") if isinstance(err, dict) else None
            raise _Transient(f"node error: {str(message)[:200]}" + (f" data={str(data)[:80]}" if isinstance(data, str) else ""))
        return answer.get("result")

    def _rpc(self, method: str, *params: Any) -> Any:
        if not self._chain_checked and method != "eth_chainId":
            self._check_chain()
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                return self._once(method, list(params))
            except _Transient as exc:
                last = exc
                if attempt + 1 < attempts:
                    self._sleep(self.backoff_s * (2**attempt))
        raise LedgerUnavailable(f"node {method} failed after {attempts} attempt(s): {last}")

    def _check_chain(self) -> None:
        try:
            chain_id = _quantity(self._rpc("eth_chainId"), "eth_chainId")
        except _Transient as exc:
            raise LedgerUnavailable(str(exc)) from None
        if chain_id != self.domain.chain_id:
            raise LedgerUnavailable(f"the node is on chain {chain_id}, expected {self.domain.chain_id}: check [ledger] rpc_url")
        self._chain_checked = True

    def _checked(self, build: Callable[[], Any], what: str) -> Any:
        try:
            return build()
        except (_Transient, AbiError, KeyError, TypeError, ValueError) as exc:
            raise LedgerUnavailable(f"{what}: malformed answer from the node: {exc}") from None

    def _view(self, name: str, *args: Any, block: str = "latest") -> list:
        signature, outputs = VIEWS[name]
        result = self._rpc("eth_call", {"to": self.contract, "data": "0x" + encode_call(signature, list(args)).hex()}, block)
        return self._checked(lambda: decode_args(outputs, hex_bytes(result)), f"eth_call {name}")

    def _block(self, tag: str | int) -> dict:
        block = self._rpc("eth_getBlockByNumber", tag if isinstance(tag, str) else hex(tag), False)
        if not isinstance(block, dict):
            raise LedgerUnavailable(f"eth_getBlockByNumber {tag}: no such block")
        return block

    def head(self) -> int:
        return self._checked(lambda: _quantity(self._rpc("eth_blockNumber"), "eth_blockNumber"), "eth_blockNumber")

    def confirmed_head(self) -> int:
        return max(-1, self.head() - self.confirmations)

    def _logs(self, event: str, topics: list, from_block: int, to_block: int) -> list[dict]:
        out: list[dict] = []
        start = from_block
        while start <= to_block:
            end = min(to_block, start + LOG_PAGE_BLOCKS - 1)
            page = self._rpc("eth_getLogs", {"address": self.contract, "fromBlock": hex(start), "toBlock": hex(end),
                                             "topics": [TOPICS[event], *topics]})
            if not isinstance(page, list):
                raise LedgerUnavailable(f"eth_getLogs {event}: expected a list")
            out += page
            start = end + 1
        return out

    def _decode(self, event: str, raw: Any) -> dict:
        def build() -> dict:
            topics = raw["topics"]
            if not isinstance(topics, list) or not topics or topics[0] != TOPICS[event]:
                raise ValueError("log of another event")
            if str(raw.get("address", "")).lower() != self.contract:
                raise ValueError("log of another contract")
            return {
                "topics": [hex_bytes(t) for t in topics[1:]],
                "data": decode_args(EVENTS[event][1], hex_bytes(raw["data"])),
                "block": _quantity(raw["blockNumber"], "blockNumber"),
                "log_index": _quantity(raw["logIndex"], "logIndex"),
                "block_hash": str(raw["blockHash"]),
                "removed": raw.get("removed") is True,
            }

        return self._checked(build, f"{event} log")

    # ------------------------------------------------------------------ interface

    def server_time_ms(self) -> int:
        """The latest block's timestamp: the clock the contract checks gates and expiry against."""
        block = self._block("latest")
        return self._checked(lambda: _quantity(block["timestamp"], "timestamp"), "latest block") * 1000

    def info(self) -> dict:
        slot, gate, ahead, lot, pmin, pmax, deadline = self._view("rules")
        out = {
            "ledger_id": f"evm:{self.domain.chain_id}:{eip712.checksum_address(self.domain.verifying_contract)}",
            "chain_id": self.domain.chain_id, "contract": eip712.checksum_address(self.domain.verifying_contract),
            "slot_seconds": slot, "gate_closure_seconds": gate, "markets_ahead": ahead, "lot_wh": lot,
            "price_min_per_kwh_minor": pmin, "price_max_per_kwh_minor": pmax, "report_deadline_seconds": deadline,
        }
        # The service provider may bound its market day (the relay refuses orders after it): the
        # board then signs none (scheduler/trading.py reads ``last_market_id`` as from the bench ledger).
        last = self.relay.info().get("last_market_id") if isinstance(self.relay, RelayClient) else None
        if type(last) is int and last > 0:
            out["last_market_id"] = last
        return out

    def device_account(self, device_id: str) -> dict:
        """The device's account, in the bench ledger's shape where the daemon reads it.

        An unregistered or revoked address is ``LedgerRejected`` (``Refusal.DEVICE_UNKNOWN`` /
        ``DEVICE_REVOKED``, codes ``unknown_device`` / ``revoked`` as text), as the REST adapter raises it: the daemon pauses
        trading instead of signing messages the contract must refuse. ``max_nonce`` (the start-up
        nonce floor, ledger_link.sync_account) is the highest nonce of this device's messages on
        chain: a journal restored from an old copy never reuses one.
        """
        address = self._address(device_id)
        status, min_nonce = self._view("devices", address)
        name = eip712.checksum_address(address)
        if status == 0:
            raise LedgerRejected("unknown_device", f"device {name} is not registered with the market contract",
                                 Refusal.DEVICE_UNKNOWN)
        if status == 2:
            raise LedgerRejected("revoked", f"device {name} was revoked by the market's operator", Refusal.DEVICE_REVOKED)
        max_nonce = 0
        head = self.head()
        for event in ("Accepted", "Rejected"):
            for raw in self._logs(event, [_topic_address(address)], self.from_block, head):
                log_ = self._decode(event, raw)
                if not log_["removed"]:
                    max_nonce = max(max_nonce, int.from_bytes(log_["topics"][1], "big"))
        return {
            "device_id": name, "name": name,
            "registered": True, "revoked": False, "min_nonce": min_nonce, "max_nonce": max_nonce,
            "balance_milli_minor": self._view("balanceOf", address)[0],
            "locked_milli_minor": self._view("lockedOf", address)[0],
            "shortfall_wh": self._view("shortfallWhOf", address)[0],
        }

    def market_book(self, market_id: int) -> dict:
        rules = self.info()
        now_s = self.server_time_ms() // 1000
        out: dict[str, Any] = {"market_id": market_id, "gate_open": market_id > now_s + rules["gate_closure_seconds"]}
        for key, side in (("asks", eip712.SIDE_SELL), ("bids", eip712.SIDE_BUY)):
            entries = []
            for order_id in self._view("bookOrders", market_id, side)[0]:
                o = self._view("orders", order_id)
                entries.append({"device_id": eip712.checksum_address(o[0]), "order_nonce": o[1], "order_id": order_id,
                                "remaining_wh": o[7], "price_per_kwh_minor": o[6]})
            out[key] = entries
        return out

    def landed(self, message: eip712.TypedMessage, device: bytes, *, block: str | int = "latest") -> dict | None:
        """The stored outcome of (device, nonce) on chain, or None if it has not landed (yet).

        Raises LedgerUnavailable if a message with this nonce landed with *another* digest: the
        contract only accepts the device's own signature, so that cannot come from a relay.
        """
        to_block = self.head() if block == "latest" else int(block)
        topics = [_topic_address(device), _topic_uint(message.nonce)]
        digest = message.digest(self.domain)
        for event in ("Accepted", "Rejected"):
            for raw in self._logs(event, topics, self.from_block, to_block):
                log_ = self._decode(event, raw)
                if log_["removed"]:
                    continue
                kind_code, logged_digest = log_["data"][0], log_["data"][1]
                if logged_digest != digest or kind_code != eip712.KIND_CODES[message.kind]:
                    raise LedgerUnavailable(f"nonce {message.nonce} landed on chain with another digest than the one signed")
                outcome = {"status": "accepted" if event == "Accepted" else "rejected", "block": log_["block"],
                           "tx_hash": raw.get("transactionHash")}
                if event == "Rejected":
                    outcome["code"] = REJECTION_CODES.get(log_["data"][2], f"code_{log_['data'][2]}")
                return outcome
        return None

    def sign(self, fields: Mapping[str, Any], signer: Any) -> eip712.TypedMessage:
        """Sign a message built with ``messages.new_fields`` as EIP-712 for this contract's domain.

        The daemon can build messages one way and let the backend choose the encoding (REST signs
        the canonical JSON, this backend the typed data).
        """
        kind, typed = eip712.from_canonical_fields(fields)
        return eip712.sign_typed(self.domain, kind, typed, signer)

    def sign_message(self, fields: Mapping[str, Any], signer: Any) -> SignedMessage:
        """The journal's signing seam (journal.encode_message): the message as the journal stores it.

        The stored payload stays the canonical fields (firmware.messages), from which the typed
        struct follows by a pure mapping (``eip712.from_canonical_fields``); the stored signature is
        the EIP-2098 signature of the EIP-712 digest for this contract's domain. So the journal and
        the outbox keep one row shape for both backends, and a resend is the same bytes: ``submit``
        rebuilds the identical typed message from them, nothing is signed again.
        """
        typed = self.sign(fields, signer)
        return SignedMessage(payload=canonical_bytes(fields), signature=typed.signature)

    @staticmethod
    def typed(message: SignedMessage | eip712.TypedMessage) -> eip712.TypedMessage:
        """The typed message a journalled one stands for (see sign_message); typed ones pass through."""
        if isinstance(message, eip712.TypedMessage):
            return message
        if not isinstance(message, SignedMessage):
            raise ValueError("submit: expected a firmware.eip712.TypedMessage or a journalled SignedMessage")
        kind, fields = eip712.from_canonical_fields(message.fields)
        return eip712.TypedMessage(kind=kind, fields=fields, signature=message.signature)

    def submit(self, message: eip712.TypedMessage | SignedMessage) -> SubmitResult:
        """Send through the relay (or directly), then confirm on chain that the outcome reported is the real one."""
        message = self.typed(message)
        if self.relay is None:
            if self.gas_signer is None:
                raise ValueError("submit: no relay and no gas_signer configured for this EvmLedger")
            return self._submit_direct(message)
        device = message.signer(self.domain)
        result = self.relay.submit(message)
        if result.code in ("malformed", "bad_signature", "unknown_device", "revoked", "expired", "not_yet_valid",
                           "nonce_cancelled", "nonce_conflict", "not_carried"):
            # refused before the rules (or, not_carried, by the relay's own market day): nothing on
            # chain to confirm. A relay that says so falsely only withholds, which it can always do.
            return result
        outcome = self.landed(message, device)
        if outcome is None:
            raise LedgerUnavailable(f"the relay answered {result.status} for nonce {message.nonce}, but the chain has no such message")
        if outcome["status"] != result.status or (result.status == "rejected" and outcome.get("code") != result.code):
            raise LedgerUnavailable(f"the relay answered {result.status} {result.code or ''} for nonce {message.nonce}, "
                                    f"but the chain says {outcome['status']} {outcome.get('code', '')}")
        self._require_confirmed(outcome, message)
        return SubmitResult(status=result.status, duplicate=result.duplicate, code=result.code, detail=result.detail,
                            result={**result.result, "landed_block": outcome["block"]}, refusal=result.refusal)

    def _submit_direct(self, message: eip712.TypedMessage) -> SubmitResult:
        """The device sends its own transaction and pays the gas (no relay): estimate, sign, send, wait."""
        device = message.signer(self.domain)
        sender = eip712.address_from_public_key(self.gas_signer.public_key)
        outcome = self.landed(message, device)
        if outcome is not None:  # a resend of a message that already landed
            self._require_confirmed(outcome, message)
            return self._from_outcome(outcome, duplicate=True)
        data = message_calldata(message)
        call = {"from": "0x" + sender.hex(), "to": self.contract, "data": "0x" + data.hex()}
        try:
            gas = _quantity(self._once("eth_estimateGas", [call]), "eth_estimateGas")
        except _Transient as exc:
            refused = self._pre_rule_error(str(exc))
            if refused is not None:
                return refused
            raise LedgerUnavailable(f"eth_estimateGas: {exc}") from None
        block = self._block("latest")
        base_fee = self._checked(lambda: _quantity(block.get("baseFeePerGas", "0x0"), "baseFeePerGas"), "latest block")
        tip = 10**9 if base_fee else 0
        nonce = self._checked(lambda: _quantity(self._rpc("eth_getTransactionCount", "0x" + sender.hex(), "pending"), "nonce"), "nonce")
        tx = Eip1559Tx(chain_id=self.domain.chain_id, nonce=nonce, max_priority_fee_per_gas=tip, max_fee_per_gas=2 * base_fee + tip,
                       gas=gas * 5 // 4, to=self.domain.verifying_contract, value=0, data=data)
        tx_hash = self._rpc("eth_sendRawTransaction", "0x" + tx.sign(self.gas_signer).hex())
        deadline = time.monotonic() + DIRECT_RECEIPT_TIMEOUT_S
        while time.monotonic() < deadline:
            receipt = self._rpc("eth_getTransactionReceipt", tx_hash)
            if isinstance(receipt, dict):
                if receipt.get("status") != "0x1":
                    raise LedgerUnavailable(f"transaction {tx_hash} reverted; the message will be sent again")
                break
            self._sleep(0.1)
        else:
            raise LedgerUnavailable(f"no receipt for {tx_hash} within {DIRECT_RECEIPT_TIMEOUT_S} s")
        outcome = self.landed(message, device)
        if outcome is None:
            raise LedgerUnavailable(f"transaction {tx_hash} was mined but the message is not in its logs")
        self._require_confirmed(outcome, message)
        return self._from_outcome(outcome, duplicate=False)

    def _require_confirmed(self, outcome: dict, message: eip712.TypedMessage) -> None:
        """Not an answer yet until the block holding it is ``confirmations`` deep.

        Raising LedgerUnavailable keeps the signed message in the outbox; its resend is answered
        from the chain (a duplicate) once deep enough, or lands it again if a reorg dropped it.
        """
        if self.confirmations and outcome["block"] > self.confirmed_head():
            raise LedgerUnavailable(f"nonce {message.nonce} landed in block {outcome['block']}; "
                                    f"waiting for {self.confirmations} confirmation(s) before the outbox may forget it")

    @staticmethod
    def _from_outcome(outcome: dict, *, duplicate: bool) -> SubmitResult:
        extra = {"landed_block": outcome["block"], "tx_hash": outcome.get("tx_hash")}
        if outcome["status"] == "accepted":
            return SubmitResult(status="accepted", duplicate=duplicate, code=None, detail="", result=extra)
        return SubmitResult(status="rejected", duplicate=duplicate, code=outcome["code"],
                            detail=f"refused by the market contract's rules ({outcome['code']})", result=extra,
                            refusal=refusal_for(outcome["code"]))

    def _pre_rule_error(self, text: str) -> SubmitResult | None:
        """A contract error raised before the rules (seen in an estimate's revert) as a rejection, else None."""
        for selector_hex, code in PRE_RULE_SELECTORS.items():
            if selector_hex in text:
                return SubmitResult(status="rejected", duplicate=False, code=code, detail=f"the market contract refused it ({code})",
                                    refusal=refusal_for(code))
        return None

    # The scheduler's landing checks (firmware/scheduler/trade_record.py, A3). On a chain there is
    # no authority key: trades_since reads the contract's logs from the board's own node, at least
    # ``confirmations`` below the head, and submit waits for the confirmed landing itself
    # (_require_confirmed), so both checks hold by construction. G2: refine here if needed.
    needs_authority_key = False

    def confirm_trade(self, trade: TradeRecord, device_id: str, authority_public_key: bytes | None) -> None:
        return None

    def confirm_message(self, message: Any, authority_public_key: bytes | None) -> None:
        return None

    def trades_since(self, device_id: str, cursor: int) -> tuple[list[TradeRecord], int]:
        """The device's trades after ``cursor`` in confirmed blocks; the cursor never passes the confirmed head."""
        address = self._address(device_id)
        cursor_block, cursor_index = decode_cursor(cursor)
        if cursor and cursor_block in self._cursor_hashes:
            block = self._block(cursor_block)
            if block.get("hash") != self._cursor_hashes[cursor_block]:
                raise LedgerUnavailable(f"block {cursor_block} under the trade cursor changed (a reorg deeper than "
                                        f"{self.confirmations} confirmations): stopping instead of guessing")
        confirmed = self.confirmed_head()
        start = max(self.from_block, cursor_block)
        if confirmed < start:
            return [], cursor
        raw_logs = (self._logs("TradeMade", [None, _topic_address(address)], start, confirmed)
                    + self._logs("TradeMade", [None, None, _topic_address(address)], start, confirmed))
        found = []
        for raw in raw_logs:
            lg = self._decode("TradeMade", raw)
            if lg["removed"] or (lg["block"], lg["log_index"]) <= (cursor_block, cursor_index) and cursor:
                continue
            found.append(lg)
        found.sort(key=lambda lg: (lg["block"], lg["log_index"]))
        trades = []
        for lg in found:
            trade_id = int.from_bytes(lg["topics"][0], "big")
            seller, buyer = lg["topics"][1][12:], lg["topics"][2][12:]
            market_id, seller_nonce, buyer_nonce, energy_wh, price = lg["data"]
            selling = seller == address
            flags = self._view("trades", trade_id, block=hex(confirmed))[3]
            trades.append(TradeRecord(
                trade_id=trade_id, market_id=market_id, side="sell" if selling else "buy", energy_wh=energy_wh,
                price_per_kwh_minor=price, order_nonce=seller_nonce if selling else buyer_nonce,
                counterparty=eip712.checksum_address(buyer if selling else seller),
                state="settled" if flags & 4 else "reported" if flags & 3 else "contracted",
            ))
        if found:
            last = found[-1]
            new_cursor = encode_cursor(last["block"], last["log_index"])
            self._cursor_hashes = {last["block"]: last["block_hash"]}
        else:
            # everything up to the confirmed head has been seen; park the cursor on it (never past it)
            block = self._block(confirmed)
            new_cursor = max(cursor, encode_cursor(confirmed, 0xFFFFFFFF) if confirmed >= 0 else 0)
            if new_cursor != cursor:
                self._cursor_hashes = {confirmed: str(block.get("hash"))}
        return trades, new_cursor

