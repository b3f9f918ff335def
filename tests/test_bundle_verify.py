"""The board's own bundle check (firmware/bundle.py, `dgc release verify`) on a real directory
laid out as a board: the pinned key, another key, a revoked key, a downgrade, the journal's
schema version (a real journal made by firmware.journal), and key rotation and revocation.

The bundles here are small (stand-in wheel files: nothing is installed); their manifests and
signatures are real, made the way `dgc-host flash build` makes them. hil_tests/test_flash.py
does the same with real bundles over a real sshd.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from firmware import bundle
from firmware.bundle import (BundleRefused, REVOCATION_DOMAIN, REVOCATION_FORMAT, ROTATION_DOMAIN, ROTATION_FORMAT,
                             TrustStore, canonical, manifest_digest, sign_statement, verify_on_board)
from firmware.journal import Journal
from firmware.keystore import generate_key_file

KIND = "sim-pi"
_SCRIPT = Path(sys.executable).parent / "dgc"
DGC = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "firmware.cli"]


def make_bundle(where: Path, version: str, key, *, schemas: list[int] | None = None, kinds=(KIND,)) -> Path:
    out = where / f"dgc-{version}"
    (out / "wheels").mkdir(parents=True)
    (out / "wheels" / f"dgc_firmware-{version}-py3-none-any.whl").write_bytes(f"firmware {version}".encode())
    (out / "wheels" / "pip-24.0-py3-none-any.whl").write_bytes(b"pip")
    files = sorted(p for p in out.rglob("*") if p.is_file())
    fields = {"format": bundle.BUNDLE_FORMAT, "version": version, "compatible": list(kinds), "created_at": 1,
              "requirement": f"dgc-firmware=={version}", "python": "3.11", "platforms": ["x"], "config": "",
              "installer": "wheels/pip-24.0-py3-none-any.whl", "release_key": key.public_key.hex(),
              "files": [{"path": p.relative_to(out).as_posix(), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                         "size": p.stat().st_size} for p in files]}
    if schemas is not None:
        fields["journal_schemas"] = schemas
    raw = canonical(fields)
    (out / "manifest.json").write_bytes(raw)
    (out / "manifest.sig").write_text(key.sign_digest(manifest_digest(raw)).hex() + "\n")
    return out


@pytest.fixture
def keys(tmp_path):
    return {name: generate_key_file(tmp_path / f"{name}.key") for name in ("release", "other", "next")}


@pytest.fixture
def board(tmp_path, keys):
    """A board root with the release key pinned, a config (kind, state dir) and 2.0.0 running."""
    root = tmp_path / "board"
    (root / "etc/dgc").mkdir(parents=True)
    (root / "etc/dgc/release-pubkey.hex").write_text(keys["release"].public_key.hex() + "\n")
    state = root / "var/lib/dgc"
    (root / "etc/dgc/board.toml").write_text(f'[board]\nname = "house-1"\nkind = "{KIND}"\nstate_dir = "{state}"\n')
    (root / "opt/dgc/releases/2.0.0").mkdir(parents=True)
    (root / "opt/dgc/current").symlink_to("releases/2.0.0")
    return root


def verify(root: Path, path: Path, **kw):
    return verify_on_board(root, path, installed=False, **kw)


def test_a_bundle_signed_by_the_pinned_key_verifies_another_key_is_refused(tmp_path, board, keys):
    manifest, line = verify(board, make_bundle(tmp_path, "2.1.0", keys["release"]))
    assert manifest.version == "2.1.0" and "board verified bundle 2.1.0" in line and "coincurve" in line
    with pytest.raises(BundleRefused, match="signature does not verify against the release key pinned"):
        verify(board, make_bundle(tmp_path / "o", "2.1.0", keys["other"]))
    # One byte of a file changed after signing.
    tampered = make_bundle(tmp_path / "t", "2.1.0", keys["release"])
    wheel = tampered / "wheels" / "dgc_firmware-2.1.0-py3-none-any.whl"
    wheel.write_bytes(b"X" + wheel.read_bytes()[1:])
    with pytest.raises(BundleRefused, match="dgc_firmware-2.1.0-py3-none-any.whl has sha256"):
        verify(board, tampered)
    with pytest.raises(BundleRefused, match=r"this board is 'sim-pi'"):
        verify(board, make_bundle(tmp_path / "k", "2.1.0", keys["release"], kinds=("rpi4-sdm630",)))


def test_a_downgrade_is_refused_unless_forced(tmp_path, board, keys):
    older = make_bundle(tmp_path, "1.9.0", keys["release"])
    with pytest.raises(BundleRefused, match="older than the running 2.0.0: a downgrade.*--force-downgrade"):
        verify(board, older)
    manifest, _ = verify(board, older, allow_downgrade=True)
    assert manifest.version == "1.9.0"
    with pytest.raises(BundleRefused, match="already the running release"):
        verify(board, make_bundle(tmp_path / "s", "2.0.0", keys["release"]))
    verify(board, make_bundle(tmp_path / "n", "2.10.0", keys["release"]))  # 2.10 > 2.0: numbers compare as numbers


def test_the_journal_schema_must_be_one_the_release_reads(tmp_path, board, keys):
    state_dir = board / "var/lib/dgc"
    Journal(state_dir / "journal.sqlite3").close()  # the firmware's own journal, at its current schema
    from firmware.journal import SCHEMA_VERSION

    _, line = verify(board, make_bundle(tmp_path / "a", "2.1.0", keys["release"], schemas=[SCHEMA_VERSION]))
    assert f"journal schema {SCHEMA_VERSION}" in line
    with pytest.raises(BundleRefused, match=rf"reads journal schema\(s\) {SCHEMA_VERSION + 1}; .* is schema {SCHEMA_VERSION}"):
        verify(board, make_bundle(tmp_path / "b", "2.2.0", keys["release"], schemas=[SCHEMA_VERSION + 1]))
    # A journal migrated to a newer schema than a release knows.
    with sqlite3.connect(state_dir / "journal.sqlite3") as db:
        db.execute("UPDATE meta SET value = 7 WHERE key = 'schema_version'")
    with pytest.raises(BundleRefused, match="is schema 7"):
        verify(board, make_bundle(tmp_path / "c", "2.3.0", keys["release"]))  # no field: reads schema 1 only
    (state_dir / "journal.sqlite3").write_bytes(b"not a database at all, " * 100)
    with pytest.raises(BundleRefused, match="schema version unreadable|cannot open"):
        verify(board, make_bundle(tmp_path / "d", "2.4.0", keys["release"]))


def test_the_stdlib_schema_reader_agrees_with_the_journal(tmp_path):
    from firmware.journal import SCHEMA_VERSION
    from firmware.rollback import journal_schema_version

    Journal(tmp_path / "j.sqlite3").close()
    assert journal_schema_version(tmp_path / "j.sqlite3") == SCHEMA_VERSION
    assert journal_schema_version(tmp_path / "none.sqlite3") is None
    try:
        from firmware.journal import read_schema_version  # helper A1's reader, once it exists
    except ImportError:
        return
    assert read_schema_version(tmp_path / "j.sqlite3") == journal_schema_version(tmp_path / "j.sqlite3")


def rotation(old, new, generation: int) -> bytes:
    return json.dumps(sign_statement(ROTATION_DOMAIN, {"format": ROTATION_FORMAT, "old": old.public_key.hex(),
                                                        "new": new.public_key.hex(), "generation": generation}, old)).encode()


def revocation(revoked_pub: bytes, signer) -> bytes:
    return json.dumps(sign_statement(REVOCATION_DOMAIN, {"format": REVOCATION_FORMAT, "revoked": revoked_pub.hex()},
                                     signer)).encode()


def test_rotation_signed_by_the_old_key_pins_the_new_one_and_cannot_be_replayed(tmp_path, board, keys):
    old, new, other = keys["release"], keys["next"], keys["other"]
    with pytest.raises(BundleRefused, match="does not verify against the pinned key"):
        forged = json.loads(rotation(old, new, 1))
        forged["signature"] = json.loads(rotation(other, new, 1))["signature"]
        TrustStore.load(board).rotate(json.dumps(forged).encode())
    with pytest.raises(BundleRefused, match="rotates from"):
        TrustStore.load(board).rotate(rotation(other, new, 1))  # signed by a key the board does not pin
    message = TrustStore.load(board).rotate(rotation(old, new, 1))
    assert new.public_key.hex() in message
    assert (board / "etc/dgc/release-pubkey.hex").read_text().strip() == new.public_key.hex()
    verify(board, make_bundle(tmp_path / "n", "2.1.0", new))
    with pytest.raises(BundleRefused, match="signature does not verify"):
        verify(board, make_bundle(tmp_path / "o", "2.1.0", old))
    # Back to the old key with an old statement, or a new one of a lower generation: refused.
    with pytest.raises(BundleRefused, match="generation 1; expected more than the board's 1"):
        TrustStore.load(board).rotate(rotation(new, old, 1))
    record = json.loads((board / "etc/dgc/release-keys.json").read_text())
    assert record["generation"] == 1 and record["history"][0]["to"] == new.public_key.hex()


def test_revocation_by_the_key_itself_or_the_pinned_key(tmp_path, board, keys):
    release, other, new = keys["release"], keys["other"], keys["next"]
    with pytest.raises(BundleRefused, match="verifies neither"):
        TrustStore.load(board).revoke(revocation(new.public_key, other))
    assert "revoked release key" in TrustStore.load(board).revoke(revocation(new.public_key, release))  # by the pinned key
    with pytest.raises(BundleRefused, match="the new key .* is revoked"):
        TrustStore.load(board).rotate(rotation(release, new, 1))
    message = TrustStore.load(board).revoke(revocation(release.public_key, release))  # the pinned key burns itself
    assert "nothing is accepted until a new key is pinned" in message
    with pytest.raises(BundleRefused, match="pinned release key .* is revoked"):
        verify(board, make_bundle(tmp_path, "2.1.0", release))
    with pytest.raises(BundleRefused, match="is revoked"):
        TrustStore.load(board).rotate(rotation(release, other, 5))  # a revoked key cannot sign its successor


def test_dgc_release_verify_is_one_line_and_exit_2_and_never_prints_a_secret(tmp_path, board, keys):
    good = make_bundle(tmp_path / "g", "2.1.0", keys["release"])
    r = subprocess.run([*DGC, "release", "verify", str(good), "--root", str(board), "--not-installed"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("board verified bundle 2.1.0"), r.stderr
    bad = make_bundle(tmp_path / "b", "2.1.0", keys["other"])
    r = subprocess.run([*DGC, "release", "verify", str(bad), "--root", str(board), "--not-installed"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "refused" in r.stderr and "another key" in r.stderr
    statement = tmp_path / "rotation.json"
    statement.write_bytes(rotation(keys["release"], keys["next"], 1))
    r = subprocess.run([*DGC, "release", "rotate-key", str(statement), "--root", str(board)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    secrets = [(tmp_path / f"{n}.key").read_text().split()[-1] for n in ("release", "other", "next")]
    for secret in secrets:
        assert len(secret) == 64
        for text in (r.stdout, r.stderr, statement.read_text()):
            assert secret not in text
