"""The GPIO button, on gpiozero's mock pins: the pin is driven from another thread, as
the real edge callbacks come, and the actions must arrive on the event loop."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory

from agent.display.button import Button, create_button
from agent.errors import ConfigError

PIN = 17
# Real seconds: gpiozero times the hold in its own thread. Tests of holding wait for
# the hold to fire before they release; tests of short presses use a long hold time,
# so a slow machine cannot turn their press into a hold.
HOLD = 0.1
LONG_HOLD = 5.0


class Recorder:
    """Callbacks that note the thread they ran on and wake the test."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.event = asyncio.Event()

    def action(self, name: str) -> Any:
        def run() -> None:
            self.calls.append((name, threading.get_ident()))
            self.event.set()
        return run

    async def wait(self) -> None:
        async with asyncio.timeout(2.0):
            await self.event.wait()
        self.event.clear()

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    made = MockFactory()
    yield made
    made.close()


async def press(factory: MockFactory) -> None:
    """Press (pull the pin low) and release, from another thread."""
    pin = factory.pin(PIN)
    await asyncio.to_thread(pin.drive_low)
    await asyncio.to_thread(pin.drive_high)


async def hold(factory: MockFactory, recorder: Recorder) -> None:
    """Press, wait for the hold action to arrive, release."""
    pin = factory.pin(PIN)
    await asyncio.to_thread(pin.drive_low)
    await recorder.wait()
    await asyncio.to_thread(pin.drive_high)


def make_button(factory: MockFactory, recorder: Recorder, hold_time: float) -> Button:
    return Button(PIN, on_press=recorder.action("press"), on_hold=recorder.action("hold"),
                  hold_time=hold_time, pin_factory=factory)


async def test_a_short_press_asks_for_a_new_code_once_on_the_loop(
        factory: MockFactory) -> None:
    recorder = Recorder()
    button = make_button(factory, recorder, LONG_HOLD)
    await press(factory)
    await recorder.wait()
    await asyncio.sleep(0.02)  # room for a second, wrong call to show up
    assert recorder.calls == [("press", threading.get_ident())]
    button.close()


async def test_holding_starts_a_new_sign_in_and_the_release_does_nothing_more(
        factory: MockFactory) -> None:
    recorder = Recorder()
    button = make_button(factory, recorder, HOLD)
    pin = factory.pin(PIN)
    await asyncio.to_thread(pin.drive_low)
    await recorder.wait()  # fires while still held, after HOLD seconds
    assert recorder.names == ["hold"]
    await asyncio.to_thread(pin.drive_high)
    await asyncio.sleep(0.02)
    assert recorder.calls == [("hold", threading.get_ident())]
    # And the next short press is a press again.
    await press(factory)
    await recorder.wait()
    assert recorder.names == ["hold", "press"]
    button.close()


