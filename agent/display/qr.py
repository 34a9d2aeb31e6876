"""QR symbols as a plain grid of modules, for any renderer (terminal, PIL, serial).

The matrix carries no quiet zone: each renderer adds its own (the standard asks for 4
modules), in its own colour for "light". The `qrcode` library is imported on first use,
so a device whose display never shows a code does not pay for it at start-up.
"""

from __future__ import annotations

import functools
import importlib
import sys
from dataclasses import dataclass
from types import ModuleType

__all__ = ["QrMatrix", "qr_matrix"]

# Most robust first: a small panel gets the most error correction that still fits,
# because a code on a scratched or glaring screen is read through damage.
_LEVELS = ("H", "Q", "M", "L")
# Without a size limit, M: the usual balance between size and robustness for a screen.
_DEFAULT_LEVEL = "M"


@dataclass(frozen=True, kw_only=True)
class QrMatrix:
    """`modules[row][col]` is True for a dark module; `size` modules a side."""

    version: int
    error_correction: str
    size: int
    modules: tuple[tuple[bool, ...], ...]


def qr_matrix(data: str, *, max_modules: int | None = None) -> QrMatrix:
    """Encode `data` (UTF-8 bytes where it is not plain alphanumeric, chosen by qrcode).

    With `max_modules`, the highest error-correction level (H, Q, M, L) whose symbol is
    at most that many modules a side, quiet zone not counted. Raises ValueError when
    not even L fits (or, without a limit, when the data exceeds version 40 at M).
    """
    levels = _LEVELS if max_modules is not None else (_DEFAULT_LEVEL,)
    for level in levels:
        version = _fitting_version(data, level)
        if version is None:
            continue
        size = 4 * version + 17
        if max_modules is not None and size > max_modules:
            continue
        return _encode(data, level)
    limit = f" in {max_modules} modules" if max_modules is not None else ""
    raise ValueError(f"{len(data)} characters do not fit a QR code{limit}")


# qrcode's package imports its Pillow module drawers for backwards compatibility
# (qrcode/image/styles/moduledrawers/__init__.py, inside `except ImportError`), and with
# them Pillow: 4.6 MiB resident in a daemon whose console display never draws an image.
# A matrix needs none of it.
_PILLOW_DRAWERS = "qrcode.image.styles.moduledrawers.pil"


def _qrcode() -> ModuleType:
    """qrcode without Pillow. Its Pillow drawers are held back only while qrcode's
    package is first imported, and then offered lazily under their old names (PEP
    562), so code that asks for them still gets them, with Pillow."""
    if "qrcode" in sys.modules:
        return sys.modules["qrcode"]
    held_back = _PILLOW_DRAWERS not in sys.modules
    if held_back:
        sys.modules[_PILLOW_DRAWERS] = None  # type: ignore[assignment]
    try:
        import qrcode as module
    finally:
        if held_back and sys.modules.get(_PILLOW_DRAWERS, ...) is None:
            del sys.modules[_PILLOW_DRAWERS]
    if held_back:
        package = sys.modules[_PILLOW_DRAWERS.rpartition(".")[0]]

        def pillow_drawer(name: str) -> object:
            if name.startswith("__"):
                raise AttributeError(name)
            return getattr(importlib.import_module(_PILLOW_DRAWERS), name)

        package.__getattr__ = pillow_drawer  # type: ignore[method-assign]
    loaded: ModuleType = module
    return loaded


def _error_correction(level: str) -> int:
    constants = _qrcode().constants

    levels: dict[str, int] = {
        "L": constants.ERROR_CORRECT_L,
        "M": constants.ERROR_CORRECT_M,
        "Q": constants.ERROR_CORRECT_Q,
        "H": constants.ERROR_CORRECT_H,
    }
    return levels[level]


@functools.lru_cache(maxsize=32)
def _fitting_version(data: str, level: str) -> int | None:
    # Sizing alone is cheap; building the symbol scores all eight masks, which takes
    # long enough on a Pi Zero that rejected levels should not pay for it.
    qrcode = _qrcode()
    code = qrcode.QRCode(error_correction=_error_correction(level), border=0)
    code.add_data(data)
    try:
        code.best_fit()
    except qrcode.exceptions.DataOverflowError:
        return None
    return int(code.version)


@functools.lru_cache(maxsize=8)
def _encode(data: str, level: str) -> QrMatrix:
    # Cached: panels redraw every second during a countdown with the same code.
    code = _qrcode().QRCode(error_correction=_error_correction(level), border=0)
    code.add_data(data)
    code.make(fit=True)
    rows = tuple(tuple(bool(cell) for cell in row) for row in code.get_matrix())
    return QrMatrix(version=int(code.version), error_correction=level, size=len(rows),
                    modules=rows)
