"""The per-message hot path of the bench ledger, at C speed where the slow path is pure Python.

Why a separate module: at a few thousand messages per second every microsecond of Python on
the event loop and in the writer thread counts (both share one GIL), and the reference
functions (``messages.validate_fields``, ``record.message_leaf``, ``json.dumps`` with keyword
arguments, coincurve's DER round trip) are written for clarity, not for this loop. Each
function here is a *shortcut with a fallback*: it either gives exactly what the reference
gives, or says "not sure" (False / None) and the caller takes the reference path, which
produces the exact error text. tests/test_ledger_fastpath.py holds each one to its reference
(property tests).
"""

from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring_ascii
from typing import Any, Callable

from firmware.messages import INT64_MAX, INT64_MIN, MAX_STRING_CHARS, MESSAGE_VERSION, ORDER_SIDES, REPORT_ROLES, REPORT_STATUSES, SCHEMAS

SUBMITTED_KINDS = ("order", "cancel", "delivery_report")


def _no_float(value: str) -> Any:
    raise ValueError(f"number {value[:20]} is not an integer; expected integers only")


def _no_constant(value: str) -> Any:
    raise ValueError(f"{value} is not valid JSON; expected integers only")


# json.loads(text, **kw) and json.dumps(obj, **kw) build a new decoder/encoder on every call
# when given keyword arguments; these are built once and behave identically.
STRICT_DECODER = json.JSONDecoder(parse_float=_no_float, parse_constant=_no_constant)
_scan_once = STRICT_DECODER.scan_once

try:  # orjson (the host extra pins it): parses and writes a message's JSON ~5x faster than json
    import orjson as _orjson
except ImportError:  # pragma: no cover - the standard library paths below are the references anyway
    _orjson = None
_FLAT_TYPES = frozenset({str, int, bool, type(None)})


def strict_loads(text: str) -> Any:
    """``STRICT_DECODER.decode(text)``. A flat JSON object (every value a string, integer, boolean
    or null - an envelope, a message) comes from orjson, which decodes those exactly as json does;
    anything else (a float, nesting, an error, orjson missing) is left to the C scanner when the
    text is exactly one JSON value, else to ``decode`` itself, so errors are exactly its errors."""
    if _orjson is not None:
        try:
            value = _orjson.loads(text)
        except ValueError:  # orjson.JSONDecodeError: the reference says what is wrong
            pass
        else:
            if type(value) is dict and _FLAT_TYPES.issuperset(map(type, value.values())):
                return value
    try:
        value, end = _scan_once(text, 0)
    except (StopIteration, ValueError, RecursionError):
        return STRICT_DECODER.decode(text)
    if end != len(text):
        return STRICT_DECODER.decode(text)
    return value


_CANONICAL_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)
_RESPONSE_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


def _one_shot(encoder: json.JSONEncoder) -> Callable[[Any], str]:
    """``encoder.encode`` for a dict, with the C encoder built once (``JSONEncoder.encode`` builds
    it, and a dict to detect cycles, on every call). Our bodies never hold a cycle; anything but a
    dict, or no C accelerator, goes through ``encoder.encode`` itself."""
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:
        return encoder.encode
    string_encoder = json.encoder.encode_basestring_ascii if encoder.ensure_ascii else json.encoder.encode_basestring
    c_encoder = c_make_encoder(None, encoder.default, string_encoder, None, encoder.key_separator, encoder.item_separator,
                               encoder.sort_keys, encoder.skipkeys, encoder.allow_nan)

    def encode(obj: Any) -> str:
        if type(obj) is not dict:
            return encoder.encode(obj)
        return "".join(c_encoder(obj, 0))

    return encode


_render_text = _one_shot(_RESPONSE_ENCODER)
canonical_text = _one_shot(_CANONICAL_ENCODER)  # messages.canonical_bytes without the schema check (as text)


def render_response(body: Any) -> bytes:
    """The bytes starlette's JSONResponse sends for ``body`` (json.dumps, ensure_ascii=False,
    compact, insertion order): orjson writes exactly those for the bodies the ledger builds
    (strings, 64-bit integers, booleans, null, lists, dicts with string keys); anything it
    refuses (a bigger integer, a surrogate) goes through the json encoder."""
    if _orjson is not None:
        try:
            return _orjson.dumps(body)
        except TypeError:  # orjson.JSONEncodeError
            pass
    return _render_text(body).encode("utf-8")


def is_canonical(fields: Any, payload: bytes) -> bool:
    """``canonical_text(fields) == payload`` for fields that passed ``fields_ok``: its keys are
    already in sorted order and every value is a 64-bit integer or printable ASCII, which orjson
    writes byte for byte as json.dumps(sort_keys, compact, ensure_ascii) does (only ``"`` and
    ``\\`` are escaped, the same way). Only for ``fields_ok`` fields."""
    if _orjson is not None:
        try:
            return _orjson.dumps(fields) == payload
        except TypeError:
            pass
    return canonical_text(fields).encode("ascii") == payload


