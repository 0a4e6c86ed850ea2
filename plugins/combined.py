"""A weighted sum of named reward sources, with Llama 2's safety gate (`combined`).

    R(x, y) = sum_i w_i R_i(x, y)

    gate (Llama 2, arXiv:2307.09288, Sec. 3.2.2): R_c = R_g(x, y)   where R_g(x, y) < threshold
                                                        R(x, y)     elsewhere

where g is the gated source (Llama 2's safety RM, threshold 0.15 on its [0, 1] score): a
response the safety model flags is rewarded by its safety score alone, whatever its
helpfulness. The gated score is used unweighted, as in Llama 2.

    reward: {name: combined,
             sources: [{name: gold, weight: 1.0}, {name: reward-model, weight: 0.5, path: auto}],
             gate: {source_index: 1, threshold: 0.15}}

Every sub-source is a nested section (`rlhfzoo.sections`): its name is looked up in the registry
and its options validated against that source's own config when the config is read; `weight` is
combined's own setting of the entry.
"""

from __future__ import annotations

import torch
from pydantic import Field, StrictFloat, model_validator

from rlhfzoo import hookimpl
from rlhfzoo.interfaces import PluginConfig, RewardSource
from rlhfzoo.sections import PluginSection


class Gate(PluginConfig):
    source_index: int = Field(..., ge=0, description="Index in `sources` of the gating (safety) source.")
    threshold: float = Field(0.15, description="Where the gating source scores below this, the reward is its score alone.")


class Weight(PluginConfig):
    """What `combined` keeps beside each source's own options in its entry of `sources`."""

    weight: StrictFloat = Field(1.0, description="w_i: the source's weight in the sum (a number).")


WeightedSource = PluginSection.of("reward_source", own=Weight)  # {name: ..., weight: ..., **the source's options}


class CombinedConfig(PluginConfig):
    sources: list[WeightedSource] = Field(
        ..., min_length=1,
        description="The reward sources: each `{name: <reward source>, weight: <float, default 1>, ...its options}`.",
    )
    gate: Gate | None = Field(None, description="Llama-2 safety gate: {source_index, threshold} (null: plain weighted sum).")

    @model_validator(mode="after")
    def _check(self):
        if self.gate is not None and self.gate.source_index >= len(self.sources):
            raise ValueError(f"gate.source_index: {self.gate.source_index} but there are {len(self.sources)} sources")
        return self


class CombinedReward(RewardSource):
    name = "combined"
    aliases = ("weighted-sum",)
    summary = "Weighted sum of named reward sources (e.g. helpfulness + safety), with Llama 2's optional safety gate."
    paper = "Touvron et al. 2023, Llama 2, arXiv:2307.09288 Sec. 3.2.2"
    Config = CombinedConfig

    @classmethod
    def required_stages(cls, config: CombinedConfig) -> list[str]:
        """What every source reads."""
        return list(dict.fromkeys(name for source in config.sources for name in source.required_stages()))

    def __init__(self, config=None, task=None):
        super().__init__(config, task)
        self.sources: list[RewardSource] = [source.create(task=task) for source in self.config.sources]
        self.names: list[str] = [source.name for source in self.config.sources]
        self.weights: list[float] = [source.own.weight for source in self.config.sources]
        self.calls = self.gated = 0
        self.sums = [0.0] * len(self.sources)

    def score(self, prompts, responses) -> torch.Tensor:
        scores = [s.score(prompts, responses).double() for s in self.sources]
        for i, s in enumerate(scores):
            if s.shape != (len(responses),):
                raise ValueError(f"combined: source {i} ({self.names[i]!r}) returned shape {tuple(s.shape)} for {len(responses)} responses")
            self.sums[i] += s.sum().item()
        total = sum(w * s for w, s in zip(self.weights, scores))
        if self.config.gate is not None:
            g = scores[self.config.gate.source_index]
            low = g < self.config.gate.threshold
            self.gated += int(low.sum().item())
            total = torch.where(low, g, total)
        self.calls += len(responses)
        return total.float()

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"combined_calls": float(self.calls)}
        if self.config.gate is not None:
            out["combined_gated_rate"] = self.gated / max(1, self.calls)
        for i, (name, source) in enumerate(zip(self.names, self.sources)):
            out[f"source{i}_{name}_mean"] = self.sums[i] / max(1, self.calls)
            out.update({f"source{i}_{name}/{k}": v for k, v in source.metrics().items()})
        return out


@hookimpl
def register_reward_sources(register):
    register(CombinedReward)
