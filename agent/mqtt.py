"""The fleet view: this device's sign-in state on an MQTT broker, for dashboards.

Under `mqtt.base_topic` (default ``device-agent/<machine id>``), all retained, QoS 1:

    availability  "online", and "offline" as the Last Will and at a clean stop
    state         the status document (`api.status_document`, without the setup fields)
                  plus `needs_sign_in`, as JSON, whenever it changes and every heartbeat
    screen        the screen as a PNG, whenever the picture changes: the countdown and
                  the pages a panel turns are left out, so a code is one picture
    command       where a dashboard's buttons publish (`mqtt.commands` says which count)

and Home Assistant discovery documents under `mqtt.discovery_prefix`. Nothing published
holds a token, a device code or a secret: the state document is the one the API
already gives any reader, and the screen is what the panel shows.

Like `consumers.py`, it follows the driver's snapshots and changes nothing in the
lifecycle; the commands call what the API's POST /v1/login and /v1/logout call, within
the same rules. The broker never holds the agent up: the connection lives in a task of
its own, is tried again with jittered back-off (`pacing.Backoff`), each kind of trouble
is logged once with its fix until the link works again, and pictures are drawn in a
worker thread. aiomqtt (paho underneath) is imported only here, and this module only
when the config names a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from agent import __version__
from agent.api import status_document
from agent.clock import Clock
from agent.config import MQTT_COMMANDS, AgentConfig, DisplayConfig, read_secret_file
from agent.connections import RateLimit, more
from agent.display.kinds import KINDS
from agent.errors import CommandRefused, ConfigError, IllegalInput
from agent.pacing import Backoff
from agent.state import Phase, Snapshot

if TYPE_CHECKING:
    import aiomqtt

    from agent.display.screens import Screen
    from agent.driver import Driver

__all__ = ["FleetLink", "LinkSettings", "dashboard_screen", "discovery_messages",
           "link_settings", "needs_sign_in", "parse_command", "render_png",
           "screen_geometry", "state_document"]

log = logging.getLogger(__name__)


class _Demoted(logging.Filter):
    """paho says again, at ERROR and on every broken connection, what the link's one
    line says; its packet trace is for debugging. All of it is logged at debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return paho_log.isEnabledFor(logging.DEBUG)


paho_log = logging.getLogger(f"{__name__}.paho")
paho_log.addFilter(_Demoted())

ONLINE: Final = b"online"
OFFLINE: Final = b"offline"

# Reconnects: doubling from RETRY_INITIAL to RETRY_MAX seconds, jittered.
RETRY_INITIAL = 1.0
RETRY_MAX = 60.0
# A connection that lasted this long was a working one, and the back-off starts over
# after it; one dropped at once (a client id the broker gives to another device, an
# ACL that kicks) keeps backing off instead of reconnecting every second.
STABLE = 60.0
# Each wait on the broker (CONNACK, SUBACK, PUBACK) gives up after this; the link then
# starts over.
BROKER_TIMEOUT = 10.0
# A stop waits this long for "offline" to reach the broker, then drops the link (the
# will says offline then), well inside the unit's TimeoutStopSec.
CLOSE_GRACE = 2.0

# The picture a console or headless device publishes, and one for panels too small for
# a QR code: the dashboard's point is the code to scan.
DASHBOARD_SCREEN: Final = (128, 64, "1")
QR_MIN_SIDE: Final = 64
# Pixels are enlarged, unsmoothed, until the longer side reaches this: a 128x64 frame
# shown on a dashboard is otherwise blurred by the browser's scaling.
DASHBOARD_PIXELS: Final = 512

# A command is one word; anything longer is refused unread.
COMMAND_MAX_BYTES: Final = 64


# -- the settings ---------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class LinkSettings:
    host: str
    port: int
    client_id: str
    base_topic: str
    # Names this device in Home Assistant's registry: the machine id.
    device_id: str
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    keepalive: int = 60
    heartbeat: float | None = 300.0
    discovery_prefix: str | None = "homeassistant"
    commands: frozenset[str] = frozenset({"new_code"})
    screen: tuple[int, int, str] = DASHBOARD_SCREEN

    @property
    def availability_topic(self) -> str:
        return f"{self.base_topic}/availability"

    @property
    def state_topic(self) -> str:
        return f"{self.base_topic}/state"

    @property
    def screen_topic(self) -> str:
        return f"{self.base_topic}/screen"

    @property
    def command_topic(self) -> str:
        return f"{self.base_topic}/command"


