"""The fleet view on a real Mosquitto: what a dashboard sees, what it may ask, and that
the broker never holds the agent up.

Each test runs the assembled daemon (`agent.service.serve`) in this process, on the real
clock, against the test identity provider over loopback HTTP and a broker of its own
(`tests/mosquitto.py`: a random port, a password file, an ACL). A "dashboard" client
subscribed to `#` records every message the broker passes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from agent.client import call
from agent.clock import SystemClock
from agent.config import AgentConfig, DisplayConfig, config_from_mapping
from agent.driver import Driver
from agent.errors import CommandRefused, ConfigError
from agent.idp import IdentityProvider, ProviderSettings
from agent.service import serve
from agent.state import Phase, Snapshot
from tests.mosquitto import Mosquitto, missing
from tests.test_secrets_sweep import _sweep
from tests.test_service_process import ROOT, _child_env

aiomqtt = pytest.importorskip("aiomqtt", reason="needs aiomqtt: pip install -e '.[test]'")

# Guards against a hung agent or broker, never a measure of speed.
PATIENCE = 30.0
DEVICE = "kiosk-7"
BASE = f"device-agent/{DEVICE}"
CLIENT_SECRET = 'cs.Jq7u~Wm3R!kZx9&Tn2V+bLp8/Hs4Yd=6Fg1%Ce5"Aw0Qo'


# -- the broker and a dashboard on it ------------------------------------------------

@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    running = Mosquitto(tmp_path / "broker")
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
def clock() -> SystemClock:
    """The provider's clock: the real one, as the agent's is here (an ID token from the
    hand-moved clock's 2027 would look issued in the future)."""
    return SystemClock()


@pytest.fixture(autouse=True)
def quick_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    """The back-off keeps its shape (doubling, jittered) at a tenth of a second, so a
    test waits for a reconnect in real time without waiting long."""
    import agent.mqtt

    monkeypatch.setattr(agent.mqtt, "RETRY_INITIAL", 0.1)
    monkeypatch.setattr(agent.mqtt, "RETRY_MAX", 0.4)


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


class Dashboard:
    """What Home Assistant would see: every message on `#`, in order."""

    def __init__(self, broker: Mosquitto, *, user: str = "dashboard") -> None:
        self.client = aiomqtt.Client(broker.host, broker.port, username=user,
                                     password=broker.users[user],
                                     identifier=f"dashboard-{secrets.token_hex(4)}")
        self.messages: list[Message] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Dashboard:
        await self.client.__aenter__()
        await self.client.subscribe("#", qos=1)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._task
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _read(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):  # the broker went away
            async for message in self.client.messages:
                payload = message.payload
                assert isinstance(payload, bytes | bytearray)
                self.messages.append(Message(message.topic.value, bytes(payload),
                                             message.retain))
                self._arrived.set()

    async def until(self, what: str, holds: Callable[[], bool]) -> None:
        try:
            async with asyncio.timeout(PATIENCE):
                while not holds():
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(f"{what}: not seen; got {self.summary()}") from None

    def on(self, topic: str) -> list[Message]:
        return [m for m in self.messages if m.topic == topic]

    def latest(self, topic: str) -> Message | None:
        found = self.on(topic)
        return found[-1] if found else None

    def states(self) -> list[dict[str, Any]]:
        return [m.json() for m in self.on(f"{BASE}/state")]

    def state(self) -> dict[str, Any] | None:
        latest = self.latest(f"{BASE}/state")
        return None if latest is None else dict(latest.json())

    async def until_state(self, what: str, holds: Callable[[dict[str, Any]], bool],
                          ) -> dict[str, Any]:
        await self.until(what, lambda: (doc := self.state()) is not None and holds(doc))
        found = self.state()
        assert found is not None
        return found

    async def command(self, payload: bytes, *, retain: bool = False) -> None:
        await self.client.publish(f"{BASE}/command", payload, qos=1, retain=retain)

    def summary(self) -> str:
        return ", ".join(f"{m.topic}={m.payload[:60]!r}" for m in self.messages[-12:])


# -- the agent -----------------------------------------------------------------------

def agent_config(tmp_path: Path, provider: IdentityProvider, broker: Mosquitto, *,
                 password: str | None = None, display: str = "none",
                 **mqtt: Any) -> AgentConfig:
    password_file = tmp_path / "mqtt-password"
    password_file.write_text((password or broker.users["device"]) + "\n")
    password_file.chmod(0o600)
    provider_section: dict[str, Any] = {"issuer": provider.issuer, "client_id": "device-agent",
                                        "allow_insecure_http": True}
    if provider.settings.client_secret is not None:
        provider_section["client_secret"] = provider.settings.client_secret
    return config_from_mapping({
        "provider": provider_section,
        "device": {"name": "Kitchen display"},
        "display": {"type": display},
        "storage": {"path": str(tmp_path / "state" / "credentials.json")},
        "api": {"socket": str(tmp_path / "agent.sock")},
        "mqtt": {"host": broker.host, "port": broker.port, "username": "device",
                 "password_file": str(password_file), "client_id": DEVICE,
                 "base_topic": BASE, **mqtt},
    })


class Running:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stop = asyncio.Event()
        ready: asyncio.Future[Driver] = asyncio.get_running_loop().create_future()
        self.ready = ready
        self.task = asyncio.create_task(serve(config, shutdown=self.stop.wait(),
                                              use_default_display=False,
                                              on_ready=ready.set_result))

    async def driver(self) -> Driver:
        async with asyncio.timeout(PATIENCE):
            return await asyncio.shield(self.ready)

    async def until(self, what: str, holds: Callable[[Snapshot], bool]) -> Snapshot:
        """Until the agent's state holds `holds`: looked at on each new snapshot only,
        so a condition on anything else belongs to `eventually`."""
        driver = await self.driver()
        try:
            async with asyncio.timeout(PATIENCE):
                return await driver.wait_for(holds)
        except TimeoutError:
            raise AssertionError(f"{what}: the agent is {driver.snapshot}") from None

    async def api(self, method: str, target: str) -> tuple[int, dict[str, Any]]:
        answer = await asyncio.to_thread(call, self.config.api.socket, method, target)
        return answer.status, answer.body

    async def close(self) -> None:
        self.stop.set()
        async with asyncio.timeout(PATIENCE):
            await self.task


async def eventually(what: str, holds: Callable[[], bool]) -> None:
    """Until `holds()`, for what no snapshot announces (a log line, a request the
    provider saw): looked at every 10 ms."""
    try:
        async with asyncio.timeout(PATIENCE):
            while not holds():  # noqa: ASYNC110 - nothing announces those
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"{what}: not seen in {PATIENCE:.0f} s") from None


