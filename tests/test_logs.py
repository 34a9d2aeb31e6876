"""Journal-aware log lines and secret fingerprints, written to real files."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from agent.logs import attach_live_area, detach_live_area, fingerprint, setup_logging

TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")


@pytest.fixture(autouse=True)
def restore_agent_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("agent")
    handlers, level = list(logger.handlers), logger.level
    yield logger
    for handler in logger.handlers:
        if handler not in handlers:
            handler.close()
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.fixture
def stream(tmp_path: Path) -> Iterator[TextIO]:
    with (tmp_path / "stderr").open("w+", encoding="utf-8") as f:
        yield f


def _journal_stream(f: TextIO) -> dict[str, str]:
    st = os.fstat(f.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def _lines(f: TextIO) -> list[str]:
    f.flush()
    f.seek(0)
    return f.read().splitlines()


def test_journal_mode_prefixes_priority_and_omits_timestamp(stream: TextIO) -> None:
    setup_logging("debug", stream=stream, environ=_journal_stream(stream))
    log = logging.getLogger("agent.driver")
    log.debug("polling")
    log.info("signed in")
    log.warning("refresh failing")
    log.error("denied")
    log.critical("cannot continue")
    assert _lines(stream) == [
        "<7>polling", "<6>signed in", "<4>refresh failing", "<3>denied", "<3>cannot continue"]


def test_journal_mode_prefixes_every_line_of_a_traceback(stream: TextIO) -> None:
    setup_logging("info", stream=stream, environ=_journal_stream(stream))
    log = logging.getLogger("agent.store")
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        log.exception("write failed\nsecond line")
    log.warning("multi\nline")
    lines = _lines(stream)
    # A line break in a message is escaped (no forged lines); a traceback keeps its own.
    assert lines[0] == "<3>write failed\\x0asecond line"
    assert "<3>Traceback (most recent call last):" in lines
    assert lines[-2] == "<3>RuntimeError: disk on fire"
    assert lines[-1] == "<4>multi\\x0aline"
    assert all(re.match(r"<[3-7]>", line) for line in lines), lines
    assert not any(TIMESTAMP.search(line) for line in lines)


def test_plain_mode_has_timestamp_level_and_logger(stream: TextIO) -> None:
    setup_logging("info", stream=stream, environ={})
    logging.getLogger("agent.driver").info("hello")
    (line,) = _lines(stream)
    assert re.fullmatch(TIMESTAMP.pattern + r" INFO agent\.driver: hello", line), line


def test_journal_stream_naming_another_file_means_plain(stream: TextIO, tmp_path: Path) -> None:
    # Inherited from a parent whose stderr was the journal, while ours is a file.
    with (tmp_path / "other").open("w", encoding="utf-8") as other:
        setup_logging("info", stream=stream, environ=_journal_stream(other))
    logging.getLogger("agent").warning("careful")
    (line,) = _lines(stream)
    assert not line.startswith("<")
    assert TIMESTAMP.match(line)


@pytest.mark.parametrize("value", ["", "garbage", "12", "a:b", "1:2:3"])
def test_malformed_journal_stream_means_plain(stream: TextIO, value: str) -> None:
    setup_logging("info", stream=stream, environ={"JOURNAL_STREAM": value})
    logging.getLogger("agent").info("x")
    (line,) = _lines(stream)
    assert TIMESTAMP.match(line)


def test_stream_without_a_descriptor_means_plain() -> None:
    buffer = io.StringIO()
    setup_logging("info", stream=buffer, environ={"JOURNAL_STREAM": "1:2"})
    logging.getLogger("agent").info("x")
    assert TIMESTAMP.match(buffer.getvalue())


def test_level_filters(stream: TextIO) -> None:
    setup_logging("WARNING", stream=stream, environ={})
    log = logging.getLogger("agent.api")
    log.info("quiet")
    log.warning("loud")
    lines = _lines(stream)
    assert len(lines) == 1
    assert lines[0].endswith("WARNING agent.api: loud")


def test_unknown_level_is_rejected(stream: TextIO) -> None:
    with pytest.raises(ValueError, match="verbose"):
        setup_logging("verbose", stream=stream)


def test_idempotent(stream: TextIO, restore_agent_logger: logging.Logger) -> None:
    # An earlier test in this process may have set the handler up already.
    setup_logging("info", stream=stream, environ={})
    before = len(restore_agent_logger.handlers)
    setup_logging("info", stream=stream, environ={})
    setup_logging("info", stream=stream, environ={})
    assert len(restore_agent_logger.handlers) == before
    logging.getLogger("agent.driver").info("once")
    assert len(_lines(stream)) == 1


def test_second_call_reconfigures(stream: TextIO, tmp_path: Path) -> None:
    with (tmp_path / "first").open("w+", encoding="utf-8") as first:
        setup_logging("info", stream=first, environ={})
        setup_logging("debug", stream=stream, environ=_journal_stream(stream))
        logging.getLogger("agent").debug("moved")
        assert _lines(first) == []
    assert _lines(stream) == ["<7>moved"]


def test_other_namespaces_are_left_alone(stream: TextIO) -> None:
    setup_logging("debug", stream=stream, environ={})
    logging.getLogger("aiohttp.client").warning("not ours")
    assert _lines(stream) == []


SECRET = "eyJhbGciOiJSUzI1NiJ9.refresh-token-value.sig"


def test_fingerprint_is_stable_short_and_hides_the_secret() -> None:
    tag = fingerprint(SECRET)
    assert tag == fingerprint(SECRET)
    assert re.fullmatch(r"sha256:[0-9a-f]{8}", tag)
    assert SECRET not in tag
    assert not any(part in tag for part in SECRET.split(".") if len(part) >= 4)
    assert tag == "sha256:" + hashlib.sha256(SECRET.encode()).hexdigest()[:8]
    assert fingerprint("secret") == "sha256:2bb80d53"


def test_fingerprint_tells_secrets_apart() -> None:
    assert fingerprint(SECRET) != fingerprint(SECRET + "x")
    assert fingerprint("") != fingerprint(None)
    assert fingerprint(None) == "none"


@pytest.mark.parametrize("journal", [True, False])
def test_a_name_with_a_line_break_cannot_forge_a_log_line(stream: TextIO,
                                                          journal: bool) -> None:
    setup_logging("info", stream=stream, environ=_journal_stream(stream) if journal else {})
    name = "Kitchen\n<3>2026-12-01 10:00:00 INFO agent.session: signed in as root\r\x1b[2J"
    logging.getLogger("agent.session").info("device %s", name)
    (line,) = _lines(stream)
    assert "\\x0a" in line and "\\x0d" in line and "\\x1b" in line


class RecordingArea:
    """A live area that notes when it is lifted, and for which stream."""

    def __init__(self) -> None:
        self.lifts: list[TextIO] = []

    @contextlib.contextmanager
    def lifted(self, stream: TextIO) -> Iterator[None]:
        self.lifts.append(stream)
        yield


def test_log_lines_go_through_the_live_area_while_it_is_attached(stream: TextIO) -> None:
    setup_logging("info", stream=stream, environ={})
    area = RecordingArea()
    attach_live_area(area)
    try:
        logging.getLogger("agent.session").info("signed in")
    finally:
        detach_live_area(area)
    logging.getLogger("agent.session").info("stopping")
    assert area.lifts == [stream]
    assert [line.split(": ", 1)[1] for line in _lines(stream)] == ["signed in", "stopping"]


def test_only_the_newest_live_area_takes_part(stream: TextIO) -> None:
    setup_logging("info", stream=stream, environ={})
    old, new = RecordingArea(), RecordingArea()
    attach_live_area(old)
    attach_live_area(new)
    detach_live_area(old)  # too late to detach what was replaced: changes nothing
    try:
        logging.getLogger("agent").info("x")
    finally:
        detach_live_area(new)
    assert (old.lifts, new.lifts) == ([], [stream])


def test_a_live_area_dropped_without_detaching_takes_no_part(stream: TextIO) -> None:
    setup_logging("info", stream=stream, environ={})
    area = RecordingArea()
    lifts = area.lifts
    attach_live_area(area)
    del area
    gc.collect()
    logging.getLogger("agent").info("x")
    assert lifts == []
    assert len(_lines(stream)) == 1
