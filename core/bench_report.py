"""What `rlhfzoo bench` writes: the leaderboard's markdown and its plots (frontier.png,
improvement.png, curves.png), from what `bench_stats.analyse` computes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rlhfzoo.bench_plan import BASELINE, RunSpec, protocol


def fmt(stat: dict | None, digits: int = 3) -> str:
    """`mean [low, high]` with the bootstrap interval where there is one, else `mean ± t half-width`
    over seeds (one seed: ± 1.96 prompt- or pair-level SE)."""
    if not stat:
        return "–"
    m = stat["mean"]
    if stat.get("ci") and all(math.isfinite(c) for c in stat["ci"]):
        return f"{m:.{digits}f} [{stat['ci'][0]:.{digits}f}, {stat['ci'][1]:.{digits}f}]"
    ci = stat.get("ci95", float("nan"))
    spread = ci if not math.isnan(ci) else 1.96 * stat.get("prompt_se", stat.get("pair_se", float("nan")))
    return f"{m:.{digits}f} ± {spread:.{digits}f}" if not math.isnan(spread) else f"{m:.{digits}f}"


def ranks(rows: list[dict], pairs: list[dict]) -> dict[str, int]:
    """Rank of each row with gold: 1 + the number of rows resolved better than it (the difference's
    interval excludes 0). Rows nothing separates share a rank: ties are reported as ties."""
    better = {(p["a"], p["b"]) for p in pairs if p["verdict"] == "better"}
    labels = [r["algorithm"] for r in rows if r.get("gold")]
    return {x: 1 + sum((y, x) in better for y in labels if y != x) for x in labels}


def markdown(rows: list[dict], meta: dict, analysis: dict | None = None) -> str:
    """The leaderboard: the table of rows (best first, tied ranks), then, where the rows were
    sampled, the matched-KL frontier and the resolved and unresolved pairs."""
    from rlhfzoo.bench_frontier import frontier_markdown

    analysis = analysis or {}
    pairs = analysis.get("pairwise") or []
    rank = ranks(rows, pairs)
    vs_sft = {p["a"]: p for p in pairs if p["b"] == BASELINE}
    budget = meta.get("budget")
    lines = [
        f"# rlhfzoo bench — task `{meta['task']}`",
        "",
        f"{meta['date']}, {meta['machine']}; command: `{meta['command']}`",
        "",
        "Gold, proxy and KL: mean over seeds and held-out prompts [95 % bootstrap interval over seeds and prompts "
        "(one seed: prompts only, seed-to-seed variation not covered)]; without a bootstrap ± the t-based 95 % half-width over seeds. "
        "IQM: interquartile mean of the seeds' gold (rliable). Rank: 1 + the rows whose gold is resolved above this one (the interval "
        "of the paired difference excludes 0); rows nothing separates share a rank. Vs SFT: P(row > SFT) over seeds (rliable's "
        "probability of improvement) and the verdict. Win rate: share of held-out prompts whose gold beats the SFT policy's "
        "response (ties half). Elo: Bradley–Terry fit of all pairwise gold win rates. Pair acc.: share of the task's held-out "
        "preference pairs ordered as labelled by the implicit reward log pi/pi_ref or the reward model's score.",
        "",
    ]
    if budget:
        lines += [f"Budget: every row that can spend on it is held to {budget['axis']} = {budget['limit']:g} (its steps capped at "
                  f"{budget['step_cap']}x its protocol's); `budget` says what each row spent, or why it is not held.", ""]
    head = ["rank", "algorithm", "gold", "IQM", "proxy", "KL", "pair acc.", "vs SFT", "win vs SFT", "Elo",
            "optimizer steps", "generated tokens", "RM calls", "train s", "peak MiB"] + (["budget"] if budget else []) + ["status"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b = r.get("budget", {})
        gold = r.get("gold") or {}
        iqm = fmt({"mean": gold["iqm"], "ci": gold.get("iqm_ci")}) if "iqm" in gold else "–"
        sft = vs_sft.get(r["algorithm"])
        sft_cell = f"{sft['probability_of_improvement']['mean']:.2f} {sft['verdict']}" if sft else "–"
        cells = [
            str(rank.get(r["algorithm"], "–")), r["algorithm"], fmt(r.get("gold")), iqm, fmt(r.get("proxy")), fmt(r.get("kl"), 2),
            fmt(r.get("pair_accuracy")), sft_cell, f"{r['win_rate_vs_sft']:.2f}" if "win_rate_vs_sft" in r else "–",
            f"{r['elo']:.0f}" if r.get("elo") is not None else "–",
            f"{b.get('optimizer_steps', 0):.0f}", f"{b.get('generated_tokens', 0):.0f}", f"{b.get('reward_calls', 0):.0f}",
            f"{r['train_seconds']['mean']:.0f}" if "train_seconds" in r else "–",
            f"{r['peak_rss_mb']['mean']:.0f}" if "peak_rss_mb" in r else "–",
        ] + ([r.get("budget_held", "–")] if budget else []) + [r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if r.get("errors")]
    if failed:
        lines += ["", "Failures:"] + [f"- {r['algorithm']}: {e}" for r in failed for e in r["errors"]]
    if analysis.get("tuning"):
        lines += ["", "## Tuning (`--tune`)", "", tuning_markdown(analysis["tuning"])]
    if analysis.get("frontier"):
        lines += ["", "## Matched-KL frontier", "", frontier_markdown(analysis["frontier"], (analysis.get("bootstrap") or {}).get("interval", ""))]
    if pairs:
        lines += ["", "## Pairs", "", pairs_markdown(rows, pairs)]
    if analysis.get("checks"):
        from rlhfzoo.bench_checks import checks_markdown

        lines += ["", "## Literature checks", "", checks_markdown(analysis["checks"])]
    return "\n".join(lines) + "\n"


def pairs_markdown(rows: list[dict], pairs: list[dict]) -> str:
    """Every pair of rows with gold once, the better-ranked first: the paired gold difference, the
    probability of improvement, and whether the difference is resolved."""
    order = {r["algorithm"]: i for i, r in enumerate(rows)}
    lines = ["Gold difference a - b, paired over prompts, with its 95 % bootstrap interval; P(a > b) over seeds (rliable) with its "
             "interval. Resolved: the difference's interval excludes 0; otherwise a tie.", "",
             "| a | b | gold a - b | P(a > b) | verdict |", "|---|---|---|---|---|"]
    shown = sorted((p for p in pairs if order.get(p["a"], 0) < order.get(p["b"], 0)), key=lambda p: (order[p["a"]], order[p["b"]]))
    for p in shown:
        d, poi = p["gold_difference"], p["probability_of_improvement"]
        lines.append(f"| {p['a']} | {p['b']} | {fmt(d)} | {fmt(poi, 2)} | {'resolved: a better' if p['verdict'] == 'better' else 'resolved: b better' if p['verdict'] == 'worse' else 'tie'} |")
    resolved = sum(p["verdict"] != "tie" for p in shown)
    lines += ["", f"{resolved} of {len(shown)} pairs resolved, {len(shown) - resolved} ties."]
    return "\n".join(lines) + "\n"


def tuning_markdown(tuning: dict) -> str:
    """What `--tune` tried and chose for every tuned algorithm (validation gold per trial)."""
    lines = ["Trials scored by mean gold on validation prompts (held-out, disjoint from the test prompts of the table); "
             "the chosen setting ran with the bench's seeds.", "", "| algorithm | chosen | validation gold | trials |", "|---|---|---|---|"]
    for name, t in tuning.items():
        tried = "; ".join(f"{_setting(x['setting'])}: {x['validation_gold']:.3f}" if x["validation_gold"] is not None else f"{_setting(x['setting'])}: failed"
                          for x in t["trials"])
        lines.append(f"| {name} | {_setting(t['setting'])} | {t['validation_gold']:.3f} | {tried} |")
    return "\n".join(lines) + "\n"


def _setting(setting: dict | None) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}" for k, v in (setting or {}).items()) or "–"


def label_axes(ax, xlabel: str, ylabel: str, title: str, empty: str | None) -> None:
    """Labels, title and grid of a panel; its legend, or the text `empty` where it drew nothing."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if empty:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def plot_frontier(rows: list[dict], path: Path, entries: list[dict] | None = None) -> None:
    """Gold against KL per algorithm with error bars on both (the frontier's bootstrap intervals),
    from the SFT baseline at KL 0, and the common KL K* the frontier table compares at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for e in entries or []:
        pts = e["points"]
        xs, ys = [p["kl"] for p in pts], [p["gold"] for p in pts]
        xerr = [[max(0.0, p["kl"] - p.get("kl_ci", [p["kl"]] * 2)[0]) for p in pts], [max(0.0, p.get("kl_ci", [p["kl"]] * 2)[1] - p["kl"]) for p in pts]]
        yerr = [[max(0.0, p["gold"] - p.get("gold_ci", [p["gold"]] * 2)[0]) for p in pts], [max(0.0, p.get("gold_ci", [p["gold"]] * 2)[1] - p["gold"]) for p in pts]]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", capsize=3, label=e["algorithm"])
    if entries and math.isfinite(entries[0]["auc"]["kl_max"]):
        ax.axvline(entries[0]["auc"]["kl_max"], color="grey", linestyle=":", label="K* (common KL)")
    label_axes(ax, "KL(policy || SFT policy), nats per response", "held-out gold reward", "Gold reward against KL (matched-KL frontier)",
               "no gold reward on this task" if not entries else None)  # e.g. hh-rlhf: human labels only
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_improvement(rows: list[dict], pairs: list[dict], path: Path) -> None:
    """The probability-of-improvement matrix: cell (i, j) = P(row i > row j) over seeds, resolved
    pairs (gold difference interval excluding 0) marked with a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhfzoo.bench_stats import pairwise_matrix

    labels = [r["algorithm"] for r in rows if r.get("gold") and r.get("interval")]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * max(len(labels), 2), 1 + 0.5 * max(len(labels), 2)))
    if labels and pairs:
        matrix = pairwise_matrix(pairs, labels)
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="RdBu")
        fig.colorbar(image, ax=ax, label="P(row > column)")
        verdicts = {(p["a"], p["b"]): p["verdict"] for p in pairs}
        for i, a in enumerate(labels):
            for j, b in enumerate(labels):
                if i != j and math.isfinite(matrix[i][j]):
                    mark = "*" if verdicts.get((a, b)) in ("better", "worse") else ""
                    ax.text(j, i, f"{matrix[i][j]:.2f}{mark}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title("Probability of improvement (* resolved)")
    else:
        ax.text(0.5, 0.5, "no sampled rows with gold", ha="center", va="center", transform=ax.transAxes)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_curves(specs: list[RunSpec], results: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per row and figure (gold, proxy): the held-out evaluations during training against
    wall-clock seconds since training started (`elapsed` in metrics.jsonl; the final evaluation at
    the run's train seconds), averaged over seeds evaluation by evaluation. Wall-clock is the one
    axis every row shares: optimizer steps of an offline objective and iterations of an online one
    are not comparable quantities. Rows whose output is a scorer (reward models) have no such curve."""
    per_seed: dict[str, dict[str, list[list[tuple[float, float]]]]] = {}
    for spec, res in zip(specs, results):
        f = Path(spec.directory) / "train" / "metrics.jsonl"
        if spec.kind != "objective" or res.get("status") != "ok" or not f.exists() or protocol("objective", spec.name).evaluation != "sampled":
            continue
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        final = res.get("objective_eval", {})
        for key in ("gold", "proxy"):
            points = [(row["elapsed"], row[f"eval/{key}"]) for row in rows if f"eval/{key}" in row and "elapsed" in row]
            if key in final:
                points.append((res.get("train_seconds", points[-1][0] if points else 0.0), final[key]))
            if points:
                per_seed.setdefault(spec.label, {}).setdefault(key, []).append(points)
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for label, figures in per_seed.items():
        for key, seeds in figures.items():
            n = min(len(p) for p in seeds)
            curves.setdefault(label, {})[key] = [
                (sum(p[i][0] for p in seeds) / len(seeds), sum(p[i][1] for p in seeds) / len(seeds)) for i in range(n)
            ]
    return curves


def plot_curves(specs: list[RunSpec], results: list[dict], rows: list[dict], path: Path) -> None:
    """Gold and proxy reward during training against wall-clock seconds (policies), and beside them
    the reward models' held-out pair accuracy against their training seconds: a scorer's accuracy is
    not a policy's reward, so it gets its own panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    curves = training_curves(specs, results)
    for ax, key in zip(axes, ("gold", "proxy")):
        for label, c in curves.items():
            if key in c:
                ax.plot([x for x, _ in c[key]], [y for _, y in c[key]], marker=".", label=label)
        label_axes(ax, "training wall-clock, seconds", f"held-out {key} reward", f"{key} reward during training (mean over seeds)", None)
    ax = axes[2]
    scorers = [r for r in rows if r.get("kind") == "objective" and r.get("pair_accuracy") and not r.get("gold") and "train_seconds" in r]
    for r in scorers:
        acc = r["pair_accuracy"]
        ax.errorbar([r["train_seconds"]["mean"]], [acc["mean"]], yerr=[acc["ci95"] if math.isfinite(acc["ci95"]) else 1.96 * acc["pair_se"]],
                    marker="s", capsize=3, linestyle="none", label=r["algorithm"])
    label_axes(ax, "training wall-clock, seconds", "held-out pair accuracy", "reward models (scorers, not policies)",
               "no reward-model rows" if not scorers else None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"
