"""OLED panels and Linux framebuffers, driven through luma.

`LumaDisplay` renders each screen with `layout` and pushes the frame to a luma device:
any luma.oled panel over I2C, SPI or a 6800 parallel bus, or luma.core's
`linux_framebuffer` (an HDMI screen, or an SPI TFT under fbtft). The device is created
lazily, on the first screen, from a `PanelSpec`; luma is imported only then, so a
console-only agent never loads it.

Panel I/O blocks (an SSD1306 frame is 1 KiB over 400 kHz I2C, ~25 ms), so every call
into luma runs in a worker thread. Identical frames are not sent again: during a
countdown most seconds change nothing on a 1-bit panel.

A panel that is missing, unplugged or not accessible is reported once, with what to
check, and the agent carries on: `ready` turns False (the factory then shows screens
on the console), and the device is created again every `retry_interval` seconds on
the injected clock until the panel answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Protocol

from agent.clock import Clock, SystemClock
from agent.display.kinds import KINDS
from agent.display.screens import FATAL

if TYPE_CHECKING:
    from PIL import Image

    from agent.display.screens import Screen

__all__ = [
    "LumaDevice",
    "LumaDisplay",
    "PanelSpec",
    "check_geometry",
    "describe_panel",
    "open_panel",
    "panel_hint",
    "panel_mode",
]

log = logging.getLogger(__name__)

RETRY_INTERVAL: Final = 30.0


class LumaDevice(Protocol):
    """The part of a luma device this module uses."""

    width: int
    height: int
    mode: str
    persist: bool

    def display(self, image: Image.Image) -> None: ...

    def show(self) -> None: ...

    def hide(self) -> None: ...

    def cleanup(self) -> None: ...

    def contrast(self, level: int) -> None: ...


@dataclass(frozen=True, kw_only=True)
class PanelSpec:
    """A panel as configured (validated by `agent.display.factory`).

    `interface` is "i2c", "spi", "parallel" or "framebuffer". `width`, `height` and
    `contrast` of None keep luma's defaults for the controller; `framebuffer` is the
    device node of a `linux_framebuffer`.
    """

    type: str
    interface: str
    port: int = 1
    address: int = 0x3C
    spi_device: int = 0
    gpio_dc: int = 24
    gpio_rst: int = 25
    bus_speed_hz: int = 8_000_000
    gpio_rs: int = 22
    gpio_e: int = 17
    gpio_pins: tuple[int, ...] = (25, 24, 23, 18)
    framebuffer: str = "/dev/fb0"
    width: int | None = None
    height: int | None = None
    rotate: int = 0
    contrast: int | None = None
    bgr: bool = False
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


def panel_mode(spec: PanelSpec) -> str:
    """The layout mode for the panel: what it can actually show."""
    return KINDS[spec.type].mode or "1"


def describe_panel(spec: PanelSpec) -> str:
    """Where the panel is expected, in the words of its wiring."""
    name = spec.type.upper() if spec.interface != "framebuffer" else "framebuffer"
    if spec.interface == "i2c":
        return f"{name} at I2C bus {spec.port} address 0x{spec.address:02X}"
    if spec.interface == "spi":
        return (f"{name} on SPI bus {spec.port} device {spec.spi_device} "
                f"(DC GPIO {spec.gpio_dc}, RST GPIO {spec.gpio_rst})")
    if spec.interface == "parallel":
        pins = ", ".join(str(pin) for pin in spec.gpio_pins)
        return f"{name} on GPIO RS {spec.gpio_rs}, E {spec.gpio_e}, data {pins}"
    return f"{name} {spec.framebuffer}"


def panel_hint(spec: PanelSpec) -> str:
    """What to check when the panel does not answer."""
    if spec.interface == "i2c":
        return (f"check wiring, `i2cdetect -y {spec.port}`, and that the user is in "
                "group i2c")
    if spec.interface == "spi":
        return (f"check wiring, that SPI is enabled (`ls /dev/spidev{spec.port}.*`), that "
                "RPi.GPIO (or rpi-lgpio on a Pi 5) is installed, and that the user is in "
                "groups spi and gpio")
    if spec.interface == "parallel":
        return ("check wiring, that RPi.GPIO (or rpi-lgpio on a Pi 5) is installed, and "
                "that the user is in group gpio")
    return (f"check that {spec.framebuffer} exists (`ls /dev/fb*`; an SPI TFT needs its "
            "fbtft overlay) and that the user is in group video")


def open_panel(spec: PanelSpec) -> LumaDevice:
    """Create the luma device: opens the bus and sends the controller's init sequence."""
    if spec.interface == "framebuffer":
        from luma.core.device import linux_framebuffer

        device: LumaDevice = linux_framebuffer(device=spec.framebuffer, bgr=spec.bgr)
        return device
    interface = _interface(spec)
    try:
        device = _device_class(spec.type)(serial_interface=interface, **_device_args(spec))
        if spec.contrast is not None:
            device.contrast(spec.contrast)
    except BaseException:
        with contextlib.suppress(Exception):
            interface.cleanup()
        raise
    return device



