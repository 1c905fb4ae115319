"""`orlhf task` end to end: files the project's readers accept, a card that adds up, a
tokenizer that round-trips, byte-identical reruns per seed, and skipping a finished run."""

import json

import pytest

from offline_rlhf.config.compose import compose_stage
from offline_rlhf.config.tools import TaskConfig
from offline_rlhf.data.embedded_task import QUALITIES
from offline_rlhf.data.preference_readers import read_preference_jsonl
from offline_rlhf.data.records import iter_json_objects
from offline_rlhf.data.sft_readers import read_jsonl
from offline_rlhf.data.template import REWARD_TAG, ChatTemplate
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.stages.task import (
    CARD,
    DONE,
    EVAL_PROMPTS,
    GEN_PROMPTS,
    PREFERENCES,
    SFT,
    TOKENIZER_DIR,
    main,
)

SIZES = ["n_sft=400", "n_preferences=300", "n_gen_prompts=80", "n_eval_prompts=40"]
OUTPUTS = (SFT, PREFERENCES, GEN_PROMPTS, EVAL_PROMPTS, f"{TOKENIZER_DIR}/tokenizer.json")


def run(run_dir, *overrides):
    cfg = compose_stage("task", TaskConfig, [f"run_dir={run_dir}", *SIZES, *overrides])
    assert main(cfg) == 0
    return run_dir / "task"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return run(tmp_path_factory.mktemp("task"))


def test_files_are_read_by_the_project_readers(task_dir):
    assert len(read_jsonl(task_dir / SFT)) == 400
    pairs = read_preference_jsonl(task_dir / PREFERENCES)
    assert len(pairs) == 300 and all(pair.chosen != pair.rejected for pair in pairs)
    for name, count in ((GEN_PROMPTS, 80), (EVAL_PROMPTS, 40)):
        assert [sorted(record) for _, record in iter_json_objects(task_dir / name)] == [["family", "prompt"]] * count


def test_card_counts_match_the_files(task_dir):
    card = json.loads((task_dir / CARD).read_text())
    rows = [record for _, record in iter_json_objects(task_dir / SFT)]
    by_quality = card["sft"]["by_quality"]
    assert list(by_quality) == list(QUALITIES)
    assert by_quality["good"]["count"] == 160 and sum(entry["count"] for entry in by_quality.values()) == 400
    assert by_quality["good"]["mean_gold_reward"] == 3.0 and by_quality["off_topic"]["mean_gold_reward"] == -1.0
    assert card["sft"]["mean_gold_reward"] == pytest.approx(sum(row["gold_reward"] for row in rows) / 400)
    assert card["preferences"]["count"] == 300 and card["eval_prompts"]["count"] == 40
    assert sum(card["gen_prompts"]["by_family"].values()) == 80


def test_tokenizer_round_trips_and_encodes_the_reward_prompt_compactly(task_dir):
    tokenizer = Tokenizer.from_dir(task_dir / TOKENIZER_DIR)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.vocab_size <= 512
    template = ChatTemplate()
    for _, row in list(iter_json_objects(task_dir / SFT))[:50]:
        prompt = template.prompt_text(row["prompt"]) + template.reward_prompt(-1.5)
        text = prompt + template.response_text(row["response"])
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert len(ids) <= 40  # whole words: a tiny model's context stays short
    # Byte-level pre-tokenization splits at punctuation, so 5 pieces is the fewest possible.
    assert len(tokenizer.encode(f" {REWARD_TAG}")) == 5
    assert len(tokenizer.encode(template.reward_prompt(5.0))) <= 8


def test_same_seed_gives_identical_files_another_seed_different(task_dir, tmp_path):
    again, other = run(tmp_path / "again"), run(tmp_path / "other", "seed=1")
    for name in OUTPUTS:
        assert (again / name).read_bytes() == (task_dir / name).read_bytes(), name
    assert (other / SFT).read_bytes() != (task_dir / SFT).read_bytes()


def test_rerun_skips_when_done_with_the_same_config(tmp_path, capsys):
    task_dir = run(tmp_path)
    written = {name: (task_dir / name).stat().st_mtime_ns for name in OUTPUTS}
    capsys.readouterr()
    run(tmp_path)
    assert "skipped" in capsys.readouterr().out
    assert written == {name: (task_dir / name).stat().st_mtime_ns for name in OUTPUTS}
    run(tmp_path, "good_fraction=0.8")
    assert "skipped" not in capsys.readouterr().out
    assert json.loads((task_dir / CARD).read_text())["sft"]["by_quality"]["good"]["count"] == 320
    assert json.loads((task_dir / DONE).read_text())["good_fraction"] == 0.8
