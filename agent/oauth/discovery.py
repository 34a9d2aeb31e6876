"""Provider metadata: OpenID Connect Discovery 1.0 §4 and RFC 8414 §3.

authentik publishes one document per application at
`/application/o/<slug>/.well-known/openid-configuration`; its device and token
endpoints are global (`/application/o/device/`, `/application/o/token/`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from agent.errors import DiscoveryFailed, MalformedResponse
from agent.oauth.models import Endpoints, HttpRequest, HttpResponse
from agent.oauth.wire import parse_json_object

__all__ = [
    "Discovery",
    "DiscoveryStep",
    "ExplicitEndpoints",
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
    try:
        parts = urlsplit(url)
    except ValueError:  # "https://[", a netloc that NFKC-normalises into "@" or "#"
        raise DiscoveryFailed(f"{name} is not a URL: {url[:100]!r}") from None
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
                    fallback: Endpoints | None = None,
                    token_endpoint: str | None = None) -> Endpoints:
    """Validate a metadata document.

    OpenID Connect Discovery §4.3: the `issuer` in the document MUST be identical to
    the one configured, or the document is not to be used (it protects against a
    document that speaks for another provider). A trailing slash is the one
    difference forgiven, since people type issuers both ways.

    `fallback` supplies a device endpoint the document does not advertise (the
    configured one, or authentik's global `/application/o/device/`); `token_endpoint`,
    a configured token endpoint for a document without one.
    """
    if response.status != 200:
        raise DiscoveryFailed(f"metadata document answered HTTP {response.status}")
    try:
        doc = parse_json_object(response)
    except MalformedResponse as exc:
        raise DiscoveryFailed(f"metadata document: {exc}") from None
    return _endpoints_from(doc, issuer=issuer, allow_insecure_http=allow_insecure_http,
                           fallback=fallback, token_endpoint=token_endpoint)


def _endpoints_from(doc: dict[str, Any], *, issuer: str, allow_insecure_http: bool,
                    fallback: Endpoints | None, token_endpoint: str | None) -> Endpoints:
    found = doc.get("issuer")
    if not isinstance(found, str) or found.rstrip("/") != issuer.rstrip("/"):
        raise DiscoveryFailed(
            f"metadata document names issuer {found!r}, the config names {issuer!r}",
            fix="set provider.issuer to the issuer the provider names")
    token = _optional_url(doc, "token_endpoint", allow_insecure_http) or token_endpoint
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


@dataclass(frozen=True, kw_only=True)
class ExplicitEndpoints:
    """Endpoints the config names. Each one given wins over the metadata document's;
    each one left out comes from it (RFC 8628 §4 makes the device endpoint optional in
    metadata, and django-oauth-toolkit leaves out the device and revocation endpoints)."""

    device_authorization: str | None = None
    token: str | None = None
    revocation: str | None = None
    userinfo: str | None = None

    def without_metadata(self, issuer: str | None) -> Endpoints | None:
        """The endpoints when there is no document to complete them from."""
        if self.device_authorization is None or self.token is None:
            return None
        return Endpoints(issuer=issuer, device_authorization=self.device_authorization,
                         token=self.token, revocation=self.revocation, userinfo=self.userinfo)

    def merged(self, found: Endpoints) -> Endpoints:
        return Endpoints(
            issuer=found.issuer,
            device_authorization=self.device_authorization or found.device_authorization,
            token=self.token or found.token,
            revocation=self.revocation or found.revocation,
            userinfo=self.userinfo or found.userinfo,
            scopes_supported=found.scopes_supported,
            grant_types_supported=found.grant_types_supported,
        )


@dataclass(frozen=True, kw_only=True)
class DiscoveryStep:
    """What one answer of the discovery sequence means.

    - `endpoints`: found; `notes` say what came from where, for the log; `alone`: no
      document exists, and the configured endpoints are used without one.
    - `request`: look there next (the previous location answered 404).
    - `error` with `misconfigured`: a person must fix the issuer or the provider;
      asking again soon will not help (OpenID Connect Discovery §4.3).
    - `error` without it: trouble on the way (5xx, not JSON); retry like a network error.
    """

    endpoints: Endpoints | None = None
    request: HttpRequest | None = None
    error: DiscoveryFailed | None = None
    misconfigured: bool = False
    alone: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


class Discovery:
    """The discovery sequence, sans-IO: used by the daemon and by `check-provider`, so
    both see the same merged endpoints.

    Without an issuer the config's endpoints are the whole answer. With one, the
    OpenID Connect location is asked first, then RFC 8414's; each endpoint then comes
    from the config where given, else from the document. When no document exists and
    the config names the device and token endpoints, those are used alone.
    """

    def __init__(self, issuer: str | None, explicit: ExplicitEndpoints, *,
                 allow_insecure_http: bool) -> None:
        self.issuer = issuer
        self.explicit = explicit
        self._allow_insecure_http = allow_insecure_http
        self._pending = discovery_requests(issuer) if issuer is not None else []
        self._misses: list[str] = []

    def first(self) -> DiscoveryStep:
        """Where to start: a request, or the endpoints at once when there is no issuer."""
        if self._pending:
            return DiscoveryStep(request=self._pending[0])
        endpoints = self.explicit.without_metadata(self.issuer)
        if endpoints is None:
            return DiscoveryStep(misconfigured=True, error=DiscoveryFailed(
                "no issuer, and not both the device and token endpoints"))
        return DiscoveryStep(endpoints=endpoints)

    def receive(self, response: HttpResponse) -> DiscoveryStep:
        request = self._pending.pop(0)
        assert self.issuer is not None
        if response.status in (404, 410):
            self._misses.append(f"{request.url}: HTTP {response.status}")
            if self._pending:
                return DiscoveryStep(request=self._pending[0])
            alone = self.explicit.without_metadata(self.issuer)
            if alone is not None:
                return DiscoveryStep(endpoints=alone, alone=True, notes=(
                    "no metadata document; using the configured endpoints only",))
            return DiscoveryStep(misconfigured=True, error=DiscoveryFailed(
                "no metadata document: " + "; ".join(self._misses),
                fix="the issuer for authentik is https://HOST/application/o/SLUG/ (the "
                    "application's slug, with the trailing slash)"))
        if response.status >= 500 or response.status == 429:
            return DiscoveryStep(error=DiscoveryFailed(
                f"metadata document answered HTTP {response.status}"))
        try:
            doc = parse_json_object(response)
        except MalformedResponse as exc:
            # A page that is not JSON (a captive portal, a proxy's error page) is
            # trouble on the way, not a wrong provider.
            return DiscoveryStep(error=DiscoveryFailed(f"metadata document: {exc}"))
        if response.status != 200:
            return DiscoveryStep(misconfigured=True, error=DiscoveryFailed(
                f"metadata document answered HTTP {response.status}"))
        fallback = authentik_endpoints(self.issuer)
        if self.explicit.device_authorization is not None:
            fallback = Endpoints(device_authorization=self.explicit.device_authorization,
                                 token=self.explicit.token or "")
        try:
            found = _endpoints_from(doc, issuer=self.issuer,
                                    allow_insecure_http=self._allow_insecure_http,
                                    fallback=fallback, token_endpoint=self.explicit.token)
        except DiscoveryFailed as exc:
            return DiscoveryStep(error=exc, misconfigured=True)
        endpoints = self.explicit.merged(found)
        return DiscoveryStep(endpoints=endpoints, notes=(
            f"provider endpoints: device {endpoints.device_authorization}, "
            f"token {endpoints.token}",))
