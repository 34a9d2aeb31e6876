"""Sealed credentials in the real daemon (issue 13): `device-agent run` as a child
process with the key where systemd's LoadCredentialEncrypted= puts it, the real test
provider over loopback, real hooks; and the real `systemd-creds` sealing that key."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.client import AgentUnavailable, call
from agent.idp import IdentityProvider, ProviderSettings, serve_provider
from agent.sealing import KEY_SIZE, STORE_KEY
from agent.store import SEALED_FORMAT_VERSION, CredentialStore
from tests.test_sealed import assert_no_key, deliver_key, encryption
from tests.test_service_process import _child_env

ROOT = Path(__file__).resolve().parents[1]
EX_CONFIG = 78
# Liveness bounds for a loaded machine, not measurements.
START_LIMIT = 20.0
STOP_LIMIT = 10.0

# Runs the CLI exactly as the console script does, and on a normal exit writes which
# `cryptography` modules the process had imported.
_MODULES_AT_EXIT = r"""
import atexit, json, sys
out = sys.argv.pop(1)
def dump():
    found = sorted(m for m in sys.modules if m.split(".")[0] == "cryptography")
    with open(out, "w") as f:
        json.dump(found, f)
atexit.register(dump)
from agent.cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_config(tmp: Path, issuer: str, **overrides: Any) -> Path:
    data: dict[str, Any] = {
        "provider": {"issuer": issuer, "client_id": "device-agent",
                     "allow_insecure_http": True},
        "display": {"type": "console"},
        "storage": {"path": str(tmp / "state" / "credentials.json")},
        "api": {"socket": str(tmp / "run" / "agent.sock")},
    }
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else (
            values)
    path = tmp / "config.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


@pytest.fixture
async def idp() -> AsyncIterator[IdentityProvider]:
    async with serve_provider(ProviderSettings(interval=1)) as provider:
        provider.auto_approve(0.0)
        yield provider


class Agent:
    def __init__(self, proc: asyncio.subprocess.Process, socket: Path) -> None:
        self.proc = proc
        self.socket = socket

    async def status(self) -> dict[str, Any] | None:
        try:
            answer = await asyncio.to_thread(call, self.socket, "GET", "/v1/status",
                                             timeout=5.0)
        except (AgentUnavailable, OSError):
            return None
        return answer.body if answer.ok else None

    async def signed_in(self) -> dict[str, Any]:
        async with asyncio.timeout(START_LIMIT):
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"the agent exited with {self.proc.returncode}")
                status = await self.status()
                if status is not None and status.get("state") == "signed_in":
                    return status
                await asyncio.sleep(0.05)

    async def stop(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGTERM)
        return await self.finished()

    async def finished(self) -> tuple[int, str, str]:
        async with asyncio.timeout(START_LIMIT + STOP_LIMIT):
            out, err = await self.proc.communicate()
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


@contextlib.asynccontextmanager
async def agent(config: Path, credentials: Path | None,
                modules: Path | None = None) -> AsyncIterator[Agent]:
    argv = [sys.executable, "-m", "agent.cli", "run", "--config", str(config)]
    if modules is not None:
        argv = [sys.executable, "-c", _MODULES_AT_EXIT, str(modules),
                "run", "--config", str(config)]
    proc = await asyncio.create_subprocess_exec(
        *argv, env=_child_env(credentials), cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        yield Agent(proc, Path(json.loads(config.read_text())["api"]["socket"]))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


def issued(idp: IdentityProvider) -> list[str]:
    return [secret for values in idp.issued_secrets().values() for secret in values]


# -- cryptography only when there is a key ----------------------------------------------

@pytest.mark.parametrize("with_key", [False, True], ids=["no-key", "key"])
async def test_the_daemon_imports_cryptography_only_when_a_key_is_delivered(
        tmp_path: Path, idp: IdentityProvider, with_key: bool) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    if with_key:
        deliver_key(credentials)
    config = write_config(tmp_path, idp.issuer, display={"type": "none"})
    modules = tmp_path / "modules.json"
    async with agent(config, credentials, modules) as running:
        await running.signed_in()  # a sign-in, so the store has been written too
        status, _, err = await running.stop()
    assert status == 0, err
    imported = json.loads(modules.read_text())
    if with_key:
        assert "cryptography" in imported
    else:
        assert imported == []


async def test_a_key_without_cryptography_installed_is_a_config_error(
        tmp_path: Path, idp: IdentityProvider) -> None:
    credentials = tmp_path / "credentials"
    deliver_key(credentials)
    config = write_config(tmp_path, idp.issuer, display={"type": "none"})
    # A None entry in sys.modules is how Python says a package cannot be imported.
    blocked = ("import sys; sys.modules['cryptography'] = None; from agent.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", blocked, "run", "--config", str(config)],
        env=_child_env(credentials), cwd=ROOT, capture_output=True, text=True,
        timeout=START_LIMIT)
    assert done.returncode == EX_CONFIG, done.stderr
    assert "storage.encryption" in done.stderr
    assert "device-agent[sealed]" in done.stderr
    assert not (tmp_path / "state" / "credentials.json").exists()


