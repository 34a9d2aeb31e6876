"""A small client for the local API, on the standard library only, so that
`device-agent token` starts fast in shell scripts (no aiohttp import)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

__all__ = ["SERVICE_SOCKET", "AgentNotAllowed", "AgentUnavailable", "ApiAnswer",
           "SocketUntrusted", "call", "check_socket"]

# Where the systemd unit's agent listens (RuntimeDirectory=device-agent), and its user.
SERVICE_SOCKET = Path("/run/device-agent/agent.sock")
SERVICE_USER = "device-agent"


class SocketUntrusted(Exception):
    """The socket, or a directory above it, is in the hands of another local user, who
    could be serving fake tokens there."""


def trusted_uids() -> set[int]:
    """Root, this user, and the service's user: the only ones whose socket we talk to."""
    uids = {0, os.getuid()}
    try:
        import pwd

        uids.add(pwd.getpwnam(SERVICE_USER).pw_uid)
    except (KeyError, ImportError):
        pass
    return uids


def check_socket(path: Path, trusted: set[int] | None = None) -> None:
    """Refuse a socket another local user could have put in place (a planted socket
    would hand scripts an attacker's token): the socket and every directory above it
    belong to a trusted user, and no directory is writable by others unless it is
    sticky (/tmp) and what lies in it belongs to a trusted user. A missing socket
    passes: connecting then says that no agent is running."""
    trusted = trusted_uids() if trusted is None else trusted
    socket_path = Path(os.path.realpath(path))
    try:
        st = os.lstat(socket_path)
    except FileNotFoundError:
        return
    fix = ("use the agent's own socket (--socket or DEVICE_AGENT_SOCKET) in a directory "
           "that only root, you or the device-agent user can write")
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketUntrusted(f"{socket_path} is not a socket; {fix}")
    if st.st_uid not in trusted:
        raise SocketUntrusted(f"refusing {socket_path}: it belongs to uid {st.st_uid}, "
                              f"who could serve fake tokens; {fix}")
    below = st.st_uid
    for directory in socket_path.parents:
        dst = os.stat(directory)
        if dst.st_uid not in trusted:
            raise SocketUntrusted(f"refusing {socket_path}: {directory} belongs to uid "
                                  f"{dst.st_uid}, who could replace the socket; {fix}")
        open_to_others = dst.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if open_to_others and not (dst.st_mode & stat.S_ISVTX and below in trusted):
            raise SocketUntrusted(f"refusing {socket_path}: {directory} is writable by "
                                  f"other users, who could replace the socket; {fix}")
        below = dst.st_uid


class AgentUnavailable(Exception):
    """Nothing listens on the socket (the agent is not running, or another path)."""


class AgentNotAllowed(Exception):
    """The socket exists but this user may not open it."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ApiAnswer:
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error(self) -> str:
        return str(self.body.get("error", f"http_{self.status}"))

    @property
    def message(self) -> str:
        return str(self.body.get("message", self.error))


def call(path: Path, method: str, target: str, *, timeout: float = 30.0) -> ApiAnswer:
    connection = _UnixConnection(path, timeout)
    try:
        try:
            connection.request(method, target, headers={"Accept": "application/json"})
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentUnavailable(f"no agent is listening on {path} ({exc.strerror})") from None
        except PermissionError:
            raise AgentNotAllowed(
                f"no permission to open {path}: the socket's group, and api.read_users or "
                "api.read_groups, decide who may") from None
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {"error": "bad_answer", "message": raw[:200].decode(errors="replace")}
    if not isinstance(body, dict):
        body = {"value": body}
    return ApiAnswer(response.status, body)
