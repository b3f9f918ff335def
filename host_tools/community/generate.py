"""Generate the committed 15-house community fixture (host side only, heavy libraries).

Run it in a separate environment with the ``community`` extra installed, never on the board:

    python -m venv /work/venv-community
    /work/venv-community/bin/pip install -e '.[community]'
    /work/venv-community/bin/python -m host_tools.community.generate --out host_tools/community/fixture

WHY these sources (all offline, all shipped inside packages):

* Weather: the DWD test reference year for region 5 (Essen, "mittleres Jahr" 1988-2007), as
  shipped by ``demandlib`` (MIT). Hourly direct and diffuse horizontal irradiance and air
  temperature. One weather year drives both PV and the load model's lighting, so a dull day is
  dull for everyone, as in a real neighbourhood.
* PV: ``pvlib`` (BSD). The hour's clearness index (measured GHI over clear-sky GHI) is applied
  to the clear-sky GHI at each half-hour's midpoint, split into beam and diffuse with Erbs,
  transposed to each roof (Hay-Davies), cell temperature from the Faiman model, PVWatts DC
  with -0.37 %/K, 10 % system losses and a 96 % inverter.
* Loads: ``richardsonpy`` (GPL-3.0): the Richardson stochastic occupancy and appliance model at
  1-min resolution, so every house has its own days, not a smooth standard profile. It is only
  run here to *generate* data; neither the firmware nor the tests import it (nor any module
  of this file), so its licence does not reach them. Each house gets a standby base load on
  top (routers, fridges' idle draw), normalised to its annual demand.

Everything is seeded: the same command writes byte-identical files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import random
from pathlib import Path

log = logging.getLogger("dgc.community.generate")

YEAR = 2025  # not a leap year: the TRY has 8760 hours; 1 Jan 2025 is a Wednesday
SLOT_SECONDS = 1800
LAT, LON, ALTITUDE_M = 51.4, 6.97, 152.0  # the TRY station, Essen
SEED = 20261201

# name, occupants, annual demand kWh, pv_kwp, tilt, azimuth
HOUSES = [
    ("c01", 1, 1900, 0.0, 0, 0),
    ("c02", 2, 2900, 0.0, 0, 0),
    ("c03", 2, 3200, 0.0, 0, 0),
    ("c04", 3, 3600, 0.0, 0, 0),
    ("c05", 3, 3900, 0.0, 0, 0),
    ("c06", 4, 4300, 0.0, 0, 0),
    ("c07", 4, 4600, 0.0, 0, 0),
    ("c08", 2, 2600, 0.0, 0, 0),
    ("c09", 5, 5200, 0.0, 0, 0),
    ("c10", 1, 2100, 0.0, 0, 0),
    ("p01", 3, 3800, 4.0, 30, 180),
    ("p02", 4, 4500, 4.5, 35, 160),
    ("p03", 2, 3000, 5.0, 30, 200),
    ("p04", 4, 4800, 5.5, 25, 170),
    ("p05", 5, 5300, 6.0, 35, 190),
]
BATTERY_WH = 7000
BATTERY_POWER_W = 3000
ROUTER_POWER_W = 4000
STANDBY_W = (40, 90)  # drawn uniformly per house


def try_path() -> Path:
    import demandlib

    return Path(demandlib.__file__).parent / "vdi" / "resources_weather" / "TRY2010_05_Jahr.dat"


def read_try(path: Path):
    """Hourly rows of the TRY file: (direct horizontal W/m2, diffuse W/m2, air temperature C)."""
    import numpy as np

    rows = []
    started = False
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("***"):
            started = True
            continue
        if started and line.strip():
            parts = line.split()
            rows.append((float(parts[13]), float(parts[14]), float(parts[8])))
    if len(rows) != 8760:
        raise SystemExit(f"{path}: expected 8760 hourly rows, found {len(rows)}")
    return np.array(rows)


def slot_starts():
    start = int(dt.datetime(YEAR, 1, 1, tzinfo=dt.timezone.utc).timestamp())
    return [start + i * SLOT_SECONDS for i in range(365 * 48)]


def pv_wh_per_kwp(weather, tilt: float, azimuth: float):
    """Half-hourly AC energy of 1 kWp on the given roof, Wh per slot."""
    import numpy as np
    import pandas as pd
    import pvlib

    # TRY hours are "hour ending" in MEZ (UTC+1): hour 1 covers 00:00-01:00 MEZ = 23:00-24:00 UTC
    # of the day before. Rotate by one hour so index 0 is 00:00-01:00 UTC on 1 January (the
    # missing last hour of 31 December wraps around; a typical year has no real date).
    ghi_h = np.roll(weather[:, 0] + weather[:, 1], -1)
    temp_h = np.roll(weather[:, 2], -1)
    site = pvlib.location.Location(LAT, LON, tz="UTC", altitude=ALTITUDE_M)
    hours = pd.date_range(f"{YEAR}-01-01 00:30", periods=8760, freq="h", tz="UTC")
    cs_h = site.get_clearsky(hours, model="ineichen")["ghi"].to_numpy()
    kt = np.where(cs_h > 10.0, np.minimum(ghi_h / np.maximum(cs_h, 1e-9), 1.2), 0.0)
    mids = pd.date_range(f"{YEAR}-01-01 00:15", periods=8760 * 2, freq="30min", tz="UTC")
    cs = site.get_clearsky(mids, model="ineichen")["ghi"].to_numpy()
    ghi = cs * np.repeat(kt, 2)
    solpos = site.get_solarposition(mids)
    erbs = pvlib.irradiance.erbs(ghi, solpos["zenith"], mids)
    dni_extra = pvlib.irradiance.get_extra_radiation(mids)
    poa = pvlib.irradiance.get_total_irradiance(
        tilt, azimuth, solpos["apparent_zenith"], solpos["azimuth"], erbs["dni"], ghi, erbs["dhi"],
        dni_extra=dni_extra, model="haydavies",
    )["poa_global"].fillna(0.0).to_numpy()
    temp_cell = pvlib.temperature.faiman(poa, np.repeat(temp_h, 2), wind_speed=2.0)
    dc_w = pvlib.pvsystem.pvwatts_dc(poa, temp_cell, pdc0=1000.0, gamma_pdc=-0.0037)
    ac_w = np.clip(dc_w * 0.90 * 0.96, 0.0, None)
    return ac_w * SLOT_SECONDS / 3600.0


def load_wh(weather, occupants: int, annual_kwh: float, seed: int):
    """Half-hourly household load, Wh per slot, from the Richardson stochastic model."""
    import numpy as np
    import richardsonpy.classes.electric_load as eload
    import richardsonpy.classes.occupancy as occ
    import richardsonpy.functions.change_resolution as cr

    random.seed(seed)
    np.random.seed(seed % 2**32)
    rng = random.Random(seed)
    standby_w = rng.uniform(*STANDBY_W)
    occupancy = occ.Occupancy(number_occupants=occupants, initial_day=3, nb_days=365)
    # The same TRY columns richardsonpy reads itself (its own path argument is broken in 0.2.3).
    q_direct = cr.change_resolution(weather[:, 0].copy(), old_res=3600, new_res=60)
    q_diffuse = cr.change_resolution(weather[:, 1].copy(), old_res=3600, new_res=60)
    appliances_kwh = annual_kwh - standby_w * 8.76
    model = eload.ElectricLoad(occ_profile=occupancy.occupancy, total_nb_occ=occupants, q_direct=q_direct,
                               q_diffuse=q_diffuse, timestep=60, annual_demand=appliances_kwh,
                               do_normalization=True, initial_day=3)
    minute_w = np.asarray(model.loadcurve, dtype=float)[: 365 * 1440]
    # The model's day starts at local midnight; the fixture is in UTC and the houses stand in
    # UTC+1 (the weather's zone): shift one hour so the evening peak sits at 19:00 local.
    minute_w = np.roll(minute_w, -60)
    return minute_w.reshape(-1, 30).mean(axis=1) * 0.5 + standby_w * 0.5


def generate(out: Path) -> None:
    import numpy as np

    weather_path = try_path()
    weather = read_try(weather_path)
    starts = slot_starts()
    series = {}
    for index, (name, occupants, annual_kwh, kwp, tilt, azimuth) in enumerate(HOUSES):
        load = load_wh(weather, occupants, annual_kwh, SEED + index)
        pv = pv_wh_per_kwp(weather, tilt, azimuth) * kwp if kwp > 0 else np.zeros(len(starts))
        series[name] = (np.rint(load).astype(int), np.rint(pv).astype(int))
        ssy = np.abs(load[48:] - load[:-48]).mean() / load.mean()
        log.info("%s: load %.0f kWh, pv %.0f kWh, same-slot-yesterday error %.2f of mean load",
                 name, load.sum() / 1000, pv.sum() / 1000, ssy)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "slots.csv", "w", encoding="ascii", newline="\n") as f:
        f.write("slot_start,house,load_wh,pv_wh\n")
        for i, start in enumerate(starts):
            for name in series:
                load, pv = series[name]
                f.write(f"{start},{name},{load[i]},{pv[i]}\n")
    lines = [
        "# 15-house community fixture, written by host_tools/community/generate.py (see docs/community.md).",
        "# Weather: DWD TRY 2010 region 5 (Essen) from demandlib; PV: pvlib; loads: richardsonpy.",
        "",
    ]
    for name, _occ, _kwh, kwp, _tilt, _az in HOUSES:
        has_pv = kwp > 0
        lines += [
            f"[house.{name}]",
            f"pv_kwp = {kwp:.1f}",
            f"battery_wh = {BATTERY_WH if has_pv else 0}",
            f"battery_power_w = {BATTERY_POWER_W if has_pv else 0}",
            f"router_power_w = {ROUTER_POWER_W}",
            "",
        ]
    (out / "houses.toml").write_text("\n".join(lines), encoding="ascii")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="community directory to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    generate(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
