"""Token files for services that read a file rather than call the API (Vault Agent's
file sinks): written atomically on every change, with their own mode, owner and group,
and removed or emptied on sign-out.

Formats:
- `raw`: the access token and a newline, for `curl -H @file` style use;
- `json`: the same fields as `GET /v1/token`;
- `env`: `KEY=VALUE` lines for systemd's `EnvironmentFile=` (tokens are plain base64url
  and JWT characters, so no quoting is needed; anything else is refused).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from agent.config import SinkConfig
from agent.fsutil import remove_durably, write_atomic
from agent.logs import fingerprint
from agent.oauth import TokenSet
from agent.state import rfc3339

__all__ = ["TokenFile", "render_sink"]

log = logging.getLogger(__name__)

# What an EnvironmentFile= value may hold without quoting: JWTs, opaque tokens.
_ENV_SAFE = re.compile(r"^[A-Za-z0-9._~+/=-]*$")


def render_sink(fmt: str, tokens: TokenSet, *, expires_at: float | None,
                env_prefix: str = "") -> bytes:
    if fmt == "raw":
        return tokens.access_token.encode() + b"\n"
    if fmt == "json":
        body = {
            "access_token": tokens.access_token,
            "token_type": tokens.token_type,
            "expires_at": None if expires_at is None else rfc3339(expires_at),
            "scope": tokens.scope,
        }
        return json.dumps(body, indent=2).encode() + b"\n"
    if fmt == "env":
        values = {
            "ACCESS_TOKEN": tokens.access_token,
            "TOKEN_TYPE": tokens.token_type,
            "TOKEN_EXPIRES_AT": "" if expires_at is None else str(int(expires_at)),
        }
        lines = []
        for key, value in values.items():
            if not _ENV_SAFE.match(value):
                raise ValueError(f"{key} holds characters an environment file cannot carry")
            lines.append(f"{env_prefix}{key}={value}")
        return ("\n".join(lines) + "\n").encode()
    raise ValueError(f"unknown sink format {fmt!r}")


@dataclass(frozen=True, kw_only=True)
class TokenFile:
    """A configured sink, with its owner and group resolved to ids."""

    sink: SinkConfig
    uid: int | None = None
    gid: int | None = None

    @property
    def path(self) -> Path:
        return self.sink.path

    def write(self, tokens: TokenSet, *, expires_at: float | None) -> None:
        data = render_sink(self.sink.format, tokens, expires_at=expires_at,
                           env_prefix=self.sink.env_prefix)
        # No symlink followed anywhere on the way: a user who owns a parent directory
        # must not be able to point a root agent's chowned write at any other place.
        write_atomic(self.path, data, mode=self.sink.mode, uid=self.uid, gid=self.gid,
                     follow_symlinks=False)
        log.debug("wrote %s (token %s)", self.path, fingerprint(tokens.access_token))

    def clear(self) -> None:
        if self.sink.on_logout == "empty":
            write_atomic(self.path, b"", mode=self.sink.mode, uid=self.uid, gid=self.gid,
                         follow_symlinks=False)
        else:
            remove_durably(self.path, follow_symlinks=False)
