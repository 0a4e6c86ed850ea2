"""rlhfzoo.data.collate.sequence_batch: plain-text pairs are tokenised in one call per side and
batch, and come out exactly as `encode` makes each pair alone (ids, masks, truncation counts)."""

import torch

from rlhfzoo.data.collate import TruncationStats, encode, pad, sequence_batch
from rlhfzoo.plugins.sentiment import SentimentTask


def test_a_batch_tokenises_once_per_side_and_equals_pair_by_pair_encoding(monkeypatch):
    tok = SentimentTask().tokenizer()
    pairs = [("the film was", "good ."), ("", ""), ("it", "bad bad bad bad bad bad bad bad"), ("a long long long long prompt", "fine")]
    one_by_one = TruncationStats()
    alone = [encode(tok, p, r, 8, one_by_one) for p, r in pairs]  # 8 tokens: the last two pairs are cut

    calls = []
    call = tok.__class__.__call__
    monkeypatch.setattr(tok.__class__, "__call__", lambda self, text, **kw: calls.append(text) or call(self, text, **kw))
    stats = TruncationStats()
    batch = sequence_batch(tok, pairs, 8, stats)

    assert calls == [[p for p, _ in pairs], [r for _, r in pairs]]
    assert torch.equal(batch.input_ids, pad([ids for ids, _ in alone], tok.pad_token_id))
    assert torch.equal(batch.attention_mask, pad([[1] * len(ids) for ids, _ in alone], 0))
    assert torch.equal(batch.response_mask, pad([mask for _, mask in alone], 0))
    assert (stats.sequences, stats.truncated) == (one_by_one.sequences, one_by_one.truncated) == (4, 2)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert alone[1] == ([bos, eos], [0, 1])  # an empty prompt and response: [bos] and the eos to learn
