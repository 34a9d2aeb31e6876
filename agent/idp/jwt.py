"""Compact JWS (RFC 7515 §7.1) signing for the test identity provider, and its JWKS.

authentik signs tokens with the provider's certificate-key pair when one is set (RS256
for an RSA key) and publishes the public half at `/application/o/<slug>/jwks/`; with
no key it signs HS256 with the client secret and publishes an empty key set
(`OAuth2Provider.jwt_key`). The RSA path needs `cryptography`, a test-only dependency,
so it is imported here and only when a key is made; without it the HS256 path is the
honest fallback, exactly what an authentik without a signing key does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any, Protocol

__all__ = [
    "HS256Signer",
    "RS256Signer",
    "Signer",
    "b64url_decode",
    "b64url_encode",
    "decode_unverified",
    "new_signer",
    "rsa_available",
]


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json_segment(value: Mapping[str, Any]) -> str:
    return b64url_encode(json.dumps(value, separators=(",", ":"), sort_keys=True).encode())


def _int_to_b64url(value: int) -> str:
    # RFC 7518 §6.3.1: unsigned big-endian, minimal length.
    return b64url_encode(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWS, without checking the signature.

    Raises ValueError when the token is not three base64url JSON segments.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a compact JWS")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("not a compact JWS") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise ValueError("not a compact JWS")
    return header, claims


class Signer(Protocol):
    alg: str

    def sign(self, claims: Mapping[str, Any]) -> str: ...

    def verify(self, token: str) -> dict[str, Any]:
        """The claims, or ValueError when the signature or header does not match."""
        ...

    def jwks(self) -> dict[str, Any]: ...


class HS256Signer:
    """HMAC-SHA256 (RFC 7518 §3.2). The key is shared, so the JWKS stays empty."""

    alg = "HS256"

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, signing_input: bytes) -> bytes:
        return hmac.new(self._key, signing_input, hashlib.sha256).digest()

    def sign(self, claims: Mapping[str, Any]) -> str:
        signing_input = f"{_json_segment({'alg': self.alg, 'typ': 'JWT'})}.{_json_segment(claims)}"
        return f"{signing_input}.{b64url_encode(self._mac(signing_input.encode()))}"

    def verify(self, token: str) -> dict[str, Any]:
        header, claims = decode_unverified(token)
        if header.get("alg") != self.alg:
            raise ValueError("unexpected algorithm")
        signing_input, _, signature = token.rpartition(".")
        if not hmac.compare_digest(self._mac(signing_input.encode()), b64url_decode(signature)):
            raise ValueError("bad signature")
        return claims

    def jwks(self) -> dict[str, Any]:
        return {"keys": []}


class RS256Signer:
    """RSASSA-PKCS1-v1_5 with SHA-256 (RFC 7518 §3.3) under a key made per instance.

    The `kid` is the RFC 7638 thumbprint of the public key, so a verifier can pick the
    key out of the JWKS by the token header.
    """

    alg = "RS256"

    def __init__(self, key_size: int = 2048) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self._key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
        numbers = self._key.public_key().public_numbers()
        self._jwk: dict[str, str] = {"e": _int_to_b64url(numbers.e), "kty": "RSA",
                                     "n": _int_to_b64url(numbers.n)}
        thumbprint_input = json.dumps(self._jwk, separators=(",", ":"), sort_keys=True)
        self.kid = b64url_encode(hashlib.sha256(thumbprint_input.encode()).digest())

    def sign(self, claims: Mapping[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = {"alg": self.alg, "kid": self.kid, "typ": "JWT"}
        signing_input = f"{_json_segment(header)}.{_json_segment(claims)}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url_encode(signature)}"

    def verify(self, token: str) -> dict[str, Any]:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header, claims = decode_unverified(token)
        if header.get("alg") != self.alg or header.get("kid") != self.kid:
            raise ValueError("unexpected algorithm or key")
        signing_input, _, signature = token.rpartition(".")
        try:
            self._key.public_key().verify(b64url_decode(signature), signing_input.encode(),
                                          padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature as exc:
            raise ValueError("bad signature") from exc
        return claims

    def jwks(self) -> dict[str, Any]:
        return {"keys": [{**self._jwk, "alg": self.alg, "kid": self.kid, "use": "sig"}]}


def rsa_available() -> bool:
    try:
        import cryptography.hazmat.primitives.asymmetric.rsa  # noqa: F401
    except ImportError:
        return False
    return True


def new_signer(hs256_key: bytes) -> Signer:
    """RS256 with a fresh key when `cryptography` is importable, else HS256 with
    `hs256_key` (authentik uses the client secret when the provider has no key)."""
    if rsa_available():
        return RS256Signer()
    return HS256Signer(hs256_key)
