"""The order in which `make test`'s pytest-xdist workers take the suite's files: longest first.

Why: the first pass runs with ``--dist loadfile`` (a file's tests share module fixtures: an sshd,
a rig, a daemon) and ``--no-loadscope-reorder``. xdist's default reorder sorts files by their
NUMBER of tests, which puts the longest files (one or two real-time tests of two to three
minutes each: the SIGKILL tests, the demo, the walk-through) at the very end, so the run ends
with one worker busy and the others idle. Handing the longest files out first (the classic
longest-processing-time rule) lets the many short files fill the gaps at the end.

The seconds are rough wall-clock figures of one file on one worker of `make test` on the 2-core
machine (a run ends with the slowest files: copy them from there); only their order matters. A file not listed keeps its place after the listed ones.
Within a file the tests keep their order (a module-scoped rig serves them in file order).
Applied on xdist workers only: a plain `pytest` run keeps the collection order.
"""

from __future__ import annotations

import os

import pytest

# rough seconds per file on one xdist worker: `make test` with 4 workers on the 2-core machine
# (2026-12-01, a loaded run; test_rig after its inner runs stopped loading third-party plugins)
SLOW_FILES_S = {
    "hil_tests/test_flash.py": 330,
    "hil_tests/test_flash_install.py": 300,
    "tests/test_sim.py": 290,
    "hil_tests/test_daemon_faults.py": 215,
    "tests/test_demo.py": 205,
    "hil_tests/test_daemon.py": 170,
    "hil_tests/test_ledger_schema.py": 140,
    "hil_tests/test_flash_keys.py": 130,
    "hil_tests/test_daemon_evm.py": 125,
    "hil_tests/test_walkthrough.py": 110,
    "hil_tests/test_daemon_restart.py": 60,
    "hil_tests/test_provision.py": 105,
    "hil_tests/test_net_meter.py": 105,
    "hil_tests/test_console.py": 95,
    "hil_tests/test_rig.py": 80,
    "hil_tests/test_board.py": 70,
    "tests/test_ledger_fastpath.py": 70,
    "tests/test_evm_example.py": 60,
    "tests/test_cli_basics.py": 55,
    "hil_tests/test_examples.py": 55,
    "hil_tests/test_bench_faults.py": 45,
    "tests/test_sim_checkers.py": 45,
    "tests/test_ledger_views.py": 40,
    "tests/test_community_bench.py": 40,
    "hil_tests/test_ledger_http.py": 40,
    "hil_tests/test_provision_serial.py": 35,
}


def _file_of(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


def longest_files_first(items: list[pytest.Item]) -> None:
    """Reorder ``items`` in place: files of SLOW_FILES_S by descending seconds, then the rest in
    collection order; every file's tests stay together and in order."""
    first_index: dict[str, int] = {}
    for index, item in enumerate(items):
        first_index.setdefault(_file_of(item), index)

    def key(item: pytest.Item) -> tuple[int, int]:
        path = _file_of(item)
        return (-SLOW_FILES_S.get(path, 0), first_index[path])

    items.sort(key=key)  # stable: within a file, collection order


def reorder_for_workers(items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        longest_files_first(items)


def slowest_files(terminalreporter, count: int = 25) -> None:
    """At the end of a run of many files: the seconds each file took (setup, call and teardown of
    its tests, on whichever worker ran it): the figures SLOW_FILES_S is kept from."""
    per_file: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) in ("setup", "call", "teardown") and hasattr(report, "duration"):
                path = report.nodeid.split("::", 1)[0]
                per_file[path] = per_file.get(path, 0.0) + report.duration
    if len(per_file) < 20:
        return
    terminalreporter.write_sep("=", f"slowest {count} files (s: setup + call + teardown of their tests)")
    for path, seconds in sorted(per_file.items(), key=lambda kv: -kv[1])[:count]:
        terminalreporter.write_line(f"{seconds:8.1f} {path}")
