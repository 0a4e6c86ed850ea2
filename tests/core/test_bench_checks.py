"""`rlhfzoo bench --checks`: best-of-n's exact KL on hand-computed reward levels, Gao et al.'s shape
on synthetic rows, the markdown and `run_checks`' records; (slow) best-of-n's KL on the sentiment SFT
policy and DPO against IPO on deterministic preferences, each on the real tiny setup."""

import json
import math
import random

import pytest

from rlhfzoo import bench_checks, stages
from rlhfzoo.bench_checks import (
    best_of_n_kl,
    best_of_n_kl_bound,
    checks_markdown,
    curve_shape,
    dpo_vs_ipo_deterministic,
    empirical_best_of_n_kl,
    gao_overoptimisation,
    ptx_alignment_tax,
    reward_collapse,
    run_checks,
)
from rlhfzoo.errors import UserError
from rlhfzoo.registry import registry

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------ best-of-n's KL, by hand


def test_two_levels_by_hand():
    # p = (1/2, 1/2), n = 2: q(low) = (1/2)^2 = 1/4, q(high) = 1 - 1/4 = 3/4.
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert empirical_best_of_n_kl([3.0, 7.0, 3.0, 7.0], 2) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.130812, abs=1e-6) and expected < best_of_n_kl_bound(2)
    # p = (3/4, 1/4), n = 4: q(low) = (3/4)^4 = 81/256, q(high) = 175/256.
    expected = 81 / 256 * math.log((81 / 256) / 0.75) + 175 / 256 * math.log((175 / 256) / 0.25)
    assert empirical_best_of_n_kl([0.1, 0.1, 0.1, 0.9], 4) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.414556, abs=1e-6) and expected < best_of_n_kl_bound(4)


def test_one_level_is_no_change_and_only_ranks_count():
    assert empirical_best_of_n_kl([0.5] * 10, 16) == 0.0
    rng = random.Random(0)
    rewards = [rng.choice([-1.0, 0.0, 0.3, 2.0]) for _ in range(50)] + [rng.gauss(0, 1) for _ in range(50)]
    rng.shuffle(rewards)
    kl = empirical_best_of_n_kl(rewards, 8)
    assert empirical_best_of_n_kl([math.exp(r) for r in rewards], 8) == pytest.approx(kl, abs=1e-12)  # monotone map
    assert empirical_best_of_n_kl(sorted(rewards), 8) == pytest.approx(kl, abs=1e-12)  # order of the samples
    with pytest.raises(ValueError, match="no samples"):
        empirical_best_of_n_kl([], 2)


@pytest.mark.parametrize("n", [2, 4, 16, 64])
def test_distinct_samples_give_the_formula_and_ties_less(n):
    assert best_of_n_kl_bound(n) == pytest.approx(math.log(n) - (n - 1) / n)
    rng = random.Random(n)
    distinct = [rng.random() for _ in range(5000)]
    kl = empirical_best_of_n_kl(distinct, n)
    assert kl <= best_of_n_kl_bound(n) and kl == pytest.approx(best_of_n_kl_bound(n), abs=2e-4)  # the plug-in's bias
    # Half of the mass on the best response: below the formula (Beirami et al.). n = 2 by hand: the top
    # level has q = 3/4, p = 1/2; below it best-of-2 has density 2v against the base's 1 on v = F in
    # [0, 1/2], contributing the integral of 2v log(2v) dv over [0, 1/2] = -1/8.
    tied = [2.0] * 5000 + distinct
    assert empirical_best_of_n_kl(tied, n) < best_of_n_kl_bound(n) - 0.01
    if n == 2:
        assert empirical_best_of_n_kl(tied, 2) == pytest.approx(0.75 * math.log(1.5) - 1 / 8, abs=1e-3)
    if n >= 16:  # best-of-n almost always picks the tied best (q ~ 1, p = 1/2): KL -> log 2, whatever n
        assert empirical_best_of_n_kl(tied, n) == pytest.approx(math.log(2), abs=1e-3)
        # The same mass tied at the bottom barely matters: best-of-n almost never picks it.
        assert empirical_best_of_n_kl([-1.0] * 5000 + distinct, n) == pytest.approx(kl, abs=1e-3)


# ------------------------------------------------------------------------------------ Gao et al.'s shape


def row(label, name, kl, gold, proxy=None):
    out = {"algorithm": label, "name": name, "kl": {"mean": kl}, "gold": {"mean": gold}}
    if proxy is not None:
        out["proxy"] = {"mean": proxy}
    return out


