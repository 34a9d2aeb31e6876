"""The daemon's own costs: start-up to READY, resident memory, idle wakeups, and the
time from a person's approval to a served token.

`device-agent run` runs in a child process, as systemd starts it (a listener on
`NOTIFY_SOCKET` receives READY=1), against the test provider served by this process on
loopback, in each of `--setups`: `console` (stdout not a terminal, as under systemd);
`oled`, an SSD1306 on an I2C bus that does not exist (luma is loaded and the panel
retried, as on a device whose panel came loose); `console-sealed`, the console with a
store key delivered in $CREDENTIALS_DIRECTORY and `storage.encryption: required`;
`console-mqtt`, the console publishing to a real Mosquitto on loopback (the `mqtt`
extra: aiomqtt, paho-mqtt). The setups' difference is what each extra costs.

1. Sign-in: the provider approves `--approve-after` seconds after a code is issued;
   the time from that approval to the first `GET /v1/token` answered 200 is reported.
2. Resident memory (VmRSS) settled after sign-in; then after 1,000 sequential
   connect-and-close cycles, 200 concurrent connections held and closed, and 10,000
   token requests from 50 keep-alive clients.
3. Idle: CPU time and context switches (wakeups) over `--idle` seconds while signed in.
4. Cold start: `--starts` restarts with the credentials on disk; spawn to READY=1.

Beside them, the import floor: a bare interpreter with aiohttp, aiohttp.web and yaml
imported, the libraries every configuration loads before the agent's own modules.

    .venv/bin/python bench/daemon.py [--idle 60] [--starts 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from installed import plain_install, service_environment
from timing import spread

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.idp import IdentityProvider, ProviderSettings, serve_provider
from tests.mosquitto import Mosquitto, missing

REPO = Path(__file__).resolve().parents[1]
TOKEN_REQUEST = b"GET /v1/token HTTP/1.1\r\nHost: agent\r\n\r\n"
PATIENCE = 60.0  # a guard against a hung agent, never a measure

# What each configuration runs with: the display, and whether the store is sealed (a
# store key delivered in $CREDENTIALS_DIRECTORY, as systemd's LoadCredentialEncrypted=
# does, so the `sealed` extra's cryptography is loaded).
SETUPS: dict[str, dict[str, Any]] = {
    "console": {"display": {"type": "console"}},
    "oled": {"display": {"type": "ssd1306", "options": {"interface": "i2c", "port": 99}}},
    "console-sealed": {"display": {"type": "console"}, "sealed": True},
    "console-mqtt": {"display": {"type": "console"}, "mqtt": True},
}


def _status_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _switches(pid: int) -> int:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                total += int(line.split()[1])
    return total


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return int(status_line.split()[1]), await reader.readexactly(length)


async def _get(path: Path, target: str) -> tuple[int, bytes] | None:
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return None
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
                     .encode())
        return await _answer(reader)
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        return None
    finally:
        writer.close()


class Agent:
    def __init__(self, workdir: Path, idp: IdentityProvider, setup: dict[str, Any],
                 program: Path, broker: Mosquitto | None = None) -> None:
        self.workdir = workdir
        self.program = program
        self.credentials: Path | None = None
        if setup.get("sealed"):
            self.credentials = workdir / "credentials"
            self.credentials.mkdir(mode=0o700)
            (self.credentials / "store-key").write_bytes(os.urandom(32))
        self.socket = workdir / "agent.sock"
        self.notify = workdir / "notify.sock"
        self.config = workdir / "config.yaml"
        config: dict[str, Any] = {
            "provider": {"issuer": idp.issuer, "client_id": idp.settings.client_id,
                         "allow_insecure_http": True},
            "display": setup["display"],
            "storage": {"path": str(workdir / "state" / "credentials.json"),
                        "encryption": "required" if setup.get("sealed") else "auto"},
            "api": {"socket": str(self.socket)},
            "logging": {"level": "info"},
        }
        if setup.get("mqtt"):
            assert broker is not None
            password = workdir / "mqtt-password"
            password.write_text(broker.users["device"] + "\n")
            password.chmod(0o600)
            config["mqtt"] = {"host": broker.host, "port": broker.port, "username": "device",
                              "password_file": str(password), "client_id": "bench-device",
                              "base_topic": "device-agent/bench-device"}
        self.config.write_text(json.dumps(config))  # JSON is YAML
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Spawns the agent; returns seconds from spawn to READY=1."""
        self.notify.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(str(self.notify))
        listener.settimeout(PATIENCE)
        env = service_environment(self.credentials)
        env["NOTIFY_SOCKET"] = str(self.notify)
        log = (self.workdir / "agent.log").open("ab")
        try:
            started = time.perf_counter()
            self.proc = subprocess.Popen(
                [str(self.program), "run", "--config",
                 str(self.config)], env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=log)
            while True:
                message = listener.recv(4096)
                if b"READY=1" in message.split(b"\n"):
                    return time.perf_counter() - started
        finally:
            listener.close()
            log.close()

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(PATIENCE)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mib(self) -> float:
        return _status_kib(self.pid, "VmRSS") / 1024

    async def state(self) -> str | None:
        answer = await _get(self.socket, "/v1/status")
        if answer is None or answer[0] != 200:
            return None
        return str(json.loads(answer[1])["state"])

    async def until(self, what: str, holds: Any) -> None:
        async with asyncio.timeout(PATIENCE):
            while not await holds():
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"the agent exited ({self.proc.returncode}) "
                                       f"before {what}")
                await asyncio.sleep(0.005)


