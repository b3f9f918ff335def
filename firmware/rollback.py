#!/usr/bin/env python3
"""`dgc rollback`: point /opt/dgc/current back at the previous release, atomically.

Why on the board and without `dgc-host`: a daemon that keeps failing after an update must be
brought back with nobody at the bench. systemd runs this from `dgc-rollback.service`
(``OnFailure=`` of `dgc.service`, i.e. once its restart limit is hit); it needs no board config
(the config may be what the new release rejects) and imports nothing but the standard library,
so it also runs as a plain script (``python3 -I rollback.py --root /``).

Layout (shared with the installer, `dgc-host flash`)::

    /opt/dgc/releases/<version>/venv/bin/dgc   one directory per installed release
    /opt/dgc/current -> releases/<version>     the symlink systemd's ExecStart goes through
    /opt/dgc/state.json                        {"current": ..., "previous": ..., "failed": [...], "journal": path}
    /opt/dgc/releases/<version>/manifest.json  its "journal_schemas": the journal versions that release can read

The target is ``state.json``'s ``previous`` if that release is installed, runnable and not
marked failed; otherwise the newest other release (by version order) that is runnable and not
marked failed. The switch is a new symlink renamed over ``current`` (rename(2) is atomic: the
link is always the old or the new one), then the directory is fsynced; state.json is then
rewritten the same way, recording the failed release in ``failed`` so that a second rollback
never returns to it. Keys of state.json this module does not know are kept as they were.

The journal: a release that cannot read the board's journal must never run on it (a newer
release may have migrated it). Before switching, the journal's schema version (``state.json``'s
``journal``, or ``--journal``) is read with the standard library's sqlite3, read-only, and a
release whose manifest does not list that version in ``journal_schemas`` is not a target; if no
release can read it, nothing is switched and a person must decide (exit 1).

Exit status: 0 switched (or would switch, with --dry-run); 1 nothing to roll back to; 2 bad
input (no install directory, ``current`` is not a symlink to a release).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
# Releases built before manifests declared it read the first (and then only) journal schema.
DEFAULT_JOURNAL_SCHEMAS = (1,)


class RollbackError(Exception):
    def __init__(self, message: str, status: int = EXIT_FAILED):
        super().__init__(message)
        self.status = status


class JournalUnreadable(Exception):
    """The journal exists but its schema version cannot be read."""


def journal_schema_version(path: Path) -> int | None:
    """The journal's schema version (meta.schema_version, else PRAGMA user_version), read-only;
    None when there is no journal yet. Standard library only: runs outside any release's venv."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as exc:
        raise JournalUnreadable(f"journal {path}: cannot open it read-only ({exc})") from None
    try:
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError:
            row = None
        if row is None:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            return int(version) if version else None
        return int(row[0])
    except (sqlite3.Error, TypeError, ValueError) as exc:
        raise JournalUnreadable(f"journal {path}: schema version unreadable ({exc})") from None
    finally:
        db.close()


def release_journal_schemas(release: Path) -> tuple[int, ...]:
    """What a release's manifest says it can read (no manifest, or no field: the first schema)."""
    data, _ = read_json(Path(release) / "manifest.json")
    schemas = data.get("journal_schemas", DEFAULT_JOURNAL_SCHEMAS)
    if not isinstance(schemas, (list, tuple)) or not all(type(v) is int for v in schemas):
        return ()
    return tuple(schemas)


def safe_name(name: str) -> bool:
    """A version usable as a directory name under releases/ (the installer's rule)."""
    return bool(re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z._+-]{0,63}", name)) and ".." not in name


def version_key(name: str) -> tuple:
    """Natural order: 1.10.0 after 1.9.2; numbers compare as numbers, words as words."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.findall(r"\d+|[A-Za-z]+", name))


def runnable(release: Path) -> bool:
    dgc = release / "venv" / "bin" / "dgc"
    return dgc.is_file() and os.access(dgc, os.X_OK)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> tuple[dict, str | None]:
    """(object, warning); a missing file is {}. Used for pending.json, manifests, key records."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"{path} unreadable ({exc})"
    if not isinstance(data, dict):
        return {}, f"{path} is not a JSON object"
    return data, None


def write_json(path: Path, data: dict) -> None:
    """Atomic: temporary file, fsync, rename, directory fsync (a power cut leaves old or new)."""
    write_state(path, data)


