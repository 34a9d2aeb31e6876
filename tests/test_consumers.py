"""Token files and hooks, driven by a real driver signing in against the test provider."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from agent.config import HookConfig, SinkConfig
from agent.consumers import Consumers, hooks_from_config, token_files_from_config
from agent.errors import ConfigError
from agent.hooks import Hook, HookRunner
from agent.idp import IdentityProvider
from agent.oauth import TokenSet
from agent.sinks import TokenFile, render_sink
from agent.state import Phase
from tests.harness import Running, StartDriver


async def signed_in(start_driver: StartDriver, provider: IdentityProvider,
                    consumers_for: object) -> Running:
    run = await start_driver()
    assert callable(consumers_for)
    consumers_for(run)
    await run.until_phase(Phase.AWAITING_USER)
    provider.approve()
    await run.until_phase(Phase.SIGNED_IN)
    return run


async def test_files_follow_sign_in_refresh_and_logout(
        start_driver: StartDriver, provider: IdentityProvider, tmp_path: Path) -> None:
    group = "nogroup" if os.geteuid() == 0 else None
    sinks = [
        SinkConfig(path=tmp_path / "out" / "token", format="raw"),
        SinkConfig(path=tmp_path / "out" / "token.json", format="json", mode=0o640,
                   group=group),
        SinkConfig(path=tmp_path / "out" / "token.env", format="env", env_prefix="MY_",
                   on_logout="empty"),
    ]
    (tmp_path / "out").mkdir()
    holder: list[Consumers] = []

    def attach(run: Running) -> None:
        holder.append(Consumers(run.driver, token_files_from_config(sinks), HookRunner(())))

    run = await signed_in(start_driver, provider, attach)
    consumers = holder[0]
    await consumers.flush()
    token = (await run.driver.get_token()).access_token
    raw, js, env = (tmp_path / "out" / n for n in ("token", "token.json", "token.env"))
    assert raw.read_text() == token + "\n"
    body = json.loads(js.read_text())
    assert body["access_token"] == token and body["token_type"] == "Bearer"
    assert body["expires_at"].endswith("Z")
    assert env.read_text().splitlines()[0] == f"MY_ACCESS_TOKEN={token}"
    assert stat.S_IMODE(raw.stat().st_mode) == 0o600
    assert stat.S_IMODE(js.stat().st_mode) == 0o640
    if group:
        assert js.stat().st_gid == 65534

    await run.driver.refresh()
    await consumers.flush()
    newer = (await run.driver.get_token()).access_token
    assert newer != token and raw.read_text() == newer + "\n"
    assert json.loads(js.read_text())["access_token"] == newer

    await run.driver.logout()
    await consumers.flush()
    assert not raw.exists() and not js.exists()
    assert env.exists() and env.read_text() == ""
    await consumers.aclose()


def test_env_sink_refuses_what_an_environment_file_cannot_carry() -> None:
    tokens = TokenSet(access_token="a b\nEVIL=1", token_type="Bearer", issued_at=0,
                      expires_at=None)
    with pytest.raises(ValueError, match="ACCESS_TOKEN"):
        render_sink("env", tokens, expires_at=None)
    with pytest.raises(ValueError):
        render_sink("xml", tokens, expires_at=None)


def test_unknown_owner_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sinks\[0\]\.owner"):
        token_files_from_config([SinkConfig(path=tmp_path / "t", owner="no-such-user-xyz")])


RECORDER = r"""
import json, os, sys
with open(sys.argv[1], "a") as out:
    out.write(json.dumps({"argv": sys.argv[2:], "event": os.environ["DEVICE_AGENT_EVENT"],
                          "token": os.environ.get("ACCESS_TOKEN"),
                          "user": os.environ.get("DEVICE_AGENT_USER"),
                          "code": os.environ.get("DEVICE_AGENT_USER_CODE")}) + "\n")
