"""Screens as pixels: a `Screen` laid out for one panel's geometry and colour mode.

Pure: no I/O, no clock. The same screen on the same geometry gives the same pixels, so
frames can be compared to skip redraws and pictures in the docs match the panels.
Rotation is the panel driver's job (luma's ``rotate=``): the layout is asked for the
panel's logical width and height and simply sees a portrait or landscape canvas.

The code screen, most important first:

1. The QR code of ``screen.qr_data``, drawn dark on light (a light box on the OLED's
   dark ground: scanners look for dark modules on a light field) with the **largest
   integer module size** that fits beside a legible code (capped at `MAX_MODULE`
   pixels, which only a framebuffer reaches). Around it a light quiet zone of 4
   modules, as the standard asks; where 4 do not fit at that module size, 3, then 2 at
   least. zxing decodes these frames with a single module of quiet zone, even on a
   dark panel, and not with none (tests/test_layout.py checks both); 2 leaves a margin
   for phone cameras, which are less forgiving than a decoder fed clean pixels. At the
   chosen module size the error-correction level is the highest that fits
   (``qr_matrix(max_modules=...)``), unless a lower one leaves room for the URL whole,
   a larger quiet zone or a larger code.
2. The user code, as large as it goes (beside a QR code at least `CODE_MIN` and a
   sixth of the panel's short side), its characters as issued in the groups of
   ``screens.code_groups``, drawn apart with no character between them; in a narrow
   column the groups are stacked, one per line. It is never cut or ellipsized. In a
   code of letters and digits the zeros are slashed.
3. The short URL: the font shrinks first, then the URL wraps at its punctuation (up to
   3 lines), then, on panels of 128x64 and up, it gets a page of its own (`Frame.pages`);
   only as a last resort is it ellipsized (the QR code still carries it
   whole).
4. The device name when there is room, and the countdown bar from ``screen.progress``.

The text goes beside the QR code, under it, or both (the code in large type along the
bottom of a 128x64 panel, say); each arrangement is tried and the best kept.
When no QR code fits beside a legible code (128x32 and smaller, or data too long for
any QR code), the screen shows the URL and the code only, and `Frame.qr_omitted` says
why, so the caller can log it once. Module sizes below 1 pixel are never used.

Text is set in Pillow's built-in scalable font (Aileron, Pillow >= 10.1 built with
FreeType), which ships inside every Pillow wheel, and below 11 pixels in X11's
misc-fixed bitmap fonts (shipped in agent/data/fonts), so pictures look the same on
every machine; without FreeType, Pillow's small bitmap font is used at a single size.
Glyphs are placed one by one with a blank column between neighbours, and text is
measured alike for every colour mode, so panels of one size but different colour
share one layout (tests/test_legibility.py reads the text back with OCR).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeAlias

from agent.display.screens import Screen

if TYPE_CHECKING:
    from PIL import Image, ImageDraw, ImageFont

    from agent.display.qr import QrMatrix

    Font: TypeAlias = ImageFont.FreeTypeFont | ImageFont.ImageFont

__all__ = ["MODES", "Frame", "QrPlacement", "compose", "render"]

MODES: Final = ("1", "L", "RGB")

Colour: TypeAlias = int | tuple[int, int, int]

# Quiet zone in modules, preferred first. See the module docstring for the floor of 2.
QUIET_ZONES: Final = (4, 3, 2)
# Beyond this a bigger module scans no better, and only takes room from the text: it
# matters on framebuffers (an 800x480 HDMI screen), never on an OLED.
MAX_MODULE: Final = 8
# The smallest font sizes (pixels per em) read from arm's length on a 0.96" panel.
# Aileron's digits are about 0.72 em tall: a size-12 code is 9 px high; sizes 9 and 10
# are the 5x8 and 6x10 bitmap strikes.
CODE_MIN: Final = 12
TEXT_MIN: Final = 9
# Below CODE_MIN only when no QR code is drawn and the code would not fit otherwise:
# a small code beats a missing one.
CODE_LAST_RESORT: Final = tuple(range(CODE_MIN - 1, 5, -1))
URL_MAX_LINES: Final = 3
# Without a QR code beside it (a URL page, a panel too small for one) the URL has the
# screen to itself and may wrap further, so a long host on a narrow portrait panel is
# still read whole.
URL_ALONE_MAX_LINES: Final = 10
# An ellipsized URL must still show this much of itself, or it is not worth a line.
URL_MIN_VISIBLE: Final = 10
ELLIPSIS: Final = "..."
NAME_MIN_VISIBLE: Final = 6

_LEVEL_RANK: Final = {"L": 0, "M": 1, "Q": 2, "H": 3}
# Sample strings for a font's full line box (ascenders and descenders).
_LINE_SAMPLE: Final = "Hgjpqy|/()"


@dataclass(frozen=True, kw_only=True)
class QrPlacement:
    """Where the QR code went. `box` is the light square, quiet zone included, as
    (left, top, right, bottom) with right and bottom exclusive."""

    version: int
    error_correction: str
    module_size: int
    quiet_zone: int
    box: tuple[int, int, int, int]


@dataclass(frozen=True, kw_only=True)
class Frame:
    """A rendered screen and what the caller may want to log about it.

    `qr_omitted` is set on a code screen that has QR data but no room for it: the
    frame then shows the URL and code as text only. `url_shortened` is True when the
    URL had to be ellipsized to fit. `text` holds the lines of text drawn, block by
    block (a stacked code is one line per group).
    """

    image: Image.Image
    qr: QrPlacement | None = None
    qr_omitted: str | None = None
    url_shortened: bool = False
    text: tuple[str, ...] = ()
    # Where each line of `text` was drawn: its ink's box (left, top, right, bottom),
    # right and bottom exclusive.
    boxes: tuple[tuple[int, int, int, int], ...] = ()
    # A code screen whose URL fits whole only without the QR code shows two pages in
    # turn (`Screen.page`): the QR code and the code, then the URL and the code.
    page: int = 0
    pages: int = 1
    # A code screen with a device name that found no room for it: said once by the
    # panel, so a name left out is never left out silently.
    name_omitted: bool = False


def render(screen: Screen, *, width: int, height: int, mode: str) -> Image.Image:
    """The screen as a `width` x `height` image in PIL `mode` ("1", "L" or "RGB")."""
    return compose(screen, width=width, height=height, mode=mode).image


def compose(screen: Screen, *, width: int, height: int, mode: str) -> Frame:
    """Like `render`, with what was decided about the QR code and the URL.

    Everything but the countdown bar is laid out and drawn once per distinct screen
    and geometry, and cached: a countdown tick copies that picture and draws a bar.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if width < 1 or height < 1:
        raise ValueError(f"a panel needs at least 1x1 pixels, got {width}x{height}")
    # The layout depends on whether there is a bar, not on its length.
    static = replace(screen, seconds_left=None,
                     progress=None if screen.progress is None else 1.0, page=0)
    base, plan = _base(static, width, height, mode)
    page, pages = 0, 1
    if (static.kind == "code" and static.qr_data and plan.url_shortened
            and width * height >= PAGED_MIN_PIXELS):
        url_page = replace(static, qr_data=None)
        url_base, url_plan = _base(url_page, width, height, mode)
        if not url_plan.url_shortened:
            pages = 2
            page = screen.page % pages
            if page == 1:
                base, plan = url_base, url_plan
    image = base.copy()
    if plan.bar is not None and screen.progress is not None:
        from PIL import ImageDraw

        _draw_bar(ImageDraw.Draw(image), plan.bar, screen.progress, _palette(mode))
    return Frame(image=image, qr=plan.qr, qr_omitted=plan.qr_omitted,
                 url_shortened=plan.url_shortened,
                 text=tuple(line for placed in plan.blocks for line in placed.block.lines),
                 boxes=plan.boxes,
                 page=page, pages=pages,
                 name_omitted=(static.kind == "code" and bool(static.device_name)
                               and not any(p.block.kind == "name" for p in plan.blocks)))


