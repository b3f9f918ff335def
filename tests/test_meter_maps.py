"""Register maps, block planning and decoding: pure functions, no bus.

Decoding is cross-checked against pymodbus's own converter (``convert_from_registers``),
an independent implementation of the same wire format.
"""

from __future__ import annotations

import math

import pytest
from pymodbus.client import ModbusSerialClient

from firmware.drivers.meter_maps import (
    METER_MAPS,
    REQUEST_OVERHEAD_REGISTERS,
    Block,
    DecodeError,
    MeterMap,
    Register,
    RegisterMapError,
    decode_block,
    decode_raw,
    encode_raw,
    plan_blocks,
    round_half_away,
    scale_value,
)

DT = ModbusSerialClient.DATATYPE
PYMODBUS_TYPES = {"float32": DT.FLOAT32, "int32": DT.INT32, "uint32": DT.UINT32, "int16": DT.INT16, "uint16": DT.UINT16}


def _map(*registers: Register, limit: int = 80) -> MeterMap:
    return MeterMap("test", registers, max_registers_per_request=limit)


def _covered(blocks: tuple[Block, ...], meter_map: MeterMap) -> None:
    """Every register is read whole by exactly one block with its own function code."""
    for reg in meter_map.registers:
        owners = [b for b in blocks if reg in b.registers]
        assert len(owners) == 1, f"{reg.quantity} is in {len(owners)} blocks"
        block = owners[0]
        assert block.function_code == reg.function_code
        assert block.address <= reg.address and reg.address + reg.words <= block.end


# --- planning --------------------------------------------------------------------------------

def test_sdm630_reads_in_two_requests():
    """Voltage alone at 0x0000, then power..export energy (0x0034..0x004B) in one block: the
    50-register gap after the voltage costs more than a request, the 16-register gap after the
    power does not."""
    blocks = plan_blocks(METER_MAPS["sdm630"])
    assert [(b.function_code, b.address, b.count) for b in blocks] == [(4, 0x0000, 2), (4, 0x0034, 24)]
    _covered(blocks, METER_MAPS["sdm630"])


def test_sdm120_reads_in_two_requests():
    blocks = plan_blocks(METER_MAPS["sdm120"])
    assert [(b.address, b.count) for b in blocks] == [(0x0000, 14), (0x0046, 6)]
    _covered(blocks, METER_MAPS["sdm120"])


def test_contiguous_registers_make_one_block():
    m = _map(*(Register(q, 2 * i, "float32", 1) for i, q in enumerate(("voltage_mv", "power_w", "frequency_mhz"))))
    assert [(b.address, b.count) for b in plan_blocks(m)] == [(0, 6)]


def test_gap_is_bridged_exactly_when_cheaper_than_a_request():
    def plan(gap: int) -> list[tuple[int, int]]:
        m = _map(Register("voltage_mv", 0, "float32", 1), Register("power_w", 2 + gap, "float32", 1))
        return [(b.address, b.count) for b in plan_blocks(m)]

    # One block costs overhead + 4 + gap; two cost 2 x overhead + 4: bridge while gap <= overhead.
    assert plan(REQUEST_OVERHEAD_REGISTERS) == [(0, 4 + REQUEST_OVERHEAD_REGISTERS)]
    assert plan(REQUEST_OVERHEAD_REGISTERS + 1) == [(0, 2), (3 + REQUEST_OVERHEAD_REGISTERS, 2)]
    assert len(plan(0)) == 1


def test_request_limit_splits_blocks():
    regs = [Register(q, 10 * i, "float32", 1) for i, q in enumerate(("voltage_mv", "power_w", "frequency_mhz", "import_energy_wh"))]
    m = _map(*regs, limit=12)
    blocks = plan_blocks(m, overhead_registers=100)  # bridging is always wanted, only the limit stops it
    assert all(b.count <= 12 for b in blocks)
    assert [(b.address, b.count) for b in blocks] == [(0, 12), (20, 12)]
    _covered(blocks, m)


def test_function_codes_are_never_merged():
    m = _map(Register("voltage_mv", 0, "float32", 1, function_code=3), Register("power_w", 2, "float32", 1, function_code=4))
    blocks = plan_blocks(m)
    assert [(b.function_code, b.address, b.count) for b in blocks] == [(3, 0, 2), (4, 2, 2)]


def test_unsorted_and_mixed_width_registers():
    m = _map(
        Register("power_w", 0x10, "int16", 1),
        Register("voltage_mv", 0x00, "uint32", 1),
        Register("frequency_mhz", 0x11, "uint16", 10),
    )
    blocks = plan_blocks(m)
    _covered(blocks, m)
    assert [(b.address, b.count) for b in blocks] == [(0x00, 0x12)]


@pytest.mark.parametrize(
    "register, limit, message",
    [
        (Register("voltage_mv", 0, "float64", 1), 80, "data_type must be one of"),
        (Register("volts", 0, "float32", 1), 80, "quantity must be one of"),
        (Register("voltage_mv", 0, "float32", 1, function_code=2), 80, "function_code must be 3 or 4"),
        (Register("voltage_mv", 0, "float32", 1, word_order="middle"), 80, "word_order must be"),
        (Register("voltage_mv", 0, "float32", 0), 80, "scale must be a positive integer"),
        (Register("voltage_mv", 0xFFFF, "float32", 1), 80, "address must be"),
        (Register("voltage_mv", 0, "float32", 1), 126, "max_registers_per_request must be 1..125"),
        (Register("voltage_mv", 0, "float32", 1), 1, "exceed max_registers_per_request"),
    ],
)
def test_bad_maps_are_rejected_before_any_io(register, limit, message):
    with pytest.raises(RegisterMapError, match=message):
        plan_blocks(_map(register, limit=limit))