@contextlib.asynccontextmanager
async def running(config: AgentConfig) -> AsyncIterator[Running]:
    agent = Running(config)
    try:
        yield agent
    finally:
        await agent.close()


@pytest.fixture
def quick_provider(provider_settings: ProviderSettings) -> ProviderSettings:
    provider_settings.interval = 1
    return provider_settings


def device_requests(provider: IdentityProvider) -> int:
    return sum(1 for r in provider.requests if r.endpoint == "device" and r.status == 200)


def polls(provider: IdentityProvider, device_code: str | None) -> int:
    return sum(1 for r in provider.requests if r.endpoint == "token"
               and r.form.get("device_code") == device_code and r.status is not None)


def decode_png(payload: bytes) -> list[str]:
    import zxingcpp
    from PIL import Image

    image = Image.open(io.BytesIO(payload))
    return [barcode.text for barcode in zxingcpp.read_barcodes(image)]


def mqtt_lines(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "agent.mqtt" and r.levelno == level and text in r.getMessage()]


# -- what is published ----------------------------------------------------------------

async def test_discovery_describes_the_device_for_home_assistant(
        quick_provider: ProviderSettings, provider: IdentityProvider, broker: Mosquitto,
        tmp_path: Path) -> None:
    from agent.service import machine_id

    node = machine_id() or DEVICE
    async with Dashboard(broker) as dashboard, \
            running(agent_config(tmp_path, provider, broker)) as agent:
        await dashboard.until("online", lambda: (m := dashboard.latest(
            f"{BASE}/availability")) is not None and m.payload == b"online")
        await agent.until("a code", lambda s: s.phase == Phase.AWAITING_USER)

    configs = {m.topic: m for m in dashboard.messages if m.topic.startswith("homeassistant/")}
    expected = {f"homeassistant/{component}/{node}/{name}/config"
                for component, name in [("sensor", "state"), ("sensor", "code"),
                                        ("sensor", "token_expires"),
                                        ("binary_sensor", "needs_sign_in"),
                                        ("image", "screen"), ("button", "new_code")]}
    assert expected <= set(configs)
    for topic in expected:
        message = configs[topic]
        doc = message.json()
        assert doc["availability_topic"] == f"{BASE}/availability"
        assert doc["unique_id"] == f"device_agent_{node}_{topic.split('/')[3]}"
        assert doc["device"]["identifiers"] == [f"device_agent_{node}"]
        assert doc["device"]["name"] == "Kitchen display"
        assert doc["origin"]["name"] == "device-agent"
    image = configs[f"homeassistant/image/{node}/screen/config"].json()
    assert image["image_topic"] == f"{BASE}/screen"
    assert image["content_type"] == "image/png"
    button = configs[f"homeassistant/button/{node}/new_code/config"].json()
    assert (button["command_topic"], button["payload_press"]) == (f"{BASE}/command",
                                                                  "new_code")
    # Buttons the config does not enable are taken out of Home Assistant, not offered.
    for name in ("sign_out", "new_sign_in"):
        cleared = configs.get(f"homeassistant/button/{node}/{name}/config")
        assert cleared is not None and cleared.payload == b""

    # Retained: a dashboard that subscribes later sees the same documents at once.
    async with Dashboard(broker) as late:
        await late.until("the retained discovery", lambda: expected <= {
            m.topic for m in late.messages})
        assert all(m.retain for m in late.messages if m.topic in expected)
        assert not any(m.topic.endswith(("sign_out/config", "new_sign_in/config"))
                       for m in late.messages)


