"""Every exception device-agent raises, in one tree.

Foreign exceptions (aiohttp, OSError, yaml, json) are translated once, at the module
that talks to the foreign library; everything above that boundary sees only these.
No message ever carries a token, a device code or a secret.

    AgentError
    ├── ConfigError                  a config key is missing, unknown or invalid (exit 78)
    ├── StoreError
    │   ├── StoreLocked              another agent holds the credential store
    │   ├── StoreInsecure            the file or its directory is open to other users
    │   ├── StoreCorrupt             the file does not parse; it is moved aside
    │   │   └── StoreUnsealable      sealed, but the key delivered does not open it
    │   ├── StoreTooNew              written by a newer device-agent: refused, kept
    │   └── StoreKeyMissing          sealed, and no key to open it: refused, kept
    ├── TransportError               no usable HTTP answer
    │   ├── ConnectFailed            refused, unreachable, reset, dropped
    │   │   └── NameNotResolved      the provider's host name does not resolve
    │   ├── RequestTimeout
    │   ├── TLSFailed                certificate or handshake trouble (never retried blindly)
    │   └── ResponseTooLarge
    ├── ProviderError                an answer arrived but is unusable
    │   ├── DiscoveryFailed          the metadata document is missing or wrong
    │   └── MalformedResponse        not JSON, or a required field is absent or mistyped
    ├── OAuthError                   an RFC 6749 §5.2 / RFC 8628 §3.5 error code
    │   ├── InvalidRequest  InvalidClient  InvalidGrant  UnauthorizedClient
    │   ├── UnsupportedGrantType  InvalidScope  AccessDenied  ExpiredToken
    │   ├── AuthorizationPending  SlowDown  ServerError  TemporarilyUnavailable
    │   └── UnknownOAuthError        any code not in the table
    ├── NotSignedIn                  no valid token to hand out
    ├── ProviderUnavailable          no token fresh enough: the provider is not answering
    ├── MinTtlTooLong                no token this provider issues lives that long
    ├── CommandRefused               an MQTT message on the command topic that is no command
    └── IllegalInput                 an input the lifecycle (agent.session) does not accept
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "OAUTH_ERRORS",
    "STORE_NEEDS_A_PERSON",
    "AccessDenied",
    "AgentError",
    "AuthorizationPending",
    "CommandRefused",
    "ConfigError",
    "ConnectFailed",
    "DiscoveryFailed",
    "ExpiredToken",
    "IllegalInput",
    "InvalidClient",
    "InvalidGrant",
    "InvalidRequest",
    "InvalidScope",
    "MalformedResponse",
    "MinTtlTooLong",
    "NameNotResolved",
    "NotSignedIn",
    "OAuthError",
    "ProviderError",
    "ProviderUnavailable",
    "RequestTimeout",
    "ResponseTooLarge",
    "ServerError",
    "SlowDown",
    "StoreCorrupt",
    "StoreError",
    "StoreInsecure",
    "StoreKeyMissing",
    "StoreLocked",
    "StoreTooNew",
    "StoreUnsealable",
    "TLSFailed",
    "TemporarilyUnavailable",
    "TransportError",
    "UnauthorizedClient",
    "UnknownOAuthError",
    "UnsupportedGrantType",
    "oauth_error",
]


class AgentError(Exception):
    """Base of everything device-agent raises on purpose."""


class ConfigError(AgentError):
    """A problem with the value at `key` (a dotted path), on `line` of the file when
    known. A file with several problems raises the first, with all of them in
    `errors`, so a person fixes them in one go."""

    def __init__(self, key: str, message: str, *, line: int | None = None,
                 errors: Sequence[ConfigError] = ()) -> None:
        self.key = key
        self.message = message
        self.line = line
        self.errors: tuple[ConfigError, ...] = tuple(errors) or (self,)
        where = f"{key} (line {line})" if key and line is not None else key
        text = f"{where}: {message}" if where else message
        if len(self.errors) > 1:
            text += f" (and {len(self.errors) - 1} more: check-config lists them)"
        super().__init__(text)

    def at_line(self, line: int | None) -> ConfigError:
        return ConfigError(self.key, self.message, line=line)


class StoreError(AgentError):
    pass


class StoreLocked(StoreError):
    pass


class StoreInsecure(StoreError):
    pass


class StoreCorrupt(StoreError):
    pass


class StoreUnsealable(StoreCorrupt):
    """Sealed with another key, or altered since it was sealed: its secrets cannot be
    had, so like any corrupt file it is moved aside and a new sign-in starts."""


class StoreTooNew(StoreError):
    """Not corrupt: an upgrade reads it. Never moved aside or overwritten."""


class StoreKeyMissing(StoreError):
    """Sealed, and this agent has no key for it (none delivered, or encryption off).
    Never moved aside or rewritten: delivering the key reads it."""


# Restarting cannot fix these, only a person: the CLI exits 78 and the panel says how.
STORE_NEEDS_A_PERSON: tuple[type[StoreError], ...] = (StoreInsecure, StoreTooNew,
                                                      StoreKeyMissing)


class TransportError(AgentError):
    pass


class ConnectFailed(TransportError):
    pass


class NameNotResolved(ConnectFailed):
    """The provider's host name does not resolve: DNS is down, or the name is wrong."""


