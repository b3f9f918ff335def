"""Idle footprint of the `dgc run` daemon: peak RSS and CPU, next to what its libraries cost.

One bench house without PV (its orders find no counterparty: no trades, no deliveries), the
bench ledger and the house's emulators, all via host_tools.neighbourhood on 127.0.0.1 and ptys;
meters polled every 10 s (the other cadences are the sim board's, faster than a real board's
defaults, so the CPU figure is an upper bound for the idle case). Warm-up ~15 s, then a 60-s
measured window of the daemon's utime+stime and VmHWM/VmRSS from /proc.

Side by side, in fresh processes of the same interpreter: the peak RSS of a bare
`python -c pass`, of each library the daemon needs, of all of them together, and of the
daemon's own modules imported but not run. Then where each MiB goes: the same imports added
one step at a time (each step's cost is what it adds to the steps before it), and what running
adds to importing (threads, heap, caches). Prints figures and ratios; never asserts.

The reference bar is emonhub, a Raspberry Pi meter daemon, measured side by side on this
machine while polling one Modbus meter and posting over HTTP (issue 7 part 7): 35.7 MiB peak
RSS, 0.18 % of a core, 3 threads. The goal is the idle daemon within 1.0x of its RSS.

The daemon is started with PYTHONPROFILEIMPORTTIME=1 (CPython's -X importtime: one stderr line
per module as it is first imported, no memory kept), so the modules it really imported — also
the ones imported lazily inside jobs — are listed from its own output.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib import (  # noqa: E402
    BENCH_VAR, header, load_average, python_peak_rss, proc_cpu_seconds, proc_kib, proc_status, python, ratio,
    stop_on_signals,
)

WARMUP_S = 15.0
WINDOW_S = 60.0
SAMPLE_EVERY_S = 5.0
EMONHUB_RSS_MIB = 35.7  # emonhub measured side by side on this machine (issue 7 part 7)
EMONHUB_CPU_PERCENT = 0.18
EMONHUB_THREADS = 3
RSS_GOAL_RATIO = 1.0

IMPORT_PROBES = [
    ("bare python -c pass", "pass"),
    ("pymodbus client", "from pymodbus.client import ModbusSerialClient"),
    ("apscheduler BackgroundScheduler", "from apscheduler.schedulers.background import BackgroundScheduler"),
    ("coincurve", "import coincurve"),
    ("the 3 libraries together", "from pymodbus.client import ModbusSerialClient; "
                                 "from apscheduler.schedulers.background import BackgroundScheduler; "
                                 "import coincurve"),
    ("daemon modules, imported not run", "import firmware.cli, firmware.scheduler.daemon, firmware.scheduler.controller, "
                                         "firmware.drivers.meter, firmware.drivers.dgr, firmware.journal, "
                                         "firmware.ledger.rest, firmware.keystore, firmware.forecast, firmware.policy; "
                                         "from apscheduler.schedulers.background import BackgroundScheduler; "
                                         "from apscheduler.executors.pool import ThreadPoolExecutor; "
                                         "from apscheduler.triggers.interval import IntervalTrigger"),
]
PROBE_REPEATS = 3

# Where each MiB goes: cumulative imports, in the order the daemon needs them.
BREAKDOWN_STEPS = [
    ("bare python", "pass"),
    ("+ stdlib the daemon uses (sqlite3, json, http.client, tomllib, logging, threading)",
     "import sqlite3, json, http.client, tomllib, logging, threading, argparse"),
    ("+ pymodbus client (and asyncio, pyserial)", "from pymodbus.client import ModbusSerialClient"),
    ("+ coincurve (secp256k1)", "import coincurve"),
    ("+ the scheduler (APScheduler 3)", "from apscheduler.schedulers.background import BackgroundScheduler; "
                                        "from apscheduler.executors.pool import ThreadPoolExecutor; "
                                        "from apscheduler.triggers.interval import IntervalTrigger"),
    ("+ the firmware's own modules", "import firmware.cli, firmware.scheduler.daemon, firmware.scheduler.controller, "
                                     "firmware.drivers.meter, firmware.drivers.dgr, firmware.journal, firmware.ledger.rest, "
                                     "firmware.keystore, firmware.forecast, firmware.policy"),
]


def probe_breakdown() -> list[tuple[str, float]]:
    """[(step, cumulative peak RSS MiB)]: each step imports everything before it too."""
    out, code = [], ""
    for label, step in BREAKDOWN_STEPS:
        code = f"{code}; {step}" if code else step
        samples = [python_peak_rss(code) for _ in range(PROBE_REPEATS)]
        out.append((label, sorted(samples)[len(samples) // 2]))
    return out


def thread_names(pid: int) -> list[str]:
    names = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:
            continue
    return names

IMPORTTIME = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s+)(\S+)")
NOTABLE = ("pymodbus", "apscheduler", "requests", "urllib3", "charset_normalizer", "idna", "certifi", "ssl", "multiprocessing",
           "http", "email", "coincurve", "cffi", "_cffi_backend", "serial", "sqlite3", "ecdsa", "tzlocal",
           "asyncio", "concurrent", "json", "tomllib", "logging")


def probe_imports() -> dict[str, float]:
    results = {}
    for label, code in IMPORT_PROBES:
        samples = [python_peak_rss(code) for _ in range(PROBE_REPEATS)]
        results[label] = sorted(samples)[len(samples) // 2]
    return results


def importtime_summary(lines: list[str]) -> tuple[int, list[tuple[str, int, float]], set[str], list[tuple[str, float]]]:
    """(module count, [(top-level package, modules, self ms)] by self time, top-level names,
    [(module, self ms)] slowest first)."""
    modules: list[tuple[str, float]] = []
    per_pkg_us: dict[str, int] = defaultdict(int)
    per_pkg_count: dict[str, int] = defaultdict(int)
    count = 0
    seen: set[str] = set()
    for line in lines:
        match = IMPORTTIME.search(line)
        if not match:
            continue
        name = match.group(4)
        if name in seen:  # `dgc run` re-executes itself once (MALLOC_ARENA_MAX): count each module once
            continue
        seen.add(name)
        top = name.split(".")[0]
        per_pkg_us[top] += int(match.group(1))
        per_pkg_count[top] += 1
        modules.append((name, int(match.group(1)) / 1000.0))
        count += 1
    table = sorted(((pkg, per_pkg_count[pkg], per_pkg_us[pkg] / 1000.0) for pkg in per_pkg_us), key=lambda r: -r[2])
    return count, table, set(per_pkg_us), sorted(modules, key=lambda m: -m[1])


def main() -> int:
    stop_on_signals()
    from host_tools.neighbourhood import HouseSpec, Neighbourhood

    BENCH_VAR.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="idle-footprint-", dir=BENCH_VAR))
    hood = Neighbourhood(workdir, [HouseSpec("idle-house", pv_peak_w=0, battery_capacity_wh=0, load_peak_w=1700)],
                         cadence_overrides={"measure_seconds": 10})
    header("idle footprint of `dgc run` (sim board, one house without PV, meters every 10 s)")
    print(f"python {sys.version.split()[0]} at {python()}; {os.cpu_count()} CPUs; load average {load_average()}", flush=True)
    try:
        hood.start(start_daemons=False)
        house = hood.houses["idle-house"]
        os.environ["PYTHONPROFILEIMPORTTIME"] = "1"  # only the daemon's environment gets it
        try:
            # As systemd starts it: MALLOC_ARENA_MAX=2 (systemd/dgc.service). IDLE_FOOTPRINT_ARENA_MAX=unset
            # (or a number) measures the daemon without it / with another value, for comparison.
            arena = os.environ.get("IDLE_FOOTPRINT_ARENA_MAX", "2")
            print(f"MALLOC_ARENA_MAX={arena} in the daemon's environment", flush=True)
            daemon = hood.start_daemon("idle-house", env={"MALLOC_ARENA_MAX": None if arena == "unset" else arena})
        finally:
            os.environ.pop("PYTHONPROFILEIMPORTTIME", None)
        pid = daemon.process.pid
        others = {"bench ledger": hood.ledger.process.pid, "bench house emulator": house.emulator.process.pid}

        # Side-by-side import probes run during the warm-up (peak RSS does not depend on CPU load).
        warm_until = time.monotonic() + WARMUP_S
        probes = probe_imports()
        breakdown = probe_breakdown()
        while time.monotonic() < warm_until:
            time.sleep(min(0.5, warm_until - time.monotonic()))
        if not daemon.running:
            raise RuntimeError(f"daemon exited during warm-up; see {house.directory / 'daemon.log'}")

        lines_before = len(daemon.lines)
        cpu0 = proc_cpu_seconds(pid)
        others0 = {k: proc_cpu_seconds(p) for k, p in others.items()}
        t0 = time.monotonic()
        rss_samples = [proc_kib(pid, "VmRSS")]
        hwm_start = proc_kib(pid, "VmHWM")
        end = t0 + WINDOW_S
        while time.monotonic() < end:
            time.sleep(min(SAMPLE_EVERY_S, max(0.0, end - time.monotonic())))
            rss_samples.append(proc_kib(pid, "VmRSS"))
        cpu1 = proc_cpu_seconds(pid)
        others1 = {k: proc_cpu_seconds(p) for k, p in others.items()}
        wall = time.monotonic() - t0
        status = proc_status(pid)
        hwm = int(status["VmHWM"].split()[0])
        threads = status["Threads"]
        names = thread_names(pid)
        window_lines = daemon.lines[lines_before:]
        all_lines = list(daemon.lines)
    except BaseException:
        print(f"run failed; logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        hood.stop()

    events = defaultdict(int)
    for line in window_lines:
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "idle-house":
            events[parts[2]] += 1
    deliveries = events.get("delivery.started", 0)

    cpu_percent = 100.0 * (cpu1 - cpu0) / wall
    daemon_mb = hwm / 1024.0
    bare = probes["bare python -c pass"]
    libs = probes["the 3 libraries together"]
    mods = probes["daemon modules, imported not run"]

    header("daemon (measured)")
    print(f"window {wall:.1f} s after {WARMUP_S:.0f} s warm-up; threads {threads} ({', '.join(names)}); "
          f"deliveries started in window: {deliveries}")
    print(f"peak RSS (VmHWM)        {daemon_mb:6.1f} MiB   (VmHWM at window start {hwm_start / 1024:.1f} MiB)")
    print(f"RSS during window       min {min(rss_samples) / 1024:.1f} / max {max(rss_samples) / 1024:.1f} MiB "
          f"({len(rss_samples)} samples every {SAMPLE_EVERY_S:.0f} s)")
    print(f"CPU                     {cpu_percent:6.2f} % of one core  ({cpu1 - cpu0:.2f} s utime+stime in {wall:.1f} s)")
    print("events in window:       " + (", ".join(f"{k}={v}" for k, v in sorted(events.items())) or "none"))
    for name in others:
        share = 100.0 * (others1[name] - others0[name]) / wall
        print(f"(context) {name:<22} {share:5.2f} % of one core in the same window")

    header("peak RSS side by side (fresh processes, median of %d)" % PROBE_REPEATS)
    for label, mb in probes.items():
        print(f"{label:<36} {mb:6.1f} MiB")
    print(f"{'dgc run daemon (idle, above)':<36} {daemon_mb:6.1f} MiB")
    header("ratios")
    print(f"daemon / bare python               {ratio(daemon_mb, bare)}")
    print(f"daemon / 3 libraries imported      {ratio(daemon_mb, libs)}   (daemon - libraries = {daemon_mb - libs:+.1f} MiB)")
    print(f"daemon / its modules imported      {ratio(daemon_mb, mods)}   (running - importing = {daemon_mb - mods:+.1f} MiB)")
    print(f"libraries / bare python            {ratio(libs, bare)}   (libraries - bare = {libs - bare:+.1f} MiB)")
    header("where each MiB goes (cumulative imports in fresh processes, median of %d)" % PROBE_REPEATS)
    previous = 0.0
    for label, mib in breakdown:
        print(f"{label:<84} {mib:6.1f} MiB  ({mib - previous:+5.1f})")
        previous = mib
    print(f"{'+ running: threads, heap, SQLite cache, buffers (daemon peak - all imports)':<84} {daemon_mb:6.1f} MiB  "
          f"({daemon_mb - previous:+5.1f})")
    header("reference bar: emonhub, measured side by side on this machine")
    print(f"emonhub (Raspberry Pi meter daemon): {EMONHUB_RSS_MIB:.1f} MiB peak RSS, {EMONHUB_CPU_PERCENT} % of a core, "
          f"{EMONHUB_THREADS} threads")
    verdict = "within" if daemon_mb <= RSS_GOAL_RATIO * EMONHUB_RSS_MIB else "ABOVE"
    print(f"daemon vs emonhub: RSS {ratio(daemon_mb, EMONHUB_RSS_MIB)} ({verdict} the {RSS_GOAL_RATIO:.1f}x goal), "
          f"CPU {ratio(cpu_percent, EMONHUB_CPU_PERCENT)}, threads {threads} vs {EMONHUB_THREADS}")

    header("modules the daemon imported (its own -X importtime output, whole run)")
    count, table, tops, slowest = importtime_summary(all_lines)
    if count == 0:
        print("no importtime lines captured (skipped)")
    else:
        print(f"{count} modules in {len(table)} top-level packages; by self import time:")
        for pkg, n, ms in table[:12]:
            print(f"  {pkg:<22} {n:4d} modules  {ms:7.1f} ms")
        print("slowest single modules (self): " + ", ".join(f"{m} {ms:.1f} ms" for m, ms in slowest[:6]))
        present = [name for name in NOTABLE if name in tops]
        absent = [name for name in NOTABLE if name not in tops]
        print("notable present: " + ", ".join(present))
        print("notable absent:  " + ", ".join(absent))
    shutil.rmtree(workdir, ignore_errors=True)  # kept (logs, journal) only when the run failed
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; child processes stopped", file=sys.stderr)
        sys.exit(130)
