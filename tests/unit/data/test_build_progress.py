"""Building a dataset says how far it is (100k pairs took 4.5 minutes without a line): one
progress bar per build, on rank 0, only once the build has run `QUIET_FOR_S` (a small
dataset stays silent, so stage outputs are unchanged), and none with progress=False (a
stage's logging.progress=false)."""

import io
import json

import pytest

from offline_rlhf import progress
from offline_rlhf.config.schema import DataConfig, SourceConfig
from offline_rlhf.data.alignment_dataset import build_alignment_dataset
from offline_rlhf.data.preference_dataset import build_preference_dataset
from offline_rlhf.data.sft_dataset import build_sft_dataset
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.progress import PREFIX, Progress
from tests.synthetic_preferences import preference_records

N = 20


@pytest.fixture(scope="module")
def tokenizer(rm_tokenizer_dir):
    return Tokenizer.from_dir(rm_tokenizer_dir)


@pytest.fixture
def shown_at_once(monkeypatch):
    """Builds show progress from their first record (as a slow build does after QUIET_FOR_S)."""
    monkeypatch.setattr(progress, "QUIET_FOR_S", 0.0)
    monkeypatch.delenv("RANK", raising=False)


def sft_build(write_file, tokenizer, **kwargs):
    path = write_file("sft.jsonl", *(json.dumps({"prompt": f"question {i}", "response": f"answer {i}"})
                                     for i in range(N)))
    cfg = DataConfig(sources=[SourceConfig(name="s", format="jsonl", path=str(path))], max_seq_len=64,
                     val_fraction=0.1)
    return build_sft_dataset(cfg, tokenizer, seed=0, **kwargs)


def pair_build(write_file, tokenizer, **kwargs):
    path = write_file("pairs.jsonl", *map(json.dumps, preference_records(N)))
    cfg = DataConfig(sources=[SourceConfig(name="p", format="jsonl", path=str(path))], pack=False, max_seq_len=64,
                     val_fraction=0.1)
    return build_preference_dataset(cfg, tokenizer, seed=0, **kwargs)


def align_build(write_file, tokenizer, **kwargs):
    path = write_file("labeled.jsonl", *(json.dumps({"prompt": f"question {i}", "response": f"answer {i}",
                                                     "reward": i / N}) for i in range(N)))
    return build_alignment_dataset(path, tokenizer, ChatTemplate(), 64, 0.1, 0, reward_prompt=True, **kwargs)


BUILDS = {"sft dataset: example": sft_build, "rm dataset: pair": pair_build, "align dataset: sample": align_build}


def progress_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(PREFIX)]


@pytest.mark.parametrize("shown", BUILDS)
def test_a_slow_build_ends_with_a_progress_line_on_stderr(shown_at_once, write_file, tokenizer, capsys, shown):
    BUILDS[shown](write_file, tokenizer)
    out, err = capsys.readouterr()
    lines = progress_lines(err)
    assert out == "" and lines and lines[-1].startswith(f"{PREFIX}{shown} {N}/{N} (100%)")
    assert len(lines) <= 3  # one line per PLAIN_EVERY_S and the end: no line per record


@pytest.mark.parametrize("shown", BUILDS)
def test_no_progress_when_turned_off_or_not_rank_0(shown_at_once, write_file, tokenizer, capsys, monkeypatch,
                                                   shown):
    BUILDS[shown](write_file, tokenizer, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "1")
    BUILDS[shown](write_file, tokenizer)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("shown", BUILDS)
def test_a_quick_build_prints_nothing(write_file, tokenizer, capsys, shown):
    BUILDS[shown](write_file, tokenizer)
    assert capsys.readouterr() == ("", "")


def test_progress_with_a_delay_is_silent_until_then():
    out = io.StringIO()
    bar = Progress("x", 3, stream=out, every_s=0.0, delay=3600.0)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""
    bar = Progress("x", 3, stream=out, every_s=0.0, delay=0.0)
    bar.update(3)
    bar.close()
    assert out.getvalue().startswith(f"{PREFIX}x: step 3/3 (100%)")
