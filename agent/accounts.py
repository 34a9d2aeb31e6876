"""User and group names as the config writes them: a name, or a numeric id."""

from __future__ import annotations

import grp
import pwd

__all__ = ["group_id", "user_id"]


def user_id(name: str) -> int:
    """The uid for `name`; KeyError when there is no such user."""
    return int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid


def group_id(name: str) -> int:
    """The gid for `name`; KeyError when there is no such group."""
    return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
