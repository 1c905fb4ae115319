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
method, PPO included, and shown once. Only executions that produced the stage's result are
charged (`charged`: the last completed execution and the ones it resumed; PPO's services with
the actor execution they served); the others' device-hours are shown per stage, apart.

The judge's scores are shown only when they graded the answers behind the evaluation shown
(`judge_freshness`); a judge that an `orlhf eval` rerun made stale is named instead."""

from __future__ import annotations

import os
import re
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from itertools import accumulate
from pathlib import Path

import yaml

from offline_rlhf.checkpoint import resolve_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.training import PREFERENCE_METHODS
from offline_rlhf.eval.results import score_cells
from offline_rlhf.ledger import COMPLETED, FAILED, INTERRUPTED, LedgerRow, killed, read_ledger, result_chain
from offline_rlhf.metrics import read_metrics
from offline_rlhf.stage_support import checkpoint_digest, within_run

SAMPLES = ("generate", "label")  # every offline method's data starts here (counted for each)
MIX = "mix"  # the reward-labeled alignment set of the paper's methods
REFERENCE = "reference"  # the preference methods' pairs with their reference log-probs
SHARED = ("sft", "rm")  # every method, PPO included, starts from these
OFFLINE_PREFIX = "align_"
PPO = "ppo"
PPO_ACTOR = "ppo_actor"  # the stage that trains the policy (ppo_baseline/stage.py)


RUN_DIR = "${run_dir}"  # how `within_run` writes the run folder in a path
SUPERSEDED = "superseded"  # completed, but its result is not the stage's (a fresh rerun replaced it)


def charged(rows: list[LedgerRow]) -> list[bool]:
    """Per ledger row, whether Table 3 charges it to its stage: the executions that produced
    the stage's result (`result_chain`: the last completed one and those it resumed), so a
    failed or killed execution that nothing continued, and one a fresh rerun replaced, are
    not; their hours are shown apart, so debugging a config never inflates a method's cost.
    PPO's services (critic, reference, reward model) are charged with the actor execution
    they served: when their row's time span overlaps a charged `ppo_actor` row."""
    flags = [False] * len(rows)
    by_stage = defaultdict(list)
    for k, row in enumerate(rows):
        by_stage[row.stage].append(k)
    for indices in by_stage.values():
        for k, counted in zip(indices, result_chain([rows[k] for k in indices])):
            flags[k] = counted
    served = _overlaps_any([_span(row) for row, counted in zip(rows, flags) if counted and row.stage == PPO_ACTOR])
    return [served(_span(row)) if _is_ppo_service(row.stage) else counted for row, counted in zip(rows, flags)]


def _is_ppo_service(stage: str) -> bool:
    return stage.startswith(PPO + "_") and stage != PPO_ACTOR


def _span(row: LedgerRow) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(row.start), datetime.fromisoformat(row.end)


def _overlaps_any(spans: list[tuple[datetime, datetime]]) -> Callable[[tuple[datetime, datetime]], bool]:
    """Whether a span overlaps one of `spans` (start < their end and their start < end), in
    O(log n) a span: a ledger of n relaunches has n actor and 3n service rows."""
    spans = sorted(spans)
    starts = [start for start, _ in spans]
    latest_ends = list(accumulate((end for _, end in spans), max))  # of the spans started so far

    def overlaps(span: tuple[datetime, datetime]) -> bool:
        before = bisect_left(starts, span[1])  # the spans that start before this one ends
        return before > 0 and latest_ends[before - 1] > span[0]
    return overlaps


def device_hours(run_dir: Path) -> dict[str, dict]:
    """Per stage, in ledger order: the charged executions' device-hours, wall seconds and
    count (`charged`), and the device-hours and counts of the others (failed, interrupted,
    superseded: completed but not charged)."""
    totals: dict[str, dict] = defaultdict(lambda: {"device_hours": 0.0, "wall_seconds": 0.0, "executions": 0,
                                                   "device_type": "", "not_charged_device_hours": 0.0,
                                                   FAILED: 0, INTERRUPTED: 0, SUPERSEDED: 0})
    rows = read_ledger(run_dir) + killed(run_dir)  # a killed execution shows (not charged) before its rerun
    for row, counted in zip(rows, charged(rows)):
        entry = totals[row.stage]
        entry["device_type"] = row.device_type
        if counted:
            entry["device_hours"] += row.device_hours
            entry["wall_seconds"] += row.wall_seconds
            entry["executions"] += 1
        else:
            entry["not_charged_device_hours"] += row.device_hours
            entry[SUPERSEDED if row.status == COMPLETED else row.status] += 1
    return dict(totals)


