"""Time to sign and journal a full day's orders: 48 x Journal.enqueue_order into a fresh journal.

Each enqueue_order takes a nonce, signs the canonical order with the device key (coincurve via
firmware.keystore.DeviceKey) and stores outbox row + order row in ONE SQLite transaction with
synchronous=FULL (WAL): one fsync per order. Repeated RUNS times on the work disk (a directory
under var/) and on /dev/shm (tmpfs, no real fsync) when present; each run opens a fresh
journal (not timed) and times the 48 calls.

Side by side, on the same disks and in the same runs: the same day with a signer that returns a
precomputed signature (journal cost alone), and with the pure-Python `ecdsa` package as the
signer; and sign-only timings per signature, coincurve vs ecdsa (sign_digest_deterministic,
sha256, sigencode_string_canonize), which must give byte-identical signatures (RFC 6979, low-S).
Prints figures and ratios; never asserts. Target: <= 100 ms per day of 48 orders.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib import BENCH_VAR, header, mount_of, percentile, ratio, stop_on_signals  # noqa: E402

ORDERS_PER_DAY = 48
RUNS = 20
SIGN_SAMPLES = 480
TARGET_DAY_MS = 100.0
SECRET = hashlib.sha256(b"dgc bench sign_and_journal key").digest()
SLOT_S = 1800
DAY0 = 1_767_225_600  # 2026-01-01T00:00:00Z: market ids of one day


class PrecomputedSigner:
    """Same interface as DeviceKey; returns one fixed signature: isolates the journal's own cost."""

    def __init__(self, key):
        self.public_key = key.public_key
        self.device_id = key.device_id
        self._signature = key.sign_digest(hashlib.sha256(b"x").digest())

    def sign_digest(self, digest: bytes) -> bytes:
        return self._signature


class EcdsaSigner:
    """The pure-Python `ecdsa` package as a Signer (byte-identical output to coincurve's)."""

    def __init__(self, secret: bytes, key):
        import ecdsa
        from ecdsa.util import sigencode_string_canonize

        self._sk = ecdsa.SigningKey.from_string(secret, curve=ecdsa.SECP256k1)
        self._encode = sigencode_string_canonize
        self.public_key = key.public_key
        self.device_id = key.device_id

    def sign_digest(self, digest: bytes) -> bytes:
        return self._sk.sign_digest_deterministic(digest, hashfunc=hashlib.sha256, sigencode=self._encode)


def order_builder(device_id: str, k: int):
    from firmware.messages import new_fields

    def build(nonce: int) -> dict:
        return new_fields("order", ledger_id="dgc-bench", device_id=device_id, nonce=nonce, issued_at=DAY0 - 3600,
                          ttl_s=600, market_id=DAY0 + k * SLOT_S, side="sell" if k % 2 else "buy",
                          energy_wh=100 * (1 + k % 5), price_per_kwh_minor=1900 + 10 * k)

    return build


def one_day(directory: Path, signer, run: int) -> tuple[float, list[float]]:
    """Seconds for 48 enqueue_order calls into a fresh journal, and each call's seconds."""
    from firmware.journal import Journal

    path = directory / f"run{run}-{type(signer).__name__}" / "journal.sqlite3"
    journal = Journal(path)
    builders = [order_builder(signer.device_id, k) for k in range(ORDERS_PER_DAY)]
    per_order = []
    try:
        t_day = time.perf_counter()
        for build in builders:
            t = time.perf_counter()
            journal.enqueue_order(build, signer)
            per_order.append(time.perf_counter() - t)
        day = time.perf_counter() - t_day
        assert journal.order_count() == ORDERS_PER_DAY
    finally:
        journal.close()
    shutil.rmtree(path.parent, ignore_errors=True)
    return day, per_order


