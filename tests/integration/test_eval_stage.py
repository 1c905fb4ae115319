"""`orlhf eval` through the CLI on tiny random checkpoints: a DT model's target score comes
from its checkpoint (final or intermediate) unless reward_prompt overrides it, a DT
checkpoint without one and a missing checkpoint fail before any model answers, answers
cut off at max_new_tokens are counted, and plug-in gold rewards score every answer."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from offline_rlhf.checkpoint import CONFIG_KEY, CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.cli import main
from offline_rlhf.config.schema import TemplateConfig
from offline_rlhf.data.chat_template import build_template
from offline_rlhf.data.prompts import read_prompt_turns
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import encode_sft, fit_prompt
from offline_rlhf.data.tokenizer import Tokenizer, train_bpe_tokenizer
from offline_rlhf.eval.gold import load_gold
from offline_rlhf.labeling.scoring import scoring_metadata
from offline_rlhf.progress import PREFIX as PROGRESS
from tests.fixtures import reference_model
from tests.local_data import OASST_TREES
from tests.synthetic_preferences import FILLER, MODEL, synthetic_tokenizer
from tests.unit.data.test_chat_template import CHATML
from tests.unit.data.test_hub_datasets import dataset_repo, oasst_message_table
from tests.unit.eval.gold_plugins import Scorers, tiny_hf_reward_model
from tests.unit.test_hub import offline_hub

SCALE = 0.5
QA = {"user_tag": "Q:", "assistant_tag": "A:", "sep": " "}
STOP = "somet"  # some answers of this random model hold it: they end there, the others run to max_new_tokens
PLUGIN = "tests.unit.eval.gold_plugins:Scorers.length"
METADATA = {"sft": {}, "dt": {"alignment": {"method": "dt", "dt_target": 2.0}},
            "dt_mid": {CONFIG_KEY: {"method": "dt", "dt_target": -3.0}},  # an intermediate step of a DT run
            "dt_broken": {"alignment": {"method": "dt", "dt_target": None}},
            "sft_qa": {"template": QA}}  # the chat template it was trained with travels with it


def sharp_model():
    """A random `lm` model whose weights are large enough that its greedy answers depend on
    the prompt (at the usual init scale every prompt gets the same answer)."""
    model = reference_model(MODEL, "lm")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * SCALE)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One random `lm` model saved four times with different metadata; prompts."""
    root = tmp_path_factory.mktemp("eval_stage")
    synthetic_tokenizer(root / "tokenizer")
    for name, metadata in METADATA.items():
        save_checkpoint(root / name, sharp_model(), CheckpointMeta(MODEL, "lm", TrainState(), metadata=metadata),
                        tokenizer_dir=root / "tokenizer")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n"
                                                for w in FILLER))
    return root


def evaluate(files, run_dir, models: dict[str, str], *extra: str) -> int:
    listed = ", ".join(f"{{name: {name}, checkpoint: '{files / ckpt.split(':')[0]}'"
                       + (f", reward_prompt: {ckpt.split(':')[1]}}}" if ":" in ckpt else "}")
                       for name, ckpt in models.items())
    return main(["eval", f"run_dir={run_dir}", f"prompts={files / 'prompts.jsonl'}", "prompt_key=prompt", "rm=",
                 "generation.max_new_tokens=8",
                 "bootstrap_samples=50", f"models=[{listed}]", *extra])


def answers(run_dir, model):
    return [json.loads(line) for line in (run_dir / "eval" / f"answers_{model}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluated(files, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    assert evaluate(files, run_dir, {"sft": "sft", "dt": "dt", "dt_same": "dt:2.0", "dt_other": "dt:-3.0",
                                     "dt_mid": "dt_mid"}, f"gold={PLUGIN}", f"generation.stop=[{STOP}]") == 0
    return run_dir


