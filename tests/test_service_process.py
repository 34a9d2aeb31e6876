"""The daemon as systemd runs it: a real child process, a real NOTIFY_SOCKET, a real
socket handed over through LISTEN_FDS, and real signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.client import call
from agent.idp import IdentityProvider, ProviderSettings, serve_provider
from bench.installed import unit_environment

ROOT = Path(__file__).resolve().parents[1]
STATUS_WAITING = re.compile(
    r"Waiting for sign-in: code (\d{9}) at (http://127\.0\.0\.1:\d+/\S*)")
# Generous for a loaded CI machine; the shutdown limit below is the real requirement.
START_TIMEOUT = 15.0
SHUTDOWN_LIMIT = 2.0

# Plays systemd's part between fork and exec: the socket at fd 3, LISTEN_PID naming the
# process that will run the agent. exec keeps the pid, so the agent finds itself named.
_ACTIVATE = r"""
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)  # inheritable, so it survives the exec
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.executable, [sys.executable, "-m", "agent.cli", *sys.argv[2:]])
"""


def _child_env(credentials: Path | None = None, **extra: str) -> dict[str, str]:
    """This environment with nothing of a service manager or an agent this may itself
    run under; `credentials` as systemd's $CREDENTIALS_DIRECTORY."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM",
                                  "DEVICE_AGENT_", "CREDENTIALS_DIRECTORY"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if credentials is not None:
        env["CREDENTIALS_DIRECTORY"] = str(credentials)
    env.update(extra)
    return env


def _write_config(tmp: Path, issuer: str, **overrides: Any) -> Path:
    data: dict[str, Any] = {
        "provider": {"issuer": issuer, "client_id": "device-agent",
                     "allow_insecure_http": True},
        "display": {"type": "none"},
        "storage": {"path": str(tmp / "state" / "credentials.json")},
        "api": {"socket": str(tmp / "run" / "agent.sock")},
    }
    data.update(overrides)
    path = tmp / "config.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


class Manager:
    """The service manager's end of $NOTIFY_SOCKET: every datagram, parsed, in order."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.seen: list[dict[str, str]] = []

    async def expect(self, wanted: Callable[[dict[str, str]], bool],
                     within: float = START_TIMEOUT) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(within):
            while True:
                raw = await loop.sock_recv(self.sock, 4096)
                fields = dict(line.split("=", 1) for line in raw.decode().splitlines())
                self.seen.append(fields)
                if wanted(fields):
                    return fields


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Manager]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    else:
        name = f"device-agent-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        address = "@" + name
    with sock:
        yield Manager(sock, address)


@pytest.fixture
async def idp() -> AsyncIterator[IdentityProvider]:
    async with serve_provider(ProviderSettings(interval=1)) as provider:
        yield provider


@contextlib.asynccontextmanager
async def _agent(argv: list[str], env: dict[str, str],
                 pass_fds: tuple[int, ...] = ()) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=ROOT, pass_fds=pass_fds,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _get_status(path: Path) -> dict[str, Any]:
    answer = await asyncio.to_thread(call, path, "GET", "/v1/status", timeout=5.0)
    assert answer.status == 200, answer.body
    return answer.body


async def _stop(proc: asyncio.subprocess.Process, manager: Manager) -> float:
    """SIGTERM, as `systemctl stop` sends it; returns how long the exit took."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    await manager.expect(lambda m: m.get("STOPPING") == "1", within=SHUTDOWN_LIMIT)
    async with asyncio.timeout(SHUTDOWN_LIMIT):
        await proc.wait()
    return time.monotonic() - started


