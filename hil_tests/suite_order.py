"""The order in which `make test`'s pytest-xdist workers take the suite's files: longest first.

Why: the first pass runs with ``--dist loadfile`` (a file's tests share module fixtures: an sshd,
a rig, a daemon) and ``--no-loadscope-reorder``. xdist's default reorder sorts files by their
NUMBER of tests, which puts the longest files (one or two real-time tests of two to three
minutes each: the SIGKILL tests, the demo, the walk-through) at the very end, so the run ends
with one worker busy and the others idle. Handing the longest files out first (the classic
longest-processing-time rule) lets the many short files fill the gaps at the end.

The seconds are rough wall-clock figures of one file on one worker of `make test` on the 2-core
machine; only their order matters. A file not listed keeps its place after the listed ones.
Within a file the tests keep their order (a module-scoped rig serves them in file order).
Applied on xdist workers only: a plain `pytest` run keeps the collection order.
"""

from __future__ import annotations

import os

import pytest

# rough seconds per file on one xdist worker (measured 2026-12-01, `make test` on 2 cores)
SLOW_FILES_S = {
    "tests/test_demo.py": 185,
    "hil_tests/test_daemon_faults.py": 185,
    "hil_tests/test_flash.py": 180,
    "hil_tests/test_daemon.py": 170,
    "hil_tests/test_flash_install.py": 135,
    "hil_tests/test_daemon_evm.py": 125,
    "hil_tests/test_walkthrough.py": 120,
    "hil_tests/test_net_meter.py": 110,
    "tests/test_sim.py": 85,
    "hil_tests/test_console.py": 75,
    "hil_tests/test_flash_keys.py": 70,
    "hil_tests/test_board.py": 45,
    "hil_tests/test_rig.py": 45,
    "hil_tests/test_provision.py": 45,
    "tests/test_evm_relay.py": 35,
    "tests/test_evm_ledger.py": 30,
    "tests/test_evm_example.py": 26,
    "hil_tests/test_ledger_schema.py": 26,
    "tests/test_slot_metering.py": 25,
    "tests/test_house_model.py": 23,
    "tests/test_evm_interval.py": 21,
    "tests/test_cli_basics.py": 20,
    "tests/test_ledger_views.py": 20,
    "hil_tests/test_examples.py": 19,
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
