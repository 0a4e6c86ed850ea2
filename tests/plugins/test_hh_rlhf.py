"""The `hh-rlhf` task plugin (a preset of the `dataset` task): registration, config, splits, example
kinds, tokenizers."""

import json
import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from rlhfzoo import registry
from rlhfzoo.data.jsonl import DataError
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import Demonstration, PreferencePair, UnpairedExample
from rlhfzoo.plugins.dataset import DatasetTask
from rlhfzoo.plugins.hh_format import load_hh_pairs
from rlhfzoo.plugins.hh_rlhf import DEFAULT_PATH, PATH_ENV, HHTask

REPO = Path(__file__).resolve().parents[2]
SMALL = REPO / "tests" / "data" / "hh_small.jsonl"
SHARED = (REPO / DEFAULT_PATH).resolve()


def _write_pairs(path: Path, n: int, prompts: int | None = None) -> Path:
    """n HH rows over `prompts` distinct prompts (default: all distinct)."""
    prompts = prompts or n
    with open(path, "w") as f:
        for i in range(n):
            q = f"\n\nHuman: question {i % prompts}?\n\nAssistant:"
            f.write(json.dumps({"chosen": f"{q} good answer {i}", "rejected": f"{q} bad answer {i}"}) + "\n")
    return path


def _task(**options) -> HHTask:
    return registry.create("task", "hh-rlhf", options)


@pytest.fixture
def synthetic(tmp_path):
    return _write_pairs(tmp_path / "syn.jsonl", 60, prompts=40)


# ---------------------------------------------------------------------------- registration & config


def test_registered_with_metadata():
    entry = registry.get("task", "hh-rlhf")
    assert entry.cls is HHTask and registry.get("task", "hh").cls is HHTask
    assert issubclass(HHTask, DatasetTask)  # a preset of the general loader
    assert "2204.05862" in entry.paper and "Bai" in entry.paper and entry.summary
    for name, f in HHTask.Config.model_fields.items():
        assert f.description, f"Config.{name} has no description"
    assert {"path", "dataset", "split", "test_fraction", "seed", "max_pairs", "max_chars", "tokenizer", "vocab_size"} <= set(
        HHTask.Config.model_fields
    )


def test_no_gold_reward_and_model_config():
    task = HHTask()
    assert not task.has_gold_reward
    with pytest.raises(NotImplementedError):
        task.gold_reward(["p"], ["r"])
    cfg = task.default_model_config()
    assert cfg == {"arch": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 256}


def test_config_rejects_bad_options():
    with pytest.raises(ValidationError, match="not both"):
        HHTask.Config(path=str(SMALL), dataset="Anthropic/hh-rlhf")
    with pytest.raises(ValidationError):
        HHTask.Config(test_fraction=1.0)
    with pytest.raises(ValidationError):
        HHTask.Config(pth="x.jsonl")


# ---------------------------------------------------------------------------- examples


def test_example_kinds_on_the_fixture():
    task = _task(path=str(SMALL), test_fraction=0.2)
    train, test = task.examples("pairs"), task.examples("pairs", "test")
    assert len(train) + len(test) == 5 and len(test) == 1
    assert all(isinstance(p, PreferencePair) for p in train + test)
    assert task.stats.skipped == 4 and task.stats.kept == 5 and task.stats.rows == 9
    assert task.stats.skipped_rows == {
        "prefix_mismatch": ["line 3"], "identical": ["line 4"], "empty_response": ["line 7"], "no_assistant_turn": ["line 8"]
    }

    demos = task.examples("demonstrations")
    assert demos == [Demonstration(p.prompt, p.chosen) for p in train]
    unpaired = task.examples("unpaired")
    assert len(unpaired) == 2 * len(train) and all(isinstance(u, UnpairedExample) for u in unpaired)
    assert [u.desirable for u in unpaired[:2]] == [True, False]
    assert unpaired[0].response == train[0].chosen and unpaired[1].response == train[0].rejected
    prompts = task.examples("prompts", "test")
    assert prompts == [test[0].prompt] and task.eval_prompts() == prompts
    assert all(p.endswith("\n\nAssistant:") for p in task.examples("prompts"))


def test_unknown_kind_and_split():
    task = _task(path=str(SMALL))
    for kind in ("rewarded", "nonsense"):
        with pytest.raises(ValueError, match=r"pairs, demonstrations, unpaired, prompts"):
            task.examples(kind)
    with pytest.raises(ValueError, match="unknown split 'validation'.*train, test"):
        task.examples("pairs", "validation")