async def test_ready_status_watchdog_and_stop(idp: IdentityProvider, manager: Manager,
                                              tmp_path: Path) -> None:
    config = _write_config(tmp_path, idp.issuer)
    api_socket = tmp_path / "run" / "agent.sock"
    env = _child_env(NOTIFY_SOCKET=manager.address, WATCHDOG_USEC="1000000")
    argv = [sys.executable, "-m", "agent.cli", "run", "--config", str(config)]
    async with _agent(argv, env) as proc:
        await manager.expect(lambda m: m.get("READY") == "1")
        # READY means the API accepts: asked at once, it answers.
        assert (await _get_status(api_socket))["version"]
        assert not any("WATCHDOG" in m for m in manager.seen)

        waiting = await manager.expect(
            lambda m: m.get("STATUS", "").startswith("Waiting for sign-in"))
        found = STATUS_WAITING.fullmatch(waiting["STATUS"])
        assert found is not None, waiting
        assert found.group(2).startswith(idp.base_url)
        code = (await _get_status(api_socket))["code"]
        assert code["user_code"] == found.group(1)

        # WATCHDOG_USEC of 1 s: pings every half second, from the event loop.
        await manager.expect(lambda m: m.get("WATCHDOG") == "1", within=3.0)

        took = await _stop(proc, manager)
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert took < SHUTDOWN_LIMIT
    assert not api_socket.exists()  # a socket it bound itself, it removes


async def test_a_broken_config_exits_78_and_names_the_key(manager: Manager,
                                                          tmp_path: Path) -> None:
    config = _write_config(tmp_path, "https://auth.example.com/application/o/x/",
                           display={"type": "hologram"})
    env = _child_env(NOTIFY_SOCKET=manager.address)
    argv = [sys.executable, "-m", "agent.cli", "run", "--config", str(config)]
    async with _agent(argv, env) as proc:
        async with asyncio.timeout(START_TIMEOUT):
            _, err = await proc.communicate()
    assert proc.returncode == 78  # RestartPreventExitStatus=78: no restart loop
    assert "display.type" in err.decode()
    with pytest.raises(BlockingIOError):
        manager.sock.recv(4096)  # never READY


@pytest.mark.parametrize("manager", ["path"], indirect=True)
async def test_socket_activation_serves_the_inherited_socket(idp: IdentityProvider,
                                                             manager: Manager,
                                                             tmp_path: Path) -> None:
    config = _write_config(tmp_path, idp.issuer)
    own_socket = tmp_path / "run" / "agent.sock"
    activated = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(activated))
        listener.listen(8)
        argv = [sys.executable, "-c", _ACTIVATE, str(listener.fileno()),
                "run", "--config", str(config)]
        env = _child_env(NOTIFY_SOCKET=manager.address)
        async with _agent(argv, env, pass_fds=(listener.fileno(),)) as proc:
            listener.close()  # from here on only the agent holds the socket
            await manager.expect(lambda m: m.get("READY") == "1")
            status = await _get_status(activated)
            assert status["state"] in ("starting", "awaiting_user")
            assert not own_socket.exists()  # it did not bind a socket of its own

            took = await _stop(proc, manager)
            _, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            assert took < SHUTDOWN_LIMIT
    finally:
        listener.close()
    assert activated.exists()  # the socket belongs to whoever passed it


@pytest.mark.parametrize("manager", ["path"], indirect=True)
async def test_a_console_daemon_as_the_unit_runs_it_maps_neither_pillow_nor_libstdcxx(
        idp: IdentityProvider, manager: Manager, tmp_path: Path) -> None:
    # Resident memory a daemon whose display is text has no use for: Pillow (4.6 MiB),
    # and the C++ runtime frozenlist's extension would load (1.1 MiB).
    config = _write_config(tmp_path, idp.issuer, display={"type": "console"})
    argv = [sys.executable, "-m", "agent.cli", "run", "--config", str(config)]
    env = _child_env(NOTIFY_SOCKET=manager.address, **unit_environment())
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(START_TIMEOUT):
            while not set("▀▄█") & set(line := (await proc.stdout.readline()).decode()):
                assert line, "the agent closed stdout before it drew a QR code"
        mapped = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "/PIL/" not in mapped
        assert "libstdc++" not in mapped
        assert "site-packages" in mapped  # the map is read: aiohttp's extensions are in it
        await _stop(proc, manager)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
