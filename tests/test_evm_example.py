"""The hand-run on-chain example (examples/table1_evm.sh) does what it says: Table 1 and both
worked orders through `dgc-host relay devchain / order / book` on a real anvil node."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _section(output: str, start: str, end: str | None) -> dict:
    text = output.split(start, 1)[1]
    if end:
        text = text.split(end, 1)[0]
    return json.loads(text)


def test_table1_worked_orders_on_chain_by_hand() -> None:
    result = subprocess.run(
        ["bash", "examples/table1_evm.sh"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
        stdin=subprocess.DEVNULL, env={"BIN": str(Path(sys.executable).parent), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    out = result.stdout
    first = _section(out, "worked order 1: sell 5 kWh at 19.5\n", "worked order 2:")
    second = _section(out, "worked order 2: buy 26 kWh at 20.3\n", "book after both:")
    book = _section(out, "book after both:\n", None)
    assert [(f["energy_wh"], f["price_per_kwh_minor"]) for f in first["result"]["fills"]] == [(5000, 1990)]
    assert [(f["energy_wh"], f["price_per_kwh_minor"]) for f in second["result"]["fills"]] == [(20000, 2010), (6000, 2020)]
    bids = {b["price_per_kwh_minor"]: b["remaining_wh"] for b in book["bids"]}
    asks = {a["price_per_kwh_minor"]: a["remaining_wh"] for a in book["asks"]}
    assert bids[1990] == 35000
    assert asks[2020] == 4000 and 2010 not in asks
