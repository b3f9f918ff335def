"""`dgc-host flash` release keys over a real sshd: rotation by a statement the old key signed,
a forged or replayed statement refused, revocation; no secret crosses to the board.
hil_tests/flash_bench.py has the bench.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from host_tools.flash import BundleRefused, install

# bench, release and sshd are fixtures: imported so that pytest finds them here
from .flash_bench import KIND, FlashBench, bench, host_cli, release, sshd  # noqa: F401


def test_release_key_rotation_and_revocation_over_ssh(bench: FlashBench, tmp_path):
    """Rotate: a statement signed by the old key pins the new one on the board (checked by the
    board); bundles of the old key are refused from then on. Revoke: the board refuses the key."""
    r = host_cli("flash", "trust", "--release-pubkey", str(bench.release.pub), *bench.ssh())
    built, v1 = bench.build("1.0.0", "--config", str(bench.config("good.toml")))
    assert bench.install(v1, "--board-kind", KIND).returncode == 0
    new_key = tmp_path / "new.key"
    assert host_cli("flash", "keygen", "--out", str(new_key)).returncode == 0
    statement = tmp_path / "rotate.json"
    forged = tmp_path / "forged.json"
    r = host_cli("flash", "sign-key-statement", "rotate", "--release-key", str(bench.release.other_key), "--new-pubkey",
                 f"{new_key}.pub", "--generation", "1", "--out", str(forged))
    assert r.returncode == 0, r.stderr
    r = host_cli("flash", "apply-key-statement", str(forged), *bench.ssh())
    assert r.returncode == 2 and "the board refused the statement" in r.stderr and "rotates from" in r.stderr, r.stderr
    r = host_cli("flash", "sign-key-statement", "rotate", "--release-key", str(bench.release.key), "--new-pubkey",
                 f"{new_key}.pub", "--generation", "1", "--out", str(statement))
    assert r.returncode == 0, r.stderr
    r = host_cli("flash", "apply-key-statement", str(statement), *bench.ssh())
    assert r.returncode == 0 and "rotated the release key" in r.stdout, r.stderr
    assert (bench.root / "etc/dgc/release-pubkey.hex").read_text().strip() == Path(f"{new_key}.pub").read_text().strip()
    r = host_cli("flash", "apply-key-statement", str(statement), *bench.ssh())  # a replay: the old key is no longer pinned
    assert r.returncode == 2 and "rotates from" in r.stderr and "the board pins" in r.stderr, r.stderr

    built, by_old = bench.build("1.1.0", "--config", str(bench.config("good.toml")))
    r = bench.install(by_old)
    assert r.returncode == 2 and "signature does not verify" in r.stderr
    built, by_new = bench.build("1.2.0", "--config", str(bench.config("good.toml")), key=new_key)
    r = bench.install(by_new)
    assert r.returncode == 0 and bench.running() == "1.2.0", r.stdout + r.stderr

    revocation = tmp_path / "revoke.json"
    assert host_cli("flash", "sign-key-statement", "revoke", "--release-key", str(new_key), "--out", str(revocation)).returncode == 0
    r = host_cli("flash", "apply-key-statement", str(revocation), *bench.ssh())
    assert r.returncode == 0 and "nothing is accepted until a new key is pinned" in r.stdout, r.stderr
    built, after = bench.build("1.3.0", "--config", str(bench.config("good.toml")), key=new_key)
    with bench.target() as target, pytest.raises(BundleRefused, match="the board refused the bundle: .*is revoked"):
        install(target, after, host_check=False)
    assert bench.running() == "1.2.0"
    for key in (bench.release.key, new_key):  # no secret crossed to the board or back
        secret = key.read_text().split()[-1]
        for path in (statement, revocation, bench.root / "etc/dgc/release-keys.json"):
            assert secret not in path.read_text()
