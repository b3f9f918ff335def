"""firmware.plausibility: pure rules over immutable state, no bus, no clock."""

from __future__ import annotations

import random

import pytest

from firmware.plausibility import (
    ACCEPTED,
    FAILED,
    REBASELINED,
    REJECTED,
    SLACK_WH,
    Limits,
    MeterState,
    Sample,
    check_reading,
    max_advance_wh,
    record_failure,
    seed,
    unavailable_reason,
)

LIMITS = Limits(max_power_w=36_000)  # 36 kW: 10 Wh per second of wall time, easy arithmetic
MINUTE_MS = 60_000


def run(readings, limits=LIMITS, state=None):
    """Feed readings (Sample or the string "fail") through the rules; return verdicts and the state."""
    state = state or MeterState()
    verdicts = []
    for item in readings:
        verdict = record_failure(state, limits, "timeout") if item == "fail" else check_reading(state, item, limits)
        verdicts.append(verdict)
        state = verdict.state
    return verdicts, state


def s(t_s: float, imp: int, exp: int = 0, power: int | None = None) -> Sample:
    return Sample(int(t_s * 1000), imp, exp, power)


# --- the bound -------------------------------------------------------------------------------------

def test_max_advance_is_power_times_time_rounded_up_plus_slack():
    assert max_advance_wh(LIMITS, 1000) == 10 + SLACK_WH
    assert max_advance_wh(Limits(max_power_w=1000), 1) == 1 + SLACK_WH  # 0.00028 Wh rounds up to 1
    assert max_advance_wh(LIMITS, 0) == SLACK_WH
    assert max_advance_wh(LIMITS, -5000) == SLACK_WH  # a clock stepped back allows no energy


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3"])
def test_limits_are_positive_integers(bad):
    with pytest.raises(ValueError, match="max_power_w must be a positive integer"):
        Limits(max_power_w=bad)


# --- accepting and rejecting -------------------------------------------------------------------------

def test_first_reading_is_accepted_and_normal_growth_follows():
    verdicts, state = run([s(0, 1000), s(60, 1500), s(120, 1500, 20)])
    assert [v.outcome for v in verdicts] == [ACCEPTED] * 3
    assert state.last == s(120, 1500, 20) and state.failures == 0
    assert verdicts[1].stored == s(60, 1500)  # no offset: stored as read


def test_counter_going_backwards_is_rejected_and_not_stored():
    verdicts, state = run([s(0, 1000, 500), s(60, 999, 500)])
    assert verdicts[1].outcome == REJECTED and verdicts[1].stored is None
    assert "counter went backwards (import 1000 -> 999 Wh" in verdicts[1].reason
    assert state.last == s(0, 1000, 500) and state.failures == 1


def test_export_going_backwards_is_rejected_too():
    verdicts, _ = run([s(0, 1000, 500), s(60, 1000, 499)])
    assert verdicts[1].outcome == REJECTED and "export 500 -> 499 Wh" in verdicts[1].reason


def test_jump_beyond_max_power_is_rejected_exactly_at_the_bound():
    bound = max_advance_wh(LIMITS, 60_000)  # 600 + 1
    at_bound, _ = run([s(0, 1000), s(60, 1000 + bound)])
    beyond, _ = run([s(0, 1000), s(60, 1000 + bound + 1)])
    assert at_bound[1].outcome == ACCEPTED
    assert beyond[1].outcome == REJECTED
    assert f"counters advanced {bound + 1} Wh in 60000 ms, more than {bound} Wh possible" in beyond[1].reason


def test_import_and_export_together_are_bounded():
    """A meter cannot import and export at full power at once: the sum is what is bounded."""
    verdicts, _ = run([s(0, 1000, 1000), s(60, 1400, 1400)])  # 800 Wh in a minute at 36 kW max (601)
    assert verdicts[1].outcome == REJECTED


def test_power_register_beyond_max_power_is_rejected():
    verdicts, state = run([s(0, 1000, power=500), s(60, 1001, power=-36_001)])
    assert verdicts[1].outcome == REJECTED and "power -36001 W beyond max_power_w 36000" in verdicts[1].reason
    assert state.last.import_energy_wh == 1000


