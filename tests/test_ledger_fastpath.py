"""The ledger's hot-path shortcuts (host_tools/bench_ledger/fastpath.py) against their references.

Each shortcut must give exactly what the reference gives, or decline so the reference runs:
- fields_ok(f) may say True only when messages.validate_fields(f) passes (soundness, property);
  it must say True for every message a board builds (or the shortcut would be useless);
- canonical_text, message_leaf and render_response are byte-identical to canonical_bytes (json.dumps
  sorted, compact, ASCII), record.message_leaf and starlette's JSONResponse;
- Verifier agrees with messages.verify_signature and with the independent ecdsa package on valid,
  high-S, tampered, overflowing and random signatures.
"""

from __future__ import annotations

import hashlib
import json

import coincurve
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.responses import JSONResponse

from firmware.keystore import DeviceKey
from firmware.ledger import record
from firmware.messages import (SECP256K1_ORDER, MessageError, canonical_bytes, new_fields, sign_message, validate_fields,
                               verify_signature)
from host_tools.bench_ledger import fastpath

KEY = DeviceKey(coincurve.PrivateKey(hashlib.sha256(b"fastpath").digest()))

ints = st.one_of(st.integers(-3, 3), st.integers(-(2**64), 2**64), st.just(2**63 - 1), st.just(2**63), st.just(-(2**63)))
texts = st.one_of(st.sampled_from(["buy", "sell", "seller", "buyer", "delivered", "failed", "order", "cancel",
                                   "delivery_report", "read", "L1"]),
                  st.text(max_size=140), st.text(alphabet=st.characters(max_codepoint=127), min_size=120, max_size=135))
values = st.one_of(ints, texts, st.booleans(), st.none(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2))


def board_fields(kind: str, nonce: int = 7) -> dict:
    body = {"order": dict(market_id=1_800_001_800, side="buy", energy_wh=100, price_per_kwh_minor=2000),
            "cancel": dict(market_id=1_800_001_800, order_nonce=3),
            "delivery_report": dict(trade_id=5, market_id=1_800_001_800, role="seller", energy_wh=0, status="failed")}[kind]
    return new_fields(kind, ledger_id="L1", device_id=KEY.device_id, nonce=nonce, issued_at=1_800_000_000, ttl_s=600, **body)


@st.composite
def mutated_fields(draw) -> dict:
    """A board's message, decoded from its canonical payload, then changed in a few places."""
    fields = json.loads(canonical_bytes(board_fields(draw(st.sampled_from(fastpath.SUBMITTED_KINDS)))))
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["set", "drop", "add", "retype"]))
        name = draw(st.sampled_from(sorted(fields) or ["x"]))
        if action == "set" and fields:
            fields[name] = draw(values)
        elif action == "drop":
            fields.pop(name, None)
        elif action == "add":
            fields[draw(st.sampled_from(["path", "extra", "trade_id", "side", "order_nonce", "zzz", "a"]))] = draw(values)
        elif action == "retype":
            fields["type"] = draw(st.sampled_from(["order", "cancel", "delivery_report", "read", "bogus"]))
    if draw(st.booleans()):
        fields = dict(sorted(fields.items()))  # the order a canonical payload decodes in
    return fields


@settings(max_examples=1500, deadline=None)
@given(mutated_fields())
def test_fields_ok_only_when_validate_fields_passes(fields):
    if fastpath.fields_ok(fields):
        validate_fields(fields)  # raises if the shortcut let something through
        assert fields["type"] in fastpath.SUBMITTED_KINDS
        assert list(fields) == sorted(fields)


def test_fields_ok_accepts_every_board_message():
    for kind in fastpath.SUBMITTED_KINDS:
        decoded = json.loads(canonical_bytes(board_fields(kind)))
        assert fastpath.fields_ok(decoded), kind
        assert fastpath.canonical_text(decoded).encode("ascii") == canonical_bytes(decoded)


def test_fields_ok_declines_what_validate_fields_refuses():
    bad = [dict(board_fields("order"), side="hold"), dict(board_fields("order"), energy_wh=0),
           dict(board_fields("order"), nonce=True), dict(board_fields("cancel"), order_nonce=0),
           dict(board_fields("delivery_report"), status="late"), dict(board_fields("order"), ledger_id="L\x01"),
           dict(board_fields("order"), v=2), dict(board_fields("order"), price_per_kwh_minor=2**63)]
    for fields in bad:
        decoded = dict(sorted(fields.items()))
        assert not fastpath.fields_ok(decoded), fields
        try:
            validate_fields(decoded)
        except MessageError:
            pass
        else:
            raise AssertionError(f"validate_fields accepted {fields}")


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=300), st.binary(min_size=64, max_size=64))
def test_message_leaf_is_the_records(payload, signature):
    raw = payload.encode("ascii")
    assert fastpath.message_leaf(raw, signature) == record.message_leaf(raw, signature)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=6))
