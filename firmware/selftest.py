"""`dgc selftest`: the health check a new release must pass before it is kept.

Why these checks: after an update the board must still be able to do its job unattended — read
its config, sign with its key, hear its meters and its router, reach its ledger and agree with
its clock. Each check talks to the real thing (the serial ports, the ledger over HTTP); none
is inferred. ``dgc-host flash install`` runs this from the new release right after switching to
it and switches back by itself when it fails.

The checks only read: meters are read once, the router is asked HELLO and STATUS (no transfer
is started or stopped), the ledger is asked its time, rules and this device's account.

Output: one line per check, ``PASS name: detail`` or ``FAIL name: detail``, then a summary line.
The board's daemon must not be running (it owns the serial ports exclusively); the installer
stops it first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import BoardConfig

# A board clock before this is a board that never synchronised (a Pi has no RTC and starts from
# the last shutdown or 1970): every slot and every signed timestamp would be wrong.
CLOCK_FLOOR_S = 1_735_689_600  # 2025-01-01T00:00:00Z


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def run_selftest(config: BoardConfig, *, key_path: Path, allow_missing_key: bool = False,
                 clock: Callable[[], float] = time.time) -> list[Check]:
    """All checks, in order; never raises for a failing check (each failure becomes a FAIL line)."""
    checks = [Check("config", True, f"{config.path} is valid (board {config.board.name}, kind {config.board.kind})")]
    key_check, key = _check_key(key_path, allow_missing_key)
    checks.append(key_check)
    checks.append(_check_meters(config))
    checks.append(_check_dgr(config))
    ledger_check, ledger, skew_ms = _check_ledger(config, clock)
    checks.append(ledger_check)
    checks.append(_check_clock(config, clock, skew_ms))
    checks.append(_check_device(ledger, key, key_check, config))
    return checks


def _check_key(key_path: Path, allow_missing_key: bool):
    from .keystore import KeyFileError, load_key_file

    if allow_missing_key and not Path(key_path).exists():
        return Check("key", True, f"no key at {key_path} yet (not provisioned; allowed by --allow-missing-key)"), None
    try:
        key = load_key_file(key_path)
    except KeyFileError as exc:
        return Check("key", False, str(exc)), None
    return Check("key", True, f"{key_path} loads (device {key.device_id})"), key


def _check_meters(config: BoardConfig) -> Check:
    from .drivers.meter import MeterReadError, MeterSet

    problems, answered = [], []
    with MeterSet.from_config(config) as meters:
        for meter in config.meters:
            try:
                meters.read(meter.name)
                answered.append(meter.name)
            except MeterReadError as exc:
                problems.append(str(exc))
    if problems:
        return Check("meters", False, "; ".join(problems))
    return Check("meters", True, f"{', '.join(answered)} answered")


def _check_dgr(config: BoardConfig) -> Check:
    from .drivers.dgr import DgrClient, DgrError

    try:
        with DgrClient(config.dgr) as client:
            hello = client.hello()
            status = client.status()
    except DgrError as exc:
        return Check("dgr", False, str(exc))
    faults = f", faults {','.join(status.faults)}" if status.faults else ""
    return Check("dgr", True, f"router {hello.router_id} (fw {hello.firmware}) on {config.dgr.port} answered, mode {status.mode}{faults}")


def _ledger_for(config: BoardConfig, signer=None):
    """The backend [ledger] kind names (G2, issue 9): the bench ledger's REST API, or the market contract."""
    if config.ledger.kind == "evm":
        from .ledger.evm import EvmLedger

        return EvmLedger.from_config(config.ledger, signer=signer)
    from .ledger.rest import RestLedger

    return RestLedger.from_config(config.ledger, signer=signer)


def _check_ledger(config: BoardConfig, clock: Callable[[], float]):
    from .ledger.base import LedgerError

    ledger = _ledger_for(config)
    try:
        info = ledger.info()
        sent = clock()
        ledger_ms = ledger.server_time_ms()
        received = clock()
    except LedgerError as exc:
        return Check("ledger", False, f"{config.ledger.url}: {exc}"), None, None
    # (On a chain the adapter has already checked the node's chain id; the contract is the config's.)
    if config.ledger.kind != "evm" and info["ledger_id"] != config.ledger.ledger_id:
        return (Check("ledger", False, f"{config.ledger.url} is ledger {info['ledger_id']!r}; expected {config.ledger.ledger_id!r} "
                                       "([ledger] ledger_id of the config)"), None, None)
    # The ledger read its clock somewhere between sending and receiving: compare with the midpoint.
    skew_ms = ledger_ms - round((sent + received) * 500)
    return Check("ledger", True, f"{config.ledger.url} answered (ledger {info['ledger_id']})"), ledger, skew_ms


def _check_clock(config: BoardConfig, clock: Callable[[], float], skew_ms: int | None) -> Check:
    now = clock()
    if now < CLOCK_FLOOR_S:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return Check("clock", False, f"board clock reads {stamp}, before 2025: never synchronised (check systemd-timesyncd / NTP)")
    if skew_ms is None:
        return Check("clock", False, "not compared with the ledger's clock (ledger unreachable)")
    bound = config.ledger.max_clock_skew_ms
    if abs(skew_ms) > bound:
        return Check("clock", False, f"the ledger's clock is {skew_ms:+d} ms from the board's; expected within {bound} ms "
                                     "([ledger] max_clock_skew_ms; check NTP)")
    return Check("clock", True, f"{skew_ms:+d} ms from the ledger's clock (bound {bound} ms)")


def _check_device(ledger, key, key_check: Check, config: BoardConfig) -> Check:
    from .ledger.base import LedgerError, LedgerRejected, Refusal

    if key is None:
        if key_check.ok:  # no key yet, allowed: nothing to look up
            return Check("device", True, "not provisioned yet: no device to look up")
        return Check("device", False, "not looked up: the key did not load")
    if ledger is None:
        return Check("device", False, f"device {key.device_id} not looked up: the ledger is unreachable")
    try:
        account = _ledger_for(config, signer=key).device_account(key.device_id)  # a signed read (REST)
    except LedgerRejected as exc:
        # The same refusals the daemon alarms on once and then retries slowly (issue 7 h): say why.
        if exc.refusal in (Refusal.NOT_FOUND, Refusal.DEVICE_UNKNOWN):
            return Check("device", False, f"device {key.device_id} is not registered at {config.ledger.url} "
                                          f"({exc.code}: {exc.detail}; register it with dgc-host provision)")
        if exc.refusal is Refusal.DEVICE_REVOKED:
            return Check("device", False, f"device {key.device_id} was revoked at the ledger; this key can no longer trade "
                                          f"({exc.detail}; rotate it with dgc-host provision --rotate)")
        return Check("device", False, f"device {key.device_id}: {exc}")
    except LedgerError as exc:
        return Check("device", False, str(exc))
    if account.get("revoked_ms") is not None:
        return Check("device", False, f"device {key.device_id} was revoked at the ledger; this key can no longer trade "
                                      "(rotate it with dgc-host provision --rotate)")
    return Check("device", True, f"device {key.device_id} is registered ({account.get('name', '')!s})")
