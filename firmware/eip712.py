"""EIP-712 typed messages for the EVM ledger: order, cancel, bulk cancel, delivery report.

Why this encoding (and not the REST backend's canonical JSON):
- A contract must verify what the board signed. Parsing JSON in Solidity is neither cheap nor
  safe; EIP-712 hashes fixed-width words, which ``ecrecover`` then checks for a few thousand gas.
- Every field is a ``uint256``: no strings, no floats, no signed integers, so there is exactly one
  encoding of a message and nothing to canonicalise. Enumerations are small positive integers
  (zero is never valid, so a zeroed field cannot pass for a real value).
- The domain (name, version, chain id, contract address) takes the place of ``ledger_id``: a
  message signed for one contract on one chain can be replayed on no other.
- The device's Ethereum address is ``keccak(uncompressed public key)[12:]``: the contract recovers
  it from the signature, so a message carries no sender field a relay could change.
- Signatures are made by the device key (any ``messages.Signer``: the secret never passes through
  here) and packed as EIP-2098 compact signatures (64 bytes ``r || yParity·2^255 + s``). The
  recovery bit is found by recovering with both parities and keeping the one that gives the
  device's own public key, so the keystore needs no recoverable-signing API.

Only ``coincurve`` (already on the board) and pycryptodome's keccak (about 0.6 MB of RSS) are
used: eth-account would cost about 20 MB on the board. This module does no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

import coincurve
from Crypto.Hash import keccak as _keccak

from firmware.messages import SECP256K1_ORDER, MessageError, Signer

UINT256_MAX = 2**256 - 1
# Values the board sends fit in 64 bits; the contract stores them packed and refuses larger ones.
UINT64_MAX = 2**64 - 1
SIGNATURE_BYTES = 64

SIDE_BUY, SIDE_SELL = 1, 2
ROLE_SELLER, ROLE_BUYER = 1, 2
STATUS_DELIVERED, STATUS_FAILED = 1, 2
SIDES = {"buy": SIDE_BUY, "sell": SIDE_SELL}
ROLES = {"seller": ROLE_SELLER, "buyer": ROLE_BUYER}
STATUSES = {"delivered": STATUS_DELIVERED, "failed": STATUS_FAILED}

# kind -> (EIP-712 struct name, [(wire field name, EIP-712 member name)]). The order of members is
# the order of the contract function's arguments too (firmware.ledger.evm_abi).
TYPES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "order": ("Order", (
        ("market_id", "marketId"),
        ("side", "side"),
        ("energy_wh", "energyWh"),
        ("price_per_kwh_minor", "pricePerKwhMinor"),
        ("nonce", "nonce"),
        ("issued_at", "issuedAt"),
        ("expires_at", "expiresAt"),
    )),
    "cancel": ("Cancel", (
        ("market_id", "marketId"),
        ("order_nonce", "orderNonce"),
        ("nonce", "nonce"),
        ("issued_at", "issuedAt"),
        ("expires_at", "expiresAt"),
    )),
    "bulk_cancel": ("BulkCancel", (
        ("min_nonce", "minNonce"),
        ("nonce", "nonce"),
        ("issued_at", "issuedAt"),
        ("expires_at", "expiresAt"),
    )),
    "delivery_report": ("DeliveryReport", (
        ("trade_id", "tradeId"),
        ("market_id", "marketId"),
        ("role", "role"),
        ("energy_wh", "energyWh"),
        ("status", "status"),
        ("nonce", "nonce"),
        ("issued_at", "issuedAt"),
        ("expires_at", "expiresAt"),
    )),
}
KIND_CODES = {"order": 1, "cancel": 2, "bulk_cancel": 3, "delivery_report": 4}

DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
DEFAULT_DOMAIN_NAME = "DGC Market"
DEFAULT_DOMAIN_VERSION = "1"


def keccak256(data: bytes) -> bytes:
    return _keccak.new(digest_bits=256, data=data).digest()


def type_string(kind: str) -> str:
    """The EIP-712 ``encodeType`` string, e.g. ``Cancel(uint256 marketId,...)``."""
    name, members = _schema(kind)
    return f"{name}(" + ",".join(f"uint256 {member}" for _, member in members) + ")"


def type_hash(kind: str) -> bytes:
    return keccak256(type_string(kind).encode("ascii"))


def _schema(kind: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    try:
        return TYPES[kind]
    except KeyError:
        raise MessageError(f"type: expected one of {sorted(TYPES)}, got {kind!r}") from None


def field_names(kind: str) -> tuple[str, ...]:
    return tuple(wire for wire, _ in _schema(kind)[1])


@dataclass(frozen=True)
class Domain:
    """The EIP-712 domain: which contract, on which chain, this message is for."""

    chain_id: int
    verifying_contract: bytes  # 20 bytes
    name: str = DEFAULT_DOMAIN_NAME
    version: str = DEFAULT_DOMAIN_VERSION

    def __post_init__(self) -> None:
        if type(self.chain_id) is not int or not 1 <= self.chain_id <= UINT64_MAX:
            raise ValueError(f"chain_id: expected a positive 64-bit integer, got {self.chain_id!r}")
        if not isinstance(self.verifying_contract, bytes) or len(self.verifying_contract) != 20:
            raise ValueError("verifying_contract: expected the contract's 20-byte address")

    @classmethod
    def from_hex(cls, chain_id: int, contract_address: str, **kwargs: str) -> "Domain":
        return cls(chain_id=chain_id, verifying_contract=address_bytes(contract_address), **kwargs)

    def separator(self) -> bytes:
        return keccak256(
            keccak256(DOMAIN_TYPE.encode("ascii"))
            + keccak256(self.name.encode("utf-8"))
            + keccak256(self.version.encode("utf-8"))
            + self.chain_id.to_bytes(32, "big")
            + bytes(12) + self.verifying_contract
        )


def address_bytes(text: str) -> bytes:
    """Parse a 0x-prefixed 40-hex-digit address (any letter case) into 20 bytes."""
    if not isinstance(text, str) or len(text) != 42 or not text.startswith("0x"):
        raise ValueError(f"address: expected 0x and 40 hex digits, got {text!r}")
    try:
        return bytes.fromhex(text[2:])
    except ValueError:
        raise ValueError(f"address: expected 0x and 40 hex digits, got {text!r}") from None


def checksum_address(address: bytes) -> str:
    """EIP-55 mixed-case form, as Ethereum tools print it."""
    plain = address.hex()
    hashed = keccak256(plain.encode("ascii")).hex()
    return "0x" + "".join(c.upper() if c.isalpha() and int(hashed[i], 16) >= 8 else c for i, c in enumerate(plain))


def address_from_public_key(public_key: bytes) -> bytes:
    """The device's Ethereum address: the last 20 bytes of keccak(uncompressed key without 0x04)."""
    uncompressed = coincurve.PublicKey(public_key).format(compressed=False)
    return keccak256(uncompressed[1:])[12:]


