"""A simulated neighbourhood on one machine: the bench ledger, and per house its emulators and
its own `dgc run` daemon process, each with its own key and board config.

Shared by `make demo` (host_tools.demo) and the HIL tests, so the demo and the tests exercise
the same real processes: nothing here is mocked. Every server listens on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import requests

from firmware.cli import MALLOC_ARENA_MAX

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SIM_TEMPLATE = REPO_ROOT / "board_configs" / "sim.toml"
LISTENING = re.compile(r"ledger listening on (http://127\.0\.0\.1:\d+)")


class NeighbourhoodError(RuntimeError):
    pass


@dataclass
class HouseSpec:
    name: str
    pv_peak_w: int = 0
    battery_capacity_wh: int = 0
    load_peak_w: int = 1200
    start_hour: float = 11.0
    # Replay a community house (docs/community.md; the committed fixture) instead of the analytic
    # curves: its own load and PV of each slot from day ``replay_start_day`` at ``start_hour``.
    replay_house: str = ""
    replay_start_day: int = 0
    battery_soc_percent: float = 50.0


def default_houses(count: int = 4) -> list[HouseSpec]:
    """Half the houses with PV and a battery, half without (the pilot's mix, scaled down)."""
    houses = []
    for i in range(1, count + 1):
        if i <= count // 2:
            houses.append(HouseSpec(f"house-{i}", pv_peak_w=3500 + 500 * i, battery_capacity_wh=5000, load_peak_w=900))
        else:
            houses.append(HouseSpec(f"house-{i}", pv_peak_w=0, battery_capacity_wh=0, load_peak_w=1500 + 200 * i))
    return houses


# The demo's day (issue 8 part 5): 29 April of the fixture's weather year (day 119), a sunny
# spring day, from 11:00. The bench compresses a day 60x (30-s slots = the fixture's 30-min
# slots), so the demo's ~10 slots replay 11:00-16:00: every PV house has a surplus of ~1 kWh a
# slot and the consumers chosen below (the day's largest midday loads) need 350-450 Wh a slot,
# enough for both PV houses to sell. Measured with the fixture's slots; see fixture_houses().
FIXTURE_DAY = 119
FIXTURE_START_HOUR = 11.0
FIXTURE_PV_HOUSES = ("p04", "p05", "p03", "p01", "p02")
FIXTURE_CONSUMERS = ("c02", "c07", "c09", "c06", "c10", "c04", "c03", "c05", "c01", "c08")


def fixture_houses(count: int = 4, *, day: int = FIXTURE_DAY, start_hour: float = FIXTURE_START_HOUR) -> list[HouseSpec]:
    """Houses of the committed community fixture, replayed by the bench house model: half of
    them PV houses (with the fixture's 7 kWh battery, nearly full at midday so the surplus goes
    to the market rather than into the battery), the rest consumers. Names are the fixture's."""
    pv_count = min(count // 2, len(FIXTURE_PV_HOUSES))
    consumers = count - pv_count
    if consumers > len(FIXTURE_CONSUMERS):
        raise ValueError(f"fixture houses: at most {len(FIXTURE_PV_HOUSES) + len(FIXTURE_CONSUMERS)} houses, asked for {count}")
    specs = [HouseSpec(name, battery_capacity_wh=7000, battery_soc_percent=90.0, start_hour=start_hour,
                       replay_house=name, replay_start_day=day) for name in FIXTURE_PV_HOUSES[:pv_count]]
    specs += [HouseSpec(name, start_hour=start_hour, replay_house=name, replay_start_day=day)
              for name in FIXTURE_CONSUMERS[:consumers]]
    return specs


class ManagedProcess:
    """A child process whose output lines go to a log file and, optionally, to a line callback."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *, on_line: Callable[[str, str], None] | None = None,
                 env: dict | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.on_line = on_line
        self.lines: list[str] = []
        self._env = env
        self.process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._line_event = threading.Condition()

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self._env or {}))
        env = {k: v for k, v in env.items() if v is not None}  # None: leave the variable unset
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, env=env, cwd=REPO_ROOT, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True)
        self._reader.start()
        return self

    def _read(self, stream: TextIO) -> None:
        with open(self.log_path, "a", encoding="utf-8") as log_file:
            for line in stream:
                line = line.rstrip("\n")
                log_file.write(line + "\n")
                log_file.flush()
                with self._line_event:
                    self.lines.append(line)
                    self._line_event.notify_all()
                if self.on_line:
                    self.on_line(self.name, line)

    def wait_for_line(self, pattern: re.Pattern | str, timeout_s: float) -> re.Match:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._line_event:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if self.process.poll() is not None and seen == len(self.lines):
                    tail = "\n".join(self.lines[-15:])
                    raise NeighbourhoodError(f"{self.name} exited with status {self.process.returncode} before '{regex.pattern}':\n{tail}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NeighbourhoodError(f"{self.name}: no line matching '{regex.pattern}' within {timeout_s} s")
                self._line_event.wait(min(remaining, 0.5))

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.running:
            self.process.send_signal(signum)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._reader:
            self._reader.join(timeout=5)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: the power-cut / crash case."""
        if self.running:
            self.process.kill()
            self.process.wait()
        if self._reader:
            self._reader.join(timeout=5)


def _python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@dataclass
class House:
    spec: HouseSpec
    directory: Path
    config_path: Path
    device_id: str = ""
    address: str = ""  # the key's Ethereum address (ledger "evm")
    emulator: ManagedProcess | None = None
    daemon: ManagedProcess | None = None
    daemon_starts: int = 0
    log_lines: list[str] = field(default_factory=list)


class Neighbourhood:
    """Start with ``start()``; stop with ``stop()`` (also on error: use it as a context manager)."""

    def __init__(self, workdir: Path, houses: list[HouseSpec], *, template: Path = SIM_TEMPLATE,
                 on_line: Callable[[str, str], None] | None = None, market_overrides: dict | None = None,
                 cadence_overrides: dict | None = None, last_market_slots: int | None = None,
                 ledger_args: list[str] | None = None, config_overrides: dict[str, dict] | None = None,
                 ledger: str = "rest", chain_block_time_s: int = 1, meter_overrides: dict[str, dict] | None = None):
        self.workdir = Path(workdir).resolve()
        # "rest": the bench ledger; "evm": anvil + the market contract + a relay (host_tools/evm/hood.py, G2)
        if ledger not in ("rest", "evm"):
            raise ValueError(f"ledger: expected 'rest' or 'evm', got {ledger!r}")
        self.ledger_kind = ledger
        self.chain_block_time_s = chain_block_time_s
        self.chain = None
        self.specs = houses
        self.template = template
        self.on_line = on_line
        self.market_overrides = market_overrides or {}
        self.cadence_overrides = cadence_overrides or {}
        self.last_market_slots = last_market_slots
        self.ledger_args = list(ledger_args or [])
        # Tables merged into every house's board config (not the ledger's), e.g. {"console": {"tty": ...}}.
        self.config_overrides = {table: dict(values) for table, values in (config_overrides or {}).items()}
        # Keys merged into the [[meter]] of that name in every house (an array of tables, which
        # config_overrides cannot reach), e.g. {"interchange": {"net_only": True}} (issue 7 m).
        self.meter_overrides = {name: dict(values) for name, values in (meter_overrides or {}).items()}
        self.last_market: int | None = None
        self.operator_token = secrets.token_hex(16)
        self.ledger: ManagedProcess | None = None
        self.ledger_url = ""
        self.authority_public_key = ""  # the REST ledger's, read at set-up (GET /v1/info)
        self.houses: dict[str, House] = {}
        with open(template, "rb") as handle:
            self.base_config = tomllib.load(handle)
        self.base_config.setdefault("market", {}).update(self.market_overrides)
        self.base_config.setdefault("cadence", {}).update(self.cadence_overrides)
        self.slot_seconds = int(self.base_config["market"].get("slot_seconds", 1800))

    # -- set-up ---------------------------------------------------------------------------

    def start(self, *, start_daemons: bool = True) -> "Neighbourhood":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_chain() if self.ledger_kind == "evm" else self._start_ledger()
        for spec in self.specs:
            house = self._prepare_house(spec)
            self.houses[spec.name] = house
            self._start_emulator(house)
        if start_daemons:
            for house in self.houses.values():
                self.start_daemon(house.spec.name)
        return self

    def _start_ledger(self) -> None:
        ledger_config = self.workdir / "ledger-market.toml"
        self._write_config(ledger_config, self.base_config)
        argv = _python_module(
            "host_tools.cli", "ledger", "serve", "--config", str(ledger_config), "--db", str(self.workdir / "ledger.sqlite3"),
            "--host", "127.0.0.1", "--port", "0", "--operator-token", self.operator_token, *self.ledger_args,
        )
        if self.last_market_slots is not None:
            # A bounded market day: no market beyond this one takes orders, so every trade of the
            # run can be delivered, reported and settled before the run ends.
            slot = self.slot_seconds
            now = int(time.time())
            self.last_market = now - now % slot + self.last_market_slots * slot
            argv += ["--last-market", str(self.last_market)]
        self.ledger = ManagedProcess("ledger", argv, self.workdir / "ledger.log", on_line=self.on_line).start()
        self.ledger_url = self.ledger.wait_for_line(LISTENING, timeout_s=30).group(1)
        # Pin the ledger's authority key in every house, as dgc-host provision does on a real board
        # (issue 10 part 4: a trade moves energy only once it is in the record this key signed).
        self.authority_public_key = requests.get(self.ledger_url + "/v1/info", timeout=10).json()["authority_public_key"]

    def _start_chain(self) -> None:
        from host_tools.evm.hood import ChainLedger, rules_from_market_table

        if self.last_market_slots is not None:
            now = int(time.time())
            self.last_market = now - now % self.slot_seconds + self.last_market_slots * self.slot_seconds
        self.chain = ChainLedger(self.workdir, rules_from_market_table(self.base_config["market"]),
                                 block_time_s=self.chain_block_time_s, last_market_id=self.last_market)
        self.chain.start(lambda name, argv, log_path: ManagedProcess(name, argv, log_path, on_line=self.on_line).start())
        self.ledger = self.chain.relay
        self.ledger_url = self.chain.relay_url

    def _write_config(self, path: Path, data: dict) -> None:
        import tomli_w

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tomli_w.dumps(data).encode("utf-8"))

    def _prepare_house(self, spec: HouseSpec) -> House:
        directory = self.workdir / spec.name
        directory.mkdir(parents=True, exist_ok=True)
        data = json.loads(json.dumps(self.base_config))  # deep copy of plain TOML data
        data["board"].update(name=spec.name, state_dir=str(directory / "state"), key_file=str(directory / "device.key"))
        data["ledger"]["url"] = self.ledger_url
        if self.authority_public_key:
            data["ledger"]["authority_public_key"] = self.authority_public_key
        if self.chain is not None:
            data["ledger"].update(self.chain.board_ledger_table(max_clock_skew_ms=int(data["ledger"].get("max_clock_skew_ms", 2000))))
        data["bus"][0]["port"] = str(directory / "meter-bus")
        data["dgr"]["port"] = str(directory / "dgr")
        data.setdefault("policy", {})["battery_capacity_wh"] = spec.battery_capacity_wh
        data["sim"] = {
            "load_peak_w": spec.load_peak_w,
            "pv_peak_w": spec.pv_peak_w,
            "battery_capacity_wh": spec.battery_capacity_wh,
            "start_hour": spec.start_hour,
        }
        if spec.replay_house:
            data["sim"].update(replay_house=spec.replay_house, replay_start_day=spec.replay_start_day,
                               battery_soc_percent=spec.battery_soc_percent)
        for table, values in self.config_overrides.items():
            data.setdefault(table, {}).update(values)
        for meter_name, values in self.meter_overrides.items():
            meters = [m for m in data.get("meter", []) if m.get("name") == meter_name]
            if not meters:
                raise NeighbourhoodError(f"meter_overrides: no [[meter]] named {meter_name!r} in {self.template}")
            meters[0].update(values)
        config_path = directory / "board.toml"
        self._write_config(config_path, data)
        house = House(spec=spec, directory=directory, config_path=config_path)
        if not (directory / "device.key").exists():
            out = self._run_ok(_python_module("firmware.cli", "keygen", str(config_path)))
        else:
            out = self._run_ok(_python_module("firmware.cli", "pubkey", str(config_path)))
        house.device_id = re.search(r"device_id (\w+)", out).group(1)
        if self.chain is not None:
            house.address = self.chain.register(directory / "device.key")
            return house
        self._run_ok(_python_module(
            "host_tools.cli", "ledger", "register", "--url", self.ledger_url, "--config", str(config_path),
            "--name", spec.name, "--operator-token", self.operator_token,
        ))
        return house

    def _run_ok(self, argv: list[str]) -> str:
        result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise NeighbourhoodError(f"{' '.join(argv[2:5])} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
        return result.stdout

    def _start_emulator(self, house: House) -> None:
        argv = _python_module("host_tools.cli", "bench", "house", str(house.config_path))
        house.emulator = ManagedProcess(f"{house.spec.name}/bench", argv, house.directory / "bench.log", on_line=self.on_line).start()
        house.emulator.wait_for_line(r"bench house ready", timeout_s=30)

    # -- daemons --------------------------------------------------------------------------

    def start_daemon(self, name: str, *, env: dict[str, str] | None = None) -> ManagedProcess:
        """``env``: extra environment for this daemon (e.g. NOTIFY_SOCKET, WATCHDOG_USEC as systemd sets them)."""
        house = self.houses[name]
        argv = _python_module("firmware.cli", "run", str(house.config_path))
        # As systemd/dgc.service starts it (MALLOC_ARENA_MAX: firmware/cli.py); env may override.
        env = {"MALLOC_ARENA_MAX": MALLOC_ARENA_MAX, **(env or {})}
        house.daemon = ManagedProcess(name, argv, house.directory / "daemon.log", on_line=self.on_line, env=env).start()
        house.daemon_starts += 1
        house.daemon.wait_for_line(r" running jobs=", timeout_s=30)
        return house.daemon

    def kill_daemon(self, name: str) -> None:
        self.houses[name].daemon.kill()

    # -- observing ------------------------------------------------------------------------

    def get(self, path: str) -> dict:
        # the bench's observer reads every device's data: as the operator (the ledger keeps them private)
        response = requests.get(self.ledger_url + path, headers={"Authorization": f"Bearer {self.operator_token}"}, timeout=5)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict:
        if self.chain is not None:
            return self.chain.stats()
        return self.get("/v1/stats")

    def control_path(self, house: str) -> Path:
        """The house's bench control socket (``dgc-host bench house`` puts it next to the DGR port)."""
        from host_tools.emulators.bench_control import control_path_for

        return control_path_for(self.houses[house].directory / "dgr")

    def fault(self, house: str, command: dict, *, timeout_s: float = 5.0) -> dict:
        """Send one command to a house's bench over its control socket (docs/bench-faults.md),
        e.g. ``{"target": "dgr", "fault": {"kind": "link_cut"}}`` or ``{"cmd": "status"}``, and
        return the answer; a refusal raises NeighbourhoodError with the bench's reason."""
        from host_tools.emulators.bench_control import request

        answer = request(self.control_path(house), command, timeout_s=timeout_s)
        if not answer.get("ok"):
            raise NeighbourhoodError(f"{house}/bench refused {command}: {answer.get('error')}")
        return answer

    def bench_status(self, house: str) -> dict:
        return self.fault(house, {"cmd": "status"})

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float, poll_s: float = 1.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(poll_s)
        return predicate()

    def stop(self) -> None:
        for house in self.houses.values():
            if house.daemon:
                house.daemon.stop()
        for house in self.houses.values():
            if house.emulator:
                house.emulator.stop()
        if self.chain is not None:
            self.chain.stop()  # the relay, then anvil by pid
        elif self.ledger:
            self.ledger.stop()

    def __enter__(self) -> "Neighbourhood":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
