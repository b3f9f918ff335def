"""Canonical, signed messages between a DGC and the ledger: order, cancel, delivery report.

Why this shape:
- The service provider's relay sits between the board and the ledger (primary source, 2.1),
  so every message is signed on the board and verified by the ledger over *exact bytes*.
  The wire form therefore carries the canonical payload as a string, never a re-serialised
  object: what the board signed is what the ledger hashes.
- Only integers and short ASCII strings are allowed. Floats have no single canonical text
  form, so energy is in Wh, prices in an integer minor currency unit per kWh, times in UTC
  epoch seconds.
- ``ledger_id`` binds a message to one ledger, ``nonce`` makes it unique per device (the
  ledger deduplicates on (device_id, nonce)), ``expires_at`` bounds how long a relay can
  hold it back.

This module does no I/O. Signing goes through a ``Signer`` (see ``keystore``) so the secret
never passes through here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Mapping, Protocol

import coincurve
from coincurve.ecdsa import cdata_to_der, deserialize_compact

MESSAGE_VERSION = 1
SIGNATURE_BYTES = 64
MAX_STRING_CHARS = 128
MAX_PAYLOAD_BYTES = 2048
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Order of the secp256k1 group: a signature is "low-S" when s <= n/2.
SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")

ORDER_SIDES = ("buy", "sell")
REPORT_ROLES = ("seller", "buyer")
REPORT_STATUSES = ("delivered", "failed")

_COMMON_FIELDS = {
    "v": int,
    "type": str,
    "ledger_id": str,
    "device_id": str,
    "nonce": int,
    "issued_at": int,
    "expires_at": int,
}
SCHEMAS: dict[str, dict[str, type]] = {
    "order": {
        **_COMMON_FIELDS,
        "market_id": int,
        "side": str,
        "energy_wh": int,
        "price_per_kwh_minor": int,
    },
    "cancel": {**_COMMON_FIELDS, "market_id": int, "order_nonce": int},
    "delivery_report": {
        **_COMMON_FIELDS,
        "trade_id": int,
        "market_id": int,
        "role": str,
        "energy_wh": int,
        "status": str,
    },
    # A signed, time-stamped read request: proves to the ledger that a read of the device's own
    # orders, trades or balance comes from the device. ``path`` binds it to one request (path and
    # query exactly as sent), so a captured header cannot read anything else; it is never stored
    # and does not consume a message nonce (any positive nonce, e.g. the time in ms, will do).
    "read": {**_COMMON_FIELDS, "path": str},
}
READ_MAX_TTL_SECONDS = 300


class MessageError(ValueError):
    """A message that is malformed, non-canonical or wrongly signed. The text says which field and why."""


class Signer(Protocol):
    """Anything that can sign a 32-byte digest with the device key (see keystore.DeviceKey)."""

    @property
    def public_key(self) -> bytes: ...

    def sign_digest(self, digest: bytes) -> bytes: ...


def device_id_from_public_key(public_key: bytes) -> str:
    """The device id: hex of the first 20 bytes of sha256(compressed public key).

    Deriving it from the key (instead of assigning it) means a device cannot claim another's id.
    """
    compressed = coincurve.PublicKey(public_key).format(compressed=True)
    return hashlib.sha256(compressed).hexdigest()[:40]


def validate_fields(fields: Mapping[str, object]) -> None:
    """Check a message's fields against its schema; raise MessageError naming the first problem."""
    if not isinstance(fields, Mapping):
        raise MessageError(f"message must be an object, got {type(fields).__name__}")
    kind = fields.get("type")
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise MessageError(f"field 'type': expected one of {sorted(SCHEMAS)}, got {kind!r}")
    schema = SCHEMAS[kind]
    missing = sorted(set(schema) - set(fields))
    if missing:
        raise MessageError(f"{kind}: missing field(s) {', '.join(missing)}")
    extra = sorted(set(fields) - set(schema))
    if extra:
        raise MessageError(f"{kind}: unexpected field(s) {', '.join(extra)}")
    for name, expected in schema.items():
        value = fields[name]
        if expected is int:
            if type(value) is not int:
                raise MessageError(f"{kind}.{name}: expected an integer, got {type(value).__name__}")
            if not INT64_MIN <= value <= INT64_MAX:
                raise MessageError(f"{kind}.{name}: {value} is outside the 64-bit integer range")
        else:
            if type(value) is not str:
                raise MessageError(f"{kind}.{name}: expected a string, got {type(value).__name__}")
            if len(value) > MAX_STRING_CHARS or not value.isascii() or not value.isprintable():
                raise MessageError(f"{kind}.{name}: expected printable ASCII of at most {MAX_STRING_CHARS} characters")
    if fields["v"] != MESSAGE_VERSION:
        raise MessageError(f"{kind}.v: expected {MESSAGE_VERSION}, got {fields['v']}")
    if fields["nonce"] < 1:
        raise MessageError(f"{kind}.nonce: expected a positive integer, got {fields['nonce']}")
    if fields["expires_at"] <= fields["issued_at"]:
        raise MessageError(f"{kind}.expires_at: must be after issued_at ({fields['issued_at']}), got {fields['expires_at']}")
    if kind == "order":
        if fields["side"] not in ORDER_SIDES:
            raise MessageError(f"order.side: expected one of {ORDER_SIDES}, got {fields['side']!r}")
        if fields["energy_wh"] <= 0:
            raise MessageError(f"order.energy_wh: expected a positive integer, got {fields['energy_wh']}")
        if fields["price_per_kwh_minor"] <= 0:
            raise MessageError(f"order.price_per_kwh_minor: expected a positive integer, got {fields['price_per_kwh_minor']}")
    elif kind == "cancel":
        if fields["order_nonce"] < 1:
            raise MessageError(f"cancel.order_nonce: expected a positive integer, got {fields['order_nonce']}")
    elif kind == "read":
        if not fields["path"].startswith("/"):
            raise MessageError(f"read.path: expected the request path starting with '/', got {fields['path'][:40]!r}")
        if fields["expires_at"] - fields["issued_at"] > READ_MAX_TTL_SECONDS:
            raise MessageError(f"read.expires_at: a read request is valid for at most {READ_MAX_TTL_SECONDS} s after issued_at")
    elif kind == "delivery_report":
        if fields["role"] not in REPORT_ROLES:
            raise MessageError(f"delivery_report.role: expected one of {REPORT_ROLES}, got {fields['role']!r}")
        if fields["status"] not in REPORT_STATUSES:
            raise MessageError(f"delivery_report.status: expected one of {REPORT_STATUSES}, got {fields['status']!r}")
        if fields["energy_wh"] < 0:
            raise MessageError(f"delivery_report.energy_wh: expected zero or more, got {fields['energy_wh']}")


