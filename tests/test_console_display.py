"""The console display, checked the way a person sees it.

On a terminal the display writes to a real pseudo-terminal, whose other end is read into
pyte, a VT100 emulator: the tests look at the screen a person would see, after the
cursor moves and erasures, with the agent's log lines arriving on the same terminal.
Plain output is replayed on a small model of a dark-themed terminal. Either way the QR
code is turned into pixels and decoded with zxing."""

from __future__ import annotations

import dataclasses
import fcntl
import io
import logging
import os
import re
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import pyte
import pytest
import zxingcpp
from PIL import Image

from agent.display import Display
from agent.display.console import ConsoleDisplay
from agent.display.qr import qr_matrix
from agent.display.screens import Screen, build_screen
from agent.logs import setup_logging
from agent.state import Phase, Snapshot
from tests.clock import ManualClock
from tests.qrscan import AUTHENTIK, HUNDRED, LONGER_HOST, scan_matrix

ROOT = Path(__file__).resolve().parents[1]

NOW_MONO = 10_000.0
NOW_WALL = datetime(2027, 1, 15, 12, 0, tzinfo=UTC).timestamp()


SGR = re.compile(r"\x1b\[([0-9;]*)m")
ANY_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BLOCKS = frozenset(" ▀▄█")

# The terminal model: light text on a dark ground, as most terminals and journalctl
# pagers are set up. 8-colour codes are taken at xterm's values.
DEFAULT_FG, DEFAULT_BG = 229, 0
PALETTE = {0: 0, 1: 80, 2: 100, 3: 130, 4: 40, 5: 80, 6: 120, 7: 229}
BRIGHT = {0: 127, 1: 160, 2: 170, 3: 200, 4: 120, 5: 160, 6: 200, 7: 255}


@dataclasses.dataclass
class Pen:
    fg: int = DEFAULT_FG
    bg: int = DEFAULT_BG
    reverse: bool = False

    def apply(self, params: str) -> None:
        for code in [int(p) for p in params.split(";") if p] or [0]:
            if code == 0:
                self.fg, self.bg, self.reverse = DEFAULT_FG, DEFAULT_BG, False
            elif code == 7:
                self.reverse = True
            elif code == 27:
                self.reverse = False
            elif 30 <= code <= 37:
                self.fg = PALETTE[code - 30]
            elif 90 <= code <= 97:
                self.fg = BRIGHT[code - 90]
            elif code == 39:
                self.fg = DEFAULT_FG
            elif 40 <= code <= 47:
                self.bg = PALETTE[code - 40]
            elif 100 <= code <= 107:
                self.bg = BRIGHT[code - 100]
            elif code == 49:
                self.bg = DEFAULT_BG

    def colours(self) -> tuple[int, int]:
        return (self.bg, self.fg) if self.reverse else (self.fg, self.bg)


Cell = tuple[str, int, int]  # glyph, ink colour, ground colour


def terminal_lines(output: str) -> list[list[Cell]]:
    """Each output line as cells with the colours a terminal would give them."""
    pen = Pen()
    lines: list[list[Cell]] = []
    for raw in output.split("\n"):
        cells: list[Cell] = []
        pos = 0
        for match in SGR.finditer(raw):
            for ch in ANY_ESCAPE.sub("", raw[pos:match.start()]):
                cells.append((ch, *pen.colours()))
            pen.apply(match.group(1))
            pos = match.end()
        for ch in ANY_ESCAPE.sub("", raw[pos:]):
            cells.append((ch, *pen.colours()))
        lines.append(cells)
    return lines


def qr_runs(output: str) -> list[list[list[Cell]]]:
    """Runs of consecutive lines made only of half blocks, as wide as a QR code."""
    runs: list[list[list[Cell]]] = []
    current: list[list[Cell]] = []
    for cells in terminal_lines(output):
        if len(cells) >= 21 + 8 and all(ch in BLOCKS for ch, _, _ in cells) and (
                not current or len(cells) == len(current[0])):
            current.append(cells)
            continue
        if current:
            runs.append(current)
        current = []
    if current:
        runs.append(current)
    return runs


