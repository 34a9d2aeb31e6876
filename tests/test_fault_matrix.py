"""The fault matrix: one case per way the network or the provider can fail the agent,
over real loopback HTTP (the test provider, the real Driver and Transport, a real
credential store in a temp dir, and a clock the test moves by hand).

For every fault the agent keeps running, says what is wrong (the snapshot's phase and
last_error), serves the access token it holds while that token lives, keeps on disk the
newest refresh token the provider accepts, and mends itself once the fault is gone.
Where only a person can mend it (an answer lost after strict rotation, a provider that
forgot its tokens), success is a new code on screen beside the still-served access
token, with nothing else lost.

The README's "Reliability" table has one row per case here.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trustme
from aiohttp import web

from agent.driver import Driver
from agent.errors import ProviderUnavailable
from agent.idp import (
    Action,
    Answer,
    Cut,
    Drop,
    Fail,
    IdentityProvider,
    ProviderSettings,
    Slow,
    serve_provider,
)
from agent.oauth import HttpRequest, HttpResponse
from agent.state import Phase, Snapshot
from agent.store import Credentials, CredentialStore
from agent.transport import Transport
from tests.clock import ManualClock
from tests.harness import Running, settings_for
from tests.test_lifecycle_stories import (
    device_requests,
    refresh_requests,
    refresh_token_of,
    run_for,
    settle,
)
from tests.test_lifecycle_stories import until as _until

USER = "Alice Example"
LIFETIME = 3600.0            # the provider's access tokens
REFRESH_AT = 0.8 * LIFETIME  # the agent's default margin: 20 % of the lifetime
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
                   "http_proxy", "https_proxy", "all_proxy", "no_proxy")


# -- the world around the agent -----------------------------------------------------


class ProviderClock:
    """The provider's clock: the device's monotonic time, but its own wall clock, which
    a jump of the device's wall clock does not move."""

    def __init__(self, clock: ManualClock) -> None:
        self._clock = clock
        self._offset = clock.time() - clock.monotonic()

    def monotonic(self) -> float:
        return self._clock.monotonic()

    def time(self) -> float:
        return self._clock.monotonic() + self._offset

    async def sleep(self, seconds: float) -> None:
        await self._clock.sleep(seconds)


class Network:
    """The way from the agent to the provider, through a real Transport. A fault sends
    the provider's traffic elsewhere, as a dead host, a DNS failure, a black hole or a
    new certificate would: `detour` is the address it goes to instead (None: the
    provider)."""

    def __init__(self, transport: Transport, home: str) -> None:
        self.transport = transport
        self.home = home
        self.detour: str | None = None

    async def send(self, request: HttpRequest) -> HttpResponse:
        if self.detour is not None and request.url.startswith(self.home):
            request = replace(request, url=self.detour + request.url[len(self.home):])
        return await self.transport.send(request)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Transport honours the environment's proxy, which would stand between the agent
    # and every fault here.
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def provider_settings() -> ProviderSettings:
    # Codes that outlive every case: a code expiring is not a fault here.
    return ProviderSettings(code_lifetime=1800.0, access_token_lifetime=LIFETIME)


@pytest.fixture
async def provider(provider_settings: ProviderSettings,
                   clock: ManualClock) -> AsyncIterator[IdentityProvider]:
    async with serve_provider(provider_settings, clock=ProviderClock(clock)) as running:
        yield running


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    """Transports, servers and sockets a case opens; closed after its agents stop."""
    async with contextlib.AsyncExitStack() as opened:
        yield opened


Start = Callable[..., Running]


@pytest.fixture
async def agents(store: CredentialStore, clock: ManualClock,
                 stack: contextlib.AsyncExitStack) -> AsyncIterator[Start]:
    runs: list[Running] = []

    def start(provider: IdentityProvider, network: Network, **overrides: Any) -> Running:
        driver = Driver(settings_for(provider, **overrides), sender=network, store=store,
                        clock=clock, rng=random.Random(1))
        run = Running(driver, clock)
        runs.append(run)
        return run

    yield start
    for run in runs:
        await run.stop()


