"""The matched-KL frontier of `rlhfzoo bench`: algorithms compared at equal distance from the
starting policy (Gao et al. 2022 compare methods by their gold-reward-vs-KL curves).

Each algorithm's curve is its rows (one per value of its KL knob under `--sweep kl`), each point
the row's mean KL and mean gold reward over seeds and prompts, ordered by KL, starting from the
SFT baseline at KL 0 (every curve's origin: the policy all rows start from). Between points the
curve is linear; beyond its largest KL it is "not reached" -- never extrapolated. An algorithm
without a sweep has one point: its curve is the segment from the origin to it.

- gold at fixed KL values: by default 4 evenly spaced values K*/4, K*/2, 3K*/4, K*, where the
  common KL K* is the smallest of the algorithms' largest mean KL (among those that move away from
  the origin at all), so every curve reaches every default value; or an explicit list (then some
  curves may not reach some values).
- the area under each curve from 0 to K*, divided by K*: the mean gold over KL in [0, K*]
  (trapezoid rule, exact for the piecewise-linear curve). The primary ranking is by it.

Intervals: inside every replicate of the shared bootstrap (`bench_bootstrap`) the points move
(each row's mean KL and gold, the origin's gold) and the interpolation and area are redone. K* is
recomputed in each replicate, and with it the area's range and the default KL values (the
estimator is bootstrapped as a whole, so every curve reaches them in every replicate); an explicit
KL value a curve does not reach in a replicate leaves that replicate out, and `reached` reports
the share of replicates that reach it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rlhfzoo.bench_bootstrap import LEVEL, interval

GRID_POINTS = 4  # default fixed KL values: K*/4, K*/2, 3K*/4, K*


@dataclass(frozen=True)
class Point:
    """One row on a frontier: its mean KL and gold, and their bootstrap replicates (B,) if any."""

    label: str
    kl: float
    gold: float
    kl_replicates: np.ndarray | None = None
    gold_replicates: np.ndarray | None = None


def interpolate(curve_kl, curve_gold, at) -> np.ndarray:
    """Gold along the piecewise-linear curve through (curve_kl, curve_gold), ordered by KL, at the
    KL values `at`; NaN outside [smallest KL, largest KL] ("not reached": never extrapolated).
    Leading axes broadcast (one curve per bootstrap replicate): curve (..., n), at (..., K) or (K,)."""
    x, y, at = (np.asarray(v, dtype=np.float64) for v in (curve_kl, curve_gold, at))
    scalar = at.ndim == 0
    at = np.atleast_1d(at)
    if x.shape[-1] == 1:  # one point: a degenerate segment
        x, y = np.concatenate([x, x], axis=-1), np.concatenate([y, y], axis=-1)
    order = np.argsort(x, axis=-1, kind="stable")
    x, y = np.take_along_axis(x, order, -1), np.take_along_axis(y, order, -1)
    batch = np.broadcast_shapes(x.shape[:-1], at.shape[:-1])
    x, y = np.broadcast_to(x, batch + x.shape[-1:]), np.broadcast_to(y, batch + y.shape[-1:])
    at = np.broadcast_to(at, batch + at.shape[-1:])
    right = np.clip((x[..., None, :] < at[..., :, None]).sum(-1), 1, x.shape[-1] - 1)  # segment [right-1, right]
    x0, x1 = np.take_along_axis(x, right - 1, -1), np.take_along_axis(x, right, -1)
    y0, y1 = np.take_along_axis(y, right - 1, -1), np.take_along_axis(y, right, -1)
    width = x1 - x0
    t = np.divide(at - x0, width, out=np.ones_like(at), where=width > 0)
    out = y0 + t * (y1 - y0)
    out = np.where((at < x[..., :1]) | (at > x[..., -1:]) | np.isnan(at), np.nan, out)
    return out[..., 0] if scalar else out


def mean_gold(curve_kl, curve_gold, upto) -> np.ndarray:
    """The area under the curve from KL 0 to `upto`, divided by `upto`: its mean gold over KL in
    [0, upto] (trapezoid rule on every knot). NaN if the curve does not span [0, upto] or upto <= 0.
    Leading axes broadcast as in `interpolate`; `upto` has the leading shape (or is a scalar)."""
    x, y = np.asarray(curve_kl, dtype=np.float64), np.asarray(curve_gold, dtype=np.float64)
    upto = np.asarray(upto, dtype=np.float64)
    batch = np.broadcast_shapes(x.shape[:-1], upto.shape)
    x, y, upto = np.broadcast_to(x, batch + x.shape[-1:]), np.broadcast_to(y, batch + y.shape[-1:]), np.broadcast_to(upto, batch)
    ends = upto[..., None]
    knots = np.sort(np.concatenate([np.zeros_like(ends), np.clip(x, 0.0, ends), ends], axis=-1), axis=-1)
    area = np.trapezoid(interpolate(x, y, knots), knots, axis=-1)
    return np.where(upto > 0, area / np.where(upto > 0, upto, 1.0), np.nan)


def common_kl(max_kl: Sequence[float]) -> float:
    """K*: the smallest of the algorithms' largest mean KL, among those that move away from the
    origin at all (largest KL > 0); NaN if none does."""
    reaching = [k for k in max_kl if math.isfinite(k) and k > 0]
    return min(reaching) if reaching else float("nan")


def kl_grid(k_star: float, points: int = GRID_POINTS) -> list[float]:
    """The default fixed KL values: `points` evenly spaced values up to K*, K* included, 0 left out
    (there every curve is the baseline); empty if K* is not positive."""
    if not (math.isfinite(k_star) and k_star > 0):
        return []
    return [k_star * (i + 1) / points for i in range(points)]


def frontier(curves: dict[str, list[Point]], origin: Point | None = None, at: Sequence[float] | None = None,
             level: float = LEVEL) -> list[dict]:
    """Per algorithm (`curves`: algorithm -> its rows' points), with `origin` (the baseline at KL 0)
    prepended to every curve: its points, largest KL, gold at the KL values `at` (default: the grid
    up to K*) and mean gold over [0, K*], each with a bootstrap interval where every point has
    replicates. Sorted by that mean (the primary ranking), algorithms without one last.

    Each entry: {"algorithm", "rows" (how many of its own rows), "points": [{"label", "kl", "gold",
    "kl_ci", "gold_ci"}] (by KL, the origin first), "max_kl", "gold_at_kl": [{"kl", "gold", "ci",
    "reached"}], "auc": {"value", "ci", "kl_max" (K*)}}; NaN marks a value a curve does not reach
    (for the AUC: a curve that never leaves KL 0, or has no origin)."""
    full = {name: ([origin] if origin else []) + sorted(points, key=lambda p: p.kl) for name, points in curves.items() if points}
    max_kl = {name: max(p.kl for p in points) for name, points in full.items()}
    k_star = common_kl(list(max_kl.values()))
    grid = [float(k) for k in at] if at is not None else kl_grid(k_star)
    bootstrapped = all(p.kl_replicates is not None and p.gold_replicates is not None for pts in full.values() for p in pts)
    replicate_kl = {name: np.stack([p.kl_replicates for p in pts], axis=-1) for name, pts in full.items()} if bootstrapped else {}
    grid_replicates = None  # (B, K): the KL values in each replicate
    if bootstrapped:  # K* of every replicate, over the algorithms that define it
        eligible = [replicate_kl[name].max(-1) for name in full if max_kl[name] > 0]
        k_star_replicates = np.min(eligible, axis=0) if eligible else None
        if at is not None:
            grid_replicates = np.array(grid)
        elif grid and k_star_replicates is not None:  # the default grid follows K*
            grid_replicates = k_star_replicates[:, None] * np.array(kl_grid(1.0))
    entries = []
    for name, points in full.items():
        kl, gold = np.array([p.kl for p in points]), np.array([p.gold for p in points])
        at_point = interpolate(kl, gold, grid) if grid else np.array([])
        auc = float(mean_gold(kl, gold, k_star)) if max_kl[name] > 0 else float("nan")
        entry = {
            "algorithm": name,
            "rows": len(curves[name]),
            "points": [{"label": p.label, "kl": float(p.kl), "gold": float(p.gold)} for p in points],
            "max_kl": float(max_kl[name]),
            "gold_at_kl": [{"kl": k, "gold": float(v)} for k, v in zip(grid, at_point)],
            "auc": {"value": auc, "kl_max": k_star},
        }
        if bootstrapped:
            for p, row in zip(points, entry["points"]):
                row["kl_ci"], row["gold_ci"] = interval(p.kl_replicates, level), interval(p.gold_replicates, level)
            curve_kl, curve_gold = replicate_kl[name], np.stack([p.gold_replicates for p in points], axis=-1)
            if grid_replicates is not None:
                at_replicates = interpolate(curve_kl, curve_gold, grid_replicates)  # (B, K)
                for j, row in enumerate(entry["gold_at_kl"]):
                    reached = np.isfinite(at_replicates[:, j])
                    row["reached"] = float(reached.mean())
                    row["ci"] = interval(at_replicates[:, j], level) if math.isfinite(row["gold"]) else [float("nan")] * 2
            auc_ci = [float("nan")] * 2
            if math.isfinite(auc) and k_star_replicates is not None:
                auc_ci = interval(mean_gold(curve_kl, curve_gold, k_star_replicates), level)
            entry["auc"]["ci"] = auc_ci
        entries.append(entry)
    entries.sort(key=lambda e: -e["auc"]["value"] if math.isfinite(e["auc"]["value"]) else math.inf)
    return entries


def fmt_interval(value: float, ci: list[float] | None, digits: int = 3, missing: str = "not reached") -> str:
    """`value [low, high]`, the value alone without a finite interval, `missing` for NaN."""
    if not math.isfinite(value):
        return missing
    if ci and all(math.isfinite(c) for c in ci):
        return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return f"{value:.{digits}f}"


def frontier_markdown(entries: list[dict], interval_covers: str = "seeds and prompts", digits: int = 3) -> str:
    """The frontier as a markdown table: one row per algorithm (in the given order: by AUC),
    columns gold@KL=k for each fixed KL value and AUC (mean gold over KL in [0, K*]); each value
    with its 95 % bootstrap interval, "not reached" where the curve stops short (AUC: "–").
    `interval_covers`: what the intervals cover (`analyse(...)["bootstrap"]["interval"]`)."""
    if not entries:
        return "No gold-vs-KL frontier: no row has both a gold reward and a KL.\n"
    grid = [g["kl"] for g in entries[0]["gold_at_kl"]]
    k_star = entries[0]["auc"]["kl_max"]
    covered = "seeds and held-out prompts" if interval_covers == "seeds and prompts" else (
        "held-out prompts only (one seed: seed-to-seed variation is not covered)" if interval_covers == "prompts" else interval_covers)
    lines = [
        f"Matched-KL frontier: gold reward at fixed KL (linear interpolation along each algorithm's curve, from the SFT "
        f"baseline at KL 0; never extrapolated) and AUC, the area under the curve from KL 0 to K* = {k_star:.{digits}g} "
        f"(the smallest of the algorithms' largest KL) divided by K*, i.e. its mean gold over that range. "
        f"[95 % bootstrap interval over {covered}.]",
        "",
        "| algorithm | rows | max KL | " + " | ".join(f"gold@KL={k:.{digits}g}" for k in grid) + " | AUC |",
        "|---|---|---|" + "---|" * len(grid) + "---|",
    ]
    for e in entries:
        cells = [fmt_interval(g["gold"], g.get("ci"), digits) for g in e["gold_at_kl"]]
        auc = e["auc"]
        lines.append(f"| {e['algorithm']} | {e['rows']} | {e['max_kl']:.{digits}g} | " + " | ".join(cells)
                     + f" | {fmt_interval(auc['value'], auc.get('ci'), digits, missing='–')} |")
    return "\n".join(lines) + "\n"
