"""The synthetic movie-review language of the `sentiment` task, its gold reward and a generator.

The language. About 300 words, each a member of one grammatical category (determiner, noun,
adjective, intensifier, manner adverb, participle, verb, ...). Adjectives, manner adverbs and
verbs are *evaluative* and carry a gold sentiment in [-1, 1] (neutral ones 0); every other word
is 0. Intensifiers ("very", "slightly") scale the next evaluative word, "not" multiplies it by
-0.5. A sentence ends with "." and is one or two clauses joined by "and" / "but":

    the acting was truly wonderful .        i found the plot dull and slow .
    overall , the film was beautifully shot but we hated the ending .

A prompt is "<genre> review :" plus the opening words of the first sentence, cut before its first
evaluative word ("drama review : the plot was"); the response continues it, 1-2 sentences, at
most `max_response_words` words, as plain space-separated words (the policy appends EOS).

Gold reward of a response (opening of the prompt + response is parsed):

    gold = clip(S - 2*b - 2*r - 0.25*excess, -1, 1)          (empty response: -1)

    S      mean over the grammatical sentences of the mean (modified) value of the evaluative
           words the response contributes to them (0 if none)
    b      fraction of sentences that do not parse (an unterminated tail counts as one)
    r      fraction of the response's content words (nouns, adjectives, adverbs, participles,
           verbs) that repeat an earlier one
    excess words beyond `max_response_words`

Not a plugin (it registers nothing): the `sentiment` task hands out this language's prompts and
demonstrations and derives its labelled data from samples scored by `gold_breakdown`.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

from rlhfzoo.interfaces import Demonstration


def _lex(spec: str) -> dict[str, float]:
    return {w: float(v or 0) for w, _, v in (item.partition(":") for item in spec.split())}


ADJECTIVES = _lex(
    "perfect:1 wonderful:.9 brilliant:.9 superb:.9 magnificent:.9 masterful:.85 stunning:.85 excellent:.85 "
    "outstanding:.8 delightful:.8 beautiful:.8 gripping:.7 moving:.7 powerful:.7 thrilling:.7 inspired:.7 "
    "lovely:.7 charming:.6 clever:.6 witty:.6 engaging:.6 memorable:.6 touching:.6 elegant:.6 heartfelt:.6 "
    "fresh:.5 fun:.5 good:.5 enjoyable:.5 funny:.5 smart:.5 sharp:.5 vivid:.5 nice:.4 solid:.4 pleasant:.4 "
    "likable:.4 decent:.3 competent:.3 fine:.2 "
    "abysmal:-1 awful:-.9 terrible:-.9 dreadful:-.9 horrible:-.9 atrocious:-.85 unbearable:-.85 worthless:-.85 "
    "dismal:-.8 painful:-.8 woeful:-.8 tedious:-.7 boring:-.7 pointless:-.7 lifeless:-.7 dire:-.7 tiresome:-.7 "
    "dull:-.6 lazy:-.6 annoying:-.6 hollow:-.6 sloppy:-.6 stale:-.6 shallow:-.6 grating:-.6 bad:-.5 poor:-.5 "
    "clumsy:-.5 bland:-.5 messy:-.5 forgettable:-.5 confusing:-.5 clunky:-.5 weak:-.4 flat:-.4 silly:-.4 "
    "awkward:-.4 mediocre:-.3 uneven:-.3 slow:-.2 "
    "long short quiet loud dark simple familiar unusual old modern bright calm plain typical serious busy"
)
ADVERBS = _lex(
    "brilliantly:.9 wonderfully:.9 beautifully:.8 skillfully:.7 cleverly:.6 elegantly:.6 well:.5 nicely:.4 "
    "competently:.3 horribly:-.9 terribly:-.9 awfully:-.8 sloppily:-.7 poorly:-.6 lazily:-.6 clumsily:-.5 "
    "awkwardly:-.4 blandly:-.3 plainly conventionally simply"
)
VERBS = _lex(
    "adored:.9 loved:.8 enjoyed:.6 admired:.6 liked:.5 appreciated:.5 loathed:-.9 hated:-.8 regretted:-.6 "
    "resented:-.6 disliked:-.5 endured:-.5 watched saw noticed remembered"
)
INTENSIFIERS = _lex(
    "extremely:1.5 incredibly:1.5 truly:1.4 very:1.3 really:1.3 so:1.3 quite:1.1 rather:.9 fairly:.8 "
    "mostly:.8 somewhat:.6 slightly:.5"
)
GENRES = "comedy drama thriller horror western musical documentary mystery cartoon romance fantasy satire".split()
NOUNS = (
    "film movie plot story acting cast script dialogue ending soundtrack music pacing direction cinematography "
    "lead villain hero premise twist humor editing lighting setting writing tone atmosphere finale opening "
    "climax sequel performance director camera screenplay scenery narration action costume character"
).split() + GENRES
PARTICIPLES = "written acted shot directed edited paced filmed lit scored staged plotted crafted made executed".split()
OPENERS = "overall honestly frankly admittedly ultimately basically".split()
NEGATION = -0.5  # "not" multiplies the next evaluative word by this

# One-letter grammatical category of every word of the review language.
_GROUPS = {
    "D": ["the", "this"], "T": ["it"], "N": NOUNS, "B": ["was", "is"], "A": list(ADJECTIVES),
    "I": list(INTENSIFIERS), "X": ["not"], "M": list(ADVERBS), "R": PARTICIPLES, "P": ["i", "we"],
    "F": ["found", "considered"], "V": list(VERBS), "C": ["and"], "K": ["but"], "O": OPENERS,
    ",": [","], ".": ["."],
}
CATEGORY: dict[str, str] = {}
for _code, _words in _GROUPS.items():
    for _w in _words:
        assert CATEGORY.setdefault(_w, _code) == _code, f"word {_w!r} is in two categories"
VALUE: dict[str, float] = {**ADJECTIVES, **ADVERBS, **VERBS}
EVALUATIVE, CONTENT = "AMV", "NAMRV"

_ADJP = "X?I?A"
_PRED = f"(?:{_ADJP}(?:C{_ADJP})?|X?I?MR)"
_CLAUSE = f"(?:(?:DN|T)B{_PRED}|PFDN{_ADJP}(?:C{_ADJP})?|PI?VDN)"
SENTENCE = re.compile(f"(?:O,)?{_CLAUSE}(?:[CK]{_CLAUSE})?\\.")  # over category codes, one per word

# Words of the judge's critiques (training an LLM-as-a-judge), and the rating tokens.
RATINGS = [f"[[{k}]]" for k in range(1, 11)]
JUDGE_WORDS = "judge verdict fluent broken repetitive too empty positive negative neutral strongly".split()
HEADER = ["review", ":"]
VOCAB: list[str] = list(
    dict.fromkeys([*CATEGORY, *HEADER, *JUDGE_WORDS, *RATINGS, "[[", "]]", *map(str, range(1, 11))])
)
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
TEST_FRACTION = 0.1  # share of the prompt space held out (by a hash of the prompt text)


# ------------------------------------------------------------------------------ gold reward
@dataclass(frozen=True)
class GoldBreakdown:
    """The terms of the gold reward of one response (see the module docstring)."""

    sentiment: float
    broken: float
    repetition: float
    excess_words: int
    gold: float
    empty: bool = False


def _opening(prompt: str) -> list[str]:
    """The words of the first sentence that the prompt already holds (after "review :")."""
    words = prompt.split()
    return words[words.index(":") + 1 :] if ":" in words else words


def _modified_value(words: Sequence[str], j: int) -> float:
    v, k = VALUE[words[j]], j - 1
    if k >= 0 and words[k] in INTENSIFIERS:
        v, k = max(-1.0, min(1.0, v * INTENSIFIERS[words[k]])), k - 1
    return v * NEGATION if k >= 0 and words[k] == "not" else v


def _parses(words: Sequence[str]) -> bool:
    return SENTENCE.fullmatch("".join(CATEGORY.get(w, "?") for w in words)) is not None


def gold_breakdown(prompt: str, response: str, max_words: int = 24) -> GoldBreakdown:
    resp = response.split()
    if not resp:
        return GoldBreakdown(0.0, 1.0, 0.0, 0, -1.0, empty=True)
    opening = _opening(prompt)
    words, start = opening + resp, len(opening)
    bounds, a = [], 0
    for i, w in enumerate(words):
        if w == ".":
            bounds.append((a, i + 1))
            a = i + 1
    if a < len(words):
        bounds.append((a, len(words)))  # unterminated tail
    bounds = [(a, b) for a, b in bounds if b > start]  # sentences the response takes part in
    scores, bad = [], 0
    for a, b in bounds:
        if not _parses(words[a:b]):
            bad += 1
            continue
        vals = [_modified_value(words, j) for j in range(max(a, start), b) if CATEGORY[words[j]] in EVALUATIVE]
        if vals:
            scores.append(sum(vals) / len(vals))
    s = sum(scores) / len(scores) if scores else 0.0
    b = bad / len(bounds)
    content = [w for w in resp if CATEGORY.get(w, "?") in CONTENT]
    r = 1.0 - len(set(content)) / len(content) if content else 0.0
    excess = max(0, len(resp) - max_words)
    gold = round(max(-1.0, min(1.0, s - 2.0 * b - 2.0 * r - 0.25 * excess)), 6)
    return GoldBreakdown(s, b, r, excess, gold)


def gold_scores(prompts: Sequence[str], responses: Sequence[str], max_words: int = 24) -> list[float]:
    if len(prompts) != len(responses):
        raise ValueError(f"gold reward got {len(prompts)} prompts but {len(responses)} responses")
    return [gold_breakdown(p, r, max_words).gold for p, r in zip(prompts, responses)]


def is_grammatical(response: str, prompt: str = "") -> bool:
    """Whether the prompt's opening + `response` is a non-empty sequence of complete sentences."""
    br = gold_breakdown(prompt, response, max_words=10**9)
    return not br.empty and br.broken == 0.0


