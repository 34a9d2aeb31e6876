"""Soak: short-lived tokens refreshed again and again while clients read them.

`device-agent run` runs in a child process against the test provider (served by this
process on loopback, approving every code at once) with tokens that live `--lifetime`
seconds. Once it is signed in, `--clients` readers call `GET /v1/token` over the real
Unix socket, each on its own keep-alive connection, until the provider has answered
`--refreshes` refreshes. A read fails when it gets no token, or a token the provider
no longer accepts while it has a live one to give. The agent's open descriptors,
asyncio tasks, threads and resident memory are sampled once it has settled (after
`--warmup` refreshes), half-way and at the end; the end must not be above the settled
value plus a small margin (a leak check, not a speed check).

    .venv/bin/python bench/soak.py --refreshes 300       # 5 s tokens: about 20 minutes
    .venv/bin/python bench/soak.py --quick               # what tests/test_soak.py runs

Exits 1 when a read failed or a figure grew past its margin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.idp import IdentityProvider, ProviderSettings, serve_provider
from tests.test_service_process import _child_env

REPO = Path(__file__).resolve().parents[1]

# 5 s tokens refreshed at 80% of their life, as the documented long run does.
LONG: dict[str, Any] = {"refreshes": 300, "lifetime": 5.0, "margin_ratio": 0.2,
                        "clients": 4, "warmup": 3}
# For CI: 1 s tokens refreshed at half their life (the most the agent allows), so a
# loaded machine still has half a second to refresh in before a token runs out.
QUICK: dict[str, Any] = {"refreshes": 16, "lifetime": 1.0, "margin_ratio": 0.5,
                         "clients": 4, "warmup": 3}

# How far a figure may rise above its settled value: a keep-alive connection to the
# provider opened or closed, a refresh or a file write in flight when sampled, a
# thread the default executor adds, allocator noise. A leak per refresh or per read
# passes these within a few dozen refreshes.
MARGINS = {"fds": 3, "tasks": 4, "threads": 3, "rss_kib": 6 * 1024}

# Runs the agent's own CLI, plus a SIGUSR2 handler that appends the event loop's task
# count to a file: signal handlers run in the main thread, inside the running loop.
_PROBE = r"""
import asyncio, signal, sys

def report(signum, frame):
    try:
        count = len(asyncio.all_tasks(asyncio.get_running_loop()))
    except RuntimeError:
        count = -1
    with open(sys.argv[1], "a") as out:
        out.write(f"{count}\n")