def validate_fields(kind: str, fields: Mapping[str, object]) -> None:
    """Every field present, no extra, each an integer in range; enumerations and windows valid."""
    names = field_names(kind)
    if not isinstance(fields, Mapping):
        raise MessageError(f"{kind}: expected an object of integer fields")
    missing = [n for n in names if n not in fields]
    if missing:
        raise MessageError(f"{kind}: missing field(s) {', '.join(missing)}")
    extra = sorted(set(fields) - set(names) - {"type"})
    if extra:
        raise MessageError(f"{kind}: unexpected field(s) {', '.join(extra)}")
    for name in names:
        value = fields[name]
        if type(value) is not int:
            raise MessageError(f"{kind}.{name}: expected an integer, got {type(value).__name__}")
        if not 0 <= value <= UINT64_MAX:
            raise MessageError(f"{kind}.{name}: {value} is outside 0..2^64-1")
    if fields["nonce"] < 1:
        raise MessageError(f"{kind}.nonce: expected a positive integer, got {fields['nonce']}")
    if fields["expires_at"] <= fields["issued_at"]:
        raise MessageError(f"{kind}.expires_at: must be after issued_at ({fields['issued_at']}), got {fields['expires_at']}")
    if kind == "order":
        if fields["side"] not in (SIDE_BUY, SIDE_SELL):
            raise MessageError(f"order.side: expected {SIDE_BUY} (buy) or {SIDE_SELL} (sell), got {fields['side']}")
        if fields["energy_wh"] < 1 or fields["price_per_kwh_minor"] < 1:
            raise MessageError("order: energy_wh and price_per_kwh_minor must be positive")
    elif kind == "cancel" and fields["order_nonce"] < 1:
        raise MessageError(f"cancel.order_nonce: expected a positive integer, got {fields['order_nonce']}")
    elif kind == "bulk_cancel" and fields["min_nonce"] < 1:
        raise MessageError(f"bulk_cancel.min_nonce: expected a positive integer, got {fields['min_nonce']}")
    elif kind == "delivery_report":
        if fields["role"] not in (ROLE_SELLER, ROLE_BUYER):
            raise MessageError(f"delivery_report.role: expected {ROLE_SELLER} (seller) or {ROLE_BUYER} (buyer), got {fields['role']}")
        if fields["status"] not in (STATUS_DELIVERED, STATUS_FAILED):
            raise MessageError(f"delivery_report.status: expected {STATUS_DELIVERED} (delivered) or {STATUS_FAILED} (failed), got {fields['status']}")


