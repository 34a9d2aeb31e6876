"""Metrics in the Prometheus text exposition format (version 0.0.4): `GET /v1/metrics`
on the API socket (read right), and, with `metrics.textfile`, the same text in a file
for node_exporter's textfile collector (Prometheus cannot scrape a Unix socket).

Written by hand rather than with prometheus_client. Measured on the project's machine
(CPython 3.11, x86-64): importing prometheus_client into a process that already holds
the agent (41 MiB resident) adds 0.55 MiB, 28 modules (among them http.server, wsgiref,
socketserver, gzip and mmap, which the agent has no use for) and 8 ms; a Pi Zero's one
ARM11 core is roughly ten times slower, so about a tenth of a second at each start. That
cost is small, and is not the reason. The reasons:
- the metrics are few (eight families) and each is derived from what the driver already
  says (its snapshots, and one observer of requests, `Driver.add_exchange_listener`):
  with the library they would be mirrored into its metric objects or wrapped in a custom
  collector, the same code plus a dependency, a process-wide registry with process,
  platform and GC collectors added at import, and a `_created` series beside every
  counter and histogram in this format unless that is switched off;
- it would be a dependency of every device for what is a hundred lines here;
- the text format is small and has been stable since 2014: HELP and TYPE lines, three
  escapes, one sample a line, a histogram as `_bucket{le=...}`, `_sum` and `_count`.
  The tests read every exposition back with prometheus_client's own parser, a
  test-only dependency, so the reference implementation checks the format all the same.

Provider latency is a histogram, not a summary: buckets can be summed over a fleet and
over time (`histogram_quantile(0.9, sum by (le) (rate(..._bucket[1h])))`), quantiles
cannot, and a summary worth having would need a sliding-window quantile estimator in the
agent (prometheus_client's Summary gives only `_sum` and `_count` for that reason).

`token_expiry_seconds` (and `token_expiry_timestamp_seconds`) is absent, not NaN, when
there is no token or the provider gave it no lifetime: its HELP and TYPE stay; an absent
series drops out of a fleet's `avg()` or `sum()`, which a NaN would turn to NaN, and
`device_agent_state` says why it is absent. It is negative once the token has expired
while a refresh may still mend it. The timestamp does not go stale between two writes of
the textfile; the seconds are what an alert reads without arithmetic.

What is counted (from the process's start, as Prometheus expects of counters):
- codes issued: answers of the device endpoint after which a new code is on screen (a
  code resumed after a restart was issued to the run before);
- refreshes: refresh requests, once answered or failed: `ok` when the provider sent
  new tokens the session took, `failed` otherwise (no answer, 5xx, 429, a refused
  refresh token or client, an answer it could not use). A refresh overtaken by a
  sign-out is counted by the provider's answer;
- throttled periods: entries into the `throttled` state (the device endpoint said 429
  or slow_down), however many refusals the back-off then meets; a throttle while
  signed in shows only when no refresh is failing, as the state does;
- provider latency: from sending a request to its answer or its failure (a timeout
  lands in `+Inf`), by endpoint: discovery, device, token (polls and refreshes),
  userinfo, revoke.

Nothing secret is in any of it: no token, device code, user code, user or error text.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Final

from agent import __version__
from agent.clock import Clock
from agent.driver import Driver, Exchange
from agent.fsutil import UnsafeDirectory, write_atomic
from agent.state import Phase, Snapshot

__all__ = ["CONTENT_TYPE", "Metrics", "Textfile", "family_text", "write_textfile"]

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
PREFIX: Final = "device_agent_"
# Upper bounds in seconds: loopback and a LAN below 50 ms, a provider across the
# internet 0.1-1 s; the transport's default timeout (15 s) lands in +Inf.
LATENCY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The session's request purposes, by the endpoint each is sent to.
ENDPOINTS: Final = {"discovery": "discovery", "device": "device", "poll": "token",
                    "refresh": "token", "userinfo": "userinfo", "revoke": "revoke"}
# node_exporter runs as its own user and reads the file; nothing in it is secret.
TEXTFILE_MODE: Final = 0o644
# With nothing new, the textfile is written this often all the same, so the expiry in
# it counts down (node_textfile_mtime_seconds says when it was last written).
TEXTFILE_INTERVAL: Final = 60.0

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

Sample = tuple[str, Mapping[str, str], float]


# -- the text format ----------------------------------------------------------------

def _help(text: str) -> str:
    """HELP text: backslash and line feed escaped; a double quote is as it is."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    """As Go's strconv.ParseFloat reads it: integers as such, NaN and the infinities
    as the format spells them, other floats as Python's shortest repr."""
    if isinstance(value, int):
        return str(int(value))  # a bool is 1 or 0
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def family_text(name: str, kind: str, help: str, samples: Iterable[Sample]) -> str:
    """One metric family as one uninterrupted group: HELP, TYPE, then each sample as
    `(sample name, labels, value)`. A family may have no sample (a gauge with nothing
    to say); its HELP and TYPE still tell what it would be."""
    if not _METRIC_NAME.fullmatch(name) or kind not in ("counter", "gauge", "histogram"):
        raise ValueError(f"not a metric family: {name!r} of type {kind!r}")
    lines = [f"# HELP {name} {_help(help)}", f"# TYPE {name} {kind}"]
    for sample_name, labels, value in samples:
        if not sample_name.startswith(name) or not _METRIC_NAME.fullmatch(sample_name):
            raise ValueError(f"sample {sample_name!r} is not of family {name!r}")
        pairs = []
        for label, text in labels.items():
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"not a label name: {label!r}")
            pairs.append(f'{label}="{_label_value(text)}"')
        braces = "{" + ",".join(pairs) + "}" if pairs else ""
        lines.append(f"{sample_name}{braces} {_number(value)}")
    return "\n".join(lines) + "\n"


