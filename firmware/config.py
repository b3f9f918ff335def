"""Board configuration: one TOML file -> frozen, validated objects.

Why strict: the board trades unattended for months, so a typo must fail at start with one line
naming the file, the table, the key, what was expected and what was found — not as a wrong
bid at 3 a.m. Unknown keys are errors for the same reason. Every cadence and market rule is a
key with the primary source's value as its default, so a simulated bench can shrink a day to
minutes by configuration alone.

Relative paths are resolved against the directory of the config file, so a board works the
same whatever the daemon's working directory is (systemd, a shell, a test).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .market import MarketRules

METER_ROLES = ("house", "interchange", "pv")
LEDGER_KINDS = ("rest", "evm")
PARITIES = ("N", "E", "O")


class ConfigError(Exception):
    """One line: file, [table] key, what was expected, what was found."""

    def __init__(self, file: Path | str, table: str, key: str, expected: str, found: Any = dataclasses.MISSING):
        self.file, self.table, self.key, self.expected = str(file), table, key, expected
        where = f"[{table}] {key}" if key else f"[{table}]"
        found_text = "nothing" if found is dataclasses.MISSING else repr(found)
        super().__init__(f"{self.file}: {where}: expected {expected}, found {found_text}")


def _spec(expect: str, check: Callable[[Any], bool] = lambda v: True, **kwargs) -> Any:
    """Dataclass field carrying the human description of a valid value and a check for it."""
    return field(metadata={"expect": expect, "check": check}, **kwargs)


def _between(lo: int, hi: int, why: str = "", *, expect: str | None = None, **kwargs) -> Any:
    """An integer field with a finite range. Every integer key has one: a number the daemon cannot
    use (10**15 s as a timedelta, 10**30 ms as a socket timeout) must fail at check-config with
    one line, not later as a traceback in `dgc run` (issue 7 q). ``why`` is appended to the
    expectation in the error, e.g. " (the router's watchdog is seconds, not minutes)"."""
    return field(metadata={"expect": expect or f"an integer from {lo} to {hi}{why}", "check": lambda v: lo <= v <= hi,
                           "bounds": (lo, hi)}, **kwargs)


DAY_SECONDS = 86_400
MAX_TIMEOUT_MS = 60_000  # one call, one read: longer than a minute is a hang, not patience
MAX_PRICE_PER_KWH_MINOR = 1_000_000_000
MAX_ENERGY_WH = 10_000_000  # 10 MWh: far beyond a household, far inside int64 arithmetic


@dataclass(frozen=True)
class BoardSection:
    name: str = _spec("a board name (letters, digits, '-', '_')", lambda v: v.replace("-", "").replace("_", "").isalnum())
    kind: str = _spec("a board kind such as 'sim' or 'rpi4-sdm630'", lambda v: bool(v), default="sim")
    state_dir: Path = _spec("a directory for the journal", default=Path("var/state"))
    key_file: Path = _spec("a path for the device key", default=Path("var/state/device.key"))


@dataclass(frozen=True)
class LedgerConfig:
    url: str = _spec("an http:// or https:// URL", lambda v: v.startswith(("http://", "https://")))
    # The same limits as a string field of a signed message (messages.MAX_STRING_CHARS), so a bad id fails here, at start.
    ledger_id: str = _spec("the ledger's id (1 to 128 printable ASCII characters)",
                           lambda v: 0 < len(v) <= 128 and v.isascii() and v.isprintable())
    timeout_ms: int = _between(1, MAX_TIMEOUT_MS, default=5000)
    retries: int = _between(0, 10, default=3)
    backoff_ms: int = _between(1, MAX_TIMEOUT_MS, default=500)
    verify_tls: bool = _spec("true or false", default=True)
    max_clock_skew_ms: int = _between(1, 600_000, default=2000)
    # How long the board may go on trusting its own clock while the ledger's time cannot be
    # measured (ledger down, answers too slow to measure): then the clock guard fails closed.
    clock_grace_seconds: int = _between(1, DAY_SECONDS, default=600)
    message_ttl_seconds: int = _between(1, DAY_SECONDS, default=600)
    # Issue 10 part 4 (A3): the ledger authority's public key, pinned at provisioning (dgc-host
    # provision writes it here and into /etc/dgc/identity.toml). A trade moves energy only once
    # it is proven in the record this key signed (scheduler/trade_record.py). Empty: unpinned.
    authority_public_key: str = _spec("empty, or the ledger authority's compressed public key: 66 lowercase hex digits (02/03...)",
                                      lambda v: v == "" or (len(v) == 66 and v[:2] in ("02", "03")
                                                            and all(c in "0123456789abcdef" for c in v)), default="")
    # Issue 9 (G2): which backend. "evm": ``url`` is the relay, the board reads the chain itself
    # from ``rpc_url`` (firmware/ledger/evm.py, docs/ledger-evm.md); the other keys are unused by "rest".
    kind: str = _spec('"rest" (the bench ledger\'s HTTP API) or "evm" (a market contract, through a relay)',
                      lambda v: v in LEDGER_KINDS, default="rest")
    rpc_url: str = _spec("empty, or the chain node's http:// or https:// JSON-RPC URL",
                         lambda v: v == "" or v.startswith(("http://", "https://")), default="")
    chain_id: int = _between(0, 2**32 - 1, " (0 = not set)", default=0)
    contract: str = _spec("empty, or the market contract's address: 0x and 40 hex digits",
                          lambda v: v == "" or (len(v) == 42 and v[:2] == "0x" and all(c in "0123456789abcdefABCDEF" for c in v[2:])),
                          default="")
    confirmations: int = _between(0, 1000, default=0)
    from_block: int = _between(0, 10**12, default=0)
    # "relay": the service provider's relay pays the gas (``url``); "direct": the device key signs
    # and pays for its own transactions to ``rpc_url`` (a pilot without a relay, or a second path
    # when the relay delays messages).
    evm_submit: str = _spec('"relay" (through the relay at url) or "direct" (the device pays its own gas)',
                            lambda v: v in ("relay", "direct"), default="relay")


@dataclass(frozen=True)
class CadenceConfig:
    """Seconds between runs of each daemon job; defaults from the primary source's 8-step flow."""

    measure_seconds: int = _between(1, DAY_SECONDS, default=60)
    bid_seconds: int = _between(1, DAY_SECONDS, default=1800)
    # Issue 10 part 5 (A3): the bid job runs at a per-device offset (firmware/jitter.py) of up to
    # this many seconds (never more than bid_seconds / 2), so a fleet does not bid in one second.
    bid_jitter_seconds: int = _between(0, 3600, " (0 = no jitter)", default=60)
    review_seconds: int = _between(1, DAY_SECONDS, default=300)
    review_horizon_seconds: int = _between(1, DAY_SECONDS, default=1800)
    poll_trades_seconds: int = _between(1, DAY_SECONDS, default=60)
    outbox_seconds: int = _between(1, DAY_SECONDS, default=10)
    clock_check_seconds: int = _between(1, DAY_SECONDS, default=60)


