"""Readers turning public preference data into (prompt, chosen, rejected) examples.

`prompt` is the folded conversation history (`ChatTemplate.fold_history`);
`chosen` and `rejected` are the two competing final replies, stripped. `source`
is `{format}:{file name}:{line}` (`hf:{dataset}:{split}:{row}` through `datasets`).
As for SFT, each format's parsing is one function over records, shared by files and
hub datasets.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from offline_rlhf.data import hub_datasets, oasst
from offline_rlhf.data.errors import Location
from offline_rlhf.data.records import (
    Records,
    conversation,
    fold_at,
    iter_json_objects,
    record_turns,
    require_field,
    require_messages,
    require_text,
    select_reader,
)
from offline_rlhf.data.skips import Skips, require_texts, strict_or
from offline_rlhf.data.template import ASSISTANT, USER, ChatTemplate, Turn, split_system

HH_HUMAN_TAG = "\n\nHuman:"
HH_ASSISTANT_TAG = "\n\nAssistant:"
_HH_TAG = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": USER, "Assistant": ASSISTANT}
IDENTICAL = "identical chosen and rejected"  # the skip reason counted in dataset cards


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str
    source: str
    turns: tuple[Turn, ...] = ()  # the history when more than one user turn (see SFTExample.turns)


def _pair(history: list[Turn], chosen: str, rejected: str, where: Location, tag: str,
          template: ChatTemplate) -> PreferenceExample:
    if chosen == rejected:  # no preference to learn; skipped and counted unless strict
        raise where.unusable("expected 'chosen' and 'rejected' to differ (identical)", IDENTICAL)
    return PreferenceExample(fold_at(template, history, where), chosen, rejected, f"{tag}:{where.record}",
                             conversation(history))


def _hh_turns(transcript: str, where: Location) -> list[Turn]:
    """Split an hh-rlhf transcript on its `\\n\\nHuman:` / `\\n\\nAssistant:` tags.

    Consecutive turns of one speaker are merged with a blank line: a few records
    repeat the Assistant tag inside an earlier reply.
    """
    head, *pieces = _HH_TAG.split(transcript)
    if head.strip():
        raise where.error(f"expected the transcript to start with {HH_HUMAN_TAG!r}")
    turns: list[Turn] = []
    for speaker, text in zip(pieces[0::2], pieces[1::2]):
        role = _HH_ROLES[speaker]
        if turns and turns[-1][0] == role:
            turns[-1] = (role, f"{turns[-1][1]}\n\n{text.strip()}")
        else:
            turns.append((role, text.strip()))
    return turns


def _hh_prompt_end(chosen: str, rejected: str, where: Location) -> int:
    """Where the shared history ends: the last Assistant tag inside the longest common
    prefix of the two transcripts. Splitting each at its own last tag would be wrong,
    since some final replies themselves contain `Human:` or `Assistant:`."""
    for key, transcript in (("chosen", chosen), ("rejected", rejected)):
        if HH_ASSISTANT_TAG not in transcript:
            raise where.error(f"expected {key!r} to contain an {HH_ASSISTANT_TAG!r} turn (none found)")
    tag_at = chosen.rfind(HH_ASSISTANT_TAG, 0, common_prefix_length(chosen, rejected))
    if tag_at < 0:
        raise where.error(f"expected 'chosen' and 'rejected' to share the transcript up to an {HH_ASSISTANT_TAG!r} tag")
    return tag_at


def common_prefix_length(one: str, other: str) -> int:
    """How many leading characters `one` and `other` share: a bisection over slice
    comparisons, which run in C (os.path.commonprefix compares character by character in
    Python, a tenth of building an hh-rlhf dataset)."""
    low, high = 0, min(len(one), len(other))
    while low < high:
        middle = (low + high + 1) // 2
        if one[:middle] == other[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def read_hh_rlhf(path: str | os.PathLike, template: ChatTemplate = ChatTemplate(),
                 skips: Skips | None = None) -> list[PreferenceExample]:
    """Anthropic hh-rlhf JSONL (`chosen`, `rejected`: full `\\n\\nHuman: ... \\n\\nAssistant: ...` transcripts).

    Prompt: the longest common transcript prefix ending at an Assistant tag, parsed
    into turns and folded. Chosen/rejected: the rest of each transcript, stripped.
    Blank and identical replies are counted into `skips` (None: an error, as for every
    reader here).
    """
    return hh_pairs(iter_json_objects(path), template, strict_or(skips), f"hh_rlhf:{Path(path).name}")


def hh_pairs(records: Records, template: ChatTemplate, skips: Skips, tag: str) -> list[PreferenceExample]:
    examples = []
    for where, record in records:
        chosen = require_field(record, "chosen", str, where)
        rejected = require_field(record, "rejected", str, where)
        end = _hh_prompt_end(chosen, rejected, where)
        history = _hh_turns(chosen[:end], where)
        reply_start = end + len(HH_ASSISTANT_TAG)
        replies = {"chosen": chosen[reply_start:], "rejected": rejected[reply_start:]}
        with skips.record():  # a blank reply is no side of a preference, as in a JSONL file
            examples.append(_pair(history, *require_texts(replies, list(replies), where), where, tag, template))
    return examples


def _oasst_tree_pairs(
    root: oasst.Message, where: Location, template: ChatTemplate, tag: str, skips: Skips
) -> list[PreferenceExample]:
    pairs = []
    for history, message in oasst.iter_conversations(root, where):
        ranked = oasst.ranked_assistant_replies(message, where)
        if len(ranked) < 2:
            continue
        for better, worse in combinations(ranked, 2):
            # Equal ranks state no preference.
            if oasst.rank(better, where) < oasst.rank(worse, where):
                chosen, rejected = oasst.turn(better, where)[1], oasst.turn(worse, where)[1]
                with skips.record():  # an identical pair skips that pair, not the tree
                    pairs.append(_pair(history, chosen, rejected, where, tag, template))
    return pairs


def read_oasst_pairs(path: str | os.PathLike, template: ChatTemplate = ChatTemplate(),
                     skips: Skips | None = None) -> list[PreferenceExample]:
    """Open Assistant message trees, pairs from every ranking in the tree.

    For every message with two or more ranked assistant replies (deleted and
    review-failed messages skipped), each better-ranked reply is paired with each
    worse-ranked one: n ranked replies give n(n-1)/2 pairs, uncapped. Prompt: the
    folded history from the root to that message. A tree with a blank message is
    skipped whole, an identical pair alone; both counted into `skips`.
    """
    return oasst_pairs(oasst.iter_trees(path), template, strict_or(skips), f"oasst:{Path(path).name}")


def oasst_pairs(trees: Records, template: ChatTemplate, skips: Skips, tag: str) -> list[PreferenceExample]:
    pairs = []
    for where, root in trees:
        with skips.record():
            pairs.extend(_oasst_tree_pairs(root, where, template, tag, skips))
    return pairs


def read_preference_jsonl(
    path: str | os.PathLike,
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    template: ChatTemplate = ChatTemplate(),
    skips: Skips | None = None,
) -> list[PreferenceExample]:
    """Any JSONL with a prompt and two replies per line, under the given field names; a
    multi-turn prompt carries this project's `turns` (`orlhf reference`'s pairs.jsonl).
    Blank fields and identical replies are counted into `skips` (None: an error)."""
    return keyed_pairs(iter_json_objects(path), prompt_key, chosen_key, rejected_key, template, strict_or(skips),
                       f"jsonl:{Path(path).name}")


def keyed_pairs(records: Records, prompt_key: str, chosen_key: str, rejected_key: str, template: ChatTemplate,
                skips: Skips, tag: str) -> list[PreferenceExample]:
    examples, keys = [], (prompt_key, chosen_key, rejected_key)
    for where, record in records:
        for key in keys:  # types first: a malformed record is an error even beside a blank turn
            require_text(record, key, where, allow_empty=True)
        with skips.record():
            turns = record_turns(record, where)  # the history of a multi-turn prompt
            prompt, chosen, rejected = require_texts(record, keys, where)
            examples.append(_pair(list(turns) or [(USER, prompt)], chosen, rejected, where, tag, template))
    return examples


def chat_pairs(records: Records, prompt_key: str, chosen_key: str, rejected_key: str, template: ChatTemplate,
               skips: Skips, tag: str) -> list[PreferenceExample]:
    """Chosen and rejected as chat-format conversations (UltraFeedback binarized): both end
    with the assistant reply and share the turns before it, the prompt; a conversation of
    the reply alone (or a system message and the reply) takes its prompt from `prompt_key`."""
    examples = []
    for where, record in records:
        with skips.record():
            chosen = require_messages(record, chosen_key, where)
            rejected = require_messages(record, rejected_key, where)
            if chosen[-1][0] != ASSISTANT or rejected[-1][0] != ASSISTANT:
                raise where.error(f"expected {chosen_key!r} and {rejected_key!r} to end with an assistant message")
            if chosen[:-1] != rejected[:-1]:
                raise where.error(f"expected {chosen_key!r} and {rejected_key!r} to share the messages before "
                                  "their last one")
            history = chosen[:-1]
            if not split_system(history)[1]:  # the reply alone, after a system message or not
                history = [*history, (USER, require_text(record, prompt_key, where))]
            examples.append(_pair(history, chosen[-1][1], rejected[-1][1], where, tag, template))
    return examples


def read_hf_preferences(
    path: str,
    split: str = "train",
    subset: str = "",
    data_dir: str = "",
    layout: str = "auto",
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    template: ChatTemplate = ChatTemplate(),
    skips: Skips | None = None,
    key: str = "path",
) -> list[PreferenceExample]:
    """A preference split read through `datasets` (a hub repo id, or a local folder or file),
    parsed by `layout` (`auto`: from its columns, see `hub_datasets.detect_layout`):
    `hh_rlhf` (transcripts), `columns` (prompt/chosen/rejected text), `messages` (chosen and
    rejected conversations, UltraFeedback binarized) or `oasst` (oasst1/oasst2 rankings).
    `key` is the config key holding `path`, for its errors."""
    rows = hub_datasets.load_split(path, split, subset, data_dir, key)
    layout = hub_datasets.detect_layout(rows, "preference", layout, prompt_key=prompt_key, chosen_key=chosen_key,
                                        rejected_key=rejected_key)
    tag, skips = f"hf:{rows.name}", strict_or(skips)
    if layout == "oasst":
        return oasst_pairs(oasst.trees_from_messages(rows.records(), skips), template, skips, tag)
    if layout == "hh_rlhf":
        return hh_pairs(rows.records(), template, skips, tag)
    read = chat_pairs if layout == "messages" else keyed_pairs
    return read(rows.records(), prompt_key, chosen_key, rejected_key, template, skips, tag)


PREFERENCE_READERS: dict[str, Callable[..., list[PreferenceExample]]] = {
    "hh_rlhf": read_hh_rlhf,
    "oasst": read_oasst_pairs,
    "jsonl": read_preference_jsonl,
    "hf": read_hf_preferences,
}


def read_preference_source(format: str, path: str | os.PathLike, **kwargs: Any) -> list[PreferenceExample]:
    """PREFERENCE_READERS[format](path, **kwargs)."""
    return select_reader(PREFERENCE_READERS, format)(path, **kwargs)
