"""The `sentiment` task: its language (generator, gold reward), tokenizer, the labels derived from
samples, and the SFT-samples stages they are read from.

No model is involved: "SFT-like" samples are drawn from the task's own generator (reviews of every
tone continuing each prompt) with some degenerate responses mixed in.
"""

import json
import math
import random
from collections import Counter

import pytest
import torch
from pydantic import ValidationError

from rlhfzoo.interfaces import Demonstration, PreferencePair, RewardedExample, UnpairedExample
from rlhfzoo.plugins import review_language as L
from rlhfzoo.plugins import sentiment as S
from rlhfzoo.plugins.critique import parse_rating
from rlhfzoo.plugins.sentiment import SentimentTask

P = "drama review : the acting was"  # opening continued by the hand-made responses below
GOOD = "truly wonderful . i loved the soundtrack ."
POSITIVE = "good ."
NEUTRAL = "long and quiet ."
NEGATIVE = "awful . i hated the ending ."
REPEATED = "wonderful wonderful wonderful wonderful wonderful wonderful"
REPEATED_SENTENCE = "wonderful . the plot was wonderful . the plot was wonderful ."
BROKEN = "wonderful the was plot superb ."
UNFINISHED = "wonderful . the plot was"
OVERLONG = (
    "wonderful . i loved the soundtrack . the plot was superb and clever . we adored the ending . "
    "the cast was brilliantly directed . i enjoyed the music ."
)


def degenerate(response: str, rng: random.Random) -> str:
    words = response.split()
    kind = rng.randrange(4)
    if kind == 0:
        return " ".join(words[:-1])  # cut before the end
    if kind == 1:
        return " ".join(words * 3)  # repeated
    if kind == 2:
        return " ".join(rng.sample(words, len(words)))  # shuffled
    return ""


def sft_like_samples(n_prompts=150, per_prompt=10, degenerate_rate=0.1, seed=0):
    rng = random.Random(seed)
    prompts = L.make_prompts(n_prompts, seed=0, split="test")
    samples = [
        [L.continue_review(rng, p) for _ in range(per_prompt)] for p in prompts
    ]
    samples = [[degenerate(r, rng) if rng.random() < degenerate_rate else r for r in rs] for rs in samples]
    return prompts, samples


class GeneratedSamplesTask(SentimentTask):
    """The task with its SFT samples drawn from the generator instead of a trained policy."""

    def samples(self, split="train"):
        return sft_like_samples(n_prompts=40, seed=1 if split == "train" else 2)


def gold(prompt, response):
    return L.gold_breakdown(prompt, response).gold


# ------------------------------------------------------------------------------ generator
def test_same_seed_same_data_and_different_seed_different_data():
    a, b = SentimentTask(SentimentTask.Config(n_demonstrations=300)), SentimentTask(SentimentTask.Config(n_demonstrations=300))
    c = SentimentTask(SentimentTask.Config(n_demonstrations=300, seed=1))
    for kind in ("demonstrations", "prompts"):
        assert repr(a.examples(kind)) == repr(b.examples(kind))
        assert a.examples(kind) != c.examples(kind)
    prompts, samples = sft_like_samples(n_prompts=30)
    assert S.preference_pairs(prompts, samples, 0.5, seed=0) == S.preference_pairs(prompts, samples, 0.5, seed=0)
    assert S.preference_pairs(prompts, samples, 0.5, seed=0) != S.preference_pairs(prompts, samples, 0.5, seed=1)
    assert S.ranking_pairs(prompts, samples, 0.5, seed=3) == S.ranking_pairs(prompts, samples, 0.5, seed=3)


def test_demonstrations_are_grammatical_bounded_and_near_neutral():
    demos = L.make_demonstrations(2000, seed=0)
    assert all(isinstance(d, Demonstration) for d in demos)
    assert all(L.is_grammatical(d.response, d.prompt) for d in demos)
    assert all(1 <= len(d.response.split()) <= 24 and "<eos>" not in d.response for d in demos)
    golds = [gold(d.prompt, d.response) for d in demos]
    mean = sum(golds) / len(golds)
    assert abs(mean) < 0.05, mean
    assert sum(g > 0.3 for g in golds) > 0.2 * len(golds) and sum(g < -0.3 for g in golds) > 0.2 * len(golds)
    assert max(golds) < 1.0 or sum(g == 1.0 for g in golds) < 0.05 * len(golds)  # room to improve
    assert all(L.prompt_split(d.prompt) == "train" for d in demos)


