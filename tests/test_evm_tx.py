"""The host's RLP + coincurve EIP-1559 transactions, byte for byte against eth_account."""

from __future__ import annotations

import os

import coincurve
from eth_account import Account
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.eip712 import checksum_address
from firmware.keystore import DeviceKey
from host_tools.evm.tx import Eip1559Tx, contract_address, key_address, rlp_encode


def test_rlp_known_vectors():
    # from the Ethereum wiki's RLP examples
    assert rlp_encode(b"dog") == b"\x83dog"
    assert rlp_encode([b"cat", b"dog"]) == b"\xc8\x83cat\x83dog"
    assert rlp_encode(b"") == b"\x80"
    assert rlp_encode([]) == b"\xc0"
    assert rlp_encode(0) == b"\x80"
    assert rlp_encode(15) == b"\x0f"
    assert rlp_encode(1024) == b"\x82\x04\x00"
    assert rlp_encode([[], [[]], [[], [[]]]]) == bytes.fromhex("c7c0c1c0c3c0c1c0")
    assert rlp_encode(b"a" * 56)[:2] == b"\xb8\x38"


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 2**32), st.integers(0, 2**40), st.integers(0, 10**11), st.integers(0, 10**12), st.integers(21000, 30_000_000),
       st.one_of(st.none(), st.binary(min_size=20, max_size=20)), st.integers(0, 10**20), st.binary(max_size=300))
def test_signed_tx_is_byte_identical_to_eth_account(chain_id, nonce, tip, extra, gas, to, value, data):
    raw_key = coincurve.PrivateKey(os.urandom(32))
    key = DeviceKey(raw_key)
    tx = Eip1559Tx(chain_id=chain_id, nonce=nonce, max_priority_fee_per_gas=tip, max_fee_per_gas=tip + extra, gas=gas,
                   to=to, value=value, data=data)
    fields = {"type": 2, "chainId": chain_id, "nonce": nonce, "maxPriorityFeePerGas": tip, "maxFeePerGas": tip + extra,
              "gas": gas, "value": value, "data": data, "accessList": []}
    if to is not None:
        fields["to"] = checksum_address(to)  # eth_account wants EIP-55 checksummed addresses
    theirs = Account.sign_transaction(fields, raw_key.secret)
    assert tx.sign(key) == bytes(theirs.raw_transaction)
    assert "0x" + key_address(key).hex() == Account.from_key(raw_key.secret).address.lower()


def test_contract_address_of_a_known_deployer():
    # the address anvil's first default account gets for its first deployment
    sender = bytes.fromhex("f39Fd6e51aad88F6F4ce6aB8827279cffFb92266")
    assert contract_address(sender, 0).hex() == "5fbdb2315678afecb367f032d93f642f64180aa3"
