"""The embedded task: instructions the project generates itself, with a known gold reward.

Four instruction families whose answers can be checked by parsing the instruction:

    add 3 and 5                  -> 3 plus 5 is 8.
    reverse a b c                -> the reverse is c b a.
    repeat cat 3 times           -> cat cat cat.
    count the letters in b d a   -> there are 3 letters.

Every family is compositional (an unseen instruction is answerable from seen ones), so
evaluation prompts can be held out by instruction string. Responses come in five
qualities (`QUALITIES`); `gold_reward` scores any response string by the rule in its
docstring, and is used both to label preferences and to evaluate aligned models.
Pure Python: every random choice goes through a caller's `random.Random`.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from offline_rlhf.config.tools import TASK_FLAWS

FLAWS = TASK_FLAWS
QUALITIES = ("good", *FLAWS)
LETTERS = "abcdefgh"
WORDS = ("cat", "dog", "sun", "tree", "fish", "bird", "star", "moon",
         "cup", "hat", "box", "pen", "car", "bus", "egg", "key")
# Disjoint from every content word above, so removing them never changes an answer.
FILLERS = ("um", "uh", "well", "basically", "actually", "so", "like")
MAX_FILLERS = 3

# The gold-reward rule's weights (see `gold_reward`).
CORRECT = 2.0
WELL_FORMED = 1.0
OFF_TOPIC = -1.0
FILLER_PENALTY = 0.25

# At most this share of a family's instructions is held out for evaluation, so that
# training still covers most of every family.
HOLDOUT_CAP = 1 / 3


@dataclass(frozen=True)
class Family:
    """One instruction family: how to parse its instructions and judge its responses.

    `template` matches a well-formed response body (the final period excluded) whatever
    its content; `answer` gives the canonical body; `wrong` a well-formed body with wrong
    content; `pool` every instruction of the family.
    """

    name: str
    instruction: re.Pattern
    template: re.Pattern
    answer: Callable[[re.Match], str]
    wrong: Callable[[re.Match, random.Random], str]
    pool: Callable[[], list[str]]


def _letter_strings(lengths: range) -> list[str]:
    return [" ".join(letters) for n in lengths for letters in itertools.product(LETTERS, repeat=n)]


def _other(rng: random.Random, choices: Sequence[int], exclude: int) -> int:
    return rng.choice([value for value in choices if value != exclude])


def _add_answer(m: re.Match) -> str:
    a, b = int(m[1]), int(m[2])
    return f"{a} plus {b} is {a + b}"


def _add_wrong(m: re.Match, rng: random.Random) -> str:
    a, b = int(m[1]), int(m[2])
    return f"{a} plus {b} is {_other(rng, range(19), a + b)}"


def _reverse_answer(m: re.Match) -> str:
    return "the reverse is " + " ".join(reversed(m[1].split()))


def _reverse_wrong(m: re.Match, rng: random.Random) -> str:
    # One letter of the right answer replaced: wrong even when the input is a palindrome.
    letters = m[1].split()[::-1]
    at = rng.randrange(len(letters))
    letters[at] = rng.choice([c for c in LETTERS if c != letters[at]])
    return "the reverse is " + " ".join(letters)


REPEAT_COUNTS = range(2, 7)


def _repeat_answer(m: re.Match) -> str:
    return " ".join([m[1]] * int(m[2]))


def _repeat_wrong(m: re.Match, rng: random.Random) -> str:
    return " ".join([m[1]] * _other(rng, REPEAT_COUNTS, int(m[2])))


def _count_answer(m: re.Match) -> str:
    return f"there are {len(m[1].split())} letters"


def _count_wrong(m: re.Match, rng: random.Random) -> str:
    return f"there are {_other(rng, range(1, 10), len(m[1].split()))} letters"


FAMILIES = (
    Family("add", re.compile(r"add (\d) and (\d)"), re.compile(r"\d+ plus \d+ is \d+"),
           _add_answer, _add_wrong, lambda: [f"add {a} and {b}" for a in range(10) for b in range(10)]),
    Family("reverse", re.compile(r"reverse ([a-z](?: [a-z])+)"), re.compile(r"the reverse is [a-z](?: [a-z])+"),
           _reverse_answer, _reverse_wrong, lambda: [f"reverse {s}" for s in _letter_strings(range(2, 5))]),
    Family("repeat", re.compile(rf"repeat ({'|'.join(WORDS)}) ([{REPEAT_COUNTS[0]}-{REPEAT_COUNTS[-1]}]) times"),
           re.compile(r"([a-z]+)(?: \1)+"),
           _repeat_answer, _repeat_wrong, lambda: [f"repeat {w} {n} times" for w in WORDS for n in REPEAT_COUNTS]),
    Family("count", re.compile(r"count the letters in ([a-z](?: [a-z])+)"), re.compile(r"there are \d+ letters"),
           _count_answer, _count_wrong,
           lambda: [f"count the letters in {s}" for s in _letter_strings(range(2, 6))]),
)
FAMILY_NAMES = tuple(family.name for family in FAMILIES)


def parse_instruction(instruction: str) -> tuple[Family, re.Match]:
    """The family whose instruction pattern matches the whole (stripped) string."""
    for family in FAMILIES:
        match = family.instruction.fullmatch(instruction.strip())
        if match:
            return family, match
    raise ValueError(f"not an embedded-task instruction: {shortened(instruction)}")


def shortened(text: str, limit: int = 60) -> str:
    """`text` quoted, cut to `limit` characters for a one-line message."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def canonical_response(instruction: str) -> str:
    family, match = parse_instruction(instruction)
    return family.answer(match) + "."


