"""A tiny served checkpoint (seeded random weights, the synthetic BPE tokenizer) and an
`orlhf serve` server run in this process on 127.0.0.1, for the serving tests."""

from __future__ import annotations

import threading
from pathlib import Path

from offline_rlhf.checkpoint import CheckpointMeta, TrainState, resolve_checkpoint, save_checkpoint
from offline_rlhf.config.schema import ParallelConfig
from offline_rlhf.config.serving import ServeConfig
from offline_rlhf.data.tokenizer import Tokenizer
from offline_rlhf.http import listen
from offline_rlhf.parallel.dims import ParallelDims
from offline_rlhf.serving.batcher import Batcher
from offline_rlhf.serving.model import load_served_model
from offline_rlhf.serving.server import OpenAIServer
from tests.fixtures import reference_model, runtime_for
from tests.synthetic_preferences import MODEL, synthetic_tokenizer

NAME = "tiny"
KEY = "serve-test-key"


def write_lm_checkpoint(root: Path, tokenizer_dir: Path, metadata: dict | None = None, seed: int = 0) -> Path:
    """An `lm` checkpoint root (seeded random weights) saved with the tokenizer."""
    save_checkpoint(root, reference_model(MODEL, "lm", seed=seed),
                    CheckpointMeta(MODEL, "lm", TrainState(step=1), metadata=metadata or {}),
                    tokenizer_dir=tokenizer_dir)
    return root


def write_rm_checkpoint(root: Path, tokenizer_dir: Path) -> Path:
    save_checkpoint(root, reference_model(MODEL, "value", seed=1), CheckpointMeta(MODEL, "value", TrainState(step=1)),
                    tokenizer_dir=tokenizer_dir)
    return root


def make_tokenizer(out: Path) -> Path:
    synthetic_tokenizer(out)
    return out


# A chat template with a variable as Qwen3's enable_thinking: without `thinking`, every answer
# and the generation prompt open with "[quick] " (Qwen3's empty reasoning block, in short).
QUICK = "{% if not thinking %}[quick] {% endif %}"
THINKING_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {% if m['role'] == 'assistant' %}" + QUICK
                     + "{% endif %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] " + QUICK
                     + "{% endif %}")


def write_thinking_chat_checkpoint(root: Path, tokenizer_dir: Path, tokenizer_out: Path) -> Path:
    """An `lm` checkpoint trained (as its metadata says) with THINKING_TEMPLATE and thinking=false."""
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    tokenizer.config["chat_template"] = THINKING_TEMPLATE
    tokenizer.save(tokenizer_out)
    return write_lm_checkpoint(root, tokenizer_out,
                               metadata={"template": {"kind": "chat", "system": "", "kwargs": {"thinking": False}}})


class InProcess:
    """The server `orlhf serve` runs, in this process: HTTP on a thread, the engine loop on
    another (the stage runs it on the main thread)."""

    def __init__(self, ckpt: Path, stage_dir: Path, start_engine: bool = True, **settings):
        self.cfg = ServeConfig(ckpt=str(ckpt), model_name=NAME, port=0, **settings)
        rt = runtime_for(ParallelDims.build(ParallelConfig(), 1, MODEL), None, stage_dir)
        self.served = load_served_model(self.cfg, resolve_checkpoint(ckpt), rt)
        self.batcher = Batcher(self.served, rt, self.cfg.batch_size, join_running=self.cfg.join_running)
        self.server = OpenAIServer(self.served, self.batcher, self.cfg, KEY if self.cfg.api_key_env else None)
        self.listening = listen(self.server.app(), "127.0.0.1", 0, "serve-test")
        self.thread = threading.Thread(target=self.batcher.serve, kwargs={"poll_s": 0.01}, daemon=True)
        if start_engine:
            self.thread.start()
        self.url = self.listening.url

    def close(self) -> None:
        self.batcher.stop()
        if self.thread.ident is not None:
            self.thread.join(30)
        self.listening.stop()
