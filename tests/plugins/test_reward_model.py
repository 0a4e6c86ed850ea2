"""Reward models: the pairwise loss (margins, Song et al. utilities) against hand-computed values
and gradcheck, K-wise weighting, the evaluation figures, the `reward-model` source (selection by
name, normalisation, clipping, truncation, bad input, NaN), and learning on sentiment and HH."""

import json
import math

import pytest
import torch
from pydantic import ValidationError

from rlhfzoo.config import ConfigError, load_config
from rlhfzoo.errors import UserError
from rlhfzoo.data.collate import Collator
from rlhfzoo.interfaces import PreferencePair
from rlhfzoo import stages
from rlhfzoo.plugins.reward_eval import distribution_figures, expected_calibration_error, spearman
from rlhfzoo.plugins.reward_heads import RewardModel, RewardModelError, last_token_index, sequence_rewards
from rlhfzoo.plugins.reward_model import (
    REPORT_FILE,
    BradleyTerry,
    RewardModelSource,
    pairwise_loss,
    ranking_weights,
    utility,
)
from rlhfzoo.plugins.sentiment import SentimentTask
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.testing import TINY_POLICY
from rlhfzoo.trainer import Trainer


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def softplus(x):  # -log sigma(x)
    return math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------ the loss


def test_bradley_terry_hand_computed():
    # -log sigma(1 - (-1)) = log(1 + e^-2); equal rewards cost log 2
    assert pairwise_loss(t(1.0), t(-1.0)).item() == pytest.approx(softplus(2.0), rel=1e-12)
    assert pairwise_loss(t(0.3), t(0.3)).item() == pytest.approx(math.log(2), rel=1e-12)


def test_llama2_margin_hand_computed():
    # -log sigma(r_w - r_l - m): a margin raises the loss of a pair that is not separated by more than m
    loss = pairwise_loss(t(1.0, 1.0), t(-1.0, -1.0), margin=t(0.5, 3.0))
    assert loss.tolist() == pytest.approx([softplus(1.5), softplus(-1.0)], rel=1e-12)
    assert loss[1] > pairwise_loss(t(1.0), t(-1.0)).item()


def test_song_utilities_hand_computed():
    sw, sl = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(1.0))  # sigmoid(1), sigmoid(-1)
    d = sw - sl
    kw = dict(sigma=0.2, gamma=0.5)
    assert pairwise_loss(t(1.0), t(-1.0), utility_fn="log-sigmoid", **kw).item() == pytest.approx(softplus(d / 0.2), rel=1e-12)
    assert pairwise_loss(t(1.0), t(-1.0), utility_fn="power", **kw).item() == pytest.approx(-(d**0.5), rel=1e-12)
    assert pairwise_loss(t(1.0), t(-1.0), utility_fn="neg-power", **kw).item() == pytest.approx(d**-0.5, rel=1e-12)
    # with a margin m the utility sees d - m
    m = 0.1
    assert pairwise_loss(t(1.0), t(-1.0), margin=t(m), utility_fn="power", **kw).item() == pytest.approx(-((d - m) ** 0.5), rel=1e-12)


def test_power_utilities_continue_linearly_below_eps():
    eps = 0.01
    # power, gamma 1/2: U(x) = U(eps) + U'(eps)(x - eps) = 0.1 + 5 (x - 0.01) below eps
    assert utility(t(-0.2), "power", gamma=0.5, eps=eps).item() == pytest.approx(0.1 + 5 * (-0.21), rel=1e-12)
    # neg-power, gamma 1: U(eps) = -100, U'(eps) = 1e4
    assert utility(t(0.0), "neg-power", gamma=1.0, eps=eps).item() == pytest.approx(-100 - 1e4 * 0.01, rel=1e-12)
    for kind, g in (("power", 0.5), ("neg-power", 1.0)):
        # continuous and C^1 at eps, increasing and finite everywhere
        x = torch.tensor([eps - 1e-7, eps + 1e-7], dtype=torch.float64, requires_grad=True)
        u = utility(x, kind, gamma=g, eps=eps)
        (grad,) = torch.autograd.grad(u.sum(), x)
        assert u[0].item() == pytest.approx(u[1].item(), rel=1e-4)
        assert grad[0].item() == pytest.approx(grad[1].item(), rel=1e-4)
        xs = torch.linspace(-1, 1, 201, dtype=torch.float64)
        us = utility(xs, kind, gamma=g, eps=eps)
        assert torch.isfinite(us).all() and (us.diff() > 0).all()


