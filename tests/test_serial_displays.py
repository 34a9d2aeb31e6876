"""Serial displays, checked on real serial I/O: pyserial opens a pty (or its loop://
port) and the bytes that come out are replayed on small models of the panels: a VT100
whose screen is turned into pixels and decoded with zxing, a Nextion command parser, and
HD44780 character LCDs behind SerLCD and Matrix Orbital backpacks."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import logging
import os
import re
import select
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import serial
import zxingcpp
from PIL import Image

from agent.config import DisplayConfig
from agent.display import Display
from agent.display.screens import Screen, build_screen
from agent.display.serial import (
    RETRY_INTERVAL,
    SerialDisplay,
    SerialPort,
    create_serial_display,
    open_port,
)
from agent.errors import ConfigError
from agent.state import Phase, Snapshot
from tests.clock import ManualClock
from tests.qrscan import AUTHENTIK, LONGER_HOST, URIS, scan_text

NOW_MONO = 10_000.0
NOW_WALL = 1_800_000_000.0



def code_snapshot(complete: str = AUTHENTIK, *, user_code: str | None = None,
                  device_name: str = "Kitchen display") -> Snapshot:
    code = user_code or complete.rsplit("=", 1)[-1][:9]
    if not code.isdigit():
        code = "123456789"
    return Snapshot(
        phase=Phase.AWAITING_USER,
        device_name=device_name,
        user_code=code,
        verification_uri=complete.split("?")[0],
        verification_uri_complete=complete,
        code_deadline=NOW_MONO + 60,
        code_expires_at=NOW_WALL + 60,
    )


def screen_at(snap: Snapshot, elapsed: float = 0.0) -> Screen:
    return build_screen(snap, now_mono=NOW_MONO + elapsed, now_wall=NOW_WALL + elapsed,
                        code_lifetime=60)


def code_screen(uri: str = AUTHENTIK, elapsed: float = 0.0, **fields: Any) -> Screen:
    return screen_at(code_snapshot(uri, **fields), elapsed)


SIGNED_IN = screen_at(Snapshot(phase=Phase.SIGNED_IN, device_name="Kitchen display",
                               user="alice"))
BLANK = Screen(kind="blank", title="", lines=())


# -- wires: a pty, and pyserial's loop:// -----------------------------------------------


class Pty:
    """A pty pair: the display opens the slave through a path we control (a symlink,
    as /dev/serial/by-id/ is), the test reads what it wrote from the master.

    A thread keeps reading, as a terminal would: the kernel holds only a few KiB, and a
    frame bigger than that would otherwise wait for the write timeout."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master, self._slave = os.openpty()
        os.set_blocking(self.master, False)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(os.ttyname(self._slave))
        self._received = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_on, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except (BlockingIOError, OSError):
                return
            if not chunk:
                return
            self._received.extend(chunk)

    def _read_on(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self.master], [], [], 0.02)
            if readable:
                with self._lock:
                    if not self._stop.is_set():
                        self._drain()

    def read(self) -> bytes:
        """Everything written so far and not yet read."""
        with self._lock:
            self._drain()
            data = bytes(self._received)
            self._received.clear()
        return data

    def unplug(self) -> None:
        """As a USB adapter pulled out: the node goes, the open descriptor fails."""
        if self._stop.is_set():
            return
        with self._lock:
            self._stop.set()
        self._reader.join()
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
        os.close(self.master)
        os.close(self._slave)


@pytest.fixture
def ptys(tmp_path: Path) -> Iterator[list[Pty]]:
    made: list[Pty] = []
    yield made
    for pty in made:
        pty.unplug()


class LoopPorts:
    """An opener that opens loop:// through the display's own `open_port` and keeps
    the port, so the test can read back what the display wrote to it (pyserial's loop
    buffer holds 4 KiB: enough for the Nextion and the character LCDs)."""

    def __init__(self) -> None:
        self.ports: list[SerialPort] = []
        self.calls: list[dict[str, Any]] = []

    def __call__(self, url: str, *, baudrate: int, flow_control: str,
                 write_timeout: float) -> SerialPort:
        self.calls.append({"url": url, "baudrate": baudrate, "flow_control": flow_control,
                           "write_timeout": write_timeout})
        port = open_port(url, baudrate=baudrate, flow_control=flow_control,
                         write_timeout=write_timeout)
        self.ports.append(port)
        return port

    def read(self) -> bytes:
        port: Any = self.ports[-1]
        return bytes(port.read(port.in_waiting))


def serial_display(kind: str, port: str, *, clock: ManualClock | None = None,
                   opener: Any = None, **options: Any) -> SerialDisplay:
    config = DisplayConfig(type=kind, options={"port": port, **options})
    return create_serial_display(config, clock=clock or ManualClock(), opener=opener)


# -- a VT100 -----------------------------------------------------------------------------

# Light text on a dark ground, as most terminals are set up; xterm's 8 colours.
DEFAULT_FG, DEFAULT_BG = 229, 0
PALETTE = {0: 0, 1: 80, 2: 100, 3: 130, 4: 40, 5: 80, 6: 120, 7: 229}
BRIGHT = {0: 127, 1: 160, 2: 170, 3: 200, 4: 120, 5: 160, 6: 200, 7: 255}
CSI = re.compile(r"\x1b\[(\??)([0-9;]*)([A-Za-z])")
BLOCKS = frozenset("▀▄█")


