"""The command line: exit statuses, the commands scripts use, and check-provider,
against a real agent (in this process's loop) on a real socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.cli import EX_CONFIG, EX_NOPERM, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, main
from agent.driver import Driver
from agent.idp import IdentityProvider, ProviderSettings, serve_provider
from agent.service import serve
from agent.state import Phase


def write_config(path: Path, idp: IdentityProvider, tmp: Path, **extra: Any) -> Path:
    data: dict[str, Any] = {
        "provider": {"issuer": idp.issuer, "client_id": "device-agent",
                     "allow_insecure_http": True},
        "display": {"type": "none"},
        "storage": {"path": str(tmp / "state" / "credentials.json")},
        "api": {"socket": str(tmp / "run" / "agent.sock")},
    }
    data.update(extra)
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


@pytest.fixture
async def idp() -> AsyncIterator[IdentityProvider]:
    async with serve_provider(ProviderSettings(interval=1)) as provider:
        yield provider


class Agent:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.driver: Driver | None = None

    async def cli(self, *argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
        status = await asyncio.to_thread(main, [*argv, "--config", str(self.config_path)])
        out, err = capsys.readouterr()
        return status, out, err


@pytest.fixture
def agent_config() -> dict[str, Any]:
    """Extra config sections; a test parametrizes it to change them."""
    return {}


@pytest.fixture
async def agent(idp: IdentityProvider, tmp_path: Path,
                agent_config: dict[str, Any]) -> AsyncIterator[Agent]:
    from agent.config import load_config

    path = write_config(tmp_path / "config.yaml", idp, tmp_path, **agent_config)
    running = Agent(path)
    ready = asyncio.Event()

    def on_ready(driver: Driver) -> None:
        running.driver = driver
        ready.set()

    stop = asyncio.Event()
    task = asyncio.create_task(serve(load_config(path), shutdown=stop.wait(), on_ready=on_ready))
    await asyncio.wait_for(ready.wait(), 5)
    yield running
    stop.set()
    await asyncio.wait_for(task, 5)


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("provider:\n  issuer: https://auth.example.com/application/o/x/\n"
                    "  client_id: x\n")
    assert main(["check-config", str(path)]) == EX_OK
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize(("text", "key"), [
    ("provider:\n  issuer: http://auth.example.com/application/o/x/\n  client_id: x\n",
     "provider.issuer"),
    ("provider:\n  issuer: https://a/application/o/x/\n", "provider.client_id"),
    ("provider:\n  issuer: https://a/application/o/x/\n  client_id: x\nrefresh:\n"
     "  margin: -5s\n", "refresh.margin"),
    ("provider:\n  issuer: https://a/x/\n  client_id: x\n  colour: blue\n", "provider.colour"),
    ("provider:\n  issuer: https://a/x/\n  client_id: x\ndisplay:\n  type: ssd1306\n"
     "  options:\n    adress: 0x3C\n", "display.options.adress"),
])
def test_broken_config_exits_78_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["check-config", str(path)]) == EX_CONFIG
    assert key in capsys.readouterr().err
    assert main(["run", "--config", str(path)]) == EX_CONFIG
    assert key in capsys.readouterr().err


def test_token_without_agent_exits_69(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["token", "--socket", str(tmp_path / "nobody.sock")])
    assert status == EX_UNAVAILABLE
    assert "no agent is listening" in capsys.readouterr().err


async def test_token_status_login_through_the_socket(
        agent: Agent, idp: IdentityProvider, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.driver is not None
    snapshot = await asyncio.wait_for(
        agent.driver.wait_for(lambda s: s.phase == Phase.AWAITING_USER), 5)
    status, out, err = await agent.cli("token", capsys=capsys)
    assert status == EX_TEMPFAIL
    assert snapshot.user_code is not None and snapshot.user_code in err

    status, out, _ = await agent.cli("status", capsys=capsys)
    assert status == EX_OK and "awaiting_user" in out and snapshot.user_code in out

    idp.approve(snapshot.user_code)
    # Real time here: the test provider says interval 5 s; skip the wait by asking for
    # a new code is not what we want, so poll the driver instead.
    await asyncio.wait_for(agent.driver.wait_for(lambda s: s.phase == Phase.SIGNED_IN), 10)

    status, out, _ = await agent.cli("token", capsys=capsys)
    assert status == EX_OK
    assert idp.access_token_valid(out.strip())

    status, out, _ = await agent.cli("token", "--json", capsys=capsys)
    body = json.loads(out)
    assert body["token_type"] == "Bearer" and body["expires_in"] > 3500

    status, out, _ = await agent.cli("status", "--json", capsys=capsys)
    assert json.loads(out)["user"] == "Alice Example"


def _findings(idp: IdentityProvider, tmp_path: Path, **provider: Any) -> Callable[[], int]:
    data: dict[str, Any] = {"issuer": idp.issuer, "client_id": "device-agent",
                            "allow_insecure_http": True}
    data.update(provider)
    path = write_config(tmp_path / "c.yaml", idp, tmp_path, provider=data)
    return lambda: main(["check-provider", "--config", str(path)])


async def test_check_provider_reports_short_codes_with_the_fix(
        idp: IdentityProvider, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = await asyncio.to_thread(_findings(idp, tmp_path))
    out = capsys.readouterr().out
    assert status == EX_OK
    assert "codes expire after 60 s" in out
    assert "Access code validity" in out
    assert "spends one" in out
    assert len([r for r in idp.requests if r.endpoint == "device"]) == 1


async def test_check_provider_without_device_request_spends_nothing(
        idp: IdentityProvider, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check = _findings(idp, tmp_path)
    path = tmp_path / "c.yaml"
    status = await asyncio.to_thread(
        main, ["check-provider", "--config", str(path), "--no-device-request"])
    del check
    assert status == EX_OK
    assert not [r for r in idp.requests if r.endpoint == "device"]


async def test_check_provider_without_offline_access(
        idp: IdentityProvider, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = await asyncio.to_thread(_findings(idp, tmp_path, scopes=["openid"]))
    out = capsys.readouterr().out
    assert status == EX_OK
    assert "lacks offline_access" in out


async def test_check_provider_unknown_client_fails(
        idp: IdentityProvider, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = await asyncio.to_thread(_findings(idp, tmp_path, client_id="nobody"))
    out = capsys.readouterr().out
    assert status == EX_CONFIG
    assert "invalid_client" in out and "client_id" in out


async def test_check_provider_wrong_issuer_explains(
        idp: IdentityProvider, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = idp.issuer.replace("device-agent", "no-such-app")
    status = await asyncio.to_thread(_findings(idp, tmp_path, issuer=wrong))
    out = capsys.readouterr().out
    assert status == EX_CONFIG
    assert "application/o/SLUG/" in out


async def test_login_refresh_logout_commands(
        agent: Agent, idp: IdentityProvider, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert agent.driver is not None
    snapshot = await asyncio.wait_for(
        agent.driver.wait_for(lambda s: s.phase == Phase.AWAITING_USER), 5)
    status, _, err = await agent.cli("refresh", capsys=capsys)
    assert status == EX_TEMPFAIL and "sign-in is in progress" in err
    idp.approve(snapshot.user_code)
    await asyncio.wait_for(agent.driver.wait_for(lambda s: s.phase == Phase.SIGNED_IN), 10)
    status, out, _ = await agent.cli("refresh", capsys=capsys)
    assert status == EX_OK and "refreshed" in out
    status, out, _ = await agent.cli("logout", capsys=capsys)
    assert status == EX_OK and "signed out" in out
    status, out, _ = await agent.cli("login", capsys=capsys)
    assert status == EX_OK and "new code" in out
    # The socket can also come from the environment alone.
    from agent.config import load_config

    monkeypatch.setenv("DEVICE_AGENT_SOCKET", str(load_config(agent.config_path).api.socket))
    status = await asyncio.to_thread(main, ["status"])
    assert status == EX_OK


@pytest.mark.parametrize("agent_config", [{"sign_in": {"codes_per_hour": 1}}])
async def test_login_with_the_budget_spent_exits_75_and_says_when(
        agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.driver is not None
    await asyncio.wait_for(agent.driver.wait_for(lambda s: s.phase == Phase.AWAITING_USER), 5)
    # The one code of this hour is on screen; another cannot come now.
    status, out, err = await agent.cli("login", capsys=capsys)
    assert status == EX_TEMPFAIL
    assert "next one can come at" in err and "new code" not in out


async def test_check_provider_reports_the_endpoints_the_daemon_uses(
        idp: IdentityProvider, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Each configured endpoint wins; the rest come from the metadata, as in the daemon.
    idp.settings.advertise_device_endpoint = False
    device = f"{idp.base_url}/application/o/device/?via=config"
    status = await asyncio.to_thread(_findings(
        idp, tmp_path, device_authorization_endpoint=device))
    out = capsys.readouterr().out
    assert status == EX_OK, out
    assert f"device endpoint {device}" in out
    assert [r.query for r in idp.requests if r.endpoint == "device"] == [{"via": "config"}]


def _planted_socket(directory: Path) -> tuple[Path, socket.socket]:
    """A listening socket: what a local attacker would leave to hand out its token."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    listener.setblocking(False)
    return path, listener


