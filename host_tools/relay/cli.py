"""`dgc-host relay`: serve the relay; deploy the market contract, register devices, credit them.

Keys (the relay's and the operator's) are key files in the board's format (0600), read through
firmware.keystore, so a secret is never printed, logged or put on a command line.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from firmware import eip712
from firmware.keystore import KeyFileError, generate_key_file, load_key_file

log = logging.getLogger(__name__)


def _address(text: str) -> bytes:
    try:
        return eip712.address_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def _account(args: argparse.Namespace):
    from host_tools.evm.market import Account
    from host_tools.evm.rpc import RpcClient

    rpc = RpcClient(args.rpc)
    return rpc, Account(rpc=rpc, key=load_key_file(Path(args.key_file)), chain_id=rpc.call_int("eth_chainId"))


def _market(args: argparse.Namespace, rpc):
    from host_tools.evm.market import Market
    from host_tools.evm.solc import compile_market

    return Market(rpc, args.contract, compile_market(), rpc.call_int("eth_chainId"))


def cmd_keygen(args: argparse.Namespace) -> int:
    key = generate_key_file(Path(args.key_file))
    print(eip712.checksum_address(eip712.address_from_public_key(key.public_key)))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from host_tools.evm.market import Market, MarketRules

    rpc, account = _account(args)
    rules = MarketRules(args.slot_seconds, args.gate_closure_seconds, args.markets_ahead, args.lot_wh,
                        args.price_min_per_kwh_minor, args.price_max_per_kwh_minor, args.report_deadline_seconds)
    market, receipt = Market.deploy(rpc, account, rules)
    print(f"contract {market.address_hex} chain_id={market.chain_id} block={int(receipt.raw['blockNumber'], 16)} gas={receipt.gas_used}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    rpc, account = _account(args)
    market = _market(args, rpc)
    device = args.address
    if device is None:
        device = eip712.address_from_public_key(load_key_file(Path(args.device_key_file)).public_key)
    market.transact(account, "registerDevice", device)
    if args.credit_milli_minor:
        market.transact(account, "credit", device, args.credit_milli_minor)
    print(f"registered {eip712.checksum_address(device)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .core import Relay
    from .server import make_server

    rpc, account = _account(args)
    market = _market(args, rpc)
    relay = Relay(market, account, from_block=args.from_block, last_market_id=args.last_market)
    server = make_server(relay, args.host, args.port)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    host, port = server.server_address[:2]
    print(f"relay listening on http://{host}:{port} contract={market.address_hex} chain_id={market.chain_id}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


def cmd_devchain(args: argparse.Namespace) -> int:
    """A throwaway chain for benches and demos: anvil + market + relay, until SIGTERM/Ctrl-C."""
    import os

    import coincurve

    from firmware.keystore import DeviceKey
    from host_tools.evm.anvil import start_anvil
    from host_tools.evm.market import Market, MarketRules, funded_account

    from .core import Relay
    from .server import make_server

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    node = start_anvil(block_time_s=args.block_time or None)
    try:
        rpc = node.rpc()
        # the operator's and the relay's keys live only in this process: a dev chain is thrown away
        operator = funded_account(rpc, DeviceKey(coincurve.PrivateKey(os.urandom(32))))
        relay_account = funded_account(rpc, DeviceKey(coincurve.PrivateKey(os.urandom(32))))
        rules = MarketRules(args.slot_seconds, args.gate_closure_seconds, args.markets_ahead, args.lot_wh,
                            args.price_min_per_kwh_minor, args.price_max_per_kwh_minor, args.report_deadline_seconds)
        market, _ = Market.deploy(rpc, operator, rules)
        for path in args.register or []:
            device = eip712.address_from_public_key(load_key_file(Path(path)).public_key)
            market.transact(operator, "registerDevice", device)
            if args.credit_milli_minor:
                market.transact(operator, "credit", device, args.credit_milli_minor)
            rpc.call("anvil_setBalance", "0x" + device.hex(), hex(10**20))  # gas for direct submission
        server = make_server(Relay(market, relay_account), args.host, args.port)
        worker = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        worker.start()
        host, port = server.server_address[:2]
        print(f"devchain rpc={node.url} contract={market.address_hex} chain_id={market.chain_id} relay=http://{host}:{port}", flush=True)
        stop.wait()
        server.shutdown()
        server.server_close()
    finally:
        node.stop()
    return 0


def cmd_order(args: argparse.Namespace) -> int:
    """Sign an order with a key file and send it through a relay; print the relay's answer."""
    import json
    import time

    from firmware.ledger.evm import JsonHttp

    base = args.relay.rstrip("/")
    _, info = JsonHttp(base + "/v1/info", timeout_s=30).exchange("GET")
    _, now = JsonHttp(base + "/v1/time", timeout_s=30).exchange("GET")
    now_s = now["time_ms"] // 1000
    market_id = args.market_id if args.market_id is not None else (now_s // info["slot_seconds"] + 2) * info["slot_seconds"]
    domain = eip712.Domain.from_hex(info["chain_id"], info["contract"])
    # unordered nonces: any unused value works; milliseconds keep hand-sent ones distinct
    nonce = args.nonce or int(time.time() * 1000)
    fields = eip712.new_fields("order", nonce=nonce, issued_at=now_s, ttl_s=args.ttl_seconds, market_id=market_id,
                               side=eip712.SIDES[args.side], energy_wh=args.energy_wh, price_per_kwh_minor=args.price)
    message = eip712.sign_typed(domain, "order", fields, load_key_file(Path(args.key_file)))
    status, answer = JsonHttp(base + "/v1/messages", timeout_s=60).exchange("POST", message.to_wire())
    print(json.dumps(answer, indent=1, sort_keys=True))
    return 0 if status == 200 else 1


def cmd_book(args: argparse.Namespace) -> int:
    """Print a market's book as the board's adapter reads it from the chain."""
    import json

    from firmware.ledger.evm import EvmLedger, JsonHttp

    _, info = JsonHttp(args.relay.rstrip("/") + "/v1/info", timeout_s=30).exchange("GET")
    ledger = EvmLedger(args.rpc, chain_id=info["chain_id"], contract=info["contract"])
    print(json.dumps(ledger.market_book(args.market_id), indent=1, sort_keys=True))
    return 0


def add_parser(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    relay = subparsers.add_parser(name, help=help_text, description=__doc__.splitlines()[0])
    sub = relay.add_subparsers(dest="relay_command", metavar="COMMAND", required=True)

    def chain_args(p: argparse.ArgumentParser, *, contract: bool = True) -> None:
        p.add_argument("--rpc", required=True, help="the node's JSON-RPC URL, e.g. http://127.0.0.1:8545")
        p.add_argument("--key-file", required=True, help="key file of the account that signs the transactions (0600)")
        if contract:
            p.add_argument("--contract", type=_address, required=True, help="the DgcMarket contract's address")

    p = sub.add_parser("keygen", help="make a key file for the relay or the operator and print its address")
    p.add_argument("--key-file", required=True)
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("deploy", help="compile (pinned solc-js) and deploy DgcMarket; the key's account becomes the operator")
    chain_args(p, contract=False)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("register", help="operator: register a device address (and optionally credit it)")
    chain_args(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--address", type=_address, help="the device's Ethereum address")
    who.add_argument("--device-key-file", help="derive the address from a device key file")
    p.add_argument("--credit-milli-minor", type=_non_negative, default=0, help="credit this much to the device's balance")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("serve", help="take boards' signed messages over HTTP and submit them to the contract")
    chain_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_non_negative, default=8760, help="port (default 8760; 0 = any free port, printed when ready)")
    p.add_argument("--from-block", type=_non_negative, default=0, help="block the contract was deployed in (log searches start there)")
    p.add_argument("--last-market", type=_non_negative, default=None,
                   help="carry no order for a market after this one (a bounded market day, as the bench ledger's)")
    p.set_defaults(func=cmd_serve)

    def rule_args(p: argparse.ArgumentParser) -> None:
        for flag, default in (("slot-seconds", 1800), ("gate-closure-seconds", 900), ("markets-ahead", 48), ("lot-wh", 100),
                              ("price-min-per-kwh-minor", 1000), ("price-max-per-kwh-minor", 4000), ("report-deadline-seconds", 3600)):
            p.add_argument(f"--{flag}", type=_non_negative, default=default, help=f"market rule (default {default})")

    rule_args(sub.choices["deploy"])

    p = sub.add_parser("devchain", help="throwaway chain for benches and demos: anvil + deployed market + relay, until SIGTERM")
    p.add_argument("--block-time", type=_non_negative, default=0, help="seconds between blocks (default 0: a block per transaction)")
    p.add_argument("--register", action="append", metavar="KEY_FILE", help="register (and fund) this device key file; repeatable")
    p.add_argument("--credit-milli-minor", type=_non_negative, default=10**12, help="credit each registered device (default 10^12)")
    p.add_argument("--host", default="127.0.0.1", help="relay address (default 127.0.0.1)")
    p.add_argument("--port", type=_non_negative, default=0, help="relay port (default 0: any free port, printed)")
    rule_args(p)
    p.set_defaults(func=cmd_devchain)

    p = sub.add_parser("order", help="sign an order with a device key file and send it through a relay")
    p.add_argument("--relay", required=True, help="the relay's URL")
    p.add_argument("--key-file", required=True)
    p.add_argument("--market-id", type=_non_negative, help="slot start (default: the market after the next)")
    p.add_argument("--side", choices=("buy", "sell"), required=True)
    p.add_argument("--energy-wh", type=_non_negative, required=True)
    p.add_argument("--price", type=_non_negative, required=True, help="limit price, minor units per kWh")
    p.add_argument("--nonce", type=_non_negative, help="message nonce (default: the current time in ms)")
    p.add_argument("--ttl-seconds", type=_non_negative, default=600)
    p.set_defaults(func=cmd_order)

    p = sub.add_parser("book", help="print a market's book, read from the chain as a board reads it")
    p.add_argument("--rpc", required=True, help="the node's JSON-RPC URL")
    p.add_argument("--relay", required=True, help="the relay's URL (for the chain id and contract)")
    p.add_argument("--market-id", type=_non_negative, required=True)
    p.set_defaults(func=cmd_book)

    def run(args: argparse.Namespace) -> int:
        try:
            return args.relay_func(args)
        except KeyFileError as exc:
            print(f"dgc-host relay: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # one line, no traceback, never key material (keys stay in DeviceKey)
            log.debug("relay command failed", exc_info=True)
            print(f"dgc-host relay {args.relay_command}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1

    for choice in sub.choices.values():
        choice.set_defaults(relay_func=choice.get_default("func"), func=run)
    return relay
