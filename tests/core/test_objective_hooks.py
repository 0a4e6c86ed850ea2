"""The Objective hook contract as the trainer keeps it: `begin_step` once per optimizer step before its
losses, with all its micro-batches (the objects `loss` then receives, on the device), and
`after_step` once per optimizer step (offline and online), `after_iteration` once per online
iteration (never offline), `minibatches` given the
policy, `samples_per_prompt()` rollouts per prompt, the reference model freed when
`reference_needed_in_training()` says so, and the reward source's interface forwarded by the
trainer's counting wrapper."""

import math

import pytest
import torch

from rlhfzoo import hookimpl
from rlhfzoo.config import load_config
from rlhfzoo.counting_reward import CountingReward
from rlhfzoo.interfaces import RewardSource
from rlhfzoo.plugins.ppo import PPOClip
from rlhfzoo.plugins.rejection_sampling import RejectionSampling
from rlhfzoo.plugins.sft import SFT
from rlhfzoo.registry import registry
from rlhfzoo.testing import TINY_POLICY
from rlhfzoo.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class RecordingOffline(SFT):
    name = "test-hooks-offline"
    summary = "SFT recording the hooks the trainer calls (test only)"

    def __init__(self, config=None):
        super().__init__(config)
        self.calls: list[tuple[str, object]] = []
        self.step_batches: list = []  # the micro-batches `begin_step` saw, awaiting their losses

    def begin_step(self, batches, policy, reference):
        self.calls.append(("begin", [str(b.sequences.input_ids.device) for b in batches]))
        self.step_batches = list(batches)

    def loss(self, batch, policy, reference=None):
        assert batch is self.step_batches.pop(0), "loss got a micro-batch that begin_step did not see, or out of order"
        return super().loss(batch, policy, reference)

    def after_step(self, metrics):
        assert not self.step_batches, "begin_step saw micro-batches whose loss was never taken"
        self.calls.append(("step", dict(metrics)))
        return {"after_step_calls": float(sum(kind == "step" for kind, _ in self.calls))}

    def after_iteration(self, metrics):
        self.calls.append(("iteration", dict(metrics)))
        return {}


class RecordingOnline(RejectionSampling):
    name = "test-hooks-online"
    aliases = ()
    summary = "rejection sampling recording the hooks the trainer calls (test only)"

    def __init__(self, config=None):
        super().__init__(config)
        self.calls: list[tuple[str, object]] = []

    def minibatches(self, kept, policy):
        self.calls.append(("minibatches", policy))
        yield from super().minibatches(kept, policy)

    def begin_step(self, batches, policy, reference):
        self.calls.append(("begin", len(batches)))

    def after_step(self, metrics):
        self.calls.append(("step", dict(metrics)))
        return {}

    def after_iteration(self, metrics):
        self.calls.append(("iteration", self.last_metrics["kept"]))
        return super().after_iteration(metrics)


class KeepsReference(SFT):
    name = "test-hooks-keeps-reference"
    summary = "needs the reference model while training (test only)"
    needs_reference = True

    def prepare(self, data, collate, reference):
        self.prepared_with = reference


class FreesReference(KeepsReference):
    name = "test-hooks-frees-reference"
    summary = "needs the reference model in prepare only (test only)"

    def reference_needed_in_training(self):
        return False


class HookPlugin:
    @hookimpl
    def register_objectives(self, register):
        for cls in (RecordingOffline, RecordingOnline, KeepsReference, FreesReference):
            register(cls)


@pytest.fixture(scope="module", autouse=True)
def hook_objectives():
    registry.register_plugin(HookPlugin(), name="test_objective_hooks", package="tests")


def run_config(out, algorithm, reward=None, **train):
    data = {
        "task": {"name": "sentiment"},
        "policy": {**TINY_POLICY, "max_new_tokens": 6},
        "algorithm": algorithm,
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "eval_prompts": 0, "progress": False, **train},
        "output_dir": str(out),
    }
    if reward:
        data["reward"] = {"name": reward}
    return load_config(data=data)


def test_offline_after_step_once_per_optimizer_step_and_no_iterations(tmp_path):
    trainer = Trainer(run_config(tmp_path / "off", {"name": "test-hooks-offline"}, grad_accum=2), log=lambda *_: None)
    trainer.fit()
    calls = trainer.objective.calls
    assert [kind for kind, _ in calls] == ["begin", "step"] * 3  # 3 steps of 2 micro-batches each, no iteration
    device = str(trainer.accelerator.device)
    assert all(devices == [device, device] for kind, devices in calls if kind == "begin")  # both, moved for the loss
    assert all({"loss", "nll", "grad_norm"} <= set(m) for kind, m in calls if kind == "step")  # the step's own metrics
    logged = [row["after_step_calls"] for row in trainer_rows(tmp_path / "off")]
    assert logged == [1.0, 2.0, 3.0]  # what after_step returns is logged with the step


