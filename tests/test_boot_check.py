"""The boot check (firmware/boot_check.py) on real directory trees laid out as a board.

It is run the way dgc-boot-check.service runs it: a copy of boot_check.py and rollback.py in
/opt/dgc/boot under the board root, started as ``python3 -I boot_check.py --root ROOT``. The
releases' `dgc` are stand-in shell scripts (what is under test is the decision, not the health
check; hil_tests/test_flash.py runs the real `dgc selftest` of real releases): each records
that it ran, then passes, fails or hangs as told.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def release(root: Path, version: str, behaviour: str = "pass", schemas: list[int] | None = None) -> None:
    rel = root / "opt/dgc/releases" / version
    (rel / "venv/bin").mkdir(parents=True)
    action = {"pass": 'echo "PASS meters: ok"; exit 0', "fail": 'echo "FAIL meters: no answer"; exit 1',
              "hang": "sleep 600"}[behaviour]
    script = rel / "venv/bin/dgc"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{root}/ran-{version}"\n{action}\n')  # kept when the release goes
    script.chmod(0o755)
    (rel / "board.toml").write_text(f'# config of {version}\n')
    if schemas is not None:
        (rel / "manifest.json").write_text(json.dumps({"version": version, "journal_schemas": schemas}))


def board(tmp_path: Path, *, previous: str | None = "1.0.0", candidate: str = "2.0.0", switched: bool = True,
          behaviour: str = "pass", attempts: int = 0, journal: str | None = None) -> Path:
    root = tmp_path / "board"
    base = root / "opt/dgc"
    (root / "etc/dgc").mkdir(parents=True)
    (base / "boot").mkdir(parents=True)
    for name in ("boot_check.py", "rollback.py"):
        shutil.copy(REPO / "firmware" / name, base / "boot" / name)
    if previous:
        release(root, previous)
    release(root, candidate, behaviour)
    live = candidate if switched else previous
    if live:
        (base / "current").symlink_to(f"releases/{live}")
        (root / "etc/dgc/board.toml").symlink_to("../../opt/dgc/current/board.toml")
    (base / "state.json").write_text(json.dumps({"current": previous, "previous": None, "failed": []}))
    (base / "pending.json").write_text(json.dumps({"candidate": candidate, "previous": previous, "config_backup": None,
                                                   "journal": journal, "boot_attempts": attempts,
                                                   "max_boot_attempts": 3}))
    return root


def boot(root: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", str(root / "opt/dgc/boot/boot_check.py"), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def current(root: Path) -> str | None:
    link = root / "opt/dgc/current"
    return os.readlink(link).split("/")[-1] if link.is_symlink() else None


def ran(root: Path, version: str) -> list[str]:
    path = root / f"ran-{version}"
    return path.read_text().splitlines() if path.exists() else []


def test_nothing_pending_nothing_done(tmp_path):
    root = board(tmp_path)
    (root / "opt/dgc/pending.json").unlink()
    r = boot(root)
    assert r.returncode == 0 and "nothing pending; running 2.0.0" in r.stdout, r.stderr
    assert ran(root, "2.0.0") == []


def test_a_passing_health_check_commits(tmp_path):
    root = board(tmp_path)
    r = boot(root)
    assert r.returncode == 0 and "boot check: committed 2.0.0; running 2.0.0" in r.stdout, r.stdout + r.stderr
    assert "PASS meters: ok" in r.stdout
    assert ran(root, "2.0.0") == [f"selftest {root}/etc/dgc/board.toml --allow-missing-key"]  # not provisioned
    state = json.loads((root / "opt/dgc/state.json").read_text())
    assert state["current"] == "2.0.0" and state["previous"] == "1.0.0" and state["committed"] == ["2.0.0"]
    assert not (root / "opt/dgc/pending.json").exists()
    assert boot(root).stdout.startswith("boot check: nothing pending")  # the next boot: committed, nothing to do


def test_a_failing_health_check_rolls_back_with_its_config(tmp_path):
    root = board(tmp_path, behaviour="fail")
    (root / "etc/dgc/identity.toml").write_text("provisioned\n")
    r = boot(root)
    assert r.returncode == 0, r.stdout + r.stderr  # the board is on a committed release: dgc.service may start
    assert "health check of 2.0.0 failed: rolled back to 1.0.0" in r.stdout and "FAIL meters" in r.stdout
    assert ran(root, "2.0.0") == [f"selftest {root}/etc/dgc/board.toml"]  # provisioned: the key must load
    assert current(root) == "1.0.0" and (root / "etc/dgc/board.toml").read_text() == "# config of 1.0.0\n"
    assert not (root / "opt/dgc/releases/2.0.0").exists() and not (root / "opt/dgc/pending.json").exists()
    state = json.loads((root / "opt/dgc/state.json").read_text())
    assert state["current"] == "1.0.0" and state["failed"] == ["2.0.0"]


def test_a_cut_before_the_switch_keeps_the_running_release(tmp_path):
    root = board(tmp_path, switched=False)
    r = boot(root)
    assert r.returncode == 0 and "stopped before its switch; running 1.0.0" in r.stdout, r.stdout + r.stderr
    assert current(root) == "1.0.0" and ran(root, "2.0.0") == [] and ran(root, "1.0.0") == []
    assert not (root / "opt/dgc/releases/2.0.0").exists() and not (root / "opt/dgc/pending.json").exists()


def test_the_boot_counter_rolls_back_a_release_that_never_finishes_its_check(tmp_path):
    """The candidate hangs the board during its check (here: the boot check is killed mid-check,
    as a watchdog reset or power cut would); after max_boot_attempts boots it is not run again."""
    root = board(tmp_path, behaviour="hang")
    for n in range(1, 4):
        proc = subprocess.Popen([sys.executable, "-I", str(root / "opt/dgc/boot/boot_check.py"), "--root", str(root)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while len(ran(root, "2.0.0")) < n:  # wait until the candidate's check has really started
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the "reset": boot check and health check die together
        proc.wait(timeout=10)
        assert json.loads((root / "opt/dgc/pending.json").read_text())["boot_attempts"] == n  # counted before running
        assert current(root) == "2.0.0"
    r = boot(root)
    assert r.returncode == 0 and "did not finish its health check in 3 boot(s): rolled back to 1.0.0" in r.stdout, r.stdout
    assert current(root) == "1.0.0" and len(ran(root, "1.0.0")) == 0
    assert json.loads((root / "opt/dgc/state.json").read_text())["failed"] == ["2.0.0"]


def test_a_hanging_check_times_out_and_rolls_back(tmp_path):
    root = board(tmp_path, behaviour="hang")
    r = boot(root, "--selftest-timeout", "1")
    assert r.returncode == 0 and "did not finish within 1 s" in r.stdout and current(root) == "1.0.0", r.stdout


def test_no_rollback_onto_a_journal_the_previous_release_cannot_read(tmp_path):
    journal = tmp_path / "journal.sqlite3"
    with sqlite3.connect(journal) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema_version', 2)")  # migrated by the candidate
    root = board(tmp_path, behaviour="fail", journal=str(journal))
    (root / "opt/dgc/releases/1.0.0/manifest.json").write_text(json.dumps({"journal_schemas": [1]}))
    r = boot(root)
    assert r.returncode == 1, r.stdout + r.stderr  # dgc.service requires this unit: it does not start
    assert "1.0.0 cannot read the journal's schema 2; a person is needed" in r.stdout
    assert current(root) == "2.0.0" and (root / "opt/dgc/pending.json").exists()
    # A previous release that reads schema 2 is rolled back to.
    (root / "opt/dgc/releases/1.0.0/manifest.json").write_text(json.dumps({"journal_schemas": [1, 2]}))
    r = boot(root)
    assert r.returncode == 0 and current(root) == "1.0.0", r.stdout


def test_a_failed_first_install_leaves_no_release_and_says_so(tmp_path):
    root = board(tmp_path, previous=None, behaviour="fail")
    r = boot(root)
    assert r.returncode == 1 and "rolled back to no release" in r.stdout, r.stdout + r.stderr
    assert current(root) is None and not (root / "etc/dgc/board.toml").is_symlink()
    assert not (root / "opt/dgc/releases/2.0.0").exists()


def test_the_rollback_unit_script_runs_outside_any_venv_and_skips_unreadable_journals(tmp_path):
    """dgc-rollback.service runs the copy in /opt/dgc/boot, not the failing release's venv."""
    root = board(tmp_path)
    (root / "opt/dgc/pending.json").unlink()
    release(root, "1.5.0", schemas=[1])
    journal = tmp_path / "journal.sqlite3"
    with sqlite3.connect(journal) as db:
        db.execute("PRAGMA user_version = 2")  # a journal that keeps its version in user_version
    (root / "opt/dgc/releases/1.0.0/manifest.json").write_text(json.dumps({"journal_schemas": [2]}))
    state = {"current": "2.0.0", "previous": "1.5.0", "failed": [], "journal": str(journal)}
    (root / "opt/dgc/state.json").write_text(json.dumps(state))
    r = subprocess.run([sys.executable, "-I", str(root / "opt/dgc/boot/rollback.py"), "--root", str(root)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert current(root) == "1.0.0"  # 1.5.0, the recorded previous, reads schema 1 only


def test_the_rollback_unit_never_picks_a_release_that_was_never_committed(tmp_path):
    """A cut after "installed" leaves a complete, runnable release that never ran its check."""
    root = board(tmp_path)
    (root / "opt/dgc/pending.json").unlink()
    release(root, "3.0.0")  # installed by a cut install, newer than everything
    (root / "opt/dgc/state.json").write_text(json.dumps({"current": "2.0.0", "previous": None, "failed": [],
                                                         "committed": ["1.0.0", "2.0.0"]}))
    r = subprocess.run([sys.executable, "-I", str(root / "opt/dgc/boot/rollback.py"), "--root", str(root)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert current(root) == "1.0.0"
