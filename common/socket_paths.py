"""Where a service's Unix sockets live: a directory only this user can enter (the file permissions are the
sockets' trust, common/local_stream.py), names that never collide with another host's, stale sockets cleared."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import stat
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def _private_dir(d: Path, create: bool) -> str | None:
    """Why `d` is not a directory that only this user can enter (None when it is)."""
    if create:
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            return f"cannot create {d}: {e.strerror}"
    try:
        st = os.lstat(d)
    except OSError as e:
        return f"{d}: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return f"{d} is not a directory of this user's that only it can enter (mode 0700)"
    return None


def socket_path(flag: str, service: str, port: int) -> str | None:
    """The socket a service listens on for `--step-socket` / `--connect-socket` FLAG: None for "none"; for "auto"
    a fresh name under a 0700 directory of this user's ($XDG_RUNTIME_DIR/mirador, else <tmp>/mirador-<uid>),
    named after the gRPC port plus random bits (a scheduler on another host can never find a path of the same
    name); else FLAG itself, whose directory must be private already. "auto" gives None (gRPC only, logged) when
    no private directory can be had; an explicit path raises ValueError."""
    if flag == "none":
        return None
    if flag != "auto":
        why = _private_dir(Path(flag).parent, create=False)
        if why is not None:
            raise ValueError(f"socket {flag}: {why}")
        return flag
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    d = Path(runtime) / "mirador" if runtime else Path(tempfile.gettempdir()) / f"mirador-{os.geteuid()}"
    why = _private_dir(d, create=True)
    if why is not None:
        logger.warning("no local %s socket (%s): gRPC only", service, why)
        return None
    _remove_stale(d, f"{service}-{port}-")
    path = str(d / f"{service}-{port}-{secrets.token_hex(6)}.sock")
    if len(path.encode()) > 100:  # sun_path holds 108 bytes
        logger.warning(
            "no local %s socket: the path %s is too long for a Unix socket; gRPC only", service, path
        )
        return None
    return path


def _remove_stale(d: Path, prefix: str) -> None:
    """Sockets of an earlier process on our port that nothing listens on any more (it was killed)."""
    for p in d.glob(f"{prefix}*.sock"):
        if is_stale(str(p)):
            with contextlib.suppress(OSError):
                p.unlink()


def is_stale(path: str) -> bool:
    """A socket file that nothing listens on."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return True
        except OSError:
            return False
    return False
