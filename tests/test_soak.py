"""The soak of `bench/soak.py` in its quick form: a real agent in a child process
refreshes 1 s tokens again and again while clients read them over the Unix socket;
no read may fail, and no descriptor, task, thread or memory may pile up.

The long form (5 s tokens, 300 refreshes) is `.venv/bin/python bench/soak.py`."""

from __future__ import annotations

from pathlib import Path

from bench.soak import QUICK, soak


async def test_tokens_refreshed_under_readers_leak_nothing(tmp_path: Path) -> None:
    result = await soak(workdir=tmp_path, **QUICK)
    report = result.report("tests/test_soak.py")
    assert result.refreshes >= QUICK["refreshes"], report
    assert result.reads.done > 0, report
    assert result.reads.failed == 0, report
    assert not result.growth(), report
    assert result.exit_status == 0, report
