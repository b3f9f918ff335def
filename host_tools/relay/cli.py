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
    relay = Relay(market, account, from_block=args.from_block)
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
    for flag, default in (("slot-seconds", 1800), ("gate-closure-seconds", 900), ("markets-ahead", 48), ("lot-wh", 100),
                          ("price-min-per-kwh-minor", 1000), ("price-max-per-kwh-minor", 4000), ("report-deadline-seconds", 3600)):
        p.add_argument(f"--{flag}", type=_non_negative, default=default, help=f"market rule (default {default})")
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
    p.set_defaults(func=cmd_serve)

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