def test_online_after_step_per_optimizer_step_then_after_iteration(tmp_path):
    algorithm = {"name": "test-hooks-online", "n_samples": 2, "minibatch_size": 2}
    trainer = Trainer(run_config(tmp_path / "on", algorithm, reward="gold", steps=2), log=lambda *_: None)
    trainer.fit()
    calls = trainer.objective.calls
    iterations = [i for i, (kind, _) in enumerate(calls) if kind == "iteration"]
    assert len(iterations) == 2  # once per iteration (train.steps counts iterations online)
    start = 0
    for end in iterations:
        kinds = [kind for kind, _ in calls[start:end]]
        kept = calls[end][1]
        assert kinds[0] == "minibatches" and calls[start][1] is trainer.policy  # minibatches gets the policy
        assert kinds[1:] == ["begin", "step"] * math.ceil(kept / 2)  # begin_step and after_step per optimizer step
        assert all(n == 1 for kind, n in calls[start + 1 : end] if kind == "begin")  # minibatches of 2, one micro-batch
        start = end + 1
    assert trainer.reward.calls == 2 * 4 * 2  # samples_per_prompt() = n_samples rollouts of every prompt


def test_ppo_early_stop_reads_the_steps_kl_through_after_step(tmp_path):
    """The KL that stops PPO's epochs is the step's approx_kl averaged over its micro-batches, as
    `after_step` receives it: a step whose mean passes 1.5 x target_kl ends the iteration."""
    seen: list[float] = []
    real = PPOClip.after_step

    def spy(self, metrics):
        seen.append(metrics["approx_kl"])
        return real(self, metrics)

    algorithm = {"name": "ppo-clip", "epochs": 3, "minibatch_size": 4, "micro_batch_size": 2, "target_kl": 1e-9}
    trainer = Trainer(run_config(tmp_path / "ppo", algorithm, reward="gold", steps=1, batch_size=8), log=lambda *_: None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PPOClip, "after_step", spy)
        trainer.fit()
    # The first step runs before any update (approx KL ~ 0), the second after one: it stops there,
    # in the first of the 3 epochs of 2 minibatches.
    assert len(seen) == 2 and seen[0] <= 1.5e-9 < seen[1]
    row = trainer_rows(tmp_path / "ppo")[-1]
    assert row["early_stopped"] == 1.0 and row["ppo_epochs"] == 0.0
    assert row["approx_kl"] == pytest.approx((seen[0] + seen[1]) / 2)  # logged: the mean over the steps


def test_reference_freed_when_the_objective_no_longer_needs_it(tmp_path):
    kept = Trainer(run_config(tmp_path / "keep", {"name": "test-hooks-keeps-reference"}), log=lambda *_: None)
    freed = Trainer(run_config(tmp_path / "free", {"name": "test-hooks-frees-reference"}), log=lambda *_: None)
    assert kept.objective.prepared_with is not None and kept.reference is kept.objective.prepared_with
    assert freed.objective.prepared_with is not None and freed.reference is None
    assert freed.reference_for_eval() is not None  # built again for the evaluations that need it


def test_dpo_frees_the_reference_only_when_cached(tmp_path):
    for mode, needed in (("cached", False), ("model", True)):
        cfg = run_config(tmp_path / mode, {"name": "dpo", "reference": mode}, steps=1)
        trainer = Trainer(cfg, log=lambda *_: None)
        assert trainer.objective.reference_needed_in_training() is needed
        assert (trainer.reference is not None) is needed


class Judge(RewardSource):
    name = "test-judge"

    def score(self, prompts, responses):
        return torch.zeros(len(responses))

    def compare(self, prompts, responses_a, responses_b):
        return torch.tensor([1.0 if len(a) > len(b) else -1.0 for a, b in zip(responses_a, responses_b)])


class Scorer(RewardSource):
    name = "test-scorer"

    def score(self, prompts, responses):
        return torch.ones(len(responses))


def test_counting_reward_forwards_the_interface_and_counts_scores():
    judge = CountingReward(Judge())
    assert judge.compare(["q", "q"], ["long", "a"], ["b", "longer"]).tolist() == [1.0, -1.0]
    judge.score(["q"] * 3, ["a", "b", "c"])
    assert judge.calls == 3 and judge.metrics() == {"reward_calls": 3.0}
    assert judge.name == "test-judge" and judge.config is judge.inner.config
    with pytest.raises(NotImplementedError, match="does not compare responses pairwise"):
        CountingReward(Scorer()).compare(["q"], ["a"], ["b"])
    with pytest.raises(AttributeError):
        judge.not_an_interface_method  # noqa: B018  (nothing else is forwarded implicitly)


def trainer_rows(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