def _charged_stages(hours: dict[str, dict]) -> dict[str, dict]:
    """The stages with a charged execution (a stage that only failed has no cost to show)."""
    return {stage: entry for stage, entry in hours.items() if entry["executions"]}


def is_ppo(stage: str) -> bool:
    return stage == PPO or stage.startswith(PPO + "_")


def table3(hours: dict[str, dict]) -> list[dict]:
    """One row per method (offline methods by name, then PPO): the stages it is charged
    for, data preparation, training, total and its share of PPO's total (None without PPO)."""
    hours = _charged_stages(hours)
    rows = []
    for stage in sorted(s for s in hours if s.startswith(OFFLINE_PREFIX)):
        method = stage.removeprefix(OFFLINE_PREFIX)
        own = REFERENCE if method in PREFERENCE_METHODS else MIX
        prep = [s for s in (*SAMPLES, own) if s in hours]
        rows.append(_cost_row(method, hours, prep, [stage]))
    modules = [s for s in hours if is_ppo(s)]
    if PPO_ACTOR in modules:  # without it PPO trained nothing: its services' hours alone are no method's cost
        rows.append(_cost_row(PPO, hours, [], sorted(modules)))
    ppo_total = rows[-1]["total"] if PPO_ACTOR in modules else None
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
    counted = _charged_stages(hours)
    parts = {stage: counted[stage]["device_hours"] for stage in SHARED if stage in counted}
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


def judge_freshness(run_dir: Path, judge: dict, results: dict | None) -> tuple[str, str]:
    """("current", ""), ("stale", why) or ("unverified", why) for judge/results.json against the
    evaluation the report shows. The judge must have graded the answers of the last completed
    `orlhf eval`: a judge execution that started before that eval ended, or an answers file of
    a model the evaluation no longer lists (an earlier eval left it), is stale. The inputs are
    the answer files judge/config.yaml names; files outside run_dir/eval are not the eval's."""
    inputs = _judge_inputs(run_dir)
    if inputs is None:
        return "unverified", "judge/config.yaml, which names the answer files the judge read, is missing or lists none"
    if [model for model, _, _ in inputs] != judge.get("models"):
        return "unverified", ("judge/config.yaml lists other models than judge/results.json (a later `orlhf judge` "
                              "did not finish), so which answers were judged is unknown")
    judged = [name for _, _, name in inputs if name is not None]
    unresolved = [path for _, path, name in inputs if name is None and Path(path).parent.name == "eval"]
    if unresolved:  # eval answers, but not found where the report resolves run_dir/eval: cannot compare
        return "unverified", (f"judge/config.yaml names {unresolved[0]}, an eval answers file outside {run_dir}/eval "
                              "as resolved here (relative paths written from another directory?)")
    if not judged:
        return "current", ""  # answer files of its own, e.g. FastChat's: nothing of eval's to be stale against
    rows = read_ledger(run_dir)
    judged_at, evaluated_at = (_last_completed(rows, stage) for stage in ("judge", "eval"))
    if judged_at is None:
        return "unverified", "ledger.jsonl has no completed `orlhf judge` execution to date its results"
    if evaluated_at is not None and datetime.fromisoformat(judged_at.start) < datetime.fromisoformat(evaluated_at.end):
        return "stale", (f"the judge graded eval/{', eval/'.join(judged)} at {judged_at.start}, before `orlhf eval` "
                         f"rewrote the answers (it ended at {evaluated_at.end})")
    leftover = [name for name in judged if results and name.removeprefix("answers_").removesuffix(".jsonl")
                not in results["models"]]
    if leftover:
        return "stale", (f"the judge graded eval/{', eval/'.join(leftover)}, answers of models the last `orlhf eval` "
                         "did not evaluate (left by an earlier one)")
    return "current", ""


