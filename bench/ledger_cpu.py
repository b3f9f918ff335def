"""CPU time per message of the bench ledger, measured in one process, independent of machine load.

Why: the machine is shared (load average 6-11 on 2 cores), so wall-clock rates from
bench/ledger_load.py say more about the neighbours than about the ledger. CPU time per message
does not depend on how much of a core the ledger got. This drives the real ASGI app (the same
``create_app`` that ``dgc-host ledger serve`` runs: routing, middleware, parsing, verification,
the group committer's writer thread, SQLite with WAL + synchronous=FULL, the signed record)
with pre-signed messages, one request at a time, and reads ``time.process_time()`` (all threads
of the process) around the timed phase. Not included: uvicorn's HTTP parsing and the socket
(bench/ledger_load.py measures the whole server over real HTTP).

Mix (as bench/ledger_load.py): ~70 % orders (1 in 4 crosses resting asks and trades), ~15 %
cancels, ~15 % delivery reports, against R resting orders.

``--profile N`` prints the N most expensive functions (cProfile, cumulative, all threads the
harness runs: the writer thread's batches are run on the calling thread for the profile).

Last line: ``ledger_cpu: messages=N cpu_ms_per_message=X.XXX``. Bounded in count; never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import io
import json
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coincurve  # noqa: E402

from firmware.keystore import DeviceKey  # noqa: E402
from firmware.market import MarketRules  # noqa: E402
from firmware.messages import new_fields, sign_message  # noqa: E402
from host_tools.bench_ledger.app import LedgerSettings, create_app  # noqa: E402
from host_tools.bench_ledger.limits import RateLimit  # noqa: E402

SLOT_S, LOT_WH, GATE_S = 1800, 100, 900


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


async def call(app, method: str, path: str, body: bytes = b"", headers: list | None = None) -> tuple[int, bytes]:
    """One request through the ASGI app (what uvicorn would hand it)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()), *(headers or [])],
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8750), "state": {}}
    sent = False
    status, chunks = 0, []

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--resting", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", type=int, default=0, help="print the N top functions by cumulative time")
    parser.add_argument("--db", default="", help="database path (default: a temporary file; ':memory:' for no fsync)")
    args = parser.parse_args()
    if not (2 <= args.devices <= 2000 and 1 <= args.messages <= 50_000 and 0 <= args.resting <= 20_000):
        raise SystemExit("ledger_cpu: --devices 2..2000, --messages 1..50000, --resting 0..20000")
    rng = random.Random(args.seed)
    now_s = (int(time.time()) // SLOT_S) * SLOT_S + 10
    m0 = now_s - 10 + 2 * SLOT_S
    m1 = m0 + 10 * SLOT_S
    clock = Clock(now_s * 1000)
    rules = MarketRules(slot_seconds=SLOT_S, markets_ahead=48, lot_wh=LOT_WH, gate_closure_seconds=GATE_S,
                        price_min_per_kwh_minor=1000, price_max_per_kwh_minor=4000)
    with tempfile.TemporaryDirectory(prefix="ledger-cpu-") as tmp:
        db = args.db or str(Path(tmp) / "ledger.sqlite3")
        settings = LedgerSettings(db_path=db, ledger_id="cpu", rules=rules, operator_token="t" * 32, clock=clock,
                                  report_deadline_seconds=4 * SLOT_S, max_open_orders=100_000,
                                  device_rate=RateLimit(per_second=0, burst=1), client_rate=RateLimit(per_second=0, burst=1))
        app = create_app(settings)
        store = app.state.store
        keys = [DeviceKey(coincurve.PrivateKey(hashlib.sha256(f"cpu {i}".encode()).digest())) for i in range(args.devices)]
        for i, k in enumerate(keys):
            store.register_device(k.public_key.hex(), f"d{i}", 10**12, clock(), sell_capacity_wh=10**8)
        nonces = [0] * len(keys)

        def msg(i: int, kind: str, **body) -> bytes:
            nonces[i] += 1
            fields = new_fields(kind, ledger_id="cpu", device_id=keys[i].device_id, nonce=nonces[i], issued_at=clock() // 1000,
                                ttl_s=3 * 86400, **body)
            return json.dumps(sign_message(fields, keys[i]).to_wire()).encode()

        async def run() -> dict:
            async with app.router.lifespan_context(app):
                # set-up: pairs trade in M0; resting sells in M1
                trades = {}
                for i in range(0, len(keys) - 1, 2):
                    await call(app, "POST", "/v1/messages", msg(i, "order", market_id=m0, side="sell", energy_wh=LOT_WH, price_per_kwh_minor=2000))
                    st, body = await call(app, "POST", "/v1/messages", msg(i + 1, "order", market_id=m0, side="buy", energy_wh=LOT_WH, price_per_kwh_minor=2000))
                    for t in json.loads(body)["result"]["trades"]:
                        trades[i], trades[i + 1] = (t["trade_id"], "seller"), (t["trade_id"], "buyer")
                for j in range(args.resting):
                    await call(app, "POST", "/v1/messages", msg(j % len(keys), "order", market_id=m1, side="sell", energy_wh=LOT_WH,
                                                                price_per_kwh_minor=3000 + rng.randrange(1000)))
                clock.ms = (m0 + SLOT_S + 5) * 1000  # M0 is over: its trades can be reported
                timed, kinds, mine, reported = {}, [], {i: [] for i in range(len(keys))}, set()
                for _ in range(args.messages):
                    i = rng.randrange(len(keys))
                    r = rng.random()
                    if r < 0.15 and i in trades and i not in reported:
                        tid, role = trades[i]
                        raw = msg(i, "delivery_report", trade_id=tid, market_id=m0, role=role, energy_wh=LOT_WH, status="delivered")
                        kinds.append("report")
                        reported.add(i)
                    elif r < 0.30 and mine[i]:
                        raw = msg(i, "cancel", market_id=m1, order_nonce=mine[i].pop(rng.randrange(len(mine[i]))))
                        kinds.append("cancel")
                    else:
                        if rng.random() < 0.25:
                            raw = msg(i, "order", market_id=m1, side="buy", energy_wh=LOT_WH, price_per_kwh_minor=3100)
                        elif rng.random() < 0.5:
                            raw = msg(i, "order", market_id=m1, side="buy", energy_wh=LOT_WH, price_per_kwh_minor=1000 + rng.randrange(1500))
                            mine[i].append(nonces[i])
                        else:
                            raw = msg(i, "order", market_id=m1, side="sell", energy_wh=LOT_WH, price_per_kwh_minor=3000 + rng.randrange(1000))
                            mine[i].append(nonces[i])
                        kinds.append("order")
                    timed.setdefault(i, []).append(raw)
                statuses: dict[int, int] = {}

                async def device(raws: list[bytes]) -> None:  # one request outstanding per device, as a board's outbox
                    for raw in raws:
                        st, _ = await call(app, "POST", "/v1/messages", raw)
                        statuses[st] = statuses.get(st, 0) + 1

                committer = app.state.committer
                batches0, cpu0, wall0 = committer.batches, time.process_time(), time.perf_counter()
                if profilers:
                    profilers[0].enable()
                await asyncio.gather(*(device(raws) for raws in timed.values()))
                if profilers:
                    profilers[0].disable()
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                statuses["batches"] = committer.batches - batches0
                return {"cpu": cpu, "wall": wall, "statuses": statuses, "kinds": kinds}

        profilers: list[cProfile.Profile] = []
        if args.profile:  # cProfile is per thread: one for the event loop, one inside the writer thread
            profilers = [cProfile.Profile(time.thread_time), cProfile.Profile(time.thread_time)]  # CPU, not wall: fsync waits excluded
            batch = store.submit_batch

            def profiled_batch(items, now_ms=None):
                profilers[1].enable()
                try:
                    return batch(items, now_ms)
                finally:
                    profilers[1].disable()

            store.submit_batch = profiled_batch
        out = asyncio.run(run())
    n = args.messages
    by_kind: dict[str, int] = {}
    for k in out["kinds"]:
        by_kind[k] = by_kind.get(k, 0) + 1
    for name, profiler in zip(("event loop", "writer thread"), profilers):
        for order in ("cumulative", "tottime"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(args.profile)
            print(f"---- {name}, by {order}\n{text.getvalue()}")
    print(f"ledger_cpu: messages {by_kind}, answers {out['statuses']}, resting {args.resting}, db {args.db or 'file (WAL, synchronous=FULL)'}, "
          f"wall {1000 * out['wall'] / n:.3f} ms per message{' (profiled)' if args.profile else ''}")
    print(f"ledger_cpu: messages={n} cpu_ms_per_message={1000 * out['cpu'] / n:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
