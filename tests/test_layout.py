"""The layout engine, checked on its pixels: QR codes are decoded with zxing from the
rendered frame, on every geometry, and the rules (module size, quiet zone, polarity,
text that fits) are checked where they can be seen.

The same frames pushed through luma's real drivers are decoded in test_oled.py."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
import zxingcpp
from PIL import Image, ImageChops, ImageFont

from agent.display import layout
from agent.display.layout import Frame, compose, render
from agent.display.screens import Screen, build_screen
from agent.state import Phase, Snapshot
from tests.qrscan import AUTHENTIK, LONGER_HOST, URIS

NOW_MONO = 10_000.0
NOW_WALL = datetime(2027, 1, 15, 12, 0, tzinfo=UTC).timestamp()


# (width, height, mode) of the panels the agent supports, and portrait for rotate=1/3.
QR_GEOMETRIES = [(128, 64, "1"), (256, 64, "L"), (128, 128, "L"), (128, 128, "RGB"),
                 (96, 64, "RGB"), (64, 128, "1")]
ALL_GEOMETRIES = [*QR_GEOMETRIES, (128, 32, "1")]
GEOMETRY_IDS = [f"{w}x{h}-{m}" for w, h, m in ALL_GEOMETRIES]
KINDS = ["starting", "no_network", "code_expired", "throttled", "denied", "signed_in",
         "refresh_failing", "config_error", "stopping"]


@pytest.fixture(autouse=True)
def fresh_layout_cache() -> None:
    # Tests below patch the layout's rules; a frame cached by another test must not
    # answer for them.
    layout._base.cache_clear()


def code_screen(uri: str = AUTHENTIK, *, code: str = "123456789", elapsed: float = 15.0,
                name: str = "Kitchen display", page: int = 0) -> Screen:
    """The code screen `elapsed` seconds in, on `page` (the QR code's, unless asked)."""
    snapshot = Snapshot(phase=Phase.AWAITING_USER, device_name=name, user_code=code,
                        verification_uri=uri.split("?")[0], verification_uri_complete=uri,
                        code_deadline=NOW_MONO + 60)
    return dataclasses.replace(
        build_screen(snapshot, now_mono=NOW_MONO + elapsed, now_wall=NOW_WALL + elapsed,
                     code_lifetime=60, tz=UTC), page=page)


def text_screen(kind: str) -> Screen:
    details: dict[str, dict[str, object]] = {
        "no_network": {"last_error": "cannot reach auth.example.com"},
        "code_expired": {"next_code_at": NOW_WALL + 300},
        "throttled": {"next_code_at": NOW_WALL + 900},
        "denied": {"next_code_at": NOW_WALL + 300},
        "signed_in": {"user": "alice", "token_expires_at": NOW_WALL + 3600},
        "refresh_failing": {"token_expires_at": NOW_WALL + 1200,
                            "last_error": "provider unreachable"},
        "config_error": {"last_error": "invalid_client: unknown client"},
    }
    fields = details.get(kind, {})
    snapshot = Snapshot(phase=Phase(kind), device_name="Kitchen display",
                        **fields)  # type: ignore[arg-type]
    return build_screen(snapshot, now_mono=NOW_MONO, now_wall=NOW_WALL, tz=UTC)


def decode(image: Image.Image, *, scale: int = 4, bezel: int = 8) -> list[str]:
    """QR texts in `image` as a phone would see the panel: surrounded by its dark,
    unlit bezel (so the drawn quiet zone is all the quiet zone there is), enlarged."""
    grey = image.convert("L")
    framed = Image.new("L", (grey.width + 2 * bezel, grey.height + 2 * bezel), 0)
    framed.paste(grey, (bezel, bezel))
    big = framed.resize((framed.width * scale, framed.height * scale), Image.Resampling.NEAREST)
    # No inversion: a code that only scans light-on-dark is not good enough for phones.
    found = zxingcpp.read_barcodes(big, try_invert=False)
    return [barcode.text for barcode in found if barcode.format == zxingcpp.BarcodeFormat.QRCode]


def light_value(mode: str) -> int | tuple[int, int, int]:
    values: dict[str, int | tuple[int, int, int]] = {"1": 1, "L": 255, "RGB": (255, 255, 255)}
    return values[mode]


# -- the QR code scans ------------------------------------------------------------------


@URIS
@pytest.mark.parametrize(("width", "height", "mode"), QR_GEOMETRIES,
                         ids=[f"{w}x{h}-{m}" for w, h, m in QR_GEOMETRIES])
def test_the_qr_code_in_the_frame_decodes_to_the_uri(uri: str, width: int, height: int,
                                                      mode: str) -> None:
    frame = compose(code_screen(uri), width=width, height=height, mode=mode)
    assert frame.image.size == (width, height)
    assert frame.image.mode == mode
    assert frame.qr is not None, frame.qr_omitted
    assert decode(frame.image) == [uri]


@URIS
def test_128x32_shows_the_url_and_code_as_text_and_says_why_there_is_no_qr(uri: str) -> None:
    frame = compose(code_screen(uri), width=128, height=32, mode="1")
    assert frame.qr is None
    assert frame.qr_omitted is not None and "128x32" in frame.qr_omitted
    assert decode(frame.image) == []
    assert frame.image.getbbox() is not None
    assert "123 456 789" in frame.text
    # Without a QR code the URL is the only way in: it is shown whole, wrapped, even
    # the long ones, in the small bitmap font made for these sizes.
    assert not frame.url_shortened
    assert uri.split("//")[1].split("?")[0] == "".join(
        line for line in frame.text if line != "123 456 789" and line != "Kitchen display")


def test_data_too_long_for_any_qr_code_falls_back_to_text() -> None:
    huge = "https://auth.example.com/device?code=123456789&pad=" + "x" * 3000
    frame = compose(code_screen(huge), width=256, height=64, mode="L")
    assert frame.qr is None
    assert frame.qr_omitted == "the URL is too long for any QR code"
    assert "123 456 789" in frame.text


# -- the QR rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "mode", "uri", "module"),
    [(128, 64, "1", AUTHENTIK, 1), (256, 64, "L", AUTHENTIK, 1), (128, 128, "L", AUTHENTIK, 2),
     (96, 64, "RGB", AUTHENTIK, 1), (128, 64, "1", "https://a.io/d?c=123456789", 2),
     (256, 64, "L", "https://a.io/d?c=123456789", 2)])
