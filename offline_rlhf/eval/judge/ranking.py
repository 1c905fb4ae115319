"""The paper's ranking normalization (Figure 6): per question the models are ranked by
score and each gets `N + 1 - rank` (with five models the best gets 6 - 1 = 5). Tied scores
share the mean of the ranks they span, so a tie never decides an order the judge did not
give."""

from __future__ import annotations

from collections.abc import Mapping

from offline_rlhf.eval.judge.parsing import UNPARSED


def rank_scores(scores: Mapping[str, float]) -> dict[str, float] | None:
    """{model: N + 1 - rank} for one question; None when a score is unparsed (-1), since
    the ranks of the others would then depend on a missing answer."""
    if any(score == UNPARSED for score in scores.values()):
        return None
    ordered = sorted(scores.values(), reverse=True)
    n = len(ordered)
    ranked = {}
    for model, score in scores.items():
        first = ordered.index(score) + 1  # 1-based rank of the first model with this score
        last = first + ordered.count(score) - 1
        ranked[model] = n + 1 - (first + last) / 2
    return ranked
