"""No secret reaches anything a person or another program can read.

A real agent (`device-agent run`, a child process, debug logging) is taken through a
confidential client's whole life against the test provider: a code after a 500 and a
429, polls answered with trouble, sign-in, refreshes, every kind of bad refresh answer
(5xx, 429, not JSON, JSON cut in the middle of real tokens, an answer without an access
token, odd fields, a mangled ID token, invalid_grant), a second sign-in, hooks that
print their environment and the token files, API errors, the CLI, and a sign-out. Then
every token and device code the provider ever issued, and the client secret, is looked
for in every log line, every screen, every systemd STATUS=, every status document,
every API error and every CLI output. The user code may show (it is meant to be typed);
nothing else may, not even in part.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import signal
import socket
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from agent.idp import Action, Answer, Fail, IdentityProvider, ProviderSettings, serve_provider
from tests.test_service_process import ROOT, _child_env

CLIENT_ID = "device-agent"
# Punctuation, as some providers put in their secrets: no pattern alone catches it,
# and it changes under JSON and URL encoding.
CLIENT_SECRET = 'cs.Jq7u~Wm3R!kZx9&Tn2V+bLp8/Hs4Yd=6Fg1%Ce5"Aw0Qo'
# Long enough that nothing but the secret itself can hold it by chance, short enough to
# catch a secret cut for a log line or a screen.
PREFIX = 16
# A guard against a hung agent, never a measure of speed.
PATIENCE = 60.0

HOOK = r"""
raw="$1"; shift
{ echo "== $DEVICE_AGENT_EVENT"; env | sort; } | tee -a "$raw"
for f in "$@"; do [ -r "$f" ] && cat "$f"; echo; done | tee -a "$raw" >&2
exit 0
"""


class Seen:
    """Everything the outside world got from the agent, by where it came from."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def add(self, where: str, text: object) -> None:
        self.texts.append((where, text if isinstance(text, str) else json.dumps(text)))