# kind -> (field names in sorted order, their types in that order)
_SPECS: dict[str, tuple[tuple[str, ...], tuple[type, ...]]] = {
    kind: (tuple(sorted(SCHEMAS[kind])), tuple(SCHEMAS[kind][name] for name in sorted(SCHEMAS[kind])))
    for kind in SUBMITTED_KINDS
}


def fields_ok(fields: Any) -> bool:
    """True only when ``messages.validate_fields(fields)`` passes and the kind is one a device
    submits (order, cancel, delivery_report) with its fields in sorted order, as a canonical
    payload decodes. False means "take the reference path" (which names the problem), not
    necessarily "invalid"."""
    if type(fields) is not dict:
        return False
    kind = fields.get("type")
    spec = _SPECS.get(kind) if type(kind) is str else None
    if spec is None:
        return False
    names, types = spec
    if tuple(fields) != names:
        return False
    values = tuple(fields.values())
    if tuple(map(type, values)) != types:
        return False
    for value in values:
        if type(value) is int:
            if not INT64_MIN <= value <= INT64_MAX:
                return False
        elif len(value) > MAX_STRING_CHARS or not value.isascii() or not value.isprintable():
            return False
    if fields["v"] != MESSAGE_VERSION or fields["nonce"] < 1 or fields["expires_at"] <= fields["issued_at"]:
        return False
    if kind == "order":
        return fields["side"] in ORDER_SIDES and fields["energy_wh"] > 0 and fields["price_per_kwh_minor"] > 0
    if kind == "cancel":
        return fields["order_nonce"] >= 1
    return fields["role"] in REPORT_ROLES and fields["status"] in REPORT_STATUSES and fields["energy_wh"] >= 0


def message_leaf(payload: bytes, signature: bytes) -> bytes:
    """``record.message_leaf``: the canonical JSON {"kind","payload","signature"} (keys already in
    sorted order), each string escaped exactly as json.dumps(ensure_ascii=True) does."""
    return ('{"kind":"message","payload":' + encode_basestring_ascii(payload.decode("ascii"))
            + ',"signature":"' + signature.hex() + '"}').encode("ascii")


def merkle_root(leaves: list[str]) -> bytes:
    """``record.merkle_root`` over ``record.leaf_hash`` of each leaf (ASCII text), without a
    Python call per hash: a seal of a 1,024-entry block under the store lock stays short."""
    sha256 = hashlib.sha256
    level = [sha256(b"\x00" + leaf.encode("ascii")).digest() for leaf in leaves]
    if not level:
        return sha256(b"").digest()
    while len(level) > 1:
        odd = level[-1] if len(level) % 2 else None
        level = [sha256(b"\x01" + left + right).digest() for left, right in zip(level[0::2], level[1::2])]
        if odd is not None:
            level.append(odd)
    return level[0]


class Verifier:
    """``messages.verify_signature`` (libsecp256k1 through coincurve, low-S only) with each
    device's parsed public key kept, and the compact signature parsed straight into
    libsecp256k1's form (coincurve's own verify goes compact -> DER -> parsed: two extra C calls
    and Python around them). Registered keys never change."""

    def __init__(self) -> None:
        import coincurve
        from coincurve._libsecp256k1 import ffi, lib
        from coincurve.context import GLOBAL_CONTEXT

        self._coincurve, self._ffi, self._lib, self._ctx = coincurve, ffi, lib, GLOBAL_CONTEXT.ctx
        self._keys: dict[bytes, Any] = {}

    def verify(self, payload: bytes, signature: bytes, public_key: bytes) -> bool:
        if len(signature) != 64:
            return False
        if not _ZERO_32 < signature[32:] <= _HALF_ORDER_32:  # low-S only, as messages.is_low_s (32-byte big-endian
            return False  # strings of one length compare as their numbers do)
        key = self._keys.get(public_key)
        if key is None:
            try:
                key = self._keys[public_key] = self._coincurve.PublicKey(public_key).public_key
            except (ValueError, TypeError):
                return False
        return self.curve_verify(signature, hashlib.sha256(payload).digest(), key)

    def curve_verify(self, signature: bytes, digest: bytes, key: Any) -> bool:
        """The one libsecp256k1 verification (its own method so the tests can count it)."""
        parsed = self._ffi.new("secp256k1_ecdsa_signature *")
        if not self._lib.secp256k1_ecdsa_signature_parse_compact(self._ctx, parsed, signature):
            return False  # r or s not below the group order
        return bool(self._lib.secp256k1_ecdsa_verify(self._ctx, parsed, digest, key))


_HALF_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141 // 2
_HALF_ORDER_32 = _HALF_ORDER.to_bytes(32, "big")
_ZERO_32 = bytes(32)
