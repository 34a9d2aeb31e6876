"""Lifecycle stories: one loopback story per promised behaviour, against the
authentik-like test provider over real HTTP, with the real credential store and session
file in a temp dir, and a ManualClock shared by the agent and the provider.

Each test names its behaviour and carries the behaviour's number in a comment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from agent.driver import Driver
from agent.errors import AgentError, NotSignedIn, ProviderUnavailable
from agent.idp import (
    Answer,
    Delay,
    ExpiryMode,
    Fail,
    IdentityProvider,
    ProviderSettings,
    RecordedRequest,
)
from agent.oauth.discovery import ExplicitEndpoints
from agent.sessionfile import SessionFile, SessionRecord
from agent.state import Phase, Snapshot
from agent.store import CredentialStore
from agent.transport import Transport
from tests.clock import ManualClock
from tests.harness import Running, StartDriver, settings_for

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"

# -- what the provider saw ---------------------------------------------------------


def polls(provider: IdentityProvider) -> list[RecordedRequest]:
    return [r for r in provider.requests
            if r.endpoint == "token" and r.form.get("grant_type") == DEVICE_GRANT]


def refresh_requests(provider: IdentityProvider, token: str | None = None,
                     ) -> list[RecordedRequest]:
    """Refresh requests, or those that carried the refresh token `token`."""
    return [r for r in provider.requests
            if r.endpoint == "token" and r.form.get("grant_type") == "refresh_token"
            and (token is None or r.form.get("refresh_token") == token)]


def refreshes(provider: IdentityProvider) -> int:
    return len(refresh_requests(provider))


def device_requests(provider: IdentityProvider) -> list[RecordedRequest]:
    return [r for r in provider.requests if r.endpoint == "device"]


def requests_to(provider: IdentityProvider, endpoint: str) -> list[RecordedRequest]:
    return [r for r in provider.requests if r.endpoint == endpoint]


def revocations_of(provider: IdentityProvider, token: str) -> list[RecordedRequest]:
    return [r for r in provider.requests if r.endpoint == "revoke"
            and r.form.get("token") == token]


# -- moving time -------------------------------------------------------------------


def _check_running(run: Running) -> None:
    if run.task.done():
        run.task.result()  # surface the driver's exception
        raise AssertionError("the driver stopped")


async def until(run: Running, condition: Callable[[Snapshot], bool], *,
                max_seconds: float = 86_400.0, real_timeout: float = 3.0) -> Snapshot:
    """Move the shared clock deadline by deadline until `condition` holds. Unlike the
    harness's, it fails fast when nothing more is due within `max_seconds` and no
    request is under way."""
    clock = run.clock
    assert isinstance(clock, ManualClock)
    loop = asyncio.get_running_loop()
    limit = clock.monotonic() + max_seconds
    give_up = loop.time() + real_timeout
    stalled_since: float | None = None

    def holds() -> bool:
        _check_running(run)
        return condition(run.driver.snapshot)

    while not holds():
        await asyncio.sleep(0.001)
        if holds():
            break
        now = loop.time()
        if now > give_up:
            raise TimeoutError(f"not met in real time; now {run.driver.snapshot}")
        deadline = clock.next_deadline
        if deadline is not None and deadline <= limit:
            stalled_since = None
            clock.advance(max(0.0, deadline - clock.monotonic()))
        elif deadline is not None:
            # Only later than the limit is due: the agent is idle.
            stalled_since = stalled_since if stalled_since is not None else now
            if now - stalled_since > 0.2:
                raise AssertionError(f"not met within {max_seconds} s of clock time; "
                                     f"now {run.driver.snapshot}")
        # No deadline: a request is under way; wait for it in real time.
    return run.driver.snapshot


async def run_for(run: Running, seconds: float, *, real_timeout: float = 3.0) -> None:
    """Let exactly `seconds` of clock time pass, with everything due in it happening."""
    clock = run.clock
    assert isinstance(clock, ManualClock)
    loop = asyncio.get_running_loop()
    target = clock.monotonic() + seconds
    give_up = loop.time() + real_timeout
    while True:
        await asyncio.sleep(0.001)
        _check_running(run)
        if clock.monotonic() >= target and clock.next_deadline is not None:
            return
        if loop.time() > give_up:
            raise TimeoutError(f"clock stuck at {clock.monotonic()}, target {target}")
        deadline = clock.next_deadline
        if deadline is not None:
            clock.advance(max(0.0, min(deadline, target) - clock.monotonic()))


async def settle(condition: Callable[[], bool], *, real_seconds: float = 2.0) -> None:
    """Wait in real time (the clock stands still) for I/O to bring `condition`."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + real_seconds
    while not condition():
        if loop.time() > give_up:
            raise TimeoutError("condition not met in real time")
        await asyncio.sleep(0.002)


async def sign_in(run: Running, provider: IdentityProvider) -> Snapshot:
    shown = await until(run, lambda s: s.phase == Phase.AWAITING_USER, max_seconds=600)
    provider.approve(shown.user_code)
    return await until(run, lambda s: s.phase == Phase.SIGNED_IN, max_seconds=600)


