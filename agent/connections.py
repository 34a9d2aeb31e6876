"""Who is on the other end of an API connection, and how many connections each may hold.

A local user who may connect to the socket must not be able to take the agent's file
descriptors: without bounds, 1,100 idle connections from one user exhaust a 1,024
descriptor limit, and the next refresh cannot open its connection to the provider or
write the store, after the provider has already rotated the refresh token. So every
connection is admitted or closed at once, by the kernel's word on who opened it:

- root and the agent's own user are bounded only by the descriptor reserve;
- any other user holds at most `per_caller` connections, and all of them together at
  most half of what the descriptor limit leaves, so they can never lock root out;
- a user who may read nothing keeps `refused_caller` connections, enough for its 403s;
- a connection outside a request (silent, idle after an answer, or a request half sent)
  is closed after `idle_timeout`; a request being answered (an event stream, a caller
  waiting for a refresh) is not.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ACCEPT_BATCH", "BACKLOG", "Caller", "ConnectionGuard", "ConnectionLimits",
           "RateLimit", "caller_of", "quiet_accept_errors"]

log = logging.getLogger("agent.api")

# Repeating complaints (refused callers, refused connections, accept errors) are logged
# at most this often, each with the count of the ones not logged.
LOG_GAP = 60.0


# Slotted, as the others made for each connection: a few hundred connections at once
# are the daemon's memory high-water mark.
@dataclass(frozen=True, kw_only=True, slots=True)
class Caller:
    uid: int
    gid: int
    pid: int
    # The peer's supplementary groups as the kernel saw them at connect (SO_PEERGROUPS);
    # None where that is unavailable, and the user database is asked instead.
    groups: frozenset[int] | None = None

    @property
    def executable(self) -> str:
        # Read anew on every use, and so only for a log line that is written: a reader
        # calling every minute must not cost a /proc read per call.
        try:
            return Path(f"/proc/{self.pid}/comm").read_text().strip()
        except OSError:
            return "?"


def caller_of(sock: socket.socket | None) -> Caller | None:
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Caller(uid=uid, gid=gid, pid=pid, groups=_peer_groups(sock))


# Linux 4.13+; Python does not name it. The groups a process really has (systemd's
# SupplementaryGroups=, setgroups) rather than what /etc/group says about its user.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


def _peer_groups(sock: socket.socket) -> frozenset[int] | None:
    size = 4 * 64
    for _ in range(3):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                size *= 8
                continue
            return None
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    return None


class RateLimit:
    """Lets one message per key through every `gap` seconds. `admit` answers None for a
    message to drop, else how many were dropped since the last one let through."""

    def __init__(self, gap: float = LOG_GAP, *, keys: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._gap = gap
        self._keys = keys
        self._clock = clock
        self._seen: collections.OrderedDict[Hashable, tuple[float, int]] = (
            collections.OrderedDict())

    def admit(self, key: Hashable) -> int | None:
        now = self._clock()
        last, dropped = self._seen.get(key, (-self._gap, 0))
        if now - last < self._gap:
            self._seen[key] = (last, dropped + 1)
            return None
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        if len(self._seen) > self._keys:
            self._seen.popitem(last=False)
        return dropped


def more(dropped: int) -> str:
    return f" ({dropped} more in the last minute)" if dropped else ""


@dataclass(frozen=True, kw_only=True)
class ConnectionLimits:
    # One user's connections: the 200 concurrent clients of the API benchmark fit.
    per_caller: int = 256
    # All users other than root and the agent's own, together; also never more than
    # half of what the descriptor limit leaves once the reserve is taken off.
    total: int = 1024
    # A user who may read nothing gets its 403s, and no more than this at a time.
    refused_caller: int = 4
    idle_timeout: float = 10.0
    # Descriptors no connection may take: a refresh's connection to the provider, the
    # store's temporary file and directory, a hook's pipes, and the accept backlog
    # (connections the kernel hands over before any of them can be refused).
    fd_reserve: int = 256


# The kernel queues this many connections before the agent sees them; it is part of the
# reserve above.
BACKLOG = 128
# asyncio takes at most its `backlog` argument's worth of queued connections each time
# the listening socket wakes the loop (CPython's selector loop, bpo-27906). With 128, a
# client that connects and hangs up in a loop has hundreds set up before any is read:
# a burst that stays the process's memory high-water mark (+3.1 MiB resident after
# 1,000 such connections; +0.8 with 16, +0.2 with 4, +0.04 with 1) and holds up
# everything else the loop has to do. nginx takes one a wake-up by default.
ACCEPT_BATCH = 4


@dataclass(eq=False, slots=True)
class _Connection:
    caller: Caller | None
    privileged: bool
    transport: asyncio.Transport
    busy: int = 0
    timer: asyncio.TimerHandle | None = None
    # aiohttp's protocol for it, made when its first bytes arrive.
    handler: asyncio.Protocol | None = None


class ConnectionGuard:
    """Admits or closes each connection as it is accepted, and closes idle ones."""

    def __init__(self, limits: ConnectionLimits, *,
                 privileged: Callable[[Caller], bool],
                 may_read: Callable[[Caller], bool],
                 fd_limit: int | None = None) -> None:
        self.limits = limits
        self._privileged = privileged
        self._may_read = may_read
        soft = fd_limit if fd_limit is not None else resource.getrlimit(
            resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        # Descriptors open now (the loop, the store, the logs) are not ours to give.
        self.capacity = max(1, soft - limits.fd_reserve - _open_descriptors())
        self.others_capacity = max(1, min(limits.total, self.capacity // 2))
        self._by_transport: dict[asyncio.BaseTransport, _Connection] = {}
        self._per_uid: collections.Counter[int] = collections.Counter()
        self._others = 0
        self.refused = 0
        self._refusals = RateLimit()
        self._shutting_down = False

    @property
    def open(self) -> int:
        return len(self._by_transport)

    @property
    def others_open(self) -> int:
        """Connections of users other than root and the agent's own."""
        return self._others

    def protocol_factory(self, inner: Callable[[], asyncio.Protocol],
                         ) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, inner)

    @contextlib.contextmanager
    def serving(self, transport: asyncio.BaseTransport | None) -> Iterator[None]:
        """Around a request's handler: a connection being answered is not idle."""
        connection = self._by_transport.get(transport) if transport is not None else None
        if connection is None:
            yield
            return
        connection.busy += 1
        self._stop_timer(connection)
        try:
            yield
        finally:
            connection.busy -= 1
            if connection.busy == 0 and connection.transport in self._by_transport:
                self._start_timer(connection)

    def shut_out_the_silent(self) -> None:
        """At shutdown, before aiohttp ends the connections it serves: those it does not
        know are closed, and no new one is admitted (asyncio may still be setting up
        some it accepted before its listener closed), so no request starts while the
        agent stops."""
        self._shutting_down = True
        for connection in list(self._by_transport.values()):
            if connection.handler is None:
                connection.transport.abort()

    def abort_all(self) -> None:
        """After aiohttp's shutdown: whatever it left open."""
        for connection in list(self._by_transport.values()):
            connection.transport.abort()

    def _admit(self, transport: asyncio.Transport) -> _Connection | None:
        if self._shutting_down:
            return None
        sock = transport.get_extra_info("socket")
        caller = caller_of(sock)
        privileged = caller is not None and self._privileged(caller)
        uid = -1 if caller is None else caller.uid
        reason = None
        if self.open >= self.capacity:
            reason = f"{self.open} connections open, all the descriptors the agent can spare"
        elif not privileged:
            cap = (self.limits.per_caller if caller is not None and self._may_read(caller)
                   else self.limits.refused_caller)
            if self._per_uid[uid] >= cap:
                reason = f"it holds {self._per_uid[uid]}, the most one user may"
            elif self._others >= self.others_capacity:
                reason = (f"{self._others} connections of other users open, the most "
                          "they may hold together")
        if reason is not None:
            self.refused += 1
            self._log_refusal(caller, reason)
            return None
        connection = _Connection(caller, privileged, transport)
        self._by_transport[transport] = connection
        if not privileged:
            self._per_uid[uid] += 1
            self._others += 1
        self._start_timer(connection)
        return connection

    def _release(self, connection: _Connection) -> None:
        self._stop_timer(connection)
        if self._by_transport.pop(connection.transport, None) is None:
            return
        if not connection.privileged:
            uid = -1 if connection.caller is None else connection.caller.uid
            self._per_uid[uid] -= 1
            if self._per_uid[uid] <= 0:
                del self._per_uid[uid]
            self._others -= 1

    def _start_timer(self, connection: _Connection) -> None:
        self._stop_timer(connection)
        loop = asyncio.get_running_loop()
        connection.timer = loop.call_later(self.limits.idle_timeout, self._expire, connection)

    @staticmethod
    def _stop_timer(connection: _Connection) -> None:
        if connection.timer is not None:
            connection.timer.cancel()
            connection.timer = None

    def _expire(self, connection: _Connection) -> None:
        connection.timer = None
        if connection.busy == 0:
            # abort, not close: a half-sent request has nothing worth flushing to.
            connection.transport.abort()

    def _log_refusal(self, caller: Caller | None, reason: str) -> None:
        uid = -1 if caller is None else caller.uid
        dropped = self._refusals.admit(uid)
        if dropped is None:
            return
        who = "an unknown peer" if caller is None else (
            f"uid {caller.uid} pid {caller.pid} ({caller.executable})")
        log.warning("api: closed a new connection from %s: %s%s", who, reason, more(dropped))


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the guard's admission. It is made
    when the first bytes arrive: its parser, request queue and task are two thirds of
    what a connection costs (about 3.5 of 5.5 KiB), and a caller that has connected but
    not spoken, or a few hundred of them, holds none of it."""

    __slots__ = ("_connection", "_guard", "_make_inner")

    def __init__(self, guard: ConnectionGuard,
                 make_inner: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._make_inner = make_inner
        self._connection: _Connection | None = None

    @property
    def _handler(self) -> asyncio.Protocol | None:
        return self._connection.handler if self._connection is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # a stream socket's
        self._connection = self._guard._admit(transport)
        if self._connection is None:
            transport.abort()
            _release_read_callback(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._connection is None:
            return
        _release_read_callback(self._connection.transport)
        self._guard._release(self._connection)
        if self._handler is not None:
            self._handler.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._connection is None:
            return
        if self._connection.handler is None:
            self._connection.handler = self._make_inner()
            self._connection.handler.connection_made(self._connection.transport)
        self._connection.handler.data_received(data)

    def eof_received(self) -> bool | None:
        # Before a request, nothing to answer: None closes the connection.
        return self._handler.eof_received() if self._handler is not None else None

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()


def _release_read_callback(transport: asyncio.Transport) -> None:
    """CPython 3.11's socket transport keeps its read callback as a method bound to
    itself, a cycle (gh-100348; 3.12 drops it on close): each closed connection, about
    1.2 KiB, then waits for the cyclic collector, which an idle daemon seldom runs, and
    the pages a burst of connections touched stay the process's for good. By
    connection_lost the transport has stopped reading."""
    if sys.version_info < (3, 12) and hasattr(transport, "_read_ready_cb"):
        transport._read_ready_cb = None


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


# asyncio's own words when accept() fails for want of descriptors; it then retries every
# second, and its default handler logs a traceback each time.
_ACCEPT_FAILED = "socket.accept() out of system resource"


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Logs failed accepts once a minute instead of every second with a traceback.
    Returns the function that puts the previous handler back."""
    previous = loop.get_exception_handler()
    limit = RateLimit()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == _ACCEPT_FAILED:
            dropped = limit.admit("accept")
            if dropped is not None:
                log.error("api: cannot accept connections: %s; retrying every second%s",
                          context.get("exception"), more(dropped))
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)

    def restore() -> None:
        if loop.get_exception_handler() is handler:
            loop.set_exception_handler(previous)

    return restore
