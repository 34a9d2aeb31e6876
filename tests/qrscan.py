"""Drawing a QR matrix as a printed symbol would be, and reading it back with zxing."""

from __future__ import annotations

import zxingcpp
from PIL import Image

from agent.display.qr import QrMatrix, qr_matrix

__all__ = ["scan_matrix", "scan_text"]


def scan_matrix(matrix: QrMatrix, *, quiet: int = 4, scale: int = 4) -> list[str]:
    """Dark modules on white with a `quiet`-module margin, scaled up, then decoded."""
    side = matrix.size + 2 * quiet
    image = Image.new("L", (side, side), 255)
    for r, row in enumerate(matrix.modules):
        for c, dark in enumerate(row):
            if dark:
                image.putpixel((c + quiet, r + quiet), 0)
    image = image.resize((side * scale, side * scale), Image.Resampling.NEAREST)
    return [barcode.text for barcode in zxingcpp.read_barcodes(image, try_invert=False)]


def scan_text(text: str) -> list[str]:
    """Encode `text` as a device with its own QR renderer (a Nextion) would, and scan it."""
    return scan_matrix(qr_matrix(text))
