"""Keeps token files and hooks in step with the driver.

Token files are written in a worker thread (an fsync on an SD card can take a while),
one write at a time and always with the latest credentials, so a burst of changes
ends with the newest token on disk. Hooks run beside the loop, never in its way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from agent.accounts import group_id, user_id
from agent.config import HookConfig, SinkConfig
from agent.driver import Driver
from agent.errors import ConfigError
from agent.hooks import Hook, HookRunner
from agent.session import user_label
from agent.sinks import TokenFile
from agent.state import Phase, Snapshot
from agent.store import Credentials

__all__ = ["Consumers", "hooks_from_config", "token_files_from_config"]

log = logging.getLogger(__name__)


def _resolve(name: str | None, lookup: Callable[[str], int], key: str, kind: str) -> int | None:
    if name is None:
        return None
    try:
        return lookup(name)
    except KeyError:
        raise ConfigError(key, f"no {kind} named {name!r} on this system") from None


def token_files_from_config(sinks: Sequence[SinkConfig]) -> list[TokenFile]:
    return [TokenFile(sink=sink,
                      uid=_resolve(sink.owner, user_id, f"sinks[{i}].owner", "user"),
                      gid=_resolve(sink.group, group_id, f"sinks[{i}].group", "group"))
            for i, sink in enumerate(sinks)]


def hooks_from_config(hooks: Sequence[HookConfig]) -> tuple[Hook, ...]:
    return tuple(Hook(command=h.command, events=frozenset(h.events), timeout=h.timeout,
                      pass_token=h.pass_token) for h in hooks)


class Consumers:
    def __init__(self, driver: Driver, files: Sequence[TokenFile], hooks: HookRunner) -> None:
        self._driver = driver
        self._files = list(files)
        self._hooks = hooks
        self._latest: Credentials | None = None
        self._dirty = False
        self._writer: asyncio.Task[None] | None = None
        self._phase: Phase | None = None
        driver.add_token_listener(self._on_token)
        driver.add_listener(self._on_snapshot)

    def _on_token(self, creds: Credentials | None) -> None:
        self._latest = creds
        self._dirty = True
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_files())

    def _secrets(self, creds: Credentials | None) -> list[str]:
        """Every token the agent holds, the device code being polled and the client
        secret, to be redacted from whatever a hook prints (it may print the config,
        the credential file or session.json, in any form)."""
        found = [self._driver.settings.client.client_secret, self._driver.session.device_code]
        if creds is not None:
            tokens = creds.tokens
            found += [tokens.access_token, tokens.refresh_token, tokens.id_token]
        return [secret for secret in found if secret]

    def _fire_token_hooks(self, creds: Credentials | None) -> None:
        """After the files are written, so a hook that reads one sees the new token."""
        if creds is None:
            self._hooks.fire("signed_out", {"DEVICE_AGENT_STATE": "signed_out"},
                             secrets=self._secrets(None))
            return
        env = {"DEVICE_AGENT_STATE": Phase.SIGNED_IN.value}
        user = user_label(creds)
        if user:
            env["DEVICE_AGENT_USER"] = user
        expires_at = self._driver.snapshot.token_expires_at
        if expires_at is not None:
            env["DEVICE_AGENT_EXPIRES_AT"] = str(int(expires_at))
        self._hooks.fire("token_changed", env, token=creds.tokens.access_token,
                         secrets=self._secrets(creds))

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        previous, self._phase = self._phase, snapshot.phase
        if snapshot.phase == previous:
            return
        creds = self._driver.credentials
        token = creds.tokens.access_token if creds else None
        if snapshot.phase == Phase.SIGNED_IN and previous != Phase.REFRESH_FAILING:
            self._hooks.fire("signed_in", self._env(snapshot), token=token,
                             secrets=self._secrets(creds))
        elif snapshot.phase == Phase.AWAITING_USER:
            self._hooks.fire("sign_in_needed", self._env(snapshot), secrets=self._secrets(creds))

    def _env(self, snapshot: Snapshot) -> dict[str, str]:
        env = {"DEVICE_AGENT_STATE": snapshot.phase.value}
        if snapshot.user:
            env["DEVICE_AGENT_USER"] = snapshot.user
        if snapshot.token_expires_at is not None:
            env["DEVICE_AGENT_EXPIRES_AT"] = str(int(snapshot.token_expires_at))
        if snapshot.phase == Phase.AWAITING_USER and snapshot.user_code:
            env["DEVICE_AGENT_USER_CODE"] = snapshot.user_code
            env["DEVICE_AGENT_VERIFICATION_URI"] = snapshot.verification_uri or ""
            if snapshot.verification_uri_complete:
                env["DEVICE_AGENT_VERIFICATION_URI_COMPLETE"] = (
                    snapshot.verification_uri_complete)
        return env

    async def _write_files(self) -> None:
        while self._dirty:
            self._dirty = False
            creds = self._latest
            # The expiry every observer reads: the session's, on both clocks.
            expires_at = self._driver.snapshot.token_expires_at
            if self._files:
                await asyncio.to_thread(self._write_all, creds, expires_at)
            self._fire_token_hooks(creds)

    def _write_all(self, creds: Credentials | None, expires_at: float | None) -> None:
        for file in self._files:
            try:
                if creds is None:
                    file.clear()
                else:
                    file.write(creds.tokens, expires_at=expires_at)
            except PermissionError as exc:
                log.error("token file %s: %s; under the shipped unit, `sudo device-agent "
                          "install-service` adds what token files need (the group, "
                          "fchown(), the directory)", file.path, exc)
            except (OSError, ValueError) as exc:
                log.error("token file %s: %s", file.path, exc)

    async def flush(self) -> None:
        """Wait until the files hold the latest credentials."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def aclose(self) -> None:
        await self.flush()
        await self._hooks.aclose()