async def new_code_while_signed_in(run: Running) -> Snapshot:
    await run.driver.login(new_sign_in=True)
    return await until(run, lambda s: s.phase == Phase.AWAITING_USER, max_seconds=600)


def file_text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def refresh_token_of(run: Running) -> str | None:
    creds = run.driver.credentials
    return None if creds is None else creds.tokens.refresh_token


# -- 1. a successful token answer is never thrown away for one odd field -------------

ODD_FIELDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "expires_in_as_decimal_string": lambda body: {**body, "expires_in": "3600.0"},
    "negative_expires_in": lambda body: {**body, "expires_in": -60},
    "scope_as_json_list": lambda body: {**body, "scope": body["scope"].split()},
    "no_token_type": lambda body: {k: v for k, v in body.items() if k != "token_type"},
}


@pytest.mark.parametrize("odd", sorted(ODD_FIELDS))
async def test_successful_token_answer_with_an_odd_field_still_signs_in(
        odd: str, start_driver: StartDriver, provider: IdentityProvider,
        store_path: Path) -> None:
    # Behaviour 1
    run = await start_driver()
    await until(run, lambda s: s.phase == Phase.AWAITING_USER)
    body = ODD_FIELDS[odd](provider.issue_tokens())
    provider.script("token", Answer(200, body))  # the next poll is answered with it
    signed = await until(run, lambda s: s.phase == Phase.SIGNED_IN, max_seconds=60)
    assert signed.user == "Alice Example"
    tokens = await run.driver.get_token()
    assert tokens.access_token == body["access_token"]
    assert tokens.refresh_token == body["refresh_token"]
    assert body["refresh_token"] in file_text(store_path)
    assert provider.access_token_valid(tokens.access_token)


@pytest.mark.parametrize("odd", sorted(ODD_FIELDS))
async def test_successful_refresh_answer_with_an_odd_field_keeps_the_new_refresh_token(
        odd: str, start_driver: StartDriver, provider: IdentityProvider,
        store_path: Path) -> None:
    # Behaviour 1
    run = await start_driver()
    await sign_in(run, provider)
    old = await run.driver.get_token()
    body = ODD_FIELDS[odd](provider.issue_tokens())
    provider.script("token", Answer(200, body))
    new = await run.driver.refresh()
    assert new.access_token == body["access_token"]
    assert new.refresh_token == body["refresh_token"]
    on_disk = file_text(store_path)
    assert body["refresh_token"] in on_disk
    assert (old.refresh_token or "-") not in on_disk
    assert (await run.driver.get_token()).access_token == body["access_token"]
    assert run.driver.snapshot.phase == Phase.SIGNED_IN


# -- 2. a refresh refused for stale credentials never deletes newer ones --------------


async def test_refresh_refused_for_stale_credentials_keeps_the_newer_credentials(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider, store_path: Path) -> None:
    # Behaviour 2
    provider_settings.code_lifetime = 600.0
    run = await start_driver()
    await sign_in(run, provider)
    first = await run.driver.get_token()
    shown = await new_code_while_signed_in(run)
    provider.approve(shown.user_code)
    # The approving poll is held at the provider; a refresh of the first sign-in's token
    # goes out beside it and is held longer.
    provider.script("token", Delay(0.1), Delay(0.3))
    before = len(polls(provider))
    await until(run, lambda s: len(polls(provider)) > before, max_seconds=60)
    refresh = asyncio.create_task(run.driver.refresh())
    await settle(lambda: len(refresh_requests(provider)) == 1)
    stale = refresh_requests(provider)[0]
    assert stale.form["refresh_token"] == first.refresh_token
    # The new sign-in lands and revokes the first refresh token; then the refresh is
    # answered invalid_grant.
    await settle(lambda: stale.status is not None)
    with contextlib.suppress(AgentError):
        await asyncio.wait_for(refresh, 2.0)
    assert stale.status == 400
    newer = refresh_token_of(run)
    assert newer is not None and newer != first.refresh_token
    assert provider.refresh_token_valid(newer)
    assert newer in file_text(store_path)
    assert (await run.driver.get_token()).refresh_token == newer
    await run_for(run, 120)
    assert refresh_token_of(run) == newer
    assert newer in file_text(store_path)
    assert run.driver.snapshot.phase == Phase.SIGNED_IN


# -- 3. a pending new sign-in does not stop the current one being refreshed -----------


