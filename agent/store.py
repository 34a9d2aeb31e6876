"""The credential file: the refresh token that keeps this device signed in.

Losing the file means someone walks to the device to sign it in again; leaking it
means someone else can act as the device. Hence:

- writes replace the file atomically and durably (`agent.fsutil.write_atomic`), so a
  power cut or a kill leaves the old file or the new one, never a torn one;
- the file is born 0600 and a file open to other users, or owned by someone else, is
  refused rather than used (its token must be presumed copied);
- the directory must not be writable by others, who could swap the file;
- an exclusive `flock` on a lock file beside it keeps a second agent from writing
  over the first (a rotated refresh token lost that way is a dead sign-in);
- a file that does not parse is reported and left in place for a person to inspect;
- with a store key delivered (`agent.sealing`), the tokens are sealed: the file shows
  whom they are for and when they expire, and binds all of it to them. A sealed file
  is never rewritten in plain text: without its key it is refused (StoreKeyMissing),
  not moved aside. A plain one found with a key is the caller's to seal
  (`needs_sealing`).

No message raised or logged here quotes the file's content.

The methods block on disk I/O; the driver calls them through `asyncio.to_thread`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from agent.errors import (
    StoreCorrupt,
    StoreError,
    StoreInsecure,
    StoreKeyMissing,
    StoreLocked,
    StoreTooNew,
    StoreUnsealable,
)
from agent.fsutil import (
    VOLATILE_FILESYSTEMS,
    Problem,
    UnsafeFile,
    check_private_directory,
    filesystem_type,
    fsync_dir,
    read_private,
    remove_durably,
    remove_stale_temps,
    write_atomic,
)
from agent.oauth.models import TokenSet
from agent.sealing import Encryption, Location, is_sealed

__all__ = ["FORMAT_VERSION", "SEALED_FORMAT_VERSION", "CredentialStore", "Credentials"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped when a change would make an older agent misread the file."""
SEALED_FORMAT_VERSION = 2
"""A sealed file: an agent from before sealing refuses it as newer (and leaves it
alone), where it would have moved aside a file whose tokens it cannot find."""

# Corrupt credential files moved aside and kept for a person to look at.
_CORRUPT_COPIES = 3
_MAX_FILE_SIZE = 1 << 20  # far beyond any real token set; refuses to slurp a wrong file
_FILE_MODE = 0o600
_DIR_MODE = 0o700
_PARENT_MODE = 0o755
_PURPOSE = "device-agent credentials"
_ASIDE_PURPOSE = "device-agent credentials moved aside"
_SECRETS: tuple[Location, ...] = (("tokens", "access_token"), ("tokens", "refresh_token"),
                                  ("tokens", "id_token"))


@dataclass(frozen=True, kw_only=True)
class Credentials:
    """What the store keeps: the tokens and whom they were issued to and by.

    `issuer` lets the agent discard tokens of another provider when the config
    changes; `claims` (sub, name, preferred_username, email) only label screens.
    """

    tokens: TokenSet
    client_id: str
    issuer: str | None
    # Left out of the hash (a dict is unhashable); equality still compares it.
    claims: Mapping[str, str] = field(default_factory=dict, hash=False)
    # /etc/machine-id of the device that signed in: a cloned SD card image carries the
    # file to other devices, which must sign in on their own rather than fight over one
    # rotating refresh token. None in files from before it was written.
    machine_id: str | None = None


