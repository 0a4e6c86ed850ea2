"""The hierarchical bootstrap behind `rlhfzoo bench`'s intervals (after rliable: Agarwal et al.
2021, "Deep RL at the Edge of the Statistical Precipice").

A row's scores form a matrix `scores[seed, prompt]` (one response per held-out prompt), and every
row is scored on the same prompts in the same order. Each replicate resamples, with replacement,

- the held-out prompts: ONE resample shared by every row in that replicate, so comparisons between
  rows stay paired over prompts;
- the seeds: independently per row (each row's runs are its own draws of the training randomness).

A statistic is recomputed inside every replicate and its 95 % percentile interval reported. With
one seed only prompts are resampled: the interval then says nothing about seed-to-seed variation.
With few seeds (3-5) the percentile interval of seed-level variation is known to be somewhat too
narrow; resampling both levels is slightly conservative for the prompt-level part (crossed design).

Definitions follow rliable: IQM = the 25 % trimmed mean (as `scipy.stats.trim_mean(x, 0.25)`);
probability of improvement P(X > Y) = Mann-Whitney U / (n m), ties counting half.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

REPLICATES = 2000  # bootstrap replicates
SEED = 0  # the resampling's fixed seed: the same inputs give the same intervals
LEVEL = 0.95  # confidence level of every interval


def counts(indices: np.ndarray, size: int) -> np.ndarray:
    """(B, n) draws in [0, size) -> (B, size) times each value was drawn in each replicate."""
    rows = indices.shape[0]
    flat = indices + size * np.arange(rows)[:, None]
    return np.bincount(flat.ravel(), minlength=rows * size).reshape(rows, size)


@dataclass(frozen=True)
class Resampling:
    """One hierarchical bootstrap shared by all rows: `prompt_weights[b, p]` is how often prompt `p`
    is drawn in replicate `b` (the same for every row); `seed_indices[label][b]` are the row's
    seeds (positions in its score matrix) drawn in replicate `b`."""

    prompt_weights: np.ndarray
    seed_indices: dict[str, np.ndarray]
    seed: int = SEED

    @property
    def replicates(self) -> int:
        return self.prompt_weights.shape[0]

    @classmethod
    def draw(cls, prompts: int, seeds: dict[str, int], replicates: int = REPLICATES, seed: int = SEED) -> Resampling:
        """Resample `prompts` prompts and, per row label, its `seeds[label]` seeds. Each row's seed
        draws come from its own generator (keyed by the label), so adding a row leaves the others'
        replicates unchanged."""
        if prompts < 1 or replicates < 1:
            raise ValueError(f"a bootstrap needs at least one prompt and one replicate, got {prompts} and {replicates}")
        prompt_draws = np.random.default_rng([seed]).integers(0, prompts, size=(replicates, prompts))
        indices = {}
        for label, n in seeds.items():
            if n < 1:
                raise ValueError(f"row {label!r} has no seed to resample")
            rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
            indices[label] = rng.integers(0, n, size=(replicates, n))
        return cls(counts(prompt_draws, prompts).astype(np.float64), indices, seed)

    def per_seed(self, scores: np.ndarray, label: str) -> np.ndarray:
        """(B, S): in each replicate, the row's resampled seeds, each scored by its mean over the
        resampled prompts. `scores` is the row's (S, P) matrix."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape[1] != self.prompt_weights.shape[1]:
            raise ValueError(f"row {label!r} has {scores.shape[1]} prompts, the resampling {self.prompt_weights.shape[1]}")
        prompt_means = np.einsum("bp,sp->bs", self.prompt_weights, scores) / scores.shape[1]  # (B, S): every seed, resampled prompts
        return np.take_along_axis(prompt_means, self.seed_indices[label], axis=1)

    def mean(self, scores: np.ndarray, label: str) -> np.ndarray:
        """(B,): the row's mean score over resampled seeds and prompts in each replicate."""
        return self.per_seed(scores, label).mean(axis=1)


def iqm(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean (rliable's IQM): the mean of the middle 50 %, as `scipy.stats.trim_mean(x,
    0.25)` computes it (int(n / 4) values cut at each end), along `axis`."""
    x = np.sort(np.asarray(values, dtype=np.float64), axis=axis)
    n = x.shape[axis]
    cut = int(0.25 * n)
    return np.take(x, np.arange(cut, n - cut), axis=axis).mean(axis=axis)


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y) from samples x (..., n) and y (..., m): the share of the n m pairs where x wins,
    ties counting half (Mann-Whitney U / (n m), rliable's definition); over leading axes."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return 0.5 + 0.5 * np.sign(x[..., :, None] - y[..., None, :]).mean(axis=(-2, -1))


def interval(replicates: np.ndarray, level: float = LEVEL) -> list[float]:
    """Percentile interval [low, high] of a statistic's replicates (non-finite ones left out;
    [nan, nan] when none is finite)."""
    r = np.asarray(replicates, dtype=np.float64).ravel()
    r = r[np.isfinite(r)]
    if not r.size:
        return [float("nan"), float("nan")]
    low, high = np.percentile(r, [50 * (1 - level), 50 * (1 + level)])
    return [float(low), float(high)]


def intervals(replicates: np.ndarray, level: float = LEVEL) -> list[list[float]]:
    """`interval` of each row of (n, B) finite replicates, at once."""
    low, high = np.percentile(np.asarray(replicates, dtype=np.float64), [50 * (1 - level), 50 * (1 + level)], axis=-1)
    return [[float(lo), float(hi)] for lo, hi in zip(low, high)]


def verdict(difference_interval: list[float]) -> str:
    """"better" / "worse" when the interval of a difference excludes 0, else "tie"."""
    low, high = difference_interval
    return "better" if low > 0 else "worse" if high < 0 else "tie"
