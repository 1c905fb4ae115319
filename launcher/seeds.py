"""Training seeds (`pipeline.seeds: [s1, s2, ...]`): the whole pipeline once per seed, then
one stage across them. Replicate s runs in `run_dir/seed_<s>/` (its own stage folders,
`ledger.jsonl` and report), where `${run_dir}` in the entries' overrides names that folder,
so each replicate reads its own task data; its rounds (`pipeline.rounds`) run in
`run_dir/seed_<s>/round_<r>/`. The seed reaches each stage through `pipeline.seed_keys`
(stage kind -> config keys, set after the entry's own overrides). Replicates share nothing:
each is a chain of its own (on Slurm they run side by side), and `orlhf seeds-report`
waits for all of them in `run_dir`, reporting the replicates listed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from launcher.rounds import Step, pipeline_steps
from launcher.schema import LaunchError, PipelineConfig, StageEntry

SEEDS_REPORT = "seeds-report"  # offline_rlhf.stages.seeds_report, reading run_dir/seed_<s>/report.json
REPORT = "report"  # the stage writing a run's report.json


def replicate(seed: int) -> str:
    """The replicate's folder under run_dir, and its chain."""
    return f"seed_{seed}"


def seeded(pipeline: PipelineConfig, seed: int) -> PipelineConfig:
    """The pipeline as replicate `seed` runs it: each entry with its kind's seed keys set."""
    stages = [entry.overriding(dict.fromkeys(pipeline.seed_keys.get(entry.stage, []), seed))
              for entry in pipeline.stages]
    return replace(pipeline, stages=stages)


def first_run(pipeline: PipelineConfig, run_dir: Path) -> tuple[PipelineConfig, Path]:
    """Where the entries as written are planned first, to learn the folders their stages
    write: the run's folder, or the first replicate's with its seed."""
    if not pipeline.seeds:
        return pipeline, run_dir
    seed = pipeline.seeds[0]
    return seeded(pipeline, seed), run_dir / replicate(seed)


def sweep_steps(pipeline: PipelineConfig, run_dir: Path) -> list[Step]:
    """Every stage to plan, in the order they run locally: the pipeline's steps (rounds
    included), or with seeds each replicate's, named `seed_<s>.<step>`, and the report last."""
    if not pipeline.seeds:
        return pipeline_steps(pipeline, run_dir)
    if not any(entry.stage == REPORT for entry in pipeline.stages):
        raise LaunchError("pipeline.seeds", f"{SEEDS_REPORT} reads each replicate's report.json, which no entry writes",
                          f"end the pipeline with `{{stage: {REPORT}}}` (after its eval)")
    steps = [replace(step, name=f"{replicate(seed)}.{step.name}", chain=replicate(seed))
             for seed in pipeline.seeds
             for step in pipeline_steps(seeded(pipeline, seed), run_dir / replicate(seed))]
    # The seeds listed, not every seed_<s>/ there: a seed dropped from the list drops out of the report.
    replicates = StageEntry(stage=SEEDS_REPORT, overrides=[f"replicates=[{','.join(map(replicate, pipeline.seeds))}]"])
    return [*steps, Step(len(pipeline.stages), replicates, run_dir, SEEDS_REPORT, origin="pipeline.seeds")]
