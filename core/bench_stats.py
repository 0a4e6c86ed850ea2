"""Statistics of `rlhfzoo bench`: from the runs' results to the leaderboard.

`analyse(specs, results)` returns everything the leaderboard reports: {"rows", "pairwise",
"frontier", "bootstrap"}; `aggregate(specs, results)` its rows alone.

Per row (an algorithm, or one swept value of it): the held-out gold reward, proxy reward and KL of
every seed (each run's `responses.json`: one response per held-out prompt, the same prompts for
every run) form a score matrix [seed, prompt]. Reported per row: mean, seed-level standard error
and t-based 95 % half-width over seeds (`ci95`), and the hierarchical bootstrap's 95 % interval
over seeds and prompts (`ci`, `bench_bootstrap`); for gold also the interquartile mean over seeds
(rliable's IQM) with its interval; the held-out pair accuracy; budget, time and memory.

Between rows: for every ordered pair with gold, the difference of mean gold (paired over prompts)
with its interval and a verdict ("better"/"worse" when the interval excludes 0, else "tie"), and
the probability of improvement over seeds (rliable); the gold win rate matched by seed and prompt,
and a Bradley-Terry (Elo-scale) rating fitted to all win rates. Per algorithm: the matched-KL
frontier (`bench_frontier`), on the same bootstrap replicates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from rlhfzoo.bench_bootstrap import LEVEL, REPLICATES, SEED, Resampling, interval, intervals, iqm, probability_of_improvement, verdict
from rlhfzoo.bench_frontier import Point, frontier
from rlhfzoo.bench_plan import BASELINE, BenchError, RunSpec

SCORES = ("gold", "proxy", "kl")  # per-response figures in responses.json


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean, standard error and 95 % half-width across seeds (t distribution, n - 1 degrees of
    freedom); the standard error and half-width are NaN for one value, everything for none."""
    if not len(values):
        return float("nan"), float("nan"), float("nan")
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 1:
        return float(x[0]), float("nan"), float("nan")
    se = float(x.std(ddof=1) / math.sqrt(len(x)))
    return float(x.mean()), se, float(stats.t.ppf(0.5 + LEVEL / 2, len(x) - 1)) * se


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of prompts where a's response beats b's (ties count half)."""
    n = min(len(a), len(b))
    if not n:
        return 0.0
    return float(0.5 + 0.5 * np.sign(np.asarray(a[:n], dtype=np.float64) - np.asarray(b[:n], dtype=np.float64)).mean())


def bradley_terry(wins: dict[tuple[str, str], float], players: list[str], iters: int = 200) -> dict[str, float]:
    """Bradley-Terry strengths from pairwise win shares (minorisation-maximisation, Hunter 2004),
    reported on the Elo scale: 1000 + 400 log10(p_i / geometric mean)."""
    if not players:
        return {}
    index = {x: i for i, x in enumerate(players)}
    shares, met = np.zeros((len(players), len(players))), np.zeros((len(players), len(players)))
    for (i, j), share in wins.items():
        if i in index and j in index and i != j:
            shares[index[i], index[j]], met[index[i], index[j]] = share, 1.0
    won = np.maximum(shares.sum(axis=1), 1e-3)
    p = np.ones(len(players))
    for _ in range(iters):
        denom = (met / (p[:, None] + p[None, :])).sum(axis=1)
        new = np.where(denom > 0, won / np.where(denom > 0, denom, 1.0), p)
        p = new / np.exp(np.log(new).mean())
    return {x: float(1000 + 400 * math.log10(p[i])) for x, i in index.items()}


# ------------------------------------------------------------------------------------ score matrices


def read_records(specs: list[RunSpec], results: list[dict[str, Any]]) -> dict[tuple[str, int], dict]:
    """(row label, seed) -> the finished run's responses.json, in the order of the specs."""
    records = {}
    for spec, res in zip(specs, results):
        f = Path(spec.directory) / "responses.json"
        if res.get("status") == "ok" and f.exists():
            records[(spec.label, spec.seed)] = json.loads(f.read_text())
    return records


