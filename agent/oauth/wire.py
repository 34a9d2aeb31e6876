"""Reading and writing the OAuth wire format (RFC 6749 §4–§5), shared by every grant.

Pure functions: bytes and numbers in, values or our own exceptions out.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Mapping
from typing import Any

from agent.errors import MalformedResponse, OAuthError, oauth_error
from agent.oauth.models import Client, HttpRequest, HttpResponse, TokenSet

__all__ = [
    "form_request",
    "parse_error",
    "parse_json_object",
    "parse_token_response",
    "retry_after",
    "seconds_field",
]

# Error descriptions are shown to people; a provider's essay is cut.
_MAX_DESCRIPTION = 200
# Ten years: any lifetime or interval beyond it (or infinite) is a broken answer.
MAX_SECONDS = 10 * 365 * 86_400


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
        value = json.loads(response.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedResponse(
            f"HTTP {response.status} answer is not JSON ({type(exc).__name__})"
        ) from None
    if not isinstance(value, dict):
        raise MalformedResponse(f"HTTP {response.status} answer is JSON but not an object")
    return value


def parse_error(response: HttpResponse) -> OAuthError | None:
    """The RFC 6749 §5.2 error in a 4xx answer, or None when it carries none."""
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
    elif len(description) > _MAX_DESCRIPTION:
        description = description[:_MAX_DESCRIPTION] + "…"
    return oauth_error(code, description, status=response.status)


def retry_after(response: HttpResponse, *, now_wall: float | None = None) -> float | None:
    """Seconds from a Retry-After header (RFC 9110 §10.2.3): delta-seconds or an HTTP date."""
    value = next((v for k, v in response.headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    if now_wall is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now_wall)


def _optional_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedResponse(f"token answer: {key} is not a string")
    return value or None


def seconds_field(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    # Some providers send numbers as strings; bool is an int in Python but not here.
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0 <= value <= MAX_SECONDS):
        raise MalformedResponse(f"answer: {key} is not a number of seconds from 0 to "
                                f"{MAX_SECONDS}")
    return float(value)


def parse_token_response(response: HttpResponse, *, now_wall: float,
                         previous: TokenSet | None = None) -> TokenSet:
    """A successful token answer (RFC 6749 §5.1).

    On refresh, RFC 6749 §6 lets the provider omit `refresh_token` (authentik does so
    when its rotation threshold is set): the old one stays valid and is kept. The same
    holds for `id_token` and `scope` (§5.1: scope omitted means unchanged).
    """
    body = parse_json_object(response)
    access_token = body.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise MalformedResponse("token answer: access_token is missing")
    token_type = body.get("token_type")
    if not isinstance(token_type, str) or not token_type:
        raise MalformedResponse("token answer: token_type is missing")
    expires_in = seconds_field(body, "expires_in")
    refresh_token = _optional_str(body, "refresh_token")
    id_token = _optional_str(body, "id_token")
    scope = _optional_str(body, "scope")
    if previous is not None:
        refresh_token = refresh_token or previous.refresh_token
        id_token = id_token or previous.id_token
        scope = scope or previous.scope
    return TokenSet(
        access_token=access_token,
        # RFC 6749 §5.1: the type is case-insensitive; "Bearer" is what RFC 6750 prints.
        token_type="Bearer" if token_type.lower() == "bearer" else token_type,
        issued_at=now_wall,
        expires_at=None if expires_in is None else now_wall + expires_in,
        refresh_token=refresh_token,
        id_token=id_token,
        scope=scope,
    )
