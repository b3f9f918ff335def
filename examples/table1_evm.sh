#!/usr/bin/env bash
# Table 1 of the primary source on chain: a throwaway anvil chain with the market contract and a
# relay (`dgc-host relay devchain`), the book set up with signed EIP-712 orders sent through the
# relay, then the two worked orders:
#   a sell of 5 kWh at 19.5 trades 5 kWh at 19.9 (the 19.9 bid drops to 35 kWh);
#   a buy of 26 kWh at 20.3 trades 20 kWh at 20.1 and 6 kWh at 20.2 (4 kWh stay at 20.2).
# Prices are minor units (1/100 yen) per kWh, energies Wh. Everything listens on 127.0.0.1.
# Usage: examples/table1_evm.sh        (from the repository root, after `make venv evm-tools`)
set -euo pipefail
BIN=${BIN:-.venv/bin}
WORK=$(mktemp -d)
CHAIN_PID=
cleanup() { [ -n "$CHAIN_PID" ] && kill "$CHAIN_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

for who in sellers buyers newcomer; do
    "$BIN/dgc" keygen board_configs/sim.toml --key-file "$WORK/$who.key" >/dev/null
done
"$BIN/dgc-host" relay devchain --register "$WORK/sellers.key" --register "$WORK/buyers.key" \
    --register "$WORK/newcomer.key" >"$WORK/chain.log" 2>&1 &
CHAIN_PID=$!
LINE=
for _ in $(seq 600); do
    LINE=$(grep '^devchain ' "$WORK/chain.log" || true)
    [ -n "$LINE" ] && break
    kill -0 "$CHAIN_PID" 2>/dev/null || break
    sleep 0.1
done
[ -n "$LINE" ] || { echo "devchain did not start:" >&2; cat "$WORK/chain.log" >&2; exit 1; }
echo "$LINE"
RPC=$(echo "$LINE" | sed 's/.*rpc=\([^ ]*\).*/\1/')
RELAY=$(echo "$LINE" | sed 's/.*relay=\([^ ]*\).*/\1/')
NOW=$("$BIN/python" -c 'import json, sys, urllib.request; print(json.load(urllib.request.urlopen(sys.argv[1] + "/v1/time"))["time_ms"])' "$RELAY")
MARKET=$(( (NOW / 1000 / 1800 + 2) * 1800 ))   # a market whose gate is open for the next 45+ min
echo "market: $MARKET"
NONCE=0
order() {  # who side Wh price
    NONCE=$((NONCE + 1))
    "$BIN/dgc-host" relay order --relay "$RELAY" --key-file "$WORK/$1.key" --market-id "$MARKET" \
        --side "$2" --energy-wh "$3" --price "$4" --nonce "$NONCE"
}

# Table 1 ("Over" and "UNDER" rows are market-price orders outside the example; left out).
for ask in "3000 2100" "30000 2080" "15000 2070" "12000 2060" "10000 2050" "20000 2040" "10000 2020" "20000 2010"; do
    order sellers sell $ask >/dev/null
done
for bid in "40000 1990" "5000 1980" "10000 1970" "50000 1960" "20000 1950" "9000 1940" "4000 1930" "12000 1910"; do
    order buyers buy $bid >/dev/null
done

echo "worked order 1: sell 5 kWh at 19.5"
order newcomer sell 5000 1950
echo "worked order 2: buy 26 kWh at 20.3"
order newcomer buy 26000 2030
echo "book after both:"
"$BIN/dgc-host" relay book --rpc "$RPC" --relay "$RELAY" --market-id "$MARKET"