@dataclass(frozen=True)
class PolicyConfig:
    """The owner's trading policy."""

    buy_limit_per_kwh_minor: int = _between(1, MAX_PRICE_PER_KWH_MINOR, " (highest price to pay)", default=3000)
    sell_floor_per_kwh_minor: int = _between(1, MAX_PRICE_PER_KWH_MINOR, " (lowest price to accept)", default=2000)
    battery_capacity_wh: int = _between(0, MAX_ENERGY_WH, default=0)
    battery_reserve_percent: int = _between(0, 100, default=30)
    prefer_renewables: bool = _spec("true or false", default=True)
    max_order_wh: int = _between(1, MAX_ENERGY_WH, default=10_000)
    min_margin_wh: int = _between(0, MAX_ENERGY_WH, default=0)
    # Issue 8 (firmware/policy.py): reservation prices from the grid's tariffs, price ramps.
    strategy: str = _spec('"tariff" (prices from the tariffs, ramped over the reviews) or "baseline" (fixed limits, as before)',
                          lambda v: v in ("tariff", "baseline"), default="tariff")
    retail_per_kwh_minor: int = _between(1, MAX_PRICE_PER_KWH_MINOR, " (the grid's import price)", default=3000)
    feed_in_per_kwh_minor: int = _between(1, MAX_PRICE_PER_KWH_MINOR, " (the grid's export price)", default=850)
    band_min_per_kwh_minor: int = _between(0, MAX_PRICE_PER_KWH_MINOR, " (F_min; 0 = none)", default=0)
    band_max_per_kwh_minor: int = _between(0, MAX_PRICE_PER_KWH_MINOR, " (F_max; 0 = none)", default=0)
    subsidy_percent: int = _between(1, 1000, " (the renewable subsidy factor mu x 100)", default=100)
    price_ramp_seconds: int = _between(0, DAY_SECONDS, default=900)
    sell_quantile_percent: int = _between(0, 50, default=20)
    # With a battery (battery_capacity_wh > 0 and its state of charge known): the battery covers
    # what the sun does not give, so a battery house sells a less cautious quantile (docs/community.md).
    battery_sell_quantile_percent: int = _between(0, 50, default=30)
    buy_quantile_percent: int = _between(50, 100, default=85)
    curve_steps: int = _between(0, 100, " (0 = one order per market)", default=10)
    battery_sales: bool = _spec("true or false", default=True)
    battery_power_w: int = _between(0, 1_000_000, " (0 = half the capacity per hour)", default=0)
    battery_efficiency_percent: int = _between(50, 100, " (each way)", default=95)


