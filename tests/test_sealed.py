"""Credentials sealed at rest (issue 13): the store's and the session file's secrets
encrypted with the key systemd delivers ($CREDENTIALS_DIRECTORY/store-key), the rest of
each file bound to them, on real files with the real `cryptography` AEAD."""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import ConfigError, config_from_mapping
from agent.driver import Driver
from agent.errors import (
    StoreCorrupt,
    StoreError,
    StoreKeyMissing,
    StoreTooNew,
    StoreUnsealable,
)
from agent.idp import IdentityProvider
from agent.sealing import KEY_SIZE, STORE_KEY, Encryption
from agent.sessionfile import PendingCode, PendingRevocation, SessionFile, SessionRecord
from agent.state import Phase
from agent.store import SEALED_FORMAT_VERSION, Credentials, CredentialStore
from tests.harness import Running, settings_for
from tests.test_store import (
    SAMPLE,
    _setting,
    assert_clean_exception,
    assert_no_secret,
    make_credentials,
)

DEVICE_CODE = "dc-GmF4kQ9zXw2pL7vRt0YbNc3sHe8uJd"
REVOKE = "rt-Zp3Lm8Qx1Vb6Nw9Kc2Ts5Yh0Rj4Fg7Da"
RECORD = SessionRecord(
    codes_spent=(1_700_000_000.25,), throttle_until=None, throttle_delay=None,
    codes_expired_unused=1,
    pending_code=PendingCode(device_code=DEVICE_CODE, user_code="123456789",
                             verification_uri="https://auth.example.com/device",
                             verification_uri_complete=None, interval=5.0,
                             issued_at=1_700_000_000.25, expires_at=1_700_000_600.25),
    pending_revocations=(PendingRevocation(token=REVOKE, hint="refresh_token"),))


def deliver_key(directory: Path, key: bytes | None = None) -> bytes:
    """What systemd's LoadCredentialEncrypted= leaves: $CREDENTIALS_DIRECTORY/store-key."""
    key = os.urandom(KEY_SIZE) if key is None else key
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STORE_KEY).write_bytes(key)
    return key


def encryption(directory: Path | None, mode: str = "auto") -> Encryption:
    environ = {} if directory is None else {"CREDENTIALS_DIRECTORY": str(directory)}
    return Encryption(mode, environ=environ)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "credentials"
    deliver_key(directory)
    return directory


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "credentials.json"


def sealed_store(path: Path, keys: Path) -> CredentialStore:
    return CredentialStore(path, encryption=encryption(keys))


def save_sealed(path: Path, keys: Path, creds: Credentials = SAMPLE) -> bytes:
    with sealed_store(path, keys) as store:
        store.save(creds)
    return path.read_bytes()


def key_forms(key: bytes) -> list[str]:
    """The key as it could leak: hex, base64 (both alphabets), and its bytes as text."""
    return [key.hex(), key.hex().upper(), base64.b64encode(key).decode(),
            base64.urlsafe_b64encode(key).decode().rstrip("="),
            key.decode("latin-1")]


def assert_no_key(text: str, key: bytes) -> None:
    for form in key_forms(key):
        assert form not in text, "the store key leaked"


# -- storage.encryption --------------------------------------------------------------

def minimal(**storage: Any) -> dict[str, Any]:
    return {"provider": {"issuer": "https://auth.example.com/application/o/x/",
                         "client_id": "x"}, "storage": storage}


def test_encryption_is_auto_unless_set() -> None:
    assert config_from_mapping(minimal()).storage.encryption == "auto"
    assert config_from_mapping(minimal(encryption=None)).storage.encryption == "auto"
    for mode in ("auto", "required", "off"):
        assert config_from_mapping(minimal(encryption=mode)).storage.encryption == mode


