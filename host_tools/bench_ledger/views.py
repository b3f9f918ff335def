"""Readable tables of the bench ledger's answers (markets, book, trades, per-device summary).

Why: an engineer watching a bench or a pilot reads market ids as UTC times and wants energy,
money and states at a glance, not epoch seconds in raw JSON (``--json`` still gives that).
Pure functions from the API's JSON bodies to text: no I/O, so the demo, the CLI and the tests
format the same way. Money is shown in minor units (1/1000 of the wire's milli-minor units,
exact: integer arithmetic), energy in Wh, prices in minor units per kWh, as on the wire.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Sequence


def utc(epoch_s: int) -> str:
    """A market id (slot start) as a UTC time, e.g. ``2026-12-01 09:30:00Z``."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch_s))


def money(milli_minor: int) -> str:
    """Milli-minor units as minor units with three decimals, exactly (``12345`` -> ``12.345``)."""
    sign = "-" if milli_minor < 0 else ""
    whole, frac = divmod(abs(milli_minor), 1000)
    return f"{sign}{whole}.{frac:03d}"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns padded to their widest cell: text left-aligned, numbers right-aligned."""
    rows = [["" if cell is None else cell for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(str(cell)))
    numeric = [bool(rows) and all(str(row[i]) in ("", "-") or _is_number(str(row[i])) for row in rows)
               for i in range(len(headers))]

    def line(cells: Sequence[Any]) -> str:
        return "  ".join(str(c).rjust(w) if num else str(c).ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _price_range(low: int | None, high: int | None) -> str:
    if low is None:
        return "-"
    return str(low) if low == high else f"{low}..{high}"


def format_markets(body: dict) -> str:
    """GET /v1/markets as a table, one market per line, oldest first."""
    rows = [
        (utc(m["market_id"]), m["market_id"], m["state"], m["orders"], m["open_orders"], m["open_bid_wh"], m["open_ask_wh"],
         m["trades"], m["traded_wh"], m["delivered_wh"], m["shortfall_wh"],
         _price_range(m["price_low_per_kwh_minor"], m["price_high_per_kwh_minor"]))
        for m in body["markets"]
    ]
    head = (f"markets at {utc(body['time_ms'] // 1000)} ({body['slot_seconds']}-s slots); current {utc(body['current_market_id'])}, "
            f"next open {utc(body['next_market_id']) if body.get('next_market_id') is not None else 'none'}")
    headers = ("market (UTC)", "id", "state", "orders", "open", "bid_wh", "ask_wh", "trades", "traded_wh", "delivered_wh",
               "shortfall_wh", "price")
    return head + "\n" + (table(headers, rows) if rows else "(no markets in range)")


def format_book(body: dict) -> str:
    """GET /v1/markets/{id}/book: asks above (dearest first, so the spread sits in the middle), bids below."""
    state = "gate open" if body["gate_open"] else "gate closed"
    rows = [("ask", a["price_per_kwh_minor"], a["remaining_wh"], a["orders"]) for a in reversed(body["asks"])]
    rows += [("bid", b["price_per_kwh_minor"], b["remaining_wh"], b["orders"]) for b in body["bids"]]
    head = f"book of market {utc(body['market_id'])} (id {body['market_id']}), {state}"
    if not rows:
        return head + "\n(empty book)"
    return head + "\n" + table(("side", "price", "open_wh", "orders"), rows)


def _short(device_id: str, names: dict[str, str] | None) -> str:
    name = (names or {}).get(device_id)
    return name if name else device_id[:10]


def format_trades(body: dict, names: dict[str, str] | None = None) -> str:
    """GET /v1/markets/{id}/trades: one trade per line with both reports and the settlement."""
    rows = []
    for t in body["trades"]:
        reports = {r["role"]: r for r in t["reports"]}
        settlement = t.get("settlement") or {}

        def report(role: str) -> str:
            r = reports.get(role)
            return "-" if r is None else f"{r['energy_wh']}{'' if r['status'] == 'delivered' else ' ' + r['status']}"

        rows.append((t["trade_id"], _short(t["seller"]["device_id"], names), _short(t["buyer"]["device_id"], names),
                     t["energy_wh"], t["price_per_kwh_minor"], t["state"], report("seller"), report("buyer"),
                     settlement.get("settled_wh", "-"), money(settlement["paid_milli_minor"]) if settlement else "-",
                     settlement.get("shortfall_wh", "-")))
    head = f"trades of market {utc(body['market_id'])} (id {body['market_id']})"
    if not rows:
        return head + "\n(no trades)"
    headers = ("trade", "seller", "buyer", "wh", "price", "state", "seller_wh", "buyer_wh", "settled_wh", "paid", "shortfall_wh")
    return head + "\n" + table(headers, rows)


def format_summary(body: dict) -> str:
    """GET /v1/summary: per device (by name) energy both ways, money both ways, shortfalls, open orders, and totals."""
    rows, totals = [], [0] * 8
    for d in body["devices"]:
        values = (d["bought_wh"], d["sold_wh"], d["received_wh"], d["delivered_wh"], d["paid_milli_minor"],
                  d["received_milli_minor"], d["shortfall_wh"], d["open_orders"])
        totals = [a + b for a, b in zip(totals, values)]
        name = (d["name"] or d["device_id"][:10]) + (" (revoked)" if d.get("revoked_ms") is not None else "")
        rows.append((name, *values[:4], money(values[4]), money(values[5]), values[6], values[7]))
    headers = ("house", "bought_wh", "sold_wh", "received_wh", "delivered_wh", "paid", "received", "shortfall_wh", "open_orders")
    if not rows:
        return "(no devices registered)"
    rows.append(("total", *totals[:4], money(totals[4]), money(totals[5]), totals[6], totals[7]))
    return table(headers, rows)
