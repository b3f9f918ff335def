"""`dgc-host flash ...`: signed release bundles, installed with an atomic switch, a health check and a rollback.

Build a signed, versioned bundle; install it on a board; switch atomically; keep it only when
the health check passes, otherwise switch back by itself.

Why it works like this (NOTES.md, RAUC / Mender / SWUpdate):

- **A bundle is a directory** - ``wheels/`` (the firmware and every dependency, so the board
  installs with ``pip install --no-index``: no package index, no network, exactly what was
  tested), ``config/board.toml`` (optional), ``systemd/`` (the unit files of the tree),
  ``docs/`` (so the units' Documentation= paths exist on the board) - plus
  ``manifest.json`` (format, version, compatible board kinds, sha256 and size of every file) and
  ``manifest.sig``: a secp256k1 signature by the release key over
  sha256(b"DGC-BUNDLE-v1\\0" + manifest bytes). The manifest is stored in canonical form
  (sorted keys, compact JSON), so the signed bytes are the file's bytes.
- **The board pins a raw public key** (/etc/dgc/release-pubkey.hex, written by `flash trust`),
  not a certificate that can expire on a board nobody visits.
- **Everything is verified before the board is touched**: signature against the key pinned on
  that board, every file's size and sha256, no unlisted file, the board's kind (from its config)
  among the compatible kinds. Any failure refuses the bundle with exit status 2 and changes
  nothing. After the upload the board re-hashes what it received.
- **A/B the Python way**: each release gets its own directory under /opt/dgc/releases/<version>
  (the bundle's files, a venv, its board.toml, installed.json); /opt/dgc/current is a relative
  symlink switched atomically (a
  new link renamed over the old one, the directory fsynced). Relative links keep the layout
  valid under any root, so a test board in /tmp and a Pi share one code path. The release's
  board config lives in the release (/etc/dgc/board.toml links to it), so a bad config is
  rolled back together with the code; the board's identity keys ([board] name, [ledger] url,
  ledger_id) are carried over from the running config into each new release.
- **Commit only after a health check**: `dgc selftest` from the new release (config, key,
  meters, router, ledger, clock, registration). A failure switches back by itself; a
  ``pending.json`` written before the switch lets `flash rollback` finish the job if the host
  lost the connection in between. /opt/dgc/state.json records ``current``, ``previous`` and the
  ``failed`` versions for the board's own rollback (`dgc rollback`, dgc-rollback.service), which
  takes over once the daemon keeps failing after a committed update.

Exit status: 0 done; 1 an operation failed or the health check failed (rolled back); 2 a bundle
was refused or the input was bad. Progress lines only on a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from firmware.bundle import (BUNDLE_FORMAT, FIRMWARE_WHEEL, KEYS_PATH, MANIFEST, NAME_RE, PIP_WHEEL, REVOCATION_DOMAIN,
                             REVOCATION_FORMAT, ROTATION_DOMAIN, ROTATION_FORMAT, SIGNATURE, BundleRefused, Manifest,
                             canonical, check_downgrade, manifest_digest, parse_manifest, parse_pubkey, sign_statement,
                             sha256_file, verify_bundle)

from .target import BadTarget, BoardLayout, Target, TargetError, add_target_arguments, target_from_args

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
REPO_ROOT = Path(__file__).resolve().parents[1]
# The board's identity: taken from the running config into every new release's config.
IDENTITY_KEYS = (("board", "name"), ("ledger", "url"), ("ledger", "ledger_id"))
SELFTEST_TIMEOUT_S = 180


class FlashError(Exception):
    """An operation failed (exit 1)."""


# --------------------------------------------------------------------------- progress

class Progress:
    """A one-line progress display on stderr, only when stderr is a terminal (quiet in logs and CI)."""

    def __init__(self, stream=None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._lock = threading.Lock()

    def _show(self, text: str, end: str = "") -> None:
        with self._lock:
            self.stream.write("\r\x1b[K" + text + end)
            self.stream.flush()

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        """Elapsed seconds ticking next to ``label`` while the step runs."""
        if not self.enabled:
            yield
            return
        started = time.monotonic()
        done = threading.Event()

        def tick() -> None:
            while not done.wait(0.25):
                self._show(f"{label} ... {time.monotonic() - started:4.0f} s")

        thread = threading.Thread(target=tick, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self._show(f"{label} ... {time.monotonic() - started:.1f} s", end="\n")

    def bytes(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // total if total else width
        self._show(f"{label} [{'#' * filled}{'.' * (width - filled)}] {done / 1e6:.1f}/{total / 1e6:.1f} MB",
                   end="\n" if done >= total else "")


# --------------------------------------------------------------------------- manifest
# The manifest, its signature and the key rules are the board's (firmware/bundle.py): this
# machine applies the same code before uploading, as a convenience that refuses early.


# --------------------------------------------------------------------------- building

def _check_name(value: str, what: str) -> str:
    if not NAME_RE.match(value) or ".." in value:
        raise BundleRefused(f"{what} {value!r}: expected letters, digits and . _ + - (at most 64, not starting with a symbol)")
    return value


def _bundle_config(config_path: Path) -> tuple[bytes, str]:
    """The config to ship: valid for the firmware, and with absolute paths only - in a release it
    is read through a symlink from /opt/dgc/releases/<version>/, so a relative path would resolve
    against the release directory instead of the board's file system."""
    from firmware.config import ConfigError, load_config

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise BundleRefused(str(exc)) from None
    raw = config_path.read_bytes()
    data = tomllib.loads(raw.decode("utf-8"))
    checks = [("board", data.get("board", {}), ("state_dir", "key_file")), ("dgr", data.get("dgr", {}), ("port",)),
              ("console", data.get("console", {}), ("tty", "control_socket"))]
    checks += [(f"bus.{i}", bus, ("port",)) for i, bus in enumerate(data.get("bus", []))]
    for table, values, keys in checks:
        for key in keys:
            value = values.get(key) if isinstance(values, dict) else None
            if isinstance(value, str) and value and not value.startswith("/"):
                raise BundleRefused(f"{config_path}: [{table}] {key}: expected an absolute path in a config shipped in a "
                                    f"bundle, found {value!r}")
    if "state_dir" not in data.get("board", {}) or "key_file" not in data.get("board", {}):
        raise BundleRefused(f"{config_path}: [board] state_dir and key_file: expected both set to absolute paths in a "
                            "config shipped in a bundle (their defaults are relative)")
    return raw, config.board.kind


