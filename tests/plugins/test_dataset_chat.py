"""Conversational rows: every format's messages variant, rendered with the tokenizer's own chat
template so that training sees exactly the tokens inference sees, the loss on assistant turns."""

import json
from pathlib import Path

import pytest
import torch

from rlhfzoo import registry
from rlhfzoo.data.chat import ChatTemplateError, encode_chat
from rlhfzoo.data.collate import Collator, encode, prompt_ids
from rlhfzoo.data.jsonl import DataError
from rlhfzoo.data.tokenizer import CHATML_TEMPLATE, train_bpe_tokenizer
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import Chat, Demonstration, PreferencePair, RewardedExample, UnpairedExample
from rlhfzoo.testing import check_objective

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.usefixtures("one_thread")


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}
QUESTIONS = ["What is red?", "Name a fruit.", "Say hello.", "Count to two."]
GOOD = ["A colour.", "An apple.", "Hello!", "One, two."]
BAD = ["Fish.", "Chairs.", "Go away.", "Seven."]

ROWS = {
    "messages": [{"messages": [SYSTEM, user(q), bot(g)]} for q, g in zip(QUESTIONS, GOOD)],
    "preference": [{"prompt": [user(q)], "chosen": [bot(g)], "rejected": [bot(b)]} for q, g, b in zip(QUESTIONS, GOOD, BAD)],
    "implicit": [{"chosen": [user(q), bot(g)], "rejected": [user(q), bot(b)]} for q, g, b in zip(QUESTIONS, GOOD, BAD)],
    "unpaired": [{"prompt": [user(q)], "completion": [bot(g)], "label": i % 2 == 0} for i, (q, g) in enumerate(zip(QUESTIONS, GOOD))],
    "rewarded": [{"prompt": [user(q)], "completion": [bot(g)], "reward": float(i)} for i, (q, g) in enumerate(zip(QUESTIONS, GOOD))],
    "prompt-only": [{"prompt": [user(q)]} for q in QUESTIONS],
}


def chat(*messages) -> Chat:
    return Chat.of(messages)


def write(rows, path: Path) -> Path:
    ds = datasets.Dataset.from_list(rows)
    if path.suffix == ".jsonl":
        ds.to_json(str(path), lines=True)
    elif path.suffix == ".parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    return path


def task(path, **options):
    return registry.create("task", "dataset", {"path": str(path), "test_fraction": 0.0, **options})


def chat_tokenizer():
    return train_bpe_tokenizer(QUESTIONS + GOOD + BAD + ["system user assistant Be brief."], vocab_size=320, chat=True)


# ---------------------------------------------------------------------------- rows -> examples


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", "saved"])
def test_every_conversational_format_gives_chat_examples(tmp_path, suffix):
    q = [chat(user(x)) for x in QUESTIONS]
    g = [chat(bot(x)) for x in GOOD]
    b = [chat(bot(x)) for x in BAD]
    expect = {
        "messages": {"demonstrations": {Demonstration(chat(SYSTEM, user(x)), y) for x, y in zip(QUESTIONS, g)},
                     "prompts": {chat(SYSTEM, user(x)) for x in QUESTIONS}},
        "preference": {"pairs": {PreferencePair(*t) for t in zip(q, g, b)}, "prompts": set(q)},
        "implicit": {"pairs": {PreferencePair(*t) for t in zip(q, g, b)},
                     "unpaired": {UnpairedExample(p, r, ok) for p, c, x in zip(q, g, b) for r, ok in ((c, True), (x, False))}},
        "unpaired": {"unpaired": {UnpairedExample(p, r, i % 2 == 0) for i, (p, r) in enumerate(zip(q, g))},
                     "demonstrations": {Demonstration(p, r) for i, (p, r) in enumerate(zip(q, g)) if i % 2 == 0}},
        "rewarded": {"rewarded": {RewardedExample(p, r, float(i)) for i, (p, r) in enumerate(zip(q, g))}},
        "prompt-only": {"prompts": set(q)},
    }
    for fmt, kinds in expect.items():
        t = task(write(ROWS[fmt], tmp_path / f"{fmt}{suffix}"))
        for kind, examples in kinds.items():
            assert set(t.examples(kind)) == examples, (fmt, kind)
        assert t.stats.conversational is True and "conversational" in t.stats.summary()


def test_messages_split_at_the_last_or_first_assistant_turn(tmp_path):
    turns = [user("Hi"), bot("Hello."), user("Bye"), bot("Bye!")]
    rows = [{"messages": turns}, {"messages": turns[:3]}]  # the second ends in a user turn: a prompt only
    last = task(write(rows, tmp_path / "m.jsonl"))
    assert last.examples("demonstrations") == [Demonstration(chat(*turns[:3]), chat(turns[3]))]
    assert set(last.examples("prompts")) == {chat(*turns[:3])}
    every = task(tmp_path / "m.jsonl", assistant_turns="all")
    assert every.examples("demonstrations") == [Demonstration(chat(turns[0]), chat(*turns[1:]))]


