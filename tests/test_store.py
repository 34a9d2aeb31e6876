"""The credential file on a real filesystem: format, permissions, locking, corruption,
and kill -9 in the middle of writes (DESIGN.md §5)."""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import logging
import os
import random
import shutil
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

from agent import fsutil
from agent.errors import StoreCorrupt, StoreError, StoreInsecure, StoreLocked, StoreTooNew
from agent.fsutil import remove_durably, temp_path, write_atomic
from agent.oauth.models import TokenSet
from agent.store import FORMAT_VERSION, Credentials, CredentialStore

REPO = Path(__file__).resolve().parents[1]
OTHER_UID = 65534  # nobody
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving files away needs root")


def make_credentials(tag: str, size: int = 64) -> Credentials:
    """Credentials whose secrets are long, distinct per tag and free of repetition, so
    that any leaked fragment of them is recognisable. Also run by the crash child."""
    def secret(kind: str) -> str:
        seed = f"{kind}-{tag}".encode()
        body = ""
        while len(body) < size:
            body += hashlib.sha256(seed + str(len(body)).encode()).hexdigest()
        return f"{kind}.{tag}." + body[:size]

    return Credentials(
        tokens=TokenSet(access_token=secret("at"), token_type="Bearer",
                        issued_at=1_700_000_000.25, expires_at=1_700_000_300.5,
                        refresh_token=secret("rt"), id_token=secret("idt"),
                        scope="openid profile email offline_access"),
        client_id=f"client-{tag}", issuer=f"https://auth.example.com/application/o/{tag}/",
        claims={"sub": f"sub-{tag}", "name": "Zoë Ångström",
                "preferred_username": "alice", "email": "alice@example.com"})


SAMPLE = make_credentials("S")


def secrets_of(creds: Credentials) -> list[str]:
    tokens = creds.tokens
    return [s for s in (tokens.access_token, tokens.refresh_token, tokens.id_token) if s]


def assert_no_secret(text: str, creds: Credentials = SAMPLE) -> None:
    for secret in secrets_of(creds):
        # Any 16-character window of a secret counts as a leak, not only the whole.
        for i in range(0, len(secret) - 16, 4):
            assert secret[i:i + 16] not in text, "a token fragment leaked"


def assert_clean_exception(exc: BaseException, creds: Credentials = SAMPLE) -> None:
    seen: BaseException | None = exc
    while seen is not None:  # the chain is printed with tracebacks, so it counts too
        assert_no_secret(f"{seen!s} {seen!r} {seen.args!r}", creds)
        seen = seen.__cause__ or seen.__context__


def write_raw(path: Path, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)


