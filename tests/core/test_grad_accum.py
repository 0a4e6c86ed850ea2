"""Gradient accumulation is exact: the same global batch gives the same gradient whatever the number
of micro-batches it is cut into, for every objective, on sequences of unequal lengths.

Token-level losses (SFT, rejection sampling, ILQL, the PPO/A2C terms, ORPO's NLL) are token means
over the whole optimizer step (`rlhfzoo.ops.step_denominator`; GRPO's and RLOO's steps carry their
own sequence and token totals); sequence-level ones (DPO, IPO, SimPO, ORPO's odds-ratio term) are
means over equal-sized micro-batches, exact as they are. Statistics of the whole step come from the
objective's `begin_step`: KTO's reference point z0 (the mean over the step's mismatched pairs, with
the fixed partners of `reference: cached`), the Bradley-Terry pair weights of K-wise rankings (a
weighted mean over the step's pairs), and PPO-ptx's pretraining NLL (the step's demonstrations,
shared out among its micro-batches, a token mean over all of them). For these the test first checks
that each micro-batch's own statistic differs, which per-micro-batch estimates would have used.
The model is in float64, so that the only differences left are summation order (~1e-16), far below
the 1e-6 asked and the 1e-2 to 3e-1 that per-micro-batch means gave. (The process-count half of
the equivalence is in test_distributed.py.)

Not here: KTO with `reference: model`, whose mismatched pairs are formed within each micro-batch by
the collator (the pairs themselves change with the split); and online DPO, whose scratch-policy
samples all tie under the gold reward (no pair to train on; its steps' mean over every process's
pairs is checked in tests/plugins/test_online_dpo.py).
"""

import random

import pytest
import torch

from rlhfzoo.config import load_config
from rlhfzoo.interfaces import Batch, SequenceBatch
from rlhfzoo.ops import masked_mean, set_step_tokens, step_denominator
from rlhfzoo.plugins.actor_critic import Experience
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


def trainer_for(algorithm: str, out, task: dict | None = None, **options) -> Trainer:
    """A one-step run of `algorithm` with these options on the small task (`task`: more task options)."""
    task = {**SMALL, **(task or {})}
    data = {
        "task": {"name": "sentiment", **task},
        "policy": {**TINY_POLICY, "arch": "llama"},
        "algorithm": {"name": algorithm, **options},
        "train": {"steps": 1, "batch_size": ROWS, "lr": 1e-3, "eval_prompts": 0, "progress": False},
        "output_dir": str(out),
    }
    if algorithm in ("ppo-clip", "ppo-penalty", "a2c", "rejection-sampling", "grpo", "rloo"):
        data["reward"] = {"name": "gold"}
    trainer = Trainer(load_config(data=data), log=lambda *_: None, task=RandomSamplesSentiment(SentimentTask.Config(**task)))
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

    def groups(m: int) -> list[Batch]:  # actor-critic: cut by the objective, which shares out the step's demonstrations
        assert isinstance(experience, Experience)
        trainer.objective.config.micro_batch_size = m
        torch.manual_seed(2)  # PPO-ptx: the same draw of the step's demonstrations for every split
        return trainer.objective.groups(experience, torch.arange(ROWS))

    return groups


@torch.no_grad()
def nudge(trainer: Trainer) -> None:
    """Move the policy off its initial weights (off the reference, off the rollout's policy) so that
    no term is at a special point (ratio 1, log-ratio 0, value 0)."""
    g = torch.Generator().manual_seed(1)
    for p in trainer.policy.parameters():
        if p.requires_grad:
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@torch.no_grad()
def reference_further_away(trainer: Trainer) -> None:
    """KTO: cache the reference log-probs again, from the initial policy moved twice as far as `nudge`
    moves the policy (another seed). Random moves lower the log-probs of most texts, so the mismatched
    pairs' log pi - log pi_ref, and with it z0, come out above 0 rather than clamped at 0."""
    reference = trainer.policy.frozen_copy()
    g = torch.Generator().manual_seed(2)
    for p in reference.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    trainer.objective.prepare(trainer.data, trainer.collator, reference)
    trainer.reference = reference  # `reference: model` runs it every step


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
    # Statistics of the whole step (`begin_step`); "name" when the case is not the algorithm's name.
    "kto": {"beta": 0.5},  # z0 over the step's fixed mismatched pairs (`reference: cached`)
    "kto-model": {"name": "kto", "beta": 0.5, "reference": "model"},  # the same pairs, the reference model run every step
    # 1/C(K, 2) pair weights, K from 2 to 4: weights 1, 1/3 and 1/6
    "bradley-terry-rankings": {"name": "bradley-terry", "examples": "rankings", "task": {"k_min": 2, "k_max": 4}},
    "ppo-ptx": {"name": "ppo-clip", "ptx_coef": 1.0, "ptx_batch_size": 6},  # 6 demonstrations: 3+3 or 2+2+1+1
}


def micro_batch_statistics(case: str, trainer: Trainer, batches: list[Batch]) -> list[float] | None:
    """The statistic each micro-batch would have used on its own, where the objective takes it over
    the whole step instead (None for the other cases)."""
    obj = trainer.objective
    if case.startswith("kto"):  # `loss` without `begin_step`: the micro-batch's own z0 (then the step's, above 0)
        own = [obj.loss(b, trainer.policy, trainer.reference).metrics["kl_estimate"] for b in batches]
        obj.begin_step(batches, trainer.policy, trainer.reference)
        assert batches[0].extra["kl_reference_point"] > 0.1, "the step's z0 is clamped at 0: the test checks little about it"
        return own
    if case == "bradley-terry-rankings":  # the total weight that a micro-batch's weighted mean divides by
        return [float(obj.pair_weights(b).sum()) for b in batches]
    if case == "ppo-ptx":  # the demonstrations' tokens that a micro-batch's NLL would be a mean over
        return [float(b.extra["ptx"].response_mask[:, 1:].sum()) for b in batches]
    return None


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_does_not_depend_on_the_number_of_micro_batches(case, tmp_path):
    options = dict(CASES[case])
    trainer = trainer_for(options.pop("name", case), tmp_path / case, **options)
    split = online_batches(trainer) if trainer.objective.online else offline_batches(trainer)
    if case.startswith("kto"):
        reference_further_away(trainer)
    nudge(trainer)
    tokens = [int(b.sequences.response_mask[:, 1:].sum()) for b in split(2)]
    assert len(set(tokens)) > 1, f"the micro-batches must differ in length for the test to mean anything: {tokens}"
    own = micro_batch_statistics(case, trainer, split(2))
    assert own is None or len({round(x, 9) for x in own}) > 1, f"{case}: the micro-batches' own statistics must differ: {own}"
    if own is not None:  # one micro-batch on one process: `begin_step` changes no bit of the loss (grad_accum 1 as before)
        (batch,) = split(ROWS)
        set_step_tokens([batch])
        direct = trainer.objective.loss(batch, trainer.policy, trainer.reference).loss
        trainer.objective.begin_step([batch], trainer.policy, trainer.reference)
        assert torch.equal(trainer.objective.loss(batch, trainer.policy, trainer.reference).loss, direct), case
    whole = gradient(trainer, split(ROWS))
    assert whole.norm() > 0
    for m in (ROWS // 2, ROWS // 4):
        g = gradient(trainer, split(m))
        rel = ((g - whole).norm() / whole.norm()).item()
        assert rel < 1e-6, f"{case}: {ROWS // m} micro-batches change the gradient by {rel:.2e} (relative)"


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
