"""Crash consistency of the credential file under SIGKILL.

The test identity provider runs in this process with strict refresh-token rotation
(every refresh revokes the token it was given) and short access tokens. The real
agent, `device-agent run --config ...` from the virtual environment, runs as a child
process with its state in a temporary directory, and is killed with SIGKILL again and
again at random moments of its life, chosen by a seeded RNG:

- refresh: once it is signed in, a reader forces refreshes over the Unix socket
  (`GET /v1/token?min_ttl=<just under the lifetime>`) and the kill comes a random
  delay after the last one was asked for (up to a few times a refresh's round trip);
- sign-in: from an empty state directory, either at any moment of start-up, discovery
  and code request, or around the poll the provider approves;
- any time: a random moment of the first seconds after start, with the reader running.

After each kill the credential file must parse (`CredentialStore.load`), and the
refresh token in it must be one the provider still accepts. When it is not, the
sign-in is lost, and the cause is told from the provider's request records:

- rotation window: the provider rotated that token in the killed run's last refresh,
  whose answer never reached the disk (and was never served). Strict rotation makes
  this unavoidable: the provider forgets the old token before the agent can know the
  new one. Likewise the redemption window: a device code redeemed, its tokens not yet
  on disk.
- anything else is a bug: a file that does not parse, a token served before it was on
  disk, a token on disk the provider rotated before the run's last refresh (or in an
  earlier run), one it never issued or that was revoked, a file that vanished, or an
  agent that does not come back signed in (or exits by itself) after a restart.

The window is measured per refresh from inotify events on the state directory and the
provider's records, all on this host's monotonic clock: the provider's arrival time,
the temporary file's creation and its rename onto credentials.json, and the send time
the agent writes into the file (`tokens.issued_at`). A SIGKILL loses the sign-in
anywhere from the send to the rename; the directory fsync that follows the rename
matters to a power cut, not to a kill.

    .venv/bin/python bench/crash_consistency.py --kills 200 [--seed N] [--lanes 2] [--sealed]

`--sealed` runs every agent with a store key where systemd's LoadCredentialEncrypted=
puts it ($CREDENTIALS_DIRECTORY/store-key) and storage.encryption: required, so every
write is the sealed format (agent.sealing), and the judge opens it with the same key.

Prints the command line, the kills, the lost sign-ins by cause, and the window
figures (p50/p99/max ms). Exits 1 on any lost sign-in not explained by a rotation or
redemption window, any store that does not parse, or any failed restart.
tests/test_crash_consistency.py runs a short version of the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import enum
import http.client
import json
import math
import os
import random
import shlex
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.client import AgentUnavailable, ApiAnswer, call
from agent.errors import StoreError
from agent.idp import IdentityProvider, ProviderSettings, serve_provider
from agent.idp.provider import RecordedRequest
from agent.sealing import KEY_SIZE, STORE_KEY, Encryption
from agent.session import MIN_REFRESH_GAP
from agent.sessionfile import SessionFile
from agent.store import Credentials, CredentialStore
from tests.test_service_process import _child_env

__all__ = ["Cause", "Outcome", "Plan", "Report", "Window", "main", "run"]

REPO = Path(__file__).resolve().parents[1]
CREDENTIALS = "credentials.json"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
POLL_INTERVAL = 1  # the provider's `interval`: the smallest RFC 8628 allows in whole seconds
# Liveness bounds, not measurements: a restarted agent that is not signed in by then
# (or a provider record that does not settle) is reported, never waited on forever.
RESTART_LIMIT = 30.0
STOP_LIMIT = 10.0
SETTLE = 0.1
# The agent spends one code per sign-in; its budget is at most 60 an hour. A state
# directory that has spent this many starts over empty, so a long run never waits on it.
CODES_BEFORE_RESET = 40

KILL_SPAN_CYCLES = 6.0
ANY_TIME_SPAN = 2.0

# inotify(7)
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_EVENT = struct.Struct("iIII")


class Plan(enum.Enum):
    REFRESH = "refresh"
    SIGN_IN = "sign-in"
    ANY_TIME = "any time"


PLAN_WEIGHTS = {Plan.REFRESH: 5, Plan.SIGN_IN: 3, Plan.ANY_TIME: 2}


class Cause(enum.Enum):
    # Nothing lost.
    KEPT = "kept: the token on disk is still accepted"
    NOT_SIGNED_IN = "not signed in yet: nothing to lose"
    STILL_LOST = "lost in an earlier run, not signed in again yet"
    # Lost, and unavoidable with strict rotation.
    ROTATION = "rotation window: killed between the provider's rotation and the rename"
    REDEMPTION = "redemption window: killed between the code's redemption and the rename"
    # Bugs.
    UNPARSABLE = "the credential file does not load"
    SERVED_EARLY = "a token was served before it was on disk"
    STALE = "the token on disk was rotated before the run's last refresh"
    REFUSED = "the token on disk is refused, and was not rotated in this run's last refresh"
    DROPPED = "the refresh token was removed from a good sign-in"
    VANISHED = "the credential file of a good sign-in is gone"
    NO_RECOVERY = "the restarted agent did not sign in again"
    EXITED = "the agent exited by itself"


UNAVOIDABLE = frozenset({Cause.ROTATION, Cause.REDEMPTION})
HARMLESS = frozenset({Cause.KEPT, Cause.NOT_SIGNED_IN, Cause.STILL_LOST})
BUGS = frozenset(Cause) - UNAVOIDABLE - HARMLESS


@dataclass(frozen=True)
class Outcome:
    lane: int
    number: int
    plan: Plan
    cause: Cause
    detail: str = ""
    # For a loss in a window: how long after the provider's arrival the kill came.
    kill_after_arrival: float | None = None


@dataclass(frozen=True)
class Window:
    """One answer that reached the disk; seconds on this host's clocks."""

    kind: str                 # "refresh" or "sign-in"
    # The window: from the provider's arrival (it rotates while answering) to the rename.
    arrival_to_rename: float
    arrival_to_temp: float    # the provider's answer and the agent's reading of it
    temp_to_rename: float     # writing and syncing the temporary file
    # From the send time the agent writes into the file: it adds the agent's work
    # before the request left, when a kill loses nothing.
    sent_to_rename: float