def test_dt_target_comes_from_the_checkpoint_unless_overridden(evaluated):
    responses = {m: [a["response"] for a in answers(evaluated, m)] for m in ("dt", "dt_same", "dt_other", "dt_mid")}
    assert responses["dt"] == responses["dt_same"]  # metadata target 2.0 == explicit reward_prompt 2.0
    assert responses["dt"] != responses["dt_other"]  # and the prompt matters
    assert responses["dt_mid"] == responses["dt_other"]  # an intermediate checkpoint's config says -3.0
    models = json.loads((evaluated / "eval" / "results.json").read_text())["models"]
    assert {name: (m["reward_prompt"], m["reward_prompt_from"]) for name, m in models.items()} == {
        "sft": (None, None), "dt": (2.0, "checkpoint"), "dt_same": (2.0, "config"), "dt_other": (-3.0, "config"),
        "dt_mid": (-3.0, "checkpoint")}


def test_a_checkpoint_s_recorded_template_is_used(files, evaluated, tmp_path):
    same = (f"gold={PLUGIN}", f"generation.stop=[{STOP}]")  # as `evaluated` ran, apart from the template
    tags = [f"template.{key}={value}" for key, value in QA.items() if key != "sep"]
    assert evaluate(files, tmp_path / "configured", {"sft": "sft"}, *same, *tags) == 0
    assert evaluate(files, tmp_path / "recorded", {"sft": "sft_qa"}, *same) == 0
    configured, recorded = (answers(tmp_path / run, "sft") for run in ("configured", "recorded"))
    assert recorded == configured != answers(evaluated, "sft")


def test_cut_off_answers_are_counted_per_model(evaluated):
    results = json.loads((evaluated / "eval" / "results.json").read_text())
    markdown = (evaluated / "eval" / "results.md").read_text()
    for name, info in results["models"].items():
        unfinished = sum(not a["finished"] for a in answers(evaluated, name))
        assert info["cut_off"] == unfinished
        assert f"| {unfinished}/{len(FILLER)} |" in next(line for line in markdown.splitlines()
                                                         if line.startswith(f"| {name} |"))
    counts = [info["cut_off"] for info in results["models"].values()]
    assert 0 < sum(counts) < len(FILLER) * len(counts), counts  # both kinds of answer are there


def test_several_samples_per_prompt_are_scored_and_averaged_per_prompt(files, tmp_path):
    """Was: generation.n was ignored (one answer per prompt, silently). Each prompt's score
    is the mean of its samples', and statistics run over prompts; sample 0 is the answer an
    n=1 run samples."""
    sampled = (f"gold={PLUGIN}", f"generation.stop=[{STOP}]", "generation.greedy=false")
    assert evaluate(files, tmp_path / "one", {"sft": "sft"}, *sampled) == 0
    assert evaluate(files, tmp_path / "three", {"sft": "sft", "dt": "dt"}, *sampled, "generation.n=3") == 0
    records = answers(tmp_path / "three", "sft")
    assert [r["sample"] for r in records] == [0, 1, 2] * len(FILLER)
    assert [r["response"] for r in records[::3]] == [r["response"] for r in answers(tmp_path / "one", "sft")]
    assert len({r["response"] for r in records}) > len(FILLER)  # the samples differ
    results = json.loads((tmp_path / "three" / "eval" / "results.json").read_text())
    per_prompt = [statistics.fmean(r["gold"] for r in records[at:at + 3]) for at in range(0, len(records), 3)]
    gold = results["table"]["sft"]["gold"]
    assert gold["n"] == len(FILLER) and gold["mean"] == pytest.approx(statistics.fmean(per_prompt))
    assert gold["stderr"] == pytest.approx(statistics.stdev(per_prompt) / len(FILLER) ** 0.5)
    assert (results["samples_per_prompt"], results["answers"]) == (3, 3 * len(FILLER))
    cut_off = sum(not r["finished"] for r in records)
    assert results["models"]["sft"]["cut_off"] == cut_off
    assert f"| {cut_off}/{3 * len(FILLER)} |" in (tmp_path / "three" / "eval" / "results.md").read_text()


