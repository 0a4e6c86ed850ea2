"""Reward models: the architecture, loading and scoring with text in and rewards out.

A reward model is the `hf` policy -- a causal LM -- with its scalar head
(`Policy.values`) read at the last non-padding token of `[bos] prompt response [eos]`:

    r(x, y) = w . h_T(x, y) + b        h_T: last hidden state at the final real token (the EOS)

It is trained by the `bradley-terry` (pairwise classifier, InstructGPT arXiv:2203.02155 Eq. 1) or
the `reward-regression` (value network on scalar ratings, MSE) objective of
`rlhfzoo.plugins.reward_model`, and saved like any policy (transformers directory + the head's
`value_head.safetensors`), so `RewardModel.load(path)` reads what `rlhfzoo train` wrote. Not a
plugin (it registers nothing): the helpers of `reward_model`; held-out figures live in
`reward_eval`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhfzoo.data.collate import TruncationStats, encode, pad
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import Chat, Policy, Text
from rlhfzoo.policy import HFPolicy, HFPolicyConfig

VALUE_HEAD_FILE = "value_head.safetensors"


class RewardModelError(UserError, ValueError):
    """A reward model cannot be loaded, cannot score its input, or returned something unusable (NaN)."""


RUN_HINT = (
    "give the `policy/` directory of a run of `algorithm: bradley-terry` (or `reward-regression`), or `path: auto` "
    "for the task's cached reward model"
)


def reward_model_problem(path: Path) -> str | None:
    """Why `path` is not a reward-model directory, from a cheap look at its files; None when it looks like one."""
    if not path.exists():
        return f"reward model directory {str(path)!r} does not exist; {RUN_HINT}"
    if not path.is_dir():
        return f"{str(path)!r} is a file, not a reward model directory; {RUN_HINT}"
    if not (path / "config.json").is_file():
        return f"{str(path)!r} holds no config.json: it is not a model directory, so not a reward model; {RUN_HINT}"
    if not (path / VALUE_HEAD_FILE).is_file():
        return (
            f"{str(path)!r} holds no {VALUE_HEAD_FILE}: it is a plain policy, not a reward model. Train one with "
            "`algorithm: {name: bradley-terry}` (configs/reward_model.yaml) and point `path` at its `policy/` directory"
        )
    return None


# ------------------------------------------------------------------------------ the forward pass


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] position of the last real token of each row (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(-1)


def sequence_rewards(policy: Policy, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y) [B] float32: the policy's scalar head (`Policy.values`) at the last real token of
    each row. It runs through the policy's (possibly DDP-wrapped) model, so that gradients are
    synchronised, and skips the log-probs."""
    try:
        values = policy.values(input_ids, attention_mask)
    except NotImplementedError as e:
        raise RewardModelError(
            f"{e}. Reward-model objectives set `needs_value_head` (the trainer then asks the policy for a head); "
            "to score, load a directory written by reward-model training"
        ) from None
    last = last_token_index(attention_mask)
    return values[torch.arange(len(last), device=last.device), last].float()


# ------------------------------------------------------------------------------ text in, reward out


