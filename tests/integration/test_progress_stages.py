"""Progress of stages that used to be silent or to count from zero: a resumed `orlhf
generate` starts its bar at the prompts answered before (was: at 0 of those left), and
`orlhf rm-score` shows its scoring once it has run a few seconds (was: nothing, for
possibly many minutes)."""

from __future__ import annotations

import json
import re

import pytest

from offline_rlhf import progress
from offline_rlhf.cli import main
from offline_rlhf.progress import PREFIX
from tests.synthetic_preferences import preference_records, synthetic_tokenizer
from tests.unit.ppo.tiny_models import write_checkpoints

PROMPTS = 12


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress_stages")
    synthetic_tokenizer(root / "tokenizer")
    write_checkpoints(root, root / "tokenizer")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n"
                                                for r in preference_records(PROMPTS)))
    return root


def progress_lines(err: str, desc: str) -> list[tuple[int, int]]:
    """(done, total) of each plain progress line of `desc`."""
    return [(int(done), int(total)) for done, total in
            re.findall(rf"^{re.escape(PREFIX + desc)}: \w+ (\d+)/(\d+)", err, flags=re.M)]


def generate(files, run_dir) -> int:
    return main(["generate", f"run_dir={run_dir}", f"init.checkpoint={files / 'sft' / 'checkpoints'}",
                 f"sources=[{{name: p, kind: prompts, path: '{files / 'prompts.jsonl'}'}}]",
                 "generation.max_new_tokens=4", "write_every=2"])


def test_a_resumed_generate_starts_its_bar_at_the_prompts_answered_before(files, tmp_path, capsys):
    assert generate(files, tmp_path) == 0
    stage = tmp_path / "generate"
    shard = stage / "shard_00000.jsonl"
    kept = shard.read_text().splitlines(keepends=True)[:5]  # as if killed after 5 answered prompts
    shard.write_text("".join(kept))
    for name in ("DONE", "samples.jsonl"):
        (stage / name).unlink()
    capsys.readouterr()
    assert generate(files, tmp_path) == 0
    lines = progress_lines(capsys.readouterr().err, "generate")
    assert lines and {total for _, total in lines} == {PROMPTS}
    assert lines[0][0] == 5 + 2 and lines[-1][0] == PROMPTS  # the first write of this run: 2 more


def test_rm_score_shows_its_progress(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "QUIET_FOR_S", 0.0)  # a few records take less than its delay: show them at once
    inputs = tmp_path / "samples.jsonl"
    inputs.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["chosen"]}) + "\n"
                              for r in preference_records(7)))
    assert main(["rm-score", f"run_dir={tmp_path}", f"ckpt={files / 'rm' / 'checkpoints'}", f"input={inputs}",
                 f"output={tmp_path / 'scored.jsonl'}", "batch_size=3"]) == 0
    lines = progress_lines(capsys.readouterr().err, "rm-score")
    assert lines and lines[-1] == (7, 7)