async def network_to(provider: IdentityProvider, stack: contextlib.AsyncExitStack,
                     **transport_options: Any) -> Network:
    transport = await stack.enter_async_context(Transport(**transport_options))
    return Network(transport, provider.base_url)


# -- places a detour leads to ---------------------------------------------------------


def refusing(stack: contextlib.AsyncExitStack) -> str:
    sock = stack.enter_context(socket.socket())
    # Bound and never listening: the kernel refuses every connection, and while the
    # socket is held no other test can take the port.
    sock.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


def unresolvable(home: str) -> str:
    # RFC 6761 §6.4: names under .invalid never resolve.
    return f"http://idp.invalid:{urlsplit(home).port}"


async def black_hole(stack: contextlib.AsyncExitStack) -> str:
    """A server that accepts, reads everything and never writes a byte."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65_536):
                pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)

    async def close() -> None:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()

    stack.push_async_callback(close)
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def tls_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


def ca_file(ca: trustme.CA, path: Path) -> Path:
    ca.cert_pem.write_to_path(str(path))
    return path


async def also_served(provider: IdentityProvider, stack: contextlib.AsyncExitStack, *,
                      ssl_context: ssl.SSLContext) -> str:
    """The same provider (the same tokens) on another HTTPS address."""
    runner = web.AppRunner(provider.app(), access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return f"https://127.0.0.1:{runner.addresses[0][1]}"


# -- watching the agent ------------------------------------------------------------------


async def until(run: Running, condition: Callable[[Snapshot], bool], *,
                max_seconds: float = 2 * LIFETIME) -> Snapshot:
    # Generous in real time: under load a loopback round trip may take a while, and a
    # case that is merely slow must not fail.
    return await _until(run, condition, max_seconds=max_seconds, real_timeout=20.0)


async def sign_in(run: Running, provider: IdentityProvider) -> Snapshot:
    shown = await until(run, lambda s: s.phase == Phase.AWAITING_USER, max_seconds=600)
    provider.approve(shown.user_code)
    return await until(run, lambda s: s.phase == Phase.SIGNED_IN, max_seconds=600)


def failed_refreshes(run: Running, since: int, count: int) -> Callable[[Snapshot], bool]:
    session = run.driver.session
    return lambda _: session.refreshes_done >= since + count and not session.refreshing


def refreshed_past(run: Running, old: str | None) -> Callable[[Snapshot], bool]:
    return lambda s: (s.phase == Phase.SIGNED_IN
                      and refresh_token_of(run) not in (None, old))


def on_disk(store_path: Path) -> Credentials:
    """The credential file as a restart would read it."""
    stored = CredentialStore(store_path).load()
    assert stored is not None, "the credential file is gone"
    return stored


async def assert_serves(run: Running, access_token: str, provider: IdentityProvider | None,
                        ) -> None:
    assert not run.task.done()
    tokens = await run.driver.get_token()
    assert tokens.access_token == access_token
    left = run.driver.remaining()
    assert left is not None and left > 0
    if provider is not None:
        assert provider.access_token_valid(access_token)


def assert_newest_on_disk(store_path: Path, provider: IdentityProvider, run: Running,
                          ) -> Credentials:
    """The file parses and holds the agent's refresh token, the only one the provider
    accepts (so the newest)."""
    stored = on_disk(store_path)
    held = refresh_token_of(run)
    assert held is not None
    assert stored.tokens.refresh_token == held
    assert provider.live_refresh_tokens() == [held]
    return stored


async def assert_mended(run: Running, provider: IdentityProvider, store_path: Path,
                        old_refresh_token: str | None) -> None:
    """The next refresh works: a new token is served and on disk."""
    await until(run, refreshed_past(run, old_refresh_token))
    assert not run.task.done()
    assert run.driver.snapshot.last_error is None
    tokens = await run.driver.get_token()
    assert provider.access_token_valid(tokens.access_token)
    stored = assert_newest_on_disk(store_path, provider, run)
    assert stored.tokens.access_token == tokens.access_token


# -- 1. faults a refresh meets, while the old token still lives ----------------------


@dataclass(frozen=True)
class RefreshFault:
    """A fault that meets the signed-in device's scheduled refresh `tries` times in a
    row, then clears."""

    name: str
    says: str                                   # in last_error while it lasts
    detour: str | None = None                   # "refused" | "unresolvable" | "black_hole"
    answer: Callable[[], Action] | None = None  # the provider's answer to each try
    tries: int = 2
    timeout: float = 5.0                        # the agent's HTTP timeout
    max_response_bytes: int = 1 << 20
    retry_after: float | None = None            # the provider's Retry-After


def _html(title: str) -> bytes:
    return f"<!doctype html><html><head><title>{title}</title></head><body><h1>{title}</h1>" \
           f"</body></html>".encode()


def _json_error(status: int, body: Mapping[str, object],
                headers: Mapping[str, str] | None = None) -> Callable[[], Action]:
    return lambda: Answer(status, json=dict(body), headers=dict(headers or {}))


PORTAL = (b"<!DOCTYPE html><html><head><title>Hotel Wi-Fi</title></head><body>"
          b"<form action='/login'>Room number <input name=room></form></body></html>")

REFRESH_FAULTS = [
    RefreshFault("connection_refused", "refused the connection", detour="refused"),
    RefreshFault("unresolvable_host", "cannot resolve the host name idp.invalid",
                 detour="unresolvable"),
    RefreshFault("accepts_and_never_answers", "did not answer in time",
                 detour="black_hole", timeout=0.5),
    RefreshFault("closed_before_answering", "closed the connection without answering",
                 answer=Drop),
    RefreshFault("dropped_mid_answer_before_rotation",
                 "closed the connection partway through its answer",
                 answer=lambda: Cut(work=False)),
    RefreshFault("http_500_html", "HTTP 500", answer=lambda: Fail(500)),
    RefreshFault("http_502_html", "HTTP 502", answer=lambda: Fail(502, _html("Bad Gateway"))),
    RefreshFault("http_503_html", "HTTP 503",
                 answer=lambda: Fail(503, _html("Service Unavailable"))),
    # Keycloak answers 500 with an error code that is no verdict on the request.
    RefreshFault("http_500_json", "HTTP 500", answer=_json_error(
        500, {"error": "unknown_error", "error_description": "For more on this error "
              "consult the server log."})),
    RefreshFault("http_502_json", "HTTP 502",
                 answer=_json_error(502, {"message": "upstream connect error"})),
    RefreshFault("http_503_json", "HTTP 503", answer=_json_error(
        503, {"error": "temporarily_unavailable", "error_description": "maintenance"})),
    RefreshFault("http_429_without_retry_after", "HTTP 429",
                 answer=_json_error(429, {"error": "slow_down"})),
    RefreshFault("http_429_with_retry_after", "HTTP 429", retry_after=120.0,
                 answer=_json_error(429, {"error": "slow_down"}, {"Retry-After": "120"})),
    RefreshFault("malformed_json", "not JSON", answer=lambda: Answer(
        200, body=b'{"access_token": "at", "token_type": ',
        headers={"Content-Type": "application/json"})),
    RefreshFault("html_page_instead_of_json", "captive portal", answer=lambda: Answer(
        200, body=PORTAL, headers={"Content-Type": "text/html"})),
    RefreshFault("answer_over_the_size_cap", "more than the 65536 allowed",
                 max_response_bytes=65_536, answer=lambda: Answer(
                     200, body=b'{"access_token": "' + b"a" * 100_000 + b'"}',
                     headers={"Content-Type": "application/json"})),
]


@pytest.mark.parametrize("fault", REFRESH_FAULTS, ids=lambda fault: fault.name)
async def test_refresh_fault_serves_the_old_token_and_mends_itself(
        fault: RefreshFault, provider: IdentityProvider, agents: Start,
        stack: contextlib.AsyncExitStack, store_path: Path, clock: ManualClock) -> None:
    network = await network_to(provider, stack, timeout=fault.timeout,
                               max_response_bytes=fault.max_response_bytes)
    run = agents(provider, network)
    await sign_in(run, provider)
    before = await run.driver.get_token()
    done, asked = run.driver.session.refreshes_done, len(refresh_requests(provider))

    if fault.answer is not None:
        provider.script("token", *(fault.answer() for _ in range(fault.tries)))
    match fault.detour:
        case "refused":
            network.detour = refusing(stack)
        case "unresolvable":
            network.detour = unresolvable(provider.base_url)
        case "black_hole":
            network.detour = await black_hole(stack)
    failing = await until(run, failed_refreshes(run, done, fault.tries))

    # While it lasts: said on screen, the old token served, the file untouched.
    assert failing.phase == Phase.REFRESH_FAILING
    assert fault.says in (failing.last_error or ""), failing.last_error
    assert failing.user == USER
    await assert_serves(run, before.access_token, provider)
    with pytest.raises(ProviderUnavailable, match=r"refresh failed"):
        # A caller who needs a fresher token is told at once, inside the back-off.
        await run.driver.get_token(min_ttl=LIFETIME - 1)
    stored = assert_newest_on_disk(store_path, provider, run)
    assert stored.tokens.refresh_token == before.refresh_token
    assert stored.tokens.access_token == before.access_token
    tries = refresh_requests(provider)[asked:]
    assert len(tries) == (fault.tries if fault.answer is not None else 0)

    # It clears: the next try works, with nothing lost on the way.
    network.detour = None
    await assert_mended(run, provider, store_path, before.refresh_token)
    tries = refresh_requests(provider)[asked:]
    gaps = [b.at - a.at for a, b in pairwise(tries)]
    if fault.retry_after is not None:
        assert gaps and min(gaps) >= fault.retry_after, gaps
    elif fault.name.startswith("http_429"):
        # The first retry is the back-off's quick one, not a throttle's wait.
        assert gaps and gaps[0] < 120.0, gaps


# -- 2. faults before the first sign-in --------------------------------------------------


SIGN_IN_FAULTS = ["provider_unreachable_at_first_start",
                  "device_endpoint_429_with_retry_after_a_day"]


@pytest.mark.parametrize("fault", SIGN_IN_FAULTS)
async def test_fault_before_the_first_sign_in_shows_why_and_then_a_code(
        fault: str, provider: IdentityProvider, agents: Start,
        stack: contextlib.AsyncExitStack, store_path: Path, clock: ManualClock) -> None:
    network = await network_to(provider, stack)
    if fault == "provider_unreachable_at_first_start":
        # A device that boots before the provider (or its network) is up.
        network.detour = refusing(stack)
        phase, says = Phase.NO_NETWORK, "refused the connection"
    else:
        provider.script("device", Answer(429, json={"error": "slow_down"},
                                         headers={"Retry-After": "86400"}))
        phase, says = Phase.THROTTLED, "provider busy"
    run = agents(provider, network)
    waiting = await until(run, lambda s: s.phase == phase, max_seconds=60)
    assert says in (waiting.last_error or ""), waiting.last_error
    # The screen says when the next try comes: within the back-off's cap (30 min for a
    # throttle, 5 min for trouble), whatever the provider asked.
    assert waiting.next_code_at is not None
    assert waiting.next_code_at <= clock.time() + 1800 * 1.25
    await run_for(run, 60)
    assert not run.task.done()
    assert run.driver.snapshot.phase == phase
    assert CredentialStore(store_path).load() is None
    assert [r.status for r in device_requests(provider)] == (
        [] if phase == Phase.NO_NETWORK else [429])

    network.detour = None
    shown = await until(run, lambda s: s.phase == Phase.AWAITING_USER, max_seconds=2400)
    provider.approve(shown.user_code)
    await until(run, lambda s: s.phase == Phase.SIGNED_IN, max_seconds=600)
    tokens = await run.driver.get_token()
    assert provider.access_token_valid(tokens.access_token)
    assert_newest_on_disk(store_path, provider, run)
    assert len([r for r in device_requests(provider) if r.status == 200]) == 1


# -- 3. odd fields of a successful refresh answer -------------------------------------


@dataclass(frozen=True)
class OddField:
    name: str
    edit: Callable[[dict[str, Any]], dict[str, Any]]
    # False: the provider keeps the refresh token (RFC 6749 §6 lets it), so the answer
    # carries none.
    rotates: bool = True
    # False: the one answer the agent cannot use (no access token): it is trouble, but
    # the rotated refresh token it carries is kept.
    usable: bool = True


def _without(*keys: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda body: {k: v for k, v in body.items() if k not in keys}


ODD_FIELDS = [
    OddField("expires_in_unusable", lambda body: {**body, "expires_in": "soon"}),
    OddField("token_type_missing", _without("token_type")),
    OddField("scope_as_a_json_list", lambda body: {**body, "scope": body["scope"].split()}),
    OddField("refresh_token_missing", _without("refresh_token"), rotates=False),
    OddField("id_token_unreadable", lambda body: {**body, "id_token": "not-a-jwt"}),
    OddField("unknown_fields", lambda body: {**body, "x_extra": {"nested": [1, None]}}),
    OddField("access_token_missing", _without("access_token"), usable=False),
]


def answer_from_provider(provider: IdentityProvider, *, rotates: bool) -> dict[str, Any]:
    """A token answer the provider stands behind, as a refresh brings it: rotating, the
    old refresh token dies and a new one comes; not rotating, none comes."""
    if not rotates:
        return provider.issue_tokens(scopes=("openid", "profile", "email"))
    provider.revoke_refresh_tokens()
    return provider.issue_tokens()


@pytest.mark.parametrize("odd", ODD_FIELDS, ids=lambda odd: odd.name)
async def test_refresh_answer_with_an_odd_field_is_adopted(
        odd: OddField, provider: IdentityProvider, agents: Start,
        stack: contextlib.AsyncExitStack, store_path: Path) -> None:
    run = agents(provider, await network_to(provider, stack))
    await sign_in(run, provider)
    before = await run.driver.get_token()
    body = odd.edit(answer_from_provider(provider, rotates=odd.rotates))
    provider.script("token", Answer(200, json=body))
    done = run.driver.session.refreshes_done
    adopted = await until(run, failed_refreshes(run, done, 1))

    assert adopted.user == USER
    access_token = body["access_token"] if odd.usable else before.access_token
    if odd.usable:
        assert adopted.phase == Phase.SIGNED_IN
        assert adopted.last_error is None
    else:
        assert adopted.phase == Phase.REFRESH_FAILING
        assert "access_token is missing" in (adopted.last_error or "")
    await assert_serves(run, access_token, provider)
    tokens = await run.driver.get_token()
    assert tokens.refresh_token == body.get("refresh_token", before.refresh_token)
    assert tokens.token_type == "Bearer"
    stored = assert_newest_on_disk(store_path, provider, run)
    assert stored.tokens.access_token == access_token
    await assert_mended(run, provider, store_path, tokens.refresh_token)


# -- 4. faults only a person can mend ---------------------------------------------------


@dataclass(frozen=True)
class LostSignIn:
    """A fault after which the refresh token the agent holds is dead: strict rotation
    lost the new one on the way, or the provider forgot them all."""

    name: str
    timeout: float = 5.0


LOST_SIGN_INS = [
    LostSignIn("dropped_mid_answer_after_rotation"),
    LostSignIn("slower_than_the_timeout_after_rotation", timeout=0.5),
    LostSignIn("provider_restart_forgets_all_tokens"),
]


@pytest.mark.parametrize("fault", LOST_SIGN_INS, ids=lambda fault: fault.name)
async def test_dead_refresh_token_keeps_the_access_token_and_shows_a_new_code(
        fault: LostSignIn, provider: IdentityProvider, provider_settings: ProviderSettings,
        agents: Start, stack: contextlib.AsyncExitStack, store_path: Path,
        clock: ManualClock) -> None:
    network = await network_to(provider, stack, timeout=fault.timeout)
    run = agents(provider, network)
    await sign_in(run, provider)
    before = await run.driver.get_token()
    dead = before.refresh_token
    assert dead is not None

    restarted = fault.name == "provider_restart_forgets_all_tokens"
    if restarted:
        serving = await stack.enter_async_context(serve_provider(
            replace(provider_settings), clock=ProviderClock(clock)))
        network.detour = serving.base_url
        # Where it was before, so what it signs names the same issuer.
        serving.base_url = provider.base_url
    else:
        serving = provider
        provider.script("token", Cut(work=True) if fault.name.startswith("dropped")
                        else Slow(2 * fault.timeout))
    shown = await until(run, lambda s: s.phase == Phase.AWAITING_USER)

    # A new code beside "still signed in", and the access token served while it lives
    # (a provider that forgot it cannot be asked; its signature still holds).
    assert shown.user == USER
    assert shown.user_code in serving.pending_user_codes()
    await assert_serves(run, before.access_token, None if restarted else provider)
    # Nothing else lost: the file keeps the access token; the dead refresh token is gone
    # from it, refused once and never sent again.
    stored = on_disk(store_path)
    assert stored.tokens.access_token == before.access_token
    assert stored.tokens.refresh_token is None
    assert not serving.refresh_token_valid(dead)
    sent = refresh_requests(serving, dead)
    await settle(lambda: all(r.status is not None for r in sent[1:]))
    if restarted:
        assert [r.status for r in sent] == [400]
    else:
        assert len(sent) == 2 and sent[1].status == 400
        # The answer that was lost did rotate: its refresh token lives, unknown to us.
        assert len(serving.live_refresh_tokens()) == 1
    await run_for(run, 600)
    assert len(refresh_requests(serving, dead)) == len(sent)
    assert run.driver.snapshot.phase == Phase.AWAITING_USER
    await assert_serves(run, before.access_token, None if restarted else provider)

    # The person approves: signed in again, and refreshing again.
    serving.approve(shown.user_code)
    await until(run, lambda s: s.phase == Phase.SIGNED_IN and s.user_code is None)
    tokens = await run.driver.get_token()
    assert tokens.access_token != before.access_token
    assert serving.access_token_valid(tokens.access_token)
    assert on_disk(store_path).tokens.refresh_token == tokens.refresh_token
    assert tokens.refresh_token in serving.live_refresh_tokens()
    await until(run, refreshed_past(run, tokens.refresh_token))
    again = await run.driver.get_token()
    assert serving.access_token_valid(again.access_token)
    assert on_disk(store_path).tokens.refresh_token == again.refresh_token
    assert again.refresh_token in serving.live_refresh_tokens()
    if fault.name.startswith("slower"):
        # Its answer is still on the way: let it land before the provider closes.
        await settle(lambda: sent[0].status is not None, real_seconds=5.0)


# -- 5. TLS with a private CA ------------------------------------------------------------


async def https_provider(stack: contextlib.AsyncExitStack, settings: ProviderSettings,
                         clock: ManualClock, ca: trustme.CA) -> IdentityProvider:
    return await stack.enter_async_context(serve_provider(
        settings, clock=ProviderClock(clock), ssl_context=tls_context(ca)))


async def test_tls_private_ca_without_ca_file_names_the_fix_and_with_it_signs_in(
        provider_settings: ProviderSettings, agents: Start,
        stack: contextlib.AsyncExitStack, store_path: Path, clock: ManualClock,
        tmp_path: Path) -> None:
    ca = trustme.CA()
    provider = await https_provider(stack, provider_settings, clock, ca)
    assert provider.base_url.startswith("https://")
    run = agents(provider, await network_to(provider, stack))
    failing = await until(run, lambda s: s.phase == Phase.NO_NETWORK, max_seconds=60)
    assert "not trusted" in (failing.last_error or ""), failing.last_error
    assert "provider.ca_file" in (failing.last_error or ""), failing.last_error
    # Retried with back-off, never a crash, never a code.
    await run_for(run, 600)
    assert not run.task.done()
    assert run.driver.snapshot.phase == Phase.NO_NETWORK
    assert "provider.ca_file" in (run.driver.snapshot.last_error or "")
    assert provider.requests == []
    assert CredentialStore(store_path).load() is None
    await run.stop()

    # The fix: provider.ca_file names the CA.
    trusted = await network_to(provider, stack, ca_file=ca_file(ca, tmp_path / "ca.pem"))
    fixed = agents(provider, trusted)
    await sign_in(fixed, provider)
    tokens = await fixed.driver.get_token()
    assert provider.access_token_valid(tokens.access_token)
    assert_newest_on_disk(store_path, provider, fixed)
    await assert_mended(fixed, provider, store_path, tokens.refresh_token)


async def test_tls_certificate_from_an_untrusted_ca_while_signed_in(
        provider_settings: ProviderSettings, agents: Start,
        stack: contextlib.AsyncExitStack, store_path: Path, clock: ManualClock,
        tmp_path: Path) -> None:
    ca = trustme.CA()
    provider = await https_provider(stack, provider_settings, clock, ca)
    trusted = tmp_path / "ca.pem"
    network = await network_to(provider, stack, ca_file=ca_file(ca, trusted))
    run = agents(provider, network)
    await sign_in(run, provider)
    before = await run.driver.get_token()
    # The provider now shows a certificate from a CA the device was not told of.
    network.detour = await also_served(provider, stack, ssl_context=tls_context(trustme.CA()))
    done = run.driver.session.refreshes_done
    failing = await until(run, failed_refreshes(run, done, 2))

    assert failing.phase == Phase.REFRESH_FAILING
    assert "not trusted" in (failing.last_error or ""), failing.last_error
    assert f"provider.ca_file ({trusted})" in (failing.last_error or "")
    await assert_serves(run, before.access_token, provider)
    assert on_disk(store_path).tokens.refresh_token == before.refresh_token
    assert_newest_on_disk(store_path, provider, run)
    assert refresh_requests(provider) == []

    network.detour = None  # the certificate is put right
    await assert_mended(run, provider, store_path, before.refresh_token)


# -- 6. the wall clock jumps ---------------------------------------------------------------


@pytest.mark.parametrize("jump", [86_400.0, -86_400.0],
                         ids=["wall_clock_a_day_forward", "wall_clock_a_day_back"])
async def test_wall_clock_jump_neither_expires_nor_lengthens_the_token(
        jump: float, provider: IdentityProvider, agents: Start,
        stack: contextlib.AsyncExitStack, store_path: Path, clock: ManualClock) -> None:
    network = await network_to(provider, stack)
    run = agents(provider, network)
    await sign_in(run, provider)
    before = await run.driver.get_token()
    left = run.driver.remaining()
    assert left is not None
    due = clock.monotonic() + left - (LIFETIME - REFRESH_AT)

    clock.jump_wall(jump)
    await run_for(run, 120)
    # The token's life runs on the monotonic clock: the same token, no refresh storm,
    # and the expiry shown moves with the wall clock.
    snapshot = run.driver.snapshot
    assert snapshot.phase == Phase.SIGNED_IN and snapshot.user == USER
    await assert_serves(run, before.access_token, provider)
    assert run.driver.remaining() == pytest.approx(left - 120, abs=1.0)
    assert snapshot.token_expires_at == pytest.approx(clock.time() + left - 120, abs=2.0)
    assert refresh_requests(provider) == []
    assert on_disk(store_path).tokens.refresh_token == before.refresh_token

    # The scheduled refresh comes when it was due, whatever the wall clock says.
    await until(run, refreshed_past(run, before.refresh_token))
    assert refresh_requests(provider)[0].at == pytest.approx(due, abs=1.0)
    assert run.driver.snapshot.user == USER
    assert_newest_on_disk(store_path, provider, run)

    # NTP puts the clock right: the token is still served, and refreshed on time.
    clock.jump_wall(-jump)
    current = await run.driver.get_token()
    await run_for(run, 120)
    await assert_serves(run, current.access_token, provider)
    assert len(refresh_requests(provider)) == 1
    await assert_mended(run, provider, store_path, current.refresh_token)
    assert run.driver.snapshot.user == USER
    # With the clock right, the provider's ID token passes its time checks again.
    assert (await run.driver.get_token()).id_token is not None
