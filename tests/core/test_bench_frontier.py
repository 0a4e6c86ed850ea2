"""The matched-KL frontier by hand: interpolation along a curve (never extrapolated), the area
under it up to K*, the choice of K* and of the default KL values, bootstrap intervals that hold the
point estimate and repeat exactly, and the markdown table."""

import math

import numpy as np
import pytest

from rlhfzoo.bench_bootstrap import Resampling
from rlhfzoo.bench_frontier import Point, common_kl, frontier, frontier_markdown, interpolate, kl_grid, mean_gold

NAN = float("nan")


def test_interpolation_by_hand():
    kl, gold = [0.0, 1.0, 3.0], [0.0, 1.0, 2.0]
    got = interpolate(kl, gold, [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, -0.1])
    assert got[:5].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert math.isnan(got[5]) and math.isnan(got[6])  # beyond the largest KL / below the smallest: not reached
    assert interpolate([3.0, 0.0, 1.0], [2.0, 0.0, 1.0], 2.0) == 1.5  # ordered by KL first
    batched = interpolate(np.array([kl, [0.0, 2.0, 4.0]]), np.array([gold, [1.0, 1.0, 0.0]]), [2.0, 3.5])  # one curve per replicate
    assert batched[0, 0] == 1.5 and math.isnan(batched[0, 1]) and batched[1].tolist() == [1.0, 0.25]
    per_replicate_at = interpolate(np.array([kl, kl]), np.array([gold, gold]), np.array([[0.5], [2.0]]))
    assert per_replicate_at.tolist() == [[0.5], [1.5]]
    one = interpolate([0.5], [1.0], [0.5, 0.4])  # a single point is its own curve
    assert one[0] == 1.0 and math.isnan(one[1])
    tied = interpolate([0.0, 1.0, 1.0, 2.0], [0.0, 1.0, 3.0, 3.0], [0.5, 1.5])  # two rows at the same KL: no division by zero
    assert np.isfinite(tied).all() and tied[0] == 0.5


def test_area_by_hand():
    kl, gold = [0.0, 1.0, 3.0], [0.0, 1.0, 2.0]
    assert mean_gold(kl, gold, 3.0) == pytest.approx((0.5 + 3.0) / 3)  # triangle 0.5 + trapezoid (1 + 2) / 2 * 2
    assert mean_gold(kl, gold, 2.0) == pytest.approx((0.5 + (1.0 + 1.5) / 2) / 2)  # cut at 2, where gold is 1.5
    assert mean_gold([0.0, 2.0], [1.0, 3.0], 1.0) == pytest.approx(1.5)  # the mean of a line from 1 to 2
    assert math.isnan(mean_gold(kl, gold, 4.0))  # the curve stops short of 4: not reached
    assert math.isnan(mean_gold(kl, gold, 0.0)) and math.isnan(mean_gold([1.0, 2.0], [1.0, 1.0], 1.5))  # no origin
    batched = mean_gold(np.array([kl, kl]), np.array([gold, gold]), np.array([3.0, 2.0]))
    assert batched.tolist() == pytest.approx([3.5 / 3, 0.875])


def test_common_kl_and_default_grid():
    assert common_kl([3.0, 2.0, 5.0]) == 2.0
    assert common_kl([3.0, 0.0, -0.01]) == 3.0  # algorithms that never leave the origin do not set K*
    assert math.isnan(common_kl([0.0])) and math.isnan(common_kl([]))
    assert kl_grid(2.0) == [0.5, 1.0, 1.5, 2.0] and kl_grid(NAN) == [] and kl_grid(0.0) == []


