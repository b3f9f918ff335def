"""The HIL suite's pytest plugin: the rig (hil_tests/rig.py; docs/bench.md).

``pytest hil_tests --rig FILE`` (or ``DGC_RIG=FILE``) chooses the rig the device tests run on;
the default is hil_tests/rigs/default.toml (the CPython emulators on socat ptys).

Under pytest-xdist the collection is also put longest file first (hil_tests/suite_order.py:
why `make test` runs its first pass with ``--no-loadscope-reorder``).
"""

import pytest

from .rig import plugin as _rig_plugin
from .rig.plugin import *  # noqa: F401,F403 - the plugin's hooks and fixtures (rig/plugin.py __all__)
from .suite_order import reorder_for_workers, slowest_files


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The rig plugin's hook (feature checks and skips, ``rig_portable`` marks, before ``-m``
    selects), then the order of the files for the xdist workers."""
    _rig_plugin.pytest_collection_modifyitems(config, items)
    reorder_for_workers(items)


def pytest_terminal_summary(terminalreporter) -> None:
    slowest_files(terminalreporter)
