"""The session file: what the agent must remember across restarts besides its tokens.

A restart must not undo the sign-in lifecycle. Under systemd's Restart= a crash loop
would otherwise ask the provider for a fresh device code on every start and spend its
per-address budget; a person halfway through approving a code would see it replaced;
a logout whose revocations failed would never retry them. So the code budget, the
throttle, the code on screen and the revocations still owed are kept here.

It holds secrets (a device code, tokens to revoke), so it is kept like the credential
file: born 0600, replaced atomically and durably (`agent.fsutil.write_atomic`), never
read through a symlink, size-capped. It is written only while the CredentialStore lock
is held; the caller guarantees that, and this module takes no lock of its own.

Unlike the credential file, a damaged session file is not kept for a person to look
at: losing it costs little (a code, a throttle), refusing to start costs the device.
`load()` reports what is wrong in one warning and returns an empty record, which the
caller's next `save()` writes over it. No message quotes the file's content.

With a store key delivered, the device code and the tokens owed a revocation are sealed
as the credential file's tokens are (`agent.sealing`, the same decision). One that was
sealed with another key, or altered, is damaged like any other. One found without a key
is the exception to "never fatal": rewriting it would put what it owes in plain text,
or lose it, so it is refused (StoreKeyMissing) and kept.

The methods block on disk I/O; call them through `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import StoreError, StoreKeyMissing, StoreUnsealable
from agent.fsutil import (
    Problem,
    UnsafeFile,
    check_private_directory,
    read_private,
    remove_stale_temps,
    write_atomic,
)
from agent.sealing import Encryption, Location, is_sealed

__all__ = [
    "FORMAT_VERSION",
    "MAX_CODES_SPENT",
    "MAX_PENDING_REVOCATIONS",
    "MAX_TEXT_LENGTH",
    "SEALED_FORMAT_VERSION",
    "PendingCode",
    "PendingRevocation",
    "SessionFile",
    "SessionRecord",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped when a change would make an older agent misread the file."""
SEALED_FORMAT_VERSION = 2
"""A sealed file; an agent from before sealing takes it for a newer one's."""

MAX_CODES_SPENT = 1000
"""Far beyond any provider's hourly code budget; only the newest are kept."""
MAX_PENDING_REVOCATIONS = 100
MAX_TEXT_LENGTH = 16384
"""Per string: a large JWT fits. With the list caps, a record of ASCII strings stays
well under the file size cap, so whatever save() accepts, load() reads back."""

_MAX_FILE_SIZE = 2 << 20
_FILE_MODE = 0o600
# Only sanity bounds: judging times against the clock is the caller's business, and a
# Raspberry Pi without an RTC boots in 1970 until NTP answers, so 0 is a valid time.
_MAX_WALL = 1e11  # the year 5138
_MAX_DURATION = 7 * 86400.0
_MAX_COUNT = 10**9
_HINTS = ("refresh_token", "access_token")
_PURPOSE = "device-agent session"
# Controls would garble a screen or a form body; lone surrogates make UTF-8 encoding
# raise far from here (json.loads lets both through: escapes, and "surrogatepass").
_UNUSABLE_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True, kw_only=True)
class PendingCode:
    """A device code on screen (RFC 8628 §3.2). Times are on the wall clock, since the
    monotonic clock restarts with the machine."""

    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    interval: float
    issued_at: float
    expires_at: float
    scope: str | None = None


@dataclass(frozen=True, kw_only=True)
class PendingRevocation:
    """A token still to be revoked at the provider (RFC 7009)."""

    token: str = field(repr=False)
    hint: str  # "refresh_token" | "access_token"


@dataclass(frozen=True, kw_only=True)
class SessionRecord:
    """Everything the session file holds; the empty record is a first start."""

    codes_spent: tuple[float, ...] = ()
    throttle_until: float | None = None
    throttle_delay: float | None = None
    codes_expired_unused: int = 0
    pending_code: PendingCode | None = None
    pending_revocations: tuple[PendingRevocation, ...] = ()