def test_curve_shape_by_hand():
    concave = curve_shape([{"kl": d * d, "gold": g, "proxy": p} for d, g, p in [(0, 0.0, 0.0), (1, 1.0, 1.0), (2, 0.0, 2.0), (3, -3.0, 2.5)]])
    assert concave["sqrt_kl"] == [0, 1, 2, 3] and concave["gold_slopes"] == pytest.approx([1.0, -1.0, -3.0])
    assert concave["gold_concave"] and concave["proxy_rising"] and concave["holds"]
    kinked = curve_shape([{"kl": d * d, "gold": g, "proxy": None} for d, g in [(0, 0.0), (1, 1.0), (2, 0.5), (3, 2.0)]])
    assert kinked["gold_slopes"] == pytest.approx([1.0, -0.5, 1.5]) and not kinked["gold_concave"]
    assert kinked["proxy_rising"] is None and not kinked["holds"]
    # Two rows at the same KL are averaged into one point.
    merged = curve_shape([{"kl": 1.0, "gold": 0.2, "proxy": 1.0}, {"kl": 1.0, "gold": 0.4, "proxy": 3.0}, {"kl": 4.0, "gold": 0.5, "proxy": 2.5}])
    assert merged["gold"] == pytest.approx([0.3, 0.5]) and merged["proxy"] == pytest.approx([2.0, 2.5])


def test_gao_on_synthetic_bench_rows():
    rows = [row("sft-baseline", "hf", 0.0, 0.0, 0.0)]
    rows += [row(f"best-of-n n={n}", "best-of-n", d * d, d * (1 - 0.3 * d), 2 * d) for n, d in [(4, 1.0), (16, 2.0), (64, 3.0)]]  # d(a - b d)
    rows += [row(f"ppo-clip target={t}", "ppo-clip", d * d, g, p) for t, d, g, p in [(1, 1.0, 0.1, 1.0), (3, 2.0, 0.15, 1.5), (9, 3.0, 0.6, 1.4)]]
    rows += [row(f"dpo beta={b}", "dpo", kl, g) for b, kl, g in [(0.1, 0.5, 0.1), (0.3, 0.3, 0.0), (1.0, 0.2, 0.1)]]  # no proxy
    rows += [row(f"kto beta={b}", "kto", kl, 0.1, 1.0) for b, kl in [(0.1, 0.5), (1.0, 0.2)]]  # two points: not a curve
    check = gao_overoptimisation({"rows": rows})
    shapes = check["measured"]["algorithms"]
    assert set(shapes) == {"best-of-n", "ppo-clip", "dpo"} and check["measured"]["origin"] == "sft-baseline"
    bon = shapes["best-of-n"]
    assert bon["gold_slopes"] == pytest.approx([0.7, 0.1, -0.5])  # from the origin (0, 0): gold 0.7, 0.8, 0.3
    assert bon["holds"] and bon["gold_peaked"] and bon["rows"] == ["best-of-n n=4", "best-of-n n=16", "best-of-n n=64"]
    assert shapes["ppo-clip"]["gold_slopes"] == pytest.approx([0.1, 0.05, 0.45]) and not shapes["ppo-clip"]["gold_concave"]
    assert shapes["ppo-clip"]["proxy_rising"] is False and not shapes["ppo-clip"]["gold_peaked"]
    assert not shapes["dpo"]["optimises_proxy"] and shapes["dpo"]["proxy"] == [None] * 4
    assert check["reproduced"] is False
    assert "1 of 2 swept algorithms optimising the reward model show the shape (not: ppo-clip)" in check["note"]
    assert "turned down within the swept KL for best-of-n" in check["note"] and "no proxy figures): dpo" in check["note"]
    only_bon = gao_overoptimisation({"rows": [r for r in rows if r["name"] != "ppo-clip"]})
    assert only_bon["reproduced"] is True  # dpo's kink is outside the claim
    assert shapes["dpo"]["gold_slopes"] == pytest.approx([0.2236, -0.9949, 0.6274], abs=1e-4) and not shapes["dpo"]["gold_concave"]


