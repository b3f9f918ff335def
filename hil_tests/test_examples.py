"""The hand-run example of the README (examples/table1.sh) really does what it says.

It runs the engineer's commands only (`dgc keygen`, `dgc-host ledger serve/register/order/book`)
against a real bench ledger on 127.0.0.1, so this also covers those commands end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from host_tools.neighbourhood import REPO_ROOT


def _section(output: str, start: str, end: str | None) -> dict:
    text = output.split(start, 1)[1]
    if end:
        text = text.split(end, 1)[0]
    return json.loads(text)


def test_table1_worked_orders_by_hand() -> None:
    result = subprocess.run(
        ["bash", "examples/table1.sh"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL, env={"BIN": str(Path(sys.executable).parent), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    first = _section(out, "worked order 1: sell 5 kWh at 19.5\n", "worked order 2:")
    second = _section(out, "worked order 2: buy 26 kWh at 20.3\n", "book after both:")
    book = _section(out, "book after both:\n", None)

    assert [(t["energy_wh"], t["price_per_kwh_minor"]) for t in first["result"]["trades"]] == [(5000, 1990)]
    assert [(t["energy_wh"], t["price_per_kwh_minor"]) for t in second["result"]["trades"]] == [(20000, 2010), (6000, 2020)]
    bids = {b["price_per_kwh_minor"]: b["remaining_wh"] for b in book["bids"]}
    asks = {a["price_per_kwh_minor"]: a["remaining_wh"] for a in book["asks"]}
    assert bids[1990] == 35000  # the 19.9 bid dropped to 35 kWh
    assert asks[2020] == 4000 and 2010 not in asks  # 4 kWh left at 20.2; 20.1 sold out
