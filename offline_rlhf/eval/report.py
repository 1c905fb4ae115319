"""The run's report (`report.md`, `report.json`, figures) built from the stage outputs:
the evaluation table, the reward distribution (paper Fig. 5), the device-hours
per method (the paper's Table 3, where the offline methods also pay for generating and
labeling their samples) and the training loss curves."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from offline_rlhf.ledger import read_ledger
from offline_rlhf.metrics import read_metrics

DATA_PREP = ("generate", "label", "mix")  # shared by every offline method, counted for each
SHARED = ("sft", "rm")  # every method, PPO included, starts from these
TRAINING = ("sft", "rm", "align_mle_filter", "align_rwr", "align_dt")


def device_hours(run_dir: Path) -> dict[str, dict]:
    """Per stage: device-hours, wall seconds and executions summed over its ledger rows."""
    totals: dict[str, dict] = defaultdict(lambda: {"device_hours": 0.0, "wall_seconds": 0.0, "executions": 0,
                                                   "device_type": ""})
    for row in read_ledger(run_dir):
        entry = totals[row.stage]
        entry["device_hours"] += row.device_hours
        entry["wall_seconds"] += row.wall_seconds
        entry["executions"] += 1
        entry["device_type"] = row.device_type
    return dict(totals)


def table3(hours: dict[str, dict]) -> list[dict]:
    """One row per offline method: its alignment stage plus the data preparation."""
    prep = sum(hours.get(stage, {}).get("device_hours", 0.0) for stage in DATA_PREP)
    shared = sum(hours.get(stage, {}).get("device_hours", 0.0) for stage in SHARED)
    rows = []
    for stage, entry in sorted(hours.items()):
        if stage.startswith("align_"):
            rows.append({"method": stage.removeprefix("align_"), "alignment": entry["device_hours"],
                         "data_preparation": prep, "total": entry["device_hours"] + prep,
                         "total_with_sft_and_rm": entry["device_hours"] + prep + shared})
    return rows


def table3_markdown(rows: list[dict], hours: dict[str, dict]) -> str:
    device = next((e["device_type"] for e in hours.values() if e["device_type"]), "device")
    lines = ["| method | alignment | generation + labeling + mixing | total | total with SFT and RM |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['alignment']:.4f} | {r['data_preparation']:.4f} | {r['total']:.4f} | "
              f"{r['total_with_sft_and_rm']:.4f} |" for r in rows]
    return f"Device-hours ({device} devices; devices x wall hours):\n\n" + "\n".join(lines) + "\n"


def loss_curves(run_dir: Path, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in TRAINING if (run_dir / s / "metrics.jsonl").exists()]
    if not stages:
        return None
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


def report_markdown(run_dir: Path, results: dict | None, rows: list[dict], hours: dict[str, dict],
                    figures: dict[str, Path | None]) -> str:
    lines = [f"# Offline RLHF run report: `{run_dir}`", ""]
    if results:
        lines += ["## Evaluation (held-out prompts)", "", (run_dir / "eval" / "results.md").read_text(), ""]
    lines += ["## Device-hours per method (the paper's Table 3)", "", table3_markdown(rows, hours), "",
              "| stage | device-hours | wall seconds | executions |", "|---|---:|---:|---:|"]
    lines += [f"| {stage} | {e['device_hours']:.4f} | {e['wall_seconds']:.1f} | {e['executions']} |"
              for stage, e in hours.items()]
    for title, key in (("Reward distribution (paper Fig. 5)", "reward_distribution"), ("Loss curves", "loss_curves")):
        if figures.get(key):
            lines += ["", f"## {title}", "", f"![{title}]({figures[key].relative_to(run_dir)})"]
    return "\n".join(lines) + "\n"
