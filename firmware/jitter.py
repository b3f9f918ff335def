"""Per-device bid jitter (issue 10 part 5): 1,000 houses must not send their bids in the same
second. The offset is derived from the device id, so it is deterministic per board (the same
board always bids at the same phase; a fleet restarted together still spreads), needs no state
and no randomness source, and is bounded by ``[cadence] bid_jitter_seconds`` (at most half the
bid interval, so every bid still comes well within its interval)."""

from __future__ import annotations

import hashlib


def effective_bound_ms(bid_seconds: int, bid_jitter_seconds: int) -> int:
    return min(bid_jitter_seconds, bid_seconds // 2) * 1000


def bid_offset_ms(device_id: str, bid_seconds: int, bid_jitter_seconds: int) -> int:
    """0 .. effective bound (inclusive), uniform over device ids."""
    bound = effective_bound_ms(bid_seconds, bid_jitter_seconds)
    if bound <= 0:
        return 0
    digest = hashlib.sha256(b"dgc-bid-jitter\x00" + device_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % (bound + 1)


def bid_anchor_s(now_s: float, bid_seconds: int, offset_ms: int) -> float:
    """The latest time <= now on this board's bid grid (epoch multiples of bid_seconds + offset):
    the schedule's phase depends on the device, not on when the process started."""
    offset_s = offset_ms / 1000
    return (now_s - offset_s) // bid_seconds * bid_seconds + offset_s
