"""What the benchmarks that run programs share: one timed run, and a spread."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

GNU_TIME = "/usr/bin/time"


def run_once(argv: Sequence[str], env: dict[str, str]) -> float:
    """Wall seconds of one run of `argv`, stdout to /dev/null; a run that fails raises
    with its status."""
    started = time.perf_counter()
    pid = os.posix_spawn(argv[0], list(argv), env, file_actions=[
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
    _, status, _ = os.wait4(pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {os.waitstatus_to_exitcode(status)}")
    return elapsed


def peak_rss_kib(argv: Sequence[str], env: dict[str, str]) -> int | None:
    """The peak RSS of one run of `argv`, from GNU time (Debian's `time`), or None
    without it. Not from this process's wait4: Linux keeps the high-water mark of the
    memory a process had before its exec, and a child this process spawns starts in a
    copy of (or, by posix_spawn, in) this process's memory, so its `ru_maxrss` is never
    below this benchmark's own. GNU time is small: what it reports is the program's."""
    if not os.access(GNU_TIME, os.X_OK) and shutil.which("time") is None:
        return None
    done = subprocess.run([GNU_TIME, "-f", "%M", *argv], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, check=True)
    return int(done.stderr.strip().splitlines()[-1])


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, 10th and 90th percentile."""
    ordered = sorted(values)
    return (statistics.median(ordered), ordered[len(ordered) // 10],
            ordered[max(0, len(ordered) * 9 // 10 - 1)])


def agent_state(socket_path: Path) -> str | None:
    """The agent's state from its `GET /v1/status`, or None while it does not answer."""
    from agent.client import AgentNotAllowed, AgentUnavailable, call

    try:
        answer = call(socket_path, "GET", "/v1/status", timeout=5)
    except (OSError, AgentUnavailable, AgentNotAllowed):
        return None
    state = answer.body.get("state") if answer.ok else None
    return state if isinstance(state, str) else None
