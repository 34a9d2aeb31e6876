"""Rewrites the lifecycle table in docs/ARCHITECTURE.md from agent/session.py:

    .venv/bin/python docs/table.py
"""

from pathlib import Path

from agent.session import transitions_markdown

DOC = Path(__file__).resolve().parent / "ARCHITECTURE.md"
BEGIN, END = "<!-- transitions:begin -->\n", "<!-- transitions:end -->"

text = DOC.read_text(encoding="utf-8")
head, rest = text.split(BEGIN, 1)
_, tail = rest.split(END, 1)
DOC.write_text(head + BEGIN + transitions_markdown() + END + tail, encoding="utf-8")
