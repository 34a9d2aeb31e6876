"""The PNG display: frames written atomically, one file or a numbered series, and the
QR code still scanning from the file on disk."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from agent.display import Display
from agent.display.png import PngDisplay
from tests.qrscan import AUTHENTIK, LONGER_HOST
from tests.test_layout import code_screen, decode, text_screen


async def test_the_frame_on_disk_scans(tmp_path: Path) -> None:
    path = tmp_path / "panel.png"
    display = PngDisplay(path, width=128, height=64, mode="1")
    await display.start()
    await display.show(code_screen())
    with Image.open(path) as image:
        assert image.size == (128, 64)
        assert decode(image) == [AUTHENTIK]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    # Written through a temporary file and a rename: nothing else is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["panel.png"]


async def test_scale_enlarges_pixels_without_smoothing(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    display = PngDisplay(path, width=256, height=64, mode="L", scale=3)
    await display.show(code_screen(LONGER_HOST))
    with Image.open(path) as image:
        assert image.size == (768, 192)
        assert image.mode == "L"
        assert decode(image, scale=1) == [LONGER_HOST]
        # Each source pixel became a 3x3 block of one value: no smoothing at the edges.
        small = image.resize((256, 64), Image.Resampling.NEAREST)
        again = small.resize((768, 192), Image.Resampling.NEAREST)
        assert again.tobytes() == image.tobytes()


async def test_only_distinct_frames_are_written(tmp_path: Path) -> None:
    display = PngDisplay(tmp_path / "panel.png")
    await display.show(code_screen(elapsed=10))
    await display.show(code_screen(elapsed=10))
    await display.show(code_screen(elapsed=10.05))  # the bar does not move a pixel
    assert display.frames_written == 1
    await display.show(code_screen(elapsed=40))
    assert display.frames_written == 2


async def test_a_series_numbers_the_frames_and_continues_after_a_restart(
        tmp_path: Path) -> None:
    path = tmp_path / "frames" / "panel.png"
    path.parent.mkdir()
    display = PngDisplay(path, series=True)
    await display.show(code_screen(elapsed=10))
    await display.show(code_screen(elapsed=40))
    await display.show(text_screen("signed_in"))
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["panel-0001.png", "panel-0002.png", "panel-0003.png"]
    assert not path.exists()
    again = PngDisplay(path, series=True)
    await again.show(text_screen("stopping"))
    assert again.last_written == path.parent / "panel-0004.png"


async def test_a_write_failure_is_logged_once_and_does_not_raise(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="agent.display")
    path = tmp_path / "missing-dir" / "panel.png"
    display = PngDisplay(path)
    await display.show(code_screen(elapsed=10))
    await display.show(code_screen(elapsed=40))
    assert len(caplog.records) == 1
    assert "cannot write" in caplog.messages[0]
    os.mkdir(path.parent)
    await display.show(code_screen(elapsed=50))
    assert path.exists()
    assert caplog.messages[-1] == f"writing {path} again"


async def test_a_missing_qr_is_logged_once(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.display")
    display = PngDisplay(tmp_path / "panel.png", width=128, height=32)
    for elapsed in (5, 20, 40):
        await display.show(code_screen(elapsed=elapsed))
    notes = [m for m in caplog.messages if "no room for a QR code" in m]
    assert len(notes) == 1


def test_png_display_is_a_display(tmp_path: Path) -> None:
    display: Display = PngDisplay(tmp_path / "x.png")
    assert display is not None
    with pytest.raises(ValueError):
        PngDisplay(tmp_path / "x.png", scale=0)
