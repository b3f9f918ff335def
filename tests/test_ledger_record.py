"""firmware.ledger.record, the board's pure check of the ledger's signed record: Merkle proofs
have exactly one valid shape, and anything altered - a leaf, a sibling, the index, the header,
the signature, the key - is refused. Property tests over block sizes and positions."""

from __future__ import annotations

import hashlib

import coincurve
import pytest
from hypothesis import given, settings, strategies as st

from firmware.keystore import DeviceKey
from firmware.ledger import record

AUTHORITY = DeviceKey(coincurve.PrivateKey(hashlib.sha256(b"record test authority").digest()))


def leaves(n: int) -> list[bytes]:
    return [record.canonical({"kind": "message", "payload": f"p{i}", "signature": "00" * 64}) for i in range(n)]


def signed_block(entries: list[bytes], height: int = 0, prev: str = record.GENESIS_HASH, first_seq: int = 1) -> dict:
    root = record.merkle_root([record.leaf_hash(x) for x in entries])
    header = record.BlockHeader(ledger_id="L", height=height, prev_block_hash=prev, entries_root=root.hex(),
                                entry_count=len(entries), first_seq=first_seq, sealed_ms=1)
    signature = AUTHORITY.sign_digest(hashlib.sha256(header.to_bytes()).digest()).hex()
    return {**{k: getattr(header, k) for k in record.HEADER_FIELDS}, "signature": signature,
            "entries": [x.decode() for x in entries], "block_hash": header.block_hash}


def proof_of(entries: list[bytes], index: int) -> record.InclusionProof:
    block = signed_block(entries)
    hashes = [record.leaf_hash(x) for x in entries]
    return record.InclusionProof.from_obj({"leaf": entries[index].decode(), "leaf_index": index,
                                           "path": [h.hex() for h in record.merkle_path(hashes, index)], "block": block})


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 70).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))))
def test_every_leaf_of_every_block_size_proves_and_only_at_its_own_index(case):
    n, index = case
    entries = leaves(n)
    proof = proof_of(entries, index)
    proof.verify(AUTHORITY.public_key, ledger_id="L")
    hashes = [record.leaf_hash(x) for x in entries]
    for other in {0, n - 1, (index + 1) % n} - {index}:  # the same path never proves another position
        if entries[other] != entries[index]:
            with pytest.raises(record.RecordError):
                record.InclusionProof(entries[other], index, proof.path, proof.header, proof.signature).verify(AUTHORITY.public_key)
        with pytest.raises(record.RecordError):
            if record.root_from_path(hashes[index], other, n, proof.path).hex() != proof.header.entries_root:
                raise record.RecordError("other index")


def test_tampering_anything_is_refused():
    entries = leaves(13)
    proof = proof_of(entries, 6)
    proof.verify(AUTHORITY.public_key)
    bad = [
        record.InclusionProof(entries[6].replace(b"p6", b"p7"), 6, proof.path, proof.header, proof.signature),
        record.InclusionProof(proof.leaf, 6, (b"\x00" * 32,) + proof.path[1:], proof.header, proof.signature),
        record.InclusionProof(proof.leaf, 6, proof.path + (b"\x00" * 32,), proof.header, proof.signature),
        record.InclusionProof(proof.leaf, 6, proof.path[:-1], proof.header, proof.signature),
        record.InclusionProof(proof.leaf, 13, proof.path, proof.header, proof.signature),
        record.InclusionProof(proof.leaf, 6, proof.path, record.BlockHeader(**{**proof.header.__dict__, "sealed_ms": 2}),
                              proof.signature),
        record.InclusionProof(proof.leaf, 6, proof.path, proof.header, "00" * 64),
    ]
    for p in bad:
        with pytest.raises(record.RecordError):
            p.verify(AUTHORITY.public_key)
    other_key = DeviceKey(coincurve.PrivateKey(hashlib.sha256(b"another").digest()))
    with pytest.raises(record.RecordError, match="pinned authority"):
        proof.verify(other_key.public_key)
    with pytest.raises(record.RecordError, match="pinned ledger"):
        proof.verify(AUTHORITY.public_key, ledger_id="other")


def test_an_odd_node_is_carried_up_not_duplicated():
    """With duplication, [a, b, c] and [a, b, c, c] would share a root (CVE-2012-2459)."""
    a, b, c = (record.leaf_hash(x) for x in leaves(3))
    assert record.merkle_root([a, b, c]) != record.merkle_root([a, b, c, c])
    assert record.merkle_root([a, b, c]) == record.node_hash(record.node_hash(a, b), c)
    assert record.leaf_hash(b"x") != record.node_hash(b"x"[:0], b"x")  # domain separation


def test_verify_chain_catches_a_rewritten_missing_or_altered_block():
    b0 = signed_block(leaves(3))
    b1 = signed_block(leaves(2), height=1, prev=b0["block_hash"], first_seq=4)
    assert record.verify_chain([b0, b1], AUTHORITY.public_key) == 5
    with pytest.raises(record.RecordError, match="height"):
        record.verify_chain([b1], AUTHORITY.public_key)
    forked = signed_block(leaves(2), height=1, prev="1" * 64, first_seq=4)
    with pytest.raises(record.RecordError, match="rewritten"):
        record.verify_chain([b0, forked], AUTHORITY.public_key)
    gap = signed_block(leaves(2), height=1, prev=b0["block_hash"], first_seq=5)
    with pytest.raises(record.RecordError, match="first_seq"):
        record.verify_chain([b0, gap], AUTHORITY.public_key)
    altered = {**b1, "entries": [b1["entries"][0], b1["entries"][0]]}
    with pytest.raises(record.RecordError, match="entries"):
        record.verify_chain([b0, altered], AUTHORITY.public_key)


def test_malformed_proofs_are_record_errors_not_crashes():
    good = proof_of(leaves(4), 1)
    block = signed_block(leaves(4))
    for obj in [None, [], {"leaf": 5}, {"leaf": "x", "leaf_index": -1, "path": [], "block": block},
                {"leaf": "x", "leaf_index": 0, "path": ["zz"], "block": block},
                {"leaf": "x", "leaf_index": 0, "path": [], "block": {**block, "entry_count": 0}},
                {"leaf": "x", "leaf_index": 0, "path": [], "block": {**block, "entries_root": "A" * 64}},
                {"leaf": "x", "leaf_index": 0, "path": [], "block": {**block, "v": 2}}]:
        with pytest.raises(record.RecordError):
            record.InclusionProof.from_obj(obj)
    assert good.leaf_index == 1
