"""`rlhfzoo bench` end to end with two tiny objectives, one of them the third-party example plugin:
every output exists, the JSON carries every field for every row, the PNGs are real images,
resuming skips finished runs, unknown names run nothing, a crashing algorithm is marked failed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "rlhfzoo-slic"
RLHFZOO = str(Path(sys.executable).parent / "rlhfzoo")
ROW_FIELDS = {"algorithm", "name", "kind", "seeds", "seeds_ok", "status", "gold", "kl", "elo", "wall_seconds", "peak_rss_mb", "budget"}
TINY = ["--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "train.eval_every=1", "--eval-prompts", "24"]


@pytest.fixture
def env(example_plugin_env):
    return example_plugin_env


def bench(*args, env):
    return subprocess.run([RLHFZOO, "bench", *args], capture_output=True, text=True, env=env, timeout=1500)


@pytest.mark.slow
def test_bench_outputs_and_resume(env, tmp_path):
    out = tmp_path / "bench"
    r = bench("--task", "sentiment", "--algorithms", "slic-hf,dpo", "--seeds", "1", "--out", str(out), "--reward", "gold", *TINY, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for f in ("leaderboard.json", "leaderboard.md", "frontier.png", "curves.png"):
        assert (out / f).exists(), f
    for png in ("frontier.png", "curves.png"):
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


def test_unknown_algorithm_runs_nothing(env, tmp_path):
    r = bench("--algorithms", "dpo,dpoo", "--out", str(tmp_path / "b"), env=env)
    assert r.returncode == 2
    assert "'dpoo' is not registered. Did you mean 'dpo'?" in r.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_crashing_algorithm_is_marked_failed_and_others_finish(env, tmp_path):
    # KTO needs two examples per micro-batch for its KL estimate: batch_size 1 makes it fail.
    out = tmp_path / "b"
    r = bench("--algorithms", "kto,slic-hf", "--seeds", "1", "--out", str(out), "--reward", "gold", *TINY, "--set", "train.batch_size=1", env=env)
    assert r.returncode == 1
    rows = {row["algorithm"]: row for row in json.loads((out / "leaderboard.json").read_text())["rows"]}
    assert rows["kto"]["status"] == "failed" and rows["kto"]["errors"]
    assert rows["slic-hf"]["status"] == "ok"
