"""Peak RSS of the board's ledger backends side by side: REST (canonical JSON) vs EVM (EIP-712).

Each figure is a fresh `python -c` that imports the daemon (firmware.scheduler.daemon) and one
backend, signs one order with a device key the way that backend needs, and reads its ledger over
real HTTP: REST asks a bench ledger (`dgc-host ledger serve`) for its time and info; EVM reads an
anvil node (eth_chainId, latest block, rules, eth_getLogs for its trades). VmHWM is read by the
process itself (bench/lib.python_peak_rss). Target (issue 9): EVM within 2 MB of REST.

Then the whole idle daemon, side by side: `dgc run` on one bench house without PV (its orders
find no counterparty), once with ``[ledger] kind = "rest"`` (bench ledger) and once with
``kind = "evm"`` (anvil, 1-s blocks, the market contract, `dgc-host relay serve`), both via
host_tools.neighbourhood; after a warm-up, VmHWM/VmRSS and CPU of the daemon process from /proc
over the same window. ``--adapters-only`` skips this part (about 3 minutes).

Bytecode: every process here runs from compiled bytecode (``compileall`` into a private
PYTHONPYCACHEPREFIX under var/bench first), as a board's release does. Without it, with
PYTHONDONTWRITEBYTECODE set, a module without a fresh .pyc is compiled at each start and the
compiler's peak lands in VmHWM: 1.6 MiB for firmware/ledger/rest.py alone, more for evm.py,
which measured the compiler rather than the backends.
Prints figures; never asserts. Run: .venv/bin/python bench/evm_footprint.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import BENCH_VAR, REPO_ROOT, proc_cpu_seconds, proc_kib, proc_status, python_peak_rss, terminate  # noqa: E402

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


DAEMON_WARMUP_S = 20.0
DAEMON_WINDOW_S = 60.0


def idle_daemon(kind: str) -> dict:
    """Peak and mean RSS (MiB), CPU % and threads of an idle `dgc run` with this backend."""
    import tempfile
    import time

    from host_tools.neighbourhood import HouseSpec, Neighbourhood

    BENCH_VAR.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"evm-footprint-{kind}-", dir=BENCH_VAR))
    hood = Neighbourhood(workdir, [HouseSpec("idle-house", pv_peak_w=0, battery_capacity_wh=0, load_peak_w=1700)],
                         cadence_overrides={"measure_seconds": 10}, ledger=kind)
    try:
        hood.start()
        daemon = hood.houses["idle-house"].daemon
        pid = daemon.process.pid
        time.sleep(DAEMON_WARMUP_S)
        if not daemon.running:
            raise RuntimeError(f"{kind} daemon exited during warm-up; see {workdir}")
        cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
        rss = [proc_kib(pid, "VmRSS")]
        while time.monotonic() - t0 < DAEMON_WINDOW_S:
            time.sleep(5)
            rss.append(proc_kib(pid, "VmRSS"))
        cpu = (proc_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100
        status = proc_status(pid)
        orders = sum(" order.acked " in line for line in daemon.lines)
        return {"hwm": int(status["VmHWM"].split()[0]) / 1024, "rss": sum(rss) / len(rss) / 1024, "cpu": cpu,
                "threads": int(status["Threads"]), "orders": orders}
    finally:
        hood.stop()


def use_compiled_bytecode() -> Path:
    """Compile firmware/ and host_tools/ into a private cache that every child process uses."""
    import os

    prefix = BENCH_VAR / "pycache"
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "firmware", "host_tools"], cwd=REPO_ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return prefix


def main() -> int:
    BENCH_VAR.mkdir(parents=True, exist_ok=True)
    use_compiled_bytecode()
    adapters()
    if "--adapters-only" not in sys.argv:
        rest, evm = idle_daemon("rest"), idle_daemon("evm")
        print(f"idle `dgc run` (one house without PV, meters every 10 s; {DAEMON_WARMUP_S:.0f} s warm-up, {DAEMON_WINDOW_S:.0f} s window)")
        print(f"  {'backend':8} {'peak RSS':>9} {'mean RSS':>9} {'CPU':>7} {'threads':>7} {'orders acked':>12}")
        for name, r in (("rest", rest), ("evm", evm)):
            print(f"  {name:8} {r['hwm']:7.1f} MiB {r['rss']:6.1f} MiB {r['cpu']:6.2f}% {r['threads']:7d} {r['orders']:12d}")
        print(f"  evm - rest: peak RSS {evm['hwm'] - rest['hwm']:+.1f} MiB (target within 2 MB)")
    return 0


def adapters() -> None:
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
    print(f"  + EVM adapter, one EIP-712 order, chain reads   {evm:6.1f} MiB   ({evm - rest:+.1f} MiB vs REST; target within 2)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
