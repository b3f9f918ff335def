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

from .target import BadTarget, BoardLayout, Target, TargetError, add_target_arguments, target_from_args

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_FORMAT = "dgc-bundle-v1"
SIGN_DOMAIN = b"DGC-BUNDLE-v1\0"
MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
MAX_MANIFEST_BYTES = 1 << 20
NAME_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")  # versions and board kinds: safe as a directory name
FIRMWARE_WHEEL = re.compile(r"^dgc_firmware-([^-]+)-.*\.whl$")
PIP_WHEEL = re.compile(r"^pip-[^-]+-py3-none-any\.whl$")
# The board's identity: taken from the running config into every new release's config.
IDENTITY_KEYS = (("board", "name"), ("ledger", "url"), ("ledger", "ledger_id"))
SELFTEST_TIMEOUT_S = 180


class BundleRefused(Exception):
    """The bundle or the input is not acceptable (exit 2); nothing on the board was changed."""


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

@dataclass(frozen=True)
class Manifest:
    raw: bytes
    fields: dict

    @property
    def version(self) -> str:
        return self.fields["version"]

    @property
    def compatible(self) -> list[str]:
        return self.fields["compatible"]

    @property
    def files(self) -> list[dict]:
        return self.fields["files"]

    @property
    def config(self) -> str:
        return self.fields["config"]

    @property
    def requirement(self) -> str:
        return self.fields["requirement"]


def canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def manifest_digest(raw: bytes) -> bytes:
    return hashlib.sha256(SIGN_DOMAIN + raw).digest()


def _safe_relpath(path: object) -> bool:
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        return False
    parts = path.split("/")
    return all(part not in ("", ".", "..") for part in parts) and path not in (MANIFEST, SIGNATURE)