def test_frontier_by_hand():
    origin = Point("sft-baseline", 0.0, 0.0)
    curves = {
        "dpo": [Point("dpo beta=0.1", 3.0, 2.0), Point("dpo beta=1", 1.0, 1.0)],  # (0,0) (1,1) (3,2)
        "ppo": [Point("ppo", 2.0, 1.0)],  # one point: the segment (0,0) (2,1)
    }
    entries = frontier(curves, origin)
    assert [e["algorithm"] for e in entries] == ["dpo", "ppo"]  # by AUC
    dpo, ppo = entries
    assert [p["label"] for p in dpo["points"]] == ["sft-baseline", "dpo beta=1", "dpo beta=0.1"] and dpo["rows"] == 2
    assert dpo["max_kl"] == 3.0 and ppo["max_kl"] == 2.0
    assert [g["kl"] for g in dpo["gold_at_kl"]] == [0.5, 1.0, 1.5, 2.0]  # K* = 2
    assert [g["gold"] for g in dpo["gold_at_kl"]] == [0.5, 1.0, 1.25, 1.5]
    assert [g["gold"] for g in ppo["gold_at_kl"]] == [0.25, 0.5, 0.75, 1.0]
    assert dpo["auc"] == {"value": pytest.approx(0.875), "kl_max": 2.0} and ppo["auc"]["value"] == pytest.approx(0.5)
    explicit = {e["algorithm"]: e for e in frontier(curves, origin, at=[1.0, 2.5])}
    assert explicit["dpo"]["gold_at_kl"][1]["gold"] == 1.75 and math.isnan(explicit["ppo"]["gold_at_kl"][1]["gold"])
    table = frontier_markdown(frontier(curves, origin, at=[1.0, 2.5]), interval_covers="prompts")
    assert "| algorithm | rows | max KL | gold@KL=1 | gold@KL=2.5 | AUC |" in table
    assert "| dpo | 2 | 3 | 1.000 | 1.750 | 0.875 |" in table
    assert "| ppo | 1 | 2 | 0.500 | not reached | 0.500 |" in table
    assert "K* = 2 " in table and "over held-out prompts only (one seed" in table
    assert frontier_markdown([]).startswith("No gold-vs-KL frontier")


def bootstrapped(seeds=3, prompts=40):
    """Points with replicates from synthetic score matrices, as `bench_stats` builds them."""
    rng = np.random.default_rng(0)
    rows = {"sft-baseline": (0.0, 0.0), "a-low": (0.5, 1.0), "a-high": (0.9, 3.0), "b": (0.6, 2.0)}
    gold = {k: rng.normal(g, 0.5, (seeds, prompts)) for k, (g, _) in rows.items()}
    kl = {k: np.abs(rng.normal(x, 0.2, (seeds, prompts))) for k, (_, x) in rows.items()}
    resampling = Resampling.draw(prompts, {k: seeds for k in rows})

    def point(label, at_origin=False):
        g = resampling.mean(gold[label], label)
        k = np.zeros_like(g) if at_origin else resampling.mean(kl[label], label)
        return Point(label, 0.0 if at_origin else float(kl[label].mean()), float(gold[label].mean()), k, g)

    return {"a": [point("a-low"), point("a-high")], "b": [point("b")]}, point("sft-baseline", at_origin=True)


def test_bootstrap_intervals_hold_the_estimate_and_repeat():
    curves, origin = bootstrapped()
    entries = frontier(curves, origin)
    assert entries == frontier(*bootstrapped())  # the fixed seed: the same intervals every time
    for e in entries:
        assert e["auc"]["ci"][0] < e["auc"]["value"] < e["auc"]["ci"][1]
        for g in e["gold_at_kl"]:
            assert g["reached"] == 1.0 and g["ci"][0] < g["gold"] < g["ci"][1]  # the default values follow K*
        for p in e["points"]:
            assert p["gold_ci"][0] < p["gold"] < p["gold_ci"][1]
        assert e["points"][0]["kl_ci"] == [0.0, 0.0]  # the origin is at KL 0 by definition
    k_star = min(e["max_kl"] for e in entries)
    assert entries[0]["auc"]["kl_max"] == k_star == pytest.approx(2.0, abs=0.1)
    beyond = {e["algorithm"]: e for e in frontier(curves, origin, at=[1.0, 2.5])}
    assert math.isnan(beyond["b"]["gold_at_kl"][1]["gold"]) and all(math.isnan(c) for c in beyond["b"]["gold_at_kl"][1]["ci"])
    assert beyond["b"]["gold_at_kl"][1]["reached"] < 0.05  # b's one point, at KL ~2, rarely reaches 2.5
    assert beyond["a"]["gold_at_kl"][1]["reached"] == 1.0