async def test_pending_new_sign_in_keeps_refreshing_the_current_credentials(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider, clock: ManualClock) -> None:
    # Behaviour 3
    provider_settings.access_token_lifetime = 100.0
    provider_settings.code_lifetime = 600.0
    run = await start_driver()
    await sign_in(run, provider)
    signed_at = clock.monotonic()
    shown = await new_code_while_signed_in(run)
    assert shown.user == "Alice Example"
    watched = len(run.seen)
    await until(run, lambda s: refreshes(provider) >= 5, max_seconds=500)
    await settle(lambda: all(r.status is not None for r in refresh_requests(provider)))
    await run_for(run, 1)
    times = [r.at for r in refresh_requests(provider)]
    # 20 % of the lifetime before each expiry: every 80 s, from the sign-in on.
    assert times[0] - signed_at == pytest.approx(80.0, abs=1.0)
    assert all(b - a == pytest.approx(80.0, abs=1.0) for a, b in pairwise(times))
    assert all(r.status == 200 for r in refresh_requests(provider))
    # All along, the code stayed on screen and the device said who is signed in.
    for snapshot in run.seen[watched:]:
        assert snapshot.phase == Phase.AWAITING_USER, snapshot
        assert snapshot.user_code == shown.user_code
        assert snapshot.user == "Alice Example"
    token = await run.driver.get_token()
    assert provider.access_token_valid(token.access_token)
    assert provider.refresh_token_valid(token.refresh_token or "")


# -- 4. a refresh answer lost after the provider rotated ------------------------------


async def test_lost_refresh_answer_serves_the_old_token_and_never_resends_the_dead_one(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider) -> None:
    # Behaviour 4
    provider_settings.access_token_lifetime = 1000.0
    provider_settings.code_lifetime = 600.0
    async with Transport(timeout=0.1) as impatient:
        run = await start_driver(sender=impatient)
        await sign_in(run, provider)
        old = await run.driver.get_token()
        dead = old.refresh_token
        assert dead is not None
        provider.script("token", Delay(0.25))
        await until(run, lambda s: refreshes(provider) == 1, max_seconds=1000)
        lost = refresh_requests(provider)[0]
        # The agent gives up after 0.1 s; the provider rotates at 0.25 s.
        await settle(lambda: lost.status is not None)
        assert lost.status == 200
        assert not provider.refresh_token_valid(dead)
        shown = await until(run, lambda s: s.phase == Phase.AWAITING_USER, max_seconds=600)
        assert shown.user_code and shown.user == "Alice Example"
        assert (await run.driver.get_token()).access_token == old.access_token
        sent = refresh_requests(provider, dead)
        assert [r.status for r in sent] == [200, 400]  # once lost, once refused
        # Served while it lives, across a restart too.
        left = run.driver.remaining() or 0.0
        assert left > 60
        await run_for(run, 30)
        assert (await run.driver.get_token()).access_token == old.access_token
        await run.stop()
        again = await start_driver(sender=impatient)
        await until(again, lambda s: s.phase == Phase.AWAITING_USER, max_seconds=5)
        assert (await again.driver.get_token()).access_token == old.access_token
        assert again.driver.snapshot.user == "Alice Example"
        await run_for(again, left)  # past its expiry
        with pytest.raises(NotSignedIn):
            await again.driver.get_token()
        assert len(refresh_requests(provider, dead)) == 2
        await again.stop()


# -- 5. the credentials are on disk before userinfo is asked ---------------------------


async def test_redeemed_credentials_are_on_disk_before_userinfo_is_asked(
        start_driver: StartDriver, provider: IdentityProvider, store_path: Path) -> None:
    # Behaviour 5
    scopes = ("openid", "email", "offline_access")  # no name in the ID token
    run = await start_driver(scopes=scopes)
    await until(run, lambda s: s.phase == Phase.AWAITING_USER)
    provider.script("userinfo", Delay(0.15))
    provider.approve()
    await until(run, lambda s: bool(requests_to(provider, "userinfo")), max_seconds=60)
    asked = requests_to(provider, "userinfo")[0]
    assert asked.status is None  # not answered yet
    creds = run.driver.credentials
    assert creds is not None and creds.tokens.refresh_token
    assert creds.tokens.refresh_token in file_text(store_path)
    # A stop during the slow userinfo loses nothing.
    await run.stop()
    codes = len(device_requests(provider))
    again = await start_driver(scopes=scopes)
    await until(again, lambda s: s.phase == Phase.SIGNED_IN, max_seconds=5)
    assert (await again.driver.get_token()).access_token == creds.tokens.access_token
    await run_for(again, 120)
    assert again.driver.snapshot.phase == Phase.SIGNED_IN
    assert len(device_requests(provider)) == codes


# -- 6. logout wins, and a pending revocation survives a restart -----------------------


async def test_logout_wins_against_a_refresh_and_a_sign_in_in_flight(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider, store_path: Path) -> None:
    # Behaviour 6
    provider_settings.code_lifetime = 600.0
    run = await start_driver()
    await sign_in(run, provider)
    shown = await new_code_while_signed_in(run)
    provider.approve(shown.user_code)
    # The approving poll and a refresh are held at the provider; the revocations that
    # the sign-out sends first are held longer, so the refresh rotates before them.
    provider.script("token", Delay(0.15), Delay(0.15))
    provider.script("revoke", Delay(0.3), Delay(0.3))
    before = len(polls(provider))
    await until(run, lambda s: len(polls(provider)) > before, max_seconds=60)
    refresh = asyncio.create_task(run.driver.refresh())
    await settle(lambda: refreshes(provider) == 1)
    problems = await run.driver.logout()
    with pytest.raises(NotSignedIn):
        await asyncio.wait_for(refresh, 2.0)
    assert refresh_requests(provider)[0].status == 200  # it did rotate
    assert polls(provider)[-1].status == 200            # and the approval was redeemed
    assert problems == []
    assert run.driver.credentials is None
    assert not store_path.exists()
    with pytest.raises(NotSignedIn):
        await run.driver.get_token()
    assert provider.live_refresh_tokens() == []
    assert provider.live_access_tokens() == []
    await run_for(run, 60)
    assert run.driver.credentials is None
    assert run.driver.snapshot.user is None
    assert run.driver.snapshot.phase != Phase.SIGNED_IN
    assert not store_path.exists()
    assert provider.live_refresh_tokens() == []


