"""The console display: a terminal, or the journal when stdout is not a terminal.

On a terminal the current screen is a live block at the bottom: while a code is shown
only its countdown line is rewritten each second (cursor up, erase line), so the QR code
does not flicker, and a new screen replaces the block. The agent's log lines, when they
go to the same terminal, are printed above the block (`agent.logs.LiveArea`): the block
is erased, the line written, the block drawn again. Nothing else on the terminal is
erased, so the block must fit on it: a sign-in with its QR code fits 80x24 for links up
to about 80 characters (the QR code at level M with a 2-module quiet zone, the text
beside it); where it cannot, the block says so and shows the URL and code alone.

Anywhere else (journald, a pipe, a file) each distinct screen is written once as plain
lines, with no escape sequences: a countdown tick would otherwise add a journal entry a
second.

QR codes are drawn with Unicode half blocks, two module rows per text line. Scanners
expect dark modules on a light ground, with a light quiet zone around them:

- on a terminal, QR lines are set black on white explicitly, so the result does not
  depend on the terminal's colour scheme; the glyphs draw the dark modules;
- without colour codes, the glyphs take the text colour, which in a terminal or a
  ``journalctl`` pager is usually light on a dark ground, so they draw the *light*
  modules and the quiet zone, and the dark modules are left blank.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from typing import TextIO

from agent.clock import Clock, SystemClock
from agent.display.qr import QrMatrix, qr_matrix
from agent.display.screens import CODE_INSTRUCTION, Screen, short_url
from agent.logs import attach_live_area, detach_live_area

__all__ = ["ConsoleDisplay", "half_block_lines"]

QUIET_ZONE = 4  # modules of light border on every side, where room is no object
# On a terminal the quiet zone is set white on purpose, so 2 modules scan as well as 4
# and leave 80x24 room for a version 5 symbol beside its text.
TERMINAL_QUIET_ZONE = 2

_BOLD = "\x1b[1m"
_RESET = "\x1b[0m"
# Black on white; 107 is bright white, and a terminal that lacks it keeps the 47 before
# it. The leading 0 clears bold, which some terminals render as a grey "bright black".
_QR_COLOURS = "\x1b[0;30;47;107m"
_LINE_UP_AND_ERASE = "\x1b[1A\r\x1b[2K"

_BAR_WIDTH = 20
# Where a terminal does not say its size (a serial line, a pipe forced to "tty").
_DEFAULT_SIZE = (80, 24)
_GAP = 2  # columns between the QR code and the text beside it
_LABEL = 12  # "enter code  "
# The text beside a QR code needs room for "enter code  123 456 789" on one line.
_MIN_TEXT = _LABEL + 12
# A line of screens.py's code screen that is wrong where no QR code is drawn.
_SCAN_LINE = "or scan the QR code"
_LINK_LABEL = "Link with the code filled in:"
_BREAK_AFTER = "/.?&=-"

# (top, bottom) -> glyph; True where the glyph is inked.
_HALF_BLOCKS = {
    (True, True): "█",
    (True, False): "▀",
    (False, True): "▄",
    (False, False): " ",
}


def half_block_lines(matrix: QrMatrix, *, ink_dark: bool,
                     quiet_zone: int = QUIET_ZONE) -> list[str]:
    """The symbol as text, with `quiet_zone` light modules around it.

    `ink_dark` says which modules the glyphs draw: the dark ones (for text set dark on
    light) or the light ones (for light text on a dark ground). An odd row count leaves
    half a text line at the bottom, which is filled as quiet zone.
    """
    side = matrix.size + 2 * quiet_zone

    def inked(row: int, col: int) -> bool:
        r, c = row - quiet_zone, col - quiet_zone
        dark = 0 <= r < matrix.size and 0 <= c < matrix.size and matrix.modules[r][c]
        return dark == ink_dark

    return [
        "".join(_HALF_BLOCKS[inked(top, col), inked(top + 1, col)] for col in range(side))
        for top in range(0, side, 2)
    ]


class ConsoleDisplay:
    """Writes screens to `stream` (stdout by default), as a live block or as lines.

    `tty` defaults to ``stream.isatty()``, except that ``TERM=dumb`` (an editor's shell
    buffer, for one) gets plain lines since it cannot move the cursor. `clock` turns the
    countdown into a time of day in the plain output, where it is written only once.
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None,
                 clock: Clock | None = None) -> None:
        self._stream: TextIO = stream if stream is not None else sys.stdout
        self._tty = _is_terminal(self._stream) if tty is None else tty
        self._clock: Clock = clock if clock is not None else SystemClock()
        # Log lines come from any thread; a block half drawn must not be written into.
        self._lock = threading.RLock()
        # The last screen with its countdown fields cleared: a new value here is a new
        # screen, an equal one at most a new countdown.
        self._drawn: Screen | None = None
        # The live block as written, one entry a terminal line; the cursor is at the
        # start of the line below it.
        self._block: list[str] = []
        # The countdown text while it is the block's last line (and can be rewritten).
        self._countdown: str | None = None
        self._size: tuple[int, int] = _DEFAULT_SIZE
        self._shown: Screen | None = None  # the block's screen, to lay it out again

    async def start(self) -> None:
        # Draw in full: whatever is on the terminal now is not ours to erase.
        with self._lock:
            self._forget()

    async def show(self, screen: Screen) -> None:
        with self._lock:
            self._shown = screen
            # Pages are for pixel panels: the terminal shows the QR code and the URL.
            key = replace(screen, seconds_left=None, progress=None, page=0)
            if key == self._drawn:
                if self._tty and self._block:
                    self._update(screen)
                return
            self._drawn = key
            if not self._tty:
                self._write(self._plain_block(screen))
                return
            erase = self._erase()
            self._size = self._terminal_size()
            self._block = self._terminal_block(screen)
            self._write(erase + self._render())
            if self._block:
                attach_live_area(self)

    async def close(self) -> None:
        with self._lock:
            text = ""
            drawn = self._drawn
            if self._tty and self._block and drawn is not None and drawn.kind == "code":
                # The agent stops polling, so a code still on the terminal could no
                # longer sign anyone in: take it down rather than leave it looking usable.
                code = drawn.user_code_display
                what = f"The code {_clean(code)}" if code else "This code"
                text = self._erase() + f"{what} is no longer valid\n"
            self._forget()
            if text:
                self._write(text)
            else:
                self._stream.flush()

    @contextlib.contextmanager
    def lifted(self, stream: TextIO) -> Iterator[None]:
        """`agent.logs.LiveArea`: lets a log line through above the live block."""
        with self._lock:
            if not self._block or not _same_terminal(self._stream, stream):
                yield
                return
            self._quietly(self._erase())
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    stream.flush()
                size = self._terminal_size()
                if size != self._size and self._shown is not None:
                    # Laid out for a terminal since resized, its lines would wrap into
                    # more rows than the next erase goes up, and copies would pile up.
                    self._size = size
                    self._block = self._terminal_block(self._shown)
                self._quietly(self._render())

    # -- the live block ----------------------------------------------------------------

    def _update(self, screen: Screen) -> None:
        size = self._terminal_size()
        if size != self._size:
            # Laid out again for the new size: a QR code that did not fit may now.
            erase = self._erase()
            self._size = size
            self._block = self._terminal_block(screen)
            self._write(erase + self._render())
            return
        if self._countdown is None:
            return
        text = _countdown(screen)
        if text is not None and text != self._countdown:
            self._block[-1] = text
            self._countdown = text
            self._write(_LINE_UP_AND_ERASE + text + "\n")

    def _erase(self) -> str:
        if not self._block:
            return ""
        # Back to the block's first line, then everything from there down: the block
        # is all that has been written since (log lines come through `lifted`).
        return f"\r\x1b[{len(self._block)}A\x1b[J"

    def _render(self) -> str:
        return "".join(line + "\n" for line in self._block)

    def _forget(self) -> None:
        self._drawn = None
        self._block = []
        self._countdown = None
        detach_live_area(self)

    def _quietly(self, text: str) -> None:
        # Inside a log call: a terminal that has gone away must not turn logging into
        # an exception in whatever code was logging.
        with contextlib.suppress(OSError, ValueError):
            self._write(text)

    # -- rendering ---------------------------------------------------------------------

    def _terminal_block(self, screen: Screen) -> list[str]:
        self._countdown = None
        if screen.kind == "blank":
            return []
        columns, rows = self._size
        room = rows - 1  # the cursor's own line below the block
        title = _clean(screen.title)
        if screen.device_name:
            title += f" ({_clean(screen.device_name)})"
        out = [_BOLD + line + _RESET for line in _wrap(title, columns)]
        if screen.kind != "code":
            for line in screen.lines:
                out.extend(_wrap(_clean(line), columns))
        else:
            out.extend(self._code_body(screen, columns, room - len(out)))
            countdown = _countdown(screen)
            if countdown is not None:
                out.append(countdown)
            self._countdown = countdown
        # A blank line between the log and the block, where there is room for it.
        return ["", *out] if len(out) < room else out

    def _code_body(self, screen: Screen, columns: int, room: int) -> list[str]:
        """What goes between the title and the countdown, in `room` lines at most."""
        room -= 1 if screen.seconds_left is not None else 0
        extra = [line for line in screen.lines if line != CODE_INSTRUCTION]
        link = screen.qr_data
        if link and screen.url and short_url(link) == screen.url:
            link = None  # the URL line says it already
        qr = _qr_lines(screen.qr_data, ink_dark=True, quiet_zone=TERMINAL_QUIET_ZONE)
        if qr is not None:
            width = len(qr[0])
            side = columns - width - _GAP
            if side >= _MIN_TEXT:
                body = _beside(qr, _code_text(screen, extra, link, side))
                if len(body) <= room:
                    return body
            if width <= columns:
                body = (_code_text(screen, extra, link, columns)
                        + [_QR_COLOURS + line + _RESET for line in qr])
                if len(body) <= room:
                    return body
            note = (f"No room for the QR code in {columns}x{self._size[1]}: "
                    "a larger terminal shows it")
        elif screen.qr_data:
            note = "The link is too long for a QR code"
        else:
            note = None
        extra = [line for line in extra if line != _SCAN_LINE]
        notes = _wrap(note, columns) if note else []
        body = _code_text(screen, extra, link, columns) + notes
        if len(body) > room and link:
            body = _code_text(screen, extra, None, columns) + notes
        return body

    def _plain_block(self, screen: Screen) -> str:
        title = _clean(screen.title)
        if screen.device_name:
            title += f" ({_clean(screen.device_name)})"
        out = [title]
        if screen.kind != "code":
            out.extend("  " + _clean(line) for line in screen.lines)
            return "\n".join(out) + "\n"

        # Code and URL first, as text: a person reading `journalctl` may have no way
        # to scan, and RFC 8628 §3.3.1 wants both shown whatever else is.
        steps = []
        if screen.url:
            steps.append(f"Open {_clean(screen.url)}")
        if screen.user_code_display:
            steps.append(f"enter code {_clean(screen.user_code_display)}")
        if steps:
            out.append("  " + " and ".join(steps))
        out.extend("  " + _clean(line) for line in screen.lines if line != CODE_INSTRUCTION)
        if screen.qr_data and short_url(screen.qr_data) != screen.url:
            out.append(f"  {_LINK_LABEL} {_clean(screen.qr_data)}")
        if screen.seconds_left is not None:
            # Written once, so a time of day, not a figure that is stale at once.
            until = datetime.fromtimestamp(self._clock.time() + screen.seconds_left)
            out.append(f"  Code valid for {screen.seconds_left} s, until "
                       f"{until.strftime('%H:%M:%S')}")
        qr = _qr_lines(screen.qr_data, ink_dark=False, quiet_zone=QUIET_ZONE)
        if qr is not None:
            out.extend(qr)
        return "\n".join(out) + "\n"

    def _terminal_size(self) -> tuple[int, int]:
        try:
            size = os.get_terminal_size(self._stream.fileno())
        except (AttributeError, OSError, ValueError):
            return _DEFAULT_SIZE
        # 0 means "unknown" (a serial console that was never told).
        return (size.columns or _DEFAULT_SIZE[0], size.lines or _DEFAULT_SIZE[1])

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()