@dataclasses.dataclass(frozen=True)
class VtCell:
    ch: str = " "
    fg: int = DEFAULT_FG
    bg: int = DEFAULT_BG
    bold: bool = False


class Vt100:
    """Enough of a VT100/xterm for what a display may send; anything else fails the
    test, so a stray sequence cannot hide."""

    def __init__(self, columns: int = 80, rows: int = 24) -> None:
        self.columns, self.rows = columns, rows
        self.cells = [[VtCell()] * columns for _ in range(rows)]
        self.row = self.col = 0
        self.fg, self.bg, self.bold = DEFAULT_FG, DEFAULT_BG, False
        self.autowrap = True
        self.pending_wrap = False
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._rest = ""

    def feed(self, data: bytes) -> Vt100:
        text = self._rest + self._decoder.decode(data)
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "\x1b":
                match = CSI.match(text, i)
                if match is None:
                    assert len(text) - i < 16, f"unknown escape {text[i:i + 16]!r}"
                    break
                self._csi(match.group(1), match.group(2), match.group(3))
                i = match.end()
                continue
            assert ch >= " ", f"control character {ch!r} sent"
            self._put(ch)
            i += 1
        self._rest = text[i:]
        return self

    def _put(self, ch: str) -> None:
        if self.pending_wrap:
            self.pending_wrap = False
            self.col = 0
            if self.row == self.rows - 1:
                self.cells = [*self.cells[1:], [VtCell()] * self.columns]
            else:
                self.row += 1
        self.cells[self.row][self.col] = VtCell(ch, self.fg, self.bg, self.bold)
        if self.col == self.columns - 1:
            self.pending_wrap = self.autowrap
        else:
            self.col += 1

    def _csi(self, private: str, params: str, final: str) -> None:
        numbers = [int(p) if p else 0 for p in params.split(";")] if params else []
        self.pending_wrap = False
        if private:
            assert final in "hl" and numbers in ([7], [25]), (private, params, final)
            if numbers == [7]:
                self.autowrap = final == "h"
        elif final in "Hf":
            row, col = [*numbers, 1, 1][:2]
            self.row = min(max(row, 1), self.rows) - 1
            self.col = min(max(col, 1), self.columns) - 1
        elif final == "K":
            assert numbers in ([], [0])
            for col in range(self.col, self.columns):
                self.cells[self.row][col] = VtCell(bg=self.bg)
        elif final == "J":
            assert numbers == [2]
            self.cells = [[VtCell(bg=self.bg)] * self.columns for _ in range(self.rows)]
        elif final == "m":
            for code in numbers or [0]:
                self._sgr(code)
        else:
            raise AssertionError(f"unexpected CSI {params}{final}")

    def _sgr(self, code: int) -> None:
        if code == 0:
            self.fg, self.bg, self.bold = DEFAULT_FG, DEFAULT_BG, False
        elif code == 1:
            self.bold = True
        elif 30 <= code <= 37:
            self.fg = PALETTE[code - 30]
        elif 90 <= code <= 97:
            self.fg = BRIGHT[code - 90]
        elif 40 <= code <= 47:
            self.bg = PALETTE[code - 40]
        elif 100 <= code <= 107:
            self.bg = BRIGHT[code - 100]
        else:
            raise AssertionError(f"unexpected SGR {code}")

    # -- what a person sees --------------------------------------------------------------

    def text(self) -> list[str]:
        """Each row's text outside the QR code (cells on the terminal's own ground)."""
        return ["".join(c.ch for c in row if c.bg == DEFAULT_BG).strip() for row in self.cells]

    def bold_text(self) -> list[str]:
        return ["".join(c.ch for c in row if c.bold).strip() for row in self.cells]

    def picture(self, *, scale: int = 4) -> Image.Image:
        """Two pixels a cell, top and bottom: ▀ ▄ █ ink their halves, a space shows its
        ground, and any other glyph is taken as solid ink (the worst case beside a QR
        code)."""
        image = Image.new("L", (self.columns, 2 * self.rows))
        for r, row in enumerate(self.cells):
            for c, cell in enumerate(row):
                solid = cell.ch != " " and cell.ch not in BLOCKS
                top = cell.fg if cell.ch in "▀█" or solid else cell.bg
                bottom = cell.fg if cell.ch in "▄█" or solid else cell.bg
                image.putpixel((c, 2 * r), top)
                image.putpixel((c, 2 * r + 1), bottom)
        return image.resize((image.width * scale, image.height * scale),
                            Image.Resampling.NEAREST)

    def decode(self) -> list[str]:
        # No inversion: a code that only reads light-on-dark is not good enough for phones.
        found = zxingcpp.read_barcodes(self.picture(), try_invert=False)
        return [b.text for b in found if b.format == zxingcpp.BarcodeFormat.QRCode]


def joined(rows: list[str]) -> str:
    return "".join(rows)


# -- terminal ----------------------------------------------------------------------------


@URIS
@pytest.mark.parametrize(("columns", "rows"), [(80, 24), (132, 50), (50, 60)],
                         ids=["80x24", "132x50", "50x60-stacked"])
