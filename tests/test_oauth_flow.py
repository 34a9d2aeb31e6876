"""The sans-IO device flow: every rule of RFC 8628 §3.1–§3.5, without sockets."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlencode

import pytest

from agent.errors import AccessDenied, InvalidClient, InvalidScope, UnknownOAuthError
from agent.oauth import (
    Approved,
    Client,
    CodeIssued,
    Denied,
    DeviceAuthorization,
    DevicePoll,
    Expired,
    HttpResponse,
    Pending,
    Rejected,
    ServerTrouble,
    SlowDown,
    Throttled,
    device_authorization_request,
    receive_device_authorization,
)
from agent.oauth.flow import (
    DEFAULT_INTERVAL,
    DEVICE_CODE_GRANT,
    MAX_TROUBLE_INTERVAL,
    POLL_RULES,
    PollAction,
)

CLIENT = Client(client_id="device-agent")
CONFIDENTIAL = Client(client_id="kiosk", client_secret="s3cret-value")
# authentik's device codes: 128 characters including all of string.punctuation.
PUNCTUATED = "a+b&c=d%e#f?g/h\\i\"j'k" + "x" * 106


def answer(status: int, body: Any = None, *, raw: bytes | None = None,
           headers: dict[str, str] | None = None) -> HttpResponse:
    data = raw if raw is not None else json.dumps(body).encode()
    return HttpResponse(status=status, body=data, headers=headers or {})


def error(code: str, status: int = 400, description: str = "desc") -> HttpResponse:
    return answer(status, {"error": code, "error_description": description,
                           "request_id": "abc"})


def code_answer(**overrides: Any) -> HttpResponse:
    body = {
        "device_code": PUNCTUATED,
        "user_code": "004815162",
        "verification_uri": "https://auth.example.com/device",
        "verification_uri_complete": "https://auth.example.com/device?code=004815162",
        "expires_in": 60,
        "interval": 5,
    }
    body.update(overrides)
    return answer(200, {k: v for k, v in body.items() if v is not None})


def issued(now: float = 100.0, **overrides: Any) -> DeviceAuthorization:
    event = receive_device_authorization(code_answer(**overrides), now=now)
    assert isinstance(event, CodeIssued)
    return event.authorization


def poller(now: float = 100.0, **overrides: Any) -> DevicePoll:
    return DevicePoll(issued(now, **overrides), client=CLIENT,
                      token_endpoint="https://auth.example.com/application/o/token/")


TOKENS = {"access_token": "at-1", "token_type": "bearer", "expires_in": 3600,
          "refresh_token": "rt-1", "id_token": "a.b.c", "scope": "openid offline_access"}


class TestDeviceAuthorizationRequest:
    def test_form_post_with_client_id_and_scope(self) -> None:
        request = device_authorization_request(
            CLIENT, "https://auth.example.com/application/o/device/", ["openid", "offline_access"])
        assert request.method == "POST"
        assert request.url == "https://auth.example.com/application/o/device/"
        assert dict(request.form) == {"client_id": "device-agent",
                                      "scope": "openid offline_access"}

    def test_no_scope_field_when_no_scopes(self) -> None:
        request = device_authorization_request(CLIENT, "https://x/device", [])
        assert "scope" not in request.form

    def test_confidential_client_sends_secret_but_repr_hides_it(self) -> None:
        request = device_authorization_request(CONFIDENTIAL, "https://x/device", ["openid"])
        assert request.form["client_secret"] == "s3cret-value"
        assert "s3cret-value" not in repr(request)
        assert "s3cret-value" not in repr(CONFIDENTIAL)


class TestDeviceAuthorizationAnswer:
    def test_all_fields(self) -> None:
        auth = issued(now=50.0)
        assert auth.user_code == "004815162"  # leading zeros kept: codes are strings
        assert auth.device_code == PUNCTUATED
        assert auth.verification_uri_complete.endswith("code=004815162")  # type: ignore[union-attr]
        assert auth.expires_in == 60
        assert auth.interval == 5
        assert auth.deadline == 110.0
        assert PUNCTUATED not in repr(auth)

    def test_interval_absent_means_five_seconds(self) -> None:
        # RFC 8628 §3.2: "If no value is provided, clients MUST use 5 as the default."
        assert issued(interval=None).interval == DEFAULT_INTERVAL == 5

    def test_interval_zero_or_garbage_falls_back(self) -> None:
        assert issued(interval=0).interval == 5

    def test_verification_uri_complete_is_optional(self) -> None:
        assert issued(verification_uri_complete=None).verification_uri_complete is None

    def test_verification_url_alias(self) -> None:
        event = receive_device_authorization(answer(200, {
            "device_code": "d", "user_code": "u", "verification_url": "https://g/device",
            "expires_in": 1800}), now=0)
        assert isinstance(event, CodeIssued)
        assert event.authorization.verification_uri == "https://g/device"

    def test_numbers_as_strings_are_accepted(self) -> None:
        assert issued(expires_in="600", interval="7").expires_in == 600

    @pytest.mark.parametrize("missing", ["device_code", "user_code", "verification_uri",
                                         "expires_in"])
    def test_missing_required_field_is_trouble_not_a_crash(self, missing: str) -> None:
        event = receive_device_authorization(code_answer(**{missing: None}), now=0)
        assert isinstance(event, ServerTrouble)
        assert missing in event.reason

    def test_not_json_is_trouble(self) -> None:
        event = receive_device_authorization(answer(200, raw=b"<html>oops</html>"), now=0)
        assert isinstance(event, ServerTrouble)

    def test_json_array_is_trouble(self) -> None:
        assert isinstance(receive_device_authorization(answer(200, [1]), now=0), ServerTrouble)

    def test_authentik_throttle_429_slow_down(self) -> None:
        event = receive_device_authorization(error("slow_down", 429), now=0)
        assert event == Throttled(retry_after=None)

    def test_bare_429_with_retry_after(self) -> None:
        event = receive_device_authorization(
            answer(429, raw=b"", headers={"Retry-After": "120"}), now=0)
        assert event == Throttled(retry_after=120.0)

    def test_retry_after_as_http_date(self) -> None:
        event = receive_device_authorization(
            answer(429, raw=b"", headers={"retry-after": "Thu, 01 Jan 2037 00:02:00 GMT"}),
            now=0, now_wall=2114380800.0)
        assert event == Throttled(retry_after=120.0)

    def test_slow_down_with_400(self) -> None:
        assert isinstance(receive_device_authorization(error("slow_down"), now=0), Throttled)

    def test_invalid_client_is_rejected(self) -> None:
        event = receive_device_authorization(error("invalid_client"), now=0)
        assert isinstance(event, Rejected)
        assert isinstance(event.error, InvalidClient)
        assert event.error.description == "desc"

    def test_invalid_scope_is_rejected(self) -> None:
        event = receive_device_authorization(error("invalid_scope"), now=0)
        assert isinstance(event, Rejected) and isinstance(event.error, InvalidScope)

    def test_old_authentik_bare_400_is_rejected(self) -> None:
        event = receive_device_authorization(answer(400, raw=b""), now=0)
        assert isinstance(event, Rejected)
        assert isinstance(event.error, UnknownOAuthError)

    @pytest.mark.parametrize("status", [500, 502, 503])
    def test_server_errors_are_trouble(self, status: int) -> None:
        event = receive_device_authorization(
            answer(status, raw=b"bad gateway", headers={"Retry-After": "30"}), now=0)
        assert event == ServerTrouble(reason=f"HTTP {status}", retry_after=30.0)

    def test_temporarily_unavailable_is_trouble(self) -> None:
        event = receive_device_authorization(error("temporarily_unavailable"), now=0)
        assert isinstance(event, ServerTrouble)

    def test_odd_status_without_body_is_trouble(self) -> None:
        assert isinstance(receive_device_authorization(answer(418, raw=b""), now=0),
                          ServerTrouble)

    def test_long_description_is_cut(self) -> None:
        event = receive_device_authorization(error("invalid_client", description="x" * 5000),
                                             now=0)
        assert isinstance(event, Rejected)
        assert len(event.error.description or "") < 300


class TestPollRequest:
    def test_form_fields_and_punctuated_code_roundtrip(self) -> None:
        request = poller().request()
        assert dict(request.form) == {"grant_type": DEVICE_CODE_GRANT,
                                      "device_code": PUNCTUATED, "client_id": "device-agent"}
        # The transport form-encodes; the code must survive it unchanged.
        assert parse_qs(urlencode(dict(request.form)))["device_code"] == [PUNCTUATED]
        assert PUNCTUATED not in repr(request)

    def test_first_poll_waits_one_interval(self) -> None:
        poll = poller(now=100.0)
        assert poll.next_poll_at == 105.0


class TestPollAnswers:
    def test_pending_keeps_the_interval(self) -> None:
        poll = poller(now=100.0)
        event = poll.receive(error("authorization_pending"), now=105.0, now_wall=0)
        assert event == Pending(next_poll_at=110.0)
        assert poll.interval == 5

    def test_slow_down_adds_five_seconds_for_good(self) -> None:
        poll = poller(now=100.0, expires_in=600)
        first = poll.receive(error("slow_down"), now=105.0, now_wall=0)
        assert first == SlowDown(interval=10.0, next_poll_at=115.0)
        second = poll.receive(error("slow_down"), now=115.0, now_wall=0)
        assert second == SlowDown(interval=15.0, next_poll_at=130.0)
        # "for this and all subsequent requests": a pending answer keeps the new interval.
        assert poll.receive(error("authorization_pending"), now=130.0,
                            now_wall=0) == Pending(next_poll_at=145.0)

    def test_bare_429_from_token_endpoint_counts_as_slow_down(self) -> None:
        poll = poller(now=100.0, expires_in=600)
        event = poll.receive(answer(429, raw=b""), now=105.0, now_wall=0)
        assert isinstance(event, SlowDown) and event.interval == 10.0

    def test_slow_down_honours_a_longer_retry_after(self) -> None:
        poll = poller(now=100.0, expires_in=600)
        event = poll.receive(answer(400, {"error": "slow_down"}, headers={"Retry-After": "40"}),
                             now=105.0, now_wall=0)
        assert event == SlowDown(interval=10.0, next_poll_at=145.0)

    def test_access_denied(self) -> None:
        event = poller().receive(error("access_denied", description="nope"), now=105, now_wall=0)
        assert event == Denied(description="nope")

    def test_expired_token(self) -> None:
        assert poller().receive(error("expired_token"), now=105, now_wall=0) == Expired(
            by_provider=True)

    def test_invalid_grant_means_this_code_is_dead(self) -> None:
        # authentik main-2026-04 answers invalid_grant once a code expires.
        assert poller().receive(error("invalid_grant"), now=105, now_wall=0) == Expired(
            by_provider=True)

    def test_pending_after_our_deadline_is_expired(self) -> None:
        # authentik <= 2026.2 keeps answering authorization_pending after expiry.
        poll = poller(now=100.0)
        assert poll.receive(error("authorization_pending"), now=160.0,
                            now_wall=0) == Expired(by_provider=False)
        assert poll.expired(160.0) and not poll.expired(159.9)

    def test_slow_down_after_deadline_is_expired(self) -> None:
        assert poller(now=100.0).receive(error("slow_down"), now=170.0,
                                         now_wall=0) == Expired(by_provider=False)

    def test_approved(self) -> None:
        event = poller().receive(answer(200, TOKENS), now=105.0, now_wall=1_000.0)
        assert isinstance(event, Approved)
        tokens = event.tokens
        assert tokens.access_token == "at-1"
        assert tokens.token_type == "Bearer"
        assert tokens.expires_at == 4_600.0
        assert tokens.issued_at == 1_000.0
        assert tokens.refresh_token == "rt-1"
        assert "at-1" not in repr(tokens) and "rt-1" not in repr(tokens)

    def test_approved_without_expires_in(self) -> None:
        body = {k: v for k, v in TOKENS.items() if k != "expires_in"}
        event = poller().receive(answer(200, body), now=105.0, now_wall=1_000.0)
        assert isinstance(event, Approved) and event.tokens.expires_at is None

    # Only an answer without an access token is trouble: the code is redeemed by now.
    # Odd fields beside a usable token: tests/test_token_answers.py.
    @pytest.mark.parametrize("broken", [
        {"token_type": "Bearer"},
        {"access_token": "", "token_type": "Bearer"},
        {"access_token": 5, "token_type": "Bearer", "refresh_token": "rt-1"},
    ])
    def test_malformed_success_is_trouble(self, broken: dict[str, Any]) -> None:
        poll = poller(now=100.0)
        event = poll.receive(answer(200, broken), now=105.0, now_wall=0)
        assert isinstance(event, ServerTrouble)

    @pytest.mark.parametrize("code", ["server_error", "temporarily_unavailable"])
    def test_retryable_errors_double_the_interval(self, code: str) -> None:
        poll = poller(now=100.0, expires_in=600)
        event = poll.receive(error(code), now=105.0, now_wall=0)
        assert isinstance(event, ServerTrouble)
        assert poll.interval == 10.0
        assert poll.next_poll_at == 115.0

    def test_5xx_without_body_doubles_and_honours_retry_after(self) -> None:
        poll = poller(now=100.0, expires_in=600)
        event = poll.receive(answer(503, raw=b"<html>", headers={"Retry-After": "30"}),
                             now=105.0, now_wall=0)
        assert isinstance(event, ServerTrouble)
        assert poll.next_poll_at == 135.0

    def test_connection_failures_back_off_exponentially_with_a_cap(self) -> None:
        # RFC 8628 §3.5: on a connection timeout, reduce the polling frequency.
        poll = poller(now=100.0, expires_in=100_000)
        intervals = []
        now = 105.0
        for _ in range(6):
            poll.connection_failed("timeout", now=now)
            intervals.append(poll.interval)
            now = poll.next_poll_at
        assert intervals == [10, 20, 40, 60, 60, 60]
        assert MAX_TROUBLE_INTERVAL == 60

    def test_connection_failure_after_deadline_is_expired(self) -> None:
        assert poller(now=100.0).connection_failed("x", now=170.0) == Expired(by_provider=False)

    @pytest.mark.parametrize("code", ["invalid_client", "unauthorized_client", "invalid_request",
                                      "unsupported_grant_type", "invalid_scope"])
    def test_other_errors_stop(self, code: str) -> None:
        event = poller().receive(error(code), now=105.0, now_wall=0)
        assert isinstance(event, Rejected)
        assert event.error.code == code

    def test_400_without_error_code_is_trouble(self) -> None:
        assert isinstance(poller().receive(answer(400, raw=b"nope"), now=105.0, now_wall=0),
                          ServerTrouble)


def test_every_rule_cites_its_source() -> None:
    for error_class, rule in POLL_RULES.items():
        assert "RFC" in rule.rfc, error_class
    assert POLL_RULES[AccessDenied].action is PollAction.DENIED


def test_a_long_provider_interval_is_respected() -> None:
    # RFC 8628 §3.5: wait "at least" the interval, however long the provider says.
    assert poller(now=0.0, interval=90, expires_in=900).next_poll_at == 90.0


def test_trouble_never_undoes_a_slow_down() -> None:
    poll = poller(now=100.0, interval=58, expires_in=10_000)
    poll.receive(error("slow_down"), now=158.0, now_wall=0)
    assert poll.interval == 63
    poll.connection_failed("reset", now=221.0)
    assert poll.interval == 63  # the cap on doubling is not a cap on the provider's pace


@pytest.mark.parametrize("value", [1e999, 10**400, -5])
def test_absurd_numbers_are_a_broken_answer(value: float) -> None:
    body = json.dumps({"device_code": "d", "user_code": "u", "verification_uri": "https://x",
                       "expires_in": 60}).replace("60", str(value)).encode()
    if value == 1e999:
        body = body.replace(b"inf", b"1e999")
    event = receive_device_authorization(answer(200, raw=body), now=0)
    assert isinstance(event, ServerTrouble)
