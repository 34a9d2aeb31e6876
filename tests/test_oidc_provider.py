"""The lifecycle against panva's oidc-provider, a certified OpenID provider, over real
loopback HTTP (tests/oidc_provider/server.mjs).

The built-in test provider copies authentik's wire; this one is an independent
implementation, so these tests catch what the agent assumes without knowing it.
A person approves through the provider's own pages (code entry, its development login
and consent forms), driven the way a browser would, cookies and all.

oidc-provider sends no `interval`, so the agent polls at RFC 8628's default 5 s; the
agent's clock is a ManualClock so that costs nothing. The provider keeps real time,
which runs far slower than the agent's: nothing expires on the provider's side unless
a test moves the provider's clock (server.mjs's /test/clock route).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import aiohttp
import pytest

from agent.driver import Driver
from agent.oauth import Client, HttpRequest, HttpResponse
from agent.session import SessionSettings
from agent.state import Phase
from agent.store import CredentialStore
from agent.transport import Transport
from tests.clock import ManualClock
from tests.harness import Running

SERVER_DIR = Path(__file__).parent / "oidc_provider"
NODE = shutil.which("node")
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CLIENT_ID = "device-agent"
ACCESS_TOKEN_TTL = 300
POLL_INTERVAL = 5.0  # RFC 8628 §3.2's default; oidc-provider sends no interval


def _missing() -> str | None:
    if NODE is None:
        return "node is not on PATH (the oidc-provider interop tests need Node.js 18+)"
    if not (SERVER_DIR / "node_modules" / "oidc-provider").is_dir():
        return ("tests/oidc_provider/node_modules is missing: "
                "run `npm ci` in tests/oidc_provider")
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


# -- the provider process ----------------------------------------------------------

@dataclass(frozen=True)
class ServerProcess:
    issuer: str


@contextlib.contextmanager
def run_server(log: Path, **env: str) -> Iterator[ServerProcess]:
    """server.mjs on a free port; its stderr goes to `log`, shown when it fails."""
    assert NODE is not None
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [NODE, "server.mjs", "0"], cwd=SERVER_DIR, stdout=subprocess.PIPE,
            stderr=stderr, env={**os.environ, **env})
    assert process.stdout is not None
    try:
        ready, _, _ = select.select([process.stdout], [], [], 15.0)
        line = process.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            raise RuntimeError(f"server.mjs did not start ({line!r}):\n{log.read_text()}")
        yield ServerProcess(issuer=f"http://127.0.0.1:{int(line)}")
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Shared by the module's tests; its clock is never moved."""
    log = tmp_path_factory.mktemp("oidc-provider") / "stderr.log"
    with run_server(log, ACCESS_TOKEN_TTL=str(ACCESS_TOKEN_TTL)) as running:
        yield running


@pytest.fixture
def clock() -> ManualClock:
    """The agent's wall clock starts at the provider's (real) time: the agent checks the
    ID token's exp and iat against it (OpenID Connect Core §3.1.3.7)."""
    return ManualClock(wall=time.time())


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A provider of the test's own, whose clock the test may move."""
    with run_server(tmp_path / "oidc-provider.log",
                    ACCESS_TOKEN_TTL=str(ACCESS_TOKEN_TTL)) as running:
        yield running


# -- the wire, as the agent saw it -------------------------------------------------

@dataclass(frozen=True)
class Exchange:
    at: float  # the agent's monotonic clock when the request left
    request: HttpRequest
    response: HttpResponse

    @property
    def grant_type(self) -> str | None:
        return self.request.form.get("grant_type")

    @property
    def error(self) -> str | None:
        if self.response.status == 200:
            return None
        with contextlib.suppress(ValueError):
            body = json.loads(self.response.body)
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                return str(body["error"])
        return f"HTTP {self.response.status}"


@dataclass
class Recorder:
    """The agent's sender, keeping every exchange for the assertions."""

    transport: Transport
    clock: ManualClock
    exchanges: list[Exchange] = field(default_factory=list)

    async def send(self, request: HttpRequest) -> HttpResponse:
        at = self.clock.monotonic()
        response = await self.transport.send(request)
        self.exchanges.append(Exchange(at, request, response))
        return response

    def to(self, path: str) -> list[Exchange]:
        return [e for e in self.exchanges if e.request.url.endswith(path)]

    def polls(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.grant_type == DEVICE_GRANT]

    def refreshes(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.grant_type == "refresh_token"]


# -- a person at the provider's pages ------------------------------------------------