@dataclass(frozen=True)
class ForecastConfig:
    history_days: int = _between(1, 60, default=28)
    smoothing_percent: int = _between(1, 100, default=50)
    # Issue 8 (firmware/forecast.py): robust load statistics and a clear-sky PV model.
    method: str = _spec('"robust" (median of many days, clear-sky PV) or "baseline" (smoothed same slot, as before)',
                        lambda v: v in ("robust", "baseline"), default="robust")
    day_seconds: int = _between(0, DAY_SECONDS, " (0 = a real day; a multiple of [market] slot_seconds)", default=0)
    weekday_aware: bool = _spec("true or false", default=True)
    clear_sky_pv: bool = _spec("true or false", default=False)
    site_latitude_millideg: int = _between(-90_000, 90_000, default=0)
    site_longitude_millideg: int = _between(-180_000, 180_000, default=0)


@dataclass(frozen=True)
class BusConfig:
    """One RS-485 bus: one owner of the port, several meters by unit id."""

    name: str = _spec("a bus name", lambda v: bool(v))
    port: str = _spec("a serial device path (prefer /dev/serial/by-id/...)", lambda v: bool(v))
    baudrate: int = _spec("a baud rate such as 9600", lambda v: v in (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200))
    parity: str = _spec("one of N, E, O", lambda v: v in PARITIES, default="N")
    stopbits: int = _spec("1 or 2", lambda v: v in (1, 2), default=1)
    bytesize: int = _spec("7 or 8", lambda v: v in (7, 8), default=8)
    timeout_ms: int = _between(1, MAX_TIMEOUT_MS, default=500)
    request_gap_ms: int = _between(0, 10_000, default=25)
    # The kernel's RS-485 mode (TIOCSRS485) for a UART whose transceiver's driver-enable pin is
    # wired to RTS: the kernel raises it for exactly the length of each frame. USB adapters with
    # automatic direction control need none of this. Delays are in ms because the kernel's
    # struct serial_rs485 counts milliseconds (it clamps them to 100 ms).
    rs485: bool = _spec("true or false", default=False)
    rs485_delay_before_tx_ms: int = _between(0, 100, default=0)
    rs485_delay_after_tx_ms: int = _between(0, 100, default=0)
    rs485_rts_active_high: bool = _spec("true or false", default=True)


RS485_KEYS = ("rs485_delay_before_tx_ms", "rs485_delay_after_tx_ms", "rs485_rts_active_high")
CUSTOM_MODEL = "custom"
# The largest power a meter of each role can plausibly see, when [[meter]] max_power_w is 0: a
# house connection (3 x 100 A x 230 V is 69 kW), the router's line, a PV inverter, with margin.
ROLE_MAX_POWER_W = {"house": 100_000, "interchange": 50_000, "pv": 50_000}


@dataclass(frozen=True)
class MeterConfig:
    name: str = _spec("a meter name", lambda v: bool(v))
    bus: str = _spec("the name of a [[bus]]", lambda v: bool(v))
    unit_id: int = _between(1, 247, " (a Modbus unit id)")
    model: str = _spec("a meter model such as 'sdm120', 'sdm630', 'sdm72dm' or 'custom'", lambda v: bool(v))
    role: str = _spec(f"one of {', '.join(METER_ROLES)}", lambda v: v in METER_ROLES)
    # Plausibility bound on the energy counters, in counter-Wh per hour of wall time (= W on a
    # real board; a time-compressed bench house needs its compression factor times more).
    max_power_w: int = _between(0, 1_000_000_000, " (0: the role's default)", default=0)
    max_failures: int = _between(1, 100, default=3)
    max_registers_per_request: int = _between(0, 125, expect="zero (the model's own limit) or an integer from 1 to 125",
                                              default=0)
    # Interchange meter only (A1, issue 7 l/m): a meter that sees only the net flow (a real
    # bidirectional meter), and how many Wh short of its contract a delivery may be metered and
    # still count as delivered (the router stops at its own count; settlement reads this meter).
    net_only: bool = _spec("true or false", default=False)
    tolerance_wh: int = _between(0, 1000, default=2)

    @property
    def power_limit_w(self) -> int:
        """max_power_w, or the role's default when it is 0."""
        return self.max_power_w or ROLE_MAX_POWER_W[self.role]


