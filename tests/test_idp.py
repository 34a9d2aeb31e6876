"""The built-in identity provider answers like authentik on the wire.

Every test talks to it over real loopback HTTP with aiohttp's client; time is a
ManualClock, so code expiry, throttle windows and token lifetimes pass at once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import string
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from agent.idp import (
    Answer,
    Cut,
    Delay,
    Drop,
    ExpiryMode,
    Fail,
    IdentityProvider,
    ProviderSettings,
    serve_provider,
)
from agent.idp import jwt as idp_jwt
from tests.clock import ManualClock

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
ALL_SCOPES = "openid profile email offline_access"
DEVICE_CODE_ALPHABET = set(string.ascii_letters + string.digits + string.punctuation)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def settings() -> ProviderSettings:
    return ProviderSettings(users={
        "alice": {"name": "Alice Example", "email": "alice@example.com"},
        "bob": {"name": "Bob <b>Bold</b>", "email": "bob@example.com"},
    })


@pytest.fixture
async def provider(settings: ProviderSettings,
                   clock: ManualClock) -> AsyncIterator[IdentityProvider]:
    async with serve_provider(settings, clock=clock) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Wire:
    """Small helpers for the requests a device makes."""

    def __init__(self, provider: IdentityProvider, http: aiohttp.ClientSession) -> None:
        self.p = provider
        self.http = http

    def url(self, path: str) -> str:
        return self.p.base_url + path

    async def post(self, path: str, form: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None,
                   ) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.http.post(self.url(path), data=form or {}, headers=headers) as r:
            body = await r.read()
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = body.decode()
            return r.status, parsed, r

    async def device(self, scope: str = ALL_SCOPES, **extra: str) -> dict[str, Any]:
        status, body, _ = await self.post("/application/o/device/",
                                          {"client_id": self.p.settings.client_id,
                                           "scope": scope, **extra})
        assert status == 200, body
        assert isinstance(body, dict)
        return body

    async def poll(self, device_code: str, **extra: str) -> tuple[int, Any]:
        status, body, _ = await self.post("/application/o/token/", {
            "grant_type": DEVICE_GRANT, "device_code": device_code,
            "client_id": self.p.settings.client_id, **extra})
        return status, body

    async def refresh(self, refresh_token: str, **extra: str) -> tuple[int, Any]:
        status, body, _ = await self.post("/application/o/token/", {
            "grant_type": "refresh_token", "refresh_token": refresh_token,
            "client_id": self.p.settings.client_id, **extra})
        return status, body

    async def sign_in(self, scope: str = ALL_SCOPES, user: str = "alice") -> dict[str, Any]:
        codes = await self.device(scope)
        self.p.approve(codes["user_code"], user=user)
        status, tokens = await self.poll(codes["device_code"])
        assert status == 200, tokens
        assert isinstance(tokens, dict)
        return tokens


@pytest.fixture
def wire(provider: IdentityProvider, http: aiohttp.ClientSession) -> Wire:
    return Wire(provider, http)


def assert_oauth_error(status: int, body: Any, error: str, *, http_status: int = 400) -> None:
    assert status == http_status, body
    assert isinstance(body, dict)
    assert body["error"] == error
    assert body["error_description"]
    assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"])


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


# -- discovery ---------------------------------------------------------------------------

async def test_discovery_at_both_addresses(wire: Wire, provider: IdentityProvider) -> None:
    base = provider.base_url
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base)
    assert provider.issuer == f"{base}/application/o/device-agent/"
    docs = []
    for path in ("/application/o/device-agent/.well-known/openid-configuration",
                 "/.well-known/oauth-authorization-server/application/o/device-agent/"):
        async with wire.http.get(wire.url(path)) as r:
            assert r.status == 200
            docs.append(await r.json())
    doc = docs[0]
    assert docs[1] == doc
    assert doc["issuer"] == provider.issuer
    assert doc["device_authorization_endpoint"] == f"{base}/application/o/device/"
    assert doc["token_endpoint"] == f"{base}/application/o/token/"
    assert doc["userinfo_endpoint"] == f"{base}/application/o/userinfo/"
    assert doc["revocation_endpoint"] == f"{base}/application/o/revoke/"
    assert doc["introspection_endpoint"] == f"{base}/application/o/introspect/"
    assert doc["end_session_endpoint"] == f"{provider.issuer}end-session/"
    assert doc["jwks_uri"] == f"{provider.issuer}jwks/"
    assert {DEVICE_GRANT, "refresh_token"} <= set(doc["grant_types_supported"])
    assert set(doc["token_endpoint_auth_methods_supported"]) == {
        "client_secret_post", "client_secret_basic"}
    assert {"openid", "profile", "email", "offline_access"} <= set(doc["scopes_supported"])
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]
    assert "code" in doc["response_types_supported"]
    assert doc["subject_types_supported"] == ["public"]


async def test_unknown_slug_is_404(wire: Wire) -> None:
    for path in ("/application/o/other/.well-known/openid-configuration",
                 "/.well-known/oauth-authorization-server/application/o/other/",
                 "/application/o/other/jwks/"):
        async with wire.http.get(wire.url(path)) as r:
            assert r.status == 404, path


async def test_discovery_can_leave_out_the_device_endpoint(
        wire: Wire, settings: ProviderSettings) -> None:
    settings.advertise_device_endpoint = False
    async with wire.http.get(wire.p.issuer + ".well-known/openid-configuration") as r:
        doc = await r.json()
    assert "device_authorization_endpoint" not in doc
    assert "token_endpoint" in doc
    # The endpoint itself still answers at authentik's fixed address.
    await wire.device()


# -- device authorization ------------------------------------------------------------------

async def test_device_code_shape(wire: Wire, provider: IdentityProvider) -> None:
    status, codes, response = await wire.post(
        "/application/o/device/", {"client_id": "device-agent", "scope": ALL_SCOPES})
    assert status == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Pragma"] == "no-cache"
    assert set(codes) == {"device_code", "user_code", "verification_uri",
                          "verification_uri_complete", "expires_in", "interval"}
    assert re.fullmatch(r"[0-9]{9}", codes["user_code"])
    device_code = codes["device_code"]
    assert len(device_code) == 128
    assert set(device_code) <= DEVICE_CODE_ALPHABET
    assert set(device_code) & set(string.punctuation)
    assert codes["verification_uri"] == f"{provider.base_url}/device"
    assert codes["verification_uri_complete"] == (
        f"{provider.base_url}/device?code={codes['user_code']}")
    assert codes["expires_in"] == 60 and isinstance(codes["expires_in"], int)
    assert codes["interval"] == 5
    assert provider.pending_user_codes() == [codes["user_code"]]
    # Punctuation survives form encoding both ways: the poll finds the code.
    status, body = await wire.poll(device_code)
    assert_oauth_error(status, body, "authorization_pending")
    assert provider.requests[-1].form["device_code"] == device_code


async def test_device_code_alphabet_can_be_plain(
        wire: Wire, provider: IdentityProvider, settings: ProviderSettings) -> None:
    settings.device_code_alphabet = string.ascii_letters + string.digits
    codes = await wire.device()
    device_code = codes["device_code"]
    assert len(device_code) == 128
    assert set(device_code) <= set(string.ascii_letters + string.digits)
    # As oidc-agent 4.2.6 sends it: the form body put together without URL-encoding.
    raw = (f"grant_type={DEVICE_GRANT}&device_code={device_code}"
           f"&client_id={settings.client_id}")
    provider.approve(codes["user_code"])
    async with wire.http.post(wire.url("/application/o/token/"), data=raw, headers={
            "Content-Type": "application/x-www-form-urlencoded"}) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["access_token"]


async def test_interval_omitted_and_lifetime_configurable(
        wire: Wire, settings: ProviderSettings) -> None:
    settings.interval = None
    settings.code_lifetime = 600.7
    codes = await wire.device()
    assert "interval" not in codes
    assert codes["expires_in"] == 600


async def test_user_codes_are_unique_and_zero_padded_digits(wire: Wire) -> None:
    codes = [(await wire.device())["user_code"] for _ in range(10)]
    assert len(set(codes)) == 10
    assert all(len(c) == 9 and c.isdigit() for c in codes)


async def test_device_errors_are_json_with_request_id(wire: Wire) -> None:
    status, body, response = await wire.post("/application/o/device/", {"scope": "openid"})
    assert_oauth_error(status, body, "invalid_client")
    assert response.headers["Cache-Control"] == "no-store"
    status, other, _ = await wire.post("/application/o/device/", {"client_id": "stranger"})
    assert_oauth_error(status, other, "invalid_client")
    assert other["request_id"] != body["request_id"]
    # A JSON body is not read: to authentik it carries no client_id.
    async with wire.http.post(wire.url("/application/o/device/"),
                              json={"client_id": "device-agent"}) as r:
        assert_oauth_error(r.status, await r.json(), "invalid_client")
    async with wire.http.get(wire.url("/application/o/device/")) as r:
        assert r.status == 405


async def test_device_endpoint_ignores_the_secret(wire: Wire, settings: ProviderSettings) -> None:
    settings.client_secret = "s3cret"
    await wire.device()
    await wire.device(client_secret="wrong")


async def test_throttle_counts_every_request_and_answers_429(
        wire: Wire, settings: ProviderSettings, clock: ManualClock) -> None:
    settings.device_requests_per_hour = 3
    async with wire.http.get(wire.url("/application/o/device/")) as r:
        assert r.status == 405
    status, body, _ = await wire.post("/application/o/device/", {"client_id": "stranger"})
    assert_oauth_error(status, body, "invalid_client")
    clock.advance(1800)
    await wire.device()
    status, body, response = await wire.post("/application/o/device/",
                                             {"client_id": "device-agent"})
    assert_oauth_error(status, body, "slow_down", http_status=429)
    assert response.headers["Cache-Control"] == "no-store"
    # The window rolls: an hour after the first two, two requests are free again.
    clock.advance(1800)
    await wire.device()
    await wire.device()
    status, body, _ = await wire.post("/application/o/device/", {"client_id": "device-agent"})
    assert_oauth_error(status, body, "slow_down", http_status=429)


# -- polling and expiry ----------------------------------------------------------------------

async def test_approve_gives_tokens_once(wire: Wire, provider: IdentityProvider) -> None:
    codes = await wire.device()
    status, body = await wire.poll(codes["device_code"])
    assert_oauth_error(status, body, "authorization_pending")
    provider.approve(codes["user_code"])
    assert provider.pending_user_codes() == []
    status, tokens, response = await wire.post("/application/o/token/", {
        "grant_type": DEVICE_GRANT, "device_code": codes["device_code"],
        "client_id": "device-agent"})
    assert status == 200, tokens
    assert response.headers["Cache-Control"] == "no-store"
    assert set(tokens) == {"access_token", "token_type", "scope", "expires_in", "id_token",
                           "refresh_token"}
    assert tokens["token_type"] == "Bearer"
    assert tokens["scope"] == ALL_SCOPES
    assert tokens["expires_in"] == 3600
    assert provider.access_token_valid(tokens["access_token"])
    assert provider.refresh_token_valid(tokens["refresh_token"])
    status, body = await wire.poll(codes["device_code"])
    assert_oauth_error(status, body, "invalid_grant")


async def test_poll_errors(wire: Wire) -> None:
    codes = await wire.device()
    for form in ({"grant_type": DEVICE_GRANT, "client_id": "device-agent"},
                 {"grant_type": DEVICE_GRANT, "client_id": "device-agent",
                  "device_code": codes["device_code"][:-1]}):
        status, body, _ = await wire.post("/application/o/token/", form)
        assert_oauth_error(status, body, "invalid_grant")
    status, body, _ = await wire.post("/application/o/token/", {
        "grant_type": DEVICE_GRANT, "device_code": codes["device_code"]})
    assert_oauth_error(status, body, "invalid_client")
    status, body, _ = await wire.post("/application/o/token/", {
        "grant_type": "password", "client_id": "device-agent"})
    assert_oauth_error(status, body, "unsupported_grant_type")
    status, body, _ = await wire.post("/application/o/token/", {"client_id": "device-agent"})
    assert_oauth_error(status, body, "unsupported_grant_type")


async def test_approve_without_code_takes_the_latest(
        wire: Wire, provider: IdentityProvider) -> None:
    with pytest.raises(KeyError):
        provider.approve()
    first = await wire.device()
    second = await wire.device()
    with pytest.raises(KeyError):
        provider.approve(second["user_code"], user="mallory")
    with pytest.raises(KeyError):
        provider.approve("000000000" if first["user_code"] != "000000000" else "000000001")
    provider.approve()
    status, _ = await wire.poll(second["device_code"])
    assert status == 200
    status, body = await wire.poll(first["device_code"])
    assert_oauth_error(status, body, "authorization_pending")


async def test_deny_answers_access_denied_once(wire: Wire, provider: IdentityProvider) -> None:
    codes = await wire.device()
    provider.deny(codes["user_code"])
    status, body = await wire.poll(codes["device_code"])
    assert_oauth_error(status, body, "access_denied")
    status, body = await wire.poll(codes["device_code"])
    assert_oauth_error(status, body, "invalid_grant")


async def test_auto_approve_after_clock_seconds(
        wire: Wire, provider: IdentityProvider, clock: ManualClock) -> None:
    provider.auto_approve(10, user="bob")
    codes = await wire.device()
    clock.advance(9.5)
    status, body = await wire.poll(codes["device_code"])
    assert_oauth_error(status, body, "authorization_pending")
    clock.advance(0.5)
    status, tokens = await wire.poll(codes["device_code"])
    assert status == 200
    _, claims = idp_jwt.decode_unverified(tokens["id_token"])
    assert claims["preferred_username"] == "bob"


async def test_expiry_pending_then_invalid_grant(
        wire: Wire, settings: ProviderSettings, clock: ManualClock,
        provider: IdentityProvider) -> None:
    settings.cleanup_delay = 300
    codes = await wire.device()
    clock.advance(61)
    assert provider.pending_user_codes() == []
    status, body = await wire.poll(codes["device_code"])
    assert_oauth_error(status, body, "authorization_pending")
    clock.advance(298.5)
    status, body = await wire.poll(codes["device_code"])
    assert_oauth_error(status, body, "authorization_pending")
    clock.advance(0.5)
    status, body = await wire.poll(codes["device_code"])
    assert_oauth_error(status, body, "invalid_grant")
    with pytest.raises(KeyError):
        provider.approve(codes["user_code"])


async def test_expired_code_can_still_be_redeemed_before_cleanup(
        wire: Wire, clock: ManualClock, provider: IdentityProvider) -> None:
    # authentik up to 2026.2 does not check expiry on approval or redemption.
    codes = await wire.device()
    clock.advance(120)
    provider.approve(codes["user_code"])
    status, _ = await wire.poll(codes["device_code"])
    assert status == 200


@pytest.mark.parametrize(("mode", "error"), [(ExpiryMode.INVALID_GRANT, "invalid_grant"),
                                             (ExpiryMode.EXPIRED_TOKEN, "expired_token")])
async def test_expiry_answers_at_once(
        wire: Wire, settings: ProviderSettings, clock: ManualClock,
        provider: IdentityProvider, mode: ExpiryMode, error: str) -> None:
    settings.expiry_mode = mode
    codes = await wire.device()
    clock.advance(59.5)
    status, body = await wire.poll(codes["device_code"])
    assert_oauth_error(status, body, "authorization_pending")
    clock.advance(0.5)
    provider.approve(codes["user_code"])  # too late: expiry wins
    status, body = await wire.poll(codes["device_code"])
    assert_oauth_error(status, body, error)


async def test_request_log(wire: Wire, provider: IdentityProvider, clock: ManualClock) -> None:
    codes = await wire.device(scope="openid")
    clock.advance(5)
    await wire.poll(codes["device_code"])
    device, poll = provider.requests
    assert (device.endpoint, device.method, device.status) == ("device", "POST", 200)
    assert device.form == {"client_id": "device-agent", "scope": "openid"}
    assert device.remote == "127.0.0.1"
    assert poll.endpoint == "token" and poll.status == 400
    assert poll.at - device.at == 5
    assert "User-Agent" in poll.headers


# -- tokens ----------------------------------------------------------------------------------

async def test_no_refresh_token_without_offline_access(wire: Wire) -> None:
    tokens = await wire.sign_in(scope="openid profile")
    assert "refresh_token" not in tokens
    assert tokens["scope"] == "openid profile"
    assert "id_token" in tokens


async def test_scope_is_stored_unfiltered(wire: Wire) -> None:
    tokens = await wire.sign_in(scope="offline_access custom:thing")
    assert tokens["scope"] == "offline_access custom:thing"
    assert "refresh_token" in tokens
    assert "id_token" in tokens  # even without openid


async def test_refresh_rotates_and_revokes_the_old_token(
        wire: Wire, provider: IdentityProvider) -> None:
    first = await wire.sign_in()
    status, second = await wire.refresh(first["refresh_token"])
    assert status == 200, second
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert second["scope"] == ALL_SCOPES
    assert "id_token" in second
    assert not provider.refresh_token_valid(first["refresh_token"])
    assert provider.refresh_token_valid(second["refresh_token"])
    status, body = await wire.refresh(first["refresh_token"])
    assert_oauth_error(status, body, "invalid_grant")
    status, third = await wire.refresh(second["refresh_token"])
    assert status == 200
    assert provider.refresh_token_valid(third["refresh_token"])


async def test_refresh_without_rotation_keeps_the_old_token(
        wire: Wire, settings: ProviderSettings, provider: IdentityProvider) -> None:
    settings.rotate_refresh_tokens = False
    first = await wire.sign_in()
    for _ in range(2):
        status, answer = await wire.refresh(first["refresh_token"])
        assert status == 200
        assert "refresh_token" not in answer
        assert provider.access_token_valid(answer["access_token"])
    assert provider.refresh_token_valid(first["refresh_token"])


async def test_refresh_scope_rules(wire: Wire) -> None:
    tokens = await wire.sign_in()
    status, body = await wire.refresh(tokens["refresh_token"], scope="openid")
    assert_oauth_error(status, body, "invalid_scope")
    status, body = await wire.refresh(tokens["refresh_token"],
                                      scope="openid offline_access admin")
    # Unknown scopes are clipped to the provider's mappings first, as authentik does.
    assert status == 200, body
    assert body["scope"] == "openid offline_access"
    narrowed = await wire.sign_in(scope="openid offline_access")
    status, body = await wire.refresh(narrowed["refresh_token"],
                                      scope="openid email offline_access")
    assert_oauth_error(status, body, "invalid_scope")


async def test_refresh_dies_when_expired_revoked_or_unknown(
        wire: Wire, settings: ProviderSettings, clock: ManualClock,
        provider: IdentityProvider) -> None:
    status, body = await wire.refresh("")
    assert_oauth_error(status, body, "invalid_grant")
    status, body = await wire.refresh("nonsense")
    assert_oauth_error(status, body, "invalid_grant")
    settings.refresh_token_lifetime = 100
    tokens = await wire.sign_in()
    clock.advance(100)
    assert not provider.refresh_token_valid(tokens["refresh_token"])
    status, body = await wire.refresh(tokens["refresh_token"])
    assert_oauth_error(status, body, "invalid_grant")
    tokens = await wire.sign_in()
    provider.revoke_refresh_tokens()
    status, body = await wire.refresh(tokens["refresh_token"])
    assert_oauth_error(status, body, "invalid_grant")


async def test_access_token_expires_on_the_clock(
        wire: Wire, clock: ManualClock, provider: IdentityProvider) -> None:
    tokens = await wire.sign_in()
    clock.advance(3599)
    assert provider.access_token_valid(tokens["access_token"])
    clock.advance(1)
    assert not provider.access_token_valid(tokens["access_token"])
    assert not provider.access_token_valid("nonsense")


async def test_confidential_client_must_send_its_secret(
        wire: Wire, settings: ProviderSettings) -> None:
    settings.client_secret = "s3:cr%3At"
    codes = await wire.device()
    status, body = await wire.poll(codes["device_code"])
    assert_oauth_error(status, body, "invalid_client")
    status, body = await wire.poll(codes["device_code"], client_secret="wrong")
    assert_oauth_error(status, body, "invalid_client")
    status, body = await wire.poll(codes["device_code"], client_secret="s3:cr%3At")
    assert_oauth_error(status, body, "authorization_pending")
    # Basic: split at the first ':' only, and no URL-decoding of the rest.
    status, body, _ = await wire.post(
        "/application/o/token/", {"grant_type": DEVICE_GRANT,
                                  "device_code": codes["device_code"]},
        headers=basic("device-agent", "s3:cr%3At"))
    assert_oauth_error(status, body, "authorization_pending")
    status, body, _ = await wire.post(
        "/application/o/token/", {"grant_type": DEVICE_GRANT,
                                  "device_code": codes["device_code"]},
        headers=basic("device-agent", "s3:cr:t"))
    assert_oauth_error(status, body, "invalid_client")
    wire.p.approve(codes["user_code"])
    status, tokens = await wire.poll(codes["device_code"], client_secret="s3:cr%3At")
    assert status == 200
    status, body = await wire.refresh(tokens["refresh_token"])
    assert_oauth_error(status, body, "invalid_client")
    status, body = await wire.refresh(tokens["refresh_token"], client_secret="s3:cr%3At")
    assert status == 200, body


async def test_basic_auth_wins_over_the_form(wire: Wire) -> None:
    status, body, _ = await wire.post("/application/o/device/", {"client_id": "stranger"},
                                      headers=basic("device-agent", ""))
    assert status == 200, body
    status, body, _ = await wire.post("/application/o/device/",
                                      {"client_id": "device-agent"},
                                      headers=basic("stranger", ""))
    assert_oauth_error(status, body, "invalid_client")
    # Not URL-decoded: %2D stays three characters.
    status, body, _ = await wire.post("/application/o/device/", {},
                                      headers=basic("device%2Dagent", ""))
    assert_oauth_error(status, body, "invalid_client")
    status, body, _ = await wire.post("/application/o/device/",
                                      {"client_id": "device-agent"},
                                      headers={"Authorization": "Basic !!!notbase64"})
    assert_oauth_error(status, body, "invalid_client")
    # Another scheme is no client authentication: the form counts.
    status, body, _ = await wire.post("/application/o/device/",
                                      {"client_id": "device-agent"},
                                      headers={"Authorization": "Bearer whatever"})
    assert status == 200, body


# -- JWTs --------------------------------------------------------------------------------------

async def test_tokens_are_rs256_jwts_verified_against_the_jwks(
        wire: Wire, provider: IdentityProvider, clock: ManualClock) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    issued_wall = int(clock.time())
    codes = await wire.device()
    clock.advance(30)
    provider.approve(codes["user_code"])
    status, tokens = await wire.poll(codes["device_code"])
    assert status == 200
    async with wire.http.get(provider.issuer + "jwks/") as r:
        jwks = await r.json()
    (key,) = jwks["keys"]
    assert (key["kty"], key["alg"], key["use"]) == ("RSA", "RS256", "sig")
    public = rsa.RSAPublicNumbers(
        int.from_bytes(idp_jwt.b64url_decode(key["e"]), "big"),
        int.from_bytes(idp_jwt.b64url_decode(key["n"]), "big")).public_key()

    def verified(token: str) -> dict[str, Any]:
        header, claims = idp_jwt.decode_unverified(token)
        assert header == {"alg": "RS256", "kid": key["kid"], "typ": "JWT"}
        signing_input, _, signature = token.rpartition(".")
        public.verify(idp_jwt.b64url_decode(signature), signing_input.encode(),
                      padding.PKCS1v15(), hashes.SHA256())
        return claims

    access = verified(tokens["access_token"])
    id_claims = verified(tokens["id_token"])
    now = int(clock.time())
    for claims in (access, id_claims):
        assert claims["iss"] == provider.issuer
        assert claims["aud"] == "device-agent"
        assert claims["iat"] == now
        assert claims["exp"] == now + 3600
        assert claims["auth_time"] == issued_wall
        assert re.fullmatch(r"[0-9a-f]{64}", claims["sub"])
        for name in ("acr", "amr", "sid", "jti"):
            assert name in claims
        assert claims["name"] == "Alice Example"
        assert claims["preferred_username"] == "alice"
        assert claims["email"] == "alice@example.com"
    assert access["azp"] == "device-agent"
    assert access["scope"] == ALL_SCOPES
    assert access["uid"]
    assert "scope" not in id_claims and "azp" not in id_claims
    assert access["jti"] != id_claims["jti"]

    head, _, signature = tokens["access_token"].split(".")
    forged = dict(access, sub="someone-else")
    forged_body = idp_jwt.b64url_encode(json.dumps(forged).encode())
    with pytest.raises(InvalidSignature):
        public.verify(idp_jwt.b64url_decode(signature), f"{head}.{forged_body}".encode(),
                      padding.PKCS1v15(), hashes.SHA256())


async def test_claims_follow_the_scopes(wire: Wire) -> None:
    tokens = await wire.sign_in(scope="openid offline_access")
    _, claims = idp_jwt.decode_unverified(tokens["id_token"])
    assert "name" not in claims and "email" not in claims
    tokens = await wire.sign_in(scope="openid email")
    _, claims = idp_jwt.decode_unverified(tokens["id_token"])
    assert claims["email"] == "alice@example.com" and "name" not in claims


async def test_hs256_with_the_client_secret_without_cryptography(
        monkeypatch: pytest.MonkeyPatch, settings: ProviderSettings, clock: ManualClock,
        http: aiohttp.ClientSession) -> None:
    monkeypatch.setattr(idp_jwt, "rsa_available", lambda: False)
    settings.client_secret = "shared-secret"
    async with serve_provider(settings, clock=clock) as provider:
        wire = Wire(provider, http)
        async with http.get(provider.issuer + ".well-known/openid-configuration") as r:
            assert (await r.json())["id_token_signing_alg_values_supported"] == ["HS256"]
        async with http.get(provider.issuer + "jwks/") as r:
            assert await r.json() == {"keys": []}
        codes = await wire.device()
        provider.approve()
        status, tokens = await wire.poll(codes["device_code"], client_secret="shared-secret")
        assert status == 200
    header, claims = idp_jwt.decode_unverified(tokens["access_token"])
    assert header["alg"] == "HS256"
    signing_input, _, signature = tokens["access_token"].rpartition(".")
    expected = hmac.new(b"shared-secret", signing_input.encode(), hashlib.sha256).digest()
    assert idp_jwt.b64url_decode(signature) == expected
    assert claims["aud"] == "device-agent"


def test_signers_reject_tampering() -> None:
    for signer in (idp_jwt.HS256Signer(b"k"), idp_jwt.RS256Signer()):
        token = signer.sign({"sub": "x"})
        assert signer.verify(token) == {"sub": "x"}
        head, _, sig = token.split(".")
        other = idp_jwt.b64url_encode(b'{"sub":"y"}')
        with pytest.raises(ValueError):
            signer.verify(f"{head}.{other}.{sig}")
    with pytest.raises(ValueError):
        idp_jwt.decode_unverified("not-a-jwt")


# -- userinfo, revocation, introspection --------------------------------------------------------

async def test_userinfo(wire: Wire, clock: ManualClock) -> None:
    url = wire.url("/application/o/userinfo/")
    async with wire.http.get(url) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    async with wire.http.get(url, headers={"Authorization": "Bearer nonsense"}) as r:
        assert r.status == 401
    no_openid = await wire.sign_in(scope="profile")
    async with wire.http.get(url, headers={
            "Authorization": f"Bearer {no_openid['access_token']}"}) as r:
        assert r.status == 403
        assert (await r.json())["error"] == "insufficient_scope"
        assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    tokens = await wire.sign_in(scope="openid profile email")
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}
    _, id_claims = idp_jwt.decode_unverified(tokens["id_token"])
    async with wire.http.get(url, headers=auth) as r:
        assert r.status == 200
        info = await r.json()
    assert info["sub"] == id_claims["sub"]
    assert info["name"] == "Alice Example"
    assert info["preferred_username"] == "alice"
    assert info["email"] == "alice@example.com"
    async with wire.http.post(url, headers=auth) as r:
        assert r.status == 200
    clock.advance(3600)
    async with wire.http.get(url, headers=auth) as r:
        assert r.status == 401


async def test_revoke(wire: Wire, provider: IdentityProvider) -> None:
    tokens = await wire.sign_in()
    for token in (tokens["access_token"], tokens["refresh_token"], "never-issued"):
        status, body, _ = await wire.post("/application/o/revoke/",
                                          {"token": token, "client_id": "device-agent"})
        assert (status, body) == (200, {})
    assert not provider.access_token_valid(tokens["access_token"])
    assert not provider.refresh_token_valid(tokens["refresh_token"])
    status, body = await wire.refresh(tokens["refresh_token"])
    assert_oauth_error(status, body, "invalid_grant")
    async with wire.http.get(wire.url("/application/o/userinfo/"), headers={
            "Authorization": f"Bearer {tokens['access_token']}"}) as r:
        assert r.status == 401


async def test_revoke_needs_a_known_client_and_the_secret(
        wire: Wire, settings: ProviderSettings, provider: IdentityProvider) -> None:
    status, body, _ = await wire.post("/application/o/revoke/",
                                      {"token": "x", "client_id": "stranger"})
    assert_oauth_error(status, body, "invalid_client", http_status=401)
    settings.client_secret = "s3cret"
    codes = await wire.device()
    provider.approve()
    _, tokens = await wire.poll(codes["device_code"], client_secret="s3cret")
    status, body, _ = await wire.post("/application/o/revoke/", {
        "token": tokens["refresh_token"], "client_id": "device-agent"})
    assert_oauth_error(status, body, "invalid_client", http_status=401)
    assert provider.refresh_token_valid(tokens["refresh_token"])
    status, body, _ = await wire.post("/application/o/revoke/",
                                      {"token": tokens["refresh_token"]},
                                      headers=basic("device-agent", "s3cret"))
    assert (status, body) == (200, {})
    assert not provider.refresh_token_valid(tokens["refresh_token"])


async def test_introspection_needs_a_confidential_client(
        wire: Wire, settings: ProviderSettings) -> None:
    tokens = await wire.sign_in()
    status, body, _ = await wire.post("/application/o/introspect/", {
        "token": tokens["access_token"], "client_id": "device-agent"})
    assert_oauth_error(status, body, "invalid_client", http_status=401)
    settings.client_secret = "s3cret"
    creds = {"client_id": "device-agent", "client_secret": "s3cret"}
    status, body, _ = await wire.post("/application/o/introspect/",
                                      {"token": tokens["access_token"], **creds})
    assert status == 200 and body["active"] is True and body["scope"] == ALL_SCOPES
    status, body, _ = await wire.post("/application/o/introspect/",
                                      {"token": "nonsense", **creds})
    assert (status, body) == (200, {"active": False})


# -- scripted behaviours -------------------------------------------------------------------------

async def test_script_fail_then_normal(wire: Wire, provider: IdentityProvider) -> None:
    provider.script("token", Fail(503), Fail(status=502, body=b"bad gateway",
                                              content_type="text/plain"))
    codes = await wire.device()
    async with wire.http.post(wire.url("/application/o/token/"), data={
            "grant_type": DEVICE_GRANT, "device_code": codes["device_code"],
            "client_id": "device-agent"}) as r:
        assert r.status == 503
        assert r.content_type == "text/html"
    status, body = await wire.poll(codes["device_code"])
    assert (status, body) == (502, "bad gateway")
    status, body = await wire.poll(codes["device_code"])
    assert_oauth_error(status, body, "authorization_pending")
    assert [r.status for r in provider.requests if r.endpoint == "token"] == [503, 502, 400]


async def test_script_drop_closes_the_connection(wire: Wire, provider: IdentityProvider) -> None:
    codes = await wire.device()
    provider.script("token", Drop())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await wire.poll(codes["device_code"])
    assert provider.requests[-1].endpoint == "token"
    assert provider.requests[-1].status is None
    status, body = await wire.poll(codes["device_code"])
    assert_oauth_error(status, body, "authorization_pending")


@pytest.mark.parametrize("work", [True, False])
async def test_script_cut_sends_half_an_answer_after_doing_the_work_or_not(
        work: bool, wire: Wire, provider: IdentityProvider) -> None:
    tokens = await wire.sign_in()
    provider.script("token", Cut(work=work))
    with pytest.raises(aiohttp.ClientPayloadError):
        await wire.refresh(tokens["refresh_token"])
    assert provider.requests[-1].status is None
    # With the work done the refresh token rotated, and the one sent is dead.
    assert provider.refresh_token_valid(tokens["refresh_token"]) is not work
    assert len(provider.live_refresh_tokens()) == 1


async def test_script_delay_then_normal_answer(wire: Wire, provider: IdentityProvider) -> None:
    provider.script("discovery", Delay(0.1))
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with wire.http.get(provider.issuer + ".well-known/openid-configuration") as r:
        assert r.status == 200
        assert (await r.json())["issuer"] == provider.issuer
    assert loop.time() - started >= 0.1
    started = loop.time()
    async with wire.http.get(provider.issuer + ".well-known/openid-configuration") as r:
        assert r.status == 200
    assert loop.time() - started < 0.1


async def test_script_answer(wire: Wire, provider: IdentityProvider) -> None:
    provider.script("token", Answer(400, {"error": "slow_down"}),
                    Answer(200, body=b"{not json"),
                    Answer(503, headers={"Retry-After": "7"}))
    provider.script("device", Answer(429, {"error": "slow_down"}))
    status, body, _ = await wire.post("/application/o/device/", {"client_id": "device-agent"})
    assert (status, body) == (429, {"error": "slow_down"})
    codes = await wire.device()
    status, body = await wire.poll(codes["device_code"])
    assert (status, body) == (400, {"error": "slow_down"})
    status, body = await wire.poll(codes["device_code"])
    assert (status, body) == (200, "{not json")
    status, body, response = await wire.post("/application/o/token/", {})
    assert (status, body) == (503, "")
    assert response.headers["Retry-After"] == "7"


def test_script_rejects_unknown_endpoints_and_ambiguous_answers(
        provider: IdentityProvider) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        provider.script("tokens", Fail())
    with pytest.raises(ValueError):
        Answer(200, json={}, body=b"{}")


# -- the approval page -----------------------------------------------------------------------------

async def get_page(wire: Wire, query: str = "") -> tuple[int, str]:
    async with wire.http.get(wire.url("/device" + query)) as r:
        assert r.content_type == "text/html"
        return r.status, await r.text()


async def post_page(wire: Wire, form: dict[str, str]) -> tuple[int, str]:
    async with wire.http.post(wire.url("/device"), data=form) as r:
        return r.status, await r.text()


async def test_page_entry_form(wire: Wire) -> None:
    status, text = await get_page(wire)
    assert status == 200
    assert "Device code" in text
    assert 'inputmode="numeric"' in text
    assert 'pattern="[0-9]*"' in text
    assert 'name="code"' in text
    assert 'name="viewport"' in text
    assert "http" not in text.replace('action="/device"', "")  # no external assets


async def test_page_approve(wire: Wire, provider: IdentityProvider) -> None:
    codes = await wire.device()
    status, text = await get_page(wire, f"?code={codes['user_code']}")
    assert status == 200
    assert codes["user_code"] in text
    assert "device-agent" in text
    assert 'value="alice"' in text and 'value="bob"' in text
    assert "Bob &lt;b&gt;Bold&lt;/b&gt;" in text and "<b>Bold" not in text
    assert "Approve" in text and "Deny" in text
    status, text = await post_page(wire, {"code": codes["user_code"], "user": "bob",
                                          "action": "approve"})
    assert status == 200
    assert "You've successfully authenticated your device. You may close this page now." \
        in text.replace("&#x27;", "'")
    status, tokens = await wire.poll(codes["device_code"])
    assert status == 200
    _, claims = idp_jwt.decode_unverified(tokens["id_token"])
    assert claims["preferred_username"] == "bob"


async def test_page_deny(wire: Wire) -> None:
    codes = await wire.device()
    status, text = await post_page(wire, {"code": codes["user_code"], "user": "alice",
                                          "action": "deny"})
    assert status == 200
    assert "Sign-in denied" in text
    status, body = await wire.poll(codes["device_code"])
    assert_oauth_error(status, body, "access_denied")


async def test_page_refuses_unknown_codes_and_escapes_input(wire: Wire) -> None:
    status, text = await get_page(wire, "?code=123456789")
    assert status == 403
    assert "Permission denied" in text
    status, text = await get_page(wire, "?code=%3Cscript%3Ealert(1)%3C/script%3E")
    assert status == 403
    assert "<script>" not in text
    status, text = await post_page(wire, {"code": "123456789", "action": "approve",
                                          "user": "alice"})
    assert status == 403
    codes = await wire.device()
    status, text = await post_page(wire, {"code": codes["user_code"], "action": "approve",
                                          "user": "<i>mallory</i>"})
    assert status == 400
    assert "<i>" not in text
    status, _ = await post_page(wire, {"code": codes["user_code"], "action": "explode"})
    assert status == 400
    assert codes["user_code"] in wire.p.pending_user_codes()


async def test_page_hides_expired_codes_in_later_versions(
        wire: Wire, settings: ProviderSettings, clock: ManualClock) -> None:
    codes = await wire.device()
    clock.advance(61)
    status, _ = await get_page(wire, f"?code={codes['user_code']}")
    assert status == 200  # up to 2026.2 the lookup ignores expiry
    settings.expiry_mode = ExpiryMode.INVALID_GRANT
    status, _ = await get_page(wire, f"?code={codes['user_code']}")
    assert status == 403


async def test_serve_provider_on_a_chosen_port_and_cleans_up(clock: ManualClock) -> None:
    async with serve_provider(clock=clock) as provider:
        base = provider.base_url
        port = int(base.rsplit(":", 1)[1])
        assert port > 0
        assert provider.settings.client_id == "device-agent"
    # The port is free again once the block ends.
    async with serve_provider(clock=clock, port=port) as again:
        assert again.base_url == base


# -- what a person sees, and what the demo forgives ------------------------------------------

def typed_with_spaces_and_dashes(code: str) -> str:
    return f"{code[:3]} {code[3:6]}-{code[6:]}"


@pytest.mark.parametrize("lenient", [False, True])
async def test_codes_typed_with_spaces_or_dashes_only_where_the_demo_allows_them(
        wire: Wire, settings: ProviderSettings, lenient: bool) -> None:
    # authentik matches the user code exactly, so by default a screen that shows what
    # cannot be typed is caught; only the demo, which a person tries by hand, forgives.
    if lenient:
        settings.lenient_user_codes = True  # what `device-agent demo` sets
    codes = await wire.device()
    typed = typed_with_spaces_and_dashes(codes["user_code"])
    status, text = await get_page(wire, "?" + urlencode({"code": typed}))
    assert status == (200 if lenient else 403)
    status, text = await post_page(wire, {"code": typed, "user": "alice",
                                          "action": "approve"})
    if lenient:
        assert status == 200 and "successfully authenticated" in text
        poll_status, tokens = await wire.poll(codes["device_code"])
        assert poll_status == 200, tokens
    else:
        assert status == 403 and "Permission denied" in text
        assert codes["user_code"] in wire.p.pending_user_codes()
    _, entry = await get_page(wire)
    assert ('pattern="[0-9]*"' in entry) is not lenient


async def test_page_shows_the_device_the_code_in_groups_and_the_scopes_in_words(
        wire: Wire, settings: ProviderSettings) -> None:
    # The device authorization request carries only client_id and scope (RFC 8628
    # §3.1), so the name comes from whoever runs the provider.
    settings.device_name = "Kitchen <Pi>"
    codes = await wire.device(scope="openid profile email offline_access extra")
    code = codes["user_code"]
    status, text = await get_page(wire, f"?code={code}")
    assert status == 200
    assert "Kitchen &lt;Pi&gt;" in text and "<Pi>" not in text
    # Drawn apart, with nothing between the groups that a copy would carry along.
    assert f"<span>{code[:3]}</span><span>{code[3:6]}</span><span>{code[6:]}</span>" in text
    for words in ("openid: your identity", "profile: your name and username",
                  "email: your email address", "offline_access: stay signed in"):
        assert f"<li>{words}</li>" in text
    assert "<li>extra</li>" in text
    assert f'name="code" value="{code}"' in text


async def test_page_without_a_device_name_names_no_device(wire: Wire) -> None:
    codes = await wire.device()
    _, text = await get_page(wire, f"?code={codes['user_code']}")
    assert "Device:" not in text


async def test_public_url_changes_only_what_a_person_is_shown(
        wire: Wire, settings: ProviderSettings, provider: IdentityProvider) -> None:
    public = "http://phone.example:8080/idp"
    settings.public_url = public + "/"
    codes = await wire.device()
    assert codes["verification_uri"] == f"{public}/device"
    assert codes["verification_uri_complete"] == f"{public}/device?code={codes['user_code']}"
    async with wire.http.get(wire.url("/application/o/device-agent/.well-known/"
                                      "openid-configuration")) as r:
        document = await r.json()
    for key in ("issuer", "token_endpoint", "device_authorization_endpoint", "jwks_uri"):
        assert document[key].startswith(provider.base_url + "/"), key
    _, entry = await get_page(wire)
    assert f'action="{public}/device"' in entry
    _, confirm = await get_page(wire, f"?code={codes['user_code']}")
    assert f'action="{public}/device"' in confirm
    _, denied = await get_page(wire, "?code=000")
    assert f'href="{public}/device"' in denied
    # The device's own poll still works at the address it used.
    provider.approve(codes["user_code"])
    status, tokens = await wire.poll(codes["device_code"])
    assert status == 200
    _, claims = idp_jwt.decode_unverified(tokens["id_token"])
    assert claims["iss"] == provider.issuer


async def test_serve_provider_on_every_address_is_reached_at_loopback(
        clock: ManualClock) -> None:
    # A client cannot portably connect to 0.0.0.0; on this machine loopback reaches the
    # same socket.
    async with serve_provider(clock=clock, host="0.0.0.0") as provider:
        assert provider.base_url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session, session.get(
                provider.issuer + ".well-known/openid-configuration") as r:
            assert r.status == 200
