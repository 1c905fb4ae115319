"""Samples to label, from generated output, SFT data and preference pairs (no torch)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from offline_rlhf.data.preference_readers import read_preference_source
from offline_rlhf.data.records import iter_json_objects, require_text
from offline_rlhf.data.sft_readers import read_sft_source
from offline_rlhf.data.template import ChatTemplate


@dataclass(frozen=True)
class Sample:
    prompt: str
    response: str
    source: str  # the input's name
    kind: str  # generated, sft, chosen or rejected
    pair: int | None = None  # preference pair index: both sides of a pair share it


def read_generated(path: str) -> list[tuple[str, str]]:
    return [(require_text(r, "prompt", where), require_text(r, "response", where, allow_empty=True))
            for where, r in iter_json_objects(path)]


def read_samples(name: str, kind: str, format: str, path: str, template: ChatTemplate,
                 max_samples: int | None, seed: int) -> list[Sample]:
    """Every sample of one input, or a seeded subset of `max_samples` (pairs for
    preference data, so both sides of a kept pair stay together)."""
    if kind == "preference":
        pairs = _subset(read_preference_source(format, path, template=template), max_samples, seed)
        return [Sample(p.prompt, response, name, side, index) for index, p in enumerate(pairs)
                for side, response in (("chosen", p.chosen), ("rejected", p.rejected))]
    if kind == "sft":
        rows = [(e.prompt, e.response) for e in read_sft_source(format, path, template=template)]
    else:
        rows = read_generated(path)
    return [Sample(prompt, response, name, kind) for prompt, response in _subset(rows, max_samples, seed)]


def _subset(items: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(items):
        return items
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]
