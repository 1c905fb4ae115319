"""One unusable record (identical replies, a blank response) is skipped and counted, not fatal;
`strict` restores the error; malformed records stay errors naming file:line; a lone surrogate
escape is a one-line DataError."""

import json

import pytest

from offline_rlhf.config.schema import DataConfig, SourceConfig
from offline_rlhf.data.errors import DataError, UnusableRecord
from offline_rlhf.data.preference_dataset import build_preference_dataset
from offline_rlhf.data.preference_readers import read_hh_rlhf, read_oasst_pairs
from offline_rlhf.data.prompts import read_prompts
from offline_rlhf.data.sft_dataset import build_sft_dataset, read_summary, write_dataset_card
from offline_rlhf.data.sft_readers import read_self_instruct
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.labeling.samples import read_samples
from tests.synthetic_preferences import preference_records


@pytest.fixture(scope="module")
def tokenizer(rm_tokenizer_dir):
    return Tokenizer.from_dir(rm_tokenizer_dir)


def pref_config(path, **data) -> DataConfig:
    return DataConfig(sources=[SourceConfig(name="pairs", format="jsonl", path=str(path))], pack=False,
                      val_fraction=0.1, max_seq_len=64, **data)


def pairs_with_one_identical(write_file):
    records = preference_records(20)
    records[7]["rejected"] = records[7]["chosen"] + "  "  # equal after stripping
    return write_file("pairs.jsonl", *map(json.dumps, records))


def test_an_identical_pair_is_skipped_and_counted_in_the_card(write_file, tokenizer, tmp_path):
    path = pairs_with_one_identical(write_file)
    dataset = build_preference_dataset(pref_config(path), tokenizer, seed=0)
    assert len(dataset.train) + len(dataset.val) == 19
    assert dataset.card["sources"]["pairs"]["skipped"] == 1 and dataset.card["totals"]["skipped"] == 1
    assert dataset.card["skip_reasons"] == {"pairs": {"identical chosen and rejected": 1}}
    assert read_summary(dataset.card).startswith("1 skipped (1 identical chosen and rejected)")
    write_dataset_card(dataset.card, tmp_path / "rm")
    assert "pairs: 1 skipped (1 identical chosen and rejected)" in (tmp_path / "rm" / "dataset_card.md").read_text()


def test_strict_restores_the_error_naming_file_and_line(write_file, tokenizer):
    path = pairs_with_one_identical(write_file)
    with pytest.raises(DataError, match=rf"^{path}:8: expected 'chosen' and 'rejected' to differ \(identical\)$"):
        build_preference_dataset(pref_config(path, strict=True), tokenizer, seed=0)


@pytest.mark.parametrize("bad, expected", [
    ({"prompt": "p", "chosen": 3, "rejected": ""}, "expected 'chosen' to be str (got int)"),
    ({"prompt": "", "rejected": "b"}, "expected an object with key 'chosen' (missing)"),
])
def test_a_malformed_record_beside_a_blank_field_is_still_an_error(write_file, tokenizer, bad, expected):
    path = write_file("pairs.jsonl", json.dumps(preference_records(1)[0]), json.dumps(bad))
    with pytest.raises(DataError, match=rf"^{path}:2: ") as error:
        build_preference_dataset(pref_config(path), tokenizer, seed=0)
    assert expected in str(error.value) and not isinstance(error.value, UnusableRecord)


def test_blank_replies_and_bad_json_are_told_apart(write_file, tokenizer):
    records = [json.dumps(r) for r in preference_records(5)]
    blank = write_file("blank.jsonl", *records, json.dumps({"prompt": "p", "chosen": "a", "rejected": "  "}))
    card = build_preference_dataset(pref_config(blank), tokenizer, seed=0).card
    assert card["skip_reasons"] == {"pairs": {"blank 'rejected'": 1}}
    broken = write_file("broken.jsonl", *records, '{"prompt": "p", "chosen": ')
    with pytest.raises(DataError, match=rf"^{broken}:6: expected a JSON object \(invalid JSON"):
        build_preference_dataset(pref_config(broken), tokenizer, seed=0)


