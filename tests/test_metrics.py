"""GET /v1/metrics and the node_exporter textfile (issue 12 item 6).

The exposition is read back with prometheus_client's parser (a test-only dependency: the
agent writes the text format itself), plus the rules of the format that a parser leaves
to the writer: one uninterrupted group per family, a type and a help text for each, a
histogram's buckets cumulative and in order with `+Inf` equal to `_count`, the last line
ended. Everything goes over the real Unix socket, against the test provider, on the
hand-moved clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.api import AccessPolicy, ApiServer, build_app
from agent.cli import main
from agent.config import config_from_mapping, load_config
from agent.driver import Driver
from agent.errors import ConfigError
from agent.idp import Answer, Delay, Fail, IdentityProvider, ProviderSettings
from agent.metrics import CONTENT_TYPE, Metrics, Textfile, family_text, write_textfile
from agent.service import serve
from agent.state import Phase
from tests.clock import ManualClock
from tests.harness import Running, StartDriver
from tests.test_api import NOBODY, as_other_user, needs_root
from tests.test_secrets_sweep import _sweep

ISSUER = "https://auth.example.com/application/o/my-device/"
# A confidential client in every test here: its secret is one more thing the output
# must never hold.
CLIENT_SECRET = 'cs-metrics.Q9~zX!4&Kp2/Lm=7%Rt"Vw0'
Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


@pytest.fixture
def provider_settings() -> ProviderSettings:
    return ProviderSettings(client_secret=CLIENT_SECRET)


# -- reading the exposition ---------------------------------------------------------

def parse(text: str) -> Samples:
    """Every sample by (name, labels), once the text has passed the parser and the
    writer's rules."""
    assert text.endswith("\n"), "the last line must end with a line feed"
    families = list(text_string_to_metric_families(text))
    names = [family.name for family in families]
    # The parser starts a new family when a group is interrupted, or when a sample
    # comes before its TYPE line (as an untyped one): both show here.
    assert len(names) == len(set(names)), names
    samples: Samples = {}
    for family in families:
        assert family.type in ("counter", "gauge", "histogram"), (family.name, family.type)
        assert family.documentation, family.name
        assert family.name.startswith("device_agent_"), family.name
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, key
            samples[key] = sample.value
        if family.type == "histogram":
            _check_histogram(family)
    for line in text.splitlines():
        if line.startswith("# TYPE ") and line.split()[3] == "counter":
            assert line.split()[2].endswith("_total"), line
    return samples


def _check_histogram(family: Any) -> None:
    series: dict[Labels, list[tuple[str, float]]] = {}
    sums: dict[Labels, float] = {}
    counts: dict[Labels, float] = {}
    for sample in family.samples:
        labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
        if sample.name.endswith("_bucket"):
            series.setdefault(labels, []).append((sample.labels["le"], sample.value))
        elif sample.name.endswith("_sum"):
            sums[labels] = sample.value
        elif sample.name.endswith("_count"):
            counts[labels] = sample.value
    assert series and set(series) == set(sums) == set(counts)
    for labels, buckets in series.items():
        bounds = [float(le) for le, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf"), buckets
        assert buckets[-1][0] == "+Inf"
        values = [value for _, value in buckets]
        assert values == sorted(values), buckets  # cumulative
        assert values[-1] == counts[labels]
        assert sums[labels] >= 0


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def series(samples: Samples, name: str) -> dict[Labels, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


class MetricsClient:
    def __init__(self, path: Path) -> None:
        self.http = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)))

    async def get(self, target: str = "/v1/metrics") -> tuple[int, Mapping[str, str], str]:
        async with self.http.get(f"http://agent{target}") as response:
            return response.status, response.headers, await response.text()

    async def post(self, target: str) -> int:
        async with self.http.post(f"http://agent{target}") as response:
            await response.read()
            return response.status

    async def scrape(self) -> Samples:
        status, headers, text = await self.get()
        assert status == 200, text
        assert headers["Content-Type"] == CONTENT_TYPE
        return parse(text)


@contextlib.asynccontextmanager
async def served(run: Running, path: Path, *, metrics: Metrics | None = None,
                 policy: AccessPolicy | None = None) -> AsyncIterator[MetricsClient]:
    server = ApiServer(build_app(run.driver, policy or AccessPolicy(),
                                 wall_clock=run.clock.time, metrics=metrics), path,
                       mode=0o666)
    await server.start()
    client = MetricsClient(path)
    try:
        yield client
    finally:
        await client.http.close()
        await server.close()


