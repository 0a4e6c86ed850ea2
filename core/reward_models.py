"""Reward models: the architecture, loading and scoring, their held-out evaluation, and the cached
reward-model stage shared by online RL and the benchmark.

Architecture. A reward model is the `hf` policy -- a causal LM -- with its scalar head
(`LMWithHeads.value_head`) read at the last non-padding token of `[bos] prompt response [eos]`:

    r(x, y) = w . h_T(x, y) + b        h_T: last hidden state at the final real token (the EOS)

It is trained by the `bradley-terry` (pairwise classifier, InstructGPT arXiv:2203.02155 Eq. 1) or
the `reward-regression` (value network on scalar ratings, MSE) objective of
`rlhfzoo.plugins.reward_model`, and saved like any policy (transformers directory + the head's
`value_head.safetensors`), so `RewardModel.load(path)` reads what `rlhfzoo train` wrote.

Stage. `reward_model_path(task)` trains the task's default reward model once per cache (from the
task's SFT policy, `init: sft`), like `rlhfzoo.stages.sft_policy_path`; `reward-model` sources
with `path: auto` and the benchmark all score with that one model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlhfzoo.data.collate import TruncationStats, encode, pad
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import Policy

VALUE_HEAD_FILE = "value_head.safetensors"
REPORT_FILE = "reward_model_report.json"


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


def head_rewards(module: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y) [B] float32 from an (unwrapped) `LMWithHeads`: its scalar head at the last real token,
    on the base model's hidden states (the vocabulary projection is skipped)."""
    if getattr(module, "value_head", None) is None:
        raise RewardModelError(
            "this policy has no scalar head: reward-model objectives set `needs_value_head` (the `hf` policy then "
            "adds one); to score, load a directory written by reward-model training"
        )
    last = last_token_index(attention_mask)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # as LMWithHeads.forward
    hidden = module.value_trunk.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return module.value_head(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


def sequence_rewards(policy: Policy, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y) [B] float32 of a policy being trained.

    Unwrapped (one process) this is `head_rewards` on the module; under DDP/FSDP it goes through
    the wrapper's forward (`return_values=True`, which also computes the unused log-probs) so
    that gradients are synchronised.
    """
    module = policy.module
    if policy.model is module:
        return head_rewards(module, input_ids, attention_mask)
    if getattr(module, "value_head", None) is None:
        return head_rewards(module, input_ids, attention_mask)  # raises the explanatory error
    last = last_token_index(attention_mask)
    values = policy.model(input_ids, attention_mask, return_values=True)["values"]
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
        from rlhfzoo.policy import HFPolicy, HFPolicyConfig

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
    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        if len(prompts) != len(responses):
            raise RewardModelError(f"{self.name} got {len(prompts)} prompts but {len(responses)} responses")
        unk = self.tokenizer.unk_token_id
        stats = TruncationStats()  # committed to self.stats only when every row encodes
        rows, unknown = [], 0
        for i, (p, r) in enumerate(zip(prompts, responses)):
            for what, text in (("prompt", p), ("response", r)):
                if not isinstance(text, str):
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
                out[idx] = head_rewards(module, ids.to(device), attn.to(device)).cpu()
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


# ------------------------------------------------------------------------------ evaluation


def rank(x: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties averaged."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = (a.norm() * b.norm()).item()
    return (a @ b).item() / denom if denom > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of the tie-averaged ranks)."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} vs {len(y)} values")
    return pearson(rank(x), rank(y)) if len(x) > 1 else float("nan")


def expected_calibration_error(p_chosen: torch.Tensor, n_bins: int = 10) -> float:
    """ECE of P(chosen > rejected) = sigma(r_w - r_l) against the labels (the chosen side won).

    The prediction is the side with p >= 1/2 at confidence c = max(p, 1 - p) in [1/2, 1];
    over equal-width bins of c: ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|
    (Guo et al. 2017, arXiv:1706.04599 Eq. 3; a tie p = 1/2 counts as half right).
    """
    p = p_chosen.double()
    conf = torch.maximum(p, 1 - p)
    correct = (p > 0.5).double() + 0.5 * (p == 0.5).double()
    bins = ((conf - 0.5) * 2 * n_bins).long().clamp(0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.double().mean().item() * abs(correct[m].mean().item() - conf[m].mean().item())
    return ece


def pair_figures(r_w: torch.Tensor, r_l: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out agreement with the labels, BT log-loss and calibration of rewards of pairs."""
    d = (r_w - r_l).double()
    w = torch.ones_like(d) if weights is None else weights.double()
    agree = (d > 0).double() + 0.5 * (d == 0).double()
    return {
        "accuracy": ((agree * w).sum() / w.sum()).item(),
        "bt_loss": ((-torch.nn.functional.logsigmoid(d) * w).sum() / w.sum()).item(),
        "ece": expected_calibration_error(torch.sigmoid(d)),
        "mean_abs_margin": d.abs().mean().item(),
        "n_pairs": float(len(d)),
    }


def distribution_figures(prompts: Sequence[str], rewards: Sequence[float]) -> dict[str, float]:
    """The reward distribution per prompt: mean within-prompt std against the overall std.

    Reward collapse (Song et al. 2023, arXiv:2305.17608) shows as every prompt getting the same
    spread of rewards; a within/overall ratio near 1 means the prompt explains none of the spread.
    """
    by_prompt: dict[str, list[float]] = {}
    for p, r in zip(prompts, rewards):
        by_prompt.setdefault(p, []).append(r)
    stds = [torch.tensor(v, dtype=torch.float64).std(unbiased=False).item() for v in by_prompt.values() if len(v) > 1]
    all_r = torch.tensor(list(rewards), dtype=torch.float64)
    total = all_r.std(unbiased=False).item() if len(all_r) > 1 else float("nan")
    within = sum(stds) / len(stds) if stds else float("nan")
    return {
        "reward_mean": all_r.mean().item() if len(all_r) else float("nan"),
        "reward_std": total,
        "within_prompt_std": within,
        "within_prompt_std_ratio": within / total if total and total > 0 else float("nan"),
    }


def evaluate_reward_model(
    score: Callable[[Sequence[str], Sequence[str]], torch.Tensor],
    task: Any,
    kinds: Sequence[str] = ("pairs",),
    max_examples: int | None = 2000,
) -> dict[str, float]:
    """Held-out figures of a scoring function on the task's test split.

    pairs: `accuracy` (agreement with the held-out labels, noisy where the task's are), `bt_loss`,
    `ece`, the per-prompt reward distribution, and with a gold reward `gold_accuracy` (agreement
    with the gold ordering) and `gold_spearman`. rankings: the same as `rankings_*`, a K-wise
    ranking's pairs weighted 1/C(K,2). rewarded: `rewarded_mse`, `_pearson`, `_spearman` against
    the ratings. Kinds the task does not have are skipped.
    """
    out: dict[str, float] = {}
    for kind in kinds:
        try:
            data = task.examples(kind, split="test")
        except ValueError:
            continue  # the task has no such data
        data = data[:max_examples] if max_examples else data
        if not data:
            continue
        prefix = "" if kind == "pairs" else f"{kind}_"
        if kind in ("pairs", "rankings"):
            texts = {}
            for e in data:
                texts.setdefault((e.prompt, e.chosen), None)
                texts.setdefault((e.prompt, e.rejected), None)
            keys = list(texts)
            rewards = score([p for p, _ in keys], [r for _, r in keys]).tolist()
            value = dict(zip(keys, rewards))
            r_w = torch.tensor([value[e.prompt, e.chosen] for e in data])
            r_l = torch.tensor([value[e.prompt, e.rejected] for e in data])
            sizes: dict[Any, int] = {}
            for e in data:
                if e.group is not None:
                    sizes[e.group] = sizes.get(e.group, 0) + 1
            weights = torch.tensor([1.0 / sizes[e.group] if e.group is not None else 1.0 for e in data])
            figures = {**pair_figures(r_w, r_l, weights), **distribution_figures([p for p, _ in keys], rewards)}
            if getattr(task, "has_gold_reward", False):
                gold = task.gold_reward([p for p, _ in keys], [r for _, r in keys]).tolist()
                g = dict(zip(keys, gold))
                gd = torch.tensor([g[e.prompt, e.chosen] - g[e.prompt, e.rejected] for e in data])
                rd = r_w - r_l
                m = gd != 0
                figures["gold_accuracy"] = ((rd[m] * gd[m] > 0).double().mean().item()) if m.any() else float("nan")
                figures["gold_spearman"] = spearman(rewards, gold)
            out.update({prefix + k: v for k, v in figures.items()})
        elif kind == "rewarded":
            pred = score([e.prompt for e in data], [e.response for e in data]).double()
            target = torch.tensor([e.reward for e in data], dtype=torch.float64)
            out[f"{prefix}mse"] = ((pred - target) ** 2).mean().item()
            out[f"{prefix}pearson"] = pearson(pred.tolist(), target.tolist())
            out[f"{prefix}spearman"] = spearman(pred.tolist(), target.tolist())
            out[f"{prefix}n"] = float(len(data))
    return {k: float(v) for k, v in out.items()}


# ------------------------------------------------------------------------------ the cached stage

# Train settings of the default reward model (a task may override them with a
# `reward_model_recipe()` returning {"algorithm": {...}, "train": {...}}): 300 steps of 32 pairs,
# about 40 s on two free CPU cores for sentiment's small model.
DEFAULT_TRAIN: dict[str, Any] = {"steps": 300, "batch_size": 32, "lr": 1e-3, "warmup_steps": 20, "lr_schedule": "cosine"}


def default_algorithm(task: Any) -> dict[str, Any]:
    """K-wise rankings where the task has them, else pairs.

    Rankings carry more comparisons per prompt than disjoint pairs of the same samples. On
    sentiment (label noise 0.5, 300 steps, the SFT policy of session 1) held-out agreement with the noisy labels was 0.64
    from pairs, 0.65 from rankings with InstructGPT's 1/C(K,2) weights and 0.68 from rankings
    unweighted: with pairs shuffled across batches (not a prompt's C(K,2) pairs in one batch, as
    InstructGPT does) and about one epoch, the weights mainly shrink the effective data.
    With the current SFT policy (more grammatical samples, so smaller gold gaps) label noise 0.5
    gave 0.61-0.65 for 300-1000 steps against a ceiling of 0.73 (the labels' own agreement with
    the gold ordering); the task's default is now 0.4, and at 0.35 300 steps gave 0.685.
    """
    try:
        task.examples("rankings", split="test")
    except (ValueError, KeyError, NotImplementedError):
        return {"name": "bradley-terry", "examples": "pairs"}
    return {"name": "bradley-terry", "examples": "rankings", "ranking_weight": False}


def reward_model_run_data(task: Any) -> dict[str, Any]:
    """The run config (as a mapping) of the task's reward-model stage. The key holds every task
    option (labels change the RM) and the SFT stage it starts from."""
    recipe = getattr(task, "reward_model_recipe", None)
    recipe = recipe() if callable(recipe) else {}
    return {
        "task": {"name": task.name, **task.config.model_dump(mode="json")},
        "policy": {"name": "hf", "init": "sft"},
        "algorithm": recipe.get("algorithm") or default_algorithm(task),
        "train": {**DEFAULT_TRAIN, **recipe.get("train", {}), "progress": False},  # eval_prompts > 0: evaluate() runs
    }


def reward_model_path(task: Any, log=print) -> Path:
    """Directory of the task's default reward model (a `RewardModel.load`-able policy dir), trained on first use."""
    from rlhfzoo import stages
    from rlhfzoo.artifacts import artifact
    from rlhfzoo.config import load_config
    from rlhfzoo.trainer import Trainer

    data = reward_model_run_data(task)
    key = {**data, "sft": stages.sft_run_data(task)}

    def build(tmp: Path) -> None:
        if log:
            log(f"[rlhfzoo] training the reward model for task {task.name!r} (cached for later runs)")
        cfg = load_config(data={**data, "output_dir": str(tmp / "run")})
        summary = Trainer(cfg, log=log).fit()
        report = {"eval": summary.get("eval", {}), "train_seconds": summary.get("train_seconds")}
        (tmp / "run" / "policy" / REPORT_FILE).write_text(json.dumps(report, indent=1))
        if log:
            figures = ", ".join(f"{k}={v:.3f}" for k, v in report["eval"].items() if isinstance(v, float) and math.isfinite(v))
            log(f"[rlhfzoo] reward model for {task.name!r}: {figures}")

    return artifact("reward-model", key, build, log=log) / "run" / "policy"
