"""Logging for a daemon that usually writes to the journal, and a safe tag for secrets.

Under systemd, stderr is a stream into journald. systemd.exec(5) documents
``$JOURNAL_STREAM`` ("device:inode" of that stream) so a program can tell whether its
stderr really goes there, rather than being redirected to a file or a terminal. When it
does, each line starts with a ``<N>`` syslog priority (sd-daemon(3)), which journald
strips and stores as PRIORITY=, and carries no timestamp, since journald adds its own.
Anywhere else, lines carry a timestamp, the level and the logger name.

A terminal may also hold the console display's live block (a code and its countdown,
redrawn in place). A log line meant for that terminal is printed above the block, with
the block lifted off and drawn again below it: see `LiveArea`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Protocol, TextIO

__all__ = ["LEVELS", "LiveArea", "attach_live_area", "detach_live_area", "escape_controls",
           "fingerprint", "looks_like_a_token", "setup_logging"]

LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

_NAMESPACE = "agent"
# Our handler is found again by name, so a second call replaces it instead of adding one.
_HANDLER_NAME = "device-agent"
_PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_PLAIN_DATEFMT = "%Y-%m-%d %H:%M:%S"


def _priority(levelno: int) -> int:
    # syslog(3) priorities as sd-daemon(3) spells them: SD_ERR 3, SD_WARNING 4,
    # SD_INFO 6, SD_DEBUG 7. CRITICAL shares 3: this daemon failing is an error for the
    # host, not one of the system-wide critical conditions syslog(3) keeps LOG_CRIT for.
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


# C0 controls and DEL, but tab: a device or user name holding a line break must not be
# able to start a log line of its own (a forged "signed in as root").
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x09), *range(0x0a, 0x20), 0x7f)}


def escape_controls(text: str) -> str:
    """`text` as one line of a log or a terminal: control characters as \\xNN."""
    return text.translate(_CONTROLS)


class _OneLineFormatter(logging.Formatter):
    """The message stays one line: control characters in it are escaped. Tracebacks,
    appended after it, keep their line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


class _JournalFormatter(_OneLineFormatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{_priority(record.levelno)}>"
        # journald splits the stream at "\n" and reads the prefix of each line alone, so
        # every line of a traceback needs it or it lands at the default priority.
        return "\n".join(prefix + line for line in text.split("\n"))


def _writes_to_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    value = environ.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep or not all(part.isascii() and part.isdigit() for part in (device, inode)):
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        # No file descriptor (an in-memory stream) or a closed one: not the journal.
        return False
    # systemd.exec(5): the variable is inherited by children whose stderr may point
    # elsewhere, so it counts only when it names the very stream being written.
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


class LiveArea(Protocol):
    """Lines a display keeps redrawing at the bottom of a terminal."""

    def lifted(self, stream: TextIO) -> AbstractContextManager[None]:
        """While this is entered, `stream` may be written to as if the area were not
        there: when `stream` reaches the area's terminal, the area is cleared on entry and
        drawn again below what was written on exit. It must not raise, nor log."""
        ...


def _no_area() -> LiveArea | None:
    return None


# Weak, so a display dropped without being closed stops taking part in logging.
_live_area: Callable[[], LiveArea | None] = _no_area


def attach_live_area(area: LiveArea) -> None:
    """Log lines written from now on go through `area` (one area at a time: the newest)."""
    global _live_area
    _live_area = weakref.ref(area)


def detach_live_area(area: LiveArea) -> None:
    """Undo `attach_live_area`, unless another area has been attached since."""
    global _live_area
    if _live_area() is area:
        _live_area = _no_area


class _Handler(logging.StreamHandler[TextIO]):
    """A stream handler around which the console's live block steps aside."""

    def emit(self, record: logging.LogRecord) -> None:
        area = _live_area()
        if area is None:
            super().emit(record)
            return
        with area.lifted(self.stream):
            super().emit(record)


class _StderrHandler(_Handler):
    """Writes to whatever `sys.stderr` is when a record is emitted: test harnesses and
    embedding programs swap it, and a handler holding a replaced, closed stream would
    turn every log line into an error."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def setup_logging(level: str = "info", *, stream: TextIO | None = None,
                  environ: Mapping[str, str] | None = None) -> None:
    """Send the ``agent`` loggers to `stream` (stderr by default) at `level`.

    Safe to call again (a new level or stream replaces the old handler). Records still
    propagate to the root logger, which a daemon leaves bare, so an embedding program
    or a test harness can capture them too.
    """
    try:
        numeric = LEVELS[level.lower()]
    except KeyError:
        choices = ", ".join(LEVELS)
        raise ValueError(f"unknown log level {level!r} (expected one of {choices})") from None
    out = sys.stderr if stream is None else stream
    env = os.environ if environ is None else environ

    handler = _Handler(out) if stream is not None else _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    if _writes_to_journal(out, env):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(_OneLineFormatter(_PLAIN_FORMAT, _PLAIN_DATEFMT))

    logger = logging.getLogger(_NAMESPACE)
    for old in list(logger.handlers):
        if old.get_name() == _HANDLER_NAME:
            logger.removeHandler(old)
            old.close()
    logger.addHandler(handler)
    logger.setLevel(numeric)


def looks_like_a_token(run: str) -> bool:
    """A long run of token characters is taken for a secret when it mixes letters and
    digits: words, paths and registered error codes (insufficient_user_authentication)
    have no digits."""
    return any(ch.isdigit() for ch in run) and any(ch.isalpha() for ch in run)


def fingerprint(secret: str | None) -> str:
    """A short tag that tells two secrets apart in logs without revealing either.

    Eight hex digits of SHA-256: enough to see that a refresh token rotated, far too few
    (and one-way) to recover a token from.
    """
    if secret is None:
        return "none"
    return "sha256:" + hashlib.sha256(secret.encode("utf-8")).hexdigest()[:8]
