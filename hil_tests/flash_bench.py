"""What the `dgc-host flash` HIL tests share (hil_tests/test_flash*.py): one real bundle, a board
directory reached over a real sshd on 127.0.0.1, a bench house and a bench ledger.

One real bundle (real wheels from the package index), installed over a real sshd on 127.0.0.1
into a board directory, health-checked by the real `dgc selftest` against a bench house (Modbus
meters and DGR emulator on virtual serial lines) and the bench ledger.

Building with real wheels is the slow part, so the test run builds ONE bundle, shared by the
pytest-xdist workers (the first to need it builds it under a file lock; the others wait for it
and read it: nothing writes to it afterwards); the variants are built from its wheels with
`flash build --wheels-from` (the real build path, re-hashed and re-signed), and the damaged ones
are copies with one byte changed. The failing release fails honestly: its board config names a
meter port that does not exist, so `dgc selftest` really runs from the new release and really
cannot read the meters.

The tests are split over several files (power cuts; install, refusals and rollback; release
keys) so that `make test`'s xdist workers, which take whole files, run them side by side.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w

from host_tools.bench_ledger.app import LedgerSettings
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


def _build_release(d: Path) -> None:
    for name in ("release.key", "other.key"):
        r = host_cli("flash", "keygen", "--out", str(d / name))
        assert r.returncode == 0, r.stderr
    r = host_cli("flash", "build", "--version", "0.0.1", "--board-kind", KIND, "--release-key", str(d / "release.key"),
                 "--out", str(d / "out"), timeout=900)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="session")
def release(tmp_path_factory) -> Release:
    """The one real bundle of the run. Under xdist every worker has its own base temp directory
    below a common one: the bundle is built there once, under an exclusive lock, and marked
    complete; a worker that finds the mark reuses it (read only: variants are built elsewhere)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    d = shared / "flash-release"
    d.mkdir(exist_ok=True)
    with open(shared / "flash-release.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / "complete").exists():
            for leftover in d.iterdir():  # a build that failed half-way in an earlier test of this run
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            _build_release(d)
            (d / "complete").write_text("built\n")
    assert oct((d / "release.key").stat().st_mode & 0o777) == "0o600"
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


# A power cut during an install: the installer is killed (its whole process group, so the SSH
# connection dies with it) right after a step, exactly where a power cut would leave the board
# (every board write is fsynced and atomic).
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