@pytest.mark.parametrize("kind", ["none", "log-sigmoid", "power", "neg-power"])
def test_gradcheck(kind):
    torch.manual_seed(0)
    # rewards chosen so that no difference sits within 1e-3 of the eps kink
    chosen = torch.tensor([1.5, 0.2, -0.4, 2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-1.0, 0.9, -2.0, 1.0], dtype=torch.float64, requires_grad=True)
    margin = torch.tensor([0.3, 0.0, 0.1, 0.05], dtype=torch.float64)
    fn = lambda c, r: pairwise_loss(c, r, margin, utility_fn=kind, sigma=0.3, gamma=0.5, eps=0.02)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (chosen, rejected))


def test_ranking_weights_count_each_prompt_once():
    w = ranking_weights([0, 0, 0, 1, None, 2, 2, 2, 2, 2, 2])  # K=3 (3 pairs), K=2 (1 pair), a lone pair, K=4 (6 pairs)
    assert w.tolist() == pytest.approx([1 / 3] * 3 + [1.0, 1.0] + [1 / 6] * 6)
    sums = {g: sum(w[i].item() for i, x in enumerate([0, 0, 0, 1, None, 2, 2, 2, 2, 2, 2]) if x == g) for g in (0, 1, 2)}
    assert sums == pytest.approx({0: 1.0, 1: 1.0, 2: 1.0})


def test_config_checks():
    with pytest.raises(ValueError, match="gamma"):
        BradleyTerry.Config(utility="power", gamma=2.0)
    with pytest.raises(ConfigError, match="examples"):
        load_config(data={"task": {"name": "sentiment"}, "algorithm": {"name": "rm", "examples": "critiques"}})


# ------------------------------------------------------------------------------ the objective on a tiny model


@pytest.fixture(scope="module")
def task():
    return SentimentTask()


@pytest.fixture(scope="module")
def tiny(task):
    return HFPolicy(HFPolicyConfig(init="scratch", n_layer=1, n_embd=32, n_head=2, value_head=True), task=task)


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 0]
    # transformers' rule beside the mask: not the pad id either (here 9, the EOS when the tokenizer pads with it)
    ids = torch.tensor([[5, 6, 9, 9, 9], [9, 9, 7, 9, 9], [9, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 0], [1, 0, 0, 0, 0]])
    assert last_token_index(mask, ids, pad_token_id=9).tolist() == [1, 2, 0]


def test_reward_reads_the_last_real_token_only(task, tiny):
    torch.manual_seed(0)
    with torch.no_grad():
        tiny.module.value_head.weight.normal_()
    col = Collator(tiny.tokenizer)
    a = col([(0, PreferencePair("drama review : the plot was", "good .", "bad and dull and slow ."))])
    r = sequence_rewards(tiny, a.sequences.input_ids, a.sequences.attention_mask)
    # the same sequence with extra right padding scores the same
    pad = torch.nn.functional.pad
    ids = pad(a.sequences.input_ids, (0, 5), value=tiny.tokenizer.pad_token_id)
    mask = pad(a.sequences.attention_mask, (0, 5), value=0)
    assert torch.allclose(sequence_rewards(tiny, ids, mask), r, atol=1e-6)


def test_the_reward_is_the_head_on_the_last_real_tokens_hidden_state(tiny):
    """`sequence_rewards` (the head at every position, then the last real token's) against the head
    applied to the last real token's hidden state alone, with left and right padding."""
    torch.manual_seed(1)
    with torch.no_grad():
        tiny.module.value_head.weight.normal_()
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        hidden = tiny.hidden_states(ids, mask)
        expected = tiny.module.value_head(hidden[torch.arange(2), torch.tensor([2, 4])]).squeeze(-1)
        assert torch.allclose(sequence_rewards(tiny, ids, mask), expected, atol=1e-6)


