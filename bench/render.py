"""Render time per frame of the layout engine, on the panels it is most used with.

Two cases per geometry:

- new code: a code screen never drawn before (new user code, new QR data), so the
  layout search, QR encoding and text drawing all run; this happens once a code;
- countdown tick: the same code screen a second later; only the bar is redrawn on a
  copy of the cached frame; this happens every second while a code is shown.

Plus, for context, pushing a frame through luma's ssd1306 driver (noop interface),
which is luma's pixel packing, not ours.

    /work/venv/bin/python bench/render.py [--frames 500]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace

import PIL

from agent.display.layout import render
from agent.display.screens import Screen, build_screen
from agent.state import Phase, Snapshot

GEOMETRIES = [(128, 64, "1"), (256, 64, "L")]


def code_screen(number: int) -> Screen:
    code = f"{number:09d}"
    uri = f"https://auth.example.com/device?code={code}"
    snapshot = Snapshot(phase=Phase.AWAITING_USER, device_name="Kitchen display",
                        user_code=code, verification_uri="https://auth.example.com/device",
                        verification_uri_complete=uri, code_deadline=10_060.0)
    return build_screen(snapshot, now_mono=10_000.0, now_wall=0.0, code_lifetime=60)


def measure(frames: int, draw: Callable[[int], object]) -> list[float]:
    draw(-1)  # imports, font loading: once per process, not per frame
    times = []
    for index in range(frames):
        started = time.perf_counter()
        draw(index)
        times.append((time.perf_counter() - started) * 1000)
    return times


def report(label: str, times: list[float]) -> None:
    ordered = sorted(times)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(f"  {label:<28} mean {statistics.fmean(times):6.2f} ms   p50 {p50:6.2f} ms   "
          f"p99 {p99:6.2f} ms   ({len(times)} frames)")


def bench_geometry(width: int, height: int, mode: str, frames: int) -> None:
    print(f"{width}x{height} mode {mode!r}:")

    def new_code(index: int) -> object:
        return render(code_screen(100_000_000 + index), width=width, height=height, mode=mode)

    tick = code_screen(123_456_789)

    def countdown(index: int) -> object:
        # A new bar length each frame, so no frame is a cache hit of the whole image.
        screen = replace(tick, progress=(index % 600) / 600, seconds_left=60 - index % 60)
        return render(screen, width=width, height=height, mode=mode)

    report("new code (layout + QR)", measure(frames, new_code))
    report("countdown tick", measure(frames, countdown))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=500)
    args = parser.parse_args()
    print(f"$ {sys.executable} bench/render.py --frames {args.frames}")
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"Pillow {PIL.__version__}")
    for width, height, mode in GEOMETRIES:
        bench_geometry(width, height, mode, args.frames)

    from luma.core.interface.serial import noop
    from luma.oled.device import ssd1306

    device = ssd1306(serial_interface=noop())
    frame = render(code_screen(1), width=128, height=64, mode="1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # luma's Image.getdata
        print("luma, for context:")
        report("ssd1306.display (noop bus)", measure(args.frames, lambda i: device.display(frame)))


if __name__ == "__main__":
    main()
