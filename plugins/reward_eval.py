"""Held-out figures of a reward model (or any scoring function) on a task's test split: agreement
with the preference labels, Bradley-Terry log-loss, calibration (ECE), the per-prompt reward
distribution (reward collapse), agreement with a gold reward where the task has one, and the fit
of scalar ratings. Not a plugin (it registers nothing): used by the objectives of `reward_model`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


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
