"""The task's programmatic (gold) reward as a reward source: for evaluation and oracle runs."""

import torch

from rlhfzoo import hookimpl
from rlhfzoo.interfaces import RewardSource


class GoldReward(RewardSource):
    name = "gold"
    summary = "The task's own programmatic reward (e.g. `sentiment`'s gold reward); for evaluation and oracle runs."
    paper = "Gao et al. 2022, arXiv:2210.10760"
    is_gold = True  # evaluations report it as the gold figure, not again as a proxy

    def __init__(self, config=None, task=None):
        super().__init__(config, task)
        if task is None or not task.has_gold_reward:
            name = getattr(task, "name", None)
            raise ValueError(f"reward source 'gold' needs a task with a gold reward; task {name!r} has none")
        self.calls = 0

    def score(self, prompts, responses) -> torch.Tensor:
        self.calls += len(responses)
        return self.task.gold_reward(prompts, responses).float()

    def metrics(self):
        return {"reward_calls": float(self.calls)}


@hookimpl
def register_reward_sources(register):
    register(GoldReward)
