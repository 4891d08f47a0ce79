"""The planner (train.plan=auto): exact against brute force on synthetic profiles, within memory, today's cut at N=K."""

import itertools
import math
import random

import pytest

from distlocal.model.balance import BlockCost, allreduce_seconds, best_split, plan_pipeline


def _profile(seed: int, n: int) -> list[BlockCost]:
    rng = random.Random(seed)
    return [BlockCost(b, rng.uniform(0.1, 2.0), rng.uniform(0.0, 0.3), rng.uniform(100, 900),
                      rng.randrange(10**6, 10**8)) for b in range(n)]


def _compositions(n: int, parts: int):
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = [0, *cuts, n]
        yield [b - a for a, b in itertools.pairwise(bounds)]


def _brute_force(costs, devices, accumulate, k, memory_mb, bytes_per_s) -> float:
    """The slowest stage of the best plan, by trying every cut and every replica count."""
    best = math.inf
    for s in ([k] if k else range(1, min(len(costs), devices) + 1)):
        for sizes in _compositions(len(costs), s):
            starts = [sum(sizes[:i]) for i in range(s)]
            blocks = [costs[b:b + size] for b, size in zip(starts, sizes, strict=True)]
            if any(sum(c.memory_mb for c in stage) > memory_mb for stage in blocks):
                continue
            for replicas in itertools.product(range(1, devices - s + 2), repeat=s):
                if sum(replicas) > devices:
                    continue
                slowest = max(
                    sum(c.seconds for c in stage) + stage[-1].classifier_seconds if r == 1 else
                    (math.ceil(accumulate / r) * (sum(c.seconds for c in stage) + stage[-1].classifier_seconds)
                     + allreduce_seconds(sum(c.param_bytes for c in stage), r, bytes_per_s)) / accumulate
                    for stage, r in zip(blocks, replicas, strict=True))
                best = min(best, slowest)
    return best


@pytest.mark.parametrize(("seed", "devices", "accumulate", "k", "memory_mb"), [
    (0, 4, 8, 2, math.inf), (1, 6, 8, 3, math.inf), (2, 5, 3, None, math.inf), (3, 6, 8, 2, 2500.0),
    (4, 7, 4, None, 1800.0)])
def test_plan_is_the_brute_force_optimum_within_memory(seed, devices, accumulate, k, memory_mb):
    """On random profiles of 6 blocks the plan's slowest stage is brute force's; no stage exceeds the memory."""
    costs = _profile(seed, 6)
    plan = plan_pipeline(costs, devices, accumulate, k, memory_mb=memory_mb, bytes_per_s=1e9)
    expected = _brute_force(costs, devices, accumulate, k, memory_mb, 1e9)
    assert 1 / plan.slides_per_s == pytest.approx(expected, rel=1e-12)
    assert sum(plan.replicas) <= devices
    assert sum(plan.blocks_per_stage) == len(costs)
    starts = [sum(plan.blocks_per_stage[:i]) for i in range(len(plan.blocks_per_stage))]
    for b, size in zip(starts, plan.blocks_per_stage, strict=True):
        assert sum(c.memory_mb for c in costs[b:b + size]) <= memory_mb, f"stage from block {b} over the budget"
    assert max(plan.busy) == 1.0


def test_no_plan_fits_the_memory_says_so():
    """A budget below the largest block's peak has no plan: the error names the budget."""
    with pytest.raises(ValueError, match="fits 50 MiB per device"):
        plan_pipeline(_profile(0, 6), 4, 8, 2, memory_mb=50)


@pytest.mark.parametrize("seed", range(4))
def test_as_many_devices_as_stages_gives_todays_cut(seed):
    """N = K: one replica per stage and exactly best_split's cut and stage costs."""
    costs = _profile(seed, 8)
    sizes, stage_costs = best_split(costs, 4)
    plan = plan_pipeline(costs, 4, 8, 4)
    assert plan.blocks_per_stage == sizes
    assert plan.replicas == [1, 1, 1, 1]
    assert plan.stage_s == stage_costs


def test_spare_devices_go_to_the_slow_stage_and_a_fixed_cut_is_kept():
    """With the cut fixed, a stage twice as slow as the other gets the spare device (ceil(8/2)/8 of its time)."""
    costs = [BlockCost(0, 2.0, 0.0, 0.0), BlockCost(1, 1.0, 0.0, 0.0)]
    plan = plan_pipeline(costs, 3, 8, blocks_per_stage=[1, 1])
    assert plan.replicas == [2, 1]
    assert plan.stage_s == [1.0, 1.0]
    assert plan.slides_per_s == 1.0
    # A window of 3 split over 2 replicas is a barrier at ceil(3/2) = 2 slides: 2/3 of the time, not 1/2.
    assert plan_pipeline(costs, 3, 3, blocks_per_stage=[1, 1]).stage_s[0] == pytest.approx(4 / 3)
