"""Samples to label, from generated output, SFT data and preference pairs (no torch)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from offline_rlhf.data.preference_readers import read_preference_source
from offline_rlhf.data.records import iter_json_objects, optional_turns, require_field, require_text
from offline_rlhf.data.sft_readers import read_sft_source
from offline_rlhf.data.skips import Skips, require_texts, strict_or
from offline_rlhf.data.template import ChatTemplate, Turn


@dataclass(frozen=True)
class Sample:
    prompt: str
    response: str
    source: str  # the input's name
    kind: str  # generated, sft, chosen or rejected
    pair: int | None = None  # preference pair index: both sides of a pair share it
    finished: bool | None = None  # False: a generation cut at max_new_tokens, kept by include_unfinished
    turns: tuple[Turn, ...] = ()  # a multi-turn prompt's conversation (`prompt` is it folded); () for one turn


UNFINISHED = "unfinished (cut at max_new_tokens)"  # the reason counted for cut-off generations left out


def read_generated(path: str, skips: Skips | None = None) -> list[tuple[str, str, bool, tuple[Turn, ...]]]:
    """(prompt, response, finished, turns) per record. `finished` is what `orlhf generate`
    wrote (true when absent: other files hold finished answers), `turns` those of a multi-turn
    prompt (`optional_turns`). A blank prompt or turn is unusable, and so is an empty answer
    cut at max_new_tokens: with no EOS (or end-of-turn marker) either, it has no token to score."""
    skips, rows = strict_or(skips), []
    for where, record in iter_json_objects(path):
        finished = require_field(record, "finished", bool, where) if "finished" in record else True
        response = require_text(record, "response", where, allow_empty=True)  # an empty answer is still an answer
        prompt = require_text(record, "prompt", where, allow_empty=True)
        with skips.record():
            turns = optional_turns(record, where)  # malformed turns stay an error (not an UnusableRecord)
            require_texts(record, ("prompt",), where)
            if not response and not finished:
                raise where.unusable("expected an unfinished 'response' to have text (blank)",
                                     "blank unfinished 'response'")
            rows.append((prompt, response, finished, turns))
    return rows


def read_samples(name: str, kind: str, format: str, path: str, template: ChatTemplate,
                 max_samples: int | None, seed: int, skips: Skips | None = None,
                 include_unfinished: bool = False, **hub: str) -> list[Sample]:
    """Every sample of one input, or a seeded subset of `max_samples` (pairs for
    preference data, so both sides of a kept pair stay together). `hub` holds the
    `format: hf` options and column names of sft and preference inputs (`hub_options`).

    Unusable records are counted into `skips` (None: errors). Generated samples cut at
    max_new_tokens are left out before the subset is drawn, counted under UNFINISHED,
    unless `include_unfinished`, which keeps them with `finished=False`."""
    skips = strict_or(skips)
    if kind == "preference":
        pairs = _subset(read_preference_source(format, path, template=template, skips=skips, **hub), max_samples, seed)
        return [Sample(p.prompt, response, name, side, index, turns=p.turns) for index, p in enumerate(pairs)
                for side, response in (("chosen", p.chosen), ("rejected", p.rejected))]
    if kind == "sft":
        examples = read_sft_source(format, path, template=template, skips=skips, **hub)
        rows = [(e.prompt, e.response, True, e.turns) for e in examples]
    else:
        rows = read_generated(path, skips)
    if not include_unfinished and (cut := sum(not finished for _, _, finished, _ in rows)):
        skips.add(UNFINISHED, cut)
        rows = [row for row in rows if row[2]]
    return [Sample(prompt, response, name, kind, finished=None if finished else False, turns=turns)
            for prompt, response, finished, turns in _subset(rows, max_samples, seed)]


def _subset(items: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(items):
        return items
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def select_per_prompt(samples: list[Sample], rewards: list[float], selections: dict[str, str]) -> list[int]:
    """Indices (ascending) of the samples to keep. Inputs (`Sample.source`) whose selection
    is "all" keep everything; the others keep, per prompt, the answer with the highest
    and/or the lowest reward ("best", "worst", "best_worst"; the first one on ties). A prompt
    is its text and turns (`prompt_key`)."""
    keep, groups = [], defaultdict(list)
    for index, sample in enumerate(samples):
        if selections.get(sample.source, "all") == "all":
            keep.append(index)
        else:
            groups[(sample.source, *prompt_key(sample.prompt, sample.turns))].append(index)
    for (source, *_), members in groups.items():
        best, worst = max(members, key=rewards.__getitem__), min(members, key=rewards.__getitem__)
        keep += {"best": {best}, "worst": {worst}, "best_worst": {best, worst}}[selections[source]]
    return sorted(keep)


def prompt_key(prompt: str, turns: Sequence[Sequence[str]]) -> tuple[str, tuple[Turn, ...]]:
    """What tells the answers of one prompt from another's: its folded text AND its turns
    (a one-turn prompt's text can equal a conversation's fold, `User:` tags and all)."""
    return prompt, tuple(tuple(turn) for turn in turns)