def _accepted(listener: socket.socket) -> bool:
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return False
    return True


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another uid")
@pytest.mark.parametrize("where", ["owned_by_another_user", "world_writable",
                                   "socket_of_another_user"])
def test_token_refuses_a_socket_another_local_user_could_have_planted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    # Issue 9 item 7: a planted fake socket made `device-agent token` print an
    # attacker's token with exit 0.
    stranger = 4242
    directory = tmp_path / "run"
    path, listener = _planted_socket(directory)
    if where == "owned_by_another_user":
        os.chown(directory, stranger, stranger)
    elif where == "world_writable":
        directory.chmod(0o777)
    else:
        os.chown(path, stranger, stranger)
    try:
        status = main(["token", "--socket", str(path)])
        err = capsys.readouterr().err
        assert status == EX_NOPERM, err
        assert "refusing" in err or "not a socket" in err
        assert not _accepted(listener)  # it was never even connected to
    finally:
        listener.close()


def test_a_socket_in_a_sticky_directory_is_trusted_when_its_own_directory_is_ours(
        tmp_path: Path) -> None:
    # /tmp/device-agent-UID under a sticky, world-writable /tmp: the demo's fallback.
    from agent.client import check_socket

    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    path, listener = _planted_socket(sticky / "device-agent-0")
    try:
        check_socket(path)
    finally:
        listener.close()


