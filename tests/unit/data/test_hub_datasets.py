"""Datasets by hub name (`format: hf`): the public sets users train on, written here in the
layouts their hub repos have (hh-rlhf's gzipped JSONL folders, oasst1's parquet message
table, Dolly's JSONL, UltraFeedback binarized's chat lists, plain prompt/response and
prompt/chosen/rejected columns) into a hub cache, read with HF_HUB_OFFLINE=1 through
`datasets`. Where a file reader exists, the hub rows must give exactly its examples."""

from __future__ import annotations

import gzip
import json
import sys
from dataclasses import replace
from pathlib import Path

import datasets
import pytest

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.samples import PromptSourceConfig
from offline_rlhf.config.schema import DataConfig, SourceConfig
from offline_rlhf.data.errors import DataError
from offline_rlhf.data.hub_datasets import hub_options, load_split, source_key
from offline_rlhf.data.preference_readers import (
    PreferenceExample,
    read_hh_rlhf,
    read_oasst_pairs,
    read_preference_source,
)
from offline_rlhf.data.prompts import read_prompt_source, read_prompt_turns, read_prompts
from offline_rlhf.data.sft_dataset import build_sft_dataset
from offline_rlhf.data.sft_readers import SFTExample, read_dolly, read_oasst, read_sft_source
from offline_rlhf.data.skips import Skips
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import IGNORE_INDEX
from offline_rlhf.data.tokenizer import Tokenizer
from tests.fixtures import SHARED_DATA
from tests.unit.test_hub import hub_repo, offline_hub

HH_FILE = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test-dev.jsonl"
OASST_TREES = SHARED_DATA / "open-assistant" / "model_eval_manual_data" / "en_100_tree.jsonl"
DOLLY = [
    {"instruction": "When did Virgin Australia start operating?", "category": "closed_qa",
     "context": "Virgin Australia commenced services on 31 August 2000.", "response": "On 31 August 2000."},
    {"instruction": "Name a primary color.", "context": "", "response": "Red.", "category": "open_qa"},
    {"instruction": "Say nothing.", "context": "", "response": "  ", "category": "open_qa"},  # blank: skipped
]
ULTRA_PREFS = [
    {"prompt": "What is 2+2?", "prompt_id": "a",
     "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
     "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5."}],
     "score_chosen": 9.0, "score_rejected": 2.0},
    {"prompt": "Name a fruit.", "prompt_id": "b",
     "chosen": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}],
     "rejected": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}],
     "score_chosen": 5.0, "score_rejected": 5.0},  # identical replies: skipped and counted
]
CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a color"},
                  {"role": "assistant", "content": "Blue."}]},
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    return offline_hub(monkeypatch, tmp_path / "hub")


def dataset_repo(hub: Path, tmp_path: Path, repo_id: str, files: dict[str, list[dict]]) -> Path:
    """Write `files` ({relative name: rows}) as the repo's files and cache it as `repo_id`.
    `.parquet` files are written by datasets (as the hub's are), `.jsonl[.gz]` line by line."""
    folder = tmp_path / "files" / repo_id
    for name, rows in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".parquet"):
            datasets.Dataset.from_list(rows).to_parquet(str(path))
        else:
            text = "".join(json.dumps(row) + "\n" for row in rows).encode()
            path.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    return hub_repo(hub, repo_id, folder, repo_type="dataset")


def jsonl_rows(path: Path, limit: int | None = None) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:limit]]


def oasst_message_table(tree_file: Path) -> list[dict]:
    """The export trees flattened as oasst1's hub table: one row per message, depth first."""
    rows = []

    def walk(message, tree_id, parent):
        row = {key: message.get(key) for key in ("message_id", "text", "role", "lang", "review_result",
                                                  "deleted", "rank", "synthetic")}
        rows.append({**row, "parent_id": parent, "message_tree_id": tree_id})
        for reply in message.get("replies", []):
            walk(reply, tree_id, message["message_id"])

    for tree in jsonl_rows(tree_file):
        walk(tree["prompt"], tree["message_tree_id"], None)
    return rows