def gold_reward(instruction: str, response: str) -> float:
    """The gold reward of `response` to `instruction`, a pure function of the two strings.

    The response is stripped; it is *complete* when it ends with a period. Its words
    (before that period) that are filler words (`FILLERS`) are removed and counted; the
    remaining words joined by single spaces are its *body*. Then:

    - complete and the body matches the family's response template: +1 (well formed),
      plus 2 when the body is the right answer;
    - not complete and the body is a non-empty word prefix of the right answer
      (an unfinished attempt): 0;
    - anything else (another family's answer, malformed text, empty): -1 (off topic);

    minus 0.25 per filler word. So good = 3, rambling = 3 - 0.25 k (k fillers),
    wrong = 1, truncated = 0, off-topic = -1.
    """
    family, match = parse_instruction(instruction)
    answer = family.answer(match).split()
    text = response.strip()
    complete = text.endswith(".")
    words = (text[:-1] if complete else text).split()
    body = [word for word in words if word not in FILLERS]
    penalty = FILLER_PENALTY * (len(words) - len(body))
    if complete and family.template.fullmatch(" ".join(body)):
        return WELL_FORMED + CORRECT * (body == answer) - penalty
    if not complete and body and body == answer[: len(body)]:
        return 0.0 - penalty
    return OFF_TOPIC - penalty


# ----------------------------------------------------------------------------- prompts


Pools = dict[str, list[str]]  # family name -> instructions


def _holdout_cap(pool: list[str]) -> int:
    return int(len(pool) * HOLDOUT_CAP)


def split_instructions(n_eval: int, rng: random.Random) -> tuple[Pools, list[str]]:
    """Hold out `n_eval` distinct instructions, spread over the families as evenly as
    `HOLDOUT_CAP` allows. Returns the training pools (the rest) and the held-out list."""
    pools = {family.name: family.pool() for family in FAMILIES}
    for pool in pools.values():
        rng.shuffle(pool)
    caps = {name: _holdout_cap(pool) for name, pool in pools.items()}
    if n_eval > sum(caps.values()):
        raise ValueError(f"cannot hold out {n_eval} instructions; at most {sum(caps.values())}")
    quota = dict.fromkeys(pools, 0)
    for name in itertools.cycle(pools):  # round robin over families that are not full
        if sum(quota.values()) == n_eval:
            break
        quota[name] += quota[name] < caps[name]
    held_out = [instruction for name, pool in pools.items() for instruction in pool[: quota[name]]]
    rng.shuffle(held_out)
    return {name: pool[quota[name]:] for name, pool in pools.items()}, held_out


def sample_prompt(pools: Pools, rng: random.Random, family: str | None = None) -> str:
    """A family uniformly (unless given), then one of its instructions uniformly."""
    return rng.choice(pools[family or rng.choice(FAMILY_NAMES)])


# ----------------------------------------------------------------------------- responses


