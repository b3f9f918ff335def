"""`dgc-host demo` (what `make demo` runs): a simulated neighbourhood trading end to end.

It starts the bench ledger on 127.0.0.1 and four houses of the committed community fixture
(two PV houses with a battery, two consumers; docs/community.md), each replayed by the bench
house model on a sunny spring midday, with its emulated meters and DGR on virtual serial lines
and its own `dgc run` daemon and key. The market day is bounded (no market after ``--slots``
slots takes orders) so that every trade made can be delivered, reported by both sides and
settled before the end. The boards price with the tariff policy, ramping over the markets they
bid in, so sellers come down and buyers go up until they meet: trades clear at several prices.

It prints a readable live log, a line on the trade prices and who sold, the per-house table of
`dgc-host ledger summary`, and ends with one line:

    summary: houses=N slots=N orders=N trades=N delivered_wh=N reported=N settled=N failed=N

and exits 0 only when there were trades and every one was delivered, reported and settled.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

from .neighbourhood import REPO_ROOT, Neighbourhood, NeighbourhoodError, fixture_houses

# The tariff policy's price ramp spans the markets a board bids in (8 markets ahead x 30 s on
# the sim board), so a market's first orders do not cross and its prices move every bid and
# review until buyers and sellers meet: price discovery within the demo's few minutes. (The
# 900-s default is a real board's 15 minutes; on the 60x bench it would span 30 slots.)
DEMO_POLICY = {"strategy": "tariff", "price_ramp_seconds": 240}
# The 5-s reviews re-price the next three markets (not only the next one): a board's first
# orders go out at its first review with a complete slot of history instead of waiting for the
# 30-s bid, and the near markets' prices move at every review.
DEMO_CADENCE = {"review_horizon_seconds": 90}

# Daemon events worth showing live; everything else goes to var/demo/<house>/daemon.log.
SHOWN_EVENTS = (
    "starting", "running", "bid.done", "review.done", "trade.contracted", "delivery.started", "delivery.metered",
    "delivery.failed", "delivery.missed", "report.acked", "report.rejected", "order.rejected", "alarm.", "stopped",
)


def _printer(stream=sys.stdout):
    lock = threading.Lock()

    def on_line(name: str, line: str) -> None:
        if name in ("ledger", "relay") or "/bench" in name:
            if not line.startswith(("bench house ready", "ledger listening", "relay listening")):
                return
        elif not any(f" {event}" in line for event in SHOWN_EVENTS):
            return
        with lock:
            stream.write(f"[{name:>8}] {line}\n")
            stream.flush()

    return on_line


def summarise(hood: Neighbourhood) -> tuple[str, bool]:
    stats = hood.stats()
    trades = stats.get("trades", 0)
    line = (
        f"summary: houses={len(hood.houses)} slots={stats.get('delivered_markets', 0)} orders={stats.get('orders', 0)} "
        f"trades={trades} delivered_wh={stats.get('delivered_wh', 0)} reported={stats.get('reported_trades', 0)} "
        f"settled={stats.get('settled_trades', 0)} failed={stats.get('failed_trades', 0)}"
    )
    ok = trades > 0 and stats.get("reported_trades") == trades and stats.get("settled_trades") == trades and not stats.get("failed_trades")
    return line, ok


def price_discovery(hood: Neighbourhood) -> tuple[str, list[int], set[str]] | None:
    """One line on the trades' prices and who sold (the ledger's per-device trades, read as the
    operator): ``(line, prices, sellers)``; None on the EVM ledger."""
    if hood.chain is not None:
        return None
    import requests

    prices, sellers = [], set()
    try:
        for name, house in hood.houses.items():
            for trade in hood.get(f"/v1/devices/{house.device_id}/trades?limit=1000")["trades"]:
                if trade["side"] == "sell":
                    prices.append(trade["price_per_kwh_minor"])
                    sellers.add(name)
    except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
        return f"demo: no trade prices ({type(exc).__name__}: {exc})", [], set()
    if not prices:
        return "demo: no trades", [], set()
    distinct = sorted(set(prices))
    line = (f"demo: {len(prices)} trades at {len(distinct)} prices, {min(prices) / 100:.2f}..{max(prices) / 100:.2f} per kWh; "
            f"sellers: {', '.join(sorted(sellers))}")
    return line, prices, sellers


def per_house_table(hood: Neighbourhood) -> str | None:
    """The ledger's per-house summary (dgc-host ledger summary) as a table; None on the EVM ledger."""
    if hood.chain is not None:
        return None
    import requests

    from .bench_ledger.views import format_summary

    try:  # never costs the summary line below it
        return format_summary(hood.get("/v1/summary"))
    except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
        return f"demo: no per-house table ({type(exc).__name__}: {exc})"