class CredentialStore:
    """The credential file at `path`, guarded by `<name>.lock` beside it.

    `open()` (or `with`) checks the directory and takes the lock; `save()` and
    `clear()` need it. `load()` works without it: the atomic rename means a reader
    never sees a half-written file. `encryption` says whether the tokens are sealed
    (the default: never, and a sealed file is refused).
    """

    def __init__(self, path: Path, *, encryption: Encryption | None = None) -> None:
        self._path = Path(path)
        self._lock_path = self._path.with_name(self._path.name + ".lock")
        self._lock_fd: int | None = None
        self._encryption = encryption if encryption is not None else Encryption("off")
        self.needs_sealing = False
        """The last load() read a plain file while a key is delivered: save() seals it."""

    @property
    def path(self) -> Path:
        return self._path

    @property
    def encryption(self) -> Encryption:
        """Shared with the session file beside this one: one decision for both."""
        return self._encryption

    # -- lifecycle -------------------------------------------------------------

    def open(self) -> None:
        """Create and check the directory, take the lock, clear a crash's leftovers.

        Raises ConfigError when storage.encryption cannot be had (no key though it is
        required, a key without `cryptography`), before anything is created;
        StoreInsecure for a directory others can write to or that belongs to another
        user, StoreLocked when another process holds the lock, StoreError for other
        I/O trouble. Opening an open store does nothing.
        """
        if self._lock_fd is not None:
            return
        self._encryption.sealer()
        directory = self._path.parent
        try:
            _make_directory(directory)
        except OSError as exc:
            raise StoreError(f"cannot create {directory}: {_reason(exc)}") from None
        if not self._check_directory():
            raise StoreError(f"{directory} disappeared while being opened")
        self._lock_fd = self._lock()
        try:
            removed = remove_stale_temps(self._path)
        except OSError as exc:
            self.close()
            raise StoreError(f"cannot clean up {directory}: {_reason(exc)}") from None
        if removed:
            log.warning("removed %d temporary file(s) an interrupted write left in %s",
                        removed, directory)
        kind = filesystem_type(directory)
        if kind in VOLATILE_FILESYSTEMS:
            log.warning("%s is on %s: the sign-in is lost at every power cut and a person "
                        "must sign the device in again; set storage.path to persistent "
                        "storage (e.g. /var/lib/device-agent)", directory, kind)

    def close(self) -> None:
        """Release the lock. The lock file stays: removing it would let a process that
        already opened it and one that creates a new one both think they hold it."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _check_directory(self) -> bool:
        """False when the directory does not exist; raises when it is unsafe."""
        directory = self._path.parent
        try:
            return check_private_directory(directory)
        except OSError as exc:
            raise StoreError(f"cannot inspect {directory}: {_reason(exc)}") from None
        except UnsafeFile as unsafe:
            st = unsafe.st
            euid = os.geteuid()
            if unsafe.problem is Problem.OTHER_OWNER:
                raise StoreInsecure(
                    f"{directory} belongs to uid {st.st_uid}, not to this user (uid {euid}); "
                    f"fix: chown {euid} {directory}") from None
            if unsafe.problem is Problem.OPEN_TO_OTHERS:
                raise StoreInsecure(
                    f"{directory} is writable by other users (mode {_mode(st.st_mode)}), who "
                    f"could replace the credentials; fix: chmod go-w {directory}") from None
            raise StoreError(f"{directory} {unsafe.problem.value}") from None

    def _lock(self) -> int:
        try:
            fd = os.open(self._lock_path,
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _FILE_MODE)
        except OSError as exc:
            raise StoreError(f"cannot open lock file {self._lock_path}: {_reason(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(
                f"{self._path} is in use: another device-agent is running with this "
                f"credential store (it holds {self._lock_path})") from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {self._lock_path}: {_reason(exc)}") from None
        return fd

    def _require_lock(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError(f"credential store {self._path} is not open")

    # -- content ---------------------------------------------------------------

    def load(self) -> Credentials | None:
        """The stored credentials, or None when there is no file.

        Raises StoreInsecure for a file others can read or write, one owned by another
        user, or a symbolic link; StoreCorrupt for one that does not parse or lacks a
        field, StoreUnsealable (a StoreCorrupt) for a sealed one the key delivered does
        not open; StoreTooNew for one from a newer format version, StoreKeyMissing for
        a sealed one without a key (left in place in every case: `quarantine` moves a
        corrupt one aside).
        """
        self.needs_sealing = False
        if not self._check_directory():
            return None
        data = self._read()
        if data is None:
            return None
        try:
            document = json.loads(data)
        # ValueError covers JSONDecodeError and UnicodeDecodeError; RecursionError is
        # absurdly deep nesting.
        except (ValueError, RecursionError):
            raise StoreCorrupt(f"{self._path} is not valid JSON") from None
        path, sealer = self._path, self._encryption.sealer()
        version = _version(document, path)
        sealed = is_sealed(document)
        if sealed:
            if sealer is None:
                raise StoreKeyMissing(f"{path} is sealed, and is kept as it is: "
                                      f"{self._encryption.why_no_key()}")
            if version != SEALED_FORMAT_VERSION:
                raise StoreCorrupt(f"{path} is not a valid credential file: it is sealed, "
                                   f"but its version is not {SEALED_FORMAT_VERSION}")
            try:
                document = sealer.unseal(document, purpose=_PURPOSE)
            except StoreUnsealable as exc:
                raise StoreUnsealable(f"{path} {exc}") from None
        elif version == SEALED_FORMAT_VERSION:
            raise StoreCorrupt(f"{path} is not a valid credential file: version "
                               f"{SEALED_FORMAT_VERSION} is sealed, and it has no sealed part")
        credentials = _decode(document, path)
        self.needs_sealing = sealer is not None and not sealed
        return credentials

    def _read(self) -> bytes | None:
        path = self._path
        try:
            return read_private(path, _MAX_FILE_SIZE)
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {_reason(exc)}") from None
        except UnsafeFile as unsafe:
            raise self._refusal(unsafe) from None

    def _refusal(self, unsafe: UnsafeFile) -> StoreError:
        path, st, problem = self._path, unsafe.st, unsafe.problem
        euid = os.geteuid()
        if problem is Problem.SYMLINK:
            return StoreInsecure(
                f"{path} is a symbolic link; the credentials must be a regular file "
                f"(fix: replace it with the file it points to)")
        if problem is Problem.OTHER_OWNER:
            return StoreInsecure(
                f"{path} belongs to uid {st.st_uid}, not to this user (uid {euid}); "
                f"its tokens may be known to others: fix: chown {euid} {path}, "
                f"or sign in again after deleting it")
        if problem is Problem.OPEN_TO_OTHERS:
            return StoreInsecure(
                f"{path} is open to other users (mode {_mode(st.st_mode)}); "
                f"fix: chmod 600 {path}, and consider signing in again if others "
                f"may have read it")
        if problem is Problem.TOO_LARGE:
            return StoreCorrupt(f"{path} is too large (over {_MAX_FILE_SIZE} bytes) to be "
                                f"a credential file")
        return StoreCorrupt(f"{path} {problem.value}")

    def save(self, credentials: Credentials) -> None:
        """Replace the file with `credentials`, atomically, durably, mode 0600.

        When this returns, the credentials survive a power cut. Raises StoreError
        (naming the path and the OS reason) when the disk refuses.
        """
        self._require_lock()
        document = _encode(credentials)
        sealer = self._encryption.sealer()
        if sealer is not None:
            document["version"] = SEALED_FORMAT_VERSION
            document = sealer.seal(document, _SECRETS, purpose=_PURPOSE)
        # ensure_ascii=False keeps names in claims legible to a person reading the file.
        data = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        try:
            # backslashreplace: a lone surrogate in a provider's claim becomes its JSON
            # escape (read back as the same string), never an exception that loses
            # freshly rotated tokens.
            write_atomic(self._path, data.encode("utf-8", "backslashreplace"), mode=_FILE_MODE)
        except OSError as exc:
            raise StoreError(f"cannot write {self._path}: {_reason(exc)}") from None
        self.needs_sealing = False

    def quarantine(self, *, stamp: str) -> Path | None:
        """Move a corrupt file aside as `<name>.corrupt-<stamp>`, never deleting it (a
        person may want to look), and keep only the newest few such copies. Returns
        where it went, or None when there was no file.

        With a key delivered, a file that is not sealed goes aside sealed: what is left
        of a plain file's tokens must not stay readable beside the sealed store."""
        self._require_lock()
        directory = self._path.parent
        target = self._path.with_name(f"{self._path.name}.corrupt-{stamp}")
        try:
            if not self._seal_aside(target):
                os.rename(self._path, target)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot move {self._path} aside: {_reason(exc)}") from None
        try:
            copies = sorted(directory.glob(f"{self._path.name}.corrupt-*"))
            for old in copies[:-_CORRUPT_COPIES]:
                old.unlink()
            fsync_dir(directory)
        except OSError as exc:
            log.warning("cleaning up old corrupt copies in %s: %s", directory, _reason(exc))
        return target

    def _seal_aside(self, target: Path) -> bool:
        """Write a sealed copy of the file at `target` and remove the file; False when it
        is to be moved as it is (no key, or sealed already). Raises OSError."""
        sealer = self._encryption.sealer()
        if sealer is None:
            return False
        try:
            data = read_private(self._path, _MAX_FILE_SIZE)
        except UnsafeFile:
            return False  # too large to be tokens, or not a file: moved as it is
        if data is None:
            raise FileNotFoundError(self._path)
        try:
            if is_sealed(json.loads(data)):
                return False
        except (ValueError, RecursionError):
            pass
        aside = sealer.seal({"version": SEALED_FORMAT_VERSION,
                             "content": base64.b64encode(data).decode("ascii")},
                            [("content",)], purpose=_ASIDE_PURPOSE)
        write_atomic(target, json.dumps(aside, indent=2).encode("ascii") + b"\n",
                     mode=_FILE_MODE)
        remove_durably(self._path)
        return True

    def clear(self) -> None:
        """Remove the file durably (logout). Clearing an absent file is fine."""
        self._require_lock()
        try:
            remove_durably(self._path)
        except OSError as exc:
            raise StoreError(f"cannot remove {self._path}: {_reason(exc)}") from None


