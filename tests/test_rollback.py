"""`dgc rollback` on a real directory tree laid out as on a board (/opt/dgc under a prefix root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from firmware.rollback import EXIT_BAD_INPUT, EXIT_FAILED, RollbackError, rollback, version_key

REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).parent / "dgc"
DGC = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "firmware.cli"]


def install(root: Path, *versions: str, current: str | None = None, state: dict | None = None,
            absolute_link: bool = False, runnable: tuple[str, ...] | None = None) -> Path:
    base = root / "opt" / "dgc"
    for version in versions:
        bin_dir = base / "releases" / version / "venv" / "bin"
        bin_dir.mkdir(parents=True)
        if runnable is None or version in runnable:
            (bin_dir / "dgc").write_text("#!/bin/sh\n")
            (bin_dir / "dgc").chmod(0o755)
    if current:
        target = (base / "releases" / current) if absolute_link else Path("releases") / current
        (base / "current").symlink_to(target)
    if state is not None:
        (base / "state.json").write_text(json.dumps(state))
    return base


def current_of(base: Path) -> str:
    return Path(os.readlink(base / "current")).name


def test_rolls_back_to_the_recorded_previous_release(tmp_path):
    base = install(tmp_path, "1.1.0", "1.2.0", "1.3.0", current="1.3.0",
                   state={"current": "1.3.0", "previous": "1.1.0", "installed_by": "dgc-host flash"})
    message = rollback(tmp_path, now=1_800_000_000)
    assert current_of(base) == "1.1.0"
    assert os.readlink(base / "current") == "releases/1.1.0"  # relative: valid under any prefix
    assert "1.3.0 -> 1.1.0" in message and "previous release recorded" in message
    state = json.loads((base / "state.json").read_text())
    assert state["current"] == "1.1.0" and state["previous"] is None and state["failed"] == ["1.3.0"]
    assert state["last_rollback"] == {"from": "1.3.0", "to": "1.1.0", "at": 1_800_000_000}
    assert state["installed_by"] == "dgc-host flash"  # keys we do not own are kept
    assert not [p for p in base.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_without_state_the_newest_other_release_in_version_order(tmp_path):
    base = install(tmp_path, "1.9.0", "1.10.0", "1.2.0", "1.11.0", current="1.11.0")
    rollback(tmp_path)
    assert current_of(base) == "1.10.0"  # not "1.9.0": versions compare as numbers
    assert version_key("1.10.0") > version_key("1.9.0")


def test_a_second_rollback_never_returns_to_a_failed_release(tmp_path):
    base = install(tmp_path, "1.1.0", "1.2.0", "1.3.0", current="1.3.0", state={"previous": "1.2.0"})
    rollback(tmp_path)
    assert current_of(base) == "1.2.0"
    rollback(tmp_path)  # 1.2.0 keeps failing too
    assert current_of(base) == "1.1.0"
    assert json.loads((base / "state.json").read_text())["failed"] == ["1.3.0", "1.2.0"]
    with pytest.raises(RollbackError) as info:
        rollback(tmp_path)
    assert info.value.status == EXIT_FAILED
    assert "nothing to roll back to" in str(info.value) and "1.1.0" in str(info.value)
    assert current_of(base) == "1.1.0"  # left as it was


def test_an_unusable_previous_falls_back_and_skips_releases_without_a_venv(tmp_path):
    base = install(tmp_path, "1.0.0", "1.1.0", "1.2.0", current="1.2.0", state={"previous": "0.9.0"},
                   runnable=("1.0.0", "1.2.0"))
    message = rollback(tmp_path)
    assert current_of(base) == "1.0.0"  # 1.1.0 has no executable venv/bin/dgc
    assert "'0.9.0' is not usable" in message


def test_an_absolute_link_and_an_unreadable_state_file_still_roll_back(tmp_path):
    base = install(tmp_path, "1.0.0", "2.0.0", current="2.0.0", absolute_link=True)
    (base / "state.json").write_text("{not json")
    message = rollback(tmp_path)
    assert current_of(base) == "1.0.0"
    assert message.startswith("warning: ") and "state.json unreadable" in message
    assert json.loads((base / "state.json").read_text())["failed"] == ["2.0.0"]


def test_dry_run_changes_nothing(tmp_path):
    base = install(tmp_path, "1.0.0", "2.0.0", current="2.0.0", state={"previous": "1.0.0"})
    before = (base / "state.json").read_text()
    message = rollback(tmp_path, dry_run=True)
    assert "would roll back" in message and "2.0.0 -> 1.0.0" in message
    assert current_of(base) == "2.0.0" and (base / "state.json").read_text() == before


def test_bad_layouts_are_bad_input(tmp_path):
    with pytest.raises(RollbackError) as info:
        rollback(tmp_path)
    assert info.value.status == EXIT_BAD_INPUT and "expected the install directory" in str(info.value)
    base = install(tmp_path, "1.0.0")
    (base / "current").mkdir()
    with pytest.raises(RollbackError) as info:
        rollback(tmp_path)
    assert info.value.status == EXIT_BAD_INPUT
    assert "expected a symlink to releases/<version>, found a plain file or directory" in str(info.value)


def test_the_dgc_rollback_command(tmp_path):
    """The real command line: needs no board config (it may be what broke), prints one line."""
    base = install(tmp_path, "1.0.0", "1.1.0", current="1.1.0", state={"previous": "1.0.0"})
    env = {k: v for k, v in os.environ.items() if k != "DGC_CONFIG"}
    result = subprocess.run([*DGC, "rollback", "--root", str(tmp_path)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"rolled back {base / 'current'}: 1.1.0 -> 1.0.0 (the previous release recorded in "
                                     f"{base / 'state.json'}); 1.1.0 marked failed")
    again = subprocess.run([*DGC, "rollback", "--root", str(tmp_path)], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path, env=env)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.startswith("dgc rollback: nothing to roll back to") and len(again.stderr.splitlines()) == 1
    # As a plain script with the system's python and nothing else on the path, as documented.
    script = subprocess.run([sys.executable, "-I", str(REPO / "firmware" / "rollback.py"), "--root", str(tmp_path),
                             "--dry-run"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert script.returncode == 1 and "nothing to roll back to" in script.stderr
