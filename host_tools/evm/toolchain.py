"""Where the pinned EVM tools are, and the hardfork that the compiler and the node must agree on.

Why pin ``HARDFORK``: solc-js 0.8.37 targets ``osaka`` by default, and such bytecode fails to
deploy on a chain running an older fork. The compiler's ``evmVersion`` and anvil's ``--hardfork``
both come from this one constant. ``london`` is the newest fork that the production PoA clients
in view (Besu QBFT, Nethermind Aura / Energy Web Chain) have all long supported; it also brings
EIP-1559 transactions, which the relay sends.
"""

from __future__ import annotations

import platform
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTRACTS_DIR = REPO_ROOT / "contracts"
NODE_MODULES = CONTRACTS_DIR / "node_modules"
BUILD_DIR = REPO_ROOT / "build" / "contracts"
HARDFORK = "london"

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_OS = {"Linux": "linux", "Darwin": "darwin"}


class ToolchainMissing(RuntimeError):
    """The npm toolchain is not installed; the message says which command installs it."""


def anvil_binary() -> Path:
    """The anvil binary of the pinned @foundry-rs/anvil platform package (started directly, not via npx)."""
    system, machine = _OS.get(platform.system()), _ARCH.get(platform.machine().lower())
    if system is None or machine is None:
        raise ToolchainMissing(f"no @foundry-rs/anvil build for {platform.system()} {platform.machine()}")
    path = NODE_MODULES / "@foundry-rs" / f"anvil-{system}-{machine}" / "bin" / "anvil"
    if not path.is_file():
        raise ToolchainMissing(f"{path} not found: run `make evm-tools` (npm ci in contracts/)")
    return path


def solc_module() -> Path:
    path = NODE_MODULES / "solc" / "package.json"
    if not path.is_file():
        raise ToolchainMissing(f"{path.parent} not found: run `make evm-tools` (npm ci in contracts/)")
    return path.parent
