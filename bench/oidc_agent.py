"""device-agent beside oidc-agent (Debian's `oidc-agent` package), measured alike.

Both sign in with the device flow against the same test provider, served by this
process on loopback (in a thread, so that the timed runs can block in wait4 as in
`token_cli.py`), each code approved from here with `idp.approve()`:

- device-agent: `device-agent run` in a child process, from a non-editable install in
  a temporary venv (`pip install .`, as the Pi guide installs it; `--editable` takes
  the project's venv instead);
- oidc-agent: `oidc-agent` started here with its socket in a temporary directory,
  `oidc-gen --flow=device` driven by flags alone (`--prompt=none`, `--pw-env`,
  `--confirm-yes`, `--no-url-call`), HOME, TMPDIR and OIDC_CONFIG_DIR all temporary.

Figures:

1. the daemon's resident memory once signed in: VmRSS summed over the daemon and its
   descendants (oidc-agent runs a proxy and a daemon), settled; again after the runs,
   with the peak (VmHWM);
2. a cached token read from a shell script: `sh -c 'device-agent token'` against
   `sh -c 'oidc-token bench'`, interleaved, median and p10-p90 of wall time;
3. a forced refresh round trip with short-lived tokens: `device-agent token --min-ttl`
   against `oidc-token --time`; once with refresh-token rotation (authentik's default)
   and once without, since oidc-agent rewrites its encrypted account file whenever the
   refresh token changes. Every run must make the provider see a refresh.

oidc-agent 4.2.6 does not URL-encode its form bodies, so authentik's punctuated device
codes reach the provider mangled and the sign-in fails with invalid_grant; the provider
issues device codes of letters and digits here (`device_code_alphabet`).

    .venv/bin/python bench/oidc_agent.py [--runs 50] [--refresh-runs 30] [--editable]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from installed import plain_install, service_environment
from timing import agent_state, run_once, spread

from agent import __version__
from agent.idp import IdentityProvider, ProviderSettings, serve_provider

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "bench"
SCOPES = "openid profile email offline_access"
LONG_LIFETIME = 3600    # the cached reads: no refresh may fall among them
SHORT_LIFETIME = 4      # the refreshes: device-agent's refresh gap is a quarter of it
PATIENCE = 60.0         # a guard against a hung tool, never a measure
REFRESH_SPACING = 1.05  # s: see the forced refreshes in _measure
OIDC_TOOLS = ("oidc-agent", "oidc-gen", "oidc-token")
EX_UNAVAILABLE = 69
PR_SET_CHILD_SUBREAPER = 36

T = TypeVar("T")


# -- the provider, in a thread of its own ---------------------------------------------

class ProviderThread:
    """serve_provider on an event loop in a thread: the main thread blocks in wait4
    while the provider answers the refreshes it is timing."""

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._idp: IdentityProvider | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="provider", daemon=True)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # handed to the main thread, which reports it
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with serve_provider(self.settings) as idp:
            self._idp = idp
            self._ready.set()
            await self._stop.wait()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(PATIENCE)
        if self._idp is None:
            raise RuntimeError(f"the test provider did not start: {self._error!r}")

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(PATIENCE)

    def call(self, fn: Callable[[IdentityProvider], T]) -> T:
        """`fn(idp)` on the provider's loop: its dicts are not for two threads at once."""
        assert self._idp is not None
        idp = self._idp

        async def on_loop() -> T:
            return fn(idp)

        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result(PATIENCE)

    def tune(self, **knobs: Any) -> None:
        """Changes ProviderSettings while it runs; it reads them on every request."""
        def apply(idp: IdentityProvider) -> None:
            for name, value in knobs.items():
                if not hasattr(idp.settings, name):
                    raise AttributeError(f"ProviderSettings has no {name}")
                setattr(idp.settings, name, value)

        self.call(apply)

    def token_valid(self, token: str) -> bool:
        return self.call(lambda idp: idp.access_token_valid(token))

    @property
    def issuer(self) -> str:
        return self.call(lambda idp: idp.issuer)

    def refreshes(self) -> int:
        """Refreshes the provider has answered with tokens so far."""
        return self.call(lambda idp: sum(
            1 for r in idp.requests if r.endpoint == "token" and r.status == 200
            and r.form.get("grant_type") == "refresh_token"))

    def approve_next(self, alive: Callable[[], bool], who: str) -> None:
        """Approves the first code that shows up, as a person at the page would."""
        deadline = time.monotonic() + PATIENCE
        while not (codes := self.call(lambda idp: idp.pending_user_codes())):
            if time.monotonic() > deadline or not alive():
                raise RuntimeError(f"{who} asked for no device code")
            time.sleep(0.01)
        self.call(lambda idp: idp.approve(codes[0]))