@dataclass
class Form:
    id: str | None
    action: str
    fields: dict[str, str] = field(default_factory=dict)


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []
        self._open: Form | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._open = Form(id=found.get("id"), action=found.get("action", ""))
            self.forms.append(self._open)
        elif tag == "input" and self._open is not None and "name" in found:
            self._open.fields[found["name"]] = found.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._open = None


@dataclass(frozen=True)
class Page:
    url: str
    status: int
    text: str

    def form(self, marker: str) -> Form:
        """The form with this id, or the one carrying this hidden field."""
        parser = _Forms()
        parser.feed(self.text)
        for form in parser.forms:
            if form.id == marker or marker in form.fields:
                return form
        raise AssertionError(f"no {marker!r} form at {self.url} (HTTP {self.status}):\n"
                             f"{self.text[:2000]}")


class Browser:
    """Someone with a phone: opens the verification URI, types the code, signs in,
    consents. Redirects are followed and cookies kept, as a browser does."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def _page(self, method: str, url: str,
                    data: Mapping[str, str] | None = None) -> Page:
        async with self._session.request(method, url, data=data) as response:
            return Page(str(response.url), response.status, await response.text())

    async def _submit(self, page: Page, form: Form, **values: str) -> Page:
        return await self._page("POST", urljoin(page.url, form.action),
                                {**form.fields, **values})

    async def _enter_code(self, verification_uri: str, user_code: str) -> Page:
        entry = await self._page("GET", verification_uri)
        return await self._submit(entry, entry.form("op.deviceInputForm"), user_code=user_code)

    async def approve(self, verification_uri: str, user_code: str, *, login: str) -> None:
        confirm = await self._enter_code(verification_uri, user_code)
        sign_in = await self._submit(confirm, confirm.form("op.deviceConfirmForm"))
        assert sign_in.form("login").fields.get("prompt") == "login", sign_in.text[:2000]
        consent = await self._submit(sign_in, sign_in.form("login"), login=login,
                                     password="anything")
        assert consent.form("prompt").fields.get("prompt") == "consent", consent.text[:2000]
        done = await self._submit(consent, consent.form("prompt"))
        assert done.status == 200 and "Sign-in Success" in done.text, done.text[:2000]

    async def deny(self, verification_uri: str, user_code: str) -> None:
        confirm = await self._enter_code(verification_uri, user_code)
        # The page's "[ Abort ]" button submits the confirmation form with abort=yes.
        aborted = await self._submit(confirm, confirm.form("op.deviceConfirmForm"), abort="yes")
        assert "interrupted" in aborted.text, aborted.text[:2000]


# -- what a resource server would ask the provider -------------------------------------

@dataclass
class Provider:
    server: ServerProcess
    session: aiohttp.ClientSession
    metadata: dict[str, Any]

    @property
    def issuer(self) -> str:
        return self.server.issuer

    async def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662. A public client may introspect its own tokens in oidc-provider's
        default policy, so no second, confidential client is needed."""
        async with self.session.post(self.metadata["introspection_endpoint"],
                                     data={"token": token, "client_id": CLIENT_ID}) as answer:
            assert answer.status == 200, await answer.text()
            body: dict[str, Any] = await answer.json()
            return body

    async def userinfo(self, access_token: str) -> tuple[int, dict[str, Any]]:
        async with self.session.get(self.metadata["userinfo_endpoint"], headers={
                "Authorization": f"Bearer {access_token}"}) as answer:
            body = await answer.json() if answer.status == 200 else {}
            return answer.status, body

    async def advance_clock(self, seconds: float) -> None:
        """server.mjs's own route: the provider's time jumps, the agent's does not."""
        async with self.session.post(f"{self.issuer}/test/clock",
                                     params={"advance": str(seconds)}) as answer:
            assert answer.status == 204, await answer.text()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    # The provider is at an IP address; aiohttp's jar ignores such cookies unless told.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield Browser(session)


@contextlib.asynccontextmanager
async def connect(server: ServerProcess) -> AsyncIterator[Provider]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.issuer}/.well-known/openid-configuration") as answer:
            metadata = await answer.json()
        yield Provider(server, session, metadata)


@pytest.fixture
async def provider(server: ServerProcess) -> AsyncIterator[Provider]:
    async with connect(server) as connected:
        yield connected


@pytest.fixture
async def own_provider(own_server: ServerProcess) -> AsyncIterator[Provider]:
    async with connect(own_server) as connected:
        yield connected


