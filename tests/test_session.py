"""The sign-in lifecycle table, played synchronously and without sockets.

In the manner of h11's test_state.py: a `Session` is fed inputs at hand-made
`Instant`s, and the effects it asks for are answered by a small fake pump (`Pump`)
that keeps the time, the requests in flight and a journal of everything that passed.
The wire answers are authentik's (../shared/authentik-device-flow.md §2-§6).

Each behaviour test names the behaviour it checks by number in a comment.
"""

from __future__ import annotations

import base64
import itertools
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

import pytest

from agent.errors import NotSignedIn, ProviderUnavailable, RequestTimeout
from agent.oauth import Client, HttpResponse, TokenSet
from agent.oauth.discovery import ExplicitEndpoints
from agent.session import (
    QUICK_REFRESH_RETRIES,
    START_SPREAD,
    TRANSITIONS,
    Answered,
    Clear,
    Effect,
    Failed,
    IllegalInput,
    Input,
    Instant,
    Log,
    Login,
    Logout,
    Record,
    Refresh,
    Region,
    Save,
    Saved,
    SaveFailed,
    Send,
    Session,
    SessionSettings,
    Start,
    Stop,
    Tick,
)
from agent.sessionfile import PendingCode, PendingRevocation, SessionRecord
from agent.state import Phase, Snapshot
from agent.store import Credentials

# -- the provider's side of the wire ---------------------------------------------------

M0 = 1_000.0                 # monotonic time at the start of every test
W0 = 1_800_000_000.0         # wall time at the start of every test
IDP = "https://idp.test/application/o/"
ISSUER = IDP + "kitchen/"
ENDPOINTS = ExplicitEndpoints(
    device_authorization=IDP + "device/", token=IDP + "token/",
    revocation=IDP + "revoke/", userinfo=IDP + "userinfo/")
SCOPES = ("openid", "profile", "email", "offline_access")
SCOPE = " ".join(SCOPES)
USER_CODE = "004815162"


def make_settings(**overrides: Any) -> SessionSettings:
    base: dict[str, Any] = {
        "client": Client(client_id="device-agent"),
        "scopes": SCOPES,
        "device_name": "Kitchen",
        "endpoints": ENDPOINTS,
        "issuer": None,
    }
    base.update(overrides)
    return SessionSettings(**base)


def reply(status: int, body: Any = None, headers: Mapping[str, str] | None = None
          ) -> HttpResponse:
    raw = b"" if body is None else json.dumps(body).encode()
    return HttpResponse(status=status, body=raw, headers={
        "Content-Type": "application/json", "Cache-Control": "no-store", **(headers or {})})


def oauth_error(code: str, status: int = 400) -> HttpResponse:
    """authentik's error shape (§2): error, error_description, request_id."""
    return reply(status, {"error": code, "error_description": f"{code} (test)",
                          "request_id": "req-1"})


PENDING = oauth_error("authorization_pending")
INVALID_GRANT = oauth_error("invalid_grant")
THROTTLED = oauth_error("slow_down", 429)
UNAVAILABLE = reply(503, {"detail": "upstream down"})
REVOKED = reply(200, {})


def code_answer(user_code: str = USER_CODE, *, expires_in: float = 900,
                interval: float = 5) -> HttpResponse:
    """§3: nine digits, a device code full of punctuation, interval 5."""
    return reply(200, {
        "device_code": f"dc{user_code}+&=%#?/\\\"'",
        "user_code": user_code,
        "verification_uri": "https://idp.test/device",
        "verification_uri_complete": f"https://idp.test/device?code={user_code}",
        "expires_in": expires_in,
        "interval": interval,
    })