"""


async def test_hooks_get_argv_events_and_the_token_only_when_asked(
        start_driver: StartDriver, provider: IdentityProvider, tmp_path: Path) -> None:
    log_file = tmp_path / "hooks.jsonl"
    configs = [
        HookConfig(command=(sys.executable, "-c", RECORDER, str(log_file), "plain", "x y"),
                   events=("token_changed", "signed_in", "sign_in_needed", "signed_out")),
        HookConfig(command=(sys.executable, "-c", RECORDER, str(log_file), "with-token"),
                   events=("token_changed",), pass_token=True),
    ]
    runner = HookRunner(hooks_from_config(configs))
    holder: list[Consumers] = []

    def attach(run: Running) -> None:
        holder.append(Consumers(run.driver, [], runner))

    run = await signed_in(start_driver, provider, attach)
    token = (await run.driver.get_token()).access_token
    await holder[0].flush()
    await runner.drain()
    await run.driver.logout()
    await holder[0].flush()
    await runner.drain()
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    plain = [r for r in records if r["argv"][0] == "plain"]
    assert all(r["argv"] == ["plain", "x y"] for r in plain)
    assert {r["event"] for r in plain} == {"sign_in_needed", "token_changed", "signed_in",
                                           "signed_out"}
    assert all(r["token"] is None for r in plain)
    assert next(r for r in plain if r["event"] == "sign_in_needed")["code"]
    assert next(r for r in plain if r["event"] == "signed_in")["user"] == "Alice Example"
    with_token = [r for r in records if r["argv"][0] == "with-token"]
    assert with_token and with_token[0]["token"] == token
    assert all(status == 0 for _, _, status in runner.results)
    await holder[0].aclose()


async def test_stuck_hook_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = f"sleep 30 & echo $! > {pid_file}; wait"
    runner = HookRunner((Hook(command=("/bin/sh", "-c", script), timeout=0.3),))
    started = time.monotonic()
    runner.fire("token_changed", {})
    await runner.drain()
    assert time.monotonic() - started < 5
    assert runner.results == [("sh", "token_changed", None)]
    child = int(pid_file.read_text())
    await asyncio.sleep(0.05)
    # Gone, or a zombie waiting for a reaper: either way, no longer running.
    try:
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z", "X")


async def test_failing_and_missing_hooks_are_logged_not_fatal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    runner = HookRunner((Hook(command=("/bin/sh", "-c", "echo oops >&2; exit 3")),
                         Hook(command=(str(tmp_path / "missing"),))))
    runner.fire("token_changed", {})
    await runner.drain()
    assert sorted(runner.results, key=str) == sorted(
        [("sh", "token_changed", 3), ("missing", "token_changed", None)], key=str)
    text = caplog.text
    assert "oops" in text and "status 3" in text and "could not start" in text


async def test_events_during_a_run_fold_into_one_more_run(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    runner = HookRunner((Hook(command=("/bin/sh", "-c", f"sleep 0.1; echo run >> {out}")),))
    for _ in range(5):
        runner.fire("token_changed", {})
    await runner.drain()
    assert out.read_text().count("run") == 2


async def test_token_changed_hook_runs_after_the_files_are_written(
        start_driver: StartDriver, provider: IdentityProvider, tmp_path: Path) -> None:
    class SlowCard(TokenFile):
        """A token file on an SD card whose fsync takes a while."""

        def write(self, tokens: TokenSet, *, expires_at: float | None) -> None:
            time.sleep(0.2)
            super().write(tokens, expires_at=expires_at)

    token_file, seen = tmp_path / "token", tmp_path / "seen"
    runner = HookRunner((Hook(command=("/bin/sh", "-c", f"cat {token_file} > {seen} 2>&1"),
                              events=frozenset({"token_changed"})),))
    holder: list[Consumers] = []

    def attach(run: Running) -> None:
        holder.append(Consumers(run.driver, [SlowCard(sink=SinkConfig(path=token_file))], runner))

    run = await signed_in(start_driver, provider, attach)
    await holder[0].flush()
    await runner.drain()
    assert seen.read_text() == (await run.driver.get_token()).access_token + "\n"
    await holder[0].aclose()


def _tokens() -> TokenSet:
    return TokenSet(access_token="a" * 40, token_type="Bearer", issued_at=0.0,
                    expires_at=3600.0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another uid")
@pytest.mark.parametrize("swap", ["parent", "final", "world_writable"])
def test_a_token_file_follows_no_symlink_on_its_way(tmp_path: Path, swap: str) -> None:
    # Issue 9 item 6: run as root with an owner, a user who owns a parent directory
    # swapped a component for a symlink and had a file written and chowned anywhere.
    from agent.sinks import TokenFile

    victim = tmp_path / "etc"
    victim.mkdir()
    users = tmp_path / "home"
    (users / "sub").mkdir(parents=True)
    os.chown(users, 4242, 4242)
    path = users / "sub" / "token"
    sink = TokenFile(sink=SinkConfig(path=path, format="raw"), uid=4242, gid=4242)
    if swap == "parent":
        (users / "sub").rmdir()
        (users / "sub").symlink_to(victim)
    elif swap == "final":
        path.parent.rmdir()
        path.parent.symlink_to(victim)
        path = path.parent / "token"
    else:
        (users / "sub").chmod(0o777)
    with pytest.raises(OSError):
        sink.write(_tokens(), expires_at=None)
    assert list(victim.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another uid")
def test_a_token_file_in_the_readers_own_directory_is_written(tmp_path: Path) -> None:
    from agent.sinks import TokenFile

    home = tmp_path / "pi"
    home.mkdir()
    os.chown(home, 4242, 4242)
    path = home / "token"
    TokenFile(sink=SinkConfig(path=path, format="raw"), uid=4242, gid=4242).write(
        _tokens(), expires_at=None)
    assert path.read_text() == "a" * 40 + "\n"
    assert path.stat().st_uid == 4242
