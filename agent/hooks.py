"""Commands run when something happens (Vault Agent's `exec`, oidc-agent's hooks).

A hook is trusted code: the operator's argv, run without a shell, with the agent's own
user and rights. What is done here keeps a hook from harming the agent by accident, not
a hostile hook from anything:

- It never blocks the event loop, and its failure is logged, never fatal.
- Its output is read as it comes, and only the first `_OUTPUT_LIMIT` bytes of each
  stream are kept; the rest is read and dropped (a hook printing gigabytes costs the
  agent nothing but the reading), and the log says how much was left out.
- It runs in a session (and process group) of its own, with only stdin (/dev/null),
  stdout and stderr open. When it exits or times out, the whole group is killed, so
  nothing it left behind in the background outlives it. The group is killed before the
  hook is reaped: until then its pid, and so the group's id, cannot be reused.
- Its environment is `HOOK_ENVIRONMENT` and nothing else of the agent's: systemd's
  NOTIFY_SOCKET, LISTEN_FDS, CREDENTIALS_DIRECTORY, ... and any secret in the agent's
  environment stay with the agent. The token is in it only when the hook asks for it.
- Its output is logged line by line, attributed to it, after every secret the agent
  named (as is and JSON-escaped), the value of any field named as a secret (a device
  code in session.json, a client secret in the config), and anything shaped like a JWT
  or a long base64 or hex run are redacted and control characters are escaped, so it
  can neither leak a token into the journal nor forge a log line.

Events: `token_changed`, `signed_in`, `sign_in_needed`, `signed_out`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import re
import signal
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO

from agent.logs import fingerprint, looks_like_a_token

__all__ = ["HOOK_ENVIRONMENT", "HOOK_EVENTS", "Hook", "HookRunner", "hook_environment", "redact"]

log = logging.getLogger(__name__)

HOOK_EVENTS = ("token_changed", "signed_in", "sign_in_needed", "signed_out")

# All a hook's environment may hold. PATH gets `_DEFAULT_PATH` when the agent has none,
# HOME the agent's user's home directory; LANG and LC_ALL come only if the agent has
# them; DEVICE_AGENT_* are the agent's own (never taken from its environment), and
# ACCESS_TOKEN is there only for a hook with `pass_token`.
HOOK_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "DEVICE_AGENT_*", "ACCESS_TOKEN")
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_AGENT_PREFIX = "DEVICE_AGENT_"

# Per stream: what is kept of a hook's output and may reach the log, and in how many lines.
_OUTPUT_LIMIT = 4096
_LINE_LIMIT = 40
_READ_SIZE = 65536
# Reads per wakeup: a hook that floods its pipe still leaves the loop time for the rest.
_READS_PER_WAKEUP = 16
# After the hook's group is killed, how long a process that left the group (setsid) may
# keep the hook's pipes open before they are closed on it.
_PIPE_GRACE = 0.5
# Secrets remembered across runs, so a hook that prints the previous token (read from a
# file, say) has it redacted too.
_REMEMBERED_SECRETS = 8

# A JWS or JWE in compact form: base64url of '{"' begins the header.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){1,4}")
# A long run of base64 (either alphabet) or hex; it must mix letters and digits, so a
# row of dashes or a long word is not taken for a secret.
_LONG_RUN = re.compile(r"[A-Za-z0-9+/_~-]{32,}=*")
# A value under a name that says it is secret, as a hook shows it when it prints one of
# the agent's files or its environment: JSON (credentials.json, session.json), YAML
# (config.yaml) or NAME=value. Device codes and many client secrets hold punctuation, so
# no run pattern catches them, and the agent is not always told them. A quoted value
# may run to the end of the line, where the output was cut.
_SECRET_NAME = (r"[A-Za-z0-9_-]*"
                r"(?:secret|password|device_code|access_token|refresh_token|id_token)")
_QUOTED = r""""(?!\[redacted)(?:[^"\\]|\\.)*(?:"|$)|'(?!\[redacted)[^']*(?:'|$)"""
_SECRET_FIELD = re.compile(
    rf'(?i)(?P<json>"{_SECRET_NAME}"\s*:\s*)(?:{_QUOTED})'
    rf"|(?P<bare>\b{_SECRET_NAME}\b['\"]?\s*[:=][ \t]*)(?:{_QUOTED}|(?!\[redacted)[^\s&,;]+)")
# What may be part of a token (RFC 6750 b64token, JWT dots): dropped from the end of kept
# output that was cut, so no secret is shown in part, where no pattern would catch it.
_TOKENISH_TAIL = re.compile(rb"[A-Za-z0-9+/=_~.-]+\Z")
# Lines end at \n alone: a \r inside one is escaped, not taken for a line break.
_LINES = re.compile(rb"[^\n]*\n|[^\n]+")
# C0 controls but tab, DEL, C1 controls, line and paragraph separators and bidi
# overrides: none may start a line of its own, or rewrite one on a terminal.
_CONTROLS = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
             for c in (*range(0x09), *range(0x0a, 0x20), *range(0x7f, 0xa0),
                       0x2028, 0x2029, *range(0x202a, 0x202f), *range(0x2066, 0x206a))}