def test_a_bare_off_in_yaml_is_off() -> None:
    # YAML 1.1 reads a bare `off` as false; the person meant the word.
    data = yaml.safe_load("storage:\n  encryption: off\n")
    assert data["storage"]["encryption"] is False
    config = config_from_mapping({**minimal(), "storage": data["storage"]})
    assert config.storage.encryption == "off"


@pytest.mark.parametrize("value", [True, "on", "yes-please", 1])
def test_other_encryption_values_are_refused(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(minimal(encryption=value))
    assert caught.value.key == "storage.encryption"
    assert "auto" in caught.value.message and "required" in caught.value.message


# -- the key -------------------------------------------------------------------------

def test_without_a_key_auto_keeps_plain_text_and_warns_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    at_rest = encryption(None)
    with caplog.at_level(logging.WARNING, logger="agent.sealing"):
        assert at_rest.sealer() is None
        assert at_rest.sealer() is None
    warnings = [r for r in caplog.records if r.name == "agent.sealing"]
    assert len(warnings) == 1
    assert "plain text" in warnings[0].getMessage()
    assert "install-service --seal" in warnings[0].getMessage()


def test_a_credentials_directory_without_the_key_is_no_key(tmp_path: Path) -> None:
    (tmp_path / "credentials").mkdir()
    (tmp_path / "credentials" / "config.yaml").write_text("provider: {}\n")
    assert encryption(tmp_path / "credentials").sealer() is None


@pytest.mark.parametrize("where", ["unset", "empty directory"])
def test_required_without_a_key_is_a_config_error_naming_the_fix(
        tmp_path: Path, where: str) -> None:
    directory = None
    if where == "empty directory":
        directory = tmp_path / "credentials"
        directory.mkdir()
    with pytest.raises(ConfigError) as caught:
        encryption(directory, "required").sealer()
    assert caught.value.key == "storage.encryption"
    assert "sudo device-agent install-service --seal" in str(caught.value)
    assert STORE_KEY in str(caught.value)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_a_key_of_the_wrong_size_is_a_config_error(tmp_path: Path, size: int) -> None:
    key = deliver_key(tmp_path / "credentials", os.urandom(size))
    with pytest.raises(ConfigError) as caught:
        encryption(tmp_path / "credentials").sealer()
    assert caught.value.key == "storage.encryption"
    assert f"{size} bytes" in str(caught.value)
    if key:
        assert_no_key(f"{caught.value!s} {caught.value!r}", key)


def test_off_ignores_a_delivered_key(keys: Path) -> None:
    assert encryption(keys, "off").sealer() is None


def test_the_sealer_never_shows_its_key(keys: Path) -> None:
    key = (keys / STORE_KEY).read_bytes()
    sealer = encryption(keys).sealer()
    assert sealer is not None
    assert_no_key(f"{sealer!r} {sealer!s} {vars(sealer)!r}", key)


# -- the sealed credential file ------------------------------------------------------

def test_sealed_round_trip_keeps_every_field(path: Path, keys: Path) -> None:
    bare = Credentials(tokens=SAMPLE.tokens.__class__(
        access_token="at-only", token_type="bearer", issued_at=5, expires_at=None),
        client_id="c", issuer=None)
    for creds in (SAMPLE, bare):
        save_sealed(path, keys, creds)
        assert sealed_store(path, keys).load() == creds


def test_the_sealed_file_holds_no_token_and_keeps_the_rest_legible(
        path: Path, keys: Path) -> None:
    data = save_sealed(path, keys)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert_no_secret(data.decode("utf-8"))
    document = json.loads(data)
    assert document["version"] == SEALED_FORMAT_VERSION == 2
    assert set(document["tokens"]) == {"token_type", "issued_at", "expires_at", "scope"}
    assert document["client_id"] == SAMPLE.client_id
    assert document["claims"]["name"] == "Zoë Ångström"
    assert set(document["sealed"]) == {"cipher", "key_id", "nonce", "ciphertext"}
    assert document["sealed"]["cipher"] == "ChaCha20-Poly1305"
    assert_no_key(data.decode("utf-8"), (keys / STORE_KEY).read_bytes())
    # A fresh nonce each time: the same credentials never seal to the same bytes.
    assert save_sealed(path, keys) != data


def test_a_sealed_file_without_a_key_is_refused_and_kept(path: Path, keys: Path) -> None:
    data = save_sealed(path, keys)
    for no_key in (CredentialStore(path), CredentialStore(path, encryption=encryption(None)),
                   CredentialStore(path, encryption=encryption(keys, "off"))):
        with pytest.raises(StoreKeyMissing) as caught:
            no_key.load()
        assert not isinstance(caught.value, StoreCorrupt)  # never moved aside
        assert str(path) in str(caught.value) and "; fix: " in str(caught.value)
        assert_clean_exception(caught.value)
    assert path.read_bytes() == data


def test_off_says_why_a_sealed_file_is_not_rewritten_in_plain_text(
        path: Path, keys: Path) -> None:
    save_sealed(path, keys)
    with pytest.raises(StoreKeyMissing, match=r"storage\.encryption is off"):
        CredentialStore(path, encryption=encryption(keys, "off")).load()


def test_a_wrong_key_is_a_typed_error_that_names_it(path: Path, keys: Path,
                                                    tmp_path: Path) -> None:
    data = save_sealed(path, keys)
    other = tmp_path / "other"
    deliver_key(other)
    with pytest.raises(StoreUnsealable) as caught:
        sealed_store(path, other).load()
    assert isinstance(caught.value, StoreCorrupt)  # moved aside; a new sign-in follows
    assert "another" in str(caught.value) and str(path) in str(caught.value)
    assert_clean_exception(caught.value)
    assert_no_key(str(caught.value), (other / STORE_KEY).read_bytes())
    assert path.read_bytes() == data


def test_every_flipped_byte_fails_cleanly(path: Path, keys: Path) -> None:
    data = save_sealed(path, keys)
    version_at = data.index(b'"version": 2') + len(b'"version": ')
    failures: dict[type[BaseException], int] = {}
    for at in range(len(data)):
        for mask in (0x01, 0x80):
            flipped = bytearray(data)
            flipped[at] ^= mask
            path.write_bytes(bytes(flipped))
            with pytest.raises(StoreError) as caught:
                sealed_store(path, keys).load()
            kind = type(caught.value)
            # The version digit read as 3 is a newer agent's file: refused, left alone.
            expected = (StoreTooNew,) if at == version_at and mask == 0x01 else (StoreCorrupt,)
            assert isinstance(caught.value, expected), (at, mask, caught.value)
            failures[kind] = failures.get(kind, 0) + 1
    assert StoreUnsealable in failures  # the AEAD check, not only the JSON parser


BOUND: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("client_id", _setting(("client_id",), "another-client")),
    ("issuer", _setting(("issuer",), "https://evil.example.com/")),
    ("issuer-null", _setting(("issuer",), None)),
    ("claims.name", _setting(("claims", "name"), "Mallory")),
    ("claims-added", _setting(("claims", "role"), "admin")),
    ("machine_id", _setting(("machine_id",), "0" * 32)),
    ("tokens.token_type", _setting(("tokens", "token_type"), "DPoP")),
    ("tokens.issued_at", _setting(("tokens", "issued_at"), 1_800_000_000.25)),
    ("tokens.expires_at", _setting(("tokens", "expires_at"), 2_000_000_000.0)),
    ("tokens.expires_at-null", _setting(("tokens", "expires_at"), None)),
    ("tokens.scope", _setting(("tokens", "scope"), "openid admin")),
    ("a-field-added", _setting(("note",), "added by hand")),
    ("sealed.key_id", _setting(("sealed", "key_id"), "0" * 16)),
    ("sealed.nonce", _setting(("sealed", "nonce"), base64.b64encode(bytes(12)).decode())),
    ("sealed.cipher", _setting(("sealed", "cipher"), "AES-256-GCM")),
    ("sealed.ciphertext-cut", lambda d: d["sealed"].update(
        ciphertext=d["sealed"]["ciphertext"][:-8])),
    ("sealed-missing", lambda d: d.pop("sealed")),
    ("a-token-put-back-in-plain", _setting(("tokens", "access_token"), "at-planted")),
]


