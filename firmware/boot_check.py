#!/usr/bin/env python3
"""The boot check: a pending install is committed by a passing health check, or rolled back.

Why: an install is only finished when the new release has proved itself on this board
(RAUC's "mark good", Mender's ArtifactCommit). The power may go, the laptop may go away, the new
release may hang the board, between the switch of /opt/dgc/current and that proof. So the proof
is made by the board, from `/opt/dgc/pending.json`, on every boot before the daemon starts
(`dgc-boot-check.service`) - and by the installer right after the switch, through this same
code, so there is one way to commit and one way to roll back.

What it does with ``pending.json`` = {"candidate", "previous", "config_backup", "journal",
"boot_attempts", "max_boot_attempts"}:

- no ``pending.json``: nothing to decide; the committed release runs.
- ``current`` is not the candidate: the install stopped before its switch; the candidate
  directory and the marker go, the previous release keeps running.
- ``current`` is the candidate: ``boot_attempts`` is raised and written (fsynced) FIRST; if it
  is now above ``max_boot_attempts``, the candidate never got far enough to finish a check in
  that many boots (it hangs or resets the board) and is rolled back without being run again.
  Otherwise its own `dgc selftest` runs (as the daemon's user with ``--run-as``; retried
  ``--tries`` times, since the network may still be coming up): pass -> commit (state.json
  records it, the marker goes); fail -> roll back to ``previous`` (its config with it, the
  candidate removed and recorded as failed).

A rollback never switches to a release that cannot read the board journal's schema version
(firmware/rollback.py); then nothing is switched, the marker stays and the exit status is 1, so
`dgc.service` (which requires this unit) does not start and the board waits for a person.

Standard library only, like rollback.py: the unit runs a copy kept outside every release
(``python3 -I /opt/dgc/boot/boot_check.py``), written by the installer from the last committed
release, so a candidate that cannot even start Python is still rolled back.

Exit status: 0 the board is left on a committed release (nothing pending, committed, or rolled
back); 1 a person is needed (nothing to roll back to, or a first install failed); 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    from . import rollback as ab
except ImportError:  # run as a plain script (python3 -I /opt/dgc/boot/boot_check.py): rollback.py sits beside it
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import rollback as ab  # type: ignore[no-redef]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_MAX_BOOT_ATTEMPTS = 3
CONFIG = "/etc/dgc/board.toml"
IDENTITY = "/etc/dgc/identity.toml"
SELFTEST_TIMEOUT_S = 180.0


@dataclass
class Outcome:
    """What the boot check decided; printed as the last line (``--json``) for the installer."""

    outcome: str  # nothing | committed | rolled_back | undone | stuck
    running: str | None
    candidate: str | None = None
    reason: str = ""
    selftest: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.outcome == "nothing":
            return f"boot check: nothing pending; running {self.running or 'no release'}"
        if self.outcome == "committed":
            return f"boot check: committed {self.candidate}; running {self.running}"
        if self.outcome == "stuck":
            return f"boot check: {self.reason}; a person is needed"
        return f"boot check: {self.reason}; running {self.running or 'no release'}"


def _board(root: Path, path: str) -> Path:
    return Path(root) / path.lstrip("/")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _current(base: Path) -> str | None:
    link = base / "current"
    return os.readlink(link).rstrip("/").split("/")[-1] if link.is_symlink() else None


def undo(root: Path, base: Path, pending: dict, reason: str, *, failed: bool, now: float | None = None) -> Outcome:
    """Back to ``previous`` (or to no release, with the pre-flash config restored), the candidate
    removed; the marker last, so a power cut here repeats the undo at the next boot."""
    candidate, previous = pending.get("candidate"), pending.get("previous")
    state, _ = ab.read_state(base / "state.json")
    journal = pending.get("journal") or state.get("journal")
    releases = base / "releases"
    if previous and _current(base) != previous:
        try:
            schema = ab.board_journal_schema({}, journal)
        except ab.RollbackError as exc:
            return Outcome("stuck", _current(base), candidate, f"cannot roll back {candidate} to {previous}: {exc}")
        if schema is not None and schema not in ab.release_journal_schemas(releases / previous):
            return Outcome("stuck", _current(base), candidate,
                           f"cannot roll back {candidate} to {previous}: {previous} cannot read the journal's schema {schema}")
        if not ab.runnable(releases / previous):
            return Outcome("stuck", _current(base), candidate, f"cannot roll back {candidate} to {previous}: it is not runnable")
        ab.switch_current(base, previous)
    elif not previous:
        _remove(base / "current")
        config = _board(root, CONFIG)
        backup = pending.get("config_backup")
        if backup and _board(root, backup).is_file():
            tmp = config.with_name(f".{config.name}.{os.getpid()}.tmp")
            shutil.copy2(_board(root, backup), tmp)
            os.replace(tmp, config)
            _remove(_board(root, backup))
        elif config.is_symlink():
            _remove(config)  # the link into a release that is gone
    if isinstance(candidate, str) and candidate and candidate != previous and ab.safe_name(candidate):
        _remove(releases / candidate)
    if failed and candidate:
        listed = [v for v in state.get("failed", []) if isinstance(v, str)]
        state.update(current=previous, failed=listed + ([candidate] if candidate not in listed else []),
                     last_rollback={"from": candidate, "to": previous, "at": int(time.time() if now is None else now)})
        if journal:
            state["journal"] = journal
        ab.write_state(base / "state.json", state)
    _remove(base / "pending.json")
    return Outcome("rolled_back" if failed else "undone", previous, candidate, reason)


def commit(root: Path, base: Path, pending: dict) -> None:
    candidate, previous = pending["candidate"], pending.get("previous")
    state, _ = ab.read_state(base / "state.json")
    committed = [v for v in state.get("committed", []) if isinstance(v, str) and v != candidate]
    state.update(current=candidate, previous=previous, committed=committed + [candidate],
                 failed=[v for v in state.get("failed", []) if isinstance(v, str) and v != candidate])
    if pending.get("journal"):
        state["journal"] = pending["journal"]
    ab.write_state(base / "state.json", state)
    backup = pending.get("config_backup")
    if backup:
        _remove(_board(root, backup))
    _remove(base / "pending.json")


def run_selftest(root: Path, base: Path, *, run_as: str | None, timeout_s: float) -> tuple[bool, list[str]]:
    dgc = base / "current" / "venv" / "bin" / "dgc"
    argv = [str(dgc), "selftest", str(_board(root, CONFIG))]
    if not _board(root, IDENTITY).exists():
        argv.append("--allow-missing-key")  # not provisioned yet: a key is not expected
    if run_as:
        argv = ["runuser", "-u", run_as, "--", *argv]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, [f"dgc selftest did not finish within {timeout_s:.0f} s"]
    except OSError as exc:
        return False, [f"dgc selftest could not start: {exc.strerror} ({argv[0]})"]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 and not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:]) or "(no output)"
        lines = [f"dgc selftest exited {proc.returncode}: {tail}"]
    return proc.returncode == 0, lines


def boot_check(root: Path, dgc_dir: str = "/opt/dgc", *, run_as: str | None = None, tries: int = 1,
               retry_delay_s: float = 10.0, selftest_timeout_s: float = SELFTEST_TIMEOUT_S, abandon: bool = False,
               out=None) -> Outcome:
    """Decide the pending install (see the module doc). ``abandon``: undo it without a health check."""
    base = _board(root, dgc_dir)
    pending_path = base / "pending.json"
    if not pending_path.exists():
        return Outcome("nothing", _current(base))
    pending, warning = ab.read_json(pending_path)
    candidate = pending.get("candidate")
    if warning or not isinstance(candidate, str) or not ab.safe_name(candidate):
        # Written atomically, so only damage gets here: trust the committed record, not the marker.
        state, _ = ab.read_state(base / "state.json")
        committed = state.get("current") if isinstance(state.get("current"), str) else None
        pending = {"candidate": _current(base) if _current(base) != committed else None, "previous": committed,
                   "journal": state.get("journal")}
        return undo(root, base, pending, f"{pending_path} damaged ({warning or 'no candidate'}): back to the committed "
                                         f"{committed}", failed=pending["candidate"] is not None)
    current = _current(base)
    if current != candidate:
        return undo(root, base, pending, f"the install of {candidate} stopped before its switch", failed=False)
    if abandon:
        return undo(root, base, pending, f"install of {candidate} abandoned before its health check", failed=True)
    attempts = int(pending.get("boot_attempts", 0)) + 1
    limit = int(pending.get("max_boot_attempts", DEFAULT_MAX_BOOT_ATTEMPTS))
    if attempts > limit:
        return undo(root, base, pending, f"{candidate} did not finish its health check in {limit} boot(s): rolled back to "
                                         f"{pending.get('previous') or 'no release'}", failed=True)
    pending["boot_attempts"] = attempts
    ab.write_json(pending_path, pending)  # counted before the candidate runs: a hang or reset still counts
    lines: list[str] = []
    for attempt in range(max(1, tries)):
        if attempt:
            time.sleep(retry_delay_s)
        passed, lines = run_selftest(root, base, run_as=run_as, timeout_s=selftest_timeout_s)
        if out is not None:
            for line in lines:
                print(f"  {line}", file=out, flush=True)
        if passed:
            commit(root, base, pending)
            return Outcome("committed", candidate, candidate, selftest=lines)
    outcome = undo(root, base, pending, f"health check of {candidate} failed: rolled back to "
                                        f"{pending.get('previous') or 'no release'}", failed=True)
    outcome.selftest = lines
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dgc boot-check", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/", help="filesystem prefix (default /)")
    parser.add_argument("--dgc-dir", default="/opt/dgc", help="install directory under the root (default /opt/dgc)")
    parser.add_argument("--run-as", metavar="USER", help="run the health check as this user (the daemon's, e.g. dgc)")
    parser.add_argument("--tries", type=int, default=1, help="health check attempts before rolling back (default 1)")
    parser.add_argument("--retry-delay", type=float, default=10.0, metavar="S", help="seconds between attempts (default 10)")
    parser.add_argument("--selftest-timeout", type=float, default=SELFTEST_TIMEOUT_S, metavar="S",
                        help=f"seconds one health check may take (default {SELFTEST_TIMEOUT_S:.0f})")
    parser.add_argument("--abandon", action="store_true", help="undo the pending install without a health check")
    parser.add_argument("--json", action="store_true", help="print the outcome as one JSON object last")
    args = parser.parse_args(argv)
    try:
        outcome = boot_check(Path(args.root), args.dgc_dir, run_as=args.run_as, tries=args.tries,
                             retry_delay_s=args.retry_delay, selftest_timeout_s=args.selftest_timeout,
                             abandon=args.abandon, out=None if args.json else sys.stdout)
    except ab.RollbackError as exc:
        print(f"dgc boot-check: {exc}", file=sys.stderr)
        return exc.status
    except OSError as exc:
        print(f"dgc boot-check: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(asdict(outcome), sort_keys=True) if args.json else outcome.line(), flush=True)
    needs_person = outcome.outcome == "stuck" or (outcome.outcome == "rolled_back" and outcome.running is None)
    return EXIT_FAILED if needs_person else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