async def test_a_failing_action_is_logged_and_the_button_keeps_working(
        factory: MockFactory, caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()

    def broken() -> None:
        recorder.event.set()
        raise RuntimeError("boom")

    button = Button(PIN, on_press=broken, on_hold=recorder.action("hold"), hold_time=HOLD,
                    pin_factory=factory)
    await press(factory)
    await recorder.wait()
    await asyncio.sleep(0)  # the rest of the failing callback
    assert any("press action failed" in r.getMessage() for r in caplog.records)
    await hold(factory, recorder)
    assert recorder.names == ["hold"]
    button.close()


# -- from config -------------------------------------------------------------------------


async def test_create_button_reads_the_display_options(factory: MockFactory) -> None:
    recorder = Recorder()
    loop = asyncio.get_running_loop()
    button = create_button({"button_pin": PIN, "button_hold": "0.1s"}, loop=loop,
                           on_press=recorder.action("press"),
                           on_hold=recorder.action("hold"), pin_factory=factory)
    assert button is not None and button.pin == PIN
    await hold(factory, recorder)
    assert recorder.names == ["hold"]
    button.close()


async def test_no_button_pin_means_no_button() -> None:
    loop = asyncio.get_running_loop()
    assert create_button({}, loop=loop, on_press=print, on_hold=print) is None
    assert create_button({"port": "/dev/ttyUSB0", "button_pin": None}, loop=loop,
                         on_press=print, on_hold=print) is None


@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        ({"button_pin": "GPIO17"}, "display.options.button_pin", "BCM GPIO number"),
        ({"button_pin": True}, "display.options.button_pin", "BCM GPIO number"),
        ({"button_pin": 99}, "display.options.button_pin", "from 0 to 53"),
        ({"button_pin": 17, "button_hold": "soon"}, "display.options.button_hold", ""),
        ({"button_pin": 17, "button_hold": 0}, "display.options.button_hold", "longer than 0"),
        ({"button_pin": 17, "button_pull_up": "yes"}, "display.options.button_pull_up",
         "true or false"),
        ({"button_hold": 5}, "display.options.button_hold", "without"),
    ],
)
async def test_bad_button_options_are_config_errors(options: dict[str, Any], key: str,
                                                    message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        create_button(options, loop=asyncio.get_running_loop(), on_press=print,
                      on_hold=print, pin_factory=MockFactory())
    assert caught.value.key == key
    assert message in caught.value.message


async def test_a_pin_that_cannot_be_used_is_logged_and_the_agent_goes_on(
        factory: MockFactory, caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    first = create_button({"button_pin": PIN}, loop=loop, on_press=print, on_hold=print,
                          pin_factory=factory)
    assert first is not None
    with caplog.at_level(logging.WARNING):
        second = create_button({"button_pin": PIN}, loop=loop, on_press=print,
                               on_hold=print, pin_factory=factory)
    assert second is None
    assert "GPIO17 is not available" in caplog.text
    first.close()


async def test_without_gpiozero_the_error_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gpiozero", None)  # import gpiozero fails
    with pytest.raises(ConfigError) as caught:
        create_button({"button_pin": PIN}, loop=asyncio.get_running_loop(), on_press=print,
                      on_hold=print)
    assert "pip install device-agent[gpio]" in caught.value.message


# -- the agent's button: section, end to end ---------------------------------------------

OFFLINE_ISSUER = "http://127.0.0.1:9/application/o/x/"


async def run_agent_with_button(tmp_path: Any, factory: MockFactory,
                                monkeypatch: pytest.MonkeyPatch, config_text: str) -> None:
    """Start the agent from `config_text`, press the button, hold it; both actions
    must reach the driver."""
    import gpiozero

    from agent.config import load_config
    from agent.driver import Driver
    from agent.service import driver_settings, serve

    # The agent passes no pin factory: gpiozero's default is the one it uses on a Pi.
    monkeypatch.setattr(gpiozero.Device, "pin_factory", factory)
    recorder = Recorder()
    monkeypatch.setattr(Driver, "request_login", lambda self, new_sign_in=False:
                        recorder.action("hold" if new_sign_in else "press")())
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"provider: {{issuer: '{OFFLINE_ISSUER}', client_id: x, allow_insecure_http: true}}\n"
        f"storage: {{path: '{tmp_path / 'state' / 'credentials.json'}'}}\n"
        f"api: {{socket: '{tmp_path / 'agent.sock'}'}}\n" + config_text)
    config = load_config(path)
    assert driver_settings(config).button
    ready: asyncio.Future[Driver] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    agent = asyncio.create_task(serve(config, shutdown=stop.wait(),
                                      on_ready=ready.set_result))
    try:
        await asyncio.wait_for(ready, 5)
        await press(factory)
        await recorder.wait()
        await hold(factory, recorder)
        assert recorder.names == ["press", "hold"]
    finally:
        stop.set()
        await asyncio.wait_for(agent, 5)


async def test_the_button_section_drives_the_agent(
        tmp_path: Any, factory: MockFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    await run_agent_with_button(tmp_path, factory, monkeypatch,
                                "display: {type: none}\n"
                                f"button: {{pin: {PIN}, hold: {HOLD}s}}\n")


async def test_a_button_configured_the_old_way_still_drives_the_agent(
        tmp_path: Any, factory: MockFactory, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "agent.config"):
        await run_agent_with_button(
            tmp_path, factory, monkeypatch,
            "display:\n  type: none\n"
            f"  options: {{button_pin: {PIN}, button_hold: {HOLD}}}\n")
    moved = [r.getMessage() for r in caplog.records
             if r.name == "agent.config" and "button.pin" in r.getMessage()]
    assert len(moved) == 1
