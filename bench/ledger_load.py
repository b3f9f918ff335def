"""Load on the bench ledger: N simulated devices send signed orders, cancels and delivery reports
over real HTTP on loopback, against a book of R resting orders.

Rig: the real ledger (`dgc-host ledger serve`) in its own process on 127.0.0.1, a temporary
SQLite database (WAL, synchronous=FULL), the default per-device limits; only the per-client-
address rate limit is switched off (--client-rate 0), because every simulated device speaks
from 127.0.0.1. The load generator is one asyncio process with one keep-alive connection per
device (in the timed phase a bare asyncio protocol, ``FastConn``: less of the 2 cores for the client); every message is signed with the device's own key *before* the timed phase, so the
generator's CPU goes into HTTP, not signing. Each device has one request outstanding at a time
(as a board's outbox does). With ``--rate-per-device R`` a device also sends at most R messages
per second (the next one leaves when the answer is in *and* 1/R s after the previous one left),
as a board that keeps within the ledger's per-device rate limit (20/s by default) does; without
it every device sends back to back, so with N devices the latency is at least N / throughput
(Little's law) and a device soon exceeds its rate limit. Latency is always from send to the
full answer; a send that is late because the ledger answered late is not hidden.

Phases:
1. Set-up (ledger run 1, the host clock, per-device rate limit off for the fillers' burst):
   register the devices; make trades in market M0 (the
   nearest open one); rest R non-crossing sells (from filler devices) in market M1 = M0 + 10 slots.
2. The ledger is stopped and started again with its clock moved past M0's end - so its
   in-memory book is rebuilt from SQLite at start, and M0's trades can be reported.
3. Timed: every device sends its messages back to back: ~70 % orders in M1 (most rest, ~1 in 4
   crosses the resting asks and trades), ~15 % cancels of its own resting orders, ~15 % delivery
   reports of its M0 trades - but a device has one M0 trade, so it sends at most one report, and
   a draw that would be a second report becomes a cancel: with many messages per device the mix
   tends to ~70 % orders, ~30 % cancels and one report each (the printed `messages` line counts
   each kind). Latency is per request (send to full answer).

An error is any answer other than the one expected (accepted, or for a cancel of an order that a
crossing order filled first: order_closed), any 5xx/429 or a transport failure.

The last line is exactly
``ledger_load: devices=N orders=N orders_per_s=N p50_ms=N p99_ms=N errors=N``
(orders = orders sent in the timed phase; orders_per_s = those orders over the phase's wall time,
cancels and reports included in that time). Prints figures; never asserts. Bounded in count and
time (each phase has a timeout); stops the ledger it started, by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coincurve  # noqa: E402

from firmware.keystore import DeviceKey  # noqa: E402
from firmware.messages import new_fields, sign_message  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LEDGER_ID = "load"
SLOT_S, LOT_WH, GATE_S = 1800, 100, 900
LISTENING = re.compile(r"ledger listening on (http://127\.0\.0\.1:(\d+))")


def key_for(n: int) -> DeviceKey:
    return DeviceKey(coincurve.PrivateKey(hashlib.sha256(f"ledger load device {n}".encode()).digest()))


@dataclass
class Ledger:
    proc: subprocess.Popen
    port: int

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def machine_ticks() -> tuple[int, int] | None:
    """(all CPU ticks, ticks stolen by the hypervisor) from /proc/stat; None where there is none.

    Why: on a virtual machine the hypervisor runs other guests on our cores now and then; a tick
    stolen is a tick in which the ledger could not run, whatever its own code does. On this 2-core
    machine the runs that lost most to it had the highest p99 (session 6, 12 runs at 1,000
    resting: 8.6-19 % stolen, p99 60-97 ms; at most 3 % stolen, 43-52 ms), so each run says how
    much it lost."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(ticks), ticks[7]


def cpu_s(pid: int, part: str = "both") -> float:
    """CPU time (user + system, or one of them) a process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    user, system = int(fields[11]), int(fields[12])
    return {"both": user + system, "user": user, "system": system}[part] / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU time per thread of a process (tid -> s); the main thread's tid is the pid (Linux)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def children_of(pid: int) -> list[int]:
    """The ledger's child processes (its writer process, see host_tools/bench_ledger/writer_process.py)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def tree_cpu_s(pid: int, part: str = "both") -> dict[int, float]:
    """CPU time of the ledger and of each of its child processes (pid -> s)."""
    out = {}
    for p in [pid, *children_of(pid)]:
        try:
            out[p] = cpu_s(p, part)
        except OSError:
            continue
    return out