def test_split_is_seeded_grouped_by_prompt_and_capped(synthetic):
    a = _task(path=str(synthetic), seed=1, test_fraction=0.25)
    b = _task(path=str(synthetic), seed=1, test_fraction=0.25)
    c = _task(path=str(synthetic), seed=2, test_fraction=0.25)
    assert a.examples("pairs") == b.examples("pairs") and a.examples("pairs", "test") == b.examples("pairs", "test")
    assert a.examples("pairs", "test") != c.examples("pairs", "test")
    train, test = a.examples("pairs"), a.examples("pairs", "test")
    assert len(train) + len(test) == 60 and 15 <= len(test) <= 16
    assert not {p.prompt for p in train} & {p.prompt for p in test}

    capped = _task(path=str(synthetic), max_pairs=20, test_fraction=0.1)
    assert len(capped.examples("pairs")) + len(capped.examples("pairs", "test")) == 20

    everything = _task(path=str(synthetic), test_fraction=0.0)
    assert len(everything.examples("pairs")) == 60 and everything.examples("pairs", "test") == []


def test_split_keeps_a_training_group(tmp_path):
    path = tmp_path / "one_prompt.jsonl"
    q = "\n\nHuman: same prompt?\n\nAssistant:"
    path.write_text("".join(json.dumps({"chosen": f"{q} c{i}", "rejected": f"{q} r{i}"}) + "\n" for i in range(5)))
    task = _task(path=str(path), test_fraction=0.5)
    assert len(task.examples("pairs")) == 5 and task.examples("pairs", "test") == []


def test_usable_pairs_are_shuffled_not_rows(tmp_path):
    """HH's rule: the seeded shuffle, `max_pairs` and the split see the usable pairs only, so rows that
    make no pair (here an identical pair and a row without an assistant turn, between the others)
    change nothing. With distinct prompts the split is the shuffled order cut at round(0.25 * 8) = 2."""
    clean = _write_pairs(tmp_path / "clean.jsonl", 8)
    lines = clean.read_text().splitlines(keepends=True)
    same = "\n\nHuman: q?\n\nAssistant: same"
    noisy = tmp_path / "noisy.jsonl"
    noisy.write_text("".join(
        lines[:3] + [json.dumps({"chosen": same, "rejected": same}) + "\n"]
        + lines[3:6] + [json.dumps({"chosen": "\n\nHuman: no reply", "rejected": "\n\nHuman: none"}) + "\n"] + lines[6:]
    ))
    pairs, _ = load_hh_pairs(clean)  # file order
    order = list(range(8))
    random.Random(3).shuffle(order)
    expected = [pairs[i] for i in order]
    for path in (clean, noisy):
        task = _task(path=str(path), seed=3, test_fraction=0.25)
        assert task.examples("pairs", "test") == expected[:2] and task.examples("pairs") == expected[2:]
    assert task.stats.rows == 10 and task.stats.skipped == 2
    capped = _task(path=str(noisy), seed=3, test_fraction=0.25, max_pairs=4)
    assert capped.examples("pairs", "test") == [expected[0]] and capped.examples("pairs") == expected[1:4]


def test_kinds_are_known_without_reading_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv(PATH_ENV, str(tmp_path / "not-yet.jsonl"))
    task = _task()
    assert [k for k in ("pairs", "demonstrations", "unpaired", "prompts", "rewarded") if task.provides(k)] == [
        "pairs", "demonstrations", "unpaired", "prompts"
    ]
    assert task.default_reward() == {"name": "reward-model", "path": "auto"} and task.stats is None


def test_no_usable_pair_is_an_error(tmp_path):
    path = tmp_path / "same.jsonl"
    path.write_text('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: b"}\n')
    with pytest.raises(DataError, match=r"same\.jsonl: no usable preference pairs .*identical 1.*'chosen' and 'rejected'"):
        _task(path=str(path)).examples("pairs")


# ---------------------------------------------------------------------------- data location


def test_missing_file_names_the_path_and_the_fixes(tmp_path, monkeypatch):
    # A `path` that does not exist: a config error, before anything runs.
    with pytest.raises(ValidationError) as e:
        HHTask.Config(path=str(tmp_path / "absent.jsonl"))
    msg = str(e.value)
    assert "absent.jsonl" in msg and "`path`" in msg and PATH_ENV in msg and "`dataset`" in msg
    # The file named by the environment, found missing when the data is loaded: a user error.
    monkeypatch.setenv(PATH_ENV, str(tmp_path / "gone.jsonl"))
    task = _task()
    with pytest.raises(DataError) as e:
        task.examples("pairs")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, UserError)
    assert "gone.jsonl" in str(e.value) and f"${PATH_ENV}" in str(e.value)