class SessionFile:
    """The session file at `path`, beside the credential file and under its lock."""

    def __init__(self, path: Path, *, machine_id: str | None = None,
                 encryption: Encryption | None = None) -> None:
        self._path = Path(path)
        # A cloned SD card carries this file too: another device's owed revocations
        # would end that device's sign-in, and its code budget is not this one's.
        self._machine_id = machine_id
        self._encryption = encryption if encryption is not None else Encryption("off")
        self._swept = False
        self.needs_sealing = False
        """The last load() read a plain file while a key is delivered: save() seals it."""

    @property
    def path(self) -> Path:
        return self._path

    def load(self) -> SessionRecord:
        """The stored record; an empty one when there is no file or it cannot be used.

        Never raises for what the file holds, or for a file or directory open to others
        (a warning says why it was not used), but StoreKeyMissing for a sealed file
        without its key. Raises StoreError when the disk itself fails, say EIO:
        forgetting owed revocations over a transient error would be worse than telling
        the caller.
        """
        self.needs_sealing = False
        path = self._path
        try:
            if not check_private_directory(path.parent):
                return SessionRecord()
            data = read_private(path, _MAX_FILE_SIZE)
        except UnsafeFile as unsafe:
            log.warning("%s", self._refusal(unsafe))
            return SessionRecord()
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {_reason(exc)}") from None
        if data is None:
            return SessionRecord()
        try:
            document = json.loads(data)
        # ValueError covers JSONDecodeError, UnicodeDecodeError and integers beyond
        # Python's digit limit; RecursionError is absurdly deep nesting.
        except (ValueError, RecursionError):
            return self._discard("it is not valid JSON")
        written_on = document.get("machine_id") if isinstance(document, dict) else None
        if self._machine_id is not None and written_on not in (None, self._machine_id):
            log.warning("%s was written on another machine (a cloned SD card image?); "
                        "starting from an empty session: what it owes the provider is "
                        "the other device's to do", path)
            return SessionRecord()
        sealer = self._encryption.sealer()
        version = document.get("version") if isinstance(document, dict) else None
        # A newer agent's file is named as such below, sealed or not.
        too_new = (isinstance(version, int) and not isinstance(version, bool)
                   and version > SEALED_FORMAT_VERSION)
        sealed = is_sealed(document) and not too_new
        if sealed:
            if sealer is None:
                raise StoreKeyMissing(f"{path} is sealed, and is kept as it is: "
                                      f"{self._encryption.why_no_key()}")
            if version != SEALED_FORMAT_VERSION:
                return self._discard(f"it is sealed, but its version is not "
                                     f"{SEALED_FORMAT_VERSION}")
            try:
                document = sealer.unseal(document, purpose=_PURPOSE)
            except StoreUnsealable as exc:
                return self._discard(f"it {exc}")
        elif version == SEALED_FORMAT_VERSION:
            return self._discard(f"version {SEALED_FORMAT_VERSION} is sealed, and it has "
                                 f"no sealed part")
        try:
            record, problems = _decode(document)
        except _Newer as newer:
            log.warning("%s was written by a newer device-agent (format version %d; this "
                        "one reads versions up to %d); starting from an empty session, which "
                        "will replace it", path, newer.version, SEALED_FORMAT_VERSION)
            return SessionRecord()
        except _Invalid as invalid:
            return self._discard(str(invalid))
        if problems:
            log.warning("%s: %s; using the rest", path, "; ".join(problems))
        self.needs_sealing = sealer is not None and not sealed
        return record

    def save(self, record: SessionRecord) -> None:
        """Replace the file with `record`, atomically, durably, mode 0600.

        What the next load() would drop (a pending code or revocation that is invalid on
        its own, entries beyond the caps) is dropped here already, with a warning, so a
        restart never loses more than the running agent knows about. Raises StoreError
        (naming the path, never a value) when the disk refuses, or when the record
        cannot be stored at all (a non-finite number, a count out of range).
        """
        path = self._path
        data = self._encode(record).encode("ascii")
        if len(data) > _MAX_FILE_SIZE:
            raise StoreError(f"cannot write {path}: the session would take {len(data)} "
                             f"bytes, more than {_MAX_FILE_SIZE}")
        if not self._swept:
            self._sweep()
        try:
            write_atomic(path, data, mode=_FILE_MODE)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {_reason(exc)}") from None
        self.needs_sealing = False

    def _encode(self, record: SessionRecord) -> str:
        # Checked by decoding the very text that would be written, with load()'s own
        # rules: one definition of a valid file, and no way for the two to drift apart.
        try:
            document = self._document(record)
            text = _dumps(document)
            checked, problems = _decode(json.loads(text))
        except (ValueError, TypeError, RecursionError):
            # allow_nan=False and the int digit limit raise ValueError; a foreign type
            # TypeError. ensure_ascii escapes lone surrogates, so encoding never does.
            raise StoreError(f"cannot write {self._path}: the session holds a value JSON "
                             f"cannot represent (a non-finite number, a huge integer or "
                             f"an object of another type)") from None
        except _Invalid as invalid:
            raise StoreError(f"cannot write {self._path}: {invalid}") from None
        if problems:
            log.warning("%s: not saving what the next start could not read: %s",
                        self._path, "; ".join(problems))
            document = self._document(checked)
        sealer = self._encryption.sealer()
        if sealer is None:
            return text if not problems else _dumps(document)
        document["version"] = SEALED_FORMAT_VERSION
        return _dumps(sealer.seal(document, _secrets(document), purpose=_PURPOSE))

    def _document(self, record: SessionRecord) -> dict[str, Any]:
        document = _to_document(record)
        if self._machine_id is not None:
            document["machine_id"] = self._machine_id
        return document

    def _sweep(self) -> None:
        # Safe only because writes happen under the store's lock: no other writer's
        # temporary file can be in flight. A failure here must not block the save.
        try:
            removed = remove_stale_temps(self._path)
        except FileNotFoundError:
            return  # no directory: the write reports that
        except OSError as exc:
            log.warning("cannot clean up beside %s: %s", self._path, _reason(exc))
            return
        self._swept = True
        if removed:
            log.warning("removed %d temporary file(s) an interrupted write left beside %s",
                        removed, self._path)

    def _discard(self, what: str) -> SessionRecord:
        log.warning("%s is not a valid session file (%s); starting from an empty session, "
                    "which will replace it", self._path, what)
        return SessionRecord()

    def _refusal(self, unsafe: UnsafeFile) -> str:
        path, st, problem = self._path, unsafe.st, unsafe.problem
        consequence = ("so the secrets in it may be known to others; not using it (the "
                       "next save replaces it with a private file)")
        if unsafe.path != path:
            directory = unsafe.path
            if problem is Problem.OTHER_OWNER:
                return (f"{path} is in {directory}, which belongs to uid {st.st_uid}, not "
                        f"to this user (uid {os.geteuid()}), {consequence}; "
                        f"fix: chown {os.geteuid()} {directory}")
            if problem is Problem.OPEN_TO_OTHERS:
                return (f"{path} is in {directory}, which other users can write to (mode "
                        f"{_mode(st.st_mode)}), so it may have been swapped and the "
                        f"secrets in it may be known to others; not using it; "
                        f"fix: chmod go-w {directory}")
            return f"{path} cannot be used: {directory} {problem.value}"
        if problem is Problem.SYMLINK:
            return f"{path} is a symbolic link, {consequence}; its target is left alone"
        if problem is Problem.OTHER_OWNER:
            return (f"{path} belongs to uid {st.st_uid}, not to this user "
                    f"(uid {os.geteuid()}), {consequence}")
        if problem is Problem.OPEN_TO_OTHERS:
            return f"{path} is open to other users (mode {_mode(st.st_mode)}), {consequence}"
        if problem is Problem.TOO_LARGE:
            what = f"it is larger than {_MAX_FILE_SIZE} bytes"
        else:
            what = f"it {problem.value}"
        return (f"{path} is not a valid session file ({what}); starting from an empty "
                f"session, which will replace it")