# Panels of 128x64 and larger, portrait or landscape, page a URL that does not fit
# beside the QR code; on smaller ones the QR code is left out already.
PAGED_MIN_PIXELS = 96 * 64


# -- colours -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Palette:
    ground: Colour
    ink: Colour
    dim: Colour        # secondary text: the device name
    light: Colour      # QR light modules and quiet zone
    dark: Colour       # QR dark modules
    track: Colour | None  # the empty part of the countdown bar
    accents: dict[str, Colour]  # title colour by screen kind (colour panels only)

    def bar(self, progress: float) -> Colour:
        if "bar_low" not in self.accents:
            return self.ink
        # Colour panels warn as the code runs out, like a traffic light.
        if progress > 0.5:
            return self.accents["bar_high"]
        return self.accents["bar_mid"] if progress > 0.2 else self.accents["bar_low"]


@functools.cache
def _palette(mode: str) -> _Palette:
    if mode == "1":
        # No grey on a monochrome panel: the empty part of the bar is left dark, and
        # the bar keeps a 1-pixel baseline so its full length can still be seen.
        return _Palette(ground=0, ink=1, dim=1, light=1, dark=0, track=None, accents={})
    if mode == "L":
        return _Palette(ground=0, ink=255, dim=170, light=255, dark=0, track=60, accents={})
    green, amber, red = (60, 220, 90), (255, 180, 0), (240, 60, 50)
    return _Palette(
        ground=(0, 0, 0), ink=(255, 255, 255), dim=(170, 170, 170), light=(255, 255, 255),
        dark=(0, 0, 0), track=(60, 60, 60),
        accents={"signed_in": green, "denied": red, "config_error": red, "fatal": red,
                 "no_network": amber, "refresh_failing": amber, "throttled": amber,
                 "clock_not_set": amber,
                 "code_expired": amber, "bar_high": green, "bar_mid": amber, "bar_low": red})


# -- fonts and measuring ---------------------------------------------------------------


# Below this size Pillow's Aileron, hinted to 1 bit, runs glyphs together or blurs
# them ('a' like '8'), and moved apart it no longer fits a 128-pixel line: text that
# small is set in bitmap fonts drawn for those pixel sizes (X11's misc-fixed, public
# domain; agent/data/fonts/README), where every glyph keeps a blank column already.
_STRIKES: Final = {8: "5x8", 9: "5x8", 10: "6x10"}
_FONTS: Final = Path(__file__).resolve().parent.parent / "data" / "fonts"


@functools.cache
def _font(size: int) -> Font:
    from PIL import ImageFont

    if size in _STRIKES:
        strike = _STRIKES[size]
        with contextlib.suppress(OSError):  # a FreeType built without PCF support
            return ImageFont.truetype(str(_FONTS / f"{strike}.pcf.gz"),
                                      int(strike.split("x")[1]))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no scalable built-in font
        return ImageFont.load_default()


