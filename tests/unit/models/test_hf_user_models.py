"""Hugging Face models as users bring them: generation_config.json's extra EOS ids, reward
models whose pad token is EOS or that have none, a local folder changed after its import,
a reward model given to SFT, tokenizers without a pad token or with their special tokens
only in special_tokens_map.json, and a tokenizer larger than the model. Tiny random models."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import transformers

from offline_rlhf.checkpoint import read_meta, resolve_checkpoint
from offline_rlhf.cli import main as cli
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import GenerationConfig, InitConfig, ModelConfig, ParallelConfig
from offline_rlhf.config.serving import ServeConfig
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import stop_token_ids
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.generation.engine import generate
from offline_rlhf.labeling.scoring import encode_responses, reward_checkpoint, scoring_setup
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.serving.model import load_served_model
from offline_rlhf.stage_checks import load_tokenizer, tokenizer_dir
from offline_rlhf.stage_support import local_init, model_config
from offline_rlhf.stages.convert import export_hf
from offline_rlhf.train.init import prepare_training
from tests.fixtures import runtime_for
from tests.synthetic_preferences import VOCAB
from tests.unit.models.test_hf_convert import tiny_hf_model

PAD, BOS, EOS = 0, 1, 2  # the synthetic tokenizer's special tokens (<|pad|>, <|bos|>, <|eos|>)


def tokenizer_copy(source, out, **roles):
    """The tokenizer at `source` copied to `out`, with `roles` (pad_token="<|eos|>", or None
    to remove one) set in both tokenizer_config.json and special_tokens_map.json."""
    shutil.copytree(source, out, dirs_exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((out / name).read_text())
        config.update(roles)
        (out / name).write_text(json.dumps({key: value for key, value in config.items() if value is not None}))
    return out


def hf_folder(out, tokenizer, task="CausalLM", seed=0, **config):
    """A tiny transformers model of the synthetic tokenizer's vocabulary saved in `out`
    beside a copy of `tokenizer`'s files; returns the transformers model."""
    torch.manual_seed(seed)
    model = tiny_hf_model("llama", task=task, **{"vocab_size": VOCAB, "bos_token_id": BOS, "eos_token_id": EOS,
                                                 **config})
    if seed:  # tiny_hf_model seeds 0: other weights for the same architecture
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
    model.save_pretrained(out)
    shutil.copytree(tokenizer, out, dirs_exist_ok=True)
    return model


# ---------------------------------------------------------------------------- generation_config.json


def test_generation_config_eos_ids_end_answers(tmp_path, rm_tokenizer_dir):
    hf_folder(tmp_path / "hf", rm_tokenizer_dir)
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, 112]}))
    init = local_init(InitConfig(checkpoint=str(tmp_path / "hf")), tmp_path / "run")
    tokenizer = Tokenizer.from_dir(tokenizer_dir(init))  # as generate, eval, serve and PPO read it
    assert stop_token_ids(tokenizer, ChatTemplate()) == {EOS, 112}


@pytest.mark.parametrize("value", [[EOS, "112"], 100_000, True, [EOS, -1]])
def test_a_bad_generation_config_eos_id_is_one_line_naming_the_file(tmp_path, rm_tokenizer_dir, value):
    path = tokenizer_copy(rm_tokenizer_dir, tmp_path / "tok")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
    with pytest.raises(ConfigError) as err:
        Tokenizer.from_dir(path)
    assert str(err.value).startswith(f"{path / 'generation_config.json'}: eos_token_id")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- reward models


