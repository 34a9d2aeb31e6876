"""The lifecycle against the authentik-like test provider, over real loopback HTTP.

Time is a ManualClock shared by the agent and the provider, so minutes of polling,
code expiry and token lifetime pass in milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
from itertools import pairwise
from pathlib import Path

import pytest

from agent.errors import NotSignedIn, ProviderUnavailable
from agent.idp import Answer, Drop, ExpiryMode, Fail, IdentityProvider, ProviderSettings
from agent.state import Phase
from agent.store import Credentials, CredentialStore
from tests.clock import ManualClock
from tests.harness import StartDriver

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def polls(provider: IdentityProvider) -> list[float]:
    return [r.at for r in provider.requests
            if r.endpoint == "token" and r.form.get("grant_type") == DEVICE_GRANT]


def refreshes(provider: IdentityProvider) -> int:
    return sum(1 for r in provider.requests
               if r.endpoint == "token" and r.form.get("grant_type") == "refresh_token")


def device_requests(provider: IdentityProvider) -> list[float]:
    return [r.at for r in provider.requests if r.endpoint == "device"]


async def sign_in(run: object, provider: IdentityProvider) -> None:
    from tests.harness import Running

    assert isinstance(run, Running)
    await run.until_phase(Phase.AWAITING_USER)
    provider.approve()
    await run.until_phase(Phase.SIGNED_IN)


async def test_sign_in_shows_code_polls_at_interval_and_persists(
        start_driver: StartDriver, provider: IdentityProvider, store_path: Path) -> None:
    run = await start_driver()
    shown = await run.until_phase(Phase.AWAITING_USER)
    assert shown.user_code in provider.pending_user_codes()
    assert shown.verification_uri == f"{provider.base_url}/device"
    assert shown.verification_uri_complete == f"{provider.base_url}/device?code={shown.user_code}"
    assert shown.device_name == "Test device"
    # Let it poll a few times before the person approves.
    await run.clock.run_until(lambda: len(polls(provider)) >= 3)
    provider.approve(shown.user_code, user="alice")
    signed = await run.until_phase(Phase.SIGNED_IN)
    assert signed.user == "Alice Example"
    tokens = await run.driver.get_token()
    assert provider.access_token_valid(tokens.access_token)
    times = polls(provider)
    issued_at = device_requests(provider)[0]
    # RFC 8628 §3.5: at least `interval` before each request, the first included.
    assert times[0] - issued_at >= 5
    assert all(b - a >= 5 for a, b in pairwise(times))
    on_disk = CredentialStore(store_path)
    # The running agent holds the lock; read the file the way a restart would, later.
    assert store_path.stat().st_mode & 0o777 == 0o600
    del on_disk


async def test_slow_down_from_the_token_endpoint_adds_five_seconds(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    run = await start_driver()
    await run.until_phase(Phase.AWAITING_USER)
    provider.script("token", Answer(400, {"error": "slow_down"}),
                    Answer(400, {"error": "slow_down"}))
    await run.clock.run_until(lambda: len(polls(provider)) >= 4)
    times = polls(provider)
    gaps = [b - a for a, b in pairwise(times)]
    assert gaps[0] >= 10 and gaps[1] >= 15 and gaps[2] >= 15


@pytest.mark.parametrize("mode", list(ExpiryMode))
async def test_expired_code_is_replaced_by_a_fresh_one(
        mode: ExpiryMode, provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider) -> None:
    provider_settings.expiry_mode = mode
    run = await start_driver()
    first = await run.until_phase(Phase.AWAITING_USER)
    second = await run.until(lambda s: s.phase == Phase.AWAITING_USER
                             and s.user_code != first.user_code)
    assert second.user_code is not None
    # No poll of the first code after its deadline (authentik <= 2026.2 would keep
    # answering authorization_pending for minutes).
    first_issued = device_requests(provider)[0]
    first_polls = [t for t in polls(provider) if t < device_requests(provider)[1]]
    assert all(t <= first_issued + 60 for t in first_polls)
    provider.approve(second.user_code)
    await run.until_phase(Phase.SIGNED_IN)


async def test_denied_shows_denied_then_a_new_code(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    run = await start_driver()
    first = await run.until_phase(Phase.AWAITING_USER)
    provider.deny(first.user_code)
    denied = await run.until_phase(Phase.DENIED)
    assert denied.next_code_at is not None
    second = await run.until_phase(Phase.AWAITING_USER)
    assert second.user_code != first.user_code


async def test_throttled_device_endpoint_backs_off_for_minutes(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider, clock: ManualClock) -> None:
    provider_settings.device_requests_per_hour = 2
    run = await start_driver(codes_per_hour=12, throttle_backoff=600.0)
    await run.until(lambda s: s.phase == Phase.THROTTLED)
    throttled_at = clock.monotonic()
    assert len(device_requests(provider)) == 3
    assert "busy" in (run.driver.snapshot.last_error or "")
    # Nothing is asked of the device endpoint during the back-off.
    await run.until(lambda s: len(device_requests(provider)) == 4)
    assert device_requests(provider)[3] - throttled_at >= 600


async def test_code_budget_paces_new_codes(
        start_driver: StartDriver, provider: IdentityProvider, clock: ManualClock) -> None:
    run = await start_driver(codes_per_hour=3)
    waiting = await run.until(
        lambda s: s.phase == Phase.CODE_EXPIRED and s.next_code_at is not None)
    assert len(device_requests(provider)) == 3
    first = device_requests(provider)[0]
    assert waiting.next_code_at == pytest.approx(clock.time() + (first + 3600 - clock.monotonic()))
    await run.until(lambda s: len(device_requests(provider)) == 4)
    assert device_requests(provider)[3] >= first + 3600


async def test_refresh_before_expiry_rotates_and_persists_first(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider, store_path: Path) -> None:
    provider_settings.access_token_lifetime = 100.0
    run = await start_driver()
    await sign_in(run, provider)
    old = await run.driver.get_token()
    signed_at = run.clock.monotonic()
    await run.clock.run_until(lambda: refreshes(provider) == 1)
    await run.until(lambda s: run.driver.credentials is not None
                    and run.driver.credentials.tokens.access_token != old.access_token)
    # Default margin: when 20% of the lifetime remains.
    refresh_at = next(r.at for r in provider.requests
                      if r.form.get("grant_type") == "refresh_token")
    assert refresh_at - signed_at == pytest.approx(80.0, abs=1.0)
    new = await run.driver.get_token()
    assert not provider.refresh_token_valid(old.refresh_token or "")
    assert provider.refresh_token_valid(new.refresh_token or "")
    assert new.refresh_token in store_path.read_text()


async def test_dead_refresh_token_starts_over_with_a_new_code(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider, store_path: Path) -> None:
    provider_settings.access_token_lifetime = 100.0
    provider_settings.code_lifetime = 600.0
    run = await start_driver()
    await sign_in(run, provider)
    old = await run.driver.get_token()
    provider.revoke_refresh_tokens()
    shown = await run.until(lambda s: s.phase == Phase.AWAITING_USER)
    # The access token still lives: served, and the device says who is signed in.
    assert shown.user == "Alice Example"
    assert (await run.driver.get_token()).access_token == old.access_token
    assert old.refresh_token not in store_path.read_text()
    await run.until(lambda s: run.driver.remaining() is None
                    or (run.driver.remaining() or 0) < 0 or run.driver.credentials is None)
    await run.until(lambda s: run.driver.credentials is None)
    assert not store_path.exists()
    with pytest.raises(NotSignedIn):
        await run.driver.get_token()
    assert refreshes(provider) == 1  # the dead token was never sent again


async def test_refresh_trouble_keeps_serving_the_old_token(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider) -> None:
    provider_settings.access_token_lifetime = 1000.0
    run = await start_driver()
    await sign_in(run, provider)
    old = await run.driver.get_token()
    provider.script("token", Fail(500), Drop(), Fail(503))
    failing = await run.until_phase(Phase.REFRESH_FAILING)
    assert failing.last_error
    # Still valid, so still served.
    assert (await run.driver.get_token()).access_token == old.access_token
    await run.until(lambda s: s.phase == Phase.SIGNED_IN and refreshes(provider) == 4)
    assert (await run.driver.get_token()).access_token != old.access_token


async def test_min_ttl_forces_one_refresh_shared_by_concurrent_callers(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    run = await start_driver()
    await sign_in(run, provider)
    old = await run.driver.get_token()
    run.clock.advance(60)
    results = await asyncio.gather(*(run.driver.get_token(min_ttl=3590) for _ in range(20)))
    assert refreshes(provider) == 1
    assert {t.access_token for t in results} == {results[0].access_token}
    assert results[0].access_token != old.access_token


async def test_min_ttl_with_provider_down_is_an_error_not_a_stale_token(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    run = await start_driver()
    await sign_in(run, provider)
    provider.script("token", Fail(500))
    run.clock.advance(60)
    with pytest.raises(ProviderUnavailable):
        await run.driver.get_token(min_ttl=3599)


async def test_restart_with_valid_credentials_makes_no_network_call(
        start_driver: StartDriver, provider: IdentityProvider, store: CredentialStore) -> None:
    run = await start_driver()
    await sign_in(run, provider)
    token = (await run.driver.get_token()).access_token
    await run.stop()
    before = len(provider.requests)
    again = await start_driver()
    await again.driver.wait_for(lambda s: s.phase == Phase.SIGNED_IN)
    assert (await again.driver.get_token()).access_token == token
    await asyncio.sleep(0.05)
    assert len(provider.requests) == before


async def test_restart_with_expired_token_refreshes_at_once(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider, clock: ManualClock) -> None:
    provider_settings.access_token_lifetime = 100.0
    run = await start_driver()
    await sign_in(run, provider)
    await run.stop()
    clock.advance(500)  # the device was off for a while
    again = await start_driver()
    await again.until(lambda s: refreshes(provider) == 1 and s.phase == Phase.SIGNED_IN)
    assert (await again.driver.get_token()).access_token


async def test_wall_clock_jump_after_boot_rechecks_stored_expiry(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider, clock: ManualClock) -> None:
    provider_settings.access_token_lifetime = 3600.0
    run = await start_driver()
    await sign_in(run, provider)
    await run.stop()
    # Booted with a stale clock (no RTC): the stored token looks fresh...
    clock.jump_wall(-7200)
    again = await start_driver()
    await again.driver.wait_for(lambda s: s.phase == Phase.SIGNED_IN)
    assert (again.driver.remaining() or 0) > 3000
    # ...until NTP corrects the wall clock two hours forward: it is really expired.
    clock.jump_wall(7200 + 3700)
    assert (again.driver.remaining() or 0) < 0
    await again.until(lambda s: refreshes(provider) == 1)


async def test_discovery_failure_then_recovery(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    provider.script("discovery", Fail(500), Drop())
    run = await start_driver()
    trouble = await run.until_phase(Phase.NO_NETWORK)
    assert trouble.last_error
    await run.until_phase(Phase.AWAITING_USER)


async def test_dropped_connections_while_polling_back_off(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    run = await start_driver()
    shown = await run.until_phase(Phase.AWAITING_USER)
    provider.script("token", Drop(), Drop())
    await run.clock.run_until(lambda: len(polls(provider)) >= 3)
    times = polls(provider)
    assert times[2] - times[1] >= 10  # doubled after the first failure
    provider.approve(shown.user_code)
    await run.until_phase(Phase.SIGNED_IN)


async def test_unknown_client_is_a_config_error(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    from agent.oauth import Client

    run = await start_driver(client=Client(client_id="nobody"))
    failed = await run.until_phase(Phase.CONFIG_ERROR)
    assert "invalid_client" in (failed.last_error or "")


async def test_login_request_gets_a_new_code_now(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    run = await start_driver()
    first = await run.until_phase(Phase.AWAITING_USER)
    run.driver.request_login()
    second = await run.until(lambda s: s.phase == Phase.AWAITING_USER
                             and s.user_code != first.user_code, max_seconds=1)
    assert second.user_code


async def test_logout_revokes_wipes_and_shows_a_code(
        start_driver: StartDriver, provider: IdentityProvider, store_path: Path) -> None:
    run = await start_driver()
    await sign_in(run, provider)
    tokens = await run.driver.get_token()
    problems = await run.driver.logout()
    assert problems == []
    assert not provider.access_token_valid(tokens.access_token)
    assert not provider.refresh_token_valid(tokens.refresh_token or "")
    assert not store_path.exists()
    await run.until_phase(Phase.AWAITING_USER)


async def test_without_offline_access_no_refresh_and_a_warning(
        start_driver: StartDriver, provider: IdentityProvider,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    run = await start_driver(scopes=("openid", "profile"))
    await sign_in(run, provider)
    assert (await run.driver.get_token()).refresh_token is None
    assert any("offline_access" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)


async def test_short_code_lifetime_is_reported_once(
        start_driver: StartDriver, provider: IdentityProvider,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    run = await start_driver()
    first = await run.until_phase(Phase.AWAITING_USER)
    await run.until(lambda s: s.phase == Phase.AWAITING_USER and s.user_code != first.user_code)
    warnings = [r for r in caplog.records if "Access code validity" in r.getMessage()]
    assert len(warnings) == 1


async def test_secrets_never_reach_the_log(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    provider_settings.access_token_lifetime = 100.0
    run = await start_driver()
    await sign_in(run, provider)
    first = await run.driver.get_token()
    await run.clock.run_until(lambda: refreshes(provider) == 1)
    await run.until(lambda s: s.phase == Phase.SIGNED_IN)
    second = await run.driver.get_token()
    await run.driver.logout()
    secrets = {first.access_token, first.refresh_token, second.access_token,
               second.refresh_token, first.id_token}
    secrets |= {r.form["device_code"] for r in provider.requests if "device_code" in r.form}
    text = "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)
    for secret in secrets:
        assert secret and secret not in text


async def test_slow_answers_time_out_and_polling_backs_off(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    from agent.idp import Delay
    from agent.transport import Transport

    async with Transport(timeout=0.1) as impatient:
        run = await start_driver(sender=impatient)
        shown = await run.until_phase(Phase.AWAITING_USER)
        provider.script("token", Delay(0.4))
        await run.clock.run_until(lambda: len(polls(provider)) >= 2)
        await asyncio.sleep(0.4)  # let the slow answer finish on the provider's side
        await run.clock.run_until(lambda: len(polls(provider)) >= 3)
        times = polls(provider)
        assert times[2] - times[1] >= 10  # the interval doubled after the timeout
        provider.approve(shown.user_code)
        await run.until_phase(Phase.SIGNED_IN)
        await run.stop()


async def test_confidential_client_signs_in_refreshes_and_revokes(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider) -> None:
    from agent.oauth import Client

    provider_settings.client_secret = "kiosk-secret"
    run = await start_driver(client=Client(client_id="device-agent",
                                           client_secret="kiosk-secret"))
    await sign_in(run, provider)
    old = await run.driver.get_token()
    new = await run.driver.refresh()
    assert new.access_token != old.access_token
    assert await run.driver.logout() == []
    assert not provider.refresh_token_valid(new.refresh_token or "")


async def test_wrong_client_secret_is_a_config_error_not_a_loop(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider) -> None:
    from agent.oauth import Client

    provider_settings.client_secret = "right"
    run = await start_driver(client=Client(client_id="device-agent", client_secret="wrong"))
    await run.until_phase(Phase.AWAITING_USER)
    provider.approve()
    failed = await run.until_phase(Phase.CONFIG_ERROR)
    assert "invalid_client" in (failed.last_error or "")
    assert "wrong" not in (failed.last_error or "")


async def test_unfinished_new_sign_in_keeps_the_current_one(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    run = await start_driver()
    await sign_in(run, provider)
    token = (await run.driver.get_token()).access_token
    run.driver.request_login(new_sign_in=True)
    shown = await run.until_phase(Phase.AWAITING_USER)
    assert shown.user == "Alice Example"  # still signed in meanwhile
    assert (await run.driver.get_token()).access_token == token
    await run.until_phase(Phase.SIGNED_IN)  # the code expired unused
    assert (await run.driver.get_token()).access_token == token
    # A short press while signed in does nothing; only a new sign-in starts over.
    run.driver.request_login()
    await asyncio.sleep(0.02)
    assert run.driver.snapshot.phase == Phase.SIGNED_IN


async def test_logout_during_a_refresh_in_flight_stays_signed_out(
        start_driver: StartDriver, provider: IdentityProvider, store_path: Path) -> None:
    from agent.idp import Delay

    run = await start_driver()
    await sign_in(run, provider)
    provider.script("token", Delay(0.2))
    refresh = asyncio.create_task(run.driver.refresh())
    await asyncio.sleep(0.05)  # the refresh request is at the provider
    await run.driver.logout()
    with pytest.raises(NotSignedIn):
        await refresh  # its answer belongs to credentials that are gone
    assert run.driver.credentials is None
    assert not store_path.exists()
    # The provider rotated during the sign-out: what it issued was revoked too.
    assert refreshes(provider) == 1
    assert provider.live_refresh_tokens() == []
    assert provider.live_access_tokens() == []


async def test_a_margin_longer_than_the_lifetime_does_not_spin(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider) -> None:
    provider_settings.access_token_lifetime = 300.0
    run = await start_driver(refresh_margin=600.0)
    await sign_in(run, provider)
    start = run.clock.monotonic()
    await run.clock.run_until(lambda: refreshes(provider) >= 3)
    times = [r.at for r in provider.requests if r.form.get("grant_type") == "refresh_token"]
    # At most half the lifetime early: never back to back.
    assert times[0] - start >= 149
    assert all(b - a >= 149 for a, b in pairwise(times))


async def test_a_failed_write_after_rotation_keeps_the_sign_in(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider, tmp_path: Path) -> None:
    from agent.errors import StoreError

    class FullDisk(CredentialStore):
        full = False

        def save(self, credentials: Credentials) -> None:
            if self.full:
                raise StoreError(f"cannot write {self.path}: No space left on device")
            super().save(credentials)

    provider_settings.access_token_lifetime = 300.0
    with FullDisk(tmp_path / "disk" / "credentials.json") as disk:
        run = await start_driver(store_override=disk)
        await sign_in(run, provider)
        disk.full = True
        await run.clock.run_until(lambda: refreshes(provider) == 1)
        await run.until(lambda s: run.driver.credentials is not None
                        and provider.refresh_token_valid(
                            run.driver.credentials.tokens.refresh_token or ""))
        assert not run.task.done()
        disk.full = False
        # Written again on the next check.
        new = run.driver.credentials
        assert new is not None
        await run.clock.run_until(
            lambda: (new.tokens.refresh_token or "-") in disk.path.read_text())
        await run.stop()


async def test_ntp_jump_after_boot_triggers_a_refresh_soon(
        start_driver: StartDriver, provider: IdentityProvider, clock: ManualClock) -> None:
    first = await start_driver()
    await sign_in(first, provider)
    await first.stop()
    clock.advance(86_400 + 600)    # off for a day: the token is long dead
    clock.jump_wall(-86_400)       # fake-hwclock restored the time of shutdown
    second = await start_driver()
    await second.driver.wait_for(lambda s: s.phase == Phase.SIGNED_IN)
    clock.jump_wall(86_400)        # NTP syncs shortly after boot
    jumped = clock.monotonic()
    await second.until(lambda s: refreshes(provider) == 1)
    assert clock.monotonic() - jumped <= 61


async def test_abandoned_new_sign_in_falls_back_to_a_refreshable_one(
        provider_settings: ProviderSettings, start_driver: StartDriver,
        provider: IdentityProvider) -> None:
    provider_settings.access_token_lifetime = 300.0
    provider_settings.code_lifetime = 600.0
    run = await start_driver()
    await sign_in(run, provider)
    run.driver.request_login(new_sign_in=True)
    await run.until_phase(Phase.AWAITING_USER)
    # Nobody approves; the code outlives the access token, but not the refresh token.
    await run.until_phase(Phase.SIGNED_IN)

    def refreshed_and_stored() -> bool:
        creds = run.driver.credentials
        return refreshes(provider) >= 1 and creds is not None and (
            provider.refresh_token_valid(creds.tokens.refresh_token or ""))

    await run.until(lambda s: refreshed_and_stored())


async def test_min_ttl_beyond_the_token_lifetime_is_refused_without_a_refresh(
        start_driver: StartDriver, provider: IdentityProvider) -> None:
    from agent.errors import MinTtlTooLong

    run = await start_driver()
    await sign_in(run, provider)
    for _ in range(3):
        with pytest.raises(MinTtlTooLong):
            await run.driver.get_token(7200)
    assert refreshes(provider) == 0


async def test_a_corrupt_credential_file_is_moved_aside_and_a_new_sign_in_starts(
        start_driver: StartDriver, provider: IdentityProvider, store_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # Issue 9 item 13: a corrupt file no longer leaves a dead device.
    store_path.write_bytes(b'{"version": 1, "tokens": ')
    store_path.chmod(0o600)
    run = await start_driver()
    await sign_in(run, provider)
    [aside] = list(store_path.parent.glob("credentials.json.corrupt-*"))
    assert aside.read_bytes() == b'{"version": 1, "tokens": '
    assert any("corrupt" in r.getMessage() and r.levelno == logging.ERROR
               for r in caplog.records)


async def test_credentials_from_a_cloned_image_start_a_fresh_sign_in_and_revoke_nothing(
        start_driver: StartDriver, provider: IdentityProvider, store_path: Path) -> None:
    # Issue 9 item 16: N devices from one SD image must not fight over one refresh token.
    first = await start_driver(machine_id="a" * 32)
    await sign_in(first, provider)
    original = await first.driver.get_token()
    await first.stop()
    assert '"machine_id": "' + "a" * 32 in store_path.read_text()
    clone = await start_driver(machine_id="b" * 32)
    shown = await clone.until_phase(Phase.AWAITING_USER)
    assert shown.user is None
    assert provider.refresh_token_valid(original.refresh_token or "")
    assert not [r for r in provider.requests if r.endpoint == "revoke"]
    # A file from before machine ids were written is still this device's.
    await clone.stop()
    legacy = store_path.read_text().replace('"machine_id": "' + "a" * 32 + '"',
                                            '"machine_id": null')
    store_path.write_text(legacy)
    again = await start_driver(machine_id="b" * 32)
    # Signed in (the clone's own code may still be on screen beside it).
    await again.until(lambda s: s.user == "Alice Example", max_seconds=1)
    assert (await again.driver.get_token()).access_token == original.access_token
