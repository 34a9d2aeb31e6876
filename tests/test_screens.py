from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest

from agent.display.screens import (
    CODE_INSTRUCTION,
    Screen,
    build_screen,
    code_groups,
    short_url,
)
from agent.state import Phase, Snapshot

NOW_MONO = 10_000.0
# 2027-01-15 12:00:00 UTC
NOW_WALL = datetime(2027, 1, 15, 12, 0, tzinfo=UTC).timestamp()
PLUS_TWO = timezone(timedelta(hours=2))

URI = "https://auth.example.com/device"
URI_COMPLETE = "https://auth.example.com/device?code=123456789"


def snapshot(phase: Phase, **fields: object) -> Snapshot:
    return Snapshot(phase=phase, device_name="Kitchen display", **fields)  # type: ignore[arg-type]


def awaiting(**fields: object) -> Snapshot:
    values: dict[str, object] = {
        "user_code": "123456789",
        "verification_uri": URI,
        "verification_uri_complete": URI_COMPLETE,
        "code_deadline": NOW_MONO + 60,
        "code_expires_at": NOW_WALL + 60,
    }
    values.update(fields)
    return snapshot(Phase.AWAITING_USER, **values)


def build(snap: Snapshot, **kwargs: object) -> Screen:
    args: dict[str, object] = {"now_mono": NOW_MONO, "now_wall": NOW_WALL, "tz": UTC}
    args.update(kwargs)
    return build_screen(snap, **args)  # type: ignore[arg-type]


def text_of(screen: Screen) -> str:
    return "\n".join([screen.title, *screen.lines])


EXPECTED = {
    Phase.STARTING: ("starting", "Starting"),
    Phase.NO_NETWORK: ("no_network", "No network"),
    Phase.AWAITING_USER: ("code", "Sign in"),
    Phase.CODE_EXPIRED: ("code_expired", "Code expired"),
    Phase.NEEDS_BUTTON: ("needs_button", "Sign in"),
    Phase.THROTTLED: ("throttled", "Provider busy"),
    Phase.DENIED: ("denied", "Access denied"),
    Phase.SIGNED_IN: ("signed_in", "Signed in"),
    Phase.REFRESH_FAILING: ("refresh_failing", "Refresh failing"),
    Phase.CONFIG_ERROR: ("config_error", "Config error"),
    Phase.STOPPING: ("stopping", "Stopping"),
}


def test_every_phase_is_covered() -> None:
    assert set(EXPECTED) == set(Phase)


@pytest.mark.parametrize("phase", list(Phase))
def test_each_phase_has_its_kind_and_title(phase: Phase) -> None:
    # Every field a snapshot can carry is filled, as a stale snapshot might be: only the
    # code screen may show the code, and only while it is the code to enter.
    snap = awaiting(user="alice", token_expires_at=NOW_WALL + 3600,
                    next_code_at=NOW_WALL + 600, last_error="boom")
    screen = build(dataclasses.replace(snap, phase=phase), code_lifetime=60)
    kind, title = EXPECTED[phase]
    assert (screen.kind, screen.title) == (kind, title)
    assert screen.device_name == "Kitchen display"
    assert len(screen.title) <= 16  # a 128 px panel at a 6 px font, with a margin
    if phase is Phase.AWAITING_USER:
        return
    assert screen.user_code is None
    assert screen.user_code_display is None
    assert screen.url is None
    assert screen.qr_data is None
    assert screen.seconds_left is None
    assert screen.progress is None
    for leaked in ("123456789", "123 456 789", "auth.example.com"):
        assert leaked not in text_of(screen)


def test_starting_and_stopping() -> None:
    assert build(snapshot(Phase.STARTING)).lines == ("Please wait",)
    assert build(snapshot(Phase.STOPPING)).lines == ()


def test_no_network_says_it_retries_and_why() -> None:
    screen = build(snapshot(Phase.NO_NETWORK, last_error="connection refused"))
    assert screen.lines == ("Retrying...", "connection refused")
    assert build(snapshot(Phase.NO_NETWORK)).lines == ("Retrying...",)


def test_code_screen_shows_code_url_qr_and_countdown() -> None:
    screen = build(awaiting(), code_lifetime=60)
    assert screen.kind == "code"
    assert screen.user_code == "123456789"
    assert screen.user_code_display == "123456789"
    assert screen.user_code_groups == ("123", "456", "789")
    assert screen.url == "auth.example.com/device"
    assert screen.qr_data == URI_COMPLETE
    assert screen.seconds_left == 60
    assert screen.progress == 1.0
    assert screen.device_name == "Kitchen display"
    assert screen.lines[0] == CODE_INSTRUCTION
    assert "Type the 9 digits" in screen.lines
    assert "or scan the QR code" in screen.lines


def test_a_code_is_shown_exactly_as_issued_and_grouped_only_visually() -> None:
    # django-oauth-toolkit: 8 characters of 0-9 and A-V, compared exactly; a dash shown
    # between the groups was typed and refused ("Incorrect user code").
    screen = build(awaiting(user_code="0V1LA9KQ"))
    assert screen.user_code_display == "0V1LA9KQ"
    assert screen.user_code_groups == ("0V1L", "A9KQ")
    assert "Type the 8 letters and digits" in screen.lines
    assert build(awaiting(user_code="WDJBMJHT")).lines[1] == "Type the 8 letters"


def test_qr_falls_back_to_verification_uri() -> None:
    screen = build(awaiting(verification_uri_complete=None))
    assert screen.qr_data == URI
    # The text URL and the code are there all the same (RFC 8628 §3.3.1).
    assert screen.url == "auth.example.com/device"
    assert screen.user_code_display == "123456789"


