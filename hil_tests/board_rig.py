"""A board for provisioning and flashing tests: a real OpenSSH server on 127.0.0.1 and a directory
standing for the board's root file system (or an SD card's).

Why a real sshd: the host tools drive boards with the system ``ssh`` client (BatchMode, host-key
checking, a master connection, quoting of every argument through the remote shell); only a real
server exercises all of that. It runs as the current user from a private config: generated
host key, a generated client key as the only authorised key, ``ListenAddress 127.0.0.1`` on a
free port, no PAM, a known_hosts file holding exactly its host key - so the client checks the
host key strictly, as it must against a real Pi.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SshServer:
    workdir: Path
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def user(self) -> str:
        return getpass.getuser()

    @property
    def destination(self) -> str:
        return f"{self.user}@127.0.0.1"

    @property
    def client_key(self) -> Path:
        return self.workdir / "client_key"

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    def ssh_args(self) -> list[str]:
        """The dgc-host options that reach this server."""
        return ["--ssh-port", str(self.port), "--ssh-key", str(self.client_key), "--known-hosts", str(self.known_hosts)]

    def start(self) -> "SshServer":
        if not os.path.exists(SSHD):
            raise RuntimeError(f"{SSHD} not found: install the Debian package openssh-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        host_key = self.workdir / "host_key"
        for key in (host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dgc-test", "-f", str(key)], check=True,
                           capture_output=True, timeout=30)
        authorized = self.workdir / "authorized_keys"
        shutil.copy(self.client_key.with_suffix(".pub"), authorized)
        os.chmod(authorized, 0o600)
        if os.geteuid() == 0:
            # sshd started as root checks its privilege-separation directory even in -D mode.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.port = free_port()
        config = self.workdir / "sshd_config"
        config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {host_key}\n"
            f"PidFile {self.workdir / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {authorized}\n"
            f"AllowUsers {self.user}\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "Subsystem sftp internal-sftp\n"
            "MaxStartups 50\n"
            "MaxSessions 50\n"
            "LogLevel ERROR\n"
        )
        host_pub = (host_key.with_suffix(".pub")).read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=open(self.workdir / "sshd.log", "wb"))
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.process.returncode}: {(self.workdir / 'sshd.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("sshd did not listen within 20 s") from None
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "SshServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
