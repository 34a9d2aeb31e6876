"""sd_notify, watchdog and socket activation against real sockets and a real child."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.systemd import (
    Notifier,
    listen_sockets,
    run_watchdog,
    watchdog_interval,
)
from tests.clock import ManualClock

ROOT = Path(__file__).resolve().parents[1]

# Linux asm-generic SO_TIMESTAMP (SO_TIMESTAMP_OLD); the socket module does not export
# it. The kernel stamps each datagram when it is sent, so gaps measured from these stamps
# do not depend on how quickly the receiving thread happens to be scheduled.
SO_TIMESTAMP = 29


def _recv(sock: socket.socket) -> bytes:
    sock.settimeout(2.0)
    return sock.recv(4096)


def _assert_empty(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket in the place of systemd's notify socket, and the value
    NOTIFY_SOCKET would hold for it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        env_value = path
    else:
        name = f"device-agent-test-{os.getpid()}-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        env_value = "@" + name
    with sock:
        yield env_value, sock


@pytest.fixture
def notifier(manager: tuple[str, socket.socket]) -> Iterator[Notifier]:
    n = Notifier.from_environment({"NOTIFY_SOCKET": manager[0]})
    yield n
    n.close()


class Collector:
    """Receives datagrams on its own thread, each with the kernel's send timestamp, so
    the event loop under test can block without the receiver blocking with it."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = str(tmp_path / "wd.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        self.received: list[tuple[float, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Keep draining after stop() until the queue is empty, so nothing sent before
        # stop() is lost (the kernel queue of a datagram socket is only a few deep).
        while True:
            readable, _, _ = select.select([self.sock], [], [], 0.02)
            if not readable:
                if self._stop.is_set():
                    return
                continue
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16))
            stamp = time.time()
            for level, kind, raw in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMP:
                    # struct timeval: two longs, 8 or 16 bytes depending on the ABI.
                    sec, usec = struct.unpack("=qq" if len(raw) == 16 else "=ii", raw)
                    stamp = sec + usec / 1_000_000
            self.received.append((stamp, data))

    def stop(self) -> list[tuple[float, bytes]]:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
        return self.received


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    if not sys.platform.startswith("linux"):
        pytest.skip("SO_TIMESTAMP value is Linux's")
    c = Collector(tmp_path)
    yield c
    c.stop()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# -- Notifier ---------------------------------------------------------------------------


def test_messages_arrive_in_order_with_exact_bytes(
        manager: tuple[str, socket.socket], notifier: Notifier) -> None:
    _, sock = manager
    assert notifier.enabled
    notifier.ready("Starting")
    notifier.status("Waiting for sign-in: code 123456789 at https://auth.example/device")
    notifier.watchdog()
    notifier.stopping("Stopping")
    notifier.notify(RELOADING="1", MONOTONIC_USEC="42")
    assert _recv(sock) == b"READY=1\nSTATUS=Starting"
    assert _recv(sock) == (
        b"STATUS=Waiting for sign-in: code 123456789 at https://auth.example/device")
    assert _recv(sock) == b"WATCHDOG=1"
    assert _recv(sock) == b"STOPPING=1\nSTATUS=Stopping"
    assert _recv(sock) == b"RELOADING=1\nMONOTONIC_USEC=42"
    _assert_empty(sock)


def test_a_stop_that_waits_extends_the_timeout_and_says_why(
        manager: tuple[str, socket.socket], notifier: Notifier) -> None:
    # Issue 9 item 11: systemd must not kill a stop that waits for rotated tokens.
    _, sock = manager
    notifier.extend_timeout(9.0, "Stopping: waiting for an answer")
    assert _recv(sock) == b"EXTEND_TIMEOUT_USEC=9000000\nSTATUS=Stopping: waiting for an answer"


def test_ready_and_stopping_without_status(
        manager: tuple[str, socket.socket], notifier: Notifier) -> None:
    _, sock = manager
    notifier.ready()
    notifier.stopping()
    assert _recv(sock) == b"READY=1"
    assert _recv(sock) == b"STOPPING=1"


def test_status_is_sent_only_when_it_changes(
        manager: tuple[str, socket.socket], notifier: Notifier) -> None:
    _, sock = manager
    notifier.status("Signed in as Ada")
    notifier.status("Signed in as Ada")
    notifier.status("Signed in as\nAda")  # the same line once collapsed
    notifier.status("Refreshing")
    notifier.status("Refreshing")
    assert _recv(sock) == b"STATUS=Signed in as Ada"
    assert _recv(sock) == b"STATUS=Refreshing"
    _assert_empty(sock)


def test_status_given_with_ready_counts_as_current(
        manager: tuple[str, socket.socket], notifier: Notifier) -> None:
    _, sock = manager
    notifier.ready("Starting")
    notifier.status("Starting")
    assert _recv(sock) == b"READY=1\nSTATUS=Starting"
    _assert_empty(sock)


