"""`rlhfzoo bench --checks`: best-of-n's exact KL on hand-computed reward levels, Gao et al.'s shape
on synthetic rows, the training checks' statistics (paired t interval, spread groups, collapse index,
demonstration NLL) by hand, the markdown and `run_checks`' records; (slow) best-of-n's KL on the
sentiment SFT policy, DPO against IPO on deterministic preferences, and the PPO-ptx and reward-collapse
checks at tiny budgets, each on the real tiny setup."""

import json
import math
import random

import pytest

from rlhfzoo import bench_checks, bench_checks_training, stages
from rlhfzoo.bench_checks import (
    TINY_POLICY,
    best_of_n_kl,
    best_of_n_kl_bound,
    checks_markdown,
    curve_shape,
    dpo_vs_ipo_deterministic,
    empirical_best_of_n_kl,
    gao_overoptimisation,
    run_checks,
)
from rlhfzoo.bench_checks_training import (
    demonstration_nll,
    paired_interval,
    population_std,
    ptx_alignment_tax,
    ranked_prompts,
    reward_collapse,
    spread_figures,
    spread_groups,
)
from rlhfzoo.config import resolve
from rlhfzoo.data.collate import Collator
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import PreferencePair
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


# ------------------------------------------------------------------------------------ the training checks' statistics


def test_paired_interval_by_hand():
    # d = (2, 3, 4): mean 3, sample std 1, t_{0.975, 2} = 4.302653 -> half width 4.302653 / sqrt(3) = 2.484138.
    out = paired_interval([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])
    assert out["differences"] == [2.0, 3.0, 4.0] and out["mean"] == 3.0 and out["level"] == 0.95
    assert out["interval"] == pytest.approx([3 - 2.484138, 3 + 2.484138], abs=1e-6)
    # d = (1, -1): mean 0, std sqrt(2), t_{0.975, 1} = 12.706205 -> half width 12.706205.
    assert paired_interval([1.0, 0.0], [0.0, 1.0])["interval"] == pytest.approx([-12.706205, 12.706205], abs=1e-6)
    one = paired_interval([2.0], [0.5])
    assert one["mean"] == 1.5 and all(math.isnan(x) for x in one["interval"])
    with pytest.raises(ValueError, match="same positive number"):
        paired_interval([1.0, 2.0], [1.0])


def test_spread_groups_and_figures_by_hand():
    assert population_std([1.0, 3.0]) == 1.0 and population_std([2.0, 2.0, 2.0]) == 0.0
    assert population_std([0.0, 0.0, 3.0]) == pytest.approx(math.sqrt(2))  # mean 1, squares 1 + 1 + 4 over 3
    spreads = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4]
    assert spread_groups(spreads) == ([1, 5], [6, 2])  # quarters of 8: the two smallest, the two largest
    assert spread_groups([0.2, 0.2, 0.2]) == ([0], [2])  # at least one each; ties by position
    with pytest.raises(ValueError, match="two disjoint groups"):
        spread_groups([0.3])
    # Gold spreads 1 vs 4 (ratio 4), the model's 1 vs 2 (ratio 2): half of the log ratio kept -> index 0.5.
    f = spread_figures([1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 4.0, 4.0], [0, 1], [2, 3])
    assert (f["model_low"], f["model_high"], f["gold_low"], f["gold_high"]) == (1.0, 2.0, 1.0, 4.0)
    assert f["model_ratio"] == 2.0 and f["gold_ratio"] == 4.0 and f["collapse_index"] == pytest.approx(0.5)
    assert spread_figures([3.0, 3.0], [1.0, 4.0], [0], [1])["collapse_index"] == pytest.approx(1.0)  # equal: collapse
    assert spread_figures([0.5, 2.0], [1.0, 4.0], [0], [1])["collapse_index"] == pytest.approx(0.0)  # as gold
    assert spread_figures([0.5, 8.0], [1.0, 4.0], [0], [1])["collapse_index"] == pytest.approx(-1.0)  # more apart than gold
    assert math.isnan(spread_figures([1.0, 2.0], [1.0, 1.0], [0], [1])["collapse_index"])  # gold does not differ
    assert math.isnan(spread_figures([0.0, 2.0], [1.0, 4.0], [0], [1])["collapse_index"])  # model ratio infinite


def test_ranked_prompts_collects_each_rankings_responses():
    pairs = [PreferencePair("p", "a", "b", group=0), PreferencePair("p", "a", "c", group=0), PreferencePair("p", "b", "c", group=0),
             PreferencePair("q", "y", "x", group=1)]
    assert ranked_prompts(pairs) == (["p", "q"], [["a", "b", "c"], ["y", "x"]])


def test_demonstration_nll_is_one_token_mean_whatever_the_batches():
    task = registry.create("task", "sentiment", {})
    policy = resolve({"task": {"name": "sentiment"}, "policy": dict(TINY_POLICY)}, require=("task",)).policy.create(task=task)
    collator = Collator(policy.tokenizer, max_length=128)
    demos = task.examples("demonstrations", split="test")[:7]
    total = tokens = 0.0
    for d in demos:  # one at a time, no padding: the summed NLL and the response tokens of each
        seq = collator([(0, d)]).sequences
        mask = seq.response_mask[:, 1:].float()
        total -= float((policy.logprobs(seq.input_ids, seq.attention_mask).detach().float() * mask).sum())
        tokens += float(mask.sum())
    expected = total / tokens  # a token mean over all of them, not a mean of per-demonstration means
    assert demonstration_nll(policy, demos, collator, batch_size=3) == pytest.approx(expected, rel=1e-5)
    assert demonstration_nll(policy, demos, collator) == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(math.log(len(policy.tokenizer)), rel=0.2)  # an untrained model: about uniform