# -- the agent -----------------------------------------------------------------------

StartAgent = Callable[[str], Awaitable[tuple[Running, Recorder]]]


@pytest.fixture
async def start_agent(store: CredentialStore, transport: Transport,
                      clock: ManualClock) -> AsyncIterator[StartAgent]:
    running: list[Running] = []

    async def start(issuer: str) -> tuple[Running, Recorder]:
        recorder = Recorder(transport, clock)
        settings = SessionSettings(
            client=Client(client_id=CLIENT_ID),
            scopes=("openid", "profile", "email", "offline_access"),
            device_name="Test device",
            issuer=issuer,
            allow_insecure_http=True,
        )
        driver = Driver(settings, sender=recorder, store=store, clock=clock,
                        rng=random.Random(1))
        runner = Running(driver, clock)
        running.append(runner)
        return runner, recorder

    yield start
    for runner in running:
        await runner.stop()


def assert_polls_paced(recorder: Recorder) -> None:
    """RFC 8628 §3.5: at least `interval` before each poll of a code, the first
    included; and never a slow_down in answer. oidc-provider 8.x sends no slow_down
    even when polled faster, so the spacing is checked on the agent's side."""
    issued = {json.loads(e.response.body)["device_code"]: e.at
              for e in recorder.to("/device/auth") if e.response.status == 200}
    for device_code, at in issued.items():
        times = [at] + [e.at for e in recorder.polls()
                        if e.request.form["device_code"] == device_code]
        assert all(b - a >= POLL_INTERVAL for a, b in pairwise(times)), times
    assert "slow_down" not in {e.error for e in recorder.polls()}


# -- the tests ------------------------------------------------------------------------

async def test_signs_in_refreshes_with_rotation_and_logs_out(
        start_agent: StartAgent, provider: Provider, browser: Browser,
        store_path: Path) -> None:
    run, recorder = await start_agent(provider.issuer)
    shown = await run.until_phase(Phase.AWAITING_USER)
    assert shown.verification_uri is not None and shown.user_code is not None
    assert recorder.exchanges[0].request.url == (
        f"{provider.issuer}/.well-known/openid-configuration")
    assert shown.verification_uri == f"{provider.issuer}/device"
    assert shown.verification_uri_complete == (
        f"{provider.issuer}/device?user_code={shown.user_code}")

    # The person is slow: the agent polls a few times first. Its clock stands still
    # while they approve, so no poll races the approval.
    await run.clock.run_until(lambda: len(recorder.polls()) >= 3)
    await browser.approve(shown.verification_uri, shown.user_code, login="alice")
    # The credentials are on disk before userinfo is asked: the name follows.
    signed = await run.until(lambda s: s.phase == Phase.SIGNED_IN and s.user != "alice")

    polls = recorder.polls()
    assert [e.error for e in polls[:-1]] == ["authorization_pending"] * (len(polls) - 1)
    assert polls[-1].response.status == 200
    assert_polls_paced(recorder)
    # oidc-provider's ID token carries no name when an access token is issued
    # (conformIdTokenClaims), so the name came from its userinfo endpoint.
    assert [e.response.status for e in recorder.to("/me")] == [200]
    assert signed.user == "Alice Example"

    first = await run.driver.get_token()
    assert first.refresh_token is not None
    assert set((first.scope or "").split()) >= {"openid", "offline_access"}
    introspected = await provider.introspect(first.access_token)
    assert introspected["active"] is True
    assert introspected["sub"] == "alice"
    assert introspected["client_id"] == CLIENT_ID
    assert await provider.userinfo(first.access_token) == (200, {
        "sub": "alice", "name": "Alice Example", "preferred_username": "alice",
        "email": "alice@example.test", "email_verified": True})

    # The lifecycle refreshes on its own when 20% of the lifetime remains.
    signed_at = run.clock.monotonic()
    await run.until(lambda s: s.phase == Phase.SIGNED_IN and run.driver.credentials is not None
                    and run.driver.credentials.tokens.access_token != first.access_token)
    [refresh] = recorder.refreshes()
    assert refresh.response.status == 200
    assert refresh.at - signed_at == pytest.approx(0.8 * ACCESS_TOKEN_TTL, abs=2.0)
    second = await run.driver.get_token()
    # A public client's refresh token is rotated on every use; the old one is spent.
    assert second.refresh_token not in (None, first.refresh_token)
    assert (await provider.introspect(first.refresh_token))["active"] is False
    assert (await provider.introspect(second.refresh_token or ""))["active"] is True
    assert (await provider.introspect(second.access_token))["active"] is True
    assert (second.refresh_token or "") in store_path.read_text()
    assert run.driver.snapshot.user == "Alice Example"

    assert await run.driver.logout() == []
    revocations = recorder.to("/token/revocation")
    # Both at once: the order they are answered in is the provider's.
    assert sorted((e.request.form["token_type_hint"], e.response.status)
                  for e in revocations) == [("access_token", 200), ("refresh_token", 200)]
    assert (await provider.introspect(second.refresh_token or ""))["active"] is False
    assert (await provider.introspect(second.access_token))["active"] is False
    assert (await provider.userinfo(second.access_token))[0] == 401
    assert not store_path.exists()
    again = await run.until_phase(Phase.AWAITING_USER)
    assert again.user_code != shown.user_code


