"""Durable, atomic file replacement for files that hold secrets.

A reader (or the agent after a power cut) sees either the old file or the new one,
never a mixture: the new content goes to a temporary file in the same directory,
reaches the disk (`fsync`), and is then renamed over the old name, and the rename
itself is made durable by syncing the directory. The file never exists, even for an
instant, with more permission bits than asked for.

Functions here raise plain `OSError`; callers translate it into their own errors.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from pathlib import Path

__all__ = [
    "fsync_dir",
    "remove_durably",
    "remove_stale_temps",
    "temp_path",
    "write_atomic",
]

_TEMP_SUFFIX = ".tmp"
_TEMP_TOKEN_BYTES = 8
_CREATE_ATTEMPTS = 4


def temp_path(path: Path) -> Path:
    """A fresh, unpredictable sibling name for a temporary copy of `path`.

    Hidden (leading dot) so that globbing for the real files skips it, and shaped so
    that `remove_stale_temps` recognises exactly these names and nothing else.
    """
    return path.with_name(f".{path.name}.{secrets.token_hex(_TEMP_TOKEN_BYTES)}{_TEMP_SUFFIX}")


def _temp_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(
        rf"\.{re.escape(path.name)}\.[0-9a-f]{{{2 * _TEMP_TOKEN_BYTES}}}{re.escape(_TEMP_SUFFIX)}"
    )


def fsync_dir(path: Path) -> None:
    """Make the creations, renames and removals in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems (certain FUSE and network mounts) cannot sync a directory
        # and say EINVAL; the data itself was synced, which is the best they offer.
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _create_temp(path: Path, mode: int) -> tuple[Path, int]:
    # O_EXCL + O_NOFOLLOW: never open something another user planted under our name.
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    for attempt in range(_CREATE_ATTEMPTS):
        candidate = temp_path(path)
        try:
            return candidate, os.open(candidate, flags, mode)
        except FileExistsError:
            if attempt == _CREATE_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, uid: int | None = None,
                 gid: int | None = None) -> None:
    """Replace `path` with `data`, atomically and durably, as a file of exactly `mode`.

    On any failure the temporary file is removed and the old `path` is left as it was
    (unless the failure is in the final directory sync, after the rename took effect).
    `uid`/`gid` (either may be None to keep it) give the file away via `fchown`.
    """
    mode &= 0o7777
    changes_owner = uid is not None or gid is not None
    # The umask is process-wide and other threads create files too, so it is never
    # touched; the mode argument of open() can only be narrowed by it, never widened,
    # so the temporary file is born with at most `mode`. When it changes hands, it is
    # born owner-only: permission is checked at open(), so a member of our own group
    # could otherwise open the still-empty file before fchown moves it to the target
    # group, and keep reading through that descriptor once the data is in.
    birth_mode = mode & 0o700 if changes_owner else mode
    tmp, fd = _create_temp(path, birth_mode)
    try:
        try:
            if changes_owner:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            # Only ever widens, to the caller's exact mode: the umask may have dropped
            # bits the caller asked for, and chown clears set-id bits.
            if os.fstat(fd).st_mode & 0o7777 != mode:
                os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def remove_durably(path: Path) -> bool:
    """Unlink `path` and sync its directory; False when there was nothing to remove."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def remove_stale_temps(path: Path) -> int:
    """Remove the temporary files `write_atomic` left beside `path` when a writer died
    between creating and renaming them; returns how many were removed.

    Call only while no other process may be writing `path` (the caller holds its lock):
    a live writer's temporary file looks exactly like a stale one.
    """
    pattern = _temp_pattern(path)
    removed = 0
    with os.scandir(path.parent) as entries:
        names = [entry.name for entry in entries
                 if pattern.fullmatch(entry.name) and not entry.is_dir(follow_symlinks=False)]
    for name in names:
        try:
            os.unlink(path.parent / name)
        except FileNotFoundError:
            continue
        removed += 1
    if removed:
        fsync_dir(path.parent)
    return removed