def test_module_size_is_the_largest_that_fits(width: int, height: int, mode: str, uri: str,
                                              module: int) -> None:
    frame = compose(code_screen(uri), width=width, height=height, mode=mode)
    assert frame.qr is not None
    assert frame.qr.module_size == module
    # One more pixel per module would not fit even the smallest symbol with 2 modules
    # of quiet zone beside a legible code (the text needs some of the panel).
    side = frame.qr.box[2] - frame.qr.box[0]
    assert side == (4 * frame.qr.version + 17 + 2 * frame.qr.quiet_zone) * module
    assert decode(frame.image) == [uri]


@pytest.mark.parametrize(("width", "height", "mode"), QR_GEOMETRIES,
                         ids=[f"{w}x{h}-{m}" for w, h, m in QR_GEOMETRIES])
def test_qr_is_dark_on_light_inside_a_light_quiet_zone(width: int, height: int,
                                                       mode: str) -> None:
    frame = compose(code_screen(), width=width, height=height, mode=mode)
    qr = frame.qr
    assert qr is not None
    assert qr.quiet_zone >= 2
    left, top, right, bottom = qr.box
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    image = frame.image
    light = light_value(mode)
    margin = qr.quiet_zone * qr.module_size
    for x in range(left, right):
        for y in [*range(top, top + margin), *range(bottom - margin, bottom)]:
            assert image.getpixel((x, y)) == light
    for y in range(top, bottom):
        for x in [*range(left, left + margin), *range(right - margin, right)]:
            assert image.getpixel((x, y)) == light
    # The finder pattern's corner module is dark, its ring light, its centre dark.
    corner = (left + margin, top + margin)
    assert image.getpixel(corner) != light
    step = qr.module_size
    assert image.getpixel((corner[0] + step, corner[1] + step)) == light
    assert image.getpixel((corner[0] + 3 * step, corner[1] + 3 * step)) != light