def score_matrices(records: dict[tuple[str, int], dict]) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """Per row label, {key: (seeds, prompts) matrix} for each of gold/proxy/kl that all its sampled
    seeds record (seeds in the order of the runs), and the number of prompts. Runs that sampled
    nothing (a scorer such as a reward model) are left out. Raises `BenchError` when two runs were
    scored on different held-out prompts: the paired comparison would be meaningless."""
    first: tuple[str, int, list] | None = None
    by_label: dict[str, list[dict]] = {}
    for (label, seed), rec in records.items():
        if not rec.get("prompts"):
            continue
        if first is None:
            first = (label, seed, rec["prompts"])
        elif rec["prompts"] != first[2]:
            raise BenchError(
                f"the runs {first[0]!r} seed {first[1]} and {label!r} seed {seed} were scored on different held-out prompts "
                "(their responses.json): every row must be scored on the same ones. Rerun the bench with --force."
            )
        for key in SCORES:
            if key in rec and len(rec[key]) != len(rec["prompts"]):
                raise BenchError(f"the run {label!r} seed {seed} has {len(rec[key])} {key} scores for {len(rec['prompts'])} prompts "
                                 "in its responses.json (one per prompt expected). Rerun the bench with --force.")
        by_label.setdefault(label, []).append(rec)
    matrices = {
        label: {key: np.array([r[key] for r in recs], dtype=np.float64) for key in SCORES if all(key in r for r in recs)}
        for label, recs in by_label.items()
    }
    return {label: m for label, m in matrices.items() if m}, len(first[2]) if first else 0


def covers(*seed_counts: int) -> str:
    """Which sources of variation a bootstrap interval covers: seeds only where every row involved
    has several (with one seed, seed-to-seed variation is not measured)."""
    return "seeds and prompts" if all(n > 1 for n in seed_counts) else "prompts"


def add_intervals(row: dict[str, Any], matrices: dict[str, np.ndarray], replicates: dict[str, np.ndarray], level: float = LEVEL) -> None:
    """The row's bootstrap figures from its score matrices and their per-seed replicates (B, S)
    (`Resampling.per_seed`): `ci` of each score's mean, `iqm` and `iqm_ci` of gold over seeds, and
    `interval` (what the intervals cover)."""
    for key, scores in matrices.items():
        row[key]["ci"] = interval(replicates[key].mean(axis=1), level)
        if key == "gold":
            row[key]["iqm"] = float(iqm(scores.mean(axis=1)))
            row[key]["iqm_ci"] = interval(iqm(replicates[key], axis=1), level)
    row["interval"] = covers(len(next(iter(matrices.values()))))


def pairwise(gold: dict[str, np.ndarray], replicates: dict[str, np.ndarray], wins: dict[tuple[str, str], float] | None = None,
             level: float = LEVEL) -> list[dict[str, Any]]:
    """Every ordered pair (a, b) of rows with a gold matrix (seeds, prompts), from the matrices and
    their per-seed replicates (B, S) (`Resampling.per_seed`): the difference of mean gold a - b
    (paired over prompts) with its interval and verdict ("better": a beats b, "worse", "tie"), the
    probability of improvement P(a > b) over seeds (rliable's, on per-seed mean gold) with its
    interval, what the intervals cover, and the per-prompt gold win rate if in `wins`.

    Each entry: {"a", "b", "gold_difference": {"mean", "ci"}, "probability_of_improvement":
    {"mean", "ci"}, "verdict", "interval", "win_rate"}."""
    labels = list(gold)
    per_seed = {label: gold[label].mean(axis=1) for label in labels}
    means = {label: replicates[label].mean(axis=1) for label in labels}
    pairs = [(a, b) for a in labels for b in labels if a != b]
    if not pairs:
        return []
    improvement = {}
    for i, a in enumerate(labels):  # P(b > a) = 1 - P(a > b): each unordered pair once
        for b in labels[i + 1 :]:
            improvement[(a, b)] = probability_of_improvement(replicates[a], replicates[b])
            improvement[(b, a)] = 1.0 - improvement[(a, b)]
    difference_ci = intervals(np.stack([means[a] - means[b] for a, b in pairs]), level)
    improvement_ci = intervals(np.stack([improvement[pair] for pair in pairs]), level)
    out = []
    for (a, b), difference, poi in zip(pairs, difference_ci, improvement_ci):
        entry = {
            "a": a,
            "b": b,
            "gold_difference": {"mean": float(per_seed[a].mean() - per_seed[b].mean()), "ci": difference},
            "probability_of_improvement": {"mean": float(probability_of_improvement(per_seed[a], per_seed[b])), "ci": poi},
            "verdict": verdict(difference),
            "interval": covers(len(per_seed[a]), len(per_seed[b])),
        }
        if wins and (a, b) in wins:
            entry["win_rate"] = wins[(a, b)]
        out.append(entry)
    return out