async def _settle(agent: Agent, seconds: float = 3.0) -> float:
    """RSS once it has stopped moving: the largest of a few samples a second apart."""
    samples = []
    for _ in range(int(seconds)):
        await asyncio.sleep(1.0)
        samples.append(agent.rss_mib())
    return max(samples[-2:])


async def _connect_and_close(path: Path, cycles: int) -> None:
    for _ in range(cycles):
        _, writer = await asyncio.open_unix_connection(str(path))
        writer.close()
        await writer.wait_closed()


async def _hold_connections(path: Path, count: int) -> None:
    writers = []
    for _ in range(count):
        _, writer = await asyncio.open_unix_connection(str(path))
        writers.append(writer)
    await asyncio.sleep(1.0)
    for writer in writers:
        writer.close()


async def _token_requests(path: Path, total: int, clients: int) -> None:
    async def client(count: int) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        for _ in range(count):
            writer.write(TOKEN_REQUEST)
            status, _ = await _answer(reader)
            if status != 200:
                raise RuntimeError(f"GET /v1/token answered {status}")
        writer.close()

    await asyncio.gather(*(client(total // clients) for _ in range(clients)))


async def _one_display(idp: IdentityProvider, name: str, args: argparse.Namespace,
                       root: Path, program: Path, broker: Mosquitto | None
                       ) -> dict[str, Any]:
    workdir = root / name
    workdir.mkdir()
    agent = Agent(workdir, idp, SETUPS[name], program, broker)
    figures: dict[str, Any] = {}
    first_ready = agent.start()
    try:
        await agent.until("a code", lambda: _has_code(idp))
        approved_at = time.perf_counter() + args.approve_after
        await asyncio.sleep(args.approve_after)
        idp.approve()

        async def served() -> bool:
            answer = await _get(agent.socket, "/v1/token")
            return answer is not None and answer[0] == 200

        await agent.until("a token was served", served)
        figures["approval_to_token_s"] = time.perf_counter() - approved_at
        figures["first_ready_ms"] = first_ready * 1000
        figures["rss_signed_in"] = await _settle(agent)
        await _connect_and_close(agent.socket, 1000)
        figures["rss_after_cycles"] = await _settle(agent)
        await _hold_connections(agent.socket, 200)
        figures["rss_after_held"] = await _settle(agent)
        await _token_requests(agent.socket, 10_000, 50)
        figures["rss_after_requests"] = await _settle(agent)
        cpu, switches = _cpu_seconds(agent.pid), _switches(agent.pid)
        await asyncio.sleep(args.idle)
        figures["idle_cpu_percent"] = (_cpu_seconds(agent.pid) - cpu) / args.idle * 100
        figures["idle_wakeups_per_s"] = (_switches(agent.pid) - switches) / args.idle
    finally:
        agent.stop()
    starts = []
    for _ in range(args.starts):
        starts.append(agent.start() * 1000)
        await agent.until("signed in", lambda: _signed_in(agent))
        agent.stop()
    figures["cold_start_ms"] = starts
    return figures


async def _has_code(idp: IdentityProvider) -> bool:
    return any(request.path.endswith("/device/") and request.status == 200
               for request in idp.requests)


async def _signed_in(agent: Agent) -> bool:
    return await agent.state() == "signed_in"


def _import_floor(python: Path) -> float:
    code = ("import aiohttp, aiohttp.web, yaml; "
            "print(next(l.split()[1] for l in open('/proc/self/status') "
            "if l.startswith('VmRSS')))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return int(out) / 1024


def _spread(values: list[float]) -> str:
    median, p10, p90 = spread(values)
    return f"median {median:.0f} (p10 {p10:.0f}, p90 {p90:.0f})"


async def _main(args: argparse.Namespace) -> int:
    settings = ProviderSettings(interval=1)
    needs_broker = any(SETUPS[name].get("mqtt") for name in args.setups)
    if needs_broker and (why := missing()) is not None:
        print(f"console-mqtt {why}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="da-bench-") as tmp:
        bin_dir = plain_install(Path(tmp))
        broker = Mosquitto(Path(tmp) / "broker") if needs_broker else None
        if broker is not None:
            await broker.start()
        try:
            async with serve_provider(settings) as idp:
                results = {name: await _one_display(idp, name, args, Path(tmp),
                                                    bin_dir / "device-agent", broker)
                           for name in args.setups}
        finally:
            if broker is not None:
                await broker.stop()
        floor = _import_floor(bin_dir / "python")
    print(f"$ python bench/daemon.py --idle {args.idle:g} --starts {args.starts} "
          f"--approve-after {args.approve_after:g} --setups {' '.join(args.setups)}")
    print("device-agent from `pip install .` in a fresh venv")
    print(f"import floor (aiohttp, aiohttp.web, yaml): {floor:.1f} MiB")
    for name, figures in results.items():
        steady = figures["rss_signed_in"]
        print(f"\n[{name}]")
        print(f"  cold start to READY, ms:           {_spread(figures['cold_start_ms'])}")
        print(f"  first start to READY, ms:          {figures['first_ready_ms']:.0f}")
        print(f"  approval -> token served, s:       {figures['approval_to_token_s']:.2f} "
              f"(poll interval {settings.interval} s)")
        print(f"  RSS signed in, settled:            {steady:.1f} MiB")
        for label, key in (("after 1,000 connect-and-close:", "rss_after_cycles"),
                           ("after 200 concurrent connections:", "rss_after_held"),
                           ("after 10,000 token requests:", "rss_after_requests")):
            print(f"  RSS {label:34} {figures[key]:.1f} MiB "
                  f"({figures[key] - steady:+.1f})")
        print(f"  idle over {args.idle:g} s:                   "
              f"CPU {figures['idle_cpu_percent']:.3f} %, "
              f"{figures['idle_wakeups_per_s']:.2f} context switches/s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--starts", type=int, default=15)
    # Not a whole number of poll intervals, so the approval lands between two polls.
    parser.add_argument("--approve-after", type=float, default=2.5)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    return asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
