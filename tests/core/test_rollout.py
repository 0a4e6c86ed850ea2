"""Rollouts from `HFPolicy.generate` as the online objectives use them: left-padded prompts,
position ids, EOS handling, truncation flags, and a PPO ratio of exactly 1 before any update."""

import pytest
import torch

from rlhfzoo import stages
from rlhfzoo.data.collate import pad, prompt_ids
from rlhfzoo.plugins.ppo import PPOClip
from rlhfzoo.plugins.sentiment import SentimentTask
from rlhfzoo.policy import HFPolicy, HFPolicyConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sft():
    task = SentimentTask()
    stages.build("sft", task, log=None)  # constructors only read a built stage
    policy = HFPolicy(HFPolicyConfig(init="sft", value_head=True), task=task)
    prompts = task.examples("prompts")[:24]
    lengths = {len(prompt_ids(policy.tokenizer, p)) for p in prompts}
    assert len(lengths) > 2, "the test needs prompts of different lengths (left padding)"
    return task, policy, prompts


def test_ratio_is_one_on_the_first_minibatch_with_left_padding(sft):
    task, policy, prompts = sft
    torch.manual_seed(0)
    rollout = policy.generate(prompts)
    assert (rollout.attention_mask[:, 0] == 0).any(), "some prompts must be left-padded"
    # The rollout's log-probs are the training forward's, bit-for-bit up to float noise.
    again = policy.logprobs(rollout.sequences, rollout.attention_mask) * rollout.response_mask[:, 1:]
    assert (again - rollout.logprobs).abs().max().item() <= 1e-6

    obj = PPOClip(PPOClip.Config(minibatch_size=8))
    reference = policy.frozen_copy()
    exp = obj.make_experience(rollout, task.gold_reward(rollout.prompts, rollout.responses), policy, reference)
    assert exp.metrics["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    group = next(iter(obj.minibatches(exp, policy)))
    batch = group[0]
    assert len(batch) == 8 and (batch.sequences.attention_mask[:, 0] == 0).any()  # left-padded rows in it
    lp = policy.logprobs(batch.sequences.input_ids, batch.sequences.attention_mask)
    mask = batch.extra["mask"].bool()
    ratio = torch.exp(lp - batch.extra["old_logprobs"])[mask]
    assert (ratio - 1).abs().max().item() <= 1e-6
    out = obj.loss(batch, policy, reference)
    assert out.metrics["clipfrac"] == 0.0 and out.metrics["approx_kl"] == pytest.approx(0.0, abs=1e-10)


def test_position_ids_follow_the_attention_mask(sft):
    _, policy, prompts = sft
    torch.manual_seed(1)
    rollout = policy.generate(prompts[:12])
    batch_lp = policy.logprobs(rollout.sequences, rollout.attention_mask)
    for i in range(len(prompts[:12])):
        cols = rollout.attention_mask[i].nonzero().squeeze(-1)
        assert (cols == torch.arange(cols[0], cols[-1] + 1)).all(), "real tokens are contiguous"
        alone = rollout.sequences[i, cols].unsqueeze(0)
        lp = policy.logprobs(alone, torch.ones_like(alone))[0]
        assert torch.allclose(lp, batch_lp[i, cols[0] : cols[-1]], atol=1e-5), f"row {i}: left padding shifted positions"


def test_sampling_distribution_is_the_training_forward(sft):
    """HF generate (KV cache, its own position ids) samples from the distribution the training
    forward scores: the generate-time logits of the sampled tokens match the recomputed log-probs."""
    _, policy, prompts = sft
    tok, lm = policy.tokenizer, policy.module.lm
    encoded = [prompt_ids(tok, p) for p in prompts[:12]]
    ids = pad(encoded, tok.pad_token_id, side="left")
    attn = pad([[1] * len(e) for e in encoded], 0, side="left")
    torch.manual_seed(2)
    out = lm.generate(input_ids=ids, attention_mask=attn, do_sample=True, max_new_tokens=10, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_logits=True, top_k=None)
    gen = out.sequences[:, ids.shape[1]:]
    sample_lp = torch.stack([torch.log_softmax(l.float(), -1) for l in out.logits], 1).gather(-1, gen.unsqueeze(-1)).squeeze(-1)
    is_eos = gen == tok.eos_token_id
    valid = ~((is_eos.long().cumsum(-1) - is_eos.long()) > 0)
    full_attn = torch.cat([attn, valid.long()], 1)
    train_lp = policy.logprobs(out.sequences, full_attn)[:, ids.shape[1] - 1 :]
    assert torch.allclose(train_lp[valid], sample_lp[valid], atol=1e-4)


def test_eos_handling(sft):
    _, policy, prompts = sft
    tok = policy.tokenizer
    torch.manual_seed(3)
    ro = policy.generate(prompts)
    assert ro.finished.float().mean() > 0.5  # the SFT policy stops on its own
    for i in range(len(prompts)):
        resp = ro.response_mask[i].nonzero().squeeze(-1)
        assert (ro.attention_mask[i, resp] == 1).all()
        last = resp[-1]
        if ro.finished[i]:
            assert ro.sequences[i, last] == tok.eos_token_id  # the EOS is part of the response (it is trained on)
            assert (ro.sequences[i, resp[:-1]] != tok.eos_token_id).all()
            assert (ro.attention_mask[i, last + 1 :] == 0).all() and (ro.sequences[i, last + 1 :] == tok.pad_token_id).all()
        assert "<eos>" not in ro.responses[i] and "<pad>" not in ro.responses[i]
    assert (ro.logprobs[ro.response_mask[:, 1:] == 0] == 0).all()
    assert (ro.logprobs[ro.response_mask[:, 1:] == 1] < 0).all()


def test_responses_cut_at_max_length_are_flagged(sft):
    _, policy, prompts = sft
    torch.manual_seed(4)
    ro = policy.generate(prompts, max_new_tokens=3)
    n_tokens = ro.response_mask.sum(-1)
    assert (~ro.finished).any()
    for i in range(len(prompts)):
        has_eos = (ro.sequences[i][ro.response_mask[i].bool()] == policy.tokenizer.eos_token_id).any()
        assert bool(ro.finished[i]) == bool(has_eos)
        if not ro.finished[i]:
            assert n_tokens[i] == 3


# ---------------------------------------------------------------------------- collation by example type


def test_collation_is_dispatched_by_example_type_and_extensible():
    from dataclasses import dataclass

    from rlhfzoo.data.collate import BUILDERS, Collator, batches
    from rlhfzoo.interfaces import Batch, Demonstration, PreferencePair
    from rlhfzoo.plugins.sentiment import SentimentTask

    collate = Collator(SentimentTask().tokenizer(), max_length=32)
    pair = collate([(3, PreferencePair("good movie", "great", "bad")), (5, PreferencePair("a film", "fine", "dull"))])
    assert pair.rejected is not None and pair.index.tolist() == [3, 5] and pair.margin.tolist() == [0.0, 0.0]
    with pytest.raises(TypeError, match="mixes example types"):
        collate([(0, PreferencePair("p", "a", "b")), (1, Demonstration("p", "a"))])

    @dataclass(frozen=True)
    class Scored:  # a third party's own example type
        prompt: str
        response: str
        score: float

    with pytest.raises(TypeError, match=r"batches\(Scored\)"):
        collate([(0, Scored("p", "r", 1.0))])

    @batches(Scored)
    def scored_batch(examples, encode, index):
        return Batch(sequences=encode([(e.prompt, e.response) for e in examples]), rewards=torch.tensor([e.score for e in examples]), index=index)

    try:
        out = collate([(0, Scored("good movie", "great", 2.5))])
        assert out.rewards.tolist() == [2.5] and out.sequences.response_mask.sum() > 0
    finally:
        del BUILDERS[Scored]
