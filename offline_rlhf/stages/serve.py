"""`orlhf serve ckpt=PATH [host=127.0.0.1 port=8000]`: an OpenAI-compatible server for one
checkpoint. Every rank loads the model (tensor parallel over the world); rank 0 listens on
host:port, writes `run_dir/serve/address.json` (url, pid, model) once it accepts
connections, and runs the engine batches, which the other ranks follow. SIGTERM or
SIGINT (Ctrl-C) stops it: queued requests are answered 503 and the followers released.
The ledger row covers the server's whole life, idle time included."""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

from offline_rlhf.checkpoint import read_meta, resolve_checkpoint
from offline_rlhf.config.errors import ConfigError
from offline_rlhf.config.serving import ServeConfig
from offline_rlhf.fsutil import write_atomic
from offline_rlhf.http import key_from_env, listen
from offline_rlhf.runtime import Runtime, stage_runtime
from offline_rlhf.serving.batcher import Batcher
from offline_rlhf.serving.model import load_served_model
from offline_rlhf.serving.server import OpenAIServer

STAGE = "serve"
ADDRESS = "address.json"


def api_key(cfg: ServeConfig) -> str | None:
    """The key held in the environment variable cfg.api_key_env (None: no key needed)."""
    return key_from_env(cfg.api_key_env, "api_key_env", f"export {cfg.api_key_env}=<the key>, or leave api_key_env "
                        "empty to serve without a key (on a loopback host)")


def main(cfg: ServeConfig) -> int:
    key = api_key(cfg)
    path = resolve_checkpoint(cfg.ckpt, "ckpt")
    with stage_runtime(STAGE, cfg.run_dir, cfg.parallel, read_meta(path).model, cfg) as (rt, usage):
        if rt.dims.dp != 1:
            raise ConfigError("parallel.tp", f"is {rt.dims.tp}, but `orlhf serve` runs its {rt.dims.world_size} "
                              "processes as one tensor-parallel group", f"set parallel.tp={rt.dims.world_size}")
        served = load_served_model(cfg, path, rt)
        batcher = Batcher(served, rt, cfg.batch_size, cfg.cuda_graphs, cfg.compile, cfg.join_running)
        with _stopped_by_signals(batcher, rt):
            if rt.dims.world_size == 1:
                batcher.warm_up()
            if rt.is_main:
                try:
                    _serve_http(OpenAIServer(served, batcher, cfg, key), cfg, rt)
                finally:
                    batcher.release_followers()  # also when rank 0 fails before serving
            else:
                batcher.follow()
        usage.tokens += batcher.generated
        rt.log(f"serve: stopped after generating {batcher.generated} tokens in {batcher.batches} engine batches")
    return 0


def _serve_http(server: OpenAIServer, cfg: ServeConfig, rt: Runtime) -> None:
    try:
        listening = listen(server.app(), cfg.host, cfg.port, "orlhf serve")
    except OSError as error:
        raise ConfigError("port", f"cannot listen on {cfg.host}:{cfg.port} ({error.strerror or error})",
                          "pick a free port (port=0 takes any) or an address of this host") from None
    address = Path(rt.stage_dir) / ADDRESS
    try:
        # base_url: what an OpenAI client (or `orlhf judge`'s judge.base_url) takes.
        write_atomic(address, json.dumps({"url": listening.url, "base_url": f"{listening.url}/v1", "pid": os.getpid(),
                                          "model": server.served.name}))
        rt.log(f"serve: {server.served.name} on {listening.url}/v1 ({rt.dims.tp}-way tensor parallel"
               f"{', API key from $' + cfg.api_key_env if cfg.api_key_env else ', no API key'}"
               f"{', reward prompt' + server.served.reward_prefix if server.served.reward_prefix else ''})")
        server.batcher.serve()
    finally:
        address.unlink(missing_ok=True)
        listening.stop()


@contextmanager
def _stopped_by_signals(batcher: Batcher, rt: Runtime):
    """SIGTERM/SIGINT end rank 0's serving loop, which then releases the followers; the
    followers ignore them (a signal to the whole process group would otherwise kill them
    before rank 0's STOP arrives)."""
    def handle(signum, frame):
        if rt.is_main:
            batcher.stop()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