async def test_enabled_buttons_are_offered(
        quick_provider: ProviderSettings, provider: IdentityProvider, broker: Mosquitto,
        tmp_path: Path) -> None:
    from agent.service import machine_id

    node = machine_id() or DEVICE
    config = agent_config(tmp_path, provider, broker,
                          commands=["new_code", "sign_out", "new_sign_in"])
    async with Dashboard(broker) as dashboard, running(config):
        topics = {f"homeassistant/button/{node}/{name}/config": name
                  for name in ("new_code", "sign_out", "new_sign_in")}
        await dashboard.until("three buttons", lambda: all(
            (m := dashboard.latest(t)) is not None and m.payload for t in topics))
        for topic, name in topics.items():
            message = dashboard.latest(topic)
            assert message is not None and message.json()["payload_press"] == name


async def test_state_through_sign_in_refresh_and_logout_and_no_secret_on_any_topic(
        quick_provider: ProviderSettings, provider: IdentityProvider, broker: Mosquitto,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quick_provider.client_secret = CLIENT_SECRET
    config = agent_config(tmp_path, provider, broker,
                          commands=["new_code", "sign_out", "new_sign_in"])
    async with Dashboard(broker) as dashboard:
        async with running(config) as agent:
            # A code on screen: the state carries it exactly as issued, with its links.
            waiting = await dashboard.until_state(
                "a code", lambda d: d["state"] == "awaiting_user")
            [issued] = provider.pending_user_codes()
            assert waiting["code"]["user_code"] == issued
            assert waiting["code"]["verification_uri"].endswith("/device")
            assert waiting["code"]["verification_uri_complete"].endswith(f"code={issued}")
            assert waiting["needs_sign_in"] is True
            assert waiting["device_name"] == "Kitchen display"
            assert waiting["version"]

            provider.approve(issued)
            signed = await dashboard.until_state(
                "signed in", lambda d: d["state"] == "signed_in")
            assert signed["user"] == "Alice Example" and signed["code"] is None
            assert signed["needs_sign_in"] is False and signed["token_expires_at"]

            # A refresh that brings a token living longer: a new expiry is published.
            quick_provider.access_token_lifetime = 7200
            driver = await agent.driver()
            await driver.refresh()
            await dashboard.until_state("the refreshed expiry", lambda d: d["state"] ==
                                        "signed_in" and d["token_expires_at"]
                                        != signed["token_expires_at"])

            # A sign-out from the dashboard (enabled here): a new code follows.
            await dashboard.command(b"sign_out")
            again = await dashboard.until_state(
                "signed out, a new code", lambda d: d["state"] == "awaiting_user"
                and d["user"] is None and d["code"]["user_code"] != issued)
            assert again["needs_sign_in"] is True
        # A clean stop says so before it goes.
        await dashboard.until("offline", lambda: (m := dashboard.latest(
            f"{BASE}/availability")) is not None and m.payload == b"offline")
        assert dashboard.states()[-1]["state"] == "stopping", dashboard.summary()

    # Every payload on every topic, the PNGs and what their QR codes say included.
    texts = [(m.topic, m.payload.decode("latin-1")) for m in dashboard.messages]
    texts += [(f"{m.topic} (QR)", text) for m in dashboard.on(f"{BASE}/screen")
              for text in decode_png(m.payload)]
    issued_secrets = provider.issued_secrets()
    assert len(issued_secrets["device_code"]) >= 2 and len(issued_secrets["refresh_token"]) >= 2
    leaks = _sweep({**issued_secrets, "client_secret": [CLIENT_SECRET],
                    "mqtt_password": [broker.users["device"]]}, texts)
    assert not leaks, "\n".join(leaks[:20])
    topics = sorted({m.topic for m in dashboard.messages})
    with capsys.disabled():
        print(f"\nsecret scan: {len(dashboard.messages)} payloads on {len(topics)} topics, "
              f"{sum(len(m.payload) for m in dashboard.messages)} bytes, 0 leaks: "
              + " ".join(topics))


async def test_the_screen_shows_the_qr_code_and_is_sent_once_per_screen(
        quick_provider: ProviderSettings, provider: IdentityProvider, broker: Mosquitto,
        tmp_path: Path) -> None:
    async with Dashboard(broker) as dashboard, \
            running(agent_config(tmp_path, provider, broker, display="console")) as agent:
        waiting = await dashboard.until_state("a code", lambda d: d["state"] == "awaiting_user")
        uri = waiting["code"]["verification_uri_complete"]
        screen = f"{BASE}/screen"
        await dashboard.until("the code's screen", lambda: any(
            uri in decode_png(m.payload) for m in dashboard.on(screen)))
        # A console device: the 128x64 layout, scaled for a dashboard.
        from PIL import Image

        latest = dashboard.latest(screen)
        assert latest is not None
        assert Image.open(io.BytesIO(latest.payload)).size == (512, 256)
        sent = len(dashboard.on(screen))
        # The countdown runs and the agent polls: nothing of that is a new picture.
        driver = await agent.driver()
        code = driver.session.device_code
        polled = polls(provider, code)
        await eventually("two more polls", lambda: polls(provider, code) >= polled + 2)
        assert len(dashboard.on(screen)) == sent

        provider.approve()
        await dashboard.until("the signed-in screen", lambda: len(dashboard.on(screen)) > sent)
        signed_in = dashboard.latest(screen)
        assert signed_in is not None and decode_png(signed_in.payload) == []


async def test_the_heartbeat_sends_the_state_and_online_again_but_not_the_picture(
        quick_provider: ProviderSettings, provider: IdentityProvider, broker: Mosquitto,
        tmp_path: Path) -> None:
    config = agent_config(tmp_path, provider, broker, heartbeat=0.2)
    async with Dashboard(broker) as dashboard, running(config) as agent:
        waiting = await dashboard.until_state("a code", lambda d: d["state"] == "awaiting_user")
        provider.approve(waiting["code"]["user_code"])
        signed = await dashboard.until_state("signed in", lambda d: d["state"] == "signed_in")
        # The picture follows the state: the signed-in one has no QR code.
        await dashboard.until("the signed-in picture", lambda: (m := dashboard.latest(
            f"{BASE}/screen")) is not None and decode_png(m.payload) == [])
        states = len(dashboard.on(f"{BASE}/state"))
        onlines = len(dashboard.on(f"{BASE}/availability"))
        screens = len(dashboard.on(f"{BASE}/screen"))
        await dashboard.until("three beats", lambda: len(dashboard.on(f"{BASE}/state"))
                              >= states + 3 and len(dashboard.on(f"{BASE}/availability"))
                              >= onlines + 3)
        assert all(m.json() == signed for m in dashboard.on(f"{BASE}/state")[states:])
        assert len(dashboard.on(f"{BASE}/screen")) == screens
        assert (await agent.driver()).snapshot.phase == Phase.SIGNED_IN


# -- what a dashboard may ask -------------------------------------------------------------

async def test_the_new_code_button_asks_for_a_code_only_while_not_signed_in(
        quick_provider: ProviderSettings, provider: IdentityProvider, broker: Mosquitto,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.mqtt")
    async with Dashboard(broker) as dashboard, \
            running(agent_config(tmp_path, provider, broker)) as agent:
        first = await dashboard.until_state("a code", lambda d: d["state"] == "awaiting_user")
        await dashboard.until("online", lambda: (m := dashboard.latest(
            f"{BASE}/availability")) is not None and m.payload == b"online")
        await dashboard.command(b"new_code")
        second = await dashboard.until_state("another code", lambda d: d["code"] is not None
                                             and d["code"]["user_code"]
                                             != first["code"]["user_code"])
        assert device_requests(provider) == 2

        provider.approve(second["code"]["user_code"])
        await dashboard.until_state("signed in", lambda d: d["state"] == "signed_in")
        # Signed in, a code is for a new sign-in, which this config does not allow.
        await dashboard.command(b"new_code")
        await eventually("the command heard", lambda: bool(
            mqtt_lines(caplog, logging.WARNING, "new_code ignored")))
        assert device_requests(provider) == 2
        assert (await agent.driver()).snapshot.phase == Phase.SIGNED_IN


async def test_commands_not_enabled_or_not_commands_are_ignored_and_logged(
        quick_provider: ProviderSettings, provider: IdentityProvider, broker: Mosquitto,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.mqtt")
    async with Dashboard(broker) as dashboard:
        # Retained before the agent connects: it would come again at every reconnect.
        await dashboard.command(b"new_code", retain=True)
        async with running(agent_config(tmp_path, provider, broker)) as agent:
            waiting = await dashboard.until_state(
                "a code", lambda d: d["state"] == "awaiting_user")
            await eventually("the retained command heard", lambda: bool(
                mqtt_lines(caplog, logging.WARNING, "retained")))
            provider.approve(waiting["code"]["user_code"])
            await dashboard.until_state("signed in", lambda d: d["state"] == "signed_in")
            for payload, says in ((b"sign_out", "sign_out is not enabled"),
                                  (b"new_sign_in", "new_sign_in is not enabled"),
                                  (b"\xff\x00" + b"x" * 5000, "not a command")):
                await dashboard.command(payload)
                await eventually(says, lambda says=says: bool(
                    mqtt_lines(caplog, logging.WARNING, says)))
            assert (await agent.driver()).snapshot.phase == Phase.SIGNED_IN
            assert device_requests(provider) == 1
    garbage = mqtt_lines(caplog, logging.WARNING, "not a command")
    assert all(len(line) < 300 for line in garbage), garbage


async def test_new_sign_in_while_signed_in_when_enabled(
        quick_provider: ProviderSettings, provider: IdentityProvider, broker: Mosquitto,
        tmp_path: Path) -> None:
    config = agent_config(tmp_path, provider, broker, commands=["new_code", "new_sign_in"])
    async with Dashboard(broker) as dashboard, running(config):
        waiting = await dashboard.until_state("a code", lambda d: d["state"] == "awaiting_user")
        provider.approve(waiting["code"]["user_code"])
        await dashboard.until_state("signed in", lambda d: d["state"] == "signed_in")
        await dashboard.command(b"new_sign_in")
        again = await dashboard.until_state(
            "a new sign-in beside the current one", lambda d: d["state"] == "awaiting_user")
        assert again["user"] == "Alice Example"  # still served meanwhile


# -- the broker never holds the agent up ------------------------------------------------

async def test_a_wrong_password_is_said_once_and_the_agent_works_without_the_broker(
        quick_provider: ProviderSettings, provider: IdentityProvider, broker: Mosquitto,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.mqtt")
    config = agent_config(tmp_path, provider, broker, password="not-the-password")
    async with Dashboard(broker) as dashboard, running(config) as agent:
        await agent.until("a code", lambda s: s.phase == Phase.AWAITING_USER)
        provider.approve()
        await agent.until("signed in", lambda s: s.phase == Phase.SIGNED_IN)
        status, body = await agent.api("GET", "/v1/status")
        assert status == 200 and body["state"] == "signed_in"
        status, body = await agent.api("GET", "/v1/token")
        assert status == 200 and body["access_token"]
        await eventually("three refusals", lambda: len(
            mqtt_lines(caplog, logging.DEBUG, "refused")) >= 2)
        [said] = [line for level in (logging.WARNING, logging.ERROR)
                  for line in mqtt_lines(caplog, level, "")]
        assert "mqtt.password_file" in said and "mqtt.username" in said
        assert "not-the-password" not in caplog.text
        assert dashboard.state() is None

        # The file mended: the next try reads it, with no restart.
        assert config.mqtt.password_file is not None
        config.mqtt.password_file.write_text(broker.users["device"])
        await dashboard.until_state("the state, once let in",
                                    lambda d: d["state"] == "signed_in")
        assert mqtt_lines(caplog, logging.INFO, "connected")


async def test_a_broker_restart_gets_the_retained_state_back(
        quick_provider: ProviderSettings, provider: IdentityProvider, broker: Mosquitto,
        tmp_path: Path) -> None:
    async with running(agent_config(tmp_path, provider, broker)) as agent:
        async with Dashboard(broker) as dashboard:
            waiting = await dashboard.until_state("a code", lambda d: d["state"]
                                                  == "awaiting_user")
            provider.approve(waiting["code"]["user_code"])
            await dashboard.until_state("signed in", lambda d: d["state"] == "signed_in")
        # No persistence: the restarted broker has forgotten every retained message.
        await broker.restart()
        async with Dashboard(broker) as back:
            await back.until_state("the state again", lambda d: d["state"] == "signed_in")
            await back.until("online again", lambda: (m := back.latest(
                f"{BASE}/availability")) is not None and m.payload == b"online")
        async with Dashboard(broker) as after:
            await after.until("everything retained again", lambda: {
                f"{BASE}/state", f"{BASE}/availability", f"{BASE}/screen"} <= {
                m.topic for m in after.messages if m.retain} and any(
                m.topic.startswith("homeassistant/") for m in after.messages))
            state = after.state()
            assert state is not None and state["state"] == "signed_in"
            availability = after.latest(f"{BASE}/availability")
            assert availability is not None and availability.payload == b"online"
        assert (await agent.driver()).snapshot.phase == Phase.SIGNED_IN


async def test_the_broker_down_at_start_changes_nothing_and_is_said_once(
        quick_provider: ProviderSettings, provider: IdentityProvider, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    caplog.set_level(logging.DEBUG, logger="agent.mqtt")
    broker = Mosquitto(tmp_path / "broker")  # not started: nothing listens on its port
    await broker._prepare()
    config = agent_config(tmp_path, provider, broker)
    try:
        async with running(config) as agent:
            await agent.until("a code", lambda s: s.phase == Phase.AWAITING_USER)
            provider.approve()
            await agent.until("signed in", lambda s: s.phase == Phase.SIGNED_IN)
            assert (await agent.api("GET", "/v1/token"))[0] == 200
            await eventually("retries", lambda: len(
                mqtt_lines(caplog, logging.DEBUG, "Connection refused")) >= 2)
            said = mqtt_lines(caplog, logging.WARNING, "")
            assert len(said) == 1 and "Connection refused" in said[0], said

            await broker.start()
            async with Dashboard(broker) as dashboard:
                await dashboard.until_state("the state, once the broker is up",
                                            lambda d: d["state"] == "signed_in")
    finally:
        await broker.stop()


async def test_a_broker_that_never_answers_holds_up_neither_sign_in_nor_stop(
        quick_provider: ProviderSettings, provider: IdentityProvider, tmp_path: Path) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    broker = Mosquitto(tmp_path / "broker")
    broker.port = port
    config = agent_config(tmp_path, provider, broker)
    try:
        async with running(config) as agent:
            await agent.until("a code", lambda s: s.phase == Phase.AWAITING_USER)
            assert accepted, "the agent never tried the broker"
            provider.approve()
            await agent.until("signed in", lambda s: s.phase == Phase.SIGNED_IN)
            assert (await agent.api("GET", "/v1/status"))[0] == 200
        # `running` returned: the stop did not wait for the broker.
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_the_last_will_says_offline_when_the_agent_dies(
        quick_provider: ProviderSettings, provider: IdentityProvider, broker: Mosquitto,
        tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config = agent_config(tmp_path, provider, broker)
    assert config.mqtt.password_file is not None
    config_file.write_text(json.dumps({
        "provider": {"issuer": provider.issuer, "client_id": "device-agent",
                     "allow_insecure_http": True},
        "display": {"type": "none"},
        "storage": {"path": str(tmp_path / "state" / "credentials.json")},
        "api": {"socket": str(tmp_path / "agent.sock")},
        "mqtt": {"host": broker.host, "port": broker.port, "username": "device",
                 "password_file": str(config.mqtt.password_file), "client_id": DEVICE,
                 "base_topic": BASE},
    }))
    async with Dashboard(broker) as dashboard:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "run", "--config", str(config_file),
            env=_child_env(), cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            await dashboard.until("online", lambda: (m := dashboard.latest(
                f"{BASE}/availability")) is not None and m.payload == b"online")
        finally:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGKILL)
            await child.wait()
        await dashboard.until("the will", lambda: (m := dashboard.latest(
            f"{BASE}/availability")) is not None and m.payload == b"offline")


# -- the parts, without a broker --------------------------------------------------------

def test_without_an_mqtt_section_nothing_of_mqtt_is_imported(tmp_path: Path) -> None:
    code = r"""
import asyncio, json, sys
from agent.config import config_from_mapping
from agent.service import serve

async def main(mqtt):
    data = {"provider": {"issuer": "http://127.0.0.1:9/application/o/x/",
                         "client_id": "c", "allow_insecure_http": True},
            "display": {"type": "none"},
            "storage": {"path": sys.argv[1] + "/state/credentials.json"},
            "api": {"socket": sys.argv[1] + "/agent.sock"}}
    if mqtt:
        data["mqtt"] = {"host": "127.0.0.1", "port": 9, "client_id": "c", "base_topic": "x"}
    stop = asyncio.Event()
    await serve(config_from_mapping(data), shutdown=stop.wait(), use_default_display=False,
                on_ready=lambda driver: stop.set())

asyncio.run(main(sys.argv[2] == "with"))
print(json.dumps(sorted(m for m in sys.modules
                        if m.split(".")[0] in ("aiomqtt", "paho") or m == "agent.mqtt")))
"""
    found = {}
    for case in ("without", "with"):
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path / case), case],
                                capture_output=True, text=True, cwd=ROOT, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0, result.stderr
        found[case] = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["without"] == []
    assert "agent.mqtt" in found["with"] and "aiomqtt" in found["with"]


def snapshot(phase: Phase, **fields: Any) -> Snapshot:
    return Snapshot(phase=phase, device_name="d", **fields)


@pytest.mark.parametrize(("state", "needs"), [
    (snapshot(Phase.STARTING), False),
    (snapshot(Phase.AWAITING_USER, user_code="123"), True),
    (snapshot(Phase.AWAITING_USER, user_code="123", user="alice"), True),
    (snapshot(Phase.SIGNED_IN, user="alice"), False),
    (snapshot(Phase.REFRESH_FAILING, user="alice", token_expires_at=1.0), False),
    (snapshot(Phase.CODE_EXPIRED), True),
    (snapshot(Phase.NEEDS_BUTTON), True),
    (snapshot(Phase.DENIED), True),
    (snapshot(Phase.THROTTLED), True),
    (snapshot(Phase.THROTTLED, user="alice", token_expires_at=1.0), False),
    (snapshot(Phase.NO_NETWORK), True),
    (snapshot(Phase.NO_NETWORK, user="alice", token_expires_at=1.0), False),
    (snapshot(Phase.CONFIG_ERROR), True),
    (snapshot(Phase.STOPPING), False),
])
def test_needs_sign_in(state: Snapshot, needs: bool) -> None:
    from agent.mqtt import needs_sign_in

    assert needs_sign_in(state) is needs


@pytest.mark.parametrize(("display", "geometry"), [
    (DisplayConfig(type="console"), (128, 64, "1")),
    (DisplayConfig(type="none"), (128, 64, "1")),
    (DisplayConfig(type="terminal"), (128, 64, "1")),
    (DisplayConfig(type="ssd1306"), (128, 64, "1")),
    (DisplayConfig(type="ssd1322"), (256, 64, "L")),
    (DisplayConfig(type="ssd1351"), (128, 128, "RGB")),
    (DisplayConfig(type="sh1107", options={"rotate": 1}), (128, 64, "1")),
    # Too small for a QR code: the dashboard gets the one that has it.
    (DisplayConfig(type="ssd1306", options={"height": 32}), (128, 64, "1")),
    (DisplayConfig(type="ws0010"), (128, 64, "1")),
    (DisplayConfig(type="png", path=Path("/x.png"),
                   options={"width": 256, "height": 128, "mode": "L"}), (256, 128, "L")),
])
def test_the_screen_is_drawn_as_the_panel_draws_it(display: DisplayConfig,
                                                   geometry: tuple[int, int, str]) -> None:
    from agent.mqtt import screen_geometry

    assert screen_geometry(display) == geometry


def _config(**mqtt: Any) -> AgentConfig:
    return config_from_mapping({"provider": {"issuer": "https://a.example/x/",
                                             "client_id": "c"},
                                "mqtt": {"host": "broker", **mqtt}})


def test_topics_and_client_id_come_from_the_machine_id() -> None:
    from agent.mqtt import link_settings

    settings = link_settings(_config(), machine_id="0123456789abcdef0123456789abcdef")
    assert settings.base_topic == "device-agent/0123456789abcdef0123456789abcdef"
    assert settings.client_id == "device-agent-0123456789abcdef0123456789abcdef"
    assert settings.port == 1883
    assert link_settings(_config(tls=True), machine_id="0" * 32).port == 8883
    named = link_settings(_config(client_id="k", base_topic="f/k"), machine_id="0" * 32)
    assert (named.client_id, named.base_topic, named.device_id) == ("k", "f/k", "0" * 32)


def test_without_a_machine_id_the_config_must_name_the_device() -> None:
    from agent.mqtt import link_settings

    with pytest.raises(ConfigError) as caught:
        link_settings(_config(), machine_id=None)
    assert caught.value.key == "mqtt.client_id"
    named = link_settings(_config(client_id="kiosk 7/a", base_topic="f/k"), machine_id=None)
    assert named.device_id == "kiosk_7_a"


def test_without_aiomqtt_the_mqtt_section_is_a_config_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.mqtt import link_settings

    monkeypatch.setitem(sys.modules, "aiomqtt", None)  # import aiomqtt fails
    with pytest.raises(ConfigError) as caught:
        link_settings(_config(), machine_id="0" * 32)
    assert caught.value.key == "mqtt.host" and "device-agent[mqtt]" in caught.value.message


@pytest.mark.parametrize("payload", [b"new_code", b" new_code\n", "sign_out", b"new_sign_in"])
def test_commands_are_read(payload: bytes | str) -> None:
    from agent.mqtt import parse_command

    assert parse_command(payload) == (payload.decode() if isinstance(payload, bytes)
                                      else payload).strip()


def test_only_typed_errors_leave_the_command_parser() -> None:
    from hypothesis import example, given, settings
    from hypothesis import strategies as st

    from agent.mqtt import parse_command

    @settings(max_examples=200, deadline=None, database=None)
    @given(st.one_of(st.binary(max_size=100), st.text(max_size=100), st.integers(),
                     st.floats(), st.none(), st.sampled_from(["new_code\x00", "\ud800"])))
    @example(b"\xff" * 70_000)
    @example("new_code" * 10_000)
    @example(bytearray(b"sign_out"))
    def check(payload: Any) -> None:
        try:
            parse_command(payload)
        except CommandRefused as exc:
            assert len(str(exc)) < 200

    check()


def test_the_state_document_is_the_status_document_and_needs_sign_in() -> None:
    from agent.api import status_document
    from agent.mqtt import state_document

    state = snapshot(Phase.AWAITING_USER, user_code="123456789",
                     verification_uri="https://a/device",
                     verification_uri_complete="https://a/device?code=123456789",
                     code_expires_at=1_800_000_060.0)
    assert state_document(state) == {**status_document(state), "needs_sign_in": True}
    assert state_document(replace(state, phase=Phase.SIGNED_IN))["code"] is None
