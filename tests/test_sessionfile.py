"""The session file on a real filesystem: what survives a restart (the code budget, a
code on screen, revocations still owed), and that it is kept as carefully as the
credential file it lives beside: private, atomic, never fatal when damaged."""

from __future__ import annotations

import dataclasses
import errno
import inspect
import json
import logging
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import sessionfile
from agent.errors import StoreError
from agent.fsutil import temp_path
from agent.sessionfile import (
    FORMAT_VERSION,
    MAX_CODES_SPENT,
    MAX_PENDING_REVOCATIONS,
    MAX_TEXT_LENGTH,
    PendingCode,
    PendingRevocation,
    SessionFile,
    SessionRecord,
)

REPO = Path(__file__).resolve().parents[1]
OTHER_UID = 65534  # nobody
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving files away needs root")
LOGGER = "agent.sessionfile"

DEVICE_CODE = "dc-GmF4kQ9zXw2pL7vRt0YbNc3sHe8uJd"
REFRESH = "rt-Zp3Lm8Qx1Vb6Nw9Kc2Ts5Yh0Rj4Fg7Da"
ACCESS = "at-Hq7Wn2Xc5Lp9Vm0Bz3Kt6Yr1Sd8Fj4Ge"
SECRETS = (DEVICE_CODE, REFRESH, ACCESS)

CODE = PendingCode(device_code=DEVICE_CODE, user_code="WDJB-MJHT",
                   verification_uri="https://auth.example.com/device",
                   verification_uri_complete="https://auth.example.com/device?code=WDJB-MJHT",
                   interval=5.0, issued_at=1_700_000_000.25, expires_at=1_700_000_600.25,
                   scope="openid profile offline_access")
FULL = SessionRecord(
    codes_spent=(1_699_999_000.5, 1_699_999_500.0, 1_700_000_000.25),
    throttle_until=1_700_000_900.0, throttle_delay=120.0, codes_expired_unused=3,
    pending_code=CODE,
    pending_revocations=(PendingRevocation(token=REFRESH, hint="refresh_token"),
                         PendingRevocation(token=ACCESS, hint="access_token")))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    return directory / "session.json"


@pytest.fixture
def file(path: Path) -> SessionFile:
    return SessionFile(path)


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    old = os.umask(0o022)
    os.umask(old)

    def set_umask(value: int) -> None:
        os.umask(value)

    yield set_umask
    os.umask(old)


def write_raw(path: Path, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)


def snapshot(path: Path) -> tuple[bytes, int, int, int]:
    st = os.stat(path, follow_symlinks=False)
    return path.read_bytes(), st.st_ino, st.st_mtime_ns, stat.S_IMODE(st.st_mode)


def temp_files(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir()
                  if p.name.startswith(f".{path.name}.") and p.name.endswith(".tmp"))


def document_of(record: SessionRecord) -> dict[str, Any]:
    """What save() writes for `record`, as a dict to mutilate."""
    return {
        "version": 1,
        "codes_spent": list(record.codes_spent),
        "throttle_until": record.throttle_until,
        "throttle_delay": record.throttle_delay,
        "codes_expired_unused": record.codes_expired_unused,
        "pending_code": None if record.pending_code is None else {
            f.name: getattr(record.pending_code, f.name)
            for f in dataclasses.fields(PendingCode)},
        "pending_revocations": [{"token": r.token, "hint": r.hint}
                                for r in record.pending_revocations],
    }


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        for i in range(0, len(secret) - 12):
            assert secret[i:i + 12] not in text, "a secret leaked"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def load_with_one_warning(path: Path, caplog: pytest.LogCaptureFixture) -> tuple[
        SessionRecord, str]:
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        record = SessionFile(path).load()
    found = warnings_of(caplog)
    assert len(found) == 1, [r.getMessage() for r in found]
    message = found[0].getMessage()
    assert str(path) in message
    assert_no_secret(caplog.text)
    return record, message


def load_quietly(path: Path, caplog: pytest.LogCaptureFixture) -> SessionRecord:
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        record = SessionFile(path).load()
    assert warnings_of(caplog) == []
    return record


# -- format ---------------------------------------------------------------------------

