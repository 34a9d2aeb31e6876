"""Throughput and latency of `GET /v1/token` over the Unix socket.

Starts `device-agent demo` (built-in provider, codes approved at once) in a child
process, waits until it is signed in, then drives it from this process with
keep-alive HTTP/1.1 clients on raw asyncio sockets, so the client costs little.

    .venv/bin/python bench/api_token.py [--requests 4000] [--clients 1 50]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REQUEST = b"GET /v1/token HTTP/1.1\r\nHost: agent\r\n\r\n"


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("agent", timeout=5)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


def _state(path: str) -> str | None:
    try:
        connection = _Unix(path)
        connection.request("GET", "/v1/status")
        return str(json.loads(connection.getresponse().read())["state"])
    except OSError:
        return None


async def _client(path: str, count: int, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_unix_connection(path)
    for _ in range(count):
        started = time.perf_counter()
        writer.write(REQUEST)
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
        latencies.append(time.perf_counter() - started)
        if not body.startswith(b'{"access_token"'):
            raise RuntimeError(f"unexpected answer: {body[:80]!r}")
    writer.close()


async def _run(path: str, clients: int, total: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    per_client = max(1, total // clients)
    started = time.perf_counter()
    await asyncio.gather(*(_client(path, per_client, latencies) for _ in range(clients)))
    return time.perf_counter() - started, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 50])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="da-bench-") as tmp:
        path = str(Path(tmp) / "agent.sock")
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "demo", "--approve-after", "0",
             "--display", "none", "--socket", path],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        try:
            deadline = time.monotonic() + 30
            while _state(path) != "signed_in":
                if time.monotonic() > deadline or agent.poll() is not None:
                    print("the agent did not sign in", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            asyncio.run(_run(path, 1, 200))  # warm-up
            print(f"$ python bench/api_token.py --requests {args.requests} "
                  f"--clients {' '.join(map(str, args.clients))}")
            print(f"{'clients':>8} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
            for clients in args.clients:
                elapsed, latencies = asyncio.run(_run(path, clients, args.requests))
                latencies.sort()
                p50 = statistics.median(latencies) * 1000
                p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
                print(f"{clients:>8} {len(latencies):>9} {len(latencies) / elapsed:>8.0f} "
                      f"{p50:>8.2f} {p99:>8.2f}")
        finally:
            agent.terminate()
            agent.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