def test_sft_blank_response_is_skipped_and_counted(write_file, tokenizer):
    lines = [json.dumps({"prompt": f"question {i}", "response": "answer" if i != 3 else " \n "}) for i in range(10)]
    path = write_file("sft.jsonl", *lines)
    cfg = DataConfig(sources=[SourceConfig(name="demos", format="jsonl", path=str(path))], val_fraction=0.0,
                     max_seq_len=64)
    card = build_sft_dataset(cfg, tokenizer, seed=0).card
    assert card["totals"]["taken"] == 9 and card["skip_reasons"] == {"demos": {"blank 'response'": 1}}
    strict = DataConfig(sources=cfg.sources, val_fraction=0.0, max_seq_len=64, strict=True)
    with pytest.raises(DataError, match=rf"^{path}:4: expected 'response' to be non-empty text \(blank\)$"):
        build_sft_dataset(strict, tokenizer, seed=0)


def test_hh_identical_replies_skip_one_record(write_file):
    good = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: no"})
    same = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: x", "rejected": "\n\nHuman: hi\n\nAssistant: x"})
    skips = Skips()
    assert len(read_hh_rlhf(write_file("hh.jsonl", good, same, good), skips=skips)) == 2
    assert skips.counts == {"identical chosen and rejected": 1}


def test_oasst_identical_ranked_replies_skip_that_pair_only(write_file):
    def reply(text, rank):
        return {"role": "assistant", "text": text, "rank": rank, "replies": []}

    tree = {"prompt": {"role": "prompter", "text": "q", "replies": [reply("a", 0), reply("a", 1), reply("b", 2)]}}
    skips = Skips()
    pairs = read_oasst_pairs(write_file("oasst.jsonl", json.dumps(tree)), skips=skips)
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b"), ("a", "b")]
    assert skips.counts == {"identical chosen and rejected": 1}


def test_self_instruct_blank_output_skips_its_instance(write_file):
    record = {"instruction": "Do it.", "instances": [{"input": "", "output": "done"}, {"input": "x", "output": " "}]}
    skips = Skips()
    assert [e.response for e in read_self_instruct(write_file("s.jsonl", json.dumps(record)), skips=skips)] == ["done"]
    assert skips.counts == {"blank 'output'": 1}


def test_label_reads_preference_input_with_an_identical_pair(write_file):
    """`orlhf label` reads its inputs through read_samples; one identical pair refused the file."""
    path = pairs_with_one_identical(write_file)
    skips = Skips()
    samples = read_samples("pairs", "preference", "jsonl", str(path), ChatTemplate(), None, 0, skips)
    assert len(samples) == 2 * 19 and skips.counts == {"identical chosen and rejected": 1}
    with pytest.raises(DataError, match=rf"^{path}:8: expected 'chosen' and 'rejected' to differ"):
        read_samples("pairs", "preference", "jsonl", str(path), ChatTemplate(), None, 0, Skips(strict=True))


# --- a lone surrogate escape in a prompt file --------------------------------------------------


def test_lone_surrogate_in_a_prompt_file_names_file_and_line(write_file):
    path = write_file("prompts.jsonl", json.dumps({"prompt": "fine \U0001F600"}), '{"prompt": "broken \\ud800 here"}')
    with pytest.raises(DataError) as error:
        read_prompts("prompts", "jsonl", str(path), ChatTemplate())
    message = str(error.value)
    assert message == f"{path}:2: expected valid Unicode text in 'prompt' (a lone surrogate escape \\ud800)"
    assert "\n" not in message


def test_surrogate_pairs_and_nested_lone_surrogates(write_file):
    ok = write_file("ok.jsonl", '{"prompt": "emoji \\ud83d\\ude00"}')
    assert read_prompts("prompts", "jsonl", str(ok), ChatTemplate()) == ["emoji \U0001F600"]
    nested = write_file("n.jsonl", '{"instruction": "i", "instances": [{"input": "", "output": "\\udfff"}]}')
    with pytest.raises(DataError, match=rf"^{nested}:1: expected valid Unicode text in 'output'"):
        read_self_instruct(nested)


def test_a_source_with_only_unusable_records_is_one_error_naming_it(write_file, tokenizer):
    path = write_file("same.jsonl", *[json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"})] * 3)
    with pytest.raises(DataError) as error:
        build_preference_dataset(pref_config(path), tokenizer, seed=0)
    assert str(error.value) == (f"{path}: expected at least one usable record (3 skipped (3 identical chosen and "
                                "rejected); data.strict=true names the first)")


def test_unusable_record_survives_pickling_for_dataloader_workers():
    import pickle

    error = pickle.loads(pickle.dumps(UnusableRecord("f.jsonl", 3, "expected x", "blank 'x'")))
    assert (str(error), error.reason, type(error)) == ("f.jsonl:3: expected x", "blank 'x'", UnusableRecord)
