"""`dgc-host bench community`: the trading benchmark's command line (see bench.py, metrics.py)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace

from firmware.policy import Tariffs

from firmware.config import PolicyConfig

from .loader import CommunityError, load_community

BOARD_POLICY = PolicyConfig()  # the bench's defaults are the board's [policy] defaults


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, found {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, found {text!r}")
    return value


def add_bench_command(bench_sub) -> None:
    p = bench_sub.add_parser(
        "community",
        help="trading benchmark: a deterministic run of the board's forecast and policy and the bench ledger's "
        "auction over a community's houses; prints the figures and a final 'community: ...' line",
        description="Run the board's forecast and policy (or, with --baseline, the ones it had before issue 8) for "
        "every house of a community directory (default: the committed 15-house fixture, docs/community.md), "
        "trading in the bench ledger's continuous double auction on a virtual clock, with the routers' power "
        "limits and the batteries, against the same houses on grid tariffs only.",
    )
    p.add_argument("--days", type=_positive, default=28, metavar="N", help="days to run (default: %(default)s)")
    p.add_argument("--start-day", type=_positive, default=91, metavar="D",
                   help="first day, counted from the community's first (default: %(default)s = 1 April in the fixture; "
                   "the 28 days before it are history)")
    p.add_argument("--community", metavar="DIR", help="community directory (default: the committed fixture)")
    p.add_argument("--baseline", action="store_true", help="the previous forecast and policy, for comparison")
    p.add_argument("--compare", action="store_true", help="run the baseline too and print its table first")
    p.add_argument("--no-batteries", action="store_true", help="run as if no house had a battery")
    p.add_argument("--retail", type=_positive, default=Tariffs().retail_per_kwh_minor, metavar="MINOR",
                   help="retail tariff, minor units (0.01 yen) per kWh (default: %(default)s)")
    p.add_argument("--feed-in", type=_positive, default=Tariffs().feed_in_per_kwh_minor, metavar="MINOR",
                   help="feed-in tariff, minor units per kWh (default: %(default)s, the post-FIT 8.5 yen)")
    p.add_argument("--sell-quantile", type=int, default=BOARD_POLICY.sell_quantile_percent, metavar="Q",
                   help="an unbacked lot is offered when at least 100 - Q %% of it is expected to be delivered "
                   "(with --curve-steps 0: the quantile of the surplus offered) (default: %(default)s)")
    p.add_argument("--battery-sell-quantile", type=int, default=BOARD_POLICY.battery_sell_quantile_percent,
                   metavar="Q", help="--sell-quantile for a house with a battery, which can deliver what the sun "
                   "does not give (default: %(default)s)")
    p.add_argument("--buy-quantile", type=int, default=BOARD_POLICY.buy_quantile_percent, metavar="Q",
                   help="a lot is bid for when at least 100 - Q %% of it is expected to be used "
                   "(with --curve-steps 0: the quantile of the shortage bid for) (default: %(default)s)")
    p.add_argument("--curve-steps", type=int, default=BOARD_POLICY.curve_steps, metavar="N",
                   help="bid and offer curves with lots priced at their worth in N steps; 0 = one order per market "
                   "at the ramp price (default: %(default)s)")
    p.add_argument("--router-transfers", type=int, default=8, metavar="N",
                   help="transfers a router runs at once (the DGR emulator's max_xfers); a trade beyond it on either "
                   "side is not delivered, the seller's shortfall; 0 = no limit (default: %(default)s)")
    p.add_argument("--no-battery-sales", action="store_true",
                   help="batteries do not sell what a later full battery would spill anyway (board default: "
                   f"battery_sales = {str(BOARD_POLICY.battery_sales).lower()})")
    p.add_argument("--oracle", choices=("load", "pv", "all"), default="",
                   help="a measuring aid, not a board setting: replace the board's forecast of the load, the PV or "
                   "both by the slots' actual energy (a perfect forecast), to measure what any forecast could reach "
                   "with this policy and market (forecast skill then reads 1 for what is replaced)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object before the final line")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots there (needs matplotlib, host extra)")
    p.set_defaults(func=cmd_community)


def cmd_community(args: argparse.Namespace) -> int:
    from .bench import BenchSettings, CommunityBench
    from .metrics import table

    try:
        community = load_community(args.community)
        tariffs = Tariffs(retail_per_kwh_minor=args.retail, feed_in_per_kwh_minor=args.feed_in)
    except (CommunityError, ValueError) as exc:
        print(f"dgc-host bench community: {exc}", file=sys.stderr)
        return 2
    if not (0 <= args.sell_quantile <= 50 and 0 <= args.battery_sell_quantile <= 50 and 50 <= args.buy_quantile <= 100
            and 0 <= args.curve_steps <= 100 and 0 <= args.router_transfers <= 1000):
        print("dgc-host bench community: --sell-quantile and --battery-sell-quantile must be 0..50, --buy-quantile "
              "50..100, --curve-steps 0..100 and --router-transfers 0..1000", file=sys.stderr)
        return 2
    settings = BenchSettings(days=args.days, start_day=args.start_day, baseline=args.baseline,
                             batteries=not args.no_batteries, tariffs=tariffs,
                             sell_quantile_percent=args.sell_quantile,
                             battery_sell_quantile_percent=args.battery_sell_quantile,
                             buy_quantile_percent=args.buy_quantile,
                             curve_steps=args.curve_steps, battery_sales=not args.no_battery_sales,
                             router_max_transfers=args.router_transfers, oracle=args.oracle)
    if args.community is not None:
        settings = replace(settings, site=None)  # another community's site is unknown: PV from statistics
    runs = [replace(settings, baseline=True), settings] if args.compare and not args.baseline else [settings]
    reports = []
    try:
        for s in runs:
            bench = CommunityBench(community, s)
            reports.append((s, bench, bench.run()))
    except ValueError as exc:
        print(f"dgc-host bench community: {exc}", file=sys.stderr)
        return 2
    for s, _bench, rep in reports:
        for line in table(rep, "baseline: the previous forecast and policy" if s.baseline else "forecast and policy of issue 8"):
            print(line)
    s, bench, rep = reports[-1]
    if args.plots:
        try:
            from .plots import write_plots
        except ImportError as exc:
            print(f"dgc-host bench community: --plots needs matplotlib (pip install -e '.[host]'): {exc}", file=sys.stderr)
            return 2
        for path in write_plots(bench, args.plots):
            print(f"  plot: {path}")
    if args.json:
        out = {("baseline" if s.baseline else "policy"): asdict(r) for s, _b, r in reports}
        print(json.dumps(out, sort_keys=True))
    print(rep.final_line())
    return 0