def field_words(kind: str, fields: Mapping[str, object]) -> list[int]:
    """The fields in EIP-712 member order (also the contract function's argument order)."""
    validate_fields(kind, fields)
    return [int(fields[name]) for name in field_names(kind)]  # type: ignore[call-overload]


def struct_hash(kind: str, fields: Mapping[str, object]) -> bytes:
    return keccak256(type_hash(kind) + b"".join(w.to_bytes(32, "big") for w in field_words(kind, fields)))


def digest(domain: Domain, kind: str, fields: Mapping[str, object]) -> bytes:
    """The 32 bytes that are signed: keccak(0x1901 || domainSeparator || hashStruct(message))."""
    return keccak256(b"\x19\x01" + domain.separator() + struct_hash(kind, fields))


def to_eip2098(digest_: bytes, signature: bytes, public_key: bytes) -> bytes:
    """Pack a 64-byte low-S ``r || s`` signature as EIP-2098 ``r || vs`` (parity in the top bit of s)."""
    if len(signature) != SIGNATURE_BYTES:
        raise MessageError(f"signature: expected {SIGNATURE_BYTES} bytes, got {len(signature)}")
    s = int.from_bytes(signature[32:], "big")
    if not 0 < s <= SECP256K1_ORDER // 2:
        raise MessageError("signature: s must be low (s <= n/2)")
    wanted = coincurve.PublicKey(public_key).format(compressed=True)
    for parity in (0, 1):
        try:
            recovered = coincurve.PublicKey.from_signature_and_message(signature + bytes([parity]), digest_, hasher=None)
        except ValueError:
            continue
        if recovered.format(compressed=True) == wanted:
            return signature[:32] + (s | (parity << 255)).to_bytes(32, "big")
    raise MessageError("signature: does not recover to the signer's public key")


def recover_address(digest_: bytes, compact: bytes) -> bytes:
    """The address that made an EIP-2098 signature of ``digest_``; MessageError if none (as ecrecover)."""
    if len(compact) != SIGNATURE_BYTES:
        raise MessageError(f"signature: expected {SIGNATURE_BYTES} bytes, got {len(compact)}")
    vs = int.from_bytes(compact[32:], "big")
    parity, s = vs >> 255, vs & ((1 << 255) - 1)
    if not 0 < s <= SECP256K1_ORDER // 2:
        raise MessageError("signature: s must be low (s <= n/2)")
    try:
        key = coincurve.PublicKey.from_signature_and_message(compact[:32] + s.to_bytes(32, "big") + bytes([parity]), digest_, hasher=None)
    except ValueError:
        raise MessageError("signature: recovers no public key") from None
    return keccak256(key.format(compressed=False)[1:])[12:]


