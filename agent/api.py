"""The local HTTP API on a Unix socket, for other processes on the device.

Callers are identified by the kernel (SO_PEERCRED: uid, gid, pid of the process that
connected), never by anything they send. Root and the agent's own user may do
anything; others only what `api.read_users/read_groups` (tokens, status) and
`api.admin_users/admin_groups` (login, logout, refresh) grant them.

Every answer is JSON except `/v1/metrics` (the Prometheus text format, `agent.metrics`);
errors are `{"error": CODE, "message": TEXT}` with a stable CODE and the status that
fits it (DESIGN.md §3).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import pwd
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from aiohttp import web

from agent import __version__
from agent.accounts import group_id, user_id
from agent.connections import (
    ACCEPT_BATCH,
    BACKLOG,
    Caller,
    ConnectionGuard,
    ConnectionLimits,
    RateLimit,
    caller_of,
    more,
    quiet_accept_errors,
)
from agent.driver import Driver
from agent.errors import (
    AgentError,
    IllegalInput,
    MinTtlTooLong,
    NotSignedIn,
    ProviderUnavailable,
)
from agent.logs import fingerprint
from agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agent.metrics import Metrics
from agent.session import not_signed_in_reason
from agent.state import Phase, Snapshot, rfc3339

__all__ = ["AccessPolicy", "ApiServer", "Caller", "build_app", "status_document"]

log = logging.getLogger(__name__)

READ = "read"
ADMIN = "admin"


class AccessPolicy:
    """Who may do what. Names are resolved once, at start: a user that does not exist
    is a config mistake worth a warning, not a reason to refuse to start."""

    def __init__(self, *, read_users: Iterable[str] = (), read_groups: Iterable[str] = (),
                 admin_users: Iterable[str] = (), admin_groups: Iterable[str] = ()) -> None:
        self._own_uid = os.getuid()
        admin_uids = _ids(admin_users, user_id, "user")
        admin_gids = _ids(admin_groups, group_id, "group")
        self._uids = {ADMIN: admin_uids, READ: _ids(read_users, user_id, "user") | admin_uids}
        self._gids = {ADMIN: admin_gids,
                      READ: _ids(read_groups, group_id, "group") | admin_gids}

    def privileged(self, caller: Caller) -> bool:
        return caller.uid in (0, self._own_uid)

    def allows(self, caller: Caller, right: str) -> bool:
        if self.privileged(caller):
            return True
        if caller.uid in self._uids[right]:
            return True
        groups = caller.groups
        if groups is None:
            groups = frozenset(_supplementary_groups(caller.uid))
        return bool(({caller.gid} | groups) & self._gids[right])


def _ids(names: Iterable[str], lookup: Callable[[str], int], kind: str) -> set[int]:
    found = set()
    for name in names:
        try:
            found.add(lookup(name))
        except KeyError:
            log.warning("api: no %s named %r; ignored", kind, name)
    return found


def _supplementary_groups(uid: int) -> set[int]:
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return set()
    return set(os.getgrouplist(user.pw_name, user.pw_gid))


def peer_credentials(request: web.Request) -> Caller | None:
    transport = request.transport
    return caller_of(transport.get_extra_info("socket") if transport is not None else None)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status,
                             headers={"Cache-Control": "no-store"})


Handler = Callable[[web.Request, Caller], Awaitable[web.StreamResponse]]

# Requests here carry no body worth more than this; a larger one is refused early.
MAX_BODY = 4096
# An idle event stream sends a comment this often, so a dead reader is noticed.
EVENTS_HEARTBEAT = 15.0


GUARD = web.AppKey("guard", ConnectionGuard)


def build_app(driver: Driver, policy: AccessPolicy, *,
              wall_clock: Callable[[], float] = time.time,
              heartbeat: float = EVENTS_HEARTBEAT,
              limits: ConnectionLimits | None = None,
              metrics: Metrics | None = None) -> web.Application:
    """`metrics`: what `/v1/metrics` shows; made here when not given, and then it
    counts from now (`serve()` makes it before the driver's first step)."""
    recorder = metrics if metrics is not None else Metrics(driver)
    guard = ConnectionGuard(limits or ConnectionLimits(), privileged=policy.privileged,
                            may_read=lambda caller: policy.allows(caller, READ))

    @web.middleware
    async def mark_busy(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                        ) -> web.StreamResponse:
        with guard.serving(request.transport):
            return await handler(request)

    app = web.Application(middlewares=[mark_busy, _json_errors], client_max_size=MAX_BODY)
    app[GUARD] = guard
    # Set when the server shuts down: event streams end at once instead of holding it.
    closing = asyncio.Event()

    async def on_shutdown(_: web.Application) -> None:
        closing.set()

    app.on_shutdown.append(on_shutdown)

    # A refused caller that loops must not fill the journal: per uid, one line a minute,
    # with the count of those not logged.
    refusals = RateLimit()

    def log_refusal(request: web.Request, caller: Caller | None) -> None:
        dropped = refusals.admit(-1 if caller is None else caller.uid)
        if dropped is None:
            return
        who = "unknown" if caller is None else (
            f"uid {caller.uid} pid {caller.pid} ({caller.executable})")
        log.warning("api: refused %s %s to %s%s", request.method, request.path, who,
                    more(dropped))

    def route(method: str, path: str, right: str, handler: Handler) -> None:
        async def checked(request: web.Request) -> web.StreamResponse:
            caller = peer_credentials(request)
            if caller is None or not policy.allows(caller, right):
                log_refusal(request, caller)
                return _error(403, "forbidden", f"this user may not {right} here")
            return await handler(request, caller)
        app.router.add_route(method, path, checked)

    def expiry_fields(expires_at: float | None) -> dict[str, Any]:
        """From the snapshot's expiry, which the session keeps on both clocks."""
        if expires_at is None:
            return {"expires_in": None, "expires_at": None}
        return {"expires_in": max(0, int(expires_at - wall_clock())),
                "expires_at": rfc3339(expires_at)}

    # A script run every minute is a new process each time: keyed by process, it would
    # write 1,440 lines a day. Each (user, token) pair is logged at info once, then at
    # debug; /proc is read only for a line that is written.
    reported: collections.OrderedDict[tuple[int, str], None] = collections.OrderedDict()

    def handed_out(caller: Caller, what: str, token: str) -> None:
        tag = fingerprint(token)
        key = (caller.uid, tag)
        level = logging.DEBUG if key in reported else logging.INFO
        reported[key] = None
        reported.move_to_end(key)
        if len(reported) > 256:
            reported.popitem(last=False)
        if log.isEnabledFor(level):
            log.log(level, "api: %s %s to uid %d pid %d (%s)", what, tag, caller.uid,
                    caller.pid, caller.executable)

    def not_signed_in(message: str | None = None) -> web.Response:
        return _error(503, "not_signed_in", message or not_signed_in_reason(driver.snapshot))

    async def get_token(request: web.Request, caller: Caller) -> web.StreamResponse:
        raw = request.query.get("min_ttl", "0")
        try:
            min_ttl = float(raw)
            if not 0 <= min_ttl <= MAX_MIN_TTL:
                raise ValueError
        except ValueError:
            return _error(400, "bad_request",
                          f"min_ttl must be a number of seconds from 0 to {MAX_MIN_TTL}")
        try:
            tokens = await driver.get_token(min_ttl)
        except NotSignedIn as exc:
            return not_signed_in(str(exc))
        except ProviderUnavailable as exc:
            return _error(502, "provider_unavailable", str(exc))
        except MinTtlTooLong as exc:
            return _error(400, "bad_request", str(exc))
        handed_out(caller, "token", tokens.access_token)
        return web.json_response({
            "access_token": tokens.access_token,
            "token_type": tokens.token_type,
            **expiry_fields(driver.snapshot.token_expires_at),
            "scope": tokens.scope,
        }, headers={"Cache-Control": "no-store"})

    async def get_id_token(request: web.Request, caller: Caller) -> web.StreamResponse:
        creds = driver.credentials
        if creds is None or not _valid(driver):
            return not_signed_in()
        if creds.tokens.id_token is None:
            return _error(404, "no_id_token", "the provider issued no ID token")
        handed_out(caller, "id token", creds.tokens.id_token)
        return web.json_response({"id_token": creds.tokens.id_token,
                                  **expiry_fields(driver.snapshot.token_expires_at)},
                                 headers={"Cache-Control": "no-store"})

    async def get_userinfo(request: web.Request, caller: Caller) -> web.StreamResponse:
        creds = driver.credentials
        if creds is None:
            return not_signed_in()
        return web.json_response(dict(creds.claims))

    async def get_status(request: web.Request, caller: Caller) -> web.StreamResponse:
        return web.json_response(status_document(driver.snapshot, driver))

    async def get_events(request: web.Request, caller: Caller) -> web.StreamResponse:
        """Server-Sent Events: one `state` event per change, the current one first."""
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await response.prepare(request)

        last: Snapshot | None = None
        try:
            while True:
                snapshot = driver.snapshot
                if snapshot is not last:
                    last = snapshot
                    data = json.dumps(status_document(snapshot, driver))
                    await response.write(f"event: state\ndata: {data}\n\n".encode())
                change = asyncio.ensure_future(driver.wait_for_change(last))
                stop = asyncio.ensure_future(closing.wait())
                try:
                    await asyncio.wait([change, stop], timeout=heartbeat,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    change.cancel()
                    stop.cancel()
                if closing.is_set():
                    break
                if not change.done() or change.cancelled():
                    await response.write(b": keep-alive\n\n")
        except ConnectionResetError:
            pass
        return response

    async def get_metrics(request: web.Request, caller: Caller) -> web.StreamResponse:
        # Nothing secret is in it, but it is the read right's, as the status is.
        return web.Response(body=recorder.render().encode(), headers={
            "Content-Type": METRICS_CONTENT_TYPE, "Cache-Control": "no-store"})

    async def post_login(request: web.Request, caller: Caller) -> web.StreamResponse:
        try:
            wait = await driver.login(new_sign_in=True)
        except IllegalInput as exc:
            return _error(503, "stopping", str(exc))
        log.info("api: new sign-in requested by uid %d (%s)", caller.uid, caller.executable)
        return web.json_response(
            {"accepted": True, "next_code_in": int(wait),
             "next_code_at": rfc3339(wall_clock() + wait)}, status=202)

    async def post_refresh(request: web.Request, caller: Caller) -> web.StreamResponse:
        if driver.credentials is None:
            if driver.snapshot.phase == Phase.AWAITING_USER:
                return _error(409, "sign_in_in_progress",
                              "a sign-in is in progress; there is nothing to refresh yet")
            return not_signed_in()
        try:
            await driver.refresh()
        except NotSignedIn as exc:
            return not_signed_in(str(exc))
        except AgentError as exc:
            return _error(502, "provider_unavailable", str(exc))
        return web.json_response(status_document(driver.snapshot, driver))

    async def post_logout(request: web.Request, caller: Caller) -> web.StreamResponse:
        log.info("api: sign-out requested by uid %d (%s)", caller.uid, caller.executable)
        held = driver.credentials is not None
        try:
            problems = await driver.logout()
        except IllegalInput as exc:
            return _error(503, "stopping", str(exc))
        # The person signing out needs to know whether the tokens are dead at the
        # provider too, or only gone from this device.
        revocation = ("not_confirmed" if problems
                      else "confirmed" if held else "nothing_to_revoke")
        return web.json_response({"signed_out": True, "problems": problems,
                                  "revocation": revocation})

    route("GET", "/v1/token", READ, get_token)
    route("GET", "/v1/id_token", READ, get_id_token)
    route("GET", "/v1/userinfo", READ, get_userinfo)
    route("GET", "/v1/status", READ, get_status)
    route("GET", "/v1/events", READ, get_events)
    route("GET", "/v1/metrics", READ, get_metrics)
    route("POST", "/v1/login", ADMIN, post_login)
    route("POST", "/v1/refresh", ADMIN, post_refresh)
    route("POST", "/v1/logout", ADMIN, post_logout)
    return app


# A year: longer than any token lives, so a larger min_ttl is a mistake.
MAX_MIN_TTL = 365 * 86_400


def _valid(driver: Driver) -> bool:
    left = driver.remaining()
    return left is None or left > 0


def status_document(snapshot: Snapshot, driver: Driver | None = None) -> dict[str, Any]:
    """What the agent is doing; with `driver`, also what it is set up with (the
    provider, the client, the scopes, its files) and whether it holds a refresh token.
    Never a token or a code other than the user code on screen."""
    def when(value: float | None) -> str | None:
        return None if value is None else rfc3339(value)

    doc: dict[str, Any] = {
        "state": snapshot.phase.value,
        "device_name": snapshot.device_name,
        "user": snapshot.user,
        "token_expires_at": when(snapshot.token_expires_at),
        "code": None,
        "next_code_at": when(snapshot.next_code_at),
        "last_error": snapshot.last_error,
        "version": __version__,
    }
    if snapshot.phase == Phase.AWAITING_USER:
        doc["code"] = {
            "user_code": snapshot.user_code,
            "verification_uri": snapshot.verification_uri,
            "verification_uri_complete": snapshot.verification_uri_complete,
            "expires_at": when(snapshot.code_expires_at),
        }
    if driver is not None:
        doc.update(_setup_fields(driver))
    return doc


def _setup_fields(driver: Driver) -> dict[str, Any]:
    settings = driver.settings
    creds = driver.credentials
    return {
        "issuer": settings.issuer,
        "client_id": settings.client.client_id,
        "scopes_requested": list(settings.scopes),
        # What the provider granted, which may differ from what was asked (RFC 6749 §3.3).
        "scope": None if creds is None else creds.tokens.scope,
        "has_refresh_token": creds is not None and creds.tokens.refresh_token is not None,
        "files": {name: str(path) for name, path in driver.files.items()},
    }


@web.middleware
async def _json_errors(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                       ) -> web.StreamResponse:
    try:
        return await handler(request)
    except AgentError as exc:
        # Store trouble during a refresh or logout, say: still JSON, never a traceback.
        log.error("api: %s %s failed: %s", request.method, request.path, exc)
        return _error(500, "internal_error", str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed",
                413: "too_large"}.get(exc.status, "bad_request")
        return _error(exc.status, code, exc.reason)


class _KeepsItsBacklog(socket.socket):
    """asyncio's `backlog` is both what it passes to listen() and how many queued
    connections it takes a wake-up (ACCEPT_BATCH); the kernel's queue stays BACKLOG,
    from the first moment the server listens."""

    def listen(self, _backlog: int = BACKLOG) -> None:
        super().listen(BACKLOG)


class ApiServer:
    """The API on a Unix socket: bound here, or taken over from systemd. Connections
    pass the app's `ConnectionGuard` before aiohttp sees them."""

    def __init__(self, app: web.Application, path: Path, *, mode: int = 0o660,
                 sock: socket.socket | None = None) -> None:
        self._app = app
        self.path = path
        self._mode = mode
        self._inherited = sock
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._restore_accept_errors: Callable[[], None] | None = None
        # (st_dev, st_ino) of the socket file this server bound; None until it has.
        self._bound: tuple[int, int] | None = None

    async def start(self) -> None:
        # Event-stream clients never hang up by themselves: at shutdown they get half a
        # second, so SIGTERM ends the agent well within systemd's stop timeout.
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        assert self._runner.server is not None  # set up above
        sock = self._inherited
        if sock is None:
            _prepare_socket_path(self.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(str(self.path))
                info = os.lstat(self.path)
                self._bound = (info.st_dev, info.st_ino)
                # At once: a socket bound but not listening refuses connections, and
                # another agent starting now would take it for a stale one.
                sock.listen(BACKLOG)
            except OSError:
                sock.close()
                self._remove_own_socket()
                raise
        loop = asyncio.get_running_loop()
        self._restore_accept_errors = quiet_accept_errors(loop)
        # create_server, not create_unix_server: from Python 3.13 the latter unlinks
        # the socket file on close, and an inherited socket's file is systemd's (the
        # one this agent bound it removes itself, if it is still the one it bound).
        sock = _KeepsItsBacklog(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self._listener = await loop.create_server(
            self._app[GUARD].protocol_factory(self._runner.server), sock=sock,
            backlog=ACCEPT_BATCH)
        if self._inherited is None:
            # Bound under the daemon's umask (0077 under systemd: owner only), then
            # opened to the group: it never starts out wider than configured.
            os.chmod(self.path, self._mode)
        where = sock.getsockname()
        log.info("api listening on %s%s", where,
                 " (socket from systemd)" if self._inherited is not None else "")

    @property
    def guard(self) -> ConnectionGuard:
        return self._app[GUARD]

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.guard.shut_out_the_silent()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.guard.abort_all()
        self._remove_own_socket()
        if self._restore_accept_errors is not None:
            self._restore_accept_errors()
            self._restore_accept_errors = None

    def _remove_own_socket(self) -> None:
        """Only a socket file this server bound, and only while it is still that file:
        an agent that failed to start must not take the running agent's socket with it,
        nor an agent whose socket was replaced remove its successor's. An inherited
        socket belongs to systemd."""
        bound, self._bound = self._bound, None
        if bound is None:
            return
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) == bound:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _prepare_socket_path(path: Path) -> None:
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o755, parents=True)
    info = parent.stat()
    if info.st_uid != os.getuid() and info.st_uid != 0:
        raise AgentError(f"{parent} belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise AgentError(f"{parent} is writable by everyone; choose another api.socket")
    if path.exists() or path.is_symlink():
        found = path.lstat()
        if not stat.S_ISSOCK(found.st_mode):
            raise AgentError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            # Left behind by an agent that died; unless another agent has just bound a
            # new one in its place.
            with contextlib.suppress(FileNotFoundError):
                now = path.lstat()
                if (now.st_dev, now.st_ino) == (found.st_dev, found.st_ino):
                    path.unlink()
        else:
            raise AgentError(f"another agent is already listening on {path}")
        finally:
            with contextlib.suppress(OSError):
                probe.close()