def link_settings(config: AgentConfig, *, machine_id: str | None) -> LinkSettings:
    """The link the config asks for. Raises ConfigError (exit 78) when aiomqtt is
    missing, or when this device has no name of its own on the broker."""
    mqtt = config.mqtt
    if mqtt.host is None:
        raise ConfigError("mqtt.host", "required to publish to a broker")
    try:
        import aiomqtt  # noqa: F401
    except ImportError:
        raise ConfigError("mqtt.host", "needs aiomqtt, which is not installed: "
                                       "pip install 'device-agent[mqtt]'") from None
    if machine_id is not None:
        device_id = machine_id
    elif mqtt.client_id is not None:
        # Home Assistant's ids allow these characters only.
        device_id = re.sub(r"[^A-Za-z0-9_-]", "_", mqtt.client_id)
    else:
        # Host names repeat on cloned images, and two clients with one id make the
        # broker drop each other: there is no safe name to make up.
        raise ConfigError("mqtt.client_id", "/etc/machine-id holds no machine id, so this "
                                            "device has no name of its own on the broker; "
                                            "set mqtt.client_id (and mqtt.base_topic) to "
                                            "one unique to this device")
    return LinkSettings(
        host=mqtt.host, port=mqtt.port or (8883 if mqtt.tls else 1883),
        client_id=mqtt.client_id or f"device-agent-{device_id}",
        base_topic=mqtt.base_topic or f"device-agent/{device_id}",
        device_id=device_id, tls=mqtt.tls, ca_file=mqtt.ca_file, cert_file=mqtt.cert_file,
        key_file=mqtt.key_file, username=mqtt.username, password_file=mqtt.password_file,
        keepalive=mqtt.keepalive, heartbeat=mqtt.heartbeat,
        discovery_prefix=mqtt.discovery_prefix, commands=frozenset(mqtt.commands),
        screen=screen_geometry(config.display))


def screen_geometry(display: DisplayConfig) -> tuple[int, int, str]:
    """Width, height and colour mode of the published picture: the panel's own where it
    holds a QR code, else the 128x64 layout."""
    kind = KINDS.get(display.type)
    if (kind is None or kind.family not in ("oled", "png") or kind.geometry is None
            or kind.mode is None):
        return DASHBOARD_SCREEN
    from agent.display.layout import MODES

    width, height = kind.geometry
    mode = kind.mode
    options = display.options

    def number(name: str, default: int) -> int:
        value = options.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    width, height = number("width", width), number("height", height)
    if kind.family == "png" and options.get("mode") in MODES:
        mode = str(options["mode"])
    if options.get("rotate") in (1, 3):
        width, height = height, width
    if min(width, height) < QR_MIN_SIDE:
        return DASHBOARD_SCREEN
    return (width, height, mode)


# -- what is published ----------------------------------------------------------------

_SIGNED_IN_PHASES: Final = frozenset({Phase.SIGNED_IN, Phase.REFRESH_FAILING})


def needs_sign_in(snapshot: Snapshot) -> bool:
    """A person is wanted: a code is on screen, or the device holds no sign-in (and is
    neither starting nor stopping)."""
    if snapshot.phase == Phase.AWAITING_USER:
        return True
    if snapshot.phase in _SIGNED_IN_PHASES or snapshot.phase in (Phase.STARTING,
                                                                 Phase.STOPPING):
        return False
    # Throttled, no network, config error: signed in or not, the snapshot says by the
    # user and expiry it carries only while a token is served.
    return snapshot.user is None and snapshot.token_expires_at is None


def state_document(snapshot: Snapshot) -> dict[str, Any]:
    """What `GET /v1/status` says of the state (not of the setup), and whether a person
    is needed. The code on screen is the user code as issued, with its links."""
    return {**status_document(snapshot), "needs_sign_in": needs_sign_in(snapshot)}


def dashboard_screen(snapshot: Snapshot, *, now_mono: float, now_wall: float) -> Screen:
    """The screen the device shows, as one picture: without the countdown (a picture a
    second would flood the broker) and on the page with the QR code."""
    from agent.display.screens import build_screen

    screen = build_screen(snapshot, now_mono=now_mono, now_wall=now_wall,
                          code_lifetime=snapshot.code_lifetime)
    return replace(screen, seconds_left=None, progress=None, page=0)