def test_newlines_cannot_inject_fields(
        manager: tuple[str, socket.socket], notifier: Notifier) -> None:
    _, sock = manager
    notifier.status("Signed in as mallory\nSTOPPING=1\r\nREADY=1")
    assert _recv(sock) == b"STATUS=Signed in as mallory STOPPING=1 READY=1"


def test_utf8_status(manager: tuple[str, socket.socket], notifier: Notifier) -> None:
    _, sock = manager
    notifier.status("Angemeldet als Jürgen – Küche")
    assert _recv(sock) == "STATUS=Angemeldet als Jürgen – Küche".encode()


def test_without_notify_socket_nothing_happens() -> None:
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/path"},
                {"NOTIFY_SOCKET": "vsock:2:1234"}):
        n = Notifier.from_environment(env)
        assert not n.enabled
        n.ready("x")
        n.status("y")
        n.watchdog()
        n.stopping()
        n.close()


def test_from_environment_reads_os_environ(
        monkeypatch: pytest.MonkeyPatch, manager: tuple[str, socket.socket]) -> None:
    env_value, sock = manager
    monkeypatch.setenv("NOTIFY_SOCKET", env_value)
    n = Notifier.from_environment()
    try:
        n.watchdog()
        assert _recv(sock) == b"WATCHDOG=1"
    finally:
        n.close()


def test_missing_socket_never_raises_and_logs_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.systemd")
    for address in (str(tmp_path / "gone.sock"),
                    f"@device-agent-test-{os.getpid()}-{uuid.uuid4().hex}"):
        caplog.clear()
        n = Notifier.from_environment({"NOTIFY_SOCKET": address})
        assert n.enabled
        try:
            n.ready("Starting")
            for _ in range(5):
                n.watchdog()
            n.status("still here")
            n.stopping()
        finally:
            n.close()
        failures = [r for r in caplog.records if r.name == "agent.systemd"]
        assert len(failures) == 1
        assert failures[0].levelno == logging.DEBUG


def test_manager_going_away_mid_run_never_raises(
        manager: tuple[str, socket.socket], notifier: Notifier) -> None:
    _, sock = manager
    notifier.watchdog()
    assert _recv(sock) == b"WATCHDOG=1"
    sock.close()
    notifier.watchdog()
    notifier.status("after the manager left")


def test_close_stops_sending(manager: tuple[str, socket.socket], notifier: Notifier) -> None:
    _, sock = manager
    notifier.close()
    assert not notifier.enabled
    notifier.watchdog()
    _assert_empty(sock)


def test_bad_field_name_is_a_programming_error(notifier: Notifier) -> None:
    with pytest.raises(ValueError):
        notifier.notify(**{"A=B": "1"})


# -- watchdog_interval ------------------------------------------------------------------


def test_watchdog_interval() -> None:
    me = 4242
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=me) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4242"}, pid=me) == 0.5
    # Meant for another process (a parent that exec'd us, or leaked into a hook).
    assert watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4243"}, pid=me) is None
    assert watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "x"}, pid=me) is None
    assert watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": ""}, pid=me) is None
    for bad in ("", "0", "-5", "abc", "1.5", " 5", "+5"):
        assert watchdog_interval({"WATCHDOG_USEC": bad}, pid=me) is None, bad
    assert watchdog_interval({}, pid=me) is None


def test_watchdog_interval_defaults_to_our_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None


# -- run_watchdog -----------------------------------------------------------------------


async def test_run_watchdog_pings_at_once_then_every_half_interval(
        manager: tuple[str, socket.socket], notifier: Notifier) -> None:
    _, sock = manager
    clock = ManualClock()
    task = asyncio.create_task(run_watchdog(notifier, 10.0, clock=clock))
    try:
        for _ in range(3):
            await asyncio.sleep(0)
        assert _recv(sock) == b"WATCHDOG=1"
        assert clock.next_deadline == clock.monotonic() + 5.0
        clock.advance(4.9)
        for _ in range(3):
            await asyncio.sleep(0)
        _assert_empty(sock)
        for step in (0.1, 5.0, 5.0):
            clock.advance(step)
            for _ in range(3):
                await asyncio.sleep(0)
            assert _recv(sock) == b"WATCHDOG=1"
        _assert_empty(sock)
    finally:
        await _cancel(task)


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan"), float("inf")])
async def test_run_watchdog_rejects_bad_intervals(notifier: Notifier, interval: float) -> None:
    with pytest.raises(ValueError):
        await run_watchdog(notifier, interval)


