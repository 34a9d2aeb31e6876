"""The fleet benchmarks in small, with their own code (`bench/fleet.py`,
`bench/fleet_nat.py`): real drivers and sessions, real loopback HTTP to the test
provider, one injected clock. What is checked is what must hold at any size; the
figures (rates, peaks, times) come from the benchmarks."""

from __future__ import annotations

from bench.fleet import Plan
from bench.fleet import simulate as recover
from bench.fleet_nat import NatPlan
from bench.fleet_nat import simulate as behind_one_address


async def test_a_fleet_back_from_an_outage_recovers_without_losing_a_sign_in() -> None:
    recovery = await recover(Plan(agents=40, signing_in=4, outage=1800.0))
    report = recovery.render()
    # Whatever the pacing, the provider never refused a refresh token and no agent that
    # was signed in had to show a code: an outage costs time, never a sign-in.
    assert recovery.refused_refreshes == 0, report
    assert recovery.signed_in_anew == 0, report
    # The outage did what it is for: refreshes fell due and failed, codes died.
    assert recovery.outage_attempts["refresh"] > 0, report
    assert recovery.at_return["expired token"] > 0, report
    assert recovery.back_after, report
    # And everyone came back by themselves: the new sign-ins too, once approved.
    assert recovery.t_all is not None, report
    assert recovery.approved >= 4, report


async def test_devices_behind_one_address_spend_one_code_each_within_the_throttle() -> None:
    plan = NatPlan(agents=15, device_requests_per_hour=6)
    result = await behind_one_address(plan)
    report = result.render()
    assert len(result.signed_in) == plan.agents, report
    # Codes live long enough for the person: none is spent for nothing, though most
    # agents met the provider's throttle before theirs came.
    assert result.codes_spent == plan.agents, report
    assert result.throttled_agents == plan.agents - plan.device_requests_per_hour, report
    # The first six came at once; the rest only as the provider's hour let them.
    assert sorted(result.first_code)[plan.device_requests_per_hour - 1] == 0.0, report
    assert sorted(result.first_code)[plan.device_requests_per_hour] >= 3600.0, report
