"""What the agent is doing, as one immutable snapshot that every observer reads:
the display, the local API, systemd's STATUS= line and the hooks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Phase", "Snapshot", "clock_time", "rfc3339", "summary"]


class Phase(StrEnum):
    STARTING = "starting"
    NO_NETWORK = "no_network"            # provider unreachable; retrying
    AWAITING_USER = "awaiting_user"      # a code is on screen
    CODE_EXPIRED = "code_expired"        # waiting for the next code (budget, back-off)
    THROTTLED = "throttled"              # the device endpoint said 429/slow_down
    DENIED = "denied"                    # the person refused; waiting before a new code
    NEEDS_BUTTON = "needs_button"        # codes expired unused: a press asks for the next
    SIGNED_IN = "signed_in"
    REFRESH_FAILING = "refresh_failing"  # still serving the old token while it lives
    CONFIG_ERROR = "config_error"        # the provider rejects our client setup
    STOPPING = "stopping"


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """Times named `*_at` are wall-clock epoch seconds (for people and the API);
    `code_deadline` is monotonic, so an on-screen countdown survives an NTP jump."""

    phase: Phase
    device_name: str
    user: str | None = None
    token_expires_at: float | None = None
    user_code: str | None = None
    verification_uri: str | None = None
    verification_uri_complete: str | None = None
    code_expires_at: float | None = None
    code_deadline: float | None = None
    code_lifetime: float | None = None   # the code's expires_in, for a countdown bar
    next_code_at: float | None = None
    last_error: str | None = None
    # While waiting for the network (NO_NETWORK): what failed, so a screen says "No
    # network" only when that is what it is.
    cause: Cause | None = None


class Cause(StrEnum):
    NETWORK = "network"      # no connection, or no answer in time
    NAME = "name"            # the provider's host name does not resolve
    TLS = "tls"              # the connection's TLS failed (certificate, clock)
    PROVIDER = "provider"    # the provider answered, with trouble (5xx, a web page)


def clock_time(when: float) -> str:
    """A wall-clock time as people read it on the device: local HH:MM."""
    return time.strftime("%H:%M", time.localtime(when))


def rfc3339(when: float) -> str:
    """A wall-clock time for programs: RFC 3339 in UTC, as the API and token files give it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def summary(snapshot: Snapshot, *, now_wall: float) -> str:
    """One line for systemd's STATUS= and the log: what a person needs to act on."""
    match snapshot.phase:
        case Phase.AWAITING_USER:
            # As issued: a person may type what `systemctl status` shows.
            code = snapshot.user_code or "?"
            still = f"; still signed in as {snapshot.user}" if snapshot.user else ""
            return f"Waiting for sign-in: code {code} at {snapshot.verification_uri}{still}"
        case Phase.SIGNED_IN:
            who = snapshot.user or "unknown user"
            if snapshot.token_expires_at is None:
                return f"Signed in as {who}"
            return f"Signed in as {who}; token valid until {clock_time(snapshot.token_expires_at)}"
        case Phase.REFRESH_FAILING:
            left = (snapshot.token_expires_at or now_wall) - now_wall
            state = f"still valid for {int(left // 60)} min" if left > 0 else "token expired"
            return f"Refresh failing ({snapshot.last_error}); {state}"
        case Phase.CODE_EXPIRED | Phase.THROTTLED | Phase.DENIED:
            what = {Phase.CODE_EXPIRED: "Code expired", Phase.THROTTLED: "Provider busy",
                    Phase.DENIED: "Sign-in denied"}[snapshot.phase]
            if snapshot.next_code_at is None:
                return f"{what}; request a new code with `device-agent login`"
            return f"{what}; next code at {clock_time(snapshot.next_code_at)}"
        case Phase.NEEDS_BUTTON:
            return "Codes expired unused; press the button (or `device-agent login`) to sign in"
        case Phase.NO_NETWORK:
            return f"Provider unreachable: {snapshot.last_error}; retrying"
        case Phase.CONFIG_ERROR:
            return f"Provider refuses this client: {snapshot.last_error}"
        case Phase.STARTING:
            return "Starting"
        case Phase.STOPPING:
            return "Stopping"
    raise AssertionError(snapshot.phase)  # pragma: no cover