@functools.cache
def _scalable() -> bool:
    from PIL import ImageFont

    return isinstance(_font(CODE_MIN), ImageFont.FreeTypeFont)


def _clean(text: str) -> str:
    # Names and errors come from the network: control characters would draw as boxes
    # or nothing, and the bitmap fallback font knows Latin-1 only.
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text)
    if not _scalable():
        cleaned = cleaned.encode("latin-1", "replace").decode("latin-1")
    return cleaned


@dataclass(frozen=True)
class _Glyph:
    # Ink, from the draw origin; empty (left == right) for a space.
    left: int
    top: int
    right: int
    bottom: int


class _Type:
    """Measures and places text the same way for every colour mode, so a 128x128 mono
    panel and a colour one choose the same layout.

    Characters are placed one by one: FreeType hints small sizes so that neighbours
    touch ("12:05" ran together on 128x32), so a glyph is moved right until a blank
    column parts its ink from the last glyph's. A glyph's ink is measured as both 1-bit
    and anti-aliased output draw it (hinting differs, and 1-bit is usually wider), and
    the union is used, so the blank column holds in every mode."""

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one instance, kept for the process
    def glyph(self, ch: str, size: int) -> _Glyph:
        font = _font(size)
        boxes = []
        for mode in _MEASURE_MODES:
            # The glyph's box is its cell in a bitmap font: the ink is read from the
            # mask drawn in that box.
            left, top, _, _ = font.getbbox(ch, mode=mode)
            ink = font.getmask(ch, mode=mode).getbbox()
            if ink is not None:
                boxes.append((left + ink[0], top + ink[1], left + ink[2], top + ink[3]))
        if not boxes:  # a space
            return _Glyph(left=0, top=0, right=0, bottom=0)
        left, top, right, bottom = _union(boxes)
        return _Glyph(left=int(left), top=int(top), right=int(right), bottom=int(bottom))

    @functools.lru_cache(maxsize=8192)  # noqa: B019
    def offsets(self, text: str, size: int) -> tuple[int, ...]:
        """Where each character of `text` is drawn from, left to right: where the font
        puts it (kerning included), moved right as far as the glyphs before it were."""
        font = _font(size)
        offsets: list[int] = []
        pushed = 0
        ink_right: int | None = None  # right edge of the last ink, exclusive
        blank = 1  # columns the next ink keeps from the last
        for index, ch in enumerate(text):
            x = pushed + round(max(font.getlength(text[:index], mode=mode)
                                   for mode in _MEASURE_MODES))
            glyph = self.glyph(ch, size)
            if glyph.right > glyph.left:
                if ink_right is not None and x + glyph.left < ink_right + blank:
                    pushed += ink_right + blank - glyph.left - x
                    x = ink_right + blank - glyph.left
                ink_right = x + glyph.right
                blank = 1
            elif ch.isspace():
                # Letters moved apart need words moved further apart, or the line
                # reads as one word.
                blank = max(blank, _word_gap(size))
            offsets.append(x)
        return tuple(offsets)

    @functools.lru_cache(maxsize=8192)  # noqa: B019
    def bbox(self, text: str, size: int) -> tuple[int, int, int, int]:
        inked = [(offset, self.glyph(ch, size))
                 for ch, offset in zip(text, self.offsets(text, size), strict=True)]
        inked = [(offset, glyph) for offset, glyph in inked if glyph.right > glyph.left]
        if not inked:
            return 0, 0, 0, 0
        return (min(offset + g.left for offset, g in inked), min(g.top for _, g in inked),
                max(offset + g.right for offset, g in inked),
                max(g.bottom for _, g in inked))

    def width(self, text: str, size: int) -> int:
        left, _, right, _ = self.bbox(text, size)
        return right - left

    def line_box(self, size: int) -> tuple[int, int]:
        """Top and bottom of a line of any text at `size`, from the draw origin."""
        _, top, _, bottom = self.bbox(_LINE_SAMPLE, size)
        return top, bottom


_TYPE: Final = _Type()
# FreeType hints 1-bit output differently from anti-aliased output (1-bit is usually
# wider): text is measured both ways and the larger taken, so it fits in every mode.
_MEASURE_MODES: Final = ("1", "L")


def _union(boxes: list[tuple[float, float, float, float]]) -> tuple[float, ...]:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes))


def _word_gap(size: int) -> int:
    return max(4, round(size * 0.4))


