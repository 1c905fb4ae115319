"""`orlhf convert`: Hugging Face directory <-> our DCP checkpoint, in one CPU process.

import_hf: config.json + safetensors -> `out/step_00000000/` (in the weights' own dtype,
           the tokenizer files copied into its `tokenizer/`). `hf_dir` is a local folder or a
           hub repo id `org/name[@revision]` (offline_rlhf.hub says which and resolves it).
export_hf: a checkpoint root (its `latest`) or step directory -> config.json, safetensors
           in `dtype`, tokenizer files; loadable with `transformers.AutoModelFor*`.
"""

from __future__ import annotations

import json
from pathlib import Path

from offline_rlhf.checkpoint import (
    REWARD_STATS,
    TEMPLATE,
    TOKENIZER_DIR,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
)
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.tools import ConvertConfig
from offline_rlhf.data.chat_template import (
    build_template,
    paper_jinja,
    with_default_system,
    with_default_variables,
    with_folded_system,
    with_reward_prompt,
)
from offline_rlhf.data.template import ChatTemplate
from offline_rlhf.data.tokenize import stop_token_ids
from offline_rlhf.data.tokenizer import CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, TOKENIZER_FILE, Tokenizer
from offline_rlhf.hub import resolve_dir
from offline_rlhf.models.hf import (
    CONFIG_FILE,
    config_to_hf,
    copy_tokenizer_files,
    hf_head,
    hf_state_dict,
    torch_dtype,
    write_hf_weights,
)
from offline_rlhf.stage_support import SCORED_BEFORE_TOKEN, dt_target, empty_model, import_hf, num_params

__all__ = ["empty_model", "export_hf", "import_hf", "main", "special_token_ids"]

HEAD_KINDS = {"lm": "a language model (`*ForCausalLM`)", "value": "a reward model (`*ForSequenceClassification`)"}


def main(config: ConvertConfig) -> int:
    if config.action == "import_hf":
        if config.dtype != "float32":
            raise ConfigError("dtype", f"{config.dtype!r} applies to export_hf only",
                              "imported checkpoints hold float32 master weights; drop dtype")
        # An existing checkpoint root would get step_00000000 and its `latest` repointed to it.
        require_empty(config.out, "choose an empty folder or delete this one (importing there would replace "
                                  "its `latest` checkpoint)")
        hf_dir = resolve_dir(config.hf_dir, "hf_dir")
        found = hf_head(hf_dir)
        if found != config.head:  # else a missing tensor, far from its cause
            raise ConfigError("head", f"{hf_dir}/config.json names {HEAD_KINDS[found]}, not a {config.head!r} head",
                              f"pass head={found}")
        print(import_hf(hf_dir, config.out, config.head)[1])
    else:
        export_hf(config.ckpt, config.out, config.head, config.dtype)
    return 0


def export_hf(ckpt: str | Path, out: str | Path, head: str = "lm", dtype: str = "float32") -> Path:
    """`head` must match the checkpoint's head (a guard against exporting the wrong model)."""
    step_dir = resolve_checkpoint(ckpt)
    meta = read_meta(step_dir)
    if meta.head != head:
        raise ConfigError("head", f"{step_dir} holds a {meta.head!r} head, not {head!r}", f"pass head={meta.head}")
    out = require_empty(out, "choose a new directory (stale shards would mix in)")
    model = empty_model(meta.model, meta.head, torch_dtype(dtype))  # loaded in the dtype it is written in
    load_checkpoint(step_dir, model)
    tokenizer_dir = step_dir / TOKENIZER_DIR
    # A reward model's normalization statistics travel in config.json (`config.reward_stats`
    # in transformers), so its raw scores can be z-scored as `orlhf label` does.
    stats = {REWARD_STATS: meta.metadata[REWARD_STATS]} if REWARD_STATS in meta.metadata else {}
    token_ids = special_token_ids(tokenizer_dir, meta.metadata.get(TEMPLATE))
    hf_config = config_to_hf(meta.model, meta.head, dtype, extra={**token_ids, **stats},
                             scored_before_eos=SCORED_BEFORE_TOKEN in meta.metadata)
    files = write_hf_weights(hf_state_dict(model, dtype), out)
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    copied = copy_tokenizer_files(tokenizer_dir, out) if tokenizer_dir.is_dir() else []
    align_generation_config(out, token_ids)
    if copied and TEMPLATE in meta.metadata:  # trained here: the export renders as training did
        carry_template(meta.metadata[TEMPLATE], out, dt_target(meta.metadata, step_dir, "ckpt"))
    print(f"exported {step_dir} -> {out}: {num_params(model):,} parameters, {meta.model.n_layers} layers, "
          f"{hf_config['architectures'][0]}, {dtype}, {len(files)} weight file(s), tokenizer files {copied or 'none'}")
    return out