@pytest.mark.parametrize(("name", "mutate"), BOUND, ids=[name for name, _ in BOUND])
def test_an_edited_metadata_field_fails_to_open(path: Path, keys: Path, name: str,
                                                mutate: Callable[[dict[str, Any]], None]
                                                ) -> None:
    document = json.loads(save_sealed(path, keys))
    mutate(document)
    edited = json.dumps(document).encode()
    path.write_bytes(edited)
    with pytest.raises(StoreCorrupt) as caught:
        sealed_store(path, keys).load()
    assert_clean_exception(caught.value)
    assert path.read_bytes() == edited


def test_the_same_ciphertext_spelt_otherwise_fails_too(path: Path, keys: Path) -> None:
    # base64 lets the last character's unused bits vary: the bytes decode the same, but
    # an edited byte must never read as the same file.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    for extra in ("", "x", "xy"):
        tokens = dataclasses.replace(SAMPLE.tokens, access_token=SAMPLE.tokens.access_token
                                     + extra)
        creds = dataclasses.replace(SAMPLE, tokens=tokens)
        document = json.loads(save_sealed(path, keys, creds))
        text = document["sealed"]["ciphertext"]
        if text.endswith("="):
            break
    else:
        raise AssertionError("no ciphertext with unused bits to respell")
    body = text.rstrip("=")
    respelt = body[:-1] + alphabet[alphabet.index(body[-1]) + 1] + text[len(body):]
    assert base64.b64decode(respelt) == base64.b64decode(text)
    document["sealed"]["ciphertext"] = respelt
    path.write_text(json.dumps(document))
    with pytest.raises(StoreUnsealable, match="not base64"):
        sealed_store(path, keys).load()


