"""The display registry (`agent.display.kinds`): the one table of display types, and
everything that used to keep its own list reads it."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from luma.core.interface.serial import noop

from agent.config import DISPLAY_TYPES, DisplayConfig, config_from_mapping
from agent.display.factory import create_display, panel_spec
from agent.display.kinds import KINDS
from agent.errors import ConfigError

AGENT = Path(__file__).resolve().parent.parent / "agent"
# The serial driver keeps its own option table per serial type; it is the driver
# module, which a new type of its own touches anyway.
DRIVER_MODULES = {AGENT / "display" / "kinds.py", AGENT / "display" / "serial.py"}
# What some types cannot be built without.
REQUIRED: dict[str, dict[str, Any]] = {"serial": {"port": "loop://"}}

pytestmark = pytest.mark.filterwarnings(
    "ignore:Image.Image.getdata is deprecated:DeprecationWarning")


def lists_of_types(tree: ast.AST) -> list[tuple[int, list[str]]]:
    """Literal collections (sets, lists, tuples, dict keys) naming two types or more."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Set | ast.List | ast.Tuple):
            items: list[ast.expr | None] = list(node.elts)
        elif isinstance(node, ast.Dict):
            items = list(node.keys)
        else:
            continue
        names = [item.value for item in items
                 if isinstance(item, ast.Constant) and item.value in KINDS]
        if len(names) >= 2:
            found.append((node.lineno, names))
    return found


def test_the_registry_is_the_only_place_that_lists_display_types() -> None:
    found = {}
    for path in sorted(AGENT.rglob("*.py")):
        if path in DRIVER_MODULES:
            continue
        listed = lists_of_types(ast.parse(path.read_text(), str(path)))
        if listed:
            found[str(path.relative_to(AGENT))] = listed
    assert found == {}


def test_the_serial_driver_serves_the_registrys_serial_types() -> None:
    from agent.display.serial import SERIAL_DISPLAY_TYPES

    assert {name for name, kind in KINDS.items() if kind.family == "serial"} == (
        SERIAL_DISPLAY_TYPES)


def test_config_accepts_exactly_the_registrys_types() -> None:
    assert frozenset(KINDS) == DISPLAY_TYPES
    for name in KINDS:
        data: dict[str, Any] = {"type": name, "path": "/tmp/frame.png"}
        config = config_from_mapping({"provider": {"issuer": "https://a.example/x/",
                                                   "client_id": "x"}, "display": data})
        assert config.display.type == name
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"provider": {"issuer": "https://a.example/x/",
                                          "client_id": "x"}, "display": {"type": "oled"}})
    assert caught.value.key == "display.type"
    listed = caught.value.message.split("one of: ", 1)[1].split(", ")
    assert listed == sorted(KINDS)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_type_builds_through_the_factory(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    config = DisplayConfig(type=name, path=tmp_path / "frame.png",
                           options=REQUIRED.get(kind.family, {}))
    display = create_display(config)
    assert (display is None) == (name == "none")
    if display is not None:
        assert type(display).__module__.startswith("agent.display.")


class _Bus(noop):  # type: ignore[misc]
    """luma's noop interface, with the bus width its parallel controllers ask for."""

    _bitmode = 4


@pytest.mark.parametrize("name", sorted(n for n, k in KINDS.items() if k.family == "oled"))
def test_each_oled_type_is_luma_class_of_the_registrys_geometry_and_mode(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.display.oled as oled

    monkeypatch.setattr(oled, "_interface", lambda spec: _Bus())
    kind = KINDS[name]
    spec = panel_spec(name, {})
    assert spec.interface == kind.interfaces[0]
    device = oled.open_panel(spec)
    device.persist = True  # nothing to switch off: it never drove a panel
    assert (device.width, device.height) == kind.geometry
    assert oled.panel_mode(spec) == kind.mode
    assert ("RGB" if kind.mode == "L" else kind.mode) == device.mode


def test_render_offers_the_registrys_panels() -> None:
    from agent.display.render import PANELS, Panel

    expected: dict[str, Panel] = {}
    for name, kind in KINDS.items():
        if kind.family != "oled":
            continue
        assert kind.geometry is not None and kind.mode is not None
        expected[name] = Panel(*kind.geometry, kind.mode)
        for variant, (width, height) in kind.variants.items():
            expected[variant] = Panel(width, height, kind.mode)
    assert expected == PANELS


def test_only_displays_that_burn_in_are_blanked() -> None:
    assert {name for name, kind in KINDS.items() if not kind.burns_in} == {"console", "none"}
    assert all(KINDS[name].burns_in for name in KINDS if KINDS[name].family == "oled")
