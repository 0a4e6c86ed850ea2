"""Gradient accumulation is exact: the same global batch gives the same gradient whatever the number
of micro-batches it is cut into, for every objective, on sequences of unequal lengths.

Token-level losses (SFT, rejection sampling, ILQL, the PPO/A2C terms, ORPO's NLL) are token means
over the whole optimizer step (`rlhfzoo.ops.step_denominator`; GRPO's and RLOO's steps carry their
own sequence and token totals); sequence-level ones (DPO, IPO, SimPO, ORPO's odds-ratio term) are
means over equal-sized micro-batches, exact as they are. The model is in float64, so that the only differences
left are summation order (~1e-16), far below the 1e-6 asked and the 1e-2 to 3e-1 that per-micro-batch
means gave. (The process-count half of the equivalence is in test_distributed.py.)

Not here: KTO, whose reference point z0 is a statistic of each micro-batch (averaged over processes),
as in the paper's per-batch estimate, so its gradient depends on the micro-batch size by design; and
PPO-ptx's pretraining term, a mean over demonstrations drawn afresh for every micro-batch; and online
DPO, whose scratch-policy samples all tie under the gold reward (no pair to train on; its steps'
mean over every process's pairs is checked in tests/plugins/test_online_dpo.py).
"""

import random

import pytest
import torch

from rlhfzoo.config import load_config
from rlhfzoo.interfaces import Batch, SequenceBatch
from rlhfzoo.ops import masked_mean, set_step_tokens, step_denominator
from rlhfzoo.plugins.group_relative import GroupExperience
from rlhfzoo.plugins.sentiment import SentimentTask, continue_review
from rlhfzoo.testing import TINY_POLICY, DistinctScores
from rlhfzoo.trainer import Trainer, global_batch

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = 8  # the global batch; cut into 1, 2 and 4 micro-batches of 8, 4 and 2 rows
SMALL = {"n_demonstrations": 32, "n_test_demonstrations": 8, "n_prompts": 16, "n_test_prompts": 8}


class RandomSamplesSentiment(SentimentTask):
    """`sentiment` with random reviews standing in for its SFT policy's samples: every data kind,
    small, and no stage to build."""

    def samples(self, split="train"):
        prompts = self.examples("prompts", split)
        rng = random.Random(split)
        return prompts, [[continue_review(rng, p) for _ in range(4)] for p in prompts]

    def stages_for(self, kind):
        return []


def trainer_for(algorithm: str, out, **options) -> Trainer:
    data = {
        "task": {"name": "sentiment", **SMALL},
        "policy": {**TINY_POLICY, "arch": "llama"},
        "algorithm": {"name": algorithm, **options},
        "train": {"steps": 1, "batch_size": ROWS, "lr": 1e-3, "eval_prompts": 0, "progress": False},
        "output_dir": str(out),
    }
    if algorithm in ("ppo-clip", "ppo-penalty", "a2c", "rejection-sampling", "grpo", "rloo"):
        data["reward"] = {"name": "gold"}
    trainer = Trainer(load_config(data=data), log=lambda *_: None, task=RandomSamplesSentiment(SentimentTask.Config(**SMALL)))
    trainer.policy.module.double()  # the same parameters (the optimizer's), in float64
    return trainer


def offline_batches(trainer: Trainer):
    rows = global_batch(len(trainer.data), ROWS, 0, trainer.train.seed)

    def split(m: int) -> list[Batch]:
        return [trainer.collator([(i, trainer.data[i]) for i in rows[k : k + m]]) for k in range(0, ROWS, m)]

    return split


