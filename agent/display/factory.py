"""The display named by ``display.type``, with its ``display.options`` checked.

Options are checked here, when the agent starts, so a typo stops it with exit status
78 (`ConfigError("display.options.NAME", ...)`) instead of surfacing as a panel that
never lights up. Nothing is opened and no panel library is imported until the first
screen is shown; the serial displays (terminal, nextion, charlcd) check their own
options in `agent.display.serial`. Which types there are, and each one's reader and
constructor, is `agent.display.kinds`. The button has its own ``button:`` section; the
``display.options.button_*`` keys of older configs are moved there by `agent.config`.

Options by display type ("luma" = the default of luma's class for that controller):

==============  ===================  ==========  ======================================
option          types                default     meaning
==============  ===================  ==========  ======================================
interface       OLED panels          see right   ``i2c`` or ``spi`` (``parallel`` for
                                                 ws0010, winstar_weh). Default ``i2c``
                                                 for ssd1306, ssd1309, sh1106, sh1107;
                                                 ``spi`` for greyscale and colour ones
port            OLED, i2c or spi     1 / 0       I2C bus (``/dev/i2c-1``) or SPI bus
address         OLED, i2c            0x3C        I2C address: 0x3C or 0x3D (or "0x3C")
device          OLED, spi            0           SPI chip select (``/dev/spidev0.0``)
device          linux_framebuffer    /dev/fb0    framebuffer device node
gpio_DC         OLED, spi            24          BCM pin for data/command
gpio_RST        OLED, spi            25          BCM pin for reset
bus_speed_hz    OLED, spi            8000000     SPI clock; one of luma's speeds,
                                                 500000 to 52000000
gpio_RS         ws0010, winstar_weh  22          BCM pin for register select
gpio_E          ws0010, winstar_weh  17          BCM pin for enable
gpio_PINS       ws0010, winstar_weh  [25, 24,    BCM pins of the 4- or 8-bit data bus,
                                     23, 18]     least significant first
width, height   OLED panels          luma        pixels (winstar_weh: characters and
                                                 lines); checked against what luma's
                                                 class for the controller can drive
rotate          OLED panels          0           0-3: quarter turns clockwise
contrast        OLED panels          luma        0-255
bgr             ssd1351, framebuf.   false       the pixels are blue-green-red
width, height   png                  128, 64     pixels of the simulated panel
mode            png                  "1"         ``"1"`` (monochrome), ``L`` (greyscale)
                                                 or ``RGB``
series          png                  false       number the files instead of replacing
scale           png                  1           enlarge each pixel (1-16), for previews
==============  ===================  ==========  ======================================

While an OLED panel or framebuffer is missing the screens also go to the console, so
the code can be read from the journal until the panel answers.
"""

from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from agent.clock import Clock
from agent.config import DisplayConfig
from agent.display.button import BUTTON_OPTIONS
from agent.display.kinds import KINDS
from agent.display.options import Reader, boolean, integer, kind_of
from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.display import Display
    from agent.display.oled import LumaDisplay, PanelSpec
    from agent.display.screens import Screen

__all__ = ["PanelWithFallback", "create_display", "panel_spec"]

log = logging.getLogger(__name__)

# luma's spi() asserts one of these clock rates.
_SPI_SPEEDS: Final = tuple(int(mhz * 1_000_000) for mhz in (
    0.5, 1, 2, 4, 8, 16, 20, 24, 28, 32, 36, 40, 44, 48, 50, 52))


def create_display(config: DisplayConfig, *, clock: Clock | None = None) -> Display | None:
    """The display `config` asks for, or None for ``none``. Raises ConfigError."""
    kind = KINDS.get(config.type)
    if kind is None:
        raise ConfigError("display.type", f"{config.type!r} is not a display type")
    values = kind.read_options(config.type, config.options)
    display: Display | None = kind.build(config, values, clock)
    return display


# -- options readers and constructors, named by agent.display.kinds ----------------------


def left_to_driver(kind: str, options: Mapping[str, Any]) -> Mapping[str, Any]:
    return options


