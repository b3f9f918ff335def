"""`dgc-host flash`: one real bundle (real wheels from the package index), installed over a real
sshd on 127.0.0.1 into a board directory, health-checked by the real `dgc selftest` against a
bench house (Modbus meters and DGR emulator on virtual serial lines) and the bench ledger.

Building with real wheels is the slow part, so the session builds ONE bundle; the variants are
built from its wheels with `flash build --wheels-from` (the real build path, re-hashed and
re-signed), and the damaged ones are copies with one byte changed. The failing release fails
honestly: its board config names a meter port that does not exist, so `dgc selftest` really
runs from the new release and really cannot read the meters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w

from host_tools.bench_ledger.app import LedgerSettings
from host_tools.flash import BundleRefused, install
from host_tools.target import SshOptions, SshTarget
from host_tools.bench_ledger.server import running_ledger
from host_tools.neighbourhood import ManagedProcess

from .board_rig import SshServer

REPO = Path(__file__).resolve().parents[1]
KIND = "sim-pi"
TOKEN = "flash-test-token"
LEDGER_ID = "flash-test-ledger"
BOARD_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"


def host_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "host_tools.cli", *args], capture_output=True, text=True, timeout=timeout,
                            cwd=REPO, stdin=subprocess.DEVNULL)
    assert "\r" not in result.stderr, "progress output must stay quiet when stderr is not a terminal"
    return result


@dataclass
class Release:
    key: Path
    pub: Path
    bundle: Path  # built with real wheels, no config
    other_key: Path


@pytest.fixture(scope="session")
def release(tmp_path_factory) -> Release:
    d = tmp_path_factory.mktemp("release")
    for name in ("release.key", "other.key"):
        r = host_cli("flash", "keygen", "--out", str(d / name))
        assert r.returncode == 0, r.stderr
    assert oct((d / "release.key").stat().st_mode & 0o777) == "0o600"
    r = host_cli("flash", "build", "--version", "0.0.1", "--board-kind", KIND, "--release-key", str(d / "release.key"),
                 "--out", str(d / "out"), timeout=900)
    assert r.returncode == 0, r.stderr
    bundle = d / "out" / "dgc-0.0.1"
    wheels = sorted(p.name for p in (bundle / "wheels").glob("*.whl"))
    assert any(w.startswith("dgc_firmware-") for w in wheels) and any(w.startswith("coincurve-") for w in wheels)
    assert any(w.startswith("pymodbus-3.16.1") for w in wheels)
    return Release(key=d / "release.key", pub=d / "release.key.pub", bundle=bundle, other_key=d / "other.key")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    with SshServer(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@dataclass
class FlashBench:
    """A board directory reached over a real sshd, a bench house (meters, DGR) and a bench ledger:
    what flashing needs. Not a HIL rig (hil_tests.rig): it always runs the emulators and a loopback board."""

    root: Path
    work: Path
    release: Release
    sshd: SshServer
    ledger_url: str

    def config(self, name: str, **bus_port: str) -> Path:
        """A board config with every path inside the board root (absolute, as a bundle requires)."""
        data = tomllib.loads((REPO / "board_configs" / "sim.toml").read_text())
        r = self.root
        data["board"].update(name="house-5", kind=KIND, state_dir=f"{r}/var/lib/dgc", key_file=f"{r}/var/lib/dgc/device.key")
        data["ledger"].update(url=self.ledger_url, ledger_id=LEDGER_ID)
        data["bus"][0]["port"] = bus_port.get("port", f"{r}/dev/rs485")
        data["dgr"]["port"] = f"{r}/dev/dgr"
        path = self.work / name
        path.write_text(tomli_w.dumps(data))
        return path

    def build(self, version: str, *extra: str, key: Path | None = None) -> tuple[subprocess.CompletedProcess, Path]:
        result = host_cli("flash", "build", "--version", version, "--wheels-from", str(self.release.bundle), "--release-key",
                          str(key or self.release.key), "--out", str(self.work / "bundles"), *extra)
        return result, self.work / "bundles" / f"dgc-{version}"

    def ssh(self, *args: str) -> list[str]:
        return [*args, self.sshd.destination, "--root", str(self.root), "--board-python", BOARD_PYTHON, *self.sshd.ssh_args()]

    def install(self, bundle: Path, *extra: str) -> subprocess.CompletedProcess:
        return host_cli("flash", "install", str(bundle), *self.ssh(), *extra)

    def current(self) -> str:
        return os.readlink(self.root / "opt/dgc/current")

    def target(self) -> SshTarget:
        """The board as the host tools reach it, for calling host_tools.flash in this process."""
        return SshTarget(self.sshd.destination, root=str(self.root), python=BOARD_PYTHON,
                         options=SshOptions(port=self.sshd.port, identity_file=str(self.sshd.client_key),
                                            known_hosts=str(self.sshd.known_hosts)))

    def boot(self) -> dict:
        """What the board does at boot before the daemon: dgc-boot-check.service's command, on the board."""
        r = subprocess.run([BOARD_PYTHON, "-I", str(self.root / "opt/dgc/boot/boot_check.py"), "--root", str(self.root),
                            "--json"], capture_output=True, text=True, timeout=300)
        assert r.returncode in (0, 1), r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    def running(self) -> str | None:
        link = self.root / "opt/dgc/current"
        return os.readlink(link).split("/")[-1] if link.is_symlink() else None

    def healthy(self) -> bool:
        """The running release's own health check passes (what the daemon would start on)."""
        r = subprocess.run([str(self.root / "opt/dgc/current/venv/bin/dgc"), "selftest", str(self.root / "etc/dgc/board.toml"),
                            "--allow-missing-key"], capture_output=True, text=True, timeout=120)
        return r.returncode == 0

    def releases(self) -> set[str]:
        return {p.name for p in (self.root / "opt/dgc/releases").iterdir()}

    def snapshot(self) -> dict:
        """Every path under the board root with its type, size, mtime and link: any change shows."""
        out = {}
        for path in sorted(self.root.rglob("*")):
            info = path.lstat()
            out[str(path.relative_to(self.root))] = (info.st_mode, info.st_size, info.st_mtime_ns,
                                                      os.readlink(path) if path.is_symlink() else None)
        return out


