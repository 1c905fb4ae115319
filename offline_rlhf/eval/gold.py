"""Gold rewards for `orlhf eval`: a score that does not come from the reward model the
policies were trained to please. `gold=` picks one:

- `embedded_task`: the embedded task's rule (`data.embedded_task.gold_reward`);
- `module:function`: any Python callable `(prompt, response) -> float` on the path;
- `hf_rm:PATH`: a Hugging Face sequence-classification reward model directory (e.g. a
  stronger public RM, as in AlpacaFarm-style studies), loaded with `transformers`.

Every score must be a finite number: a NaN or a string from a plug-in is an error naming
the answer, never a silently skewed mean.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.evaluation import CALLABLE, EMBEDDED_TASK, HF_RM, parse_gold
from offline_rlhf.data.embedded_task import gold_reward, parse_instruction, shortened
from offline_rlhf.data.records import iter_json_objects, require_text
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.progress import Progress

Pair = tuple[str, str]  # (prompt, response)


@dataclass(frozen=True)
class PairFunction:
    """A gold reward computed one (prompt, response) at a time by a Python function."""

    spec: str
    function: Callable[[str, str], float]

    def score(self, pairs: Sequence[Pair], finished: Sequence[bool] | None = None,
              progress: Progress | None = None) -> list[float]:
        scores = []
        for index, (prompt, response) in enumerate(pairs):
            scores.append(_finite(self.function(prompt, response), self.spec, index, prompt))
            if progress is not None:
                progress.update()
        return scores


class HFRewardModel:
    """A Hugging Face `AutoModelForSequenceClassification` with one label, scoring
    `prompt + response` rendered by the tokenizer's chat template when it has one, else
    by `template` (the paper's `User: ... Assistant: ...`) with the tokenizer's EOS after
    finished answers, as this project's own reward models read them. Batches are
    right-padded with the model's pad token (one text per batch when it has none).
    Loaded (and so checked) on the CPU: its weights are on `device` only while it scores,
    never while the policies answer (their weights, KV cache and CUDA graphs)."""

    def __init__(self, spec: str, path: Path, device: torch.device, batch_size: int, template: ChatTemplate):
        transformers = _transformers(spec)
        self.spec, self.device, self.template = spec, device, template
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            self.model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
        except (OSError, ValueError) as err:  # transformers' own messages span lines
            raise ConfigError("gold", f"{spec}: cannot load the model: {' '.join(str(err).split())}",
                              "pass a sequence-classification model directory with its tokenizer") from None
        labels = self.model.config.num_labels
        if labels != 1:
            raise ConfigError("gold", f"{spec}: the model has {labels} labels, a reward model has one",
                              "pass a reward model (num_labels=1)")
        self.pad_id = self.model.config.pad_token_id
        self.batch_size = batch_size if self.pad_id is not None else 1
        self.max_len = getattr(self.model.config, "max_position_embeddings", None)

    def text(self, prompt: str, response: str, finished: bool = True) -> str:
        """What the model reads for one answer."""
        if self.tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        eos = self.tokenizer.eos_token if finished and self.tokenizer.eos_token else ""
        return self.template.prompt_text(prompt) + self.template.response_text(response) + eos

    def encode(self, text: str) -> list[int]:
        """Token ids, the most recent `max_len` kept (the reward is read at the end)."""
        ids = self.tokenizer(text, add_special_tokens=not self.tokenizer.chat_template)["input_ids"]
        return ids[-self.max_len:] if self.max_len else ids

    def score(self, pairs: Sequence[Pair], finished: Sequence[bool] | None = None,
              progress: Progress | None = None) -> list[float]:
        self.model.to(self.device)
        try:
            return self._score(pairs, finished, progress)
        finally:
            self.model.to("cpu")  # the device's memory free again

    @torch.no_grad()
    def _score(self, pairs: Sequence[Pair], finished: Sequence[bool] | None,
               progress: Progress | None) -> list[float]:
        ends = [True] * len(pairs) if finished is None else finished
        ids = [self.encode(self.text(p, r, end)) for (p, r), end in zip(pairs, ends, strict=True)]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        scores = [math.nan] * len(ids)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for index, value in zip(chunk, self._forward([ids[i] for i in chunk])):
                scores[index] = _finite(value, self.spec, index, pairs[index][0])
            if progress is not None:
                progress.update(len(chunk))
        return scores

    def _forward(self, rows: list[list[int]]) -> list[float]:
        longest = max(map(len, rows))
        tokens = torch.full((len(rows), longest), self.pad_id or 0, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for row, ids in enumerate(rows):
            tokens[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
        logits = self.model(input_ids=tokens.to(self.device), attention_mask=mask.to(self.device)).logits
        return logits.float().squeeze(-1).tolist()  # [B]


GoldReward = PairFunction | HFRewardModel


def load_gold(spec: str, device: torch.device, batch_size: int, template: ChatTemplate) -> GoldReward | None:
    """The gold reward `spec` names (see the module docstring), ready to score; None for ""."""
    kind, target = parse_gold(spec)
    if kind == EMBEDDED_TASK:
        return PairFunction(spec, gold_reward)
    if kind == CALLABLE:
        return PairFunction(spec, _import_callable(target))
    if kind == HF_RM:
        path = Path(target)
        if not (path / "config.json").is_file():
            raise ConfigError("gold", f"{spec}: {path} has no config.json",
                              "pass a Hugging Face model directory (save_pretrained, or orlhf convert export_hf "
                              "head=value)")
        return HFRewardModel(spec, path, device, batch_size, template)
    return None


def check_prompts(spec: str, path: str, prompt_key: str) -> None:
    """Before any model answers: the embedded task's gold reward scores only its own
    instructions, so a prompt it cannot parse (another data set's, an over-long one) is one
    line naming its file:line, the prompt shortened. Other gold rewards take any prompt."""
    if parse_gold(spec).kind != EMBEDDED_TASK:
        return
    for where, record in iter_json_objects(path):
        text = require_text(record, prompt_key, where)
        try:
            parse_instruction(text)
        except ValueError:
            raise where.error(f"expected an embedded-task instruction such as 'add 3 and 4' for gold=embedded_task, "
                              f"got {shortened(text)}; use the task's prompts (run_dir/task/) or "
                              "leave gold empty") from None


def _import_callable(spec: str) -> Callable[[str, str], float]:
    module_name, _, attribute = spec.partition(":")
    try:
        found = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError("gold", f"cannot import {module_name!r} for {spec}: {err}",
                          "put the module on PYTHONPATH (or install its package)") from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ConfigError("gold", f"{spec}: {module_name} has no attribute {attribute!r}",
                              "name a function of that module")
        found = getattr(found, part)
    if not callable(found):
        raise ConfigError("gold", f"{spec} is a {type(found).__name__}, not a callable",
                          "name a function (prompt, response) -> float")
    _check_takes_a_pair(found, spec)
    return found


def _check_takes_a_pair(function: Callable, spec: str) -> None:
    """Before any model answers: a callable that cannot take (prompt, response) would fail
    only once every answer was generated."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some builtins have none: their first call will tell
        return
    try:
        signature.bind("prompt", "response")
    except TypeError as err:
        raise ConfigError("gold", f"{spec}{signature} cannot be called as f(prompt, response) ({err})",
                          "name a function (prompt, response) -> float") from None


def _transformers(spec: str):
    try:
        import transformers
    except ImportError:
        raise ConfigError("gold", f"{spec} needs the transformers package, which is not installed",
                          "pip install 'offline-rlhf[hf]' (or pip install transformers)") from None
    return transformers


def _finite(value, spec: str, index: int, prompt: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError("gold", f"{spec} scored answer {index} (prompt {shortened(prompt)}) {value!r}",
                          "a gold reward must return a finite number")
    return float(value)
