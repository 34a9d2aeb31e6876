"""install-service / uninstall-service into a temp root, with commands recorded instead of
run; and the shipped units checked by systemd's own tools."""

from __future__ import annotations

import argparse
import io
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.install import (
    DEVICE_GROUPS,
    SYSTEM_USER,
    find_program,
    install_service,
    packaged_file,
    register,
    render_service,
    uninstall_service,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {
    "device-agent.service": ROOT / "systemd" / "device-agent.service",
    "device-agent.socket": ROOT / "systemd" / "device-agent.socket",
    "sysusers.conf": ROOT / "systemd" / "sysusers.d" / "device-agent.conf",
    "config.example.yaml": ROOT / "config.example.yaml",
}
PROGRAM = Path("/opt/device-agent/bin/device-agent")
SERVICE = Path("etc/systemd/system/device-agent.service")
SOCKET = Path("etc/systemd/system/device-agent.socket")
SYSUSERS = Path("etc/sysusers.d/device-agent.conf")
CONFIG = Path("etc/device-agent/config.yaml")
STATE = Path("var/lib/device-agent")


class Recorder:
    """Stands in for subprocess: records each command, and plays systemd-sysusers' part
    in the temp root so that a second run sees the accounts it would have created."""

    def __init__(self, root: Path, *, fail: str | None = None) -> None:
        self.root = root
        self.fail = fail
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> int:
        self.calls.append(list(argv))
        if argv[0] == self.fail:
            return 1
        if argv[0] == "systemd-sysusers":
            _write_accounts(self.root)
        return 0


def _write_accounts(root: Path) -> None:
    etc = root / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "passwd").write_text(
        f"{SYSTEM_USER}:x:990:990::/var/lib/device-agent:/usr/sbin/nologin\n")
    groups = [f"{SYSTEM_USER}:x:990:"]
    groups += [f"{name}:x:{900 + i}:{SYSTEM_USER}" for i, name in enumerate(DEVICE_GROUPS)]
    (etc / "group").write_text("\n".join(groups) + "\n")


def _install(root: Path, *, live: bool = False, dry_run: bool = False,
             runner: Recorder | None = None, program: Path = PROGRAM,
             seal: bool = False) -> tuple[int, str]:
    out = io.StringIO()
    status = install_service(root=root, live=live, dry_run=dry_run, program=program,
                             runner=runner or Recorder(root), out=out, seal=seal)
    return status, out.getvalue()


