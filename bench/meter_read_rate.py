"""Meter reads per second on one RS-485 bus, and what the driver costs on top of bare pymodbus.

Rig (as hil_tests/test_meter_driver.py): a socat pty pair, the pymodbus meter emulator on its
own asyncio loop in a background thread serving two meters on one bus (unit 1 an SDM630,
unit 2 an SDM120), and the board's driver (firmware.drivers.meter). Run at 115200 and at 9600
baud: a pty has no baud timing of its own, but pymodbus paces RTU frames by the configured rate.

1. Reads per second per bus: MeterSet.read_all() cycles (both meters, 2 requests each) with the
   bus's request gap as configured by default ([[bus]] request_gap_ms = 25), and with the gap of
   board_configs/sim.toml (5 ms).
2. Per-read overhead: one SDM630 read through MeterSet.read() (planning done, lock, gap 0,
   decode to integers, back-off bookkeeping, trace hook) against a bare pymodbus
   ModbusSerialClient.read_input_registers() of the same two blocks over the same line, in
   alternating batches so background load hits both alike. Wall time per read and the reading
   thread's own CPU time (time.thread_time: the emulator's thread is not counted).

Prints figures; never asserts. Bounded: about 30 s. Cleans up its lines and threads.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import header, load_average, ratio, stop_on_signals, summary_ms  # noqa: E402

from pymodbus import FramerType  # noqa: E402
from pymodbus.client import ModbusSerialClient  # noqa: E402

from firmware.config import BusConfig, MeterConfig  # noqa: E402
from firmware.drivers.meter import MeterBus, MeterSet  # noqa: E402
from firmware.drivers.meter_maps import METER_MAPS, plan_blocks  # noqa: E402
from host_tools.emulators.meter_emulator import EmulatedMeter, MeterEmulator, MeterEmulatorThread  # noqa: E402
from host_tools.emulators.virtual_serial import VirtualSerialLine  # noqa: E402

BAUDRATES = (115200, 9600)
GAPS_MS = (25, 5)  # the [[bus]] default, and board_configs/sim.toml's
RATE_CYCLES = 25  # read_all() cycles per (baud, gap)
BATCHES = 6  # alternating batches per side for the overhead comparison
BATCH_READS = 20
TIMEOUT_MS = 500
METERS = (
    MeterConfig(name="house", bus="rs485", unit_id=1, model="sdm630", role="house"),
    MeterConfig(name="interchange", bus="rs485", unit_id=2, model="sdm120", role="interchange"),
)


def source() -> dict[str, float]:
    return {"import_energy_wh": 12_345.6, "export_energy_wh": 4_321.0, "power_w": -812.0,
            "voltage_mv": 230_100.0, "frequency_mhz": 49_990.0}


def bus_config(port: Path, baudrate: int, gap_ms: int) -> BusConfig:
    return BusConfig(name="rs485", port=str(port), baudrate=baudrate, timeout_ms=TIMEOUT_MS, request_gap_ms=gap_ms)


def read_rate(port: Path, baudrate: int, gap_ms: int) -> tuple[float, list[float], int]:
    """(meter reads per second, cycle durations in s, failed reads) over RATE_CYCLES cycles."""
    failures = 0
    cycles = []
    with MeterSet({"rs485": MeterBus(bus_config(port, baudrate, gap_ms))}, METERS) as meters:
        meters.read_all()  # open the port outside the timing
        start = time.perf_counter()
        for _ in range(RATE_CYCLES):
            t0 = time.perf_counter()
            results = meters.read_all()
            cycles.append(time.perf_counter() - t0)
            failures += sum(1 for r in results.values() if isinstance(r, Exception))
        elapsed = time.perf_counter() - start
    return RATE_CYCLES * len(METERS) / elapsed, cycles, failures


def driver_batch(port: Path, baudrate: int) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    with MeterSet({"rs485": MeterBus(bus_config(port, baudrate, 0))}, METERS[:1]) as meters:
        meters.read("house")
        for _ in range(BATCH_READS):
            w0, c0 = time.perf_counter(), time.thread_time()
            meters.read("house")
            cpus.append(time.thread_time() - c0)
            walls.append(time.perf_counter() - w0)
    return walls, cpus


def bare_batch(port: Path, baudrate: int) -> tuple[list[float], list[float]]:
    blocks = plan_blocks(METER_MAPS["sdm630"])
    walls, cpus = [], []
    client = ModbusSerialClient(str(port), framer=FramerType.RTU, baudrate=baudrate, timeout=TIMEOUT_MS / 1000, retries=0)
    if not client.connect():
        raise RuntimeError(f"bare pymodbus client cannot open {port}")
    try:
        client.read_input_registers(0, count=2, device_id=1)
        for _ in range(BATCH_READS):
            w0, c0 = time.perf_counter(), time.thread_time()
            for block in blocks:
                response = client.read_input_registers(block.address, count=block.count, device_id=1)
                if response.isError():
                    raise RuntimeError(f"bare read of block 0x{block.address:04X} failed: {response}")
            cpus.append(time.thread_time() - c0)
            walls.append(time.perf_counter() - w0)
    finally:
        client.close()
    return walls, cpus


def main() -> int:
    stop_on_signals()
    import logging

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    header("meter read rate and driver overhead (Modbus RTU over a pty, pymodbus emulator)")
    print(f"load average {load_average()}; two meters on one bus (SDM630 unit 1: 2 requests, SDM120 unit 2: 2 requests)",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="dgc-bench-meter-") as tmp:
        for baudrate in BAUDRATES:
            with VirtualSerialLine(Path(tmp) / f"bus-{baudrate}") as line:
                emulator = MeterEmulator(line.emulator_end, baudrate, {
                    1: EmulatedMeter("sdm630", source), 2: EmulatedMeter("sdm120", source)})
                with MeterEmulatorThread(emulator):
                    header(f"{baudrate} baud")
                    for gap_ms in GAPS_MS:
                        rate, cycles, failures = read_rate(line.device_end, baudrate, gap_ms)
                        print(f"  read_all, gap {gap_ms:2d} ms: {rate:6.1f} meter reads/s per bus "
                              f"({rate / len(METERS):5.1f} cycles/s); cycle {summary_ms(cycles)}; failed reads {failures}",
                              flush=True)
                    driver_wall, driver_cpu, bare_wall, bare_cpu = [], [], [], []
                    for _ in range(BATCHES):
                        w, c = driver_batch(line.device_end, baudrate)
                        driver_wall += w
                        driver_cpu += c
                        w, c = bare_batch(line.device_end, baudrate)
                        bare_wall += w
                        bare_cpu += c
                    d_wall, b_wall = statistics.median(driver_wall), statistics.median(bare_wall)
                    d_cpu, b_cpu = statistics.median(driver_cpu), statistics.median(bare_cpu)
                    print(f"  SDM630 read, gap 0, MeterSet.read():        wall {summary_ms(driver_wall)}", flush=True)
                    print(f"  same 2 blocks, bare read_input_registers: wall {summary_ms(bare_wall)}", flush=True)
                    print(f"  median wall: driver {d_wall * 1000:.2f} ms vs bare {b_wall * 1000:.2f} ms: "
                          f"overhead {(d_wall - b_wall) * 1000:+.2f} ms per read ({ratio(d_wall, b_wall)})", flush=True)
                    print(f"  median CPU of the reading thread: driver {d_cpu * 1000:.3f} ms vs bare {b_cpu * 1000:.3f} ms: "
                          f"overhead {(d_cpu - b_cpu) * 1000:+.3f} ms per read ({ratio(d_cpu, b_cpu)})", flush=True)
                    print(f"  requests seen by the emulator: unit 1 {emulator.requests[1]}, unit 2 {emulator.requests[2]}",
                          flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
