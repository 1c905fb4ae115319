"""Methods compared across training seeds (`orlhf seeds-report`): one complete run per seed
(`run_dir/seed_<s>/`, each with the `report.json` of `orlhf report`), summarized per method.

One report compares methods within one run, over prompts: one training seed per method, so
it cannot say whether a method beats another or only drew a luckier seed. Here each
replicate contributes one number per method and scorer (its mean over prompts), and the
spread is the one across replicates: the mean over seeds with its standard error (sample
s.d. / sqrt(k)), the range, and differences paired by replicate (a method minus SFT or PPO
of the same seed) with a Student-t 95% interval on k - 1 degrees of freedom. Device-hours
come from each replicate's Table 3 rows. A replicate or a method of one that cannot be used
(no report.json, no evaluation, a stale evaluation) is listed with the reason, never
dropped silently."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.eval.report import PPO, stale_evaluations
from offline_rlhf.eval.stats import mean_and_stderr
from offline_rlhf.stage_support import within_run

SFT = "sft"
REFERENCES = (SFT, PPO)  # every method's paired differences are against these
LEVEL = 0.95  # of the intervals for the differences
SEED_DIR = re.compile(r"seed_(\d+)")
REPORT = "report.json"
CONFIG = "config.yaml"
FIX = "rerun `orlhf report` in that replicate"


# --- Student's t quantile (no scipy): bisection on the CDF, from the regularized incomplete beta


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), by its continued fraction (modified Lentz), on the side where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(x, a, b) / a
    return 1.0 - front * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float, tiny: float = 1e-300) -> float:
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    value = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            value *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return value


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, by bisection (the CDF is monotone), to ~1e-12 relative."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2.0
    while high - low > 1e-12 * high:
        middle = (low + high) / 2.0
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2.0


# --- the replicates


@dataclass
class Replicate:
    """One run of the pipeline: its folder, and per model and scorer its mean over prompts;
    per method its Table 3 row (`total`, `share_of_ppo`)."""

    name: str
    path: Path
    quality: dict[str, dict[str, float]] = field(default_factory=dict)
    costs: dict[str, dict] = field(default_factory=dict)


def replicate_dirs(run_dir: Path, named: list[str]) -> list[tuple[str, Path]]:
    """(name, folder) of each replicate: the folders `replicates=` names (their names as
    paths relative to run_dir), else every `seed_<s>/` of run_dir by seed number."""
    if named:
        missing = [name for name in named if not (run_dir / name).is_dir()]
        if missing:
            raise ConfigError("replicates", f"{run_dir / missing[0]} is not a folder", "name existing replicates")
        return [(os.path.relpath(os.path.realpath(run_dir / name), os.path.realpath(run_dir)), run_dir / name)
                for name in named]
    found = [(int(m.group(1)), path) for path in (run_dir.iterdir() if run_dir.is_dir() else ())
             if path.is_dir() and (m := SEED_DIR.fullmatch(path.name))]
    if not found:
        raise ConfigError("run_dir", f"{run_dir} holds no seed_<s>/ replicate folders",
                          "run the pipeline with pipeline.seeds=[1, 2, 3], or name folders with replicates=[...]")
    return [(path.name, path) for _, path in sorted(found)]


def read_replicates(dirs: list[tuple[str, Path]], strict: bool) -> tuple[list[Replicate], list[dict]]:
    """The usable replicates and what was skipped: {"replicate", "model" (None: all of it), "why"}.
    With `strict` the first skip is an error instead."""
    used, skipped = [], []
    for name, path in dirs:
        report, why = _read_report(path / REPORT), ""
        if report is None:
            why = f"no {REPORT} (run `orlhf report run_dir={path}`)"
        elif report.get("evaluation") is None:
            why = f"{REPORT} has no evaluation results (run `orlhf eval` and `orlhf report` there)"
        if why:
            skipped.append({"replicate": name, "model": None, "why": why})
            continue
        replicate, dropped = _replicate(name, path, report)
        skipped += dropped
        if replicate.quality:
            used.append(replicate)
        else:  # nothing of it to average (every model skipped, or none scored): not a replicate to count
            skipped.append({"replicate": name, "model": None, "why": "no model with a usable evaluation"})
    if strict and skipped:
        first = skipped[0]
        what = first["replicate"] + (f" model {first['model']}" if first["model"] else "")
        raise ConfigError("strict", f"{what} would be skipped: {first['why']} ({len(skipped)} skip(s) in all)",
                          "fix it or pass strict=false to list it as skipped")
    return used, skipped


def _read_report(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError("run_dir", f"{path}:{err.lineno}: not valid JSON ({err.msg})", FIX) from None
    if not isinstance(report, dict) or not isinstance(report.get("methods"), list) \
            or not isinstance(report.get("table3"), list) \
            or not isinstance(report.get("evaluation", 0), (dict, type(None))):  # the key, null without an eval
        raise ConfigError("run_dir", f"{path}: expected the object `orlhf report` writes (methods and table3 lists, "
                          "evaluation: an object or null)", FIX)
    return report


def _replicate(name: str, path: Path, report: dict) -> tuple[Replicate, list[dict]]:
    """The replicate's numbers; a model whose evaluation is stale (its checkpoint changed
    since `orlhf eval`, recorded by the report or found now) or whose evaluated checkpoint
    is not its method's (its quality would be paired with another stage's cost) is skipped."""
    file = path / REPORT
    replicate, skipped = Replicate(name, path), []
    stale_now = stale_evaluations(report["evaluation"])
    for index, entry in enumerate(report["methods"]):
        where = f"methods[{index}]"
        model = _field(entry, "model", str, file, where)
        why = entry.get("stale") or stale_now.get(model) or entry.get("cost_elsewhere")
        if why:
            skipped.append({"replicate": name, "model": model, "why": why})
            continue
        quality = _field(entry, "quality", dict, file, where)
        if quality:
            replicate.quality[model] = {scorer: _number(_field(cell, "mean", object, file, f"{where}.quality.{scorer}"),
                                                        file, f"{where}.quality.{scorer}.mean")
                                        for scorer, cell in quality.items()}
    dropped = {s["model"] for s in skipped}
    for index, row in enumerate(report["table3"]):
        method = _field(row, "method", str, file, f"table3[{index}]")
        if method not in dropped:
            share = row.get("share_of_ppo")
            replicate.costs[method] = {"total": _number(row.get("total"), file, f"table3[{index}].total"),
                                       "share_of_ppo": None if share is None else
                                       _number(share, file, f"table3[{index}].share_of_ppo")}
    return replicate, skipped


def _field(record, key: str, kind: type, file: Path, where: str):
    if not isinstance(record, dict) or key not in record or not isinstance(record[key], kind):
        expected = "a value" if kind is object else kind.__name__
        raise ConfigError("run_dir", f"{file}: {where}.{key}: expected {expected} as `orlhf report` writes it", FIX)
    return record[key]


def _number(value, file: Path, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError("run_dir", f"{file}: {where}: expected a number, got {value!r}", FIX)
    if not math.isfinite(value):
        raise ConfigError("run_dir", f"{file}: {where} is {value}, not a finite number", FIX)
    return float(value)


def require_replicates(used: list[Replicate], skipped: list[dict]) -> None:
    """At least two usable replicates: one has no spread across seeds to report."""
    if len(used) >= 2:
        return
    gone, why = [s for s in skipped if s["model"] is None], ""
    if gone:
        more = f" and {len(gone) - 1} more" if len(gone) > 1 else ""
        why = f"; skipped: {gone[0]['replicate']} ({gone[0]['why']}){more}"
    raise ConfigError("replicates", f"{len(used)} usable replicate(s){why}: a standard error across seeds needs "
                      "at least 2", "run the pipeline with pipeline.seeds=[1, 2, 3] (one run per seed in "
                      "run_dir/seed_<s>/)")


# --- the statistics


def spread(values: list[float]) -> dict:
    """Mean over replicates, its standard error across them (None from one), min and max."""
    mean, stderr = mean_and_stderr(values)
    return {"k": len(values), "mean": mean, "stderr": stderr if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def paired_difference(differences: list[float]) -> dict:
    """`spread` of per-replicate differences, with the Student-t interval on k - 1 degrees
    of freedom and how many replicates were above, tied and below."""
    found = spread(differences)
    if found["stderr"] is None:
        found["low"] = found["high"] = None
    else:
        half = t_quantile(0.5 + LEVEL / 2, found["k"] - 1) * found["stderr"]
        found["low"], found["high"] = found["mean"] - half, found["mean"] + half
    found.update(above=sum(d > 0 for d in differences), ties=sum(d == 0 for d in differences),
                 below=sum(d < 0 for d in differences))
    return found


def summarize_seeds(replicates: list[Replicate]) -> dict:
    """Per scorer and model: the spread of its per-replicate means and its differences
    against SFT and PPO, paired by replicate; per method its device-hours and share of PPO's."""
    models = list(dict.fromkeys(m for r in replicates for m in r.quality))
    scorers = list(dict.fromkeys(s for r in replicates for q in r.quality.values() for s in q))
    table = {}
    for scorer in scorers:
        rows = {}
        for model in models:
            seeds = {r.name: r.quality[model][scorer] for r in replicates if scorer in r.quality.get(model, {})}
            if not seeds:
                continue
            against = {}
            for reference in REFERENCES:
                pairs = {r.name: r.quality[model][scorer] - r.quality[reference][scorer] for r in replicates
                         if scorer in r.quality.get(model, {}) and scorer in r.quality.get(reference, {})}
                if model != reference and pairs:
                    against[reference] = {**paired_difference(list(pairs.values())), "seeds": pairs}
            rows[model] = {**spread(list(seeds.values())), "seeds": seeds, "against": against}
        table[scorer] = rows
    summary = {"scorers": table, "device_hours": _cost_spread(replicates)}
    summary["verdicts"] = verdicts(summary)
    return summary


