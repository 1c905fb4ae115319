"""Readers turning public instruction data into (prompt, response) examples for SFT.

`prompt` is the instruction string (a multi-turn history folded with
`ChatTemplate.fold_history`, so `template.prompt_text(prompt)` renders it);
`response` is the final assistant reply. Both are stripped. `source` is
`{format}:{file name}:{line}` so every example can be traced to its record
(`hf:{dataset}:{split}:{row}` for datasets read through `datasets`).

Each format's parsing is one function over records (`Records`: a file's lines or a
dataset's rows), so a JSONL file and the same data on the Hugging Face hub share it.
A multi-turn conversation gives one example per assistant turn, its history folded
into the prompt.

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

from offline_rlhf.data import hub_datasets, oasst
from offline_rlhf.data.errors import Location
from offline_rlhf.data.records import (
    Records,
    conversation,
    fold_at,
    iter_json_objects,
    iter_tsv_rows,
    record_turns,
    require_field,
    require_messages,
    require_text,
    select_reader,
)
from offline_rlhf.data.skips import Skips, require_texts, strict_or
from offline_rlhf.data.template import ASSISTANT, USER, ChatTemplate, Turn


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str
    source: str
    # The conversation before the response when it is more than one user turn (or opens with
    # a system turn): a chat template renders these turns (the paper's format uses the
    # folded prompt).
    turns: tuple[Turn, ...] = ()


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
    return oasst_examples(oasst.iter_trees(path), template, strict_or(skips), f"oasst:{Path(path).name}")


def oasst_examples(trees: Records, template: ChatTemplate, skips: Skips, tag: str) -> list[SFTExample]:
    examples = []
    for where, root in trees:
        with skips.record():  # a blank message on the path skips its tree
            examples.extend(_oasst_examples(root, where, template, tag))
    return examples


def _oasst_examples(root: oasst.Message, where: Location, template: ChatTemplate, tag: str) -> list[SFTExample]:
    conversation = oasst.turns(oasst.best_ranked_path(root, where), where)
    return [_history_example(conversation[:index], text, where, template, tag)
            for index, (role, text) in enumerate(conversation) if role == ASSISTANT]


def _history_example(history: list[Turn], response: str, where: Location, template: ChatTemplate,
                     tag: str) -> SFTExample:
    return SFTExample(fold_at(template, history, where), response, f"{tag}:{where.record}", conversation(history))


def read_dolly(path: str | PathLike, template: ChatTemplate = ChatTemplate(),
               skips: Skips | None = None) -> list[SFTExample]:
    """databricks-dolly-15k JSONL (`instruction`, `context`, `response`, `category`).

    Prompt: instruction, plus a blank line and the context when the context is non-empty.
    """
    return dolly_examples(iter_json_objects(path), template, strict_or(skips), f"dolly:{Path(path).name}")


def dolly_examples(records: Records, template: ChatTemplate, skips: Skips, tag: str) -> list[SFTExample]:
    examples = []
    for where, record in records:
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
    """A record's prompt and response; a multi-turn prompt's `turns` (this project's records:
    `record_turns`) are its history, folded into the prompt as the other readers fold theirs."""
    keys = (prompt_key, response_key)
    for key in keys:  # types first: a malformed record is an error even beside a blank turn
        require_text(record, key, where, allow_empty=True)
    turns = record_turns(record, where)
    prompt, response = require_texts(record, keys, where)
    return _history_example(list(turns) or [(USER, prompt)], response, where, template, tag)


def read_jsonl(
    path: str | PathLike,
    prompt_key: str = "prompt",
    response_key: str = "response",
    template: ChatTemplate = ChatTemplate(),
    skips: Skips | None = None,
) -> list[SFTExample]:
    """Any JSONL with one example per line, under the given field names: single-turn, or
    multi-turn with this project's `turns` (`orlhf mix`'s alignment.jsonl)."""
    return keyed_examples(iter_json_objects(path), prompt_key, response_key, template, strict_or(skips),
                          f"jsonl:{Path(path).name}")


def keyed_examples(records: Records, prompt_key: str, response_key: str, template: ChatTemplate, skips: Skips,
                   tag: str) -> list[SFTExample]:
    examples = []
    for where, record in records:
        with skips.record():
            examples.append(_keyed_example(record, where, prompt_key, response_key, template, tag))
    return examples


def messages_examples(records: Records, messages_key: str, template: ChatTemplate, skips: Skips,
                      tag: str) -> list[SFTExample]:
    """Chat-format conversations (`[{role, content}, ...]` under `messages_key`): one example
    per assistant turn, like an OASST path."""
    examples = []
    for where, record in records:
        with skips.record():
            conversation = require_messages(record, messages_key, where)
            examples.extend(_history_example(conversation[:index], text, where, template, tag)
                            for index, (role, text) in enumerate(conversation) if role == ASSISTANT)
    return examples


def read_hf_dataset(
    path: str,
    split: str = "train",
    subset: str = "",
    data_dir: str = "",
    layout: str = "auto",
    prompt_key: str = "prompt",
    response_key: str = "response",
    messages_key: str = "messages",
    template: ChatTemplate = ChatTemplate(),
    skips: Skips | None = None,
    key: str = "path",
) -> list[SFTExample]:
    """A dataset split read through `datasets` (a hub repo id, or a local folder or file),
    parsed by `layout` (`auto`: from its columns, see `hub_datasets.detect_layout`):
    `columns` (prompt_key/response_key), `messages` (chat lists under messages_key),
    `dolly`, or `oasst` (oasst1/oasst2's message table, rebuilt into trees). `key` is the
    config key holding `path`, for its errors."""
    rows = hub_datasets.load_split(path, split, subset, data_dir, key)
    layout = hub_datasets.detect_layout(rows, "sft", layout, prompt_key=prompt_key, response_key=response_key,
                                        messages_key=messages_key)
    tag, skips = f"hf:{rows.name}", strict_or(skips)
    if layout == "oasst":
        return oasst_examples(oasst.trees_from_messages(rows.records(), skips), template, skips, tag)
    if layout == "messages":
        return messages_examples(rows.records(), messages_key, template, skips, tag)
    if layout == "dolly":
        return dolly_examples(rows.records(), template, skips, tag)
    return keyed_examples(rows.records(), prompt_key, response_key, template, skips, tag)


READERS: dict[str, Callable[..., list[SFTExample]]] = {
    "oasst": read_oasst,
    "dolly": read_dolly,
    "flan_cot": read_flan_cot,
    "self_instruct": read_self_instruct,
    "jsonl": read_jsonl,
    "hf": read_hf_dataset,
}


def read_sft_source(format: str, path: str | PathLike, **kwargs: Any) -> list[SFTExample]:
    """READERS[format](path, **kwargs); for `hf`, `path` is a hub dataset id or a local folder or file."""
    return select_reader(READERS, format)(path, **kwargs)