def run_demo(workdir: Path, *, houses: int, slots: int, timeout_s: float, ledger: str = "rest") -> int:
    if workdir.exists():
        shutil.rmtree(workdir)
    started = time.monotonic()
    hood = Neighbourhood(workdir, fixture_houses(houses), on_line=_printer(), last_market_slots=slots + 1, ledger=ledger,
                         config_overrides={"policy": DEMO_POLICY, "cadence": DEMO_CADENCE})
    try:
        what = "a chain (anvil + market contract + relay)" if ledger == "evm" else "the bench ledger"
        print(f"demo: starting {what} and {houses} houses in {workdir} ...", flush=True)
        hood.start()
        slot_s = hood.slot_seconds
        print(
            f"demo: ledger {hood.ledger_url}; {slot_s}-s slots; markets close after {time.strftime('%H:%M:%S', time.gmtime(hood.last_market))} UTC "
            f"(+{slot_s} s delivery); watching ...",
            flush=True,
        )
        end_of_day = hood.last_market + slot_s

        def all_settled() -> bool:
            if time.time() < end_of_day + 2:
                return False
            stats = hood.stats()
            return stats.get("trades", 0) > 0 and stats.get("settled_trades") == stats.get("trades")

        deadline = max(0.0, end_of_day - time.time()) + 60
        hood.wait_until(all_settled, timeout_s=min(deadline, timeout_s - (time.monotonic() - started)), poll_s=2)
    except NeighbourhoodError as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        hood.stop()
        return 1
    except KeyboardInterrupt:
        hood.stop()
        return 130
    try:
        line, ok = summarise(hood)
        prices = price_discovery(hood)
        houses_table = per_house_table(hood)
    finally:
        hood.stop()
    print(f"demo: finished in {time.monotonic() - started:.0f} s; logs in {workdir}", flush=True)
    if prices:
        print(prices[0], flush=True)
    if houses_table:
        print(houses_table, flush=True)
    print(line, flush=True)
    return 0 if ok else 1


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=__doc__.split("\n\n")[1])
    parser.add_argument("--houses", type=int, default=4, help="number of fixture houses (half PV houses with a battery, at most 5); default 4")
    parser.add_argument("--slots", type=int, default=8, help="market slots to trade (default 8; 30 s each on the sim board)")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "var" / "demo", help="where configs, keys, journals and logs go")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds (default 600)")
    parser.add_argument("--ledger", choices=("rest", "evm"), default="rest",
                        help="rest: the bench ledger (default); evm: the market contract on anvil, through the relay")
    parser.set_defaults(func=lambda args: _main(args, parser))


def _main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not 2 <= args.houses <= 15:
        parser.error("--houses: expected 2 to 15 (one seller and one buyer at least; the fixture has 15 houses)")
    if not 1 <= args.slots <= 50:
        parser.error("--slots: expected 1 to 50")
    return run_demo(args.workdir, houses=args.houses, slots=args.slots, timeout_s=args.timeout, ledger=args.ledger)
