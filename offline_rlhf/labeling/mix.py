"""Drawing the alignment dataset from reward-labeled generated and human samples in the
configured shares (paper step 3: 33.3k generated + 66.6k from the SFT and RM datasets),
and its card."""

from __future__ import annotations

import statistics

from offline_rlhf.config.samples import MixConfig
from offline_rlhf.data.errors import DataError, Location
from offline_rlhf.data.mixing import mix_sources
from offline_rlhf.data.records import iter_json_objects, optional_turns, require_field, require_number

GROUPS = ("generated", "sft", "preference")
KINDS = ("generated", "sft", "chosen", "rejected")  # what `orlhf label` writes


def group_of(record: dict) -> str:
    return "preference" if record["kind"] in ("chosen", "rejected") else record["kind"]


def read_labeled_records(path: str) -> list[dict]:
    """`orlhf label` records, checked before they are copied into the alignment set: a
    wrong type or a NaN reward found only by `orlhf align` would name the wrong file."""
    records = []
    for where, record in iter_json_objects(path):
        for key in ("prompt", "response", "kind", "source", "reward"):
            if key not in record:
                raise where.error(f"expected an object with key {key!r} (missing); is this `orlhf label` output?")
        check_labeled_record(record, where)
        records.append(record)
    return records


def check_labeled_record(record: dict, where: Location) -> None:
    for key in ("prompt", "response", "source"):
        require_field(record, key, str, where)
    optional_turns(record, where)  # copied on as written: a malformed one would surface later, in the wrong file
    kind = require_field(record, "kind", str, where)
    if kind not in KINDS:
        raise where.error(f"expected 'kind' to be one of {', '.join(KINDS)} (got {kind!r})")
    require_number(record, "reward", where)
    # Both sides of a preference pair share (source, pair): the draw keeps them together.
    if group_of(record) == "preference" and (isinstance(record.get("pair"), bool)
                                             or not isinstance(record.get("pair"), int)):
        raise where.error(f"expected a {kind} record to have an integer 'pair' (the preference pair index; "
                          f"got {'nothing' if 'pair' not in record else type(record['pair']).__name__})")


def units_by_group(records: list[dict]) -> dict[str, list[tuple[dict, ...]]]:
    """Draw units per group: single samples, or (chosen, rejected) for a preference pair,
    so both sides of a pair are always taken together."""
    units: dict[str, list[tuple[dict, ...]]] = {group: [] for group in GROUPS}
    pairs: dict[tuple[str, int], list[dict]] = {}
    for record in records:
        if group_of(record) == "preference":
            pairs.setdefault((record["source"], record["pair"]), []).append(record)
        else:
            units[group_of(record)].append((record,))
    units["preference"] = [tuple(sides) for sides in pairs.values()]
    return units


def draw(cfg: MixConfig, records: list[dict]) -> tuple[list[dict], dict]:
    """Samples in the configured shares. A preference unit holds two samples, so its
    weight counts half per unit; `total=None` keeps every generated sample."""
    units = units_by_group(records)
    weights = {"generated": cfg.weights.generated, "sft": cfg.weights.sft, "preference": cfg.weights.preference / 2}
    present = [g for g in GROUPS if units[g] and weights[g] > 0]
    if not present:
        raise DataError(cfg.input, None, "expected samples of a group with a positive weight (generated, sft or "
                                         "preference kinds)")
    total_units = _total_units(cfg, units, weights, present)
    mixed, stats = mix_sources([(g, units[g], weights[g]) for g in present], total_units, cfg.seed)
    for group in present:  # units drawn per unit available: above 1, the same samples train again and again
        stats[group]["repetition"] = round(stats[group]["taken"] / stats[group]["available"], 2)
    for group in GROUPS:
        if weights[group] > 0 and not units[group]:  # its share goes to the others: say so
            stats[group] = {"available": 0, "taken": 0, "repeated": 0, "repetition": 0, "missing": True}
    return [record for unit in mixed for record in unit], stats


def repetition_notes(stats: dict) -> list[str]:
    """A line per group drawn more often than it has units: the default mix repeats small
    human sources many times over, which only the card's numbers would otherwise show."""
    return [f"mix: {group} repeated {s['repetition']:.1f}x ({s['available']}"
            f"{' pairs' if group == 'preference' else ''} available, {s['taken']} drawn); "
            f"lower weights.{group} or total to repeat less"
            for group, s in stats.items() if s["repeated"] > 0]


def _total_units(cfg: MixConfig, units, weights, present) -> int:
    weight_sum = sum(weights[g] for g in present)
    if cfg.total is not None:
        # Convert the sample total into units: preference units are worth two samples.
        sample_weight = sum(weights[g] * (2 if g == "preference" else 1) for g in present)
        return max(1, round(cfg.total * weight_sum / sample_weight))
    if "generated" not in present:
        return sum(len(units[g]) for g in present)
    return round(len(units["generated"]) * weight_sum / weights["generated"])


def card(records: list[dict], stats: dict, cfg: MixConfig) -> dict:
    by_source: dict[str, list[float]] = {}
    for record in records:
        by_source.setdefault(f"{record['source']}:{record['kind']}", []).append(record["reward"])
    rewards = {name: {"count": len(values), "mean": statistics.fmean(values),
                      "std": statistics.pstdev(values)} for name, values in sorted(by_source.items())}
    return {"input": cfg.input, "samples": len(records), "groups": stats, "rewards_by_source": rewards,
            "weights": {"generated": cfg.weights.generated, "sft": cfg.weights.sft,
                        "preference": cfg.weights.preference}, "seed": cfg.seed}


def card_markdown(summary: dict) -> str:
    lines = ["# Alignment dataset card", "", f"{summary['samples']} samples from `{summary['input']}`", "",
             "| group | available units | taken units | repeated | repetition |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {g} | {s['available']} | {s['taken']} | {s['repeated']} | {s['repetition']:.2f}x |"
              for g, s in summary["groups"].items()]
    lines += ["", "| source:kind | samples | mean reward | std |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['count']} | {r['mean']:.3f} | {r['std']:.3f} |"
              for name, r in summary["rewards_by_source"].items()]
    return "\n".join(lines) + "\n"