async def test_approval_before_the_first_poll_signs_in_at_the_first_poll(
        start_agent: StartAgent, provider: Provider, browser: Browser) -> None:
    run, recorder = await start_agent(provider.issuer)
    shown = await run.until_phase(Phase.AWAITING_USER)
    assert shown.verification_uri is not None and shown.user_code is not None
    await browser.approve(shown.verification_uri, shown.user_code, login="bob")
    signed = await run.until(lambda s: s.phase == Phase.SIGNED_IN and s.user != "bob")
    assert signed.user == "Bob Example"
    assert [e.response.status for e in recorder.polls()] == [200]
    assert_polls_paced(recorder)


async def test_abort_on_the_provider_page_is_a_denial_then_a_new_code(
        start_agent: StartAgent, provider: Provider, browser: Browser) -> None:
    run, recorder = await start_agent(provider.issuer)
    shown = await run.until_phase(Phase.AWAITING_USER)
    assert shown.verification_uri is not None and shown.user_code is not None
    await run.clock.run_until(lambda: len(recorder.polls()) >= 1)
    await browser.deny(shown.verification_uri, shown.user_code)
    denied = await run.until_phase(Phase.DENIED)
    assert recorder.polls()[-1].error == "access_denied"
    assert denied.last_error == "End-User aborted interaction"
    fresh = await run.until_phase(Phase.AWAITING_USER)
    assert fresh.user_code not in (None, shown.user_code)
    assert_polls_paced(recorder)


async def test_code_expired_at_the_provider_is_replaced(
        start_agent: StartAgent, own_provider: Provider) -> None:
    """A code can die at the provider before the agent's own deadline: oidc-provider
    counts lifetimes from the start of the current second, so a code lives between
    expires_in - 1 and expires_in seconds. Here the provider's clock jumps past it."""
    run, recorder = await start_agent(own_provider.issuer)
    shown = await run.until_phase(Phase.AWAITING_USER)
    await own_provider.advance_clock(600)
    fresh = await run.until(lambda s: s.phase == Phase.AWAITING_USER
                            and s.user_code != shown.user_code)
    # One poll, at the interval, far inside the agent's own deadline: only the
    # provider held the code dead, and said so.
    assert [e.error for e in recorder.polls()] == ["expired_token"]
    assert recorder.polls()[0].at - recorder.to("/device/auth")[0].at == POLL_INTERVAL
    assert fresh.user_code


async def test_refresh_token_expired_at_the_provider_starts_over(
        start_agent: StartAgent, own_provider: Provider, browser: Browser,
        store_path: Path) -> None:
    run, recorder = await start_agent(own_provider.issuer)
    shown = await run.until_phase(Phase.AWAITING_USER)
    assert shown.verification_uri is not None and shown.user_code is not None
    await browser.approve(shown.verification_uri, shown.user_code, login="carol")
    await run.until_phase(Phase.SIGNED_IN)
    assert store_path.exists()
    # Past the refresh token's (and the grant's) 3600 s at the provider.
    await own_provider.advance_clock(3601)
    fresh = await run.until_phase(Phase.AWAITING_USER)
    assert [e.error for e in recorder.refreshes()] == ["invalid_grant"]
    assert fresh.user_code not in (None, shown.user_code)
    # The access token is served while it lives; the dead refresh token is gone
    # from disk, so no restart sends it again.
    assert run.driver.credentials is not None
    assert run.driver.credentials.tokens.refresh_token is None
    assert '"refresh_token": null' in store_path.read_text()
    await run.until(lambda s: run.driver.credentials is None)
    assert not store_path.exists()
    assert [e.error for e in recorder.refreshes()] == ["invalid_grant"]