# -- text blocks -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    """Lines of one kind of text at one size. `tight` blocks are measured by their own
    ink (a code of digits needs no room for descenders); others by the font's line box,
    so wrapped lines are evenly spaced."""

    kind: str
    lines: tuple[str, ...]
    size: int
    tight: bool
    width: int
    height: int


def _line_gap(size: int) -> int:
    return max(1, size // 8)


def _block(ts: _Type, kind: str, lines: tuple[str, ...], size: int, *, tight: bool) -> _Block:
    if tight:
        heights = [ts.bbox(line, size)[3] - ts.bbox(line, size)[1] for line in lines]
    else:
        top, bottom = ts.line_box(size)
        heights = [bottom - top] * len(lines)
    height = sum(heights) + _line_gap(size) * (len(lines) - 1)
    width = max(ts.width(line, size) for line in lines)
    return _Block(kind=kind, lines=lines, size=size, tight=tight, width=width, height=height)


# Blocks are cached: the layout search asks for the same text at the same size and
# width many times over while it tries templates and QR sizes.
@functools.lru_cache(maxsize=4096)
def _code_block(ts: _Type, code: str, size: int, width: int) -> _Block | None:
    if ts.width(code, size) <= width:
        return _block(ts, "code", (code,), size, tight=True)
    groups = _code_groups(code)
    if len(groups) > 1 and all(ts.width(group, size) <= width for group in groups):
        return _block(ts, "code", groups, size, tight=True)
    if len(groups) == 1 and len(code) > 4:
        # A long code of no known shape (20 characters, say) on a narrow panel: cut in
        # even pieces, stacked, rather than left out. Nothing is added to it.
        for pieces in range(2, len(code) // 3 + 1):
            step = -(-len(code) // pieces)
            chunks = tuple(code[i:i + step] for i in range(0, len(code), step))
            if all(ts.width(chunk, size) <= width for chunk in chunks):
                return _block(ts, "code", chunks, size, tight=True)
    return None


def _code_groups(code: str) -> tuple[str, ...]:
    # The groups of `screens.code_groups`, joined by the gap they are drawn with.
    return tuple(group for group in code.split(" ") if group)


def _url_pieces(url: str) -> list[str]:
    """The URL cut where a line may break: after . - _ & = and before / ? #, so each
    line ends or starts with punctuation that says the URL goes on."""
    pieces: list[str] = []
    current = ""
    for ch in url:
        if ch in "/?#" and current:
            pieces.append(current)
            current = ""
        current += ch
        if ch in ".-_&=":
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return pieces


def _pack(ts: _Type, pieces: list[str], size: int, width: int, joiner: str, *,
          break_pieces: bool = True) -> list[str] | None:
    """Greedy line filling. A piece wider than a line is broken between characters,
    or, without `break_pieces`, makes the text not fit (None)."""
    lines: list[str] = []
    current = ""
    for piece in pieces:
        candidate = current + joiner + piece if current else piece
        if ts.width(candidate, size) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
            current = ""
        while ts.width(piece, size) > width:
            if not break_pieces:
                return None
            cut = _longest_prefix(ts, piece, size, width)
            if cut == 0:
                return None  # not even one character fits
            lines.append(piece[:cut])
            piece = piece[cut:]
        current = piece
    if current:
        lines.append(current)
    return lines


def _longest_prefix(ts: _Type, text: str, size: int, width: int, suffix: str = "") -> int:
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if ts.width(text[:mid] + suffix, size) <= width:
            low = mid
        else:
            high = mid - 1
    return low


@functools.lru_cache(maxsize=4096)
def _url_block(ts: _Type, url: str, size: int, width: int, *,
               allow_ellipsis: bool, max_lines: int = URL_MAX_LINES) -> _Block | None:
    """The URL wrapped on up to URL_MAX_LINES lines; or, with `allow_ellipsis`, on one
    line, cut short with an ellipsis if it must be."""
    lines = _pack(ts, _url_pieces(url), size, width, "")
    if lines is not None and (len(lines) == 1 or (not allow_ellipsis
                                                  and len(lines) <= max_lines)):
        return _block(ts, "url", tuple(lines), size, tight=False)
    if not allow_ellipsis:
        return None
    keep = _longest_prefix(ts, url, size, width, ELLIPSIS)
    if keep < min(URL_MIN_VISIBLE, len(url)):
        return None
    return _block(ts, "url_cut", (url[:keep] + ELLIPSIS,), size, tight=False)


@functools.lru_cache(maxsize=4096)
def _name_block(ts: _Type, name: str, size: int, width: int) -> _Block | None:
    if ts.width(name, size) <= width:
        return _block(ts, "name", (name,), size, tight=False)
    keep = _longest_prefix(ts, name, size, width, ELLIPSIS)
    if keep < NAME_MIN_VISIBLE:
        return None
    return _block(ts, "name", (name[:keep].rstrip() + ELLIPSIS,), size, tight=False)


def _wrapped_block(ts: _Type, kind: str, text: str, size: int, width: int,
                   max_lines: int | None = None, *, break_words: bool = False) -> _Block | None:
    lines = _pack(ts, text.split(), size, width, " ", break_pieces=break_words)
    if not lines or (max_lines is not None and len(lines) > max_lines):
        return None
    return _block(ts, kind, tuple(lines), size, tight=False)


# -- regions and plans -------------------------------------------------------------------


@dataclass(frozen=True)
class _Rect:
    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class _Placed:
    block: _Block
    x: int  # the block's left edge; lines are centred on its region
    y: int
    w: int


@dataclass(frozen=True)
class _Plan:
    blocks: tuple[_Placed, ...] = ()
    # Where each line of the blocks was drawn (Frame.boxes): set by `_base`, which
    # draws them, so a countdown tick does not place them again.
    boxes: tuple[tuple[int, int, int, int], ...] = ()
    bar: _Rect | None = None
    qr: QrPlacement | None = None
    matrix: QrMatrix | None = None
    qr_omitted: str | None = None
    url_shortened: bool = False


def _gap(height: int) -> int:
    return 2 if height >= 48 else 1


def _bar_height(height: int) -> int:
    return 3 if height >= 48 else 2


def _stack(region: _Rect, blocks: list[_Block], gap: int, bar: bool,
           bar_height: int) -> tuple[list[_Placed], _Rect | None]:
    """Blocks top to bottom in `region`, the bar (if any) along its bottom edge, and
    the spare height shared out evenly between and around the blocks."""
    bar_rect = None
    height = region.h
    if bar:
        bar_rect = _Rect(region.x, region.y + region.h - bar_height, region.w, bar_height)
        height -= bar_height + gap
    used = sum(b.height for b in blocks) + gap * max(0, len(blocks) - 1)
    spare = max(0, height - used)
    step = spare // (len(blocks) + 1) if blocks else 0
    y = region.y + step
    placed = []
    for block in blocks:
        placed.append(_Placed(block=block, x=region.x, y=y, w=region.w))
        y += block.height + gap + step
    return placed, bar_rect


def _fits(region: _Rect, blocks: list[_Block], gap: int, bar: bool, bar_height: int) -> bool:
    used = sum(b.height for b in blocks) + gap * max(0, len(blocks) - 1)
    if bar:
        used += bar_height + (gap if blocks else 0)
    return used <= region.h and all(b.width <= region.w for b in blocks)


@dataclass(frozen=True)
class _Content:
    code: str
    url: str
    name: str
    bar: bool
    url_lines: int = URL_MAX_LINES


@dataclass(frozen=True)
class _TextFit:
    placed: tuple[_Placed, ...]
    bar: _Rect | None
    code_size: int
    url_size: int
    url_whole: bool
    name_shown: bool


# A template: regions, each with the kinds of blocks it holds, top to bottom.
_Slots = tuple[tuple[_Rect, tuple[str, ...]], ...]


def _code_sizes(width: int, height: int) -> tuple[int, ...]:
    """Code sizes to try, largest first: up to 64, or a fifth of a big screen."""
    return tuple(range(max(64, min(width, height) // 5), CODE_MIN - 1, -1))


def _url_sizes(width: int, height: int) -> tuple[int, ...]:
    """Sizes for the URL and the device name, largest first, down to TEXT_MIN."""
    return tuple(range(max(16, min(width, height) // 12), TEXT_MIN - 1, -1))


def _fit_text(ts: _Type, slots: _Slots, content: _Content, *, gap: int, bar_height: int,
              code_sizes: tuple[int, ...], url_sizes: tuple[int, ...]) -> _TextFit | None:
    """The largest code that fits with the URL (whole if at all possible), then the
    largest URL beside that code, then the device name if there is room."""

    def attempt(code_size: int, url_size: int, allow_ellipsis: bool,
                name_size: int | None, place: bool = False) -> _TextFit | None:
        """The fit at these sizes, or None; blocks are positioned only with `place`
        (the search itself needs to know only whether they fit)."""
        placed: list[_Placed] = []
        bar_rect: _Rect | None = None
        url_whole = True
        for region, kinds in slots:
            blocks: list[_Block] = []
            for kind in kinds:
                block: _Block | None
                if kind == "code":
                    if not content.code:
                        continue
                    block = _code_block(ts, content.code, code_size, region.w)
                elif kind == "url":
                    if not content.url:
                        continue
                    block = _url_block(ts, content.url, url_size, region.w,
                                       allow_ellipsis=allow_ellipsis,
                                       max_lines=content.url_lines)
                    if block is not None and block.kind == "url_cut":
                        url_whole = False
                elif kind == "name":
                    if name_size is None or not content.name:
                        continue
                    block = _name_block(ts, content.name, name_size, region.w)
                else:
                    continue  # "bar" is handled below
                if block is None:
                    return None
                blocks.append(block)
            has_bar = content.bar and "bar" in kinds
            if not _fits(region, blocks, gap, has_bar, bar_height):
                return None
            if place:
                region_placed, region_bar = _stack(region, blocks, gap, has_bar, bar_height)
                placed.extend(region_placed)
                bar_rect = region_bar or bar_rect
        return _TextFit(placed=tuple(placed), bar=bar_rect, code_size=code_size,
                        url_size=url_size, url_whole=url_whole,
                        name_shown=name_size is not None and bool(content.name))

    def grow(allow_ellipsis: bool) -> _TextFit | None:
        largest_code = _largest(code_sizes, lambda size: attempt(
            size, url_sizes[-1], allow_ellipsis, None) is not None)
        if largest_code is None:
            return None
        return beside(largest_code, allow_ellipsis)

    def beside(code: int, allow_ellipsis: bool) -> _TextFit | None:
        """The largest URL beside a code of size `code`, then the name if it fits."""
        url = _largest(url_sizes, lambda size: attempt(
            code, size, allow_ellipsis, None) is not None) or url_sizes[-1]
        names = tuple(size for size in url_sizes if size <= url)

        def name_beside(code: int) -> int | None:
            return _largest(names, lambda size: attempt(
                code, url, allow_ellipsis, size) is not None)

        name = name_beside(code)
        if name is None and content.name:
            # Saying which device this is, is worth a slightly smaller code.
            for smaller in (size for size in code_sizes if code * 4 // 5 <= size < code):
                name = name_beside(smaller)
                if name is not None:
                    code = smaller
                    break
        return attempt(code, url, allow_ellipsis, name, place=True)

    return grow(False) or grow(True)


def _largest(sizes: tuple[int, ...], ok: Callable[[int], bool]) -> int | None:
    """The first of `sizes` (largest first) for which `ok` holds, by bisection: a
    smaller size fits wherever a larger one does."""
    if not sizes or not ok(sizes[-1]):
        return None
    low, high = 0, len(sizes) - 1  # sizes[high] is known to fit
    while low < high:
        mid = (low + high) // 2
        if ok(sizes[mid]):
            high = mid
        else:
            low = mid + 1
    return sizes[low]


# -- the code screen -------------------------------------------------------------------


@dataclass(frozen=True)
class _QrOption:
    size: int
    level: str


@functools.lru_cache(maxsize=16)
def _qr_options(data: str) -> tuple[_QrOption, ...]:
    """Each symbol size worth trying, smallest first, with the best level at that size.

    Only sizes are worked out here, which is cheap; the symbol itself is encoded once,
    for the size chosen, because scoring its masks is the slow part on a Pi.
    """
    from agent.display.qr import _fitting_version

    sizes = {}
    for level in _LEVEL_RANK:
        try:
            version = _fitting_version(data, level)
        except ValueError:  # qrcode's own "version 41" when the data is just too long
            version = None
        if version is not None:
            sizes[level] = 4 * version + 17
    options = []
    for level, size in sizes.items():
        # A level is worth its size only if no stronger level is as small.
        if not any(_LEVEL_RANK[other] > _LEVEL_RANK[level] and other_size <= size
                   for other, other_size in sizes.items()):
            options.append(_QrOption(size=size, level=level))
    return tuple(sorted(options, key=lambda option: option.size))


@dataclass(frozen=True)
class _Candidate:
    score: tuple[int, ...]
    fit: _TextFit
    box: tuple[int, int, int, int]
    option: _QrOption
    scale: int
    quiet: int


def _code_templates(width: int, height: int, side: int, gap: int,
                    ) -> Iterator[tuple[int, tuple[int, int], _Slots]]:
    """(preference, top-left of the QR box, text slots) for a QR box of `side` px."""
    beside = _Rect(side + gap, 0, width - side - gap, height)
    if beside.w > 0 and side <= height:
        top = (height - side) // 2
        yield 0, (0, top), ((beside, ("name", "url", "code", "bar")),)
        under_h = height - side - gap
        if under_h > 0:
            column = _Rect(side + gap, 0, width - side - gap, side)
            under = _Rect(0, side + gap, width, under_h)
            yield 1, (0, 0), ((column, ("name", "url")), (under, ("code", "bar")))
            yield 2, (0, 0), ((column, ("name", "code")), (under, ("url", "bar")))
    below_h = height - side - gap
    if below_h > 0 and side <= width:
        below = _Rect(0, side + gap, width, below_h)
        yield 3, ((width - side) // 2, 0), ((below, ("code", "url", "name", "bar")),)


def _plan_code(ts: _Type, screen: Screen, width: int, height: int) -> _Plan:
    content = _Content(
        code=_clean(" ".join(screen.user_code_groups) or screen.user_code or ""),
        url=_clean(screen.url or ""),
        name=_clean(screen.device_name or ""),
        bar=screen.progress is not None)
    gap, bar_height = _gap(height), _bar_height(height)
    omitted: str | None = None
    if screen.qr_data:
        options = _qr_options(screen.qr_data)
        if not options:
            omitted = "the URL is too long for any QR code"
        else:
            chosen = _best_qr_layout(ts, options, content, width, height, gap, bar_height)
            if chosen is not None:
                return _qr_plan(screen.qr_data, chosen)
            if content.url and width * height >= PAGED_MIN_PIXELS:
                # Not even a shortened URL fits beside the QR code (a narrow portrait
                # panel): the URL gets a page of its own (`compose`), and this page
                # keeps the QR code and the code.
                chosen = _best_qr_layout(ts, options, replace(content, url=""), width,
                                         height, gap, bar_height)
                if chosen is not None:
                    return replace(_qr_plan(screen.qr_data, chosen), url_shortened=True)
            need = options[0].size + 2 * QUIET_ZONES[-1]
            omitted = (f"no room for a QR code beside a legible code on {width}x{height} "
                       f"(it needs {need}x{need} px at 1 px a module)")
    slots: _Slots = ((_Rect(0, 0, width, height), ("name", "url", "code", "bar")),)
    code_sizes, url_sizes = _code_sizes(width, height), _url_sizes(width, height)
    content = replace(content, url_lines=URL_ALONE_MAX_LINES)
    # Without a QR code the URL is the only way in: shown whole with a smaller code
    # rather than cut beside a larger one.
    fit = (_fit_text(ts, slots, content, gap=gap, bar_height=bar_height,
                     code_sizes=code_sizes + CODE_LAST_RESORT, url_sizes=url_sizes)
           or _fit_text(ts, slots, replace(content, url=""), gap=gap, bar_height=bar_height,
                        code_sizes=code_sizes + CODE_LAST_RESORT, url_sizes=url_sizes))
    if fit is None:
        return _Plan(qr_omitted=omitted, url_shortened=bool(content.url))
    url_shown = any(placed.block.kind.startswith("url") for placed in fit.placed)
    return _Plan(blocks=fit.placed, bar=fit.bar, qr_omitted=omitted,
                 url_shortened=bool(content.url) and not (url_shown and fit.url_whole))


def _best_qr_layout(ts: _Type, options: tuple[_QrOption, ...], content: _Content, width: int,
                    height: int, gap: int, bar_height: int) -> _Candidate | None:
    """The largest module size at which some template fits the code beside the QR
    code; at that size, the best of quiet zone, URL, code size and error correction."""
    smallest = options[0].size + 2 * QUIET_ZONES[-1]
    # Beside a QR code the code must still read as the headline: at least a sixth of
    # the panel's short side (and CODE_MIN), or the QR code takes a smaller module.
    code_min = max(CODE_MIN, min(width, height) // 6)
    code_sizes = tuple(size for size in _code_sizes(width, height) if size >= code_min)
    url_sizes = _url_sizes(width, height)
    for scale in range(min(MAX_MODULE, min(width, height) // smallest), 0, -1):
        candidates: list[_Candidate] = []
        for option in options:
            for quiet in QUIET_ZONES:
                side = (option.size + 2 * quiet) * scale
                found = False
                for preference, origin, slots in _code_templates(width, height, side, gap):
                    fit = _fit_text(ts, slots, content, gap=gap, bar_height=bar_height,
                                    code_sizes=code_sizes, url_sizes=url_sizes)
                    if fit is None:
                        continue
                    found = True
                    # The code's size as drawn: font sizes a pixel apart can draw
                    # digits of one height, and then the stronger level should win.
                    _, top, _, bottom = ts.bbox(content.code, fit.code_size)
                    score = (int(fit.url_whole), quiet, bottom - top,
                             _LEVEL_RANK[option.level], fit.url_size, int(fit.name_shown),
                             -preference)
                    candidates.append(_Candidate(
                        score=score, fit=fit, option=option, scale=scale, quiet=quiet,
                        box=(origin[0], origin[1], origin[0] + side, origin[1] + side)))
                if found:
                    break  # a smaller quiet zone at this size only scores lower
        if candidates:
            return max(candidates, key=lambda candidate: candidate.score)
    return None


def _qr_plan(data: str, chosen: _Candidate) -> _Plan:
    from agent.display.qr import qr_matrix

    matrix = qr_matrix(data, max_modules=chosen.option.size)
    placement = QrPlacement(version=matrix.version, error_correction=matrix.error_correction,
                            module_size=chosen.scale, quiet_zone=chosen.quiet, box=chosen.box)
    return _Plan(blocks=chosen.fit.placed, bar=chosen.fit.bar, qr=placement, matrix=matrix,
                 url_shortened=not chosen.fit.url_whole)


# -- other screens -----------------------------------------------------------------------


def _plan_text(ts: _Type, screen: Screen, width: int, height: int) -> _Plan:
    """Title, then the lines, then the device name (dimmed) if there is room: at the
    largest size where every word fits whole."""
    gap = _gap(height)
    region = _Rect(0, 0, width, height)
    title = _clean(screen.title)
    lines = [_clean(line) for line in screen.lines if line.strip()]
    name = _clean(screen.device_name or "")
    body_max = max(TEXT_MIN, min(height // 5, width // 10, 64))
    for body in range(body_max, TEXT_MIN - 1, -1):
        blocks = _text_blocks(ts, title, lines, body, width)
        if blocks is None or not _fits(region, blocks, gap, False, 0):
            continue
        name_block = _name_block(ts, name, min(body, 12), width) if name else None
        if name_block is not None and _fits(region, [*blocks, name_block], gap, False, 0):
            blocks.append(name_block)
        placed, _ = _stack(region, blocks, gap, False, 0)
        return _Plan(blocks=tuple(placed))
    return _plan_text_overflow(ts, title, lines, region, gap)


def _plan_text_overflow(ts: _Type, title: str, lines: list[str], region: _Rect,
                        gap: int) -> _Plan:
    # More text than the panel holds even at the smallest size (a long error from the
    # provider, a tiny panel): the title, then lines until the panel is full, the last
    # one cut short with an ellipsis.
    size = TEXT_MIN
    blocks: list[_Block] = []
    title_block = _heading(ts, title, size, region.w) or _wrapped_block(
        ts, "title", title, size, region.w, 2, break_words=True)
    if title_block is not None and _fits(region, [title_block], gap, False, 0):
        blocks.append(title_block)
    for line in lines:
        block = _wrapped_block(ts, "body", line, size, region.w, break_words=True)
        if block is None:
            break
        if _fits(region, [*blocks, block], gap, False, 0):
            blocks.append(block)
            continue
        top, bottom = ts.line_box(size)
        used = sum(b.height for b in blocks) + gap * len(blocks)
        room = (region.h - used + _line_gap(size)) // (bottom - top + _line_gap(size))
        if room > 0:
            kept = list(block.lines[:room])
            cut = _longest_prefix(ts, kept[-1], size, region.w, ELLIPSIS)
            kept[-1] = kept[-1][:cut].rstrip() + ELLIPSIS
            blocks.append(_block(ts, "body", tuple(kept), size, tight=False))
        break
    placed, _ = _stack(region, blocks, gap, False, 0)
    return _Plan(blocks=tuple(placed))


def _text_blocks(ts: _Type, title: str, lines: list[str], body: int,
                 width: int) -> list[_Block] | None:
    title_block = _heading(ts, title, body, width)
    if title_block is None:
        return None
    blocks = [title_block]
    for line in lines:
        block = _wrapped_block(ts, "body", line, body, width)
        if block is None:
            return None
        blocks.append(block)
    return blocks


def _heading(ts: _Type, title: str, body: int, width: int) -> _Block | None:
    # About 1.5 times the body size; on one line if a smaller size (not below the
    # body's) allows, else on two.
    sizes = range(max(body, round(body * 1.5)), body - 1, -1)
    for max_lines in (1, 2):
        for size in sizes:
            block = _wrapped_block(ts, "title", title, size, width, max_lines)
            if block is not None:
                return block
    return None


# -- drawing ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _base(screen: Screen, width: int, height: int, mode: str) -> tuple[Image.Image, _Plan]:
    from PIL import Image, ImageDraw

    palette = _palette(mode)
    image = Image.new(mode, (width, height), palette.ground)
    if screen.kind == "blank":
        return image, _Plan()
    ts = _TYPE
    if screen.kind == "code":
        plan = _plan_code(ts, screen, width, height)
    else:
        plan = _plan_text(ts, screen, width, height)
    draw = ImageDraw.Draw(image)
    if plan.qr is not None and plan.matrix is not None:
        _draw_qr(image, plan.qr, plan.matrix, palette)
    boxes: list[tuple[int, int, int, int]] = []
    for placed in plan.blocks:
        colour = palette.ink
        if placed.block.kind == "name":
            colour = palette.dim
        elif placed.block.kind == "title":
            colour = palette.accents.get(screen.kind, palette.ink)
        boxes.extend(_draw_block(ts, draw, placed, colour,
                                 slash_zeros=_mixes_letters_and_digits(screen.user_code or "")))
    if plan.bar is not None and palette.track is not None:
        bar = plan.bar
        draw.rectangle((bar.x, bar.y, bar.x + bar.w - 1, bar.y + bar.h - 1), fill=palette.track)
    return image, replace(plan, boxes=tuple(boxes))


def _draw_qr(image: Image.Image, qr: QrPlacement, matrix: QrMatrix, palette: _Palette) -> None:
    from PIL import Image

    left, top, right, bottom = qr.box
    image.paste(palette.light, (left, top, right, bottom))
    # One pixel per module, then scaled up without smoothing: module edges stay sharp
    # and every module is exactly `module_size` pixels.
    symbol = Image.new("1", (matrix.size, matrix.size), 1)
    symbol.putdata([0 if dark else 1 for row in matrix.modules for dark in row])
    side = matrix.size * qr.module_size
    symbol = symbol.resize((side, side), Image.Resampling.NEAREST)
    offset = qr.quiet_zone * qr.module_size
    # Paste the dark colour through a mask of the dark modules.
    mask = symbol.point(lambda value: 0 if value else 255, mode="1")
    image.paste(palette.dark, (left + offset, top + offset, left + offset + side,
                               top + offset + side), mask)


@dataclass(frozen=True)
class _Line:
    text: str
    origin: tuple[int, int]  # where the font draws the line from
    box: tuple[int, int, int, int]  # its ink's room on the panel, right and bottom exclusive


def _lines(ts: _Type, placed: _Placed) -> Iterator[_Line]:
    """Each line of a placed block, centred on the block's region."""
    block = placed.block
    y = placed.y
    line_top, line_bottom = ts.line_box(block.size)
    for line in block.lines:
        left, top, right, bottom = ts.bbox(line, block.size)
        if not block.tight:
            top, bottom = line_top, line_bottom
        x = placed.x + (placed.w - (right - left)) // 2 - left
        yield _Line(text=line, origin=(x, y - top), box=(x + left, y, x + right,
                                                         y + bottom - top))
        y += bottom - top + _line_gap(block.size)


