"""Prompts for generation, drawn from SFT data, preference data and user prompt files
(no torch here). Each prompt keeps the name of the source it came from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from offline_rlhf.data.errors import DataError, Location
from offline_rlhf.data.hub_datasets import COLUMN_KEYS, hub_options, load_split, source_key
from offline_rlhf.data.mixing import mix_sources
from offline_rlhf.data.preference_readers import read_preference_source
from offline_rlhf.data.records import Records, conversation, fold_at, iter_json_objects, record_turns, require_text
from offline_rlhf.data.sft_readers import read_sft_source
from offline_rlhf.data.skips import Skips, describe, strict_or
from offline_rlhf.data.template import USER, ChatTemplate, Turn

PROMPT_KINDS = ("prompts", "sft", "preference")
PromptTurns = tuple[str, tuple[Turn, ...]]  # (the folded text, the turns of a multi-turn prompt or ())


@dataclass(frozen=True)
class Prompt:
    id: int  # position in the mixed prompt list; stable for a given config and seed
    text: str  # the instruction (multi-turn history folded by the template)
    source: str
    turns: tuple[Turn, ...] = ()  # the history up to its last user turn; () for one user turn alone


def read_prompt_file_turns(path: str, prompt_key: str = "prompt", skips: Skips | None = None) -> list[PromptTurns]:
    """The `prompt_key` text of every record, with the turns of a multi-turn prompt (this
    project's [role, text] pairs, as generate and label write them: `record_turns`); a
    list of strings under `prompt_key` (FastChat questions' `turns`) gives its first, the
    turn a one-turn evaluation answers. A blank prompt is counted into `skips` (None: an error)."""
    return _each_usable(iter_json_objects(path), strict_or(skips),
                        lambda record, where: (_first_turn(record, prompt_key, where), record_turns(record, where)))


def _first_turn(record: dict, key: str, where) -> str:
    turns = record.get(key)
    if not isinstance(turns, list):
        return require_text(record, key, where)
    if not turns:  # as blank as a blank text
        raise where.unusable(f"expected {key!r} to be text or a non-empty list of strings (an empty list)",
                             f"empty {key!r}")
    if not all(isinstance(turn, str) for turn in turns):
        raise where.error(f"expected {key!r} to be text or a list of strings (a list holding "
                          f"{sorted({type(turn).__name__ for turn in turns} - {'str'})})")
    return require_text({key: turns[0]}, key, where)


def read_prompts(kind: str, format: str, path: str, template: ChatTemplate, prompt_key: str = "prompt",
                 **hub: str) -> list[str]:
    """The texts of `read_prompt_turns` (multi-turn histories folded by the template)."""
    return [text for text, _ in read_prompt_turns(kind, format, path, template, prompt_key, **hub)]


def read_prompt_turns(kind: str, format: str, path: str, template: ChatTemplate, prompt_key: str = "prompt",
                      skips: Skips | None = None, **hub: str) -> list[PromptTurns]:
    """kind `prompts`: a JSONL file of {prompt_key: text} (with `turns` for multi-turn ones,
    `read_prompt_file_turns`), or with format `hf` that column of a dataset split (one turn
    each); kind `sft` / `preference`: the prompts of a dataset read
    with that family's reader for `format`, with the turns of multi-turn ones (a `jsonl`
    file's by `keyed_prompts`: a prompt needs no usable reply). `hub` holds the
    `format: hf` options (`hub_options`) and the config `key` holding `path` (for errors).
    Unusable records (a blank prompt) are counted into `skips` (None: an error)."""
    skips = strict_or(skips)
    if kind == "prompts" and format == "hf":
        rows = load_split(path, **{key: hub[key] for key in ("split", "subset", "data_dir", "key") if key in hub})
        return _each_usable(rows.records(), skips, lambda record, where: (require_text(record, prompt_key, where), ()))
    if kind == "prompts":
        return read_prompt_file_turns(path, prompt_key, skips)
    if kind not in PROMPT_KINDS:
        raise ValueError(f"unknown prompt source kind {kind!r}; expected one of {PROMPT_KINDS}")
    if format == "jsonl":
        return keyed_prompts(iter_json_objects(path), prompt_key, template, skips)
    options = {"prompt_key": prompt_key, **hub} if format == "hf" else {}
    read = read_sft_source if kind == "sft" else read_preference_source
    return [(e.prompt, e.turns) for e in read(format, path, template=template, skips=skips, **options)]


def keyed_prompts(records: Records, prompt_key: str, template: ChatTemplate, skips: Skips) -> list[PromptTurns]:
    """The prompts of the `jsonl` SFT and preference readers' records (`prompt_key`, or the
    history under `turns`, folded as those readers fold it), whatever their replies hold:
    generation answers the prompt of a pair with identical sides or an example with a blank
    response, which only training cannot use."""
    def prompt_of(record: dict, where) -> PromptTurns:
        require_text(record, prompt_key, where, allow_empty=True)  # types first, as the readers check them
        history = list(record_turns(record, where)) or [(USER, require_text(record, prompt_key, where))]
        return fold_at(template, history, where), conversation(history)
    return _each_usable(records, skips, prompt_of)


def _each_usable(records: Records, skips: Skips,
                 prompt_of: Callable[[dict, Location], PromptTurns]) -> list[PromptTurns]:
    """prompt_of(record, where) of every record; an unusable one (a blank prompt or turn) is
    counted into `skips`, or re-raised when strict."""
    prompts = []
    for where, record in records:
        with skips.record():
            prompts.append(prompt_of(record, where))
    return prompts


def read_prompt_source(source, template: ChatTemplate, skips: Skips | None = None) -> list[PromptTurns]:
    """`read_prompt_turns` for a prompt source config (kind, format, path, prompt_key and,
    for format hf, the hub options and column names it carries)."""
    hub = hub_options(source, source.kind if source.kind in COLUMN_KEYS else "prompts")
    return read_prompt_turns(source.kind, source.format, source.path, template, skips=skips,
                             **{"prompt_key": source.prompt_key, **hub, **source_key(source, "sources")})


def read_prompt_mix(sources, template: ChatTemplate, total: int | None, seed: int,
                    strict: bool = True) -> tuple[list[Prompt], dict]:
    """Every prompt source config read (`read_prompt_source`) and mixed (`mix_prompts`);
    each source's stats count what it skipped (`skipped`: {reason: records}) unless
    `strict`, where an unusable record is an error."""
    read, skips = [], {}
    for source in sources:
        name = source.name or source.path
        skips[name] = Skips(strict=strict)
        read.append((name, read_prompt_source(source, template, skips[name]), source.weight))
        if not read[-1][1]:  # an empty source would fail in the mix, far from its cause
            raise DataError(source.path, None, f"expected at least one usable prompt ({describe(skips[name].counts)}; "
                                               "strict=true names the first)")
    prompts, stats = mix_prompts(read, total, seed)
    for name, counts in stats.items():
        counts["skipped"] = skips[name].counts
    return prompts, stats


def mix_prompts(sources: list[tuple[str, list[PromptTurns], float]], total: int | None,
                seed: int) -> tuple[list[Prompt], dict]:
    """Mix (name, prompts, weight) sources with `mix_sources` and number the result."""
    tagged = [(name, [(name, prompt) for prompt in prompts], weight) for name, prompts, weight in sources]
    mixed, stats = mix_sources(tagged, total, seed)
    return [Prompt(index, text, name, turns) for index, (name, (text, turns)) in enumerate(mixed)], stats
