"""Where things live by default, from the environment. Standard library only, and no
pathlib at import: the token-reading CLI imports it without paying for the config
module or for pathlib, and works on the strings."""

from __future__ import annotations

import os

TYPE_CHECKING = False  # not typing's: see agent/cli.py
if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["APP_NAME", "default_socket_path", "default_state_path", "socket_location",
           "tidy"]

APP_NAME = "device-agent"


def tidy(path: str) -> str:
    """`path` as pathlib writes it (`str(PurePosixPath(path))`): no trailing slash, no
    repeated `/` or `.` parts; `..` kept, as it may cross a symlink."""
    lead = "//" if path.startswith("//") and not path.startswith("///") else (
        "/" if path.startswith("/") else "")
    body = "/".join(part for part in path.split("/") if part not in ("", "."))
    return lead + body if lead or body else "."


def _env_dir(name: str) -> str | None:
    """First entry of a directory variable. systemd joins several `StateDirectory=`
    entries with colons; the XDG spec says relative values are invalid and ignored."""
    first = os.environ.get(name, "").split(":", 1)[0]
    return first if first and os.path.isabs(first) else None


def default_state_path() -> Path:
    """$STATE_DIRECTORY/credentials.json under systemd, else the XDG state directory."""
    from pathlib import Path

    state_dir = _env_dir("STATE_DIRECTORY")
    if state_dir is not None:
        return Path(state_dir) / "credentials.json"
    xdg = _env_dir("XDG_STATE_HOME")
    base = Path(xdg) if xdg is not None else Path.home() / ".local" / "state"
    return base / APP_NAME / "credentials.json"


def socket_location() -> str:
    """$RUNTIME_DIRECTORY/agent.sock under systemd, else the per-user runtime directory.

    The CLI falls back to this when it has no config, so `device-agent token` finds the
    demo and a per-user agent without flags (and checks the directory before use)."""
    runtime_dir = _env_dir("RUNTIME_DIRECTORY")
    if runtime_dir is not None:
        return tidy(f"{runtime_dir}/agent.sock")
    xdg = _env_dir("XDG_RUNTIME_DIR")
    if xdg is not None:
        return tidy(f"{xdg}/{APP_NAME}/agent.sock")
    return f"/tmp/{APP_NAME}-{os.getuid()}/agent.sock"


def default_socket_path() -> Path:
    """`socket_location()`, for the config."""
    from pathlib import Path

    return Path(socket_location())