def _draw_block(ts: _Type, draw: ImageDraw.ImageDraw, placed: _Placed, colour: Colour, *,
                slash_zeros: bool = False) -> tuple[tuple[int, int, int, int], ...]:
    """Draws the block; returns each line's box. `slash_zeros`: decided from the whole
    code, since a group stacked on its own line ("0000") may hold no letter."""
    block = placed.block
    font = _font(block.size)
    lines = tuple(_lines(ts, placed))
    for line in lines:
        x, y = line.origin
        for ch, offset in zip(line.text, ts.offsets(line.text, block.size), strict=True):
            if not ch.isspace():
                draw.text((x + offset, y), ch, font=font, fill=colour)
        if block.kind == "code" and slash_zeros:
            _slash_zeros(ts, draw, line.text, block.size, x, y, colour)
    return tuple(line.box for line in lines)


def _mixes_letters_and_digits(text: str) -> bool:
    return any(ch.isdigit() for ch in text) and any(ch.isalpha() for ch in text)


def _slash_zeros(ts: _Type, draw: ImageDraw.ImageDraw, line: str, size: int, x: int,
                 y: int, colour: Colour) -> None:
    """A code of letters and digits holds both 0 and O (django-oauth-toolkit's 0-9 and
    A-V, say), which the font draws alike: each zero gets a slash, as on a terminal."""
    for index, ch in enumerate(line):
        if ch != "0":
            continue
        _, top, right, bottom = ts.bbox(line[:index + 1], size)
        glyph_left = right - ts.width("0", size)
        inset_x = max(1, (right - glyph_left) // 5)
        inset_y = max(1, (bottom - top) // 6)
        draw.line((x + right - inset_x, y + top + inset_y,
                   x + glyph_left + inset_x, y + bottom - inset_y),
                  fill=colour, width=max(1, size // 12))


def _draw_bar(draw: ImageDraw.ImageDraw, bar: _Rect, progress: float, palette: _Palette) -> None:
    progress = min(1.0, max(0.0, progress))
    right = bar.x + bar.w - 1
    bottom = bar.y + bar.h - 1
    if palette.track is None:
        # Monochrome: a baseline for the full length, the remaining time as a bar.
        draw.line((bar.x, bottom, right, bottom), fill=palette.ink)
    filled = round(bar.w * progress)
    if filled > 0:
        draw.rectangle((bar.x, bar.y, bar.x + filled - 1, bottom), fill=palette.bar(progress))
