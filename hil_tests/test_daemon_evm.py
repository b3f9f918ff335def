"""The real `dgc run` daemons on the EVM backend: exactly-once under SIGKILL, reporting, settlement.

The same world as hil_tests/test_daemon.py (two bench houses, 12-s slots, real daemons killed
with SIGKILL at moments drawn from the slot clock), but the ledger is the DgcMarket contract on
a real anvil node (1-s interval mining) behind `dgc-host relay serve`; the boards sign EIP-712
(`[ledger] kind = "evm"`). What the test reads is the chain: the logs anyone can check, and each
message's transaction input - nothing of the relay's own bookkeeping.

Shorter than the REST test (fewer kill moments), because `make test` runs both: the point here
is that the backend changes nothing of the daemon's guarantees, not a second soak.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from firmware import eip712
from firmware.ledger.evm import EvmLedger
from firmware.ledger.evm_abi import message_calldata
from firmware.messages import SignedMessage
from host_tools.neighbourhood import Neighbourhood

from .daemons import SHORT_CADENCE, SHORT_MARKET, assert_no_crash, journal, journal_messages, seller_and_buyer
from .kill_plan import describe, kill_count, phases_hit, plan_kills, run_kills
from .test_daemon import (KILL_SEED_ENV, ROUTER_TOLERANCE_WH, explain_trades, kill_seed, router_log, watchdog_cuts,
                          watchdog_violations)

KILL_MOMENTS = 6  # 1 to 2 victims each, every phase of kill_plan.kill_phases at least once
KILL_SLOTS = 3  # two moments a slot when the machine keeps up
# Slots of the market day beyond the kill slots: the chain, the houses, a slot of meter history,
# a bid and its gate before the first trade (about 3 slots), room for that to come several slots
# later on a loaded machine (make test's workers share 2 cores), and for slow restarts to move
# kills a slot on each (kill_plan.py); the test prints how many slots were left.
DAY_SLACK_SLOTS = 12


def _on_chain(hood: Neighbourhood) -> dict:
    """Per device address: nonce -> [(event, digest, tx hash)], from Accepted and Rejected logs."""
    market = hood.chain.market
    out: dict[bytes, dict[int, list]] = {}
    for event in ("Accepted", "Rejected"):
        for lg in market.logs(event, from_block=hood.chain.from_block):
            if not lg.removed:
                out.setdefault(lg.args["device"], {}).setdefault(lg.args["nonce"], []).append((event, lg.args["digest"], lg.tx_hash))
    return out


def check_chain_invariants(hood: Neighbourhood, router_status: dict[str, dict]) -> tuple[list[str], list[str], dict]:
    """(ledger violations, metering violations, figures). The metering ones (a report against
    what the router moved) do not depend on the backend: hil_tests/test_daemon.py asserts them on
    the same daemon code; here they are printed (see the test's docstring)."""
    violations: list[str] = []
    metering: list[str] = []
    chain = hood.chain
    market = chain.market
    domain = market.domain()
    landed = _on_chain(hood)
    rpc = market.rpc

    # 1. Every message a journal stored landed on chain exactly once, with the calldata its stored
    #    bytes make (so the very signature the board stored), and nothing else from the device.
    for name, house in hood.houses.items():
        address = eip712.address_bytes(house.address)
        theirs = landed.get(address, {})
        signed = journal_messages(house)
        if not signed:
            violations.append(f"{name}: signed nothing")
        for row in signed:
            nonce = row["nonce"]
            if row["state"] not in ("acked", "rejected"):
                violations.append(f"{name}: message nonce {nonce} ({row['kind']}) still {row['state']} at the end")
            if json.loads(row["answer"] or "{}").get("code") == "nonce_conflict":
                violations.append(f"{name}: nonce {nonce} reused for a different message")
            stored = SignedMessage(payload=row["payload"].encode("ascii"), signature=bytes.fromhex(row["signature"]))
            typed = EvmLedger.typed(stored)
            if typed.signer(domain) != address:
                violations.append(f"{name}: nonce {nonce}: the stored signature is not this board's EIP-712 signature")
            events = theirs.get(nonce, [])
            if len(events) != 1:
                violations.append(f"{name}: message nonce {nonce} ({row['kind']}) landed {len(events)} times")
                continue
            _, digest, tx_hash = events[0]
            if digest != typed.digest(domain):
                violations.append(f"{name}: nonce {nonce}: the chain holds another digest than the journal's")
            tx = rpc.call("eth_getTransactionByHash", tx_hash)
            if tx["input"] != "0x" + message_calldata(typed).hex():
                violations.append(f"{name}: nonce {nonce}: the transaction's input is not the journal's bytes")
        extra = sorted(set(theirs) - {row["nonce"] for row in signed})
        if extra:
            violations.append(f"{name}: the chain holds messages the journal never stored: nonces {extra[:10]}")

    # 2. Per trade: a report from each side, reported <= contracted and as the router moved it,
    #    settled on both reports; no transfer STARTed twice.
    trades = {a["tradeId"]: a for lg in market.logs("TradeMade", from_block=chain.from_block) for a in [lg.args]}
    reports: dict[tuple[int, int], dict] = {}
    for lg in market.logs("DeliveryReported", from_block=chain.from_block):
        reports[(lg.args["tradeId"], lg.args["role"])] = lg.args
    settled = {lg.args["tradeId"]: lg.args for lg in market.logs("TradeSettled", from_block=chain.from_block)}
    routers = {name: router_log(house) for name, house in hood.houses.items()}
    house_of = {eip712.address_bytes(h.address): name for name, h in hood.houses.items()}
    delivered_total = {name: 0.0 for name in hood.houses}
    for trade_id, trade in sorted(trades.items()):
        for role, device in ((eip712.ROLE_SELLER, trade["seller"]), (eip712.ROLE_BUYER, trade["buyer"])):
            house = house_of[device]
            starts, moved = routers[house]
            if starts[trade_id] > 1:
                violations.append(f"trade {trade_id}: the {house}'s router STARTed it {starts[trade_id]} times")
            delivered_total[house] += moved.get(trade_id, 0.0)
            report = reports.get((trade_id, role))
            if report is None:
                violations.append(f"trade {trade_id} (market {trade['marketId']}): no {house} report on chain")
                continue
            if report["energyWh"] > trade["energyWh"]:
                violations.append(f"trade {trade_id}: {house} reported {report['energyWh']} of {trade['energyWh']} Wh")
            if abs(report["energyWh"] - moved.get(trade_id, 0.0)) > ROUTER_TOLERANCE_WH:
                metering.append(f"trade {trade_id}: {house} reported {report['energyWh']} Wh, its router moved "
                                  f"{moved.get(trade_id, 0.0):.3f} Wh")
        if trade_id not in settled:
            violations.append(f"trade {trade_id} (market {trade['marketId']}): not settled on chain")
        elif (trade_id, eip712.ROLE_SELLER) in reports and (trade_id, eip712.ROLE_BUYER) in reports:
            expected = min(trade["energyWh"], reports[(trade_id, 1)]["energyWh"], reports[(trade_id, 2)]["energyWh"])
            if settled[trade_id]["settledWh"] != expected:
                violations.append(f"trade {trade_id}: settled {settled[trade_id]['settledWh']} Wh, not min(contracted, reports) = {expected}")
    for name, status in router_status.items():
        if status["transfers"]:
            violations.append(f"{name}: its router still runs {status['transfers']} after the market day")
        counter = status["export_wh"] if name == "seller" else status["import_wh"]
        if abs(counter - delivered_total[name]) > ROUTER_TOLERANCE_WH * max(1, len(trades)):
            metering.append(f"{name}: router counter {counter} Wh, its ended transfers sum to {delivered_total[name]:.3f} Wh")

    # 3. The journals agree: every trade of the board ends reported.
    for name, house in hood.houses.items():
        db = journal(house)
        try:
            rows = {r["trade_id"]: r["state"] for r in db.execute("SELECT trade_id, state FROM deliveries")}
        finally:
            db.close()
        address = eip712.address_bytes(house.address)
        for trade_id in [t for t, a in trades.items() if address in (a["seller"], a["buyer"])]:
            if rows.get(trade_id) != "reported":
                violations.append(f"{name}: trade {trade_id}'s delivery is {rows.get(trade_id)!r} in the journal")
    # 4. No transfer cut by a router's watchdog across a restart (the REST test's rule 5: a
    #    restarted seller once resent 34 messages, a block each, before its heartbeat started).
    cuts = watchdog_cuts(hood)
    violations += watchdog_violations(cuts)
    figures = {"trades": len(trades), "reports": len(reports), "settled": len(settled),
               "messages": sum(len(v) for v in landed.values()), "watchdog_cuts": cuts}
    return violations, metering, figures


@pytest.mark.rig_features("house-emulator")
def test_sigkilled_daemons_on_the_chain_lose_duplicate_and_overrun_nothing(tmp_path: Path) -> None:
    """SIGKILL both daemons at moments in bidding, delivery start, mid-transfer, metering and
    reporting, restart them; then from the chain: every journalled message landed exactly once
    with the journal's bytes, every trade reported by both sides (never above contracted) and
    settled on min(contracted, reports), no transfer STARTed twice; the journals end every trade
    reported. Whether a report matches what the router moved is metering, the same code on both
    backends: test_daemon.py asserts it; it is printed here, not asserted twice."""
    seed = kill_seed(os.environ.get(KILL_SEED_ENV, ""))
    print(f"sigkill evm test: seed={seed} (replay with {KILL_SEED_ENV}={seed})")
    rng = random.Random(seed)
    slot_s, gate_s = SHORT_MARKET["slot_seconds"], SHORT_MARKET["gate_closure_seconds"]
    hood = Neighbourhood(tmp_path / "hood", seller_and_buyer(), market_overrides=SHORT_MARKET,
                         cadence_overrides=SHORT_CADENCE, last_market_slots=KILL_SLOTS + DAY_SLACK_SLOTS, ledger="evm")
    with hood:
        hood.start()
        end_of_day = hood.last_market + slot_s
        hood.houses["seller"].daemon.wait_for_line(r" trade\.contracted ", timeout_s=8 * slot_s)
        # Each kill is placed when its turn comes (hil_tests/kill_plan.py): a slow restart on a
        # loaded machine moves the next kill a slot on instead of losing it.
        kills = run_kills(hood, plan_kills(rng, KILL_MOMENTS), slot_s=slot_s, gate_s=gate_s,
                          until=hood.last_market, rng=rng)
        print("\n".join(describe(kills, slot_s)))
        total, by_phase = kill_count(kills), phases_hit(kills)
        print(f"sigkill evm test: seed={seed} kills={total} moments={len(kills)} phases={dict(by_phase)} "
              f"slots_left={(hood.last_market - time.time()) / slot_s:.1f}")
        assert len(kills) == KILL_MOMENTS, f"only {len(kills)} of {KILL_MOMENTS} kill moments fell in the market day (seed {seed})"
        assert len(by_phase) >= 4, f"phases hit: {dict(by_phase)} (seed {seed})"

        def day_settled() -> bool:
            stats = hood.stats()
            return time.time() > end_of_day + 2 and stats["trades"] > 0 and stats["settled_trades"] == stats["trades"]

        settled = hood.wait_until(day_settled, timeout_s=end_of_day - time.time() + 5 * slot_s, poll_s=1)

        def outboxes_drained() -> bool:
            return all(row["state"] != "pending" for house in hood.houses.values() for row in journal_messages(house))

        drained = hood.wait_until(outboxes_drained, timeout_s=3 * slot_s, poll_s=1)
        for house in hood.houses.values():
            assert_no_crash(house)
            assert house.daemon.stop() == 0, f"{house.spec.name} did not stop cleanly (seed {seed})"
        router_status = {name: hood.bench_status(name)["dgr"] for name in hood.houses}
        violations, metering, figures = check_chain_invariants(hood, router_status)
        print(f"sigkill evm test: seed={seed} {figures} settled={settled} drained={drained} violations={len(violations)}")
        for line in metering:  # backend-independent; asserted by test_daemon.py (sim-findings H3 while open)
            print(f"sigkill evm test: metering (not asserted here): {line}")
        assert figures["trades"] >= KILL_SLOTS, f"only {figures['trades']} trades in the day (seed {seed})"
        if violations:
            print("\n".join(explain_trades(hood, violations)))
        assert not violations, f"seed {seed}: {len(violations)} invariant violations:\n" + "\n".join(violations[:40])