async def started(start_driver: StartDriver, **overrides: Any) -> tuple[Running, Metrics]:
    """A driver and its metrics, attached before the driver's first step (the daemon
    does the same), so nothing it does goes uncounted."""
    run = await start_driver(**overrides)
    return run, Metrics(run.driver)


# -- the API ------------------------------------------------------------------------

async def test_the_metrics_follow_a_sign_in_refreshes_and_a_sign_out(
        start_driver: StartDriver, provider: IdentityProvider, socket_dir: Path) -> None:
    run, metrics = await started(start_driver)
    async with served(run, socket_dir / "agent.sock", metrics=metrics) as api:
        await run.until_phase(Phase.AWAITING_USER)
        status, headers, text = await api.get()
        assert status == 200
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert headers["Cache-Control"] == "no-store"
        s = parse(text)
        # The state: one series per phase, 1 for the current one.
        states = series(s, "device_agent_state")
        assert {dict(labels)["state"] for labels in states} == {p.value for p in Phase}
        assert value(s, "device_agent_state", state="awaiting_user") == 1
        assert sum(states.values()) == 1
        assert value(s, "device_agent_build_info", version=__version__) == 1
        assert value(s, "device_agent_codes_issued_total") == 1
        assert value(s, "device_agent_throttled_periods_total") == 0
        assert value(s, "device_agent_refreshes_total", result="ok") == 0
        assert value(s, "device_agent_refreshes_total", result="failed") == 0
        # No token: no expiry sample at all (its HELP and TYPE stay).
        assert not series(s, "device_agent_token_expiry_seconds")
        assert "# TYPE device_agent_token_expiry_seconds gauge" in text
        count = "device_agent_provider_request_duration_seconds_count"
        assert value(s, count, endpoint="discovery") == 1
        assert value(s, count, endpoint="device") == 1
        # Every endpoint is there from the start, at 0, so rate() works at once.
        assert value(s, count, endpoint="revoke") == 0
        assert value(s, count, endpoint="userinfo") == 0

        provider.approve()
        await run.until_phase(Phase.SIGNED_IN)
        s = await api.scrape()
        assert value(s, "device_agent_state", state="signed_in") == 1
        assert value(s, "device_agent_state", state="awaiting_user") == 0
        assert value(s, "device_agent_token_expiry_seconds") == 3600
        assert value(s, "device_agent_token_expiry_timestamp_seconds") == run.clock.time() + 3600
        polls = value(s, count, endpoint="token")
        assert polls is not None and polls >= 1

        # A refresh that works.
        assert await api.post("/v1/refresh") == 200
        s = await api.scrape()
        assert value(s, "device_agent_refreshes_total", result="ok") == 1
        assert value(s, "device_agent_refreshes_total", result="failed") == 0
        assert value(s, count, endpoint="token") == polls + 1

        # One that fails: the provider's proxy answers 503.
        run.clock.advance(11)  # past the least gap between two refreshes
        provider.script("token", Fail(503))
        assert await api.post("/v1/refresh") == 502
        s = await api.scrape()
        assert value(s, "device_agent_refreshes_total", result="ok") == 1
        assert value(s, "device_agent_refreshes_total", result="failed") == 1
        assert value(s, "device_agent_state", state="refresh_failing") == 1
        # The expiry counts down with the clock, between changes too.
        assert value(s, "device_agent_token_expiry_seconds") == 3600 - 11

        # The agent retries by itself, and mends it.
        await run.until_phase(Phase.SIGNED_IN)
        s = await api.scrape()
        assert value(s, "device_agent_refreshes_total", result="ok") == 2
        assert value(s, "device_agent_refreshes_total", result="failed") == 1

        # Sign-out: both tokens revoked, no expiry, and a new code.
        assert await api.post("/v1/logout") == 200
        await run.until_phase(Phase.AWAITING_USER)
        s = await api.scrape()
        assert value(s, "device_agent_state", state="awaiting_user") == 1
        assert not series(s, "device_agent_token_expiry_seconds")
        assert not series(s, "device_agent_token_expiry_timestamp_seconds")
        assert value(s, count, endpoint="revoke") == 2
        assert value(s, "device_agent_codes_issued_total") == 2
        # Counters never go back.
        assert value(s, "device_agent_refreshes_total", result="ok") == 2


