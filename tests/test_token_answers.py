"""A successful token answer (redemption or refresh) is never thrown away because one
field is odd.

By the time we read a 200 answer the provider has already redeemed the device code or
rotated the refresh token: discarding the answer loses the sign-in for good. Only an
answer without a usable access token is refused; every other odd field gets a safe
reading and a note. Socket-free and synchronous: each test builds the answer bytes and
hands them to the parsers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from agent.errors import MalformedResponse
from agent.oauth import (
    Approved,
    Client,
    CodeIssued,
    DeviceAuthorization,
    DevicePoll,
    HttpResponse,
    Refreshed,
    ServerTrouble,
    TokenSet,
    receive_device_authorization,
    receive_refresh,
)
from agent.oauth.wire import (
    MAX_SECONDS,
    ODD_LIFETIME,
    parse_json_object,
    parse_token_answer,
    parse_token_response,
    retry_after,
    seconds_field,
)

CLIENT = Client(client_id="device-agent")
NOW_WALL = 1_000.0
REQUESTED = "openid profile offline_access"
PREVIOUS = TokenSet(access_token="at-0", token_type="Bearer", issued_at=0.0,
                    expires_at=3600.0, refresh_token="rt-0", id_token="id-0",
                    scope="openid offline_access")
# Every token value a test answer carries; none may ever show up in a note.
SECRETS = ("at-0", "rt-0", "id-0", "at-1", "rt-1", "id-1", "leaked-secret")
FULL = {"access_token": "at-1", "token_type": "Bearer", "expires_in": 3600,
        "refresh_token": "rt-1", "id_token": "id-1", "scope": "openid"}

Outcome = tuple[TokenSet, tuple[str, ...]]


def ok(body: Any) -> HttpResponse:
    return HttpResponse(status=200, body=json.dumps(body).encode())


def ok_raw(data: bytes) -> HttpResponse:
    return HttpResponse(status=200, body=data)


def with_field(key: str, value: Any) -> dict[str, Any]:
    return {**FULL, key: value}


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in FULL.items() if k != key}


def authorization() -> DeviceAuthorization:
    return DeviceAuthorization(device_code="dc", user_code="u",
                               verification_uri="https://auth.example.com/device",
                               verification_uri_complete=None, expires_in=600.0,
                               interval=5.0, issued_at=0.0)


def poll_event(response: HttpResponse, *, scope: str | None = REQUESTED) -> object:
    poll = DevicePoll(authorization(), client=CLIENT,
                      token_endpoint="https://auth.example.com/application/o/token/",
                      scope=scope)
    return poll.receive(response, now=5.0, now_wall=NOW_WALL)


def redeem(response: HttpResponse) -> Outcome:
    event = poll_event(response)
    assert isinstance(event, Approved), event
    return event.tokens, event.notes


def refresh(response: HttpResponse) -> Outcome:
    event = receive_refresh(response, previous=PREVIOUS, now_wall=NOW_WALL)
    assert isinstance(event, Refreshed), event
    return event.tokens, event.notes


def refused(response: HttpResponse, grant: str) -> ServerTrouble:
    event = (poll_event(response) if grant == "redemption"
             else receive_refresh(response, previous=PREVIOUS, now_wall=NOW_WALL))
    assert isinstance(event, ServerTrouble), event
    return event


GRANTS: dict[str, Callable[[HttpResponse], Outcome]] = {
    "redemption": redeem, "refresh": refresh}


@pytest.fixture(params=sorted(GRANTS))
def grant(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def receive(grant: str) -> Callable[[HttpResponse], Outcome]:
    return GRANTS[grant]


def assert_no_secret(notes: tuple[str, ...]) -> None:
    for note in notes:
        for secret in SECRETS:
            assert secret not in note, note


def only_note_about(notes: tuple[str, ...], field: str) -> str:
    assert len(notes) == 1, notes
    assert field in notes[0]
    assert_no_secret(notes)
    return notes[0]


# Values that are not a usable number of seconds, in every JSON shape.
ODD_SECONDS: list[Any] = [
    -1, -0.5, MAX_SECONDS + 1, 1e300, 10**400, True, False, "soon", "", " ", "-5", "+5",
    "1e3", "3600s", "0x10", "3600.", ".5", "nan", "inf", "Infinity", "²", "٣", "３６００",
    "9" * 5000, "1" * 13, "1." + "0" * 10, [3600], {"seconds": 3600},
]
# The same, but only writable as raw JSON (json.dumps would refuse or rewrite them).
ODD_SECONDS_RAW = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"9" * 5000]
USABLE_SECONDS: list[tuple[Any, float]] = [
    (3600, 3600.0), (3600.0, 3600.0), (1.5, 1.5), ("3600", 3600.0), ("3600.0", 3600.0),
    (" 3600 ", 3600.0), ("\t60\n", 60.0), ("0.25", 0.25), (0, 0.0), ("0", 0.0),
    (MAX_SECONDS, float(MAX_SECONDS)), (str(MAX_SECONDS), float(MAX_SECONDS)),
]


def raw_expires_in(literal: bytes) -> bytes:
    return (b'{"access_token": "at-1", "token_type": "Bearer", "refresh_token": "rt-1",'
            b' "expires_in": ' + literal + b"}")


class TestAccessToken:
    """The one hard failure: without an access token there is nothing to use."""

    @pytest.mark.parametrize("body", [
        without("access_token"), with_field("access_token", ""),
        with_field("access_token", None), with_field("access_token", 5),
        with_field("access_token", ["at-1"]), with_field("access_token", {"v": "at-1"}),
    ])
    def test_unusable_access_token_is_trouble(self, grant: str,
                                              body: dict[str, Any]) -> None:
        event = refused(ok(body), grant)
        assert "access_token" in event.reason
        assert not any(secret in event.reason for secret in SECRETS)

    def test_parser_raises_our_exception(self) -> None:
        with pytest.raises(MalformedResponse, match="access_token"):
            parse_token_answer(ok(without("access_token")), now_wall=0.0)

    @pytest.mark.parametrize("data", [b"[]", b"5", b"null", b'"at-1"', b"<html>",
                                      b"\xff\xfe", b"[" * 200_000, b'{"a":' * 200_000])
    def test_unreadable_body_is_trouble(self, grant: str, data: bytes) -> None:
        refused(ok_raw(data), grant)


class TestTokenType:
    @pytest.mark.parametrize("body", [
        without("token_type"), with_field("token_type", None), with_field("token_type", ""),
        with_field("token_type", 5), with_field("token_type", ["Bearer"]),
        with_field("token_type", True),
    ])
    def test_missing_or_odd_means_bearer(self, receive: Callable[[HttpResponse], Outcome],
                                         body: dict[str, Any]) -> None:
        tokens, notes = receive(ok(body))
        assert tokens.token_type == "Bearer"
        assert tokens.access_token == "at-1" and tokens.refresh_token == "rt-1"
        assert "Bearer" in only_note_about(notes, "token_type")

    @pytest.mark.parametrize(("sent", "kept"), [
        ("Bearer", "Bearer"), ("bearer", "Bearer"), ("BEARER", "Bearer"), ("DPoP", "DPoP"),
        ("mac", "mac"),
    ])
    def test_strings_are_kept_bearer_normalised(
            self, receive: Callable[[HttpResponse], Outcome], sent: str, kept: str) -> None:
        tokens, notes = receive(ok(with_field("token_type", sent)))
        assert tokens.token_type == kept
        assert notes == ()


class TestExpiresIn:
    @pytest.mark.parametrize(("sent", "seconds"), USABLE_SECONDS)
    def test_usable_numbers(self, receive: Callable[[HttpResponse], Outcome], sent: Any,
                            seconds: float) -> None:
        tokens, notes = receive(ok(with_field("expires_in", sent)))
        assert tokens.expires_at == NOW_WALL + seconds
        assert notes == ()

    @pytest.mark.parametrize("body", [without("expires_in"), with_field("expires_in", None)])
    def test_absent_means_unknown_lifetime(self, receive: Callable[[HttpResponse], Outcome],
                                           body: dict[str, Any]) -> None:
        tokens, notes = receive(ok(body))
        assert tokens.expires_at is None
        assert notes == ()

    @pytest.mark.parametrize("sent", ODD_SECONDS)
    def test_odd_value_means_refresh_soon(self, receive: Callable[[HttpResponse], Outcome],
                                          sent: Any) -> None:
        tokens, notes = receive(ok(with_field("expires_in", sent)))
        assert tokens.expires_at == NOW_WALL + ODD_LIFETIME
        assert tokens.refresh_token == "rt-1"
        assert "300 s" in only_note_about(notes, "expires_in")

    @pytest.mark.parametrize("literal", ODD_SECONDS_RAW)
    def test_odd_json_literal_means_refresh_soon(
            self, receive: Callable[[HttpResponse], Outcome], literal: bytes) -> None:
        tokens, notes = receive(ok_raw(raw_expires_in(literal)))
        assert tokens.expires_at == NOW_WALL + ODD_LIFETIME
        assert tokens.refresh_token == "rt-1"
        only_note_about(notes, "expires_in")

    def test_the_default_is_short(self) -> None:
        assert ODD_LIFETIME == 300.0


class TestScope:
    def test_string_as_is(self, receive: Callable[[HttpResponse], Outcome]) -> None:
        tokens, notes = receive(ok(with_field("scope", "openid  email")))
        assert tokens.scope == "openid  email"
        assert notes == ()

    def test_list_of_strings_is_joined(self, receive: Callable[[HttpResponse], Outcome],
                                       ) -> None:
        tokens, notes = receive(ok(with_field("scope", ["openid", "email"])))
        assert tokens.scope == "openid email"
        only_note_about(notes, "scope")

    @pytest.mark.parametrize("body", [without("scope"), with_field("scope", None),
                                      with_field("scope", "")])
    def test_absent_on_redemption_is_the_requested_scope(self, body: dict[str, Any]) -> None:
        # RFC 6749 §5.1: OPTIONAL "if identical to the scope requested by the client".
        tokens, notes = redeem(ok(body))
        assert tokens.scope == REQUESTED
        assert notes == ()

    def test_absent_on_redemption_without_a_requested_scope(self) -> None:
        event = poll_event(ok(without("scope")), scope=None)
        assert isinstance(event, Approved) and event.tokens.scope is None

    @pytest.mark.parametrize("body", [without("scope"), with_field("scope", None),
                                      with_field("scope", "")])
    def test_absent_on_refresh_is_the_previous_scope(self, body: dict[str, Any]) -> None:
        tokens, notes = refresh(ok(body))
        assert tokens.scope == PREVIOUS.scope
        assert notes == ()

    @pytest.mark.parametrize("sent", [5, True, {"openid": True}, ["openid", 5], [["openid"]],
                                      {"leaked-secret": 1}])
    def test_other_types_are_absent_with_a_note(
            self, grant: str, receive: Callable[[HttpResponse], Outcome], sent: Any) -> None:
        tokens, notes = receive(ok(with_field("scope", sent)))
        assert tokens.scope == (REQUESTED if grant == "redemption" else PREVIOUS.scope)
        assert tokens.refresh_token == "rt-1"
        only_note_about(notes, "scope")


class TestRefreshToken:
    def test_new_one_is_kept(self, receive: Callable[[HttpResponse], Outcome]) -> None:
        tokens, notes = receive(ok(FULL))
        assert tokens.refresh_token == "rt-1"
        assert notes == ()

    @pytest.mark.parametrize("body", [without("refresh_token"),
                                      with_field("refresh_token", None),
                                      with_field("refresh_token", "")])
    def test_absent(self, grant: str, receive: Callable[[HttpResponse], Outcome],
                    body: dict[str, Any]) -> None:
        # RFC 6749 §6: no new refresh token on refresh means the old one stays valid.
        tokens, notes = receive(ok(body))
        assert tokens.refresh_token == (None if grant == "redemption" else "rt-0")
        assert notes == ()

    @pytest.mark.parametrize("sent", [5, True, ["rt-1"], {"value": "leaked-secret"}])
    def test_non_string_is_absent_with_a_note(
            self, grant: str, receive: Callable[[HttpResponse], Outcome], sent: Any) -> None:
        tokens, notes = receive(ok(with_field("refresh_token", sent)))
        assert tokens.access_token == "at-1"
        assert tokens.refresh_token == (None if grant == "redemption" else "rt-0")
        only_note_about(notes, "refresh_token")


class TestIdToken:
    def test_kept(self, receive: Callable[[HttpResponse], Outcome]) -> None:
        assert receive(ok(FULL))[0].id_token == "id-1"

    @pytest.mark.parametrize("body", [without("id_token"), with_field("id_token", None),
                                      with_field("id_token", "")])
    def test_absent(self, grant: str, receive: Callable[[HttpResponse], Outcome],
                    body: dict[str, Any]) -> None:
        tokens, notes = receive(ok(body))
        assert tokens.id_token == (None if grant == "redemption" else "id-0")
        assert notes == ()

    @pytest.mark.parametrize("sent", [5, False, ["id-1"], {"jwt": "leaked-secret"}])
    def test_non_string_is_absent_with_a_note(
            self, grant: str, receive: Callable[[HttpResponse], Outcome], sent: Any) -> None:
        tokens, notes = receive(ok(with_field("id_token", sent)))
        assert tokens.id_token == (None if grant == "redemption" else "id-0")
        assert tokens.refresh_token == "rt-1"
        only_note_about(notes, "id_token")


class TestEverythingOddAtOnce:
    BODY: ClassVar[dict[str, Any]] = {
        "access_token": "at-1", "refresh_token": "rt-1", "expires_in": "3600 s",
        "scope": {"leaked-secret": True}, "id_token": 7}

    def test_rotation_survives(self, grant: str,
                               receive: Callable[[HttpResponse], Outcome]) -> None:
        tokens, notes = receive(ok(self.BODY))
        assert (tokens.access_token, tokens.refresh_token) == ("at-1", "rt-1")
        assert tokens.token_type == "Bearer"
        assert tokens.expires_at == NOW_WALL + ODD_LIFETIME
        assert tokens.issued_at == NOW_WALL
        assert tokens.id_token == (None if grant == "redemption" else "id-0")
        assert tokens.scope == (REQUESTED if grant == "redemption" else PREVIOUS.scope)
        assert len(notes) == 4
        for field in ("token_type", "expires_in", "scope", "id_token"):
            assert sum(field in note for note in notes) == 1, (field, notes)
        assert_no_secret(notes)

    def test_events_do_not_show_tokens(self) -> None:
        for event in (poll_event(ok(self.BODY)),
                      receive_refresh(ok(self.BODY), previous=PREVIOUS, now_wall=NOW_WALL)):
            assert isinstance(event, Approved | Refreshed)
            assert not any(secret in repr(event) for secret in SECRETS)

    def test_notes_default_to_none(self) -> None:
        tokens = parse_token_response(ok(FULL), now_wall=NOW_WALL)
        assert Approved(tokens=tokens).notes == ()
        assert Refreshed(tokens=tokens).notes == ()

    def test_response_and_answer_agree(self) -> None:
        for previous in (None, PREVIOUS):
            tokens, notes = parse_token_answer(ok(self.BODY), now_wall=NOW_WALL,
                                               previous=previous, requested_scope=REQUESTED)
            assert parse_token_response(ok(self.BODY), now_wall=NOW_WALL, previous=previous,
                                        requested_scope=REQUESTED) == tokens
            assert len(notes) == 4


# Every JSON shape an odd provider could put in any field.
ANY_VALUE: list[Any] = [None, True, False, 0, -1, 1.5, 10**400, "", " ", "²", "x" * 5000,
                        "9" * 5000, [], ["a", 1], {}, {"k": [1, {"k": None}]}]


@pytest.mark.parametrize("field", ["token_type", "expires_in", "refresh_token", "id_token",
                                   "scope"])
def test_no_single_field_throws_an_answer_away(
        receive: Callable[[HttpResponse], Outcome], field: str) -> None:
    for value in ANY_VALUE:
        tokens, notes = receive(ok(with_field(field, value)))
        assert tokens.access_token == "at-1", value
        assert_no_secret(notes)
        if field != "refresh_token":
            assert tokens.refresh_token == "rt-1"


class TestParseJsonObject:
    @pytest.mark.parametrize("data", [b"[" * 200_000, b'{"a":' * 200_000,
                                      b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"])
    def test_deep_nesting_is_malformed(self, data: bytes) -> None:
        with pytest.raises(MalformedResponse):
            parse_json_object(ok_raw(data))

    @pytest.mark.parametrize("data", [b"[]", b"5", b"null", b'"x"', b"true", b"", b"\xff"])
    def test_non_objects_are_malformed(self, data: bytes) -> None:
        with pytest.raises(MalformedResponse):
            parse_json_object(ok_raw(data))

    def test_an_integer_too_long_to_convert_does_not_spoil_the_object(self) -> None:
        body = parse_json_object(ok_raw(b'{"n": ' + b"7" * 5000 + b', "m": -' + b"7" * 5000
                                        + b', "s": "ok"}'))
        assert body["n"] == math.inf and body["m"] == -math.inf and body["s"] == "ok"


class TestSecondsField:
    """Device authorization `expires_in` and `interval`: unusable values stay an error
    there (nothing has been spent yet), but always our own."""

    @pytest.mark.parametrize(("sent", "seconds"), USABLE_SECONDS)
    def test_usable(self, sent: Any, seconds: float) -> None:
        assert seconds_field({"n": sent}, "n") == seconds

    def test_absent(self) -> None:
        assert seconds_field({}, "n") is None
        assert seconds_field({"n": None}, "n") is None

    @pytest.mark.parametrize("sent", [*ODD_SECONDS, math.inf, -math.inf, math.nan])
    def test_odd_is_malformed_never_a_foreign_exception(self, sent: Any) -> None:
        with pytest.raises(MalformedResponse, match="n is not"):
            seconds_field({"n": sent}, "n")

    @pytest.mark.parametrize("key", ["expires_in", "interval"])
    @pytest.mark.parametrize("sent", ["²", "9" * 5000, "1" * 13])
    def test_device_answer_with_odd_digits_is_trouble(self, key: str, sent: str) -> None:
        body = {"device_code": "d", "user_code": "u", "verification_uri": "https://x",
                "expires_in": 600, key: sent}
        event = receive_device_authorization(ok(body), now=0)
        assert isinstance(event, ServerTrouble) and key in event.reason

    def test_device_answer_with_decimal_string(self) -> None:
        body = {"device_code": "d", "user_code": "u", "verification_uri": "https://x",
                "expires_in": "600.0", "interval": " 7 "}
        event = receive_device_authorization(ok(body), now=0)
        assert isinstance(event, CodeIssued)
        assert (event.authorization.expires_in, event.authorization.interval) == (600.0, 7.0)


def with_retry_after(value: str) -> HttpResponse:
    return HttpResponse(status=429, body=b"", headers={"Retry-After": value})


class TestRetryAfter:
    @pytest.mark.parametrize(("value", "seconds"), [("120", 120.0), (" 120 ", 120.0),
                                                    ("0", 0.0), ("007", 7.0)])
    def test_delta_seconds(self, value: str, seconds: float) -> None:
        assert retry_after(with_retry_after(value)) == seconds

    def test_http_date(self) -> None:
        assert retry_after(with_retry_after("Thu, 01 Jan 2037 00:02:00 GMT"),
                           now_wall=2114380800.0) == 120.0
        assert retry_after(with_retry_after("Thu, 01 Jan 2037 00:02:00 GMT"),
                           now_wall=2114380800.0 + 500) == 0.0
        assert retry_after(with_retry_after("Thu, 01 Jan 2037 00:02:00 GMT")) is None

    def test_absent(self) -> None:
        assert retry_after(HttpResponse(status=429, body=b"")) is None

    @pytest.mark.parametrize("value", ["²", "٣", "１２０", "9" * 5000, "1" * 13, "-5", "1.5",
                                       "+5", "", "soon", "Thu, 32 Foo 2037 99:99:99 GMT",
                                       "1 2 3 4 5", "Thu, 01 Jan 99999 00:00:00 GMT",
                                       "\x00", "a, b c d e"])
    def test_unusable_is_no_hint_never_an_exception(self, value: str) -> None:
        assert retry_after(with_retry_after(value), now_wall=0.0) is None
        assert retry_after(with_retry_after(value)) is None

    def test_beyond_the_ceiling_is_no_hint(self) -> None:
        assert retry_after(with_retry_after(str(MAX_SECONDS + 1))) is None
        assert retry_after(with_retry_after(str(MAX_SECONDS))) == MAX_SECONDS
