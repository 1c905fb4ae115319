"""`orlhf label` tokenizes every sample before scoring (138,895 samples took two silent
minutes): `encode_scored` shows progress on rank 0 once it has run `QUIET_FOR_S`, and none
with progress=False."""

import pytest

from offline_rlhf import progress
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.labeling.scoring import encode_scored
from offline_rlhf.progress import PREFIX

PAIRS = [(f"question {i}", f"answer {i}") for i in range(12)]


def test_tokenizing_for_scoring_shows_progress_when_slow(rm_tokenizer_dir, capsys, monkeypatch):
    tokenizer = Tokenizer.from_dir(rm_tokenizer_dir)
    encode_scored(tokenizer, ChatTemplate(), PAIRS, 64)
    assert capsys.readouterr() == ("", "")  # quick: silent
    monkeypatch.setattr(progress, "QUIET_FOR_S", 0.0)
    monkeypatch.delenv("RANK", raising=False)
    samples = encode_scored(tokenizer, ChatTemplate(), PAIRS, 64)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(PREFIX)]
    assert len(samples) == 12 and lines[-1].startswith(f"{PREFIX}tokenizing for scoring: sample 12/12 (100%)")
    encode_scored(tokenizer, ChatTemplate(), PAIRS, 64, progress=False)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("finished", [None, [True] * 11 + [False]])
def test_encode_scored_is_unchanged(rm_tokenizer_dir, finished):
    tokenizer = Tokenizer.from_dir(rm_tokenizer_dir)
    samples = encode_scored(tokenizer, ChatTemplate(), PAIRS, 64, finished)
    eos = [sample.input_ids[-1] == tokenizer.eos_id for sample in samples]
    assert eos == [True] * 12 if finished is None else eos == finished
