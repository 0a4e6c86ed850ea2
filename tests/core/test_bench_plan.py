"""Planning a bench: every bad argument, `--config`, `--set` or `--sweep` is one clear message
(a UserError) before any run starts, and no run directory can lie outside `--out`."""

import os
from pathlib import Path

import pytest

from rlhfzoo.bench import BenchError, build_parser, plan
from rlhfzoo.cli import main as cli_main
from rlhfzoo.errors import UserError


def parse(*argv, out):
    return build_parser().parse_args([*argv, "--out", str(out)])


def inside(path: str, out: Path) -> bool:
    return Path(path).resolve().is_relative_to(out.resolve())


def test_seeds_0_is_one_message_and_exit_2(tmp_path, capsys):
    out = tmp_path / "b"
    assert cli_main(["bench", "--algorithms", "dpo", "--seeds", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --seeds must be at least 1") and "Traceback" not in err
    assert not out.exists()  # nothing was run or written


@pytest.mark.parametrize("flag, value", [("--seeds", "-2"), ("--eval-prompts", "0"), ("--eval-prompts", "-5")])
def test_meaningless_counts_are_refused(flag, value, tmp_path):
    with pytest.raises(BenchError, match=f"^{flag} must be at least 1"):
        plan(parse("--algorithms", "dpo", flag, value, out=tmp_path))


def test_a_bad_set_is_reported_in_full_before_any_run(tmp_path):
    args = parse("--algorithms", "dpo,best-of-n", "--seeds", "2", "--set", "train.steps=0", "--set", "train.lr=-1",
                 "--set", "policy.n_layr=1", out=tmp_path)
    with pytest.raises(BenchError) as e:
        plan(args)
    message = str(e.value)
    for key in ("train.steps", "train.lr", "policy.n_layr", "Did you mean 'n_layer'?"):  # every problem, not the first
        assert key in message, message
    assert message.count("policy.n_layr") == 1  # one problem shared by every run is reported once
    assert not tmp_path.joinpath("runs").exists()


def test_set_of_the_algorithm_section_is_refused_not_ignored(tmp_path):
    """`--set algorithm.beta=...` used to be dropped silently (the bench builds each run's algorithm
    section itself); it is an error that names `--sweep`, the way to give an algorithm's option."""
    with pytest.raises(UserError, match=r"algorithm\.beta.*--sweep algorithm\.KEY=VALUE"):
        plan(parse("--algorithms", "dpo", "--set", "algorithm.beta=0.5", out=tmp_path))
    with pytest.raises(UserError, match="output_dir"):
        plan(parse("--algorithms", "dpo", "--set", "output_dir=x", out=tmp_path))
    assert not tmp_path.joinpath("runs").exists()


def test_bad_task_options_are_a_user_error_without_algorithms(tmp_path):
    with pytest.raises(UserError, match="task.bogus"):
        plan(parse("--set", "task.bogus=1", out=tmp_path))


def test_a_config_that_is_a_directory_or_has_bad_sections_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        plan(parse("--algorithms", "dpo", "--config", str(tmp_path), out=tmp_path / "b"))
    for text, where in (("task: 5\n", "task"), ("train: [1, 2]\n", "train"), ("trian: {steps: 2}\n", "trian")):
        config = tmp_path / "bench.yaml"
        config.write_text(text)
        with pytest.raises(UserError, match=where):
            plan(parse("--algorithms", "dpo", "--config", str(config), out=tmp_path / "b"))


def test_a_path_in_a_sweep_value_cannot_leave_out(tmp_path):
    out = tmp_path / "deep" / "b"
    with pytest.raises(BenchError, match="algorithm.reference"):  # not a valid value: refused before any run
        plan(parse("--algorithms", "dpo", "--seeds", "1", "--sweep", "algorithm.reference=cached,x/../../..", out=out))
    assert not (tmp_path / "deep").exists()


def test_duplicate_sweep_values_are_refused(tmp_path):
    with pytest.raises(BenchError, match="--sweep"):
        plan(parse("--algorithms", "dpo", "--sweep", "algorithm.beta=0.1,0.10", out=tmp_path))


def test_run_directories_are_built_from_safe_components(tmp_path):
    from rlhfzoo.bench_plan import run_directory

    out = tmp_path / "b"
    for label in ("../../evil", "x/../../..", "a/b", "..", ".hidden", "nul\0byte", "dpo beta=x/../../..", "C:\\temp"):
        d = run_directory(out, label, 0)
        assert inside(d, out / "runs"), (label, d)
        name = Path(d).parent.name
        assert name and not name.startswith(".") and "/" not in name and "\0" not in name and "\\" not in name
    assert Path(run_directory(out, "dpo beta=0.1", 2)) == out / "runs" / "dpo_beta-0.1" / "seed-2"  # unchanged names


def test_a_run_directory_resolving_outside_out_is_refused(tmp_path):
    from rlhfzoo.bench_plan import run_directory

    out, elsewhere = tmp_path / "b", tmp_path / "elsewhere"
    (out / "runs").mkdir(parents=True)
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "runs" / "dpo")
    with pytest.raises(BenchError, match="outside"):
        run_directory(out, "dpo", 0)


def test_every_planned_run_lies_inside_out(tmp_path):
    out = tmp_path / "b"
    specs = plan(parse("--algorithms", "dpo,best-of-n", "--seeds", "2", "--sweep", "algorithm.beta=0.1,0.5", out=out))
    assert {s.label for s in specs} == {"sft-baseline", "dpo beta=0.1", "dpo beta=0.5", "best-of-n"}
    assert len({s.directory for s in specs}) == len(specs) == 8
    assert all(inside(s.directory, out) for s in specs)


def test_the_stages_every_run_reads_are_listed_once_in_run_order(tmp_path):
    """What the bench builds before its first run: the baseline's SFT policy and reward model, then
    the SFT samples DPO's pairs come from; best-of-n reads nothing new. Without an SFT start or a
    reward model, nothing."""
    from rlhfzoo.bench_plan import stages_needed

    specs = plan(parse("--algorithms", "dpo,best-of-n", "--seeds", "2", out=tmp_path))
    needed = stages_needed(specs)
    assert [name for _, name in needed] == ["sft", "reward-model", "sft-samples", "sft-samples-test"]
    assert len({id(task) for task, _ in needed}) == 1 and needed[0][0].name == "sentiment"
    gold = plan(parse("--algorithms", "ppo-clip", "--seeds", "1", "--reward", "gold", "--set", "policy.init=scratch", out=tmp_path))
    assert stages_needed(gold) == []


# ---------------------------------------------------------------------------- what plugins declare (BenchProtocol)


def test_sweep_kl_runs_every_row_over_its_own_knob(tmp_path):
    specs = plan(parse("--algorithms", "dpo,best-of-n,ppo", "--seeds", "1", "--sweep", "kl", out=tmp_path))
    rows = [(s.label, s.variant) for s in specs]
    from rlhfzoo.registry import registry

    for kind, name, section in (("objective", "dpo", "algorithm"), ("policy", "best-of-n", "policy"), ("objective", "ppo-clip", "algorithm")):
        bench = registry.get(kind, name).cls.bench
        expected = [{f"{section}.{bench.kl_knob}": v} for v in bench.kl_sweep]
        assert [v for label, v in rows if label.startswith(name + " ")] == expected, name
    bon = [s for s in specs if s.name == "best-of-n"]
    assert [s.config["policy"]["n"] for s in bon] == list(registry.get("policy", "best-of-n").cls.bench.kl_sweep)
    assert bon[0].config["policy"]["base"] == {"name": "hf"}  # the baseline policy, handed to the option the protocol names


def test_the_reward_defaults_to_the_tasks_and_a_policy_row_has_no_algorithm(tmp_path):
    specs = plan(parse("--algorithms", "ppo,best-of-n", "--seeds", "1", out=tmp_path))
    by_name = {s.name: s for s in specs}
    assert by_name["ppo-clip"].config["reward"] == {"name": "reward-model", "path": "auto"}  # SentimentTask.default_reward
    assert "algorithm" not in by_name["best-of-n"].config and "algorithm" not in by_name["hf"].config
    assert by_name["best-of-n"].config["policy"]["reward"] == {"name": "reward-model", "path": "auto"}


def test_a_policy_without_a_bench_protocol_is_not_a_row(tmp_path):
    with pytest.raises(UserError, match="'transformers' is not registered"):
        plan(parse("--algorithms", "transformers", out=tmp_path))


def test_only_sampled_rows_are_evaluated_during_training(tmp_path):
    specs = {s.name: s for s in plan(parse("--algorithms", "dpo,bradley-terry", "--seeds", "1", out=tmp_path))}
    assert specs["dpo"].config["train"]["eval_every"] >= 1  # learning curves of a policy
    assert "eval_every" not in specs["bradley-terry"].config["train"]  # a reward model is not sampled from


def test_budget_holds_the_rows_that_can_spend_on_its_axis(tmp_path):
    from rlhfzoo.bench_plan import BUDGET_STEP_CAP
    from rlhfzoo.registry import registry

    specs = {s.name: s for s in plan(parse("--algorithms", "dpo,grpo,best-of-n", "--seeds", "1", "--budget", "generated_tokens=5000", out=tmp_path))}
    protocol_steps = {n: registry.get("objective", n).cls.bench.train["steps"] for n in ("dpo", "grpo")}
    assert specs["grpo"].config["train"]["budget"] == {"generated_tokens": 5000.0}
    assert specs["grpo"].config["train"]["steps"] == protocol_steps["grpo"] * BUDGET_STEP_CAP  # a cap; the budget ends the run
    assert "budget" not in specs["dpo"].config["train"] and specs["dpo"].config["train"]["steps"] == protocol_steps["dpo"]  # samples nothing
    everyone = {s.name: s for s in plan(parse("--algorithms", "dpo,grpo", "--seeds", "1", "--budget", "seconds=30", out=tmp_path / "b"))}
    assert all(everyone[n].config["train"]["budget"] == {"seconds": 30.0} for n in ("dpo", "grpo"))


@pytest.mark.parametrize("text, match", [("seconds", "must look like AXIS=AMOUNT"), ("joules=3", "unknown budget axis 'joules'"),
                                         ("seconds=-1", "positive"), ("seconds=abc", "must look like")])
def test_a_bad_budget_is_one_message(text, match, tmp_path):
    with pytest.raises(BenchError, match=match):
        plan(parse("--algorithms", "dpo", "--budget", text, out=tmp_path))
