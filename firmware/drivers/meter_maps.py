"""Meter register maps declared as data (the way OpenEMS and Victron's Modbus client do it).

Each quantity is one typed register: where it is, how it is encoded, and the integer scale
that turns it into the firmware's integer unit (Wh, W, mV, mHz). The driver merges a map into
as few block reads as its request limit allows; adding a meter model means adding a table here,
not writing code.

Eastron documents input registers as 3xxxx numbers: 30073 is address 0x0048 on the wire.

A board may also declare its own map in the board config (``model = "custom"`` with
``[[meter.register]]`` tables, parsed by :mod:`firmware.config`): the same :class:`Register`
rows, so a custom meter is planned, read and decoded by exactly the code the built-in ones use.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DATA_TYPES = {"float32": 2, "int32": 2, "uint32": 2, "int16": 1, "uint16": 1}  # words per value
FUNCTION_CODES = (3, 4)  # holding, input
WORD_ORDERS = ("big", "little")
_STRUCT_CODES = {"float32": "f", "int32": "i", "uint32": "I", "int16": "h", "uint16": "H"}

# The quantities a reading carries, in the firmware's integer units. Only power is signed
# (positive = the house draws from the line); a negative counter, voltage or frequency is a
# decoding fault, not a measurement.
QUANTITIES = ("import_energy_wh", "export_energy_wh", "power_w", "voltage_mv", "frequency_mhz")
SIGNED_QUANTITIES = frozenset({"power_w"})
# A reading without both counters cannot be journalled, forecast or settled.
REQUIRED_QUANTITIES = ("import_energy_wh", "export_energy_wh")

# The units a meter's register may hold for each quantity, as an exact integer factor to the
# firmware's unit. A custom map names the datasheet's unit (``unit = "kWh"``) instead of a
# bare multiplier, so an energy register cannot be scaled like a voltage by a slip of the pen.
QUANTITY_UNITS: dict[str, dict[str, int]] = {
    "import_energy_wh": {"Wh": 1, "kWh": 1000, "MWh": 1_000_000},
    "export_energy_wh": {"Wh": 1, "kWh": 1000, "MWh": 1_000_000},
    "power_w": {"W": 1, "kW": 1000},
    "voltage_mv": {"mV": 1, "V": 1000},
    "frequency_mhz": {"mHz": 1, "Hz": 1000},
}

# What one extra request costs, counted in registers (2 bytes each on the wire) so it can be
# weighed against reading unused registers in a gap. An extra request adds its own 8-byte
# request frame, 5 bytes of response header and CRC and two 3.5-character silences: ~20 bytes,
# i.e. 10 registers. On top of that come the meter's turnaround and the bus's request gap
# (25 ms by default, ~12 registers at 9600 baud). 25 registers is a conservative sum; on a
# faster bus the fixed costs weigh even more, so bridging more is never worse there.
REQUEST_OVERHEAD_REGISTERS = 25


@dataclass(frozen=True)
class Register:
    """One quantity's register. The decoded value times ``scale`` / ``scale_divisor`` is the
    quantity in the firmware's integer unit: two integers, so a register in 0.1 W
    (``scale_divisor = 10``) is as exact as one in kWh (``scale = 1000``) — no float factor
    whose rounding would differ between the driver, the emulator and a test."""

    quantity: str  # the firmware's name, with its unit: import_energy_wh, power_w, ...
    address: int  # wire address (0-based)
    data_type: str  # one of DATA_TYPES
    scale: int  # multiply the decoded value by this ...
    function_code: int = 4
    word_order: str = "big"  # "big": high word first (Eastron)
    scale_divisor: int = 1  # ... and divide by this to get the quantity's integer unit

    @property
    def words(self) -> int:
        return DATA_TYPES[self.data_type]


@dataclass(frozen=True)
class MeterMap:
    model: str
    registers: tuple[Register, ...]
    max_registers_per_request: int = 80  # keep requests within what these meters answer reliably


def _eastron(model: str, power_address: int, max_registers_per_request: int = 80) -> MeterMap:
    """Eastron SDM meters: input registers (function 4), IEEE-754 float32, high word first;
    voltage in V, power in W, frequency in Hz, energy in kWh."""
    return MeterMap(
        model=model,
        registers=(
            Register("voltage_mv", 0x0000, "float32", 1000),
            Register("power_w", power_address, "float32", 1),
            Register("frequency_mhz", 0x0046, "float32", 1000),
            Register("import_energy_wh", 0x0048, "float32", 1000),
            Register("export_energy_wh", 0x004A, "float32", 1000),
        ),
        max_registers_per_request=max_registers_per_request,
    )


METER_MAPS: dict[str, MeterMap] = {
    "sdm120": _eastron("sdm120", 0x000C),
    "sdm630": _eastron("sdm630", 0x0034),
    # Eastron SDM72D-M (three-phase, 100 A direct): "SDM72D-M Modbus protocol" document, input
    # registers 30001 phase 1 L-N voltage (0x0000), 30053 total system power (0x0034), 30071
    # frequency (0x0046), 30073 import and 30075 export active energy (0x0048, 0x004A), all
    # float32 high word first; cross-checked against the open-source sdm_modbus library
    # (nmakel/sdm_modbus, src/sdm_modbus/sdm.py, class SDM72). Its protocol document limits a
    # request to 30 parameters, i.e. 60 registers (the SDM630's allows 40 = 80 registers).
    "sdm72dm": _eastron("sdm72dm", 0x0034, max_registers_per_request=60),
}


class RegisterMapError(ValueError):
    """A register map that cannot be read as declared (a bug in a table, found before any I/O)."""


class DecodeError(ValueError):
    """Registers that arrived intact (CRC ok) but do not hold a plausible value."""


@dataclass(frozen=True)
class Block:
    """One read request: ``count`` registers from ``address`` with ``function_code``."""

    function_code: int
    address: int
    count: int
    registers: tuple[Register, ...]

    @property
    def end(self) -> int:
        return self.address + self.count


def check_map(meter_map: MeterMap) -> None:
    """Reject a map the driver could misread; called by the planner so a bad table fails at start."""
    limit = meter_map.max_registers_per_request
    if not 1 <= limit <= 125:  # 125 registers is the Modbus PDU limit for reads
        raise RegisterMapError(f"{meter_map.model}: max_registers_per_request must be 1..125, found {limit}")
    seen: set[str] = set()
    for reg in meter_map.registers:
        where = f"{meter_map.model}: register {reg.quantity!r}"
        if reg.quantity not in QUANTITIES:
            raise RegisterMapError(f"{where}: quantity must be one of {', '.join(QUANTITIES)}")
        if reg.quantity in seen:
            raise RegisterMapError(f"{where}: declared twice")
        seen.add(reg.quantity)
        if reg.data_type not in DATA_TYPES:
            raise RegisterMapError(f"{where}: data_type must be one of {', '.join(DATA_TYPES)}, found {reg.data_type!r}")
        if reg.function_code not in FUNCTION_CODES:
            raise RegisterMapError(f"{where}: function_code must be 3 or 4, found {reg.function_code!r}")
        if reg.word_order not in WORD_ORDERS:
            raise RegisterMapError(f"{where}: word_order must be 'big' or 'little', found {reg.word_order!r}")
        if not (isinstance(reg.scale, int) and reg.scale > 0):
            raise RegisterMapError(f"{where}: scale must be a positive integer, found {reg.scale!r}")
        if not (isinstance(reg.scale_divisor, int) and reg.scale_divisor > 0):
            raise RegisterMapError(f"{where}: scale_divisor must be a positive integer, found {reg.scale_divisor!r}")
        if not 0 <= reg.address <= 0xFFFF - reg.words + 1:
            raise RegisterMapError(f"{where}: address must be 0..0xFFFF, found {reg.address!r}")
        if reg.words > limit:
            raise RegisterMapError(f"{where}: {reg.words} words exceed max_registers_per_request {limit}")


def plan_blocks(meter_map: MeterMap, overhead_registers: int = REQUEST_OVERHEAD_REGISTERS) -> tuple[Block, ...]:
    """Group a map's registers into the cheapest list of block reads.

    Why a cost model rather than a fixed gap rule: reading a gap costs 2 bytes per register,
    while a separate request costs ``overhead_registers`` worth of frames, silences and
    turnaround; a gap is bridged exactly when that is cheaper. Registers are only merged with
    the same function code and never beyond ``max_registers_per_request``. The optimum over
    the sorted registers is found by dynamic programming (n is tiny); on a tie, fewer requests
    win, since each request is one more chance to hit a bus error.
    """
    check_map(meter_map)
    limit = meter_map.max_registers_per_request
    blocks: list[Block] = []
    for fc in sorted({r.function_code for r in meter_map.registers}):
        regs = sorted((r for r in meter_map.registers if r.function_code == fc), key=lambda r: (r.address, r.words))
        n = len(regs)
        # best[j] = (cost, requests, start of last block) for the first j registers
        best: list[tuple[float, int, int]] = [(0, 0, 0)] + [(math.inf, 0, 0)] * n
        for j in range(1, n + 1):
            end = 0
            for i in range(j, 0, -1):  # block = regs[i-1 .. j-1]
                end = max(end, regs[i - 1].address + regs[i - 1].words)
                span = end - regs[i - 1].address
                if span > limit:
                    break
                cost, requests, _ = best[i - 1]
                candidate = (cost + overhead_registers + span, requests + 1, i - 1)
                if candidate[:2] < best[j][:2]:
                    best[j] = candidate
        group: list[Block] = []
        j = n
        while j > 0:
            start = best[j][2]
            members = tuple(regs[start:j])
            address = members[0].address
            group.append(Block(fc, address, max(r.address + r.words for r in members) - address, members))
            j = start
        blocks.extend(reversed(group))
    return tuple(blocks)


def decode_raw(register: Register, words: Sequence[int]) -> int | float:
    """Registers (16-bit words, each big-endian on the wire) -> the value as the meter encodes it.

    ``word_order`` says which word carries the high half of a 32-bit value: "big" puts it
    first (Eastron, most meters), "little" last (some Schneider, Carlo Gavazzi tables).
    """
    if len(words) != register.words:
        raise DecodeError(f"{register.quantity} at 0x{register.address:04X}: expected {register.words} registers, found {len(words)}")
    for word in words:
        if not 0 <= word <= 0xFFFF:
            raise DecodeError(f"{register.quantity} at 0x{register.address:04X}: register value {word!r} is not 16-bit")
    ordered = list(words) if register.word_order == "big" else list(reversed(words))
    data = b"".join(w.to_bytes(2, "big") for w in ordered)
    return struct.unpack(">" + _STRUCT_CODES[register.data_type], data)[0]


def encode_raw(register: Register, value: int | float) -> list[int]:
    """The inverse of :func:`decode_raw`: what a meter (or the bench emulator) puts in the registers."""
    code = _STRUCT_CODES[register.data_type]
    if code != "f":
        value = int(value)
    data = struct.pack(">" + code, value)
    words = [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]
    return words if register.word_order == "big" else list(reversed(words))


def round_half_away(value: float) -> int:
    """Round to the nearest integer, halves away from zero.

    Why not ``round()``: Python rounds halves to even, so 0.5 Wh and 1.5 Wh would both land on
    an even number; a meter counter should round the same way everywhere (as in the DGR and
    the ledger, which are not written in Python).
    """
    magnitude = math.floor(abs(value) + 0.5)
    return int(magnitude if value >= 0 else -magnitude)


def scale_value(register: Register, raw: int | float) -> int:
    """Decoded meter value -> the quantity's integer unit (Wh, W, mV, mHz), rejecting garbage.

    NaN and infinities are what a float register holds when a meter is faulty or still
    booting; a negative counter, voltage or frequency is never a measurement. Both are read
    errors: serving them would let the daemon bid on a wrong number.
    """
    where = f"{register.quantity} at 0x{register.address:04X} ({register.data_type})"
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise DecodeError(f"{where}: decoded {raw!r}, expected a finite number")
        scaled = round_half_away(raw * register.scale / register.scale_divisor)
    else:
        scaled = _divide_half_away(raw * register.scale, register.scale_divisor)
    if scaled < 0 and register.quantity not in SIGNED_QUANTITIES:
        raise DecodeError(f"{where}: decoded {raw!r}, expected a value >= 0")
    return scaled


def _divide_half_away(numerator: int, divisor: int) -> int:
    """numerator / divisor rounded half away from zero, in exact integer arithmetic (an int32
    register in 0.1 Wh must not pass through a float on its way to Wh)."""
    magnitude = (2 * abs(numerator) + divisor) // (2 * divisor)
    return magnitude if numerator >= 0 else -magnitude


FINE_ENERGY = {"import_energy_wh": "import_energy_mwh", "export_energy_wh": "export_energy_mwh"}


def decode_block(block: Block, words: Sequence[int], *, fine: bool = False) -> dict[str, int]:
    """One block's registers -> {quantity: integer value} for every register in the block.

    ``fine=True`` adds each energy counter in mWh too (``import_energy_mwh``...): a float32 kWh
    register holds far more than whole Wh, and delivery metering needs it (issue 7 s: a
    transfer that ended exactly at 100 Wh read 99 Wh as the difference of two rounded ends)."""
    if len(words) != block.count:
        raise DecodeError(
            f"block 0x{block.address:04X}+{block.count} (function {block.function_code}): "
            f"expected {block.count} registers, found {len(words)}"
        )
    values: dict[str, int] = {}
    for reg in block.registers:
        offset = reg.address - block.address
        raw = decode_raw(reg, words[offset:offset + reg.words])
        values[reg.quantity] = scale_value(reg, raw)
        if fine and reg.quantity in FINE_ENERGY:
            values[FINE_ENERGY[reg.quantity]] = scale_value(dataclasses.replace(reg, scale=reg.scale * 1000), raw)
    return values


def with_request_limit(meter_map: MeterMap, max_registers_per_request: int) -> MeterMap:
    """The same map with another request limit (a gateway or an older firmware that answers
    fewer registers than the datasheet promises); checked like any map."""
    limited = dataclasses.replace(meter_map, max_registers_per_request=max_registers_per_request)
    check_map(limited)
    return limited


def covered_span(registers: Iterable[Register]) -> tuple[int, int]:
    """(first address, end address) covering all registers: what a meter of this map answers."""
    regs = list(registers)
    return min(r.address for r in regs), max(r.address + r.words for r in regs)