class RewardModel:
    """Scores (prompt, response) texts with a policy's scalar head, in batches, with its own tokenizer.

    Over-long inputs are truncated (prompt from the left, then the response) and counted in
    `stats`; non-text input or text the tokenizer rejects raises `RewardModelError` naming the
    row; non-finite rewards raise `RewardModelError` (never a silent zero).
    """

    def __init__(self, policy: Policy, max_length: int | None = None, batch_size: int = 64, name: str = "reward model"):
        self.policy = policy
        self.tokenizer = policy.tokenizer
        self.max_length = max_length or getattr(policy.config, "max_length", 128)
        self.batch_size = batch_size
        self.name = name
        self.stats = TruncationStats()
        self.unknown_token_responses = 0

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", **kwargs: Any) -> "RewardModel":
        """A reward model from a directory written by reward-model training (`<run>/policy`)."""
        path = Path(path)
        problem = reward_model_problem(path)
        if problem:
            raise RewardModelError(problem)
        meta = path / "rlhfzoo_policy.json"
        try:
            saved = json.loads(meta.read_text()) if meta.is_file() else {}
            saved = saved.get("config", {}) if isinstance(saved, dict) else {}
            # A reward model never samples: max_new_tokens=1 keeps any saved max_length valid.
            policy = HFPolicy(HFPolicyConfig(init=str(path), max_length=saved.get("max_length", 128), max_new_tokens=1))
        except ValueError as e:  # a damaged rlhfzoo_policy.json or weights (LoadError), ...
            cause = getattr(e, "cause", "") or f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
            raise RewardModelError(
                f"could not load the reward model in {str(path)!r}: {cause}. Retrain it, or {RUN_HINT}"
            ) from None
        policy.module.requires_grad_(False)
        policy.module.eval()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        policy.module.to(device)
        return cls(policy, name=f"reward model {str(path)!r}", **kwargs)

    @classmethod
    def from_policy(cls, policy: Policy, **kwargs: Any) -> "RewardModel":
        """Score with a policy being trained (evaluation inside a run)."""
        return cls(policy, **kwargs)

    # -------------------------------------------------------------------------- encoding
    def encode(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[list[int]]:
        """Token ids of each (prompt, response), as the collator encodes them (a conversation with its chat template)."""
        if len(prompts) != len(responses):
            raise RewardModelError(f"{self.name} got {len(prompts)} prompts but {len(responses)} responses")
        unk = self.tokenizer.unk_token_id
        stats = TruncationStats()  # committed to self.stats only when every row encodes
        rows, unknown = [], 0
        for i, (p, r) in enumerate(zip(prompts, responses)):
            for what, text in (("prompt", p), ("response", r)):
                if not isinstance(text, (str, Chat)):
                    raise RewardModelError(f"{self.name}: {what} {i} is a {type(text).__name__}, not text: {text!r:.80}")
            try:
                ids, response_mask = encode(self.tokenizer, p, r, self.max_length, stats)
            except Exception as e:  # noqa: BLE001 -- tokenizers raise TypeError/ValueError/pyo3 errors
                raise RewardModelError(
                    f"{self.name} cannot tokenise example {i} (response {r!r:.80}): {type(e).__name__}: {e}. "
                    "Pass valid Unicode text (e.g. no lone surrogates)."
                ) from None
            unknown += unk is not None and any(t == unk for t, m in zip(ids, response_mask) if m)
            rows.append(ids)
        self.stats.sequences += stats.sequences
        self.stats.truncated += stats.truncated
        self.unknown_token_responses += unknown
        return rows

    # -------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Rewards [B] float32 on the CPU."""
        rows = self.encode(prompts, responses)
        out = torch.empty(len(rows), dtype=torch.float32)
        if not rows:
            return out
        module = self.policy.module
        device = next(module.parameters()).device
        was_training = module.training
        module.eval()
        try:
            order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths: less padding
            for k in range(0, len(order), self.batch_size):
                idx = order[k : k + self.batch_size]
                ids = pad([rows[i] for i in idx], self.tokenizer.pad_token_id)
                attn = pad([[1] * len(rows[i]) for i in idx], 0)
                out[idx] = sequence_rewards(self.policy, ids.to(device), attn.to(device)).cpu()
        finally:
            module.train(was_training)
        bad = (~torch.isfinite(out)).nonzero().flatten().tolist()
        if bad:
            raise RewardModelError(
                f"{self.name} returned non-finite rewards ({out[bad[0]].item()}) for {len(bad)} of {len(out)} inputs, "
                f"e.g. example {bad[0]} (response {responses[bad[0]]!r:.80}). Its weights may hold NaN/inf "
                "(a diverged run): retrain it or load an earlier checkpoint"
            )
        return out
