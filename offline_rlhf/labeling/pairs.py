"""Preference pairs for DPO, IPO and cDPO from `orlhf label` output, and their summed
response log-probs under a model (the reference pass and the policy in training).

Two sources, mixed by weight like the paper's data:
- RM-ranked pairs: per prompt of the generated samples, the answer with the highest
  normalized reward is chosen and the one with the lowest rejected, when their gap is at
  least `min_gap` (z-score units). Prompts with one sample, ties (best and worst equal in
  reward or text) and gaps below `min_gap` give no pair and are counted.
- Human pairs: both sides of each preference pair `orlhf label` read (hh-rlhf, OASST or a
  user's JSONL, through the preference readers), with the human's choice, not the RM's.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from offline_rlhf.data.batching import collate_sequences
from offline_rlhf.data.errors import DataError
from offline_rlhf.data.mixing import mix_sources
from offline_rlhf.data.packing import PackedSequence
from offline_rlhf.data.pair_dataset import PairExample, pair_record
from offline_rlhf.data.records import TURNS
from offline_rlhf.labeling.mix import units_by_group
from offline_rlhf.labeling.samples import prompt_key
from offline_rlhf.parallel.logprobs import model_token_nll
from offline_rlhf.runtime import Runtime, autocast_for

RANKED, HUMAN = "rm_ranked", "human"


@dataclass(frozen=True)
class BuiltPair:
    example: PairExample
    origin: str  # RANKED or HUMAN
    source: str  # the `orlhf label` input it came from
    chosen_reward: float  # normalized RM rewards, for the card (human pairs keep the human's order)
    rejected_reward: float

    def record(self) -> dict:
        return {**pair_record(self.example), "origin": self.origin, "source": self.source,
                "chosen_reward": self.chosen_reward, "rejected_reward": self.rejected_reward}


def _example(chosen: dict, rejected: dict) -> PairExample:
    """A pair of answers to one prompt, whose text and turns the chosen side gives: ranked
    pairs are grouped on both (`prompt_key`), a human pair's sides come from one record of
    `orlhf label`'s input."""
    return PairExample(chosen["prompt"], chosen["response"], rejected["response"],
                       chosen.get("finished", True), rejected.get("finished", True),
                       tuple(tuple(turn) for turn in chosen.get(TURNS, ())))


def ranked_pairs(records: Sequence[dict], min_gap: float) -> tuple[list[BuiltPair], dict[str, int]]:
    """Best vs worst generated answer per (input, prompt); the counts say what every prompt gave.
    A prompt is its text and turns (`prompt_key`)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        if record["kind"] == "generated":
            groups[(record["source"], *prompt_key(record["prompt"], record.get(TURNS, ())))].append(record)
    pairs, counts = [], {"prompts": len(groups), "pairs": 0, "single_sample": 0, "tie": 0, "below_gap": 0}
    for (source, *_), members in groups.items():
        best = max(members, key=lambda r: r["reward"])
        worst = min(members, key=lambda r: r["reward"])
        gap = best["reward"] - worst["reward"]
        reason = ("single_sample" if len(members) == 1 else
                  "tie" if gap == 0 or best["response"] == worst["response"] else
                  "below_gap" if gap < min_gap else "pairs")
        counts[reason] += 1
        if reason == "pairs":
            pairs.append(BuiltPair(_example(best, worst), RANKED, source, best["reward"], worst["reward"]))
    return pairs, counts


def human_pairs(records: Sequence[dict]) -> tuple[list[BuiltPair], dict[str, int]]:
    """The labeled preference pairs as the human ranked them; a pair missing a side is counted."""
    pairs, incomplete = [], 0
    for unit in units_by_group(records)["preference"]:
        sides = {record["kind"]: record for record in unit}
        if len(unit) != 2 or set(sides) != {"chosen", "rejected"}:
            incomplete += 1
            continue
        chosen, rejected = sides["chosen"], sides["rejected"]
        pairs.append(BuiltPair(_example(chosen, rejected), HUMAN, chosen["source"], chosen["reward"],
                               rejected["reward"]))
    return pairs, {"pairs": len(pairs), "incomplete": incomplete}


def build_pairs(records: Sequence[dict], min_gap: float, weights: dict[str, float], total: int | None,
                seed: int, input_path: str) -> tuple[list[BuiltPair], dict]:
    """RM-ranked and human pairs mixed by `weights` ({RANKED: w, HUMAN: w}; `total` pairs,
    None: each once) in a seeded order, and the dataset card's counts."""
    ranked, ranked_counts = ranked_pairs(records, min_gap)
    human, human_counts = human_pairs(records)
    available = {RANKED: ranked, HUMAN: human}
    present = [(name, available[name], weights[name]) for name in (RANKED, HUMAN)
               if available[name] and weights[name] > 0]
    if not present:
        raise DataError(input_path, None, f"expected a pair from a source with a positive weight (ranked: "
                                          f"{ranked_counts}; human: {human_counts})")
    mixed, stats = mix_sources(present, total, seed)
    card = {"input": input_path, "pairs": len(mixed), "groups": stats, "rm_ranked": ranked_counts,
            "human": human_counts, "min_gap": min_gap, "weights": weights, "total": total, "seed": seed}
    return mixed, card


def response_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] summed log-probs of the labelled (response) tokens of one-document rows, in any
    TP layout (`token_nll` takes the local copy of loss-parallel values)."""
    nll, mask = model_token_nll(model, batch)
    return -(nll * mask).sum(dim=1)


@torch.no_grad()
def sequence_logps(model: nn.Module, sequences: Sequence[PackedSequence], batch_size: int, rt: Runtime,
                   pad_id: int) -> list[float]:
    """`response_logps` of `sequences` in order, in batches (this process's share only:
    the reference stage gives each replica its own block, as generation does)."""
    values: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = collate_sequences(sequences[start:start + batch_size], pad_id, rt.dims.sequence_multiple)
        with autocast_for(rt.device):
            values += response_logps(model, {k: v.to(rt.device) for k, v in batch.items()}).double().tolist()
    return values