@dataclass(frozen=True)
class TypedMessage:
    """A signed typed message: its kind, its integer fields and the EIP-2098 signature.

    On the wire (the same ``POST /v1/messages`` envelope the REST backend uses) the payload is the
    sorted compact JSON of ``{"type": kind, **fields}``; only the typed fields are signed, so the
    JSON's form does not matter to the contract (a relay that rewrites it changes nothing it can use).
    """

    kind: str
    fields: dict
    signature: bytes

    def __post_init__(self) -> None:
        validate_fields(self.kind, self.fields)
        if len(self.signature) != SIGNATURE_BYTES:
            raise MessageError(f"signature: expected {SIGNATURE_BYTES} bytes, got {len(self.signature)}")

    @property
    def nonce(self) -> int:
        return int(self.fields["nonce"])

    def words(self) -> list[int]:
        return field_words(self.kind, self.fields)

    def digest(self, domain: Domain) -> bytes:
        return digest(domain, self.kind, self.fields)

    def signer(self, domain: Domain) -> bytes:
        return recover_address(self.digest(domain), self.signature)

    @property
    def payload(self) -> bytes:
        """The wire payload: compact sorted JSON of ``{"type": kind, **fields}`` (not what is signed)."""
        return json.dumps({"type": self.kind, **self.fields}, sort_keys=True, separators=(",", ":")).encode("ascii")

    def to_wire(self) -> dict:
        return {"payload": self.payload.decode("ascii"), "signature": self.signature.hex()}

    @classmethod
    def from_wire(cls, obj: object) -> "TypedMessage":
        if not isinstance(obj, Mapping):
            raise MessageError("envelope: expected an object with 'payload' and 'signature'")
        payload, signature = obj.get("payload"), obj.get("signature")
        if not isinstance(payload, str) or len(payload) > 2048:
            raise MessageError("envelope.payload: expected the message's JSON as a string of at most 2048 characters")
        if not isinstance(signature, str) or len(signature) != 2 * SIGNATURE_BYTES or not all(c in "0123456789abcdefABCDEF" for c in signature):
            raise MessageError(f"envelope.signature: expected {2 * SIGNATURE_BYTES} hex characters")

        def no_float(value: str) -> object:
            raise MessageError("envelope.payload: numbers must be integers")

        try:
            fields = json.loads(payload, parse_float=no_float, parse_constant=no_float)
        except MessageError:
            raise
        except (ValueError, RecursionError):
            raise MessageError("envelope.payload: not JSON") from None
        if not isinstance(fields, dict):
            raise MessageError("envelope.payload: expected a JSON object")
        kind = fields.pop("type", None)
        if not isinstance(kind, str) or kind not in TYPES:
            raise MessageError(f"envelope.payload.type: expected one of {sorted(TYPES)}, got {kind!r}")
        return cls(kind=kind, fields=fields, signature=bytes.fromhex(signature))


def sign_typed(domain: Domain, kind: str, fields: Mapping[str, object], signer: Signer) -> TypedMessage:
    """Sign a typed message with the device key; the fields are checked first."""
    validate_fields(kind, fields)
    d = digest(domain, kind, fields)
    compact = to_eip2098(d, signer.sign_digest(d), signer.public_key)
    return TypedMessage(kind=kind, fields={n: fields[n] for n in field_names(kind)}, signature=compact)


def from_canonical_fields(fields: Mapping[str, object]) -> tuple[str, dict]:
    """The EIP-712 (kind, fields) of a message built for the REST backend (firmware.messages schema).

    Lets the daemon build every message one way (``messages.new_fields``) and leave the encoding to
    the backend: ``v``, ``ledger_id`` and ``device_id`` are dropped (the domain and the recovered
    signer take their place) and the string enumerations become their integer codes.
    """
    kind = fields.get("type")
    if kind not in ("order", "cancel", "delivery_report"):
        raise MessageError(f"type: expected order, cancel or delivery_report, got {kind!r}")
    out = {name: fields.get(name) for name in field_names(str(kind))}
    try:
        if kind == "order":
            out["side"] = SIDES[fields["side"]]  # type: ignore[index]
        elif kind == "delivery_report":
            out["role"] = ROLES[fields["role"]]  # type: ignore[index]
            out["status"] = STATUSES[fields["status"]]  # type: ignore[index]
    except (KeyError, TypeError):
        raise MessageError(f"{kind}: side, role or status is not one of the known values") from None
    validate_fields(str(kind), out)
    return str(kind), out


def new_fields(kind: str, *, nonce: int, issued_at: int, ttl_s: int, **body: object) -> dict:
    """Assemble a typed message's fields; validated here so a bad value fails where it was made."""
    fields = {**body, "nonce": nonce, "issued_at": issued_at, "expires_at": issued_at + ttl_s}
    validate_fields(kind, fields)
    return {n: fields[n] for n in field_names(kind)}
