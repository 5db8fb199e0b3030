"""Services under their real names on this machine: each service listens on its own loopback address, and the
processes that call them resolve the names (``postgres``, ``mlflow``, ...) through a hosts file bind-mounted over
/etc/hosts in a private mount namespace (``unshare --mount``), as a container on a compose network or a pod
resolves Service names. Nothing leaves the machine: every address is in 127.0.0.0/8."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

_SCRIPT = 'mount --bind "$0" /etc/hosts && exec "$@"'


class ServiceNames:
    def __init__(self, workdir: Path, addresses: dict[str, str]):
        """``addresses``: name -> loopback address (``{"mlflow": "127.0.0.22", ...}``)."""
        assert all(a.startswith("127.") for a in addresses.values()), addresses
        self.addresses = dict(addresses)
        self.hosts = workdir / "hosts"
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        lines += [f"{addr}\t{name}" for name, addr in sorted(addresses.items())]
        self.hosts.write_text("\n".join(lines) + "\n")

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run in its own mount namespace that sees the hosts file as /etc/hosts."""
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _SCRIPT, str(self.hosts), *map(str, argv)]

    def why_not(self) -> str | None:
        """None when names resolve in a wrapped process; else why (no unshare, not root, no mount)."""
        name, addr = next(iter(self.addresses.items()))
        try:
            r = subprocess.run(self.wrap(["getent", "hosts", name]), capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unshare/mount unavailable: {exc}"
        if r.returncode != 0 or addr not in r.stdout:
            return f"a private hosts file did not take effect (unshare --mount needs root): {(r.stdout + r.stderr).strip()[:300]}"
        return None


def port_free(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind (a closed connection's TIME_WAIT is no listener)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True