def test_prompts_are_distinct_and_train_and_test_are_disjoint():
    task = SentimentTask(SentimentTask.Config(n_prompts=300, n_test_prompts=100))
    train, test = task.examples("prompts", "train"), task.examples("prompts", "test")
    assert len(set(train)) == 300 and len(set(test)) == 100
    assert not set(train) & set(test)
    assert task.eval_prompts() == test
    assert all(p.split()[1:3] == ["review", ":"] for p in train + test)


# ------------------------------------------------------------------------------ gold reward
def test_gold_reward_orders_good_neutral_bad_and_degenerate():
    task = SentimentTask()
    responses = [GOOD, POSITIVE, NEUTRAL, NEGATIVE, REPEATED, REPEATED_SENTENCE, BROKEN, UNFINISHED, OVERLONG, ""]
    g = task.gold_reward([P] * len(responses), responses)
    assert g.dtype == torch.float32 and g.shape == (len(responses),)
    s = dict(zip(responses, g.tolist()))
    assert s[GOOD] > s[POSITIVE] > s[NEUTRAL] > s[NEGATIVE]
    assert s[GOOD] > 0.8 and s[NEUTRAL] == 0.0 and s[NEGATIVE] < -0.8
    for bad in (REPEATED, REPEATED_SENTENCE, BROKEN, UNFINISHED, OVERLONG, ""):
        assert s[bad] < s[NEUTRAL], bad
    assert s[""] == s[REPEATED] == s[BROKEN] == -1.0
    assert all(-1.0 <= x <= 1.0 for x in s.values())


def test_modifiers_and_the_prompt_opening():
    assert gold(P, "truly wonderful .") > gold(P, "wonderful .") > gold(P, "slightly wonderful .")
    assert gold(P, "not bad .") > 0 > gold(P, "not good .")
    assert gold(P, "good .") == 0.5
    # The response must continue the opening: a complete sentence on its own does not parse after it.
    assert gold("comedy review :", "the plot was good .") == 0.5
    assert gold("comedy review : the plot was", "the plot was good .") == -1.0
    assert L.is_grammatical("good .", P) and L.is_grammatical("the plot was good .")
    assert not L.is_grammatical("good .") and not L.is_grammatical("") and not L.is_grammatical(UNFINISHED, P)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        L.gold_scores([P, P], [GOOD])


def test_response_metrics():
    m = SentimentTask().response_metrics([P] * 4, [GOOD, NEGATIVE, BROKEN, REPEATED_SENTENCE])
    assert m["grammatical_rate"] == 0.75 and m["repetition"] > 0 and m["too_long_rate"] == 0


# ------------------------------------------------------------------------------ tokenizer
def test_tokenizer_covers_every_word_and_round_trips():
    task = SentimentTask()
    tok = task.tokenizer()
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == ("<pad>", "<eos>", "<bos>", "<unk>")
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}) == 4
    text = " ".join(L.VOCAB)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(L.VOCAB) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    demo = L.make_demonstrations(1, seed=0)[0]
    critique = S.critique_examples([P], [[GOOD]])[0]
    for s in (demo.prompt + " " + demo.response, critique.prompt + " " + critique.response):
        ids = tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert tok.unk_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == s
    assert task.tokenizer(padding_side="left").padding_side == "left" and tok.padding_side == "right"
    assert task.default_model_config()["arch"] == "gpt2"


# ------------------------------------------------------------------------------ derived labels
def test_preference_labels_agree_with_gold_within_the_human_like_band():
    prompts, samples = sft_like_samples()
    default = SentimentTask.Config().label_noise
    rates = {}
    for noise in (0.0, default):
        pairs = S.preference_pairs(prompts, samples, noise)
        decided = [(gold(p.prompt, p.chosen), gold(p.prompt, p.rejected)) for p in pairs]
        decided = [(a, b) for a, b in decided if a != b]
        rates[noise] = sum(a > b for a, b in decided) / len(decided)
    print(f"label agreement with the gold ordering at label_noise={default}: {rates[default]:.3f}")
    assert rates[0.0] == 1.0
    assert 0.65 <= rates[default] <= 0.80, rates


