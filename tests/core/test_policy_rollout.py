"""rlhfzoo.policy.sample_rollout / build_rollout: the prompts as the model reads them (left-padded;
the copies of a group's prompt are tokenised once) and the responses as the reward reads them (the
tokens before the first EOS)."""

import pytest
import torch

from rlhfzoo.plugins.sentiment import SentimentTask
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.testing import TINY_POLICY

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_rollout_left_pads_the_prompts_and_cuts_each_response_at_its_first_eos(monkeypatch):
    cfg = {k: v for k, v in TINY_POLICY.items() if k not in ("name", "max_new_tokens")}
    policy = HFPolicy(HFPolicyConfig(**cfg, max_new_tokens=4), task=SentimentTask())
    tok = policy.tokenizer
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    (the, film, was), (it,) = (tok(t, add_special_tokens=False)["input_ids"] for t in ("the film was", "it"))
    good, bad, dot = (tok.convert_tokens_to_ids(w) for w in ("good", "bad", "."))
    gen = torch.tensor([[good, eos, bad, bad], [good, bad, dot, good], [eos, good, good, good], [bad, eos, eos, good]])
    seen = {}

    def generate(input_ids, attention_mask, **_):
        seen.update(ids=input_ids.tolist(), attn=attention_mask.tolist())
        return torch.cat([input_ids, gen], dim=1)

    monkeypatch.setattr(policy.module.lm, "generate", generate)
    calls = []
    encode = tok.__class__.__call__
    monkeypatch.setattr(tok.__class__, "__call__", lambda self, text, **kw: calls.append(text) or encode(self, text, **kw))
    rollout = policy.generate(["the film was", "the film was", "it", "it"])

    assert calls == ["the film was", "it"]  # one tokenisation per group
    assert seen["ids"] == [[bos, the, film, was]] * 2 + [[pad, pad, bos, it]] * 2
    assert seen["attn"] == [[1, 1, 1, 1]] * 2 + [[0, 0, 1, 1]] * 2
    assert rollout.responses == ["good", "good bad . good", "", "bad"]
    assert rollout.finished.tolist() == [True, False, True, True]
    assert rollout.response_mask[:, 4:].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert rollout.sequences[:, 4:].tolist() == [[good, eos, pad, pad], [good, bad, dot, good], [eos, pad, pad, pad], [bad, eos, pad, pad]]
