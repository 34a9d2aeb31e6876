"""The local API over a real Unix socket: answers, errors, access control by the
kernel's SO_PEERCRED, the event stream, and what concurrent callers share."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.api import AccessPolicy, ApiServer, Caller, build_app
from agent.idp import Fail, IdentityProvider
from agent.state import Phase
from tests.harness import Running, StartDriver

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"


class Api:
    def __init__(self, run: Running, path: Path) -> None:
        self.run = run
        self.path = path
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(path), limit=0))

    async def call(self, method: str, target: str) -> tuple[int, dict[str, Any], Any]:
        async with self.session.request(method, f"http://agent{target}") as response:
            return response.status, await response.json(), response.headers


@pytest.fixture
async def running(start_driver: StartDriver) -> Running:
    return await start_driver()


async def serve_api(run: Running, path: Path, policy: AccessPolicy | None = None,
                    mode: int = 0o666) -> ApiServer:
    server = ApiServer(build_app(run.driver, policy or AccessPolicy(),
                                 wall_clock=run.clock.time, heartbeat=0.2), path, mode=mode)
    await server.start()
    return server


@pytest.fixture
async def api(running: Running, socket_dir: Path) -> AsyncIterator[Api]:
    server = await serve_api(running, socket_dir / "agent.sock")
    client = Api(running, socket_dir / "agent.sock")
    yield client
    await client.session.close()
    await server.close()


async def sign_in(api: Api, provider: IdentityProvider) -> None:
    await api.run.until_phase(Phase.AWAITING_USER)
    provider.approve()
    await api.run.until_phase(Phase.SIGNED_IN)


def refreshes(provider: IdentityProvider) -> int:
    return sum(1 for r in provider.requests if r.form.get("grant_type") == "refresh_token")


async def test_token_before_and_after_sign_in(api: Api, provider: IdentityProvider) -> None:
    await api.run.until_phase(Phase.AWAITING_USER)
    status, body, _ = await api.call("GET", "/v1/token")
    assert status == 503
    assert body["error"] == "not_signed_in"
    assert api.run.driver.snapshot.user_code in body["message"]
    provider.approve()
    await api.run.until_phase(Phase.SIGNED_IN)
    status, body, headers = await api.call("GET", "/v1/token")
    assert status == 200
    assert set(body) == {"access_token", "token_type", "expires_at", "expires_in", "scope"}
    assert provider.access_token_valid(body["access_token"])
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["expires_at"].endswith("Z") and "T" in body["expires_at"]
    assert "offline_access" in body["scope"]
    assert headers["Cache-Control"] == "no-store"


async def test_status_id_token_and_userinfo(api: Api, provider: IdentityProvider) -> None:
    await api.run.until_phase(Phase.AWAITING_USER)
    status, body, _ = await api.call("GET", "/v1/status")
    assert status == 200 and body["state"] == "awaiting_user"
    assert body["code"]["user_code"] == api.run.driver.snapshot.user_code
    assert body["code"]["verification_uri_complete"].endswith(body["code"]["user_code"])
    assert body["version"]
    provider.approve()
    await api.run.until_phase(Phase.SIGNED_IN)
    status, body, _ = await api.call("GET", "/v1/status")
    assert body["state"] == "signed_in" and body["user"] == "Alice Example"
    assert body["code"] is None and body["token_expires_at"]
    status, body, _ = await api.call("GET", "/v1/id_token")
    assert status == 200 and body["id_token"].count(".") == 2
    status, body, _ = await api.call("GET", "/v1/userinfo")
    assert status == 200
    assert body["name"] == "Alice Example" and body["email"] == "alice@example.com"


async def test_min_ttl_fifty_callers_share_one_refresh(
        api: Api, provider: IdentityProvider) -> None:
    await sign_in(api, provider)
    _, first, _ = await api.call("GET", "/v1/token")
    api.run.clock.advance(60)  # the token now lives 3540 s
    answers = await asyncio.gather(*(api.call("GET", "/v1/token?min_ttl=3590")
                                     for _ in range(50)))
    assert {status for status, _, _ in answers} == {200}
    tokens = {body["access_token"] for _, body, _ in answers}
    assert len(tokens) == 1 and first["access_token"] not in tokens
    assert refreshes(provider) == 1
    # A modest min_ttl is served from what is there, with no refresh.
    status, _, _ = await api.call("GET", "/v1/token?min_ttl=60")
    assert status == 200 and refreshes(provider) == 1


async def test_min_ttl_that_cannot_be_met_is_502(api: Api, provider: IdentityProvider) -> None:
    await sign_in(api, provider)
    provider.script("token", Fail(503))
    api.run.clock.advance(60)
    status, body, _ = await api.call("GET", "/v1/token?min_ttl=3590")
    assert status == 502 and body["error"] == "provider_unavailable"


@pytest.mark.parametrize("value", ["abc", "-1", "1e99", "nan", ""])
async def test_bad_min_ttl(api: Api, provider: IdentityProvider, value: str) -> None:
    await sign_in(api, provider)
    status, body, _ = await api.call("GET", f"/v1/token?min_ttl={value}")
    assert status == 400 and body["error"] == "bad_request"
    assert "min_ttl" in body["message"]


async def test_unknown_path_and_wrong_method_are_json(api: Api) -> None:
    status, body, _ = await api.call("GET", "/v1/nothing")
    assert (status, body["error"]) == (404, "not_found")
    status, body, _ = await api.call("POST", "/v1/token")
    assert (status, body["error"]) == (405, "method_not_allowed")


async def test_huge_headers_and_silent_clients_harm_no_one(
        api: Api, provider: IdentityProvider) -> None:
    await sign_in(api, provider)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(api.path))  # connects, sends nothing
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half.connect(str(api.path))
    half.sendall(b"GET /v1/token HTTP/1.1\r\nHost: x\r\n")  # never finishes
    try:
        reader, writer = await asyncio.open_unix_connection(str(api.path))
        writer.write(b"GET /v1/token HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000
                     + b"\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readline(), 5)
        assert head.split()[1] in (b"400", b"413", b"431")
        writer.close()
        # Everyone else is still served.
        status, _, _ = await api.call("GET", "/v1/token")
        assert status == 200
    finally:
        silent.close()
        half.close()


async def test_refresh_login_logout(api: Api, provider: IdentityProvider) -> None:
    await api.run.until_phase(Phase.AWAITING_USER)
    status, body, _ = await api.call("POST", "/v1/refresh")
    assert (status, body["error"]) == (409, "sign_in_in_progress")
    provider.approve()
    await api.run.until_phase(Phase.SIGNED_IN)
    _, before, _ = await api.call("GET", "/v1/token")
    status, body, _ = await api.call("POST", "/v1/refresh")
    assert status == 200 and body["state"] == "signed_in"
    _, after, _ = await api.call("GET", "/v1/token")
    assert after["access_token"] != before["access_token"]

    status, body, _ = await api.call("POST", "/v1/logout")
    assert status == 200
    assert body == {"signed_out": True, "problems": [], "revocation": "confirmed"}
    assert not provider.access_token_valid(after["access_token"])
    status, body, _ = await api.call("GET", "/v1/token")
    assert status == 503
    await api.run.until_phase(Phase.AWAITING_USER)

    code = api.run.driver.snapshot.user_code
    status, body, _ = await api.call("POST", "/v1/login")
    assert status == 202 and body["accepted"] is True and body["next_code_in"] == 0
    await api.run.until(lambda s: s.phase == Phase.AWAITING_USER and s.user_code != code,
                        max_seconds=1)


async def test_events_stream_follows_the_state(api: Api, provider: IdentityProvider) -> None:
    await api.run.until_phase(Phase.AWAITING_USER)
    seen: list[str] = []

    async def read_events() -> None:
        async with api.session.get("http://agent/v1/events") as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            async for line in response.content:
                if line.startswith(b"data: "):
                    seen.append(json.loads(line[6:])["state"])
                    if seen[-1] == "signed_in":
                        return

    reader = asyncio.create_task(read_events())
    await api.run.clock.run_until(lambda: seen == ["awaiting_user"], max_seconds=0)
    await asyncio.sleep(0.5)  # a few heartbeats (0.2 s here) pass without a change
    assert not reader.done()
    provider.approve()
    await api.run.until_phase(Phase.SIGNED_IN)
    await asyncio.wait_for(reader, 5)
    assert seen == ["awaiting_user", "signed_in"]


# -- who may do what --------------------------------------------------------------

def test_policy_unit() -> None:
    policy = AccessPolicy(read_users=["nobody"], admin_groups=["65533"])
    reader = Caller(uid=NOBODY, gid=NOBODY, pid=1)
    stranger = Caller(uid=12345, gid=12345, pid=1)
    admin = Caller(uid=12346, gid=65533, pid=1)
    assert policy.allows(reader, "read") and not policy.allows(reader, "admin")
    assert not policy.allows(stranger, "read")
    assert policy.allows(admin, "admin") and policy.allows(admin, "read")
    assert policy.allows(Caller(uid=0, gid=0, pid=1), "admin")
    assert policy.allows(Caller(uid=os.getuid(), gid=1, pid=1), "admin")


CLIENT = r"""
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
request = f"{sys.argv[2]} {sys.argv[3]} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
sock.sendall(request.encode())
data = b""
while chunk := sock.recv(65536):
    data += chunk