@pytest.mark.parametrize(("width", "height", "mode"), QR_GEOMETRIES,
                         ids=[f"{w}x{h}-{m}" for w, h, m in QR_GEOMETRIES])
def test_error_correction_is_the_highest_that_fits_without_costing_the_url(
        width: int, height: int, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stronger level is given up only for what ranks above it: the URL whole, a
    # larger quiet zone, a larger code. Offered only the stronger levels, the layout
    # must lose one of those.
    chosen = compose(code_screen(), width=width, height=height, mode=mode)
    assert chosen.qr is not None
    rank = "LMQH".index
    options = layout._qr_options(AUTHENTIK)
    stronger = tuple(option for option in options
                     if rank(option.level) > rank(chosen.qr.error_correction))
    if not stronger:
        assert chosen.qr.error_correction == "H"
        return
    monkeypatch.setattr(layout, "_qr_options", lambda data: stronger)
    layout._base.cache_clear()
    forced = compose(code_screen(), width=width, height=height, mode=mode)

    def code_extent(frame: Frame) -> tuple[int, int]:
        return max((bottom - top, right - left)
                   for line, (left, top, right, bottom) in zip(frame.text, frame.boxes,
                                                               strict=True)
                   if line.replace(" ", "").isdigit())

    assert (forced.qr is None or forced.url_shortened > chosen.url_shortened
            or forced.qr.quiet_zone < chosen.qr.quiet_zone
            or code_extent(forced) < code_extent(chosen)
            or forced.qr.module_size < chosen.qr.module_size)


def test_without_a_quiet_zone_the_frame_does_not_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    # The decoder check is real: a symbol flush against the dark panel does not scan.
    monkeypatch.setattr(layout, "QUIET_ZONES", (0,))
    frame = compose(code_screen(), width=128, height=64, mode="1")
    assert frame.qr is not None and frame.qr.quiet_zone == 0
    assert decode(frame.image) == []


def test_one_module_of_quiet_zone_is_enough_for_zxing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Why 2 is the floor: zxing manages with 1, and phones get a margin on top of that.
    monkeypatch.setattr(layout, "QUIET_ZONES", (1,))
    frame = compose(code_screen(), width=128, height=64, mode="1")
    assert frame.qr is not None and frame.qr.quiet_zone == 1
    assert decode(frame.image) == [AUTHENTIK]


def test_light_on_dark_does_not_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    original = layout._palette

    def inverted(mode: str) -> layout._Palette:
        palette = original(mode)
        return dataclasses.replace(palette, light=palette.dark, dark=palette.light)

    monkeypatch.setattr(layout, "_palette", inverted)
    frame = compose(code_screen(), width=128, height=64, mode="1")
    assert frame.qr is not None
    assert decode(frame.image) == []


# -- text -------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height", "mode"), ALL_GEOMETRIES, ids=GEOMETRY_IDS)
def test_the_code_is_always_shown_whole_and_grouped(width: int, height: int, mode: str) -> None:
    frame = compose(code_screen(LONGER_HOST), width=width, height=height, mode=mode)
    text = " ".join(frame.text)
    assert "123 456 789" in text or ("123" in frame.text and "456" in frame.text
                                     and "789" in frame.text)


@pytest.mark.parametrize(("width", "height", "mode"), QR_GEOMETRIES,
                         ids=[f"{w}x{h}-{m}" for w, h, m in QR_GEOMETRIES])
def test_the_authentik_url_is_shown_whole(width: int, height: int, mode: str) -> None:
    frame = compose(code_screen(), width=width, height=height, mode=mode)
    assert not frame.url_shortened
    assert "auth.example.com/device" in "".join(frame.text)


def test_a_long_code_shrinks_but_is_never_cut() -> None:
    code = "ABCDEFGHJKLMNPQRSTUV"
    frame = compose(code_screen(code=code), width=96, height=64, mode="RGB")
    assert code in "".join(frame.text)


def test_letter_codes_are_drawn_as_issued_with_their_groups_apart() -> None:
    # Issue 10 item 6: a dash drawn between the groups was typed, and refused by a
    # provider that compares codes exactly (django-oauth-toolkit).
    frame = compose(code_screen(code="WDJBMJHT"), width=256, height=64, mode="L")
    assert "WDJB MJHT" in frame.text or ("WDJB" in frame.text and "MJHT" in frame.text)
    assert not any("-" in line for line in frame.text if "WDJB" in line or "MJHT" in line)


@pytest.mark.parametrize(("width", "height", "mode"), [(128, 64, "1"), (256, 64, "L")])
def test_zeros_in_a_code_of_letters_and_digits_are_slashed(
        width: int, height: int, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.display.layout as layout

    screen = code_screen(code="0V1LA9KQ")
    slashed = compose(screen, width=width, height=height, mode=mode).image
    monkeypatch.setattr(layout, "_slash_zeros", lambda *args: None)
    layout._base.cache_clear()  # frames are cached by screen
    plain = compose(screen, width=width, height=height, mode=mode).image
    changed = ImageChops.difference(slashed.convert("L"), plain.convert("L")).getbbox()
    assert changed is not None, "no slash drawn"
    # Only inside the zero, the first glyph of the code: not across the other letters.
    left, top, right, bottom = changed
    assert right - left <= height // 3 and bottom - top <= height // 2
    # A code of digits alone has no O to be taken for: no slash.
    digits = code_screen(code="012345678")
    monkeypatch.undo()
    layout._base.cache_clear()
    assert compose(digits, width=width, height=height, mode=mode).image.tobytes() == (
        _unslashed(digits, width, height, mode, monkeypatch))


def _unslashed(screen: Screen, width: int, height: int, mode: str,
               monkeypatch: pytest.MonkeyPatch) -> bytes:
    import agent.display.layout as layout

    monkeypatch.setattr(layout, "_slash_zeros", lambda *args: None)
    layout._base.cache_clear()
    try:
        return compose(screen, width=width, height=height, mode=mode).image.tobytes()
    finally:
        monkeypatch.undo()
        layout._base.cache_clear()


def test_text_stays_inside_the_panel() -> None:
    # Text is measured the way it is drawn: 1-bit glyphs are wider than anti-aliased
    # ones, and a URL measured the wrong way runs off the right edge.
    for width, height, mode in ALL_GEOMETRIES:
        frame = compose(code_screen(), width=width, height=height, mode=mode)
        padded = Image.new(mode, (width + 20, height + 20))
        padded.paste(frame.image, (10, 10))
        assert padded.getbbox() is not None
        left, top, right, bottom = padded.getbbox()  # type: ignore[misc]
        assert left >= 10 and top >= 10 and right <= width + 10 and bottom <= height + 10


def test_control_characters_from_the_network_are_not_drawn() -> None:
    snapshot = Snapshot(phase=Phase.SIGNED_IN, device_name="Kitchen display",
                        user="mallory\x1b]0;owned\x07")
    screen = build_screen(snapshot, now_mono=NOW_MONO, now_wall=NOW_WALL, tz=UTC)
    frame = compose(screen, width=256, height=64, mode="L")
    assert any("mallory?]0;owned?" in line for line in frame.text)
    assert not any("\x1b" in line or "\x07" in line for line in frame.text)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("width", "height", "mode"), ALL_GEOMETRIES, ids=GEOMETRY_IDS)
def test_every_screen_kind_renders_with_its_title(kind: str, width: int, height: int,
                                                  mode: str) -> None:
    screen = text_screen(kind)
    frame = compose(screen, width=width, height=height, mode=mode)
    assert frame.qr is None and frame.qr_omitted is None
    assert frame.image.getbbox() is not None
    assert screen.title in " ".join(frame.text)


def test_an_error_longer_than_the_panel_is_cut_with_an_ellipsis() -> None:
    screen = Screen(kind="config_error", title="Config error",
                    lines=("invalid_client: " + "client authentication failed " * 8,))
    frame = compose(screen, width=128, height=64, mode="1")
    assert frame.text[0] == "Config error"
    assert frame.text[-1].endswith("...")


def test_blank_is_an_all_black_frame() -> None:
    for mode in ("1", "L", "RGB"):
        image = render(Screen(kind="blank", title="", lines=()), width=128, height=64,
                       mode=mode)
        assert image.getbbox() is None


# -- the countdown ----------------------------------------------------------------------


def test_only_the_countdown_bar_changes_from_second_to_second() -> None:
    early = compose(code_screen(elapsed=5), width=128, height=64, mode="1")
    late = compose(code_screen(elapsed=45), width=128, height=64, mode="1")
    changed = [(x, y) for y in range(64) for x in range(128)
               if early.image.getpixel((x, y)) != late.image.getpixel((x, y))]
    assert changed
    rows = {y for _, y in changed}
    assert max(rows) - min(rows) < 3  # the bar, and nothing else, moved
    # Less time left, a shorter bar.
    lit_early = sum(1 for x in range(128) if early.image.getpixel((x, max(rows))))
    lit_late = sum(1 for x in range(128) if late.image.getpixel((x, max(rows))))
    assert lit_early > lit_late


def test_colour_bar_turns_red_as_the_code_runs_out() -> None:
    def bar_colour(elapsed: float) -> object:
        frame = compose(code_screen(elapsed=elapsed), width=96, height=64, mode="RGB")
        return frame.image.getpixel((0, 63))

    assert bar_colour(5) == (60, 220, 90)
    assert bar_colour(40) == (255, 180, 0)
    assert bar_colour(55) == (240, 60, 50)


def test_no_bar_without_a_known_lifetime() -> None:
    screen = dataclasses.replace(code_screen(), progress=None)
    with_bar = compose(code_screen(elapsed=0), width=128, height=64, mode="1")
    without = compose(screen, width=128, height=64, mode="1")
    assert with_bar.image.tobytes() != without.image.tobytes()
    assert decode(without.image) == [AUTHENTIK]


def test_rendering_is_deterministic_and_returns_a_fresh_image() -> None:
    first = render(code_screen(), width=256, height=64, mode="L")
    first.putpixel((0, 0), 128)
    layout._base.cache_clear()
    second = render(code_screen(), width=256, height=64, mode="L")
    third = render(code_screen(), width=256, height=64, mode="L")
    assert second.getpixel((0, 0)) == 0
    assert second.tobytes() == third.tobytes()


# -- odd inputs -------------------------------------------------------------------------


def test_a_bad_mode_or_size_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        render(code_screen(), width=128, height=64, mode="RGBA")
    with pytest.raises(ValueError, match="1x1"):
        render(code_screen(), width=0, height=64, mode="1")


@pytest.mark.parametrize(("width", "height"), [(1, 1), (16, 8), (100, 16), (80, 16),
                                               (480, 320), (800, 480)])
def test_any_size_renders_without_error(width: int, height: int) -> None:
    frame = compose(code_screen(), width=width, height=height, mode="RGB")
    assert frame.image.size == (width, height)
    if min(width, height) >= 64:
        assert decode(frame.image) == [AUTHENTIK]


def test_bitmap_font_fallback_without_freetype(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow built without FreeType has only a small bitmap font, of one size and
    # Latin-1 only; the layout must still fit text with it.
    bitmap = ImageFont.load_default_imagefont()
    monkeypatch.setattr(layout, "_font", lambda size: bitmap)
    monkeypatch.setattr(layout, "_scalable", lambda: False)
    monkeypatch.setattr(layout, "_TYPE", layout._Type())
    screen = dataclasses.replace(code_screen(), device_name="Küche \u2603")
    frame: Frame = compose(screen, width=256, height=64, mode="L")
    assert decode(frame.image) == [AUTHENTIK]
    assert "123 456 789" in frame.text


# -- issue 10 item 4: a URL that does not fit beside the QR code gets a page of its own --

# Panels of 128x64 and up, a rotated 128x64 (64x128) among them.
PAGED_GEOMETRIES = [g for g in QR_GEOMETRIES if g[0] * g[1] >= 128 * 64]


@pytest.mark.parametrize(("width", "height", "mode"), PAGED_GEOMETRIES,
                         ids=[f"{w}x{h}-{m}" for w, h, m in PAGED_GEOMETRIES])
@URIS
def test_the_url_is_legible_in_full_on_one_page_or_the_other(
        uri: str, width: int, height: int, mode: str) -> None:
    from agent.display.screens import short_url

    url = short_url(uri.split("?")[0])
    first = compose(code_screen(uri, page=0), width=width, height=height, mode=mode)
    assert decode(first.image) == [uri]
    if not first.url_shortened:
        assert first.pages == 1
        return
    assert first.pages == 2 and first.page == 0
    second = compose(code_screen(uri, page=1), width=width, height=height, mode=mode)
    assert second.page == 1 and second.qr is None
    assert not second.url_shortened
    assert url in "".join(second.text)
    assert "".join(code_screen(uri).user_code_groups) in "".join(second.text).replace(" ", "")
    # The countdown bar is on both pages.
    assert compose(code_screen(uri, page=3), width=width, height=height,
                   mode=mode).image.tobytes() == second.image.tobytes()


def test_pages_turn_every_few_seconds_from_the_codes_arrival() -> None:
    from agent.display.screens import PAGE_SECONDS

    snapshot = Snapshot(phase=Phase.AWAITING_USER, device_name=None, user_code="123456789",
                        verification_uri="https://auth.example.com/device",
                        verification_uri_complete=AUTHENTIK, code_deadline=NOW_MONO + 60)

    def page_at(elapsed: float) -> int:
        return build_screen(snapshot, now_mono=NOW_MONO + elapsed, now_wall=NOW_WALL,
                            code_lifetime=60).page

    assert page_at(0) == 0 and page_at(PAGE_SECONDS - 0.1) == 0
    assert page_at(PAGE_SECONDS) == 1 and page_at(2 * PAGE_SECONDS) == 2


def test_zeros_are_slashed_in_a_stacked_group_of_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    # "0000ABCD" stacks as "0000" / "ABCD" on 128x64: the first line alone holds no
    # letter, and its zeros are those of a code that has O's beside them.
    slashed: list[str] = []
    monkeypatch.setattr(layout, "_slash_zeros", lambda ts, draw, line, *rest: slashed.append(line))
    compose(code_screen(code="0000ABCD"), width=128, height=64, mode="1")
    assert any("0000" in line for line in slashed), slashed


@pytest.mark.parametrize(("width", "height"), [(64, 128), (32, 128)])
def test_a_code_with_its_own_dash_is_stacked_not_left_out(width: int, height: int) -> None:
    frame = compose(code_screen(code="WDJB-MJHT"), width=width, height=height, mode="1")
    assert "WDJB-" in frame.text and "MJHT" in frame.text


@pytest.mark.parametrize(("width", "height"), [(64, 128), (128, 64)])
def test_a_long_code_of_no_known_shape_is_stacked_in_pieces_not_left_out(
        width: int, height: int) -> None:
    code = "ABCDEFGHJKLMNPQRSTUV"
    frame = compose(code_screen(code=code), width=width, height=height, mode="1")
    assert code in "".join(frame.text), frame.text


@pytest.mark.parametrize("uri", [AUTHENTIK, LONGER_HOST], ids=["authentik", "longer-host"])
@pytest.mark.parametrize("kind", ["code", *KINDS])
def test_128x128_mono_grey_and_colour_panels_share_one_layout(uri: str, kind: str) -> None:
    # Issue 10 item 7: an SH1107 (1-bit), an SSD1327 (grey) and an SSD1351 (colour)
    # of one size place every line and the QR code alike.
    screen = code_screen(uri) if kind == "code" else text_screen(kind)
    frames = [compose(screen, width=128, height=128, mode=mode) for mode in layout.MODES]
    placed = {(frame.text, frame.boxes, frame.qr, frame.pages) for frame in frames}
    assert len(placed) == 1, placed