@pytest.mark.parametrize("record", [
    FULL,
    SessionRecord(),
    SessionRecord(pending_code=dataclasses.replace(CODE, verification_uri_complete=None,
                                                   scope=None)),
    SessionRecord(codes_spent=(0.0,), throttle_until=0.0, throttle_delay=0.0,
                  pending_code=dataclasses.replace(CODE, interval=0.0, scope="")),
], ids=["every-field-set", "empty", "optional-strings-null", "zeros"])
def test_round_trip_keeps_every_field(file: SessionFile, record: SessionRecord,
                                      caplog: pytest.LogCaptureFixture) -> None:
    file.save(record)
    again = load_quietly(file.path, caplog)  # a fresh object: nothing cached
    assert again == record
    if record.pending_code is not None:
        assert again.pending_code is not None
        assert again.pending_code.device_code == record.pending_code.device_code
    assert [r.token for r in again.pending_revocations] == [
        r.token for r in record.pending_revocations]


def test_integers_come_back_as_the_same_numbers(file: SessionFile) -> None:
    record = SessionRecord(codes_spent=(1_700_000_000,), throttle_until=1_700_000_100,
                           throttle_delay=60, pending_code=dataclasses.replace(
                               CODE, interval=5, issued_at=1_700_000_000,
                               expires_at=1_700_000_600))
    file.save(record)
    again = file.load()
    assert again == record
    assert isinstance(again.throttle_until, float)


def test_file_is_versioned_ascii_json(file: SessionFile) -> None:
    file.save(dataclasses.replace(FULL, pending_code=dataclasses.replace(
        CODE, verification_uri="https://exämple.com/gerät")))
    data = file.path.read_bytes()
    data.decode("ascii")  # ensure_ascii: no byte of the file depends on an encoding
    assert data.endswith(b"}\n")
    document = json.loads(data)
    assert document["version"] == FORMAT_VERSION == 1
    assert set(document) == {"version", "codes_spent", "throttle_until", "throttle_delay",
                             "codes_expired_unused", "pending_code", "pending_revocations"}
    assert set(document["pending_code"]) == {f.name for f in dataclasses.fields(PendingCode)}
    assert document["pending_revocations"][0] == {"token": REFRESH, "hint": "refresh_token"}
    code = file.load().pending_code
    assert code is not None and code.verification_uri == "https://exämple.com/gerät"


def test_missing_file_or_directory_is_an_empty_record(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert load_quietly(tmp_path / "session.json", caplog) == SessionRecord()
    nowhere = tmp_path / "absent" / "session.json"
    assert load_quietly(nowhere, caplog) == SessionRecord()
    assert not nowhere.parent.exists()  # reading creates nothing
    assert SessionFile(nowhere).path == nowhere


def test_save_replaces_the_previous_record(file: SessionFile) -> None:
    file.save(FULL)
    file.save(SessionRecord(codes_expired_unused=9))
    assert file.load() == SessionRecord(codes_expired_unused=9)
    assert temp_files(file.path) == []


def test_unknown_keys_are_ignored(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    document = document_of(FULL)
    document["note"] = "added by hand"
    document["pending_code"]["extra"] = [1, 2]
    document["pending_revocations"][0]["extra"] = {}
    write_raw(path, json.dumps(document).encode())
    assert load_quietly(path, caplog) == FULL


def test_secrets_stay_out_of_reprs() -> None:
    assert_no_secret(repr(FULL))
    assert_no_secret(str(FULL))


def test_a_maximal_record_fits_and_round_trips(file: SessionFile,
                                               caplog: pytest.LogCaptureFixture) -> None:
    long = "x" * MAX_TEXT_LENGTH
    record = SessionRecord(
        codes_spent=tuple(1_700_000_000.123456 + i for i in range(MAX_CODES_SPENT)),
        throttle_until=1_700_000_000.0, throttle_delay=3600.0, codes_expired_unused=10**6,
        pending_code=PendingCode(device_code=long, user_code=long, verification_uri=long,
                                 verification_uri_complete=long, interval=5.0,
                                 issued_at=1.0, expires_at=2.0, scope=long),
        pending_revocations=tuple(PendingRevocation(token=f"{i:03d}" + long[3:],
                                                    hint="refresh_token")
                                  for i in range(MAX_PENDING_REVOCATIONS)))
    file.save(record)
    assert load_quietly(file.path, caplog) == record


# -- permissions ----------------------------------------------------------------------

def test_file_is_born_0600_even_with_umask_0(
        file: SessionFile, umask: Callable[[int], None],
        monkeypatch: pytest.MonkeyPatch) -> None:
    chmods: list[int] = []
    real_fchmod = os.fchmod

    def fchmod(fd: int, mode: int) -> None:
        chmods.append(mode)
        real_fchmod(fd, mode)

    monkeypatch.setattr(os, "fchmod", fchmod)
    monkeypatch.setattr(os, "chmod", lambda *a, **k: pytest.fail("chmod after birth"))
    umask(0)
    file.save(FULL)
    assert stat.S_IMODE(file.path.stat().st_mode) == 0o600
    file.save(SessionRecord())
    assert stat.S_IMODE(file.path.stat().st_mode) == 0o600
    assert chmods == []  # born with the mode, not narrowed afterwards


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o666])
def test_file_open_to_others_is_not_used_and_then_replaced(
        file: SessionFile, caplog: pytest.LogCaptureFixture, mode: int) -> None:
    file.save(FULL)
    os.chmod(file.path, mode)
    before = snapshot(file.path)
    record, message = load_with_one_warning(file.path, caplog)
    assert record == SessionRecord()
    assert "known to others" in message
    assert f"{mode:04o}" in message
    assert snapshot(file.path) == before  # load only reads
    file.save(SessionRecord(codes_expired_unused=1))
    assert stat.S_IMODE(file.path.stat().st_mode) == 0o600
    assert file.load() == SessionRecord(codes_expired_unused=1)