def _or(values: tuple[int, ...]) -> str:
    return ", ".join(map(str, values[:-1])) + f" or {values[-1]}"


def check_geometry(spec: PanelSpec) -> str | None:
    """Why luma would refuse the configured size or rotation, or None.

    The controller class is built over luma's `noop` interface, which sends nothing, so
    a size the controller cannot drive is a configuration error at start-up rather
    than a panel that "never answers".
    """
    if spec.interface == "framebuffer":
        return None  # the kernel driver knows its size; luma reads it from sysfs
    fixed = KINDS[spec.type].sizes
    if fixed is not None:
        # These need a parallel bus even to be built; their sizes are few enough to list.
        width, height = spec.width or fixed.default[0], spec.height or fixed.default[1]
        if width not in fixed.widths or height not in fixed.heights:
            return (f"{width}x{height} is not a {fixed.label} size (width "
                    f"{_or(fixed.widths)} {fixed.units[0]}; height {_or(fixed.heights)} "
                    f"{fixed.units[1]})")
        return None
    from luma.core.error import DeviceDisplayModeError
    from luma.core.interface.serial import noop

    try:
        device = _device_class(spec.type)(serial_interface=noop(), **_device_args(spec))
    except DeviceDisplayModeError as exc:
        return f"{spec.type} cannot drive {exc}".replace("Unsupported display mode: ", "")
    device.persist = True  # nothing to switch off at exit: it never drove a panel
    return None


def _device_class(kind: str) -> Callable[..., LumaDevice]:
    import luma.oled.device

    cls: Callable[..., LumaDevice] = getattr(luma.oled.device, kind)
    return cls


def _device_args(spec: PanelSpec) -> dict[str, Any]:
    args: dict[str, Any] = {"rotate": spec.rotate, **spec.extra}
    if spec.width is not None:
        args["width"] = spec.width
    if spec.height is not None:
        args["height"] = spec.height
    if KINDS[spec.type].bgr:
        args["bgr"] = spec.bgr
    return args


def _interface(spec: PanelSpec) -> Any:
    if spec.interface == "i2c":
        from luma.core.interface.serial import i2c

        return i2c(port=spec.port, address=spec.address)
    if spec.interface == "spi":
        from luma.core.interface.serial import spi

        return spi(port=spec.port, device=spec.spi_device, gpio_DC=spec.gpio_dc,
                   gpio_RST=spec.gpio_rst, bus_speed_hz=spec.bus_speed_hz)
    from luma.core.interface.parallel import bitbang_6800

    return bitbang_6800(RS=spec.gpio_rs, E=spec.gpio_e, PINS=list(spec.gpio_pins))


def _panel_errors() -> tuple[type[BaseException], ...]:
    """What a missing, unplugged or inaccessible panel raises: OS errors from the bus,
    luma's own errors (not found, permission, unsupported platform), a missing GPIO
    library (ImportError), and RPi.GPIO's RuntimeError off a Pi."""
    errors: tuple[type[BaseException], ...] = (OSError, ImportError, RuntimeError)
    try:
        from luma.core.error import Error
    except ImportError:
        return errors
    return (*errors, Error)