def _judge_inputs(run_dir: Path) -> list[tuple[str, str, str | None]] | None:
    """Per answer file in judge/config.yaml: (model, its path, its name when it lies in
    run_dir/eval/ else None); None without a readable list. Paths are compared with the
    config's run_dir, written from the same working directory."""
    path = run_dir / "judge" / "config.yaml"
    if not path.exists():
        return None
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", -1) + 1
        raise ConfigError("run_dir", f"{path}:{line}: not valid YAML", "rerun `orlhf judge`") from None
    answers = cfg.get("answers") if isinstance(cfg, dict) else None
    if not isinstance(answers, list) or not all(isinstance(a, dict) and isinstance(a.get("path"), str)
                                                for a in answers):
        return None
    eval_dir = Path(os.path.abspath(str(cfg.get("run_dir", "")))) / "eval"
    return [(a.get("model"), a["path"], Path(a["path"]).name if Path(os.path.abspath(a["path"])).parent == eval_dir
             else None) for a in answers]


def _last_completed(rows: list[LedgerRow], stage: str) -> LedgerRow | None:
    return next((row for row in reversed(rows) if row.stage == stage and row.status == COMPLETED), None)


def side_by_side(results: dict | None, judge: dict | None, rows: list[dict], run_dir: Path | None = None) -> list[dict]:
    """One entry per evaluated model (in the evaluation's order), then per model only the
    judge graded, then per method with device-hours but neither: quality, judge score,
    answers cut off, device-hours. With `run_dir`, an evaluated model's quality is dropped
    when its checkpoint changed since (`stale_evaluations`: "stale" says why), and a
    method's device-hours go only to the model of its name that was trained by it in this
    run ("cost_elsewhere" says why not: a model named `ppo` evaluated from the SFT folder
    must not show SFT's quality at PPO's cost)."""
    costs = {row["method"]: row for row in rows}
    table, info = (results["table"], results.get("models", {})) if results else ({}, {})
    here = relocated(results, run_dir) if run_dir is not None else None
    stale = stale_evaluations(results, here) if here is not None else {}
    judged = judge_scores(judge)
    entries = []
    for name in dict.fromkeys([*table, *judged, *costs]):
        model = info.get(name, {})
        checkpoint = here(model["checkpoint"]) if here is not None and model.get("checkpoint") else None
        elsewhere = _trained_elsewhere(name, checkpoint, run_dir) if name in costs else None
        cost = costs[name] if name in costs and not elsewhere else {}
        entries.append({"model": name, "quality": {} if name in stale else table.get(name, {}),
                        "judge": judged.get(name), "cut_off": model.get("cut_off"),
                        "reward_prompt": model.get("reward_prompt"), "device_hours": cost.get("total"),
                        "share_of_ppo": cost.get("share_of_ppo"), "stale": stale.get(name),
                        "cost_elsewhere": elsewhere})
    return entries


def relocated(results: dict | None, run_dir: Path) -> Callable[[str], str]:
    """A path `orlhf eval` recorded (absolute, inside the run folder as it was then) as it
    is inside `run_dir` now: a run folder moved whole (scratch to project storage) keeps its
    evaluated checkpoints beside their stages' device-hours. Paths outside the run, and those
    of an eval that recorded no run_dir, stay as recorded."""
    inside = within_run((results or {}).get("run_dir"))

    def here(path: str) -> str:
        mapped = inside(path)
        return str(run_dir) + mapped[len(RUN_DIR):] if mapped.startswith(RUN_DIR) else mapped
    return here


def stale_evaluations(results: dict | None, here: Callable[[str], str] = str) -> dict[str, str]:
    """Per evaluated model whose checkpoint changed since `orlhf eval` answered with it, why:
    the configured checkpoint (a root: its `latest`) resolves to another step now, or the
    evaluated step was rewritten (its `checkpoint_digest` differs: a rerun trained another
    model into the same folder). Recorded paths are read through `here` (see `relocated`).
    Models whose configured path is gone or that an older eval recorded without a digest are
    not checked."""
    stale = {}
    for name, model in (results or {}).get("models", {}).items():
        configured, digest = here(model.get("configured") or ""), model.get("checkpoint_sha256")
        if not configured or not digest or not Path(configured).exists():
            continue
        try:
            now = resolve_checkpoint(configured)
        except ConfigError:
            stale[name] = f"{configured} holds no complete checkpoint any more"
            continue
        if now.resolve() != Path(here(model["checkpoint"])).resolve():
            stale[name] = f"{configured} now resolves to {now.name}, not the evaluated {Path(model['checkpoint']).name}"
        elif checkpoint_digest(now) != digest:
            stale[name] = f"{now} was rewritten since (a rerun trained another model into it)"
    return stale