print(data.split(b" ", 2)[1].decode())
"""


def as_other_user(path: Path, method: str, target: str, *, uid: int, gid: int,
                  groups: tuple[int, ...] = ()) -> int:
    done = subprocess.run([SYSTEM_PYTHON, "-c", CLIENT, str(path), method, target],
                          user=uid, group=gid, extra_groups=list(groups),
                          capture_output=True, text=True, timeout=10, check=True,
                          cwd="/")
    return int(done.stdout.strip())


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="running clients under other uids needs root and /usr/bin/python3")


@needs_root
async def test_permission_matrix_with_real_processes(
        running: Running, provider: IdentityProvider, socket_dir: Path) -> None:
    await running.until_phase(Phase.AWAITING_USER)
    provider.approve()
    await running.until_phase(Phase.SIGNED_IN)
    policies = {
        "nobody-listed": AccessPolicy(),
        "read-user": AccessPolicy(read_users=["nobody"]),
        "read-group": AccessPolicy(read_groups=["nogroup"]),
        "admin-group": AccessPolicy(admin_groups=["4242"]),
    }
    servers = {name: await serve_api(running, socket_dir / f"{name}.sock", policy)
               for name, policy in policies.items()}
    try:
        async def check(name: str, method: str, target: str, **who: Any) -> int:
            return await asyncio.to_thread(as_other_user, socket_dir / f"{name}.sock",
                                           method, target, **who)

        stranger = {"uid": 4000, "gid": 4000}
        nobody = {"uid": NOBODY, "gid": NOBODY}
        expectations = [
            ("nobody-listed", "GET", "/v1/token", nobody, 403),
            ("nobody-listed", "GET", "/v1/status", nobody, 403),
            ("read-user", "GET", "/v1/token", nobody, 200),
            ("read-user", "GET", "/v1/status", nobody, 200),
            ("read-user", "POST", "/v1/refresh", nobody, 403),
            ("read-user", "GET", "/v1/token", stranger, 403),
            ("read-group", "GET", "/v1/token", {"uid": 4001, "gid": NOBODY}, 200),
            ("read-group", "GET", "/v1/token", stranger, 403),
            ("admin-group", "POST", "/v1/refresh", {**stranger, "groups": (4242,)}, 200),
            ("admin-group", "GET", "/v1/token", {**stranger, "groups": (4242,)}, 200),
            ("admin-group", "POST", "/v1/refresh", stranger, 403),
        ]
        for name, method, target, who, expected in expectations:
            got = await check(name, method, target, **who)
            assert got == expected, (name, method, target, who)
    finally:
        for server in servers.values():
            await server.close()


@needs_root
async def test_a_refused_caller_that_loops_is_logged_once_a_minute(
        running: Running, socket_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Issue 9 item 5: refused API requests are logged with a rate limit.
    caplog.set_level(logging.INFO, logger="agent")
    server = await serve_api(running, socket_dir / "strict.sock", AccessPolicy())
    try:
        for _ in range(12):
            status = await asyncio.to_thread(as_other_user, socket_dir / "strict.sock",
                                             "GET", "/v1/token", uid=4243, gid=4243)
            assert status == 403
    finally:
        await server.close()
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and "uid 4243" in refused[0].getMessage()


async def test_refused_reads_are_logged_without_the_token(
        running: Running, provider: IdentityProvider, socket_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    await running.until_phase(Phase.AWAITING_USER)
    provider.approve()
    await running.until_phase(Phase.SIGNED_IN)
    server = await serve_api(running, socket_dir / "a.sock")
    client = Api(running, socket_dir / "a.sock")
    try:
        _, body, _ = await client.call("GET", "/v1/token")
        token = body["access_token"]
        lines = [r.getMessage() for r in caplog.records if r.name == "agent.api"]
        assert any(f"uid {os.getuid()}" in line and "sha256:" in line for line in lines)
        assert all(token not in line for line in lines)
    finally:
        await client.session.close()
        await server.close()


async def test_socket_mode_and_stale_socket(running: Running, socket_dir: Path) -> None:
    path = socket_dir / "agent.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on, as a crashed agent leaves it
    server = await serve_api(running, path, mode=0o660)
    try:
        assert path.stat().st_mode & 0o777 == 0o660
        with pytest.raises(Exception, match="already listening"):
            await serve_api(running, path)
    finally:
        await server.close()
    assert not path.exists()


# -- issue 10 item 9: only the agent that bound the socket removes it -----------------

async def test_a_second_server_on_a_live_socket_leaves_it_to_the_first(
        running: Running, socket_dir: Path) -> None:
    from agent.errors import AgentError

    path = socket_dir / "agent.sock"
    first = await serve_api(running, path)
    bound = path.stat().st_ino
    second = ApiServer(build_app(running.driver, AccessPolicy(), wall_clock=running.clock.time),
                       path)
    try:
        with pytest.raises(AgentError, match="already listening"):
            await second.start()
        await second.close()  # what serve() does on its way out
        assert path.stat().st_ino == bound
        client = Api(running, path)
        try:
            status, _, _ = await client.call("GET", "/v1/status")
        finally:
            await client.session.close()
        assert status == 200
    finally:
        await first.close()
    assert not path.exists()


async def test_a_socket_put_in_place_of_ours_is_not_removed(
        running: Running, socket_dir: Path) -> None:
    path = socket_dir / "agent.sock"
    server = await serve_api(running, path)
    path.unlink()  # deleted under us; another agent then binds the same path
    newcomer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        newcomer.bind(str(path))
        newcomer.listen(1)
        theirs = path.stat().st_ino
        await server.close()
        assert path.exists() and path.stat().st_ino == theirs
    finally:
        newcomer.close()


# -- issue 10 item 12: a script that reads the token every minute ---------------------

READER = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.sendall(f"{sys.argv[2]} {sys.argv[3]} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
             .encode())
data = b""
while chunk := sock.recv(65536):
    data += chunk
print(data.split(b" ", 2)[1].decode())
"""


