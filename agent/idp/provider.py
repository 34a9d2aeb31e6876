"""A test identity provider that answers like authentik 2026.2.2 on the wire.

The tests drive the agent against it over real loopback HTTP, and `device-agent demo`
runs it so a person can approve a code in a browser. Behaviour mirrors authentik's
`authentik/providers/oauth2/` (see `authentik-device-flow.md`):

- the device authorization endpoint (RFC 8628 §3.1/§3.2) at `/application/o/device/`:
  9-digit user codes, 128-character device codes with punctuation, `interval` 5,
  `expires_in` from the access code validity, a 20-an-hour throttle per client IP that
  answers 429 `slow_down`;
- the token endpoint (RFC 8628 §3.4/§3.5, RFC 6749 §5 and §6) at
  `/application/o/token/`: every error is HTTP 400 with `error`, `error_description`
  and `request_id`; single-use device codes; rotation of refresh tokens on every use;
  a refresh token only when `offline_access` was requested; three expiry behaviours;
- userinfo, revocation (RFC 7009), introspection (RFC 7662), JWKS and discovery
  (OpenID Connect Discovery 1.0 §4, RFC 8414 §3).

Time comes from an injected clock, so tests move minutes of expiry in milliseconds.
Per-test behaviour is scripted with `script()`: a failure, a dropped connection, a
delay, an answer cut short or an arbitrary answer for the next requests to one endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import re
import secrets
import ssl
import string
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from http import HTTPStatus
from typing import Any

from aiohttp import web

from agent.clock import Clock, SystemClock
from agent.idp import page
from agent.idp.jwt import Signer, new_signer

__all__ = [
    "ENDPOINTS",
    "Action",
    "Answer",
    "Cut",
    "Delay",
    "Drop",
    "ExpiryMode",
    "Fail",
    "IdentityProvider",
    "ProviderSettings",
    "RecordedRequest",
    "Slow",
    "serve_provider",
]

log = logging.getLogger(__name__)

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
REFRESH_GRANT = "refresh_token"

# Endpoint names for `script()` and `RecordedRequest.endpoint`.
ENDPOINTS = frozenset({"discovery", "device", "token", "userinfo", "revoke", "jwks",
                       "introspect", "page"})

# The scope mappings of the provider: the default blueprint's, plus `openid`, which
# authentik always adds to `scopes_supported`.
SUPPORTED_SCOPES = ("openid", "profile", "email", "offline_access")

# authentik's `generate_key()` alphabet (authentik/lib/generators.py).
_DEVICE_CODE_ALPHABET = string.ascii_letters + string.digits + string.punctuation
# `generate_client_secret()`: what opaque refresh tokens are made of.
_REFRESH_ALPHABET = string.ascii_letters + string.digits
ISSUED_KINDS = ("access_token", "refresh_token", "id_token", "device_code")
_HOUR = 3600.0
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# What a person types between the groups of a code: spaces of any kind and dashes.
_TYPED_SEPARATORS = re.compile(r"[\s\-\u2010-\u2015\u2212]+")
# A client cannot portably connect to a wildcard address; loopback reaches the socket.
_LOOPBACK_FOR = {"0.0.0.0": "127.0.0.1", "::": "::1"}

# RFC 6749 §5.2 / RFC 8628 §3.5 descriptions, worded as authentik's errors.py does.
_DESCRIPTIONS = {
    "invalid_request": "The request is otherwise malformed",
    "invalid_client": "Client authentication failed (e.g., unknown client, no client "
                      "authentication included, or unsupported authentication method)",
    "invalid_grant": "The provided authorization grant or refresh token is invalid, "
                     "expired, revoked, does not match the redirection URI used in the "
                     "authorization request, or was issued to another client",
    "unsupported_grant_type": "The authorization grant type is not supported by the "
                              "authorization server",
    "invalid_scope": "The requested scope is invalid, unknown, or malformed",
    "authorization_pending": "The authorization request is still pending",
    "slow_down": "Request was throttled",
    "access_denied": "The resource owner or authorization server denied the request",
    "expired_token": "The device code has expired",
}


class ExpiryMode(StrEnum):
    """What the token endpoint answers for a device code past `expires_in`."""

    # authentik <= 2026.2: the row lives on until the cleanup task (every 5 minutes)
    # deletes it, so polls keep getting authorization_pending, then invalid_grant.
    PENDING_THEN_INVALID_GRANT = "pending-then-invalid_grant"
    # main-2026-04: a default manager hides expired rows, so invalid_grant at once.
    INVALID_GRANT = "invalid_grant"
    # later main (`token/device_code.py`) and RFC 8628 §3.5.
    EXPIRED_TOKEN = "expired_token"


def _default_users() -> dict[str, Mapping[str, str]]:
    return {"alice": {"name": "Alice Example", "email": "alice@example.com"}}


@dataclass(kw_only=True)
class ProviderSettings:
    """One authentik OAuth2 provider and its application. Mutable on purpose: the
    running provider reads it on every request, so a test may change a knob after
    the provider has started."""

    slug: str = "device-agent"
    client_id: str = "device-agent"
    client_secret: str | None = field(default=None, repr=False)  # set: confidential
    code_lifetime: float = 60.0          # "Access code validity", default minutes=1
    interval: int | None = 5             # None: the answer omits `interval`
    access_token_lifetime: float = 3600.0
    refresh_token_lifetime: float = 30 * 86400.0
    device_requests_per_hour: int = 20   # AUTHENTIK_THROTTLE__PROVIDERS__OAUTH2__DEVICE
    expiry_mode: ExpiryMode = ExpiryMode.PENDING_THEN_INVALID_GRANT
    cleanup_delay: float = 300.0         # how long expired rows survive
    rotate_refresh_tokens: bool = True   # False: a non-zero refresh_token_threshold
    advertise_device_endpoint: bool = True
    users: Mapping[str, Mapping[str, str]] = field(default_factory=_default_users)
    # Where a person reaches the provider when that is not where the device does (a LAN
    # address, a reverse proxy, `ssh -L`): the verification URIs and the page's links
    # use it; discovery and everything the device calls keep the request's address.
    public_url: str | None = None
    # The consent page names the device from here: the device authorization request
    # carries only client_id and scope (RFC 8628 §3.1), so whoever runs it must say.
    device_name: str | None = None
    # RFC 8628 §6.1 lets a server ignore the spaces and dashes a person types. authentik
    # matches the code exactly, and so does the default, so that the tests catch a
    # screen that shows what cannot be typed; only the demo forgives.
    lenient_user_codes: bool = False
    # What device codes are made of: authentik's alphabet, punctuation and all, by
    # default. A client that does not URL-encode its form bodies (oidc-agent 4.2.6)
    # sends such a code mangled and gets invalid_grant, so a comparison with it narrows
    # this to letters and digits.
    device_code_alphabet: str = _DEVICE_CODE_ALPHABET


# -- scripted behaviours ---------------------------------------------------------------

@dataclass(frozen=True)
class Fail:
    """Answer `status` with a non-OAuth body, as a proxy in front of the provider does."""

    status: int = 500
    body: bytes = b"<html><body><h1>Internal Server Error</h1></body></html>"
    content_type: str = "text/html"


@dataclass(frozen=True)
class Drop:
    """Close the TCP connection without an answer (the client sees a disconnect).

    aiohttp's client resends an idempotent request (GET) once when a reused
    connection drops, so a Drop on discovery or JWKS may consume the next action too.
    """


@dataclass(frozen=True)
class Delay:
    """Wait `seconds` of real time, then answer normally."""

    seconds: float


@dataclass(frozen=True)
class Slow:
    """Answer normally, but only `seconds` of real time after the work is done: the
    provider has rotated the refresh token before the client hears of it."""

    seconds: float


@dataclass(frozen=True)
class Cut:
    """Send the status line, the headers and half the body, then close the connection:
    the client sees an answer begin and never end. With `work`, the endpoint has done
    its work first (a refresh token rotated, a device code redeemed), so what is lost
    is the only copy of the result; without, nothing was done and a canned token
    answer is cut instead."""

    work: bool = True


@dataclass(frozen=True)
class Answer:
    """An arbitrary answer instead of the normal one: `json` is serialised; `body` is
    sent as is (for malformed answers); neither means an empty body."""

    status: int
    json: object | None = None
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.json is not None and self.body is not None:
            raise ValueError("give json or body, not both")


Action = Fail | Drop | Delay | Slow | Cut | Answer


@dataclass(kw_only=True)
class RecordedRequest:
    """One request as it arrived. `status` is None while it is being answered, and
    stays None when the connection was dropped."""

    endpoint: str
    method: str
    path: str
    form: dict[str, str] = field(repr=False)   # holds device codes and tokens
    query: dict[str, str]
    headers: dict[str, str] = field(repr=False)
    at: float
    remote: str | None
    status: int | None = None


# -- server-side state -------------------------------------------------------------------

class _Decision(Enum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"


@dataclass(kw_only=True)
class _DeviceToken:
    device_code: str = field(repr=False)
    user_code: str
    client_id: str
    scopes: tuple[str, ...]
    issued_at: float             # monotonic
    issued_wall: float
    expires_at: float            # monotonic
    serial: int                  # issue order, for "the most recent code"
    decision: _Decision = _Decision.PENDING
    user: str | None = None


@dataclass(kw_only=True)
class _Grant:
    """What an access or refresh token stands for."""

    user: str
    client_id: str
    scopes: tuple[str, ...]
    expires_at: float            # monotonic
    auth_time: int               # wall clock, from the device code's issue
    revoked: bool = False


Handler = Callable[[web.Request, dict[str, str]], Awaitable[web.StreamResponse]]


class _ClientAuth:
    """`extract_client_auth`: a Basic header, when present, wins over the form; it is
    split at the first ':' and not URL-decoded. A malformed header yields nothing."""

    def __init__(self, request: web.Request, form: Mapping[str, str]) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic" and value.strip():
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            client_id, _, secret = decoded.partition(":")
            self.client_id, self.secret = client_id, secret
        else:
            self.client_id = form.get("client_id", "")
            self.secret = form.get("client_secret", "")


class IdentityProvider:
    """The aiohttp application and the handles tests use to script it."""

    def __init__(self, settings: ProviderSettings | None = None, *,
                 clock: Clock | None = None) -> None:
        self.settings = settings if settings is not None else ProviderSettings()
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.base_url = ""
        self.requests: list[RecordedRequest] = []
        self._scripts: dict[str, deque[Action]] = {name: deque() for name in ENDPOINTS}
        self._codes: dict[str, _DeviceToken] = {}          # by device_code
        self._access: dict[str, _Grant] = {}
        self._refresh: dict[str, _Grant] = {}
        self._throttle: dict[str, deque[float]] = {}
        self._serial = itertools.count()
        # Every secret handed out, by kind; the live records above forget a token once
        # it is revoked or redeemed, and never hold ID tokens at all.
        self._issued: dict[str, list[str]] = {kind: [] for kind in ISSUED_KINDS}
        self._auto_approve: tuple[float, str] | None = None
        self._signer: Signer | None = None
        # Used for HS256 when there is neither cryptography nor a client secret.
        self._instance_key = secrets.token_bytes(32)

    # -- addresses ---------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        return f"{self.base_url}/application/o/{self.settings.slug}/"

    def _base(self, request: web.Request) -> str:
        # authentik builds absolute URLs from the request; without serve_provider (an
        # aiohttp test client, say) the request is all there is.
        return self.base_url or str(request.url.origin())

    def _people_base(self, request: web.Request) -> str:
        public = self.settings.public_url
        return public.rstrip("/") if public else self._base(request)

    def _page_action(self) -> str:
        # Relative unless told otherwise, as authentik's own page is: it works through
        # any proxy that maps the root.
        public = self.settings.public_url
        return f"{public.rstrip('/')}/device" if public else "/device"

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            secret = self.settings.client_secret
            self._signer = new_signer(secret.encode() if secret else self._instance_key)
        return self._signer

    # -- scripting -----------------------------------------------------------------------

    def approve(self, user_code: str | None = None, *, user: str = "alice") -> None:
        """Attach `user` to the code, as authentik's finish stage does; the next poll
        gets the tokens. None picks the most recently issued code still known."""
        if user not in self.settings.users:
            raise KeyError(f"unknown user {user!r}")
        token = self._find(user_code)
        token.decision, token.user = _Decision.APPROVED, user
        log.info("device code %s approved for %s", token.user_code, user)

    def deny(self, user_code: str | None = None) -> None:
        """The next poll answers access_denied. authentik never does (a person who
        declines leaves the code pending); other providers do (RFC 8628 §3.5)."""
        token = self._find(user_code)
        token.decision, token.user = _Decision.DENIED, None
        log.info("device code %s denied", token.user_code)

    def auto_approve(self, after: float, *, user: str = "alice") -> None:
        """Approve every code once `after` clock seconds have passed since it was
        issued; checked when the code is polled."""
        if user not in self.settings.users:
            raise KeyError(f"unknown user {user!r}")
        self._auto_approve = (after, user)

    def script(self, endpoint: str, *actions: Action) -> None:
        """Queue one-shot behaviours: each request to `endpoint` pops one."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {sorted(ENDPOINTS)}")
        self._scripts[endpoint].extend(actions)

    def revoke_refresh_tokens(self) -> None:
        """Every refresh token dies, as when an administrator revokes the user's
        sessions: the next refresh gets invalid_grant."""
        for grant in self._refresh.values():
            grant.revoked = True

    def issue_tokens(self, *, user: str = "alice",
                     scopes: tuple[str, ...] = SUPPORTED_SCOPES) -> dict[str, Any]:
        """A token answer body (RFC 6749 §5.1) whose tokens this provider accepts, as a
        redemption would issue them: for tests that script the token endpoint with an
        `Answer` built from it (an odd field, a missing id_token)."""
        if user not in self.settings.users:
            raise KeyError(f"unknown user {user!r}")
        return self._issue(user=user, client_id=self.settings.client_id, scopes=scopes,
                           auth_time=int(self.clock.time()), with_refresh=True)

    def pending_user_codes(self) -> list[str]:
        """User codes neither decided nor past `expires_in`, oldest first."""
        now = self.clock.monotonic()
        self._purge(now)
        return [t.user_code for t in sorted(self._codes.values(), key=lambda t: t.serial)
                if t.decision is _Decision.PENDING and now < t.expires_at]

    def access_token_valid(self, token: str) -> bool:
        grant = self._access.get(token)
        return grant is not None and self.clock.monotonic() < grant.expires_at

    def live_refresh_tokens(self) -> list[str]:
        """Every refresh token that would be accepted now (tests check none leaks)."""
        return [token for token in self._refresh if self.refresh_token_valid(token)]

    def live_access_tokens(self) -> list[str]:
        return [token for token in self._access if self.access_token_valid(token)]

    def issued_secrets(self) -> dict[str, tuple[str, ...]]:
        """Every access, refresh and ID token and every device code this provider ever
        issued, oldest first, revoked and redeemed ones included: what a test checks
        never reached a log or a screen."""
        return {kind: tuple(values) for kind, values in self._issued.items()}

    def refresh_token_valid(self, token: str) -> bool:
        grant = self._refresh.get(token)
        return (grant is not None and not grant.revoked
                and self.clock.monotonic() < grant.expires_at)

    def _find(self, user_code: str | None) -> _DeviceToken:
        self._purge(self.clock.monotonic())
        if user_code is None:
            if not self._codes:
                raise KeyError("no device code has been issued")
            return max(self._codes.values(), key=lambda t: t.serial)
        for token in self._codes.values():
            if token.user_code == user_code:
                return token
        raise KeyError(f"unknown user code {user_code!r}")

    def _purge(self, now: float) -> None:
        # authentik's clean_expired_models task deletes expired rows every 5 minutes;
        # `cleanup_delay` stands for that lag.
        gone = [code for code, t in self._codes.items()
                if now >= t.expires_at + self.settings.cleanup_delay]
        for code in gone:
            del self._codes[code]

    # -- application ---------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        slug = "{slug}"
        routes: list[tuple[str, str, str, Handler]] = [
            ("GET", f"/application/o/{slug}/.well-known/openid-configuration",
             "discovery", self._discovery),
            ("GET", f"/.well-known/oauth-authorization-server/application/o/{slug}/",
             "discovery", self._discovery),
            ("GET", f"/application/o/{slug}/jwks/", "jwks", self._jwks),
            # Every method reaches the device view: the throttle counts a GET too.
            ("*", "/application/o/device/", "device", self._device),
            ("POST", "/application/o/token/", "token", self._token),
            ("GET", "/application/o/userinfo/", "userinfo", self._userinfo),
            ("POST", "/application/o/userinfo/", "userinfo", self._userinfo),
            ("POST", "/application/o/revoke/", "revoke", self._revoke),
            ("POST", "/application/o/introspect/", "introspect", self._introspect),
            ("GET", "/device", "page", self._page_get),
            ("POST", "/device", "page", self._page_post),
        ]
        for method, path, endpoint, handler in routes:
            app.router.add_route(method, path, self._wrap(endpoint, handler))
        return app

    def _wrap(self, endpoint: str, handler: Handler,
              ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            form = await _read_form(request)
            record = RecordedRequest(
                endpoint=endpoint, method=request.method, path=request.path, form=form,
                query=dict(request.query), headers=dict(request.headers),
                at=self.clock.monotonic(), remote=request.remote,
            )
            self.requests.append(record)
            response = await self._answer(endpoint, request, form, handler)
            record.status = None if isinstance(response, _Dropped) else response.status
            # Only the endpoint and status: forms and headers carry secrets.
            log.debug("%s %s -> %s", request.method, request.path, record.status or "dropped")
            return response

        return wrapped

    async def _answer(self, endpoint: str, request: web.Request, form: dict[str, str],
                      handler: Handler) -> web.StreamResponse:
        queue = self._scripts[endpoint]
        action = queue.popleft() if queue else None
        if isinstance(action, Fail):
            return web.Response(status=action.status, body=action.body,
                                content_type=action.content_type)
        if isinstance(action, Answer):
            headers = dict(action.headers)
            if action.json is not None:
                headers.setdefault("Content-Type", "application/json")
                body = json.dumps(action.json).encode()
            else:
                body = action.body or b""
            return web.Response(status=action.status, body=body, headers=headers)
        if isinstance(action, Drop):
            if request.transport is not None:
                request.transport.close()
            # aiohttp cannot write this to the closed transport and takes it for a
            # client that went away, so nothing reaches the wire.
            return _Dropped()
        if isinstance(action, Cut):
            return await self._cut(request, form, handler, work=action.work)
        if isinstance(action, Delay):
            await asyncio.sleep(action.seconds)
        if isinstance(action, Slow):
            answer = await handler(request, form)
            await asyncio.sleep(action.seconds)
            return answer
        return await handler(request, form)

    async def _cut(self, request: web.Request, form: dict[str, str], handler: Handler, *,
                   work: bool) -> web.StreamResponse:
        if work:
            done = await handler(request, form)
            status = done.status
            body = done.body if isinstance(done, web.Response) and isinstance(
                done.body, bytes) else b""
            content_type = done.content_type
        else:
            status, content_type = 200, "application/json"
            body = json.dumps({"access_token": secrets.token_urlsafe(48),
                               "token_type": "Bearer", "expires_in": 3600}).encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        if request.transport is not None:
            request.transport.write(head + body[:len(body) // 2])
            # close, not abort: the half already written must reach the client first.
            request.transport.close()
        return _Dropped()

    # -- discovery and keys --------------------------------------------------------------

    def _known_slug(self, request: web.Request) -> bool:
        return request.match_info.get("slug") == self.settings.slug

    async def _discovery(self, request: web.Request, form: dict[str, str],
                         ) -> web.StreamResponse:
        """OpenID Connect Discovery 1.0 §4 / RFC 8414 §3: one document at both
        addresses, every URL absolute (authentik's `views/provider.py`)."""
        if not self._known_slug(request):
            return _not_found()
        base = self._base(request)
        issuer = f"{base}/application/o/{self.settings.slug}/"
        document: dict[str, Any] = {
            "issuer": issuer,
            "authorization_endpoint": f"{base}/application/o/authorize/",
            "token_endpoint": f"{base}/application/o/token/",
            "userinfo_endpoint": f"{base}/application/o/userinfo/",
            "end_session_endpoint": f"{issuer}end-session/",
            "introspection_endpoint": f"{base}/application/o/introspect/",
            "revocation_endpoint": f"{base}/application/o/revoke/",
            "device_authorization_endpoint": f"{base}/application/o/device/",
            "jwks_uri": f"{issuer}jwks/",
            "response_types_supported": ["code", "id_token", "id_token token", "code token",
                                         "code id_token", "code id_token token"],
            "response_modes_supported": ["query", "fragment", "form_post"],
            # A static list in authentik, whatever the provider allows.
            "grant_types_supported": ["authorization_code", "refresh_token", "implicit",
                                      "client_credentials", "password", DEVICE_CODE_GRANT],
            "id_token_signing_alg_values_supported": [self.signer.alg],
            "subject_types_supported": ["public"],
            "token_endpoint_auth_methods_supported": ["client_secret_post",
                                                      "client_secret_basic"],
            "scopes_supported": list(SUPPORTED_SCOPES),
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "acr",
                                 "amr", "nonce", "name", "preferred_username", "email",
                                 "email_verified"],
            "code_challenge_methods_supported": ["plain", "S256"],
            "request_parameter_supported": False,
            "claims_parameter_supported": False,
        }
        if not self.settings.advertise_device_endpoint:
            del document["device_authorization_endpoint"]
        return web.json_response(document)

    async def _jwks(self, request: web.Request, form: dict[str, str]) -> web.StreamResponse:
        """The public signing key; empty under HS256, as authentik without a key."""
        if not self._known_slug(request):
            return _not_found()
        return web.json_response(self.signer.jwks())

    # -- device authorization --------------------------------------------------------------

    def _throttled(self, remote: str) -> bool:
        """DRF's AnonRateThrottle as authentik configures it: a rolling window per
        client IP. Requests it refuses are not added to the history, as in DRF."""
        now = self.clock.monotonic()
        history = self._throttle.setdefault(remote, deque())
        while history and history[0] <= now - _HOUR:
            history.popleft()
        if len(history) >= self.settings.device_requests_per_hour:
            return True
        history.append(now)
        return False

    async def _device(self, request: web.Request, form: dict[str, str]) -> web.StreamResponse:
        """RFC 8628 §3.1/§3.2 as `device_backchannel.py` does it: throttle first (every
        method and every outcome counts), form-encoded parameters only, the secret
        never checked, the requested scope stored unfiltered."""
        request_id = uuid.uuid4().hex
        if self._throttled(request.remote or ""):
            log.warning("device authorization throttled for %s", request.remote)
            return _oauth_error("slow_down", request_id, status=429)
        if request.method != "POST":
            return web.Response(status=405, headers={"Allow": "POST"})
        client = _ClientAuth(request, form)
        if client.client_id != self.settings.client_id:
            return _oauth_error("invalid_client", request_id)
        now, wall = self.clock.monotonic(), self.clock.time()
        token = _DeviceToken(
            device_code="".join(secrets.choice(self.settings.device_code_alphabet)
                                for _ in range(128)),
            user_code=self._new_user_code(),
            client_id=client.client_id,
            scopes=tuple(form.get("scope", "").split()),
            issued_at=now, issued_wall=wall,
            expires_at=now + self.settings.code_lifetime,
            serial=next(self._serial),
        )
        self._purge(now)
        self._codes[token.device_code] = token
        self._issued["device_code"].append(token.device_code)
        base = self._people_base(request)
        answer: dict[str, Any] = {
            "device_code": token.device_code,
            "verification_uri": f"{base}/device",
            "verification_uri_complete": f"{base}/device?code={token.user_code}",
            "user_code": token.user_code,
            "expires_in": int(self.settings.code_lifetime),
        }
        if self.settings.interval is not None:
            answer["interval"] = self.settings.interval
        log.info("issued device code, user code %s", token.user_code)
        return _token_response(answer)

    def _new_user_code(self) -> str:
        # `generate_code_fixed_length(9)`: zero-padded digits, unique among live rows.
        while True:
            code = f"{secrets.randbelow(10**9):09d}"
            if all(t.user_code != code for t in self._codes.values()):
                return code

    # -- token endpoint --------------------------------------------------------------------

    def _client_error(self, client: _ClientAuth, *, need_secret: bool) -> str | None:
        if client.client_id != self.settings.client_id:
            return "invalid_client"
        expected = self.settings.client_secret
        if need_secret and expected is not None and not hmac.compare_digest(
                client.secret.encode(), expected.encode()):
            return "invalid_client"
        return None

    async def _token(self, request: web.Request, form: dict[str, str]) -> web.StreamResponse:
        """RFC 6749 §5 with authentik's twist: every error is HTTP 400 (never 401), with
        `request_id`. Confidential clients must send their secret on both grants (the
        device_code check is PR #21700, later main)."""
        request_id = uuid.uuid4().hex
        client = _ClientAuth(request, form)
        grant_type = form.get("grant_type", "")
        need_secret = grant_type in (DEVICE_CODE_GRANT, REFRESH_GRANT)
        problem = self._client_error(client, need_secret=need_secret)
        if problem:
            return _oauth_error(problem, request_id)
        if grant_type == DEVICE_CODE_GRANT:
            return self._device_code_grant(form, client.client_id, request_id)
        if grant_type == REFRESH_GRANT:
            return self._refresh_grant(form, client.client_id, request_id)
        return _oauth_error("unsupported_grant_type", request_id)

    def _device_code_grant(self, form: Mapping[str, str], client_id: str,
                           request_id: str) -> web.Response:
        """RFC 8628 §3.4/§3.5. Expiry follows `settings.expiry_mode`; a code is
        single-use because authentik deletes the DeviceToken on success."""
        now = self.clock.monotonic()
        self._purge(now)
        token = self._codes.get(form.get("device_code", ""))
        if token is None or token.client_id != client_id:
            return _oauth_error("invalid_grant", request_id)
        expired = now >= token.expires_at
        mode = self.settings.expiry_mode
        if expired and mode is ExpiryMode.INVALID_GRANT:
            return _oauth_error("invalid_grant", request_id)
        if expired and mode is ExpiryMode.EXPIRED_TOKEN:
            return _oauth_error("expired_token", request_id)
        # Up to 2026.2 an expired code that is not yet cleaned up behaves as a live one:
        # it can still be approved and redeemed.
        if token.decision is _Decision.PENDING and self._auto_approve is not None:
            after, user = self._auto_approve
            if now - token.issued_at >= after:
                token.decision, token.user = _Decision.APPROVED, user
        if token.decision is _Decision.DENIED:
            del self._codes[token.device_code]
            return _oauth_error("access_denied", request_id)
        if token.decision is _Decision.PENDING or token.user is None:
            return _oauth_error("authorization_pending", request_id)
        del self._codes[token.device_code]
        log.info("device code %s redeemed", token.user_code)
        return _token_response(self._issue(
            user=token.user, client_id=client_id, scopes=token.scopes,
            auth_time=int(token.issued_wall), with_refresh=True))

    def _refresh_grant(self, form: Mapping[str, str], client_id: str,
                       request_id: str) -> web.Response:
        """RFC 6749 §6 as `create_refresh_response` does it: scope omitted means the
        original scopes; a scope sent is clipped to the provider's mappings and must be
        a subset that keeps offline_access. The old token is revoked at once."""
        now = self.clock.monotonic()
        presented = form.get("refresh_token", "")
        grant = self._refresh.get(presented)
        if (grant is None or grant.revoked or now >= grant.expires_at
                or grant.client_id != client_id):
            return _oauth_error("invalid_grant", request_id)
        scopes = grant.scopes
        if "scope" in form:
            asked = [s for s in form["scope"].split() if s in SUPPORTED_SCOPES]
            if not set(asked) <= set(grant.scopes) or "offline_access" not in asked:
                return _oauth_error("invalid_scope", request_id)
            scopes = tuple(asked)
        rotate = self.settings.rotate_refresh_tokens
        answer = self._issue(user=grant.user, client_id=client_id, scopes=scopes,
                             auth_time=grant.auth_time, with_refresh=rotate)
        if rotate:
            grant.revoked = True
        return _token_response(answer)

    def _issue(self, *, user: str, client_id: str, scopes: tuple[str, ...], auth_time: int,
               with_refresh: bool) -> dict[str, Any]:
        """RFC 6749 §5.1 answer. The access token is the ID token's claims plus `azp`,
        `uid` and `scope` (authentik's `to_access_token`); the ID token comes even
        without `openid`, and a refresh token only with `offline_access`."""
        settings = self.settings
        now = self.clock.monotonic()
        iat = int(self.clock.time())
        exp = iat + int(settings.access_token_lifetime)
        id_claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": _subject(user),
            "aud": client_id,
            "exp": exp,
            "iat": iat,
            "auth_time": auth_time,
            "acr": "goauthentik.io/providers/oauth2/default",
            "amr": ["pwd"],
            "sid": secrets.token_hex(32),
            **self._user_claims(user, scopes),
        }
        access_claims = {**id_claims, "jti": secrets.token_hex(32), "azp": client_id,
                         "uid": secrets.token_hex(32), "scope": " ".join(scopes)}
        id_claims["jti"] = secrets.token_hex(32)
        access_token = self.signer.sign(access_claims)
        self._access[access_token] = _Grant(
            user=user, client_id=client_id, scopes=scopes,
            expires_at=now + settings.access_token_lifetime, auth_time=auth_time)
        answer: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "scope": " ".join(scopes),
            "expires_in": int(settings.access_token_lifetime),
            "id_token": self.signer.sign(id_claims),
        }
        self._issued["access_token"].append(access_token)
        self._issued["id_token"].append(answer["id_token"])
        if with_refresh and "offline_access" in scopes:
            refresh_token = "".join(secrets.choice(_REFRESH_ALPHABET) for _ in range(128))
            self._refresh[refresh_token] = _Grant(
                user=user, client_id=client_id, scopes=scopes,
                expires_at=now + settings.refresh_token_lifetime, auth_time=auth_time)
            answer["refresh_token"] = refresh_token
            self._issued["refresh_token"].append(refresh_token)
        return answer

    def _user_claims(self, user: str, scopes: tuple[str, ...]) -> dict[str, Any]:
        """The default scope mappings: `profile` gives the name, `email` the address."""
        configured = dict(self.settings.users.get(user, {}))
        claims: dict[str, Any] = {}
        if "profile" in scopes:
            claims.update({k: v for k, v in configured.items() if k != "email"})
            claims.setdefault("name", user)
            claims["preferred_username"] = user
        if "email" in scopes and "email" in configured:
            claims["email"] = configured["email"]
            claims["email_verified"] = True
        return claims

    # -- resource endpoints ------------------------------------------------------------------

    def _bearer(self, request: web.Request, form: Mapping[str, str]) -> _Grant | None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        # RFC 6750 §2.1 header, or §2.2 form body; never the query string, which
        # ends up in access logs.
        token = value.strip() if scheme.lower() == "bearer" else form.get("access_token", "")
        if not token or not self.access_token_valid(token):
            return None
        return self._access[token]

    async def _userinfo(self, request: web.Request, form: dict[str, str],
                        ) -> web.StreamResponse:
        """OpenID Connect Core §5.3 with RFC 6750 §3.1 errors: 401 for a missing,
        unknown or expired token; 403 insufficient_scope without `openid`."""
        grant = self._bearer(request, form)
        if grant is None:
            return _bearer_error(401, "invalid_token", "The access token is invalid")
        if "openid" not in grant.scopes:
            return _bearer_error(403, "insufficient_scope",
                                 "The access token lacks the openid scope")
        claims = {"sub": _subject(grant.user), **self._user_claims(grant.user, grant.scopes)}
        return web.json_response(claims, headers=_NO_STORE)

    async def _revoke(self, request: web.Request, form: dict[str, str]) -> web.StreamResponse:
        """RFC 7009 §2: 200 `{}` whether the token was known or not; access tokens are
        tried first, then refresh tokens; the row is deleted. A client that fails to
        authenticate gets 401 invalid_client (§2.2.1)."""
        request_id = uuid.uuid4().hex
        problem = self._client_error(_ClientAuth(request, form), need_secret=True)
        if problem:
            return _oauth_error(problem, request_id, status=401)
        token = form.get("token", "")
        if not token:
            return _oauth_error("invalid_request", request_id)
        if self._access.pop(token, None) is None:
            self._refresh.pop(token, None)
        return _token_response({})

    async def _introspect(self, request: web.Request, form: dict[str, str],
                          ) -> web.StreamResponse:
        """RFC 7662 §2. authentik insists on client_id and client_secret here, so a
        public client cannot introspect at all."""
        client = _ClientAuth(request, form)
        expected = self.settings.client_secret
        if (client.client_id != self.settings.client_id or expected is None
                or not hmac.compare_digest(client.secret.encode(), expected.encode())):
            return _oauth_error("invalid_client", uuid.uuid4().hex, status=401)
        token = form.get("token", "")
        access = self._access.get(token) if self.access_token_valid(token) else None
        refresh = self._refresh.get(token) if self.refresh_token_valid(token) else None
        grant = access or refresh
        if grant is None:
            return _token_response({"active": False})
        return _token_response({
            "active": True, "scope": " ".join(grant.scopes), "client_id": grant.client_id,
            "sub": _subject(grant.user), "iss": self.issuer,
        })

    # -- the approval page --------------------------------------------------------------------

    def _approvable(self, user_code: str) -> _DeviceToken | None:
        if self.settings.lenient_user_codes:
            user_code = _TYPED_SEPARATORS.sub("", user_code)
        now = self.clock.monotonic()
        self._purge(now)
        for token in self._codes.values():
            if token.user_code == user_code:
                # main-2026-04 and later hide expired rows; up to 2026.2 the lookup by
                # user code does not look at expiry at all.
                live = (now < token.expires_at
                        or self.settings.expiry_mode is ExpiryMode.PENDING_THEN_INVALID_GRANT)
                return token if live else None
        return None

    async def _page_get(self, request: web.Request, form: dict[str, str],
                        ) -> web.StreamResponse:
        """`/device` (`device_init.py`): the entry form, or with `?code=` (the
        `verification_uri_complete` of RFC 8628 §3.3.1) straight to consent."""
        action = self._page_action()
        code = request.query.get("code")
        if code is None:
            return _html(page.entry_page(action,
                                         lenient=self.settings.lenient_user_codes))
        token = self._approvable(code)
        if token is None:
            return _html(page.denied_page(action), status=403)
        return _html(page.confirm_page(user_code=token.user_code,
                                       application=self.settings.slug,
                                       scopes=token.scopes, users=self.settings.users,
                                       device_name=self.settings.device_name,
                                       action=action))

    async def _page_post(self, request: web.Request, form: dict[str, str],
                         ) -> web.StreamResponse:
        """The consent answer; approval is `device_finish.py` attaching the user."""
        token = self._approvable(form.get("code", ""))
        if token is None:
            return _html(page.denied_page(self._page_action()), status=403)
        action = form.get("action")
        if action == "approve":
            user = form.get("user", "")
            if user not in self.settings.users:
                return _html(page.message_page("Unknown user", "Pick a user from the list."),
                             status=400)
            self.approve(token.user_code, user=user)
            return _html(page.finished_page(approved=True))
        if action == "deny":
            self.deny(token.user_code)
            return _html(page.finished_page(approved=False))
        return _html(page.message_page("Bad request", "Choose Approve or Deny."), status=400)


