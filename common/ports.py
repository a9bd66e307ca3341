"""Picking a free TCP port for a service to listen on."""

from __future__ import annotations

import errno
import random
import socket

_LOWEST = 10000
# A service exits with this code when a port it was told to listen on is taken (errno EADDRINUSE's value), so
# `mirador up` can tell "another process took the port between the pick and the bind" from a real failure.
EXIT_PORT_IN_USE = errno.EADDRINUSE


class PortInUse(OSError):
    """A port a service was told to listen on is held by another socket."""

    def __init__(self, what: str, host: str, port: int):
        super().__init__(errno.EADDRINUSE, f"{what} port {host}:{port} is already in use")


def _ephemeral_start() -> int:
    """First port of the kernel's ephemeral range (what it gives outgoing connections and bind to port 0)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bind(host: str, port: int) -> int | None:
    """The port bound on `host` (a free one for 0) and released at once, or None when it is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return None
        return s.getsockname()[1]


def can_bind(host: str, port: int) -> bool:
    return _bind(host, port) is not None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that can be bound on `host` now, drawn below the kernel's ephemeral range when there is room. A port
    the kernel picks (bind to 0) comes from the range it also gives outgoing connections, so between the pick and
    the service's own bind any process's connect may take it, and the service fails to start ("Failed to bind")."""
    start = _ephemeral_start()
    draw = random.SystemRandom()  # not the seeded global generator: processes must not draw alike
    for _ in range(64 if start > _LOWEST else 0):
        port = draw.randrange(_LOWEST, start)
        if can_bind(host, port):
            return port
    port = _bind(host, 0)
    if port is None:
        raise OSError(f"no free port on {host}")
    return port