def test_classic_spike_is_rejected_and_the_next_good_reading_accepted():
    """180.1 -> 5000 -> 180.4 kWh: the spike is dropped, nothing re-baselined, nothing lost."""
    verdicts, state = run([s(0, 180_100), s(60, 5_000_000), s(120, 180_400)])
    assert [v.outcome for v in verdicts] == [ACCEPTED, REJECTED, ACCEPTED]
    assert state.last == s(120, 180_400) and state.candidates == () and state.rebaselines == 0
    assert (state.import_offset_wh, state.export_offset_wh) == (0, 0)


def test_a_spike_lasting_two_readings_is_still_only_a_spike():
    verdicts, state = run([s(0, 1000), s(60, 90_000), s(120, 90_010), s(180, 1300)])
    assert [v.outcome for v in verdicts] == [ACCEPTED, REJECTED, REJECTED, ACCEPTED]
    assert state.rebaselines == 0 and state.last.import_energy_wh == 1300


# --- reset and swap ---------------------------------------------------------------------------------

def test_reset_to_zero_is_rebaselined_keeping_the_energy_counted_since():
    readings = [s(0, 12_000, 3_000), s(60, 12_100, 3_000),  # normal
                s(120, 40, 0), s(180, 90, 0), s(240, 150, 5)]  # counters restarted from 0
    verdicts, state = run(readings)
    assert [v.outcome for v in verdicts] == [ACCEPTED, ACCEPTED, REJECTED, REJECTED, REBASELINED]
    rebased = verdicts[-1]
    # counted from zero: what the meter counted since the reset is added to the last good value
    assert rebased.stored == s(240, 12_100 + 150, 3_000 + 5)
    assert "meter reset or swapped" in rebased.reason and "restarted from zero" in rebased.reason
    assert (state.import_offset_wh, state.export_offset_wh) == (12_100, 3_000)
    # from now on every reading is stored with the offset, and checked against the new series
    more, state = run([s(300, 200, 5), s(360, 150, 5)], state=state)
    assert more[0].outcome == ACCEPTED and more[0].stored == s(300, 12_300, 3_005)
    assert more[1].outcome == REJECTED  # backwards within the new series is still backwards


def test_swap_to_a_meter_with_another_history_continues_seamlessly():
    """A swapped meter already counts 50 000 Wh: nothing is invented for the swap itself."""
    readings = [s(0, 12_000, 3_000), s(60, 50_000, 800), s(120, 50_100, 800), s(180, 50_200, 810)]
    verdicts, state = run(readings)
    assert [v.outcome for v in verdicts] == [ACCEPTED, REJECTED, REJECTED, REBASELINED]
    assert verdicts[-1].stored == s(180, 12_000 + 200, 3_000 + 10)  # only what was counted since the swap
    assert "new baseline" in verdicts[-1].reason
    assert state.rebaselines == 1


def test_candidates_must_agree_with_each_other():
    """Random garbage never gathers agreeing readings: no re-baseline, the value goes unavailable."""
    readings = [s(0, 12_000), s(60, 3), s(120, 900_000), s(180, 5), s(240, 700_000)]
    verdicts, state = run(readings)
    assert [v.outcome for v in verdicts[1:]] == [REJECTED] * 4
    assert state.rebaselines == 0 and state.last == s(0, 12_000)
    assert verdicts[3].became_unavailable and not verdicts[4].became_unavailable  # announced once


def test_seed_from_the_journal_judges_the_first_reading_of_a_run():
    state = seed(s(0, 12_000))
    verdicts, _ = run([s(60, 11_000)], state=state)
    assert verdicts[0].outcome == REJECTED
    assert seed(None) == MeterState()


# --- availability -------------------------------------------------------------------------------------