async def test_logout_wins_against_a_first_sign_in_completing(
        start_driver: StartDriver, provider: IdentityProvider, store_path: Path) -> None:
    # Behaviour 6
    run = await start_driver()
    shown = await until(run, lambda s: s.phase == Phase.AWAITING_USER)
    provider.approve(shown.user_code)
    provider.script("token", Delay(0.15))
    await until(run, lambda s: bool(polls(provider)), max_seconds=60)
    problems = await run.driver.logout()
    assert polls(provider)[-1].status == 200  # the approval was redeemed meanwhile
    assert problems == []
    assert run.driver.credentials is None
    assert not store_path.exists()
    with pytest.raises(NotSignedIn):
        await run.driver.get_token()
    assert provider.live_refresh_tokens() == []
    assert provider.live_access_tokens() == []
    await run_for(run, 30)
    assert run.driver.credentials is None
    assert run.driver.snapshot.phase != Phase.SIGNED_IN
    assert not store_path.exists()


async def test_logout_that_answers_before_a_refresh_lands_revokes_what_it_brings(
        start_driver: StartDriver, provider: IdentityProvider, store_path: Path,
        clock: ManualClock) -> None:
    # Behaviour 6
    run = await start_driver()
    await sign_in(run, provider)
    # The refresh rotates at the provider, after the sign-out has answered; the
    # revocations the sign-out sends are held longer than the refresh.
    provider.script("token", Delay(0.1))
    provider.script("revoke", Delay(0.25), Delay(0.25))
    refresh = asyncio.create_task(run.driver.refresh())
    await settle(lambda: refreshes(provider) == 1)
    logout = asyncio.create_task(run.driver.logout())
    await settle(lambda: len(requests_to(provider, "revoke")) == 2)
    # The sign-out gives up waiting (10 s of clock) before anything lands.
    for _ in range(100):
        if logout.done():
            break
        clock.advance(1)
        await asyncio.sleep(0.001)
    problems = await asyncio.wait_for(logout, 1.0)
    assert problems  # not confirmed yet
    assert refresh_requests(provider)[0].status is None  # the refresh is still held
    assert run.driver.credentials is None
    assert not store_path.exists()
    with contextlib.suppress(AgentError):
        await asyncio.wait_for(refresh, 2.0)
    assert refresh_requests(provider)[0].status == 200  # it rotated
    await settle(lambda: all(r.status is not None for r in requests_to(provider, "revoke")))
    await run_for(run, 1)
    await settle(lambda: all(r.status is not None for r in requests_to(provider, "revoke")))
    assert provider.live_refresh_tokens() == []
    assert provider.live_access_tokens() == []
    assert run.driver.credentials is None
    assert not store_path.exists()


async def test_pending_revocation_survives_a_restart(
        start_driver: StartDriver, provider: IdentityProvider, store_path: Path) -> None:
    # Behaviour 6
    run = await start_driver()
    await sign_in(run, provider)
    tokens = await run.driver.get_token()
    rt = tokens.refresh_token
    assert rt is not None
    provider.script("revoke", Fail(503), Fail(503))
    problems = await run.driver.logout()
    assert problems  # not confirmed by the provider
    assert provider.refresh_token_valid(rt)
    assert not store_path.exists()
    await run.stop()
    tried = len(revocations_of(provider, rt))
    again = await start_driver()
    await until(again, lambda s: not provider.refresh_token_valid(rt), max_seconds=600)
    retried = revocations_of(provider, rt)[tried:]
    assert retried and retried[-1].status == 200
    await run_for(again, 5)
    assert not provider.access_token_valid(tokens.access_token)
    assert provider.live_refresh_tokens() == []


# -- 7. a completed new sign-in revokes the previous refresh token ---------------------


async def test_completed_new_sign_in_revokes_the_previous_refresh_token(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider) -> None:
    # Behaviour 7
    provider_settings.code_lifetime = 600.0
    run = await start_driver()
    await sign_in(run, provider)
    first = await run.driver.get_token()
    shown = await new_code_while_signed_in(run)
    provider.approve(shown.user_code)
    await until(run, lambda s: s.phase == Phase.SIGNED_IN
                and refresh_token_of(run) not in (None, first.refresh_token), max_seconds=60)
    second = refresh_token_of(run)
    assert second is not None
    await run_for(run, 5)
    assert [r.status for r in revocations_of(provider, first.refresh_token or "")] == [200]
    assert not provider.refresh_token_valid(first.refresh_token or "")
    assert provider.live_refresh_tokens() == [second]