def texts(examples) -> list[tuple]:
    """Examples without their source (which names the file or the dataset row)."""
    return [tuple(value for key, value in vars(e).items() if key != "source") for e in examples]


# ---------------------------------------------------------------------------- named datasets


def test_hh_rlhf_transcripts_by_data_dir_give_the_file_readers_pairs(hub, tmp_path):
    harmless, helpful = jsonl_rows(HH_FILE, 120), jsonl_rows(HH_FILE)[120:150]
    dataset_repo(hub, tmp_path, "Anthropic/hh-rlhf", {"harmless-base/test.jsonl.gz": harmless,
                                                      "helpful-base/test.jsonl.gz": helpful})
    skips = Skips()
    pairs = read_preference_source("hf", "Anthropic/hh-rlhf", split="test", data_dir="harmless-base", skips=skips)
    expected_skips = Skips()
    expected = read_hh_rlhf(HH_FILE, skips=expected_skips)[:len(pairs)]
    assert len(pairs) + skips.total == 120 and skips.counts == {"blank 'chosen'": 1}  # line 68
    assert texts(pairs) == texts(read_hh_rlhf(_write(tmp_path / "h.jsonl", harmless), skips=Skips()))
    assert texts(pairs[:3]) == texts(expected[:3])
    assert pairs[0].source == "hf:Anthropic/hh-rlhf:test:1"
    everything = Skips()
    assert len(read_preference_source("hf", "Anthropic/hh-rlhf", split="test", skips=everything)) + \
        everything.total == 150  # no data_dir: every folder's test split


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_oasst1_message_table_rebuilds_the_trees_of_the_export_format(hub, tmp_path):
    rows = oasst_message_table(OASST_TREES)
    dataset_repo(hub, tmp_path, "OpenAssistant/oasst1", {"data/train-00000-of-00001.parquet": rows})

    sft = read_sft_source("hf", "OpenAssistant/oasst1", skips=Skips())
    assert texts(sft) == texts(read_oasst(OASST_TREES, skips=Skips()))
    assert len(sft) > 100 and sft[0].source == "hf:OpenAssistant/oasst1:train:1"
    pairs = read_preference_source("hf", "OpenAssistant/oasst1", skips=Skips())
    assert texts(pairs) == texts(read_oasst_pairs(OASST_TREES, skips=Skips()))
    assert len(pairs) > 100


def test_oasst1_replies_cut_from_their_parent_are_skipped_and_counted(hub, tmp_path):
    rows = oasst_message_table(OASST_TREES)
    orphan = next(i for i, row in enumerate(rows) if row["parent_id"] is not None)
    dataset_repo(hub, tmp_path, "OpenAssistant/oasst1", {"data/train-00000-of-00001.parquet": rows[orphan:]})
    skips = Skips()
    read_sft_source("hf", "OpenAssistant/oasst1", skips=skips)
    assert skips.counts["reply without its parent"] >= 1
    with pytest.raises(DataError, match=rf"^OpenAssistant/oasst1:train:1: expected parent '{rows[0]['message_id']}'"):
        read_sft_source("hf", "OpenAssistant/oasst1", skips=Skips(strict=True))


def test_dolly_by_name_matches_the_dolly_reader(hub, tmp_path):
    dataset_repo(hub, tmp_path, "databricks/databricks-dolly-15k", {"databricks-dolly-15k.jsonl": DOLLY})
    skips = Skips()
    examples = read_sft_source("hf", "databricks/databricks-dolly-15k", skips=skips)
    assert texts(examples) == texts(read_dolly(_write(tmp_path / "d.jsonl", DOLLY), skips=Skips()))
    assert examples[0] == SFTExample("When did Virgin Australia start operating?\n\nVirgin Australia commenced "
                                     "services on 31 August 2000.", "On 31 August 2000.",
                                     "hf:databricks/databricks-dolly-15k:train:1")
    assert len(examples) == 2 and skips.counts == {"blank 'response'": 1}


