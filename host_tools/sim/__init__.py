"""Deterministic simulation of a neighbourhood of houses (`dgc-host sim`).

What runs is the firmware the daemon runs: the real ``Controller`` and its jobs, the real
``Journal`` on a temporary SQLite file, real keys, canonical messages and signatures. What is
simulated are the peripherals outside the system under test: the meters, the router (DGR) and
the ledger's transport. The ledger's *rules* are the bench ledger's real auction and settlement
code (``host_tools.bench_ledger.store.LedgerStore``), called in-process.

Everything is drawn from one integer seed (houses, loads, PV, faults, process kills), time is a
virtual clock, and invariants are checked after every step, so any failure replays exactly from
its seed: ``dgc-host sim --seed S --trace``. Anchors: FoundationDB's simulation testing and
TigerBeetle's VOPR. See docs/sim.md.
"""