class RequestTimeout(TransportError):
    pass


class TLSFailed(TransportError):
    pass


class ResponseTooLarge(TransportError):
    pass


class ProviderError(AgentError):
    pass


class DiscoveryFailed(ProviderError):
    """`fix`, when known: what a person should change (shown by check-provider)."""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


class MalformedResponse(ProviderError):
    pass


class NotSignedIn(AgentError):
    pass


class ProviderUnavailable(AgentError):
    """A token fresh enough could not be had because the provider is not answering."""


class IllegalInput(AgentError):
    """An input the session's state does not accept (h11's LocalProtocolError), raised
    before anything changes; also what a request to an agent that is stopping gets."""


class MinTtlTooLong(AgentError):
    """No token this provider issues lives as long as was asked: refreshing would not
    help, and refreshing on every such request would wear the provider and the disk."""


class CommandRefused(AgentError):
    """A message on the MQTT command topic that is not a command this agent knows: the
    broker passes on whatever anyone allowed to publish there sent."""


class OAuthError(AgentError):
    """An error code from the provider. `code` is the wire value; `description` is the
    provider's `error_description`, which is shown to people but never trusted."""

    code = ""

    def __init__(self, description: str | None = None, *, code: str | None = None,
                 status: int | None = None) -> None:
        if code is not None:
            self.code = code
        self.description = description
        self.status = status
        text = self.code + (f": {description}" if description else "")
        super().__init__(text)


class InvalidRequest(OAuthError):
    code = "invalid_request"


class InvalidClient(OAuthError):
    code = "invalid_client"


class InvalidGrant(OAuthError):
    code = "invalid_grant"


class UnauthorizedClient(OAuthError):
    code = "unauthorized_client"


class UnsupportedGrantType(OAuthError):
    code = "unsupported_grant_type"


class InvalidScope(OAuthError):
    code = "invalid_scope"


class AccessDenied(OAuthError):
    code = "access_denied"


class ExpiredToken(OAuthError):
    code = "expired_token"


class AuthorizationPending(OAuthError):
    code = "authorization_pending"


class SlowDown(OAuthError):
    code = "slow_down"


class ServerError(OAuthError):
    code = "server_error"


class TemporarilyUnavailable(OAuthError):
    code = "temporarily_unavailable"


class UnknownOAuthError(OAuthError):
    pass


OAUTH_ERRORS: dict[str, type[OAuthError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest, InvalidClient, InvalidGrant, UnauthorizedClient,
        UnsupportedGrantType, InvalidScope, AccessDenied, ExpiredToken,
        AuthorizationPending, SlowDown, ServerError, TemporarilyUnavailable,
    )
}


def oauth_error(code: str, description: str | None = None, *,
                status: int | None = None) -> OAuthError:
    """The exception for a wire error code, through the table above."""
    cls = OAUTH_ERRORS.get(code)
    if cls is None:
        return UnknownOAuthError(description, code=code, status=status)
    return cls(description, status=status)
