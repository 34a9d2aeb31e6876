"""A display that writes PNG files: previews, documentation pictures, tests.

Each distinct frame replaces `path` atomically (a reader such as an image viewer or a
web page that polls the file never sees half a PNG), or, with `series`, goes to the
next numbered file beside it: ``frame.png`` -> ``frame-0001.png``, ``frame-0002.png``.
A series continues after the highest number already there, so a restart does not
overwrite earlier frames.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from agent.fsutil import write_atomic

if TYPE_CHECKING:
    from agent.display.screens import Screen

__all__ = ["PngDisplay"]

log = logging.getLogger(__name__)


class PngDisplay:
    """Writes every distinct frame of a `width` x `height` panel in `mode` ("1", "L",
    "RGB") as PNG; `scale` enlarges each pixel to a `scale` x `scale` block."""

    def __init__(self, path: Path, *, width: int = 128, height: int = 64, mode: str = "1",
                 series: bool = False, scale: int = 1) -> None:
        if scale < 1:
            raise ValueError(f"scale must be at least 1, got {scale}")
        self.path = Path(path)
        self.width = width
        self.height = height
        self.mode = mode
        self.series = series
        self.scale = scale
        self.frames_written = 0
        self.last_written: Path | None = None
        self._last: bytes | None = None
        self._next_number: int | None = None
        self._failing = False
        self._logged_omissions: set[str] = set()

    async def start(self) -> None:
        self._last = None

    async def show(self, screen: Screen) -> None:
        # Layout (with QR encoding), PNG encoding and the write all run in a worker
        # thread: together they take long enough to hold up the event loop on a Pi.
        pixels = await asyncio.to_thread(self._pixels, screen)
        if pixels == self._last:
            return
        try:
            target = await asyncio.to_thread(self._save, pixels)
        except OSError as exc:
            # Said once per outage: show() runs every second during a countdown.
            if not self._failing:
                log.warning("cannot write %s: %s", self.path, exc.strerror or exc)
            self._failing = True
            return
        if self._failing:
            log.warning("writing %s again", self.path)
        self._failing = False
        self._last = pixels
        self.frames_written += 1
        self.last_written = target

    async def close(self) -> None:
        self._last = None

    def _pixels(self, screen: Screen) -> bytes:
        from agent.display.layout import compose

        frame = compose(screen, width=self.width, height=self.height, mode=self.mode)
        if frame.qr_omitted and frame.qr_omitted not in self._logged_omissions:
            self._logged_omissions.add(frame.qr_omitted)
            log.info("%s: %s; showing the URL and code as text", self.path, frame.qr_omitted)
        return frame.image.tobytes()

    def _encode(self, pixels: bytes) -> bytes:
        from PIL import Image

        image = Image.frombytes(self.mode, (self.width, self.height), pixels)
        if self.scale > 1:
            image = image.resize((self.width * self.scale, self.height * self.scale),
                                 Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    def _save(self, pixels: bytes) -> Path:
        return self._write(self._encode(pixels))

    def _write(self, data: bytes) -> Path:
        target = self.path
        if self.series:
            if self._next_number is None:
                self._next_number = self._highest_number() + 1
            target = self._numbered(self._next_number)
        write_atomic(target, data, mode=0o644)
        if self.series:
            assert self._next_number is not None
            self._next_number += 1
        return target

    def _numbered(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.stem}-{number:04d}{self.path.suffix or '.png'}")

    def _highest_number(self) -> int:
        pattern = re.compile(rf"{re.escape(self.path.stem)}-(\d+)"
                             rf"{re.escape(self.path.suffix or '.png')}")
        try:
            names = [entry.name for entry in self.path.parent.iterdir()]
        except FileNotFoundError:
            return 0
        numbers = [int(match.group(1)) for name in names if (match := pattern.fullmatch(name))]
        return max(numbers, default=0)