def test_a_reformatted_file_still_opens(path: Path, keys: Path) -> None:
    # The values are bound, not their layout: a person may pretty-print the file.
    document = json.loads(save_sealed(path, keys))
    path.write_text(json.dumps(document, indent=8, sort_keys=True))
    assert sealed_store(path, keys).load() == SAMPLE


def test_a_sealed_part_swapped_in_from_another_file_fails(path: Path, keys: Path,
                                                          tmp_path: Path) -> None:
    # Two sign-ins of the same client: the sealed part of one under the other's
    # metadata. And the session file's sealed part in the credential file.
    older = json.loads(save_sealed(path, keys, make_credentials("S")))
    newer = json.loads(save_sealed(path, keys, make_credentials("S")))
    newer["tokens"]["issued_at"] += 300
    path.write_text(json.dumps({**newer, "sealed": older["sealed"]}))
    with pytest.raises(StoreUnsealable):
        sealed_store(path, keys).load()
    session = tmp_path / "state" / "session.json"
    SessionFile(session, encryption=encryption(keys)).save(RECORD)
    path.write_text(json.dumps({**older, "sealed": json.loads(session.read_text())["sealed"]}))
    with pytest.raises(StoreUnsealable):
        sealed_store(path, keys).load()


# -- moving aside, migrating, signing in anew ----------------------------------------

