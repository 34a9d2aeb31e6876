"""systemd integration, with the standard library only: readiness, status, watchdog and
socket activation.

The wire protocols are small and documented, so this module speaks them directly instead
of linking libsystemd:

- sd_notify(3): newline-separated ``KEY=VALUE`` assignments, sent as one datagram to the
  ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
  namespace).
- sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` is the timeout, ``$WATCHDOG_PID`` the process
  it is meant for; the service should send ``WATCHDOG=1`` at half that interval.
- sd_listen_fds(3): ``$LISTEN_FDS`` sockets start at fd 3 and are meant for the process
  named by ``$LISTEN_PID``; ``$LISTEN_FDNAMES`` names them, colon-separated.

Outside systemd every entry point degrades to doing nothing, so the daemon runs the same
from a terminal.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Mapping

from agent.clock import Clock, SystemClock

__all__ = [
    "LISTEN_FDS_START",
    "Notifier",
    "listen_sockets",
    "listen_sockets_with_names",
    "run_watchdog",
    "watchdog_interval",
]

_log = logging.getLogger(__name__)

# SD_LISTEN_FDS_START in sd-daemon.h: fds 0-2 are stdio, passed sockets follow.
LISTEN_FDS_START = 3

_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _one_line(text: str) -> str:
    # A newline inside a value would start a new assignment in the datagram: a user name
    # shown in STATUS= could otherwise smuggle in READY=1 or STOPPING=1 (sd_notify(3)).
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _decimal(value: str | None) -> int | None:
    # Stricter than int(): systemd writes plain decimal digits, and int() would also take
    # "+5", " 5" or "5_000", which no systemd ever sends.
    if value is None or not value.isascii() or not value.isdigit():
        return None
    return int(value)


class Notifier:
    """Sends sd_notify(3) messages to the service manager.

    Built from ``$NOTIFY_SOCKET`` by `from_environment`; without it the notifier is
    disabled and every method returns at once. Sending never raises: losing the service
    manager (a daemon-reexec, a stale variable when run by hand) must not take the
    daemon down with it, and a watchdog ping that cannot be delivered is harmless.
    """

    def __init__(self, address: str | bytes | None = None) -> None:
        self._address: bytes | None
        if address is None:
            self._address = None
        else:
            self._address = address if isinstance(address, bytes) else os.fsencode(address)
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        self._failed = False
        self._closed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        if not raw:
            return cls(None)
        if raw.startswith("@"):
            # sd_notify(3): a leading "@" stands for the NUL byte of an abstract socket.
            return cls(b"\0" + os.fsencode(raw[1:]))
        if raw.startswith("/"):
            return cls(raw)
        # Other schemes (vsock:, relative paths) are for other kinds of managers; a
        # wrong guess would only produce silent failures, so say once and stay off.
        _log.debug("NOTIFY_SOCKET is not an AF_UNIX address (%r); notifications are off", raw)
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self._address is not None and not self._closed

    def notify(self, **fields: str) -> None:
        """Send the fields, in order, as one datagram of ``KEY=VALUE`` lines."""
        if self._address is None or self._closed or not fields:
            return
        for key in fields:
            if not key or "=" in key or "\n" in key:
                raise ValueError(f"not a notification field name: {key!r}")
        payload = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        try:
            if self._sock is None:
                # Non-blocking: a manager too busy to drain its queue must not stall the
                # event loop (a stalled loop is exactly what the watchdog exists to catch).
                self._sock = socket.socket(
                    socket.AF_UNIX,
                    socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                )
            # sendto() each time rather than connect() once: the manager may re-create the
            # socket (daemon-reexec) and an unconnected socket simply finds the new one.
            self._sock.sendto(payload.encode("utf-8"), self._address)
        except OSError as exc:
            # Once, at debug: a gone manager would otherwise log on every watchdog ping.
            if not self._failed:
                self._failed = True
                _log.debug("sd_notify failed, further failures are not logged: %s", exc)

    def ready(self, status: str | None = None) -> None:
        if status is None:
            self.notify(READY="1")
        else:
            self._last_status = _one_line(status)
            self.notify(READY="1", STATUS=self._last_status)

    def status(self, text: str) -> None:
        """Set the one-line status `systemctl status` shows; repeats are not sent."""
        line = _one_line(text)
        if line == self._last_status:
            return
        self._last_status = line
        self.notify(STATUS=line)

    def watchdog(self) -> None:
        self.notify(WATCHDOG="1")

    def stopping(self, status: str | None = None) -> None:
        if status is None:
            self.notify(STOPPING="1")
        else:
            self._last_status = _one_line(status)
            self.notify(STOPPING="1", STATUS=self._last_status)

    def extend_timeout(self, seconds: float, status: str) -> None:
        """sd_notify(3) EXTEND_TIMEOUT_USEC: the stop takes up to `seconds` more, for a
        reason `systemctl status` shows, so systemd does not kill it midway."""
        self._last_status = _one_line(status)
        self.notify(EXTEND_TIMEOUT_USEC=str(int(seconds * 1_000_000)), STATUS=self._last_status)

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None, *,
                      pid: int | None = None) -> float | None:
    """The watchdog timeout in seconds, or None when this process has none.

    As sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` must be a positive integer, and when
    ``$WATCHDOG_PID`` is set it must name this process. A child that inherited the
    variables (a hook, a shell) must not believe it is being watched.
    """
    env = os.environ if environ is None else environ
    usec = _decimal(env.get("WATCHDOG_USEC"))
    if usec is None or usec == 0:
        return None
    if "WATCHDOG_PID" in env:
        watched = _decimal(env["WATCHDOG_PID"])
        if watched is None or watched != (os.getpid() if pid is None else pid):
            return None
    return usec / 1_000_000


async def run_watchdog(notifier: Notifier, interval: float, *,
                       clock: Clock | None = None) -> None:
    """Send ``WATCHDOG=1`` now and every ``interval / 2`` seconds, until cancelled.

    The pings come from the event loop itself, not from a thread: when the loop is
    wedged (a blocking call, a busy coroutine) they stop, systemd sees the timeout and
    restarts the service, which is the point of ``WatchdogSec=``. Half the interval is
    what sd_watchdog_enabled(3) recommends, leaving room for scheduling delays.
    """
    if not (math.isfinite(interval) and interval > 0):
        raise ValueError(f"watchdog interval must be a positive number of seconds: {interval!r}")
    clock = SystemClock() if clock is None else clock
    period = interval / 2
    while True:
        notifier.watchdog()
        await clock.sleep(period)


def listen_sockets_with_names(environ: Mapping[str, str] | None = None, *,
                              pid: int | None = None,
                              unset: bool = True) -> list[tuple[str, socket.socket]]:
    """Sockets passed by socket activation, with their ``FileDescriptorName=``.

    sd_listen_fds_with_names(3): a socket without a name (or when the count of names
    does not match) is called ``"unknown"``, as libsystemd does.
    """
    env = os.environ if environ is None else environ
    # Read before unsetting: `env` may be os.environ itself.
    listen_pid = _decimal(env.get("LISTEN_PID"))
    count = _decimal(env.get("LISTEN_FDS"))
    names_raw = env.get("LISTEN_FDNAMES")
    if unset:
        # sd_listen_fds(3) unsets these whether or not the call succeeds, so that hooks
        # and other children never take the daemon's sockets for their own.
        for key in _LISTEN_VARIABLES:
            os.environ.pop(key, None)
    if listen_pid is None or count is None or count == 0:
        return []
    if listen_pid != (os.getpid() if pid is None else pid):
        # The variables were meant for a parent that exec'd us, or leaked through one.
        return []
    names = names_raw.split(":") if names_raw is not None else []
    if len(names) != count:
        if names_raw is not None:
            _log.warning("LISTEN_FDNAMES has %d names for %d sockets; ignoring the names",
                         len(names), count)
        names = ["unknown"] * count
    found: list[tuple[str, socket.socket]] = []
    for fd, name in zip(range(LISTEN_FDS_START, LISTEN_FDS_START + count), names, strict=True):
        try:
            # systemd passes the fds inheritable; FD_CLOEXEC keeps them out of hooks we
            # run later (sd_listen_fds(3) does the same).
            os.set_inheritable(fd, False)
            # Family, type and protocol are read back from the fd itself.
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            # A FIFO or special file (ListenFIFO=, ListenSpecial=) is not ours to use.
            _log.warning("passed fd %d (%s) is not a usable socket: %s", fd, name, exc)
            continue
        found.append((name or "unknown", sock))
    return found


def listen_sockets(environ: Mapping[str, str] | None = None, *, pid: int | None = None,
                   unset: bool = True) -> list[socket.socket]:
    """Sockets passed by socket activation (sd_listen_fds(3)), in fd order from fd 3.

    Empty when there are none, or when ``$LISTEN_PID`` names another process. With
    `unset`, ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` are removed from
    ``os.environ`` so children do not inherit them.
    """
    return [sock for _, sock in listen_sockets_with_names(environ, pid=pid, unset=unset)]
