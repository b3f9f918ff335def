"""The ledger's tamper-evident record, as the board checks it: pure functions, no I/O.

Why the board needs this: a REST ledger is one operator's database. Before a trade may move a
household's energy, the board wants more than "the server said so": the trade must be in the
ledger's *signed* record, and the board's own messages must be there too, byte for byte. The
bench ledger appends every accepted message and every trade to a log, seals the log in blocks,
chains each block to the previous one by hash and signs each block with its authority key;
the board pins that key at provisioning. A ledger that later denies, alters or invents an
entry must then either forge the authority's signature or contradict a block it already
signed (two signed blocks of one height are the proof of its misbehaviour).

Shape (docs/ledger.md, "Tamper-evident record"):

- **Leaf**: the canonical JSON (sorted keys, compact, ASCII) of one entry - a message
  ``{"kind": "message", "payload": <the signed payload text>, "signature": <hex>}`` or a trade
  ``{"kind": "trade", "trade_id", "market_id", "energy_wh", "price_per_kwh_minor",
  "seller_device_id", "seller_order_nonce", "buyer_device_id", "buyer_order_nonce"}``.
  Leaf hash = sha256(0x00 || leaf); node hash = sha256(0x01 || left || right) (RFC 6962's
  domain separation, so a leaf can never pass for a node). An odd node at the end of a level is
  carried up unchanged (never duplicated, which would let two different lists share a root).
- **Block header**: canonical JSON ``{"v": 1, "ledger_id", "height", "prev_block_hash",
  "entries_root", "entry_count", "first_seq", "sealed_ms"}``; the block hash is
  sha256(header); the authority signs that hash (compact low-S secp256k1, as the boards do).
- **Inclusion proof**: the leaf, its index in the block, the sibling hashes from the leaf up,
  and the signed header. The verifier derives left/right from the index and the count itself
  and must use up every sibling exactly: a proof has exactly one valid shape.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from firmware.messages import verify_signature

RECORD_VERSION = 1
GENESIS_HASH = "0" * 64
HEADER_FIELDS = ("v", "ledger_id", "height", "prev_block_hash", "entries_root", "entry_count", "first_seq", "sealed_ms")
_HEX = frozenset("0123456789abcdef")


class RecordError(ValueError):
    """A record, block or proof that does not verify; the text says which part and why."""


def canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def message_leaf(payload: bytes, signature: bytes) -> bytes:
    """The leaf of a signed message: exactly the bytes the device signed, and its signature."""
    return canonical({"kind": "message", "payload": payload.decode("ascii"), "signature": signature.hex()})


def trade_leaf(*, trade_id: int, market_id: int, energy_wh: int, price_per_kwh_minor: int, seller_device_id: str,
               seller_order_nonce: int, buyer_device_id: str, buyer_order_nonce: int) -> bytes:
    return canonical({
        "kind": "trade", "trade_id": trade_id, "market_id": market_id, "energy_wh": energy_wh,
        "price_per_kwh_minor": price_per_kwh_minor, "seller_device_id": seller_device_id,
        "seller_order_nonce": seller_order_nonce, "buyer_device_id": buyer_device_id, "buyer_order_nonce": buyer_order_nonce,
    })


def trade_matches_leaf(trade: Any, device_id: str, leaf: bytes) -> bool:
    """True when ``leaf`` is the record of the board's ``trade`` (a TradeRecord): same id, market,
    energy, price, the board on its side with its order nonce, and the counterparty on the other."""
    try:
        entry = json.loads(leaf)
    except ValueError:
        return False
    if not isinstance(entry, dict) or entry.get("kind") != "trade" or canonical(entry) != leaf:
        return False
    mine, theirs = ("seller", "buyer") if trade.side == "sell" else ("buyer", "seller")
    return (
        entry.get("trade_id") == trade.trade_id and entry.get("market_id") == trade.market_id
        and entry.get("energy_wh") == trade.energy_wh and entry.get("price_per_kwh_minor") == trade.price_per_kwh_minor
        and entry.get(f"{mine}_device_id") == device_id and entry.get(f"{mine}_order_nonce") == trade.order_nonce
        and entry.get(f"{theirs}_device_id") == trade.counterparty
    )


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def merkle_root(hashes: Sequence[bytes]) -> bytes:
    """Root over leaf hashes; an odd last node is carried up unchanged. Empty: sha256(b'')."""
    if not hashes:
        return hashlib.sha256(b"").digest()
    level = list(hashes)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def merkle_path(hashes: Sequence[bytes], index: int) -> list[bytes]:
    """Sibling hashes from leaf ``index`` up to the root (the shape ``root_from_path`` expects)."""
    if not 0 <= index < len(hashes):
        raise IndexError(f"leaf index {index} outside 0..{len(hashes) - 1}")
    path: list[bytes] = []
    level = list(hashes)
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level, index = nxt, index // 2
    return path


def root_from_path(leaf_digest: bytes, index: int, count: int, path: Sequence[bytes]) -> bytes:
    """Fold a proof; left/right come from (index, count), and every sibling must be used."""
    if not 0 <= index < count:
        raise RecordError(f"proof.leaf_index: {index} is outside the block's {count} entries")
    node, width, used = leaf_digest, count, 0
    while width > 1:
        if index % 2 == 1:
            if used >= len(path):
                raise RecordError("proof.path: too short for the leaf's position")
            node, used = node_hash(path[used], node), used + 1
        elif index + 1 < width:
            if used >= len(path):
                raise RecordError("proof.path: too short for the leaf's position")
            node, used = node_hash(node, path[used]), used + 1
        index, width = index // 2, (width + 1) // 2
    if used != len(path):
        raise RecordError(f"proof.path: {len(path) - used} sibling hash(es) more than the leaf's position needs")
    return node


@dataclass(frozen=True)
class BlockHeader:
    """One sealed block's header, as signed by the ledger's authority key."""

    ledger_id: str
    height: int
    prev_block_hash: str
    entries_root: str
    entry_count: int
    first_seq: int
    sealed_ms: int
    v: int = RECORD_VERSION

    def to_bytes(self) -> bytes:
        return canonical({name: getattr(self, name) for name in HEADER_FIELDS})

    @property
    def block_hash(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_obj(cls, obj: Any, what: str = "block") -> "BlockHeader":
        if not isinstance(obj, Mapping):
            raise RecordError(f"{what}: expected an object with the header fields {', '.join(HEADER_FIELDS)}")
        values: dict[str, Any] = {}
        for name in HEADER_FIELDS:
            value = obj.get(name)
            if name == "ledger_id":
                if type(value) is not str or not value:
                    raise RecordError(f"{what}.ledger_id: expected a string")
            elif name in ("prev_block_hash", "entries_root"):
                if not _is_hash(value):
                    raise RecordError(f"{what}.{name}: expected 64 lowercase hex characters")
            elif type(value) is not int or value < 0 or value >= 2**63:
                raise RecordError(f"{what}.{name}: expected a non-negative 64-bit integer")
            values[name] = value
        if values["v"] != RECORD_VERSION:
            raise RecordError(f"{what}.v: expected {RECORD_VERSION}, got {values['v']}")
        if values["entry_count"] < 1:
            raise RecordError(f"{what}.entry_count: a sealed block has at least one entry")
        return cls(**values)


def _is_hash(value: Any) -> bool:
    return type(value) is str and len(value) == 64 and set(value) <= _HEX


def _hex_bytes(value: Any, what: str, length: int) -> bytes:
    if type(value) is not str or len(value) != 2 * length or not set(value) <= _HEX:
        raise RecordError(f"{what}: expected {2 * length} lowercase hex characters")
    return bytes.fromhex(value)


def verify_block_signature(header: BlockHeader, signature_hex: Any, authority_public_key: bytes, *, ledger_id: str | None = None) -> None:
    """Raise RecordError unless the authority signed this header (and it is of the expected ledger)."""
    signature = _hex_bytes(signature_hex, "block.signature", 64)
    if ledger_id is not None and header.ledger_id != ledger_id:
        raise RecordError(f"block.ledger_id: {header.ledger_id!r} is not the pinned ledger {ledger_id!r}")
    if not verify_signature(header.to_bytes(), signature, authority_public_key):
        raise RecordError(f"block {header.height}: the signature does not verify against the pinned authority key")


@dataclass(frozen=True)
class InclusionProof:
    leaf: bytes
    leaf_index: int
    path: tuple[bytes, ...]
    header: BlockHeader
    signature: str

    @classmethod
    def from_obj(cls, obj: Any) -> "InclusionProof":
        if not isinstance(obj, Mapping):
            raise RecordError("proof: expected an object with leaf, leaf_index, path and block")
        leaf = obj.get("leaf")
        if type(leaf) is not str or not leaf.isascii() or len(leaf) > 4096:
            raise RecordError("proof.leaf: expected the entry's canonical JSON text")
        index = obj.get("leaf_index")
        if type(index) is not int or index < 0:
            raise RecordError("proof.leaf_index: expected a non-negative integer")
        path = obj.get("path")
        if not isinstance(path, list) or len(path) > 64:
            raise RecordError("proof.path: expected a list of at most 64 hashes")
        block = obj.get("block")
        header = BlockHeader.from_obj(block, "proof.block")
        return cls(leaf=leaf.encode("ascii"), leaf_index=index,
                   path=tuple(_hex_bytes(h, f"proof.path[{i}]", 32) for i, h in enumerate(path)),
                   header=header, signature=block.get("signature"))

    def verify(self, authority_public_key: bytes, *, ledger_id: str | None = None) -> None:
        """Raise RecordError unless the leaf is in a block the authority signed."""
        verify_block_signature(self.header, self.signature, authority_public_key, ledger_id=ledger_id)
        root = root_from_path(leaf_hash(self.leaf), self.leaf_index, self.header.entry_count, self.path)
        if root.hex() != self.header.entries_root:
            raise RecordError(f"proof: the leaf and path give root {root.hex()[:16]}..., not block {self.header.height}'s "
                              f"entries_root {self.header.entries_root[:16]}...")


def verify_chain(blocks: Sequence[Mapping[str, Any]], authority_public_key: bytes, *, ledger_id: str | None = None) -> int:
    """Check a whole log: every block signed, chained to the one before from the genesis hash,
    sequence numbers contiguous, and - when a block carries its ``entries`` (leaf texts) - its
    root recomputed from them. Returns the number of entries checked. Raises RecordError."""
    prev, next_seq, entries = GENESIS_HASH, 1, 0
    for i, block in enumerate(blocks):
        header = BlockHeader.from_obj(block, f"blocks[{i}]")
        if header.height != i:
            raise RecordError(f"blocks[{i}].height: expected {i}, got {header.height} (a block is missing or out of order)")
        verify_block_signature(header, block.get("signature"), authority_public_key, ledger_id=ledger_id)
        if header.prev_block_hash != prev:
            raise RecordError(f"block {i}: prev_block_hash does not match block {i - 1}'s hash (the chain was rewritten)")
        if header.first_seq != next_seq:
            raise RecordError(f"block {i}: first_seq {header.first_seq}, expected {next_seq} (entries missing or repeated)")
        leaves = block.get("entries")
        if leaves is not None:
            if not isinstance(leaves, list) or len(leaves) != header.entry_count or not all(type(x) is str for x in leaves):
                raise RecordError(f"block {i}: expected {header.entry_count} entry texts")
            root = merkle_root([leaf_hash(x.encode("ascii")) for x in leaves])
            if root.hex() != header.entries_root:
                raise RecordError(f"block {i}: its entries do not give its entries_root (an entry was altered, added or removed)")
            entries += len(leaves)
        prev, next_seq = header.block_hash, header.first_seq + header.entry_count
    return entries
