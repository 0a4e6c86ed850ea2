"""The bench's statistics on synthetic scores (no training): mean_ci's t quantile, the hierarchical
bootstrap on known distributions, IQM and probability of improvement by hand and against rliable,
pairwise verdicts, and `aggregate`/`analyse` on run directories written here."""

import json
import math
import time

import numpy as np
import pytest

from rlhfzoo.bench_bootstrap import Resampling, interval, iqm, probability_of_improvement
from rlhfzoo.bench_plan import BASELINE, BenchError, RunSpec
from rlhfzoo.bench_stats import aggregate, analyse, mean_ci, pairwise, pairwise_matrix

OLD_ROW_KEYS = {"algorithm", "name", "kind", "seeds", "seeds_ok", "status", "gold", "proxy", "kl", "elo", "budget", "train_seconds", "peak_rss_mb"}
OLD_SCORE_KEYS = {"mean", "seed_se", "ci95", "per_seed", "prompt_se"}


def write_runs(root, rows, prompts, failed=()):
    """Run directories for `rows`: label -> (registered name, {"gold"/"kl"/...: (seeds, prompts) matrix});
    a label in `failed` gets one more, failed, seed. Returns (specs, results) as the bench has them."""
    texts = [f"prompt {i}" for i in range(prompts)]
    specs, results = [], []
    for label, (name, scores) in rows.items():
        seeds = len(next(iter(scores.values()))) if scores else 1
        for seed in range(seeds):
            d = root / label.replace(" ", "_").replace("=", "-") / f"seed-{seed}"
            d.mkdir(parents=True)
            record = {"prompts": texts, "responses": ["r"] * prompts, **{k: m[seed].tolist() for k, m in scores.items()}}
            (d / "responses.json").write_text(json.dumps(record if scores else {"prompts": [], "responses": []}))
            kind = "policy" if label == BASELINE else "objective"
            specs.append(RunSpec(label, name, kind, seed, {}, str(d), prompts))
            results.append({"status": "ok", "train_seconds": 1.0 + seed, "wall_seconds": 2.0, "peak_rss_mb": 100.0,
                            "budget": {"optimizer_steps": 10}, **({"pair_accuracy": [0.6 + 0.1 * seed, 12]} if not scores else {})})
        if label in failed:
            specs.append(RunSpec(label, name, "objective", seeds, {}, str(root / "failed"), prompts))
            results.append({"status": "failed", "error": "boom"})
    return specs, results


# ---------------------------------------------------------------------------- mean_ci


def test_mean_ci_uses_the_t_quantile():
    # t(0.975, n - 1) from a printed table, n = 2..10
    table = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
    for n, t in table.items():
        values = [float(i) for i in range(n)]  # 0..n-1: sd = sqrt(n (n + 1) / 12)
        m, se, ci = mean_ci(values)
        assert m == pytest.approx((n - 1) / 2)
        assert se == pytest.approx(math.sqrt(n * (n + 1) / 12) / math.sqrt(n))
        assert ci / se == pytest.approx(t, abs=1e-3)
    m, se, ci = mean_ci([1.0, 2.0, 4.0])  # sd = sqrt(7/3)
    assert ci == pytest.approx(4.303 * math.sqrt(7 / 3) / math.sqrt(3), rel=1e-3)
    assert mean_ci([1.0])[0] == 1.0 and math.isnan(mean_ci([1.0])[1]) and math.isnan(mean_ci([1.0])[2])
    assert all(math.isnan(x) for x in mean_ci([]))


# ---------------------------------------------------------------------------- the bootstrap


def test_bootstrap_interval_of_a_normal_mean():
    rng = np.random.default_rng(0)
    scores = rng.normal(0.5, 1.0, size=(1, 400))  # one seed, 400 prompts
    resampling = Resampling.draw(400, {"x": 1})
    low, high = interval(resampling.mean(scores, "x"))
    assert low < 0.5 < high and low < scores.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * 1.0 / math.sqrt(400), rel=0.08)  # 0.196 (sigma = 1)
    assert high - low == pytest.approx(2 * 1.96 * scores.std() / math.sqrt(400), rel=0.05)  # the sample's own sigma
    # the same data with seeds: resampling them too widens the interval
    seeds = scores.reshape(4, 100) + rng.normal(0, 0.3, size=(4, 1))
    both = Resampling.draw(100, {"x": 4})
    prompts_only = both.prompt_weights @ seeds.mean(axis=0) / 100  # seeds held fixed
    assert np.ptp(interval(both.mean(seeds, "x"))) > np.ptp(interval(prompts_only))