def test_prompts_too_long_for_the_context_are_cut_and_counted(files, tmp_path, capsys):
    long = " ".join(FILLER * (MODEL.max_seq_len // len(FILLER) + 1))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hi.", long, "Bye.")))
    assert main(["eval", f"run_dir={tmp_path}", f"prompts={tmp_path / 'prompts.jsonl'}", "prompt_key=prompt", "rm=",
                 f"gold={PLUGIN}", "generation.max_new_tokens=8", "bootstrap_samples=10",
                 f"models=[{{name: sft, checkpoint: '{files / 'sft'}'}}]"]) == 0
    assert [a["prompt_truncated"] for a in answers(tmp_path, "sft")] == [False, True, False]
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["models"]["sft"]["prompts_truncated"] == 1
    printed = capsys.readouterr()
    assert f"eval: 1 of 3 prompts were cut to fit sft's context (max_seq_len {MODEL.max_seq_len} - " \
           "max_new_tokens 8)" in printed.out
    # Progress as answers end (was: nothing for the whole of a model's answers).
    assert f"{PROGRESS}eval sft: answer 3/3 (100%)" in printed.err


def test_a_plugin_gold_reward_scores_every_answer(evaluated):
    results = json.loads((evaluated / "eval" / "results.json").read_text())
    for name in results["models"]:
        records = answers(evaluated, name)
        assert [r["gold"] for r in records] == [Scorers.length(r["prompt"], r["response"]) for r in records]
        assert results["table"][name]["gold"]["n"] == len(FILLER)
    assert results["gold"] == PLUGIN and set(results["table"]["dt"]["gold"]) >= {"difference_stderr", "win_rate_low"}


def test_a_hugging_face_reward_model_as_gold(files, tmp_path):
    hf_rm = tiny_hf_reward_model(tmp_path / "hf_rm")
    assert evaluate(files, tmp_path / "run", {"sft": "sft"}, f"gold=hf_rm:{hf_rm}") == 0
    records = answers(tmp_path / "run", "sft")
    direct = load_gold(f"hf_rm:{hf_rm}", "cpu", 1, ChatTemplate())  # one answer at a time
    assert [r["gold"] for r in records] == pytest.approx(
        direct.score([(r["prompt"], r["response"]) for r in records], [r["finished"] for r in records]), abs=1e-5)


def test_a_hugging_face_gold_model_is_on_the_device_only_while_it_scores(files, tmp_path, monkeypatch):
    """Its weights went to rank 0's device when loaded, before any model answered, and took
    memory from every model's generation (weights, KV cache, CUDA graphs). The real load
    path runs; `cpu:0` stands for the device, the gold model's moves and the answering
    engine's runs are logged in order."""
    import transformers

    import offline_rlhf.stages.eval as stage

    hf_rm = tiny_hf_reward_model(tmp_path / "hf_rm")
    events = []
    real_to, real_run, real_load = transformers.PreTrainedModel.to, stage.run, stage.load_gold

    def to(model, device, *args, **kwargs):
        events.append(f"to {device}")
        return real_to(model, device, *args, **kwargs)

    def run(*args, **kwargs):
        events.append("answer")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "to", to)
    monkeypatch.setattr(stage, "run", run)
    monkeypatch.setattr(stage, "load_gold", lambda spec, device, *rest: real_load(spec, torch.device("cpu", 0), *rest))
    assert evaluate(files, tmp_path / "run", {"sft": "sft", "dt": "dt"}, f"gold=hf_rm:{hf_rm}") == 0
    assert events == ["answer", "answer", "to cpu:0", "to cpu", "to cpu:0", "to cpu"]  # a model's answers each
    assert all(isinstance(r["gold"], float) for name in ("sft", "dt") for r in answers(tmp_path / "run", name))


def test_a_dt_checkpoint_without_a_target_fails_before_any_answer(files, tmp_path, capsys):
    assert evaluate(files, tmp_path, {"sft": "sft", "dt_broken": "dt_broken"}, f"gold={PLUGIN}") == 2
    err = capsys.readouterr().err.strip()
    assert f"{files / 'dt_broken'}/step_00000000 is a Decision-Transformer checkpoint whose metadata records no " \
           "target score (dt_target: None)" in err and "reward_prompt" in err and "\n" not in err
    assert not (tmp_path / "eval").exists()
    assert evaluate(files, tmp_path, {"sft": "sft", "dt_broken": "dt_broken:1.0"}, f"gold={PLUGIN}") == 0


def test_a_missing_checkpoint_fails_before_any_answer(files, tmp_path, capsys):
    missing = tmp_path / "no_such_run" / "checkpoints"
    assert evaluate(files, tmp_path, {"sft": "sft", "late": str(missing)}, f"gold={PLUGIN}") == 2  # an absolute path
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"orlhf eval: error: models[late].checkpoint: {missing} is neither a checkpoint") and \
        "\n" not in err
    assert not (tmp_path / "eval").exists()