class LumaDisplay:
    """A `Display` on a luma device made by `device_factory` (called in a thread).

    `mode` is the layout mode ("1", "L", "RGB"); by default it follows the device
    ("1" stays "1", anything else is laid out in colour). `description` and `hint`
    make the one log line about a missing panel say where it was expected and what
    to check.
    """

    def __init__(self, device_factory: Callable[[], LumaDevice], *, clock: Clock | None = None,
                 mode: str | None = None, description: str = "the display panel",
                 hint: str = "check its wiring and configuration",
                 retry_interval: float = RETRY_INTERVAL) -> None:
        self._factory = device_factory
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._mode = mode
        self._description = description
        self._hint = hint
        self._retry_interval = retry_interval
        self._device: LumaDevice | None = None
        self._lock = asyncio.Lock()
        self._screen: Screen | None = None
        self._pushed: bytes | None = None
        self._hidden = False
        self._ready = False
        self._failed = False  # the panel has failed and not come back since
        self._retry: asyncio.Task[None] | None = None
        self._logged_omissions: set[str] = set()
        self._closed = False

    @property
    def ready(self) -> bool:
        """True while the panel shows what it was last given."""
        return self._ready

    @property
    def failed(self) -> bool:
        """True from a panel failure until the panel works again."""
        return self._failed

    async def start(self) -> None:
        self._closed = False

    async def show(self, screen: Screen) -> None:
        self._screen = screen
        if self._closed or self._failed:
            return  # the retry task brings the panel back and draws the latest screen
        async with self._lock:
            await self._draw()

    async def close(self) -> None:
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
            self._retry = None
        async with self._lock:
            device, self._device = self._device, None
            self._ready = False
            if device is not None:
                # luma's cleanup clears and switches off the panel: a code left on
                # it after the agent stops could no longer sign anyone in. A fatal
                # screen is the exception: it is there for whoever walks up.
                device.persist = self._screen is not None and self._screen.kind == FATAL
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(device.cleanup)

    # -- internals -----------------------------------------------------------------------

    async def _draw(self) -> None:
        screen = self._screen
        if self._device is None and not await self._open():
            return
        if screen is None:
            return
        device = self._device
        assert device is not None
        try:
            if screen.kind == "blank":
                # Switching the panel off saves an OLED from burn-in. The black frame
                # first is for devices whose "off" does nothing (a framebuffer).
                if not self._hidden:
                    await self._push(screen, device, wake=False)
                    await asyncio.to_thread(device.hide)
                    self._hidden = True
            else:
                await self._push(screen, device)
        except _panel_errors() as exc:
            await self._lost(exc, device)
            return
        if self._failed:
            log.warning("%s is back", self._description)
            self._failed = False
        self._ready = True

    async def _push(self, screen: Screen, device: LumaDevice, *, wake: bool = True) -> None:
        # Laying out a new code takes a QR encoding: tens of ms on a Pi Zero, which the
        # event loop (polling, the API) should not wait for.
        image = await asyncio.to_thread(self._frame, screen, device)
        data = image.tobytes()
        if data != self._pushed:
            await asyncio.to_thread(device.display, image)
            self._pushed = data
        if wake and self._hidden:
            # After the frame, so the panel wakes up showing the new screen.
            await asyncio.to_thread(device.show)
            self._hidden = False

    def _frame(self, screen: Screen, device: LumaDevice) -> Image.Image:
        from agent.display.layout import compose

        mode = self._mode or ("1" if device.mode == "1" else "RGB")
        frame = compose(screen, width=device.width, height=device.height, mode=mode)
        if frame.qr_omitted and frame.qr_omitted not in self._logged_omissions:
            self._logged_omissions.add(frame.qr_omitted)
            log.info("%s: %s; showing the URL and code as text", self._description,
                     frame.qr_omitted)
        if frame.name_omitted and "name" not in self._logged_omissions:
            self._logged_omissions.add("name")
            log.info("%s: no room for the device name (%s) beside the code; it is in the "
                     "status and the log", self._description, screen.device_name)
        image = frame.image
        return image if image.mode == device.mode else image.convert(device.mode)

    async def _open(self) -> bool:
        try:
            device = await asyncio.to_thread(self._factory)
        except _panel_errors() as exc:
            self._fail(exc)
            return False
        self._device = device
        self._pushed = None
        self._hidden = False
        return True

    async def _lost(self, exc: BaseException, device: LumaDevice) -> None:
        self._device = None
        self._ready = False
        with contextlib.suppress(Exception):
            await asyncio.to_thread(device.cleanup)
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        detail = str(exc) or type(exc).__name__
        if not self._failed:
            log.warning("no %s: %s; %s (retrying every %g s)", self._description, detail,
                        self._hint, self._retry_interval)
        else:
            log.debug("%s still unavailable: %s", self._description, detail)
        self._failed = True
        if self._retry is None or self._retry.done():
            self._retry = asyncio.create_task(self._retry_loop(), name="panel retry")

    async def _retry_loop(self) -> None:
        while not self._closed:
            await self._clock.sleep(self._retry_interval)
            async with self._lock:
                if self._closed:
                    return
                if not self._ready:
                    await self._draw()
                if self._ready:
                    return