# ------------------------------------------------------------------------------ generator
def _cumulative(values: list[float], width: float = 0.25) -> list[list[float]]:
    """Cumulative weights favouring values near a target, for targets -1, -0.95, ..., 1."""
    def weight(v: float, target: float) -> float:
        return math.exp(-(((v - target) / width) ** 2) / 2) + 1e-6

    return [list(accumulate(weight(v, t / 20) for v in values)) for t in range(-20, 21)]


_POOLS = {c: list(g) for c, g in (("A", ADJECTIVES), ("M", ADVERBS), ("V", VERBS))}
_CUM = {c: _cumulative([VALUE[w] for w in ws]) for c, ws in _POOLS.items()}


def _clause_codes(rng: random.Random) -> list[str]:
    def adjp() -> list[str]:
        return ["X"] * (rng.random() < 0.1) + ["I"] * (rng.random() < 0.3) + ["A"]

    def adjps() -> list[str]:
        return adjp() + (["C", *adjp()] if rng.random() < 0.3 else [])

    kind = rng.random()
    if kind < 0.55:
        subject = ["D", "N"] if rng.random() < 0.8 else ["T"]
        pred = adjp()[:-1] + ["M", "R"] if rng.random() < 0.25 else adjps()
        return subject + ["B"] + pred
    if kind < 0.75:
        return ["P", "F", "D", "N"] + adjps()
    return ["P"] + ["I"] * (rng.random() < 0.3) + ["V", "D", "N"]


