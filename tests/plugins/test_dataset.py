"""The `dataset` task: every standard format in every file type, columns, splits, bad input, training."""

import gzip
import json
import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from rlhfzoo import registry
from rlhfzoo.config import ConfigError, load_config
from rlhfzoo.data.jsonl import DataError
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import Demonstration, PreferencePair, RewardedExample, UnpairedExample
from rlhfzoo.plugins.dataset import DatasetTask
from rlhfzoo.plugins.dataset_formats import shared_prompt
from rlhfzoo.testing import TINY_POLICY, check_objective, check_task

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------- tiny data in every format

PROMPTS = ["What is red?", "Name a fruit.", "Say hello.", "Count to two."]
GOOD = [" A colour.", " An apple.", " Hello!", " One, two."]
BAD = [" Fish.", " Chairs.", " Go away.", " Seven."]  # no first word in common with GOOD

ROWS = {
    "text": [{"text": p + g} for p, g in zip(PROMPTS, GOOD)],
    "prompt-completion": [{"prompt": p, "completion": g} for p, g in zip(PROMPTS, GOOD)],
    "preference": [{"prompt": p, "chosen": g, "rejected": b, "margin": float(i)} for i, (p, g, b) in enumerate(zip(PROMPTS, GOOD, BAD))],
    "implicit": [{"chosen": "Q: " + p + g, "rejected": "Q: " + p + b} for p, g, b in zip(PROMPTS, GOOD, BAD)],
    "unpaired": [{"prompt": p, "completion": r, "label": i % 2 == 0} for i, (p, r) in enumerate(zip(PROMPTS, GOOD[:2] + BAD[2:]))],
    "rewarded": [{"prompt": p, "completion": g, "reward": 0.5 * i} for i, (p, g) in enumerate(zip(PROMPTS, GOOD))],
    "prompt-only": [{"prompt": p} for p in PROMPTS],
}

PAIR_KINDS = {"pairs", "demonstrations", "unpaired", "prompts"}
KINDS = {
    "text": {"demonstrations"},
    "prompt-completion": {"demonstrations", "prompts"},
    "preference": PAIR_KINDS,
    "implicit": PAIR_KINDS,
    "unpaired": {"unpaired", "demonstrations", "prompts"},
    "rewarded": {"rewarded", "demonstrations", "prompts"},
    "prompt-only": {"prompts"},
}


def expected(fmt: str) -> dict[str, set]:
    """The examples of every kind the rows of `fmt` give, as sets (the split's order is shuffled)."""
    pc = list(zip(PROMPTS, GOOD))
    out = {"prompts": set(PROMPTS)}
    if fmt == "text":
        return {"demonstrations": {Demonstration("", p + g) for p, g in pc}}
    if fmt in ("preference", "implicit"):
        prompts = PROMPTS if fmt == "preference" else ["Q: " + p for p in PROMPTS]
        margins = [float(i) for i in range(4)] if fmt == "preference" else [None] * 4
        pairs = {PreferencePair(p, g, b, margin=m) for p, g, b, m in zip(prompts, GOOD, BAD, margins)}
        return {
            "pairs": pairs,
            "demonstrations": {Demonstration(x.prompt, x.chosen) for x in pairs},
            "unpaired": {UnpairedExample(x.prompt, r, ok) for x in pairs for r, ok in ((x.chosen, True), (x.rejected, False))},
            "prompts": set(prompts),
        }
    if fmt == "unpaired":
        rows = ROWS["unpaired"]
        out["unpaired"] = {UnpairedExample(r["prompt"], r["completion"], r["label"]) for r in rows}
        out["demonstrations"] = {Demonstration(r["prompt"], r["completion"]) for r in rows if r["label"]}
    if fmt == "rewarded":
        out["rewarded"] = {RewardedExample(p, g, 0.5 * i) for i, (p, g) in enumerate(pc)}
    if fmt in ("prompt-completion", "rewarded"):
        out["demonstrations"] = {Demonstration(p, g) for p, g in pc}
    return out


def write(rows: list[dict], path: Path) -> Path:
    """`rows` written with `datasets` in the file type the name says (a directory: save_to_disk)."""
    ds = datasets.Dataset.from_list(rows)
    name = path.name
    if name.endswith(".jsonl"):
        ds.to_json(str(path), lines=True)
    elif name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))  # one JSON array
    elif name.endswith(".parquet"):
        ds.to_parquet(str(path))
    elif name.endswith(".csv"):
        ds.to_csv(str(path), index=False)
    else:
        ds.save_to_disk(str(path))
    return path