@needs_root
def test_file_of_another_user_is_not_used(file: SessionFile,
                                          caplog: pytest.LogCaptureFixture) -> None:
    file.save(FULL)
    os.chown(file.path, OTHER_UID, -1)
    record, message = load_with_one_warning(file.path, caplog)
    assert record == SessionRecord()
    assert str(OTHER_UID) in message and "known to others" in message
    file.save(FULL)
    assert file.path.stat().st_uid == os.geteuid()


@needs_root
def test_file_of_another_user_that_cannot_even_be_opened_is_not_used(
        file: SessionFile, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    file.save(FULL)
    os.chown(file.path, OTHER_UID, -1)
    real_open = os.open

    def open_as_a_user(target: Any, flags: int, *args: Any, **kw: Any) -> int:
        if Path(target) == file.path:  # root passes every permission check; others do not
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
        return real_open(target, flags, *args, **kw)

    monkeypatch.setattr(os, "open", open_as_a_user)
    record, message = load_with_one_warning(file.path, caplog)
    assert record == SessionRecord()
    assert str(OTHER_UID) in message and "known to others" in message


def test_disk_failure_while_reading_is_a_store_error_not_an_empty_record(
        file: SessionFile, monkeypatch: pytest.MonkeyPatch) -> None:
    # Answering "empty" here would let the next save forget the revocations still owed.
    file.save(FULL)

    def read(fd: int, n: int) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "read", read)
    with pytest.raises(StoreError) as caught:
        file.load()
    assert str(file.path) in str(caught.value)
    assert os.strerror(errno.EIO) in str(caught.value)
    assert caught.value.__cause__ is None


@pytest.mark.parametrize("mode", [0o770, 0o730, 0o703, 0o1777])
def test_file_in_a_directory_others_can_write_is_not_used(
        file: SessionFile, caplog: pytest.LogCaptureFixture, mode: int) -> None:
    file.save(FULL)
    os.chmod(file.path.parent, mode)
    record, message = load_with_one_warning(file.path, caplog)
    assert record == SessionRecord()
    assert str(file.path.parent) in message
    os.chmod(file.path.parent, 0o755)  # readable by others is fine: the file is 0600
    assert load_quietly(file.path, caplog) == FULL


@needs_root
def test_file_in_a_directory_of_another_user_is_not_used(
        file: SessionFile, caplog: pytest.LogCaptureFixture) -> None:
    file.save(FULL)
    os.chown(file.path.parent, OTHER_UID, -1)
    record, _ = load_with_one_warning(file.path, caplog)
    assert record == SessionRecord()


