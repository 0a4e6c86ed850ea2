"""Statistics of `rlhfzoo bench`: from the runs' results to the leaderboard rows.

Per row (an algorithm, or one swept value of it) and over its seeds: mean, standard error and
95 % confidence interval of the held-out gold reward, proxy reward and KL (from each run's
`responses.json`) and of the held-out pair accuracy; pairwise gold win rates matched by seed and
prompt, and a Bradley-Terry (Elo-scale) rating fitted to all of them; budget, time and memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rlhfzoo.bench_plan import BASELINE, RunSpec
from rlhfzoo.evaluation import mean_and_se


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean, standard error and 95 % half-width across seeds (t distribution)."""
    m, se = mean_and_se(values)
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}.get(len(values), 2.0)
    return m, se, t * se


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of prompts where a's response beats b's (ties count half)."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / max(1, len(a))


def bradley_terry(wins: dict[tuple[str, str], float], players: list[str], iters: int = 200) -> dict[str, float]:
    """Bradley-Terry strengths from pairwise win shares (minorisation-maximisation, Hunter 2004),
    reported on the Elo scale: 1000 + 400 log10(p_i / geometric mean)."""
    p = {x: 1.0 for x in players}
    for _ in range(iters):
        new = {}
        for i in players:
            w = sum(wins.get((i, j), 0.0) for j in players if j != i)
            denom = sum(1.0 / (p[i] + p[j]) for j in players if j != i and (i, j) in wins)
            new[i] = max(w, 1e-3) / denom if denom else p[i]
        g = math.exp(sum(math.log(v) for v in new.values()) / len(new))
        p = {k: v / g for k, v in new.items()}
    return {k: 1000 + 400 * math.log10(v) for k, v in p.items()}


def aggregate(specs: list[RunSpec], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_label: dict[str, list[tuple[RunSpec, dict]]] = {}
    for spec, res in zip(specs, results):
        by_label.setdefault(spec.label, []).append((spec, res))
    records = {}
    for spec, res in zip(specs, results):
        f = Path(spec.directory) / "responses.json"
        if res.get("status") == "ok" and f.exists():
            records[(spec.label, spec.seed)] = json.loads(f.read_text())
    labels = list(by_label)
    # Pairwise gold win shares between all rows, matched by seed and prompt.
    wins: dict[tuple[str, str], float] = {}
    for a in labels:
        for b in labels:
            if a == b:
                continue
            shares = [
                win_rate(records[(a, s)]["gold"], records[(b, s)]["gold"])
                for (la, s) in records
                if la == a and (b, s) in records and "gold" in records[(a, s)] and "gold" in records[(b, s)]
            ]
            if shares:
                wins[(a, b)] = sum(shares) / len(shares)
    elo = bradley_terry(wins, [x for x in labels if any(k[0] == x for k in wins)]) if wins else {}
    rows = []
    for label, runs in by_label.items():
        ok = [(s, r) for s, r in runs if r.get("status") == "ok"]
        row: dict[str, Any] = {"algorithm": label, "name": runs[0][0].name, "kind": runs[0][0].kind, "seeds": len(runs), "seeds_ok": len(ok)}
        row["status"] = "ok" if len(ok) == len(runs) else "failed" if not ok else "partial"
        errors = [r.get("error") for _, r in runs if r.get("status") != "ok"]
        if errors:
            row["errors"] = errors
        def per_seed(key: str) -> list[float]:
            vals = []
            for s, _ in ok:
                rec = records.get((label, s.seed), {})
                if key in rec and rec[key]:
                    vals.append(sum(rec[key]) / len(rec[key]))
            return vals
        for key in ("gold", "proxy", "kl"):
            vals = per_seed(key)
            if vals:
                m, se, ci = mean_ci(vals)
                within = [mean_and_se(records[(label, s.seed)][key])[1] for s, _ in ok if key in records.get((label, s.seed), {})]
                row[key] = {"mean": m, "seed_se": se, "ci95": ci, "per_seed": vals, "prompt_se": sum(within) / len(within)}
        accuracies = [tuple(r["pair_accuracy"]) for _, r in ok if r.get("pair_accuracy")]  # (accuracy, pairs) per seed
        if accuracies:
            m, se, ci = mean_ci([a for a, _ in accuracies])
            within = [math.sqrt(a * (1 - a) / n) if n else float("nan") for a, n in accuracies]  # binomial SE over pairs
            per_seed = [a for a, _ in accuracies]
            row["pair_accuracy"] = {"mean": m, "seed_se": se, "ci95": ci, "per_seed": per_seed, "pair_se": sum(within) / len(within)}
        if label != BASELINE and (label, BASELINE) in wins:
            row["win_rate_vs_sft"] = wins[(label, BASELINE)]
        row["elo"] = elo.get(label)
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
        rows.append(row)
    if any(r.get("gold") for r in rows):
        rows.sort(key=lambda r: -(r.get("gold", {}).get("mean", -1e9) if r.get("gold") else (r.get("elo") or -1e9)))
    else:  # no gold reward (e.g. hh-rlhf): held-out pair accuracy, then Elo; rows without either last
        rows.sort(key=lambda r: (-(r["pair_accuracy"]["mean"] if r.get("pair_accuracy") else -1e9), -(r.get("elo") or -1e9)))
    return rows