def test_gao_without_a_sweep_is_not_run():
    assert gao_overoptimisation(None)["reproduced"] is None
    check = gao_overoptimisation({"rows": [row("sft-baseline", "hf", 0.0, 0.0), row("dpo", "dpo", 0.3, 0.1)]})
    assert check["reproduced"] is None and "--sweep kl" in check["note"] and check["measured"] == {}
    offline = gao_overoptimisation({"rows": [row(f"dpo beta={b}", "dpo", kl, 0.1) for b, kl in [(0.1, 0.5), (0.3, 0.3), (1.0, 0.2)]]})
    assert offline["reproduced"] is None and "(dpo) have no proxy figures" in offline["note"]
    assert offline["measured"]["algorithms"]["dpo"]["sqrt_kl"] == pytest.approx([math.sqrt(0.2), math.sqrt(0.3), math.sqrt(0.5)])


# ------------------------------------------------------------------------------------ records and markdown


def test_markdown_and_run_checks_records(tmp_path, monkeypatch):
    def no_reward(task_name, log):
        raise UserError("the task names no default reward source")

    monkeypatch.setattr(bench_checks, "base_models", no_reward)
    monkeypatch.setattr(bench_checks, "dpo_vs_ipo_deterministic", lambda task, out_dir, log=None: bench_checks.record(
        "dpo vs ipo", "Azar et al. 2023", "claim", {"target": 5.0, "ipo": {"margin": [4.987654321]}}, True, "note"))
    checks = run_checks("sentiment", tmp_path, None, log=lambda *_: None)
    assert [c["check"] for c in checks] == ["best-of-n KL", "dpo vs ipo", "overoptimisation", "reward collapse", "ptx alignment tax"]
    assert [c["reproduced"] for c in checks] == [None, True, None, None, None]
    assert "Not run on 'sentiment': the task names no default reward source" in checks[0]["note"]
    assert json.loads((tmp_path / "checks.json").read_text()) == checks
    md = (tmp_path / "checks.md").read_text()
    assert md == checks_markdown(checks)
    assert "| best-of-n KL | Beirami et al. 2024" in md and "| dpo vs ipo | Azar et al. 2023 | yes |" in md
    assert md.count("| not run |") == 4
    assert '- ipo: `{"margin": [4.988]}`' in md  # figures to 4 significant digits
    assert reward_collapse()["reproduced"] is None and ptx_alignment_tax()["reproduced"] is None


# ------------------------------------------------------------------------------------ on the real setup


@pytest.mark.slow
def test_best_of_n_kl_of_the_sentiment_sft_policy():
    """The SFT policy and reward model of the test cache; 8 prompts x 128 samples."""
    _, policy, reward = bench_checks.base_models("sentiment", log=None)
    task = registry.create("task", "sentiment", {})
    check = best_of_n_kl(task, policy, reward, prompts=task.eval_prompts()[:8], samples_per_prompt=128, seed=0)
    figures = check["measured"]["n"]
    print("\n" + json.dumps(bench_checks.rounded(check["measured"])))
    assert check["reproduced"] is True and list(figures) == ["2", "4", "16", "64"]
    kls = [f["kl"] for f in figures.values()]
    assert kls == sorted(kls) and kls[0] > 0  # more selection, more KL
    for n, f in figures.items():
        assert f["formula"] == pytest.approx(best_of_n_kl_bound(int(n))) and f["kl"] <= f["formula"] + 1e-9
        assert f["all_distinct_estimate"] <= f["formula"] and f["kl"] <= f["all_distinct_estimate"] + 1e-9
    assert 0 < check["measured"]["distinct_share"] <= 1 and check["measured"]["samples_per_prompt"] == 128


@pytest.mark.slow
def test_dpo_margin_grows_where_ipo_settles(tmp_path):
    """Azar et al.: the same 8 sentiment pairs, a tiny scratch policy, 120 steps of each objective."""
    task = registry.create("task", "sentiment", {})
    for name in task.stages_for("pairs"):  # the SFT samples of the test cache
        stages.build(name, task)
    check = dpo_vs_ipo_deterministic(task, tmp_path)
    m = check["measured"]
    print("\n" + json.dumps(bench_checks.rounded(m)))
    assert m["target"] == 5.0 and m["ipo"]["step"][-1] == m["dpo"]["step"][-1] == 120
    assert abs(m["ipo"]["margin"][-1] - 5.0) <= 0.25 * 5.0
    assert all(b > a for a, b in zip(m["dpo"]["margin"], m["dpo"]["margin"][1:]))  # rising at every checkpoint
    assert m["dpo"]["margin"][-1] > 2 * 5.0 and m["dpo"]["rejected_logratio"][-1] < m["ipo"]["rejected_logratio"][-1]
    assert check["reproduced"] is True
    assert not any(tmp_path.iterdir())  # the steps run in the check: no run directory written
