"""Online DPO (OAIF): pairs from two consecutive samples per prompt, labelled by scores (ties
dropped) or by a pairwise judge asked in both orders (position bias cancelled), the DPO loss on
them against reference log-probs taken in make_experience, the same number of steps on every
process, an iteration without a pair, and (`-m learning`) held-out gold raised over the SFT policy.

    pytest tests/plugins/test_online_dpo.py -m learning -s     # -s prints the figures
"""

import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
import torch

from rlhfzoo import stages
from rlhfzoo.config import load_config
from rlhfzoo.data.collate import pad, prompt_ids
from rlhfzoo.errors import UserError
from rlhfzoo.evaluation import evaluate
from rlhfzoo.interfaces import RewardSource
from rlhfzoo.plugins import online_dpo
from rlhfzoo.plugins.dpo import dpo_loss
from rlhfzoo.plugins.online_dpo import OnlineDPO, combine_verdicts
from rlhfzoo.plugins.sentiment import SentimentTask
from rlhfzoo.policy import HFPolicy, HFPolicyConfig, build_rollout
from rlhfzoo.testing import TINY_POLICY, check_objective
from rlhfzoo.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Three prompts, two responses each (consecutive), of different lengths in words.
RESPONSES = [
    "the film was good", "the film was good and the plot was superb",   # pair 0
    "it was bad", "it was bad .",                                      # pair 1
    "the story was wonderful and brilliant", "it",                     # pair 2
]


@pytest.fixture(scope="module")
def parts():
    task = SentimentTask()
    cfg = {k: v for k, v in TINY_POLICY.items() if k != "name"}
    torch.manual_seed(0)
    policy = HFPolicy(HFPolicyConfig(**cfg), task=task)
    reference = policy.frozen_copy()
    prompts = [p for p in task.examples("prompts")[:3] for _ in range(2)]
    rollout = hand_made_rollout(policy, prompts, RESPONSES)
    return policy, reference, rollout


def hand_made_rollout(policy, prompts, responses):
    """A Rollout of the given responses (each ended by EOS), as `policy.generate` would return it."""
    tok = policy.tokenizer
    encoded = [prompt_ids(tok, p) for p in prompts]
    ids = pad(encoded, tok.pad_token_id, side="left")
    attn = pad([[1] * len(e) for e in encoded], 0, side="left")
    gen = pad([tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses], tok.pad_token_id)
    with torch.no_grad():
        return build_rollout(policy, prompts, ids, attn, gen)


def words(responses):
    return torch.tensor([float(len(r.split())) for r in responses])


class BiasedJudge(RewardSource):
    """Prefers the longer response, but when the two differ by at most one word it says the one
    shown first is better, whichever it is (a position bias)."""

    name = "biased-judge"

    def score(self, prompts, responses):
        return words(responses)

    def compare(self, prompts, responses_a, responses_b):
        diff = words(responses_a) - words(responses_b)
        return torch.where(diff.abs() <= 1, torch.ones_like(diff), torch.sign(diff))


# ------------------------------------------------------------------------------ labels and pairs


def test_pairs_chosen_by_the_higher_score_ties_dropped(parts):
    policy, reference, rollout = parts
    obj = OnlineDPO()
    scores = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.3, -0.2])
    exp = obj.make_experience(rollout, scores, policy, reference)
    assert len(exp) == 2
    assert torch.equal(exp.chosen.input_ids, rollout.sequences[[1, 4]])  # pair 1 ties: dropped
    assert torch.equal(exp.rejected.input_ids, rollout.sequences[[0, 5]])
    assert torch.equal(exp.chosen.response_mask, rollout.response_mask[[1, 4]])
    m = obj.after_iteration({})
    assert m["pairs"] == 2.0 and m["ties"] == 1.0 and m["kept_fraction"] == pytest.approx(2 / 3)
    assert m["score_chosen"] == pytest.approx((0.9 + 0.3) / 2) and m["score_rejected"] == pytest.approx((0.1 - 0.2) / 2)
    assert m["pairs_total"] == 2.0 and m["ties_total"] == 1.0
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    # Reference log-probs of each side, as the reference's own sequence log-probs.
    with torch.no_grad():
        assert torch.allclose(exp.ref_chosen, reference.sequence_logprobs(exp.chosen), atol=1e-5)
        assert torch.allclose(exp.ref_rejected, reference.sequence_logprobs(exp.rejected), atol=1e-5)
    # The policy is still the reference: the KL of its samples to it is 0.
    assert m["kl"] == pytest.approx(0.0, abs=1e-4)


def test_truncation_penalty_changes_the_choice(parts):
    policy, reference, rollout = parts
    finished = torch.ones(6, dtype=torch.bool)
    finished[1] = False  # the higher-scoring response of pair 0 was cut at the length limit
    ro = dataclasses.replace(rollout, finished=finished)
    scores = torch.tensor([0.1, 0.9, 0.0, 1.0, 0.0, 1.0])
    plain = OnlineDPO().make_experience(ro, scores, policy, reference)
    penal = OnlineDPO(OnlineDPO.Config(truncation_penalty=1.0))
    exp = penal.make_experience(ro, scores, policy, reference)
    assert torch.equal(plain.chosen.input_ids[0], ro.sequences[1]) and torch.equal(exp.chosen.input_ids[0], ro.sequences[0])
    assert penal.after_iteration({})["truncated_rate"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="labels: score"):
        OnlineDPO.Config(labels="compare", truncation_penalty=1.0)


