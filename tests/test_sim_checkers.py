"""Each invariant checker of the simulation fires on a deliberately broken scenario.

A checker that cannot fail is a defect, so every one is shown failing here. The breakage is put
into the simulated world (a rogue router, a forgetful journal, a lying clock, ...) wherever
that can show the checker working whatever the firmware does; one scenario breaks a firmware
function on purpose (monkeypatch: the freshness rule) because only the firmware can commit it. A calm seed
(no faults, no kills) is the control: it must pass, or the breakage proves nothing.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from host_tools.sim.runner import run_seed

SEED = 5  # a calm run of this seed has six houses and trades in every market


def violations(mutate=None, seed: int = SEED):
    restore = []

    def prepare(world):
        world.restore = restore
        if mutate is not None:
            mutate(world)

    try:
        result = run_seed(seed, calm=True, mutate=prepare)
    finally:
        for undo in restore:
            undo()
    return [v.invariant for v in result.violations], result


def test_the_calm_control_run_has_trades_and_no_violation():
    found, result = violations()
    assert found == []
    assert result.trades >= 5
    assert result.steps > 500


def test_exactly_once_fires_when_the_journal_forgets_a_message_it_sent():
    def forget(world):
        apply = world.ledger.apply

        def broken(message):
            answer = apply(message)
            fields = message.fields
            house = world.house_by_device[fields["device_id"]]
            if fields["type"] == "order" and house.raw is not None:
                house.raw.execute("DELETE FROM outbox WHERE nonce = ?", (fields["nonce"],))
            return answer

        world.ledger.apply = broken

    found, _ = violations(forget)
    assert found == ["exactly_once"]


def test_delivered_le_contracted_fires_when_a_board_reports_more_than_the_ledger_contracted():
    def inflate(world):
        # the ledger's answer to the trade poll says one lot more than the ledger recorded (a
        # partial fill, so the board's order still covers it): the board delivers and reports it
        from host_tools.sim import ledger as sim_ledger

        original = sim_ledger.SimLedgerClient.trades_since

        def inflated(self, device_id, cursor):
            trades, new_cursor = original(self, device_id, cursor)
            return [replace(t, energy_wh=t.energy_wh + 100) for t in trades], new_cursor

        world.restore.append(lambda: setattr(sim_ledger.SimLedgerClient, "trades_since", original))
        sim_ledger.SimLedgerClient.trades_since = inflated
        # ... and the record check is bypassed (A3): the board now refuses a trade its ledger's
        # signed record does not hold as told (firmware/scheduler/trade_record.py), which would
        # stop this lie before any checker sees it
        confirm = sim_ledger.SimLedgerClient.confirm_trade
        world.restore.append(lambda: setattr(sim_ledger.SimLedgerClient, "confirm_trade", confirm))
        sim_ledger.SimLedgerClient.confirm_trade = lambda self, trade, device_id, key: None
        world.checker.transfer_started = lambda *args: None  # isolate this checker: START checks fire first

    found, _ = violations(inflate)
    assert found[:1] == ["delivered_le_contracted"]


def test_slot_energy_fires_when_reports_exceed_what_the_router_moved():
    def phantom(world):
        for house in world.houses:
            execute = house.router.execute

            def half_power(verb, args, now, execute=execute):
                if verb == "START":  # the router runs at half the commanded power
                    args = dict(args, power_w=max(1, args["power_w"] // 2))
                return execute(verb, args, now)

            house.router.execute = half_power
            router = house.router  # and the interchange meter counts double
            house.ix_meter._counters = lambda r=router: (2 * r.import_wh, 2 * r.export_wh, 0.0)

    found, _ = violations(phantom)
    assert found == ["slot_energy"]


def test_single_start_fires_when_a_transfer_is_started_again():
    def restart_finished(world):
        # a rogue router: it runs at twice the commanded power, and at the next heartbeat it
        # starts a transfer that reached its target again while its end time is still ahead
        for house in world.houses:
            router = house.router
            execute = router.execute
            done = {}

            def rogue(verb, args, now, execute=execute, router=router, done=done):
                if verb == "START":
                    args = dict(args, power_w=2 * args["power_w"])
                    done[args["trade_id"]] = args
                if verb == "HEARTBEAT":
                    for trade_id, start in list(done.items()):
                        if trade_id not in router.transfers and start["end_at"] > now + 60:
                            del done[trade_id]
                            execute("START", start, now)
                return execute(verb, args, now)

            router.execute = rogue

    found, _ = violations(restart_finished)
    assert "single_start" in found


def test_transfer_in_slot_fires_when_the_router_runs_past_the_slot_end():
    def late_end(world):
        for house in world.houses:
            execute = house.router.execute

            def misread(verb, args, now, execute=execute):
                if verb == "START":
                    args = dict(args, end_at=args["end_at"] + 600)
                return execute(verb, args, now)

            house.router.execute = misread

    found, _ = violations(late_end)
    assert found == ["transfer_in_slot"]


def test_link_lost_safe_fires_when_the_router_keeps_transferring_without_a_link():
    def no_watchdog(world):
        for house in world.houses:
            house.router.heartbeat_timeout_s = 1e9
            house.router.faults.link_down.append((world.first_market + 300, world.first_market + 1500))

    found, _ = violations(no_watchdog)
    assert found == ["link_lost_safe"]


def test_router_resumes_fires_when_the_router_is_left_in_safe_mode():
    def stuck_safe(world):
        for house in world.houses:
            router = house.router
            execute = router.execute

            def safe_forever(verb, args, now, execute=execute, router=router):
                if now >= world.first_market - 600:
                    router.safe = True
                    router.safe_since = router.safe_since or now
                    if verb == "RESUME":
                        return ("NAK", 50, "resume failed")
                return execute(verb, args, now)

            router.execute = safe_forever

    found, _ = violations(stuck_safe)
    assert found == ["router_resumes"]


def test_order_fresh_fires_for_an_order_in_a_market_whose_gate_has_closed():
    def late_clocks(world):
        # every board and the ledger agree on a clock 20 minutes behind the truth: the clock
        # guard cannot see it, and orders go to markets whose gate has truly closed
        for house in world.houses:
            house.base_offset = -1200.0
        world.ledger.now_ms = lambda: int((world.now - 1200) * 1000)

    found, result = violations(late_clocks)
    assert found == ["order_fresh"]
    assert "gate closes" in result.violations[0].detail


def test_order_fresh_fires_for_an_order_from_stale_data(monkeypatch):
    import firmware.scheduler.metering as metering

    monkeypatch.setattr(metering.Metering, "house_data_problem", lambda self: None)

    def dead_house_meter(world):
        for house in world.houses:
            house.house_faults.windows.append((world.now + 60, world.end, "timeout"))

    found, result = violations(dead_house_meter)
    assert found == ["order_fresh"]
    assert "stale" in result.violations[0].detail


def test_trade_closed_fires_when_a_board_never_learns_of_its_trades():
    def hide_trades(world):
        from host_tools.sim import ledger as sim_ledger

        target = world.houses[0].device_id
        original = sim_ledger.SimLedgerClient.trades_since

        def hidden(self, device_id, cursor):
            trades, new_cursor = original(self, device_id, cursor)
            return ([] if device_id == target else trades), new_cursor

        world.restore.append(lambda: setattr(sim_ledger.SimLedgerClient, "trades_since", original))
        sim_ledger.SimLedgerClient.trades_since = hidden

    found, _ = violations(hide_trades)
    assert found == ["trade_closed"]


def test_job_raised_fires_when_a_device_throws_what_no_driver_throws():
    def broken_meter(world):
        meter = world.houses[0].house_meter
        read = meter.read

        def explode(now_s, board_ms):
            if now_s > world.first_market:
                raise RuntimeError("simulated driver bug")
            return read(now_s, board_ms)

        meter.read = explode

    found, _ = violations(broken_meter)
    assert found == ["job_raised"]


@pytest.mark.parametrize("seed", [1, 2])
def test_a_seed_replays_exactly(seed):
    first = run_seed(seed, trace=True)
    second = run_seed(seed, trace=True)
    assert first.trace == second.trace
    assert (first.steps, first.kills, first.faults) == (second.steps, second.kills, second.faults)
    assert len(first.trace) > 100


def test_order_fresh_fires_for_an_order_after_an_implausible_reading_was_journalled(monkeypatch):
    import firmware.scheduler.metering as metering

    # a firmware without plausibility checks: every reading is journalled as read, and trusted
    monkeypatch.setattr(metering.Metering, "read_plausible", lambda self, name: self.ctx.meters.read(name))
    monkeypatch.setattr(metering.Metering, "house_data_problem", lambda self: None)

    def spike(world):
        world.houses[0].house_faults.spikes.append(world.now + 400)

    found, result = violations(spike)
    assert found == ["order_fresh"]
    assert "implausible" in result.violations[0].detail