def test_a_token_read_does_not_read_the_config(tmp_path: Path) -> None:
    # Readers may not read the config, and a token read must not pay for yaml.
    code = ("import sys; from agent.cli import main; main(['token']); "
            "print('yaml' in sys.modules, 'agent.config' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICE_AGENT")}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)  # no agent there: "not running", exit 69
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=False).stdout
    assert out.split()[-2:] == ["False", "False"], out


# -- issue 10 item 9: a second agent never takes the running one's socket -------------

async def _answers(path: Path, within: float = 15.0) -> None:
    from agent.client import AgentUnavailable, call

    async with asyncio.timeout(within):
        while True:
            try:
                if (await asyncio.to_thread(call, path, "GET", "/v1/status", timeout=5.0)).ok:
                    return
            except (AgentUnavailable, OSError):
                pass
            await asyncio.sleep(0.1)


async def test_a_second_agent_leaves_the_running_ones_socket(
        idp: IdentityProvider, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_service_process import ROOT, _child_env

    first = write_config(tmp_path / "first.yaml", idp, tmp_path)
    # Another credential file, so only the socket is shared.
    second = write_config(tmp_path / "second.yaml", idp, tmp_path,
                          storage={"path": str(tmp_path / "other" / "credentials.json")})
    path = tmp_path / "run" / "agent.sock"
    env = _child_env()
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "run", "--config", str(first), env=env, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await _answers(path)
        bound = path.stat().st_ino
        for argv in (["run", "--config", str(second)],
                     ["demo", "--socket", str(path), "--display", "none"]):
            late = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.cli", *argv, env=env, cwd=ROOT,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            async with asyncio.timeout(30):
                _, err = await late.communicate()
            assert late.returncode == 70, err.decode()
            assert "already listening" in err.decode()
            assert path.stat().st_ino == bound, argv
            # The running agent still answers: not signed in yet (75), never 69.
            status = await asyncio.to_thread(main, ["token", "--socket", str(path)])
            assert status == EX_TEMPFAIL, capsys.readouterr().err
    finally:
        agent.terminate()
        async with asyncio.timeout(10):
            await agent.wait()
    assert not path.exists()


def test_check_config_lists_every_problem_with_its_line_and_takes_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Issue 10 item 10.
    bad = tmp_path / "bad.yaml"
    bad.write_text("provider:\n  issuer: https://id.example/application/o/x/\n"
                   "  client_id: c\n  timeout: soon\ndevice:\n  nmae: Kitchen\n")
    assert main(["check-config", "--config", str(bad)]) == 78
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "device-agent: configuration error: provider.timeout (line 4): " + err[0].split(
            "provider.timeout (line 4): ", 1)[1],
        "device-agent: configuration error: device.nmae (line 6): " + err[1].split(
            "device.nmae (line 6): ", 1)[1],
        f"device-agent: {bad}: 2 problems"]
    assert "did you mean 'name'" in err[1]
    good = tmp_path / "good.yaml"
    good.write_text("provider:\n  issuer: https://id.example/application/o/x/\n"
                    "  client_id: c\n")
    assert main(["check-config", "--config", str(good)]) == 0
    assert main(["check-config", str(good)]) == 0


