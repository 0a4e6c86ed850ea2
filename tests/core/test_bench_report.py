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


def pair(a, b, verdict, diff):
    return {"a": a, "b": b, "verdict": verdict, "gold_difference": {"mean": diff, "ci": [diff - 0.1, diff + 0.1]},
            "probability_of_improvement": {"mean": 0.5, "ci": [0.2, 0.8]}}


def test_ranks_share_a_place_unless_resolved_and_the_pairs_section_counts_them():
    from rlhfzoo.bench_report import markdown, ranks

    rows = [{"algorithm": x, "status": "ok", "gold": {"mean": g, "ci": [g - 0.1, g + 0.1]}} for x, g in (("a", 0.5), ("b", 0.45), ("c", 0.1))]
    pairs = [pair("a", "b", "tie", 0.05), pair("b", "a", "tie", -0.05), pair("a", "c", "better", 0.4), pair("c", "a", "worse", -0.4),
             pair("b", "c", "tie", 0.35), pair("c", "b", "tie", -0.35)]
    assert ranks(rows, pairs) == {"a": 1, "b": 1, "c": 2}  # only a is resolved above c; b ties both
    md = markdown(rows, {"task": "t", "date": "d", "machine": "m", "command": "c"}, {"pairwise": pairs})
    assert "| 1 | a | 0.500 [0.400, 0.600] |" in md and "| 1 | b |" in md and "| 2 | c |" in md
    assert "| a | c | 0.400 [0.300, 0.500] | 0.50 [0.20, 0.80] | resolved: a better |" in md
    assert "1 of 3 pairs resolved, 2 ties." in md


def test_the_improvement_matrix_is_an_image(tmp_path):
    from rlhfzoo.bench_report import plot_improvement

    rows = [{"algorithm": x, "gold": {"mean": 0.0}, "interval": "seeds and prompts"} for x in ("a", "b")]
    plot_improvement(rows, [pair("a", "b", "better", 0.3), pair("b", "a", "worse", -0.3)], tmp_path / "poi.png")
    assert (tmp_path / "poi.png").read_bytes()[:4] == b"\x89PNG"


def test_the_literature_checks_get_their_section():
    from rlhfzoo.bench_checks import record
    from rlhfzoo.bench_report import markdown

    checks = [record("dpo vs ipo", "Azar et al. 2023", "IPO's margin converges", {"ipo_margin": 4.96}, True, "within 25 %")]
    md = markdown([], {"task": "t", "date": "d", "machine": "m", "command": "c"}, {"checks": checks})
    assert "## Literature checks" in md and "| dpo vs ipo | Azar et al. 2023 | yes |" in md
