"""EIP-1559 (type 2) transactions signed with coincurve, and the RLP they need.

Why here and not eth-account: the relay, the tests and a board that pays its own gas (direct
submission) need one transaction type; a small RLP encoder plus a signature from any
``messages.Signer`` is all it takes (eth-account would cost ~20 MB on the board). Tests
cross-check the bytes against eth-account (tests/test_evm_tx.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from firmware.eip712 import address_from_public_key, keccak256, to_eip2098
from firmware.messages import Signer


def rlp_encode(item: object) -> bytes:
    """RLP of bytes, non-negative ints (minimal big-endian) and lists of those."""
    if isinstance(item, int) and not isinstance(item, bool):
        if item < 0:
            raise ValueError("RLP: negative integer")
        item = item.to_bytes((item.bit_length() + 7) // 8, "big") if item else b""
    if isinstance(item, (bytes, bytearray)):
        data = bytes(item)
        if len(data) == 1 and data[0] < 0x80:
            return data
        return _length(len(data), 0x80) + data
    if isinstance(item, (list, tuple)):
        body = b"".join(rlp_encode(x) for x in item)
        return _length(len(body), 0xC0) + body
    raise TypeError(f"RLP: cannot encode {type(item).__name__}")


def _length(n: int, offset: int) -> bytes:
    if n < 56:
        return bytes([offset + n])
    encoded = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([offset + 55 + len(encoded)]) + encoded


@dataclass(frozen=True)
class Eip1559Tx:
    chain_id: int
    nonce: int
    max_priority_fee_per_gas: int
    max_fee_per_gas: int
    gas: int
    to: bytes | None  # None: contract creation
    value: int
    data: bytes

    def _fields(self) -> list:
        return [self.chain_id, self.nonce, self.max_priority_fee_per_gas, self.max_fee_per_gas, self.gas,
                self.to or b"", self.value, self.data, []]

    def signing_hash(self) -> bytes:
        return keccak256(b"\x02" + rlp_encode(self._fields()))

    def sign(self, signer: Signer) -> bytes:
        """The raw signed transaction for eth_sendRawTransaction.

        Any ``messages.Signer`` will do (a ``keystore.DeviceKey`` holding the relay's key): the
        y parity is found by recovery, so the secret never leaves the key object.
        """
        digest = self.signing_hash()
        compact = to_eip2098(digest, signer.sign_digest(digest), signer.public_key)
        vs = int.from_bytes(compact[32:], "big")
        r, s, parity = int.from_bytes(compact[:32], "big"), vs & ((1 << 255) - 1), vs >> 255
        return b"\x02" + rlp_encode(self._fields() + [parity, r, s])


def tx_hash(raw: bytes) -> str:
    return "0x" + keccak256(raw).hex()


def key_address(signer: Signer) -> bytes:
    return address_from_public_key(signer.public_key)


def contract_address(sender: bytes, nonce: int) -> bytes:
    """Address of a contract created by ``sender`` with account nonce ``nonce`` (CREATE)."""
    return keccak256(rlp_encode([sender, nonce]))[12:]
