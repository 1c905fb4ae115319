"""The run's report (`report.md`, `report.json`, figures) built from the stage outputs: every
method side by side (quality from `eval/results.json` and, when a judge ran,
`judge/results.json`; device-hours from `ledger.jsonl`), the device-hours split as in the
paper's Table 3, the reward distribution (paper Fig. 5) and the training loss curves.

Methods come from the ledger's stage names: `align_<method>` is an offline method and
`ppo` / `ppo_<module>` are PPO's. Table 3's accounting: an offline method pays for its
alignment and for preparing its data: generation and labeling, then mixing for the paper's
three methods or the reference log-prob pass `reference` (which builds the pairs) for the
preference methods (DPO, IPO, cDPO); PPO pays for its four modules (actor,
critic, reference and reward model), idle time included. SFT and RM are shared by every
method, PPO included, and shown once."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from offline_rlhf.config.training import PREFERENCE_METHODS
from offline_rlhf.eval.results import score_cells
from offline_rlhf.ledger import read_ledger
from offline_rlhf.metrics import read_metrics

SAMPLES = ("generate", "label")  # every offline method's data starts here (counted for each)
MIX = "mix"  # the reward-labeled alignment set of the paper's methods
REFERENCE = "reference"  # the preference methods' pairs with their reference log-probs
SHARED = ("sft", "rm")  # every method, PPO included, starts from these
OFFLINE_PREFIX = "align_"
PPO = "ppo"


def device_hours(run_dir: Path) -> dict[str, dict]:
    """Per stage, in ledger order: device-hours, wall seconds and executions summed over its rows."""
    totals: dict[str, dict] = defaultdict(lambda: {"device_hours": 0.0, "wall_seconds": 0.0, "executions": 0,
                                                   "device_type": ""})
    for row in read_ledger(run_dir):
        entry = totals[row.stage]
        entry["device_hours"] += row.device_hours
        entry["wall_seconds"] += row.wall_seconds
        entry["executions"] += 1
        entry["device_type"] = row.device_type
    return dict(totals)


def is_ppo(stage: str) -> bool:
    return stage == PPO or stage.startswith(PPO + "_")


def table3(hours: dict[str, dict]) -> list[dict]:
    """One row per method (offline methods by name, then PPO): the stages it is charged
    for, data preparation, training, total and its share of PPO's total (None without PPO)."""
    rows = []
    for stage in sorted(s for s in hours if s.startswith(OFFLINE_PREFIX)):
        method = stage.removeprefix(OFFLINE_PREFIX)
        own = REFERENCE if method in PREFERENCE_METHODS else MIX
        prep = [s for s in (*SAMPLES, own) if s in hours]
        rows.append(_cost_row(method, hours, prep, [stage]))
    modules = [s for s in hours if is_ppo(s)]
    if modules:
        rows.append(_cost_row(PPO, hours, [], sorted(modules)))
    ppo_total = rows[-1]["total"] if modules else None
    for row in rows:
        row["share_of_ppo"] = row["total"] / ppo_total if ppo_total else None
    return rows


def _cost_row(method: str, hours: dict[str, dict], prep: list[str], training: list[str]) -> dict:
    charged = {stage: hours[stage]["device_hours"] for stage in (*prep, *training)}
    data_preparation = sum(charged[s] for s in prep)
    trained = sum(charged[s] for s in training)
    return {"method": method, "stages": charged, "data_preparation": data_preparation, "training": trained,
            "total": data_preparation + trained}


def shared_hours(hours: dict[str, dict]) -> dict[str, float]:
    """SFT and RM device-hours (each method starts from them) and their sum."""
    parts = {stage: hours[stage]["device_hours"] for stage in SHARED if stage in hours}
    return {**parts, "total": sum(parts.values())}


