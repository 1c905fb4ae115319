"""Review findings on unusable records: a pair left identical by truncation is skipped and
counted like any other (strict: an error naming its record); a UTF-8 byte-order mark opens
a file; a blank hh-rlhf reply is skipped as in a JSONL file; the reward model's card is its own."""

import json

import pytest

from offline_rlhf.config.schema import DataConfig, SourceConfig
from offline_rlhf.data.errors import DataError, UnusableRecord
from offline_rlhf.data.preference_dataset import build_preference_dataset
from offline_rlhf.data.preference_readers import read_hh_rlhf, read_preference_jsonl
from offline_rlhf.data.records import iter_tsv_rows
from offline_rlhf.data.sft_dataset import build_sft_dataset, read_summary, write_dataset_card
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.tokenizer import Tokenizer
from tests.local_data import HH_HARMLESS
from tests.synthetic_preferences import preference_records

LONG_PROMPT = " ".join(["apple river stone"] * 30)
MAX_LEN = 16  # keeps 8 tokens of LONG_PROMPT, then cuts both replies before they differ


@pytest.fixture(scope="module")
def tokenizer(rm_tokenizer_dir):
    return Tokenizer.from_dir(rm_tokenizer_dir)


def pref_config(path, max_seq_len: int = MAX_LEN, **data) -> DataConfig:
    return DataConfig(sources=[SourceConfig(name="pairs", format="jsonl", path=str(path))], pack=False,
                      max_seq_len=max_seq_len, val_fraction=0.0, **data)


def truncated_pair(n: int) -> str:
    return json.dumps({"prompt": f"{LONG_PROMPT} {n}", "chosen": "same start then a", "rejected": "same start then b"})


def pairs_with_two_truncated(write_file):
    usable = [{"prompt": "hi", "chosen": r["chosen"], "rejected": r["rejected"]} for r in preference_records(3)]
    return write_file("p.jsonl", truncated_pair(1), *map(json.dumps, usable), truncated_pair(2))


def test_pairs_identical_after_truncation_are_counted_in_the_card_and_last_line(write_file, tokenizer, tmp_path):
    dataset = build_preference_dataset(pref_config(pairs_with_two_truncated(write_file)), tokenizer, seed=0)
    assert len(dataset.train) == 3
    card = dataset.card
    assert card["skip_reasons"] == {"pairs": {"identical after truncation": 2}}
    assert card["sources"]["pairs"]["skipped"] == card["totals"]["skipped"] == 2
    assert card["sources"]["pairs"]["identical_after_truncation"] == 2
    assert read_summary(card).startswith("2 skipped (2 identical after truncation)")
    write_dataset_card(card, tmp_path / "rm")
    assert "pairs: 2 skipped (2 identical after truncation)" in (tmp_path / "rm" / "dataset_card.md").read_text()


def test_strict_makes_a_pair_identical_after_truncation_an_error_naming_its_record(write_file, tokenizer):
    path = pairs_with_two_truncated(write_file)
    with pytest.raises(UnusableRecord) as error:
        build_preference_dataset(pref_config(path, strict=True), tokenizer, seed=0)
    assert str(error.value) == (f"{path}:1: expected 'chosen' and 'rejected' to differ within "
                                f"data.max_seq_len={MAX_LEN} tokens (identical after truncation)")


def test_a_source_whose_every_pair_is_truncated_away_is_one_error_naming_it(write_file, tokenizer):
    path = write_file("p.jsonl", truncated_pair(1), truncated_pair(2))
    with pytest.raises(DataError) as error:
        build_preference_dataset(pref_config(path), tokenizer, seed=0)
    assert str(error.value) == ("pairs: expected at least one usable pair (2 skipped (2 identical after truncation); "
                                "raise data.max_seq_len, or data.strict=true names the first)")