async def test_a_refused_refresh_token_counts_as_a_failed_refresh(
        start_driver: StartDriver, provider: IdentityProvider, socket_dir: Path) -> None:
    run, metrics = await started(start_driver)
    async with served(run, socket_dir / "agent.sock", metrics=metrics) as api:
        await run.until_phase(Phase.AWAITING_USER)
        provider.approve()
        await run.until_phase(Phase.SIGNED_IN)
        provider.revoke_refresh_tokens()
        assert await api.post("/v1/refresh") == 502
        s = await api.scrape()
        assert value(s, "device_agent_refreshes_total", result="failed") == 1
        assert value(s, "device_agent_refreshes_total", result="ok") == 0
        # A new sign-in starts beside the token still served.
        await run.until_phase(Phase.AWAITING_USER)
        s = await api.scrape()
        assert value(s, "device_agent_codes_issued_total") == 2
        assert value(s, "device_agent_token_expiry_seconds") == 3600


async def test_a_throttled_period_is_counted_once_however_many_refusals_it_holds(
        start_driver: StartDriver, provider: IdentityProvider, socket_dir: Path) -> None:
    # authentik's 429 slow_down, then the same word with a 400: one period, two refusals.
    provider.script("device", Answer(429, json={"error": "slow_down"}),
                    Answer(400, json={"error": "slow_down"}))
    run, metrics = await started(start_driver)
    async with served(run, socket_dir / "agent.sock", metrics=metrics) as api:
        await run.until_phase(Phase.THROTTLED)
        s = await api.scrape()
        assert value(s, "device_agent_state", state="throttled") == 1
        assert value(s, "device_agent_throttled_periods_total") == 1
        assert value(s, "device_agent_codes_issued_total") == 0
        await run.until_phase(Phase.AWAITING_USER)
        s = await api.scrape()
        assert value(s, "device_agent_throttled_periods_total") == 1
        assert value(s, "device_agent_codes_issued_total") == 1
        count = "device_agent_provider_request_duration_seconds_count"
        assert value(s, count, endpoint="device") == 3  # refused twice, then a code

        # A person asks for another code, and the provider refuses again: a new period.
        provider.script("device", Answer(429, json={"error": "slow_down"}))
        assert await api.post("/v1/login") == 202
        await run.until_phase(Phase.THROTTLED)
        s = await api.scrape()
        assert value(s, "device_agent_throttled_periods_total") == 2
        assert value(s, "device_agent_codes_issued_total") == 1


async def test_provider_latency_lands_in_its_bucket(
        start_driver: StartDriver, provider: IdentityProvider, socket_dir: Path) -> None:
    provider.script("discovery", Delay(0.3))  # real time, as a slow network takes it
    run, metrics = await started(start_driver)
    async with served(run, socket_dir / "agent.sock", metrics=metrics) as api:
        await run.until_phase(Phase.AWAITING_USER)
        s = await api.scrape()
    name = "device_agent_provider_request_duration_seconds"
    assert value(s, f"{name}_bucket", endpoint="discovery", le="0.25") == 0
    assert value(s, f"{name}_bucket", endpoint="discovery", le="10.0") == 1
    assert value(s, f"{name}_bucket", endpoint="discovery", le="+Inf") == 1
    total = value(s, f"{name}_sum", endpoint="discovery")
    assert total is not None and 0.3 <= total < 10
    # The device request was not slowed.
    assert value(s, f"{name}_bucket", endpoint="device", le="0.25") == 1


async def test_metrics_without_a_recorder_of_their_own_still_parse(
        start_driver: StartDriver, socket_dir: Path) -> None:
    # build_app attaches one itself when none is given (as the other tests' apps do).
    run = await start_driver()
    async with served(run, socket_dir / "agent.sock") as api:
        await run.until_phase(Phase.AWAITING_USER)
        s = await api.scrape()
    assert value(s, "device_agent_state", state="awaiting_user") == 1


