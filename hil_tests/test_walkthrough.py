"""docs/walkthrough.md really does what it says: its `sh` blocks run, in order, as one script.

The real programs only (bench ledger, bench house, `dgc run`, the `dgc-host ledger` commands);
the only changes to the text are where things live: a temporary copy of board_configs/sim.toml
(its paths in a temporary directory, and the 12-s slots of the other real-daemon tests instead of
30 s) and a free port instead of 8750, so the test never touches the repository's var/ or a
ledger someone runs on 8750. Takes about a minute (the house needs a slot of meter history
before it bids, then a slot of delivery).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

from host_tools.bench_ledger import views

from .daemons import SHORT_CADENCE, SHORT_MARKET


REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "walkthrough.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)


def test_the_one_house_walkthrough_trades_delivers_settles_and_stops(tmp_path):
    port = _free_port()
    house_dir, work = tmp_path / "house", tmp_path / "walkthrough"
    config = tmp_path / "sim.toml"
    text = (REPO / "board_configs" / "sim.toml").read_text().replace("../var/sim/sim-house-1", str(house_dir))
    # The market of hil_tests/daemons.py (12-s slots, gate 4 s, a bid round a slot) instead of
    # sim.toml's 30-s slots: the same commands and waits (every wait in the text is on a
    # condition), in half the time. daemons.py says why 12 s keeps the bench honest.
    for key, value in [*SHORT_MARKET.items(), *SHORT_CADENCE.items()]:
        text, count = re.subn(rf"^{key} = \d+", f"{key} = {value}", text, flags=re.M)
        assert count == 1, f"board_configs/sim.toml: expected one line '{key} = ...'"
    config.write_text(text.replace("8750", str(port)))
    script = "\n".join(_blocks(DOC.read_text()))
    assert "dgc-host ledger order" in script and "kill $DAEMON" in script
    for old, new in (("make venv", ":"), (".venv/bin/", f"{Path(sys.executable).parent}/"),
                     ("board_configs/sim.toml", str(config)), ("var/sim/sim-house-1", str(house_dir)),
                     ("var/walkthrough", str(work)), ("8750", str(port))):
        script = script.replace(old, new)
    # if a step fails, still stop what the walk-through started (by pid)
    prelude = "set -eu\ntrap 'kill ${DAEMON:-} ${HOUSE:-} ${LEDGER:-} 2>/dev/null || true' EXIT\n"
    result = subprocess.run(["bash", "-c", prelude + script], cwd=REPO, capture_output=True, text=True, timeout=540,
                            stdin=subprocess.DEVNULL)
    logs = "".join(f"\n--- {p.name}\n" + p.read_text()[-1500:] for p in sorted(work.glob("*.log")))
    assert result.returncode == 0, result.stderr[-2000:] + logs
    out = result.stdout
    (tmp_path / "walkthrough.out").write_text(out)  # for a person reading a failure
    # the markets list and the next market's book with the house's ask
    assert re.search(r"^market \(UTC\) .* state ", out, re.M) and re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ .* open ", out)
    assert re.search(r"^ask +\d+ +\d+ +\d+$", out, re.M), out
    # the neighbour's buy filled at the house's price (the tariff policy's ask: it moves with time)
    assert '"state": "filled"' in out
    # the house reported, then the neighbour's report settled the trade; money = Wh x price exactly
    assert re.search(r"^ +1 +sim-house-1 +neighbour +300 +\d+ +reported +300 +- ", out, re.M), out
    settled = re.search(r"^ +1 +sim-house-1 +neighbour +300 +(\d+) +settled +300 +300 +300 +([\d.]+) +0$", out, re.M)
    assert settled, out
    price, paid = int(settled.group(1)), settled.group(2)
    assert paid == views.money(300 * price)
    summary = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("neighbour ", "sim-house-1 "))}
    assert summary["neighbour"][:6] == ["300", "0", "300", "0", paid, "0.000"]
    assert summary["sim-house-1"][:6] == ["0", "300", "0", "300", "0.000", paid]
    # stopped: the daemon said so
    assert "stopped" in (work / "daemon.log").read_text()
