"""The HIL suite's pytest plugin: the rig (hil_tests/rig.py; docs/bench.md).

``pytest hil_tests --rig FILE`` (or ``DGC_RIG=FILE``) chooses the rig the device tests run on;
the default is hil_tests/rigs/default.toml (the CPython emulators on socat ptys).
"""

from .rig.plugin import *  # noqa: F401,F403 - the plugin's hooks and fixtures (rig/plugin.py __all__)
