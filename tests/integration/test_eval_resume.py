"""`orlhf eval` after Ctrl-C: each model that had answered is reused (was: every answer of
every model again), its outputs byte for byte an uninterrupted run's; a model whose inputs
changed (decoding, checkpoint step) answers again, the others are reused."""

from __future__ import annotations

import json
import shutil

import pytest

import offline_rlhf.stages.eval as eval_stage
from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.cli import main
from tests.integration.test_eval_stage import PLUGIN, STOP, sharp_model
from tests.synthetic_preferences import FILLER, MODEL, synthetic_tokenizer

OUTPUTS = ("answers_sft.jsonl", "answers_dt.jsonl", "results.json", "results.md")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An SFT and a DT checkpoint of one random model, and prompts."""
    root = tmp_path_factory.mktemp("eval_resume")
    synthetic_tokenizer(root / "tokenizer")
    for name, metadata in {"sft": {}, "dt": {"alignment": {"method": "dt", "dt_target": 2.0}}}.items():
        save_checkpoint(root / name, sharp_model(), CheckpointMeta(MODEL, "lm", TrainState(), metadata=metadata),
                        tokenizer_dir=root / "tokenizer")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n"
                                                for w in FILLER))
    return root


class Answering:
    """Wraps `answer_prompts`: the models that answered, in order, and Ctrl-C as `stop_at`
    starts answering."""

    def __init__(self, monkeypatch):
        self.calls, self.stop_at = [], None
        original = eval_stage.answer_prompts

        def answer(model, *args):
            self.calls.append(model.name)
            if model.name == self.stop_at:
                raise KeyboardInterrupt
            return original(model, *args)
        monkeypatch.setattr(eval_stage, "answer_prompts", answer)


@pytest.fixture
def answering(monkeypatch):
    return Answering(monkeypatch)


def evaluate(run_dir, sft, dt, *extra: str) -> int:
    return main(["eval", f"run_dir={run_dir}", f"prompts={dt.parent / 'prompts.jsonl'}", "rm=", f"gold={PLUGIN}",
                 "generation.max_new_tokens=8", f"generation.stop=[{STOP}]", "bootstrap_samples=50",
                 f"models=[{{name: sft, checkpoint: '{sft}'}}, {{name: dt, checkpoint: '{dt}'}}]", *extra])


def outputs(run_dir) -> dict[str, bytes]:
    """The stage's outputs, the run folder's own name written as RUN (results.json records it)."""
    return {name: (run_dir / "eval" / name).read_bytes().replace(str(run_dir).encode(), b"RUN") for name in OUTPUTS}


def test_an_interrupted_eval_reuses_the_models_that_answered(files, answering, tmp_path, capsys):
    run_dir = tmp_path / "run"
    answering.stop_at = "dt"
    assert evaluate(run_dir, files / "sft", files / "dt") == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "orlhf eval: interrupted (Ctrl-C); rerun the same command to resume"
    written = {path: path.stat().st_mtime_ns for path in (run_dir / "eval").rglob("*.json")}
    answering.stop_at, answering.calls = None, []
    assert evaluate(run_dir, files / "sft", files / "dt") == 0
    assert answering.calls == ["dt"]  # sft's answers were not generated again
    saved = run_dir / "eval" / eval_stage.ANSWERED / "sft.json"
    assert saved.stat().st_mtime_ns == written[saved]  # nor written again
    assert f"eval sft: reusing its {len(FILLER)} answers from {saved} (written " in capsys.readouterr().out
    assert evaluate(tmp_path / "straight", files / "sft", files / "dt") == 0
    assert outputs(run_dir) == outputs(tmp_path / "straight")


def test_a_model_whose_inputs_changed_answers_again(files, answering, tmp_path, capsys):
    run_dir, sft = tmp_path / "run", tmp_path / "sft"
    shutil.copytree(files / "sft", sft)
    assert evaluate(run_dir, sft, files / "dt") == 0
    answering.calls = []
    assert evaluate(run_dir, sft, files / "dt", "generation.max_new_tokens=4") == 0
    assert answering.calls == ["sft", "dt"]  # decoding changed: every model answers again
    assert "eval sft: answering again: generation.max_new_tokens changed since" in capsys.readouterr().out
    # A later step of sft's training (the config still names its root): sft alone answers again.
    save_checkpoint(sft, sharp_model(), CheckpointMeta(MODEL, "lm", TrainState(step=5)),
                    tokenizer_dir=files / "tokenizer")
    answering.calls = []
    assert evaluate(run_dir, sft, files / "dt", "generation.max_new_tokens=4") == 0
    assert answering.calls == ["sft"]
    assert "eval sft: answering again: model_meta_sha256 changed since" in capsys.readouterr().out
    assert evaluate(tmp_path / "straight", sft, files / "dt", "generation.max_new_tokens=4") == 0
    assert outputs(run_dir) == outputs(tmp_path / "straight")
