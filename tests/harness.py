"""Shared fixtures: a test identity provider over real loopback HTTP, a real store in a
temp dir, and a clock the test moves by hand."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.driver import Driver
from agent.idp import IdentityProvider, ProviderSettings, serve_provider
from agent.oauth import Client
from agent.session import SessionSettings
from agent.state import Phase, Snapshot
from agent.store import CredentialStore
from agent.transport import Transport
from tests.clock import ManualClock


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def provider_settings() -> ProviderSettings:
    return ProviderSettings()


@pytest.fixture
async def provider(provider_settings: ProviderSettings,
                   clock: ManualClock) -> AsyncIterator[IdentityProvider]:
    async with serve_provider(provider_settings, clock=clock) as running:
        yield running


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Outside pytest's 0700 tmp tree, so clients under other uids can reach the socket,
    # and short enough for sun_path.
    path = Path(tempfile.mkdtemp(prefix="da-sock-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "credentials.json"


@pytest.fixture
def store(store_path: Path) -> AsyncIterator[CredentialStore]:
    with CredentialStore(store_path) as opened:
        yield opened


@pytest.fixture
async def transport() -> AsyncIterator[Transport]:
    async with Transport(timeout=5.0) as running:
        yield running


def settings_for(provider: IdentityProvider, **overrides: Any) -> SessionSettings:
    base: dict[str, Any] = {
        "client": Client(client_id=provider.settings.client_id,
                         client_secret=provider.settings.client_secret),
        "scopes": ("openid", "profile", "email", "offline_access"),
        "device_name": "Test device",
        "issuer": provider.issuer,
        "allow_insecure_http": True,
    }
    base.update(overrides)
    return SessionSettings(**base)


class Running:
    """A driver running in the background, and ways to wait for it."""

    def __init__(self, driver: Driver, clock: ManualClock) -> None:
        self.driver = driver
        self.clock = clock
        self.task = asyncio.create_task(driver.run())
        self.seen: list[Snapshot] = []
        driver.add_listener(self.seen.append)

    async def until(self, condition: Callable[[Snapshot], bool], *,
                    max_seconds: float = 86_400) -> Snapshot:
        def holds() -> bool:
            if self.task.done():
                self.task.result()  # surface the driver's exception
                raise AssertionError("the driver stopped")
            return condition(self.driver.snapshot)

        await self.clock.run_until(holds, max_seconds=max_seconds)
        return self.driver.snapshot

    async def until_phase(self, phase: Phase, **kwargs: Any) -> Snapshot:
        return await self.until(lambda s: s.phase == phase, **kwargs)

    async def stop(self) -> None:
        """As a kill would: the pump and its requests end where they are."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.driver.aclose()


StartDriver = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_driver(provider: IdentityProvider, store: CredentialStore,
                       transport: Transport, clock: ManualClock,
                       ) -> AsyncIterator[StartDriver]:
    running: list[Running] = []

    async def start(*, store_override: CredentialStore | None = None,
                    sender: Transport | None = None, **overrides: Any) -> Running:
        driver = Driver(settings_for(provider, **overrides), sender=sender or transport,
                        store=store_override or store, clock=clock, rng=random.Random(1))
        runner = Running(driver, clock)
        running.append(runner)
        return runner

    yield start
    for runner in running:
        await runner.stop()
