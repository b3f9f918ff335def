"""`dgc-host flash`, power cuts: the installer killed after each step of an install, and the boot
counter of a release whose health check never finishes; and the bundle checks before a local
board is touched. Real bundle, real sshd on 127.0.0.1, real `dgc selftest` against a bench house
and the bench ledger: hil_tests/flash_bench.py. The rest of the flash tests:
hil_tests/test_flash_install.py and hil_tests/test_flash_keys.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

# bench, release and sshd are fixtures: imported so that pytest finds them here
from .flash_bench import BOARD_PYTHON, KIND, REPO, FlashBench, bench, host_cli, killed_install, release, sshd  # noqa: F401


def test_bundles_are_checked_before_a_local_board_is_touched(tmp_path, release):
    board = tmp_path / "sdcard"
    board.mkdir()

    def install(bundle: Path) -> subprocess.CompletedProcess:
        return host_cli("flash", "install", str(bundle), str(board), "--board-kind", KIND, "--board-python", BOARD_PYTHON)

    r = install(release.bundle)
    assert r.returncode == 2 and "no release key is pinned" in r.stderr and "flash trust" in r.stderr
    assert list(board.iterdir()) == []

    r = host_cli("flash", "trust", str(board), "--release-pubkey", release.pub.read_text().strip())
    assert r.returncode == 0, r.stderr
    r = host_cli("flash", "trust", str(board), "--release-pubkey", str(release.other_key) + ".pub")
    assert r.returncode == 2 and "pins another release key" in r.stderr and "--replace" in r.stderr

    extra = tmp_path / "extra"
    shutil.copytree(release.bundle, extra)
    (extra / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"not signed")
    before = sorted(str(p) for p in board.rglob("*"))
    r = install(extra)
    assert r.returncode == 2 and "evil-1.0-py3-none-any.whl is not in the manifest" in r.stderr
    r = install(release.bundle)  # signed, fine, but neither it nor the board has a config
    assert r.returncode == 2 and "neither the bundle nor" in r.stderr
    assert sorted(str(p) for p in board.rglob("*")) == before

    r = host_cli("flash", "build", "--config", str(REPO / "board_configs" / "sim.toml"), "--release-key", str(release.key),
                 "--wheels-from", str(release.bundle), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "expected an absolute path" in r.stderr
    r = host_cli("flash", "build", "--version", "../x", "--board-kind", KIND, "--release-key", str(release.key),
                 "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "--version" in r.stderr


# A power cut at each step of an install: the installer is killed (its whole process group, so
# the SSH connection dies with it) right after the step, exactly where a power cut would leave
# the board (every board write is fsynced and atomic); then the board "boots": its boot check
# runs as dgc-boot-check.service runs it. The table records what the board runs afterwards.

def test_a_power_cut_at_each_step_of_an_install(bench: FlashBench, capsys):
    from host_tools.flash import INSTALL_STEPS

    r = host_cli("flash", "trust", "--release-pubkey", str(bench.release.pub), *bench.ssh())
    assert r.returncode == 0, r.stderr
    built, v1 = bench.build("1.0.0", "--config", str(bench.config("good.toml")))
    assert built.returncode == 0, built.stderr
    r = bench.install(v1, "--board-kind", KIND)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (bench.root / "opt/dgc/boot/boot_check.py").is_file() and (bench.root / "opt/dgc/boot/rollback.py").is_file()

    bad_config = bench.config("bad.toml", port=f"{bench.root}/dev/no-such-rs485")
    rows = []
    # (step after which the power goes, release config, what the board must run after booting)
    cases = [(step, "good", "old" if INSTALL_STEPS.index(step) < INSTALL_STEPS.index("switched") else "new")
             for step in INSTALL_STEPS]
    cases.insert(INSTALL_STEPS.index("switched") + 1, ("switched", "bad", "old"))
    minor = 0
    for step, config, expected in cases:
        minor += 1
        version = f"1.{minor}.0"
        built, bundle = bench.build(version, "--config", str(bench.config("good.toml") if config == "good" else bad_config))
        assert built.returncode == 0, built.stderr
        before = bench.running()
        killed_install(bench, bundle, step)
        pending = (bench.root / "opt/dgc/pending.json").exists()
        outcome = bench.boot()
        after = bench.running()
        assert after == (before if expected == "old" else version), (step, config, outcome)
        assert not (bench.root / "opt/dgc/pending.json").exists()
        assert bench.healthy(), f"after a cut at {step} the board runs {after}, whose health check fails"
        state = json.loads((bench.root / "opt/dgc/state.json").read_text())
        assert state["current"] == after
        if config == "bad":
            assert version in state["failed"] and not (bench.root / f"opt/dgc/releases/{version}").exists()
        rows.append((step, "fails its check" if config == "bad" else "passes", "yes" if pending else "no",
                     outcome["outcome"], f"{after} ({'new' if after == version else 'old'})"))
    # The board is not wedged: a normal install still goes through.
    built, last = bench.build("2.0.0", "--config", str(bench.config("good.toml")))
    r = bench.install(last)
    assert r.returncode == 0 and bench.running() == "2.0.0", r.stdout + r.stderr

    table = ["| power cut after step | new release's health check | pending.json at boot | boot check | board runs after boot |",
             "|---|---|---|---|---|"] + [f"| {' | '.join(row)} |" for row in rows]
    with capsys.disabled():
        print("\n" + "\n".join(table))
    (bench.work.parent / "power-cut-table.md").write_text("\n".join(table) + "\n")


def test_boot_counter_rolls_back_a_release_whose_check_never_finishes(bench: FlashBench):
    """Power cut DURING the health check, at every boot: the check is killed (process group) once
    it has started; after --max-boot-attempts boots the release is rolled back without running."""
    r = host_cli("flash", "trust", "--release-pubkey", str(bench.release.pub), *bench.ssh())
    assert r.returncode == 0, r.stderr
    built, v1 = bench.build("1.0.0", "--config", str(bench.config("good.toml")))
    assert bench.install(v1, "--board-kind", KIND).returncode == 0
    built, v2 = bench.build("1.1.0", "--config", str(bench.config("good.toml")))
    killed_install(bench, v2, "switched")
    pending_path = bench.root / "opt/dgc/pending.json"
    limit = json.loads(pending_path.read_text())["max_boot_attempts"]
    assert limit == 3
    for n in range(1, limit + 1):
        proc = subprocess.Popen([BOARD_PYTHON, "-I", str(bench.root / "opt/dgc/boot/boot_check.py"), "--root", str(bench.root)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while json.loads(pending_path.read_text()).get("boot_attempts") != n:  # counted, the check is starting
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert bench.running() == "1.1.0"
    outcome = bench.boot()
    assert outcome["outcome"] == "rolled_back" and "did not finish its health check in 3 boot(s)" in outcome["reason"]
    assert bench.running() == "1.0.0" and bench.healthy()
