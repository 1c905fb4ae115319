"""The evaluation table: per model and scorer, mean, standard error and win rate against
the baseline, as JSON-ready dicts and as markdown."""

from __future__ import annotations

from offline_rlhf.eval.stats import mean_and_stderr, win_rate


def summarize(scores: dict[str, dict[str, list[float]]], baseline: str) -> dict[str, dict]:
    """Per model and scorer: mean, standard error and win rate against the baseline."""
    table = {}
    for name, by_scorer in scores.items():
        row = {}
        for scorer, values in by_scorer.items():
            mean, stderr = mean_and_stderr(values)
            row[scorer] = {"mean": mean, "stderr": stderr, "n": len(values),
                           "win_rate_vs_" + baseline: win_rate(values, scores[baseline][scorer])}
        table[name] = row
    return table


def results_markdown(table: dict[str, dict], baseline: str) -> str:
    scorers = list(next(iter(table.values())))
    header = " | ".join(f"{s} mean ± s.e. | {s} win rate vs {baseline}" for s in scorers)
    lines = [f"| model | {header} |", "|---|" + "---:|---:|" * len(scorers)]
    for name, row in table.items():
        cells = " | ".join(f"{row[s]['mean']:.3f} ± {row[s]['stderr']:.3f} | {row[s]['win_rate_vs_' + baseline]:.2f}"
                           for s in scorers)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"
