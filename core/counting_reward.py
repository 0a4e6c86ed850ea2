"""The trainer's view of the reward source: the same source, with every scored response counted.

The count is the budget figure "reward-model calls" (`reward_calls` in the metrics and in
`summary.json`), and it is checkpointed with the run so that a resumed run reports the calls of the
whole run. Only `score` is counted: it is what online training and the sampled evaluation spend.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlhfzoo.interfaces import RewardSource


class CountingReward(RewardSource):
    """Wraps a reward source, forwards its interface, and counts the responses it scored."""

    def __init__(self, inner: RewardSource):
        super().__init__(inner.config, task=inner.task)
        self.inner, self.calls = inner, 0
        self.name = inner.name

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        self.calls += len(responses)
        return self.inner.score(prompts, responses)

    def compare(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> torch.Tensor:
        """The source's pairwise judgement (not counted in `calls`, which counts scored responses)."""
        return self.inner.compare(prompts, responses_a, responses_b)

    def metrics(self) -> dict[str, float]:
        return {**self.inner.metrics(), "reward_calls": float(self.calls)}
