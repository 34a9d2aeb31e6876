"""The console display: a terminal, or the journal when stdout is not a terminal.

On a terminal the screen is drawn as a block, and while a code is shown only its
countdown line is rewritten each second (cursor up, erase line), so the QR code does
not flicker. Anywhere else (journald, a pipe, a file) each distinct screen is written
once as plain lines: a countdown tick would otherwise add a journal entry a second.

QR codes are drawn with Unicode half blocks, two module rows per text line. Scanners
expect dark modules on a light ground, with a light quiet zone around them:

- on a terminal, QR lines are set black on white explicitly, so the result does not
  depend on the terminal's colour scheme; the glyphs draw the dark modules;
- without colour codes, the glyphs take the text colour, which in a terminal or a
  ``journalctl`` pager is usually light on a dark ground, so they draw the *light*
  modules and the quiet zone, and the dark modules are left blank.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from datetime import datetime
from typing import TextIO

from agent.clock import Clock, SystemClock
from agent.display.qr import QrMatrix, qr_matrix
from agent.display.screens import CODE_INSTRUCTION, Screen

__all__ = ["ConsoleDisplay", "half_block_lines"]

QUIET_ZONE = 4  # modules of light border on every side

_BOLD = "\x1b[1m"
_RESET = "\x1b[0m"
# Black on white; 107 is bright white, and a terminal that lacks it keeps the 47 before
# it. The leading 0 clears bold, which some terminals render as a grey "bright black".
_QR_COLOURS = "\x1b[0;30;47;107m"
_LINE_UP_AND_ERASE = "\x1b[1A\r\x1b[2K"

_BAR_WIDTH = 20

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
    """Writes screens to `stream` (stdout by default), as a terminal block or as lines.

    `tty` defaults to ``stream.isatty()``, except that ``TERM=dumb`` (an editor's shell
    buffer, for one) gets plain lines since it cannot move the cursor. `clock` turns the
    countdown into a time of day in the plain output, where it is written only once.
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None,
                 clock: Clock | None = None) -> None:
        self._stream: TextIO = stream if stream is not None else sys.stdout
        self._tty = _is_terminal(self._stream) if tty is None else tty
        self._clock: Clock = clock if clock is not None else SystemClock()
        # The last screen with its countdown fields cleared: a new value here is a new
        # screen, an equal one at most a new countdown.
        self._drawn: Screen | None = None
        # The countdown text when it is the terminal's last line (and can be rewritten).
        self._countdown: str | None = None

    async def start(self) -> None:
        self._drawn = None
        self._countdown = None

    async def show(self, screen: Screen) -> None:
        key = replace(screen, seconds_left=None, progress=None)
        if key == self._drawn:
            if self._tty and self._countdown is not None:
                text = _countdown(screen)
                if text is not None and text != self._countdown:
                    self._write(_LINE_UP_AND_ERASE + text + "\n")
                    self._countdown = text
            return
        self._drawn = key
        if self._tty:
            text = self._retire_countdown() + self._terminal_block(screen)
        else:
            text = self._plain_block(screen)
        self._write(text)

    async def close(self) -> None:
        # The agent stops polling, so a code still on the terminal could no longer sign
        # anyone in; say so rather than leave it looking usable.
        text = self._retire_countdown() if self._tty else ""
        self._drawn = None
        if text:
            self._write(text)
        else:
            self._stream.flush()

    # -- rendering ---------------------------------------------------------------------

    def _retire_countdown(self) -> str:
        if self._countdown is None:
            return ""
        self._countdown = None
        return _LINE_UP_AND_ERASE + "This code is no longer valid\n"

    def _terminal_block(self, screen: Screen) -> str:
        out = ["", _BOLD + _clean(screen.title) + _RESET]
        if screen.device_name:
            out.append(_clean(screen.device_name))
        if screen.kind != "code":
            out.extend(_clean(line) for line in screen.lines)
            return "\n".join(out) + "\n"

        if screen.url:
            out.append(f"{_BOLD}Open        {_clean(screen.url)}{_RESET}")
        if screen.user_code_display:
            out.append(f"{_BOLD}enter code  {_clean(screen.user_code_display)}{_RESET}")
        out.extend(_clean(line) for line in screen.lines if line != CODE_INSTRUCTION)
        qr = self._qr_lines(screen.qr_data, ink_dark=True)
        if qr is not None and not self._fits(len(qr[0])):
            out.append("(the terminal is too narrow for the QR code)")
        elif qr is not None:
            out.extend(_QR_COLOURS + line + _RESET for line in qr)
        countdown = _countdown(screen)
        if countdown is not None:
            out.append(countdown)
        self._countdown = countdown
        return "\n".join(out) + "\n"

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
        if screen.seconds_left is not None:
            # Written once, so a time of day, not a figure that is stale at once.
            until = datetime.fromtimestamp(self._clock.time() + screen.seconds_left)
            out.append(f"  Code valid for {screen.seconds_left} s, until "
                       f"{until.strftime('%H:%M:%S')}")
        qr = self._qr_lines(screen.qr_data, ink_dark=False)
        if qr is not None:
            out.extend(qr)
        return "\n".join(out) + "\n"

    @staticmethod
    def _qr_lines(data: str | None, *, ink_dark: bool) -> list[str] | None:
        if not data:
            return None
        try:
            matrix = qr_matrix(data)
        except ValueError:
            return None  # too long for any QR code; the text above still says it all
        return half_block_lines(matrix, ink_dark=ink_dark)

    def _fits(self, columns: int) -> bool:
        try:
            width = os.get_terminal_size(self._stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            return True  # no size to go by (not a real terminal): draw it
        # A wrapped QR line scrambles the symbol; a width of 0 means "unknown".
        return width == 0 or columns <= width

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()


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
