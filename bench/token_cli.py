"""`device-agent token` end to end, as a shell script calls it, beside the floor.

Starts `device-agent demo` (built-in provider, codes approved at once) in a child
process and, once it is signed in, runs in turn, interleaved so that the machine's
drift hits each alike:

- the floor: the bare interpreter (`python -c pass`) of the venv the agent is installed
  in;
- a raw AF_UNIX client in Python on the same interpreter (the least a Python token read
  can cost);
- `device-agent token` from a non-editable install in a temporary venv (`pip install .`,
  as the Pi guide installs it), and from the project's editable venv, whose import
  finder adds its own cost.

Prints the median and the spread (p10-p90) of wall time per run, and the peak RSS of
each, measured by GNU time (`timing.peak_rss_kib` says why not by wait4).

    .venv/bin/python bench/token_cli.py [--runs 60] [--command token]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from installed import plain_install
from timing import agent_state, peak_rss_kib, run_once, spread

ROOT = Path(__file__).resolve().parent.parent

RAW_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"GET /v1/token HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
body = data.split(b"\r\n\r\n", 1)[1]
sys.stdout.write(body[body.index(b'"access_token": "') + 17:].split(b'"')[0].decode())
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--command", default="token",
                        help="the subcommand to time (token, status, ...)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="da-bench-") as tmp:
        path = str(Path(tmp) / "agent.sock")
        plain = plain_install(Path(tmp)) / "device-agent"
        editable = ROOT / ".venv" / "bin" / "device-agent"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DEVICE_AGENT_SOCKET": path,
               "HOME": tmp}
        agent = subprocess.Popen(
            [str(editable), "demo", "--approve-after", "0", "--display", "none",
             "--socket", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while agent_state(Path(path)) != "signed_in":
                if time.monotonic() > deadline or agent.poll() is not None:
                    print("the agent did not sign in", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            # The interpreter the installed agent runs on: the venv's, which reads only
            # its own site-packages. The base interpreter would also run every .pth file
            # in the base site-packages (on the development machine, one that imports
            # certifi: 20 ms a start).
            python = str(plain.parent / "python")
            cases = {
                "python -c pass": [python, "-c", "pass"],
                "raw AF_UNIX client (Python)": [python, "-c", RAW_CLIENT, path],
                f"device-agent {args.command} (pip install .)": [str(plain), args.command],
                f"device-agent {args.command} (editable)": [str(editable), args.command],
            }
            if args.command == "status":
                for name in list(cases):
                    if name.startswith("device-agent"):
                        cases[name] = [*cases[name], "--json"]
            times: dict[str, list[float]] = {name: [] for name in cases}
            for argv in cases.values():  # warm the page cache
                run_once(argv, env)
            for _ in range(args.runs):
                for name, argv in cases.items():
                    times[name].append(run_once(argv, env))
            # Peak memory in runs of their own: GNU time's start-up is not in the times.
            peaks = {name: [peak_rss_kib(argv, env) for _ in range(3)]
                     for name, argv in cases.items()}
            print(f"$ python bench/token_cli.py --runs {args.runs} --command {args.command}")
            print(f"{'':44} {'median ms':>10} {'p10-p90 ms':>14} {'peak RSS MB':>12}")
            for name in cases:
                median, p10, p90 = spread([t * 1000 for t in times[name]])
                known = [peak for peak in peaks[name] if peak is not None]
                peak = f"{max(known) / 1024:.1f}" if known else "n/a (no GNU time)"
                print(f"{name:44} {median:>10.1f} {p10:>6.1f}-{p90:<7.1f} {peak:>12}")
        finally:
            agent.terminate()
            agent.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
