"""An optional push button on a GPIO pin: a short press asks for a new code, a long one
starts a new sign-in.

The same actions are there without hardware through the API (`POST /v1/login`). The
button is wired between the pin and ground; the pin's internal pull-up is used, so no
resistor is needed. gpiozero (``pip install device-agent[gpio]``) is imported only when
a button is configured.

Options, read from ``display.options`` whatever the display type:

    button_pin      null    BCM GPIO number (17 is physical pin 11); null: no button
    button_hold     5       seconds held for a new sign-in (a number, or "5s")
    button_pull_up  true    false when the button pulls the pin up to 3.3 V instead

gpiozero calls back from its own threads; each action is handed to the event loop with
`loop.call_soon_threadsafe`, so the callbacks run on the loop like everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Final

from agent.config import parse_duration
from agent.errors import ConfigError

__all__ = ["BUTTON_OPTIONS", "DEFAULT_HOLD_TIME", "Button", "create_button"]

log = logging.getLogger(__name__)

BUTTON_OPTIONS: Final = frozenset({"button_pin", "button_hold", "button_pull_up"})
DEFAULT_HOLD_TIME: Final = 5.0
# A contact chatters for a few milliseconds; real pin factories filter below this.
_BOUNCE_TIME: Final = 0.05
_INSTALL_HINT: Final = "the button needs gpiozero: pip install device-agent[gpio]"


def _gpiozero() -> Any:
    try:
        import gpiozero
    except ImportError:
        raise ConfigError("display.options.button_pin", _INSTALL_HINT) from None
    return gpiozero


class Button:
    """A button on BCM pin `pin`. Released before `hold_time` seconds: `on_press`;
    held that long: `on_hold` (once, and the release that follows does nothing).

    Both run on `loop` (the running loop by default). `pin_factory` is gpiozero's (its
    `MockFactory` in tests); None lets gpiozero pick the Pi's.
    """

    def __init__(self, pin: int, *, on_press: Callable[[], object],
                 on_hold: Callable[[], object], hold_time: float = DEFAULT_HOLD_TIME,
                 pull_up: bool = True, pin_factory: Any = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        gpiozero = _gpiozero()
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._on_press = on_press
        self._on_hold = on_hold
        self._pin = pin
        # Set from gpiozero's hold thread, read from its pin thread.
        self._lock = threading.Lock()
        self._held = False
        self._device = gpiozero.Button(pin, pull_up=pull_up, bounce_time=_BOUNCE_TIME,
                                       hold_time=hold_time, hold_repeat=False,
                                       pin_factory=pin_factory)
        self._device.when_pressed = self._pressed
        self._device.when_held = self._was_held
        self._device.when_released = self._released

    @property
    def pin(self) -> int:
        return self._pin

    def close(self) -> None:
        self._device.close()

    # -- gpiozero's threads ----------------------------------------------------------------

    def _pressed(self) -> None:
        with self._lock:
            self._held = False

    def _was_held(self) -> None:
        with self._lock:
            self._held = True
        self._dispatch(self._on_hold, "hold")

    def _released(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if not held:
            self._dispatch(self._on_press, "press")

    def _dispatch(self, action: Callable[[], object], what: str) -> None:
        # A closed loop means the agent is shutting down; the press is moot.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._run, action, what)

    # -- the event loop --------------------------------------------------------------------

    def _run(self, action: Callable[[], object], what: str) -> None:
        log.info("button on GPIO%d: %s", self._pin,
                 "held, starting a new sign-in" if what == "hold" else "pressed, new code")
        try:
            action()
        except Exception:
            log.exception("the button's %s action failed", what)


def create_button(options: Mapping[str, Any], *, loop: asyncio.AbstractEventLoop,
                  on_press: Callable[[], object], on_hold: Callable[[], object],
                  pin_factory: Any = None) -> Button | None:
    """The button `options` (``display.options``) describe, or None without
    ``button_pin``. Bad options, or gpiozero missing, raise ConfigError; a pin that
    cannot be used (no GPIO on this machine, pin busy, no permission) is logged and
    None returned, so the agent runs on without it."""
    pin = options.get("button_pin")
    if pin is None:
        for name in ("button_hold", "button_pull_up"):
            if options.get(name) is not None:
                raise ConfigError(f"display.options.{name}",
                                  "has no effect without display.options.button_pin")
        return None
    if isinstance(pin, bool) or not isinstance(pin, int) or not 0 <= pin <= 53:
        shown = repr(pin) if isinstance(pin, str | int) else type(pin).__name__
        raise ConfigError("display.options.button_pin",
                          f"expected a BCM GPIO number from 0 to 53, got {shown}")
    hold_value = options.get("button_hold")
    hold = (DEFAULT_HOLD_TIME if hold_value is None
            else parse_duration(hold_value, "display.options.button_hold"))
    if hold <= 0:
        raise ConfigError("display.options.button_hold", "must be longer than 0 seconds")
    pull_up = options.get("button_pull_up", True)
    if not isinstance(pull_up, bool):
        raise ConfigError("display.options.button_pull_up", "expected true or false")
    gpiozero = _gpiozero()
    try:
        return Button(pin, on_press=on_press, on_hold=on_hold, hold_time=hold,
                      pull_up=pull_up, pin_factory=pin_factory, loop=loop)
    except (OSError, gpiozero.GPIOZeroError) as exc:
        log.warning("the button on GPIO%d is not available (%s: %s); the agent goes on "
                    "without it (POST /v1/login does the same)", pin, type(exc).__name__, exc)
        return None