_WINDOW_ROWS = (("provider arrival -> renamed on disk", "arrival_to_rename"),
                ("  arrival -> temp file created", "arrival_to_temp"),
                ("  temp file created -> renamed", "temp_to_rename"),
                ("agent's send stamp -> renamed", "sent_to_rename"))


@dataclass
class Report:
    seed: int
    kills: int
    lanes: int
    lifetime: int
    command: str
    sealed: bool = False
    outcomes: list[Outcome] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    plans: collections.Counter[Plan] = field(default_factory=collections.Counter)
    elapsed: float = 0.0

    def lost(self) -> collections.Counter[Cause]:
        return collections.Counter(o.cause for o in self.outcomes if o.cause not in HARMLESS)

    def bugs(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.cause in BUGS]

    @property
    def ok(self) -> bool:
        return not self.bugs() and not self.problems and len(self.outcomes) == self.kills

    def render(self) -> str:
        lines = [f"$ {self.command}",
                 f"seed {self.seed}; {self.lanes} lane(s); access tokens live {self.lifetime} s; "
                 f"strict rotation; {'sealed' if self.sealed else 'plain'} store; "
                 f"{self.elapsed:.1f} s",
                 f"kills: {len(self.outcomes)} of {self.kills} ("
                 + ", ".join(f"{plan.value} {self.plans[plan]}" for plan in Plan) + ")"]
        kept = collections.Counter(o.cause for o in self.outcomes if o.cause in HARMLESS)
        lines.append("  no loss: " + ", ".join(f"{kept[c]} {c.name.lower()}" for c in HARMLESS
                                               if kept[c]))
        lost = self.lost()
        lines.append(f"lost sign-ins: {sum(lost.values())}")
        for cause in (*sorted(UNAVOIDABLE, key=lambda c: c.name),
                      *sorted(BUGS, key=lambda c: c.name)):
            if lost[cause] or cause in UNAVOIDABLE:
                tag = "unavoidable" if cause in UNAVOIDABLE else "BUG"
                lines.append(f"  {lost[cause]:4d}  {tag:11s} {cause.value}")
        offsets = [o.kill_after_arrival for o in self.outcomes
                   if o.cause in UNAVOIDABLE and o.kill_after_arrival is not None]
        if offsets:
            longest = max((w.arrival_to_rename for w in self.windows), default=math.nan)
            lines.append("  kills inside a window came "
                         + _spread([x * 1000 for x in offsets])
                         + f" ms after the provider's arrival (longest window that reached "
                         f"the disk: {longest * 1000:.1f} ms)")
        for kind in ("refresh", "sign-in"):
            sample = [w for w in self.windows if w.kind == kind]
            if not sample:
                continue
            title = f"window per {kind} (ms, n={len(sample)})"
            lines.append(f"{title:38s} {'p50':>7} {'p99':>7} {'max':>7}")
            for label, name in _WINDOW_ROWS:
                values = sorted(getattr(w, name) * 1000 for w in sample)
                lines.append(f"  {label:36s} {_quantile(values, 0.5):7.2f} "
                             f"{_quantile(values, 0.99):7.2f} {values[-1]:7.2f}")
        for outcome in self.bugs():
            lines.append(f"BUG lane {outcome.lane} kill {outcome.number} ({outcome.plan.value}): "
                         f"{outcome.cause.value}; {outcome.detail}")
        lines.extend(f"PROBLEM {problem}" for problem in self.problems)
        lines.append("result: " + ("ok" if self.ok else "FAILED"))
        return "\n".join(lines)