def test_bad_conversational_rows_name_the_row(tmp_path):
    cases = [
        ([{"prompt": [user("q")], "completion": "a plain string"}], r"row 1: field 'completion' is a string, unlike the row's other texts"),
        ([{"messages": [{"role": "user", "text": "q"}]}], r"row 1: message 1 of field 'messages' must be an object with string 'role' and 'content'"),
        ([{"text": [user("q")]}], r"row 1: field 'text' is a list of messages; name that column 'messages'"),
    ]
    for rows, message in cases:
        with pytest.raises(DataError, match=message):
            task(write(rows, tmp_path / "bad.jsonl")).examples("prompts" if "text" not in rows[0] else "demonstrations")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write([{"prompt": "plain", "completion": " text"}], mixed / "a.jsonl")
    write([{"prompt": [user("q")], "completion": [bot("a")]}], mixed / "b.jsonl")
    with pytest.raises(DataError, match="b.jsonl, row 1: the row is conversational .* unlike the rows read before it"):
        task(mixed).examples("demonstrations")


# ---------------------------------------------------------------------------- tokens: training == inference


def test_encoding_is_the_chat_template_and_the_mask_the_assistant_turn():
    tok = chat_tokenizer()
    prompt, response = chat(SYSTEM, user("Name a fruit.")), chat(bot("An apple."))
    ids, mask = encode(tok, prompt, response, max_length=512)
    full = tok.apply_chat_template((prompt + response).messages(), tokenize=True, return_dict=True)["input_ids"]
    generation = tok.apply_chat_template(prompt.messages(), tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == list(full)  # no BOS or EOS of our own around the template
    assert prompt_ids(tok, prompt) == list(generation) == ids[: mask.index(1)]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "An apple.<|im_end|>\n"
    assert tok.decode(ids[: mask.index(1)]).endswith("<|im_start|>assistant\n")


def test_all_assistant_turns_are_trained_and_no_user_turn():
    tok = chat_tokenizer()
    ids, mask = encode_chat(tok, chat(user("Hi")), chat(bot("Hello."), user("Bye"), bot("Bye!")))
    assert ids == list(tok.apply_chat_template(
        [user("Hi"), bot("Hello."), user("Bye"), bot("Bye!")], tokenize=True, return_dict=True)["input_ids"])
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    runs += [tok.decode(current)] if current else []
    assert runs == ["Hello.<|im_end|>\n", "Bye!<|im_end|>\n"]


def test_a_template_with_its_own_bos_gets_no_second_one():
    tok = chat_tokenizer()
    tok.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
    ids, mask = encode(tok, chat(user("Hi")), "Hello!", max_length=512)  # a generated text answers a chat prompt
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello!<|im_end|>\n"


def test_no_template_and_rewriting_templates_are_user_errors():
    tok = train_bpe_tokenizer(QUESTIONS + GOOD, vocab_size=300)
    with pytest.raises(ChatTemplateError, match="no chat template.*policy.init") as e:
        Collator(tok)([(0, Demonstration(chat(user("Hi")), chat(bot("Hello"))))])
    assert isinstance(e.value, UserError)
    tok = chat_tokenizer()
    # A template that only ever shows the last user turn (earlier turns are rewritten away).
    tok.chat_template = (
        "{% set last = messages[-1] %}<|im_start|>{{ last['role'] }}\n{{ last['content'] }}<|im_end|>\n"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="does not begin with the prompt rendered with its generation prompt"):
        encode_chat(tok, chat(user("Hi")), chat(bot("Hello")))


def test_pretrained_policy_uses_its_own_template_for_generation(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = chat_tokenizer()
    tok.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE  # unlike the BPE the task would train
    model_dir = tmp_path / "llama"
    tiny_llama(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write(ROWS["prompt-only"], tmp_path / "p.jsonl")
    t = task(data)
    policy = registry.create("policy", "hf", {"init": str(model_dir), "max_new_tokens": 4}, task=t)
    prompt = t.examples("prompts")[0]
    rollout = policy.generate([prompt])
    expected = tok.apply_chat_template(prompt.messages(), tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    given = rollout.sequences[0][rollout.attention_mask[0].bool() & ~rollout.response_mask[0].bool()].tolist()
    assert given == list(expected) and given[0] == tok.bos_token_id


def tiny_llama(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------------------- training from conversational files


@pytest.mark.slow
@pytest.mark.parametrize("objective,fmt,file", [
    ("sft", "messages", "d.jsonl"), ("dpo", "preference", "d.parquet"), ("kto", "unpaired", "saved"), ("bradley-terry", "implicit", "d.jsonl"),
])
def test_objectives_train_from_conversational_files(objective, fmt, file, tmp_path):
    rows = [json.loads(json.dumps(r).replace('."', f'. {n}."')) for n in range(3) for r in ROWS[fmt]]  # 12 distinct rows
    section = {"name": "dataset", "path": str(write(rows, tmp_path / file)), "vocab_size": 320}
    check_objective(objective, tmp_path / "run", task=section, reward=None)  # scratch model, ChatML BPE


# ---------------------------------------------------------------------------- learning


ANSWERS = {"Which door is blue?": "The third one.", "Where is the key?": "Under the mat.", "Who has the map?": "Ana does.",
           "When does it open?": "At nine.", "What is the code?": "Four two seven.", "Who rang?": "The baker.",
           "Where is the cat?": "On the roof.", "What did she bring?": "A green kite."}


def answers_under_the_template(model_dir) -> dict[str, str]:
    """What a model directory answers each question with, loaded and prompted as a user would:
    its own tokenizer's `apply_chat_template(add_generation_prompt=True)`, greedy `generate`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = {}
    for question in ANSWERS:
        ids = tok.apply_chat_template([SYSTEM, user(question)], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, do_sample=False, max_new_tokens=16, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out[question] = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


@pytest.mark.learning
def test_sft_on_messages_teaches_answers_given_under_the_chat_template(tmp_path):
    import yaml

    from rlhfzoo.cli import main

    rows = [{"messages": [SYSTEM, user(q), bot(a)]} for q, a in ANSWERS.items()]
    data = write(rows, tmp_path / "chat.jsonl")
    tok = train_bpe_tokenizer([t for q, a in ANSWERS.items() for t in (q, a)] + ["system user assistant Be brief."], vocab_size=400, chat=True)
    model_dir = tmp_path / "llama"
    tiny_llama(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    before = answers_under_the_template(model_dir)
    assert sum(before[q] == a for q, a in ANSWERS.items()) == 0, before

    config = {
        "task": {"name": "dataset", "path": str(data), "test_fraction": 0.0},
        "policy": {"name": "hf", "init": str(model_dir)},
        "algorithm": {"name": "sft"},
        "train": {"steps": 60, "batch_size": 8, "lr": 3e-3, "eval_prompts": 0, "progress": False, "num_threads": 1},
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "sft.yaml")]) == 0
    after = answers_under_the_template(tmp_path / "run" / "policy")
    right = sum(after[q] == a for q, a in ANSWERS.items())
    print(f"answers right after SFT: {right}/{len(ANSWERS)}")
    assert right >= 6, after


def test_training_conversations_with_a_templateless_tokenizer_exits_2_and_writes_nothing(tmp_path, capsys):
    import yaml

    from rlhfzoo.cli import main

    tok = train_bpe_tokenizer(QUESTIONS + GOOD, vocab_size=300)  # no chat template
    model_dir = tmp_path / "llama"
    tiny_llama(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [{"prompt": [user(q)], "completion": [bot(g)]} for q, g in zip(QUESTIONS, GOOD)]
    config = {
        "task": {"name": "dataset", "path": str(write(rows, tmp_path / "chat.jsonl")), "test_fraction": 0.0},
        "policy": {"name": "hf", "init": str(model_dir)},
        "algorithm": {"name": "sft"},
        "train": {"steps": 2, "batch_size": 2, "eval_prompts": 0, "progress": False},
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "sft.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no chat template" in err and "policy.init" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "policy").exists() and not (tmp_path / "run" / "summary.json").exists()


def test_online_training_on_conversational_prompts_scores_chats(tmp_path):
    import rlhfzoo

    tok = chat_tokenizer()
    seen = []

    def reward(prompts, responses):
        seen.extend(prompts)
        return [float(len(r)) for r in responses]

    rows = [{"prompt": [SYSTEM, user(q)]} for q in QUESTIONS] * 2
    result = rlhfzoo.train(
        {"algorithm": {"name": "ppo-clip"}, "policy": {"max_new_tokens": 6},
         "task": {"test_fraction": 0.0}, "train": {"steps": 1, "batch_size": 4, "eval_prompts": 0, "progress": False}},
        model=tiny_llama(tok), tokenizer=tok, train_dataset=rows, reward=reward, output_dir=tmp_path / "run",
    )
    assert len(seen) == 4 and all(isinstance(p, Chat) and p.turns[0] == ("system", "Be brief.") for p in seen)
    assert result.summary["finished"]