# -- a sealed sign-in, and what never shows the key ---------------------------------------

HOOK = r"""
import json, os, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(dict(os.environ)) + "\n")
print("hook ran with", sorted(os.environ))
"""


async def test_a_sealed_sign_in_keeps_the_key_out_of_logs_status_hooks_and_files(
        tmp_path: Path, idp: IdentityProvider) -> None:
    credentials = tmp_path / "credentials"
    key = deliver_key(credentials)
    hook_out = tmp_path / "hook.jsonl"
    config = write_config(tmp_path, idp.issuer, storage={"encryption": "required"},
                          logging={"level": "debug"},
                          hooks=[{"command": [sys.executable, "-c", HOOK, str(hook_out)],
                                  "events": ["signed_in", "token_changed"]}])
    async with agent(config, credentials) as running:
        status = await running.signed_in()
        token = await asyncio.to_thread(call, running.socket, "GET", "/v1/token",
                                        timeout=5.0)
        assert token.ok
        async with asyncio.timeout(START_LIMIT):
            while True:
                if hook_out.exists() and hook_out.read_text().endswith("\n"):
                    break
                await asyncio.sleep(0.05)
        code, out, err = await running.stop()
    assert code == 0, err
    seen = "\n".join([out, err, json.dumps(status), json.dumps(token.body),
                      hook_out.read_text()])
    assert_no_key(seen, key)
    for line in hook_out.read_text().splitlines():
        assert "CREDENTIALS_DIRECTORY" not in json.loads(line)
    state = tmp_path / "state"
    on_disk = "\n".join(p.read_text(errors="replace") for p in state.iterdir() if p.is_file())
    assert_no_key(on_disk, key)
    for secret in issued(idp):
        assert secret not in on_disk, "a token or device code is on disk in plain text"
    document = json.loads((state / "credentials.json").read_text())
    assert document["version"] == SEALED_FORMAT_VERSION
    creds = CredentialStore(state / "credentials.json",
                            encryption=encryption(credentials)).load()
    assert creds is not None and creds.tokens.refresh_token is not None
    assert idp.refresh_token_valid(creds.tokens.refresh_token)


async def test_a_sealed_store_whose_key_is_missing_stops_the_agent_with_78_and_is_kept(
        tmp_path: Path, idp: IdentityProvider) -> None:
    credentials = tmp_path / "credentials"
    deliver_key(credentials)
    config = write_config(tmp_path, idp.issuer)
    async with agent(config, credentials) as running:
        await running.signed_in()
        code, _, err = await running.stop()
    assert code == 0, err
    store = tmp_path / "state" / "credentials.json"
    before = store.read_bytes()
    devices = sum(1 for r in idp.requests if r.endpoint == "device")
    (credentials / STORE_KEY).unlink()  # the drop-in is gone, or the unit runs elsewhere
    for where, settings in (("no key", {}), ("off", {"encryption": "off"})):
        config = write_config(tmp_path, idp.issuer, storage=settings)
        async with agent(config, credentials if where == "no key" else None) as running:
            code, out, err = await running.finished()
        assert code == EX_CONFIG, err
        assert "sealed" in err and str(store) in err
        # The configuration-error screen, which a panel keeps lit after the exit.
        assert "Config error" in out and "Fix: " in out
    assert store.read_bytes() == before
    assert sorted(p.name for p in store.parent.iterdir() if "corrupt" in p.name) == []
    assert sum(1 for r in idp.requests if r.endpoint == "device") == devices  # no new code