def read_in_a_new_process(path: Path, method: str, target: str) -> int:
    done = subprocess.run([sys.executable, "-I", "-c", READER, str(path), method, target],
                          capture_output=True, text=True, timeout=10, check=True)
    return int(done.stdout.strip())


async def test_token_reads_are_logged_once_per_user_and_token(
        running: Running, provider: IdentityProvider, socket_dir: Path,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    await running.until_phase(Phase.AWAITING_USER)
    provider.approve()
    await running.until_phase(Phase.SIGNED_IN)
    looked_up: list[int] = []
    comm = vars(Caller)["executable"]
    assert isinstance(comm, property) and comm.fget is not None
    read_proc = comm.fget

    def counted(self: Caller) -> str:
        looked_up.append(self.pid)
        return str(read_proc(self))

    monkeypatch.setattr(Caller, "executable", property(counted))
    path = socket_dir / "agent.sock"
    server = await serve_api(running, path)

    async def read(times: int) -> None:
        for _ in range(times):  # a new process each time, as a cron job or timer is
            assert await asyncio.to_thread(read_in_a_new_process, path, "GET",
                                           "/v1/token") == 200

    def written() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == "agent.api" and r.getMessage().startswith("api: token ")]

    try:
        await read(4)
        assert len(written()) == 1, written()
        assert f"uid {os.getuid()}" in written()[0]
        assert len(looked_up) == 1  # /proc is read only for the line written
        assert await asyncio.to_thread(read_in_a_new_process, path, "POST",
                                       "/v1/refresh") == 200
        await read(3)
        assert len(written()) == 2, written()  # a new token: one more line
        assert len(looked_up) == 2
    finally:
        await server.close()


