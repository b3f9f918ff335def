"""The board's EVM adapter (firmware.ledger.evm) against a real anvil node and the real relay over
HTTP: landing confirmation, a lying relay, trades to a confirmation depth, reorgs, the block clock."""

from __future__ import annotations

import pytest

from firmware import eip712
from firmware.ledger.base import LedgerRejected, LedgerUnavailable, Refusal
from firmware.ledger.evm import EVENTS, VIEWS, EvmLedger, RelayClient, decode_cursor
from host_tools.evm.solc import compile_market
from host_tools.relay.core import Answer, Relay
from host_tools.relay.server import running_relay

from .evm_helpers import Device, block_time, next_market, start_chain

FUNDS = 10**12


@pytest.fixture(scope="module")
def chain():
    c = start_chain()
    yield c
    c.node.stop()


@pytest.fixture(scope="module")
def relay_url(chain):
    with running_relay(Relay(chain.market, chain.relay)) as running:
        yield running.url


def board_ledger(chain, relay_url=None, **kwargs) -> EvmLedger:
    relay = RelayClient(relay_url) if relay_url else None
    return EvmLedger(chain.node.url, chain_id=chain.market.chain_id, contract=chain.market.address_hex, relay=relay,
                     retries=0, **kwargs)


def address_of(device) -> str:
    return eip712.checksum_address(device.address)


def test_board_abi_matches_the_compiled_contract():
    abi = compile_market().abi
    signatures = {f"{i['name']}({','.join(x['type'] for x in i['inputs'])})" for i in abi if i["type"] in ("event", "function")}
    for signature, _ in list(EVENTS.values()) + list(VIEWS.values()):
        assert signature in signatures
    outputs = {i["name"]: [o["type"] for o in i["outputs"]] for i in abi if i["type"] == "function"}
    for name, (_, types) in VIEWS.items():
        assert outputs[name] == types, name