signal.signal(signal.SIGUSR2, report)
from agent.cli import main
sys.exit(main(sys.argv[2:]))
"""

REQUEST = b"GET /v1/token HTTP/1.1\r\nHost: agent\r\n\r\n"
# A guard against a hung agent, never a measure of speed.
PATIENCE = 60.0


@dataclass(frozen=True)
class Sample:
    label: str
    refreshes: int
    fds: int
    tasks: int
    threads: int
    rss_kib: int

    def figures(self) -> dict[str, int]:
        return {"fds": self.fds, "tasks": self.tasks, "threads": self.threads,
                "rss_kib": self.rss_kib}


@dataclass
class Reads:
    done: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.failed += 1
        if len(self.errors) < 10:
            self.errors.append(why)


@dataclass
class SoakResult:
    settings: dict[str, Any]
    refreshes: int
    reads: Reads
    samples: list[Sample]
    exit_status: int | None

    @property
    def settled(self) -> Sample:
        return next(s for s in self.samples if s.label == "start")

    @property
    def end(self) -> Sample:
        return self.samples[-1]

    def growth(self) -> list[str]:
        """Each figure that ended above its settled value plus its margin."""
        start, end = self.settled.figures(), self.end.figures()
        return [f"{name}: {start[name]} after warm-up, {end[name]} at the end "
                f"(margin {margin})"
                for name, margin in MARGINS.items() if end[name] > start[name] + margin]

    def report(self, command: str) -> str:
        lines = [f"$ {command}",
                 f"token lifetime {self.settings['lifetime']:g} s, refreshed at "
                 f"{1 - self.settings['margin_ratio']:.0%} of it; "
                 f"{self.settings['clients']} clients",
                 f"refreshes: {self.refreshes}",
                 f"reads: {self.reads.done}",
                 f"failed reads: {self.reads.failed}",
                 f"{'sample':<10} {'refreshes':>9} {'fds':>5} {'tasks':>6} "
                 f"{'threads':>8} {'RSS KiB':>9}"]
        lines += [f"{s.label:<10} {s.refreshes:>9} {s.fds:>5} {s.tasks:>6} {s.threads:>8} "
                  f"{s.rss_kib:>9}" for s in self.samples]
        lines += [f"failed read: {e}" for e in self.reads.errors]
        lines += [f"grew: {g}" for g in self.growth()]
        lines.append(f"agent exit status: {self.exit_status}")
        return "\n".join(lines)


def _refreshes(idp: IdentityProvider) -> int:
    return sum(1 for r in idp.requests
               if r.form.get("grant_type") == "refresh_token" and r.status == 200)


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


class _Agent:
    def __init__(self, workdir: Path, idp: IdentityProvider, margin_ratio: float) -> None:
        self.socket = workdir / "agent.sock"
        self.tasks_file = workdir / "tasks.txt"
        self.log = workdir / "agent.log"
        self.config = workdir / "config.yaml"
        self.config.write_text(json.dumps({  # JSON is YAML
            "provider": {"issuer": idp.issuer, "client_id": idp.settings.client_id,
                         "allow_insecure_http": True},
            "display": {"type": "none"},
            "storage": {"path": str(workdir / "state" / "credentials.json")},
            "api": {"socket": str(self.socket)},
            "refresh": {"margin_ratio": margin_ratio},
            "logging": {"level": "info"},
        }))
        self.proc: asyncio.subprocess.Process | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[asyncio.subprocess.Process]:
        env = _child_env()
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _PROBE, str(self.tasks_file),
                "run", "--config", str(self.config),
                env=env, cwd=REPO, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=log)
        try:
            yield self.proc
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()

    def alive(self) -> None:
        assert self.proc is not None
        if self.proc.returncode is not None:
            tail = self.log.read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"the agent exited with {self.proc.returncode}:\n"
                               + "\n".join(tail))

    async def task_count(self) -> int:
        assert self.proc is not None
        before = self._counts()
        self.proc.send_signal(signal.SIGUSR2)
        async with asyncio.timeout(PATIENCE):
            while len(self._counts()) == len(before):
                self.alive()
                await asyncio.sleep(0.01)
        return self._counts()[-1]

    def _counts(self) -> list[int]:
        try:
            text = self.tasks_file.read_text()
        except FileNotFoundError:
            return []
        # A line is complete once its newline is written.
        return [int(line) for line in text.split("\n")[:-1]]

    async def sample(self, label: str, refreshes: int) -> Sample:
        assert self.proc is not None
        pid = self.proc.pid
        tasks = await self.task_count()
        return Sample(label=label, refreshes=refreshes, fds=len(os.listdir(f"/proc/{pid}/fd")),
                      tasks=tasks, threads=_status_field(pid, "Threads"),
                      rss_kib=_status_field(pid, "VmRSS"))

    async def state(self) -> str | None:
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.socket))
        except OSError:
            return None
        try:
            writer.write(b"GET /v1/status HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            status, body = await _answer(reader)
            return str(json.loads(body)["state"]) if status == 200 else None
        finally:
            writer.close()


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readline()
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer: {head[:80]!r}")
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return int(parts[1]), await reader.readexactly(length)


async def _read_tokens(path: Path, idp: IdentityProvider, reads: Reads,
                       stop: asyncio.Event, pause: float) -> None:
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    try:
        while not stop.is_set():
            try:
                if writer is None:
                    reader, writer = await asyncio.open_unix_connection(str(path))
                assert reader is not None
                writer.write(REQUEST)
                status, body = await _answer(reader)
            except (OSError, EOFError, ValueError) as exc:
                reads.done += 1
                reads.fail(f"{type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()
                writer = None
                continue
            reads.done += 1
            token = None
            with contextlib.suppress(ValueError, TypeError, KeyError):
                token = json.loads(body)["access_token"]
            if status != 200 or not isinstance(token, str):
                reads.fail(f"HTTP {status}: {body[:200]!r}")
            elif not idp.access_token_valid(token) and idp.live_access_tokens():
                reads.fail("a token the provider no longer accepts, while it had a live one")
            if pause:
                await asyncio.sleep(pause)
    finally:
        if writer is not None:
            writer.close()


async def _until(what: str, agent: _Agent, holds: Any, within: float = PATIENCE) -> None:
    try:
        async with asyncio.timeout(within):
            while not await holds():
                agent.alive()
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise RuntimeError(f"gave up waiting for {what}") from None


async def soak(*, workdir: Path, refreshes: int, lifetime: float, margin_ratio: float,
               clients: int, warmup: int, pause: float = 0.002) -> SoakResult:
    """The soak described above, in `workdir`; the figures, judged by the caller."""
    settings = {"refreshes": refreshes, "lifetime": lifetime, "margin_ratio": margin_ratio,
                "clients": clients, "warmup": warmup}
    provider = ProviderSettings(access_token_lifetime=lifetime, interval=1)
    reads = Reads()
    samples: list[Sample] = []
    async with serve_provider(provider) as idp:
        idp.auto_approve(0)
        agent = _Agent(workdir, idp, margin_ratio)
        async with agent.running() as proc:
            async def signed_in() -> bool:
                return await agent.state() == "signed_in"

            await _until("sign-in", agent, signed_in)
            samples.append(await agent.sample("signed in", _refreshes(idp)))
            stop = asyncio.Event()
            readers = [asyncio.create_task(_read_tokens(agent.socket, idp, reads, stop, pause))
                       for _ in range(clients)]
            try:
                for label, count in (("start", warmup), ("middle", (warmup + refreshes) // 2),
                                     ("end", refreshes)):
                    async def reached(count: int = count) -> bool:
                        return _refreshes(idp) >= count

                    # Twice the time the refreshes take: a guard, not a measure.
                    await _until(f"{count} refreshes", agent, reached,
                                 PATIENCE + 2 * lifetime * count)
                    samples.append(await agent.sample(label, _refreshes(idp)))
            finally:
                stop.set()
                await asyncio.gather(*readers, return_exceptions=True)
            total = _refreshes(idp)
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(PATIENCE):
                status = await proc.wait()
    return SoakResult(settings=settings, refreshes=total, reads=reads, samples=samples,
                      exit_status=status)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the CI settings (1 s tokens, 16 refreshes)")
    parser.add_argument("--refreshes", type=int)
    parser.add_argument("--lifetime", type=float, help="token lifetime in seconds")
    parser.add_argument("--margin-ratio", type=float,
                        help="share of the lifetime left when the agent refreshes")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--warmup", type=int, help="refreshes before the settled sample")
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else LONG)
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings["refreshes"] <= settings["warmup"]:
        parser.error("--refreshes must be more than --warmup")
    with tempfile.TemporaryDirectory(prefix="da-soak-") as tmp:
        result = asyncio.run(soak(workdir=Path(tmp), **settings))
    command = " ".join([os.path.relpath(sys.executable), "bench/soak.py", *sys.argv[1:]])
    print(result.report(command))
    ok = result.reads.failed == 0 and not result.growth() and result.exit_status == 0
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
