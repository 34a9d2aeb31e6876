"""Where the sans-IO core meets the network, the disk and time.

The lifecycle (DESIGN.md §2): load the store; with valid tokens, serve them and
refresh before they expire; without, show a code and poll until the person approves;
when the refresh token dies, start over with a new code. The clock, the transport and
the store are passed in, so tests run minutes of protocol in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from agent.clock import Clock
from agent.errors import (
    AgentError,
    DiscoveryFailed,
    NotSignedIn,
    OAuthError,
    ProviderError,
    StoreError,
    TransportError,
)
from agent.logs import fingerprint
from agent.oauth import (
    Approved,
    Client,
    CodeIssued,
    Denied,
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
    authentik_endpoints,
    device_authorization_request,
    discovery_requests,
    id_token_claims,
    parse_discovery,
    receive_device_authorization,
    receive_refresh,
    receive_revocation,
    receive_userinfo,
    refresh_request,
    revocation_request,
    userinfo_request,
)
from agent.oauth.flow import PollEvent
from agent.pacing import Backoff, CodeBudget
from agent.state import Phase, Snapshot, clock_time
from agent.store import Credentials, CredentialStore

__all__ = [
    "Driver",
    "DriverSettings",
    "MinTtlTooLong",
    "ProviderUnavailable",
    "Sender",
    "not_signed_in_reason",
    "user_label",
]

log = logging.getLogger(__name__)

# authentik's default code lifetime is 60 s; a person with a phone needs longer.
SHORT_CODE_LIFETIME = 120.0
# After a refusal, the screen says so for this long before a new code appears.
DENIED_PAUSE = 60.0
# Scheduled refreshes never come closer together than this, whatever the provider's
# token lifetimes or the margin say.
MIN_REFRESH_GAP = 10.0
# A sleep is cut into slices of this length, so a wall-clock jump is noticed in time.
RECHECK_INTERVAL = 60.0
# How long sign-out waits for a refresh in flight before revoking.
REFRESH_WAIT = 10.0
# A wall clock that moved this much against the monotonic one has jumped (NTP at boot).
CLOCK_JUMP = 30.0


class Sender(Protocol):
    async def send(self, request: HttpRequest) -> HttpResponse: ...


class ProviderUnavailable(AgentError):
    """A token fresh enough could not be had because the provider is not answering."""


class MinTtlTooLong(AgentError):
    """No token this provider issues lives as long as was asked: refreshing would not
    help, and refreshing on every such request would wear the provider and the disk."""


@dataclass(frozen=True, kw_only=True)
class DriverSettings:
    client: Client
    scopes: tuple[str, ...]
    device_name: str
    issuer: str | None = None
    endpoints: Endpoints | None = None       # explicit: no discovery
    allow_insecure_http: bool = False
    codes_per_hour: int = 12
    throttle_backoff: float = 600.0
    throttle_backoff_max: float = 3600.0
    retry_initial: float = 2.0
    retry_max: float = 300.0
    refresh_margin: float | None = None
    refresh_margin_ratio: float = 0.2
    refresh_retry_initial: float = 2.0
    refresh_retry_max: float = 300.0


class _Interrupted(Exception):
    """A wait was cut short by a login or logout request."""


class Driver:
    def __init__(self, settings: DriverSettings, *, sender: Sender, store: CredentialStore,
                 clock: Clock, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._sender = sender
        self._store = store
        self._clock = clock
        self._rng = rng or random.Random()
        self._budget = CodeBudget(settings.codes_per_hour)
        self._endpoints = settings.endpoints
        self._credentials: Credentials | None = None
        self._deadline: float | None = None        # monotonic expiry of the access token
        self._deadline_from_wall = False           # True: derived from a stored wall time
        self._wall_offset = 0.0                    # wall - monotonic when _deadline was set
        self._refresh_task: asyncio.Task[TokenSet] | None = None
        self._wake = asyncio.Event()
        self._login_requested = False
        self._logged_findings: set[str] = set()
        self._snapshot = Snapshot(phase=Phase.STARTING, device_name=settings.device_name)
        # Set and replaced on every publish: waiters wake without locks or tasks.
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._token_listeners: list[Callable[[Credentials | None], None]] = []
        self._poll: DevicePoll | None = None
        self._loaded = False
        self._last_refresh: float | None = None    # monotonic time of the last success
        self._unsaved: Credentials | None = None   # in memory only: the disk write failed

    # -- observation -------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def credentials(self) -> Credentials | None:
        return self._credentials

    @property
    def clock(self) -> Clock:
        return self._clock

    def add_listener(self, listener: Callable[[Snapshot], None]) -> None:
        """`listener` is called on the loop with every new snapshot; it must not block."""
        self._listeners.append(listener)

    def add_token_listener(self, listener: Callable[[Credentials | None], None]) -> None:
        """`listener` is called on the loop whenever the access token changes (None: the
        credentials are gone). By then, the new credentials are on disk."""
        self._token_listeners.append(listener)

    async def wait_for(self, condition: Callable[[Snapshot], bool]) -> Snapshot:
        while not condition(self._snapshot):
            await self._changed.wait()
        return self._snapshot

    async def wait_for_change(self, since: Snapshot) -> Snapshot:
        """The first snapshot after `since` (cancellation-safe: it holds no state)."""
        return await self.wait_for(lambda current: current is not since)

    def _publish(self, phase: Phase, **fields: object) -> None:
        creds = self._credentials
        base = Snapshot(
            phase=phase,
            device_name=self.settings.device_name,
            user=user_label(creds),
            token_expires_at=self._token_expires_at(),
        )
        snapshot = replace(base, **fields)  # type: ignore[arg-type]
        if snapshot == self._snapshot:
            return
        self._snapshot = snapshot
        for listener in self._listeners:
            try:
                listener(snapshot)
            except Exception:
                log.exception("a state listener failed")
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- token validity ----------------------------------------------------------

    def _set_credentials(self, creds: Credentials | None, *, from_disk: bool = False) -> None:
        before = self._credentials
        self._credentials = creds
        self._deadline = None
        if creds is not None and creds.tokens.expires_at is not None:
            self._set_deadline(creds.tokens.expires_at, creds.tokens.issued_at, from_disk)
        if (before and before.tokens.access_token) != (creds and creds.tokens.access_token):
            for listener in self._token_listeners:
                try:
                    listener(creds)
                except Exception:
                    log.exception("a token listener failed")

    def _set_deadline(self, expires_at: float, issued_at: float, from_disk: bool) -> None:
        mono, wall = self._clock.monotonic(), self._clock.time()
        self._wall_offset = wall - mono
        self._deadline_from_wall = from_disk
        if from_disk:
            self._deadline = mono + (expires_at - wall)
        else:
            self._deadline = mono + (expires_at - issued_at)

    def _check_clock_jump(self) -> None:
        """A Pi boots with a stale wall clock and NTP moves it later. A token read from
        disk was judged by that stale clock, so its deadline is re-derived from the
        corrected wall time; a token received in this run keeps its monotonic deadline
        (the provider's expires_in was relative, so the wall clock never mattered)."""
        if self._deadline is None or self._credentials is None:
            return
        mono, wall = self._clock.monotonic(), self._clock.time()
        jump = (wall - mono) - self._wall_offset
        if abs(jump) < CLOCK_JUMP:
            return
        log.warning("the wall clock moved by %+.0f s; re-checking the token's expiry", jump)
        self._wall_offset = wall - mono
        expires_at = self._credentials.tokens.expires_at
        if self._deadline_from_wall and expires_at is not None:
            self._deadline = mono + (expires_at - wall)

    def remaining(self) -> float | None:
        """Seconds the access token still lives; None when the provider gave no expiry."""
        self._check_clock_jump()
        if self._deadline is None:
            return None
        return self._deadline - self._clock.monotonic()

    def _token_expires_at(self) -> float | None:
        left = self.remaining()
        return None if left is None else self._clock.time() + left

    def _still_usable(self) -> bool:
        """Valid now, or can be made valid by a refresh."""
        creds = self._credentials
        return creds is not None and (self._valid() or creds.tokens.refresh_token is not None)

    def _valid(self) -> bool:
        if self._credentials is None:
            return False
        left = self.remaining()
        return left is None or left > 0

    # -- what local consumers call -----------------------------------------------

    async def get_token(self, min_ttl: float = 0.0) -> TokenSet:
        """A token that lives at least `min_ttl` more seconds, refreshing first when
        needed (one refresh shared by every caller). oidc-agent's min-lifetime idea."""
        if self._credentials is None:
            raise NotSignedIn(not_signed_in_reason(self._snapshot))
        left = self.remaining()
        if left is None or left > min_ttl:
            return self._credentials.tokens
        tokens = self._credentials.tokens
        if tokens.expires_at is not None and min_ttl >= tokens.expires_at - tokens.issued_at:
            raise MinTtlTooLong(
                f"min_ttl {min_ttl:.0f} s is not below the provider's token lifetime "
                f"({tokens.expires_at - tokens.issued_at:.0f} s)")
        if self._credentials.tokens.refresh_token is None:
            if left > 0:
                raise ProviderUnavailable(
                    f"the token lives {left:.0f} s, less than the {min_ttl:.0f} s asked for, "
                    "and there is no refresh token")
            raise NotSignedIn("the token expired and there is no refresh token")
        try:
            return await self.refresh()
        except (TransportError, ProviderError, OAuthError) as exc:
            left = self.remaining() or 0.0
            if min_ttl <= 0 and left > 0 and self._credentials is not None:
                return self._credentials.tokens
            raise ProviderUnavailable(f"refresh failed: {exc}") from None

    async def refresh(self) -> TokenSet:
        """Refresh now; concurrent callers share the one request (RFC 6749 §6)."""
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.get_running_loop().create_task(self._refresh())
        # shield: a caller that gives up must not abort a refresh whose new refresh
        # token is about to be written (the old one is already revoked at authentik).
        return await asyncio.shield(self._refresh_task)

    def request_login(self, *, new_sign_in: bool = False) -> float:
        """Ask for a new code now (within the budget) while signing in; with
        `new_sign_in`, also start over when already signed in (the current token is
        served until the new sign-in completes). Returns the monotonic time the next
        code can come."""
        if new_sign_in or self._credentials is None:
            self._login_requested = True
            self._wake.set()
        return self._budget.next_allowed(self._clock.monotonic())

    async def logout(self) -> list[str]:
        """Revoke the refresh and access token at the provider (RFC 7009), then wipe
        local state and sign in again. Returns the problems met (revocation is best
        effort: the local wipe happens regardless)."""
        problems: list[str] = []
        await self.settle(REFRESH_WAIT)  # revoke what a refresh in flight is about to store
        creds = self._credentials
        if creds is not None:
            problems = await self._revoke(creds.tokens)
        await self._clear_store()
        self._set_credentials(None)
        log.info("signed out; local credentials removed")
        self._login_requested = True
        self._wake.set()
        return problems

    async def settle(self, grace: float) -> None:
        """Give an in-flight refresh up to `grace` seconds to land on disk."""
        task = self._refresh_task
        if task is not None and not task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), grace)

    # -- the lifecycle -----------------------------------------------------------

    async def run(self) -> None:
        if not self._loaded:
            await self.load()
        while True:
            if self._credentials is None or self._login_requested:
                await self._sign_in()
            else:
                await self._stay_signed_in()

    async def load(self) -> None:
        """Read the store: valid credentials are served at once, with no network call."""
        self._loaded = True
        creds = await asyncio.to_thread(self._store.load)
        if creds is None:
            return
        if creds.client_id != self.settings.client.client_id or (
                self.settings.issuer is not None
                and (creds.issuer or "").rstrip("/") != self.settings.issuer.rstrip("/")):
            log.info("stored credentials belong to another client or issuer; signing in anew")
            return
        self._set_credentials(creds, from_disk=True)
        if self._valid():
            log.info("loaded credentials for %s (token %s), valid for %s",
                     user_label(creds) or "unknown user", fingerprint(creds.tokens.access_token),
                     _duration(self.remaining()))
            self._publish(Phase.SIGNED_IN)
        elif creds.tokens.refresh_token is None:
            log.info("stored token expired and cannot be refreshed; signing in anew")
            self._set_credentials(None)

    async def _wait(self, seconds: float) -> None:
        """Sleep on the injected clock; a login/logout request cuts it short."""
        if self._wake.is_set():
            raise _Interrupted
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait([sleeper, waker], return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()
        if self._wake.is_set():
            raise _Interrupted

    async def _send(self, request: HttpRequest) -> HttpResponse:
        return await self._sender.send(request)

    async def _resolve_endpoints(self) -> Endpoints:
        if self._endpoints is not None:
            return self._endpoints
        issuer = self.settings.issuer
        if issuer is None:
            raise DiscoveryFailed("no issuer and no explicit endpoints")
        failures: list[str] = []
        for request in discovery_requests(issuer):
            response = await self._send(request)
            if response.status == 404:
                failures.append(f"{request.url}: HTTP 404")
                continue
            self._endpoints = parse_discovery(
                response, issuer=issuer, allow_insecure_http=self.settings.allow_insecure_http,
                fallback=authentik_endpoints(issuer))
            log.info("provider endpoints: device %s, token %s",
                     self._endpoints.device_authorization, self._endpoints.token)
            self._check_scopes(self._endpoints)
            return self._endpoints
        raise DiscoveryFailed("no metadata document: " + "; ".join(failures))

    def _check_scopes(self, endpoints: Endpoints) -> None:
        if ("offline_access" in self.settings.scopes and endpoints.scopes_supported is not None
                and "offline_access" not in endpoints.scopes_supported):
            self._finding(
                "no-offline-scope",
                "the provider does not list the offline_access scope, so it may issue no "
                "refresh token (authentik: add the offline_access scope mapping to the "
                "provider)")

    def _finding(self, key: str, message: str) -> None:
        """A provider setup problem, said once per run."""
        if key not in self._logged_findings:
            self._logged_findings.add(key)
            log.warning("%s", message)

    # -- signing in ----------------------------------------------------------------

    async def _sign_in(self) -> None:
        retry = Backoff(self.settings.retry_initial, self.settings.retry_max, rng=self._rng)
        throttle_delay = self.settings.throttle_backoff
        pause_until: float | None = None
        phase_while_paused = Phase.CODE_EXPIRED
        while True:
            now = self._clock.monotonic()
            if self._login_requested:
                # An explicit request skips a pause, but never the budget.
                self._login_requested = False
                self._wake.clear()
                pause_until = None
            start_at = max(self._budget.next_allowed(now), pause_until or now)
            if start_at > now:
                if phase_while_paused == Phase.CODE_EXPIRED and pause_until is None:
                    log.warning("used %d codes in the last hour; next code at %s",
                                self._budget.used, clock_time(self._to_wall(start_at)))
                self._publish(phase_while_paused, next_code_at=self._to_wall(start_at),
                              last_error=self._snapshot.last_error)
                with contextlib.suppress(_Interrupted):
                    await self._wait(start_at - now)
                continue
            pause_until = None
            try:
                endpoints = await self._resolve_endpoints()
                self._budget.spend(self._clock.monotonic())
                response = await self._send(device_authorization_request(
                    self.settings.client, endpoints.device_authorization, self.settings.scopes))
            except (TransportError, ProviderError) as exc:
                delay = retry.next_delay()
                log.warning("cannot reach the provider (%s); retrying in %.0f s", exc, delay)
                self._publish(Phase.NO_NETWORK, last_error=str(exc))
                with contextlib.suppress(_Interrupted):
                    await self._wait(delay)
                continue
            event = receive_device_authorization(
                response, now=self._clock.monotonic(), now_wall=self._clock.time())
            match event:
                case Throttled(retry_after=hint):
                    # The provider's hint counts, within the configured ceiling.
                    delay = min(max(throttle_delay, hint or 0.0),
                                self.settings.throttle_backoff_max)
                    throttle_delay = min(throttle_delay * 2, self.settings.throttle_backoff_max)
                    log.warning("the provider is rationing device codes (HTTP %d); next try "
                                "in %s", response.status, _duration(delay))
                    pause_until = self._clock.monotonic() + delay
                    phase_while_paused = Phase.THROTTLED
                    self._publish(Phase.THROTTLED, last_error="provider busy",
                                  next_code_at=self._to_wall(pause_until))
                    continue
                case ServerTrouble(reason=reason, retry_after=hint):
                    delay = retry.next_delay(floor=min(hint or 0.0, self.settings.retry_max))
                    log.warning("device authorization failed (%s); retrying in %.0f s",
                                reason, delay)
                    self._publish(Phase.NO_NETWORK, last_error=reason)
                    with contextlib.suppress(_Interrupted):
                        await self._wait(delay)
                    continue
                case Rejected(error=error):
                    await self._rejected(error, "device authorization")
                    continue
                case CodeIssued(authorization=authorization):
                    retry.reset()
                    throttle_delay = self.settings.throttle_backoff
                    phase_while_paused = Phase.CODE_EXPIRED
            outcome = await self._poll_code(DevicePoll(
                authorization, client=self.settings.client, token_endpoint=endpoints.token))
            if isinstance(outcome, Denied | Expired) and self._still_usable():
                # A new sign-in asked for while signed in, and nobody completed it:
                # the current sign-in stays, rather than a device stuck showing codes
                # while its token runs out unrefreshed.
                log.info("the new sign-in was not completed; keeping the current one")
                self._publish(Phase.SIGNED_IN)
                return
            match outcome:
                case Approved(tokens=tokens):
                    await self._signed_in(tokens, endpoints)
                    return
                case Denied(description=description):
                    log.warning("sign-in was denied%s", f": {description}" if description else "")
                    pause_until = self._clock.monotonic() + DENIED_PAUSE
                    phase_while_paused = Phase.DENIED
                    self._publish(Phase.DENIED, last_error=description or "access denied",
                                  next_code_at=self._to_wall(pause_until))
                case Expired(by_provider=by_provider):
                    log.info("code expired (%s)",
                             "provider said so" if by_provider else "its lifetime passed")
                case Rejected(error=error):
                    await self._rejected(error, "token polling")
                case None:
                    pass  # a login request: a new code at once

    async def _rejected(self, error: OAuthError, what: str) -> None:
        message = f"{what} refused: {error}"
        if error.code == "invalid_client":
            message += " (is provider.client_id right, and is the application bound to it?)"
        log.error("%s", message)
        retry_at = self._clock.monotonic() + self.settings.retry_max
        self._publish(Phase.CONFIG_ERROR, last_error=message,
                      next_code_at=self._to_wall(retry_at))
        with contextlib.suppress(_Interrupted):
            await self._wait(self.settings.retry_max)

    async def _poll_code(self, poll: DevicePoll) -> Approved | Denied | Expired | Rejected | None:
        auth = poll.authorization
        if auth.expires_in < SHORT_CODE_LIFETIME:
            self._finding(
                "short-code",
                f"codes expire after {auth.expires_in:.0f} s, too short to read, unlock a "
                "phone and approve; give codes at least 5 minutes (authentik: raise the "
                "provider's Access code validity, e.g. minutes=10)")
        log.info("code %s: open %s and enter it (valid for %.0f s)", auth.user_code,
                 auth.verification_uri, auth.expires_in)
        self._publish(
            Phase.AWAITING_USER,
            user_code=auth.user_code,
            verification_uri=auth.verification_uri,
            verification_uri_complete=auth.verification_uri_complete,
            code_deadline=auth.deadline,
            code_expires_at=self._to_wall(auth.deadline),
        )
        self._poll = poll
        try:
            while True:
                now = self._clock.monotonic()
                if poll.expired(now):
                    return Expired(by_provider=False)
                try:
                    await self._wait(min(poll.next_poll_at, poll.deadline) - now)
                except _Interrupted:
                    if self._login_requested:
                        return None
                    raise
                now = self._clock.monotonic()
                if poll.expired(now):
                    return Expired(by_provider=False)
                event: PollEvent
                try:
                    response = await self._send(poll.request())
                except TransportError as exc:
                    event = poll.connection_failed(str(exc), now=self._clock.monotonic())
                else:
                    event = poll.receive(response, now=self._clock.monotonic(),
                                         now_wall=self._clock.time())
                match event:
                    case Pending():
                        continue
                    case SlowDown(interval=interval):
                        log.info("provider asked to slow down; polling every %.0f s", interval)
                    case ServerTrouble(reason=reason):
                        log.warning("polling trouble (%s); next poll in %.0f s", reason,
                                    poll.next_poll_at - self._clock.monotonic())
                    case Approved() | Denied() | Expired() | Rejected():
                        return event
        finally:
            self._poll = None

    async def _signed_in(self, tokens: TokenSet, endpoints: Endpoints) -> None:
        claims = id_token_claims(tokens.id_token)
        if "name" not in claims and "preferred_username" not in claims and endpoints.userinfo:
            claims = {**claims, **await self._userinfo(tokens, endpoints.userinfo)}
        creds = Credentials(tokens=tokens, client_id=self.settings.client.client_id,
                            issuer=self.settings.issuer or endpoints.issuer, claims=claims)
        await self._persist(creds)
        if tokens.refresh_token is None:
            self._finding(
                "no-refresh-token",
                "no refresh token was issued, so a new sign-in is needed when this token "
                "expires; request the offline_access scope, and let the provider grant it "
                "(authentik: add the offline_access scope mapping to the provider)")
        log.info("signed in as %s (token %s, valid for %s)", user_label(creds) or "unknown user",
                 fingerprint(tokens.access_token), _duration(self.remaining()))
        self._publish(Phase.SIGNED_IN)

    async def _userinfo(self, tokens: TokenSet, endpoint: str) -> dict[str, str]:
        try:
            return receive_userinfo(await self._send(userinfo_request(tokens, endpoint=endpoint)))
        except (TransportError, ProviderError) as exc:
            log.info("userinfo unavailable (%s); the user's name stays unknown", exc)
            return {}

    async def _persist(self, creds: Credentials) -> None:
        """Disk first, then memory: once authentik has rotated the refresh token the old
        one is dead, so the new one must be safe before anyone is handed the new access
        token. Shielded: cancellation must not split the two."""
        async def write_then_use() -> None:
            try:
                await asyncio.to_thread(self._store.save, creds)
            except StoreError as exc:
                # The provider has already revoked the old refresh token: these are the
                # only valid credentials, so they are used, kept in memory and written
                # again later, rather than lost with the daemon.
                log.error("could not save the credentials (%s); keeping them in memory "
                          "and retrying", exc)
                self._unsaved = creds
            else:
                self._unsaved = None
            self._set_credentials(creds)

        await asyncio.shield(write_then_use())

    async def _clear_store(self) -> None:
        self._unsaved = None
        try:
            await asyncio.shield(asyncio.to_thread(self._store.clear))
        except StoreError as exc:
            log.error("could not remove the credential file: %s", exc)

    async def _retry_unsaved(self) -> None:
        creds = self._unsaved
        if creds is None or creds is not self._credentials:
            self._unsaved = None
            return
        try:
            await asyncio.shield(asyncio.to_thread(self._store.save, creds))
        except StoreError as exc:
            log.warning("the credentials are still not saved: %s", exc)
        else:
            self._unsaved = None
            log.info("the credentials are saved again")

    # -- staying signed in -------------------------------------------------------

    def _refresh_due_in(self) -> float | None:
        creds = self._credentials
        left = self.remaining()
        if creds is None or left is None:
            return None
        expires_at = creds.tokens.expires_at
        lifetime = (expires_at - creds.tokens.issued_at) if expires_at is not None else left
        margin = self.settings.refresh_margin
        if margin is None:
            margin = self.settings.refresh_margin_ratio * max(lifetime, 0.0)
        # A margin as long as the lifetime would refresh again the moment a refresh
        # lands; half the lifetime is the most that still lets a token be used.
        due_in = left - min(margin, 0.5 * max(lifetime, 0.0))
        if self._last_refresh is not None:
            due_in = max(due_in, self._last_refresh + MIN_REFRESH_GAP - self._clock.monotonic())
        return due_in

    async def _stay_signed_in(self) -> None:
        retry = Backoff(self.settings.refresh_retry_initial, self.settings.refresh_retry_max,
                        rng=self._rng)
        while self._credentials is not None and not self._login_requested:
            due_in = self._refresh_due_in()
            if self._credentials.tokens.refresh_token is None:
                if due_in is None:
                    await self._wait_for_request()
                    return
                # Nothing to refresh with: sign in again once the token is gone.
                left = self.remaining() or 0.0
                if left > 0:
                    with contextlib.suppress(_Interrupted):
                        await self._wait(min(left, RECHECK_INTERVAL))
                    continue
                log.info("the token expired and there is no refresh token; signing in anew")
                self._set_credentials(None)
                return
            if due_in is None:
                # No expiry given: refresh only when a consumer needs it.
                await self._wait_for_request()
                return
            if due_in > 0:
                # In slices: after an NTP jump the stored expiry is re-checked, and a
                # credential file that could not be written is retried.
                try:
                    await self._wait(min(due_in, RECHECK_INTERVAL))
                except _Interrupted:
                    return
                await self._retry_unsaved()
                continue
            try:
                await self.refresh()
            except NotSignedIn:
                return
            except (TransportError, ProviderError, OAuthError) as exc:
                left = self.remaining() or 0.0
                delay = min(retry.next_delay(), max(left / 2, self.settings.refresh_retry_initial)
                            ) if left > 0 else retry.next_delay()
                log.warning("refresh failed (%s); token %s; retrying in %.0f s", exc,
                            f"valid for {_duration(left)}" if left > 0 else "expired", delay)
                self._publish(Phase.REFRESH_FAILING, last_error=str(exc))
                try:
                    await self._wait(delay)
                except _Interrupted:
                    return
            else:
                retry.reset()

    async def _wait_for_request(self) -> None:
        with contextlib.suppress(_Interrupted):
            await self._wait(float("inf"))

    async def _refresh(self) -> TokenSet:
        creds = self._credentials
        if creds is None:
            raise NotSignedIn("not signed in")
        endpoints = await self._resolve_endpoints()
        response = await self._send(refresh_request(
            creds.tokens, client=self.settings.client, token_endpoint=endpoints.token))
        event = receive_refresh(response, previous=creds.tokens, now_wall=self._clock.time())
        match event:
            case Refreshed(tokens=tokens):
                if self._credentials is not creds:
                    # Signed out, or signed in anew, while this refresh was in flight:
                    # its answer belongs to credentials that are gone.
                    raise NotSignedIn("the credentials changed during the refresh")
                claims = {**creds.claims, **id_token_claims(tokens.id_token)}
                new = replace(creds, tokens=tokens, claims=claims)
                await self._persist(new)
                self._last_refresh = self._clock.monotonic()
                log.info("refreshed (token %s, valid for %s)", fingerprint(tokens.access_token),
                         _duration(self.remaining()))
                self._publish(Phase.SIGNED_IN)
                return tokens
            case RefreshRejected(error=error):
                log.warning("the refresh token was refused (%s); signing in anew", error)
                await self._clear_store()
                if self._credentials is creds:
                    self._set_credentials(None)
                self._login_requested = True
                self._wake.set()
                raise NotSignedIn(f"refresh refused: {error}")
            case Rejected(error=error):
                self._publish(Phase.CONFIG_ERROR, last_error=f"refresh refused: {error}")
                raise error
            case ServerTrouble(reason=reason):
                raise TransportError(f"refresh failed: {reason}")
        raise AssertionError(event)  # pragma: no cover

    async def _revoke(self, tokens: TokenSet) -> list[str]:
        problems: list[str] = []
        try:
            endpoints = await self._resolve_endpoints()
        except (TransportError, ProviderError) as exc:
            return [f"cannot reach the provider to revoke: {exc}"]
        if endpoints.revocation is None:
            return ["the provider has no revocation endpoint; tokens stay valid until they expire"]
        pairs: Sequence[tuple[str | None, str]] = (
            (tokens.refresh_token, "refresh_token"), (tokens.access_token, "access_token"))
        for token, hint in pairs:
            if token is None:
                continue
            try:
                outcome = receive_revocation(await self._send(revocation_request(
                    token, hint=hint, client=self.settings.client, endpoint=endpoints.revocation)))
            except TransportError as exc:
                problems.append(f"revoking the {hint}: {exc}")
                continue
            if outcome is not None:
                reason = (outcome.reason if isinstance(outcome, ServerTrouble)
                          else str(outcome.error))
                problems.append(f"revoking the {hint}: {reason}")
        for problem in problems:
            log.warning("%s", problem)
        return problems

    def _to_wall(self, mono: float) -> float:
        return self._clock.time() + (mono - self._clock.monotonic())

    @property
    def poll(self) -> DevicePoll | None:
        """The code being polled, if any (for status)."""
        return self._poll


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


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "an unknown time"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
