"""Fleet recovery: 1,000 agents come back together from a provider outage.

One process, one event loop, one test provider, one injected clock (what is real and
what is simulated: `bench/fleet_sim.py`). Each agent has an address of its own, so
authentik's per-address device throttle plays no part here (`bench/fleet_nat.py` is
the case where it does). The timeline, in simulated time:

1. Before t=0 the signed-in agents' tokens were issued (by the provider, one hour
   tokens as authentik's default), at random moments of one refresh cycle: a fleet in
   its steady state, each refreshing 20% of the lifetime before expiry.
2. t=0: `--agents` minus `--signing-in` agents start together, with those stores. Each
   refreshes once on schedule (discovering the provider's endpoints first), so they
   know the endpoints when the outage comes, as a fleet that has been running does.
3. In the `--code-lifetime` before the outage, `--signing-in` more agents are switched
   on without credentials: each shows a code and polls for it. Nobody approves yet.
4. t=2880 s (one refresh cycle): the provider goes down for `--outage` seconds:
   connections refused (`--outage-kind refused`) or 503 pages (`503`). The refreshes
   that fall due then fail and back off; some tokens expire, the others are about to;
   the codes on screen die and new ones cannot be had.
5. The provider comes back. From then on each code shown is approved by its person
   after a delay drawn from `--approve-after` (seconds, LO:HI).

Measured from the provider's return ("the recovery"), at the provider: refreshes and
sign-in polls (and device-code requests) per 10 s bin, from the return until every
agent that needed one holds a valid token again (for refreshes: the agents that were
signed in; for polls: the new sign-ins). Mean = requests in that window / its length
in bins; peak = the busiest bin. Also the time until every agent holds a valid token,
refresh tokens the provider refused (a lost sign-in: must be 0), and tokens that
expired during the recovery before their refresh landed.

    .venv/bin/python bench/fleet.py                       # 1,000 agents, 30 min outage
    .venv/bin/python bench/fleet.py --outage 3600 --outage-kind 503
    .venv/bin/python bench/fleet.py --refresh-retry-initial 30   # refresh.retry_initial: 30s
    .venv/bin/python bench/fleet.py --restart   # every agent restarts as the provider returns

With `--restart` every agent is stopped and started again from its files the moment
the provider is back (a site whose power comes back for the devices and the provider
at once): the literal "start together".

Exits 1 when a refresh token was refused, an agent did not recover, or a peak is not
below twice its mean.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.idp import ProviderSettings
from bench.fleet_sim import (
    Agent,
    Fleet,
    InlineExecutor,
    People,
    bins,
    first_all_valid,
    histogram,
    percentile,
    quiet_logs,
)

__all__ = ["Plan", "Recovery", "main", "simulate"]

# The agent's default (refresh.margin_ratio): a token is refreshed when 20% of its
# life is left, so a steady fleet refreshes uniformly over 80% of the lifetime.
MARGIN_RATIO = 0.2
# How long after the provider's return a run may take before it is called stuck.
PATIENCE = 6 * 3600.0


@dataclass(frozen=True)
class Plan:
    agents: int = 1000
    signing_in: int = 100
    outage: float = 1800.0
    outage_kind: str = "refused"
    code_lifetime: float = 600.0
    approve_after: tuple[float, float] = (20.0, 120.0)
    token_lifetime: float = 3600.0
    # refresh.retry_initial of every agent (the first wait after a failed refresh).
    refresh_retry_initial: float = 2.0
    restart: bool = False
    seed: int = 8628
    bin: float = 10.0


@dataclass
class Series:
    """One kind of request at the provider over its recovery window."""

    name: str
    window: float                 # seconds from the provider's return
    counts: list[int]
    bin: float
    busiest_second: int           # the most in any one second of the window

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def mean(self) -> float:
        return self.total / (self.window / self.bin) if self.window > 0 else 0.0

    @property
    def peak(self) -> int:
        return max(self.counts, default=0)

    @property
    def ratio(self) -> float:
        return self.peak / self.mean if self.mean else 0.0


@dataclass
class Recovery:
    plan: Plan
    command: str
    at_outage: Counter[str]
    at_return: Counter[str]
    outage_attempts: Counter[str]
    outage_503: int
    t_all: float | None
    t_signed: float | None
    t_new: float | None
    refreshes: Series
    polls: Series
    devices: Series
    other: Counter[str]
    back_after: list[float]            # each formerly signed-in agent needing one
    # by what the agent held at the return: [refreshes in the window, in its first 30 s]
    refresh_sources: dict[str, list[int]]
    lapsed: int                        # valid at the return, expired before refreshed
    refused_refreshes: int
    signed_in_anew: int
    approved: int
    wall: float
    steps: int
    problems: list[str] = field(default_factory=list)

    def render(self) -> str:
        p = self.plan
        signed = p.agents - p.signing_in
        lines = [
            f"$ {self.command}",
            f"fleet: {p.agents} agents in one process on one event loop ({signed} signed "
            f"in, {p.signing_in} signing in), one test provider, simulated time "
            f"(seed {p.seed})",
            f"  tokens live {p.token_lifetime:.0f} s, refreshed {MARGIN_RATIO:.0%} of that "
            f"before expiry, a failed refresh retried after {p.refresh_retry_initial:g} s "
            f"doubling to 300 s; codes live {p.code_lifetime:.0f} s, polled every 5 s; a person "
            f"approves a code {p.approve_after[0]:.0f}-{p.approve_after[1]:.0f} s after it "
            "is shown, once the provider is back",
            f"  outage: {p.outage:.0f} s of "
            + ("refused connections" if p.outage_kind == "refused" else "HTTP 503 pages")
            + f", from t={p.token_lifetime * (1 - MARGIN_RATIO):.0f} s"
            + ("; every agent restarts the moment it ends" if p.restart else ""),
            f"  when it began: {_states(self.at_outage)}",
            f"  during it: {sum(self.outage_attempts.values())} requests failed "
            f"({_kinds(self.outage_attempts)})"
            + (f"; the proxy answered 503 {self.outage_503} times" if self.outage_503 else ""),
            f"  when the provider came back: {_states(self.at_return)}",
            "",
            "recovery (t=0: the provider is back)",
            f"  every agent holds a valid token after {_secs(self.t_all)} "
            f"(the {signed} signed in: {_secs(self.t_signed)}; the {p.signing_in} new "
            f"sign-ins: {_secs(self.t_new)})",
        ]
        if self.back_after:
            lines.append(
                f"  signed-in agents that needed a refresh: {len(self.back_after)}, token "
                f"back after p50 {percentile(self.back_after, 50):.0f} s, p90 "
                f"{percentile(self.back_after, 90):.0f} s, max {max(self.back_after):.0f} s")
        lines += [
            f"  lost sign-ins: {self.refused_refreshes} refresh tokens refused, "
            f"{self.signed_in_anew} signed-in agents showed a code; {self.lapsed} tokens "
            "valid at the return expired before their refresh landed",
            f"  codes approved: {self.approved}",
            "",
            f"  {'requests per ' + format(p.bin, '.0f') + ' s':<24}{'window':>8}{'total':>7}"
            f"{'peak':>6}{'mean':>7}{'peak/mean':>11}  peak < 2x mean  busiest 1 s",
        ]
        for series in (self.refreshes, self.polls, self.devices):
            target = ("" if series is self.devices else "n/a" if series.window <= p.bin
                      else "yes" if series.ratio < 2 else "NO")
            lines.append(f"  {series.name:<24}{series.window:>7.0f}s{series.total:>7}"
                         f"{series.peak:>6}{series.mean:>7.1f}{series.ratio:>11.2f}  "
                         f"{target:<14} {series.busiest_second:>11}")
        if self.refreshes.window <= p.bin:
            lines.append(f"  (the refreshes' whole recovery fits in one {p.bin:.0f} s bin, so "
                         "peak/mean says nothing of it: see the busiest second)")
        if self.other:
            lines.append(f"  also in the refresh window: {_kinds(self.other)}")
        lines.append("  refreshes by what the agent held at the return: " + ", ".join(
            f"{kind} {n} ({first} in the first {3 * p.bin:.0f} s)"
            for kind, (n, first) in sorted(self.refresh_sources.items())))
        for series in (self.refreshes, self.polls):
            lines += ["", f"{series.name} per {p.bin:.0f} s at the provider, from its return:",
                      histogram(series.counts, width=p.bin, mean=series.mean)]
        lines += ["", f"wall time {self.wall:.0f} s, {self.steps} clock steps"]
        lines += [f"PROBLEM: {problem}" for problem in self.problems]
        lines.append("OK" if not self.problems else "FAILED")
        return "\n".join(lines)


def _secs(value: float | None) -> str:
    return "never" if value is None else f"{value:.0f} s"


def _kinds(counter: Counter[str]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in counter.most_common()) or "none"


def _states(counter: Counter[str]) -> str:
    return ", ".join(f"{n} {state}" for state, n in counter.most_common())


def _state(agent: Agent, now: float) -> str:
    snapshot = agent.driver.snapshot
    if agent.holds_valid_token(now):
        left = agent.valid_until - now
        return "valid token" if left > 900 else "valid token (under 15 min left)"
    if agent.driver.credentials is not None:
        return "expired token"
    if snapshot.user_code is not None:
        return "showing a code"
    return "waiting for a code"


def address(index: int) -> str:
    """A device of its own on 10.0.0.0/8."""
    return f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}"


async def simulate(plan: Plan, *, command: str = "") -> Recovery:
    began = time.perf_counter()
    asyncio.get_running_loop().set_default_executor(InlineExecutor(max_workers=1))
    rng = random.Random(plan.seed)
    settings = ProviderSettings(code_lifetime=plan.code_lifetime,
                                access_token_lifetime=plan.token_lifetime)
    fleet = Fleet(settings=settings, seed=plan.seed,
                  session={"refresh_retry_initial": plan.refresh_retry_initial})
    clock, stepper, idp = fleet.clock, fleet.stepper, fleet.provider.idp
    await fleet.provider.start()
    try:
        cycle = plan.token_lifetime * (1 - MARGIN_RATIO)
        start = clock.monotonic() + cycle
        signed = [fleet.add_agent(address(i)) for i in range(plan.agents - plan.signing_in)]
        # Issued one cycle before each agent's refresh falls due after the start.
        due = sorted((rng.uniform(0, cycle), agent.index) for agent in signed)
        for offset, index in due:
            clock.advance(start + offset - cycle - clock.monotonic())
            fleet.seed_credentials(fleet.agents[index])
        clock.advance(start - clock.monotonic())
        for agent in signed:
            fleet.start(agent)
        await stepper.settle()
        fleet.refresh_validity()

        outage_at = start + cycle
        newcomers = [fleet.add_agent(address(len(fleet.agents)))
                     for _ in range(plan.signing_in)]
        for agent in newcomers:
            fleet.spawn(_start_at(fleet, agent, outage_at - rng.uniform(0, plan.code_lifetime)))
        await stepper.run_until(outage_at)
        at_outage = Counter(_state(a, clock.monotonic()) for a in fleet.agents)

        await fleet.provider.go_down(plan.outage_kind)
        back_at = outage_at + plan.outage
        await stepper.run_until(back_at)
        at_return = Counter(_state(a, back_at) for a in fleet.agents)
        initial = {a.index: a.valid_until for a in fleet.agents}
        await fleet.provider.come_back()
        if plan.restart:
            await fleet.restart(fleet.agents)
        lo, hi = plan.approve_after
        fleet.people = People(fleet, delay=lambda: rng.uniform(lo, hi),
                              willing=lambda _agent, shown_at: shown_at >= back_at)

        def recovered() -> bool:
            if not fleet.changed:
                return False
            fleet.changed = False
            return fleet.all_valid()

        await stepper.run_until(back_at + PATIENCE, until=recovered)
        end = clock.monotonic()
        # The provider's word, not the agents': each token held is one it accepts.
        rejected = sum(1 for a in fleet.agents if a.driver.credentials is None
                       or not idp.access_token_valid(a.driver.credentials.tokens.access_token))
    finally:
        with quiet_logs():
            await fleet.close()

    changes = fleet.token_changes
    t_signed = first_all_valid(signed, back_at, initial, changes)
    t_new = first_all_valid(newcomers, back_at, initial, changes)
    t_all = first_all_valid(fleet.agents, back_at, initial, changes)

    arrivals: dict[str, list[float]] = {}
    for request in idp.requests:
        kind = request.endpoint
        if kind == "token":
            kind = ("refresh" if request.form.get("grant_type") == "refresh_token"
                    else "poll")
        arrivals.setdefault(kind, []).append(request.at)

    def series(name: str, kind: str, until: float | None) -> Series:
        stop = until if until is not None else end
        window = max(stop - back_at, plan.bin)
        times = arrivals.get(kind, [])
        return Series(name, window, bins(times, back_at, back_at + window, plan.bin), plan.bin,
                      max(bins(times, back_at, back_at + window, 1.0)))

    refreshes = series("refreshes", "refresh", t_signed)
    polls = series("sign-in polls", "poll", t_new)
    devices = series("device-code requests", "device", t_new)
    window_end = back_at + refreshes.window
    other = Counter(kind for kind, times in arrivals.items()
                    if kind not in ("refresh", "poll", "device")
                    for t in times if back_at <= t < window_end)

    # Whose refreshes the window holds, by what the agent held at the return.
    margin = plan.token_lifetime * MARGIN_RATIO

    def held(index: int) -> str:
        until = initial[index] - back_at
        return ("expired" if until <= 0 else "in back-off, valid" if until <= margin
                else "on schedule")

    refresh_sources: dict[str, list[int]] = {}
    for attempt in fleet.attempts:
        if attempt.kind == "refresh" and back_at <= attempt.at < back_at + refreshes.window:
            counts = refresh_sources.setdefault(held(attempt.agent), [0, 0])
            counts[0] += 1
            counts[1] += attempt.at < back_at + 3 * plan.bin
    outage_attempts = Counter(a.kind for a in fleet.attempts
                              if outage_at <= a.at < back_at and a.status != 200)
    back_after = []
    lapsed = 0
    for agent in signed:
        if held(agent.index) == "on schedule":
            continue  # not due yet: refreshes on its schedule
        got = next((at for at, index, _ in changes if index == agent.index and at >= back_at),
                   None)
        if got is not None:
            back_after.append(got - back_at)
        if initial[agent.index] > back_at and (got is None or got > initial[agent.index]):
            lapsed += 1
    refused = sum(1 for r in idp.requests
                  if r.endpoint == "token" and r.form.get("grant_type") == "refresh_token"
                  and r.status not in (200, None))
    recovery = Recovery(
        plan=plan, command=command, at_outage=at_outage, at_return=at_return,
        outage_attempts=outage_attempts, outage_503=len(fleet.provider.unavailable),
        t_all=(t_all - back_at) if t_all is not None else None,
        t_signed=(t_signed - back_at) if t_signed is not None else None,
        t_new=(t_new - back_at) if t_new is not None else None,
        refreshes=refreshes, polls=polls, devices=devices, other=other,
        back_after=back_after, refresh_sources=refresh_sources, lapsed=lapsed,
        refused_refreshes=refused,
        signed_in_anew=sum(1 for a in signed if a.codes),
        approved=fleet.people.approved if fleet.people else 0,
        wall=time.perf_counter() - began, steps=stepper.steps)
    if refused or recovery.signed_in_anew:
        recovery.problems.append("a signed-in agent lost its sign-in")
    if t_all is None or rejected:
        recovery.problems.append(f"not every agent recovered ({rejected} hold no token the "
                                 "provider accepts)")
    for s in (refreshes, polls):
        if s.total and s.window > plan.bin and s.ratio >= 2:
            recovery.problems.append(f"{s.name}: peak {s.peak} is not below twice the "
                                     f"mean {s.mean:.1f}")
    return recovery


async def _start_at(fleet: Fleet, agent: Agent, at: float) -> None:
    await fleet.clock.sleep(at - fleet.clock.monotonic())
    fleet.start(agent)


def _span(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(":")
    return float(lo), float(hi or lo)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Plan()
    parser.add_argument("--agents", type=int, default=defaults.agents)
    parser.add_argument("--signing-in", type=int, default=defaults.signing_in,
                        help="of them, how many are in the middle of a sign-in")
    parser.add_argument("--outage", type=float, default=defaults.outage, help="seconds")
    parser.add_argument("--outage-kind", choices=("refused", "503"),
                        default=defaults.outage_kind)
    parser.add_argument("--code-lifetime", type=float, default=defaults.code_lifetime,
                        help="authentik's access code validity, seconds")
    parser.add_argument("--approve-after", type=_span, default=defaults.approve_after,
                        metavar="LO:HI", help="seconds from a code shown to its approval")
    parser.add_argument("--refresh-retry-initial", type=float,
                        default=defaults.refresh_retry_initial,
                        help="refresh.retry_initial of every agent, seconds")
    parser.add_argument("--restart", action="store_true",
                        help="every agent restarts (from its files) the moment the provider "
                             "is back, as when a site's power comes back for both")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args()
    if not 0 <= args.signing_in <= args.agents:
        parser.error("--signing-in must be between 0 and --agents")
    plan = Plan(agents=args.agents, signing_in=args.signing_in, outage=args.outage,
                outage_kind=args.outage_kind, code_lifetime=args.code_lifetime,
                approve_after=args.approve_after,
                refresh_retry_initial=args.refresh_retry_initial, restart=args.restart,
                seed=args.seed)
    command = shlex.join([".venv/bin/python", "bench/fleet.py", *sys.argv[1:]])
    with quiet_logs():
        recovery = asyncio.run(simulate(plan, command=command))
    print(recovery.render())
    return 0 if not recovery.problems else 1


if __name__ == "__main__":
    sys.exit(main())