def test_a_byte_order_mark_and_crlf_line_ends_read_as_plain_utf8(write_file):
    records = [{"prompt": "héllo", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "c", "rejected": "d"}]
    lines = [json.dumps(record, ensure_ascii=False).encode() + b"\r" for record in records]
    bom = write_file("bom.jsonl", b"\xef\xbb\xbf" + lines[0], lines[1])
    assert [(e.prompt, e.chosen, e.rejected) for e in read_preference_jsonl(bom)] == [("héllo", "a", "b"),
                                                                                        ("p", "c", "d")]
    tsv = write_file("bom.tsv", b"\xef\xbb\xbfq\ta\r", b"r\tb\r")
    assert [row for _, row in iter_tsv_rows(tsv, ["x", "y"])] == [{"x": "q", "y": "a"}, {"x": "r", "y": "b"}]


def test_a_byte_order_mark_later_in_a_file_is_still_an_error(write_file):
    path = write_file("p.jsonl", json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}),
                      b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "chosen": "c", "rejected": "d"}).encode())
    with pytest.raises(DataError, match=rf"^{path}:2: expected a JSON object \(invalid JSON: Unexpected UTF-8 BOM "
                                        r"\(decode using utf-8-sig\), column 1\)$"):  # not "...: ... at at column 1"
        read_preference_jsonl(path)


def test_hh_rlhf_blank_replies_are_skipped_and_counted_in_the_real_file():
    skips = Skips()
    examples = read_hh_rlhf(HH_HARMLESS, skips=skips)
    # Lines 68, 410, 735 and 881 of test-dev.jsonl end the chosen transcript with an empty Assistant turn.
    assert skips.counts == {"blank 'chosen'": 4}
    assert all(e.chosen and e.rejected for e in examples)
    assert {f"hh_rlhf:test-dev.jsonl:{line}" for line in (68, 410, 735, 881)}.isdisjoint(e.source for e in examples)
    with pytest.raises(UnusableRecord, match=rf"^{HH_HARMLESS}:68: expected 'chosen' to be non-empty text \(blank\)$"):
        read_hh_rlhf(HH_HARMLESS)


def test_hh_rlhf_blank_rejected_is_skipped_as_in_a_jsonl_file(write_file):
    def transcript(reply):
        return f"\n\nHuman: hi\n\nAssistant:{reply}"

    path = write_file("hh.jsonl", json.dumps({"chosen": transcript(" ok"), "rejected": transcript("  ")}),
                      json.dumps({"chosen": transcript(" yes"), "rejected": transcript(" no")}))
    skips = Skips()
    assert [(e.chosen, e.rejected) for e in read_hh_rlhf(path, skips=skips)] == [("yes", "no")]
    assert skips.counts == {"blank 'rejected'": 1}


def test_the_reward_model_card_has_its_own_title_and_no_packing_lines(write_file, tokenizer, tmp_path):
    path = write_file("p.jsonl", *map(json.dumps, preference_records(10)))
    card = build_preference_dataset(pref_config(path, max_seq_len=64), tokenizer, seed=0).card
    assert "pack" not in card and "packing_efficiency" not in card
    write_dataset_card(card, tmp_path / "rm")
    markdown = (tmp_path / "rm" / "dataset_card.md").read_text()
    assert markdown.startswith("# Reward-model dataset card (preference pairs)\n")
    assert "- train: 10 pairs in 20 sequences" in markdown and "- max_seq_len 64, seed 0\n" in markdown
    assert "SFT" not in markdown and "pack" not in markdown


def test_the_sft_card_keeps_its_title_and_packing_line(write_file, tokenizer, tmp_path):
    path = write_file("s.jsonl", *[json.dumps({"prompt": f"p{i}", "response": "apple river"}) for i in range(4)])
    cfg = DataConfig(sources=[SourceConfig(name="demos", format="jsonl", path=str(path))], pack=True,
                     max_seq_len=64, val_fraction=0.0)
    write_dataset_card(build_sft_dataset(cfg, tokenizer, seed=0).card, tmp_path / "sft")
    markdown = (tmp_path / "sft" / "dataset_card.md").read_text()
    assert markdown.startswith("# SFT dataset card\n") and "- train: 4 documents in" in markdown
    assert ", pack True, packing efficiency " in markdown
