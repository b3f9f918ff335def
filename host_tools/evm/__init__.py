"""Host side of the EVM backend: the pinned toolchain (anvil node, solc-js), JSON-RPC, transactions.

The toolchain is installed by the project's own files (``make evm-tools``: npm ci in contracts/),
so tests, the relay and the demo find the same pinned binaries on any machine.
"""
