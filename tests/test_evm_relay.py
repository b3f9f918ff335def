"""The relay over real HTTP in front of a real anvil node: accepted / duplicate / rejected from the
receipt's events, trades from logs, a malicious relay refused by the contract, account nonce kept
across restarts, and the `dgc-host relay` commands run as processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import coincurve
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware import eip712
from firmware.keystore import DeviceKey, load_key_file
from firmware.ledger.evm_abi import message_calldata
from host_tools.evm.market import Account, wait_receipt
from host_tools.relay.core import Relay
from host_tools.relay.server import running_relay

from .evm_helpers import next_market, start_chain

FUNDS = 10**12


@pytest.fixture(scope="module")
def chain():
    c = start_chain()
    yield c
    c.node.stop()


@pytest.fixture(scope="module")
def relay(chain):
    r = Relay(chain.market, chain.relay)
    with running_relay(r) as running:
        yield running


def post(relay, message_or_wire) -> requests.Response:
    wire = message_or_wire.to_wire() if isinstance(message_or_wire, eip712.TypedMessage) else message_or_wire
    return requests.post(relay.url + "/v1/messages", json=wire, timeout=30)


def test_accepted_duplicate_and_rejected_from_receipts(chain, relay):
    market_id = next_market(chain)
    seller, buyer = chain.device(), chain.device(credit=FUNDS)
    ask = seller.order(market_id, "sell", 500, 2000)
    first = post(relay, ask)
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["status"], body["duplicate"], body["nonce"], body["type"]) == ("accepted", False, ask.nonce, "order")
    assert body["result"]["resting_wh"] == 500 and body["result"]["digest"] == "0x" + ask.digest(chain.market.domain()).hex()
    again = post(relay, ask)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["result"] == body["result"]

    bid = buyer.order(market_id, "buy", 300, 2100)
    answer = post(relay, bid).json()
    assert answer["result"]["fills"] == [{"trade_id": answer["result"]["fills"][0]["trade_id"], "energy_wh": 300,
                                          "price_per_kwh_minor": 2000, "counterparty": eip712.checksum_address(seller.address)}]
    assert answer["result"]["filled_wh"] == 300

    late = seller.order(block_slot(chain), "sell", 100, 2000)
    rejected = post(relay, late)
    assert rejected.status_code == 422 and rejected.json()["code"] == "gate_closed"
    assert post(relay, late).json() | {"detail": None} == rejected.json() | {"duplicate": True, "detail": None}

    # same nonce, other message: conflict, nothing applied
    other = eip712.sign_typed(chain.market.domain(), "order", {**ask.fields, "energy_wh": 900}, seller.key)
    conflict = post(relay, other)
    assert conflict.status_code == 409 and conflict.json()["code"] == "nonce_conflict"

    stranger = DeviceKey(coincurve.PrivateKey(os.urandom(32)))
    unknown = eip712.sign_typed(chain.market.domain(), "order", ask.fields, stranger)
    assert post(relay, unknown).json()["code"] == "unknown_device"
    assert post(relay, {"payload": "{}", "signature": "00"}).status_code == 400
    assert requests.post(relay.url + "/v1/messages", data=b"x" * 20000, timeout=10).status_code == 413


def block_slot(chain) -> int:
    from .evm_helpers import block_time

    return block_time(chain.market) // 1800 * 1800


def test_board_trades_from_logs_with_cursor_and_state(chain, relay):
    market_id = next_market(chain)
    seller, buyer = chain.device(), chain.device(credit=FUNDS)
    post(relay, seller.order(market_id, "sell", 400, 2000))
    post(relay, buyer.order(market_id, "buy", 100, 2000))
    post(relay, buyer.order(market_id, "buy", 200, 2000))
    url = f"{relay.url}/v1/devices/{eip712.checksum_address(seller.address)}/trades"
    answer = requests.get(url, params={"after": 0}, timeout=10).json()
    assert [(t["side"], t["energy_wh"], t["state"]) for t in answer["trades"]] == [("sell", 100, "contracted"), ("sell", 200, "contracted")]
    assert answer["cursor"] == answer["trades"][-1]["trade_id"]
    assert requests.get(url, params={"after": answer["cursor"]}, timeout=10).json() == {"trades": [], "cursor": answer["cursor"]}
    buyer_view = requests.get(f"{relay.url}/v1/devices/{eip712.checksum_address(buyer.address)}/trades", timeout=10).json()
    assert [(t["side"], t["counterparty"]) for t in buyer_view["trades"]] == [("buy", eip712.checksum_address(seller.address))] * 2
    trade = answer["trades"][0]
    chain.advance_to(market_id + 1800)
    for device, role in ((seller, "seller"), (buyer, "buyer")):
        report = device.sign("delivery_report", trade_id=trade["trade_id"], market_id=market_id, role=eip712.ROLES[role],
                             energy_wh=100, status=1)
        result = post(relay, report).json()["result"]
    assert result["settlement"] == {"settled_wh": 100, "shortfall_wh": 0, "shortfall_device": None, "paid_milli_minor": 100 * 2000}
    states = [t["state"] for t in requests.get(url, params={"after": 0}, timeout=10).json()["trades"]]
    assert states == ["settled", "contracted"]
    info = requests.get(relay.url + "/v1/info", timeout=10).json()
    assert info["contract"] == chain.market.address_hex and info["slot_seconds"] == 1800
    assert requests.get(relay.url + "/v1/time", timeout=10).json()["time_ms"] % 1000 == 0


class MaliciousRelay(Relay):
    """Changes what the board signed before sending it, and skips the pre-flight so it reaches a block."""

    def __init__(self, *args, tamper, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tamper = tamper
        self.receipts: list[dict] = []

    def submit(self, message):
        changed = self.tamper(message)
        tx_hash = self.account.send(self.market.address, message_calldata(changed), gas=600_000)
        self.receipts.append(wait_receipt(self.market.rpc, tx_hash))
        return super().submit(message)  # and then forwards the genuine one, which must still land


TAMPERINGS = {
    "price": lambda m: eip712.TypedMessage(m.kind, {**m.fields, "price_per_kwh_minor": m.fields["price_per_kwh_minor"] + 1}, m.signature),
    "side": lambda m: eip712.TypedMessage(m.kind, {**m.fields, "side": 3 - m.fields["side"]}, m.signature),
    "energy": lambda m: eip712.TypedMessage(m.kind, {**m.fields, "energy_wh": m.fields["energy_wh"] * 10}, m.signature),
    "market": lambda m: eip712.TypedMessage(m.kind, {**m.fields, "market_id": m.fields["market_id"] + 1800}, m.signature),
    "expiry": lambda m: eip712.TypedMessage(m.kind, {**m.fields, "expires_at": m.fields["expires_at"] + 86400}, m.signature),
    "signature": lambda m: eip712.TypedMessage(m.kind, m.fields, m.signature[:40] + bytes([m.signature[40] ^ 0x80]) + m.signature[41:]),
    "parity": lambda m: eip712.TypedMessage(m.kind, m.fields, m.signature[:32] + bytes([m.signature[32] ^ 0x80]) + m.signature[33:]),
}


@pytest.mark.parametrize("what", sorted(TAMPERINGS))
def test_malicious_relay_cannot_change_a_signed_message(chain, what):
    market_id = next_market(chain)
    seller = chain.device()
    evil = MaliciousRelay(chain.market, chain.relay, tamper=TAMPERINGS[what])
    message = seller.order(market_id, "sell", 500, 2000)
    with running_relay(evil) as running:
        answer = post(running, message)
    (tampered,) = evil.receipts
    assert tampered["status"] == "0x0", "the contract must refuse the changed message"
    assert tampered["logs"] == []
    body = answer.json()
    assert answer.status_code == 200 and body["duplicate"] is False  # the genuine message then landed, once
    placed = chain.market.logs("OrderPlaced", "0x" + (bytes(12) + seller.address).hex())
    assert [(p.args["energyWh"], p.args["pricePerKwhMinor"], p.args["marketId"]) for p in placed] == [(500, 2000, market_id)]


def test_account_nonce_is_right_across_restarts(chain, relay):
    rpc = chain.market.rpc
    key = DeviceKey(coincurve.PrivateKey(os.urandom(32)))
    rpc.call("anvil_setBalance", "0x" + eip712.address_from_public_key(key.public_key).hex(), hex(10**21))
    first = Relay(chain.market, Account(rpc=rpc, key=key, chain_id=chain.market.chain_id))
    market_id = next_market(chain)
    device = chain.device()
    with running_relay(first) as running:
        assert post(running, device.order(market_id, "sell", 100, 2000)).status_code == 200
    rpc.call("evm_setAutomine", False)
    try:
        # a transaction of the old process still in the mempool when it stops
        pending = first.account.send(chain.market.address, message_calldata(device.order(market_id, "sell", 200, 2000)), gas=600_000)
        second = Relay(chain.market, Account(rpc=rpc, key=key, chain_id=chain.market.chain_id))
        assert second.account.nonce == first.account.nonce
    finally:
        rpc.call("evm_setAutomine", True)
    rpc.call("evm_mine")
    assert wait_receipt(rpc, pending)["status"] == "0x1"
    with running_relay(second) as running:
        assert post(running, device.order(market_id, "sell", 300, 2000)).status_code == 200
    third = Relay(chain.market, Account(rpc=rpc, key=key, chain_id=chain.market.chain_id))
    assert third.account.nonce == second.account.nonce == rpc.call_int("eth_getTransactionCount", "0x" + third.account.address.hex(), "latest")


def test_relay_commands_as_processes(tmp_path):
    c = start_chain()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cli = [sys.executable, "-m", "host_tools.cli", "relay"]
    try:
        rpc = c.market.rpc
        operator_key, relay_key, board_key = tmp_path / "operator.key", tmp_path / "relay.key", tmp_path / "board.key"
        for path in (operator_key, relay_key, board_key):
            address = subprocess.run(cli + ["keygen", "--key-file", str(path)], env=env, capture_output=True, text=True, check=True).stdout.strip()
            rpc.call("anvil_setBalance", address, hex(10**21))
        deployed = subprocess.run(cli + ["deploy", "--rpc", c.node.url, "--key-file", str(operator_key)], env=env, capture_output=True,
                                  text=True, check=True, timeout=120).stdout
        contract = deployed.split()[1]
        subprocess.run(cli + ["register", "--rpc", c.node.url, "--key-file", str(operator_key), "--contract", contract,
                              "--device-key-file", str(board_key)], env=env, check=True, capture_output=True, timeout=60)
        log_path = tmp_path / "relay.log"
        with open(log_path, "w") as out:
            server = subprocess.Popen(cli + ["serve", "--rpc", c.node.url, "--key-file", str(relay_key), "--contract", contract, "--port", "0"],
                                      env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = None
            deadline = time.monotonic() + 60
            while url is None and time.monotonic() < deadline and server.poll() is None:
                for line in log_path.read_text().splitlines():
                    if line.startswith("relay listening on "):
                        url = line.split()[3]
                time.sleep(0.05)
            assert url, log_path.read_text()
            info = requests.get(url + "/v1/info", timeout=10).json()
            domain = eip712.Domain(chain_id=info["chain_id"], verifying_contract=eip712.address_bytes(info["contract"]))
            now = requests.get(url + "/v1/time", timeout=10).json()["time_ms"] // 1000
            fields = eip712.new_fields("order", nonce=1, issued_at=now, ttl_s=600, market_id=(now // 1800 + 2) * 1800,
                                       side=eip712.SIDE_SELL, energy_wh=100, price_per_kwh_minor=2000)
            message = eip712.sign_typed(domain, "order", fields, load_key_file(board_key))
            answer = requests.post(url + "/v1/messages", json=message.to_wire(), timeout=30)
            assert answer.status_code == 200 and answer.json()["status"] == "accepted", answer.text
        finally:
            os.kill(server.pid, signal.SIGTERM)
            assert server.wait(15) == 0
        secret_hex = relay_key.read_text().split()[1]
        assert len(secret_hex) == 64 and secret_hex.lower() not in log_path.read_text().lower()
    finally:
        c.node.stop()


def test_reorg_dropping_relay_transactions_does_not_stall_it(chain, relay):
    market_id = next_market(chain)
    device = chain.device()
    dropped = device.order(market_id, "sell", 100, 2000)
    assert post(relay, dropped).status_code == 200
    chain.market.rpc.call("anvil_reorg", 1, [])  # the block holding it is replaced; the relay's nonce is now ahead
    after = post(relay, device.order(market_id, "sell", 200, 2000))
    assert after.status_code == 200, after.text
    resent = post(relay, dropped)  # the board's outbox resends: the message is not on chain any more, so it lands again
    assert resent.status_code == 200 and resent.json()["duplicate"] is False


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                           max_leaves=12)
field_names = st.sampled_from(["type", "market_id", "side", "energy_wh", "price_per_kwh_minor", "nonce", "issued_at",
                               "expires_at", "order_nonce", "trade_id", "role", "status", "min_nonce", "x"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda fields, sig: json.dumps({"payload": json.dumps(fields), "signature": sig}).encode(),
              st.dictionaries(field_names, st.one_of(st.integers(-5, 2**65), st.sampled_from(["order", "cancel", "bulk_cancel", "delivery_report"])), max_size=9),
              st.one_of(st.text(alphabet="0123456789abcdef", min_size=128, max_size=128), st.text(max_size=130))),
))
def test_hostile_bodies_never_crash_the_relay(relay, body):
    answer = requests.post(relay.url + "/v1/messages", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert answer.status_code in (400, 401, 403, 409, 422), answer.text
    assert answer.json()["status"] == "rejected"
