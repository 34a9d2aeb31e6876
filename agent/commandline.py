"""argparse's part of the command line, its help formatter and parsers: a module of
its own so that a token read, whose line `agent.cli._read_token_line` reads, imports
no argparse."""

from __future__ import annotations

import argparse
import os
import sys

TYPE_CHECKING = False  # not typing's: see agent/cli.py
if TYPE_CHECKING:
    from typing import Any, NoReturn

__all__ = ["CommandParser", "OneCommandParser", "Unparsed"]


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size finds it."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    if sys.__stdout__ is None:
        return 80
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (ValueError, OSError):
        return 80


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, without its `import shutil` for the terminal's width: argparse makes
    a formatter for every argument it is given, and shutil brings zlib, bz2 and lzma
    with it, 2 ms of every command."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _columns() - 2 if width is None else width)


class CommandParser(argparse.ArgumentParser):
    # Its subcommands' parsers are made of its own class, and so format alike.
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


class Unparsed(Exception):
    """The command line is not one the parser of its command alone can read."""


class OneCommandParser(CommandParser):
    # Its error is for main() to hear: the parser of every command then says what is
    # wrong, in argparse's words about all of them.
    def error(self, message: str) -> NoReturn:
        raise Unparsed(message)
