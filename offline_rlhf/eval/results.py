"""The evaluation table: per model and scorer, the mean and its standard error, and against
the baseline (same prompts, so paired): the mean difference with its paired standard
error, win/tie/loss rates and the win rate (ties half) with a bootstrap 95% interval; as
JSON-ready dicts and as markdown."""

from __future__ import annotations

from offline_rlhf.eval.stats import mean_and_stderr, paired_stderr, paired_win_rate_interval, win_tie_loss


def summarize(scores: dict[str, dict[str, list[float]]], baseline: str, samples: int = 1000) -> dict[str, dict]:
    """`scores[model][scorer]` holds one score per prompt, in the same prompt order for every
    model; `samples` bootstrap resamples of the prompts give the win-rate intervals."""
    return {name: {scorer: compare(values, scores[baseline][scorer], samples) for scorer, values in by_scorer.items()}
            for name, by_scorer in scores.items()}


def compare(values: list[float], baseline: list[float], samples: int = 1000) -> dict[str, float]:
    """One model's scores against the baseline's on the same prompts."""
    mean, stderr = mean_and_stderr(values)
    win, tie, loss = win_tie_loss(values, baseline)
    low, high = paired_win_rate_interval(values, baseline, samples=samples)
    return {"mean": mean, "stderr": stderr, "n": len(values),
            "difference": mean - mean_and_stderr(baseline)[0], "difference_stderr": paired_stderr(values, baseline),
            "win": win, "tie": tie, "loss": loss, "win_rate": win + tie / 2, "win_rate_low": low, "win_rate_high": high}


def prompt_means(values: list[float], n: int) -> list[float]:
    """Per prompt, the mean of its `n` consecutive values (its sampled answers' scores)."""
    return [sum(values[at:at + n]) / n for at in range(0, len(values), n)]


def results_markdown(table: dict[str, dict], baseline: str, cut_off: dict[str, int] | None = None,
                     answers: int | None = None) -> str:
    """One row per model; `cut_off[model]` counts its answers that ended at max_new_tokens,
    of `answers` per model (default: one per prompt)."""
    scorers = list(next(iter(table.values())))
    header = " | ".join(f"{s} mean ± s.e. | {s} − {baseline} ± paired s.e. | {s} win rate vs {baseline} [95% CI]"
                        for s in scorers)
    tail = ("cut off |", "---:|") if cut_off is not None else ("", "")
    lines = [f"| model | {header} | {tail[0]}".rstrip(), "|---|" + "---:|---:|---:|" * len(scorers) + tail[1]]
    for name, row in table.items():
        cells = " | ".join(score_cells(row[s]) for s in scorers)
        count = f" {cut_off[name]}/{answers or row[scorers[0]]['n']} |" if cut_off is not None else ""
        lines.append(f"| {name} | {cells} |{count}")
    return "\n".join(lines) + "\n"


def score_cells(entry: dict[str, float]) -> str:
    """`mean ± s.e. | difference ± paired s.e. | win rate [low, high]` of one scorer."""
    return (f"{entry['mean']:.3f} ± {entry['stderr']:.3f} | {entry['difference']:+.3f} ± "
            f"{entry['difference_stderr']:.3f} | {entry['win_rate']:.2f} [{entry['win_rate_low']:.2f}, "
            f"{entry['win_rate_high']:.2f}]")
