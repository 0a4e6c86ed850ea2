"""Learning tests of the group-sampled objectives (GRPO, RLOO).

sentiment: configs/grpo.yaml and configs/rloo.yaml, trained from the cached SFT policy against the
task's cached reward model (`reward-model`, path auto), must raise the held-out gold reward over
the SFT policy by more than three standard errors (same 200 held-out prompts, same sampling seed).
Measured (one thread per run) from three builds of the cached stages (SFT gold -0.069 / -0.050 /
-0.054): GRPO +0.48 / +0.30 / +0.27 (7.7 / 5.3 / 5.2 SE; with beta 0.04 the first collapsed to -0.81
at KL 22); RLOO +0.27 / +0.36 / +0.46 / +0.22 (5.3 / 6.4 / 8.5 / 4.5 SE, train.seed 0-3, one build)
in ~20 s.

arithmetic: configs/grpo-arithmetic.yaml and configs/rloo-arithmetic.yaml, from the task's cached
SFT policy against the verifier, must raise held-out accuracy (the task's 500 test problems, same
sampling seed) by more than three standard errors. Measured from the stage, which trains until
its held-out accuracy reaches 0.4 (two initialisations, train.seed 0 / 1: SFT 0.50 / 0.43): GRPO
+0.11 / +0.20 (3.5 / 6.6 SE), RLOO +0.11 / +0.21 (3.5 / 6.7 SE), ~15-25 s each.

    pytest tests/plugins/test_group_relative_learning.py -m learning -s     # -s prints the figures
"""

import json
import math
import time
from pathlib import Path

import pytest

from rlhfzoo import stages
from rlhfzoo.config import load_config
from rlhfzoo.evaluation import evaluate
from rlhfzoo.plugins.arithmetic import ArithmeticTask
from rlhfzoo.plugins.sentiment import SentimentTask
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.trainer import Trainer

pytestmark = [pytest.mark.learning, pytest.mark.usefixtures("one_thread")]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
N_PROMPTS, SEED = 200, 0


def train(config: str, out: Path):
    """configs/<config>.yaml trained into `out` (no evaluation of its own): (config, trainer in eval mode, seconds)."""
    cfg = load_config(CONFIGS / f"{config}.yaml", [f"output_dir={out}", "train.eval_prompts=0", "train.progress=false"])
    trainer = Trainer(cfg, log=lambda *_: None)
    start = time.time()
    trainer.fit(overwrite=True)
    seconds = time.time() - start
    trainer.policy.model.eval()
    return cfg, trainer, seconds


@pytest.fixture(scope="module")
def sft_eval():
    task = SentimentTask()
    stages.build("sft", task, log=None)  # constructors only read a built stage
    policy = HFPolicy(HFPolicyConfig(init="sft"), task=task)
    policy.model.eval()
    return evaluate(policy, task, n_prompts=N_PROMPTS, seed=SEED)


@pytest.mark.parametrize("config", ["grpo", "rloo"])
def test_raises_held_out_gold_over_sft(config, sft_eval, tmp_path):
    out = tmp_path / config
    cfg, trainer, seconds = train(config, out)
    after = evaluate(trainer.policy, trainer.task, reference=trainer.reference_for_eval(), n_prompts=N_PROMPTS, seed=SEED)
    before = sft_eval
    gain = after["gold"] - before["gold"]
    se = math.sqrt(after["gold_se"] ** 2 + before["gold_se"] ** 2)
    print(f"\n{config}: gold {before['gold']:.3f} ± {before['gold_se']:.3f} -> {after['gold']:.3f} ± {after['gold_se']:.3f} "
          f"(+{gain:.3f} = {gain / se:.1f} SE), KL {after['kl']:.2f} ± {after['kl_se']:.2f}, {seconds:.0f} s training")
    assert gain > 3 * se, f"{config}: gold {before['gold']:.3f} -> {after['gold']:.3f}, not 3 SE ({3 * se:.3f}) better"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == cfg.train.steps and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["reward_mean"] > rows[0]["reward_mean"]  # the reward model's score rose too


@pytest.fixture(scope="module")
def arithmetic_sft():
    task = ArithmeticTask()
    stages.build("sft", task, log=None)
    policy = HFPolicy(HFPolicyConfig(init="sft"), task=task)
    policy.model.eval()
    return evaluate(policy, task, n_prompts=ARITHMETIC_PROMPTS, seed=SEED)


ARITHMETIC_PROMPTS = 500


@pytest.mark.parametrize("config", ["grpo-arithmetic", "rloo-arithmetic"])
def test_raises_held_out_accuracy_on_arithmetic(config, arithmetic_sft, tmp_path):
    out = tmp_path / config
    cfg, trainer, seconds = train(config, out)
    after, before = evaluate(trainer.policy, trainer.task, n_prompts=ARITHMETIC_PROMPTS, seed=SEED), arithmetic_sft
    assert after["n"] == before["n"] == ARITHMETIC_PROMPTS
    gain = after["accuracy"] - before["accuracy"]
    se = math.sqrt(after["gold_se"] ** 2 + before["gold_se"] ** 2)  # gold is the accuracy (format_reward 0)
    print(f"\n{config}: accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} (+{gain:.3f} = {gain / se:.1f} SE), "
          f"{seconds:.0f} s training")
    assert after["gold"] == after["accuracy"] and before["gold"] == before["accuracy"]
    assert gain > 3 * se, f"{config}: accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, not 3 SE ({3 * se:.3f}) better"

