"""Gold rewards: the `gold=` spec is validated; a Python callable and an exported Hugging
Face reward model score exactly as direct calls do; non-finite scores and a missing
transformers are one-line errors."""

from __future__ import annotations

import sys

import pytest
import torch

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.evaluation import CALLABLE, EMBEDDED_TASK, HF_RM, GoldSpec, parse_gold
from offline_rlhf.data.embedded_task import gold_reward
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.eval.gold import HFRewardModel, load_gold
from tests.synthetic_preferences import preference_records
from tests.unit.eval import gold_plugins
from tests.unit.eval.gold_plugins import tiny_hf_reward_model

PAIRS = [(r["prompt"], r[side]) for r in preference_records(6, seed=3) for side in ("chosen", "rejected")]
CPU = torch.device("cpu")


def load(spec: str, batch_size: int = 4):
    return load_gold(spec, CPU, batch_size, ChatTemplate())


@pytest.mark.parametrize("spec, expected", [
    ("", GoldSpec("")), ("embedded_task", GoldSpec(EMBEDDED_TASK)),
    ("pkg.mod:fn", GoldSpec(CALLABLE, "pkg.mod:fn")), ("mod:Cls.method", GoldSpec(CALLABLE, "mod:Cls.method")),
    ("hf_rm:/models/rm", GoldSpec(HF_RM, "/models/rm")), ("hf_rm:rel/dir:x", GoldSpec(HF_RM, "rel/dir:x"))])
def test_gold_specs_parse(spec, expected):
    assert parse_gold(spec) == expected


@pytest.mark.parametrize("spec", ["embedded", "mod", "mod:", ":fn", "hf_rm:", "hf_rm: ", "a b:fn", "mod:fn()",
                                  "mod:fn;rm -rf", "1mod:fn"])
def test_malformed_gold_specs_are_config_errors(spec):
    with pytest.raises(ConfigError, match=r"^gold: unknown gold reward .*hf_rm:PATH.*module:function"):
        parse_gold(spec)


def test_embedded_task_and_callables_score_as_direct_calls():
    embedded = [("add 3 and 4", "3 plus 4 is 7."), ("reverse a b", "the reverse is a b.")]
    assert load("embedded_task").score(embedded) == [gold_reward(p, r) for p, r in embedded]
    assert load("tests.unit.eval.gold_plugins:marker_share").score(PAIRS) == \
        [gold_plugins.marker_share(p, r) for p, r in PAIRS]
    assert load("tests.unit.eval.gold_plugins:Scorers.length").score(PAIRS) == [float(len(r)) for _, r in PAIRS]
    assert load("") is None


@pytest.mark.parametrize("name, problem", [("not_a_number", "nan"), ("a_string", "'3.0'")])
def test_a_callable_returning_no_finite_number_is_an_error(name, problem):
    gold = load(f"tests.unit.eval.gold_plugins:{name}")
    with pytest.raises(ConfigError) as info:
        gold.score(PAIRS)
    message = str(info.value)
    assert message.startswith(f"gold: tests.unit.eval.gold_plugins:{name} scored answer 0 (prompt ")
    assert problem in message and "finite number" in message and "\n" not in message


@pytest.mark.parametrize("spec, problem", [
    ("tests.unit.eval.no_such_module:fn", "cannot import 'tests.unit.eval.no_such_module'"),
    ("tests.unit.eval.gold_plugins:missing", "has no attribute 'missing'"),
    ("tests.unit.eval.gold_plugins:NOT_CALLABLE", "is a float, not a callable"),
    # Refused before any model answers (it failed only after all of them had).
    ("os:system", r"os:system\(command\) cannot be called as f\(prompt, response\) \(too many positional"),
    ("tests.unit.eval.gold_plugins:Scorers", r"cannot be called as f\(prompt, response\)")])
def test_unusable_callables_are_named(spec, problem):
    with pytest.raises(ConfigError, match="^gold: .*" + problem):
        load(spec)


@pytest.fixture(scope="module")
def hf_reward_model(tmp_path_factory):
    return tiny_hf_reward_model(tmp_path_factory.mktemp("hf_rm") / "rm")


def direct_scores(path, texts):
    """Each text alone (no padding) through transformers' own classes."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt")).logits.item() for text in texts]


def test_exported_hf_reward_model_scores_as_direct_calls(hf_reward_model):
    gold = load(f"hf_rm:{hf_reward_model}", batch_size=5)  # batches of mixed lengths, right-padded
    assert isinstance(gold, HFRewardModel)
    finished = [i % 3 != 0 for i in range(len(PAIRS))]
    texts = [f"User: {p} Assistant: {r}" + ("<|eos|>" if end else "") for (p, r), end in zip(PAIRS, finished)]
    assert gold.tokenizer.eos_token == "<|eos|>" and not gold.tokenizer.chat_template
    expected = direct_scores(hf_reward_model, texts)
    assert gold.score(PAIRS, finished) == pytest.approx(expected, abs=1e-5)
    assert len({round(s, 4) for s in expected}) == len(expected)  # distinct: a shuffled order would fail
    assert gold.score(PAIRS[:1], [True]) != pytest.approx(gold.score(PAIRS[:1], [False]), abs=1e-4)


class Counted:
    """A progress bar's `update`, counted."""

    def __init__(self):
        self.done = 0

    def update(self, n: int = 1) -> None:
        self.done += n


@pytest.mark.parametrize("spec", ["tests.unit.eval.gold_plugins:marker_share", "hf_rm"])
def test_gold_scoring_shows_its_progress(spec, hf_reward_model):
    """Gold scoring ran silent for as long as it took (an hf_rm on every answer of every model)."""
    gold = load(f"hf_rm:{hf_reward_model}" if spec == "hf_rm" else spec, batch_size=5)
    bar = Counted()
    gold.score(PAIRS, None, bar)
    assert bar.done == len(PAIRS)


def test_hf_reward_model_errors_are_one_line(hf_reward_model, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=f"^gold: hf_rm:{tmp_path}: {tmp_path} has no config.json"):
        load(f"hf_rm:{tmp_path}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ConfigError) as info:
        load(f"hf_rm:{hf_reward_model}")
    assert str(info.value) == (f"gold: hf_rm:{hf_reward_model} needs the transformers package, which is not "
                               "installed; pip install 'offline-rlhf[hf]' (or pip install transformers)")