# -- the format ------------------------------------------------------------------
#
# {
#   "version": 1,
#   "codes_spent": [1700000000.0, ...],              wall times, oldest first
#   "throttle_until": 1700000900.0 | null,
#   "throttle_delay": 120.0 | null,
#   "codes_expired_unused": 0,
#   "pending_code": null | {"device_code": "...", "user_code": "...",
#                           "verification_uri": "...", "verification_uri_complete": "..." | null,
#                           "interval": 5.0, "issued_at": 1700000000.0,
#                           "expires_at": 1700000600.0, "scope": "..." | null},
#   "pending_revocations": [{"token": "...", "hint": "refresh_token"}, ...]
# }
#
# Sealed (version 2): pending_code.device_code and each revocation's token are not
# written in place but in "sealed", as the credential file's tokens are.
#
# Every key is written and required on reading: a missing throttle_until must not
# quietly become "not throttled". Unknown keys are ignored. A wrong top-level field
# discards the file; a pending code, a revocation or a spent time that is wrong on its
# own is dropped alone, since the rest is still worth having.


def _secrets(document: dict[str, Any]) -> list[Location]:
    """Whoever holds the device code collects the tokens once the person approves; a
    token owed a revocation still works until the provider confirms it."""
    found: list[Location] = []
    if document["pending_code"] is not None:
        found.append(("pending_code", "device_code"))
    found += [("pending_revocations", index, "token")
              for index in range(len(document["pending_revocations"]))]
    return found