def parse_manifest(raw: bytes) -> Manifest:
    """Strict shape check of manifest bytes (after the signature was verified)."""
    try:
        fields = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleRefused(f"{MANIFEST}: not ASCII JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise BundleRefused(f"{MANIFEST}: expected a JSON object")
    if canonical(fields) != raw:
        raise BundleRefused(f"{MANIFEST}: not in canonical form (sorted keys, compact); expected the bytes dgc-host flash build writes")
    if fields.get("format") != BUNDLE_FORMAT:
        raise BundleRefused(f"{MANIFEST}: format {fields.get('format')!r}; expected {BUNDLE_FORMAT!r}")
    version = fields.get("version")
    if not isinstance(version, str) or not NAME_RE.match(version) or ".." in version:
        raise BundleRefused(f"{MANIFEST}: version {version!r}; expected letters, digits and . _ + - (at most 64)")
    compatible = fields.get("compatible")
    if not isinstance(compatible, list) or not compatible or not all(isinstance(k, str) and NAME_RE.match(k) for k in compatible):
        raise BundleRefused(f"{MANIFEST}: compatible: expected a non-empty list of board kinds")
    files = fields.get("files")
    if not isinstance(files, list) or not files:
        raise BundleRefused(f"{MANIFEST}: files: expected a non-empty list")
    seen = set()
    for entry in files:
        if not isinstance(entry, dict) or set(entry) != {"path", "sha256", "size"}:
            raise BundleRefused(f"{MANIFEST}: files: expected entries {{path, sha256, size}}, got {entry!r:.100}")
        if not _safe_relpath(entry["path"]) or entry["path"] in seen:
            raise BundleRefused(f"{MANIFEST}: files: path {entry['path']!r:.100} is not a safe, unique relative path")
        if not isinstance(entry["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            raise BundleRefused(f"{MANIFEST}: files: {entry['path']}: sha256: expected 64 lowercase hex characters")
        if type(entry["size"]) is not int or entry["size"] < 0:
            raise BundleRefused(f"{MANIFEST}: files: {entry['path']}: size: expected a non-negative integer")
        seen.add(entry["path"])
    requirement = fields.get("requirement")
    if not isinstance(requirement, str) or not re.fullmatch(r"dgc-firmware==[0-9A-Za-z.+!_-]+", requirement):
        raise BundleRefused(f"{MANIFEST}: requirement {requirement!r}; expected dgc-firmware==VERSION")
    if not any(FIRMWARE_WHEEL.match(path.split("/")[-1]) for path in seen if path.startswith("wheels/")):
        raise BundleRefused(f"{MANIFEST}: no dgc_firmware wheel under wheels/")
    config = fields.get("config")
    if config not in ("", *seen):
        raise BundleRefused(f"{MANIFEST}: config {config!r}; expected '' or one of the listed files")
    installer = fields.get("installer")
    if installer not in seen or not PIP_WHEEL.match(str(installer).split("/")[-1]) or not str(installer).startswith("wheels/"):
        raise BundleRefused(f"{MANIFEST}: installer {installer!r}; expected the listed pip wheel under wheels/")
    return Manifest(raw=raw, fields=fields)


def verify_bundle(bundle: Path, release_pubkey: bytes) -> Manifest:
    """Signature (against the board's pinned key), shape, and every file's size and sha256.

    Raises BundleRefused naming the first problem. Reads only the bundle directory."""
    from firmware.messages import verify_signature

    bundle = Path(bundle)
    manifest_path, signature_path = bundle / MANIFEST, bundle / SIGNATURE
    if not manifest_path.is_file() or not signature_path.is_file():
        raise BundleRefused(f"{bundle}: not a DGC bundle; expected a directory with {MANIFEST} and {SIGNATURE} (dgc-host flash build)")
    raw = manifest_path.read_bytes()
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleRefused(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES} bytes")
    text = signature_path.read_text(encoding="ascii", errors="replace").strip()
    if not re.fullmatch(r"[0-9a-f]{128}", text):
        raise BundleRefused(f"{signature_path}: expected 128 lowercase hex characters (a compact secp256k1 signature)")
    # verify_signature hashes its payload once: sha256(domain + manifest) is exactly manifest_digest.
    if not verify_signature(SIGN_DOMAIN + raw, bytes.fromhex(text), release_pubkey, backend="ecdsa"):
        raise BundleRefused(f"{bundle}: the signature does not verify against the release key pinned on the board "
                            f"({release_pubkey.hex()[:16]}...): the manifest was altered after signing, or another key signed it")
    manifest = parse_manifest(raw)
    listed = {entry["path"] for entry in manifest.files}
    present = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() or p.is_symlink()}
    unlisted = sorted(present - listed - {MANIFEST, SIGNATURE})
    if unlisted:
        raise BundleRefused(f"{bundle}: file {unlisted[0]} is not in the manifest; expected only the signed files")
    for entry in manifest.files:
        path = bundle / entry["path"]
        if path.is_symlink() or not path.is_file():
            raise BundleRefused(f"{bundle}: {entry['path']} is missing (or not a regular file); the manifest lists it")
        size = path.stat().st_size
        digest = _sha256_file(path)
        if size != entry["size"] or digest != entry["sha256"]:
            raise BundleRefused(f"{bundle}: {entry['path']} has sha256 {digest[:16]}... ({size} bytes); the signed manifest "
                                f"says {entry['sha256'][:16]}... ({entry['size']} bytes): the file was altered or damaged")
    return manifest


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_pubkey(text: str, where: str) -> bytes:
    """A pinned release key: 66 hex characters (compressed secp256k1 point)."""
    import coincurve

    text = text.strip()
    try:
        raw = bytes.fromhex(text)
        if len(raw) != 33:
            raise ValueError
        coincurve.PublicKey(raw)
    except ValueError:
        raise BundleRefused(f"{where}: expected a compressed secp256k1 public key (66 hex characters)") from None
    return raw


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


def build_bundle(out_dir: Path, *, release_key: Path, version: str | None = None, board_kinds: tuple[str, ...] = (),
                 config: Path | None = None, wheels_from: Path | None = None, platforms: tuple[str, ...] = (),
                 python_version: str | None = None, repo: Path = REPO_ROOT, progress: Progress | None = None) -> Path:
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
            "files": [{"path": p.relative_to(staging).as_posix(), "sha256": _sha256_file(p), "size": p.stat().st_size}
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


def install(target: Target, bundle: Path, *, board_kind: str | None = None, keep: int = 2, service: str | None = None,
            systemctl: str = "systemctl", progress: Progress | None = None, out=None) -> InstallResult:
    """Verify ``bundle`` for this board, install it as a new release, switch, health-check, then
    commit or roll back. Raises BundleRefused before changing anything on the board."""
    progress = progress or Progress(enabled=False)
    say = (lambda text: print(text, file=out, flush=True)) if out is not None else (lambda text: log.info("%s", text))
    layout = BoardLayout()
    if keep < 0:
        raise BundleRefused(f"--keep {keep}: expected zero or more earlier releases to keep")

    # ---- everything that can refuse, before the board is touched (one round trip for the facts)
    config_path = target.board_path(layout.config)
    pending_path = target.board_path(layout.pending)
    pubkey_path = target.board_path(layout.release_pubkey)
    current_path = target.board_path(layout.current)
    identity_path = target.board_path(layout.identity)
    facts = target.probe(pubkey_path, config_path, current_path, pending_path, identity_path)
    if facts[pubkey_path]["content"] is None:
        raise BundleRefused(f"no release key is pinned on {target.describe()} ({pubkey_path}); expected one: pin yours with "
                            "dgc-host flash trust TARGET --release-pubkey KEY.pub")
    pubkey = parse_pubkey(facts[pubkey_path]["content"].decode("ascii", "replace"), f"{pubkey_path} on {target.describe()}")
    manifest = verify_bundle(Path(bundle), pubkey)
    running_config = facts[config_path]["content"]
    config_kind = _board_kind(running_config, f"{config_path} on {target.describe()}")
    if config_kind and board_kind and config_kind != board_kind:
        raise BundleRefused(f"--board-kind {board_kind}: the board's config says [board] kind = {config_kind!r}; expected them to agree")
    kind = config_kind or board_kind
    if kind is None:
        raise BundleRefused(f"{target.describe()} has no board config at {config_path} to tell its kind; for a first install "
                            "pass --board-kind")
    if kind not in manifest.compatible:
        raise BundleRefused(f"bundle {manifest.version} is for board kind(s) {', '.join(manifest.compatible)}; this board "
                            f"is {kind!r}")
    if not manifest.config and running_config is None:
        raise BundleRefused(f"neither the bundle nor {target.describe()} has a board config; expected a bundle built with --config")
    link = facts[current_path].get("link")
    previous = link.rstrip("/").split("/")[-1] if link else None
    if previous == manifest.version:
        raise BundleRefused(f"version {manifest.version} is already the running release on {target.describe()}; "
                            "expected a bundle built with a new --version")
    if facts[pending_path]["type"] is not None:
        raise FlashError(f"an earlier install on {target.describe()} was interrupted ({pending_path} exists); run "
                         "dgc-host flash rollback TARGET first")
    say(f"verified bundle {manifest.version} (signature by the pinned release key {pubkey.hex()[:16]}..., "
        f"{len(manifest.files)} files, board kind {kind})")

    # ---- install the new release beside the running one
    release = target.board_path(layout.release(manifest.version))
    target.remove_tree(release)  # if there: left by an interrupted install, or an old copy of this version
    try:
        target.upload_tree(Path(bundle), release,
                           on_progress=lambda done, total: progress.bytes("uploading the bundle", done, total))
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
        target.write_file(f"{release}/board.toml", compose_config(bundle_config, running_config))
        target.run([f"{release}/venv/bin/dgc", "check-config", f"{release}/board.toml"], what="dgc check-config (new release)",
                   as_board_user=True)
        target.write_file(f"{release}/installed.json", canonical({
            "version": manifest.version, "previous": previous, "installed_at": int(time.time()),
            "manifest_sha256": hashlib.sha256(manifest.raw).hexdigest()}) + b"\n")
        target.sync()
    except (FlashError, TargetError):
        with contextlib.suppress(TargetError):
            target.remove_tree(release)
        raise
    say(f"installed {manifest.version} in {layout.release(manifest.version)}")

    # ---- switch
    if service:
        _systemctl(target, systemctl, "stop", service)
    config_state = facts[config_path]
    backup = None
    if config_state["type"] == "file":  # a config from before the first install: kept for a rollback
        backup = config_path + ".before-flash"
        target.write_file(backup, running_config or b"")
    target.write_file(pending_path, canonical({"candidate": manifest.version, "previous": previous,
                                              "config_backup": backup, "started_at": int(time.time())}) + b"\n")
    try:
        target.symlink(target.board_path(layout.current), f"releases/{manifest.version}")
        config_link = os.path.relpath(target.board_path(f"{layout.current}/board.toml"), os.path.dirname(config_path))
        if config_state["type"] != "link" or config_state.get("link") != config_link:
            target.symlink(config_path, config_link)
        say(f"switched {layout.current}: {previous or '(none)'} -> {manifest.version}")

        # ---- health check from the new release, then commit or roll back
        provisioned = facts[identity_path]["type"] is not None
        argv = [target.board_path(layout.dgc), "selftest", config_path] + ([] if provisioned else ["--allow-missing-key"])
        with progress.step("health check (dgc selftest)"):
            check = target.run(argv, check=False, timeout=SELFTEST_TIMEOUT_S, what="dgc selftest (new release)", as_board_user=True)
        lines = [line for line in check.text.splitlines() if line.strip()]
        if check.returncode != 0 and not lines:
            lines = [f"dgc selftest exited {check.returncode}: {check.last_lines(3)}"]
        outcome = InstallResult(version=manifest.version, previous=previous, committed=check.returncode == 0, selftest=lines)
        if outcome.committed:
            _record_state(target, layout, current=manifest.version, previous=previous)
            target.remove_tree(pending_path)
            if backup:
                target.remove_tree(backup)
        else:
            _switch_back(target, layout, manifest.version, previous, backup)
    except TargetError as exc:  # e.g. the connection dropped: say where the board was left
        raise FlashError(f"{exc}; the switch to {manifest.version} was not finished ({layout.pending} is on the board): run "
                         f"dgc-host flash rollback TARGET to return to {previous or 'no release'}") from None
    if outcome.committed:
        outcome.removed = _prune(target, layout, manifest.version, keep)
        outcome.notes += _unit_notes(target, manifest)
    if service and (outcome.committed or previous):
        _systemctl(target, systemctl, "start", service)
    return outcome


def _switch_back(target: Target, layout: BoardLayout, candidate: str, previous: str | None, backup: str | None) -> None:
    """Undo a switch: ``current`` back to ``previous`` (or away, with the old config file restored,
    when there was none), the candidate release removed, the pending marker last."""
    current = target.board_path(layout.current)
    config_path = target.board_path(layout.config)
    if previous:
        target.symlink(current, f"releases/{previous}")
    else:
        target.remove_tree(current)
    if backup:
        old = target.read_file(backup)
        if old is not None:
            target.write_file(config_path, old)
            target.remove_tree(backup)
    elif not previous:
        target.remove_tree(config_path)  # the link into a release that is gone
    target.remove_tree(target.board_path(layout.release(candidate)))
    _record_state(target, layout, current=previous, failed=candidate)
    target.remove_tree(target.board_path(layout.pending))


def _record_state(target: Target, layout: BoardLayout, *, current: str | None, previous: str | None = None,
                  failed: str | None = None) -> None:
    """/opt/dgc/state.json, shared with the board's own rollback (firmware/rollback.py): the running
    release, the one before it, and versions whose health check failed. Unknown keys are kept."""
    path = target.board_path(layout.state)
    raw = target.read_file(path)
    try:
        state = json.loads(raw) if raw else {}
    except ValueError:
        state = {}
    state = state if isinstance(state, dict) else {}
    failed_list = [v for v in state.get("failed", []) if isinstance(v, str) and v != current]
    if failed and failed not in failed_list:
        failed_list.append(failed)
    state.update(current=current, failed=failed_list)
    if failed is None:
        state["previous"] = previous
    target.write_file(path, json.dumps(state, indent=2, sort_keys=True).encode() + b"\n")


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
    the running release to the one installed before it. Returns a sentence saying what was done."""
    layout = BoardLayout()
    pending_path = target.board_path(layout.pending)
    if service:
        _systemctl(target, systemctl, "stop", service)
    raw = target.read_file(pending_path)
    if raw is not None:
        pending = json.loads(raw)
        _switch_back(target, layout, pending["candidate"], pending.get("previous"), pending.get("config_backup"))
        message = (f"interrupted install of {pending['candidate']} undone; running {pending.get('previous') or 'no release'}")
    else:
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
    pinned = target.read_file(target.board_path(layout.release_pubkey))
    return {
        "current": _current_version(target, layout),
        "releases": sorted(name for name in releases if not name.startswith(".")),
        "pending": target.exists(target.board_path(layout.pending)),
        "release_key": pinned.decode("ascii", "replace").strip() if pinned else None,
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
                          python_version=args.python_version, progress=Progress())
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
                         systemctl=args.systemctl, progress=Progress(), out=sys.stdout)
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
    service_args(p)
    add_target_arguments(p)
    p.set_defaults(func=_run(cmd_install))

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
