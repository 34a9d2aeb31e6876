"""Commands run when something happens (Vault Agent's `exec`, oidc-agent's hooks).

A hook is an argv list, run without a shell, in its own process group so a timeout
kills whatever it started. It never blocks the event loop and its failure is logged,
never fatal. The token reaches a hook's environment only when the hook asks for it.

Events: `token_changed`, `signed_in`, `sign_in_needed`, `signed_out`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["HOOK_EVENTS", "Hook", "HookRunner"]

log = logging.getLogger(__name__)

HOOK_EVENTS = ("token_changed", "signed_in", "sign_in_needed", "signed_out")
# What a hook's output may put in the log, per stream.
_OUTPUT_LIMIT = 2_000
# systemd hands these to the agent alone; a hook must not speak for it.
_PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS",
                "LISTEN_FDNAMES")


@dataclass(frozen=True, kw_only=True)
class Hook:
    command: tuple[str, ...]
    events: frozenset[str] = field(default_factory=lambda: frozenset({"token_changed"}))
    timeout: float = 30.0
    pass_token: bool = False

    @property
    def name(self) -> str:
        return os.path.basename(self.command[0])


class HookRunner:
    """Runs each hook at most once at a time. Events that arrive while it runs wait
    their turn; repeats of one event fold into a single run with the latest
    environment, so a burst of refreshes does not queue a burst of runs."""

    def __init__(self, hooks: tuple[Hook, ...], *,
                 base_env: Mapping[str, str] | None = None) -> None:
        self._hooks = hooks
        env = dict(os.environ if base_env is None else base_env)
        for key in _PRIVATE_ENV:
            env.pop(key, None)
        self._base_env = env
        self._running: dict[int, asyncio.Task[None]] = {}
        # Per hook: the events that came while it ran, each with its latest environment.
        self._queued: dict[int, dict[str, dict[str, str]]] = {}
        self.results: list[tuple[str, str, int | None]] = []  # (hook, event, exit status)

    def fire(self, event: str, env: Mapping[str, str], *, token: str | None = None) -> None:
        for index, hook in enumerate(self._hooks):
            if event not in hook.events:
                continue
            full = {**self._base_env, **env, "DEVICE_AGENT_EVENT": event}
            if hook.pass_token and token is not None:
                full["ACCESS_TOKEN"] = token
            if index in self._running:
                queue = self._queued.setdefault(index, {})
                queue.pop(event, None)  # keeps the order of the latest arrivals
                queue[event] = full
                continue
            self._start(index, event, full)

    def _start(self, index: int, event: str, env: dict[str, str]) -> None:
        task = asyncio.get_running_loop().create_task(self._run(index, event, env))
        self._running[index] = task

        def done(_: asyncio.Task[None]) -> None:
            del self._running[index]
            queue = self._queued.get(index)
            if queue:
                event = next(iter(queue))
                self._start(index, event, queue.pop(event))

        task.add_done_callback(done)

    async def _run(self, index: int, event: str, env: dict[str, str]) -> None:
        hook = self._hooks[index]
        try:
            process = await asyncio.create_subprocess_exec(
                *hook.command, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)
        except OSError as exc:
            log.error("hook %s (%s) could not start: %s", hook.name, event, exc.strerror or exc)
            self.results.append((hook.name, event, None))
            return
        try:
            out, err = await asyncio.wait_for(process.communicate(), hook.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            log.error("hook %s (%s) took longer than %.0f s and was killed", hook.name, event,
                      hook.timeout)
            self.results.append((hook.name, event, None))
            return
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            raise
        status = process.returncode
        self.results.append((hook.name, event, status))
        token = env.get("ACCESS_TOKEN")
        for stream, data in (("stdout", out), ("stderr", err)):
            text = data[:_OUTPUT_LIMIT].decode(errors="replace").strip()
            if token:
                text = text.replace(token, "[token]")
            if text:
                log.info("hook %s (%s) %s: %s", hook.name, event, stream, text)
        if status == 0:
            log.info("hook %s (%s) done", hook.name, event)
        else:
            log.warning("hook %s (%s) exited with status %s", hook.name, event, status)

    async def drain(self) -> None:
        """Wait for running hooks (and the runs queued behind them)."""
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def aclose(self) -> None:
        self._queued.clear()
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