def canonical_bytes(fields: Mapping[str, object]) -> bytes:
    """Sorted-key, compact, ASCII-only JSON of a validated message: the exact bytes that are signed."""
    validate_fields(fields)
    return json.dumps(dict(fields), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def message_digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


@dataclass(frozen=True)
class SignedMessage:
    """Canonical payload bytes plus a 64-byte compact (r || s) low-S ECDSA signature."""

    payload: bytes
    signature: bytes

    @property
    def fields(self) -> dict:
        return json.loads(self.payload)

    def to_wire(self) -> dict:
        return {"payload": self.payload.decode("ascii"), "signature": self.signature.hex()}

    @classmethod
    def from_wire(cls, obj: object) -> "SignedMessage":
        """Parse the JSON envelope a relay forwards; every shape error becomes a MessageError."""
        if not isinstance(obj, Mapping):
            raise MessageError("envelope: expected an object with 'payload' and 'signature'")
        payload, signature = obj.get("payload"), obj.get("signature")
        if not isinstance(payload, str) or not payload.isascii():
            raise MessageError("envelope.payload: expected the canonical message as an ASCII string")
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise MessageError(f"envelope.payload: longer than {MAX_PAYLOAD_BYTES} bytes")
        if not isinstance(signature, str) or not all(c in _HEX_DIGITS for c in signature):
            # bytes.fromhex() alone would also accept whitespace between the bytes
            raise MessageError("envelope.signature: expected 128 hex characters")
        try:
            sig = bytes.fromhex(signature)
        except ValueError:
            raise MessageError("envelope.signature: expected 128 hex characters") from None
        if len(sig) != SIGNATURE_BYTES:
            raise MessageError(f"envelope.signature: expected {SIGNATURE_BYTES} bytes, got {len(sig)}")
        return cls(payload=payload.encode("ascii"), signature=sig)


def sign_message(fields: Mapping[str, object], signer: Signer) -> SignedMessage:
    payload = canonical_bytes(fields)
    return SignedMessage(payload=payload, signature=signer.sign_digest(message_digest(payload)))


def is_low_s(signature: bytes) -> bool:
    s = int.from_bytes(signature[32:64], "big")
    return 0 < s <= SECP256K1_ORDER // 2


def verify_signature(payload: bytes, signature: bytes, public_key: bytes, *, backend: str = "coincurve") -> bool:
    """True when ``signature`` is a valid low-S signature of sha256(payload) by ``public_key``.

    ``backend="ecdsa"`` uses the independent pure-Python implementation (slow, verification only).
    """
    if len(signature) != SIGNATURE_BYTES or not is_low_s(signature):
        return False
    digest = message_digest(payload)
    if backend == "coincurve":
        try:
            der = cdata_to_der(deserialize_compact(signature))
            return coincurve.PublicKey(public_key).verify(der, digest, hasher=None)
        except (ValueError, TypeError):
            return False
    if backend == "ecdsa":
        import ecdsa  # only the verifier side pays for this import

        try:
            key = ecdsa.VerifyingKey.from_string(public_key, curve=ecdsa.SECP256k1)
            return key.verify_digest(signature, digest, sigdecode=ecdsa.util.sigdecode_string)
        except (ecdsa.BadSignatureError, ecdsa.MalformedPointError, ValueError, AssertionError):
            return False
    raise ValueError(f"unknown signature backend {backend!r}; expected 'coincurve' or 'ecdsa'")


def open_message(message: SignedMessage, public_key: bytes, *, backend: str = "coincurve") -> dict:
    """Verify and decode a received message: signature first, then canonical form and schema.

    Re-encoding and comparing with the received bytes rejects any payload that is valid JSON
    but not the canonical form (reordered keys, spaces, floats, duplicates).
    The payload's ``device_id`` must be the one derived from ``public_key``.
    """
    if not verify_signature(message.payload, message.signature, public_key, backend=backend):
        raise MessageError("signature: does not verify against the device's registered public key")
    try:
        fields = json.loads(message.payload)
    except ValueError as exc:
        raise MessageError(f"payload: not JSON ({exc})") from None
    if canonical_bytes(fields) != message.payload:
        raise MessageError("payload: not in canonical form (sorted keys, compact, integers and strings only)")
    expected_id = device_id_from_public_key(public_key)
    if fields["device_id"] != expected_id:  # a key must not speak for another device's id
        raise MessageError(f"{fields['type']}.device_id: expected {expected_id} (derived from the public key), got {fields['device_id']}")
    return fields


def new_fields(kind: str, *, ledger_id: str, device_id: str, nonce: int, issued_at: int, ttl_s: int, **body: object) -> dict:
    """Assemble a message's fields; validated here so a bad value fails where it was made."""
    fields = {
        "v": MESSAGE_VERSION,
        "type": kind,
        "ledger_id": ledger_id,
        "device_id": device_id,
        "nonce": nonce,
        "issued_at": issued_at,
        "expires_at": issued_at + ttl_s,
        **body,
    }
    validate_fields(fields)
    return fields
