"""`dgc-host flash install`: a good release commits, a failing one rolls back by itself, damaged,
foreign, wrong-kind and older bundles are refused (by this machine and by the board), keep N and
a rollback by hand; a release that cannot read the board's journal is refused. Real bundle, real
sshd on 127.0.0.1, real `dgc selftest`: hil_tests/flash_bench.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib

import pytest

from host_tools.flash import BundleRefused, install

# bench, release and sshd are fixtures: imported so that pytest finds them here
from .flash_bench import KIND, TOKEN, FlashBench, bench, host_cli, release, selftest_lines, sshd  # noqa: F401


def test_good_then_failing_release_leaves_the_board_on_the_good_one(bench: FlashBench):
    r = host_cli("flash", "trust", "--release-pubkey", str(bench.release.pub), *bench.ssh())
    assert r.returncode == 0, r.stderr
    assert (bench.root / "etc/dgc/release-pubkey.hex").read_text().strip() == bench.release.pub.read_text().strip()

    built, v1 = bench.build("1.0.0", "--config", str(bench.config("good.toml")))
    assert built.returncode == 0, built.stderr
    # A bare board has no config: its kind must be said on the first install.
    r = bench.install(v1)
    assert r.returncode == 2 and "pass --board-kind" in r.stderr
    r = bench.install(v1, "--board-kind", KIND)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS meters" in r.stdout and "PASS dgr" in r.stdout and "not provisioned yet" in r.stdout
    assert bench.current() == "releases/1.0.0"
    assert os.readlink(bench.root / "etc/dgc/board.toml") == "../../opt/dgc/current/board.toml"
    assert (bench.root / "opt/dgc/current/venv/bin/dgc").exists()

    # Provision the flashed board through its own installed firmware (default --dgc path).
    r = host_cli("provision", *bench.ssh(), "--ledger", bench.ledger_url, "--operator-token", TOKEN)
    assert r.returncode == 0, r.stderr
    device_id = r.stdout.split()[1]

    built, v2 = bench.build("2.0.0", "--config", str(bench.config("good.toml")))
    assert built.returncode == 0, built.stderr
    r = bench.install(v2, "--keep", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "board verified bundle 2.0.0: signature by the pinned key" in r.stdout  # the board's own check, by 1.0.0
    lines = selftest_lines(r)
    assert [line.split(":")[0] for line in lines] == ["PASS config", "PASS key", "PASS meters", "PASS dgr", "PASS ledger",
                                                      "PASS clock", "PASS device"], lines
    assert f"device {device_id} is registered" in r.stdout
    assert bench.current() == "releases/2.0.0" and bench.releases() == {"1.0.0", "2.0.0"}
    # The board's identity was carried into the new release's config.
    assert tomllib.loads((bench.root / "etc/dgc/board.toml").read_text())["ledger"]["url"] == bench.ledger_url

    bad_config = bench.config("bad.toml", port=f"{bench.root}/dev/no-such-rs485")
    built, v3 = bench.build("3.0.0", "--config", str(bad_config))
    assert built.returncode == 0, built.stderr
    r = bench.install(v3)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "switched /opt/dgc/current: 2.0.0 -> 3.0.0" in r.stdout  # it really ran from the new release ...
    assert any(line.startswith("FAIL meters") and "no-such-rs485" in line for line in selftest_lines(r)), r.stdout
    assert "rolled back by itself to 2.0.0" in r.stdout  # ... and switched back by itself
    assert bench.current() == "releases/2.0.0" and bench.releases() == {"1.0.0", "2.0.0"}
    assert not (bench.root / "opt/dgc/pending.json").exists()
    state = json.loads((bench.root / "opt/dgc/state.json").read_text())
    assert state["current"] == "2.0.0" and "3.0.0" in state["failed"]
    # The board runs the good version: its own health check, run directly from `current`, passes.
    check = subprocess.run([str(bench.root / "opt/dgc/current/venv/bin/dgc"), "selftest", str(bench.root / "etc/dgc/board.toml")],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "no-such-rs485" not in (bench.root / "etc/dgc/board.toml").read_text()

    # Refusals: nothing on the board may change.
    before = bench.snapshot()
    tampered = bench.work / "tampered"
    shutil.copytree(v2, tampered)
    wheel = next((tampered / "wheels").glob("dgc_firmware-*.whl"))
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte
    wheel.write_bytes(bytes(data))
    r = bench.install(tampered)
    assert r.returncode == 2 and "refused" in r.stderr and wheel.name in r.stderr and "sha256" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1

    edited = bench.work / "edited-manifest"
    shutil.copytree(v2, edited)
    manifest = edited / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"version":"2.0.0"', b'"version":"2.0.9"'))
    r = bench.install(edited)
    assert r.returncode == 2 and "signature does not verify" in r.stderr, r.stderr

    built, other_kind = bench.build("4.0.0-other", "--board-kind", "rpi4-sdm630")
    assert built.returncode == 0, built.stderr
    r = bench.install(other_kind)
    assert r.returncode == 2 and "rpi4-sdm630" in r.stderr and f"this board is {KIND!r}" in r.stderr, r.stderr

    built, foreign = bench.build("4.0.0-foreign", "--config", str(bench.config("good.toml")), key=bench.release.other_key)
    assert built.returncode == 0, built.stderr
    r = bench.install(foreign)
    assert r.returncode == 2 and "signature does not verify" in r.stderr
    assert bench.snapshot() == before

    # A downgrade is refused unless forced (here and by the board).
    built, old = bench.build("1.5.0", "--config", str(bench.config("good.toml")))
    assert built.returncode == 0, built.stderr
    r = bench.install(old)
    assert r.returncode == 2 and "older than the running 2.0.0: a downgrade" in r.stderr and "--force-downgrade" in r.stderr
    assert bench.snapshot() == before

    # The board refuses by itself: this machine's check skipped, the foreign bundle uploaded, and
    # the board's running release (2.0.0, coincurve, its pinned key) says no; nothing is switched.
    with bench.target() as target, pytest.raises(BundleRefused, match="the board refused the bundle: .*another key signed it"):
        install(target, foreign, host_check=False)
    with bench.target() as target, pytest.raises(BundleRefused, match="the board refused the bundle: .*a downgrade"):
        install(target, old, host_check=False)
    after = bench.snapshot()
    before.pop("opt/dgc/releases"), after.pop("opt/dgc/releases")  # the directory's mtime: a release came and went
    assert after == before

    # Keep N: with --keep 1, installing 5.0.0 keeps 2.0.0 (the newest earlier one) and drops 1.0.0.
    built, v5 = bench.build("5.0.0", "--board-kind", KIND)  # no config in the bundle: the board keeps its own
    assert built.returncode == 0, built.stderr
    r = bench.install(v5, "--keep", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "removed old release(s) 1.0.0" in r.stdout
    assert bench.current() == "releases/5.0.0" and bench.releases() == {"2.0.0", "5.0.0"}

    # And back by hand.
    r = host_cli("flash", "rollback", *bench.ssh())
    assert r.returncode == 0 and "5.0.0 -> 2.0.0" in r.stdout, r.stderr
    r = host_cli("flash", "status", *bench.ssh())
    status = json.loads(r.stdout)
    assert status["current"] == "2.0.0" and status["provisioned"] is True and status["releases"] == ["2.0.0", "5.0.0"]


def test_a_release_that_cannot_read_the_journal_is_refused(bench: FlashBench):
    """The board's journal is at the firmware's schema; a release declaring it reads only a newer
    one is refused by the board before any switch; the rollback path applies the same rule."""
    from firmware.journal import SCHEMA_VERSION, Journal

    r = host_cli("flash", "trust", "--release-pubkey", str(bench.release.pub), *bench.ssh())
    built, v1 = bench.build("1.0.0", "--config", str(bench.config("good.toml")))
    assert bench.install(v1, "--board-kind", KIND).returncode == 0
    Journal(bench.root / "var/lib/dgc/journal.sqlite3").close()  # the daemon's journal, as it makes it
    built, newer = bench.build("1.1.0", "--config", str(bench.config("good.toml")), "--journal-schema", str(SCHEMA_VERSION + 1))
    with bench.target() as target, pytest.raises(BundleRefused, match=rf"is schema {SCHEMA_VERSION}: switching would run it"):
        install(target, newer, host_check=False)
    assert bench.running() == "1.0.0" and not (bench.root / "opt/dgc/releases/1.1.0").exists()
    state = json.loads((bench.root / "opt/dgc/state.json").read_text())
    assert state["journal"] == f"{bench.root}/var/lib/dgc/journal.sqlite3"  # the rollback unit reads it from here

    # A forced downgrade goes through (this machine and the board both accept --force-downgrade).
    built, older = bench.build("0.9.0", "--config", str(bench.config("good.toml")))
    r = bench.install(older)
    assert r.returncode == 2 and "a downgrade" in r.stderr
    r = bench.install(older, "--force-downgrade")
    assert r.returncode == 0 and "board verified bundle 0.9.0" in r.stdout and bench.running() == "0.9.0", r.stdout + r.stderr
