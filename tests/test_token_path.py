"""`device-agent token` as a shell script calls it: a child process that imports only
what a token read uses, and the small HTTP client it talks to the agent with.

The agent here is a Unix socket served from a thread of the test, answering bytes the
test chose, so odd answers (chunked, cut short, not HTTP) can be sent at will; the
real agent behind the real client is in test_cli.py and test_service_process.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.client import AgentUnavailable, call

ROOT = Path(__file__).resolve().parent.parent
TOKEN = {"access_token": "at-0123456789abcdef", "token_type": "Bearer", "expires_in": 3599}

# Modules a token read has no use for: each costs milliseconds on a Pi, on every call.
NOT_FOR_A_TOKEN_READ = ["asyncio", "http.client", "ssl", "logging", "yaml", "aiohttp",
                        "tempfile", "concurrent.futures", "agent.config",
                        "agent.display.render", "agent.install", "email",
                        # argparse's help formatter wants the terminal's width; shutil
                        # brings zlib, bz2 and lzma with it (2 ms).
                        "shutil",
                        # Annotations are all the token path has for it (2.5 ms).
                        "typing",
                        # The socket's path needs no pathlib (with urllib.parse, 3 ms).
                        "pathlib"]
# `token`'s line, as scripts write it, is read without argparse (2.5 ms with gettext).
NOT_FOR_A_TOKEN_READ_ALONE = ["argparse"]
# An editable install's import finder, run at start-up, imports pathlib: forgotten, so
# that an import of it by the agent shows.
FORGET_STARTUP_IMPORTS = f"import sys; [sys.modules.pop(m, None) for m in {NOT_FOR_A_TOKEN_READ!r}]"


class CannedAgent:
    """Answers each connection with `answer` after reading the request's head."""

    def __init__(self, path: Path, answer: bytes) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with connection:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = connection.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                self.requests.append(head)
                connection.sendall(self.answer)

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=10)


def http_answer(body: bytes, *, status: str = "200 OK", chunked: bool = False) -> bytes:
    if chunked:
        middle = len(body) // 2
        framed = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n"
                          for part in (body[:middle], body[middle:]) if part) + b"0\r\n\r\n"
        return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\n\r\n").encode() + framed
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@pytest.fixture
def agent_at(tmp_path: Path) -> Iterator[tuple[Path, list[CannedAgent]]]:
    path = tmp_path / "agent.sock"
    made: list[CannedAgent] = []
    yield path, made
    for agent in made:
        agent.close()


def serve(where: tuple[Path, list[CannedAgent]], answer: bytes) -> CannedAgent:
    path, made = where
    agent = CannedAgent(path, answer)
    made.append(agent)
    return agent


@pytest.mark.parametrize(("argv", "answer", "printed"), [
    (["token"], TOKEN, TOKEN["access_token"]),
    (["status", "--json"], {"state": "signed_in"}, "{"),
    (["login"], {"next_code_in": 0}, "a new code is on the screen"),
    (["logout"], {"revocation": "confirmed"}, "signed out; the provider confirmed"),
    (["refresh"], {"token_expires_at": "2027-01-15T13:00:00Z"}, "refreshed"),
], ids=["token", "status-json", "login", "logout", "refresh"])
def test_the_socket_commands_import_only_what_they_use(
        agent_at: tuple[Path, list[CannedAgent]], argv: list[str], answer: dict[str, object],
        printed: str) -> None:
    # What scripts call, often: each import a command does not use is paid on every call.
    serve(agent_at, http_answer(json.dumps(answer).encode()))
    unused = NOT_FOR_A_TOKEN_READ + (NOT_FOR_A_TOKEN_READ_ALONE if argv == ["token"] else [])
    code = (f"{FORGET_STARTUP_IMPORTS}; from agent.cli import main; "
            f"status = main({argv!r}); print(status, *sorted("
            f"m for m in {unused!r} if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICE_AGENT")}
    env["DEVICE_AGENT_SOCKET"] = str(agent_at[0])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, check=False, cwd=ROOT)
    lines = result.stdout.splitlines()
    assert lines and lines[0].startswith(printed), result.stderr
    assert lines[-1] == "0", f"status and modules imported for nothing: {lines[-1]}"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_the_client_reads_an_answer_framed_either_way(
        agent_at: tuple[Path, list[CannedAgent]], chunked: bool) -> None:
    agent = serve(agent_at, http_answer(json.dumps(TOKEN).encode(), chunked=chunked))
    answer = call(agent_at[0], "GET", "/v1/token?min_ttl=60", timeout=10)
    assert answer.ok and answer.body == TOKEN
    request_line, *headers = agent.requests[0].decode().split("\r\n")
    assert request_line == "GET /v1/token?min_ttl=60 HTTP/1.1"
    assert "Accept: application/json" in headers