# -- the format ------------------------------------------------------------------
#
# {
#   "version": 1,
#   "client_id": "...", "issuer": "..." | null, "claims": {"name": "...", ...},
#   "machine_id": "<32 hex digits>" | null,
#   "tokens": {"access_token": "...", "token_type": "Bearer", "issued_at": 1700000000.0,
#              "expires_at": 1700000300.0 | null, "refresh_token": "..." | null,
#              "id_token": "..." | null, "scope": "..." | null}
# }
#
# Every key is written and every key is required on reading: a missing expires_at, say,
# must not quietly become "never expires". Unknown keys are ignored. The one exception is
# "machine_id", added later in version 1: a file without it is from before, and is read.
#
# Sealed (version 2): the three tokens are not in "tokens" but in
#   "sealed": {"cipher": "ChaCha20-Poly1305", "key_id": "...", "nonce": "...",
#              "ciphertext": "..."}
# and every other value is bound to them (agent.sealing), unknown keys included.


def _encode(credentials: Credentials) -> dict[str, Any]:
    tokens = credentials.tokens
    return {
        "version": FORMAT_VERSION,
        "client_id": credentials.client_id,
        "issuer": credentials.issuer,
        "claims": dict(credentials.claims),
        "machine_id": credentials.machine_id,
        "tokens": {
            "access_token": tokens.access_token,
            "token_type": tokens.token_type,
            "issued_at": tokens.issued_at,
            "expires_at": tokens.expires_at,
            "refresh_token": tokens.refresh_token,
            "id_token": tokens.id_token,
            "scope": tokens.scope,
        },
    }


