"""Reading and writing the OAuth wire format (RFC 6749 §4–§5), shared by every grant.

Pure functions: bytes and numbers in, values or our own exceptions out.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from agent.errors import InvalidClient, MalformedResponse, OAuthError, oauth_error
from agent.logs import looks_like_a_token
from agent.oauth.models import Client, HttpRequest, HttpResponse, TokenSet

__all__ = [
    "MAX_SECONDS",
    "ODD_LIFETIME",
    "Classified",
    "Verdict",
    "classify",
    "form_request",
    "parse_error",
    "parse_json_object",
    "parse_token_answer",
    "parse_token_response",
    "retry_after",
    "seconds_field",
]

# Error descriptions are shown to people; a provider's essay is cut.
_MAX_DESCRIPTION = 200
# Ten years: any lifetime or interval beyond it (or infinite) is a broken answer.
MAX_SECONDS = 10 * 365 * 86_400
# The lifetime assumed for a token whose `expires_in` is unreadable: short, so the agent
# refreshes soon instead of trusting a lifetime nobody stated.
ODD_LIFETIME = 300.0
# Numbers as text, ASCII only: str.isdigit() and \d accept "²" or other scripts' digits
# (which int() and float() then refuse), and the length bounds keep a 5000-digit string
# away from float(). Twelve digits are more than MAX_SECONDS needs.
_DECIMAL = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")
_DELTA_SECONDS = re.compile(r"[0-9]{1,12}")
# int() refuses literals over 4300 digits (CPython's default limit) with ValueError.
_MAX_INT_DIGITS = 4000


def form_request(url: str, fields: Mapping[str, str], client: Client, *,
                 authenticate: bool) -> HttpRequest:
    """A form-encoded POST (RFC 6749 §3.2, RFC 8628 §3.1).

    Public clients send `client_id` in the body (RFC 6749 §2.3, RFC 8628 §3.4).
    Confidential clients add `client_secret` in the body (client_secret_post, §2.3.1):
    authentik accepts it everywhere, whereas its Basic header parsing does not
    URL-decode, so the body is the form both sides read the same way.
    """
    form = dict(fields)
    form["client_id"] = client.client_id
    if authenticate and client.client_secret is not None:
        form["client_secret"] = client.client_secret
    return HttpRequest(
        method="POST",
        url=url,
        form=form,
        headers={"Accept": "application/json"},
    )


def parse_json_object(response: HttpResponse) -> dict[str, Any]:
    try:
        value = json.loads(response.body, parse_int=_json_int)
    # ValueError covers JSONDecodeError and UnicodeDecodeError; a deeply nested body
    # raises RecursionError, which must not escape the sans-IO core either.
    except (ValueError, RecursionError) as exc:
        if _looks_like_html(response) and response.status < 500:
            raise MalformedResponse(
                f"HTTP {response.status} answer is a web page, not JSON: the network may "
                "need a sign-in (captive portal?)") from None
        raise MalformedResponse(
            f"HTTP {response.status} answer is not JSON ({type(exc).__name__})"
        ) from None
    if not isinstance(value, dict):
        raise MalformedResponse(f"HTTP {response.status} answer is JSON but not an object")
    return value


def _looks_like_html(response: HttpResponse) -> bool:
    content_type = response.header("Content-Type") or ""
    return "html" in content_type.lower() or response.body[:64].lstrip()[:1] == b"<"


def _json_int(literal: str) -> int | float:
    # An integer too long for int() would otherwise throw the whole answer away for one
    # field. It is unusable as any value we read, and an infinity of the same sign fails
    # every range check downstream, field by field.
    if len(literal) <= _MAX_INT_DIGITS:
        return int(literal)
    return -math.inf if literal.startswith("-") else math.inf


class Verdict(Enum):
    OK = "a success"
    TROUBLE = "trouble on the way: retry later"
    THROTTLE = "too many requests: wait, at least Retry-After"
    ERROR = "an OAuth error (or a 4xx without one)"


@dataclass(frozen=True, kw_only=True)
class Classified:
    verdict: Verdict
    error: OAuthError | None = None
    retry_after: float | None = None
    reason: str = ""


def classify(response: HttpResponse, *, now_wall: float | None = None,
             client_authenticated: bool = False, sent: Iterable[str | None] = ()
             ) -> Classified:
    """One reading of an HTTP answer for every endpoint, status first.

    - Any 5xx is trouble whatever its body: Keycloak answers 500 with
      `"error":"unknown_error"`, which is no verdict on the request.
    - Any 429 is a throttle whatever its error code; `Retry-After` comes with it.
    - A 2xx that carries an RFC 6749 §5.2 `error` is that error (GitHub answers errors
      with 200).
    - A 401 where the client authenticates (the token and revocation endpoints) is
      `invalid_client` (RFC 6749 §5.2, RFC 7009 §2.2.1).
    - Any other 4xx is its error code, or an error without one (`error` None).

    `sent` are the secrets the request carried: the error text never holds them.
    """
    hint = retry_after(response, now_wall=now_wall)
    status = response.status
    if status >= 500:
        return Classified(verdict=Verdict.TROUBLE, retry_after=hint, reason=f"HTTP {status}")
    if status == 429:
        return Classified(verdict=Verdict.THROTTLE, retry_after=hint, reason="HTTP 429")
    error = parse_error(response, sent=sent)
    if 200 <= status < 300:
        if error is None:
            return Classified(verdict=Verdict.OK)
        return Classified(verdict=Verdict.ERROR, error=error, retry_after=hint,
                          reason=f"HTTP {status} carrying {error.code}")
    if status == 401 and client_authenticated and not isinstance(error, InvalidClient):
        error = InvalidClient(error.description if error else None, status=401)
    reason = f"HTTP {status}" + (f" {error.code}" if error else " without an error code")
    return Classified(verdict=Verdict.ERROR, error=error, retry_after=hint, reason=reason)


def parse_error(response: HttpResponse, *, sent: Iterable[str | None] = ()
                ) -> OAuthError | None:
    """The RFC 6749 §5.2 error in a 4xx answer, or None when it carries none. A secret
    of the request (`sent`), or anything token-shaped, is redacted from its text."""
    try:
        body = parse_json_object(response)
    except MalformedResponse:
        return None
    code = body.get("error")
    if not isinstance(code, str) or not code:
        return None
    description = body.get("error_description")
    if not isinstance(description, str):
        description = None
    else:
        description = _redacted(description, sent)
        if len(description) > _MAX_DESCRIPTION:
            description = description[:_MAX_DESCRIPTION] + "…"
    return oauth_error(_redacted(code, sent), description, status=response.status)


# Some providers echo the token they were sent ("Invalid refresh token: <value>", as
# spring-security-oauth2 does), and the text goes on to the log, the status and the
# screen. A run this long is judged as hooks' output is (`looks_like_a_token`); a UUID,
# a provider's trace id, is kept for whoever asks its support.
_TOKEN_RUN = re.compile(r"[A-Za-z0-9._~+/=%-]{24,}")
_UUID = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


# Shorter "secrets" (a test's device code "d") would cut words apart; real ones are long.
_MIN_SECRET = 8


def _redacted(text: str, sent: Iterable[str | None]) -> str:
    for secret in sorted({s for s in sent if s and len(s) >= _MIN_SECRET}, key=len,
                         reverse=True):
        # As sent (a form body is URL-encoded) and as itself.
        for form in {secret, urllib.parse.quote(secret, safe=""),
                     urllib.parse.quote_plus(secret)}:
            text = text.replace(form, "[redacted]")

    def run(match: re.Match[str]) -> str:
        found = match.group()
        if _UUID.fullmatch(found) or not looks_like_a_token(found):
            return found
        return "[redacted]"

    return _TOKEN_RUN.sub(run, text)


def retry_after(response: HttpResponse, *, now_wall: float | None = None) -> float | None:
    """Seconds from a Retry-After header (RFC 9110 §10.2.3): delta-seconds or an HTTP date.

    delta-seconds is `1*DIGIT`: ASCII digits only, at most twelve of them. An HTTP date
    needs `now_wall`. Anything unreadable, or a wait beyond MAX_SECONDS, is no hint
    (None): a header is advice, never a reason to fail or to stall for years.
    """
    value = response.header("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        seconds = float(value)
    elif now_wall is None:
        return None
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
            seconds = max(0.0, when.timestamp() - now_wall)
        except (TypeError, ValueError, OverflowError):
            return None
    return seconds if seconds <= MAX_SECONDS else None


def _seconds(value: object) -> float | None:
    """`value` as seconds from 0 to MAX_SECONDS, or None when it is not such a number.

    JSON numbers, and decimal strings (some providers quote their numbers). bool is an
    int in Python but not a number in JSON. A huge int is refused before float(), which
    would raise OverflowError on it.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip(" \t\r\n")
        if _DECIMAL.fullmatch(text) is None:
            return None
        number = float(text)
    elif isinstance(value, int):
        if not 0 <= value <= MAX_SECONDS:
            return None
        number = float(value)
    elif isinstance(value, float):
        number = value
    else:
        return None
    return number if math.isfinite(number) and 0 <= number <= MAX_SECONDS else None


