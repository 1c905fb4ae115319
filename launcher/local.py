"""Run a pipeline's stages one after the other on this machine."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

from omegaconf import OmegaConf

from launcher.plan import STAGE_MODULE, StagePlan

DONE = "DONE"  # every stage writes it last, once its outputs are complete


def local_command(plan: StagePlan, python: str) -> list[str]:
    """torchrun for several processes (`--standalone` picks a free port, so two local runs
    do not collide); a plain interpreter for one."""
    stage = ["-m", STAGE_MODULE, plan.stage, *plan.args]
    if plan.world_size == 1:
        return [python, *stage]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={plan.procs_per_node}", *stage]


def is_complete(plan: StagePlan) -> bool:
    """The stage wrote its DONE marker last, under the same resolved config."""
    config = plan.stage_dir / "config.yaml"
    return (plan.stage_dir / DONE).exists() and config.exists() and \
        _parsed(config.read_text()) == _parsed(plan.config_yaml)


def _parsed(yaml_text: str):
    """Compare configs by value: the order keys are printed in is not a change."""
    return OmegaConf.to_container(OmegaConf.create(yaml_text))


def run_locally(plans: list[StagePlan], python: str, dry_run: bool) -> int:
    """Stops at the first failing stage; each stage's output goes to `<stage>/launch.log`.
    A rerun skips the stages already complete with the same config, so it resumes after
    a failure; once one stage runs, every later stage runs too (its inputs may have
    changed), and a stage that runs loses its DONE marker first."""
    upstream_ran = False
    for index, plan in enumerate(plans, 1):
        command = local_command(plan, python)
        log = plan.stage_dir / "launch.log"
        if not upstream_ran and is_complete(plan):
            print(f"[{index}/{len(plans)}] {plan.name}: already complete, skipped", flush=True)
            continue
        upstream_ran = True
        print(f"[{index}/{len(plans)}] {plan.name}: {shlex.join(command)}", flush=True)
        if dry_run:
            continue
        plan.stage_dir.mkdir(parents=True, exist_ok=True)
        (plan.stage_dir / DONE).unlink(missing_ok=True)
        (plan.stage_dir / "config.yaml").write_text(plan.config_yaml)
        start = time.monotonic()
        with open(log, "w") as handle:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
        if code != 0:
            print(f"orlhf launch: stage {plan.name} failed (exit code {code}); log: {log}", file=sys.stderr)
            return 1
        print(f"    done in {time.monotonic() - start:.1f} s; log: {log}", flush=True)
    return 0