@pytest.fixture
def bench(tmp_path, release, sshd):
    root = tmp_path / "b"
    (root / "dev").mkdir(parents=True)
    settings = LedgerSettings(db_path=tmp_path / "ledger.sqlite3", ledger_id=LEDGER_ID, operator_token=TOKEN)
    with running_ledger(settings) as ledger:
        bench = FlashBench(root=root, work=tmp_path, release=release, sshd=sshd, ledger_url=ledger.url)
        house = ManagedProcess("bench-house", [sys.executable, "-m", "host_tools.cli", "bench", "house", str(bench.config("good.toml"))],
                               tmp_path / "bench.log").start()
        try:
            house.wait_for_line(r"bench house ready", timeout_s=30)
            yield bench
        finally:
            house.stop()


def selftest_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line.strip() for line in result.stdout.splitlines() if line.strip().startswith(("PASS ", "FAIL "))]


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
KILLED_INSTALL = """
import os, signal, sys
from pathlib import Path
from host_tools.flash import install
from host_tools.target import SshOptions, SshTarget
dest, root, python, port, key, known, bundle, stop, control = sys.argv[1:10]
target = SshTarget(dest, root=root, python=python, options=SshOptions(port=int(port), identity_file=key, known_hosts=known))
Path(control).write_text(target._control_path)  # so the test can close the SSH master the killed run leaves
def on_step(name):
    if name == stop:
        os.killpg(0, signal.SIGKILL)
install(target, Path(bundle), on_step=on_step)
"""


def killed_install(bench: FlashBench, bundle: Path, step: str) -> None:
    control = bench.work / "control-path"
    proc = subprocess.run([sys.executable, "-c", KILLED_INSTALL, bench.sshd.destination, str(bench.root), BOARD_PYTHON,
                           str(bench.sshd.port), str(bench.sshd.client_key), str(bench.sshd.known_hosts), str(bundle), step,
                           str(control)], cwd=REPO, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert proc.returncode == -signal.SIGKILL, f"the install did not reach step {step}: {proc.stderr}"
    subprocess.run(["ssh", "-o", f"ControlPath={control.read_text()}", "-O", "exit", bench.sshd.destination],
                   capture_output=True, timeout=30)


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