def _stage_source(repo: Path, dest: Path) -> Path:
    """A clean copy of what the firmware wheel is built from, so building never writes into the tree."""
    src = dest / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo / name, src / name)
    for package in ("firmware", "host_tools"):
        shutil.copytree(repo / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


def _pip(args: list[str], what: str) -> None:
    command = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-input"]
    log.debug("running %s", shlex.join(command))
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
    log.debug("pip: exit %d\n%s%s", result.returncode, result.stdout[-4000:], result.stderr[-4000:])
    if result.returncode != 0:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-4:])
        raise FlashError(f"{what} failed (pip exit {result.returncode}): {tail}")


def build_wheels(dest: Path, *, repo: Path = REPO_ROOT, platforms: tuple[str, ...] = (), python_version: str | None = None,
                 progress: Progress | None = None) -> None:
    """The firmware wheel (built from a copy of the tree) and the pinned dependencies of
    pyproject.toml as binary wheels for the board's platform (default: this machine's)."""
    progress = progress or Progress(enabled=False)
    dependencies = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dgc-build-") as tmp:
        source = _stage_source(repo, Path(tmp))
        with progress.step("building the firmware wheel"):
            _pip(["wheel", "--no-deps", "--wheel-dir", str(dest), str(source)], "building the firmware wheel")
    target_args: list[str] = []
    for platform in platforms:
        target_args += ["--platform", platform]
    if platforms or python_version:
        target_args += ["--python-version", python_version or f"{sys.version_info.major}.{sys.version_info.minor}",
                        "--implementation", "cp"]
    with progress.step(f"fetching {len(dependencies)} pinned dependencies and theirs"):
        _pip(["download", "--dest", str(dest), "--only-binary=:all:", *target_args, *dependencies],
             "downloading the dependencies' wheels")
    # The installer: the board runs this pip from its wheel, so a release venv needs no ensurepip.
    _pip(["download", "--dest", str(dest), "--only-binary=:all:", "--no-deps", f"pip=={importlib.metadata.version('pip')}"],
         "downloading pip's wheel")


def readable_journal_schemas() -> list[int]:
    """The journal schema versions this tree's firmware can read: the journal package's own list
    if it declares one, else every version up to its own (its migrations bring older ones up)."""
    import firmware.journal as journal

    declared = getattr(journal, "READABLE_SCHEMA_VERSIONS", None)
    return sorted(set(declared)) if declared else list(range(1, journal.SCHEMA_VERSION + 1))


