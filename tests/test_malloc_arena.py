"""MALLOC_ARENA_MAX comes from the daemon's starter, not from a re-exec of `dgc run` (issue 7 o:
a re-exec delayed the first router frame of a restarted daemon; issue 7 part 7: the variable
holds the idle footprint). systemd/dgc.service and the demo/test launchers set it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from firmware.cli import MALLOC_ARENA_MAX
from tests.test_cli_basics import DGC, REPO, SIM

ENVIRONMENT = "Environment="


def test_the_unit_sets_malloc_arena_max_as_the_daemon_expects():
    lines = [ln.strip() for ln in (REPO / "systemd" / "dgc.service").read_text().splitlines()]
    envs = [ln[len(ENVIRONMENT):] for ln in lines if ln.startswith(ENVIRONMENT)]
    assert f"MALLOC_ARENA_MAX={MALLOC_ARENA_MAX}" in envs, envs


def test_dgc_run_does_not_re_execute_itself_without_the_variable(tmp_path: Path):
    """Each module imports once per process: a re-exec would import firmware.config twice (seen in
    CPython's -X importtime lines on stderr). The run stops early on a journal of a newer
    release (exit 2), after the point where the re-exec used to happen."""
    import sqlite3

    text = SIM.read_text().replace('"../var/sim/sim-house-1', '"state')
    board = tmp_path / "board.toml"
    board.write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("DGC_CONFIG", "MALLOC_ARENA_MAX")}
    assert subprocess.run([*DGC, "keygen", str(board)], cwd=tmp_path, env=env, capture_output=True, timeout=60).returncode == 0
    db = sqlite3.connect(tmp_path / "state" / "journal.sqlite3")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema_version', 99)")
    db.commit()
    db.close()
    ran = subprocess.run([*DGC, "run", str(board)], cwd=tmp_path, env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 2, ran.stderr[-2000:]
    imports = [ln for ln in ran.stderr.splitlines() if re.match(r"import time:.*\|\s+firmware\.config$", ln.rstrip())]
    assert len(imports) == 1, imports
