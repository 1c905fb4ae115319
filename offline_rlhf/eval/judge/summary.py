"""The judge's results from its judgment records: per model the mean score and its
standard error, comparisons against the baseline on the same questions (paired standard
error of the difference, win/tie/loss with seeded bootstrap intervals), pairwise win rates
with the order-inconsistency rate, and parse failures. Markdown and a PNG of the scores."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from offline_rlhf.eval.judge.parsing import UNPARSED
from offline_rlhf.eval.results import compare as paired_comparison
from offline_rlhf.eval.stats import (
    bootstrap_interval,
    mean_and_stderr,
    win_tie_loss,
)

OUTCOMES = ("win", "tie", "loss")


def _mean(values: Sequence[float]) -> dict:
    if not values:
        return {"mean": None, "stderr": None, "n": 0}
    mean, stderr = mean_and_stderr(values)
    return {"mean": mean, "stderr": stderr, "n": len(values)}


def compare(scores: Sequence[float], baseline: Sequence[float]) -> dict:
    """`orlhf eval`'s paired comparison over the same items (difference with its paired
    standard error, win/tie/loss, win rate with its 95% bootstrap interval), plus intervals
    for the win, tie and loss fractions."""
    if not scores:
        return {"n": 0}
    row, pairs = paired_comparison(list(scores), list(baseline)), list(zip(scores, baseline))
    for index, name in enumerate(OUTCOMES):
        row[f"{name}_low"], row[f"{name}_high"] = bootstrap_interval(pairs, partial(_outcome_share, index))
    return row


def _outcome_share(index: int, pairs: Sequence[tuple[float, float]]) -> float:
    """The win (0), tie (1) or loss (2) fraction of (score, baseline) pairs."""
    return win_tie_loss(*zip(*pairs))[index]


def _scores_by_item(records: list[dict], key: str = "score") -> dict[str, dict[tuple, float]]:
    """model -> {(question_id, turn): value} for the parsed values."""
    table: dict[str, dict[tuple, float]] = defaultdict(dict)
    for record in records:
        value = record.get(key)
        if value is not None and value != UNPARSED:
            table[record["model"]][(record["question_id"], record["turn"])] = value
    return table


def _against_baseline(table: dict[str, dict[tuple, float]], models: Sequence[str], baseline: str) -> dict:
    if not baseline:
        return {}
    base = table.get(baseline, {})
    result = {}
    for model in models:
        if model != baseline:
            items = sorted(set(table.get(model, {})) & set(base), key=repr)
            result[model] = compare([table[model][i] for i in items], [base[i] for i in items])
    return result


def single_summary(records: list[dict], models: Sequence[str], baseline: str) -> dict:
    table = _scores_by_item(records)
    failures = defaultdict(int)
    for record in records:
        failures[record["model"]] += record["score"] == UNPARSED
    per_model = {}
    for model in models:
        items = table.get(model, {})
        per_model[model] = {**_mean(list(items.values())), "parse_failures": failures[model],
                            "by_turn": {str(t): _mean([v for (_, turn), v in items.items() if turn == t])
                                        for t in sorted({turn for _, turn in items})}}
    return {"models": per_model, "vs_baseline": _against_baseline(table, models, baseline),
            "parse_failures": sum(failures.values())}


def paper_summary(records: list[dict], models: Sequence[str], baseline: str) -> dict:
    table, ranks = _scores_by_item(records), _scores_by_item(records, "rank_score")
    failures = defaultdict(int)
    for record in records:
        failures[record["model"]] += record["score"] == UNPARSED
    per_model = {model: {**_mean(list(table.get(model, {}).values())),
                         "rank_score": _mean(list(ranks.get(model, {}).values())),
                         "parse_failures": failures[model]} for model in models}
    unranked = len({r["question_id"] for r in records if r["rank_score"] is None})
    return {"models": per_model, "vs_baseline": _against_baseline(table, models, baseline),
            "parse_failures": sum(failures.values()), "questions_unranked": unranked}


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
    outcomes: dict[tuple[str, str], list[int]] = defaultdict(list)
    inconsistent, errors = defaultdict(int), 0
    for record in records:
        pair = (record["model_1"], record["model_2"])
        errors += (record["g1_winner"] == "error") + (record["g2_winner"] == "error")
        outcome = game_outcome(record)
        if outcome is None:
            continue
        outcomes[pair].append(outcome)
        inconsistent[pair] += record["g1_winner"] != record["g2_winner"]
    games = []
    for (model_1, model_2), values in outcomes.items():
        row = compare(values, [0] * len(values))
        games.append({"model": model_1, "opponent": model_2, **row, "inconsistent": inconsistent[(model_1, model_2)],
                      "inconsistency_rate": inconsistent[(model_1, model_2)] / len(values)})
    counted = sum(len(v) for v in outcomes.values())
    return {"games": games, "parse_failures": errors, "games_with_unreadable_verdicts": len(records) - counted,
            "inconsistency_rate": sum(inconsistent.values()) / counted if counted else None}


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _interval(row: dict, name: str) -> str:
    low, high = row[f"{name}_low"], row[f"{name}_high"]
    return f"{row[name]:.2f} [{low:.2f}, {high:.2f}]"


def _comparison_lines(vs: dict, baseline: str) -> list[str]:
    if not vs:
        return []
    lines = ["", f"Against {baseline} on the same questions (95% bootstrap intervals):", "",
             "| model | n | difference ± paired s.e. | win | tie | loss | win rate (ties half) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for model, row in vs.items():
        if row["n"]:
            lines.append(f"| {model} | {row['n']} | {row['difference']:+.3f} ± {row['difference_stderr']:.3f} | "
                         + " | ".join(_interval(row, name) for name in (*OUTCOMES, "win_rate")) + " |")
    return lines


def results_markdown(results: dict) -> str:
    fmt, summary = results["format"], results["summary"]
    lines = [f"Judge {results['judge_model']} ({fmt} format), {results['judgments']} judgments "
             f"({results['sent']} sent in this run, {results['retries']} retries in all); "
             f"{summary['parse_failures']} unreadable verdicts.", ""]
    unjudged = {m: n for m, n in results.get("second_turns_not_judged", {}).items() if n}
    if unjudged:
        lines[0] += (" Second turns not judged (one-turn answers to two-turn questions): "
                     + ", ".join(f"{m} {n}" for m, n in unjudged.items()) + ".")
    if fmt == "pairwise":
        lines += ["| model | opponent | games | win | tie | loss | win rate (ties half) | inconsistent |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {g['model']} | {g['opponent']} | {g['n']} | "
                  + " | ".join(_interval(g, name) for name in (*OUTCOMES, "win_rate"))
                  + f" | {g['inconsistency_rate']:.0%} |" for g in summary["games"]]
        lines += ["", f"Order inconsistency (verdict flips when the answers swap places; counted as ties): "
                      f"{_fmt(summary['inconsistency_rate'], '.1%')}."]
        return "\n".join(lines) + "\n"
    rank = fmt == "paper"
    lines += [f"| model | mean score ± s.e. | n |{' rank score (N+1-rank) ± s.e. |' if rank else ''} unreadable |",
              f"|---|---:|---:|{'---:|' if rank else ''}---:|"]
    for model, row in summary["models"].items():
        extra = f" {_fmt(row['rank_score']['mean'])} ± {_fmt(row['rank_score']['stderr'])} |" if rank else ""
        lines.append(f"| {model} | {_fmt(row['mean'])} ± {_fmt(row['stderr'])} | {row['n']} |{extra} "
                     f"{row['parse_failures']} |")
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
