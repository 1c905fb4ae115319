"""Two torchrun processes, rank 1 reading a damaged data file its node alone sees: rank 1
says why with its rank, and rank 0, whose collective fails when rank 1 exits, says in one
line that it lost contact (was: a 35-line traceback ending in gloo's "Connection closed by
peer", above rank 1's line, which did not say which rank it came from)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.fixtures import REPO_ROOT
from tests.synthetic_preferences import synthetic_tokenizer

RECORD = json.dumps({"prompt": "add 3 and 4", "response": "the sum is 7."})


def test_a_data_error_on_one_rank_is_one_line_naming_it_and_the_other_rank_says_it_lost_contact(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    synthetic_tokenizer(tokenizer)
    (tmp_path / "data_0.jsonl").write_text((RECORD + "\n") * 200)
    (tmp_path / "data_1.jsonl").write_text((RECORD + "\n") * 150 + "{broken\n" + (RECORD + "\n") * 49)
    source = f"[{{name: task, format: jsonl, path: '{tmp_path}/data_${{oc.env:RANK}}.jsonl'}}]"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "offline_rlhf.cli", "sft", f"run_dir={tmp_path / 'run'}", "model=tiny",
                           f"data.sources={source}", f"init.tokenizer={tokenizer}", "train.global_batch=4",
                           "train.micro_batch=2", "train.max_steps=4", "train.val_every=0", "logging.progress=false"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("orlhf sft: error: ")]
    assert f"orlhf sft: error: rank 1: {tmp_path}/data_1.jsonl:151: expected a JSON object" in proc.stderr, proc.stderr
    # Rank 0 either lost contact in a collective (one line) or was ended by torchrun first (no line).
    assert all(line.startswith(("orlhf sft: error: rank 1: ", "orlhf sft: error: lost contact with another "
                                                               "process of the job (")) for line in lines), lines
    assert "offline_rlhf/" not in proc.stderr, proc.stderr  # no traceback through the project's code
