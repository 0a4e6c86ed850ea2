"""The trainer: end-to-end SFT, atomic checkpoints, kill-and-resume, NaN handling, mixed precision
(two processes: test_distributed.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhfzoo import hookimpl
from rlhfzoo.config import load_config
from rlhfzoo.interfaces import LossOutput, Objective
from rlhfzoo.registry import registry
from rlhfzoo.testing import TINY_POLICY
from rlhfzoo.trainer import NonFiniteError, Trainer, TrainingError, global_batch, latest_checkpoint

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def tiny_sft(out, **train):
    return {
        "task": {"name": "sentiment"},
        "policy": dict(TINY_POLICY),
        "algorithm": {"name": "sft"},
        "train": {"steps": 6, "batch_size": 4, "lr": 3e-3, "eval_prompts": 0, "progress": False, **train},
        "output_dir": str(out),
    }


def weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "policy" / "model.safetensors"))


def test_global_batch_is_a_function_of_the_step():
    n, b = 10, 4
    rows = [global_batch(n, b, s, seed=1) for s in range(5)]
    flat = [i for r in rows for i in r]
    assert sorted(flat[:10]) == list(range(10))  # first epoch is a permutation
    assert rows[3] == global_batch(n, b, 3, seed=1)
    assert rows != [global_batch(n, b, s, seed=2) for s in range(5)]


def test_sft_trains_and_writes_a_finished_run(tmp_path):
    out = tmp_path / "run"
    summary = Trainer(load_config(data=tiny_sft(out, eval_prompts=8))).fit()
    assert summary["finished"] and summary["step"] == 6
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "summary.json").exists() and (out / "config.yaml").exists()
    assert "gold" in json.loads((out / "summary.json").read_text())["eval"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "policy")  # loadable by transformers itself


def test_stop_and_resume_is_bit_for_bit(tmp_path):
    Trainer(load_config(data=tiny_sft(tmp_path / "a", save_every=2))).fit()
    summary = Trainer(load_config(data=tiny_sft(tmp_path / "b", save_every=2, stop_after=3))).fit()
    assert summary == {"finished": False, "step": 3}
    assert not (tmp_path / "b" / "summary.json").exists()
    Trainer(load_config(data=tiny_sft(tmp_path / "b", save_every=2))).fit(resume=True)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [json.loads(l)["loss"] for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_existing_run_is_not_clobbered(tmp_path):
    cfg = load_config(data=tiny_sft(tmp_path / "r", steps=1))
    Trainer(cfg).fit()
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(cfg).fit()


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_kill_mid_run_then_resume(tmp_path):
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(tiny_sft(out, steps=400, save_every=1)))
    proc = subprocess.Popen([str(BIN / "rlhfzoo"), "train", str(cfg_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (latest_checkpoint(out) is None or latest_checkpoint(out).name < "step-000003"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    # A checkpoint torn mid-write (no manifest) and a leftover temp dir are ignored.
    torn = out / "checkpoints" / "step-999999"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(out) == ckpt
    done = subprocess.run(
        [str(BIN / "rlhfzoo"), "train", str(cfg_path), "--resume", "train.steps=" + str(int(ckpt.name[5:]) + 2)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert f"resumed from {ckpt}" in done.stdout + done.stderr
    assert (out / "summary.json").exists()


class NaNObjective(Objective):
    name = "test-nan"
    summary = "returns NaN on its second step (test only)"
    data_kind = "demonstrations"
    calls = 0

    def loss(self, batch, policy, reference=None):
        NaNObjective.calls += 1
        lp = policy.sequence_logprobs(batch.sequences).mean()
        return LossOutput(lp * (float("nan") if NaNObjective.calls >= 2 else 1.0))


class NaNPlugin:
    @hookimpl
    def register_objectives(self, register):
        register(NaNObjective)


def test_nan_loss_stops_with_step_and_rows_and_saves_nothing(tmp_path):
    registry.register_plugin(NaNPlugin(), name="test_nan_plugin", package="tests")
    data = tiny_sft(tmp_path / "nan", save_every=1)
    data["algorithm"] = {"name": "test-nan"}
    trainer = Trainer(load_config(data=data))
    with pytest.raises(NonFiniteError, match=r"at step 2, micro-batch 0 \(dataset rows \["):
        trainer.fit()
    ckpts = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert ckpts == ["step-000001"]  # the good step only; nothing from the NaN step
    assert not (tmp_path / "nan" / "summary.json").exists()


def test_batch_size_must_split_over_processes_and_accumulation(tmp_path):
    with pytest.raises(TrainingError, match="multiple of processes x train.grad_accum"):
        Trainer(load_config(data=tiny_sft(tmp_path / "x", batch_size=6, grad_accum=4)))


@pytest.mark.slow  # a fresh process: accelerate fixes the mixed precision once per process
def test_bf16_experience_and_reference_log_probs_are_computed_as_the_loss(tmp_path):
    """Under bf16 autocast on CPU (dropout off), at step 1 the policy is the rollout policy and the
    reference: PPO's ratio is 1, its KL to the reference 0, and DPO's implicit reward margin 0 --
    the rollout, the experience (reference included) and DPO's cached reference log-probs are
    computed under the same autocast as the loss."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(HERE / "distributed_worker.py"), str(tmp_path), "bf16"], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bf16" / "result.json").read_text())
    assert result["max_abs_log_ratio"] < 1e-6
    assert result["ppo_kl"] == 0.0
    assert result["dpo_reward_margin"] == 0.0 and result["dpo_kl"] == 0.0