async def test_terminal_qr_decodes_to_the_complete_uri(
        tmp_path: Path, ptys: list[Pty], uri: str, columns: int, rows: int) -> None:
    ptys.append(pty := Pty(tmp_path / "ttyUSB0"))
    display = serial_display("terminal", str(pty.link), columns=columns, rows=rows)
    await display.start()
    screen = code_screen(uri)
    await display.show(screen)
    vt = Vt100(columns, rows).feed(pty.read())
    await display.close()

    assert vt.decode() == [uri]
    assert screen.url is not None and screen.url in joined(vt.text())
    assert screen.user_code_display in vt.bold_text()
    assert "Sign in" in vt.bold_text()
    assert "Kitchen display" in vt.text()
    assert "Expires in 1:00" in vt.text()


async def test_terminal_qr_is_black_on_white_beside_the_text(
        tmp_path: Path, ptys: list[Pty]) -> None:
    ptys.append(pty := Pty(tmp_path / "tty"))
    display = serial_display("terminal", str(pty.link))
    await display.show(code_screen())
    vt = Vt100().feed(pty.read())
    qr = [cell for row in vt.cells for cell in row if cell.bg != DEFAULT_BG]
    assert qr and {cell.bg for cell in qr} == {255}
    assert {cell.fg for cell in qr if cell.ch != " "} == {0}
    # Side by side on 80x24: the code sits right of the symbol, on the same rows.
    width = sum(1 for cell in vt.cells[0] if cell.bg != DEFAULT_BG)
    assert 29 <= width <= 56
    # Four light modules of quiet zone: two text rows above, four columns either side.
    block = [row[:width] for row in vt.cells if row[0].bg != DEFAULT_BG]
    assert len(block) == (width + 1) // 2
    for row in block[:2]:
        assert {cell.ch for cell in row} == {" "}
    for row in block[2:-2]:
        assert {cell.ch for cell in row[:4] + row[-4:]} == {" "}
    assert block[2][4].ch == "█"  # the finder pattern's corner
    code_row = next(r for r, text in enumerate(vt.text()) if text == "123456789")
    assert vt.cells[code_row][0].bg == 255
    await display.close()


async def test_terminal_countdown_tick_rewrites_only_what_changed(
        tmp_path: Path, ptys: list[Pty]) -> None:
    ptys.append(pty := Pty(tmp_path / "tty"))
    display = serial_display("terminal", str(pty.link))
    vt = Vt100()
    await display.show(code_screen())
    full = pty.read()
    vt.feed(full)
    assert len(full) > 1000

    await display.show(code_screen(elapsed=1))
    tick = pty.read()
    vt.feed(tick)
    assert 0 < len(tick) < 40, tick
    assert not BLOCKS.intersection(tick.decode())
    assert b"\x1b[2J" not in tick
    assert "Expires in 0:59" in vt.text()
    assert vt.decode() == [AUTHENTIK]

    # The same second again: nothing at all.
    await display.show(code_screen(elapsed=1.4))
    assert pty.read() == b""
    await display.close()


async def test_terminal_overwrites_a_new_screen_in_place(tmp_path: Path,
                                                          ptys: list[Pty]) -> None:
    ptys.append(pty := Pty(tmp_path / "tty"))
    display = serial_display("terminal", str(pty.link))
    vt = Vt100()
    await display.show(code_screen())
    vt.feed(pty.read())
    await display.show(SIGNED_IN)
    update = pty.read()
    vt.feed(update)
    assert b"\x1b[2J" not in update  # no flash of an empty screen
    assert vt.text()[:4] == ["Signed in", "Kitchen display", "", "as alice"]
    assert not any(vt.text()[4:])
    assert vt.decode() == []
    assert {cell.bg for row in vt.cells for cell in row} == {DEFAULT_BG}
    await display.close()


async def test_terminal_blank_clears_and_the_code_comes_back(tmp_path: Path,
                                                              ptys: list[Pty]) -> None:
    ptys.append(pty := Pty(tmp_path / "tty"))
    display = serial_display("terminal", str(pty.link))
    vt = Vt100()
    await display.show(SIGNED_IN)
    await display.show(BLANK)
    vt.feed(pty.read())
    assert {cell.ch for row in vt.cells for cell in row} == {" "}
    await display.show(BLANK)
    assert pty.read() == b""
    await display.show(code_screen())
    vt.feed(pty.read())
    assert vt.decode() == [AUTHENTIK]
    await display.close()


async def test_terminal_close_voids_a_code_on_screen(tmp_path: Path, ptys: list[Pty]) -> None:
    ptys.append(pty := Pty(tmp_path / "tty"))
    display = serial_display("terminal", str(pty.link))
    vt = Vt100()
    await display.show(code_screen())
    await display.close()
    vt.feed(pty.read())
    assert vt.decode() == []
    assert "This code is no longer valid" in vt.text()