def test_a_plain_corrupt_file_is_moved_aside_sealed(path: Path, keys: Path) -> None:
    path.parent.mkdir(mode=0o700)
    plain = json.dumps({"version": 1, "tokens": {
        "refresh_token": SAMPLE.tokens.refresh_token, "access_token": SAMPLE.tokens.access_token,
        "id_token": SAMPLE.tokens.id_token}}).encode()[:-2]
    path.write_bytes(plain)
    os.chmod(path, 0o600)
    with sealed_store(path, keys) as store:
        with pytest.raises(StoreCorrupt):
            store.load()
        moved = store.quarantine(stamp="20261201T000000Z")
    assert moved is not None and not path.exists()
    aside = moved.read_bytes()
    assert_no_secret(aside.decode())
    assert stat.S_IMODE(moved.stat().st_mode) == 0o600
    assert json.loads(aside)["sealed"]["cipher"] == "ChaCha20-Poly1305"


def test_a_sealed_corrupt_file_is_moved_aside_as_it_is(path: Path, keys: Path,
                                                       tmp_path: Path) -> None:
    data = save_sealed(path, keys)
    other = tmp_path / "other"
    deliver_key(other)
    with sealed_store(path, other) as store:
        with pytest.raises(StoreUnsealable):
            store.load()
        moved = store.quarantine(stamp="20261201T000000Z")
    assert moved is not None and moved.read_bytes() == data


async def _signed_in(provider: IdentityProvider, store: CredentialStore, clock: Any,
                     transport: Any) -> Running:
    run = Running(Driver(settings_for(provider), sender=transport, store=store, clock=clock),
                  clock)
    await run.until_phase(Phase.AWAITING_USER)
    provider.approve()
    await run.until_phase(Phase.SIGNED_IN)
    return run


async def _signed_in_in_plain_text(provider: IdentityProvider, store_path: Path, clock: Any,
                                   transport: Any) -> Credentials:
    """A sign-in stored without a key, as before sealing: what a first start with a
    key finds."""
    with CredentialStore(store_path) as store:
        run = await _signed_in(provider, store, clock, transport)
        await run.stop()
    plain = CredentialStore(store_path).load()
    assert plain is not None and plain.tokens.refresh_token is not None
    return plain


def _refreshes(provider: IdentityProvider) -> int:
    return sum(1 for r in provider.requests
               if r.endpoint == "token" and r.form.get("grant_type") == "refresh_token")


async def test_a_tampered_store_is_kept_aside_and_a_new_sign_in_starts(
        provider: IdentityProvider, store_path: Path, keys: Path, clock: Any,
        transport: Any) -> None:
    with sealed_store(store_path, keys) as store:
        run = await _signed_in(provider, store, clock, transport)
        await run.stop()
    document = json.loads(store_path.read_text())
    document["claims"]["name"] = "Mallory"
    tampered = json.dumps(document).encode()
    store_path.write_bytes(tampered)
    with sealed_store(store_path, keys) as store:
        run = Running(Driver(settings_for(provider), sender=transport, store=store,
                             clock=clock), clock)
        shown = await run.until_phase(Phase.AWAITING_USER)
        assert shown.user is None  # not signed in from the tampered file
        aside = sorted(store_path.parent.glob("credentials.json.corrupt-*"))
        assert [p.read_bytes() for p in aside] == [tampered]
        assert not store_path.exists()
        provider.approve()
        await run.until_phase(Phase.SIGNED_IN)
        await run.stop()
    assert sealed_store(store_path, keys).load() is not None
    assert not [p for p in store_path.parent.iterdir() if p.name.endswith(".tmp")]


