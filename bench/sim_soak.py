"""Soak of the deterministic simulation: at least 10,000 seeds (issue 7 part 3), both cores.

    .venv/bin/python bench/sim_soak.py [--seeds 10000] [--start-seed 0] [--slots 3] [--jobs 2] [--max-seconds 5400]

Prints every violating seed (invariant, detail, replay command; --trace-tail N adds its trace's end), then a
throughput line, and last exactly `sim: seeds=N steps=N kills=N faults=N violations=N`.
Bounded: it stops after --max-seconds even if seeds remain (and says so). Exit 1 on violations.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from host_tools.sim.cli import run_seeds  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10_000)
    parser.add_argument("--start-seed", type=int, default=0)
    parser.add_argument("--slots", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=5400.0)
    parser.add_argument("--trace-tail", type=int, default=0, help="trace lines printed per violating seed (a replay each)")
    args = parser.parse_args()
    started = time.monotonic()
    totals = run_seeds(list(range(args.start_seed, args.start_seed + args.seeds)), slots=args.slots, jobs=args.jobs,
                       deadline_s=args.max_seconds, trace_tail=args.trace_tail)
    elapsed = time.monotonic() - started
    print(f"sim_soak: {totals.trades} trades in {elapsed:.0f} s, {totals.seeds / elapsed:.1f} seeds/s "
          f"({args.jobs} processes, {args.slots} trading slots per seed)")
    if totals.by_invariant:
        print("sim_soak: violations by invariant: " + ", ".join(f"{k}={v}" for k, v in sorted(totals.by_invariant.items())))
    print(totals.line())
    return 1 if totals.violations else 0


if __name__ == "__main__":
    sys.exit(main())