def jwt(claims: Mapping[str, Any]) -> str:
    def part(value: Mapping[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"


ALICE = {"sub": "u-1", "name": "Alice", "aud": "device-agent", "iat": W0, "exp": W0 + 3600}
ALICE_ID_TOKEN = jwt(ALICE)
OMIT: Any = object()


def token_answer(access: str = "A2", refresh: str | None = "R2", *,
                 expires_in: Any = 3600, scope: Any = SCOPE, token_type: Any = "Bearer",
                 id_token: Any = ALICE_ID_TOKEN) -> HttpResponse:
    """§5: access_token, token_type, scope, expires_in, id_token, refresh_token.
    A field passed as OMIT is left out."""
    body = {"access_token": access, "token_type": token_type, "scope": scope,
            "expires_in": expires_in, "id_token": id_token, "refresh_token": refresh}
    return reply(200, {k: v for k, v in body.items() if v is not OMIT and v is not None})


def metadata(issuer: str = ISSUER, **overrides: Any) -> HttpResponse:
    """An authentik application's openid-configuration; a key set to OMIT is left out."""
    doc: dict[str, Any] = {
        "issuer": issuer,
        "authorization_endpoint": IDP + "authorize/",
        "token_endpoint": IDP + "token/",
        "device_authorization_endpoint": IDP + "device/",
        "revocation_endpoint": IDP + "revoke/",
        "userinfo_endpoint": IDP + "userinfo/",
        "scopes_supported": list(SCOPES),
    }
    doc.update(overrides)
    return reply(200, {k: v for k, v in doc.items() if v is not OMIT})


def stored(access: str = "A1", refresh: str | None = "R1", *, lifetime: float = 600.0,
           issued_at: float = W0, scope: str = SCOPE, name: str = "Alice") -> Credentials:
    """Credentials as the store hands them to Start."""
    tokens = TokenSet(access_token=access, token_type="Bearer", issued_at=issued_at,
                      expires_at=issued_at + lifetime, refresh_token=refresh,
                      id_token=None, scope=scope)
    return Credentials(tokens=tokens, client_id="device-agent", issuer=None,
                       claims={"sub": "u-1", "name": name})


# -- the fake pump ---------------------------------------------------------------------

Answer = HttpResponse | Callable[[Send], HttpResponse]


class Pump:
    """What the driver does, by hand: keeps both clocks, the requests in flight and the
    writes under way, and a journal of every input and effect in order. With
    `auto_save` (the default) every Save is answered with Saved before anything else,
    as the driver does."""

    def __init__(self, settings: SessionSettings | None = None, *, auto_save: bool = True,
                 mono: float = M0, wall: float = W0, seed: int = 8628) -> None:
        self.session = Session(settings or make_settings(), rng=random.Random(seed))
        self.t0 = mono
        self.mono, self.wall = mono, wall
        self.auto_save = auto_save
        self.open: dict[int, Send] = {}
        self.saves: list[Save] = []
        self.sent_at: dict[int, float] = {}
        self.journal: list[Effect | Input] = []
        self.snapshots: list[Snapshot] = []

    # time
    @property
    def now(self) -> Instant:
        return Instant(self.mono, self.wall)

    @property
    def elapsed(self) -> float:
        return self.mono - self.t0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    # inputs
    def feed(self, event: Input) -> list[Effect]:
        self.journal.append(event)
        effects = self.session.handle(event, self.now)
        self.snapshots.append(self.session.snapshot)
        out: list[Effect] = []
        for effect in effects:
            self.journal.append(effect)
            out.append(effect)
            if isinstance(effect, Send):
                self.open[effect.request_id] = effect
                self.sent_at[effect.request_id] = self.mono
            elif isinstance(effect, Save):
                self.saves.append(effect)
        while self.auto_save and self.saves:
            out += self.feed(Saved(write_id=self.saves.pop(0).write_id))
        return out

    def start(self, credentials: Credentials | None = None,
              record: SessionRecord | None = None) -> list[Effect]:
        return self.feed(Start(credentials=credentials, record=record or SessionRecord()))

    def tick(self) -> list[Effect]:
        return self.feed(Tick())

    def wait(self, seconds: float) -> list[Effect]:
        self.advance(seconds)
        return self.tick()

    def save_done(self) -> list[Effect]:
        return self.feed(Saved(write_id=self.saves.pop(0).write_id))

    # the wire
    def request(self, purpose: str) -> Send:
        """The one request of `purpose` in flight."""
        found = [s for s in self.open.values() if s.purpose == purpose]
        assert len(found) == 1, (purpose, [s.purpose for s in self.open.values()])
        return found[0]

    def answer(self, which: Send | str, response: HttpResponse) -> list[Effect]:
        send = self.request(which) if isinstance(which, str) else which
        del self.open[send.request_id]
        return self.feed(Answered(request_id=send.request_id, response=response))

    def fail(self, which: Send | str, error: str = "timed out after 30 s") -> list[Effect]:
        send = self.request(which) if isinstance(which, str) else which
        del self.open[send.request_id]
        return self.feed(Failed(request_id=send.request_id, error=RequestTimeout(error)))

    def run_until(self, mono: float, answers: Mapping[str, Answer] | None = None
                  ) -> list[Effect]:
        """Tick at every timer up to `mono`, answering the requests whose purpose is in
        `answers` at once; other requests stay in flight."""
        answers = answers or {}
        out: list[Effect] = []
        for _ in range(100_000):
            out += self._answer_open(answers)
            at = self.session.next_timer()
            if at is None or at > mono:
                break
            self.advance(at - self.mono)
            out += self.tick()
        else:  # pragma: no cover - a runaway loop is a bug in the test
            raise AssertionError("run_until did not settle")
        if mono > self.mono:
            self.advance(mono - self.mono)
        out += self.tick()
        out += self._answer_open(answers)
        return out

    def run_for(self, seconds: float, answers: Mapping[str, Answer] | None = None
                ) -> list[Effect]:
        return self.run_until(self.mono + seconds, answers)

    def _answer_open(self, answers: Mapping[str, Answer]) -> list[Effect]:
        out: list[Effect] = []
        while True:
            due = [s for s in self.open.values() if s.purpose in answers]
            if not due:
                return out
            for send in due:
                how = answers[send.purpose]
                out += self.answer(send, how if isinstance(how, HttpResponse) else how(send))

    # looking back
    def sends(self, purpose: str | None = None) -> list[Send]:
        return sends(self.journal, purpose)

    def index(self, item: Effect | Input) -> int:
        return next(i for i, seen in enumerate(self.journal) if seen is item)

    def at(self, send: Send) -> float:
        """When `send` went out, in seconds since the test began."""
        return self.sent_at[send.request_id] - self.t0

    # common openings
    def start_overdue(self, credentials: Credentials) -> Send:
        """Start from disk with the refresh overdue, past the start-up spread; returns
        the refresh."""
        self.start(credentials)
        self.run_for(START_SPREAD)
        return self.request("refresh")

    def show_code(self, **code: Any) -> Send:
        """Start signed out and get a code on screen; returns the device request."""
        self.start()
        device = self.request("device")
        self.answer(device, code_answer(**code))
        return device

    def poll_now(self) -> Send:
        """Move to the next poll and return it."""
        self.run_for(0.0)
        for _ in range(10_000):
            if [s for s in self.open.values() if s.purpose == "poll"]:
                break
            # With another request in flight the session names no timer: step.
            at = self.session.next_timer()
            self.advance(0.5 if at is None else at - self.mono)
            self.tick()
        return self.request("poll")


def sends(effects: Iterable[object], purpose: str | None = None) -> list[Send]:
    return [e for e in effects if isinstance(e, Send)
            and (purpose is None or e.purpose == purpose)]


def saves(effects: Iterable[object]) -> list[Save]:
    return [e for e in effects if isinstance(e, Save)]


def records(effects: Iterable[object]) -> list[SessionRecord]:
    return [e.record for e in effects if isinstance(e, Record)]


def form(send: Send, key: str) -> str | None:
    return send.request.form.get(key)


def counter_codes() -> Callable[[Send], HttpResponse]:
    """A device endpoint that hands out a new code each time."""
    numbers = itertools.count(100_000_001)
    return lambda _send: code_answer(f"{next(numbers):09d}")


def refresh_due_pump(*, lifetime: float = 600.0, **settings: Any) -> Pump:
    """Signed in from disk with a token of `lifetime` (margin: 20 % of it)."""
    pump = Pump(make_settings(**settings))
    pump.start(stored(lifetime=lifetime))
    assert not pump.sends()
    return pump


# -- 1. odd fields in a successful token answer ----------------------------------------

def _exactly(lifetime: float) -> Callable[[TokenSet, float, str], None]:
    def check(tokens: TokenSet, remaining: float, scope: str) -> None:
        assert tokens.expires_at is not None
        assert tokens.expires_at - tokens.issued_at == pytest.approx(lifetime)
        assert lifetime - 10 <= remaining <= lifetime
    return check


def _some_sane_lifetime(tokens: TokenSet, remaining: float, scope: str) -> None:
    assert 0 < remaining <= 3600


def _scope_joined(tokens: TokenSet, remaining: float, scope: str) -> None:
    assert tokens.scope == "openid offline_access"


def _bearer(tokens: TokenSet, remaining: float, scope: str) -> None:
    assert tokens.token_type == "Bearer"


def _scope_assumed(tokens: TokenSet, remaining: float, scope: str) -> None:
    assert tokens.scope == scope


ODD_FIELDS: dict[str, tuple[dict[str, Any], Callable[[TokenSet, float, str], None]]] = {
    "expires_in_decimal_text": ({"expires_in": "3600.0"}, _exactly(3600)),
    "expires_in_negative": ({"expires_in": -60}, _some_sane_lifetime),
    "expires_in_absurd": ({"expires_in": 10**40}, _some_sane_lifetime),
    "scope_json_array": ({"scope": ["openid", "offline_access"]}, _scope_joined),
    "token_type_missing": ({"token_type": OMIT}, _bearer),
    "scope_absent": ({"scope": OMIT}, _scope_assumed),
}


@pytest.mark.parametrize(("fields", "check"), ODD_FIELDS.values(), ids=ODD_FIELDS.keys())
def test_odd_field_in_redemption_answer_is_kept_and_saved_before_any_send(
        fields: dict[str, Any], check: Callable[[TokenSet, float, str], None]) -> None:
    # 1
    pump = Pump(auto_save=False)
    pump.show_code()
    poll = pump.poll_now()
    effects = pump.answer(poll, token_answer(**fields))
    [save] = saves(effects)
    assert save.credentials.tokens.refresh_token == "R2"
    assert save.credentials.tokens.access_token == "A2"
    assert not sends(effects), "nothing is sent before the new refresh token is on disk"
    assert not sends(pump.wait(5.0))
    pump.save_done()
    assert pump.session.credentials == save.credentials
    remaining = pump.session.remaining(pump.now)
    assert remaining is not None
    check(save.credentials.tokens, remaining, SCOPE)  # absent: the requested scope
    assert pump.session.token_for(1.0, pump.now) == save.credentials.tokens


@pytest.mark.parametrize(("fields", "check"), ODD_FIELDS.values(), ids=ODD_FIELDS.keys())
def test_odd_field_in_refresh_answer_is_kept_and_saved_before_any_send(
        fields: dict[str, Any], check: Callable[[TokenSet, float, str], None]) -> None:
    # 1
    pump = Pump(auto_save=False)
    pump.start(stored(lifetime=600, scope="openid offline_access"))
    pump.run_until(M0 + 480)
    refresh = pump.request("refresh")
    effects = pump.answer(refresh, token_answer(**fields))
    [save] = saves(effects)
    assert save.credentials.tokens.refresh_token == "R2"
    assert not sends(effects), "nothing is sent before the new refresh token is on disk"
    assert not sends(pump.wait(5.0))
    pump.save_done()
    assert pump.session.credentials == save.credentials
    remaining = pump.session.remaining(pump.now)
    assert remaining is not None
    check(save.credentials.tokens, remaining, "openid offline_access")  # absent: kept


# -- 2. a refusal for stale credentials ------------------------------------------------

def test_refresh_refused_for_stale_credentials_never_deletes_newer_ones() -> None:
    # 2
    pump = Pump()
    pump.start(stored(lifetime=600))
    pump.feed(Login(new_sign_in=True))
    pump.answer("device", code_answer())
    pump.run_until(M0 + 480, {"poll": PENDING})
    refresh = pump.request("refresh")
    assert form(refresh, "refresh_token") == "R1"
    # The new sign-in completes while the refresh of R1 is still out.
    pump.answer(pump.poll_now(), token_answer("A2", "R2"))
    newer = pump.session.credentials
    assert newer is not None and newer.tokens.refresh_token == "R2"
    effects = pump.answer(refresh, INVALID_GRANT)
    assert not [e for e in effects if isinstance(e, Clear)]
    assert not saves(effects)
    assert pump.session.credentials == newer
    assert pump.session.states[Region.TOKENS] == "valid"
    assert pump.session.snapshot.phase == Phase.SIGNED_IN
    assert pump.session.token_for(60.0, pump.now) == newer.tokens


# -- 3. refreshing goes on while a new sign-in is pending, throttled or failing --------

def _refresh_comes_at_the_margin(pump: Pump, answers: Mapping[str, Answer]) -> Send:
    pump.run_until(M0 + 479, answers)
    assert not pump.sends("refresh")
    pump.run_until(M0 + 481, answers)
    [refresh] = pump.sends("refresh")
    assert 480 <= pump.at(refresh) <= 481
    assert form(refresh, "refresh_token") == "R1"
    return refresh


def test_refresh_goes_on_while_a_new_sign_in_is_pending() -> None:
    # 3
    pump = Pump()
    pump.start(stored(lifetime=600))
    pump.feed(Login(new_sign_in=True))
    pump.answer("device", code_answer(expires_in=900))
    refresh = _refresh_comes_at_the_margin(pump, {"poll": PENDING})
    snap = pump.session.snapshot
    assert snap.phase == Phase.AWAITING_USER
    assert snap.user_code == USER_CODE
    assert snap.user == "Alice", "still signed in"
    pump.answer(refresh, token_answer("A2", "R2"))
    assert pump.session.credentials is not None
    assert pump.session.credentials.tokens.access_token == "A2"
    assert pump.session.snapshot.user_code == USER_CODE


def test_refresh_goes_on_while_a_new_sign_in_is_throttled() -> None:
    # 3
    pump = Pump()
    pump.start(stored(lifetime=600))
    pump.feed(Login(new_sign_in=True))
    _refresh_comes_at_the_margin(pump, {"device": THROTTLED})
    snap = pump.session.snapshot
    assert snap.phase == Phase.THROTTLED
    assert snap.user == "Alice", "still signed in"


def test_refresh_goes_on_while_a_new_sign_in_is_failing() -> None:
    # 3
    pump = Pump()
    pump.start(stored(lifetime=600))
    pump.feed(Login(new_sign_in=True))
    _refresh_comes_at_the_margin(pump, {"device": UNAVAILABLE})
    assert len(pump.sends("device")) > 1
    snap = pump.session.snapshot
    assert snap.phase == Phase.NO_NETWORK
    assert snap.user == "Alice", "still signed in"


# -- 4. a lost refresh answer, then invalid_grant --------------------------------------

def test_lost_refresh_is_retried_once_then_a_refusal_serves_the_old_token_and_signs_in_anew(
        ) -> None:
    # 4
    pump = Pump()
    pump.start(stored(lifetime=600))
    pump.run_until(M0 + 480)
    failed_at = pump.elapsed
    after_failure = pump.fail("refresh")
    assert not sends(after_failure, "refresh"), "not retried at once"
    pump.run_for(30.0)
    [_first, retry] = pump.sends("refresh")
    assert pump.at(retry) > failed_at, "retried after a back-off"
    assert form(retry, "refresh_token") == "R1"
    effects = pump.answer(retry, INVALID_GRANT)
    # The old access token is still served while it lives.
    served = pump.session.token_for(60.0, pump.now)
    assert isinstance(served, TokenSet) and served.access_token == "A1"
    # Written again without the dead refresh token.
    [save] = saves(effects)
    assert save.credentials.tokens.refresh_token is None
    assert save.credentials.tokens.access_token == "A1"
    assert not [e for e in effects if isinstance(e, Clear)]
    # A new sign-in starts: a device code request, and its code on screen.
    device = pump.request("device")
    pump.answer(device, code_answer("123456789"))
    assert pump.session.snapshot.phase == Phase.AWAITING_USER
    assert pump.session.snapshot.user_code == "123456789"
    # However much time passes, R1 is never sent again.
    pump.run_for(7200.0, {"poll": PENDING, "device": counter_codes()})
    assert [form(s, "refresh_token") for s in pump.sends("refresh")] == ["R1", "R1"]
    assert all(form(s, "refresh_token") != "R1"
               for s in pump.sends() if s.request_id > retry.request_id
               and s.purpose != "revoke")


def test_refresh_answer_without_an_access_token_keeps_its_rotated_refresh_token() -> None:
    # 4
    pump = Pump()
    pump.start(stored(lifetime=600))
    pump.run_until(M0 + 480)
    rotated = reply(200, {"token_type": "Bearer", "expires_in": 3600, "refresh_token": "R2"})
    effects = pump.answer("refresh", rotated)
    # Trouble, but the only live refresh token goes to disk beside the old access token.
    [save] = saves(effects)
    assert save.credentials.tokens.refresh_token == "R2"
    assert save.credentials.tokens.access_token == "A1"
    assert pump.session.snapshot.phase == Phase.REFRESH_FAILING
    served = pump.session.token_for(0.0, pump.now)
    assert isinstance(served, TokenSet) and served.access_token == "A1"
    assert served.expires_at == W0 + 600, "the old token's life is not lengthened"
    # The retry, after the back-off, sends the new one.
    pump.run_for(60.0)
    retry = pump.request("refresh")
    assert form(retry, "refresh_token") == "R2"
    pump.answer(retry, token_answer("A3", "R3"))
    assert pump.session.snapshot.phase == Phase.SIGNED_IN
    assert pump.session.credentials is not None
    assert pump.session.credentials.tokens.refresh_token == "R3"


# -- 5. disk before anything else after redemption --------------------------------------

def test_redemption_is_saved_before_any_send_and_userinfo_waits_for_saved() -> None:
    # 5
    pump = Pump(auto_save=False)
    pump.show_code()
    effects = pump.answer(pump.poll_now(), token_answer(id_token=jwt({"sub": "u-1"})))
    [save] = saves(effects)
    assert not sends(effects)
    assert not sends(pump.wait(1.0))
    assert pump.session.credentials is None, "not served before it is on disk"
    saved = pump.save_done()
    [userinfo] = sends(saved, "userinfo")
    assert userinfo.request.headers["Authorization"] == "Bearer A2"
    journal = pump.journal
    saved_input = next(i for i, x in enumerate(journal) if isinstance(x, Saved))
    first_send_after_save = next(i for i, x in enumerate(journal)
                                 if isinstance(x, Send) and i > pump.index(save))
    assert pump.index(save) < saved_input < first_send_after_save
    assert journal[first_send_after_save] is userinfo
    pump.answer(userinfo, reply(200, {"sub": "u-1", "name": "Alice"}))
    pump.save_done()
    assert pump.session.snapshot.user == "Alice"


# -- 6. logout wins ----------------------------------------------------------------------

def test_logout_during_refresh_revokes_the_tokens_the_refresh_brings() -> None:
    # 6
    pump = Pump()
    pump.start(stored(lifetime=600))
    pump.run_until(M0 + 480)
    refresh = pump.request("refresh")
    effects = pump.feed(Logout())
    assert pump.session.credentials is None
    assert [e for e in effects if isinstance(e, Clear)]
    with pytest.raises(Exception, match="not signed in"):
        pump.session.token_for(1.0, pump.now)
    for revoke in pump.sends("revoke"):
        pump.answer(revoke, REVOKED)
    landed = pump.answer(refresh, token_answer("A2", "R2"))
    assert not saves(landed)
    assert pump.session.credentials is None
    revoked = {(form(s, "token"), form(s, "token_type_hint")) for s in sends(landed, "revoke")}
    assert revoked == {("R2", "refresh_token"), ("A2", "access_token")}
    assert all(s.request.url == IDP + "revoke/" for s in sends(landed, "revoke"))
    owed = records(landed)
    assert owed and {r.token for r in owed[-1].pending_revocations} >= {"R2", "A2"}


def test_logout_during_refresh_revokes_the_refresh_token_of_an_answer_it_cannot_use(
        ) -> None:
    # 6
    pump = Pump()
    pump.start(stored(lifetime=600))
    pump.run_until(M0 + 480)
    refresh = pump.request("refresh")
    pump.feed(Logout())
    for revoke in pump.sends("revoke"):
        pump.answer(revoke, REVOKED)
    landed = pump.answer(refresh, reply(200, {"token_type": "Bearer", "refresh_token": "R2"}))
    assert not saves(landed)
    assert pump.session.credentials is None
    revoked = [(form(s, "token"), form(s, "token_type_hint")) for s in sends(landed, "revoke")]
    assert revoked == [("R2", "refresh_token")]


def test_logout_during_a_poll_revokes_its_approval_instead_of_adopting_it() -> None:
    # 6
    pump = Pump()
    pump.show_code()
    poll = pump.poll_now()
    pump.feed(Logout())
    landed = pump.answer(poll, token_answer("A2", "R2"))
    assert not saves(landed)
    assert pump.session.credentials is None
    assert pump.session.snapshot.user is None
    revoked = {(form(s, "token"), form(s, "token_type_hint")) for s in sends(landed, "revoke")}
    assert revoked == {("R2", "refresh_token"), ("A2", "access_token")}


def test_logout_records_pending_revocations_before_the_clear() -> None:
    # 6
    pump = Pump()
    pump.start(stored())
    effects = pump.feed(Logout())
    clear = next(i for i, e in enumerate(effects) if isinstance(e, Clear))
    recorded_before = [e.record for e in effects[:clear] if isinstance(e, Record)]
    assert any({r.token for r in rec.pending_revocations} >= {"R1", "A1"}
               for rec in recorded_before), (
        "the revocations owed must be on disk before the credential file goes: a crash "
        "between the two would forget them")


def test_start_with_pending_revocations_sends_them() -> None:
    # 6
    pump = Pump()
    owed = (PendingRevocation(token="R0", hint="refresh_token"),
            PendingRevocation(token="A0", hint="access_token"))
    effects = pump.start(stored(), SessionRecord(pending_revocations=owed))
    revokes = sends(effects, "revoke")
    assert {(form(s, "token"), form(s, "token_type_hint")) for s in revokes} == {
        ("R0", "refresh_token"), ("A0", "access_token")}
    assert all(s.request.url == IDP + "revoke/" for s in revokes)
    after: list[Effect] = []
    for revoke in revokes:
        after += pump.answer(revoke, REVOKED)
    assert records(after)[-1].pending_revocations == ()


def test_logout_without_revocation_endpoint_says_so_in_logout_problems() -> None:
    # 6
    pump = Pump(make_settings(endpoints=replace(ENDPOINTS, revocation=None)))
    pump.start(stored())
    effects = pump.feed(Logout())
    assert not sends(effects, "revoke")
    assert [e for e in effects if isinstance(e, Clear)]
    assert any("no revocation endpoint" in p for p in pump.session.logout_problems)


# -- 7. a new sign-in revokes the previous refresh token ---------------------------------

def test_completed_new_sign_in_revokes_the_previous_refresh_token_after_the_save() -> None:
    # 7
    pump = Pump()
    pump.start(stored(lifetime=3600))
    pump.feed(Login(new_sign_in=True))
    pump.answer("device", code_answer())
    pump.answer(pump.poll_now(), token_answer("A2", "R2"))
    [save] = [s for s in saves(pump.journal)
              if s.credentials.tokens.refresh_token == "R2"]
    revokes = pump.sends("revoke")
    assert [(form(s, "token"), form(s, "token_type_hint")) for s in revokes] == [
        ("R1", "refresh_token")]
    assert pump.index(save) < pump.index(revokes[0])
    saved = next(i for i, x in enumerate(pump.journal)
                 if isinstance(x, Saved) and x.write_id == save.write_id)
    assert saved < pump.index(revokes[0])
    assert pump.session.credentials is not None
    assert pump.session.credentials.tokens.refresh_token == "R2"


# -- 8. token_for and Refresh respect the refresh back-off -------------------------------

def test_token_for_and_refresh_respect_the_refresh_backoff_one_request_per_step() -> None:
    # 8
    pump = Pump()
    first = pump.start_overdue(stored(lifetime=3600, issued_at=W0 - 3000))  # 600 s left
    pump.answer(first, UNAVAILABLE)
    for _step in range(3):
        for _timer in range(100):  # through the session's timers (its minutely look too)
            since = pump.mono
            step_at = pump.session.next_timer()
            assert step_at is not None and step_at > since
            for k in range(5):
                pump.advance(since + (step_at - since) * k / 5 - pump.mono)
                with pytest.raises(ProviderUnavailable):
                    pump.session.token_for(900.0, pump.now)
                assert not sends(pump.feed(Refresh())), "no request inside the back-off"
            pump.advance(step_at - pump.mono)
            try:
                decision = pump.session.token_for(900.0, pump.now)
            except ProviderUnavailable:
                assert not sends(pump.tick())
                continue
            assert isinstance(decision, Refresh)
            break
        else:
            raise AssertionError("the back-off never ended")
        effects = pump.feed(Refresh())
        assert len(sends(effects, "refresh")) == 1
        assert not sends(pump.feed(Refresh())), "one in flight is shared"
        pump.answer(pump.request("refresh"), UNAVAILABLE)
    assert len(pump.sends("refresh")) == 4


# -- 9. lifetimes count from the send ------------------------------------------------------

def test_redeemed_token_expiry_counts_from_the_poll_send_time() -> None:
    # 9
    pump = Pump(auto_save=False)
    pump.show_code()
    poll = pump.poll_now()
    sent_wall = pump.wall
    pump.advance(10.0)
    [save] = saves(pump.answer(poll, token_answer(expires_in=3600)))
    assert save.credentials.tokens.expires_at == pytest.approx(sent_wall + 3600)
    pump.save_done()
    assert pump.session.remaining(pump.now) == pytest.approx(3590)


def test_refreshed_token_expiry_counts_from_the_refresh_send_time() -> None:
    # 9
    pump = Pump()
    pump.start(stored(lifetime=600))
    pump.run_until(M0 + 480)
    refresh = pump.request("refresh")
    sent_wall = pump.wall
    pump.advance(10.0)
    [save] = saves(pump.answer(refresh, token_answer(expires_in=600)))
    assert save.credentials.tokens.expires_at == pytest.approx(sent_wall + 600)
    assert pump.session.remaining(pump.now) == pytest.approx(590)


def test_stored_token_is_capped_by_its_lifetime_when_the_wall_clock_stepped_back() -> None:
    # 9
    pump = Pump()
    creds = stored(lifetime=3600, issued_at=W0 + 5000)  # the clock was 5000 s ahead
    pump.start(creds)
    lifetime = creds.tokens.expires_at - creds.tokens.issued_at  # type: ignore[operator]
    remaining = pump.session.remaining(pump.now)
    assert remaining is not None and 0 < remaining <= lifetime
    snap = pump.session.snapshot
    assert snap.token_expires_at is not None and snap.token_expires_at <= pump.wall + lifetime
    pump.advance(lifetime + 1)
    assert not isinstance(pump.session.token_for(1.0, pump.now), TokenSet), (
        "not served past its lifetime")


# -- 10. a wrong metadata document is a configuration error ---------------------------------

def test_discovery_issuer_mismatch_is_config_error_and_is_asked_again_after_retry_max(
        ) -> None:
    # 10
    pump = Pump(make_settings(issuer=ISSUER, endpoints=ExplicitEndpoints()))
    pump.start()
    discovery = pump.request("discovery")
    assert discovery.request.url == ISSUER + ".well-known/openid-configuration"
    pump.answer(discovery, metadata(issuer="https://evil.test/application/o/kitchen/"))
    snap = pump.session.snapshot
    assert snap.phase == Phase.CONFIG_ERROR, "a configuration error, not NO_NETWORK"
    assert snap.last_error is not None and "https://evil.test/application/o/kitchen/" in (
        snap.last_error)
    assert not pump.sends("device")
    pump.run_until(M0 + 299.0)
    assert len(pump.sends("discovery")) == 1, "not asked again before retry_max"
    assert pump.session.snapshot.phase == Phase.CONFIG_ERROR
    pump.run_until(M0 + 300.5)
    assert len(pump.sends("discovery")) == 2


# -- 11. throttling ---------------------------------------------------------------------------

def test_device_endpoint_429_throttles_from_two_minutes_doubling_to_thirty() -> None:
    # 11
    pump = Pump()
    pump.start()
    pump.answer("device", THROTTLED)
    assert pump.session.snapshot.phase == Phase.THROTTLED
    pump.run_for(12_000.0, {"device": THROTTLED})
    times = [pump.at(s) for s in pump.sends("device")]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) >= 6
    for gap, step in zip(gaps, (120, 240, 480, 960, 1800, 1800), strict=False):
        assert step <= gap <= step * 1.25 + 0.001, (gaps, step)
    assert pump.session.snapshot.phase == Phase.THROTTLED


def test_device_endpoint_retry_after_is_a_floor_only_up_to_the_throttle_cap() -> None:
    # 11
    pump = Pump()
    pump.start()
    pump.answer("device", reply(429, {"error": "slow_down"}, {"Retry-After": "86400"}))
    snap = pump.session.snapshot
    assert snap.phase == Phase.THROTTLED
    assert snap.next_code_at is not None and snap.next_code_at <= pump.wall + 1800 * 1.25
    pump.run_for(1800 * 1.25 + 1)
    assert len(pump.sends("device")) == 2


def test_refused_device_requests_do_not_spend_the_code_budget() -> None:
    # 11
    pump = Pump(make_settings(codes_per_hour=1))
    pump.start()
    pump.answer("device", THROTTLED)
    assert records(pump.journal)[-1].codes_spent == ()
    pump.run_for(151.0)
    assert len(pump.sends("device")) == 2, "the refused try cost no budget"
    pump.answer("device", code_answer())
    assert pump.session.snapshot.phase == Phase.AWAITING_USER


def test_login_during_throttle_tries_at_once_but_not_twice_within_a_minute() -> None:
    # 11
    pump = Pump()
    pump.start()
    pump.answer("device", THROTTLED)
    pump.wait(10.0)
    forced = pump.feed(Login())
    assert len(sends(forced, "device")) == 1, "a person's request tries at once"
    pump.answer("device", THROTTLED)
    pump.wait(20.0)
    again = pump.feed(Login())
    assert not sends(again, "device")
    pump.run_until(M0 + 69.0)
    assert len(pump.sends("device")) == 2, "no second forced try within 60 s"


def test_token_endpoint_429_while_polling_is_slow_down() -> None:
    # 11
    pump = Pump()
    pump.show_code(interval=5)
    poll = pump.poll_now()
    assert pump.at(poll) == pytest.approx(5)
    pump.answer(poll, reply(429))             # a throttle without a body
    pump.run_until(M0 + 14.9)
    assert len(pump.sends("poll")) == 1
    assert pump.session.snapshot.phase == Phase.AWAITING_USER
    second = pump.poll_now()
    assert pump.at(second) == pytest.approx(15)  # interval 5 + 5
    pump.answer(second, oauth_error("slow_down"))
    third = pump.poll_now()
    assert pump.at(third) == pytest.approx(30)   # interval 10 + 5
    pump.answer(third, PENDING)
    assert pump.at(pump.poll_now()) == pytest.approx(45)
    assert pump.session.snapshot.phase == Phase.AWAITING_USER


# -- 12. the budget, the throttle and the code on screen survive a restart --------------------

def test_record_carries_codes_spent_and_a_restart_respects_the_budget() -> None:
    # 12
    first = Pump(make_settings(codes_per_hour=2))
    first.show_code(expires_in=600)
    first.run_for(605.0, {"poll": PENDING, "device": counter_codes()})
    record = records(first.journal)[-1]
    assert len(record.codes_spent) == 2
    assert record.codes_spent[0] == pytest.approx(W0, abs=1.0)
    assert record.codes_spent[1] == pytest.approx(W0 + 600, abs=1.0)
    # A reboot 100 s later: the monotonic clock starts over, the wall clock goes on.
    later = Pump(make_settings(codes_per_hour=2), mono=5.0, wall=first.wall + 100)
    later.start(record=replace(record, pending_code=None))
    assert not later.sends("device")
    wait = later.session.next_code_in(later.now)
    assert wait == pytest.approx(3600 - 705, abs=2.0)
    later.run_for(wait - 1.0)
    assert not later.sends("device")
    later.run_for(2.0)
    assert len(later.sends("device")) == 1


def test_record_carries_the_throttle_and_a_restart_respects_it() -> None:
    # 12
    first = Pump()
    first.start()
    first.answer("device", THROTTLED)
    record = records(first.journal)[-1]
    assert record.throttle_until is not None
    assert W0 + 120 <= record.throttle_until <= W0 + 150
    later = Pump(mono=5.0, wall=W0 + 30)
    later.start(record=record)
    assert not later.sends("device")
    assert later.session.snapshot.phase == Phase.THROTTLED
    later.run_until(5.0 + (record.throttle_until - (W0 + 30)) - 1.0)
    assert not later.sends("device")
    later.run_for(2.0)
    assert len(later.sends("device")) == 1


def test_restart_caps_a_throttle_set_by_a_wall_clock_far_ahead() -> None:
    # 12
    pump = Pump()
    pump.start(record=SessionRecord(throttle_until=W0 + 30 * 86400, throttle_delay=240))
    assert not pump.sends("device")
    pump.run_for(1800 * 1.25)
    assert len(pump.sends("device")) == 1, "a throttle from a wrong clock is capped"


def _pending_code(**overrides: Any) -> PendingCode:
    base: dict[str, Any] = {
        "device_code": "dc-resumed+&=", "user_code": "555000111",
        "verification_uri": "https://idp.test/device",
        "verification_uri_complete": "https://idp.test/device?code=555000111",
        "interval": 5.0, "issued_at": W0 - 100, "expires_at": W0 + 500, "scope": SCOPE}
    base.update(overrides)
    return PendingCode(**base)


def test_restart_resumes_the_code_on_screen() -> None:
    # 12
    pump = Pump()
    effects = pump.start(record=SessionRecord(pending_code=_pending_code()))
    assert not sends(effects)
    snap = pump.session.snapshot
    assert snap.phase == Phase.AWAITING_USER
    assert snap.user_code == "555000111"
    pump.run_until(M0 + 4.9)
    assert not pump.sends()
    poll = pump.poll_now()
    assert pump.at(poll) >= 5.0
    assert form(poll, "device_code") == "dc-resumed+&="
    assert not pump.sends("device")


def test_codes_resumed_together_are_polled_out_of_step() -> None:
    # Power back at a site: every device resumes its code at the same moment.
    firsts = set()
    for seed in range(20):
        pump = Pump(seed=seed)
        pump.start(record=SessionRecord(pending_code=_pending_code(interval=5.0)))
        firsts.add(round(pump.at(pump.poll_now()), 1))
    assert min(firsts) >= 5.0 and max(firsts) <= 10.0
    assert len(firsts) >= 15, sorted(firsts)


def test_resumed_code_is_polled_on_until_it_is_approved() -> None:
    # 12
    pump = Pump()
    pump.start(record=SessionRecord(pending_code=_pending_code()))
    pump.answer(pump.poll_now(), PENDING)
    assert pump.session.snapshot.phase == Phase.AWAITING_USER
    pump.run_for(6.0)
    assert len(pump.sends("poll")) == 2, "the resumed code is polled again after interval"
    pump.answer(pump.request("poll"), token_answer("A2", "R2"))
    assert pump.session.credentials is not None
    after = pump.session.snapshot
    assert after.phase == Phase.SIGNED_IN
    assert not pump.sends("device")


# -- 13. with a button, unused codes wait for a press -------------------------------------------

def test_with_a_button_three_unused_codes_wait_for_a_press() -> None:
    # 13
    pump = Pump(make_settings(button=True))
    pump.start()
    answers: dict[str, Answer] = {"device": counter_codes(), "poll": PENDING}
    pump.run_for(3 * 600 + 10, {**answers, "device": lambda _s: code_answer(
        f"{len(pump.sends('device')):09d}", expires_in=600)})
    assert len(pump.sends("device")) == 3
    assert pump.session.snapshot.phase == Phase.NEEDS_BUTTON
    pump.run_for(10 * 3600.0, answers)
    assert len(pump.sends("device")) == 3, "no code is spent until a press"
    assert pump.session.snapshot.phase == Phase.NEEDS_BUTTON
    pressed = pump.feed(Login())
    assert len(sends(pressed, "device")) == 1


def test_without_a_button_codes_keep_coming_within_the_budget() -> None:
    # 13
    pump = Pump()
    pump.start()
    answers: dict[str, Answer] = {
        "device": lambda _s: code_answer(f"{len(pump.sends('device')):09d}", expires_in=120),
        "poll": PENDING}
    pump.run_until(M0 + 3599.0, answers)
    assert len(pump.sends("device")) == 12, "as many codes as the hourly budget allows"
    assert pump.session.snapshot.phase == Phase.CODE_EXPIRED
    pump.run_until(M0 + 3601.0, answers)
    assert len(pump.sends("device")) == 13


# -- 14. logout when signed out, next_code_in, no CODE_EXPIRED while signed in ------------------

def test_logout_while_not_signed_in_sends_no_device_request_and_no_revocation() -> None:
    # 14
    pump = Pump(make_settings(codes_per_hour=1))
    pump.show_code(expires_in=600)
    pump.run_for(601.0, {"poll": PENDING})
    assert pump.session.snapshot.phase == Phase.CODE_EXPIRED
    before = len(pump.sends())
    effects = pump.feed(Logout())
    assert not sends(effects)
    pump.run_for(60.0)
    assert len(pump.sends()) == before


def test_logout_with_a_code_on_screen_sends_no_device_request_and_no_revocation() -> None:
    # 14
    pump = Pump()
    pump.show_code()
    effects = pump.feed(Logout())
    assert not sends(effects, "device")
    assert not sends(effects, "revoke")


def test_next_code_in_reports_the_wait_when_the_budget_is_spent() -> None:
    # 14
    pump = Pump(make_settings(codes_per_hour=1))
    pump.show_code(expires_in=600)
    pump.run_for(601.0, {"poll": PENDING})
    assert pump.session.next_code_in(pump.now) == pytest.approx(3600 - 601, abs=1.0)
    snap = pump.session.snapshot
    assert snap.next_code_at == pytest.approx(W0 + 3600, abs=1.0)


def test_signed_in_session_never_shows_code_expired() -> None:
    # 14
    pump = Pump()
    pump.start(stored(lifetime=3600))
    pump.feed(Login(new_sign_in=True))
    pump.answer("device", code_answer(expires_in=600))
    pump.run_for(700.0, {"poll": PENDING})
    assert pump.session.snapshot.phase == Phase.SIGNED_IN
    assert pump.session.snapshot.user == "Alice"
    assert Phase.CODE_EXPIRED not in {s.phase for s in pump.snapshots}
    assert len(pump.sends("device")) == 1


# -- 15. explicit endpoints and discovery combine per endpoint ---------------------------------

def test_configured_device_endpoint_completes_a_document_without_one() -> None:
    # 15
    device_url = "https://devices.test/oauth/device/"
    pump = Pump(make_settings(issuer=ISSUER,
                              endpoints=ExplicitEndpoints(device_authorization=device_url)))
    pump.start()
    pump.answer("discovery", metadata(device_authorization_endpoint=OMIT))
    device = pump.request("device")
    assert device.request.url == device_url
    pump.answer(device, code_answer())
    assert pump.poll_now().request.url == IDP + "token/"


def test_revocation_and_userinfo_come_from_the_document_when_only_device_and_token_are_set(
        ) -> None:
    # 15
    endpoints = ExplicitEndpoints(device_authorization="https://devices.test/device/",
                                  token="https://devices.test/token/")
    pump = Pump(make_settings(issuer=ISSUER, endpoints=endpoints))
    pump.start()
    pump.answer("discovery", metadata(revocation_endpoint="https://meta.test/revoke/",
                                      userinfo_endpoint="https://meta.test/userinfo/"))
    device = pump.request("device")
    assert device.request.url == "https://devices.test/device/"
    pump.answer(device, code_answer())
    poll = pump.poll_now()
    assert poll.request.url == "https://devices.test/token/"
    pump.answer(poll, token_answer(id_token=jwt({"sub": "u-1"})))
    assert pump.request("userinfo").request.url == "https://meta.test/userinfo/"
    pump.answer("userinfo", reply(200, {"sub": "u-1", "name": "Alice"}))
    pump.feed(Logout())
    revokes = pump.sends("revoke")
    assert revokes and all(s.request.url == "https://meta.test/revoke/" for s in revokes)


# -- the table itself --------------------------------------------------------------------------

def test_every_transition_row_has_a_reason() -> None:
    assert TRANSITIONS
    for key, row in TRANSITIONS.items():
        assert row.reason.strip(), key
        assert row.targets, key


def _signed_in() -> Pump:
    pump = Pump()
    pump.start(stored(lifetime=3600))
    return pump


def _refreshing() -> Pump:
    pump = Pump()
    pump.start(stored(lifetime=600))
    pump.run_until(M0 + 480)
    pump.request("refresh")
    return pump


def _stopped() -> Pump:
    pump = _signed_in()
    pump.feed(Stop())
    return pump


ILLEGAL: dict[str, tuple[Callable[[], Pump], Input]] = {
    "saved_unknown_write": (_signed_in, Saved(write_id=999)),
    "answered_unknown_request": (_refreshing, Answered(request_id=999, response=REVOKED)),
    "failed_unknown_request": (_refreshing, Failed(request_id=999,
                                                   error=RequestTimeout("timed out"))),
    "login_after_stop": (_stopped, Login()),
    "logout_after_stop": (_stopped, Logout()),
    "refresh_after_stop": (_stopped, Refresh()),
    "stop_twice": (_stopped, Stop()),
    "second_start": (_signed_in, Start(credentials=None, record=SessionRecord())),
    "tick_before_start": (Pump, Tick()),
}


@pytest.mark.parametrize(("build", "event"), ILLEGAL.values(), ids=ILLEGAL.keys())
def test_illegal_input_raises_and_changes_nothing(build: Callable[[], Pump],
                                                  event: Input) -> None:
    pump = build()
    session = pump.session
    states, snapshot, creds = dict(session.states), session.snapshot, session.credentials
    timer = session.next_timer()
    pump.advance(1.0)
    with pytest.raises(IllegalInput):
        session.handle(event, pump.now)
    assert session.states == states
    assert session.snapshot == snapshot
    assert session.credentials == creds
    assert session.next_timer() == timer


def test_requests_in_flight_still_land_after_an_illegal_input() -> None:
    pump = _refreshing()
    with pytest.raises(IllegalInput):
        pump.feed(Answered(request_id=999, response=REVOKED))
    pump.answer("refresh", token_answer("A2", "R2"))
    assert pump.session.credentials is not None
    assert pump.session.credentials.tokens.refresh_token == "R2"


def test_stopping_starts_nothing_but_a_refresh_that_lands_is_still_saved() -> None:
    pump = Pump(auto_save=False)
    pump.start(stored(lifetime=600))
    pump.run_until(M0 + 480)
    refresh = pump.request("refresh")
    pump.feed(Stop())
    assert pump.session.snapshot.phase == Phase.STOPPING
    assert not sends(pump.wait(3600.0))
    effects = pump.answer(refresh, token_answer("A2", "R2"))
    [save] = saves(effects)
    assert save.credentials.tokens.refresh_token == "R2"
    assert not sends(effects)
    assert not sends(pump.save_done())
    assert pump.session.credentials == save.credentials
    assert not sends(pump.wait(7200.0))


# -- what a review found: each a way to lose or leak the sign-in -------------------------

def test_a_failed_write_of_a_new_sign_in_does_not_revoke_the_token_still_on_disk() -> None:
    # 2, 7: until the new refresh token is on disk, the file still holds the old one.
    pump = Pump(auto_save=False)
    pump.start(stored(lifetime=3600))
    pump.feed(Login(new_sign_in=True))
    pump.answer("device", code_answer())
    poll = pump.poll_now()
    pump.answer(poll, token_answer("A2", "R2"))
    pump.feed(SaveFailed(write_id=pump.saves.pop(0).write_id, reason="disk full"))
    assert not pump.sends("revoke")
    assert all(r.pending_revocations == () for r in records(pump.journal))
    # The retry a minute later works: only then is the old token revoked.
    pump.run_for(61)
    pump.save_done()
    assert [form(s, "token") for s in pump.sends("revoke")] == ["R1"]


def test_stop_writes_credentials_the_disk_refused_before() -> None:
    # 4: memory dies with the process; the last refresh's token must reach the disk.
    pump = Pump(auto_save=False)
    pump.answer(pump.start_overdue(stored(lifetime=3600, issued_at=W0 - 3000)),
                token_answer("A2", "R2"))
    pump.feed(SaveFailed(write_id=pump.saves.pop(0).write_id, reason="disk full"))
    assert not pump.session.settled()
    pump.feed(Stop())
    [last] = pump.saves
    assert last.credentials.tokens.refresh_token == "R2"
    pump.save_done()
    assert pump.session.settled()


def test_stop_waits_for_a_poll_that_may_bring_an_approval() -> None:
    pump = Pump()
    pump.show_code()
    pump.poll_now()
    pump.feed(Stop())
    assert not pump.session.settled()
    pump.answer("poll", token_answer("A2", "R2"))
    assert pump.session.settled()
    assert [s.credentials.tokens.refresh_token for s in saves(pump.journal)] == ["R2"]


def test_credentials_signed_out_before_a_restart_are_not_served() -> None:
    # 6: the file outlived a sign-out (its removal failed); its tokens are being revoked.
    pump = Pump()
    record = SessionRecord(pending_revocations=(
        PendingRevocation(token="R1", hint="refresh_token"),
        PendingRevocation(token="A1", hint="access_token")))
    effects = pump.start(stored(lifetime=3600), record)
    assert pump.session.credentials is None
    assert any(isinstance(e, Clear) for e in effects)
    with pytest.raises(NotSignedIn):
        pump.session.token_for(0, pump.now)
    assert sorted(form(s, "token") or "" for s in pump.sends("revoke")) == ["A1", "R1"]


def test_a_dead_refresh_token_keeps_the_sign_in_going_after_an_unused_code() -> None:
    # 4: the access token lives on, but nothing can renew it: codes keep coming.
    pump = Pump()
    pump.answer(pump.start_overdue(stored(lifetime=3600, issued_at=W0 - 3000)),
                oauth_error("invalid_grant"))
    pump.answer("device", code_answer("111111111", expires_in=120))
    pump.run_for(130, {"poll": oauth_error("authorization_pending")})
    assert len(pump.sends("device")) == 2


def test_with_a_button_a_restart_keeps_waiting_for_the_press() -> None:
    # 13, 12
    pump = Pump(make_settings(button=True))
    pump.start(record=SessionRecord(codes_expired_unused=3))
    pump.run_for(7200)
    assert pump.session.snapshot.phase == Phase.NEEDS_BUTTON
    assert not pump.sends("device")
    pump.feed(Login())
    assert len(pump.sends("device")) == 1


def test_codes_spent_under_a_wall_clock_behind_are_placed_again_when_ntp_corrects_it() -> None:
    # 12: fake-hwclock restored a time an hour behind; the budget was spent long ago.
    budget = make_settings(codes_per_hour=2)
    pump = Pump(budget)
    true_wall = pump.wall
    pump.wall -= 3600   # the clock at boot
    pump.start(record=SessionRecord(codes_spent=(true_wall - 5400, true_wall - 5300)))
    assert not pump.sends("device")          # counted as just spent: held back
    pump.wall += 3600                        # NTP steps the clock
    pump.tick()
    assert len(pump.sends("device")) == 1


def test_connection_failures_do_not_spend_the_code_budget() -> None:
    # 11, 12
    pump = Pump(make_settings(codes_per_hour=2, retry_max=5.0))
    pump.start()
    for _ in range(5):
        pump.fail("device", "connection refused")
        pump.run_for(6)
    assert len(pump.sends("device")) == 6


def test_a_provider_answering_503_does_not_spend_the_code_budget() -> None:
    # A proxy in front of authentik answers 503 while authentik is down: no code was
    # issued and authentik counted nothing, so the device's own budget must not run out
    # either. It did: after a 30-minute outage a device that was signing in waited
    # another half hour for a code (bench/fleet.py --outage-kind 503).
    pump = Pump(make_settings(codes_per_hour=2, retry_max=5.0))
    pump.start()
    for _ in range(5):
        pump.answer("device", UNAVAILABLE)
        pump.run_for(6)
    assert len(pump.sends("device")) == 6


def test_a_zero_lifetime_token_is_served_to_a_caller_asking_nothing_more() -> None:
    # 1: expires_in 0 must keep working.
    pump = Pump()
    pump.show_code()
    pump.answer(pump.poll_now(), token_answer("A2", "R2", expires_in=0))
    tokens = pump.session.token_for(0, pump.now)
    assert isinstance(tokens, TokenSet) and tokens.access_token == "A2"
    # ...and it is not refreshed every few seconds for it.
    pump.run_for(600, {"refresh": lambda s: token_answer("A3", "R3", expires_in=0)})
    assert len(pump.sends("refresh")) <= 1


def test_a_token_without_a_lifetime_is_still_refreshed_now_and_then() -> None:
    # 1: without expires_in the refresh token must not age out unused.
    pump = Pump()
    pump.show_code()
    pump.answer(pump.poll_now(), token_answer("A2", "R2", expires_in=None))
    pump.run_for(2 * 3600, {"refresh": lambda s: token_answer("A3", "R3", expires_in=None)})
    assert 1 <= len(pump.sends("refresh")) <= 2


def test_only_the_latest_device_request_is_answered() -> None:
    # 14: a sign-out while a code is being asked for does not show a stale code.
    pump = Pump()
    pump.start(stored(lifetime=3600))
    pump.feed(Login(new_sign_in=True))
    first = pump.request("device")
    pump.feed(Logout())
    second = [s for s in pump.open.values() if s.purpose == "device" and s is not first]
    pump.answer(first, code_answer("111111111"))
    assert pump.session.snapshot.user_code != "111111111"
    if second:
        pump.answer(second[0], code_answer("222222222"))
        assert pump.session.snapshot.user_code == "222222222"


def test_short_token_lifetimes_are_refreshed_before_they_expire() -> None:
    # Issue 9 item 14: with 5 s tokens a fixed 10 s gap left them expired half the time.
    pump = Pump()
    pump.show_code()
    pump.answer(pump.poll_now(), token_answer("A0", "R0", expires_in=5))
    numbers = itertools.count(1)

    def rotate(_send: Send) -> HttpResponse:
        n = next(numbers)
        return token_answer(f"A{n}", f"R{n}", expires_in=5)

    expired_at: list[float] = []
    for _ in range(120):
        pump.run_for(0.5, {"refresh": rotate})
        left = pump.session.remaining(pump.now)
        if left is not None and left <= 0:
            expired_at.append(pump.elapsed)
    assert len(pump.sends("refresh")) >= 10
    assert expired_at == []


def test_a_caller_looping_on_a_min_ttl_near_the_lifetime_gets_one_refresh_per_gap() -> None:
    # Issue 9 item 5: a reader looping on min_ttl=3599.995 caused 886 refreshes in 10 s.
    pump = Pump()
    pump.start(stored(lifetime=3600))
    numbers = itertools.count(2)
    refused = 0
    for _ in range(200):
        try:
            decision = pump.session.token_for(3599.995, pump.now)
        except ProviderUnavailable:
            refused += 1
        else:
            if isinstance(decision, Refresh):
                pump.feed(Refresh())
                if pump.open:
                    n = next(numbers)
                    pump.answer("refresh", token_answer(f"A{n}", f"R{n}"))
        pump.advance(0.05)   # 200 calls in 10 s
    assert len(pump.sends("refresh")) <= 2
    assert refused >= 190



# -- OpenID Connect checks (issue 9 item 3) ---------------------------------------------

@pytest.mark.parametrize(("change", "problem"), [
    ({"aud": "someone-else"}, "aud"),
    ({"aud": ["device-agent", "api"]}, "azp"),
    ({"aud": ["device-agent", "api"], "azp": "api"}, "azp"),
    ({"exp": W0 - 3600}, "expired"),
    ({"iat": W0 + 3600}, "future"),
    ({"iss": "https://evil.test/"}, "iss"),
])
def test_an_id_token_that_fails_a_check_is_dropped_but_the_tokens_are_kept(
        change: dict[str, Any], problem: str) -> None:
    pump = Pump(make_settings(issuer=ISSUER))
    pump.start()
    pump.answer("discovery", metadata())
    pump.answer("device", code_answer())
    effects = pump.answer(pump.poll_now(), token_answer(
        "A2", "R2", id_token=jwt({**ALICE, "iss": ISSUER, **change})))
    creds = pump.session.credentials
    assert creds is not None
    assert (creds.tokens.access_token, creds.tokens.refresh_token) == ("A2", "R2")
    assert creds.tokens.id_token is None and "name" not in creds.claims
    assert [s.credentials.tokens.refresh_token for s in saves(effects)][:1] == ["R2"]
    assert any(problem in e.message for e in effects if isinstance(e, Log))


def test_a_checked_id_token_is_kept_with_its_claims() -> None:
    pump = Pump(make_settings(issuer=ISSUER))
    pump.start()
    pump.answer("discovery", metadata())
    pump.answer("device", code_answer())
    good = jwt({**ALICE, "iss": ISSUER, "aud": ["device-agent", "api"], "azp": "device-agent"})
    pump.answer(pump.poll_now(), token_answer("A2", "R2", id_token=good))
    creds = pump.session.credentials
    assert creds is not None and creds.tokens.id_token == good
    assert creds.claims["name"] == "Alice"


def test_after_a_refresh_without_an_id_token_the_old_one_is_not_served_as_current() -> None:
    pump = Pump()
    pump.show_code()
    pump.answer(pump.poll_now(), token_answer("A2", "R2"))
    assert pump.session.credentials is not None
    assert pump.session.credentials.tokens.id_token == ALICE_ID_TOKEN
    pump.feed(Refresh())
    pump.answer("refresh", token_answer("A3", "R3", id_token=None))
    creds = pump.session.credentials
    assert creds is not None and creds.tokens.access_token == "A3"
    assert creds.tokens.id_token is None
    assert creds.claims["name"] == "Alice"   # who signed in is still known


def test_userinfo_naming_another_subject_is_not_used() -> None:
    # OpenID Connect Core §5.3.2.
    pump = Pump()
    pump.show_code()
    nameless = jwt({k: v for k, v in ALICE.items() if k != "name"})
    pump.answer(pump.poll_now(), token_answer("A2", "R2", id_token=nameless))
    pump.answer("userinfo", reply(200, {"sub": "someone-else", "name": "Mallory"}))
    creds = pump.session.credentials
    assert creds is not None and "name" not in creds.claims
    assert pump.session.snapshot.user == "u-1"


# -- refresh retries near expiry ---------------------------------------------------------

def test_a_failing_refresh_waits_its_back_off_until_a_last_try_before_expiry() -> None:
    # After an outage, a wait cut to a fraction of the time left brought every device
    # near expiry back in its first seconds (bench/fleet.py: peak/mean 2.58). The back-off
    # spreads them; a last try 30-60 s before expiry keeps each token from lapsing.
    for seed in range(20):
        pump = Pump(seed=seed)
        pump.start(stored(lifetime=3600.0, issued_at=W0 - 2880.0))  # due: 720 s left
        pump.run_until(M0 + 720.0, {"refresh": UNAVAILABLE})
        lefts = [720.0 - pump.at(send) for send in pump.sends("refresh")]
        assert any(30.0 <= left <= 60.0 for left in lefts), lefts
        assert min(lefts) < 5.0, lefts  # and tries to the end
        quick = 1 + QUICK_REFRESH_RETRIES  # the first try and its quick retries
        for before, after in itertools.pairwise(lefts[quick:]):
            if before > 120.0:
                assert before - after >= 150.0 or 30.0 <= after <= 60.0, lefts


def _first_refresh_after_a_start(left: float, seed: int) -> float:
    """Started from disk with an hour token `left` from expiry, its refresh overdue:
    seconds until the refresh goes out."""
    pump = Pump(seed=seed)
    pump.start(stored(lifetime=3600.0, issued_at=W0 + left - 3600.0))
    pump.run_for(3600.0, {"refresh": token_answer()})
    return pump.at(pump.sends("refresh")[0])


@pytest.mark.parametrize(("left", "within"), [(600.0, 30.0), (80.0, 10.0), (-600.0, 5.0)],
                         ids=["valid", "two-minutes-left", "expired"])
def test_devices_started_together_spread_their_overdue_refreshes(
        left: float, within: float) -> None:
    # Power comes back at a site: every device starts at once with its refresh overdue.
    # Each waits a random part of half a minute (less as its token nears its last try,
    # a few seconds once it has expired), so the provider does not get them all in one
    # second.
    firsts = [_first_refresh_after_a_start(left, seed) for seed in range(40)]
    assert max(firsts) <= within
    busiest = Counter(int(first) for first in firsts).most_common(1)[0][1]
    assert busiest <= len(firsts) // 4, sorted(firsts)


def test_a_token_within_a_minute_of_expiry_at_start_up_is_refreshed_at_once() -> None:
    assert {_first_refresh_after_a_start(50.0, seed) for seed in range(10)} == {0.0}


def test_the_start_up_spread_ends_with_the_first_refresh() -> None:
    # 10 s tokens, expired at the start: a caller refreshes at once. The next token's
    # scheduled refresh (at 8 s) and the quick retry of a failed one are not held to the
    # start-up draw.
    for seed in range(10):
        pump = Pump(seed=seed)
        pump.start(stored(lifetime=10.0, issued_at=W0 - 100.0))
        assert isinstance(pump.session.token_for(0.0, pump.now), Refresh)
        pump.answer(sends(pump.feed(Refresh()), "refresh")[0], token_answer(expires_in=10))
        pump.run_for(9.0, {"refresh": token_answer(expires_in=10)})
        assert [pump.at(send) for send in pump.sends("refresh")] == [0.0, 8.0]


def test_a_caller_does_not_wait_for_the_spread_of_an_overdue_refresh() -> None:
    pump = Pump(seed=1)
    pump.start(stored(lifetime=3600.0, issued_at=W0 - 3600.0))  # expired at the start
    assert not pump.sends("refresh")
    assert isinstance(pump.session.token_for(60.0, pump.now), Refresh)
    assert len(sends(pump.feed(Refresh()), "refresh")) == 1
