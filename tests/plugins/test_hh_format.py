"""`rlhfzoo.plugins.hh_format`: parsing HH-RLHF rows into preference pairs, and sources; the BPE tokenizer
(`rlhfzoo.data.tokenizer`) on HH text."""

import gzip
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhfzoo.data.tokenizer import train_bpe_tokenizer
from rlhfzoo.plugins.hh_format import (
    ASSISTANT,
    HUMAN,
    iter_hub_rows,
    load_hh_pairs,
    messages_to_text,
    normalise_prompt,
    parse_pairs,
    split_dialogue,
    truncate_prompt,
    truncate_response,
)
from rlhfzoo.data.jsonl import DataError, read_jsonl

HERE = Path(__file__).parents[1] / "data"
SMALL = HERE / "hh_small.jsonl"
COLUMNS = HERE / "hh_columns.jsonl"
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def _row(chosen, rejected):
    return {"chosen": chosen, "rejected": rejected}


# ---------------------------------------------------------------------------- text helpers


def test_split_dialogue_at_last_assistant_turn():
    text = f"{HUMAN} a{ASSISTANT} b{HUMAN} c{ASSISTANT}  d e \n"
    assert split_dialogue(text) == (f"{HUMAN} a{ASSISTANT} b{HUMAN} c{ASSISTANT}", "d e")
    assert split_dialogue(f"{HUMAN} only a question") is None


@pytest.mark.parametrize(
    "raw, expected",
    [
        (f"{HUMAN} hi{ASSISTANT}", f"{HUMAN} hi{ASSISTANT}"),
        (f"{HUMAN} hi{ASSISTANT} ", f"{HUMAN} hi{ASSISTANT}"),
        (f"{HUMAN} hi", f"{HUMAN} hi{ASSISTANT}"),
        ("Human: hi\n\nAssistant:", f"{HUMAN} hi{ASSISTANT}"),
        ("What is 2+2?", f"{HUMAN} What is 2+2?{ASSISTANT}"),
    ],
)
def test_normalise_prompt(raw, expected):
    assert normalise_prompt(raw) == expected


def test_messages_to_text():
    msgs = [{"role": "user", "content": "hi "}, {"role": "assistant", "content": "hello"}]
    assert messages_to_text(msgs) == f"{HUMAN} hi{ASSISTANT} hello"
    with pytest.raises(DataError, match="f, line 3: chat messages must look like"):
        messages_to_text([{"role": "robot", "content": "x"}], where="f, line 3")


def test_truncate_prompt_drops_oldest_turns_and_keeps_the_cue():
    prompt = "".join(f"{HUMAN} question {i} {'x' * 40}{ASSISTANT} answer {i}" for i in range(20)) + f"{HUMAN} last?{ASSISTANT}"
    cut, was = truncate_prompt(prompt, 200)
    assert was and len(cut) <= 200
    assert cut.startswith(HUMAN) and cut.endswith(f"{HUMAN} last?{ASSISTANT}")
    assert prompt.endswith(cut)
    # a single turn longer than the limit is cut from the left, keeping the cue
    huge = f"{HUMAN} {'y' * 10_000}{ASSISTANT}"
    cut, was = truncate_prompt(huge, 100)
    assert was and len(cut) == 100 and cut.endswith(ASSISTANT)
    assert truncate_prompt("short", 100) == ("short", False)
    assert truncate_prompt(huge, None) == (huge, False)


def test_truncate_response():
    assert truncate_response("abcdef", 3) == ("abc", True)
    assert truncate_response("abc", 3) == ("abc", False)


# ---------------------------------------------------------------------------- HH dialogue layout


def test_small_fixture_counts_and_contents():
    pairs, stats = parse_pairs(read_jsonl(SMALL), "hh_small.jsonl")
    assert stats.rows == 9 and stats.pairs == len(pairs) == 5
    assert stats.skipped_prefix_mismatch == 1 and stats.skipped_identical == 1
    assert stats.skipped_empty_response == 1 and stats.skipped_no_assistant_turn == 1
    assert stats.skipped == 4
    assert stats.skipped_rows == {"prefix_mismatch": [3], "identical": [4], "empty_response": [7], "no_assistant_turn": [8]}
    assert stats.ignored_fields == ["id"] and stats.layouts == {"dialogue": 9}

    single, multi, move, star, uni = pairs
    assert single.prompt == f"{HUMAN} How do I boil an egg?{ASSISTANT}"
    assert single.chosen == "Put it in boiling water for about nine minutes."
    assert single.rejected == "Eggs are for chickens."
    # multi-turn: the prompt keeps all earlier turns
    assert multi.prompt.count(HUMAN) == 3 and multi.prompt.count(ASSISTANT) == 3
    assert multi.prompt.endswith(f"{HUMAN} Another one?{ASSISTANT}")
    assert multi.chosen.startswith("Why did the scarecrow") and multi.rejected == "No."
    # surrounding whitespace of responses is removed
    assert move.chosen == "I can help on Saturday morning." and move.rejected == "I'd rather not."
    assert star.chosen == "Yes, the sun is a star."
    assert uni.chosen == "Man sagt „Danke“. 😊"
    for p in pairs:
        assert p.prompt.endswith(ASSISTANT) and p.prompt.startswith(HUMAN)
        assert p.chosen != p.rejected and p.chosen and p.rejected