def test_duplicate_quantity_is_rejected():
    with pytest.raises(RegisterMapError, match="declared twice"):
        plan_blocks(_map(Register("power_w", 0, "float32", 1), Register("power_w", 8, "float32", 1)))


# --- decoding --------------------------------------------------------------------------------

@pytest.mark.parametrize("data_type, value", [
    ("float32", 12345.5), ("float32", -0.25), ("int32", -123456789), ("uint32", 4_000_000_000),
    ("int16", -1234), ("uint16", 65535),
])
@pytest.mark.parametrize("word_order", ["big", "little"])
def test_decode_agrees_with_pymodbus(data_type, value, word_order):
    reg = Register("power_w", 0, data_type, 1, word_order=word_order)
    words = encode_raw(reg, value)
    assert len(words) == reg.words
    assert decode_raw(reg, words) == value
    assert ModbusSerialClient.convert_from_registers(words, PYMODBUS_TYPES[data_type], word_order=word_order) == value
    assert ModbusSerialClient.convert_to_registers(value, PYMODBUS_TYPES[data_type], word_order=word_order) == words


def test_word_order_swaps_words_not_bytes():
    big = Register("power_w", 0, "uint32", 1, word_order="big")
    little = Register("power_w", 0, "uint32", 1, word_order="little")
    assert decode_raw(big, [0x1234, 0x5678]) == 0x12345678
    assert decode_raw(little, [0x1234, 0x5678]) == 0x56781234
    # 230.0 V as an Eastron float, high word first: 0x4366 0x0000
    assert decode_raw(Register("voltage_mv", 0, "float32", 1000), [0x4366, 0x0000]) == 230.0


def test_rounding_is_half_away_from_zero_not_truncation():
    assert [round_half_away(v) for v in (0.5, 1.5, 2.5, -0.5, -1.5, 2.4999, 2.5001, -2.6)] == [1, 2, 3, -1, -2, 2, 3, -3]
    energy = Register("import_energy_wh", 0x48, "float32", 1000)
    # 1.2346 kWh x 1000 = 1234.6 Wh: truncation would say 1234
    assert scale_value(energy, decode_raw(energy, encode_raw(energy, 1.2346))) == 1235
    power = Register("power_w", 0x34, "float32", 1)
    # 2.5 W is exact in float32: round() would give 2 (half to even), the meter convention is 3
    assert scale_value(power, decode_raw(power, encode_raw(power, 2.5))) == 3
    assert scale_value(power, decode_raw(power, encode_raw(power, -2.5))) == -3


def test_scaling_of_integer_registers_is_exact():
    reg = Register("import_energy_wh", 0, "uint32", 10)  # a meter counting 0.01 kWh
    assert scale_value(reg, decode_raw(reg, [0x0001, 0x0000])) == 655_360


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_read_errors(bad):
    reg = Register("import_energy_wh", 0x48, "float32", 1000)
    words = encode_raw(reg, bad)
    with pytest.raises(DecodeError, match=r"import_energy_wh at 0x0048 \(float32\): decoded .*expected a finite number"):
        scale_value(reg, decode_raw(reg, words))


def test_nan_bit_patterns_from_the_wire_are_rejected():
    """Meters signal 'no value' with various NaN payloads; all must fail, not just Python's NaN."""
    reg = Register("voltage_mv", 0, "float32", 1000)
    for words in ([0x7FC0, 0x0000], [0xFFFF, 0xFFFF], [0x7F80, 0x0001]):
        with pytest.raises(DecodeError):
            scale_value(reg, decode_raw(reg, words))


def test_negative_counter_is_rejected_but_negative_power_is_not():
    energy = Register("export_energy_wh", 0x4A, "float32", 1000)
    with pytest.raises(DecodeError, match="expected a value >= 0"):
        scale_value(energy, -0.001)
    assert scale_value(Register("power_w", 0x34, "float32", 1), -1500.4) == -1500


def test_decode_block_maps_offsets_to_quantities():
    meter_map = METER_MAPS["sdm630"]
    block = plan_blocks(meter_map)[1]
    raw = {"power_w": -812.4, "frequency_mhz": 49.98, "import_energy_wh": 1234.5678, "export_energy_wh": 98.7654}
    words = [0xFFFF] * block.count  # gap registers hold anything; they must be ignored
    for reg in block.registers:
        offset = reg.address - block.address
        words[offset:offset + reg.words] = encode_raw(reg, raw[reg.quantity])
    assert decode_block(block, words) == {
        "power_w": -812,
        "frequency_mhz": 49980,
        "import_energy_wh": 1234568,
        "export_energy_wh": 98765,
    }


def test_decode_block_with_wrong_length_names_the_block():
    block = plan_blocks(METER_MAPS["sdm630"])[0]
    with pytest.raises(DecodeError, match=r"block 0x0000\+2 \(function 4\): expected 2 registers, found 1"):
        decode_block(block, [0x4366])