def _dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=True, allow_nan=False) + "\n"


def _to_document(record: SessionRecord) -> dict[str, Any]:
    code = record.pending_code
    return {
        "version": FORMAT_VERSION,
        "codes_spent": list(record.codes_spent),
        "throttle_until": record.throttle_until,
        "throttle_delay": record.throttle_delay,
        "codes_expired_unused": record.codes_expired_unused,
        "pending_code": None if code is None else {
            "device_code": code.device_code,
            "user_code": code.user_code,
            "verification_uri": code.verification_uri,
            "verification_uri_complete": code.verification_uri_complete,
            "interval": code.interval,
            "issued_at": code.issued_at,
            "expires_at": code.expires_at,
            "scope": code.scope,
        },
        "pending_revocations": [{"token": revocation.token, "hint": revocation.hint}
                                for revocation in record.pending_revocations],
    }


class _Invalid(Exception):
    """Names what is wrong, never the value: it may be a token."""


class _Newer(Exception):
    def __init__(self, version: int) -> None:
        super().__init__(version)
        self.version = version


def _number(value: object, high: float) -> float | None:
    # bool is an int to Python, but `true` is no time. Integers are compared before
    # float() sees them: JSON integers are unbounded and float() would overflow.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not 0 <= value <= high:  # NaN fails this too
        return None
    return float(value)


def _text(value: object, *, empty_ok: bool = False) -> str | None:
    if not isinstance(value, str) or not (value or empty_ok):
        return None
    if len(value) > MAX_TEXT_LENGTH or _UNUSABLE_CHARACTER.search(value):
        return None
    return value


class _Object:
    """Typed access to one JSON object; every complaint names the field."""

    def __init__(self, value: object, where: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(f"{where or 'the document'} is not a JSON object")
        self._obj: dict[str, object] = value
        self._where = where

    def name(self, key: str) -> str:
        return f"{self._where}.{key}" if self._where else key

    def raw(self, key: str) -> object:
        if key not in self._obj:
            raise _Invalid(f"{self.name(key)} is missing")
        return self._obj[key]

    def text(self, key: str) -> str:
        value = _text(self.raw(key))
        if value is None:
            raise _Invalid(f"{self.name(key)} is not a non-empty string of printable "
                           f"characters (at most {MAX_TEXT_LENGTH})")
        return value

    def optional_text(self, key: str, *, empty_ok: bool = False) -> str | None:
        value = self.raw(key)
        if value is None:
            return None
        text = _text(value, empty_ok=empty_ok)
        if text is None:
            raise _Invalid(f"{self.name(key)} is neither null nor a usable string")
        return text

    def number(self, key: str, high: float) -> float:
        number = _number(self.raw(key), high)
        if number is None:
            raise _Invalid(f"{self.name(key)} is not a number between 0 and {high:.0f}")
        return number

    def optional_number(self, key: str, high: float) -> float | None:
        value = self.raw(key)
        if value is None:
            return None
        number = _number(value, high)
        if number is None:
            raise _Invalid(f"{self.name(key)} is neither null nor a number between 0 "
                           f"and {high:.0f}")
        return number

    def count(self, key: str) -> int:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int) or not (
                0 <= value <= _MAX_COUNT):
            raise _Invalid(f"{self.name(key)} is not a whole number between 0 and "
                           f"{_MAX_COUNT}")
        return value

    def newest(self, key: str, cap: int, problems: list[str]) -> tuple[int, list[object]]:
        """The list at `key`, cut to its last `cap` entries, and the index of the first
        one kept (so that complaints name entries as they are in the file)."""
        value = self.raw(key)
        if not isinstance(value, list):
            raise _Invalid(f"{self.name(key)} is not a list")
        if len(value) <= cap:
            return 0, value
        problems.append(f"kept only the last {cap} of {len(value)} {self.name(key)} entries")
        return len(value) - cap, value[-cap:]


