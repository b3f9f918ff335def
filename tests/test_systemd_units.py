"""The systemd units in systemd/: the settings the watchdog, restart and rollback design rests
on, checked by reading the files; and the files as systemd itself parses them
(`systemd-analyze verify`, run against a scratch root so no unit is installed on this machine).
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
ALL_UNITS = ["dgc.service", "dgc-rollback.service", "dgc-boot-check.service"]


def unit(name: str) -> configparser.ConfigParser:
    """A unit file; repeated keys (DeviceAllow=, ExecStartPost=) keep every value, as systemd does."""

    class MultiDict(dict):
        def __setitem__(self, key, value):
            if key in self and isinstance(value, list):
                self[key].extend(value)
            else:
                super().__setitem__(key, value)

    parser = configparser.RawConfigParser(dict_type=MultiDict, strict=False, delimiters=("=",),
                                          comment_prefixes=("#", ";"), empty_lines_in_values=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(UNITS / name, encoding="utf-8")
    return parser


def values(parser: configparser.ConfigParser, section: str, key: str) -> list[str]:
    """Every value of a key, in file order (configparser joins repeated ones with newlines; our
    units use no line continuations, so a newline always separates two assignments)."""
    if not parser.has_option(section, key):
        return []
    return parser.get(section, key).split("\n")


def one(parser, section: str, key: str) -> str:
    found = values(parser, section, key)
    assert len(found) == 1, f"[{section}] {key}: expected exactly one value, found {found}"
    return found[0]


def seconds(text: str) -> int:
    units = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    return int(number) * units.get(text[len(number):] or "s", 0)


def test_dgc_service_is_a_notify_service_with_a_watchdog_restart_and_rollback():
    u = unit("dgc.service")
    assert one(u, "Service", "Type") == "notify"
    assert one(u, "Service", "NotifyAccess") == "main"
    assert one(u, "Service", "ExecStart") == "/opt/dgc/current/venv/bin/dgc run /etc/dgc/board.toml"
    watchdog = seconds(one(u, "Service", "WatchdogSec"))
    assert 10 <= watchdog <= 300
    assert one(u, "Service", "Restart") == "on-failure"
    restart = seconds(one(u, "Service", "RestartSec"))
    interval, burst = seconds(one(u, "Unit", "StartLimitIntervalSec")), int(one(u, "Unit", "StartLimitBurst"))
    # The limit must be reachable by a crash loop AND by a watchdog-kill loop, or the rollback never comes.
    assert burst * (restart + watchdog) < interval, (burst, restart, watchdog, interval)
    assert one(u, "Unit", "OnFailure") == "dgc-rollback.service"
    # Issue 7 o: a crash restart reaches the router before its heartbeat watchdog cuts a transfer.
    from firmware.scheduler.router_link import FIRST_FRAME_BOUND_S, HEARTBEAT_MARGIN_S, MIN_ROUTER_WATCHDOG_S

    assert restart + FIRST_FRAME_BOUND_S + HEARTBEAT_MARGIN_S <= MIN_ROUTER_WATCHDOG_S, (restart, MIN_ROUTER_WATCHDOG_S)
    assert seconds(one(u, "Service", "TimeoutStartSec")) > 90  # recovery with the ledger down takes a while
    assert one(u, "Install", "WantedBy") == "multi-user.target"


def test_dgc_service_sandbox_keeps_the_serial_devices_and_the_state_dir():
    u = unit("dgc.service")
    assert one(u, "Service", "ProtectSystem") == "strict"
    assert one(u, "Service", "ReadWritePaths") == "/var/lib/dgc"
    assert one(u, "Service", "StateDirectory") == "dgc"
    assert "dialout" in one(u, "Service", "SupplementaryGroups").split()
    assert one(u, "Service", "DevicePolicy") == "closed"
    allowed = {v.split()[0]: v.split()[1] for v in values(u, "Service", "DeviceAllow")}
    for group in ("char-ttyS", "char-ttyAMA", "char-ttyUSB"):  # Pi UARTs and USB RS-485 adapters
        assert allowed.get(group) == "rw", (group, allowed)
    assert one(u, "Service", "User") != "root"
    assert one(u, "Service", "NoNewPrivileges") == "yes"
    # The control socket is chmod-ed 0660 by the daemon; the umask must not open anything wider.
    assert int(one(u, "Service", "UMask"), 8) & 0o007 == 0o007


def test_rollback_service_switches_then_restarts_dgc():
    u = unit("dgc-rollback.service")
    assert one(u, "Service", "Type") == "oneshot"
    # The copy outside every release: a failing release's venv may not even start Python.
    assert one(u, "Service", "ExecStart") == "/usr/bin/python3 -I /opt/dgc/boot/rollback.py --root /"
    post = values(u, "Service", "ExecStartPost")
    assert post == ["/bin/systemctl reset-failed dgc.service", "/bin/systemctl --no-block start dgc.service"]
    assert one(u, "Service", "ReadWritePaths").split() == ["/opt/dgc", "/var/lib/dgc"]  # the journal's -shm for its schema
    assert not u.has_section("Install"), "the rollback unit must only run as dgc.service's OnFailure= handler"


def test_boot_check_runs_before_the_daemon_which_requires_it():
    """A pending install is decided at boot before dgc.service may start; if it cannot be
    decided (exit 1) the daemon does not start on a release that may not read the journal."""
    u = unit("dgc-boot-check.service")
    assert one(u, "Service", "Type") == "oneshot" and one(u, "Service", "RemainAfterExit") == "yes"
    start = one(u, "Service", "ExecStart").split()
    assert start[:4] == ["/usr/bin/python3", "-I", "/opt/dgc/boot/boot_check.py", "--root"]
    assert start[start.index("--run-as") + 1] == one(unit("dgc.service"), "Service", "User")  # the daemon's own view
    tries, delay = int(start[start.index("--tries") + 1]), int(start[start.index("--retry-delay") + 1])
    from firmware.boot_check import SELFTEST_TIMEOUT_S  # one health check's bound (no --selftest-timeout in the unit)

    assert "--selftest-timeout" not in start
    assert tries * SELFTEST_TIMEOUT_S + (tries - 1) * delay < seconds(one(u, "Service", "TimeoutStartSec"))
    assert one(u, "Unit", "Before") == "dgc.service"
    assert "network-online.target" in one(u, "Unit", "After")
    assert one(u, "Unit", "ConditionPathExists") == "/opt/dgc/boot/boot_check.py"
    assert set(one(u, "Service", "ReadWritePaths").split()) == {"/opt/dgc", "/etc/dgc", "/var/lib/dgc"}
    assert one(u, "Install", "WantedBy") == "multi-user.target"
    d = unit("dgc.service")
    assert one(d, "Unit", "Requires") == "dgc-boot-check.service"
    assert "dgc-boot-check.service" in values(d, "Unit", "After")


def _exec_paths() -> set[str]:
    paths = set()
    for name in ALL_UNITS:
        u = unit(name)
        for key in ("ExecStart", "ExecStartPost", "ExecStartPre", "ExecStop"):
            for value in values(u, "Service", key):
                paths.add(value.lstrip("-+!@:").split()[0])
    return paths


def _verify(root: Path, names: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "--man=no", *[f"/etc/systemd/system/{n}" for n in names]],
        capture_output=True, text=True, timeout=60,
    )


def _scratch_root(tmp_path: Path) -> Path:
    """A root holding systemd's own units, ours, and stand-ins at the paths our ExecStart lines name
    (verify checks that they are executable; the real ones exist only on an installed board)."""
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    for path in _exec_paths():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("#!/bin/sh\nexit 0\n")
        target.chmod(0o755)
    return root


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or not SYSTEM_UNITS.is_dir(),
    reason="systemd-analyze not installed (Debian package 'systemd'); the configparser checks above still ran",
)


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_every_unit(tmp_path):
    root = _scratch_root(tmp_path)
    names = ALL_UNITS
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(names)
    for name in names:
        shutil.copy(UNITS / name, root / "etc" / "systemd" / "system" / name)
    result = _verify(root, names)
    # verify exits 0 on unknown keys and bad values (it only warns): any output is a failure.
    assert result.returncode == 0 and result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr


@needs_systemd_analyze
def test_systemd_analyze_verify_would_catch_a_typo(tmp_path):
    """The check above can fail: the same verify run on a unit with a misspelt key and a bad time complains."""
    root = _scratch_root(tmp_path)
    text = (UNITS / "dgc.service").read_text().replace("WatchdogSec=60s", "WatchdogSec=sixty\nWatchDogSec=60s")
    (root / "etc" / "systemd" / "system" / "dgc.service").write_text(text)
    result = _verify(root, ["dgc.service"])
    assert "WatchDogSec" in result.stderr and "sixty" in result.stderr, result.stderr
    assert os.path.exists(root / "etc" / "systemd" / "system" / "dgc.service")