class _Fields:
    """Typed access to one JSON object; every complaint names the field, never its
    value, which may be a token."""

    def __init__(self, obj: object, where: str, path: Path) -> None:
        self._path = path
        self._where = where
        if not isinstance(obj, dict):
            raise self._corrupt(f"{where or 'the document'} is not a JSON object")
        self._obj: dict[str, object] = obj

    def _corrupt(self, what: str) -> StoreCorrupt:
        return StoreCorrupt(f"{self._path} is not a valid credential file: {what}")

    def raw(self, key: str) -> object:
        if key not in self._obj:
            raise self._corrupt(f"{self._where}{key} is missing")
        return self._obj[key]

    def text(self, key: str) -> str:
        value = self.raw(key)
        if not isinstance(value, str) or not value:
            raise self._corrupt(f"{self._where}{key} is not a non-empty string")
        return value

    def text_if_present(self, key: str) -> str | None:
        """For keys added after version 1 was first written: absent is None."""
        if key not in self._obj:
            return None
        return self.optional_text(key)

    def optional_text(self, key: str) -> str | None:
        value = self.raw(key)
        if value is not None and not isinstance(value, str):
            raise self._corrupt(f"{self._where}{key} is neither a string nor null")
        return value

    @staticmethod
    def _finite(value: object) -> float | None:
        # bool is an int to Python, but `true` is no time.
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        try:
            number = float(value)
        except OverflowError:  # JSON integers are unbounded: 1 followed by 400 zeros
            return None
        return number if math.isfinite(number) else None

    def number(self, key: str) -> float:
        number = self._finite(self.raw(key))
        if number is None:
            raise self._corrupt(f"{self._where}{key} is not a number")
        return number

    def optional_number(self, key: str) -> float | None:
        value = self.raw(key)
        if value is None:
            return None
        number = self._finite(value)
        if number is None:
            raise self._corrupt(f"{self._where}{key} is neither a number nor null")
        return number

    def text_map(self, key: str) -> dict[str, str]:
        value = self.raw(key)
        if not isinstance(value, dict) or not all(
                isinstance(v, str) for v in value.values()):
            raise self._corrupt(f"{self._where}{key} is not an object of strings")
        return dict(value)

    def child(self, key: str) -> _Fields:
        return _Fields(self.raw(key), f"{self._where}{key}.", self._path)