# -- processes --------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _family(pid: int) -> list[int]:
    """`pid` and every descendant of it."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def _rss_kib(pids: list[int], name: str = "VmRSS") -> dict[int, int]:
    sizes = {}
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith(name + ":"):
                sizes[pid] = int(line.split()[1])
    return sizes


def _output(argv: list[str], env: dict[str, str], what: str) -> str:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=PATIENCE)
    if done.returncode != 0:
        raise RuntimeError(f"{what} exited {done.returncode}: "
                           f"{(done.stderr or done.stdout).strip()[-500:]}")
    return done.stdout


def _reap(pids: list[int]) -> None:
    """Waits for `pids` to go; zombies that were ours (we are their subreaper) are
    collected, and what is still there after a while gets SIGKILL."""
    deadline = time.monotonic() + 10
    while True:
        left = []
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    continue
            if Path(f"/proc/{pid}").exists() and "\nState:\tZ" not in _status(pid):
                left.append(pid)
        if not left:
            return
        if time.monotonic() > deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
        time.sleep(0.05)


def _status(pid: int) -> str:
    try:
        return "\n" + Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""


# -- the two tools ----------------------------------------------------------------------

@dataclass
class DeviceAgent:
    program: Path
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.workdir / "agent.sock"

    @property
    def credentials(self) -> Path:
        return self.workdir / "state" / "credentials.json"

    def start(self, issuer: str, client_id: str) -> None:
        config = self.workdir / "config.yaml"
        config.write_text(json.dumps({  # JSON is YAML
            "provider": {"issuer": issuer, "client_id": client_id,
                         "allow_insecure_http": True},
            # No display: oidc-agent has none either (oidc-gen prints the code).
            "display": {"type": "none"},
            "storage": {"path": str(self.credentials)},
            "api": {"socket": str(self.socket)},
            "logging": {"level": "info"},
        }))
        env = service_environment()
        env["HOME"] = str(self.workdir)
        with (self.workdir / "agent.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self.program), "run", "--config", str(config)], env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def state(self) -> str | None:
        return agent_state(self.socket)

    def wait_signed_in(self) -> None:
        deadline = time.monotonic() + PATIENCE
        while self.state() != "signed_in":
            if time.monotonic() > deadline or not self.alive():
                raise RuntimeError("device-agent did not sign in; its log:\n"
                                   + self.log_tail())
            time.sleep(0.05)

    def log_tail(self) -> str:
        lines = (self.workdir / "agent.log").read_text(errors="replace").splitlines()
        return "\n".join(lines[-15:])

    def pids(self) -> list[int]:
        assert self.proc is not None
        return _family(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class OidcAgent:
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    daemon: int | None = None
    started: list[int] = field(default_factory=list)

    @property
    def config_dir(self) -> Path:
        return self.workdir / "home" / ".config" / "oidc-agent"

    @property
    def account_file(self) -> Path:
        return self.config_dir / ACCOUNT

    def start(self) -> None:
        home = self.workdir / "home"
        self.config_dir.mkdir(parents=True, mode=0o700)
        (self.workdir / "tmp").mkdir(mode=0o700)
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                    "TMPDIR": str(self.workdir / "tmp"),
                    "OIDC_CONFIG_DIR": str(self.config_dir)}
        # It daemonizes, and prints where it listens and the daemon's pid.
        out = _output(["oidc-agent", "--json", "--socket-path",
                       str(self.workdir / "oidc-agent.sock")], self.env, "oidc-agent")
        answer = json.loads(out)
        self.daemon = int(answer["dpid"])
        self.started = _family(self.daemon)
        self.env |= {"OIDC_SOCK": answer["socket"], "OIDCD_PID": str(self.daemon)}

    def sign_in(self, provider: ProviderThread) -> None:
        """`oidc-gen` with every answer given as a flag: no prompt is left to answer.
        A public client has no secret, but oidc-gen insists on being told so."""
        log = self.workdir / "oidc-gen.log"
        argv = ["oidc-gen", ACCOUNT, "--flow=device", f"--issuer={provider.issuer}",
                f"--client-id={provider.settings.client_id}", "--client-secret=",
                f"--scope={SCOPES}", "--pw-env=OIDC_ENCRYPTION_PW", "--prompt=none",
                "--confirm-yes", "--no-url-call"]
        # A throwaway password: the account file is encrypted with it, as on a laptop.
        env = self.env | {"OIDC_ENCRYPTION_PW": "bench-only-" + os.urandom(8).hex()}
        with log.open("wb") as out:
            gen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT)
            try:
                provider.approve_next(lambda: gen.poll() is None, "oidc-gen")
                status = gen.wait(PATIENCE)
            finally:
                if gen.poll() is None:
                    gen.kill()
                    gen.wait()
        if status != 0:
            text = log.read_text(errors="replace").splitlines()
            raise RuntimeError(f"oidc-gen exited {status}:\n" + "\n".join(
                line for line in text[-15:] if "\x1b[" not in line))  # not the QR code
        if not self.account_file.exists():
            raise RuntimeError(f"oidc-gen wrote no account file in {self.config_dir}")

    def pids(self) -> list[int]:
        assert self.daemon is not None
        return _family(self.daemon)

    def stop(self) -> None:
        if self.daemon is None:
            return
        pids = sorted(set(self.pids()) | set(self.started))
        # Its own way out: SIGTERM to OIDCD_PID, which takes its child along.
        with contextlib.suppress(OSError, subprocess.TimeoutExpired, RuntimeError):
            _output(["oidc-agent", "--kill"], self.env, "oidc-agent --kill")
        _reap(pids)
        self.daemon = None


# -- figures ----------------------------------------------------------------------------

@dataclass
class Spread:
    values: list[float]   # ms

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def text(self) -> str:
        ms = sorted(self.values)
        _, p10, p90 = spread(ms)
        return f"{self.median:.1f} ({p10:.1f}-{p90:.1f}) ms"


def _settled_rss(tools: dict[str, Callable[[], list[int]]]) -> dict[str, dict[int, int]]:
    """VmRSS per process once it has stopped moving: the largest of the last two of
    three samples a second apart (as bench/daemon.py does), for every tool at once."""
    samples: dict[str, list[dict[int, int]]] = {name: [] for name in tools}
    for _ in range(3):
        time.sleep(1.0)
        for name, pids in tools.items():
            samples[name].append(_rss_kib(pids()))
    return {name: max(taken[-2:], key=lambda s: sum(s.values()))
            for name, taken in samples.items()}


def _signature(path: Path) -> tuple[int, int]:
    # Inode and mtime: an atomic rename changes the first, a rewrite in place the second.
    info = path.stat()
    return info.st_ino, info.st_mtime_ns


@dataclass
class Phase:
    times: dict[str, Spread]
    refreshes: dict[str, int]   # answered by the provider, per tool
    rewrites: dict[str, int]    # runs after which the tool's watched file had changed


def _interleaved(cases: dict[str, list[str]], env: dict[str, str], runs: int, *,
                 spacing: dict[str, float] | None = None,
                 provider: ProviderThread | None = None,
                 watch: dict[str, Path] | None = None) -> Phase:
    """`runs` rounds of every case, the order swapped each round so that neither always
    follows the other. `spacing`: the least seconds from the end of one run of a case
    to the start of its next. With `provider`, every run must make it answer a
    refresh: one that made none did not measure a refresh, and stops the benchmark."""
    spacing, watch = spacing or {}, watch or {}
    times: dict[str, list[float]] = {name: [] for name in cases}
    refreshes, rewrites = dict.fromkeys(cases, 0), dict.fromkeys(cases, 0)
    ready_at = dict.fromkeys(cases, 0.0)
    names = list(cases)
    for round_ in range(runs):
        for name in names if round_ % 2 == 0 else names[::-1]:
            if (wait := ready_at[name] - time.monotonic()) > 0:
                time.sleep(wait)
            before = provider.refreshes() if provider is not None else 0
            written = _signature(watch[name]) if name in watch else None
            times[name].append(run_once(cases[name], env) * 1000)
            ready_at[name] = time.monotonic() + spacing.get(name, 0.0)
            if written is not None and _signature(watch[name]) != written:
                rewrites[name] += 1
            if provider is not None:
                made = provider.refreshes() - before
                if made < 1:
                    raise RuntimeError(f"{name}: forced refresh {round_ + 1} made none "
                                       "at the provider")
                refreshes[name] += made
    return Phase({name: Spread(values) for name, values in times.items()}, refreshes,
                 rewrites)


# -- the rest ---------------------------------------------------------------------------

def _cpu_model() -> str:
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    # x86 names the CPU; a Raspberry Pi only names the board.
    return fields.get("model name") or fields.get("Model") or fields.get("Hardware") or "?"


def _oidc_version() -> str:
    first = _output(["oidc-agent", "--version"], dict(os.environ), "oidc-agent").strip()
    first = first.splitlines()[0] if first else "oidc-agent ?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        package = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "oidc-agent-cli"],
            capture_output=True, text=True, timeout=10).stdout.strip()
        if package:
            return f"{first} (Debian package {package})"
    return first


def _mib(sizes: dict[int, int]) -> float:
    return sum(sizes.values()) / 1024


def _ratio(ours: float, theirs: float) -> str:
    if theirs <= 0:
        return "-"
    ratio = ours / theirs
    return f"{ratio:.2f}x" if ratio < 1 else f"{ratio:.1f}x"


def _pair(ours: float, theirs: float) -> tuple[str, str, str]:
    return f"{ours:.1f}", f"{theirs:.1f}", _ratio(ours, theirs)


def _subreaper() -> None:
    """Adopt what oidc-agent's double fork orphans, so that it can be reaped here once
    stopped (a container's init may never collect it)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap_orphans() -> None:
    """Collects what the subreaper adopted: oidc-agent's intermediate fork."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass


def _command_line(args: argparse.Namespace) -> str:
    line = f"$ python bench/oidc_agent.py --runs {args.runs} --refresh-runs {args.refresh_runs}"
    return line + (" --editable" if args.editable else "")


def _measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    if args.editable:
        program = ROOT / ".venv" / "bin" / "device-agent"
    else:
        install = tmp / "install"
        install.mkdir()
        program = plain_install(install) / "device-agent"
    settings = ProviderSettings(interval=1, access_token_lifetime=LONG_LIFETIME,
                                device_code_alphabet=string.ascii_letters + string.digits)
    provider = ProviderThread(settings)
    provider.start()
    (tmp / "device-agent").mkdir()
    ours = DeviceAgent(program, tmp / "device-agent")
    theirs = OidcAgent(tmp / "oidc-agent")
    figures: dict[str, Any] = {}
    try:
        ours.start(provider.issuer, settings.client_id)
        provider.approve_next(ours.alive, "device-agent")
        ours.wait_signed_in()
        theirs.start()
        theirs.sign_in(provider)

        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp),
               "DEVICE_AGENT_SOCKET": str(ours.socket), "OIDC_SOCK": theirs.env["OIDC_SOCK"]}
        da, ot = shlex.quote(str(program)), shlex.quote(shutil.which("oidc-token") or "")
        # One read each, looked at: the token is the provider's own, and a live one.
        for name, argv in (("device-agent", [str(program), "token"]),
                           ("oidc-agent", ["oidc-token", ACCOUNT])):
            token = _output(argv, env | theirs.env, f"{name}'s first token").strip()
            if not provider.token_valid(token):
                raise RuntimeError(f"{name} served a token the provider does not know")

        rss = _settled_rss({"device-agent": ours.pids, "oidc-agent": theirs.pids})
        figures["rss_signed_in"] = rss
        figures["hwm_signed_in"] = {"device-agent": _rss_kib(ours.pids(), "VmHWM"),
                                    "oidc-agent": _rss_kib(theirs.pids(), "VmHWM")}

        cached = {"device-agent": ["/bin/sh", "-c", f"{da} token"],
                  "oidc-agent": ["/bin/sh", "-c", f"{ot} {ACCOUNT}"]}
        for argv in cached.values():  # warm the page cache
            run_once(argv, env)
        before = provider.refreshes()
        figures["cached"] = _interleaved(cached, env, args.runs)
        figures["cached_refreshes"] = provider.refreshes() - before

        # Short tokens from here: the next refresh of each brings one.
        provider.tune(access_token_lifetime=float(SHORT_LIFETIME))
        _output([str(program), "refresh"], env, "device-agent refresh")
        _output(["oidc-token", "--force-new", ACCOUNT], env, "oidc-token --force-new")
        # device-agent refuses a min_ttl that no token of this provider can meet
        # (exit 2), so it asks for the longest it accepts, a second short of the
        # lifetime: the token it holds falls below that a second after its refresh,
        # which is also its refresh gap (a quarter of the lifetime), hence the spacing.
        # oidc-token takes more than the lifetime and refreshes on every call.
        shown = {"device-agent": f"device-agent token --min-ttl {SHORT_LIFETIME - 1}",
                 "oidc-agent": f"oidc-token --time={SHORT_LIFETIME + 1} {ACCOUNT}"}
        forced = {"device-agent": ["/bin/sh", "-c",
                                   f"{da} token --min-ttl {SHORT_LIFETIME - 1}"],
                  "oidc-agent": ["/bin/sh", "-c",
                                 f"{ot} --time={SHORT_LIFETIME + 1} {ACCOUNT}"]}
        spacing = {"device-agent": REFRESH_SPACING}
        watch = {"device-agent": ours.credentials, "oidc-agent": theirs.account_file}
        for rotate in (True, False):
            provider.tune(rotate_refresh_tokens=rotate)
            time.sleep(REFRESH_SPACING)  # since device-agent's last refresh
            figures["rotating" if rotate else "kept"] = _interleaved(
                forced, env, args.refresh_runs, spacing=spacing, provider=provider,
                watch=watch)
        figures["rss_end"] = _settled_rss({"device-agent": ours.pids,
                                           "oidc-agent": theirs.pids})
        # The peak shows what a sample between runs cannot: memory held for a moment
        # and given back (oidc-agent derives the key of its encrypted account file with
        # 64 MiB, at sign-in and whenever a refresh brings a new refresh token).
        figures["hwm_end"] = {"device-agent": _rss_kib(ours.pids(), "VmHWM"),
                              "oidc-agent": _rss_kib(theirs.pids(), "VmHWM")}
        figures["shown"] = shown
    finally:
        theirs.stop()
        ours.stop()
        provider.stop()
    return figures


def _report(args: argparse.Namespace, figures: dict[str, Any], wall: float) -> None:
    print(_command_line(args))
    install = "project venv, editable" if args.editable else "pip install . in a temporary venv"
    print(f"device-agent {__version__} ({install}; Python {sys.version.split()[0]})")
    print(_oidc_version())
    print(f"machine: nproc {len(os.sched_getaffinity(0))}, {_cpu_model()}; 1-min load "
          f"average {figures['load'][0]:.2f} at the start, {figures['load'][1]:.2f} at "
          "the end")
    print("provider: agent.idp serve_provider on 127.0.0.1, device flow, poll interval 1 s;\n"
          "  device codes of letters and digits (ProviderSettings.device_code_alphabet):\n"
          "  oidc-agent 4.2.6 does not URL-encode its form bodies, and on authentik's\n"
          "  punctuated codes (the provider's default) its sign-in fails with invalid_grant")
    print()
    signed_in, end = figures["rss_signed_in"], figures["rss_end"]
    rows = [("1. daemon RSS signed in (MiB)",
             *_pair(_mib(signed_in["device-agent"]), _mib(signed_in["oidc-agent"])))]
    labels = {"cached": "2. cached token (ms)", "rotating": "3. forced refresh (ms)",
              "kept": "3b. forced refresh, no rotation (ms)"}
    for key, label in labels.items():
        times = figures[key].times
        ours, theirs = times["device-agent"], times["oidc-agent"]
        rows.append((label, ours.text(), theirs.text(), _ratio(ours.median, theirs.median)))
    rows.append(("   daemon RSS after the runs (MiB)",
                 *_pair(_mib(end["device-agent"]), _mib(end["oidc-agent"]))))
    peak = figures["hwm_end"]
    rows.append(("   daemon peak RSS, VmHWM (MiB)",
                 *_pair(_mib(peak["device-agent"]), _mib(peak["oidc-agent"]))))
    header = ("figure", "device-agent", "oidc-agent", "ratio")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
    print()
    theirs_rss = signed_in["oidc-agent"]
    shown, runs = figures["shown"], args.refresh_runs
    print("ratio: device-agent / oidc-agent; times: median (p10-p90) of wall time per call,\n"
          "run as `sh -c 'COMMAND'`, stdout to /dev/null")
    print(f"1.  VmRSS summed over the daemon's processes, settled, after sign-in and one token\n"
          f"    read: device-agent {len(signed_in['device-agent'])} process (display.type "
          f"none), oidc-agent {len(theirs_rss)} ("
          + " + ".join(f"{kib / 1024:.1f}" for kib in theirs_rss.values()) + " MiB)")
    hwm = figures["hwm_signed_in"]
    print("    VmHWM: the peak of each process since it started, summed, read after the runs;"
          f"\n    once signed in it was device-agent {_mib(hwm['device-agent']):.1f} MiB, "
          f"oidc-agent {_mib(hwm['oidc-agent']):.1f} MiB")
    print(f"2.  {args.runs} interleaved runs each of `device-agent token` and `oidc-token "
          f"{ACCOUNT}`, {LONG_LIFETIME} s tokens;\n"
          f"    refreshes at the provider meanwhile: {figures['cached_refreshes']}")
    print(f"3.  {runs} interleaved runs each of `{shown['device-agent']}` (the longest min_ttl "
          f"it\n    accepts; each run {REFRESH_SPACING} s after its last: its refresh gap) "
          f"and `{shown['oidc-agent']}`,\n    {SHORT_LIFETIME} s tokens; the provider "
          "rotates refresh tokens (authentik's default)")
    print("3b. as 3., the provider keeps the refresh token (rotate_refresh_tokens=False)")
    for key, label in (("rotating", "3. "), ("kept", "3b.")):
        phase: Phase = figures[key]
        print(f"{label} refreshes answered: device-agent {phase.refreshes['device-agent']}, "
              f"oidc-agent {phase.refreshes['oidc-agent']}; files rewritten: device-agent's "
              f"credentials\n    after {phase.rewrites['device-agent']}/{runs} runs, "
              f"oidc-agent's encrypted account file after "
              f"{phase.rewrites['oidc-agent']}/{runs}")
    print(f"wall time: {wall:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50,
                        help="cached reads per tool (default: 50)")
    parser.add_argument("--refresh-runs", type=int, default=30,
                        help="forced refreshes per tool, with and without rotation; "
                        "about 1.1 s each (default: 30)")
    parser.add_argument("--editable", action="store_true",
                        help="time the project's editable venv instead of a pip install")
    args = parser.parse_args()
    missing = [tool for tool in OIDC_TOOLS if shutil.which(tool) is None]
    if missing:
        print(f"oidc-agent is not installed (no {', '.join(missing)} on PATH); on Debian: "
              "apt-get install -y --no-install-recommends oidc-agent", file=sys.stderr)
        return EX_UNAVAILABLE
    _subreaper()
    started, load = time.monotonic(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="da-oidc-bench-") as tmp:
        try:
            figures = _measure(args, Path(tmp))
        except RuntimeError as exc:
            print(f"bench/oidc_agent.py: {exc}", file=sys.stderr)
            return 1
        finally:
            _reap_orphans()
    # Other work on the machine moves the times more than anything measured here.
    figures["load"] = (load, os.getloadavg()[0])
    _report(args, figures, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