def test_a_policy_without_a_scalar_head_cannot_score(task):
    plain = HFPolicy(HFPolicyConfig(init="scratch", n_layer=1, n_embd=32, n_head=2), task=task)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(RewardModelError, match="policy 'hf' has no value head.*needs_value_head"):
        sequence_rewards(plain, ids, torch.ones_like(ids))


def test_kwise_weighting_and_identical_pairs_in_the_loss(task, tiny):
    torch.manual_seed(0)
    with torch.no_grad():
        tiny.module.value_head.weight.normal_()
    p = "drama review : the plot was"
    data = [
        PreferencePair(p, "good .", "bad .", group=0), PreferencePair(p, "good .", "dull .", group=0),
        PreferencePair(p, "bad .", "dull .", group=0), PreferencePair(p + " not", "great .", "awful .", group=1),
        PreferencePair(p, "fine .", "fine ."),  # no preference: masked out
    ]
    col = Collator(tiny.tokenizer)
    obj = BradleyTerry(BradleyTerry.Config(examples="rankings"))
    obj.prepare(data, col, None)
    batch = col(list(enumerate(data)))
    out = obj.loss(batch, tiny)
    r_w = sequence_rewards(tiny, batch.sequences.input_ids, batch.sequences.attention_mask)
    r_l = sequence_rewards(tiny, batch.rejected.input_ids, batch.rejected.attention_mask)
    per = pairwise_loss(r_w, r_l)
    expected = (per[:3].mean() + per[3]) / 2  # each ranking (prompt) counts once
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.metrics["skipped_pairs"] == 1.0
    unweighted = BradleyTerry(BradleyTerry.Config(examples="rankings", ranking_weight=False))
    unweighted.prepare(data, col, None)
    assert unweighted.loss(batch, tiny).loss.item() == pytest.approx(per[:4].mean().item(), rel=1e-5)


def test_margin_option_uses_the_pair_labels(task, tiny):
    p = "drama review : the plot was"
    data = [PreferencePair(p, "good .", "bad .", margin=1.0), PreferencePair(p, "fine .", "dull .", margin=0.0)]
    col = Collator(tiny.tokenizer)
    batch = col(list(enumerate(data)))
    obj = BradleyTerry(BradleyTerry.Config(margin=True, margin_scale=2.0))
    r_w = sequence_rewards(tiny, batch.sequences.input_ids, batch.sequences.attention_mask)
    r_l = sequence_rewards(tiny, batch.rejected.input_ids, batch.rejected.attention_mask)
    expected = pairwise_loss(r_w, r_l, margin=torch.tensor([2.0, 0.0])).mean()
    assert obj.loss(batch, tiny).loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------ evaluation figures


def test_ece_and_spearman_hand_computed():
    # confidences 0.9 (right), 0.7 (wrong: p = 0.3), 0.55 (right): bins [0.9], [0.7], [0.55]
    p = torch.tensor([0.9, 0.3, 0.55])
    expected = (abs(1 - 0.9) + abs(0 - 0.7) + abs(1 - 0.55)) / 3
    assert expected_calibration_error(p) == pytest.approx(expected, rel=1e-6)
    assert expected_calibration_error(torch.tensor([0.75, 0.25, 0.75, 0.75])) == pytest.approx(0.0, abs=1e-9)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, rel=1e-6)  # ties averaged