def _trained_elsewhere(method: str, checkpoint: str | None, run_dir: Path | None) -> str | None:
    """Why `method`'s device-hours do not belong to the model of that name evaluated from
    `checkpoint` (a step folder), or None when its stage folder in `run_dir` trained it."""
    if run_dir is None or checkpoint is None:
        return None
    folder = Path(run_dir).resolve() / (PPO if method == PPO else OFFLINE_PREFIX + method)
    if Path(checkpoint).resolve().is_relative_to(folder):
        return None
    return f"the evaluated checkpoint {checkpoint} is not from {folder}, which the cost of {method} is for"


def side_by_side_markdown(entries: list[dict], results: dict | None, judge: dict | None,
                          judge_check: tuple[str, str] = ("current", "")) -> str:
    """The table (none without a model to show) and notes on what is missing and which
    command adds it; `judge` is None when there is none or it is stale (`judge_check`)."""
    notes = [_judge_note(judge, judge_check)]
    if not results:
        notes.append("No evaluation results (eval/results.json): run `orlhf eval` for the quality columns.")
    if not entries:
        return ("No model to show: no evaluation or judge results and no completed `align_<method>` or `ppo` stage "
                "in ledger.jsonl.\n\n" + "\n".join(notes) + "\n")
    notes.insert(0, "Device-hours leave out SFT and the reward model, which every method shares (see Table 3 "
                    "below).")
    notes += [f"{e['model']}: quality not shown: {e['stale']}; rerun `orlhf eval` to evaluate it as it is now."
              for e in entries if e.get("stale")]
    notes += [f"{e['model']}: device-hours not shown: {e['cost_elsewhere']}." for e in entries
              if e.get("cost_elsewhere")]
    scorers = list(results["table"][results["baseline"]]) if results else []
    baseline = results["baseline"] if results else ""
    answers = results.get("answers", results["prompts"]) if results else 0  # before generation.n: one per prompt
    header = "".join(f" {s} mean ± s.e. | {s} − {baseline} ± paired s.e. | {s} win rate vs {baseline} [95% CI] |"
                     for s in scorers)
    column = judge is not None and judge_scores_label(judge) is not None
    judge_header = f" judge {judge['judge_model']} ({judge_scores_label(judge)}) |" if column else ""
    lines = [f"| model |{header}{judge_header} cut off | device-hours | share of PPO's |",
             "|---|" + "---:|---:|---:|" * len(scorers) + ("---:|" if column else "") + "---:|---:|---:|"]
    for entry in entries:
        cells = "".join(f" {score_cells(entry['quality'][s])} |" if s in entry["quality"] else " — | — | — |"
                        for s in scorers)
        judged = f" {_judge_cell(entry['judge'])} |" if column else ""
        cut = f"{entry['cut_off']}/{answers}" if entry["cut_off"] is not None else "—"
        name = entry["model"] + (f" (`<rm_score> {entry['reward_prompt']:.1f}`)"
                                 if entry["reward_prompt"] is not None else "")
        lines.append(f"| {name} |{cells}{judged} {cut} | {_hours_cell(entry)} | {_share(entry)} |")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _judge_note(judge: dict | None, judge_check: tuple[str, str]) -> str:
    state, why = judge_check
    if state == "stale":
        return (f"LLM judge: judge/results.json is stale and not shown: {why}. Rerun `orlhf judge` with the same "
                "answer files to grade the current answers (it sends only the requests for changed answers).")
    if state == "unfinished":
        return (f"LLM judge: `orlhf judge` has not finished ({why}: it is running, or its last execution "
                "failed or was stopped; the ledger and its log say which). Rerun it to add its scores: it "
                "resumes from the replies it saved.")
    if judge is None:
        return "LLM judge: no judge configured (run `orlhf judge` to add its scores here)."
    note = f"Judge: {judge['judge_model']} ({judge['format']} format); details in judge/results.md."
    if judge_scores_label(judge) is None:
        note = (f"Judge: {judge['judge_model']} (pairwise format, every pair of models, no baseline): its win rates "
                "per pair are in judge/results.md; judging with `format=pairwise baseline=NAME` puts each model's "
                "win rate against NAME here.")
    return note + (f" Not verified against the evaluation: {why}." if state == "unverified" else "")


