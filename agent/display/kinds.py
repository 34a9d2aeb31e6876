"""Every display type, once: ``display.type`` names a row of `KINDS`.

The config accepts exactly these names, the factory builds from them, the panel driver
takes each controller's colour mode and sizes from them, ``device-agent render`` offers
their geometries, and the service blanks only the types that burn in. A new type is a
row here (and its driver module), nothing else.

This module imports nothing heavy, and not `agent.config` (which reads it): options
readers and constructors are named by module and resolved on first use, so a
console-only device never loads PIL, luma or qrcode.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from agent.clock import Clock
    from agent.config import DisplayConfig
    from agent.display import Display

__all__ = ["KINDS", "CharacterSizes", "Family", "Kind"]

# oled: a luma.oled controller class of the same name; framebuffer: luma.core's.
Family = Literal["none", "console", "png", "oled", "framebuffer", "serial"]
# (type name, display.options) -> the checked options; raises ConfigError.
OptionsReader = Callable[[str, Mapping[str, Any]], Any]
# (config, checked options, clock) -> the display, or None for no display.
Constructor = Callable[["DisplayConfig", Any, "Clock | None"], "Display | None"]


@dataclass(frozen=True)
class CharacterSizes:
    """The few sizes a parallel-bus controller comes in, which luma cannot check
    without the bus itself."""

    label: str
    widths: tuple[int, ...]
    heights: tuple[int, ...]
    default: tuple[int, int]
    units: tuple[str, str]   # what width and height count


@dataclass(frozen=True, kw_only=True)
class Kind:
    name: str
    family: Family
    read_options: OptionsReader
    build: Constructor
    # Pixels luma drives by default; None where the hardware or the options decide.
    geometry: tuple[int, int] | None = None
    # What the layout draws in: "1", "L" (4-bit greyscale) or "RGB"; None for text.
    mode: str | None = None
    # Blanked blank_after seconds after sign-in, against burn-in; the console is not.
    burns_in: bool = True
    interfaces: tuple[str, ...] = ()   # the buses accepted, the default first
    bgr: bool = False                  # takes luma's bgr (blue-green-red pixels)
    sizes: CharacterSizes | None = None
    # Other common geometries of the same controller, offered by `render`.
    variants: Mapping[str, tuple[int, int]] = field(
        default_factory=lambda: MappingProxyType({}))


def _lazy(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = call.__name__ = target
    return call


_FACTORY: Final = "agent.display.factory"
_I2C_FIRST: Final = ("i2c", "spi")
_SPI_FIRST: Final = ("spi", "i2c")


def _oled(name: str, geometry: tuple[int, int], mode: str, interfaces: tuple[str, ...],
          **more: Any) -> Kind:
    return Kind(name=name, family="oled", read_options=_lazy(f"{_FACTORY}:panel_spec"),
                build=_lazy(f"{_FACTORY}:build_panel"), geometry=geometry, mode=mode,
                interfaces=interfaces, **more)


def _serial(name: str) -> Kind:
    return Kind(name=name, family="serial", read_options=_lazy(f"{_FACTORY}:left_to_driver"),
                build=_lazy(f"{_FACTORY}:build_serial"))


_ALL: Final = (
    Kind(name="none", family="none", read_options=_lazy(f"{_FACTORY}:left_to_driver"),
         build=_lazy(f"{_FACTORY}:build_nothing"), burns_in=False),
    Kind(name="console", family="console", read_options=_lazy(f"{_FACTORY}:no_options"),
         build=_lazy(f"{_FACTORY}:build_console"), burns_in=False),
    Kind(name="png", family="png", read_options=_lazy(f"{_FACTORY}:png_options"),
         build=_lazy(f"{_FACTORY}:build_png"), geometry=(128, 64), mode="1"),
    _oled("ssd1306", (128, 64), "1", _I2C_FIRST,
          variants=MappingProxyType({"ssd1306-32": (128, 32)})),
    _oled("ssd1309", (128, 64), "1", _I2C_FIRST),
    _oled("sh1106", (128, 64), "1", _I2C_FIRST),
    _oled("sh1107", (64, 128), "1", _I2C_FIRST),
    # 4-bit greyscale controllers: laid out in "L", handed to luma as RGB.
    _oled("ssd1322", (256, 64), "L", _SPI_FIRST),
    _oled("ssd1325", (128, 64), "L", _SPI_FIRST),
    _oled("ssd1327", (128, 128), "L", _SPI_FIRST),
    _oled("ssd1362", (256, 64), "L", _SPI_FIRST),
    _oled("ssd1331", (96, 64), "RGB", _SPI_FIRST),
    _oled("ssd1351", (128, 128), "RGB", _SPI_FIRST, bgr=True),
    # Winstar character OLEDs on a 6800-style parallel bus of GPIO pins.
    _oled("ws0010", (100, 16), "1", ("parallel",), sizes=CharacterSizes(
        "WS0010", (40, 60, 80, 100), (8, 16), (100, 16), ("pixels", "pixels"))),
    _oled("winstar_weh", (80, 16), "1", ("parallel",), sizes=CharacterSizes(
        "Winstar WEH", (8, 12, 16, 20), (1, 2), (16, 2), ("characters", "lines"))),
    Kind(name="linux_framebuffer", family="framebuffer",
         read_options=_lazy(f"{_FACTORY}:panel_spec"), build=_lazy(f"{_FACTORY}:build_panel"),
         mode="RGB", interfaces=("framebuffer",), bgr=True),
    _serial("terminal"),
    _serial("nextion"),
    _serial("charlcd"),
)

KINDS: Final[Mapping[str, Kind]] = MappingProxyType({kind.name: kind for kind in _ALL})