def task(path, **options) -> DatasetTask:
    return registry.create("task", "dataset", {"path": str(path), **options})


def all_examples(t: DatasetTask, kind: str) -> list:
    return t.examples(kind, "train") + t.examples(kind, "test")


# ---------------------------------------------------------------------------- registration & config


def test_registered_and_every_option_described():
    assert registry.get("task", "dataset").cls is DatasetTask
    for name, f in DatasetTask.Config.model_fields.items():
        assert f.description, f"Config.{name} has no description"
    assert {"path", "dataset", "split", "subset", "columns", "test_fraction", "test_split", "max_rows", "seed",
            "tokenizer", "max_chars"} <= set(DatasetTask.Config.model_fields)


def test_config_errors(tmp_path):
    data = write(ROWS["preference"], tmp_path / "p.jsonl")
    with pytest.raises(ValidationError, match="exactly one of `path`"):
        DatasetTask.Config()
    with pytest.raises(ValidationError, match="exactly one of `path`"):
        DatasetTask.Config(path=str(data), dataset="org/name")
    with pytest.raises(ValidationError, match="not both"):
        DatasetTask.Config(path=str(data), test_split="test", test_fraction=0.2)
    with pytest.raises(ValidationError, match="'answer'.*not standard column names.*completion"):
        DatasetTask.Config(path=str(data), columns={"a": "answer"})
    with pytest.raises(ValidationError):
        DatasetTask.Config(path=str(data), pth="x")


def test_missing_path_and_unknown_suffix_are_config_errors(tmp_path):
    for bad, why in (("absent.jsonl", "not found"), ("notes.txt", "cannot tell the data format")):
        if bad.endswith(".txt"):
            (tmp_path / bad).write_text("hello")
        with pytest.raises(ConfigError) as e:
            load_config(data={"task": {"name": "dataset", "path": str(tmp_path / bad)}, "policy": dict(TINY_POLICY),
                              "algorithm": {"name": "sft"}, "output_dir": str(tmp_path / "out")})
        msg = str(e.value)
        assert isinstance(e.value, UserError) and bad in msg and why in msg
        assert ".parquet" in msg and "save_to_disk" in msg  # what is accepted


def test_relative_path_is_read_from_the_working_directory_and_stored_absolute(tmp_path, monkeypatch):
    write(ROWS["prompt-only"], tmp_path / "prompts.jsonl")
    monkeypatch.chdir(tmp_path)
    t = registry.create("task", "dataset", {"path": "prompts.jsonl", "test_fraction": 0.0})
    assert t.config.path == str(tmp_path / "prompts.jsonl") and set(t.examples("prompts")) == set(PROMPTS)


def test_local_data_is_read_without_the_network(tmp_path, monkeypatch):
    import socket

    files = [write(ROWS["preference"], tmp_path / name) for name in ("p.jsonl", "p.parquet", "p.csv", "saved")]

    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)  # recorded: a library may swallow the error below
        raise OSError("network use while reading local data")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for path in files:
        assert len(all_examples(task(path), "pairs")) == 4
    assert attempts == []


# ---------------------------------------------------------------------------- every format, every file type

FILES = ["d.jsonl", "d.jsonl.gz", "d.json", "d.parquet", "d.csv", "saved"]


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("file", FILES)
def test_format_gives_its_kinds_with_exact_contents(fmt, file, tmp_path):
    t = task(write(ROWS[fmt], tmp_path / file), test_fraction=0.0)
    assert set(t.kinds()) == KINDS[fmt]
    for kind in ("demonstrations", "pairs", "unpaired", "rewarded", "prompts"):
        assert t.provides(kind) == (kind in KINDS[fmt])
    for kind, want in expected(fmt).items():
        got = t.examples(kind)
        assert len(got) == len(want) and set(got) == want, f"{fmt} {kind}"
    assert t.examples(sorted(KINDS[fmt])[0], "test") == []
    missing = next(k for k in ("rewarded", "pairs") if k not in KINDS[fmt])
    with pytest.raises(ValueError, match=f"no '{missing}' data.*{t.format.name}"):
        t.examples(missing)


def test_default_reward_eval_prompts_and_no_gold(tmp_path):
    pairs = task(write(ROWS["preference"], tmp_path / "p.parquet"), test_fraction=0.5)
    assert pairs.default_reward() == {"name": "reward-model", "path": "auto"} and not pairs.has_gold_reward
    assert pairs.eval_prompts() == pairs.examples("prompts", "test") and len(pairs.eval_prompts()) == 2
    assert task(write(ROWS["prompt-completion"], tmp_path / "pc.jsonl")).default_reward() is None
    text = task(write(ROWS["text"], tmp_path / "t.jsonl"))
    with pytest.raises(UserError, match="no prompts.*train.eval_prompts: 0"):
        text.eval_prompts()
    assert pairs.default_model_config()["arch"] == "gpt2"