async def test_terminal_ascii_charset_on_80x24_drops_the_qr_and_says_so(
        tmp_path: Path, ptys: list[Pty], caplog: pytest.LogCaptureFixture) -> None:
    ptys.append(pty := Pty(tmp_path / "tty"))
    display = serial_display("terminal", str(pty.link), charset="ascii")
    caplog.set_level(logging.INFO, "agent.display.serial")
    vt = Vt100()
    for elapsed in (0, 1, 2):
        await display.show(code_screen(device_name="Küche", elapsed=elapsed))
        data = pty.read()
        assert max(data) < 0x80
        vt.feed(data)
    assert vt.decode() == []
    text = vt.text()
    assert "auth.example.com/device" in text
    assert "123456789" in text
    assert "K?che" in text
    assert not any("QR" in line for line in text)
    notes = [r for r in caplog.records if "does not fit" in r.getMessage()]
    assert len(notes) == 1
    assert "80x24 ASCII terminal" in notes[0].getMessage()
    await display.close()


@URIS
async def test_terminal_ascii_charset_on_a_tall_terminal_draws_a_qr_that_scans(
        tmp_path: Path, ptys: list[Pty], uri: str) -> None:
    ptys.append(pty := Pty(tmp_path / "tty"))
    display = serial_display("terminal", str(pty.link), charset="ascii", columns=132,
                             rows=60)
    await display.show(code_screen(uri))
    data = pty.read()
    assert max(data) < 0x80
    vt = Vt100(132, 60).feed(data)
    assert vt.decode() == [uri]
    # Modules are whole cells, black or white ground: no glyph that inks part of one.
    qr = [cell for row in vt.cells for cell in row if cell.bg != DEFAULT_BG or cell.fg == 0]
    assert qr and {cell.ch for cell in qr} == {" "}
    assert {cell.bg for cell in qr} == {0, 255}
    await display.close()


async def test_terminal_neutralises_control_and_wide_characters(tmp_path: Path,
                                                                 ptys: list[Pty]) -> None:
    ptys.append(pty := Pty(tmp_path / "tty"))
    display = serial_display("terminal", str(pty.link))
    hostile = screen_at(Snapshot(phase=Phase.SIGNED_IN, device_name="Kitchen display",
                                 user="mallory\x1b]0;owned\x07\u202e漢e\u0301"))
    await display.show(hostile)
    data = pty.read()
    vt = Vt100().feed(data)  # the model fails on any stray control character
    assert b"\x1b]" not in data
    assert "as mallory?]0;owned???e?" in vt.text()
    await display.close()


# -- Nextion -----------------------------------------------------------------------------

END = b"\xff\xff\xff"


def nextion_commands(data: bytes) -> list[str]:
    assert data.endswith(END), "the last command is not terminated"
    parts = data.split(END)[:-1]
    for part in parts:
        assert b"\xff" not in part, part
    return [part.decode("iso-8859-1") for part in parts]


TXT = re.compile(r'^([A-Za-z0-9_.]+)\.txt="((?:[^"\\]|\\.)*)"$')


def nextion_values(commands: list[str]) -> dict[str, str]:
    """The text each component ends up with, its literal unescaped as the Nextion does."""
    values: dict[str, str] = {}
    for command in commands:
        match = TXT.match(command)
        if match:
            values[match.group(1)] = re.sub(
                r"\\(.)", lambda m: "\r" if m.group(1) == "r" else m.group(1), match.group(2))
    return values


@URIS
async def test_nextion_sets_the_components_and_the_qr_text(uri: str) -> None:
    wire = LoopPorts()
    display = serial_display("nextion", "loop://", opener=wire)
    await display.start()
    assert wire.calls[0]["baudrate"] == 9600
    screen = code_screen(uri)
    await display.show(screen)
    commands = nextion_commands(wire.read())
    # A lone terminator first ends whatever the panel was half-way through.
    assert commands[:4] == ["", "sleep=0", "dim=100", "page 0"]
    values = nextion_values(commands)
    assert values["tCode"] == "123456789" if uri != LONGER_HOST else "004815162"
    assert values["tUrl"] == screen.url
    assert values["tTitle"] == "Sign in"
    assert values["tName"] == "Kitchen display"
    assert values["qr0"] == uri
    assert values["tStatus"] == "Expires in 1:00\rType the 9 digits\ror scan the QR code"
    assert "vis qr0,1" in commands
    assert scan_text(values["qr0"]) == [uri]
    await display.close()


async def test_nextion_escapes_quotes_and_backslashes_and_drops_control_characters() -> None:
    wire = LoopPorts()
    display = serial_display("nextion", "loop://", opener=wire)
    name = 'Bob\'s "lab" \\ 2\x07\n\x1b[2J'
    await display.show(code_screen(device_name=name))
    commands = nextion_commands(wire.read())
    assert 'tName.txt="Bob\'s \\"lab\\" \\\\ 2[2J"' in commands
    assert nextion_values(commands)["tName"] == "Bob's \"lab\" \\ 2[2J"
    await display.close()


async def test_nextion_limits_text_and_keeps_ff_out_of_values(
        caplog: pytest.LogCaptureFixture) -> None:
    wire = LoopPorts()
    display = serial_display("nextion", "loop://", opener=wire, max_text=10, qr_max_text=40)
    await display.show(code_screen(device_name="Hÿdra kitchen display 漢"))
    data = wire.read()
    commands = nextion_commands(data)  # fails on any 0xFF inside a command
    values = nextion_values(commands)
    assert values["tName"] == "H?dra k..."
    assert len(values["tStatus"]) == 10
    # The link is longer than qr_max_text: hidden, not cut into a wrong address.
    assert "qr0" not in values
    assert "vis qr0,0" in commands
    assert sum("qr_max_text" in r.getMessage() for r in caplog.records) == 1
    await display.show(code_screen(elapsed=1))
    assert sum("qr_max_text" in r.getMessage() for r in caplog.records) == 1
    await display.close()