def online_batches(trainer: Trainer):
    """The micro-batches of one step of the objective's experience (built once, from one rollout)."""
    k = trainer.objective.samples_per_prompt()
    prompts = [trainer.data[i] for i in global_batch(len(trainer.data), ROWS // k, 0, trainer.train.seed) for _ in range(k)]
    torch.manual_seed(0)
    rollout = trainer.policy.generate(prompts)
    # The gold reward of a scratch policy's samples ties within groups (GRPO, RLOO: no advantage but
    # rounding noise); the hash term of `DistinctScores` sets them apart.
    rewards = DistinctScores(trainer.reward).score(rollout.prompts, rollout.responses)
    experience = trainer.objective.make_experience(rollout, rewards, trainer.policy, trainer.reference)
    if isinstance(experience, SequenceBatch):  # rejection sampling: the kept responses
        assert len(experience) == ROWS

        def split(m: int) -> list[Batch]:
            parts = [torch.arange(k, k + m) for k in range(0, ROWS, m)]
            return [Batch(SequenceBatch(*(t[r] for t in (experience.input_ids, experience.attention_mask, experience.response_mask))), r) for r in parts]

        return split
    if isinstance(experience, GroupExperience):  # its steps carry their totals: cut by the objective itself

        def cut(m: int) -> list[Batch]:
            trainer.objective.config.micro_batch_size = m
            return next(iter(trainer.objective.minibatches(experience, trainer.policy)))

        return cut
    return lambda m: [experience.batch(torch.arange(k, k + m)) for k in range(0, ROWS, m)]


@torch.no_grad()
def nudge(trainer: Trainer) -> None:
    """Move the policy off its initial weights (off the reference, off the rollout's policy) so that
    no term is at a special point (ratio 1, log-ratio 0, value 0)."""
    g = torch.Generator().manual_seed(1)
    for p in trainer.policy.parameters():
        if p.requires_grad:
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def gradient(trainer: Trainer, batches: list[Batch]) -> torch.Tensor:
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.backward(batches)
    return torch.cat([p.grad.flatten() for p in trainer.policy.parameters() if p.grad is not None])


CASES = {
    "sft": {},
    "dpo": {},
    "ipo": {},
    "ilql": {"cql_weight": 0.1, "awac_weight": 1.0},  # every term, the LM's NLL included
    "rejection-sampling": {"n_samples": 1},
    "ppo-clip": {"value_clip": 0.1},
    "ppo-penalty": {},
    "a2c": {"ent_coef": 0.01},  # with the KL in the loss (a2c's default) and an entropy bonus
    "simpo": {},
    "orpo": {"lam": 0.5},  # the chosen responses' NLL (token mean over the step) and the odds-ratio term
    "grpo": {"group_size": 2, "loss_type": "bnpo", "beta": 0.1},
    "rloo": {"group_size": 2, "clip_eps": 0.2},
}


@pytest.mark.parametrize("algorithm", list(CASES))
def test_gradient_does_not_depend_on_the_number_of_micro_batches(algorithm, tmp_path):
    trainer = trainer_for(algorithm, tmp_path / algorithm, **CASES[algorithm])
    split = online_batches(trainer) if trainer.objective.online else offline_batches(trainer)
    nudge(trainer)
    tokens = [int(b.sequences.response_mask[:, 1:].sum()) for b in split(2)]
    assert len(set(tokens)) > 1, f"the micro-batches must differ in length for the test to mean anything: {tokens}"
    whole = gradient(trainer, split(ROWS))
    assert whole.norm() > 0
    for m in (ROWS // 2, ROWS // 4):
        g = gradient(trainer, split(m))
        rel = ((g - whole).norm() / whole.norm()).item()
        assert rel < 1e-6, f"{algorithm}: {ROWS // m} micro-batches change the gradient by {rel:.2e} (relative)"


def test_the_step_metrics_are_the_step_token_means(tmp_path):
    """The logged loss of a step is its token mean, however it is split (here the SFT NLL)."""
    trainer = trainer_for("sft", tmp_path / "sft")
    split = offline_batches(trainer)
    losses = [trainer.backward(split(m))["loss"] for m in (ROWS, ROWS // 4)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-12)


def test_step_denominator_makes_the_average_of_micro_batch_losses_the_step_token_mean():
    def batch(response_mask):
        mask = torch.tensor(response_mask)
        return Batch(SequenceBatch(torch.zeros_like(mask), torch.ones_like(mask), mask), torch.arange(len(mask)))

    a = batch([[0, 1, 1, 1]])  # 3 tokens whose log-prob is taken (response_mask[:, 1:])
    b = batch([[0, 0, 0, 1], [0, 1, 0, 0]])  # 1 + 1
    assert step_denominator(a, torch.tensor(3.0)) == 3.0  # outside a trainer: the batch's own count
    assert step_denominator(a, torch.tensor(0.0)) == 1.0  # (clamped: a batch without tokens has loss 0)
    set_step_tokens([a, b])
    assert step_denominator(a, torch.tensor(3.0)) == step_denominator(b, torch.tensor(2.0)) == 5 / 2
    # Token losses 1, 2, 3 in a and 4, 5 in b: the trainer's average of the two losses is the step's mean, 3.
    losses = [
        masked_mean(x, m.sequences.response_mask[:, 1:], count=step_denominator(m, m.sequences.response_mask[:, 1:].sum()))
        for x, m in ((torch.tensor([[1.0, 2.0, 3.0]]), a), (torch.tensor([[9.0, 9.0, 4.0], [5.0, 9.0, 9.0]]), b))
    ]
    assert [x.item() for x in losses] == pytest.approx([6 / 2.5, 9 / 2.5])
    assert (losses[0] + losses[1]).item() / 2 == pytest.approx(3.0)