def test_skipped_rows_are_shown_once_when_the_data_is_loaded(tmp_path, caplog):
    rows = [{"chosen": f"\n\nHuman: q{i}?\n\nAssistant: yes {i}", "rejected": f"\n\nHuman: q{i}?\n\nAssistant: no {i}"}
            for i in range(6)]
    rows += [{"chosen": "\n\nHuman: same?\n\nAssistant: same", "rejected": "\n\nHuman: same?\n\nAssistant: same"}] * 3
    path = tmp_path / "with_identical.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = _task(path=str(path))
    with caplog.at_level("WARNING"):
        task.examples("pairs")
        task.examples("pairs", "test")
        task.examples("prompts")
    shown = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(shown) == 1 and "identical 3: line 7, line 8, line 9" in shown[0] and str(path) in shown[0]


def test_env_var_supplies_the_default_path(monkeypatch, synthetic):
    monkeypatch.setenv(PATH_ENV, str(synthetic))
    task = _task()
    assert task.stats is None
    task.examples("pairs")
    assert task.stats.source == str(synthetic.resolve())


def test_relative_path_resolves_from_cwd_then_repo_root(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    # not in tmp_path: found relative to the repository root
    task = _task(path="tests/data/hh_small.jsonl")
    assert len(task.examples("pairs")) + len(task.examples("pairs", "test")) == 5
    # the working directory wins
    _write_pairs(tmp_path / "local.jsonl", 7)
    (tmp_path / "tests" / "data").mkdir(parents=True)
    _write_pairs(tmp_path / "tests" / "data" / "hh_small.jsonl", 3)
    task = _task(path="tests/data/hh_small.jsonl", test_fraction=0.0)
    assert len(task.examples("pairs")) == 3


def test_default_is_the_shared_sample_from_any_directory(monkeypatch, tmp_path):
    if not SHARED.is_file():
        pytest.skip(f"shared HH-RLHF sample not present at {SHARED}")
    monkeypatch.delenv(PATH_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    task = HHTask()
    test = task.examples("pairs", "test")
    assert task.stats.rows == 2312 and task.stats.kept == 2303
    assert 228 <= len(test) <= 232


def test_hub_dataset_offline_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    task = _task(dataset="Anthropic/hh-rlhf", data_dir="harmless-base", split="test")
    with pytest.raises(DataError, match="could not reach or load the dataset 'Anthropic/hh-rlhf'.*local"):
        task.examples("pairs")


def test_hub_dataset_rows_are_read_as_hh_rows(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in SMALL.read_text().splitlines() if line.strip()]
    seen = {}

    def fake_load(name, split, **kwargs):
        seen.update(name=name, split=split, **kwargs)
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    task = _task(dataset="Anthropic/hh-rlhf", data_dir="harmless-base", split="test", test_fraction=0.2)
    local = _task(path=str(SMALL), test_fraction=0.2)
    for split in ("train", "test"):
        assert task.examples("pairs", split) == local.examples("pairs", split)
    assert seen == {"name": "Anthropic/hh-rlhf", "split": "test", "data_dir": "harmless-base"}
    assert task.stats.source == "Anthropic/hh-rlhf[test] (harmless-base)" and task.stats.skipped_rows["prefix_mismatch"] == ["row 3"]


# ---------------------------------------------------------------------------- tokenizers


def test_trained_tokenizer(synthetic):
    task = _task(path=str(synthetic), vocab_size=300)
    tok = task.tokenizer()
    assert task.tokenizer() is tok
    assert tok.pad_token and tok.eos_token and tok.bos_token and len(tok) <= 300
    text = task.examples("prompts")[0]
    assert tok.decode(tok(text)["input_ids"]) == text


def test_pretrained_tokenizer_gets_pad_from_eos(tmp_path, synthetic):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.add_special_tokens(["</s>"])
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>").save_pretrained(tmp_path / "tok")

    task = _task(path=str(synthetic), tokenizer=str(tmp_path / "tok"))
    tok = task.tokenizer()
    assert tok.eos_token == "</s>" and tok.pad_token == "</s>"

    with pytest.raises(ValidationError, match="no-such-tokenizer' does not exist"):
        _task(path=str(synthetic), tokenizer=str(tmp_path / "no-such-tokenizer"))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "tokenizer.json").write_text("not json")
    bad = _task(path=str(synthetic), tokenizer=str(tmp_path / "corrupt"))
    with pytest.raises(UserError, match="could not load the tokenizer .*leave `tokenizer` unset"):
        bad.tokenizer()
