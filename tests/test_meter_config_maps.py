"""Meter maps from the board config: SDM72D-M, custom [[meter.register]] maps, request limits,
RS-485 bus settings and plausibility keys. Errors name file, table, key, expected and found."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from serial.rs485 import RS485Settings

from firmware.config import ROLE_MAX_POWER_W, BusConfig, ConfigError, RegisterConfig, load_config, parse_config
from firmware.drivers.meter import rs485_settings
from firmware.drivers.meter_maps import (
    METER_MAPS,
    Register,
    decode_block,
    decode_raw,
    encode_raw,
    plan_blocks,
    scale_value,
)

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "board-config.md"

BASE = """\
[board]
name = "test-board"

[ledger]
url = "http://127.0.0.1:8750"
ledger_id = "dgc-test"

[[bus]]
name = "rs485"
port = "ports/meter-bus"
baudrate = 9600
{bus_extra}

[[meter]]
name = "interchange"
bus = "rs485"
unit_id = 2
model = "sdm120"
role = "interchange"

[[meter]]
name = "house"
bus = "rs485"
unit_id = 1
model = "{model}"
role = "house"
{meter_extra}

[dgr]
port = "ports/dgr"
"""

CUSTOM = """\
max_registers_per_request = 40

[[meter.register]]
quantity = "import_energy_wh"
address = 0x0100
function_code = 3
type = "int32"
word_order = "little"
unit = "Wh"

[[meter.register]]
quantity = "export_energy_wh"
address = 0x0102
function_code = 3
type = "uint32"
unit = "kWh"
scale_divisor = 100

[[meter.register]]
quantity = "power_w"
address = 0x0110
function_code = 3
type = "int32"
unit = "W"
scale_divisor = 10