@dataclass(frozen=True, kw_only=True)
class Hook:
    command: tuple[str, ...]
    events: frozenset[str] = field(default_factory=lambda: frozenset({"token_changed"}))
    timeout: float = 30.0
    pass_token: bool = False

    @property
    def name(self) -> str:
        return os.path.basename(self.command[0])


@dataclass(frozen=True)
class _Run:
    env: dict[str, str]
    secrets: tuple[str, ...]


def hook_environment(agent_env: Mapping[str, str]) -> dict[str, str]:
    """What a hook inherits of the agent's environment (see `HOOK_ENVIRONMENT`)."""
    env = {"PATH": agent_env.get("PATH") or _DEFAULT_PATH}
    home = agent_env.get("HOME")
    if not home:
        try:
            home = pwd.getpwuid(os.geteuid()).pw_dir
        except KeyError:
            home = "/"
    env["HOME"] = home
    for key in ("LANG", "LC_ALL"):
        if agent_env.get(key):
            env[key] = agent_env[key]
    return env


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with each of `secrets` replaced by its fingerprint, and anything else that
    looks like a token by "[redacted]"."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            tag = f"[redacted {fingerprint(secret)}]"
            # As itself, and as a JSON file (session.json, a config) holds it.
            for form in _forms(secret):
                text = text.replace(form, tag)
    text = _SECRET_FIELD.sub(
        lambda m: (m.group("json") or m.group("bare")) + "[redacted]", text)
    text = _JWT.sub("[redacted]", text)

    def run(match: re.Match[str]) -> str:
        found = match.group(0)
        return "[redacted]" if looks_like_a_token(found) else found

    return _LONG_RUN.sub(run, text)


def _forms(secret: str) -> tuple[str, ...]:
    escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
    return (secret,) if escaped == secret else (secret, escaped)


def _without_partial_secret(data: bytes, secrets: Iterable[str]) -> bytes:
    """`data`, cut at the output limit, without the start of a secret at its very end,
    where no replacement of the whole secret can find it."""
    for secret in secrets:
        for form in _forms(secret):
            raw = form.encode()
            start = data.find(raw[:1], max(0, len(data) - len(raw) + 1))
            while start != -1:
                if raw.startswith(data[start:]):
                    data = data[:start]
                    break
                start = data.find(raw[:1], start + 1)
    return data


class _Capture:
    """One of a hook's output pipes, read as data comes: the first `limit` bytes are
    kept, the rest only counted."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._stream = stream
        self._fd = stream.fileno()
        self._limit = limit
        self.kept = bytearray()
        self.total = 0
        self.eof: asyncio.Future[None] = self._loop.create_future()
        os.set_blocking(self._fd, False)
        self._loop.add_reader(self._fd, self._readable)
        self._open = True

    def _readable(self) -> None:
        for _ in range(_READS_PER_WAKEUP):
            try:
                chunk = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                return
            self.total += len(chunk)
            room = self._limit - len(self.kept)
            if room > 0:
                self.kept += chunk[:room]

    def close(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self._fd)
            self._stream.close()
        if not self.eof.done():
            self.eof.set_result(None)


def _has_exited(pid: int) -> bool:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


async def _exited(pid: int) -> None:
    """Until the child `pid` has exited, without reaping it."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # before Linux 5.3, or refused by a seccomp filter: ask now and then
        while True:
            if _has_exited(pid):
                return
            await asyncio.sleep(0.02)
    readable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    try:
        loop.add_reader(pidfd, ready)
        try:
            await readable
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)