def require_empty(out: str | Path, fix: str) -> Path:
    """`out` unless it holds anything (a file counts as not empty)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("out", f"{out} exists and is not empty", fix)
    return out


def align_generation_config(out: Path, token_ids: dict) -> None:
    """transformers' generate reads generation_config.json before config.json, so the one
    copied from the imported model gets config.json's token ids (a chat-trained model then
    stops at its end-of-turn token too); its sampling settings stay. Without the file,
    transformers derives one from config.json, so none is written."""
    path = out / GENERATION_CONFIG_FILE
    if path.is_file():
        path.write_text(json.dumps({**json.loads(path.read_text()), **token_ids}, indent=2) + "\n")


def carry_template(recorded: dict, out: Path, reward: float | None = None) -> None:
    """The export renders conversations as training did, so Hugging Face users prompt the
    model as trained (`exported_template`). chat_template.jinja, which transformers reads
    before tokenizer_config.json, is rewritten too when the tokenizer came with one."""
    tokenizer = Tokenizer.from_dir(out)
    template = exported_template(recorded, tokenizer, reward)
    if template is None:
        return
    paper = recorded.get("kind", "paper") == "paper"
    tokenizer.config["chat_template"] = template if paper else \
        replace_default_template(tokenizer.config["chat_template"], template)
    tokenizer.save(out)
    if (out / CHAT_TEMPLATE_FILE).is_file():
        (out / CHAT_TEMPLATE_FILE).write_text(template)
    if reward is not None:
        print(f"the exported chat template ends each generation prompt with the reward prompt for {reward:.1f}, "
              "which this Decision-Transformer model was trained to answer (its dt_target)")


def exported_template(recorded: dict, tokenizer: Tokenizer, reward: float | None) -> str | None:
    """A paper-format model gets a chat template of that format; a chat model's own template
    gets the system message training put first (template.system) and the values training
    gave its variables (template.kwargs) as defaults, and where it cannot take a system
    message, a caller's goes into the first user message as training put a record's; a
    Decision-Transformer model's generation prompt ends with its reward prompt for `reward`
    (its dt_target), which it never answered without. None: the tokenizer's own template
    renders as trained."""
    template = build_template(recorded, tokenizer.config)
    if isinstance(template, ChatTemplate):
        source = paper_jinja(template, tokenizer.adds_bos)
    else:
        source = template.chat.source if template.system_turns else with_folded_system(template.chat.source)
        source = with_default_variables(source, dict(template.chat.kwargs))
        if template.system:
            source = with_default_system(source, template.system)
        if source == template.chat.source and reward is None:
            return None
    return source if reward is None else with_reward_prompt(source, template.reward_prompt(reward))


def replace_default_template(configured: str | list[dict], template: str) -> str | list[dict]:
    """tokenizer_config.json's chat_template with its default replaced: the one template,
    or in a list of named ones (Hugging Face's `default`, `tool_use`...) the `default`."""
    if isinstance(configured, list):
        return [{**named, "template": template} if named.get("name") == "default" else named for named in configured]
    return template


def special_token_ids(tokenizer_dir: Path, template: dict | None = None) -> dict[str, int | list[int]]:
    """bos/eos/pad token ids for config.json and generation_config.json, from the tokenizer
    when there is one. A model trained with a chat template whose end-of-turn token is not
    EOS lists both as eos_token_id (as Llama 3 Instruct does), so Hugging Face generation
    stops where ours does; the other ids the imported generation_config.json ends at stay."""
    if not (tokenizer_dir / TOKENIZER_FILE).is_file():
        return {}
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    eos = tokenizer.eos_id
    stops = set(tokenizer.generation_eos_ids)
    if template is not None and template.get("kind") == "chat":
        stops |= stop_token_ids(tokenizer, build_template(template, tokenizer.config))
    extra = stops - {eos}
    eos = [eos, *sorted(extra)] if extra and eos is not None else eos
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_id}
    return {key: value for key, value in ids.items() if value is not None}