def poison_after_step(trainer, step, monkeypatch, where="optimizer"):
    """Make one parameter NaN right after optimizer step `step` (1-based), as an overflowing
    update would, or (where="after_step") in the objective's per-step hook."""
    param = next(iter(trainer.policy.parameters()))

    def poison():
        if trainer.step + 1 == step:  # trainer.step counts the steps finished before this one
            with torch.no_grad():
                param.fill_(float("nan"))

    if where == "optimizer":
        real_step = trainer.optimizer.step

        def step_then_poison(*args, **kwargs):
            out = real_step(*args, **kwargs)
            poison()
            return out

        monkeypatch.setattr(trainer.optimizer, "step", step_then_poison)
    else:
        real_after = trainer.objective.after_step

        def after_then_poison(metrics):
            out = real_after(metrics)
            poison()
            return out

        monkeypatch.setattr(trainer.objective, "after_step", after_then_poison)


def test_non_finite_weights_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "nan-weights"
    trainer = Trainer(load_config(data=tiny_sft(out, steps=2, save_every=1)), log=lambda *_: None)
    poison_after_step(trainer, 2, monkeypatch)
    with pytest.raises(NonFiniteError, match=r"weights are not finite after step 2.*train\.lr"):
        trainer.fit()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    assert not (out / "policy").exists() and not (out / "summary.json").exists()


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    """Weights that turn NaN outside the optimizer step (an objective's hook) are caught before a save."""
    out = tmp_path / "nan-hook"
    trainer = Trainer(load_config(data=tiny_sft(out, steps=3, save_every=1)), log=lambda *_: None)
    poison_after_step(trainer, 2, monkeypatch, where="after_step")
    with pytest.raises(NonFiniteError, match=r"not finite.*step 2"):
        trainer.fit()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]


def test_weight_check_tells_huge_finite_weights_from_inf_and_nan(tmp_path):
    """The check's fast path (L2 norms) overflows on weights of 1e30 (their squares are inf in fp32):
    those are finite and pass; one -inf or NaN weight, among finite ones, does not."""
    trainer = Trainer(load_config(data=tiny_sft(tmp_path / "check")), log=lambda *_: None)
    param = next(iter(trainer.policy.parameters()))
    with torch.no_grad():
        param.fill_(1e30)
        trainer.check_weights("now")
        for bad in (float("-inf"), float("nan")):
            param.view(-1)[1] = bad
            with pytest.raises(NonFiniteError, match="weights are not finite now"):
                trainer.check_weights("now")


def test_fp16_without_a_gpu_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainingError, match=r"train\.mixed_precision=fp16 needs a CUDA GPU.*bf16"):
        Trainer(load_config(data=tiny_sft(tmp_path / "fp16", mixed_precision="fp16")))


def test_budget_counters_survive_a_resume(tmp_path):
    """summary.json counts the work of the whole run, not of the last invocation."""
    def online(out, **train):
        data = tiny_sft(out, steps=3, save_every=1, **train)
        data["algorithm"] = {"name": "rejection-sampling", "n_samples": 2, "minibatch_size": 2}
        data["policy"]["max_new_tokens"] = 4
        data["reward"] = {"name": "gold"}
        return load_config(data=data)

    whole = Trainer(online(tmp_path / "whole"), log=lambda *_: None).fit()
    Trainer(online(tmp_path / "parts", stop_after=2), log=lambda *_: None).fit()
    parts = Trainer(online(tmp_path / "parts"), log=lambda *_: None).fit(resume=True)
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "parts")]
    assert summaries[0]["counters"]["train_tokens"] > 0 and summaries[0]["counters"]["generated_tokens"] > 0
    assert summaries[1]["counters"] == summaries[0]["counters"]
    assert summaries[1]["reward_source"]["reward_calls"] == summaries[0]["reward_source"]["reward_calls"] == 3 * 4 * 2
    assert parts["counters"] == whole["counters"]