def _spawn(hook: Hook, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Fork and exec, as asyncio's own subprocess support does, but with a Popen whose
    exit nobody else waits for: the hook is reaped only after its group is killed."""
    # close_fds: nothing of the agent's but these three. A session of its own: a group
    # to kill, and no controlling terminal to signal the agent through.
    return subprocess.Popen(
        hook.command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, close_fds=True, start_new_session=True)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class HookRunner:
    """Runs each hook at most once at a time. Events that arrive while it runs wait
    their turn; repeats of one event fold into a single run with the latest
    environment, so a burst of refreshes does not queue a burst of runs."""

    def __init__(self, hooks: tuple[Hook, ...], *,
                 base_env: Mapping[str, str] | None = None) -> None:
        self._hooks = hooks
        self._base_env = hook_environment(os.environ if base_env is None else base_env)
        self._running: dict[int, asyncio.Task[None]] = {}
        # Per hook: the events that came while it ran, each with its latest run.
        self._queued: dict[int, dict[str, _Run]] = {}
        self._known: dict[str, None] = {}  # recent secrets, oldest first
        self.results: list[tuple[str, str, int | None]] = []  # (hook, event, exit status)

    def fire(self, event: str, env: Mapping[str, str], *, token: str | None = None,
             secrets: Iterable[str] | None = None) -> None:
        """Run the hooks for `event`. `env` holds the DEVICE_AGENT_* variables (others
        are dropped); `secrets` (the token, by default, and always with it) are
        redacted from what the hooks print."""
        named = [*(secrets if secrets is not None else ()), *([token] if token else [])]
        for secret in named:
            if secret:
                self._known.pop(secret, None)
                self._known[secret] = None
        while len(self._known) > _REMEMBERED_SECRETS:
            del self._known[next(iter(self._known))]
        redacted = tuple(self._known)
        ours = {k: v for k, v in env.items() if k.startswith(_AGENT_PREFIX)}
        for index, hook in enumerate(self._hooks):
            if event not in hook.events:
                continue
            full = {**self._base_env, **ours, "DEVICE_AGENT_EVENT": event}
            if hook.pass_token and token is not None:
                full["ACCESS_TOKEN"] = token
            run = _Run(full, redacted)
            if index in self._running:
                queue = self._queued.setdefault(index, {})
                queue.pop(event, None)  # keeps the order of the latest arrivals
                queue[event] = run
                continue
            self._start(index, event, run)

    def _start(self, index: int, event: str, run: _Run) -> None:
        task = asyncio.get_running_loop().create_task(self._run(index, event, run))
        self._running[index] = task

        def done(_: asyncio.Task[None]) -> None:
            del self._running[index]
            queue = self._queued.get(index)
            if queue:
                event = next(iter(queue))
                self._start(index, event, queue.pop(event))

        task.add_done_callback(done)

    async def _run(self, index: int, event: str, run: _Run) -> None:
        hook = self._hooks[index]
        try:
            process = _spawn(hook, run.env)
        except (OSError, ValueError) as exc:  # ValueError: a NUL in an argument
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            log.error("hook %s (%s) could not start: %s", hook.name, event, reason)
            self.results.append((hook.name, event, None))
            return
        assert process.stdout is not None and process.stderr is not None
        streams = {"stdout": _Capture(process.stdout, _OUTPUT_LIMIT),
                   "stderr": _Capture(process.stderr, _OUTPUT_LIMIT)}
        exited = timed_out = False
        try:
            await asyncio.wait_for(_exited(process.pid), hook.timeout)
            exited = True
        except TimeoutError:
            timed_out = True
        finally:
            # Exited, timed out or cancelled: the hook is not reaped yet (a zombie, or
            # still running), so its pid is still the group's id and no one else's.
            _kill_group(process.pid)
            try:
                await self._reap(process)
                if exited:
                    await self._drain(hook, event, streams)
            finally:
                for capture in streams.values():
                    capture.close()
        if timed_out:
            log.error("hook %s (%s) took longer than %g s and was killed", hook.name, event,
                      hook.timeout)
            self.results.append((hook.name, event, None))
            return
        status = process.returncode
        self.results.append((hook.name, event, status))
        for stream, capture in streams.items():
            self._log_output(hook, event, stream, capture, run.secrets)
        if status == 0:
            log.info("hook %s (%s) done", hook.name, event)
        else:
            log.warning("hook %s (%s) exited with status %s", hook.name, event, status)

    @staticmethod
    async def _reap(process: subprocess.Popen[bytes]) -> None:
        await _exited(process.pid)  # at once, or as soon as the SIGKILL lands
        process.wait()

    @staticmethod
    async def _drain(hook: Hook, event: str, streams: Mapping[str, _Capture]) -> None:
        """What is left in the pipes, once the group is gone. A process that left the
        group (setsid) and holds them is not waited for long."""
        done, _ = await asyncio.wait([c.eof for c in streams.values()], timeout=_PIPE_GRACE)
        if len(done) < len(streams):
            log.warning("hook %s (%s) left a process outside its process group holding its "
                        "output open; it is no longer read", hook.name, event)

    @staticmethod
    def _log_output(hook: Hook, event: str, stream: str, capture: _Capture,
                    secrets: Iterable[str]) -> None:
        data = bytes(capture.kept)
        if capture.total > len(data):
            data = _TOKENISH_TAIL.sub(b"", _without_partial_secret(data, secrets))
        shown = lines = 0
        for raw in _LINES.findall(data):
            if lines == _LINE_LIMIT:
                break
            shown += len(raw)
            line = raw.rstrip(b"\n").rstrip(b"\r").decode("utf-8", "backslashreplace")
            line = redact(line, secrets).translate(_CONTROLS)
            if line.strip():
                lines += 1
                log.info("hook %s (%s) %s: %s", hook.name, event, stream, line)
        if shown < capture.total:
            log.info("hook %s (%s) %s: %d of %d bytes not logged", hook.name, event, stream,
                     capture.total - shown, capture.total)

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