@pytest.mark.parametrize("fmt", ["preference", "unpaired", "rewarded"])
def test_task_contract(fmt, tmp_path):
    rows = [dict(r, prompt=f"{r['prompt']} ({k})") for k in range(5) for r in ROWS[fmt]]
    report = check_task("dataset", path=str(write(rows, tmp_path / "d.jsonl")), test_fraction=0.25, vocab_size=300)
    assert set(report["checked"]) == KINDS[fmt] and not report["skipped"]


def test_shared_prompt_of_prompt_less_pairs():
    assert shared_prompt("Q: is it? A: yes", "Q: is it? A: no") == ("Q: is it? A:", " yes", " no")
    assert shared_prompt("Say: hip hop", "Say: hit") == ("Say:", " hip hop", " hit")  # a word boundary, not 'hi'
    assert shared_prompt("Say: a", "Say: a b") == ("Say:", " a", " a b")
    assert shared_prompt("yes", "no") is None and shared_prompt("abc", "abd") is None
    hh = "\n\nHuman: Hi\n\nAssistant:"
    assert shared_prompt(hh + " Hello!", hh + " Go.") == (hh, "Hello!", "Go.")
    assert shared_prompt(hh + " Hello!", "\n\nHuman: Yo\n\nAssistant: Go.") is None


# ---------------------------------------------------------------------------- columns, splits, subsets


def test_columns_map_other_names_onto_the_standard_ones(tmp_path):
    rows = [{"question": p, "answer": g, "id": i} for i, (p, g) in enumerate(zip(PROMPTS, GOOD))]
    t = task(write(rows, tmp_path / "qa.csv"), columns={"question": "prompt", "answer": "completion"}, test_fraction=0.0)
    assert set(t.examples("demonstrations")) == expected("prompt-completion")["demonstrations"]
    assert t.stats.ignored_columns == ["id"] and t.format.name == "prompt-completion"
    with pytest.raises(DataError, match="renames 'query', which the data does not have.*'question', 'answer', 'id'"):
        task(tmp_path / "qa.csv", columns={"query": "prompt"}).examples("prompts")
    clash = write([{"prompt": "a", "question": "b", "completion": "c"}], tmp_path / "clash.jsonl")
    with pytest.raises(DataError, match="onto 'prompt', which the data already has"):
        task(clash, columns={"question": "prompt"}).examples("prompts")