@dataclass(frozen=True)
class RegisterConfig:
    """One [[meter.register]] of a custom map: where the quantity is and what the register holds.

    The register's value times ``scale`` / ``scale_divisor`` is the value in ``unit`` (the
    datasheet's unit); the unit's exact factor to the firmware's unit is applied on top, so
    every custom register becomes the same integer-only :class:`Register` as a built-in one.
    """

    quantity: str = _spec("one of import_energy_wh, export_energy_wh, power_w, voltage_mv, frequency_mhz",
                          lambda v: v in ("import_energy_wh", "export_energy_wh", "power_w", "voltage_mv", "frequency_mhz"))
    address: int = _between(0, 0xFFFF, " (the wire address: 30073 in a datasheet is 0x0048 = 72)")
    function_code: int = _spec("3 (holding registers) or 4 (input registers)", lambda v: v in (3, 4))
    type: str = _spec("one of float32, int32, uint32, int16, uint16",
                      lambda v: v in ("float32", "int32", "uint32", "int16", "uint16"))
    unit: str = _spec("the register's unit, e.g. kWh, Wh, W, kW, V, mV, Hz", lambda v: bool(v))
    word_order: str = _spec("big (high word first) or little", lambda v: v in ("big", "little"), default="big")
    scale: int = _between(1, 1_000_000_000, default=1)
    scale_divisor: int = _between(1, 1_000_000_000, default=1)


@dataclass(frozen=True)
class DgrConfig:
    port: str = _spec("a serial device path", lambda v: bool(v))
    baudrate: int = _between(50, 4_000_000, " (a baud rate such as 115200)", default=115200)
    timeout_ms: int = _between(1, MAX_TIMEOUT_MS, default=500)
    retries: int = _between(0, 10, default=3)
    # The router's heartbeat watchdog is seconds (hb_timeout_ms at HELLO; the driver warns when
    # two heartbeats do not fit in it): a minute between heartbeats is already no heartbeat.
    heartbeat_seconds: int = _between(1, 60, default=5)


