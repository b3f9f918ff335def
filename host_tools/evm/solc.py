"""Compile the market contract with the pinned solc-js, caching the artefact under build/contracts/.

Why cache: solc-js with via-IR takes a few seconds and ~230 MB; tests, the relay and the demo all
need the same bytecode. The cache key is the sha256 of the source, the compiler settings and the
solc package version, so a changed source or pin can never reuse a stale artefact.
``evmVersion`` is pinned to toolchain.HARDFORK, the fork anvil runs (solc's default, osaka,
would not deploy on an older chain).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from host_tools.evm.toolchain import BUILD_DIR, CONTRACTS_DIR, HARDFORK, solc_module

SOURCE = CONTRACTS_DIR / "DgcMarket.sol"
CONTRACT_NAME = "DgcMarket"


class CompileError(RuntimeError):
    """solc reported errors; the message carries its formatted output."""


@dataclass(frozen=True)
class Artefact:
    name: str
    abi: list
    bytecode: bytes
    deployed_size: int
    solc_version: str
    evm_version: str


def settings() -> dict:
    return {
        "optimizer": {"enabled": True, "runs": 200},
        "viaIR": True,
        "evmVersion": HARDFORK,
        "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
    }


def compile_market(source: Path = SOURCE, *, build_dir: Path = BUILD_DIR) -> Artefact:
    text = source.read_text()
    solc_version = json.loads((solc_module() / "package.json").read_text())["version"]
    key = hashlib.sha256(json.dumps([text, settings(), solc_version], sort_keys=True).encode()).hexdigest()[:16]
    cached = build_dir / f"{CONTRACT_NAME}-{key}.json"
    if not cached.is_file():
        standard = {"language": "Solidity", "sources": {source.name: {"content": text}}, "settings": settings()}
        done = subprocess.run(["node", "compile.js"], cwd=CONTRACTS_DIR, input=json.dumps(standard), capture_output=True,
                              text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise CompileError(f"solc-js failed ({done.returncode}): {done.stderr[-2000:]}")
        result = json.loads(done.stdout)
        errors = [e for e in result["output"].get("errors", []) if e.get("severity") == "error"]
        if errors:
            raise CompileError("\n".join(e.get("formattedMessage", e.get("message", "")) for e in errors))
        contract = result["output"]["contracts"][source.name][CONTRACT_NAME]
        artefact = {
            "name": CONTRACT_NAME,
            "solc_version": result["version"],
            "evm_version": HARDFORK,
            "abi": contract["abi"],
            "bytecode": contract["evm"]["bytecode"]["object"],
            "deployed_bytecode": contract["evm"]["deployedBytecode"]["object"],
        }
        build_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=build_dir, suffix=".tmp")
        with os.fdopen(fd, "w") as out:
            json.dump(artefact, out)
        os.replace(tmp, cached)  # atomic: parallel test processes never read half a file
    data = json.loads(cached.read_text())
    return Artefact(name=data["name"], abi=data["abi"], bytecode=bytes.fromhex(data["bytecode"]),
                    deployed_size=len(data["deployed_bytecode"]) // 2, solc_version=data["solc_version"],
                    evm_version=data["evm_version"])