def _quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _spread(values: Sequence[float]) -> str:
    ordered = sorted(values)
    return f"{ordered[0]:.1f} to {ordered[-1]:.1f} (median {_quantile(ordered, 0.5):.1f})"


# -- the state directory, watched ------------------------------------------------------


class Inotify:
    """Creations and renames in one directory, stamped with time.monotonic() as the
    event loop reads them (the provider stamps its records on the same clock)."""

    def __init__(self, directory: Path, on_event: Callable[[float, int, str], None]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(fd, os.fsencode(directory), _IN_CREATE | _IN_MOVED_TO) < 0:
            number = ctypes.get_errno()
            os.close(fd)
            raise OSError(number, f"inotify_add_watch {directory}")
        self._fd = fd
        self._on_event = on_event
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._read)

    def _read(self) -> None:
        stamp = time.monotonic()
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        while offset < len(data):
            _, mask, _, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            name = data[offset:offset + length].rstrip(b"\0").decode(errors="replace")
            offset += length
            self._on_event(stamp, mask, name)

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)


@dataclass(frozen=True)
class _Rename:
    at: float                      # monotonic
    credentials: Credentials | None  # None: replaced or gone before it could be read


@dataclass
class _Run:
    number: int
    plan: Plan
    first_record: int
    spawned: float
    before: Credentials | None
    before_lost: bool
    killed: float = 0.0
    # Access tokens in the order they appeared: the one loaded, each one renamed onto
    # the file (read at its inotify event), each one served.
    history: list[str] = field(default_factory=list)
    served: set[str] = field(default_factory=set)
    served_early: str | None = None

    def saw(self, token: str) -> None:
        if token not in self.history:
            self.history.append(token)

    def check_disk(self, held: Credentials | None) -> None:
        """The file must hold the newest token served, or one newer still."""
        token = held.tokens.access_token if held is not None else None
        if token is None or token not in self.history or self.served_early is not None:
            return  # no file is judged after the kill; a token not seen yet is newer
        position = self.history.index(token)
        newer = [i for i, t in enumerate(self.history) if t in self.served and i > position]
        if newer:
            self.served_early = (f"token #{newer[-1]} of the run was served while the file "
                                 f"held #{position}")