def sign_only(key, ecdsa_signer) -> tuple[list[float], list[float], bool]:
    digests = [hashlib.sha256(b"order %d" % i).digest() for i in range(SIGN_SAMPLES)]
    cc, ec, identical = [], [], True
    for digest in digests:
        t = time.perf_counter()
        a = key.sign_digest(digest)
        cc.append(time.perf_counter() - t)
    for digest in digests[: SIGN_SAMPLES // 4]:  # ecdsa is slow: a quarter of the samples is plenty
        t = time.perf_counter()
        b = ecdsa_signer.sign_digest(digest)
        ec.append(time.perf_counter() - t)
        identical = identical and b == key.sign_digest(digest)
    return cc, ec, identical


def main() -> int:
    stop_on_signals()
    import coincurve

    from firmware.keystore import DeviceKey

    key = DeviceKey(coincurve.PrivateKey(SECRET))
    signers = {"coincurve": key, "journal only": PrecomputedSigner(key), "ecdsa": EcdsaSigner(SECRET, key)}

    BENCH_VAR.mkdir(parents=True, exist_ok=True)
    places = {"work disk": Path(tempfile.mkdtemp(prefix="sign-journal-", dir=BENCH_VAR))}
    if Path("/dev/shm").is_dir():
        places["/dev/shm"] = Path(tempfile.mkdtemp(prefix="dgc-bench-sign-journal-", dir="/dev/shm"))
    header(f"sign and journal a day: {ORDERS_PER_DAY} x Journal.enqueue_order, {RUNS} runs per disk and signer")
    for name, directory in places.items():
        mount_point, fs_type, device = mount_of(directory)
        print(f"{name:<9} {directory}  ({fs_type} on {device}, mounted at {mount_point})")
    try:
        days: dict[tuple[str, str], list[float]] = {}
        orders: dict[tuple[str, str], list[float]] = {}
        for run in range(RUNS):  # interleaved, so drift and background load hit every variant alike
            for place, directory in places.items():
                for signer_name, signer in signers.items():
                    day, per_order = one_day(directory, signer, run)
                    days.setdefault((place, signer_name), []).append(day)
                    orders.setdefault((place, signer_name), []).extend(per_order)
        cc, ec, identical = sign_only(key, signers["ecdsa"])
    finally:
        for directory in places.values():
            shutil.rmtree(directory, ignore_errors=True)

    header(f"per day of {ORDERS_PER_DAY} orders (ms): median / max over {RUNS} runs")
    for (place, signer_name), values in days.items():
        ms = [v * 1000 for v in values]
        flag = "within" if max(ms) <= TARGET_DAY_MS else ("median within, max OVER" if statistics.median(ms) <= TARGET_DAY_MS else "OVER")
        print(f"{place:<9} {signer_name:<13} median {statistics.median(ms):8.1f}   max {max(ms):8.1f}   "
              f"({flag} the {TARGET_DAY_MS:.0f} ms target)")
    header("per order (ms): median / p99 of all calls")
    for (place, signer_name), values in orders.items():
        ms = [v * 1000 for v in values]
        print(f"{place:<9} {signer_name:<13} median {statistics.median(ms):7.3f}   p99 {percentile(ms, 99):7.3f}")
    header("sign only, per signature")
    cc_med, ec_med = statistics.median(cc) * 1e6, statistics.median(ec) * 1e6
    print(f"coincurve (libsecp256k1)   median {cc_med:9.1f} us  (n={len(cc)})")
    print(f"ecdsa (pure Python)        median {ec_med:9.1f} us  (n={len(ec)})")
    print(f"ecdsa / coincurve          {ratio(ec_med, cc_med)};  signatures byte-identical: {'yes' if identical else 'NO'}")
    header("ratios")
    for place in places:
        journal_only = statistics.median(orders[(place, "journal only")]) * 1e6
        full = statistics.median(orders[(place, "coincurve")]) * 1e6
        print(f"{place:<9} journal cost per order {journal_only:8.1f} us = {ratio(journal_only, cc_med)} a coincurve signature; "
              f"signing is {100 * cc_med / full:.1f} % of an enqueue_order")
        print(f"{place:<9} day with ecdsa / day with coincurve: "
              f"{ratio(statistics.median(days[(place, 'ecdsa')]), statistics.median(days[(place, 'coincurve')]))}")
    if len(places) == 2:
        a, b = (statistics.median(days[(p, "coincurve")]) for p in places)
        print(f"work disk / tmpfs, day with coincurve: {ratio(a, b)}  (the fsync per commit of synchronous=FULL)")
    print("note: the work disk here is this machine's virtual disk, not a Raspberry Pi's SD card: "
          "fsync latency on the board's own storage is not measured here")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; temporary journals removed", file=sys.stderr)
        sys.exit(130)
