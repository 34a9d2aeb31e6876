"""The fleet view at fleet size: 200 agents on one broker, and a dashboard that sees them.

    .venv/bin/python bench/fleet_mqtt.py                 # 200 agents
    .venv/bin/python bench/fleet_mqtt.py --agents 50

What is real, per agent: the `Driver` and `Session` (the device grant, refresh,
revocation at sign-out), its own `Transport` over loopback HTTP to one test provider
(`agent.idp`, on the real clock; its per-address device throttle is lifted, since every
agent here shares 127.0.0.1), its own credential store in a temporary directory, and
its own `FleetLink` (`agent.mqtt`: its own aiomqtt client and connection, Last Will,
discovery documents, state, PNG screens drawn in the thread pool, command topic) to one
real Mosquitto (`tests/mosquitto.py`: a password file and an ACL) on loopback. The
dashboard is `mosquitto_sub` subscribed to `#`, a process of its own as Home Assistant
is, which stamps each message as it arrives (one in this process, behind 200 agents on
the loop, acknowledges too slowly and the broker drops its queue). The agents are all
in one process on one event loop with one thread pool, which is harder on them than
200 devices each with its own CPU: the loop's lag is printed.

Not real: the Unix-socket API, the panels, systemd and hooks are not run (the daemon's
assembly in `service.py` adds nothing the broker sees); a person approving is
`provider.approve(code)`; the 200 machine ids are made up.

Timeline, each step starting when the last one was complete: start every agent at once
(discovery, a code on screen), approve every code (signed in), refresh every agent with
a provider now issuing longer-lived tokens (a new expiry), press "Sign out" on the
dashboard for every device, one press after the other (the command topic, enabled
here; a new code follows), restart the broker
(it keeps nothing: every retained message must be published again), stop every agent
("offline"). For each step: how long until the dashboard had seen it for every device,
and per device, from the moment its driver published the change to the moment the
dashboard received it (p50 / p95 / max); for the sign-out, also from each press to
that device's new code on the dashboard. Every payload is then scanned for every
token, device code and secret the provider issued and for the broker password.

Exits 1 when a step did not complete within its guard or a secret was found.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import resource
import secrets
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiomqtt

from agent.clock import SystemClock
from agent.driver import Driver
from agent.idp import IdentityProvider, ProviderSettings, serve_provider
from agent.mqtt import FleetLink, LinkSettings, state_document
from agent.oauth import Client
from agent.session import SessionSettings
from agent.state import Snapshot
from agent.store import CredentialStore
from agent.transport import Transport
from tests.mosquitto import Mosquitto, missing
from tests.test_secrets_sweep import PREFIX, _forms

# A guard per step against a stuck run, not a measure.
STEP_PATIENCE = float(os.environ.get("FLEET_MQTT_PATIENCE", "300"))
DISCOVERY_TOPICS = 8   # 4 sensors, the image, 3 buttons (enabled or emptied)

Doc = dict[str, Any]


@dataclass
class Step:
    name: str
    holds: Callable[[int, Doc], bool]   # device index, its state document
    started: float = 0.0
    complete: float | None = None
    agent_at: dict[int, float] = field(default_factory=dict)
    seen_at: dict[int, float] = field(default_factory=dict)

    def latencies(self) -> list[float]:
        return [self.seen_at[i] - self.agent_at[i] for i in self.seen_at if i in self.agent_at]


class Dashboard:
    """Every message on `#`, stamped on arrival by a subscriber of its own: Mosquitto's
    `mosquitto_sub`, a process apart as Home Assistant would be (one sharing the agents'
    event loop falls behind on its acknowledgements, and the broker drops its queue)."""

    def __init__(self, broker: Mosquitto, ids: list[str], name: str) -> None:
        self.broker = broker
        self.name = name
        self.process: asyncio.subprocess.Process | None = None
        self.index = {f"device-agent/{device}": i for i, device in enumerate(ids)}
        self.nodes = {device: i for i, device in enumerate(ids)}
        self.messages: list[tuple[float, str, bytes, bool]] = []
        self.states: dict[int, Doc] = {}
        self.discovered: dict[int, set[str]] = {}
        self.screens: set[int] = set()
        self.online: set[int] = set()
        self.offline: set[int] = set()
        self.step: Step | None = None
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Dashboard:
        b = self.broker
        # %U: the arrival time (Unix time, ns); %r: retained; %x: the payload in hex.
        self.process = await asyncio.create_subprocess_exec(
            shutil.which("mosquitto_sub") or "mosquitto_sub", "-h", b.host, "-p", str(b.port),
            "-u", "dashboard", "-P", b.users["dashboard"], "-i", self.name, "-q", "1",
            "-t", "#", "-F", "%U %r %t %x", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, limit=1 << 24)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for line in self.process.stdout:
            at, retain, topic, payload = [*line.decode().rstrip("\n").split(" ", 3), ""][:4]
            self._take(float(at), topic, bytes.fromhex(payload), retain == "1")

    def _take(self, at: float, topic: str, payload: bytes, retain: bool) -> None:
        self.messages.append((at, topic, payload, retain))
        parts = topic.split("/")
        if parts[0] == "homeassistant" and len(parts) == 5:
            i = self.nodes.get(parts[2])
            if i is not None:
                self.discovered.setdefault(i, set()).add(topic)
        else:
            i = self.index.get("/".join(parts[:2]))
            if i is None:
                return
            what = parts[2] if len(parts) == 3 else ""
            if what == "state":
                doc = json.loads(payload)
                self.states[i] = doc
                step = self.step
                if step is not None and i not in step.seen_at and step.holds(i, doc):
                    step.seen_at[i] = at
            elif what == "screen":
                self.screens.add(i)
            elif what == "availability":
                (self.online if payload == b"online" else self.offline).add(i)
        self._arrived.set()

    async def until(self, holds: Callable[[], bool]) -> float:
        async with asyncio.timeout(STEP_PATIENCE):
            while not holds():
                self._arrived.clear()
                await self._arrived.wait()
        return time.time()


class LoopLag:
    """How late a 20 ms timer fires: the event loop's responsiveness during the run,
    with when each sample was taken."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.at: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.time()
            await asyncio.sleep(0.02)
            self.at.append(time.time())
            self.lags.append(self.at[-1] - before - 0.02)

    def worst(self, start: float, end: float) -> float:
        return max((lag for lag, at in zip(self.lags, self.at, strict=True)
                    if start <= at <= end), default=0.0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _summary(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"{_ms(statistics.median(ordered))} / {_ms(p95)} / {_ms(ordered[-1])}"


async def run(agents: int) -> int:
    reason = missing()
    if reason is not None:
        print(f"cannot run: {reason}")
        return 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Per agent: an MQTT socket and paho's wake-up pair, HTTP connections, the store.
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16 * agents + 256)), hard))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("agent").setLevel(logging.ERROR)
    # Counted, not printed: each of the 200 links says it lost the broker at its restart.
    link_warnings = _Counter()
    mqtt_log = logging.getLogger("agent.mqtt")
    mqtt_log.setLevel(logging.WARNING)
    mqtt_log.addHandler(link_warnings)
    mqtt_log.propagate = False

    ids = [secrets.token_hex(16) for _ in range(agents)]
    clock = SystemClock()
    settings = ProviderSettings(interval=1, code_lifetime=600,
                                device_requests_per_hour=1_000_000)
    steps: list[Step] = []
    current: list[Step] = []

    with tempfile.TemporaryDirectory(prefix="fleet-mqtt-") as tmp_name:
        tmp = Path(tmp_name)
        broker = Mosquitto(tmp / "broker")
        await broker.start()
        password = tmp / "mqtt-password"
        password.write_text(broker.users["device"])
        password.chmod(0o600)
        stack = contextlib.AsyncExitStack()
        lag = LoopLag()
        try:
            provider: IdentityProvider = await stack.enter_async_context(
                serve_provider(settings, clock=clock))
            dashboard = await stack.enter_async_context(Dashboard(broker, ids, "dashboard"))
            drivers: list[Driver] = []
            links: list[FleetLink] = []
            runs: list[asyncio.Task[None]] = []

            def follow(i: int, snapshot: Snapshot) -> None:
                if current:
                    step = current[0]
                    if i not in step.agent_at and step.holds(i, state_document(snapshot)):
                        step.agent_at[i] = time.time()

            for i, device in enumerate(ids):
                transport = await stack.enter_async_context(Transport(timeout=30.0))
                store = stack.enter_context(CredentialStore(tmp / device / "credentials.json"))
                driver = Driver(SessionSettings(
                    client=Client(client_id=settings.client_id), device_name=f"Kiosk {i:03d}",
                    scopes=("openid", "profile", "email", "offline_access"),
                    issuer=provider.issuer, allow_insecure_http=True, codes_per_hour=60,
                    machine_id=device), sender=transport, store=store, clock=clock)
                driver.add_listener(lambda snapshot, i=i: follow(i, snapshot))
                drivers.append(driver)
                links.append(FleetLink(LinkSettings(
                    host=broker.host, port=broker.port, client_id=f"device-agent-{device}",
                    base_topic=f"device-agent/{device}", device_id=device, username="device",
                    password_file=password, commands=frozenset({"new_code", "sign_out"})),
                    driver, clock=clock))

            async def step(name: str, holds: Callable[[int, Doc], bool],
                           start: Callable[[], Any] | None = None) -> Step:
                record = Step(name, holds)
                steps.append(record)
                current[:] = [record]
                dashboard.step = record
                record.started = time.time()
                if start is not None:
                    result = start()
                    if asyncio.iscoroutine(result):
                        await result
                try:
                    record.complete = await dashboard.until(
                        lambda: len(record.seen_at) == agents)
                except TimeoutError:
                    phases = collections.Counter(d.snapshot.phase.value for d in drivers)
                    raise SystemExit(
                        f"stuck at {name!r}: {len(record.agent_at)} agents there, "
                        f"{len(record.seen_at)} seen there by the dashboard, "
                        f"{len(dashboard.online)} online; phases: "
                        f"{sorted(phases.items())}"
                        f"; the broker's log ends:\n{broker.log_text()[-3000:]}") from None
                return record

            pressed: dict[int, float] = {}
            lag.start()
            began = time.time()

            def start_all() -> None:
                for driver, link in zip(drivers, links, strict=True):
                    runs.append(asyncio.create_task(driver.run()))
                    link.start()

            await step("a code on screen",
                       lambda i, d: d["state"] == "awaiting_user" and d["user"] is None,
                       start_all)
            discovered_at = await dashboard.until(lambda: len(dashboard.discovered) == agents
                                                  and all(len(t) == DISCOVERY_TOPICS
                                                          for t in dashboard.discovered.values()))
            screens_at = await dashboard.until(lambda: len(dashboard.screens) == agents)

            def approve_all() -> None:
                for code in provider.pending_user_codes():
                    provider.approve(code)

            await step("signed in (approved)", lambda i, d: d["state"] == "signed_in",
                       approve_all)
            first_expiry = {i: dashboard.states[i]["token_expires_at"] for i in range(agents)}

            async def refresh_all() -> None:
                settings.access_token_lifetime = 7200
                await asyncio.gather(*(driver.refresh() for driver in drivers))

            await step("refreshed (new expiry)", lambda i, d: d["state"] == "signed_in"
                       and d["token_expires_at"] != first_expiry[i], refresh_all)

            async def sign_out_all() -> None:
                # One press per device, as a person at the dashboard would make them.
                async with aiomqtt.Client(broker.host, broker.port, username="dashboard",
                                          password=broker.users["dashboard"]) as buttons:
                    for i, device in enumerate(ids):
                        pressed[i] = time.time()
                        await buttons.publish(f"device-agent/{device}/command", b"sign_out",
                                              qos=1)

            signed_out = await step("signed out from the dashboard", lambda i, d: d["state"]
                                    == "awaiting_user" and d["user"] is None
                                    and d["code"] is not None, sign_out_all)
            press_to_code = [signed_out.seen_at[i] - pressed[i] for i in pressed]

            # The broker restarts and forgets everything it retained.
            restart_began = time.time()
            await broker.restart()
            restarted = time.time()
            async with Dashboard(broker, ids, "dashboard-after-restart") as fresh:
                back_at = await fresh.until(lambda: len(fresh.states) == agents
                                            and len(fresh.screens) == agents
                                            and len(fresh.online) == agents
                                            and len(fresh.discovered) == agents)
                stop_began = time.time()
                await asyncio.gather(*(link.aclose() for link in links))
                stopped = time.time()
                offline_at = await fresh.until(lambda: len(fresh.offline) == agents)
                after_restart = fresh.messages
            for task in runs:
                task.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
            await asyncio.gather(*(driver.aclose() for driver in drivers))
            await lag.stop()

            issued = provider.issued_secrets()
            messages = dashboard.messages + after_restart
            leaks = _scan({**issued, "mqtt_password": [broker.users["device"]]}, messages)
        finally:
            await lag.stop()
            await stack.aclose()
            await broker.stop()

    print(f"{agents} agents (each a real Driver, Transport, store and FleetLink), one "
          f"Mosquitto, one test provider, one event loop; {os.cpu_count()} CPUs")
    print()
    print(f"{'step':34} {'all ' + str(agents) + ' seen after':>18}   "
          "agent -> dashboard, per device: p50 / p95 / max   loop lag max")
    print(f"{'discovery (8 documents each)':34} {discovered_at - began:>16.2f} s   "
          "(from the start)")
    for record in steps:
        assert record.complete is not None
        print(f"{record.name:34} {record.complete - record.started:>16.2f} s   "
              f"{_summary(record.latencies()):<44}   "
              f"{_ms(lag.worst(record.started, record.complete))}")
    print(f"{'  press -> its new code on the dashboard':34} {'':>18}   "
          f"{_summary(press_to_code)}")
    print(f"{'a screen (PNG) from each':34} {screens_at - began:>16.2f} s   (from the start)")
    print(f"{'broker restart: all retained again':34} {back_at - restarted:>16.2f} s   "
          f"(from the broker listening again; the restart took "
          f"{restarted - restart_began:.2f} s)")
    print(f"{'stop: offline from each':34} {offline_at - stop_began:>16.2f} s   "
          f"(aclose of all {agents}: {stopped - stop_began:.2f} s)")
    print()
    pngs = collections.Counter(topic for _, topic, _, _ in messages
                               if topic.endswith("/screen"))
    size = sum(len(payload) for _, _, payload, _ in messages)
    topics = {topic for _, topic, _, _ in messages}
    print(f"messages seen by the dashboards: {len(messages)} ({size / 1e6:.2f} MB) on "
          f"{len(topics)} topics; {sum(pngs.values())} PNG screens, at most "
          f"{max(pngs.values())} a device (one per screen it showed: starting, a code, signed "
          "in, the new expiry, starting, a new code, again after the restart, stopping)")
    print(f"event loop: a 20 ms timer fired late by p50 {_ms(statistics.median(lag.lags))}, "
          f"p99 {_ms(sorted(lag.lags)[int(0.99 * len(lag.lags))])}, "
          f"max {_ms(max(lag.lags))} ({len(lag.lags)} samples)")
    print(f"warnings logged by the links: {link_warnings.render()}")
    print(f"secret scan: {len(messages)} payloads, {sum(len(v) for v in issued.values())} "
          f"tokens and device codes the provider issued, and the broker password: "
          f"{len(leaks)} found")
    for leak in leaks[:10]:
        print("  " + leak)
    return 1 if leaks else 0


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.kinds: collections.Counter[str] = collections.Counter()
        self.example: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        # The kind of trouble, as the line starts: "mqtt: lost the connection to".
        message = record.getMessage()
        kind = " ".join(message.split(" ")[:5])
        self.kinds[kind] += 1
        self.example.setdefault(kind, message)

    def render(self) -> str:
        if not self.kinds:
            return "none"
        return "; ".join(f"{count} x {self.example[kind]!r}"
                         for kind, count in self.kinds.items())


def _scan(secrets_: dict[str, Any], messages: list[tuple[float, str, bytes, bool]],
          ) -> list[str]:
    """Each payload against every form of every secret (`tests/test_secrets_sweep.py`'s
    forms), by their first PREFIX characters: a sliding window over each payload and a
    set, since thousands of payloads against thousands of secrets is too many
    substring searches."""
    prefixes = {form[:PREFIX]: kind for kind, values in secrets_.items()
                for secret in values for form in _forms(secret)}
    found = []
    for _, topic, payload, _ in messages:
        text = payload.decode("latin-1")
        for start in range(len(text) - PREFIX + 1):
            kind = prefixes.get(text[start:start + PREFIX])
            if kind is not None:
                found.append(f"{kind} in {topic}")
                break
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=200)
    args = parser.parse_args()
    print("$ " + shlex.join([".venv/bin/python", "bench/fleet_mqtt.py", *sys.argv[1:]]))
    return asyncio.run(run(args.agents))


if __name__ == "__main__":
    raise SystemExit(main())
