"""The system under test, assembled as `dgc run` assembles it (firmware/scheduler/daemon.py
``build_controller``), but with the simulated peripherals. One place, so that a change of the
Controller's constructor (issue 7's split of scheduler/controller.py) is one edit here."""

from __future__ import annotations


def build_controller(config, *, journal, key, meters, dgr, ledger, events, clock):
    from firmware.scheduler.controller import Controller

    return Controller(config, journal=journal, key=key, meters=meters, dgr=dgr, ledger=ledger, events=events, clock=clock)