def test_multi_turn_hub_prompts_are_answered_and_scored_as_their_turns(tmp_path, monkeypatch):
    """template.kind=chat with oasst1 conversations as the held-out prompts: each model is
    prompted with a prompt's turns as messages and the reward model scores them with its
    turns, as SFT and RM training rendered them; answers files keep the turns."""
    import offline_rlhf.labeling.scoring as scoring
    import offline_rlhf.stages.eval as stage

    dataset_repo(offline_hub(monkeypatch, tmp_path / "hub"), tmp_path, "OpenAssistant/oasst1",
                 {"data/validation-00000-of-00001.parquet": oasst_message_table(OASST_TREES)})
    folder = tmp_path / "tokenizer"
    train_bpe_tokenizer([OASST_TREES], MODEL.vocab_size, folder,
                        special_tokens=("<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>"))
    tokenizer = Tokenizer.from_dir(folder)
    tokenizer.config["chat_template"] = CHATML
    tokenizer.save(folder)
    chat = build_template(TemplateConfig(kind="chat"), tokenizer.config)
    for name, head in (("sft", "lm"), ("rm", "value")):
        save_checkpoint(tmp_path / name, reference_model(MODEL, head),
                        CheckpointMeta(MODEL, head, TrainState(), metadata=scoring_metadata(chat, MODEL.max_seq_len)),
                        tokenizer_dir=folder)
    requests, scored = [], []
    engine_run, score = stage.run, scoring.score_sequences
    monkeypatch.setattr(stage, "run", lambda model, batch, *args, **kw: requests.extend(batch) or
                        engine_run(model, batch, *args, **kw))
    monkeypatch.setattr(scoring, "score_sequences", lambda model, sequences, *args: scored.extend(sequences) or
                        score(model, sequences, *args))
    assert main(["eval", f"run_dir={tmp_path / 'run'}", "prompts=OpenAssistant/oasst1", "prompts_kind=sft",
                 "prompts_split=validation", f"rm={tmp_path / 'rm'}", "generation.max_new_tokens=2",
                 "bootstrap_samples=10", f"models=[{{name: sft, checkpoint: '{tmp_path / 'sft'}'}}]"]) == 0

    prompts = read_prompt_turns("sft", "oasst", str(OASST_TREES), ChatTemplate())
    records = answers(tmp_path / "run", "sft")
    assert len(requests) == len(scored) == len(records) == len(prompts)
    budget = MODEL.max_seq_len - 2
    for (text, turns), request, sequence, record in zip(prompts, requests, scored, records):
        assert request.prompt == fit_prompt(tokenizer, chat, text, budget, turns=turns)[0]  # unit-tested
        assert sequence.input_ids == encode_sft(tokenizer, chat, text, record["response"], MODEL.max_seq_len, "x",
                                                eos=record["finished"], turns=turns).input_ids
        assert (record["prompt"], [tuple(t) for t in record.get("turns", [])]) == (text, list(turns))
    multi = [(text, turns) for text, turns in prompts if turns]
    assert multi and any(fit_prompt(tokenizer, chat, text, budget, turns=turns) !=
                         fit_prompt(tokenizer, chat, text, budget) for text, turns in multi)
