"""Plain values the sans-IO core consumes and produces."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "Client",
    "DeviceAuthorization",
    "Endpoints",
    "HttpRequest",
    "HttpResponse",
    "TokenSet",
]


@dataclass(frozen=True, kw_only=True)
class Endpoints:
    """Where the provider listens (RFC 8414 / OpenID Connect Discovery names)."""

    device_authorization: str
    token: str
    issuer: str | None = None
    revocation: str | None = None
    userinfo: str | None = None
    scopes_supported: tuple[str, ...] | None = None
    grant_types_supported: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class Client:
    """The OAuth client. Device clients are usually public (RFC 8628 §5.6)."""

    client_id: str
    client_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True, kw_only=True)
class HttpRequest:
    """A request to send. Form values may hold secrets, so they stay out of repr."""

    method: str
    url: str
    form: Mapping[str, str] = field(default_factory=dict, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, kw_only=True)
class HttpResponse:
    status: int
    body: bytes = field(repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        """A header by name, whatever its case (RFC 9110 §5.1)."""
        wanted = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == wanted), None)


@dataclass(frozen=True, kw_only=True)
class DeviceAuthorization:
    """An answer of the device authorization endpoint (RFC 8628 §3.2).

    `issued_at` is on the monotonic clock; the codes die at `deadline`, whatever the
    provider goes on answering (authentik keeps saying authorization_pending).
    """

    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float
    issued_at: float

    @property
    def deadline(self) -> float:
        return self.issued_at + self.expires_in


@dataclass(frozen=True, kw_only=True)
class TokenSet:
    """A token endpoint answer (RFC 6749 §5.1), with times on the wall clock.

    `expires_at` is None when the provider gave no `expires_in`.
    """

    access_token: str = field(repr=False)
    token_type: str
    issued_at: float
    expires_at: float | None
    refresh_token: str | None = field(default=None, repr=False)
    id_token: str | None = field(default=None, repr=False)
    scope: str | None = None
