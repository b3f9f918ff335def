"""The pinned anvil node: installed by the project's files, started by binary path, stopped by pid."""

from __future__ import annotations

import os

from host_tools.evm.anvil import start_anvil
from host_tools.evm.toolchain import HARDFORK, anvil_binary


def test_anvil_starts_on_loopback_answers_and_stops_by_pid():
    assert anvil_binary().is_file()
    node = start_anvil()
    try:
        assert node.url.startswith("http://127.0.0.1:")
        rpc = node.rpc()
        assert rpc.call_int("eth_chainId") == 31337
        block = rpc.call("eth_getBlockByNumber", "latest", False)
        rpc.call("evm_increaseTime", 3600)
        rpc.call("evm_mine")
        later = rpc.call("eth_getBlockByNumber", "latest", False)
        assert int(later["timestamp"], 16) >= int(block["timestamp"], 16) + 3600
    finally:
        node.stop()
    assert node.process.poll() is not None
    try:
        os.kill(node.pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive
    assert HARDFORK == "london"
