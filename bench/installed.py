"""device-agent installed as the Pi guide installs it: `pip install .` into a fresh venv,
not the editable install of the project's own .venv (whose import finder costs every
start-up a few milliseconds)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def plain_install(where: Path) -> Path:
    """A venv under `where` with device-agent installed from the working tree; returns
    its bin directory."""
    # From a copy: pip builds in the source tree, and would leave build/ in the repository.
    source = where / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "node_modules", "build", "__pycache__", "*.egg-info"))
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # With the `sealed` and `mqtt` extras, so a benchmark can deliver a store key or name
    # a broker; each is imported only when the config asks for it.
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{source}[sealed,mqtt]"],
                   check=True)
    return venv / "bin"


def unit_environment() -> dict[str, str]:
    """The Environment= settings of systemd/device-agent.service: the daemon is measured
    as systemd runs it."""
    unit = ROOT / "systemd" / "device-agent.service"
    settings = {}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            for assignment in shlex.split(line.removeprefix("Environment=")):
                name, _, value = assignment.partition("=")
                settings[name] = value
    return settings


def service_environment(credentials: Path | None = None) -> dict[str, str]:
    """The environment the installed agent runs with: this one without anything of a
    service manager or an agent this may itself run under, plus the unit's
    Environment= settings; `credentials` as systemd's $CREDENTIALS_DIRECTORY."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(
        ("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM", "DEVICE_AGENT_",
         "CREDENTIALS_DIRECTORY"))}
    env |= unit_environment()
    if credentials is not None:
        env["CREDENTIALS_DIRECTORY"] = str(credentials)
    return env
