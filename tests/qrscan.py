"""Drawing a QR matrix as a printed symbol would be, and reading it back with zxing."""

from __future__ import annotations

import pytest
import zxingcpp
from PIL import Image

from agent.display.qr import QrMatrix, qr_matrix

__all__ = ["AUTHENTIK", "HUNDRED", "LONGER_HOST", "URIS", "scan_matrix", "scan_text"]

# The links every display is checked with: authentik's own, a long host, and 100
# characters, the longest a verification_uri_complete is expected to be.
AUTHENTIK = "https://auth.example.com/device?code=123456789"
LONGER_HOST = "https://sso.identity.kitchen-displays.example-company.co.uk/device?code=004815162"
HUNDRED = "https://auth.example.com/if/flow/default-device-code-flow/?code=123456789&x=" + "a" * 24
assert len(HUNDRED) == 100
URIS = pytest.mark.parametrize("uri", [AUTHENTIK, LONGER_HOST, HUNDRED],
                               ids=["authentik", "longer-host", "100-chars"])


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
