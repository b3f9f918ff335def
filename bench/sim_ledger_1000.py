"""1,000 houses trade for a simulated day against the bench ledger's real store; the ledger's figures.

Why this shape: the trust-core simulation (``dgc-host sim``, host_tools/sim/) runs 2-6 full board
controllers per seed; a day of 1,000 full controllers (60-s heartbeats, 5-min meter reads, each
with its own SQLite journal) would be millions of steps, far beyond a bounded bench. The ledger
does not see controllers, it sees signed messages. So this bench takes the simulation's public
pieces - its house profiles (``host_tools.sim.profiles.SyntheticProfile``: per-house load and PV
per slot), its market constants (``host_tools.sim.runner``: slot, gate, report deadline) - and
drives the real ``LedgerStore`` (SQLite file, WAL, synchronous=FULL, the signed record) with what
1,000 boards would send in a day, in virtual time:

- every house signs its messages with its own key; every message is verified with coincurve
  against the registered key (as the HTTP app does) before the store applies it;
- bid: for each market, at its own per-device jittered time (issue 10: "so that 1,000 houses
  do not arrive in the same second"), a house with a forecast surplus (PV - load, forecast =
  the profile's value with +-15 % error) offers whole lots; one with a deficit bids for them;
- review: 5 minutes later a still-open order is cancelled and placed again 10 % closer to the
  other side (cancels, re-orders);
- delivery: after the slot, both parties of every trade report the energy their meters would
  show: min(contracted, what the house really had / needed in proportion to its trades);
- settlement: by both reports, or at the report deadline by the store's sweep.

Messages due in the same virtual second go to ``submit_batch`` together (group commit, as the
HTTP writer batches concurrent requests). Ledger CPU is ``time.thread_time()`` around
verification and store calls only (signing is the boards' work, measured apart).

Last line: ``sim_ledger_1000: houses=N slots=N messages=N orders=N trades=N settled=N wall_s=X
cpu_ms_per_message=X``. Prints figures; never asserts. Bounded: --houses <= 2000, --slots <= 96.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coincurve  # noqa: E402

from firmware.keystore import DeviceKey  # noqa: E402
from firmware.market import MarketRules  # noqa: E402
from firmware.messages import SignedMessage, new_fields, open_message, sign_message  # noqa: E402
from host_tools.bench_ledger.store import LedgerStore  # noqa: E402
from host_tools.sim.profiles import SyntheticProfile  # noqa: E402
from host_tools.sim.runner import GATE_S, MARKETS_AHEAD, REPORT_DEADLINE_S, SLOT_S  # noqa: E402

LEDGER_ID = "sim-1000"
LOT_WH = 100
PRICE_MIN, PRICE_MAX = 1000, 4000
EPOCH0 = 1_780_000_000 - 1_780_000_000 % 86_400  # a UTC midnight


def lots(wh: float) -> int:
    return int(wh // LOT_WH) * LOT_WH


class House:
    def __init__(self, idx: int, rng: random.Random):
        self.name = f"house-{idx + 1}"
        self.key = DeviceKey(coincurve.PrivateKey(hashlib.sha256(f"sim ledger house {idx}".encode()).digest()))
        self.device_id = self.key.device_id
        self.nonce = 0
        self.jitter_s = int.from_bytes(hashlib.sha256(self.device_id.encode()).digest()[:4], "big") % 600  # per device
        self.rng = random.Random(rng.getrandbits(64))
        self.open: dict[int, tuple[int, str, int, int]] = {}  # market -> (nonce, side, energy, price) of its open order
        self.actual: dict[int, float] = {}  # market -> real net (pv - load) Wh
        self.traded: dict[int, int] = {}  # market -> Wh contracted in its trades


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--houses", type=int, default=1000)
    parser.add_argument("--slots", type=int, default=48, help="markets traded (48 = a day)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--db", default="", help="database path (default: a temporary file; ':memory:' for no fsync)")
    args = parser.parse_args()
    if not (2 <= args.houses <= 2000 and 1 <= args.slots <= 96):
        raise SystemExit("sim_ledger_1000: --houses 2..2000, --slots 1..96")
    rng = random.Random(args.seed)
    houses = [House(i, rng) for i in range(args.houses)]
    profile = SyntheticProfile(rng, [h.name for h in houses], slot_seconds=SLOT_S)
    rules = MarketRules(slot_seconds=SLOT_S, markets_ahead=MARKETS_AHEAD, lot_wh=LOT_WH, gate_closure_seconds=GATE_S,
                        price_min_per_kwh_minor=PRICE_MIN, price_max_per_kwh_minor=PRICE_MAX)
    first_market = EPOCH0 + 2 * SLOT_S
    markets = [first_market + i * SLOT_S for i in range(args.slots)]
    end_s = markets[-1] + SLOT_S + REPORT_DEADLINE_S + 60
    counts = {"order": 0, "cancel": 0, "delivery_report": 0}
    answers: dict[str, int] = {}
    sign_s = 0.0
    ledger_cpu = 0.0
    batches, peak_batch = 0, 0
    with tempfile.TemporaryDirectory(prefix="sim-ledger-") as tmp:
        db = args.db or str(Path(tmp) / "ledger.sqlite3")
        store = LedgerStore(db, rules, REPORT_DEADLINE_S, last_market_id=markets[-1], max_open_orders=64)
        t_start = time.perf_counter()
        for h in houses:
            store.register_device(h.key.public_key.hex(), h.name, 10**12, (EPOCH0 - 60) * 1000)
        keys = {h.device_id: h.key.public_key for h in houses}
        index_of = {h.device_id: i for i, h in enumerate(houses)}
        events: list[tuple[int, int, int, str, int]] = []  # (time s, seq, house idx, job, market)
        seq = 0

        def at(t: int, idx: int, job: str, market: int) -> None:
            nonlocal seq
            seq += 1
            heapq.heappush(events, (t, seq, idx, job, market))

        for m in markets:
            for i, h in enumerate(houses):
                at(m - GATE_S - 360 - h.jitter_s, i, "bid", m)
            at(m + SLOT_S + 30, -1, "reports", m)  # after the slot: boards learn their trades and report

        def sign(h: House, kind: str, now_s: int, **body) -> tuple[str, dict, bytes, bytes]:
            nonlocal sign_s
            t = time.perf_counter()
            h.nonce += 1
            fields = new_fields(kind, ledger_id=LEDGER_ID, device_id=h.device_id, nonce=h.nonce, issued_at=now_s, ttl_s=3600, **body)
            message = sign_message(fields, h.key)
            sign_s += time.perf_counter() - t
            return kind, fields, message.payload, message.signature

        pending: list[tuple[House, tuple]] = []
        while events:
            now_s = events[0][0]
            while events and events[0][0] == now_s:  # everything due this virtual second
                _, _, idx, job, m = heapq.heappop(events)
                if job == "reports":
                    trades = store.market_trades(m)  # what each board's trade poll tells it
                    for trade in trades:
                        for role in ("seller", "buyer"):
                            party = index_of[trade[role]["device_id"]]
                            houses[party].traded[m] = houses[party].traded.get(m, 0) + trade["energy_wh"]
                    for trade in trades:
                        for role in ("seller", "buyer"):
                            party = index_of[trade[role]["device_id"]]
                            at(now_s + houses[party].jitter_s, party, f"report:{trade['trade_id']}:{role}:{trade['energy_wh']}", m)
                    continue
                h = houses[idx]
                if job == "bid":
                    load_wh, pv_wh = profile.slot_energy(h.name, m)
                    h.actual[m] = pv_wh - load_wh
                    forecast = h.actual[m] * h.rng.uniform(0.85, 1.15)
                    side = "sell" if forecast > 0 else "buy"
                    energy = lots(abs(forecast))
                    if energy:
                        price = h.rng.randrange(1800, 2600) if side == "sell" else h.rng.randrange(2000, 2800)
                        pending.append((h, sign(h, "order", now_s, market_id=m, side=side, energy_wh=energy, price_per_kwh_minor=price)))
                        h.open[m] = (h.nonce, side, energy, price)
                        at(now_s + 300, idx, "review", m)
                elif job == "review":
                    order = h.open.get(m)
                    if order is not None:
                        nonce, side, energy, price = order
                        pending.append((h, sign(h, "cancel", now_s, market_id=m, order_nonce=nonce)))
                        new_price = max(PRICE_MIN, int(price * 0.9)) if side == "sell" else min(PRICE_MAX, int(price * 1.1))
                        pending.append((h, sign(h, "order", now_s, market_id=m, side=side, energy_wh=energy, price_per_kwh_minor=new_price)))
                        h.open[m] = (h.nonce, side, energy, new_price)
                else:  # report:trade:role:energy
                    _, trade_id, role, contracted = job.split(":")
                    contracted = int(contracted)
                    traded = h.traded.get(m, contracted)
                    real = abs(h.actual.get(m, 0.0))
                    share = 1.0 if traded <= 0 else min(1.0, real / traded)
                    energy = int(contracted * share)
                    status = "delivered" if energy > 0 else "failed"
                    pending.append((h, sign(h, "delivery_report", now_s, trade_id=int(trade_id), market_id=m, role=role,
                                            energy_wh=energy, status=status)))
            if not pending:
                continue
            t = time.thread_time()
            items = []
            for h, (kind, fields, payload, signature) in pending:
                open_message(SignedMessage(payload, signature), keys[fields["device_id"]], backend="coincurve")
                items.append((fields, payload, signature))
            results = store.submit_batch(items, now_s * 1000)
            ledger_cpu += time.thread_time() - t
            batches += 1
            peak_batch = max(peak_batch, len(items))
            for (h, (kind, fields, _, _)), outcome in zip(pending, results):
                counts[kind] += 1
                code = "exception" if isinstance(outcome, BaseException) else (
                    "accepted" if outcome.http_status == 200 else str(outcome.body.get("code")))
                answers[f"{kind}:{code}"] = answers.get(f"{kind}:{code}", 0) + 1
                if kind == "order" and (isinstance(outcome, BaseException) or outcome.http_status != 200):
                    if h.open.get(fields["market_id"], (None,))[0] == fields["nonce"]:
                        del h.open[fields["market_id"]]  # refused: nothing to review
                elif kind == "order":
                    result = outcome.body["result"]
                    if result["state"] != "open":
                        h.open.pop(fields["market_id"], None)
                    for tr in result["trades"]:  # the maker's order is filled by this much (it polls its trades)
                        maker = houses[index_of[tr["counterparty"]]]
                        o = maker.open.get(fields["market_id"])
                        if o is not None and o[0] == tr["counterparty_order_nonce"]:
                            if o[2] - tr["energy_wh"] > 0:
                                maker.open[fields["market_id"]] = (o[0], o[1], o[2] - tr["energy_wh"], o[3])
                            else:
                                del maker.open[fields["market_id"]]
            pending = []
        t = time.thread_time()
        store.sweep(end_s * 1000)  # the report deadline of the last market: the silent are settled
        ledger_cpu += time.thread_time() - t
        wall_s = time.perf_counter() - t_start
        stats = store.stats()
        problems = store.record_completeness()
        store.close()
    messages = sum(counts.values())
    print(f"sim_ledger_1000: {args.houses} houses, {args.slots} markets of {SLOT_S} s, seed {args.seed}, db {args.db or 'file (WAL, synchronous=FULL)'}")
    print(f"sim_ledger_1000: answers {dict(sorted(answers.items()))}")
    print(f"sim_ledger_1000: ledger stats {json.dumps(stats, sort_keys=True)}")
    print(f"sim_ledger_1000: batches {batches} (largest {peak_batch} messages in one virtual second); record complete: "
          f"{'yes' if not problems else problems[:3]}; signing (the boards' work) {1000 * sign_s / max(messages, 1):.3f} ms per message; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"sim_ledger_1000: houses={args.houses} slots={args.slots} messages={messages} orders={counts['order']} "
          f"trades={stats['trades']} settled={stats['settled_trades']} wall_s={wall_s:.1f} "
          f"cpu_ms_per_message={1000 * ledger_cpu / max(messages, 1):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
