"""SIGKILL at random moments of sign-in and refresh: the short run of
bench/crash_consistency.py, whose code this is (real child agents, real sockets, a real
state directory, the test provider with strict rotation)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.crash_consistency import UNAVOIDABLE, Cause, Plan, run

KILLS = 20
# Five agents side by side, each with its own provider: the run takes about a fifth of
# the time one agent would need, since most of it is waiting (poll interval, refresh gap).
LANES = 5
SEED = 20260412


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
async def test_a_kill_never_loses_a_sign_in_outside_the_rotation_window(
        tmp_path: Path, record_property: Callable[[str, object], None], sealed: bool) -> None:
    report = await run(KILLS, SEED, lanes=LANES, workdir=tmp_path, sealed=sealed,
                       command=f"tests/test_crash_consistency.py (seed {SEED})", echo=print)
    print(report.render())
    in_window = sum(1 for o in report.outcomes if o.cause in UNAVOIDABLE)
    record_property("lost_in_rotation_window", in_window)

    assert len(report.outcomes) == KILLS
    assert not [o for o in report.outcomes if o.cause is Cause.UNPARSABLE], report.render()
    # Restarted into a valid state: each restart that had to sign in did, none exited on
    # its own, and a last start refreshes, stops cleanly and leaves a good file.
    assert not [o for o in report.outcomes if o.cause in (Cause.NO_RECOVERY, Cause.EXITED)], (
        report.render())
    assert not report.problems, report.render()
    # Every loss is explained by a window, with the kill placed against the provider's
    # arrival of the request whose answer did not reach the disk.
    assert not report.bugs(), report.render()
    assert all(o.kill_after_arrival is not None
               for o in report.outcomes if o.cause in UNAVOIDABLE)
    # The run did what it is for: kills in refresh cycles and in sign-ins, and refresh
    # windows measured.
    assert report.plans[Plan.REFRESH] and report.plans[Plan.SIGN_IN], report.render()
    assert any(w.kind == "refresh" for w in report.windows), report.render()
    if sealed:
        # What the last starts left is the sealed format, judged above with the key.
        stores = sorted(tmp_path.glob("lane*/state/credentials.json"))
        assert len(stores) == LANES
        assert {json.loads(p.read_text())["version"] for p in stores} == {2}
