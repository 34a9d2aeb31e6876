"""The store's secrets sealed at rest, with a key no person has to type.

A backup, a copied file or a support tarball of the state directory must not carry the
device's sign-in with it, and a headless device has nobody to type a password. So
systemd delivers the key: `install-service --seal` seals 32 random bytes with
`systemd-creds encrypt` (to the TPM2 where there is one, else to the host key in
/var/lib/systemd/credential.secret), and the unit's `LoadCredentialEncrypted=` hands
the service the key in plain as $CREDENTIALS_DIRECTORY/store-key, on a private
file system that exists only while the service runs. The agent reads it once, at
start, and never writes it anywhere.

What is sealed: the named secret fields of a JSON document (the tokens, a device code,
tokens owed a revocation) move into one AEAD ciphertext. Every other value of the
document, with the purpose of the file, is its associated data: a value edited, added
or removed, or a ciphertext moved in from another file, fails to open. The values are
bound, not their layout, so a person may reformat the file.

ChaCha20-Poly1305, not AES-GCM: the Raspberry Pi's cores before the Pi 5 have no AES
instructions, and ChaCha20 is fast and constant-time in software. A random 96-bit nonce
per write is safe far beyond the few writes a day a store makes.

`cryptography` (the `sealed` extra) is imported only once a key is delivered: a device
without one never loads it. No message raised or logged here carries the key or a
sealed value.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from agent.errors import ConfigError, StoreUnsealable

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = [
    "CIPHER",
    "KEY_SIZE",
    "MODES",
    "SEAL_COMMAND",
    "STORE_KEY",
    "Encryption",
    "Location",
    "Sealer",
    "is_sealed",
]

log = logging.getLogger(__name__)

STORE_KEY: Final = "store-key"
"""The credential's name: $CREDENTIALS_DIRECTORY/store-key."""
KEY_SIZE: Final = 32
MODES: Final = ("auto", "required", "off")
"""storage.encryption: seal when a key is delivered / refuse to start without one / never."""
CIPHER: Final = "ChaCha20-Poly1305"
SEAL_COMMAND: Final = "sudo device-agent install-service --seal"

Location = tuple[str | int, ...]
"""Where a value sits in a JSON document: keys of objects, indexes of lists."""

_SEALED: Final = "sealed"
_NONCE_SIZE: Final = 12
_KEY_ID_LABEL: Final = b"device-agent store-key id"
_KEY_ID = re.compile(r"[0-9a-f]{16}")


def is_sealed(document: object) -> bool:
    """Whether `document` (parsed JSON) holds a sealed part."""
    return isinstance(document, dict) and _SEALED in document


