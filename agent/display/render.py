"""``device-agent render``: any screen on any panel geometry, as a PNG, without hardware.

The screen is built by `build_screen` from a made-up `Snapshot`, exactly as the agent
builds it, and drawn by `layout`, exactly as the panel drivers draw it; so a picture
made here is what the panel would show. ``--scale`` enlarges pixels without smoothing,
for README pictures.

    device-agent render --panel ssd1306 --screen code --out code.png --scale 4
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from agent.display.screens import Screen

__all__ = ["PANELS", "SCREENS", "Panel", "main", "register", "render_to_file",
           "synthetic_screen"]


@dataclass(frozen=True)
class Panel:
    width: int
    height: int
    mode: str


def _panels() -> dict[str, Panel]:
    from agent.display.kinds import KINDS

    panels: dict[str, Panel] = {}
    for name, kind in KINDS.items():
        if kind.family != "oled" or kind.geometry is None or kind.mode is None:
            continue  # a framebuffer, a png file or a terminal: no fixed picture
        panels[name] = Panel(*kind.geometry, kind.mode)
        for variant, (width, height) in kind.variants.items():
            panels[variant] = Panel(width, height, kind.mode)
    return panels


PANELS: Final[dict[str, Panel]] = _panels()

SCREENS: Final = ("code", "starting", "no_network", "code_expired", "needs_button",
                  "throttled", "denied", "signed_in", "refresh_failing", "config_error",
                  "stopping", "blank")

DEFAULT_URI: Final = "https://auth.example.com/device?code=123456789"
DEFAULT_CODE: Final = "123456789"
DEFAULT_NAME: Final = "Kitchen display"
# A fixed moment, so times of day on the pictures do not change from run to run.
_NOW_WALL: Final = datetime(2027, 1, 15, 12, 0, tzinfo=UTC).timestamp()
_NOW_MONO: Final = 10_000.0
_CODE_LIFETIME: Final = 60.0


def synthetic_screen(kind: str, *, uri: str = DEFAULT_URI, code: str = DEFAULT_CODE,
                     name: str = DEFAULT_NAME, progress: float = 0.75, page: int = 0
                     ) -> Screen:
    """The screen of `kind` as the agent would build it, with made-up details, on
    `page` (from 0) when the panel pages it."""
    from agent.display.screens import Screen, build_screen
    from agent.state import Phase, Snapshot

    if kind == "blank":
        return Screen(kind="blank", title="", lines=())
    later = _NOW_WALL + 300
    phases: dict[str, dict[str, Any]] = {
        "code": {"phase": Phase.AWAITING_USER, "user_code": code,
                 "verification_uri": uri.split("?", 1)[0], "verification_uri_complete": uri,
                 "code_deadline": _NOW_MONO + _CODE_LIFETIME * progress},
        "starting": {"phase": Phase.STARTING},
        "no_network": {"phase": Phase.NO_NETWORK,
                       "last_error": "cannot reach auth.example.com"},
        "code_expired": {"phase": Phase.CODE_EXPIRED, "next_code_at": later},
        "needs_button": {"phase": Phase.NEEDS_BUTTON},
        "throttled": {"phase": Phase.THROTTLED, "next_code_at": later + 600},
        "denied": {"phase": Phase.DENIED, "next_code_at": later},
        "signed_in": {"phase": Phase.SIGNED_IN, "user": "alice",
                      "token_expires_at": _NOW_WALL + 3600},
        "refresh_failing": {"phase": Phase.REFRESH_FAILING, "token_expires_at": _NOW_WALL + 1200,
                            "last_error": "provider unreachable"},
        "config_error": {"phase": Phase.CONFIG_ERROR,
                         "last_error": "invalid_client: unknown client"},
        "stopping": {"phase": Phase.STOPPING},
    }
    if kind not in phases:
        raise ValueError(f"unknown screen {kind!r}; one of {', '.join(SCREENS)}")
    snapshot = Snapshot(device_name=name, **phases[kind])
    return replace(build_screen(snapshot, now_mono=_NOW_MONO, now_wall=_NOW_WALL,
                                code_lifetime=_CODE_LIFETIME, tz=UTC), page=page)


def render_to_file(screen: Screen, out: Path, *, panel: Panel, scale: int = 1) -> str:
    """Write `screen` on `panel` to `out` as PNG; returns a line saying what was drawn."""
    import io

    from PIL import Image

    from agent.display.layout import compose
    from agent.fsutil import write_atomic

    frame = compose(screen, width=panel.width, height=panel.height, mode=panel.mode)
    image = frame.image
    if scale > 1:
        image = image.resize((panel.width * scale, panel.height * scale),
                             Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomic(out, buffer.getvalue(), mode=0o644)
    what = f"{out}: {screen.kind} on {panel.width}x{panel.height} {panel.mode!r}"
    if frame.qr is not None:
        qr = frame.qr
        what += (f"; QR version {qr.version}-{qr.error_correction}, {qr.module_size} px "
                 f"modules, quiet zone {qr.quiet_zone}")
    elif frame.qr_omitted:
        what += f"; no QR code: {frame.qr_omitted}"
    if frame.pages > 1:
        what += f"; page {frame.page + 1} of {frame.pages}"
    if frame.url_shortened:
        what += "; URL shortened to fit"
    return what


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``render`` to the CLI's subparsers (from ``add_subparsers``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "render", help="draw a screen as a PNG for a panel, without hardware",
        description="Draw one screen the way a panel would show it, into a PNG file.")
    parser.add_argument("--panel", choices=sorted(PANELS), default="ssd1306",
                        help="panel model, for its size and colours (default: ssd1306)")
    parser.add_argument("--rotate", type=int, choices=(0, 1, 2, 3), default=0,
                        help="quarter turns, as the panel's rotate option: 1 and 3 swap "
                             "width and height")
    parser.add_argument("--screen", choices=SCREENS, default="code",
                        help="which screen to draw (default: code)")
    parser.add_argument("--page", type=int, default=1, metavar="N",
                        help="the page of a code screen whose URL does not fit beside the "
                             "QR code: 1 the QR code, 2 the URL (default: 1)")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--uri", default=DEFAULT_URI,
                        help="verification_uri_complete (the part before ? is the URL "
                             "shown as text)")
    parser.add_argument("--code", default=DEFAULT_CODE, help="user code")
    parser.add_argument("--name", default=DEFAULT_NAME, help="device name")
    parser.add_argument("--progress", type=float, default=0.75,
                        help="time left on the code, from 0 to 1 (default: 0.75)")
    parser.add_argument("--scale", type=int, default=1,
                        help="enlarge each pixel to N x N (default: 1)")
    parser.set_defaults(func=cmd_render)
    return parser


def cmd_render(args: argparse.Namespace) -> int:
    import sys

    if args.scale < 1 or args.scale > 32:
        print("device-agent: --scale must be from 1 to 32", file=sys.stderr)
        return 2
    if not 0.0 <= args.progress <= 1.0:
        print("device-agent: --progress must be from 0 to 1", file=sys.stderr)
        return 2
    panel = PANELS[args.panel]
    if args.rotate % 2:
        panel = Panel(panel.height, panel.width, panel.mode)
    if args.page < 1:
        print("device-agent: --page counts from 1", file=sys.stderr)
        return 2
    screen = synthetic_screen(args.screen, uri=args.uri, code=args.code, name=args.name,
                              progress=args.progress, page=args.page - 1)
    try:
        print(render_to_file(screen, args.out, panel=panel, scale=args.scale))
    except OSError as exc:
        print(f"device-agent: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 73  # EX_CANTCREAT
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.display.render render ...``: the same command without the CLI."""
    parser = argparse.ArgumentParser(prog="device-agent")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