def test_max_failures_in_a_row_make_the_value_unavailable_until_a_good_reading():
    limits = Limits(max_power_w=36_000, max_failures=3)
    verdicts, state = run([s(0, 1000), "fail", "fail"], limits)
    assert unavailable_reason(state, limits, now_ms=2 * MINUTE_MS, max_age_ms=10 * MINUTE_MS) is None
    verdicts, state = run(["fail"], limits, state)
    assert verdicts[0].outcome == FAILED and verdicts[0].became_unavailable
    assert unavailable_reason(state, limits, 3 * MINUTE_MS, 10 * MINUTE_MS) == "3 failed or implausible reads in a row"
    verdicts, state = run([s(240, 1010)], limits, state)
    assert verdicts[0].outcome == ACCEPTED and verdicts[0].became_available
    assert unavailable_reason(state, limits, 4 * MINUTE_MS, 10 * MINUTE_MS) is None


def test_rejected_readings_count_as_failures():
    limits = Limits(max_power_w=36_000, max_failures=2)
    _, state = run([s(0, 1000), s(60, 10), "fail"], limits)
    assert unavailable_reason(state, limits, 120_000, 10 * MINUTE_MS) == "2 failed or implausible reads in a row"


def test_old_value_is_unavailable_not_stale():
    _, state = run([s(0, 1000)])
    assert unavailable_reason(state, LIMITS, now_ms=30_000, max_age_ms=30_000) is None
    assert unavailable_reason(state, LIMITS, now_ms=30_001, max_age_ms=30_000) == \
        "last good reading is 30001 ms old (limit 30000 ms)"
    assert unavailable_reason(MeterState(), LIMITS, 0, 30_000) == "no good reading yet"


def test_a_bench_that_compresses_time_needs_its_factor_in_max_power():
    """The sim house: 3 kW of PV, 60x compressed, read every 2 s: 100 Wh of counter per read."""
    real = Limits(max_power_w=100_000)
    bench = Limits(max_power_w=2_000_000)
    readings = [s(0, 0, 10_000), s(2, 0, 10_100), s(4, 0, 10_200)]
    assert [v.outcome for v in run(readings, real)[0]] == [ACCEPTED, REJECTED, REJECTED]
    assert [v.outcome for v in run(readings, bench)[0]] == [ACCEPTED, ACCEPTED, ACCEPTED]


# --- a long random walk ------------------------------------------------------------------------------

def test_random_faults_never_let_an_implausible_value_through():
    """Whatever mix of spikes, drops, failures and one real reset arrives, the stored series
    is monotonic and never faster than max_power_w; the reset is re-baselined once."""
    rng = random.Random(20261121)
    limits = Limits(max_power_w=36_000)
    true_import, true_export, reset_at = 5_000, 2_000, 300
    state = MeterState()
    stored = []
    outcomes = {ACCEPTED: 0, REJECTED: 0, FAILED: 0, REBASELINED: 0}
    for i in range(600):
        t_ms = i * 2_000
        true_import += rng.randint(0, 15)  # at most 27 kW
        true_export += rng.randint(0, 3)
        if i == reset_at:
            true_import, true_export = 0, 0
        roll = rng.random()
        if roll < 0.05:
            verdict = record_failure(state, limits, "timeout")
        elif roll < 0.10:
            verdict = check_reading(state, Sample(t_ms, true_import + 1_000_000, true_export), limits)
        elif roll < 0.13:
            verdict = check_reading(state, Sample(t_ms, max(true_import - 500, 0), true_export), limits)
        else:
            verdict = check_reading(state, Sample(t_ms, true_import, true_export), limits)
        outcomes[verdict.outcome] += 1
        state = verdict.state
        if verdict.stored is not None:
            stored.append(verdict.stored)
    assert outcomes[REJECTED] > 30 and outcomes[FAILED] > 10  # the walk did exercise the rules
    assert outcomes[REBASELINED] == 1
    for before, after in zip(stored, stored[1:]):
        d_import = after.import_energy_wh - before.import_energy_wh
        d_export = after.export_energy_wh - before.export_energy_wh
        assert d_import >= 0 and d_export >= 0
        assert d_import + d_export <= max_advance_wh(limits, after.taken_at_ms - before.taken_at_ms)
    assert stored[-1].import_energy_wh < 5_000 + 600 * 15  # no spike ever reached the series
