"""Gas per action of the DgcMarket contract, measured on a real anvil node (automine).

Each figure is the receipt's gasUsed of one transaction (21,000 of it is the base cost of any
transaction). Actions: deployment, operator calls, an order that rests (cold and warm price
level), an order that matches N resting orders for N = 1..10 (the slope is the cost of each extra
match), cancel, bulk cancel, the first and the settling delivery report, settleAfterDeadline and
expire. Prints a table; never asserts. Run: .venv/bin/python bench/evm_gas.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware import eip712  # noqa: E402
from host_tools.evm.devchain import Device, next_market, start_chain  # noqa: E402
from host_tools.evm.toolchain import HARDFORK  # noqa: E402

FUNDS = 10**13
MAX_MATCHES = 10


def main() -> int:
    rows: list[tuple[str, int]] = []
    chain = start_chain()
    try:
        m = chain.market
        rows.append(("deploy (constructor + %d bytes runtime)" % m.artefact.deployed_size, chain.deploy_gas))
        seller, buyer = chain.device(), chain.device()
        rows.append(("registerDevice", m.transact(chain.operator, "registerDevice", Device(m).address).gas_used))
        rows.append(("credit (first)", m.transact(chain.operator, "credit", buyer.address, FUNDS).gas_used))
        market_id = next_market(chain)

        def gas(message) -> int:
            return m.submit(chain.relay, message).gas_used

        rows.append(("sell order, rests (first order of the device, new level)", gas(seller.order(market_id, "sell", 100, 2500))))
        rows.append(("sell order, rests (new level)", gas(seller.order(market_id, "sell", 100, 2600))))
        rows.append(("sell order, rests (behind another at its level)", gas(seller.order(market_id, "sell", 100, 2600))))
        rows.append(("buy order, rests (locks payment, new level)", gas(buyer.order(market_id, "buy", 100, 1500))))
        cancel_target = seller.order(market_id, "sell", 100, 3000)
        gas(cancel_target)
        rows.append(("cancel (O(1) unlink, level emptied)", gas(seller.sign("cancel", market_id=market_id, order_nonce=cancel_target.nonce))))

        # matching: N makers of 100 Wh at one price, a taker that takes all N
        match_gas = []
        for n in range(1, MAX_MATCHES + 1):
            mk = next_market(chain)
            for _ in range(n):
                gas(seller.order(mk, "sell", 100, 2000))
            match_gas.append(gas(buyer.order(mk, "buy", 100 * n, 2100)))
        for n, g in enumerate(match_gas, 1):
            if n in (1, 2, 5, 10):
                rows.append((f"buy order matching {n} resting order(s), fully filled", g))
        slope = (match_gas[-1] - match_gas[0]) // (MAX_MATCHES - 1)
        rows.append(("  each extra match (slope 1..%d)" % MAX_MATCHES, slope))

        # delivery reports on the single-match trade of the last market
        mk = next_market(chain)
        gas(seller.order(mk, "sell", 500, 2000))
        receipt = m.submit(chain.relay, buyer.order(mk, "buy", 500, 2000))
        trade_id = receipt.events("TradeMade")[0]["tradeId"]
        chain.advance_to(mk + 1800)
        roles = eip712.ROLES

        def report(device, role, wh):
            return device.sign("delivery_report", trade_id=trade_id, market_id=mk, role=roles[role], energy_wh=wh, status=1)

        rows.append(("delivery report, first of the trade", gas(report(seller, "seller", 500))))
        rows.append(("delivery report, second: settles (pays, refunds, shortfall)", gas(report(buyer, "buyer", 450))))

        mk = next_market(chain)
        gas(seller.order(mk, "sell", 300, 2000))
        trade_id = m.submit(chain.relay, buyer.order(mk, "buy", 300, 2000)).events("TradeMade")[0]["tradeId"]
        order_id = m.submit(chain.relay, buyer.order(mk, "buy", 300, 1900)).events("OrderPlaced")[0]["orderId"]
        chain.advance_to(mk - 900)
        rows.append(("expire one order after its gate (releases the lock)", m.transact(chain.relay, "expire", [order_id]).gas_used))
        chain.advance_to(mk + 1800 + 3600)
        rows.append(("settleAfterDeadline (no reports)", m.transact(chain.relay, "settleAfterDeadline", trade_id).gas_used))

        mk = next_market(chain)
        for _ in range(5):
            gas(seller.order(mk, "sell", 100, 2700))
        rows.append(("bulk cancel closing 5 open orders", gas(seller.sign("bulk_cancel", min_nonce=10**6))))
    finally:
        chain.node.stop()

    print(f"DgcMarket gas per action (anvil, --hardfork {HARDFORK}, solc {chain.market.artefact.solc_version.split('+')[0]} via-IR, optimizer 200 runs)")
    width = max(len(name) for name, _ in rows)
    print(f"{'action':<{width}}  {'gas':>10}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10,}")
    block_gas = 30_000_000
    resting = dict(rows)["sell order, rests (new level)"]
    print(f"a 30M-gas block holds ~{block_gas // resting} resting orders ({block_gas // resting // 5} per second at 5-s blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
