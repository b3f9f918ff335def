#!/usr/bin/env bash
# Table 1 of the primary source (Tanaka et al.), set up by hand on a bench ledger with the
# engineer's commands only, then the two worked orders after it:
#   a sell of 5 kWh at 19.5 trades 5 kWh at 19.9 (the 19.9 bid drops to 35 kWh);
#   a buy of 26 kWh at 20.3 trades 20 kWh at 20.1 and 6 kWh at 20.2 (4 kWh stay at 20.2).
# Prices are minor units (1/100 yen) per kWh, energies Wh. The ledger runs the source's rules
# (30-min slots, gate 15 min before delivery) on 127.0.0.1 on a free port, in a temporary dir.
# Usage: examples/table1.sh        (from the repository root, after `make venv`)
set -euo pipefail
BIN=${BIN:-.venv/bin}
WORK=$(mktemp -d)
LEDGER_PID=
cleanup() { [ -n "$LEDGER_PID" ] && kill "$LEDGER_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
# The operator's token: registering devices needs it (the ledger has no anonymous registration).
export DGC_LEDGER_OPERATOR_TOKEN=${DGC_LEDGER_OPERATOR_TOKEN:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}

"$BIN/dgc-host" ledger serve --db "$WORK/ledger.sqlite3" --port 0 --ledger-id table1 \
    --slot-seconds 1800 --markets-ahead 48 --gate-closure-seconds 900 \
    --price-min-per-kwh-minor 1000 --price-max-per-kwh-minor 4000 >"$WORK/ledger.log" 2>&1 &
LEDGER_PID=$!
URL=
for _ in $(seq 100); do
    URL=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$WORK/ledger.log" || true)
    [ -n "$URL" ] && break
    sleep 0.1
done
[ -n "$URL" ] || { echo "ledger did not start:" >&2; cat "$WORK/ledger.log" >&2; exit 1; }
echo "ledger: $URL"

for who in sellers buyers newcomer; do
    "$BIN/dgc" keygen board_configs/sim.toml --key-file "$WORK/$who.key" >/dev/null
    # "sellers" stands for all of Table 1's sellers: qualified for their 120 kWh in one market
    "$BIN/dgc-host" ledger register --url "$URL" --config board_configs/sim.toml --key-file "$WORK/$who.key" --name "$who" \
        --sell-capacity-wh 200000 >/dev/null
done

MARKET=$(( ($(date +%s) / 1800 + 2) * 1800 ))   # a market whose gate is open for the next 45+ min
echo "market: $MARKET"
order() {  # who side kWh*10 price
    "$BIN/dgc-host" ledger order --url "$URL" --key-file "$WORK/$1.key" --ledger-id table1 \
        --market-id "$MARKET" --side "$2" --energy-wh "$3" --price "$4"
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
"$BIN/dgc-host" ledger book --url "$URL" --market-id "$MARKET" --json
