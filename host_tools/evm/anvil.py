"""Start an anvil node by its binary path on 127.0.0.1 and stop it by pid.

Why this way: ``npx anvil`` would put a node process between us and anvil, so a kill by pid
would leave anvil running. The port is chosen by anvil itself (``--port 0``) and read from its
"Listening on" line, so parallel tests never race for a port. Readiness is a real RPC answer,
not a sleep.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from host_tools.evm.rpc import RpcClient, RpcError
from host_tools.evm.toolchain import HARDFORK, anvil_binary

log = logging.getLogger(__name__)


@dataclass
class AnvilNode:
    """A running anvil: its URL, pid, and the temporary folder holding its log."""

    url: str
    pid: int
    process: subprocess.Popen = field(repr=False)
    log_path: Path = field(repr=False)
    _workdir: tempfile.TemporaryDirectory = field(repr=False)

    def rpc(self) -> RpcClient:
        return RpcClient(self.url)

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM by pid, then SIGKILL if it has not gone after ``timeout_s``."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout_s)
        self._workdir.cleanup()

    def __enter__(self) -> "AnvilNode":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_anvil(
    *,
    block_time_s: int | None = None,
    hardfork: str = HARDFORK,
    chain_id: int = 31337,
    timestamp: int | None = None,
    extra_args: tuple[str, ...] = (),
    startup_timeout_s: float = 20.0,
) -> AnvilNode:
    """Start anvil (automine unless ``block_time_s``) and wait until it answers ``eth_chainId``."""
    workdir = tempfile.TemporaryDirectory(prefix="dgc-anvil-")
    log_path = Path(workdir.name) / "anvil.log"
    args = [str(anvil_binary()), "--host", "127.0.0.1", "--port", "0", "--hardfork", hardfork,
            "--chain-id", str(chain_id), "--accounts", "1", "--no-request-size-limit"]
    if block_time_s is not None:
        args += ["--block-time", str(block_time_s)]
    if timestamp is not None:
        args += ["--timestamp", str(timestamp)]
    args += list(extra_args)
    with open(log_path, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + startup_timeout_s
    url = None
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"anvil exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            if url is None:
                for line in log_path.read_text(errors="replace").splitlines():
                    if line.startswith("Listening on 127.0.0.1:"):
                        url = "http://" + line.split("Listening on ", 1)[1].strip()
            if url is not None:
                try:
                    if RpcClient(url, timeout_s=2).call("eth_chainId") == hex(chain_id):
                        log.info("anvil %s up at %s (pid %d)", hardfork, url, process.pid)
                        return AnvilNode(url=url, pid=process.pid, process=process, log_path=log_path, _workdir=workdir)
                except (RpcError, OSError):
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"anvil did not answer within {startup_timeout_s} s")
    except BaseException:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        workdir.cleanup()
        raise