def picture(run: list[list[Cell]], *, scale: int = 4, margin: int = 8) -> Image.Image:
    """Pixels as on screen: the upper half of a cell is inked by ▀ and █, the lower
    by ▄ and █; the rest shows the cell's ground. The terminal's own (dark) ground
    surrounds the block, so the printed quiet zone has to do its job."""
    width, height = len(run[0]), 2 * len(run)
    image = Image.new("L", (width + 2 * margin, height + 2 * margin), DEFAULT_BG)
    for row, cells in enumerate(run):
        for col, (ch, ink, ground) in enumerate(cells):
            top = ink if ch in "▀█" else ground
            bottom = ink if ch in "▄█" else ground
            image.putpixel((margin + col, margin + 2 * row), top)
            image.putpixel((margin + col, margin + 2 * row + 1), bottom)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def decode(run: list[list[Cell]]) -> list[str]:
    # No inversion: a code that only reads light-on-dark is not good enough for phones.
    found = zxingcpp.read_barcodes(picture(run), try_invert=False)
    return [barcode.text for barcode in found if barcode.format == zxingcpp.BarcodeFormat.QRCode]


def code_snapshot(complete: str = AUTHENTIK, *, user_code: str = "123456789",
                  deadline: float = NOW_MONO + 60) -> Snapshot:
    return Snapshot(
        phase=Phase.AWAITING_USER,
        device_name="Kitchen display",
        user_code=user_code,
        verification_uri=complete.split("?")[0],
        verification_uri_complete=complete,
        code_deadline=deadline,
        code_expires_at=NOW_WALL + 60,
    )


def screen_at(snap: Snapshot, elapsed: float = 0.0) -> Screen:
    return build_screen(snap, now_mono=NOW_MONO + elapsed, now_wall=NOW_WALL + elapsed,
                        code_lifetime=60, tz=UTC)


def make(tty: bool) -> tuple[ConsoleDisplay, io.StringIO]:
    stream = io.StringIO()
    return ConsoleDisplay(stream, tty=tty, clock=ManualClock(wall=NOW_WALL, mono=NOW_MONO)), stream


# -- the QR code scans -------------------------------------------------------------------


@pytest.mark.parametrize("uri", [AUTHENTIK, LONGER_HOST, HUNDRED],
                         ids=["authentik", "longer-host", "100-chars"])
async def test_journal_qr_code_decodes_to_the_complete_uri(uri: str) -> None:
    display, stream = make(tty=False)
    await display.start()
    await display.show(screen_at(code_snapshot(uri)))
    await display.close()
    runs = qr_runs(stream.getvalue())
    assert len(runs) == 1
    assert decode(runs[0]) == [uri]


async def test_journal_qr_inks_the_light_modules_and_the_quiet_zone() -> None:
    display, stream = make(tty=False)
    await display.show(screen_at(code_snapshot()))
    (run,) = qr_runs(stream.getvalue())
    assert all(ch == "█" for ch, _, _ in run[0] + run[1])
    matrix = qr_matrix(AUTHENTIK)
    assert len(run[0]) == matrix.size + 8


# -- journal (not a terminal) ------------------------------------------------------------


async def test_journal_output_is_plain_text_with_the_url_and_code_before_the_qr() -> None:
    display, stream = make(tty=False)
    await display.show(screen_at(code_snapshot()))
    output = stream.getvalue()
    assert "\x1b" not in output
    lines = output.splitlines()
    first_qr = next(i for i, line in enumerate(lines) if line and set(line) <= BLOCKS)
    text = "\n".join(lines[:first_qr])
    assert "auth.example.com/device" in text
    assert "123456789" in text
    assert "Kitchen display" in text
    # The link as text too, for a reader who can click or copy it but not scan.
    assert f"Link with the code filled in: {AUTHENTIK}" in text
    until = datetime.fromtimestamp(NOW_WALL + 60).strftime("%H:%M:%S")
    assert f"Code valid for 60 s, until {until}" in text