def test_distribution_figures():
    fig = distribution_figures(["a", "a", "b", "b"], [0.0, 2.0, 1.0, 1.0])
    assert fig["within_prompt_std"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert fig["reward_std"] == pytest.approx(math.sqrt(0.5))


# ------------------------------------------------------------------------------ trained directory + reward source


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A tiny reward model trained for a few steps through the real trainer (finish() runs evaluate)."""
    out = tmp_path_factory.mktemp("rm") / "run"
    cfg = load_config(data={
        "task": {"name": "sentiment"}, "policy": dict(TINY_POLICY), "algorithm": {"name": "rm", "eval_examples": 64},
        "train": {"steps": 3, "batch_size": 8, "lr": 1e-3, "progress": False}, "output_dir": str(out),
    })
    summary = Trainer(cfg, log=lambda *_: None).fit()
    return out, summary


def test_run_writes_a_reward_model_and_its_evaluation(rm_dir):
    out, summary = rm_dir
    config = json.loads((out / "policy" / "config.json").read_text())  # the Hugging Face format, no separate head file
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and len(config["id2label"]) == 1
    assert not (out / "policy" / "value_head.safetensors").exists()
    on_disk = json.loads((out / "summary.json").read_text())["eval"]
    for key in ("accuracy", "bt_loss", "ece", "within_prompt_std", "reward_std", "gold_accuracy", "gold_spearman"):
        assert key in on_disk and math.isfinite(on_disk[key]), key
    assert on_disk["n_pairs"] == 64


def test_reward_model_source_by_name(rm_dir, task):
    out, _ = rm_dir
    cfg = load_config(data={"task": {"name": "sentiment"}, "algorithm": {"name": "sft"},
                            "reward": {"name": "reward-model", "path": str(out / "policy"), "batch_size": 3}})
    source = cfg.reward.create(task=task)
    prompts = ["drama review : the plot was"] * 5
    responses = ["good .", "bad .", "", "truly wonderful and moving .", "dull ."]
    r = source.score(prompts, responses)
    assert r.dtype == torch.float32 and r.shape == (5,)
    # the same scores one at a time, and from the model the run trained
    single = torch.cat([source.score(prompts[i : i + 1], responses[i : i + 1]) for i in range(5)])
    assert torch.allclose(r, single, atol=1e-5)
    assert source.metrics()["rm_calls"] == 10.0
    with pytest.raises(ConfigError, match="pth"):
        load_config(data={"task": {"name": "sentiment"}, "algorithm": {"name": "sft"}, "reward": {"name": "reward-model", "pth": "x"}})


def test_normalisation_and_clipping(rm_dir):
    out, _ = rm_dir
    path = str(out / "policy")
    prompts = ["drama review : the plot was"] * 6
    responses = ["good .", "bad .", "dull .", "fine .", "awful .", "great ."]
    raw = RewardModelSource(RewardModelSource.Config(path=path)).score(prompts, responses).double()
    fixed = RewardModelSource(RewardModelSource.Config(path=path, normalize="fixed", mean=0.5, std=2.0))
    assert torch.allclose(fixed.score(prompts, responses).double(), (raw - 0.5) / 2.0, atol=1e-6)
    running = RewardModelSource(RewardModelSource.Config(path=path, normalize="running"))
    running.score(prompts[:2], responses[:2])
    second = running.score(prompts[2:], responses[2:]).double()
    mean, std = raw.mean(), raw.std(unbiased=False)  # the stats of everything seen so far
    assert torch.allclose(second, (raw[2:] - mean) / std, atol=1e-5)
    assert running.metrics()["rm_running_mean"] == pytest.approx(mean.item(), abs=1e-6)
    clip = 0.5 * (raw - raw.mean()).abs().max().item()
    clipped = RewardModelSource(RewardModelSource.Config(path=path, normalize="fixed", mean=raw.mean().item(), clip=clip))
    r = clipped.score(prompts, responses).double()
    assert r.abs().max().item() == pytest.approx(clip, rel=1e-6)
    assert clipped.metrics()["rm_clipped"] == float(((raw - raw.mean()).abs() > clip).sum())


def test_truncation_is_counted(rm_dir):
    out, _ = rm_dir
    source = RewardModelSource(RewardModelSource.Config(path=str(out / "policy"), max_length=16))
    r = source.score(["drama review : the plot was"] * 2, ["good .", "good . " * 20])
    assert torch.isfinite(r).all()
    assert source.metrics()["rm_truncated"] == 1.0


def test_bad_input_is_a_clear_error(rm_dir):
    out, _ = rm_dir
    source = RewardModelSource(RewardModelSource.Config(path=str(out / "policy")))
    with pytest.raises(RewardModelError, match="response 1 is a NoneType"):
        source.score(["p", "p"], ["good .", None])
    with pytest.raises(RewardModelError, match="cannot tokenise example 0"):
        source.score(["p"], ["good \ud800 ."])  # a lone surrogate is not valid text
    with pytest.raises(RewardModelError, match="2 prompts but 1"):
        source.score(["p", "p"], ["good ."])
    source.score(["p"], ["zebra ."])  # a word outside the RM's vocabulary: scored, and counted
    assert source.metrics()["rm_unknown_token_responses"] == 1.0


def test_nan_from_the_model_raises(rm_dir):
    out, _ = rm_dir
    source = RewardModelSource(RewardModelSource.Config(path=str(out / "policy")))
    with torch.no_grad():
        source.model.module.score.weight.fill_(float("nan"))
    with pytest.raises(RewardModelError, match="non-finite"):
        source.score(["drama review : the plot was"], ["good ."])


def test_not_a_reward_model_directory(tmp_path, task):
    HFPolicy(HFPolicyConfig(init="scratch", n_layer=1, n_embd=32, n_head=2), task=task).save(str(tmp_path / "plain"))
    (tmp_path / "empty").mkdir()
    cases = {"plain": "not a reward model", "missing": "does not exist", "empty": "holds no config.json"}
    for name, problem in cases.items():
        with pytest.raises(ValidationError, match=problem):  # a config error, before anything is built
            RewardModelSource.Config(path=str(tmp_path / name))
        with pytest.raises(RewardModelError, match=problem):
            RewardModel.load(tmp_path / name)
    assert issubclass(RewardModelError, UserError)


def test_reward_model_files_that_do_not_load(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "value_head.safetensors").write_bytes(b"")
    with pytest.raises(RewardModelError, match=r"could not load the reward model in .*broken.*: ValueError"):
        RewardModel.load(broken)


def test_regression_objective_trains_and_evaluates(tmp_path):
    cfg = load_config(data={
        "task": {"name": "sentiment"}, "policy": dict(TINY_POLICY), "algorithm": {"name": "reward-regression", "eval_examples": 64},
        "train": {"steps": 2, "batch_size": 8, "lr": 1e-3, "progress": False}, "output_dir": str(tmp_path / "run"),
    })
    ev = Trainer(cfg, log=lambda *_: None).fit()["eval"]
    for key in ("rewarded_mse", "rewarded_spearman", "accuracy"):
        assert math.isfinite(ev[key])
    assert RewardModel.load(tmp_path / "run" / "policy").score(["p"], ["good ."]).shape == (1,)


# ------------------------------------------------------------------------------ learning


@pytest.mark.learning
def test_sentiment_reward_model_agrees_with_held_out_labels(task):
    """The task's `reward-model` stage (trained once per cache) on sentiment's noisy held-out pairs."""
    path = stages.build("reward-model", task)
    report = json.loads((path / REPORT_FILE).read_text())["eval"]
    print("sentiment RM:", {k: round(v, 3) for k, v in report.items()})
    # The held-out labels are noisy (the task flips many of them), so agreement with them is capped
    # well below 1: ask for it clearly above chance (5 standard errors), and more with the gold ordering.
    chance_se = math.sqrt(0.25 / report["n_pairs"])
    assert report["accuracy"] > 0.5 + 5 * chance_se, report
    assert report["gold_accuracy"] > report["accuracy"]  # the labels are noisy, the RM learned the gold ordering
    # `path: auto` scores with that same model
    source = RewardModelSource(RewardModelSource.Config(path="auto"), task=task)
    pairs = task.examples("pairs", "test")[:200]
    r_w = source.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    r_l = source.score([p.prompt for p in pairs], [p.rejected for p in pairs])
    assert ((r_w > r_l).float().mean().item()) >= 0.6


@pytest.mark.learning
def test_hh_reward_model_beats_chance(tmp_path):
    from rlhfzoo.plugins.hh_rlhf import resolve_data_path

    try:
        resolve_data_path(None)
    except FileNotFoundError:
        pytest.skip("the shared HH-RLHF sample is absent")
    cfg = load_config(data={
        "task": {"name": "hh-rlhf", "max_chars": 300},  # prompts cut to their latest 300 characters, replies to 300
        "policy": {"name": "hf", "init": "scratch", "n_layer": 1, "n_embd": 64, "n_head": 2, "max_length": 96},
        "algorithm": {"name": "bradley-terry"},
        "train": {"steps": 100, "batch_size": 32, "lr": 1e-3, "warmup_steps": 10, "progress": False},
        "output_dir": str(tmp_path / "hh"),
    })
    ev = Trainer(cfg, log=lambda *_: None).fit()["eval"]
    print("HH RM:", {k: round(v, 3) for k, v in ev.items()})
    assert ev["accuracy"] > 0.55, ev
