"""The `hh-rlhf` task plugin: registration, config, splits, example kinds, tokenizers."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from rlhfzoo import registry
from rlhfzoo.data.jsonl import DataError
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import Demonstration, PreferencePair, UnpairedExample
from rlhfzoo.plugins.hh_rlhf import DEFAULT_PATH, PATH_ENV, HHTask, split_by_prompt

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
    assert task.stats.skipped == 4 and task.stats.pairs == 5

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


def test_split_keeps_a_training_group():
    pairs = [PreferencePair("same prompt", f"c{i}", f"r{i}") for i in range(5)]
    split = split_by_prompt(pairs, test_fraction=0.5, seed=0)
    assert len(split["train"]) == 5 and split["test"] == []


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
    assert len(shown) == 1 and "identical 3" in shown[0] and str(path) in shown[0]


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
    assert task.stats.rows == 2312 and task.stats.pairs == 2303
    assert 228 <= len(test) <= 232


def test_hub_dataset_offline_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    task = _task(dataset="Anthropic/hh-rlhf", data_dir="harmless-base", split="test")
    with pytest.raises(DataError, match="could not reach or load the dataset 'Anthropic/hh-rlhf'.*local"):
        task.examples("pairs")


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