def test_an_error_answer_keeps_the_apis_error_and_message(
        agent_at: tuple[Path, list[CannedAgent]]) -> None:
    body = json.dumps({"error": "not_signed_in", "message": "no sign-in yet"}).encode()
    serve(agent_at, http_answer(body, status="503 Service Unavailable"))
    answer = call(agent_at[0], "GET", "/v1/token", timeout=10)
    assert (answer.status, answer.error, answer.message) == (503, "not_signed_in",
                                                             "no sign-in yet")


@pytest.mark.parametrize("answer", [
    b"",
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"access_token\": \"at-",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 2OO OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
], ids=["nothing", "not-http", "cut-short", "bad-chunk", "bad-status", "bad-length"])
def test_a_broken_answer_is_a_typed_error(
        agent_at: tuple[Path, list[CannedAgent]], answer: bytes) -> None:
    serve(agent_at, answer)
    with pytest.raises(AgentUnavailable, match=r"broken answer|closed the connection"):
        call(agent_at[0], "GET", "/v1/token", timeout=10)


def test_an_answer_without_json_is_reported_not_raised(
        agent_at: tuple[Path, list[CannedAgent]]) -> None:
    serve(agent_at, http_answer(b"<html>proxy error</html>", status="502 Bad Gateway"))
    answer = call(agent_at[0], "GET", "/v1/token", timeout=10)
    assert answer.status == 502 and answer.error == "bad_answer"


def _full_queue(path: Path) -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket that takes nothing, its queue filled by connections."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued = []
    while True:
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        filler.setblocking(False)
        try:
            filler.connect(str(path))
        except BlockingIOError:
            filler.close()
            return listener, queued
        queued.append(filler)


def test_a_queue_that_stays_full_is_a_typed_error_after_the_timeout(tmp_path: Path) -> None:
    # A burst of callers can fill the kernel's queue before the agent takes them; a
    # connect then fails at once with EAGAIN, not a typed error.
    listener, queued = _full_queue(tmp_path / "agent.sock")
    try:
        with pytest.raises(AgentUnavailable, match="takes no more connections"):
            call(tmp_path / "agent.sock", "GET", "/v1/token", timeout=0.3)
    finally:
        for sock in (listener, *queued):
            sock.close()


def test_a_full_queue_is_waited_out_within_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    listener, queued = _full_queue(path)
    answered: list[int] = []
    caller = threading.Thread(target=lambda: answered.append(
        call(path, "GET", "/v1/token", timeout=30).status))
    caller.start()
    try:
        # Room at last: the agent takes what was queued, the caller among them.
        for filler in queued:
            filler.close()
        listener.settimeout(0.1)
        while caller.is_alive():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                if connection.recv(4096):  # a filler sends nothing, and has hung up
                    connection.sendall(http_answer(json.dumps(TOKEN).encode()))
    finally:
        caller.join(timeout=30)
        listener.close()
    assert answered == [200]


