"""Metering rules added for the sim's findings (docs/delivery.md): a clock step backwards never
re-baselines a meter (F3)."""

from __future__ import annotations

from firmware.plausibility import ACCEPTED, REBASELINED, REJECTED, Limits, Sample, check_reading, seed


def test_a_clock_step_back_is_rejected_but_never_rebaselines():
    limits = Limits(max_power_w=10_000)
    state = seed(Sample(1_000_000, 500, 800))
    outcomes = []
    t = 400_000  # the clock stepped back 600 s; the counters keep counting
    for i in range(6):
        verdict = check_reading(state, Sample(t + i * 5_000, 500 + 10 * i, 800), limits)
        outcomes.append(verdict.outcome)
        state = verdict.state
        assert "clock went backwards" in verdict.reason
    assert REBASELINED not in outcomes and set(outcomes) == {REJECTED}
    # once the clock is past the last good reading, the series goes on, nothing lost
    verdict = check_reading(state, Sample(1_010_000, 560, 800), limits)
    assert verdict.outcome == ACCEPTED and verdict.stored.import_energy_wh == 560
