"""`dgc-host ledger markets | book | trades | summary`: the market as people read it.

Why separate from cli.py: these commands only read and format (host_tools.bench_ledger.views);
cli.py keeps serving, registering and signing. ``book`` and ``trades`` take a market as an id
(its slot start, UTC epoch seconds) or as ``next`` (the nearest market still open for orders)
or ``current`` (the slot being delivered now), judged by the ledger's clock, not the laptop's.
Every command prints a table by default and the ledger's JSON with ``--json``.

The helpers (HTTP, token, errors) are cli.py's, handed over as a module by ``add_commands`` so
that ``python -m host_tools.bench_ledger.cli`` (cli.py as ``__main__``) raises the very error
classes its own wrapper catches.
"""

from __future__ import annotations

import argparse
from types import ModuleType
from typing import Any

from . import views

MARKET_WORDS = ("next", "current")


def _market_ref(text: str) -> str | int:
    if text in MARKET_WORDS:
        return text
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a market id (slot start, UTC epoch seconds), 'next' or 'current', got {text!r}")
    return value


def add_commands(sub: argparse._SubParsersAction, cli: ModuleType, url_arg) -> None:
    """Register markets, book, trades and summary on the `ledger` group (cli is host_tools.bench_ledger.cli)."""

    def output_args(p: argparse.ArgumentParser) -> None:
        url_arg(p)
        p.add_argument("--json", action="store_true", help="print the ledger's JSON answer instead of a table")

    def token_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--operator-token", help=f"operator token (or ${cli.TOKEN_ENV})")

    def market_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--market", "--market-id", dest="market", type=_market_ref, required=True, metavar="ID|next|current",
                       help="the market: its id (slot start, UTC epoch seconds), 'next' (nearest open for orders) "
                            "or 'current' (being delivered now), by the ledger's clock")

    def get(url: str, params: dict | None = None, token: str | None = None) -> tuple[int, Any]:
        return cli._http("GET", url, params=params, token=token)

    def resolve(url: str, ref: str | int) -> int:
        if isinstance(ref, int):
            return ref
        status, body = get(f"{url}/v1/markets", {"limit": 1})
        if status != 200 or not isinstance(body, dict):
            raise cli.LedgerFailure(f"GET {url}/v1/markets: HTTP {status}; expected the bench ledger's market list")
        market_id = body.get("next_market_id") if ref == "next" else body.get("current_market_id")
        if type(market_id) is not int:
            raise cli.LedgerFailure("no market is open for orders right now; expected at least one "
                                    "(the ledger's day may be over: see --last-market / dgc-host ledger markets)")
        return market_id

    def show(status: int, body: Any, as_json: bool, formatter) -> int:
        if as_json or not (200 <= status < 300) or not isinstance(body, dict):
            return cli._print_answer(status, body)
        print(formatter(body))
        return cli.EXIT_OK

    def cmd_markets(args: argparse.Namespace) -> int:
        params = {k: v for k, v in (("from", args.start), ("to", args.end), ("limit", args.limit)) if v is not None}
        status, body = get(f"{args.url}/v1/markets", params)
        return show(status, body, args.json, views.format_markets)

    def cmd_book(args: argparse.Namespace) -> int:
        status, body = get(f"{args.url}/v1/markets/{resolve(args.url, args.market)}/book")
        return show(status, body, args.json, views.format_book)

    def cmd_trades(args: argparse.Namespace) -> int:
        token = cli._token(args)
        status, body = get(f"{args.url}/v1/markets/{resolve(args.url, args.market)}/trades", token=token)
        names = None
        if status == 200 and not args.json:
            s_status, summary = get(f"{args.url}/v1/summary", token=token)
            if s_status == 200 and isinstance(summary, dict):
                names = {d["device_id"]: d["name"] for d in summary.get("devices", [])}
        return show(status, body, args.json, lambda b: views.format_trades(b, names))

    def cmd_summary(args: argparse.Namespace) -> int:
        status, body = get(f"{args.url}/v1/summary", token=cli._token(args))
        return show(status, body, args.json, views.format_summary)

    p = sub.add_parser("markets", help="list markets with their state (open, gate_closed, delivering, reporting, settled) "
                                       "and counts/volumes")
    output_args(p)
    p.add_argument("--from", dest="start", type=cli._non_negative, metavar="MARKET_ID",
                   help="first market id (default: a day of slots before now)")
    p.add_argument("--to", dest="end", type=cli._non_negative, metavar="MARKET_ID",
                   help="last market id (default: the last market open for orders)")
    p.add_argument("--limit", type=cli._positive, help="at most this many markets, the newest (default 100)")
    p.set_defaults(func=cli._wrap(cmd_markets))

    p = sub.add_parser("book", help="print a market's order book (price levels; a table, or --json)")
    output_args(p)
    market_arg(p)
    p.set_defaults(func=cli._wrap(cmd_book))

    p = sub.add_parser("trades", help="print a market's trades with reports and settlements (operator only)")
    output_args(p)
    token_arg(p)
    market_arg(p)
    p.set_defaults(func=cli._wrap(cmd_trades))

    p = sub.add_parser("summary", help="per device: energy bought/sold, money paid/received, shortfalls, open orders "
                                       "(operator only)")
    output_args(p)
    token_arg(p)
    p.set_defaults(func=cli._wrap(cmd_summary))