# ------------------------------------------------------------------------------------ records and markdown


def test_markdown_and_run_checks_records(tmp_path, monkeypatch):
    def no_reward(task_name, log):
        raise UserError("the task names no default reward source")

    def no_demonstrations(task, out_dir, log=None):
        raise UserError("task 'sentiment' has no train and held-out demonstrations")

    monkeypatch.setattr(bench_checks, "base_models", no_reward)
    monkeypatch.setattr(bench_checks, "dpo_vs_ipo_deterministic", lambda task, out_dir, log=None: bench_checks.record(
        "dpo vs ipo", "Azar et al. 2023", "claim", {"target": 5.0, "ipo": {"margin": [4.987654321]}}, True, "note"))
    monkeypatch.setattr(bench_checks_training, "reward_collapse", lambda task, out_dir, log=None: bench_checks.record(
        "reward collapse", "Song et al. 2023", "claim", {"seeds": [0, 1, 2]}, False, "no collapse"))
    monkeypatch.setattr(bench_checks_training, "ptx_alignment_tax", no_demonstrations)
    checks = run_checks("sentiment", tmp_path, None, log=lambda *_: None)
    assert [c["check"] for c in checks] == ["best-of-n KL", "dpo vs ipo", "overoptimisation", "reward collapse", "ptx alignment tax"]
    assert [c["reproduced"] for c in checks] == [None, True, None, False, None]
    assert "Not run on 'sentiment': the task names no default reward source" in checks[0]["note"]
    assert checks[4]["paper"] == bench_checks_training.PTX_PAPER and "has no train and held-out demonstrations" in checks[4]["note"]
    assert json.loads((tmp_path / "checks.json").read_text()) == checks
    md = (tmp_path / "checks.md").read_text()
    assert md == checks_markdown(checks)
    assert "| best-of-n KL | Beirami et al. 2024" in md and "| dpo vs ipo | Azar et al. 2023 | yes |" in md
    assert md.count("| not run |") == 3 and "| reward collapse | Song et al. 2023 | **no** |" in md
    assert '- ipo: `{"margin": [4.988]}`' in md  # figures to 4 significant digits


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


@pytest.mark.slow
def test_ptx_and_reward_collapse_checks_at_tiny_budgets(tmp_path):
    """The two training checks end to end on the test cache's SFT policy and reward model: PPO and
    PPO-ptx for 2 iterations on 2 seeds, and one RM per kind for 3 steps on 16 ranked prompts."""
    task = registry.create("task", "sentiment", {})
    tax = ptx_alignment_tax(task, tmp_path, seeds=(0, 1), steps=2, eval_prompts=16)
    m = tax["measured"]
    print("\n" + json.dumps(bench_checks.rounded({k: v for k, v in m.items() if k not in ("ppo", "ppo-ptx")})))
    assert m["seeds"] == [0, 1] and m["train"]["steps"] == 2 and m["train"]["batch_size"] == 32 and m["ptx_coef"] == bench_checks_training.PTX_COEF
    assert m["ptx_batch_size"] == 8 and m["held_out_demonstrations"] == 400 and m["eval_prompts"] == 16
    assert 0 < m["sft"]["nll"] < math.log(len(task.tokenizer()))  # the SFT policy knows the language
    for label in ("ppo", "ppo-ptx"):
        assert [r["seed"] for r in m[label]] == [0, 1]
        assert all(r["tax"] == pytest.approx(r["nll"] - m["sft"]["nll"]) and r["kl"] >= -0.5 for r in m[label])
    by_hand = [a["tax"] - b["tax"] for a, b in zip(m["ppo"], m["ppo-ptx"])]
    assert m["tax_reduction"]["differences"] == pytest.approx(by_hand) and math.isfinite(m["tax_reduction"]["interval"][0])
    assert tax["reproduced"] is (m["tax_reduction"]["interval"][0] > 0) and "Alignment tax" in tax["note"]
    assert not any(tmp_path.iterdir())  # the steps run in the check: no run directory written

    collapse = reward_collapse(task, tmp_path, seeds=(0,), utilities=("none",), prompts=16, steps=3, batch_size=16)
    m = collapse["measured"]
    print(json.dumps(bench_checks.rounded(m["summary"])))
    assert m["prompts"] == 16 and m["seeds"] == [0] and m["train"] == {"steps": 3, "batch_size": 16, "lr": 1e-3}
    assert set(m["runs"]) == {"none", "regression"} and m["held_out_prompts"] >= 150
    assert m["gold_ratio"]["ranked"] > 1 and m["gold_ratio"]["held_out"] > 1  # the quarters' gold spreads differ
    for rows in m["runs"].values():
        row = rows[0]
        assert 0 <= row["train_pair_accuracy"] <= 1
        for split in ("ranked", "held_out"):
            f = row[split]
            assert f["gold_ratio"] == pytest.approx(m["gold_ratio"][split])
            assert f["collapse_index"] == pytest.approx(1 - math.log(f["model_ratio"]) / math.log(f["gold_ratio"]))
    assert collapse["reproduced"] is False  # one seed: no interval over the control, so no collapse is claimed
    assert "not reproduced at this scale" in collapse["note"] and "above it on" in collapse["note"]