async def test_journal_is_not_written_again_when_only_the_countdown_moves() -> None:
    display, stream = make(tty=False)
    snap = code_snapshot()
    await display.show(screen_at(snap))
    first = stream.getvalue()
    for elapsed in (1, 2, 30, 59):
        await display.show(screen_at(snap, elapsed))
    assert stream.getvalue() == first


async def test_journal_prints_each_new_code_and_state_once() -> None:
    display, stream = make(tty=False)
    await display.show(screen_at(code_snapshot()))
    await display.show(screen_at(code_snapshot(user_code="555000111",
                                               complete=AUTHENTIK.replace("123456789",
                                                                          "555000111"))))
    signed_in = Snapshot(phase=Phase.SIGNED_IN, device_name="Kitchen display", user="alice")
    await display.show(screen_at(signed_in))
    await display.show(screen_at(signed_in))
    output = stream.getvalue()
    assert [decode(run) for run in qr_runs(output)] == [
        [AUTHENTIK], [AUTHENTIK.replace("123456789", "555000111")]]
    assert output.count("Signed in (Kitchen display)") == 1
    assert output.endswith("Signed in (Kitchen display)\n  as alice\n")
    assert "\x1b" not in output


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream_type", "term", "escapes"),
    [(io.StringIO, "xterm-256color", False), (FakeTerminal, "xterm-256color", True),
     (FakeTerminal, "dumb", False)],
)
async def test_terminal_mode_is_detected_from_the_stream(
        monkeypatch: pytest.MonkeyPatch, stream_type: type[io.StringIO], term: str,
        escapes: bool) -> None:
    monkeypatch.setenv("TERM", term)
    stream = stream_type()
    display = ConsoleDisplay(stream)
    await display.show(screen_at(code_snapshot()))
    output = stream.getvalue()
    assert ("\x1b[" in output) is escapes
    if escapes:
        run, _ = qr_on(replay(output))
        assert decode(run) == [AUTHENTIK]
    else:
        assert decode(qr_runs(output)[0]) == [AUTHENTIK]


# -- terminal: a real pty, read back through a VT100 emulator -----------------------------

FORTY = "https://sso.example.org/d?code=123456789"
SIXTY = "https://login.kitchen-hubs.example.net/device?code=123456789"
assert (len(FORTY), len(SIXTY)) == (40, 60)

# Written straight to the pty after a step: once the emulator side has read it, it has
# read everything the step wrote before it. The display never writes a status request.
SYNC = b"\x1b[5n"
PYTE_COLOURS = ["black", "red", "green", "brown", "blue", "magenta", "cyan", "white"]


