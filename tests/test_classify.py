"""One classification of HTTP answers, status first, for every endpoint."""

from __future__ import annotations

import json

import pytest

from agent.oauth import (
    Client,
    DeviceAuthorization,
    DevicePoll,
    Expired,
    HttpResponse,
    Pending,
    RefreshRejected,
    Rejected,
    ServerTrouble,
    SlowDown,
    Throttled,
    TokenSet,
    receive_device_authorization,
    receive_refresh,
    receive_revocation,
)

PREVIOUS = TokenSet(access_token="A1", token_type="Bearer", issued_at=0.0, expires_at=3600.0,
                    refresh_token="R1")


def answer(status: int, body: object = None, **headers: str) -> HttpResponse:
    raw = b"" if body is None else json.dumps(body).encode()
    return HttpResponse(status=status, body=raw, headers=headers)


def poll() -> DevicePoll:
    return DevicePoll(DeviceAuthorization(
        device_code="d", user_code="123456789", verification_uri="https://idp/device",
        verification_uri_complete=None, expires_in=600, interval=5, issued_at=100.0),
        client=Client(client_id="c"), token_endpoint="https://idp/token")


@pytest.mark.parametrize("status", [500, 502, 503, 504])
@pytest.mark.parametrize("body", [{"error": "unknown_error"}, {"error": "invalid_grant"},
                                  {"error": "access_denied"}, None])
def test_any_5xx_is_trouble_whatever_its_body(status: int, body: object) -> None:
    # Keycloak answers 500 "unknown_error": no verdict on the code, the token or the client.
    response = answer(status, body)
    assert isinstance(poll().receive(response, now=105.0, now_wall=0.0), ServerTrouble)
    assert isinstance(receive_refresh(response, previous=PREVIOUS, now_wall=0.0),
                      ServerTrouble)
    assert isinstance(receive_device_authorization(response, now=0.0), ServerTrouble)
    assert isinstance(receive_revocation(response), ServerTrouble)


@pytest.mark.parametrize("body", [{"error": "invalid_grant"}, {"error": "slow_down"}, None])
def test_any_429_is_a_throttle_and_its_retry_after_is_kept(body: object) -> None:
    response = answer(429, body, **{"Retry-After": "120"})
    refreshed = receive_refresh(response, previous=PREVIOUS, now_wall=0.0)
    assert isinstance(refreshed, ServerTrouble) and refreshed.retry_after == 120
    device = receive_device_authorization(response, now=0.0)
    assert isinstance(device, Throttled) and device.retry_after == 120
    # RFC 8628 §3.5: while polling, a throttle is slow_down (+5 s for good).
    polled = poll().receive(response, now=105.0, now_wall=0.0)
    assert isinstance(polled, SlowDown) and polled.interval == 10


def test_a_200_carrying_an_error_is_that_error() -> None:
    # GitHub's style.
    pending = poll().receive(answer(200, {"error": "authorization_pending"}), now=105.0,
                             now_wall=0.0)
    assert isinstance(pending, Pending)
    dead = receive_refresh(answer(200, {"error": "invalid_grant"}), previous=PREVIOUS,
                           now_wall=0.0)
    assert isinstance(dead, RefreshRejected)


def test_a_401_at_the_token_endpoint_is_invalid_client() -> None:
    for response in (answer(401), answer(401, {"error": "unauthorized"})):
        polled = poll().receive(response, now=105.0, now_wall=0.0)
        assert isinstance(polled, Rejected) and polled.error.code == "invalid_client"
        refreshed = receive_refresh(response, previous=PREVIOUS, now_wall=0.0)
        assert isinstance(refreshed, Rejected) and refreshed.error.code == "invalid_client"


def test_an_error_code_no_rfc_names_ends_the_code_not_the_client_setup() -> None:
    # django-oauth-toolkit answers an unknown device code with 404 device_not_found.
    polled = poll().receive(answer(404, {"error": "device_not_found"}), now=105.0,
                            now_wall=0.0)
    assert polled == Expired(by_provider=True)
    # On refresh it ends that refresh; only invalid_grant says the token is dead.
    refreshed = receive_refresh(answer(400, {"error": "weird_code"}), previous=PREVIOUS,
                                now_wall=0.0)
    assert isinstance(refreshed, Rejected) and refreshed.error.code == "weird_code"


def test_a_token_the_provider_echoes_in_its_error_goes_no_further() -> None:
    # spring-security-oauth2: "Invalid refresh token: <value>". The text reaches the log,
    # the status document, STATUS= and the 502 body of POST /v1/refresh.
    token = "Zx8-" + "q" * 60 + ".abc_DEF~12"
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXBhcnQtaGVyZQ"
    refreshed = receive_refresh(answer(400, {
        "error": "invalid_grant",
        "error_description": f"Invalid refresh token: {token} (issued with {jwt})"}),
        previous=PREVIOUS, now_wall=0.0)
    assert isinstance(refreshed, RefreshRejected)
    text = str(refreshed.error)
    assert token not in text and token[:16] not in text and jwt[:16] not in text
    assert "Invalid refresh token: [redacted] (issued with [redacted])" in text
    # An error code is the provider's text too.
    rejected = receive_refresh(answer(400, {"error": token}), previous=PREVIOUS,
                               now_wall=0.0)
    assert isinstance(rejected, Rejected) and token[:16] not in str(rejected.error)


def test_secrets_sent_and_punctuated_tokens_are_redacted_and_error_codes_kept() -> None:
    # A device code as authentik makes it: letters, digits and punctuation, which no
    # run of token characters covers; the poll knows it sent it.
    device_code = 'a+b/c=d%e&f#g?h\\i"j\'k' * 3
    poll_ = DevicePoll(DeviceAuthorization(
        device_code=device_code, user_code="123456789",
        verification_uri="https://idp/device", verification_uri_complete=None,
        expires_in=600, interval=5, issued_at=100.0),
        client=Client(client_id="c", client_secret="s3cr3t-of-the-client!"),
        token_endpoint="https://idp/token")
    polled = poll_.receive(answer(400, {
        "error": "invalid_request",
        "error_description": f"unknown device_code {device_code} for s3cr3t-of-the-client!"}),
        now=105.0, now_wall=0.0)
    assert isinstance(polled, Rejected)
    text = str(polled.error)
    assert device_code[:8] not in text and "s3cr3t" not in text
    # Standard base64 (with "/"), and a form-encoded echo of the refresh token.
    b64 = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY/1234+abcd=="
    previous = TokenSet(access_token="A1", token_type="Bearer", issued_at=0.0,
                        expires_at=3600.0, refresh_token="r/t+with=punct&more-12345")
    refused = receive_refresh(answer(400, {
        "error": "invalid_grant",
        "error_description": f"bad {b64}; sent r%2Ft%2Bwith%3Dpunct%26more-12345"}),
        previous=previous, now_wall=0.0)
    assert isinstance(refused, RefreshRejected)
    assert b64[:12] not in str(refused.error) and "punct" not in str(refused.error)
    # Registered codes of 24 and more characters, and a trace id, are kept.
    for code in ("insufficient_user_authentication", "account_selection_required"):
        kept = receive_refresh(answer(400, {
            "error": code, "error_description": "Trace ID: 0f8fad5b-d9cb-469f-a165-70867728950e"}),
            previous=PREVIOUS, now_wall=0.0)
        assert isinstance(kept, Rejected) and kept.error.code == code
        assert "0f8fad5b-d9cb-469f-a165-70867728950e" in str(kept.error)