def test_run_refuses_the_example_issuer_and_check_config_warns(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Issue 10 item 10: install-service copies config.example.yaml into place.
    from agent.config import EXAMPLE_ISSUER, load_config

    example = Path(__file__).resolve().parents[1] / "config.example.yaml"
    assert load_config(example).provider.issuer == EXAMPLE_ISSUER
    config = tmp_path / "config.yaml"
    config.write_text(f"provider:\n  issuer: {EXAMPLE_ISSUER}\n  client_id: c\n"
                      f"storage:\n  path: {tmp_path}/state/credentials.json\n")
    assert main(["run", "--config", str(config)]) == EX_CONFIG
    assert "provider.issuer: is still the example's" in capsys.readouterr().err
    assert main(["check-config", str(config)]) == EX_OK
    assert "warning: provider.issuer is still the example's" in capsys.readouterr().err


@pytest.mark.parametrize("columns", [50, 120])
def test_help_is_wrapped_to_the_terminal(columns: int, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    with pytest.raises(SystemExit):
        main(["token", "--help"])
    lines = capsys.readouterr().out.splitlines()
    # argparse leaves two columns free, and fills the lines of the option list.
    assert max(map(len, lines)) <= columns - 2
    assert max(map(len, lines)) > columns - 20, lines


@pytest.mark.parametrize("columns", ["0", "-5", "wide"])
def test_a_columns_setting_that_is_no_width_is_ignored(
        columns: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def no_terminal(fd: int = 1) -> os.terminal_size:
        raise OSError("not a terminal")

    monkeypatch.setenv("COLUMNS", columns)
    monkeypatch.setattr(os, "get_terminal_size", no_terminal)
    with pytest.raises(SystemExit):
        main(["token", "--help"])
    # shutil's fallback: 80 columns.
    assert max(map(len, capsys.readouterr().out.splitlines())) > 60
