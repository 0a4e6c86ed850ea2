"""ILQL decoding as a policy (registered as `ilql` by `rlhfzoo.plugins.ilql`; Snell et al. 2022,
arXiv:2206.11871): the base LM perturbed at every step by the advantage of the Q/V heads the
`ilql` objective trained,

    sample a ~ softmax(log pi(a|s) + beta * (min_j Q'_j(s, a) - V(s)))       beta = 0: the base LM

optionally restricted to the base LM's nucleus (`base_top_p`) and filtered by top-k / top-p.
Decoding runs the LM and, when the heads have their own, the value trunk side by side, each with
its own KV cache.

    policy: {name: ilql, path: <run>/policy, beta: 8}

loads the heads a run wrote beside its LM (`ilql_heads.safetensors` + `ilql_heads.json`); the
objective decodes its trained policy the same way (`ILQLPolicy.wrap`) for its evaluation.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from rlhfzoo.data.collate import pad, prompt_ids
from rlhfzoo.interfaces import Rollout
from rlhfzoo.plugins.ilql import HEADS_FILE, HEADS_NAME, ILQLHeads, heads_of, load_heads, run_transformer, save_heads
from rlhfzoo.policy import HFPolicy, HFPolicyConfig, build_rollout


class ILQLPolicyConfig(HFPolicyConfig):
    path: str | None = Field(
        None,
        description="A trained ILQL policy: the `policy/` directory of an ilql run (or the run directory), holding "
        "ilql_heads.safetensors. Null: `init` gives the LM and the heads come from training with algorithm ilql.",
    )
    beta: float = Field(8.0, ge=0, description="Advantage weight: sample from log pi(a|s) + beta (Q(s,a) - V(s)); 0: the base LM.")
    top_k: int = Field(0, ge=0, description="Sample among the k tokens with the highest perturbed score (0: all).")
    base_top_p: float = Field(
        1.0, gt=0, le=1,
        description="Support constraint: only tokens in the base LM's nucleus of this mass can be sampled, then "
        "reweighted by the advantage (1: off). Keeps decoding where the data put Q's training signal; Q of "
        "tokens the data never took is an extrapolation.",
    )


def nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """[..., V] bool: the smallest set of most likely tokens of softmax(scores) holding mass >= top_p."""
    probs = scores.softmax(-1)
    sorted_p, idx = probs.sort(-1, descending=True)
    keep_sorted = sorted_p.cumsum(-1) - sorted_p < top_p  # the mass before this token is short of top_p
    return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)


class ILQLPolicy(HFPolicy):
    """The base LM perturbed by the ILQL advantage at every decoding step."""

    name = "ilql"
    aliases = ()
    summary = "ILQL decoding: sample from log pi(a|s) + beta (min Q'(s,a) - V(s)) with a trained ILQL run's heads."
    paper = "Snell et al. 2022, arXiv:2206.11871"
    Config = ILQLPolicyConfig

    @classmethod
    def required_stages(cls, config: ILQLPolicyConfig) -> list[str]:
        """A trained run's `path` holds the weights: no stage is read then."""
        return [] if config.path is not None else super().required_stages(config)

    def __init__(self, config: ILQLPolicyConfig | None = None, task: Any = None, model: torch.nn.Module | None = None, tokenizer: Any = None):
        config = config or ILQLPolicyConfig()
        path = None
        if config.path is not None and model is None:
            path = Path(config.path)
            if (path / "policy" / HEADS_FILE).exists():
                path = path / "policy"
            if not (path / HEADS_FILE).exists():
                raise ValueError(
                    f"ilql policy: no {HEADS_FILE} in {config.path}; give the `policy/` directory (or the run directory) of a run "
                    "trained with `algorithm: {name: ilql}`"
                )
            config = config.model_copy(update={"init": str(path)})
        super().__init__(config, task=task, model=model, tokenizer=tokenizer)
        if path is not None:
            self.attach(HEADS_NAME, load_heads(path, self.transformer()), save=save_heads)

    @classmethod
    def wrap(cls, policy: HFPolicy, beta: float, top_k: int = 0, base_top_p: float = 1.0) -> "ILQLPolicy":
        """A decoding view of a trained `hf` policy (shares its module, with the heads attached to
        it, its tokenizer and its counters)."""
        if not isinstance(policy, HFPolicy):
            raise TypeError(f"ilql decoding needs an `hf` policy (a transformers causal LM), not {policy.name!r}")
        cfg = ILQLPolicyConfig(**{**policy.config.model_dump(), "beta": beta, "top_k": top_k, "base_top_p": base_top_p})
        view = cls(cfg, task=policy.task, model=policy.module, tokenizer=policy.tokenizer)
        view.counters = policy.counters
        return view

    @property
    def heads(self) -> ILQLHeads:
        heads = heads_of(self)
        if heads is None:
            raise RuntimeError("ilql policy: no ILQL heads; set `path:` to a trained ilql run, or train with algorithm ilql")
        return heads

    # ---------------------------------------------------------------------------- decoding
    def _scores(self, h: torch.Tensor, hv: torch.Tensor, cfg: ILQLPolicyConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """(perturbed scores, base log-probs) [B, V] of the next token from the LM's last hidden
        states h [B, H] and those the heads read, hv (the value trunk's, or h itself)."""
        head = self.output_layer()
        logits = F.linear(h, head.weight, head.bias).float()
        logp = torch.log_softmax(logits / cfg.temperature, -1)
        scores = logp if cfg.beta == 0 else logp + cfg.beta * self.heads.advantage(hv).float()
        if cfg.base_top_p < 1.0:
            scores = scores.masked_fill(~nucleus(logp, cfg.base_top_p), float("-inf"))
        return scores, logp

    @staticmethod
    def _filter(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
        if top_k and top_k < scores.shape[-1]:
            kth = scores.topk(top_k, -1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p < 1.0:
            scores = scores.masked_fill(~nucleus(scores, top_p), float("-inf"))
        return scores

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, attn: torch.Tensor, cfg: ILQLPolicyConfig, forced: torch.Tensor | None = None):
        """Token-by-token decoding with the base LM's KV cache from left-padded prompts.

        Returns (generated tokens [B, L], per-step normalised perturbed log-probs [B, L, V]
        when `forced` is given (teacher forcing, for tests) else None, and the log-prob of each
        generated token under the distribution it was drawn from [B, L])."""
        transformer = self.transformer()
        device = next(transformer.parameters()).device
        ids, attn = ids.to(device), attn.to(device)
        eos, pad_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        steps = forced.shape[1] if forced is not None else cfg.max_new_tokens
        # The LM and, when the heads have their own, the value trunk step in lockstep, each with its KV cache.
        trunk = self.heads.trunk if cfg.beta != 0 else None
        h, past = run_transformer(transformer, ids, attn, use_cache=True)
        hv, past_v = run_transformer(trunk, ids, attn, use_cache=True) if trunk is not None else (h, None)
        h, hv = h[:, -1], hv[:, -1]
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        tokens, dists, chosen = [], [], []
        for t in range(steps):
            scores, _ = self._scores(h, hv, cfg)
            logp = torch.log_softmax(self._filter(scores, cfg.top_k, cfg.top_p), -1)
            if forced is not None:
                dists.append(logp)
                nxt = forced[:, t].to(device)
            else:
                nxt = torch.multinomial(logp.exp(), 1).squeeze(-1)
            chosen.append(logp.gather(-1, nxt[:, None]).squeeze(-1).masked_fill(finished, 0.0))
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            tokens.append(nxt)
            finished |= nxt == eos
            if t == steps - 1 or (forced is None and bool(finished.all())):
                break
            pos = attn.long().sum(-1, keepdim=True)  # real tokens so far = position of the new token
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            h, past = run_transformer(transformer, nxt[:, None], attn, pos, past, use_cache=True)
            hv, past_v = run_transformer(trunk, nxt[:, None], attn, pos, past_v, use_cache=True) if trunk is not None else (h, None)
            h, hv = h[:, -1], hv[:, -1]
        gen = torch.stack(tokens, 1)
        return gen, (torch.stack(dists, 1) if forced is not None else None), torch.stack(chosen, 1)

    def encode_prompts(self, prompts: Sequence[str], cfg: ILQLPolicyConfig) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = [prompt_ids(self.tokenizer, p)[-(cfg.max_length - cfg.max_new_tokens):] for p in prompts]
        return pad(encoded, self.tokenizer.pad_token_id, side="left"), pad([[1] * len(e) for e in encoded], 0, side="left")

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], **sampling: Any) -> Rollout:
        cfg = self.config.model_copy(update=sampling) if sampling else self.config
        ids, attn = self.encode_prompts(prompts, cfg)
        was_training = self.module.training
        self.module.eval()
        try:
            gen, _, chosen = self.decode(ids, attn, cfg)
        finally:
            self.module.train(was_training)
        rollout = build_rollout(self, prompts, ids, attn, gen)
        # Log-probs of the decoding policy itself (perturbed, filtered), not of the base LM that
        # build_rollout recomputes: KL to a reference is then the KL of what was sampled.
        P = ids.shape[1]
        own = torch.zeros_like(rollout.logprobs)
        own[:, P - 1 : P - 1 + chosen.shape[1]] = chosen.float().cpu()
        rollout.logprobs = own * rollout.response_mask[:, 1:]
        return rollout

    def frozen_copy(self) -> "ILQLPolicy":
        module = copy.deepcopy(self.module)
        module.requires_grad_(False)
        module.eval()
        return ILQLPolicy(self.config, task=self.task, model=module, tokenizer=self.tokenizer)
