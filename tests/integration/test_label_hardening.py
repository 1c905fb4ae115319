"""`orlhf label` and `orlhf rm` through the CLI on data with one degenerate pair, generations cut
at max_new_tokens and over-long samples: counted and reported, not fatal; `strict=true` restores
the error; cut-off generations are left out by default and, kept, scored without an EOS."""

import json
from types import SimpleNamespace

import pytest

from offline_rlhf.checkpoint import CheckpointMeta, TrainState, save_checkpoint
from offline_rlhf.cli import main
from offline_rlhf.data.packing import unpacked
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import encode_sft
from offline_rlhf.labeling.scoring import load_reward_model, score_sequences
from offline_rlhf.parallel.dims import ParallelDims
from tests.fixtures import reference_model, runtime_for
from tests.local_data import jsonl_data
from tests.synthetic_preferences import MODEL, preference_records, synthetic_tokenizer

pytestmark = pytest.mark.slow
IDENTICAL_LINE = 4  # 1-based line of the identical pair in pairs.jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random value-head checkpoint, generated samples (two cut off, one over-long) and
    preference pairs with one identical pair."""
    root = tmp_path_factory.mktemp("label_hardening")
    synthetic_tokenizer(root / "tokenizer")
    save_checkpoint(root / "rm", reference_model(MODEL, "value"), CheckpointMeta(MODEL, "value", TrainState()),
                    tokenizer_dir=root / "tokenizer")
    generated = [{"prompt": f"Say something about {w}.", "response": f"good {w} river stone", "finished": True}
                 for w in ("apple", "paper", "music")]
    generated += [{"prompt": "Say something about light.", "response": "light table green", "finished": False},
                  {"prompt": "Say something about cloud.", "response": "cloud window", "finished": False},
                  {"prompt": " ".join(["apple river stone"] * 40), "response": "long", "finished": True}]
    (root / "generated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in generated))
    pairs = preference_records(10)
    pairs[IDENTICAL_LINE - 1]["rejected"] = pairs[IDENTICAL_LINE - 1]["chosen"]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return root


def label(files, out, *extra):
    return main(["label", f"run_dir={out}", f"rm={files / 'rm'}", "parallel.dp=1",
                 f"inputs=[{{name: gen, kind: generated, path: {files}/generated.jsonl}},"
                 f" {{name: pairs, kind: preference, format: jsonl, path: {files}/pairs.jsonl}}]", *extra])


def outputs(out):
    records = [json.loads(line) for line in (out / "label" / "labeled.jsonl").read_text().splitlines()]
    return records, json.loads((out / "label" / "labels_meta.json").read_text())


def test_identical_pair_and_cut_off_generations_are_left_out_and_counted(files, tmp_path, capsys):
    assert label(files, tmp_path) == 0
    records, meta = outputs(tmp_path)
    assert sum(r["kind"] == "generated" for r in records) == 4 and sum(r["kind"] == "chosen" for r in records) == 9
    assert all("finished" not in r for r in records)
    assert meta["skipped"] == {"gen": {"unfinished (cut at max_new_tokens)": 2},
                               "pairs": {"identical chosen and rejected": 1}}
    assert meta["truncated"] == 1 and meta["unfinished_kept"] == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("label done:") and "1 of 22 truncated to 64 tokens" in last
    assert "3 skipped (1 identical chosen and rejected, 2 unfinished (cut at max_new_tokens))" in last


def test_strict_refuses_the_identical_pair_in_one_line(files, tmp_path, capsys):
    assert label(files, tmp_path, "strict=true") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"orlhf label: error: {files}/pairs.jsonl:{IDENTICAL_LINE}: "
                   "expected 'chosen' and 'rejected' to differ (identical)")


def test_kept_cut_off_generations_are_marked_and_scored_without_eos(files, tmp_path):
    assert label(files, tmp_path, "include_unfinished=true") == 0
    records, meta = outputs(tmp_path)
    unfinished = [r for r in records if r.get("finished") is False]
    assert [r["response"] for r in unfinished] == ["light table green", "cloud window"]
    assert meta["unfinished_kept"] == 2 and meta["skipped"]["gen"] == {}
    rt = runtime_for(ParallelDims(dp=1, tp=1), None)
    model, tokenizer, _ = load_reward_model(str(files / "rm"), rt)
    for record in unfinished:
        cut, ended = (encode_sft(tokenizer, ChatTemplate(), record["prompt"], record["response"], 64, "t", eos=eos)
                      for eos in (False, True))
        assert cut.input_ids[-1] != tokenizer.eos_id and ended.input_ids == cut.input_ids + (tokenizer.eos_id,)
        without, with_eos = score_sequences(model, unpacked([cut, ended]), 2, rt, tokenizer.pad_id)
        assert abs(record["reward_raw"] - without) < 1e-4 and abs(record["reward_raw"] - with_eos) > 1e-4


def rm_eval(files, out, *extra):
    return main(["rm", f"run_dir={out}", "eval_only=true", f"init.checkpoint={files / 'rm'}", "parallel.dp=1",
                 jsonl_data("pairs", files / "pairs.jsonl"),
                 "data.max_seq_len=64", "logging.progress=false", *extra])


def test_rm_counts_the_identical_pair_and_strict_refuses_it(files, tmp_path, capsys):
    assert rm_eval(files, tmp_path / "lenient") == 0
    card = json.loads((tmp_path / "lenient" / "rm_eval" / "dataset_card.json").read_text())
    assert card["totals"]["taken"] == 9 and card["skip_reasons"] == {"pairs": {"identical chosen and rejected": 1}}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("rm eval: 9 pairs") and "1 skipped (1 identical chosen and rejected)" in last
    assert rm_eval(files, tmp_path / "strict", "data.strict=true") == 2
    assert f"pairs.jsonl:{IDENTICAL_LINE}: expected 'chosen' and 'rejected' to differ" in capsys.readouterr().err


def test_an_input_of_only_cut_off_generations_is_one_error(files, tmp_path, capsys):
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r", "finished": False}) + "\n")
    args = ["label", f"run_dir={tmp_path}", f"rm={files / 'rm'}", f"inputs=[{{kind: generated, path: {path}}}]"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"orlhf label: error: {path}: expected at least one usable sample (1 skipped (1 unfinished (cut at "
        "max_new_tokens)); strict=true names the first, include_unfinished=true keeps cut-off ones)")


def test_rm_score_scores_cut_off_generations_without_eos(files, tmp_path):
    out = tmp_path / "scored.jsonl"
    assert main(["rm-score", f"run_dir={tmp_path}", f"ckpt={files / 'rm'}", f"input={files}/generated.jsonl",
                 f"output={out}", "parallel.dp=1"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert label(files, tmp_path / "label", "include_unfinished=true") == 0
    labeled = {(r["prompt"], r["response"]): r["reward_raw"] for r in outputs(tmp_path / "label")[0]}
    assert len(scored) == 6 and all(abs(labeled[r["prompt"], r["response"]] - r["reward_raw"]) < 1e-4 for r in scored)


def test_inputs_are_read_before_the_reward_model_is_loaded(files, tmp_path, monkeypatch, capsys):
    """A typo'd path or a malformed line fails before the (slow, at scale) model load."""
    import offline_rlhf.stages.label as stage

    loads, load = [], stage.reward_weights
    monkeypatch.setattr(stage, "reward_weights", lambda *args: loads.append(args) or load(*args))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    for path, error in ((tmp_path / "typo.jsonl", "typo.jsonl"), (bad, f"{bad}:2: expected an object with key")):
        assert main(["label", f"run_dir={tmp_path}", f"rm={files / 'rm'}",
                     f"inputs=[{{name: gen, kind: generated, path: {path}}}]"]) == 2
        assert error in capsys.readouterr().err and loads == []
    assert label(files, tmp_path / "good") == 0 and len(loads) == 1


