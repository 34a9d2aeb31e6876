"""Builds the daemon from its config and runs it until told to stop.

`serve()` takes the shutdown trigger as an argument (hypercorn's pattern): only the CLI
installs signal handlers or exits the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.clock import Clock, SystemClock, clock_is_set
from agent.config import AgentConfig
from agent.consumers import Consumers, hooks_from_config, token_files_from_config
from agent.display import Display
from agent.display.kinds import KINDS
from agent.driver import Driver
from agent.errors import STORE_NEEDS_A_PERSON, ConfigError, StoreError
from agent.hooks import HookRunner
from agent.metrics import Metrics, Textfile
from agent.oauth import Client
from agent.oauth.discovery import ExplicitEndpoints
from agent.sealing import Encryption
from agent.session import SessionSettings
from agent.state import Phase, Snapshot, summary
from agent.store import CredentialStore
from agent.systemd import Notifier, listen_sockets, run_watchdog, watchdog_interval
from agent.transport import Transport

if TYPE_CHECKING:
    from agent.display.button import Button
    from agent.mqtt import FleetLink

__all__ = ["driver_settings", "serve"]

log = logging.getLogger(__name__)

# After SIGTERM, a refresh or an approval in flight gets this long to land on disk (the
# provider has rotated by then); the unit's TimeoutStopSec=10s leaves the rest for
# closing. With nothing in flight the agent stops at once.
REFRESH_GRACE = 8.0


def driver_settings(config: AgentConfig) -> SessionSettings:
    provider = config.provider
    return SessionSettings(
        client=Client(client_id=provider.client_id, client_secret=provider.client_secret),
        scopes=provider.scopes,
        device_name=config.device.name,
        issuer=provider.issuer,
        # Each one given wins; the rest come from discovery (check-provider reads the same).
        endpoints=ExplicitEndpoints(
            device_authorization=provider.device_authorization_endpoint,
            token=provider.token_endpoint,
            revocation=provider.revocation_endpoint,
            userinfo=provider.userinfo_endpoint,
        ),
        allow_insecure_http=provider.allow_insecure_http,
        codes_per_hour=config.sign_in.codes_per_hour,
        throttle_backoff=config.sign_in.throttle_backoff,
        throttle_backoff_max=config.sign_in.throttle_backoff_max,
        retry_initial=config.sign_in.retry_initial,
        retry_max=config.sign_in.retry_max,
        refresh_margin=config.refresh.margin,
        refresh_margin_ratio=config.refresh.margin_ratio,
        refresh_retry_initial=config.refresh.retry_initial,
        refresh_retry_max=config.refresh.retry_max,
        button=config.button.pin is not None,
        machine_id=machine_id(),
    )


def machine_id(path: Path = Path("/etc/machine-id")) -> str | None:
    """machine-id(5): unique per installation (host names repeat on cloned images)."""
    try:
        value = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value if len(value) == 32 and all(c in "0123456789abcdef" for c in value) else None


async def _drive_display(display: Display, driver: Driver, clock: Clock,
                         blank_after: float | None) -> None:
    """Redraw on every state change, and every second while a countdown runs; once
    signed in for `blank_after` seconds, blank the panel (OLEDs burn in)."""
    from agent.display.screens import BLANK_SCREEN, build_screen

    await display.start()
    signed_in_since: float | None = None
    try:
        while True:
            snapshot = driver.snapshot
            now = clock.monotonic()
            if snapshot.phase != Phase.SIGNED_IN:
                signed_in_since = None
            elif signed_in_since is None:
                signed_in_since = now
            blank_at = (None if signed_in_since is None or blank_after is None
                        else signed_in_since + blank_after)
            if blank_at is not None and now >= blank_at:
                screen = BLANK_SCREEN
            else:
                screen = build_screen(
                    snapshot, now_mono=now, now_wall=clock.time(),
                    code_lifetime=snapshot.code_lifetime)
            try:
                await display.show(screen)
            except Exception:
                log.exception("the display failed; the agent goes on without it")
            if snapshot.phase == Phase.AWAITING_USER:
                timeout: float | None = 1.0
            elif blank_at is not None and now < blank_at:
                timeout = blank_at - now
            else:
                timeout = None
            waits: list[asyncio.Future[object]] = [
                asyncio.ensure_future(driver.wait_for_change(snapshot))]
            if timeout is not None:
                waits.append(asyncio.ensure_future(clock.sleep(timeout)))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()
    finally:
        with contextlib.suppress(Exception):
            await display.close()


async def serve(config: AgentConfig, *, shutdown: Awaitable[object],
                clock: Clock | None = None, display: Display | None = None,
                use_default_display: bool = True,
                on_ready: Callable[[Driver], None] | None = None) -> None:
    """Run the agent until `shutdown` completes (or the driver fails)."""
    from agent.api import AccessPolicy, ApiServer, build_app

    clock = clock or SystemClock()
    stop = asyncio.ensure_future(shutdown)
    notifier = Notifier.from_environment()
    store = CredentialStore(config.storage.path,
                            encryption=Encryption(config.storage.encryption))
    tasks: list[asyncio.Task[None]] = []
    api: ApiServer | None = None
    button: Button | None = None
    consumers: Consumers | None = None
    fleet: FleetLink | None = None
    transport = Transport(timeout=config.provider.timeout,
                          max_response_bytes=config.provider.max_response_bytes,
                          ca_file=config.provider.ca_file)
    driver = Driver(driver_settings(config), sender=transport, store=store, clock=clock)
    # Before the driver's first step: the metrics count from the start.
    metrics = Metrics(driver)
    try:
        if display is None and use_default_display:
            # First, so a bad display option stops the agent (exit 78) before it starts.
            from agent.display.factory import create_display

            display = create_display(config.display, clock=clock)
        consumers = Consumers(driver, token_files_from_config(config.sinks),
                              HookRunner(hooks_from_config(config.hooks)))
        if config.mqtt.host is not None:
            # Here, so an mqtt: section that cannot work (aiomqtt missing, no name for
            # this device) stops the agent (exit 78) before it starts. Without a broker
            # nothing of MQTT is imported.
            from agent.mqtt import FleetLink, link_settings

            fleet = FleetLink(link_settings(config, machine_id=driver.settings.machine_id),
                              driver, clock=clock)
        def on_change(snapshot: Snapshot) -> None:
            notifier.status(summary(snapshot, now_wall=clock.time()))

        driver.add_listener(on_change)
        interval = watchdog_interval()

        def start_watchdog() -> None:
            # After READY: systemd counts the watchdog from there.
            if interval is not None and notifier.enabled and not any(
                    task.get_name() == "watchdog" for task in tasks):
                tasks.append(asyncio.create_task(run_watchdog(notifier, interval),
                                                 name="watchdog"))

        if not clock_is_set(clock.time()):
            # Before loading, which starts the first requests (discovery, a refresh).
            # Ready for systemd, which would otherwise kill a start that waits on NTP.
            notifier.ready("Waiting for the clock to be set (NTP) before signing in")
            start_watchdog()
            await _wait_for_the_clock(clock, display, stop)
            if stop.done():
                return
        try:
            store.open()
            await driver.load()
        except (ConfigError, StoreError) as exc:
            # Exit 78 follows and systemd does not restart: the fix goes on the panel,
            # which keeps it, for the person who walks up to a silent device. (A config
            # error here is storage.encryption's: a key required, or its library.)
            if isinstance(exc, (ConfigError, *STORE_NEEDS_A_PERSON)):
                await _show_fatal(display, str(exc))
            raise
        policy = AccessPolicy(read_users=config.api.read_users,
                              read_groups=config.api.read_groups,
                              admin_users=config.api.admin_users,
                              admin_groups=config.api.admin_groups)
        inherited = _inherited_socket()
        api = ApiServer(build_app(driver, policy, wall_clock=clock.time, metrics=metrics),
                        config.api.socket, mode=config.api.mode, sock=inherited)
        await api.start()
        if config.metrics.textfile is not None:
            tasks.append(asyncio.create_task(
                Textfile(metrics, config.metrics.textfile, clock=clock).run(),
                name="metrics-textfile"))
        if config.button.pin is not None:
            from agent.display.button import create_button

            # A short press asks for a new code while signing in; a hold starts over.
            try:
                button = create_button(
                    {"button_pin": config.button.pin, "button_hold": config.button.hold,
                     "button_pull_up": config.button.pull_up},
                    loop=asyncio.get_running_loop(), on_press=driver.request_login,
                    on_hold=lambda: driver.request_login(new_sign_in=True))
            except ConfigError as exc:  # gpiozero missing: say it of the button: section
                raise ConfigError("button.pin", exc.message) from None
        if display is not None:
            # Burn-in is a panel's problem (agent.display.kinds says whose); a console
            # keeps showing who is signed in.
            blank_after = (config.display.blank_after if KINDS[config.display.type].burns_in
                           else None)
            tasks.append(asyncio.create_task(
                _drive_display(display, driver, clock, blank_after), name="display"))
        if fleet is not None:
            fleet.start()
        run = asyncio.create_task(driver.run(), name="driver")
        notifier.ready(summary(driver.snapshot, now_wall=clock.time()))
        start_watchdog()
        if on_ready is not None:
            on_ready(driver)
        await asyncio.wait([run, stop], return_when=asyncio.FIRST_COMPLETED)
        if run.done():
            run.result()  # the driver never returns; re-raise what stopped it
        log.info("stopping")
        notifier.stopping("Stopping")
        # Callers go first (event streams would hold the shutdown); then a refresh in
        # flight gets its grace to land on disk.
        await api.close()
        if not driver.session.settled():
            # A refresh or an approval is in flight: the provider may have rotated, and
            # its answer must reach the disk before the process ends.
            notifier.extend_timeout(REFRESH_GRACE + 1.0, "Stopping: waiting for an answer "
                                    "from the provider to reach the disk")
        await driver.stop(REFRESH_GRACE)
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
    finally:
        stop.cancel()
        if fleet is not None:
            # After the driver's stop, so that "stopping" is the last state published;
            # bounded, so a broker that does not answer never holds up the stop.
            await fleet.aclose()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if display is not None and not any(task.get_name() == "display" for task in tasks):
            # Drawn on before the display task started (the clock wait, a fatal
            # screen) and never closed by it. Closing twice does nothing.
            with contextlib.suppress(Exception):
                await display.close()
        if button is not None:
            button.close()
        if consumers is not None:
            await consumers.aclose()
        if api is not None:
            await api.close()
        await driver.aclose()
        await transport.close()
        store.close()
        notifier.close()
        log.info("stopped")


# How often an unset clock is looked at again.
CLOCK_CHECK_INTERVAL = 2.0


async def _wait_for_the_clock(clock: Clock, display: Display | None,
                              stop: asyncio.Future[object]) -> None:
    """Before any request: TLS would fail with "certificate not yet valid" (read as "no
    network"), and a sign-in's expiry would be written in 1970. The API comes up once
    the clock is set."""
    from agent.display.screens import CLOCK_NOT_SET_SCREEN

    log.warning("the clock is not set (it says %s): waiting for network time (NTP) before "
                "signing in; check `timedatectl`", time.strftime(
                    "%Y-%m-%d %H:%M:%S UTC", time.gmtime(clock.time())))
    if display is not None:
        try:
            await display.start()
            await display.show(CLOCK_NOT_SET_SCREEN)
        except Exception:
            log.exception("the display failed; the agent goes on without it")
    while not clock_is_set(clock.time()):
        if stop.done():
            return
        await clock.sleep(CLOCK_CHECK_INTERVAL)
    log.info("the clock is set: %s", time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                    time.gmtime(clock.time())))


async def _show_fatal(display: Display | None, problem: str) -> None:
    if display is None:
        return
    from agent.display.screens import fatal_screen

    try:
        await display.start()
        await display.show(fatal_screen(problem))
        await display.close()
    except Exception:
        log.exception("the display failed to show the problem")


def _inherited_socket() -> socket.socket | None:
    sockets = listen_sockets()
    if not sockets:
        return None
    if len(sockets) > 1:
        log.warning("systemd passed %d sockets; using the first", len(sockets))
    return sockets[0]
