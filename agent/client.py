"""A small client for the local API, on the standard library only, so that
`device-agent token` starts fast in shell scripts (no aiohttp import)."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

__all__ = ["AgentNotAllowed", "AgentUnavailable", "ApiAnswer", "call"]


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
