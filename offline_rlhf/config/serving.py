"""Config of `orlhf serve`."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from offline_rlhf.config.base import Frozen, require, require_at_most, require_positive, require_run_dir
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.schema import ParallelConfig, TemplateConfig

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
MAX_SLOTS = 4096  # decode slots: the server allocates every slot's cache at start


@dataclass
class ServeConfig(Frozen):
    """`orlhf serve ckpt=PATH`: an OpenAI-compatible HTTP server (/v1/chat/completions,
    /v1/completions, /v1/models, /health) answering with the checkpoint on the project's
    generation engine, tensor parallel over the processes of its world (rank 0 serves HTTP)."""

    run_dir: str = "runs/default"  # run_dir/serve/ holds config.yaml, address.json and the lock
    ckpt: str = ""  # an lm checkpoint (SFT, aligned, PPO actor) or its checkpoints/ root
    model_name: str = ""  # the `model` clients ask for; "": the checkpoint's stage folder (sft, align_dt, ...)
    host: str = "127.0.0.1"  # the one address bound; any but loopback needs api_key_env
    port: int = 8000  # 0: any free port (address.json names it)
    api_key_env: str = ""  # NAME of the environment variable holding the API key; "": no key needed
    # Decision-Transformer reward prompt `<rm_score> a.b` after the assistant tag; None: the
    # checkpoint's dt_target when it is a DT model, none otherwise.
    reward_prompt: Optional[float] = None
    template: TemplateConfig = field(default_factory=TemplateConfig)  # when ckpt records none (another: an error)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    batch_size: int = 32  # decode slots shared by the requests being answered
    join_running: bool = True  # a request arriving while a batch runs joins it (false: it waits for the batch's end)
    max_tokens: int = 256  # a request's default max_tokens (capped by the room its prompt leaves)
    max_n: int = 8  # the largest n (choices per prompt) a request may ask for
    max_prompts: int = 16  # the most prompts one /v1/completions request may list
    max_body_kb: int = 1024  # larger request bodies are refused (413) unread
    cuda_graphs: bool = True  # on CUDA, replay the decode step as CUDA graphs (as generation.cuda_graphs)
    compile: bool = True  # with cuda_graphs, compile the decode step first (at start-up, before serving)
    # The head each checkpoint key's model must have (`orlhf launch` checks before queueing).
    checkpoint_heads: ClassVar[dict[str, str]] = {"ckpt": "lm"}

    def __post_init__(self):
        require_run_dir(self)
        require(self, "ckpt", fix="pass the checkpoint to serve (e.g. RUN/sft/checkpoints)")
        require(self, "host", fix="pass host=127.0.0.1 (or the one address to listen on)")
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", f"must be in 0..65535, got {self.port}", "0 picks a free port")
        if self.api_key_env and not ENV_NAME.fullmatch(self.api_key_env):
            raise ConfigError("api_key_env", f"{self.api_key_env!r} is not an environment variable name",
                              "name the variable that holds the key (never the key itself)")
        if not self.api_key_env and not is_loopback(self.host):
            raise ConfigError("api_key_env", f"empty while host={self.host} is not a loopback address (anyone "
                              "reaching it could use the server)", "set api_key_env=NAME, the environment variable "
                              "that holds the API key (or serve on host=127.0.0.1)")
        if self.model_name and not MODEL_NAME.fullmatch(self.model_name):
            raise ConfigError("model_name", f"{self.model_name!r} is not a model name",
                              "use letters, digits and . _ : / - (at most 128)")
        require_positive(self, "batch_size", "max_tokens", "max_n", "max_prompts", "max_body_kb")
        require_at_most(self, MAX_SLOTS, "batch_size", fix="each slot holds a whole sequence's cache")


def is_loopback(host: str) -> bool:
    """Whether `host` reaches this machine only: localhost, 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name: wherever it resolves to, not known to be loopback
        return False
