"""What `rlhfzoo bench` writes: the leaderboard's markdown and its plots, from the rows
`bench_stats.aggregate` computes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rlhfzoo.bench_plan import RunSpec, protocol


def fmt(stat: dict | None, digits: int = 3) -> str:
    if not stat:
        return "–"
    m, ci = stat["mean"], stat.get("ci95", float("nan"))
    spread = ci if not math.isnan(ci) else 1.96 * stat.get("prompt_se", stat.get("pair_se", float("nan")))
    return f"{m:.{digits}f} ± {spread:.{digits}f}" if not math.isnan(spread) else f"{m:.{digits}f}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# rlhfzoo bench — task `{meta['task']}`",
        "",
        f"{meta['date']}, {meta['machine']}; command: `{meta['command']}`",
        "",
        "Gold, proxy and KL: mean over seeds ± 95 % CI (one seed: ± 1.96 prompt-level SE). Win rate: share of held-out "
        "prompts whose gold reward beats the SFT policy's response (ties half). Elo: Bradley–Terry fit of all pairwise gold win rates. "
        "Pair acc.: share of the task's held-out preference pairs ordered as labelled (ties half) by the implicit reward "
        "log pi/pi_ref (preference objectives) or the reward model's score, mean over seeds ± 95 % CI (one seed: ± 1.96 pair-level SE).",
        "",
        "| algorithm | gold | proxy | KL | pair acc. | win vs SFT | Elo | optimizer steps | generated tokens | RM calls | train s | peak MiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r.get("budget", {})
        wr = f"{r['win_rate_vs_sft']:.2f}" if "win_rate_vs_sft" in r else "–"
        elo = f"{r['elo']:.0f}" if r.get("elo") is not None else "–"
        ts = f"{r['train_seconds']['mean']:.0f}" if "train_seconds" in r else "–"
        mem = f"{r['peak_rss_mb']['mean']:.0f}" if "peak_rss_mb" in r else "–"
        lines.append(
            f"| {r['algorithm']} | {fmt(r.get('gold'))} | {fmt(r.get('proxy'))} | {fmt(r.get('kl'), 2)} | {fmt(r.get('pair_accuracy'))} | {wr} | {elo} | "
            f"{b.get('optimizer_steps', 0):.0f} | {b.get('generated_tokens', 0):.0f} | {b.get('reward_calls', 0):.0f} | {ts} | {mem} | {r['status']} |"
        )
    failed = [r for r in rows if r.get("errors")]
    if failed:
        lines += ["", "Failures:"] + [f"- {r['algorithm']}: {e}" for r in failed for e in r["errors"]]
    return "\n".join(lines) + "\n"


def plot_frontier(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("gold") and r.get("kl"):
            groups.setdefault(r["name"] if r["kind"] == "objective" else r["algorithm"], []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["kl"]["mean"])
        xs = [r["kl"]["mean"] for r in rs]
        ys = [r["gold"]["mean"] for r in rs]
        err = [r["gold"].get("ci95") if not math.isnan(r["gold"].get("ci95", float("nan"))) else 1.96 * r["gold"]["prompt_se"] for r in rs]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name, linestyle="-" if len(rs) > 1 else "none")
    ax.set_xlabel("KL(policy || SFT reference), nats per response")
    ax.set_ylabel("held-out gold reward")
    ax.set_title("Gold reward against KL (over-optimisation frontier)")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=8)
    else:  # e.g. hh-rlhf: human labels, no gold reward to plot
        ax.text(0.5, 0.5, "no gold reward on this task", ha="center", va="center", transform=ax.transAxes)
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
        ax.set_xlabel("training wall-clock, seconds")
        ax.set_ylabel(f"held-out {key} reward")
        ax.set_title(f"{key} reward during training (mean over seeds)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax = axes[2]
    scorers = [r for r in rows if r.get("kind") == "objective" and r.get("pair_accuracy") and not r.get("gold") and "train_seconds" in r]
    for r in scorers:
        acc = r["pair_accuracy"]
        ax.errorbar([r["train_seconds"]["mean"]], [acc["mean"]], yerr=[acc["ci95"] if math.isfinite(acc["ci95"]) else 1.96 * acc["pair_se"]],
                    marker="s", capsize=3, linestyle="none", label=r["algorithm"])
    ax.set_xlabel("training wall-clock, seconds")
    ax.set_ylabel("held-out pair accuracy")
    ax.set_title("reward models (scorers, not policies)")
    ax.grid(alpha=0.3)
    if scorers:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no reward-model rows", ha="center", va="center", transform=ax.transAxes)
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
