"""docs/ARCHITECTURE.md shows the lifecycle table as the code has it."""

from __future__ import annotations

from pathlib import Path

from agent.session import transitions_markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURE.md"


def test_the_documented_table_is_the_code_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    begin, end = "<!-- transitions:begin -->\n", "<!-- transitions:end -->"
    documented = text[text.index(begin) + len(begin):text.index(end)]
    assert documented == transitions_markdown(), (
        "docs/ARCHITECTURE.md is out of date: run .venv/bin/python docs/table.py")