def test_compare_in_both_orders_cancels_the_position_bias(parts):
    policy, reference, rollout = parts
    judge = BiasedJudge()
    # Pair 0: the second response is clearly longer; pair 1 differs by one word (the judge's verdict is
    # its position bias); pair 2: the first is clearly longer.
    both = OnlineDPO(OnlineDPO.Config(labels="compare"))
    labels = both.score_rollout(rollout, judge)
    assert labels.tolist() == [-1.0, 1.0, 0.0, 0.0, 1.0, -1.0]  # pair 1: the two orders disagree
    exp = both.make_experience(rollout, labels, policy, reference)
    assert torch.equal(exp.chosen.input_ids, rollout.sequences[[1, 4]])
    assert torch.equal(exp.rejected.input_ids, rollout.sequences[[0, 5]])
    m = both.after_iteration({})
    assert m["pairs"] == 2.0 and m["ties"] == 1.0
    assert m["label_agreement"] == pytest.approx(2 / 3)
    assert m["first_shown_wins"] == pytest.approx(4 / 6)  # both verdicts of pair 1 went to the first shown
    assert m["compare_calls"] == 6.0  # 3 pairs x 2 orders

    # Asked once, the bias decides pair 1 (the first shown wins, though it is the shorter).
    once = OnlineDPO(OnlineDPO.Config(labels="compare", both_orders=False))
    assert once.score_rollout(rollout, judge).tolist() == [-1.0, 1.0, 1.0, -1.0, 1.0, -1.0]

    # The verdicts combine to the label only where they agree.
    assert combine_verdicts(torch.tensor([1.0, 1.0, -1.0, 0.0]), torch.tensor([-1.0, 1.0, 1.0, 0.0])).tolist() == [1.0, 0.0, -1.0, 0.0]


def test_compare_needs_a_source_that_compares(parts):
    _, _, rollout = parts

    class ScoresOnly(RewardSource):
        name = "scores-only"

        def score(self, prompts, responses):
            return words(responses)

    with pytest.raises(UserError, match="labels: score"):
        OnlineDPO(OnlineDPO.Config(labels="compare")).score_rollout(rollout, ScoresOnly())


def test_rejects_a_rollout_without_two_consecutive_samples_per_prompt(parts):
    policy, reference, rollout = parts
    shuffled = dataclasses.replace(rollout, prompts=[rollout.prompts[i] for i in (0, 2, 1, 3, 4, 5)])
    for ro in (shuffled, dataclasses.replace(rollout, prompts=rollout.prompts[:5])):
        with pytest.raises(ValueError, match="2 consecutive samples per prompt"):
            OnlineDPO().make_experience(ro, torch.arange(6.0), policy, reference)
    with pytest.raises(ValueError, match="2 consecutive samples per prompt"):
        OnlineDPO(OnlineDPO.Config(labels="compare")).score_rollout(shuffled, BiasedJudge())
    assert OnlineDPO().samples_per_prompt() == 2


# ------------------------------------------------------------------------------ the loss


def test_loss_is_dpo_of_the_log_ratios(parts):
    _, reference, rollout = parts
    policy = reference.frozen_copy()  # a policy of its own, trained here
    policy.module.requires_grad_(True)
    obj = OnlineDPO(OnlineDPO.Config(beta=0.5, label_smoothing=0.1))
    exp = obj.make_experience(rollout, torch.tensor([0.0, 1.0, 2.0, 1.0, 5.0, 4.0]), policy, reference)
    with torch.no_grad():  # move the policy away from the reference: non-zero log-ratios
        for p in policy.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    (batch,) = next(iter(obj.minibatches(exp, policy)))  # minibatch_size null: all 3 pairs in one step
    assert len(batch) == 3
    out = obj.loss(batch, policy)
    with torch.no_grad():
        ratio_c = policy.sequence_logprobs(exp.chosen) - reference.sequence_logprobs(exp.chosen)
        ratio_r = policy.sequence_logprobs(exp.rejected) - reference.sequence_logprobs(exp.rejected)
    rows = batch.index
    expected = dpo_loss(ratio_c[rows], ratio_r[rows], 0.5, 0.1).mean()
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert out.metrics["reward_margin"] == pytest.approx(0.5 * (ratio_c - ratio_r).mean().item(), abs=1e-5)
    assert out.metrics["accuracy"] == pytest.approx((ratio_c > ratio_r).float().mean().item())
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_every_process_takes_as_many_steps_as_the_one_with_most_pairs(parts, monkeypatch):
    policy, reference, rollout = parts
    obj = OnlineDPO(OnlineDPO.Config(minibatch_size=2, epochs=2))
    exp = obj.make_experience(rollout, torch.tensor([0.0, 1.0, 2.0, 1.0, 5.0, 4.0]), policy, reference)  # 3 pairs here
    # Another process kept 6 pairs: 3 steps per epoch here too, the last with the idle pair of weight 0.
    monkeypatch.setattr(online_dpo, "all_rows", lambda x: torch.cat([x, torch.tensor([6], device=x.device)]))
    steps = list(obj.minibatches(exp, policy))
    assert len(steps) == 6
    sizes = [sum(len(b) for b in step) for step in steps]
    assert sizes == [2, 1, 1, 2, 1, 1]
    # Pairs over both processes: 2+2, 1+2, 0+2; each micro-batch divides by (pairs in step) / (world x micro-batches).
    assert [step[0].extra.get("pair_denominator") for step in steps[:3]] == [2.0, 1.5, None]
    idle = steps[2][0]
    assert idle is exp.idle and idle.extra["weight"].tolist() == [0.0]
    out = obj.loss(idle, policy)
    assert out.loss.item() == 0.0 and all(math.isfinite(v) for v in out.metrics.values())
    out.loss.backward()  # joins the step's collective with a zero gradient
    policy.module.zero_grad(set_to_none=True)