class Sealer:
    """Seals and opens documents with the store key. It holds the key (inside the AEAD
    object) and shows only `key_id`, a keyed hash that tells keys apart."""

    def __init__(self, key: bytes) -> None:
        # Here, not at the top: only a device with a key needs the library. ImportError
        # is the caller's to report as a configuration error.
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        if len(key) != KEY_SIZE:
            raise ValueError(f"a store key is {KEY_SIZE} bytes")
        try:
            self._aead: ChaCha20Poly1305 = ChaCha20Poly1305(key)
        except UnsupportedAlgorithm:
            # An OpenSSL in FIPS mode, say: a fix for a person, not a crash to restart.
            raise ConfigError("storage.encryption", (
                f"this system's cryptography library cannot do {CIPHER} (an OpenSSL in "
                "FIPS mode?); fix: a cryptography built with it, or storage.encryption: "
                "off for a store that was never sealed")) from None
        self.key_id = hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"<Sealer {CIPHER} key_id={self.key_id}>"

    def seal(self, document: Mapping[str, Any], secrets: Iterable[Location], *,
             purpose: str) -> dict[str, Any]:
        """A copy of `document` with the values at `secrets` moved into its sealed part.
        `purpose` names the kind of file, so that one kind's ciphertext does not open
        in another."""
        plain = copy.deepcopy(dict(document))
        moved: list[list[Any]] = []
        for location in secrets:
            parent = _container(plain, location[:-1])
            key = location[-1]
            if not isinstance(parent, dict) or not isinstance(key, str) or key not in parent:
                raise ValueError(f"nothing to seal at {list(location)!r}")
            moved.append([list(location), parent.pop(key)])
        nonce = os.urandom(_NONCE_SIZE)
        part: dict[str, Any] = {"cipher": CIPHER, "key_id": self.key_id, "nonce": _b64(nonce)}
        plain[_SEALED] = part
        payload = json.dumps({"secrets": moved}, ensure_ascii=True, allow_nan=False,
                             separators=(",", ":")).encode("ascii")
        part["ciphertext"] = _b64(self._aead.encrypt(nonce, payload,
                                                     _associated_data(plain, purpose)))
        return plain

    def unseal(self, document: Mapping[str, Any], *, purpose: str) -> dict[str, Any]:
        """`document` as it was before `seal`. Raises StoreUnsealable (its message to
        follow the file's name) when it cannot be opened with this key."""
        from cryptography.exceptions import InvalidTag

        part = document.get(_SEALED)
        if not isinstance(part, dict):
            raise StoreUnsealable("is not a valid sealed file: its sealed part is not an "
                                  "object")
        if part.get("cipher") != CIPHER:
            raise StoreUnsealable(f"is sealed with a cipher this agent does not know "
                                  f"(it seals with {CIPHER})")
        nonce = _unb64(part.get("nonce"), "nonce")
        ciphertext = _unb64(part.get("ciphertext"), "ciphertext")
        if len(nonce) != _NONCE_SIZE:
            raise StoreUnsealable("is not a valid sealed file: its nonce is not "
                                  f"{_NONCE_SIZE} bytes")
        bound = {key: value for key, value in document.items() if key != _SEALED}
        bound[_SEALED] = {key: value for key, value in part.items() if key != "ciphertext"}
        try:
            associated = _associated_data(bound, purpose)
        # allow_nan=False and the integer digit limit raise ValueError; deep nesting,
        # RecursionError. The sealing side never writes such values.
        except (ValueError, TypeError, RecursionError):
            raise StoreUnsealable("holds a value that was never sealed (a non-finite "
                                  "number, a huge integer or deep nesting)") from None
        try:
            payload = self._aead.decrypt(nonce, ciphertext, associated)
        except InvalidTag:
            written_with = part.get("key_id")
            if written_with != self.key_id:
                shown = written_with if isinstance(written_with, str) and _KEY_ID.fullmatch(
                    written_with) else "unreadable"
                raise StoreUnsealable(
                    f"cannot be opened with the store key delivered: it was sealed with "
                    f"another key (key id {shown}; the key delivered is {self.key_id}), "
                    f"or altered") from None
            raise StoreUnsealable("was altered after it was sealed, or is damaged: its "
                                  "sealed part does not match the rest of the file") from None
        return _restore(bound, payload)


