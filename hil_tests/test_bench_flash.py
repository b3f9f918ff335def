"""`dgc-host bench flash`: the bench-board emulators compiled with the real mpy-cross and the
mpremote deployment built for the given port.

The upload itself needs an RP2040 on USB (mpremote cannot drive the MicroPython Unix port), so
this runs `--dry-run`: everything up to handing the command to mpremote is real. The compiled
files are the ones hil_tests/test_micropython_emulators.py runs under the Unix port.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from host_tools.emulators import mpy_build
from host_tools.neighbourhood import REPO_ROOT

DGC_HOST = [sys.executable, "-m", "host_tools.cli"]


def test_flash_builds_mpy_files_and_deploys_them_to_the_named_port(tmp_path: Path) -> None:
    out = tmp_path / "build"
    port = "/dev/serial/by-id/usb-MicroPython_Board_in_FS_mode_e6614c311b4f2d33-if00"
    result = subprocess.run([*DGC_HOST, "bench", "flash", "--port", port, "--out", str(out), "--dry-run"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip().splitlines()[-1].split()
    assert command[0] == "TZ=UTC" and Path(command[1]).name == "mpremote"
    assert command[2:4] == ["connect", port]
    compiled = sorted(out.glob("*.mpy"))
    assert {p.stem for p in compiled} >= {"modbus_slave", "dgr_proto", "dgr_board", "meter_board", "board_io"}
    for path in compiled:
        assert str(path) in command  # every compiled module is copied
        assert mpy_build.mpy_header(path)[0] == 6  # MicroPython .mpy format version 6
    assert command[command.index("cp", command.index(str(compiled[-1]))) + 1] == str(out / "board.json")
    board = json.loads((out / "board.json").read_text())  # the standard wiring: meters and router
    assert [u["model"] for u in board["meter"]["units"]] == ["sdm630", "sdm120"] and "dgr" in board
    assert command[-1] == "reset"


def test_flash_with_a_missing_board_json_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run([*DGC_HOST, "bench", "flash", "--port", "/dev/ttyACM0", "--board-json", str(tmp_path / "nope.json"),
                             "--dry-run"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--board-json" in lines[0] and "nope.json" in lines[0]