def test_an_iteration_where_every_pair_ties_is_safe(tmp_path):
    """A scratch policy's samples all get gold -1 on sentiment: every pair ties. The iteration takes no
    optimizer step (weights untouched), logs finite figures, and the trainer drew 2 samples per prompt."""
    cfg = load_config(data={
        "task": {"name": "sentiment"},
        "policy": {**TINY_POLICY, "max_new_tokens": 6},
        "algorithm": {"name": "online-dpo", "minibatch_size": 2},
        "reward": {"name": "gold"},
        "train": {"steps": 1, "batch_size": 4, "lr": 1e-3, "eval_prompts": 0, "progress": False},
        "output_dir": str(tmp_path / "odpo"),
    })
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.prepare_output(resume=False, overwrite=True)
    before = {k: v.clone() for k, v in trainer.policy.module.state_dict().items()}
    m = trainer.train_step(0)
    assert trainer.reward.calls == 8  # 4 prompts x 2 samples, each scored once
    assert m["pairs"] == 0.0 and m["ties"] == 4.0 and m["reward"] == -1.0
    assert "loss" not in m  # no optimizer step
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values()), m
    after = trainer.policy.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.objective.state_dict() == {"totals": {"pairs": 0.0, "ties": 4.0, "compare_calls": 0.0}}


def test_contract_with_pairwise_labels(tmp_path):
    """The objective contract (two iterations through the trainer, checkpoint restored) with
    `labels: compare`: the contract's reward source orders pairs by its scores."""
    m = check_objective("online-dpo", tmp_path / "compare", labels="compare", minibatch_size=2)
    assert m["compare_calls"] == 16.0  # 2 iterations x 4 pairs x 2 orders
    assert m["label_agreement"] == 1.0 and m["reward"] == 0.0  # a consistent judge; +1/-1 labels average to 0


# ------------------------------------------------------------------------------ learning

N_PROMPTS, SEED = 200, 0  # as tests/plugins/test_online_learning.py


@pytest.mark.learning
def test_raises_held_out_gold_over_sft(tmp_path):
    """configs/online_dpo.yaml (against the task's reward model) raises the held-out gold reward over
    the SFT policy by more than 3 standard errors (measured: +8.7 SE at train.seed 0, +12 to +21 SE at 1-3)."""
    task = SentimentTask()
    stages.build("sft", task, log=None)
    sft = HFPolicy(HFPolicyConfig(init="sft"), task=task)
    sft.model.eval()
    before = evaluate(sft, task, n_prompts=N_PROMPTS, seed=SEED)

    out = tmp_path / "online_dpo"
    cfg = load_config(CONFIGS / "online_dpo.yaml", [f"output_dir={out}", "train.eval_prompts=0", "train.progress=false"])
    trainer = Trainer(cfg, log=lambda *_: None)
    start = time.time()
    trainer.fit(overwrite=True)
    seconds = time.time() - start
    trainer.policy.model.eval()
    after = evaluate(trainer.policy, trainer.task, reference=trainer.reference, n_prompts=N_PROMPTS, seed=SEED)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    gain = after["gold"] - before["gold"]
    se = math.sqrt(after["gold_se"] ** 2 + before["gold_se"] ** 2)
    print(f"\nonline-dpo: gold {before['gold']:.3f} ± {before['gold_se']:.3f} -> {after['gold']:.3f} ± {after['gold_se']:.3f} "
          f"(+{gain:.3f} = {gain / se:.1f} SE), KL {after['kl']:.2f} ± {after['kl_se']:.2f}, {seconds:.0f} s training, "
          f"reward {cfg.reward.entry.name}")
    assert gain > 3 * se, f"online-dpo: gold {before['gold']:.3f} -> {after['gold']:.3f}, not 3 SE ({3 * se:.3f}) better"
    assert all(math.isfinite(row["loss"]) for row in rows if "loss" in row)
    # few ties: a pair (two samples of different reward) from most prompts; 89.8 % in one cold-cache build
    assert sum(row["pairs"] for row in rows) > 0.85 * cfg.train.steps * cfg.train.batch_size