async def test_run_watchdog_real_time_rate(collector: Collector) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": collector.path})
    task = asyncio.create_task(run_watchdog(notifier, 0.2))
    try:
        await asyncio.sleep(0.5)
    finally:
        await _cancel(task)
        notifier.close()
    received = collector.stop()
    assert {data for _, data in received} == {b"WATCHDOG=1"}
    # Every 0.1 s from t=0 gives 5 or 6 pings in 0.5 s; pinging at the full interval
    # would give 3, at a tenth of it 25.
    assert 4 <= len(received) <= 8, len(received)
    gaps = sorted(b[0] - a[0] for a, b in itertools.pairwise(received))
    median = gaps[len(gaps) // 2]
    assert 0.07 <= median <= 0.16, gaps


async def test_a_wedged_loop_sends_no_pings(collector: Collector) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": collector.path})
    block = 0.3
    wedge: dict[str, float] = {}

    def wedge_the_loop() -> None:
        wedge["start"] = time.time()
        time.sleep(block)  # a blocking call where an await belonged
        wedge["end"] = time.time()

    task = asyncio.create_task(run_watchdog(notifier, 0.1))
    try:
        await asyncio.sleep(0.08)
        asyncio.get_running_loop().call_soon(wedge_the_loop)
        await asyncio.sleep(0.08)
    finally:
        await _cancel(task)
        notifier.close()
    stamps = [stamp for stamp, _ in collector.stop()]
    assert wedge["end"] - wedge["start"] >= block
    assert not [s for s in stamps if wedge["start"] < s < wedge["end"]], (wedge, stamps)
    assert any(s <= wedge["start"] for s in stamps), "no ping before the wedge"
    assert any(s >= wedge["end"] for s in stamps), "pings did not resume after the wedge"
    largest_gap = max(b - a for a, b in itertools.pairwise(stamps))
    assert largest_gap > block, (largest_gap, stamps)


# -- listen_sockets ---------------------------------------------------------------------

# Plays systemd's part before exec: the passed socket at fd 3 and LISTEN_* naming this
# process, then calls the code under test and reports what it found.
_CHILD = r"""
import json, os, socket, sys

passed, mode = int(sys.argv[1]), sys.argv[2]
if passed != 3:
    os.dup2(passed, 3)
    os.close(passed)
os.environ["LISTEN_PID"] = str(os.getpid() + (1 if mode == "other-pid" else 0))
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_FDNAMES"] = "api"

from agent.systemd import listen_sockets, listen_sockets_with_names

if mode == "names":
    found = listen_sockets_with_names()
    names = [name for name, _ in found]
    socks = [sock for _, sock in found]
else:
    socks = listen_sockets()
    names = []
report = {
    "fds": [s.fileno() for s in socks],
    "names": names,
    "kinds": [[int(s.family), int(s.type)] for s in socks],
    "inheritable": os.get_inheritable(3),
    "environment": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
print(json.dumps(report), flush=True)
if socks and mode != "other-pid":
    socks[0].settimeout(10)
    conn, _ = socks[0].accept()
    with conn:
        conn.settimeout(10)
        request = conn.recv(64)
        conn.sendall(b"pong " + str(os.getpid()).encode() + b" " + request)
"""


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _spawn(listener: socket.socket, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(listener.fileno()), mode],
        pass_fds=(listener.fileno(),), env=_child_env(), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


@pytest.mark.parametrize("mode", ["plain", "names"])
def test_socket_activation_hands_the_socket_to_the_child(tmp_path: Path, mode: str) -> None:
    path = str(tmp_path / "api.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        proc = _spawn(listener, mode)
    # The parent's copy is closed: an answer can only come from the child's fd 3.
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(path)
            client.sendall(b"ping")
            answer = b""
            while chunk := client.recv(64):
                answer += chunk
    finally:
        out, err = _finish(proc)
    assert proc.returncode == 0, err
    assert answer == f"pong {proc.pid} ping".encode()
    report = json.loads(out)
    assert report["fds"] == [3]
    assert report["kinds"] == [[int(socket.AF_UNIX), int(socket.SOCK_STREAM)]]
    assert report["names"] == (["api"] if mode == "names" else [])
    assert report["inheritable"] is False  # FD_CLOEXEC: hooks will not inherit it
    assert report["environment"] == []


def test_socket_activation_for_another_pid_is_ignored(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "api.sock"))
        listener.listen(1)
        proc = _spawn(listener, "other-pid")
    out, err = _finish(proc)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["fds"] == []
    assert report["inheritable"] is True  # fd 3 left exactly as it was
    assert report["environment"] == []  # unset whether or not the call succeeded


def test_listen_sockets_without_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    me = os.getpid()
    # None of these may touch fd 3 of this process.
    assert listen_sockets({}, unset=False) == []
    assert listen_sockets({"LISTEN_FDS": "1"}, pid=me, unset=False) == []
    assert listen_sockets({"LISTEN_PID": str(me), "LISTEN_FDS": "0"}, pid=me,
                          unset=False) == []
    assert listen_sockets({"LISTEN_PID": str(me), "LISTEN_FDS": "x"}, pid=me,
                          unset=False) == []
    assert listen_sockets({"LISTEN_PID": "abc", "LISTEN_FDS": "1"}, pid=me, unset=False) == []
    assert listen_sockets({"LISTEN_PID": str(me + 1), "LISTEN_FDS": "1"}, pid=me,
                          unset=False) == []

    monkeypatch.setenv("LISTEN_PID", str(me + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "api")
    assert listen_sockets(unset=False) == []
    assert os.environ["LISTEN_PID"] == str(me + 1)
    assert listen_sockets() == []
    assert not [k for k in os.environ if k.startswith("LISTEN_")]