@needs_root
async def test_metrics_need_the_read_right_as_status_does(
        start_driver: StartDriver, socket_dir: Path) -> None:
    run = await start_driver()
    await run.until_phase(Phase.AWAITING_USER)
    policies = {"none": AccessPolicy(), "reader": AccessPolicy(read_users=["nobody"])}
    async with contextlib.AsyncExitStack() as stack:
        for name, policy in policies.items():
            await stack.enter_async_context(
                served(run, socket_dir / f"{name}.sock", policy=policy))
        nobody = {"uid": NOBODY, "gid": NOBODY}
        for name, expected in (("none", 403), ("reader", 200)):
            for target in ("/v1/metrics", "/v1/status"):
                got = await asyncio.to_thread(as_other_user, socket_dir / f"{name}.sock",
                                              "GET", target, **nobody)
                assert got == expected, (name, target)


async def test_no_secret_reaches_the_metrics_or_the_textfile(
        start_driver: StartDriver, provider: IdentityProvider, socket_dir: Path,
        tmp_path: Path, clock: ManualClock) -> None:
    run, metrics = await started(start_driver)
    path = tmp_path / "device_agent.prom"
    # Its minute on a clock of its own, which nothing moves: the lifecycle's waits then
    # never jump to it while a request is out.
    writer = asyncio.create_task(Textfile(metrics, path, clock=ManualClock()).run())
    texts: list[tuple[str, str]] = []

    async def look(step: str, api: MetricsClient) -> None:
        status, _, text = await api.get()
        assert status == 200
        parse(text)
        texts.append((f"GET /v1/metrics {step}", text))
        # max_seconds=0 here and below: the write is real I/O; moving the clock while
        # it is under way would move what is expected of it.
        await clock.run_until(lambda: path.exists() and path.read_text() == metrics.render(),
                              max_seconds=0)
        texts.append((f"textfile {step}", path.read_text()))

    try:
        async with served(run, socket_dir / "agent.sock", metrics=metrics) as api:
            await run.until_phase(Phase.AWAITING_USER)
            await look("awaiting the user", api)
            provider.approve()
            await run.until_phase(Phase.SIGNED_IN)
            await look("signed in", api)
            assert await api.post("/v1/refresh") == 200
            await look("refreshed", api)
            # A refresh answer cut short holds real tokens; an invalid_grant echoes one.
            for action in (Answer(200, body=b'{"access_token": "'
                                  + provider.issue_tokens()["access_token"].encode()),
                           Answer(400, json={"error": "invalid_grant",
                                             "error_description": " ".join(
                                                 provider.live_refresh_tokens())})):
                run.clock.advance(11)
                provider.script("token", action)
                assert await api.post("/v1/refresh") == 502
                await look(f"after {action.status}", api)
            await run.until_phase(Phase.AWAITING_USER)
            provider.approve()
            await run.until(lambda s: s.phase == Phase.SIGNED_IN and s.user_code is None)
            await look("signed in again", api)
            assert await api.post("/v1/logout") == 200
            await run.until_phase(Phase.AWAITING_USER)
            await look("signed out", api)
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
    issued = provider.issued_secrets()
    assert len(issued["refresh_token"]) >= 3 and len(issued["device_code"]) >= 2
    leaks = _sweep({**issued, "client_secret": [CLIENT_SECRET]}, texts)
    assert not leaks, "\n".join(leaks)


# -- the text format itself ---------------------------------------------------------

def test_help_text_and_label_values_are_escaped_as_the_format_says() -> None:
    awkward = 'C:\\DIR\\FILE.TXT "quoted"\nsecond line'
    text = family_text("device_agent_odd_info", "gauge", 'back\\slash and\nnewline "as is"',
                       [("device_agent_odd_info", {"path": awkward, "plain": "x"}, 1)])
    assert text == (
        '# HELP device_agent_odd_info back\\\\slash and\\nnewline "as is"\n'
        "# TYPE device_agent_odd_info gauge\n"
        'device_agent_odd_info{path="C:\\\\DIR\\\\FILE.TXT \\"quoted\\"\\nsecond line",'
        'plain="x"} 1\n')
    (family,) = text_string_to_metric_families(text)
    assert family.documentation == 'back\\slash and\nnewline "as is"'
    assert family.samples[0].labels == {"path": awkward, "plain": "x"}


