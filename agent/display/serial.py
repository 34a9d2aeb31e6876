"""Serial displays: a VT100/ANSI terminal, a Nextion HMI or a character LCD on a UART.

All three hang off a serial line: the Pi's own UART (``/dev/serial0``; turn the serial
console off in raspi-config so no getty shares it), a USB-serial adapter (prefer the
stable ``/dev/serial/by-id/...`` link over ``/dev/ttyUSB0``), or any pyserial URL
(``rfc2217://host:port``, ``socket://host:port``, ``loop://``).

Options (``display.options``), for every serial type:

    port          required   device path or pyserial URL
    baudrate      per type   terminal 115200, nextion 9600, charlcd 9600
    flow_control  "none"     "none", "xonxoff" (software) or "rtscts" (hardware)

``type: terminal``, a VT100/ANSI terminal (or a PC running picocom/minicom) on the line:

    columns       80         the terminal's width, 20 to 400
    rows          24         its height, 6 to 200
    charset       "utf-8"    "utf-8": QR code in Unicode half blocks, two module rows a
                             line; "ascii": for terminals without Unicode, the QR code in
                             coloured spaces, one module row a line (two columns a
                             module), so it needs a tall terminal: 80x24 has no room
                             for one and shows the URL and code alone (logged once).

    The QR code is set black on white with explicit colours, whatever the terminal's
    theme, beside the text when it fits (below it on a narrow terminal). The screen is
    cleared once on connect; after that only cells that changed are rewritten (cursor
    addressing, erase to end of line), so a countdown tick sends a few bytes and the QR
    code never flickers. A monochrome terminal that ignores colours shows the QR code
    inverted.

``type: nextion``, a Nextion HMI whose page has text components for the fields below
and a QR code component (Nextion Editor: "QRcode"); each name can be ``null`` when the
page lacks that component, and may carry a page prefix (``page0.tCode``):

    page                "0"        page (number or name) selected on connect
    title_component     "tTitle"   the screen's title ("Sign in", "Signed in", ...)
    name_component      "tName"    the device name
    code_component      "tCode"    the user code, grouped for reading ("123 456 789")
    url_component       "tUrl"     the short verification URL
    qr_component        "qr0"      gets verification_uri_complete; the Nextion draws it,
                                   and it is hidden (``vis``) when there is no code
    status_component    "tStatus"  countdown and hints, or the other screens' lines
                                   (set the component's isbr to wrap; lines are
                                   separated by ``\\r``)
    progress_component  null       a progress bar (``.val`` 0-100) for the countdown
    max_text            100        longest text value, in characters (match txt_maxl)
    qr_max_text         200        longest QR text; a longer link leaves the QR
                                   component hidden (logged once) rather than
                                   truncated into a wrong address
    brightness          100        ``dim`` value while awake, 1-100
    encoding            "iso-8859-1"  the project's character encoding (Nextion Editor
                                   default); characters outside it show as "?"

    Every command ends with FF FF FF; a lone FF FF FF first ends any command the panel
    was half-way through when the line dropped. Text values are quoted, with ``"`` and
    ``\\`` escaped and control characters removed. Blanking sends ``dim=0`` and
    ``sleep=1``; waking sends ``sleep=0``, ``dim=<brightness>`` and redraws the page.

``type: charlcd``, an HD44780 character LCD behind a serial backpack:

    columns   16           16 or 20
    rows      2            2 or 4
    protocol  "serlcd"     "serlcd": SparkFun SerLCD/OpenLCD (0x7C settings, 0xFE
                           HD44780 commands); "matrix_orbital": Matrix Orbital (0xFE)

    No QR code (logged once): 16x2 shows the code on the first row and the short URL on
    the second; 20x4 shows the title and countdown, the URL wrapped over two rows, and
    the code. Other screens put the title on the first row and wrap their lines below
    it. Text longer than its rows is shown a part at a time, cut where a row ends, each
    part for `PAGE_SECONDS`.
    Blanking clears the panel and turns the backlight off (SerLCD: all three channels,
    which OpenLCD keeps in EEPROM, so it is done only on blank and wake). Text is plain
    ASCII; "|" is the SerLCD command byte and shows as "?".

The ``button_*`` options belong to agent.display.button and are accepted here.

The port is opened, written and closed in worker threads, never on the event loop. A
port that is missing or fails (unplugged adapter, permissions) is reported once; the
display retries every `RETRY_INTERVAL` seconds of the injected clock, checks an open
port as often (a replugged adapter is a new device node), and redraws the current
screen in full when the panel is back. `show` never raises for a serial problem.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import errno
import importlib.util
import logging
import os
import re
import textwrap
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Protocol, TypeVar

from agent.clock import Clock, SystemClock
from agent.config import DisplayConfig
from agent.display.button import BUTTON_OPTIONS
from agent.display.console import half_block_lines
from agent.display.options import Reader, integer, kind_of
from agent.display.qr import QrMatrix, qr_matrix
from agent.display.screens import CODE_INSTRUCTION, Screen
from agent.errors import ConfigError

__all__ = [
    "PAGE_SECONDS",
    "RETRY_INTERVAL",
    "SERIAL_DISPLAY_TYPES",
    "PortOpener",
    "SerialDisplay",
    "SerialPort",
    "create_serial_display",
    "open_port",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

SERIAL_DISPLAY_TYPES: Final = frozenset({"terminal", "nextion", "charlcd"})
RETRY_INTERVAL: Final = 5.0
# How long each part of a text too long for its row stays on a character LCD.
PAGE_SECONDS: Final = 2.0

# Long enough for a full frame at the slowest line: a flow-controlled terminal that never
# says XON again must not hold the display task for ever.
_WRITE_BUDGET_BYTES: Final = 32_768
_QUIET_ZONE: Final = 4


# -- the port ---------------------------------------------------------------------------


class SerialPort(Protocol):
    """What the display needs of a pyserial port."""

    def write(self, data: bytes, /) -> int | None: ...

    def close(self) -> None: ...

    @property
    def in_waiting(self) -> int: ...


class PortOpener(Protocol):
    def __call__(self, url: str, *, baudrate: int, flow_control: str,
                 write_timeout: float) -> SerialPort: ...


def open_port(url: str, *, baudrate: int, flow_control: str,
              write_timeout: float) -> SerialPort:
    """Open `url` with pyserial (blocking: call it in a worker thread).

    Reads never block (the panels' answers are not needed); `exclusive` takes an
    advisory lock so a second agent cannot interleave its bytes with ours.
    """
    import serial

    port: SerialPort = serial.serial_for_url(
        url, baudrate=baudrate, timeout=0, write_timeout=write_timeout,
        xonxoff=flow_control == "xonxoff", rtscts=flow_control == "rtscts", exclusive=True)
    return port


def _check_alive(port: SerialPort, url: str) -> None:
    """Raise OSError when `port` no longer reaches the device at `url`.

    A USB-serial adapter that is unplugged fails the next ioctl; one that is plugged
    back gets a new device node at the same path, which the old descriptor never
    reaches, so the node behind the path is compared with the open one.
    """
    _ = port.in_waiting
    fileno: Callable[[], int] | None = getattr(port, "fileno", None)
    if "://" in url or fileno is None:
        return
    now, opened = os.stat(url), os.fstat(fileno())
    if (now.st_dev, now.st_ino, now.st_rdev) != (opened.st_dev, opened.st_ino, opened.st_rdev):
        raise OSError(errno.ENODEV, f"{url} is now a different device")


def _close_quietly(port: SerialPort) -> None:
    with contextlib.suppress(Exception):
        port.close()


# -- the display ------------------------------------------------------------------------


class _Panel(Protocol):
    """Turns screens into the bytes one kind of panel understands. Pure: no I/O."""

    kind: str

    @property
    def animated(self) -> bool:
        """True while the last frame changes with time alone (text shown a part at a
        time), so the display renders it again at each `PAGE_SECONDS` boundary."""
        ...

    def reset(self) -> bytes:
        """The panel's state is unknown (just connected): bytes that bring it into a
        known empty state. Forgets what was drawn, so the next render is complete."""
        ...

    def render(self, screen: Screen, now: float) -> bytes:
        """Bytes that change what the panel shows into `screen` at monotonic time
        `now`; b"" when it shows that already."""
        ...


class SerialDisplay:
    """A `Display` on a serial line: connection, reconnection and writes, for a panel.

    `opener` opens the port (pyserial by default); `clock` paces retries and checks.
    """

    def __init__(self, panel: _Panel, *, port: str, baudrate: int,
                 flow_control: str = "none", clock: Clock | None = None,
                 retry_interval: float = RETRY_INTERVAL,
                 opener: PortOpener | None = None) -> None:
        self._panel = panel
        self._url = port
        self._baudrate = baudrate
        self._flow_control = flow_control
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._retry_interval = retry_interval
        self._opener: PortOpener = opener if opener is not None else open_port
        self._port: SerialPort | None = None
        self._screen: Screen | None = None
        self._lock = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None
        self._in_flight: asyncio.Future[Any] | None = None
        # Set when a frame starts to page, so the supervisor times the next part.
        self._wake = asyncio.Event()
        # True from the first failure until a frame is written again: one warning per
        # outage, however many retries fail in between.
        self._outage = False

    @property
    def connected(self) -> bool:
        return self._port is not None

    async def start(self) -> None:
        if self._supervisor is not None:
            return
        # Started first, so that a start cut short still leaves the retries running.
        self._supervisor = asyncio.create_task(self._supervise(),
                                               name=f"{self._panel.kind} display")
        async with self._lock:
            await self._connect()

    async def show(self, screen: Screen) -> None:
        self._screen = screen
        if self._supervisor is None:
            await self.start()
            return  # connecting drew the screen, or the supervisor will
        async with self._lock:
            await self._draw()

    async def close(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.wait([supervisor])
        async with self._lock:
            screen = self._screen
            if screen is not None and screen.kind == "code":
                # The agent stops polling, so the code can no longer sign anyone in.
                self._screen = _void(screen)
                await self._draw()
            port, self._port = self._port, None
            if port is not None:
                await self._in_thread(_close_quietly, port)

    # -- connection ----------------------------------------------------------------------

    async def _supervise(self) -> None:
        next_check = self._clock.monotonic() + self._retry_interval
        while True:
            now = self._clock.monotonic()
            wait = next_check - now
            if self._panel.animated:
                wait = min(wait, PAGE_SECONDS - now % PAGE_SECONDS)
            if await self._pause(wait):
                continue  # a frame started to page: time the next part
            async with self._lock:
                if self._clock.monotonic() >= next_check:
                    next_check = self._clock.monotonic() + self._retry_interval
                    await self._check()
                elif self._panel.animated:
                    await self._draw()

    async def _pause(self, seconds: float) -> bool:
        """Sleep on the clock; True when `_wake` cut the sleep short."""
        self._wake.clear()
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            done, _ = await asyncio.wait([sleeper, waker], return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()
        return sleeper not in done

    async def _check(self) -> None:
        port = self._port
        if port is not None:
            try:
                await self._in_thread(_check_alive, port, self._url)
            except Exception as exc:  # whatever the port raises, the panel is gone
                await self._lose(exc)
        if self._port is None:
            await self._connect()

    async def _connect(self) -> None:
        if self._port is not None:
            return
        write_timeout = 2.0 + 10 * _WRITE_BUDGET_BYTES / self._baudrate
        try:
            self._port = await self._in_thread(
                self._opener, self._url, baudrate=self._baudrate,
                flow_control=self._flow_control, write_timeout=write_timeout)
        except Exception as exc:  # pyserial raises OSError, ValueError and its own
            self._report(exc)
            return
        data = self._panel.reset()
        if self._screen is not None:
            data += self._panel.render(self._screen, self._clock.monotonic())
            if self._panel.animated:
                self._wake.set()
        await self._send(data)

    async def _draw(self) -> None:
        if self._port is not None and self._screen is not None:
            paging = self._panel.animated
            data = self._panel.render(self._screen, self._clock.monotonic())
            if self._panel.animated and not paging:
                self._wake.set()
            await self._send(data)

    async def _send(self, data: bytes) -> None:
        port = self._port
        if not data or port is None:
            return
        try:
            await self._in_thread(port.write, data)
        except Exception as exc:  # loop:// raises queue.Full, for one
            await self._lose(exc)
            return
        if self._outage:
            self._outage = False
            log.info("%s display on %s is back; redrawn", self._panel.kind, self._url)

    async def _lose(self, exc: BaseException) -> None:
        port, self._port = self._port, None
        self._report(exc)
        if port is not None:
            await self._in_thread(_close_quietly, port)

    async def _in_thread(self, func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """`func` in a worker thread, one at a time.

        A cancelled caller (the agent shutting down mid-frame) cannot stop the thread,
        so the next call waits for it: two threads writing at once would interleave
        their bytes, and `close` must not pull the port from under a write.
        """
        if self._in_flight is not None:
            await asyncio.wait([self._in_flight])
        task = asyncio.ensure_future(asyncio.to_thread(func, *args, **kwargs))
        self._in_flight = task
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_orphaned)
            raise

    def _report(self, exc: BaseException) -> None:
        reason = str(exc) or type(exc).__name__
        if self._outage:
            log.debug("%s display on %s still unavailable: %s", self._panel.kind, self._url,
                      reason)
            return
        self._outage = True
        hint = ""
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
            hint = " (the agent's user needs to be in the dialout group)"
        log.warning("%s display on %s is not available: %s%s; the agent goes on without "
                    "it and retries every %g s", self._panel.kind, self._url, reason, hint,
                    self._retry_interval)


def _orphaned(task: asyncio.Future[Any]) -> None:
    # Nobody awaits this result any more; a port opened for nobody is closed.
    if task.cancelled() or task.exception() is not None:
        return
    result = task.result()
    if hasattr(result, "write") and hasattr(result, "close"):
        asyncio.get_running_loop().run_in_executor(None, _close_quietly, result)


def _void(screen: Screen) -> Screen:
    return Screen(kind="stopped", title="Stopped", lines=("This code is no longer valid",),
                  device_name=screen.device_name)


# -- text helpers -----------------------------------------------------------------------


def _printable(text: str, *, ascii_only: bool) -> str:
    # Names, codes and error texts come from the provider or the network; a control
    # character could move a terminal's cursor or end a Nextion command early, and a
    # wide or zero-width character would shift every column after it.
    out = []
    for ch in text:
        if ascii_only:
            out.append(ch if " " <= ch <= "~" else "?")
        elif not ch.isprintable() or unicodedata.combining(ch) or (
                unicodedata.east_asian_width(ch) in ("W", "F")):
            out.append("?")
        else:
            out.append(ch)
    return "".join(out)


def _wrap(text: str, width: int) -> list[str]:
    if len(text) <= width:
        return [text]
    if " " not in text.strip():
        # A URL: every character counts and none is a place to break, so cut evenly.
        return [text[i:i + width] for i in range(0, len(text), width)]
    return textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False) or [""]


def _countdown(screen: Screen) -> str | None:
    if screen.seconds_left is None:
        return None
    if screen.seconds_left <= 0:
        return "Code expired"
    minutes, seconds = divmod(screen.seconds_left, 60)
    return f"Expires in {minutes}:{seconds:02d}"


def _clock_text(screen: Screen) -> str | None:
    if screen.seconds_left is None:
        return None
    minutes, seconds = divmod(max(0, screen.seconds_left), 60)
    return f"{minutes}:{seconds:02d}"


def _hints(screen: Screen, *, qr_shown: bool) -> list[str]:
    # The instruction is spelled out by the layout itself; "scan the QR code" only
    # makes sense where one is drawn.
    return [line for line in screen.lines
            if line != CODE_INSTRUCTION and (qr_shown or "QR" not in line)]


# -- VT100 / ANSI terminal --------------------------------------------------------------

_PLAIN, _BOLD, _LIGHT, _DARK = range(4)
# Black on white, explicitly: 107 is bright white, and a terminal without it keeps the
# 47 before it. _DARK is a black ground for the ASCII QR code's dark modules.
_SGR: Final = {_PLAIN: "0", _BOLD: "0;1", _LIGHT: "0;30;47;107", _DARK: "0;30;40"}
_QR_STYLES: Final = frozenset({_LIGHT, _DARK})
_BLANK_CELL: Final = (" ", _PLAIN)
# Reset attributes, no autowrap (a character in the last column must not scroll the
# screen), cursor hidden, home, clear.
_TERMINAL_RESET: Final = "\x1b[0m\x1b[?7l\x1b[?25l\x1b[H\x1b[2J"
_MIN_TEXT_WIDTH: Final = 22
_BAR_WIDTH: Final = 20

Cell = tuple[str, int]
Frame = tuple[tuple[Cell, ...], ...]


class _Terminal:
    kind = "terminal"
    animated = False

    def __init__(self, *, columns: int, rows: int, ascii_only: bool) -> None:
        self._columns = columns
        self._rows = rows
        self._ascii = ascii_only
        self._shown: Frame = self._empty()
        self._noted: set[str] = set()

    def reset(self) -> bytes:
        self._shown = self._empty()
        return _TERMINAL_RESET.encode("ascii")

    def render(self, screen: Screen, now: float) -> bytes:
        frame = self._frame(screen)
        out = _diff(self._shown, frame)
        self._shown = frame
        return out.encode("ascii" if self._ascii else "utf-8")

    def _empty(self) -> Frame:
        return ((_BLANK_CELL,) * self._columns,) * self._rows

    # -- layout --------------------------------------------------------------------------

    def _frame(self, screen: Screen) -> Frame:
        grid = [[_BLANK_CELL] * self._columns for _ in range(self._rows)]
        if screen.kind == "blank":
            return tuple(tuple(row) for row in grid)
        if screen.kind != "code":
            self._put_text(grid, 0, 0, self._columns, self._info_text(screen))
            return tuple(tuple(row) for row in grid)

        side = self._side_by_side(screen)
        if side is not None:
            qr, width = side
            self._put_qr(grid, 0, 0, qr)
            left = len(qr[0]) + 2
            text = self._code_text(screen, width, qr_shown=True)
            top = 1 if len(text) < self._rows else 0
            self._put_text(grid, top, left, width, text)
            return tuple(tuple(row) for row in grid)

        text = self._code_text(screen, self._columns, qr_shown=True)
        below = self._qr_cells(screen.qr_data, columns=self._columns,
                               rows=self._rows - len(text) - 1)
        if below is None:
            text = self._code_text(screen, self._columns, qr_shown=False)
            if screen.qr_data:
                self._note("no-qr", "the QR code does not fit a %dx%d %s terminal; showing "
                           "the URL and code only", self._columns, self._rows,
                           "ASCII" if self._ascii else "UTF-8")
        self._put_text(grid, 0, 0, self._columns, text)
        if below is not None:
            self._put_qr(grid, len(text) + 1, 0, below)
        return tuple(tuple(row) for row in grid)

    def _side_by_side(self, screen: Screen) -> tuple[list[list[Cell]], int] | None:
        qr = self._qr_cells(screen.qr_data, columns=self._columns - 2 - _MIN_TEXT_WIDTH,
                            rows=self._rows)
        if qr is None:
            return None
        return qr, self._columns - len(qr[0]) - 2

    def _qr_cells(self, data: str | None, *, columns: int,
                  rows: int) -> list[list[Cell]] | None:
        """The largest symbol with its quiet zone that fits, as cells; None if none."""
        if not data or rows <= 0 or columns <= 0:
            return None
        if self._ascii:
            fits = min(columns // 2, rows) - 2 * _QUIET_ZONE
        else:
            fits = min(columns, 2 * rows) - 2 * _QUIET_ZONE
        if fits < 21:
            return None
        try:
            matrix = qr_matrix(data, max_modules=fits)
        except ValueError:
            return None
        return self._ascii_qr(matrix) if self._ascii else [
            [(ch, _LIGHT) for ch in line]
            for line in half_block_lines(matrix, ink_dark=True, quiet_zone=_QUIET_ZONE)]

    @staticmethod
    def _ascii_qr(matrix: QrMatrix) -> list[list[Cell]]:
        # Solid cells through the background colour: a glyph such as "#" inks only part
        # of its cell, which a camera sees as grey, not as a module.
        side = matrix.size + 2 * _QUIET_ZONE

        def cell(row: int, col: int) -> Cell:
            r, c = row - _QUIET_ZONE, col - _QUIET_ZONE
            dark = 0 <= r < matrix.size and 0 <= c < matrix.size and matrix.modules[r][c]
            return (" ", _DARK if dark else _LIGHT)

        return [[cell(row, col // 2) for col in range(2 * side)] for row in range(side)]

    def _code_text(self, screen: Screen, width: int, *,
                   qr_shown: bool) -> list[tuple[str, int]]:
        out = self._heading(screen, width)
        if screen.url:
            out.append(("Open", _PLAIN))
            out.extend((line, _BOLD) for line in _wrap(self._clean(screen.url), width))
        if screen.user_code_display:
            out.append(("and enter the code", _PLAIN))
            out.extend((line, _BOLD)
                       for line in _wrap(self._clean(screen.user_code_display), width))
        for hint in _hints(screen, qr_shown=qr_shown):
            out.extend((line, _PLAIN) for line in _wrap(self._clean(hint), width))
        countdown = _countdown(screen)
        if countdown is not None:
            out.append(("", _PLAIN))
            out.append((countdown, _PLAIN))
            if screen.progress is not None and screen.seconds_left:
                bar = min(_BAR_WIDTH, width - 2)
                # Rounded down, so the bar starts to shrink with the first second gone.
                filled = int(min(1.0, max(0.0, screen.progress)) * bar)
                out.append((f"[{'#' * filled}{'.' * (bar - filled)}]", _PLAIN))
        return out

    def _info_text(self, screen: Screen) -> list[tuple[str, int]]:
        out = self._heading(screen, self._columns)
        for line in screen.lines:
            out.extend((part, _PLAIN) for part in _wrap(self._clean(line), self._columns))
        return out

    def _heading(self, screen: Screen, width: int) -> list[tuple[str, int]]:
        out = [(line, _BOLD) for line in _wrap(self._clean(screen.title), width)]
        if screen.device_name:
            out.extend((line, _PLAIN) for line in _wrap(self._clean(screen.device_name), width))
        out.append(("", _PLAIN))
        return out

    def _clean(self, text: str) -> str:
        return _printable(text, ascii_only=self._ascii)

    @staticmethod
    def _put_text(grid: list[list[Cell]], top: int, left: int, width: int,
                  text: list[tuple[str, int]]) -> None:
        for offset, (line, style) in enumerate(text):
            row = top + offset
            if row >= len(grid):
                return
            for col, ch in enumerate(line[:width]):
                if left + col < len(grid[row]):
                    grid[row][left + col] = (ch, style)

    @staticmethod
    def _put_qr(grid: list[list[Cell]], top: int, left: int, qr: list[list[Cell]]) -> None:
        for offset, cells in enumerate(qr):
            grid[top + offset][left:left + len(cells)] = cells

    def _note(self, key: str, message: str, *args: object) -> None:
        if key not in self._noted:
            self._noted.add(key)
            log.info(message, *args)


def _diff(old: Frame, new: Frame) -> str:
    """Escape sequences that turn `old` into `new`: in each changed row, from the first
    changed cell to the last, and an erase to the end of the line where `new` ends
    sooner. Unchanged rows cost nothing."""
    out: list[str] = []
    for row, (was, now) in enumerate(zip(old, new, strict=True)):
        if was == now:
            continue
        first = next(i for i, (a, b) in enumerate(zip(was, now, strict=True)) if a != b)
        last = max(i for i, (a, b) in enumerate(zip(was, now, strict=True)) if a != b)
        end = len(now)
        while end > 0 and now[end - 1] == _BLANK_CELL:
            end -= 1
        out.append(f"\x1b[{row + 1};{first + 1}H")
        style: int | None = None
        for ch, cell_style in now[first:min(last + 1, end)]:
            if cell_style != style:
                if style in _QR_STYLES and cell_style in _QR_STYLES:
                    # Across an ASCII QR code only the ground changes: a short code
                    # keeps the frame small enough for a slow line.
                    out.append("\x1b[40m" if cell_style == _DARK else "\x1b[47;107m")
                else:
                    out.append(f"\x1b[{_SGR[cell_style]}m")
                style = cell_style
            out.append(ch)
        if last >= end:
            out.append("\x1b[0m\x1b[K")
        elif style != _PLAIN:
            out.append("\x1b[0m")
    return "".join(out)


# -- Nextion HMI ------------------------------------------------------------------------

_NEXTION_END: Final = b"\xff\xff\xff"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _NextionSettings:
    page: str
    title: str | None
    name: str | None
    code: str | None
    url: str | None
    qr: str | None
    status: str | None
    progress: str | None
    max_text: int
    qr_max_text: int
    brightness: int
    encoding: str


class _Nextion:
    kind = "nextion"
    animated = False

    def __init__(self, settings: _NextionSettings) -> None:
        self._s = settings
        self._sent: dict[str, str] = {}
        self._asleep = False
        self._noted: set[str] = set()

    def reset(self) -> bytes:
        self._sent = {}
        self._asleep = False
        return _NEXTION_END + self._commands(
            ["sleep=0", f"dim={self._s.brightness}", f"page {self._s.page}"])

    def render(self, screen: Screen, now: float) -> bytes:
        if screen.kind == "blank":
            if self._asleep:
                return b""
            self._asleep = True
            return self._commands(["dim=0", "sleep=1"])
        commands: list[str] = []
        if self._asleep:
            # Waking may reload the page from flash, so everything is sent again.
            self._asleep = False
            self._sent = {}
            commands += ["sleep=0", f"dim={self._s.brightness}", f"page {self._s.page}"]
        for key, command in self._wanted(screen).items():
            if self._sent.get(key) != command:
                self._sent[key] = command
                commands.append(command)
        return self._commands(commands)

    def _wanted(self, screen: Screen) -> dict[str, str]:
        s = self._s
        code = screen.kind == "code"
        qr = screen.qr_data if code else None
        if qr is not None and len(qr) > s.qr_max_text:
            self._note("qr-long", "the sign-in link is %d characters, more than the Nextion "
                       "option qr_max_text (%d); the QR code is left hidden", len(qr),
                       s.qr_max_text)
            qr = None
        if code:
            hints = [_countdown(screen) or "", *_hints(screen, qr_shown=qr is not None)]
            status = [line for line in hints if line]
        else:
            status = list(screen.lines)
        wanted: dict[str, str] = {}

        def text(component: str | None, *values: str | None) -> None:
            if component is not None:
                wanted[component] = f'{component}.txt="{_quote(values, s.max_text)}"'

        text(s.title, screen.title)
        text(s.name, screen.device_name)
        text(s.code, screen.user_code_display if code else None)
        text(s.url, screen.url if code else None)
        text(s.status, *status)
        if s.qr is not None:
            if qr is not None:
                wanted[s.qr] = f'{s.qr}.txt="{_quote([qr], s.qr_max_text)}"'
            wanted[s.qr + " vis"] = f"vis {s.qr.rsplit('.', 1)[-1]},{int(qr is not None)}"
        if s.progress is not None:
            percent = round(100 * screen.progress) if code and screen.progress else 0
            wanted[s.progress] = f"{s.progress}.val={max(0, min(100, percent))}"
        return wanted

    def _commands(self, commands: list[str]) -> bytes:
        # 0xFF ends a command, so an encoding that produces it (iso-8859-1 "ÿ") must not
        # carry it into a value.
        return b"".join(
            command.encode(self._s.encoding, errors="replace").replace(b"\xff", b"?")
            + _NEXTION_END for command in commands)

    def _note(self, key: str, message: str, *args: object) -> None:
        if key not in self._noted:
            self._noted.add(key)
            log.warning(message, *args)


def _quote(values: Sequence[str | None], limit: int) -> str:
    """A Nextion string literal's contents: `values` as lines, at most `limit`
    characters in all, control characters removed, quotes and backslashes escaped."""
    # CR is not printable, so it can only come from here: the one line break.
    text = "\r".join("".join(ch for ch in value or "" if ch.isprintable()) for value in values)
    if len(text) > limit:
        text = text[:limit - 3] + "..." if limit > 3 else text[:limit]
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return text.replace("\r", "\\r")


# -- character LCD ----------------------------------------------------------------------

_SERLCD_CLEAR: Final = b"\x7c\x2d"
# OpenLCD backlight channels: 128-157 white/red, 158-187 green, 188-217 blue.
_SERLCD_BACKLIGHT_ON: Final = b"\x7c\x9d\x7c\xbb\x7c\xd9"
_SERLCD_BACKLIGHT_OFF: Final = b"\x7c\x80\x7c\x9e\x7c\xbc"
# Clear; autoscroll, block and underline cursor off: a character in the last cell must
# not scroll the panel.
_ORBITAL_RESET: Final = b"\xfe\x58\xfe\x52\xfe\x54\xfe\x4b"
_ORBITAL_BACKLIGHT_ON: Final = b"\xfe\x42\x00"  # 0: no timeout, stays on
_ORBITAL_BLANK: Final = b"\xfe\x58\xfe\x46"


_Text = TypeVar("_Text", str, list[str])  # a row's characters, or rows


class _CharLcd:
    kind = "charlcd"

    def __init__(self, *, columns: int, rows: int, protocol: str) -> None:
        self._columns = columns
        self._rows = rows
        self._serlcd = protocol == "serlcd"
        self._shown = self._empty()
        self._dark = False
        self._said_no_qr = False
        self.animated = False

    def reset(self) -> bytes:
        self._shown = self._empty()
        self._dark = False
        if self._serlcd:
            return _SERLCD_CLEAR + _SERLCD_BACKLIGHT_ON
        return _ORBITAL_RESET + _ORBITAL_BACKLIGHT_ON

    def render(self, screen: Screen, now: float) -> bytes:
        self.animated = False
        if screen.kind == "blank":
            if self._dark:
                return b""
            self._dark = True
            self._shown = self._empty()
            return _SERLCD_CLEAR + _SERLCD_BACKLIGHT_OFF if self._serlcd else _ORBITAL_BLANK
        out = b""
        if self._dark:
            self._dark = False
            out += _SERLCD_BACKLIGHT_ON if self._serlcd else _ORBITAL_BACKLIGHT_ON
        if screen.qr_data and not self._said_no_qr:
            self._said_no_qr = True
            log.info("a character LCD cannot draw a QR code; it shows the URL and code")
        frame = self._frame(screen, int(now // PAGE_SECONDS))
        for row, (was, new) in enumerate(zip(self._shown, frame, strict=True)):
            changed = [i for i, (a, b) in enumerate(zip(was, new, strict=True)) if a != b]
            if changed:
                first, last = changed[0], changed[-1]
                out += self._goto(row, first) + new[first:last + 1].encode("ascii")
        self._shown = frame
        return out

    def _empty(self) -> tuple[str, ...]:
        return (" " * self._columns,) * self._rows

    def _goto(self, row: int, col: int) -> bytes:
        if self._serlcd:
            # HD44780 DDRAM: rows 3 and 4 continue rows 1 and 2 (0x14/0x54 on 20
            # columns, 0x10/0x50 on 16).
            offsets = (0x00, 0x40, self._columns, 0x40 + self._columns)
            return bytes((0xFE, 0x80 | (offsets[row] + col)))
        return bytes((0xFE, 0x47, col + 1, row + 1))

    def _frame(self, screen: Screen, page: int) -> tuple[str, ...]:
        width = self._columns
        if screen.kind == "code":
            rows = self._code_rows(screen, page)
        else:
            body: list[str] = []
            for line in screen.lines:
                body.extend(_wrap(self._clean(line), width))
            # Lines beyond the panel take turns below the title.
            rows = [self._clean(screen.title), *self._part(body, self._rows - 1, page)]
        rows = (rows + [""] * self._rows)[:self._rows]
        return tuple(row[:width].ljust(width) for row in rows)

    def _code_rows(self, screen: Screen, page: int) -> list[str]:
        width = self._columns
        code = self._clean(screen.user_code_display or "")
        for label in ("Code: ", "Code ", ""):
            if len(label + code) <= width:
                code_row = label + code
                break
        else:
            code_row = self._part(code, width, page)
        url = self._clean(screen.url or "")
        if self._rows == 2:
            return [code_row, self._part(url, width, page)]
        title = self._clean(screen.title)
        left = _clock_text(screen)
        if left is not None and len(title) + 1 + len(left) <= width:
            title = title.ljust(width - len(left)) + left
        two_rows = self._part(url, 2 * width, page)
        return [title, two_rows[:width], two_rows[width:], code_row]

    def _part(self, whole: _Text, size: int, page: int) -> _Text:
        """`whole` if it fits `size`, else this page's part of it: cut where a row ends,
        so nothing is skipped, and each part shown for `PAGE_SECONDS`."""
        if len(whole) <= size or size <= 0:
            return whole
        self.animated = True
        parts = [whole[i:i + size] for i in range(0, len(whole), size)]
        return parts[page % len(parts)]

    def _clean(self, text: str) -> str:
        text = _printable(text, ascii_only=True)
        return text.replace("|", "?") if self._serlcd else text


# -- options ----------------------------------------------------------------------------

_REQUIRED: Final = object()
_URL_SCHEME = re.compile(r"([a-z][a-z0-9+.-]*)://", re.IGNORECASE)
_COMPONENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
_PAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

def _port(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, "expected a device path such as /dev/ttyUSB0 or /dev/serial0, "
                               f"or a pyserial URL, got {kind_of(value)}")
    if not value.strip() or "\0" in value:
        raise ConfigError(key, "must be a device path or a pyserial URL")
    match = _URL_SCHEME.match(value)
    if match is not None:
        scheme = match.group(1).lower()
        if not scheme.isidentifier() or importlib.util.find_spec(
                f"serial.urlhandler.protocol_{scheme}") is None:
            raise ConfigError(key, f"pyserial has no {scheme}:// handler; use a device path "
                                   "or one of loop://, socket://, rfc2217://, spy://, "
                                   "hwgrep://")
    return value


def _one_of_numbers(*choices: int) -> Reader:
    listed = " or ".join(str(choice) for choice in choices)

    def read(value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected {listed}, got {kind_of(value)}")
        if value not in choices:
            raise ConfigError(key, f"must be {listed}, got {value}")
        return value
    return read


def _one_of(*choices: str) -> Reader:
    listed = ", ".join(repr(choice) for choice in choices)

    def read(value: object, key: str) -> str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected one of {listed}, got {kind_of(value)}")
        if value.strip().lower() not in choices:
            raise ConfigError(key, f"{value!r} is not one of {listed}")
        return value.strip().lower()
    return read


def _component(value: object, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _COMPONENT.fullmatch(value):
        raise ConfigError(key, "expected a Nextion component name such as tCode or "
                               "page0.tCode, or null when the page has none, got "
                               + (repr(value) if isinstance(value, str) else kind_of(value)))
    return value


def _page_option(value: object, key: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
        return str(value)
    if isinstance(value, str) and ((value.isdigit() and int(value) <= 255)
                                   or _PAGE_NAME.fullmatch(value)):
        return value
    raise ConfigError(key, "expected a page number (0-255) or a page name, got "
                      + (repr(value) if isinstance(value, str) else kind_of(value)))


def _encoding(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected an encoding name such as iso-8859-1 or utf-8, "
                               f"got {kind_of(value)}")
    try:
        codecs.lookup(value)
    except LookupError:
        raise ConfigError(key, f"{value!r} is not a known encoding") from None
    return value


_COMMON: Final[Mapping[str, tuple[Reader, object]]] = {
    "port": (_port, _REQUIRED),
    "flow_control": (_one_of("none", "xonxoff", "rtscts"), "none"),
}
_OPTIONS: Final[Mapping[str, Mapping[str, tuple[Reader, object]]]] = {
    "terminal": {
        "baudrate": (integer(50, 4_000_000), 115_200),
        "columns": (integer(20, 400), 80),
        "rows": (integer(6, 200), 24),
        "charset": (_one_of("utf-8", "ascii"), "utf-8"),
    },
    "nextion": {
        "baudrate": (integer(50, 4_000_000), 9600),
        "page": (_page_option, "0"),
        "title_component": (_component, "tTitle"),
        "name_component": (_component, "tName"),
        "code_component": (_component, "tCode"),
        "url_component": (_component, "tUrl"),
        "qr_component": (_component, "qr0"),
        "status_component": (_component, "tStatus"),
        "progress_component": (_component, None),
        "max_text": (integer(8, 4096), 100),
        "qr_max_text": (integer(16, 4096), 200),
        "brightness": (integer(1, 100), 100),
        "encoding": (_encoding, "iso-8859-1"),
    },
    "charlcd": {
        "baudrate": (integer(50, 4_000_000), 9600),
        "columns": (_one_of_numbers(16, 20), 16),
        "rows": (_one_of_numbers(2, 4), 2),
        "protocol": (_one_of("serlcd", "matrix_orbital"), "serlcd"),
    },
}


def _read_options(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    table = {**_COMMON, **_OPTIONS[kind]}
    for name in options:
        if name not in table and name not in BUTTON_OPTIONS:
            known = ", ".join(sorted(table))
            raise ConfigError(f"display.options.{name}",
                              f"unknown option for a {kind} display; known: {known}")
    values: dict[str, Any] = {}
    for name, (read, default) in table.items():
        key = f"display.options.{name}"
        if name in options:
            values[name] = read(options[name], key)
        elif default is _REQUIRED:
            raise ConfigError(key, f"required for a {kind} display (a device path such as "
                                   "/dev/ttyUSB0 or /dev/serial0, or a pyserial URL)")
        else:
            values[name] = default
    return values


def create_serial_display(config: DisplayConfig, *, clock: Clock | None = None,
                          opener: PortOpener | None = None) -> SerialDisplay:
    """The display for `config.type` ("terminal", "nextion" or "charlcd"), its options
    checked now (ConfigError) so a typo stops the agent at start, not at first use.
    Nothing is opened until `start`."""
    if config.type not in SERIAL_DISPLAY_TYPES:
        raise ConfigError("display.type", f"{config.type!r} is not a serial display; "
                                          "expected terminal, nextion or charlcd")
    o = _read_options(config.type, config.options)
    panel: _Panel
    if config.type == "terminal":
        panel = _Terminal(columns=o["columns"], rows=o["rows"],
                          ascii_only=o["charset"] == "ascii")
    elif config.type == "nextion":
        panel = _Nextion(_NextionSettings(
            page=o["page"], title=o["title_component"], name=o["name_component"],
            code=o["code_component"], url=o["url_component"], qr=o["qr_component"],
            status=o["status_component"], progress=o["progress_component"],
            max_text=o["max_text"], qr_max_text=o["qr_max_text"],
            brightness=o["brightness"], encoding=o["encoding"]))
    else:
        panel = _CharLcd(columns=o["columns"], rows=o["rows"], protocol=o["protocol"])
    return SerialDisplay(panel, port=o["port"], baudrate=o["baudrate"],
                         flow_control=o["flow_control"], clock=clock, opener=opener)

