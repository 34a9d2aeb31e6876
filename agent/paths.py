"""Where things live by default, from the environment. Standard library only: the
token-reading CLI imports it without paying for the config module."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["APP_NAME", "default_socket_path", "default_state_path", "env_dir"]

APP_NAME = "device-agent"


def env_dir(name: str) -> Path | None:
    """First entry of a directory variable. systemd joins several `StateDirectory=`
    entries with colons; the XDG spec says relative values are invalid and ignored."""
    first = os.environ.get(name, "").split(":", 1)[0]
    return Path(first) if first and os.path.isabs(first) else None


def default_state_path() -> Path:
    """$STATE_DIRECTORY/credentials.json under systemd, else the XDG state directory."""
    state_dir = env_dir("STATE_DIRECTORY")
    if state_dir is not None:
        return state_dir / "credentials.json"
    xdg = env_dir("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return xdg / APP_NAME / "credentials.json"


def default_socket_path() -> Path:
    """$RUNTIME_DIRECTORY/agent.sock under systemd, else the per-user runtime directory.

    The CLI falls back to this when it has no config, so `device-agent token` finds the
    demo and a per-user agent without flags (and checks the directory before use)."""
    runtime_dir = env_dir("RUNTIME_DIRECTORY")
    if runtime_dir is not None:
        return runtime_dir / "agent.sock"
    xdg = env_dir("XDG_RUNTIME_DIR")
    if xdg is not None:
        return xdg / APP_NAME / "agent.sock"
    return Path("/tmp") / f"{APP_NAME}-{os.getuid()}" / "agent.sock"