def _associated_data(document: Mapping[str, Any], purpose: str) -> bytes:
    # Canonical: the same values give the same bytes, however the file is laid out,
    # and a whole number is one value however it is spelled (jq prints 5.0 as 5).
    return json.dumps({"purpose": purpose, "document": _whole_numbers(document)},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    return value


def _container(document: Any, path: Iterable[str | int]) -> Any:
    node = document
    for step in path:
        if isinstance(step, str):
            if not isinstance(node, dict) or step not in node:
                return None
        elif isinstance(step, bool) or not isinstance(step, int) or not (
                isinstance(node, list) and 0 <= step < len(node)):
            return None
        node = node[step]
    return node


def _restore(bound: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """The secrets put back where they were taken from. The payload is authentic by
    now; its shape is checked all the same, since a bug must not become a traceback."""
    document = {key: value for key, value in bound.items() if key != _SEALED}
    try:
        secrets = json.loads(payload)["secrets"]
        if not isinstance(secrets, list):
            raise TypeError
        for location, value in secrets:
            if not isinstance(location, list) or not location:
                raise TypeError
            parent = _container(document, location[:-1])
            key = location[-1]
            if not isinstance(parent, dict) or not isinstance(key, str) or key in parent:
                raise TypeError
            parent[key] = value
    except (ValueError, TypeError, KeyError, RecursionError):
        raise StoreUnsealable("is not a valid sealed file: its sealed part does not fit "
                              "the rest of it") from None
    return document


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, name: str) -> bytes:
    if isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            pass
        else:
            # Only the one spelling seal() writes: base64 lets the last character's
            # unused bits vary, and an edited byte must never read as the same file.
            if _b64(data) == value:
                return data
    raise StoreUnsealable(f"is not a valid sealed file: its {name} is not base64")


class Encryption:
    """`storage.encryption` with the key systemd delivers for it: whether the store's
    secrets are sealed, and with what. Settled at the first `sealer()` (the store's
    open()), so the key is read once and a missing one is warned of once."""

    def __init__(self, mode: str = "auto", *, environ: Mapping[str, str] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"storage.encryption is one of {', '.join(MODES)}")
        self.mode = mode
        self._environ = os.environ if environ is None else environ
        self._settled = False
        self._sealer: Sealer | None = None

    def __repr__(self) -> str:
        return f"<Encryption {self.mode}>"

    def sealer(self) -> Sealer | None:
        """The sealer to write with, or None for plain text. Raises ConfigError when
        `required` finds no key, or a key comes without `cryptography` installed or is
        not a store key."""
        if not self._settled:
            self._sealer = self._settle()
            self._settled = True
        return self._sealer

    def why_no_key(self) -> str:
        """Why a sealed file cannot be opened here, worded "...; fix: ..." (the
        configuration-error screen shows the fix)."""
        if self.mode == "off":
            return ("storage.encryption is off, and a sealed store is never rewritten in "
                    "plain text; fix: set storage.encryption to auto and deliver the key "
                    f"({SEAL_COMMAND}), or delete credentials.json and session.json to sign in "
                    "anew in plain text")
        return (f"no store key is delivered ({self._where()}); fix: deliver the key it was "
                f"sealed with (LoadCredentialEncrypted={STORE_KEY}:..., as "
                f"{SEAL_COMMAND} writes it)")

    def _where(self) -> str:
        directory = self._environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            return ("CREDENTIALS_DIRECTORY is not set: not started by a unit with "
                    f"LoadCredentialEncrypted={STORE_KEY}:...")
        return f"there is no {Path(directory) / STORE_KEY}"

    def _settle(self) -> Sealer | None:
        if self.mode == "off":
            return None
        key = self._read_key()
        if key is None:
            if self.mode == "required":
                raise ConfigError("storage.encryption", (
                    f"is required, but no store key is delivered ({self._where()}); "
                    f"fix: {SEAL_COMMAND}"))
            log.warning("no store key is delivered (%s): the tokens are kept in plain text; "
                        "`%s` seals them, and storage.encryption: required refuses to "
                        "start without the key", self._where(), SEAL_COMMAND)
            return None
        try:
            sealer = Sealer(key)
        except ImportError:
            raise ConfigError("storage.encryption", (
                "a store key is delivered, but the Python package cryptography is not "
                "installed; fix: pip install 'device-agent[sealed]' (Raspberry Pi OS: "
                "apt install python3-cryptography), or, for a store that was never sealed, "
                "storage.encryption: off"
            )) from None
        log.info("the tokens are sealed with the store key systemd delivers (%s, key id %s)",
                 CIPHER, sealer.key_id)
        return sealer

    def _read_key(self) -> bytes | None:
        directory = self._environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            return None
        path = Path(directory) / STORE_KEY
        try:
            with open(path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                key = file.read(KEY_SIZE + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError("storage.encryption", (
                f"cannot read the store key {path} "
                f"({exc.strerror or type(exc).__name__})")) from None
        if len(key) != KEY_SIZE or size != KEY_SIZE:
            raise ConfigError("storage.encryption", (
                f"the store key {path} holds {size} bytes, not {KEY_SIZE}; fix: remove "
                f"/etc/device-agent/store-key.cred and run {SEAL_COMMAND} again"))
        return key