async def test_a_plain_store_is_sealed_and_refreshed_at_once_on_the_first_start_with_a_key(
        provider: IdentityProvider, store_path: Path, keys: Path, clock: Any,
        transport: Any, caplog: pytest.LogCaptureFixture) -> None:
    plain = await _signed_in_in_plain_text(provider, store_path, clock, transport)
    assert provider.settings.rotate_refresh_tokens
    assert provider.refresh_token_valid(plain.tokens.refresh_token)
    before = _refreshes(provider)
    caplog.set_level(logging.INFO)
    with sealed_store(store_path, keys) as store:
        run = Running(Driver(settings_for(provider), sender=transport, store=store,
                             clock=clock), clock)
        # At once: within a second of the start, long before the token's refresh is due.
        await run.clock.run_until(lambda: _refreshes(provider) > before
                                  and not run.driver.session.refreshing, max_seconds=1)
        await run.stop()
    # On disk sealed, before and after the refresh; the plain copy's token is dead.
    data = store_path.read_text()
    assert json.loads(data)["version"] == SEALED_FORMAT_VERSION
    assert plain.tokens.refresh_token not in data
    assert not provider.refresh_token_valid(plain.tokens.refresh_token)
    sealed = sealed_store(store_path, keys).load()
    assert sealed is not None and sealed.tokens.refresh_token is not None
    assert provider.refresh_token_valid(sealed.tokens.refresh_token)
    assert "plain text" in caplog.text
    assert_no_secret(caplog.text, plain)


# -- the session file ----------------------------------------------------------------

def test_the_session_file_seals_the_device_code_and_the_revocations(
        tmp_path: Path, keys: Path) -> None:
    path = tmp_path / "state" / "session.json"
    path.parent.mkdir(mode=0o700)
    SessionFile(path, encryption=encryption(keys)).save(RECORD)
    text = path.read_text()
    assert DEVICE_CODE not in text and REVOKE not in text
    document = json.loads(text)
    assert document["version"] == 2
    assert document["pending_code"]["user_code"] == "123456789"  # on screen anyway
    assert SessionFile(path, encryption=encryption(keys)).load() == RECORD


def test_a_sealed_session_file_without_a_key_is_refused_and_kept(
        tmp_path: Path, keys: Path) -> None:
    path = tmp_path / "state" / "session.json"
    path.parent.mkdir(mode=0o700)
    SessionFile(path, encryption=encryption(keys)).save(RECORD)
    data = path.read_bytes()
    for no_key in (SessionFile(path), SessionFile(path, encryption=encryption(keys, "off"))):
        with pytest.raises(StoreKeyMissing) as caught:
            no_key.load()
        assert str(path) in str(caught.value)
        for secret in (DEVICE_CODE, REVOKE):
            assert secret not in str(caught.value)
    assert path.read_bytes() == data