def test_ultrafeedback_binarized_preference_and_sft_splits(hub, tmp_path):
    # Every split has every column, as on the hub: train_sft rows' `messages` are what SFT reads.
    sft_rows = [{**ULTRA_PREFS[0], "prompt": "x", "messages": chat["messages"]} for chat in CHATS]
    dataset_repo(hub, tmp_path, "HuggingFaceH4/ultrafeedback_binarized", {
        "data/train_prefs-00000-of-00001.parquet": [{**row, "messages": row["chosen"]} for row in ULTRA_PREFS],
        "data/train_sft-00000-of-00001.parquet": sft_rows,
    })
    skips = Skips()
    pairs = read_preference_source("hf", "HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", skips=skips)
    assert pairs == [PreferenceExample("What is 2+2?", "4.", "5.", "hf:HuggingFaceH4/ultrafeedback_binarized:"
                                                                     "train_prefs:1")]
    assert skips.counts == {"identical chosen and rejected": 1}

    template = ChatTemplate()
    sft = read_sft_source("hf", "HuggingFaceH4/ultrafeedback_binarized", split="train_sft", template=template)
    assert [(e.prompt, e.response) for e in sft] == [
        ("Be brief.\n\nHi", "Hello."),  # the system message goes before the first user turn
        ("Be brief.\n\nHi Assistant: Hello. User: Name a color", "Blue."),
        ("Capital of France?", "Paris."),
    ]


def test_prompt_response_and_prompt_chosen_rejected_columns_from_local_files(tmp_path, hub):
    sft_file, pref_file = tmp_path / "sft.parquet", tmp_path / "pref.jsonl"
    datasets.Dataset.from_list([{"q": "Why?", "a": "Because."}, {"q": "How?", "a": "So."}]).to_parquet(str(sft_file))
    _write(pref_file, [{"prompt": "Pick", "chosen": "this", "rejected": "that"}])
    assert read_sft_source("hf", str(sft_file), prompt_key="q", response_key="a") == [
        SFTExample("Why?", "Because.", f"hf:{sft_file}:train:1"), SFTExample("How?", "So.", f"hf:{sft_file}:train:2")]
    assert read_preference_source("hf", str(pref_file)) == [
        PreferenceExample("Pick", "this", "that", f"hf:{pref_file}:train:1")]
    assert read_prompts("prompts", "hf", str(sft_file), ChatTemplate(), prompt_key="q", split="train") == \
        ["Why?", "How?"]
    prompts = PromptSourceConfig(kind="prompts", format="hf", path=str(sft_file), prompt_key="q")
    assert read_prompt_source(prompts, ChatTemplate()) == [("Why?", ()), ("How?", ())]
    assert read_prompt_source(replace(prompts, kind="preference", path=str(pref_file), prompt_key="prompt"),
                              ChatTemplate()) == [("Pick", ())]


# ---------------------------------------------------------------------------- the SFT dataset


def test_a_multi_turn_conversation_gives_one_sample_per_assistant_turn(tmp_path, hub, rm_tokenizer_dir):
    path = tmp_path / "chats.parquet"
    datasets.Dataset.from_list(CHATS).to_parquet(str(path))
    cfg = DataConfig(sources=[SourceConfig(format="hf", path=str(path))], val_fraction=0.0, pack=False,
                     max_seq_len=256)
    tokenizer = Tokenizer.from_dir(rm_tokenizer_dir)
    dataset = build_sft_dataset(cfg, tokenizer, seed=0)
    assert len(dataset.train) == 3  # two assistant turns, then one
    spans = sorted(tokenizer.decode([t for t, label in zip(seq.input_ids, seq.labels) if label != IGNORE_INDEX])
                   for seq in dataset.train)
    assert [span.strip().removesuffix(tokenizer.decode([tokenizer.eos_id])).strip() for span in spans] == \
        ["Blue.", "Hello.", "Paris."]


# ---------------------------------------------------------------------------- errors


def test_a_malformed_row_names_dataset_split_and_row(hub, tmp_path):
    rows = [{"messages": CHATS[1]["messages"]}, {"messages": [{"role": "user", "content": 7}]}]
    dataset_repo(hub, tmp_path, "org/chats", {"data/train.jsonl": rows})
    with pytest.raises(DataError, match=r"^org/chats:train:2: expected 'content' to be str \(got int\)$"):
        read_sft_source("hf", "org/chats")


