"""The pump: where the session machine (`agent.session`) meets the network, the disk
and time.

It feeds the session one input at a time, under a lock, and carries out the effects it
returns: requests are sent as tasks whose answers come back as inputs; credentials are
written (in a thread, shielded from cancellation) and the outcome fed back before any
other input, so nothing is served before it is on disk; the session's snapshot is
published after every input. Every wait runs on the injected clock, so tests run hours
of protocol in milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.clock import Clock
from agent.errors import (
    AgentError,
    NotSignedIn,
    ProviderUnavailable,
    StoreCorrupt,
    StoreError,
    TransportError,
)
from agent.oauth import HttpRequest, HttpResponse, TokenSet
from agent.session import (
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
from agent.sessionfile import SessionFile, SessionRecord
from agent.state import Snapshot
from agent.store import Credentials, CredentialStore

__all__ = ["Driver", "Exchange", "Sender"]

log = logging.getLogger(__name__)
# What the session says (its Log effects) is logged under its own name.
session_log = logging.getLogger("agent.session")

# How long a caller waits for a refresh it asked for (the transport's own timeout
# normally ends it sooner), and a sign-out for its revocations to be answered.
REFRESH_WAIT = 30.0
LOGOUT_WAIT = 10.0
# A timer that is due but starts nothing is looked at again after this long, rather
# than in a loop (a bug there must not spin a Pi's CPU).
IDLE_TICK = 1.0


class Sender(Protocol):
    async def send(self, request: HttpRequest) -> HttpResponse: ...


@dataclass(frozen=True, kw_only=True)
class Exchange:
    """One request to the provider, for observers (`agent.metrics`): what it was for
    (the session's `Send.purpose`: discovery, device, poll, refresh, userinfo, revoke),
    how long the sender took to answer or fail, on the real monotonic clock (the
    injected one is for the protocol's timers, and a hand-moved one stands still
    during real I/O), and the HTTP status (None: no answer came)."""

    purpose: str
    seconds: float
    status: int | None


class Driver:
    def __init__(self, settings: SessionSettings, *, sender: Sender, store: CredentialStore,
                 clock: Clock, rng: random.Random | None = None,
                 session_file: SessionFile | None = None) -> None:
        self.settings = settings
        self.session = Session(settings, rng=rng)
        self._sender = sender
        self._store = store
        self._clock = clock
        self._session_file = session_file or SessionFile(
            store.path.with_name("session.json"), machine_id=settings.machine_id,
            encryption=store.encryption)
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        # Set and replaced on every publish (and every input): waiters wake without
        # locks or tasks.
        self._changed = asyncio.Event()
        self._fed = asyncio.Event()
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._token_listeners: list[Callable[[Credentials | None], None]] = []
        self._exchange_listeners: list[Callable[[Exchange], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._loaded = False
        self._published: Snapshot | None = None

    # -- observation -------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        """The state as of the last input whose effects are all carried out."""
        return self._published or self.session.snapshot

    @property
    def credentials(self) -> Credentials | None:
        return self.session.credentials

    @property
    def clock(self) -> Clock:
        return self._clock

    def now(self) -> Instant:
        return Instant(self._clock.monotonic(), self._clock.time())

    def remaining(self) -> float | None:
        """Seconds the access token still lives; None when the provider gave no expiry."""
        return self.session.remaining(self.now())

    def add_listener(self, listener: Callable[[Snapshot], None]) -> None:
        """`listener` is called on the loop with every new snapshot; it must not block."""
        self._listeners.append(listener)

    def add_token_listener(self, listener: Callable[[Credentials | None], None]) -> None:
        """`listener` is called on the loop whenever the access token changes (None: the
        credentials are gone). By then, the new credentials are on disk."""
        self._token_listeners.append(listener)

    def add_exchange_listener(self, listener: Callable[[Exchange], None]) -> None:
        """`listener` is called on the loop for every request to the provider, as soon
        as the session has taken its answer (or failure), under the lock and before the
        effects of it are carried out: `session` (its `snapshot`, `refresh_error`) is
        then what that answer made, before any other input, and a caller waiting on
        the session (a sign-out on its revocations) is not told first. It must not
        block; it observes only."""
        self._exchange_listeners.append(listener)

    async def wait_for(self, condition: Callable[[Snapshot], bool]) -> Snapshot:
        while not condition(self.snapshot):
            await self._changed.wait()
        return self.snapshot

    async def wait_for_change(self, since: Snapshot) -> Snapshot:
        """The first snapshot after `since` (cancellation-safe: it holds no state)."""
        return await self.wait_for(lambda current: current is not since)

    # -- what local consumers call -----------------------------------------------

    @property
    def files(self) -> dict[str, Path]:
        """Where this driver keeps its state, for a person reading `status`."""
        return {"credentials": self._store.path, "session": self._session_file.path}

    async def get_token(self, min_ttl: float = 0.0) -> TokenSet:
        """A token that lives at least `min_ttl` more seconds, refreshing first when
        needed (one refresh shared by every caller, and never inside the refresh
        back-off). oidc-agent's min-lifetime idea."""
        decision = self.session.token_for(min_ttl, self.now())
        if isinstance(decision, TokenSet):
            return decision
        await self._refreshed()
        decision = self.session.token_for(min_ttl, self.now(), refreshed=True)
        assert isinstance(decision, TokenSet)
        return decision

    async def refresh(self) -> TokenSet:
        """Refresh now (`POST /v1/refresh`), sharing a refresh already in flight."""
        if self.session.credentials is None:
            raise NotSignedIn("not signed in")
        if not await self._refreshed():
            raise ProviderUnavailable(self.session.why_no_refresh(self.now())
                                      or "the refresh was not answered in time")
        creds = self.session.credentials
        if creds is None:
            raise NotSignedIn("signed out during the refresh")
        if self.session.refresh_error is not None:
            raise ProviderUnavailable(f"refresh failed: {self.session.refresh_error}")
        return creds.tokens

    async def _refreshed(self) -> bool:
        """Start a refresh (or join the one in flight) and wait for its answer; False
        when none could start or none came in time."""
        if not self.session.refreshing:
            done = self.session.refreshes_done
            try:
                await self._feed(Refresh())
            except IllegalInput:
                return False  # stopping
            if not self.session.refreshing and self.session.refreshes_done == done:
                return False  # none could start: the back-off, or the gap
        # Until the answer is in and its tokens on disk (or it failed).
        return await self._wait_until(lambda: not self.session.refreshing, REFRESH_WAIT)

    def request_login(self, *, new_sign_in: bool = False) -> None:
        """For callbacks that cannot await (the button): `login` in the background."""
        self._spawn(self._ignore_stopping(self.login(new_sign_in=new_sign_in)))

    async def login(self, *, new_sign_in: bool = False) -> float:
        """Ask for a code now (within the budget); with `new_sign_in`, also start over
        when signed in (the current token is served until the new sign-in completes).
        Returns the seconds until the next code can come (0: now)."""
        await self._feed(Login(new_sign_in=new_sign_in))
        return self.session.next_code_in(self.now())

    async def logout(self) -> list[str]:
        """Sign out: nothing is served from now on and the credential file is gone; the
        tokens are revoked at the provider (RFC 7009), including any that a request in
        flight brings later. Returns the problems met (revocation goes on in the
        background, across restarts, until the provider confirms it)."""
        await self._feed(Logout())
        settled = await self._wait_until(self.session.logout_settled, LOGOUT_WAIT)
        problems = list(self.session.logout_problems)
        if not settled:
            problems.append("the provider has not confirmed the revocation yet; it is "
                            "retried in the background")
        return problems

    # -- running -----------------------------------------------------------------

    async def load(self) -> None:
        """Read the store and the session record: valid credentials are served at once,
        with no network call."""
        self._loaded = True
        try:
            creds = loaded = await asyncio.to_thread(self._store.load)
        except StoreCorrupt as exc:
            # A dead device helps nobody: the file is kept aside for a person to look
            # at, and a new sign-in starts.
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock.time()))
            moved = await asyncio.to_thread(self._store.quarantine, stamp=stamp)
            log.error("the credential file is corrupt (%s); moved aside to %s; signing in "
                      "anew", exc, moved)
            creds = loaded = None
        if creds is not None and self._cloned(creds):
            # Not revoked: the refresh token is the other device's, and still its own.
            log.warning("the credential file was written on another machine (a cloned SD "
                        "card image?); signing in anew, and the other device keeps its "
                        "sign-in")
            creds = None
        if creds is not None and not self._belongs_here(creds):
            log.info("stored credentials belong to another client or issuer; signing in anew")
            creds = None
        record = await asyncio.to_thread(self._session_file.load)
        plain = await self._seal_plain_files(loaded, record)
        await self._feed(Start(credentials=creds, record=record))
        if plain and creds is not None and creds.tokens.refresh_token is not None:
            self._spawn(self._retire_plain_refresh_token(creds.tokens))

    async def _seal_plain_files(self, loaded: Credentials | None,
                                record: SessionRecord) -> bool:
        """The first start with a store key seals what it finds in plain text before
        anything is served; True when credentials in plain text were sealed, and a plain
        copy of them may survive on the medium."""
        plain = False
        if self._store.needs_sealing and loaded is not None:
            try:
                await asyncio.to_thread(self._store.save, loaded)
            except StoreError as exc:
                # The plain file is still the store: refreshing now would rotate its
                # refresh token away while the new one cannot be written.
                log.error("could not seal the credential file that is in plain text: %s", exc)
            else:
                plain = True
                log.warning("the credential file was in plain text; it is sealed now")
        if self._session_file.needs_sealing:
            try:
                await asyncio.to_thread(self._session_file.save, record)
            except StoreError as exc:
                log.warning("could not seal the session file that is in plain text: %s", exc)
        return plain

    async def _retire_plain_refresh_token(self, plain: TokenSet) -> None:
        """The plain copy's bytes may survive in the flash's free blocks: a refresh at
        once makes the provider rotate its refresh token away."""
        log.info("refreshing at once, so that the refresh token that was in plain text is "
                 "no longer the one in use")
        try:
            tokens = await self.refresh()
        except AgentError as exc:
            log.warning("the refresh after sealing failed (%s): the refresh token that was "
                        "in plain text is in use until the next refresh", exc)
            return
        if tokens.refresh_token == plain.refresh_token:
            log.warning("the provider did not rotate the refresh token, so the one that was "
                        "in plain text still works; `device-agent login` signs in anew, "
                        "which revokes it")
        else:
            log.info("the refresh token that was in plain text has been rotated away")

    def _cloned(self, creds: Credentials) -> bool:
        here = self.settings.machine_id
        return here is not None and creds.machine_id is not None and creds.machine_id != here

    def _belongs_here(self, creds: Credentials) -> bool:
        issuer = self.settings.issuer
        return creds.client_id == self.settings.client.client_id and (
            issuer is None or (creds.issuer or "").rstrip("/") == issuer.rstrip("/"))

    async def run(self) -> None:
        """Feed the session its timers until cancelled."""
        if not self._loaded:
            await self.load()
        while True:
            # Read under the lock, never in the middle of another input's effects, and
            # cleared first: a feed after this point wakes the wait.
            async with self._lock:
                self._kick.clear()
                at = self.session.next_timer()
            delay = float("inf") if at is None else at - self._clock.monotonic()
            if delay > 0:
                await self._race(self._kick.wait(), delay)
                continue
            await self._feed(Tick())
            at = self.session.next_timer()
            if at is not None and at <= self._clock.monotonic():
                log.debug("a timer is due but started nothing; looking again in %g s",
                          IDLE_TICK)
                await self._race(self._kick.wait(), IDLE_TICK)

    async def stop(self, grace: float) -> None:
        """Start nothing new, and give answers in flight up to `grace` seconds to land
        (a rotated refresh token must reach the disk); then abandon the rest."""
        await self._feed(Stop())
        await self._wait_until(self.session.settled, grace)
        await self.aclose()

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the pump ----------------------------------------------------------------

    async def _feed(self, event: Input, exchange: Exchange | None = None) -> bool:
        """Hand `event` to the session and carry out its effects. Shielded: a caller
        that gives up must not split a write from the input that reports it. True when
        the input had any effect. `exchange`: the request whose answer `event` is, told
        to the exchange listeners once the session has taken it."""
        return await asyncio.shield(self._feed_locked(event, exchange))

    async def _feed_locked(self, event: Input, exchange: Exchange | None = None) -> bool:
        async with self._lock:
            before = self.session.credentials
            pending = list(self.session.handle(event, self.now()))
            if exchange is not None:
                for observer in self._exchange_listeners:
                    try:
                        observer(exchange)
                    except Exception:
                        log.exception("an exchange listener failed")
            acted = bool(pending)
            while pending:
                effect = pending.pop(0)
                pending += await self._perform(effect)
            self._publish()
            after = self.session.credentials
            if (before and before.tokens.access_token) != (after and after.tokens.access_token):
                for listener in self._token_listeners:
                    try:
                        listener(after)
                    except Exception:
                        log.exception("a token listener failed")
        self._kick.set()
        fed, self._fed = self._fed, asyncio.Event()
        fed.set()
        return acted

    async def _perform(self, effect: Effect) -> list[Effect]:
        """Carry out one effect; returns the effects of what it fed back."""
        match effect:
            case Send(request_id=request_id, request=request, purpose=purpose):
                self._spawn(self._send(request_id, request, purpose))
            case Save(write_id=write_id, credentials=creds):
                try:
                    await asyncio.to_thread(self._store.save, creds)
                except Exception as exc:
                    # Whatever went wrong, the session must hear of it: the provider has
                    # rotated, and these credentials live on in memory until a write works.
                    reason = str(exc) if isinstance(exc, StoreError) else type(exc).__name__
                    if not isinstance(exc, StoreError):
                        log.error("writing the credentials failed unexpectedly (%s)", reason)
                    return self.session.handle(SaveFailed(write_id=write_id, reason=reason),
                                               self.now())
                return self.session.handle(Saved(write_id=write_id), self.now())
            case Clear():
                try:
                    await asyncio.to_thread(self._store.clear)
                except StoreError as exc:
                    log.error("could not remove the credential file: %s", exc)
            case Record(record=record):
                try:
                    await asyncio.to_thread(self._session_file.save, record)
                except StoreError as exc:
                    log.warning("could not save the session record: %s", exc)
            case Log(level=level, message=message):
                session_log.log(level, "%s", message)
        return []

    async def _send(self, request_id: int, request: HttpRequest, purpose: str) -> None:
        started = time.perf_counter()
        outcome: Answered | Failed
        try:
            response = await self._sender.send(request)
        except TransportError as exc:
            outcome = Failed(request_id=request_id, error=exc)
        except Exception as exc:  # a bug below must not leave a request in flight forever
            log.exception("sending %s failed", request.url)
            outcome = Failed(request_id=request_id, error=TransportError(type(exc).__name__))
        else:
            outcome = Answered(request_id=request_id, response=response)
        exchange = Exchange(purpose=purpose, seconds=time.perf_counter() - started,
                            status=outcome.response.status
                            if isinstance(outcome, Answered) else None)
        await self._feed(outcome, exchange)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ignore_stopping(self, work: Coroutine[Any, Any, object]) -> None:
        try:
            await work
        except IllegalInput as exc:
            log.info("%s", exc)

    def _publish(self) -> None:
        snapshot = self.session.snapshot
        if snapshot == self._published:
            return
        self._published = snapshot
        for listener in self._listeners:
            try:
                listener(snapshot)
            except Exception:
                log.exception("a state listener failed")
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_until(self, condition: Callable[[], bool], seconds: float) -> bool:
        """Wait on the injected clock until `condition()` holds; False after `seconds`."""
        deadline = self._clock.monotonic() + seconds
        while not condition():
            left = deadline - self._clock.monotonic()
            if left <= 0:
                return False
            await self._race(self._fed.wait(), left)
        return True

    async def _race(self, awaitable: Coroutine[Any, Any, object], seconds: float) -> None:
        waiter = asyncio.ensure_future(awaitable)
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds)) if seconds != float(
            "inf") else None
        try:
            await asyncio.wait([f for f in (waiter, sleeper) if f is not None],
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if sleeper is not None:
                sleeper.cancel()
