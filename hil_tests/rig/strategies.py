"""Strategies: small explicit state machines that bring the board to a state (labgrid's idea).

A test asks for the state it needs — ``rig.board().transition("trading")`` — instead of
repeating the steps. :class:`BoardStrategy` declares its states and the one step into each in
one place (``STATES``, ``STEPS``); :meth:`Strategy.transition` walks forward one step at a time,
checks what each step promised before taking the next, and records every step
(``history``) for the report. Going back is only to ``"off"`` (the daemon stopped), from any
state. An unknown state, or a step whose check fails, raises :class:`StrategyError` naming the
state, the step and what was seen; the strategy then stays in the last state it reached.

The board is the DGC this machine runs (``dgc`` from this checkout, the rig's board config):
on an emulated rig against the emulators, on a real bench against its meters and router through
the adapters in the rig file — the way a bench PC stands in for the Raspberry Pi. States:

* ``off``: no daemon running for this board;
* ``flashed``: the firmware under test is what ``dgc`` runs, and it accepts the rig's board
  config (``dgc check-config``): the state a ``dgc-host flash`` of this checkout leaves a Pi in;
* ``provisioned``: the board has its key (``dgc keygen``) and the rig's ledger knows its device
  id (``dgc-host ledger register`` with the operator token);
* ``trading``: ``dgc run`` is up (``running jobs=``) and answers ``dgc status`` on its control
  socket, its meters read and its router's session open.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from .rigfile import REPO, RigError


class StrategyError(RigError):
    """A state that cannot be reached: names the state, the step and what was seen."""


class Strategy:
    """States in order, and the step into each; ``transition(target)`` walks there."""

    STATES: tuple[str, ...] = ()
    STEPS: dict[str, str] = {}  # state -> the name of the method that brings the board into it

    def __init__(self) -> None:
        self.state = "unknown"
        self.history: list[tuple[str, float, str]] = []  # (state, seconds taken, what the step saw)

    def transition(self, target: str) -> None:
        """Walk to ``target``: from "unknown", or to a state behind the current one, by way of
        "off" (the first state); then forward one step at a time."""
        if target not in self.STATES:
            raise StrategyError(f"{type(self).__name__}: unknown state {target!r}; expected one of {', '.join(self.STATES)}")
        if target == self.state:
            return
        if self.state == "unknown" or self.STATES.index(target) < self.STATES.index(self.state):
            self._step(self.STATES[0])
        for state in self.STATES[self.STATES.index(self.state) + 1: self.STATES.index(target) + 1]:
            self._step(state)

    def _step(self, state: str) -> None:
        started = time.monotonic()
        try:
            seen = getattr(self, self.STEPS[state])()
        except StrategyError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure of a step names the step
            raise StrategyError(f"{type(self).__name__}: step to {state!r} ({self.STEPS[state]}) failed from "
                                f"{self.state!r}: {exc}") from exc
        self.history.append((state, round(time.monotonic() - started, 3), str(seen or "")))
        self.state = state


def _dgc(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "firmware.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=REPO, stdin=subprocess.DEVNULL)


class BoardStrategy(Strategy):
    """The DGC board of a rig: ``off`` -> ``flashed`` -> ``provisioned`` -> ``trading``."""

    STATES = ("off", "flashed", "provisioned", "trading")
    STEPS = {"off": "_to_off", "flashed": "_to_flashed", "provisioned": "_to_provisioned", "trading": "_to_trading"}

    def __init__(self, rig, name: str = "rig-board", *, env: dict[str, str] | None = None):
        super().__init__()
        self.rig, self.name, self.env = rig, name, dict(env or {})
        self.config_path: Path | None = None
        self.device_id: str | None = None
        self.daemon = None  # host_tools.neighbourhood.ManagedProcess while trading

    # -- the steps ------------------------------------------------------------------------------

    def _to_off(self) -> str:
        daemon, self.daemon = self.daemon, None
        if daemon is None or not daemon.running:
            return "no daemon"
        status = daemon.stop(timeout_s=15)
        if status != 0:
            raise StrategyError(f"the daemon did not stop cleanly on SIGTERM (status {status}):\n"
                                + "\n".join(daemon.lines[-15:]))
        return "daemon stopped (status 0)"

    def _to_flashed(self) -> str:
        # The devices first: on an emulated rig this starts the emulators on their lines; on a
        # bench it only says where they are.
        self.rig.meter_bus()
        self.rig.dgr()
        self.rig.ledger_url()  # the board config names the ledger: start it first
        self.config_path = self.rig.board_config(name=self.name)
        result = _dgc("check-config", str(self.config_path))
        if result.returncode != 0:
            raise StrategyError(f"dgc check-config refused the rig's board config: {result.stderr.strip()}")
        return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "config accepted"

    def _to_provisioned(self) -> str:
        config = self.config_path
        key = Path(self._board_value("key_file"))
        result = _dgc("pubkey" if key.exists() else "keygen", str(config))
        match = re.search(r"device_id (\w+)", result.stdout)
        if result.returncode != 0 or match is None:
            raise StrategyError(f"dgc keygen/pubkey: {result.stderr.strip() or result.stdout.strip()}")
        self.device_id = match.group(1)
        url, token = self.rig.ledger_url(), self.rig.operator_token()
        register = subprocess.run(
            [sys.executable, "-m", "host_tools.cli", "ledger", "register", "--url", url, "--config", str(config),
             "--name", self.name, "--operator-token", token],
            capture_output=True, text=True, timeout=60, cwd=REPO, stdin=subprocess.DEVNULL)
        if register.returncode != 0 and "already" not in (register.stdout + register.stderr):
            raise StrategyError(f"registration at {url} failed ({register.returncode}): "
                                f"{(register.stderr or register.stdout).strip()[-400:]}")
        return f"device {self.device_id} registered at {url}"

    def _to_trading(self) -> str:
        from host_tools.neighbourhood import ManagedProcess

        self.daemon = ManagedProcess(self.name, [sys.executable, "-m", "firmware.cli", "run", str(self.config_path)],
                                     self.rig.workdir / f"{self.name}-daemon.log", env=self.env).start()
        self.daemon.wait_for_line(r" running jobs=", timeout_s=30)
        deadline = time.monotonic() + 30
        while True:
            result = _dgc("status", str(self.config_path), "--json", timeout_s=30)
            if result.returncode == 0:
                status = json.loads(result.stdout)
                if all(m.get("ok") for m in status.get("meters", {}).values()) and status.get("meters"):
                    return f"dgc status: healthy={status.get('healthy')} meters ok"
                if (status.get("clock") or {}).get("ok") is False:
                    # The clock guard holds the board: by design it reads no meter and bids on
                    # nothing while its clock is not trusted (docs/delivery.md), so "trading" is
                    # as far as it can get. The daemon is up and says why.
                    return f"dgc status: clock guard failed closed (skew {status['clock'].get('skew_ms')} ms)"
            if time.monotonic() > deadline or not self.daemon.running:
                raise StrategyError(f"the daemon did not report its meters ok within 30 s: "
                                    f"{result.stdout.strip()[-300:] or result.stderr.strip()[-300:]}\n"
                                    + "\n".join(self.daemon.lines[-15:]))
            time.sleep(0.5)

    # -- helpers --------------------------------------------------------------------------------

    def _board_value(self, key: str) -> str:
        import tomllib

        return tomllib.loads(self.config_path.read_text())["board"][key]

    def status_json(self) -> str:
        """``dgc status --json`` of the running daemon (its control socket)."""
        result = _dgc("status", str(self.config_path), "--json", timeout_s=30)
        if result.returncode != 0:
            raise StrategyError(f"dgc status: {result.stderr.strip()}")
        return result.stdout

    def wait_for_line(self, pattern: str, timeout_s: float):
        if self.daemon is None:
            raise StrategyError(f"no daemon: the board is {self.state!r}, not 'trading'")
        return self.daemon.wait_for_line(pattern, timeout_s)

    def close(self) -> list[str]:
        """Teardown: the board goes off; returns what did not stop cleanly."""
        try:
            self.transition("off")
        except StrategyError as exc:
            return [str(exc)]
        return []