def _decode(document: object) -> tuple[SessionRecord, list[str]]:
    """The record in `document`, and what was dropped from it. Raises _Invalid when the
    document as a whole is unusable, _Newer when a newer agent wrote it."""
    top = _Object(document, "")
    version = top.raw("version")
    if isinstance(version, bool) or not isinstance(version, int) or not (
            1 <= version <= 1000):
        raise _Invalid("version is not a format version")
    if version > SEALED_FORMAT_VERSION:
        raise _Newer(version)
    problems: list[str] = []

    _, spent = top.newest("codes_spent", MAX_CODES_SPENT, problems)
    times = [t for t in (_number(v, _MAX_WALL) for v in spent) if t is not None]
    if len(times) < len(spent):
        problems.append(f"dropped {len(spent) - len(times)} codes_spent entries that are "
                        f"not wall-clock times")

    throttle_until = top.optional_number("throttle_until", _MAX_WALL)
    throttle_delay = top.optional_number("throttle_delay", _MAX_DURATION)
    codes_expired_unused = top.count("codes_expired_unused")

    pending_code: PendingCode | None = None
    raw_code = top.raw("pending_code")
    if raw_code is not None:
        try:
            pending_code = _pending_code(_Object(raw_code, "pending_code"))
        except _Invalid as invalid:
            problems.append(f"dropped the pending code: {invalid}")

    first, entries = top.newest("pending_revocations", MAX_PENDING_REVOCATIONS, problems)
    revocations: list[PendingRevocation] = []
    reasons: list[str] = []
    for index, entry in enumerate(entries, start=first):
        try:
            revocations.append(_revocation(_Object(entry, f"pending_revocations[{index}]")))
        except _Invalid as invalid:
            reasons.append(str(invalid))
    if reasons:
        more = f", and {len(reasons) - 1} more" if len(reasons) > 1 else ""
        problems.append(f"dropped {len(reasons)} of the pending_revocations "
                        f"({reasons[0]}{more})")

    return SessionRecord(
        codes_spent=tuple(times),
        throttle_until=throttle_until,
        throttle_delay=throttle_delay,
        codes_expired_unused=codes_expired_unused,
        pending_code=pending_code,
        pending_revocations=tuple(revocations),
    ), problems


def _pending_code(code: _Object) -> PendingCode:
    issued_at = code.number("issued_at", _MAX_WALL)
    expires_at = code.number("expires_at", _MAX_WALL)
    # A code that never expires would stay on screen forever; none lives for days.
    if not 0 < expires_at - issued_at <= _MAX_DURATION:
        raise _Invalid("pending_code.expires_at is not shortly after pending_code.issued_at")
    return PendingCode(
        device_code=code.text("device_code"),
        user_code=code.text("user_code"),
        verification_uri=code.text("verification_uri"),
        verification_uri_complete=code.optional_text("verification_uri_complete"),
        interval=code.number("interval", _MAX_DURATION),
        issued_at=issued_at,
        expires_at=expires_at,
        # An empty scope is kept: the caller may have asked for exactly that.
        scope=code.optional_text("scope", empty_ok=True),
    )


def _revocation(entry: _Object) -> PendingRevocation:
    token = entry.text("token")
    hint = entry.text("hint")
    if hint not in _HINTS:
        raise _Invalid(f"{entry.name('hint')} is not one of {', '.join(_HINTS)}")
    return PendingRevocation(token=token, hint=hint)


def _reason(exc: OSError) -> str:
    # strerror alone: str(exc) repeats the file name, which the caller already gives.
    return exc.strerror or type(exc).__name__


def _mode(st_mode: int) -> str:
    return f"{st_mode & 0o7777:04o}"