def pairwise_matrix(pairs: list[dict[str, Any]], labels: list[str], key: str = "probability_of_improvement") -> list[list[float]]:
    """matrix[i][j] = the `key` mean of (labels[i], labels[j]) from `pairwise` (NaN on the diagonal
    and where a pair is missing): what a probability-of-improvement heat map draws."""
    found = {(p["a"], p["b"]): p[key]["mean"] for p in pairs}
    return [[found.get((a, b), float("nan")) for b in labels] for a in labels]


def frontier_points(matrices: dict[str, dict[str, np.ndarray]], replicates: dict[str, dict[str, np.ndarray]],
                    names: dict[str, str]) -> tuple[dict[str, list[Point]], Point | None]:
    """The frontier's points: per algorithm (`names`: row label -> registered name) its rows with gold
    and KL, and the origin, the baseline's gold at KL 0 (None without a baseline gold); each with
    its bootstrap replicates (the mean over a replicate's seeds of `replicates[label][key]`)."""
    curves: dict[str, list[Point]] = {}
    origin = None
    for label, m in matrices.items():
        if "gold" not in m:
            continue
        gold = replicates[label]["gold"].mean(axis=1)
        if label == BASELINE:
            origin = Point(label, 0.0, float(m["gold"].mean()), np.zeros_like(gold), gold)
        elif "kl" in m:
            point = Point(label, float(m["kl"].mean()), float(m["gold"].mean()), replicates[label]["kl"].mean(axis=1), gold)
            curves.setdefault(names[label], []).append(point)
    return curves, origin


# ------------------------------------------------------------------------------------ the leaderboard


def win_shares(labels: list[str], records: dict[tuple[str, int], dict]) -> dict[tuple[str, str], float]:
    """Pairwise gold win shares between all rows, matched by seed and prompt (mean over shared seeds)."""
    gold = {key: np.asarray(rec["gold"], dtype=np.float64) for key, rec in records.items() if "gold" in rec}
    seeds: dict[str, list[int]] = {}
    for label, seed in gold:
        seeds.setdefault(label, []).append(seed)
    wins: dict[tuple[str, str], float] = {}
    for a in labels:
        for b in labels:
            shares = [win_rate(gold[(a, s)], gold[(b, s)]) for s in seeds.get(a, []) if (b, s) in gold] if a != b else []
            if shares:
                wins[(a, b)] = sum(shares) / len(shares)
    return wins


def row_of(label: str, runs: list[tuple[RunSpec, dict]], records: dict[tuple[str, int], dict]) -> dict[str, Any]:
    """One leaderboard row from its runs: status, seed-level statistics, budget, time and memory."""
    ok = [(s, r) for s, r in runs if r.get("status") == "ok"]
    row: dict[str, Any] = {"algorithm": label, "name": runs[0][0].name, "kind": runs[0][0].kind, "seeds": len(runs), "seeds_ok": len(ok)}
    row["status"] = "ok" if len(ok) == len(runs) else "failed" if not ok else "partial"
    errors = [r.get("error") for _, r in runs if r.get("status") != "ok"]
    if errors:
        row["errors"] = errors
    for key in SCORES:
        recs = [records[(label, s.seed)] for s, _ in ok if records.get((label, s.seed), {}).get(key)]
        if recs:
            vals = [sum(rec[key]) / len(rec[key]) for rec in recs]
            m, se, ci = mean_ci(vals)
            within = [float(np.std(rec[key], ddof=1) / math.sqrt(len(rec[key]))) if len(rec[key]) > 1 else float("nan") for rec in recs]
            row[key] = {"mean": m, "seed_se": se, "ci95": ci, "per_seed": vals, "prompt_se": sum(within) / len(within)}
    accuracies = [tuple(r["pair_accuracy"]) for _, r in ok if r.get("pair_accuracy")]  # (accuracy, pairs) per seed
    if accuracies:
        m, se, ci = mean_ci([a for a, _ in accuracies])
        within = [math.sqrt(a * (1 - a) / n) if n else float("nan") for a, n in accuracies]  # binomial SE over pairs
        row["pair_accuracy"] = {"mean": m, "seed_se": se, "ci95": ci, "per_seed": [a for a, _ in accuracies], "pair_se": sum(within) / len(within)}
    for key in ("train_seconds", "wall_seconds", "peak_rss_mb", "train_tokens_per_second", "generate_tokens_per_second"):
        vals = [r[key] for _, r in ok if key in r]
        if vals:
            row[key] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
    budgets = [r.get("budget", {}) for _, r in ok]
    if budgets:
        row["budget"] = {k: sum(b.get(k, 0) for b in budgets) / len(budgets) for k in budgets[0]}
    objective_evals = [r.get("objective_eval") for _, r in ok if r.get("objective_eval")]
    if objective_evals:
        row["objective_eval"] = objective_evals[0] if len(objective_evals) == 1 else objective_evals
    return row


