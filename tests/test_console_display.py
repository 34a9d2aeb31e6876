"""The console display, checked the way a person sees it: the output is replayed on a
small model of a dark-themed terminal, turned into pixels, and decoded with zxing."""

from __future__ import annotations

import dataclasses
import io
import re
from datetime import UTC, datetime

import pytest
import zxingcpp
from PIL import Image

from agent.display import Display
from agent.display.console import ConsoleDisplay
from agent.display.qr import qr_matrix
from agent.display.screens import Screen, build_screen
from agent.state import Phase, Snapshot
from tests.clock import ManualClock
from tests.qrscan import AUTHENTIK, HUNDRED, LONGER_HOST, scan_matrix

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


@pytest.mark.parametrize("tty", [True, False], ids=["tty", "journal"])
@pytest.mark.parametrize("uri", [AUTHENTIK, LONGER_HOST, HUNDRED],
                         ids=["authentik", "longer-host", "100-chars"])
async def test_printed_qr_code_decodes_to_the_complete_uri(tty: bool, uri: str) -> None:
    display, stream = make(tty)
    await display.start()
    await display.show(screen_at(code_snapshot(uri)))
    await display.close()
    runs = qr_runs(stream.getvalue())
    assert len(runs) == 1
    assert decode(runs[0]) == [uri]


async def test_terminal_qr_is_dark_on_light_whatever_the_theme() -> None:
    display, stream = make(tty=True)
    await display.show(screen_at(code_snapshot()))
    (run,) = qr_runs(stream.getvalue())
    grounds = {ground for cells in run for _, _, ground in cells}
    inks = {ink for cells in run for _, ink, _ in cells}
    # Set explicitly, not left to the terminal's defaults, which may be either way round.
    assert grounds and min(grounds) >= 200
    assert inks and max(inks) <= 60
    # Four light modules of quiet zone: two text lines above and below, four columns.
    for cells in run[:2]:
        assert {ch for ch, _, _ in cells} == {" "}
    for cells in run[2:-2]:
        assert all(ch == " " for ch, _, _ in cells[:4] + cells[-4:])


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
    assert "123 456 789" in text
    assert "Kitchen display" in text
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
    assert ("\x1b[" in stream.getvalue()) is escapes
    assert decode(qr_runs(stream.getvalue())[0]) == [AUTHENTIK]


# -- terminal ----------------------------------------------------------------------------


async def test_terminal_block_has_bold_url_and_code_and_a_countdown() -> None:
    display, stream = make(tty=True)
    await display.show(screen_at(code_snapshot(), 18))
    output = stream.getvalue()
    assert "\x1b[1mOpen        auth.example.com/device\x1b[0m" in output
    assert "\x1b[1menter code  123 456 789\x1b[0m" in output
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


async def test_terminal_marks_a_replaced_code_as_void_and_draws_the_next_screen() -> None:
    display, stream = make(tty=True)
    await display.show(screen_at(code_snapshot()))
    drawn = len(stream.getvalue())
    expired = Snapshot(phase=Phase.CODE_EXPIRED, device_name="Kitchen display",
                       next_code_at=NOW_WALL + 300)
    await display.show(screen_at(expired))
    update = stream.getvalue()[drawn:]
    assert update.startswith("\x1b[1A\r\x1b[2KThis code is no longer valid\n")
    assert "\x1b[1mCode expired\x1b[0m" in update
    assert "Next code at 12:05" in update
    assert not qr_runs(update)
    # Later updates of a screen without a countdown leave the terminal alone.
    await display.show(screen_at(expired))
    assert stream.getvalue()[drawn:] == update


async def test_close_voids_a_code_left_on_the_terminal() -> None:
    display, stream = make(tty=True)
    await display.show(screen_at(code_snapshot()))
    await display.close()
    assert stream.getvalue().endswith("\x1b[1A\r\x1b[2KThis code is no longer valid\n")


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
    assert "123 456 789" in output
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


def test_qr_matrix_of_a_lower_level_still_decodes() -> None:
    matrix = qr_matrix(HUNDRED, max_modules=41)
    assert matrix.error_correction in {"L", "M"}
    assert scan_matrix(matrix) == [HUNDRED]
