"""The assembled daemon in this process: what reaches the display, and when."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import AgentConfig, config_from_mapping
from agent.display.screens import Screen
from agent.driver import Driver
from agent.idp import IdentityProvider, ProviderSettings
from agent.service import serve
from agent.state import Phase
from tests.clock import ManualClock

OFFLINE_ISSUER = "http://127.0.0.1:9/application/o/x/"


def _config(tmp_path: Path, issuer: str, *, display: dict[str, str] | None = None,
            state: Path | None = None) -> AgentConfig:
    return config_from_mapping({
        "provider": {"issuer": issuer, "client_id": "device-agent",
                     "allow_insecure_http": True},
        "display": display or {"type": "none"},
        "storage": {"path": str((state or tmp_path / "state") / "credentials.json")},
        "api": {"socket": str(tmp_path / "agent.sock")},
    })


class RecordingDisplay:
    """The display boundary, recorded: what the agent asked to show."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.shown: list[tuple[float, Screen]] = []
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def show(self, screen: Screen) -> None:
        self.shown.append((self.clock.monotonic(), screen))

    async def close(self) -> None:
        self.closed = True

    def kinds(self) -> list[str]:
        kinds: list[str] = []
        for _, screen in self.shown:
            if not kinds or kinds[-1] != screen.kind:
                kinds.append(screen.kind)
        return kinds


async def test_countdown_ticks_then_signed_in_then_blank(
        provider: IdentityProvider, clock: ManualClock, tmp_path: Path) -> None:
    config = _config(tmp_path, provider.issuer, display={
        "type": "png", "path": str(tmp_path / "frame.png"), "blank_after": "5m"})
    display = RecordingDisplay(clock)
    ready: asyncio.Future[Driver] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, shutdown=stop.wait(), clock=clock,
                                     display=display, on_ready=ready.set_result))
    driver = await asyncio.wait_for(ready, 5)
    await clock.run_until(lambda: driver.snapshot.phase == Phase.AWAITING_USER)
    await clock.run_until(lambda: sum(s.kind == "code" for _, s in display.shown) >= 4)
    seconds = [s.seconds_left for _, s in display.shown if s.kind == "code"]
    assert seconds[:4] == sorted(seconds[:4], reverse=True) and len(set(seconds[:4])) == 4

    provider.approve()
    await clock.run_until(lambda: display.kinds()[-1:] == ["signed_in"])
    signed_at = clock.monotonic()
    await clock.run_until(lambda: display.kinds()[-1:] == ["blank"])
    blank_at = next(t for t, s in display.shown if s.kind == "blank")
    assert 299 <= blank_at - signed_at <= 301

    await driver.logout()
    await clock.run_until(lambda: display.kinds()[-1:] == ["code"])
    stop.set()
    await asyncio.wait_for(task, 5)
    assert display.started and display.closed
    assert display.kinds()[:2] == ["starting", "code"] or display.kinds()[0] == "code"


async def test_a_locked_store_stops_start_up_and_leaves_nothing_running(
        tmp_path: Path) -> None:
    from agent.errors import StoreLocked
    from agent.store import CredentialStore

    config = _config(tmp_path, OFFLINE_ISSUER)
    before = asyncio.all_tasks()
    with CredentialStore(config.storage.path), pytest.raises(StoreLocked):
        await serve(config, shutdown=asyncio.Event().wait())
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == before
    assert not (tmp_path / "agent.sock").exists()


async def test_sigterm_during_a_slow_refresh_waits_for_the_rotated_token_to_reach_the_disk(
        provider_settings: ProviderSettings, provider: IdentityProvider,
        tmp_path: Path) -> None:
    # Issue 9 item 11: a provider answering in 3 s during a stop lost the sign-in. The
    # agent runs on the real clock here: the grace it gives is real time.
    from agent.idp import Slow
    from agent.store import CredentialStore

    provider_settings.interval = 1

    store_path = tmp_path / "state" / "credentials.json"
    config = config_from_mapping({
        "provider": {"issuer": provider.issuer, "client_id": "device-agent",
                     "allow_insecure_http": True},
        "display": {"type": "none"},
        "storage": {"path": str(store_path)},
        "api": {"socket": str(tmp_path / "agent.sock")},
    })
    ready: asyncio.Future[Driver] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, shutdown=stop.wait(),
                                     use_default_display=False, on_ready=ready.set_result))
    driver = await asyncio.wait_for(ready, 5)
    await asyncio.wait_for(driver.wait_for(lambda s: s.phase == Phase.AWAITING_USER), 5)
    provider.approve()
    await asyncio.wait_for(driver.wait_for(lambda s: s.phase == Phase.SIGNED_IN), 5)
    provider.script("token", Slow(3.0))
    old = driver.credentials.tokens.refresh_token if driver.credentials else None
    refresh = asyncio.create_task(driver.refresh())
    await asyncio.sleep(0.2)            # the provider has rotated; its answer is slow
    assert not provider.refresh_token_valid(old or "")
    stop.set()                          # SIGTERM
    await asyncio.wait_for(task, 10)
    refresh.cancel()
    [live] = provider.live_refresh_tokens()
    with CredentialStore(store_path) as store:
        creds = store.load()
    assert creds is not None and creds.tokens.refresh_token == live


