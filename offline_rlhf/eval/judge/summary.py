"""The judge's results from its judgment records: per model the mean score and its
standard error, comparisons against the baseline on the same questions (paired standard
error of the difference, win/tie/loss with seeded bootstrap intervals), pairwise win rates
with the order-inconsistency rate, parse failures and unusable judgments. Markdown and a
PNG of the scores.

The unit of every standard error and bootstrap is the question: the two turns of an MT-bench
question share its topic and the model's first answer, so they are resampled together (a
cluster bootstrap) and their deviations summed before squaring (a cluster-robust standard
error), and `n` counts questions, `judgments` the (question, turn) pairs."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from offline_rlhf.eval.judge.parsing import UNPARSED
from offline_rlhf.eval.stats import bootstrap_interval, clustered_stderr, win_rate, win_tie_loss

OUTCOMES = ("win", "tie", "loss")
ERROR_FIELDS = ("error", "g1_error", "g2_error")  # where a record names an unusable judgment
Clusters = Sequence[Sequence]  # per question, its values (or (score, baseline) pairs): one per judged turn


def _mean(clusters: Clusters) -> dict:
    clusters = [c for c in clusters if c]
    if not clusters:
        return {"mean": None, "stderr": None, "n": 0, "judgments": 0}
    values = [v for cluster in clusters for v in cluster]
    return {"mean": statistics.fmean(values), "stderr": clustered_stderr(clusters), "n": len(clusters),
            "judgments": len(values)}


def _flat(clusters: Clusters) -> tuple[list[float], list[float]]:
    pairs = [pair for cluster in clusters for pair in cluster]
    return [a for a, _ in pairs], [b for _, b in pairs]


def compare(clusters: Clusters) -> dict:
    """A model against the baseline over the same (question, turn) items, grouped by question
    as (score, baseline) pairs: the mean difference with its clustered standard error,
    win/tie/loss and the win rate (ties half), each with a 95% bootstrap interval over
    questions (a question's turns drawn together)."""
    clusters = [list(c) for c in clusters if c]
    if not clusters:
        return {"n": 0, "judgments": 0}
    scores, baseline = _flat(clusters)
    row = {"n": len(clusters), "judgments": len(scores),
           "difference": statistics.fmean(scores) - statistics.fmean(baseline),
           "difference_stderr": clustered_stderr([[a - b for a, b in c] for c in clusters])}
    row.update(zip(OUTCOMES, win_tie_loss(scores, baseline)))
    row["win_rate"] = win_rate(scores, baseline)
    for index, name in enumerate(OUTCOMES):
        row[f"{name}_low"], row[f"{name}_high"] = bootstrap_interval(clusters, partial(_outcome_share, index))
    row["win_rate_low"], row["win_rate_high"] = bootstrap_interval(clusters, _win_rate)
    return row


def _outcome_share(index: int, clusters: Clusters) -> float:
    """The win (0), tie (1) or loss (2) fraction of the resampled questions' pairs."""
    return win_tie_loss(*_flat(clusters))[index]


def _win_rate(clusters: Clusters) -> float:
    return win_rate(*_flat(clusters))


Table = dict[str, dict]  # model -> {question_id: {turn: value}}


def _scores_by_item(records: list[dict], key: str = "score") -> Table:
    """model -> {question_id: {turn: value}} for the parsed values."""
    table: Table = defaultdict(lambda: defaultdict(dict))
    for record in records:
        value = record.get(key)
        if value is not None and value != UNPARSED:
            table[record["model"]][record["question_id"]][record["turn"]] = value
    return table


def _values(table: Table, model: str, turn: int | None = None) -> list[list[float]]:
    """The model's values per question (only `turn`'s when given)."""
    return [[v for t, v in turns.items() if turn in (None, t)] for turns in table.get(model, {}).values()]


def _against_baseline(table: Table, models: Sequence[str], baseline: str) -> dict:
    if not baseline:
        return {}
    base = table.get(baseline, {})
    result = {}
    for model in models:
        if model != baseline:
            mine = table.get(model, {})
            result[model] = compare([[(mine[q][t], base[q][t]) for t in sorted(set(mine[q]) & set(base[q]))]
                                     for q in sorted(set(mine) & set(base), key=repr)])
    return result


def unusable_counts(records: list[dict]) -> dict[str, dict[str, int]]:
    """Per model (per game, `model_1 vs model_2`, in the pairwise format) and reason, the
    requests the judge could not judge (skipped and counted, unless strict)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        label = record.get("model") or f"{record['model_1']} vs {record['model_2']}"
        for name in ERROR_FIELDS:
            if record.get(name):
                counts[label][record[name]] += 1
    return {label: dict(sorted(c.items())) for label, c in counts.items()}


def unusable_line(unusable: dict[str, dict[str, int]]) -> str:
    """`3 unusable judgments (good: context_length_exceeded 2; bad: no_content 1)`."""
    total = sum(n for reasons in unusable.values() for n in reasons.values())
    parts = "; ".join(f"{label}: " + ", ".join(f"{reason} {n}" for reason, n in reasons.items())
                      for label, reasons in unusable.items())
    return f"{total} unusable judgments ({parts})"


def _failures(records: list[dict]) -> dict[str, int]:
    """Per model, the replies whose verdict could not be read (not the unusable ones)."""
    failures = defaultdict(int)
    for record in records:
        failures[record["model"]] += record["score"] == UNPARSED and not record.get("error")
    return failures


def single_summary(records: list[dict], models: Sequence[str], baseline: str) -> dict:
    table, failures, unusable = _scores_by_item(records), _failures(records), unusable_counts(records)
    per_model = {}
    for model in models:
        turns = sorted({t for by_turn in table.get(model, {}).values() for t in by_turn})
        per_model[model] = {**_mean(_values(table, model)), "parse_failures": failures[model],
                            "unusable": unusable.get(model, {}),
                            "by_turn": {str(t): _mean(_values(table, model, t)) for t in turns}}
    return {"models": per_model, "vs_baseline": _against_baseline(table, models, baseline),
            "parse_failures": sum(failures.values()), "unusable": unusable}


def paper_summary(records: list[dict], models: Sequence[str], baseline: str) -> dict:
    table, ranks = _scores_by_item(records), _scores_by_item(records, "rank_score")
    failures, unusable = _failures(records), unusable_counts(records)
    per_model = {model: {**_mean(_values(table, model)), "rank_score": _mean(_values(ranks, model)),
                         "parse_failures": failures[model], "unusable": unusable.get(model, {})}
                 for model in models}
    unranked = len({r["question_id"] for r in records if r["rank_score"] is None})
    return {"models": per_model, "vs_baseline": _against_baseline(table, models, baseline),
            "parse_failures": sum(failures.values()), "questions_unranked": unranked, "unusable": unusable}


def game_outcome(record: dict) -> int | None:
    """+1 when model_1 wins both orders, -1 when model_2 does, 0 for a tie (a tie verdict,
    or verdicts that flip with the order, as FastChat counts them); None when a verdict
    could not be read."""
    g1, g2 = record["g1_winner"], record["g2_winner"]
    if "error" in (g1, g2):
        return None
    if g1 != g2 or g1 == "tie":
        return 0
    return 1 if g1 == "model_1" else -1


def pairwise_summary(records: list[dict]) -> dict:
    # pair -> question_id -> the outcomes of its turns
    outcomes: dict[tuple[str, str], dict] = defaultdict(lambda: defaultdict(list))
    inconsistent, errors, counted = defaultdict(int), 0, 0
    for record in records:
        pair = (record["model_1"], record["model_2"])
        errors += sum(record[f"{g}_winner"] == "error" and not record.get(f"{g}_error") for g in ("g1", "g2"))
        outcome = game_outcome(record)
        if outcome is None:
            continue
        outcomes[pair][record["question_id"]].append(outcome)
        inconsistent[pair] += record["g1_winner"] != record["g2_winner"]
        counted += 1
    games = []
    for (model_1, model_2), by_question in outcomes.items():
        row = compare([[(o, 0) for o in turns] for turns in by_question.values()])
        games.append({"model": model_1, "opponent": model_2, **row, "inconsistent": inconsistent[(model_1, model_2)],
                      "inconsistency_rate": inconsistent[(model_1, model_2)] / row["judgments"]})
    return {"games": games, "parse_failures": errors, "games_with_unreadable_verdicts": len(records) - counted,
            "inconsistency_rate": sum(inconsistent.values()) / counted if counted else None,
            "unusable": unusable_counts(records)}


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _interval(row: dict, name: str) -> str:
    low, high = row[f"{name}_low"], row[f"{name}_high"]
    return f"{row[name]:.2f} [{low:.2f}, {high:.2f}]"


def _comparison_lines(vs: dict, baseline: str) -> list[str]:
    if not vs:
        return []
    lines = ["", f"Against {baseline} on the same questions (95% bootstrap intervals over questions, a question's "
                 "turns drawn together):", "",
             "| model | questions | judgments | difference ± paired s.e. | win | tie | loss | win rate (ties half) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, row in vs.items():
        if row["n"]:
            lines.append(f"| {model} | {row['n']} | {row['judgments']} | {row['difference']:+.3f} ± "
                         f"{row['difference_stderr']:.3f} | "
                         + " | ".join(_interval(row, name) for name in (*OUTCOMES, "win_rate")) + " |")
    return lines


def results_markdown(results: dict) -> str:
    fmt, summary = results["format"], results["summary"]
    lines = [f"Judge {results['judge_model']} ({fmt} format), {results['judgments']} judgments "
             f"({results['sent']} sent in this run, {results['retries']} retries in all); "
             f"{summary['parse_failures']} unreadable verdicts.", ""]
    if summary["unusable"]:
        lines[0] += f" {unusable_line(summary['unusable'])}, skipped."
    unjudged = {m: n for m, n in results.get("second_turns_not_judged", {}).items() if n}
    if unjudged:
        lines[0] += (" Second turns not judged (one-turn answers to two-turn questions): "
                     + ", ".join(f"{m} {n}" for m, n in unjudged.items()) + ".")
    if fmt == "pairwise":
        lines += ["| model | opponent | questions | games | win | tie | loss | win rate (ties half) | inconsistent |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {g['model']} | {g['opponent']} | {g['n']} | {g['judgments']} | "
                  + " | ".join(_interval(g, name) for name in (*OUTCOMES, "win_rate"))
                  + f" | {g['inconsistency_rate']:.0%} |" for g in summary["games"]]
        lines += ["", f"Order inconsistency (verdict flips when the answers swap places; counted as ties): "
                      f"{_fmt(summary['inconsistency_rate'], '.1%')}."]
        return "\n".join(lines) + "\n"
    rank = fmt == "paper"
    rank_column = " rank score (N+1-rank) ± s.e. |" if rank else ""
    lines += [f"| model | mean score ± s.e. | questions | judgments |{rank_column} unreadable |",
              f"|---|---:|---:|---:|{'---:|' if rank else ''}---:|"]
    for model, row in summary["models"].items():
        extra = f" {_fmt(row['rank_score']['mean'])} ± {_fmt(row['rank_score']['stderr'])} |" if rank else ""
        lines.append(f"| {model} | {_fmt(row['mean'])} ± {_fmt(row['stderr'])} | {row['n']} | {row['judgments']} |"
                     f"{extra} {row['parse_failures']} |")
    lines += _comparison_lines(summary["vs_baseline"], results["baseline"])
    return "\n".join(lines) + "\n"


def plot_scores(results: dict, out: Path) -> Path:
    """Bars of each model's mean score (or pairwise win rate) with their error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    if results["format"] == "pairwise":
        labels = [f"{g['model']}\nvs {g['opponent']}" for g in summary["games"]]
        values = [g["win_rate"] for g in summary["games"]]
        errors = [[v - g["win_rate_low"] for v, g in zip(values, summary["games"])],
                  [g["win_rate_high"] - v for v, g in zip(values, summary["games"])]]
        ylabel = "win rate, ties half (95% bootstrap)"
    else:
        rows = summary["models"]
        labels = list(rows)
        values = [rows[m]["mean"] or 0.0 for m in labels]
        errors = [rows[m]["stderr"] or 0.0 for m in labels]
        ylabel = "mean judge score (± s.e.)"
    figure, axis = plt.subplots(figsize=(max(4.0, 1.2 * len(labels) + 1), 3.4))
    axis.bar(labels, values, yerr=errors, capsize=4, color="#4c72b0")
    axis.set_ylabel(ylabel)
    axis.set_title(f"{results['format']} judgments by {results['judge_model']}")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