def _sentence_codes(rng: random.Random) -> list[str]:
    codes = ["O", ","] * (rng.random() < 0.15) + _clause_codes(rng)
    if rng.random() < 0.2:
        codes += [rng.choice("CK")] + _clause_codes(rng)
    return codes + ["."]


def _fill(rng: random.Random, codes: list[str], tone: float, used: set[str], fixed: Sequence[str] = ()) -> list[str]:
    """Words for category codes; evaluative words are drawn near `tone`, content words never repeat."""
    words: list[str] = list(fixed)
    for i in range(len(fixed), len(codes)):
        c = codes[i]
        if c == "K":  # "but": the next clause turns the other way
            tone = -tone * rng.uniform(0.3, 1.0)
        for _ in range(50):
            if c in EVALUATIVE:
                target = tone
                if i > 0 and codes[i - 1] == "I":
                    target /= INTENSIFIERS[words[i - 1]]
                if "X" in codes[max(0, i - 2) : i]:
                    target /= NEGATION
                row = _CUM[c][round(max(-1.0, min(1.0, target)) * 20) + 20]
                w = rng.choices(_POOLS[c], cum_weights=row)[0]
            else:
                w = rng.choice(_GROUPS[c])
            if c not in CONTENT or w not in used:
                break
        used.add(w)
        words.append(w)
    return words


