"""Two CPU processes (torchrun, gloo) on a tiny Llama: every collective is reached by every rank,
the step's gradient is that of one process on the same global batch, and everything that steers
training (gradients, the adaptive KL coefficient, PPO-penalty's beta, reward statistics, early
stopping, the steps of rejection sampling) stays the same on both ranks.

One torchrun launch runs all the scenarios of distributed_worker.py (a launch costs ~15 s); the
tests below read what each rank wrote. A deadlock shows as the launch running into its timeout.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))  # the worker, run by torchrun, is also the library of its runs

from distributed_worker import trainer  # noqa: E402
from test_grad_accum import nudge, offline_batches, reference_further_away  # noqa: E402

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-processes")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", str(HERE / "distributed_worker.py"), str(out)]
    done = subprocess.run([*cmd, "sft", "ilql", "kto", "ppo", "ppo-penalty", "rs", "grpo", "online-dpo"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def ranks(run: Path, what: str):
    if what == "params":
        return [torch.load(run / f"params-rank{r}.pt") for r in (0, 1)]
    return [json.loads((run / f"result-rank{r}.json").read_text()) for r in (0, 1)]


def assert_same_weights(run: Path) -> None:
    a, b = ranks(run, "params")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"the ranks' weights differ at {k}"


def test_llama_run_with_periodic_and_final_evaluation_finishes(runs):
    run = runs / "sft"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == 2 and "gold" in summary["eval"]
    assert (run / "policy" / "model.safetensors").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "eval/gold" in rows[0]  # eval_every: 1, on step 1 (not on the last, which the final evaluation covers)
    assert_same_weights(run)
    a, b = (r["counters"] for r in ranks(run, "results"))  # the budget is every process's, not rank 0's
    assert a["train_tokens"] > 0 and b["train_tokens"] > 0
    assert summary["counters"]["train_tokens"] == a["train_tokens"] + b["train_tokens"]


def test_two_processes_compute_the_gradient_of_one_process(runs, tmp_path):
    """Step 1 of SFT on sequences of unequal lengths: 2 processes x 1 micro-batch of 4 rows, 1 process
    x 1 micro-batch of 8 rows and 1 process x 2 micro-batches of 4 rows give the same gradient."""
    two = [torch.load(runs / "sft" / f"grad-rank{r}.pt") for r in (0, 1)]
    assert torch.equal(two[0], two[1])
    for grad_accum in (1, 2):
        t = trainer(tmp_path / f"one-{grad_accum}", {"name": "sft"})
        batches = offline_batches(t)(8 // grad_accum)  # step 1's rows, as the trainer cuts them
        t.backward(batches)
        one = torch.cat([p.grad.flatten() for p in t.policy.parameters()])
        rel = ((two[0] - one).norm() / one.norm()).item()
        assert rel < 1e-6, f"2 processes vs 1 process x {grad_accum} micro-batches: relative difference {rel:.2e}"


def test_kto_reference_point_is_that_of_the_whole_step(runs, tmp_path):
    """Step 1 of KTO (policy and reference moved apart), 2 processes x 2 micro-batches of 2 rows:
    every micro-batch of both ranks uses one z0, the mean over all 8 mismatched pairs, and the
    gradient is that of 1 process x 1 micro-batch of 8 rows (and x 2 of 4), with the same z0."""
    a, b = ranks(runs / "kto", "results")
    assert a["z0"] == b["z0"] and len(set(a["z0"])) == 1  # one z0 on both ranks, for both micro-batches
    two = [torch.load(runs / "kto" / f"grad-rank{r}.pt") for r in (0, 1)]
    assert torch.equal(two[0], two[1])
    for grad_accum in (1, 2):
        t = trainer(tmp_path / f"one-{grad_accum}", {"name": "kto", "beta": 0.5})
        reference_further_away(t)
        nudge(t)
        metrics = t.backward(offline_batches(t)(8 // grad_accum))
        assert metrics["kl_estimate"] > 0.01, "z0 is clamped at 0: the test checks nothing about it"
        assert a["z0"][0] == pytest.approx(metrics["kl_estimate"], rel=1e-5)
        one = torch.cat([p.grad.flatten() for p in t.policy.parameters()])
        rel = ((two[0] - one).norm() / one.norm()).item()
        assert rel < 1e-6, f"2 processes vs 1 process x {grad_accum} micro-batches: relative difference {rel:.2e}"


def test_ilql_ranks_stay_identical(runs):
    """ILQL's loss runs on the bare module (outside the DDP wrapper): the trainer averages its gradients."""
    assert json.loads((runs / "ilql" / "summary.json").read_text())["finished"]
    assert_same_weights(runs / "ilql")


def test_ppo_statistics_are_global(runs):
    run = runs / "ppo"
    a, b = ranks(run, "results")
    assert a == b  # objective state (KL controller, reward statistics), steps taken, early stop
    assert_same_weights(run)
    state = a["objective"]
    assert state["reward_moments"]["count"] == 16  # 2 iterations x 8 samples of both ranks
    # Ziegler et al.'s update from the logged (global) KL of each iteration, with n = 8 samples.
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    beta = 0.1
    for row in rows:
        assert row["kl_coef"] == pytest.approx(beta, rel=1e-9)
        beta *= 1 + min(max(row["kl"] / 6.0 - 1, -0.2), 0.2) * 8 / 100
    assert state["kl_ctl"]["value"] == pytest.approx(beta, rel=1e-9)
    assert a["steps"] < 2 * 2 * 2, "target_kl never stopped an iteration early: the test checks nothing about it"


def test_ppo_penalty_beta_is_global(runs):
    """Also the run with two micro-batches per step (the first under `no_sync`)."""
    a, b = ranks(runs / "ppo-penalty", "results")
    assert a == b  # beta, the KL it was adapted from, steps taken
    assert_same_weights(runs / "ppo-penalty")


def test_rejection_sampling_ranks_take_the_same_steps(runs):
    """Each rank keeps its own number of responses; all take the steps of the one that kept the most."""
    a, b = ranks(runs / "rs", "results")
    assert a["kept"] != b["kept"], "the ranks kept as many responses: the test checks nothing"
    assert a["steps"] == b["steps"] == sum(max(x, y) for x, y in zip(a["kept"], b["kept"]))  # minibatch_size 1
    assert_same_weights(runs / "rs")


@pytest.mark.parametrize("scenario", ["grpo", "online-dpo"])
def test_group_sampled_objectives_take_the_same_steps_on_every_rank(runs, scenario):
    """GRPO drops tied groups and online DPO tied pairs on each rank separately; every rank takes
    the steps of the one that kept the most (minibatches of 1) and the weights stay identical."""
    a, b = ranks(runs / scenario, "results")
    assert a["kept"] != b["kept"], "the ranks kept as many samples: the test checks nothing"
    assert a["steps"] == b["steps"] == sum(max(x, y) for x, y in zip(a["kept"], b["kept"]))
    assert_same_weights(runs / scenario)