def test_a_tampered_session_file_is_dropped_as_a_damaged_one_is(
        tmp_path: Path, keys: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state" / "session.json"
    path.parent.mkdir(mode=0o700)
    SessionFile(path, encryption=encryption(keys)).save(RECORD)
    document = json.loads(path.read_text())
    document["codes_expired_unused"] = 0
    path.write_text(json.dumps(document))
    with caplog.at_level(logging.WARNING):
        assert SessionFile(path, encryption=encryption(keys)).load() == SessionRecord()
    assert "altered after it was sealed" in caplog.text
    for secret in (DEVICE_CODE, REVOKE):
        assert secret not in caplog.text


async def test_a_plain_session_file_is_read_and_sealed_by_the_next_start(
        store_path: Path, keys: Path, clock: Any, transport: Any,
        provider: IdentityProvider) -> None:
    session = store_path.with_name("session.json")
    with CredentialStore(store_path):
        SessionFile(session).save(RECORD)
    assert DEVICE_CODE in session.read_text()
    with sealed_store(store_path, keys) as store:
        driver = Driver(settings_for(provider), sender=transport, store=store, clock=clock)
        await driver.load()
        await driver.aclose()
    assert DEVICE_CODE not in session.read_text()
    assert json.loads(session.read_text())["version"] == 2


def test_sealing_leaves_the_callers_document_alone(keys: Path) -> None:
    sealer = encryption(keys).sealer()
    assert sealer is not None
    document = {"version": 2, "tokens": {"access_token": "x", "scope": None}}
    before = copy.deepcopy(document)
    sealed = sealer.seal(document, [("tokens", "access_token")], purpose="test")
    assert document == before
    assert "access_token" not in sealed["tokens"]
    assert sealer.unseal(sealed, purpose="test") == document
    with pytest.raises(StoreUnsealable):
        sealer.unseal(sealed, purpose="another purpose")


class _StoreThatCannotWrite(CredentialStore):
    """A store on an SD card gone read-only, or full: every save fails."""

    def save(self, credentials: Credentials) -> None:
        raise StoreError(f"cannot write {self.path}: No space left on device")


async def test_a_plain_store_that_could_not_be_sealed_is_not_refreshed_at_once(
        provider: IdentityProvider, store_path: Path, keys: Path, clock: Any,
        transport: Any, caplog: pytest.LogCaptureFixture) -> None:
    # The extra refresh is for a plain copy that is no longer the file in use. When
    # sealing failed the plain file is still the store, and a refresh now would rotate
    # its refresh token away while the new one could not be written: a power cut then
    # costs the sign-in.
    plain = await _signed_in_in_plain_text(provider, store_path, clock, transport)
    before = _refreshes(provider)
    with _StoreThatCannotWrite(store_path, encryption=encryption(keys)) as store:
        run = Running(Driver(settings_for(provider), sender=transport, store=store,
                             clock=clock), clock)
        caplog.set_level(logging.INFO, logger="agent.driver")
        await run.until_phase(Phase.SIGNED_IN)
        # The refresh at once is a task spawned as the store loads; its first step logs
        # that it refreshes. A few turns of the loop give it that step.
        for _ in range(20):
            await asyncio.sleep(0)
        assert "refreshing at once" not in caplog.text
        await run.stop()
    assert _refreshes(provider) == before
    assert provider.refresh_token_valid(plain.tokens.refresh_token)


def _as_jq_prints_it(data: bytes) -> bytes:
    # jq 1.6 (Debian bookworm) reads every number as a double and prints a whole one
    # without its fraction: 5.0 comes out as 5.
    document = json.loads(data, parse_float=lambda text: (
        int(float(text)) if float(text).is_integer() else float(text)))
    return json.dumps(document, indent=2).encode()


def test_a_sealed_file_pretty_printed_by_jq_still_opens(tmp_path: Path, keys: Path) -> None:
    # A person looks at the file with `jq .` and saves it back: the values are the same,
    # so the file must still open, as a plain one does.
    credentials = dataclasses.replace(SAMPLE, tokens=dataclasses.replace(
        SAMPLE.tokens, issued_at=1_700_000_000.0, expires_at=1_700_003_600.0))
    store_file = tmp_path / "store" / "credentials.json"
    with CredentialStore(store_file, encryption=encryption(keys)) as store:
        store.save(credentials)
    store_file.write_bytes(_as_jq_prints_it(store_file.read_bytes()))
    assert b"1700003600," in store_file.read_bytes()
    assert CredentialStore(store_file, encryption=encryption(keys)).load() == credentials
    session_file = tmp_path / "session" / "session.json"
    session_file.parent.mkdir(mode=0o700)
    SessionFile(session_file, encryption=encryption(keys)).save(RECORD)
    session_file.write_bytes(_as_jq_prints_it(session_file.read_bytes()))
    assert SessionFile(session_file, encryption=encryption(keys)).load() == RECORD


def test_a_cryptography_without_chacha20_is_a_configuration_error(
        keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An OpenSSL in FIPS mode refuses ChaCha20-Poly1305: without this, the traceback
    # exited 1 and systemd restarted the agent in a loop, with nothing on the panel.
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.ciphers import aead

    class Refused:
        def __init__(self, key: bytes) -> None:
            raise UnsupportedAlgorithm("ChaCha20Poly1305 is not supported by this version "
                                       "of OpenSSL.")

    monkeypatch.setattr(aead, "ChaCha20Poly1305", Refused)
    with pytest.raises(ConfigError) as raised:
        encryption(keys).sealer()
    assert raised.value.key == "storage.encryption"
    assert "ChaCha20-Poly1305" in str(raised.value)
