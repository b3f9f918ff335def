"""firmware.plausibility: pure rules over immutable state, no bus, no clock."""

from __future__ import annotations

import dataclasses
import random

import pytest

from firmware.plausibility import (
    ACCEPTED,
    FAILED,
    PENDING,
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


def warm_up(first: Sample, limits: Limits = LIMITS) -> list[Sample]:
    """What a new meter sends before ``first``: ``confirm_readings - 1`` readings one second apart
    with ``first``'s counters, so that ``first`` is the reading that confirms the first baseline."""
    n = limits.confirm_readings - 1
    return [dataclasses.replace(first, taken_at_ms=first.taken_at_ms - (n - i) * 1000) for i in range(n)]


def run_new(readings, limits=LIMITS):
    """A new meter (no history): warm_up(readings[0]), then ``readings``. Returns the verdicts of
    ``readings`` only — the first of them establishes the baseline — and the state."""
    warm = warm_up(readings[0], limits)
    verdicts, state = run(warm + list(readings), limits)
    assert [v.outcome for v in verdicts[:len(warm)]] == [PENDING] * len(warm)
    assert all(v.stored is None for v in verdicts[:len(warm)])
    return verdicts[len(warm):], state


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

def test_first_baseline_needs_confirm_readings_and_normal_growth_follows():
    verdicts, state = run([s(0, 1000), s(60, 1500), s(120, 1500, 20), s(180, 1600, 20)])
    assert [v.outcome for v in verdicts] == [PENDING, PENDING, ACCEPTED, ACCEPTED]
    assert [v.stored for v in verdicts[:2]] == [None, None]  # nothing stored before the baseline
    assert verdicts[2].stored == s(120, 1500, 20)  # the confirming reading, stored as read
    assert state.last == s(180, 1600, 20) and state.failures == 0
    assert verdicts[3].stored == s(180, 1600, 20)  # no offset: stored as read


def test_counter_going_backwards_is_rejected_and_not_stored():
    verdicts, state = run_new([s(0, 1000, 500), s(60, 999, 500)])
    assert verdicts[1].outcome == REJECTED and verdicts[1].stored is None
    assert "counter went backwards (import 1000 -> 999 Wh" in verdicts[1].reason
    assert state.last == s(0, 1000, 500) and state.failures == 1


def test_export_going_backwards_is_rejected_too():
    verdicts, _ = run_new([s(0, 1000, 500), s(60, 1000, 499)])
    assert verdicts[1].outcome == REJECTED and "export 500 -> 499 Wh" in verdicts[1].reason


def test_jump_beyond_max_power_is_rejected_exactly_at_the_bound():
    bound = max_advance_wh(LIMITS, 60_000)  # 600 + 1
    at_bound, _ = run_new([s(0, 1000), s(60, 1000 + bound)])
    beyond, _ = run_new([s(0, 1000), s(60, 1000 + bound + 1)])
    assert at_bound[1].outcome == ACCEPTED
    assert beyond[1].outcome == REJECTED
    assert f"counters advanced {bound + 1} Wh in 60000 ms, more than {bound} Wh possible" in beyond[1].reason


def test_import_and_export_together_are_bounded():
    """A meter cannot import and export at full power at once: the sum is what is bounded."""
    verdicts, _ = run_new([s(0, 1000, 1000), s(60, 1400, 1400)])  # 800 Wh in a minute at 36 kW max (601)
    assert verdicts[1].outcome == REJECTED


def test_power_register_beyond_max_power_is_rejected():
    verdicts, state = run_new([s(0, 1000, power=500), s(60, 1001, power=-36_001)])
    assert verdicts[1].outcome == REJECTED and "power -36001 W beyond max_power_w 36000" in verdicts[1].reason
    assert state.last.import_energy_wh == 1000


def test_classic_spike_is_rejected_and_the_next_good_reading_accepted():
    """180.1 -> 5000 -> 180.4 kWh: the spike is dropped, nothing re-baselined, nothing lost."""
    verdicts, state = run_new([s(0, 180_100), s(60, 5_000_000), s(120, 180_400)])
    assert [v.outcome for v in verdicts] == [ACCEPTED, REJECTED, ACCEPTED]
    assert state.last == s(120, 180_400) and state.candidates == () and state.rebaselines == 0
    assert (state.import_offset_wh, state.export_offset_wh) == (0, 0)


def test_a_spike_lasting_two_readings_is_still_only_a_spike():
    verdicts, state = run_new([s(0, 1000), s(60, 90_000), s(120, 90_010), s(180, 1300)])
    assert [v.outcome for v in verdicts] == [ACCEPTED, REJECTED, REJECTED, ACCEPTED]
    assert state.rebaselines == 0 and state.last.import_energy_wh == 1300


# --- a new meter: the first baseline ------------------------------------------------------------

def test_a_first_reading_that_is_a_spike_never_becomes_the_baseline():
    """A new board whose very first reading is a 1 MWh spike: the true readings after it
    establish the baseline after confirm_readings of them; nothing of the spike is ever stored,
    no offset comes of it, and the series after it is judged against the true values."""
    spike = s(0, 1_001_000, 1_000_500)
    true = [s(2, 1000, 500), s(4, 1010, 500), s(6, 1020, 501), s(8, 1030, 501)]
    verdicts, state = run([spike] + true)
    assert [v.outcome for v in verdicts] == [PENDING, PENDING, PENDING, ACCEPTED, ACCEPTED]
    assert [v.stored for v in verdicts] == [None, None, None, s(6, 1020, 501), s(8, 1030, 501)]
    assert state.last == s(8, 1030, 501) and state.candidates == ()
    assert (state.import_offset_wh, state.export_offset_wh, state.rebaselines, state.failures) == (0, 0, 0, 0)
    # judged against the true baseline from now on: the spike value itself is now rejected
    more, _ = run([s(10, 1_001_000, 1_000_500), s(12, 1040, 501)], state=state)
    assert [v.outcome for v in more] == [REJECTED, ACCEPTED] and more[1].stored == s(12, 1040, 501)


def test_a_spike_among_the_first_candidates_restarts_the_count():
    """Two true readings, a spike, then true readings again: the spike breaks the series and the
    count starts over from the next true reading; a spike lasting two readings gathers only two."""
    readings = [s(0, 1000), s(2, 1010), s(4, 1_001_020), s(6, 1_001_030), s(8, 1030), s(10, 1040), s(12, 1050)]
    verdicts, state = run(readings)
    assert [v.outcome for v in verdicts] == [PENDING] * 6 + [ACCEPTED]
    assert [v.reason for v in verdicts[:6]] == [f"first baseline: {n} of 3 agreeing readings" for n in (1, 2, 1, 2, 1, 2)]
    assert state.last == s(12, 1050) and all(v.stored is None for v in verdicts[:6])
    assert "first baseline confirmed by 3 agreeing readings" in verdicts[-1].reason


def test_first_candidates_that_disagree_restart_the_count():
    """Backwards, or faster than max_power_w, between two candidates: the count starts over."""
    too_fast = max_advance_wh(LIMITS, 2000) + 1
    readings = [s(0, 5000), s(2, 4000), s(4, 4000 + too_fast), s(6, 4000 + too_fast + 5),
                s(8, 4000 + too_fast + 10, 3)]
    verdicts, state = run(readings)
    assert [v.outcome for v in verdicts] == [PENDING] * 4 + [ACCEPTED]
    assert [len(v.state.candidates) for v in verdicts[:4]] == [1, 1, 1, 2]
    assert state.last == readings[-1] and verdicts[-1].stored == readings[-1]


def test_pending_counts_no_failure_and_is_not_unavailable_because_of_failures():
    """Readings that do not agree yet are not failures: a new meter sending more disagreeing
    readings than max_failures is not announced unavailable; it simply has no good reading yet."""
    limits = Limits(max_power_w=36_000, max_failures=2, confirm_readings=3)
    readings = [s(0, 1000), s(2, 500), s(4, 90_000), s(6, 10), s(8, 80_000)]
    verdicts, state = run(readings, limits)
    assert [v.outcome for v in verdicts] == [PENDING] * 5
    assert all(v.stored is None and not v.became_unavailable and not v.became_available for v in verdicts)
    assert state.failures == 0 and state.last is None and state.rebaselines == 0
    assert unavailable_reason(state, limits, now_ms=8_000, max_age_ms=10 * MINUTE_MS) == "no good reading yet"


def test_failures_while_pending_count_and_do_not_break_the_candidates():
    """A failed read between two agreeing readings is a failure like any other (max_failures of
    them make the meter unavailable) but does not restart the count; the confirming reading
    ends the run of failures."""
    limits = Limits(max_power_w=36_000, max_failures=2)
    verdicts, state = run([s(0, 1000), "fail", s(4, 1010), "fail"], limits)
    assert [v.outcome for v in verdicts] == [PENDING, FAILED, PENDING, FAILED]
    assert verdicts[-1].became_unavailable and len(state.candidates) == 2
    assert unavailable_reason(state, limits, 6_000, 10 * MINUTE_MS) == "2 failed or implausible reads in a row"
    verdicts, state = run([s(8, 1020)], limits, state)
    assert verdicts[0].outcome == ACCEPTED and verdicts[0].stored == s(8, 1020) and verdicts[0].became_available
    assert state.failures == 0 and unavailable_reason(state, limits, 8_000, 10 * MINUTE_MS) is None


def test_confirm_readings_of_one_takes_the_first_reading_at_once():
    verdicts, state = run([s(0, 1000)], Limits(max_power_w=36_000, confirm_readings=1))
    assert verdicts[0].outcome == ACCEPTED and state.last == s(0, 1000)


def test_seed_still_gives_a_baseline_at_once():
    """After a restart the journal's last reading is the baseline: the first reading of the run
    is accepted (or judged) against it, with no confirmation round."""
    state = seed(s(0, 12_000, 400))
    assert unavailable_reason(state, LIMITS, now_ms=10_000, max_age_ms=30_000) is None
    verdicts, state = run([s(60, 12_100, 400), s(120, 12_150, 401)], state=state)
    assert [v.outcome for v in verdicts] == [ACCEPTED, ACCEPTED]
    assert verdicts[0].stored == s(60, 12_100, 400) and state.candidates == ()
    spiked, _ = run([s(60, 1_012_000, 400)], state=seed(s(0, 12_000, 400)))
    assert spiked[0].outcome == REJECTED  # judged against the journal at once, not collected


# --- reset and swap ---------------------------------------------------------------------------------

def test_reset_to_zero_is_rebaselined_keeping_the_energy_counted_since():
    readings = [s(0, 12_000, 3_000), s(60, 12_100, 3_000),  # normal
                s(120, 40, 0), s(180, 90, 0), s(240, 150, 5)]  # counters restarted from 0
    verdicts, state = run_new(readings)
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
    verdicts, state = run_new(readings)
    assert [v.outcome for v in verdicts] == [ACCEPTED, REJECTED, REJECTED, REBASELINED]
    assert verdicts[-1].stored == s(180, 12_000 + 200, 3_000 + 10)  # only what was counted since the swap
    assert "new baseline" in verdicts[-1].reason
    assert state.rebaselines == 1


def test_candidates_must_agree_with_each_other():
    """Random garbage never gathers agreeing readings: no re-baseline, the value goes unavailable."""
    readings = [s(0, 12_000), s(60, 3), s(120, 900_000), s(180, 5), s(240, 700_000)]
    verdicts, state = run_new(readings)
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
    verdicts, state = run_new([s(0, 1000), "fail", "fail"], limits)
    assert unavailable_reason(state, limits, now_ms=2 * MINUTE_MS, max_age_ms=10 * MINUTE_MS) is None
    verdicts, state = run(["fail"], limits, state)
    assert verdicts[0].outcome == FAILED and verdicts[0].became_unavailable
    assert unavailable_reason(state, limits, 3 * MINUTE_MS, 10 * MINUTE_MS) == "3 failed or implausible reads in a row"
    verdicts, state = run([s(240, 1010)], limits, state)
    assert verdicts[0].outcome == ACCEPTED and verdicts[0].became_available
    assert unavailable_reason(state, limits, 4 * MINUTE_MS, 10 * MINUTE_MS) is None


def test_rejected_readings_count_as_failures():
    limits = Limits(max_power_w=36_000, max_failures=2)
    _, state = run_new([s(0, 1000), s(60, 10), "fail"], limits)
    assert unavailable_reason(state, limits, 120_000, 10 * MINUTE_MS) == "2 failed or implausible reads in a row"


def test_old_value_is_unavailable_not_stale():
    _, state = run_new([s(0, 1000)])
    assert unavailable_reason(state, LIMITS, now_ms=30_000, max_age_ms=30_000) is None
    assert unavailable_reason(state, LIMITS, now_ms=30_001, max_age_ms=30_000) == \
        "last good reading is 30001 ms old (limit 30000 ms)"
    assert unavailable_reason(MeterState(), LIMITS, 0, 30_000) == "no good reading yet"


def test_a_bench_that_compresses_time_needs_its_factor_in_max_power():
    """The sim house: 3 kW of PV, 60x compressed, read every 2 s: 100 Wh of counter per read."""
    real = Limits(max_power_w=100_000)
    bench = Limits(max_power_w=2_000_000)
    readings = [s(0, 0, 10_000), s(2, 0, 10_100), s(4, 0, 10_200)]
    assert [v.outcome for v in run_new(readings, real)[0]] == [ACCEPTED, REJECTED, REJECTED]
    assert [v.outcome for v in run_new(readings, bench)[0]] == [ACCEPTED, ACCEPTED, ACCEPTED]
    # and a new meter never even gets its first baseline with the real board's limit
    assert [v.outcome for v in run(readings, real)[0]] == [PENDING] * 3


# --- a long random walk ------------------------------------------------------------------------------

def test_random_faults_never_let_an_implausible_value_through():
    """Whatever mix of spikes, drops, failures and one real reset arrives, from a new meter's very
    first reading on, the stored series is monotonic and never faster than max_power_w; before
    the reset it is exactly the true counters; the reset is re-baselined once."""
    rng = random.Random(20261121)
    limits = Limits(max_power_w=36_000)
    true_import, true_export, reset_at = 5_000, 2_000, 300
    state = MeterState()
    stored = []
    truth = {}
    outcomes = {ACCEPTED: 0, REJECTED: 0, FAILED: 0, REBASELINED: 0, PENDING: 0}
    for i in range(600):
        t_ms = i * 2_000
        true_import += rng.randint(0, 15)  # at most 27 kW
        true_export += rng.randint(0, 3)
        if i == reset_at:
            true_import, true_export = 0, 0
        truth[t_ms] = (true_import, true_export)
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
    assert outcomes[PENDING] >= limits.confirm_readings - 1  # a new meter: the first baseline was confirmed
    before_reset = [x for x in stored if x.taken_at_ms < reset_at * 2_000]
    assert before_reset and all((x.import_energy_wh, x.export_energy_wh) == truth[x.taken_at_ms] for x in before_reset)
    for before, after in zip(stored, stored[1:]):
        d_import = after.import_energy_wh - before.import_energy_wh
        d_export = after.export_energy_wh - before.export_energy_wh
        assert d_import >= 0 and d_export >= 0
        assert d_import + d_export <= max_advance_wh(limits, after.taken_at_ms - before.taken_at_ms)
    assert stored[-1].import_energy_wh < 5_000 + 600 * 15  # no spike ever reached the series
