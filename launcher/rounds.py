"""Iterative rounds (`pipeline.rounds: K`): the pipeline entries marked `repeat` (the loop
generate -> label -> mix or reference -> align) run again K - 1 times. Round r > 1 runs in
`run_dir/round_<r>/`: its policy-reading stages (generate, reference, align) start from the
policy the previous round's align entry trained, label scores with the run's fixed reward
model, and `${run_dir}` in the entries' own overrides still means the run's folder (task
data, prompts), except before a repeated entry's folder: `${run_dir}/generate/...` in a
repeated label entry is that round's generation. The rounds follow the last repeated
entry, before the stages after it (evaluation, report), which may then list every round's
policy."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from launcher.schema import PLAIN_PATH, LaunchError, PipelineConfig, StageEntry

# The stages whose `init.checkpoint` is the policy being improved, and the one reading `rm`.
POLICY_STAGES = ("generate", "reference", "align")
LABEL_STAGE = "label"


@dataclass(frozen=True)
class Step:
    """One stage to plan: its pipeline index, entry, run folder and name."""

    index: int
    entry: StageEntry
    run_dir: Path
    name: str
    chain: str = ""  # the replicate whose chain it is part of (seed_<s>: launcher.seeds); "": the run's own
    origin: str = ""  # the setting that adds it (a stage no entry names); "": its entry

    @property
    def key(self) -> str:
        """What an error about the stage names."""
        return self.origin or f"pipeline.stages[{self.index}]"


def pipeline_steps(pipeline: PipelineConfig, run_dir: Path) -> list[Step]:
    """The pipeline's entries in order, rounds 2..K inserted after the last repeated entry."""
    steps = [Step(index, entry, run_dir, entry.folder) for index, entry in enumerate(pipeline.stages)]
    if pipeline.rounds == 1:
        return steps
    repeated = [step for step in steps if step.entry.repeat]
    aligned = _the_iterated_policy(repeated)
    if not PLAIN_PATH.fullmatch(str(run_dir)):  # it is written into the rounds' overrides as is
        raise LaunchError("run_dir", f"{str(run_dir)!r} has characters iterative rounds cannot pass on",
                          "use only letters, digits and _ . / + - in run_dir")
    folders = [step.entry.folder for step in repeated]
    later = [_round_step(step, run_dir, number, aligned.folder, folders)
             for number in range(2, pipeline.rounds + 1) for step in repeated]
    cut = steps.index(repeated[-1]) + 1
    return steps[:cut] + later + steps[cut:]


def _the_iterated_policy(repeated: list[Step]) -> StageEntry:
    aligned = [step.entry for step in repeated if step.entry.stage == "align"]
    if len(aligned) != 1:
        raise LaunchError("pipeline.rounds", f"needs exactly one `align` entry marked repeat, found {len(aligned)}",
                          "mark repeat: true on the loop of one method (generate, label, mix or reference, align)")
    return aligned[0]


def _round_step(step: Step, run_dir: Path, number: int, align_folder: str, repeated_folders: list[str]) -> Step:
    previous = run_dir if number == 2 else run_dir / f"round_{number - 1}"
    round_dir = run_dir / f"round_{number}"
    extra = {}
    if step.entry.stage in POLICY_STAGES:
        extra["init.checkpoint"] = previous / align_folder / "checkpoints"
    if step.entry.stage == LABEL_STAGE:
        extra["rm"] = run_dir / "rm" / "checkpoints"
    own = [_in_round(o, run_dir, round_dir, repeated_folders) for o in step.entry.overrides]
    entry = replace(step.entry, overrides=own).overriding(extra)
    return Step(step.index, entry, round_dir, f"round_{number}.{step.entry.folder}")


def _in_round(override: str, run_dir: Path, round_dir: Path, repeated_folders: list[str]) -> str:
    """`override` with `${run_dir}` resolved: a repeated entry's folder (its outputs this
    round) under `round_dir`, anything else (task data, the SFT and RM) under `run_dir`."""
    folders = "|".join(re.escape(folder) for folder in repeated_folders)
    override = re.sub(rf"\$\{{run_dir\}}/({folders})(?=/|['\"\],}}\s]|$)", lambda m: f"{round_dir}/{m.group(1)}",
                      override)
    return override.replace("${run_dir}", str(run_dir))
