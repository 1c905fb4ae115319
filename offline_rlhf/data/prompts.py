"""Prompts for generation, drawn from SFT data, preference data and user prompt files
(no torch here). Each prompt keeps the name of the source it came from."""

from __future__ import annotations

from dataclasses import dataclass

from offline_rlhf.data.hub_datasets import COLUMN_KEYS, hub_options, load_split, source_key
from offline_rlhf.data.mixing import mix_sources
from offline_rlhf.data.preference_readers import read_preference_source
from offline_rlhf.data.records import iter_json_objects, record_turns, require_text
from offline_rlhf.data.sft_readers import read_sft_source
from offline_rlhf.data.template import ChatTemplate, Turn

PROMPT_KINDS = ("prompts", "sft", "preference")
PromptTurns = tuple[str, tuple[Turn, ...]]  # (the folded text, the turns of a multi-turn prompt or ())


@dataclass(frozen=True)
class Prompt:
    id: int  # position in the mixed prompt list; stable for a given config and seed
    text: str  # the instruction (multi-turn history folded by the template)
    source: str
    turns: tuple[Turn, ...] = ()  # the history up to its last user turn; () for a one-turn prompt


def read_prompt_file_turns(path: str, prompt_key: str = "prompt") -> list[PromptTurns]:
    """The `prompt_key` text of every record, with the turns of a multi-turn prompt (this
    project's [role, text] pairs, as generate and label write them: `record_turns`); a
    list of strings under `prompt_key` (FastChat questions' `turns`) gives its first, the
    turn a one-turn evaluation answers."""
    return [(_first_turn(record, prompt_key, where), record_turns(record, where))
            for where, record in iter_json_objects(path)]


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
                      **hub: str) -> list[PromptTurns]:
    """kind `prompts`: a JSONL file of {prompt_key: text} (with `turns` for multi-turn ones,
    `read_prompt_file_turns`), or with format `hf` that column of a dataset split (one turn
    each); kind `sft` / `preference`: the prompts of a dataset read
    with that family's reader for `format`, with the turns of multi-turn ones. `hub` holds the
    `format: hf` options (`hub_options`) and the config `key` holding `path` (for errors)."""
    if kind == "prompts":
        if format == "hf":
            rows = load_split(path, **{key: hub[key] for key in ("split", "subset", "data_dir", "key") if key in hub})
            return [(require_text(record, prompt_key, where), ()) for where, record in rows.records()]
        return read_prompt_file_turns(path, prompt_key)
    options = {"prompt_key": prompt_key, **hub} if format == "hf" else {}
    if kind == "sft":
        return [(e.prompt, e.turns) for e in read_sft_source(format, path, template=template, **options)]
    if kind == "preference":
        return [(e.prompt, e.turns) for e in read_preference_source(format, path, template=template, **options)]
    raise ValueError(f"unknown prompt source kind {kind!r}; expected one of {PROMPT_KINDS}")


def read_prompt_source(source, template: ChatTemplate) -> list[PromptTurns]:
    """`read_prompt_turns` for a prompt source config (kind, format, path, prompt_key and,
    for format hf, the hub options and column names it carries)."""
    hub = hub_options(source, source.kind if source.kind in COLUMN_KEYS else "prompts")
    return read_prompt_turns(source.kind, source.format, source.path, template,
                             **{"prompt_key": source.prompt_key, **hub, **source_key(source, "sources")})


def read_prompt_mix(sources, template: ChatTemplate, total: int | None, seed: int) -> tuple[list[Prompt], dict]:
    """Every prompt source config read (`read_prompt_source`) and mixed (`mix_prompts`)."""
    return mix_prompts([(s.name or s.path, read_prompt_source(s, template), s.weight) for s in sources], total, seed)


def mix_prompts(sources: list[tuple[str, list[PromptTurns], float]], total: int | None,
                seed: int) -> tuple[list[Prompt], dict]:
    """Mix (name, prompts, weight) sources with `mix_sources` and number the result."""
    tagged = [(name, [(name, prompt) for prompt in prompts], weight) for name, prompts, weight in sources]
    mixed, stats = mix_sources(tagged, total, seed)
    return [Prompt(index, text, name, turns) for index, (name, (text, turns)) in enumerate(mixed)], stats