def test_bootstrap_coverage_over_repeated_experiments():
    """100 experiments of 50 prompts (one seed; then 3 seeds with seed and prompt effects, prompts
    dominating): the 95 % interval holds the true mean 0.5 in 88-100 of them (binomial sd ~2)."""
    rng = np.random.default_rng(1)
    for seeds, seed_sd, prompt_sd in ((1, 0.0, 0.0), (3, 0.2, 1.0)):
        hits = 0
        for i in range(100):
            noise = rng.normal(0, 1.0 if seeds == 1 else 0.5, size=(seeds, 50))
            scores = 0.5 + seed_sd * rng.normal(size=(seeds, 1)) + prompt_sd * rng.normal(size=(1, 50)) + noise
            low, high = interval(Resampling.draw(50, {"x": seeds}, replicates=500, seed=i).mean(scores, "x"))
            hits += low <= 0.5 <= high
        assert 88 <= hits <= 100, (seeds, hits)


def test_resampling_is_deterministic_and_shares_prompts_across_rows():
    a = Resampling.draw(30, {"a": 3, "b": 5})
    b = Resampling.draw(30, {"b": 5, "a": 3, "c": 2})  # another row set: a and b draw the same
    assert np.array_equal(a.prompt_weights, b.prompt_weights) and np.array_equal(a.seed_indices["a"], b.seed_indices["a"])
    assert a.prompt_weights.shape == (2000, 30) and (a.prompt_weights.sum(axis=1) == 30).all()
    assert a.seed_indices["b"].shape == (2000, 5) and a.seed_indices["b"].max() == 4
    assert not np.array_equal(a.seed_indices["a"], a.seed_indices["b"][:, :3])  # seeds drawn per row
    assert not np.array_equal(a.prompt_weights, Resampling.draw(30, {"a": 3}, seed=1).prompt_weights)


# ---------------------------------------------------------------------------- IQM and probability of improvement


def test_probability_of_improvement_by_hand():
    assert probability_of_improvement([1, 3], [2, 2]) == 0.5  # (1,2) 0, (1,2) 0, (3,2) 1, (3,2) 1
    assert probability_of_improvement([1, 2], [2, 3]) == 0.125  # only the tie (2,2): half of 1 of 4
    assert probability_of_improvement([3, 4], [1, 2]) == 1.0
    assert probability_of_improvement([1, 2, 3], [1, 2, 3]) == 0.5
    batched = probability_of_improvement(np.array([[1, 3], [3, 4]]), np.array([[2, 2], [1, 2]]))  # over a leading axis
    assert batched.tolist() == [0.5, 1.0]
    assert iqm(np.array([1.0, 2.0, 3.0, 100.0])) == 2.5  # the middle two of four


def test_point_estimates_equal_rliable():
    metrics = pytest.importorskip("rliable.metrics")
    rng = np.random.default_rng(2)
    gold = {"a": rng.normal(0.3, 1, (5, 40)), "b": rng.normal(0.0, 1, (4, 40)), "c": np.round(rng.normal(0, 1, (7, 40)), 0)}
    gold["d"] = np.repeat(gold["c"][:3], 1, axis=0)  # ties with c
    resampling = Resampling.draw(40, {k: len(v) for k, v in gold.items()})
    pairs = pairwise(gold, {k: resampling.per_seed(v, k) for k, v in gold.items()})
    by_pair = {(p["a"], p["b"]): p for p in pairs}
    assert len(pairs) == 12
    for (a, b), p in by_pair.items():
        x, y = gold[a].mean(axis=1)[:, None], gold[b].mean(axis=1)[:, None]  # (seeds, 1 task)
        assert p["probability_of_improvement"]["mean"] == pytest.approx(metrics.probability_of_improvement(x, y), abs=1e-12)
    for v in gold.values():
        per_seed = v.mean(axis=1)
        assert iqm(per_seed) == pytest.approx(metrics.aggregate_iqm(per_seed[:, None]), abs=1e-12)


