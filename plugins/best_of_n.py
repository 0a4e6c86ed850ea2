"""Best-of-N sampling as a policy (registered as `best-of-n`): no training, a baseline and an
inference-time method (Nakano et al. 2021, WebGPT, arXiv:2112.09332; Gao et al. 2022, arXiv:2210.10760).

For every prompt, the base policy samples N responses, the reward source scores them, and the
highest-scoring one is returned:

    y* = argmax_{y_1..y_N ~ pi_base(.|x)} r(x, y_i)

Its KL to the base policy is log N - (N - 1) / N (for distinct samples; Stiennon et al. 2020,
Gao et al. 2022).
The returned rollout's `logprobs` are the base policy's log-probs of the winning tokens (not the
log-probs of the best-of-N distribution); `logprobs`, `save` and `load_weights` delegate to the base.

    policy: {name: best-of-n, n: 16, base: {name: hf, init: sft}, reward: {name: gold}}

It reads the stages its base policy and reward source read (`required_stages`), e.g. the task's
SFT policy and reward model; they are built before it is constructed. Evaluate it like any policy
(`rlhfzoo.evaluation.evaluate(policy, task, ...)`), or from a YAML file with `task` and `policy`
sections (see configs/best_of_n.yaml), which builds those stages first:

    python -m rlhfzoo.plugins.best_of_n configs/best_of_n.yaml [n_prompts] [seed]
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Sequence

import torch
from pydantic import Field

from rlhfzoo import hookimpl, stages
from rlhfzoo.config import read_yaml, resolve
from rlhfzoo.evaluation import evaluate
from rlhfzoo.interfaces import BenchProtocol, PluginConfig, Policy, RewardSource, Rollout
from rlhfzoo.sections import PolicySection, RewardSourceSection


class BestOfNConfig(PluginConfig):
    n: int = Field(16, ge=1, description="N: responses sampled per prompt; the highest-scoring one is returned.")
    base: PolicySection = Field(
        default_factory=lambda: {"name": "hf", "init": "sft"}, validate_default=True,
        description="The policy that samples the candidates: a policy section, `{name: ..., <its options>}`.",
    )
    reward: RewardSourceSection = Field(
        default_factory=lambda: {"name": "gold"}, validate_default=True,
        description="The reward source that picks the best candidate: a reward section, `{name: ..., <its options>}`.",
    )
    chunk_size: int = Field(1024, ge=1, description="Most candidates generated per call of the base policy (rounded to whole prompts).")


def concat_rollouts(rollouts: Sequence[Rollout], pad_id: int) -> Rollout:
    """One rollout from several of different widths: prompts re-left-padded, responses re-right-padded."""
    if len(rollouts) == 1:
        return rollouts[0]
    parts = []
    for ro in rollouts:
        width = ro.sequences.shape[1]
        has_response = ro.response_mask.bool().any(0).nonzero()
        start = int(has_response[0]) if len(has_response) else width  # first generated column
        lp = torch.cat([torch.zeros_like(ro.logprobs[:, :1]), ro.logprobs], 1)  # align with tokens
        parts.append((ro, start, width - start, lp))
    P = max(p[1] for p in parts)
    R = max(p[2] for p in parts)

    def place(t: torch.Tensor, start: int, fill) -> torch.Tensor:
        left = torch.full((t.shape[0], P - start), fill, dtype=t.dtype)
        right = torch.full((t.shape[0], R - (t.shape[1] - start)), fill, dtype=t.dtype)
        return torch.cat([left, t, right], 1)

    seqs, attn, resp, lps = [], [], [], []
    for ro, start, _, lp in parts:
        seqs.append(place(ro.sequences, start, pad_id))
        attn.append(place(ro.attention_mask, start, 0))
        resp.append(place(ro.response_mask, start, 0))
        lps.append(place(lp, start, 0.0))
    return Rollout(
        torch.cat(seqs), torch.cat(attn), torch.cat(resp), torch.cat(lps)[:, 1:],
        [p for ro in rollouts for p in ro.prompts], [r for ro in rollouts for r in ro.responses],
        torch.cat([ro.finished for ro in rollouts]),
    )


class BestOfN(Policy):
    name = "best-of-n"
    aliases = ("bon",)
    summary = "Best-of-N sampling: N samples of a base policy per prompt, the reward source's favourite returned. No training."
    paper = "Nakano et al. 2021, arXiv:2112.09332; Gao et al. 2022, arXiv:2210.10760"
    Config = BestOfNConfig
    # A row of `rlhfzoo bench`, evaluated without training: N samples of the baseline, chosen by the row's reward.
    bench = BenchProtocol(kl="analytic", kl_knob="n", kl_sweep=(4, 16, 64), base_option="base", reward_option="reward")

    @classmethod
    def required_stages(cls, config: BestOfNConfig) -> list[str]:
        """What the base policy and the reward source read."""
        return config.base.required_stages() + config.reward.required_stages()

    def __init__(self, config: BestOfNConfig | None = None, task: Any = None, base: Policy | None = None, reward: RewardSource | None = None):
        self.config = config or BestOfNConfig()
        self.task = task
        self.base: Policy = base if base is not None else self.config.base.create(task=task)
        self.reward: RewardSource = reward if reward is not None else self.config.reward.create(task=task)
        self.reward_calls = 0
        self.last_scores: torch.Tensor | None = None  # the winners' scores of the last `generate`

    # The trainable parts are the base policy's.
    @property
    def model(self) -> torch.nn.Module:
        return self.base.model

    @model.setter
    def model(self, value: torch.nn.Module) -> None:
        self.base.model = value

    @property
    def tokenizer(self) -> Any:
        return self.base.tokenizer

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], **sampling: Any) -> Rollout:
        n = self.config.n
        prompts = list(prompts)
        per_call = max(1, self.config.chunk_size // n)  # whole prompts per base call
        winners, scores_out = [], []
        for i in range(0, len(prompts), per_call):
            chunk = prompts[i : i + per_call]
            ro = self.base.generate([p for p in chunk for _ in range(n)], **sampling)
            scores = self.reward.score(ro.prompts, ro.responses).float().cpu()
            self.reward_calls += len(ro.responses)
            ranked = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -math.inf)).view(-1, n)
            best = ranked.argmax(-1)  # first of the best on ties; all non-finite -> the first sample
            rows = torch.arange(len(chunk)) * n + best
            winners.append(Rollout(
                ro.sequences[rows], ro.attention_mask[rows], ro.response_mask[rows], ro.logprobs[rows],
                chunk, [ro.responses[r] for r in rows.tolist()], ro.finished[rows],
            ))
            scores_out.append(scores[rows])
        self.last_scores = torch.cat(scores_out) if scores_out else torch.zeros(0)
        if not winners:
            return self.base.generate([], **sampling)
        return concat_rollouts(winners, self.tokenizer.pad_token_id)

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.base.logprobs(input_ids, attention_mask)

    def forward(self, input_ids, attention_mask, **kwargs):
        return self.base.forward(input_ids, attention_mask, **kwargs)

    def frozen_copy(self) -> "BestOfN":
        return BestOfN(self.config, task=self.task, base=self.base.frozen_copy(), reward=self.reward)

    def save(self, path: str) -> None:
        self.base.save(path)
        with open(os.path.join(path, "best_of_n.json"), "w") as f:
            json.dump({"policy": self.name, "config": self.config.model_dump(mode="json")}, f, indent=1)

    def load_weights(self, path: str) -> None:
        self.base.load_weights(path)

    def save_weights(self, file: str) -> None:
        self.base.save_weights(file)

    @property
    def counters(self) -> dict[str, float]:
        """Work done (the base policy's token counters) plus the reward calls made choosing."""
        return {**getattr(self.base, "counters", {}), "reward_calls": float(self.reward_calls)}

    def kl_reference(self) -> Policy:
        """KL is measured from the base policy the N samples come from."""
        return self.base

    def analytic_kl(self) -> float:
        """KL(best-of-N || base) <= log N - (N - 1) / N per prompt (Stiennon et al. 2020's formula).
        An upper bound (Beirami et al. 2024): exact only when no single response has appreciable
        probability under the base; with repeated responses (a peaked base, short answers) or tied
        rewards the true KL is smaller."""
        n = self.config.n
        return math.log(n) - (n - 1) / n


def evaluate_config(data: dict[str, Any] | str, n_prompts: int | None = None, seed: int | None = None) -> dict[str, float]:
    """Build `task` and `policy` (and optionally `reward`: the proxy reported beside gold) from a
    mapping or YAML file, the stages they read first, and run `rlhfzoo.evaluation.evaluate` on the
    task's held-out prompts (`evaluate: {n_prompts, seed}` in the file, or the arguments)."""
    source = None
    if isinstance(data, (str, os.PathLike)):
        source, data = str(data), read_yaml(data)
    data = dict(data)
    ev = data.pop("evaluate", None) or {}
    cfg = resolve(data, source=source, require=("task",))  # a policy evaluated as is: no algorithm
    task = cfg.task.create()
    for name in stages.needed(cfg, task):
        stages.build(name, task)
    policy = cfg.policy.create(task=task)
    reward = cfg.reward.create(task=task) if cfg.reward is not None else None
    n_prompts = n_prompts if n_prompts is not None else int(ev.get("n_prompts", 200))
    seed = seed if seed is not None else int(ev.get("seed", 0))
    return evaluate(policy, task, reward=reward, n_prompts=n_prompts, seed=seed)


@hookimpl
def register_policies(register):
    register(BestOfN)


if __name__ == "__main__":  # python -m rlhfzoo.plugins.best_of_n configs/best_of_n.yaml [n_prompts] [seed]
    if len(sys.argv) < 2:
        sys.exit("usage: python -m rlhfzoo.plugins.best_of_n CONFIG.yaml [n_prompts] [seed]")
    result = evaluate_config(sys.argv[1], *(int(a) for a in sys.argv[2:4]))
    print(json.dumps(result, indent=1))