def judge_scores(judge: dict | None) -> dict[str, dict]:
    """Per model the judge's mean score (single and paper formats) or win rate against the
    judge's baseline (pairwise), as {"value", "stderr" or "interval", "label"}."""
    if not judge:
        return {}
    summary = judge["summary"]
    if judge["format"] != "pairwise":
        return {m: {"value": r["mean"], "stderr": r["stderr"], "label": "mean score"}
                for m, r in summary["models"].items() if r.get("mean") is not None}
    baseline = judge.get("baseline") or ""
    found = {}
    for game in summary["games"]:
        if game["opponent"] == baseline and game.get("n"):
            found[game["model"]] = {"value": game["win_rate"], "label": f"win rate vs {baseline}",
                                    "interval": [game["win_rate_low"], game["win_rate_high"]]}
    return found


def side_by_side(results: dict | None, judge: dict | None, rows: list[dict]) -> list[dict]:
    """One entry per evaluated model (in the evaluation's order), then per method with
    device-hours but no evaluation: quality, judge score, answers cut off, device-hours."""
    costs = {row["method"]: row for row in rows}
    table, info = (results["table"], results.get("models", {})) if results else ({}, {})
    judged = judge_scores(judge)
    names = list(table) + [m for m in costs if m not in table]
    return [{"model": name, "quality": table.get(name, {}), "judge": judged.get(name),
             "cut_off": info.get(name, {}).get("cut_off"), "reward_prompt": info.get(name, {}).get("reward_prompt"),
             "device_hours": costs[name]["total"] if name in costs else None,
             "share_of_ppo": costs[name]["share_of_ppo"] if name in costs else None} for name in names]