def no_options(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    return _read(kind, options, {})


def png_options(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    return _read(kind, options, _PNG_OPTIONS)


def build_nothing(config: DisplayConfig, values: object, clock: Clock | None) -> None:
    return None


def build_console(config: DisplayConfig, values: object, clock: Clock | None) -> Display:
    from agent.display.console import ConsoleDisplay

    return ConsoleDisplay(clock=clock)


def build_png(config: DisplayConfig, values: Mapping[str, Any],
              clock: Clock | None) -> Display:
    if config.path is None:
        raise ConfigError("display.path", "required when display.type is png")
    from agent.display.png import PngDisplay

    return PngDisplay(config.path, **values)


def build_serial(config: DisplayConfig, values: object, clock: Clock | None) -> Display:
    from agent.display.serial import create_serial_display

    return create_serial_display(config, clock=clock)


def build_panel(config: DisplayConfig, spec: PanelSpec, clock: Clock | None) -> Display:
    from agent.display.console import ConsoleDisplay
    from agent.display.oled import (
        LumaDisplay,
        describe_panel,
        open_panel,
        panel_hint,
        panel_mode,
    )

    panel = LumaDisplay(functools.partial(open_panel, spec), clock=clock,
                        mode=panel_mode(spec), description=describe_panel(spec),
                        hint=panel_hint(spec))
    return PanelWithFallback(panel, ConsoleDisplay(clock=clock))


def panel_spec(kind: str, options: Mapping[str, Any]) -> PanelSpec:
    """Checked settings for an OLED panel or framebuffer. Raises ConfigError."""
    from agent.display.oled import PanelSpec, check_geometry

    entry = KINDS[kind]
    if entry.family == "framebuffer":
        values = _read(kind, options, _FRAMEBUFFER_OPTIONS)
        return PanelSpec(type=kind, interface="framebuffer",
                         framebuffer=values.get("device", "/dev/fb0"),
                         bgr=values.get("bgr", False))
    choices = entry.interfaces
    interface = options.get("interface", choices[0])
    if interface not in choices:
        raise ConfigError("display.options.interface",
                          f"{interface!r} is not one of: {', '.join(sorted(choices))} "
                          f"(for {kind})")
    table = {**_PANEL_OPTIONS, **_INTERFACE_OPTIONS[interface]}
    if entry.bgr:
        table["bgr"] = boolean
    values = _read(kind, options, table, interface=interface)
    spec = PanelSpec(
        type=kind, interface=interface,
        port=values.get("port", 1 if interface == "i2c" else 0),
        address=values.get("address", 0x3C),
        spi_device=values.get("device", 0),
        gpio_dc=values.get("gpio_DC", 24),
        gpio_rst=values.get("gpio_RST", 25),
        bus_speed_hz=values.get("bus_speed_hz", 8_000_000),
        gpio_rs=values.get("gpio_RS", 22),
        gpio_e=values.get("gpio_E", 17),
        gpio_pins=values.get("gpio_PINS", (25, 24, 23, 18)),
        width=values.get("width"),
        height=values.get("height"),
        rotate=values.get("rotate", 0),
        contrast=values.get("contrast"),
        bgr=values.get("bgr", False),
    )
    problem = check_geometry(spec)
    if problem is not None:
        key = "width" if "width" in options or "height" not in options else "height"
        raise ConfigError(f"display.options.{key}", problem)
    return spec


class PanelWithFallback:
    """Shows screens on `panel`, and on `fallback` (the console) while the panel is
    missing, so a code is never shown nowhere."""

    def __init__(self, panel: LumaDisplay, fallback: Display) -> None:
        self.panel = panel
        self.fallback = fallback
        self._on_fallback = False

    @property
    def on_fallback(self) -> bool:
        return self._on_fallback

    async def start(self) -> None:
        await self.panel.start()

    async def show(self, screen: Screen) -> None:
        await self.panel.show(screen)
        if self.panel.ready:
            if self._on_fallback:
                log.info("the panel shows the screens again")
                self._on_fallback = False
                # The console's last block stays as it is, no longer live: later log
                # lines must not redraw a code under each of them.
                await self.fallback.start()
            return
        if screen.kind == "blank":
            return  # blanking spares an OLED; the console has nothing to spare
        if not self._on_fallback:
            log.info("showing screens on the console until the panel answers")
            self._on_fallback = True
            await self.fallback.start()  # draw in full, not as an update of old output
        await self.fallback.show(screen)

    async def close(self) -> None:
        try:
            await self.panel.close()
        finally:
            if self._on_fallback:
                await self.fallback.close()


# -- option readers ------------------------------------------------------------------


def _address(value: object, key: str) -> int:
    # YAML reads 0x3C as the integer 60; "0x3C" in quotes is accepted too.
    if isinstance(value, str):
        try:
            value = int(value.strip(), 0)
        except ValueError:
            raise ConfigError(key, f"{value!r} is not an I2C address; write 0x3C") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected an I2C address such as 0x3C, got {kind_of(value)}")
    if not 0x03 <= value <= 0x77:
        raise ConfigError(key, f"must be a 7-bit I2C address from 0x03 to 0x77, "
                               f"got 0x{value:02X}")
    return value


def _speed(value: object, key: str) -> int:
    listed = ", ".join(f"{speed:_}" for speed in _SPI_SPEEDS)
    if isinstance(value, bool) or not isinstance(value, int) or value not in _SPI_SPEEDS:
        raise ConfigError(key, f"must be one of {listed} (Hz)")
    return value


def _pins(value: object, key: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or len(value) not in (4, 8):
        raise ConfigError(key, "expected a list of 4 or 8 BCM pin numbers")
    return tuple(integer(0, 53)(pin, f"{key}[{index}]") for index, pin in enumerate(value))


def _framebuffer(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.startswith("/dev/fb") or not value[7:].isdigit():
        raise ConfigError(key, "expected a framebuffer device such as /dev/fb0 or /dev/fb1")
    return value


def _png_mode(value: object, key: str) -> str:
    if value not in ("1", "L", "RGB"):
        hint = ' (write "1" in quotes)' if value == 1 else ""
        raise ConfigError(key, f'expected "1", L or RGB{hint}')
    return str(value)


_PNG_OPTIONS: Final[Mapping[str, Reader]] = {
    "width": integer(1, 4096),
    "height": integer(1, 4096),
    "mode": _png_mode,
    "series": boolean,
    "scale": integer(1, 16),
}
_PANEL_OPTIONS: Final[Mapping[str, Reader]] = {
    "interface": lambda value, key: value,  # checked before the table is chosen
    "width": integer(1, 1024),
    "height": integer(1, 1024),
    "rotate": integer(0, 3),
    "contrast": integer(0, 255),
}
_INTERFACE_OPTIONS: Final[Mapping[str, Mapping[str, Reader]]] = {
    "i2c": {"port": integer(0, 99), "address": _address},
    "spi": {"port": integer(0, 9), "device": integer(0, 9), "gpio_DC": integer(0, 53),
            "gpio_RST": integer(0, 53), "bus_speed_hz": _speed},
    "parallel": {"gpio_RS": integer(0, 53), "gpio_E": integer(0, 53), "gpio_PINS": _pins},
}
_FRAMEBUFFER_OPTIONS: Final[Mapping[str, Reader]] = {
    "device": _framebuffer,
    "bgr": boolean,
}


def _read(kind: str, options: Mapping[str, Any], table: Mapping[str, Reader], *,
          interface: str | None = None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, value in options.items():
        key = f"display.options.{name}"
        if name in BUTTON_OPTIONS:
            continue  # an older config's button keys: agent.config reads them
        reader = table.get(name)
        if reader is None:
            raise ConfigError(key, _unknown(kind, name, table, interface))
        values[name] = reader(value, key)
    return values


def _unknown(kind: str, name: str, table: Mapping[str, Reader], interface: str | None) -> str:
    for other, readers in _INTERFACE_OPTIONS.items():
        if name in readers and other != interface:
            return f"applies to interface {other} only; this {kind} uses {interface}"
    accepted = sorted(table)
    close = difflib.get_close_matches(name, accepted, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    known = ", ".join(accepted) if accepted else "none"
    return f"unknown option for a {kind} display; {guess}known: {known}"
