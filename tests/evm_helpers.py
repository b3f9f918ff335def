"""Shared set-up for the EVM tests (the chain helpers live in host_tools.evm.devchain)."""

from __future__ import annotations

from host_tools.evm.devchain import Chain, Device, block_time, next_market, start_chain  # noqa: F401

TABLE1_ASKS = [(16, 4000), (3, 2100), (30, 2080), (15, 2070), (12, 2060), (10, 2050), (20, 2040), (10, 2020), (20, 2010)]
TABLE1_BIDS = [(40, 1990), (5, 1980), (10, 1970), (50, 1960), (20, 1950), (9, 1940), (4, 1930), (12, 1910), (18, 1000)]
