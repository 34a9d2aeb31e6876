"""The device authorization flow as a transition table (RFC 8628 §3.1–§3.5).

`DevicePoll` holds everything about one code: its deadline, the current polling
interval and when the next poll is due. It never sleeps or sends: the driver asks for
a request, sends it, and hands the answer back with the current monotonic time.
Every rule of the flow is in `POLL_RULES` or `_device_answer`, each with the sentence
of the RFC it implements.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from agent.errors import (
    AccessDenied,
    AuthorizationPending,
    ExpiredToken,
    InvalidGrant,
    MalformedResponse,
    OAuthError,
    ServerError,
    TemporarilyUnavailable,
    UnknownOAuthError,
)
from agent.errors import (
    SlowDown as SlowDownError,
)
from agent.oauth.events import (
    Approved,
    CodeIssued,
    Denied,
    Expired,
    Pending,
    Rejected,
    ServerTrouble,
    SlowDown,
    Throttled,
)
from agent.oauth.models import Client, DeviceAuthorization, HttpRequest, HttpResponse
from agent.oauth.wire import (
    Verdict,
    classify,
    form_request,
    parse_json_object,
    parse_token_answer,
    seconds_field,
)

__all__ = [
    "DEFAULT_INTERVAL",
    "DEVICE_CODE_GRANT",
    "POLL_RULES",
    "SLOW_DOWN_STEP",
    "DevicePoll",
    "PollAction",
    "PollEvent",
    "device_authorization_request",
    "receive_device_authorization",
]

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"

# RFC 8628 §3.2: "If no value is provided, clients MUST use 5 as the default."
DEFAULT_INTERVAL = 5.0
# RFC 8628 §3.5 slow_down: "the interval MUST be increased by 5 seconds for this and
# all subsequent requests."
SLOW_DOWN_STEP = 5.0
# Doubling after network trouble stops here, so a code is still polled before it dies.
MAX_TROUBLE_INTERVAL = 60.0

PollEvent = Pending | SlowDown | Approved | Denied | Expired | Rejected | ServerTrouble


def device_authorization_request(client: Client, endpoint: str,
                                 scopes: Sequence[str]) -> HttpRequest:
    """RFC 8628 §3.1: POST, form-encoded, `client_id` and optional `scope`.

    authentik never authenticates the client here, and other providers authenticate
    confidential clients as at the token endpoint; sending the secret covers both.
    """
    fields = {"scope": " ".join(scopes)} if scopes else {}
    return form_request(endpoint, fields, client, authenticate=True)


def _device_answer(response: HttpResponse, *, now: float) -> CodeIssued:
    """RFC 8628 §3.2. Raises MalformedResponse when a REQUIRED field is missing."""
    body = parse_json_object(response)
    text: dict[str, str] = {}
    # Google's early endpoint spelled it verification_url; accept both.
    for key, aliases in (("device_code", ()), ("user_code", ()),
                         ("verification_uri", ("verification_url",))):
        value = next((body[k] for k in (key, *aliases) if k in body), None)
        if not isinstance(value, str) or not value:
            raise MalformedResponse(f"device authorization answer: {key} is missing")
        text[key] = value
    complete = body.get("verification_uri_complete")
    if not isinstance(complete, str) or not complete:
        complete = None
    expires_in = seconds_field(body, "expires_in")
    if expires_in is None or expires_in <= 0:
        raise MalformedResponse("device authorization answer: expires_in is missing")
    interval = seconds_field(body, "interval")
    if interval is None or interval <= 0:
        interval = DEFAULT_INTERVAL
    return CodeIssued(authorization=DeviceAuthorization(
        device_code=text["device_code"],
        user_code=text["user_code"],
        verification_uri=text["verification_uri"],
        verification_uri_complete=complete,
        expires_in=expires_in,
        interval=interval,
        issued_at=now,
    ))


def receive_device_authorization(
    response: HttpResponse, *, now: float, now_wall: float | None = None,
) -> CodeIssued | Throttled | ServerTrouble | Rejected:
    """Interpret the device authorization endpoint's answer.

    - 200: a code (RFC 8628 §3.2).
    - 429, or `slow_down` with any status: the provider is rationing codes. authentik
      answers 429 slow_down after 20 requests an hour per address (not an RFC 8628
      use of slow_down, which is defined for the token endpoint only).
    - 5xx, `temporarily_unavailable`, `server_error`, an unreadable answer: try later.
    - any other error (RFC 8628 §3.2 refers to RFC 6749 §5.2): our client or scopes
      are refused; repeating the request will not help.
    """
    answer = classify(response, now_wall=now_wall)
    hint = answer.retry_after
    match answer.verdict:
        case Verdict.OK:
            try:
                return _device_answer(response, now=now)
            except MalformedResponse as exc:
                return ServerTrouble(reason=str(exc))
        case Verdict.THROTTLE:
            return Throttled(retry_after=hint)
        case Verdict.TROUBLE:
            return ServerTrouble(reason=answer.reason, retry_after=hint)
    error = answer.error
    if isinstance(error, SlowDownError):
        return Throttled(retry_after=hint)
    if isinstance(error, ServerError | TemporarilyUnavailable):
        return ServerTrouble(reason=answer.reason, retry_after=hint)
    if error is None:
        if response.status in (400, 401, 403):
            # authentik before 2025.8 answered an unknown client with a bare 400.
            return Rejected(error=UnknownOAuthError(
                f"HTTP {response.status} without an error code", code="http_error",
                status=response.status))
        return ServerTrouble(reason=answer.reason, retry_after=hint)
    return Rejected(error=error)


class PollAction(Enum):
    KEEP_POLLING = "keep polling at the current interval"
    SLOW_DOWN = "add 5 s to the interval for good, keep polling"
    DENIED = "stop: the person refused"
    EXPIRED = "stop: the code is dead, a new one is needed"
    RETRY = "provider trouble: poll again later, less often"
    STOP = "stop and report"


@dataclass(frozen=True)
class PollRule:
    action: PollAction
    rfc: str


POLL_RULES: Mapping[type[OAuthError], PollRule] = {
    AuthorizationPending: PollRule(
        PollAction.KEEP_POLLING,
        "RFC 8628 §3.5 authorization_pending: the client SHOULD repeat the access token "
        "request; before each new request it MUST wait at least `interval` seconds."),
    SlowDownError: PollRule(
        PollAction.SLOW_DOWN,
        "RFC 8628 §3.5 slow_down: still pending, but the interval MUST be increased by "
        "5 seconds for this and all subsequent requests."),
    AccessDenied: PollRule(
        PollAction.DENIED,
        "RFC 8628 §3.5 access_denied: the authorization request was denied."),
    ExpiredToken: PollRule(
        PollAction.EXPIRED,
        "RFC 8628 §3.5 expired_token: the device_code has expired; the client MAY "
        "commence a new device authorization request."),
    # A code no RFC names (django-oauth-toolkit: 404 device_not_found): this code will
    # not succeed, and a fresh one may; it is no verdict on the client's setup.
    UnknownOAuthError: PollRule(
        PollAction.EXPIRED,
        "RFC 6749 §5.2 names no such error: the code is ended like an unknown error "
        "and a new one is asked for."),
    # Special case, not in RFC 8628: authentik answers invalid_grant for a code that
    # expired (main-2026-04), was cleaned up (<= 2026.2) or was already redeemed.
    # Whatever the cause, this code will never succeed; a fresh one may.
    InvalidGrant: PollRule(
        PollAction.EXPIRED,
        "RFC 6749 §5.2 invalid_grant: the grant (device_code) is invalid or expired."),
    ServerError: PollRule(
        PollAction.RETRY,
        "RFC 6749 §5.2 server_error: an unexpected condition; the request may work later."),
    TemporarilyUnavailable: PollRule(
        PollAction.RETRY,
        "RFC 6749 §5.2 temporarily_unavailable: the server is overloaded or down for "
        "maintenance."),
}
OTHER_ERRORS = PollRule(
    PollAction.STOP,
    "RFC 8628 §3.5: the other error codes are terminal; the client stops polling "
    "and reacts, for example by showing an error.")


class DevicePoll:
    """Polling the token endpoint for one device code (RFC 8628 §3.4–§3.5).

    `scope` is the scope string sent in the device authorization request: a token
    answer without `scope` was granted exactly that (RFC 6749 §5.1).
    """

    def __init__(self, authorization: DeviceAuthorization, *, client: Client,
                 token_endpoint: str, scope: str | None = None) -> None:
        self.authorization = authorization
        self._client = client
        self.token_endpoint = token_endpoint
        self.scope = scope
        self.interval = authorization.interval
        # §3.5: wait at least `interval` before *each* request, the first included.
        self.next_poll_at = authorization.issued_at + self.interval

    @property
    def deadline(self) -> float:
        return self.authorization.deadline

    def expired(self, now: float) -> bool:
        """Our own deadline from `expires_in`: authentik <= 2026.2 keeps answering
        authorization_pending for minutes after a code died."""
        return now >= self.deadline

    def request(self) -> HttpRequest:
        """RFC 8628 §3.4: grant_type, device_code and client_id, form-encoded (the
        device_code holds punctuation; form encoding is the transport's job)."""
        return form_request(
            self.token_endpoint,
            {"grant_type": DEVICE_CODE_GRANT,
             "device_code": self.authorization.device_code},
            self._client,
            authenticate=True,
        )

    def receive(self, response: HttpResponse, *, now: float, now_wall: float) -> PollEvent:
        answer = classify(response, now_wall=now_wall, client_authenticated=True,
                          sent=(self.authorization.device_code, self._client.client_secret))
        hint = answer.retry_after
        match answer.verdict:
            case Verdict.OK:
                # The code is redeemed by now: only an answer without an access token
                # is trouble; odd fields get a safe reading and a note.
                try:
                    tokens, notes = parse_token_answer(response, now_wall=now_wall,
                                                       requested_scope=self.scope)
                except MalformedResponse as exc:
                    return self._trouble(str(exc), now=now, hint=None)
                return Approved(tokens=tokens, notes=notes)
            case Verdict.TROUBLE:
                return self._trouble(answer.reason, now=now, hint=hint)
            case Verdict.THROTTLE:
                # RFC 8628 §3.5: a throttle while polling is slow_down, whatever it says.
                error: OAuthError = SlowDownError(status=429)
            case Verdict.ERROR if answer.error is None:
                return self._trouble(answer.reason, now=now, hint=hint)
            case Verdict.ERROR:
                assert answer.error is not None
                error = answer.error
        rule = POLL_RULES.get(type(error), OTHER_ERRORS)
        match rule.action:
            case PollAction.KEEP_POLLING:
                return self._pending(now)
            case PollAction.SLOW_DOWN:
                self.interval += SLOW_DOWN_STEP
                pending = self._pending(now, hint=hint)
                if isinstance(pending, Expired):
                    return pending
                return SlowDown(interval=self.interval, next_poll_at=pending.next_poll_at)
            case PollAction.DENIED:
                return Denied(description=error.description)
            case PollAction.EXPIRED:
                return Expired(by_provider=True)
            case PollAction.RETRY:
                return self._trouble(str(error), now=now, hint=hint)
            case PollAction.STOP:
                return Rejected(error=error)
        raise AssertionError(rule)  # pragma: no cover - the match is exhaustive

    def connection_failed(self, reason: str, *, now: float) -> Expired | ServerTrouble:
        """RFC 8628 §3.5: "On encountering a connection timeout, clients MUST
        unilaterally reduce their polling frequency before retrying", doubling
        RECOMMENDED. The same for any network failure: a provider that cannot answer
        is not helped by being asked as often."""
        if self.expired(now):
            return Expired(by_provider=False)
        return self._trouble(reason, now=now, hint=None)

    def _pending(self, now: float, hint: float | None = None) -> Pending | Expired:
        if self.expired(now):
            return Expired(by_provider=False)
        self.next_poll_at = now + max(self.interval, hint or 0.0)
        return Pending(next_poll_at=self.next_poll_at)

    def _trouble(self, reason: str, *, now: float, hint: float | None) -> ServerTrouble:
        # Doubling stops at the cap, but never undoes what the provider asked for
        # (its interval, plus every slow_down: "for this and all subsequent requests").
        self.interval = max(self.interval, min(self.interval * 2, MAX_TROUBLE_INTERVAL))
        self.next_poll_at = now + max(self.interval, hint or 0.0)
        return ServerTrouble(reason=reason, retry_after=self.next_poll_at - now)