async def test_completed_new_sign_in_revokes_the_latest_rotation_of_the_previous_token(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider) -> None:
    # Behaviour 7
    provider_settings.access_token_lifetime = 100.0
    provider_settings.code_lifetime = 600.0
    run = await start_driver()
    await sign_in(run, provider)
    shown = await new_code_while_signed_in(run)
    await until(run, lambda s: refreshes(provider) >= 2, max_seconds=300)
    await settle(lambda: all(r.status is not None for r in refresh_requests(provider)))
    await run_for(run, 1)
    rotated = refresh_token_of(run)
    assert rotated is not None and provider.refresh_token_valid(rotated)
    provider.approve(shown.user_code)
    await until(run, lambda s: s.phase == Phase.SIGNED_IN
                and refresh_token_of(run) not in (None, rotated), max_seconds=60)
    newest = refresh_token_of(run)
    await run_for(run, 5)
    assert [r.status for r in revocations_of(provider, rotated)] == [200]
    assert provider.live_refresh_tokens() == [newest]


# -- 8. fifty callers, one refresh per back-off step -----------------------------------


async def test_fifty_concurrent_callers_cause_one_refresh_per_back_off_step(
        start_driver: StartDriver, provider: IdentityProvider, clock: ManualClock) -> None:
    # Behaviour 8
    run = await start_driver()
    await sign_in(run, provider)
    provider.script("token", *[Fail(500)] * 300)
    loop = asyncio.get_running_loop()
    clock.advance(60)
    for step in range(1, 5):
        for _ in range(2):  # the step's first wave sends; the second is inside the back-off
            began = loop.time()
            results = await asyncio.wait_for(asyncio.gather(
                *(run.driver.get_token(min_ttl=3590) for _ in range(50)),
                return_exceptions=True), 2.0)
            assert loop.time() - began < 0.5
            assert all(isinstance(r, ProviderUnavailable) for r in results), results
            assert refreshes(provider) == step
        clock.advance(301)  # past any back-off (refresh_retry_max is 300 s)


# -- 9. expiry counts from before the request was sent ---------------------------------


async def test_expiry_counts_from_before_the_request_was_sent(
        start_driver: StartDriver, provider: IdentityProvider, clock: ManualClock,
        store_path: Path) -> None:
    # Behaviour 9
    run = await start_driver()
    await until(run, lambda s: s.phase == Phase.AWAITING_USER)
    provider.approve()
    provider.script("token", Delay(0.2))
    before = len(polls(provider))
    await until(run, lambda s: len(polls(provider)) > before, max_seconds=60)
    sent_mono, sent_wall = clock.monotonic(), clock.time()
    clock.advance(30)  # the answer is 30 s on its way
    await until(run, lambda s: s.phase == Phase.SIGNED_IN, max_seconds=0)
    assert clock.monotonic() == sent_mono + 30
    assert (run.driver.remaining() or 0) <= 3600 - 30 + 0.01
    stored = json.loads(store_path.read_text())
    assert stored["tokens"]["expires_at"] <= sent_wall + 3600 + 0.01


async def test_stored_expiry_is_capped_by_the_lifetime_after_the_wall_clock_steps_back(
        start_driver: StartDriver, provider: IdentityProvider, clock: ManualClock) -> None:
    # Behaviour 9
    run = await start_driver()
    await sign_in(run, provider)
    await run.stop()
    clock.jump_wall(-7200)  # booted with a stale clock: the stored expiry looks far off
    again = await start_driver()
    await until(again, lambda s: s.phase == Phase.SIGNED_IN, max_seconds=5)
    left = again.driver.remaining()
    assert left is not None and 0 < left <= 3600
    snapshot = again.driver.snapshot
    assert snapshot.token_expires_at is not None
    assert snapshot.token_expires_at <= clock.time() + 3600


# -- 10. an issuer that does not match is a config error --------------------------------


