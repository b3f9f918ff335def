"""EIP-712 encoding (firmware.eip712) cross-checked against eth_account, an independent implementation."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import coincurve
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware import eip712
from firmware.keystore import DeviceKey
from firmware.messages import MessageError

SECRET = hashlib.sha256(b"dgc test vector key").digest()
DOC = Path(__file__).resolve().parents[1] / "docs" / "messages.md"


def full_message(domain: eip712.Domain, kind: str, fields: dict) -> dict:
    name, members = eip712.TYPES[kind]
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            name: [{"name": member, "type": "uint256"} for _, member in members],
        },
        "primaryType": name,
        "domain": {"name": domain.name, "version": domain.version, "chainId": domain.chain_id,
                   "verifyingContract": eip712.checksum_address(domain.verifying_contract)},
        "message": {member: fields[wire] for wire, member in members},
    }


def doc_vector() -> dict[str, str]:
    text = DOC.read_text()
    block = text.split("### EIP-712 test vector", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    return dict(re.split(r"\s+", line.strip(), maxsplit=1) for line in block.strip().splitlines())


def test_doc_vector_matches_code_and_eth_account():
    v = doc_vector()
    key = DeviceKey(coincurve.PrivateKey(SECRET))
    domain = eip712.Domain.from_hex(int(v["chain_id"]), v["contract"])
    fields = {name: int(v[name]) for name in eip712.field_names("order")}
    message = eip712.sign_typed(domain, "order", fields, key)
    assert eip712.checksum_address(eip712.address_from_public_key(key.public_key)) == v["address"]
    assert domain.separator().hex() == v["domain_separator"]
    assert eip712.struct_hash("order", fields).hex() == v["struct_hash"]
    assert message.digest(domain).hex() == v["digest"]
    assert message.signature.hex() == v["signature_2098"]
    # independent: eth_account's typed-data encoder and signer
    signed = Account.sign_message(encode_typed_data(full_message=full_message(domain, "order", fields)), SECRET)
    assert signed.message_hash.hex().removeprefix("0x") == v["digest"]
    assert Account.from_key(SECRET).address == v["address"]
    vs = int.from_bytes(message.signature[32:], "big")
    assert message.signature[:32] == signed.r.to_bytes(32, "big")
    assert vs & ((1 << 255) - 1) == signed.s and (vs >> 255) + 27 == signed.v


uint64 = st.integers(min_value=0, max_value=eip712.UINT64_MAX)


@st.composite
def typed_fields(draw):
    kind = draw(st.sampled_from(sorted(eip712.TYPES)))
    fields = {name: draw(uint64) for name in eip712.field_names(kind)}
    fields["nonce"] = draw(st.integers(1, eip712.UINT64_MAX))
    fields["issued_at"] = draw(st.integers(0, 2**40))
    fields["expires_at"] = fields["issued_at"] + draw(st.integers(1, 10**6))
    if kind == "order":
        fields["side"] = draw(st.sampled_from([1, 2]))
        fields["energy_wh"] = draw(st.integers(1, eip712.UINT64_MAX))
        fields["price_per_kwh_minor"] = draw(st.integers(1, eip712.UINT64_MAX))
    if kind == "cancel":
        fields["order_nonce"] = draw(st.integers(1, eip712.UINT64_MAX))
    if kind == "bulk_cancel":
        fields["min_nonce"] = draw(st.integers(1, eip712.UINT64_MAX))
    if kind == "delivery_report":
        fields["role"] = draw(st.sampled_from([1, 2]))
        fields["status"] = draw(st.sampled_from([1, 2]))
    return kind, fields


@settings(max_examples=60, deadline=None)
@given(typed_fields(), st.integers(1, 2**32), st.binary(min_size=20, max_size=20), st.binary(min_size=32, max_size=32))
def test_every_kind_matches_eth_account(kind_fields, chain_id, contract, seed):
    kind, fields = kind_fields
    secret = hashlib.sha256(seed).digest()
    key = DeviceKey(coincurve.PrivateKey(secret))
    domain = eip712.Domain(chain_id=chain_id, verifying_contract=contract)
    message = eip712.sign_typed(domain, kind, fields, key)
    signed = Account.sign_message(encode_typed_data(full_message=full_message(domain, kind, fields)), secret)
    assert message.digest(domain) == bytes(signed.message_hash)
    vs = int.from_bytes(message.signature[32:], "big")
    assert (message.signature[:32], vs & ((1 << 255) - 1), (vs >> 255) + 27) == (signed.r.to_bytes(32, "big"), signed.s, signed.v)
    assert message.signer(domain) == eip712.address_from_public_key(key.public_key) == bytes.fromhex(Account.from_key(secret).address[2:])
    assert eip712.TypedMessage.from_wire(message.to_wire()) == message


def test_changed_field_or_domain_recovers_another_address():
    key = DeviceKey(coincurve.PrivateKey(SECRET))
    domain = eip712.Domain(chain_id=31337, verifying_contract=bytes(range(20)))
    fields = eip712.new_fields("cancel", nonce=5, issued_at=100, ttl_s=60, market_id=1800, order_nonce=4)
    message = eip712.sign_typed(domain, "cancel", fields, key)
    me = eip712.address_from_public_key(key.public_key)
    assert message.signer(domain) == me
    tampered = eip712.TypedMessage("cancel", {**fields, "order_nonce": 3}, message.signature)
    assert tampered.signer(domain) != me
    assert message.signer(eip712.Domain(chain_id=1, verifying_contract=bytes(range(20)))) != me


@pytest.mark.parametrize(
    "kind, change, match",
    [
        ("order", {"side": 0}, "order.side"),
        ("order", {"energy_wh": 1.5}, "order.energy_wh: expected an integer"),
        ("order", {"price_per_kwh_minor": 2**64}, "outside"),
        ("delivery_report", {"role": 3}, "delivery_report.role"),
        ("cancel", {"expires_at": 0}, "expires_at"),
    ],
)
def test_bad_fields_name_the_field(kind, change, match):
    base = {
        "order": dict(market_id=1800, side=1, energy_wh=100, price_per_kwh_minor=2000),
        "cancel": dict(market_id=1800, order_nonce=1),
        "delivery_report": dict(trade_id=1, market_id=1800, role=1, energy_wh=100, status=1),
    }[kind]
    fields = {**base, "nonce": 1, "issued_at": 10, "expires_at": 20, **change}
    with pytest.raises(MessageError, match=match):
        eip712.validate_fields(kind, fields)


@pytest.mark.parametrize(
    "envelope, match",
    [
        ({"payload": '{"type":"order"}', "signature": "00" * 64}, "missing"),
        ({"payload": '{"type":"vote"}', "signature": "00" * 64}, "type"),
        ({"payload": "[1]", "signature": "00" * 64}, "object"),
        ({"payload": '{"type":"cancel","market_id":1.0}', "signature": "00" * 64}, "integers"),
        ({"payload": "{}", "signature": "zz" * 64}, "hex"),
        ([], "envelope"),
    ],
)
def test_from_wire_refuses_bad_envelopes(envelope, match):
    with pytest.raises(MessageError, match=match):
        eip712.TypedMessage.from_wire(envelope)


def test_rest_fields_convert_to_typed_fields():
    from firmware import messages

    key = DeviceKey(coincurve.PrivateKey(SECRET))
    order = messages.new_fields("order", ledger_id="x", device_id=key.device_id, nonce=3, issued_at=100, ttl_s=60,
                                market_id=1800, side="sell", energy_wh=300, price_per_kwh_minor=2450)
    assert eip712.from_canonical_fields(order) == ("order", {"market_id": 1800, "side": 2, "energy_wh": 300, "price_per_kwh_minor": 2450,
                                                              "nonce": 3, "issued_at": 100, "expires_at": 160})
    report = messages.new_fields("delivery_report", ledger_id="x", device_id=key.device_id, nonce=4, issued_at=100, ttl_s=60,
                                 trade_id=7, market_id=1800, role="buyer", energy_wh=0, status="failed")
    assert eip712.from_canonical_fields(report)[1] == {"trade_id": 7, "market_id": 1800, "role": 2, "energy_wh": 0, "status": 2,
                                                        "nonce": 4, "issued_at": 100, "expires_at": 160}
    with pytest.raises(MessageError, match="side"):
        eip712.from_canonical_fields({**order, "side": "hold"})