def test_margins_follow_the_gold_gap():
    prompts, samples = sft_like_samples(n_prompts=60)
    pairs = S.preference_pairs(prompts, samples, 0.5)
    assert all(p.chosen != p.rejected for p in pairs) and len(pairs) <= 60 * 5
    by_margin = {}
    for p in pairs:
        gap = abs(gold(p.prompt, p.chosen) - gold(p.prompt, p.rejected))
        assert p.margin == (1.0 if gap >= 0.5 else 0.5 if gap >= 0.2 else 0.0)
        by_margin.setdefault(p.margin, []).append(gap)
    assert set(by_margin) == {0.0, 0.5, 1.0}


def test_rankings_expand_to_k_choose_2_pairs_per_group():
    prompts, samples = sft_like_samples(n_prompts=50, degenerate_rate=0.0)
    pairs = S.ranking_pairs(prompts, samples, 0.5, k_min=4, k_max=9)
    assert all(isinstance(p, PreferencePair) and p.margin is None for p in pairs)
    groups = Counter(p.group for p in pairs)
    assert sorted(groups) == list(range(len(groups)))
    ks = []
    for g, count in groups.items():
        rows = [p for p in pairs if p.group == g]
        k = (1 + math.isqrt(1 + 8 * count)) // 2
        assert math.comb(k, 2) == count and len({r.prompt for r in rows}) == 1
        wins = Counter(r.chosen for r in rows)
        assert sorted(wins[x] for x in {r.chosen for r in rows} | {r.rejected for r in rows}) == list(range(k))
        ks.append(k)
    assert min(ks) >= 2 and max(ks) <= 9 and sum(4 <= k for k in ks) > 0.9 * len(ks)


def test_unpaired_rewarded_and_critiques():
    prompts, samples = sft_like_samples(n_prompts=60)
    unpaired = S.unpaired_examples(prompts, samples, 0.5)
    assert all(isinstance(u, UnpairedExample) for u in unpaired)
    assert abs(sum(u.desirable for u in unpaired) / len(unpaired) - 0.5) < 0.02
    good = [gold(u.prompt, u.response) for u in unpaired if u.desirable]
    bad = [gold(u.prompt, u.response) for u in unpaired if not u.desirable]
    assert sum(good) / len(good) > sum(bad) / len(bad) + 0.3

    rewarded = S.rewarded_examples(prompts, samples)
    assert all(isinstance(r, RewardedExample) and r.reward == gold(r.prompt, r.response) for r in rewarded)
    assert len(rewarded) == len(unpaired)

    critiques = S.critique_examples(prompts[:20], samples[:20])
    tok = SentimentTask().tokenizer()
    rows = [(p, r) for p, rs in zip(prompts[:20], samples[:20]) for r in dict.fromkeys(rs)]
    assert len(critiques) == len(rows)
    for c, (p, r) in zip(critiques, rows):
        assert c.prompt == S.judge_prompt(p, r) and c.prompt.startswith(f"judge : {p}") and c.prompt.endswith(" verdict :")
        assert parse_rating(c.response) == S.rating(gold(p, r))  # the critique reward source reads the rating
        assert tok.unk_token_id not in tok(c.prompt + " " + c.response)["input_ids"]
    assert (S.rating(-1.0), S.rating(0.0), S.rating(0.79), S.rating(1.0)) == (1, 6, 9, 10)
    assert parse_rating("fluent , positive [[8]]") == 8 and parse_rating("no rating") is None


def test_examples_of_every_kind_from_samples():
    task = GeneratedSamplesTask()
    for kind in S.KINDS:
        rows = task.examples(kind, "train")
        assert rows and rows == task.examples(kind, "train"), kind
    assert all(p.group is not None for p in task.examples("rankings"))
    assert all(p.margin is not None and p.group is None for p in task.examples("pairs"))
    assert task.examples("pairs", "test") != task.examples("pairs", "train")


def test_labelled_kinds_read_the_sft_samples_stages_of_both_splits():
    task = SentimentTask()
    for kind in ("pairs", "rankings", "unpaired", "rewarded", "critiques"):
        assert task.stages_for(kind) == ["sft-samples", "sft-samples-test"] and task.provides(kind), kind
    for kind in ("prompts", "demonstrations"):
        assert task.stages_for(kind) == [] and task.provides(kind), kind
    assert not task.provides("preferences") and task.stages_for("preferences") == []