class Lane:
    """One agent, its state directory and its own provider, killed `kills` times."""

    def __init__(self, index: int, provider: IdentityProvider, root: Path, *, seed: int,
                 lifetime: int, report: Report, sealed: bool = False) -> None:
        self.index = index
        self.provider = provider
        self.rng = random.Random(f"{seed}/{index}")
        self.lifetime = lifetime
        self.gap = min(MIN_REFRESH_GAP, lifetime / 4)  # the agent's least time between refreshes
        self.report = report
        self.state = root / "state"
        self.store_path = self.state / CREDENTIALS
        self.socket = root / "run" / "agent.sock"
        self.log_path = root / "agent.log"
        self.config = root / "config.yaml"
        self.state.mkdir(mode=0o700, parents=True)
        # What the unit's LoadCredentialEncrypted= would deliver; one key for the lane.
        self.credentials: Path | None = None
        self.encryption = Encryption("off")
        if sealed:
            self.credentials = root / "credentials"
            self.credentials.mkdir(mode=0o700)
            (self.credentials / STORE_KEY).write_bytes(os.urandom(KEY_SIZE))
            self.encryption = Encryption(
                "required", environ={"CREDENTIALS_DIRECTORY": str(self.credentials)})
        self.run: _Run | None = None
        self.renames: list[_Rename] = []
        self.creations: list[float] = []
        self.cycles: list[float] = []  # forced refreshes: ask to answer
        self.code_after = 0.5  # start to device code request, as last seen
        self._wall_offset = time.time() - time.monotonic()
        self.config.write_text(json.dumps({  # JSON is YAML
            "provider": {"issuer": provider.issuer, "client_id": provider.settings.client_id,
                         "allow_insecure_http": True},
            "display": {"type": "none"},
            "storage": {"path": str(self.store_path),
                        "encryption": "required" if sealed else "off"},
            "api": {"socket": str(self.socket)},
            "sign_in": {"codes_per_hour": 60},
            "logging": {"level": "info"},
        }))

    # -- observation ---------------------------------------------------------------

    def on_event(self, at: float, mask: int, name: str) -> None:
        if mask & _IN_CREATE and name.startswith(f".{CREDENTIALS}."):
            self.creations.append(at)
        elif mask & _IN_MOVED_TO and name == CREDENTIALS:
            try:
                credentials = self.load()
            except StoreError:
                credentials = None  # a loader's problem is judged after the kill
            self.renames.append(_Rename(at, credentials))
            if credentials is not None and self.run is not None:
                self.run.saw(credentials.tokens.access_token)

    def load(self) -> Credentials | None:
        return CredentialStore(self.store_path, encryption=self.encryption).load()

    def valid(self, credentials: Credentials | None) -> bool:
        token = credentials.tokens.refresh_token if credentials else None
        return token is not None and self.provider.refresh_token_valid(token)

    # -- the child -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def agent(self) -> AsyncIterator[asyncio.subprocess.Process]:
        with self.log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *agent_command(self.config), env=_child_env(self.credentials), cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=log)
        try:
            yield proc
        finally:
            _signal(proc, signal.SIGKILL)
            await proc.wait()

    async def api(self, method: str, target: str) -> ApiAnswer | None:
        try:
            return await asyncio.to_thread(call, self.socket, method, target, timeout=10.0)
        except (AgentUnavailable, OSError, http.client.HTTPException):
            return None

    async def wait_signed_in(self, proc: asyncio.subprocess.Process) -> str | None:
        """None once the agent says it is signed in; else what went wrong."""
        deadline = time.monotonic() + RESTART_LIMIT
        state = "no answer"
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                return f"exited with status {proc.returncode}"
            answer = await self.api("GET", "/v1/status")
            if answer is not None and answer.ok:
                state = str(answer.body.get("state"))
                if state == "signed_in":
                    return None
            await asyncio.sleep(0.02)
        return f"still {state} after {RESTART_LIMIT:.0f} s"

    async def force_refresh(self, run: _Run) -> bool:
        """Ask for a token that needs a refresh; True when a token came. It is checked
        against the disk at once: the agent hands out only what is saved."""
        sent = time.monotonic()
        answer = await self.api("GET", f"/v1/token?min_ttl={self.lifetime - 0.1:g}")
        if answer is None or not answer.ok:
            return False
        self.cycles.append(time.monotonic() - sent)
        token = str(answer.body["access_token"])
        run.saw(token)
        run.served.add(token)
        with contextlib.suppress(StoreError):  # judged after the kill
            run.check_disk(self.load())
        return True

    async def warm_up(self, run: _Run) -> bool:
        """One forced refresh that worked, before kills are timed around refreshes."""
        deadline = time.monotonic() + RESTART_LIMIT
        while time.monotonic() < deadline:
            if await self.force_refresh(run):
                return True
            await asyncio.sleep(0.1)
        return False

    def kill_span(self) -> float:
        """Kills after a forced refresh come within this many seconds: a few of its
        round trips, so some land in the window and most around it."""
        recent = sorted(self.cycles[-50:])
        return KILL_SPAN_CYCLES * (_quantile(recent, 0.5) if recent else 0.02)

    # -- one kill ------------------------------------------------------------------

    async def kill_once(self, number: int) -> Outcome:
        plan = self.choose_plan()
        if plan is Plan.SIGN_IN:
            self.wipe()
        before = self.load_quietly()
        run = _Run(number=number, plan=plan, first_record=len(self.provider.requests),
                   spawned=time.monotonic(), before=before, before_lost=not self.valid(before))
        if before is not None:
            run.saw(before.tokens.access_token)
        self.run = run
        self.report.plans[plan] += 1
        trouble: Outcome | None = None
        async with self.agent() as proc:
            run.spawned = time.monotonic()
            if plan is Plan.REFRESH:
                trouble = await self.refresh_then_kill(proc, run)
            elif plan is Plan.SIGN_IN:
                trouble = await self.sign_in_then_kill(proc, run)
            else:
                trouble = await self.any_time_then_kill(proc, run)
        await self.settle()
        if trouble is not None:
            return trouble
        return self.classify(run)

    def choose_plan(self) -> Plan:
        spent = SessionFile(self.state / "session.json",
                            encryption=self.encryption).load().codes_spent
        if len(spent) >= CODES_BEFORE_RESET:
            return Plan.SIGN_IN
        plans = list(PLAN_WEIGHTS)
        return self.rng.choices(plans, weights=[PLAN_WEIGHTS[p] for p in plans])[0]

    def wipe(self) -> None:
        for entry in self.state.iterdir():
            entry.unlink()

    def load_quietly(self) -> Credentials | None:
        try:
            return self.load()
        except StoreError:
            return None  # reported by the kill that left it

    def kill(self, proc: asyncio.subprocess.Process, run: _Run) -> Outcome | None:
        if proc.returncode is not None:
            return self.outcome(run, Cause.EXITED, f"status {proc.returncode}; "
                                f"{self.log_tail()}")
        run.killed = time.monotonic()
        _signal(proc, signal.SIGKILL)
        return None

    async def refresh_then_kill(self, proc: asyncio.subprocess.Process, run: _Run
                                ) -> Outcome | None:
        problem = await self.wait_signed_in(proc)
        if problem is None and not await self.warm_up(run):
            problem = "no forced refresh worked"
        if problem is not None:
            cause = Cause.EXITED if proc.returncode is not None else Cause.NO_RECOVERY
            self.kill(proc, run)
            return self.outcome(run, cause, f"{problem}; {self.log_tail()}")
        for _ in range(self.rng.randint(0, 1)):
            await asyncio.sleep(self.gap + 0.15)
            await self.force_refresh(run)
        await asyncio.sleep(self.gap + 0.15)
        delay = self.rng.uniform(0.0, self.kill_span())
        reader = asyncio.create_task(self.force_refresh(run))
        await asyncio.sleep(delay)
        trouble = self.kill(proc, run)
        await reader
        return trouble

    async def sign_in_then_kill(self, proc: asyncio.subprocess.Process, run: _Run
                                ) -> Outcome | None:
        near_approval = self.rng.random() < 0.5
        fraction = self.rng.random()
        offset = self.rng.uniform(-0.02, 0.04)
        # Start-up, discovery and the code request take about as long as last time.
        at = run.spawned + fraction * (self.code_after + POLL_INTERVAL + 0.04)
        deadline = time.monotonic() + RESTART_LIMIT
        while time.monotonic() < deadline and proc.returncode is None:
            issued = next((r for r in self.provider.requests[run.first_record:]
                           if r.endpoint == "device" and r.status == 200), None)
            if issued is not None:
                self.code_after = issued.at - run.spawned
                if near_approval:
                    at = issued.at + POLL_INTERVAL + offset
                break
            if not near_approval and time.monotonic() >= at:
                break
            await asyncio.sleep(0.005)
        else:
            cause = Cause.EXITED if proc.returncode is not None else Cause.NO_RECOVERY
            self.kill(proc, run)
            return self.outcome(run, cause, f"no device code was asked for; {self.log_tail()}")
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        return self.kill(proc, run)

    async def any_time_then_kill(self, proc: asyncio.subprocess.Process, run: _Run
                                 ) -> Outcome | None:
        stop = asyncio.Event()

        async def reader() -> None:
            while not stop.is_set():
                refreshed = await self.force_refresh(run)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.gap + 0.15 if refreshed else 0.1)

        task = asyncio.create_task(reader())
        await asyncio.sleep(self.rng.uniform(0.0, ANY_TIME_SPAN))
        trouble = self.kill(proc, run)
        stop.set()
        await task
        return trouble

    async def settle(self) -> None:
        """Let requests the dying agent had already written reach the provider's
        records, and their answers be made, before anything is judged."""
        await asyncio.sleep(SETTLE)
        deadline = time.monotonic() + STOP_LIMIT
        while time.monotonic() < deadline:
            if all(r.status is not None for r in self.provider.requests):
                break
            await asyncio.sleep(0.01)

    # -- judging -------------------------------------------------------------------

    def outcome(self, run: _Run, cause: Cause, detail: str = "",
                kill_after_arrival: float | None = None) -> Outcome:
        return Outcome(self.index, run.number, run.plan, cause, detail, kill_after_arrival)

    def classify(self, run: _Run) -> Outcome:
        records = self.provider.requests[run.first_record:]
        self.collect_windows(records, run)
        try:
            after = self.load()
        except StoreError as exc:
            return self.outcome(run, Cause.UNPARSABLE, str(exc))
        run.check_disk(after)
        if run.served_early is not None:
            return self.outcome(run, Cause.SERVED_EARLY, run.served_early)
        refreshes = [r for r in records if _grant(r) == "refresh_token"]
        redeemed = [r for r in records if _grant(r) == DEVICE_GRANT and r.status == 200]
        before_token = run.before.tokens.refresh_token if run.before else None
        token = after.tokens.refresh_token if after else None

        def in_window(cause: Cause, record: RecordedRequest) -> Outcome:
            return self.outcome(run, cause, kill_after_arrival=run.killed - record.at)

        if token is not None and self.provider.refresh_token_valid(token):
            return self.outcome(run, Cause.KEPT)
        if not run.before_lost and after is None:
            return self.outcome(run, Cause.VANISHED)
        if not run.before_lost and token is None:
            return self.outcome(run, Cause.DROPPED)
        if run.before_lost and (token is None or token == before_token):
            # A new sign-in was needed; the file holds nothing newer than the dead one.
            if redeemed:
                return in_window(Cause.REDEMPTION, redeemed[-1])
            return self.outcome(run, Cause.NOT_SIGNED_IN if after is None else Cause.STILL_LOST)
        assert token is not None
        rotated = [r for r in refreshes if r.status == 200 and r.form.get("refresh_token") == token]
        if rotated and rotated[-1] is refreshes[-1]:
            return in_window(Cause.ROTATION, rotated[-1])
        if rotated:
            return self.outcome(run, Cause.STALE, f"{len(refreshes)} refreshes in the run; "
                                f"the one of the token on disk was #"
                                f"{refreshes.index(rotated[-1]) + 1}")
        earlier = [r for r in self.provider.requests[:run.first_record]
                   if _grant(r) == "refresh_token" and r.form.get("refresh_token") == token]
        revoked = any(r.endpoint == "revoke" and r.form.get("token") == token
                      for r in self.provider.requests)
        return self.outcome(run, Cause.REFUSED, "rotated in an earlier run" if earlier else
                            "revoked" if revoked else "never rotated nor revoked")

    def collect_windows(self, records: Sequence[RecordedRequest], run: _Run) -> None:
        token_requests = [r for r in records if r.endpoint == "token"]
        for position, record in enumerate(token_requests):
            kind = {"refresh_token": "refresh", DEVICE_GRANT: "sign-in"}.get(_grant(record) or "")
            if kind is None or record.status != 200:
                continue
            later = token_requests[position + 1:]
            until = later[0].at if later else (run.killed or math.inf)
            rename = next((r for r in self.renames if record.at <= r.at < until), None)
            if rename is None:
                continue  # killed before it reached the disk
            created = next((t for t in self.creations if record.at <= t <= rename.at),
                           rename.at)
            sent = (rename.credentials.tokens.issued_at - self._wall_offset
                    if rename.credentials is not None else record.at)
            self.report.windows.append(Window(
                kind=kind, arrival_to_rename=rename.at - record.at,
                arrival_to_temp=created - record.at, temp_to_rename=rename.at - created,
                sent_to_rename=rename.at - sent))

    # -- the end ---------------------------------------------------------------------

    async def final_check(self) -> list[str]:
        """A last start: signed in again, a refresh that reaches the disk, a clean
        stop on SIGTERM, and no temporary file left."""
        problems: list[str] = []
        before = self.load_quietly()
        run = _Run(number=0, plan=Plan.REFRESH, first_record=len(self.provider.requests),
                   spawned=time.monotonic(), before=before, before_lost=not self.valid(before))
        if before is not None:
            run.saw(before.tokens.access_token)
        self.run = run
        async with self.agent() as proc:
            problem = await self.wait_signed_in(proc)
            if problem is None and not await self.warm_up(run):
                problem = "no forced refresh worked"
            if problem is not None:
                problems.append(f"final start: {problem}")
            _signal(proc, signal.SIGTERM)
            try:
                status = await asyncio.wait_for(proc.wait(), STOP_LIMIT)
            except TimeoutError:
                status = None
            if status != 0:
                problems.append(f"final stop: exit status {status}")
        try:
            held = self.load()
        except StoreError as exc:
            problems.append(f"after the final stop: {exc}")
        else:
            run.check_disk(held)
            if not self.valid(held):
                problems.append("after the final stop: the stored refresh token is refused")
        if run.served_early is not None:
            problems.append(f"final start: {run.served_early}")
        leftovers = [p.name for p in self.state.iterdir() if p.name.endswith(".tmp")]
        if leftovers:
            problems.append(f"temporary files left after a clean stop: {leftovers}")
        return [f"lane {self.index}: {p}; {self.log_tail()}" for p in problems]

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "no agent log"
        return "agent log: " + " | ".join(text.strip().splitlines()[-lines:])


