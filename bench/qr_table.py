"""What the code screen's QR code looks like on each panel, and whether it scans.

For each geometry and each length of verification URI, the code screen goes through
`LumaDisplay` into luma's `dummy` device (rotation included), and zxing reads the frame
luma kept, surrounded by a dark bezel and enlarged 4x, without trying inverted colours.
tests/test_oled.py does the same through the real controller classes.

    /work/venv/bin/python bench/qr_table.py
"""

from __future__ import annotations

import asyncio
import sys

import zxingcpp
from luma.core.device import dummy
from PIL import Image

from agent.display.layout import compose
from agent.display.oled import LumaDisplay
from agent.display.screens import Screen, build_screen
from agent.state import Phase, Snapshot

URIS = [
    "https://auth.example.com/device?code=123456789",
    "https://sso.identity.kitchen-displays.example-company.co.uk/device?code=004815162",
    "https://auth.example.com/if/flow/default-device-code-flow/?code=123456789&x=" + "a" * 24,
]
# (label, width, height, luma mode, layout mode, rotate)
PANELS = [
    ("128x64 1 (SSD1306, SH1106)", 128, 64, "1", "1", 0),
    ("128x64 1, rotate=1", 128, 64, "1", "1", 1),
    ("128x32 1 (SSD1306)", 128, 32, "1", "1", 0),
    ("256x64 L (SSD1322)", 256, 64, "RGB", "L", 0),
    ("128x128 L (SSD1327)", 128, 128, "RGB", "L", 0),
    ("128x128 RGB (SSD1351)", 128, 128, "RGB", "RGB", 0),
    ("96x64 RGB (SSD1331)", 96, 64, "RGB", "RGB", 0),
]


def code_screen(uri: str) -> Screen:
    snapshot = Snapshot(phase=Phase.AWAITING_USER, device_name="Kitchen display",
                        user_code="123456789", verification_uri=uri.split("?")[0],
                        verification_uri_complete=uri, code_deadline=10_045.0)
    return build_screen(snapshot, now_mono=10_000.0, now_wall=0.0, code_lifetime=60)


def decode(image: Image.Image) -> list[str]:
    grey = image.convert("L")
    framed = Image.new("L", (grey.width + 16, grey.height + 16), 0)
    framed.paste(grey, (8, 8))
    big = framed.resize((framed.width * 4, framed.height * 4), Image.Resampling.NEAREST)
    return [found.text for found in zxingcpp.read_barcodes(big, try_invert=False)]


async def row(label: str, width: int, height: int, luma_mode: str, mode: str, rotate: int,
              uri: str) -> str:
    device = dummy(width=width, height=height, rotate=rotate, mode=luma_mode)
    display = LumaDisplay(lambda: device, mode=mode)
    await display.show(code_screen(uri))
    frame = compose(code_screen(uri), width=device.width, height=device.height, mode=mode)
    decoded = decode(device.image)
    qr = frame.qr
    if qr is None:
        verdict = "no QR drawn: URL and code as text" if decoded == [] else f"?? {decoded}"
        return f"| {label} | {len(uri)} | - | - | - | - | {verdict} |"
    verdict = "yes" if decoded == [uri] else f"NO ({decoded})"
    url = "URL shortened" if frame.url_shortened else "URL whole"
    return (f"| {label} | {len(uri)} | {qr.module_size} px | {qr.version} | "
            f"{qr.error_correction} | {qr.quiet_zone} | {verdict}; {url} |")


async def main() -> None:
    print(f"$ {sys.executable} bench/qr_table.py")
    print("| geometry | URI chars | module | version | ECC | quiet zone (modules) | "
          "decoded |")
    print("|---|---|---|---|---|---|---|")
    for panel in PANELS:
        for uri in URIS:
            print(await row(*panel, uri))


if __name__ == "__main__":
    asyncio.run(main())