def test_held_out_split_is_grouped_by_prompt_seeded_and_sized(tmp_path):
    rows = [{"prompt": f"prompt {i % 20}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(60)]
    path = write(rows, tmp_path / "p.parquet")
    a, b, c = (task(path, test_fraction=0.25, seed=s) for s in (1, 1, 2))
    train, test = a.examples("pairs"), a.examples("pairs", "test")
    assert len(train) + len(test) == 60 and 15 <= len(test) <= 17  # whole prompts of 3 pairs each
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert train == b.examples("pairs") and test == b.examples("pairs", "test")
    assert set(test) != set(c.examples("pairs", "test"))
    # Prompt-less rows are grouped by their text.
    texts = task(write([{"text": f"line {i % 10}"} for i in range(40)], tmp_path / "t.jsonl"), test_fraction=0.2)
    train_texts = {d.response for d in texts.examples("demonstrations")}
    test_texts = {d.response for d in texts.examples("demonstrations", "test")}
    assert test_texts and train_texts and not train_texts & test_texts


def test_max_rows_is_a_seeded_subset(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(50)]
    path = write(rows, tmp_path / "pc.jsonl")
    t = task(path, max_rows=10, test_fraction=0.2)
    demos = all_examples(t, "demonstrations")
    assert len(demos) == 10 and len(t.examples("demonstrations", "test")) == 2 and t.stats.rows == 10
    assert set(demos) == set(all_examples(task(path, max_rows=10, test_fraction=0.2), "demonstrations"))
    assert set(demos) != set(all_examples(task(path, max_rows=10, test_fraction=0.2, seed=3), "demonstrations"))


def test_named_splits_of_a_saved_dataset_dict(tmp_path):
    train = datasets.Dataset.from_list(ROWS["prompt-completion"])
    test = datasets.Dataset.from_list([{"prompt": "Held out?", "completion": " Yes."}])
    datasets.DatasetDict({"train": train, "validation": test}).save_to_disk(str(tmp_path / "dd"))
    t = task(tmp_path / "dd", test_split="validation")
    assert set(t.examples("demonstrations")) == expected("prompt-completion")["demonstrations"]
    assert t.examples("demonstrations", "test") == [Demonstration("Held out?", " Yes.")]
    with pytest.raises(DataError, match="no split 'test'; its splits are: train, validation"):
        task(tmp_path / "dd", test_split="test").examples("prompts")
    single = write(ROWS["prompt-completion"], tmp_path / "one.jsonl")
    with pytest.raises(DataError, match="`test_split` names a split, but this data has a single split"):
        task(single, test_split="test").examples("prompts")


def test_a_directory_of_data_files(tmp_path):
    (tmp_path / "shards").mkdir()
    write(ROWS["preference"][:2], tmp_path / "shards" / "a.jsonl")
    write(ROWS["preference"][2:], tmp_path / "shards" / "b.jsonl")
    t = task(tmp_path / "shards", test_fraction=0.0)
    assert set(t.examples("pairs")) == expected("preference")["pairs"]
    write([{"prompt": "x", "chosen": None, "rejected": " y"}], tmp_path / "shards" / "c.jsonl")
    with pytest.raises(DataError, match=r"c\.jsonl, row 1: field 'chosen' is missing or null"):
        task(tmp_path / "shards").examples("pairs")
    write(ROWS["preference"], tmp_path / "shards" / "d.csv")
    with pytest.raises(ValidationError, match="mixes data formats"):
        task(tmp_path / "shards")


def test_max_chars_cuts_prompts_from_the_start_and_responses_at_the_end(tmp_path):
    rows = [{"prompt": "x" * 30 + "END?", "completion": " " + "y" * 40}, {"prompt": "short", "completion": " ok"}]
    t = task(write(rows, tmp_path / "long.jsonl"), max_chars=20, test_fraction=0.0)
    demos = set(t.examples("demonstrations"))
    assert demos == {Demonstration("x" * 16 + "END?", " " + "y" * 19), Demonstration("short", " ok")}
    assert t.stats.truncated == 2


# ---------------------------------------------------------------------------- bad input


def test_rows_of_the_wrong_shape_name_file_row_columns_and_formats(tmp_path):
    cases = [
        ([{"prompt": "a", "completion": " b", "reward": 1.0}, {"prompt": "c", "completion": " d", "reward": "high"}],
         "row 2: field 'reward' must be a finite number, not str 'high'", "'prompt', 'completion', 'reward'"),
        ([{"prompt": "a", "completion": " b", "label": True}, {"prompt": "c", "completion": " d", "label": 1}],
         "row 2: field 'label' must be true or false, not int 1", "'prompt', 'completion', 'label'"),
        ([{"prompt": "a", "chosen": " b", "rejected": " c"}, {"prompt": "d", "chosen": " e"}],
         "row 2: field 'rejected' is missing or null", "has the columns 'prompt', 'chosen' and"),
        ([{"text": "a"}, {"text": "b"}, {"text": 7}], "row 3: field 'text' must be a string or a list of messages, not int 7", "'text'"),
    ]
    for k, (rows, problem, columns) in enumerate(cases):
        path = tmp_path / f"bad{k}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DataError) as e:
            task(path, test_fraction=0.0).examples("demonstrations")
        msg = str(e.value)
        assert isinstance(e.value, UserError) and str(path) in msg and problem in msg and columns in msg, msg
        assert "Accepted formats: conversation: messages; preference: prompt + chosen + rejected [+ margin]" in msg


def test_undetectable_format_and_unreadable_files(tmp_path):
    odd = write([{"question": "a", "reply": "b"}], tmp_path / "odd.parquet")
    with pytest.raises(DataError) as e:
        task(odd).examples("prompts")
    msg = str(e.value)
    assert "odd.parquet" in msg and "'question', 'reply'" in msg and "prompt + completion" in msg and "`columns`" in msg

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"broken\.jsonl: could not read it as json \(detected from the name\)"):
        task(broken).examples("prompts")
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_bytes("caf\xe9 latin-1, not parquet".encode("latin-1"))
    with pytest.raises(DataError, match=r"fake\.parquet: could not read it as parquet") as e:
        task(not_parquet).examples("prompts")
    assert "iconv" not in str(e.value) and "UTF-8" not in str(e.value)


def test_skipped_rows_are_counted_and_shown_once(tmp_path, caplog):
    rows = [{"prompt": f"q{i}", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(6)]
    rows += [{"prompt": "same", "chosen": " x", "rejected": " x"}] * 2 + [{"prompt": "  ", "chosen": " a", "rejected": " b"}]
    path = write(rows, tmp_path / "skips.jsonl")
    t = task(path)
    with caplog.at_level(logging.WARNING):
        t.examples("pairs")
        t.examples("pairs", "test")
        t.examples("prompts")
    shown = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(shown) == 1 and str(path) in shown[0], shown
    assert t.stats.skipped == 3 and t.stats.skipped_by_reason == {"identical": 2, "empty_text": 1}
    assert "identical 2: " in shown[0] and "row 9" in shown[0]
    assert len(all_examples(t, "pairs")) == 6


def test_unreachable_hub_dataset_is_a_user_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    t = registry.create("task", "dataset", {"dataset": "org/prefs", "subset": "main", "split": "train"})
    with pytest.raises(DataError, match="could not reach or load the dataset 'org/prefs' .*subset 'main'.*OSError: no network.*`path`"):
        t.examples("pairs")


# ---------------------------------------------------------------------------- tokenizer and training


def test_trained_tokenizer_round_trips_the_data(tmp_path):
    t = task(write(ROWS["preference"], tmp_path / "p.jsonl"), vocab_size=300, test_fraction=0.0)
    tok = t.tokenizer()
    assert t.tokenizer() is tok and tok.pad_token and tok.eos_token and len(tok) <= 300
    for text in PROMPTS + GOOD:
        assert tok.decode(tok(text)["input_ids"]) == text


TRAINED_ON = {  # objective -> (format, file type)
    "sft": ("prompt-completion", "d.parquet"),
    "dpo": ("preference", "d.jsonl.gz"),
    "ipo": ("preference", "saved"),
    "kto": ("unpaired", "d.csv"),
    "bradley-terry": ("implicit", "saved"),
    "reward-regression": ("rewarded", "d.jsonl"),
    "ilql": ("rewarded", "d.parquet"),
}


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(TRAINED_ON))
def test_objectives_train_from_files(objective, tmp_path):
    fmt, file = TRAINED_ON[objective]
    rows = [{k: (v + f" {n}" if isinstance(v, str) else v) for k, v in r.items()} for n in range(3) for r in ROWS[fmt]]
    section = {"name": "dataset", "path": str(write(rows, tmp_path / file)), "vocab_size": 300}
    check_objective(objective, tmp_path / "run", task=section, reward=None)  # two steps, finite loss, weights moved


# ---------------------------------------------------------------------------- K-wise rankings


def test_rankings_give_k_choose_2_pairs_per_prompt_and_best_vs_worst(tmp_path):
    rows = [
        {"prompt": "Rate these.", "completions": [" ok", " best", " worst", " fine"], "ranking": [3, 1, 4, 2]},
        {"prompt": "Tied.", "completions": [" a", " b"], "ranking": [1, 1]},  # no order: skipped
        {"prompt": "Two.", "completions": [" yes", " no", " maybe"], "ranking": [1, 2, 2]},  # the tie makes no pair
    ]
    t = task(write(rows, tmp_path / "ranked.jsonl"), test_fraction=0.0)
    rankings = t.examples("rankings")
    by_prompt = {}
    for p in rankings:
        by_prompt.setdefault(p.prompt, set()).add((p.chosen, p.rejected))
    assert by_prompt["Rate these."] == {
        (" best", " fine"), (" best", " ok"), (" best", " worst"), (" fine", " ok"), (" fine", " worst"), (" ok", " worst")
    }
    assert by_prompt["Two."] == {(" yes", " no"), (" yes", " maybe")}
    assert len({p.group for p in rankings}) == 2 and all(p.group is not None for p in rankings)
    # best vs worst; of tied worst ones the later completion
    assert set(t.examples("pairs")) == {PreferencePair("Rate these.", " best", " worst"), PreferencePair("Two.", " yes", " maybe")}
    assert set(t.examples("demonstrations")) == {Demonstration("Rate these.", " best"), Demonstration("Two.", " yes")}
    assert t.stats.skipped_by_reason == {"no_ranking": 1}
    with pytest.raises(DataError, match="row 1: field 'ranking' must be a list of 2 numbers, one per completion"):
        task(write([{"prompt": "p", "completions": [" a", " b"], "ranking": [1]}], tmp_path / "bad.jsonl")).examples("pairs")