def _uninstall(root: Path, *, purge: bool = False, dry_run: bool = False,
               runner: Recorder | None = None, live: bool = True) -> tuple[int, str]:
    out = io.StringIO()
    status = uninstall_service(root=root, live=live, dry_run=dry_run, purge=purge,
                               runner=runner or Recorder(root), out=out)
    return status, out.getvalue()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under `root` with its inode, mode and mtime: a rewrite changes one."""
    found: dict[str, tuple[int, int, int]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        found[str(path.relative_to(root))] = (st.st_ino, st.st_mode, st.st_mtime_ns)
    return found


# -- the packaged files -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_packaged_files_are_the_shipped_ones(name: str) -> None:
    # agent/data holds symlinks to these; a checkout without symlink support, or a copy
    # that drifted, would install something other than what the repository shows.
    assert packaged_file(name) == SHIPPED[name].read_bytes()


def test_render_service_replaces_only_the_program() -> None:
    template = SHIPPED["device-agent.service"].read_text()
    rendered = render_service(template, str(PROGRAM))
    assert re.findall(r"(?m)^ExecStart=.*$", rendered) == [
        f"ExecStart={PROGRAM} run --config /etc/device-agent/config.yaml"]
    assert rendered.replace(str(PROGRAM), "/usr/local/bin/device-agent") == template


@pytest.mark.parametrize("program", ["/opt/my agent/bin/device-agent",
                                     "/opt/100%/bin/device-agent", "/opt/$HOME/device-agent",
                                     "relative/device-agent"])
def test_a_path_systemd_would_reinterpret_is_refused(tmp_path: Path, program: str) -> None:
    status, out = _install(tmp_path, program=Path(program))
    assert status == 2
    assert "ExecStart=" in out
    assert not (tmp_path / SERVICE).exists()


def test_find_program() -> None:
    assert find_program(Path("/opt/device-agent")) == PROGRAM
    assert find_program(Path("/opt/device-agent/")) == PROGRAM
    with pytest.raises(ValueError, match="absolute"):
        find_program(Path("opt/device-agent"))
    found = find_program()
    assert found.is_absolute() and os.access(found, os.X_OK)
    assert found == found.resolve()


# -- install ------------------------------------------------------------------------------

def test_dry_run_writes_nothing_and_runs_nothing(tmp_path: Path) -> None:
    runner = Recorder(tmp_path)
    status, out = _install(tmp_path, dry_run=True, live=True, runner=runner)
    assert status == 0
    assert list(tmp_path.iterdir()) == []
    assert runner.calls == []
    assert f"would write {tmp_path / SERVICE} (mode 0644)" in out
    assert f"would write {tmp_path / SOCKET} (mode 0644)" in out
    assert f"would write {tmp_path / SYSUSERS} (mode 0644)" in out
    assert f"would write {tmp_path / CONFIG} from config.example.yaml" in out
    assert f"would run: systemd-sysusers {tmp_path / SYSUSERS}" in out
    assert "would run: systemctl daemon-reload" in out
    assert "dry run: nothing was changed" in out
    assert "sudo systemctl enable --now device-agent.service" in out


def test_install_into_a_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "group").write_text(f"{SYSTEM_USER}:x:990:\n")
    runner = Recorder(tmp_path)
    status, out = _install(tmp_path, runner=runner)
    assert status == 0
    assert runner.calls == []  # not the running system: no command at all

    service = (tmp_path / SERVICE).read_text()
    assert service == render_service(SHIPPED["device-agent.service"].read_text(), str(PROGRAM))
    assert (tmp_path / SOCKET).read_bytes() == SHIPPED["device-agent.socket"].read_bytes()
    assert (tmp_path / SYSUSERS).read_bytes() == SHIPPED["sysusers.conf"].read_bytes()
    assert (tmp_path / CONFIG).read_bytes() == SHIPPED["config.example.yaml"].read_bytes()
    for path, mode in ((SERVICE, 0o644), (SOCKET, 0o644), (SYSUSERS, 0o644),
                       (CONFIG, 0o600)):
        assert _mode(tmp_path / path) == mode, path
    for directory in (SERVICE.parent, SYSUSERS.parent, CONFIG.parent):
        assert _mode(tmp_path / directory) == 0o755, directory
    if os.geteuid() == 0:
        # Root's alone: the token readers share the socket's group (issue 9 item 9).
        assert (tmp_path / CONFIG).stat().st_gid == 0
        assert (tmp_path / CONFIG).stat().st_uid == 0
    assert f"wrote {tmp_path / CONFIG} from config.example.yaml (mode 0600)" in out
    assert f"wrote {tmp_path / SERVICE} (mode 0644)" in out
    assert f"`systemd-sysusers --root {tmp_path}`" in out
    assert "warning:" in out  # PROGRAM does not exist inside the temp root


def test_second_run_changes_nothing_and_says_so(tmp_path: Path) -> None:
    runner = Recorder(tmp_path)
    assert _install(tmp_path, live=True, runner=runner)[0] == 0
    assert runner.calls == [["systemd-sysusers", str(tmp_path / SYSUSERS)],
                            ["systemctl", "daemon-reload"]]
    before = _snapshot(tmp_path)

    runner.calls.clear()
    status, out = _install(tmp_path, live=True, runner=runner)
    assert status == 0
    assert runner.calls == []
    assert _snapshot(tmp_path) == before
    assert "wrote" not in out and "would" not in out
    assert f"unchanged {tmp_path / SERVICE}" in out
    assert f"unchanged user {SYSTEM_USER} and its groups" in out
    assert f"kept existing {tmp_path / CONFIG}" in out
    assert "nothing changed: everything was already in place" in out


def test_a_changed_unit_is_rewritten_and_reloaded(tmp_path: Path) -> None:
    runner = Recorder(tmp_path)
    _install(tmp_path, live=True, runner=runner)
    (tmp_path / SERVICE).write_text("[Service]\nExecStart=/bin/false\n")
    (tmp_path / SOCKET).chmod(0o600)
    runner.calls.clear()
    status, out = _install(tmp_path, live=True, runner=runner)
    assert status == 0
    assert runner.calls == [["systemctl", "daemon-reload"]]
    assert _mode(tmp_path / SOCKET) == 0o644
    assert "ExecStart=/bin/false" not in (tmp_path / SERVICE).read_text()
    assert "nothing changed" not in out


@pytest.mark.parametrize(("mode", "said"), [
    (0o600, "kept existing {config}\n"),
    # An earlier install wrote it 0640 root:device-agent, which every token reader
    # could read; the unit written beside it hands the service a copy instead.
    (0o640, "kept existing {config}, now 0600 (was 0640"),
], ids=["private", "group-readable"])
def test_an_existing_config_is_never_overwritten_and_made_root_only(
        tmp_path: Path, mode: int, said: str) -> None:
    config = tmp_path / CONFIG
    config.parent.mkdir(parents=True)
    config.write_text("provider: {issuer: https://id.example/, client_id: mine}\n")
    config.chmod(mode)
    status, out = _install(tmp_path)
    assert status == 0
    assert config.read_text() == "provider: {issuer: https://id.example/, client_id: mine}\n"
    assert _mode(config) == 0o600
    assert said.format(config=config) in out
    assert "LoadCredential=config.yaml:/etc/device-agent/config.yaml" in (
        tmp_path / SERVICE).read_text().splitlines()


def test_a_failed_command_stops_the_install(tmp_path: Path) -> None:
    runner = Recorder(tmp_path, fail="systemd-sysusers")
    status, out = _install(tmp_path, live=True, runner=runner)
    assert status == 70
    assert f"failed (exit 1): systemd-sysusers {tmp_path / SYSUSERS}" in out
    assert runner.calls == [["systemd-sysusers", str(tmp_path / SYSUSERS)]]
    assert not (tmp_path / CONFIG).exists()  # its group does not exist


def test_a_program_in_a_home_directory_is_flagged(tmp_path: Path) -> None:
    status, out = _install(tmp_path, program=Path("/home/pi/.local/bin/device-agent"))
    assert status == 0
    assert "ProtectHome=yes" in out


@pytest.mark.parametrize(("text", "i2c", "spi"), [
    ("dtparam=i2c_arm=on\ndtparam=spi=on\n", True, True),
    ("dtparam=audio=on\n#dtparam=i2c_arm=on\n#dtparam=spi=on\n", False, False),
    ("dtparam=i2c_arm=on,spi=on\n", True, True),
    ("dtparam=i2c=on\ndtparam=spi\n", True, True),
    ("dtparam=i2c_arm=on\n[pi4]\ndtparam=i2c_arm=off\n", False, False),
    ("dtparam=spi=on  # the panel\n", False, True),
])
def test_boot_config_is_read_for_hints_and_left_alone(tmp_path: Path, text: str, i2c: bool,
                                                      spi: bool) -> None:
    boot = tmp_path / "boot" / "firmware" / "config.txt"
    boot.parent.mkdir(parents=True)
    boot.write_text(text)
    status, out = _install(tmp_path)
    assert status == 0
    assert boot.read_text() == text
    assert (f"ok: I2C is on in {boot}" in out) is i2c
    assert ("sudo raspi-config nonint do_i2c 0" in out) is not i2c
    assert (f"ok: SPI is on in {boot}" in out) is spi
    assert ("sudo raspi-config nonint do_spi 0" in out) is not spi


def test_boot_config_before_bookworm_and_none_at_all(tmp_path: Path) -> None:
    _, out = _install(tmp_path)
    assert "skipped the I2C/SPI check" in out
    old = tmp_path / "boot" / "config.txt"
    old.parent.mkdir()
    old.write_text("dtparam=i2c_arm=on\n")
    _, out = _install(tmp_path)
    assert f"ok: I2C is on in {old}" in out


# -- uninstall ----------------------------------------------------------------------------

def test_uninstall_keeps_config_and_credentials_unless_purged(tmp_path: Path) -> None:
    runner = Recorder(tmp_path)
    _install(tmp_path, live=True, runner=runner)
    credentials = tmp_path / STATE / "credentials.json"
    credentials.parent.mkdir(parents=True)
    credentials.write_text("{}")
    dropin = tmp_path / "etc/systemd/system/device-agent.service.d/override.conf"
    dropin.parent.mkdir()
    dropin.write_text("[Service]\n")

    runner.calls.clear()
    status, out = _uninstall(tmp_path, runner=runner)
    assert status == 0
    assert runner.calls == [
        ["systemctl", "disable", "--now", "device-agent.socket", "device-agent.service"],
        ["systemctl", "daemon-reload"]]
    for path in (SERVICE, SOCKET, SYSUSERS):
        assert not (tmp_path / path).exists(), path
        assert f"removed {tmp_path / path}" in out
    assert credentials.read_text() == "{}"
    assert (tmp_path / CONFIG).exists()
    assert dropin.exists()
    assert "--purge removes them" in out
    assert f"kept user and group {SYSTEM_USER}" in out

    runner.calls.clear()
    status, out = _uninstall(tmp_path, runner=runner)
    assert status == 0
    assert runner.calls == []
    assert f"already absent {tmp_path / SERVICE}" in out
    assert "nothing changed: nothing was installed" in out

    status, out = _uninstall(tmp_path, runner=runner, purge=True)
    assert status == 0
    for path in (STATE, CONFIG.parent, dropin.parent):
        assert not (tmp_path / path).exists(), path
    assert "deletes the tokens without revoking them" in out
    assert (tmp_path / "etc" / "passwd").exists()  # the user is never removed


def test_uninstall_dry_run(tmp_path: Path) -> None:
    runner = Recorder(tmp_path)
    _install(tmp_path, live=True, runner=runner)
    (tmp_path / STATE).mkdir(parents=True)
    before = _snapshot(tmp_path)
    runner.calls.clear()
    status, out = _uninstall(tmp_path, runner=runner, purge=True, dry_run=True)
    assert status == 0
    assert runner.calls == []
    assert _snapshot(tmp_path) == before
    assert f"would remove {tmp_path / SERVICE}" in out
    assert f"would remove {tmp_path / STATE} (credentials)" in out
    assert ("would run: systemctl disable --now device-agent.socket device-agent.service"
            in out)
    assert "dry run: nothing was changed" in out


# -- the command line ---------------------------------------------------------------------

def _parser(runner: Recorder, euid: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="device-agent")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub, runner=runner, geteuid=lambda: euid)
    return parser


def _cli(argv: list[str], runner: Recorder, euid: int = 1000) -> int:
    args = _parser(runner, euid).parse_args(argv)
    status: int = args.func(args)
    return status


@pytest.mark.parametrize("command", ["install-service", "uninstall-service"])
def test_the_running_system_needs_root(tmp_path: Path, command: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    runner = Recorder(tmp_path)
    assert _cli([command], runner) == 77
    assert f"sudo device-agent {command}" in capsys.readouterr().err
    assert _cli([command, "--root", "/"], runner) == 77
    assert runner.calls == []


def test_cli_into_a_root_needs_no_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runner = Recorder(tmp_path)
    prefix = tmp_path / "opt" / "device-agent"
    assert _cli(["install-service", "--root", str(tmp_path), "--prefix", "/opt/device-agent"],
                runner) == 0
    assert f"ExecStart={PROGRAM} run" in (tmp_path / SERVICE).read_text()
    assert not prefix.exists()
    assert _cli(["uninstall-service", "--root", str(tmp_path), "--purge"], runner) == 0
    assert not (tmp_path / SERVICE).exists()
    assert runner.calls == []
    assert _cli(["install-service", "--root", str(tmp_path / "nowhere")], runner) == 2
    assert "not a directory" in capsys.readouterr().err


def test_cli_dry_run_on_the_running_system(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    runner = Recorder(tmp_path)
    assert _cli(["install-service", "--dry-run"], runner) == 0
    assert _cli(["uninstall-service", "--dry-run"], runner) == 0
    assert runner.calls == []
    out = capsys.readouterr().out
    assert "would write /etc/systemd/system/device-agent.service (mode 0644)" in out or \
           "unchanged /etc/systemd/system/device-agent.service" in out


# -- systemd's own checks -----------------------------------------------------------------

def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install systemd)")
    return path


def test_exposure_is_at_most_1_5() -> None:
    analyze = _tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=15",
         str(SHIPPED["device-agent.service"])],
        capture_output=True, text=True, check=False, timeout=60)
    found = re.search(r"Overall exposure level for device-agent\.service: (\d+\.\d) (\w+)",
                      result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found.group(1)) <= 1.5, found.group(0)
    assert found.group(2) == "OK", found.group(0)
    assert result.returncode == 0, result.stdout + result.stderr


def test_installed_units_verify_clean(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    # verify insists that ExecStart= names an executable file, so install the units with
    # one that exists here; no running systemd is needed.
    status, _ = _install(tmp_path, program=Path(sys.executable))
    assert status == 0
    units = [str(tmp_path / SERVICE), str(tmp_path / SOCKET)]
    result = subprocess.run([analyze, "verify", *units], capture_output=True, text=True,
                            check=False, timeout=60)
    # Unknown keys and bad values are only warnings (exit 0): any mention of our units
    # counts as a failure.
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if "device-agent" in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert ours == []


def test_sysusers_file_creates_the_user_and_keeps_existing_groups(tmp_path: Path) -> None:
    sysusers = _tool("systemd-sysusers")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\ndialout:x:20:\nvideo:x:44:\ni2c:x:998:pi\n")
    conf = tmp_path / "device-agent.conf"
    conf.write_bytes(packaged_file("sysusers.conf"))
    for _ in range(2):  # the second run must change nothing
        result = subprocess.run([sysusers, f"--root={tmp_path}", str(conf)],
                                capture_output=True, text=True, check=False, timeout=60)
        assert result.returncode == 0, result.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in
              (etc / "passwd").read_text().splitlines()}
    assert passwd[SYSTEM_USER][5:] == ["/var/lib/device-agent", "/usr/sbin/nologin"]
    groups = {line.split(":")[0]: line.split(":") for line in
              (etc / "group").read_text().splitlines()}
    assert groups["dialout"][2] == "20" and groups["video"][2] == "44"
    assert groups["i2c"][2] == "998"
    assert sorted(groups["i2c"][3].split(",")) == [SYSTEM_USER, "pi"]  # pi stays
    for name in DEVICE_GROUPS:
        assert SYSTEM_USER in groups[name][3].split(","), name
    assert 0 < int(passwd[SYSTEM_USER][2]) < 1000  # a system user


# -- issue 9 item 12: the unit and the hardware and token files it promises ------------

def _config_with_sinks(root: Path, sinks: list[dict[str, str]]) -> None:
    config = root / CONFIG
    config.parent.mkdir(parents=True, exist_ok=True)
    import json
    config.write_text(json.dumps({
        "provider": {"issuer": "https://id.example/application/o/x/", "client_id": "x"},
        "sinks": sinks}))
    config.chmod(0o600)


DROP_IN = Path("etc/systemd/system/device-agent.service.d/token-files.conf")


def test_token_files_with_a_group_or_elsewhere_get_the_drop_in_they_need(
        tmp_path: Path) -> None:
    _config_with_sinks(tmp_path, [
        {"path": "/srv/uploader/token", "group": "uploader", "mode": "0640"},
        {"path": "/run/device-agent/token"}])
    status, out = _install(tmp_path)
    assert status == 0
    text = (tmp_path / DROP_IN).read_text()
    settings = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert settings == ["[Service]", "SupplementaryGroups=uploader",
                        "SystemCallFilter=@chown", 'ReadWritePaths="-/srv/uploader"']
    assert f"wrote {tmp_path / DROP_IN} (mode 0644)" in out
    # Again: nothing to change.
    assert f"unchanged {tmp_path / DROP_IN}" in _install(tmp_path)[1]
    # Without such files it goes, and the unit is back to its own rules.
    _config_with_sinks(tmp_path, [{"path": "/run/device-agent/token"}])
    status, out = _install(tmp_path)
    assert status == 0 and not (tmp_path / DROP_IN).exists()
    assert f"removed {tmp_path / DROP_IN}" in out


def test_the_metrics_textfile_directory_reaches_the_drop_in(tmp_path: Path) -> None:
    # node_exporter's textfile collector reads /var/lib/prometheus/node-exporter: the
    # hardened unit could not write there, and each write failed in the log.
    config = tmp_path / CONFIG
    config.parent.mkdir(parents=True, exist_ok=True)
    import json
    config.write_text(json.dumps({
        "provider": {"issuer": "https://id.example/application/o/x/", "client_id": "x"},
        "metrics": {"textfile": "/var/lib/prometheus/node-exporter/device_agent.prom"}}))
    config.chmod(0o600)
    status, _ = _install(tmp_path)
    assert status == 0
    text = (tmp_path / DROP_IN).read_text()
    assert 'ReadWritePaths="-/var/lib/prometheus/node-exporter"' in text.splitlines()


def test_a_token_file_for_another_owner_is_called_out(tmp_path: Path) -> None:
    _config_with_sinks(tmp_path, [{"path": "/run/device-agent/token", "owner": "pi"}])
    status, out = _install(tmp_path)
    assert status == 0
    assert "owner: pi; the hardened unit cannot give a file to another user" in out


def test_the_token_file_drop_in_allows_chown_and_scores_1_6(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    _config_with_sinks(tmp_path, [{"path": "/srv/uploader/token", "group": "uploader"}])
    assert _install(tmp_path)[0] == 0

    def security() -> str:
        return subprocess.run(
            [analyze, "security", "--offline=true", f"--root={tmp_path}", "device-agent.service"],
            capture_output=True, text=True, check=False, timeout=60).stdout

    def chown_allowed(report: str) -> bool:
        line = next(line for line in report.splitlines() if "SystemCallFilter=~@privileged" in line)
        return line.lstrip().startswith("✗")

    with_drop_in = security()
    assert chown_allowed(with_drop_in), with_drop_in
    assert "Overall exposure level for device-agent.service: 1.6 OK" in with_drop_in
    (tmp_path / DROP_IN).unlink()
    assert not chown_allowed(security())


def test_the_units_proc_shows_what_board_detection_reads() -> None:
    """gpiozero and RPi.GPIO read /proc/cpuinfo (and /proc/device-tree on a Pi). No
    systemd runs here to start the unit, so its /proc is made the way systemd makes it:
    a new procfs, with `subset=pid` when the unit says ProcSubset=pid."""
    unshare = _tool("unshare")
    unit = SHIPPED["device-agent.service"].read_text().splitlines()
    subset = next((line.split("=", 1)[1] for line in unit if line.startswith("ProcSubset=")),
                  "all")
    options = "-o subset=pid " if subset == "pid" else ""
    probe = f"{shlex.quote(sys.executable)} -c \"open('/proc/cpuinfo').read()\""
    result = subprocess.run(
        [unshare, "--mount", "--pid", "--fork", "--mount-proc", "sh", "-c",
         f"mount -t proc {options}proc /proc && {probe}"],
        capture_output=True, text=True, check=False, timeout=60)
    if "Operation not permitted" in result.stderr:
        pytest.skip("unshare/mount needs CAP_SYS_ADMIN, which this machine does not give")
    assert result.returncode == 0, result.stderr


# -- issue 10 item 13: piped output, and a program the unit cannot see ---------------

def _reference_install(tmp_path: Path) -> dict[str, bytes]:
    root = tmp_path / "reference"
    root.mkdir()
    assert _install(root)[0] == 0
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["unbuffered", "buffered"])
def test_an_install_whose_reader_is_gone_is_done_in_full(tmp_path: Path,
                                                          unbuffered: str) -> None:
    from tests.test_service_process import _child_env

    root = tmp_path / "image"
    root.mkdir()
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| head -1` once it has its line
    try:
        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", "install-service", "--root", str(root),
             "--prefix", str(PROGRAM.parent.parent)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=60,
            env=_child_env(PYTHONUNBUFFERED=unbuffered), check=False)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, (
        done.stderr)
    assert done.returncode == 0, done.stderr
    installed = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                 if p.is_file()}
    assert installed == _reference_install(tmp_path)


def test_dry_run_into_head_gives_its_first_line_and_no_traceback(tmp_path: Path) -> None:
    from tests.test_service_process import _child_env

    command = shlex.join([sys.executable, "-m", "agent.cli", "install-service", "--dry-run",
                          "--root", str(tmp_path), "--prefix", "/opt/device-agent"])
    done = subprocess.run(["sh", "-c", f"{command} | head -1"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, check=False,
                          env=_child_env(PYTHONUNBUFFERED="1"))
    assert done.stdout.startswith("installing into ") and done.stdout.count("\n") == 1
    assert done.stderr == ""


def test_a_command_run_while_the_reader_is_gone_is_not_killed_by_sigpipe() -> None:
    # systemd-sysusers or systemctl writing into a closed pipe would die of SIGPIPE, and
    # the install would stop halfway.
    from tests.test_service_process import _child_env

    code = ("import sys; from agent.install import run_command; "
            "print(run_command(['sh', '-c', 'echo created; echo again']), file=sys.stderr)")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-c", code], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=60,
                              env=_child_env(PYTHONUNBUFFERED="1"), check=False)
    finally:
        os.close(write_end)
    assert done.stderr.strip().splitlines()[-1] == "0", done.stderr


def _link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def _script(path: Path, shebang: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{shebang}\nimport sys\n")
    path.chmod(0o755)


def _executable(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF")
    path.chmod(0o755)


@pytest.mark.parametrize(("layout", "hidden"), [
    # A venv under /opt whose python is pyenv's, in root's home.
    ("pyenv", "/root/.pyenv/versions/3.11.9/bin/python3.11"),
    # /usr/local/bin/device-agent, a link into a user's venv.
    ("linked", "/home/pi/venv/bin/device-agent"),
    # A venv made in /tmp: the unit has a private, empty /tmp.
    ("tmp", "/tmp/venv/bin/python3"),
    ("run-user", "/run/user/1000/venv/bin/python3"),
])
def test_a_program_or_interpreter_the_unit_cannot_see_is_flagged(
        tmp_path: Path, layout: str, hidden: str) -> None:
    program = Path("/opt/device-agent/bin/device-agent")
    inside = tmp_path / program.relative_to("/")
    if layout == "pyenv":
        _script(inside, "/opt/device-agent/bin/python")
        _link(inside.with_name("python"), "python3")
        _link(inside.with_name("python3"), hidden)
        _executable(tmp_path / hidden.lstrip("/"))
    elif layout == "linked":
        program = Path("/usr/local/bin/device-agent")
        _link(tmp_path / program.relative_to("/"), hidden)
        _script(tmp_path / hidden.lstrip("/"), "/home/pi/venv/bin/python")
    else:
        _script(inside, str(Path(hidden).with_name("python")))
        _link(tmp_path / Path(hidden).with_name("python").relative_to("/"), "python3")
        _executable(tmp_path / hidden.lstrip("/"))
    status, out = _install(tmp_path, program=program)
    assert status == 0
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert any(hidden in line for line in warnings), out
    assert (tmp_path / SERVICE).exists()  # a warning, not a refusal


def test_a_program_and_interpreter_the_unit_can_see_get_no_warning(tmp_path: Path) -> None:
    inside = tmp_path / PROGRAM.relative_to("/")
    _script(inside, "/opt/device-agent/bin/python")
    _link(inside.with_name("python"), "/usr/bin/python3.11")
    _executable(tmp_path / "usr/bin/python3.11")
    status, out = _install(tmp_path)
    assert status == 0
    assert [line for line in out.splitlines() if line.startswith("warning:")] == []


def test_the_python_running_the_command_is_checked_too(tmp_path: Path) -> None:
    inside = tmp_path / PROGRAM.relative_to("/")
    _script(inside, "/opt/device-agent/bin/python")
    _link(inside.with_name("python"), "/usr/bin/python3.11")
    _executable(tmp_path / "usr/bin/python3.11")
    pyenv = tmp_path / "root/.pyenv/versions/3.11.9/bin/python3.11"
    _executable(pyenv)
    out = io.StringIO()
    status = install_service(root=tmp_path, live=False, dry_run=False, program=PROGRAM,
                             runner=Recorder(tmp_path), out=out,
                             interpreters=[Path("/root/.pyenv/versions/3.11.9/bin/python3.11")])
    assert status == 0
    assert "warning: /root/.pyenv/versions/3.11.9/bin/python3.11" in out.getvalue()


def test_token_file_directories_reach_the_drop_in_as_one_word_or_not_at_all(
        tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    _config_with_sinks(tmp_path, [
        {"path": "/srv/My Uploads/100%/token"},   # a space, a specifier
        {"path": "/etc/token"},                   # would open all of /etc
        {"path": "state/token"},                  # relative: /etc/device-agent/state
    ])
    status, out = _install(tmp_path, program=Path(sys.executable))
    assert status == 0
    text = (tmp_path / DROP_IN).read_text()
    assert 'ReadWritePaths="-/srv/My Uploads/100%%"' in text
    assert 'ReadWritePaths="-/etc/device-agent/state"' in text  # as the image sees it
    assert str(tmp_path) not in text and '"-/etc"' not in text
    assert "a token file in /etc would open all of it to the agent" in out
    # systemd reads each as one absolute path.
    units = tmp_path / "units"
    (units / "device-agent.service.d").mkdir(parents=True)
    shutil.copy(tmp_path / SERVICE, units / "device-agent.service")
    shutil.copy(tmp_path / DROP_IN, units / "device-agent.service.d" / "token-files.conf")
    result = subprocess.run([analyze, "verify", str(units / "device-agent.service")],
                            capture_output=True, text=True, check=False, timeout=60,
                            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"})
    assert "token-files.conf" not in result.stdout + result.stderr, result.stderr


# -- issue 13: install-service --seal, with the real systemd-creds -------------------------

STORE_KEY_CRED = Path("etc/device-agent/store-key.cred")
STORE_KEY_DROP_IN = Path("etc/systemd/system/device-agent.service.d/store-key.conf")


@pytest.fixture
def host_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The real systemd-creds, with its host key in the test's directory instead of
    /var/lib/systemd/credential.secret ($SYSTEMD_CREDENTIAL_SECRET, systemd's own switch
    for it): nothing of this machine's is read or changed."""
    _tool("systemd-creds")
    secret = tmp_path / "host" / "credential.secret"
    secret.parent.mkdir()
    monkeypatch.setenv("SYSTEMD_CREDENTIAL_SECRET", str(secret))
    return secret