def rm_scores_against_transformers(tmp_path, tokenizer, **config):
    """`orlhf rm-score` of an imported transformers reward model, and transformers' scores
    of the same token ids, one sequence at a time (no padding)."""
    hf = hf_folder(tmp_path / "hf", tokenizer, task="SequenceClassification", **config)
    assert cli(["convert", "import_hf", f"hf_dir={tmp_path / 'hf'}", f"out={tmp_path / 'rm'}", "head=value"]) == 0
    records = [{"prompt": "what is it", "response": "a good answer"}, {"prompt": "a", "response": "b"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert cli(["rm-score", f"run_dir={tmp_path / 'run'}", f"ckpt={tmp_path / 'rm'}", f"input={tmp_path / 'in.jsonl'}",
                f"output={tmp_path / 'out.jsonl'}", "batch_size=2"]) == 0
    ours = [json.loads(line)["reward_raw"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    path, meta, ours_tokenizer = reward_checkpoint(str(tmp_path / "rm"))
    template, max_len = scoring_setup(meta.metadata, meta.model, ours_tokenizer)
    sequences = encode_responses(ours_tokenizer, template, [(r["prompt"], r["response"]) for r in records], max_len)
    assert all(sequence.input_ids[-1] == EOS for sequence in sequences)
    with torch.no_grad():
        theirs = [hf(torch.tensor([sequence.input_ids])).logits[0, 0].item() for sequence in sequences]
    return ours, theirs


def test_a_reward_model_whose_pad_is_eos_scores_as_transformers(tmp_path, rm_tokenizer_dir, capsys):
    tokenizer = tokenizer_copy(rm_tokenizer_dir, tmp_path / "tok", pad_token="<|eos|>")
    ours, theirs = rm_scores_against_transformers(tmp_path, tokenizer, pad_token_id=EOS)
    assert ours == pytest.approx(theirs, abs=1e-4)  # read at the token before the trailing EOS
    assert "scored at the last token before a trailing EOS" in capsys.readouterr().out


def test_a_reward_model_whose_pad_is_eos_exports_without_a_false_warning(tmp_path, rm_tokenizer_dir):
    """The export warned that transformers would score another token than ours; an import
    that recorded `scored_before_token` is scored where transformers scores it."""
    tokenizer = tokenizer_copy(rm_tokenizer_dir, tmp_path / "tok", pad_token="<|eos|>")
    hf_folder(tmp_path / "hf", tokenizer, task="SequenceClassification", pad_token_id=EOS)
    assert cli(["convert", "import_hf", f"hf_dir={tmp_path / 'hf'}", f"out={tmp_path / 'rm'}", "head=value"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_hf(tmp_path / "rm", tmp_path / "out", head="value")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pad_token_id"] == EOS


def test_a_reward_model_without_a_pad_token_scores(tmp_path, rm_tokenizer_dir):
    tokenizer = tokenizer_copy(rm_tokenizer_dir, tmp_path / "tok", pad_token=None)
    ours, theirs = rm_scores_against_transformers(tmp_path, tokenizer, pad_token_id=None)
    assert ours == pytest.approx(theirs, abs=1e-4)  # read at the EOS, as a distinct pad token reads it


def test_sft_from_a_reward_model_is_one_line_naming_the_heads(tmp_path, rm_tokenizer_dir):
    hf_folder(tmp_path / "rm", rm_tokenizer_dir, task="SequenceClassification")
    hf_folder(tmp_path / "lm", rm_tokenizer_dir)
    rt = runtime_for(ParallelDims(dp=1, tp=1), None, tmp_path / "run" / "sft")
    init = local_init(InitConfig(checkpoint=str(tmp_path / "rm")), tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        prepare_training(init, model_config(init, None), "lm", rt, seed=0)
    assert "is a reward model (value head); sft needs a language model (lm head)" in str(err.value)
    assert "\n" not in str(err.value)
    for source in ("lm", "rm"):  # a reward model starts from a language model or another reward model
        init = local_init(InitConfig(checkpoint=str(tmp_path / source)), tmp_path / "run")
        setup = prepare_training(init, model_config(init, None), "value", rt, seed=0)
        assert setup.model.head == "value"


# ---------------------------------------------------------------------------- imports


def test_a_local_folder_changed_after_its_import_is_refused(tmp_path, rm_tokenizer_dir, capsys):
    hf_folder(tmp_path / "hf", rm_tokenizer_dir)
    init = local_init(InitConfig(checkpoint=str(tmp_path / "hf")), tmp_path / "run")
    assert local_init(InitConfig(checkpoint=str(tmp_path / "hf")), tmp_path / "run") == init
    assert f"init.checkpoint: reusing the import of {tmp_path / 'hf'} made at " in capsys.readouterr().out
    hf_folder(tmp_path / "hf", rm_tokenizer_dir, seed=7)  # re-exported with other weights
    with pytest.raises(ConfigError) as err:
        local_init(InitConfig(checkpoint=str(tmp_path / "hf")), tmp_path / "run")
    assert f"{tmp_path / 'hf'} changed since it was imported" in str(err.value)
    assert f"delete {tmp_path / 'run' / 'imported'}" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------- tokenizers


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tmp_path, rm_tokenizer_dir, capsys):
    hf_folder(tmp_path / "hf", tokenizer_copy(rm_tokenizer_dir, tmp_path / "tok", pad_token=None))
    init = local_init(InitConfig(checkpoint=str(tmp_path / "hf")), tmp_path / "run")
    tokenizer, path = load_tokenizer(init, model_config(init, None))
    assert (tokenizer.pad_id, tokenizer.eos_id) == (EOS, EOS)
    assert f"init.tokenizer: {path} defines no pad token; padding with its eos token" in capsys.readouterr().out
    assert "pad_token" not in json.loads((path / "tokenizer_config.json").read_text())  # the files stay


def test_a_tokenizer_without_eos_is_named_so(tmp_path, rm_tokenizer_dir):
    tokenizer = tokenizer_copy(rm_tokenizer_dir, tmp_path / "tok", eos_token=None)
    with pytest.raises(ConfigError, match="defines no eos token .*; pass init.tokenizer=DIR"):
        load_tokenizer(InitConfig(tokenizer=str(tokenizer)), ModelConfig(vocab_size=VOCAB))


def test_special_tokens_only_in_special_tokens_map_are_read_as_transformers_reads_them(tmp_path, rm_tokenizer_dir):
    path = tokenizer_copy(rm_tokenizer_dir, tmp_path / "tok")
    config = json.loads((path / "tokenizer_config.json").read_text())
    for role in ("bos_token", "eos_token", "pad_token"):
        config.pop(role)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_dir(path)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id,
                                                       theirs.pad_token_id) == (BOS, EOS, PAD)


def test_a_tokenizer_larger_than_the_init_checkpoint_is_not_its_own(tmp_path, rm_tokenizer_dir):
    hf_folder(tmp_path / "hf", rm_tokenizer_dir, vocab_size=VOCAB - 20)
    init = local_init(InitConfig(checkpoint=str(tmp_path / "hf")), tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        load_tokenizer(init, model_config(init, None))
    message = str(err.value)
    assert message.startswith(f"init.tokenizer: {tokenizer_dir(init)}, the tokenizer saved with the checkpoint, has ")
    assert "model.vocab_size" not in message
    assert "they do not belong together; pass init.tokenizer=DIR" in message
    init = local_init(InitConfig(checkpoint=str(tmp_path / "hf"), tokenizer=str(rm_tokenizer_dir)), tmp_path / "run")
    with pytest.raises(ConfigError, match="it is not this checkpoint's tokenizer; leave init.tokenizer unset"):
        load_tokenizer(init, model_config(init, None))


@pytest.mark.parametrize("decoder", [False, True], ids=["map_wins", "added_tokens_decoder_ignores_map"])
def test_where_both_files_name_eos_the_same_one_wins_as_in_transformers(tmp_path, rm_tokenizer_dir, decoder):
    """transformers reads special_tokens_map.json over tokenizer_config.json, unless
    tokenizer_config.json has an `added_tokens_decoder` (then it ignores the map)."""
    path = tokenizer_copy(rm_tokenizer_dir, tmp_path / "tok")
    config = {**json.loads((path / "tokenizer_config.json").read_text()), "eos_token": "<|pad|>"}
    if decoder:
        config["added_tokens_decoder"] = {str(EOS): {"content": "<|eos|>", "lstrip": False, "normalized": False,
                                                     "rstrip": False, "single_word": False, "special": True}}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    assert Tokenizer.from_dir(path).eos_id == theirs.eos_token_id == (PAD if decoder else EOS)


def test_a_model_whose_tokenizer_has_no_pad_token_serves(tmp_path, rm_tokenizer_dir):
    """serve (and eval) passed the tokenizer's pad id, None, to the engine's left padding."""
    hf_folder(tmp_path / "hf", tokenizer_copy(rm_tokenizer_dir, tmp_path / "tok", pad_token=None))
    assert cli(["convert", "import_hf", f"hf_dir={tmp_path / 'hf'}", f"out={tmp_path / 'lm'}"]) == 0
    path = resolve_checkpoint(tmp_path / "lm")
    rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, read_meta(path).model), None, tmp_path / "serve")
    served = load_served_model(ServeConfig(ckpt=str(path)), path, rt)
    assert served.tokenizer.pad_id == EOS
    prompts = [served.tokenizer.encode(text, add_bos=True) for text in ("a longer prompt here", "hi")]
    answers = generate(served.model, prompts, GenerationConfig(max_new_tokens=4), EOS, served.tokenizer.pad_id, "cpu")
    assert len(answers) == 2 and all(1 <= len(answer) <= 4 for answer in answers)