def test_extra_fields_can_be_made_an_error():
    with pytest.raises(DataError, match=r"hh_small\.jsonl, line 6: unexpected field 'id'"):
        parse_pairs(read_jsonl(SMALL), "hh_small.jsonl", allow_extra_fields=False)


def test_missing_and_empty_fields_name_the_row(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\n{"chosen": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: missing field 'rejected'"):
        load_hh_pairs(p)
    p.write_text('{"chosen": "", "rejected": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 1: field 'chosen' is empty"):
        load_hh_pairs(p)


def test_no_usable_pairs_is_an_error(tmp_path):
    p = tmp_path / "same.jsonl"
    p.write_text('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: b"}\n')
    with pytest.raises(DataError, match=r"no usable preference pairs .*identical 1"):
        load_hh_pairs(p)


def test_truncation_is_counted_and_never_crashes():
    long_prompt = "".join(f"{HUMAN} q{i} {'w' * 50}{ASSISTANT} a{i}" for i in range(30))
    rows = [
        (1, _row(f"{long_prompt}{HUMAN} end{ASSISTANT} {'c' * 500}", f"{long_prompt}{HUMAN} end{ASSISTANT} short")),
        # responses that differ only after the cut become identical and are skipped
        (2, _row(f"{HUMAN} hi{ASSISTANT} {'z' * 300}A", f"{HUMAN} hi{ASSISTANT} {'z' * 300}B")),
        (3, _row(f"{HUMAN} hi{ASSISTANT} fine", f"{HUMAN} hi{ASSISTANT} bad")),
    ]
    pairs, stats = parse_pairs(rows, "mem", max_chars=120)
    assert stats.pairs == 2 and stats.skipped_identical == 1
    assert stats.truncated == 4  # prompt + chosen of row 1, both responses of row 2
    p = pairs[0]
    assert len(p.prompt) <= 120 and p.prompt.endswith(f"{HUMAN} end{ASSISTANT}") and p.prompt.startswith(HUMAN)
    assert p.chosen == "c" * 120 and p.rejected == "short"
    assert "truncated to 120 chars" in stats.summary()


# ---------------------------------------------------------------------------- prompt/chosen/rejected layout


def test_columns_fixture():
    pairs, stats = parse_pairs(read_jsonl(COLUMNS), "hh_columns.jsonl")
    assert stats.rows == 6 and stats.pairs == 5 and stats.skipped_identical == 1
    assert stats.layouts == {"prompt": 5, "dialogue": 1}
    got = [(p.prompt, p.chosen, p.rejected) for p in pairs]
    assert got == [
        (f"{HUMAN} Hi{ASSISTANT}", "Hello! How are you?", "Go away."),
        (f"{HUMAN} What is 3+4?{ASSISTANT}", "7", "8"),
        (f"{HUMAN} What is 2+2?{ASSISTANT}", "4", "5"),
        (f"{HUMAN} Name a colour.{ASSISTANT}", "Blue.", "Seven."),
        (f"{HUMAN} Good morning{ASSISTANT}", "Good morning to you!", "Whatever."),
    ]


def test_prompt_layout_with_a_foreign_dialogue_is_a_prefix_mismatch():
    rows = [
        (1, {"prompt": f"{HUMAN} a{ASSISTANT}", "chosen": f"{HUMAN} b{ASSISTANT} x", "rejected": " y"}),
        (2, {"prompt": f"{HUMAN} a{ASSISTANT}", "chosen": " x", "rejected": " y"}),
    ]
    pairs, stats = parse_pairs(rows, "mem")
    assert stats.skipped_prefix_mismatch == 1 and len(pairs) == 1


# ---------------------------------------------------------------------------- sources


def test_gz_file_reads_like_the_plain_one(tmp_path, caplog):
    gz = tmp_path / "hh_small.jsonl.gz"
    gz.write_bytes(gzip.compress(SMALL.read_bytes()))
    with caplog.at_level(logging.INFO, logger="rlhfzoo.plugins.hh_format"):
        pairs_gz, stats_gz = load_hh_pairs(gz)
    summary = [r.getMessage() for r in caplog.records if r.name == "rlhfzoo.plugins.hh_format"]
    pairs, _ = load_hh_pairs(SMALL)
    assert pairs_gz == pairs
    assert len(summary) == 1 and "\n" not in summary[0]
    assert "9 rows -> 5 pairs, 4 skipped (prefix mismatch 1, identical 1" in summary[0]
    assert stats_gz.as_dict()["skipped"] == 4


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_skipped_rows_are_a_warning_printed_without_any_logging_set_up(tmp_path):
    """The summary names the skipped identical pairs; it is a warning, so a run that configures no
    logging (the command line) still prints it, while a clean file stays quiet."""
    clean = tmp_path / "clean.jsonl"
    clean.write_text('{"chosen": "\\n\\nHuman: q?\\n\\nAssistant: yes", "rejected": "\\n\\nHuman: q?\\n\\nAssistant: no"}\n')
    code = "import sys; from rlhfzoo.plugins.hh_format import load_hh_pairs; load_hh_pairs(sys.argv[1])"
    r = subprocess.run([sys.executable, "-c", code, str(SMALL)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "9 rows -> 5 pairs, 4 skipped (prefix mismatch 1, identical 1" in r.stderr
    r = subprocess.run([sys.executable, "-c", code, str(clean)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == ""


def test_load_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        load_hh_pairs()
    with pytest.raises(ValueError, match="exactly one"):
        load_hh_pairs(SMALL, dataset="Anthropic/hh-rlhf")


def test_hub_dataset_unreachable_says_to_pass_a_local_file(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Anthropic/hh-rlhf' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not reach or load the dataset 'Anthropic/hh-rlhf'.*local \.jsonl"):
        load_hh_pairs(dataset="Anthropic/hh-rlhf", split="test")


def test_hub_dataset_rows_are_parsed(monkeypatch):
    datasets = pytest.importorskip("datasets")
    seen = {}
    rows = [r for _, r in read_jsonl(SMALL)]

    def fake_load(name, split, **kwargs):
        seen.update(name=name, split=split, **kwargs)
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    pairs, stats = load_hh_pairs(dataset="Anthropic/hh-rlhf", split="test", data_dir="harmless-base")
    assert seen == {"name": "Anthropic/hh-rlhf", "split": "test", "data_dir": "harmless-base"}
    assert len(pairs) == 5 and stats.source == "Anthropic/hh-rlhf[test] (harmless-base)"
    assert stats.skipped_rows["prefix_mismatch"] == [3]
    assert next(iter_hub_rows("x")) == (1, rows[0])


# ---------------------------------------------------------------------------- tokenizer


def test_bpe_tokenizer_on_the_fixture():
    pairs, _ = load_hh_pairs(SMALL)
    texts = [t for p in pairs for t in (p.prompt, p.chosen, p.rejected)]
    tok = train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1)
    assert len(tok) <= 300
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    for text in (pairs[1].prompt, "unseen ünïcödé 🤖 text"):
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text  # byte-level: everything round-trips
    assert train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1).get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="at least 258"):
        train_bpe_tokenizer(texts, vocab_size=100)


# ---------------------------------------------------------------------------- the shared sample


@pytest.fixture(scope="module")
def shared_sample():
    if not SHARED.is_file():
        pytest.skip(f"shared HH-RLHF sample not present at {SHARED}")
    return load_hh_pairs(SHARED, max_chars=None)


def test_shared_sample_parses(shared_sample):
    pairs, stats = shared_sample
    print(stats.summary())
    assert stats.rows == 2312
    assert stats.pairs + stats.skipped == stats.rows
    assert stats.skipped_prefix_mismatch == 5 and stats.skipped_empty_response == 4
    assert stats.skipped_identical == 0 and stats.skipped_no_assistant_turn == 0
    assert stats.pairs == 2303
    for p in pairs:
        assert p.prompt.endswith("\n\nAssistant:") and p.prompt.startswith("\n\nHuman:")
        assert p.chosen and p.rejected and p.chosen != p.rejected
        assert not p.chosen[0].isspace() and not p.rejected[0].isspace()


def test_shared_sample_tokenizer_trains_fast(shared_sample):
    pairs, _ = shared_sample
    texts = [*dict.fromkeys(p.prompt for p in pairs)] + [" " + r for p in pairs for r in (p.chosen, p.rejected)]
    start = time.perf_counter()
    tok = train_bpe_tokenizer(texts, vocab_size=4096)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"BPE training took {elapsed:.1f}s"
    assert len(tok) == 4096
    text = pairs[0].prompt + " " + pairs[0].chosen
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2.5  # the merges compress English dialogue well