class _Histogram:
    """Cumulative bucket counts, as the format wants them."""

    def __init__(self) -> None:
        self.buckets = [0] * len(LATENCY_BUCKETS)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        for index, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[index] += 1
        self.count += 1
        self.sum += seconds

    def samples(self, name: str, labels: Mapping[str, str]) -> list[Sample]:
        found: list[Sample] = [(f"{name}_bucket", {**labels, "le": _number(bound)}, count)
                               for bound, count in zip(LATENCY_BUCKETS, self.buckets,
                                                       strict=True)]
        found += [(f"{name}_bucket", {**labels, "le": "+Inf"}, self.count),
                  (f"{name}_sum", labels, self.sum),
                  (f"{name}_count", labels, self.count)]
        return found


# -- what is counted ------------------------------------------------------------------

class Metrics:
    """Counts what the driver does, from the moment it is made: made before the
    driver's first step (`serve()` does), it misses nothing. It only observes."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self.codes_issued = 0
        self.throttled_periods = 0
        self.refreshes = {"ok": 0, "failed": 0}
        # Every endpoint from the start, at 0: rate() needs a series before it moves.
        self.latency = {endpoint: _Histogram() for endpoint in dict.fromkeys(ENDPOINTS.values())}
        snapshot = driver.snapshot
        self._phase = snapshot.phase
        self._code = snapshot.user_code
        self._listeners: list[Callable[[], None]] = []
        driver.add_listener(self._on_snapshot)
        driver.add_exchange_listener(self._on_exchange)

    def add_change_listener(self, listener: Callable[[], None]) -> None:
        """`listener` is called on the loop after anything counted or shown changes."""
        self._listeners.append(listener)

    def remove_change_listener(self, listener: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                log.exception("a metrics listener failed")

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        if snapshot.phase == Phase.THROTTLED and self._phase != Phase.THROTTLED:
            self.throttled_periods += 1
        self._phase = snapshot.phase
        self._changed()

    def _on_exchange(self, exchange: Exchange) -> None:
        # Called under the driver's lock as soon as the session has taken the answer:
        # its snapshot and refresh_error are the ones this answer made.
        endpoint = ENDPOINTS.get(exchange.purpose, exchange.purpose)
        self.latency.setdefault(endpoint, _Histogram()).observe(exchange.seconds)
        if exchange.purpose == "device" and exchange.status is not None:
            snapshot = self._driver.session.snapshot
            if (snapshot.phase == Phase.AWAITING_USER and snapshot.user_code is not None
                    and snapshot.user_code != self._code):
                self.codes_issued += 1
                self._code = snapshot.user_code
        elif exchange.purpose == "refresh":
            # refresh_error is None once a refresh has brought tokens the session took.
            ok = exchange.status == 200 and self._driver.session.refresh_error is None
            self.refreshes["ok" if ok else "failed"] += 1
        self._changed()

    def render(self) -> str:
        """The exposition as of now: the state and the expiry are read at this moment."""
        snapshot = self._driver.snapshot
        expires_at = snapshot.token_expires_at
        expiry: list[Sample] = []
        stamp: list[Sample] = []
        if expires_at is not None:
            expiry = [(f"{PREFIX}token_expiry_seconds", {},
                       expires_at - self._driver.clock.time())]
            stamp = [(f"{PREFIX}token_expiry_timestamp_seconds", {}, expires_at)]
        latency = f"{PREFIX}provider_request_duration_seconds"
        return "".join([
            family_text(f"{PREFIX}build_info", "gauge",
                        "The agent's version, as a label; always 1.",
                        [(f"{PREFIX}build_info", {"version": __version__}, 1)]),
            family_text(f"{PREFIX}state", "gauge",
                        "The agent's state, as `device-agent status` names it: 1 for the "
                        "current one, 0 for every other.",
                        [(f"{PREFIX}state", {"state": phase.value},
                          int(phase == snapshot.phase)) for phase in Phase]),
            family_text(f"{PREFIX}token_expiry_seconds", "gauge",
                        "Seconds until the access token expires, negative once it has "
                        "while a refresh may still mend it; absent with no token, or one "
                        "the provider gave no lifetime.", expiry),
            family_text(f"{PREFIX}token_expiry_timestamp_seconds", "gauge",
                        "When the access token expires, in Unix time; absent as "
                        "token_expiry_seconds is.", stamp),
            family_text(f"{PREFIX}refreshes_total", "counter",
                        "Refresh requests since the agent started, by result: ok (new "
                        "tokens), failed (no answer, an error, a refused refresh token).",
                        [(f"{PREFIX}refreshes_total", {"result": result}, count)
                         for result, count in self.refreshes.items()]),
            family_text(f"{PREFIX}codes_issued_total", "counter",
                        "Device codes the provider issued since the agent started "
                        "(RFC 8628 3.2).",
                        [(f"{PREFIX}codes_issued_total", {}, self.codes_issued)]),
            family_text(f"{PREFIX}throttled_periods_total", "counter",
                        "Times since the agent started that the provider began rationing "
                        "device codes (HTTP 429 or slow_down) and the agent entered the "
                        "throttled state.",
                        [(f"{PREFIX}throttled_periods_total", {}, self.throttled_periods)]),
            family_text(latency, "histogram",
                        "Seconds from sending a request to the provider to its answer or "
                        "failure, by endpoint: discovery, device, token (polls and "
                        "refreshes), userinfo, revoke.",
                        [sample for endpoint, histogram in self.latency.items()
                         for sample in histogram.samples(latency, {"endpoint": endpoint})]),
        ])


# -- the textfile -------------------------------------------------------------------

def write_textfile(path: Path, text: str) -> None:
    """Replace `path` whole with `text`, mode 0644. The new text goes to a hidden
    `.NAME.*.tmp` beside it, which the collector's `*.prom` glob does not match, and is
    renamed into place (`fsutil.write_atomic`); no symlink is followed on the way."""
    write_atomic(path, text.encode(), mode=TEXTFILE_MODE, follow_symlinks=False)


class Textfile:
    """Keeps a node_exporter textfile-collector file in step with `metrics`: written at
    once, after every change (a burst ends with the newest text), and every `interval`
    seconds with nothing new. A write that fails is said once, until it works again;
    the agent goes on without the file."""

    def __init__(self, metrics: Metrics, path: Path, *, clock: Clock,
                 interval: float = TEXTFILE_INTERVAL) -> None:
        self._metrics = metrics
        self._path = path
        self._clock = clock
        self._interval = interval
        self._failing: str | None = None

    async def run(self) -> None:
        changed = asyncio.Event()
        self._metrics.add_change_listener(changed.set)
        try:
            while True:
                changed.clear()
                await self._write(self._metrics.render())
                await _first(changed.wait(), self._clock.sleep(self._interval))
        finally:
            self._metrics.remove_change_listener(changed.set)

    async def _write(self, text: str) -> None:
        try:
            # In a thread: an fsync on an SD card can take a while.
            await asyncio.to_thread(write_textfile, self._path, text)
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            if reason != self._failing:
                hint = ""
                if not isinstance(exc, UnsafeDirectory) and exc.errno in (
                        errno.EROFS, errno.EACCES, errno.EPERM):
                    hint = ("; under the shipped unit its directory needs ReadWritePaths= "
                            "in a drop-in (systemctl edit device-agent)")
                log.warning("metrics textfile %s: %s%s; tried again on each change and "
                            "every %g s", self._path, reason, hint, self._interval)
            self._failing = reason
            return
        if self._failing is not None:
            log.info("metrics textfile %s written again", self._path)
        self._failing = None


async def _first(*waits: Awaitable[object]) -> None:
    """Until the first of `waits` is done; the others are cancelled."""
    futures = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in futures:
            future.cancel()
