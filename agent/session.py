"""The sign-in lifecycle as data: a sans-IO machine, in the manner of h11's `_state.py`.

The session never sends, sleeps, logs or touches a file. Its inputs are the things that
happen (`Start`, `Tick`, `Login`, `Logout`, `Refresh`, `Stop`, `Answered`, `Failed`,
`Saved`, `SaveFailed`), each with the time on both clocks; its outputs are effects for
the driver to carry out (`Send`, `Save`, `Clear`, `Record`, `Log`) and a `Snapshot` for
everyone who watches. `next_timer()` says when it wants a `Tick`.

Four regions move side by side, as h11's client and server do:

- RUN: RUNNING, then STOPPING (no new request starts; answers in flight still land).
- ENDPOINTS: where the provider listens (OpenID Connect Discovery, RFC 8414).
- SIGN_IN: getting a person to approve a device code (RFC 8628).
- TOKENS: holding, saving and refreshing the credentials (RFC 6749 §6).

Every legal move is a row of `TRANSITIONS`, with its reason beside it; a move not in
the table raises `IllegalInput` before anything changes. Sign-in and tokens are apart
on purpose: a new sign-in (a code on screen) never stops the current credentials from
being refreshed and served.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from agent.errors import (
    AgentError,
    IllegalInput,
    MinTtlTooLong,
    NameNotResolved,
    NotSignedIn,
    OAuthError,
    ProviderUnavailable,
    ResponseTooLarge,
    TLSFailed,
    TransportError,
)
from agent.logs import fingerprint
from agent.oauth import (
    Approved,
    Client,
    CodeIssued,
    Denied,
    DeviceAuthorization,
    DevicePoll,
    Endpoints,
    Expired,
    HttpRequest,
    HttpResponse,
    Pending,
    Refreshed,
    RefreshRejected,
    Rejected,
    ServerTrouble,
    SlowDown,
    Throttled,
    TokenSet,
    device_authorization_request,
    receive_device_authorization,
    receive_refresh,
    receive_revocation,
    receive_userinfo,
    refresh_request,
    revocation_request,
    userinfo_request,
)
from agent.oauth.discovery import Discovery, ExplicitEndpoints
from agent.oauth.flow import PollEvent
from agent.oauth.tokens import check_id_token, userinfo_matches
from agent.pacing import Backoff, CodeBudget
from agent.sessionfile import PendingCode, PendingRevocation, SessionRecord
from agent.state import Cause, Phase, Snapshot
from agent.store import Credentials

__all__ = [
    "TRANSITIONS",
    "Answered",
    "Clear",
    "Effect",
    "Failed",
    "IllegalInput",
    "Input",
    "Instant",
    "Lease",
    "Log",
    "Login",
    "Logout",
    "Record",
    "Refresh",
    "Region",
    "Save",
    "SaveFailed",
    "Saved",
    "Send",
    "Session",
    "SessionSettings",
    "Start",
    "Stop",
    "Tick",
    "not_signed_in_reason",
    "transitions_markdown",
    "user_label",
]

# authentik's default code lifetime is 60 s; a person with a phone needs longer.
SHORT_CODE_LIFETIME = 120.0
# After a refusal, the screen says so for this long before a new code appears.
DENIED_PAUSE = 60.0
# Scheduled refreshes never come closer together than this.
MIN_REFRESH_GAP = 10.0
# A failing refresh tries once more between this and twice this before the access token
# expires: time for a slow answer to land.
LAST_TRY_LEAD = 30.0
# While the token serves, this many retries follow the back-off from retry_initial;
# later ones wait retry_max (Session._refresh_wait_while_valid).
QUICK_REFRESH_RETRIES = 3
# A refresh already overdue at start-up waits a random part of this: a site whose power
# comes back starts every device at once, and the provider would get all their
# refreshes in one second. Less where the token has under two last-try leads to spare
# (none at all within them), and a few seconds for one that has expired; a caller who
# needs the token does not wait for it.
START_SPREAD = 30.0
EXPIRED_START_SPREAD = 5.0
# The session looks at the clocks at least this often, so a wall-clock jump (NTP at
# boot) is noticed in time, and an unsaved credential file is written again.
RECHECK_INTERVAL = 60.0
# A wall clock that moved this much against the monotonic one has jumped.
CLOCK_JUMP = 30.0
# A person's explicit request during a throttle back-off tries at once, but no more
# often than this: authentik does not count refused tries, so one costs nothing.
FORCED_TRY_GAP = 60.0
# RFC 8628 §3.5: after expired_token the client "SHOULD wait for user interaction".
# With a button, after this many codes expire unused, none is spent until a press.
UNUSED_CODES_BEFORE_BUTTON = 3
# A code resumed after a restart needs at least this long left to be worth showing.
MIN_RESUME_LEFT = 15.0
# A token the provider gave no lifetime is refreshed this often all the same, so its
# refresh token is used (and, where it slides, kept alive) rather than left to age out.
UNKNOWN_LIFETIME_REFRESH = 3600.0


# -- time --------------------------------------------------------------------------


@dataclass(frozen=True)
class Instant:
    """A moment on both clocks: `mono` for deadlines, `wall` for people and the disk."""

    mono: float
    wall: float

    def wall_at(self, mono: float) -> float:
        return self.wall + (mono - self.mono)

    def mono_at(self, wall: float) -> float:
        return self.mono + (wall - self.wall)


@dataclass(frozen=True, kw_only=True)
class Lease:
    """How long an access token lives, on both clocks.

    A token received in this run keeps its monotonic deadline whatever the wall clock
    does: the provider's `expires_in` was relative. A token read from disk was judged
    by the wall clock, so a wall-clock jump re-derives its deadline, and never lengthens
    it: a clock that was ahead at sign-in and stepped back must not make a token live
    longer than its lifetime.
    """

    deadline: float | None      # monotonic; None: the provider gave no lifetime
    lifetime: float | None
    expires_at: float | None    # wall
    wall_offset: float          # wall - mono when the deadline was derived
    start: float = 0.0          # monotonic: issued, or read from disk
    from_disk: bool = False

    @classmethod
    def issued(cls, tokens: TokenSet, sent: Instant) -> Lease:
        """`tokens` were parsed with `now_wall=sent.wall`: the request's send time, so
        the time the answer spent on the way is counted against the token."""
        offset = sent.wall - sent.mono
        lifetime = (None if tokens.expires_at is None
                    else max(0.0, tokens.expires_at - tokens.issued_at))
        if not lifetime:
            # None, or an expires_in of 0: nothing to schedule by. Refreshed now and
            # then (UNKNOWN_LIFETIME_REFRESH), never every few seconds.
            return cls(deadline=None, lifetime=None, expires_at=None, wall_offset=offset,
                       start=sent.mono)
        return cls(deadline=sent.mono + lifetime, lifetime=lifetime,
                   expires_at=sent.wall + lifetime, wall_offset=offset, start=sent.mono)

    @classmethod
    def stored(cls, tokens: TokenSet, now: Instant) -> Lease:
        offset = now.wall - now.mono
        if tokens.expires_at is None:
            return cls(deadline=None, lifetime=None, expires_at=None, wall_offset=offset,
                       start=now.mono, from_disk=True)
        lifetime = max(0.0, tokens.expires_at - tokens.issued_at)
        if not lifetime:
            return cls(deadline=None, lifetime=None, expires_at=None, wall_offset=offset,
                       start=now.mono, from_disk=True)
        left = min(tokens.expires_at - now.wall, lifetime)
        return cls(deadline=now.mono + left, lifetime=lifetime, expires_at=now.wall + left,
                   wall_offset=offset, start=now.mono, from_disk=True)

    def jumped(self, now: Instant) -> float:
        return (now.wall - now.mono) - self.wall_offset

    def rebased(self, now: Instant) -> Lease:
        """This lease as seen after the wall clock moved (no change when it did not)."""
        if self.deadline is None or abs(self.jumped(now)) < CLOCK_JUMP:
            return self
        deadline = self.deadline
        if self.from_disk and self.expires_at is not None:
            deadline = min(deadline, now.mono + (self.expires_at - now.wall))
        return replace(self, deadline=deadline, wall_offset=now.wall - now.mono,
                       expires_at=now.wall_at(deadline))

    def remaining(self, now: Instant) -> float | None:
        """Seconds left; None when the provider gave no lifetime. No side effects."""
        deadline = self.rebased(now).deadline
        return None if deadline is None else deadline - now.mono


# -- inputs ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Start:
    """What the disk held at start: credentials (already checked to belong to this
    client and issuer) and the session record."""

    credentials: Credentials | None
    record: SessionRecord


@dataclass(frozen=True, kw_only=True)
class Tick:
    """A timer fired, or the driver just wants the session to look at the clocks."""


@dataclass(frozen=True, kw_only=True)
class Login:
    """A person asks for a code now (button, CLI, API). `new_sign_in`: start over even
    when signed in (the current credentials are served until the new ones land)."""

    new_sign_in: bool = False


@dataclass(frozen=True, kw_only=True)
class Logout:
    pass


@dataclass(frozen=True, kw_only=True)
class Refresh:
    """A caller wants a token fresher than the one held (`min_ttl`, `POST /v1/refresh`)."""


@dataclass(frozen=True, kw_only=True)
class Stop:
    pass


@dataclass(frozen=True, kw_only=True)
class Answered:
    request_id: int
    response: HttpResponse


@dataclass(frozen=True, kw_only=True)
class Failed:
    request_id: int
    error: TransportError


@dataclass(frozen=True, kw_only=True)
class Saved:
    write_id: int


@dataclass(frozen=True, kw_only=True)
class SaveFailed:
    write_id: int
    reason: str


Input = Start | Tick | Login | Logout | Refresh | Stop | Answered | Failed | Saved | SaveFailed


# -- effects -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Send:
    """Send `request`; hand back `Answered` or `Failed` with the same id."""

    request_id: int
    request: HttpRequest
    purpose: str


@dataclass(frozen=True, kw_only=True)
class Save:
    """Write the credentials durably, shielded from cancellation, then hand back
    `Saved` or `SaveFailed` before any other input."""

    write_id: int
    credentials: Credentials


@dataclass(frozen=True, kw_only=True)
class Clear:
    """Remove the credential file (failures are logged; nothing comes back)."""


@dataclass(frozen=True, kw_only=True)
class Record:
    """Write the session record (pacing, the code on screen, revocations owed)."""

    record: SessionRecord


@dataclass(frozen=True, kw_only=True)
class Log:
    level: int
    message: str


Effect = Send | Save | Clear | Record | Log


# -- the table ---------------------------------------------------------------------


class Region(StrEnum):
    RUN = "run"
    ENDPOINTS = "endpoints"
    SIGN_IN = "sign_in"
    TOKENS = "tokens"


class RunState(StrEnum):
    RUNNING = "running"
    STOPPING = "stopping"


class EndpointState(StrEnum):
    UNKNOWN = "unknown"
    DISCOVERING = "discovering"
    KNOWN = "known"
    MISCONFIGURED = "misconfigured"


class SignInState(StrEnum):
    IDLE = "idle"                    # no sign-in wanted
    WAITING = "waiting"              # wanted; the next code waits for budget or back-off
    REQUESTING = "requesting"        # the device authorization request is out
    AWAITING_USER = "awaiting_user"  # a code is on screen
    POLLING = "polling"              # a code is on screen and a poll is out
    BUTTON = "button"                # codes expired unused: wait for a person


class TokenState(StrEnum):
    NONE = "none"
    VALID = "valid"                  # held (maybe expired, while a refresh can mend it)
    REFRESHING = "refreshing"
    SAVING = "saving"                # new tokens on their way to disk, not yet served


State = RunState | EndpointState | SignInState | TokenState


@dataclass(frozen=True)
class Row:
    targets: frozenset[State]
    reason: str


def _rows(*rows: tuple[Region, State, str, tuple[State, ...], str],
          ) -> Mapping[tuple[Region, State, str], Row]:
    table: dict[tuple[Region, State, str], Row] = {}
    for region, state, trigger, targets, reason in rows:
        key = (region, state, trigger)
        assert key not in table, key
        table[key] = Row(frozenset(targets), reason)
    return table


R, E, S, T = RunState, EndpointState, SignInState, TokenState
_ANY_SIGN_IN = tuple(SignInState)
_TOKENS_HELD = (T.VALID, T.REFRESHING)

TRANSITIONS: Mapping[tuple[Region, State, str], Row] = _rows(
    # RUN -------------------------------------------------------------------------
    (Region.RUN, R.RUNNING, "stop", (R.STOPPING,),
     "SIGTERM: start nothing new; an answer in flight still reaches the disk, since "
     "authentik has already rotated the refresh token it answers for"),
    # ENDPOINTS -------------------------------------------------------------------
    (Region.ENDPOINTS, E.UNKNOWN, "needed", (E.DISCOVERING, E.KNOWN, E.MISCONFIGURED),
     "OpenID Connect Discovery §4.1, then RFC 8414 §3.1; without an issuer the config "
     "names the endpoints"),
    (Region.ENDPOINTS, E.MISCONFIGURED, "needed", (E.DISCOVERING, E.KNOWN, E.MISCONFIGURED),
     "a wrong document is asked again only after retry_max: a person must fix it"),
    (Region.ENDPOINTS, E.DISCOVERING, "not_found", (E.DISCOVERING,),
     "HTTP 404: try the next well-known location"),
    (Region.ENDPOINTS, E.DISCOVERING, "found", (E.KNOWN,),
     "each endpoint from the config where given, else from the document"),
    (Region.ENDPOINTS, E.DISCOVERING, "trouble", (E.UNKNOWN,),
     "network, 5xx or a page that is not JSON: retried with back-off"),
    (Region.ENDPOINTS, E.DISCOVERING, "refused", (E.MISCONFIGURED,),
     "OpenID Connect Discovery §4.3: an issuer that does not match, or no document; a "
     "configuration error, not 'no network'"),
    # SIGN_IN ---------------------------------------------------------------------
    (Region.SIGN_IN, S.IDLE, "wanted", (S.WAITING, S.BUTTON),
     "no usable credentials, a dead refresh token, a sign-out or a new sign-in asked for; "
     "after a restart that found codes expired unused, with a button: wait for a press"),
    (Region.SIGN_IN, S.IDLE, "resume", (S.AWAITING_USER,),
     "a restart while a code was on screen: the person may be halfway through; no new "
     "code is spent"),
    (Region.SIGN_IN, S.WAITING, "due", (S.REQUESTING,),
     "RFC 8628 §3.1, within the hourly code budget and any back-off"),
    (Region.SIGN_IN, S.WAITING, "login", (S.WAITING,),
     "a person's request skips a pause, never the budget; in a throttle back-off it "
     "tries at most once a minute"),
    (Region.SIGN_IN, S.REQUESTING, "code", (S.AWAITING_USER,),
     "RFC 8628 §3.2: show user_code, verification_uri and the QR code"),
    (Region.SIGN_IN, S.REQUESTING, "throttled", (S.WAITING,),
     "HTTP 429: authentik's rolling hour counts only accepted requests, so back off "
     "from 2 min, doubling to 30 min, jittered; a refused try spends no budget"),
    (Region.SIGN_IN, S.REQUESTING, "trouble", (S.WAITING,),
     "network or 5xx: jittered exponential back-off"),
    (Region.SIGN_IN, S.REQUESTING, "refused", (S.WAITING,),
     "RFC 6749 §5.2 client errors: repeating will not help; retried after retry_max"),
    (Region.SIGN_IN, S.REQUESTING, "login", (S.REQUESTING,),
     "a code is already being asked for"),
    (Region.SIGN_IN, S.AWAITING_USER, "poll_due", (S.POLLING,),
     "RFC 8628 §3.4–3.5: poll no sooner than `interval` after the last request"),
    (Region.SIGN_IN, S.AWAITING_USER, "code_expired", (S.WAITING, S.BUTTON, S.IDLE),
     "the deadline from expires_in passed (authentik <= 2026.2 keeps answering "
     "authorization_pending); signed in: keep the current credentials; §3.5 SHOULD "
     "wait for user interaction: with a button, after 3 unused codes"),
    (Region.SIGN_IN, S.AWAITING_USER, "login", (S.WAITING,),
     "a person asks for another code: at once, within the budget"),
    (Region.SIGN_IN, S.POLLING, "pending", (S.AWAITING_USER,),
     "authorization_pending, slow_down (+5 s for good) or trouble (interval doubled, "
     "§3.5 'MUST unilaterally reduce their polling frequency')"),
    (Region.SIGN_IN, S.POLLING, "approved", (S.IDLE,),
     "RFC 8628 §3.5 success: the tokens go to disk before anything else"),
    (Region.SIGN_IN, S.POLLING, "denied", (S.WAITING, S.IDLE),
     "access_denied: say so for a minute; signed in: keep the current credentials"),
    (Region.SIGN_IN, S.POLLING, "code_expired", (S.WAITING, S.BUTTON, S.IDLE),
     "expired_token, or invalid_grant (authentik: expired, cleaned up or redeemed)"),
    (Region.SIGN_IN, S.POLLING, "refused", (S.WAITING,),
     "any other RFC 6749 §5.2 error is terminal for this code (§3.5)"),
    (Region.SIGN_IN, S.POLLING, "approval_revoked", (S.WAITING,),
     "an approval that a sign-out overtook is revoked, not kept; its code is spent, so "
     "a new one follows"),
    (Region.SIGN_IN, S.POLLING, "login", (S.WAITING,),
     "a new code at once; an approval of the old one that still lands is kept"),
    (Region.SIGN_IN, S.BUTTON, "login", (S.WAITING,),
     "the user interaction RFC 8628 §3.5 asks to wait for"),
    *((Region.SIGN_IN, state, "not_wanted", (S.IDLE,),
       "an approval of an abandoned code landed: the person did approve, so it is kept "
       "and the sign-in under way is dropped")
      for state in (S.WAITING, S.REQUESTING, S.AWAITING_USER, S.POLLING, S.BUTTON)),
    (Region.SIGN_IN, S.IDLE, "not_wanted", (S.IDLE,),
     "an approval of an abandoned code landed while signed in: kept, as the newest"),
    *((Region.SIGN_IN, state, "signed_out", (S.WAITING, state),
       "sign-out: a new sign-in follows, and a code shown before it is dropped (its "
       "approval would sign the device in again); not signed in, nothing changes and "
       "no code is spent") for state in _ANY_SIGN_IN),
    # TOKENS ----------------------------------------------------------------------
    (Region.TOKENS, T.NONE, "loaded", (T.VALID,),
     "stored credentials are served at once, with no network call"),
    *((Region.TOKENS, state, "approved", (T.SAVING,),
       "disk before use: a rotated refresh token must be safe before the access token "
       "is handed out") for state in (T.NONE, *_TOKENS_HELD)),
    (Region.TOKENS, T.VALID, "rewrite", (T.SAVING,),
     "the same tokens written again: claims from userinfo, a dead refresh token "
     "removed, the rotated refresh token of an answer without an access token, or a "
     "write the disk refused before"),
    (Region.TOKENS, T.SAVING, "saved", (T.VALID,),
     "on disk: serve the new tokens; a new sign-in revokes the previous refresh token "
     "(RFC 7009)"),
    (Region.TOKENS, T.SAVING, "save_failed", (T.VALID,),
     "the provider has already rotated: serve from memory, write again every minute"),
    (Region.TOKENS, T.VALID, "refresh", (T.REFRESHING,),
     "RFC 6749 §6, a margin before expiry or for a caller; never inside the back-off"),
    (Region.TOKENS, T.REFRESHING, "refreshed", (T.SAVING,),
     "RFC 6749 §6: a missing refresh_token means the old one stays"),
    (Region.TOKENS, T.REFRESHING, "refresh_refused", (T.VALID, T.NONE),
     "invalid_grant: the refresh token is dead and is never sent again; the access "
     "token is served while it lives, and a new sign-in starts"),
    (Region.TOKENS, T.REFRESHING, "trouble", (T.VALID,),
     "network, 5xx, 429 or a lost answer: serve the old token while it lives, retry "
     "with back-off (Retry-After as a floor)"),
    (Region.TOKENS, T.REFRESHING, "refused", (T.VALID,),
     "invalid_client and other client errors: a person must fix the config"),
    (Region.TOKENS, T.VALID, "expired", (T.NONE,),
     "the access token is gone and there is no refresh token to mend it"),
    *((Region.TOKENS, state, "logout", (T.NONE,),
       "sign-out wins: nothing is served from now on; tokens an answer in flight "
       "brings are revoked when it lands") for state in (T.NONE, *_TOKENS_HELD)),
    *((Region.TOKENS, state, "stale_answer", (state,),
       "an answer for credentials that are gone: its tokens are revoked, and it never "
       "clears newer credentials") for state in (T.NONE, *_TOKENS_HELD)),
)


# -- settings ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SessionSettings:
    client: Client
    scopes: tuple[str, ...]
    device_name: str
    issuer: str | None = None
    endpoints: ExplicitEndpoints = field(default_factory=ExplicitEndpoints)
    allow_insecure_http: bool = False
    codes_per_hour: int = 12
    throttle_backoff: float = 120.0
    throttle_backoff_max: float = 1800.0
    retry_initial: float = 2.0
    retry_max: float = 300.0
    refresh_margin: float | None = None
    refresh_margin_ratio: float = 0.2
    refresh_retry_initial: float = 2.0
    refresh_retry_max: float = 300.0
    # A button is wired: after unused codes, wait for a press (RFC 8628 §3.5).
    button: bool = False
    # /etc/machine-id, written into the credentials of a sign-in on this device.
    machine_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class _Out:
    """A request in flight, and what its answer is for."""

    purpose: str                     # discovery | device | poll | refresh | userinfo | revoke
    sent: Instant
    logout_epoch: int
    poll: DevicePoll | None = None
    tokens: TokenSet | None = None     # refresh: sent with; userinfo: whose claims
    revocation: PendingRevocation | None = None


@dataclass(frozen=True, kw_only=True)
class _Write:
    """Credentials on their way to disk, and what follows once they are there."""

    write_id: int
    credentials: Credentials
    lease: Lease
    revoke: TokenSet | None = None     # the previous sign-in's tokens (RFC 7009)
    userinfo: bool = False             # ask for the user's name after the write


# -- the machine -------------------------------------------------------------------


class Session:
    def __init__(self, settings: SessionSettings, *, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._rng = rng or random.Random()
        self.states: dict[Region, State] = {
            Region.RUN: R.RUNNING, Region.ENDPOINTS: E.UNKNOWN,
            Region.SIGN_IN: S.IDLE, Region.TOKENS: T.NONE}
        self._effects: list[Effect] = []
        self._started = False
        self._now = Instant(0.0, 0.0)
        self._ids = 0
        self._out: dict[int, _Out] = {}
        self._logout_epoch = 0
        self._findings: set[str] = set()
        # endpoints
        self.endpoints: Endpoints | None = None
        self._discovery: Discovery | None = None
        self._discovery_retry_at = 0.0
        self._discovery_backoff = Backoff(settings.retry_initial, settings.retry_max,
                                          rng=self._rng)
        # sign-in
        self._budget = CodeBudget(settings.codes_per_hour)
        self._code_backoff = Backoff(settings.retry_initial, settings.retry_max, rng=self._rng)
        self._wait_phase = Phase.STARTING
        self._pause_until: float | None = None      # monotonic: denial, trouble, config
        self._throttle_until: float | None = None
        self._throttle_step: float | None = None
        self._last_forced_try: float | None = None
        self._sign_in_error: str | None = None
        self._poll: DevicePoll | None = None
        self._unused_codes = 0
        # tokens
        self.credentials: Credentials | None = None
        self._lease: Lease | None = None
        self._saving: _Write | None = None
        self._replaced: TokenSet | None = None   # revoked once its successor is on disk
        self._device_out: _Out | None = None
        self._loaded_spent: tuple[float, ...] = ()   # wall times from the record
        self._start_offset = 0.0
        self._started_at = 0.0
        self._unsaved_retry_at: float | None = None  # the disk refused the last write
        self._last_refresh: float | None = None
        self._refresh_backoff = Backoff(settings.refresh_retry_initial,
                                        settings.refresh_retry_max, rng=self._rng)
        self._refresh_retry_at: float | None = None
        # START_SPREAD: the lease it holds back, and until when; the first refresh sent
        # ends it.
        self._refresh_not_before: tuple[Lease, float] | None = None
        self._refresh_error: str | None = None
        # What the last request met (set with each answer or failure), and what the
        # sign-in's trouble was, for a screen that must not say "No network" wrongly.
        self._cause = Cause.NETWORK
        self._sign_in_cause = Cause.NETWORK
        # A refresh asked for before the endpoints were known (a restart with stored
        # credentials): it follows the discovery answer, and callers wait for both.
        self._refresh_after_discovery = False
        self.refreshes_done = 0          # answered refresh attempts, for waiting callers
        # revocation (RFC 7009), owed across restarts
        self._revocations: list[PendingRevocation] = []
        self._revoke_backoff = Backoff(settings.retry_initial, settings.retry_max,
                                       rng=self._rng)
        self._revoke_retry_at = 0.0
        self._revocations_tried: set[PendingRevocation] = set()
        self.logout_problems: list[str] = []
        self._recorded: SessionRecord | None = None
        self._last_check = 0.0
        self.snapshot = Snapshot(phase=Phase.STARTING, device_name=settings.device_name)

    # -- the interface -------------------------------------------------------------

    def handle(self, event: Input, now: Instant) -> list[Effect]:
        """Feed one input; returns the effects to carry out, in order."""
        if not self._started and not isinstance(event, Start):
            raise IllegalInput(f"{type(event).__name__} before Start")
        self._now = now
        match event:
            case Start():
                self._start(event)
            case Tick():
                pass
            case Login(new_sign_in=new_sign_in):
                self._login(new_sign_in)
            case Logout():
                self._logout()
            case Refresh():
                self._running("refresh")
                self._start_refresh()
            case Stop():
                self._go(Region.RUN, "stop", R.STOPPING)
                if self._unsaved_retry_at is not None and self.states[Region.TOKENS] == T.VALID:
                    self._rewrite()  # a last try: memory dies with the process
            case Answered(request_id=request_id, response=response):
                self._answered(self._take(request_id), response)
            case Failed(request_id=request_id, error=error):
                self._failed(self._take(request_id), error)
            case Saved(write_id=write_id):
                self._saved(write_id, None)
            case SaveFailed(write_id=write_id, reason=reason):
                self._saved(write_id, reason)
        self._advance()
        self.snapshot = self._derive_snapshot()
        self._record_if_changed()
        effects, self._effects = self._effects, []
        return _record_first(effects)

    def next_timer(self) -> float | None:
        """The monotonic time the session next wants a `Tick` (None: only on input).

        While a request is out, its answer (or the transport's timeout) is the next
        input, and everything due is looked at then: a timer meanwhile would only race
        the answer it waits for.
        """
        if not self._started or self._out:
            return None
        times = [self._last_check + RECHECK_INTERVAL]
        if self.states[Region.RUN] == R.RUNNING:
            times += [t for t in (self._refresh_due_at(), self._next_code_at(),
                                  self._poll_due_at(), self._revocation_due_at(),
                                  self._unsaved_retry_at) if t is not None]
        if self._lease is not None and self._lease.deadline is not None:
            times.append(self._lease.deadline)
        if self.states[Region.ENDPOINTS] in (E.UNKNOWN, E.MISCONFIGURED):
            times.append(self._discovery_retry_at)
        # Whatever was due at the last input has been started: only later times count.
        later = [t for t in times if t > self._now.mono]
        return min(later) if later else None

    def remaining(self, now: Instant) -> float | None:
        """Seconds the access token still lives (None: no lifetime given). Pure."""
        if self._lease is None:
            return None
        return self._lease.remaining(now)

    @property
    def refresh_error(self) -> str | None:
        """Why the last refresh failed; None once one succeeds."""
        return self._refresh_error

    def settled(self) -> bool:
        """Nothing out that may bring tokens (a refresh, a poll), and nothing unsaved:
        stopping now loses no sign-in."""
        return self._unsaved_retry_at is None and not any(
            out.purpose in ("refresh", "poll") for out in self._out.values())

    @property
    def refreshing(self) -> bool:
        """A refresh is out (or waits for the endpoints), or its tokens are on their way
        to disk (not served yet)."""
        return (self.states[Region.TOKENS] == T.SAVING or self._refresh_after_discovery
                or any(out.purpose == "refresh" for out in self._out.values()))

    @property
    def device_code(self) -> str | None:
        """The device code being polled. A secret: whoever holds it collects the tokens
        once the person approves. For redaction only."""
        return self._poll.authorization.device_code if self._poll is not None else None

    def why_no_refresh(self, now: Instant) -> str | None:
        """Why a refresh asked for now does not start (the minimum gap or the back-off),
        or None when nothing holds it back."""
        creds = self.credentials
        if creds is not None and creds.tokens.refresh_token is None:
            return "there is no refresh token (the provider issued none, or refused it)"
        gap = self._gap_left(now.mono)
        if gap > 0:
            return (f"refreshed {self._refresh_gap() - gap:.1f} s ago; the next refresh can "
                    f"start in {gap:.1f} s")
        if self._in_refresh_backoff(now.mono):
            assert self._refresh_retry_at is not None
            return (f"refresh failed: {self._refresh_error or 'the provider is not answering'}"
                    f"; next try in {self._refresh_retry_at - now.mono:.0f} s")
        if self.states[Region.ENDPOINTS] != E.KNOWN and now.mono < self._discovery_retry_at:
            return (f"the provider's metadata cannot be read ({self._refresh_error or '?'}); "
                    f"next try in {self._discovery_retry_at - now.mono:.0f} s")
        return None

    def token_for(self, min_ttl: float, now: Instant, *, refreshed: bool = False
                  ) -> TokenSet | Refresh:
        """The token to hand a caller who needs `min_ttl` more seconds, or `Refresh`
        when a refresh (in flight, or to start) should come first. Raises NotSignedIn,
        MinTtlTooLong or ProviderUnavailable. `refreshed`: a refresh already ran for
        this caller, so another is not worth waiting for."""
        creds = self.credentials
        if creds is None or self._lease is None:
            raise NotSignedIn(not_signed_in_reason(self.snapshot))
        left = self._lease.remaining(now)
        if left is None or left > min_ttl:
            return creds.tokens
        lifetime = self._lease.lifetime
        if lifetime is not None and 0 < lifetime <= min_ttl:
            raise MinTtlTooLong(
                f"min_ttl {min_ttl:.0f} s is not below the provider's token lifetime "
                f"({lifetime:.0f} s)")
        if creds.tokens.refresh_token is None:
            if left > 0:
                raise ProviderUnavailable(
                    f"the token lives {left:.0f} s, less than the {min_ttl:.0f} s asked for, "
                    "and there is no refresh token")
            raise NotSignedIn("the token expired and there is no refresh token")
        if self.refreshing and not refreshed:
            return Refresh()
        gap = self._gap_left(now.mono)
        if gap > 0 and not refreshed:
            raise ProviderUnavailable(
                f"refreshed {self._refresh_gap() - gap:.1f} s ago, and the token still "
                f"lives less than the {min_ttl:.0f} s asked for; next refresh in "
                f"{gap:.1f} s")
        if refreshed or self._in_refresh_backoff(now.mono):
            why = self._refresh_error or "the provider is not answering"
            retry = ""
            if self._refresh_retry_at is not None and self._refresh_retry_at > now.mono:
                retry = f"; next try in {self._refresh_retry_at - now.mono:.0f} s"
            raise ProviderUnavailable(f"refresh failed: {why}{retry}")
        return Refresh()

    def next_code_in(self, now: Instant) -> float:
        """Seconds until the next code can come (0: now, or one is on its way)."""
        if self.states[Region.SIGN_IN] in (S.REQUESTING, S.AWAITING_USER, S.POLLING):
            return 0.0
        at = self._next_code_at() or self._budget.next_allowed(now.mono)
        return max(0.0, at - now.mono)

    # -- table ---------------------------------------------------------------------

    def _check(self, region: Region, trigger: str, target: State | None = None) -> Row:
        state = self.states[region]
        row = TRANSITIONS.get((region, state, trigger))
        if row is None or (target is not None and target not in row.targets):
            raise IllegalInput(
                f"{region.value}: {trigger!r} is not accepted in state {state.value}"
                + (f" (towards {target.value})" if target is not None else ""))
        return row

    def _go(self, region: Region, trigger: str, target: State) -> None:
        self._check(region, trigger, target)
        self.states[region] = target

    def _running(self, what: str) -> None:
        if self.states[Region.RUN] != R.RUNNING:
            raise IllegalInput(f"{what}: the agent is stopping")

    def _log(self, level: int, message: str) -> None:
        self._effects.append(Log(level=level, message=message))

    def _finding(self, key: str, message: str) -> None:
        """A provider setup problem, said once per run."""
        if key not in self._findings:
            self._findings.add(key)
            self._log(logging.WARNING, message)

    def _send(self, request: HttpRequest, out: _Out) -> int:
        self._ids += 1
        self._out[self._ids] = out
        self._effects.append(Send(request_id=self._ids, request=request, purpose=out.purpose))
        return self._ids

    def _outgoing(self, purpose: str, *, poll: DevicePoll | None = None,
                  tokens: TokenSet | None = None,
                  revocation: PendingRevocation | None = None) -> _Out:
        return _Out(purpose=purpose, sent=self._now, logout_epoch=self._logout_epoch,
                    poll=poll, tokens=tokens, revocation=revocation)

    def _take(self, request_id: int) -> _Out:
        out = self._out.pop(request_id, None)
        if out is None:
            raise IllegalInput(f"no request {request_id} is in flight")
        return out

    # -- start ---------------------------------------------------------------------

    def _start(self, event: Start) -> None:
        if self._started:
            raise IllegalInput("Start twice")
        now = self._now
        self._started = True
        self._started_at = now.mono
        self._last_check = now.mono
        record = event.record
        self._loaded_spent = tuple(sorted(record.codes_spent))
        self._start_offset = now.wall - now.mono
        self._budget.reset(self._loaded_times(now))
        if record.throttle_until is not None and record.throttle_until > now.wall:
            step = record.throttle_delay or self.settings.throttle_backoff
            # Capped by the step itself, so a clock that was far ahead cannot hold us.
            self._throttle_until = now.mono + min(record.throttle_until - now.wall, step * 1.25)
            self._throttle_step = min(step, self.settings.throttle_backoff_max)
            self._wait_phase = Phase.THROTTLED
        self._unused_codes = record.codes_expired_unused
        self._revocations = list(record.pending_revocations)
        creds = event.credentials
        owed = {item.token for item in self._revocations}
        if creds is not None and ({creds.tokens.refresh_token, creds.tokens.access_token}
                                  & owed):
            # Signed out before, but the file outlived it: those tokens are being revoked.
            self._log(logging.WARNING, "the stored credentials were signed out before; "
                      "removing them")
            self._effects.append(Clear())
            creds = None
        if creds is not None:
            lease = Lease.stored(creds.tokens, now)
            left = lease.remaining(now)
            if left is not None and left <= 0 and creds.tokens.refresh_token is None:
                self._log(logging.INFO,
                          "stored token expired and cannot be refreshed; signing in anew")
                self._effects.append(Clear())
            else:
                self._go(Region.TOKENS, "loaded", T.VALID)
                self.credentials, self._lease = creds, lease
                due = self._refresh_due_at_raw()
                if due is not None and due <= now.mono:
                    self._refresh_not_before = (
                        lease, now.mono + self._rng.uniform(0, _start_spread(left)))
                self._log(logging.INFO, f"loaded credentials for "
                          f"{user_label(creds) or 'unknown user'} (token "
                          f"{fingerprint(creds.tokens.access_token)}), "
                          f"valid for {duration(left)}")
        if record.pending_code is not None and self._resume(record.pending_code):
            return
        if self.credentials is None:
            self._want_sign_in()

    def _loaded_times(self, now: Instant) -> list[float]:
        # A time in the future means the wall clock is behind: count it as now, until
        # a jump re-derives it.
        return [min(now.mono, now.mono_at(spent)) for spent in self._loaded_spent]

    def _resume(self, code: PendingCode) -> bool:
        now = self._now
        lifetime = code.expires_at - code.issued_at
        left = min(code.expires_at - now.wall, lifetime)
        if left < MIN_RESUME_LEFT or lifetime <= 0:
            return False
        authorization = DeviceAuthorization(
            device_code=code.device_code, user_code=code.user_code,
            verification_uri=code.verification_uri,
            verification_uri_complete=code.verification_uri_complete,
            expires_in=lifetime, interval=code.interval,
            issued_at=now.mono + left - lifetime)
        self._go(Region.SIGN_IN, "resume", S.AWAITING_USER)
        self._poll = self._new_poll(authorization, scope=code.scope)
        # §3.5: at least `interval` before the first poll after the restart too, and a
        # random part of one more: devices restarted together (power back at a site)
        # would otherwise poll in step from then on.
        self._poll.next_poll_at = max(self._poll.next_poll_at,
                                      now.mono + code.interval * (1.0 + self._rng.random()))
        self._log(logging.INFO, f"resuming code {code.user_code} "
                  f"(valid for {duration(left)})")
        return True

    def _new_poll(self, authorization: DeviceAuthorization, *, scope: str | None) -> DevicePoll:
        endpoints = self.endpoints
        token = endpoints.token if endpoints else (self.settings.endpoints.token or "")
        return DevicePoll(authorization, client=self.settings.client, token_endpoint=token,
                          scope=scope)

    # -- requests from people and programs -----------------------------------------

    def _want_sign_in(self) -> None:
        if self.states[Region.SIGN_IN] == S.IDLE:
            self._go(Region.SIGN_IN, "wanted",
                     S.BUTTON if self._wait_for_press() else S.WAITING)

    def _wait_for_press(self) -> bool:
        return self.settings.button and self._unused_codes >= UNUSED_CODES_BEFORE_BUTTON

    def _login(self, new_sign_in: bool) -> None:
        self._running("login")
        state = self.states[Region.SIGN_IN]
        # The person is here: unused codes before this do not count against the button.
        self._unused_codes = 0
        if state == S.IDLE:
            if not new_sign_in and self.credentials is not None:
                return  # a short press while signed in does nothing
            self._go(Region.SIGN_IN, "wanted", S.WAITING)
            self._pause_until = None
            self._forced_try()
            return
        if state in (S.AWAITING_USER, S.POLLING):
            self._poll = None
        self._go(Region.SIGN_IN, "login", S.REQUESTING if state == S.REQUESTING else S.WAITING)
        self._pause_until = None
        self._forced_try()

    def _forced_try(self) -> None:
        """During a throttle back-off, a person's request tries at once (a refused try
        costs nothing at authentik), at most once a minute."""
        now = self._now.mono
        if self._throttle_until is None or self._throttle_until <= now:
            return
        if self._last_forced_try is None or now - self._last_forced_try >= FORCED_TRY_GAP:
            self._throttle_until = now
            self._last_forced_try = now
        else:
            self._throttle_until = min(self._throttle_until,
                                       self._last_forced_try + FORCED_TRY_GAP)

    def _logout(self) -> None:
        self._running("logout")
        self.logout_problems = []
        self._revocations_tried = set()
        creds = self.credentials
        # In flight: a refresh, or a poll that may bring an approval.
        in_flight = any(out.purpose in ("refresh", "poll") for out in self._out.values())
        if creds is None and not in_flight:
            self._log(logging.INFO, "sign-out asked while not signed in; nothing to revoke")
            self._go(Region.SIGN_IN, "signed_out", self.states[Region.SIGN_IN])
            return
        # Every answer to a request sent before this moment is now stale.
        self._logout_epoch += 1
        if creds is None:
            # Not signed in: the code stays on screen and no code is spent; only an
            # approval already on its way is overtaken (and revoked when it lands).
            self._go(Region.SIGN_IN, "signed_out", self.states[Region.SIGN_IN])
            return
        self._owe_revocation(creds.tokens)
        self._go(Region.TOKENS, "logout", T.NONE)
        self._drop_credentials()
        self._effects.append(Clear())
        self._go(Region.SIGN_IN, "signed_out", S.WAITING)
        self._poll = None
        self._pause_until = None
        self._log(logging.INFO, "signed out; local credentials removed")

    def logout_settled(self) -> bool:
        """Every answer a sign-out waits for has come: the refreshes and polls that were
        in flight, and one try of each revocation it owes."""
        if any(out.logout_epoch != self._logout_epoch for out in self._out.values()
               if out.purpose in ("refresh", "poll")):
            return False
        return all(item in self._revocations_tried for item in self._revocations)

    def _drop_credentials(self) -> None:
        self.credentials = None
        self._lease = None
        self._unsaved_retry_at = None
        self._refresh_retry_at = None
        self._refresh_error = None
        self._refresh_backoff.reset()

    def _owe_revocation(self, tokens: TokenSet, *, access: bool = True) -> None:
        owed = [PendingRevocation(token=tokens.refresh_token, hint="refresh_token")
                if tokens.refresh_token else None,
                PendingRevocation(token=tokens.access_token, hint="access_token")
                if access else None]
        for item in owed:
            if item is not None and item not in self._revocations:
                self._revocations.append(item)
        self._revoke_retry_at = self._now.mono
        self._revoke_backoff.reset()

    # -- what is due ---------------------------------------------------------------

    def _advance(self) -> None:
        """Start whatever is due. Called after every input: timers are just times."""
        now = self._now
        self._last_check = now.mono
        if self._lease is not None:
            jump = self._lease.jumped(now)
            rebased = self._lease.rebased(now)
            if rebased is not self._lease:
                self._log(logging.WARNING,
                          f"the wall clock moved by {jump:+.0f} s; re-checking the token's "
                          "expiry")
                self._lease = rebased
        offset = now.wall - now.mono
        if self._loaded_spent and abs(offset - self._start_offset) >= CLOCK_JUMP:
            # NTP corrected a clock that was wrong at boot: the codes spent before the
            # restart are placed again by the corrected clock.
            self._start_offset = offset
            run_spent = [t for t in self._budget.spent if t >= self._started_at]
            self._budget.reset([*self._loaded_times(now), *run_spent])
        self._expire_unrefreshable()
        if self.states[Region.RUN] == R.STOPPING:
            return
        if (self._unsaved_retry_at is not None and self._unsaved_retry_at <= now.mono
                and self.states[Region.TOKENS] == T.VALID):
            self._rewrite()
        due = self._refresh_due_at()
        if due is not None and due <= now.mono:
            self._start_refresh()
        # A code that just ended may let the next one start at once.
        for _ in range(3):
            before = self.states[Region.SIGN_IN]
            self._code_step()
            if self.states[Region.SIGN_IN] == before:
                break
        due = self._revocation_due_at()
        if due is not None and due <= now.mono:
            self._send_revocations()

    def _expire_unrefreshable(self) -> None:
        creds, lease = self.credentials, self._lease
        if (creds is None or lease is None or creds.tokens.refresh_token is not None
                or self.states[Region.TOKENS] != T.VALID):
            return
        left = lease.remaining(self._now)
        if left is None or left > 0:
            return
        self._go(Region.TOKENS, "expired", T.NONE)
        self._log(logging.INFO, "the token expired and there is no refresh token; "
                  "signing in anew")
        self._drop_credentials()
        self._effects.append(Clear())
        self._want_sign_in()

    def _need_endpoints(self) -> Endpoints | None:
        """The endpoints, or None while they are being found (discovery is started)."""
        state = self.states[Region.ENDPOINTS]
        if state == E.KNOWN:
            return self.endpoints
        if state == E.DISCOVERING or self._now.mono < self._discovery_retry_at:
            return None
        self._discovery = Discovery(self.settings.issuer, self.settings.endpoints,
                                    allow_insecure_http=self.settings.allow_insecure_http)
        step = self._discovery.first()
        if step.request is not None:
            self._go(Region.ENDPOINTS, "needed", E.DISCOVERING)
            self._send(step.request, self._outgoing("discovery"))
            return None
        if step.endpoints is not None:
            self._go(Region.ENDPOINTS, "needed", E.KNOWN)
            self._endpoints_found(step.endpoints)
            return self.endpoints
        self._go(Region.ENDPOINTS, "needed", E.MISCONFIGURED)
        self._discovery_failed(str(step.error), misconfigured=True)
        return None

    def _endpoints_found(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self._discovery_backoff.reset()
        if self._poll is not None:
            # The same poll, its interval and next poll time kept: only where it goes.
            self._poll.token_endpoint = endpoints.token
        if ("offline_access" in self.settings.scopes and endpoints.scopes_supported is not None
                and "offline_access" not in endpoints.scopes_supported):
            self._finding(
                "no-offline-scope",
                "the provider does not list the offline_access scope, so it may issue no "
                "refresh token (authentik: add the offline_access scope mapping to the "
                "provider)")
        if self._refresh_after_discovery:
            self._refresh_after_discovery = False
            self._start_refresh()

    def _discovery_failed(self, reason: str, *, misconfigured: bool) -> None:
        self._refresh_after_discovery = False
        if misconfigured:
            delay = self.settings.retry_max
            self._log(logging.ERROR, f"provider metadata: {reason}; fix provider.issuer "
                      f"(asked again in {duration(delay)})")
        else:
            delay = self._discovery_backoff.next_delay()
            self._log(logging.WARNING, f"cannot read the provider's metadata ({reason}); "
                      f"retrying in {delay:.0f} s")
        self._discovery_retry_at = self._now.mono + delay
        if self.states[Region.SIGN_IN] == S.WAITING:
            self._wait_phase = Phase.CONFIG_ERROR if misconfigured else Phase.NO_NETWORK
            self._sign_in_error = reason
            self._sign_in_cause = self._cause
        if self.credentials is not None and self._refresh_due_at_raw() is not None:
            self._refresh_error = reason

    # -- sign-in -------------------------------------------------------------------

    def _next_code_at(self) -> float | None:
        if self.states[Region.SIGN_IN] != S.WAITING:
            return None
        at = self._budget.next_allowed(self._now.mono)
        for hold in (self._throttle_until, self._pause_until):
            if hold is not None:
                at = max(at, hold)
        if self.states[Region.ENDPOINTS] in (E.UNKNOWN, E.MISCONFIGURED):
            at = max(at, self._discovery_retry_at)
        return at

    def _poll_due_at(self) -> float | None:
        if self.states[Region.SIGN_IN] != S.AWAITING_USER or self._poll is None:
            return None
        return min(self._poll.next_poll_at, self._poll.deadline)

    def _code_step(self) -> None:
        state = self.states[Region.SIGN_IN]
        now = self._now.mono
        if state == S.WAITING:
            at = self._next_code_at()
            if at is None or at > now:
                return
            endpoints = self._need_endpoints()
            if endpoints is None:
                return
            self._go(Region.SIGN_IN, "due", S.REQUESTING)
            self._budget.spend(now)
            self._device_out = self._outgoing("device")
            self._send(device_authorization_request(
                self.settings.client, endpoints.device_authorization, self.settings.scopes),
                self._device_out)
        elif state == S.AWAITING_USER and self._poll is not None:
            poll = self._poll
            if poll.expired(now):
                self._code_expired(S.AWAITING_USER, by_provider=False)
                return
            if poll.next_poll_at > now:
                return
            endpoints = self._need_endpoints()
            if endpoints is None:
                return
            self._go(Region.SIGN_IN, "poll_due", S.POLLING)
            self._send(poll.request(), self._outgoing("poll", poll=poll))

    def _code_issued(self, authorization: DeviceAuthorization) -> None:
        self._go(Region.SIGN_IN, "code", S.AWAITING_USER)
        self._code_backoff.reset()
        self._throttle_step = None
        self._throttle_until = None
        self._sign_in_error = None
        self._poll = self._new_poll(authorization, scope=" ".join(self.settings.scopes) or None)
        if authorization.expires_in < SHORT_CODE_LIFETIME:
            self._finding(
                "short-code",
                f"codes expire after {authorization.expires_in:.0f} s, too short to read, "
                "unlock a phone and approve; give codes at least 5 minutes (authentik: "
                "raise the provider's Access code validity, e.g. minutes=10)")
        self._log(logging.INFO, f"code {authorization.user_code}: open "
                  f"{authorization.verification_uri} and enter it (valid for "
                  f"{authorization.expires_in:.0f} s)")

    def _code_over(self, trigger: str, target_if_out: SignInState) -> None:
        """A code ended unused (expired or denied) in `trigger`'s row."""
        self._poll = None
        creds = self.credentials
        if creds is not None and creds.tokens.refresh_token is not None:
            # A new sign-in asked for while signed in, and nobody completed it: the
            # current sign-in stays. (Credentials that cannot be refreshed end soon, so
            # for them the sign-in goes on.)
            self._go(Region.SIGN_IN, trigger, S.IDLE)
            self._log(logging.INFO, "the new sign-in was not completed; keeping the current one")
            return
        self._go(Region.SIGN_IN, trigger, target_if_out)

    def _code_expired(self, state: SignInState, *, by_provider: bool) -> None:
        self._log(logging.INFO, "code expired ("
                  + ("provider said so" if by_provider else "its lifetime passed") + ")")
        self._unused_codes += 1
        self._code_over("code_expired", S.BUTTON if self._wait_for_press() else S.WAITING)
        if self.states[Region.SIGN_IN] == S.BUTTON:
            self._log(logging.INFO, f"{self._unused_codes} codes expired unused; waiting "
                      "for a button press before spending another (RFC 8628 §3.5)")
        self._wait_phase = Phase.CODE_EXPIRED

    def _device_answer(self, response: HttpResponse) -> None:
        event = receive_device_authorization(response, now=self._now.mono,
                                             now_wall=self._now.wall)
        match event:
            case CodeIssued(authorization=authorization):
                self._code_issued(authorization)
            case Throttled(retry_after=hint):
                self._go(Region.SIGN_IN, "throttled", S.WAITING)
                self._budget.refund()
                step = self._throttle_step or self.settings.throttle_backoff
                # Retry-After is a floor only up to the back-off's cap: a refused try
                # costs nothing, and a header (or a wall clock far behind the provider's
                # Retry-After date) must not keep codes away for a day.
                floor = min(hint or 0.0, self.settings.throttle_backoff_max)
                delay = jittered(max(step, floor), self._rng)
                self._throttle_step = min(step * 2, self.settings.throttle_backoff_max)
                self._throttle_until = self._now.mono + delay
                self._wait_phase = Phase.THROTTLED
                self._sign_in_error = "provider busy"
                self._log(logging.WARNING, f"the provider is rationing device codes (HTTP "
                          f"{response.status}); next try in {duration(delay)}")
            case ServerTrouble(reason=reason, retry_after=hint):
                if response.status >= 500:
                    # A proxy's 502/503/504 while authentik is away: no code was issued
                    # and authentik counted nothing. (A garbled 200 may have been
                    # counted, so it stays spent.)
                    self._budget.refund()
                self._sign_in_trouble(reason, hint)
            case Rejected(error=error):
                self._go(Region.SIGN_IN, "refused", S.WAITING)
                self._refused(error, "device authorization")

    def _sign_in_trouble(self, reason: str, hint: float | None) -> None:
        self._go(Region.SIGN_IN, "trouble", S.WAITING)
        # Retry-After is a floor with jitter on top: a fleet given one hint spreads out.
        floor = jittered(min(hint, self.settings.retry_max), self._rng) if hint else 0.0
        delay = self._code_backoff.next_delay(floor=floor)
        self._pause_until = self._now.mono + delay
        self._wait_phase = Phase.NO_NETWORK
        self._sign_in_error = reason
        self._sign_in_cause = self._cause
        self._log(logging.WARNING, f"cannot get a code ({reason}); retrying in {delay:.0f} s")

    def _refused(self, error: OAuthError, what: str) -> None:
        message = f"{what} refused: {error}"
        if error.code == "invalid_client":
            message += " (is provider.client_id right, and is the application bound to it?)"
        self._log(logging.ERROR, message)
        self._pause_until = self._now.mono + self.settings.retry_max
        self._wait_phase = Phase.CONFIG_ERROR
        self._sign_in_error = message

    def _poll_answer(self, out: _Out, response: HttpResponse | None, error: str | None) -> None:
        poll = out.poll
        assert poll is not None
        now = self._now
        current = poll is self._poll and self.states[Region.SIGN_IN] == S.POLLING
        event: PollEvent
        if response is None:
            event = poll.connection_failed(error or "no answer", now=now.mono)
        else:
            # now_wall: the time the poll was sent, so expiry counts the time on the way.
            event = poll.receive(response, now=now.mono, now_wall=out.sent.wall)
        if isinstance(event, Approved):
            self._approved(event, out, current=current)
            return
        if not current:
            return  # an abandoned code: only an approval of it still matters
        match event:
            case Pending() | SlowDown() | ServerTrouble():
                self._go(Region.SIGN_IN, "pending", S.AWAITING_USER)
                if isinstance(event, SlowDown):
                    self._log(logging.INFO, f"provider asked to slow down; polling every "
                              f"{event.interval:.0f} s")
                elif isinstance(event, ServerTrouble):
                    self._log(logging.WARNING, f"polling trouble ({event.reason}); next poll "
                              f"in {poll.next_poll_at - now.mono:.0f} s")
                if poll.expired(now.mono):
                    self._code_expired(S.AWAITING_USER, by_provider=False)
            case Denied(description=description):
                self._log(logging.WARNING, "sign-in was denied"
                          + (f": {description}" if description else ""))
                self._code_over("denied", S.WAITING)
                self._pause_until = now.mono + DENIED_PAUSE
                self._wait_phase = Phase.DENIED
                self._sign_in_error = description or "access denied"
            case Expired(by_provider=by_provider):
                self._code_expired(S.POLLING, by_provider=by_provider)
            case Rejected(error=oauth_error):
                self._poll = None
                self._go(Region.SIGN_IN, "refused", S.WAITING)
                self._refused(oauth_error, "token polling")

    def _approved(self, event: Approved, out: _Out, *, current: bool) -> None:
        tokens = event.tokens
        for note in event.notes:
            self._log(logging.WARNING, f"token answer: {note}")
        if out.logout_epoch != self._logout_epoch:
            # Approved before a sign-out, answered after it: sign-out wins.
            self._check(Region.TOKENS, "stale_answer")
            self._owe_revocation(tokens)
            self._log(logging.INFO, "an approval landed after sign-out; revoking its tokens")
            if current:
                self._poll = None
                self._go(Region.SIGN_IN, "approval_revoked", S.WAITING)
            return
        self._check(Region.TOKENS, "approved")
        self._go(Region.SIGN_IN, "approved" if current else "not_wanted", S.IDLE)
        self._poll = None
        self._unused_codes = 0
        self._pause_until = None
        self._sign_in_error = None
        self._wait_phase = Phase.STARTING
        tokens, claims = self._checked_id_token(tokens, previous=None)
        creds = Credentials(tokens=tokens, client_id=self.settings.client.client_id,
                            issuer=self._issuer(), claims=claims,
                            machine_id=self.settings.machine_id)
        previous = self.credentials
        replaced = previous.tokens if previous is not None and (
            previous.tokens.refresh_token != tokens.refresh_token) else None
        self._save("approved", creds, Lease.issued(tokens, out.sent), revoke=replaced,
                   userinfo=True)

    # -- tokens --------------------------------------------------------------------

    def _still_usable(self) -> bool:
        creds, lease = self.credentials, self._lease
        if creds is None or lease is None:
            return False
        left = lease.remaining(self._now)
        return left is None or left > 0 or creds.tokens.refresh_token is not None

    def _issuer(self) -> str | None:
        return self.settings.issuer or (self.endpoints.issuer if self.endpoints else None)

    def _checked_id_token(self, tokens: TokenSet, *, previous: TokenSet | None
                          ) -> tuple[TokenSet, dict[str, str]]:
        """The tokens with only an ID token that passed OpenID Connect's checks, and its
        claims. A failed check drops the ID token, never the access and refresh tokens
        of the same answer: the provider has rotated by then. After a refresh that
        brought no ID token, the old one is not served as if it were current."""
        id_token = tokens.id_token
        if id_token is None or (previous is not None and id_token == previous.id_token):
            return replace(tokens, id_token=None), {}
        claims, problem = check_id_token(id_token, issuer=self._issuer(),
                                         client_id=self.settings.client.client_id,
                                         now_wall=self._now.wall)
        if problem is not None:
            self._log(logging.WARNING, f"{problem}; the ID token and its claims are dropped "
                      "(the access and refresh tokens are kept)")
            return replace(tokens, id_token=None), {}
        return tokens, claims

    def _save(self, trigger: str, creds: Credentials, lease: Lease, *,
              revoke: TokenSet | None = None, userinfo: bool = False) -> None:
        self._go(Region.TOKENS, trigger, T.SAVING)
        self._ids += 1
        self._saving = _Write(write_id=self._ids, credentials=creds, lease=lease,
                              revoke=revoke, userinfo=userinfo)
        self._effects.append(Save(write_id=self._ids, credentials=creds))

    def _rewrite(self, creds: Credentials | None = None) -> None:
        creds = creds or self.credentials
        assert creds is not None and self._lease is not None
        self._save("rewrite", creds, self._lease)

    def _saved(self, write_id: int, failure: str | None) -> None:
        write = self._saving
        if write is None or write.write_id != write_id:
            raise IllegalInput(f"no write {write_id} is under way")
        self._go(Region.TOKENS, "saved" if failure is None else "save_failed", T.VALID)
        self._saving = None
        if failure is not None:
            # The provider has already revoked the old refresh token: these are the only
            # valid credentials, so they are used, kept in memory and written again.
            self._log(logging.ERROR, f"could not save the credentials ({failure}); keeping "
                      "them in memory and retrying")
            self._unsaved_retry_at = self._now.mono + RECHECK_INTERVAL
        else:
            self._unsaved_retry_at = None
        was_signed_in = self.credentials is not None
        self.credentials, self._lease = write.credentials, write.lease
        if write.revoke is not None:
            self._replaced = write.revoke
        if failure is None and self._replaced is not None:
            # RFC 7009: the previous sign-in is over; its refresh token must not linger.
            # Only once the new one is on disk: until then the file still holds the old.
            self._owe_revocation(self._replaced, access=False)
            self._replaced = None
        if write.userinfo:
            tokens = write.credentials.tokens
            if tokens.refresh_token is None:
                self._finding(
                    "no-refresh-token",
                    "no refresh token was issued, so a new sign-in is needed when this token "
                    "expires; request the offline_access scope, and let the provider grant it "
                    "(authentik: add the offline_access scope mapping to the provider)")
            self._log(logging.INFO, f"signed in as "
                      f"{user_label(write.credentials) or 'unknown user'} (token "
                      f"{fingerprint(tokens.access_token)}, valid for "
                      f"{duration(write.lease.remaining(self._now))})"
                      + ("; the previous sign-in is replaced" if was_signed_in else ""))
            # After the write: a stop during userinfo loses nothing.
            self._ask_userinfo()

    def _refresh_due_at_raw(self) -> float | None:
        creds, lease = self.credentials, self._lease
        if creds is None or lease is None or creds.tokens.refresh_token is None:
            return None
        if lease.deadline is None or lease.lifetime is None:
            return (self._last_refresh or lease.start) + UNKNOWN_LIFETIME_REFRESH
        lease = lease.rebased(self._now)
        assert lease.deadline is not None and lease.lifetime is not None
        margin = self.settings.refresh_margin
        if margin is None:
            margin = self.settings.refresh_margin_ratio * lease.lifetime
        # A margin as long as the lifetime would refresh again the moment a refresh
        # lands; half the lifetime is the most that still lets a token be used.
        due = lease.deadline - min(margin, 0.5 * lease.lifetime)
        if self._last_refresh is not None:
            due = max(due, self._last_refresh + self._refresh_gap())
        return due

    def _refresh_gap(self) -> float:
        """The least time between two refreshes, scheduled or asked for by a caller: it
        scales down with short lifetimes (5 s tokens must not stay expired half the
        time), and holds a caller looping on a min_ttl near the lifetime to one
        refresh per gap instead of one per call."""
        lifetime = self._lease.lifetime if self._lease is not None else None
        return MIN_REFRESH_GAP if not lifetime else min(MIN_REFRESH_GAP, lifetime / 4)

    def _gap_left(self, now: float) -> float:
        if self._last_refresh is None:
            return 0.0
        return max(0.0, self._last_refresh + self._refresh_gap() - now)

    def _refresh_due_at(self) -> float | None:
        if self.states[Region.TOKENS] != T.VALID:
            return None
        due = self._refresh_due_at_raw()
        if due is None:
            return None
        if self._refresh_retry_at is not None:
            due = max(due, self._refresh_retry_at)
        if self._refresh_not_before is not None and self._refresh_not_before[0] is self._lease:
            due = max(due, self._refresh_not_before[1])
        return due

    def _in_refresh_backoff(self, now: float) -> bool:
        return self._refresh_retry_at is not None and now < self._refresh_retry_at

    def _start_refresh(self) -> None:
        state = self.states[Region.TOKENS]
        creds = self.credentials
        if state != T.VALID or creds is None or creds.tokens.refresh_token is None:
            return  # in flight already (shared), saving, or nothing to refresh with
        if self._in_refresh_backoff(self._now.mono) or self._gap_left(self._now.mono) > 0:
            return  # callers get provider_unavailable at once (token_for says so)
        endpoints = self._need_endpoints()
        if endpoints is None:
            self._refresh_after_discovery = self.states[Region.ENDPOINTS] == E.DISCOVERING
            return
        self._go(Region.TOKENS, "refresh", T.REFRESHING)
        self._refresh_not_before = None
        self._send(refresh_request(creds.tokens, client=self.settings.client,
                                   token_endpoint=endpoints.token),
                   self._outgoing("refresh", tokens=creds.tokens))

    def _refresh_answer(self, out: _Out, response: HttpResponse | None, error: str | None) -> None:
        now = self._now
        creds = self.credentials
        sent_with = out.tokens
        assert sent_with is not None
        current = (creds is not None and out.logout_epoch == self._logout_epoch
                   and creds.tokens.refresh_token == sent_with.refresh_token
                   and self.states[Region.TOKENS] == T.REFRESHING)
        if response is None:
            event: Refreshed | RefreshRejected | Rejected | ServerTrouble = ServerTrouble(
                reason=error or "no answer")
        else:
            # now_wall: the time it was sent, so the time on the way counts against it.
            event = receive_refresh(response, previous=sent_with, now_wall=out.sent.wall)
        self.refreshes_done += 1
        if not current:
            # Compare before clearing: an answer for credentials that are gone never
            # touches the ones held now.
            self._check(Region.TOKENS, "stale_answer")
            if isinstance(event, Refreshed):
                # Signed out, or signed in anew, while this was in flight: the tokens it
                # brings belong to nobody now and must not outlive the agent's interest.
                self._owe_revocation(event.tokens)
                self._log(logging.INFO, "a refresh landed for credentials that are gone; "
                          "revoking what it brought")
            elif isinstance(event, ServerTrouble) and event.refresh_token is not None:
                self._owe_revocation(replace(sent_with, refresh_token=event.refresh_token),
                                     access=False)
                self._log(logging.INFO, "a refresh landed for credentials that are gone; "
                          "revoking the refresh token it brought")
            return
        assert creds is not None
        match event:
            case Refreshed(tokens=tokens):
                tokens, fresh_claims = self._checked_id_token(tokens, previous=sent_with)
                new = replace(creds, tokens=tokens, claims={**creds.claims, **fresh_claims})
                self._last_refresh = now.mono
                self._refresh_retry_at = None
                self._refresh_error = None
                self._refresh_backoff.reset()
                lease = Lease.issued(tokens, out.sent)
                # The save first: with strict rotation the provider's answer is the only
                # copy of the refresh token until it is on disk, and a log line written
                # to a slow journal would sit inside that window.
                self._save("refreshed", new, lease)
                for note in event.notes:
                    self._log(logging.WARNING, f"token answer: {note}")
                self._log(logging.INFO, f"refreshed (token {fingerprint(tokens.access_token)}"
                          f", valid for {duration(lease.remaining(now))})")
            case RefreshRejected(error=oauth_error):
                left = self._lease.remaining(now) if self._lease else None
                self._log(logging.WARNING, f"the refresh token was refused ({oauth_error}); "
                          "signing in anew")
                dead = replace(creds, tokens=replace(creds.tokens, refresh_token=None))
                if left is not None and left > 0:
                    self._go(Region.TOKENS, "refresh_refused", T.VALID)
                    self._refresh_error = f"refresh refused: {oauth_error}"
                    # Written without the dead token, so a restart never sends it again.
                    self._rewrite(dead)
                else:
                    self._go(Region.TOKENS, "refresh_refused", T.NONE)
                    self._drop_credentials()
                    self._effects.append(Clear())
                self._want_sign_in()
                if self.states[Region.SIGN_IN] == S.WAITING:
                    self._pause_until = None
            case Rejected(error=oauth_error):
                self._go(Region.TOKENS, "refused", T.VALID)
                self._refresh_error = f"refresh refused: {oauth_error}"
                self._refresh_retry_at = now.mono + self.settings.refresh_retry_max
                self._log(logging.ERROR, self._refresh_error)
            case ServerTrouble(reason=reason, retry_after=hint, refresh_token=rotated):
                self._go(Region.TOKENS, "trouble", T.VALID)
                left = self._lease.remaining(now) if self._lease else None
                delay = self._refresh_backoff.next_delay()
                if left is not None and left > 0:
                    delay = self._refresh_wait_while_valid(left, delay)
                if hint is not None:
                    delay = max(delay, jittered(min(hint, self.settings.refresh_retry_max),
                                                self._rng))
                self._refresh_retry_at = now.mono + delay
                self._refresh_error = reason
                if rotated is not None:
                    # The provider rotated and then sent no access token: the refresh
                    # token sent is dead, and the new one is all that keeps the sign-in.
                    # Written before anything is logged, as every rotated token is.
                    self._rewrite(replace(creds, tokens=replace(creds.tokens,
                                                                refresh_token=rotated)))
                state = (f"valid for {duration(left)}" if left is None or left > 0
                         else "expired")
                self._log(logging.WARNING, f"refresh failed ({reason}); token {state}; "
                          f"retrying in {delay:.0f} s")
                if rotated is not None:
                    self._log(logging.WARNING, "the refresh answer carried a new refresh "
                              "token but no access token; keeping the new refresh token")

    def _refresh_wait_while_valid(self, left: float, backoff: float) -> float:
        """How long a failed refresh waits while the access token still serves.

        The first QUICK_REFRESH_RETRIES retries take the back-off from retry_initial
        (about 2, 4, 8 s): a blip, or an answer lost after the provider rotated the
        refresh token, is found out at once. Later ones wait retry_max with equal
        jitter, never past a last try a random 30-60 s before expiry; within that last
        stretch, tries halve what is left. After an outage, a back-off still ramping up
        brings every device whose refresh fell due in its last minutes back in the
        first seconds, and a wait cut to a fraction of the time left does the same for
        every device near expiry; so they come back spread over retry_max and over
        their expiries, and each still tries before its token lapses.
        """
        wait = backoff
        if self._refresh_backoff.attempt > QUICK_REFRESH_RETRIES:
            longest = self.settings.refresh_retry_max
            wait = self._rng.uniform(longest / 2, longest)
        lead = LAST_TRY_LEAD * (1.0 + self._rng.random())
        if left > 2 * lead:
            return min(wait, left - lead)
        return min(wait, max(left / 2, self.settings.refresh_retry_initial))

    # -- userinfo and revocation ---------------------------------------------------

    def _ask_userinfo(self) -> None:
        creds = self.credentials
        endpoints = self.endpoints
        if creds is None or endpoints is None or endpoints.userinfo is None:
            return
        if "name" in creds.claims or "preferred_username" in creds.claims:
            return
        self._send(userinfo_request(creds.tokens, endpoint=endpoints.userinfo),
                   self._outgoing("userinfo", tokens=creds.tokens))

    def _userinfo_answer(self, out: _Out, response: HttpResponse | None,
                         error: str | None) -> None:
        creds = self.credentials
        if response is None:
            self._log(logging.INFO, f"userinfo unavailable ({error}); the user's name stays "
                      "unknown")
            return
        try:
            claims = receive_userinfo(response)
        except AgentError as exc:
            self._log(logging.INFO, f"userinfo unavailable ({exc}); the user's name stays "
                      "unknown")
            return
        if (creds is None or out.tokens is None or not claims
                or creds.tokens.access_token != out.tokens.access_token
                or self.states[Region.TOKENS] != T.VALID):
            return
        if not userinfo_matches(claims, creds.claims):
            self._log(logging.WARNING, "userinfo names another subject than the ID token "
                      "(OpenID Connect Core §5.3.2); its claims are not used")
            return
        self._rewrite(replace(creds, claims={**creds.claims, **claims}))

    def _revocation_due_at(self) -> float | None:
        if not self._revocations:
            return None
        if all(any(out.revocation == r for out in self._out.values())
               for r in self._revocations):
            return None
        return self._revoke_retry_at

    def _send_revocations(self) -> None:
        endpoints = self._need_endpoints()
        if endpoints is None:
            return
        if endpoints.revocation is None:
            if self._revocations:
                self._log(logging.WARNING, _NO_REVOCATION)
                if _NO_REVOCATION not in self.logout_problems:
                    self.logout_problems.append(_NO_REVOCATION)
            self._revocations = []
            return
        flying = {out.revocation for out in self._out.values() if out.revocation is not None}
        for item in self._revocations:
            if item in flying:
                continue
            self._send(
                revocation_request(item.token, hint=item.hint, client=self.settings.client,
                                   endpoint=endpoints.revocation),
                self._outgoing("revoke", revocation=item))

    def _revocation_answer(self, out: _Out, response: HttpResponse | None,
                           error: str | None) -> None:
        item = out.revocation
        assert item is not None
        self._revocations_tried.add(item)
        outcome: Rejected | ServerTrouble | None
        if response is None:
            outcome = ServerTrouble(reason=error or "no answer")
        else:
            outcome = receive_revocation(response)
        if outcome is None:
            self._revocations = [r for r in self._revocations if r != item]
            self._log(logging.INFO, f"revoked the {item.hint.replace('_', ' ')} at the "
                      "provider")
            return
        if isinstance(outcome, Rejected):
            # RFC 7009 §2.2.1: an error other than 503 will not mend by itself.
            self._revocations = [r for r in self._revocations if r != item]
            problem = f"revoking the {item.hint}: {outcome.error}"
        else:
            delay = self._revoke_backoff.next_delay(floor=1.0)
            self._revoke_retry_at = self._now.mono + delay
            problem = (f"revoking the {item.hint}: {outcome.reason}; retrying in the "
                       "background")
        self._log(logging.WARNING, problem)
        self.logout_problems.append(problem)

    # -- answers -------------------------------------------------------------------

    def _answered(self, out: _Out, response: HttpResponse) -> None:
        self._cause = Cause.PROVIDER
        self._dispatch(out, response, None)

    def _failed(self, out: _Out, error: TransportError) -> None:
        self._cause = (Cause.NAME if isinstance(error, NameNotResolved)
                       else Cause.TLS if isinstance(error, TLSFailed)
                       # It answered, with more than the cap: not the network.
                       else Cause.PROVIDER if isinstance(error, ResponseTooLarge)
                       else Cause.NETWORK)
        self._dispatch(out, None, str(error))

    def _dispatch(self, out: _Out, response: HttpResponse | None, error: str | None) -> None:
        match out.purpose:
            case "discovery":
                self._discovery_answer(response, error)
            case "device":
                if self.states[Region.SIGN_IN] != S.REQUESTING or out is not self._device_out:
                    return  # abandoned by a sign-out; the code (if any) is not shown
                if response is None:
                    # No answer: most such tries never reached the provider's counter.
                    self._budget.refund()
                    self._sign_in_trouble(error or "no answer", None)
                else:
                    self._device_answer(response)
            case "poll":
                self._poll_answer(out, response, error)
            case "refresh":
                self._refresh_answer(out, response, error)
            case "userinfo":
                self._userinfo_answer(out, response, error)
            case "revoke":
                self._revocation_answer(out, response, error)

    def _discovery_answer(self, response: HttpResponse | None, error: str | None) -> None:
        discovery = self._discovery
        assert discovery is not None
        if response is None:
            self._go(Region.ENDPOINTS, "trouble", E.UNKNOWN)
            self._discovery_failed(error or "no answer", misconfigured=False)
            return
        step = discovery.receive(response)
        if step.request is not None:
            self._go(Region.ENDPOINTS, "not_found", E.DISCOVERING)
            self._send(step.request, self._outgoing("discovery"))
        elif step.endpoints is not None:
            self._go(Region.ENDPOINTS, "found", E.KNOWN)
            for note in step.notes:
                self._log(logging.INFO, note)
            self._endpoints_found(step.endpoints)
        elif step.misconfigured:
            self._go(Region.ENDPOINTS, "refused", E.MISCONFIGURED)
            self._discovery_failed(str(step.error), misconfigured=True)
        else:
            self._go(Region.ENDPOINTS, "trouble", E.UNKNOWN)
            self._discovery_failed(str(step.error), misconfigured=False)

    # -- what observers see --------------------------------------------------------

    def _derive_snapshot(self) -> Snapshot:
        now = self._now
        creds, lease = self.credentials, self._lease
        signed = self._still_usable()
        state = self.states[Region.SIGN_IN]
        expires_at = None
        if creds is not None and lease is not None and lease.deadline is not None:
            expires_at = now.wall_at(lease.rebased(now).deadline or 0.0)
        base = Snapshot(phase=Phase.STARTING, device_name=self.settings.device_name,
                        user=user_label(creds) if signed else None,
                        token_expires_at=expires_at if signed else None)
        if self.states[Region.RUN] == R.STOPPING:
            return replace(base, phase=Phase.STOPPING)
        if state in (S.AWAITING_USER, S.POLLING) and self._poll is not None:
            auth = self._poll.authorization
            return replace(base, phase=Phase.AWAITING_USER, user_code=auth.user_code,
                           verification_uri=auth.verification_uri,
                           verification_uri_complete=auth.verification_uri_complete,
                           code_deadline=auth.deadline,
                           code_expires_at=now.wall_at(auth.deadline),
                           code_lifetime=auth.expires_in)
        next_code = self._next_code_at()
        waiting = replace(base, next_code_at=None if next_code is None else now.wall_at(next_code),
                          last_error=self._sign_in_error,
                          cause=self._sign_in_cause if self._wait_phase == Phase.NO_NETWORK
                          else None)
        if signed:
            if self._refresh_error is not None:
                return replace(base, phase=Phase.REFRESH_FAILING, last_error=self._refresh_error)
            if state in (S.WAITING, S.REQUESTING) and self._wait_phase in (
                    Phase.THROTTLED, Phase.NO_NETWORK, Phase.CONFIG_ERROR):
                return replace(waiting, phase=self._wait_phase)
            return replace(base, phase=Phase.SIGNED_IN)
        if state == S.BUTTON:
            return replace(base, phase=Phase.NEEDS_BUTTON, last_error=self._sign_in_error)
        phase = self._wait_phase
        if phase == Phase.STARTING and next_code is not None and next_code > now.mono:
            phase = Phase.CODE_EXPIRED  # the hourly budget holds the next code back
        return replace(waiting, phase=phase)

    def _record_if_changed(self) -> None:
        now = self._now
        code = None
        if self._poll is not None and self.states[Region.SIGN_IN] in (
                S.AWAITING_USER, S.POLLING):
            auth = self._poll.authorization
            code = PendingCode(
                device_code=auth.device_code, user_code=auth.user_code,
                verification_uri=auth.verification_uri,
                verification_uri_complete=auth.verification_uri_complete,
                interval=self._poll.interval, issued_at=now.wall_at(auth.issued_at),
                expires_at=now.wall_at(auth.deadline), scope=self._poll.scope)
        throttle_until = (now.wall_at(self._throttle_until)
                          if self._throttle_until is not None
                          and self._throttle_until > now.mono else None)
        record = SessionRecord(
            codes_spent=tuple(round(now.wall_at(t), 3) for t in self._budget.spent),
            throttle_until=None if throttle_until is None else round(throttle_until, 3),
            throttle_delay=self._throttle_step if throttle_until is not None else None,
            codes_expired_unused=self._unused_codes,
            pending_code=code,
            pending_revocations=tuple(self._revocations),
        )
        if _same_record(record, self._recorded):
            return
        self._recorded = record
        self._effects.append(Record(record=record))


