"""Cost simulator: deterministic, the original pattern redoes cut-off work, bounds hold, pools cut latency."""

import json

import pytest

from batchworker.costs import policies
from batchworker.costs.simulator import CloudModel, physical_limit_seconds, run_policy, simulate_all
from batchworker.costs.traces import Trace, TraceJob, build_trace
from batchworker.decisions import choose_grace_seconds, idle_grace_seconds

MODEL = CloudModel()
FIXED_BOOT = CloudModel(boot_seconds_range=(90.0, 90.0))
ALL_POLICIES = (
    policies.always_on_9_17(),
    policies.original(),
    policies.batchworker(),
    policies.batchworker_fixed_grace(),
    policies.batchworker(idle_grace_seconds=0, pool_size=4),
)


def trace_of(*jobs: tuple[float, float]) -> Trace:
    return Trace("hand", 1, "hand-made", tuple(TraceJob(arrival, duration) for arrival, duration in jobs))


@pytest.fixture(scope="module")
def traces():
    return {name: build_trace(name, 3, seed=7) for name in ("seed", "bursty", "poisson")}


def test_same_seed_same_result_and_json_able():
    first = simulate_all(days=2, seed=3)
    assert first == simulate_all(days=2, seed=3)
    assert first != simulate_all(days=2, seed=4)
    assert json.loads(json.dumps(first)) == first
    assert set(first["headline"]) >= {"sim_seed_billed_over_limit", "sim_bursty_billed_over_busy"}


def test_original_pattern_redoes_a_job_cut_off_by_another_jobs_output():
    # GIVEN a long job and a short one that lands while the first runs
    trace = trace_of((0, 600), (10, 30))
    # WHEN the original pattern runs them: the short one's output stops the instance under the long one
    result = run_policy(trace, policies.original(), FIXED_BOOT, seed=0)
    # THEN the long job was cut off once, its partial work wasted, and a second start ran it from scratch
    assert result.cut_offs == 1
    assert result.starts == 2
    assert result.wasted_seconds == pytest.approx(30)  # the two shared the GPU for 60 s before the cut
    assert result.billed_seconds == (90 + 60) + (90 + 600)
    # AND this system runs both on one start
    ours = run_policy(trace, policies.batchworker(idle_grace_seconds=0), FIXED_BOOT, seed=0)
    assert (ours.starts, ours.cut_offs, ours.billed_seconds) == (1, 0, 90 + 630)


def test_physical_limit_shares_a_boot_only_when_the_gap_is_shorter_than_a_boot():
    assert physical_limit_seconds(trace_of((0, 100), (250, 100)), FIXED_BOOT, 0) == 90 + 100 + 60 + 100
    assert physical_limit_seconds(trace_of((0, 100), (400, 100)), FIXED_BOOT, 0) == 2 * (90 + 100)
    assert physical_limit_seconds(trace_of((0, 1), (200, 1)), FIXED_BOOT, 0) == 2 * 91
    assert physical_limit_seconds(trace_of((0, 1)), CloudModel(boot_seconds_range=(5, 5)), 0) == 60  # minimum


@pytest.mark.parametrize("name", ["seed", "bursty", "poisson"])
def test_this_systems_policy_bills_at_least_busy(traces, name):
    result = run_policy(traces[name], policies.batchworker(), MODEL, seed=7)
    assert result.billed_seconds >= result.busy_seconds
    assert result.cut_offs == 0


@pytest.mark.parametrize("name", ["seed", "bursty"])
def test_physical_limit_is_below_every_policy(traces, name):
    limit = physical_limit_seconds(traces[name], MODEL, 7)
    for policy in ALL_POLICIES:
        assert run_policy(traces[name], policy, MODEL, 7, limit).billed_seconds >= limit, policy.name


def test_only_holding_night_work_until_morning_beats_the_limit_on_the_poisson_trace(traces):
    # Around the clock, the 9-to-5 instance bills less than the limit only by holding night jobs until 09:00.
    limit = physical_limit_seconds(traces["poisson"], MODEL, 7)
    for policy in ALL_POLICIES:
        result = run_policy(traces["poisson"], policy, MODEL, 7, limit)
        if policy.on_hours:
            assert result.billed_seconds >= limit or result.p95_latency_seconds > 8 * 3600
        else:
            assert result.billed_seconds >= limit, policy.name


def test_this_systems_policy_can_reach_the_limit_on_isolated_jobs(traces):
    result = run_policy(traces["seed"], policies.batchworker(idle_grace_seconds=0), MODEL, seed=7)
    assert result.billed_over_limit == pytest.approx(1.0, abs=0.01)


def test_pool_of_four_has_lower_p95_latency_on_the_bursty_trace(traces):
    one = run_policy(traces["bursty"], policies.batchworker(pool_size=1), MODEL, seed=7)
    four = run_policy(traces["bursty"], policies.batchworker(pool_size=4), MODEL, seed=7)
    assert four.p95_latency_seconds < one.p95_latency_seconds
    assert four.starts > one.starts  # paid for with more boots


def test_always_on_bills_eight_hours_a_day_and_makes_night_work_wait():
    trace = trace_of((8 * 3600, 60), (12 * 3600, 60))  # 08:00 and 12:00 of day 0
    result = run_policy(trace, policies.always_on_9_17(), MODEL, seed=0)
    assert result.billed_seconds == 8 * 3600
    assert result.max_latency_seconds == pytest.approx(3600 + 60)


@pytest.mark.parametrize(
    ("gaps", "expected"),
    [
        ([], 120.0),  # no history: the configured grace
        ([3600.0] * 5, 0.0),  # work never comes back soon: stop at once
        ([30.0] * 5, 30.0),  # work always comes back within 30 s: wait for it
        ([30.0, 3600.0, 3600.0, 3600.0], 0.0),  # rarely worth the wait
    ],
)
def test_adaptive_grace(gaps, expected):
    assert choose_grace_seconds(gaps, cap_seconds=120.0, reboot_seconds=90.0) == expected
    assert idle_grace_seconds("adaptive", 120.0, gaps, 90.0) == expected
    assert idle_grace_seconds("fixed", 120.0, gaps, 90.0) == 120.0


def test_the_shipped_policy_learns_to_stop_isolated_jobs_at_once(traces):
    # GIVEN the seed's isolated jobs, hours apart WHEN the shipped (adaptive) policy runs them
    adaptive = run_policy(traces["seed"], policies.batchworker(), MODEL, seed=7)
    fixed = run_policy(traces["seed"], policies.batchworker_fixed_grace(), MODEL, seed=7)
    # THEN after the first gap it stops at once, billing less than the fixed 120 s grace, near the limit
    assert adaptive.billed_seconds < fixed.billed_seconds
    assert adaptive.billed_over_limit <= 1.05