def _review(rng: random.Random, opening: list[str] | None, max_words: int) -> tuple[list[str], list[str]]:
    """(opening words, response words) of a random review; a given opening is continued."""
    fixed = [CATEGORY.get(w, "?") for w in opening] if opening is not None else None
    for _ in range(10_000):
        codes = _sentence_codes(rng)
        if fixed is not None and codes[: len(fixed)] != fixed:
            continue
        tone = rng.uniform(-1.0, 1.0)
        used = {w for w in opening or [] if CATEGORY.get(w) in CONTENT}
        words = _fill(rng, codes, tone, used, opening or [])
        if fixed is None:  # cut before the first evaluative word or modifier, never inside "overall ,"
            first = next(i for i, c in enumerate(codes) if c in "XI" + EVALUATIVE)
            n_open = rng.choice([c for c in range(first + 1) if not (codes[0] == "O" and c == 1)])
        else:
            n_open = len(fixed)
        if rng.random() < 0.45:
            more = _fill(rng, _sentence_codes(rng), max(-1.0, min(1.0, tone + rng.gauss(0, 0.3))), used)
            if len(words) - n_open + len(more) <= max_words:
                words += more
        if len(words) - n_open <= max_words:
            return words[:n_open], words[n_open:]
    raise ValueError(f"cannot continue the opening {' '.join(opening or [])!r} in the review language")


def prompt_split(prompt: str) -> str:
    """'test' for the held-out share of all prompts (by a stable hash of the text), else 'train'."""
    h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big")
    return "test" if h % 1000 < TEST_FRACTION * 1000 else "train"


def generate_review(rng: random.Random, max_words: int = 24) -> tuple[str, str]:
    """A random (prompt, response) of the review language."""
    opening, response = _review(rng, None, max_words)
    return " ".join([rng.choice(GENRES), *HEADER, *opening]), " ".join(response)


def continue_review(rng: random.Random, prompt: str, max_words: int = 24) -> str:
    """A random grammatical response to `prompt` (reviews of random tone: an 'SFT-like' sample)."""
    return " ".join(_review(rng, _opening(prompt), max_words)[1])


def make_prompts(n: int, seed: int, split: str = "train") -> list[str]:
    """`n` distinct prompts of a split (the splits share no prompt)."""
    rng, out = random.Random(f"prompts-{seed}-{split}"), {}
    for _ in range(1000 * n):
        if len(out) >= n:
            break
        p = generate_review(rng)[0]
        if prompt_split(p) == split:
            out.setdefault(p, None)
    return list(out)


def make_demonstrations(n: int, seed: int, split: str = "train", max_words: int = 24) -> list[Demonstration]:
    """`n` grammatical reviews of every tone (average gold near 0), prompts from the split."""
    rng, out = random.Random(f"demonstrations-{seed}-{split}"), []
    while len(out) < n:
        p, r = generate_review(rng, max_words)
        if prompt_split(p) == split:
            out.append(Demonstration(p, r))
    return out