async def test_nextion_countdown_tick_sends_one_command() -> None:
    wire = LoopPorts()
    display = serial_display("nextion", "loop://", opener=wire, progress_component="j0")
    await display.show(code_screen())
    assert "j0.val=100" in nextion_commands(wire.read())
    await display.show(code_screen(elapsed=1))
    assert nextion_commands(wire.read()) == [
        'tStatus.txt="Expires in 0:59\\rType the 9 digits\\ror scan the QR code"',
        "j0.val=98"]
    await display.show(code_screen(elapsed=1.2))
    assert wire.read() == b""
    await display.close()


async def test_nextion_custom_names_and_absent_components() -> None:
    wire = LoopPorts()
    display = serial_display("nextion", "loop://", opener=wire, page="signin",
                             code_component="page1.code", qr_component="page1.qr",
                             title_component=None, name_component=None, url_component=None,
                             status_component=None, baudrate=115200)
    await display.show(code_screen())
    commands = nextion_commands(wire.read())
    assert wire.calls[0]["baudrate"] == 115200
    assert commands == ["", "sleep=0", "dim=100", "page signin",
                        'page1.code.txt="123456789"', f'page1.qr.txt="{AUTHENTIK}"',
                        "vis qr,1"]
    await display.close()


async def test_nextion_blank_sleeps_and_wakes_with_a_full_redraw() -> None:
    wire = LoopPorts()
    display = serial_display("nextion", "loop://", opener=wire, brightness=60)
    await display.show(SIGNED_IN)
    first = nextion_commands(wire.read())
    assert "dim=60" in first
    assert "vis qr0,0" in first
    assert nextion_values(first)["tStatus"] == "as alice"
    await display.show(BLANK)
    assert nextion_commands(wire.read()) == ["dim=0", "sleep=1"]
    await display.show(BLANK)
    assert wire.read() == b""
    await display.show(SIGNED_IN)
    woken = nextion_commands(wire.read())
    assert woken[:3] == ["sleep=0", "dim=60", "page 0"]
    assert nextion_values(woken) == nextion_values(first)
    await display.close()


# -- character LCDs ----------------------------------------------------------------------


class CharLcd:
    """An HD44780 behind a SerLCD (OpenLCD) or Matrix Orbital backpack."""

    def __init__(self, columns: int, rows: int, protocol: str) -> None:
        self.columns, self.rows, self.protocol = columns, rows, protocol
        self.ddram = bytearray(b" " * 0x80)
        self.address = 0
        self.backlight = True
        self.row = self.col = 0
        self.cells = [[" "] * columns for _ in range(rows)]

    def feed(self, data: bytes) -> CharLcd:
        i = 0
        while i < len(data):
            byte = data[i]
            if self.protocol == "serlcd" and byte == 0x7C:
                setting = data[i + 1]
                if setting == 0x2D:
                    self.ddram[:] = b" " * 0x80
                    self.address = 0
                elif 128 <= setting <= 217:
                    # Three channels; lit when any is above its "off" value.
                    channel_on = {128: 157, 158: 187, 188: 217}
                    for low in channel_on:
                        if low <= setting <= low + 29:
                            setattr(self, f"level_{low}", setting - low)
                    self.backlight = any(getattr(self, f"level_{low}", 29) > 0
                                         for low in channel_on)
                else:
                    raise AssertionError(f"unexpected SerLCD setting {setting:#x}")
                i += 2
            elif self.protocol == "serlcd" and byte == 0xFE:
                command = data[i + 1]
                assert command & 0x80, f"unexpected HD44780 command {command:#x}"
                self.address = command & 0x7F
                i += 2
            elif self.protocol == "matrix_orbital" and byte == 0xFE:
                command = data[i + 1]
                if command == 0x58:
                    self.cells = [[" "] * self.columns for _ in range(self.rows)]
                    self.row = self.col = 0
                    i += 2
                elif command == 0x47:
                    col, row = data[i + 2], data[i + 3]
                    assert 1 <= col <= self.columns and 1 <= row <= self.rows
                    self.col, self.row = col - 1, row - 1
                    i += 4
                elif command == 0x42:
                    self.backlight = True
                    i += 3
                elif command in (0x46, 0x52, 0x54, 0x4B):
                    if command == 0x46:
                        self.backlight = False
                    i += 2
                else:
                    raise AssertionError(f"unexpected Matrix Orbital command {command:#x}")
            else:
                assert 0x20 <= byte < 0x7F, f"unprintable byte {byte:#x}"
                if self.protocol == "serlcd":
                    self.ddram[self.address] = byte
                    self.address = (self.address + 1) % 0x80
                else:
                    self.cells[self.row][self.col] = chr(byte)
                    self.col += 1
                    if self.col == self.columns:  # Matrix Orbital wraps to the next row
                        self.col = 0
                        self.row = (self.row + 1) % self.rows
                i += 1
        return self

    def text(self) -> list[str]:
        if self.protocol == "matrix_orbital":
            return ["".join(row) for row in self.cells]
        offsets = (0x00, 0x40, self.columns, 0x40 + self.columns)
        return [self.ddram[offsets[r]:offsets[r] + self.columns].decode()
                for r in range(self.rows)]


