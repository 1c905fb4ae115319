"""`pipeline.rounds`: the entries marked `repeat` run again in run_dir/round_<r>/, each round
from the previous round's aligned policy, before the stages that follow the loop."""

from pathlib import Path

import pytest

from launcher.rounds import pipeline_steps
from launcher.schema import LaunchError, PipelineConfig, StageEntry

RUN = Path("/runs/it")
LABEL_INPUTS = "inputs=[{path: '${run_dir}/generate/samples.jsonl'}, {path: '${run_dir}/task/s.jsonl'}]"


def pipeline(rounds=3, align_repeats=1):
    loop = [StageEntry(stage="generate", overrides=["sources=[{path: '${run_dir}/task/p.jsonl'}]"], repeat=True),
            StageEntry(stage="label", overrides=["rm=elsewhere", "batch_size=8", LABEL_INPUTS], repeat=True),
            StageEntry(stage="mix", repeat=True)]
    aligns = [StageEntry(stage="align", name=f"align_{m}", overrides=[f"method={m}"], repeat=i < align_repeats)
              for i, m in enumerate(("dt", "rwr"))]
    return PipelineConfig(name="it", rounds=rounds, stages=[StageEntry(stage="sft"), *loop, *aligns,
                                                            StageEntry(stage="eval")])


def test_rounds_follow_the_loop_from_the_previous_policy():
    steps = pipeline_steps(pipeline(), RUN)
    assert [s.name for s in steps] == [
        "sft", "generate", "label", "mix", "align_dt",
        "round_2.generate", "round_2.label", "round_2.mix", "round_2.align_dt",
        "round_3.generate", "round_3.label", "round_3.mix", "round_3.align_dt", "align_rwr", "eval"]
    by_name = {s.name: s for s in steps}
    assert by_name["round_2.generate"].run_dir == RUN / "round_2" and by_name["round_2.generate"].index == 1
    assert by_name["round_2.generate"].entry.overrides == [
        "sources=[{path: '/runs/it/task/p.jsonl'}]", "init.checkpoint=/runs/it/align_dt/checkpoints"]
    assert by_name["round_3.align_dt"].entry.overrides == [
        "method=dt", "init.checkpoint=/runs/it/round_2/align_dt/checkpoints"]
    # The RM is fixed; a repeated entry's outputs are this round's (its own generation), task data the run's.
    assert by_name["round_2.label"].entry.overrides == [
        "batch_size=8", "inputs=[{path: '/runs/it/round_2/generate/samples.jsonl'}, {path: '/runs/it/task/s.jsonl'}]",
        "rm=/runs/it/rm/checkpoints"]
    assert by_name["label"].entry.overrides[2].startswith("inputs=[{path: '${run_dir}/generate/")  # round 1 as given
    assert by_name["round_2.mix"].entry.overrides == []
    assert [s.name for s in pipeline_steps(pipeline(rounds=1), RUN)][-1] == "eval"


def test_rounds_need_exactly_one_repeated_policy_and_a_plain_run_dir():
    for repeats in (0, 2):
        with pytest.raises(LaunchError, match=f"exactly one `align` entry marked repeat, found {repeats}"):
            pipeline_steps(pipeline(align_repeats=repeats), RUN)
    with pytest.raises(LaunchError, match="run_dir: '/runs/my run' has characters"):
        pipeline_steps(pipeline(), Path("/runs/my run"))
    with pytest.raises(LaunchError, match="pipeline.rounds: must be >= 1, got 0"):
        PipelineConfig(name="it", rounds=0)
