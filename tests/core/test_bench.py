"""`rlhfzoo bench` end to end with two tiny objectives, one of them the third-party example plugin:
every output exists, the JSON carries every field for every row, the PNGs are real images,
resuming skips finished runs, unknown names run nothing, a crashing algorithm is marked failed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfzoo.bench import builtin_algorithms, default_algorithms, markdown
from rlhfzoo.interfaces import BenchProtocol
from rlhfzoo.registry import registry

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "rlhfzoo-slic"
RLHFZOO = str(Path(sys.executable).parent / "rlhfzoo")
ROW_FIELDS = {"algorithm", "name", "kind", "seeds", "seeds_ok", "status", "gold", "kl", "elo", "wall_seconds", "peak_rss_mb", "budget"}
SHARED_HH = (REPO / ".." / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz").resolve()
HH_TASK = {"path": str(SHARED_HH), "max_pairs": 48, "test_fraction": 0.25, "max_chars": 300}
TINY = ["--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "train.eval_every=1", "--eval-prompts", "24"]


@pytest.fixture
def env(example_plugin_env):
    return example_plugin_env


def bench(*args, env):
    return subprocess.run([RLHFZOO, "bench", *args], capture_output=True, text=True, env=env, timeout=1500)


@pytest.mark.slow
def test_bench_outputs_and_resume(env, tmp_path):
    out = tmp_path / "bench"
    r = bench("--task", "sentiment", "--algorithms", "slic-hf,dpo", "--seeds", "1", "--out", str(out), "--reward", "gold", *TINY, "--jobs", "2", env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for f in ("leaderboard.json", "leaderboard.md", "frontier.png", "improvement.png", "curves.png"):
        assert (out / f).exists(), f
    for png in ("frontier.png", "improvement.png", "curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        from PIL import Image

        w, h = Image.open(out / png).size
        assert w > 300 and h > 200
    board = json.loads((out / "leaderboard.json").read_text())
    assert {"task", "date", "machine", "command"} <= set(board["meta"])
    rows = {row["algorithm"]: row for row in board["rows"]}
    assert set(rows) == {"sft-baseline", "slic-hf", "dpo"}
    for name, row in rows.items():
        assert ROW_FIELDS <= set(row), (name, ROW_FIELDS - set(row))
        assert row["status"] == "ok"
        assert {"mean", "seed_se", "ci95", "per_seed", "prompt_se"} <= set(row["gold"])
    for name in ("slic-hf", "dpo"):
        assert 0.0 <= rows[name]["win_rate_vs_sft"] <= 1.0
        assert rows[name]["budget"]["optimizer_steps"] == 2 and rows[name]["budget"]["train_tokens"] > 0
        assert (out / "runs" / name / "seed-0" / "config.yaml").exists()
    md = (out / "leaderboard.md").read_text()
    assert "| slic-hf |" in md and "| dpo |" in md
    assert "sft-baseline" in r.stdout  # the summary table on the console

    before = (out / "runs" / "dpo" / "seed-0" / "result.json").stat().st_mtime_ns
    again = bench("--task", "sentiment", "--algorithms", "slic-hf,dpo", "--seeds", "1", "--out", str(out), "--reward", "gold", *TINY, env=env)
    assert again.returncode == 0
    assert (out / "runs" / "dpo" / "seed-0" / "result.json").stat().st_mtime_ns == before  # reused, not rerun
    assert not (out / "runs" / "dpo" / "seed-0" / "log.txt").read_text() == ""


@pytest.mark.slow
def test_bench_tunes_on_validation_prompts_holds_a_budget_and_runs_two_at_a_time(env, tmp_path):
    out = tmp_path / "bench"
    args = ["--task", "sentiment", "--algorithms", "dpo", "--seeds", "2", "--tune", "2", "--budget", "examples=6", "--jobs", "2",
            "--out", str(out), "--reward", "gold", *TINY]
    r = bench(*args, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    board = json.loads((out / "leaderboard.json").read_text())
    tuning = board["tuning"]["dpo"]
    assert len(tuning["trials"]) == 2 and tuning["setting"] in [t["setting"] for t in tuning["trials"]]
    assert tuning["validation_gold"] == max(t["validation_gold"] for t in tuning["trials"])
    trial_prompts = json.loads(next((out / "tune").rglob("responses.json")).read_text())["prompts"]
    test_prompts = json.loads((out / "runs" / "dpo" / "seed-0" / "responses.json").read_text())["prompts"]
    assert len(trial_prompts) == len(test_prompts) == 24 and not set(trial_prompts) & set(test_prompts)  # validation != test
    import yaml

    final = yaml.safe_load((out / "runs" / "dpo" / "seed-1" / "config.yaml").read_text())
    assert final["algorithm"]["beta"] == tuning["setting"]["algorithm.beta"] and final["train"]["lr"] == tuning["setting"]["train.lr"]
    assert final["train"]["budget"] == {"examples": 6.0} and final["train"]["seed"] == 1
    rows = {row["algorithm"]: row for row in board["rows"]}
    assert rows["dpo"]["budget_held"] == "8 / 6"  # 4 pairs a step: the second step spends the budget
    assert rows["dpo"]["budget"]["optimizer_steps"] == 2  # the steps taken, not the cap of 20
    assert rows["dpo"]["interval"] == "seeds and prompts" and len(rows["dpo"]["gold"]["ci"]) == 2
    vs_sft = [p for p in board["pairwise"] if p["a"] == "dpo" and p["b"] == "sft-baseline"]
    assert len(vs_sft) == 1 and vs_sft[0]["verdict"] in ("better", "worse", "tie")
    assert [e["algorithm"] for e in board["frontier"]] == ["dpo"]
    md = (out / "leaderboard.md").read_text()
    assert "## Tuning" in md and "## Matched-KL frontier" in md and "## Pairs" in md and "| 8 / 6 |" in md


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_unknown_algorithm_runs_nothing(env, tmp_path):
    r = bench("--algorithms", "dpo,dpoo", "--out", str(tmp_path / "b"), env=env)
    assert r.returncode == 2
    assert "'dpoo' is not registered. Did you mean 'dpo'?" in r.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_crashing_algorithm_is_marked_failed_and_others_finish(env, tmp_path):
    # KTO needs two examples per micro-batch for its KL estimate: batch_size 1 makes it fail.
    out = tmp_path / "b"
    r = bench("--algorithms", "kto,slic-hf", "--seeds", "1", "--out", str(out), "--reward", "gold", *TINY, "--set", "train.batch_size=1",
              "--jobs", "2", env=env)
    assert r.returncode == 1
    rows = {row["algorithm"]: row for row in json.loads((out / "leaderboard.json").read_text())["rows"]}
    assert rows["kto"]["status"] == "failed" and rows["kto"]["errors"]
    assert rows["slic-hf"]["status"] == "ok"


# ---------------------------------------------------------------------------- a task without a gold reward (hh-rlhf)


def test_default_algorithms_without_a_gold_reward_are_the_offline_ones_and_the_reward_model():
    assert default_algorithms({"name": "hh-rlhf", **HH_TASK}) == ["bradley-terry", "dpo", "ipo", "kto"]
    assert default_algorithms({"name": "sentiment"}) == builtin_algorithms()  # gold reward: every contender


def test_pair_accuracy_is_read_with_the_keys_a_plugin_declares():
    dpo, rm = registry.get("objective", "dpo").cls.bench, registry.get("objective", "bradley-terry").cls.bench
    assert dpo.pair_accuracy_of({"implicit_reward_accuracy": 0.75, "implicit_reward_pairs": 8.0, "kl": 0.1}) == (0.75, 8.0)
    assert dpo.pair_accuracy_of({"accuracy": 0.6, "n_pairs": 10.0}) is None  # not its keys
    assert rm.pair_accuracy_of({"accuracy": 0.6, "n_pairs": 10.0}) == (0.6, 10.0)
    assert rm.pair_accuracy_of({"accuracy": float("nan"), "n_pairs": 10.0}) is None
    assert BenchProtocol().pair_accuracy_of({"accuracy": 0.6}) is None  # declares none: a sampled row
    assert rm.evaluation == "scorer" and dpo.evaluation == "sampled"


def test_bench_protocol_declarations_are_checked():
    with pytest.raises(ValueError, match="kl_knob and kl_sweep together"):
        BenchProtocol(kl_knob="beta")
    with pytest.raises(ValueError, match="'sampled' or 'scorer'"):
        BenchProtocol(evaluation="pairs")
    for kind in ("objective", "policy"):  # every declared knob is an option of its plugin
        for e in registry.entries(kind):
            if e.cls.bench is not None and e.cls.bench.kl_knob:
                assert e.cls.bench.kl_knob in e.cls.Config.model_fields, (e.name, e.cls.bench.kl_knob)
            if e.cls.bench is not None:
                assert set(e.cls.bench.options) <= set(e.cls.Config.model_fields), e.name


def test_markdown_without_gold():
    rows = [
        {"algorithm": "dpo", "status": "ok", "pair_accuracy": {"mean": 0.75, "ci95": float("nan"), "pair_se": 0.1}, "elo": None},
        {"algorithm": "sft-baseline", "status": "ok", "kl": {"mean": 0.0, "ci95": float("nan"), "prompt_se": 0.0}, "elo": None},
    ]
    md = markdown(rows, {"task": "hh-rlhf", "date": "today", "machine": "here", "command": "rlhfzoo bench --task hh-rlhf"})
    assert "| pair acc. |" in md
    assert "| – | dpo | – | – | – | – | 0.750 ± 0.196 | – | – | – |" in md  # rank, gold, IQM, proxy, KL: none without gold
    assert "| sft-baseline | – | – | – | 0.00 ± 0.00 | – |" in md


@pytest.mark.slow
def test_bench_hh_reports_pair_accuracy(tmp_path):
    """`--task hh-rlhf` end to end, kept small without touching the library: the task reads a
    48-pair slice of the shared sample, every policy starts from a tiny scratch model (no SFT
    stage), and the baseline's proxy reward is a reward model trained here for two steps (no
    reward-model stage)."""
    from rlhfzoo.config import load_config
    from rlhfzoo.testing import TINY_POLICY
    from rlhfzoo.trainer import Trainer

    rm = tmp_path / "rm"
    Trainer(load_config(data={
        "task": {"name": "hh-rlhf", **HH_TASK}, "policy": dict(TINY_POLICY), "algorithm": {"name": "bradley-terry"},
        "train": {"steps": 2, "batch_size": 4, "eval_prompts": 0, "progress": False}, "output_dir": str(rm),
    }), log=lambda *_: None).fit()
    sets = [f"task.{k}={v}" for k, v in HH_TASK.items()] + [f"policy.{k}={v}" for k, v in TINY_POLICY.items()]
    sets += ["reward.name=reward-model", f"reward.path={rm / 'policy'}", "train.steps=2", "train.batch_size=4"]
    out = tmp_path / "bench"
    args = ["--task", "hh-rlhf", "--algorithms", "dpo,bradley-terry", "--seeds", "1", "--eval-prompts", "8", "--out", str(out), "--jobs", "2"]
    r = bench(*args, *[x for s in sets for x in ("--set", s)], env=dict(os.environ))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    rows = json.loads((out / "leaderboard.json").read_text())["rows"]
    assert [row["algorithm"] for row in rows][-1] == "sft-baseline"  # no pair accuracy: sorted last
    rows = {row["algorithm"]: row for row in rows}
    assert set(rows) == {"sft-baseline", "dpo", "bradley-terry"}
    for name in ("dpo", "bradley-terry"):
        row = rows[name]
        assert row["status"] == "ok" and "gold" not in row
        assert 0.0 <= row["pair_accuracy"]["mean"] <= 1.0 and len(row["pair_accuracy"]["per_seed"]) == 1
    assert rows["dpo"]["objective_eval"]["implicit_reward_pairs"] == 12  # the held-out pairs: 25 % of 48
    assert rows["bradley-terry"]["objective_eval"]["n_pairs"] == 12
    assert "kl" not in rows["bradley-terry"] and "kl" in rows["dpo"]  # a reward model is scored, not sampled
    assert "pair_accuracy" not in rows["sft-baseline"]
    assert rows["sft-baseline"]["kl"]["mean"] == pytest.approx(0.0, abs=1e-4)  # its reference is its own start
    md = (out / "leaderboard.md").read_text()
    assert "pair acc." in md and "| dpo | – |" in md


def test_a_finished_run_is_reused_only_for_the_same_spec(tmp_path):
    from dataclasses import asdict

    from rlhfzoo.bench import RunSpec, same_spec

    spec = RunSpec("dpo", "dpo", "objective", 0, {"train": {"steps": 80, "lr": 3e-4}}, str(tmp_path), 200)
    path = tmp_path / "spec.json"
    assert not same_spec(path, spec)  # never run
    path.write_text(json.dumps(asdict(spec), indent=1))
    assert same_spec(path, spec)
    changed = RunSpec("dpo", "dpo", "objective", 0, {"train": {"steps": 80, "lr": 1e-4}}, str(tmp_path), 200)
    assert not same_spec(path, changed)  # a new budget or config reruns the row
    older = {k: v for k, v in asdict(spec).items() if k != "eval_offset"}  # written before RunSpec had the field
    path.write_text(json.dumps(older))
    assert same_spec(path, spec) and not same_spec(path, RunSpec(**{**asdict(spec), "eval_offset": 200}))
    path.write_text(json.dumps({**older, "unknown": 1}))
    assert not same_spec(path, spec)
    path.write_text("{not json")
    assert not same_spec(path, spec)


def test_mean_ci_by_hand():
    import math

    from rlhfzoo.bench_stats import mean_ci

    m, se, ci = mean_ci([1.0, 2.0, 4.0])  # sd = sqrt((16/9 + 1/9 + 25/9) / 2) = sqrt(7/3)
    assert m == pytest.approx(7 / 3) and se == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))
    assert ci == pytest.approx(4.3027 * se, rel=1e-4)  # t(0.975, 2 dof) = 4.3027
    assert mean_ci([1.0])[0] == 1.0 and math.isnan(mean_ci([1.0])[1]) and math.isnan(mean_ci([1.0])[2])
    assert all(math.isnan(x) for x in mean_ci([]))