def snapshot(path: Path) -> tuple[bytes, int, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_ino, st.st_mtime_ns, stat.S_IMODE(st.st_mode)


def temp_files(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir()
                  if p.name.startswith(f".{path.name}.") and p.name.endswith(".tmp"))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "credentials.json"


@pytest.fixture
def store(path: Path) -> Iterator[CredentialStore]:
    with CredentialStore(path) as opened:
        yield opened


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    old = os.umask(0o022)
    os.umask(old)

    def set_umask(value: int) -> None:
        os.umask(value)

    yield set_umask
    os.umask(old)


def saved_document(store: CredentialStore) -> dict[str, Any]:
    store.save(SAMPLE)
    document: dict[str, Any] = json.loads(store.path.read_bytes())
    return document


# -- format -------------------------------------------------------------------------

@pytest.mark.parametrize("creds", [
    SAMPLE,
    Credentials(tokens=TokenSet(access_token="at-only", token_type="bearer", issued_at=5,
                                expires_at=None),
                client_id="c", issuer=None),
], ids=["every-field-set", "every-optional-field-none"])
def test_round_trip_keeps_every_field(store: CredentialStore, creds: Credentials) -> None:
    store.save(creds)
    again = CredentialStore(store.path).load()  # a fresh object: nothing cached
    assert again == creds
    assert again is not None
    assert again.tokens.access_token == creds.tokens.access_token
    assert again.tokens.refresh_token == creds.tokens.refresh_token
    assert again.tokens.id_token == creds.tokens.id_token
    assert dict(again.claims) == dict(creds.claims)


def test_file_is_versioned_readable_json(store: CredentialStore) -> None:
    document = saved_document(store)
    assert document["version"] == FORMAT_VERSION == 1
    assert set(document) == {"version", "client_id", "issuer", "claims", "machine_id", "tokens"}
    assert set(document["tokens"]) == {"access_token", "token_type", "issued_at", "expires_at",
                                       "refresh_token", "id_token", "scope"}
    text = store.path.read_text(encoding="utf-8")
    assert '\n  "version": 1,' in text and text.endswith("}\n")
    assert "Zoë Ångström" in text


def test_save_replaces_and_clear_removes(store: CredentialStore) -> None:
    other = make_credentials("O")
    store.save(SAMPLE)
    store.save(other)
    assert store.load() == other
    store.clear()
    assert not store.path.exists()
    assert store.load() is None
    store.clear()  # logging out twice is not an error
    assert temp_files(store.path) == []


def test_load_without_file_or_directory_is_none(path: Path) -> None:
    assert CredentialStore(path).load() is None
    assert not path.parent.exists()  # reading creates nothing


def test_writing_needs_the_lock(path: Path) -> None:
    unopened = CredentialStore(path)
    with pytest.raises(RuntimeError, match="not open"):
        unopened.save(SAMPLE)
    with pytest.raises(RuntimeError, match="not open"):
        unopened.clear()


# -- permissions ----------------------------------------------------------------------

def test_file_is_0600_and_directory_0700_even_with_umask_0(
        tmp_path: Path, umask: Callable[[int], None],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "parents" / "state" / "credentials.json"
    chmods: list[int] = []
    real_fchmod, real_chmod = os.fchmod, os.chmod

    def fchmod(fd: int, mode: int) -> None:
        chmods.append(mode)
        real_fchmod(fd, mode)

    def chmod(target: Any, mode: int, **kw: Any) -> None:
        chmods.append(mode)
        real_chmod(target, mode, **kw)

    monkeypatch.setattr(os, "fchmod", fchmod)
    monkeypatch.setattr(os, "chmod", chmod)
    umask(0)
    with CredentialStore(path) as store:
        store.save(SAMPLE)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        store.save(make_credentials("O"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(f"{path}.lock").stat().st_mode) == 0o600
    # Born with the right mode, not narrowed afterwards.
    assert chmods == []


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o666])
def test_file_open_to_others_is_refused_and_left_alone(
        store: CredentialStore, mode: int) -> None:
    store.save(SAMPLE)
    os.chmod(store.path, mode)
    before = snapshot(store.path)
    with pytest.raises(StoreInsecure) as caught:
        CredentialStore(store.path).load()
    message = str(caught.value)
    assert str(store.path) in message
    assert f"chmod 600 {store.path}" in message
    assert_clean_exception(caught.value)
    assert snapshot(store.path) == before


@needs_root
def test_file_of_another_user_is_refused(store: CredentialStore) -> None:
    store.save(SAMPLE)
    os.chown(store.path, OTHER_UID, -1)
    with pytest.raises(StoreInsecure, match=str(OTHER_UID)) as caught:
        store.load()
    assert str(store.path) in str(caught.value)


def test_symlinked_file_is_refused(store: CredentialStore, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    store.save(SAMPLE)
    os.replace(store.path, elsewhere)
    store.path.symlink_to(elsewhere)
    with pytest.raises(StoreInsecure, match="symbolic link"):
        store.load()


@pytest.mark.parametrize("mode", [0o770, 0o730, 0o703, 0o777])
def test_directory_writable_by_others_is_refused(path: Path, mode: int) -> None:
    with CredentialStore(path) as store:
        store.save(SAMPLE)
    os.chmod(path.parent, mode)
    with pytest.raises(StoreInsecure) as caught:
        CredentialStore(path).open()
    assert str(path.parent) in str(caught.value)
    with pytest.raises(StoreInsecure):
        CredentialStore(path).load()
    os.chmod(path.parent, 0o750)  # readable by others is fine: the file itself is 0600
    with CredentialStore(path) as store:
        assert store.load() == SAMPLE


def test_existing_directory_is_checked_too(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp: sticky, but anyone may create names in it
    with pytest.raises(StoreInsecure, match="chmod go-w"):
        CredentialStore(shared / "credentials.json").open()


@needs_root
def test_directory_of_another_user_is_refused(path: Path) -> None:
    path.parent.mkdir(mode=0o700)
    os.chown(path.parent, OTHER_UID, -1)
    with pytest.raises(StoreInsecure, match=str(OTHER_UID)):
        CredentialStore(path).open()


# -- corruption -----------------------------------------------------------------------

def _without(key_path: tuple[str, ...]) -> Callable[[dict[str, Any]], None]:
    def mutate(document: dict[str, Any]) -> None:
        target = document
        for key in key_path[:-1]:
            target = target[key]
        del target[key_path[-1]]
    return mutate


def _setting(key_path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(document: dict[str, Any]) -> None:
        target = document
        for key in key_path[:-1]:
            target = target[key]
        target[key_path[-1]] = value
    return mutate


TOKEN_KEYS = ("access_token", "token_type", "issued_at", "expires_at", "refresh_token",
              "id_token", "scope")
MISSING = [("version",), ("client_id",), ("issuer",), ("claims",), ("tokens",)] + [
    ("tokens", key) for key in TOKEN_KEYS]
WRONG: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("access_token-number", _setting(("tokens", "access_token"), 12345)),
    ("access_token-empty", _setting(("tokens", "access_token"), "")),
    ("token_type-null", _setting(("tokens", "token_type"), None)),
    ("issued_at-holds-a-token", _setting(("tokens", "issued_at"),
                                         SAMPLE.tokens.refresh_token)),
    ("expires_at-bool", _setting(("tokens", "expires_at"), True)),
    ("expires_at-string", _setting(("tokens", "expires_at"), "soon")),
    ("refresh_token-list", _setting(("tokens", "refresh_token"), ["x"])),
    ("id_token-object", _setting(("tokens", "id_token"), {"a": "b"})),
    ("scope-number", _setting(("tokens", "scope"), 1)),
    ("tokens-list", _setting(("tokens",), [SAMPLE.tokens.access_token])),
    ("client_id-null", _setting(("client_id",), None)),
    ("issuer-number", _setting(("issuer",), 7)),
    ("claims-string", _setting(("claims",), "alice")),
    ("claims-value-number", _setting(("claims",), {"name": 5})),
    ("version-string", _setting(("version",), "1")),
    ("version-zero", _setting(("version",), 0)),
    ("version-bool", _setting(("version",), True)),
    ("version-float", _setting(("version",), 1.0)),
]


def _assert_corrupt_and_untouched(store: CredentialStore,
                                  match: str | None = None) -> StoreCorrupt:
    path = store.path
    before = snapshot(path)
    with pytest.raises(StoreCorrupt) as caught:
        CredentialStore(path).load()
    assert str(path) in str(caught.value)
    if match is not None:
        assert match in str(caught.value)
    assert_clean_exception(caught.value)
    store.close()
    # Opening does not "repair" it either.
    with CredentialStore(path) as reopened, pytest.raises(StoreCorrupt):
        reopened.load()
    assert snapshot(path) == before
    return caught.value


@pytest.mark.parametrize("key_path", MISSING, ids=".".join)
def test_missing_field_is_corrupt(store: CredentialStore, key_path: tuple[str, ...]) -> None:
    document = saved_document(store)
    _without(key_path)(document)
    write_raw(store.path, json.dumps(document).encode())
    _assert_corrupt_and_untouched(store, match=key_path[-1])


@pytest.mark.parametrize(("name", "mutate"), WRONG, ids=[name for name, _ in WRONG])
def test_wrong_type_is_corrupt(store: CredentialStore, name: str,
                               mutate: Callable[[dict[str, Any]], None]) -> None:
    document = saved_document(store)
    mutate(document)
    write_raw(store.path, json.dumps(document).encode())
    _assert_corrupt_and_untouched(store)


@pytest.mark.parametrize("cut", [0, 1, 100, 0.5, -2])
def test_truncated_file_is_corrupt(store: CredentialStore, cut: float) -> None:
    store.save(SAMPLE)
    data = store.path.read_bytes()
    end = int(len(data) * cut) if isinstance(cut, float) else cut
    write_raw(store.path, data[:end])
    _assert_corrupt_and_untouched(store)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"[]", b"null", b"1",
                                     b'{"version": 1, "tokens": {"issued_at": NaN}}',
                                     b"[" * 100_000],
                         ids=["binary", "list", "null", "number", "nan", "deep"])
def test_content_that_is_no_credential_file_is_corrupt(
        store: CredentialStore, content: bytes) -> None:
    write_raw(store.path, content)
    _assert_corrupt_and_untouched(store)


@pytest.mark.parametrize("number", ["Infinity", "1e400", "1" + "0" * 400])
def test_non_finite_time_is_corrupt(store: CredentialStore, number: str) -> None:
    text = json.dumps(saved_document(store))
    write_raw(store.path, text.replace("1700000300.5", number).encode())
    _assert_corrupt_and_untouched(store, match="expires_at")


def test_file_of_a_newer_version_is_refused_not_corrupt(store: CredentialStore) -> None:
    # Issue 9 item 13: an upgrade reads it, so it is never moved aside as corrupt.
    document = saved_document(store)
    # The newest version this agent reads is the sealed format's.
    from agent.store import SEALED_FORMAT_VERSION

    document["version"] = SEALED_FORMAT_VERSION + 1
    write_raw(store.path, json.dumps(document).encode())
    before = store.path.read_bytes()
    with pytest.raises(StoreTooNew) as caught:
        store.load()
    assert not isinstance(caught.value, StoreCorrupt)
    assert f"version {SEALED_FORMAT_VERSION + 1}" in str(caught.value)
    assert "newer" in str(caught.value)
    assert store.path.read_bytes() == before


def test_a_corrupt_file_is_moved_aside_and_only_the_newest_copies_kept(
        store: CredentialStore) -> None:
    for n in range(5):
        write_raw(store.path, b"{ not json")
        moved = store.quarantine(stamp=f"2026120{n}T000000Z")
        assert moved is not None and moved.read_bytes() == b"{ not json"
        assert not store.path.exists()
    kept = sorted(p.name for p in store.path.parent.glob("credentials.json.corrupt-*"))
    assert kept == [f"credentials.json.corrupt-2026120{n}T000000Z" for n in (2, 3, 4)]
    assert store.quarantine(stamp="x") is None


def test_unknown_keys_are_ignored(store: CredentialStore) -> None:
    document = saved_document(store)
    document["note"] = "added by hand"
    document["tokens"]["extra"] = 1
    write_raw(store.path, json.dumps(document).encode())
    assert store.load() == SAMPLE


# -- locking --------------------------------------------------------------------------

def test_second_store_in_the_same_process_is_locked_out(path: Path) -> None:
    first = CredentialStore(path)
    first.open()
    first.open()  # already open: nothing happens, still the one lock
    second = CredentialStore(path)
    with pytest.raises(StoreLocked) as caught:
        second.open()
    assert str(path) in str(caught.value)
    assert "another device-agent" in str(caught.value)
    with pytest.raises(RuntimeError):
        second.save(SAMPLE)  # a refused open leaves the store closed
    first.close()
    first.close()  # idempotent
    with second:
        second.save(SAMPLE)
    assert Path(f"{path}.lock").exists()  # the lock file stays


LOCK_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from agent.errors import StoreLocked
    from agent.store import CredentialStore

    store = CredentialStore(Path(sys.argv[1]))
    try:
        store.open()
    except StoreLocked:
        print("locked", flush=True)
    else:
        print("unexpectedly opened", flush=True)
    sys.stdin.readline()
    store.open()
    print("holding", flush=True)
    sys.stdin.readline()
""")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def test_lock_holds_against_another_process(path: Path) -> None:
    ours = CredentialStore(path)
    ours.open()
    with subprocess.Popen([sys.executable, "-c", LOCK_CHILD, str(path)], env=_child_env(),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdin is not None and child.stdout is not None
        try:
            assert child.stdout.readline() == "locked\n"
            ours.close()
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline() == "holding\n"
            with pytest.raises(StoreLocked, match="another device-agent"):
                CredentialStore(path).open()
            child.stdin.close()
            assert child.wait(timeout=10) == 0
        finally:
            child.kill()
    with CredentialStore(path):  # released when the other process ended
        pass


# -- leftovers and failures -----------------------------------------------------------

def test_open_removes_stale_temp_files_only(
        path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with CredentialStore(path) as store:
        store.save(SAMPLE)
    stale = [temp_path(path) for _ in range(3)]
    for name in stale:
        write_raw(name, b'{"version": 1, "tok')
    keep = [path.parent / "credentials.json.tmp", path.parent / ".credentials.json.bak",
            path.parent / ".other.json.0123456789abcdef.tmp", path.parent / "notes"]
    for name in keep:
        write_raw(name, b"keep")
    with caplog.at_level(logging.WARNING, logger="agent.store"), CredentialStore(path) as store:
        assert store.load() == SAMPLE
    assert not any(name.exists() for name in stale)
    assert all(name.read_bytes() == b"keep" for name in keep)
    assert "3 temporary file" in caplog.text


def test_failed_save_names_the_path_and_no_token(
        store: CredentialStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    shutil.rmtree(store.path.parent)
    with pytest.raises(StoreError) as caught:
        store.save(SAMPLE)
    assert str(store.path) in str(caught.value)
    assert_clean_exception(caught.value)
    assert_no_secret(caplog.text)


def test_no_token_reaches_messages_logs_or_reprs(
        store: CredentialStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    problems: list[BaseException] = []
    store.save(SAMPLE)
    good = store.path.read_bytes()
    for mutilated in (good[: len(good) // 2], good.replace(b'"Bearer"', b"17"),
                      good.replace(b'"version": 1', b'"version": 9')):
        write_raw(store.path, mutilated)
        with pytest.raises((StoreCorrupt, StoreTooNew)) as corrupt:
            store.load()
        problems.append(corrupt.value)
    # A bare token pasted into the file, and a document cut short after its tokens.
    tokens_first = json.dumps({"tokens": _encode_tokens(SAMPLE), "version": 1})
    for junk in (SAMPLE.tokens.refresh_token or "", tokens_first[:-3]):
        write_raw(store.path, junk.encode())
        with pytest.raises(StoreCorrupt) as corrupt:
            store.load()
        problems.append(corrupt.value)
    write_raw(store.path, good, mode=0o644)
    with pytest.raises(StoreInsecure) as insecure:
        store.load()
    problems.append(insecure.value)
    for exc in problems:
        assert_clean_exception(exc)
    assert_no_secret(caplog.text)
    assert_no_secret(repr(SAMPLE))


def _encode_tokens(creds: Credentials) -> dict[str, Any]:
    tokens = creds.tokens
    return {"access_token": tokens.access_token, "refresh_token": tokens.refresh_token,
            "id_token": tokens.id_token}


# -- fsutil ---------------------------------------------------------------------------

def test_write_atomic_gives_exactly_the_mode_asked_for(
        tmp_path: Path, umask: Callable[[int], None]) -> None:
    umask(0o077)  # drops the group bit the caller wants: it is added back
    write_atomic(tmp_path / "f", b"data", mode=0o640)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
    umask(0)  # would allow anything: the file still gets no more than asked
    write_atomic(tmp_path / "g", b"data", mode=0o600)
    assert stat.S_IMODE((tmp_path / "g").stat().st_mode) == 0o600


def test_save_syncs_the_data_before_the_rename_and_the_directory_after(
        store: CredentialStore, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(f"fsync {kind}")
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        events.append("rename")
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store.save(SAMPLE)
    assert events == ["fsync file", "rename", "fsync dir"]
    events.clear()
    store.clear()
    assert events == ["fsync dir"]


def test_write_atomic_writes_everything_despite_short_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:1000])))
    data = os.urandom(50_000)
    write_atomic(tmp_path / "f", data)
    assert (tmp_path / "f").read_bytes() == data


@pytest.mark.parametrize("failing", ["fsync", "replace", "write"])
def test_failed_write_atomic_keeps_the_old_file_and_no_temp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    target = tmp_path / "f"
    write_atomic(target, b"old")
    before = snapshot(target)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, failing, broken)
    with pytest.raises(OSError, match="I/O error"):
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@needs_root
def test_write_atomic_gives_the_file_away_without_a_wider_moment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[int] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if flags & os.O_CREAT:
            created.append(mode)
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", spy)
    write_atomic(tmp_path / "f", b"data", mode=0o640, uid=OTHER_UID, gid=OTHER_UID)
    monkeypatch.undo()
    st = (tmp_path / "f").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (OTHER_UID, OTHER_UID, 0o640)
    assert created == [0o600]  # owner-only until it belongs to the target group


def test_remove_durably(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_atomic(target, b"x")
    assert remove_durably(target) is True
    assert not target.exists()
    assert remove_durably(target) is False


def test_stale_temp_names_are_recognised_exactly(tmp_path: Path) -> None:
    target = tmp_path / "a.b"
    ours, lookalike = temp_path(target), tmp_path / ".aXb.0123456789abcdef.tmp"
    for name in (ours, lookalike):
        write_raw(name, b"")
    assert fsutil.remove_stale_temps(target) == 1
    assert not ours.exists() and lookalike.exists()


# -- crash safety ---------------------------------------------------------------------

CRASH_KILLS = 60
CRASH_TOKEN_SIZE = 20_000

# A helper process imports the store once and forks a fresh writer per round, so each
# round costs a fork rather than an interpreter start. Every writer opens the store
# itself (its own lock), saves A, signals, then saves B, A, B, ... until killed.
CRASH_SPAWNER = "\n".join([
    "import hashlib, os, sys",
    "from pathlib import Path",
    "from agent.oauth.models import TokenSet",
    "from agent.store import CredentialStore, Credentials",
    "from agent.sealing import Encryption",
    textwrap.dedent(inspect.getsource(make_credentials)),
    textwrap.dedent("""
        path, size = Path(sys.argv[1]), int(sys.argv[2])
        # With a third argument, the directory systemd would deliver the store key in.
        keys = {"CREDENTIALS_DIRECTORY": sys.argv[3]} if len(sys.argv) > 3 else {}
        encryption = Encryption("required" if keys else "off", environ=keys)
        a, b = make_credentials("A", size), make_credentials("B", size)
        for line in sys.stdin:
            if line == "spawn\\n":
                ready_r, ready_w = os.pipe()
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    try:
                        os.close(ready_r)
                        store = CredentialStore(path, encryption=encryption)
                        store.open()
                        store.save(a)
                        os.write(ready_w, b"r")
                        os.close(ready_w)
                        while True:
                            store.save(b)
                            store.save(a)
                    finally:
                        os._exit(1)  # only reached if a save failed
                os.close(ready_w)
                ok = os.read(ready_r, 1) == b"r"
                os.close(ready_r)
                print(pid if ok else -1, flush=True)
            elif line == "reap\\n":
                _, status = os.waitpid(pid, 0)
                signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
                print(signum, flush=True)
    """),
])


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_kill_9_during_saves_leaves_the_old_or_the_new_file(path: Path, tmp_path: Path,
                                                            sealed: bool) -> None:
    from agent.sealing import KEY_SIZE, STORE_KEY, Encryption

    a, b = make_credentials("A", CRASH_TOKEN_SIZE), make_credentials("B", CRASH_TOKEN_SIZE)
    rng = random.Random(8628)
    outcomes = {"A": 0, "B": 0}
    temps_left = 0
    argv = [sys.executable, "-c", CRASH_SPAWNER, str(path), str(CRASH_TOKEN_SIZE)]
    encryption = Encryption("off")
    if sealed:
        keys = tmp_path / "credentials"
        keys.mkdir()
        (keys / STORE_KEY).write_bytes(os.urandom(KEY_SIZE))
        argv.append(str(keys))
        encryption = Encryption("required", environ={"CREDENTIALS_DIRECTORY": str(keys)})
    with subprocess.Popen(argv, env=_child_env(), text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as spawner:
        assert spawner.stdin is not None and spawner.stdout is not None

        def ask(line: str) -> int:
            assert spawner.stdin is not None and spawner.stdout is not None
            spawner.stdin.write(line + "\n")
            spawner.stdin.flush()
            return int(spawner.stdout.readline())

        try:
            for _ in range(CRASH_KILLS):
                started = time.perf_counter()
                pid = ask("spawn")
                assert pid > 0, "the writer could not save at all"
                # Spawning took about one save (fork, open, save A); waiting up to a few
                # more puts the kill anywhere in the next ones, on a fast disk or an SD
                # card alike: serialising, writing, fsync, rename, directory sync.
                _spin(rng.uniform(0, 4 * (time.perf_counter() - started)))
                os.kill(pid, signal.SIGKILL)
                assert ask("reap") == signal.SIGKILL, "the writer died on its own"
                left = temp_files(path)
                assert len(left) <= 1  # only the write in flight, never an accumulation
                temps_left += len(left)
                with CredentialStore(path, encryption=encryption) as store:
                    # The kill released the lock; open() swept what it left.
                    assert temp_files(path) == []
                    loaded = store.load()
                assert loaded in (a, b)
                if sealed:
                    on_disk = path.read_text()
                    assert not [s for s in secrets_of(loaded)
                                if s[:24] in on_disk or s[-24:] in on_disk]
                outcomes["A" if loaded == a else "B"] += 1
        finally:
            spawner.kill()
    print(f"\n{CRASH_KILLS} kills ({'sealed' if sealed else 'plain'}): "
          f"{outcomes['A']} ended as A, {outcomes['B']} as B, "
          f"{temps_left} left a temporary file behind")
    assert sum(outcomes.values()) == CRASH_KILLS
    assert outcomes["A"] and outcomes["B"], "the kills never caught the writer mid-way"


def _spin(seconds: float) -> None:
    # time.sleep overshoots by up to a scheduler tick; spinning keeps the spread fine.
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_claim_with_a_lone_surrogate_is_saved_and_read_back(store_path: Path) -> None:
    # A provider's odd name must not make the write of freshly rotated tokens raise.
    from dataclasses import replace

    creds = replace(make_credentials("surrogate"), claims={"name": "Al\ud800ice"})
    with CredentialStore(store_path) as store:
        store.save(creds)
        assert store.load() == creds


MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw
40 27 0:30 / /var/lib/with\\040space rw - overlay overlay rw
41 27 0:31 / /var/lib/device-agent rw - ext4 /dev/sda1 rw
42 41 0:32 / /var/lib/device-agent rw - tmpfs tmpfs rw
"""


@pytest.mark.parametrize(("path", "kind"), [
    ("/", "ext4"), ("/home/pi/x", "ext4"), ("/dev/shm/agent", "tmpfs"),
    ("/dev/shmx", "ext4"), ("/var/lib/with space/c.json", "overlay"),
    # The mount stacked last on the same point is the one in use.
    ("/var/lib/device-agent/credentials.json", "tmpfs"),
])
def test_the_file_system_of_a_path_is_read_from_mountinfo(path: str, kind: str) -> None:
    from agent.fsutil import filesystem_type

    assert filesystem_type(Path(path), MOUNTINFO) == kind


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a tmpfs at /dev/shm")
def test_a_store_on_tmpfs_warns_that_the_sign_in_dies_at_a_power_cut(
        caplog: pytest.LogCaptureFixture) -> None:
    # Issue 9 item 16.
    import tempfile

    with (tempfile.TemporaryDirectory(dir="/dev/shm") as shm,
          CredentialStore(Path(shm) / "state" / "credentials.json")):
        pass
    assert any("power cut" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