def test_pairwise_verdicts_and_symmetry():
    rng = np.random.default_rng(3)
    base = rng.normal(0, 1, (4, 60))
    gold = {"a": base, "same": base.copy(), "shifted": base + 1.0}
    resampling = Resampling.draw(60, {k: 4 for k in gold})
    pairs = {(p["a"], p["b"]): p for p in pairwise(gold, {k: resampling.per_seed(v, k) for k, v in gold.items()})}
    same = pairs[("same", "a")]
    assert same["gold_difference"]["mean"] == 0.0 and same["probability_of_improvement"]["mean"] == 0.5
    assert same["verdict"] == "tie" and same["gold_difference"]["ci"][0] < 0 < same["gold_difference"]["ci"][1]
    assert same["interval"] == "seeds and prompts"
    up, down = pairs[("shifted", "a")], pairs[("a", "shifted")]
    assert up["verdict"] == "better" and down["verdict"] == "worse"
    assert up["gold_difference"]["mean"] == pytest.approx(1.0) and up["gold_difference"]["ci"][0] > 0.5
    assert up["probability_of_improvement"]["mean"] == 1.0 and up["probability_of_improvement"]["ci"][0] > 0.9
    assert down["probability_of_improvement"]["ci"] == pytest.approx([1 - c for c in reversed(up["probability_of_improvement"]["ci"])])
    assert down["gold_difference"]["ci"] == pytest.approx([-c for c in reversed(up["gold_difference"]["ci"])])
    matrix = pairwise_matrix(list(pairs.values()), ["a", "shifted"])
    assert math.isnan(matrix[0][0]) and matrix[0][1] == 0.0 and matrix[1][0] == 1.0


def test_differences_are_paired_over_prompts():
    """Prompts of very different difficulty (sd 2) and a constant gain of 0.2: scored on the same
    prompt resample, the gain is exactly 0.2 in every replicate; unpaired it would drown (+-0.7)."""
    hard = np.random.default_rng(7).normal(0, 2, (1, 60))
    gold = {"a": hard, "b": hard + 0.2}
    resampling = Resampling.draw(60, {"a": 1, "b": 1})
    pairs = {(p["a"], p["b"]): p for p in pairwise(gold, {k: resampling.per_seed(v, k) for k, v in gold.items()})}
    assert pairs[("b", "a")]["gold_difference"]["ci"] == pytest.approx([0.2, 0.2])
    assert pairs[("b", "a")]["verdict"] == "better" and pairs[("b", "a")]["interval"] == "prompts"
    assert np.ptp(interval(resampling.mean(hard, "a"))) > 0.7  # each row alone: wide


def test_bootstrap_of_a_large_bench_is_fast():
    rng = np.random.default_rng(4)
    gold = {f"row{i}": rng.normal(0.01 * i, 1, (5, 200)) for i in range(20)}
    start = time.perf_counter()
    resampling = Resampling.draw(200, {k: 5 for k in gold})
    replicates = {k: resampling.per_seed(v, k) for k, v in gold.items()}
    pairs = pairwise(gold, replicates)
    elapsed = time.perf_counter() - start
    assert len(pairs) == 380
    assert elapsed < 3.0, elapsed  # ~0.3 s on two shared cores; a Python loop over replicates would take minutes


# ---------------------------------------------------------------------------- aggregate / analyse on run directories