def test_a_socket_command_builds_the_parser_of_its_own_command_only(
        agent_at: tuple[Path, list[CannedAgent]], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Each command's options cost a formatter and an action each: all of them are a few
    # milliseconds of every call.
    import argparse

    from agent.cli import main

    serve(agent_at, http_answer(json.dumps({"state": "signed_in"}).encode()))
    made: list[str] = []
    init = argparse.ArgumentParser.__init__

    def counted(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self.prog)

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", counted)
    assert main(["status", "--json", "--socket", str(agent_at[0])]) == 0
    assert json.loads(capsys.readouterr().out) == {"state": "signed_in"}
    assert made == ["device-agent", "device-agent status"]


@pytest.mark.parametrize("argv", [
    ["token", "--bogus"], ["token", "--min-ttl", "soon"], ["status", "extra"], ["bogus"],
    [], ["--help"], ["token", "--help"], ["--version"], ["check-config", "--help"],
    ["render", "--help"],
], ids=lambda argv: " ".join(argv) or "nothing")
def test_the_command_line_reads_as_with_every_command_built(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import build_parser, main

    with pytest.raises(SystemExit) as built:
        build_parser().parse_args(argv)
    expected = capsys.readouterr()
    with pytest.raises(SystemExit) as read:
        main(argv)
    assert (read.value.code, capsys.readouterr()) == (built.value.code, expected)


# The lines scripts write, read without argparse; then what only argparse reads.
WITHOUT_ARGPARSE = [
    ["token"], ["token", "--json"], ["token", "--min-ttl", "60"], ["token", "--min-ttl=0"],
    ["token", "--socket", "/run/x.sock", "--json", "--min-ttl", " 7"],
    ["token", "--socket=", "--config", "c.yaml"], ["token", "--json", "--json"],
    ["token", "--min-ttl", "5", "--min-ttl", "9"], ["token", "--min-ttl=-5"],
]
BY_ARGPARSE = [
    ["token", "--min", "60"], ["token", "--socket", "-x"], ["token", "--", "x"],
    # argparse 3.11 takes `--` out of an explicit value, leaving an empty list.
    ["token", "--socket=--"], ["token", "--config=--"],
    ["token", "--min-ttl", "-5"], ["token", "--json=yes"], ["token", "-h"],
    ["token", "--min-ttl", "soon"], ["token", "--min-ttl"], ["tok"], ["status"], [],
]


@pytest.mark.parametrize("argv", WITHOUT_ARGPARSE + BY_ARGPARSE,
                         ids=lambda argv: " ".join(argv) or "nothing")
def test_the_token_line_reads_as_argparse_reads_it(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import _read_token_line, build_parser

    try:
        by_argparse: Any = vars(build_parser().parse_args(argv))
    except SystemExit as exc:
        by_argparse = exc.code
    capsys.readouterr()
    read = _read_token_line(argv)
    if argv in WITHOUT_ARGPARSE:
        assert read is not None and vars(read) == by_argparse
    else:
        assert read is None


@pytest.mark.parametrize("spelling", ["{dir}/agent.sock/", "{dir}//agent.sock",
                                      "{dir}/./agent.sock", "{dir}/././././agent.sock/"])
def test_a_socket_path_is_read_as_pathlib_would_tidy_it(
        agent_at: tuple[Path, list[CannedAgent]], spelling: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    # A trailing slash makes connect() say ENOTDIR, and redundant parts can push a path
    # past AF_UNIX's 108 bytes: the path is tidied before use, as Path() did.
    from agent.cli import main

    serve(agent_at, http_answer(json.dumps(TOKEN).encode()))
    given = spelling.format(dir=agent_at[0].parent)
    assert main(["token", "--socket", given]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == TOKEN["access_token"]


def test_the_per_user_socket_is_found_without_pathlib(tmp_path: Path) -> None:
    # The demo's and a per-user agent's socket, where no flag or variable names one.
    from agent.client import SERVICE_SOCKET

    if os.path.lexists(SERVICE_SOCKET):
        pytest.skip(f"a device-agent service runs here: {SERVICE_SOCKET} is found first")
    runtime = tmp_path / "run"
    (runtime / "device-agent").mkdir(parents=True, mode=0o700)
    code = (f"{FORGET_STARTUP_IMPORTS}; from agent.cli import main; "
            "status = main(['token']); print(status, 'pathlib' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICE_AGENT")}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    env.pop("RUNTIME_DIRECTORY", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, check=False, cwd=ROOT)
    # No agent runs there: status 69, and the path it looked at.
    assert result.stdout.split() == ["69", "False"], result.stderr
    assert f"{runtime}/device-agent/agent.sock" in result.stderr