def _unlinking_as_python_3_13(monkeypatch: pytest.MonkeyPatch) -> None:
    """From Python 3.13, create_unix_server(sock=...) unlinks the socket's file on
    close (cleanup_socket=True, CPython's unix_events.py); 3.11 and 3.12 do not, so the
    newer behaviour is played around the real call."""
    loop = asyncio.get_running_loop()
    real = loop.create_unix_server

    async def create_unix_server(factory: Any, path: Any = None, *, sock: Any = None,
                                 **kwargs: Any) -> asyncio.Server:
        server = await real(factory, path, sock=sock, **kwargs)
        name = (sock or server.sockets[0]).getsockname()
        close = server.close

        def close_and_unlink() -> None:
            close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

        server.close = close_and_unlink  # type: ignore[method-assign]
        return server

    monkeypatch.setattr(loop, "create_unix_server", create_unix_server)


async def test_a_socket_from_systemd_keeps_its_file_when_the_agent_stops(
        running: Running, socket_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _unlinking_as_python_3_13(monkeypatch)
    path = socket_dir / "agent.sock"
    systemds = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    systemds.bind(str(path))
    systemds.listen(16)
    try:
        passed = socket.socket(fileno=os.dup(systemds.fileno()))
        server = ApiServer(build_app(running.driver, AccessPolicy()), path, sock=passed)
        await server.start()
        await server.close()
        # Else the next start gets the descriptor but no client can reach it.
        assert path.exists()
    finally:
        systemds.close()