def test_submit_through_relay_and_confirm_landing(chain, relay_url):
    ledger = board_ledger(chain, relay_url)
    assert ledger.server_time_ms() == block_time(chain.market) * 1000
    assert ledger.info()["slot_seconds"] == 1800
    market_id = next_market(chain)
    me = chain.device(credit=FUNDS)
    order = me.order(market_id, "buy", 400, 2000)
    result = ledger.submit(order)
    assert result.accepted and not result.duplicate and result.result["landed_block"] >= 1
    assert ledger.submit(order).duplicate
    book = ledger.market_book(market_id)
    assert book["gate_open"] and [(b["device_id"], b["remaining_wh"]) for b in book["bids"]] == [(address_of(me), 400)]
    account = ledger.device_account(address_of(me))
    assert (account["balance_milli_minor"], account["locked_milli_minor"]) == (FUNDS - 400 * 2000, 400 * 2000)
    late = me.order(block_time(chain.market) // 1800 * 1800, "sell", 100, 2000)
    rejected = ledger.submit(late)
    assert (rejected.status, rejected.code, rejected.refusal) == ("rejected", "gate_closed", Refusal.REFUSED)
    # the chain's and the relay's refusals reach the board as the backend-neutral vocabulary (issue 9 part 4)
    stale = ledger.submit(me.sign("order", issued_at=block_time(chain.market) - 1200, ttl_s=60, market_id=market_id,
                                  side=eip712.SIDES["buy"], energy_wh=100, price_per_kwh_minor=2000))
    assert (stale.status, stale.code, stale.refusal) == ("rejected", "expired", Refusal.RESIGN)
    stranger = Device(chain.market)
    with pytest.raises(LedgerRejected) as err:
        ledger.device_account(address_of(stranger))
    assert (err.value.code, err.value.refusal) == ("unknown_device", Refusal.DEVICE_UNKNOWN)
    assert not hasattr(err.value, "http_status")


class LyingRelay(Relay):
    """Answers 'accepted' without sending anything."""

    def submit(self, message):
        return Answer(200, {"status": "accepted", "duplicate": False, "nonce": message.nonce, "type": message.kind, "result": {}})


def test_a_relay_that_lies_is_caught_on_chain(chain):
    me = chain.device()
    with running_relay(LyingRelay(chain.market, chain.relay)) as liar:
        ledger = board_ledger(chain, liar.url)
        with pytest.raises(LedgerUnavailable, match="no such message"):
            ledger.submit(me.order(next_market(chain), "sell", 100, 2000))


def test_wrong_chain_is_refused(chain):
    ledger = EvmLedger(chain.node.url, chain_id=1, contract=chain.market.address_hex, retries=0)
    with pytest.raises(LedgerUnavailable, match="chain 31337, expected 1"):
        ledger.server_time_ms()


def trade(chain, relay_url, market_id):
    seller, buyer = chain.device(), chain.device(credit=FUNDS)
    ledger = board_ledger(chain, relay_url)
    ledger.submit(seller.order(market_id, "sell", 300, 2000))
    ledger.submit(buyer.order(market_id, "buy", 300, 2000))
    return seller, buyer


def test_trades_only_to_the_confirmation_depth_and_cursor_never_passes_it(chain, relay_url):
    market_id = next_market(chain)
    seller, buyer = trade(chain, relay_url, market_id)
    ledger = board_ledger(chain, confirmations=3)
    head = ledger.head()
    trades, cursor = ledger.trades_since(address_of(seller), 0)
    assert trades == [] and decode_cursor(cursor)[0] <= head - 3
    for _ in range(3):
        chain.market.rpc.call("evm_mine")
    trades, cursor = ledger.trades_since(address_of(seller), cursor)
    assert [(t.side, t.energy_wh, t.price_per_kwh_minor, t.counterparty, t.state) for t in trades] == [
        ("sell", 300, 2000, address_of(buyer), "contracted")]
    assert decode_cursor(cursor)[0] == head
    again, same = ledger.trades_since(address_of(seller), cursor)
    assert again == [] and decode_cursor(same)[0] <= ledger.head() - 3
    buyer_trades, _ = ledger.trades_since(address_of(buyer), 0)
    assert [(t.side, t.order_nonce) for t in buyer_trades] == [("buy", 1)]


def test_reorg_within_the_depth_never_reports_the_dropped_trade(chain, relay_url):
    market_id = next_market(chain)
    seller, _ = trade(chain, relay_url, market_id)
    ledger = board_ledger(chain, confirmations=3)
    assert ledger.trades_since(address_of(seller), 0)[0] == []
    chain.market.rpc.call("anvil_reorg", 1, [])  # the block with the trade is replaced by an empty one
    for _ in range(4):
        chain.market.rpc.call("evm_mine")
    trades, cursor = ledger.trades_since(address_of(seller), 0)
    assert trades == []


def test_reorg_deeper_than_the_depth_stops_the_adapter(chain, relay_url):
    market_id = next_market(chain)
    seller, _ = trade(chain, relay_url, market_id)
    ledger = board_ledger(chain, confirmations=0)
    trades, cursor = ledger.trades_since(address_of(seller), 0)
    assert len(trades) == 1
    chain.market.rpc.call("anvil_reorg", 2, [])
    with pytest.raises(LedgerUnavailable, match="reorg"):
        ledger.trades_since(address_of(seller), cursor)


class Hostile:
    """A local HTTP server that answers every POST with one canned (status, body): a hostile node or relay."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self
        self.status, self.body = 200, b"{}"

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(outer.status)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hostile():
    h = Hostile()
    yield h
    h.stop()


@pytest.mark.parametrize("status, body, match", [
    (200, b'{"jsonrpc":"2.0","id":1,"result":"0x7a69"}', None),  # eth_chainId ok, then the block answer below
    (200, b"<html>proxy</html>", "not a JSON-RPC response"),
    (200, b'{"jsonrpc":"2.0","id":99,"result":"0x1"}', "not a JSON-RPC response"),
    (502, b"bad gateway", "HTTP 502"),
    (200, b'{"jsonrpc":"2.0","id":1,"result":1.5}', "not a JSON-RPC response"),
    (200, b'{"jsonrpc":"2.0","id":1,"error":{"code":-32000,"message":"boom"}}', "node error"),
])
def test_hostile_node_answers_become_ledger_unavailable(hostile, status, body, match):
    hostile.status, hostile.body = status, body
    ledger = EvmLedger(hostile.url, chain_id=31337, contract="0x" + "11" * 20, retries=0)
    with pytest.raises(LedgerUnavailable, match=match or "eth_getBlockByNumber|timestamp|chain"):
        ledger.server_time_ms()


@pytest.mark.parametrize("status, body, match", [
    (404, b"<html>not here</html>", "without a usable answer|without a rejection body"),
    (500, b'{"status":"rejected","code":"x","detail":"y"}', "HTTP 500"),
    (200, b'{"status":"accepted","duplicate":false,"nonce":999,"result":{}}', "malformed"),
    (200, b'{"status":"accepted","duplicate":false,"nonce":1,"result":{},"x":1.0}', "usable"),
])
def test_hostile_relay_answers_become_ledger_unavailable(chain, hostile, status, body, match):
    hostile.status, hostile.body = status, body
    me = chain.device()
    message = eip712.sign_typed(chain.market.domain(), "cancel",
                                eip712.new_fields("cancel", nonce=1, issued_at=1, ttl_s=60, market_id=1800, order_nonce=1), me.key)
    with pytest.raises(LedgerUnavailable, match=match):
        RelayClient(hostile.url, timeout_ms=5000).submit(message)


def test_relay_rejection_body_is_a_permanent_answer(hostile):
    hostile.status, hostile.body = 422, b'{"status":"rejected","code":"gate_closed","detail":"too late","duplicate":true,"nonce":1}'
    from host_tools.evm.devchain import Device

    class NoMarket:
        def domain(self):
            return eip712.Domain(chain_id=31337, verifying_contract=bytes(20))

    device = Device(NoMarket())  # type: ignore[arg-type]
    message = device.sign("cancel", issued_at=1, market_id=1800, order_nonce=1)
    result = RelayClient(hostile.url).submit(message)
    assert (result.status, result.code, result.duplicate) == ("rejected", "gate_closed", True)


def test_direct_submission_device_pays_its_gas(chain):
    me = chain.device(credit=FUNDS)
    chain.market.rpc.call("anvil_setBalance", "0x" + me.address.hex(), hex(10**20))
    ledger = EvmLedger(chain.node.url, chain_id=chain.market.chain_id, contract=chain.market.address_hex, gas_signer=me.key, retries=0)
    market_id = next_market(chain)
    order = me.order(market_id, "buy", 200, 2000)
    result = ledger.submit(order)
    assert result.accepted and not result.duplicate and result.result["landed_block"] >= 1
    assert ledger.submit(order).duplicate
    assert ledger.market_book(market_id)["bids"][0]["remaining_wh"] == 200
    late = ledger.submit(me.order(block_time(chain.market) // 1800 * 1800, "sell", 100, 2000))
    assert (late.status, late.code) == ("rejected", "gate_closed")
    stranger = Device(chain.market)
    chain.market.rpc.call("anvil_setBalance", "0x" + stranger.address.hex(), hex(10**20))
    theirs = EvmLedger(chain.node.url, chain_id=chain.market.chain_id, contract=chain.market.address_hex, gas_signer=stranger.key, retries=0)
    refused = theirs.submit(stranger.order(market_id, "sell", 100, 2000))
    assert (refused.status, refused.code, refused.refusal) == ("rejected", "unknown_device", Refusal.DEVICE_UNKNOWN)


def test_daemon_built_fields_are_signed_as_typed_data_by_the_backend(chain, relay_url):
    from firmware import messages

    me = chain.device()
    ledger = board_ledger(chain, relay_url)
    fields = messages.new_fields("order", ledger_id="unused-on-evm", device_id=me.key.device_id, nonce=41,
                                 issued_at=block_time(chain.market), ttl_s=600, market_id=next_market(chain), side="sell",
                                 energy_wh=200, price_per_kwh_minor=2200)
    message = ledger.sign(fields, me.key)
    assert message.signer(ledger.domain) == me.address
    result = ledger.submit(message)
    assert result.accepted and result.result["resting_wh"] == 200


def test_landing_counts_only_at_the_confirmation_depth_and_survives_a_reorg(chain, relay_url):
    me = chain.device()
    ledger = board_ledger(chain, relay_url, confirmations=2)
    message = me.order(next_market(chain), "sell", 100, 2000)
    with pytest.raises(LedgerUnavailable, match="waiting for 2 confirmation"):
        ledger.submit(message)
    chain.market.rpc.call("anvil_reorg", 1, [])  # the block holding it is replaced before it was deep enough
    assert ledger.landed(message, me.address) is None
    with pytest.raises(LedgerUnavailable, match="waiting for 2 confirmation"):
        ledger.submit(message)  # the outbox's resend lands it again
    for _ in range(2):
        chain.market.rpc.call("evm_mine")
    result = ledger.submit(message)
    assert result.accepted and result.duplicate  # answered from the chain, applied once
    assert len(chain.market.logs("OrderPlaced", "0x" + (bytes(12) + me.address).hex())) == 1


def test_from_config_builds_relay_or_direct_adapter(chain, relay_url):
    from types import SimpleNamespace

    base = dict(rpc_url=chain.node.url, chain_id=chain.market.chain_id, contract=chain.market.address_hex, confirmations=1)
    relayed = EvmLedger.from_config(SimpleNamespace(**base, relay_url=relay_url))
    assert isinstance(relayed.relay, RelayClient) and relayed.confirmations == 1
    assert relayed.server_time_ms() == block_time(chain.market) * 1000
    me = chain.device()
    direct = EvmLedger.from_config(SimpleNamespace(**base, relay_url=""), gas_signer=me.key)
    assert direct.relay is None and direct.gas_signer is me.key