def test_symlinked_file_is_not_used_and_save_replaces_the_link(
        file: SessionFile, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "elsewhere.json"
    SessionFile(target).save(FULL)  # a perfectly good file: the link is what is wrong
    before = snapshot(target)
    file.path.symlink_to(target)
    record, message = load_with_one_warning(file.path, caplog)
    assert record == SessionRecord()
    assert "symbolic link" in message and "known to others" in message
    file.save(SessionRecord(codes_expired_unused=2))
    assert not file.path.is_symlink()
    assert stat.S_ISREG(os.lstat(file.path).st_mode)
    assert stat.S_IMODE(os.lstat(file.path).st_mode) == 0o600
    assert snapshot(target) == before
    assert file.load() == SessionRecord(codes_expired_unused=2)


def test_save_over_a_dangling_symlink_creates_nothing_at_its_target(
        file: SessionFile, tmp_path: Path) -> None:
    target = tmp_path / "planted.json"
    file.path.symlink_to(target)
    file.save(FULL)
    assert not target.exists()
    assert not file.path.is_symlink()
    assert file.load() == FULL


# -- damage ---------------------------------------------------------------------------

def _setting(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(document: dict[str, Any]) -> None:
        document[key] = value
    return mutate


def _without(key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(document: dict[str, Any]) -> None:
        del document[key]
    return mutate


TOP_KEYS = ("version", "codes_spent", "throttle_until", "throttle_delay",
            "codes_expired_unused", "pending_code", "pending_revocations")
BAD_DOCUMENTS: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    *[(f"{key}-missing", _without(key)) for key in TOP_KEYS],
    ("version-string", _setting("version", "1")),
    ("version-bool", _setting("version", True)),
    ("version-float", _setting("version", 1.0)),
    ("version-zero", _setting("version", 0)),
    ("version-null", _setting("version", None)),
    ("codes_spent-object", _setting("codes_spent", {"0": 1.0})),
    ("codes_spent-string", _setting("codes_spent", "1700000000")),
    ("codes_spent-null", _setting("codes_spent", None)),
    ("throttle_until-string", _setting("throttle_until", "soon")),
    ("throttle_until-bool", _setting("throttle_until", True)),
    ("throttle_until-negative", _setting("throttle_until", -1.0)),
    ("throttle_until-year-30000", _setting("throttle_until", 9e11)),
    ("throttle_until-holds-a-secret", _setting("throttle_until", REFRESH)),
    ("throttle_delay-negative", _setting("throttle_delay", -5)),
    ("throttle_delay-a-year", _setting("throttle_delay", 365 * 86400.0)),
    ("throttle_delay-list", _setting("throttle_delay", [1])),
    ("codes_expired_unused-float", _setting("codes_expired_unused", 3.0)),
    ("codes_expired_unused-bool", _setting("codes_expired_unused", False)),
    ("codes_expired_unused-negative", _setting("codes_expired_unused", -1)),
    ("codes_expired_unused-absurd", _setting("codes_expired_unused", 10**30)),
    ("codes_expired_unused-null", _setting("codes_expired_unused", None)),
    ("pending_revocations-object", _setting("pending_revocations", {"token": REFRESH})),
    ("pending_revocations-string", _setting("pending_revocations", REFRESH)),
    ("pending_revocations-null", _setting("pending_revocations", None)),
]


@pytest.mark.parametrize(("name", "mutate"), BAD_DOCUMENTS, ids=[n for n, _ in BAD_DOCUMENTS])
def test_document_with_a_bad_field_is_replaced_by_an_empty_record(
        path: Path, caplog: pytest.LogCaptureFixture, name: str,
        mutate: Callable[[dict[str, Any]], None]) -> None:
    document = document_of(FULL)
    mutate(document)
    write_raw(path, json.dumps(document).encode())
    record, message = load_with_one_warning(path, caplog)
    assert record == SessionRecord()
    assert name.split("-")[0] in message  # names the field, never its value


_VALID = json.dumps(document_of(FULL)).encode()
BAD_CONTENT: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("whitespace", b"  \n"),
    ("binary", b"\xff\xfe\x00garbage"),
    ("invalid-utf8-inside", _VALID.replace(b"WDJB", b"\xc3\x28")),
    ("truncated", _VALID[: len(_VALID) // 2]),
    ("one-byte-short", _VALID[:-1]),
    ("list", b"[]"),
    ("null", b"null"),
    ("number", b"1"),
    ("string", json.dumps(REFRESH).encode()),
    ("nan", _VALID.replace(b"1700000900.0", b"NaN")),
    ("infinity", _VALID.replace(b"1700000900.0", b"Infinity")),
    ("overflowing-float", _VALID.replace(b"1700000900.0", b"1e400")),
    ("huge-integer", _VALID.replace(b"1700000900.0", b"1" + b"0" * 400)),
    ("integer-beyond-the-digit-limit", _VALID.replace(b"1700000900.0", b"9" * 5000)),
    ("deep-lists", b"[" * 200_000),
    ("deep-objects", b'{"a":' * 200_000),
    ("deep-inside-a-field", _VALID.replace(b'"codes_spent": [', b'"codes_spent": ['
                                           + b"[" * 200_000)),
    ("version-newer-and-garbage", b'{"version": 2, '),
    ("too-large", b'{"version": 1, "pad": "' + b"x" * (3 << 20) + b'"}'),
]


@pytest.mark.parametrize(("name", "content"), BAD_CONTENT, ids=[n for n, _ in BAD_CONTENT])
def test_damaged_file_is_replaced_by_an_empty_record(
        file: SessionFile, caplog: pytest.LogCaptureFixture, name: str,
        content: bytes) -> None:
    write_raw(file.path, content)
    before = snapshot(file.path)
    record, _ = load_with_one_warning(file.path, caplog)
    assert record == SessionRecord()
    assert snapshot(file.path) == before  # replaced by the caller's next save, not here
    file.save(FULL)
    assert file.load() == FULL


def test_directory_in_place_of_the_file_is_not_fatal(
        file: SessionFile, caplog: pytest.LogCaptureFixture) -> None:
    file.path.mkdir()
    record, _ = load_with_one_warning(file.path, caplog)
    assert record == SessionRecord()
    with pytest.raises(StoreError) as caught:
        file.save(FULL)
    assert str(file.path) in str(caught.value)


def test_fifo_in_place_of_the_file_does_not_hang(
        file: SessionFile, caplog: pytest.LogCaptureFixture) -> None:
    os.mkfifo(file.path, 0o600)
    record, _ = load_with_one_warning(file.path, caplog)
    assert record == SessionRecord()
    file.save(FULL)
    assert file.load() == FULL


def test_file_of_a_newer_version_is_named_and_not_used(
        path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The newest version this agent reads is the sealed format's.
    from agent.sessionfile import SEALED_FORMAT_VERSION

    document = document_of(FULL)
    document["version"] = SEALED_FORMAT_VERSION + 1
    write_raw(path, json.dumps(document).encode())
    record, message = load_with_one_warning(path, caplog)
    assert record == SessionRecord()
    assert "newer" in message and f"version {SEALED_FORMAT_VERSION + 1}" in message


def _code_with(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(code: dict[str, Any]) -> None:
        for key, value in changes.items():
            if value is KeyError:
                del code[key]
            else:
                code[key] = value
    return mutate


BAD_CODES: list[tuple[str, Any]] = [
    ("not-an-object", "WDJB-MJHT"),
    ("list", [DEVICE_CODE]),
    ("device_code-missing", _code_with(device_code=KeyError)),
    ("device_code-empty", _code_with(device_code="")),
    ("device_code-number", _code_with(device_code=12345)),
    ("device_code-too-long", _code_with(device_code="d" * (MAX_TEXT_LENGTH + 1))),
    ("user_code-null", _code_with(user_code=None)),
    ("user_code-lone-surrogate", _code_with(user_code="WDJB-\ud800")),
    ("user_code-control-character", _code_with(user_code="WDJB\n-MJHT")),
    ("verification_uri-empty", _code_with(verification_uri="")),
    ("verification_uri_complete-number", _code_with(verification_uri_complete=1)),
    ("verification_uri_complete-empty", _code_with(verification_uri_complete="")),
    ("verification_uri_complete-missing", _code_with(verification_uri_complete=KeyError)),
    ("interval-bool", _code_with(interval=True)),
    ("interval-string", _code_with(interval="5")),
    ("interval-negative", _code_with(interval=-5)),
    ("interval-a-year", _code_with(interval=365 * 86400)),
    ("issued_at-null", _code_with(issued_at=None)),
    ("issued_at-negative", _code_with(issued_at=-1)),
    ("expires_at-before-issued_at", _code_with(expires_at=1_699_999_999.0)),
    ("expires_at-equal-to-issued_at", _code_with(expires_at=1_700_000_000.25)),
    ("expires_at-a-year-later", _code_with(expires_at=1_700_000_000.25 + 365 * 86400)),
    ("expires_at-missing", _code_with(expires_at=KeyError)),
    ("scope-number", _code_with(scope=7)),
    ("scope-missing", _code_with(scope=KeyError)),
]


@pytest.mark.parametrize(("name", "change"), BAD_CODES, ids=[n for n, _ in BAD_CODES])
def test_bad_pending_code_alone_is_dropped(path: Path, caplog: pytest.LogCaptureFixture,
                                           name: str, change: Any) -> None:
    document = document_of(FULL)
    if callable(change):
        change(document["pending_code"])
    else:
        document["pending_code"] = change
    write_raw(path, json.dumps(document).encode())
    record, message = load_with_one_warning(path, caplog)
    assert record == dataclasses.replace(FULL, pending_code=None)
    assert "pending_code" in message


def test_bad_revocations_alone_are_dropped(path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    document = document_of(FULL)
    good = document["pending_revocations"]
    document["pending_revocations"] = [
        good[0],
        {"token": ACCESS, "hint": "id_token"},        # not a hint RFC 7009 knows here
        {"token": "", "hint": "refresh_token"},
        {"token": 7, "hint": "refresh_token"},
        {"token": REFRESH},
        {"token": "rt-\udc80", "hint": "refresh_token"},
        REFRESH,
        None,
        good[1],
    ]
    write_raw(path, json.dumps(document).encode())
    record, message = load_with_one_warning(path, caplog)
    assert record == FULL
    assert "pending_revocations" in message and "7" in message  # how many were dropped


def test_bad_spent_times_alone_are_dropped(path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    document = document_of(FULL)
    document["codes_spent"] = [1_699_999_000.5, "1699999200", True, None, -3, 1e300,
                               1_699_999_500.0, [1], 1_700_000_000.25]
    write_raw(path, json.dumps(document).encode())
    record, message = load_with_one_warning(path, caplog)
    assert record == FULL
    assert "codes_spent" in message


def test_raw_surrogates_in_the_bytes_drop_only_their_entry(
        path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # json.loads decodes bytes with "surrogatepass": encoded surrogates get through it.
    data = json.dumps(document_of(FULL)).encode().replace(b"WDJB-MJHT", b"WDJB-\xed\xa0\x80")
    write_raw(path, data)
    record, _ = load_with_one_warning(path, caplog)
    assert record == dataclasses.replace(FULL, pending_code=None)


def test_long_lists_are_cut_to_their_newest_entries_quickly(
        path: Path, caplog: pytest.LogCaptureFixture) -> None:
    document = document_of(FULL)
    document["codes_spent"] = [float(i) for i in range(100_000)]
    document["pending_revocations"] = [{"token": f"rt-{i}", "hint": "refresh_token"}
                                       for i in range(MAX_PENDING_REVOCATIONS + 50)]
    write_raw(path, json.dumps(document).encode())
    started = time.perf_counter()
    record, message = load_with_one_warning(path, caplog)
    assert time.perf_counter() - started < 2
    assert record.codes_spent == tuple(float(i) for i in range(100_000 - MAX_CODES_SPENT,
                                                               100_000))
    assert [r.token for r in record.pending_revocations] == [
        f"rt-{i}" for i in range(50, MAX_PENDING_REVOCATIONS + 50)]
    assert "codes_spent" in message and "pending_revocations" in message


def test_random_damage_never_raises(file: SessionFile,
                                    caplog: pytest.LogCaptureFixture) -> None:
    file.save(FULL)
    good = file.path.read_bytes()
    rng = random.Random(8628)
    alphabet = b'{}[]":,.-+0123456789eE \\u\xff\xed\x80tfnl'
    for _ in range(400):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(data))
            action = rng.randrange(3)
            if action == 0:
                data[at] = rng.choice(alphabet)
            elif action == 1:
                del data[at:at + rng.randint(1, 40)]
            else:
                data[at:at] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        write_raw(file.path, bytes(data))
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            record = SessionFile(file.path).load()
        assert isinstance(record, SessionRecord)
        assert len(warnings_of(caplog)) <= 1
        assert_no_secret(caplog.text)
        # What was read back can always be written again.
        SessionFile(file.path).save(record)


# -- saving ---------------------------------------------------------------------------

def test_failed_rename_keeps_the_old_file_and_names_the_reason(
        file: SessionFile, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    file.save(FULL)
    before = snapshot(file.path)

    def replace(src: Any, dst: Any, **dir_fds: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(os, "replace", replace)
    with caplog.at_level(logging.DEBUG), pytest.raises(StoreError) as caught:
        file.save(SessionRecord())
    monkeypatch.undo()
    message = str(caught.value)
    assert str(file.path) in message and os.strerror(errno.ENOSPC) in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert_no_secret(message + caplog.text)
    assert snapshot(file.path) == before
    assert temp_files(file.path) == []
    assert file.load() == FULL


def test_save_into_a_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    file = SessionFile(tmp_path / "gone" / "session.json")
    with pytest.raises(StoreError, match="gone"):
        file.save(FULL)


def test_save_syncs_before_and_after_the_rename(
        file: SessionFile, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        calls.append(f"fsync-{kind}")
        real_fsync(fd)

    def replace(src: Any, dst: Any, **dir_fds: Any) -> None:
        calls.append("replace")
        real_replace(src, dst, **dir_fds)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    file.save(FULL)
    assert calls == ["fsync-file", "replace", "fsync-dir"]


@pytest.mark.parametrize("record", [
    SessionRecord(throttle_until=float("nan")),
    SessionRecord(throttle_delay=float("inf")),
    SessionRecord(throttle_delay=-1.0),
    SessionRecord(codes_expired_unused=-1),
    SessionRecord(codes_expired_unused=10**5000),
    SessionRecord(throttle_until=True),
], ids=["nan", "inf", "negative-delay", "negative-count", "huge-int", "bool"])
def test_unrepresentable_record_is_refused_and_the_old_file_kept(
        file: SessionFile, record: SessionRecord) -> None:
    file.save(FULL)
    before = snapshot(file.path)
    with pytest.raises(StoreError) as caught:
        file.save(record)
    assert str(file.path) in str(caught.value)
    assert caught.value.__cause__ is None
    assert snapshot(file.path) == before
    assert temp_files(file.path) == []


def test_save_drops_what_load_would_drop_so_no_restart_loses_more(
        file: SessionFile, caplog: pytest.LogCaptureFixture) -> None:
    record = dataclasses.replace(
        FULL,
        codes_spent=tuple(float(i) for i in range(MAX_CODES_SPENT + 5)),
        pending_code=dataclasses.replace(CODE, user_code="WDJB-\ud800"),
        pending_revocations=(PendingRevocation(token="rt-\udfff", hint="refresh_token"),
                             *FULL.pending_revocations))
    with caplog.at_level(logging.DEBUG):
        file.save(record)  # a lone surrogate makes no encoder raise
    found = warnings_of(caplog)
    assert len(found) == 1 and str(file.path) in found[0].getMessage()
    assert_no_secret(caplog.text)
    assert file.load() == dataclasses.replace(
        FULL, codes_spent=tuple(float(i) for i in range(5, MAX_CODES_SPENT + 5)),
        pending_code=None)


def test_first_save_removes_temp_files_a_killed_writer_left(
        file: SessionFile, caplog: pytest.LogCaptureFixture) -> None:
    stale = [temp_path(file.path) for _ in range(2)]
    for name in stale:
        write_raw(name, b'{"version": 1, "pend')
    keep = file.path.parent / ".credentials.json.0123456789abcdef.tmp"
    write_raw(keep, b"keep")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        file.save(FULL)
    assert not any(name.exists() for name in stale)
    assert keep.read_bytes() == b"keep"
    assert "2 temporary file" in caplog.text
    assert temp_files(file.path) == []


def test_no_secret_reaches_messages_or_logs(
        file: SessionFile, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    file.save(FULL)
    good = file.path.read_bytes()
    for data in (good[: len(good) // 2], good.replace(b'"version": 1', b'"version": 7'),
                 good.replace(b'"refresh_token"', b'"refresh"'),
                 good.replace(b'"interval": 5.0', b'"interval": "' + REFRESH.encode() + b'"'),
                 REFRESH.encode(), json.dumps({"version": 1, REFRESH: ACCESS}).encode()):
        write_raw(file.path, data)
        file.load()
    os.chmod(file.path, 0o644)
    file.load()
    assert_no_secret(caplog.text)


# -- kill -9 ----------------------------------------------------------------------------

def crash_record(tag: str, size: int) -> SessionRecord:
    """A record of some tens of KB, so that a kill lands in the write too, not only in
    the fsync. Also run by the crash child."""
    return SessionRecord(
        codes_spent=tuple(float(i) for i in range(size)),
        codes_expired_unused=len(tag),
        pending_code=PendingCode(device_code="d" * size + tag, user_code=tag,
                                 verification_uri="https://x/" + tag,
                                 verification_uri_complete=None, interval=5.0,
                                 issued_at=1.0, expires_at=2.0),
        pending_revocations=tuple(PendingRevocation(token=f"{tag}{i}" * 50,
                                                    hint="refresh_token")
                                  for i in range(size // 10)))


CRASH_CHILD = "\n".join([
    "import sys",
    "from pathlib import Path",
    "from agent.sessionfile import PendingCode, PendingRevocation, SessionFile, SessionRecord",
    textwrap.dedent(inspect.getsource(crash_record)),
    textwrap.dedent("""
        file, size = SessionFile(Path(sys.argv[1])), int(sys.argv[2])
        a, b = crash_record("A", size), crash_record("BB", size)
        file.save(a)
        print("ready", flush=True)
        while True:
            file.save(b)
            file.save(a)
    """),
])
CRASH_SIZE = 400
CRASH_KILLS = 12


def test_kill_9_while_saving_leaves_the_old_or_the_new_record(path: Path) -> None:
    a, b = crash_record("A", CRASH_SIZE), crash_record("BB", CRASH_SIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    rng = random.Random(7009)
    seen: list[str] = []
    temps = 0
    for _ in range(CRASH_KILLS):
        with subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(path), str(CRASH_SIZE)],
                              env=env, stdout=subprocess.PIPE, text=True) as child:
            try:
                assert child.stdout is not None
                assert child.stdout.readline() == "ready\n"
                time.sleep(rng.uniform(0, 0.05))
                child.send_signal(signal.SIGKILL)
                assert child.wait(timeout=10) == -signal.SIGKILL
            finally:
                child.kill()
        left = len(temp_files(path))
        assert left <= 1  # only the write in flight, never a pile
        temps += left
        loaded = SessionFile(path).load()
        assert loaded in (a, b)
        seen.append("A" if loaded == a else "B")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The next save (made under the store's lock) clears what the last kill left.
    SessionFile(path).save(a)
    assert temp_files(path) == []
    print(f"\n{CRASH_KILLS} kills ended as {''.join(seen)}, {temps} mid-write")


def test_module_exports_the_documented_api() -> None:
    assert set(sessionfile.__all__) >= {"PendingCode", "PendingRevocation", "SessionFile",
                                        "SessionRecord"}


def test_a_session_written_on_another_machine_is_not_used(
        path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 9 item 16: a cloned SD card image must not revoke the other device's tokens
    or spend its code budget."""
    record = FULL
    SessionFile(path, machine_id="a" * 32).save(record)
    assert json.loads(path.read_text())["machine_id"] == "a" * 32
    assert SessionFile(path, machine_id="a" * 32).load() == record
    with caplog.at_level(logging.WARNING):
        assert SessionFile(path, machine_id="b" * 32).load() == SessionRecord()
    assert any("written on another machine" in r.getMessage() for r in caplog.records)
    # A file from before the binding, or a machine without an id, still loads.
    assert SessionFile(path).load() == record
    SessionFile(path).save(record)
    assert SessionFile(path, machine_id="b" * 32).load() == record
