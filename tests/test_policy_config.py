"""The [policy] and [forecast] keys of issue 8: defaults, and the cross-checks that keep a config
that `dgc check-config` accepts from failing later in `dgc run`."""

from __future__ import annotations

import pytest

from firmware.config import ConfigError, parse_config
from firmware.policy import Tariffs
from tests.test_config import MINIMAL


def config(extra: str):
    return parse_config(MINIMAL + "\n" + extra)


def test_defaults_are_the_japanese_tariffs_and_the_robust_forecast():
    cfg = config("")
    p, f = cfg.policy, cfg.forecast
    assert p.strategy == "tariff" and p.retail_per_kwh_minor == 3000 and p.feed_in_per_kwh_minor == 850
    assert (p.band_min_per_kwh_minor, p.band_max_per_kwh_minor, p.subsidy_percent) == (0, 0, 100)
    assert Tariffs(p.retail_per_kwh_minor, p.feed_in_per_kwh_minor, p.band_min_per_kwh_minor,
                   p.band_max_per_kwh_minor, p.subsidy_percent) == Tariffs()
    assert (p.sell_quantile_percent, p.battery_sell_quantile_percent, p.buy_quantile_percent) == (20, 30, 85)
    assert f.method == "robust" and f.day_seconds == 0 and f.history_days == 28 and not f.clear_sky_pv


@pytest.mark.parametrize("extra,table,key,needle", [
    ("[policy]\nretail_per_kwh_minor = 800\n", "policy", "feed_in_per_kwh_minor", "at most retail_per_kwh_minor (800)"),
    ("[policy]\nband_min_per_kwh_minor = 2000\nband_max_per_kwh_minor = 1000\n", "policy", "band_min_per_kwh_minor",
     "at most band_max_per_kwh_minor (1000)"),
    ("[forecast]\nday_seconds = 1000\n", "forecast", "day_seconds", "a whole number of [market] slot_seconds (1800)"),
    ("[policy]\nstrategy = \"greedy\"\n", "policy", "strategy", '"tariff"'),
    ("[forecast]\nmethod = \"ml\"\n", "forecast", "method", '"robust"'),
    ("[forecast]\nsite_latitude_millideg = 91000\n", "forecast", "site_latitude_millideg", "from -90000 to 90000"),
    ("[policy]\nsell_quantile_percent = 60\n", "policy", "sell_quantile_percent", "from 0 to 50"),
    ("[policy]\nbattery_sell_quantile_percent = 51\n", "policy", "battery_sell_quantile_percent", "from 0 to 50"),
])
def test_inconsistent_trading_keys_are_refused_with_one_line(extra, table, key, needle):
    with pytest.raises(ConfigError) as err:
        config(extra)
    assert (err.value.table, err.value.key) == (table, key)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_compressed_bench_day_is_accepted():
    cfg = config("[market]\nslot_seconds = 30\ngate_closure_seconds = 10\nmarkets_ahead = 8\n[forecast]\nday_seconds = 1440\n")
    assert cfg.forecast.day_seconds == 1440