def _record_first(effects: list[Effect]) -> list[Effect]:
    """The session record reaches the disk before the I/O it guards, so a kill in
    between loses nothing: a code is counted before the request that spends it goes
    out, and the revocations a sign-out owes before the credential file goes. A Record
    after the first Send or Clear moves to just before it; the rest keeps its order."""
    first = next((i for i, e in enumerate(effects) if isinstance(e, Send | Clear)), None)
    if first is None:
        return effects
    head, tail = effects[:first], effects[first:]
    late = [e for e in tail if isinstance(e, Record)]
    return [*head, *late, *(e for e in tail if not isinstance(e, Record))]


_NO_REVOCATION = ("the provider has no revocation endpoint; the tokens stay valid at the "
                  "provider until they expire")


def _same_record(a: SessionRecord, b: SessionRecord | None) -> bool:
    """Equal but for a wall clock that moved a little (mono -> wall drifts by rounding)."""
    if b is None:
        return False
    if len(a.codes_spent) != len(b.codes_spent) or any(
            abs(x - y) > 1.0 for x, y in zip(a.codes_spent, b.codes_spent, strict=True)):
        return False
    if (a.throttle_until is None) != (b.throttle_until is None) or (
            a.throttle_until is not None and b.throttle_until is not None
            and abs(a.throttle_until - b.throttle_until) > 1.0):
        return False
    code_a, code_b = a.pending_code, b.pending_code
    if (code_a is None) != (code_b is None) or (
            code_a is not None and code_b is not None and (
                code_a.device_code != code_b.device_code or code_a.interval != code_b.interval
                or abs(code_a.expires_at - code_b.expires_at) > 1.0)):
        return False
    return (a.throttle_delay == b.throttle_delay
            and a.codes_expired_unused == b.codes_expired_unused
            and a.pending_revocations == b.pending_revocations)