def test_values_are_written_as_go_parses_them() -> None:
    text = family_text("device_agent_values", "gauge", "Values.", [
        ("device_agent_values", {"v": "int"}, 3),
        ("device_agent_values", {"v": "float"}, 0.25),
        ("device_agent_values", {"v": "big"}, 1.8e9),
        ("device_agent_values", {"v": "inf"}, float("inf")),
        ("device_agent_values", {"v": "-inf"}, float("-inf")),
        ("device_agent_values", {"v": "nan"}, float("nan")),
    ])
    lines = text.splitlines()[2:]
    assert [line.rsplit(" ", 1)[1] for line in lines] == [
        "3", "0.25", "1800000000.0", "+Inf", "-Inf", "NaN"]
    parse(text)


# -- the textfile -------------------------------------------------------------------

async def test_the_textfile_is_replaced_whole_with_mode_0644_on_change_and_every_minute(
        start_driver: StartDriver, provider: IdentityProvider, tmp_path: Path,
        clock: ManualClock) -> None:
    # The writer's minute is a deadline on the hand-moved clock, to which waiting jumps
    # while a request is out: codes must outlive such a jump.
    provider.settings.code_lifetime = 600
    old_umask = os.umask(0o077)  # the file's mode must not depend on the umask
    run, metrics = await started(start_driver)
    directory = tmp_path / "textfile_collector"
    directory.mkdir()
    path = directory / "device_agent.prom"
    writer = asyncio.create_task(Textfile(metrics, path, clock=clock).run())

    def holds(fragment: str) -> bool:
        return path.exists() and fragment in path.read_text()

    try:
        await run.until_phase(Phase.AWAITING_USER)
        await clock.run_until(lambda: holds('device_agent_state{state="awaiting_user"} 1'),
                              max_seconds=0)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert path.read_text() == metrics.render()
        parse(path.read_text())
        with path.open() as old:
            before = old.read()
            provider.approve()
            await run.until_phase(Phase.SIGNED_IN)
            await clock.run_until(lambda: holds('device_agent_state{state="signed_in"} 1'),
                                  max_seconds=0)
            # Renamed into place, never written over: a reader that opened the old file
            # reads it whole, and the name is another file now.
            old.seek(0)
            assert old.read() == before
            assert os.fstat(old.fileno()).st_ino != path.stat().st_ino
        assert stat.S_IMODE(path.stat().st_mode) == 0o644

        # Nothing changes for a minute: the file is written all the same, so the expiry
        # in it counts down.
        def expiry() -> float | None:
            return value(parse(path.read_text()), "device_agent_token_expiry_seconds")

        await asyncio.sleep(0.1)  # the writes of the sign-in are done
        written = expiry()
        assert written is not None and 3000 < written <= 3600
        await clock.run_until(lambda: expiry() != written, max_seconds=60)
        assert expiry() == written - 60
        # Only the file: no temporary copy is left for the collector's *.prom glob.
        assert os.listdir(directory) == ["device_agent.prom"]
    finally:
        os.umask(old_umask)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer


