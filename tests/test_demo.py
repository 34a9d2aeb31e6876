"""`device-agent demo` approved from a phone: a real child process, its provider over
real HTTP, its API over its real socket.

The phone never talks to this machine directly here: it would reach the provider
through a reverse proxy or `ssh -L` at `--public-url`, which forwards the very path
and form the person sends. The tests send those to the provider's own address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from agent.cli import EX_USAGE, main

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = "http://phone.example:8080"
DEVICE = "Kitchen Pi & Co"
# A safety net for a loaded machine, not a requirement: the sign-in waits for the
# agent's next poll, which the provider's interval puts up to 5 s away.
WITHIN = 60.0

PROVIDER_AT = re.compile(r"demo identity provider at (http://\S+?)[;,\s]")
ENDPOINTS = re.compile(r"provider endpoints: device (\S+), token (\S+)")
CODE = re.compile(r"code (\d{9}): open (\S+) ")


class Demo:
    def __init__(self, proc: asyncio.subprocess.Process, sock: Path) -> None:
        self.proc = proc
        self.socket = sock
        self.lines: list[str] = []

    async def expect(self, pattern: re.Pattern[str]) -> re.Match[str]:
        """The next log line that matches; the lines read on the way are kept."""
        assert self.proc.stderr is not None
        async with asyncio.timeout(WITHIN):
            while True:
                raw = await self.proc.stderr.readline()
                if not raw:
                    raise AssertionError("the demo exited:\n" + "".join(self.lines))
                line = raw.decode(errors="replace")
                self.lines.append(line)
                found = pattern.search(line)
                if found:
                    return found

    async def until(self, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first status document, from the agent's event stream, that `wanted`
        accepts: a log line can come before the state it tells of is published."""
        connector = aiohttp.UnixConnector(path=str(self.socket))
        async with (asyncio.timeout(WITHIN),
                    aiohttp.ClientSession(connector=connector) as http,
                    http.get("http://agent/v1/events") as events):
            assert events.status == 200
            async for raw in events.content:
                line = raw.decode()
                if line.startswith("data: "):
                    status: dict[str, Any] = json.loads(line[len("data: "):])
                    if wanted(status):
                        return status
        raise AssertionError("the event stream ended")


@contextlib.asynccontextmanager
async def demo(tmp_path: Path, *args: str) -> AsyncIterator[Demo]:
    sock = tmp_path / "run" / "agent.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICE_AGENT_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "demo", "--port", "0", "--display", "none",
        "--socket", str(sock), "--device-name", DEVICE, *args,
        env=env, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        yield Demo(proc, sock)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(WITHIN):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


def typed_by_hand(code: str) -> str:
    return f"{code[:3]} {code[3:6]}-{code[6:]}"


async def test_a_phone_behind_a_public_url_approves_while_the_agent_stays_on_loopback(
        tmp_path: Path) -> None:
    async with demo(tmp_path, "--host", "127.0.0.1", "--public-url", PUBLIC) as running:
        base = (await running.expect(PROVIDER_AT)).group(1)
        assert base.startswith("http://127.0.0.1:")
        device_endpoint, token_endpoint = (await running.expect(ENDPOINTS)).groups()
        assert device_endpoint.startswith(base + "/")
        assert token_endpoint.startswith(base + "/")
        code, shown = (await running.expect(CODE)).groups()
        assert shown == f"{PUBLIC}/device"
        assert not any("open to the network" in line for line in running.lines)

        status = await running.until(lambda s: s["code"] is not None)
        assert status["code"]["user_code"] == code
        assert status["code"]["verification_uri"] == f"{PUBLIC}/device"
        complete = status["code"]["verification_uri_complete"]
        assert complete == f"{PUBLIC}/device?code={code}"

        forwarded = urlsplit(complete)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}{forwarded.path}?{forwarded.query}") as r:
                assert r.status == 200
                page = await r.text()
            assert "Kitchen Pi &amp; Co" in page
            assert (f"<span>{code[:3]}</span><span>{code[3:6]}</span>"
                    f"<span>{code[6:]}</span>") in page
            assert "openid: your identity" in page
            assert "offline_access: stay signed in" in page
            assert f'action="{PUBLIC}/device"' in page

            async with http.post(f"{base}/device", data={
                    "code": typed_by_hand(code), "user": "alice", "action": "approve"}) as r:
                assert r.status == 200, await r.text()

        # phone.example resolves nowhere: the agent can sign in only through loopback.
        status = await running.until(lambda s: s["state"] not in ("starting",
                                                                  "awaiting_user"))
        assert status["state"] == "signed_in" and status["user"] == "Alice Example"


async def test_on_every_address_the_links_name_this_machine_and_work(tmp_path: Path) -> None:
    async with demo(tmp_path, "--host", "0.0.0.0") as running:
        base = (await running.expect(PROVIDER_AT)).group(1)
        assert base.startswith("http://127.0.0.1:")
        port = urlsplit(base).port
        device_endpoint, _ = (await running.expect(ENDPOINTS)).groups()
        assert device_endpoint.startswith(base + "/")
        _, shown = (await running.expect(CODE)).groups()
        host = urlsplit(shown).hostname
        assert host not in (None, "0.0.0.0")
        assert urlsplit(shown).port == port
        # The log says which address was picked and why.
        assert any(f"{host}" in line and "primary" in line for line in running.lines), \
            running.lines
        assert any("open to the network" in line for line in running.lines)
        complete = (await running.until(
            lambda s: s["code"] is not None))["code"]["verification_uri_complete"]
        assert complete.startswith(shown + "?code=")
        async with aiohttp.ClientSession() as http, http.get(complete) as r:
            assert r.status == 200
            assert "Sign in as" in await r.text()


@pytest.mark.parametrize("url", ["phone.example:8080", "ftp://phone.example/", "http://"])
def test_a_public_url_that_is_not_an_http_url_is_a_usage_error(
        url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["demo", "--public-url", url, "--socket", str(tmp_path / "a.sock")])
    assert status == EX_USAGE
    assert "--public-url" in capsys.readouterr().err
    assert not (tmp_path / "a.sock").exists()
