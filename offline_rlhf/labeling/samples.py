"""Samples to label, from generated output, SFT data and preference pairs (no torch)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from offline_rlhf.data.preference_readers import read_preference_source
from offline_rlhf.data.records import iter_json_objects, optional_turns, require_field
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
    origin: tuple[tuple[str, Any], ...] = ()  # a generated record's PROVENANCE keys, (key, value) as read
    selected: str | None = None  # best, worst or ONLY when its input's `select` kept it (`selected_per_prompt`)


UNFINISHED = "unfinished (cut at max_new_tokens)"  # the reason counted for cut-off generations left out
# What `orlhf generate` records about an answer, copied to labeled.jsonl so that a labeled
# row joins back to samples.jsonl on (id, sample).
PROVENANCE = ("id", "sample", "model", "finish_reason", "prompt_truncated")


@dataclass(frozen=True)
class GeneratedRow:
    prompt: str
    response: str
    finished: bool
    turns: tuple[Turn, ...]
    origin: tuple[tuple[str, Any], ...]


def read_generated(path: str, skips: Skips | None = None) -> list[GeneratedRow]:
    """One row per record. `finished` is what `orlhf generate` wrote (true when absent: other
    files hold finished answers), `turns` those of a multi-turn prompt (`optional_turns`). A
    blank prompt, turn or answer is unusable (as in `orlhf align`): an empty answer says
    nothing a reward could rank, and an empty cut-off one has not even an EOS to score."""
    skips, rows = strict_or(skips), []
    for where, record in iter_json_objects(path):
        finished = require_field(record, "finished", bool, where) if "finished" in record else True
        with skips.record():
            turns = optional_turns(record, where)  # malformed turns stay an error (not an UnusableRecord)
            prompt, response = require_texts(record, ("prompt", "response"), where)
            origin = tuple((key, record[key]) for key in PROVENANCE if key in record)
            rows.append(GeneratedRow(prompt, response, finished, turns, origin))
    return rows


def read_samples(name: str, kind: str, format: str, path: str, template: ChatTemplate,
                 max_samples: int | None, seed: int, skips: Skips | None = None,
                 include_unfinished: bool = False, **hub: str) -> list[Sample]:
    """Every sample of one input, or a seeded subset of `max_samples` records of sft data,
    pairs of preference data (both sides of a kept pair stay together) or prompts of
    generated data (all the answers of a kept prompt stay together). `hub` holds the
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
        return [Sample(e.prompt, e.response, name, kind, turns=e.turns) for e in _subset(examples, max_samples, seed)]
    rows = read_generated(path, skips)
    if not include_unfinished and (cut := sum(not row.finished for row in rows)):
        skips.add(UNFINISHED, cut)
        rows = [row for row in rows if row.finished]
    return [Sample(row.prompt, row.response, name, kind, finished=None if row.finished else False, turns=row.turns,
                   origin=row.origin) for row in _whole_prompts(rows, max_samples, seed)]


def _subset(items: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(items):
        return items
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def _whole_prompts(rows: list[GeneratedRow], limit: int | None, seed: int) -> list[GeneratedRow]:
    """The answers of a seeded subset of `limit` prompts, every answer of each (best of n
    must stay of n), in file order; with one answer per prompt, the subset `_subset` draws."""
    keys = list(dict.fromkeys(prompt_key(row.prompt, row.turns) for row in rows))
    chosen = set(_subset(keys, limit, seed))
    return [row for row in rows if prompt_key(row.prompt, row.turns) in chosen]


ONLY = "only"  # the `selected` mark of a prompt's best that is also its worst (one distinct answer, or all tied)


def selected_per_prompt(samples: list[Sample], rewards: list[float], selections: dict[str, str],
                        sequences: Sequence[Sequence[int]] | None = None) -> dict[int, str | None]:
    """{index: mark} of the samples to keep, in ascending order. Inputs (`Sample.source`)
    whose selection is "all" keep everything, unmarked (None); the others keep, per prompt,
    the answer with the highest and/or the lowest reward ("best", "worst", "best_worst"),
    marked "best", "worst" or ONLY. Copies of one answer text are one candidate, the first
    read: their rewards can differ in the last bits with the scoring batch, and an answer
    must not be a prompt's best and its worst. With `sequences` (the token ids each sample
    was scored on), so are different texts that the reward model's length cut to one
    sequence (`identical_once_cut` counts them). Ties go to the first. A prompt is its text
    and turns (`prompt_key`)."""
    marks = {index: None for index, sample in enumerate(samples) if not _per_prompt(sample, selections)}
    for (source, *_), by_text in _answers_per_prompt(samples, selections).items():
        candidates = _distinct_once_cut(list(by_text.values()), sequences)
        best, worst = max(candidates, key=rewards.__getitem__), min(candidates, key=rewards.__getitem__)
        chosen = {"best": {best: "best"}, "worst": {worst: "worst"}, "best_worst": {best: "best", worst: "worst"}}
        marks.update({best: ONLY} if best == worst else chosen[selections[source]])
    return dict(sorted(marks.items()))


def _per_prompt(sample: Sample, selections: dict[str, str]) -> bool:
    """Whether `sample`'s input selects per prompt (its select is not "all")."""
    return selections.get(sample.source, "all") != "all"


def _answers_per_prompt(samples: list[Sample], selections: dict[str, str]) -> dict[tuple, dict[str, int]]:
    """{(input, prompt_key...): {answer text: index of its first copy}} over the inputs that
    select per prompt."""
    groups = defaultdict(dict)
    for index, sample in enumerate(samples):
        if _per_prompt(sample, selections):
            groups[(sample.source, *prompt_key(sample.prompt, sample.turns))].setdefault(sample.response, index)
    return groups


def _distinct_once_cut(indices: list[int], sequences: Sequence[Sequence[int]] | None) -> list[int]:
    """The first of `indices` with each scored sequence (all of them without `sequences`)."""
    if sequences is None:
        return indices
    first: dict[tuple[int, ...], int] = {}
    for index in indices:
        first.setdefault(tuple(sequences[index]), index)
    return list(first.values())


def identical_once_cut(samples: list[Sample], sequences: Sequence[Sequence[int]],
                       selections: dict[str, str]) -> dict[str, int]:
    """What the reward model's length limit made identical: `answers`, those of inputs that
    select per prompt whose text differs from every earlier answer's to that prompt but
    whose scored tokens (`sequences`) equal one's (left out as its copies by
    `selected_per_prompt`); `prompts`, the prompts with two or more answer texts left with
    one candidate by that (marked ONLY); `pairs`, the preference pairs whose chosen and
    rejected sides are (both kept, scored alike: no signal)."""
    groups, sides = _answers_per_prompt(samples, selections), defaultdict(list)
    for index, sample in enumerate(samples):
        if sample.pair is not None:
            sides[(sample.source, sample.pair)].append(tuple(sequences[index]))
    left = {key: len(_distinct_once_cut(list(by_text.values()), sequences)) for key, by_text in groups.items()}
    return {"answers": sum(len(groups[key]) - left[key] for key in groups),
            "prompts": sum(len(groups[key]) > 1 and left[key] == 1 for key in groups),
            "pairs": sum(len(pair) == 2 and pair[0] == pair[1] for pair in sides.values())}


def prompt_key(prompt: str, turns: Sequence[Sequence[str]]) -> tuple[str, tuple[Turn, ...]]:
    """What tells the answers of one prompt from another's: its folded text AND its turns
    (a one-turn prompt's text can equal a conversation's fold, `User:` tags and all)."""
    return prompt, tuple(tuple(turn) for turn in turns)
