"""The bench's plots read the right quantities: training curves against wall-clock seconds,
averaged over seeds evaluation by evaluation, and no reward model drawn as a policy."""

import json

from rlhfzoo.bench_plan import RunSpec
from rlhfzoo.bench_report import plot_curves, training_curves


def run(tmp_path, label, name, seed, evals, final, train_seconds):
    d = tmp_path / label / f"seed-{seed}"
    (d / "train").mkdir(parents=True)
    rows = [{"step": 1, "loss": 0.5, "elapsed": 0.5}]
    rows += [{"step": 2 * (i + 1), "elapsed": t, "eval/gold": g} for i, (t, g) in enumerate(evals)]
    (d / "train" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = RunSpec(label, name, "objective", seed, {}, str(d), 8)
    result = {"status": "ok", "objective_eval": {"gold": final}, "train_seconds": train_seconds}
    return spec, result


def test_curves_are_against_wall_clock_mean_over_seeds_and_skip_scorers(tmp_path):
    runs = [
        run(tmp_path, "dpo", "dpo", 0, [(1.0, 0.1), (2.0, 0.3)], 0.5, 3.0),
        run(tmp_path, "dpo", "dpo", 1, [(3.0, 0.3), (4.0, 0.5)], 0.7, 5.0),
        run(tmp_path, "bradley-terry", "bradley-terry", 0, [(1.0, 9.0)], 9.0, 2.0),  # a scorer: no curve
    ]
    specs, results = [s for s, _ in runs], [r for _, r in runs]
    curves = training_curves(specs, results)
    assert set(curves) == {"dpo"}
    assert curves["dpo"]["gold"] == [(2.0, 0.2), (3.0, 0.4), (4.0, 0.6)]  # (mean seconds, mean gold) per evaluation
    rows = [{"algorithm": "bradley-terry", "kind": "objective", "train_seconds": {"mean": 2.0},
             "pair_accuracy": {"mean": 0.7, "ci95": float("nan"), "pair_se": 0.02}}]
    plot_curves(specs, results, rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
