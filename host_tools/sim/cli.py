"""`dgc-host sim`: run seeds of the deterministic simulation, or replay one with its trace.

    dgc-host sim --seeds 200 --start-seed 0      seeds 0..199
    dgc-host sim --seed 17 --trace               replay seed 17, printing every step and event

The last line printed is exactly ``sim: seeds=N steps=N kills=N faults=N violations=N``; the
exit status is 1 when violations > 0. A violating seed is printed with its invariant, the
detail, and the end of its trace (re-run deterministically with tracing on), followed by the
command that replays it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TRACE_TAIL_LINES = 60


@dataclass
class Totals:
    seeds: int = 0
    steps: int = 0
    kills: int = 0
    faults: int = 0
    violations: int = 0
    trades: int = 0
    by_invariant: dict = field(default_factory=dict)

    def line(self) -> str:
        return (f"sim: seeds={self.seeds} steps={self.steps} kills={self.kills} faults={self.faults} "
                f"violations={self.violations}")


def _one(args: tuple[int, int, str | None]):
    from .runner import run_seed

    seed, slots, community = args
    result = run_seed(seed, n_slots=slots, profile_dir=community)
    v = result.violations[0] if result.violations else None
    return (seed, result.steps, result.kills, result.faults, result.trades,
            None if v is None else (v.invariant, v.detail))


def run_seeds(seeds: list[int], *, slots: int = 3, jobs: int = 1, community: str | None = None,
              out=sys.stdout, deadline_s: float | None = None, trace_tail: int = TRACE_TAIL_LINES) -> Totals:
    """Run the seeds (in ``jobs`` processes), print each violation with its trace tail; return totals."""
    from .runner import run_seed

    totals = Totals()
    started = time.monotonic()
    work = [(s, slots, community) for s in seeds]
    if jobs > 1:
        pool = multiprocessing.get_context("fork").Pool(jobs)
        results = pool.imap(_one, work, chunksize=4)
    else:
        pool = None
        results = map(_one, work)
    try:
        for seed, steps, kills, faults, trades, violation in results:
            totals.seeds += 1
            totals.steps += steps
            totals.kills += kills
            totals.faults += faults
            totals.trades += trades
            if violation is not None:
                totals.violations += 1
                invariant, detail = violation
                totals.by_invariant[invariant] = totals.by_invariant.get(invariant, 0) + 1
                print(f"VIOLATION seed={seed} invariant={invariant}: {detail}", file=out)
                if trace_tail:
                    replay = run_seed(seed, trace=True, n_slots=slots, profile_dir=community)
                    for line in replay.trace[-trace_tail:]:
                        print(f"  {line}", file=out)
                print(f"  replay: dgc-host sim --seed {seed} --slots {slots} --trace", file=out)
                out.flush()
            if deadline_s is not None and time.monotonic() - started > deadline_s:
                print(f"sim: time bound of {deadline_s:.0f} s reached after {totals.seeds} seeds", file=out)
                break
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return totals


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=100, help="number of seeds to run (default 100)")
    parser.add_argument("--start-seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seed", type=int, help="run this one seed (with --trace: print its whole trace)")
    parser.add_argument("--trace", action="store_true", help="print every step, fault, kill and firmware event")
    parser.add_argument("--slots", type=int, default=3, help="trading slots (30 min) per seed (default 3)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--community", type=Path, help="a community directory (slots.csv) to drive loads and PV")
    parser.set_defaults(func=lambda args: main(args, parser))


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.seeds < 1 or args.seed is not None and args.seed < 0 or args.start_seed < 0:
        parser.error("--seeds: expected at least 1; seeds are integers >= 0")
    if not 1 <= args.slots <= 48:
        parser.error("--slots: expected 1 to 48")
    if not 1 <= args.jobs <= 64:
        parser.error("--jobs: expected 1 to 64")
    community = str(args.community) if args.community else None
    if args.seed is not None and args.trace:
        from .runner import run_seed

        result = run_seed(args.seed, trace=True, n_slots=args.slots, profile_dir=community)
        for line in result.trace:
            print(line)
        totals = Totals(seeds=1, steps=result.steps, kills=result.kills, faults=result.faults,
                        violations=1 if result.violations else 0)
        if result.violations:
            v = result.violations[0]
            print(f"VIOLATION seed={args.seed} invariant={v.invariant}: {v.detail}")
    else:
        seeds = [args.seed] if args.seed is not None else list(range(args.start_seed, args.start_seed + args.seeds))
        started = time.monotonic()
        totals = run_seeds(seeds, slots=args.slots, jobs=args.jobs, community=community)
        elapsed = time.monotonic() - started
        print(f"sim: {totals.trades} trades; {elapsed:.1f} s, {totals.seeds / elapsed:.1f} seeds/s")
        if totals.by_invariant:
            print("sim: violations by invariant: " + ", ".join(f"{k}={v}" for k, v in sorted(totals.by_invariant.items())))
    print(totals.line())
    return 1 if totals.violations else 0