def _cost_spread(replicates: list[Replicate]) -> dict:
    methods = list(dict.fromkeys(m for r in replicates for m in r.costs))
    found = {}
    for method in methods:
        totals = {r.name: r.costs[method]["total"] for r in replicates if method in r.costs}
        shares = {r.name: r.costs[method]["share_of_ppo"] for r in replicates
                  if method in r.costs and r.costs[method]["share_of_ppo"] is not None}
        found[method] = {"total": {**spread(list(totals.values())), "seeds": totals},
                         "share_of_ppo": {**spread(list(shares.values())), "seeds": shares} if shares else None}
    return found


def verdict_scorer(summary: dict) -> str | None:
    """The gold reward when there is one (the methods' quality); else the first scorer."""
    scorers = list(summary["scorers"])
    return "gold" if "gold" in scorers else next(iter(scorers), None)


def verdicts(summary: dict) -> list[dict]:
    """One line per model other than SFT and PPO with a difference to PPO: the difference, its
    interval and count, its device-hours share, and what the interval says (never equivalence)."""
    scorer = verdict_scorer(summary)
    found = []
    for model, row in (summary["scorers"].get(scorer) or {}).items():
        versus = row["against"].get(PPO)
        if model in REFERENCES or versus is None:
            continue
        label = _label(versus)
        interval = ("no interval from one seed" if versus["low"] is None else
                    f"{LEVEL:.0%} CI {versus['low']:+.3f}..{versus['high']:+.3f}")
        error = "" if versus["stderr"] is None else f" ± {versus['stderr']:.3f}"
        ties = f", tied in {versus['ties']}" if versus["ties"] else ""
        text = (f"{model}: {scorer} − {PPO} {versus['mean']:+.3f}{error} ({interval}; above {PPO.upper()} in "
                f"{versus['above']} of {versus['k']} seeds{ties}){_share_text(summary, model)}: {label}")
        found.append({"model": model, "scorer": scorer, "label": label, "text": text})
    return found


