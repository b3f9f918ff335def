"""Peak RSS of the board's ledger backends side by side: REST (canonical JSON) vs EVM (EIP-712).

Each figure is a fresh `python -c` that imports the daemon (firmware.scheduler.daemon) and one
backend, signs one order with a device key the way that backend needs, and reads its ledger over
real HTTP: REST asks a bench ledger (`dgc-host ledger serve`) for its time and info; EVM reads an
anvil node (eth_chainId, latest block, rules, eth_getLogs for its trades). VmHWM is read by the
process itself (bench/lib.python_peak_rss). Target (issue 9): EVM within 2 MB of REST.
Prints figures; never asserts. Run: .venv/bin/python bench/evm_footprint.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import REPO_ROOT, python_peak_rss, terminate  # noqa: E402

from host_tools.evm.devchain import start_chain  # noqa: E402

KEY = "import coincurve, hashlib; from firmware.keystore import DeviceKey; key = DeviceKey(coincurve.PrivateKey(hashlib.sha256(b'fp').digest()))\n"
DAEMON = "import firmware.scheduler.daemon\n"
REST = DAEMON + "import firmware.ledger.rest\nfrom firmware import messages\n" + KEY + (
    "f = messages.new_fields('order', ledger_id='x', device_id=key.device_id, nonce=1, issued_at=1, ttl_s=60, "
    "market_id=1800, side='sell', energy_wh=100, price_per_kwh_minor=2000)\nm = messages.sign_message(f, key)\n")


def rest_code(url: str) -> str:
    return REST + (f"ledger = firmware.ledger.rest.RestLedger({url!r}, timeout_ms=5000, retries=0, backoff_ms=0)\n"
                   "ledger.server_time_ms(); ledger.info()\n")


def start_bench_ledger() -> tuple[subprocess.Popen, str]:
    import tempfile
    import time

    log = tempfile.NamedTemporaryFile(prefix="dgc-fp-ledger-", suffix=".log", delete=False)
    process = subprocess.Popen([sys.executable, "-m", "host_tools.cli", "ledger", "serve", "--port", "0", "--db", ":memory:"],
                               stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        for line in Path(log.name).read_text().splitlines():
            if line.startswith("ledger listening on "):
                return process, line.split()[3]
        time.sleep(0.05)
    terminate(process)
    raise RuntimeError("bench ledger did not start: " + Path(log.name).read_text()[-500:])


def evm_code(url: str, contract: str) -> str:
    return DAEMON + "from firmware.ledger.evm import EvmLedger\nfrom firmware import eip712\n" + KEY + (
        f"ledger = EvmLedger({url!r}, chain_id=31337, contract={contract!r})\n"
        "f = eip712.new_fields('order', nonce=1, issued_at=1, ttl_s=60, market_id=1800, side=2, energy_wh=100, price_per_kwh_minor=2000)\n"
        "m = eip712.sign_typed(ledger.domain, 'order', f, key)\n"
        "ledger.server_time_ms(); ledger.trades_since(eip712.checksum_address(eip712.address_from_public_key(key.public_key)), 0)\n")


def main() -> int:
    chain = start_chain()
    ledger, url = start_bench_ledger()
    try:
        daemon = min(python_peak_rss(DAEMON) for _ in range(3))
        rest = min(python_peak_rss(rest_code(url)) for _ in range(3))
        evm = min(python_peak_rss(evm_code(chain.node.url, chain.market.address_hex)) for _ in range(3))
    finally:
        terminate(ledger)
        chain.node.stop()
    print("peak RSS (VmHWM, best of 3 fresh processes)")
    print(f"  daemon imports alone                            {daemon:6.1f} MiB")
    print(f"  + REST adapter, one canonical-JSON order, reads {rest:6.1f} MiB")
    print(f"  + EVM adapter, one EIP-712 order, chain reads   {evm:6.1f} MiB   ({evm - rest:+.1f} MiB vs REST; target within 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