def analyse(specs: list[RunSpec], results: list[dict[str, Any]], replicates: int = REPLICATES, seed: int = SEED,
            kl_values: list[float] | None = None) -> dict[str, Any]:
    """Everything the leaderboard reports, from the runs (`specs`) and their results:
    {"rows": the rows, best first; "pairwise": `pairwise` over the rows with gold; "frontier":
    `bench_frontier.frontier` per algorithm (at `kl_values`, default its grid up to K*);
    "bootstrap": {"replicates", "seed", "level", "prompts", "interval" (what intervals over all rows
    cover), "method"}, None when no row was sampled}. Deterministic: the bootstrap's seed is fixed."""
    by_label: dict[str, list[tuple[RunSpec, dict]]] = {}
    for spec, res in zip(specs, results):
        by_label.setdefault(spec.label, []).append((spec, res))
    records = read_records(specs, results)
    wins = win_shares(list(by_label), records)
    elo = bradley_terry(wins, [x for x in by_label if any(k[0] == x for k in wins)]) if wins else {}
    matrices, prompts = score_matrices(records)
    per_seed: dict[str, dict[str, np.ndarray]] = {}  # label -> key -> (B, S) bootstrap replicates
    if matrices:
        resampling = Resampling.draw(prompts, {label: len(next(iter(m.values()))) for label, m in matrices.items()}, replicates, seed)
        per_seed = {label: {key: resampling.per_seed(x, label) for key, x in m.items()} for label, m in matrices.items()}
    rows = []
    for label, runs in by_label.items():
        row = row_of(label, runs, records)
        if label != BASELINE and (label, BASELINE) in wins:
            row["win_rate_vs_sft"] = wins[(label, BASELINE)]
        row["elo"] = elo.get(label)
        if label in matrices:
            add_intervals(row, matrices[label], per_seed[label])
        rows.append(row)
    if any(r.get("gold") for r in rows):
        rows.sort(key=lambda r: -(r.get("gold", {}).get("mean", -1e9) if r.get("gold") else (r.get("elo") or -1e9)))
    else:  # no gold reward (e.g. hh-rlhf): held-out pair accuracy, then Elo; rows without either last
        rows.sort(key=lambda r: (-(r["pair_accuracy"]["mean"] if r.get("pair_accuracy") else -1e9), -(r.get("elo") or -1e9)))
    out: dict[str, Any] = {"rows": rows, "pairwise": [], "frontier": [], "bootstrap": None}
    if matrices:
        gold = {label: m["gold"] for label, m in matrices.items() if "gold" in m}
        out["pairwise"] = pairwise(gold, {label: per_seed[label]["gold"] for label in gold}, wins)
        curves, origin = frontier_points(matrices, per_seed, {spec.label: spec.name for spec in specs})
        out["frontier"] = frontier(curves, origin, kl_values)
        out["bootstrap"] = {
            "replicates": replicates, "seed": seed, "level": LEVEL, "prompts": prompts,
            "interval": covers(*(len(next(iter(m.values()))) for m in matrices.values())),  # what the frontier's intervals cover
            "method": "hierarchical percentile bootstrap: seeds resampled per row, held-out prompts resampled once per replicate for all rows",
        }
    return out


def aggregate(specs: list[RunSpec], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The leaderboard's rows (`analyse(...)["rows"]`), best first: by mean gold reward, or on a
    task without gold by held-out pair accuracy, then Elo."""
    return analyse(specs, results)["rows"]
