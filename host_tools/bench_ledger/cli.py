"""`dgc-host ledger ...`: serve the bench ledger and talk to it by hand.

Sub-commands: serve, register, order, cancel, report, markets, book, trades, summary, stats, verify, openapi
(markets/book/trades/summary are in views_cli.py).

Why: an engineer at the bench must be able to reproduce by hand exactly what a board does -
register a key, place a *signed* order with the board's own key file, cancel it, report a
delivery - and read the book, without writing code. The signing goes through the same
``firmware.messages`` and ``firmware.keystore`` code as the board's.

Exit status: 0 accepted / ok, 1 the ledger rejected the request or could not be reached (code
and detail on stderr), 2 bad arguments (one line on stderr saying what was expected).
FastAPI and uvicorn are imported only inside ``serve`` and ``openapi``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..cli_support import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, OneLineParser
DEFAULT_CONFIG = "board_configs/sim.toml"
DEFAULT_DB = "var/bench-ledger/ledger.sqlite3"
TOKEN_ENV = "DGC_LEDGER_OPERATOR_TOKEN"
HTTP_TIMEOUT_S = 10

log = logging.getLogger(__name__)


class UsageError(Exception):
    """Bad input from the user: one line on stderr, exit status 2."""


class LedgerFailure(Exception):
    """The ledger refused or could not be reached: one line on stderr, exit status 1."""


# ----------------------------------------------------------------------- argument types

def _int_type(what: str, minimum: int = 0, maximum: int = 2**63 - 1):
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum or value > maximum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


def _hex_key(text: str) -> str:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) not in (33, 65):
        raise argparse.ArgumentTypeError("expected a secp256k1 public key in hex (66 or 130 hex characters)")
    return text


_positive = _int_type("a positive integer", 1)
_non_negative = _int_type("zero or a positive integer", 0)
_offset_ms = _int_type("an integer number of milliseconds (negative: behind the host)", -(10**12), 10**12)
_port = _int_type("a port from 0 (any free port) to 65535", 0, 65535)


# ----------------------------------------------------------------------- HTTP helpers

def _http(method: str, url: str, *, body: Any = None, params: dict | None = None, token: str | None = None,
          headers: dict | None = None) -> tuple[int, Any]:
    """One request; returns (status, JSON). Unreachable ledger or a non-JSON answer -> LedgerFailure."""
    import requests

    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    try:
        response = requests.request(method, url, json=body, params=params, headers=headers, timeout=HTTP_TIMEOUT_S)
    except requests.RequestException as exc:
        raise LedgerFailure(f"cannot reach the ledger at {url} ({type(exc).__name__}); expected a running ledger (dgc-host ledger serve)") from None
    try:
        return response.status_code, response.json()
    except ValueError:
        raise LedgerFailure(f"{method} {url}: HTTP {response.status_code} with a non-JSON answer; expected the bench ledger's JSON") from None


def _print_answer(status: int, body: Any) -> int:
    print(json.dumps(body, indent=2, sort_keys=True))
    if 200 <= status < 300:
        return EXIT_OK
    if isinstance(body, dict):
        print(f"rejected ({status} {body.get('code')}): {body.get('detail')}", file=sys.stderr)
    else:
        print(f"rejected (HTTP {status})", file=sys.stderr)
    return EXIT_FAILED


def _get_ok(url: str, params: dict | None = None) -> dict:
    status, body = _http("GET", url, params=params)
    if status != 200 or not isinstance(body, dict):
        code = body.get("code") if isinstance(body, dict) else None
        detail = body.get("detail") if isinstance(body, dict) else None
        raise LedgerFailure(f"GET {url}: HTTP {status} {code or ''}: {detail or 'unexpected answer'}")
    return body


def _token(args: argparse.Namespace) -> str | None:
    return getattr(args, "operator_token", None) or os.environ.get(TOKEN_ENV) or None


def _signed_get(base_url: str, path: str, key, ledger_id: str) -> tuple[int, Any]:
    """GET a device's private data with the device's signed read request (as the board does)."""
    import time as _time

    from firmware.messages import READ_MAX_TTL_SECONDS, new_fields, sign_message

    now_ms = _time.time_ns() // 1_000_000
    fields = new_fields("read", ledger_id=ledger_id, device_id=key.device_id, nonce=now_ms, issued_at=now_ms // 1000,
                        ttl_s=READ_MAX_TTL_SECONDS, path=path)
    wire = sign_message(fields, key).to_wire()
    return _http("GET", base_url + path, headers={"X-DGC-Read": wire["payload"], "X-DGC-Read-Signature": wire["signature"]})


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _load_board_config(path: str):
    from firmware.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _load_key(path: str | Path):
    from firmware.keystore import KeyFileError, load_key_file

    try:
        return load_key_file(Path(path))
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None


# ----------------------------------------------------------------------- commands

def cmd_serve(args: argparse.Namespace) -> int:
    config = _load_board_config(args.config)  # before the heavy imports: a bad config fails fast

    from .app import LedgerSettings, OffsetClock
    from .limits import RateLimit
    from .server import ServeError, serve

    overrides = {
        key: getattr(args, key)
        for key in ("slot_seconds", "markets_ahead", "lot_wh", "gate_closure_seconds", "price_min_per_kwh_minor", "price_max_per_kwh_minor")
        if getattr(args, key) is not None
    }
    rules = dataclasses.replace(config.market, **overrides)
    if rules.price_min_per_kwh_minor > rules.price_max_per_kwh_minor:
        raise UsageError(f"--price-max-per-kwh-minor: expected at least the minimum price {rules.price_min_per_kwh_minor}")
    if rules.gate_closure_seconds >= rules.slot_seconds * rules.markets_ahead:
        raise UsageError(f"--gate-closure-seconds: expected less than slot_seconds x markets_ahead ({rules.slot_seconds * rules.markets_ahead})")
    ledger_id = args.ledger_id or config.ledger.ledger_id
    token = _token(args)
    authority = _authority_key(args)
    if token is None and not _is_loopback(args.host):
        raise UsageError(
            f"--host {args.host}: without an operator token the ledger listens on loopback only; expected "
            f"--operator-token (or ${TOKEN_ENV}) and a TLS-terminating proxy (e.g. Caddy or nginx) in front of it")
    deadline = args.report_deadline_seconds if args.report_deadline_seconds is not None else 2 * rules.slot_seconds
    try:
        settings = LedgerSettings(
            db_path=args.db,
            ledger_id=ledger_id,
            rules=rules,
            operator_token=token,
            authority_key=authority,
            default_sell_capacity_wh=args.default_sell_capacity_wh,
            max_open_shortfall_wh=args.max_open_shortfall_wh,
            max_open_orders=args.max_open_orders,
            device_rate=RateLimit(args.device_rate, max(1, int(args.device_rate * 5))),
            client_rate=RateLimit(args.client_rate, max(1, int(args.client_rate * 2))),
            initial_credit_milli_minor=args.initial_credit,
            report_deadline_seconds=deadline,
            last_market_id=args.last_market,
            writer_process=args.writer_process,
            **({"clock": OffsetClock(args.clock_offset_ms)} if args.clock_offset_ms else {}),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    log.info("bench ledger %s: slots %d s x %d, lot %d Wh, gate %d s, prices %d..%d, report deadline %d s, db %s%s%s%s",
             ledger_id, rules.slot_seconds, rules.markets_ahead, rules.lot_wh, rules.gate_closure_seconds,
             rules.price_min_per_kwh_minor, rules.price_max_per_kwh_minor, deadline, args.db,
             ", operator token set" if settings.operator_token else ", no operator token (no registration; loopback only)",
             f", clock offset {args.clock_offset_ms} ms" if args.clock_offset_ms else "",
             f", last market {args.last_market}" if args.last_market is not None else "")
    try:
        return serve(settings, host=args.host, port=args.port)
    except ServeError as exc:
        raise LedgerFailure(str(exc)) from None


def _authority_key(args: argparse.Namespace):
    """The key that signs the record's blocks: --authority-key-file, else authority.key next to the
    database (created 0600 on first start); a ':memory:' ledger without the option gets an ephemeral one."""
    from firmware.keystore import KeyFileError, generate_key_file, load_key_file

    if args.authority_key_file:
        path = Path(args.authority_key_file)
    elif args.db == ":memory:":
        return None
    else:
        path = Path(args.db).parent / "authority.key"
    try:
        if path.exists():
            key = load_key_file(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            key = generate_key_file(path)
    except (KeyFileError, OSError) as exc:
        raise UsageError(f"--authority-key-file {path}: {exc}") from None
    log.info("record blocks signed by the authority key %s (public key %s)", path, key.public_key.hex())
    return key


def cmd_verify(args: argparse.Namespace) -> int:
    """Check the whole record: signatures against the authority key, the chain of block hashes,
    every block's root from its entries and, with --db, that every accepted message and trade is
    in it. One line: ``ledger verify: blocks=N entries=N ok`` (exit 0) or ``... FAILED: why`` (exit 1)."""
    from firmware.ledger import record

    pinned = bytes.fromhex(args.authority_key) if args.authority_key else None
    problems: list[str] = []
    if args.db:
        import sqlite3

        if not Path(args.db).exists():
            raise UsageError(f"--db {args.db}: no such file; expected the ledger's SQLite database")
        conn = sqlite3.connect(f"file:{args.db}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            blocks = []
            for row in conn.execute("SELECT * FROM log_blocks ORDER BY height"):
                entries = [r["leaf"] for r in conn.execute(  # a block: entry_count entries of lowest seq from first_seq
                    "SELECT leaf FROM log_entries WHERE seq >= ? ORDER BY seq LIMIT ?", (row["first_seq"], row["entry_count"]))]
                blocks.append({**json.loads(row["header"]), "signature": row["signature"], "entries": entries})
        except sqlite3.Error as exc:
            raise LedgerFailure(f"--db {args.db}: not a bench ledger database with a record ({exc})") from None
        finally:
            conn.close()
        if pinned is None:
            raise UsageError("--authority-key: expected the authority's public key (hex) to check a database against")
        from firmware.market import MarketRules

        from .store import LedgerStore

        store = LedgerStore(args.db, MarketRules(), 0)
        try:
            problems = store.record_completeness()
            unsealed = store._one("SELECT COUNT(*) FROM log_entries WHERE seq > ?", (store._sealed_through_seq,))[0]
        finally:
            store.close()
        if unsealed:
            print(f"ledger verify: note: {unsealed} entr(ies) not sealed yet (sealed within seconds by a running ledger)",
                  file=sys.stderr)
    else:
        info = _get_ok(f"{args.url}/v1/info")
        served = info.get("authority_public_key")
        if pinned is None:
            if type(served) is not str:
                raise LedgerFailure(f"{args.url}/v1/info has no authority_public_key; expected a ledger with a record")
            pinned = bytes.fromhex(served)
            print("ledger verify: warning: checking against the key the ledger itself serves; pass --authority-key "
                  "(the pinned one) to detect a ledger that swapped its key", file=sys.stderr)
        blocks, start = [], 0
        while True:
            status, body = _http("GET", f"{args.url}/v1/log/blocks", params={"from": start, "limit": 1000}, token=_token(args))
            if status != 200 or not isinstance(body, dict) or not isinstance(body.get("blocks"), list):
                raise LedgerFailure(f"GET {args.url}/v1/log/blocks: HTTP {status}; expected the record's blocks")
            blocks += body["blocks"]
            start += len(body["blocks"])
            if not body["blocks"] or start >= body.get("count", 0):
                break
        if blocks and "entries" not in blocks[0]:
            print("ledger verify: note: without the operator token only the signed chain of headers is checked",
                  file=sys.stderr)
    try:
        entries = record.verify_chain(blocks, pinned)
    except record.RecordError as exc:
        problems.insert(0, str(exc))
        entries = 0
    if problems:
        print(f"ledger verify: blocks={len(blocks)} FAILED: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        return EXIT_FAILED
    print(f"ledger verify: blocks={len(blocks)} entries={entries} ok")
    return EXIT_OK


def cmd_register(args: argparse.Namespace) -> int:
    if args.public_key:
        public_key, name = args.public_key, args.name or ""
    else:
        config = _load_board_config(args.config)
        key = _load_key(args.key_file or config.board.key_file)
        public_key, name = key.public_key.hex(), args.name if args.name is not None else config.board.name
    body: dict[str, Any] = {"public_key": public_key, "name": name}
    if args.credit is not None:
        body["credit_milli_minor"] = args.credit
    if args.sell_capacity_wh is not None:
        body["sell_capacity_wh"] = args.sell_capacity_wh
    status, answer = _http("POST", f"{args.url}/v1/devices", body=body, token=_token(args))
    return _print_answer(status, answer)


def _next_market(url: str) -> int:
    from firmware.market import MarketRules

    info = _get_ok(f"{url}/v1/info")
    now_s = _get_ok(f"{url}/v1/time")["time_ms"] // 1000
    fields = {f.name: info.get(f.name) for f in dataclasses.fields(MarketRules)}
    if not all(type(v) is int for v in fields.values()):
        raise LedgerFailure(f"GET {url}/v1/info: the market rules are incomplete; expected the bench ledger's /v1/info")
    markets = MarketRules(**fields).open_markets(now_s)
    if not markets:
        raise LedgerFailure("no market is open for orders right now; expected at least one (check the ledger's markets_ahead)")
    return markets[0]


def _sign_and_submit(args: argparse.Namespace, kind: str, **body: Any) -> int:
    from firmware.messages import MessageError, new_fields, sign_message

    key = _load_key(args.key_file)
    status, account = _signed_get(args.url, f"/v1/devices/{key.device_id}", key, args.ledger_id)
    if status != 200 or not isinstance(account, dict):
        detail = account.get("detail") if isinstance(account, dict) else f"HTTP {status}"
        raise LedgerFailure(f"device {key.device_id} is not usable on {args.url}: {detail}; expected a registered device (dgc-host ledger register)")
    nonce = args.nonce if args.nonce is not None else int(account.get("max_nonce", 0)) + 1
    issued_at = _get_ok(f"{args.url}/v1/time")["time_ms"] // 1000
    try:
        fields = new_fields(kind, ledger_id=args.ledger_id, device_id=key.device_id, nonce=nonce,
                            issued_at=issued_at, ttl_s=args.ttl_seconds, **body)
    except MessageError as exc:
        raise UsageError(str(exc)) from None
    message = sign_message(fields, key)
    status, answer = _http("POST", f"{args.url}/v1/messages", body=message.to_wire())
    return _print_answer(status, answer)


def cmd_order(args: argparse.Namespace) -> int:
    market_id = args.market_id if args.market_id is not None else _next_market(args.url)
    return _sign_and_submit(args, "order", market_id=market_id, side=args.side, energy_wh=args.energy_wh,
                            price_per_kwh_minor=args.price)


def cmd_cancel(args: argparse.Namespace) -> int:
    return _sign_and_submit(args, "cancel", market_id=args.market_id, order_nonce=args.order_nonce)


def cmd_report(args: argparse.Namespace) -> int:
    status, trade = _signed_get(args.url, f"/v1/trades/{args.trade_id}", _load_key(args.key_file), args.ledger_id)
    if status != 200 or not isinstance(trade, dict) or type(trade.get("market_id")) is not int:
        raise LedgerFailure(f"trade {args.trade_id}: not found on {args.url}; expected the id of one of your trades")
    return _sign_and_submit(args, "delivery_report", trade_id=args.trade_id, market_id=trade["market_id"],
                            role=args.role, energy_wh=args.energy_wh, status=args.status)


def cmd_stats(args: argparse.Namespace) -> int:
    status, body = _http("GET", f"{args.url}/v1/stats")
    return _print_answer(status, body)


def openapi_document() -> dict:
    """The API document, exactly as the app serves it (docs/ledger-api.json is this, pretty-printed)."""
    from .app import LedgerSettings, create_app

    app = create_app(LedgerSettings(db_path=":memory:", ledger_id="openapi"))
    return app.openapi()


def cmd_openapi(args: argparse.Namespace) -> int:
    print(json.dumps(openapi_document(), indent=2))
    return EXIT_OK


# ----------------------------------------------------------------------- parser

def _wrap(func):
    """Turn the command's UsageError / LedgerFailure into one stderr line and an exit status."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except UsageError as exc:
            print(f"dgc-host ledger {args.ledger_command}: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except LedgerFailure as exc:
            print(f"dgc-host ledger {args.ledger_command}: {exc}", file=sys.stderr)
            return EXIT_FAILED

    return run


def add_parser(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    """Add the `ledger` command group to dgc-host's parser."""
    ledger = subparsers.add_parser(name, help=help_text, description=__doc__.splitlines()[0])
    sub = ledger.add_subparsers(dest="ledger_command", metavar="COMMAND", required=True, parser_class=OneLineParser)

    def url_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", type=_url, required=True, help="the ledger's base URL, e.g. http://127.0.0.1:8750")

    def signer_args(p: argparse.ArgumentParser) -> None:
        url_arg(p)
        p.add_argument("--key-file", required=True, help="the device key file (0600) to sign with")
        p.add_argument("--ledger-id", required=True, help="the ledger id the message is bound to (see GET /v1/info)")
        p.add_argument("--nonce", type=_positive, help="message nonce (default: the ledger's max_nonce for this device + 1)")
        p.add_argument("--ttl-seconds", type=_positive, default=60, help="seconds the signed message stays valid (default 60)")

    p = sub.add_parser("serve", help="run the bench ledger (HTTP + SQLite) until SIGTERM/Ctrl-C")
    p.add_argument("--config", default=os.environ.get("DGC_CONFIG", DEFAULT_CONFIG),
                   help=f"board config whose [market] and [ledger] give the rules and ledger id (default $DGC_CONFIG or {DEFAULT_CONFIG})")
    p.add_argument("--db", default=DEFAULT_DB, help=f"SQLite database (created if missing; ':memory:' for a throwaway ledger; default {DEFAULT_DB})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8750, help="port (default 8750; 0 = any free port, printed when ready)")
    p.add_argument("--ledger-id", help="override the config's [ledger] ledger_id")
    p.add_argument("--operator-token", help=f"the operator's token: 'Authorization: Bearer TOKEN' registers, revokes and reads "
                                            f"any device (or ${TOKEN_ENV}); without it: no operator, loopback only")
    p.add_argument("--default-sell-capacity-wh", type=_non_negative, default=50_000, metavar="WH",
                   help="qualification of a new device: Wh it may offer plus have sold in one market (default 50000)")
    p.add_argument("--max-open-shortfall-wh", type=_non_negative, default=5_000, metavar="WH",
                   help="uncleared shortfall above which a device's orders are refused (default 5000)")
    p.add_argument("--max-open-orders", type=_non_negative, default=256, help="open orders per device (default 256)")
    p.add_argument("--device-rate", type=_non_negative, default=20, metavar="PER_S",
                   help="verified messages per second per device, burst 5x (default 20; 0 = no limit)")
    p.add_argument("--client-rate", type=_non_negative, default=500, metavar="PER_S",
                   help="requests per second per client address, burst 2x (default 500; 0 = no limit)")
    p.add_argument("--initial-credit", type=_non_negative, default=1_000_000_000, metavar="MILLI_MINOR",
                   help="opening balance of a newly registered device, milli-minor units (default 1000000000)")
    p.add_argument("--report-deadline-seconds", type=_non_negative,
                   help="seconds after a slot ends before unreported trades are settled (default 2 x slot_seconds)")
    for key, what in (("slot_seconds", "seconds per slot"), ("markets_ahead", "markets open ahead"), ("lot_wh", "Wh per lot"),
                      ("price_min_per_kwh_minor", "lowest price"), ("price_max_per_kwh_minor", "highest price")):
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=_positive, help=f"override the config's [market] {key} ({what})")
    p.add_argument("--gate-closure-seconds", dest="gate_closure_seconds", type=_non_negative,
                   help="override the config's [market] gate_closure_seconds")
    p.add_argument("--clock-offset-ms", type=_offset_ms, default=0, metavar="MS",
                   help="run the ledger's clock this many ms ahead of the host (negative: behind), to test boards' clock guard")
    p.add_argument("--authority-key-file", help="the key that signs the record's blocks (default: authority.key next to "
                                                "--db, created 0600; an ephemeral key for ':memory:')")
    p.add_argument("--last-market", type=_non_negative, metavar="MARKET_ID",
                   help="a bounded market day: no market after this slot start takes orders (demos)")
    p.add_argument("--writer-process", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the store (book, SQLite, record) in a process of its own, so HTTP and the writer each "
                        "get a core (default on; --no-writer-process: one process)")
    p.set_defaults(func=_wrap(cmd_serve))

    p = sub.add_parser("register", help="register a device's public key with the ledger")
    url_arg(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="board config: the key comes from its [board] key_file (or --key-file)")
    source.add_argument("--public-key", type=_hex_key, help="the public key in hex")
    p.add_argument("--key-file", help="key file to take the public key from (with --config)")
    p.add_argument("--name", help="a label (default: the board's name)")
    p.add_argument("--credit", type=_non_negative, metavar="MILLI_MINOR", help="opening balance (default: the ledger's)")
    p.add_argument("--sell-capacity-wh", type=_non_negative, metavar="WH",
                   help="qualification: Wh it may offer plus have sold in one market (default: the ledger's)")
    p.add_argument("--operator-token", help=f"operator token (or ${TOKEN_ENV})")
    p.set_defaults(func=_wrap(cmd_register))

    p = sub.add_parser("order", help="sign an order with a key file and submit it")
    signer_args(p)
    market = p.add_mutually_exclusive_group(required=True)
    market.add_argument("--market-id", type=_non_negative, help="the market (its slot start, UTC epoch seconds)")
    market.add_argument("--market", choices=["next"], help="'next': the nearest market still open for orders")
    p.add_argument("--side", choices=["buy", "sell"], required=True)
    p.add_argument("--energy-wh", type=_positive, required=True, help="energy in Wh (whole lots)")
    p.add_argument("--price", type=_positive, required=True, help="limit price, minor units per kWh")
    p.set_defaults(func=_wrap(cmd_order))

    p = sub.add_parser("cancel", help="sign a cancel of one of the key's orders and submit it")
    signer_args(p)
    p.add_argument("--market-id", type=_non_negative, required=True)
    p.add_argument("--order-nonce", type=_positive, required=True, help="the nonce of the order to cancel")
    p.set_defaults(func=_wrap(cmd_cancel))

    p = sub.add_parser("report", help="sign a delivery report for a trade and submit it")
    signer_args(p)
    p.add_argument("--trade-id", type=_positive, required=True)
    p.add_argument("--role", choices=["seller", "buyer"], required=True)
    p.add_argument("--energy-wh", type=_non_negative, required=True, help="metered energy, Wh")
    p.add_argument("--status", choices=["delivered", "failed"], default="delivered")
    p.set_defaults(func=_wrap(cmd_report))

    from . import views_cli  # markets, book, trades, summary: tables by default, --json

    views_cli.add_commands(sub, sys.modules[__name__], url_arg)

    p = sub.add_parser("stats", help="print the ledger's counts and totals (JSON)")
    url_arg(p)
    p.set_defaults(func=_wrap(cmd_stats))

    p = sub.add_parser("verify", help="check the ledger's whole signed record (over HTTP, or a database file)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", type=_url, help="the ledger's base URL (entries need --operator-token)")
    where.add_argument("--db", help="the ledger's SQLite database (also checks every accepted message and trade is recorded)")
    p.add_argument("--authority-key", type=_hex_key, help="the pinned authority public key (hex); see GET /v1/info")
    p.add_argument("--operator-token", help=f"operator token (or ${TOKEN_ENV})")
    p.set_defaults(func=_wrap(cmd_verify))

    p = sub.add_parser("openapi", help="print the API's OpenAPI document (regenerates docs/ledger-api.json)")
    p.set_defaults(func=_wrap(cmd_openapi))
    return ledger


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (python -m host_tools.bench_ledger.cli ...), same commands as `dgc-host ledger`."""
    parser = argparse.ArgumentParser(prog="dgc-host")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="group", required=True)
    add_parser(sub, "ledger", "bench ledger")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