def _has_tpm2() -> bool:
    return subprocess.run(["systemd-creds", "has-tpm2"], capture_output=True, check=False,
                          timeout=60).returncode == 0


def _decrypt(sealed: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["systemd-creds", "decrypt", "--name=store-key", str(sealed), "-"],
                          capture_output=True, check=False, timeout=60)


def _settings(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines()
            if line and not line.startswith("#")]


def test_seal_makes_a_key_seals_it_and_loads_it_in_a_drop_in(
        tmp_path: Path, host_key: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    runner = Recorder(root)
    status, out = _install(root, live=True, runner=runner, seal=True)
    assert status == 0, out
    print(out)
    sealed = root / STORE_KEY_CRED
    assert _mode(sealed) == 0o600
    opened = _decrypt(sealed)
    assert opened.returncode == 0, opened.stderr
    key = opened.stdout
    assert len(key) == 32
    assert key not in sealed.read_bytes()
    assert _settings(root / STORE_KEY_DROP_IN) == [
        "[Service]", "LoadCredentialEncrypted=store-key:/etc/device-agent/store-key.cred"]
    assert _mode(root / STORE_KEY_DROP_IN) == 0o644
    # The TPM2 and the host key where systemd-creds finds a TPM2, else the host key; and
    # it says which, as the sealed file's header has it.
    if _has_tpm2():
        assert f"sealed a new store key to this device's TPM2 and the host key into " \
               f"{sealed}" in out
    else:
        assert f"sealed a new store key to the host key into {sealed} (no TPM2 here: " \
               f"systemd-creds has-tpm2 says " in out
    assert ["systemctl", "daemon-reload"] in runner.calls
    said = out + capfd.readouterr().err
    for form in (key.hex(), key.hex().upper()):
        assert form not in said
    assert not list(root.rglob("*store-key")), "the plain key reached a file"

    # Again: the key stays, and the drop-in with it.
    before = _snapshot(root)
    runner.calls.clear()
    status, out = _install(root, live=True, runner=runner, seal=True)
    assert status == 0, out
    assert _snapshot(root) == before
    kind = "this device's TPM2 and the host key" if _has_tpm2() else "the host key"
    assert f"unchanged {sealed} (sealed to {kind}; an existing key is never replaced" in out
    assert runner.calls == []
    assert _decrypt(sealed).stdout == key

    # Without --seal, nothing of it is undone.
    status, out = _install(root, live=True, runner=runner)
    assert status == 0 and _snapshot(root) == before


def test_seal_dry_run_says_what_it_would_do_and_does_nothing(
        tmp_path: Path, host_key: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    runner = Recorder(root)
    status, out = _install(root, live=True, dry_run=True, runner=runner, seal=True)
    assert status == 0, out
    assert list(root.iterdir()) == []
    assert not host_key.exists()  # nothing sealed, not even the host key made
    kind = "this device's TPM2 and the host key" if _has_tpm2() else "the host key"
    assert f"would seal a new 32-byte store key to {kind} into {root / STORE_KEY_CRED}" in out
    assert f"would write {root / STORE_KEY_DROP_IN} (mode 0644)" in out


def test_seal_into_an_image_is_refused(tmp_path: Path) -> None:
    status, out = _install(tmp_path, seal=True)
    assert status == 2
    assert "on the device itself" in out
    assert list(tmp_path.iterdir()) == []


def test_a_failed_seal_leaves_no_key_and_no_drop_in(tmp_path: Path, host_key: Path) -> None:
    # A damaged host key (too short to be one): systemd-creds itself refuses.
    host_key.write_bytes(b"short")
    host_key.chmod(0o400)
    root = tmp_path / "root"
    root.mkdir()
    status, out = _install(root, live=True, seal=True)
    assert status == 70, out
    assert "systemd-creds encrypt failed" in out
    assert not (root / STORE_KEY_CRED).exists()
    assert not (root / STORE_KEY_DROP_IN).exists()


def test_the_cli_takes_seal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runner = Recorder(tmp_path)
    assert _cli(["install-service", "--seal", "--root", str(tmp_path)], runner) == 2
    assert "--seal" in capsys.readouterr().out
    assert runner.calls == []


def test_the_unit_with_the_store_key_drop_in_verifies_and_scores_as_before(
        tmp_path: Path, host_key: Path) -> None:
    analyze = _tool("systemd-analyze")
    status, out = _install(tmp_path, live=True, seal=True, program=Path(sys.executable))
    assert status == 0, out
    units = tmp_path / "units"
    (units / "device-agent.service.d").mkdir(parents=True)
    shutil.copy(tmp_path / SERVICE, units / "device-agent.service")
    shutil.copy(tmp_path / STORE_KEY_DROP_IN, units / "device-agent.service.d")
    result = subprocess.run([analyze, "verify", str(units / "device-agent.service")],
                            capture_output=True, text=True, check=False, timeout=60,
                            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"})
    said = result.stdout + result.stderr
    assert "store-key" not in said and "LoadCredentialEncrypted" not in said, said
    report = subprocess.run(
        [analyze, "security", "--offline=true", f"--root={tmp_path}", "device-agent.service"],
        capture_output=True, text=True, check=False, timeout=60).stdout
    assert "Overall exposure level for device-agent.service: 1.5 OK" in report, report
