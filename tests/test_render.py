"""``device-agent render``: every screen on every panel, as the agent would draw it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from PIL import Image

from agent.display.render import DEFAULT_URI, PANELS, SCREENS, register, synthetic_screen
from tests.qrscan import HUNDRED
from tests.test_layout import decode


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="device-agent")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["render", *argv])
    status: int = args.func(args)
    return status


@pytest.mark.parametrize("panel", sorted(PANELS))
def test_the_code_screen_on_every_panel(panel: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"{panel}.png"
    assert run("--panel", panel, "--screen", "code", "--out", str(out), "--scale", "2") == 0
    geometry = PANELS[panel]
    with Image.open(out) as image:
        assert image.size == (geometry.width * 2, geometry.height * 2)
        found = decode(image, scale=2)
    said = capsys.readouterr().out
    if geometry.height < 33:
        assert found == []
        assert "no QR code: no room" in said
    else:
        assert found == [DEFAULT_URI]
        assert "QR version" in said


@pytest.mark.parametrize("screen", SCREENS)
def test_every_screen_renders(screen: str, tmp_path: Path) -> None:
    for panel in ("ssd1306", "ssd1306-32", "ssd1322"):
        out = tmp_path / f"{panel}-{screen}.png"
        assert run("--panel", panel, "--screen", screen, "--out", str(out)) == 0
        with Image.open(out) as image:
            assert (image.getbbox() is None) == (screen == "blank")


def test_options_reach_the_screen(tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    assert run("--panel", "ssd1351", "--out", str(out), "--uri", HUNDRED, "--code", "WDJBMJHT",
               "--name", "Hall", "--progress", "0.1") == 0
    with Image.open(out) as image:
        assert decode(image) == [HUNDRED]
    screen = synthetic_screen("code", uri=HUNDRED, code="WDJBMJHT", name="Hall",
                              progress=0.1)
    assert screen.user_code_display == "WDJBMJHT"
    assert screen.user_code_groups == ("WDJB", "MJHT")
    assert screen.device_name == "Hall"
    assert screen.url == HUNDRED.split("?")[0].removeprefix("https://")
    assert screen.progress == pytest.approx(0.1)


def test_rotate_swaps_width_and_height(tmp_path: Path) -> None:
    out = tmp_path / "portrait.png"
    assert run("--panel", "ssd1306", "--rotate", "1", "--out", str(out)) == 0
    with Image.open(out) as image:
        assert image.size == (64, 128)
        assert decode(image) == [DEFAULT_URI]


def test_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("--out", str(tmp_path / "x.png"), "--scale", "0") == 2
    assert run("--out", str(tmp_path / "x.png"), "--progress", "2") == 2
    assert run("--out", str(tmp_path / "no" / "such" / "dir.png")) == 73
    assert "cannot write" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("--panel", "st7789", "--out", str(tmp_path / "x.png"))


def test_times_on_the_pictures_do_not_depend_on_the_machine() -> None:
    screen = synthetic_screen("code_expired")
    assert screen.lines == ("Next code at 12:05",)


def test_render_draws_each_page_of_a_paged_code_screen(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # Issue 10 item 4: the 100-character URI does not fit beside the QR code on 128x64.
    first, second = tmp_path / "1.png", tmp_path / "2.png"
    assert run("--panel", "ssd1306", "--uri", HUNDRED, "--out", str(first)) == 0
    assert "page 1 of 2" in capsys.readouterr().out
    assert run("--panel", "ssd1306", "--uri", HUNDRED, "--page", "2", "--out", str(second)) == 0
    said = capsys.readouterr().out
    assert "page 2 of 2" in said and "URL shortened" not in said
    with Image.open(first) as image:
        assert decode(image) == [HUNDRED]
    with Image.open(second) as image:
        assert decode(image) == []
    assert run("--panel", "ssd1306", "--page", "0", "--out", str(first)) == 2
