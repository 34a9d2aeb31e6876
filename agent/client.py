"""A small client for the local API, on the standard library only, so that
`device-agent token` starts fast in shell scripts.

It speaks just enough HTTP/1.1 for the agent's JSON answers (one request per
connection, a body framed by Content-Length or chunked): `http.client` would cost a
token read 15 ms of imports (email, ssl) on this machine, ten times that on a Pi Zero.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time

TYPE_CHECKING = False  # not typing's: see agent/cli.py
if TYPE_CHECKING:
    from typing import Any

    # Paths come as strings too: pathlib would cost a token read 3 ms of imports.
    SocketPath = str | os.PathLike[str]

__all__ = ["SERVICE_SOCKET", "AgentNotAllowed", "AgentUnavailable", "ApiAnswer",
           "SocketUntrusted", "call", "check_socket"]

# Where the systemd unit's agent listens (RuntimeDirectory=device-agent), and its user.
SERVICE_SOCKET = "/run/device-agent/agent.sock"
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


def check_socket(path: SocketPath, trusted: set[int] | None = None) -> None:
    """Refuse a socket another local user could have put in place (a planted socket
    would hand scripts an attacker's token): the socket and every directory above it
    belong to a trusted user, and no directory is writable by others unless it is
    sticky (/tmp) and what lies in it belongs to a trusted user. A missing socket
    passes: connecting then says that no agent is running."""
    trusted = trusted_uids() if trusted is None else trusted
    socket_path = os.path.realpath(path)
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
    for directory in _parents(socket_path):
        dst = os.stat(directory)
        if dst.st_uid not in trusted:
            raise SocketUntrusted(f"refusing {socket_path}: {directory} belongs to uid "
                                  f"{dst.st_uid}, who could replace the socket; {fix}")
        open_to_others = dst.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if open_to_others and not (dst.st_mode & stat.S_ISVTX and below in trusted):
            raise SocketUntrusted(f"refusing {socket_path}: {directory} is writable by "
                                  f"other users, who could replace the socket; {fix}")
        below = dst.st_uid


def _parents(path: str) -> list[str]:
    """The directories above an absolute path, nearest first, `/` last: Path.parents."""
    parents = []
    while (parent := os.path.dirname(path)) != path:
        parents.append(parent)
        path = parent
    return parents


class AgentUnavailable(Exception):
    """Nothing listens on the socket (the agent is not running, or another path)."""


class AgentNotAllowed(Exception):
    """The socket exists but this user may not open it."""


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


# An answer larger than this is not one of the agent's: refuse to buffer it.
_MAX_ANSWER = 1 << 20


def call(path: SocketPath, method: str, target: str, *, timeout: float = 30.0) -> ApiAnswer:
    sock = _connect(path, timeout)
    try:
        sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n"
                     "Accept: application/json\r\nConnection: close\r\n"
                     "Content-Length: 0\r\n\r\n".encode("ascii"))
        received = bytearray()
        while len(received) <= _MAX_ANSWER and (chunk := sock.recv(65536)):
            received += chunk
    finally:
        sock.close()
    status, raw = _parse_answer(bytes(received), path)
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {"error": "bad_answer", "message": raw[:200].decode(errors="replace")}
    if not isinstance(body, dict):
        body = {"value": body}
    return ApiAnswer(status, body)


def _connect(path: SocketPath, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except BlockingIOError:
            # The queue of connections the agent has not taken yet is full (a burst of
            # callers): wait for room within the timeout, as a blocking connect would.
            sock.close()
            if time.monotonic() >= deadline:
                raise AgentUnavailable(f"the agent at {path} takes no more connections "
                                       "(its queue stayed full)") from None
            time.sleep(0.005)
            continue
        except BaseException as exc:
            sock.close()
            if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
                raise AgentUnavailable(
                    f"no agent is listening on {path} ({exc.strerror})") from None
            if isinstance(exc, PermissionError):
                raise AgentNotAllowed(
                    f"no permission to open {path}: the socket's group, and api.read_users "
                    "or api.read_groups, decide who may") from None
            raise
        return sock


def _parse_answer(data: bytes, path: SocketPath) -> tuple[int, bytes]:
    """The status and the body of a whole answer (the agent closes after it)."""
    if not data:
        raise AgentUnavailable(f"the agent at {path} closed the connection without an answer")
    broken = AgentUnavailable(f"broken answer from {path}: is it device-agent's socket?")
    head, separator, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if not separator or len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") \
            or not (parts[1].isdigit() and len(parts[1]) == 3):
        raise broken
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = bytearray()
        while True:
            size_line, found, rest = rest.partition(b"\r\n")
            size_text = size_line.split(b";")[0].strip()
            if not found or not size_text or any(c not in b"0123456789abcdefABCDEF"
                                                 for c in size_text):
                raise broken
            size = int(size_text, 16)
            if size == 0:
                return int(parts[1]), bytes(body)
            if len(rest) < size + 2:
                raise broken
            body += rest[:size]
            rest = rest[size + 2:]
    length = headers.get(b"content-length")
    if length is None:
        return int(parts[1]), rest
    if not length.isdigit() or int(length) > len(rest):
        raise broken
    return int(parts[1]), rest[:int(length)]