async def test_a_store_only_a_person_can_fix_leaves_the_fix_on_the_panel(
        tmp_path: Path) -> None:
    """Issue 9 item 13: exit 78 follows, and nothing restarts the agent; the panel (luma's
    dummy device) keeps the fix after the agent has let go of it."""
    from luma.core.device import dummy

    from agent.display.layout import compose
    from agent.display.oled import LumaDisplay
    from agent.display.screens import fatal_screen
    from agent.errors import StoreInsecure

    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)  # others could replace the credentials
    config = _config(tmp_path, OFFLINE_ISSUER, state=state)
    device = dummy(width=128, height=64, mode="1")
    display = LumaDisplay(lambda: device, clock=ManualClock())
    with pytest.raises(StoreInsecure) as raised:
        await serve(config, shutdown=asyncio.Event().wait(), display=display)
    assert f"fix: chmod go-w {state}" in str(raised.value)
    # Cleaned up, yet lit: the frame on the glass is the fix.
    assert device.persist
    expected = compose(fatal_screen(str(raised.value)), width=128, height=64, mode="1")
    assert device.image is not None and device.image.tobytes() == expected.image.tobytes()
    assert fatal_screen(str(raised.value)).lines[0] == f"Fix: chmod go-w {state}"
    assert any("chmod" in line for line in expected.text), expected.text


async def test_an_unset_clock_is_waited_for_and_said_before_any_request(
        provider: IdentityProvider, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9 item 16: a Pi without a real-time clock boots in 1970."""
    import agent.clock

    synchronized = tmp_path / "timesync" / "synchronized"
    monkeypatch.setattr(agent.clock, "TIMESYNC_SYNCHRONIZED", synchronized)
    clock = ManualClock(wall=86_400.0 * 3)  # 1970-01-04
    config = _config(tmp_path, provider.issuer)
    display = RecordingDisplay(clock)
    ready: asyncio.Future[Driver] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, shutdown=stop.wait(), clock=clock,
                                     display=display, on_ready=ready.set_result))
    await clock.run_until(lambda: display.kinds() == ["clock_not_set"])
    clock.advance(60)
    await asyncio.sleep(0.05)
    assert display.kinds() == ["clock_not_set"] and not ready.done()
    assert provider.requests == []  # not even discovery
    assert not (tmp_path / "agent.sock").exists()

    # timesyncd says it has synchronised (the clock itself may still look old).
    synchronized.parent.mkdir()
    synchronized.touch()
    await clock.run_until(ready.done)
    driver = ready.result()
    await clock.run_until(lambda: "code" in display.kinds())
    assert display.kinds()[0] == "clock_not_set"
    assert driver.snapshot.phase == Phase.AWAITING_USER
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_a_plausible_clock_is_not_waited_for(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.clock
    from agent.clock import EARLIEST_PLAUSIBLE_TIME, clock_is_set

    monkeypatch.setattr(agent.clock, "TIMESYNC_SYNCHRONIZED", tmp_path / "absent")
    assert clock_is_set(EARLIEST_PLAUSIBLE_TIME)
    assert not clock_is_set(EARLIEST_PLAUSIBLE_TIME - 1)
    assert not clock_is_set(0.0)


async def test_a_stop_while_waiting_for_the_clock_closes_the_display(
        provider: IdentityProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.clock

    monkeypatch.setattr(agent.clock, "TIMESYNC_SYNCHRONIZED", tmp_path / "absent")
    clock = ManualClock(wall=86_400.0)
    display = RecordingDisplay(clock)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(_config(tmp_path, provider.issuer), shutdown=stop.wait(),
                                     clock=clock, display=display))
    await clock.run_until(lambda: display.kinds() == ["clock_not_set"])
    stop.set()
    await clock.run_until(task.done)
    await task
    assert display.closed