def _qr_lines(data: str | None, *, ink_dark: bool, quiet_zone: int) -> list[str] | None:
    if not data:
        return None
    try:
        matrix = qr_matrix(data)
    except ValueError:
        return None  # too long for any QR code; the text still says it all
    return half_block_lines(matrix, ink_dark=ink_dark, quiet_zone=quiet_zone)


def _code_text(screen: Screen, extra: list[str], link: str | None, width: int) -> list[str]:
    """The URL, the code, the other lines and the full link, wrapped to `width`."""
    out: list[str] = []
    for label, value in (("Open", screen.url), ("enter code", screen.user_code_display)):
        if value:
            out.extend(_BOLD + line + _RESET for line in _labelled(label, _clean(value), width))
    for line in extra:
        out.extend(_wrap(_clean(line), width))
    if link:
        out.append("")
        out.extend(_wrap(_LINK_LABEL, width))
        out.extend(_wrap(_clean(link), width))
    return out


def _beside(qr: list[str], text: list[str]) -> list[str]:
    # The text starts level with the symbol itself, below the quiet zone's first line.
    top = 1 if len(text) < len(qr) else 0
    blank = " " * len(qr[0])
    out = []
    for row in range(max(len(qr), top + len(text))):
        left = _QR_COLOURS + qr[row] + _RESET if row < len(qr) else blank
        index = row - top
        right = text[index] if 0 <= index < len(text) else ""
        out.append(left + " " * _GAP + right if right else left.rstrip())
    return out


