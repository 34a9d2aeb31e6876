"""`device-agent`: the daemon, the demo, and the commands scripts use.

Exit statuses follow sysexits(3), one per cause, so scripts can tell them apart:
0 ok; 2 usage; 69 no agent listening (EX_UNAVAILABLE); 70 an internal error, or the
agent cannot start for another reason, such as another agent on its socket
(EX_SOFTWARE); 73 `render` cannot write its file (EX_CANTCREAT); 75 not signed in yet
or the provider is unreachable, try again later (EX_TEMPFAIL); 77 not allowed
(EX_NOPERM); 78 configuration error (EX_CONFIG, which also stops systemd's restart
loop); 130 interrupted. README's table lists them with the commands that use each.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types
from collections.abc import Sequence

from agent import __version__
from agent.errors import STORE_NEEDS_A_PERSON, AgentError, ConfigError, StoreError

# Not typing's: a token read has no other use for the typing module (2.5 ms).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import asyncio
    import logging
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

    Subcommands = argparse._SubParsersAction[Any]

    from agent.config import AgentConfig

__all__ = ["main"]

EX_OK = 0
EX_USAGE = 2
EX_SOFTWARE = 70
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

DEFAULT_CONFIG = "/etc/device-agent/config.yaml"


def _log() -> logging.Logger:
    # Imported when a command logs: `token` and the other socket commands never do, and
    # logging's imports are a tenth of their start-up.
    import logging

    return logging.getLogger("agent.cli")


def _config_path(arg: str | None) -> Path:
    from pathlib import Path

    return Path(arg or os.environ.get("DEVICE_AGENT_CONFIG") or DEFAULT_CONFIG)


def _fail(message: str, status: int) -> int:
    print(f"device-agent: {message}", file=sys.stderr)
    return status


def _install_shutdown(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    import asyncio
    import signal

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


# -- run ------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from agent.config import load_config, still_the_example
    from agent.logs import setup_logging

    try:
        config = load_config(_config_path(args.config))
        placeholder = still_the_example(config)
        if placeholder is not None:
            raise ConfigError("provider.issuer", placeholder.removeprefix("provider.issuer "))
    except ConfigError as exc:
        setup_logging("info")
        _log().error("configuration error: %s", exc)
        return _fail(f"configuration error: {exc}", EX_CONFIG)
    setup_logging(config.logging.level)
    return _run_service(config)


def _run_service(config: AgentConfig, **serve_args: Any) -> int:
    import asyncio

    from agent.service import serve

    async def main() -> None:
        stop = _install_shutdown(asyncio.get_running_loop())
        await serve(config, shutdown=stop.wait(), **serve_args)

    try:
        asyncio.run(main())
    except ConfigError as exc:
        _log().error("configuration error: %s", exc)
        return EX_CONFIG
    except STORE_NEEDS_A_PERSON as exc:
        # Restarting will not fix permissions, a newer file or a missing key; a person must.
        _log().error("%s", exc)
        return EX_CONFIG
    except StoreError as exc:
        _log().error("%s", exc)
        return EX_TEMPFAIL
    except AgentError as exc:
        _log().error("%s", exc)
        return EX_SOFTWARE
    return EX_OK


# -- demo -----------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    """The agent against the built-in test identity provider, on 127.0.0.1 unless
    --host says otherwise; a phone approves through --public-url or that host."""
    import asyncio
    import tempfile

    from agent.config import config_from_mapping, default_socket_path
    from agent.logs import setup_logging

    setup_logging("debug" if args.verbose else "info")
    try:
        from agent.idp import ProviderSettings, serve_provider
        from agent.idp.demo import check_public_url, open_to_the_network, people_url
    except ImportError as exc:  # pragma: no cover - the idp ships with the package
        return _fail(f"the demo provider is unavailable: {exc}", EX_SOFTWARE)
    public_url = None
    if args.public_url is not None:
        try:
            public_url = check_public_url(args.public_url)
        except ValueError as exc:
            return _fail(str(exc), EX_USAGE)

    async def main() -> None:
        stop = _install_shutdown(asyncio.get_running_loop())
        # A person types the code here by hand, so the demo forgives the spaces and
        # dashes that authentik, and the tests' provider, refuse.
        settings = ProviderSettings(code_lifetime=args.code_lifetime,
                                    device_name=args.device_name, lenient_user_codes=True)
        async with serve_provider(settings, host=args.host, port=args.port) as provider:
            # The agent keeps provider.issuer; only what a person is shown moves.
            shown, note = (public_url, None) if public_url else people_url(
                args.host, provider.base_url)
            settings.public_url = shown
            if note:
                _log().info("%s", note)
            if open_to_the_network(args.host):
                _log().warning("the demo provider is open to the network: anyone who "
                               "reaches it can approve a code as a demo user")
            if args.approve_after is not None:
                provider.auto_approve(args.approve_after, user="alice")
            with tempfile.TemporaryDirectory(prefix="device-agent-demo-") as state:
                config = config_from_mapping({
                    "provider": {
                        "issuer": provider.issuer,
                        "client_id": settings.client_id,
                        "allow_insecure_http": True,
                    },
                    "device": {"name": args.device_name},
                    "display": {"type": args.display},
                    # Plain text: the state is a temporary directory, gone at exit.
                    "storage": {"path": os.path.join(state, "credentials.json"),
                                "encryption": "off"},
                    "api": {"socket": str(args.socket or default_socket_path())},
                })
                _log().info("demo identity provider at %s; approval page: %s/device",
                            provider.base_url, shown or provider.base_url)
                from agent.service import serve

                await serve(config, shutdown=stop.wait())

    try:
        asyncio.run(main())
    except AgentError as exc:
        return _fail(str(exc), EX_SOFTWARE)
    except OSError as exc:
        # Nearly always the bind: an address not on this machine, or a port in use.
        return _fail(f"the demo cannot listen on {args.host} port {args.port}: {exc}",
                     EX_CONFIG)
    return EX_OK


# -- commands that talk to a running agent ---------------------------------------

def _socket_path(args: argparse.Namespace) -> str | Path:
    """--socket, DEVICE_AGENT_SOCKET, a config named with --config or DEVICE_AGENT_CONFIG,
    the service's socket, then the per-user one. The config is read only when named: a
    token reader may not be allowed to read it (it can hold a client secret)."""
    from agent.paths import socket_location, tidy

    # Strings, as agent.client takes them: no pathlib on a token read.
    if args.socket:
        return tidy(args.socket)
    if os.environ.get("DEVICE_AGENT_SOCKET"):
        return tidy(os.environ["DEVICE_AGENT_SOCKET"])
    config_arg = args.config or os.environ.get("DEVICE_AGENT_CONFIG")
    if config_arg:
        from agent.config import load_config

        return load_config(_config_path(config_arg)).api.socket
    from agent.client import SERVICE_SOCKET

    if os.path.lexists(SERVICE_SOCKET):
        return SERVICE_SOCKET
    return socket_location()


def _api(args: argparse.Namespace, method: str, target: str) -> tuple[int, dict[str, Any]]:
    """The exit status and the answer; on failure `error` (a stable code, the API's own
    where it answered) and `message`."""
    from agent.client import (
        AgentNotAllowed,
        AgentUnavailable,
        SocketUntrusted,
        call,
        check_socket,
    )

    try:
        path = _socket_path(args)
    except ConfigError as exc:
        return EX_CONFIG, {"error": "config_error", "message": f"configuration error: {exc}"}
    try:
        check_socket(path)
        answer = call(path, method, target)
    except SocketUntrusted as exc:
        return EX_NOPERM, {"error": "socket_untrusted", "message": str(exc)}
    except AgentNotAllowed as exc:
        return EX_NOPERM, {"error": "forbidden", "message": str(exc)}
    except AgentUnavailable as exc:
        return EX_UNAVAILABLE, {"error": "agent_unavailable",
                                "message": f"{exc}; is device-agent running?"}
    except OSError as exc:
        return EX_UNAVAILABLE, {"error": "agent_unavailable",
                                "message": f"cannot talk to the agent at {path}: {exc}"}
    if answer.ok:
        return EX_OK, answer.body
    status = {403: EX_NOPERM, 503: EX_TEMPFAIL, 502: EX_TEMPFAIL, 409: EX_TEMPFAIL,
              400: EX_USAGE}.get(answer.status, EX_SOFTWARE)
    return status, {"message": answer.message, "error": answer.error}


def _refuse(args: argparse.Namespace, body: dict[str, Any], status: int) -> int:
    if getattr(args, "json", False):
        # A script that asked for JSON parses stdout whatever happened.
        print(json.dumps({"error": body.get("error", "failed"), "message": body["message"]},
                         indent=2))
        return status
    return _fail(body["message"], status)


def cmd_token(args: argparse.Namespace) -> int:
    target = "/v1/token"
    if args.min_ttl:
        target += f"?min_ttl={args.min_ttl}"
    status, body = _api(args, "GET", target)
    if status != EX_OK:
        return _refuse(args, body, status)
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        print(body["access_token"])
    return EX_OK


# What each state means to a person reading `device-agent status`.
_STATE_MEANING = {
    "starting": "starting",
    "no_network": "the provider cannot be reached; retrying",
    "awaiting_user": "waiting for someone to enter the code",
    "code_expired": "the code expired; waiting for the next one",
    "throttled": "the provider asked to slow down; waiting",
    "denied": "the sign-in was refused; waiting before a new code",
    "needs_button": "press the button, or run `device-agent login`, to sign in",
    "signed_in": "signed in",
    "refresh_failing": "signed in, but refreshing the token fails",
    "config_error": "the provider refuses this client's setup",
    "stopping": "stopping",
}


def _epoch(rfc3339: str) -> float | None:
    import calendar

    try:
        return float(calendar.timegm(time.strptime(rfc3339, "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None


def _span(seconds: float) -> str:
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes = whole // 60
    if minutes < 120:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours < 48 else f"{hours // 24} days"


def _local(rfc3339: str, now: float) -> str:
    """An API time as a person on this device reads it: local, and how far off."""
    when = _epoch(rfc3339)
    if when is None:
        return rfc3339
    local = time.localtime(when)
    shape = "%H:%M %Z" if local[:3] == time.localtime(now)[:3] else "%Y-%m-%d %H:%M %Z"
    left = when - now
    off = f"in {_span(left)}" if left >= 0 else f"{_span(-left)} ago"
    return f"{time.strftime(shape, local)} ({off})"


def _show_status(body: dict[str, Any], socket_path: str | Path) -> None:
    from agent.display.screens import typing_hint
    from agent.logs import escape_controls

    now = time.time()

    # What the agent reports comes partly from the provider and the config (an error
    # text, a device name): a control character in it must not move the cursor or
    # start a line of its own, on the terminal as in the log.
    def line(label: str, value: object) -> None:
        print(f"{label + ':':<15}{escape_controls(str(value))}")

    def more(value: object) -> None:
        print(f"{'':<15}{escape_controls(str(value))}")

    state = str(body.get("state"))
    meaning = _STATE_MEANING.get(state)
    line("state", f"{state} ({meaning})" if meaning else state)
    code = body.get("code")
    if body.get("user"):
        line("user", f"{body['user']}" + (" (still signed in while the new code is shown)"
                                         if code else ""))
    if body.get("token_expires_at"):
        line("expires", _local(body["token_expires_at"], now))
    if "has_refresh_token" in body:
        if body["has_refresh_token"]:
            line("refresh token", "held: the token is renewed before it expires")
        elif body.get("user"):
            line("refresh token", "none: a person must sign in again when the token expires")
        else:
            line("refresh token", "none")
    if code:
        user_code = str(code.get("user_code"))
        # As issued: what a terminal shows may be typed as it stands.
        line("code", f"{user_code} ({typing_hint(user_code).lower()}) "
             f"at {code.get('verification_uri')}")
        if code.get("verification_uri_complete"):
            more(f"or open {code['verification_uri_complete']}")
        if code.get("expires_at"):
            more(f"the code expires {_local(code['expires_at'], now)}")
    if body.get("next_code_at"):
        line("next code", _local(body["next_code_at"], now))
    if body.get("last_error"):
        line("problem", body["last_error"])
    if "issuer" in body:
        line("issuer", body["issuer"] or "none (endpoints from the config)")
    if body.get("client_id"):
        line("client", body["client_id"])
    scopes = body.get("scope") or " ".join(body.get("scopes_requested") or [])
    if scopes:
        line("scopes", scopes)
    if body.get("device_name"):
        line("device name", body["device_name"])
    files = body.get("files") or {}
    for name in ("credentials", "session"):
        if files.get(name):
            line(name, files[name])
    line("socket", socket_path)
    if body.get("version"):
        line("version", body["version"])


def cmd_status(args: argparse.Namespace) -> int:
    status, body = _api(args, "GET", "/v1/status")
    if status != EX_OK:
        return _refuse(args, body, status)
    if args.json:
        print(json.dumps(body, indent=2))
        return EX_OK
    _show_status(body, _socket_path(args))
    return EX_OK


def cmd_admin(args: argparse.Namespace) -> int:
    status, body = _api(args, "POST", f"/v1/{args.command}")
    if status != EX_OK:
        return _fail(body["message"], status)
    if args.command == "login":
        if body.get("next_code_in", 0) > 0:
            # Not an error of the caller's, but no code is on the screen: scripts
            # must be able to tell.
            return _fail(f"no code now: the next one can come at {body.get('next_code_at')}",
                         EX_TEMPFAIL)
        print("a new code is on the screen")
    elif args.command == "logout":
        revocation = body.get("revocation")
        if revocation == "confirmed":
            print("signed out; the provider confirmed the revocation of the tokens")
        elif revocation == "nothing_to_revoke":
            print("not signed in; nothing to revoke")
        elif revocation == "not_confirmed":
            print("signed out here, but the provider has not confirmed the revocation: the "
                  "tokens may still work there until they expire")
        else:
            print("signed out")
        for problem in body.get("problems", []):
            print(f"  note: {problem}", file=sys.stderr)
    else:
        print(f"refreshed; token valid until {body.get('token_expires_at')}")
    return EX_OK


# -- checks ------------------------------------------------------------------------

def cmd_check_config(args: argparse.Namespace) -> int:
    from agent.config import load_config, still_the_example

    path = _config_path(args.file or args.config)
    try:
        config = load_config(path)
        # Panel options are checked by the panel's own code, as at start-up.
        from agent.display.factory import create_display

        create_display(config.display)
    except ConfigError as exc:
        # Every problem, one line each, so they are fixed in one go.
        for problem in exc.errors:
            print(f"device-agent: configuration error: {problem}", file=sys.stderr)
        count = len(exc.errors)
        if count > 1:
            print(f"device-agent: {path}: {count} problems", file=sys.stderr)
        return EX_CONFIG
    placeholder = still_the_example(config)
    if placeholder is not None:
        # Valid as a file, and `run` refuses it: said, not failed, while it is edited.
        print(f"device-agent: warning: {placeholder}", file=sys.stderr)
    where = config.provider.issuer or config.provider.device_authorization_endpoint
    print(f"{path}: OK (client {config.provider.client_id} at {where})")
    return EX_OK


def cmd_check_provider(args: argparse.Namespace) -> int:
    import asyncio

    from agent.config import load_config
    from agent.diagnose import check_provider

    try:
        config = load_config(_config_path(args.config))
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}", EX_CONFIG)
    findings = asyncio.run(check_provider(config, request_code=not args.no_device_request))
    for finding in findings:
        print(finding.render())
    return EX_CONFIG if any(f.level == "error" for f in findings) else EX_OK


# -- parser ------------------------------------------------------------------------

def _with_socket(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", help="API socket (default: from the config, "
                   "$DEVICE_AGENT_SOCKET, or the per-user runtime path)")
    p.add_argument("--config", help="config file to read the socket path from")


def _add_run(sub: Subcommands) -> None:
    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", help=f"config file (default: $DEVICE_AGENT_CONFIG or "
                     f"{DEFAULT_CONFIG})")
    run.set_defaults(func=cmd_run)


def _add_demo(sub: Subcommands) -> None:
    demo = sub.add_parser("demo", help="run against the built-in demo identity provider")
    demo.add_argument("--approve-after", type=float, metavar="SECONDS",
                      help="approve every code automatically after SECONDS")
    demo.add_argument("--port", type=int, default=0, help="provider port (default: any free)")
    demo.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                      help="address the provider listens on (default: 127.0.0.1); 0.0.0.0 "
                      "lets a phone on the same network approve")
    demo.add_argument("--public-url", metavar="URL",
                      help="the provider's address as the phone reaches it (a reverse proxy, "
                      "ssh -L): shown in the links; the agent keeps using loopback")
    demo.add_argument("--code-lifetime", type=float, default=300.0, metavar="SECONDS",
                      help="how long each code may be approved (default: 300)")
    demo.add_argument("--device-name", default="Demo device",
                      help="the name on the screen and on the approval page")
    demo.add_argument("--display", default="console",
                      help="where the code is shown: a display.type (default: console)")
    demo.add_argument("--socket", help="API socket (default: the per-user runtime path)")
    demo.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    demo.set_defaults(func=cmd_demo)


def _add_token(sub: Subcommands) -> None:
    token = sub.add_parser("token", help="print a valid access token")
    token.add_argument("--min-ttl", type=int, default=0, metavar="SECONDS",
                       help="refresh first if the token expires sooner than this")
    token.add_argument("--json", action="store_true",
                       help="print the whole answer as JSON (errors too, as "
                       "{\"error\", \"message\"})")
    _with_socket(token)
    token.set_defaults(func=cmd_token)


def _add_status(sub: Subcommands) -> None:
    status = sub.add_parser("status", help="show what the agent is doing")
    status.add_argument("--json", action="store_true",
                        help="print the status document as JSON, the code exactly as issued")
    _with_socket(status)
    status.set_defaults(func=cmd_status)


def _admin(name: str, text: str) -> Callable[[Subcommands], None]:
    def add(sub: Subcommands) -> None:
        p = sub.add_parser(name, help=text)
        _with_socket(p)
        p.set_defaults(func=cmd_admin)
    return add


def _add_check_config(sub: Subcommands) -> None:
    check = sub.add_parser("check-config", help="validate a config file: every problem, "
                                                "each with its key and line")
    check.add_argument("file", nargs="?",
                       help="the config file (default: --config, $DEVICE_AGENT_CONFIG or "
                            "/etc/device-agent/config.yaml)")
    check.add_argument("--config", metavar="FILE", help="the config file, as for `run`")
    check.set_defaults(func=cmd_check_config)


def _add_check_provider(sub: Subcommands) -> None:
    provider = sub.add_parser("check-provider",
                              help="check the identity provider's setup for this agent")
    provider.add_argument("--config", help=f"config file (default: $DEVICE_AGENT_CONFIG "
                          f"or {DEFAULT_CONFIG})")
    provider.add_argument("--no-device-request", action="store_true",
                          help="skip the device authorization request (it counts against "
                          "authentik's 20 requests an hour)")
    provider.set_defaults(func=cmd_check_provider)


def _add_render_and_install(sub: Subcommands) -> None:
    # These two bring modules of their own, imported only to build their parsers.
    from agent.display.render import register as register_render
    from agent.install import register as register_install

    register_render(sub)
    register_install(sub)


# The options of `token` that _read_token_line reads, by the attribute each sets.
_TOKEN_VALUES = {"--min-ttl": "min_ttl", "--socket": "socket", "--config": "config"}


def _read_token_line(argv: Sequence[str]) -> argparse.Namespace | None:
    """`token` and its options as scripts write them, read without argparse (with its
    imports, 3 ms of a token read); None for any other line, argparse's to read. The
    equality of the two readings is tested, not written down twice."""
    if not argv or argv[0] != "token":
        return None
    values: dict[str, Any] = {"command": "token", "min_ttl": 0, "json": False,
                              "socket": None, "config": None, "func": cmd_token}
    rest = iter(argv[1:])
    for arg in rest:
        option, given, value = arg.partition("=")
        if option == "--json" and not given:
            values["json"] = True
            continue
        key = _TOKEN_VALUES.get(option)
        if key is None:
            return None
        if given and value == "--":
            return None  # argparse 3.11 reads it as no value at all
        if not given:
            following = next(rest, None)
            # A value that looks like an option is argparse's to judge.
            if following is None or following.startswith("-"):
                return None
            value = following
        if key == "min_ttl":
            try:
                values[key] = int(value)
            except ValueError:
                return None
        else:
            values[key] = value
    return types.SimpleNamespace(**values)  # type: ignore[return-value]


# In the order `--help` lists them; render and install last, under names of their own.
_COMMANDS: dict[str, Callable[[Subcommands], None]] = {
    "run": _add_run,
    "demo": _add_demo,
    "token": _add_token,
    "status": _add_status,
    "login": _admin("login", "show a new code now (within the hourly budget)"),
    "logout": _admin("logout", "revoke the tokens at the provider and sign out; says "
                               "whether the provider confirmed"),
    "refresh": _admin("refresh", "refresh the token now"),
    "check-config": _add_check_config,
    "check-provider": _add_check_provider,
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line, every command in it; with `argv` naming one of `_COMMANDS`, that
    one alone, with a parser whose errors raise `Unparsed`."""
    from agent.commandline import CommandParser, OneCommandParser

    one = _COMMANDS.get(argv[0]) if argv else None
    parser = (CommandParser if one is None else OneCommandParser)(
        prog="device-agent",
        description="Sign this device in with the OAuth 2.0 device flow and keep its token fresh.")
    parser.add_argument("--version", action="version", version=f"device-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    if one is not None:
        one(sub)
        return parser
    for add in _COMMANDS.values():
        add(sub)
    _add_render_and_install(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _read_token_line(argv)
    if args is None:
        from agent.commandline import Unparsed

        try:
            # The parser of the command named alone, not all of them (1 ms).
            args = build_parser(argv).parse_args(argv)
        except Unparsed:
            args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        status = 130
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