def test_a_reader_never_sees_a_textfile_half_written(tmp_path: Path) -> None:
    path = tmp_path / "device_agent.prom"
    texts = [family_text("device_agent_fill_info", "gauge", "Filler.",
                         [("device_agent_fill_info", {"n": str(n), "pad": "x" * 20_000}, 1)])
             for n in range(2)]
    write_textfile(path, texts[0])
    done = threading.Event()
    seen: list[str] = []

    def read() -> None:
        while not done.is_set():
            seen.append(path.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(100):
            write_textfile(path, texts[n % 2])
    finally:
        done.set()
        reader.join()
    assert seen and set(seen) <= set(texts)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


async def test_a_textfile_directory_that_is_missing_is_said_once_and_is_not_fatal(
        start_driver: StartDriver, tmp_path: Path, clock: ManualClock,
        caplog: pytest.LogCaptureFixture) -> None:
    run, metrics = await started(start_driver)
    path = tmp_path / "not-yet" / "device_agent.prom"
    minutes = ManualClock()  # the writer's own, moved by hand below
    writer = asyncio.create_task(Textfile(metrics, path, clock=minutes).run())
    try:
        await run.until_phase(Phase.AWAITING_USER)
        await clock.run_until(lambda: any(str(path) in r.getMessage()
                                          for r in caplog.records), max_seconds=0)
        for _ in range(2):
            minutes.advance(60)
            await asyncio.sleep(0.1)
        failures = [r for r in caplog.records if str(path) in r.getMessage()]
        assert len(failures) == 1, [r.getMessage() for r in failures]
        assert failures[0].levelname == "WARNING"
        assert not writer.done()
        path.parent.mkdir()
        minutes.advance(60)
        await clock.run_until(path.exists, max_seconds=0)
        assert not run.task.done()
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer


# -- the config ---------------------------------------------------------------------

def _minimal(**metrics: object) -> dict[str, Any]:
    return {"provider": {"issuer": ISSUER, "client_id": "my-device"}, "metrics": metrics}


def test_the_textfile_is_off_by_default_and_a_relative_path_is_the_files(
        tmp_path: Path) -> None:
    assert config_from_mapping({"provider": {"issuer": ISSUER, "client_id": "x"}}
                               ).metrics.textfile is None
    assert config_from_mapping(_minimal(textfile=None)).metrics.textfile is None
    config = tmp_path / "config.yaml"
    config.write_text(f"provider: {{issuer: '{ISSUER}', client_id: x}}\n"
                      "metrics:\n  textfile: node/device_agent.prom\n")
    assert load_config(config).metrics.textfile == tmp_path / "node" / "device_agent.prom"


@pytest.mark.parametrize(("metrics", "key", "fragment"), [
    ({"textfile": "/var/lib/node_exporter/device_agent.txt"}, "metrics.textfile", "*.prom"),
    ({"textfile": "/var/lib/node_exporter/"}, "metrics.textfile", "*.prom"),
    ({"textfile": "/var/lib/node_exporter/.prom"}, "metrics.textfile", "*.prom"),
    ({"textfile": 7}, "metrics.textfile", "a string"),
    ({"textfile": ""}, "metrics.textfile", "empty"),
    ({"text_file": "/x/a.prom"}, "metrics.text_file", "did you mean 'textfile'"),
])
def test_a_broken_metrics_key_is_named(metrics: dict[str, object], key: str,
                                       fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(_minimal(**metrics))
    assert caught.value.key == key
    assert fragment in caught.value.message


def test_a_metrics_section_that_is_not_a_mapping_is_named() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"provider": {"issuer": ISSUER, "client_id": "x"},
                             "metrics": ["textfile"]})
    assert caught.value.key == "metrics"


def test_check_config_exits_78_on_a_textfile_without_the_suffix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"provider: {{issuer: '{ISSUER}', client_id: x}}\n"
                      "metrics:\n  textfile: /var/lib/node_exporter/device_agent\n")
    assert main(["check-config", str(config)]) == 78
    out = capsys.readouterr()
    assert "metrics.textfile" in out.out + out.err
    assert "line 3" in out.out + out.err


# -- the daemon ---------------------------------------------------------------------

async def test_the_daemon_counts_from_its_start_and_writes_the_textfile(
        provider: IdentityProvider, clock: ManualClock, tmp_path: Path,
        socket_dir: Path) -> None:
    textfile = tmp_path / "collector" / "device_agent.prom"
    textfile.parent.mkdir()
    config = config_from_mapping({
        "provider": {"issuer": provider.issuer, "client_id": "device-agent",
                     "client_secret": CLIENT_SECRET, "allow_insecure_http": True},
        "display": {"type": "none"},
        "storage": {"path": str(tmp_path / "state" / "credentials.json")},
        "api": {"socket": str(socket_dir / "agent.sock")},
        "metrics": {"textfile": str(textfile)},
    })
    ready: asyncio.Future[Driver] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, shutdown=stop.wait(), clock=clock,
                                     use_default_display=False,
                                     on_ready=ready.set_result))
    try:
        driver = await asyncio.wait_for(ready, 5)
        # In real time only: the clock is not moved, so the code cannot expire meanwhile.
        await clock.run_until(lambda: driver.snapshot.phase == Phase.AWAITING_USER,
                              max_seconds=0)
        client = MetricsClient(socket_dir / "agent.sock")
        try:
            s = await client.scrape()
        finally:
            await client.http.close()
        count = "device_agent_provider_request_duration_seconds_count"
        # The discovery went out before the API was up: counted all the same.
        assert value(s, count, endpoint="discovery") == 1
        assert value(s, "device_agent_codes_issued_total") == 1
        await clock.run_until(lambda: textfile.exists() and 'state="awaiting_user"} 1'
                              in textfile.read_text(), max_seconds=0)
        assert stat.S_IMODE(textfile.stat().st_mode) == 0o644
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
