"""`device-agent install-service` and `uninstall-service`: the systemd units, the system
user and a first config file, put in place the same way every time.

Installing writes three files from the package data (`agent/data/`, the same files as
`systemd/` in the source tree) and never edits anything else:

- ``/etc/systemd/system/device-agent.service``, its ``ExecStart=`` naming the
  device-agent program that is running this command (or ``--prefix``/bin/device-agent);
- ``/etc/systemd/system/device-agent.socket``, for socket activation (left disabled);
- ``/etc/sysusers.d/device-agent.conf``, then `systemd-sysusers` creates the user;

and ``/etc/device-agent/config.yaml`` from ``config.example.yaml`` when there is none (an
existing config is never touched). Raspberry Pi boot settings are read, not edited: a
hint says how to turn I2C or SPI on when they are off.

With ``--seal`` it also makes the store key (`agent.sealing`): 32 random bytes, sealed
by `systemd-creds encrypt` to this device's TPM2 and host key where there is a TPM2,
else to the host key, into ``/etc/device-agent/store-key.cred``, and a drop-in whose
``LoadCredentialEncrypted=`` hands the service the key. The key goes to systemd-creds
through a pipe and is never written in plain; an existing sealed key is never replaced.

Every step prints what it did, or with ``--dry-run`` what it would do; a second run finds
everything in place and says so. With ``--root DIR`` the files go under DIR (an image
being built) and no command runs, since DIR is not the running system. Commands go
through an injectable runner, so tests record them instead of running them.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import importlib.resources
import os
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Final, TextIO

from agent.fsutil import remove_durably, write_atomic
from agent.sealing import KEY_SIZE, STORE_KEY

__all__ = [
    "CONFIG_PATH",
    "DEVICE_GROUPS",
    "SERVICE_UNIT",
    "SOCKET_UNIT",
    "STORE_KEY_PATH",
    "SYSTEM_USER",
    "Feeder",
    "Runner",
    "feed_command",
    "find_program",
    "install_service",
    "packaged_file",
    "register",
    "render_service",
    "run_command",
    "sealed_to",
    "uninstall_service",
]

SERVICE_UNIT: Final = "device-agent.service"
SOCKET_UNIT: Final = "device-agent.socket"
SYSTEM_USER: Final = "device-agent"
# The groups the service joins (SupplementaryGroups=), as the sysusers.d file lists them.
DEVICE_GROUPS: Final = ("i2c", "spi", "gpio", "dialout", "video")
CONFIG_PATH: Final = PurePosixPath("/etc/device-agent/config.yaml")
# Root's alone, beside the config; systemd reads it as root at each start.
STORE_KEY_PATH: Final = PurePosixPath("/etc/device-agent/store-key.cred")

_UNIT_DIR: Final = PurePosixPath("/etc/systemd/system")
_SYSUSERS_FILE: Final = PurePosixPath("/etc/sysusers.d/device-agent.conf")
_STATE_DIR: Final = PurePosixPath("/var/lib/device-agent")
_RUNTIME_DIR: Final = PurePosixPath("/run/device-agent")
# Written from the config's token files; ours to rewrite and remove.
_TOKEN_FILES_DROP_IN: Final = _UNIT_DIR / f"{SERVICE_UNIT}.d" / "token-files.conf"
# Written by --seal; never removed but with the drop-ins (uninstall --purge).
_STORE_KEY_DROP_IN: Final = _UNIT_DIR / f"{SERVICE_UNIT}.d" / "store-key.conf"
_BOOT_CONFIGS: Final = (PurePosixPath("/boot/firmware/config.txt"),  # bookworm and later
                        PurePosixPath("/boot/config.txt"))
_PROGRAM_NAME: Final = "device-agent"

# sysexits(3), as the rest of the CLI uses them.
_EX_OK: Final = 0
_EX_USAGE: Final = 2
_EX_SOFTWARE: Final = 70
_EX_NOPERM: Final = 77

# What may stand unquoted in ExecStart=: anything else would need systemd's quoting
# and escaping ("%" starts a specifier, "$" a variable), which a path should not need.
_PLAIN_PATH: Final = re.compile(r"/[A-Za-z0-9._+@/-]+")
# What the unit's sandbox hides or empties: a program, or the Python it runs on, that
# lives there never starts.
_HIDDEN_FROM_THE_UNIT: Final = (
    ("/home/", "ProtectHome=yes hides it from the service"),
    ("/root/", "ProtectHome=yes hides it from the service"),
    ("/run/user/", "ProtectHome=yes hides it from the service"),
    ("/tmp/", "PrivateTmp=yes gives the service an empty /tmp of its own"),
    ("/var/tmp/", "PrivateTmp=yes gives the service an empty /var/tmp of its own"),
)
# pip writes this in place of a shebang line too long for the kernel.
_LONG_SHEBANG: Final = re.compile(r"""^'''exec' "?([^" ]+)""")

Runner = Callable[[Sequence[str]], int]
"""Runs a command (an argv list, no shell) and returns its exit status."""

Feeder = Callable[[Sequence[str], bytes], tuple[int, bytes]]
"""Runs a command with `data` on its stdin; returns its exit status and its stdout."""


def run_command(argv: Sequence[str]) -> int:
    """The real runner. The command's output is passed on once it has finished: given
    our stdout, a command writing into a pipe whose reader has gone (`| head -1`) would
    die of SIGPIPE halfway through its work, and the install with it."""
    try:
        done = subprocess.run(list(argv), check=False, capture_output=True)
    except FileNotFoundError:
        return 127  # what a shell reports for a missing command
    except OSError:
        return 126
    for stream, data in ((sys.stdout, done.stdout), (sys.stderr, done.stderr)):
        if data:
            write_safely(stream, data.decode(errors="replace"))
    return done.returncode


def feed_command(argv: Sequence[str], data: bytes) -> tuple[int, bytes]:
    """The real feeder: what systemd-creds seals or opens goes through pipes, never a
    file or an argument another user could see. Its messages go to our stderr."""
    try:
        done = subprocess.run(list(argv), input=data, check=False, capture_output=True)
    except FileNotFoundError:
        return 127, b""
    except OSError:
        return 126, b""
    if done.stderr:
        write_safely(sys.stderr, done.stderr.decode(errors="replace"))
    return done.returncode, done.stdout


def write_safely(stream: TextIO, text: str) -> None:
    """Write and flush at once. A reader that has gone must not stop an install
    halfway, nor end it in a traceback: the rest of the output goes to /dev/null, and
    the work goes on."""
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        try:
            fd = stream.fileno()
        except (OSError, ValueError):
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            # What is still buffered is flushed at exit: into /dev/null, not the pipe.
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)


class _Abort(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# -- what gets written -------------------------------------------------------------------

def packaged_file(name: str) -> bytes:
    """A file shipped in ``agent/data``: the units, the sysusers.d file, the example config."""
    return importlib.resources.files("agent").joinpath("data", name).read_bytes()


def render_service(template: str, program: str) -> str:
    """The service unit with ``ExecStart=`` running `program` (its arguments kept).

    Raises ValueError for a program path systemd would read differently.
    """
    if not _PLAIN_PATH.fullmatch(program):
        raise ValueError(f"{program!r} cannot stand in ExecStart= as it is (it needs to "
                         f"be an absolute path of letters, digits and ._+@/-); install "
                         f"device-agent elsewhere or give --prefix")
    lines = template.splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if line.startswith("ExecStart=")]
    if len(found) != 1:
        raise ValueError(f"the template has {len(found)} ExecStart= lines, not one")
    _, _, arguments = lines[found[0]].partition(" ")
    lines[found[0]] = f"ExecStart={program} {arguments}"
    return "".join(lines)


def find_program(prefix: Path | None = None) -> Path:
    """The device-agent console script the unit should run.

    With `prefix`, PREFIX/bin/device-agent as given (it may belong to another root).
    Otherwise the script running this command, else the one beside this Python (a
    venv), else the one on $PATH; symlinks resolved, so the unit names the real file
    and a pipx-style link into a home directory shows up as such.

    Raises ValueError for a relative prefix, FileNotFoundError when nothing is found.
    """
    if prefix is not None:
        if not prefix.is_absolute():
            raise ValueError(f"--prefix must be an absolute path, not {prefix}")
        return Path(os.path.normpath(prefix / "bin" / _PROGRAM_NAME))
    candidates: list[str] = []
    if sys.argv and Path(sys.argv[0]).name == _PROGRAM_NAME:
        candidates.append(sys.argv[0])
    candidates.append(str(Path(sys.executable).parent / _PROGRAM_NAME))
    on_path = shutil.which(_PROGRAM_NAME)
    if on_path is not None:
        candidates.append(on_path)
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return Path(os.path.realpath(candidate))
    raise FileNotFoundError("cannot find the device-agent program; give --prefix DIR, the "
                            "prefix it is installed under (DIR/bin/device-agent)")


# -- the parts every step shares ---------------------------------------------------------

class _Session:
    """One run of install or uninstall: where files go, whether commands run, and what
    has been said and changed so far."""

    def __init__(self, *, root: Path, live: bool, dry_run: bool, runner: Runner,
                 out: TextIO) -> None:
        self.root = root
        self.live = live
        self.dry_run = dry_run
        self.runner = runner
        self.out = out
        self.changed = False

    def path(self, absolute: PurePosixPath) -> Path:
        return self.root / absolute.relative_to("/")

    def say(self, text: str) -> None:
        # Flushed line by line: a command's output comes after what led to it.
        write_safely(self.out, text + "\n")

    def run(self, argv: Sequence[str], *, required: bool) -> bool:
        """Run a command on the live system; False when it failed."""
        shown = shlex.join(argv)
        if self.dry_run:
            self.say(f"would run: {shown}")
            return True
        status = self.runner(argv)
        if status == 0:
            self.say(f"ran: {shown}")
            self.changed = True
            return True
        self.say(f"{'failed' if required else 'warning: failed'} (exit {status}): {shown}")
        if required:
            raise _Abort(f"{argv[0]} failed with exit status {status}", _EX_SOFTWARE)
        return False

    def write(self, absolute: PurePosixPath, data: bytes, *, mode: int) -> bool:
        """Put `data` at `absolute` with `mode`; True when something had to change."""
        target = self.path(absolute)
        try:
            current = target.read_bytes() if not target.is_symlink() else None
            current_mode = stat.S_IMODE(target.lstat().st_mode)
        except FileNotFoundError:
            current, current_mode = None, None
        if current == data and current_mode == mode:
            self.say(f"unchanged {target}")
            return False
        if self.dry_run:
            self.say(f"would write {target} (mode {mode:04o})")
            return True
        _make_dirs(target.parent)
        write_atomic(target, data, mode=mode)
        self.say(f"wrote {target} (mode {mode:04o})")
        self.changed = True
        return True

    def remove(self, absolute: PurePosixPath) -> bool:
        target = self.path(absolute)
        if not (target.exists() or target.is_symlink()):
            self.say(f"already absent {target}")
            return False
        if self.dry_run:
            self.say(f"would remove {target}")
            return True
        remove_durably(target)
        self.say(f"removed {target}")
        self.changed = True
        return True

    def remove_tree(self, absolute: PurePosixPath, what: str) -> None:
        target = self.path(absolute)
        if not (target.exists() or target.is_symlink()):
            return
        if self.dry_run:
            self.say(f"would remove {target} ({what})")
            return
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
        self.say(f"removed {target} ({what})")
        self.changed = True

    def finish(self, unchanged: str) -> None:
        if self.dry_run:
            self.say("dry run: nothing was changed")
        elif not self.changed:
            self.say(f"nothing changed: {unchanged}")


def _make_dirs(directory: Path) -> None:
    # Created 0755 whatever the umask: systemd and the service must be able to read
    # unit and config directories, and a root shell's umask may be 0077.
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(mode=0o755)
        os.chmod(path, 0o755)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []


def _account_files(root: Path) -> tuple[set[str], dict[str, tuple[int, set[str]]]]:
    """Users of ROOT/etc/passwd; groups of ROOT/etc/group with gid and members.

    Read from the files, not NSS, because that is what systemd-sysusers writes, and
    the same code then serves an image under --root.
    """
    users = {line.split(":", 1)[0] for line in _read_lines(root / "etc" / "passwd")
             if ":" in line}
    groups: dict[str, tuple[int, set[str]]] = {}
    for line in _read_lines(root / "etc" / "group"):
        fields = line.split(":")
        if len(fields) == 4 and fields[2].isdigit():
            members = {m for m in fields[3].split(",") if m}
            groups[fields[0]] = (int(fields[2]), members)
    return users, groups


def _missing_accounts(root: Path) -> list[str]:
    users, groups = _account_files(root)
    missing = [] if SYSTEM_USER in users else [f"user {SYSTEM_USER}"]
    if SYSTEM_USER not in groups:
        missing.append(f"group {SYSTEM_USER}")
    for name in DEVICE_GROUPS:
        if name not in groups:
            missing.append(f"group {name}")
        elif SYSTEM_USER not in groups[name][1]:
            missing.append(f"membership of {SYSTEM_USER} in {name}")
    return missing


# -- install -----------------------------------------------------------------------------

def _dtparam_on(text: str, names: Iterable[str]) -> bool:
    """Whether config.txt leaves a dtparam on: the last assignment wins, a bare name
    means on (the firmware's reading). Conditional sections are not evaluated."""
    wanted = set(names)
    on = False
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("dtparam="):
            continue
        for item in line[len("dtparam="):].split(","):
            name, has_value, value = item.partition("=")
            if name.strip() in wanted:
                on = not has_value or value.strip().lower() in ("on", "true", "yes", "1")
    return on


def _check_boot_config(session: _Session) -> None:
    for absolute in _BOOT_CONFIGS:
        path = session.path(absolute)
        if path.is_file():
            break
    else:
        session.say(f"skipped the I2C/SPI check: no {session.path(_BOOT_CONFIGS[0])} "
                    f"(not Raspberry Pi OS?)")
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    for label, names, setting, command in (
            ("I2C", ("i2c_arm", "i2c"), "dtparam=i2c_arm=on", "do_i2c"),
            ("SPI", ("spi",), "dtparam=spi=on", "do_spi")):
        if _dtparam_on(text, names):
            session.say(f"ok: {label} is on in {path} ({setting})")
        else:
            session.say(f"hint: {label} is off in {path}; for an {label} display run "
                        f"`sudo raspi-config nonint {command} 0` (this command edits no "
                        f"boot files)")


def _install_config(session: _Session) -> None:
    """Root's alone, 0600: the unit passes the service a copy (LoadCredential=), and the
    token readers, who share the socket's group, do not read a client secret in it."""
    target = session.path(CONFIG_PATH)
    if target.exists() or target.is_symlink():
        _tighten_config(session, target)
        return
    data = packaged_file("config.example.yaml")
    if session.dry_run:
        session.say(f"would write {target} from config.example.yaml (mode 0600)")
        return
    _make_dirs(target.parent)
    root = 0 if os.geteuid() == 0 else None
    write_atomic(target, data, mode=0o600, uid=root, gid=root)
    session.say(f"wrote {target} from config.example.yaml (mode 0600)")
    session.changed = True


def _tighten_config(session: _Session, target: Path) -> None:
    """An earlier installer wrote the config 0640 root:device-agent, which every token
    reader could read; the unit written now no longer needs that."""
    info = target.lstat()
    if not stat.S_ISREG(info.st_mode) or not info.st_mode & 0o077:
        session.say(f"kept existing {target}")
        return
    if session.dry_run:
        session.say(f"would keep {target} and make it 0600 (it is "
                    f"{info.st_mode & 0o7777:04o})")
        return
    os.chmod(target, 0o600, follow_symlinks=False)
    session.say(f"kept existing {target}, now 0600 (was {info.st_mode & 0o7777:04o}: "
                f"the service reads a copy, and the socket's group cannot read it)")
    session.changed = True


# Directories a token file must not open to the agent by sitting in them: the drop-in
# would make all of it writable. /tmp and /var/tmp are the unit's own (PrivateTmp=).
_TOO_WIDE: Final = frozenset(PurePosixPath(p) for p in (
    "/", "/etc", "/usr", "/var", "/home", "/root", "/boot", "/run", "/srv", "/opt",
    "/tmp", "/var/tmp"))


def token_files_drop_in(directories: Iterable[PurePosixPath], groups: Iterable[str],
                        ) -> tuple[str | None, list[str]]:
    """What the hardened unit lacks for token files: the groups they are given to
    (joined, and fchown() allowed: @chown is in the unit's ~@privileged) and their
    directories, when outside the two the unit makes writable. Returns the drop-in
    (None: nothing needed) and what could not go in it, said for a person."""
    problems: list[str] = []
    wanted: set[PurePosixPath] = set()
    for directory in directories:
        if any(directory.is_relative_to(own) for own in (_RUNTIME_DIR, _STATE_DIR)):
            continue
        if directory in _TOO_WIDE:
            problems.append(f"a token file in {directory} would open all of it to the "
                            f"agent: give the token files a directory of their own")
        elif any(not ch.isprintable() for ch in str(directory)):
            problems.append(f"the token-file directory {str(directory)!r} holds a control "
                            f"character; not added")
        else:
            wanted.add(directory)
    group_list = sorted(set(groups))
    if not group_list and not wanted:
        return None, problems
    lines = ["# Written by `device-agent install-service` from the sinks: and",
             f"# metrics.textfile of {CONFIG_PATH}; run it again after changing them.",
             "[Service]"]
    if group_list:
        lines += ["# Token files given to a group: the agent joins it and may fchown().",
                  f"SupplementaryGroups={' '.join(group_list)}", "SystemCallFilter=@chown"]
    if wanted:
        # "-": a directory not made yet must not keep the agent (and its sign-in code)
        # from starting; writing the file there then fails in the log, by name.
        lines += ["# Token files and the metrics textfile outside /run/device-agent and",
                  "# /var/lib/device-agent.",
                  *(f"ReadWritePaths={_unit_quoted('-' + str(d))}" for d in sorted(wanted))]
    return "\n".join(lines) + "\n", problems


def _unit_quoted(value: str) -> str:
    """One word in a unit file, whatever it holds: quoted (a space would split it),
    with backslash, quote and % escaped (% starts a specifier)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def _install_token_files_drop_in(session: _Session) -> bool:
    """True when the drop-in changed."""
    from agent.config import load_config
    from agent.errors import ConfigError

    target = session.path(CONFIG_PATH)
    if not target.exists():
        return False
    try:
        config = load_config(target, environ={})
    except ConfigError as exc:
        session.say(f"warning: {exc}; token-file drop-in not checked")
        return False
    for sink in config.sinks:
        if sink.owner is not None and sink.owner != SYSTEM_USER:
            session.say(f"warning: sinks: {sink.path} has owner: {sink.owner}; the hardened "
                        f"unit cannot give a file to another user (no CAP_CHOWN): use "
                        f"group: instead")
    written = [sink.path for sink in config.sinks]
    if config.metrics.textfile is not None:
        # node_exporter's textfile collector directory: the unit's rules apply to it too.
        written.append(config.metrics.textfile)
    directories = [_as_seen_there(session, path.parent) for path in written]
    text, problems = token_files_drop_in(
        directories, (sink.group for sink in config.sinks if sink.group is not None))
    for problem in problems:
        session.say(f"warning: sinks: {problem}")
    if text is None:
        return (session.path(_TOKEN_FILES_DROP_IN).exists()
                and session.remove(_TOKEN_FILES_DROP_IN))
    return session.write(_TOKEN_FILES_DROP_IN, text.encode(), mode=0o644)


def _as_seen_there(session: _Session, path: Path) -> PurePosixPath:
    """A path from the config read under --root, as the system in the image sees it:
    a relative sink path was resolved against the image's /etc/device-agent."""
    if session.root != Path("/") and path.is_relative_to(session.root):
        return PurePosixPath("/") / path.relative_to(session.root)
    return PurePosixPath(path)


def _resolve_in(root: Path, path: PurePosixPath) -> PurePosixPath:
    """`path` with its symlinks followed as the system under `root` sees them (an
    absolute link points into `root`, not into this machine): realpath, for an image."""
    pending = list(path.parts[1:])
    resolved = PurePosixPath("/")
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            resolved = resolved.parent
            continue
        candidate = resolved / part
        try:
            target = PurePosixPath(os.readlink(root / candidate.relative_to("/")))
        except OSError:  # not a link, or not there: taken as it is
            resolved = candidate
            continue
        hops += 1
        if hops > 40:  # a loop; the kernel gives up here too (ELOOP)
            return candidate
        if target.is_absolute():
            resolved = PurePosixPath("/")
            pending = list(target.parts[1:]) + pending
        else:
            pending = list(target.parts) + pending
    return resolved


def _interpreter_of(root: Path, program: PurePosixPath) -> PurePosixPath | None:
    """The absolute interpreter named by `program`'s first line (a console script's
    venv Python), or None."""
    try:
        with open(root / program.relative_to("/"), "rb") as script:
            head = script.read(4096).decode(errors="replace").splitlines()
    except OSError:
        return None
    if not head or not head[0].startswith("#!"):
        return None
    words = head[0][2:].split()
    named = words[0] if words else ""
    if named == "/bin/sh" and len(head) > 1:
        long_form = _LONG_SHEBANG.match(head[1])
        if long_form is not None:
            named = long_form.group(1)
    return PurePosixPath(named) if named.startswith("/") else None


def _hidden_from_the_unit(path: PurePosixPath) -> str | None:
    shown = f"{path}/"
    for prefix, reason in _HIDDEN_FROM_THE_UNIT:
        if shown.startswith(prefix):
            return f"{prefix.rstrip('/')}: {reason}"
    return None


def _warn_about_program(session: _Session, program: Path,
                        interpreters: Sequence[Path] = ()) -> None:
    """The program, the Python its first line names, and the Python running this
    command, each with its symlinks followed: a venv under /opt made from a pyenv
    Python in /root runs that Python, which the unit cannot see."""
    named = PurePosixPath(program)
    real = _resolve_in(session.root, named)
    looked_at = [("device-agent", named, real)]
    interpreter = _interpreter_of(session.root, real)
    if interpreter is not None:
        looked_at.append(("the Python it runs on", interpreter,
                          _resolve_in(session.root, interpreter)))
    for python in interpreters:
        looked_at.append(("the Python running this command", PurePosixPath(python),
                          _resolve_in(session.root, PurePosixPath(python))))
    warned: set[PurePosixPath] = set()
    for what, path, target in looked_at:
        where = _hidden_from_the_unit(target)
        if where is None or target in warned:
            continue
        warned.add(target)
        via = f", reached through {path}" if path != target else ""
        system = "the system's Python, not pyenv's" if ".pyenv" in target.parts else (
            "the system's Python")
        session.say(f"warning: {target} ({what}{via}) is under {where}, which then cannot "
                    f"start. Make a venv under /opt from {system} (`sudo /usr/bin/python3 "
                    f"-m venv /opt/device-agent`, then its bin/pip install), and run that "
                    f"one's install-service")
    if not session.path(named).exists():
        session.say(f"warning: {session.path(named)} does not exist; the "
                    f"service cannot start until it does (--prefix names where "
                    f"device-agent is installed)")


def install_service(*, root: Path, live: bool, dry_run: bool, program: Path,
                    runner: Runner = run_command, out: TextIO | None = None,
                    interpreters: Sequence[Path] = (), seal: bool = False,
                    feeder: Feeder = feed_command) -> int:
    """Install into `root`; `live` means `root` is the running system, where
    systemd-sysusers and systemctl are run. `interpreters`: Pythons the program runs
    on besides the one its first line names (the one running this command). `seal`:
    make and seal the store key too, with systemd-creds run through `feeder`. Returns
    an exit status."""
    session = _Session(root=root, live=live, dry_run=dry_run, runner=runner,
                       out=sys.stdout if out is None else out)
    try:
        if seal and not live:
            raise _Abort("--seal seals the key to this machine's TPM2 or host key, so it "
                         "runs on the device itself, not into an image (--root)", _EX_USAGE)
        return _install(session, program, interpreters, feeder if seal else None)
    except _Abort as exc:
        session.say(f"device-agent: {exc}")
        return exc.status
    except ValueError as exc:
        session.say(f"device-agent: {exc}")
        return _EX_USAGE
    except OSError as exc:
        session.say(f"device-agent: {exc}")
        return _EX_SOFTWARE


def _install(session: _Session, program: Path, interpreters: Sequence[Path],
             feeder: Feeder | None) -> int:
    say = session.say
    if not session.live:
        say(f"installing into {session.root}: systemd-sysusers and systemctl are left to "
            f"that system")
    service = render_service(packaged_file(SERVICE_UNIT).decode("utf-8"), str(program))
    _warn_about_program(session, program, interpreters)
    units_changed = session.write(_UNIT_DIR / SERVICE_UNIT, service.encode("utf-8"),
                                  mode=0o644)
    units_changed |= session.write(_UNIT_DIR / SOCKET_UNIT, packaged_file(SOCKET_UNIT),
                                   mode=0o644)
    sysusers_changed = session.write(_SYSUSERS_FILE, packaged_file("sysusers.conf"),
                                     mode=0o644)

    missing = _missing_accounts(session.root)
    sysusers = ["systemd-sysusers", str(session.path(_SYSUSERS_FILE))]
    if not (sysusers_changed or missing):
        say(f"unchanged user {SYSTEM_USER} and its groups")
    elif session.live:
        session.run(sysusers, required=True)
    elif missing:
        say(f"not there yet: {', '.join(missing)}; `systemd-sysusers --root "
            f"{session.root}` creates them now, or systemd-sysusers on that system")

    _install_config(session)
    units_changed |= _install_token_files_drop_in(session)
    if feeder is not None:
        units_changed |= _install_store_key(session, feeder)
    _check_boot_config(session)

    if units_changed and session.live:
        session.run(["systemctl", "daemon-reload"], required=True)

    session.finish("everything was already in place")
    config = CONFIG_PATH
    say("")
    say("next steps:")
    say(f"  1. edit {config}: provider.issuer, provider.client_id, display.type")
    say(f"  2. check it: sudo {program} check-config {config}; after adding token files "
        f"with a group: or outside /run and /var/lib, run this command again")
    say(f"  3. start it now and at every boot: sudo systemctl enable --now {SERVICE_UNIT}")
    say(f"  4. see it: systemctl status {SERVICE_UNIT}; journalctl -u {SERVICE_UNIT} -f")
    say(f"  optional, socket activation: sudo systemctl enable --now {SOCKET_UNIT}")
    if feeder is not None:
        say(f"  5. seal the tokens now, if it runs: sudo systemctl restart {SERVICE_UNIT}; "
            f"storage.encryption: required in the config then refuses to start without "
            f"the key")
    else:
        say("  optional, tokens sealed at rest: run this command again with --seal")
    return _EX_OK


# -- the store key (--seal) ---------------------------------------------------------------

# What each --with-key means for a person, and what it protects against.
_SEALED_TO: Final = {
    "host": "the host key",
    "host+tpm2": "this device's TPM2 and the host key",
    "tpm2": "this device's TPM2",
    "null": "no key at all",
}
# The first 16 bytes of what systemd-creds seals name the key it used (systemd's
# src/shared/creds-util.h): read from the file, not assumed from the command line.
_SEAL_IDS: Final = {
    "5a1c6a86df9d4096b1d5a65e0862f19a": "host",
    "55b9ed1d38594d43a8319d2ebb332ac6": "host",        # scoped to a user
    "0c7cc07b117645919c4b0bea08bc20fe": "tpm2",
    "faf7eb9341e3412ca1a436f95a29362f": "tpm2",        # with a public key policy
    "93a894094874449090caf2fc93cab553": "host+tpm2",
    "ef4ac13679a9480ea7db68897f9f165d": "host+tpm2",   # scoped to a user
    "af4950a849134eb1a73846304ff30c05": "host+tpm2",   # with a public key policy
    "058469daf6f54324800549da0f8ea2fb": "null",
}
_STORE_KEY_DROP_IN_TEXT: Final = (
    "# Written by `device-agent install-service --seal`. systemd decrypts the store key\n"
    f"# ({STORE_KEY_PATH}, sealed to this device) at each start and hands the service\n"
    f"# the plain key as $CREDENTIALS_DIRECTORY/{STORE_KEY}; when it cannot, the unit\n"
    "# does not start (status=243/CREDENTIALS in systemctl status).\n"
    "[Service]\n"
    f"LoadCredentialEncrypted={STORE_KEY}:{STORE_KEY_PATH}\n")


def sealed_to(blob: bytes) -> str | None:
    """The key a credential systemd-creds sealed is sealed to ("host", "tpm2",
    "host+tpm2", "null"), from its header; None when it cannot be told."""
    try:
        raw = base64.b64decode(b"".join(blob.split()), validate=True)
    except (binascii.Error, ValueError):
        raw = blob  # systemd-creds writes binary too, with --transcode or older versions
    return _SEAL_IDS.get(raw[:16].hex())


def _described(kind: str | None) -> str:
    return _SEALED_TO.get(kind or "", "a key this command does not know")


def _choose_key(feeder: Feeder) -> tuple[str, str]:
    """--with-key, and why. Chosen, not left to `auto`: a TPM2 that is there and fails
    must stop the install, not quietly leave the key sealed to the host key alone."""
    status, said = feeder(["systemd-creds", "has-tpm2"], b"")
    if status == 127:
        raise _Abort("systemd-creds is not installed (systemd 250 or later is needed for "
                     "LoadCredentialEncrypted=)", _EX_SOFTWARE)
    if status == 0:
        return "host+tpm2", ""
    lines = said.decode(errors="replace").split()
    shown = f"{lines[0]}; {' '.join(w for w in lines[1:] if w.startswith('-'))}" if lines \
        else f"exit status {status}"
    return "host", (f" (no TPM2 here: systemd-creds has-tpm2 says {shown}); a copied "
                    f"credentials file is useless without this device's host key, a copied "
                    f"SD card is not (it holds the host key too)")


def _install_store_key(session: _Session, feeder: Feeder) -> bool:
    """Seal a new key unless there is one, and load it in the drop-in. True when the
    drop-in changed."""
    target = session.path(STORE_KEY_PATH)
    if target.exists() or target.is_symlink():
        session.say(f"unchanged {target} (sealed to {_described(sealed_to(target.read_bytes()))}"
                    f"; an existing key is never replaced: what it sealed could not be "
                    f"opened with a new one)")
    else:
        with_key, why = _choose_key(feeder)
        command = ["systemd-creds", "encrypt", f"--name={STORE_KEY}", f"--with-key={with_key}",
                   "-", "-"]
        if session.dry_run:
            session.say(f"would seal a new {KEY_SIZE}-byte store key to "
                        f"{_described(with_key)} into {target} (mode 0600) with "
                        f"`{shlex.join(command)}`{why}")
        else:
            _seal_new_key(session, feeder, command, why)
    return session.write(_STORE_KEY_DROP_IN, _STORE_KEY_DROP_IN_TEXT.encode(), mode=0o644)


def _seal_new_key(session: _Session, feeder: Feeder, command: list[str], why: str) -> None:
    key = secrets.token_bytes(KEY_SIZE)
    status, sealed = feeder(command, key)
    if status != 0 or not sealed:
        raise _Abort(f"systemd-creds encrypt failed with exit status {status}; no key was "
                     f"written", _EX_SOFTWARE)
    # Opened again before it is kept: a key that this machine cannot open would only
    # surface as a unit that does not start.
    status, opened = feeder(["systemd-creds", "decrypt", f"--name={STORE_KEY}", "-", "-"],
                            sealed)
    if status != 0 or not hmac.compare_digest(opened, key):
        raise _Abort(f"systemd-creds cannot open the key it has just sealed (exit status "
                     f"{status}); no key was written", _EX_SOFTWARE)
    del key, opened
    session.write(STORE_KEY_PATH, sealed, mode=0o600)
    session.say(f"sealed a new store key to {_described(sealed_to(sealed))} into "
                f"{session.path(STORE_KEY_PATH)}{why}")


# -- uninstall ---------------------------------------------------------------------------

def uninstall_service(*, root: Path, live: bool, dry_run: bool, purge: bool,
                      runner: Runner = run_command, out: TextIO | None = None) -> int:
    """Remove what install_service wrote; the config and the credentials only with
    `purge`. The user stays (see below). Returns an exit status."""
    session = _Session(root=root, live=live, dry_run=dry_run, runner=runner,
                       out=sys.stdout if out is None else out)
    try:
        _uninstall(session, purge)
    except OSError as exc:
        session.say(f"device-agent: {exc}")
        return _EX_SOFTWARE
    return _EX_OK


def _uninstall(session: _Session, purge: bool) -> None:
    say = session.say
    units = [_UNIT_DIR / SOCKET_UNIT, _UNIT_DIR / SERVICE_UNIT]
    installed = any(session.path(unit).exists() for unit in units)
    if installed and session.live:
        # Stopping first: a running agent would otherwise outlive its unit file. A
        # failure (never enabled, already stopped) must not keep the files in place.
        session.run(["systemctl", "disable", "--now", SOCKET_UNIT, SERVICE_UNIT],
                    required=False)
    removed = [session.remove(unit) for unit in units]
    session.remove(_SYSUSERS_FILE)

    kept = [(_UNIT_DIR / f"{SERVICE_UNIT}.d", "drop-ins"),
            (_UNIT_DIR / f"{SOCKET_UNIT}.d", "drop-ins"),
            (CONFIG_PATH.parent, "config"),
            (_STATE_DIR, "credentials"),
            (_RUNTIME_DIR, "runtime directory")]
    if purge:
        if session.path(_STATE_DIR).exists():
            say("note: --purge deletes the tokens without revoking them; `device-agent "
                "logout` while the agent runs revokes them at the provider")
        for absolute, what in kept:
            session.remove_tree(absolute, what)
    else:
        present = [f"{session.path(p)} ({what})" for p, what in kept
                   if what in ("config", "credentials") and session.path(p).exists()]
        if present:
            say(f"kept {', '.join(present)}: --purge removes them")

    if any(removed) and session.live:
        session.run(["systemctl", "daemon-reload"], required=False)
    # Never deleted, as distributions do with system users: files the user owned
    # (a restored backup, a token file elsewhere) would pass to whoever got the id next.
    _, groups = _account_files(session.root)
    if SYSTEM_USER in groups:
        say(f"kept user and group {SYSTEM_USER} (system users are not deleted)")
    session.finish("nothing was installed")


# -- the command line --------------------------------------------------------------------

def _root(value: str | None) -> tuple[Path, bool]:
    if value is None:
        return Path("/"), True
    root = Path(value).absolute()
    if not root.is_dir():
        raise _Abort(f"--root {value}: not a directory", _EX_USAGE)
    return root, os.path.realpath(root) == "/"


def register(subparsers: argparse._SubParsersAction[Any], *,
             runner: Runner = run_command,
             geteuid: Callable[[], int] = os.geteuid) -> None:
    """Add ``install-service`` and ``uninstall-service`` to the CLI's subcommands.

    `runner` and `geteuid` are there for tests: commands recorded instead of run, and
    the root check exercised without being root.
    """

    def prepare(args: argparse.Namespace, command: str) -> tuple[Path, bool]:
        root, live = _root(args.root)
        if live and not args.dry_run and geteuid() != 0:
            raise _Abort(f"{command} changes the system and must run as root "
                         f"(sudo device-agent {command}); --dry-run shows what it would "
                         f"do, --root DIR writes into DIR instead", _EX_NOPERM)
        return root, live

    def install(args: argparse.Namespace) -> int:
        try:
            root, live = prepare(args, "install-service")
            program = find_program(Path(args.prefix) if args.prefix else None)
        except _Abort as exc:
            print(f"device-agent: {exc}", file=sys.stderr)
            return exc.status
        except (ValueError, FileNotFoundError) as exc:
            print(f"device-agent: {exc}", file=sys.stderr)
            return _EX_USAGE
        # Without --prefix the program is the one running now, on this Python.
        interpreters = [Path(sys.executable)] if live and not args.prefix else []
        return install_service(root=root, live=live, dry_run=args.dry_run, program=program,
                               runner=runner, interpreters=interpreters, seal=args.seal)

    def uninstall(args: argparse.Namespace) -> int:
        try:
            root, live = prepare(args, "uninstall-service")
        except _Abort as exc:
            print(f"device-agent: {exc}", file=sys.stderr)
            return exc.status
        return uninstall_service(root=root, live=live, dry_run=args.dry_run,
                                 purge=args.purge, runner=runner)

    parser = subparsers.add_parser(
        "install-service", help="install the systemd service, its user and a config",
        description="Write the systemd units and the sysusers.d file, create the "
                    "device-agent user, and put a config at /etc/device-agent/config.yaml "
                    "unless there is one. Safe to run again.")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be done, change nothing")
    parser.add_argument("--root", metavar="DIR",
                        help="install into DIR (an image) instead of this system; "
                             "runs no commands")
    parser.add_argument("--prefix", metavar="DIR",
                        help="device-agent is installed under DIR (ExecStart= "
                             "DIR/bin/device-agent); default: the program running now")
    parser.add_argument("--seal", action="store_true",
                        help="seal the tokens at rest: make a store key, seal it with "
                             "systemd-creds (TPM2 where present, else the host key) and "
                             "load it with LoadCredentialEncrypted=; never replaces a key")
    parser.set_defaults(func=install)

    parser = subparsers.add_parser(
        "uninstall-service", help="remove the systemd service (keeps config and credentials)",
        description="Stop and disable the service and remove its unit and sysusers.d files. "
                    "/etc/device-agent and /var/lib/device-agent stay unless --purge.")
    parser.add_argument("--purge", action="store_true",
                        help="also remove /etc/device-agent, /var/lib/device-agent and "
                             "drop-ins")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be done, change nothing")
    parser.add_argument("--root", metavar="DIR",
                        help="uninstall from DIR (an image) instead of this system")
    parser.set_defaults(func=uninstall)