def _labelled(label: str, value: str, width: int) -> list[str]:
    chunks = _wrap(value, width - _LABEL)
    return [label.ljust(_LABEL) + chunks[0]] + [" " * _LABEL + chunk for chunk in chunks[1:]]


def _wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` terminal cells, broken at spaces where a
    word fits a line and anywhere else (a URL) where not. The block's height on screen
    must be its number of lines, so no line may be left for the terminal to wrap."""
    width = max(1, width)
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if _cells(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for ch in word:
            if line and _cells(line + ch) > width:
                # A link reads better broken after a "/" or "=" than mid-word.
                cut = max(line.rfind(mark) for mark in _BREAK_AFTER) + 1
                if cut <= len(line) // 2:
                    cut = len(line)
                lines.append(line[:cut])
                line = line[cut:]
            line += ch
    lines.append(line)
    return lines


def _cells(text: str) -> int:
    # East Asian wide characters (and most emoji) take two cells, combining marks none.
    return sum(0 if unicodedata.combining(ch)
               else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def _same_terminal(ours: TextIO, theirs: TextIO) -> bool:
    if ours is theirs:
        return True
    try:
        if not theirs.isatty():
            return False
        mine, other = os.fstat(ours.fileno()), os.fstat(theirs.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (mine.st_dev, mine.st_ino) == (other.st_dev, other.st_ino)


def _countdown(screen: Screen) -> str | None:
    if screen.kind != "code" or screen.seconds_left is None:
        return None
    if screen.seconds_left <= 0:
        return "Code expired"
    minutes, seconds = divmod(screen.seconds_left, 60)
    text = f"Code expires in {minutes}:{seconds:02d}"
    if screen.progress is not None:
        # Rounded down, so the bar starts to shrink with the first second gone.
        filled = int(min(1.0, max(0.0, screen.progress)) * _BAR_WIDTH)
        text += f"  [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}]"
    return text


def _clean(text: str) -> str:
    # User names, codes, URLs and error texts come from the provider or the network: a
    # control character in them could move the cursor, retitle the terminal or forge a
    # journal line, so anything unprintable is shown as "?".
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _is_terminal(stream: TextIO) -> bool:
    try:
        terminal = stream.isatty()
    except (AttributeError, OSError, ValueError):
        return False
    return terminal and os.environ.get("TERM") != "dumb"