class Agent:
    def __init__(self, tmp: Path, idp: IdentityProvider, seen: Seen) -> None:
        self.tmp = tmp
        self.idp = idp
        self.seen = seen
        self.socket = tmp / "run" / "agent.sock"
        self.state = tmp / "state"
        self.hook_raw = tmp / "hook-raw.log"
        self.env_file = tmp / "tokens" / "token.env"
        self.json_file = tmp / "tokens" / "token.json"
        self.config = tmp / "config.yaml"
        (tmp / "tokens").mkdir()
        (tmp / "not-a-dir").write_text("")
        data: dict[str, Any] = {
            "provider": {"issuer": idp.issuer, "client_id": CLIENT_ID,
                         "client_secret": CLIENT_SECRET, "allow_insecure_http": True,
                         "timeout": "5s"},
            "device": {"name": "Sweep device"},
            "sign_in": {"codes_per_hour": 60, "throttle_backoff": 0.2,
                        "throttle_backoff_max": 0.4, "retry_initial": 0.1, "retry_max": 0.4},
            "refresh": {"retry_initial": 0.1, "retry_max": 0.3},
            "display": {"type": "console"},
            "storage": {"path": str(self.state / "credentials.json")},
            "api": {"socket": str(self.socket)},
            "logging": {"level": "debug"},
            "sinks": [
                {"path": str(self.env_file), "format": "env"},
                {"path": str(self.json_file), "format": "json", "on_logout": "empty"},
                # Fails on every write: the error it logs is checked too.
                {"path": str(tmp / "not-a-dir" / "token"), "format": "raw"},
            ],
            "hooks": [
                {"command": ["/bin/sh", "-c", HOOK, "hook", str(self.hook_raw),
                             str(self.env_file), str(self.json_file),
                             str(self.state / "credentials.json"),
                             str(self.state / "session.json"), str(self.config)],
                 "events": ["token_changed", "signed_in", "sign_in_needed", "signed_out"],
                 "pass_token": True, "timeout": "10s"},
                {"command": [str(tmp / "no-such-hook")], "events": ["token_changed"]},
            ],
        }
        # Left readable by others on purpose: the agent warns about the secret in it.
        self.config.write_text(json.dumps(data))  # JSON is YAML
        self.config.chmod(0o644)
        self.http = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.socket)))
        self.proc: asyncio.subprocess.Process | None = None
        self.out_lines: list[str] = []
        self.err_lines: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []

    # -- the process ---------------------------------------------------------------

    async def start(self, notify: str) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "run", "--config", str(self.config),
            env=_child_env(NOTIFY_SOCKET=notify), cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._tasks += [asyncio.create_task(self._read(self.proc.stdout, self.out_lines)),
                        asyncio.create_task(self._read(self.proc.stderr, self.err_lines))]

    @staticmethod
    async def _read(stream: asyncio.StreamReader, into: list[str]) -> None:
        # Read all along: a debug log fills a pipe long before the agent stops.
        async for line in stream:
            into.append(line.decode(errors="backslashreplace"))

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(PATIENCE):
            status = await self.proc.wait()
            await asyncio.gather(*self._tasks)
        return status

    async def close(self) -> None:
        await self.http.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for task in self._tasks:
            task.cancel()

    def _alive(self) -> None:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise AssertionError(f"the agent exited with {self.proc.returncode}:\n"
                                 + "".join(self.err_lines[-40:]))

    # -- the API -------------------------------------------------------------------

    async def call(self, method: str, target: str, *, secret_answer: bool = False,
                   ) -> tuple[int, dict[str, Any]]:
        async with self.http.request(method, f"http://agent{target}") as response:
            body = await response.json()
        if not secret_answer or response.status >= 300:
            self.seen.add(f"api {method} {target} -> {response.status}", body)
        return response.status, body

    async def status(self) -> dict[str, Any]:
        return (await self.call("GET", "/v1/status"))[1]

    async def until(self, what: str, holds: Callable[[dict[str, Any]], bool],
                    ) -> dict[str, Any]:
        async with asyncio.timeout(PATIENCE):
            while True:
                self._alive()
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    doc = await self.status()
                    if holds(doc):
                        return doc
                await asyncio.sleep(0.05)
        raise AssertionError(what)  # pragma: no cover - the timeout raises first

    async def until_logged(self, text: str) -> None:
        async with asyncio.timeout(PATIENCE):
            while not any(text in line for line in self.err_lines):
                self._alive()
                await asyncio.sleep(0.05)

    async def follow_events(self) -> None:
        async with self.http.get("http://agent/v1/events",
                                 timeout=aiohttp.ClientTimeout(total=None)) as response:
            async for line in response.content:
                if line.startswith(b"data: "):
                    self.seen.add("api events", line[6:].decode())

    # -- the command line -----------------------------------------------------------

    async def cli(self, *argv: str, secret_out: bool = False) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", *argv, "--config", str(self.config),
            env=_child_env(), cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(PATIENCE):
            out, err = await proc.communicate()
        assert proc.returncode is not None
        self.seen.add(f"cli {' '.join(argv)} stderr", err.decode())
        if not secret_out:
            self.seen.add(f"cli {' '.join(argv)} stdout", out.decode())
        return proc.returncode, out.decode()

    # -- the provider's side ----------------------------------------------------------

    def token_answers(self) -> int:
        return sum(1 for r in self.idp.requests if r.endpoint == "token" and r.status)

    def refreshes(self) -> int:
        return sum(1 for r in self.idp.requests
                   if r.form.get("grant_type") == "refresh_token" and r.status == 200)

    async def refresh_meets(self, action: Action | None) -> None:
        """Ask for refreshes until one has met `action` at the token endpoint (None: a
        plain answer). Refreshes the agent starts by itself may meet it first; either
        way every answer the API gave on the way is kept."""
        before = len(self.idp.requests)
        if action is not None:
            self.idp.script("token", action)
        async with asyncio.timeout(PATIENCE):
            while not any(r.endpoint == "token" and r.status is not None
                          and r.form.get("grant_type") == "refresh_token"
                          for r in self.idp.requests[before:]):
                self._alive()
                await self.call("POST", "/v1/refresh")
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _notify_socket(path: Path, seen: Seen) -> AsyncIterator[str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    sock.bind(str(path))

    async def receive() -> None:
        loop = asyncio.get_running_loop()
        while True:
            seen.add("systemd notify", (await loop.sock_recv(sock, 65536)).decode())

    task = asyncio.create_task(receive())
    try:
        yield str(path)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


def _cut(tokens: dict[str, Any]) -> bytes:
    """A token answer cut short after its refresh token: JSON no parser accepts, with
    real, live tokens in it."""
    text = json.dumps(tokens)
    end = text.index(tokens["refresh_token"]) + len(tokens["refresh_token"])
    return text[:end].encode()


def _unsigned_id_token(tokens: dict[str, Any]) -> dict[str, Any]:
    """A token answer whose ID token lacks its signature: what the agent says about it
    must not quote it."""
    return {**tokens, "id_token": tokens["id_token"].rsplit(".", 1)[0]}


# A JWT: three base64url parts, the signature long enough to be looked for alone. Not
# any string with two dots: a device code of authentik's alphabet has two now and then,
# and the part after the last one was once a single character, found in every line.
_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{16,}")


def _forms(secret: str) -> set[str]:
    """The secret as it could show: as is, escaped for JSON, a URL or repr(), and for a
    JWT its signature alone (header and claims are much alike from token to token);
    each also by its first PREFIX characters."""
    whole = {secret, json.dumps(secret)[1:-1], urllib.parse.quote(secret, safe=""),
             urllib.parse.quote_plus(secret), repr(secret)[1:-1]}
    if _JWT.fullmatch(secret):
        whole.add(secret.rsplit(".", 1)[1])
    return whole | {form[:PREFIX] for form in whole}


def _sweep(secrets: Mapping[str, Iterable[str]], texts: list[tuple[str, str]]) -> list[str]:
    """One finding per line that holds any form of any secret, naming the secret whose
    longest form it holds (JWTs share their first characters)."""
    forms = [(kind, number, form) for kind, values in secrets.items()
             for number, secret in enumerate(values) for form in _forms(secret)]
    found = []
    for where, text in texts:
        for line in text.splitlines():
            hits = [(len(form), kind, number) for kind, number, form in forms if form in line]
            if hits:
                size, kind, number = max(hits)
                found.append(f"{kind} #{number} ({size} characters of it) in {where}: "
                             f"{line[:300]}")
    return found


async def test_no_secret_shows_anywhere(tmp_path: Path) -> None:
    settings = ProviderSettings(client_secret=CLIENT_SECRET, interval=1,
                                access_token_lifetime=3, code_lifetime=30)
    seen = Seen()
    async with serve_provider(settings) as idp, \
            _notify_socket(tmp_path / "notify.sock", seen) as notify:
        agent = Agent(tmp_path, idp, seen)
        try:
            # The first code comes after a proxy's 500 and the provider's 429.
            idp.script("device", Fail(500),
                       Answer(429, json={"error": "slow_down"}, headers={"Retry-After": "1"}))
            await agent.start(notify)
            await agent.until("the API answers", lambda doc: True)
            events = asyncio.create_task(agent.follow_events())

            # Signing in: polls meet trouble, then the person approves.
            idp.script("token", Answer(200, body=b"{not json"))
            first = await agent.until("a code on screen", lambda d: d["state"] == "awaiting_user")
            assert (await agent.call("POST", "/v1/refresh"))[0] == 409
            assert (await agent.call("GET", "/v1/token"))[0] == 503
            assert (await agent.cli("token"))[0] == 75
            await agent.cli("status")
            idp.approve(first["code"]["user_code"])
            await agent.until("signed in", lambda d: d["state"] == "signed_in")
            assert (await agent.call("GET", "/v1/id_token", secret_answer=True))[0] == 200
            assert (await agent.call("GET", "/v1/userinfo"))[0] == 200

            # Refreshes, good and bad. Tokens live 3 s, so the agent refreshes by itself
            # too, and the JSON answers hold tokens the provider really issued.
            bad: list[Action] = [
                Fail(503, body=b"upstream unavailable", content_type="text/plain"),
                Answer(429, json={"error": "slow_down"}, headers={"Retry-After": "1"}),
                Answer(200, body=_cut(idp.issue_tokens())),
                Answer(200, json={k: v for k, v in idp.issue_tokens().items()
                                  if k != "access_token"}),
                # Odd fields, each noted; a lifetime as a string is read as it is.
                Answer(200, json={**idp.issue_tokens(), "expires_in": "3", "token_type": 7,
                                  "refresh_token": 12345,
                                  "scope": ["openid", "offline_access"]}),
                Answer(200, json=_unsigned_id_token(idp.issue_tokens())),
                Answer(401, json={"error": "invalid_client",
                                  "error_description": "Client authentication failed"}),
            ]
            await agent.refresh_meets(None)
            for action in bad:
                await agent.refresh_meets(action)
            await agent.refresh_meets(None)
            # A dead refresh token: a new sign-in beside the token still served. The
            # provider echoes the token it was sent, as spring-security-oauth2 does.
            await agent.refresh_meets(Answer(400, json={
                "error": "invalid_grant", "request_id": "0" * 32,
                "error_description": "Invalid refresh token: "
                                     + " ".join(idp.live_refresh_tokens())}))
            again = await agent.until("a second code", lambda d: d["state"] == "awaiting_user")
            idp.approve(again["code"]["user_code"])
            await agent.until("signed in again", lambda d: d["state"] == "signed_in"
                              and d["code"] is None)
            await agent.refresh_meets(None)
            assert (await agent.cli("refresh"))[0] in (0, 75)

            # API errors and the CLI as scripts use it.
            for target in ("/v1/token?min_ttl=abc", "/v1/token?min_ttl=999999999",
                           "/v1/token?min_ttl=3600", "/v1/nothing"):
                assert (await agent.call("GET", target))[0] >= 400
            assert (await agent.call("POST", "/v1/token"))[0] == 405
            assert (await agent.call("GET", "/v1/token", secret_answer=True))[0] == 200
            for argv in (("status",), ("status", "--json"), ("token", "--min-ttl", "99999")):
                await agent.cli(*argv)
            code, out = await agent.cli("token", secret_out=True)
            assert code == 0 and out.strip()
            code, out = await agent.cli("token", "--json", secret_out=True)
            assert code == 0 and json.loads(out)["access_token"]

            # A new sign-in asked for, then a sign-out that wins over it.
            assert (await agent.cli("login"))[0] == 0
            await agent.until("a third code", lambda d: d["state"] == "awaiting_user")
            assert (await agent.cli("logout"))[0] == 0
            await agent.until("signed out, a fresh code",
                              lambda d: d["state"] == "awaiting_user" and d["user"] is None)
            assert (await agent.call("GET", "/v1/token"))[0] == 503
            await agent.cli("status")
            assert (await agent.cli("refresh"))[0] != 0
            # Hooks still running at the stop are killed unlogged; these must be seen.
            await agent.until_logged("hook sh (signed_out) done")
            await agent.until_logged("hook sh (sign_in_needed) done")

            assert await agent.stop() == 0
            events.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await events
            assert (await agent.cli("status"))[0] == 69  # the client's own error text
        finally:
            await agent.close()

    issued = idp.issued_secrets()
    # The run went where it was meant to: each kind issued several times, bad answers
    # met, and the hooks printed real tokens for the agent to keep out of its log.
    assert len(issued["device_code"]) >= 4, issued["device_code"]
    assert len(issued["refresh_token"]) >= 8
    assert agent.refreshes() >= 6
    raw = agent.hook_raw.read_text()
    assert any(token in raw for token in issued["access_token"])
    assert any(token in raw for token in issued["refresh_token"])
    log = "".join(agent.err_lines)
    assert "hook sh (token_changed) stdout: ACCESS_TOKEN=" in log
    assert "hook sh (sign_in_needed)" in log and "hook sh (signed_out)" in log
    assert " DEBUG agent." in log
    screen = "".join(agent.out_lines)
    assert idp.base_url in screen  # the screen was captured, and the code with it
    assert any(t.startswith("STATUS=Waiting for sign-in") for w, t in seen.texts
               if w == "systemd notify")

    seen.add("agent log (stderr)", log)
    seen.add("agent screen (stdout)", screen)
    secrets = {**issued, "client_secret": [
        CLIENT_SECRET, base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()]}
    leaks = _sweep(secrets, seen.texts)
    assert not leaks, "\n".join(leaks[:20])


def test_the_sweep_finds_a_secret_and_a_part_of_one() -> None:
    token = "rt-" + "Zk4" * 30
    device_code = 'a"b\\c%d' + "x" * 40
    for leaked in (token, token[:PREFIX], json.dumps(device_code)[1:-1],
                   urllib.parse.quote(device_code)[:PREFIX]):
        texts = [("other", "nothing here"), ("a log", f"before {leaked} after")]
        assert _sweep({"refresh_token": [token], "device_code": [device_code]}, texts)
    assert not _sweep({"refresh_token": [token]}, [("a log", "rt-Zk4Zk4 is too short")])


def test_a_device_code_with_two_dots_is_not_taken_for_a_jwt() -> None:
    # A random 128-character code of authentik's alphabet holds exactly two dots about
    # one time in four; once, the second was its last-but-one character, and the sweep
    # looked for a one-character "signature" in every line.
    device_code = "a" * 100 + ".b-c{d}e" + "f" * 18 + ".g"
    assert "g" not in _forms(device_code)
    assert not _sweep({"device_code": [device_code]}, [("log", "signing in: go")])
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9." + "s" * 43
    assert "s" * 43 in _forms(token)
