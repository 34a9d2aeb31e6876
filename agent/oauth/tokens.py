"""Refresh (RFC 6749 §6), revocation (RFC 7009) and userinfo (OpenID Connect Core §5.3)."""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Any

from agent.errors import (
    InvalidGrant,
    MalformedResponse,
    ServerError,
    TemporarilyUnavailable,
    UnknownOAuthError,
)
from agent.oauth.events import Refreshed, RefreshRejected, Rejected, ServerTrouble
from agent.oauth.models import Client, HttpRequest, HttpResponse, TokenSet
from agent.oauth.wire import (
    Verdict,
    classify,
    form_request,
    parse_json_object,
    parse_token_answer,
)

__all__ = [
    "USER_CLAIMS",
    "check_id_token",
    "id_token_claims",
    "receive_refresh",
    "receive_revocation",
    "receive_userinfo",
    "refresh_request",
    "revocation_request",
    "userinfo_matches",
    "userinfo_request",
]

# The claims kept for display and status: who signed the device in.
USER_CLAIMS = ("sub", "name", "preferred_username", "email")


def refresh_request(tokens: TokenSet, *, client: Client, token_endpoint: str) -> HttpRequest:
    """RFC 6749 §6. `scope` is left out on purpose: §6 says omitted means "the scope
    originally granted", and authentik rejects a scope list that differs from the
    original or lacks offline_access."""
    if tokens.refresh_token is None:
        raise ValueError("no refresh token to refresh with")
    return form_request(
        token_endpoint,
        {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token},
        client,
        authenticate=True,
    )


def receive_refresh(response: HttpResponse, *, previous: TokenSet, now_wall: float,
                    ) -> Refreshed | RefreshRejected | Rejected | ServerTrouble:
    """- 200: new tokens; a missing refresh_token means the old one stays (RFC 6749 §6).
      The provider has rotated by now, so only an answer without an access token is
      trouble (and a new refresh token in it is handed on, to be kept); odd fields get
      a safe reading and a note (`parse_token_answer`).
    - invalid_grant: the refresh token is dead (expired, revoked, or rotated away).
    - server_error, temporarily_unavailable, 5xx, 429, malformed: try again later.
    - any other error: the provider refuses our client; a new sign-in would not help.
    """
    answer = classify(response, now_wall=now_wall, client_authenticated=True,
                      sent=(previous.refresh_token, previous.access_token))
    hint = answer.retry_after
    if answer.verdict is Verdict.OK:
        try:
            tokens, notes = parse_token_answer(response, now_wall=now_wall,
                                               previous=previous)
        except MalformedResponse as exc:
            return ServerTrouble(reason=str(exc), refresh_token=_rotated(response, previous))
        return Refreshed(tokens=tokens, notes=notes)
    error = answer.error
    if answer.verdict in (Verdict.TROUBLE, Verdict.THROTTLE) or error is None or isinstance(
            error, ServerError | TemporarilyUnavailable):
        return ServerTrouble(reason=answer.reason, retry_after=hint)
    if isinstance(error, InvalidGrant):
        return RefreshRejected(error=error)
    # Any other code, one the RFCs name or not, ends this refresh; the refresh token is
    # kept, since only invalid_grant says it is dead.
    return Rejected(error=error)


def _rotated(response: HttpResponse, previous: TokenSet) -> str | None:
    """The new refresh token of a success answer that is unusable otherwise (no access
    token): with strict rotation the one sent is dead already."""
    try:
        body = parse_json_object(response)
    except MalformedResponse:
        return None
    token = body.get("refresh_token")
    if isinstance(token, str) and token and token != previous.refresh_token:
        return token
    return None


def revocation_request(token: str, *, hint: str, client: Client,
                       endpoint: str) -> HttpRequest:
    """RFC 7009 §2.1: `token` and `token_type_hint`, with client authentication."""
    return form_request(endpoint, {"token": token, "token_type_hint": hint}, client,
                        authenticate=True)