def start_ledger(db: Path, token: str, offset_ms: int, extra: list[str]) -> Ledger:
    argv = [sys.executable, "-m", "host_tools.cli", "ledger", "serve", "--db", str(db), "--port", "0",
            "--ledger-id", LEDGER_ID, "--slot-seconds", str(SLOT_S), "--markets-ahead", "48", "--lot-wh", str(LOT_WH),
            "--gate-closure-seconds", str(GATE_S), "--price-min-per-kwh-minor", "1000", "--price-max-per-kwh-minor", "4000",
            "--report-deadline-seconds", str(4 * SLOT_S), "--client-rate", "0", "--max-open-orders", "1000",
            "--clock-offset-ms", str(offset_ms), *extra]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "DGC_LEDGER_OPERATOR_TOKEN": token})
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = LISTENING.search(line)
        if m:
            return Ledger(proc, int(m.group(2)))
    proc.kill()
    raise SystemExit("ledger_load: the ledger did not start")


class Conn:
    """One keep-alive HTTP/1.1 connection (a device's), minimal and strict."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Conn":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        m = re.search(rb"(?i)content-length:\s*(\d+)", head)
        body = await self.reader.readexactly(int(m.group(1))) if m else b""
        return status, body

    def close(self) -> None:
        self.writer.close()


def raw_request(method: str, path: str, body: object | None = None, headers: dict | None = None) -> bytes:
    data = b"" if body is None else json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {len(data)}", *[f"{k}: {v}" for k, v in (headers or {}).items()]]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


@dataclass
class Device:
    key: DeviceKey
    nonce: int = 0
    messages: list[tuple[str, bytes]] = field(default_factory=list)  # (kind, raw request)

    def sign(self, kind: str, now_s: int, **body) -> bytes:
        self.nonce += 1
        fields = new_fields(kind, ledger_id=LEDGER_ID, device_id=self.key.device_id, nonce=self.nonce, issued_at=now_s,
                            ttl_s=3600, **body)
        return raw_request("POST", "/v1/messages", sign_message(fields, self.key).to_wire())


async def send_all(port: int, batches: list[list[bytes]], concurrency: int) -> list[tuple[int, bytes, float]]:
    """Each batch on its own connection, sequentially; at most ``concurrency`` connections at once."""
    out: list[tuple[int, bytes, float]] = []
    sem = asyncio.Semaphore(concurrency)

    async def run(batch: list[bytes]) -> None:
        async with sem:
            conn = await Conn.open(port)
            try:
                for raw in batch:
                    t = time.perf_counter()
                    status, body = await conn.request(raw)
                    out.append((status, body, time.perf_counter() - t))
            finally:
                conn.close()

    await asyncio.wait_for(asyncio.gather(*(run(b) for b in batches)), timeout=600)
    return out


def expected(kind: str, status: int, body: bytes) -> bool:
    if status == 200:
        return True
    if kind == "cancel" and status == 422:
        return b'"order_closed"' in body
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--messages-per-device", type=int, default=20)
    parser.add_argument("--rate-per-device", type=float, default=0.0,
                        help="messages per second per device at most (0: back to back)")
    parser.add_argument("--resting", type=int, default=1000, help="resting orders in the book before the timed phase")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ledger-arg", action="append", default=[], help="extra argument for `ledger serve`")
    args = parser.parse_args()
    if not (1 <= args.devices <= 5000 and 1 <= args.messages_per_device <= 2000 and 0 <= args.resting <= 50_000
            and 0 <= args.rate_per_device <= 1000):
        raise SystemExit("ledger_load: --devices 1..5000, --messages-per-device 1..2000, --resting 0..50000, "
                         "--rate-per-device 0..1000")
    try:  # the load generator's own loop: uvloop (the host extra has it) leaves more of the 2 cores to the ledger
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        client_loop = "uvloop"
    except ImportError:
        client_loop = "asyncio"
    rng = random.Random(args.seed)
    token = secrets.token_hex(16)
    auth = {"Authorization": f"Bearer {token}"}
    now_s = int(time.time())
    m0 = (now_s // SLOT_S + 1) * SLOT_S
    if m0 - now_s <= GATE_S + 60:
        m0 += SLOT_S
    m1 = m0 + 10 * SLOT_S
    devices = [Device(key_for(i)) for i in range(args.devices)]
    fillers = [Device(key_for(100_000 + i)) for i in range((args.resting + 399) // 400)]
    with tempfile.TemporaryDirectory(prefix="ledger-load-") as tmp:
        db = Path(tmp) / "ledger.sqlite3"
        # ---------------------------------------------------------------- phase 1: set-up
        ledger = start_ledger(db, token, 0, ["--device-rate", "0", *args.ledger_arg])  # set-up: filler devices burst
        try:
            reg = [[raw_request("POST", "/v1/devices", {"public_key": d.key.public_key.hex(), "name": f"d{i}",
                                                        "sell_capacity_wh": 10**8}, auth)]
                   for i, d in enumerate(devices + fillers)]
            answers = asyncio.run(send_all(ledger.port, reg, 64))
            assert all(s == 200 for s, _, _ in answers), "registration failed"
            # M0 trades: device 2k sells to device 2k+1 (each pair one trade, both report later)
            setup: list[list[bytes]] = []
            for i in range(0, len(devices) - 1, 2):
                setup.append([devices[i].sign("order", now_s, market_id=m0, side="sell", energy_wh=LOT_WH, price_per_kwh_minor=2000)])
            answers = asyncio.run(send_all(ledger.port, setup, 64))
            setup = [[devices[i + 1].sign("order", now_s, market_id=m0, side="buy", energy_wh=LOT_WH, price_per_kwh_minor=2000)]
                     for i in range(0, len(devices) - 1, 2)]
            answers += asyncio.run(send_all(ledger.port, setup, 64))
            trades = {}
            for status, body, _ in answers:
                obj = json.loads(body)
                for t in obj.get("result", {}).get("trades", []):
                    trades[obj["nonce"], t["counterparty"]] = t["trade_id"]
            resting = []
            for j in range(args.resting):
                d = fillers[j // 400]
                resting.append((d, d.sign("order", now_s, market_id=m1, side="sell", energy_wh=LOT_WH,
                                          price_per_kwh_minor=3000 + rng.randrange(1000))))
            per_filler: dict[int, list[bytes]] = {}
            for d, raw in resting:
                per_filler.setdefault(id(d), []).append(raw)
            answers = asyncio.run(send_all(ledger.port, list(per_filler.values()), 64))
            bad = sum(1 for st, _, _ in answers if st != 200)
            if bad:
                print(f"ledger_load: {bad} resting orders refused in set-up", file=sys.stderr)
        finally:
            ledger.stop()

        # ----------------------------------------------------- phase 2: restart, clock moved
        offset_ms = (m0 + SLOT_S + 5 - int(time.time())) * 1000
        ledger_now = int(time.time()) + offset_ms // 1000
        t_restart = time.perf_counter()
        ledger = start_ledger(db, token, offset_ms, args.ledger_arg)
        restart_s = time.perf_counter() - t_restart
        try:
            trade_of = {}  # device index -> (trade id, role)
            for i in range(0, len(devices) - 1, 2):
                seller, buyer = devices[i], devices[i + 1]
                tid = trades.get((1, seller.key.device_id))  # the buyer's nonce-1 order met the seller's
                if tid is not None:
                    trade_of[i], trade_of[i + 1] = (tid, "seller"), (tid, "buyer")
            kinds: list[list[str]] = []
            batches: list[list[bytes]] = []
            orders = 0
            for i, d in enumerate(devices):
                mine: list[int] = []
                ks, raws = [], []
                reported = False
                for _ in range(args.messages_per_device):
                    r = rng.random()
                    if r < 0.15 and i in trade_of and not reported:
                        tid, role = trade_of[i]
                        raws.append(d.sign("delivery_report", ledger_now, trade_id=tid, market_id=m0, role=role,
                                           energy_wh=LOT_WH, status="delivered"))
                        ks.append("report")
                        reported = True
                    elif r < 0.30 and mine:
                        raws.append(d.sign("cancel", ledger_now, market_id=m1, order_nonce=mine.pop(rng.randrange(len(mine)))))
                        ks.append("cancel")
                    else:
                        crossing = rng.random() < 0.25
                        if crossing:  # a buy that lifts the cheapest asks
                            raw = d.sign("order", ledger_now, market_id=m1, side="buy", energy_wh=LOT_WH, price_per_kwh_minor=3100)
                        elif rng.random() < 0.5:
                            raw = d.sign("order", ledger_now, market_id=m1, side="buy", energy_wh=LOT_WH,
                                         price_per_kwh_minor=1000 + rng.randrange(1500))
                            mine.append(d.nonce)
                        else:
                            raw = d.sign("order", ledger_now, market_id=m1, side="sell", energy_wh=LOT_WH,
                                         price_per_kwh_minor=3000 + rng.randrange(1000))
                            mine.append(d.nonce)
                        raws.append(raw)
                        ks.append("order")
                        orders += 1
                kinds.append(ks)
                batches.append(raws)
            threads0 = thread_cpu_s(ledger.proc.pid)
            tree0, own_cpu0 = tree_cpu_s(ledger.proc.pid), time.process_time()
            t0 = time.perf_counter()
            sys0 = tree_cpu_s(ledger.proc.pid, "system")
            ticks0 = machine_ticks()
            answers_timed = asyncio.run(send_all_kinds(ledger.port, batches, kinds, args.rate_per_device))
            elapsed = time.perf_counter() - t0
            ticks1 = machine_ticks()
            tree1, sys1 = tree_cpu_s(ledger.proc.pid), tree_cpu_s(ledger.proc.pid, "system")
            server_cpu = sum(tree1.values()) - sum(tree0.get(p, 0.0) for p in tree1)  # the ledger and its writer process
            server_sys = sum(sys1.values()) - sum(sys0.get(p, 0.0) for p in sys1)
            http_cpu = tree1.get(ledger.proc.pid, 0.0) - tree0.get(ledger.proc.pid, 0.0)
            writer_procs = len(tree1) - 1
            threads1 = thread_cpu_s(ledger.proc.pid)
            loop_cpu = threads1.get(ledger.proc.pid, 0.0) - threads0.get(ledger.proc.pid, 0.0)
            client_cpu = time.process_time() - own_cpu0
            book = asyncio.run(send_all(ledger.port, [[raw_request("GET", f"/v1/markets/{m1}/book")]], 1))[0]
            levels = json.loads(book[1])
            resting_after = sum(lv["orders"] for lv in levels["asks"] + levels["bids"])
        finally:
            ledger.stop()
    latencies = sorted(lat for _, _, _, lat in answers_timed)
    wrong = [(kind, status, body[:160]) for kind, status, body, _ in answers_timed if not expected(kind, status, body)]
    errors = len(wrong)
    for sample in wrong[:3]:
        print(f"ledger_load: unexpected answer {sample}", file=sys.stderr)
    by_kind: dict[str, int] = {}
    for kind, _, _, _ in answers_timed:
        by_kind[kind] = by_kind.get(kind, 0) + 1
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    load = os.getloadavg()[0]
    stolen = "CPU stolen by the hypervisor: unknown (no /proc/stat)"
    if ticks0 is not None and ticks1 is not None and ticks1[0] > ticks0[0]:
        stolen = f"CPU stolen by the hypervisor {100 * (ticks1[1] - ticks0[1]) / (ticks1[0] - ticks0[0]):.1f}% of the timed phase"
    print(f"ledger_load: resting before={args.resting} after={resting_after}; messages {by_kind}; "
          f"messages_per_s={len(latencies) / elapsed:.0f}; ledger restart (book rebuilt from SQLite) {restart_s:.2f} s; "
          f"load average {load:.2f} on {os.cpu_count()} cores (shared machine); {stolen}")
    print(f"ledger_load: ledger CPU {1000 * server_cpu / len(latencies):.2f} ms per message "
          f"({server_cpu / elapsed:.2f} cores busy over the phase), load generator CPU {1000 * client_cpu / len(latencies):.2f} ms "
          f"per message; CPU-bound capacity of one ledger core ~{len(latencies) / server_cpu:.0f} messages/s")
    per_msg = lambda s: 1000 * s / len(latencies)  # noqa: E731
    if writer_procs:
        print(f"ledger_load: ledger CPU by part: event loop (HTTP, parsing, verification) {per_msg(loop_cpu):.2f} ms per message, "
              f"the HTTP process's other threads {per_msg(http_cpu - loop_cpu):.2f} ms, "
              f"the writer process (store, SQLite, commit) {per_msg(server_cpu - http_cpu):.2f} ms; "
              f"in the kernel (sockets, fsync) {per_msg(server_sys):.2f} ms of the total")
    else:
        print(f"ledger_load: ledger CPU by thread: event loop (HTTP, parsing, verification) {per_msg(loop_cpu):.2f} ms "
              f"per message, the other threads (the writer: store, SQLite, commit) {per_msg(server_cpu - loop_cpu):.2f} ms; "
              f"in the kernel (sockets, fsync) {per_msg(server_sys):.2f} ms of the total")
    pacing = (f"at most {args.rate_per_device:g} messages/s per device (offered {args.devices * args.rate_per_device:.0f}/s)"
              if args.rate_per_device else "back to back")
    print(f"ledger_load: one message per request, one request outstanding per device, {pacing}; "
          f"{args.messages_per_device} messages per device; timed phase {elapsed:.1f} s; load generator on {client_loop}")
    print(f"ledger_load: devices={args.devices} orders={orders} orders_per_s={int(orders / elapsed)} "
          f"p50_ms={int(round(p50))} p99_ms={int(round(p99))} errors={errors}")
    return 0


class FastConn(asyncio.Protocol):
    """The timed phase's connection: the same strict HTTP/1.1 exchange as ``Conn``, on a bare
    asyncio protocol (no stream reader/writer, no regex per answer). Why: the load generator
    shares the 2 cores with the ledger, and every microsecond it spends per request is taken
    from the ledger under test."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._waiter: asyncio.Future | None = None
        self._lost: Exception | None = None

    @classmethod
    async def open(cls, port: int) -> "FastConn":
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(cls, "127.0.0.1", port)
        return conn

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self._buffer[:end]
        length = 0
        at = head.lower().find(b"content-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at)
            length = int(head[at + 15:stop if stop >= 0 else len(head)])
        if len(self._buffer) < end + 4 + length:
            return
        body = self._buffer[end + 4:end + 4 + length]
        self._buffer = self._buffer[end + 4 + length:]
        self._waiter = None
        waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("the ledger closed the connection")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self._lost)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self._lost is not None:
            raise self._lost
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self._waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def send_all_kinds(port: int, batches: list[list[bytes]], kinds: list[list[str]],
                         rate_per_device: float = 0.0) -> list[tuple[str, int, bytes, float]]:
    out: list[tuple[str, int, bytes, float]] = []
    conns = await asyncio.gather(*(FastConn.open(port) for _ in batches))
    gap_s = 1.0 / rate_per_device if rate_per_device else 0.0

    async def run(conn: Conn, batch: list[bytes], ks: list[str], start_s: float) -> None:
        next_s = time.perf_counter() + start_s  # devices start spread over one gap, not all in the same instant
        for raw, kind in zip(batch, ks):
            if gap_s:
                wait_s = next_s - time.perf_counter()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                next_s = max(next_s, time.perf_counter() - gap_s) + gap_s  # no catching up after a late answer
            t = time.perf_counter()
            try:
                status, body = await conn.request(raw)
            except (OSError, asyncio.IncompleteReadError) as exc:
                status, body = 0, str(exc).encode()
            out.append((kind, status, body, time.perf_counter() - t))

    try:
        spread = [gap_s * i / max(1, len(batches)) for i in range(len(batches))]
        await asyncio.wait_for(asyncio.gather(*(run(c, b, k, s) for c, b, k, s in zip(conns, batches, kinds, spread))),
                               timeout=600)
    finally:
        for c in conns:
            c.close()
    return out


if __name__ == "__main__":
    sys.exit(main())