def test_rendered_and_stored_texts_are_the_references(body):
    assert fastpath.render_response(body) == JSONResponse(body).body
    assert fastpath.canonical_text(body) == json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _signatures():
    message = sign_message(board_fields("order"), KEY)
    r, s = message.signature[:32], int.from_bytes(message.signature[32:], "big")
    high_s = r + (SECP256K1_ORDER - s).to_bytes(32, "big")
    overflow = SECP256K1_ORDER.to_bytes(32, "big") + message.signature[32:]
    tampered = message.payload.replace(b'"energy_wh":100', b'"energy_wh":900')
    other = DeviceKey(coincurve.PrivateKey(hashlib.sha256(b"other").digest()))
    return [
        (message.payload, message.signature, KEY.public_key, True),
        (message.payload, high_s, KEY.public_key, False),
        (message.payload, overflow, KEY.public_key, False),
        (tampered, message.signature, KEY.public_key, False),
        (message.payload, message.signature, other.public_key, False),
        (message.payload, message.signature[:63], KEY.public_key, False),
        (message.payload, bytes(64), KEY.public_key, False),
        (message.payload, hashlib.sha512(b"x").digest(), KEY.public_key, False),
    ]


def test_verifier_agrees_with_both_references():
    verifier = fastpath.Verifier()
    for payload, signature, public_key, valid in _signatures():
        for _ in range(2):  # the second time with the key already parsed
            assert verifier.verify(payload, signature, public_key) is valid
        assert verify_signature(payload, signature, public_key, backend="coincurve") is valid
        assert verify_signature(payload, signature, public_key, backend="ecdsa") is valid


def _outcome(call, text):
    try:
        return ("value", call(text))
    except Exception as exc:  # the same exception type and text, or the shortcut is wrong
        return ("error", type(exc).__name__, str(exc))


json_texts = st.one_of(
    json_values.map(json.dumps),
    st.text(alphabet=' \t\n{}[]",:0123456789.eE+-truefalsnNaINfiy\\u', max_size=40),
    json_values.map(lambda v: " " + json.dumps(v) + " "),
    json_values.map(lambda v: json.dumps(v) + "x"),
    st.sampled_from(["1.5", "NaN", "-Infinity", '{"a": 1e3}', "[1, 2.0]", "", " ", '{"a":1}{"b":2}']),
)


@settings(max_examples=1000, deadline=None)
@given(json_texts)
def test_strict_loads_is_the_strict_decoder(text):
    assert _outcome(fastpath.strict_loads, text) == _outcome(fastpath.STRICT_DECODER.decode, text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(max_codepoint=127), max_size=30), max_size=40))
def test_merkle_root_is_the_records(leaves):
    expected = record.merkle_root([record.leaf_hash(leaf.encode("ascii")) for leaf in leaves])
    assert fastpath.merkle_root(leaves) == expected


flat_texts = st.one_of(  # flat objects, as envelopes and messages are: orjson's shortcut takes these
    st.dictionaries(st.text(max_size=8), st.none() | st.booleans() | ints | st.text(max_size=12), max_size=6).map(json.dumps),
    st.dictionaries(st.text(max_size=8), ints | st.text(max_size=12), max_size=6).map(
        lambda d: json.dumps(d, ensure_ascii=False, separators=(",", ":"))),
    st.sampled_from(['{"a":1,"a":2}', '{"a":"\\ud800"}', '{"a":"\\u0041"}', '\ufeff{"a":1}', '{"a":"x\ty"}', '{"a":"\x00"}',
                     '{"a":99999999999999999999999}', '{"a":-9223372036854775809}', '{"a":18446744073709551615}',
                     '{"a":-0}', '{"a":1.0}', '{"a":1e2}', '{"a":NaN}', '{"a":Infinity}', '{"a":[1]}', '{"a":{}}', '{"a":1,}',
                     '{a:1}', "{'a':1}", '{"a":01}', '{"a":+1}', '{"a":.5}', '{"a":true,"b":null}', ' {"a":1}\n', '{"a":1} x']),
    st.text(alphabet='{}"a:,1 \t\\u0', max_size=16),
)


@settings(max_examples=1000, deadline=None)
@given(flat_texts)
def test_strict_loads_on_flat_objects_is_the_strict_decoder(text):
    assert _outcome(fastpath.strict_loads, text) == _outcome(fastpath.STRICT_DECODER.decode, text)


@settings(max_examples=1000, deadline=None)
@given(mutated_fields(), st.sampled_from(["same", "space", "escaped", "reordered", "plus"]))
def test_is_canonical_is_the_canonical_text(fields, variant):
    if not fastpath.fields_ok(fields):
        return
    text = fastpath.canonical_text(fields)
    payload = {"same": text, "space": text.replace(",", ", ", 1), "escaped": text.replace("e", "\\u0065", 1),
               "reordered": json.dumps(dict(reversed(list(fields.items()))), separators=(",", ":")),
               "plus": text.replace(":1", ":+1", 1)}[variant].encode("ascii")
    assert fastpath.is_canonical(fields, payload) is (text.encode("ascii") == payload)
    assert fastpath.is_canonical(fields, canonical_bytes(fields)) is True