def judge_scores_label(judge: dict) -> str | None:
    """The judge column's heading; None for pairwise judging without a baseline (no column)."""
    if judge["format"] != "pairwise":
        return "mean score ± s.e."
    return f"win rate vs {judge['baseline']}" if judge.get("baseline") else None


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
    if not rows:
        lines = ["No method to charge yet: ledger.jsonl has no completed `align_<method>` or `ppo` stage (run "
                 "`orlhf align` or `orlhf ppo`)."]
    shared_line = (" + ".join(f"{s} {v:.4f}" for s, v in shared.items() if s != "total")
                   + f" = {shared['total']:.4f}") if len(shared) > 1 else "none in the ledger"
    # On CPU a "device" is a process; PPO's four share the cores one offline process has alone.
    cpu = "" if "cpu" not in devices else (" On CPU a device is one process, and processes share the machine's "
                                           "cores, so these shares move with the machine's load; on GPUs each "
                                           "process holds its own device, as in the paper.")
    return (f"Device-hours ({', '.join(devices)} devices; devices x wall hours). Offline methods: generation + "
            "labeling + mixing (the paper's methods) or the reference pass (DPO-style methods) + alignment; "
            "PPO: actor + critic + "
            f"reference + reward model.{cpu}\n\n" + "\n".join(lines)
            + f"\n\nShared by every method, PPO included (not in the totals): {shared_line}.")


def stages_markdown(hours: dict[str, dict]) -> str:
    lines = ["| stage | device-hours | wall seconds | executions | not charged: device-hours | not charged: "
             "executions |", "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {stage} | {e['device_hours']:.4f} | {e['wall_seconds']:.1f} | {e['executions']} | "
              f"{e['not_charged_device_hours']:.4f} | {_not_charged(e)} |" for stage, e in hours.items()]
    return ("Per stage: executions charged (the last completed one and the earlier ones it resumed from, "
            "whatever their status; PPO's services with the actor execution they served) and not charged (failed "
            "or interrupted ones that no completed execution continued, and superseded ones: completed, but a "
            "fresh rerun replaced their result).\n\n" + "\n".join(lines))


def _not_charged(entry: dict) -> str:
    counts = [f"{entry[status]} {status}" for status in (FAILED, INTERRUPTED, SUPERSEDED) if entry[status]]
    return ", ".join(counts) or "—"


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


def _rm_note(run_dir: Path, rm: str) -> str:
    """What the rm column measures: with this run's own reward model, what the methods were
    trained to raise, not their quality."""
    units = ("Its scores are raw (a DT reward prompt such as `<rm_score> 1.5` is in z-scores of the labeled set's "
             "rewards).")
    if Path(rm).resolve().is_relative_to((run_dir / "rm").resolve()):
        return ("rm: this run's own reward model, which labeled the offline methods' data and rewarded PPO: it "
                "grades what they were trained to raise, not their quality (the gold reward and an LLM judge do). "
                + units)
    return f"rm: the reward model {rm}. " + units


def report_markdown(run_dir: Path, results: dict | None, judge: dict | None, judge_check: tuple[str, str],
                    entries: list[dict], rows: list[dict], hours: dict[str, dict], figures: dict[str, Path | None],
                    rounds: list[dict]) -> str:
    shared = shared_hours(hours)
    lines = [f"# Offline RLHF run report: `{run_dir}`", "", "## Methods side by side: quality and device-hours", ""]
    if results:
        lines += [f"{results['prompts']} held-out prompts; differences and win rates against {results['baseline']} "
                  f"on the same prompts; cut off: answers that reached max_new_tokens={results['max_new_tokens']}"
                  + (f"; gold reward: {results['gold']}" if results.get("gold") else "") + ".", ""]
        if results.get("rm"):
            lines += [_rm_note(run_dir, relocated(results, run_dir)(results["rm"])), ""]
    lines += [side_by_side_markdown(entries, results, judge, judge_check)]
    if figures.get("cost_quality"):
        lines += [f"![device-hours and quality per method]({figures['cost_quality'].relative_to(run_dir)})", ""]
    lines += ["## Device-hours per method (the paper's Table 3)", "", table3_markdown(rows, hours, shared), "",
              stages_markdown(hours)]
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