class Terminal:
    """A pseudo-terminal of `columns` x `rows`: the display and the log handler write
    to its slave side, as to a shell's terminal; what comes out of the master side is
    fed to pyte, which keeps the screen and the lines scrolled off it.

    A thread keeps reading, as a terminal would: the kernel buffers only so much, and a
    writer would block on a full one."""

    def __init__(self, columns: int = 80, rows: int = 24) -> None:
        self.master, self._slave = os.openpty()
        self.screen = pyte.HistoryScreen(columns, rows, history=1000)
        self.resize(columns, rows)
        self._stream = pyte.ByteStream(self.screen)
        # stdout and stderr: two descriptors of the one terminal, as a shell hands out.
        self.out = open(self._slave, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        self.err = open(os.dup(self._slave), "w", encoding="utf-8")  # noqa: SIM115
        self._received = bytearray()
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read_on, daemon=True)
        self._reader.start()

    def _read_on(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the slave side is closed
                chunk = b""
            with self._arrived:
                if not chunk:
                    self._received.extend(b"\0EOF")
                    self._arrived.notify_all()
                    return
                self._received.extend(chunk)
                self._arrived.notify_all()

    def sync(self) -> bytes:
        """Feeds the emulator all that has been written so far, and returns it."""
        os.write(self._slave, SYNC)
        with self._arrived:
            # A guard against a hang, not a measure: the bytes are already written.
            assert self._arrived.wait_for(lambda: SYNC in self._received, timeout=60)
            end = self._received.index(SYNC)
            data = bytes(self._received[:end])
            del self._received[:end + len(SYNC)]
        self._stream.feed(data)
        return data

    def resize(self, columns: int, rows: int) -> None:
        fcntl.ioctl(self._slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.screen.resize(rows, columns)

    def now(self) -> pyte.HistoryScreen:
        self.sync()
        return self.screen

    def lines(self) -> list[str]:
        """The screen as text, now."""
        return [line.rstrip() for line in self.now().display]

    def scrolled_off(self) -> list[str]:
        columns = self.screen.columns
        return ["".join(line[x].data for x in range(columns)).rstrip()
                for line in self.screen.history.top]

    def close(self) -> None:
        self.out.close()
        self.err.close()
        os.close(self._slave)
        self._reader.join()
        os.close(self.master)


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    made = Terminal()
    yield made
    made.close()


@pytest.fixture
def agent_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    monkeypatch.setenv("TERM", "xterm-256color")
    logger = logging.getLogger("agent")
    handlers, level = list(logger.handlers), logger.level
    yield logging.getLogger("agent.session")
    for handler in logger.handlers:
        if handler not in handlers:
            handler.close()
    logger.handlers[:] = handlers
    logger.setLevel(level)


def log_to(stderr: TextIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's log handler as `device-agent run` sets it up, with `stderr` as
    stderr. Called from the test itself: pytest sets its own capture back in place
    between the fixtures and the test."""
    monkeypatch.setattr(sys, "stderr", stderr)
    setup_logging("info", environ={})


def on_terminal(terminal: Terminal) -> ConsoleDisplay:
    return ConsoleDisplay(terminal.out, clock=ManualClock(wall=NOW_WALL, mono=NOW_MONO))


def pyte_cell(char: pyte.screens.Char) -> Cell:
    def grey(name: str, default: int) -> int:
        if name == "default":
            return default
        if name.startswith("bright"):
            return BRIGHT[PYTE_COLOURS.index(name.removeprefix("bright"))]
        return PALETTE[PYTE_COLOURS.index(name)]

    ink, ground = grey(char.fg, DEFAULT_FG), grey(char.bg, DEFAULT_BG)
    return (char.data, *((ground, ink) if char.reverse else (ink, ground)))


def qr_on(screen: pyte.Screen) -> tuple[list[list[Cell]], list[str]]:
    """The QR code on `screen`, found by its light ground at the start of a line, and
    the text to the right of it on each of its lines."""
    rows = [[pyte_cell(screen.buffer[y][x]) for x in range(screen.columns)]
            for y in range(screen.lines)]
    lit = [y for y, cells in enumerate(rows) if cells[0][2] >= 200]
    if not lit:
        return [], []
    assert lit == list(range(lit[0], lit[-1] + 1)), "the QR code is in one piece"
    width = next((x for x, cell in enumerate(rows[lit[0]]) if cell[2] < 200), screen.columns)
    run = [rows[y][:width] for y in lit]
    assert all(cell[2] >= 200 for cells in run for cell in cells)
    beside = ["".join(ch for ch, _, _ in rows[y][width:]).strip() for y in lit]
    return run, beside


def replay(output: str, columns: int = 80, rows: int = 24) -> pyte.Screen:
    """Output written to a stream that only claims to be a terminal, as one would show
    it (a terminal's line discipline turns "\\n" into "\\r\\n")."""
    screen = pyte.Screen(columns, rows)
    pyte.Stream(screen).feed(output.replace("\n", "\r\n"))
    return screen


def row_of(lines: list[str], text: str) -> int:
    (row,) = [i for i, line in enumerate(lines) if text in line]
    return row


SIGNED_IN = Snapshot(phase=Phase.SIGNED_IN, device_name="Kitchen display",
                     user="Alice Example", token_expires_at=NOW_WALL + 3600)


async def test_a_log_line_stays_above_the_block_while_the_countdown_runs(
        terminal: Terminal, agent_logger: logging.Logger,
        monkeypatch: pytest.MonkeyPatch) -> None:
    log_to(terminal.err, monkeypatch)
    display = on_terminal(terminal)
    await display.start()
    snap = code_snapshot()
    await display.show(screen_at(snap))
    agent_logger.info("waiting for the person to approve")
    for elapsed in (1, 2, 3):
        await display.show(screen_at(snap, elapsed))
    lines = terminal.lines()
    logged = row_of(lines, "INFO agent.session: waiting for the person to approve")
    assert logged < row_of(lines, "Sign in (Kitchen display)")
    assert row_of(lines, "Code expires in 0:57") > logged
    run, _ = qr_on(terminal.now())
    assert decode(run) == [AUTHENTIK]
    # Printed once: the block went down a line to make room, nothing was repeated.
    assert not any("waiting for the person" in line for line in terminal.scrolled_off())
    assert sum("Sign in (Kitchen display)" in line for line in lines) == 1


async def test_the_sign_in_log_line_outlives_the_code(
        terminal: Terminal, agent_logger: logging.Logger,
        monkeypatch: pytest.MonkeyPatch) -> None:
    log_to(terminal.err, monkeypatch)
    display = on_terminal(terminal)
    await display.start()
    snap = code_snapshot()
    await display.show(screen_at(snap))
    await display.show(screen_at(snap, 1))
    agent_logger.info("signed in as Alice Example")
    await display.show(screen_at(snap, 2))
    await display.show(screen_at(SIGNED_IN, 3))
    lines = terminal.lines()
    logged = row_of(lines, "INFO agent.session: signed in as Alice Example")
    assert row_of(lines, "Signed in (Kitchen display)") > logged
    assert "as Alice Example" in lines[logged + 1:]
    assert row_of(lines, "Valid until 13:00") > logged
    # The spent code is gone, not left beside a line that calls it void.
    assert qr_on(terminal.now()) == ([], [])
    everything = terminal.scrolled_off() + lines
    assert not any("no longer valid" in line for line in everything)
    assert not any("123456789" in line for line in lines)


async def test_stopping_outlives_the_code_taken_down(
        terminal: Terminal, agent_logger: logging.Logger,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C during a sign-in: the service logs, the display closes, the service logs.
    log_to(terminal.err, monkeypatch)
    display = on_terminal(terminal)
    await display.start()
    snap = code_snapshot()
    await display.show(screen_at(snap))
    await display.show(screen_at(snap, 1))
    agent_logger.info("stopping")
    await display.close()
    agent_logger.info("stopped")
    lines = terminal.lines()
    stopping = row_of(lines, "INFO agent.session: stopping")
    void = row_of(lines, "The code 123456789 is no longer valid")
    assert stopping < void < row_of(lines, "INFO agent.session: stopped")
    assert qr_on(terminal.now()) == ([], [])
    assert not any("Code expires" in line for line in lines)


async def test_a_replaced_code_gives_way_to_the_next_screen(terminal: Terminal) -> None:
    display = on_terminal(terminal)
    await display.show(screen_at(code_snapshot()))
    expired = Snapshot(phase=Phase.CODE_EXPIRED, device_name="Kitchen display",
                       next_code_at=NOW_WALL + 300)
    await display.show(screen_at(expired))
    lines = terminal.lines()
    assert row_of(lines, "Next code at 12:05") == row_of(lines, "Code expired (Kitchen") + 1
    assert qr_on(terminal.now()) == ([], [])
    assert not any("Code expires" in line or "123456789" in line for line in lines)
    # Later updates of a screen without a countdown leave the terminal alone.
    await display.show(screen_at(expired))
    assert terminal.sync() == b""


async def test_a_log_line_that_goes_elsewhere_leaves_the_terminal_alone(
        terminal: Terminal, agent_logger: logging.Logger,
        monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = os.pipe()
    with open(write_end, "w", encoding="utf-8") as pipe:
        log_to(pipe, monkeypatch)
        display = on_terminal(terminal)
        await display.show(screen_at(code_snapshot()))
        before = terminal.lines()
        agent_logger.info("signed in as Alice Example")
        assert terminal.sync() == b""
        assert terminal.lines() == before
    with open(read_end, encoding="utf-8") as piped:
        logged = piped.read()
    assert logged.endswith("INFO agent.session: signed in as Alice Example\n")
    assert "\x1b" not in logged


async def test_without_a_terminal_everything_is_plain_lines(
        agent_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    # `device-agent run 2>&1 | cat`: stdout and stderr are one pipe.
    read_end, write_end = os.pipe()
    output: list[str] = []

    def read() -> None:
        with open(read_end, encoding="utf-8") as piped:
            output.append(piped.read())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with open(write_end, "w", encoding="utf-8") as pipe:
            log_to(pipe, monkeypatch)
            display = ConsoleDisplay(pipe, clock=ManualClock(wall=NOW_WALL, mono=NOW_MONO))
            await display.start()
            snap = code_snapshot()
            await display.show(screen_at(snap))
            agent_logger.info("waiting for the person to approve")
            await display.show(screen_at(snap, 1))
            agent_logger.info("signed in as Alice Example")
            await display.show(screen_at(SIGNED_IN, 2))
            agent_logger.info("stopping")
            await display.close()
    finally:
        reader.join()
    (text,) = output
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    order = [row_of(lines, "Sign in (Kitchen display)"),
             row_of(lines, f"Link with the code filled in: {AUTHENTIK}"),
             row_of(lines, "waiting for the person to approve"),
             row_of(lines, "signed in as Alice Example"),
             row_of(lines, "Signed in (Kitchen display)"),
             row_of(lines, "INFO agent.session: stopping")]
    assert order == sorted(order)
    assert lines[-1].endswith("stopping")


@pytest.mark.parametrize("uri", [FORTY, AUTHENTIK, SIXTY, LONGER_HOST],
                         ids=["40-chars", "authentik", "60-chars", "longer-host"])
async def test_the_sign_in_fits_80x24_with_the_link_beside_the_qr(
        terminal: Terminal, uri: str) -> None:
    display = on_terminal(terminal)
    await display.show(screen_at(code_snapshot(uri), 18))
    lines = terminal.lines()
    # All of it on the screen: nothing scrolled off the top, the countdown at the foot.
    assert terminal.scrolled_off() == []
    assert row_of(lines, "Sign in (Kitchen display)") < row_of(lines, "enter code  123456789")
    assert [line for line in lines if line][-1] == "Code expires in 0:42  [##############......]"
    run, beside = qr_on(terminal.now())
    assert decode(run) == [uri]
    assert len(run[0]) + 2 + max(map(len, beside)) <= 80
    assert uri in "".join(beside)
    assert any(line.startswith("Open") for line in beside)


async def test_the_qr_is_dark_on_light_with_a_2_module_quiet_zone(terminal: Terminal) -> None:
    display = on_terminal(terminal)
    await display.show(screen_at(code_snapshot()))
    run, _ = qr_on(terminal.now())
    grounds = {ground for cells in run for _, _, ground in cells}
    inks = {ink for cells in run for ch, ink, _ in cells if ch != " "}
    # Set explicitly, not left to the terminal's defaults, which may be either way round.
    assert grounds and min(grounds) >= 200
    assert inks and max(inks) <= 60
    # Two light modules: one text line above, two columns each side.
    assert {ch for ch, _, _ in run[0]} == {" "}
    assert {ch for ch, _, _ in run[1]} != {" "}
    for cells in run[1:-1]:
        assert all(ch == " " for ch, _, _ in cells[:2] + cells[-2:])
        assert cells[2][0] != " " or cells[-3][0] != " "
    assert len(run[0]) == qr_matrix(AUTHENTIK).size + 4


async def test_a_link_too_long_for_80x24_shows_the_url_and_code_and_says_so(
        terminal: Terminal) -> None:
    display = on_terminal(terminal)
    await display.show(screen_at(code_snapshot(HUNDRED)))
    lines = terminal.lines()
    assert terminal.scrolled_off() == []
    assert qr_on(terminal.now()) == ([], [])
    assert any("No room for the QR code in 80x24" in line for line in lines)
    assert "Open        auth.example.com/if/flow/default-device-code-flow/" in lines
    assert "enter code  123456789" in lines
    assert not any("scan the QR code" in line for line in lines)
    assert HUNDRED in "".join(lines)
    assert row_of(lines, "Code expires in 1:00") > row_of(lines, "No room")


async def test_a_terminal_made_larger_shows_the_qr_at_the_next_tick(terminal: Terminal) -> None:
    display = on_terminal(terminal)
    snap = code_snapshot(HUNDRED)
    await display.show(screen_at(snap))
    terminal.lines()
    terminal.resize(100, 30)
    await display.show(screen_at(snap, 1))
    lines = terminal.lines()
    run, beside = qr_on(terminal.now())
    assert decode(run) == [HUNDRED]
    assert HUNDRED in "".join(beside)
    assert not any("No room" in line for line in lines)
    assert sum("Sign in (Kitchen display)" in line for line in lines) == 1


async def test_terminal_block_has_bold_url_and_code_and_a_countdown() -> None:
    display, stream = make(tty=True)
    await display.show(screen_at(code_snapshot(), 18))
    output = stream.getvalue()
    assert "\x1b[1mOpen        auth.example.com/device\x1b[0m" in output
    assert "\x1b[1menter code  123456789\x1b[0m" in output
    assert "Kitchen display" in output
    assert output.endswith("Code expires in 0:42  [##############......]\n")


async def test_terminal_countdown_rewrites_one_line_and_not_the_qr() -> None:
    display, stream = make(tty=True)
    snap = code_snapshot()
    await display.show(screen_at(snap))
    drawn = len(stream.getvalue())
    await display.show(screen_at(snap, 1))
    update = stream.getvalue()[drawn:]
    assert update == "\x1b[1A\r\x1b[2KCode expires in 0:59  [###################.]\n"
    assert not BLOCKS.intersection(update) - {" "}
    # The same second again writes nothing at all.
    await display.show(screen_at(snap, 1.5))
    assert stream.getvalue()[drawn:] == update


async def test_terminal_counts_down_to_expired() -> None:
    display, stream = make(tty=True)
    snap = code_snapshot()
    await display.show(screen_at(snap, 58.5))
    await display.show(screen_at(snap, 60))
    assert stream.getvalue().endswith("\x1b[1A\r\x1b[2KCode expired\n")


# -- hostile text, long data -------------------------------------------------------------


@pytest.mark.parametrize("tty", [True, False], ids=["tty", "journal"])
async def test_control_characters_from_the_network_are_neutralised(tty: bool) -> None:
    display, stream = make(tty)
    snap = Snapshot(phase=Phase.SIGNED_IN, device_name="Kitchen display",
                    user="mallory\x1b]0;owned\x07\nFAKE journal line\u202e")
    await display.show(screen_at(snap))
    output = stream.getvalue()
    assert "\x1b]" not in output
    assert "\x07" not in output
    assert "\u202e" not in output
    assert "\nFAKE" not in output
    assert "mallory?]0;owned??FAKE journal line?" in output


@pytest.mark.parametrize("tty", [True, False], ids=["tty", "journal"])
async def test_data_too_long_for_any_qr_code_still_shows_the_text(tty: bool) -> None:
    display, stream = make(tty)
    huge = "https://auth.example.com/device?code=123456789&pad=" + "x" * 3000
    await display.show(screen_at(code_snapshot(huge)))
    output = stream.getvalue()
    assert "123456789" in output
    if tty:
        assert "The link is too long for a QR code" in output
    assert not qr_runs(output)


def test_console_display_is_a_display() -> None:
    display: Display = ConsoleDisplay(io.StringIO())
    assert display is not None


# -- qr_matrix ---------------------------------------------------------------------------


def test_qr_matrix_is_the_bare_symbol() -> None:
    matrix = qr_matrix(AUTHENTIK)
    assert matrix.error_correction == "M"
    assert matrix.size == 4 * matrix.version + 17 == len(matrix.modules)
    assert all(len(row) == matrix.size for row in matrix.modules)
    # The finder pattern starts at the very corner: no quiet zone included.
    assert matrix.modules[0][:7] == (True,) * 7
    assert matrix.modules[6][:7] == (True,) * 7
    assert matrix.modules[2][:7] == (True, False, True, True, True, False, True)


@pytest.mark.parametrize(
    ("max_modules", "level", "version"),
    [(None, "M", 4), (200, "H", 6), (41, "H", 6), (40, "Q", 4), (33, "Q", 4), (32, "L", 3),
     (29, "L", 3)],
)
def test_qr_matrix_takes_the_most_error_correction_that_fits(
        max_modules: int | None, level: str, version: int) -> None:
    matrix = qr_matrix(AUTHENTIK, max_modules=max_modules)
    assert (matrix.error_correction, matrix.version) == (level, version)
    if max_modules is not None:
        assert matrix.size <= max_modules


def test_qr_matrix_raises_when_nothing_fits() -> None:
    with pytest.raises(ValueError):
        qr_matrix(AUTHENTIK, max_modules=28)
    with pytest.raises(ValueError):
        qr_matrix("x" * 3000)


_PILLOW_AFTER_A_MATRIX = f"""
import sys
from agent.display.qr import qr_matrix
qr_matrix({AUTHENTIK!r}, max_modules=40)
loaded = sorted(name for name in sys.modules if name.split(".")[0] == "PIL")
# What qrcode offers with Pillow must still work once the daemon has made a matrix.
import qrcode
from qrcode.image.styledpil import StyledPilImage
from qrcode.image.styles.moduledrawers import RoundedModuleDrawer
code = qrcode.QRCode()
code.add_data("x")
image = code.make_image(image_factory=StyledPilImage, module_drawer=RoundedModuleDrawer())
print(loaded, type(image.get_image()).__module__)
"""


def test_a_qr_matrix_loads_no_pillow_and_leaves_qrcode_whole() -> None:
    # In a fresh interpreter: this one has long imported Pillow for the tests.
    answer = subprocess.run([sys.executable, "-c", _PILLOW_AFTER_A_MATRIX],
                            capture_output=True, text=True, check=True, cwd=ROOT)
    assert answer.stdout.split() == ["[]", "PIL.Image"]


def test_qr_matrix_of_a_lower_level_still_decodes() -> None:
    matrix = qr_matrix(HUNDRED, max_modules=41)
    assert matrix.error_correction in {"L", "M"}
    assert scan_matrix(matrix) == [HUNDRED]


async def test_log_lines_after_the_terminal_narrows_do_not_repeat_the_block(
        agent_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal(80, 24)
    try:
        log_to(terminal.err, monkeypatch)
        display = on_terminal(terminal)
        await display.start()
        await display.show(Screen(kind="waiting", title="Provider trouble",
                                  lines=("HTTP 503 from auth.example.org: " + "x" * 40,
                                         "Next try at 12:05 " + "y" * 50)))
        terminal.lines()
        terminal.resize(40, 24)
        for n in range(3):
            agent_logger.info("line %d", n)
        lines = terminal.lines() + terminal.scrolled_off()
        assert sum("Provider trouble" in line for line in lines) == 1, "\n".join(lines)
    finally:
        terminal.close()