def build_bundle(out_dir: Path, *, release_key: Path, version: str | None = None, board_kinds: tuple[str, ...] = (),
                 config: Path | None = None, wheels_from: Path | None = None, platforms: tuple[str, ...] = (),
                 python_version: str | None = None, repo: Path = REPO_ROOT, progress: Progress | None = None,
                 journal_schemas: tuple[int, ...] = ()) -> Path:
    """Write ``out_dir/dgc-<version>/`` and return it. See the module doc for the layout."""
    from firmware.keystore import KeyFileError, load_key_file

    progress = progress or Progress(enabled=False)
    try:
        key = load_key_file(release_key)
    except KeyFileError as exc:
        raise BundleRefused(f"--release-key: {exc}") from None
    project_version = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    version = _check_name(version or f"{project_version}+{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}", "--version")
    kinds = [_check_name(kind, "--board-kind") for kind in board_kinds]
    config_bytes, config_kind = (None, None)
    if config is not None:
        config_bytes, config_kind = _bundle_config(Path(config))
        if not kinds:
            kinds = [config_kind]
        elif config_kind not in kinds:
            raise BundleRefused(f"{config}: [board] kind {config_kind!r} is not among --board-kind {', '.join(kinds)}; "
                                "expected the config of one of the kinds the bundle is for")
    if not kinds:
        raise BundleRefused("--board-kind: expected at least one board kind (or a --config whose [board] kind is used)")
    out_dir = Path(out_dir)
    final = out_dir / f"dgc-{version}"
    if final.exists():
        raise BundleRefused(f"{final} already exists; expected a new --version or another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".dgc-{version}.partial-", dir=out_dir))
    try:
        wheels = staging / "wheels"
        if wheels_from is not None:
            source = Path(wheels_from)
            source = source / "wheels" if (source / "wheels").is_dir() else source
            found = sorted(source.glob("*.whl"))
            if not found:
                raise BundleRefused(f"--wheels-from {wheels_from}: no .whl files there (or in its wheels/)")
            wheels.mkdir()
            for wheel in found:
                shutil.copy2(wheel, wheels / wheel.name)
        else:
            build_wheels(wheels, repo=repo, platforms=platforms, python_version=python_version, progress=progress)
        firmware = [w.name for w in wheels.glob("*.whl") if FIRMWARE_WHEEL.match(w.name)]
        if len(firmware) != 1:
            raise BundleRefused(f"expected exactly one dgc_firmware wheel, found {len(firmware)} in {wheels}")
        installers = sorted(w.name for w in wheels.glob("*.whl") if PIP_WHEEL.match(w.name))
        if len(installers) != 1:
            raise BundleRefused(f"expected exactly one pip wheel (the board's installer), found {len(installers)} in {wheels}")
        if config_bytes is not None:
            (staging / "config").mkdir()
            (staging / "config" / "board.toml").write_bytes(config_bytes)
        for extra in ("systemd", "docs"):  # whatever the tree has at build time, top level only
            found = sorted(p for p in (repo / extra).glob("*") if p.is_file()) if (repo / extra).is_dir() else []
            if found:
                (staging / extra).mkdir()
                for path in found:
                    shutil.copy2(path, staging / extra / path.name)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        fields = {
            "format": BUNDLE_FORMAT,
            "version": version,
            "compatible": sorted(set(kinds)),
            "created_at": int(time.time()),
            "requirement": f"dgc-firmware=={FIRMWARE_WHEEL.match(firmware[0]).group(1)}",
            "python": python_version or f"{sys.version_info.major}.{sys.version_info.minor}",
            "platforms": list(platforms) or ["this build machine's"],
            "config": "config/board.toml" if config_bytes is not None else "",
            "installer": f"wheels/{installers[0]}",
            "release_key": key.public_key.hex(),
            "journal_schemas": sorted(set(journal_schemas)) if journal_schemas else readable_journal_schemas(),
            "files": [{"path": p.relative_to(staging).as_posix(), "sha256": sha256_file(p), "size": p.stat().st_size}
                      for p in files],
        }
        raw = canonical(fields)
        parse_manifest(raw)  # what we sign must pass our own verifier
        (staging / MANIFEST).write_bytes(raw)
        (staging / SIGNATURE).write_text(key.sign_digest(manifest_digest(raw)).hex() + "\n", encoding="ascii")
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("built %s: version %s for %s, %d files, signed by %s", final, version, ", ".join(fields["compatible"]),
             len(fields["files"]), key.public_key.hex())
    return final


# --------------------------------------------------------------------------- installing

@dataclass
class InstallResult:
    version: str
    previous: str | None
    committed: bool
    selftest: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _current_version(target: Target, layout: BoardLayout) -> str | None:
    link = target.readlink(target.board_path(layout.current))
    if link is None:
        return None
    return link.rstrip("/").split("/")[-1]


def _board_kind(config: bytes | None, where: str) -> str | None:
    if config is None:
        return None
    try:
        data = tomllib.loads(config.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BundleRefused(f"{where}: the board's config is not valid TOML ({exc}); cannot tell the board's kind") from None
    board = data.get("board", {})
    return str(board.get("kind", "sim")) if isinstance(board, dict) else "sim"  # firmware.config's default kind


def compose_config(release_config: bytes | None, running_config: bytes | None) -> bytes:
    """The new release's config: the bundle's, with the board's identity keys taken from the
    running config; the running config itself when the bundle ships none."""
    import tomli_w

    if release_config is None:
        assert running_config is not None
        return running_config
    if running_config is None:
        return release_config
    new = tomllib.loads(release_config.decode("utf-8"))
    running = tomllib.loads(running_config.decode("utf-8"))
    changed = []
    for table, key in IDENTITY_KEYS:
        value = running.get(table, {}).get(key)
        if value is not None and new.get(table, {}).get(key) != value:
            new.setdefault(table, {})[key] = value
            changed.append(f"[{table}] {key}")
    if not changed:
        return release_config  # unchanged bytes keep the bundle's comments
    header = f"# The release's board config with {', '.join(changed)} kept from the board (dgc-host flash install).\n\n"
    return (header + tomli_w.dumps(new)).encode("utf-8")


def _systemctl(target: Target, systemctl: str, action: str, unit: str) -> None:
    target.run([*shlex.split(systemctl), action, unit], what=f"{systemctl} {action} {unit}")


INSTALL_STEPS = ("verified", "uploaded", "board-verified", "installed", "pending", "switched", "checked")
BOOT_DIR = "/opt/dgc/boot"
BOOT_SCRIPTS = ("boot_check.py", "rollback.py")  # standard library only: they run outside every release
DEFAULT_MAX_BOOT_ATTEMPTS = 3


def _journal_of(config: bytes | None) -> str | None:
    """The journal path a config gives the daemon ([board] state_dir/journal.sqlite3, as firmware.config has it)."""
    if not config:
        return None
    try:
        state_dir = tomllib.loads(config.decode("utf-8")).get("board", {}).get("state_dir")
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
        return None
    return f"{state_dir.rstrip('/')}/journal.sqlite3" if isinstance(state_dir, str) and state_dir.startswith("/") else None


def boot_scripts(bundle: Path, manifest: Manifest) -> dict[str, bytes]:
    """The boot check and rollback scripts of a release, read from its dgc_firmware wheel."""
    import zipfile

    wheel = next(bundle / e["path"] for e in manifest.files
                 if e["path"].startswith("wheels/") and FIRMWARE_WHEEL.match(e["path"].split("/")[-1]))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        missing = [n for n in BOOT_SCRIPTS if f"firmware/{n}" not in names]
        if missing:
            raise BundleRefused(f"{wheel.name}: no firmware/{missing[0]}; expected a firmware with the board's boot check")
        return {name: archive.read(f"firmware/{name}") for name in BOOT_SCRIPTS}


def _write_boot_scripts(target: Target, scripts: dict[str, bytes]) -> None:
    for name, data in scripts.items():
        target.write_file(target.board_path(f"{BOOT_DIR}/{name}"), data, mode=0o644)


def _board_verify(target: Target, layout: BoardLayout, release: str, *, board_kind: str | None, force_downgrade: bool) -> str | None:
    """`dgc release verify` of the board's RUNNING release on the uploaded copy: the board's own
    decision. None when the running release predates the command (it cannot verify)."""
    argv = [target.board_path(layout.dgc), "release", "verify", release, "--root", target.root]
    argv += (["--board-kind", board_kind] if board_kind else []) + (["--force-downgrade"] if force_downgrade else [])
    result = target.run(argv, check=False, what="dgc release verify (running release)")
    if result.returncode == 0:
        return result.text.strip()
    if result.returncode == 2 and b"invalid choice: 'release'" in result.stderr:
        return None
    message = result.stderr.decode("utf-8", "replace").strip().splitlines()
    detail = message[-1] if message else f"exit {result.returncode}"
    if result.returncode == 2:
        raise BundleRefused(f"the board refused the bundle: {detail.removeprefix('dgc release verify: refused: ')}")
    raise FlashError(f"dgc release verify failed on {target.describe()}: {detail}")


def run_boot_check(target: Target, *, abandon: bool = False) -> dict:
    """The board's boot check (what dgc-boot-check.service runs at boot), from its copy in
    /opt/dgc/boot: health check of the switched-to release, then commit or roll back."""
    argv = [target.python, "-I", target.board_path(f"{BOOT_DIR}/boot_check.py"), "--root", target.root, "--json",
            "--selftest-timeout", str(SELFTEST_TIMEOUT_S)]
    argv += (["--run-as", target.board_user] if target.board_user else []) + (["--abandon"] if abandon else [])
    result = target.run(argv, check=False, timeout=SELFTEST_TIMEOUT_S + 120, what="boot check (health check, commit or roll back)")
    lines = result.text.strip().splitlines()
    try:
        outcome = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise FlashError(f"the boot check on {target.describe()} gave no outcome (exit {result.returncode}): "
                         f"{result.last_lines(3)}") from None
    return outcome


def install(target: Target, bundle: Path, *, board_kind: str | None = None, keep: int = 2, service: str | None = None,
            systemctl: str = "systemctl", progress: Progress | None = None, out=None, force_downgrade: bool = False,
            host_check: bool = True, max_boot_attempts: int = DEFAULT_MAX_BOOT_ATTEMPTS, on_step=None) -> InstallResult:
    """Verify ``bundle`` for this board, install it as a new release, let the board verify it,
    switch, health-check, then commit or roll back (the board's boot check decides).

    Raises BundleRefused before switching anything. ``host_check=False`` skips this machine's
    own check (to show that the board refuses by itself). ``on_step(name)`` is called after each
    of INSTALL_STEPS (progress reporting; the power-cut tests kill the installer there)."""
    progress = progress or Progress(enabled=False)
    say = (lambda text: print(text, file=out, flush=True)) if out is not None else (lambda text: log.info("%s", text))
    step = on_step or (lambda name: None)
    layout = BoardLayout()
    if keep < 0:
        raise BundleRefused(f"--keep {keep}: expected zero or more earlier releases to keep")

    # ---- everything that can refuse, before the board is touched (one round trip for the facts)
    config_path = target.board_path(layout.config)
    pending_path = target.board_path(layout.pending)
    pubkey_path = target.board_path(layout.release_pubkey)
    current_path = target.board_path(layout.current)
    boot_path = target.board_path(f"{BOOT_DIR}/boot_check.py")
    facts = target.probe(pubkey_path, config_path, current_path, pending_path, boot_path)
    if facts[pubkey_path]["content"] is None:
        raise BundleRefused(f"no release key is pinned on {target.describe()} ({pubkey_path}); expected one: pin yours with "
                            "dgc-host flash trust TARGET --release-pubkey KEY.pub")
    pubkey = parse_pubkey(facts[pubkey_path]["content"].decode("ascii", "replace"), f"{pubkey_path} on {target.describe()}")
    link = facts[current_path].get("link")
    previous = link.rstrip("/").split("/")[-1] if link else None
    running_config = facts[config_path]["content"]
    config_kind = _board_kind(running_config, f"{config_path} on {target.describe()}")
    if host_check:
        manifest = verify_bundle(Path(bundle), pubkey)
        if config_kind and board_kind and config_kind != board_kind:
            raise BundleRefused(f"--board-kind {board_kind}: the board's config says [board] kind = {config_kind!r}; expected them to agree")
        kind = config_kind or board_kind
        if kind is None:
            raise BundleRefused(f"{target.describe()} has no board config at {config_path} to tell its kind; for a first install "
                                "pass --board-kind")
        if kind not in manifest.compatible:
            raise BundleRefused(f"bundle {manifest.version} is for board kind(s) {', '.join(manifest.compatible)}; this board "
                                f"is {kind!r}")
        check_downgrade(manifest.version, previous, allow_downgrade=force_downgrade)
    else:
        manifest = parse_manifest((Path(bundle) / MANIFEST).read_bytes())
        kind = config_kind or board_kind
    if not manifest.config and running_config is None:
        raise BundleRefused(f"neither the bundle nor {target.describe()} has a board config; expected a bundle built with --config")
    if facts[pending_path]["type"] is not None:
        raise FlashError(f"an earlier install on {target.describe()} was interrupted ({pending_path} exists); run "
                         "dgc-host flash rollback TARGET first (or let the board boot: its boot check decides it)")
    if host_check:
        say(f"verified bundle {manifest.version} here (signature by the pinned release key {pubkey.hex()[:16]}..., "
            f"{len(manifest.files)} files, board kind {kind})")
    step("verified")

    # ---- install the new release beside the running one; the board verifies what arrived
    release = target.board_path(layout.release(manifest.version))
    target.remove_tree(release)  # if there: left by an interrupted install, or an old copy of this version
    try:
        target.upload_tree(Path(bundle), release,
                           on_progress=lambda done, total: progress.bytes("uploading the bundle", done, total))
        step("uploaded")
        # The board's own decision, before any code of the new release runs (pip, check-config).
        if previous:
            verdict = _board_verify(target, layout, release, board_kind=None if config_kind else board_kind,
                                    force_downgrade=force_downgrade)
            say(verdict or f"note: the running release {previous} predates board-side verification; verified here only")
        else:
            say("first install: no release on the board can verify it yet (trust on first use, as when writing the SD "
                "card); verified here only")
        step("board-verified")
        received = target.sha256_files(release, [entry["path"] for entry in manifest.files])
        for entry in manifest.files:
            got = received.get(entry["path"])
            if got is None or got["sha256"] != entry["sha256"] or got["size"] != entry["size"]:
                raise FlashError(f"{entry['path']} arrived damaged on {target.describe()} (sha256 differs from the manifest); "
                                 "nothing was switched - try again")
        # The venv gets no pip of its own (no ensurepip: seconds saved, and Debian's python3-venv
        # is not needed); the bundle's pip wheel runs from its zip file and installs into it.
        with progress.step("creating the release's venv"):
            target.run([target.python, "-m", "venv", "--without-pip", f"{release}/venv"], what="python3 -m venv")
        with progress.step("installing the wheels (pip --no-index)"):
            result = target.run([f"{release}/venv/bin/python", f"{release}/{manifest.fields['installer']}/pip", "install",
                                 "--isolated", "--no-index", "--only-binary=:all:", "--find-links", f"{release}/wheels",
                                 "--disable-pip-version-check", "--no-input", "--quiet", manifest.requirement],
                                check=False, what=f"pip install {manifest.requirement}")
        if result.returncode != 0:
            raise FlashError(f"pip could not install {manifest.requirement} from the bundle on {target.describe()} "
                             f"(bundle built for Python {manifest.fields.get('python')}, platforms "
                             f"{', '.join(manifest.fields.get('platforms', []))}): {result.last_lines(3)}")
        bundle_config = (Path(bundle) / manifest.config).read_bytes() if manifest.config else None
        new_config = compose_config(bundle_config, running_config)
        target.write_file(f"{release}/board.toml", new_config)
        target.run([f"{release}/venv/bin/dgc", "check-config", f"{release}/board.toml"], what="dgc check-config (new release)",
                   as_board_user=True)
        target.write_file(f"{release}/installed.json", canonical({
            "version": manifest.version, "previous": previous, "installed_at": int(time.time()),
            "manifest_sha256": hashlib.sha256(manifest.raw).hexdigest()}) + b"\n")
        scripts = boot_scripts(Path(bundle), manifest)
        if facts[boot_path]["type"] is None:  # a first install: nothing committed yet to take them from
            _write_boot_scripts(target, scripts)
        target.sync()
    except BundleRefused:
        with contextlib.suppress(TargetError):
            target.remove_tree(release)
        raise
    except (FlashError, TargetError):
        with contextlib.suppress(TargetError):
            target.remove_tree(release)
        raise
    say(f"installed {manifest.version} in {layout.release(manifest.version)}")
    step("installed")

    # ---- switch: the marker first, so that a cut at any later point is decided at the next boot
    if service:
        _systemctl(target, systemctl, "stop", service)
    config_state = facts[config_path]
    backup = None
    if config_state["type"] == "file":  # a config from before the first install: kept for a rollback
        backup = layout.config + ".before-flash"
        target.write_file(target.board_path(backup), running_config or b"")
    target.write_file(pending_path, canonical({
        "candidate": manifest.version, "previous": previous, "config_backup": backup, "journal": _journal_of(new_config),
        "boot_attempts": 0, "max_boot_attempts": max_boot_attempts, "started_at": int(time.time())}) + b"\n")
    step("pending")
    try:
        target.symlink(current_path, f"releases/{manifest.version}")
        config_link = os.path.relpath(target.board_path(f"{layout.current}/board.toml"), os.path.dirname(config_path))
        if config_state["type"] != "link" or config_state.get("link") != config_link:
            target.symlink(config_path, config_link)
        say(f"switched {layout.current}: {previous or '(none)'} -> {manifest.version}")
        step("switched")

        # ---- health check from the new release, then commit or roll back: the board's boot check
        with progress.step("health check (dgc selftest)"):
            decided = run_boot_check(target)
    except TargetError as exc:  # e.g. the connection dropped: say where the board was left
        raise FlashError(f"{exc}; the switch to {manifest.version} was not finished ({layout.pending} is on the board): the "
                         f"board decides it at its next boot, or run dgc-host flash rollback TARGET to return to "
                         f"{previous or 'no release'}") from None
    step("checked")
    lines = decided.get("selftest") or ([decided["reason"]] if decided.get("reason") else [])
    outcome = InstallResult(version=manifest.version, previous=previous, committed=decided["outcome"] == "committed",
                            selftest=lines)
    if decided["outcome"] == "stuck":
        raise FlashError(f"the board could not roll back from {manifest.version}: {decided['reason']}")
    if outcome.committed:
        _write_boot_scripts(target, scripts)  # from now on the board's boot check is this committed release's
        outcome.removed = _prune(target, layout, manifest.version, keep)
        outcome.notes += _unit_notes(target, manifest)
    if service and (outcome.committed or previous):
        _systemctl(target, systemctl, "start", service)
    return outcome


def _prune(target: Target, layout: BoardLayout, current: str, keep: int) -> list[str]:
    """Remove all but the ``keep`` most recently installed earlier releases (and half-installed ones)."""
    releases = target.board_path(layout.releases)
    entries = target.listdir(releases) or {}
    names = [name for name, info in entries.items() if name != current and not name.startswith(".")]
    stamps = target.stat(*[f"{releases}/{name}/installed.json" for name in names]) if names else {}
    installed = sorted((info.get("mtime_ns", 0), name) for name in names
                       if (info := stamps[f"{releases}/{name}/installed.json"])["type"] == "file")
    complete = {name for _, name in installed}
    kept = {name for _, name in installed[len(installed) - keep:]} if keep else set()
    removed = sorted(name for name in names if name not in kept or name not in complete)
    for name in removed:
        target.remove_tree(f"{releases}/{name}")
    return removed


def _unit_notes(target: Target, manifest: Manifest) -> list[str]:
    """Unit files are installed by hand once (they need root); say when a release brings changed ones."""
    units = {entry["path"].split("/", 1)[1]: entry for entry in manifest.files if entry["path"].startswith("systemd/")}
    if not units:
        return []
    paths = {name: target.board_path(f"/etc/systemd/system/{name}") for name in units}
    installed = target.probe(*paths.values())
    notes = []
    for name, entry in units.items():
        content = installed[paths[name]]["content"]
        if content is None or hashlib.sha256(content).hexdigest() != entry["sha256"]:
            notes.append(f"systemd unit {name} of this release is not installed as is: sudo install -m 644 "
                         f"/opt/dgc/current/{entry['path']} /etc/systemd/system/ && sudo systemctl daemon-reload")
    return notes


def rollback(target: Target, *, service: str | None = None, systemctl: str = "systemctl") -> str:
    """Finish an interrupted install (pending.json: back to its previous release), or go back from
    the running release to the previous good one (the board's rollback.py). Returns a sentence
    saying what was done."""
    layout = BoardLayout()
    pending_path = target.board_path(layout.pending)
    if service:
        _systemctl(target, systemctl, "stop", service)
    if target.exists(pending_path):
        decided = run_boot_check(target, abandon=True)
        if decided["outcome"] == "stuck":
            raise FlashError(f"the board could not undo the interrupted install: {decided['reason']}")
        message = (f"interrupted install of {decided.get('candidate')} undone ({decided.get('reason')}); "
                   f"running {decided.get('running') or 'no release'}")
    elif target.exists(target.board_path(f"{BOOT_DIR}/rollback.py")):
        # The board's own rollback (what dgc-rollback.service runs): it never switches to a
        # release that cannot read the journal, and records the one left as failed.
        result = target.run([target.python, "-I", target.board_path(f"{BOOT_DIR}/rollback.py"), "--root", target.root],
                            check=False, what="rollback.py (the board's rollback)")
        if result.returncode != 0:
            raise FlashError(f"the board did not roll back: {result.last_lines(1)}")
        message = result.text.strip()
    else:  # a board installed before the boot scripts existed
        current = _current_version(target, layout)
        if current is None:
            raise FlashError(f"{target.describe()} has no installed release to roll back from")
        info = target.read_file(target.board_path(f"{layout.release(current)}/installed.json"))
        previous = json.loads(info).get("previous") if info else None
        if not previous or not target.exists(target.board_path(f"{layout.release(previous)}/venv/bin/dgc")):
            raise FlashError(f"release {current} has no earlier release kept on {target.describe()} to roll back to")
        target.symlink(target.board_path(layout.current), f"releases/{previous}")
        message = f"switched {layout.current}: {current} -> {previous} (release {current} is kept)"
    if service and _current_version(target, layout):
        _systemctl(target, systemctl, "start", service)
    return message


def board_status(target: Target) -> dict:
    layout = BoardLayout()
    releases = target.listdir(target.board_path(layout.releases)) or {}
    facts = target.probe(*(target.board_path(p) for p in (layout.release_pubkey, layout.pending, KEYS_PATH)))
    pinned, pending, keys = (facts[target.board_path(p)]["content"] for p in (layout.release_pubkey, layout.pending, KEYS_PATH))
    try:
        keys_record = json.loads(keys) if keys else {}
        pending_record = json.loads(pending) if pending else None
    except ValueError:
        keys_record, pending_record = {}, {"unreadable": True}
    return {
        "current": _current_version(target, layout),
        "releases": sorted(name for name in releases if not name.startswith(".")),
        "pending": pending_record,  # candidate, previous, boot_attempts of an install not yet decided
        "release_key": pinned.decode("ascii", "replace").strip() if pinned else None,
        "release_key_generation": keys_record.get("generation", 0),
        "revoked_keys": keys_record.get("revoked", []),
        "provisioned": target.exists(target.board_path(layout.identity)),
    }


def trust(target: Target, pubkey: bytes, *, replace: bool = False) -> str:
    layout = BoardLayout()
    path = target.board_path(layout.release_pubkey)
    existing = target.read_file(path)
    if existing is not None:
        old = parse_pubkey(existing.decode("ascii", "replace"), f"{path} on {target.describe()}")
        if old == pubkey:
            return f"{path} already pins {pubkey.hex()}"
        if not replace:
            raise BundleRefused(f"{path} on {target.describe()} pins another release key ({old.hex()[:16]}...); pass --replace "
                                "to change it (bundles signed by the old key will be refused from then on)")
    target.write_file(path, pubkey.hex().encode("ascii") + b"\n", mode=0o644)
    return f"pinned release key {pubkey.hex()} in {path}"


# --------------------------------------------------------------------------- command line

class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message} (see --help)\n")


def _run(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except BundleRefused as exc:
            print(f"dgc-host flash {args.flash_command}: refused: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except (FlashError, TargetError) as exc:
            print(f"dgc-host flash {args.flash_command}: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT if isinstance(exc, BadTarget) else EXIT_FAILED

    return run


def cmd_keygen(args: argparse.Namespace) -> int:
    from firmware.keystore import KeyFileError, generate_key_file

    path = Path(args.out)
    try:
        key = generate_key_file(path)
    except KeyFileError as exc:
        raise BundleRefused(str(exc)) from None
    pub = path.with_name(path.name + ".pub")
    pub.write_text(key.public_key.hex() + "\n", encoding="ascii")
    print(f"created release key {path} (mode 0600; keep it offline)")
    print(f"public key {key.public_key.hex()} in {pub}: pin it on each board with dgc-host flash trust TARGET --release-pubkey {pub}")
    return EXIT_OK


def cmd_build(args: argparse.Namespace) -> int:
    bundle = build_bundle(Path(args.out), release_key=Path(args.release_key), version=args.version,
                          board_kinds=tuple(args.board_kind), config=Path(args.config) if args.config else None,
                          wheels_from=Path(args.wheels_from) if args.wheels_from else None, platforms=tuple(args.platform),
                          python_version=args.python_version, progress=Progress(),
                          journal_schemas=tuple(args.journal_schema))
    manifest = json.loads((bundle / MANIFEST).read_bytes())
    print(f"bundle {bundle}")
    print(f"version {manifest['version']} for {', '.join(manifest['compatible'])}; {len(manifest['files'])} files; "
          f"{manifest['requirement']}")
    return EXIT_OK


def _read_pubkey_arg(value: str) -> bytes:
    path = Path(value)
    text = path.read_text(encoding="ascii", errors="replace") if path.is_file() else value
    return parse_pubkey(text, "--release-pubkey")


def cmd_trust(args: argparse.Namespace) -> int:
    pubkey = _read_pubkey_arg(args.release_pubkey)
    with target_from_args(args.target, args) as target:
        print(trust(target, pubkey, replace=args.replace))
    return EXIT_OK


def cmd_install(args: argparse.Namespace) -> int:
    with target_from_args(args.target, args) as target:
        result = install(target, Path(args.bundle), board_kind=args.board_kind, keep=args.keep, service=args.service,
                         systemctl=args.systemctl, progress=Progress(), out=sys.stdout, force_downgrade=args.force_downgrade,
                         max_boot_attempts=args.max_boot_attempts)
    print("health check (dgc selftest):")
    for line in result.selftest:
        print(f"  {line}")
    if result.committed:
        print(f"committed {result.version}: running {result.version}"
              + (f"; removed old release(s) {', '.join(result.removed)}" if result.removed else ""))
        for note in result.notes:
            print(f"note: {note}")
        return EXIT_OK
    if result.previous:
        print(f"health check of {result.version} failed: rolled back by itself to {result.previous} "
              f"(running {result.previous} again; release {result.version} removed)")
    else:
        print(f"health check of {result.version} failed: first install undone, no release installed")
    return EXIT_FAILED


def cmd_sign_key_statement(args: argparse.Namespace) -> int:
    """Sign a rotation (old key -> new key) or a revocation, offline, once for the whole fleet."""
    from firmware.keystore import KeyFileError, load_key_file

    try:
        key = load_key_file(Path(args.release_key))
    except KeyFileError as exc:
        raise BundleRefused(f"--release-key: {exc}") from None
    out = Path(args.out)
    if out.exists():
        raise BundleRefused(f"--out {out}: already exists; expected a new file")
    if args.kind == "rotate":
        if not args.new_pubkey or args.generation is None:
            raise BundleRefused("rotate: expected --new-pubkey NEW.pub and --generation N (higher than the boards' current one)")
        new = _read_pubkey_arg(args.new_pubkey)
        fields = {"format": ROTATION_FORMAT, "old": key.public_key.hex(), "new": new.hex(), "generation": args.generation}
        statement, what = sign_statement(ROTATION_DOMAIN, fields, key), f"rotation {key.public_key.hex()[:16]}... -> {new.hex()}"
    else:
        revoked = _read_pubkey_arg(args.revoke) if args.revoke else key.public_key
        fields = {"format": REVOCATION_FORMAT, "revoked": revoked.hex()}
        statement, what = sign_statement(REVOCATION_DOMAIN, fields, key), f"revocation of {revoked.hex()}"
    out.write_text(json.dumps(statement, indent=2) + "\n", encoding="ascii")
    print(f"wrote {what} to {out} (signed by {key.public_key.hex()[:16]}...); apply it with dgc-host flash apply-key-statement")
    return EXIT_OK


def apply_key_statement(target: Target, statement: bytes, kind: str) -> str:
    """Hand a key statement to the board's running release, which checks it against its pinned key."""
    layout = BoardLayout()
    if not target.exists(target.board_path(layout.dgc)):
        raise FlashError(f"{target.describe()} has no release installed to check the statement; on a bare board pin the key "
                         "with dgc-host flash trust --replace")
    path = target.board_path(f"{layout.opt}/.key-statement.json")
    target.write_file(path, statement, mode=0o644)
    try:
        result = target.run([target.board_path(layout.dgc), "release", f"{kind}-key", path, "--root", target.root],
                            check=False, what=f"dgc release {kind}-key")
    finally:
        target.remove_tree(path)
    detail = (result.stderr or result.stdout).decode("utf-8", "replace").strip().splitlines()
    if result.returncode == 2:
        raise BundleRefused(f"the board refused the statement: {detail[-1].split('refused: ', 1)[-1] if detail else ''}")
    if result.returncode != 0:
        raise FlashError(f"dgc release {kind}-key failed on {target.describe()}: {detail[-1] if detail else result.returncode}")
    return result.text.strip()


def cmd_apply_key_statement(args: argparse.Namespace) -> int:
    data = Path(args.statement).read_bytes()
    try:
        kind = "rotate" if json.loads(json.loads(data)["payload"])["format"] == ROTATION_FORMAT else "revoke"
    except (ValueError, KeyError, TypeError):
        raise BundleRefused(f"{args.statement}: expected a key statement written by dgc-host flash sign-key-statement") from None
    with target_from_args(args.target, args) as target:
        print(apply_key_statement(target, data, kind))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    with target_from_args(args.target, args) as target:
        print(json.dumps(board_status(target), indent=2, sort_keys=True))
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    with target_from_args(args.target, args) as target:
        print(rollback(target, service=args.service, systemctl=args.systemctl))
    return EXIT_OK


def _nonnegative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected zero or a positive integer, got {text!r}")
    return value


def add_parser(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    """Add the `flash` command group to dgc-host's parser."""
    flash = subparsers.add_parser(name, help=help_text, description=__doc__.splitlines()[0])
    sub = flash.add_subparsers(dest="flash_command", metavar="COMMAND", required=True, parser_class=_OneLineParser)

    def service_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--service", help="systemd unit to stop before switching and start after (e.g. dgc.service)")
        p.add_argument("--systemctl", default="systemctl", help="how to call systemctl on the board (default systemctl; with --sudo it runs as root)")

    p = sub.add_parser("keygen", help="create a release signing key (0600) and KEY.pub")
    p.add_argument("--out", required=True, metavar="KEY", help="where to write the key (refuses to overwrite)")
    p.set_defaults(func=_run(cmd_keygen))

    p = sub.add_parser("build", help="build a signed, versioned bundle: wheels, board config, systemd units, manifest")
    p.add_argument("--version", help="release version (default: the package version + a UTC timestamp)")
    p.add_argument("--board-kind", action="append", default=[], metavar="KIND",
                   help="a board kind the bundle may be installed on (repeatable; default: the --config's [board] kind)")
    p.add_argument("--config", help="board config to ship (absolute paths only); default: keep each board's config")
    p.add_argument("--release-key", required=True, help="the release signing key (dgc-host flash keygen)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write dgc-<version>/ into")
    p.add_argument("--wheels-from", metavar="DIR", help="reuse the wheels of an earlier bundle (or a directory of wheels): no package index needed")
    p.add_argument("--platform", action="append", default=[], metavar="TAG",
                   help="wheel platform of the board, e.g. manylinux2014_aarch64 (repeatable; default: this machine's)")
    p.add_argument("--python-version", help="the board's Python, e.g. 3.11 (default: this machine's)")
    p.add_argument("--journal-schema", action="append", type=int, default=[], metavar="N",
                   help="a journal schema version the release can read (repeatable; default: what this tree's firmware reads)")
    p.set_defaults(func=_run(cmd_build))

    p = sub.add_parser("trust", help="pin the release public key on a board (or an SD card's root)")
    p.add_argument("target", metavar="TARGET", help="user@host or a directory standing for the board's root")
    p.add_argument("--release-pubkey", required=True, metavar="HEX_OR_FILE", help="the release key's public half (KEY.pub)")
    p.add_argument("--replace", action="store_true", help="replace a different pinned key")
    add_target_arguments(p)
    p.set_defaults(func=_run(cmd_trust))

    p = sub.add_parser("install", help="verify a bundle, install it, switch, health-check; roll back by itself on failure")
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle directory (dgc-<version>/)")
    p.add_argument("target", metavar="TARGET", help="user@host or a directory standing for the board's root")
    p.add_argument("--board-kind", help="the board's kind, for a first install on a board without a config")
    p.add_argument("--keep", type=_nonnegative, default=2, metavar="N", help="earlier releases to keep (default 2)")
    p.add_argument("--force-downgrade", action="store_true", help="install a release older than the running one")
    p.add_argument("--max-boot-attempts", type=_nonnegative, default=DEFAULT_MAX_BOOT_ATTEMPTS, metavar="N",
                   help=f"boots the board gives the new release to pass its health check (default {DEFAULT_MAX_BOOT_ATTEMPTS})")
    service_args(p)
    add_target_arguments(p)
    p.set_defaults(func=_run(cmd_install))

    p = sub.add_parser("sign-key-statement", help="sign a release key rotation (old -> new) or revocation, offline")
    p.add_argument("kind", choices=("rotate", "revoke"))
    p.add_argument("--release-key", required=True, help="the signing key: the OLD key for a rotation; for a revocation the "
                                                         "key itself or the boards' pinned key")
    p.add_argument("--new-pubkey", metavar="HEX_OR_FILE", help="rotate: the new key's public half")
    p.add_argument("--generation", type=int, help="rotate: higher than the boards' current generation (1 for the first rotation)")
    p.add_argument("--revoke", metavar="HEX_OR_FILE", help="revoke: the key to revoke (default: the --release-key itself)")
    p.add_argument("--out", required=True, metavar="FILE")
    p.set_defaults(func=_run(cmd_sign_key_statement))

    p = sub.add_parser("apply-key-statement", help="give a board a key statement; the board checks it against its pinned key")
    p.add_argument("statement", metavar="FILE")
    p.add_argument("target", metavar="TARGET")
    add_target_arguments(p)
    p.set_defaults(func=_run(cmd_apply_key_statement))

    p = sub.add_parser("status", help="show the board's releases, the running one, the pinned key (JSON)")
    p.add_argument("target", metavar="TARGET")
    add_target_arguments(p)
    p.set_defaults(func=_run(cmd_status))

    p = sub.add_parser("rollback", help="undo an interrupted install, or go back to the release installed before")
    p.add_argument("target", metavar="TARGET")
    service_args(p)
    add_target_arguments(p)
    p.set_defaults(func=_run(cmd_rollback))
    return flash