def test_empty_answers_are_skipped_and_counted_and_scoring_shows_progress(files, tmp_path, capsys):
    path = tmp_path / "generated.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say something about {w}.", "response": r, "finished": True}) + "\n"
                            for w, r in (("apple", "good apple"), ("paper", ""), ("music", " "), ("light", "light"))))
    args = ["label", f"run_dir={tmp_path}", f"rm={files / 'rm'}", "batch_size=3",
            f"inputs=[{{name: gen, kind: generated, path: {path}}}]"]
    assert main(args) == 0
    records, meta = outputs(tmp_path)
    assert [r["response"] for r in records] == ["good apple", "light"]
    assert meta["skipped"] == {"gen": {"blank 'response'": 2}}
    out, err = capsys.readouterr()
    assert "2 skipped (2 blank 'response')" in out.strip().splitlines()[-1]
    assert "[progress] label: sample 2/2 (100%)" in err
    assert main([*args, f"run_dir={tmp_path / 'strict'}", "strict=true"]) == 2
    assert capsys.readouterr().err.strip() == (f"orlhf label: error: {path}:2: expected 'response' to be non-empty "
                                               "text (blank)")


def test_scoring_progress_counts_what_every_rank_scored(files):
    rt = runtime_for(ParallelDims(dp=1, tp=1), None)
    model, tokenizer, _ = load_reward_model(str(files / "rm"), rt)
    sequences = unpacked([encode_sft(tokenizer, ChatTemplate(), f"p{i}", "river " * (i + 1), 64, "t")
                          for i in range(11)])
    steps = []
    assert score_sequences(model, sequences, 3, rt, tokenizer.pad_id, SimpleNamespace(update=steps.append)) == \
        score_sequences(model, sequences, 3, rt, tokenizer.pad_id)
    assert steps == [3, 3, 3, 2]  # one DP rank: its batches of 3