LCDS = pytest.mark.parametrize(
    ("columns", "rows", "protocol"),
    [(16, 2, "serlcd"), (20, 4, "serlcd"), (16, 2, "matrix_orbital"),
     (20, 4, "matrix_orbital")],
    ids=["16x2-serlcd", "20x4-serlcd", "16x2-matrix", "20x4-matrix"])


def lcd_display(wire: LoopPorts, columns: int, rows: int, protocol: str,
                clock: ManualClock | None = None) -> SerialDisplay:
    return serial_display("charlcd", "loop://", opener=wire, columns=columns, rows=rows,
                          protocol=protocol, clock=clock)


@LCDS
async def test_charlcd_shows_the_grouped_code_and_the_url(
        columns: int, rows: int, protocol: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "agent.display.serial")
    clock = ManualClock(mono=NOW_MONO)
    wire = LoopPorts()
    display = lcd_display(wire, columns, rows, protocol, clock)
    lcd = CharLcd(columns, rows, protocol)
    await display.show(code_screen())
    lcd.feed(wire.read())
    if rows == 2:
        assert lcd.text() == ["Code: 123456789 ", "auth.example.com"]
    else:
        assert lcd.text() == ["Sign in         1:00", "auth.example.com/dev",
                              "ice                 ", "Code: 123456789     "]
    assert lcd.backlight
    # Two seconds on, a 16x2 row shows the rest of the URL.
    clock.advance(2)
    await display.show(code_screen(elapsed=2))
    lcd.feed(wire.read())
    if rows == 2:
        assert lcd.text() == ["Code: 123456789 ", "/device         "]
    else:
        assert lcd.text() == ["Sign in         0:58", "auth.example.com/dev",
                              "ice                 ", "Code: 123456789     "]
    assert sum("cannot draw a QR code" in r.getMessage() for r in caplog.records) == 1
    await display.close()


@LCDS
async def test_charlcd_pages_through_a_long_url_without_skipping(
        columns: int, rows: int, protocol: str) -> None:
    clock = ManualClock(mono=NOW_MONO)
    wire = LoopPorts()
    display = lcd_display(wire, columns, rows, protocol, clock)
    lcd = CharLcd(columns, rows, protocol)
    url = code_screen(LONGER_HOST).url
    assert url is not None and len(url) > 2 * columns
    seen: list[str] = []
    for second in range(12):
        await display.show(code_screen(LONGER_HOST, second))
        lcd.feed(wire.read())
        text = lcd.text()
        assert text[0 if rows == 2 else 3].rstrip().endswith("004815162")
        seen.append(text[1] if rows == 2 else text[1] + text[2])
        clock.advance(1)
    # Each part stays two seconds, and together they spell the URL.
    assert all(seen[i] == seen[i + 1] for i in range(0, 12, 2))
    parts = list(dict.fromkeys(seen))
    first = next(i for i, part in enumerate(parts) if url.startswith(part))
    assert "".join(parts[first:] + parts[:first]).rstrip() == url
    await display.close()


@LCDS
async def test_charlcd_other_screens_title_first_and_blank_turns_the_light_off(
        columns: int, rows: int, protocol: str) -> None:
    clock = ManualClock(mono=NOW_MONO)
    wire = LoopPorts()
    display = lcd_display(wire, columns, rows, protocol, clock)
    lcd = CharLcd(columns, rows, protocol)
    expired = screen_at(Snapshot(phase=Phase.CODE_EXPIRED, device_name="Kitchen display",
                                 next_code_at=NOW_WALL + 300))
    at = datetime.fromtimestamp(NOW_WALL + 300).strftime("%H:%M")
    await display.start()
    await display.show(code_screen())
    await display.show(expired)
    lcd.feed(wire.read())
    text = [row.rstrip() for row in lcd.text()]
    if rows == 4:
        assert text == ["Code expired", f"Next code at {at}", "", ""]
    else:
        # Too long for the second row: its parts take turns there, without a new
        # show(), as the clock moves on.
        assert text == ["Code expired", "Next code at"]
        await clock.run_until(lambda: lcd.feed(wire.read()).text()[1].rstrip() == at,
                              max_seconds=3)
        await clock.run_until(lambda: (lcd.feed(wire.read()).text()[1].rstrip()
                                       == "Next code at"), max_seconds=3)
    await display.show(BLANK)
    lcd.feed(wire.read())
    assert not lcd.backlight
    assert lcd.text() == [" " * columns] * rows
    await display.show(BLANK)
    assert wire.read() == b""
    await display.show(SIGNED_IN)
    lcd.feed(wire.read())
    assert lcd.backlight
    assert lcd.text()[:2] == ["Signed in".ljust(columns), "as alice".ljust(columns)]
    await display.close()