# -- answers --------------------------------------------------------------------------------

class _Dropped(web.Response):
    """Stands for a connection closed without an answer."""


async def _read_form(request: web.Request) -> dict[str, str]:
    # Django's form parser: urlencoded or multipart only; a JSON body reads as empty,
    # which is why authentik sees "no client_id" in one.
    if request.method != "POST" or request.content_type not in (
            "application/x-www-form-urlencoded", "multipart/form-data"):
        return {}
    posted = await request.post()
    return {key: value for key, value in posted.items() if isinstance(value, str)}


def _subject(user: str) -> str:
    # authentik's default subject mode, "hashed user ID": stable and opaque.
    return hashlib.sha256(f"device-agent-idp:{user}".encode()).hexdigest()


def _token_response(body: Mapping[str, Any], *, status: int = 200) -> web.Response:
    """authentik's `TokenResponse`: JSON that no cache keeps (RFC 6749 §5.1)."""
    return web.json_response(dict(body), status=status, headers=_NO_STORE)


def _oauth_error(error: str, request_id: str, *, status: int = 400) -> web.Response:
    """`OAuth2Error.create_dict`: RFC 6749 §5.2 fields plus authentik's `request_id`."""
    return _token_response({"error": error, "error_description": _DESCRIPTIONS[error],
                            "request_id": request_id}, status=status)


