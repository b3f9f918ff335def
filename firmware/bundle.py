"""Release bundles as the BOARD checks them: signature against the pinned release key, every
file, board kind, downgrade, journal schema; and the release key's rotation and revocation.

Why this lives in the firmware: the engineer's laptop is not the authority over what a board
runs (RAUC's and Mender's rule: the device verifies). `dgc-host flash install` uploads the
bundle beside the running release and then asks the board's *running* release - code that was
itself verified and health-checked - to run `dgc release verify` on what arrived. The laptop's
own check of the same rules (host_tools/flash.py imports this module) only refuses early,
before the upload. The signature is verified with coincurve (libsecp256k1), already a board
dependency.

The first install on a bare board has no running release, so nothing on the board can verify
it yet: that install is trust-on-first-use, exactly like writing the SD card (docs/flashing.md).

Trust store on the board (all under the board root):

    /etc/dgc/release-pubkey.hex   the one key whose bundles are accepted (66 hex)
    /etc/dgc/release-keys.json    {"generation": N, "revoked": [hex, ...], "history": [...]}

Rotation: a statement {"format": ROTATION_FORMAT, "old": hex, "new": hex, "generation": N}
signed by the OLD key; the board accepts it only when ``old`` is the pinned key, neither key is
revoked, and ``generation`` is higher than the board's (so an old statement cannot be replayed
to go back). Revocation: {"format": REVOCATION_FORMAT, "revoked": hex} signed by the revoked key
itself (whoever holds a key may always burn it) or by the pinned key. A board whose pinned key
is revoked accepts nothing until an engineer pins a new key by hand (`dgc-host flash trust
--replace`, root on the board): a revoked key cannot sign its own successor.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .rollback import (DEFAULT_JOURNAL_SCHEMAS, JournalUnreadable, journal_schema_version, read_json, version_key,
                       write_json)

BUNDLE_FORMAT = "dgc-bundle-v1"
SIGN_DOMAIN = b"DGC-BUNDLE-v1\0"
ROTATION_FORMAT = "dgc-release-key-rotation-v1"
ROTATION_DOMAIN = b"DGC-KEY-ROTATION-v1\0"
REVOCATION_FORMAT = "dgc-release-key-revocation-v1"
REVOCATION_DOMAIN = b"DGC-KEY-REVOCATION-v1\0"
MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
MAX_MANIFEST_BYTES = 1 << 20
MAX_STATEMENT_BYTES = 4096
NAME_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")  # versions and board kinds: safe as a directory name
FIRMWARE_WHEEL = re.compile(r"^dgc_firmware-([^-]+)-.*\.whl$")
PIP_WHEEL = re.compile(r"^pip-[^-]+-py3-none-any\.whl$")
PUBKEY_PATH = "/etc/dgc/release-pubkey.hex"
KEYS_PATH = "/etc/dgc/release-keys.json"
CONFIG_PATH = "/etc/dgc/board.toml"
DGC_DIR = "/opt/dgc"


class BundleRefused(Exception):
    """The bundle, statement or input is not acceptable (exit 2); nothing was changed."""


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

    @property
    def journal_schemas(self) -> list[int]:
        """The journal schema versions this release can read (bundles from before the field: [1])."""
        return list(self.fields.get("journal_schemas", DEFAULT_JOURNAL_SCHEMAS))


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
    schemas = fields.get("journal_schemas", list(DEFAULT_JOURNAL_SCHEMAS))
    if not isinstance(schemas, list) or not schemas or not all(type(v) is int and v > 0 for v in schemas):
        raise BundleRefused(f"{MANIFEST}: journal_schemas {schemas!r}; expected a non-empty list of positive integers "
                            "(the journal schema versions the release can read)")
    return Manifest(raw=raw, fields=fields)


# --------------------------------------------------------------------------- signatures and keys

def parse_pubkey(text: str, where: str) -> bytes:
    """A release key: 66 hex characters (compressed secp256k1 point)."""
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


def _verify(domain: bytes, raw: bytes, signature_hex: str, pubkey: bytes) -> bool:
    from .messages import verify_signature

    if not re.fullmatch(r"[0-9a-f]{128}", signature_hex):
        return False
    # verify_signature hashes its payload once: sha256(domain + raw) is the signed digest.
    return verify_signature(domain + raw, bytes.fromhex(signature_hex), pubkey, backend="coincurve")


def sign_statement(domain: bytes, fields: dict, key) -> dict:
    """A signed statement as stored in a file: the canonical payload and its signature (hex)."""
    raw = canonical(fields)
    return {"payload": raw.decode("ascii"), "signature": key.sign_digest(hashlib.sha256(domain + raw).digest()).hex()}


def read_statement(data: bytes, where: str) -> tuple[bytes, dict, str]:
    if len(data) > MAX_STATEMENT_BYTES:
        raise BundleRefused(f"{where}: larger than {MAX_STATEMENT_BYTES} bytes; expected a key statement")
    try:
        outer = json.loads(data.decode("utf-8"))
        raw = outer["payload"].encode("ascii")
        fields = json.loads(raw)
        signature = outer["signature"]
    except (UnicodeError, ValueError, KeyError, TypeError, AttributeError):
        raise BundleRefused(f"{where}: expected a JSON object {{payload, signature}} written by dgc-host flash") from None
    if not isinstance(fields, dict) or canonical(fields) != raw or not isinstance(signature, str):
        raise BundleRefused(f"{where}: the payload is not a canonical JSON object")
    return raw, fields, signature


@dataclass(frozen=True)
class TrustStore:
    """What the board trusts: the pinned key, the revoked keys, and the rotation generation."""

    root: Path
    pinned: bytes | None
    generation: int
    revoked: frozenset[str]
    record: dict

    @classmethod
    def load(cls, root: Path) -> "TrustStore":
        root = Path(root)
        pub = board_file(root, PUBKEY_PATH)
        pinned = parse_pubkey(pub.read_text(encoding="ascii", errors="replace"), str(pub)) if pub.exists() else None
        record, warning = read_json(board_file(root, KEYS_PATH))
        if warning:  # a damaged record must not make a revoked key good again
            raise BundleRefused(f"{warning}; expected the board's key record: fix it by hand")
        revoked = frozenset(v for v in record.get("revoked", []) if isinstance(v, str))
        generation = record.get("generation", 0)
        return cls(root=root, pinned=pinned, generation=generation if type(generation) is int else 0, revoked=revoked,
                   record=record)

    def signing_key(self) -> bytes:
        """The key a bundle must be signed by; refuses when none is usable."""
        if self.pinned is None:
            raise BundleRefused(f"no release key is pinned on the board ({PUBKEY_PATH}); expected one: dgc-host flash trust")
        if self.pinned.hex() in self.revoked:
            raise BundleRefused(f"the pinned release key {self.pinned.hex()[:16]}... is revoked; expected a new key pinned by "
                                "an engineer (dgc-host flash trust --replace)")
        return self.pinned

    def _save(self, record: dict, pinned: bytes | None = None) -> None:
        write_json(board_file(self.root, KEYS_PATH), record)
        if pinned is not None:
            path = board_file(self.root, PUBKEY_PATH)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(pinned.hex() + "\n", encoding="ascii")
            os.chmod(tmp, 0o644)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)

    def rotate(self, data: bytes, where: str = "rotation statement") -> str:
        raw, fields, signature = read_statement(data, where)
        if fields.get("format") != ROTATION_FORMAT:
            raise BundleRefused(f"{where}: format {fields.get('format')!r}; expected {ROTATION_FORMAT!r}")
        old = parse_pubkey(str(fields.get("old", "")), f"{where}: old")
        new = parse_pubkey(str(fields.get("new", "")), f"{where}: new")
        generation = fields.get("generation")
        pinned = self.signing_key()
        if old != pinned:
            raise BundleRefused(f"{where}: rotates from {old.hex()[:16]}...; the board pins {pinned.hex()[:16]}...")
        if new.hex() in self.revoked:
            raise BundleRefused(f"{where}: the new key {new.hex()[:16]}... is revoked on this board")
        if type(generation) is not int or generation <= self.generation:
            raise BundleRefused(f"{where}: generation {generation!r}; expected more than the board's {self.generation} "
                                "(an old statement cannot be replayed)")
        if not _verify(ROTATION_DOMAIN, raw, signature, old):
            raise BundleRefused(f"{where}: the signature does not verify against the pinned key {old.hex()[:16]}...")
        history = [h for h in self.record.get("history", []) if isinstance(h, dict)]
        record = dict(self.record, generation=generation, history=history + [{"rotated": old.hex(), "to": new.hex(),
                                                                             "generation": generation}])
        self._save(record, pinned=new)
        return f"rotated the release key: {old.hex()[:16]}... -> {new.hex()} (generation {generation})"

    def revoke(self, data: bytes, where: str = "revocation statement") -> str:
        raw, fields, signature = read_statement(data, where)
        if fields.get("format") != REVOCATION_FORMAT:
            raise BundleRefused(f"{where}: format {fields.get('format')!r}; expected {REVOCATION_FORMAT!r}")
        revoked = parse_pubkey(str(fields.get("revoked", "")), f"{where}: revoked")
        signers = [revoked] + ([self.pinned] if self.pinned and self.pinned.hex() not in self.revoked else [])
        if not any(_verify(REVOCATION_DOMAIN, raw, signature, key) for key in signers):
            raise BundleRefused(f"{where}: the signature verifies neither against the revoked key itself nor against the "
                                "pinned key")
        if revoked.hex() in self.revoked:
            return f"release key {revoked.hex()[:16]}... was already revoked"
        record = dict(self.record, revoked=sorted(self.revoked | {revoked.hex()}))
        self._save(record)
        pinned_note = "; it was the pinned key: nothing is accepted until a new key is pinned" if revoked == self.pinned else ""
        return f"revoked release key {revoked.hex()}{pinned_note}"


# --------------------------------------------------------------------------- bundles

def board_file(root: Path, board_path: str) -> Path:
    return Path(root) / board_path.lstrip("/")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_bundle(bundle: Path, release_pubkey: bytes, *, revoked: frozenset[str] = frozenset(),
                  extra_files: frozenset[str] = frozenset()) -> Manifest:
    """Signature (against ``release_pubkey``), shape, and every file's size and sha256.

    ``extra_files``: top-level names allowed besides the signed files (an installed release
    directory also holds venv/, board.toml, installed.json). Raises BundleRefused naming the
    first problem. Reads only the bundle directory."""
    bundle = Path(bundle)
    if release_pubkey.hex() in revoked:
        raise BundleRefused(f"the release key {release_pubkey.hex()[:16]}... is revoked")
    manifest_path, signature_path = bundle / MANIFEST, bundle / SIGNATURE
    if not manifest_path.is_file() or not signature_path.is_file():
        raise BundleRefused(f"{bundle}: not a DGC bundle; expected a directory with {MANIFEST} and {SIGNATURE} (dgc-host flash build)")
    raw = manifest_path.read_bytes()
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleRefused(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES} bytes")
    text = signature_path.read_text(encoding="ascii", errors="replace").strip()
    if not re.fullmatch(r"[0-9a-f]{128}", text):
        raise BundleRefused(f"{signature_path}: expected 128 lowercase hex characters (a compact secp256k1 signature)")
    if not _verify(SIGN_DOMAIN, raw, text, release_pubkey):
        raise BundleRefused(f"{bundle}: the signature does not verify against the release key pinned on the board "
                            f"({release_pubkey.hex()[:16]}...): the manifest was altered after signing, or another key signed it")
    manifest = parse_manifest(raw)
    listed = {entry["path"] for entry in manifest.files}
    present = set()
    for path in bundle.rglob("*"):
        rel = path.relative_to(bundle).as_posix()
        if rel.split("/")[0] in extra_files:
            continue
        if path.is_file() or path.is_symlink():
            present.add(rel)
    unlisted = sorted(present - listed - {MANIFEST, SIGNATURE})
    if unlisted:
        raise BundleRefused(f"{bundle}: file {unlisted[0]} is not in the manifest; expected only the signed files")
    for entry in manifest.files:
        path = bundle / entry["path"]
        if path.is_symlink() or not path.is_file():
            raise BundleRefused(f"{bundle}: {entry['path']} is missing (or not a regular file); the manifest lists it")
        size = path.stat().st_size
        digest = sha256_file(path)
        if size != entry["size"] or digest != entry["sha256"]:
            raise BundleRefused(f"{bundle}: {entry['path']} has sha256 {digest[:16]}... ({size} bytes); the signed manifest "
                                f"says {entry['sha256'][:16]}... ({entry['size']} bytes): the file was altered or damaged")
    return manifest


def check_downgrade(new: str, running: str | None, *, allow_downgrade: bool) -> None:
    """A release older than the running one is refused unless forced (a downgrade may bring back
    a fixed security hole, or be a replay of an old signed bundle)."""
    if running is None:
        return
    if new == running:
        raise BundleRefused(f"version {new} is already the running release; expected a bundle built with a new --version")
    if version_key(new) < version_key(running) and not allow_downgrade:
        raise BundleRefused(f"version {new} is older than the running {running}: a downgrade; expected a newer release, "
                            "or --force-downgrade if you mean it")


def check_journal(manifest: Manifest, journal: Path | None) -> int | None:
    """The board's journal must be of a schema version the release can read. Returns the version
    (None: no journal yet). A journal that exists but cannot be read refuses the switch too."""
    if journal is None:
        return None
    try:
        version = journal_schema_version(journal)
    except JournalUnreadable as exc:
        raise BundleRefused(f"{exc}; expected a journal whose schema version can be checked before switching") from None
    if version is not None and version not in manifest.journal_schemas:
        raise BundleRefused(f"release {manifest.version} reads journal schema(s) {', '.join(map(str, manifest.journal_schemas))}; "
                            f"the board's journal {journal} is schema {version}: switching would run it on a journal it "
                            "cannot read")
    return version


def running_version(root: Path, dgc_dir: str = DGC_DIR) -> str | None:
    current = board_file(root, dgc_dir) / "current"
    if not current.is_symlink():
        return None
    return os.readlink(current).rstrip("/").split("/")[-1]


def board_facts(root: Path, config: str = CONFIG_PATH) -> tuple[str | None, Path | None]:
    """(board kind, journal path) from the board's running config, if it has one."""
    path = board_file(root, config)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BundleRefused(f"{path}: the board's config cannot be read ({exc}); cannot tell the board's kind") from None
    board = data.get("board", {}) if isinstance(data.get("board"), dict) else {}
    state_dir = board.get("state_dir")
    journal = Path(state_dir) / "journal.sqlite3" if isinstance(state_dir, str) and state_dir.startswith("/") else None
    return str(board.get("kind", "sim")), journal