def test_aggregate_keeps_the_old_keys_and_adds_the_bootstrap(tmp_path):
    rng = np.random.default_rng(5)
    seeds, prompts = 3, 30

    def scores(gold, kl):
        return {"gold": rng.normal(gold, 0.5, (seeds, prompts)), "proxy": rng.normal(gold, 0.5, (seeds, prompts)),
                "kl": np.abs(rng.normal(kl, 0.1, (seeds, prompts)))}

    rows = {BASELINE: ("hf", scores(0.0, 0.0)), "dpo beta=0.3": ("dpo", scores(0.5, 1.0)), "dpo beta=0.1": ("dpo", scores(0.8, 3.0)),
            "ppo-clip": ("ppo-clip", scores(0.6, 2.0)), "bradley-terry": ("bradley-terry", {})}
    specs, results = write_runs(tmp_path, rows, prompts, failed=("ppo-clip",))
    out = analyse(specs, results)
    assert json.dumps(aggregate(specs, results)) == json.dumps(out["rows"])
    by_label = {r["algorithm"]: r for r in out["rows"]}
    assert [r["algorithm"] for r in out["rows"]][:2] == ["dpo beta=0.1", "ppo-clip"]  # by mean gold
    for label in (BASELINE, "dpo beta=0.3", "dpo beta=0.1", "ppo-clip"):
        row = by_label[label]
        assert OLD_ROW_KEYS <= set(row), OLD_ROW_KEYS - set(row)
        gold = rows[label][1]["gold"]
        assert row["gold"]["mean"] == pytest.approx(gold.mean()) and row["gold"]["per_seed"] == pytest.approx(gold.mean(axis=1).tolist())
        for key in ("gold", "proxy", "kl"):
            assert OLD_SCORE_KEYS | {"ci"} <= set(row[key])
            low, high = row[key]["ci"]
            assert low < row[key]["mean"] < high
        assert row["gold"]["iqm"] == pytest.approx(gold.mean(axis=1).mean())  # 3 seeds: nothing trimmed
        assert row["gold"]["iqm_ci"][0] <= row["gold"]["iqm"] <= row["gold"]["iqm_ci"][1]
        assert row["interval"] == "seeds and prompts"
    assert by_label["ppo-clip"]["status"] == "partial" and by_label["ppo-clip"]["errors"] == ["boom"]
    assert by_label["dpo beta=0.1"]["win_rate_vs_sft"] > 0.5 and by_label["dpo beta=0.1"]["elo"] > by_label[BASELINE]["elo"]
    scorer = by_label["bradley-terry"]  # scored, not sampled: pair accuracy only, no bootstrap
    assert "gold" not in scorer and "interval" not in scorer and scorer["pair_accuracy"]["mean"] == pytest.approx(0.6)
    assert {(p["a"], p["b"]) for p in out["pairwise"]} == {(a, b) for a in rows for b in rows if a != b and "bradley-terry" not in (a, b)}
    assert {"win_rate", "verdict"} <= set(next(p for p in out["pairwise"] if p["a"] == "dpo beta=0.1" and p["b"] == BASELINE))
    assert out["bootstrap"]["replicates"] == 2000 and out["bootstrap"]["prompts"] == prompts and out["bootstrap"]["interval"] == "seeds and prompts"
    frontier = {e["algorithm"]: e for e in out["frontier"]}
    assert set(frontier) == {"dpo", "ppo-clip"} and [p["label"] for p in frontier["dpo"]["points"]] == [BASELINE, "dpo beta=0.3", "dpo beta=0.1"]
    assert frontier["dpo"]["auc"]["kl_max"] == pytest.approx(rows["ppo-clip"][1]["kl"].mean())  # K*: ppo's one point is the smaller reach
    assert json.dumps(analyse(specs, results)) == json.dumps(out)  # deterministic, and JSON-writable


def test_one_seed_intervals_cover_prompts_only(tmp_path):
    rng = np.random.default_rng(6)
    rows = {BASELINE: ("hf", {"gold": rng.normal(0, 1, (1, 20)), "kl": np.zeros((1, 20))}),
            "dpo": ("dpo", {"gold": rng.normal(0, 1, (1, 20)), "kl": np.ones((1, 20))})}
    out = analyse(*write_runs(tmp_path, rows, 20))
    assert {r["interval"] for r in out["rows"]} == {"prompts"}
    assert {p["interval"] for p in out["pairwise"]} == {"prompts"}
    assert all(math.isnan(r["gold"]["ci95"]) for r in out["rows"])  # no seed-level t interval
    assert all(r["gold"]["ci"][0] < r["gold"]["mean"] < r["gold"]["ci"][1] for r in out["rows"])


def test_runs_scored_on_different_prompts_are_refused(tmp_path):
    rows = {BASELINE: ("hf", {"gold": np.zeros((1, 4))}), "dpo": ("dpo", {"gold": np.ones((1, 4))})}
    specs, results = write_runs(tmp_path, rows, 4)
    f = tmp_path / "dpo" / "seed-0" / "responses.json"
    record = json.loads(f.read_text())
    f.write_text(json.dumps({**record, "prompts": ["other"] * 4}))
    with pytest.raises(BenchError, match="different held-out prompts.*--force"):
        analyse(specs, results)