def _bearer_error(status: int, error: str, description: str) -> web.Response:
    challenge = f'Bearer error="{error}", error_description="{description}"'
    return web.json_response({"error": error, "error_description": description},
                             status=status, headers={"WWW-Authenticate": challenge, **_NO_STORE})


def _not_found() -> web.Response:
    return _html(page.message_page("Not found", "No application with this slug."), status=404)


def _html(text: str, *, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html",
                        headers={"Cache-Control": "no-store"})


@contextlib.asynccontextmanager
async def serve_provider(settings: ProviderSettings | None = None, *,
                         clock: Clock | None = None, host: str = "127.0.0.1",
                         port: int = 0, ssl_context: ssl.SSLContext | None = None,
                         ) -> AsyncIterator[IdentityProvider]:
    """Run a provider on `host`:`port` (0: any free port) until the block ends;
    `base_url`, where this machine reaches it, carries the port actually bound (and
    loopback for a wildcard `host`). With `ssl_context`, over HTTPS."""
    provider = IdentityProvider(settings, clock=clock)
    # No access log: its request lines would be noise in the agent's own log.
    runner = web.AppRunner(provider.app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound_port = runner.addresses[0][1]
        reach = _LOOPBACK_FOR.get(host, host)
        shown_host = f"[{reach}]" if ":" in reach else reach
        scheme = "https" if ssl_context is not None else "http"
        provider.base_url = f"{scheme}://{shown_host}:{bound_port}"
        yield provider
    finally:
        await runner.cleanup()
