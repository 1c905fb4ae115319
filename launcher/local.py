"""Run a pipeline's stages one after the other on this machine."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from omegaconf import OmegaConf

from launcher.plan import STAGE_MODULE, StagePlan

DONE = "DONE"  # every stage writes it last, once its outputs are complete
# How stages mark a progress line in a log file (offline_rlhf.progress.PREFIX; the launcher
# imports nothing of offline_rlhf, a test keeps the two equal).
PROGRESS_PREFIX = "[progress] "
POLL_S = 1.0


def local_command(plan: StagePlan, python: str) -> list[str]:
    """torchrun for several processes (`--standalone` picks a free port, so two local runs
    do not collide); a plain interpreter for one."""
    stage = ["-m", STAGE_MODULE, plan.stage, *plan.args]
    if plan.world_size == 1:
        return [python, *stage]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={plan.procs_per_node}", *stage]


def is_complete(plan: StagePlan) -> bool:
    """The stage wrote its DONE marker last, under the same resolved config."""
    config = plan.config_file
    return (plan.stage_dir / DONE).exists() and config.exists() and \
        _parsed(config.read_text()) == _parsed(plan.config_yaml)


def _parsed(yaml_text: str):
    """Compare configs by value: the order keys are printed in is not a change."""
    return OmegaConf.to_container(OmegaConf.create(yaml_text))


def already_complete(plans: list[StagePlan]) -> int:
    """How many leading stages are complete with the same config: a rerun resumes after
    them. Once one stage runs, every later stage runs too (its inputs may have changed)."""
    return next((count for count, plan in enumerate(plans) if not is_complete(plan)), len(plans))


def run_locally(plans: list[StagePlan], python: str, dry_run: bool) -> int:
    """Stops at the first failing stage; each stage's output goes to `<stage>/launch.log`.
    A rerun skips the stages `already_complete`; a stage that runs loses its DONE marker first."""
    skipped = already_complete(plans)
    for index, plan in enumerate(plans, 1):
        command = local_command(plan, python)
        log = plan.stage_dir / "launch.log"
        if index <= skipped:
            print(f"[{index}/{len(plans)}] {plan.name}: already complete, skipped", flush=True)
            continue
        print(f"[{index}/{len(plans)}] {plan.name}: {shlex.join(command)}", flush=True)
        if dry_run:
            continue
        plan.stage_dir.mkdir(parents=True, exist_ok=True)
        (plan.stage_dir / DONE).unlink(missing_ok=True)
        print(f"    log: {log}", flush=True)
        start = time.monotonic()
        code = run_showing_progress(command, log, sys.stdout)
        if code != 0:
            print(f"orlhf launch: stage {plan.name} failed (exit code {code}); log: {log}", file=sys.stderr)
            return 1
        print(f"    done in {time.monotonic() - start:.1f} s", flush=True)
    return 0


def run_showing_progress(command: list[str], log: Path, out: TextIO) -> int:
    """Run `command` with its output in `log`, showing its latest progress line on `out`
    while it runs: rewritten in place on a terminal, else a new line whenever it changes."""
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    tail, shown, live = LogTail(log), "", out.isatty()
    while not _ended(process):
        latest = tail.latest_progress()
        if latest and latest != shown:
            shown = latest
            out.write(f"\r    {latest}\x1b[K" if live else f"    {latest}\n")
            out.flush()
    if live and shown:
        out.write("\n")  # the next output starts on a line of its own
    return process.returncode


def _ended(process: subprocess.Popen) -> bool:
    """Wait up to POLL_S for the process (returning at once when it ends)."""
    try:
        process.wait(timeout=POLL_S)
    except subprocess.TimeoutExpired:
        return False
    return True


class LogTail:
    """The lines appended to a growing log since the last look (a partial last line waits)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def latest_progress(self) -> str:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = self.partial + handle.read()
            self.offset = handle.tell()
        *lines, self.partial = data.split(b"\n")
        marked = [line for line in lines if line.startswith(PROGRESS_PREFIX.encode())]
        return marked[-1][len(PROGRESS_PREFIX):].decode(errors="replace").strip() if marked else ""