[[meter.register]]
quantity = "voltage_mv"
address = 0x0000
function_code = 4
type = "uint16"
unit = "V"
scale_divisor = 10
"""


def config_text(model: str = "sdm630", meter_extra: str = "", bus_extra: str = "") -> str:
    return BASE.format(model=model, meter_extra=meter_extra, bus_extra=bus_extra)


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "board.toml")
    return info.value


# --- SDM72D-M ----------------------------------------------------------------------------------------

def test_sdm72dm_map_is_the_eastron_input_register_layout():
    sdm72 = METER_MAPS["sdm72dm"]
    layout = {r.quantity: (r.address, r.data_type, r.function_code, r.word_order, r.scale) for r in sdm72.registers}
    assert layout == {
        "voltage_mv": (0x0000, "float32", 4, "big", 1000),  # 30001, V
        "power_w": (0x0034, "float32", 4, "big", 1),  # 30053, W
        "frequency_mhz": (0x0046, "float32", 4, "big", 1000),  # 30071, Hz
        "import_energy_wh": (0x0048, "float32", 4, "big", 1000),  # 30073, kWh
        "export_energy_wh": (0x004A, "float32", 4, "big", 1000),  # 30075, kWh
    }
    assert sdm72.max_registers_per_request == 60
    assert [(b.address, b.count) for b in plan_blocks(sdm72)] == [(0x0000, 2), (0x0034, 24)]


def test_sdm72dm_in_a_board_config():
    cfg = parse_config(config_text("sdm72dm"), "board.toml")
    assert cfg.meter_map("house") == METER_MAPS["sdm72dm"]
    assert cfg.meter_map("interchange") == METER_MAPS["sdm120"]


def test_request_limit_override_applies_to_a_builtin_model():
    cfg = parse_config(config_text("sdm630", "max_registers_per_request = 10"), "board.toml")
    blocks = plan_blocks(cfg.meter_map("house"))
    # power alone, then frequency..export energy (0x0046..0x004B): the 24-register block is split
    assert [(b.address, b.count) for b in blocks] == [(0x0000, 2), (0x0034, 2), (0x0046, 6)]
    assert cfg.meter_map("interchange").max_registers_per_request == 80  # the model's own


# --- custom maps --------------------------------------------------------------------------------------

def test_custom_map_parses_into_exact_integer_registers():
    cfg = parse_config(config_text("custom", CUSTOM), "board.toml")
    meter_map = cfg.meter_map("house")
    regs = {r.quantity: r for r in meter_map.registers}
    assert regs["import_energy_wh"] == Register("import_energy_wh", 0x0100, "int32", 1, function_code=3, word_order="little")
    assert regs["export_energy_wh"] == Register("export_energy_wh", 0x0102, "uint32", 10, function_code=3)  # kWh/100 = 10 Wh
    assert regs["power_w"] == Register("power_w", 0x0110, "int32", 1, function_code=3, scale_divisor=10)
    assert regs["voltage_mv"] == Register("voltage_mv", 0x0000, "uint16", 100, function_code=4)  # V/10 = 100 mV
    assert meter_map.max_registers_per_request == 40
    # function codes are never merged; 0x0100..0x0111 fit one block of 18
    assert [(b.function_code, b.address, b.count) for b in plan_blocks(meter_map)] == [(3, 0x0100, 18), (4, 0x0000, 1)]


def test_custom_map_decodes_what_the_datasheet_means():
    regs = {r.quantity: r for r in parse_config(config_text("custom", CUSTOM), "board.toml").meter_map("house").registers}
    # -1234.5 W as an int32 in 0.1 W: -12345 -> -1235 W (half away from zero, integer arithmetic)
    power = regs["power_w"]
    assert scale_value(power, decode_raw(power, encode_raw(power, -12345))) == -1235
    assert scale_value(power, decode_raw(power, encode_raw(power, 12344))) == 1234
    # 123456.78 kWh as a uint32 in 0.01 kWh -> 123456780 Wh exactly
    export = regs["export_energy_wh"]
    assert scale_value(export, decode_raw(export, encode_raw(export, 12_345_678))) == 123_456_780
    # int32 Wh, low word first: 0x0001_0000 = 65536 Wh sent as [0x0000, 0x0001]
    imp = regs["import_energy_wh"]
    assert decode_raw(imp, [0x0000, 0x0001]) == 65536


def test_custom_block_decoding_over_a_whole_block():
    meter_map = parse_config(config_text("custom", CUSTOM), "board.toml").meter_map("house")
    block = plan_blocks(meter_map)[0]
    words = [0] * block.count
    values = {"import_energy_wh": 987_654, "export_energy_wh": 4_321, "power_w": -15}
    for reg in block.registers:
        offset = reg.address - block.address
        words[offset:offset + reg.words] = encode_raw(reg, values[reg.quantity])
    assert decode_block(block, words) == {"import_energy_wh": 987_654, "export_energy_wh": 43_210, "power_w": -2}


@pytest.mark.parametrize("edit, table, key, expected, found", [
    (lambda t: t.replace('unit = "Wh"', 'unit = "V"', 1), "meter.1.register.0", "unit",
     "a unit of import_energy_wh: one of Wh, kWh, MWh", "'V'"),
    (lambda t: t.replace('type = "uint32"', 'type = "float64"', 1), "meter.1.register.1", "type",
     "one of float32, int32, uint32, int16, uint16", "'float64'"),
    (lambda t: t.replace("function_code = 3", "function_code = 2", 1), "meter.1.register.0", "function_code",
     "3 (holding registers) or 4 (input registers)", "2"),
    (lambda t: t.replace('word_order = "little"', 'word_order = "middle"', 1), "meter.1.register.0", "word_order",
     "big (high word first) or little", "'middle'"),
    (lambda t: t.replace("scale_divisor = 100", "scale_divisor = 0", 1), "meter.1.register.1", "scale_divisor",
     "an integer from 1 to 1000000000", "0"),
    (lambda t: t.replace("scale_divisor = 100", "scale_divisor = 0.01", 1), "meter.1.register.1", "scale_divisor",
     "an integer from 1 to 1000000000", "0.01"),
    (lambda t: t.replace("address = 0x0110", "address = 70000", 1), "meter.1.register.2", "address",
     "an integer from 0 to 65535 (the wire address", "70000"),
    (lambda t: t.replace("address = 0x0000", "address = 0xFFFF", 1).replace('type = "uint16"', 'type = "uint32"', 1),
     "meter.1.register.3", "address", "an address whose 2 register(s) end by 65535", "65535"),
    (lambda t: t.replace('quantity = "power_w"', 'quantity = "import_energy_wh"', 1).replace('unit = "W"\n', 'unit = "Wh"\n', 1),
     "meter.1.register.2", "quantity",
     "a quantity not already mapped by [meter.1.register.0]", "'import_energy_wh'"),
    (lambda t: t.replace('quantity = "power_w"', 'quantity = "current_ma"', 1), "meter.1.register.2", "quantity",
     "one of import_energy_wh, export_energy_wh, power_w, voltage_mv, frequency_mhz", "'current_ma'"),
    (lambda t: t.replace('unit = "W"\n', 'unit = "W"\ngain = 2\n', 1), "meter.1.register.2", "gain",
     "one of the keys", '"unknown key \'gain\'"'),
    (lambda t: t.replace('unit = "W"\n', '', 1), "meter.1.register.2", "unit",
     "the register's unit", "nothing"),
    (lambda t: t.replace('quantity = "export_energy_wh"', 'quantity = "frequency_mhz"', 1)
     .replace('unit = "kWh"', 'unit = "Hz"', 1), "meter.1", "register",
     "[[meter.register]] tables for both import_energy_wh and export_energy_wh", "'none for export_energy_wh'"),
    (lambda t: t.replace("max_registers_per_request = 40", "max_registers_per_request = 1", 1), "meter.1",
     "max_registers_per_request", "at least 2 (the size of a int32)", "1"),
    (lambda t: t.replace("max_registers_per_request = 40", "max_registers_per_request = 126", 1), "meter.1",
     "max_registers_per_request", "zero (the model's own limit) or an integer from 1 to 125", "126"),
])
def test_custom_map_errors_name_file_table_key_expected_and_found(edit, table, key, expected, found):
    error = error_of(edit(config_text("custom", CUSTOM)))
    assert (error.file, error.table, error.key) == ("board.toml", table, key)
    message = str(error)
    assert message.startswith(f"board.toml: [{table}] {key}: expected {expected}")
    assert message.endswith(f", found {found}"), message
    assert "\n" not in message


def test_custom_model_without_registers_is_an_error():
    error = error_of(config_text("custom", "max_power_w = 5000"))
    assert str(error) == ("board.toml: [meter.1] register: expected one or more [[meter.register]] tables "
                          "(model = 'custom'), found nothing")


def test_registers_on_a_builtin_model_are_an_error():
    error = error_of(config_text("sdm630", CUSTOM))
    assert (error.table, error.key) == ("meter.1", "register")
    assert "no [[meter.register]] tables unless model = 'custom' (model 'sdm630' has its built-in map)" in str(error)
    assert str(error).endswith("found '4 table(s)'")


def test_unknown_model_names_the_builtin_ones_and_custom():
    error = error_of(config_text("sdm999"))
    assert str(error) == ("board.toml: [meter.1] model: expected one of sdm120, sdm630, sdm72dm or 'custom' "
                          "(with [[meter.register]] tables), found 'sdm999'")


def test_dgc_exits_2_with_one_line_for_a_bad_register(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(config_text("custom", CUSTOM.replace('unit = "Wh"', 'unit = "kW"', 1)))
    result = subprocess.run([sys.executable, "-m", "firmware.cli", "check-config", str(path)], capture_output=True,
                            text=True, timeout=30, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"dgc: {path}: [meter.1.register.0] unit: expected a unit of import_energy_wh: one of Wh, kWh, MWh, found 'kW'"]


# --- plausibility keys ------------------------------------------------------------------------------

def test_max_power_defaults_by_role_and_can_be_set():
    cfg = parse_config(config_text("sdm630", "max_power_w = 2000000\nmax_failures = 5"), "board.toml")
    house, interchange = cfg.meter_by_role("house"), cfg.meter_by_role("interchange")
    assert (house.max_power_w, house.power_limit_w, house.max_failures) == (2_000_000, 2_000_000, 5)
    assert (interchange.max_power_w, interchange.power_limit_w, interchange.max_failures) == (0, ROLE_MAX_POWER_W["interchange"], 3)


@pytest.mark.parametrize("extra, key, found", [
    ("max_power_w = -1", "max_power_w", "-1"),
    ("max_failures = 0", "max_failures", "0"),
    ('max_failures = "3"', "max_failures", "'3'"),
])
def test_plausibility_key_errors(extra, key, found):
    error = error_of(config_text("sdm630", extra))
    assert (error.table, error.key) == ("meter.1", key) and str(error).endswith(f"found {found}")


def test_sim_board_allows_its_compressed_time():
    cfg = load_config(REPO / "board_configs" / "sim.toml")
    assert all(m.power_limit_w == 2_000_000 for m in cfg.meters)


# --- RS-485 bus settings ---------------------------------------------------------------------------

def test_rs485_settings_object_from_the_bus_config():
    bus = BusConfig(name="uart", port="/dev/ttyAMA0", baudrate=9600, rs485=True,
                    rs485_delay_before_tx_ms=2, rs485_delay_after_tx_ms=3)
    settings = rs485_settings(bus)
    assert isinstance(settings, RS485Settings)
    assert (settings.rts_level_for_tx, settings.rts_level_for_rx, settings.loopback) == (True, False, False)
    assert (settings.delay_before_tx, settings.delay_before_rx) == (0.002, 0.003)  # pyserial takes seconds
    inverted = rs485_settings(BusConfig(name="uart", port="/dev/ttyAMA0", baudrate=9600, rs485=True,
                                        rs485_rts_active_high=False))
    assert (inverted.rts_level_for_tx, inverted.rts_level_for_rx) == (False, True)
    assert (inverted.delay_before_tx, inverted.delay_before_rx) == (0, 0)
    assert rs485_settings(BusConfig(name="usb", port="/dev/ttyUSB0", baudrate=9600)) is None


def test_rs485_keys_parse_and_are_checked():
    cfg = parse_config(config_text(bus_extra="rs485 = true\nrs485_delay_before_tx_ms = 1\nrs485_rts_active_high = false"),
                       "board.toml")
    bus = cfg.bus("rs485")
    assert (bus.rs485, bus.rs485_delay_before_tx_ms, bus.rs485_delay_after_tx_ms, bus.rs485_rts_active_high) == (True, 1, 0, False)
    error = error_of(config_text(bus_extra="rs485_delay_after_tx_ms = 5"))
    assert str(error) == ("board.toml: [bus.0] rs485_delay_after_tx_ms: expected no rs485_* key unless rs485 = true "
                          "on this [[bus]], found 5")
    error = error_of(config_text(bus_extra="rs485 = true\nrs485_delay_before_tx_ms = 101"))
    assert (error.key, str(error).endswith("found 101")) == ("rs485_delay_before_tx_ms", True)
    error = error_of(config_text(bus_extra="rs485 = 1"))
    assert (error.key, str(error).endswith("found 1")) == ("rs485", True)


# --- the reference doc ------------------------------------------------------------------------------

def test_the_doc_describes_every_register_key_with_its_default():
    """The [[meter.register]] keys live in their own section at the end of the reference (not
    under a ### table heading, which tests/test_config.py reserves for top-level tables)."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Custom register maps ([[meter.register]])", 1)[1]
    rows = {m.group(1): [c.strip() for c in m.group(2).split("|")]
            for m in re.finditer(r"^\| (\w+) \|(.*)\|$", section, flags=re.M)}
    fields = {f.name: f for f in dataclasses.fields(RegisterConfig)}
    assert set(rows) == set(fields)
    for name, fld in fields.items():
        documented = rows[name][1]
        if fld.default is dataclasses.MISSING:
            assert documented == "required", name
        else:
            assert tomllib.loads(f"v = {documented.strip('`')}")["v"] == fld.default, name
        assert rows[name][3], name
    # the example in the doc is a valid custom map
    example = re.search(r"```toml\n(.*?)```", section, flags=re.S).group(1)
    cfg = parse_config(config_text("sdm630").replace(
        '[[meter]]\nname = "house"\nbus = "rs485"\nunit_id = 1\nmodel = "sdm630"\nrole = "house"\n', example), "board.toml")
    assert {r.quantity for r in cfg.meter_map("house").registers} == {"import_energy_wh", "export_energy_wh", "power_w"}