def seconds_field(body: Mapping[str, Any], key: str) -> float | None:
    """A number of seconds, None when absent; MalformedResponse for anything else.

    Used for the device authorization answer, where nothing has been spent yet: asking
    for a new code is the safe reaction to a nonsensical lifetime or interval.
    """
    value = body.get(key)
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is None:
        raise MalformedResponse(f"answer: {key} is not a number of seconds from 0 to "
                                f"{MAX_SECONDS}")
    return seconds


def _kind(value: object) -> str:
    """The JSON type of `value`, for a note: never the value, which may be a secret."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a string" if isinstance(value, str) else type(value).__name__


def _token_type(body: Mapping[str, Any], notes: list[str]) -> str:
    value = body.get("token_type")
    if isinstance(value, str) and value:
        # RFC 6749 §5.1: the type is case-insensitive; "Bearer" is what RFC 6750 prints.
        return "Bearer" if value.lower() == "bearer" else value
    what = ("missing" if value is None else "empty" if value == ""
            else f"{_kind(value)}, not a string")
    notes.append(f"token_type is {what}; assuming Bearer")
    return "Bearer"


def _lifetime(body: Mapping[str, Any], notes: list[str]) -> float | None:
    if body.get("expires_in") is None:
        return None
    seconds = _seconds(body["expires_in"])
    if seconds is None:
        notes.append("expires_in is not a usable number of seconds; "
                     f"assuming {ODD_LIFETIME:.0f} s")
        return ODD_LIFETIME
    return seconds


def _text(body: Mapping[str, Any], key: str, notes: list[str], *,
          instead: str) -> str | None:
    """An optional string field; "" counts as absent, another type is noted as such."""
    value = body.get(key)
    if value is None or isinstance(value, str):
        return value or None
    notes.append(f"{key} is {_kind(value)}, not a string; treated as absent: {instead}")
    return None


def _scope(body: Mapping[str, Any], notes: list[str], *, instead: str) -> str | None:
    value = body.get("scope")
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        notes.append("scope is a JSON list, not a space-delimited string (RFC 6749 §3.3); "
                     "joined with spaces")
        return " ".join(item for item in value if item) or None
    return _text(body, "scope", notes, instead=instead)


def parse_token_answer(response: HttpResponse, *, now_wall: float,
                       previous: TokenSet | None = None, requested_scope: str | None = None,
                       ) -> tuple[TokenSet, tuple[str, ...]]:
    """A successful token answer (RFC 6749 §5.1), and a note for every odd field.

    By the time this answer is read, the provider has redeemed the device code or
    rotated the refresh token: throwing the answer away loses the sign-in for good. So
    only an answer without anything usable is refused; every other field has a safe
    reading. `previous` is the token set being refreshed (None on redemption);
    `requested_scope` the scope string sent in the authorization request.

    - access_token missing, empty or not a string: MalformedResponse, the only failure.
    - token_type missing, empty or not a string: "Bearer". It is REQUIRED, but RFC 6750
      is the only type this agent uses, and authentik always sends Bearer. Other
      strings are kept, "bearer" in any case becomes "Bearer" (§5.1: case-insensitive).
    - expires_in: a number, or a decimal string, from 0 to MAX_SECONDS. Absent: an
      unknown lifetime (it is RECOMMENDED, not REQUIRED). Anything else (negative,
      absurd, not finite, a boolean, not a plain decimal): ODD_LIFETIME, so the agent
      refreshes soon rather than trusting or discarding the token.
    - scope: a string as is; a list of strings joined by spaces (§3.3 defines a
      space-delimited string; some providers send the list). Absent or another type:
      the previous scope on refresh, `requested_scope` on redemption (§5.1: OPTIONAL
      "if identical to the scope requested by the client", and §6 for a refresh).
    - refresh_token, id_token: a non-empty string is the new one. Absent, empty or
      another type: the previous one on refresh (§6: the provider MAY issue a new
      refresh token; authentik omits it when its rotation threshold is set), none on
      redemption.

    Notes name the field and the rule applied, never a value: values may be tokens.
    """
    body = parse_json_object(response)
    access_token = body.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise MalformedResponse("token answer: access_token is missing")
    notes: list[str] = []
    token_type = _token_type(body, notes)
    lifetime = _lifetime(body, notes)
    kept = "the previous one is kept" if previous is not None else "there is none"
    refresh_token = _text(body, "refresh_token", notes, instead=kept)
    id_token = _text(body, "id_token", notes, instead=kept)
    scope = _scope(body, notes, instead=(
        "the previous scope is kept" if previous is not None
        else "the requested scope is assumed" if requested_scope else "there is none"))
    if previous is not None:
        refresh_token = refresh_token or previous.refresh_token
        id_token = id_token or previous.id_token
        scope = scope or previous.scope
    tokens = TokenSet(
        access_token=access_token,
        token_type=token_type,
        issued_at=now_wall,
        expires_at=None if lifetime is None else now_wall + lifetime,
        refresh_token=refresh_token,
        id_token=id_token,
        scope=scope or requested_scope or None,
    )
    return tokens, tuple(notes)


def parse_token_response(response: HttpResponse, *, now_wall: float,
                         previous: TokenSet | None = None,
                         requested_scope: str | None = None) -> TokenSet:
    """`parse_token_answer` without the notes."""
    return parse_token_answer(response, now_wall=now_wall, previous=previous,
                              requested_scope=requested_scope)[0]
