"""Provider metadata: OpenID Connect Discovery 1.0 §4 and RFC 8414 §3.

authentik publishes one document per application at
`/application/o/<slug>/.well-known/openid-configuration`; its device and token
endpoints are global (`/application/o/device/`, `/application/o/token/`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from agent.errors import DiscoveryFailed, MalformedResponse
from agent.oauth.models import Endpoints, HttpRequest, HttpResponse
from agent.oauth.wire import parse_json_object

__all__ = [
    "authentik_endpoints",
    "check_endpoint_url",
    "discovery_requests",
    "parse_discovery",
]


def discovery_requests(issuer: str) -> list[HttpRequest]:
    """Where to look, in order: OpenID Connect Discovery §4.1 (issuer + path), then
    RFC 8414 §3.1 (the well-known segment inserted before the issuer's path)."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    oidc = urlunsplit((parts.scheme, parts.netloc,
                       f"{path}/.well-known/openid-configuration", "", ""))
    rfc8414 = urlunsplit((parts.scheme, parts.netloc,
                          f"/.well-known/oauth-authorization-server{path}", "", ""))
    # authentik registers the RFC 8414 route with a trailing slash.
    if parts.path.endswith("/"):
        rfc8414 += "/"
    return [HttpRequest(method="GET", url=url, headers={"Accept": "application/json"})
            for url in (oidc, rfc8414)]


def authentik_endpoints(issuer: str) -> Endpoints | None:
    """The global endpoints of an authentik whose issuer is
    `https://HOST/application/o/SLUG/`, for use when discovery is unreachable."""
    parts = urlsplit(issuer)
    segments = [s for s in parts.path.split("/") if s]
    if len(segments) != 3 or segments[:2] != ["application", "o"]:
        return None
    base = urlunsplit((parts.scheme, parts.netloc, "/application/o/", "", ""))
    return Endpoints(
        issuer=issuer,
        device_authorization=base + "device/",
        token=base + "token/",
        revocation=base + "revoke/",
        userinfo=base + "userinfo/",
    )


def check_endpoint_url(url: str, *, name: str, allow_insecure_http: bool) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise DiscoveryFailed(f"{name} is not an absolute URL: {url!r}")
    if parts.scheme == "http" and not allow_insecure_http:
        raise DiscoveryFailed(
            f"{name} uses plain http ({url}); tokens would cross the network unencrypted")
    return url


def _optional_url(doc: dict[str, Any], key: str, allow_insecure_http: bool) -> str | None:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        return None
    return check_endpoint_url(value, name=key, allow_insecure_http=allow_insecure_http)


def _string_tuple(doc: dict[str, Any], key: str) -> tuple[str, ...] | None:
    value = doc.get(key)
    if not isinstance(value, list):
        return None
    return tuple(v for v in value if isinstance(v, str))


def parse_discovery(response: HttpResponse, *, issuer: str, allow_insecure_http: bool,
                    fallback: Endpoints | None = None) -> Endpoints:
    """Validate a metadata document.

    OpenID Connect Discovery §4.3: the `issuer` in the document MUST be identical to
    the one configured, or the document is not to be used (it protects against a
    document that speaks for another provider). A trailing slash is the one
    difference forgiven, since people type issuers both ways.

    `fallback` supplies a device endpoint the document does not advertise (authentik's
    global `/application/o/device/`).
    """
    if response.status != 200:
        raise DiscoveryFailed(f"metadata document answered HTTP {response.status}")
    try:
        doc = parse_json_object(response)
    except MalformedResponse as exc:
        raise DiscoveryFailed(f"metadata document: {exc}") from None
    found = doc.get("issuer")
    if not isinstance(found, str) or found.rstrip("/") != issuer.rstrip("/"):
        raise DiscoveryFailed(
            f"metadata document names issuer {found!r}, the config names {issuer!r}")
    token = _optional_url(doc, "token_endpoint", allow_insecure_http)
    if token is None:
        raise DiscoveryFailed("metadata document has no token_endpoint")
    device = _optional_url(doc, "device_authorization_endpoint", allow_insecure_http)
    if device is None and fallback is not None:
        device = fallback.device_authorization
    if device is None:
        raise DiscoveryFailed(
            "metadata document has no device_authorization_endpoint (RFC 8628 §4): the "
            "provider does not offer the device flow to this client, or set "
            "provider.device_authorization_endpoint")
    return Endpoints(
        issuer=found,
        device_authorization=device,
        token=token,
        revocation=_optional_url(doc, "revocation_endpoint", allow_insecure_http),
        userinfo=_optional_url(doc, "userinfo_endpoint", allow_insecure_http),
        scopes_supported=_string_tuple(doc, "scopes_supported"),
        grant_types_supported=_string_tuple(doc, "grant_types_supported"),
    )