async def test_charlcd_keeps_the_serlcd_command_byte_out_of_text() -> None:
    wire = LoopPorts()
    display = lcd_display(wire, 16, 2, "serlcd")
    await display.show(screen_at(Snapshot(phase=Phase.SIGNED_IN, device_name="x",
                                          user="a|b\x7cé")))
    lcd = CharLcd(16, 2, "serlcd").feed(wire.read())
    assert lcd.text()[1] == "as a?b??        "
    await display.close()


# -- unplugged and plugged back ----------------------------------------------------------


async def test_unplugged_adapter_is_reported_once_and_redrawn_in_full_when_back(
        tmp_path: Path, ptys: list[Pty], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "agent.display.serial")
    clock = ManualClock(mono=NOW_MONO, wall=NOW_WALL)
    link = tmp_path / "usb-FTDI_FT232R-if00-port0"
    ptys.append(first := Pty(link))
    display = serial_display("terminal", str(link), clock=clock)
    await display.start()
    await display.show(code_screen())
    assert Vt100().feed(first.read()).decode() == [AUTHENTIK]

    first.unplug()
    for elapsed in (1, 2, 3):
        await display.show(code_screen(elapsed=elapsed))  # never raises
    assert not display.connected

    def retried() -> bool:
        return sum("still unavailable" in r.getMessage() for r in caplog.records) >= 3

    await clock.run_until(retried, max_seconds=4 * RETRY_INTERVAL)
    ptys.append(second := Pty(link))

    def back() -> bool:
        # Wait for the display to say the frame is written, not for its bytes: they
        # reach the pty while the worker thread is still returning, and "is back" is
        # logged on the loop only once the write has returned, so a test that stops at
        # the first bytes checks the log (or decodes a frame still arriving) too soon.
        return any("is back" in r.getMessage() for r in caplog.records)

    await clock.run_until(back, max_seconds=2 * RETRY_INTERVAL)
    vt = Vt100().feed(second.read())  # the write has returned: the whole frame is here
    assert vt.decode() == [AUTHENTIK]
    assert "Expires in 0:57" in vt.text()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(link) in warnings[0].getMessage()
    assert "retries every 5 s" in warnings[0].getMessage()
    assert sum("is back" in r.getMessage() for r in caplog.records) == 1
    await display.close()


async def test_a_replugged_adapter_gets_the_unchanged_screen_again(
        tmp_path: Path, ptys: list[Pty]) -> None:
    clock = ManualClock()
    link = tmp_path / "ttyUSB0"
    ptys.append(first := Pty(link))
    display = serial_display("nextion", str(link), clock=clock)
    await display.start()
    await display.show(SIGNED_IN)
    assert "tStatus" in nextion_values(nextion_commands(first.read()))

    # Out and in again between two checks, with nothing new to show: the old
    # descriptor is dead and the path is a new node, which the check notices.
    first.unplug()
    ptys.append(second := Pty(link))
    received = bytearray()

    def redrawn() -> bool:
        received.extend(second.read())
        return b"tStatus" in received

    await clock.run_until(redrawn, max_seconds=2 * RETRY_INTERVAL)
    commands = nextion_commands(bytes(received))
    assert commands[:4] == ["", "sleep=0", "dim=100", "page 0"]
    assert nextion_values(commands)["tStatus"] == "as alice"
    await display.close()


