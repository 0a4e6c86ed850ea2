"""The problems of the `arithmetic` task: generator, train/test split, exact-answer gold reward and
a character-level tokenizer.

A problem is "a+b=" or "a-b=" with non-negative integer operands written in decimal without
leading zeros; its answer is the exact result, negative ones with a leading "-":

    "12+34="  ->  "46"            "305-417="  ->  "-112"            "7-7="  ->  "0"

Operands are uniform over the numbers of min_digits to max_digits digits, [10^(min_digits-1),
10^max_digits - 1] (from 0 when min_digits = 1), so every problem is equally likely. A problem
belongs to the held-out split when a stable hash of its text falls in the first TEST_FRACTION of
the hash range, so no split shares a problem with the other, whatever the seeds and sizes.

Gold reward of a response (what a verifier checks; surrounding whitespace is ignored):

    1.0            the response is exactly the answer ("46"; not "046", "+46", "4 6", "46.")
    format_reward  otherwise, if it is an integer in the answer's format (-?[1-9][0-9]* or 0)
    0.0            anything else (empty, text, several numbers)

Not a plugin (it registers nothing): the `arithmetic` task hands out these problems and derives its
labelled data from samples scored by `gold_scores`.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Sequence

from rlhfzoo.interfaces import Demonstration

OPERATIONS = ("+", "-")
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
ALPHABET = [*"0123456789", *OPERATIONS, "=", " "]  # one token each
TEST_FRACTION = 0.1  # share of all problems held out (by a hash of the problem text)
PROBLEM = re.compile(r"(0|[1-9][0-9]*)([+-])(0|[1-9][0-9]*)=")
INTEGER = re.compile(r"-?[1-9][0-9]*|0")


# ------------------------------------------------------------------------------ problems
def answer(prompt: str) -> str:
    """The exact result of a problem "a+b=" / "a-b=", as the response should write it."""
    m = PROBLEM.fullmatch(prompt.strip())
    if m is None:
        raise ValueError(f"not an arithmetic problem: {prompt!r} (expected e.g. '12+34=' or '305-417=')")
    a, op, b = int(m[1]), m[2], int(m[3])
    return str(a + b if op == "+" else a - b)


def problem_split(prompt: str) -> str:
    """'test' for the held-out share of all problems (by a stable hash of the text), else 'train'."""
    h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big")
    return "test" if h % 1000 < TEST_FRACTION * 1000 else "train"


def operand_range(min_digits: int, max_digits: int) -> tuple[int, int]:
    """The smallest and largest operand: numbers of `min_digits` to `max_digits` digits."""
    return (0 if min_digits == 1 else 10 ** (min_digits - 1)), 10**max_digits - 1


def random_problem(rng: random.Random, min_digits: int, max_digits: int, operations: Sequence[str] = OPERATIONS) -> str:
    """One problem text, e.g. "12+34="."""
    lo, hi = operand_range(min_digits, max_digits)
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return f"{a}{rng.choice(list(operations))}{b}="


def n_problems(min_digits: int, max_digits: int, operations: Sequence[str] = OPERATIONS) -> int:
    """How many distinct problems there are (both splits together)."""
    lo, hi = operand_range(min_digits, max_digits)
    return len(operations) * (hi - lo + 1) ** 2


def make_prompts(n: int, seed: int, split: str, min_digits: int, max_digits: int,
                 operations: Sequence[str] = OPERATIONS) -> list[str]:
    """`n` distinct problems of a split; ValueError when the split holds fewer than `n` of them."""
    rng, out = random.Random(f"prompts-{seed}-{split}"), {}
    for _ in range(200 * n):
        if len(out) >= n:
            return list(out)
        p = random_problem(rng, min_digits, max_digits, operations)
        if problem_split(p) == split:
            out.setdefault(p, None)
    raise ValueError(
        f"could not draw {n} distinct {split} problems with {min_digits}..{max_digits} digits and operations "
        f"{''.join(operations)} (about {n_problems(min_digits, max_digits, operations)} problems in all, "
        f"{TEST_FRACTION:.0%} of them held out): ask for fewer prompts or allow more digits"
    )


def make_demonstrations(n: int, seed: int, split: str, min_digits: int, max_digits: int,
                        operations: Sequence[str] = OPERATIONS) -> list[Demonstration]:
    """`n` problems of a split with their answers, drawn independently (a problem may repeat when
    the split holds few)."""
    rng, out = random.Random(f"demonstrations-{seed}-{split}"), []
    while len(out) < n:
        p = random_problem(rng, min_digits, max_digits, operations)
        if problem_split(p) == split:
            out.append(Demonstration(p, answer(p)))
    return out


# ------------------------------------------------------------------------------ gold reward
def is_correct(prompt: str, response: str) -> bool:
    """Whether the response is exactly the answer (surrounding whitespace ignored)."""
    return response.strip() == answer(prompt)


def is_well_formed(response: str) -> bool:
    """Whether the response is one integer written as answers are (no sign but "-", no leading zero)."""
    return INTEGER.fullmatch(response.strip()) is not None


def gold_scores(prompts: Sequence[str], responses: Sequence[str], format_reward: float = 0.0) -> list[float]:
    """1.0 for the exact answer, `format_reward` for another well-formed integer, else 0.0."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    return [1.0 if is_correct(p, r) else format_reward if is_well_formed(r) else 0.0 for p, r in zip(prompts, responses)]


# ------------------------------------------------------------------------------ tokenizer
def make_tokenizer(padding_side: str = "right"):
    """A `transformers.PreTrainedTokenizerFast` with one token per character of ALPHABET (digits,
    operators, "=", space) and the special tokens <pad> <eos> <bos> <unk>; any other character is
    <unk>. Decoding concatenates the characters, so every text over the alphabet round-trips."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *ALPHABET])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character a word
    tok.decoder = decoders.Fuse()  # joined without separators
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        padding_side=padding_side, clean_up_tokenization_spaces=False,
    )
