import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from offline_rlhf.data.tokenizer import train_bpe_tokenizer
from tests.local_data import OASST_TREES, SELF_INSTRUCT

# The runtime folders (and ledger rows) of the `ppo` stage beside its own: ppo_baseline's modules.
PPO_MODULES = ("ppo_actor", "ppo_critic", "ppo_reference", "ppo_reward")


@pytest.fixture(scope="session")
def public_tokenizer(tmp_path_factory):
    """A 512-token byte-level BPE trained on the staged public instruction data."""
    for path in (SELF_INSTRUCT, OASST_TREES):
        assert path.exists(), f"{path} is missing: ../shared/data must sit beside the repository"
    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer([SELF_INSTRUCT, OASST_TREES], 512, out)
    return out


class DemoStages:
    """Stages of the demo pipeline (conf/pipeline/demo.yaml), each run at most once per
    session as the pipeline runs it (`orlhf STAGE` with its overrides, in a process of its
    own), in one shared run folder that no test writes to. `copy_to` runs the stages a test
    starts from that are not there yet and copies their folders, with their ledger rows, into
    the test's own run folder: a run folder moved whole, whose stages a pipeline there skips as
    complete (`launcher.local.is_complete`: the same resolved config) and later stages read as
    their own."""

    def __init__(self, root: Path):
        self.root = root

    def copy_to(self, run_dir: Path, folders: tuple[str, ...]) -> Path:
        self._run(folders)
        run_dir.mkdir(parents=True, exist_ok=True)
        copied = {module for folder in folders for module in ((folder, *PPO_MODULES) if folder == "ppo" else (folder,))}
        for folder in sorted(copied):
            if (self.root / folder).exists():
                shutil.copytree(self.root / folder, run_dir / folder, symlinks=True)
        ledger = self.root / "ledger.jsonl"  # `orlhf task` keeps no row
        rows = [line for line in (ledger.read_text().splitlines() if ledger.exists() else [])
                if json.loads(line)["stage"] in copied]
        if rows:
            (run_dir / "ledger.jsonl").write_text("".join(f"{row}\n" for row in rows))
        return run_dir

    def _run(self, folders: tuple[str, ...]) -> None:
        from launcher.compose import compose_launch
        from launcher.plan import STAGE_MODULE, run_dir_override

        cfg = compose_launch(["pipeline=demo", "cluster=local", f"run_dir={self.root}"])
        entries = [entry for entry in cfg.pipeline.stages if entry.folder in folders]
        assert len(entries) == len(folders), f"not all stages of the demo pipeline: {folders}"
        for entry in entries:
            if (self.root / entry.folder / "DONE").exists():
                continue
            done = subprocess.run([sys.executable, "-m", STAGE_MODULE, entry.stage, *entry.overrides,
                                   run_dir_override(self.root)], capture_output=True, text=True)
            assert done.returncode == 0, f"{entry.folder}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="session")
def demo_stages(tmp_path_factory) -> DemoStages:
    return DemoStages(tmp_path_factory.mktemp("demo_stages") / "run")
