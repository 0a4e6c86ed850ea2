"""`rlhfzoo bench --tune N`: the same tuning effort for every row, and none of it on the test prompts.

Every algorithm whose responses are scored by a gold reward gets N trials: N distinct settings drawn
(seeded, without replacement) from its search space -- `BenchProtocol.search` where the plugin
declares one, else its learning rate at 1/3, 1 and 3 times its protocol's, crossed with its KL
knob's values (`kl_knob`, `kl_sweep`). An inference-time row (best-of-n) searches its KL knob only.
Each trial trains once, with a seed of its own (never one of the final seeds), and is scored by the
mean gold reward of its responses to *validation* prompts: the task's held-out prompts after those
the final table is scored on (`--eval-prompts` of them, test) -- so the held-out prompts are split
in two, and `--tune` needs the task to have at least twice `--eval-prompts`. The best trial's setting
is then run with the bench's seeds and scored on the test prompts.

Rows that are not sampled (reward models) and tasks without a gold reward are not tuned: their
protocol settings run as they are, and the table says so. The settings a plugin ships (its bench
protocol, `configs/<name>.yaml`) were tuned by hand on the embedded tasks' test prompts; `--tune`
is the comparison that does not lean on them.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from rlhfzoo.bench_plan import BASELINE, DEFAULT_TRAIN, BenchError, RunSpec, protocol, run_directory
from rlhfzoo.config import apply_overrides

TRIAL_SEED = 1000  # trial k trains with seed TRIAL_SEED + k: no final seed (0, 1, ...) is spent on tuning
LR_FACTORS = (1 / 3, 1.0, 3.0)


def search_space(kind: str, name: str) -> dict[str, list[Any]]:
    """The dotted options a row's trials vary, each with its values (see the module docstring)."""
    bench = protocol(kind, name)
    if bench.search:
        return {key: list(values) for key, values in bench.search.items()}
    space: dict[str, list[Any]] = {}
    if kind == "objective":
        lr = bench.train.get("lr", DEFAULT_TRAIN["lr"])
        space["train.lr"] = [float(f"{lr * f:.3g}") for f in LR_FACTORS]
    if bench.kl_knob:
        space[f"{'algorithm' if kind == 'objective' else 'policy'}.{bench.kl_knob}"] = list(bench.kl_sweep)
    return space


def draw_trials(space: dict[str, list[Any]], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` distinct settings from the grid of `space` (all of them where the grid is smaller),
    drawn without replacement by a seeded generator: the same trials on every invocation."""
    keys = sorted(space)
    grid = [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]
    if n >= len(grid):
        return grid
    return random.Random(f"{seed}-{json.dumps(space, sort_keys=True, default=str)}").sample(grid, n)


def tunable(spec: RunSpec, has_gold: bool) -> bool:
    """Whether a planned row is tuned: a sampled row (not the baseline) on a task with a gold reward."""
    if spec.label == BASELINE or not has_gold:
        return False
    return protocol(spec.kind, spec.name).evaluation == "sampled"


def trial_specs(specs: list[RunSpec], n_trials: int, out: str | Path, has_gold: bool) -> list[RunSpec]:
    """The tuning runs of a planned bench: for every tuned algorithm (its first planned run as the
    template), one run per drawn trial, with a trial seed, scored on the validation prompts."""
    trials: list[RunSpec] = []
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen or not tunable(spec, has_gold):
            continue
        seen.add(spec.name)
        for k, setting in enumerate(draw_trials(search_space(spec.kind, spec.name), n_trials)):
            seed = TRIAL_SEED + k
            config = apply_overrides(spec.config, [f"{key}={json.dumps(v)}" for key, v in setting.items()])
            if spec.kind == "objective":
                config["train"].update(seed=seed, eval_prompts=0, eval_every=0)  # scored below, on validation prompts only
                config["output_dir"] = str(Path(run_directory(Path(out) / "tune", f"{spec.name} trial {k}", seed)) / "train")
            label = f"{spec.name} trial {k}"
            trials.append(replace(spec, label=label, seed=seed, config=config, variant=setting,
                                  directory=run_directory(Path(out) / "tune", label, seed), eval_offset=spec.eval_prompts))
    return trials


def validation_score(spec: RunSpec, result: dict[str, Any]) -> float | None:
    """A trial's mean gold reward on the validation prompts (None where it failed)."""
    f = Path(spec.directory) / "responses.json"
    if result.get("status") != "ok" or not f.exists():
        return None
    gold = json.loads(f.read_text()).get("gold") or []
    return sum(gold) / len(gold) if gold else None


def choose(trials: list[RunSpec], results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per algorithm: the chosen setting, its validation score and every trial's (ties: the first drawn)."""
    chosen: dict[str, dict[str, Any]] = {}
    for spec, result in zip(trials, results):
        score = validation_score(spec, result)
        entry = chosen.setdefault(spec.name, {"setting": None, "validation_gold": None, "trials": []})
        entry["trials"].append({"setting": spec.variant, "validation_gold": score})
        if score is not None and (entry["validation_gold"] is None or score > entry["validation_gold"]):
            entry.update(setting=spec.variant, validation_gold=score)
    return chosen


def apply_choice(specs: list[RunSpec], chosen: dict[str, dict[str, Any]]) -> list[RunSpec]:
    """The final runs with each tuned algorithm's chosen setting; an algorithm whose every trial
    failed is an error (nothing to choose from)."""
    failed = [name for name, c in chosen.items() if c["setting"] is None]
    if failed:
        raise BenchError(f"--tune: every trial of {', '.join(failed)} failed; see their logs under --out/tune, fix, and run again.")
    final = []
    for spec in specs:
        setting = chosen.get(spec.name, {}).get("setting")
        if setting:
            config = apply_overrides(spec.config, [f"{key}={json.dumps(v)}" for key, v in setting.items()])
            spec = replace(spec, config=config, variant={**spec.variant, **setting})
        final.append(spec)
    return final


def check_tune(args, n_held_out: int) -> None:
    """--tune's own checks, before anything runs."""
    if args.tune < 1:
        raise BenchError(f"--tune must be at least 1 (trials per algorithm), got {args.tune}.")
    if args.sweep:
        raise BenchError("--tune chooses each algorithm's setting itself; drop --sweep (or --tune).")
    if n_held_out < 2 * args.eval_prompts:
        raise BenchError(
            f"--tune scores its trials on validation prompts: held-out prompts beyond the {args.eval_prompts} test ones, as many again; "
            f"the task has {n_held_out}. Pass --eval-prompts {n_held_out // 2} or fewer."
        )
