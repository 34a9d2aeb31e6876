"""Durable, atomic file replacement for files that hold secrets.

A reader (or the agent after a power cut) sees either the old file or the new one,
never a mixture: the new content goes to a temporary file in the same directory,
reaches the disk (`fsync`), and is then renamed over the old name, and the rename
itself is made durable by syncing the directory. The file never exists, even for an
instant, with more permission bits than asked for.

It also holds the checks every reader of such a file makes: that the file and its
directory are the user's own and closed to others, so that secrets in them have not
been read, and content in them has not been planted, by someone else.

Functions here raise plain `OSError`, and `UnsafeFile` when a check fails; callers
translate both into their own errors.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import re
import secrets
import stat
from pathlib import Path

__all__ = [
    "Problem",
    "UnsafeFile",
    "check_private_directory",
    "fsync_dir",
    "read_private",
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
    fd = open_directory(path)
    try:
        _fsync_dir_fd(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _create_temp(path: Path, mode: int, dir_fd: int) -> tuple[str, int]:
    # O_EXCL + O_NOFOLLOW: never open something another user planted under our name.
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    for attempt in range(_CREATE_ATTEMPTS):
        candidate = temp_path(path).name
        try:
            return candidate, os.open(candidate, flags, mode, dir_fd=dir_fd)
        except FileExistsError:
            if attempt == _CREATE_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


class UnsafeDirectory(OSError):
    """A directory on the way to a file is a symlink, or open to other users."""


def open_directory(directory: Path, *, follow_symlinks: bool = True) -> int:
    """A descriptor of `directory`. Without `follow_symlinks`, every component from /
    down is opened relative to its parent with O_NOFOLLOW, so one swapped for a symlink
    makes this fail (ELOOP/ENOTDIR) and never leads elsewhere; and the directory itself
    must not be writable by everyone (unless sticky). A directory of the user the file
    is for is fine: the file is created anew and renamed in place through the
    descriptor, so nothing they planted there is written through."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    if follow_symlinks:
        return os.open(directory, flags)
    fd = os.open("/", flags)
    try:
        for part in Path(os.path.abspath(directory)).parts[1:]:
            child = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        st = os.fstat(fd)
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise UnsafeDirectory(errno.EPERM, f"{directory} is writable by everyone")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync_dir_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems (certain FUSE and network mounts) cannot sync a directory
        # and say EINVAL; the data itself was synced, which is the best they offer.
        if exc.errno != errno.EINVAL:
            raise


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, uid: int | None = None,
                 gid: int | None = None, follow_symlinks: bool = True) -> None:
    """Replace `path` with `data`, atomically and durably, as a file of exactly `mode`.

    On any failure the temporary file is removed and the old `path` is left as it was
    (unless the failure is in the final directory sync, after the rename took effect).
    `uid`/`gid` (either may be None to keep it) give the file away via `fchown`.
    Without `follow_symlinks`, no symlink anywhere in the path is followed and the
    directory is checked (`open_directory`): for files written for other users.
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
    dir_fd = open_directory(path.parent, follow_symlinks=follow_symlinks)
    try:
        tmp, fd = _create_temp(path, birth_mode, dir_fd)
        try:
            try:
                if changes_owner:
                    os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
                # Only ever widens, to the caller's exact mode: the umask may have
                # dropped bits the caller asked for, and chown clears set-id bits.
                if os.fstat(fd).st_mode & 0o7777 != mode:
                    os.fchmod(fd, mode)
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        _fsync_dir_fd(dir_fd)
    finally:
        os.close(dir_fd)


def remove_durably(path: Path, *, follow_symlinks: bool = True) -> bool:
    """Unlink `path` and sync its directory; False when there was nothing to remove."""
    try:
        dir_fd = open_directory(path.parent, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        return False
    try:
        try:
            os.unlink(path.name, dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        _fsync_dir_fd(dir_fd)
        return True
    finally:
        os.close(dir_fd)


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


# -- safety checks for reading -----------------------------------------------------


class Problem(enum.Enum):
    """Why `UnsafeFile` was raised."""

    SYMLINK = "is a symbolic link"
    NOT_A_DIRECTORY = "is not a directory"
    NOT_REGULAR = "is not a regular file"
    OTHER_OWNER = "belongs to another user"
    # For a file: readable or writable by group or others. For a directory: writable
    # by them (they could swap the file); merely readable is fine, the file is 0600.
    OPEN_TO_OTHERS = "is open to other users"
    TOO_LARGE = "is too large"


class UnsafeFile(Exception):
    """`path` failed a safety check. `st` is what was found, so that the caller can
    name the mode or owner in its own words."""

    def __init__(self, path: Path, problem: Problem, st: os.stat_result) -> None:
        self.path = path
        self.problem = problem
        self.st = st
        super().__init__(f"{path} {problem.value}")


def check_private_directory(directory: Path) -> bool:
    """False when `directory` does not exist; raises UnsafeFile when it is no directory,
    belongs to another user or others can write to it, OSError when it cannot be
    inspected."""
    try:
        # Followed on purpose: systemd's StateDirectory= with DynamicUser= is a
        # symlink into /var/lib/private, and the target is what must be safe.
        st = os.stat(directory)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeFile(directory, Problem.NOT_A_DIRECTORY, st)
    if st.st_uid != os.geteuid():
        raise UnsafeFile(directory, Problem.OTHER_OWNER, st)
    # Checked from the mode bits, not os.access(): root passes every access check.
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeFile(directory, Problem.OPEN_TO_OTHERS, st)
    return True


def read_private(path: Path, max_size: int) -> bytes | None:
    """The content of `path`, or None when there is no such file.

    Raises UnsafeFile when it is a symlink, not a regular file, owned by another user,
    readable or writable by others, or longer than `max_size` bytes; OSError for other
    trouble. Nothing of the content is read before the checks pass.
    """
    try:
        # O_NOFOLLOW: a symlink would be read here but replaced by write_atomic, and may
        # point at a file of someone else. O_NONBLOCK: a FIFO must not hang us.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        # A symlink fails with ELOOP; a file of another user may fail with EACCES and is
        # unsafe whatever its mode. Other trouble is the caller's to report.
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise UnsafeFile(path, Problem.SYMLINK, st) from None
        if st is not None and st.st_uid != os.geteuid():
            raise UnsafeFile(path, Problem.OTHER_OWNER, st) from None
        raise
    try:
        # Checked on the open descriptor, so the file cannot be swapped in between.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(path, Problem.NOT_REGULAR, st)
        if st.st_uid != os.geteuid():
            raise UnsafeFile(path, Problem.OTHER_OWNER, st)
        if st.st_mode & (stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH):
            raise UnsafeFile(path, Problem.OPEN_TO_OTHERS, st)
        if st.st_size > max_size:
            raise UnsafeFile(path, Problem.TOO_LARGE, st)
        chunks: list[bytes] = []
        total = 0
        # Bounded again while reading: the file may grow after the fstat.
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_size:
                raise UnsafeFile(path, Problem.TOO_LARGE, st)
        return b"".join(chunks)
    finally:
        os.close(fd)


# File systems whose content does not survive a power cut (or, for overlay, usually
# sits on one that does not: a read-only root with a RAM upper layer).
VOLATILE_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "overlay", "zram"})


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The type of the file system `path` lives on, from /proc/self/mountinfo
    (proc(5)); None when it cannot be told."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text(encoding="utf-8",
                                                               errors="replace")
        except OSError:
            return None
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        # Octal escapes (\040 for a space) as the kernel writes them.
        mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        # The last of equal mount points wins: it is the one stacked on top.
        if inside and (best is None or len(mount_point) >= best[0]):
            best = (len(mount_point), right.split()[0])
    return best[1] if best else None