def receive_revocation(response: HttpResponse) -> Rejected | ServerTrouble | None:
    """RFC 7009 §2.2: 200 means revoked, and also "the token was unknown". §2.2.1: 503
    means try later; other errors are RFC 6749 §5.2 errors."""
    answer = classify(response, client_authenticated=True)
    if answer.verdict is Verdict.OK:
        return None
    if answer.verdict in (Verdict.TROUBLE, Verdict.THROTTLE):
        return ServerTrouble(reason=answer.reason, retry_after=answer.retry_after)
    error = answer.error or UnknownOAuthError(
        f"HTTP {response.status}", code="http_error", status=response.status)
    return Rejected(error=error)


def userinfo_request(tokens: TokenSet, *, endpoint: str) -> HttpRequest:
    """OpenID Connect Core §5.3.1, with the token in the header (RFC 6750 §2.1)."""
    return HttpRequest(
        method="GET",
        url=endpoint,
        headers={"Authorization": f"Bearer {tokens.access_token}",
                 "Accept": "application/json"},
    )


def _keep_user_claims(claims: dict[str, Any]) -> dict[str, str]:
    # Only text that can be shown and stored: a lone surrogate is not.
    return {k: v for k in USER_CLAIMS
            if isinstance(v := claims.get(k), str) and v and _printable(v)}


def _printable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def receive_userinfo(response: HttpResponse) -> dict[str, str]:
    if response.status != 200:
        raise MalformedResponse(f"userinfo answered HTTP {response.status}")
    return _keep_user_claims(parse_json_object(response))


# How far the provider's clock and ours may disagree for exp and iat. A Pi without a
# real-time clock is checked only once its clock is plausible (the session waits).
CLOCK_LEEWAY = 300.0


def _payload(id_token: str) -> dict[str, Any] | None:
    parts = id_token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None


def check_id_token(id_token: str, *, issuer: str | None, client_id: str,
                   now_wall: float) -> tuple[dict[str, str], str | None]:
    """The user claims of an ID token checked as OpenID Connect Core §3.1.3.7 says, and
    the first problem found (then the claims are {} and the token must be dropped).

    - item 2: `iss` is the issuer (when one is configured or discovered);
    - item 3: `aud` holds our client_id; items 4-5: with several audiences, `azp` is
      present, and when present it is our client_id;
    - item 9: `exp` has not passed; item 10: `iat` is not in the future.
    The signature is not checked, as item 6 allows for a token received straight from
    the token endpoint over TLS: that connection authenticated the provider. The claims
    only label screens and status; nothing is authorised by them.
    """
    claims = _payload(id_token)
    if claims is None:
        return {}, "the ID token is not a readable JWT"
    found_issuer = claims.get("iss")
    if issuer is not None and (not isinstance(found_issuer, str)
                               or found_issuer.rstrip("/") != issuer.rstrip("/")):
        return {}, "the ID token's iss is not the provider's issuer"
    audience = claims.get("aud")
    audiences = [audience] if isinstance(audience, str) else audience
    if not isinstance(audiences, list) or client_id not in audiences:
        return {}, "the ID token's aud does not name this client"
    azp = claims.get("azp")
    if (len(audiences) > 1 and azp is None) or (azp is not None and azp != client_id):
        return {}, "the ID token's azp is not this client"
    expires, issued = _claim_time(claims.get("exp")), _claim_time(claims.get("iat"))
    if expires is None or issued is None:
        return {}, "the ID token has no usable exp or iat"
    if expires + CLOCK_LEEWAY < now_wall:
        return {}, "the ID token has expired"
    if issued - CLOCK_LEEWAY > now_wall:
        return {}, "the ID token was issued in the future"
    return _keep_user_claims(claims), None


def _claim_time(value: object) -> float | None:
    # bool is an int to Python; a 400-digit int overflows a float.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def id_token_claims(id_token: str | None) -> dict[str, str]:
    """The user claims of an ID token, unchecked: for labels where the token was
    already checked when it arrived (`check_id_token`). Anything unreadable yields {}."""
    if not id_token:
        return {}
    claims = _payload(id_token)
    return _keep_user_claims(claims) if claims is not None else {}


def userinfo_matches(userinfo: dict[str, str], claims: dict[str, str] | Mapping[str, str]
                     ) -> bool:
    """OpenID Connect Core §5.3.2: the userinfo `sub` MUST exactly match the ID token's,
    or its values MUST NOT be used. Without an ID token there is nothing to match."""
    expected = claims.get("sub")
    return expected is None or userinfo.get("sub") == expected
