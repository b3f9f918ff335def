"""The board side of `[ledger] kind = "evm"`: config, the journal's signing seam, the adapter's
mapping of the daemon's device id. No chain here (pure and local: the chain is in the HIL test
hil_tests/test_daemon_evm.py and tests/test_evm_ledger.py)."""

from __future__ import annotations

import os
from pathlib import Path

import coincurve
import pytest

from firmware import eip712
from firmware.config import ConfigError, load_config
from firmware.journal import Journal
from firmware.keystore import DeviceKey
from firmware.ledger.evm import EvmLedger
from firmware.messages import SignedMessage, new_fields

from .test_config import MINIMAL, write

CONTRACT = "0x" + "ab" * 20
EVM_KEYS = f'kind = "evm"\nrpc_url = "http://127.0.0.1:8545"\nchain_id = 31337\ncontract = "{CONTRACT}"\n'


def _evm_config(tmp_path: Path, extra: str = EVM_KEYS):
    return load_config(write(tmp_path, MINIMAL.replace('ledger_id = "dgc-test"', 'ledger_id = "dgc-test"\n' + extra, 1)))


def test_the_default_backend_is_rest(tmp_path):
    assert load_config(write(tmp_path, MINIMAL)).ledger.kind == "rest"


def test_an_evm_config_loads(tmp_path):
    ledger = _evm_config(tmp_path, EVM_KEYS + "confirmations = 2\nfrom_block = 7\n").ledger
    assert (ledger.kind, ledger.rpc_url, ledger.chain_id, ledger.contract, ledger.confirmations, ledger.from_block) == \
        ("evm", "http://127.0.0.1:8545", 31337, CONTRACT, 2, 7)


@pytest.mark.parametrize("drop, key", [("rpc_url", "rpc_url"), ("chain_id", "chain_id"), ("contract", "contract")])
def test_evm_without_the_chains_coordinates_names_the_key(tmp_path, drop, key):
    extra = "".join(line + "\n" for line in EVM_KEYS.splitlines() if not line.startswith(drop))
    with pytest.raises(ConfigError) as info:
        _evm_config(tmp_path, extra)
    assert (info.value.table, info.value.key) == ("ledger", key)
    assert 'when kind = "evm"' in str(info.value)


@pytest.mark.parametrize("line, key", [('kind = "chain"', "kind"), ('contract = "0x1234"', "contract"),
                                       ('rpc_url = "ws://x"', "rpc_url"), ("chain_id = 4294967296", "chain_id")])
def test_bad_evm_values_are_refused(tmp_path, line, key):
    with pytest.raises(ConfigError) as info:
        _evm_config(tmp_path, line + "\n")
    assert info.value.key == key


def _key() -> DeviceKey:
    return DeviceKey(coincurve.PrivateKey(os.urandom(32)))


def test_evm_submit_chooses_the_relay_or_the_device_paying_its_own_gas(tmp_path):
    """Issue 9: submission goes through the relay, or straight to the contract as an option in
    which the device pays the gas — chosen in the board config, as the daemon builds it."""
    key = _key()
    relayed = EvmLedger.from_config(_evm_config(tmp_path).ledger, signer=key)
    assert relayed.relay is not None and relayed.gas_signer is None
    direct_cfg = _evm_config(tmp_path, EVM_KEYS + 'evm_submit = "direct"\n').ledger
    assert direct_cfg.evm_submit == "direct"
    direct = EvmLedger.from_config(direct_cfg, signer=key)
    assert direct.relay is None and direct.gas_signer is key
    with pytest.raises(ConfigError) as info:
        _evm_config(tmp_path, EVM_KEYS + 'evm_submit = "both"\n')
    assert info.value.key == "evm_submit" and '"relay"' in str(info.value)


