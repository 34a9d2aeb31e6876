"""Text read back from the pixels: every screen on every panel geometry, at 1:1.

Two checks, side by side: tesseract reads the code digits and the times of day from
each line of the frame (`read_line` says how a line is prepared), and a geometric check
looks for a blank column between neighbouring glyphs, which catches glyphs that touch
even where OCR guesses the right word.
"""

from __future__ import annotations

import functools
import io
import re
import shutil
import subprocess
from dataclasses import dataclass, replace

import pytest
from PIL import Image, ImageFilter, ImageOps

from agent.display.layout import Frame, compose
from agent.display.render import SCREENS, synthetic_screen
from tests.test_layout import ALL_GEOMETRIES, GEOMETRY_IDS

KINDS = [kind for kind in SCREENS if kind != "blank"]
TIME = re.compile(r"\b\d\d:\d\d\b")
# Lines are enlarged to about this height (pixels) before OCR.
OCR_LINE_HEIGHT = 48


def frames(width: int, height: int, mode: str) -> list[tuple[str, Frame]]:
    """Every screen kind on this geometry, each page of a paging code screen too."""
    found = []
    for kind in KINDS:
        screen = synthetic_screen(kind)
        first = compose(screen, width=width, height=height, mode=mode)
        found.append((kind, first))
        for page in range(1, first.pages):
            found.append((f"{kind}[{page}]",
                          compose(replace(screen, page=page), width=width, height=height,
                                  mode=mode)))
    return found


def ink(frame: Frame, box: tuple[int, int, int, int]) -> Image.Image:
    """The box's pixels as 1-bit ink (1) on ground (0): on a grey or colour panel the
    faintest edge of a glyph counts, as the eye sees it."""
    return frame.image.convert("L").crop(box).point(lambda value: 255 if value else 0,
                                                    mode="1")


def grey(frame: Frame, box: tuple[int, int, int, int]) -> Image.Image:
    """The box's pixels as light on dark, as the panel shows them."""
    return frame.image.convert("L").crop(box)


def ink_runs(image: Image.Image) -> int:
    """How many runs of inked columns, separated by blank columns, the image holds."""
    width, height = image.size
    pixels = image.load()
    assert pixels is not None
    runs, inside = 0, False
    for x in range(width):
        inked = any(pixels[x, y] for y in range(height))
        if inked and not inside:
            runs += 1
        inside = inked
    return runs


@pytest.mark.parametrize(("width", "height", "mode"), ALL_GEOMETRIES, ids=GEOMETRY_IDS)
def test_neighbouring_glyphs_never_touch(width: int, height: int, mode: str) -> None:
    # In a monospaced cell each visible character gives at least one run of inked
    # columns; two glyphs that touch merge into one, and the line has fewer runs.
    problems = []
    for name, frame in frames(width, height, mode):
        assert len(frame.boxes) == len(frame.text)
        for line, box in zip(frame.text, frame.boxes, strict=True):
            glyphs = sum(1 for ch in line if not ch.isspace())
            runs = ink_runs(ink(frame, box))
            if runs < glyphs:
                problems.append(f"{name}: {line!r} has {glyphs} glyphs in {runs} runs")
    assert not problems, "\n".join(problems)


@dataclass(frozen=True)
class Expect:
    where: str
    line: str
    want: str  # what OCR must read in the line, spaces ignored


def expectations(name: str, frame: Frame) -> list[tuple[Expect, Image.Image]]:
    """The lines worth reading back: the code's digits and any time of day."""
    wanted = []
    for line, box in zip(frame.text, frame.boxes, strict=True):
        digits = line.replace(" ", "")
        if digits.isdigit() and len(digits) >= 3:
            want = digits
        elif (match := TIME.search(line)) is not None:
            want = match.group(0)
        else:
            continue
        wanted.append((Expect(where=name, line=line, want=want), grey(frame, box)))
    return wanted


@functools.cache
def tesseract() -> str | None:
    return shutil.which("tesseract")


def read_line(crop: Image.Image) -> str:
    """What tesseract reads in one line of ink.

    The line is enlarged to about the size tesseract is trained on, without smoothing
    (each pixel becomes a square block, as on the panel), then blurred by a third of a
    pixel, as a pixel is to an eye at reading distance, and drawn dark on light."""
    scale = max(1, round(OCR_LINE_HEIGHT / crop.height))
    big = crop.convert("L").resize((crop.width * scale, crop.height * scale),
                                   Image.Resampling.NEAREST)
    margin = 4 * scale
    sheet = Image.new("L", (big.width + 2 * margin, big.height + 2 * margin), 255)
    sheet.paste(ImageOps.invert(big), (margin, margin))
    sheet = sheet.filter(ImageFilter.GaussianBlur(scale / 3))
    tool = tesseract()
    assert tool is not None
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    result = subprocess.run([tool, "stdin", "stdout", "--psm", "7"], input=buffer.getvalue(),
                            capture_output=True, check=True, timeout=60)
    return result.stdout.decode().strip()


@pytest.mark.parametrize(("width", "height", "mode"), ALL_GEOMETRIES, ids=GEOMETRY_IDS)
def test_ocr_reads_the_code_and_the_times(width: int, height: int, mode: str) -> None:
    if tesseract() is None:
        pytest.skip("tesseract is not installed (Debian's tesseract-ocr; .ci/run installs it)")
    wanted = [found for name, frame in frames(width, height, mode)
              for found in expectations(name, frame)]
    # The code screen's digits and a time of day, at least, on every panel.
    assert any(expect.where == "code" for expect, _ in wanted)
    assert any(TIME.search(expect.want) for expect, _ in wanted)
    wrong = []
    for expect, crop in wanted:
        text = read_line(crop)
        if expect.want not in text.replace(" ", ""):
            wrong.append(f"{expect.where}: {expect.line!r} read as {text!r}")
    assert not wrong, "\n".join(wrong)
