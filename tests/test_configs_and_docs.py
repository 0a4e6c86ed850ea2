"""configs/, README and registry.yaml stay in step with what is registered."""

from pathlib import Path

import pytest
import yaml

from rlhfzoo.config import load_config
from rlhfzoo.registry import DEFAULTS, registry

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    raw = yaml.safe_load(path.read_text())
    if "algorithm" in raw:
        cfg = load_config(path)
    else:  # an inference-time policy (best-of-n): evaluated, not trained
        raw.pop("evaluate", None)
        cfg = load_config(data=raw, require=("task",))
        assert registry.get("policy", raw["policy"]["name"]).cls.bench is not None
    assert cfg.task is not None and cfg.policy is not None


def test_every_builtin_objective_has_a_runnable_config():
    used = {yaml.safe_load(p.read_text()).get("algorithm", {}).get("name") for p in CONFIGS} - {None}
    used = {registry.get("objective", n).name for n in used}
    builtin = {e.name for e in registry.entries("objective") if e.package == "rlhfzoo"}
    assert builtin <= used, f"objectives without a config in configs/: {sorted(builtin - used)}"


def test_readme_names_every_registered_name():
    readme = (REPO / "README.md").read_text()
    missing = [f"{e.kind} {e.name}" for e in registry.entries() if e.package == "rlhfzoo" and f"`{e.name}`" not in readme]
    assert not missing, f"README does not mention: {missing}"


def test_objective_configs_use_the_benchmark_budget():
    """configs/<objective>.yaml and `rlhfzoo bench` give an objective the same budget and options:
    its bench protocol's `train` and `options` (what the learning tests measure is what the
    bench runs)."""
    from rlhfzoo.config import load_config

    checked = 0
    for path in CONFIGS:
        if "algorithm" not in yaml.safe_load(path.read_text()):
            continue  # e.g. best_of_n.yaml: a policy, not a training run
        cfg = load_config(path)
        if cfg.task.entry.name != DEFAULTS["task"]:
            continue  # e.g. grpo-arithmetic.yaml: bench protocols declare the budget on the default task
        bench = cfg.algorithm.entry.cls.bench
        if not (bench.train or bench.options):
            continue
        train = cfg.train.model_dump()
        assert {k: train[k] for k in bench.train} == bench.train, path.name
        algorithm = cfg.algorithm.to_dict()
        assert {k: algorithm[k] for k in bench.options} == bench.options, path.name
        checked += 1
    assert checked >= 8