def read_state(path: Path) -> tuple[dict, str | None]:
    """(state, warning): an unreadable state.json must not prevent a rollback."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"{path} unreadable ({exc}); choosing the newest other release"
    if not isinstance(data, dict):
        return {}, f"{path} is not a JSON object; choosing the newest other release"
    return data, None


def write_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def current_release(dgc_dir: Path) -> str:
    current = dgc_dir / "current"
    if not current.is_symlink():
        found = "nothing" if not current.exists() else "a plain file or directory"
        raise RollbackError(f"{current}: expected a symlink to releases/<version>, found {found}", EXIT_BAD_INPUT)
    target = Path(os.readlink(current))
    resolved = (dgc_dir / target) if not target.is_absolute() else target
    if resolved.parent.name != "releases":
        raise RollbackError(f"{current} -> {target}: expected a link into {dgc_dir / 'releases'}", EXIT_BAD_INPUT)
    return resolved.name


def choose_target(dgc_dir: Path, current: str, state: dict, journal_schema: int | None = None) -> tuple[str, str]:
    """(release, why). ``journal_schema``: the board journal's version; a release that cannot read it is skipped."""
    releases_dir = dgc_dir / "releases"
    failed = {v for v in state.get("failed", []) if isinstance(v, str)} | {current}
    installed = sorted((p.name for p in releases_dir.iterdir() if p.is_dir()), key=version_key) if releases_dir.is_dir() else []
    previous = state.get("previous")

    def reads_journal(name: str) -> bool:
        return journal_schema is None or journal_schema in release_journal_schemas(releases_dir / name)

    if (isinstance(previous, str) and previous not in failed and previous in installed and runnable(releases_dir / previous)
            and reads_journal(previous)):
        return previous, f"the previous release recorded in {dgc_dir / 'state.json'}"
    # Only releases that once passed their health check here (state.json's "committed", kept by
    # the boot check); a release left installed but never switched to by a cut install is not one.
    committed = state.get("committed")
    vetted = {v for v in committed if isinstance(v, str)} if isinstance(committed, list) else None
    skipped = []
    for name in reversed(installed):
        if name in failed:
            continue
        if vetted is not None and name not in vetted:
            skipped.append(f"{name} (never committed)")
            continue
        if not runnable(releases_dir / name):
            skipped.append(f"{name} (no executable venv/bin/dgc)")
            continue
        if not reads_journal(name):
            schemas = ", ".join(map(str, release_journal_schemas(releases_dir / name))) or "none declared"
            skipped.append(f"{name} (reads journal schema {schemas}, the journal is {journal_schema})")
            continue
        reason = "the newest other release" + (f" (recorded previous {previous!r} is not usable)" if previous else "")
        return name, reason
    detail = f"installed: {', '.join(installed) or 'none'}; marked failed or current: {', '.join(sorted(failed))}"
    if skipped:
        detail += f"; not usable: {', '.join(skipped)}"
    raise RollbackError(f"nothing to roll back to in {releases_dir}: expected another runnable release not marked failed ({detail})")


def switch_current(dgc_dir: Path, release: str) -> None:
    """Atomic: a new relative symlink renamed over ``current``, then the directory fsynced."""
    current = dgc_dir / "current"
    tmp = dgc_dir / f".current.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(Path("releases") / release, tmp)
    os.replace(tmp, current)
    _fsync_dir(dgc_dir)


def board_journal_schema(state: dict, journal: str | None) -> int | None:
    """The journal's schema version (``journal`` overrides state.json's); an unreadable journal
    stops the rollback: running any release on it would be a guess."""
    path = journal or state.get("journal")
    if not isinstance(path, str) or not path:
        return None
    try:
        return journal_schema_version(Path(path))
    except JournalUnreadable as exc:
        raise RollbackError(f"{exc}; not switching: expected a journal whose schema can be checked") from None


def rollback(root: Path, dgc_dir: str = "/opt/dgc", *, dry_run: bool = False, now: float | None = None,
             journal: str | None = None) -> str:
    """Do it; returns the message to print. Raises RollbackError with the exit status."""
    base = Path(root) / dgc_dir.lstrip("/")
    if not base.is_dir():
        raise RollbackError(f"{base}: expected the install directory (with releases/ and current), found nothing", EXIT_BAD_INPUT)
    state_path = base / "state.json"
    state, warning = read_state(state_path)
    current = current_release(base)
    target, why = choose_target(base, current, state, board_journal_schema(state, journal))
    prefix = f"warning: {warning}\n" if warning else ""
    if dry_run:
        return prefix + f"would roll back {base / 'current'}: {current} -> {target} ({why}); nothing changed (--dry-run)"
    switch_current(base, target)
    failed = [v for v in state.get("failed", []) if isinstance(v, str)]
    state.update(
        current=target,
        previous=None,  # never the release that just failed; the next rollback picks the newest good one
        failed=failed + ([current] if current not in failed else []),
        last_rollback={"from": current, "to": target, "at": int(time.time() if now is None else now)},
    )
    try:
        write_state(state_path, state)
    except OSError as exc:  # the switch is done; say that the record is not
        prefix += f"warning: switched, but {state_path} not updated ({exc})\n"
    return prefix + f"rolled back {base / 'current'}: {current} -> {target} ({why}); {current} marked failed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dgc rollback", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/", help="filesystem prefix (default /)")
    parser.add_argument("--dgc-dir", default="/opt/dgc", help="install directory under the root (default /opt/dgc)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be switched, change nothing")
    parser.add_argument("--journal", help="the board's journal (default: state.json's \"journal\"); a release that "
                                          "cannot read its schema version is never switched to")
    args = parser.parse_args(argv)
    try:
        message = rollback(Path(args.root), args.dgc_dir, dry_run=args.dry_run, journal=args.journal)
    except RollbackError as exc:
        print(f"dgc rollback: {exc}", file=sys.stderr)
        return exc.status
    except OSError as exc:
        print(f"dgc rollback: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(message)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
