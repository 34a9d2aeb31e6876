"""What each state looks like, as plain data: no I/O, no PIL, no terminal codes.

Every display (console, OLED layout, serial panels) renders the same `Screen`, so the
wording and the rules of RFC 8628 §3.3 live here once: the user code and the
verification URI are always shown as text, even when a QR code is drawn beside them
(§3.3.1), because the person may be asked to confirm the code (§5.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, tzinfo
from urllib.parse import urlsplit

from agent.state import Cause, Phase, Snapshot

__all__ = [
    "BLANK_SCREEN",
    "CODE_INSTRUCTION",
    "Screen",
    "build_screen",
    "code_groups",
    "short_url",
]

# The first line of every "code" screen. Text panels show it as is; richer displays
# spell it out with the URL and code themselves and can skip it by comparing to this.
CODE_INSTRUCTION = "Visit URL and enter code"


@dataclass(frozen=True, kw_only=True)
class Screen:
    """One screenful. `kind` names the layout; fields not used by a kind stay None.

    Only what a person standing at the device may see goes in here: the snapshot
    carries no token, and the device code (the polling secret) never reaches it.
    """

    kind: str
    title: str
    lines: tuple[str, ...]
    user_code: str | None = None
    # What a text display shows: exactly as issued. Pixel panels draw the groups apart.
    user_code_display: str | None = None
    user_code_groups: tuple[str, ...] = ()
    url: str | None = None
    qr_data: str | None = None
    seconds_left: int | None = None
    progress: float | None = None
    device_name: str | None = None
    # Which page of a paged screen is showing: counted from the clock, so that a code
    # screen whose URL does not fit beside the QR code can show each in turn.
    page: int = 0


# A page of a paged code screen shows this long: time to scan, or to read a URL.
PAGE_SECONDS = 4.0


# Shown once signed in for `display.blank_after`: panels switch off (OLED burn-in).
BLANK_SCREEN = Screen(kind="blank", title="", lines=())


# The one screen meant to outlive the agent: it exits 78 after drawing it, and a panel
# keeps it lit (luma's persist), so the person who walks up to the device reads the fix.
FATAL = "fatal"


def fatal_screen(problem: str) -> Screen:
    """For a fix only a person can make (a permission, a file written by a newer
    version). The typed errors word it as "...; fix: COMMAND"."""
    reason, _, fix = problem.partition("; fix: ")
    return Screen(kind=FATAL, title="Config error",
                  lines=(f"Fix: {fix}" if fix else reason, "then restart device-agent"))


# Before the first sign-in request: TLS and token times need the wall clock.
CLOCK_NOT_SET_SCREEN = Screen(kind="clock_not_set", title="Clock not set",
                              lines=("Waiting for network time", "(NTP) before signing in"))


# "No network" only when that is what it is: a name that does not resolve, a TLS
# failure and a provider in trouble are fixed elsewhere.
_NO_ANSWER_TITLES: dict[Cause | None, str] = {
    Cause.NAME: "Name not found", Cause.TLS: "TLS failed", Cause.PROVIDER: "Provider trouble"}


def code_groups(code: str) -> tuple[str, ...]:
    """The user code's characters exactly as issued, in the groups a person reads at a
    glance: 9 digits (authentik) in threes, 8 characters (RFC 8628 §6.1,
    django-oauth-toolkit) in fours. The groups are drawn apart, never joined by a
    character: authentik's entry form takes digits only and django-oauth-toolkit
    compares codes exactly, so a dash or space added here would be typed and refused.
    """
    if code.isascii() and code.isalnum():
        if len(code) == 9 and code.isdigit():
            return (code[:3], code[3:6], code[6:])
        if len(code) == 8:
            return (code[:4], code[4:])
    if "-" in code.strip("-"):
        # A code issued with its own dashes ("WDJB-MJHT") breaks after them, so a
        # narrow panel can stack it; the dashes stay, being part of what is typed.
        parts = code.split("-")
        return (*(f"{part}-" for part in parts[:-1]), parts[-1])
    return (code,)


def typing_hint(code: str) -> str:
    """What to type, since the grouping on screen is not part of the code."""
    if code.isascii() and code.isdigit():
        return f"Type the {len(code)} digits"
    if code.isascii() and code.isalpha():
        return f"Type the {len(code)} letters"
    if code.isascii() and code.isalnum():
        return f"Type the {len(code)} letters and digits"
    return "Type it exactly as shown"


def short_url(uri: str) -> str:
    """The verification URI as a person types it: without "https://".

    Browsers assume HTTPS, so the scheme is noise on a small panel. A plain "http://"
    stays (loopback demos), because a browser would otherwise try HTTPS and fail. A
    bare trailing "/" after the host goes too; a path's own slash is kept, since the
    server may redirect or refuse without it.
    """
    parts = urlsplit(uri)
    if parts.scheme.lower() != "https" or not parts.netloc:
        return uri
    rest = uri.split("://", 1)[1]
    if rest == parts.netloc + "/":
        return parts.netloc
    return rest


def build_screen(snapshot: Snapshot, *, now_mono: float, now_wall: float,
                 code_lifetime: float | None = None, tz: tzinfo | None = None) -> Screen:
    """The screen for `snapshot` at this moment.

    The countdown runs on the monotonic clock (`code_deadline`), so it stays right
    when NTP moves the wall clock after boot; times of day are shown in `tz`, the
    local zone when None. `code_lifetime` is the code's `expires_in`, for `progress`.
    """
    device = snapshot.device_name or None

    def at(when: float) -> str:
        return datetime.fromtimestamp(when, tz).strftime("%H:%M")

    def next_code() -> str:
        if snapshot.next_code_at is None:
            return "Press the button or call login"
        return f"Next code at {at(snapshot.next_code_at)}"

    def screen(kind: str, title: str, *lines: str | None) -> Screen:
        return Screen(kind=kind, title=title, lines=tuple(line for line in lines if line),
                      device_name=device)

    match snapshot.phase:
        case Phase.STARTING:
            return screen("starting", "Starting", "Please wait")
        case Phase.NO_NETWORK:
            return screen("no_network", _NO_ANSWER_TITLES.get(snapshot.cause, "No network"),
                          "Retrying...", snapshot.last_error)
        case Phase.AWAITING_USER:
            return _code_screen(snapshot, device, now_mono=now_mono, now_wall=now_wall,
                                code_lifetime=code_lifetime)
        case Phase.CODE_EXPIRED:
            return screen("code_expired", "Code expired", next_code())
        case Phase.NEEDS_BUTTON:
            # RFC 8628 §3.5: after codes expire unused, wait for the person.
            return screen("needs_button", "Sign in", "Press the button to sign in",
                          "Codes expired unused")
        case Phase.THROTTLED:
            return screen("throttled", "Provider busy", next_code(), "Too many codes requested")
        case Phase.DENIED:
            reason = snapshot.last_error
            if reason and reason.strip().lower() == "access denied":
                reason = None  # the title already says it
            return screen("denied", "Access denied", next_code(), reason)
        case Phase.SIGNED_IN:
            return screen(
                "signed_in", "Signed in",
                f"as {snapshot.user}" if snapshot.user else None,
                f"Valid until {at(snapshot.token_expires_at)}"
                if snapshot.token_expires_at is not None else None)
        case Phase.REFRESH_FAILING:
            return screen("refresh_failing", "Refresh failing",
                          _still_valid(snapshot.token_expires_at, now_wall), snapshot.last_error)
        case Phase.CONFIG_ERROR:
            return screen(
                "config_error", "Config error",
                snapshot.last_error or "The provider refuses this client",
                f"Retry at {at(snapshot.next_code_at)}"
                if snapshot.next_code_at is not None else None)
        case Phase.STOPPING:
            return screen("stopping", "Stopping")
    raise AssertionError(snapshot.phase)  # pragma: no cover


def _code_screen(snapshot: Snapshot, device: str | None, *, now_mono: float, now_wall: float,
                 code_lifetime: float | None) -> Screen:
    code = snapshot.user_code
    uri = snapshot.verification_uri
    qr_data = snapshot.verification_uri_complete or uri

    left: float | None = None
    if snapshot.code_deadline is not None:
        left = snapshot.code_deadline - now_mono
    elif snapshot.code_expires_at is not None:
        left = snapshot.code_expires_at - now_wall
    # Rounded up, so "0" appears only once the code is really dead.
    seconds_left = max(0, math.ceil(left)) if left is not None else None
    # Counted from the code's arrival where known, so the QR code's page comes first.
    shown_for = (code_lifetime - left if left is not None and code_lifetime is not None
                 else now_mono)
    page = max(0, int(shown_for // PAGE_SECONDS))
    progress = None
    if left is not None and code_lifetime is not None and code_lifetime > 0:
        progress = min(1.0, max(0.0, left / code_lifetime))

    lines = [CODE_INSTRUCTION]
    if code is not None:
        lines.append(typing_hint(code))
    if qr_data:
        lines.append("or scan the QR code")
    if snapshot.user:
        # A new sign-in while signed in: the device still works meanwhile.
        lines.append(f"Still signed in as {snapshot.user}")
    return Screen(
        kind="code",
        title="Sign in",
        lines=tuple(lines),
        user_code=code,
        user_code_display=code,
        user_code_groups=code_groups(code) if code is not None else (),
        url=short_url(uri) if uri else None,
        qr_data=qr_data or None,
        seconds_left=seconds_left,
        progress=progress,
        device_name=device,
        page=page,
    )


def _still_valid(expires_at: float | None, now_wall: float) -> str:
    if expires_at is None:
        return "Token lifetime unknown"
    left = expires_at - now_wall
    if left <= 0:
        return "Token expired"
    if left < 60:
        return "Still valid for under 1 min"
    return f"Still valid for {int(left // 60)} min"