def test_the_journal_stores_eip712_signatures_and_the_outbox_resends_the_same_typed_message(tmp_path):
    """The seam: with the EVM backend's encoder the stored signature is the EIP-712 one; the
    adapter rebuilds exactly the typed message that was signed, every time, from the stored bytes."""
    key = _key()
    ledger = EvmLedger("http://127.0.0.1:1", chain_id=31337, contract=CONTRACT).own_device(key.device_id, key.public_key)
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.encode_message = ledger.sign_message

    def build(nonce: int) -> dict:
        return new_fields("order", ledger_id="evm", device_id=key.device_id, nonce=nonce, issued_at=1_800_000_000,
                          ttl_s=60, market_id=1_800_000_600, side="sell", energy_wh=300, price_per_kwh_minor=2100)

    signed = journal.enqueue_order(build, key)
    assert isinstance(signed, SignedMessage) and len(signed.signature) == 64
    (entry,) = journal.pending_outbox()
    assert (entry.message.payload, entry.message.signature) == (signed.payload, signed.signature)
    assert journal.orders_in_market(1_800_000_600)[0].side == "sell"  # the journal's rows keep their meaning
    typed = ledger.typed(entry.message)
    assert typed == ledger.typed(journal.pending_outbox()[0].message)  # a resend: the same message
    assert typed.kind == "order" and typed.fields["side"] == eip712.SIDE_SELL and typed.nonce == entry.nonce
    assert typed.signer(ledger.domain) == eip712.address_from_public_key(key.public_key)
    assert typed == ledger.sign(build(entry.nonce), key)  # deterministic signatures (RFC 6979)
    journal.close()


def test_a_changed_stored_byte_is_another_signer_not_a_message_of_this_board(tmp_path):
    key = _key()
    ledger = EvmLedger("http://127.0.0.1:1", chain_id=31337, contract=CONTRACT)
    fields = new_fields("cancel", ledger_id="evm", device_id=key.device_id, nonce=5, issued_at=1_800_000_000, ttl_s=60,
                        market_id=1_800_000_600, order_nonce=4)
    signed = ledger.sign_message(fields, key)
    tampered = SignedMessage(payload=signed.payload.replace(b'"order_nonce":4', b'"order_nonce":3'), signature=signed.signature)
    assert ledger.typed(tampered).signer(ledger.domain) != eip712.address_from_public_key(key.public_key)


def test_the_daemons_device_id_reads_the_keys_address():
    key = _key()
    ledger = EvmLedger.from_config(type("L", (), {"url": "http://127.0.0.1:1", "rpc_url": "http://127.0.0.1:2",
                                                  "chain_id": 1, "contract": CONTRACT})(), signer=key)
    assert ledger._address(key.device_id) == eip712.address_from_public_key(key.public_key)
    other = "0x" + "cd" * 20
    assert ledger._address(other) == bytes.fromhex("cd" * 20)
    assert ledger.relay.url == "http://127.0.0.1:1"


def test_selftest_checks_the_chain_and_the_devices_registration(tmp_path):
    """`dgc selftest` with kind = "evm": the ledger check reads the chain (real anvil), the device
    check finds a registered address and names an unregistered one."""
    import time

    from firmware.selftest import Check, _check_device, _check_ledger
    from host_tools.evm.devchain import start_chain

    chain = start_chain()
    try:
        extra = (f'kind = "evm"\nrpc_url = "{chain.node.url}"\nchain_id = {chain.market.chain_id}\n'
                 f'contract = "{chain.market.address_hex}"\n')
        config = _evm_config(tmp_path, extra)
        check, ledger, skew_ms = _check_ledger(config, time.time)
        assert check.ok, check.detail
        assert isinstance(ledger, EvmLedger) and abs(skew_ms) < 5000
        registered = chain.device().key
        assert _check_device(ledger, registered, Check("key", True, ""), config).ok
        stranger = _key()
        refused = _check_device(ledger, stranger, Check("key", True, ""), config)
        assert not refused.ok and "not registered" in refused.detail and "unknown_device" in refused.detail
    finally:
        chain.node.stop()