@pytest.mark.parametrize(
    ("elapsed", "seconds_left", "progress"),
    [
        (0.0, 60, 1.0),
        (0.5, 60, 59.5 / 60),
        (30.0, 30, 0.5),
        (59.2, 1, 0.8 / 60),
        (60.0, 0, 0.0),
        (90.0, 0, 0.0),
    ],
)
def test_countdown_runs_on_the_monotonic_deadline(
        elapsed: float, seconds_left: int, progress: float) -> None:
    screen = build(awaiting(), now_mono=NOW_MONO + elapsed, code_lifetime=60)
    assert screen.seconds_left == seconds_left
    assert screen.progress == pytest.approx(progress)


def test_countdown_ignores_a_wall_clock_jump() -> None:
    # NTP sets the clock an hour ahead after boot; the code's deadline is monotonic.
    screen = build(awaiting(), now_mono=NOW_MONO + 10, now_wall=NOW_WALL + 3600)
    assert screen.seconds_left == 50


def test_countdown_falls_back_to_wall_expiry_without_a_deadline() -> None:
    screen = build(awaiting(code_deadline=None), now_wall=NOW_WALL + 15)
    assert screen.seconds_left == 45


def test_progress_needs_the_code_lifetime() -> None:
    assert build(awaiting()).progress is None
    assert build(awaiting(), code_lifetime=600).progress == pytest.approx(0.1)


def test_code_expired_says_when_the_next_code_comes_in_local_time() -> None:
    screen = build(snapshot(Phase.CODE_EXPIRED, next_code_at=NOW_WALL + 34 * 60), tz=PLUS_TWO)
    assert screen.lines == ("Next code at 14:34",)
    screen = build(snapshot(Phase.CODE_EXPIRED, next_code_at=NOW_WALL + 34 * 60), tz=UTC)
    assert screen.lines == ("Next code at 12:34",)


def test_code_expired_without_a_time_asks_for_the_button() -> None:
    screen = build(snapshot(Phase.CODE_EXPIRED))
    assert screen.lines == ("Press the button or call login",)


def test_throttled_says_when() -> None:
    screen = build(snapshot(Phase.THROTTLED, next_code_at=NOW_WALL + 3600), tz=UTC)
    assert screen.lines[0] == "Next code at 13:00"


def test_denied_shows_a_reason_beyond_the_title() -> None:
    plain = build(snapshot(Phase.DENIED, last_error="access denied",
                           next_code_at=NOW_WALL + 60))
    assert plain.lines == ("Next code at 12:01",)
    reason = build(snapshot(Phase.DENIED, last_error="user clicked Deny"))
    assert "user clicked Deny" in reason.lines


def test_signed_in_names_the_user_and_the_expiry() -> None:
    screen = build(snapshot(Phase.SIGNED_IN, user="alice",
                            token_expires_at=NOW_WALL + 5 * 3600 + 7 * 60), tz=PLUS_TWO)
    assert screen.lines == ("as alice", "Valid until 19:07")
    assert build(snapshot(Phase.SIGNED_IN)).lines == ()


@pytest.mark.parametrize(
    ("left", "text"),
    [(25 * 60 + 59, "Still valid for 25 min"), (30, "Still valid for under 1 min"),
     (-5, "Token expired")],
)
def test_refresh_failing_says_how_long_the_token_lives(left: float, text: str) -> None:
    screen = build(snapshot(Phase.REFRESH_FAILING, token_expires_at=NOW_WALL + left,
                            last_error="timeout"))
    assert screen.lines == (text, "timeout")


def test_config_error_shows_the_error() -> None:
    screen = build(snapshot(Phase.CONFIG_ERROR, last_error="invalid_client",
                            next_code_at=NOW_WALL + 300), tz=UTC)
    assert screen.lines == ("invalid_client", "Retry at 12:05")


def test_local_time_is_the_default_zone() -> None:
    when = NOW_WALL + 4321
    screen = build(snapshot(Phase.CODE_EXPIRED, next_code_at=when), tz=None)
    assert screen.lines == (f"Next code at {datetime.fromtimestamp(when).strftime('%H:%M')}",)


@pytest.mark.parametrize(
    ("code", "groups"),
    [
        ("123456789", ("123", "456", "789")),
        ("004815162", ("004", "815", "162")),
        ("WDJBMJHT", ("WDJB", "MJHT")),
        ("wdjb2mjh", ("wdjb", "2mjh")),
        ("12345678", ("1234", "5678")),
        ("1234567890", ("1234567890",)),
        ("WDJB-MJHT", ("WDJB-", "MJHT")),  # as issued: its own dash is part of it
        ("ABCDEFGHJ", ("ABCDEFGHJ",)),
        ("abc", ("abc",)),
        ("１２３４５６７８９", ("１２３４５６７８９",)),
    ],
)
def test_code_groups_keep_every_character_and_add_none(code: str,
                                                        groups: tuple[str, ...]) -> None:
    assert code_groups(code) == groups
    assert "".join(code_groups(code)) == code


@pytest.mark.parametrize(
    ("uri", "short"),
    [
        ("https://auth.example.com/device", "auth.example.com/device"),
        ("HTTPS://auth.example.com/device", "auth.example.com/device"),
        ("https://auth.example.com/", "auth.example.com"),
        ("https://auth.example.com", "auth.example.com"),
        ("https://auth.example.com:8443/if/flow/device/", "auth.example.com:8443/if/flow/device/"),
        ("http://127.0.0.1:9000/device", "http://127.0.0.1:9000/device"),
    ],
)
def test_short_url(uri: str, short: str) -> None:
    assert short_url(uri) == short


def test_code_screen_url_is_shortened() -> None:
    screen = build(awaiting(verification_uri="https://login.example.org/"))
    assert screen.url == "login.example.org"