def side_by_side_markdown(entries: list[dict], results: dict | None, judge: dict | None) -> str:
    scorers = list(results["table"][results["baseline"]]) if results else []
    baseline = results["baseline"] if results else ""
    prompts = results["prompts"] if results else 0
    header = "".join(f" {s} mean ± s.e. | {s} − {baseline} ± paired s.e. | {s} win rate vs {baseline} [95% CI] |"
                     for s in scorers)
    judge_header = f" judge {judge['judge_model']} ({judge_scores_label(judge)}) |" if judge else ""
    lines = [f"| model |{header}{judge_header} cut off | device-hours | share of PPO's |",
             "|---|" + "---:|---:|---:|" * len(scorers) + ("---:|" if judge else "") + "---:|---:|---:|"]
    for entry in entries:
        cells = "".join(f" {score_cells(entry['quality'][s])} |" if s in entry["quality"] else " — | — | — |"
                        for s in scorers)
        judged = f" {_judge_cell(entry['judge'])} |" if judge else ""
        cut = f"{entry['cut_off']}/{prompts}" if entry["cut_off"] is not None else "—"
        name = entry["model"] + (f" (`<rm_score> {entry['reward_prompt']:.1f}`)"
                                 if entry["reward_prompt"] is not None else "")
        lines.append(f"| {name} |{cells}{judged} {cut} | {_hours_cell(entry)} | {_share(entry)} |")
    notes = ["Device-hours leave out SFT and the reward model, which every method shares (see Table 3 below)."]
    notes.append(f"Judge: {judge['judge_model']} ({judge['format']} format); details in judge/results.md."
                 if judge else "LLM judge: no judge configured (run `orlhf judge` to add its scores here).")
    if not results:
        notes.append("No evaluation results (eval/results.json): run `orlhf eval` for the quality columns.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def judge_scores_label(judge: dict) -> str:
    return f"win rate vs {judge.get('baseline')}" if judge["format"] == "pairwise" else "mean score ± s.e."


def _judge_cell(score: dict | None) -> str:
    if score is None:
        return "—"
    if "interval" in score:
        return f"{score['value']:.2f} [{score['interval'][0]:.2f}, {score['interval'][1]:.2f}]"
    return f"{score['value']:.2f} ± {score['stderr']:.2f}"


def _hours_cell(entry: dict) -> str:
    if entry["device_hours"] is not None:
        return f"{entry['device_hours']:.4f}"
    return "shared" if entry["model"] in SHARED else "—"


def _share(entry: dict) -> str:
    return f"{entry['share_of_ppo']:.1%}" if entry["share_of_ppo"] is not None else "—"


def table3_markdown(rows: list[dict], hours: dict[str, dict], shared: dict[str, float]) -> str:
    devices = sorted({e["device_type"] for e in hours.values() if e["device_type"]}) or ["device"]
    lines = ["| method | data preparation | training | total | share of PPO's | charged stages |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['method']} | {r['data_preparation']:.4f} | {r['training']:.4f} | {r['total']:.4f} | "
              f"{_share(r)} | {' + '.join(f'{s} {v:.4f}' for s, v in r['stages'].items())} |" for r in rows]
    shared_line = (" + ".join(f"{s} {v:.4f}" for s, v in shared.items() if s != "total")
                   + f" = {shared['total']:.4f}") if len(shared) > 1 else "none in the ledger"
    return (f"Device-hours ({', '.join(devices)} devices; devices x wall hours). Offline methods: generation + "
            "labeling + mixing (the paper's methods) or the reference pass (DPO-style methods) + alignment; "
            "PPO: actor + critic + "
            "reference + reward model.\n\n" + "\n".join(lines)
            + f"\n\nShared by every method, PPO included (not in the totals): {shared_line}.")


def cost_quality_chart(entries: list[dict], rows: list[dict], results: dict | None, out: Path) -> Path | None:
    """Stacked bars of each method's device-hours (by charged stage) next to its quality
    (the first scorer of the evaluation, gold when there is one, with standard errors)."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (costs, quality) = plt.subplots(1, 2, figsize=(11, 3.8))
    methods = [r["method"] for r in rows]
    for position, row in enumerate(rows):
        bottom = 0.0
        for stage, value in row["stages"].items():
            costs.bar(position, value, bottom=bottom, color=_stage_color(stage), edgecolor="white",
                      label=_stage_group(stage))
            bottom += value
        if row["share_of_ppo"] is not None:
            costs.annotate(_share(row), (position, bottom), ha="center", va="bottom", fontsize=8)
    handles = {label: handle for handle, label in zip(*costs.get_legend_handles_labels())}
    costs.legend(handles.values(), handles.keys(), fontsize=8)
    costs.set_xticks(range(len(methods)), methods)
    costs.set_ylabel("device-hours")
    costs.set_title("device-hours per method, share of PPO's (SFT and RM shared, not shown)", fontsize=9)
    if results:
        scorer = next(iter(results["table"][results["baseline"]]))
        shown = [e for e in entries if scorer in e["quality"]]
        quality.bar(range(len(shown)), [e["quality"][scorer]["mean"] for e in shown],
                    yerr=[e["quality"][scorer]["stderr"] for e in shown], color="tab:green", capsize=3)
        quality.set_xticks(range(len(shown)), [e["model"] for e in shown], rotation=20)
        quality.set_ylabel(f"{scorer} reward (mean ± s.e.)")
        quality.set_title(f"quality on {results['prompts']} held-out prompts", fontsize=9)
    else:
        quality.text(0.5, 0.5, "no evaluation results", ha="center", va="center")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def _stage_group(stage: str) -> str:
    if stage in (*SAMPLES, MIX, REFERENCE):
        return "data preparation"
    return "PPO modules" if is_ppo(stage) else "alignment"


def _stage_color(stage: str) -> str:
    return {"data preparation": "tab:orange", "PPO modules": "tab:red", "alignment": "tab:blue"}[_stage_group(stage)]


def loss_curves(run_dir: Path, out: Path) -> Path | None:
    stages = [s for s in (*SHARED, *sorted(p.name for p in run_dir.glob(OFFLINE_PREFIX + "*")))
              if (run_dir / s / "metrics.jsonl").exists()]
    if not stages:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), squeeze=False)
    for axis, stage in zip(axes[0], stages):
        rows = read_metrics(run_dir / stage)
        for split in ("train", "val"):
            points = [(r["step"], r[f"{split}/loss"]) for r in rows if f"{split}/loss" in r]
            if points:
                axis.plot(*zip(*points), marker="o" if split == "val" else None, label=split)
        axis.set_title(stage)
        axis.set_xlabel("step")
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("loss")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def report_markdown(run_dir: Path, results: dict | None, judge: dict | None, entries: list[dict], rows: list[dict],
                    hours: dict[str, dict], figures: dict[str, Path | None], rounds: list[dict]) -> str:
    shared = shared_hours(hours)
    lines = [f"# Offline RLHF run report: `{run_dir}`", "", "## Methods side by side: quality and device-hours", ""]
    if results:
        lines += [f"{results['prompts']} held-out prompts; differences and win rates against {results['baseline']} "
                  f"on the same prompts; cut off: answers that reached max_new_tokens={results['max_new_tokens']}"
                  + (f"; gold reward: {results['gold']}" if results.get("gold") else "") + ".", ""]
    lines += [side_by_side_markdown(entries, results, judge)]
    if figures.get("cost_quality"):
        lines += [f"![device-hours and quality per method]({figures['cost_quality'].relative_to(run_dir)})", ""]
    lines += ["## Device-hours per method (the paper's Table 3)", "", table3_markdown(rows, hours, shared), "",
              "| stage | device-hours | wall seconds | executions |", "|---|---:|---:|---:|"]
    lines += [f"| {stage} | {e['device_hours']:.4f} | {e['wall_seconds']:.1f} | {e['executions']} |"
              for stage, e in hours.items()]
    if rounds:
        lines += ["", "## Iterative rounds", "", "Each round's policy generates the next round's samples (the RM "
                  "fixed); a round's device-hours are its own generation, labeling, data preparation and alignment "
                  "(`run_dir/round_<r>/ledger.jsonl`).", "", rounds_markdown(rounds)]
    for title, key in (("Reward distribution (paper Fig. 5)", "reward_distribution"), ("Loss curves", "loss_curves")):
        if figures.get(key):
            lines += ["", f"## {title}", "", f"![{title}]({figures[key].relative_to(run_dir)})"]
    return "\n".join(lines) + "\n"


ROUND_DIR = re.compile(r"round_(\d+)")


def iterative_rounds(run_dir: Path, rows: list[dict], results: dict | None) -> list[dict]:
    """Per method that iterates (its align stage in `run_dir/round_<r>/`) and per round: the
    round's Table-3 cost (round 1: the run's own row), the cumulative cost and the quality of
    that round's policy, evaluated as model `<method>` (round 1) or `<method>_round_<r>`."""
    rounds = sorted((int(m.group(1)), path) for path in run_dir.iterdir()
                    if path.is_dir() and (m := ROUND_DIR.fullmatch(path.name)))
    if not rounds:
        return []
    first = {row["method"]: row for row in rows}
    later = {number: {row["method"]: row for row in table3(device_hours(path))} for number, path in rounds}
    found = []
    for method in sorted(set().union(*(set(costs) for costs in later.values()))):
        cumulative = 0.0
        for number, costs in [(1, first), *later.items()]:
            if method not in costs:
                continue
            cumulative += costs[method]["total"]
            model = method if number == 1 else f"{method}_round_{number}"
            quality = (results or {}).get("table", {}).get(model)
            found.append({"method": method, "round": number, "model": model, "device_hours": costs[method]["total"],
                          "cumulative_device_hours": cumulative, "quality": quality})
    return found


def rounds_markdown(rounds: list[dict]) -> str:
    scorers = sorted({s for r in rounds if r["quality"] for s in r["quality"]})
    header = "".join(f" {s} mean ± s.e. |" for s in scorers)
    lines = [f"| method | round | evaluated as | device-hours | cumulative |{header}", "|---|---:|---|---:|---:|"
             + "---:|" * len(scorers)]
    for r in rounds:
        cells = "".join(f" {r['quality'][s]['mean']:.3f} ± {r['quality'][s]['stderr']:.3f} |"
                        if r["quality"] and s in r["quality"] else " — |" for s in scorers)
        lines.append(f"| {r['method']} | {r['round']} | {r['model']} | {r['device_hours']:.4f} | "
                     f"{r['cumulative_device_hours']:.4f} |{cells}")
    return "\n".join(lines)
