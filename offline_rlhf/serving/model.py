"""The served checkpoint: its model (a TP-only replica of the runtime's layout), tokenizer,
chat template and, for a Decision-Transformer model, the reward prompt its answers follow."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from offline_rlhf.checkpoint import TOKENIZER_DIR, read_meta
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.serving import ServeConfig
from offline_rlhf.data.chat_template import ChatFormat
from offline_rlhf.data.template import ChatTemplate, Turn
from offline_rlhf.data.tokenize import encode_prompt, stop_token_ids
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.runtime import Runtime
from offline_rlhf.stage_support import checkpoint_template, checkpoint_tokenizer, dt_target, load_inference_model


@dataclass
class ServedModel:
    name: str  # what requests name in `model`
    model: nn.Module
    tokenizer: Tokenizer
    template: ChatTemplate | ChatFormat
    reward_prefix: str  # "" or the DT reward prompt that follows the assistant tag
    max_seq_len: int
    stop_ids: set[int]  # the tokens that end an answer (EOS, a chat template's end-of-turn token)

    def chat_prompt(self, turns: list[Turn], template_kwargs: dict | None = None) -> list[int]:
        """A conversation's prompt tokens, as `orlhf eval` and training encode a prompt
        (`encode_prompt`): one user turn is rendered exactly as an eval prompt, and a chat
        template renders the turns themselves, with `template_kwargs` (a request's) over the
        variables the model was trained with."""
        template = self.template.with_variables(template_kwargs) if template_kwargs else self.template
        return encode_prompt(self.tokenizer, template, template.fold_history(turns), self.reward_prefix, turns=turns)


def load_served_model(cfg: ServeConfig, path: Path, rt: Runtime) -> ServedModel:
    """The checkpoint at `path` (resolved from cfg.ckpt), ready to generate on every rank."""
    meta = read_meta(path)
    if not (path / TOKENIZER_DIR).is_dir():
        raise ConfigError("ckpt", f"{path} has no {TOKENIZER_DIR}/ folder",
                          "serve a checkpoint saved with its tokenizer")
    template = checkpoint_template(path, meta.metadata, cfg.template)
    score = cfg.reward_prompt if cfg.reward_prompt is not None else dt_target(meta.metadata, path)
    tokenizer = checkpoint_tokenizer(path)
    model = load_inference_model(path, "lm", rt, "ckpt", decoding=True)
    return ServedModel(name=cfg.model_name or default_name(path), model=model, tokenizer=tokenizer,
                       template=template, reward_prefix="" if score is None else template.reward_prompt(score),
                       max_seq_len=meta.model.max_seq_len, stop_ids=stop_token_ids(tokenizer, template))


def default_name(path: Path) -> str:
    """`RUN/align_dt/checkpoints/step_00000100` -> `align_dt`, the stage that trained it;
    `ckpts/llama-8b/step_00000000` (an import) -> `llama-8b`, its checkpoint root."""
    path = path.resolve()
    if path.name.startswith("step_"):
        path = path.parent
    return path.parent.name if path.name == "checkpoints" else path.name
