"""Refresh, revocation, userinfo and discovery in the sans-IO core."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from agent.errors import DiscoveryFailed, InvalidClient, InvalidGrant
from agent.oauth import (
    Client,
    HttpResponse,
    Refreshed,
    RefreshRejected,
    Rejected,
    ServerTrouble,
    TokenSet,
    authentik_endpoints,
    discovery_requests,
    id_token_claims,
    parse_discovery,
    receive_refresh,
    receive_revocation,
    receive_userinfo,
    refresh_request,
    revocation_request,
    userinfo_request,
)

CLIENT = Client(client_id="device-agent")
PREVIOUS = TokenSet(access_token="at-0", token_type="Bearer", issued_at=0.0, expires_at=3600.0,
                    refresh_token="rt-0", id_token="id-0", scope="openid offline_access")


def answer(status: int, body: Any = None, *, raw: bytes | None = None,
           headers: dict[str, str] | None = None) -> HttpResponse:
    data = raw if raw is not None else json.dumps(body).encode()
    return HttpResponse(status=status, body=data, headers=headers or {})


def jwt(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'RS256'})}.{part(claims)}.sig"


class TestRefresh:
    def test_request_omits_scope(self) -> None:
        request = refresh_request(PREVIOUS, client=CLIENT, token_endpoint="https://x/token/")
        assert dict(request.form) == {"grant_type": "refresh_token", "refresh_token": "rt-0",
                                      "client_id": "device-agent"}

    def test_confidential_client_authenticates(self) -> None:
        client = Client(client_id="c", client_secret="shh")
        request = refresh_request(PREVIOUS, client=client, token_endpoint="https://x/token/")
        assert request.form["client_secret"] == "shh"

    def test_without_refresh_token_is_a_programming_error(self) -> None:
        bare = TokenSet(access_token="a", token_type="Bearer", issued_at=0, expires_at=None)
        with pytest.raises(ValueError):
            refresh_request(bare, client=CLIENT, token_endpoint="https://x/token/")

    def test_rotation(self) -> None:
        event = receive_refresh(answer(200, {
            "access_token": "at-1", "token_type": "Bearer", "expires_in": 60,
            "refresh_token": "rt-1", "id_token": "id-1", "scope": "openid"}),
            previous=PREVIOUS, now_wall=100.0)
        assert isinstance(event, Refreshed)
        assert (event.tokens.access_token, event.tokens.refresh_token) == ("at-1", "rt-1")
        assert event.tokens.expires_at == 160.0

    def test_missing_refresh_token_keeps_the_old_one(self) -> None:
        # RFC 6749 §6; authentik omits it when its rotation threshold is set.
        event = receive_refresh(answer(200, {"access_token": "at-1", "token_type": "Bearer",
                                             "expires_in": 60}),
                                previous=PREVIOUS, now_wall=100.0)
        assert isinstance(event, Refreshed)
        assert event.tokens.refresh_token == "rt-0"
        assert event.tokens.id_token == "id-0"
        assert event.tokens.scope == "openid offline_access"

    def test_invalid_grant_means_sign_in_again(self) -> None:
        event = receive_refresh(answer(400, {"error": "invalid_grant"}), previous=PREVIOUS,
                                now_wall=0)
        assert isinstance(event, RefreshRejected) and isinstance(event.error, InvalidGrant)

    def test_invalid_client_is_a_config_problem(self) -> None:
        event = receive_refresh(answer(401, {"error": "invalid_client"}), previous=PREVIOUS,
                                now_wall=0)
        assert isinstance(event, Rejected) and isinstance(event.error, InvalidClient)

    @pytest.mark.parametrize(("status", "body"), [
        (500, None), (503, {"error": "temporarily_unavailable"}), (429, None),
        (400, {"error": "server_error"}), (400, None), (200, {"token_type": "Bearer"}),
    ])
    def test_trouble(self, status: int, body: Any) -> None:
        response = answer(status, body) if body is not None else answer(status, raw=b"<html>")
        assert isinstance(receive_refresh(response, previous=PREVIOUS, now_wall=0),
                          ServerTrouble)

    def test_retry_after_is_passed_on(self) -> None:
        event = receive_refresh(answer(503, raw=b"", headers={"Retry-After": "17"}),
                                previous=PREVIOUS, now_wall=0)
        assert event == ServerTrouble(reason="HTTP 503", retry_after=17.0)

    @pytest.mark.parametrize(("body", "kept"), [
        ({"token_type": "Bearer", "refresh_token": "rt-1"}, "rt-1"),
        ({"access_token": "", "refresh_token": "rt-1"}, "rt-1"),
        ({"token_type": "Bearer", "refresh_token": "rt-0"}, None),   # not rotated
        ({"token_type": "Bearer", "refresh_token": ""}, None),
        ({"token_type": "Bearer", "refresh_token": 5}, None),
        ({"token_type": "Bearer"}, None),
    ])
    def test_a_rotated_refresh_token_beside_no_access_token_is_handed_on(
            self, body: dict[str, Any], kept: str | None) -> None:
        # The provider has rotated by the time it answers 200: the refresh token it
        # sends is the only one left, even when the answer is otherwise unusable.
        event = receive_refresh(answer(200, body), previous=PREVIOUS, now_wall=0)
        assert isinstance(event, ServerTrouble) and "access_token" in event.reason
        assert event.refresh_token == kept
        assert "rt-1" not in repr(event)


class TestRevocation:
    def test_request(self) -> None:
        request = revocation_request("rt-0", hint="refresh_token", client=CLIENT,
                                     endpoint="https://x/revoke/")
        assert dict(request.form) == {"token": "rt-0", "token_type_hint": "refresh_token",
                                      "client_id": "device-agent"}

    def test_outcomes(self) -> None:
        assert receive_revocation(answer(200, {})) is None
        assert isinstance(receive_revocation(answer(503, raw=b"")), ServerTrouble)
        rejected = receive_revocation(answer(401, {"error": "invalid_client"}))
        assert isinstance(rejected, Rejected) and rejected.error.code == "invalid_client"
        bare = receive_revocation(answer(404, raw=b""))
        assert isinstance(bare, Rejected) and "404" in str(bare.error)


class TestUserInfo:
    def test_request_uses_bearer_header(self) -> None:
        request = userinfo_request(PREVIOUS, endpoint="https://x/userinfo/")
        assert request.method == "GET"
        assert request.headers["Authorization"] == "Bearer at-0"
        assert "at-0" not in repr(request)

    def test_keeps_user_claims_only(self) -> None:
        claims = receive_userinfo(answer(200, {"sub": "1", "name": "Alice", "email": "a@x",
                                               "groups": ["admins"], "nickname": 5}))
        assert claims == {"sub": "1", "name": "Alice", "email": "a@x"}

    def test_error_status_raises(self) -> None:
        with pytest.raises(Exception, match="403"):
            receive_userinfo(answer(403, {"error": "insufficient_scope"}))

    def test_id_token_claims(self) -> None:
        token = jwt({"sub": "42", "name": "Alice Example", "preferred_username": "alice",
                     "exp": 5})
        assert id_token_claims(token) == {"sub": "42", "name": "Alice Example",
                                          "preferred_username": "alice"}

    @pytest.mark.parametrize("broken", [None, "", "abc", "a.!!!.c", "a.bm90IGpzb24.c",
                                        "a." + base64.urlsafe_b64encode(b"[1]").decode() + ".c"])
    def test_unreadable_id_token_gives_nothing(self, broken: str | None) -> None:
        assert id_token_claims(broken) == {}


ISSUER = "https://auth.example.com/application/o/my-device/"
DOC = {
    "issuer": ISSUER,
    "device_authorization_endpoint": "https://auth.example.com/application/o/device/",
    "token_endpoint": "https://auth.example.com/application/o/token/",
    "revocation_endpoint": "https://auth.example.com/application/o/revoke/",
    "userinfo_endpoint": "https://auth.example.com/application/o/userinfo/",
    "scopes_supported": ["openid", "offline_access"],
    "grant_types_supported": ["urn:ietf:params:oauth:grant-type:device_code"],
}


class TestDiscovery:
    def test_urls_for_authentik(self) -> None:
        urls = [r.url for r in discovery_requests(ISSUER)]
        assert urls == [
            "https://auth.example.com/application/o/my-device/.well-known/openid-configuration",
            "https://auth.example.com/.well-known/oauth-authorization-server/application/o/"
            "my-device/",
        ]

    def test_urls_for_root_issuer(self) -> None:
        urls = [r.url for r in discovery_requests("https://login.example.org")]
        assert urls == ["https://login.example.org/.well-known/openid-configuration",
                        "https://login.example.org/.well-known/oauth-authorization-server"]

    def test_parse(self) -> None:
        endpoints = parse_discovery(answer(200, DOC), issuer=ISSUER, allow_insecure_http=False)
        assert endpoints.device_authorization == DOC["device_authorization_endpoint"]
        assert endpoints.token == DOC["token_endpoint"]
        assert endpoints.revocation == DOC["revocation_endpoint"]
        assert endpoints.scopes_supported == ("openid", "offline_access")

    def test_trailing_slash_forgiven(self) -> None:
        parse_discovery(answer(200, DOC), issuer=ISSUER.rstrip("/"), allow_insecure_http=False)

    def test_other_issuer_refused(self) -> None:
        with pytest.raises(DiscoveryFailed, match="issuer"):
            parse_discovery(answer(200, {**DOC, "issuer": "https://evil.example/"}),
                            issuer=ISSUER, allow_insecure_http=False)

    def test_http_endpoint_refused_unless_allowed(self) -> None:
        doc = {**DOC, "token_endpoint": "http://auth.example.com/application/o/token/"}
        with pytest.raises(DiscoveryFailed, match="plain http"):
            parse_discovery(answer(200, doc), issuer=ISSUER, allow_insecure_http=False)
        assert parse_discovery(answer(200, doc), issuer=ISSUER,
                               allow_insecure_http=True).token.startswith("http://")

    def test_missing_device_endpoint_explains(self) -> None:
        doc = {k: v for k, v in DOC.items() if k != "device_authorization_endpoint"}
        with pytest.raises(DiscoveryFailed, match="device_authorization_endpoint"):
            parse_discovery(answer(200, doc), issuer=ISSUER, allow_insecure_http=False)
        fallback = authentik_endpoints(ISSUER)
        endpoints = parse_discovery(answer(200, doc), issuer=ISSUER, allow_insecure_http=False,
                                    fallback=fallback)
        assert endpoints.device_authorization == "https://auth.example.com/application/o/device/"

    @pytest.mark.parametrize(("status", "raw"), [(500, b"{}"), (200, b"<html>"), (200, b"[]")])
    def test_broken_documents(self, status: int, raw: bytes) -> None:
        with pytest.raises(DiscoveryFailed):
            parse_discovery(answer(status, raw=raw), issuer=ISSUER, allow_insecure_http=False)

    def test_missing_token_endpoint(self) -> None:
        doc = {k: v for k, v in DOC.items() if k != "token_endpoint"}
        with pytest.raises(DiscoveryFailed, match="token_endpoint"):
            parse_discovery(answer(200, doc), issuer=ISSUER, allow_insecure_http=False)

    def test_authentik_fallback_only_for_authentik_issuers(self) -> None:
        assert authentik_endpoints("https://login.example.org/") is None
        fallback = authentik_endpoints(ISSUER)
        assert fallback is not None and fallback.token.endswith("/application/o/token/")