def _label(versus: dict) -> str:
    if versus["low"] is None:
        return "undecided (one seed has both)"
    if versus["high"] < 0:
        return f"below {PPO.upper()}"
    if versus["low"] > 0:
        return f"above {PPO.upper()}"
    return f"interval contains 0 (no difference detected at {versus['k']} seeds; not a proof of equivalence)"


def _share_text(summary: dict, model: str) -> str:
    share = (summary["device_hours"].get(model) or {}).get("share_of_ppo")
    if not share:
        return "; no device-hours of its own (not a method of Table 3 beside PPO)"
    return f" at {share['mean']:.1%} ({share['min']:.1%}-{share['max']:.1%}) of {PPO.upper()}'s device-hours"


# --- what differed between the replicates


def settings_that_differed(dirs: list[tuple[str, Path]]) -> list[dict]:
    """Per stage folder and config key whose resolved value is not the same in every
    replicate's `<stage>/config.yaml` (the replicate's own run_dir written as `${run_dir}`, as
    the resume fingerprint writes it: `within_run`):
    {"stage", "key", "values": {replicate: value or None where absent}}."""
    configs = {name: {stage.name: _flat_config(stage / CONFIG) for stage in sorted(path.iterdir())
                      if (stage / CONFIG).is_file()} for name, path in dirs}
    stages = sorted({stage for by_stage in configs.values() for stage in by_stage})
    found = []
    for stage in stages:
        keys = list(dict.fromkeys(k for by_stage in configs.values() for k in by_stage.get(stage, {})))
        for key in keys:
            values = {name: by_stage.get(stage, {}).get(key) for name, by_stage in configs.items()}
            if len({json.dumps(v) for v in values.values()}) > 1:
                found.append({"stage": stage, "key": key, "values": values})
    return found


def _flat_config(path: Path) -> dict[str, object]:
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", -1) + 1
        raise ConfigError("run_dir", f"{path}:{line}: not valid YAML", "rerun the stage that wrote it") from None
    if not isinstance(config, dict):
        raise ConfigError("run_dir", f"{path}: expected a mapping of config keys", "rerun the stage that wrote it")
    inside = within_run(config.get("run_dir") if isinstance(config.get("run_dir"), str) else None)
    flat: dict[str, object] = {}
    _flatten(config, "", flat)
    return {key: inside(value) for key, value in flat.items()}