def verify_on_board(root: Path, bundle: Path, *, board_kind: str | None = None, allow_downgrade: bool = False,
                    installed: bool = True) -> tuple[Manifest, str]:
    """Everything the board checks before a switch to ``bundle`` (an uploaded release directory
    when ``installed``). Returns the manifest and one line saying what was verified."""
    store = TrustStore.load(root)
    key = store.signing_key()
    extra = frozenset({"venv", "board.toml", "installed.json"}) if installed else frozenset()
    manifest = verify_bundle(bundle, key, revoked=store.revoked, extra_files=extra)
    config_kind, journal = board_facts(root)
    if config_kind and board_kind and config_kind != board_kind:
        raise BundleRefused(f"--board-kind {board_kind}: the board's config says [board] kind = {config_kind!r}")
    kind = config_kind or board_kind
    if kind is None:
        raise BundleRefused("the board has no config to tell its kind; expected --board-kind")
    if kind not in manifest.compatible:
        raise BundleRefused(f"bundle {manifest.version} is for board kind(s) {', '.join(manifest.compatible)}; this board is {kind!r}")
    running = running_version(root)
    check_downgrade(manifest.version, running, allow_downgrade=allow_downgrade)
    schema = check_journal(manifest, journal)
    schema_note = f"journal schema {schema}" if schema is not None else "no journal yet"
    return manifest, (f"board verified bundle {manifest.version}: signature by the pinned key {key.hex()[:16]}... "
                      f"(coincurve), {len(manifest.files)} files, kind {kind}, {schema_note}, running {running or 'nothing'}")
