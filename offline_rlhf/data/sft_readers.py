"""Readers turning public instruction data into (prompt, response) examples for SFT.

`prompt` is the instruction string (a multi-turn history folded with
`ChatTemplate.fold_history`, so `template.prompt_text(prompt)` renders it);
`response` is the final assistant reply. Both are stripped. `source` is
`{format}:{file name}:{line}` so every example can be traced to its record.

Every reader takes `skips`: a well-formed record that is unusable (a blank response)
is counted there and skipped; with None (the default) it is an error, as malformed
records always are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from offline_rlhf.data import oasst
from offline_rlhf.data.errors import Location
from offline_rlhf.data.records import (
    fold_at,
    iter_json_objects,
    iter_tsv_rows,
    require_field,
    require_text,
    select_reader,
)
from offline_rlhf.data.skips import Skips, require_texts, strict_or
from offline_rlhf.data.template import ASSISTANT, USER, ChatTemplate


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str
    source: str


def _instruction_example(
    instruction: str, detail: str, response: str, where: Location, template: ChatTemplate, tag: str
) -> SFTExample:
    """Single-turn rule: the prompt is the instruction, then a blank line and the
    detail (Dolly's context, self-instruct's input) when the detail is non-empty."""
    text = f"{instruction}\n\n{detail}" if detail else instruction
    return SFTExample(fold_at(template, [(USER, text)], where), response, f"{tag}:{where.record}")


def read_oasst(path: str | PathLike, template: ChatTemplate = ChatTemplate(),
               skips: Skips | None = None) -> list[SFTExample]:
    """Open Assistant message trees, one conversation per tree along the best-ranked replies.

    From the root follow the best-ranked reply at every level (rank 0; the first
    reply when none is ranked; deleted and review-failed messages are skipped).
    Every assistant message on that path is one example whose prompt is the
    folded history before it.
    """
    tag, skips = f"oasst:{Path(path).name}", strict_or(skips)
    examples = []
    for where, root in oasst.iter_trees(path):
        with skips.record():  # a blank message on the path skips its tree
            examples.extend(_oasst_examples(root, where, template, tag))
    return examples


def _oasst_examples(root: oasst.Message, where: Location, template: ChatTemplate, tag: str) -> list[SFTExample]:
    conversation = oasst.turns(oasst.best_ranked_path(root, where), where)
    return [SFTExample(fold_at(template, conversation[:index], where), text, f"{tag}:{where.record}")
            for index, (role, text) in enumerate(conversation) if role == ASSISTANT]


def read_dolly(path: str | PathLike, template: ChatTemplate = ChatTemplate(),
               skips: Skips | None = None) -> list[SFTExample]:
    """databricks-dolly-15k JSONL (`instruction`, `context`, `response`, `category`).

    Prompt: instruction, plus a blank line and the context when the context is non-empty.
    """
    tag, skips = f"dolly:{Path(path).name}", strict_or(skips)
    examples = []
    for where, record in iter_json_objects(path):
        context = require_text(record, "context", where, allow_empty=True)
        with skips.record():
            instruction, response = require_texts(record, ("instruction", "response"), where)
            examples.append(_instruction_example(instruction, context, response, where, template, tag))
    return examples


def _unescape_newlines(text: str) -> str:
    # The Flan CoT TSVs store each newline as the two characters backslash, n.
    return text.replace("\\n", "\n")


FLAN_COT_COLUMNS = ("question", "answer", "rationale")


def read_flan_cot(path: str | PathLike, template: ChatTemplate = ChatTemplate(),
                  skips: Skips | None = None) -> list[SFTExample]:
    """One Flan v2 chain-of-thought TSV (`question<TAB>answer<TAB>rationale`, no header).

    Prompt: the question. Response: `{rationale} So the answer is {answer}.`
    Literal `\\n` sequences in the fields become newlines.
    """
    tag, skips = f"flan_cot:{Path(path).name}", strict_or(skips)
    examples = []
    for where, row in iter_tsv_rows(path, FLAN_COT_COLUMNS):
        fields = {key: _unescape_newlines(value) for key, value in row.items()}
        with skips.record():
            question, answer, rationale = require_texts(fields, FLAN_COT_COLUMNS, where)
            response = f"{rationale} So the answer is {answer}."
            examples.append(_instruction_example(question, "", response, where, template, tag))
    return examples


def read_self_instruct(path: str | PathLike, template: ChatTemplate = ChatTemplate(),
                       skips: Skips | None = None) -> list[SFTExample]:
    """self-instruct seed tasks JSONL (`instruction`, `instances: [{input, output}]`).

    One example per instance. Prompt: instruction, plus a blank line and the
    instance input when it is non-empty. Response: the instance output. A blank
    instruction skips the record, a blank output only its instance.
    """
    tag, skips = f"self_instruct:{Path(path).name}", strict_or(skips)
    examples = []
    for where, record in iter_json_objects(path):
        instruction = require_text(record, "instruction", where, allow_empty=True)
        instances = require_field(record, "instances", list, where)
        if not instances or not all(isinstance(instance, dict) for instance in instances):
            raise where.error("expected 'instances' to be a non-empty list of objects")
        details = [require_text(instance, "input", where, allow_empty=True) for instance in instances]
        outputs = [require_text(instance, "output", where, allow_empty=True) for instance in instances]
        with skips.record():
            require_texts(record, ("instruction",), where)
            for detail, output, instance in zip(details, outputs, instances):
                with skips.record():
                    require_texts(instance, ("output",), where)
                    examples.append(_instruction_example(instruction, detail, output, where, template, tag))
    return examples


def _keyed_example(
    record: dict[str, Any], where: Location, prompt_key: str, response_key: str, template: ChatTemplate, tag: str
) -> SFTExample:
    prompt, response = require_texts(record, (prompt_key, response_key), where)
    return _instruction_example(prompt, "", response, where, template, tag)


def read_jsonl(
    path: str | PathLike,
    prompt_key: str = "prompt",
    response_key: str = "response",
    template: ChatTemplate = ChatTemplate(),
    skips: Skips | None = None,
) -> list[SFTExample]:
    """Any JSONL with one single-turn example per line, under the given field names."""
    tag, skips = f"jsonl:{Path(path).name}", strict_or(skips)
    examples = []
    for where, record in iter_json_objects(path):
        with skips.record():
            examples.append(_keyed_example(record, where, prompt_key, response_key, template, tag))
    return examples


def read_hf_dataset(
    name: str,
    split: str = "train",
    prompt_key: str = "prompt",
    response_key: str = "response",
    template: ChatTemplate = ChatTemplate(),
    skips: Skips | None = None,
) -> list[SFTExample]:
    """A Hugging Face dataset split with single-turn prompt/response columns.

    `datasets` is an optional dependency, imported only here.
    """
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("read_hf_dataset needs the optional 'datasets' package (pip install datasets)") from exc
    source, skips = f"{name}:{split}", strict_or(skips)
    examples = []
    for number, row in enumerate(datasets.load_dataset(name, split=split), start=1):
        with skips.record():
            examples.append(_keyed_example(row, Location(source, number), prompt_key, response_key, template,
                                           f"hf:{source}"))
    return examples


READERS: dict[str, Callable[..., list[SFTExample]]] = {
    "oasst": read_oasst,
    "dolly": read_dolly,
    "flan_cot": read_flan_cot,
    "self_instruct": read_self_instruct,
    "jsonl": read_jsonl,
    "hf": read_hf_dataset,
}


def read_sft_source(format: str, path: str | PathLike, **kwargs: Any) -> list[SFTExample]:
    """READERS[format](path, **kwargs); for `hf`, `path` is the dataset name."""
    return select_reader(READERS, format)(path, **kwargs)
