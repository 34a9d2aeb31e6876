"""Many devices behind one address: `--agents` agents, all needing a sign-in, start
together behind one NAT address against authentik's device throttle (20 accepted
device-code requests in any rolling hour per client address; refused ones are not
counted).

One process, one event loop, one test provider, one injected clock (what is real and
what is simulated: `bench/fleet_sim.py`); every agent's requests carry the same
address, so they share the provider's bucket as devices behind one NAT do. A person
approves each code `--approve-after` seconds after it is shown (LO:HI, uniform), if it
is still on that device's screen by then.

Prints codes spent (accepted device requests), codes approved and expired unused,
throttle answers (429) and the agents that got one, the time until each agent first
showed a code and until it was signed in (min, median, max), and when the first codes
came, per 10 minutes. The agent's sign-in settings (`--codes-per-hour`,
`--throttle-backoff`, `--throttle-backoff-max`) and the provider's
(`--device-requests-per-hour`, `--code-lifetime`) can be varied, to compare what an
operator might configure:

    .venv/bin/python bench/fleet_nat.py                             # the defaults
    .venv/bin/python bench/fleet_nat.py --throttle-backoff-max 300  # throttle_backoff_max: 5m
    .venv/bin/python bench/fleet_nat.py --code-lifetime 60          # authentik's default

Exits 1 when an agent was not signed in within `--patience` simulated seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.idp import ProviderSettings
from agent.session import SessionSettings
from bench.fleet_sim import Fleet, InlineExecutor, People, bins, quiet_logs

__all__ = ["NatPlan", "NatResult", "main", "simulate"]

NAT_ADDRESS = "203.0.113.7"
_DEFAULTS = SessionSettings.__dataclass_fields__


def _default(name: str) -> float:
    value = _DEFAULTS[name].default
    assert isinstance(value, int | float)
    return float(value)


@dataclass(frozen=True)
class NatPlan:
    agents: int = 50
    device_requests_per_hour: int = 20
    code_lifetime: float = 600.0
    approve_after: tuple[float, float] = (20.0, 120.0)
    codes_per_hour: int = int(_default("codes_per_hour"))
    throttle_backoff: float = _default("throttle_backoff")
    throttle_backoff_max: float = _default("throttle_backoff_max")
    seed: int = 8628
    patience: float = 12 * 3600.0


@dataclass
class NatResult:
    plan: NatPlan
    command: str
    codes_spent: int
    approved: int
    throttle_answers: int
    throttled_agents: int
    first_code: list[float]              # per agent that showed one: seconds from start
    signed_in: list[float]               # per agent signed in: seconds from start
    codes_per_agent: Counter[int]
    wall: float
    problems: list[str] = field(default_factory=list)

    def render(self) -> str:
        p = self.plan
        lines = [
            f"$ {self.command}",
            f"behind one address: {p.agents} agents, none signed in, start together "
            f"(seed {p.seed}); simulated time",
            f"  provider: {p.device_requests_per_hour} device-code requests an hour per "
            f"address (rolling, refused ones not counted), codes live "
            f"{p.code_lifetime:.0f} s; a person approves a code "
            f"{p.approve_after[0]:.0f}-{p.approve_after[1]:.0f} s after it is shown",
            f"  agents: sign_in.codes_per_hour {p.codes_per_hour}, throttle_backoff "
            f"{p.throttle_backoff:.0f} s, throttle_backoff_max {p.throttle_backoff_max:.0f} s",
            "",
            f"  codes spent: {self.codes_spent} (approved {self.approved}, expired unused "
            f"{self.codes_spent - self.approved})",
            f"  throttled: {self.throttled_agents} of {p.agents} agents got a 429 "
            f"({self.throttle_answers} answers in all)",
            "  codes shown per agent: " + ", ".join(
                f"{codes} by {n} agent{'' if n == 1 else 's'}"
                for codes, n in sorted(self.codes_per_agent.items())),
            "  until each showed its first code: " + _spread(self.first_code, p.agents),
            "  until each was signed in:         " + _spread(self.signed_in, p.agents),
            "",
            "first code shown, per 10 min from the start:",
        ]
        if self.first_code:
            width = 600.0
            counts = bins(self.first_code, 0.0, max(self.first_code) + width / 1000, width)
            top = max(counts)
            for i, count in enumerate(counts):
                bar = "#" * round(40 * count / top) if top else ""
                lines.append(f"  {i * 10:4d}-{(i + 1) * 10:<4d}min {bar:<40} {count}")
        lines += ["", f"wall time {self.wall:.0f} s"]
        lines += [f"PROBLEM: {problem}" for problem in self.problems]
        lines.append("OK" if not self.problems else "FAILED")
        return "\n".join(lines)


def _spread(values: list[float], agents: int) -> str:
    if not values:
        return "none"
    missing = agents - len(values)
    return (f"min {_hm(min(values))}, median {_hm(statistics.median(values))}, max "
            f"{_hm(max(values))}" + (f" ({missing} never)" if missing else ""))


def _hm(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


async def simulate(plan: NatPlan, *, command: str = "") -> NatResult:
    began = time.perf_counter()
    asyncio.get_running_loop().set_default_executor(InlineExecutor(max_workers=1))
    rng = random.Random(plan.seed)
    settings = ProviderSettings(code_lifetime=plan.code_lifetime,
                                device_requests_per_hour=plan.device_requests_per_hour)
    fleet = Fleet(settings=settings, seed=plan.seed, session={
        "codes_per_hour": plan.codes_per_hour,
        "throttle_backoff": plan.throttle_backoff,
        "throttle_backoff_max": plan.throttle_backoff_max,
    })
    clock, stepper = fleet.clock, fleet.stepper
    await fleet.provider.start()
    try:
        agents = [fleet.add_agent(NAT_ADDRESS) for _ in range(plan.agents)]
        lo, hi = plan.approve_after
        fleet.people = People(fleet, delay=lambda: rng.uniform(lo, hi),
                              willing=lambda _agent, _shown_at: True)
        start = clock.monotonic()
        for agent in agents:
            fleet.start(agent)

        def all_signed_in() -> bool:
            if not fleet.changed:
                return False
            fleet.changed = False
            return fleet.all_valid()

        await stepper.run_until(start + plan.patience, until=all_signed_in)
    finally:
        with quiet_logs():
            await fleet.close()

    devices = [a for a in fleet.attempts if a.kind == "device"]
    throttled = {a.agent for a in devices if a.status == 429}
    spent = sum(1 for r in fleet.provider.idp.requests
                if r.endpoint == "device" and r.status == 200)
    result = NatResult(
        plan=plan, command=command, codes_spent=spent,
        approved=fleet.people.approved if fleet.people else 0,
        throttle_answers=sum(1 for a in devices if a.status == 429),
        throttled_agents=len(throttled),
        first_code=[a.codes[0][0] - start for a in agents if a.codes],
        signed_in=[a.signed_in_at[0] - start for a in agents if a.signed_in_at],
        codes_per_agent=Counter(len(a.codes) for a in agents),
        wall=time.perf_counter() - began)
    if len(result.signed_in) < plan.agents:
        result.problems.append(f"{plan.agents - len(result.signed_in)} agents were not "
                               f"signed in within {plan.patience:.0f} s")
    return result


def _span(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(":")
    return float(lo), float(hi or lo)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = NatPlan()
    parser.add_argument("--agents", type=int, default=defaults.agents)
    parser.add_argument("--device-requests-per-hour", type=int,
                        default=defaults.device_requests_per_hour,
                        help="the provider's throttle (AUTHENTIK_THROTTLE__PROVIDERS__"
                             "OAUTH2__DEVICE)")
    parser.add_argument("--code-lifetime", type=float, default=defaults.code_lifetime,
                        help="authentik's access code validity, seconds")
    parser.add_argument("--approve-after", type=_span, default=defaults.approve_after,
                        metavar="LO:HI", help="seconds from a code shown to its approval")
    parser.add_argument("--codes-per-hour", type=int, default=defaults.codes_per_hour,
                        help="sign_in.codes_per_hour of every agent")
    parser.add_argument("--throttle-backoff", type=float, default=defaults.throttle_backoff,
                        help="sign_in.throttle_backoff, seconds")
    parser.add_argument("--throttle-backoff-max", type=float,
                        default=defaults.throttle_backoff_max,
                        help="sign_in.throttle_backoff_max, seconds")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--patience", type=float, default=defaults.patience,
                        help="simulated seconds before the run is called stuck")
    args = parser.parse_args()
    plan = NatPlan(agents=args.agents, device_requests_per_hour=args.device_requests_per_hour,
                   code_lifetime=args.code_lifetime, approve_after=args.approve_after,
                   codes_per_hour=args.codes_per_hour, throttle_backoff=args.throttle_backoff,
                   throttle_backoff_max=args.throttle_backoff_max, seed=args.seed,
                   patience=args.patience)
    command = shlex.join([".venv/bin/python", "bench/fleet_nat.py", *sys.argv[1:]])
    with quiet_logs():
        result = asyncio.run(simulate(plan, command=command))
    print(result.render())
    return 0 if not result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