def make_response(instruction: str, quality: str, pools: Pools, rng: random.Random) -> str:
    """A response of the given quality (`QUALITIES`) to `instruction`.

    good: the canonical answer. wrong: well formed, wrong content. truncated: the first
    1..n-1 words of the canonical answer, no period. off_topic: the canonical answer to a
    training instruction (from `pools`) of another family. rambling: the canonical answer
    with 1..3 filler words inserted.
    """
    family, match = parse_instruction(instruction)
    answer = family.answer(match)
    if quality == "good":
        return answer + "."
    if quality == "wrong":
        return family.wrong(match, rng) + "."
    if quality == "truncated":
        words = answer.split()
        return " ".join(words[: rng.randrange(1, len(words))])
    if quality == "off_topic":
        other = rng.choice([name for name in FAMILY_NAMES if name != family.name])
        return canonical_response(sample_prompt(pools, rng, other))
    if quality == "rambling":
        words = answer.split()
        for _ in range(rng.randint(1, MAX_FILLERS)):
            words.insert(rng.randint(0, len(words)), rng.choice(FILLERS))
        return " ".join(words) + "."
    raise ValueError(f"unknown quality {quality!r}; expected one of {QUALITIES}")


def quality_mix(good_fraction: float, flaw_weights: dict[str, float]) -> dict[str, float]:
    """Fractions per quality: `good_fraction` good, the rest split over the flaws in
    proportion to `flaw_weights` (a flaw left out gets none)."""
    total = sum(flaw_weights.values())
    rest = 1.0 - good_fraction
    return {"good": good_fraction, **{flaw: rest * flaw_weights.get(flaw, 0.0) / total for flaw in FLAWS}}


def allocate(n: int, fractions: dict[str, float], rng: random.Random) -> list[str]:
    """`n` labels in shuffled order whose counts are the fractions rounded by largest
    remainder, so counts are exact (each within one of n * fraction) rather than sampled."""
    exact = {label: n * fraction for label, fraction in fractions.items()}
    counts = {label: math.floor(value) for label, value in exact.items()}
    by_remainder = sorted(exact, key=lambda label: counts[label] - exact[label])
    for label in by_remainder[: n - sum(counts.values())]:
        counts[label] += 1
    labels = [label for label, count in counts.items() for _ in range(count)]
    rng.shuffle(labels)
    return labels


def sft_rows(n: int, fractions: dict[str, float], pools: Pools, rng: random.Random) -> list[dict]:
    """SFT demonstrations `{prompt, response, family, quality, gold_reward}` of mixed quality."""
    rows = []
    for quality in allocate(n, fractions, rng):
        prompt = sample_prompt(pools, rng)
        response = make_response(prompt, quality, pools, rng)
        rows.append({"prompt": prompt, "response": response, "family": parse_instruction(prompt)[0].name,
                     "quality": quality, "gold_reward": gold_reward(prompt, response)})
    return rows


# ----------------------------------------------------------------------------- preferences


def bt_probability(reward_a: float, reward_b: float, temperature: float) -> float:
    """Bradley-Terry: P(a preferred over b) = sigmoid((g(a) - g(b)) / temperature),
    written so that a tiny temperature cannot overflow `exp`."""
    z = (reward_a - reward_b) / temperature
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    return math.exp(z) / (1.0 + math.exp(z))


def preference_rows(n: int, temperature: float, pools: Pools, rng: random.Random) -> list[dict]:
    """Pairs `{prompt, chosen, rejected, chosen_quality, rejected_quality, chosen_gold_reward,
    rejected_gold_reward}`: two responses of two different qualities (drawn uniformly) to
    one prompt, the preferred one drawn from the Bradley-Terry model on their gold rewards."""
    rows = []
    for _ in range(n):
        prompt = sample_prompt(pools, rng)
        pair = [(quality, make_response(prompt, quality, pools, rng)) for quality in rng.sample(QUALITIES, 2)]
        (qa, a), (qb, b) = pair
        ga, gb = gold_reward(prompt, a), gold_reward(prompt, b)
        if rng.random() >= bt_probability(ga, gb, temperature):
            (qa, a, ga), (qb, b, gb) = (qb, b, gb), (qa, a, ga)
        rows.append({"prompt": prompt, "chosen": a, "rejected": b, "chosen_quality": qa,
                     "rejected_quality": qb, "chosen_gold_reward": ga, "rejected_gold_reward": gb})
    return rows


def prompt_rows(prompts: Sequence[str]) -> list[dict]:
    """`{prompt, family}` rows for the generation and evaluation prompt files."""
    return [{"prompt": prompt, "family": parse_instruction(prompt)[0].name} for prompt in prompts]
