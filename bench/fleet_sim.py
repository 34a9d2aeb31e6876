"""What the fleet benchmarks share (`bench/fleet.py`, `bench/fleet_nat.py`): many agents
in one process, on one event loop, against one test provider, on one injected clock.

Real code:

- every agent is `agent.driver.Driver` running `agent.session.Session`, as the service
  assembles them (only the display, the API socket and systemd are left out), with its
  own `agent.transport.Transport` (aiohttp, real HTTP/1.1 over loopback TCP), its own
  `CredentialStore` and `SessionFile` in a directory of its own;
- the provider is `agent.idp.IdentityProvider`, authentik on the wire: discovery,
  device codes with its per-address throttle, polling, refresh-token rotation, served
  by aiohttp on 127.0.0.1.

Simulated:

- time: one `tests.clock.ManualClock`, injected into every driver and the provider. It
  moves only when nothing else can happen: no request in flight and nothing runnable
  on the loop (`Stepper.settle`). So a request takes no simulated time, and how fast
  the one loop serves a thousand agents shapes no figure; wall time is only the cost.
- addresses: every agent's requests carry `X-Forwarded-For: <its address>`, and a
  middleware in front of the provider takes the client address from it, as authentik
  does behind its reverse proxy; the device throttle keys on that address.
- the outage: the listening socket is closed and the open connections with it
  (connections refused), or a proxy answers 503 with an HTML page.
- people: a person approves a code a random delay after it is shown (`People`).
- the trust store: one TLS context for all agents' transports (loading the system's CA
  certificates costs 20 ms an agent, and plain-HTTP loopback never uses them);
- disk writes run on the loop thread (`InlineExecutor`) instead of worker threads, so a
  write is done before the clock may move; the state directories are on /dev/shm when
  there is one (the store warns that tmpfs loses a sign-in at a power cut: a warning
  for a device, not for this run).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import logging
import math
import random
import shutil
import ssl
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.driver import Driver
from agent.idp import IdentityProvider, ProviderSettings
from agent.oauth import Client, HttpRequest, HttpResponse
from agent.oauth.wire import parse_token_answer
from agent.session import SessionSettings
from agent.state import Snapshot
from agent.store import Credentials, CredentialStore
from agent.transport import Transport
from tests.clock import ManualClock

__all__ = [
    "Agent",
    "Attempt",
    "Fleet",
    "FleetProvider",
    "InlineExecutor",
    "People",
    "Stepper",
    "bins",
    "first_all_valid",
    "histogram",
    "percentile",
]

SCOPES = ("openid", "profile", "email", "offline_access")
FORWARDED = "X-Forwarded-For"
# A proxy's page while the provider behind it is down.
UNAVAILABLE_PAGE = b"<html><body><h1>503 Service Unavailable</h1></body></html>"


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs what `asyncio.to_thread` hands it at once, on the loop's thread.

    The driver writes credentials in a worker thread; a write still running there is
    work the clock cannot see. Run inline, it is done (or has failed) before the
    driver's next step, and the clock moves only after it.
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the awaiting coroutine, as a thread would
            future.set_exception(exc)
        return future


class Stepper:
    """Moves the one clock, deadline by deadline, once the loop is quiet."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.in_flight = 0
        self.steps = 0
        self._drained = asyncio.Event()
        self._drained.set()

    def sending(self) -> None:
        self.in_flight += 1
        self._drained.clear()

    def answered(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._drained.set()

    async def settle(self) -> None:
        """Return once nothing can happen before the clock moves: no request in flight
        (their answers come over real sockets) and nothing runnable on the loop."""
        # asyncio has no public way to ask whether anything is runnable; the ready
        # queue of the default loop is it.
        ready: collections.deque[Any] = asyncio.get_running_loop()._ready  # type: ignore[attr-defined]
        quiet = 0
        # Twice in a row: the second pass comes after one more poll of the sockets.
        while quiet < 2:
            if self.in_flight:
                # Blocked on the sockets, not spinning: the loop sleeps in select.
                await self._drained.wait()
                quiet = 0
                continue
            await asyncio.sleep(0)
            quiet = 0 if self.in_flight or ready else quiet + 1

    async def run_until(self, at: float, *, until: Callable[[], bool] | None = None) -> bool:
        """Move time to `at` (monotonic), deadline by deadline; with `until`, stop as
        soon as it holds. True when it did."""
        while True:
            await self.settle()
            if until is not None and until():
                return True
            now = self.clock.monotonic()
            deadline = self.clock.next_deadline
            if deadline is None or deadline > at:
                if at > now:
                    self.clock.advance(at - now)
                    await self.settle()
                return until is not None and until()
            self.steps += 1
            self.clock.advance(max(0.0, deadline - now))


@dataclass(frozen=True)
class Attempt:
    """One request as an agent sent it: when, what for, and what came of it."""

    at: float
    agent: int
    kind: str
    status: int | None      # None: no answer (refused, dropped, timed out)
    error: str | None = None


def request_kind(request: HttpRequest) -> str:
    path = request.url.split("?", 1)[0]
    if "/.well-known/" in path:
        return "discovery"
    if path.endswith("/application/o/device/"):
        return "device"
    if path.endswith("/application/o/token/"):
        grant = request.form.get("grant_type", "")
        return "refresh" if grant == "refresh_token" else "poll"
    for name in ("userinfo", "revoke", "jwks", "introspect"):
        if f"/{name}/" in path:
            return name
    return "other"


class _Transport(Transport):
    """The agent's transport, with one trust store for the whole fleet: loading the
    system's CA certificates takes 20 ms, a thousand times over, for plain-HTTP
    loopback that never uses them."""

    _shared: ssl.SSLContext | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if _Transport._shared is None:
            _Transport._shared = super()._ssl_context()
        return _Transport._shared


class _Sender:
    """An agent's real transport, with its address on every request and every request
    counted while in flight (so the clock waits for it) and logged once answered."""

    def __init__(self, transport: Transport, *, agent: int, address: str,
                 stepper: Stepper, log: list[Attempt]) -> None:
        self._transport = transport
        self._agent = agent
        self._address = address
        self._stepper = stepper
        self._log = log

    async def send(self, request: HttpRequest) -> HttpResponse:
        kind = request_kind(request)
        at = self._stepper.clock.monotonic()
        self._stepper.sending()
        try:
            forwarded = replace(request, headers={**request.headers, FORWARDED: self._address})
            response = await self._transport.send(forwarded)
        except Exception as exc:
            self._log.append(Attempt(at, self._agent, kind, None, type(exc).__name__))
            raise
        finally:
            self._stepper.answered()
        self._log.append(Attempt(at, self._agent, kind, response.status))
        return response


class FleetProvider:
    """The test provider behind a reverse proxy that names the client by
    X-Forwarded-For, and that can go down (refuse connections, or answer 503)."""

    def __init__(self, settings: ProviderSettings, clock: ManualClock) -> None:
        self.idp = IdentityProvider(settings, clock=clock)
        self.clock = clock
        self.state = "up"                     # up | refused | 503
        self.unavailable: list[float] = []    # when the proxy answered 503
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._port = 0

    @web.middleware
    async def _proxy(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.state == "503":
            self.unavailable.append(self.clock.monotonic())
            return web.Response(status=503, body=UNAVAILABLE_PAGE, content_type="text/html")
        if self.state == "refused":
            # A keep-alive connection that outlived the listener: a dead server's
            # connection ends without an answer.
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=503)
        forwarded = request.headers.get(FORWARDED)
        if forwarded:
            request = request.clone(remote=forwarded)
        response: web.StreamResponse = await handler(request)
        return response

    async def start(self) -> None:
        app = self.idp.app()
        app.middlewares.append(self._proxy)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await self._site.start()
        self._port = self._runner.addresses[0][1]
        self.idp.base_url = f"http://127.0.0.1:{self._port}"

    async def go_down(self, kind: str) -> None:
        assert self._runner is not None and self._site is not None
        if kind not in ("refused", "503"):
            raise ValueError(f"unknown outage kind {kind!r}")
        self.state = kind
        if kind == "refused":
            await self._site.stop()
            # Open keep-alive connections end too, as a stopped server's do.
            assert self._runner.server is not None
            for connection in self._runner.server.connections:
                connection.force_close()

    async def come_back(self) -> None:
        assert self._runner is not None
        if self.state == "refused":
            self._site = web.TCPSite(self._runner, "127.0.0.1", self._port)
            await self._site.start()
        self.state = "up"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class Agent:
    index: int
    address: str
    driver: Driver
    store: CredentialStore
    transport: Transport
    sender: _Sender
    task: asyncio.Task[None] | None = None
    # When each code was first shown (monotonic), and its user code.
    codes: list[tuple[float, str]] = field(default_factory=list)
    # Monotonic time the access token held dies (-inf: none held).
    valid_until: float = -math.inf
    signed_in_at: list[float] = field(default_factory=list)

    def holds_valid_token(self, now: float) -> bool:
        return self.valid_until > now


class People:
    """One person per device: each code shown is approved `delay()` seconds later, when
    `willing(agent, shown_at)` says so and the code is still on that device's screen."""

    def __init__(self, fleet: Fleet, *, delay: Callable[[], float],
                 willing: Callable[[Agent, float], bool]) -> None:
        self._fleet = fleet
        self._delay = delay
        self._willing = willing
        self.approved = 0

    def code_shown(self, agent: Agent, user_code: str, shown_at: float) -> None:
        if self._willing(agent, shown_at):
            self._fleet.spawn(self._approve(agent, user_code, self._delay()))

    async def _approve(self, agent: Agent, user_code: str, after: float) -> None:
        await self._fleet.clock.sleep(after)
        if agent.driver.snapshot.user_code != user_code or self._fleet.provider.state != "up":
            return  # too late: the code is gone from the screen
        try:
            self._fleet.provider.idp.approve(user_code)
        except KeyError:
            return  # the provider has forgotten it
        self.approved += 1


class Fleet:
    """Agents, their provider, the clock that moves them, and what they sent."""

    def __init__(self, *, settings: ProviderSettings, seed: int,
                 session: dict[str, Any] | None = None) -> None:
        self.clock = ManualClock()
        self.stepper = Stepper(self.clock)
        self.provider = FleetProvider(settings, self.clock)
        self.seed = seed
        self.session_overrides = dict(session or {})
        self.agents: list[Agent] = []
        self.attempts: list[Attempt] = []
        self.people: People | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._root = Path(tempfile.mkdtemp(prefix="fleet-", dir=_scratch()))
        # (when, agent, valid until) for every change of an agent's access token.
        self.token_changes: list[tuple[float, int, float]] = []
        self.changed = False

    # -- set-up ------------------------------------------------------------------------

    def settings_for(self, index: int) -> SessionSettings:
        idp = self.provider.idp
        base: dict[str, Any] = {
            "client": Client(client_id=idp.settings.client_id),
            "scopes": SCOPES,
            "device_name": f"device {index}",
            "issuer": idp.issuer,
            "allow_insecure_http": True,
        }
        base.update(self.session_overrides)
        return SessionSettings(**base)

    def add_agent(self, address: str) -> Agent:
        index = len(self.agents)
        directory = self._root / f"agent{index:05d}"
        store = CredentialStore(directory / "credentials.json")
        store.open()
        transport = _Transport(timeout=15.0)
        sender = _Sender(transport, agent=index, address=address, stepper=self.stepper,
                         log=self.attempts)
        agent = Agent(index=index, address=address, driver=self._driver(index, sender, store),
                      store=store, transport=transport, sender=sender)
        self._listen(agent)
        self.agents.append(agent)
        return agent

    def _driver(self, index: int, sender: _Sender, store: CredentialStore,
                run: int = 0) -> Driver:
        return Driver(self.settings_for(index), sender=sender, store=store, clock=self.clock,
                      rng=random.Random(f"{self.seed}:{index}:{run}"))

    def _listen(self, agent: Agent) -> None:
        agent.driver.add_listener(lambda snapshot: self._seen(agent, snapshot))
        agent.driver.add_token_listener(lambda _creds: self._token_changed(agent))

    async def restart(self, agents: Sequence[Agent]) -> None:
        """Stop `agents` where they are, as a power cut would, and start each again from
        its files (credentials and session record), all at this one moment."""
        for agent in agents:
            if agent.task is not None:
                agent.task.cancel()
        await asyncio.gather(*(a.task for a in agents if a.task is not None),
                             return_exceptions=True)
        for agent in agents:
            await agent.driver.aclose()
            agent.driver = self._driver(agent.index, agent.sender, agent.store, run=1)
            self._listen(agent)
            self.start(agent)

    def seed_credentials(self, agent: Agent, *, user: str = "alice") -> None:
        """Store tokens the provider issues now, as a sign-in at this moment would have
        left them on disk (parsed by the agent's own reader)."""
        idp = self.provider.idp
        body = idp.issue_tokens(user=user)
        tokens, _notes = parse_token_answer(
            HttpResponse(status=200, body=json.dumps(body).encode()), now_wall=self.clock.time(),
            requested_scope=" ".join(SCOPES))
        agent.store.save(Credentials(
            tokens=tokens, client_id=idp.settings.client_id, issuer=idp.issuer,
            claims={"sub": user, "name": user, "preferred_username": user}))

    def start(self, agent: Agent) -> None:
        agent.task = asyncio.create_task(agent.driver.run())

    def spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- what the agents show ------------------------------------------------------------

    def _seen(self, agent: Agent, snapshot: Snapshot) -> None:
        code = snapshot.user_code
        if code is not None and (not agent.codes or agent.codes[-1][1] != code):
            now = self.clock.monotonic()
            agent.codes.append((now, code))
            if self.people is not None:
                self.people.code_shown(agent, code, now)

    def _token_changed(self, agent: Agent) -> None:
        now = self.clock.monotonic()
        had = agent.holds_valid_token(now)
        agent.valid_until = self._valid_until(agent, now)
        if not had and agent.holds_valid_token(now):
            agent.signed_in_at.append(now)
        self.token_changes.append((now, agent.index, agent.valid_until))
        self.changed = True

    @staticmethod
    def _valid_until(agent: Agent, now: float) -> float:
        if agent.driver.credentials is None:
            return -math.inf
        left = agent.driver.remaining()
        return math.inf if left is None else now + left

    def refresh_validity(self) -> None:
        """Read every agent's lease once (after the stores are loaded)."""
        now = self.clock.monotonic()
        for agent in self.agents:
            agent.valid_until = self._valid_until(agent, now)

    def all_valid(self) -> bool:
        now = self.clock.monotonic()
        return all(a.holds_valid_token(now) for a in self.agents)

    # -- the end -------------------------------------------------------------------------

    async def close(self) -> None:
        for agent in self.agents:
            if agent.task is not None:
                agent.task.cancel()
        await asyncio.gather(*(a.task for a in self.agents if a.task is not None),
                             return_exceptions=True)
        for agent in self.agents:
            await agent.driver.aclose()
            await agent.transport.close()
            agent.store.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.provider.close()
        shutil.rmtree(self._root, ignore_errors=True)


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """A thousand agents retrying through an outage log a line each time; the figures
    are the output here."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def _scratch() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None


# -- figures ---------------------------------------------------------------------------

def bins(times: Sequence[float], start: float, end: float, width: float) -> list[int]:
    """Counts of `times` in [start, end) per bin of `width` seconds from `start`; the
    last bin may be cut short by `end`."""
    count = max(1, math.ceil((end - start) / width))
    counts = [0] * count
    for t in times:
        if start <= t < end:
            counts[min(count - 1, int((t - start) // width))] += 1
    return counts


def first_all_valid(group: Sequence[Agent], since: float, initial: dict[int, float],
                    changes: Sequence[tuple[float, int, float]]) -> float | None:
    """The first moment from `since` at which every agent of `group` held a valid
    access token, replayed from each agent's validity at `since` (`initial`) and the
    token changes after it; None when that never happened."""
    valid = {agent.index: initial[agent.index] for agent in group}
    if all(until > since for until in valid.values()):
        return since
    for at, index, until in changes:
        if at < since or index not in valid:
            continue
        valid[index] = until
        if all(v > at for v in valid.values()):
            return at
    return None


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of `values`."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def histogram(counts: Sequence[int], *, width: float, mean: float, bar: int = 50,
              label: str = "s") -> str:
    """One line per bin: its range, a bar, the count; `|` marks the mean and `!` twice
    the mean on each line, so a bin past twice the mean shows at a glance."""
    top = max([*counts, 2 * mean, 1.0])
    scale = bar / top
    mean_at = round(mean * scale)
    twice_at = round(2 * mean * scale)
    lines = []
    for i, count in enumerate(counts):
        cells = ["#" if c < round(count * scale) else " " for c in range(bar + 1)]
        for at, mark in ((mean_at, "|"), (twice_at, "!")):
            if 0 <= at <= bar and cells[at] == " ":
                cells[at] = mark
        span = f"{i * width:.0f}-{(i + 1) * width:.0f} {label}"
        lines.append(f"  {span:>11} {''.join(cells)} {count}")
    lines.append(f"  ({bar} columns = {top:.0f} requests; | mean {mean:.1f}, "
                 f"! twice the mean {2 * mean:.1f})")
    return "\n".join(lines)
