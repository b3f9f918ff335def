"""Time from a board's submit to a confirmed trade, on anvil with 5-s interval mining (PoA-like).

Per sample: a seller's order rests; at a random moment of the next block period the buyer's board submits a crossing order through the
relay (RelayClient -> dgc-host relay's HTTP -> raw EIP-1559 tx -> receipt) and its EVM adapter
polls its own trades from the observer node (eth_getLogs) every 0.2 s until the trade shows at
confirmation depth 0 and then 1. Also the submit call alone (relay answer incl. landing check).
Prints median and max; never asserts. Run: .venv/bin/python bench/evm_latency.py [SAMPLES]
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware import eip712  # noqa: E402
from firmware.ledger.evm import EvmLedger, RelayClient  # noqa: E402
from host_tools.evm.devchain import next_market, start_chain  # noqa: E402
from host_tools.relay.core import Relay  # noqa: E402
from host_tools.relay.server import running_relay  # noqa: E402

BLOCK_S = 5
POLL_S = 0.2


def main() -> int:
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    chain = start_chain(block_time_s=BLOCK_S)
    submit_s, depth0_s, depth1_s = [], [], []
    rng = random.Random(5)
    try:
        seller, buyer = chain.device(), chain.device(credit=10**12)
        with running_relay(Relay(chain.market, chain.relay)) as relay:
            def board(confirmations: int) -> EvmLedger:
                return EvmLedger(chain.node.url, chain_id=chain.market.chain_id, contract=chain.market.address_hex,
                                 relay=RelayClient(relay.url), confirmations=confirmations)

            ledger0, ledger1 = board(0), board(1)
            me = eip712.checksum_address(buyer.address)
            cursor0 = ledger0.trades_since(me, 0)[1]
            cursor1 = ledger1.trades_since(me, 0)[1]
            for _ in range(samples):
                market_id = next_market(chain)
                ledger0.submit(seller.order(market_id, "sell", 100, 2000))
                time.sleep(rng.uniform(0, BLOCK_S))  # a board's submit falls anywhere in the block period
                started = time.monotonic()
                result = ledger0.submit(buyer.order(market_id, "buy", 100, 2000))
                submit_s.append(time.monotonic() - started)
                assert result.result["filled_wh"] == 100
                got0 = got1 = None
                while got1 is None and time.monotonic() - started < 60:
                    if got0 is None:
                        trades, cursor0 = ledger0.trades_since(me, cursor0)
                        if trades:
                            got0 = time.monotonic() - started
                    trades, cursor1 = ledger1.trades_since(me, cursor1)
                    if trades:
                        got1 = time.monotonic() - started
                    time.sleep(POLL_S)
                depth0_s.append(got0 if got0 is not None else float("nan"))
                depth1_s.append(got1 if got1 is not None else float("nan"))
    finally:
        chain.node.stop()

    def show(name: str, values: list[float]) -> None:
        print(f"{name:<52} median {statistics.median(values):5.2f} s   max {max(values):5.2f} s   (n={len(values)})")

    print(f"anvil --block-time {BLOCK_S}: board submit -> confirmed trade (relay on 127.0.0.1, poll every {POLL_S} s)")
    show("submit answered (receipt + landing check)", submit_s)
    show("trade seen by the board at depth 0", depth0_s)
    show("trade seen by the board at depth 1", depth1_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
