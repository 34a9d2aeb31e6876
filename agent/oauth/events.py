"""What the sans-IO core makes of a provider's answer (h11 style: frozen, keyword-only).

Times are monotonic seconds, as passed in by the caller as `now`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.errors import OAuthError
from agent.oauth.models import DeviceAuthorization, TokenSet

__all__ = [
    "Approved",
    "CodeIssued",
    "Denied",
    "Event",
    "Expired",
    "Pending",
    "RefreshRejected",
    "Refreshed",
    "Rejected",
    "ServerTrouble",
    "SlowDown",
    "Throttled",
]


@dataclass(frozen=True, kw_only=True)
class CodeIssued:
    """The device authorization endpoint gave us a code to show (RFC 8628 §3.2)."""

    authorization: DeviceAuthorization


@dataclass(frozen=True, kw_only=True)
class Throttled:
    """The device authorization endpoint refuses new codes for now.

    authentik answers 429 `slow_down` after 20 requests an hour from one address.
    `retry_after` is the provider's Retry-After in seconds, when it gave one.
    """

    retry_after: float | None


@dataclass(frozen=True, kw_only=True)
class Pending:
    """Still waiting for the person; poll again at `next_poll_at`."""

    next_poll_at: float


@dataclass(frozen=True, kw_only=True)
class SlowDown:
    """Still waiting, and the interval grew by 5 s for good (RFC 8628 §3.5)."""

    interval: float
    next_poll_at: float


@dataclass(frozen=True, kw_only=True)
class Approved:
    """The person approved; the device code was redeemed (RFC 8628 §3.5).

    `notes` names each odd field of the answer and the safe reading applied to it
    (see `agent.oauth.wire.parse_token_answer`); they never hold a token.
    """

    tokens: TokenSet
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Denied:
    """The person refused (RFC 8628 §3.5 access_denied)."""

    description: str | None


@dataclass(frozen=True, kw_only=True)
class Expired:
    """The code is dead: the provider said so, or our own deadline from
    `expires_in` passed. `by_provider` tells which."""

    by_provider: bool


@dataclass(frozen=True, kw_only=True)
class Refreshed:
    """New tokens from a refresh (RFC 6749 §6); `notes` as for `Approved`."""

    tokens: TokenSet
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class RefreshRejected:
    """The refresh token is dead (RFC 6749 §5.2 invalid_grant): sign in again."""

    error: OAuthError


@dataclass(frozen=True, kw_only=True)
class Rejected:
    """The provider refuses our client or request (invalid_client, invalid_scope,
    unauthorized_client, ...). Retrying the same request will not help; a person has to
    fix the provider or the config."""

    error: OAuthError


@dataclass(frozen=True, kw_only=True)
class ServerTrouble:
    """No usable answer this time (5xx, 429, malformed body): retry later.
    `retry_after` is the provider's hint in seconds, when it gave one. `refresh_token`
    is a new refresh token that a refresh answer carried beside no usable access token:
    the provider has rotated by then, so it is the only one left that works."""

    reason: str
    retry_after: float | None = None
    refresh_token: str | None = field(default=None, repr=False)


Event = (
    CodeIssued | Throttled | Pending | SlowDown | Approved | Denied | Expired | Refreshed
    | RefreshRejected | Rejected | ServerTrouble
)
