"""A real Mosquitto broker of a test's own: a random loopback port, a password file and
an ACL in a temporary directory, started and stopped by the test (and restarted on the
same port, for a broker that comes back). Parallel-safe: nothing is shared between
brokers but the binaries.

Debian's `mosquitto` package provides `mosquitto` and `mosquitto_passwd`; without it,
the tests that need a broker are skipped with that reason (`.ci/run` installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path

__all__ = ["ACL", "Mosquitto", "missing"]

# What each user may do. `device` is the agent: it writes its own topics and Home
# Assistant's discovery, and reads its command topic; `dashboard` is Home Assistant:
# it reads everything and writes commands.
ACL = """\
user device
topic write device-agent/#
topic write homeassistant/#
topic read device-agent/+/command

user dashboard
topic read #
topic write device-agent/+/command
"""

# A guard against a broker that never comes up, not a measure of anything.
START_PATIENCE = 10.0


def missing() -> str | None:
    """Why no broker can be run here, or None."""
    for program in ("mosquitto", "mosquitto_passwd"):
        if shutil.which(program) is None and not Path(f"/usr/sbin/{program}").exists():
            return (f"needs {program} (Debian: apt-get install --no-install-recommends "
                    "mosquitto)")
    return None


def _program(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Mosquitto:
    """One broker. `users` maps user names to passwords; `port` is kept across
    restarts, so clients configured with it reconnect to the same address."""

    def __init__(self, directory: Path, *, users: Mapping[str, str] | None = None,
                 acl: str = ACL) -> None:
        self.directory = directory
        self.users = dict(users) if users is not None else {
            "device": secrets.token_urlsafe(12), "dashboard": secrets.token_urlsafe(12)}
        self.acl = acl
        self.port = _free_port()
        self.host = "127.0.0.1"
        self.log = directory / "mosquitto.log"
        self._process: asyncio.subprocess.Process | None = None
        self._prepared = False

    async def _prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        passwd = self.directory / "passwd"
        for index, (user, password) in enumerate(self.users.items()):
            argv = [_program("mosquitto_passwd"), "-b"]
            if index == 0:
                argv.append("-c")
            process = await asyncio.create_subprocess_exec(
                *argv, str(passwd), user, password, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"mosquitto_passwd failed: {out.decode(errors='replace')}")
        passwd.chmod(0o600)
        (self.directory / "acl").write_text(self.acl)
        self._prepared = True

    def _write_config(self) -> Path:
        config = self.directory / "mosquitto.conf"
        # Run as root (a CI container), mosquitto would switch to the `mosquitto` user,
        # who cannot read this directory: it stays the user who runs the tests.
        me = pwd.getpwuid(os.getuid()).pw_name
        config.write_text(
            f"per_listener_settings false\n"
            f"listener {self.port} {self.host}\n"
            f"allow_anonymous false\n"
            f"password_file {self.directory / 'passwd'}\n"
            f"acl_file {self.directory / 'acl'}\n"
            # A restart loses every retained message: the agent must publish them again.
            f"persistence false\n"
            f"user {me}\n"
            f"log_dest stderr\n"
            f"log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            f"connection_messages true\n")
        return config

    async def start(self) -> None:
        if not self._prepared:
            await self._prepare()
        for _ in range(5):
            config = self._write_config()
            with self.log.open("ab") as log:
                self._process = await asyncio.create_subprocess_exec(
                    _program("mosquitto"), "-c", str(config),
                    stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
            if await self._listening():
                return
            # Another process took the port between the probe and the bind.
            await self.stop()
            self.port = _free_port()
        raise RuntimeError(f"mosquitto did not start; see {self.log}:\n"
                           + self.log.read_text(errors="replace")[-2000:])

    async def _listening(self) -> bool:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + START_PATIENCE
        while loop.time() < give_up:
            assert self._process is not None
            if self._process.returncode is not None:
                return False
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                await asyncio.sleep(0.01)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True
        return False

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            if process is not None:
                await process.wait()
            return
        process.terminate()
        try:
            async with asyncio.timeout(START_PATIENCE):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