def _version(document: object, path: Path) -> int:
    version = _Fields(document, "", path).raw("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise StoreCorrupt(f"{path} is not a valid credential file: version is not a "
                           f"positive integer")
    if version > SEALED_FORMAT_VERSION:
        raise StoreTooNew(
            f"{path} was written by a newer device-agent (format version {version}; this "
            f"one reads versions up to {SEALED_FORMAT_VERSION}); upgrade device-agent, or "
            f"delete the file and sign in again")
    return version


def _decode(document: object, path: Path) -> Credentials:
    top = _Fields(document, "", path)
    _version(document, path)
    tokens = top.child("tokens")
    return Credentials(
        tokens=TokenSet(
            access_token=tokens.text("access_token"),
            token_type=tokens.text("token_type"),
            issued_at=tokens.number("issued_at"),
            expires_at=tokens.optional_number("expires_at"),
            refresh_token=tokens.optional_text("refresh_token"),
            id_token=tokens.optional_text("id_token"),
            scope=tokens.optional_text("scope"),
        ),
        client_id=top.text("client_id"),
        issuer=top.optional_text("issuer"),
        claims=top.text_map("claims"),
        machine_id=top.text_if_present("machine_id"),
    )


def _make_directory(directory: Path) -> None:
    """Create `directory` 0700 and any missing parents 0755 (the umask may narrow these,
    never widen them): a parent writable by others would let them move the whole
    directory aside."""
    missing = []
    for candidate in (directory, *directory.parents):
        if os.path.lexists(candidate):
            break
        missing.append(candidate)
    for candidate in reversed(missing):
        # Another process may make it meanwhile; it is then checked like any other.
        with contextlib.suppress(FileExistsError):
            os.mkdir(candidate, _DIR_MODE if candidate == directory else _PARENT_MODE)


def _reason(exc: OSError) -> str:
    # strerror alone: str(exc) repeats the file name, which the caller already gives.
    return exc.strerror or type(exc).__name__


def _mode(st_mode: int) -> str:
    return f"{stat.S_IMODE(st_mode):04o}"