def test_an_unknown_split_or_layout_is_one_line(hub, tmp_path):
    dataset_repo(hub, tmp_path, "org/chats", {"data/train.jsonl": CHATS})
    with pytest.raises(DataError, match=r"^org/chats:validation: expected a split and subset the dataset has"):
        read_sft_source("hf", "org/chats", split="validation")
    with pytest.raises(ConfigError, match=r"^layout: cannot tell how to read org/chats:train as preference data "
                                          r"from its columns \['messages'\]"):
        read_preference_source("hf", "org/chats")
    with pytest.raises(ConfigError, match="'dolly' is not a layout of preference data"):
        read_preference_source("hf", "org/chats", layout="dolly")
    dataset_repo(hub, tmp_path, "org/mixed", {"data/train-0.jsonl": CHATS, "data/train-1.jsonl": DOLLY})
    with pytest.raises(DataError, match=r"^org/mixed:train: expected files that datasets can read \(.+\)$"):
        read_sft_source("hf", "org/mixed")


def test_a_dataset_missing_offline_is_one_line_saying_how_to_fix_it(hub):
    with pytest.raises(ConfigError) as err:
        read_sft_source("hf", "org/absent@v1")
    message = str(err.value)
    assert "\n" not in message and message.startswith("path: org/absent@v1 is not in the Hugging Face cache")
    assert "(hf download org/absent --repo-type dataset --revision v1)" in message
    assert message.endswith("or point path at a local copy")


def test_a_missing_local_file_is_not_looked_up_on_the_hub(hub, tmp_path):
    with pytest.raises(DataError, match=rf"^{tmp_path}/none.parquet: expected a hub dataset id"):
        read_sft_source("hf", str(tmp_path / "none.parquet"))


def test_without_the_datasets_package_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ConfigError, match=r"pip install 'offline-rlhf\[hub\]'"):
        load_split("databricks/databricks-dolly-15k")


def test_source_configs_carry_the_hub_options_for_hf_only():
    source = SourceConfig(format="hf", path="Anthropic/hh-rlhf", split="test", data_dir="harmless-base")
    hub = {"split": "test", "subset": "", "data_dir": "harmless-base", "layout": "auto"}
    assert hub_options(source, "preference") == {**hub, "prompt_key": "prompt", "chosen_key": "chosen",
                                                 "rejected_key": "rejected"}
    assert hub_options(source, "sft") == {**hub, "prompt_key": "prompt", "response_key": "response",
                                          "messages_key": "messages"}
    assert hub_options(replace(source, format="jsonl"), "sft") == {}
    with pytest.raises(ConfigError, match=r"data.sources\[Anthropic/hh-rlhf\].layout: unknown layout 'tree'"):
        SourceConfig(format="hf", path="Anthropic/hh-rlhf", layout="tree")


# ---------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("stage, data, family", [("sft", "sft_public", "sft"), ("rm", "hh_rlhf", "preference"),
                                                 ("rm", "hub_preferences", "preference")])
def test_the_hub_data_configs_compose_and_name_what_is_missing_offline(hub, stage, data, family):
    from offline_rlhf.config.compose import compose_stage
    from offline_rlhf.config.training import RMConfig, SFTConfig

    cfg = compose_stage(stage, {"sft": SFTConfig, "rm": RMConfig}[stage], [f"data={data}"])
    read = read_sft_source if family == "sft" else read_preference_source
    for source in cfg.data.sources:
        assert source.format == "hf" and "/" in source.path
        with pytest.raises(ConfigError) as err:
            read(source.format, source.path, **hub_options(source, family), **source_key(source, "data.sources"))
        key = f"data.sources[{source.name or source.path}].path"
        assert str(err.value).startswith(f"{key}: {source.path} is not in the Hugging Face cache")
        assert str(err.value).endswith(f"or point {key} at a local copy") and "\n" not in str(err.value)


def test_eval_s_hub_prompts_missing_offline_name_its_prompts_key(hub):
    with pytest.raises(ConfigError, match=r"^prompts: org/absent is not in the Hugging Face cache.*point prompts at"):
        read_prompt_turns("sft", "hf", "org/absent", ChatTemplate(), key="prompts", split="validation")
