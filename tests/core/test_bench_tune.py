"""`--tune`: the same number of trials for every algorithm, drawn from its search space, scored on
validation prompts disjoint from the test prompts, with seeds no final run uses."""

import json
from types import SimpleNamespace

import pytest

from rlhfzoo.bench import BenchError, build_parser, plan
from rlhfzoo.bench_tune import TRIAL_SEED, apply_choice, check_tune, choose, draw_trials, search_space, trial_specs
from rlhfzoo.registry import registry


def planned(tmp_path, *argv):
    return plan(build_parser().parse_args([*argv, "--out", str(tmp_path)]))


def test_default_space_is_lr_around_the_protocols_crossed_with_the_kl_knob():
    dpo = registry.get("objective", "dpo").cls.bench
    lr = dpo.train["lr"]
    space = search_space("objective", "dpo")
    assert space["algorithm.beta"] == list(dpo.kl_sweep)
    assert space["train.lr"] == pytest.approx([lr / 3, lr, lr * 3], rel=1e-2)
    assert search_space("policy", "best-of-n") == {"policy.n": list(registry.get("policy", "best-of-n").cls.bench.kl_sweep)}


def test_trials_are_distinct_seeded_draws_and_the_whole_grid_when_small():
    space = {"a": [1, 2, 3], "b": [10, 20, 30]}
    four = draw_trials(space, 4)
    assert len(four) == 4 and len({json.dumps(t, sort_keys=True) for t in four}) == 4
    assert all(t["a"] in space["a"] and t["b"] in space["b"] for t in four)
    assert draw_trials(space, 4) == four  # the same trials on every invocation
    assert len(draw_trials(space, 50)) == 9


def test_trial_runs_use_their_own_seeds_and_the_validation_prompts(tmp_path):
    specs = planned(tmp_path, "--algorithms", "dpo,best-of-n,bradley-terry", "--seeds", "2", "--eval-prompts", "50")
    trials = trial_specs(specs, 3, tmp_path, has_gold=True)
    assert [t.label for t in trials] == [f"{n} trial {k}" for n in ("dpo", "best-of-n") for k in range(3)]  # a reward model is not tuned
    for t in trials:
        assert t.seed >= TRIAL_SEED and t.eval_offset == 50 and t.eval_prompts == 50  # prompts 50..99: none of the test ones
        assert str(tmp_path / "tune") in t.directory
    dpo = [t for t in trials if t.name == "dpo"]
    assert all(t.config["algorithm"]["beta"] == t.variant["algorithm.beta"] and t.config["train"]["lr"] == t.variant["train.lr"] for t in dpo)
    assert all(t.config["train"]["seed"] == t.seed and t.config["train"]["eval_prompts"] == 0 for t in dpo)
    assert trial_specs(specs, 3, tmp_path, has_gold=False) == []


def write_trial(spec, gold):
    from pathlib import Path

    Path(spec.directory).mkdir(parents=True, exist_ok=True)
    (Path(spec.directory) / "responses.json").write_text(json.dumps({"gold": gold}))
    return {"status": "ok"}


def test_the_best_validation_trial_is_chosen_and_applied_to_every_final_seed(tmp_path):
    specs = planned(tmp_path, "--algorithms", "dpo", "--seeds", "2", "--eval-prompts", "50")
    trials = trial_specs(specs, 3, tmp_path, has_gold=True)
    results = [write_trial(trials[0], [0.1, 0.3]), write_trial(trials[1], [0.5, 0.5]), {"status": "failed"}]
    chosen = choose(trials, results)
    assert chosen["dpo"]["setting"] == trials[1].variant and chosen["dpo"]["validation_gold"] == 0.5
    assert [t["validation_gold"] for t in chosen["dpo"]["trials"]] == [pytest.approx(0.2), 0.5, None]
    final = apply_choice(specs, chosen)
    tuned = [s for s in final if s.name == "dpo"]
    assert [s.seed for s in tuned] == [0, 1] and all(s.eval_offset == 0 for s in tuned)  # fresh seeds, test prompts
    assert all(s.config["algorithm"]["beta"] == trials[1].variant["algorithm.beta"] for s in tuned)
    with pytest.raises(BenchError, match="every trial of dpo failed"):
        apply_choice(specs, choose(trials, [{"status": "failed"}] * 3))


@pytest.mark.parametrize("args, match", [
    (dict(tune=0, sweep=None, eval_prompts=50), "at least 1"),
    (dict(tune=2, sweep="kl", eval_prompts=50), "drop --sweep"),
    (dict(tune=2, sweep=None, eval_prompts=150), "Pass --eval-prompts 100 or fewer"),
])
def test_bad_tune_arguments_are_one_message(args, match):
    with pytest.raises(BenchError, match=match):
        check_tune(SimpleNamespace(**args), n_held_out=200)
