"""`device-agent`: the daemon, the demo, and the commands scripts use.

Exit statuses follow sysexits(3), one per cause, so scripts can tell them apart:
0 ok; 2 usage; 69 no agent listening (EX_UNAVAILABLE); 75 not signed in yet or the
provider is unreachable, try again later (EX_TEMPFAIL); 77 not allowed (EX_NOPERM);
78 configuration error (EX_CONFIG, which also stops systemd's restart loop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.errors import AgentError, ConfigError, StoreError, StoreInsecure, StoreTooNew

if TYPE_CHECKING:
    from agent.config import AgentConfig

__all__ = ["main"]

EX_OK = 0
EX_USAGE = 2
EX_SOFTWARE = 70
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

DEFAULT_CONFIG = Path("/etc/device-agent/config.yaml")

log = logging.getLogger("agent.cli")


def _config_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get("DEVICE_AGENT_CONFIG") or DEFAULT_CONFIG)


def _fail(message: str, status: int) -> int:
    print(f"device-agent: {message}", file=sys.stderr)
    return status


def _install_shutdown(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


# -- run ------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from agent.config import load_config
    from agent.logs import setup_logging

    try:
        config = load_config(_config_path(args.config))
    except ConfigError as exc:
        setup_logging("info")
        log.error("configuration error: %s", exc)
        return _fail(f"configuration error: {exc}", EX_CONFIG)
    setup_logging(config.logging.level)
    return _run_service(config)


def _run_service(config: AgentConfig, **serve_args: Any) -> int:
    from agent.service import serve

    async def main() -> None:
        stop = _install_shutdown(asyncio.get_running_loop())
        await serve(config, shutdown=stop.wait(), **serve_args)

    try:
        asyncio.run(main())
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return EX_CONFIG
    except (StoreInsecure, StoreTooNew) as exc:
        # Restarting will not fix permissions or a damaged file; a person must.
        log.error("%s", exc)
        return EX_CONFIG
    except StoreError as exc:
        log.error("%s", exc)
        return EX_TEMPFAIL
    except AgentError as exc:
        log.error("%s", exc)
        return EX_SOFTWARE
    return EX_OK


# -- demo -----------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    """The agent against the built-in test identity provider on 127.0.0.1."""
    from agent.config import config_from_mapping, default_socket_path
    from agent.logs import setup_logging

    setup_logging("debug" if args.verbose else "info")
    try:
        from agent.idp import ProviderSettings, serve_provider
    except ImportError as exc:  # pragma: no cover - the idp ships with the package
        return _fail(f"the demo provider is unavailable: {exc}", EX_SOFTWARE)

    async def main() -> None:
        stop = _install_shutdown(asyncio.get_running_loop())
        settings = ProviderSettings(code_lifetime=args.code_lifetime)
        async with serve_provider(settings, host="127.0.0.1", port=args.port) as provider:
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
                    "storage": {"path": str(Path(state) / "credentials.json")},
                    "api": {"socket": str(args.socket or default_socket_path())},
                })
                log.info("demo identity provider at %s (approval page: %s/device)",
                         provider.base_url, provider.base_url)
                from agent.service import serve

                await serve(config, shutdown=stop.wait())

    try:
        asyncio.run(main())
    except AgentError as exc:
        return _fail(str(exc), EX_SOFTWARE)
    return EX_OK


# -- commands that talk to a running agent ---------------------------------------

def _socket_path(args: argparse.Namespace) -> Path:
    """--socket, DEVICE_AGENT_SOCKET, a config named with --config or DEVICE_AGENT_CONFIG,
    the service's socket, then the per-user one. The config is read only when named: a
    token reader may not be allowed to read it (it can hold a client secret)."""
    if args.socket:
        return Path(args.socket)
    if os.environ.get("DEVICE_AGENT_SOCKET"):
        return Path(os.environ["DEVICE_AGENT_SOCKET"])
    config_arg = args.config or os.environ.get("DEVICE_AGENT_CONFIG")
    if config_arg:
        from agent.config import load_config

        return load_config(_config_path(config_arg)).api.socket
    from agent.client import SERVICE_SOCKET

    if os.path.lexists(SERVICE_SOCKET):
        return SERVICE_SOCKET
    from agent.paths import default_socket_path

    return default_socket_path()


def _api(args: argparse.Namespace, method: str, target: str) -> tuple[int, dict[str, Any]]:
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
        return EX_CONFIG, {"message": f"configuration error: {exc}"}
    try:
        check_socket(path)
        answer = call(path, method, target)
    except SocketUntrusted as exc:
        return EX_NOPERM, {"message": str(exc)}
    except AgentNotAllowed as exc:
        return EX_NOPERM, {"message": str(exc)}
    except AgentUnavailable as exc:
        return EX_UNAVAILABLE, {"message": f"{exc}; is device-agent running?"}
    except OSError as exc:
        return EX_UNAVAILABLE, {"message": f"cannot talk to the agent at {path}: {exc}"}
    if answer.ok:
        return EX_OK, answer.body
    status = {403: EX_NOPERM, 503: EX_TEMPFAIL, 502: EX_TEMPFAIL, 409: EX_TEMPFAIL,
              400: EX_USAGE}.get(answer.status, EX_SOFTWARE)
    return status, {"message": answer.message, "error": answer.error}


def cmd_token(args: argparse.Namespace) -> int:
    target = "/v1/token"
    if args.min_ttl:
        target += f"?min_ttl={args.min_ttl}"
    status, body = _api(args, "GET", target)
    if status != EX_OK:
        return _fail(body["message"], status)
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        print(body["access_token"])
    return EX_OK


def cmd_status(args: argparse.Namespace) -> int:
    status, body = _api(args, "GET", "/v1/status")
    if status != EX_OK:
        return _fail(body["message"], status)
    if args.json:
        print(json.dumps(body, indent=2))
        return EX_OK
    print(f"state:   {body['state']}")
    if body.get("user"):
        print(f"user:    {body['user']}")
    if body.get("token_expires_at"):
        print(f"expires: {body['token_expires_at']}")
    code = body.get("code")
    if code:
        print(f"code:    {code['user_code']} at {code['verification_uri']}")
        print(f"         (expires {code['expires_at']})")
    if body.get("next_code_at"):
        print(f"next code: {body['next_code_at']}")
    if body.get("last_error"):
        print(f"problem: {body['last_error']}")
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
        print("signed out")
        for problem in body.get("problems", []):
            print(f"  note: {problem}", file=sys.stderr)
    else:
        print(f"refreshed; token valid until {body.get('token_expires_at')}")
    return EX_OK


# -- checks ------------------------------------------------------------------------

def cmd_check_config(args: argparse.Namespace) -> int:
    from agent.config import load_config

    try:
        config = load_config(Path(args.file))
        # Panel options are checked by the panel's own code, as at start-up.
        from agent.display.factory import create_display

        create_display(config.display)
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}", EX_CONFIG)
    where = config.provider.issuer or config.provider.device_authorization_endpoint
    print(f"{args.file}: OK (client {config.provider.client_id} at {where})")
    return EX_OK


def cmd_check_provider(args: argparse.Namespace) -> int:
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

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="device-agent",
        description="Sign this device in with the OAuth 2.0 device flow and keep its token fresh.")
    parser.add_argument("--version", action="version", version=f"device-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_socket(p: argparse.ArgumentParser) -> None:
        p.add_argument("--socket", help="API socket (default: from the config, "
                       "$DEVICE_AGENT_SOCKET, or the per-user runtime path)")
        p.add_argument("--config", help="config file to read the socket path from")

    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", help=f"config file (default: $DEVICE_AGENT_CONFIG or "
                     f"{DEFAULT_CONFIG})")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="run against the built-in demo identity provider")
    demo.add_argument("--approve-after", type=float, metavar="SECONDS",
                      help="approve every code automatically after SECONDS")
    demo.add_argument("--port", type=int, default=0, help="provider port (default: any free)")
    demo.add_argument("--code-lifetime", type=float, default=300.0, metavar="SECONDS")
    demo.add_argument("--device-name", default="Demo device")
    demo.add_argument("--display", default="console")
    demo.add_argument("--socket", help="API socket (default: the per-user runtime path)")
    demo.add_argument("-v", "--verbose", action="store_true")
    demo.set_defaults(func=cmd_demo)

    token = sub.add_parser("token", help="print a valid access token")
    token.add_argument("--min-ttl", type=int, default=0, metavar="SECONDS",
                       help="refresh first if the token expires sooner than this")
    token.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    with_socket(token)
    token.set_defaults(func=cmd_token)

    status = sub.add_parser("status", help="show what the agent is doing")
    status.add_argument("--json", action="store_true")
    with_socket(status)
    status.set_defaults(func=cmd_status)

    for name, text in (("login", "show a new code now (within the hourly budget)"),
                       ("logout", "revoke the tokens and sign out"),
                       ("refresh", "refresh the token now")):
        p = sub.add_parser(name, help=text)
        with_socket(p)
        p.set_defaults(func=cmd_admin)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    provider = sub.add_parser("check-provider",
                              help="check the identity provider's setup for this agent")
    provider.add_argument("--config")
    provider.add_argument("--no-device-request", action="store_true",
                          help="skip the device authorization request (it counts against "
                          "authentik's 20 requests an hour)")
    provider.set_defaults(func=cmd_check_provider)

    from agent.display.render import register as register_render
    from agent.install import register as register_install

    register_render(sub)
    register_install(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        status = 130
    log.debug("%s finished in %.2f s", args.command, time.monotonic() - started)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
