"""The slice of the Solidity ABI the market contract uses: uint256, address, bytes32, bool, uint256[].

Why hand-written: every argument and event field of DgcMarket is a 32-byte word (or an array of
them), so encoding is a selector plus words. eth-abi would pull eth-utils (~34 MB of RSS) onto the
board for this. Decoding is strict: a wrong length or an out-of-range address is an error.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from firmware.eip712 import keccak256

WORD = 32
STATIC_TYPES = ("uint256", "address", "bytes32", "bool", "uint8", "uint16", "uint40", "uint56", "uint64", "uint32", "uint128")


class AbiError(ValueError):
    """Bytes that are not a valid encoding of the expected types."""


def selector(signature: str) -> bytes:
    """First 4 bytes of keccak(``name(type,...)``)."""
    return keccak256(signature.encode("ascii"))[:4]


def event_topic(signature: str) -> str:
    return "0x" + keccak256(signature.encode("ascii")).hex()


def _word(kind: str, value: object) -> bytes:
    if kind == "address":
        if isinstance(value, str):
            value = bytes.fromhex(value[2:] if value.startswith("0x") else value)
        if not isinstance(value, bytes) or len(value) != 20:
            raise AbiError("address: expected 20 bytes")
        return bytes(12) + value
    if kind == "bytes32":
        if not isinstance(value, bytes) or len(value) != 32:
            raise AbiError("bytes32: expected 32 bytes")
        return value
    if kind == "bool":
        return (1 if value else 0).to_bytes(WORD, "big")
    if type(value) is not int or not 0 <= value < 2**256:
        raise AbiError(f"{kind}: expected an unsigned integer, got {value!r}")
    return value.to_bytes(WORD, "big")


def encode_args(types: Sequence[str], values: Sequence[object]) -> bytes:
    if len(types) != len(values):
        raise AbiError(f"expected {len(types)} values, got {len(values)}")
    head, tail = [], []
    offset = WORD * len(types)
    for kind, value in zip(types, values):
        if kind.endswith("[]"):
            items = list(value)  # type: ignore[call-overload]
            head.append(offset.to_bytes(WORD, "big"))
            chunk = len(items).to_bytes(WORD, "big") + b"".join(_word(kind[:-2], v) for v in items)
            tail.append(chunk)
            offset += len(chunk)
        else:
            head.append(_word(kind, value))
    return b"".join(head) + b"".join(tail)


def encode_call(signature: str, values: Sequence[object]) -> bytes:
    types = signature[signature.index("(") + 1 : -1]
    return selector(signature) + encode_args([t for t in types.split(",") if t], values)


def _decode_word(kind: str, word: bytes) -> object:
    if kind == "address":
        if word[:12] != bytes(12):
            raise AbiError("address word has non-zero high bytes")
        return word[12:]
    if kind == "bytes32":
        return word
    value = int.from_bytes(word, "big")
    if kind == "bool":
        if value > 1:
            raise AbiError("bool word is neither 0 nor 1")
        return bool(value)
    return value


def decode_args(types: Iterable[str], data: bytes) -> list:
    types = list(types)
    if len(data) < WORD * len(types) or len(data) % WORD:
        raise AbiError(f"expected at least {len(types)} words, got {len(data)} bytes")
    out = []
    for i, kind in enumerate(types):
        word = data[i * WORD : (i + 1) * WORD]
        if kind.endswith("[]"):
            offset = int.from_bytes(word, "big")
            if offset % WORD or offset + WORD > len(data):
                raise AbiError("array offset out of range")
            count = int.from_bytes(data[offset : offset + WORD], "big")
            end = offset + WORD + count * WORD
            if end > len(data):
                raise AbiError("array longer than the data")
            out.append([_decode_word(kind[:-2], data[offset + WORD * (k + 1) : offset + WORD * (k + 2)]) for k in range(count)])
        else:
            out.append(_decode_word(kind, word))
    return out


def hex_bytes(text: str) -> bytes:
    if not isinstance(text, str) or not text.startswith("0x"):
        raise AbiError("expected a 0x-prefixed hex string")
    try:
        return bytes.fromhex(text[2:])
    except ValueError:
        raise AbiError("expected a 0x-prefixed hex string") from None


# The market contract's entry point for each signed message kind: the EIP-712 fields in member
# order, then r and vs of the EIP-2098 signature.
MESSAGE_FUNCTIONS = {
    "order": "placeOrder(uint256,uint256,uint256,uint256,uint256,uint256,uint256,bytes32,bytes32)",
    "cancel": "cancelOrder(uint256,uint256,uint256,uint256,uint256,bytes32,bytes32)",
    "bulk_cancel": "bulkCancel(uint256,uint256,uint256,uint256,bytes32,bytes32)",
    "delivery_report": "reportDelivery(uint256,uint256,uint256,uint256,uint256,uint256,uint256,uint256,bytes32,bytes32)",
}


def message_calldata(message: object) -> bytes:
    """Calldata that submits a ``firmware.eip712.TypedMessage`` to the market contract."""
    kind, words, sig = message.kind, message.words(), message.signature  # type: ignore[attr-defined]
    return encode_call(MESSAGE_FUNCTIONS[kind], [*words, sig[:32], sig[32:]])