def render_png(screen: Screen, geometry: tuple[int, int, str]) -> bytes:
    """`screen` laid out as the panel lays it out, enlarged for a dashboard. Slow enough
    (layout, QR code, PNG) to belong in a worker thread."""
    from PIL import Image

    from agent.display.layout import compose

    width, height, mode = geometry
    image = compose(screen, width=width, height=height, mode=mode).image
    scale = max(1, DASHBOARD_PIXELS // max(width, height))
    if scale > 1:
        image = image.resize((width * scale, height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    # Not optimize=True: it doubles the time on a Pi for 15% fewer bytes of a 1 KB PNG.
    image.save(buffer, format="PNG")
    return buffer.getvalue()


_BUTTONS: Final = (
    ("new_code", "New code", "mdi:qrcode-plus"),
    ("new_sign_in", "New sign-in", "mdi:account-switch"),
    ("sign_out", "Sign out", "mdi:logout"),
)
assert {name for name, _, _ in _BUTTONS} == set(MQTT_COMMANDS)


def discovery_messages(settings: LinkSettings, device_name: str) -> list[tuple[str, bytes]]:
    """Home Assistant's discovery documents (topic, payload): one device with its
    sensors, the picture and the enabled buttons. A button not enabled gets an empty
    document, which takes it out of Home Assistant if an earlier config offered it."""
    prefix = settings.discovery_prefix
    if prefix is None:
        return []
    node = settings.device_id
    device = {"identifiers": [f"device_agent_{node}"], "name": device_name,
              "manufacturer": "device-agent", "model": "device-agent",
              "sw_version": __version__}
    origin = {"name": "device-agent", "sw_version": __version__}
    state = settings.state_topic
    entities: list[tuple[str, str, dict[str, Any]]] = [
        ("sensor", "state", {
            "name": "State", "state_topic": state, "value_template": "{{ value_json.state }}",
            "device_class": "enum", "options": [phase.value for phase in Phase],
            "json_attributes_topic": state, "icon": "mdi:account-key"}),
        ("sensor", "code", {
            "name": "Sign-in code", "state_topic": state,
            # "None" is how an MQTT sensor is told it has no value now.
            "value_template": "{{ value_json.code.user_code if value_json.code else 'None' }}",
            "json_attributes_topic": state,
            "json_attributes_template": "{{ (value_json.code or {}) | tojson }}",
            "icon": "mdi:form-textbox-password"}),
        ("sensor", "token_expires", {
            "name": "Token expires", "state_topic": state, "device_class": "timestamp",
            "value_template": "{{ value_json.token_expires_at or 'None' }}"}),
        ("binary_sensor", "needs_sign_in", {
            "name": "Needs sign-in", "state_topic": state, "device_class": "problem",
            "value_template": "{{ 'ON' if value_json.needs_sign_in else 'OFF' }}"}),
        ("image", "screen", {
            "name": "Screen", "image_topic": settings.screen_topic,
            "content_type": "image/png"}),
    ]
    messages: list[tuple[str, bytes]] = []
    for command, name, icon in _BUTTONS:
        if command in settings.commands:
            entities.append(("button", command, {
                "name": name, "command_topic": settings.command_topic,
                "payload_press": command, "icon": icon}))
        else:
            messages.append((f"{prefix}/button/{node}/{command}/config", b""))
    for component, object_id, fields in entities:
        doc = {**fields, "unique_id": f"device_agent_{node}_{object_id}",
               "availability_topic": settings.availability_topic,
               "device": device, "origin": origin}
        messages.append((f"{prefix}/{component}/{node}/{object_id}/config",
                         json.dumps(doc).encode()))
    return messages


def _state_payload(snapshot: Snapshot) -> bytes:
    return json.dumps(state_document(snapshot)).encode()


# -- what a dashboard may send -----------------------------------------------------------

_WORD = re.compile(r"[A-Za-z0-9_.-]{1,32}")


def _described(payload: object) -> str:
    """Broker input as a log line may hold it: a short word as it is, else its size."""
    if isinstance(payload, bytes | bytearray):
        text = bytes(payload[:33]).decode("ascii", "replace")
        size = len(payload)
    elif isinstance(payload, str):
        text, size = payload[:33], len(payload)
    else:
        return f"a {type(payload).__name__}"
    word = text.strip()
    return repr(word) if _WORD.fullmatch(word) else f"{size} bytes"


def parse_command(payload: object) -> str:
    """The command in a message's payload (one of `MQTT_COMMANDS`, surrounding space
    ignored); anything else raises CommandRefused, which never quotes more than a word."""
    if isinstance(payload, bytes | bytearray):
        if len(payload) > COMMAND_MAX_BYTES:
            raise CommandRefused(f"not a command: {_described(payload)}")
        try:
            text = bytes(payload).decode("ascii")
        except UnicodeDecodeError:
            raise CommandRefused(f"not a command: {_described(payload)}") from None
    elif isinstance(payload, str):
        text = payload
    else:
        raise CommandRefused(f"not a command: {_described(payload)}")
    word = text.strip()
    if word not in MQTT_COMMANDS:
        raise CommandRefused(f"not a command: {_described(payload)}")
    return word


# -- the link ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Trouble:
    kind: str   # the same kind is logged once until the link works again
    text: str
    fix: str


class FleetLink:
    """Keeps the broker in step with `driver`. `start()` begins; `aclose()` says
    "offline" and ends. Nothing here raises into the agent once started."""

    def __init__(self, settings: LinkSettings, driver: Driver, *, clock: Clock,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self._driver = driver
        self._clock = clock
        self._rng = rng or random.Random()
        self._changed = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._command: asyncio.Task[None] | None = None
        self._said: str | None = None
        # When the connection now up (or the one that just broke) was made.
        self._up_since: float | None = None
        # Anyone allowed to publish commands can send a flood: one line a minute per
        # reason, with the count of the rest.
        self._refusals = RateLimit()
        driver.add_listener(self._on_snapshot)

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        self._changed.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mqtt")

    async def aclose(self) -> None:
        """Publish the last state and "offline", then disconnect; after CLOSE_GRACE the
        link is dropped as it is."""
        self._closing.set()
        task, self._task = self._task, None
        if task is not None and self._up_since is None:
            # Not connected (the broker is down, or has not answered yet): nobody to
            # say goodbye to, so the stop does not wait.
            task.cancel()
        elif task is not None:
            try:
                async with asyncio.timeout(CLOSE_GRACE):
                    await asyncio.shield(task)
            except TimeoutError:
                log.info("mqtt: the broker did not take the last messages in time; its "
                         "Last Will says offline")
            except Exception:
                log.exception("mqtt: the link failed while stopping")
            task.cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        command, self._command = self._command, None
        if command is not None:
            command.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await command

    # -- connecting, and again -------------------------------------------------------

    async def _run(self) -> None:
        import aiomqtt

        backoff = Backoff(RETRY_INITIAL, RETRY_MAX, rng=self._rng)
        while not self._closing.is_set():
            try:
                await self._connection()
                return
            except aiomqtt.MqttError as exc:
                trouble = self._trouble(exc)
            except ConfigError as exc:  # the password file, read at each try
                trouble = _Trouble("password_file", str(exc),
                                   "the agent reads the file again at the next try")
            except Exception as exc:
                # A bug here must not end the fleet view for good, nor spin, nor fill
                # the journal: its traceback once, then the once-per-kind rule.
                if self._said != "bug":
                    log.exception("mqtt: the link failed")
                trouble = _Trouble("bug", f"the link failed ({type(exc).__name__})",
                                   "please report it")
            if self._closing.is_set():
                return
            now = self._clock.monotonic()
            if self._up_since is not None and now - self._up_since >= STABLE:
                backoff.reset()
            self._up_since = None
            delay = backoff.next_delay()
            if trouble.kind != self._said:
                self._said = trouble.kind
                log.warning("mqtt: %s; %s. The agent works on without the broker and tries "
                            "again with back-off (next in %.1f s)", trouble.text, trouble.fix,
                            delay)
            else:
                log.debug("mqtt: still %s; next try in %.1f s", trouble.text, delay)
            await self._wait(None, seconds=delay)

    def _trouble(self, exc: Exception) -> _Trouble:
        from aiomqtt.exceptions import MqttConnectError

        s = self.settings
        where = f"{s.host}:{s.port}"
        if isinstance(exc, MqttConnectError):
            code = getattr(exc.rc, "value", exc.rc)
            reason = str(exc.rc) if not isinstance(exc.rc, int) else str(exc)
            if code in (4, 5, 134, 135):
                if s.username is None:
                    fix = ("the broker wants a user name and password: set mqtt.username "
                           "and mqtt.password_file")
                else:
                    fix = (f"fix mqtt.username ({s.username}) or the password in "
                           f"mqtt.password_file ({s.password_file}), or the broker's "
                           "password file or ACL; a mended file is read at the next try")
                return _Trouble("refused", f"the broker at {where} refused {s.client_id} "
                                           f"({reason})", fix)
            if code in (2, 133):
                return _Trouble("client_id", f"the broker at {where} refused the client id "
                                             f"{s.client_id} ({reason})",
                                "set mqtt.client_id to one unique on that broker")
            return _Trouble("connect", f"the broker at {where} refused the connection "
                                       f"({reason})", "the broker's log says why")
        text = str(exc) or type(exc).__name__
        if "SSL" in text or "CERTIFICATE" in text.upper():
            return _Trouble("tls", f"TLS with the broker at {where} failed ({text})",
                            "mqtt.ca_file must hold the CA that signed the broker's "
                            "certificate, and mqtt.cert_file a client certificate it takes")
        if "timed out" in text:
            return _Trouble("timeout", f"the broker at {where} did not answer in time",
                            "check that mqtt.host and mqtt.port name an MQTT broker "
                            "(mqtt.tls: true for a TLS port)")
        if self._up_since is not None:
            return _Trouble("lost", f"lost the connection to the broker at {where} ({text})",
                            "when it happens again and again, the broker's log says why "
                            "(another client with the client id "
                            f"{s.client_id} shows there)")
        return _Trouble("unreachable", f"cannot reach the broker at {where} ({text})",
                        "check mqtt.host and mqtt.port, and that the broker runs")

    async def _connection(self) -> None:
        """One connection, from CONNECT to a clean DISCONNECT at the stop; raises
        MqttError when it breaks."""
        import aiomqtt

        s = self.settings
        password = None
        if s.password_file is not None:
            password = await asyncio.to_thread(read_secret_file, s.password_file,
                                               "mqtt.password_file",
                                               what="the broker password")
        tls = None
        if s.tls:
            tls = aiomqtt.TLSParameters(
                ca_certs=None if s.ca_file is None else str(s.ca_file),
                certfile=None if s.cert_file is None else str(s.cert_file),
                keyfile=None if s.key_file is None else str(s.key_file))
        client = aiomqtt.Client(
            s.host, s.port, username=s.username, password=password, identifier=s.client_id,
            will=aiomqtt.Will(s.availability_topic, OFFLINE, qos=1, retain=True),
            keepalive=s.keepalive, tls_params=tls, timeout=BROKER_TIMEOUT, logger=paho_log)
        try:
            await client.__aenter__()
        except BaseException:
            _drop(client)
            raise
        try:
            self._up_since = self._clock.monotonic()
            log.info("mqtt: connected to %s:%d as %s, publishing under %s", s.host, s.port,
                     s.client_id, s.base_topic)
            self._said = None
            await client.subscribe(s.command_topic, qos=1)
            receiver = asyncio.create_task(self._receive(client))
            try:
                await self._publish(client, receiver)
            finally:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await receiver
        except BaseException:
            _drop(client)
            raise
        await client.__aexit__(None, None, None)

    # -- publishing --------------------------------------------------------------------

    async def _publish(self, client: aiomqtt.Client, receiver: asyncio.Task[None]) -> None:
        """Everything again on each connection (a broker without persistence forgets
        what it retained), then each change, until the stop."""
        s = self.settings
        sent_name: str | None = None
        sent_state: bytes | None = None
        sent_screen: Screen | None = None
        online = False
        beat_at: float | None = None
        while True:
            self._changed.clear()
            snapshot = self._driver.snapshot
            now = self._clock.monotonic()
            beat = beat_at is not None and now >= beat_at
            if snapshot.device_name != sent_name:
                for topic, payload in discovery_messages(s, snapshot.device_name):
                    await client.publish(topic, payload, qos=1, retain=True)
                sent_name = snapshot.device_name
            state = _state_payload(snapshot)
            if state != sent_state or beat:
                await client.publish(s.state_topic, state, qos=1, retain=True)
                sent_state = state
            screen = dashboard_screen(snapshot, now_mono=now, now_wall=self._clock.time())
            if screen != sent_screen:
                picture = await asyncio.to_thread(render_png, screen, s.screen)
                await client.publish(s.screen_topic, picture, qos=1, retain=True)
                sent_screen = screen
            if self._closing.is_set():
                if self._changed.is_set():
                    continue  # "stopping" came while the picture was drawn
                await client.publish(s.availability_topic, OFFLINE, qos=1, retain=True)
                return
            if not online or beat:
                # After the state: a dashboard shown "online" sees this run's state,
                # not the last one's.
                await client.publish(s.availability_topic, ONLINE, qos=1, retain=True)
                online = True
            if beat_at is None or beat:
                beat_at = None if s.heartbeat is None else now + s.heartbeat
            await self._wait(receiver, seconds=None if beat_at is None else beat_at - now)
            if receiver.done():
                receiver.result()
                raise aiomqtt.MqttError("the broker stopped sending")

    async def _wait(self, receiver: asyncio.Task[None] | None, *, seconds: float | None,
                    ) -> None:
        """Until a new snapshot, the stop, the receiver's end or `seconds` on the
        injected clock, whichever comes first. The receiver is watched, not cancelled."""
        own: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._closing.wait())]
        if receiver is not None:
            own.append(asyncio.ensure_future(self._changed.wait()))
        if seconds is not None:
            own.append(asyncio.ensure_future(self._clock.sleep(max(0.0, seconds))))
        watched: list[asyncio.Future[Any]] = [*own, *([receiver] if receiver else [])]
        try:
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in own:
                future.cancel()

    # -- commands ----------------------------------------------------------------------

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self._heard(message.payload, retained=message.retain)

    def _refuse(self, reason: str, message: str, *args: object) -> None:
        dropped = self._refusals.admit(reason)
        if dropped is not None:
            log.warning("mqtt: " + message + "%s", *args, more(dropped))

    def _heard(self, payload: object, *, retained: bool) -> None:
        topic = self.settings.command_topic
        try:
            command = parse_command(payload)
        except CommandRefused as exc:
            self._refuse("not a command", "%s on %s; ignored", exc, topic)
            return
        if retained:
            # Kept by the broker, it would come back at every reconnect.
            self._refuse("retained", "a retained %s on %s ignored: a button's press is not "
                         "retained (an empty retained message on the topic clears it)",
                         command, topic)
            return
        if command not in self.settings.commands:
            self._refuse(f"{command} not enabled", "%s is not enabled (mqtt.commands: %s); "
                         "ignored", command, ", ".join(sorted(self.settings.commands)))
            return
        if self._command is not None and not self._command.done():
            self._refuse("busy", "%s ignored: the last command is still being carried out",
                         command)
            return
        self._command = asyncio.get_running_loop().create_task(self._carry_out(command))

    async def _carry_out(self, command: str) -> None:
        driver = self._driver
        try:
            if command == "new_code":
                # Signed in, a code could only be for a new sign-in, which whoever may
                # publish here and sees the QR code could approve for their own account.
                if driver.credentials is not None:
                    self._refuse("signed in", "new_code ignored: signed in (a new sign-in "
                                 "from the broker needs new_sign_in in mqtt.commands)")
                    return
                # Not new_sign_in: an approval landing meanwhile makes it do nothing.
                wait = await driver.login()
                log.info("mqtt: a new code asked for from the broker%s", _next_code(wait))
            elif command == "new_sign_in":
                wait = await driver.login(new_sign_in=True)
                log.info("mqtt: a new sign-in asked for from the broker%s", _next_code(wait))
            elif command == "sign_out":
                log.info("mqtt: sign-out asked for from the broker")
                for problem in await driver.logout():
                    log.warning("mqtt: sign-out: %s", problem)
        except IllegalInput as exc:
            log.info("mqtt: %s ignored: %s", command, exc)


def _next_code(wait: float) -> str:
    return "" if wait <= 0 else f"; the next code can come in {wait:.0f} s"


def _drop(client: aiomqtt.Client) -> None:
    """Close a connection that will not be closed cleanly (a failed or cancelled
    CONNECT, a link given up at the stop): paho would leave its socket open."""
    paho = client._client  # aiomqtt has no public way to abort
    with contextlib.suppress(Exception):
        # The socket (unregistered from the loop first) and paho's wake-up pair.
        paho._reset_sockets()
