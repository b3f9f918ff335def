"""Helpers shared by the bench scripts (kept in a subpackage so `make bench`, which runs
bench/*.py, never runs this file on its own).

Nothing here asserts on speed: the helpers measure and format figures.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_VAR = REPO_ROOT / "var" / "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- process hygiene ------------------------------------------------------------------------

def stop_on_signals() -> None:
    """SIGTERM/SIGHUP become KeyboardInterrupt in the main thread, so every `finally` runs
    (child processes and socat lines are cleaned up the same way as on Ctrl-C)."""

    def _raise(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise)


def terminate(process: subprocess.Popen | None, timeout_s: float = 3.0) -> None:
    """Stop one child we started (by its own pid): SIGTERM, then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


_REPORT_HWM = "\nimport sys as _s; _s.stdout.write([l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])\n"


def python_peak_rss(code: str, *, timeout_s: float = 30.0) -> float:
    """Peak RSS in MiB of a fresh `python -c CODE`, read by the process itself from its own
    /proc/self/status VmHWM after CODE ran (a builtin open() and one line: no imports added).

    Why not wait4()'s ru_maxrss: Linux carries the pre-exec high-water mark over exec, and a child
    forked from this (big) process would report at least this process's RSS."""
    result = subprocess.run([sys.executable, "-c", code + _REPORT_HWM], stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, cwd=REPO_ROOT, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"python -c {code[:60]!r}... exited {result.returncode}: {result.stderr[-400:]}")
    line = result.stdout.strip().splitlines()[-1]
    return int(line.split()[1]) / 1024.0


# -- /proc ---------------------------------------------------------------------------------------

def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def proc_kib(pid: int, key: str) -> int:
    """A kB field of /proc/PID/status (VmHWM, VmRSS, ...)."""
    return int(proc_status(pid)[key].split()[0])


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    # after the ")": state is field 3, so utime (14) and stime (15) are at offsets 11 and 12
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def mount_of(path: Path) -> tuple[str, str, str]:
    """(mount point, fs type, device) of the filesystem holding ``path``."""
    path = Path(path).resolve()
    best = ("/", "?", "?")
    with open("/proc/mounts") as handle:
        for line in handle:
            device, mount_point, fs_type = line.split()[:3]
            mount_point = mount_point.replace("\\040", " ")
            if (path == Path(mount_point) or Path(mount_point) in path.parents) and len(mount_point) >= len(best[0]):
                best = (mount_point, fs_type, device)
    return best


def load_average() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


# -- statistics ----------------------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(values_s: list[float]) -> str:
    """p50/p90/p99/max of durations given in seconds, printed in ms."""
    if not values_s:
        return "no samples"
    ms = [v * 1000.0 for v in values_s]
    return (f"p50={percentile(ms, 50):7.2f}  p90={percentile(ms, 90):7.2f}  "
            f"p99={percentile(ms, 99):7.2f}  max={max(ms):7.2f} ms  (n={len(ms)})")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def header(title: str) -> None:
    print(f"== {title} ==", flush=True)


def python() -> str:
    return sys.executable