def _start_spread(left: float | None) -> float:
    """How long a refresh overdue at start-up may be held back (START_SPREAD)."""
    if left is None:
        return START_SPREAD
    if left <= 0:
        return EXPIRED_START_SPREAD
    return min(START_SPREAD, max(0.0, (left - 2 * LAST_TRY_LEAD) / 2))


def jittered(delay: float, rng: random.Random) -> float:
    """`delay` as a floor, plus up to a quarter on top: a fleet given one hint (a
    Retry-After, a throttle) does not come back in lockstep."""
    return delay * (1.0 + 0.25 * rng.random())


def user_label(creds: Credentials | None) -> str | None:
    if creds is None:
        return None
    claims = creds.claims
    return claims.get("name") or claims.get("preferred_username") or claims.get(
        "email") or claims.get("sub")


def not_signed_in_reason(snapshot: Snapshot) -> str:
    """What to tell a caller who asks for a token now, with the code while one is shown."""
    if snapshot.phase == Phase.AWAITING_USER:
        return f"not signed in yet: enter code {snapshot.user_code} at {snapshot.verification_uri}"
    return f"not signed in ({snapshot.phase.value})"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "an unknown time"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def transitions_markdown() -> str:
    """The table as docs/ARCHITECTURE.md shows it (a test keeps the two the same)."""
    lines = ["| region | state | input | next | why |", "|---|---|---|---|---|"]
    for (region, state, trigger), row in TRANSITIONS.items():
        targets = ", ".join(sorted(t.value for t in row.targets))
        lines.append(f"| {region.value} | {state.value} | {trigger} | {targets} | "
                     f"{row.reason} |")
    return "\n".join(lines) + "\n"