async def test_a_port_missing_at_start_is_drawn_when_it_appears(
        tmp_path: Path, ptys: list[Pty], caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    link = tmp_path / "ttyACM0"
    display = serial_display("charlcd", str(link), clock=clock, columns=20, rows=4)
    await display.start()  # no exception: the agent runs on without its panel
    await display.show(code_screen())
    assert not display.connected
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "No such file" in caplog.records[0].getMessage()

    ptys.append(pty := Pty(link))
    received = bytearray()

    def drawn() -> bool:
        received.extend(pty.read())
        return b"123456789" in received

    await clock.run_until(drawn, max_seconds=2 * RETRY_INTERVAL)
    lcd = CharLcd(20, 4, "serlcd").feed(bytes(received))
    assert lcd.text()[3] == "Code: 123456789     "
    await display.close()
    # Closing voided the code.
    lcd.feed(pty.read())
    assert lcd.text()[0].rstrip() == "Stopped"


async def test_a_port_that_cannot_be_opened_never_breaks_show_or_close(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    display = serial_display("terminal", "/nonexistent/dev/ttyUSB9", clock=clock)
    await display.show(code_screen())  # show without start connects lazily
    for elapsed in range(1, 5):
        clock.advance(RETRY_INTERVAL)
        await display.show(code_screen(elapsed=elapsed))
    await display.close()
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


# -- options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "options", "key", "message"),
    [
        ("terminal", {}, "display.options.port", "required"),
        ("terminal", {"port": 5}, "display.options.port", "got an integer"),
        ("terminal", {"port": "nope://x"}, "display.options.port", "no nope:// handler"),
        ("terminal", {"port": "loop://", "colums": 80}, "display.options.colums",
         "unknown option"),
        ("terminal", {"port": "loop://", "baudrate": "9600"}, "display.options.baudrate",
         "without quotes"),
        ("terminal", {"port": "loop://", "baudrate": True}, "display.options.baudrate",
         "got a boolean"),
        ("terminal", {"port": "loop://", "charset": "latin1"}, "display.options.charset",
         "is not one of"),
        ("terminal", {"port": "loop://", "rows": 3}, "display.options.rows", "from 6"),
        ("terminal", {"port": "loop://", "flow_control": "dtr"},
         "display.options.flow_control", "is not one of"),
        ("nextion", {"port": "loop://", "code_component": 'tCode.txt="x'},
         "display.options.code_component", "component name"),
        ("nextion", {"port": "loop://", "page": "0 x"}, "display.options.page", "page"),
        ("nextion", {"port": "loop://", "encoding": "klingon"}, "display.options.encoding",
         "not a known encoding"),
        ("nextion", {"port": "loop://", "columns": 20}, "display.options.columns",
         "unknown option for a nextion display"),
        ("charlcd", {"port": "loop://", "columns": 40}, "display.options.columns",
         "16 or 20"),
        ("charlcd", {"port": "loop://", "rows": "4"}, "display.options.rows", "2 or 4"),
        ("charlcd", {"port": "loop://", "protocol": "hd44780"}, "display.options.protocol",
         "serlcd"),
    ],
)
def test_bad_options_are_config_errors(kind: str, options: dict[str, Any], key: str,
                                       message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        create_serial_display(DisplayConfig(type=kind, options=options))
    assert caught.value.key == key
    assert message in caught.value.message


@pytest.mark.parametrize(("kind", "baudrate"),
                         [("terminal", 115200), ("nextion", 9600), ("charlcd", 9600)])
async def test_defaults_and_button_options_are_accepted(kind: str, baudrate: int) -> None:
    wire = LoopPorts()
    display: Display = create_serial_display(
        DisplayConfig(type=kind, options={"port": "loop://", "button_pin": 17,
                                          "button_hold": 5, "flow_control": "xonxoff"}),
        opener=wire)
    await display.start()
    assert wire.calls == [{"url": "loop://", "baudrate": baudrate, "flow_control": "xonxoff",
                           "write_timeout": pytest.approx(2.0 + 327_680 / baudrate)}]
    await display.close()


def test_only_serial_types_are_built_here() -> None:
    with pytest.raises(ConfigError) as caught:
        create_serial_display(DisplayConfig(type="console"))
    assert caught.value.key == "display.type"


def test_pyserial_loop_urls_are_real_ports() -> None:
    # The loop:// tests read back what was written to the very same port object.
    port = open_port("loop://", baudrate=9600, flow_control="none", write_timeout=1.0)
    assert isinstance(port, serial.SerialBase)
    port.write(b"abc")
    assert port.in_waiting == 3
    port.close()


class HeldPort:
    """A real loop:// port whose writes wait until the test lets them through, as a
    slow line or a flow-controlled terminal makes them wait."""

    def __init__(self) -> None:
        self.port: SerialPort | None = None
        self.entered = threading.Event()
        self.release = threading.Event()
        self.written: list[bytes] = []
        self.closed_after = -1  # how many writes had finished when it was closed

    def open(self, url: str, **kwargs: Any) -> HeldPort:
        self.port = open_port(url, **kwargs)
        return self

    def write(self, data: bytes, /) -> int | None:
        assert self.port is not None
        self.entered.set()
        assert self.release.wait(5)
        self.written.append(data)
        return self.port.write(data)

    def close(self) -> None:
        assert self.port is not None
        self.closed_after = len(self.written)
        self.port.close()

    @property
    def in_waiting(self) -> int:
        assert self.port is not None
        return self.port.in_waiting


async def test_a_write_cut_short_by_cancellation_is_not_interleaved_with_the_next() -> None:
    held = HeldPort()
    display = serial_display("nextion", "loop://", opener=held.open)
    showing = asyncio.ensure_future(display.show(code_screen()))
    assert await asyncio.to_thread(held.entered.wait, 5)
    showing.cancel()  # the agent shuts down mid-frame; the thread still writes
    closing = asyncio.ensure_future(display.close())
    await asyncio.sleep(0.02)
    assert not closing.done()  # waits for the frame before voiding the code
    held.release.set()
    await closing
    assert showing.cancelled()
    frame, void = held.written
    assert b'tCode.txt="123456789"' in frame
    assert nextion_values(nextion_commands(void))["tStatus"] == "This code is no longer valid"
    assert held.closed_after == 2


async def test_frames_arrive_whole_and_in_order_after_a_cancelled_show() -> None:
    held = HeldPort()
    display = serial_display("nextion", "loop://", opener=held.open)
    showing = asyncio.ensure_future(display.show(code_screen()))
    assert await asyncio.to_thread(held.entered.wait, 5)
    showing.cancel()
    second = asyncio.ensure_future(display.show(SIGNED_IN))
    await asyncio.sleep(0.02)
    assert not second.done()
    held.release.set()
    await second
    port: Any = held.port
    commands = nextion_commands(bytes(port.read(port.in_waiting)))
    assert commands[:4] == ["", "sleep=0", "dim=100", "page 0"]
    assert commands.index('tCode.txt="123456789"') < commands.index('tCode.txt=""')
    assert nextion_values(commands)["tTitle"] == "Signed in"
    await display.close()