CONSOLE_BAUDRATES = (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
UNIX_SOCKET_PATH_MAX = 107  # bytes: sockaddr_un.sun_path is 108 bytes on Linux, NUL included


@dataclass(frozen=True)
class ConsoleConfig:
    """The serial console and the control socket (docs/console.md).

    Both paths are plain strings so that an empty value can mean "off" (tty) or "the default
    under state_dir" (control_socket); parse_config resolves relative ones like the ports.
    """

    tty: str = _spec("a serial device path such as /dev/ttyS0, or \"\" for no serial console", default="")
    baudrate: int = _spec(f"one of {', '.join(map(str, CONSOLE_BAUDRATES))}", lambda v: v in CONSOLE_BAUDRATES, default=115200)
    control_socket: str = _spec("a path for the daemon's control socket, or \"\" for state_dir/control.sock", default="")


@dataclass(frozen=True)
class BoardConfig:
    path: Path
    board: BoardSection
    ledger: LedgerConfig
    market: MarketRules
    cadence: CadenceConfig
    policy: PolicyConfig
    forecast: ForecastConfig
    buses: tuple[BusConfig, ...]
    meters: tuple[MeterConfig, ...]
    dgr: DgrConfig
    sim: dict = field(default_factory=dict)  # emulator parameters; read by host_tools, ignored on a board
    console: ConsoleConfig = field(default_factory=ConsoleConfig)

    # The register map of each meter, by meter name: the built-in model's map (with the meter's
    # request limit) or the custom map of its [[meter.register]] tables. Not a table of its own.
    meter_maps: dict = field(default_factory=dict)

    def meter_by_role(self, role: str) -> MeterConfig:
        return next(m for m in self.meters if m.role == role)

    def meter_map(self, name: str):
        """The MeterMap a meter is read with (firmware.drivers.meter_maps)."""
        return self.meter_maps[name]

    def bus(self, name: str) -> BusConfig:
        return next(b for b in self.buses if b.name == name)

    @property
    def journal_path(self) -> Path:
        return self.board.state_dir / "journal.sqlite3"

    @property
    def control_socket_path(self) -> Path:
        """The daemon's control socket: [console] control_socket, default state_dir/control.sock."""
        return Path(self.console.control_socket) if self.console.control_socket else self.board.state_dir / "control.sock"


# [market] keys live in firmware/market.py (MarketRules, shared with the ledger); their ranges here.
_MARKET_BOUNDS = {
    "slot_seconds": (1, DAY_SECONDS, " (1800 = 30 min)"),
    "markets_ahead": (1, 96, ""),
    "lot_wh": (1, 1_000_000, " (100 = 0.1 kWh)"),
    "gate_closure_seconds": (0, DAY_SECONDS, ""),
    "price_min_per_kwh_minor": (1, MAX_PRICE_PER_KWH_MINOR, ""),
    "price_max_per_kwh_minor": (1, MAX_PRICE_PER_KWH_MINOR, ""),
}
_MARKET_CHECKS = {
    key: (f"an integer from {lo} to {hi}{why}", lambda v, lo=lo, hi=hi: lo <= v <= hi)
    for key, (lo, hi, why) in _MARKET_BOUNDS.items()
}


def int_bounds(cls: type, name: str) -> tuple[int, int] | None:
    """The (lowest, highest) value an integer key of a config table (or MarketRules) accepts; None
    for a key whose values are a set (baud rates) rather than a range."""
    if cls is MarketRules:
        lo, hi, _ = _MARKET_BOUNDS[name]
        return lo, hi
    fld = next(f for f in dataclasses.fields(cls) if f.name == name)
    return fld.metadata.get("bounds")


def _type_name(tp: Any) -> str:
    return {int: "an integer", str: "a string", bool: "true or false", Path: "a path string"}.get(tp, str(tp))


def _build(cls: type, table: str, raw: Any, file: Path, base_dir: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(file, table, "", "a table", raw)
    known = {f.name: f for f in dataclasses.fields(cls) if f.name != "path"}
    for key in raw:
        if key not in known:
            raise ConfigError(file, table, key, f"one of the keys {', '.join(sorted(known))}", f"unknown key {key!r}")
    values = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, fld in known.items():
        tp = {"int": int, "str": str, "bool": bool, "Path": Path}.get(hints[name], hints[name])
        if name not in raw:
            if fld.default is dataclasses.MISSING:
                raise ConfigError(file, table, name, fld.metadata.get("expect", _type_name(tp)))
            continue
        value = raw[name]
        expected_type = str if tp is Path else tp
        if type(value) is not expected_type:
            expect = fld.metadata.get("expect", _type_name(tp))
            if not expect.startswith(_type_name(tp)):  # "an integer from 1 to 60" already says it
                expect += f" ({_type_name(tp)})"
            raise ConfigError(file, table, name, expect, value)
        check = fld.metadata.get("check", _MARKET_CHECKS.get(name, (None, lambda v: True))[1])
        if not check(value):
            expect = fld.metadata.get("expect") or _MARKET_CHECKS[name][0]
            raise ConfigError(file, table, name, expect, value)
        if tp is Path or name == "port":  # Path fields stay Path objects; a port stays a string
            value = _resolve(base_dir, value, keep_type=tp if tp is Path else str)
        values[name] = value
    obj = cls(**values)
    # Default relative paths are resolved too.
    for name in known:
        if name not in raw and isinstance(getattr(obj, name), Path):
            obj = dataclasses.replace(obj, **{name: _resolve(base_dir, getattr(obj, name))})
    return obj


def _resolve(base_dir: Path, value: Any, keep_type: type = Path) -> Any:
    """Absolute, normalised path relative to the config's directory; symlinks are not followed
    (an emulator's port is a symlink to a pty that must stay the link)."""
    path = Path(os.path.normpath(base_dir / value))
    return str(path) if keep_type is str else path


def _market_rules(raw: Any, file: Path) -> MarketRules:
    if not isinstance(raw, dict):
        raise ConfigError(file, "market", "", "a table", raw)
    defaults = MarketRules()
    values = {}
    for key, value in raw.items():
        if key not in _MARKET_CHECKS:
            raise ConfigError(file, "market", key, f"one of the keys {', '.join(sorted(_MARKET_CHECKS))}", f"unknown key {key!r}")
        expect, check = _MARKET_CHECKS[key]
        if type(value) is not int or not check(value):
            raise ConfigError(file, "market", key, expect, value)
        values[key] = value
    rules = dataclasses.replace(defaults, **values)
    if rules.price_min_per_kwh_minor > rules.price_max_per_kwh_minor:
        raise ConfigError(file, "market", "price_max_per_kwh_minor",
                          f"at least price_min_per_kwh_minor ({rules.price_min_per_kwh_minor})", rules.price_max_per_kwh_minor)
    if rules.gate_closure_seconds >= rules.slot_seconds * rules.markets_ahead:
        raise ConfigError(file, "market", "gate_closure_seconds",
                          f"less than slot_seconds x markets_ahead ({rules.slot_seconds * rules.markets_ahead})", rules.gate_closure_seconds)
    return rules


TOP_LEVEL_TABLES = ("board", "ledger", "market", "cadence", "policy", "forecast", "bus", "meter", "dgr", "sim", "console")


def _check_ledger(file: Path, ledger: "LedgerConfig") -> None:
    """kind = "evm" needs the chain's coordinates; without them the daemon could not sign a message."""
    if ledger.kind != "evm":
        return
    for key, missing in (("rpc_url", not ledger.rpc_url), ("chain_id", not ledger.chain_id), ("contract", not ledger.contract)):
        if missing:
            raise ConfigError(file, "ledger", key, f'a value when kind = "evm" ({LedgerConfig.__dataclass_fields__[key].metadata["expect"]})',
                              getattr(ledger, key))


def _check_trading(file: Path, market: MarketRules, policy: "PolicyConfig", forecast: "ForecastConfig") -> None:
    """Keys of [policy] and [forecast] that must agree with each other or with [market]."""
    if policy.feed_in_per_kwh_minor > policy.retail_per_kwh_minor:
        raise ConfigError(file, "policy", "feed_in_per_kwh_minor",
                          f"at most retail_per_kwh_minor ({policy.retail_per_kwh_minor})", policy.feed_in_per_kwh_minor)
    if policy.band_max_per_kwh_minor and policy.band_min_per_kwh_minor > policy.band_max_per_kwh_minor:
        raise ConfigError(file, "policy", "band_min_per_kwh_minor",
                          f"at most band_max_per_kwh_minor ({policy.band_max_per_kwh_minor})", policy.band_min_per_kwh_minor)
    day = forecast.day_seconds or DAY_SECONDS
    if day % market.slot_seconds:
        raise ConfigError(file, "forecast", "day_seconds",
                          f"a whole number of [market] slot_seconds ({market.slot_seconds})", forecast.day_seconds)


def parse_config(text: str, file: Path | str = "<config>") -> BoardConfig:
    file = Path(file)
    base_dir = file.resolve().parent if file.name != "<config>" else Path.cwd()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "toml", "", "valid TOML", str(exc)) from None
    for key in raw:
        if key not in TOP_LEVEL_TABLES:
            raise ConfigError(file, key, "", f"one of the tables {', '.join(TOP_LEVEL_TABLES)}", f"unknown table [{key}]")
    for required in ("board", "ledger", "bus", "meter", "dgr"):
        if required not in raw:
            raise ConfigError(file, required, "", f"a [{required}] table" if required not in ("bus", "meter") else f"at least one [[{required}]] table")
    board = _build(BoardSection, "board", raw["board"], file, base_dir)
    ledger = _build(LedgerConfig, "ledger", raw["ledger"], file, base_dir)
    _check_ledger(file, ledger)
    market = _market_rules(raw.get("market", {}), file)
    cadence = _build(CadenceConfig, "cadence", raw.get("cadence", {}), file, base_dir)
    policy = _build(PolicyConfig, "policy", raw.get("policy", {}), file, base_dir)
    forecast = _build(ForecastConfig, "forecast", raw.get("forecast", {}), file, base_dir)
    _check_trading(file, market, policy, forecast)
    dgr = _build(DgrConfig, "dgr", raw["dgr"], file, base_dir)
    buses_raw, meters_raw = raw["bus"], raw["meter"]
    if not isinstance(buses_raw, list) or not buses_raw:
        raise ConfigError(file, "bus", "", "one or more [[bus]] tables", buses_raw)
    if not isinstance(meters_raw, list) or not meters_raw:
        raise ConfigError(file, "meter", "", "one or more [[meter]] tables", meters_raw)
    buses = tuple(_build(BusConfig, f"bus.{i}", b, file, base_dir) for i, b in enumerate(buses_raw))
    _check_rs485(file, buses_raw, buses)
    meters = tuple(_build(MeterConfig, f"meter.{i}", _without_registers(m), file, base_dir) for i, m in enumerate(meters_raw))
    _check_references(file, buses, meters)
    meter_maps = _meter_maps(file, meters, meters_raw)
    sim = raw.get("sim", {})
    if not isinstance(sim, dict):
        raise ConfigError(file, "sim", "", "a table", sim)
    return BoardConfig(path=file, board=board, ledger=ledger, market=market, cadence=cadence, policy=policy,
                       forecast=forecast, buses=buses, meters=meters, dgr=dgr, sim=sim, meter_maps=meter_maps,
                       console=_console(raw.get("console", {}), file, base_dir, board, dgr, buses))


def _console(raw: Any, file: Path, base_dir: Path, board: BoardSection, dgr: DgrConfig,
             buses: tuple[BusConfig, ...]) -> ConsoleConfig:
    """[console]: relative paths resolved like the ports; a tty owned by nothing else; a configured
    socket path short enough to bind."""
    console = _build(ConsoleConfig, "console", raw, file, base_dir)
    if console.tty:
        console = dataclasses.replace(console, tty=_resolve(base_dir, console.tty, keep_type=str))
        if console.tty == dgr.port or console.tty in (b.port for b in buses):
            raise ConfigError(file, "console", "tty", "a serial device not used by [dgr] or a [[bus]]", console.tty)
    if console.control_socket:
        console = dataclasses.replace(console, control_socket=_resolve(base_dir, console.control_socket, keep_type=str))
        if len(os.fsencode(console.control_socket)) > UNIX_SOCKET_PATH_MAX:
            raise ConfigError(file, "console", "control_socket",
                              f"a socket path of at most {UNIX_SOCKET_PATH_MAX} bytes (the Unix socket limit)", console.control_socket)
    # The default (state_dir/control.sock) is not checked here: commands other than `dgc run` do not
    # need the socket, and the daemon runs without it (with an alarm line) if it cannot bind.
    return console


def _check_references(file: Path, buses: tuple[BusConfig, ...], meters: tuple[MeterConfig, ...]) -> None:
    from .drivers.meter_maps import METER_MAPS  # data only; keeps the model list in one place

    bus_names = [b.name for b in buses]
    for i, bus in enumerate(buses):
        if bus_names.count(bus.name) > 1:
            raise ConfigError(file, f"bus.{i}", "name", "a name used by one [[bus]] only", bus.name)
    ports = [b.port for b in buses]
    for i, bus in enumerate(buses):
        if ports.count(bus.port) > 1:
            raise ConfigError(file, f"bus.{i}", "port", "a port owned by one [[bus]] only (put several meters on one bus)", bus.port)
    seen: set[tuple[str, int]] = set()
    names: set[str] = set()
    for i, meter in enumerate(meters):
        table = f"meter.{i}"
        if meter.bus not in bus_names:
            raise ConfigError(file, table, "bus", f"the name of a [[bus]] ({', '.join(bus_names)})", meter.bus)
        if meter.model not in METER_MAPS and meter.model != CUSTOM_MODEL:
            raise ConfigError(file, table, "model", f"one of {', '.join(sorted(METER_MAPS))} or {CUSTOM_MODEL!r} "
                              "(with [[meter.register]] tables)", meter.model)
        if (meter.bus, meter.unit_id) in seen:
            raise ConfigError(file, table, "unit_id", f"a unit id not already used on bus {meter.bus!r}", meter.unit_id)
        if meter.name in names:
            raise ConfigError(file, table, "name", "a meter name used once", meter.name)
        seen.add((meter.bus, meter.unit_id))
        names.add(meter.name)
    for role in ("house", "interchange"):
        count = sum(1 for m in meters if m.role == role)
        if count != 1:
            raise ConfigError(file, "meter", "role", f"exactly one [[meter]] with role = {role!r}", f"{count} such meters")


def _check_rs485(file: Path, buses_raw: list, buses: tuple[BusConfig, ...]) -> None:
    """An rs485_* setting on a bus without ``rs485 = true`` would be silently ignored: refuse it."""
    for i, (raw, bus) in enumerate(zip(buses_raw, buses)):
        for key in RS485_KEYS:
            if key in raw and not bus.rs485:
                raise ConfigError(file, f"bus.{i}", key, "no rs485_* key unless rs485 = true on this [[bus]]", raw[key])


def _without_registers(raw: Any) -> Any:
    """A [[meter]] table minus its [[meter.register]] array, which _meter_maps parses."""
    return {k: v for k, v in raw.items() if k != "register"} if isinstance(raw, dict) else raw


def _meter_maps(file: Path, meters: tuple[MeterConfig, ...], meters_raw: list) -> dict:
    """The register map of every meter: a built-in model's (with the meter's request limit) or
    the custom map of its [[meter.register]] tables, checked here so a bad map fails at start
    with the file, the register's table and the key."""
    from .drivers.meter_maps import METER_MAPS, MeterMap, RegisterMapError, check_map, with_request_limit

    maps = {}
    for i, (meter, raw) in enumerate(zip(meters, meters_raw)):
        table = f"meter.{i}"
        registers_raw = raw.get("register")
        if meter.model != CUSTOM_MODEL:
            if registers_raw is not None:
                raise ConfigError(file, table, "register", f"no [[meter.register]] tables unless model = {CUSTOM_MODEL!r} "
                                  f"(model {meter.model!r} has its built-in map)", f"{len(registers_raw)} table(s)"
                                  if isinstance(registers_raw, list) else registers_raw)
            builtin = METER_MAPS[meter.model]
            limit = meter.max_registers_per_request or builtin.max_registers_per_request
            maps[meter.name] = with_request_limit(builtin, limit)
            continue
        if not isinstance(registers_raw, list) or not registers_raw:
            raise ConfigError(file, table, "register", "one or more [[meter.register]] tables (model = 'custom')",
                              registers_raw if registers_raw is not None else dataclasses.MISSING)
        registers = tuple(_register(file, f"{table}.register.{j}", r) for j, r in enumerate(registers_raw))
        limit = meter.max_registers_per_request or 80
        seen: dict[str, int] = {}
        for j, reg in enumerate(registers):
            where = f"{table}.register.{j}"
            if reg.quantity in seen:
                raise ConfigError(file, where, "quantity", f"a quantity not already mapped by [{table}.register.{seen[reg.quantity]}]",
                                  reg.quantity)
            seen[reg.quantity] = j
            if reg.address + reg.words > 0x10000:
                raise ConfigError(file, where, "address", f"an address whose {reg.words} register(s) end by 65535", reg.address)
            if reg.words > limit:
                raise ConfigError(file, table, "max_registers_per_request", f"at least {reg.words} (the size of a {reg.data_type})", limit)
        missing = [q for q in ("import_energy_wh", "export_energy_wh") if q not in seen]
        if missing:
            raise ConfigError(file, table, "register", "[[meter.register]] tables for both import_energy_wh and "
                              "export_energy_wh (readings are journalled and settled from both counters)",
                              f"none for {' and '.join(missing)}")
        custom = MeterMap(model=f"{CUSTOM_MODEL}:{meter.name}", registers=registers, max_registers_per_request=limit)
        try:
            check_map(custom)
        except RegisterMapError as exc:  # the checks above should have caught it; never let it pass
            raise ConfigError(file, table, "register", "a register map the driver can read", str(exc)) from None
        maps[meter.name] = custom
    return maps


def _register(file: Path, table: str, raw: Any):
    """One [[meter.register]] -> a driver Register with its exact integer scale."""
    from math import gcd

    from .drivers.meter_maps import QUANTITY_UNITS, Register

    spec = _build(RegisterConfig, table, raw, file, Path.cwd())
    units = QUANTITY_UNITS[spec.quantity]
    if spec.unit not in units:
        raise ConfigError(file, table, "unit", f"a unit of {spec.quantity}: one of {', '.join(units)}", spec.unit)
    multiplier, divisor = units[spec.unit] * spec.scale, spec.scale_divisor
    common = gcd(multiplier, divisor)
    return Register(spec.quantity, spec.address, spec.type, multiplier // common, function_code=spec.function_code,
                    word_order=spec.word_order, scale_divisor=divisor // common)


def check_state_dir(config: BoardConfig, *, create: bool = False) -> None:
    """Raise ConfigError unless ``[board] state_dir`` is (or can be created as) a writable directory.

    Not part of parsing: a host tool parses configs of other machines (a flash target) whose
    paths do not exist here. `dgc check-config` calls it without ``create`` (no side effect but a
    probe file, created and removed at once, in the nearest existing directory), `dgc run` with
    it, before it binds the control socket or opens the journal in that directory. A probe file
    rather than os.access(): root passes os.access() on a read-only mount and under /proc.
    """
    import errno
    import tempfile

    path = config.board.state_dir
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        probe_dir = path
        while not probe_dir.exists() and probe_dir != probe_dir.parent:
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{probe_dir} is not a directory")
        fd, probe = tempfile.mkstemp(prefix=".dgc-write-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(config.path, "board", "state_dir", "a writable directory (created if missing)",
                          f"{path}: {exc.strerror or exc}") from None


def load_config(path: Path | str) -> BoardConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "file", "", "an existing board config file (TOML)", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "file", "", "a readable UTF-8 TOML file", str(exc)) from None
    return parse_config(text, path)