async def test_required_without_a_key_refuses_to_start_and_names_the_fix(
        tmp_path: Path, idp: IdentityProvider) -> None:
    config = write_config(tmp_path, idp.issuer, storage={"encryption": "required"})
    async with agent(config, None) as running:
        code, out, err = await running.finished()
    assert code == EX_CONFIG, err
    assert "storage.encryption" in err and "install-service --seal" in err
    assert "Fix: sudo device-agent install-service --seal" in out
    assert not (tmp_path / "state" / "credentials.json").exists()
    assert not [r for r in idp.requests if r.endpoint == "device"]


# -- the real systemd-creds ---------------------------------------------------------------

needs_systemd_creds = pytest.mark.skipif(
    shutil.which("systemd-creds") is None,
    reason="systemd-creds is not installed (Debian's systemd package; .ci/run installs it)")


def systemd_creds(args: list[str], *, secret: Path, data: bytes | None = None
                  ) -> subprocess.CompletedProcess[bytes]:
    # $SYSTEMD_CREDENTIAL_SECRET: systemd's own switch for a host key elsewhere than
    # /var/lib/systemd/credential.secret, so the test never touches the machine's.
    env = {**os.environ, "SYSTEMD_CREDENTIAL_SECRET": str(secret)}
    return subprocess.run(["systemd-creds", *args], input=data, env=env,
                          capture_output=True, check=False, timeout=30)


@needs_systemd_creds
async def test_a_key_sealed_by_systemd_creds_seals_the_store(
        tmp_path: Path, idp: IdentityProvider) -> None:
    host_secret = tmp_path / "host" / "credential.secret"
    host_secret.parent.mkdir()
    key = os.urandom(KEY_SIZE)
    sealed = tmp_path / "store-key.cred"
    made = systemd_creds(["encrypt", "--name=store-key", "--with-key=host", "-", str(sealed)],
                         secret=host_secret, data=key)
    print("systemd-creds encrypt:", made.returncode, made.stderr.decode().strip())
    assert made.returncode == 0, made.stderr
    assert key not in sealed.read_bytes()
    # What LoadCredentialEncrypted=store-key:... does before the agent starts.
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    opened = systemd_creds(["decrypt", "--name=store-key", str(sealed),
                            str(credentials / STORE_KEY)], secret=host_secret)
    print("systemd-creds decrypt:", opened.returncode, opened.stderr.decode().strip())
    assert opened.returncode == 0, opened.stderr
    assert (credentials / STORE_KEY).read_bytes() == key

    config = write_config(tmp_path, idp.issuer, storage={"encryption": "required"},
                          display={"type": "none"})
    async with agent(config, credentials) as running:
        await running.signed_in()
        code, _, err = await running.stop()
    assert code == 0, err
    store = tmp_path / "state" / "credentials.json"
    assert json.loads(store.read_text())["version"] == SEALED_FORMAT_VERSION
    # A restart, with the key systemd decrypts again, is signed in at once: no new code.
    devices = sum(1 for r in idp.requests if r.endpoint == "device")
    (credentials / STORE_KEY).unlink()
    again = systemd_creds(["decrypt", "--name=store-key", str(sealed),
                           str(credentials / STORE_KEY)], secret=host_secret)
    assert again.returncode == 0, again.stderr
    async with agent(config, credentials) as running:
        await running.signed_in()
        code, _, err = await running.stop()
    assert code == 0, err
    assert sum(1 for r in idp.requests if r.endpoint == "device") == devices

    # Another machine's host key (a copied credential file, a copied key file): systemd
    # cannot decrypt, so the unit would not start at all.
    other = tmp_path / "other" / "credential.secret"
    other.parent.mkdir()
    systemd_creds(["encrypt", "--name=x", "--with-key=host", "-", "-"], secret=other,
                  data=b"x")
    refused = systemd_creds(["decrypt", "--name=store-key", str(sealed), "-"], secret=other)
    print("systemd-creds decrypt with another host key:", refused.returncode,
          refused.stderr.decode().strip())
    assert refused.returncode != 0
    assert key not in refused.stdout