def _flatten(value, prefix: str, into: dict) -> None:
    """Dotted keys, list items as `key[i]` (an eval's models, a mix's sources)."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), into)
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            _flatten(item, f"{prefix}[{index}]", into)
    else:
        into[prefix] = value


# --- markdown


def seeds_markdown(run_dir: Path, summary: dict, used: list[Replicate], skipped: list[dict],
                   differed: list[dict]) -> str:
    names = [r.name for r in used]
    lines = [f"# Methods across training seeds: `{run_dir}`", "",
             f"{len(used)} replicates ({', '.join(names)}), each a complete run with its own training seeds. Every "
             "number is first a replicate's own (its mean over the held-out prompts, its Table 3 device-hours), then "
             "summarized across replicates: mean ± standard error across seeds (sample s.d. / sqrt(k), not over "
             "prompts), the range, and differences paired by replicate (a method minus SFT or PPO of the same seed) "
             f"with a {LEVEL:.0%} interval from Student's t on k − 1 degrees of freedom. k: the replicates that have "
             "the model.", "", f"## Verdicts against {PPO.upper()}", ""]
    found = summary["verdicts"]
    lines += [f"- {v['text']}" for v in found] or [f"No method to set against {PPO.upper()}: no replicate has a "
                                                  f"model `{PPO}` and another method with the same scorer."]
    for scorer, rows in summary["scorers"].items():
        lines += ["", f"## {scorer}", "", _scorer_table(rows)]
        if scorer == "rm":
            lines += ["", "rm: each replicate's reward model, which its offline methods' data was labeled with and "
                      "PPO was rewarded by: it grades what they were trained to raise, not their quality."]
    lines += ["", "## Device-hours per method (each replicate's Table 3)", "", _cost_table(summary["device_hours"]),
              "", "## Replicates", "", f"Used: {', '.join(names)}.", "", _skipped_text(skipped), "",
              "## Settings that differed between the replicates", "", _differed_table(differed, names)]
    return "\n".join(lines) + "\n"


def _scorer_table(rows: dict) -> str:
    lines = ["| model | k | mean ± s.e. | range | − sft ± s.e. [95% CI] | above sft | − ppo ± s.e. [95% CI] | "
             "above ppo |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, row in rows.items():
        cells = [_difference_cells(row["against"].get(reference)) for reference in REFERENCES]
        lines.append(f"| {model} | {row['k']} | {row['mean']:.3f}{_error(row)} | {row['min']:.3f}..{row['max']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _error(row: dict) -> str:
    return f" ± {row['stderr']:.3f}" if row["stderr"] is not None else " (one seed)"


def _difference_cells(versus: dict | None) -> str:
    if versus is None:
        return "— | —"
    interval = f" [{versus['low']:+.3f}, {versus['high']:+.3f}]" if versus["low"] is not None else ""
    return f"{versus['mean']:+.3f}{_error(versus)}{interval} | {versus['above']} of {versus['k']}"


def _cost_table(costs: dict) -> str:
    if not costs:
        return "No replicate has a charged method in its Table 3."
    lines = ["| method | k | device-hours mean (range) | share of PPO's mean (range) |", "|---|---:|---:|---:|"]
    for method, cost in costs.items():
        total, share = cost["total"], cost["share_of_ppo"]
        shown = f"{share['mean']:.1%} ({share['min']:.1%}-{share['max']:.1%})" if share else "—"
        lines.append(f"| {method} | {total['k']} | {total['mean']:.4f} ({total['min']:.4f}-{total['max']:.4f}) | "
                     f"{shown} |")
    return "\n".join(lines)


def _skipped_text(skipped: list[dict]) -> str:
    if not skipped:
        return "Skipped: none."
    lines = [f"Skipped: {len(skipped)} (`strict=true` fails on them instead).", "", "| replicate | model | why |",
             "|---|---|---|"]
    return "\n".join(lines + [f"| {s['replicate']} | {s['model'] or 'all'} | {_cell(s['why'])} |" for s in skipped])


def _differed_table(differed: list[dict], names: list[str]) -> str:
    if not differed:
        return "None: every stage's config.yaml is the same in every replicate (`${run_dir}` aside)."
    lines = ["| stage | key | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    return "\n".join(lines + [f"| {d['stage']} | {d['key']} | " + " | ".join(
        "—" if d["values"].get(name) is None else _cell(d["values"][name]) for name in names) + " |" for d in differed])


def _cell(value) -> str:
    """A config value in a table cell: one line, its pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")
