"""EIP-1559 transactions for the host tools: the board's own implementation (firmware.ledger.evm_tx)."""

from firmware.ledger.evm_tx import Eip1559Tx, contract_address, key_address, rlp_encode, tx_hash  # noqa: F401
