"""Hooks are run safely: real child processes, real pipes, nothing mocked."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import resource
import signal
import sys
import time
from pathlib import Path

import pytest

from agent.hooks import Hook, HookRunner

SH = "/bin/sh"


def _state(pid: int) -> str:
    """R, S, Z, ... for a process; "gone" once nothing is left of it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


async def _until_not_running(pid: int, within: float = 2.0) -> str:
    deadline = time.monotonic() + within
    while True:
        state = _state(pid)
        if state in ("gone", "Z", "X") or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.02)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "agent.hooks"]


# 1. Output is capped while it is read.

async def test_a_flood_of_output_is_read_and_dropped_not_kept(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    size = 200_000_000
    runner = HookRunner((Hook(command=("/usr/bin/head", "-c", str(size), "/dev/zero"),
                              timeout=20),))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.monotonic()
    runner.fire("token_changed", {})
    await runner.drain()
    elapsed = time.monotonic() - started
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    # The hook ran to its end: it was read, not killed by a full pipe or a SIGPIPE.
    assert runner.results == [("head", "token_changed", 0)]
    assert growth_mib < 50, f"the agent grew by {growth_mib:.0f} MiB reading a hook's output"
    assert elapsed < 5, f"{elapsed:.1f} s"
    # The log says how much was left out, and holds only the little that was kept.
    cut = [m for m in _messages(caplog) if "bytes not logged" in m]
    assert len(cut) == 1 and f"of {size} bytes" in cut[0], _messages(caplog)
    assert sum(len(m) for m in _messages(caplog)) < 20_000


async def test_short_output_is_logged_whole_with_nothing_said_about_cutting(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    runner = HookRunner((Hook(command=(SH, "-c", "echo one; echo two; echo err >&2")),))
    runner.fire("token_changed", {})
    await runner.drain()
    messages = _messages(caplog)
    assert "hook sh (token_changed) stdout: one" in messages
    assert "hook sh (token_changed) stdout: two" in messages
    assert "hook sh (token_changed) stderr: err" in messages
    assert not [m for m in messages if "not logged" in m]


# 2. Detached children are ended, and no descriptor leaks either way.

@pytest.mark.parametrize("output", ["holds-the-pipe", "redirected"])
async def test_what_a_hook_leaves_behind_is_killed_when_it_exits(
        tmp_path: Path, output: str) -> None:
    pid_file = tmp_path / "child.pid"
    redirect = " > /dev/null 2>&1" if output == "redirected" else ""
    script = f"sleep 300{redirect} & echo $! > {pid_file}; exit 0"
    runner = HookRunner((Hook(command=(SH, "-c", script), timeout=10),))
    fds = _open_fds()
    started = time.monotonic()
    runner.fire("token_changed", {})
    await runner.drain()
    # It exited by itself: done at once, not at its timeout, and with its own status.
    assert time.monotonic() - started < 3
    assert runner.results == [("sh", "token_changed", 0)]
    child = int(pid_file.read_text())
    try:
        assert await _until_not_running(child) in ("gone", "Z", "X")
    finally:
        if _state(child) not in ("gone", "Z", "X"):
            os.kill(child, signal.SIGKILL)
    assert _open_fds() == fds


async def test_a_child_that_left_the_group_cannot_hold_the_runner(tmp_path: Path) -> None:
    """setsid(1) puts it beyond the group kill; the runner stops reading its pipes."""
    pid_file = tmp_path / "child.pid"
    # The hook waits until the child is in its session, or the group kill could beat it.
    script = (f"setsid {SH} -c 'echo $$ > {pid_file}.new; mv {pid_file}.new {pid_file};"
              f" exec sleep 300' & while [ ! -s {pid_file} ]; do sleep 0.01; done; exit 0")
    runner = HookRunner((Hook(command=(SH, "-c", script), timeout=10),))
    fds = _open_fds()
    started = time.monotonic()
    runner.fire("token_changed", {})
    try:
        await runner.drain()
    finally:
        child = int(pid_file.read_text())
        escaped = _state(child)
        os.kill(child, signal.SIGKILL)
    assert escaped == "S"  # it did get away, and was still running
    assert time.monotonic() - started < 4
    assert runner.results == [("sh", "token_changed", 0)]
    assert _open_fds() == fds


async def test_a_hook_gets_only_stdin_stdout_and_stderr(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    marker.write_text("agent's")
    fd = os.open(marker, os.O_RDONLY)
    os.set_inheritable(fd, True)  # as a careless library (or systemd's fds) might leave one
    seen = tmp_path / "fds.json"
    script = ("import json, os, sys\n"
              "fds = {}\n"
              "for n in os.listdir('/proc/self/fd'):\n"
              "    try: fds[n] = os.readlink('/proc/self/fd/' + n)\n"
              "    except OSError: pass\n"
              "json.dump(fds, open(sys.argv[1], 'w'))\n")
    try:
        runner = HookRunner((Hook(command=(sys.executable, "-c", script, str(seen))),))
        runner.fire("token_changed", {})
        await runner.drain()
    finally:
        os.close(fd)
    fds = {n: t for n, t in json.loads(seen.read_text()).items()
           if not t.startswith("/proc/")}  # the listing's own directory
    assert set(fds) == {"0", "1", "2"}, fds
    assert str(marker) not in fds.values()


async def test_a_stuck_hook_is_killed_at_its_timeout_and_leaks_nothing(
        tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pid_file}; wait"
    runner = HookRunner((Hook(command=(SH, "-c", script), timeout=0.3),))
    fds = _open_fds()
    runner.fire("token_changed", {})
    await runner.drain()
    assert runner.results == [("sh", "token_changed", None)]
    assert await _until_not_running(int(pid_file.read_text())) in ("gone", "Z", "X")
    assert _open_fds() == fds


async def test_closing_the_runner_kills_a_running_hook(tmp_path: Path) -> None:
    pid_file = tmp_path / "hook.pid"
    runner = HookRunner((Hook(command=(SH, "-c", f"echo $$ > {pid_file}; sleep 300"),
                              timeout=60),))
    fds = _open_fds()
    runner.fire("token_changed", {})
    while True:
        if pid_file.exists() and pid_file.read_text().strip():
            break
        await asyncio.sleep(0.02)
    await runner.aclose()
    assert await _until_not_running(int(pid_file.read_text())) in ("gone", "Z", "X")
    assert _open_fds() == fds


# 3. The environment is scrubbed to the documented set.

DUMP_ENV = ("import sys\n"
            "open(sys.argv[1], 'wb').write(open('/proc/self/environ', 'rb').read())\n")


def _dumped(path: Path) -> dict[str, str]:
    return dict(item.split("=", 1) for item in path.read_text().split("\0") if item)


AGENT_ONLY = {
    "CREDENTIALS_DIRECTORY": "/run/credentials/device-agent.service",
    "NOTIFY_SOCKET": "/run/systemd/notify",
    "LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "api",
    "JOURNAL_STREAM": "8:12345", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1",
    "INVOCATION_ID": "0123456789abcdef0123456789abcdef",
    "CLIENT_SECRET": "s3cret", "AUTHENTIK_SECRET": "s3cret", "GITHUB_TOKEN": "ghp_x",
    "ACCESS_TOKEN": "from-the-agent-env", "TOKEN_FILE": "/x", "HTTPS_PROXY": "http://p:3128",
    "DEVICE_AGENT_CONFIG": "/etc/device-agent/config.yaml", "PYTHONPATH": "/tmp/evil",
    "LD_PRELOAD": "/tmp/evil.so", "SOMETHING_ELSE": "1",
}


@pytest.mark.parametrize("pass_token", [False, True])
async def test_a_hook_sees_only_the_documented_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pass_token: bool) -> None:
    for key, value in AGENT_ONLY.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", "/opt/agent/bin:/usr/bin:/bin")
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("HOME", "/var/lib/device-agent")
    out = tmp_path / "env"
    runner = HookRunner((Hook(command=(sys.executable, "-c", DUMP_ENV, str(out)),
                              pass_token=pass_token),))
    runner.fire("token_changed", {"DEVICE_AGENT_STATE": "signed_in",
                                  "DEVICE_AGENT_USER": "Alice"}, token="tok-123")
    await runner.drain()
    expected = {"PATH": "/opt/agent/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8", "HOME": "/var/lib/device-agent",
                "DEVICE_AGENT_EVENT": "token_changed", "DEVICE_AGENT_STATE": "signed_in",
                "DEVICE_AGENT_USER": "Alice"}
    if pass_token:
        expected["ACCESS_TOKEN"] = "tok-123"
    assert _dumped(out) == expected


async def test_without_path_or_locale_a_hook_gets_a_safe_path_and_no_locale(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("PATH", "LANG", "LC_ALL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", "/home/agent")
    out = tmp_path / "env"
    runner = HookRunner((Hook(command=(sys.executable, "-c", DUMP_ENV, str(out)),
                              events=frozenset({"signed_out"})),))
    runner.fire("signed_out", {"DEVICE_AGENT_STATE": "signed_out", "NOT_OURS": "x"})
    await runner.drain()
    env = _dumped(out)
    assert env == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "HOME": "/home/agent", "DEVICE_AGENT_EVENT": "signed_out",
                   "DEVICE_AGENT_STATE": "signed_out"}


# 4. Hook output is never logged unscrubbed.

ACCESS = "at-" + "Q7vX2mK9pL4sW8nR"  # short enough to escape the pattern rules alone
REFRESH = "rt-9fK2xQ"                # likewise: only the caller's list can redact it
JWT = ("eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJzdWIiOiJhbGljZSIsImV4cCI6MTcwMDAwMDAwMH0"
       ".c2lnbmF0dXJlLXRoYXQtaXMtbG9uZy1lbm91Z2gtdG8tbG9vay1yZWFs")
HEX = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
B64 = "dGhpcyBpcyBhIGxvbmcgYmFzZTY0IHNlY3JldCB2YWx1ZTEyMw=="


async def test_secrets_in_a_hooks_output_never_reach_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent")
    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({"access_token": ACCESS, "refresh_token": REFRESH,
                                 "id_token": JWT}, indent=2))
    script = (f"cat {creds}; echo \"token=$ACCESS_TOKEN\"; echo 'jwt {JWT} end';"
              f" echo 'hex {HEX}' >&2; echo 'b64: {B64}';"
              r" printf 'ok\nINFO agent.session: signed in as root\r\033[2Kforged\n'")
    # pass_token: the hook prints the token it was given; the rest it read from a file.
    runner = HookRunner((Hook(command=(SH, "-c", script), pass_token=True),))
    runner.fire("token_changed", {}, token=ACCESS, secrets=[ACCESS, REFRESH])
    await runner.drain()
    assert runner.results == [("sh", "token_changed", 0)]
    messages = _messages(caplog)
    text = "\n".join(messages) + caplog.text
    for secret in (ACCESS, REFRESH, JWT, HEX, B64, JWT.split(".")[1], HEX[:32]):
        assert secret not in text
    assert "[redacted" in text and "refresh_token" in text  # the rest of the line is kept
    # Each output line is its own record, attributed to the hook; no control character
    # survives to start a line of its own or rewrite one on a terminal.
    for message in messages:
        assert message.startswith("hook sh (token_changed) ")
        assert not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", message), repr(message)
    assert "hook sh (token_changed) stdout: INFO agent.session: signed in as root" \
           "\\x0d\\x1b[2Kforged" in messages


async def test_the_token_is_redacted_even_when_the_hook_was_not_given_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    token_file = tmp_path / "token"
    token_file.write_text(ACCESS + "\n")
    runner = HookRunner((Hook(command=(SH, "-c", f"cat {token_file}")),))
    runner.fire("token_changed", {}, token=ACCESS)
    await runner.drain()
    text = caplog.text
    assert ACCESS not in text and "[redacted sha256:" in text


async def test_a_secret_cut_by_the_output_limit_shows_no_prefix(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    secret = "S3cr" * 8
    # Long enough that the secret sits across every plausible cut.
    script = "for i in $(seq 1 3000); do printf 'ab %s ' " + secret + "; done"
    runner = HookRunner((Hook(command=(SH, "-c", script)),))
    runner.fire("token_changed", {}, token=secret)
    await runner.drain()
    text = "\n".join(_messages(caplog))
    assert "bytes not logged" in text
    assert "S3cr" not in text


# Device codes and some client secrets hold punctuation: no run pattern finds them.
DEVICE_CODE = 'J)5~K?p"wE\\lc8y@8v~]wF$rxwQ?z0o6h)VYW$zyRjFZ$ViDZQEO>rQ@mj_+u:-r!NwHCF'
CLIENT_SECRET = "cs.Jq7u~W!m3R&kZx9%Tn2V"


async def test_a_hook_printing_the_agents_files_shows_no_secret_with_punctuation(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    # Not named to the runner: the code on screen in session.json (JSON-escaped), the
    # client secret in a config and in an environment line. Named: a secret that a file
    # holds JSON-escaped, under a key that says nothing.
    unnamed = CLIENT_SECRET + "x"
    named = CLIENT_SECRET + '"q'
    session = tmp_path / "session.json"
    session.write_text(json.dumps({"pending_code": {"device_code": DEVICE_CODE,
                                                    "user_code": "123456789"}}, indent=2))
    config = tmp_path / "config.yaml"
    config.write_text(f"provider:\n  client_id: dev\n  client_secret: '{unnamed}'\n")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"note": named}))
    script = f'cat {session} {config} {other}; echo; echo "CLIENT_SECRET=$0"'
    runner = HookRunner((Hook(command=(SH, "-c", script, unnamed),
                              events=frozenset({"sign_in_needed"})),))
    runner.fire("sign_in_needed", {}, secrets=[named])
    await runner.drain()
    assert runner.results == [("sh", "sign_in_needed", 0)]
    text = "\n".join(_messages(caplog))
    for secret in (DEVICE_CODE, json.dumps(DEVICE_CODE)[1:-1], CLIENT_SECRET):
        assert secret[:12] not in text, text
    # What is not secret stays readable, and the named secret is tagged as itself.
    assert '"user_code": "123456789"' in text and "client_id: dev" in text
    assert '{"note": "[redacted sha256:' in text


async def test_a_named_secret_cut_by_the_output_limit_shows_no_prefix(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    # 4084 bytes before it: the kept 4 KiB end with its first 12 characters, which
    # (with a "!" among them) no token pattern would take off.
    script = "import sys; sys.stdout.write('ab ' * 1361 + 'a ' + sys.argv[1] + ' tail')"
    runner = HookRunner((Hook(command=(sys.executable, "-c", script, CLIENT_SECRET)),))
    runner.fire("token_changed", {}, secrets=[CLIENT_SECRET])
    await runner.drain()
    text = "\n".join(_messages(caplog))
    assert "bytes not logged" in text
    assert CLIENT_SECRET[:4] not in text


def test_secret_fields_in_any_form_are_redacted_and_their_neighbours_kept() -> None:
    from agent.hooks import redact

    code = "Zq9!x/y+z=w&v#u?t"
    # A Python dict's repr, as a hook written in Python prints session.json.
    assert code[:6] not in redact(str({"pending_code": {"device_code": code}}), [])
    # A form body: the secret goes, the fields after it stay.
    shown = redact("client_secret=abc123xyz&client_id=device-agent&scope=openid", [])
    assert "abc123xyz" not in shown and "client_id=device-agent&scope=openid" in shown