def test_the_samples_stages_key_and_build(tmp_path, monkeypatch):
    """Each split's samples are keyed by the SFT stage, the split's prompts, samples_per_prompt and
    the seed (label options are applied after sampling); built from whatever SFT policy the SFT
    stage holds (here a tiny untrained one, put in place of the real stage)."""
    from rlhfzoo import stages
    from rlhfzoo.errors import UserError
    from rlhfzoo.registry import registry

    task = SentimentTask(SentimentTask.Config(n_prompts=3, n_test_prompts=2, samples_per_prompt=2))
    train, test = stages.get("sft-samples"), stages.get("sft-samples-test")
    key = train.key(task)
    assert key == {"sft": stages.get("sft").key(task), "prompts": task.examples("prompts"), "n": 2, "seed": 0}
    assert test.key(task)["prompts"] == task.examples("prompts", "test") and train.artifact == test.artifact == "sft-samples"
    assert train.key(SentimentTask(SentimentTask.Config(n_prompts=3, samples_per_prompt=2, label_noise=0.1))) == key
    with pytest.raises(UserError, match="task 'hh-rlhf' has no such options"):
        train.key(registry.create("task", "hh-rlhf", {}))

    monkeypatch.setenv("RLHFZOO_CACHE", str(tmp_path / "cache"))
    tiny = registry.create("policy", "hf", {"init": "scratch", "n_layer": 1, "n_embd": 16, "n_head": 2, "max_new_tokens": 4}, task=task)

    def fake_sft(directory, task, log, progress=False):
        tiny.save(str(directory / "run" / "policy"))

    monkeypatch.setattr(type(stages.get("sft")), "build", lambda self, *a, **k: fake_sft(*a, **k))
    path = stages.build("sft-samples", task, log=None)
    samples = json.loads(path.read_text())
    assert len(samples) == 3 and all(len(rs) == 2 and all(isinstance(r, str) for r in rs) for rs in samples)
    prompts, read = task.samples("train")
    assert read == samples and prompts == task.examples("prompts")
    pairs = task.examples("pairs")  # derived from the samples the stage holds
    assert pairs and {(e.chosen, e.rejected) for e in pairs} <= {tuple(rs) for rs in samples} | {tuple(rs[::-1]) for rs in samples}
    with pytest.raises(stages.StageNotBuilt, match="sft-samples-test"):
        task.examples("pairs", "test")


def test_unknown_kind_and_split_and_bad_config():
    task = SentimentTask()
    with pytest.raises(ValueError, match="valid kinds: demonstrations, pairs, unpaired, rewarded, prompts, rankings, critiques"):
        task.examples("preferences")
    with pytest.raises(ValueError, match="valid splits"):
        task.examples("prompts", "validation")
    with pytest.raises(ValidationError, match="k_min"):
        SentimentTask.Config(k_min=6, k_max=5)
    with pytest.raises(ValidationError):
        SentimentTask.Config(typo=1)
    assert all(f.description for f in SentimentTask.Config.model_fields.values())


def test_registered():
    from rlhfzoo.registry import Registry

    reg = Registry(builtins=("rlhfzoo.plugins.sentiment",), entry_points=False)
    entry = reg.get("task", "sentiment")
    assert entry.cls is SentimentTask and entry.status == "stable" and "2210.10760" in entry.paper
    assert reg.create("task", "sentiment", {"n_prompts": 8}).has_gold_reward


def test_cached_sft_policy_is_mostly_grammatical_and_leaves_room_to_improve():
    """The SFT stage every algorithm starts from (trained once per cache, reused by the suite):
    its report on held-out samples. Measured with the current recipe: grammatical 0.92-0.95
    depending on the sampling seed, gold about -0.1 (neutral on average, room to improve)."""
    import json

    from rlhfzoo import stages

    path = stages.build("sft", SentimentTask(), log=None)
    report = json.loads((path / "sft_report.json").read_text())
    assert report["grammatical_rate"] >= 0.88, report
    assert report["finished_rate"] >= 0.95, report
    assert -0.4 < report["gold"] < 0.2, report