async def test_discovery_with_a_wrong_issuer_is_a_config_error_not_retried_soon(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    # Behaviour 10
    base = provider.base_url
    provider.script("discovery", Answer(200, {
        "issuer": "https://other.example/",
        "token_endpoint": f"{base}/application/o/token/",
        "device_authorization_endpoint": f"{base}/application/o/device/",
        "revocation_endpoint": f"{base}/application/o/revoke/",
        "userinfo_endpoint": f"{base}/application/o/userinfo/",
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
    }))
    run = await start_driver()
    failed = await until(run, lambda s: s.phase == Phase.CONFIG_ERROR, max_seconds=60)
    assert "other.example" in (failed.last_error or "")
    asked = requests_to(provider, "discovery")
    assert len(asked) == 1
    await run_for(run, asked[0].at + 299 - run.clock.monotonic())
    assert len(requests_to(provider, "discovery")) == 1
    assert device_requests(provider) == []
    assert run.driver.snapshot.phase == Phase.CONFIG_ERROR
    assert Phase.NO_NETWORK not in {s.phase for s in run.seen}
    await until(run, lambda s: s.phase == Phase.AWAITING_USER, max_seconds=120)
    again = requests_to(provider, "discovery")
    assert again[1].at - asked[0].at >= 300


# -- 11. HTTP 429 from the device endpoint ---------------------------------------------


async def test_throttled_device_endpoint_backs_off_two_minutes_doubling_to_thirty(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider) -> None:
    # Behaviour 11
    provider_settings.device_requests_per_hour = 0  # every device request: 429
    run = await start_driver()
    await until(run, lambda s: s.phase == Phase.THROTTLED, max_seconds=60)
    await until(run, lambda s: len(device_requests(provider)) >= 7, max_seconds=4 * 3600)
    asked = device_requests(provider)
    assert all(r.status == 429 for r in asked[:6])
    gaps = [b.at - a.at for a, b in pairwise(asked[:7])]
    steps = [120.0, 240.0, 480.0, 960.0, 1800.0, 1800.0]
    for gap, step in zip(gaps, steps, strict=True):
        assert step <= gap <= step * 1.25 + 1, (gaps, steps)
    phases = {s.phase for s in run.seen} - {Phase.STARTING}
    assert phases == {Phase.THROTTLED}


async def test_login_during_a_throttle_tries_at_once_but_not_twice_a_minute(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider, clock: ManualClock) -> None:
    # Behaviour 11
    provider_settings.device_requests_per_hour = 0
    run = await start_driver()
    await until(run, lambda s: s.phase == Phase.THROTTLED, max_seconds=60)
    await run_for(run, 30)
    assert len(device_requests(provider)) == 1
    forced_at = clock.monotonic()
    await run.driver.login()
    await settle(lambda: len(device_requests(provider)) == 2)
    assert device_requests(provider)[1].at == forced_at  # at once: no clock time passed

    def throttled_again() -> bool:
        s = run.driver.snapshot
        return (s.phase == Phase.THROTTLED and s.next_code_at is not None
                and s.next_code_at > clock.time() + 60)

    await settle(throttled_again)
    await run_for(run, 20)
    await run.driver.login()  # within 60 s of the last forced try
    await asyncio.sleep(0.05)
    assert len(device_requests(provider)) == 2
    await until(run, lambda s: len(device_requests(provider)) == 3, max_seconds=3600)
    assert device_requests(provider)[2].at - forced_at >= 60


# -- 12. the budget, the throttle and the code on screen survive restarts --------------


async def test_code_budget_holds_across_restarts(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    # Behaviour 12
    for _ in range(16):
        run = await start_driver(codes_per_hour=3)
        await run_for(run, 250)
        await run.stop()
    issued = [r.at for r in device_requests(provider) if r.status == 200]
    for start in issued:
        assert sum(1 for t in issued if start <= t < start + 3600) <= 3, issued
    assert len(issued) >= 4  # the budget refills after the hour


class DyingSessionFile(SessionFile):
    """The real session file on a slow SD card, in a process that can be killed: a
    write still under way when the process dies never lands."""

    def __init__(self, path: Path, *, write_time: float) -> None:
        super().__init__(path)
        self.write_time = write_time
        self.killed = False

    def save(self, record: SessionRecord) -> None:
        time.sleep(self.write_time)  # the driver writes in a thread
        if not self.killed:
            super().save(record)


async def test_code_budget_holds_when_the_agent_is_killed_right_after_asking_for_a_code(
        provider: IdentityProvider, store: CredentialStore, transport: Transport,
        clock: ManualClock) -> None:
    # Behaviour 12
    runs: list[Running] = []
    try:
        for _ in range(4):
            disk = DyingSessionFile(store.path.with_name("session.json"), write_time=0.03)
            run = Running(Driver(settings_for(provider, codes_per_hour=3), sender=transport,
                                 store=store, clock=clock, rng=random.Random(1),
                                 session_file=disk), clock)
            runs.append(run)
            count = len(device_requests(provider))
            # Killed as soon as a code is asked for, or once it says none can come now.
            await until(run, lambda s, n=count: len(device_requests(provider)) > n
                        or (s.next_code_at is not None and s.next_code_at > clock.time() + 1),
                        max_seconds=600)
            disk.killed = True
            await run.stop()
    finally:
        for run in runs:
            await run.stop()
        await asyncio.sleep(0.05)  # the killed writes end
    asked = [r.at for r in device_requests(provider)]  # each one spends at authentik
    assert asked
    for start in asked:
        assert sum(1 for t in asked if start <= t < start + 3600) <= 3, asked


async def test_throttle_back_off_holds_across_restarts(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider, clock: ManualClock) -> None:
    # Behaviour 12
    provider_settings.device_requests_per_hour = 0
    run = await start_driver()
    await until(run, lambda s: s.phase == Phase.THROTTLED, max_seconds=60)

    def recorded_throttle() -> bool:
        s = run.driver.snapshot
        return (s.phase == Phase.THROTTLED and s.next_code_at is not None
                and s.next_code_at > clock.time() + 60)

    for gap in (120.0, 240.0):
        await settle(recorded_throttle)
        last = device_requests(provider)[-1].at
        count = len(device_requests(provider))
        for _ in range(3):  # restarts in quick succession
            await run.stop()
            run = await start_driver()
            await run_for(run, 30)
            assert len(device_requests(provider)) == count
        await until(run, lambda s, n=count: len(device_requests(provider)) > n,
                    max_seconds=3600)
        assert device_requests(provider)[-1].at - last >= gap


async def test_restart_with_a_code_on_screen_resumes_that_code(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider) -> None:
    # Behaviour 12
    provider_settings.code_lifetime = 600.0
    run = await start_driver()
    shown = await until(run, lambda s: s.phase == Phase.AWAITING_USER)
    await run_for(run, 30)
    await run.stop()
    again = await start_driver()
    resumed = await until(again, lambda s: s.phase == Phase.AWAITING_USER, max_seconds=5)
    assert resumed.user_code == shown.user_code
    assert len(device_requests(provider)) == 1
    provider.approve(shown.user_code)
    await until(again, lambda s: s.phase == Phase.SIGNED_IN, max_seconds=60)
    assert len(device_requests(provider)) == 1
    assert provider.access_token_valid((await again.driver.get_token()).access_token)


# -- 13. with a button, unused codes wait for a press -----------------------------------


async def test_button_device_waits_for_a_press_after_three_unused_codes(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    # Behaviour 13
    run = await start_driver(button=True)
    await until(run, lambda s: s.phase == Phase.NEEDS_BUTTON, max_seconds=3600)
    assert len(device_requests(provider)) == 3
    await run_for(run, 3 * 3600)
    assert len(device_requests(provider)) == 3
    assert run.driver.snapshot.phase == Phase.NEEDS_BUTTON
    run.driver.request_login()
    shown = await until(run, lambda s: s.phase == Phase.AWAITING_USER, max_seconds=5)
    assert shown.user_code
    assert len(device_requests(provider)) == 4


async def test_button_wait_survives_a_restart(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    # Behaviour 13
    run = await start_driver(button=True)
    await until(run, lambda s: s.phase == Phase.NEEDS_BUTTON, max_seconds=3600)
    await run.stop()
    again = await start_driver(button=True)
    await run_for(again, 2 * 3600)
    assert len(device_requests(provider)) == 3
    assert again.driver.snapshot.phase == Phase.NEEDS_BUTTON
    again.driver.request_login()
    await until(again, lambda s: s.phase == Phase.AWAITING_USER, max_seconds=5)
    assert len(device_requests(provider)) == 4


# -- 14. logout, login and code expiry -----------------------------------------------


async def test_logout_while_not_signed_in_spends_no_code(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    # Behaviour 14
    run = await start_driver(codes_per_hour=2)
    shown = await until(run, lambda s: s.phase == Phase.AWAITING_USER)
    await run.driver.logout()
    await run_for(run, 3)
    assert run.driver.snapshot.phase == Phase.AWAITING_USER
    assert run.driver.snapshot.user_code == shown.user_code
    assert len(device_requests(provider)) == 1
    # And while waiting for the budget.
    await until(run, lambda s: s.phase == Phase.CODE_EXPIRED and s.next_code_at is not None,
                max_seconds=600)
    assert len(device_requests(provider)) == 2
    await run.driver.logout()
    await run_for(run, 3)
    assert len(device_requests(provider)) == 2
    assert run.driver.snapshot.phase == Phase.CODE_EXPIRED


async def test_login_with_the_budget_spent_returns_the_wait(
        start_driver: StartDriver, provider: IdentityProvider, clock: ManualClock) -> None:
    # Behaviour 14
    run = await start_driver(codes_per_hour=1)
    await until(run, lambda s: s.phase == Phase.CODE_EXPIRED and s.next_code_at is not None,
                max_seconds=600)
    first = device_requests(provider)[0].at
    wait = await run.driver.login()
    assert wait > 0
    assert wait == pytest.approx(first + 3600 - clock.monotonic(), abs=1.0)
    await asyncio.sleep(0.02)
    assert len(device_requests(provider)) == 1


@pytest.mark.parametrize("mode", list(ExpiryMode))
async def test_signed_in_device_never_reports_code_expired(
        mode: ExpiryMode, provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider) -> None:
    # Behaviour 14
    provider_settings.expiry_mode = mode
    run = await start_driver()
    await sign_in(run, provider)
    watched = len(run.seen)
    shown = await new_code_while_signed_in(run)
    await until(run, lambda s: s.phase != Phase.AWAITING_USER, max_seconds=600)
    await run_for(run, 300)
    phases = [s.phase for s in run.seen[watched:]]
    assert Phase.CODE_EXPIRED not in phases, phases
    assert run.driver.snapshot.phase == Phase.SIGNED_IN
    assert shown.user_code not in provider.pending_user_codes()


# -- 15. explicit endpoints and discovery combine per endpoint ---------------------------


async def test_explicit_device_endpoint_completes_a_document_without_one(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider) -> None:
    # Behaviour 15
    provider_settings.advertise_device_endpoint = False
    # The query marks requests that went to the configured address.
    device = f"{provider.base_url}/application/o/device/?via=config"
    run = await start_driver(endpoints=ExplicitEndpoints(device_authorization=device))
    await sign_in(run, provider)
    assert requests_to(provider, "discovery")
    assert [r.query for r in device_requests(provider)] == [{"via": "config"}]
    assert polls(provider)[-1].query == {}  # the token endpoint from the document
    assert provider.access_token_valid((await run.driver.get_token()).access_token)


async def test_explicit_device_and_token_endpoints_still_use_the_document_for_the_rest(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    # Behaviour 15
    base = provider.base_url
    run = await start_driver(endpoints=ExplicitEndpoints(
        device_authorization=f"{base}/application/o/device/?via=config",
        token=f"{base}/application/o/token/?via=config"))
    await until(run, lambda s: s.phase == Phase.AWAITING_USER)
    body = provider.issue_tokens()
    del body["id_token"]  # the user's name can only come from userinfo
    provider.script("token", Answer(200, body))
    signed = await until(run, lambda s: s.phase == Phase.SIGNED_IN and s.user is not None,
                         max_seconds=60)
    assert signed.user == "Alice Example"
    assert [r.status for r in requests_to(provider, "userinfo")] == [200]
    assert requests_to(provider, "discovery")
    assert [r.query for r in device_requests(provider)] == [{"via": "config"}]
    assert polls(provider) and all(r.query == {"via": "config"} for r in polls(provider))
    problems = await run.driver.logout()
    assert problems == []
    assert [r.status for r in revocations_of(provider, body["refresh_token"])] == [200]
    assert provider.live_refresh_tokens() == []
    assert not provider.access_token_valid(body["access_token"])


async def test_a_caller_right_after_a_restart_waits_for_discovery_and_the_refresh(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider) -> None:
    # A restart with stored credentials knows no endpoints yet: the first caller that
    # needs a fresher token got "the provider is not answering" at once, while the
    # provider was up, because the refresh waited for discovery without the caller.
    provider_settings.access_token_lifetime = 600.0
    run = await start_driver()
    await sign_in(run, provider)
    old = await run.driver.get_token()
    await run.stop()
    again = await start_driver()
    await until(again, lambda s: s.phase == Phase.SIGNED_IN, max_seconds=5)
    await run_for(again, 30)
    assert provider.requests[-1].endpoint == "token"  # nothing since the sign-in
    fresher = await again.driver.get_token(min_ttl=590.0)
    assert fresher.access_token != old.access_token
    assert provider.access_token_valid(fresher.access_token)
    assert [r.endpoint for r in provider.requests[-2:]] == ["discovery", "token"]
    # And `POST /v1/refresh` alike, right after another restart.
    await again.stop()
    third = await start_driver()
    await until(third, lambda s: s.phase == Phase.SIGNED_IN, max_seconds=5)
    refreshed = await third.driver.refresh()
    assert refreshed.access_token not in (old.access_token, fresher.access_token)


async def test_a_refresh_held_back_by_the_gap_says_so(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider) -> None:
    provider_settings.access_token_lifetime = 600.0
    run = await start_driver()
    await sign_in(run, provider)
    await run.driver.refresh()
    with pytest.raises(ProviderUnavailable) as refused:
        await run.driver.refresh()
    assert "the next refresh can start in" in str(refused.value)
    assert "not answered in time" not in str(refused.value)


async def test_a_refresh_without_a_refresh_token_says_so(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    run = await start_driver(scopes=("openid", "profile"))  # no offline_access
    await sign_in(run, provider)
    assert run.driver.credentials is not None
    assert run.driver.credentials.tokens.refresh_token is None
    with pytest.raises(ProviderUnavailable) as refused:
        await run.driver.refresh()
    assert "there is no refresh token" in str(refused.value)


# Issue 10 item 10: "No network" only when the network is down.
@pytest.mark.parametrize(("fault", "title"), [
    ("name", "Name not found"), ("provider", "Provider trouble"), ("refused", "No network")])
async def test_the_screen_says_what_kept_the_provider_away(
        fault: str, title: str, provider: IdentityProvider, start_driver: StartDriver,
        transport: Transport) -> None:
    from agent.display.screens import build_screen

    issuer = provider.issuer
    if fault == "name":
        issuer = "http://idp.invalid/application/o/device-agent/"
    elif fault == "refused":
        issuer = "http://127.0.0.1:9/application/o/device-agent/"  # discard: nobody listens
    else:
        provider.script("discovery", Fail(502), Fail(502), Fail(502))
    run = await start_driver(issuer=issuer)
    shown = await run.until(lambda s: s.phase == Phase.NO_NETWORK, max_seconds=600)
    screen = build_screen(shown, now_mono=run.clock.monotonic(), now_wall=run.clock.time())
    assert screen.title == title
    if fault == "name":
        assert "idp.invalid" in (shown.last_error or "")