def _signal(proc: asyncio.subprocess.Process, number: int) -> None:
    # Not proc.send_signal(): Popen polls first, and a child that has just died is then
    # reaped there, so asyncio's watcher finds no child and reports status 255. The pid
    # cannot be reused before the watcher reaps it.
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, number)


def _grant(record: RecordedRequest) -> str | None:
    return record.form.get("grant_type") if record.endpoint == "token" else None


def agent_command(config: Path) -> list[str]:
    """`device-agent run` from the virtual environment this runs in."""
    script = Path(sys.executable).with_name("device-agent")
    if script.exists():
        return [str(script), "run", "--config", str(config)]
    return [sys.executable, "-m", "agent.cli", "run", "--config", str(config)]


@contextlib.contextmanager
def _workdir(parent: Path | None) -> Iterator[Path]:
    if parent is not None:
        yield parent
        return
    path = Path(tempfile.mkdtemp(prefix="da-crash-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def _lane(index: int, kills: int, root: Path, *, seed: int, lifetime: int,
                report: Report, echo: Callable[[str], None], sealed: bool) -> None:
    settings = ProviderSettings(access_token_lifetime=lifetime, rotate_refresh_tokens=True,
                                interval=POLL_INTERVAL, code_lifetime=600.0,
                                device_requests_per_hour=1_000_000)
    async with serve_provider(settings) as provider:
        provider.auto_approve(0.0)
        lane = Lane(index, provider, root, seed=seed, lifetime=lifetime, report=report,
                    sealed=sealed)
        watcher = Inotify(lane.state, lane.on_event)
        try:
            for number in range(1, kills + 1):
                outcome = await lane.kill_once(number)
                report.outcomes.append(outcome)
                echo(f"lane {index} kill {number:3d} {outcome.plan.value:8s} "
                     f"{outcome.cause.name.lower()}"
                     + (f" (+{outcome.kill_after_arrival * 1000:.1f} ms)"
                        if outcome.kill_after_arrival is not None else "")
                     + (f": {outcome.detail}" if outcome.detail else ""))
            report.problems.extend(await lane.final_check())
        finally:
            watcher.close()


async def run(kills: int, seed: int, *, lanes: int = 2, lifetime: int = 2,
              workdir: Path | None = None, command: str = "",
              echo: Callable[[str], None] = lambda line: None,
              sealed: bool = False) -> Report:
    """Kill `kills` agents, spread over `lanes` agents side by side (each with its own
    provider and state directory), and judge every kill; `sealed`: with a store key."""
    if kills < lanes:
        lanes = max(1, kills)
    report = Report(seed=seed, kills=kills, lanes=lanes, lifetime=lifetime, command=command,
                    sealed=sealed)
    started = time.monotonic()
    share = [kills // lanes + (1 if i < kills % lanes else 0) for i in range(lanes)]
    with _workdir(workdir) as root:
        await asyncio.gather(*(
            _lane(i, share[i], root / f"lane{i}", seed=seed, lifetime=lifetime, report=report,
                  echo=echo, sealed=sealed) for i in range(lanes)))
    report.outcomes.sort(key=lambda o: (o.lane, o.number))
    report.elapsed = time.monotonic() - started
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None,
                        help="RNG seed (default: a random one, printed)")
    parser.add_argument("--lanes", type=int, default=2,
                        help="agents killed side by side, each with its own provider")
    parser.add_argument("--lifetime", type=int, default=2, metavar="SECONDS",
                        help="access token lifetime at the provider")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep state directories and agent logs in DIR (must not exist)")
    parser.add_argument("--sealed", action="store_true",
                        help="the sealed store format: each agent gets a store key "
                             "($CREDENTIALS_DIRECTORY/store-key), storage.encryption: required")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per kill")
    args = parser.parse_args(argv)
    if args.lifetime < 1 or args.kills < 1 or args.lanes < 1:
        parser.error("--kills, --lanes and --lifetime must be at least 1")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    command = shlex.join([".venv/bin/python", "bench/crash_consistency.py",
                          "--kills", str(args.kills), "--seed", str(seed),
                          "--lanes", str(args.lanes), "--lifetime", str(args.lifetime),
                          *(["--sealed"] if args.sealed else [])])
    if args.keep is not None:
        args.keep.mkdir(parents=True)
    echo: Callable[[str], None] = (lambda line: print(line, flush=True)) if args.verbose else (
        lambda line: None)
    echo(f"$ {command}")
    report = asyncio.run(run(args.kills, seed, lanes=args.lanes, lifetime=args.lifetime,
                             workdir=args.keep, command=command, echo=echo,
                             sealed=args.sealed))
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
